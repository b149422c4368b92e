//! The manual's reference pages, generated from the code: every setting (from the settings
//! types, their doc comments and `Settings::default()`) and every command (from clap). A test
//! compares them with `docs/configuration.md` and `docs/cli.md`; `POSTBOX_BLESS=1 cargo test
//! --lib reference` rewrites the pages after a change.

use std::fmt::Write as _;

use clap::CommandFactory;

use crate::config::Settings;

/// A settings struct's fields in source order, each with its doc comment on one line.
fn documented_fields(source: &str, structure: &str) -> Vec<(String, String)> {
    let Some(start) = source.find(&format!("pub struct {structure} {{")) else {
        return Vec::new();
    };
    let mut fields = Vec::new();
    let mut doc = Vec::new();
    for line in source[start..].lines().skip(1) {
        let line = line.trim();
        if line == "}" {
            break;
        }
        if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim().to_string());
        } else if let Some(field) = line.strip_prefix("pub ") {
            if let Some((name, _)) = field.split_once(':') {
                fields.push((name.trim().to_string(), doc.join(" ")));
            }
            doc.clear();
        }
    }
    fields
}

/// A default as the configuration file writes it.
fn toml_value(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) if text.is_empty() => "`\"\"`".to_string(),
        serde_json::Value::String(text) => format!("`\"{text}\"`"),
        other => format!("`{other}`"),
    }
}

/// `docs/configuration.md`'s generated part.
fn configuration() -> String {
    let defaults = serde_json::to_value(Settings::default()).unwrap_or_default();
    let sections = [
        ("", "Settings", include_str!("../config.rs")),
        ("relay", "RelayOptions", include_str!("../relay/options.rs")),
    ];
    let mut out = String::new();
    for (section, structure, source) in sections {
        let values = if section.is_empty() {
            &defaults
        } else {
            &defaults[section]
        };
        let title = if section.is_empty() {
            "Top level".to_string()
        } else {
            format!("`[{section}]`")
        };
        let _ = writeln!(out, "## {title}\n");
        let _ = writeln!(out, "| Setting | Default | Environment | Meaning |");
        let _ = writeln!(out, "|---|---|---|---|");
        for (name, doc) in documented_fields(source, structure) {
            let value = &values[&name];
            if value.is_object() {
                continue; // a section of its own
            }
            let mut env = if section.is_empty() {
                format!("`POSTBOX_{}`", name.to_uppercase())
            } else {
                format!(
                    "`POSTBOX_{}__{}`",
                    section.to_uppercase(),
                    name.to_uppercase()
                )
            };
            if matches!(name.as_str(), "database_url" | "amqp_url") {
                let _ = write!(env, ", `{}`", name.to_uppercase());
            }
            let _ = writeln!(
                out,
                "| `{name}` | {} | {env} | {} |",
                toml_value(value),
                doc.replace('|', "\\|")
            );
        }
        out.push('\n');
    }
    out
}

/// `docs/cli.md`'s generated part: each command's `--help`.
fn commands() -> String {
    fn walk(command: &mut clap::Command, path: &str, out: &mut String) {
        let name = if path.is_empty() {
            command.get_name().to_string()
        } else {
            format!("{path} {}", command.get_name())
        };
        let rendered = command.render_long_help().to_string();
        let help = rendered
            .lines()
            .map(str::trim_end)
            .collect::<Vec<_>>()
            .join("\n");
        let heading = "#".repeat(2 + name.matches(' ').count().min(2));
        let _ = writeln!(
            out,
            "{heading} `{name}`\n\n```text\n{}\n```\n",
            help.trim_end()
        );
        let mut subcommands: Vec<clap::Command> = command
            .get_subcommands()
            .filter(|sub| sub.get_name() != "help")
            .cloned()
            .collect();
        for sub in &mut subcommands {
            let mut sub = sub.clone().mut_args(|arg| arg.hide_env_values(true));
            walk(&mut sub, &name, out);
        }
    }
    // The variables' values in the test's environment are not the documentation's business.
    let mut command = super::Cli::command()
        .term_width(100)
        .mut_args(|arg| arg.hide_env_values(true));
    command.build();
    let mut out = String::new();
    walk(&mut command, "", &mut out);
    out
}

const BEGIN: &str =
    "<!-- generated: do not edit below; POSTBOX_BLESS=1 cargo test --lib reference -->";

/// Compares the page's generated part (after [`BEGIN`]) with `generated`, or rewrites it when
/// `POSTBOX_BLESS` is set.
fn check(page: &str, generated: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(page);
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let Some(at) = text.find(BEGIN) else {
        panic!("{page} has no line {BEGIN:?}");
    };
    let written = &text[at + BEGIN.len()..];
    let expected = format!("\n\n{generated}");
    if written.trim_end() == expected.trim_end() {
        return;
    }
    if std::env::var_os("POSTBOX_BLESS").is_some() {
        let updated = format!("{}{BEGIN}{}", &text[..at], expected.trim_end());
        std::fs::write(&path, updated + "\n").expect("rewrite the reference page");
        return;
    }
    panic!(
        "{page} is out of date with the code; run `POSTBOX_BLESS=1 cargo test --lib reference` \
         and commit the result"
    );
}

#[test]
fn reference_configuration_is_current() {
    let generated = configuration();
    for (name, var) in super::settings::names() {
        let field = name.rsplit('.').next().unwrap_or(&name);
        assert!(
            generated.contains(&format!("| `{field}` |")) && generated.contains(&var),
            "{name} ({var}) is missing from the configuration reference"
        );
    }
    check("docs/configuration.md", &generated);
}

#[test]
fn reference_commands_is_current() {
    check("docs/cli.md", &commands());
}
