//! Read-only access to the source tree.
//!
//! dmm never changes the source: it lists directories, reads metadata, file
//! data, link targets and extended attributes, always without following a
//! symbolic link, through paths relative to the source root. The source can
//! be a local directory or an NFS or SMB mount; this POSIX layer serves
//! both.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::io::Errno;

use crate::error::{Error, ErrorKind, Result, on};

/// The type of a file system object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    CharDevice,
    BlockDevice,
    Socket,
}

impl Kind {
    /// The kind of a file type, from a `stat` or a directory listing.
    pub(crate) fn of(file_type: fs::FileType) -> Kind {
        if file_type.is_dir() {
            Kind::Dir
        } else if file_type.is_symlink() {
            Kind::Symlink
        } else if file_type.is_fifo() {
            Kind::Fifo
        } else if file_type.is_char_device() {
            Kind::CharDevice
        } else if file_type.is_block_device() {
            Kind::BlockDevice
        } else if file_type.is_socket() {
            Kind::Socket
        } else {
            Kind::File
        }
    }
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    pub seconds: i64,
    pub nanos: u32,
}

impl Timestamp {
    /// Nanoseconds since the epoch (as the journal keeps a ctime).
    pub fn nanoseconds(self) -> i64 {
        self.seconds * 1_000_000_000 + i64::from(self.nanos)
    }
}

/// What dmm carries over from a source object besides its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits, setuid, setgid and sticky (no type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    /// Moves with every change of the file (data or metadata), and cannot
    /// be set back: how dmm tells a source file changed behind it.
    pub ctime: Timestamp,
    pub rdev: u64,
    /// Device and inode number in the source (hard link detection).
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
}

impl Meta {
    pub fn from_metadata(metadata: &fs::Metadata) -> Meta {
        Meta {
            kind: Kind::of(metadata.file_type()),
            mode: metadata.mode() & 0o7777,
            uid: metadata.uid(),
            gid: metadata.gid(),
            size: metadata.size(),
            atime: Timestamp {
                seconds: metadata.atime(),
                nanos: metadata.atime_nsec() as u32,
            },
            mtime: Timestamp {
                seconds: metadata.mtime(),
                nanos: metadata.mtime_nsec() as u32,
            },
            ctime: Timestamp {
                seconds: metadata.ctime(),
                nanos: metadata.ctime_nsec() as u32,
            },
            rdev: metadata.rdev(),
            dev: metadata.dev(),
            ino: metadata.ino(),
            nlink: metadata.nlink(),
        }
    }

    /// A regular file with more than one name.
    pub fn is_linked_file(&self) -> bool {
        self.kind == Kind::File && self.nlink > 1
    }
}

/// One entry of a source directory.
#[derive(Debug, Clone)]
pub struct Child {
    pub name: OsString,
    pub meta: Meta,
}

/// The source tree, read-only.
#[derive(Debug, Clone)]
pub struct Source {
    root: PathBuf,
}

impl Source {
    /// Opens the source tree rooted at `root`, which must be a readable
    /// directory.
    pub fn open(root: &Path) -> Result<Source> {
        let metadata =
            fs::metadata(root).map_err(on(ErrorKind::Invalid, "open the source", root))?;
        if !metadata.is_dir() {
            return Err(Error::on(ErrorKind::Invalid, "use the source", root)
                .with_detail("not a directory"));
        }
        fs::read_dir(root).map_err(on(ErrorKind::Invalid, "list the source", root))?;
        Ok(Source {
            root: root.to_path_buf(),
        })
    }

    /// The absolute path of `relative` (empty for the root).
    pub fn path(&self, relative: &Path) -> PathBuf {
        if relative.as_os_str().is_empty() {
            self.root.clone()
        } else {
            self.root.join(relative)
        }
    }

    pub fn stat(&self, relative: &Path) -> Result<Meta> {
        let path = self.path(relative);
        let metadata = fs::symlink_metadata(&path).map_err(on(ErrorKind::Source, "stat", &path))?;
        Ok(Meta::from_metadata(&metadata))
    }

    /// The entries of a directory, sorted by name so that population order
    /// (and so inode order in the target) follows the names.
    pub fn list(&self, relative: &Path) -> Result<Vec<Child>> {
        let path = self.path(relative);
        let listing = fs::read_dir(&path).map_err(on(ErrorKind::Source, "list", &path))?;
        let mut children = Vec::new();
        for entry in listing {
            let entry = entry.map_err(on(ErrorKind::Source, "list", &path))?;
            let child = path.join(entry.file_name());
            let metadata = match entry.metadata() {
                Ok(metadata) => metadata,
                // Vanished between readdir and stat: not part of the tree.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(on(ErrorKind::Source, "stat", &child)(err)),
            };
            children.push(Child {
                name: entry.file_name(),
                meta: Meta::from_metadata(&metadata),
            });
        }
        children.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(children)
    }

    /// Opens a regular file for reading without following links and
    /// without touching its access time where the system allows it.
    pub fn open_file(&self, relative: &Path) -> Result<File> {
        let path = self.path(relative);
        let open = |flags| {
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(flags)
                .open(&path)
        };
        let nofollow = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
        let noatime = rustix::fs::OFlags::NOATIME.bits() as i32;
        open(nofollow | noatime)
            .or_else(|err| match err.raw_os_error() {
                // O_NOATIME needs ownership of the file (or CAP_FOWNER).
                Some(code) if code == rustix::io::Errno::PERM.raw_os_error() => open(nofollow),
                _ => Err(err),
            })
            .map_err(on(ErrorKind::Source, "open", &path))
    }

    pub fn read_link(&self, relative: &Path) -> Result<PathBuf> {
        let path = self.path(relative);
        fs::read_link(&path).map_err(on(ErrorKind::Source, "read the link", &path))
    }

    /// Every extended attribute (POSIX ACLs included) with its value.
    pub fn xattrs(&self, relative: &Path) -> Result<Vec<(OsString, Vec<u8>)>> {
        let path = self.path(relative);
        read_xattrs(&path).map_err(on(ErrorKind::Source, "read xattrs of", &path))
    }
}

/// Every extended attribute of `path` (not following links) with its value.
fn read_xattrs(path: &Path) -> io::Result<Vec<(OsString, Vec<u8>)>> {
    let names = match grow(|buf| rustix::fs::llistxattr(path, buf)) {
        Ok(names) => names,
        Err(err) if err.raw_os_error() == Some(Errno::NOTSUP.raw_os_error()) => {
            return Ok(Vec::new());
        }
        Err(err) => return Err(err),
    };
    let mut attributes = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = std::ffi::OsStr::from_bytes(name);
        match grow(|buf| rustix::fs::lgetxattr(path, name, buf)) {
            Ok(value) => attributes.push((name.to_os_string(), value)),
            // Removed between list and get.
            Err(err) if err.raw_os_error() == Some(Errno::NODATA.raw_os_error()) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(attributes)
}

/// Calls a size-probing xattr function with a buffer that grows until the
/// value fits.
fn grow(mut call: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>) -> io::Result<Vec<u8>> {
    let mut size = 256;
    loop {
        let mut buf = vec![0u8; size];
        match call(&mut buf) {
            Ok(len) => {
                buf.truncate(len);
                return Ok(buf);
            }
            Err(Errno::RANGE) if size < 1 << 20 => size *= 4,
            Err(err) => return Err(err.into()),
        }
    }
}
