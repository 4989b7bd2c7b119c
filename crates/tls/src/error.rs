//! One error for everything certificates: what was being done, to which
//! file, and the cause.

use std::path::{Path, PathBuf};

/// A certificate directory, file or configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct Error {
    /// What was being done ("cannot read the CA certificate").
    pub context: String,
    /// The file concerned, if one.
    pub path: Option<PathBuf>,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    pub(crate) fn new(context: impl Into<String>) -> Error {
        Error {
            context: context.into(),
            path: None,
            source: None,
        }
    }

    /// `context` about `path` ("cannot read the CA certificate /x/ca-cert.pem").
    pub(crate) fn at(context: &str, path: &Path) -> Error {
        Error {
            context: format!("{context} {}", path.display()),
            path: Some(path.to_owned()),
            source: None,
        }
    }

    pub(crate) fn because(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        self.source = Some(source.into());
        self
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
