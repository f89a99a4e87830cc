//! Building a restored database: pages written into a private temporary file, then checked by
//! SQLite and put in place atomically.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Bytes written between two starts of write-back (see [`PageFile::pages`]).
const WRITEBACK_EVERY: u64 = 16 << 20;

/// Failures building or installing a restored database; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("restored database {path} failed its integrity check: {report}")]
    Integrity { path: PathBuf, report: String },
    #[error("cannot check restored database {path}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path} exists; restore refuses to overwrite it without force")]
    Exists { path: PathBuf },
}

type Result<T> = std::result::Result<T, ApplyError>;

/// A database file being rebuilt page by page (a snapshot, then transactions).
#[derive(Debug)]
pub struct PageFile {
    file: File,
    path: PathBuf,
    page_size: u64,
    /// Bytes written since write-back was last started.
    unflushed: u64,
}

impl PageFile {
    /// Creates `path` (0600, must not exist).
    pub fn create(path: &Path, page_size: u32) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io("create", path))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            page_size: u64::from(page_size),
            unflushed: 0,
        })
    }

    /// Writes page `pgno` (1-based).
    pub fn page(&mut self, pgno: u32, data: &[u8]) -> Result<()> {
        if pgno == 0 {
            return Err(io("write page 0 of", &self.path)(std::io::Error::other(
                "page numbers start at 1",
            )));
        }
        self.file
            .write_all_at(data, u64::from(pgno - 1) * self.page_size)
            .map_err(io("write a page of", &self.path))
    }

    /// Writes consecutive pages starting at `first` (1-based); `data` is whole pages.
    pub fn pages(&mut self, first: u32, data: &[u8]) -> Result<()> {
        if first == 0 {
            return self.page(0, data);
        }
        self.file
            .write_all_at(data, u64::from(first - 1) * self.page_size)
            .map_err(io("write pages of", &self.path))?;
        // A snapshot is written in long runs: starting their write-back as they come lets the
        // disk work while the rest downloads, instead of all of it in the final fsync.
        self.unflushed += data.len() as u64;
        if self.unflushed >= WRITEBACK_EVERY {
            self.unflushed = 0;
            // SAFETY: a plain syscall on a descriptor this struct owns; no memory is passed.
            let r = unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
            };
            if r != 0 {
                return Err(io("start the write-back of", &self.path)(
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Ok(())
    }

    /// Ends a transaction: the database is `db_pages` pages long after it.
    pub fn commit(&mut self, db_pages: u32) -> Result<()> {
        self.file
            .set_len(u64::from(db_pages) * self.page_size)
            .map_err(io("resize", &self.path))
    }

    /// Syncs the file, lets SQLite check it (`integrity_check` when `check`), switches it to WAL
    /// mode and moves it to `dest` (atomically, the directory synced after). `dest` is replaced
    /// only when `force`; its old `-wal`/`-shm` are removed first then, since they belong to the
    /// replaced database. On failure the temporary file is removed.
    pub fn install(self, dest: &Path, check: bool, force: bool) -> Result<()> {
        let path = self.path.clone();
        let result = self.install_inner(dest, check, force);
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    /// Opens the built file with SQLite and, when `check`, runs `PRAGMA integrity_check`.
    fn check(path: &Path, check: bool) -> Result<rusqlite::Connection> {
        let conn = rusqlite::Connection::open(path).map_err(sqlite(path))?;
        if check {
            // Reading through a mapping makes the check about a third faster (measured on a
            // 207 MB database); SQLite caps the size at its own maximum.
            let len = std::fs::metadata(path).map_err(io("stat", path))?.len();
            conn.execute_batch(&format!("PRAGMA mmap_size={len}"))
                .map_err(sqlite(path))?;
            let report: Vec<String> = conn
                .prepare("PRAGMA integrity_check")
                .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
                .map_err(sqlite(path))?;
            if report != ["ok"] {
                return Err(ApplyError::Integrity {
                    path: path.to_path_buf(),
                    report: report.join("; "),
                });
            }
        }
        Ok(conn)
    }

    fn install_inner(self, dest: &Path, check: bool, force: bool) -> Result<()> {
        // The file is complete: its sync (disk-bound) runs beside the check (CPU-bound), and
        // both must succeed before anything is moved into place.
        let (file, path) = (self.file, self.path);
        let syncing = std::thread::spawn(move || file.sync_all());
        let checked = Self::check(&path, check);
        let synced = syncing
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the sync thread panicked")));
        synced.map_err(io("sync", &path))?;
        let conn = checked?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(sqlite(&path))?;
        if mode != "wal" {
            return Err(ApplyError::Integrity {
                path,
                report: format!("journal mode stays {mode}"),
            });
        }
        conn.close().map_err(|(_, e)| sqlite(&path)(e))?;
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io("sync", &path))?;
        if force {
            for side in ["-wal", "-shm"] {
                let mut p = dest.as_os_str().to_owned();
                p.push(side);
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io("remove", Path::new(&p))(e)),
                }
            }
            std::fs::rename(&path, dest).map_err(io("move the restored database to", dest))?;
        } else {
            // A WAL without its database would be replayed onto the restored one.
            let mut wal = dest.as_os_str().to_owned();
            wal.push("-wal");
            if Path::new(&wal).exists() {
                return Err(ApplyError::Exists {
                    path: PathBuf::from(wal),
                });
            }
            // Never replaces a database that appeared meanwhile (an app that started early).
            let flags = rustix::fs::RenameFlags::NOREPLACE;
            match rustix::fs::renameat_with(rustix::fs::CWD, &path, rustix::fs::CWD, dest, flags) {
                Ok(()) => {}
                Err(rustix::io::Errno::EXIST) => {
                    return Err(ApplyError::Exists {
                        path: dest.to_path_buf(),
                    });
                }
                Err(e) => return Err(io("move the restored database to", dest)(e.into())),
            }
        }
        let dir = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync directory", dir))
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ApplyError + use<> {
    let path = path.to_path_buf();
    move |source| ApplyError::Io { op, path, source }
}

fn sqlite(path: &Path) -> impl FnOnce(rusqlite::Error) -> ApplyError + use<> {
    let path = path.to_path_buf();
    move |source| ApplyError::Sqlite { path, source }
}

#[cfg(test)]
#[path = "apply_tests.rs"]
mod tests;
