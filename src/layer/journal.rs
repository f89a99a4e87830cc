//! The layer's journal on the state database: [`SyncState`] per identity and the multipart
//! upload journal ([`UploadJournal`] for the object stores).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::types::{CompletedPart, ContainerLayerId, PendingUpload, SyncState};
use crate::state::{Database, Migration, StateError};
use crate::store::{StoreError, UploadJournal};

type Result<T> = std::result::Result<T, StateError>;

/// Schema of the layer state database. Append only.
pub static LAYER_MIGRATIONS: &[Migration] = &[Migration {
    name: "layer state v1: sync_state, pending_uploads, upload_parts",
    sql: "
        CREATE TABLE sync_state (
            identity TEXT PRIMARY KEY,
            service TEXT NOT NULL,
            instance_id TEXT NOT NULL,
            local_digest TEXT,
            remote_digest TEXT,
            last_sync TEXT,
            fingerprint TEXT,
            fingerprint_digest TEXT,
            seq INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE pending_uploads (
            object_key TEXT PRIMARY KEY,
            upload_id TEXT NOT NULL,
            total_parts INTEGER NOT NULL,
            part_size INTEGER NOT NULL,
            total_size INTEGER NOT NULL,
            local_path BLOB NOT NULL,
            started_at TEXT NOT NULL,
            digest TEXT NOT NULL,
            UNIQUE (object_key, upload_id)
        );
        CREATE INDEX pending_uploads_by_digest ON pending_uploads (digest);
        CREATE TABLE upload_parts (
            object_key TEXT NOT NULL,
            upload_id TEXT NOT NULL,
            part_number INTEGER NOT NULL,
            e_tag TEXT NOT NULL,
            crc32c TEXT NOT NULL,
            size INTEGER NOT NULL,
            PRIMARY KEY (object_key, upload_id, part_number),
            FOREIGN KEY (object_key, upload_id)
                REFERENCES pending_uploads (object_key, upload_id) ON DELETE CASCADE
        );
    ",
}];

/// Everything stored for one identity: the original [`SyncState`] plus the change-detection
/// fingerprint and the per-identity sequence counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRecord {
    pub state: SyncState,
    /// Cheap metadata fingerprint of the upper dir at the last sync.
    pub fingerprint: Option<String>,
    /// Layer digest that `fingerprint` produced.
    pub fingerprint_digest: Option<String>,
    /// Last sequence number handed out by [`StateDb::next_seq`] (0 = none yet).
    pub seq: u64,
}

/// The layer state database (`state_db_path`). Clones share one connection.
#[derive(Debug, Clone)]
pub struct StateDb {
    db: Database,
}

impl StateDb {
    /// Opens or creates the database and applies [`LAYER_MIGRATIONS`]; blocking.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            db: Database::open(path, LAYER_MIGRATIONS)?,
        })
    }

    /// [`StateDb::open`] on the blocking pool.
    pub async fn open_async(path: &Path) -> Result<Self> {
        Ok(Self {
            db: Database::open_async(path, LAYER_MIGRATIONS).await?,
        })
    }

    /// The underlying handle, for ad-hoc queries.
    #[must_use]
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Sync state plus fingerprint and sequence of `id`.
    pub async fn get_sync_record(&self, id: &ContainerLayerId) -> Result<Option<SyncRecord>> {
        let key = id.to_key();
        self.db
            .call("read sync state", move |c| {
                let rec = c
                    .query_row(
                        &format!("{SYNC_SELECT} WHERE identity = ?1"),
                        [&key],
                        sync_record_from_row,
                    )
                    .optional()?;
                rec.map(|r| attach_pending(c, r)).transpose()
            })
            .await
    }

    /// The original [`SyncState`] of `id`; `pending_upload` is the journaled upload of its
    /// `local_digest`, if one is in progress.
    pub async fn get_sync_state(&self, id: &ContainerLayerId) -> Result<Option<SyncState>> {
        Ok(self.get_sync_record(id).await?.map(|r| r.state))
    }

    /// Stores digests and `last_sync` of `state`; fingerprint and sequence are kept.
    ///
    /// `pending_upload` is not written: the upload journal owns it.
    pub async fn put_sync_state(&self, state: &SyncState) -> Result<()> {
        let id = state.container_id.clone();
        let local = state.local_digest.clone();
        let remote = state.remote_digest.clone();
        let last = state.last_sync.map(fmt_time);
        self.db
            .call("write sync state", move |c| {
                c.execute(
                    "INSERT INTO sync_state
                        (identity, service, instance_id, local_digest, remote_digest, last_sync)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (identity) DO UPDATE SET
                        local_digest = excluded.local_digest,
                        remote_digest = excluded.remote_digest,
                        last_sync = excluded.last_sync",
                    params![id.to_key(), id.service, id.instance_id, local, remote, last],
                )
                .map(drop)
            })
            .await
    }

    /// Remembers that the tree with `fingerprint` archived to `digest`.
    pub async fn record_fingerprint(
        &self,
        id: &ContainerLayerId,
        fingerprint: &str,
        digest: &str,
    ) -> Result<()> {
        let id = id.clone();
        let (fp, dg) = (fingerprint.to_string(), digest.to_string());
        self.db
            .call("record fingerprint", move |c| {
                c.execute(
                    "INSERT INTO sync_state
                        (identity, service, instance_id, fingerprint, fingerprint_digest)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (identity) DO UPDATE SET
                        fingerprint = excluded.fingerprint,
                        fingerprint_digest = excluded.fingerprint_digest",
                    params![id.to_key(), id.service, id.instance_id, fp, dg],
                )
                .map(drop)
            })
            .await
    }

    /// Allocates the next sequence number of `id` (1, 2, ...); committed before it is returned.
    pub async fn next_seq(&self, id: &ContainerLayerId) -> Result<u64> {
        let id = id.clone();
        self.db
            .call("allocate sequence number", move |c| {
                c.query_row(
                    "INSERT INTO sync_state (identity, service, instance_id, seq)
                     VALUES (?1, ?2, ?3, 1)
                     ON CONFLICT (identity) DO UPDATE SET seq = seq + 1
                     RETURNING seq",
                    params![id.to_key(), id.service, id.instance_id],
                    |r| r.get(0),
                )
            })
            .await
    }

    /// Every identity's record, ordered by service then instance (for `status`).
    pub async fn list_sync_records(&self) -> Result<Vec<SyncRecord>> {
        self.db
            .call("list sync states", |c| {
                let recs = {
                    let mut st =
                        c.prepare(&format!("{SYNC_SELECT} ORDER BY service, instance_id"))?;
                    st.query_map([], sync_record_from_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()?
                };
                recs.into_iter().map(|r| attach_pending(c, r)).collect()
            })
            .await
    }

    /// Every identity's [`SyncState`], ordered by service then instance.
    pub async fn list_sync_states(&self) -> Result<Vec<SyncState>> {
        Ok(self
            .list_sync_records()
            .await?
            .into_iter()
            .map(|r| r.state)
            .collect())
    }

    /// Forgets `id`; returns whether it was known.
    pub async fn remove_sync_state(&self, id: &ContainerLayerId) -> Result<bool> {
        let key = id.to_key();
        self.db
            .call("remove sync state", move |c| {
                c.execute("DELETE FROM sync_state WHERE identity = ?1", [key])
                    .map(|n| n > 0)
            })
            .await
    }

    /// Journaled multipart uploads with their recorded parts, oldest first.
    pub async fn list_pending_uploads(&self) -> Result<Vec<PendingUpload>> {
        self.db
            .call("list pending uploads", |c| {
                let ups = {
                    let mut st =
                        c.prepare(&format!("{PENDING_SELECT} ORDER BY started_at, object_key"))?;
                    st.query_map([], pending_from_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()?
                };
                ups.into_iter().map(|u| with_parts(c, u)).collect()
            })
            .await
    }

    /// The journaled upload of `object_key`, with its parts.
    pub async fn get_pending_upload(&self, object_key: &str) -> Result<Option<PendingUpload>> {
        let key = object_key.to_string();
        self.db
            .call("read pending upload", move |c| load_pending(c, &key))
            .await
    }
}

const SYNC_SELECT: &str = "SELECT service, instance_id, local_digest, remote_digest, last_sync,
    fingerprint, fingerprint_digest, seq FROM sync_state";

const PENDING_SELECT: &str = "SELECT object_key, upload_id, total_parts, part_size, total_size,
    local_path, started_at, digest FROM pending_uploads";

fn fmt_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

fn parse_time(idx: usize, s: &str) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e)))
}

fn sync_record_from_row(r: &Row<'_>) -> rusqlite::Result<SyncRecord> {
    let last: Option<String> = r.get(4)?;
    Ok(SyncRecord {
        state: SyncState {
            container_id: ContainerLayerId::new(r.get::<_, String>(0)?, r.get::<_, String>(1)?),
            local_digest: r.get(2)?,
            remote_digest: r.get(3)?,
            last_sync: last.as_deref().map(|s| parse_time(4, s)).transpose()?,
            pending_upload: None,
        },
        fingerprint: r.get(5)?,
        fingerprint_digest: r.get(6)?,
        seq: r.get(7)?,
    })
}

fn attach_pending(c: &Connection, mut rec: SyncRecord) -> rusqlite::Result<SyncRecord> {
    if let Some(digest) = &rec.state.local_digest {
        let up = c
            .query_row(
                &format!("{PENDING_SELECT} WHERE digest = ?1 ORDER BY started_at DESC LIMIT 1"),
                [digest],
                pending_from_row,
            )
            .optional()?;
        rec.state.pending_upload = up.map(|u| with_parts(c, u)).transpose()?;
    }
    Ok(rec)
}

fn pending_from_row(r: &Row<'_>) -> rusqlite::Result<PendingUpload> {
    let path: Vec<u8> = r.get(5)?;
    let started: String = r.get(6)?;
    Ok(PendingUpload {
        object_key: r.get(0)?,
        upload_id: r.get(1)?,
        total_parts: r.get(2)?,
        part_size: r.get(3)?,
        total_size: r.get(4)?,
        local_tarball_path: PathBuf::from(OsStr::from_bytes(&path)),
        started_at: parse_time(6, &started)?,
        digest: r.get(7)?,
        completed_parts: HashMap::new(),
    })
}

fn with_parts(c: &Connection, mut up: PendingUpload) -> rusqlite::Result<PendingUpload> {
    let mut st = c.prepare(
        "SELECT part_number, e_tag, crc32c, size FROM upload_parts
         WHERE object_key = ?1 AND upload_id = ?2",
    )?;
    let parts = st.query_map([&up.object_key, &up.upload_id], |r| {
        Ok(CompletedPart {
            part_number: r.get(0)?,
            e_tag: r.get(1)?,
            checksum_crc32c: r.get(2)?,
            size: r.get(3)?,
        })
    })?;
    for p in parts {
        let p = p?;
        up.completed_parts.insert(p.part_number, p);
    }
    Ok(up)
}

fn load_pending(c: &Connection, key: &str) -> rusqlite::Result<Option<PendingUpload>> {
    c.query_row(
        &format!("{PENDING_SELECT} WHERE object_key = ?1"),
        [key],
        pending_from_row,
    )
    .optional()?
    .map(|u| with_parts(c, u))
    .transpose()
}

fn journal_err(key: &str) -> impl FnOnce(StateError) -> StoreError + '_ {
    move |e| StoreError::Journal {
        key: key.to_string(),
        source: Box::new(e),
    }
}

#[async_trait::async_trait]
impl UploadJournal for StateDb {
    async fn load_upload(
        &self,
        object_key: &str,
    ) -> std::result::Result<Option<PendingUpload>, StoreError> {
        self.get_pending_upload(object_key)
            .await
            .map_err(journal_err(object_key))
    }

    async fn begin_upload(&self, upload: &PendingUpload) -> std::result::Result<(), StoreError> {
        let up = upload.clone();
        self.db
            .call("begin upload", move |c| {
                let tx = c.transaction()?;
                // Replaces any older upload of the same key; its parts go with it (cascade).
                tx.execute(
                    "DELETE FROM pending_uploads WHERE object_key = ?1",
                    [&up.object_key],
                )?;
                tx.execute(
                    "INSERT INTO pending_uploads (object_key, upload_id, total_parts, part_size,
                        total_size, local_path, started_at, digest)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        up.object_key,
                        up.upload_id,
                        up.total_parts,
                        up.part_size,
                        up.total_size,
                        up.local_tarball_path.as_os_str().as_bytes(),
                        fmt_time(up.started_at),
                        up.digest
                    ],
                )?;
                for p in up.completed_parts.values() {
                    insert_part(&tx, &up.object_key, &up.upload_id, p)?;
                }
                tx.commit()
            })
            .await
            .map_err(journal_err(&upload.object_key))
    }

    async fn record_part(
        &self,
        object_key: &str,
        upload_id: &str,
        part: &CompletedPart,
    ) -> std::result::Result<(), StoreError> {
        let (key, id, part) = (object_key.to_string(), upload_id.to_string(), part.clone());
        self.db
            .call("record part", move |c| insert_part(c, &key, &id, &part))
            .await
            .map_err(journal_err(object_key))
    }

    async fn finish_upload(
        &self,
        object_key: &str,
        upload_id: &str,
    ) -> std::result::Result<(), StoreError> {
        let (key, id) = (object_key.to_string(), upload_id.to_string());
        self.db
            .call("finish upload", move |c| {
                c.execute(
                    "DELETE FROM pending_uploads WHERE object_key = ?1 AND upload_id = ?2",
                    [key, id],
                )
                .map(drop)
            })
            .await
            .map_err(journal_err(object_key))
    }

    async fn known_upload_ids(&self) -> std::result::Result<Vec<String>, StoreError> {
        self.db
            .call("list upload ids", |c| {
                let mut st = c.prepare("SELECT upload_id FROM pending_uploads")?;
                st.query_map([], |r| r.get(0))?.collect()
            })
            .await
            .map_err(journal_err(""))
    }
}

/// Upserts a part; the foreign key refuses parts of an upload that is not journaled.
fn insert_part(
    c: &Connection,
    key: &str,
    upload_id: &str,
    p: &CompletedPart,
) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO upload_parts (object_key, upload_id, part_number, e_tag, crc32c, size)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (object_key, upload_id, part_number) DO UPDATE SET
            e_tag = excluded.e_tag, crc32c = excluded.crc32c, size = excluded.size",
        params![
            key,
            upload_id,
            p.part_number,
            p.e_tag,
            p.checksum_crc32c,
            p.size
        ],
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use rusqlite::config::DbConfig;

    use super::*;

    fn upload(key: &str, id: &str, path: &str) -> PendingUpload {
        PendingUpload {
            upload_id: id.into(),
            object_key: key.into(),
            total_parts: 3,
            completed_parts: HashMap::new(),
            part_size: 5 << 20,
            local_tarball_path: path.into(),
            started_at: DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456789Z")
                .unwrap()
                .with_timezone(&Utc),
            digest: "abc".into(),
            total_size: (5 << 20) * 2 + 7,
        }
    }

    fn part(n: u32, etag: &str) -> CompletedPart {
        CompletedPart {
            part_number: n,
            e_tag: etag.into(),
            checksum_crc32c: format!("crc{n}"),
            size: 5 << 20,
        }
    }

    #[tokio::test]
    async fn sync_state_round_trips_and_keeps_fingerprint_and_seq() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open_async(&dir.path().join("s.sqlite"))
            .await
            .unwrap();
        let id = ContainerLayerId::new("web", "a/b_c");
        assert_eq!(db.get_sync_state(&id).await.unwrap(), None);
        assert_eq!(db.next_seq(&id).await.unwrap(), 1);
        assert_eq!(db.next_seq(&id).await.unwrap(), 2);
        db.record_fingerprint(&id, "fp1", "d1").await.unwrap();
        let mut st = SyncState::new(id.clone());
        st.local_digest = Some("d1".into());
        st.remote_digest = Some("d0".into());
        st.last_sync = Some(Utc::now());
        db.put_sync_state(&st).await.unwrap();
        let rec = db.get_sync_record(&id).await.unwrap().unwrap();
        assert_eq!(rec.state, st);
        assert_eq!(rec.fingerprint.as_deref(), Some("fp1"));
        assert_eq!(rec.fingerprint_digest.as_deref(), Some("d1"));
        assert_eq!(rec.seq, 2);
        // Identities whose naive `service_instance` keys would collide stay apart.
        let other = ContainerLayerId::new("web_a", "b_c");
        db.put_sync_state(&SyncState::new(other.clone()))
            .await
            .unwrap();
        let all = db.list_sync_states().await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].container_id, id);
        assert_eq!(all[1].container_id, other);
        assert!(db.remove_sync_state(&other).await.unwrap());
        assert!(!db.remove_sync_state(&other).await.unwrap());
    }

    #[tokio::test]
    async fn sync_state_carries_the_pending_upload_of_its_local_digest() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("s.sqlite")).unwrap();
        let id = ContainerLayerId::new("svc", "0");
        let mut up = upload("abc.tar.zst", "u1", "/spool/abc");
        up.completed_parts.insert(1, part(1, "e1"));
        db.begin_upload(&up).await.unwrap();
        let mut st = SyncState::new(id.clone());
        st.local_digest = Some("abc".into());
        db.put_sync_state(&st).await.unwrap();
        let got = db.get_sync_state(&id).await.unwrap().unwrap();
        assert_eq!(got.pending_upload, Some(up));
    }

    #[tokio::test]
    async fn journal_round_trips_and_replaces_older_uploads_of_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&dir.path().join("s.sqlite")).unwrap();
        let up = upload("k.tar.zst", "u1", "/spool/k");
        db.begin_upload(&up).await.unwrap();
        db.record_part("k.tar.zst", "u1", &part(2, "e2"))
            .await
            .unwrap();
        db.record_part("k.tar.zst", "u1", &part(1, "e1"))
            .await
            .unwrap();
        db.record_part("k.tar.zst", "u1", &part(1, "e1b"))
            .await
            .unwrap();
        let got = db.load_upload("k.tar.zst").await.unwrap().unwrap();
        assert_eq!(got.missing_parts(), vec![3]);
        assert_eq!(got.completed_parts[&1].e_tag, "e1b");
        assert_eq!(got.started_at, up.started_at);
        assert_eq!(got.local_tarball_path, PathBuf::from("/spool/k"));

        // A part of an upload that is not journaled is refused.
        let err = db
            .record_part("k.tar.zst", "u-other", &part(1, "x"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("k.tar.zst"), "{err}");

        db.begin_upload(&upload("k.tar.zst", "u2", "/spool/k"))
            .await
            .unwrap();
        let got = db.load_upload("k.tar.zst").await.unwrap().unwrap();
        assert_eq!(got.upload_id, "u2");
        assert!(
            got.completed_parts.is_empty(),
            "old parts must go with the old upload"
        );
        assert_eq!(db.known_upload_ids().await.unwrap(), vec!["u2".to_string()]);

        // Finishing another upload id of the key is a no-op; the right one removes it.
        db.finish_upload("k.tar.zst", "u1").await.unwrap();
        assert!(db.load_upload("k.tar.zst").await.unwrap().is_some());
        db.finish_upload("k.tar.zst", "u2").await.unwrap();
        assert!(db.load_upload("k.tar.zst").await.unwrap().is_none());
        assert!(db.list_pending_uploads().await.unwrap().is_empty());
        let orphans: i64 = db
            .database()
            .call("count parts", |c| {
                c.query_row("SELECT count(*) FROM upload_parts", [], |r| r.get(0))
            })
            .await
            .unwrap();
        assert_eq!(orphans, 0);
    }

    #[tokio::test]
    async fn journal_survives_reopen_as_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        {
            let db = StateDb::open(&path).unwrap();
            db.begin_upload(&upload("a.tar.zst", "ua", "/s/a"))
                .await
                .unwrap();
            db.record_part("a.tar.zst", "ua", &part(3, "e3"))
                .await
                .unwrap();
            db.begin_upload(&upload("b.tar.zst", "ub", "/s/b"))
                .await
                .unwrap();
            db.next_seq(&ContainerLayerId::new("x", "y")).await.unwrap();
            // Dropped without any explicit close or checkpoint: only committed data may remain.
        }
        let db = StateDb::open(&path).unwrap();
        let all = db.list_pending_uploads().await.unwrap();
        assert_eq!(all.len(), 2);
        let a = all.iter().find(|u| u.upload_id == "ua").unwrap();
        assert_eq!(a.completed_parts.len(), 1);
        assert_eq!(a.completed_parts[&3], part(3, "e3"));
        let mut ids = db.known_upload_ids().await.unwrap();
        ids.sort();
        assert_eq!(ids, vec!["ua".to_string(), "ub".to_string()]);
        assert_eq!(
            db.next_seq(&ContainerLayerId::new("x", "y")).await.unwrap(),
            2
        );
    }

    /// A power cut right after the commits loses whatever no fsync covered (see
    /// `state::powercut`). Every journal commit (an upload begun, its parts, a sequence number,
    /// a sync state) must survive it, which holds only if each commit is synced: WAL with
    /// `synchronous=FULL`. With NORMAL or OFF the commits are lost and this test fails.
    #[tokio::test]
    async fn committed_journal_entries_survive_a_power_cut() {
        let vfs = crate::state::powercut::register();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite");
        let id = ContainerLayerId::new("svc", "0");
        let mut state = SyncState::new(id.clone());
        state.local_digest = Some("abc".into());
        let unsynced = ContainerLayerId::new("svc", "unsynced");
        {
            let db = StateDb {
                db: Database::open_with_vfs(&path, LAYER_MIGRATIONS, vfs).unwrap(),
            };
            db.begin_upload(&upload("c.tar.zst", "uc", "/s/c"))
                .await
                .unwrap();
            db.record_part("c.tar.zst", "uc", &part(1, "e1"))
                .await
                .unwrap();
            db.record_part("c.tar.zst", "uc", &part(2, "e2"))
                .await
                .unwrap();
            assert_eq!(db.next_seq(&id).await.unwrap(), 1);
            db.put_sync_state(&state).await.unwrap();
            // The simulation must be able to lose data: a commit made without a sync is gone
            // after the cut (asserted below).
            db.database()
                .call("turn syncing off", |c| {
                    c.pragma_update(None, "synchronous", "OFF")
                })
                .await
                .unwrap();
            db.put_sync_state(&SyncState::new(unsynced.clone()))
                .await
                .unwrap();
            // A crash runs no checkpoint at close: leave everything in the WAL.
            db.database()
                .call("keep the WAL at close", |c| {
                    c.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
                        .map(drop)
                })
                .await
                .unwrap();
        }
        crate::state::powercut::cut(dir.path());

        let db = StateDb::open(&path).unwrap();
        assert_eq!(
            db.get_sync_state(&unsynced).await.unwrap(),
            None,
            "a commit without a sync survived: the power cut simulated nothing"
        );
        let got = db
            .load_upload("c.tar.zst")
            .await
            .unwrap()
            .expect("the begun upload was lost");
        assert_eq!(got.upload_id, "uc");
        assert_eq!(got.completed_parts.len(), 2, "recorded parts were lost");
        assert_eq!(got.completed_parts[&2], part(2, "e2"));
        let got = db
            .get_sync_state(&id)
            .await
            .unwrap()
            .expect("sync state lost");
        assert_eq!(got.local_digest.as_deref(), Some("abc"));
        assert_eq!(db.next_seq(&id).await.unwrap(), 2, "sequence number lost");
    }
}
