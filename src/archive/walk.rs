//! Depth-first walk of an upper dir in archive order.
//!
//! Siblings are sorted by their tar name (`name/` for directories, `.wh.<name>` for whiteouts),
//! which makes the depth-first order equal to a global byte sort of tar paths while holding
//! only one directory listing per level in memory.

use std::ffi::OsString;
use std::fs::{self, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::error::{ArchiveError, Result, io_err};

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

/// One walked item.
#[derive(Debug)]
pub struct Item {
    pub kind: ItemKind,
    /// Absolute path on disk (the parent dir for the opaque marker).
    pub fs_path: PathBuf,
    /// Path relative to the root (empty for the root itself).
    pub rel_path: PathBuf,
    /// Tar path: `./`, `./dir/`, `./dir/file`, `./dir/.wh.gone`.
    pub tar_path: Vec<u8>,
    /// lstat result (absent for the opaque marker).
    pub meta: Option<Metadata>,
}

impl Item {
    pub fn is_dir(&self) -> bool {
        self.kind == ItemKind::Node && self.meta.as_ref().is_some_and(|m| m.is_dir())
    }
}

struct Child {
    key: Vec<u8>,
    name: OsString,
    kind: ItemKind,
    meta: Option<Metadata>,
}

struct Frame {
    fs_path: PathBuf,
    rel_path: PathBuf,
    tar_prefix: Vec<u8>,
    children: std::vec::IntoIter<Child>,
}

/// Iterative depth-first walker; the caller decides whether to descend into each directory.
pub struct Walker {
    root: PathBuf,
    root_pending: bool,
    stack: Vec<Frame>,
}

impl Walker {
    pub fn new(root: &Path) -> Self {
        Walker {
            root: root.to_owned(),
            root_pending: true,
            stack: Vec::new(),
        }
    }

    /// The next item in archive order.
    pub fn next_item(&mut self) -> Result<Option<Item>> {
        if self.root_pending {
            self.root_pending = false;
            let meta = fs::symlink_metadata(&self.root).map_err(io_err("stat", &self.root))?;
            if !meta.is_dir() {
                return Err(ArchiveError::Io {
                    op: "walk",
                    path: self.root.clone(),
                    source: std::io::Error::from(std::io::ErrorKind::NotADirectory),
                });
            }
            return Ok(Some(Item {
                kind: ItemKind::Node,
                fs_path: self.root.clone(),
                rel_path: PathBuf::new(),
                tar_path: b"./".to_vec(),
                meta: Some(meta),
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
            }));
        }
        Ok(None)
    }

    /// Lists a directory item so that its children come next; `opaque` adds the marker entry.
    pub fn descend(&mut self, dir: &Item, opaque: bool) -> Result<()> {
        let mut children = Vec::new();
        let rd = fs::read_dir(&dir.fs_path).map_err(io_err("read directory", &dir.fs_path))?;
        for dent in rd {
            let dent = dent.map_err(io_err("read directory", &dir.fs_path))?;
            let name = dent.file_name();
            let path = dir.fs_path.join(&name);
            let meta = dent.metadata().map_err(io_err("stat", &path))?;
            let bytes = name.as_bytes();
            if bytes.starts_with(WHITEOUT_PREFIX) {
                return Err(ArchiveError::ReservedName { path });
            }
            let ft = meta.file_type();
            let (kind, key) = if ft.is_char_device() && meta.rdev() == 0 {
                (ItemKind::Whiteout, [WHITEOUT_PREFIX, bytes].concat())
            } else if ft.is_dir() {
                (ItemKind::Node, [bytes, b"/"].concat())
            } else if ft.is_socket() {
                (ItemKind::Socket, bytes.to_vec())
            } else {
                (ItemKind::Node, bytes.to_vec())
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

    fn walk_all(root: &Path) -> Vec<Vec<u8>> {
        let mut w = Walker::new(root);
        let mut out = Vec::new();
        while let Some(item) = w.next_item().unwrap() {
            if item.is_dir() {
                w.descend(&item, false).unwrap();
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
        let err = w.descend(&root, false).unwrap_err();
        assert!(
            matches!(err, ArchiveError::ReservedName { ref path } if path.ends_with(".wh.foo"))
        );
    }
}
