//! Files and directories that hold user data (layers hold secrets): files 0600, directories 0700.
//!
//! The modes are passed to `open`/`mkdir`, which the umask can only narrow, so a permissive umask
//! (0o022, 0o000) never widens them. [`restrict`] tightens files that already exist (written by
//! an older version, or created by a library we do not control).

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of every file holding user data.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory holding user data.
pub const DIR_MODE: u32 = 0o700;

/// [`OpenOptions`] that create files with [`FILE_MODE`]; add the access and creation flags.
#[must_use]
pub fn file_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// `File::create` (write, create, truncate) with [`FILE_MODE`].
pub fn create(path: &Path) -> io::Result<File> {
    file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

/// `create_dir_all` where every directory it creates gets [`DIR_MODE`]; existing ones are kept.
pub fn create_dir_all(path: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
}

/// [`create_dir_all`], then [`DIR_MODE`] on `path` itself even if it already existed (for
/// directories that are ours alone, such as the staging dir).
pub fn create_own_dir(path: &Path) -> io::Result<()> {
    create_dir_all(path)?;
    restrict(path, DIR_MODE)
}

/// Sets `mode` on an existing file or directory if its permission bits differ (symlinks are
/// followed: callers pass paths they created).
pub fn restrict(path: &Path, mode: u32) -> io::Result<()> {
    let current = std::fs::metadata(path)?.permissions().mode() & 0o7777;
    if current == mode {
        return Ok(());
    }
    std::fs::set_permissions(path, Permissions::from_mode(mode))
}

/// Test helpers: run code under a given umask (process-wide, so callers serialise).
#[cfg(test)]
pub(crate) mod testing {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::sync::Mutex;

    use rustix::fs::Mode;

    static UMASK: Mutex<()> = Mutex::new(());

    /// The umasks every privacy test runs under: the usual default and the most permissive.
    const UMASKS: [u32; 2] = [0o022, 0o000];

    /// Runs `f` once under each of [`UMASKS`], passing the umask.
    pub(crate) fn for_each_umask(f: impl Fn(u32)) {
        for mask in UMASKS {
            with_umask(mask, || f(mask));
        }
    }

    /// Runs `f` with the process umask set to `mask`, restoring the previous one afterwards.
    pub(crate) fn with_umask<T>(mask: u32, f: impl FnOnce() -> T) -> T {
        let _serial = UMASK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = rustix::process::umask(Mode::from_raw_mode(mask));
        struct Restore(Mode);
        impl Drop for Restore {
            fn drop(&mut self) {
                rustix::process::umask(self.0);
            }
        }
        let _restore = Restore(old);
        f()
    }

    /// The permission bits of `path` (not following a final symlink).
    pub(crate) fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o7777
    }

    /// Asserts `path` is a private file (0600) or directory (0700).
    pub(crate) fn assert_private(path: &Path) {
        let meta = std::fs::symlink_metadata(path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
        let want = if meta.is_dir() {
            super::DIR_MODE
        } else {
            super::FILE_MODE
        };
        assert_eq!(
            mode_of(path),
            want,
            "{} has mode {:04o}, expected {want:04o}",
            path.display(),
            mode_of(path)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{assert_private, for_each_umask, mode_of};
    use super::*;

    #[test]
    fn helpers_create_private_files_and_dirs_under_any_umask() {
        for_each_umask(|mask| {
            let t = tempfile::tempdir().unwrap();
            let deep = t.path().join("a/b/c");
            create_dir_all(&deep).unwrap();
            for d in ["a", "a/b", "a/b/c"] {
                assert_private(&t.path().join(d));
            }
            let f = deep.join("f");
            file_options()
                .write(true)
                .create_new(true)
                .open(&f)
                .unwrap();
            assert_private(&f);
            // The same calls without our modes give what the umask allows.
            let plain = t.path().join("plain");
            std::fs::write(&plain, b"x").unwrap();
            assert_eq!(mode_of(&plain), 0o666 & !mask);
        });
    }

    #[test]
    fn own_dirs_and_restrict_tighten_existing_paths() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("d");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, Permissions::from_mode(0o755)).unwrap();
        create_own_dir(&d).unwrap();
        assert_private(&d);
        let f = d.join("f");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        restrict(&f, FILE_MODE).unwrap();
        assert_private(&f);
    }
}
