//! Depth-first walk of an upper dir in archive order.
//!
//! Siblings are sorted by their tar name (`name/` for directories, `.wh.<name>` for whiteouts),
//! which makes the depth-first order equal to a global byte sort of tar paths while holding
//! only one directory listing per level in memory.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use super::error::{ArchiveError, Result};

/// Name of the entry that marks its parent directory opaque.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Prefix of whiteout entries.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";

/// What an item is, as far as the archive is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    /// Any real inode that is stored as itself (dir, file, symlink, device, fifo).
    Node,
    /// A char 0/0 device: stored as `.wh.<name>`.
    Whiteout,
    /// Synthetic `.wh..wh..opq` entry of an opaque directory.
    OpaqueMarker,
    /// A socket: skipped.
    Socket,
}

/// lstat of one entry, taken relative to its parent's directory fd.
#[derive(Debug, Clone, Copy)]
pub struct Meta(rustix::fs::Stat);

// Field widths of `struct stat` differ between architectures; the casts are exact on all of them.
#[allow(clippy::unnecessary_cast)]
impl Meta {
    pub fn file_type(&self) -> FileType {
        FileType::from_raw_mode(self.0.st_mode as _)
    }
    pub fn is_dir(&self) -> bool {
        self.file_type() == FileType::Directory
    }
    pub fn mode(&self) -> u32 {
        self.0.st_mode as u32
    }
    pub fn uid(&self) -> u32 {
        self.0.st_uid as u32
    }
    pub fn gid(&self) -> u32 {
        self.0.st_gid as u32
    }
    pub fn size(&self) -> u64 {
        self.0.st_size as u64
    }
    pub fn blocks(&self) -> u64 {
        self.0.st_blocks as u64
    }
    pub fn mtime(&self) -> i64 {
        self.0.st_mtime as i64
    }
    pub fn mtime_nsec(&self) -> u32 {
        self.0.st_mtime_nsec as u32
    }
    pub fn ctime(&self) -> i64 {
        self.0.st_ctime as i64
    }
    pub fn ctime_nsec(&self) -> u32 {
        self.0.st_ctime_nsec as u32
    }
    pub fn nlink(&self) -> u64 {
        self.0.st_nlink as u64
    }
    pub fn dev(&self) -> u64 {
        self.0.st_dev as u64
    }
    pub fn ino(&self) -> u64 {
        self.0.st_ino as u64
    }
    pub fn rdev(&self) -> u64 {
        self.0.st_rdev as u64
    }
}

/// One walked item.
#[derive(Debug)]
pub struct Item {
    pub kind: ItemKind,
    /// Absolute path on disk (the parent dir for the opaque marker); for messages and for the
    /// xattrs of special files only — contents are always reached through directory fds.
    pub fs_path: PathBuf,
    /// Path relative to the root (empty for the root itself).
    pub rel_path: PathBuf,
    /// Tar path: `./`, `./dir/`, `./dir/file`, `./dir/.wh.gone`.
    pub tar_path: Vec<u8>,
    /// lstat result (absent for the opaque marker).
    pub meta: Option<Meta>,
    /// The directory that listed this item (`None` for the root) and the item's name in it.
    parent: Option<Arc<OwnedFd>>,
    name: OsString,
}

impl Item {
    pub fn is_dir(&self) -> bool {
        self.kind == ItemKind::Node && self.meta.as_ref().is_some_and(Meta::is_dir)
    }

    /// Opens this item relative to the directory that listed it, never following a symlink:
    /// a path component swapped for a symlink after the listing cannot redirect the read.
    fn open(&self, root: &OwnedFd, flags: OFlags) -> Result<OwnedFd> {
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let res = match &self.parent {
            Some(dir) => {
                rustix::fs::openat(dir.as_fd(), self.name.as_os_str(), flags, Mode::empty())
            }
            None => rustix::fs::openat(root.as_fd(), ".", flags, Mode::empty()),
        };
        res.map_err(|e| ArchiveError::Io {
            op: "open",
            path: self.fs_path.clone(),
            source: e.into(),
        })
    }

    /// The target of a symlink item, read relative to its directory.
    pub fn read_link(&self) -> Result<OsString> {
        let Some(dir) = &self.parent else {
            return Err(ArchiveError::Io {
                op: "read symlink",
                path: self.fs_path.clone(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            });
        };
        rustix::fs::readlinkat(dir.as_fd(), self.name.as_os_str(), Vec::new())
            .map(|c| OsString::from(OsStr::from_bytes(c.as_bytes())))
            .map_err(|e| ArchiveError::Io {
                op: "read symlink",
                path: self.fs_path.clone(),
                source: e.into(),
            })
    }
}

struct Child {
    key: Vec<u8>,
    name: OsString,
    kind: ItemKind,
    meta: Option<Meta>,
}

struct Frame {
    fd: Arc<OwnedFd>,
    fs_path: PathBuf,
    rel_path: PathBuf,
    tar_prefix: Vec<u8>,
    children: std::vec::IntoIter<Child>,
}

/// Iterative depth-first walker; the caller decides whether to descend into each directory.
///
/// Everything below the root is reached through directory fds (`*at` calls on single names
/// with `O_NOFOLLOW`), so a tree that changes while it is walked (a live upper dir) can make a
/// sync fail, but never make it read outside the root.
pub struct Walker {
    root: PathBuf,
    root_fd: Option<OwnedFd>,
    stack: Vec<Frame>,
    /// See [`super::PackOptions::live`]: entries gone by the time they are looked at are skipped.
    live: bool,
}

impl std::fmt::Debug for Walker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Walker")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl Walker {
    pub fn new(root: &Path) -> Self {
        Walker {
            root: root.to_owned(),
            root_fd: None,
            stack: Vec::new(),
            live: false,
        }
    }

    /// A walker of a tree that may change under it (see [`super::PackOptions::live`]).
    pub fn live(root: &Path, live: bool) -> Self {
        let mut w = Self::new(root);
        w.live = live;
        w
    }

    pub fn is_live(&self) -> bool {
        self.live
    }

    /// The next item in archive order.
    pub fn next_item(&mut self) -> Result<Option<Item>> {
        if self.root_fd.is_none() {
            let fd = rustix::fs::open(
                &self.root,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| ArchiveError::Io {
                op: "walk",
                path: self.root.clone(),
                source: e.into(),
            })?;
            let meta = rustix::fs::fstat(&fd).map_err(|e| ArchiveError::Io {
                op: "stat",
                path: self.root.clone(),
                source: e.into(),
            })?;
            self.root_fd = Some(fd);
            return Ok(Some(Item {
                kind: ItemKind::Node,
                fs_path: self.root.clone(),
                rel_path: PathBuf::new(),
                tar_path: b"./".to_vec(),
                meta: Some(Meta(meta)),
                parent: None,
                name: OsString::new(),
            }));
        }
        while let Some(frame) = self.stack.last_mut() {
            let Some(child) = frame.children.next() else {
                self.stack.pop();
                continue;
            };
            let mut tar_path = frame.tar_prefix.clone();
            tar_path.extend_from_slice(&child.key);
            let (fs_path, rel_path) = if child.kind == ItemKind::OpaqueMarker {
                (frame.fs_path.clone(), frame.rel_path.clone())
            } else {
                (
                    frame.fs_path.join(&child.name),
                    frame.rel_path.join(&child.name),
                )
            };
            return Ok(Some(Item {
                kind: child.kind,
                fs_path,
                rel_path,
                tar_path,
                meta: child.meta,
                parent: Some(Arc::clone(&frame.fd)),
                name: child.name,
            }));
        }
        Ok(None)
    }

    fn root_fd(&self) -> Result<&OwnedFd> {
        self.root_fd.as_ref().ok_or_else(|| ArchiveError::Io {
            op: "walk",
            path: self.root.clone(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })
    }

    /// Opens a regular file item for reading.
    /// Non-blocking, so a FIFO swapped in after the listing cannot hang the read.
    pub fn open_file(&self, item: &Item) -> Result<std::fs::File> {
        item.open(self.root_fd()?, OFlags::RDONLY | OFlags::NONBLOCK)
            .map(std::fs::File::from)
    }

    /// Opens a directory item (its fd is what [`Self::descend`] lists).
    pub fn open_dir(&self, item: &Item) -> Result<OwnedFd> {
        item.open(self.root_fd()?, OFlags::RDONLY | OFlags::DIRECTORY)
    }

    /// Lists a directory item through `fd` (from [`Self::open_dir`]) so that its children come
    /// next; `opaque` adds the marker entry.
    pub fn descend(&mut self, dir: &Item, fd: OwnedFd, opaque: bool) -> Result<()> {
        let mut children = Vec::new();
        let list_err = |e: rustix::io::Errno| ArchiveError::Io {
            op: "read directory",
            path: dir.fs_path.clone(),
            source: e.into(),
        };
        let mut listing = rustix::fs::Dir::read_from(&fd).map_err(list_err)?;
        while let Some(dent) = listing.read() {
            let dent = dent.map_err(list_err)?;
            let cname = dent.file_name();
            let bytes = cname.to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            let name = OsStr::from_bytes(bytes).to_owned();
            let stat = match rustix::fs::statat(&fd, cname, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(rustix::io::Errno::NOENT) if self.live => continue,
                Err(e) => {
                    return Err(ArchiveError::Io {
                        op: "stat",
                        path: dir.fs_path.join(&name),
                        source: e.into(),
                    });
                }
            };
            let meta = Meta(stat);
            if bytes.starts_with(WHITEOUT_PREFIX) {
                return Err(ArchiveError::ReservedName {
                    path: dir.fs_path.join(&name),
                });
            }
            let (kind, key) = match meta.file_type() {
                FileType::CharacterDevice if meta.rdev() == 0 => {
                    (ItemKind::Whiteout, [WHITEOUT_PREFIX, bytes].concat())
                }
                FileType::Directory => (ItemKind::Node, [bytes, b"/"].concat()),
                FileType::Socket => (ItemKind::Socket, bytes.to_vec()),
                _ => (ItemKind::Node, bytes.to_vec()),
            };
            children.push(Child {
                key,
                name,
                kind,
                meta: Some(meta),
            });
        }
        if opaque {
            children.push(Child {
                key: OPAQUE_MARKER.to_vec(),
                name: OsString::new(),
                kind: ItemKind::OpaqueMarker,
                meta: None,
            });
        }
        children.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        self.stack.push(Frame {
            fd: Arc::new(fd),
            fs_path: dir.fs_path.clone(),
            rel_path: dir.rel_path.clone(),
            tar_prefix: dir.tar_path.clone(),
            children: children.into_iter(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Read;

    fn walk_all(root: &Path) -> Vec<Vec<u8>> {
        let mut w = Walker::new(root);
        let mut out = Vec::new();
        while let Some(item) = w.next_item().unwrap() {
            if item.is_dir() {
                let fd = w.open_dir(&item).unwrap();
                w.descend(&item, fd, false).unwrap();
            }
            out.push(item.tar_path);
        }
        out
    }

    #[test]
    fn order_equals_global_byte_sort() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for d in ["a", "a/c", "a-b", "z"] {
            fs::create_dir(r.join(d)).unwrap();
        }
        for f in ["a.b", "a/c.d", "a/c/e", "a0", "A", "a/c-"] {
            fs::write(r.join(f), b"x").unwrap();
        }
        let got = walk_all(r);
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(got, sorted);
        assert_eq!(got[0], b"./");
        assert_eq!(got.len(), 11);
        // directories come before their contents
        let pos = |p: &[u8]| got.iter().position(|g| g == p).unwrap();
        assert!(pos(b"./a/") < pos(b"./a/c/"));
        assert!(pos(b"./a/c/") < pos(b"./a/c/e"));
    }

    #[test]
    fn reserved_names_are_refused() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join(".wh.foo"), b"").unwrap();
        let mut w = Walker::new(t.path());
        let root = w.next_item().unwrap().unwrap();
        let fd = w.open_dir(&root).unwrap();
        let err = w.descend(&root, fd, false).unwrap_err();
        assert!(
            matches!(err, ArchiveError::ReservedName { ref path } if path.ends_with(".wh.foo"))
        );
    }

    /// A walker that has listed `root` (its next item is the root's first child).
    fn listing(root: &Path) -> Walker {
        let mut w = Walker::new(root);
        let top = w.next_item().unwrap().unwrap();
        let fd = w.open_dir(&top).unwrap();
        w.descend(&top, fd, false).unwrap();
        w
    }

    /// A directory swapped for a symlink between its listing and its descent is refused,
    /// not followed.
    #[test]
    fn a_directory_swapped_for_a_symlink_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let (root, outside) = (t.path().join("root"), t.path().join("outside"));
        fs::create_dir_all(root.join("d")).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), b"host data").unwrap();
        let mut w = listing(&root);
        let d = w.next_item().unwrap().unwrap();
        assert_eq!(d.tar_path, b"./d/");
        fs::rename(root.join("d"), root.join("d.old")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
        let err = w.open_dir(&d).unwrap_err();
        assert!(
            matches!(err, ArchiveError::Io { ref path, .. } if path.ends_with("d")),
            "{err:?}"
        );
    }

    /// A file is read through the directory that listed it: swapping a parent directory for a
    /// symlink to elsewhere after the listing still reads the listed file, never the other one.
    #[test]
    fn files_are_read_through_the_listing_directory() {
        let t = tempfile::tempdir().unwrap();
        let (root, outside) = (t.path().join("root"), t.path().join("outside"));
        fs::create_dir_all(root.join("d")).unwrap();
        fs::write(root.join("d/f"), b"layer data").unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("f"), b"host data").unwrap();
        let mut w = listing(&root);
        let d = w.next_item().unwrap().unwrap();
        let fd = w.open_dir(&d).unwrap();
        w.descend(&d, fd, false).unwrap();
        let f = w.next_item().unwrap().unwrap();
        assert_eq!(f.tar_path, b"./d/f");
        fs::rename(root.join("d"), root.join("d.old")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
        let mut got = String::new();
        w.open_file(&f).unwrap().read_to_string(&mut got).unwrap();
        assert_eq!(got, "layer data");
    }

    /// A file swapped for a symlink after the listing is refused.
    #[test]
    fn a_file_swapped_for_a_symlink_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("f"), b"layer data").unwrap();
        fs::write(t.path().join("secret"), b"host data").unwrap();
        let mut w = listing(&root);
        let f = w.next_item().unwrap().unwrap();
        fs::remove_file(root.join("f")).unwrap();
        std::os::unix::fs::symlink(t.path().join("secret"), root.join("f")).unwrap();
        assert!(w.open_file(&f).is_err());
    }
}
