//! Making a target object a faithful copy of its source: placeholders of
//! every type, owner, mode, nanosecond times, extended attributes (POSIX
//! ACLs are the `system.posix_acl_*` attributes), and file data copied
//! extent by extent so that holes stay holes. What it copies is read by
//! `source`.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rustix::fs::{AtFlags, CWD, FileType, Mode, SeekFrom, Timespec, Timestamps};
use rustix::io::Errno;

use crate::source::{Kind, Meta, Timestamp};

/// Creates the object `meta` describes at `path`, empty: a directory, a
/// sparse regular file of the source's size, a symbolic link to
/// `link_target`, or a special file. Owner, mode and times come after,
/// with [`apply_meta`].
pub fn create_placeholder(path: &Path, meta: &Meta, link_target: Option<&Path>) -> io::Result<()> {
    match meta.kind {
        Kind::Dir => fs::DirBuilder::new().mode(0o700).create(path),
        Kind::File => {
            let file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            file.set_len(meta.size)
        }
        Kind::Symlink => {
            let target = link_target.ok_or_else(|| io::Error::other("symlink without a target"))?;
            std::os::unix::fs::symlink(target, path)
        }
        Kind::Fifo | Kind::CharDevice | Kind::BlockDevice | Kind::Socket => {
            let file_type = match meta.kind {
                Kind::Fifo => FileType::Fifo,
                Kind::CharDevice => FileType::CharacterDevice,
                Kind::BlockDevice => FileType::BlockDevice,
                _ => FileType::Socket,
            };
            rustix::fs::mknodat(CWD, path, file_type, Mode::from_raw_mode(0o600), meta.rdev)
                .map_err(io::Error::from)
        }
    }
}

/// Gives `path` the source's owner, mode and extended attributes, then its
/// times (last, since the other changes move ctime and may move mtime).
pub fn apply_meta(path: &Path, meta: &Meta, xattrs: &[(OsString, Vec<u8>)]) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid))?;
    if meta.kind != Kind::Symlink {
        // After chown, which clears setuid and setgid.
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode))?;
    }
    for (name, value) in xattrs {
        match rustix::fs::lsetxattr(
            path,
            name.as_os_str(),
            value,
            rustix::fs::XattrFlags::empty(),
        ) {
            Ok(()) => {}
            // Security labels belong to the target system's policy.
            Err(Errno::NOTSUP | Errno::PERM) if name.as_bytes().starts_with(b"security.") => {}
            Err(err) => return Err(err.into()),
        }
    }
    set_times(path, meta)
}

/// Sets access and modification times (nanoseconds), not following links.
pub fn set_times(path: &Path, meta: &Meta) -> io::Result<()> {
    let timespec = |t: Timestamp| Timespec {
        tv_sec: t.seconds,
        tv_nsec: t.nanos.into(),
    };
    let times = Timestamps {
        last_access: timespec(meta.atime),
        last_modification: timespec(meta.mtime),
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(io::Error::from)
}

/// Copies the data of `source` in `start..end` to the same offsets of
/// `target`, skipping holes (the target is sparse there already). Returns
/// the bytes written.
pub fn copy_range(source: &File, target: &File, start: u64, end: u64) -> io::Result<u64> {
    let mut written = 0;
    let mut at = start;
    while at < end {
        let data = match rustix::fs::seek(source, SeekFrom::Data(at)) {
            Ok(data) => data,
            // No data after `at`: the rest is a hole.
            Err(Errno::NXIO) => break,
            Err(err) => return Err(err.into()),
        };
        if data >= end {
            break;
        }
        let hole = rustix::fs::seek(source, SeekFrom::Hole(data))?.min(end);
        written += copy_bytes(source, target, data, hole - data)?;
        at = hole;
    }
    Ok(written)
}

/// Copies `len` bytes at `offset`, in the kernel where it can.
fn copy_bytes(source: &File, target: &File, offset: u64, len: u64) -> io::Result<u64> {
    let (mut from, mut to) = (offset, offset);
    let mut left = len;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        match rustix::fs::copy_file_range(source, Some(&mut from), target, Some(&mut to), chunk) {
            Ok(0) => break, // the source shrank
            Ok(n) => left -= n as u64,
            Err(Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                left -= copy_through_buffer(source, target, from, left)?;
                break;
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(len - left)
}

fn copy_through_buffer(source: &File, target: &File, offset: u64, len: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let want = (len - done).min(buf.len() as u64) as usize;
        let n = source.read_at(&mut buf[..want], offset + done)?;
        if n == 0 {
            break;
        }
        target.write_all_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(done)
}
