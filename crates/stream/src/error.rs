//! The one error type of streams: what kind of thing failed, what dmm was
//! doing to which file or stream, and the cause (kept as the error's
//! source, never flattened, so that the FUSE errno comes from it).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, in terms a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Reading or writing an extent on a tier failed.
    Tier,
    /// The stream journal could not be read or written.
    Journal,
    /// The configuration or request cannot work.
    Invalid,
    /// No such stream.
    NotFound,
    /// A write not at the stream's end (streams are append-only).
    NotAppend,
    /// A move asked for in the wrong phase, or of a stream on the last tier.
    Conflict,
    /// A drained extent differs from its source.
    Mismatch,
    /// Mounting or serving the access point failed.
    Access,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Tier => "tier",
            ErrorKind::Journal => "stream journal",
            ErrorKind::Invalid => "invalid request",
            ErrorKind::NotFound => "no such stream",
            ErrorKind::NotAppend => "append-only",
            ErrorKind::Conflict => "move",
            ErrorKind::Mismatch => "verification",
            ErrorKind::Access => "access point",
        }
    }

    /// The errno a FUSE client gets for it when no I/O cause says better.
    fn errno(self) -> i32 {
        match self {
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::NotAppend => libc::EPERM,
            ErrorKind::Invalid => libc::EINVAL,
            _ => libc::EIO,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

type Cause = Box<dyn std::error::Error + Send + Sync>;

/// A failed step: kind, operation, path, detail and cause, each where
/// known.
pub struct Error {
    kind: ErrorKind,
    operation: Option<&'static str>,
    path: Option<PathBuf>,
    detail: Option<String>,
    source: Option<Cause>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` that `detail` explains.
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Error {
        Error {
            kind,
            operation: None,
            path: None,
            detail: Some(detail.into()),
            source: None,
        }
    }

    /// An error of `kind` while doing `operation` to `path`.
    pub fn on(kind: ErrorKind, operation: &'static str, path: &Path) -> Error {
        Error {
            kind,
            operation: Some(operation),
            path: Some(path.to_path_buf()),
            detail: None,
            source: None,
        }
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.source = Some(Box::new(source));
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Error {
        self.detail = Some(detail.into());
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The errno to hand a FUSE client: the system's when the cause is an
    /// I/O error, else the kind's.
    pub fn errno(&self) -> i32 {
        self.source
            .as_deref()
            .and_then(|source| source.downcast_ref::<io::Error>())
            .and_then(io::Error::raw_os_error)
            .unwrap_or(self.kind.errno())
    }

    /// The error and its causes, each once.
    pub fn report(&self) -> String {
        dmm_control::report(self)
    }
}

/// A mapper of an I/O error into an error of `kind` doing `operation` to
/// `path`: `file.sync_data().map_err(on(Tier, "sync", path))`.
pub fn on<'a, E: std::error::Error + Send + Sync + 'static>(
    kind: ErrorKind,
    operation: &'static str,
    path: &'a Path,
) -> impl FnOnce(E) -> Error + 'a {
    move |err| Error::on(kind, operation, path).with_source(err)
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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

impl From<crate::extents::PhaseError> for Error {
    fn from(err: crate::extents::PhaseError) -> Error {
        Error::new(ErrorKind::Conflict, err.to_string())
    }
}
