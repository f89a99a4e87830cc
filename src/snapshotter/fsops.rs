//! Directory work of the snapshotter: snapshot directories, disk usage and the trash.
//!
//! All functions block; the core runs them on the blocking pool.

use std::collections::HashSet;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::error::{Result, SnapshotError};
use super::types::{Kind, Usage};

/// Prefix of snapshot directories still being created: `new-<id>`.
pub const TEMP_PREFIX: &str = "new-";

/// Creates `dir` holding `fs` (0755) and, for Active, `work` (0711). Modes are set explicitly
/// so the daemon's umask does not change them. On failure nothing is left behind.
pub fn create_layout(dir: &Path, kind: Kind) -> Result<()> {
    fs::create_dir(dir).map_err(SnapshotError::io("create", dir))?;
    let result = (|| {
        make_dir(&dir.join("fs"), 0o755)?;
        if kind == Kind::Active {
            make_dir(&dir.join("work"), 0o711)?;
        }
        Ok(())
    })();
    if result.is_err() {
        remove_quietly(dir);
    }
    result
}

fn make_dir(path: &Path, mode: u32) -> Result<()> {
    fs::create_dir(path).map_err(SnapshotError::io("create", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(SnapshotError::io("set mode of", path))
}

/// Gives `fs` the owner of the parent's `fs`, so a container's root keeps the image's owner.
pub fn chown_like(target: &Path, reference: &Path) -> Result<()> {
    let meta = fs::metadata(reference).map_err(SnapshotError::io("stat", reference))?;
    std::os::unix::fs::lchown(target, Some(meta.uid()), Some(meta.gid()))
        .map_err(SnapshotError::io("chown", target))
}

/// `du` of a tree: allocated bytes (`st_blocks * 512`) and distinct inodes, the root included;
/// hard links count once. Symlinks are not followed; other filesystems are not crossed.
pub fn disk_usage(root: &Path) -> Result<Usage> {
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut usage = Usage::default();
    let top = fs::symlink_metadata(root).map_err(SnapshotError::io("stat", root))?;
    let dev = top.dev();
    let mut stack = vec![(root.to_path_buf(), top)];
    while let Some((path, meta)) = stack.pop() {
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        usage.inodes += 1;
        usage.size += i64::try_from(meta.blocks().saturating_mul(512)).unwrap_or(i64::MAX);
        if !meta.is_dir() || meta.dev() != dev {
            continue;
        }
        let entries = match fs::read_dir(&path) {
            Ok(e) => e,
            // A concurrent delete inside a live upper dir is not an error for usage.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(SnapshotError::io("read directory", path)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(SnapshotError::io("read directory", &path))?;
            let child = entry.path();
            match fs::symlink_metadata(&child) {
                Ok(m) => stack.push((child, m)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(SnapshotError::io("stat", child)(e)),
            }
        }
    }
    Ok(usage)
}

/// Moves `dir` into `trash` under a unique name; the sweeper deletes it later.
pub fn move_to_trash(dir: &Path, trash: &Path) -> Result<()> {
    let name = dir.file_name().map(|n| n.as_bytes()).unwrap_or_default();
    let target = trash.join(crate::util::unique_temp_name(name, "trash"));
    fs::rename(dir, &target).map_err(SnapshotError::io("move to trash", dir))
}

/// Deletes everything in `trash`; returns how many entries went. An entry that cannot be
/// deleted is logged and skipped, so one stuck entry never keeps the rest on disk; the next
/// sweep tries it again.
pub fn empty_trash(trash: &Path) -> Result<usize> {
    empty_trash_with(trash, |path| {
        if path.is_dir() && !path.is_symlink() {
            fs::remove_dir_all(path)
        } else {
            fs::remove_file(path)
        }
    })
}

fn empty_trash_with(trash: &Path, remove: impl Fn(&Path) -> std::io::Result<()>) -> Result<usize> {
    let entries = match fs::read_dir(trash) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(SnapshotError::io("read directory", trash)(e)),
    };
    let mut removed = 0;
    for entry in entries {
        let path = entry
            .map_err(SnapshotError::io("read directory", trash))?
            .path();
        match remove(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete a trash entry; skipping it");
            }
        }
    }
    Ok(removed)
}

/// Best-effort removal on an error path; the error being returned matters more.
pub fn remove_quietly(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir) {
        tracing::warn!(path = %dir.display(), error = %e, "cannot remove directory");
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn layouts_have_containerd_modes() {
        let d = tempfile::tempdir().unwrap();
        let active = d.path().join("new-1");
        create_layout(&active, Kind::Active).unwrap();
        let mode = |p: PathBuf| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(active.join("fs")), 0o755);
        assert_eq!(mode(active.join("work")), 0o711);
        let view = d.path().join("new-2");
        create_layout(&view, Kind::View).unwrap();
        assert!(view.join("fs").is_dir());
        assert!(!view.join("work").exists());
        assert!(
            create_layout(&view, Kind::View).is_err(),
            "an existing directory is not reused"
        );
        assert!(
            view.join("fs").is_dir(),
            "and not removed by the failed attempt"
        );
    }

    #[test]
    fn disk_usage_counts_the_root_and_hard_links_once() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("fs");
        fs::create_dir(&root).unwrap();
        let empty = disk_usage(&root).unwrap();
        assert_eq!(empty.inodes, 1);
        let dir_blocks = empty.size;

        fs::write(root.join("a"), vec![1u8; 100_000]).unwrap();
        fs::hard_link(root.join("a"), root.join("b")).unwrap();
        fs::create_dir(root.join("sub")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", root.join("sub/link")).unwrap();
        let u = disk_usage(&root).unwrap();
        assert_eq!(u.inodes, 4, "root, a (=b), sub, link");
        let a_blocks = i64::try_from(fs::metadata(root.join("a")).unwrap().blocks() * 512).unwrap();
        assert!(u.size >= dir_blocks + a_blocks, "{u:?}");
        assert!(
            u.size < dir_blocks + 2 * a_blocks,
            "hard link counted twice: {u:?}"
        );
    }

    #[test]
    fn trash_moves_and_empties() {
        let d = tempfile::tempdir().unwrap();
        let trash = d.path().join("trash");
        fs::create_dir(&trash).unwrap();
        for i in 0..3 {
            let s = d.path().join(i.to_string());
            fs::create_dir_all(s.join("fs/deep")).unwrap();
            fs::write(s.join("fs/deep/f"), b"x").unwrap();
            move_to_trash(&s, &trash).unwrap();
            assert!(!s.exists());
        }
        assert_eq!(fs::read_dir(&trash).unwrap().count(), 3);
        assert_eq!(empty_trash(&trash).unwrap(), 3);
        assert_eq!(fs::read_dir(&trash).unwrap().count(), 0);
        assert_eq!(empty_trash(&d.path().join("missing")).unwrap(), 0);
    }

    #[test]
    fn empty_trash_goes_on_past_an_entry_it_cannot_delete() {
        let d = tempfile::tempdir().unwrap();
        for name in ["a", "stuck", "z"] {
            fs::create_dir(d.path().join(name)).unwrap();
            fs::write(d.path().join(name).join("f"), b"x").unwrap();
        }
        let removed = empty_trash_with(d.path(), |p| {
            if p.ends_with("stuck") {
                Err(std::io::Error::from_raw_os_error(libc::EBUSY))
            } else {
                fs::remove_dir_all(p)
            }
        })
        .unwrap();
        assert_eq!(removed, 2);
        let left: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("stuck")]);
    }
}
