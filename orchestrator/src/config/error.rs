use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A configuration file's text, with what it takes to turn byte offsets into lines and columns.
pub struct Source {
    pub path: PathBuf,
    pub text: String,
    line_starts: Vec<usize>,
}

impl Source {
    pub fn new(path: impl Into<PathBuf>, text: String) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            path: path.into(),
            text,
            line_starts,
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let col = self.text[start..offset].chars().count() + 1;
        (line + 1, col)
    }

    /// An error located at `span` (a byte range into this file).
    pub fn error(
        &self,
        span: Range<usize>,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = self.line_col(span.start);
        ConfigError {
            file: self.path.clone(),
            line,
            column,
            path: path.into(),
            message: message.into(),
            help: None,
        }
    }
}

/// One thing wrong with a configuration file: where, which field, what, and how to fix it.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// The dotted path of the field at fault, e.g. `agents.classify.retry.max_attempts`.
    pub path: String,
    pub message: String,
    pub help: Option<String>,
}

impl ConfigError {
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// An error about a whole file (unreadable, not found).
    pub fn file(path: &Path, message: impl Into<String>) -> Self {
        Self {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            path: String::new(),
            message: message.into(),
            help: None,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        f.write_str(": ")?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// Every error found in one pass over the configuration, in file and line order.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn iter(&self) -> impl Iterator<Item = &ConfigError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "error: {e}")?;
        }
        let n = self.0.len();
        write!(f, "\n{n} error{} found", if n == 1 { "" } else { "s" })
    }
}

/// The closest of `candidates` to `name`, if one is close enough to be a plausible typo.
pub fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(name, c), c))
        .filter(|(d, c)| *d <= (name.len().max(c.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// `did you mean "x"?` or a list of what is valid.
pub fn suggestion<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str> + Clone) -> String {
    match nearest(name, candidates.clone()) {
        Some(n) => format!("did you mean {n:?}?"),
        None => {
            let all: Vec<String> = candidates.into_iter().map(|c| format!("{c:?}")).collect();
            if all.is_empty() {
                "nothing of that sort is declared".to_string()
            } else {
                format!("valid names are {}", all.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters() {
        let s = Source::new("f.toml", "a = 1\nbé = \"x\"\n".to_string());
        assert_eq!(s.line_col(0), (1, 1));
        assert_eq!(s.line_col(6), (2, 1));
        // 'é' is two bytes but one column.
        assert_eq!(s.line_col(10), (2, 4));
    }

    #[test]
    fn nearest_finds_typos_only() {
        assert_eq!(nearest("clasify", ["classify", "draft"]), Some("classify"));
        assert_eq!(nearest("zzz", ["classify", "draft"]), None);
    }
}
