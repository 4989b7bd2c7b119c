//! The one error of the cluster: what failed (the operation), on what (a
//! volume or node), why in our terms (the kind) and in etcd's (the source).

use std::fmt;

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No etcd member answered within the call's limit.
    Unavailable,
    /// Another node owns the volume, or the token is no longer current.
    Conflict,
    /// This node's fence is closed: it may have lost its lease.
    Fenced,
    /// etcd answered something this node cannot read.
    Corrupt,
    /// The request was refused by etcd (for example a lease that expired).
    Refused,
    /// What the node was given is not an etcd endpoint (a malformed URL).
    Invalid,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Unavailable => "etcd is unavailable",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Fenced => "this node is fenced",
            ErrorKind::Corrupt => "unreadable record",
            ErrorKind::Refused => "refused by etcd",
            ErrorKind::Invalid => "not an etcd endpoint",
        }
    }
}

/// A failed cluster operation.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    operation: &'static str,
    target: String,
    detail: Option<String>,
    source: Option<etcd_client::Error>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn new(
        kind: ErrorKind,
        operation: &'static str,
        target: impl Into<String>,
    ) -> Error {
        Error {
            kind,
            operation,
            target: target.into(),
            detail: None,
            source: None,
        }
    }

    pub(crate) fn with_detail(mut self, detail: impl Into<String>) -> Error {
        self.detail = Some(detail.into());
        self
    }

    pub(crate) fn caused_by(mut self, source: etcd_client::Error) -> Error {
        self.source = Some(source);
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The explanation without the kind (for example who owns a volume).
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.operation,
            self.target,
            self.kind.describe()
        )?;
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        if let Some(source) = &self.source {
            write!(f, " ({source})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
