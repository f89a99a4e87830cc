//! Archive exactness through a real overlay mount, and the committed hostile corpus.
//!
//! The overlay tests need root and overlayfs; without them they fail, unless the opt-out is set
//! (see `util::require`).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use zlayer_storage::archive::{self, ArchiveError, PackOptions, UnpackOptions, XattrNs};

use crate::util::require;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An overlay mount that is unmounted on drop (after clearing immutable flags through it).
struct Overlay {
    merged: PathBuf,
    immutable: Vec<PathBuf>,
}

impl Overlay {
    fn mount(lower: &Path, upper: &Path, work: &Path, merged: &Path) -> Overlay {
        for d in [upper, work, merged] {
            fs::create_dir_all(d).unwrap();
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        run(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(merged));
        Overlay {
            merged: merged.to_owned(),
            immutable: Vec::new(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.merged.join(rel)
    }

    fn chattr_immutable(&mut self, rel: &str) {
        let p = self.path(rel);
        run(Command::new("chattr").arg("+i").arg(&p));
        self.immutable.push(p);
    }

    /// Unmounts keeping the immutable flags (they live in the upper as protattr).
    fn unmount(mut self) {
        self.immutable.clear();
        self.cleanup();
    }

    /// Registers a path that is immutable through this mount, so the guard clears it.
    fn track_immutable(&mut self, rel: &str) {
        let p = self.path(rel);
        self.immutable.push(p);
    }

    fn cleanup(&mut self) {
        for p in self.immutable.drain(..) {
            let _ = Command::new("chattr").arg("-i").arg(&p).status();
        }
        if !self.merged.as_os_str().is_empty() {
            let ok = Command::new("umount")
                .arg(&self.merged)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.merged).status();
            }
            self.merged = PathBuf::new();
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, rustix::fs::XattrFlags::empty()).unwrap();
}

fn write(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap();
}

fn build_lower(lower: &Path) {
    for d in ["keep", "gone/deep", "redo/sub", "xdir", "meta"] {
        fs::create_dir_all(lower.join(d)).unwrap();
    }
    write(&lower.join("a"), b"lower a");
    write(&lower.join("b"), b"lower b");
    write(&lower.join("keep/x"), b"keep x");
    write(&lower.join("gone/y"), b"gone y");
    write(&lower.join("gone/deep/z"), b"gone z");
    write(&lower.join("redo/old1"), b"old1");
    write(&lower.join("redo/sub/old2"), b"old2");
    write(&lower.join("meta/chmodme"), b"chmod");
    write(&lower.join("meta/chownme"), b"chown");
    write(&lower.join("meta/frozen"), b"frozen");
    write(&lower.join("h1"), b"hardlinked in lower");
    fs::hard_link(lower.join("h1"), lower.join("h2")).unwrap();
    write(&lower.join("xdir/file"), b"x");
}

/// Changes made through the mount: deletions, opaque dir, metadata, xattrs, links, specials.
fn mutate(m: &mut Overlay) {
    fs::remove_file(m.path("a")).unwrap();
    fs::remove_dir_all(m.path("gone")).unwrap();
    fs::remove_dir_all(m.path("redo")).unwrap();
    fs::create_dir(m.path("redo")).unwrap();
    write(&m.path("redo/new"), b"recreated");
    fs::create_dir(m.path("redo/sub")).unwrap();
    write(&m.path("redo/sub/new2"), b"recreated 2");
    fs::set_permissions(m.path("meta/chmodme"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::lchown(m.path("meta/chownme"), Some(1234), Some(5678)).unwrap();
    write(&m.path("suid"), b"#!/bin/sh\nexit 0\n");
    std::os::unix::fs::chown(m.path("suid"), Some(0), Some(0)).unwrap();
    fs::set_permissions(m.path("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::set_permissions(m.path("xdir"), fs::Permissions::from_mode(0o2770)).unwrap();
    set_xattr(&m.path("b"), "user.note", b"on a copied-up file");
    set_xattr(&m.path("keep"), "user.dirnote", b"on a dir");
    write(&m.path("newfile"), b"new");
    set_xattr(&m.path("newfile"), "user.fresh", b"\x00binary\xff");
    m.chattr_immutable("meta/frozen");
    write(&m.path("n1"), b"new hardlink");
    fs::hard_link(m.path("n1"), m.path("keep/n2")).unwrap();
    fs::hard_link(m.path("h1"), m.path("h3")).unwrap();
    symlink("keep/x", m.path("sl")).unwrap();
    symlink("/nonexistent/target", m.path("dangling")).unwrap();
    run(Command::new("truncate")
        .args(["-s", "64M"])
        .arg(m.path("sparse")));
    run(Command::new("dd")
        .args([
            "if=/dev/urandom",
            "bs=4096",
            "count=3",
            "seek=4000",
            "conv=notrunc",
            "status=none",
        ])
        .arg(format!("of={}", m.path("sparse").display())));
    run(Command::new("mkfifo").arg(m.path("fifo")));
    run(Command::new("touch")
        .args(["-h", "-d", "2021-03-04 05:06:07.123456789"])
        .arg(m.path("keep/x")));
    run(Command::new("touch")
        .args(["-h", "-d", "2019-01-02 03:04:05.987654321"])
        .arg(m.path("sl")));
    run(Command::new("touch")
        .args(["-d", "2020-02-02 02:02:02.000000002"])
        .arg(m.path("redo")));
}

#[derive(Debug, PartialEq, Eq)]
struct View {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    content: Option<String>,
    link: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
    hardlink_group: Option<PathBuf>,
    sparse: bool,
    attrs: Option<String>,
}

fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut names = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(p, &mut names[..]).unwrap_or(0);
    let mut out = BTreeMap::new();
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        if name.contains(".overlay.") {
            continue;
        }
        let mut v = vec![0u8; 65536];
        let len = rustix::fs::lgetxattr(p, name.as_str(), &mut v[..]).unwrap();
        out.insert(name, v[..len].to_vec());
    }
    out
}

fn lsattr(p: &Path) -> String {
    let out = Command::new("lsattr").arg("-d").arg(p).output().unwrap();
    assert!(
        out.status.success(),
        "lsattr {}: {}",
        p.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.clone());
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            walk(&p, out);
        }
    }
}

/// The merged view as seen by a container.
fn merged_view(root: &Path) -> BTreeMap<PathBuf, View> {
    let mut paths = vec![root.to_owned()];
    walk(root, &mut paths);
    paths.sort();
    let mut groups: BTreeMap<u64, PathBuf> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for p in paths {
        let m = fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().to_owned();
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_char_device() {
            "char"
        } else {
            "other"
        };
        let hardlink_group = (!ft.is_dir() && m.nlink() > 1)
            .then(|| groups.entry(m.ino()).or_insert_with(|| rel.clone()).clone());
        out.insert(
            rel,
            View {
                kind,
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                size: m.size(),
                mtime: (m.mtime(), m.mtime_nsec()),
                content: ft
                    .is_file()
                    .then(|| hex::encode(Sha256::digest(fs::read(&p).unwrap()))),
                link: ft.is_symlink().then(|| fs::read_link(&p).unwrap()),
                xattrs: xattrs(&p),
                hardlink_group,
                sparse: ft.is_file() && m.blocks() * 512 < m.size() / 2,
                attrs: (ft.is_file() || ft.is_dir()).then(|| lsattr(&p)),
            },
        );
    }
    out
}

#[test]
fn overlay_upper_round_trip_gives_an_identical_merged_view() {
    if !require::root("overlay_upper_round_trip_gives_an_identical_merged_view") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let base = t.path();
    let lower = base.join("lower");
    build_lower(&lower);
    let upper1 = base.join("upper1");
    let mut m1 = Overlay::mount(&lower, &upper1, &base.join("work1"), &base.join("merged1"));
    mutate(&mut m1);
    let before = merged_view(&m1.merged);
    m1.unmount();

    // sanity: the upper holds what the test intends to exercise
    let wh = fs::symlink_metadata(upper1.join("a")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "a must be a whiteout"
    );
    let mut v = [0u8; 16];
    let n = rustix::fs::lgetxattr(
        upper1.join("redo").as_path(),
        "trusted.overlay.opaque",
        &mut v[..],
    )
    .unwrap();
    assert_eq!(&v[..n], b"y", "redo must be opaque");
    assert!(
        before[Path::new("meta/frozen")]
            .attrs
            .as_deref()
            .unwrap()
            .contains('i')
    );

    let spool = base.join("upper1.tar.zst");
    let stats = archive::pack_to_file(&upper1, &spool, &PackOptions::default(), None).unwrap();
    assert!(stats.skipped_sockets.is_empty());
    let upper2 = base.join("upper2");
    let opts = UnpackOptions {
        xattr_ns: XattrNs::Trusted,
        ..UnpackOptions::default()
    };
    archive::unpack_file(&spool, &stats.digest, &upper2, &opts, None).unwrap();
    // the restored upper packs to the same bytes
    let again = archive::pack_to_file(
        &upper2,
        &base.join("upper2.tar.zst"),
        &PackOptions::default(),
        None,
    )
    .unwrap();
    assert_eq!(again.digest, stats.digest);

    let mut m1 = Overlay::mount(&lower, &upper1, &base.join("work1b"), &base.join("merged1"));
    m1.track_immutable("meta/frozen");
    let mut m2 = Overlay::mount(&lower, &upper2, &base.join("work2"), &base.join("merged2"));
    m2.track_immutable("meta/frozen");
    let view1 = merged_view(&m1.merged);
    let view2 = merged_view(&m2.merged);
    assert_eq!(
        view1, before,
        "remounting the original upper changed its view"
    );
    assert_eq!(
        view1.keys().collect::<Vec<_>>(),
        view2.keys().collect::<Vec<_>>(),
        "merged views list different paths"
    );
    for (k, a) in &view1 {
        assert_eq!(a, &view2[k], "merged views differ at {}", k.display());
    }
    // the properties this test is about, stated explicitly
    let v = &view2;
    assert!(!v.contains_key(Path::new("a")) && !v.contains_key(Path::new("gone")));
    assert!(!v.contains_key(Path::new("redo/old1")) && !v.contains_key(Path::new("redo/sub/old2")));
    assert_eq!(v[Path::new("redo/sub/new2")].kind, "file");
    assert_eq!(v[Path::new("suid")].mode & 0o7777, 0o4755);
    assert_eq!(v[Path::new("xdir")].mode & 0o7777, 0o2770);
    assert_eq!(
        (
            v[Path::new("meta/chownme")].uid,
            v[Path::new("meta/chownme")].gid
        ),
        (1234, 5678)
    );
    assert!(
        v[Path::new("meta/frozen")]
            .attrs
            .as_deref()
            .unwrap()
            .contains('i')
    );
    assert_eq!(v[Path::new("keep")].xattrs["user.dirnote"], b"on a dir");
    assert_eq!(
        v[Path::new("keep/n2")].hardlink_group.as_deref(),
        Some(Path::new("keep/n2"))
    );
    assert_eq!(
        v[Path::new("n1")].hardlink_group.as_deref(),
        Some(Path::new("keep/n2"))
    );
    assert!(
        v[Path::new("sparse")].sparse,
        "sparse file must stay sparse"
    );
    assert_eq!(v[Path::new("keep/x")].mtime, (1_614_834_367, 123_456_789));
    assert_eq!(
        v[Path::new("dangling")].link.as_deref(),
        Some(Path::new("/nonexistent/target"))
    );
    assert_eq!(v[Path::new("fifo")].kind, "fifo");
    drop(m2);
    drop(m1);
}

#[test]
fn metacopy_upper_is_refused_naming_the_file() {
    if !require::root("metacopy_upper_is_refused_naming_the_file") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("upper");
    fs::create_dir_all(upper.join("usr/bin")).unwrap();
    File::create(upper.join("usr/bin/tool"))
        .unwrap()
        .set_len(1_000_000)
        .unwrap();
    set_xattr(&upper.join("usr/bin/tool"), "trusted.overlay.metacopy", b"");
    let spool = t.path().join("out.tar.zst");
    let err = archive::pack_to_file(&upper, &spool, &PackOptions::default(), None).unwrap_err();
    assert!(
        matches!(err, ArchiveError::NotPortable { ref path, .. } if path == &upper.join("usr/bin/tool")),
        "{err:?}"
    );
    assert!(err.to_string().contains("usr/bin/tool"), "{err}");
    assert!(!spool.exists());
}

pub(crate) fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/fixtures/archive")
}

/// Expected error variant per fixture, from `cases.txt`.
pub(crate) fn expected_cases() -> BTreeMap<String, String> {
    fs::read_to_string(fixtures().join("cases.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, expect) = l.split_once(' ').unwrap();
            (name.to_owned(), expect.trim().to_owned())
        })
        .collect()
}

/// Restores one committed fixture; asserts the error and that nothing else changed.
fn hostile(name: &str) {
    let expect = expected_cases()
        .remove(name)
        .unwrap_or_else(|| panic!("{name} not in cases.txt"));
    let data = fs::read(fixtures().join(format!("{name}.tar.zst"))).unwrap();
    let digest = hex::encode(Sha256::digest(&data));
    for existing_target in [false, true] {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let spool = t.path().join("in.tar.zst");
        fs::write(&spool, &data).unwrap();
        let target = t.path().join("target");
        if existing_target {
            fs::create_dir(&target).unwrap();
        }
        let err = archive::unpack_file(&spool, &digest, &target, &UnpackOptions::default(), None)
            .unwrap_err();
        let dbg = format!("{err:?}");
        assert!(
            dbg.starts_with(&expect),
            "{name}: expected {expect}, got {dbg}"
        );
        assert!(!err.to_string().is_empty());
        let mut names: Vec<String> = fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut want = vec!["in.tar.zst".to_owned(), "outside".to_owned()];
        if existing_target {
            want.push("target".to_owned());
            assert_eq!(
                fs::read_dir(&target).unwrap().count(),
                0,
                "{name}: target touched"
            );
        }
        assert_eq!(names, want, "{name}: unexpected files next to the target");
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "{name}: wrote outside"
        );
    }
    assert!(!Path::new("/tmp/zlayer-hostile-target").exists());
    assert!(!Path::new("/abs-escape").exists());
}

#[test]
fn digest_mismatch_fixture() {
    // Any valid corpus file with a wrong expected digest: refused before extraction.
    let t = tempfile::tempdir().unwrap();
    let spool = fixtures().join("dotdot.tar.zst");
    let target = t.path().join("target");
    let err = archive::unpack_file(
        &spool,
        &"ab".repeat(32),
        &target,
        &UnpackOptions::default(),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(err, ArchiveError::DigestMismatch { .. }),
        "{err:?}"
    );
    assert!(!target.exists());
    assert_eq!(fs::read_dir(t.path()).unwrap().count(), 0);
}

macro_rules! hostile_tests {
    ($($name:ident),* $(,)?) => {
        $( #[test] fn $name() { hostile(stringify!($name)); } )*
        const HOSTILE: &[&str] = &[$(stringify!($name)),*];
    };
}

mod hostile {
    use super::hostile;
    hostile_tests!(
        dotdot,
        dotdot_nested,
        absolute,
        root_not_dir,
        nul_in_pax_path,
        symlink_escape_relative,
        symlink_escape_absolute,
        symlink_chain_escape,
        hardlink_dotdot,
        hardlink_absolute,
        hardlink_missing,
        hardlink_later,
        hardlink_through_symlink,
        hardlink_to_dir,
        duplicate_file,
        duplicate_dir,
        duplicate_root,
        duplicate_opaque,
        whiteout_conflict,
        symlink_then_file,
        char_device,
        block_device,
        whiteout_empty,
        whiteout_dot,
        whiteout_dotdot,
        whiteout_aufs_meta,
        whiteout_not_regular,
        pax_oversized,
        gnu_longname_oversized,
        pax_size_mismatch,
        xattr_overlay_redirect,
        xattr_overlay_user_opaque,
        xattr_trusted_other,
        gnu_sparse_pax,
        gnu_sparse_entry,
        global_pax_header,
        bad_checksum,
        missing_parent,
        file_in_whiteout,
        truncated_in_data,
        truncated_no_end_marker,
        trailing_data,
        truncated_zstd,
        not_zstd,
        zstd_bomb,
    );

    #[test]
    fn every_fixture_has_a_test() {
        let listed: Vec<String> = super::expected_cases().into_keys().collect();
        let mut tested: Vec<String> = HOSTILE.iter().map(|s| s.to_string()).collect();
        tested.sort();
        assert_eq!(listed, tested);
    }
}
