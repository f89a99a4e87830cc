//! Deltas against a tree index: what goes in, what is removed, what the next index says.

use std::fs;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::Path;

use super::*;
use crate::archive::index::IndexBuilder;
use crate::archive::{DELTA_REMOVE_PAX_KEY, PackOptions, pack};

fn now_ns() -> i128 {
    i128::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
}

/// A capture that "started" two seconds from now: nothing written so far counts as racy.
fn settled() -> IndexBuilder {
    IndexBuilder::starting_at(now_ns() + 2_000_000_000)
}

fn opts() -> PackOptions {
    PackOptions {
        level: 3,
        workers: 1,
        live: false,
    }
}

/// (tar path, removal?) of every entry, in order.
fn entries(spool: &Path) -> Vec<(String, bool)> {
    let data = zstd::decode_all(fs::File::open(spool).unwrap()).unwrap();
    let mut ar = tar::Archive::new(data.as_slice());
    let mut out = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let removal = e
            .pax_extensions()
            .unwrap()
            .into_iter()
            .flatten()
            .any(|x| x.unwrap().key() == Ok(DELTA_REMOVE_PAX_KEY));
        let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let mut sink = Vec::new();
        e.read_to_end(&mut sink).unwrap();
        out.push((path, removal));
    }
    out
}

fn whiteout(p: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        rustix::fs::makedev(0, 0),
    )
    .unwrap();
}

fn full(upper: &Path, spool: &Path) -> TreeIndex {
    let mut b = settled();
    pack::pack_to_file(upper, spool, &opts(), None, None, Some(&mut b)).unwrap();
    b.finish()
}

fn keys(index: &TreeIndex) -> Vec<String> {
    index
        .entries
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect()
}

#[test]
fn a_delta_holds_what_changed_and_removes_only_the_tops_of_what_went() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("upper");
    fs::create_dir_all(up.join("a")).unwrap();
    fs::write(up.join("a/keep"), b"keep").unwrap();
    fs::write(up.join("a/edit"), b"v1").unwrap();
    fs::write(up.join("a/gone"), b"gone").unwrap();
    fs::create_dir_all(up.join("d/sub")).unwrap();
    fs::write(up.join("d/sub/x"), b"x").unwrap();
    fs::write(up.join("f2d"), b"file, later a dir").unwrap();
    fs::create_dir(up.join("d2f")).unwrap();
    fs::write(up.join("d2f/z"), b"z").unwrap();
    whiteout(&up.join("old"));
    fs::write(up.join("h1"), b"linked").unwrap();
    fs::hard_link(up.join("h1"), up.join("h2")).unwrap();
    fs::write(up.join("meta"), b"m").unwrap();
    symlink("a", up.join("s")).unwrap();
    let base = full(&up, &dir.path().join("base.tar.zst"));
    assert!(base.entries.values().all(|e| !e.racy));

    fs::write(up.join("a/edit"), b"v2").unwrap();
    fs::remove_file(up.join("a/gone")).unwrap();
    fs::remove_dir_all(up.join("d")).unwrap();
    fs::remove_file(up.join("f2d")).unwrap();
    fs::create_dir(up.join("f2d")).unwrap();
    fs::write(up.join("f2d/in"), b"in").unwrap();
    fs::remove_dir_all(up.join("d2f")).unwrap();
    fs::write(up.join("d2f"), b"now a file").unwrap();
    fs::remove_file(up.join("old")).unwrap();
    fs::write(up.join("old"), b"recreated over the whiteout").unwrap();
    fs::hard_link(up.join("h1"), up.join("h3")).unwrap();
    fs::set_permissions(
        up.join("meta"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    fs::remove_file(up.join("s")).unwrap();
    symlink("d2f", up.join("s")).unwrap();
    fs::write(up.join("n"), b"new").unwrap();
    whiteout(&up.join("hidden"));

    let spool = dir.path().join("delta.tar.zst");
    let (stats, next) = pack_delta(&up, &base, &spool, &opts(), None, None, &settled()).unwrap();
    let got = entries(&spool);
    let written: Vec<&str> = got.iter().filter(|e| !e.1).map(|e| e.0.as_str()).collect();
    let removed: Vec<&str> = got.iter().filter(|e| e.1).map(|e| e.0.as_str()).collect();
    assert_eq!(
        written,
        [
            "./",
            "./.wh.hidden",
            "./a/",
            "./a/edit",
            "./d2f",
            "./f2d/",
            "./f2d/in",
            "./h1",
            "./h2",
            "./h3",
            "./meta",
            "./n",
            "./old",
            "./s",
        ],
        "{got:?}"
    );
    // `d` goes with its subtree; `d2f/z` goes with the directory a file replaced; the whiteout
    // at `old` is replaced by the file there.
    assert_eq!(removed, ["./a/gone", "./d"], "{got:?}");
    assert_eq!((stats.changed, stats.removed), (14, 2));

    let k = keys(&next);
    for present in [
        "./old",
        "./f2d/",
        "./f2d/in",
        "./d2f",
        "./h3",
        "./.wh.hidden",
        "./a/keep",
    ] {
        assert!(k.iter().any(|x| x == present), "{present} missing: {k:?}");
    }
    for absent in [
        "./.wh.old",
        "./d/",
        "./d/sub/",
        "./d/sub/x",
        "./d2f/",
        "./d2f/z",
        "./f2d",
        "./a/gone",
    ] {
        assert!(
            !k.iter().any(|x| x == absent),
            "{absent} still there: {k:?}"
        );
    }
    // The index equals one taken of the tree now, token for token.
    let fresh = TreeIndex::of_tree(&up).unwrap();
    assert_eq!(keys(&fresh), k);
    for (path, e) in &fresh.entries {
        assert_eq!(
            next.entries[path].token,
            e.token,
            "{}",
            String::from_utf8_lossy(path)
        );
    }

    // Nothing changed since: an empty delta.
    let again = dir.path().join("again.tar.zst");
    let (stats, _) = pack_delta(&up, &next, &again, &opts(), None, None, &settled()).unwrap();
    assert_eq!((stats.changed, stats.removed), (0, 0));
    assert!(entries(&again).is_empty());
}

/// An entry whose ctime is too close to the capture's start may hide a change made in the same
/// clock step: it goes into the next delta again even though its token looks the same.
#[test]
fn racy_entries_are_written_again_next_time() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("upper");
    fs::create_dir(&up).unwrap();
    fs::write(up.join("old"), b"settled").unwrap();
    let base = full(&up, &dir.path().join("base.tar.zst"));
    fs::write(up.join("fresh"), b"written just now").unwrap();
    // A capture that starts now: `fresh` (and the root, whose ctime just moved) are racy.
    let now = IndexBuilder::starting_at(now_ns());
    let spool = dir.path().join("d1.tar.zst");
    let (_, next) = pack_delta(&up, &base, &spool, &opts(), None, None, &now).unwrap();
    assert!(next.entries[b"./fresh".as_slice()].racy);
    assert!(!next.entries[b"./old".as_slice()].racy);
    let spool = dir.path().join("d2.tar.zst");
    pack_delta(&up, &next, &spool, &opts(), None, None, &settled()).unwrap();
    let names: Vec<String> = entries(&spool).into_iter().map(|e| e.0).collect();
    assert_eq!(names, ["./", "./fresh"]);
}

#[test]
fn an_index_saves_loads_and_refuses_damage() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("upper");
    fs::create_dir(&up).unwrap();
    fs::write(up.join("f"), b"x").unwrap();
    let mut index = TreeIndex::of_tree(&up).unwrap();
    index.version = "ab".repeat(32);
    let path = dir.path().join("state.idx");
    assert_eq!(TreeIndex::load(&path).unwrap(), None);
    index.save(&path).unwrap();
    assert_eq!(TreeIndex::load(&path).unwrap(), Some(index.clone()));
    let mode = fs::metadata(&path).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let mut bytes = fs::read(&path).unwrap();
    bytes[20] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let err = TreeIndex::load(&path).unwrap_err();
    assert!(err.to_string().contains("state.idx"), "{err}");
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, rustix::fs::XattrFlags::empty()).unwrap();
}

fn remove_xattr(p: &Path, name: &str) {
    rustix::fs::lremovexattr(p, name).unwrap();
}

/// The overlay round trip over a chain: an upper changed twice (deletes, renames, a recreated
/// opaque dir, hard links made and broken across versions, xattr, mode and mtime changes,
/// whiteouts) and captured as a full archive plus two deltas restores exactly as a full archive
/// of its last state does.
#[test]
fn a_base_and_two_real_deltas_restore_exactly_the_last_state() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("upper");
    fs::create_dir_all(up.join("a/deep")).unwrap();
    fs::write(up.join("a/x"), b"x1").unwrap();
    fs::write(up.join("a/deep/y"), vec![7u8; 300_000]).unwrap();
    fs::create_dir_all(up.join("d/sub")).unwrap();
    fs::write(up.join("d/sub/f"), b"in d").unwrap();
    fs::create_dir(up.join("r")).unwrap();
    fs::write(up.join("r/old"), b"old r").unwrap();
    fs::write(up.join("h1"), b"shared").unwrap();
    fs::write(up.join("mode"), b"m").unwrap();
    set_xattr(&up.join("a"), "user.v", b"1");
    whiteout(&up.join("wh"));
    symlink("a/x", up.join("ln")).unwrap();
    let mut spools = Vec::new();
    let mut b = IndexBuilder::new();
    let base = dir.path().join("v1.tar.zst");
    let stats = pack::pack_to_file(&up, &base, &opts(), None, None, Some(&mut b)).unwrap();
    spools.push((base, stats.digest));
    let mut index = b.finish();

    // v2: a rename of a file and of a directory, a recreated dir made opaque, a new hard link
    // to an unchanged file, mode, xattr and mtime changes, a whiteout replaced by a file.
    fs::create_dir(up.join("b")).unwrap();
    fs::rename(up.join("a/x"), up.join("b/x")).unwrap();
    fs::rename(up.join("d"), up.join("e")).unwrap();
    fs::remove_dir_all(up.join("r")).unwrap();
    fs::create_dir(up.join("r")).unwrap();
    fs::write(up.join("r/new"), b"new r").unwrap();
    set_xattr(&up.join("r"), "trusted.overlay.opaque", b"y");
    fs::hard_link(up.join("h1"), up.join("h2")).unwrap();
    fs::set_permissions(up.join("mode"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(up.join("a"), fs::Permissions::from_mode(0o700)).unwrap();
    set_xattr(&up.join("a"), "user.v", b"2");
    fs::remove_file(up.join("wh")).unwrap();
    fs::write(up.join("wh"), b"over the whiteout").unwrap();
    let d1 = dir.path().join("v2.tar.zst");
    let (stats, next) = pack_delta_to_file(&up, &index, &d1, &opts(), None).unwrap();
    assert!(stats.removed >= 3, "{stats:?}");
    spools.push((d1, stats.pack.digest));
    index = next;

    // v3: the original path of the link goes (the other keeps the content), the opaque dir
    // stops being opaque, a file deleted, a dir deleted, a new whiteout, a retargeted symlink.
    fs::remove_file(up.join("h1")).unwrap();
    fs::write(up.join("h3"), b"third").unwrap();
    fs::hard_link(up.join("h3"), up.join("e/h3")).unwrap();
    remove_xattr(&up.join("r"), "trusted.overlay.opaque");
    fs::remove_file(up.join("a/deep/y")).unwrap();
    fs::remove_dir_all(up.join("e/sub")).unwrap();
    whiteout(&up.join("a/gone"));
    fs::remove_file(up.join("ln")).unwrap();
    symlink("b/x", up.join("ln")).unwrap();
    remove_xattr(&up.join("a"), "user.v");
    let d2 = dir.path().join("v3.tar.zst");
    let (stats, _) = pack_delta_to_file(&up, &index, &d2, &opts(), None).unwrap();
    spools.push((d2, stats.pack.digest));

    assert_chain_restores(&spools, &dir.path().join("restored"), &up);
}

/// Live captures (a running container's first pass) of a tree that a thread keeps changing —
/// files rewritten, truncated, deleted, dirs replaced by files and back, hard links made —
/// never fail, and the chain they start, closed by one capture of the still tree, restores
/// exactly that tree.
#[test]
fn live_captures_of_a_changing_tree_chain_to_the_still_tree() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("upper");
    for d in 0..12 {
        fs::create_dir_all(up.join(format!("d{d}"))).unwrap();
        for f in 0..15 {
            fs::write(up.join(format!("d{d}/f{f}")), vec![d as u8 + 1; 20_000]).unwrap();
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let (stop2, ops2, root) = (stop.clone(), ops.clone(), up.clone());
    let mutator = std::thread::spawn(move || {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        while !stop2.load(Ordering::SeqCst) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let d = root.join(format!("d{}", x % 12));
            let f = d.join(format!("f{}", (x >> 8) % 15));
            // Errors are expected: the op raced another (a dir already gone, a file in the way).
            let _ = match (x >> 16) % 7 {
                0 => fs::write(&f, vec![(x >> 24) as u8 | 1; ((x >> 32) % 60_000) as usize]),
                1 => fs::OpenOptions::new()
                    .write(true)
                    .open(&f)
                    .and_then(|h| h.set_len((x >> 24) % 1000)),
                2 => fs::remove_file(&f),
                3 => fs::remove_dir_all(&d).and_then(|()| fs::create_dir(&d)),
                4 => fs::remove_file(&f)
                    .or_else(|_| fs::remove_dir_all(&f))
                    .and_then(|()| fs::create_dir(&f)),
                5 => fs::hard_link(&f, d.join(format!("h{}", (x >> 40) % 5))),
                _ => fs::remove_dir_all(&f).and_then(|()| fs::write(&f, b"was a dir")),
            };
            ops2.fetch_add(1, Ordering::SeqCst);
        }
    });
    let live = PackOptions {
        live: true,
        ..opts()
    };
    let mut spools = Vec::new();
    let base = dir.path().join("base.tar.zst");
    let captured =
        crate::archive::pack_capture(&up, &base, &live, None, None, crate::archive::Capture::Full)
            .unwrap();
    spools.push((base, captured.stats.digest));
    let mut index = captured.index;
    for round in 0..4 {
        // Each capture starts with the mutator demonstrably at work.
        let before = ops.load(Ordering::SeqCst);
        while ops.load(Ordering::SeqCst) < before + 40 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let spool = dir.path().join(format!("live{round}.tar.zst"));
        let c = crate::archive::pack_capture(
            &up,
            &spool,
            &live,
            None,
            None,
            crate::archive::Capture::Delta(&index),
        )
        .unwrap();
        spools.push((spool, c.stats.digest));
        index = c.index;
    }
    stop.store(true, Ordering::SeqCst);
    mutator.join().unwrap();
    assert!(
        ops.load(Ordering::SeqCst) > 100,
        "the tree changed during the captures"
    );
    let still = dir.path().join("still.tar.zst");
    let c = crate::archive::pack_capture(
        &up,
        &still,
        &opts(),
        None,
        None,
        crate::archive::Capture::Delta(&index),
    )
    .unwrap();
    spools.push((still, c.stats.digest));

    assert_chain_restores(&spools, &dir.path().join("restored"), &up);
}

/// Restores the chain `spools` into `target` and checks it equals what a restore of `up` gives.
fn assert_chain_restores(spools: &[(std::path::PathBuf, String)], target: &Path, up: &Path) {
    use crate::archive::tests::{expected_after_restore, root_opts, snapshot};
    crate::archive::unpack_chain_files(spools, target, &root_opts(), None).unwrap();
    let want = expected_after_restore(up, crate::archive::XattrNs::Trusted);
    let got = snapshot(target);
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    for (k, node) in &want {
        assert_eq!(node, &got[k], "entry {}", k.display());
    }
}
