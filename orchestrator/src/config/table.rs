//! Reading one TOML table field by field, so that one bad field does not hide the next: each field
//! is deserialized on its own (serde stops at the first error of a struct), and unknown fields are
//! reported with the nearest valid name.

use std::ops::Range;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeString, DeTable, DeValue, ValueDeserializer};

use super::error::{ConfigError, Source, suggestion};

pub(crate) type Entry<'a, 'i> = (&'a Spanned<DeString<'i>>, &'a Spanned<DeValue<'i>>);

pub(crate) struct TableReader<'a, 'i> {
    pub src: &'a Source,
    /// Dotted path of this table, e.g. `agents.classify`.
    pub path: String,
    /// Where the table is named, for errors about fields it lacks.
    pub span: Range<usize>,
    entries: &'a DeTable<'i>,
    taken: Vec<String>,
}

impl<'a, 'i> TableReader<'a, 'i> {
    pub fn new(
        src: &'a Source,
        path: impl Into<String>,
        span: Range<usize>,
        entries: &'a DeTable<'i>,
    ) -> Self {
        Self {
            src,
            path: path.into(),
            span,
            entries,
            taken: Vec::new(),
        }
    }

    pub fn field_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub fn entry(&self, key: &str) -> Option<Entry<'a, 'i>> {
        self.entries.iter().find(|(k, _)| k.get_ref() == key)
    }

    pub fn has(&self, key: &str) -> bool {
        self.entry(key).is_some()
    }

    /// Deserialize field `key` if present; a bad value becomes an error and `None`.
    pub fn take<T: DeserializeOwned>(
        &mut self,
        key: &str,
        errs: &mut Vec<ConfigError>,
    ) -> Option<T> {
        let (_, value) = self.entry(key)?;
        self.taken.push(key.to_string());
        match deserialize::<T>(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let span = e.span().unwrap_or_else(|| value.span());
                let mut err =
                    self.src
                        .error(span, self.field_path(key), clean_message(e.message()));
                if let Some(example) = example(key) {
                    err = err.with_help(format!("for example: {key} = {example}"));
                }
                errs.push(err);
                None
            }
        }
    }

    /// Like [`take`](Self::take), with the value's span.
    pub fn take_spanned<T: DeserializeOwned>(
        &mut self,
        key: &str,
        errs: &mut Vec<ConfigError>,
    ) -> Option<(T, Range<usize>)> {
        let span = self.entry(key)?.1.span();
        self.take(key, errs).map(|v| (v, span))
    }

    /// A field that must be there.
    pub fn require<T: DeserializeOwned>(
        &mut self,
        key: &str,
        help: &str,
        errs: &mut Vec<ConfigError>,
    ) -> Option<T> {
        if !self.has(key) {
            errs.push(
                self.src
                    .error(
                        self.span.clone(),
                        self.field_path(key),
                        format!("missing required field `{key}`"),
                    )
                    .with_help(help.to_string()),
            );
            return None;
        }
        self.take(key, errs)
    }

    /// Mark a field as handled without reading it here.
    pub fn skip(&mut self, key: &str) {
        self.taken.push(key.to_string());
    }

    /// The fields not taken yet, in source order.
    pub fn rest(&self) -> Vec<Entry<'a, 'i>> {
        let mut rest: Vec<_> = self
            .entries
            .iter()
            .filter(|(k, _)| !self.taken.iter().any(|t| t == k.get_ref().as_ref()))
            .collect();
        rest.sort_by_key(|(k, _)| k.span().start);
        rest
    }

    /// Report every field not taken as unknown, suggesting the nearest of `valid`.
    pub fn deny_unknown(&self, valid: &[&str], what: &str, errs: &mut Vec<ConfigError>) {
        for (k, _) in self.rest() {
            let key: &str = k.get_ref();
            errs.push(
                self.src
                    .error(
                        k.span(),
                        self.field_path(key),
                        format!("unknown field `{key}` in {what}"),
                    )
                    .with_help(suggestion(key, valid.iter().copied())),
            );
        }
    }
}

/// An example value for the fields people most often get wrong.
fn example(key: &str) -> Option<&'static str> {
    Some(match key {
        "max_in_flight_jobs" => "1000",
        "max_pending_jobs" => "100_000",
        "deadline" | "timeout" => "\"30s\"",
        "restart_window" | "pause_threshold" => "\"1m\"",
        "max_concurrency" | "burst" => "32",
        "max_restarts" => "10",
        "requests_per_second" | "requests_per_minute" => "500",
        "tokens_per_minute" | "tokens_per_hour" => "90_000",
        "retry" => "{ max_attempts = 5, initial_delay = \"200ms\", max_delay = \"30s\" }",
        "circuit_breaker" => {
            "{ failure_ratio = 0.5, min_calls = 20, window = \"30s\", open_for = \"15s\" }"
        }
        "on_upstream_pause" => "\"drain\" (or \"stop\")",
        "approval" => "\"auto\", \"required\" or \"never\"",
        "irreversible" => "true",
        _ => return None,
    })
}

pub(crate) fn deserialize<T: DeserializeOwned>(
    value: &Spanned<DeValue<'_>>,
) -> Result<T, toml::de::Error> {
    T::deserialize(ValueDeserializer::from(value.clone()))
}

/// toml's messages end with a newline and sometimes a period; ours are one lowercase line.
fn clean_message(m: &str) -> String {
    m.trim().trim_end_matches('.').to_string()
}

/// The span of the value at `path` below `value` (the deepest part of the path that exists).
pub(crate) fn span_at(value: &Spanned<DeValue<'_>>, path: &[String]) -> Range<usize> {
    let mut current = value;
    let mut span = value.span();
    for seg in path {
        let next = match current.get_ref() {
            DeValue::Table(t) => t
                .iter()
                .find(|(k, _)| k.get_ref() == seg)
                .map(|(k, v)| (k.span(), v)),
            DeValue::Array(a) => seg
                .parse::<usize>()
                .ok()
                .and_then(|i| a.get(i))
                .map(|v| (v.span(), v)),
            _ => None,
        };
        match next {
            Some((key_span, v)) => {
                span = if matches!(v.get_ref(), DeValue::Table(_) | DeValue::Array(_)) {
                    key_span
                } else {
                    v.span()
                };
                current = v;
            }
            None => break,
        }
    }
    span
}
