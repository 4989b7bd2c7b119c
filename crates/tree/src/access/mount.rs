//! Mounting and unmounting the access point, and the checks before it.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use fuser::{Config, MountOption, SessionACL, SessionUnmounter};
use rustix::io::Errno;
use rustix::mount::UnmountFlags;

use super::fs::TreeFs;
use super::iomode::IoModes;
use crate::error::{Error, ErrorKind, Result, on};
use crate::namespace::Namespace;
use crate::threads::join_within;

/// Who may use the access point besides the daemon's own user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessUsers {
    /// The daemon's user only (the kernel's default for a FUSE mount).
    Owner,
    /// Every user, each granted what the target's owners, groups and
    /// modes grant (FUSE's `allow_other` with `default_permissions`): the
    /// setting for home directories that several users work in. A daemon
    /// not run as root cannot offer it.
    All,
}

impl std::str::FromStr for AccessUsers {
    type Err = dmm_control::ValueError;

    fn from_str(text: &str) -> std::result::Result<AccessUsers, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "owner" => Ok(AccessUsers::Owner),
            "all" => Ok(AccessUsers::All),
            _ => Err(dmm_control::ValueError::new(
                "who may use the access point",
                text,
                "choose owner (the daemon's user) or all (every user, as the target's modes grant)",
            )),
        }
    }
}

/// FUSE threads serving requests.
const THREADS: usize = 8;

/// How long unmounting waits for the requests in flight to finish.
const STOP_WITHIN: Duration = Duration::from_secs(10);

/// A mounted access point; unmounted by [`AccessPoint::detach`] then
/// [`AccessPoint::join`], or on drop.
pub struct AccessPoint {
    /// The thread running the FUSE session (it starts the others).
    session: Option<JoinHandle<io::Result<()>>>,
    unmounter: SessionUnmounter,
    path: PathBuf,
    modes: Arc<IoModes>,
}

impl AccessPoint {
    /// Mounts the namespace's target tree at `path`, for `users`.
    pub fn mount(
        namespace: Arc<Namespace>,
        path: &Path,
        users: AccessUsers,
    ) -> Result<AccessPoint> {
        let modes = Arc::new(IoModes::new());
        let filesystem = TreeFs::new(namespace, modes.clone())?;
        let mut access = AccessPoint::serve(filesystem, path, users)?;
        access.modes = modes;
        Ok(access)
    }

    /// Mounts `filesystem` at `path`, for `users`, served by several FUSE
    /// threads: the mount of any access point of dmm (a tree's, a stream
    /// store's).
    pub fn serve(
        filesystem: impl fuser::Filesystem,
        path: &Path,
        users: AccessUsers,
    ) -> Result<AccessPoint> {
        raise_open_file_limit();
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("dmm".into()),
            MountOption::Subtype("dmm".into()),
            MountOption::DefaultPermissions,
            MountOption::Dev,
            MountOption::Suid,
        ];
        config.acl = match users {
            AccessUsers::Owner => SessionACL::Owner,
            AccessUsers::All if rustix::process::geteuid().is_root() => SessionACL::All,
            AccessUsers::All => {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    "access-users=all needs a daemon run as root (FUSE's allow_other)",
                ));
            }
        };
        config.n_threads = Some(THREADS);
        config.clone_fd = true;
        let mounting = || on(ErrorKind::Access, "mount the access point at", path);
        let mut session = fuser::Session::new(filesystem, path, &config).map_err(mounting())?;
        let unmounter = session.unmount_callable();
        let thread = std::thread::Builder::new()
            .name("dmm-fuse".into())
            .spawn(move || session.run())
            .map_err(mounting())?;
        Ok(AccessPoint {
            session: Some(thread),
            unmounter,
            path: path.to_path_buf(),
            modes: Arc::new(IoModes::new()),
        })
    }

    /// Opens the kernel passed through to the target so far (reads and
    /// writes dmm never saw).
    pub fn passthrough_opens(&self) -> u64 {
        self.modes.passed_through()
    }

    /// Unmounts: no new request can arrive. Clients that still hold files
    /// open or work in the access point keep it busy: then the connection
    /// is aborted (their requests fail with ENOTCONN, as when dmm dies) and
    /// the mount detached, so that stopping never waits for a client.
    pub fn detach(&mut self) -> Result<()> {
        let unmounted = match self.unmounter.unmount() {
            // Unmounted already (`unmount_unless_busy`).
            Err(err) if err.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => Ok(()),
            Err(err) if err.raw_os_error() == Some(Errno::BUSY.raw_os_error()) => {
                tracing::warn!(
                    "the access point {} is busy: aborting its clients' requests and detaching it",
                    self.path.display()
                );
                force_unmount(&self.path)
            }
            other => other,
        };
        unmounted.map_err(on(
            ErrorKind::Access,
            "unmount the access point",
            &self.path,
        ))
    }

    /// Unmounts, unless clients still use the access point (files open,
    /// working directories there): then it stays as it is, and the error
    /// says so.
    pub fn unmount_unless_busy(&mut self) -> Result<()> {
        match rustix::mount::unmount(&self.path, UnmountFlags::empty()) {
            Err(Errno::BUSY) => {
                Err(
                    Error::on(ErrorKind::Invalid, "unmount the access point", &self.path)
                        .with_detail(
                            "in use, files open or working directories there: \
                 stop the applications using it, then try again",
                        ),
                )
            }
            // Not root: `detach` unmounts through fusermount.
            Ok(()) | Err(_) => self.detach(),
        }
    }

    /// Waits (bounded) for the FUSE threads to finish the requests in
    /// flight, after [`AccessPoint::detach`].
    pub fn join(&mut self) -> Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        if join_within(vec![session], STOP_WITHIN) > 0 {
            return Err(
                Error::on(ErrorKind::Access, "stop the access point", &self.path).with_detail(
                    format!(
                        "requests still in flight {} s after it was unmounted",
                        STOP_WITHIN.as_secs()
                    ),
                ),
            );
        }
        Ok(())
    }
}

impl Drop for AccessPoint {
    fn drop(&mut self) {
        if self.session.is_some()
            && let Err(err) = self.detach().and_then(|()| self.join())
        {
            tracing::warn!("{}", err.report());
        }
    }
}

/// Aborts the FUSE connection at `path` (a forced unmount does, and fails
/// while the mount is busy) and detaches the mount.
fn force_unmount(path: &Path) -> io::Result<()> {
    match rustix::mount::unmount(path, UnmountFlags::FORCE) {
        Ok(()) => return Ok(()),
        Err(Errno::BUSY) => {}
        Err(err) => return Err(err.into()),
    }
    rustix::mount::unmount(path, UnmountFlags::DETACH).map_err(Into::into)
}

/// Clients may hold many files open through the access point, each one
/// open in dmm too, and a quarter of the limit goes to descriptors of known
/// inodes (`nodes`): raise the soft open-file limit to the hard one.
fn raise_open_file_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let current = getrlimit(Resource::Nofile);
    let raised = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: current.maximum,
            maximum: current.maximum,
        },
    );
    let now = getrlimit(Resource::Nofile).current;
    match raised {
        Ok(()) => tracing::debug!(?now, "open file limit raised for the access point"),
        Err(err) => tracing::warn!(?now, "cannot raise the open file limit: {err}"),
    }
}

/// Detaches a dead FUSE mount left at `path` by a dmm that was killed.
///
/// `statfs` always asks the file system's server, so it fails with
/// ENOTCONN on a dead mount even while the kernel still answers `stat`
/// from cached attributes; a live mount (another process's) is left alone.
pub fn clear_stale_mount(path: &Path) -> Result<()> {
    let dead = |e: rustix::io::Errno| e == rustix::io::Errno::NOTCONN;
    let stale = rustix::fs::statfs(path).err().is_some_and(dead);
    if !stale {
        return Ok(());
    }
    rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH)
        .map_err(|e| on(ErrorKind::Access, "detach the stale mount at", path)(e.into()))
}

/// The access point must be an empty directory that nothing is mounted on.
pub fn check_mountpoint(path: &Path) -> Result<()> {
    let invalid = |why: &'static str| {
        Error::on(ErrorKind::Invalid, "use the access point", path).with_detail(why)
    };
    let meta = fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => invalid("no such directory"),
        _ => on(ErrorKind::Invalid, "use the access point", path)(e),
    })?;
    if !meta.is_dir() {
        return Err(invalid("not a directory"));
    }
    if let Some(parent) = path
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        && fs::metadata(&parent).is_ok_and(|p| p.dev() != meta.dev())
    {
        return Err(invalid("something is already mounted there"));
    }
    let mut entries =
        fs::read_dir(path).map_err(on(ErrorKind::Invalid, "list the access point", path))?;
    if entries.next().is_some() {
        return Err(invalid("not empty"));
    }
    Ok(())
}
