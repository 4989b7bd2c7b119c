//! Where things live in dmm's state directory. The daemon and the CLI both
//! find each other through it.

use std::path::{Path, PathBuf};

use dmm_catalog::{Kind, MigrationId};

/// Paths inside one state directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    /// dmm's state directory: `--state-dir`, else `$DMM_STATE_DIR`, else
    /// `$XDG_STATE_HOME/dmm`, else `~/.local/state/dmm` (`/var/lib/dmm` for
    /// root).
    pub fn state_dir(explicit: Option<&Path>) -> PathBuf {
        if let Some(dir) = explicit {
            return dir.to_owned();
        }
        if let Some(dir) = std::env::var_os("DMM_STATE_DIR") {
            return dir.into();
        }
        if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
            return Path::new(&dir).join("dmm");
        }
        if rustix::process::geteuid().is_root() {
            return "/var/lib/dmm".into();
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
        Path::new(&home).join(".local/state/dmm")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The SQLite catalog.
    pub fn catalog(&self) -> PathBuf {
        self.root.join("catalog.db")
    }

    /// The HTTP API (Unix socket, owner only).
    pub fn api_socket(&self) -> PathBuf {
        self.root.join("api.sock")
    }

    /// The NBD listener that serves every volume by export name.
    pub fn nbd_socket(&self) -> PathBuf {
        self.root.join("nbd.sock")
    }

    /// Where a migration's engine keeps its state: `volumes/<migid>/`,
    /// `trees/<migid>/` (the tree journal), `streams/<migid>/` (the stream
    /// journal).
    pub fn engine_state(&self, kind: Kind, id: MigrationId) -> PathBuf {
        self.root.join(format!("{kind}s")).join(id.to_string())
    }

    /// Held by the running daemon.
    pub fn lock(&self) -> PathBuf {
        self.root.join("daemon.lock")
    }
}
