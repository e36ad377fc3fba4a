//! Settings as given, before validation: one table of keys (the long flags, the `sgbox.toml`
//! keys, the `SGBOX_*` variables), and layers of raw values that remember where each value came
//! from (a flag, the environment, a file and line, the prompt), so that errors can name the field
//! the user would change.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::UserError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Str,
    Int,
    Bool,
}

pub(crate) struct Key {
    pub(crate) name: &'static str,
    pub(crate) kind: Kind,
}

/// Every setting, in the order `to_toml` prints them. The names are the long flags.
pub(crate) const KEYS: &[Key] = &[
    Key { name: "name", kind: Kind::Str },
    Key { name: "cloud", kind: Kind::Str },
    Key { name: "region", kind: Kind::Str },
    Key { name: "zone", kind: Kind::Str },
    Key { name: "size", kind: Kind::Str },
    Key { name: "instance-type", kind: Kind::Str },
    Key { name: "data-disk-gb", kind: Kind::Int },
    Key { name: "version", kind: Kind::Str },
    Key { name: "registry-mirror", kind: Kind::Str },
    Key { name: "mirror-mode", kind: Kind::Str },
    Key { name: "hostname", kind: Kind::Str },
    Key { name: "tls", kind: Kind::Str },
    Key { name: "tls-email", kind: Kind::Str },
    Key { name: "tls-cert", kind: Kind::Str },
    Key { name: "tls-key", kind: Kind::Str },
    Key { name: "ssh-cidr", kind: Kind::Str },
    Key { name: "allow-ssh-from-anywhere", kind: Kind::Bool },
    Key { name: "web-cidr", kind: Kind::Str },
    Key { name: "allow-plain-http-from-anywhere", kind: Kind::Bool },
    Key { name: "allow-undersized", kind: Kind::Bool },
    Key { name: "compose-override", kind: Kind::Str },
    Key { name: "image-id", kind: Kind::Str },
    Key { name: "subnet-id", kind: Kind::Str },
    Key { name: "base-image", kind: Kind::Str },
    Key { name: "accel", kind: Kind::Str },
    Key { name: "ssh-port", kind: Kind::Int },
    Key { name: "http-port", kind: Kind::Int },
    Key { name: "https-port", kind: Kind::Int },
];

pub fn env_var(key: &str) -> String {
    format!("SGBOX_{}", key.to_ascii_uppercase().replace('-', "_"))
}

/// Where a value came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env,
    File { path: PathBuf, line: usize },
    Prompt,
}

#[derive(Clone, Debug)]
pub struct Value {
    pub(crate) text: String,
    pub(crate) source: Source,
}

/// Unvalidated values of one layer, keyed by setting name.
#[derive(Clone, Debug, Default)]
pub struct Layer(BTreeMap<&'static str, Value>);

pub(crate) fn key_named(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

impl Layer {
    /// Values given as flags. `None` entries are flags not given.
    pub fn from_flags<'a>(flags: impl IntoIterator<Item = (&'a str, Option<String>)>) -> Layer {
        let mut l = Layer::default();
        for (name, v) in flags {
            let key = key_named(name).unwrap_or_else(|| panic!("flag {name} has no settings key"));
            if let Some(text) = v {
                l.0.insert(key.name, Value { text, source: Source::Flag });
            }
        }
        l
    }

    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Layer {
        let mut l = Layer::default();
        for key in KEYS {
            if let Some(text) = get(&env_var(key.name)) {
                l.0.insert(key.name, Value { text, source: Source::Env });
            }
        }
        l
    }

    pub fn from_file(path: &Path) -> Result<Layer, UserError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            UserError::field("config", format!("cannot read {}: {e}", path.display())).hint("pass -f with the path of an existing sgbox.toml")
        })?;
        Layer::parse_toml(&text, path)
    }

    pub fn parse_toml(text: &str, path: &Path) -> Result<Layer, UserError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            UserError::field("config", format!("{}:{line}:{col}: {}", path.display(), e.message().trim()))
                .hint("fix the TOML syntax at that position (strings need quotes, one key = value per line)")
        })?;
        let mut l = Layer::default();
        for (name, value) in table {
            let line = find_key_line(text, &name);
            let at = format!("{}:{line}", path.display());
            let Some(key) = key_named(&name) else {
                let mut err = UserError::field("config", format!("{at}: unknown key `{name}`"));
                err = match did_you_mean(&name) {
                    Some(s) => err.hint(format!("did you mean `{s}`?")),
                    None => err.hint(format!("known keys: {}", KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", "))),
                };
                return Err(err);
            };
            let text = match (key.kind, &value) {
                (Kind::Str, toml::Value::String(s)) => s.clone(),
                (Kind::Int, toml::Value::Integer(i)) => i.to_string(),
                (Kind::Bool, toml::Value::Boolean(b)) => b.to_string(),
                (kind, other) => {
                    let want = match kind {
                        Kind::Str => "a string in quotes",
                        Kind::Int => "a whole number",
                        Kind::Bool => "true or false",
                    };
                    return Err(UserError::field(key.name, format!("{at}: expected {want}, found {}", other.type_str())).hint(format!(
                        "write it as {} = {}",
                        key.name,
                        example(kind)
                    )));
                }
            };
            l.0.insert(key.name, Value { text, source: Source::File { path: path.to_path_buf(), line } });
        }
        Ok(l)
    }

    /// This layer with the gaps filled from `lower`.
    pub fn over(mut self, lower: Layer) -> Layer {
        for (k, v) in lower.0 {
            self.0.entry(k).or_insert(v);
        }
        self
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    /// A layer of one value.
    pub fn single(key: &'static str, v: Value) -> Layer {
        let mut l = Layer::default();
        l.0.insert(key, v);
        l
    }

    /// Every value given, in key order.
    pub fn entries(&self) -> impl Iterator<Item = (&'static str, &Value)> {
        self.0.iter().map(|(k, v)| (*k, v))
    }

    /// The raw text given for `key`, if any layer gave it.
    pub fn text(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.text.as_str())
    }
}

fn example(kind: Kind) -> &'static str {
    match kind {
        Kind::Str => "\"value\"",
        Kind::Int => "250",
        Kind::Bool => "true",
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

fn find_key_line(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let t = l.trim_start();
            let t = t.strip_prefix('"').unwrap_or(t);
            t.starts_with(key) && t[key.len()..].trim_start().trim_start_matches('"').trim_start().starts_with('=')
        })
        .map(|i| i + 1)
        .unwrap_or(1)
}

fn did_you_mean(name: &str) -> Option<&'static str> {
    KEYS.iter()
        .map(|k| (strsim::jaro_winkler(name, k.name), k.name))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, n)| n)
}

pub(crate) fn src_note(v: &Value) -> String {
    match &v.source {
        Source::Flag => String::new(),
        Source::Env => String::new(),
        Source::File { path, line } => format!(" (in {}:{line})", path.display()),
        Source::Prompt => " (answered at the prompt)".into(),
    }
}

/// The name a user would change: `--size`, `SGBOX_SIZE` or the file key.
pub(crate) fn field_name(key: &str, v: &Value) -> String {
    match v.source {
        Source::Flag => format!("--{key}"),
        Source::Env => env_var(key),
        _ => key.to_string(),
    }
}

pub(crate) fn bad(key: &str, v: &Value, msg: impl fmt::Display) -> UserError {
    UserError::field(field_name(key, v), format!("{msg}{}", src_note(v)))
}

/// An error from a shared parser, re-labelled with the field and where its value came from.
pub(crate) fn relabel(e: UserError, key: &str, v: &Value) -> UserError {
    UserError { hint: e.hint, ..bad(key, v, e.message) }
}
