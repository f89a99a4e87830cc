//! A cheap metadata-only fingerprint of an upper dir, to detect "unchanged" without reading data.
//!
//! ctime moves on every data, metadata and xattr change, so (ino, mode, owner, size, mtime,
//! ctime, nlink, rdev) per entry is enough. The root's ctime and inode are left out because the
//! root dir itself is renamed into place by a restore.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::error::Result;
use super::walk::{ItemKind, Walker};

pub fn fingerprint(upper: &Path) -> Result<String> {
    let mut walker = Walker::new(upper);
    let mut h = Sha256::new();
    while let Some(item) = walker.next_item()? {
        let Some(m) = item
            .meta
            .as_ref()
            .filter(|_| item.kind != ItemKind::OpaqueMarker)
        else {
            continue;
        };
        let is_root = item.rel_path.as_os_str().is_empty();
        h.update((item.tar_path.len() as u64).to_le_bytes());
        h.update(&item.tar_path);
        let mut fields = vec![
            u64::from(m.mode()),
            u64::from(m.uid()),
            u64::from(m.gid()),
            m.size(),
            m.mtime() as u64,
            u64::from(m.mtime_nsec()),
            m.nlink(),
            m.rdev(),
        ];
        if !is_root {
            fields.extend([m.ino(), m.ctime() as u64, u64::from(m.ctime_nsec())]);
        }
        for f in fields {
            h.update(f.to_le_bytes());
        }
        if item.is_dir() {
            let fd = walker.open_dir(&item)?;
            walker.descend(&item, fd, false)?;
        }
    }
    Ok(hex::encode(h.finalize()))
}
