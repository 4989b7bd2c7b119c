//! The file operations migration state is written with, as a trait, so
//! that crash tests can run the same persistence code on files that lose
//! power ([`CrashFiles`](super::CrashFiles)) as on the disk ([`DiskFiles`]).
//!
//! The operations are the primitive ones whose durability POSIX defines:
//! a file's bytes are durable once it is synced, a name (created, renamed
//! or removed) once its directory is. The persistence code composes them
//! (an atomic replace is write, sync, rename, sync the directory), so a
//! crash test checks that composition, not a promise of the trait.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One directory of state files.
pub trait StateFiles: Send + Sync {
    /// Where the files are, for messages.
    fn location(&self) -> &Path;
    /// A whole file's bytes; `None` if it does not exist.
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
    /// The names of the files.
    fn names(&self) -> io::Result<Vec<String>>;
    /// Creates `name` empty (truncating it if it exists), for writing.
    fn create(&self, name: &str) -> io::Result<Arc<dyn StateFile>>;
    /// Opens `name` for appending, creating it if it does not exist.
    fn open_append(&self, name: &str) -> io::Result<Arc<dyn StateFile>>;
    /// Renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes the names in the directory durable.
    fn sync_directory(&self) -> io::Result<()>;
}

/// An open state file, written at its end only.
pub trait StateFile: Send + Sync {
    /// Writes `bytes` at the end of the file (one `write`, not synced).
    fn append(&self, bytes: &[u8]) -> io::Result<()>;
    /// Makes the file's bytes durable; blocks.
    fn sync(&self) -> io::Result<()>;
}

/// State files in a directory on disk, locked against a second dmm.
pub struct DiskFiles {
    path: PathBuf,
    _lock: File,
}

impl DiskFiles {
    /// Opens (creating) the directory and takes its lock; fails with
    /// `WouldBlock` if another process holds it.
    pub fn open(path: &Path) -> io::Result<DiskFiles> {
        std::fs::create_dir_all(path)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join("lock"))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)?;
        Ok(DiskFiles {
            path: path.to_owned(),
            _lock: lock,
        })
    }
}

impl StateFiles for DiskFiles {
    fn location(&self) -> &Path {
        &self.path
    }

    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path.join(name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn names(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            if let Ok(name) = entry?.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn StateFile>> {
        Ok(Arc::new(DiskFile(File::create(self.path.join(name))?)))
    }

    fn open_append(&self, name: &str) -> io::Result<Arc<dyn StateFile>> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(self.path.join(name))?;
        Ok(Arc::new(DiskFile(file)))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.path.join(from), self.path.join(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path.join(name))
    }

    fn sync_directory(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()
    }
}

struct DiskFile(File);

impl StateFile for DiskFile {
    fn append(&self, bytes: &[u8]) -> io::Result<()> {
        (&self.0).write_all(bytes)
    }

    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}
