//! The daemon's one error: what kind of failure (it decides the HTTP
//! status), the context (operation and migration), and the cause kept as a
//! source, shown once at the end of the line.

use std::fmt::Write;

use dmm_catalog::MigrationId;

use crate::properties::PropertyError;

/// Why a verb was refused or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No such migration.
    NotFound,
    /// Bad property, bad value, bad request.
    Invalid,
    /// Not valid in the migration's current state (or busy).
    Conflict,
    /// The action was tried and failed (a store cannot be opened, …).
    Failed,
}

type Source = Box<dyn std::error::Error + Send + Sync>;

/// A refused or failed verb.
#[derive(Debug, thiserror::Error)]
#[error("{context}")]
pub struct Error {
    pub kind: ErrorKind,
    /// What was being done, e.g. "cannot start migration 3".
    pub context: String,
    pub migration: Option<MigrationId>,
    #[source]
    pub source: Option<Source>,
}

impl Error {
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Error {
        Error {
            kind,
            context: context.into(),
            migration: None,
            source: None,
        }
    }

    /// An error of `kind` caused by `source`.
    pub fn caused(kind: ErrorKind, context: impl Into<String>, source: impl Into<Source>) -> Error {
        Error {
            source: Some(source.into()),
            ..Error::new(kind, context)
        }
    }

    /// The same error, said of migration `id` doing `what` ("cannot start
    /// migration 3: …").
    pub fn of(self, id: MigrationId, what: &str) -> Error {
        Error {
            context: format!("cannot {what} migration {id}: {}", self.context),
            migration: Some(id),
            ..self
        }
    }

    /// The context and every cause, once each, on one line: what the
    /// admin sees.
    pub fn line(&self) -> String {
        let mut line = self.context.clone();
        let mut cause = std::error::Error::source(self);
        while let Some(err) = cause {
            let _ = write!(line, ": {err}");
            cause = err.source();
        }
        line
    }
}

impl From<dmm_catalog::Error> for Error {
    fn from(err: dmm_catalog::Error) -> Error {
        let kind = match err.kind {
            dmm_catalog::ErrorKind::NotFound => ErrorKind::NotFound,
            dmm_catalog::ErrorKind::Busy | dmm_catalog::ErrorKind::Conflict => ErrorKind::Conflict,
            _ => ErrorKind::Failed,
        };
        Error {
            kind,
            context: err.context,
            migration: None,
            source: err.source,
        }
    }
}

impl From<PropertyError> for Error {
    fn from(err: PropertyError) -> Error {
        let kind = match err.is_conflict() {
            true => ErrorKind::Conflict,
            false => ErrorKind::Invalid,
        };
        Error::new(kind, err.to_string())
    }
}

impl From<dmm_catalog::Refused> for Error {
    fn from(err: dmm_catalog::Refused) -> Error {
        Error::new(ErrorKind::Conflict, err.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_context_and_causes_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = Error::caused(ErrorKind::Failed, "cannot open /x", io).of(4, "start");
        assert_eq!(
            err.line(),
            "cannot start migration 4: cannot open /x: no such file"
        );
        assert_eq!(err.to_string(), "cannot start migration 4: cannot open /x");
        assert_eq!(err.migration, Some(4));
    }
}
