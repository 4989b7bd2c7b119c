//! The exports a server offers, by name.
//!
//! The table can change while the server runs (the daemon adds an export per
//! migration); a connection keeps the export it negotiated even if the name
//! is later removed. A name the table does not hold may still be served
//! through its [`Route`] (a daemon in a cluster forwards a volume another
//! node owns).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use dmm_store::BlockStore;
use parking_lot::RwLock;

/// One export: a store under a name.
pub struct Export {
    pub name: String,
    pub description: String,
    pub store: Arc<dyn BlockStore>,
    read_only: bool,
    /// When set, only TLS clients whose certificate is valid for one of
    /// these names see and use it (a daemon's export for one peer).
    peers: Option<Vec<String>>,
}

impl Export {
    pub fn new(name: impl Into<String>, store: Arc<dyn BlockStore>) -> Export {
        Export {
            name: name.into(),
            description: String::new(),
            store,
            read_only: false,
            peers: None,
        }
    }

    /// Offers the export only to TLS clients with a certificate valid for
    /// one of `names`; to any other it does not exist.
    pub fn only_for(mut self, names: Vec<String>) -> Export {
        self.peers = Some(names);
        self
    }

    /// Whether a client with a certificate for `client` (none in clear)
    /// may see and use it.
    pub fn admits(&self, client: &[String]) -> bool {
        self.peers
            .as_ref()
            .is_none_or(|peers| client.iter().any(|name| peers.contains(name)))
    }

    pub fn with_description(mut self, description: impl Into<String>) -> Export {
        self.description = description.into();
        self
    }

    /// Refuses writes even if the store would take them.
    pub fn read_only(mut self) -> Export {
        self.read_only = true;
        self
    }

    /// Whether clients may change the export.
    pub fn is_read_only(&self) -> bool {
        self.read_only || self.store.capabilities().read_only
    }
}

/// The name is already taken.
#[derive(Debug, thiserror::Error)]
#[error("an export named {0:?} already exists")]
pub struct ExportExists(pub String);

#[derive(Default)]
struct Table {
    by_name: BTreeMap<String, Arc<Export>>,
    default: Option<String>,
}

/// Exports made on demand for names the table does not hold.
#[async_trait]
pub trait Route: Send + Sync {
    /// An export for `name`, asked for by a client whose TLS certificate
    /// is valid for `client` (none in clear); `None`: no such export.
    async fn route(&self, name: &str, client: &[String]) -> Option<Arc<Export>>;
}

/// Exports by name, plus the one a client gets when it asks for the empty
/// name, and the route of names it does not hold.
#[derive(Default)]
pub struct ExportTable {
    table: RwLock<Table>,
    route: RwLock<Option<Arc<dyn Route>>>,
}

impl ExportTable {
    pub fn new() -> ExportTable {
        ExportTable::default()
    }

    /// Adds an export. The first export added becomes the default one.
    pub fn insert(&self, export: Export) -> Result<Arc<Export>, ExportExists> {
        let mut table = self.table.write();
        if table.by_name.contains_key(&export.name) {
            return Err(ExportExists(export.name));
        }
        let export = Arc::new(export);
        if table.default.is_none() {
            table.default = Some(export.name.clone());
        }
        table.by_name.insert(export.name.clone(), export.clone());
        Ok(export)
    }

    /// Removes an export; connections already using it keep it.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let mut table = self.table.write();
        if table.default.as_deref() == Some(name) {
            table.default = None;
        }
        table.by_name.remove(name)
    }

    /// The export called `name`; the empty name finds the default export.
    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        let table = self.table.read();
        let name = match name {
            "" => table.default.as_deref().unwrap_or(""),
            other => other,
        };
        table.by_name.get(name).cloned()
    }

    /// Serves the names the table does not hold through `route`.
    pub fn set_route(&self, route: Arc<dyn Route>) {
        *self.route.write() = Some(route);
    }

    /// The export called `name` for a client with a certificate for
    /// `client`: the table's if it holds one the client may use, else the
    /// route's.
    pub async fn find_for(&self, name: &str, client: &[String]) -> Option<Arc<Export>> {
        if let Some(export) = self.find(name).filter(|export| export.admits(client)) {
            return Some(export);
        }
        let route = self.route.read().clone();
        match (name, route) {
            ("", _) | (_, None) => None,
            (name, Some(route)) => route.route(name, client).await,
        }
    }

    /// Every export, in name order.
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.table.read().by_name.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmm_store::MemoryStore;

    fn store() -> Arc<dyn BlockStore> {
        Arc::new(MemoryStore::new(4096))
    }

    #[test]
    fn empty_name_finds_the_first_export() {
        let table = ExportTable::new();
        table.insert(Export::new("disk", store())).unwrap();
        table.insert(Export::new("other", store())).unwrap();
        assert_eq!(table.find("").unwrap().name, "disk");
        assert_eq!(table.find("other").unwrap().name, "other");
        assert!(table.find("missing").is_none());
        assert!(table.insert(Export::new("disk", store())).is_err());
        table.remove("disk");
        assert!(table.find("").is_none());
    }

    #[test]
    fn an_export_for_one_peer_admits_only_its_certificate() {
        let export = Export::new("receive", store()).only_for(vec!["node-a".into()]);
        assert!(export.admits(&["node-a".into(), "10.0.0.1".into()]));
        assert!(!export.admits(&["node-c".into()]));
        assert!(!export.admits(&[]), "not in clear");
        assert!(Export::new("open", store()).admits(&[]));
    }
}
