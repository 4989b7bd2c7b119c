//! The one error type of tree migration: what kind of failure, what was
//! being done to which path, and the system's cause.

use std::fmt;
use std::io;
use std::path::Path;

/// What went wrong, in terms a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Reading the source tree failed.
    Source,
    /// Writing the target tree failed.
    Target,
    /// The journal could not be read or written.
    Journal,
    /// The configuration cannot work (missing source, target not empty,
    /// access point in use...).
    Invalid,
    /// Mounting or serving the access point failed.
    Access,
}

/// A tree migration error.
#[derive(Debug, thiserror::Error)]
pub struct Error {
    pub kind: ErrorKind,
    pub context: String,
    #[source]
    pub source: Option<io::Error>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.context),
            None => f.write_str(&self.context),
        }
    }
}

impl Error {
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Error {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    pub fn io(kind: ErrorKind, context: impl Into<String>, source: io::Error) -> Error {
        Error {
            kind,
            context: context.into(),
            source: Some(source),
        }
    }

    /// The same error, with `path` (a path dmm worked through, such as a
    /// `/proc/self/fd` link) named as `shown` in its message.
    pub fn at_path(mut self, path: &Path, shown: &Path) -> Error {
        let (path, shown) = (path.to_string_lossy(), shown.to_string_lossy());
        self.context = self.context.replace(&*path, &shown);
        self
    }

    /// The errno to hand a FUSE client for this error.
    pub fn errno(&self) -> i32 {
        self.source
            .as_ref()
            .and_then(io::Error::raw_os_error)
            .unwrap_or(libc_eio())
    }
}

const fn libc_eio() -> i32 {
    5
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps an I/O error with the operation and the path it concerned.
pub fn on(kind: ErrorKind, what: &str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let context = format!("cannot {what} {}", path.display());
    move |err| Error::io(kind, context, err)
}
