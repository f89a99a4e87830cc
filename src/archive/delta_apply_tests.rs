//! Delta archives applied onto their base: the result must equal the full archive of the final
//! state, and chains that do not fit (or were tampered with) must fail without touching the
//! target. Run as root (trusted.* xattrs, whiteout devices).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::EntryType;

use super::testkit::{self, RawTar, header};
use super::tests::{assert_no_staging, get_xattr, root_opts, snapshot};
use super::*;

type Xattrs<'a> = &'a [(&'a str, &'a [u8])];

/// Hand-built layer with explicit metadata on every entry (PAX mtime with nanoseconds).
struct Layer(RawTar);

impl Layer {
    fn new() -> Self {
        Layer(RawTar::new())
    }

    fn pax_meta(&mut self, mtime: (i64, u32), xattrs: Xattrs<'_>, protattr: Option<&[u8]>) {
        let mtime = format!("{}.{:09}", mtime.0, mtime.1);
        let mut recs: Vec<(Vec<u8>, Vec<u8>)> = vec![(b"mtime".to_vec(), mtime.into_bytes())];
        for (k, v) in xattrs {
            recs.push((format!("{XATTR_PAX_PREFIX}{k}").into_bytes(), v.to_vec()));
        }
        if let Some(p) = protattr {
            recs.push((PROTATTR_PAX_KEY.as_bytes().to_vec(), p.to_vec()));
        }
        let refs: Vec<(&[u8], &[u8])> = recs
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        self.0.pax(&refs);
    }

    fn dir(
        &mut self,
        path: &str,
        mode: u32,
        mtime: (i64, u32),
        xattrs: Xattrs<'_>,
        protattr: Option<&[u8]>,
    ) -> &mut Self {
        self.pax_meta(mtime, xattrs, protattr);
        let mut h = header(path.as_bytes(), EntryType::Directory, 0);
        h.set_mode(mode);
        self.0.raw(h, &[]);
        self
    }

    fn file(&mut self, path: &str, data: &[u8], mtime: (i64, u32)) -> &mut Self {
        self.pax_meta(mtime, &[], None);
        self.0.file(path, data);
        self
    }

    fn symlink(&mut self, path: &str, target: &str, mtime: (i64, u32)) -> &mut Self {
        self.pax_meta(mtime, &[], None);
        self.0.link(EntryType::Symlink, path, target);
        self
    }

    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.0.link(EntryType::Link, path, target);
        self
    }

    /// An empty `.wh.<name>` entry (or `.wh..wh..opq` marker).
    fn whiteout(&mut self, path: &str) -> &mut Self {
        self.0.file(path, b"");
        self
    }

    fn remove(&mut self, path: &str) -> &mut Self {
        self.0.pax(&[(DELTA_REMOVE_PAX_KEY.as_bytes(), b"1")]);
        self.0.file(path, b"");
        self
    }

    /// Writes the compressed layer to `dir/name`; returns its path and digest.
    fn spool(&mut self, dir: &Path, name: &str) -> (PathBuf, String) {
        self.0.end();
        let z = testkit::zstd(&self.0.buf);
        let path = dir.join(name);
        fs::write(&path, &z).unwrap();
        (path, hex::encode(Sha256::digest(&z)))
    }
}

const T: (i64, u32) = (1_600_000_000, 500);
const ROOT_T: (i64, u32) = (1_700_000_000, 1);
const PAR_T: (i64, u32) = (1_650_000_000, 123_456_789);

fn base() -> Layer {
    let mut l = Layer::new();
    l.dir("./", 0o755, ROOT_T, &[], None)
        .whiteout("./.wh.back")
        .file("./a.txt", b"v1", (1_600_000_001, 11))
        .file("./created", b"tmp", T)
        .dir("./d2f/", 0o755, T, &[], None)
        .file("./d2f/x", b"x", T)
        .file("./f2d", b"f", T)
        .file("./keep.txt", b"keep", (1_600_000_002, 2))
        .dir(
            "./meta/",
            0o755,
            T,
            &[("user.a", b"1"), ("user.b", b"2")],
            Some(b"i"),
        )
        .file("./meta/child", b"c", (1_600_000_003, 3))
        .dir("./nop/", 0o755, T, &[], None)
        .whiteout("./nop/.wh..wh..opq")
        .file("./nop/f", b"n", T)
        .dir("./op/", 0o755, T, &[], None)
        .file("./op/keep", b"k", T)
        .dir("./par/", 0o755, PAR_T, &[], None)
        .file("./par/old", b"old", T)
        .dir("./rmdir/", 0o755, T, &[], None)
        .symlink("./rmdir/link", "/etc", T)
        .dir("./rmdir/sub/", 0o700, T, &[], None)
        .file("./rmdir/sub/f", b"f", T)
        .symlink("./sl", "a.txt", T);
    l
}

/// File changed, file removed, whiteout added, whiteout replaced by a file, dir removed
/// recursively, dir made opaque, dir updated in place (mode, xattrs, protattr dropped) while a
/// child is added, and `par/` changed without an entry of its own (root too).
fn delta1() -> Layer {
    let mut l = Layer::new();
    l.whiteout("./.wh.gone")
        .file("./a.txt", b"v2", (1_710_000_000, 22))
        .file("./back", b"back", (1_710_000_001, 1))
        .remove("./created")
        .dir(
            "./meta/",
            0o700,
            (1_710_000_100, 5),
            &[("user.a", b"9"), ("user.c", b"3")],
            None,
        )
        .file("./meta/new", b"new", T)
        .dir("./op/", 0o755, (1_710_000_200, 7), &[], None)
        .whiteout("./op/.wh..wh..opq")
        .file("./par/new", b"pn", T)
        .remove("./par/old")
        .remove("./rmdir");
    l
}

/// Root updated in place, dir replaced by a file, file replaced by a dir, hard links to a file
/// of this delta and to an unchanged one, dir made non-opaque, symlink retargeted.
fn delta2() -> Layer {
    let mut l = Layer::new();
    l.dir("./", 0o751, (1_720_000_000, 9), &[], None)
        .file("./d2f", b"now a file", (1_720_000_001, 1))
        .dir("./f2d/", 0o755, (1_720_000_010, 10), &[], None)
        .file("./f2d/inner", b"in", T)
        .hardlink("./keep-hl", "./keep.txt")
        .file("./new.txt", b"fresh", (1_720_000_002, 2))
        .hardlink("./new.txt.hl", "./new.txt")
        .dir("./nop/", 0o755, (1_720_000_020, 0), &[], None)
        .symlink("./sl", "back", (1_720_000_030, 30));
    l
}

/// The full archive of the state base + delta1 + delta2.
fn final_full() -> Layer {
    let mut l = Layer::new();
    l.dir("./", 0o751, (1_720_000_000, 9), &[], None)
        .whiteout("./.wh.gone")
        .file("./a.txt", b"v2", (1_710_000_000, 22))
        .file("./back", b"back", (1_710_000_001, 1))
        .file("./d2f", b"now a file", (1_720_000_001, 1))
        .dir("./f2d/", 0o755, (1_720_000_010, 10), &[], None)
        .file("./f2d/inner", b"in", T)
        .file("./keep.txt", b"keep", (1_600_000_002, 2))
        .hardlink("./keep-hl", "./keep.txt")
        .dir(
            "./meta/",
            0o700,
            (1_710_000_100, 5),
            &[("user.a", b"9"), ("user.c", b"3")],
            None,
        )
        .file("./meta/child", b"c", (1_600_000_003, 3))
        .file("./meta/new", b"new", T)
        .file("./new.txt", b"fresh", (1_720_000_002, 2))
        .hardlink("./new.txt.hl", "./new.txt")
        .dir("./nop/", 0o755, (1_720_000_020, 0), &[], None)
        .file("./nop/f", b"n", T)
        .dir("./op/", 0o755, (1_710_000_200, 7), &[], None)
        .whiteout("./op/.wh..wh..opq")
        .file("./op/keep", b"k", T)
        .dir("./par/", 0o755, PAR_T, &[], None)
        .file("./par/new", b"pn", T)
        .symlink("./sl", "back", (1_720_000_030, 30));
    l
}

fn mtime_of(p: &Path) -> (i64, i64) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.mtime(), m.mtime_nsec())
}

fn assert_same_tree(want: &Path, got: &Path) {
    let (w, g) = (snapshot(want), snapshot(got));
    assert_eq!(w.keys().collect::<Vec<_>>(), g.keys().collect::<Vec<_>>());
    for (k, node) in &w {
        assert_eq!(node, &g[k], "entry {}", k.display());
    }
}

#[test]
fn chain_of_base_and_two_deltas_equals_the_full_archive_of_the_final_state() {
    let t = tempfile::tempdir().unwrap();
    let b = base().spool(t.path(), "base.tar.zst");
    let d1 = delta1().spool(t.path(), "d1.tar.zst");
    let d2 = delta2().spool(t.path(), "d2.tar.zst");
    let (full, full_digest) = final_full().spool(t.path(), "full.tar.zst");
    let want = t.path().join("want");
    unpack_file(&full, &full_digest, &want, &root_opts(), None).unwrap();

    let got = t.path().join("got");
    let progress = std::sync::atomic::AtomicU64::new(0);
    let report = |n: u64| progress.store(n, std::sync::atomic::Ordering::Relaxed);
    let layers = [b.clone(), d1.clone(), d2.clone()];
    let stats = unpack_chain_files(&layers, &got, &root_opts(), Some(&report)).unwrap();
    assert_same_tree(&want, &got);
    assert_no_staging(t.path());
    let tar_len = |p: &Path| zstd::decode_all(fs::File::open(p).unwrap()).unwrap().len() as u64;
    let total: u64 = layers.iter().map(|(p, _)| tar_len(p)).sum();
    assert_eq!(stats.uncompressed_size, total);
    assert_eq!(
        progress.load(std::sync::atomic::Ordering::Relaxed),
        total,
        "progress is cumulative over the chain"
    );

    // Spot checks of what the comparison relies on.
    assert_eq!(fs::read(got.join("a.txt")).unwrap(), b"v2");
    assert!(!got.join("created").exists());
    assert!(!got.join("rmdir").exists());
    assert!(fs::symlink_metadata(got.join("d2f")).unwrap().is_file());
    assert_eq!(fs::read(got.join("f2d/inner")).unwrap(), b"in");
    assert_eq!(mtime_of(&got.join("par")), (PAR_T.0, i64::from(PAR_T.1)));
    assert_eq!(mtime_of(&got.join("meta")), (1_710_000_100, 5));
    assert_eq!(get_xattr(&got.join("meta"), "user.a").unwrap(), b"9");
    assert!(get_xattr(&got.join("meta"), "user.b").is_none());
    assert!(get_xattr(&got.join("meta"), "trusted.overlay.protattr").is_none());
    assert!(get_xattr(&got.join("op"), "trusted.overlay.opaque").is_some());
    assert!(get_xattr(&got.join("nop"), "trusted.overlay.opaque").is_none());
    assert_eq!(fs::read_link(got.join("sl")).unwrap(), Path::new("back"));
    let ino = |p: &str| fs::metadata(got.join(p)).unwrap().ino();
    assert_eq!(ino("new.txt"), ino("new.txt.hl"));
    assert_eq!(ino("keep.txt"), ino("keep-hl"));
    assert_eq!(fs::metadata(got.join("keep.txt")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(&got).unwrap().mode() & 0o7777, 0o751);

    // After delta1 alone, the root (changed, no entry in delta1) keeps the base's mtime and
    // mode, and the in-place dir keeps its untouched child.
    let mid = t.path().join("mid");
    let readers = [&b, &d1]
        .iter()
        .map(|(p, d)| {
            let f = fs::File::open(p).unwrap();
            let len = f.metadata().unwrap().len();
            (f, p.as_path(), len, d.as_str())
        })
        .collect();
    unpack_chain_readers(readers, &mid, &root_opts(), None).unwrap();
    assert_eq!(mtime_of(&mid), (ROOT_T.0, i64::from(ROOT_T.1)));
    assert_eq!(fs::metadata(&mid).unwrap().mode() & 0o7777, 0o755);
    assert_eq!(fs::read(mid.join("meta/child")).unwrap(), b"c");
    let gone = fs::symlink_metadata(mid.join("gone")).unwrap();
    assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
    assert!(fs::symlink_metadata(mid.join("back")).unwrap().is_file());

    // A one-element chain is a plain restore.
    let single = t.path().join("single");
    unpack_chain_files(&[(full, full_digest)], &single, &root_opts(), None).unwrap();
    assert_same_tree(&want, &single);
}

fn small_base(t: &Path) -> (PathBuf, String) {
    let mut l = Layer::new();
    l.dir("./", 0o755, ROOT_T, &[], None)
        .dir("./d/", 0o755, T, &[], None)
        .file("./d/f", b"f", T);
    l.spool(t, "small-base.tar.zst")
}

fn chain_err(t: &Path, delta: &mut Layer) -> (ArchiveError, PathBuf) {
    let b = small_base(t);
    let d = delta.spool(t, &format!("delta-{}.tar.zst", rand_name()));
    let target = t.join("target");
    let err = unpack_chain_files(&[b, d], &target, &root_opts(), None).unwrap_err();
    assert!(!target.exists(), "{err:?} left a target");
    assert_no_staging(t);
    (err, target)
}

fn rand_name() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn removing_a_missing_path_fails_naming_it() {
    let t = tempfile::tempdir().unwrap();
    let (err, _) = chain_err(t.path(), Layer::new().remove("./d/nope"));
    assert!(
        matches!(&err, ArchiveError::NothingToRemove { entry } if entry == "./d/nope"),
        "{err:?}"
    );
    assert!(err.to_string().contains("./d/nope"));
}

#[test]
fn removals_never_leave_the_root_or_follow_symlinks() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), b"precious").unwrap();
    let out = outside.to_str().unwrap();
    let with_link = || {
        let mut l = Layer::new();
        l.dir("./", 0o755, ROOT_T, &[], None).symlink("./l", out, T);
        l
    };
    // Through a symlinked parent.
    let mut d = Layer::new();
    d.remove("./l/victim");
    let b = with_link().spool(t.path(), "b.tar.zst");
    let dl = d.spool(t.path(), "d.tar.zst");
    let target = t.path().join("target");
    let err = unpack_chain_files(&[b.clone(), dl], &target, &root_opts(), None).unwrap_err();
    assert!(matches!(err, ArchiveError::EscapesTarget { .. }), "{err:?}");
    // Through `..`.
    let (err, _) = chain_err(t.path(), Layer::new().remove("./d/../../outside/victim"));
    assert!(matches!(err, ArchiveError::UnsafePath { .. }), "{err:?}");
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"precious");
    // Removing the symlink itself removes only the link.
    let dl = Layer::new().remove("./l").spool(t.path(), "d2.tar.zst");
    unpack_chain_files(&[b, dl], &target, &root_opts(), None).unwrap();
    assert!(fs::symlink_metadata(target.join("l")).is_err());
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"precious");
    // A symlink replaced by a directory: the new dir is created, the old target untouched.
    let b = with_link().spool(t.path(), "b3.tar.zst");
    let mut d = Layer::new();
    d.dir("./l/", 0o755, T, &[], None)
        .file("./l/victim", b"mine", T);
    let dl = d.spool(t.path(), "d3.tar.zst");
    let target2 = t.path().join("target2");
    unpack_chain_files(&[b, dl], &target2, &root_opts(), None).unwrap();
    assert_eq!(fs::read(target2.join("l/victim")).unwrap(), b"mine");
    assert_eq!(fs::read(outside.join("victim")).unwrap(), b"precious");
    assert_no_staging(t.path());
}

#[test]
fn a_delta_with_a_wrong_digest_leaves_the_target_untouched() {
    let t = tempfile::tempdir().unwrap();
    let b = small_base(t.path());
    let (d, _) = Layer::new()
        .file("./d/g", b"g", T)
        .spool(t.path(), "d.tar.zst");
    // Target as an existing empty dir: it must stay empty.
    let target = t.path().join("target");
    fs::create_dir(&target).unwrap();
    let wrong = "ab".repeat(32);
    let err = unpack_chain_files(
        &[b.clone(), (d.clone(), wrong.clone())],
        &target,
        &root_opts(),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(&err, ArchiveError::DigestMismatch { archive, .. } if *archive == d),
        "{err:?}"
    );
    assert_eq!(fs::read_dir(&target).unwrap().count(), 0);
    // Absent target: still absent. A corrupted delta file fails the same way.
    let absent = t.path().join("absent");
    let mut bytes = fs::read(&d).unwrap();
    let good = hex::encode(Sha256::digest(&bytes));
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&d, &bytes).unwrap();
    let err = unpack_chain_files(&[b, (d, good)], &absent, &root_opts(), None).unwrap_err();
    assert!(
        matches!(err, ArchiveError::DigestMismatch { .. }),
        "{err:?}"
    );
    assert!(!absent.exists());
    assert_no_staging(t.path());
}

#[test]
fn full_archives_refuse_removal_entries() {
    let t = tempfile::tempdir().unwrap();
    let mut l = Layer::new();
    l.dir("./", 0o755, ROOT_T, &[], None)
        .file("./a", b"a", T)
        .remove("./a");
    let (spool, digest) = l.spool(t.path(), "forged.tar.zst");
    let target = t.path().join("target");
    let err = unpack_file(&spool, &digest, &target, &root_opts(), None).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::RemovalInFullArchive { entry } if entry == "./a"),
        "{err:?}"
    );
    // Nor as the base of a chain.
    let err = unpack_chain_files(&[(spool, digest)], &target, &root_opts(), None).unwrap_err();
    assert!(
        matches!(err, ArchiveError::RemovalInFullArchive { .. }),
        "{err:?}"
    );
    assert!(!target.exists());
    assert_no_staging(t.path());
}

#[test]
fn malformed_deltas_are_refused() {
    let t = tempfile::tempdir().unwrap();
    // Two entries for one path (a whiteout and a file of the same name).
    let (err, _) = chain_err(
        t.path(),
        Layer::new()
            .file("./d/.wh.x", b"", T)
            .file("./d/x", b"x", T),
    );
    assert!(
        matches!(err, ArchiveError::DuplicateEntry { .. }),
        "{err:?}"
    );
    // A removal naming a whiteout entry rather than the plain path.
    let (err, _) = chain_err(t.path(), Layer::new().remove("./d/.wh.f"));
    assert!(matches!(err, ArchiveError::BadRemoval { .. }), "{err:?}");
    // The root cannot be removed.
    let (err, _) = chain_err(t.path(), Layer::new().remove("./"));
    assert!(matches!(err, ArchiveError::BadRemoval { .. }), "{err:?}");
    // No chain at all.
    let err = unpack_chain_files(&[], &t.path().join("x"), &root_opts(), None).unwrap_err();
    assert!(matches!(err, ArchiveError::EmptyChain { .. }), "{err:?}");
}

#[test]
fn chain_staging_stays_private_until_the_last_layer() {
    let t = tempfile::tempdir().unwrap();
    let b = small_base(t.path());
    let big: Vec<u8> = (0..6u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let d = Layer::new()
        .file("./d/big", &big, T)
        .spool(t.path(), "d.tar.zst");
    let parent = t.path().join("restore");
    fs::create_dir(&parent).unwrap();
    let seen = std::sync::Mutex::new(Vec::new());
    let progress = |_: u64| {
        for e in fs::read_dir(&parent).unwrap() {
            let m = fs::metadata(e.unwrap().path()).unwrap().mode() & 0o7777;
            seen.lock().unwrap().push(m);
        }
    };
    let dst = parent.join("upper");
    unpack_chain_files(&[b, d], &dst, &root_opts(), Some(&progress)).unwrap();
    let seen = seen.into_inner().unwrap();
    assert!(!seen.is_empty(), "progress never saw the staging dir");
    let octal: Vec<String> = seen.iter().map(|m| format!("{m:04o}")).collect();
    assert!(seen.iter().all(|m| *m == 0o700), "{octal:?}");
    assert_eq!(fs::metadata(&dst).unwrap().mode() & 0o7777, 0o755);
}
