//! The one error type of every block store.
//!
//! A storage admin reading a log line must learn what failed (the operation),
//! where (the path or address, and the byte range), why in our terms (the
//! kind, which the NBD server maps to an errno on the wire), and why in the
//! system's terms (the source error).

use std::fmt;
use std::io;
use std::sync::Arc;

/// What went wrong, independent of the backend. The NBD server maps each
/// kind to one NBD error value; the migration engine decides on it whether a
/// failure is worth a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The device or the system reported an I/O error.
    Io,
    /// No space left (also disk quota and file-too-large).
    NoSpace,
    /// The store was opened read-only, or the medium is read-only.
    ReadOnly,
    /// The byte range does not lie inside the store.
    OutOfRange,
    /// The store cannot do this (for example a fast zero it would have to
    /// emulate by writing).
    Unsupported,
    /// The request itself is malformed.
    InvalidInput,
    /// The path or export does not exist.
    NotFound,
    /// The system refused access.
    PermissionDenied,
    /// The connection to a remote store is gone.
    Disconnected,
    /// A remote peer broke the protocol.
    Protocol,
    /// The store is shutting down.
    Shutdown,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::NoSpace => "no space left",
            ErrorKind::ReadOnly => "store is read-only",
            ErrorKind::OutOfRange => "range is outside the store",
            ErrorKind::Unsupported => "operation not supported",
            ErrorKind::InvalidInput => "invalid request",
            ErrorKind::NotFound => "not found",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::Disconnected => "disconnected",
            ErrorKind::Protocol => "protocol violation",
            ErrorKind::Shutdown => "shutting down",
        }
    }

    /// The kind that best describes an operating-system error.
    pub fn from_io(err: &io::Error) -> ErrorKind {
        match err.raw_os_error() {
            Some(libc_errno::ENOSPC | libc_errno::EDQUOT | libc_errno::EFBIG) => {
                return ErrorKind::NoSpace;
            }
            Some(libc_errno::EROFS) => return ErrorKind::ReadOnly,
            Some(libc_errno::EOPNOTSUPP) => return ErrorKind::Unsupported,
            _ => {}
        }
        match err.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
            io::ErrorKind::Unsupported => ErrorKind::Unsupported,
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => ErrorKind::NoSpace,
            io::ErrorKind::ReadOnlyFilesystem => ErrorKind::ReadOnly,
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected => ErrorKind::Disconnected,
            _ => ErrorKind::Io,
        }
    }
}

/// errno values the kind mapping needs; Linux numbering.
mod libc_errno {
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const EDQUOT: i32 = 122;
    pub const EOPNOTSUPP: i32 = 95;
}

/// The operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Open,
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    Extents,
    Cache,
    Connect,
    Copy,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Open => "open",
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write zeroes",
            Op::Extents => "allocation map",
            Op::Cache => "cache",
            Op::Connect => "connect",
            Op::Copy => "copy",
        })
    }
}

type Source = Arc<dyn std::error::Error + Send + Sync>;

/// A failed store operation: kind, operation, target, byte range, cause.
///
/// Cheap to clone, so that one failure (a lost connection) can be handed to
/// every request that was waiting on it.
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    op: Op,
    target: Arc<str>,
    range: Option<(u64, u64)>,
    detail: Option<String>,
    source: Option<Source>,
}

/// Result of a store operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` while doing `op` on `target` (a path or address).
    pub fn new(kind: ErrorKind, op: Op, target: impl Into<Arc<str>>) -> Error {
        Error {
            kind,
            op,
            target: target.into(),
            range: None,
            detail: None,
            source: None,
        }
    }

    /// An operating-system error, its kind taken from the errno.
    pub fn io(op: Op, target: impl Into<Arc<str>>, err: io::Error) -> Error {
        Error::new(ErrorKind::from_io(&err), op, target).with_source(err)
    }

    /// Records the byte range the operation covered.
    pub fn at(mut self, offset: u64, len: u64) -> Error {
        self.range = Some((offset, len));
        self
    }

    /// Adds a human explanation (for errors that have no source).
    pub fn with_detail(mut self, detail: impl Into<String>) -> Error {
        self.detail = Some(detail.into());
        self
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.source = Some(Arc::new(source));
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn op(&self) -> Op {
        self.op
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    /// The byte range as (offset, length), where one applies.
    pub fn range(&self) -> Option<(u64, u64)> {
        self.range
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.op, self.target)?;
        if let Some((offset, len)) = self.range {
            write!(f, " at offset {offset} (+{len} bytes)")?;
        }
        write!(f, ": {}", self.kind.describe())?;
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_operation_target_range_and_kind() {
        let err =
            Error::io(Op::Write, "/srv/a.img", io::Error::from_raw_os_error(28)).at(4096, 512);
        assert_eq!(err.kind(), ErrorKind::NoSpace);
        assert_eq!(
            err.to_string(),
            "write /srv/a.img at offset 4096 (+512 bytes): no space left"
        );
        let source = std::error::Error::source(&err).expect("source kept");
        assert!(source.to_string().contains("No space left on device"));
    }

    #[test]
    fn errno_maps_to_kind() {
        let kind = |errno| ErrorKind::from_io(&io::Error::from_raw_os_error(errno));
        assert_eq!(kind(5), ErrorKind::Io);
        assert_eq!(kind(2), ErrorKind::NotFound);
        assert_eq!(kind(13), ErrorKind::PermissionDenied);
        assert_eq!(kind(122), ErrorKind::NoSpace);
        assert_eq!(kind(30), ErrorKind::ReadOnly);
        assert_eq!(kind(95), ErrorKind::Unsupported);
    }
}
