//! A directory as object store: `{local_store_dir}/{prefix}/{key}`.
//!
//! Objects appear atomically (temp file in the same directory, fsync, rename, fsync of the
//! directory). Writes and deletes in one directory serialise on an exclusive `flock` of a
//! `.zlayer-lock` file there, which makes `IfNoneMatch`/`IfMatch` exact even between processes
//! (Linux maps `flock` to POSIX locks on NFS). Names starting with `.zlayer-` are reserved for
//! temp and lock files and never listed.

mod following;

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::error::Result;
use super::{
    ListedObject, ObjectInfo, ObjectStore, PrefixReady, Progress, PutCondition, PutOutcome,
    StoreError, UploadJournal, UploadReport, keys_of, normalize_prefix, validate_key,
};
use crate::config::LayerStorageConfig;
use crate::sys::private;

/// Names with this prefix belong to the store itself.
pub(crate) const RESERVED_PREFIX: &str = ".zlayer-";
const TMP_PREFIX: &str = ".zlayer-tmp-";
const LOCK_NAME: &str = ".zlayer-lock";
const COPY_BUF: usize = 1024 * 1024;

/// Object store in a local (or NFS) directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    base: PathBuf,
}

impl LocalStore {
    /// Store at `cfg.local_store_dir` joined with `cfg.prefix`; creates the directory.
    pub fn open(cfg: &LayerStorageConfig) -> Result<Self> {
        Self::new(&cfg.local_store_dir, &cfg.prefix)
    }

    /// Store at `root/prefix`; creates the directory.
    pub fn new(root: &Path, prefix: &str) -> Result<Self> {
        let prefix = normalize_prefix(prefix)?;
        let base = root.join(prefix.trim_end_matches('/'));
        private::create_dir_all(&base).map_err(io_err("create store directory", &base))?;
        Ok(Self { base })
    }

    /// The directory holding the objects.
    #[must_use]
    pub fn base(&self) -> &Path {
        &self.base
    }

    fn path_of(&self, key: &str) -> Result<PathBuf> {
        validate_key(key)?;
        Ok(self.base.join(key))
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

async fn blocking<T: Send + 'static>(
    location: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| StoreError::Task {
            location: location.display().to_string(),
            source,
        })?
}

/// "Not there" for reads: a missing file, or a file where a directory was expected.
fn is_absent(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory)
}

fn parent_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Exclusive lock on the directory's lock file; released when dropped.
fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_NAME);
    let f = private::file_options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("open lock file", &path))?;
    f.lock().map_err(io_err("lock", &path))?;
    Ok(f)
}

/// Creates a fresh temp file in `dir`.
fn create_temp(dir: &Path) -> Result<(PathBuf, File)> {
    loop {
        let path = dir.join(crate::util::unique_temp_name(TMP_PREFIX.as_bytes(), "put"));
        match private::file_options()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("create temp file", &path)(e)),
        }
    }
}

/// Removes a temp file after a failure or a refused condition; nothing to report if that fails.
fn discard(tmp: &Path) {
    if let Err(e) = std::fs::remove_file(tmp) {
        tracing::debug!(path = %tmp.display(), error = %e, "cannot remove temp file");
    }
}

/// The ETag of a stored object: its quoted sha256.
fn sha256_file(path: &Path) -> std::io::Result<String> {
    crate::archive::sha256_file(path).map(|d| quote(&d))
}

fn quote(s: &str) -> String {
    format!("\"{s}\"")
}

fn same_etag(a: &str, b: &str) -> bool {
    a.trim_matches('"') == b.trim_matches('"')
}

/// Copies with progress and fsyncs the destination; returns bytes copied.
fn copy_synced(
    src: &Path,
    mut dst: File,
    dst_path: &Path,
    progress: Option<&Progress>,
) -> Result<u64> {
    let mut from = File::open(src).map_err(io_err("open", src))?;
    let mut buf = vec![0u8; COPY_BUF];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).map_err(io_err("read", src))?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n])
            .map_err(io_err("write", dst_path))?;
        total += n as u64;
        if let Some(p) = progress {
            p(n as u64);
        }
    }
    dst.sync_all().map_err(io_err("fsync", dst_path))?;
    Ok(total)
}

/// Writes `data` to a synced temp file next to `path` and moves it into place under `cond`.
fn put_sync(path: &Path, data: &[u8], cond: &PutCondition) -> Result<PutOutcome> {
    let dir = parent_of(path);
    private::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let (tmp, mut f) = create_temp(dir)?;
    let written = f
        .write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(io_err("write", &tmp));
    if let Err(e) = written {
        discard(&tmp);
        return Err(e);
    }
    drop(f);
    let _lock = lock_dir(dir)?;
    let allowed = match cond {
        PutCondition::None => Ok(true),
        PutCondition::IfNoneMatch => match std::fs::symlink_metadata(path) {
            Ok(_) => Ok(false),
            Err(e) if is_absent(&e) => Ok(true),
            Err(e) => Err(io_err("stat", path)(e)),
        },
        PutCondition::IfMatch(want) => match sha256_file(path) {
            Ok(cur) => Ok(same_etag(&cur, want)),
            Err(e) if is_absent(&e) => Ok(false),
            Err(e) => Err(io_err("read", path)(e)),
        },
    };
    match allowed {
        Ok(true) => {}
        Ok(false) => {
            discard(&tmp);
            return Ok(PutOutcome::PreconditionFailed);
        }
        Err(e) => {
            discard(&tmp);
            return Err(e);
        }
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        discard(&tmp);
        return Err(io_err("rename into", path)(e));
    }
    fsync_dir(dir)?;
    let mut h = Sha256::new();
    h.update(data);
    Ok(PutOutcome::Written {
        etag: Some(quote(&hex::encode(h.finalize()))),
    })
}

fn upload_sync(src: &Path, dest: &Path, progress: Option<&Progress>) -> Result<UploadReport> {
    let size = std::fs::metadata(src).map_err(io_err("stat", src))?.len();
    match std::fs::metadata(dest) {
        Ok(m) if m.is_file() && m.len() == size => {
            if let Some(p) = progress {
                p(size);
            }
            return Ok(UploadReport {
                parts_total: 1,
                parts_sent: 0,
                parts_reused: 0,
                already_existed: true,
            });
        }
        Ok(_) => {}
        Err(e) if is_absent(&e) => {}
        Err(e) => return Err(io_err("stat", dest)(e)),
    }
    let dir = parent_of(dest);
    private::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let (tmp, f) = create_temp(dir)?;
    drop(f);
    // Same filesystem: share the spool's inode instead of copying it (made private: a spool
    // written by an older version may be readable by others).
    let staged = match std::fs::remove_file(&tmp).and_then(|()| std::fs::hard_link(src, &tmp)) {
        Ok(()) => private::restrict(&tmp, private::FILE_MODE)
            .and_then(|()| File::open(&tmp))
            .and_then(|f| f.sync_all())
            .map_err(io_err("fsync", &tmp))
            .map(|()| {
                if let Some(p) = progress {
                    p(size);
                }
                size
            }),
        Err(_) => private::file_options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("create temp file", &tmp))
            .and_then(|f| copy_synced(src, f, &tmp, progress)),
    };
    let copied = match staged {
        Ok(n) => n,
        Err(e) => {
            discard(&tmp);
            return Err(e);
        }
    };
    if copied != size {
        discard(&tmp);
        return Err(StoreError::SpoolChanged {
            path: src.to_path_buf(),
        });
    }
    let _lock = lock_dir(dir)?;
    if let Err(e) = std::fs::rename(&tmp, dest) {
        discard(&tmp);
        return Err(io_err("rename into", dest)(e));
    }
    fsync_dir(dir)?;
    Ok(UploadReport {
        parts_total: 1,
        parts_sent: 1,
        parts_reused: 0,
        already_existed: false,
    })
}

/// Visits regular files under `dir`, skipping reserved names; `rel` is the key of `dir`.
fn walk(dir: &Path, rel: &str, out: &mut dyn FnMut(&str, &Path, &std::fs::Metadata)) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if is_absent(&e) => return Ok(()),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            tracing::debug!(dir = %dir.display(), "skipping non-UTF-8 name in local store");
            continue;
        };
        let path = entry.path();
        let meta = entry.metadata().map_err(io_err("stat", &path))?;
        let key = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        if meta.is_dir() {
            if !name.starts_with(RESERVED_PREFIX) {
                walk(&path, &key, out)?;
            }
        } else {
            out(&key, &path, &meta);
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        format!("file://{}", self.base.display())
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let path = self.path_of(key)?;
        blocking(&path.clone(), move || {
            let meta = match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => m,
                Ok(_) => return Ok(None),
                Err(e) if is_absent(&e) => return Ok(None),
                Err(e) => return Err(io_err("stat", &path)(e)),
            };
            // The etag is the content hash, so HEAD costs a read of the object.
            match sha256_file(&path) {
                Ok(etag) => Ok(Some(ObjectInfo {
                    size: meta.len(),
                    etag: Some(etag),
                    last_modified: meta.modified().ok(),
                })),
                Err(e) if is_absent(&e) => Ok(None),
                Err(e) => Err(io_err("read", &path)(e)),
            }
        })
        .await
    }

    async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path_of(key)?;
        blocking(&path.clone(), move || match std::fs::read(&path) {
            Ok(d) => Ok(Some(d)),
            Err(e) if is_absent(&e) || e.kind() == ErrorKind::IsADirectory => Ok(None),
            Err(e) => Err(io_err("read", &path)(e)),
        })
        .await
    }

    async fn put_bytes(&self, key: &str, data: Vec<u8>, cond: PutCondition) -> Result<PutOutcome> {
        let path = self.path_of(key)?;
        blocking(&path.clone(), move || put_sync(&path, &data, &cond)).await
    }

    async fn conditional_writes(&self) -> Result<bool> {
        Ok(true)
    }

    async fn download_to_file(
        &self,
        key: &str,
        dest: &Path,
        progress: Option<Progress>,
    ) -> Result<u64> {
        let src = self.path_of(key)?;
        let dest = dest.to_path_buf();
        let location = self.describe() + "/" + key;
        blocking(&src.clone(), move || {
            match std::fs::metadata(&src) {
                Ok(m) if m.is_file() => {}
                Ok(_) => return Err(StoreError::NotFound { location }),
                Err(e) if is_absent(&e) => return Err(StoreError::NotFound { location }),
                Err(e) => return Err(io_err("stat", &src)(e)),
            }
            let out = private::create(&dest).map_err(io_err("create", &dest))?;
            copy_synced(&src, out, &dest, progress.as_ref())
        })
        .await
    }

    /// Copies in chunks that the reader follows, without fsyncing the scratch file.
    async fn download_following(
        &self,
        key: &str,
        dest: &Path,
        ready: PrefixReady,
        progress: Option<Progress>,
    ) -> Result<u64> {
        let src = self.path_of(key)?;
        let location = self.describe() + "/" + key;
        following::download(src, dest.to_path_buf(), location, ready, progress).await
    }

    async fn upload_file(
        &self,
        key: &str,
        src: &Path,
        _journal: &dyn UploadJournal,
        progress: Option<Progress>,
    ) -> Result<UploadReport> {
        let dest = self.path_of(key)?;
        let src = src.to_path_buf();
        blocking(&dest.clone(), move || {
            upload_sync(&src, &dest, progress.as_ref())
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(keys_of(self.list_info(prefix).await?))
    }

    async fn list_info(&self, prefix: &str) -> Result<Vec<ListedObject>> {
        // Walk only the deepest directory the prefix names.
        let dir_part = prefix.rfind('/').map_or("", |i| &prefix[..i]);
        if !dir_part.is_empty() {
            validate_key(dir_part)?;
        }
        let (start, prefix) = (self.base.join(dir_part), prefix.to_string());
        let rel = dir_part.to_string();
        blocking(&start.clone(), move || {
            let mut objects = Vec::new();
            walk(&start, &rel, &mut |key, _, meta| {
                let name = key.rsplit('/').next().unwrap_or(key);
                if !name.starts_with(RESERVED_PREFIX) && key.starts_with(&prefix) {
                    objects.push(ListedObject {
                        key: key.to_string(),
                        size: meta.len(),
                        last_modified: meta.modified().ok(),
                    });
                }
            })?;
            objects.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(objects)
        })
        .await
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path_of(key)?;
        blocking(&path.clone(), move || match std::fs::metadata(&path) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if is_absent(&e) => Ok(false),
            Err(e) => Err(io_err("stat", &path)(e)),
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        blocking(&path.clone(), move || {
            let dir = parent_of(&path);
            if !dir.exists() {
                return Ok(());
            }
            let _lock = lock_dir(dir)?;
            match std::fs::remove_file(&path) {
                Ok(()) => fsync_dir(dir),
                Err(e) if is_absent(&e) => Ok(()),
                Err(e) => Err(io_err("remove", &path)(e)),
            }
        })
        .await
    }

    /// The local store has no multipart uploads; its leftovers are temp files of writers that
    /// died mid-write, removed once older than `older_than`.
    async fn abort_stale_uploads(
        &self,
        older_than: Duration,
        _journal: &dyn UploadJournal,
    ) -> Result<u32> {
        let base = self.base.clone();
        blocking(&base.clone(), move || {
            let cutoff = SystemTime::now()
                .checked_sub(older_than)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let mut stale = Vec::new();
            walk(&base, "", &mut |key, path, meta| {
                let name = key.rsplit('/').next().unwrap_or(key);
                let old = meta.modified().map(|m| m < cutoff).unwrap_or(false);
                if name.starts_with(TMP_PREFIX) && old {
                    stale.push(path.to_path_buf());
                }
            })?;
            let mut removed = 0;
            for path in stale {
                match std::fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if is_absent(&e) => {}
                    Err(e) => return Err(io_err("remove", &path)(e)),
                }
            }
            Ok(removed)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    struct NoJournal;

    #[async_trait::async_trait]
    impl UploadJournal for NoJournal {
        async fn load_upload(&self, _: &str) -> Result<Option<crate::types::PendingUpload>> {
            Ok(None)
        }
        async fn begin_upload(&self, _: &crate::types::PendingUpload) -> Result<()> {
            Ok(())
        }
        async fn record_part(
            &self,
            _: &str,
            _: &str,
            _: &crate::types::CompletedPart,
        ) -> Result<()> {
            Ok(())
        }
        async fn finish_upload(&self, _: &str, _: &str) -> Result<()> {
            Ok(())
        }
        async fn known_upload_ids(&self) -> Result<Vec<String>> {
            Ok(Vec::new())
        }
    }

    fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path(), "/layers/").unwrap();
        (dir, s)
    }

    #[test]
    fn store_dirs_objects_temp_and_lock_files_are_private_under_any_umask() {
        use crate::sys::private::testing::{assert_private, for_each_umask};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        for_each_umask(|_| {
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let s = LocalStore::new(&dir.path().join("root"), "layers/").unwrap();
                s.put_bytes("ids/a/manifest.json", b"{}".to_vec(), PutCondition::None)
                    .await
                    .unwrap();
                // A spool another process left readable still lands private.
                let spool = dir.path().join("spool");
                std::fs::write(&spool, b"layer").unwrap();
                s.upload_file("blobs/d.tar.zst", &spool, &NoJournal, None)
                    .await
                    .unwrap();
                let copy = dir.path().join("copy");
                s.download_to_file("blobs/d.tar.zst", &copy, None)
                    .await
                    .unwrap();
                // A temp file as the writers create it (the others are renamed away).
                let (tmp, _f) = create_temp(s.base()).unwrap();
                let base = s.base().to_path_buf();
                for p in [
                    dir.path().join("root"),
                    base.clone(),
                    base.join("ids"),
                    base.join("ids/a"),
                    base.join("ids/a/manifest.json"),
                    base.join("ids/a").join(LOCK_NAME),
                    base.join("blobs"),
                    base.join("blobs/d.tar.zst"),
                    tmp,
                    copy,
                ] {
                    assert_private(&p);
                }
            });
        });
    }

    fn no_temp_files(dir: &Path) -> bool {
        let mut clean = true;
        walk(dir, "", &mut |k, _, _| clean &= !k.contains(TMP_PREFIX)).unwrap();
        clean
    }

    #[tokio::test]
    async fn put_get_head_list_delete() {
        let (dir, s) = store();
        assert_eq!(s.base(), dir.path().join("layers"));
        assert!(s.describe().starts_with("file://"));
        assert_eq!(s.get_bytes("a.json").await.unwrap(), None);
        assert_eq!(s.head("a.json").await.unwrap(), None);
        let out = s
            .put_bytes("a.json", b"{}".to_vec(), PutCondition::None)
            .await
            .unwrap();
        let PutOutcome::Written { etag: Some(etag) } = out else {
            panic!("{out:?}")
        };
        let info = s.head("a.json").await.unwrap().unwrap();
        assert_eq!(info.size, 2);
        assert_eq!(info.etag.as_deref(), Some(etag.as_str()));
        s.put_bytes("ids/web_0/manifest.json", b"m".to_vec(), PutCondition::None)
            .await
            .unwrap();
        s.put_bytes("ids/web_1/manifest.json", b"m".to_vec(), PutCondition::None)
            .await
            .unwrap();
        assert_eq!(
            s.list("").await.unwrap(),
            vec![
                "a.json",
                "ids/web_0/manifest.json",
                "ids/web_1/manifest.json"
            ]
        );
        assert_eq!(
            s.list("ids/web_1").await.unwrap(),
            vec!["ids/web_1/manifest.json"]
        );
        assert_eq!(s.list("ids/").await.unwrap().len(), 2);
        assert!(s.list("nothing/here").await.unwrap().is_empty());
        // A "directory" is not an object.
        assert_eq!(s.head("ids").await.unwrap(), None);
        assert_eq!(s.get_bytes("ids").await.unwrap(), None);
        assert_eq!(s.get_bytes("a.json/x").await.unwrap(), None);
        s.delete("a.json").await.unwrap();
        s.delete("a.json").await.unwrap();
        s.delete("never/was").await.unwrap();
        assert_eq!(s.get_bytes("a.json").await.unwrap(), None);
        assert!(no_temp_files(s.base()));
    }

    #[tokio::test]
    async fn invalid_keys_are_refused_by_every_operation() {
        let (dir, s) = store();
        for key in ["../escape", "/etc/passwd", "a/../../b", ""] {
            let err = s
                .put_bytes(key, b"x".to_vec(), PutCondition::None)
                .await
                .unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidKey { .. }),
                "{key}: {err:?}"
            );
            assert!(err.to_string().contains(&format!("{key:?}")), "{err}");
            assert!(s.get_bytes(key).await.is_err());
            assert!(s.head(key).await.is_err());
            assert!(s.delete(key).await.is_err());
            assert!(
                s.upload_file(key, Path::new("/dev/null"), &NoJournal, None)
                    .await
                    .is_err()
            );
        }
        assert!(s.list("../").await.is_err());
        assert!(!dir.path().join("escape").exists());
    }

    #[tokio::test]
    async fn conditional_puts_are_exact() {
        let (_dir, s) = store();
        assert!(s.conditional_writes().await.unwrap());
        let k = "m.json";
        assert_eq!(
            s.put_bytes(k, b"x".to_vec(), PutCondition::IfMatch("\"nope\"".into()))
                .await
                .unwrap(),
            PutOutcome::PreconditionFailed,
            "IfMatch on a missing key fails"
        );
        let PutOutcome::Written { etag: Some(e1) } = s
            .put_bytes(k, b"one".to_vec(), PutCondition::IfNoneMatch)
            .await
            .unwrap()
        else {
            panic!("first IfNoneMatch must write")
        };
        assert_eq!(
            s.put_bytes(k, b"two".to_vec(), PutCondition::IfNoneMatch)
                .await
                .unwrap(),
            PutOutcome::PreconditionFailed
        );
        assert_eq!(s.get_bytes(k).await.unwrap().unwrap(), b"one");
        assert_eq!(
            s.put_bytes(k, b"two".to_vec(), PutCondition::IfMatch("\"0000\"".into()))
                .await
                .unwrap(),
            PutOutcome::PreconditionFailed
        );
        let PutOutcome::Written { etag: Some(e2) } = s
            .put_bytes(k, b"two".to_vec(), PutCondition::IfMatch(e1.clone()))
            .await
            .unwrap()
        else {
            panic!("IfMatch with the current etag must write")
        };
        assert_ne!(e1, e2);
        assert_eq!(s.get_bytes(k).await.unwrap().unwrap(), b"two");
        // An unquoted etag matches its quoted form.
        let unquoted = e2.trim_matches('"').to_string();
        assert!(matches!(
            s.put_bytes(k, b"three".to_vec(), PutCondition::IfMatch(unquoted))
                .await
                .unwrap(),
            PutOutcome::Written { .. }
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_conditional_puts_have_exactly_one_winner() {
        let (_dir, s) = store();
        let s = Arc::new(s);
        let mut tasks = Vec::new();
        for i in 0..16u8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.put_bytes("race.json", vec![i; 1000], PutCondition::IfNoneMatch)
                    .await
                    .unwrap()
            }));
        }
        let mut winners = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), PutOutcome::Written { .. }) {
                winners += 1;
            }
        }
        assert_eq!(winners, 1);

        let etag = s.head("race.json").await.unwrap().unwrap().etag.unwrap();
        let mut tasks = Vec::new();
        for i in 0..16u8 {
            let (s, etag) = (s.clone(), etag.clone());
            tasks.push(tokio::spawn(async move {
                s.put_bytes(
                    "race.json",
                    vec![100 + i; 1000],
                    PutCondition::IfMatch(etag),
                )
                .await
                .unwrap()
            }));
        }
        let mut winners = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), PutOutcome::Written { .. }) {
                winners += 1;
            }
        }
        assert_eq!(
            winners, 1,
            "compare-and-swap must let exactly one writer through"
        );
        assert!(no_temp_files(s.base()));
    }

    #[test]
    fn readers_never_see_a_partial_object() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("obj");
        let a = vec![b'a'; 4 << 20];
        let b = vec![b'b'; 4 << 20];
        put_sync(&path, &a, &PutCondition::None).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(Ordering::Relaxed) {
                    let d = std::fs::read(&path).unwrap();
                    assert_eq!(d.len(), 4 << 20);
                    assert!(d.iter().all(|&c| c == d[0]), "mixed contents");
                    reads += 1;
                }
                reads
            })
        };
        for i in 0..20 {
            put_sync(&path, if i % 2 == 0 { &b } else { &a }, &PutCondition::None).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    }

    #[tokio::test]
    async fn upload_and_download_files() {
        let (dir, s) = store();
        let src = dir.path().join("spool");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let p: Progress = {
            let seen = seen.clone();
            Arc::new(move |n| {
                seen.fetch_add(n, Ordering::Relaxed);
            })
        };
        let r = s
            .upload_file("d1.tar.zst", &src, &NoJournal, Some(p.clone()))
            .await
            .unwrap();
        assert_eq!(
            r,
            UploadReport {
                parts_total: 1,
                parts_sent: 1,
                parts_reused: 0,
                already_existed: false
            }
        );
        assert_eq!(seen.load(Ordering::Relaxed), data.len() as u64);
        let r = s
            .upload_file("d1.tar.zst", &src, &NoJournal, None)
            .await
            .unwrap();
        assert!(r.already_existed);
        assert_eq!(r.parts_sent, 0);
        let dest = dir.path().join("out");
        let n = s
            .download_to_file("d1.tar.zst", &dest, Some(p))
            .await
            .unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(std::fs::read(&dest).unwrap(), data);
        // Removing the spool must not affect the stored object (hard link or copy).
        std::fs::remove_file(&src).unwrap();
        assert_eq!(
            s.get_bytes("d1.tar.zst").await.unwrap().unwrap().len(),
            data.len()
        );
        let err = s
            .download_to_file("missing.tar.zst", &dest, None)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("missing.tar.zst"));
        assert!(no_temp_files(s.base()));
    }

    #[tokio::test]
    async fn stale_temp_files_are_removed_and_never_listed() {
        let (_dir, s) = store();
        s.put_bytes("x/y.json", b"1".to_vec(), PutCondition::None)
            .await
            .unwrap();
        let (old, f) = create_temp(&s.base().join("x")).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(7200))
            .unwrap();
        drop(f);
        let (fresh, _f) = create_temp(&s.base().join("x")).unwrap();
        assert_eq!(s.list("").await.unwrap(), vec!["x/y.json"]);
        let n = s
            .abort_stale_uploads(Duration::from_secs(3600), &NoJournal)
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert!(!old.exists());
        assert!(fresh.exists());
        assert_eq!(s.get_bytes("x/y.json").await.unwrap().unwrap(), b"1");
    }
}
