//! Opening a store from what the user typed: a path (raw image file or
//! block device) or an NBD URI. It lives here, next to the NBD client
//! store, because it is the one place that knows both kinds of store.

use std::path::Path;
use std::sync::Arc;

use dmm_store::{BlockStore, ErrorKind, FileStore, OpenOptions, Result};

use crate::client::NbdStore;

/// An opened store and the canonical name that identifies it (the real
/// path of a file, the normalized URI of an export).
pub struct OpenedStore {
    pub store: Arc<dyn BlockStore>,
    pub name: String,
}

/// How to open a store.
#[derive(Debug, Clone, Copy, Default)]
pub struct Access {
    /// Open a local file read-only.
    pub read_only: bool,
    /// When a local file cannot be opened for writing, open it read-only
    /// instead (a source that is never written).
    pub fall_back_to_read_only: bool,
}

/// Opens `spec`: an NBD URI (`nbd://…`, `nbd+unix://…`) or a local path.
pub async fn open_store(spec: &str, access: Access) -> Result<OpenedStore> {
    if crate::NbdAddress::is_uri(spec) {
        let store = NbdStore::connect_uri(spec).await?;
        let name = crate::NbdAddress::parse(spec)
            .map(|address| address.to_string())
            .unwrap_or_else(|_| spec.to_owned());
        return Ok(OpenedStore {
            store: Arc::new(store),
            name,
        });
    }
    let path = Path::new(spec);
    let name = std::fs::canonicalize(path)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| spec.to_owned());
    let read_only = access.read_only;
    let store = match FileStore::open(path, OpenOptions { read_only }) {
        Err(err)
            if access.fall_back_to_read_only
                && matches!(
                    err.kind(),
                    ErrorKind::PermissionDenied | ErrorKind::ReadOnly
                ) =>
        {
            FileStore::open(path, OpenOptions { read_only: true })
        }
        other => other,
    }?;
    Ok(OpenedStore {
        store: Arc::new(store),
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn files_open_by_path_and_errors_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let opened = open_store(path.to_str().unwrap(), Access::default())
            .await
            .unwrap();
        assert_eq!(opened.store.size(), 8192);
        assert_eq!(
            opened.name,
            path.canonicalize().unwrap().display().to_string()
        );
        let missing = dir.path().join("missing.raw");
        let err = open_store(missing.to_str().unwrap(), Access::default())
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(err.to_string().contains("missing.raw"), "{err}");
        let err = open_store("nbd://", Access::default()).await.err().unwrap();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }
}
