//! Class-index -> human-readable name table (e.g. `models/imagenet_classes.txt`: the 1000
//! ImageNet-1k names in class-index order, one per line).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Number of ImageNet-1k classes.
pub const IMAGENET_CLASSES: usize = 1000;

#[derive(Debug, Error)]
pub enum LabelsError {
    #[error("cannot read labels file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("labels file {path} has {actual} entries, expected {expected}")]
    WrongCount {
        path: PathBuf,
        actual: usize,
        expected: usize,
    },
    #[error("labels file {path}: line {line} is empty")]
    EmptyLine { path: PathBuf, line: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    names: Vec<String>,
}

impl Labels {
    /// What a server says at start about its class-names file: replies carry class ids only,
    /// the names are for the clients' tables, so a missing file is a warning, not an error.
    pub fn log_availability(path: &Path) {
        match Labels::load(path, None) {
            Ok(labels) => log::info!("{} class names from {}", labels.len(), path.display()),
            Err(e) => log::warn!("class names unavailable ({e}); replies carry class ids only"),
        }
    }

    /// Loads one name per line (trailing whitespace and `\r` trimmed; a final newline is
    /// optional). With `expected`, a file with a different number of entries is an error:
    /// an off-by-one list would silently mislabel every prediction.
    pub fn load(path: &Path, expected: Option<usize>) -> Result<Labels, LabelsError> {
        let text = std::fs::read_to_string(path).map_err(|source| LabelsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let labels = Self::parse(&text).map_err(|line| LabelsError::EmptyLine {
            path: path.to_path_buf(),
            line,
        })?;
        if let Some(expected) = expected {
            if labels.len() != expected {
                return Err(LabelsError::WrongCount {
                    path: path.to_path_buf(),
                    actual: labels.len(),
                    expected,
                });
            }
        }
        Ok(labels)
    }

    /// Parses newline-separated names; on an empty line returns its 1-based number.
    fn parse(text: &str) -> Result<Labels, usize> {
        let names = text
            .lines()
            .enumerate()
            .map(|(i, line)| {
                let name = line.trim_end();
                if name.is_empty() {
                    Err(i + 1)
                } else {
                    Ok(name.to_owned())
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Labels { names })
    }

    /// Builds a table from names already in memory.
    pub fn from_names(names: Vec<String>) -> Labels {
        Labels { names }
    }

    /// Name of `class`, or `class_N` when the model emits an index past the table (a
    /// model/labels mismatch should degrade the output, not fail the request).
    pub fn name(&self, class: usize) -> Cow<'_, str> {
        match self.names.get(class) {
            Some(n) => Cow::Borrowed(n.as_str()),
            None => Cow::Owned(format!("class_{class}")),
        }
    }

    /// Name of `class` if it is in the table.
    pub fn get(&self, class: usize) -> Option<&str> {
        self.names.get(class).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imagenet_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/imagenet_classes.txt")
    }

    #[test]
    fn loads_imagenet_classes() {
        let labels = Labels::load(&imagenet_path(), Some(IMAGENET_CLASSES)).unwrap();
        assert_eq!(labels.len(), 1000);
        assert_eq!(labels.name(0), "tench");
        assert_eq!(labels.name(1), "goldfish");
        assert_eq!(labels.name(999), "toilet tissue");
        assert_eq!(labels.name(1000), "class_1000");
        assert_eq!(labels.get(1000), None);
    }

    #[test]
    fn wrong_count_and_missing_file_are_errors() {
        assert!(matches!(
            Labels::load(&imagenet_path(), Some(1001)),
            Err(LabelsError::WrongCount { actual: 1000, .. })
        ));
        assert!(matches!(
            Labels::load(Path::new("/nonexistent/labels.txt"), None),
            Err(LabelsError::Io { .. })
        ));
    }

    #[test]
    fn parse_trims_and_rejects_blank_lines() {
        let l = Labels::parse("a\r\nb c \n").unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l.name(1), "b c");
        assert_eq!(Labels::parse("a\n\nb\n"), Err(2));
    }
}
