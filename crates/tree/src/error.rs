//! The one error type of tree migration.
//!
//! An admin reading `dmm stat`, `dmm log` or a log line must learn which
//! side failed (the kind), what dmm was doing to which path, in which
//! migration, and why in the system's terms. That last part is the cause:
//! an I/O error, the journal's SQLite error, the catalog's. It is kept as
//! the error's [`source`](std::error::Error::source), never flattened into
//! the message, so whoever prints the chain ([`Error::report`] does) shows
//! each cause once, and callers can still look at it (the FUSE errno comes
//! from the I/O cause).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

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
    /// Verification found target files that differ from the source.
    Mismatch,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Source => "source tree",
            ErrorKind::Target => "target tree",
            ErrorKind::Journal => "tree journal",
            ErrorKind::Invalid => "invalid configuration",
            ErrorKind::Access => "access point",
            ErrorKind::Mismatch => "verification",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

type Cause = Box<dyn std::error::Error + Send + Sync>;

/// A failed step of a tree migration: kind, operation, path, migration and
/// cause, each where known.
pub struct Error {
    kind: ErrorKind,
    /// What dmm was doing, as a verb phrase ("list", "open the source").
    operation: Option<&'static str>,
    path: Option<PathBuf>,
    migid: Option<i64>,
    /// A human explanation, for what no cause explains.
    detail: Option<String>,
    source: Option<Cause>,
}

/// Result of a tree migration step.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` that `detail` explains.
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Error {
        Error::of(kind).with_detail(detail)
    }

    /// An error of `kind` while doing `operation` to `path`.
    pub fn on(kind: ErrorKind, operation: &'static str, path: &Path) -> Error {
        Error {
            operation: Some(operation),
            path: Some(path.to_path_buf()),
            ..Error::of(kind)
        }
    }

    fn of(kind: ErrorKind) -> Error {
        Error {
            kind,
            operation: None,
            path: None,
            migid: None,
            detail: None,
            source: None,
        }
    }

    /// Adds a human explanation.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Error {
        self.detail = Some(detail.into());
        self
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.source = Some(Box::new(source));
        self
    }

    /// Names the migration the error happened in (kept if already named).
    pub fn in_migration(mut self, migid: i64) -> Error {
        self.migid.get_or_insert(migid);
        self
    }

    /// The same error, with `path` (a path dmm worked through, such as a
    /// `/proc/self/fd` link) or a path inside it named from `shown`.
    pub fn at_path(mut self, path: &Path, shown: &Path) -> Error {
        let inside = self.path.as_deref().and_then(|p| p.strip_prefix(path).ok());
        if let Some(rest) = inside {
            self.path = Some(if rest.as_os_str().is_empty() {
                shown.to_path_buf()
            } else {
                shown.join(rest)
            });
        }
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn operation(&self) -> Option<&'static str> {
        self.operation
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn migid(&self) -> Option<i64> {
        self.migid
    }

    /// The errno to hand a FUSE client for this error: the system's, when
    /// the cause is an I/O error, else EIO.
    pub fn errno(&self) -> i32 {
        self.source
            .as_deref()
            .and_then(|source| source.downcast_ref::<io::Error>())
            .and_then(io::Error::raw_os_error)
            .unwrap_or(libc::EIO)
    }

    /// The error and its causes, for people: each cause once (a cause
    /// whose text its wrapper already ends with is not repeated).
    pub fn report(&self) -> String {
        dmm_control::report(self)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(migid) = self.migid {
            write!(f, "migration {migid}: ")?;
        }
        write!(f, "{}: ", self.kind)?;
        let context = match (self.operation, &self.path) {
            (Some(operation), Some(path)) => format!("cannot {operation} {}", path.display()),
            (Some(operation), None) => format!("cannot {operation}"),
            (None, Some(path)) => path.display().to_string(),
            (None, None) => String::new(),
        };
        match (&self.detail, context.is_empty()) {
            (Some(detail), true) => f.write_str(detail),
            (Some(detail), false) => write!(f, "{context} ({detail})"),
            (None, _) => f.write_str(&context),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.report())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

/// Wraps an I/O error with the operation and the path it concerned.
pub fn on(
    kind: ErrorKind,
    operation: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> Error {
    move |err| Error::on(kind, operation, path).with_source(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_kind_operation_and_path_and_the_report_adds_the_cause_once() {
        let cause = io::Error::from_raw_os_error(libc::ENOENT);
        let err = on(ErrorKind::Source, "open", Path::new("/src/a"))(cause).in_migration(7);
        assert_eq!(
            err.to_string(),
            "migration 7: source tree: cannot open /src/a"
        );
        assert_eq!(err.errno(), libc::ENOENT);
        let report = err.report();
        assert!(
            report.starts_with("migration 7: source tree: cannot open /src/a: No such file"),
            "{report}"
        );
        assert_eq!(report.matches("No such file").count(), 1, "{report}");
    }

    #[test]
    fn a_cause_its_wrapper_already_quotes_is_shown_once() {
        #[derive(Debug)]
        struct Quoting(io::Error);
        impl fmt::Display for Quoting {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "catalog: write: {}", self.0)
            }
        }
        impl std::error::Error for Quoting {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let err = Error::on(ErrorKind::Journal, "write", Path::new("/j.db"))
            .with_source(Quoting(io::Error::other("disk full")));
        assert_eq!(
            err.report(),
            "tree journal: cannot write /j.db: catalog: write: disk full"
        );
        assert_eq!(err.errno(), libc::EIO);
    }

    #[test]
    fn paths_reached_through_a_descriptor_are_shown_by_name() {
        let err = Error::on(
            ErrorKind::Target,
            "create",
            Path::new("/proc/self/fd/9/./x"),
        )
        .at_path(Path::new("/proc/self/fd/9/."), Path::new("/target/d"));
        assert_eq!(err.path(), Some(Path::new("/target/d/x")));
        let detail = Error::new(ErrorKind::Invalid, "the target is not empty");
        assert_eq!(
            detail.to_string(),
            "invalid configuration: the target is not empty"
        );
    }
}
