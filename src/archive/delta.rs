//! Delta archives: what changed in an upper dir since a version whose [`TreeIndex`] is known.
//!
//! A delta is an archive of the same form as a full one (same entry encoding and order, same
//! content address), holding only what a restore of the previous version needs to become this
//! one: every entry whose token changed (new, modified, metadata-only, a new link count — all of
//! a changed inode's paths, so hard links stay shared), and a *removal* entry
//! ([`super::DELTA_REMOVE_PAX_KEY`]) for every path the previous version had and this one has
//! not. A removal is written only at the top of what goes: a removed directory takes its
//! contents along, and a path replaced by an entry of another kind is replaced by that entry.
//! Applied on the previous version, a directory entry updates the directory in place; any
//! other entry replaces what was there.
//!
//! Two walks: the first lists what exists now (to know what is gone), the second writes what
//! changed, decided against the index entry by entry. A tree that changes in between (a running
//! container; the caller freezes it for an exact instant) yields a delta of some state in
//! between, and the new index records exactly what the delta holds, so whatever it missed
//! counts as changed next time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::Path;

use super::error::Result;
use super::index::{Entry, IndexBuilder, Token, TreeIndex};
use super::pack::{TreeStats, marker, pack_with, write_node};
use super::tarout::{EntryMeta, TarOut};
use super::walk::{ItemKind, OPAQUE_MARKER, WHITEOUT_PREFIX, Walker};
use super::{PackOptions, PackStats, SpoolObserver};

/// What [`pack_delta_to_file`] wrote besides the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaStats {
    pub pack: PackStats,
    /// Entries written because they changed (removals not counted).
    pub changed: u64,
    /// Removal entries written.
    pub removed: u64,
}

/// The filesystem path (relative, no `./`, no trailing slash, whiteouts by their plain name) of
/// a tar path.
fn fs_path(tar_path: &[u8]) -> Vec<u8> {
    let p = tar_path.strip_prefix(b"./").unwrap_or(tar_path);
    let p = p.strip_suffix(b"/").unwrap_or(p);
    let (dir, name) = match p.iter().rposition(|b| *b == b'/') {
        Some(i) => (&p[..=i], &p[i + 1..]),
        None => (&p[..0], p),
    };
    let name = name.strip_prefix(WHITEOUT_PREFIX).unwrap_or(name);
    [dir, name].concat()
}

fn parent(fs: &[u8]) -> Option<&[u8]> {
    fs.iter().rposition(|b| *b == b'/').map(|i| &fs[..i])
}

/// Filesystem path → whether it is a directory.
type Now = HashMap<Vec<u8>, bool>;
/// A hard-linked inode: whether any of its paths changed, and its tar paths.
type Linked = (bool, Vec<Vec<u8>>);

/// What exists now, by filesystem path (whether it is a directory; sockets left out, as an
/// archive has no entry for them), and the tar paths of every hard-linked inode with a changed
/// path: such an inode is written whole (its first path as the file, the others as links), so
/// the restored paths share one inode again.
fn list_now(upper: &Path, prev: &TreeIndex, live: bool) -> Result<(Now, HashSet<Vec<u8>>)> {
    let mut now = HashMap::new();
    let mut inodes: HashMap<(u64, u64), Linked> = HashMap::new();
    let mut walker = Walker::live(upper, live);
    while let Some(item) = walker.next_item()? {
        if !matches!(item.kind, ItemKind::Node | ItemKind::Whiteout) {
            continue;
        }
        let is_dir = item.is_dir();
        if let Some(m) = &item.meta
            && !is_dir
            && m.nlink() > 1
        {
            let (changed, paths) = inodes.entry((m.dev(), m.ino())).or_default();
            *changed |= prev.changed(&item.tar_path, &Token::of(m));
            paths.push(item.tar_path.clone());
        }
        if is_dir {
            let fd = match walker.open_dir(&item) {
                Ok(fd) => fd,
                Err(_) if live => continue,
                Err(e) => return Err(e),
            };
            walker.descend(&item, fd, false)?;
        }
        now.insert(fs_path(&item.tar_path), is_dir);
    }
    let relinked = inodes
        .into_values()
        .filter(|(changed, _)| *changed)
        .flat_map(|(_, paths)| paths)
        .collect();
    Ok((now, relinked))
}

/// The tar paths an entry at the same filesystem path could have had: `name`, `name/` and
/// `.wh.name`.
fn same_fs_keys(tar_path: &[u8]) -> [Vec<u8>; 3] {
    let p = tar_path.strip_suffix(b"/").unwrap_or(tar_path);
    let (dir, name) = match p.iter().rposition(|b| *b == b'/') {
        Some(i) => (&p[..=i], &p[i + 1..]),
        None => (&p[..0], p),
    };
    let name = name.strip_prefix(WHITEOUT_PREFIX).unwrap_or(name);
    [
        [dir, name].concat(),
        [dir, name, b"/"].concat(),
        [dir, WHITEOUT_PREFIX, name].concat(),
    ]
}

/// Tar paths of the previous version to write removal entries for, in order.
fn removals(prev: &TreeIndex, now: &Now) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut gone = Vec::new();
    let mut removed: HashSet<Vec<u8>> = HashSet::new();
    for tar_path in prev.entries.keys() {
        let fs = fs_path(tar_path);
        if fs.is_empty() || now.contains_key(&fs) {
            continue;
        }
        // Only where the parent is still a directory: otherwise the parent's removal or
        // replacement takes this along.
        let parent_is_dir = match parent(&fs) {
            None => true,
            Some(p) => now.get(p) == Some(&true) && !removed.contains(p),
        };
        if parent_is_dir {
            removed.insert(fs.clone());
            gone.push((tar_path.clone(), fs));
        }
    }
    gone
}

/// Archives what changed in `upper` since the version `prev` describes into `spool`, and returns
/// the index of the new version (its `version` left for the caller to set once it is stored).
/// Blocking: call from `spawn_blocking`.
pub fn pack_delta_to_file(
    upper: &Path,
    prev: &TreeIndex,
    spool: &Path,
    opts: &PackOptions,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Result<(DeltaStats, TreeIndex)> {
    pack_delta(
        upper,
        prev,
        spool,
        opts,
        progress,
        None,
        &IndexBuilder::new(),
    )
}

/// [`pack_delta_to_file`] for a capture that started as `capture` says (racy marks).
pub(super) fn pack_delta(
    upper: &Path,
    prev: &TreeIndex,
    spool: &Path,
    opts: &PackOptions,
    progress: Option<&(dyn Fn(u64) + Sync)>,
    observer: Option<&dyn SpoolObserver>,
    capture: &IndexBuilder,
) -> Result<(DeltaStats, TreeIndex)> {
    let (now, relinked) = list_now(upper, prev, opts.live)?;
    // A live tree may change between the two walks: its removals are decided by what the
    // writing walk found, and written after everything else.
    let gone = if opts.live {
        Vec::new()
    } else {
        removals(prev, &now)
    };
    let mut counts = (0u64, 0u64);
    let mut next_index: BTreeMap<Vec<u8>, Entry> = prev.entries.clone();
    let pack = pack_with(spool, opts, progress, observer, |out| {
        write_delta(
            upper,
            prev,
            &gone,
            &relinked,
            capture,
            out,
            &mut next_index,
            &mut counts,
            opts.live,
        )
    })?;
    let index = TreeIndex {
        version: String::new(),
        entries: next_index,
    };
    Ok((
        DeltaStats {
            pack,
            changed: counts.0,
            removed: counts.1,
        },
        index,
    ))
}

#[allow(clippy::too_many_arguments)]
fn write_delta<W: Write>(
    upper: &Path,
    prev: &TreeIndex,
    gone: &[(Vec<u8>, Vec<u8>)],
    relinked: &HashSet<Vec<u8>>,
    capture: &IndexBuilder,
    out: &mut TarOut<'_, W>,
    next: &mut BTreeMap<Vec<u8>, Entry>,
    counts: &mut (u64, u64),
    live: bool,
) -> Result<TreeStats> {
    let mut stats = TreeStats::default();
    let mut gone = gone.iter().peekable();
    let mut links = HashMap::new();
    let mut walker = Walker::live(upper, live);
    // What this walk found, for the removals of a live tree (kept only in a live walk).
    let mut seen: Now = HashMap::new();
    // Directories written in this delta: their opaque marker goes with them.
    let mut written_dirs: HashSet<Vec<u8>> = HashSet::new();
    let remove = |out: &mut TarOut<'_, W>,
                  tar_path: &[u8],
                  fs: &[u8],
                  next: &mut BTreeMap<Vec<u8>, Entry>|
     -> Result<()> {
        let path = [b"./".as_slice(), fs].concat();
        out.header(&EntryMeta {
            remove: true,
            ..marker(&path)
        })?;
        // The removed entry and everything under it leave the index.
        let dir_prefix = [tar_path.strip_suffix(b"/").unwrap_or(tar_path), b"/"].concat();
        next.retain(|k, _| k.as_slice() != tar_path && !k.starts_with(&dir_prefix));
        Ok(())
    };
    while let Some(item) = walker.next_item()? {
        while let Some((tar_path, fs)) =
            gone.next_if(|(t, _)| t.as_slice() < item.tar_path.as_slice())
        {
            remove(out, tar_path, fs, next)?;
            counts.1 += 1;
        }
        match item.kind {
            ItemKind::Socket => {
                stats.skipped_sockets.push(item.rel_path.clone());
            }
            ItemKind::OpaqueMarker => {
                // Listed only under a directory written with its opaque flag.
                let dir = item
                    .tar_path
                    .strip_suffix(OPAQUE_MARKER)
                    .unwrap_or(&item.tar_path);
                if written_dirs.contains(dir) {
                    out.header(&marker(&item.tar_path))?;
                    stats.entries += 1;
                }
            }
            ItemKind::Whiteout | ItemKind::Node => {
                let Some(meta) = item.meta.as_ref() else {
                    continue;
                };
                let token = Token::of(meta);
                let is_dir = item.is_dir();
                let changed =
                    prev.changed(&item.tar_path, &token) || relinked.contains(&item.tar_path);
                if !changed {
                    let listed = !is_dir || write_node(&mut walker, &item, out, &mut links, false)?;
                    if live && listed {
                        seen.insert(fs_path(&item.tar_path), is_dir);
                    }
                    continue;
                }
                if item.kind == ItemKind::Whiteout {
                    out.header(&marker(&item.tar_path))?;
                } else {
                    if is_dir {
                        written_dirs.insert(item.tar_path.clone());
                    }
                    if !write_node(&mut walker, &item, out, &mut links, true)? {
                        continue;
                    }
                }
                if live {
                    seen.insert(fs_path(&item.tar_path), is_dir);
                }
                // What this entry replaces leaves the index: another kind at the same name,
                // and a directory's subtree when a non-directory took its place.
                for key in same_fs_keys(&item.tar_path) {
                    next.remove(&key);
                }
                if !is_dir {
                    let dir_prefix = [item.tar_path.as_slice(), b"/"].concat();
                    next.retain(|k, _| !k.starts_with(&dir_prefix));
                }
                next.insert(
                    item.tar_path.clone(),
                    Entry {
                        token,
                        racy: capture.is_racy(&token),
                    },
                );
                stats.entries += 1;
                counts.0 += 1;
            }
        }
    }
    for (tar_path, fs) in gone {
        remove(out, tar_path, fs, next)?;
        counts.1 += 1;
    }
    if live {
        for (tar_path, fs) in removals(prev, &seen) {
            remove(out, &tar_path, &fs, next)?;
            counts.1 += 1;
        }
    }
    Ok(stats)
}

#[cfg(test)]
#[path = "delta_tests.rs"]
mod tests;
