//! What the config file and the policy file share: TOML error positions and messages that name
//! the fix, and [`IdOrName`] for users and groups given by name or id. Its own module so that
//! `config` and `policy` both depend on it and not on each other.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::limits::Limits;

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Byte offset and message of a TOML error (the message without toml's source excerpt).
pub(crate) fn toml_error(e: &toml::de::Error) -> (usize, String) {
    (
        e.span().map_or(0, |s| s.start),
        e.message().trim().to_owned(),
    )
}

/// [`toml_error`] for an error in `text`, where a value of the wrong type or out of range
/// (`max_clients = "many"`) gets a message naming the key with its table, what it must be,
/// and an example, instead of serde's bare "invalid type: string, expected u32".
pub(crate) fn toml_error_in(text: &str, e: &toml::de::Error) -> (usize, String) {
    let (offset, message) = toml_error(e);
    let explained = explain_value_error(text, offset, &message);
    (offset, explained.unwrap_or(message))
}

fn explain_value_error(text: &str, offset: usize, message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))?;
    let (found, expected) = rest.split_once(", expected ")?;
    let (table, key) = key_at(text, offset)?;
    let full = if table.is_empty() {
        key.clone()
    } else {
        format!("{table}.{key}")
    };
    let example = example_value(&key);
    let what = match expected {
        "u16" | "u32" | "u64" => format!("a whole number from 0 to {}", max_of(expected)),
        "i64" => "a whole number".to_owned(),
        "a boolean" | "bool" => "true or false".to_owned(),
        other => other.to_owned(),
    };
    let example = match example {
        Some(v) => v,
        None if what.starts_with("a whole number") => "1024".to_owned(),
        None => return Some(format!("`{full}` must be {what}, not {found}")),
    };
    Some(format!(
        "`{full}` must be {what}, not {found}; e.g. `{key} = {example}`"
    ))
}

fn max_of(ty: &str) -> u64 {
    match ty {
        "u16" => u64::from(u16::MAX),
        "u32" => u64::from(u32::MAX),
        _ => u64::MAX,
    }
}

/// An example value for a config key (the defaults of `docs/broker.md`).
fn example_value(key: &str) -> Option<String> {
    let d = Limits::default();
    Some(match key {
        "max_clients" => d.max_clients.to_string(),
        "max_topics" => d.max_topics.to_string(),
        "max_publishers_per_topic" => d.max_publishers_per_topic.to_string(),
        "max_subscribers_per_topic" => d.max_subscribers_per_topic.to_string(),
        "default_ring_bytes" => d.default_ring_bytes.to_string(),
        "max_ring_bytes" => d.max_ring_bytes.to_string(),
        "max_queued_replies" => d.max_queued_replies.to_string(),
        "handshake_timeout_ms" => d.handshake_timeout_ms.to_string(),
        "stall_timeout_ms" => d.stall_timeout_ms.to_string(),
        "ring_bytes" => "65536".to_owned(),
        "max_message_bytes" => "4096".to_owned(),
        "socket" => "\"/run/membus/bus.sock\"".to_owned(),
        "policy" => "\"policy.toml\"".to_owned(),
        "log" => "\"info\"".to_owned(),
        "name" => "\"sensors.imu\"".to_owned(),
        _ => return None,
    })
}

/// The table (`limits`, `topic`, or "" at the top) and key of the `key = value` line holding
/// byte `offset` of `text`.
fn key_at(text: &str, offset: usize) -> Option<(String, String)> {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let (key, _) = text[line_start..offset].split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() {
        return None;
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned())
        .unwrap_or_default();
    Some((table, key.to_owned()))
}

/// A TOML value that is a name (string) or a numeric id (integer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum IdOrName {
    Id(i64),
    Name(String),
}

impl<'de> Deserialize<'de> for IdOrName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IdOrName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a name (a string) or a numeric id")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IdOrName, E> {
                Ok(IdOrName::Id(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IdOrName, E> {
                Ok(IdOrName::Id(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IdOrName, E> {
                Ok(IdOrName::Name(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        assert_eq!(position("abc", 0), (1, 1));
        assert_eq!(position("abc\ndef", 4), (2, 1));
        assert_eq!(position("abc\ndéf", 7), (2, 3));
        assert_eq!(position("ab", 99), (1, 3));
    }
}
