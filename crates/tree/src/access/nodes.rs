//! The inodes the kernel knows through the access point, and how to reach
//! each of them in the target.
//!
//! A passthrough must find an inode again when the kernel asks about it,
//! even after renames. Holding an `O_PATH` descriptor for every inode the
//! kernel remembers would do, but a client walking a large tree makes the
//! kernel remember hundreds of thousands of them, far beyond any open-file
//! limit. So each node records where it was last seen (its parent's inode
//! and its name there, kept current through renames), and only the most
//! recently used descriptors stay open; any other is reopened from its
//! nearest open ancestor and checked to be the same inode.
//!
//! A node whose last known name goes away while the kernel still knows it
//! (an unlinked file a client holds open, a name replaced by a rename) is
//! pinned: its descriptor stays open until the kernel forgets it, as the
//! root's does.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use fuser::Errno;
use lru::LruCache;
use rustix::fs::{AtFlags, Mode, OFlags, Stat};

use super::reply::{Reply, errno};
use crate::lock::{Mutex, Rank, RwLock, RwLockGuard};

/// Deeper paths than this are taken for a corrupt parent chain.
const MAX_DEPTH: usize = 4096;

/// One inode the kernel knows.
struct Node {
    /// Target inode of the directory it was last seen in.
    parent: u64,
    /// Its name there.
    name: OsString,
    /// Lookups the kernel has not yet forgotten.
    lookups: u64,
    /// A descriptor kept for the node's whole life, when it cannot be
    /// reached by name (the root, or a node whose name went away).
    pinned: Option<Arc<OwnedFd>>,
}

/// The known inodes, keyed by target inode number.
pub(super) struct Nodes {
    nodes: Mutex<HashMap<u64, Node>>,
    /// The most recently used descriptors of unpinned nodes.
    open: Mutex<LruCache<u64, Arc<OwnedFd>>>,
    /// Held for writing by a rename from before it acts until the moved
    /// node's record says where it went, and for reading while names are
    /// reopened, which so never follow a record a rename made stale.
    renames: RwLock<()>,
}

impl Nodes {
    /// Starts with the root, pinned, and room for `capacity` other open
    /// descriptors.
    pub(super) fn new(root_ino: u64, root: OwnedFd, capacity: NonZeroUsize) -> Nodes {
        let root = Node {
            parent: root_ino,
            name: OsString::new(),
            lookups: 1,
            pinned: Some(Arc::new(root)),
        };
        Nodes {
            nodes: Mutex::new(Rank::Nodes, HashMap::from([(root_ino, root)])),
            open: Mutex::new(Rank::Descriptors, LruCache::new(capacity)),
            renames: RwLock::new(Rank::Renames, ()),
        }
    }

    /// An `O_PATH` descriptor of inode `ino`, reopened by its last known
    /// name if it is not open: walks up to the nearest open ancestor, then
    /// opens the names down from it. ESTALE if the kernel asks about an
    /// inode it forgot, or one that is not where it was last seen.
    pub(super) fn fd(&self, ino: u64) -> Reply<Arc<OwnedFd>> {
        if let Some(fd) = self.open_fd(ino) {
            return Ok(fd);
        }
        let _no_rename = self.renames.read();
        let mut down = Vec::new();
        let mut at = ino;
        let mut fd = loop {
            if let Some(fd) = self.open_fd(at) {
                break fd;
            }
            let nodes = self.nodes.lock();
            let node = nodes.get(&at).ok_or(Errno::ESTALE)?;
            down.push((at, node.name.clone()));
            at = node.parent;
            if down.len() > MAX_DEPTH {
                return Err(Errno::ESTALE);
            }
        };
        for (ino, name) in down.into_iter().rev() {
            fd = open_checked(&fd, &name, ino)?;
            self.open.lock().put(ino, fd.clone());
        }
        Ok(fd)
    }

    /// Looks up `name` in directory `parent` (whose descriptor is
    /// `parent_fd`) and records what it found: the kernel holds one more
    /// lookup of it. It is opened now, as the kernel asks about what it
    /// looks up right away.
    pub(super) fn look_up(&self, parent: u64, parent_fd: &OwnedFd, name: &OsStr) -> Reply<Stat> {
        let _no_rename = self.renames.read();
        let st = rustix::fs::statat(parent_fd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
        let fd = open_checked(parent_fd, name, st.st_ino)?;
        {
            let mut nodes = self.nodes.lock();
            let node = nodes.entry(st.st_ino).or_insert_with(|| Node {
                parent,
                name: OsString::new(),
                lookups: 0,
                pinned: None,
            });
            node.lookups += 1;
            if node.pinned.is_none() {
                node.parent = parent;
                node.name = name.to_owned();
            }
        }
        self.open.lock().put(st.st_ino, fd);
        Ok(st)
    }

    /// The kernel forgot `count` lookups of `ino`; true when it forgot the
    /// inode itself.
    pub(super) fn forget(&self, ino: u64, count: u64) -> bool {
        let mut nodes = self.nodes.lock();
        let Some(node) = nodes.get_mut(&ino) else {
            return false;
        };
        node.lookups = node.lookups.saturating_sub(count);
        let forgotten = node.lookups == 0 && node.parent != ino;
        if forgotten {
            nodes.remove(&ino);
            self.open.lock().pop(&ino);
        }
        forgotten
    }

    /// `ino`'s name `name` in `parent` is about to go away (unlink, or a
    /// rename over it): if that is the name the node is known by, keep its
    /// descriptor from now on.
    pub(super) fn losing_name(&self, ino: u64, parent: u64, name: &OsStr) -> Reply<()> {
        let known_by_it = matches!(
            self.nodes.lock().get(&ino),
            Some(node) if node.pinned.is_none() && node.parent == parent && node.name == name
        );
        if !known_by_it {
            return Ok(());
        }
        let fd = self.fd(ino)?;
        if let Some(node) = self.nodes.lock().get_mut(&ino) {
            node.pinned = Some(fd);
        }
        self.open.lock().pop(&ino);
        Ok(())
    }

    /// Holds back reopening by name while a rename acts; call after
    /// `losing_name`, and `moved` before the guard drops.
    pub(super) fn renaming(&self) -> RwLockGuard<parking_lot::RwLockWriteGuard<'_, ()>> {
        self.renames.write()
    }

    /// A rename moved `ino` to `name` in `parent`.
    pub(super) fn moved(&self, ino: u64, parent: u64, name: &OsStr) {
        if let Some(node) = self.nodes.lock().get_mut(&ino)
            && node.pinned.is_none()
        {
            node.parent = parent;
            node.name = name.to_owned();
        }
    }

    /// The descriptor of `ino` if it is pinned or open.
    fn open_fd(&self, ino: u64) -> Option<Arc<OwnedFd>> {
        if let Some(fd) = self.open.lock().get(&ino) {
            return Some(fd.clone());
        }
        self.nodes.lock().get(&ino)?.pinned.clone()
    }
}

/// Opens `name` in `dir` as an `O_PATH` descriptor, if it is inode `ino`.
/// A name that is gone or leads elsewhere makes ESTALE; other errors (such
/// as EMFILE) are the client's to see.
fn open_checked(dir: &OwnedFd, name: &OsStr, ino: u64) -> Reply<Arc<OwnedFd>> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, name, flags, Mode::empty()).map_err(|err| match err {
        rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR => Errno::ESTALE,
        err => errno(err),
    })?;
    let st = rustix::fs::fstat(&fd).map_err(errno)?;
    if st.st_ino != ino {
        return Err(Errno::ESTALE);
    }
    Ok(Arc::new(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    fn dir_fd(path: &Path) -> OwnedFd {
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        rustix::fs::open(path, flags, Mode::empty()).unwrap()
    }

    fn ino(path: &Path) -> u64 {
        fs::symlink_metadata(path).unwrap().ino()
    }

    /// Root, `a`, `a/b`, `a/b/file`, looked up in order, with room for one
    /// open descriptor.
    fn walked() -> (tempfile::TempDir, Nodes, [u64; 4]) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/file"), b"data").unwrap();
        let root_ino = ino(root);
        let nodes = Nodes::new(root_ino, dir_fd(root), NonZeroUsize::MIN);
        let mut parent = (root_ino, nodes.fd(root_ino).unwrap());
        for name in ["a", "b", "file"] {
            let st = nodes
                .look_up(parent.0, &parent.1, OsStr::new(name))
                .unwrap();
            parent = (st.st_ino, nodes.fd(st.st_ino).unwrap());
        }
        let inos = [
            root_ino,
            ino(&root.join("a")),
            ino(&root.join("a/b")),
            ino(&root.join("a/b/file")),
        ];
        (dir, nodes, inos)
    }

    fn fd_ino(fd: &OwnedFd) -> u64 {
        rustix::fs::fstat(fd).unwrap().st_ino
    }

    #[test]
    fn evicted_descriptors_are_reopened_after_a_rename_of_an_ancestor() {
        let (dir, nodes, [root, a, _, file]) = walked();
        fs::rename(dir.path().join("a"), dir.path().join("z")).unwrap();
        nodes.moved(a, root, OsStr::new("z"));
        nodes.open.lock().clear();
        assert_eq!(fd_ino(&nodes.fd(file).unwrap()), file);
    }

    #[test]
    fn a_stale_record_gives_estale_never_another_inode() {
        let (dir, nodes, [_, _, _, file]) = walked();
        let path = dir.path().join("a/b/file");
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"another file").unwrap();
        nodes.open.lock().clear();
        assert_eq!(nodes.fd(file).unwrap_err(), Errno::ESTALE);
    }

    #[test]
    fn a_node_that_loses_its_name_keeps_its_descriptor() {
        let (dir, nodes, [_, _, b, file]) = walked();
        nodes.losing_name(file, b, OsStr::new("file")).unwrap();
        fs::remove_file(dir.path().join("a/b/file")).unwrap();
        nodes.open.lock().clear();
        assert_eq!(fd_ino(&nodes.fd(file).unwrap()), file);
    }

    #[test]
    fn forgotten_nodes_are_gone_and_the_root_stays() {
        let (_dir, nodes, [root, _, _, file]) = walked();
        assert!(nodes.forget(file, 1));
        assert_eq!(nodes.fd(file).unwrap_err(), Errno::ESTALE);
        assert!(!nodes.forget(root, 1));
        assert_eq!(fd_ino(&nodes.fd(root).unwrap()), root);
    }
}
