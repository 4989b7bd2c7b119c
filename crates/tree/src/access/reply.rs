//! What a FUSE operation answers: a value or an errno. Every part of the
//! access point speaks it, so it lives apart from all of them.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use fuser::Errno;

use crate::error::Error;

/// The outcome of one FUSE operation.
pub(super) type Reply<T> = std::result::Result<T, Errno>;

/// The errno of a system call's failure.
pub(super) fn errno(err: impl Into<io::Error>) -> Errno {
    Errno::from(err.into())
}

/// The errno of a migration step's failure, which is logged: the client
/// sees only the number.
pub(super) fn tree_errno(err: Error) -> Errno {
    tracing::warn!("{}", err.report());
    Errno::from_i32(err.errno())
}

/// A path that reaches the file `fd` is open on.
pub(super) fn proc_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}
