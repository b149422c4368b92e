//! Deterministic message ids from business key fields.
//!
//! The id is a UUIDv5 (RFC 9562) in the [`NAMESPACE`] over the key fields encoded as netstrings:
//! each field as `<byte length in decimal>:<UTF-8 bytes>,`, concatenated in order. The encoding is
//! unambiguous (`["a,b"]` and `["a", "b"]` differ), so any language can compute the same id:
//!
//! ```text
//! python3 -c "import uuid; ns = uuid.UUID('e1410293-3a24-5a40-a19d-c374ce71053f'); \
//!             print(uuid.uuid5(ns, '13:order.created,2:42,'))"
//! b2735dd2-fda0-583d-ae9b-325e47073520
//! ```

use uuid::Uuid;

/// The namespace of postbox's deterministic ids; part of the public contract, never changes.
pub use crate::contract::ID_NAMESPACE as NAMESPACE;

/// The id for an event identified by `fields`, e.g. `["order.created", order_id]`.
///
/// Include whatever makes the event unique (its type and the business key, plus a version or
/// sequence number when one entity emits the same event type more than once): a producer that
/// retries computes the same id, and the outbox keeps only the first row.
pub fn deterministic_id<I, S>(fields: I) -> Uuid
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    Uuid::new_v5(&NAMESPACE, &canonical_key(fields))
}

/// The netstring encoding of `fields` that [`deterministic_id`] hashes.
pub fn canonical_key<I, S>(fields: I) -> Vec<u8>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut out = Vec::new();
    for field in fields {
        let field = field.as_ref().as_bytes();
        out.extend_from_slice(field.len().to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(field);
        out.push(b',');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_is_derived_as_documented() {
        assert_eq!(
            Uuid::new_v5(&Uuid::NAMESPACE_URL, b"https://postbox.dev/message-id"),
            NAMESPACE
        );
    }

    #[test]
    fn encoding_is_unambiguous() {
        assert_eq!(canonical_key(["a,b"]), b"3:a,b,");
        assert_eq!(canonical_key(["a", "b"]), b"1:a,1:b,");
        assert_ne!(deterministic_id(["a,b"]), deterministic_id(["a", "b"]));
        // byte length, not character count
        assert_eq!(canonical_key(["ß"]), "2:ß,".as_bytes());
    }
}
