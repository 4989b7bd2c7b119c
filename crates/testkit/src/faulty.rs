//! A read-only FUSE view of a directory whose reads fail on demand: the
//! source a tree migration test needs when a disk returns EIO in the middle
//! of a file. (This machine has no device-mapper for `dm-flakey` or
//! `dm-error`; a FUSE file system is the fault injector that needs nothing
//! from the kernel but FUSE.)

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::os::unix::fs::{DirEntryExt, FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyXattr, Request, SessionACL,
};

/// Nothing is cached by the kernel: each look reaches the directory below.
const TTL: Duration = Duration::ZERO;

/// A mounted faulty view; unmounted when dropped.
pub struct FaultySource {
    session: Option<BackgroundSession>,
    faults: Arc<Faults>,
}

/// What fails: reads of files named `name` (in any directory) that reach
/// at or past byte `from`.
#[derive(Default)]
struct Faults {
    failing: Mutex<Option<(OsString, u64)>>,
    failed: AtomicU64,
}

impl FaultySource {
    /// Shows `real` at `mountpoint`, read-only, to every user.
    pub fn mount(real: &Path, mountpoint: &Path) -> FaultySource {
        let faults = Arc::new(Faults::default());
        let view = View {
            paths: Mutex::new(HashMap::from([(1, real.to_path_buf())])),
            open: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            faults: faults.clone(),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("dmm-faulty".into()),
            MountOption::RO,
            MountOption::DefaultPermissions,
        ];
        config.acl = SessionACL::All;
        config.n_threads = Some(4);
        let session = fuser::spawn_mount(view, mountpoint, &config)
            .unwrap_or_else(|err| panic!("mount a faulty view at {}: {err}", mountpoint.display()));
        FaultySource {
            session: Some(session),
            faults,
        }
    }

    /// From now on, reads of every file named `name` that reach byte
    /// `from` or beyond fail with EIO.
    pub fn fail_reads(&self, name: &str, from: u64) {
        *self.faults.failing.lock().unwrap() = Some((name.into(), from));
    }

    /// Reads work again.
    pub fn heal(&self) {
        *self.faults.failing.lock().unwrap() = None;
    }

    /// How many reads failed so far.
    pub fn failed_reads(&self) -> u64 {
        self.faults.failed.load(Ordering::Relaxed)
    }
}

impl Drop for FaultySource {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = session.umount_and_join();
        }
    }
}

/// The file system: inode numbers are those of the directory below (the
/// root is 1), each remembered with the path it was last found at.
struct View {
    paths: Mutex<HashMap<u64, PathBuf>>,
    open: Mutex<HashMap<u64, (File, OsString)>>,
    next_handle: AtomicU64,
    faults: Arc<Faults>,
}

impl View {
    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        self.paths
            .lock()
            .unwrap()
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    /// The attributes of `path`, known as inode `ino` from now on.
    fn attr(&self, path: &Path, ino: Option<u64>) -> Result<FileAttr, Errno> {
        let meta = fs::symlink_metadata(path).map_err(Errno::from)?;
        let ino = ino.unwrap_or(meta.ino());
        self.paths.lock().unwrap().insert(ino, path.to_path_buf());
        let time = |seconds: i64, nanos: i64| {
            UNIX_EPOCH + Duration::new(seconds.max(0) as u64, nanos as u32)
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size: meta.size(),
            blocks: meta.blocks(),
            atime: time(meta.atime(), meta.atime_nsec()),
            mtime: time(meta.mtime(), meta.mtime_nsec()),
            ctime: time(meta.ctime(), meta.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind: kind(meta.file_type()),
            perm: (meta.mode() & 0o7777) as u16,
            nlink: meta.nlink() as u32,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: meta.rdev() as u32,
            blksize: meta.blksize() as u32,
            flags: 0,
        })
    }

    /// Whether a read of `len` bytes at `offset` of a file named `name`
    /// must fail.
    fn fails(&self, name: &OsStr, offset: u64, len: u64) -> bool {
        let failing = self.faults.failing.lock().unwrap();
        let hit = matches!(&*failing, Some((n, from)) if n == name && offset + len > *from);
        if hit {
            self.faults.failed.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }
}

fn kind(file_type: fs::FileType) -> FileType {
    if file_type.is_dir() {
        FileType::Directory
    } else if file_type.is_symlink() {
        FileType::Symlink
    } else if file_type.is_fifo() {
        FileType::NamedPipe
    } else if file_type.is_socket() {
        FileType::Socket
    } else if file_type.is_block_device() {
        FileType::BlockDevice
    } else if file_type.is_char_device() {
        FileType::CharDevice
    } else {
        FileType::RegularFile
    }
}

impl Filesystem for View {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self
            .path(parent)
            .and_then(|dir| self.attr(&dir.join(name), None))
        {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(err) => reply.error(err),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self
            .path(ino)
            .and_then(|path| self.attr(&path, Some(ino.0)))
        {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(err) => reply.error(err),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .path(ino)
            .and_then(|p| fs::read_link(p).map_err(Errno::from))
        {
            Ok(target) => reply.data(target.as_os_str().as_encoded_bytes()),
            Err(err) => reply.error(err),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let opened = self.path(ino).and_then(|path| {
            let file = File::open(&path).map_err(Errno::from)?;
            Ok((file, path.file_name().unwrap_or_default().to_owned()))
        });
        match opened {
            Ok(file) => {
                let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
                self.open.lock().unwrap().insert(handle, file);
                reply.opened(FileHandle(handle), FopenFlags::FOPEN_DIRECT_IO);
            }
            Err(err) => reply.error(err),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let open = self.open.lock().unwrap();
        let Some((file, name)) = open.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        if self.fails(name, offset, u64::from(size)) {
            return reply.error(Errno::EIO);
        }
        let mut buf = vec![0; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(err) => return reply.error(Errno::from(err)),
            }
        }
        reply.data(&buf[..done]);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.open.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dir = match self.path(ino) {
            Ok(dir) => dir,
            Err(err) => return reply.error(err),
        };
        let listing = match fs::read_dir(&dir) {
            Ok(listing) => listing,
            Err(err) => return reply.error(Errno::from(err)),
        };
        let mut items = vec![
            (ino.0, FileType::Directory, OsString::from(".")),
            (ino.0, FileType::Directory, OsString::from("..")),
        ];
        for entry in listing.flatten() {
            if let Ok(file_type) = entry.file_type() {
                items.push((entry.ino(), kind(file_type), entry.file_name()));
            }
        }
        for (index, (ino, kind, name)) in items.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), index as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }
}
