//! Where a restore lands: the target is checked (absent or an empty dir), the archive is
//! extracted into a private staging dir beside it, and the staging dir is made durable and
//! swapped in only once everything checked out; a failed restore leaves the target as it was.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use super::error::{ArchiveError, Result, io_err};

/// Where a restore lands: the target's parent, its name, and whether it exists (empty).
#[derive(Debug)]
pub struct TargetSlot {
    pub target: PathBuf,
    parent_path: PathBuf,
    parent: OwnedFd,
    name: OsString,
    existing_empty: bool,
}

fn dir_is_empty(parent: &OwnedFd, name: &OsStr) -> io::Result<bool> {
    let fd = rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut dir = rustix::fs::Dir::read_from(&fd)?;
    while let Some(e) = dir.read() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Checks the restore target: absent or an empty directory; anything else is refused.
pub fn check_target(target: &Path) -> Result<TargetSlot> {
    let bad = || ArchiveError::BadTarget {
        target: target.to_owned(),
    };
    let name = target.file_name().ok_or_else(bad)?.to_owned();
    let parent_path = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        Some(_) => PathBuf::from("."),
        None => return Err(bad()),
    };
    let parent = rustix::fs::openat(
        CWD,
        &parent_path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("open parent directory", &parent_path)(e.into()))?;
    let existing_empty = match rustix::fs::statat(&parent, &name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => false,
        Err(e) => return Err(io_err("stat", target)(e.into())),
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            if !dir_is_empty(&parent, &name).map_err(io_err("read directory", target))? {
                return Err(ArchiveError::TargetNotEmpty {
                    target: target.to_owned(),
                });
            }
            true
        }
        Ok(_) => {
            return Err(ArchiveError::TargetNotDir {
                target: target.to_owned(),
            });
        }
    };
    Ok(TargetSlot {
        target: target.to_owned(),
        parent_path,
        parent,
        name,
        existing_empty,
    })
}

/// A fresh staging dir next to the target; removed on drop unless swapped in.
#[derive(Debug)]
pub struct Staging<'a> {
    slot: &'a TargetSlot,
    name: OsString,
    done: bool,
}

impl<'a> Staging<'a> {
    pub fn create(slot: &'a TargetSlot) -> Result<(Self, OwnedFd)> {
        let name = super::pack::sibling_temp_name(slot.name.as_bytes(), "staging");
        let path = slot.parent_path.join(&name);
        rustix::fs::mkdirat(&slot.parent, &name, Mode::from_raw_mode(0o700))
            .map_err(|e| io_err("create staging dir", &path)(e.into()))?;
        let staging = Staging {
            slot,
            name,
            done: false,
        };
        let fd = rustix::fs::openat(
            &slot.parent,
            &staging.name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err("open staging dir", &path)(e.into()))?;
        Ok((staging, fd))
    }

    pub fn path(&self) -> PathBuf {
        self.slot.parent_path.join(&self.name)
    }

    /// Makes the staging tree durable, then moves it onto the target (rename if absent,
    /// exchange if an empty dir) and makes the new name durable (parent fsync). When this
    /// returns Ok the whole restored tree and its name are on disk, so a caller that records
    /// "restored" afterwards never records a tree a power loss could take back.
    pub fn swap(mut self, root: OwnedFd) -> Result<()> {
        let slot = self.slot;
        let swap_err = |e: Errno| ArchiveError::Swap {
            target: slot.target.clone(),
            source: e.into(),
        };
        sync_tree(&root, &self.path())?;
        drop(root);
        if slot.existing_empty {
            if !dir_is_empty(&slot.parent, &slot.name).map_err(|source| ArchiveError::Swap {
                target: slot.target.clone(),
                source,
            })? {
                return Err(ArchiveError::TargetNotEmpty {
                    target: slot.target.clone(),
                });
            }
            rustix::fs::renameat_with(
                &slot.parent,
                &self.name,
                &slot.parent,
                &slot.name,
                RenameFlags::EXCHANGE,
            )
            .map_err(swap_err)?;
            self.done = true;
            durability::record(durability::Op::Swap);
            if let Err(e) = rustix::fs::unlinkat(&slot.parent, &self.name, AtFlags::REMOVEDIR) {
                tracing::warn!(path = %self.path().display(), error = %e, "could not remove the replaced empty target dir");
            }
        } else {
            rustix::fs::renameat_with(
                &slot.parent,
                &self.name,
                &slot.parent,
                &slot.name,
                RenameFlags::NOREPLACE,
            )
            .map_err(swap_err)?;
            self.done = true;
            durability::record(durability::Op::Swap);
        }
        let dir = File::open(&slot.parent_path).map_err(io_err("open", &slot.parent_path))?;
        dir.sync_all().map_err(io_err("fsync", &slot.parent_path))?;
        durability::record(durability::Op::SyncParent);
        Ok(())
    }

    /// Removes the staging dir, keeping both errors if that fails too.
    pub fn discard(mut self, err: ArchiveError) -> ArchiveError {
        self.done = true;
        match remove_tree(&self.path()) {
            Ok(()) => err,
            Err(cleanup) => ArchiveError::Cleanup {
                staging: self.path(),
                cleanup,
                source: Box::new(err),
            },
        }
    }
}

/// Writes back everything in the staging tree: one `syncfs` of its filesystem (cheaper than an
/// fsync per file, and it reports writeback errors since Linux 5.8), then an fsync of the
/// staging root itself.
fn sync_tree(root: &OwnedFd, path: &Path) -> Result<()> {
    rustix::fs::syncfs(root).map_err(|e| io_err("syncfs the filesystem of", path)(e.into()))?;
    rustix::fs::fsync(root).map_err(|e| io_err("fsync", path)(e.into()))?;
    durability::record(durability::Op::SyncStagingTree);
    Ok(())
}

/// The durability steps of a restore, recorded per thread in tests so their order can be
/// asserted on the real restore paths; nothing is recorded outside tests.
pub(super) mod durability {
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Op {
        /// The staging tree and its root dir were written back.
        SyncStagingTree,
        /// The staging dir got the target's name.
        Swap,
        /// The target's parent dir (the new name) was written back.
        SyncParent,
    }

    #[cfg(test)]
    thread_local! {
        static OPS: std::cell::RefCell<Vec<Op>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// Notes that `op` completed (on this thread).
    pub fn record(op: Op) {
        #[cfg(test)]
        OPS.with(|o| o.borrow_mut().push(op));
        #[cfg(not(test))]
        let _ = op;
    }

    /// The ops completed on this thread since the last call.
    #[cfg(test)]
    pub fn take() -> Vec<Op> {
        OPS.with(|o| std::mem::take(&mut *o.borrow_mut()))
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = remove_tree(&self.path());
        }
    }
}

/// `remove_dir_all` (which never follows symlinks), making read-only dirs writable on EACCES.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_dirs_writable(path)?;
            std::fs::remove_dir_all(path)
        }
        Err(e) => Err(e),
    }
}

fn make_dirs_writable(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    for e in std::fs::read_dir(path)? {
        make_dirs_writable(&e?.path())?;
    }
    Ok(())
}
