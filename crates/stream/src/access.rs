//! The access point of a stream store: a FUSE directory whose files are
//! the streams. A writer creates a file and appends to it (`O_APPEND`, or
//! writes at its end: a write anywhere else fails with EPERM), readers
//! read any offset and follow it (`tail -F` sees the size grow: attributes
//! are never cached), `fsync` makes what was appended durable. Owners and
//! modes are each stream's own, checked by the kernel
//! (`default_permissions`); the directory is sticky and writable by all,
//! like `/tmp`, so that users create their own streams in it.
//!
//! Files are opened in direct I/O: every read and write reaches the
//! store, so a reader never sees a stale page of a stream that grew, and
//! the writer's latency is the store's.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

use crate::error::Error;
use crate::journal::Owner;
use crate::store::StreamStore;
use crate::stream::Stream;

/// The directory's inode.
const ROOT: INodeNo = INodeNo(1);
/// Attributes change with every append: the kernel asks each time.
const NO_CACHE: Duration = Duration::ZERO;
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_DIRECT_IO;
const BLOCK: u32 = 4096;

/// The file system the access point mounts.
pub struct StreamFs {
    store: Arc<StreamStore>,
    inodes: Mutex<Inodes>,
    /// The directory's owner: the daemon's user.
    root_owner: (u32, u32),
    mounted: SystemTime,
}

/// Inode numbers of the streams, given out as the kernel learns them.
#[derive(Default)]
struct Inodes {
    by_name: std::collections::BTreeMap<String, u64>,
    by_number: std::collections::BTreeMap<u64, String>,
}

impl Inodes {
    fn of(&mut self, name: &str) -> INodeNo {
        if let Some(&ino) = self.by_name.get(name) {
            return INodeNo(ino);
        }
        let ino = self
            .by_number
            .keys()
            .next_back()
            .map_or(ROOT.0 + 1, |n| n + 1);
        self.by_name.insert(name.to_owned(), ino);
        self.by_number.insert(ino, name.to_owned());
        INodeNo(ino)
    }
}

type Reply<T> = std::result::Result<T, Errno>;

impl StreamFs {
    pub fn new(store: Arc<StreamStore>) -> StreamFs {
        StreamFs {
            store,
            inodes: Mutex::new(Inodes::default()),
            root_owner: (
                rustix::process::geteuid().as_raw(),
                rustix::process::getegid().as_raw(),
            ),
            mounted: SystemTime::now(),
        }
    }

    fn stream(&self, ino: INodeNo) -> Reply<Arc<Stream>> {
        let name = self.inodes.lock().by_number.get(&ino.0).cloned();
        name.and_then(|name| self.store.get(&name))
            .ok_or(Errno::ENOENT)
    }

    fn named(&self, parent: INodeNo, name: &OsStr) -> Reply<Arc<Stream>> {
        if parent != ROOT {
            return Err(Errno::ENOENT);
        }
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        self.store.get(name).ok_or(Errno::ENOENT)
    }

    fn attr(&self, stream: &Stream) -> FileAttr {
        let shown = stream.attributes();
        FileAttr {
            ino: self.inodes.lock().of(stream.name()),
            size: shown.len,
            blocks: shown.stored.div_ceil(512),
            atime: shown.modified,
            mtime: shown.modified,
            ctime: shown.modified,
            crtime: shown.created,
            kind: FileType::RegularFile,
            perm: (shown.owner.mode & 0o7777) as u16,
            nlink: 1,
            uid: shown.owner.uid,
            gid: shown.owner.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        }
    }

    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: ROOT,
            size: 0,
            blocks: 0,
            atime: self.mounted,
            mtime: self.mounted,
            ctime: self.mounted,
            crtime: self.mounted,
            kind: FileType::Directory,
            perm: 0o1777,
            nlink: 2,
            uid: self.root_owner.0,
            gid: self.root_owner.1,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        }
    }

    fn attr_of(&self, ino: INodeNo) -> Reply<FileAttr> {
        if ino == ROOT {
            return Ok(self.root_attr());
        }
        Ok(self.attr(&*self.stream(ino)?))
    }

    fn create_stream(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
    ) -> Reply<FileAttr> {
        if parent != ROOT {
            return Err(Errno::ENOENT);
        }
        if mode & libc::S_IFMT != libc::S_IFREG && mode & libc::S_IFMT != 0 {
            return Err(Errno::EPERM);
        }
        let name = name.to_str().ok_or(Errno::EINVAL)?;
        if self.store.get(name).is_some() {
            return Err(Errno::EEXIST);
        }
        let owner = Owner {
            uid: req.uid(),
            gid: req.gid(),
            mode: mode & 0o7777,
        };
        let stream = self.store.create(name, owner).map_err(errno)?;
        Ok(self.attr(&stream))
    }

    #[allow(clippy::too_many_arguments)]
    fn change(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
    ) -> Reply<FileAttr> {
        if ino == ROOT {
            return Err(Errno::EPERM);
        }
        let stream = self.stream(ino)?;
        if size.is_some_and(|size| size != stream.len()) {
            // Append-only: a stream is never cut or extended with holes.
            return Err(Errno::EPERM);
        }
        if mode.is_some() || uid.is_some() || gid.is_some() {
            let old = stream.attributes().owner;
            let owner = Owner {
                uid: uid.unwrap_or(old.uid),
                gid: gid.unwrap_or(old.gid),
                mode: mode.map_or(old.mode, |m| m & 0o7777),
            };
            self.store.set_owner(&stream, owner).map_err(errno)?;
        }
        Ok(self.attr(&stream))
    }

    fn statfs_of_first_tier(&self) -> Reply<rustix::fs::StatVfs> {
        let dir = &self.store.orbit().tiers()[0].dir;
        rustix::fs::statvfs(dir).map_err(|e| Errno::from_i32(e.raw_os_error()))
    }
}

/// The errno of a store's failure, which is logged (the client sees only
/// the number) unless it is the client's own mistake.
fn errno(err: Error) -> Errno {
    use crate::error::ErrorKind;
    match err.kind() {
        ErrorKind::NotAppend | ErrorKind::NotFound | ErrorKind::Invalid => {}
        _ => tracing::warn!("{}", err.report()),
    }
    Errno::from_i32(err.errno())
}

impl Filesystem for StreamFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.named(parent, name) {
            Ok(stream) => reply.entry(&NO_CACHE, &self.attr(&stream), Generation(0)),
            Err(err) => reply.error(err),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr_of(ino) {
            Ok(attr) => reply.attr(&NO_CACHE, &attr),
            Err(err) => reply.error(err),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.change(ino, mode, uid, gid, size) {
            Ok(attr) => reply.attr(&NO_CACHE, &attr),
            Err(err) => reply.error(err),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        match self.create_stream(req, parent, name, mode & !umask) {
            Ok(attr) => reply.entry(&NO_CACHE, &attr, Generation(0)),
            Err(err) => reply.error(err),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.create_stream(req, parent, name, mode & !umask) {
            Ok(attr) => reply.created(&NO_CACHE, &attr, Generation(0), FileHandle(0), OPEN_FLAGS),
            Err(err) => reply.error(err),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let removed = self
            .named(parent, name)
            .and_then(|stream| self.store.remove(stream.name()).map_err(errno));
        match removed {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(err),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.stream(ino) {
            Ok(stream) if flags.0 & libc::O_TRUNC != 0 && !stream.is_empty() => {
                reply.error(Errno::EPERM)
            }
            Ok(_) => reply.opened(FileHandle(0), OPEN_FLAGS),
            Err(err) => reply.error(err),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let read = self
            .stream(ino)
            .and_then(|stream| stream.read(offset, size as usize).map_err(errno));
        match read {
            Ok(bytes) => reply.data(&bytes),
            Err(err) => reply.error(err),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let written = self
            .stream(ino)
            .and_then(|stream| stream.append(offset, data).map_err(errno));
        match written {
            Ok(_) => reply.written(data.len() as u32),
            Err(err) => reply.error(err),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self
            .stream(ino)
            .and_then(|stream| stream.sync().map_err(errno))
        {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(err),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![
            (ROOT, FileType::Directory, ".".to_owned()),
            (ROOT, FileType::Directory, "..".to_owned()),
        ];
        let mut inodes = self.inodes.lock();
        for stream in self.store.list() {
            entries.push((
                inodes.of(stream.name()),
                FileType::RegularFile,
                stream.name().to_owned(),
            ));
        }
        drop(inodes);
        for (index, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, index as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.statfs_of_first_tier() {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                255,
                st.f_frsize as u32,
            ),
            Err(err) => reply.error(err),
        }
    }
}

/// Mounts the store's access point at `path` (a dead mount a killed dmm
/// left there is detached first; anything else there is refused).
pub fn mount(
    store: Arc<StreamStore>,
    path: &std::path::Path,
    users: dmm_tree::AccessUsers,
) -> crate::Result<dmm_tree::AccessPoint> {
    let access = |err: dmm_tree::Error| {
        Error::on(crate::ErrorKind::Access, "mount the access point at", path)
            .with_detail(err.report())
    };
    dmm_tree::clear_stale_mount(path).map_err(access)?;
    dmm_tree::check_mountpoint(path).map_err(access)?;
    dmm_tree::AccessPoint::serve(StreamFs::new(store), path, users).map_err(access)
}
