//! Test scaffolding shared by the layer and snapshotter-persistence tests: one local-directory
//! store seen by several simulated nodes, each with its own state DB and staging dir.

use std::sync::Arc;

use crate::config::LayerStorageConfig;
use crate::store::LocalStore;
use crate::store::ObjectStore;

/// A store dir shared by "nodes"; test modules add their own node constructors.
pub(crate) struct SharedStore {
    pub dir: tempfile::TempDir,
    pub store: Arc<dyn ObjectStore>,
}

impl SharedStore {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(LocalStore::new(&dir.path().join("store"), "layers/").unwrap());
        Self { dir, store }
    }

    /// The storage config of node `node` over the shared store.
    pub fn config(&self, node: &str) -> LayerStorageConfig {
        LayerStorageConfig {
            local_store_dir: self.dir.path().join("store"),
            staging_dir: self.dir.path().join(node).join("staging"),
            state_db_path: self.dir.path().join(node).join("state.sqlite"),
            ..LayerStorageConfig::default()
        }
    }
}
