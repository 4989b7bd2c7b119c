//! The one error type of the crate: why a migration cannot go on.
//!
//! In the style of a store's error (`dmm_store::Error`): what went wrong in
//! our terms (the kind, which the daemon and the CLI decide on: a stop is
//! not a failure), during which operation, on which target (a state file)
//! and byte range of the volume, and the cause as the error's source. The
//! message never repeats the source; [`MigrationError::report`] (or any
//! printer of the source chain) shows each cause once.

use std::fmt;
use std::io;

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The migration cannot work as asked (the stores do not fit, or a
    /// saved migration has other settings).
    Refused,
    /// A store failed.
    Store,
    /// The migration's state directory could not be used.
    State,
    /// Precopy gave up: clients write faster than the copy.
    NotConverging { passes: u32, dirty: u64 },
    /// Verification found chunks that differ.
    Mismatch,
    /// The request does not fit the migration's phase.
    InvalidState,
    /// Stopped on request; running the same migration again resumes it.
    Stopped,
    /// The copier stopped for a rollback request (`run` handles it).
    Interrupted,
    /// A copy task died (a bug).
    Internal,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Refused => f.write_str("cannot migrate"),
            ErrorKind::Store => f.write_str("store failed"),
            ErrorKind::State => f.write_str("migration state unusable"),
            ErrorKind::NotConverging { passes, dirty } => write!(
                f,
                "precopy does not converge: {dirty} chunks still dirty after {passes} passes \
                 (clients write faster than the copy); use --strategy auto or mirror"
            ),
            ErrorKind::Mismatch => f.write_str("verification found mismatching chunks"),
            ErrorKind::InvalidState => f.write_str("not possible in this phase"),
            ErrorKind::Stopped => f.write_str("stopped; run the same migration again to resume"),
            ErrorKind::Interrupted => f.write_str("interrupted for a rollback"),
            ErrorKind::Internal => f.write_str("internal failure"),
        }
    }
}

/// What the migration was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Negotiate,
    Resume,
    OpenState,
    ReadState,
    WriteState,
    Run,
    Copy,
    CopyBack,
    Verify,
    /// Comparing the stores after a crash.
    Reconcile,
    Checkpoint,
    SwitchOver,
    Commit,
    Rollback,
    /// Mirroring client writes to the destination.
    Mirror,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Negotiate => "negotiate",
            Operation::Resume => "resume",
            Operation::OpenState => "open state",
            Operation::ReadState => "read state",
            Operation::WriteState => "write state",
            Operation::Run => "run",
            Operation::Copy => "copy",
            Operation::CopyBack => "copy back",
            Operation::Verify => "verify",
            Operation::Reconcile => "reconcile",
            Operation::Checkpoint => "checkpoint",
            Operation::SwitchOver => "switch over",
            Operation::Commit => "commit",
            Operation::Rollback => "roll back",
            Operation::Mirror => "mirror",
        })
    }
}

type Source = Box<dyn std::error::Error + Send + Sync>;

/// Why a migration cannot go on: kind, operation, target, byte range,
/// cause.
pub struct MigrationError {
    kind: ErrorKind,
    operation: Operation,
    target: Option<String>,
    range: Option<(u64, u64)>,
    detail: Option<String>,
    source: Option<Source>,
}

impl MigrationError {
    /// An error of `kind` during `operation`.
    pub(crate) fn new(kind: ErrorKind, operation: Operation) -> MigrationError {
        MigrationError {
            kind,
            operation,
            target: None,
            range: None,
            detail: None,
            source: None,
        }
    }

    /// Names what the operation worked on (a state file, a directory).
    pub(crate) fn on(mut self, target: impl Into<String>) -> MigrationError {
        self.target = Some(target.into());
        self
    }

    /// Records the byte range of the volume the operation covered.
    pub(crate) fn at(mut self, offset: u64, len: u64) -> MigrationError {
        self.range = Some((offset, len));
        self
    }

    /// Adds a human explanation (for errors that have no source).
    pub(crate) fn with_detail(mut self, detail: impl Into<String>) -> MigrationError {
        self.detail = Some(detail.into());
        self
    }

    /// Attaches the underlying cause.
    pub(crate) fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> MigrationError {
        self.source = Some(source.into());
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn operation(&self) -> Operation {
        self.operation
    }

    pub fn target(&self) -> Option<&str> {
        self.target.as_deref()
    }

    /// The byte range as (offset, length), where one applies.
    pub fn range(&self) -> Option<(u64, u64)> {
        self.range
    }

    /// The message followed by every cause, for logs and progress reports.
    pub fn report(&self) -> String {
        dmm_control::report(self)
    }
}

impl fmt::Display for MigrationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.operation)?;
        if let Some(target) = &self.target {
            write!(f, " {target}")?;
        }
        if let Some((offset, len)) = self.range {
            write!(f, " at offset {offset} (+{len} bytes)")?;
        }
        write!(f, ": {}", self.kind)?;
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MigrationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.report())
    }
}

impl std::error::Error for MigrationError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// Tags a lower-level failure with the operation it interrupted.
pub(crate) trait Context<T> {
    fn during(self, operation: Operation) -> Result<T, MigrationError>;

    /// Like `during`, for an operation on one chunk's bytes.
    fn during_chunk(self, operation: Operation, bytes: (u64, u64)) -> Result<T, MigrationError>
    where
        Self: Sized,
    {
        self.during(operation).map_err(|e| e.at(bytes.0, bytes.1))
    }
}

impl<T> Context<T> for Result<T, dmm_store::Error> {
    fn during(self, operation: Operation) -> Result<T, MigrationError> {
        self.map_err(|e| MigrationError::new(ErrorKind::Store, operation).with_source(e))
    }
}

impl<T> Context<T> for io::Result<T> {
    fn during(self, operation: Operation) -> Result<T, MigrationError> {
        self.map_err(|e| MigrationError::new(ErrorKind::State, operation).with_source(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmm_store::Op;

    #[test]
    fn display_names_the_context_and_the_report_each_cause_once() {
        let cause = io::Error::from_raw_os_error(28);
        let store = dmm_store::Error::io(Op::Write, "/srv/b.img", cause).at(4096, 512);
        let err = Err::<(), _>(store)
            .during_chunk(Operation::Copy, (0, 1 << 20))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Store);
        assert_eq!(
            err.to_string(),
            "copy at offset 0 (+1048576 bytes): store failed"
        );
        let report = err.report();
        assert!(
            report.starts_with(
                "copy at offset 0 (+1048576 bytes): store failed: \
                 write /srv/b.img at offset 4096 (+512 bytes): no space left: "
            ),
            "{report}"
        );
        assert_eq!(
            report.matches("No space left on device").count(),
            1,
            "{report}"
        );
    }

    #[test]
    fn a_refusal_explains_itself_without_a_source() {
        let err = MigrationError::new(ErrorKind::Refused, Operation::Negotiate)
            .with_detail("the destination is read-only");
        assert_eq!(
            err.to_string(),
            "negotiate: cannot migrate: the destination is read-only"
        );
        assert!(std::error::Error::source(&err).is_none());
        assert_eq!(err.report(), err.to_string());
    }
}
