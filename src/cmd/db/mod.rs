//! `zlayer-storage db …`: SQLite replication. One file per subcommand.

mod flush;
mod replicate;
mod restore;
mod status;

use std::path::{Path, PathBuf};

use zlayer_storage::Config;
use zlayer_storage::replicator::{ReplicatorOptions, SqliteReplicator, SqliteReplicatorConfig};

use crate::cli::DbCommand;

pub async fn run(config: &Config, command: DbCommand) -> anyhow::Result<u8> {
    match command {
        DbCommand::Replicate(args) => replicate::run(config, args).await,
        DbCommand::Flush(args) => flush::run(config, args).await,
        DbCommand::Restore(args) => restore::run(config, args).await,
        DbCommand::Status(args) => status::run(config, args).await,
    }
}

/// The databases to work on: each `--db` (named as the config names that path, else by its
/// stem), or without any, the config's list.
fn databases(config: &Config, paths: &[PathBuf]) -> Vec<(PathBuf, Option<String>)> {
    let listed = &config.replicate.databases;
    if paths.is_empty() {
        return listed
            .iter()
            .map(|d| (d.path.clone(), d.name.clone()))
            .collect();
    }
    paths
        .iter()
        .map(|p| {
            let name = listed
                .iter()
                .find(|d| same_file(&d.path, p))
                .and_then(|d| d.name.clone());
            (p.clone(), name)
        })
        .collect()
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// A replicator of `path` with the config's settings (`auto_restore` as given).
async fn open(
    config: &Config,
    path: &Path,
    name: Option<String>,
    auto_restore: bool,
) -> anyhow::Result<SqliteReplicator> {
    use anyhow::Context;
    let mut c = SqliteReplicatorConfig::from_section(path, &config.replicate, &config.storage);
    c.auto_restore = auto_restore;
    let options = ReplicatorOptions::from_section(&config.replicate, name);
    SqliteReplicator::with_options(c, &config.storage, options)
        .await
        .with_context(|| format!("cannot set up replication of {}", path.display()))
}
