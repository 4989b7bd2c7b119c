//! Opening a store from what the user typed: a path (raw image file or
//! block device) or an NBD URI.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use dmm_nbd::{NbdAddress, NbdStore};
use dmm_store::{BlockStore, ErrorKind, FileStore, OpenOptions};

/// An opened store and the canonical name that identifies it.
pub struct Opened {
    pub store: Arc<dyn BlockStore>,
    pub name: String,
}

/// Opens `spec`; a local file that cannot be opened for writing is opened
/// read-only when `fallback_read_only` allows it.
pub async fn open(spec: &str, read_only: bool, fallback_read_only: bool) -> Result<Opened> {
    if NbdAddress::is_uri(spec) {
        let address = NbdAddress::parse(spec)?;
        let store = NbdStore::connect(&address)
            .await
            .with_context(|| format!("cannot connect to {spec}"))?;
        return Ok(Opened {
            store: Arc::new(store),
            name: address.to_string(),
        });
    }
    let path = Path::new(spec);
    let name = std::fs::canonicalize(path)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| spec.to_owned());
    let store = match FileStore::open(path, OpenOptions { read_only }) {
        Err(err)
            if fallback_read_only
                && matches!(
                    err.kind(),
                    ErrorKind::PermissionDenied | ErrorKind::ReadOnly
                ) =>
        {
            FileStore::open(path, OpenOptions { read_only: true })
        }
        other => other,
    }?;
    Ok(Opened {
        store: Arc::new(store),
        name,
    })
}

/// dmm's state directory: `--state-dir`, else `$DMM_STATE_DIR`, else
/// `$XDG_STATE_HOME/dmm`, else `~/.local/state/dmm` (`/var/lib/dmm` for
/// root).
pub fn state_dir(explicit: Option<&Path>) -> std::path::PathBuf {
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
