//! Passwords out of URLs and messages before they reach a log line or an error.

/// `message` with the password of `url` (if any) masked: parser errors may quote it.
pub(crate) fn without_password(message: &str, url: &str) -> String {
    let password = url::Url::parse(url).ok().and_then(|url| {
        let query = url
            .query_pairs()
            .find(|(key, _)| key.eq_ignore_ascii_case("password"))
            .map(|(_, value)| value.into_owned());
        url.password().map(str::to_owned).or(query)
    });
    match password {
        Some(password) if !password.is_empty() => message.replace(&password, "***"),
        _ => message.to_owned(),
    }
}

/// Replaces the password in a URL with `***`, so URLs can be logged and shown in errors.
/// Text that does not parse as a URL is returned with everything between `:` and `@` masked.
pub(crate) fn redact_url(value: &str) -> String {
    match url::Url::parse(value) {
        Ok(mut url) => {
            if url.password().is_some() {
                // Setting a password only fails for URLs that cannot have one, which have none.
                let _ = url.set_password(Some("***"));
            }
            // libpq and sqlx also take the password as a query parameter.
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(key, value)| {
                    let value = if key.eq_ignore_ascii_case("password") {
                        "***".to_owned()
                    } else {
                        value.into_owned()
                    };
                    (key.into_owned(), value)
                })
                .collect();
            if pairs
                .iter()
                .any(|(key, _)| key.eq_ignore_ascii_case("password"))
            {
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        Err(_) => {
            let masked = match (value.rfind('@'), value.find("://")) {
                (Some(at), Some(scheme)) => match value[scheme + 3..at].find(':') {
                    Some(colon) => {
                        format!("{}:***{}", &value[..scheme + 3 + colon], &value[at..])
                    }
                    None => value.to_string(),
                },
                _ => value.to_string(),
            };
            mask_password_parameter(&masked)
        }
    }
}

/// `password=…` in text that is not a URL masked up to the next `&`.
fn mask_password_parameter(value: &str) -> String {
    let lower = value.to_ascii_lowercase();
    match lower.find("password=") {
        Some(start) => {
            let from = start + "password=".len();
            let end = value[from..].find('&').map_or(value.len(), |n| from + n);
            format!("{}***{}", &value[..from], &value[end..])
        }
        None => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://app:s3cr3t@db/app"),
            "postgres://app:***@db/app"
        );
        assert!(!redact_url("postgres://app:pa ss@db:x/app").contains("pa ss"));
        assert_eq!(
            redact_url("postgres://app@db/app?sslmode=require&password=s3cr3t"),
            "postgres://app@db/app?sslmode=require&password=***"
        );
        assert!(!redact_url("postgres://app@db:x/app?Password=s3cr3t&a=b").contains("s3cr3t"));
    }
}
