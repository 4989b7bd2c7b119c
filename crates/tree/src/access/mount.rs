//! Mounting and unmounting the access point, and the checks before it.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};

use super::fs::TreeFs;
use crate::error::{Error, ErrorKind, Result, on};
use crate::namespace::Namespace;

/// FUSE threads serving requests.
const THREADS: usize = 8;

/// A mounted access point; unmounted by [`AccessPoint::unmount`] or on drop.
pub struct AccessPoint {
    session: Option<BackgroundSession>,
    path: PathBuf,
}

impl AccessPoint {
    /// Mounts the namespace's target tree at `path`.
    pub fn mount(namespace: Arc<Namespace>, path: &Path) -> Result<AccessPoint> {
        raise_open_file_limit();
        let filesystem = TreeFs::new(namespace)?;
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("dmm".into()),
            MountOption::Subtype("dmm".into()),
            MountOption::DefaultPermissions,
            MountOption::Dev,
            MountOption::Suid,
        ];
        if rustix::process::geteuid().is_root() {
            config.acl = SessionACL::All;
        }
        config.n_threads = Some(THREADS);
        config.clone_fd = true;
        let session = fuser::Session::new(filesystem, path, &config)
            .and_then(fuser::Session::spawn)
            .map_err(on(ErrorKind::Access, "mount the access point at", path))?;
        Ok(AccessPoint {
            session: Some(session),
            path: path.to_path_buf(),
        })
    }

    /// Unmounts, waiting for the FUSE threads to end.
    pub fn unmount(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        session.umount_and_join().map_err(|err| {
            let context = format!(
                "cannot unmount the access point {} (are files still open there?)",
                self.path.display()
            );
            Error::io(ErrorKind::Access, context, err)
        })
    }
}

impl Drop for AccessPoint {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            tracing::warn!("{err}");
        }
    }
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
    let invalid = |why: &str| {
        Error::new(
            ErrorKind::Invalid,
            format!("the access point {}: {why}", path.display()),
        )
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
