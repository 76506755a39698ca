//! What goes wrong with policies, said so that a person can fix it.

use std::path::Path;

/// A policy that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A file that does not parse or holds a bad value.
    #[error("{file}:{line}:{column}: {message}")]
    Invalid {
        /// The file.
        file: String,
        /// Its line (from 1).
        line: usize,
        /// Its column (from 1).
        column: usize,
        /// What was expected and what was found.
        message: String,
    },
    /// Two policies match the same networks equally well.
    #[error("{first} and {second} match the same networks equally well: make one more specific")]
    Ambiguous {
        /// One policy.
        first: String,
        /// The other.
        second: String,
    },
    /// More than one policy says `default = true`.
    #[error("{first} and {second} both say default = true; one default policy at most")]
    TwoDefaults {
        /// One policy.
        first: String,
        /// The other.
        second: String,
    },
}

impl PolicyError {
    /// An error at byte `offset` of `text`, the contents of `file`.
    pub fn at(file: &Path, text: &str, offset: usize, message: String) -> Self {
        let before = &text[..offset.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Self::Invalid {
            file: file.display().to_string(),
            line,
            column,
            message,
        }
    }
}
