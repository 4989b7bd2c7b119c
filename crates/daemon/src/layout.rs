//! Where things live in dmm's state directory. The daemon and the CLI both
//! find each other through it.

use std::path::{Path, PathBuf};

/// Paths inside one state directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
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

    /// Per-migration engine state: `volumes/<migid>/`.
    pub fn volumes(&self) -> PathBuf {
        self.root.join("volumes")
    }

    /// Per-migration tree state (the tree journal): `trees/<migid>/`.
    pub fn trees(&self) -> PathBuf {
        self.root.join("trees")
    }

    /// Held by the running daemon.
    pub fn lock(&self) -> PathBuf {
        self.root.join("daemon.lock")
    }
}
