//! Creating objects as the process that asked for them.
//!
//! The kernel checks every request's permissions on the access point itself
//! (`default_permissions`, from the attributes dmm reports, ACLs included),
//! and dmm then acts on the target as root. What the kernel cannot settle
//! for dmm is what a *new* object looks like: its owner and group (the
//! caller's, or a set-group-ID directory's), its mode (the caller's umask,
//! or the directory's default ACL instead of it), whether a caller outside
//! the group may keep the set-group-ID bit. A `chown` after the fact gets
//! these wrong (it clears set-user-ID, ignores default ACLs, races with
//! the caller). So new objects are made with the FUSE thread's file-system
//! identity switched to the caller's, as the target file system's own
//! callers make them: fsuid, fsgid and supplementary groups (all per thread
//! on Linux) and the umask (per thread once the FUSE thread has its own
//! `fs_struct`, see [`own_fs_struct`]). The daemon's identity is back before
//! the request returns.

use std::cell::Cell;
use std::sync::OnceLock;

use fuser::{Errno, Request};
use rustix::fs::Mode;
use rustix::process::Gid;

use super::reply::{Reply, errno};

/// The identity of the process a request came from.
#[derive(Debug, Clone, Copy)]
pub(super) struct Caller {
    uid: u32,
    gid: u32,
    /// Its thread ID (0 for requests the kernel makes on its own).
    pid: u32,
}

impl Caller {
    pub(super) fn of(req: &Request) -> Caller {
        Caller {
            uid: req.uid(),
            gid: req.gid(),
            pid: req.pid(),
        }
    }

    /// Runs `create` (which makes one new object) as the caller, with the
    /// request's `umask` (`None` for objects it does not apply to).
    pub(super) fn create<T>(
        &self,
        umask: Option<u32>,
        create: impl FnOnce() -> rustix::io::Result<T>,
    ) -> Reply<T> {
        let _acting = Acting::start(self, umask)?;
        create().map_err(errno)
    }
}

/// The daemon's own identity, restored after each switch.
struct Daemon {
    root: bool,
    groups: Vec<Gid>,
}

fn daemon() -> &'static Daemon {
    static DAEMON: OnceLock<Daemon> = OnceLock::new();
    DAEMON.get_or_init(|| Daemon {
        root: rustix::process::geteuid().is_root(),
        groups: rustix::process::getgroups().unwrap_or_default(),
    })
}

/// A FUSE thread acting as a caller; the daemon's identity and umask come
/// back when it drops.
struct Acting {
    switched: bool,
    umask: Option<Mode>,
}

impl Acting {
    fn start(caller: &Caller, umask: Option<u32>) -> Reply<Acting> {
        own_fs_struct()?;
        let mut acting = Acting {
            switched: false,
            umask: None,
        };
        if let Some(umask) = umask {
            acting.umask = Some(rustix::process::umask(Mode::from_raw_mode(umask & 0o777)));
        }
        if daemon().root && (caller.uid != 0 || caller.gid != 0) {
            acting.switched = true;
            let groups = supplementary_groups(caller.pid).unwrap_or_else(|| vec![caller.gid]);
            let groups: Vec<Gid> = groups.into_iter().map(Gid::from_raw).collect();
            rustix::thread::set_thread_groups(&groups).map_err(errno)?;
            set_fs_gid(caller.gid)?;
            set_fs_uid(caller.uid)?;
        }
        Ok(acting)
    }
}

impl Drop for Acting {
    fn drop(&mut self) {
        if self.switched {
            let restored = set_fs_uid(0)
                .and_then(|()| set_fs_gid(0))
                .and_then(|()| rustix::thread::set_thread_groups(&daemon().groups).map_err(errno));
            if let Err(err) = restored {
                // A FUSE thread left with a client's identity would act for
                // the wrong user from now on.
                tracing::error!("cannot take back the daemon's identity: {err:?}; aborting");
                std::process::abort();
            }
        }
        if let Some(umask) = self.umask {
            rustix::process::umask(umask);
        }
    }
}

/// Gives the calling thread its own umask (and working directory), so
/// that setting the umask for one request does not change it for the
/// daemon's other threads. Done once per thread.
fn own_fs_struct() -> Reply<()> {
    thread_local! {
        static OWN: Cell<bool> = const { Cell::new(false) };
    }
    if OWN.get() {
        return Ok(());
    }
    // SAFETY: unsharing the `fs_struct` (working directory, root, umask),
    // not the descriptor table: every descriptor stays valid in every
    // thread. The access point's threads use descriptors and absolute
    // paths only, so a thread-private working directory changes nothing.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) }.map_err(errno)?;
    OWN.set(true);
    Ok(())
}

/// The supplementary groups of thread `pid`, from `/proc`.
fn supplementary_groups(pid: u32) -> Option<Vec<u32>> {
    if pid == 0 {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    line.split_whitespace().map(|g| g.parse().ok()).collect()
}

fn set_fs_uid(uid: u32) -> Reply<()> {
    set_fs_id(libc::setfsuid, uid)
}

fn set_fs_gid(gid: u32) -> Reply<()> {
    set_fs_id(libc::setfsgid, gid)
}

/// `setfsuid` and `setfsgid` report no error: they return the previous
/// value. Asking again with an invalid ID returns the current one, which
/// must be `id`.
fn set_fs_id(set: unsafe extern "C" fn(u32) -> libc::c_int, id: u32) -> Reply<()> {
    // SAFETY: plain system calls on the calling thread's credentials.
    let now = unsafe {
        set(id);
        set(u32::MAX)
    };
    if now as u32 == id {
        Ok(())
    } else {
        Err(Errno::EPERM)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_groups_of_this_thread_are_read_from_proc() {
        let tid = rustix::thread::gettid().as_raw_nonzero().get() as u32;
        let groups = supplementary_groups(tid).expect("readable");
        let own: Vec<u32> = rustix::process::getgroups()
            .unwrap()
            .into_iter()
            .map(Gid::as_raw)
            .collect();
        assert_eq!(groups, own);
        assert_eq!(supplementary_groups(0), None);
    }
}
