//! The FUSE operations: a passthrough to the target with the migration's
//! hooks in front. Namespace operations live here; what an open file does
//! is in `files`, how new objects are made as the caller in `caller`, how
//! inodes are found again in `nodes`.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirEntryExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags as AtRenameFlags, Stat};

use super::caller::Caller;
use super::files::{OpenFile, OpenFiles};
use super::iomode::{IoModes, PASSTHROUGH_FROM, Serving, Wants};
use super::nodes::Nodes;
use super::reply::{Reply, errno, proc_path, tree_errno};
use crate::error::{ErrorKind, Result, on};
use crate::journal::EntryId;
use crate::lock::{Mutex, Rank};
use crate::namespace::Namespace;
use crate::source::Kind;

/// `flush` has nothing to do, so the kernel need not send it on close.
const PASSTHROUGH_OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// Regular files served through dmm keep their page cache across opens:
/// every byte the kernel caches came through a read, which fetched its
/// segments first, or through a write, so the cache never holds a
/// placeholder's hole (`iomode` says when it may not be kept).
const SERVED_OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(PASSTHROUGH_OPEN_FLAGS);

/// How long the kernel may cache the name and attributes of an entry dmm
/// is still filling in (a directory not populated, a file with data to
/// copy): its placeholder's blocks, times and link count move under the
/// kernel, and the source's attributes it is shown may change.
const SETTLING_TTL: Duration = Duration::from_secs(1);

/// How long for any other entry. Only this file system changes the
/// target while it is mounted, and the kernel drops what it cached of an
/// entry each change goes through.
const SETTLED_TTL: Duration = Duration::from_secs(3600);

/// What the kernel is asked to do for dmm: pass the caller's umask
/// instead of applying it (a directory's default ACL replaces the umask,
/// which only the target file system knows), and check permissions
/// against POSIX ACLs as well as the mode.
const WANTED: InitFlags = InitFlags::FUSE_DONT_MASK.union(InitFlags::FUSE_POSIX_ACL);

/// What makes the access point faster where the kernel offers it:
/// listings that carry each entry's attributes (no lookup per name
/// afterwards), chosen by the kernel per directory.
const FASTER: InitFlags = InitFlags::FUSE_DO_READDIRPLUS.union(InitFlags::FUSE_READDIRPLUS_AUTO);

/// Attributes as the kernel is told them, with how long it may cache them.
struct Shown {
    attr: FileAttr,
    ttl: Duration,
}

/// A directory an operation works in.
struct Dir {
    /// Its target inode number.
    ino: u64,
    fd: Arc<OwnedFd>,
    /// Its tracked entry, if the migration tracks it.
    entry: Option<EntryId>,
}

/// One directory entry of an open directory.
struct DirItem {
    ino: u64,
    kind: FileType,
    name: OsString,
}

pub(super) struct TreeFs {
    namespace: Arc<Namespace>,
    /// Target inode number of the root (FUSE inode 1).
    root_ino: u64,
    nodes: Nodes,
    files: OpenFiles,
    modes: Arc<IoModes>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirItem>>>>,
    next_handle: AtomicU64,
}

/// How many `O_PATH` descriptors of known inodes stay open: a quarter of
/// the open-file limit, leaving the rest to the files clients open and to
/// the migration's workers.
fn open_descriptor_budget() -> NonZeroUsize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 20);
    let budget = (limit / 4).clamp(64, 1 << 16) as usize;
    NonZeroUsize::new(budget).unwrap_or(NonZeroUsize::MIN)
}

fn system_time(seconds: i64, nanos: i64) -> SystemTime {
    if seconds >= 0 {
        UNIX_EPOCH + Duration::new(seconds as u64, nanos as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs())
            + Duration::from_nanos(nanos as u64)
    }
}

fn kind_of(mode: u32) -> FileType {
    match rustix::fs::FileType::from_raw_mode(mode) {
        rustix::fs::FileType::Directory => FileType::Directory,
        rustix::fs::FileType::Symlink => FileType::Symlink,
        rustix::fs::FileType::Fifo => FileType::NamedPipe,
        rustix::fs::FileType::CharacterDevice => FileType::CharDevice,
        rustix::fs::FileType::BlockDevice => FileType::BlockDevice,
        rustix::fs::FileType::Socket => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

impl TreeFs {
    pub(super) fn new(namespace: Arc<Namespace>, modes: Arc<IoModes>) -> Result<TreeFs> {
        let root = namespace.target_root().to_path_buf();
        let fd = rustix::fs::open(
            &root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| on(ErrorKind::Target, "open", &root)(e.into()))?;
        let root_ino = rustix::fs::fstat(&fd)
            .map_err(|e| on(ErrorKind::Target, "stat", &root)(e.into()))?
            .st_ino;
        Ok(TreeFs {
            namespace,
            root_ino,
            nodes: Nodes::new(root_ino, fd, open_descriptor_budget()),
            files: OpenFiles::new(),
            modes,
            dirs: Mutex::new(Rank::Handles, HashMap::new()),
            next_handle: AtomicU64::new(1),
        })
    }

    /// FUSE inode numbers are target inode numbers, with the root's and
    /// 1 swapped (FUSE's root is 1).
    fn to_fuse(&self, target_ino: u64) -> INodeNo {
        INodeNo(match target_ino {
            t if t == self.root_ino => 1,
            1 => self.root_ino,
            t => t,
        })
    }

    fn to_target(&self, ino: INodeNo) -> u64 {
        match ino.0 {
            1 => self.root_ino,
            t if t == self.root_ino => 1,
            t => t,
        }
    }

    fn fd(&self, ino: INodeNo) -> Reply<Arc<OwnedFd>> {
        self.nodes.fd(self.to_target(ino))
    }

    /// The attributes clients see, and how long the kernel may cache them.
    /// dmm writing a file's data or a directory's placeholders moves its
    /// ctime; one no client changed shows a stable one (its mtime) until
    /// the end, so readers such as tar do not see it change under them.
    /// `st` was taken after [`Namespace::settled_count`] read `before`:
    /// when an entry settled since, `st` may hold the times of a copy in
    /// progress, and `again` takes a fresh look.
    fn attr(&self, st: &Stat, before: u64, again: impl FnOnce() -> Option<Stat>) -> Shown {
        let tracked = self.namespace.entry_of_ino(st.st_ino);
        let settling = tracked.and_then(|id| self.namespace.settling_source_meta(id));
        let fresh =
            (tracked.is_some() && settling.is_none() && self.namespace.settled_count() != before)
                .then(again)
                .flatten()
                .filter(|fresh| fresh.st_ino == st.st_ino);
        let st = fresh.as_ref().unwrap_or(st);
        let mut attr = self.raw_attr(st);
        if matches!(attr.kind, FileType::RegularFile | FileType::Directory)
            && tracked.is_some_and(|id| self.namespace.is_unchanged(id))
        {
            attr.ctime = attr.mtime;
        }
        if let Some(source) = settling {
            attr.atime = system_time(source.atime.seconds, source.atime.nanos.into());
            attr.mtime = system_time(source.mtime.seconds, source.mtime.nanos.into());
            attr.ctime = attr.mtime;
            if attr.kind == FileType::Directory {
                attr.nlink = source.nlink as u32;
            }
        }
        let settled = tracked.is_none_or(|id| self.namespace.is_settled(id));
        let ttl = if settled { SETTLED_TTL } else { SETTLING_TTL };
        Shown { attr, ttl }
    }

    fn raw_attr(&self, st: &Stat) -> FileAttr {
        FileAttr {
            ino: self.to_fuse(st.st_ino),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: system_time(st.st_atime, st.st_atime_nsec as i64),
            mtime: system_time(st.st_mtime, st.st_mtime_nsec as i64),
            ctime: system_time(st.st_ctime, st.st_ctime_nsec as i64),
            crtime: UNIX_EPOCH,
            kind: kind_of(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    /// The tracked entry of an inode.
    fn entry(&self, ino: INodeNo) -> Option<EntryId> {
        self.namespace.entry_of_ino(self.to_target(ino))
    }

    /// The directory `parent`, populated.
    fn populated_dir(&self, parent: INodeNo) -> Reply<Dir> {
        let fd = self.fd(parent)?;
        let entry = self.entry(parent);
        if let Some(id) = entry {
            self.namespace.ensure_populated(id).map_err(tree_errno)?;
        }
        Ok(Dir {
            ino: self.to_target(parent),
            fd,
            entry,
        })
    }

    /// Registers a lookup of `name` in `dir` and returns its attributes.
    /// Directories get tracked: tracked entries may be moved into them.
    fn remember(&self, dir: &Dir, name: &OsStr) -> Reply<Shown> {
        let before = self.namespace.settled_count();
        let st = self.nodes.look_up(dir.ino, &dir.fd, name)?;
        if kind_of(st.st_mode) == FileType::Directory
            && let Some(parent_entry) = dir.entry
            && self.namespace.entry_of_ino(st.st_ino).is_none()
            && let Err(err) = self.namespace.track_dir(parent_entry, name, st.st_ino)
        {
            // The kernel will not hear of this lookup.
            self.nodes.forget(st.st_ino, 1);
            return Err(tree_errno(err));
        }
        let again = || rustix::fs::statat(&*dir.fd, name, AtFlags::SYMLINK_NOFOLLOW).ok();
        Ok(self.attr(&st, before, again))
    }

    /// The inode `name` in `dir` stands for, if any.
    fn ino_at(dir: &Dir, name: &OsStr) -> Option<u64> {
        rustix::fs::statat(&*dir.fd, name, AtFlags::SYMLINK_NOFOLLOW)
            .ok()
            .map(|st| st.st_ino)
    }

    fn handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> Reply<Shown> {
        let dir = self.populated_dir(parent)?;
        self.remember(&dir, name)
    }

    fn do_getattr(&self, ino: INodeNo) -> Reply<Shown> {
        let before = self.namespace.settled_count();
        let fd = self.fd(ino)?;
        let st = rustix::fs::fstat(&*fd).map_err(errno)?;
        Ok(self.attr(&st, before, || rustix::fs::fstat(&*fd).ok()))
    }

    #[allow(clippy::too_many_arguments)]
    fn do_setattr(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> Reply<Shown> {
        let fd = self.fd(ino)?;
        let path = proc_path(&*fd);
        let entry = self.entry(ino);
        if let Some(id) = entry {
            // Else the population would overwrite a directory's new times.
            self.namespace.ensure_populated(id).map_err(tree_errno)?;
        }
        if let Some(size) = size {
            if let Some(id) = entry {
                self.namespace
                    .prepare_truncate(id, size)
                    .map_err(tree_errno)?;
            }
            match fh.and_then(|fh| self.files.get(fh).ok()) {
                Some(open) => open.set_len(size).map_err(errno)?,
                None => std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(size))
                    .map_err(errno)?,
            }
        } else if let Some(id) =
            entry.filter(|_| mode.is_some() || atime.is_some() || mtime.is_some())
        {
            self.namespace.note_change(id).map_err(tree_errno)?;
        }
        if uid.is_some() || gid.is_some() {
            rustix::fs::chownat(
                &*fd,
                "",
                uid.map(rustix::fs::Uid::from_raw),
                gid.map(rustix::fs::Gid::from_raw),
                AtFlags::EMPTY_PATH,
            )
            .map_err(errno)?;
        }
        if let Some(mode) = mode {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(errno)?;
        }
        if atime.is_some() || mtime.is_some() {
            let spec = |t: Option<TimeOrNow>| match t {
                None => rustix::fs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_OMIT,
                },
                Some(TimeOrNow::Now) => rustix::fs::Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_NOW,
                },
                Some(TimeOrNow::SpecificTime(t)) => {
                    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                    rustix::fs::Timespec {
                        tv_sec: d.as_secs() as i64,
                        tv_nsec: d.subsec_nanos().into(),
                    }
                }
            };
            let times = rustix::fs::Timestamps {
                last_access: spec(atime),
                last_modification: spec(mtime),
            };
            rustix::fs::utimensat(rustix::fs::CWD, &path, &times, AtFlags::empty())
                .map_err(errno)?;
        }
        self.do_getattr(ino)
    }

    /// Makes a new object (not a regular file: `do_create`) as the
    /// caller, with the request's umask where it applies.
    fn do_create_node(
        &self,
        req: &Request,
        (parent, name): (INodeNo, &OsStr),
        umask: Option<u32>,
        make: impl FnOnce(&OwnedFd) -> rustix::io::Result<()>,
    ) -> Reply<Shown> {
        let dir = self.populated_dir(parent)?;
        Caller::of(req).create(umask, || make(&dir.fd))?;
        self.remember(&dir, name)
    }

    fn do_remove(&self, parent: INodeNo, name: &OsStr, flags: AtFlags) -> Reply<()> {
        let dir = self.populated_dir(parent)?;
        if let Some(ino) = Self::ino_at(&dir, name) {
            self.nodes.losing_name(ino, dir.ino, name)?;
        }
        let act = || rustix::fs::unlinkat(&*dir.fd, name, flags).map_err(io::Error::from);
        let outcome = match dir.entry {
            Some(parent_entry) => self
                .namespace
                .remove(parent_entry, name, act)
                .map_err(tree_errno)?,
            None => act(),
        };
        outcome.map_err(errno)
    }

    fn do_rename(
        &self,
        (parent, name): (INodeNo, &OsStr),
        (new_parent, new_name): (INodeNo, &OsStr),
        flags: RenameFlags,
    ) -> Reply<()> {
        let dir = self.populated_dir(parent)?;
        let new_dir = self.populated_dir(new_parent)?;
        let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
        let moving = Self::ino_at(&dir, name);
        let replaced = Self::ino_at(&new_dir, new_name).filter(|ino| Some(*ino) != moving);
        if let Some(ino) = replaced.filter(|_| !exchange) {
            self.nodes.losing_name(ino, new_dir.ino, new_name)?;
        }
        let at_flags = AtRenameFlags::from_bits_retain(flags.bits());
        // Reopening by name waits while the rename acts, so that it never
        // follows a record the rename is making stale.
        let act = || {
            let _renaming = self.nodes.renaming();
            rustix::fs::renameat_with(&*dir.fd, name, &*new_dir.fd, new_name, at_flags)?;
            if let Some(ino) = Self::ino_at(&new_dir, new_name) {
                self.nodes.moved(ino, new_dir.ino, new_name);
            }
            if exchange && let Some(ino) = Self::ino_at(&dir, name) {
                self.nodes.moved(ino, dir.ino, name);
            }
            Ok(())
        };
        let outcome = match (dir.entry, new_dir.entry) {
            (Some(from), Some(to)) => self
                .namespace
                .rename((from, name), (to, new_name), exchange, act)
                .map_err(tree_errno)?,
            _ => act(),
        };
        outcome.map_err(errno)
    }

    fn do_link(&self, ino: INodeNo, new_parent: INodeNo, new_name: &OsStr) -> Reply<Shown> {
        let fd = self.fd(ino)?;
        let dir = self.populated_dir(new_parent)?;
        let act = || {
            rustix::fs::linkat(
                rustix::fs::CWD,
                proc_path(&*fd),
                &*dir.fd,
                new_name,
                AtFlags::SYMLINK_FOLLOW,
            )
            .map_err(io::Error::from)
        };
        let outcome = match (self.entry(ino), dir.entry) {
            (Some(id), Some(parent)) => self
                .namespace
                .link(id, (parent, new_name), act)
                .map_err(tree_errno)?,
            _ => act(),
        };
        outcome.map_err(errno)?;
        self.remember(&dir, new_name)
    }

    /// Opens a regular file, and decides how the kernel serves it
    /// (`register` makes a backing file for passthrough).
    fn do_open(
        &self,
        ino: INodeNo,
        flags: i32,
        register: impl FnOnce(&OwnedFd) -> io::Result<BackingId>,
    ) -> Reply<(u64, Serving)> {
        let fd = self.fd(ino)?;
        let entry = self.entry(ino);
        let file = OpenFile::open(&self.namespace, &fd, entry, flags)?;
        let mode = self.serve(self.to_target(ino), &fd, (entry, flags), register)?;
        Ok((self.add_file(file), mode))
    }

    /// How the kernel serves an open of target inode `ino` (`fd`, tracked
    /// as `entry`, opened with `flags`); counted until its release.
    fn serve(
        &self,
        ino: u64,
        fd: &OwnedFd,
        (entry, flags): (Option<EntryId>, i32),
        register: impl FnOnce(&OwnedFd) -> io::Result<BackingId>,
    ) -> Reply<Serving> {
        let wants = Wants {
            writable: OFlags::from_bits_retain(flags as u32) & OFlags::RWMODE != OFlags::RDONLY,
            tracked: entry.is_some(),
            complete: entry.is_none_or(|id| !self.namespace.is_pending_file(id)),
            large: rustix::fs::fstat(fd).is_ok_and(|st| st.st_size as u64 >= PASSTHROUGH_FROM),
        };
        let mode = self.modes.open(ino, wants, || register(&backing_file(fd)?));
        if let (
            Serving::Passthrough {
                mark_changed: true, ..
            },
            Some(id),
        ) = (&mode, entry)
            && let Err(err) = self.namespace.note_change(id)
        {
            self.modes.release(ino);
            return Err(tree_errno(err));
        }
        Ok(mode)
    }

    /// Creates and opens a regular file, as the caller.
    fn do_create(
        &self,
        req: &Request,
        (parent, name): (INodeNo, &OsStr),
        (mode, umask): (u32, u32),
        flags: i32,
        register: impl FnOnce(&OwnedFd) -> io::Result<BackingId>,
    ) -> Reply<(Shown, u64, Serving)> {
        let dir = self.populated_dir(parent)?;
        let oflags =
            OFlags::from_bits_retain(flags as u32 & !(OFlags::NOCTTY | OFlags::APPEND).bits())
                | OFlags::CREATE
                | OFlags::CLOEXEC;
        let file = Caller::of(req).create(Some(umask), || {
            rustix::fs::openat(&*dir.fd, name, oflags, Mode::from_raw_mode(mode & 0o7777))
        })?;
        let shown = self.remember(&dir, name)?;
        let ino = self.to_target(shown.attr.ino);
        let entry = self.namespace.entry_of_ino(ino);
        let served = self.serve(ino, &file, (entry, flags), register);
        let served = served.inspect_err(|_| {
            self.nodes.forget(ino, 1);
        })?;
        let handle = self.add_file(OpenFile::new(std::fs::File::from(file), entry, oflags));
        Ok((shown, handle, served))
    }

    fn add_file(&self, file: OpenFile) -> u64 {
        let handle = self.handle();
        self.files.insert(handle, file);
        handle
    }

    fn do_opendir(&self, ino: INodeNo) -> Reply<u64> {
        let fd = self.fd(ino)?;
        if let Some(id) = self.entry(ino) {
            self.namespace.ensure_populated(id).map_err(tree_errno)?;
        }
        let mut items = vec![
            DirItem {
                ino: ino.0,
                kind: FileType::Directory,
                name: ".".into(),
            },
            DirItem {
                ino: ino.0,
                kind: FileType::Directory,
                name: "..".into(),
            },
        ];
        for entry in std::fs::read_dir(proc_path(&*fd)).map_err(errno)? {
            let entry = entry.map_err(errno)?;
            items.push(DirItem {
                ino: self.to_fuse(entry.ino()).0,
                kind: listed_kind(entry.file_type().map_err(errno)?),
                name: entry.file_name(),
            });
        }
        let handle = self.handle();
        self.dirs.lock().insert(handle, Arc::new(items));
        Ok(handle)
    }

    /// Fills a READDIRPLUS reply from `offset`: each entry comes with its
    /// attributes, and counts as a lookup of it (but `.` and `..`, which
    /// the kernel does not link). An entry gone since the listing was taken
    /// is left out.
    fn list_plus(&self, dir: &Dir, items: &[DirItem], offset: u64, mut reply: ReplyDirectoryPlus) {
        for (index, item) in items.iter().enumerate().skip(offset as usize) {
            let next = index as u64 + 1;
            if item.name == "." || item.name == ".." {
                let attr = listed_attr(INodeNo(item.ino), item.kind);
                if reply.add(
                    attr.ino,
                    next,
                    &item.name,
                    &Duration::ZERO,
                    &attr,
                    Generation(0),
                ) {
                    break;
                }
                continue;
            }
            let Ok(shown) = self.remember(dir, &item.name) else {
                continue;
            };
            let (attr, ttl) = (&shown.attr, &shown.ttl);
            if reply.add(attr.ino, next, &item.name, ttl, attr, Generation(0)) {
                // It did not fit: the kernel does not hear of it.
                self.nodes.forget(self.to_target(attr.ino), 1);
                break;
            }
        }
        reply.ok();
    }

    fn do_xattr(
        &self,
        ino: INodeNo,
        size: u32,
        get: impl Fn(&Path, &mut [u8]) -> rustix::io::Result<usize>,
    ) -> Reply<Vec<u8>> {
        let path = proc_path(&*self.fd(ino)?);
        let mut buf = vec![0u8; if size == 0 { 64 * 1024 } else { size as usize }];
        let len = get(&path, &mut buf).map_err(errno)?;
        buf.truncate(len);
        Ok(buf)
    }
}

fn reply_xattr(reply: ReplyXattr, size: u32, result: Reply<Vec<u8>>) {
    match result {
        Ok(value) if size == 0 => reply.size(value.len() as u32),
        Ok(value) => reply.data(&value),
        Err(err) => reply.error(err),
    }
}

fn reply_entry(reply: ReplyEntry, result: Reply<Shown>) {
    match result {
        Ok(shown) => reply.entry(&shown.ttl, &shown.attr, Generation(0)),
        Err(err) => reply.error(err),
    }
}

/// The flags of an open served through dmm.
fn served_open_flags(keep_cache: bool) -> FopenFlags {
    if keep_cache {
        SERVED_OPEN_FLAGS
    } else {
        SERVED_OPEN_FLAGS - FopenFlags::FOPEN_KEEP_CACHE
    }
}

/// Whether files can be passed through: the kernel offers it, and dmm may
/// register backing files (CAP_SYS_ADMIN). Backing files on a stacked file
/// system (overlayfs) are refused later, at the first open.
fn passthrough_possible(config: &mut KernelConfig) -> bool {
    if !config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH) {
        tracing::info!(
            "the kernel lacks FUSE passthrough (Linux 6.9 and later): reads and writes of \
             migrated files go through dmm"
        );
        return false;
    }
    if !rustix::process::geteuid().is_root() {
        tracing::info!(
            "FUSE passthrough needs root (CAP_SYS_ADMIN): reads and writes of migrated files \
             go through dmm"
        );
        return false;
    }
    config.set_max_stack_depth(1).is_ok()
}

/// The attributes of a listing entry the kernel does not link (`.`,
/// `..`): only its inode number and type are read.
fn listed_attr(ino: INodeNo, kind: FileType) -> FileAttr {
    FileAttr {
        ino,
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn reply_attr(reply: ReplyAttr, result: Reply<Shown>) {
    match result {
        Ok(shown) => reply.attr(&shown.ttl, &shown.attr),
        Err(err) => reply.error(err),
    }
}

/// A file type from a directory listing (the kernel's `d_type`, without a
/// `stat` per entry).
fn listed_kind(kind: std::fs::FileType) -> FileType {
    match Kind::of(kind) {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Socket => FileType::Socket,
    }
}

/// The file the kernel passes an open of `fd`'s inode through to: read and
/// write whenever the target allows it, since every open of the inode
/// shares it while it is passed through (the client's own open already
/// checked its access).
fn backing_file(fd: &OwnedFd) -> io::Result<OwnedFd> {
    let path = proc_path(fd);
    let open = |mode| rustix::fs::open(&path, mode | OFlags::CLOEXEC, Mode::empty());
    open(OFlags::RDWR)
        .or_else(|_| open(OFlags::RDONLY))
        .map_err(io::Error::from)
}

fn reply_empty(reply: ReplyEmpty, result: Reply<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(err) => reply.error(err),
    }
}

impl Filesystem for TreeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let wanted = WANTED & config.capabilities();
        if wanted != WANTED {
            tracing::warn!(
                "the kernel lacks FUSE capabilities {:?}: new objects may get the wrong mode",
                WANTED - wanted
            );
        }
        // Only capabilities the kernel offers are asked for: this cannot fail.
        let _ = config.add_capabilities(wanted | (FASTER & config.capabilities()));
        if passthrough_possible(config) {
            let _ = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH);
            self.modes.enable();
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.do_lookup(parent, name));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let target = self.to_target(ino);
        if self.nodes.forget(target, nlookup) {
            self.modes.forget(target);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(reply, self.do_getattr(ino));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply_attr(
            reply,
            self.do_setattr(ino, mode, uid, gid, size, atime, mtime, fh),
        );
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let result = self
            .fd(ino)
            .and_then(|fd| rustix::fs::readlinkat(&*fd, "", Vec::new()).map_err(errno));
        match result {
            Ok(target) => reply.data(target.as_bytes()),
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
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let file_type = rustix::fs::FileType::from_raw_mode(mode);
        let perm = Mode::from_raw_mode(mode & 0o7777);
        let make = |dir: &OwnedFd| rustix::fs::mknodat(dir, name, file_type, perm, rdev.into());
        reply_entry(
            reply,
            self.do_create_node(req, (parent, name), Some(umask), make),
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let make =
            |dir: &OwnedFd| rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode & 0o7777));
        reply_entry(
            reply,
            self.do_create_node(req, (parent, name), Some(umask), make),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.do_remove(parent, name, AtFlags::empty()));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.do_remove(parent, name, AtFlags::REMOVEDIR));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let make = |dir: &OwnedFd| rustix::fs::symlinkat(target, dir, link_name);
        reply_entry(
            reply,
            self.do_create_node(req, (parent, link_name), None, make),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.do_rename((parent, name), (newparent, newname), flags),
        );
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply_entry(reply, self.do_link(ino, newparent, newname));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.do_open(ino, flags.0, |fd| reply.open_backing(fd)) {
            Ok((handle, Serving::Passthrough { backing, .. })) => {
                reply.opened_passthrough(FileHandle(handle), PASSTHROUGH_OPEN_FLAGS, &backing)
            }
            Ok((handle, Serving::Served { keep_cache })) => {
                reply.opened(FileHandle(handle), served_open_flags(keep_cache))
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
        match self
            .files
            .get(fh)
            .and_then(|f| f.read(&self.namespace, offset, size))
        {
            Ok(data) => reply.data(&data),
            Err(err) => reply.error(err),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self
            .files
            .get(fh)
            .and_then(|f| f.write(&self.namespace, offset, data))
        {
            Ok(written) => reply.written(written),
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

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files.remove(fh);
        self.modes.release(self.to_target(ino));
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let result = self
            .files
            .get(fh)
            .and_then(|f| f.fsync(&self.namespace, datasync));
        reply_empty(reply, result);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.do_opendir(ino) {
            Ok(handle) => reply.opened(FileHandle(handle), FopenFlags::empty()),
            Err(err) => reply.error(err),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(items) = self.dirs.lock().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        for (index, item) in items.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(item.ino), index as u64 + 1, item.kind, &item.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let Some(items) = self.dirs.lock().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        match self.populated_dir(ino) {
            Ok(dir) => self.list_plus(&dir, &items, offset, reply),
            Err(err) => reply.error(err),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let result = self.fd(ino).and_then(|fd| {
            self.namespace.flush_durably().map_err(tree_errno)?;
            let dir = rustix::fs::open(
                proc_path(&*fd),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno)?;
            rustix::fs::fsync(&dir).map_err(errno)
        });
        reply_empty(reply, result);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match rustix::fs::statvfs(self.namespace.target_root()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(err) => reply.error(errno(err)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let result = self.fd(ino).and_then(|fd| {
            let flags = rustix::fs::XattrFlags::from_bits_retain(flags as u32);
            rustix::fs::setxattr(proc_path(&*fd), name, value, flags).map_err(errno)
        });
        reply_empty(reply, result);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let result = self.do_xattr(ino, size, |path, buf| rustix::fs::getxattr(path, name, buf));
        reply_xattr(reply, size, result);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let result = self.do_xattr(ino, size, |path, buf| rustix::fs::listxattr(path, buf));
        reply_xattr(reply, size, result);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self
            .fd(ino)
            .and_then(|fd| rustix::fs::removexattr(proc_path(&*fd), name).map_err(errno));
        reply_empty(reply, result);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // `default_permissions`: the kernel checks access itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let register = |fd: &OwnedFd| reply.open_backing(fd);
        match self.do_create(req, (parent, name), (mode, umask), flags, register) {
            Ok((shown, handle, Serving::Passthrough { backing, .. })) => reply.created_passthrough(
                &shown.ttl,
                &shown.attr,
                Generation(0),
                FileHandle(handle),
                PASSTHROUGH_OPEN_FLAGS,
                &backing,
            ),
            Ok((shown, handle, Serving::Served { keep_cache })) => reply.created(
                &shown.ttl,
                &shown.attr,
                Generation(0),
                FileHandle(handle),
                served_open_flags(keep_cache),
            ),
            Err(err) => reply.error(err),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let result = self
            .files
            .get(fh)
            .and_then(|f| f.allocate(&self.namespace, (offset, length), mode));
        reply_empty(reply, result);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let copied = self.files.get(fh_in).and_then(|input| {
            let output = self.files.get(fh_out)?;
            input.copy_to(&self.namespace, offset_in, (&output, offset_out), len)
        });
        match copied {
            Ok(copied) => reply.written(copied),
            Err(err) => reply.error(err),
        }
    }
}
