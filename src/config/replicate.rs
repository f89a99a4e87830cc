//! The `[replicate]` section: SQLite databases the `db replicate` sidecar ships to the store
//! (under the `[storage]` section's store, at `{prefix}sqlite/{name}/`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Result, invalid};

/// Replication settings shared by every database, and the databases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicateConfig {
    /// Longest time a commit waits before its segment starts uploading; segments are cut after
    /// a fifth of it, so a single write is durable in well under a second.
    pub sync_interval_ms: u64,
    /// A fresh snapshot this often (while the database changes), so restores replay less.
    pub snapshot_interval_secs: u64,
    /// Segments and snapshots wait here until the store has them (survives restarts).
    pub cache_dir: PathBuf,
    /// Bytes the cache may hold; when full, reading the WAL and checkpointing stop (the WAL
    /// keeps the frames) until uploads catch up.
    pub max_cache_size: u64,
    /// Restore a database that is missing (with its `-wal` and `-shm`) before replicating it.
    pub auto_restore: bool,
    /// How far back point-in-time restores reach; older generations, snapshots and segments are
    /// deleted (0: keep everything).
    pub retention_secs: u64,
    /// `PRAGMA integrity_check` on every restore.
    pub integrity_check: bool,
    /// Unix socket of the running replicator (`db flush`, `db status`).
    pub control_socket: PathBuf,
    pub databases: Vec<DatabaseEntry>,
}

/// One replicated database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseEntry {
    pub path: PathBuf,
    /// Folder in the store; the file stem when unset.
    #[serde(default)]
    pub name: Option<String>,
}

impl DatabaseEntry {
    /// The entry's store name.
    pub fn store_name(&self) -> Result<String> {
        let name = match &self.name {
            Some(n) => n.clone(),
            None => default_name(&self.path)?,
        };
        validate_name(&name)?;
        Ok(name)
    }
}

/// The file stem of `path` (`/data/app.db` → `app`).
pub fn default_name(path: &Path) -> Result<String> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            invalid(
                "replicate.databases.path",
                path.display(),
                "has no file name to name it by; set name",
            )
        })
}

/// Names become one folder of the store: no separators, no dot names, printable ASCII.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "replicate.databases.name",
            name,
            "must be 1-128 of A-Z a-z 0-9 - _ . and not . or ..",
        ))
    }
}

impl ReplicateConfig {
    pub fn validate(&self) -> Result<()> {
        if self.sync_interval_ms < 50 {
            return Err(invalid(
                "sync_interval_ms",
                self.sync_interval_ms,
                "must be at least 50",
            ));
        }
        if self.snapshot_interval_secs == 0 {
            return Err(invalid("snapshot_interval_secs", 0, "must be at least 1"));
        }
        if self.max_cache_size < 1024 * 1024 {
            return Err(invalid(
                "max_cache_size",
                self.max_cache_size,
                "must be at least 1 MiB",
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for db in &self.databases {
            let name = db.store_name()?;
            if !names.insert(name.clone()) {
                return Err(invalid(
                    "replicate.databases.name",
                    name,
                    "is used by two databases; set distinct names",
                ));
            }
        }
        Ok(())
    }
}

impl Default for ReplicateConfig {
    fn default() -> Self {
        Self {
            sync_interval_ms: 1000,
            snapshot_interval_secs: 3600,
            cache_dir: PathBuf::from("/var/lib/zlayer/replicator-cache"),
            max_cache_size: 100 * 1024 * 1024,
            auto_restore: true,
            retention_secs: 24 * 3600,
            integrity_check: true,
            control_socket: PathBuf::from("/run/zlayer-storage/db.sock"),
            databases: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    #[test]
    fn databases_are_named_by_their_stem_unless_named_and_names_are_checked() {
        let cfg = Config::from_toml(
            "[replicate]\nsync_interval_ms = 500\n\
             [[replicate.databases]]\npath = \"/data/app.db\"\n\
             [[replicate.databases]]\npath = \"/var/lib/zlayer/layer-state.sqlite\"\nname = \"state\"\n",
            Path::new("/x.toml"),
        )
        .unwrap();
        cfg.replicate.validate().unwrap();
        let names: Vec<String> = cfg
            .replicate
            .databases
            .iter()
            .map(|d| d.store_name().unwrap())
            .collect();
        assert_eq!(names, ["app", "state"]);
        assert_eq!(cfg.replicate.sync_interval_ms, 500);
        assert_eq!(cfg.replicate.max_cache_size, 100 * 1024 * 1024);

        for bad in ["../x", "a/b", "..", ""] {
            let entry = DatabaseEntry {
                path: "/d/x.db".into(),
                name: Some(bad.into()),
            };
            let err = entry.store_name().unwrap_err();
            assert!(
                err.to_string().contains("replicate.databases.name"),
                "{err}"
            );
        }
        let twice = ReplicateConfig {
            databases: vec![
                DatabaseEntry {
                    path: "/a/app.db".into(),
                    name: None,
                },
                DatabaseEntry {
                    path: "/b/app.db".into(),
                    name: None,
                },
            ],
            ..ReplicateConfig::default()
        };
        assert!(
            twice
                .validate()
                .unwrap_err()
                .to_string()
                .contains("two databases")
        );
    }
}
