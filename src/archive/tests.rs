//! Round trips, determinism, refusal, swap rules, hostile corpus, fingerprint.
//! These run as root (CI is root): whiteouts, chown, trusted.* xattrs and devices need it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::testkit::{self, RawTar};
use super::*;

pub(super) fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(p, name, value, rustix::fs::XattrFlags::empty()).unwrap();
}

pub(super) fn get_xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    rustix::fs::lgetxattr(p, name, &mut buf[..])
        .ok()
        .map(|n| buf[..n].to_vec())
}

fn mknod(p: &Path, ft: rustix::fs::FileType, mode: u32, major: u32, minor: u32) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        ft,
        rustix::fs::Mode::from_raw_mode(mode),
        rustix::fs::makedev(major, minor),
    )
    .unwrap();
}

fn set_mtime(p: &Path, secs: i64, nsec: i64) {
    let t = rustix::fs::Timespec {
        tv_sec: secs,
        tv_nsec: nsec,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// A v2 file capability blob granting CAP_NET_BIND_SERVICE (effective).
const CAP_BLOB: [u8; 20] = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// A tree exercising every entry type and piece of metadata the format carries.
fn build_tree(root: &Path, reverse: bool) {
    fs::create_dir(root).unwrap();
    let dirs = ["d", "d/sub", "opaque", "sticky", "setgid", "long"];
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        ("d/a.txt", b"hello".to_vec()),
        ("d/sub/empty", Vec::new()),
        ("d/setuid", b"#!/bin/sh\n".to_vec()),
        ("d/cap", b"bin".to_vec()),
        ("opaque/new", b"fresh".to_vec()),
        ("bigids", b"ids".to_vec()),
        ("immutable", b"frozen".to_vec()),
        (
            "random",
            (0..300_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ),
    ];
    let mut dirs: Vec<&str> = dirs.to_vec();
    if reverse {
        files.reverse();
        dirs.reverse();
        dirs.sort_by_key(|d| d.matches('/').count());
    }
    for d in &dirs {
        fs::create_dir(root.join(d)).unwrap();
    }
    for (f, data) in &files {
        fs::write(root.join(f), data).unwrap();
    }
    let long_name = "n".repeat(255);
    let mut deep = root.join("long");
    for i in 0..3 {
        deep = deep.join(format!("{}{i}", &long_name[..254]));
        fs::create_dir(&deep).unwrap();
    }
    fs::write(deep.join(&long_name), b"deep").unwrap();
    symlink(
        deep.join(&long_name).strip_prefix(root).unwrap(),
        root.join("long-link"),
    )
    .unwrap();
    // hard links (three names, one inode), and a hard-linked symlink
    fs::hard_link(root.join("d/a.txt"), root.join("hl1")).unwrap();
    fs::hard_link(root.join("d/a.txt"), root.join("d/sub/hl2")).unwrap();
    symlink("a.txt", root.join("d/rel-link")).unwrap();
    symlink("/etc/passwd", root.join("abs-link")).unwrap();
    symlink("missing/target", root.join("dangling")).unwrap();
    // special files
    mknod(&root.join("fifo"), rustix::fs::FileType::Fifo, 0o640, 0, 0);
    mknod(
        &root.join("null"),
        rustix::fs::FileType::CharacterDevice,
        0o666,
        1,
        3,
    );
    mknod(
        &root.join("loop9"),
        rustix::fs::FileType::BlockDevice,
        0o660,
        7,
        9,
    );
    // whiteouts, one pair sharing an inode as overlayfs does
    mknod(
        &root.join("gone"),
        rustix::fs::FileType::CharacterDevice,
        0,
        0,
        0,
    );
    fs::hard_link(root.join("gone"), root.join("d/gone-too")).unwrap();
    mknod(
        &root.join("opaque/old"),
        rustix::fs::FileType::CharacterDevice,
        0,
        0,
        0,
    );
    // sparse: data, 64 MiB hole, data
    {
        let f = File::create(root.join("sparse")).unwrap();
        f.write_all_at_offset(b"start", 0);
        f.write_all_at_offset(b"end", 64 << 20);
    }
    // xattrs, overlay markers (kept and stripped ones)
    set_xattr(&root.join("d/a.txt"), "user.comment", b"on a file");
    set_xattr(&root.join("d"), "user.dir", b"on a dir");
    set_xattr(&root.join("opaque"), "trusted.overlay.opaque", b"y");
    set_xattr(&root.join("immutable"), "trusted.overlay.protattr", b"i");
    set_xattr(&root.join("d/sub"), "trusted.overlay.impure", b"y");
    set_xattr(
        &root.join("random"),
        "trusted.overlay.origin",
        b"\x00\xfb\x21",
    );
    set_xattr(root, "trusted.overlay.uuid", &[7u8; 16]);
    set_xattr(&root.join("fifo"), "security.on-fifo", b"f");
    set_xattr(&root.join("dangling"), "security.test", b"on a symlink");
    // owners and modes (chown before chmod: chown clears setuid)
    chown(&root.join("bigids"), 3_000_000_000, 4_000_000_000);
    chown(&root.join("d/setuid"), 1000, 1000);
    chmod(&root.join("d/setuid"), 0o4755);
    chmod(&root.join("sticky"), 0o1777);
    chmod(&root.join("setgid"), 0o2770);
    chown(&root.join("setgid"), 0, 100);
    chown(&root.join("dangling"), 1234, 5678);
    chmod(&root.join("d/sub"), 0o750);
    set_xattr(&root.join("d/cap"), "security.capability", &CAP_BLOB);
    // ns mtimes everywhere, directories last (deepest first)
    let mut all = Vec::new();
    collect(root, &mut all);
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in all.iter().enumerate() {
        if !fs::symlink_metadata(p).unwrap().is_dir() {
            set_mtime(p, 1_600_000_000 + i as i64, 123_456_789);
        }
    }
    for (i, p) in all.iter().enumerate() {
        if fs::symlink_metadata(p).unwrap().is_dir() {
            set_mtime(p, 1_650_000_000 + i as i64, 987_654_321);
        }
    }
    set_mtime(root, 1_700_000_000, 5);
}

trait WriteAt {
    fn write_all_at_offset(&self, data: &[u8], off: u64);
}

impl WriteAt for File {
    fn write_all_at_offset(&self, data: &[u8], off: u64) {
        std::os::unix::fs::FileExt::write_all_at(self, data, off).unwrap();
    }
}

pub(super) fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.clone());
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            collect(&p, out);
        }
    }
}

/// Everything observable about one inode (root ctime/ino aside), for tree comparison.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Node {
    kind: String,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    rdev: u64,
    content: Option<String>,
    link: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
    hardlink_group: Option<PathBuf>,
    sparse: bool,
}

pub(super) fn list_xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(p, &mut buf[..]).unwrap_or(0);
    let mut out = BTreeMap::new();
    for name in buf[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8(name.to_vec()).unwrap();
        out.insert(name.clone(), get_xattr(p, &name).unwrap());
    }
    out
}

pub(super) fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut paths = vec![root.to_path_buf()];
    collect(root, &mut paths);
    let mut first_by_ino: BTreeMap<u64, PathBuf> = BTreeMap::new();
    paths.sort();
    let mut out = BTreeMap::new();
    for p in paths {
        let m = fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().to_path_buf();
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
        } else if ft.is_block_device() {
            "block"
        } else {
            "other"
        };
        let whiteout = ft.is_char_device() && m.rdev() == 0;
        let hardlink_group = (!ft.is_dir() && !whiteout && m.nlink() > 1).then(|| {
            first_by_ino
                .entry(m.ino())
                .or_insert_with(|| rel.clone())
                .clone()
        });
        out.insert(
            rel,
            Node {
                kind: kind.to_owned(),
                // whiteout metadata is not part of the merged view
                mode: if whiteout { 0 } else { m.mode() },
                uid: if whiteout { 0 } else { m.uid() },
                gid: if whiteout { 0 } else { m.gid() },
                size: m.size(),
                mtime: if whiteout {
                    (0, 0)
                } else {
                    (m.mtime(), m.mtime_nsec())
                },
                rdev: m.rdev(),
                content: ft
                    .is_file()
                    .then(|| hex::encode(Sha256::digest(fs::read(&p).unwrap()))),
                link: ft.is_symlink().then(|| fs::read_link(&p).unwrap()),
                xattrs: list_xattrs(&p),
                hardlink_group,
                sparse: ft.is_file() && m.blocks() * 512 < m.size() / 2,
            },
        );
    }
    out
}

/// What a restore must reproduce: the source minus stripped overlay bookkeeping.
pub(super) fn expected_after_restore(src: &Path, ns: XattrNs) -> BTreeMap<PathBuf, Node> {
    let mut snap = snapshot(src);
    for node in snap.values_mut() {
        let x = std::mem::take(&mut node.xattrs);
        for (k, v) in x {
            let key = match k.strip_prefix("trusted.overlay.") {
                Some("origin" | "impure" | "uuid" | "nlink" | "upper") => continue,
                Some(rest) => ns.overlay_xattr(rest),
                None => k,
            };
            node.xattrs.insert(key, v);
        }
    }
    snap
}

pub(super) fn root_opts() -> UnpackOptions {
    UnpackOptions {
        allow_devices: true,
        ..UnpackOptions::default()
    }
}

fn pack(src: &Path, dir: &Path, workers: u32) -> (PathBuf, PackStats) {
    let spool = dir.join(format!("spool-{workers}-{}.tar.zst", rand_suffix()));
    let stats = pack_to_file(
        src,
        &spool,
        &PackOptions {
            level: 3,
            workers,
            live: false,
        },
        None,
    )
    .unwrap();
    (spool, stats)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn tar_listing(spool: &Path) -> Vec<(String, tar::EntryType)> {
    let data = zstd::decode_all(File::open(spool).unwrap()).unwrap();
    let mut ar = tar::Archive::new(&data[..]);
    ar.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                e.header().entry_type(),
            )
        })
        .collect()
}

#[test]
fn round_trip_preserves_every_entry_type_and_metadata() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src, false);
    let (spool, stats) = pack(&src, t.path(), 2);
    assert!(stats.skipped_sockets.is_empty());
    assert_eq!(stats.compressed_size, fs::metadata(&spool).unwrap().len());
    let dst = t.path().join("dst");
    let progress_seen = std::sync::atomic::AtomicU64::new(0);
    let progress = |n: u64| progress_seen.store(n, std::sync::atomic::Ordering::Relaxed);
    let un = unpack_file(&spool, &stats.digest, &dst, &root_opts(), Some(&progress)).unwrap();
    assert_eq!(un.entries, stats.entries);
    assert_eq!(un.uncompressed_size, stats.uncompressed_size);
    assert_eq!(
        progress_seen.load(std::sync::atomic::Ordering::Relaxed),
        stats.uncompressed_size
    );

    let want = expected_after_restore(&src, XattrNs::Trusted);
    let got = snapshot(&dst);
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        got.keys().collect::<Vec<_>>()
    );
    for (k, w) in &want {
        assert_eq!(w, &got[k], "entry {}", k.display());
    }
    // spot checks of the properties the comparison relies on
    assert!(
        got[Path::new("sparse")].sparse,
        "sparse file must stay sparse"
    );
    assert_eq!(got[Path::new("d/setuid")].mode & 0o7777, 0o4755);
    assert_eq!(got[Path::new("bigids")].uid, 3_000_000_000);
    assert_eq!(
        got[Path::new("opaque")]
            .xattrs
            .get("trusted.overlay.opaque")
            .unwrap(),
        b"y"
    );
    assert_eq!(
        got[Path::new("immutable")]
            .xattrs
            .get("trusted.overlay.protattr")
            .unwrap(),
        b"i"
    );
    assert!(
        !got[Path::new("")]
            .xattrs
            .contains_key("trusted.overlay.uuid")
    );
    assert!(
        !got[Path::new("random")]
            .xattrs
            .contains_key("trusted.overlay.origin")
    );
    assert_eq!(
        got[Path::new("d/cap")]
            .xattrs
            .get("security.capability")
            .unwrap(),
        &CAP_BLOB
    );
    assert_eq!(got[Path::new("gone")].kind, "char");
    assert_eq!(got[Path::new("")].mtime, (1_700_000_000, 5));
    assert_eq!(
        got[Path::new("d/sub/hl2")].hardlink_group.as_deref(),
        Some(Path::new("d/a.txt"))
    );
}

#[test]
fn archive_is_oci_layer_form() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src, false);
    let (spool, stats) = pack(&src, t.path(), 1);
    let list = tar_listing(&spool);
    let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "entries sorted by path bytes");
    assert_eq!(names[0], "./");
    let find = |n: &str| {
        list.iter()
            .find(|(p, _)| p == n)
            .unwrap_or_else(|| panic!("no {n}"))
            .1
    };
    assert_eq!(find("./.wh.gone"), tar::EntryType::Regular);
    // the shared whiteout inode is not turned into a hard link
    assert_eq!(find("./d/.wh.gone-too"), tar::EntryType::Regular);
    assert_eq!(find("./opaque/.wh..wh..opq"), tar::EntryType::Regular);
    assert_eq!(find("./opaque/.wh.old"), tar::EntryType::Regular);
    assert_eq!(find("./hl1"), tar::EntryType::Link);
    assert_eq!(find("./d/a.txt"), tar::EntryType::Regular);
    assert_eq!(find("./fifo"), tar::EntryType::Fifo);
    assert!(names.iter().any(|n| n.len() > 700), "long paths via PAX");
    assert!(!names.iter().any(|n| n.ends_with("/gone") || *n == "./gone"));
    assert_eq!(list.len() as u64, stats.entries);
    // the uncompressed digest is the sha256 of the tar
    let tar = zstd::decode_all(File::open(&spool).unwrap()).unwrap();
    assert_eq!(hex::encode(Sha256::digest(&tar)), stats.uncompressed_digest);
    assert_eq!(tar.len() as u64, stats.uncompressed_size);
    let compressed = fs::read(&spool).unwrap();
    assert_eq!(hex::encode(Sha256::digest(&compressed)), stats.digest);
    // no host-dependent names or atime/ctime in the stream
    let mut ar = tar::Archive::new(&tar[..]);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        assert_eq!(e.header().username_bytes().unwrap_or_default(), b"");
        if let Some(exts) = e.pax_extensions().unwrap() {
            for ext in exts {
                let k = ext.unwrap().key().unwrap().to_owned();
                assert!(
                    !["atime", "ctime", "uname", "gname"].contains(&k.as_str()),
                    "{k}"
                );
                assert!(!k.contains("overlay.") || k == PROTATTR_PAX_KEY, "{k}");
            }
        }
        let mut sink = Vec::new();
        e.read_to_end(&mut sink).unwrap();
    }
}

#[test]
fn user_namespace_restore_writes_user_overlay_xattrs() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src, false);
    let (spool, stats) = pack(&src, t.path(), 1);
    let dst = t.path().join("dst");
    let opts = UnpackOptions {
        xattr_ns: XattrNs::User,
        ..root_opts()
    };
    unpack_file(
        &spool,
        &format!("sha256:{}", stats.digest),
        &dst,
        &opts,
        None,
    )
    .unwrap();
    assert_eq!(
        get_xattr(&dst.join("opaque"), "user.overlay.opaque").unwrap(),
        b"y"
    );
    assert_eq!(
        get_xattr(&dst.join("immutable"), "user.overlay.protattr").unwrap(),
        b"i"
    );
    assert!(get_xattr(&dst.join("opaque"), "trusted.overlay.opaque").is_none());
    let want = expected_after_restore(&src, XattrNs::User);
    assert_eq!(want, snapshot(&dst));
}

#[test]
fn packing_is_deterministic_across_runs_workers_and_creation_order() {
    let t = tempfile::tempdir().unwrap();
    let a = t.path().join("a");
    let b = t.path().join("b");
    build_tree(&a, false);
    build_tree(&b, true);
    let (_, s1) = pack(&a, t.path(), 1);
    let (_, s2) = pack(&a, t.path(), 1);
    let (_, s3) = pack(&a, t.path(), 2);
    let (_, s4) = pack(&a, t.path(), 4);
    let (_, s5) = pack(&b, t.path(), 2);
    assert_eq!(s1.digest, s2.digest);
    assert_eq!(
        s1.digest, s3.digest,
        "worker count must not change the bytes"
    );
    assert_eq!(s1.digest, s4.digest);
    assert_eq!(s1.uncompressed_digest, s5.uncompressed_digest);
    assert_eq!(
        s1.digest, s5.digest,
        "creation order must not change the bytes"
    );
    // and a restored copy packs to the same bytes again
    let (spool, _) = pack(&a, t.path(), 2);
    let c = t.path().join("c");
    unpack_file(&spool, &s1.digest, &c, &root_opts(), None).unwrap();
    let (_, s6) = pack(&c, t.path(), 2);
    assert_eq!(s1.digest, s6.digest);
}

#[test]
fn copy_tree_is_exact() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    build_tree(&src, false);
    let dst = t.path().join("dst");
    let stats = copy_tree(&src, &dst, &root_opts()).unwrap();
    assert!(stats.entries > 20);
    assert_eq!(
        expected_after_restore(&src, XattrNs::Trusted),
        snapshot(&dst)
    );
    // copy into a non-empty target fails without touching it
    let err = copy_tree(&src, &dst, &root_opts()).unwrap_err();
    assert!(
        matches!(err, ArchiveError::TargetNotEmpty { .. }),
        "{err:?}"
    );
    // a failing source (devices not allowed) leaves no target and no staging dir
    let dst2 = t.path().join("dst2");
    let err = copy_tree(&src, &dst2, &UnpackOptions::default()).unwrap_err();
    assert!(
        matches!(err, ArchiveError::DeviceNotAllowed { .. }),
        "{err:?}"
    );
    assert!(!dst2.exists());
    assert_no_staging(t.path());
}

pub(super) fn assert_no_staging(dir: &Path) {
    for e in fs::read_dir(dir).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !n.contains(".staging.") && !n.contains(".tmp."),
            "leftover {n}"
        );
    }
}

#[test]
fn metacopy_and_redirect_uppers_are_refused_naming_the_path() {
    for xattr in [
        "trusted.overlay.metacopy",
        "trusted.overlay.redirect",
        "user.overlay.metacopy",
        "user.overlay.redirect",
    ] {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir_all(src.join("dir")).unwrap();
        fs::write(src.join("dir/victim"), b"").unwrap();
        set_xattr(&src.join("dir/victim"), xattr, b"/bigfile");
        let spool = t.path().join("out.tar.zst");
        let err = pack_to_file(&src, &spool, &PackOptions::default(), None).unwrap_err();
        match &err {
            ArchiveError::NotPortable { path, xattr: x } => {
                assert_eq!(path, &src.join("dir/victim"));
                assert_eq!(x, xattr);
            }
            other => panic!("{other:?}"),
        }
        assert!(err.to_string().contains("dir/victim"));
        assert!(!spool.exists());
        assert_no_staging(t.path());
    }
}

#[test]
fn unknown_overlay_xattrs_and_reserved_names_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"").unwrap();
    set_xattr(&src.join("f"), "trusted.overlay.whiteout", b"");
    let err = pack_to_file(&src, &t.path().join("o"), &PackOptions::default(), None).unwrap_err();
    assert!(
        matches!(err, ArchiveError::UnknownOverlayXattr { .. }),
        "{err:?}"
    );
    let src2 = t.path().join("src2");
    fs::create_dir(&src2).unwrap();
    fs::write(src2.join(".wh.sneaky"), b"").unwrap();
    let err = pack_to_file(&src2, &t.path().join("o"), &PackOptions::default(), None).unwrap_err();
    assert!(matches!(err, ArchiveError::ReservedName { .. }), "{err:?}");
}

#[test]
fn sockets_are_skipped_and_listed() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("run")).unwrap();
    let _l = std::os::unix::net::UnixListener::bind(src.join("run/app.sock")).unwrap();
    fs::write(src.join("run/pid"), b"1").unwrap();
    let (spool, stats) = pack(&src, t.path(), 1);
    assert_eq!(stats.skipped_sockets, vec![PathBuf::from("run/app.sock")]);
    let dst = t.path().join("dst");
    unpack_file(&spool, &stats.digest, &dst, &root_opts(), None).unwrap();
    assert!(dst.join("run/pid").exists());
    assert!(!dst.join("run/app.sock").exists());
}

#[test]
fn swap_rules() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"data").unwrap();
    chmod(&src, 0o751);
    let (spool, stats) = pack(&src, t.path(), 1);
    let opts = UnpackOptions::default();
    // absent target: renamed into place
    let absent = t.path().join("absent");
    unpack_file(&spool, &stats.digest, &absent, &opts, None).unwrap();
    assert_eq!(fs::read(absent.join("f")).unwrap(), b"data");
    assert_eq!(fs::metadata(&absent).unwrap().mode() & 0o7777, 0o751);
    // existing empty dir: exchanged, old dir removed
    let empty = t.path().join("empty");
    fs::create_dir(&empty).unwrap();
    unpack_file(&spool, &stats.digest, &empty, &opts, None).unwrap();
    assert_eq!(fs::read(empty.join("f")).unwrap(), b"data");
    assert_eq!(fs::metadata(&empty).unwrap().mode() & 0o7777, 0o751);
    // non-empty dir: refused, untouched
    let full = t.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("keep"), b"mine").unwrap();
    let err = unpack_file(&spool, &stats.digest, &full, &opts, None).unwrap_err();
    assert!(
        matches!(err, ArchiveError::TargetNotEmpty { .. }),
        "{err:?}"
    );
    assert_eq!(fs::read(full.join("keep")).unwrap(), b"mine");
    assert_eq!(fs::read_dir(&full).unwrap().count(), 1);
    // a file or a symlink as target: refused
    let file = t.path().join("file");
    fs::write(&file, b"x").unwrap();
    let err = unpack_file(&spool, &stats.digest, &file, &opts, None).unwrap_err();
    assert!(matches!(err, ArchiveError::TargetNotDir { .. }), "{err:?}");
    let link = t.path().join("link");
    symlink(&empty, &link).unwrap();
    let err = unpack_file(&spool, &stats.digest, &link, &opts, None).unwrap_err();
    assert!(matches!(err, ArchiveError::TargetNotDir { .. }), "{err:?}");
    assert_no_staging(t.path());
}

/// Runs one corpus case against a fresh target; asserts the error and that nothing leaked.
fn run_case(case: &testkit::Case, target_exists: bool) {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let spool = t.path().join("case.tar.zst");
    fs::write(&spool, &case.compressed).unwrap();
    let digest = hex::encode(Sha256::digest(&case.compressed));
    let target = t.path().join("target");
    if target_exists {
        fs::create_dir(&target).unwrap();
    }
    let err = unpack_file(&spool, &digest, &target, &UnpackOptions::default(), None)
        .expect_err(case.name);
    let dbg = format!("{err:?}");
    assert!(
        dbg.starts_with(case.expect),
        "case {}: expected {}, got {dbg}",
        case.name,
        case.expect
    );
    assert_eq!(target.exists(), target_exists, "case {}", case.name);
    if target_exists {
        assert_eq!(
            fs::read_dir(&target).unwrap().count(),
            0,
            "case {}",
            case.name
        );
    }
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "case {}",
        case.name
    );
    let mut names: Vec<String> = fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut want = vec!["case.tar.zst", "outside"];
    if target_exists {
        want.push("target");
    }
    assert_eq!(names, want, "case {}", case.name);
    assert!(!Path::new("/tmp/zlayer-hostile-target").exists());
    assert!(!Path::new("/abs-escape").exists());
}

#[test]
fn hostile_corpus_is_refused_without_side_effects() {
    let cases = testkit::hostile_cases();
    assert!(cases.len() >= 40);
    for case in &cases {
        run_case(case, false);
        run_case(case, true);
    }
}

#[test]
fn fixtures_are_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/fixtures/archive");
    let regen = std::env::var_os("ZLAYER_REGEN_FIXTURES").is_some();
    let cases = testkit::hostile_cases();
    let mut index = String::from("# name expected-error (generated by src/archive/testkit.rs)\n");
    for c in &cases {
        index.push_str(&format!("{} {}\n", c.name, c.expect));
        let path = dir.join(format!("{}.tar.zst", c.name));
        if regen {
            fs::create_dir_all(&dir).unwrap();
            fs::write(&path, &c.compressed).unwrap();
        }
        let on_disk = fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (set ZLAYER_REGEN_FIXTURES=1)", path.display()));
        assert_eq!(
            on_disk, c.compressed,
            "{} is stale (set ZLAYER_REGEN_FIXTURES=1)",
            c.name
        );
    }
    if regen {
        fs::write(dir.join("cases.txt"), &index).unwrap();
    }
    assert_eq!(fs::read_to_string(dir.join("cases.txt")).unwrap(), index);
}

#[test]
fn digest_mismatch_is_caught_before_anything_is_created() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"data").unwrap();
    let (spool, stats) = pack(&src, t.path(), 1);
    let target = t.path().join("target");
    let wrong = "0".repeat(64);
    let err = unpack_file(&spool, &wrong, &target, &UnpackOptions::default(), None).unwrap_err();
    match err {
        ArchiveError::DigestMismatch {
            expected,
            actual,
            archive,
        } => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, stats.digest);
            assert_eq!(archive, spool);
        }
        other => panic!("{other:?}"),
    }
    assert!(!target.exists());
    assert_no_staging(t.path());
    let err = unpack_file(
        &spool,
        "sha256:xyz",
        &target,
        &UnpackOptions::default(),
        None,
    )
    .unwrap_err();
    assert!(matches!(err, ArchiveError::InvalidDigest { .. }), "{err:?}");
    // a flipped byte in the spool is a mismatch too
    let mut bytes = fs::read(&spool).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&spool, &bytes).unwrap();
    let err = unpack_file(
        &spool,
        &stats.digest,
        &target,
        &UnpackOptions::default(),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(err, ArchiveError::DigestMismatch { .. }),
        "{err:?}"
    );
}

#[test]
fn size_and_ratio_caps() {
    let t = tempfile::tempdir().unwrap();
    let bomb = testkit::bomb();
    let spool = t.path().join("bomb.tar.zst");
    fs::write(&spool, &bomb.compressed).unwrap();
    let digest = hex::encode(Sha256::digest(&bomb.compressed));
    let target = t.path().join("target");
    let err = unpack_file(&spool, &digest, &target, &UnpackOptions::default(), None).unwrap_err();
    assert!(
        matches!(err, ArchiveError::RatioExceeded { ratio: 10_000, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("bomb.tar.zst"));
    let opts = UnpackOptions {
        max_ratio: u64::MAX,
        max_uncompressed: 1 << 20,
        ..UnpackOptions::default()
    };
    let err = unpack_file(&spool, &digest, &target, &opts, None).unwrap_err();
    assert!(
        matches!(err, ArchiveError::TooLarge { limit: 1048576, .. }),
        "{err:?}"
    );
    assert!(!target.exists());
    // with caps raised, the same archive restores (as a sparse file)
    let opts = UnpackOptions {
        max_ratio: u64::MAX,
        ..UnpackOptions::default()
    };
    unpack_file(&spool, &digest, &target, &opts, None).unwrap();
    let m = fs::metadata(target.join("zeros")).unwrap();
    assert_eq!(m.len(), 256 << 20);
    assert!(
        m.blocks() < 64,
        "restored zeros must be a hole, got {} blocks",
        m.blocks()
    );
}

#[test]
fn truncated_spools_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let noise: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect();
    fs::write(src.join("f"), &noise).unwrap();
    let (spool, _) = pack(&src, t.path(), 1);
    let full = fs::read(&spool).unwrap();
    for cut in [full.len() - 1, full.len() - 4, full.len() / 2, 20] {
        let part = &full[..cut];
        let p = t.path().join("cut.tar.zst");
        fs::write(&p, part).unwrap();
        let digest = hex::encode(Sha256::digest(part));
        let target = t.path().join("target");
        let err = unpack_file(&p, &digest, &target, &UnpackOptions::default(), None).unwrap_err();
        assert!(
            matches!(err, ArchiveError::Truncated { .. }),
            "cut {cut}: {err:?}"
        );
        assert!(!target.exists());
    }
    assert_no_staging(t.path());
}

#[test]
fn foreign_archives_without_root_entry_get_a_default_root() {
    let t = tempfile::tempdir().unwrap();
    let mut tar = RawTar::new();
    tar.dir("etc/")
        .file("etc/hosts", b"127.0.0.1 localhost\n")
        .end();
    let z = testkit::zstd(&tar.buf);
    let spool = t.path().join("foreign.tar.zst");
    fs::write(&spool, &z).unwrap();
    let target = t.path().join("target");
    let stats = unpack_file(
        &spool,
        &hex::encode(Sha256::digest(&z)),
        &target,
        &UnpackOptions::default(),
        None,
    )
    .unwrap();
    assert_eq!(stats.entries, 2);
    assert_eq!(
        fs::read(target.join("etc/hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    assert_eq!(fs::metadata(&target).unwrap().mode() & 0o7777, 0o755);
}

#[test]
fn fingerprint_tracks_content_metadata_and_xattrs_but_not_atime() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("up");
    fs::create_dir_all(root.join("d")).unwrap();
    let f = root.join("d/f");
    fs::write(&f, b"aaaa").unwrap();
    let mut last = fingerprint(&root).unwrap();
    assert_eq!(last, fingerprint(&root).unwrap());
    let mut changed = |what: &str| {
        let now = fingerprint(&root).unwrap();
        assert_ne!(now, last, "{what} must change the fingerprint");
        last = now;
    };
    // same size, same mtime: only ctime reveals the write
    let m = fs::metadata(&f).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(&f, b"bbbb").unwrap();
    set_mtime(&f, m.mtime(), m.mtime_nsec());
    changed("content");
    chmod(&f, 0o600);
    changed("chmod");
    chown(&f, 42, 43);
    changed("chown");
    set_xattr(&f, "user.k", b"v");
    changed("xattr");
    set_mtime(&f, 1_000_000, 1);
    changed("mtime");
    fs::write(root.join("d/new"), b"").unwrap();
    changed("new file");
    fs::remove_file(root.join("d/new")).unwrap();
    changed("removal");
    // atime only: a read (relatime updates atime here because atime <= mtime)
    let before = fingerprint(&root).unwrap();
    let atime_before = fs::metadata(&f).unwrap().atime();
    let mut s = String::new();
    File::open(&f).unwrap().read_to_string(&mut s).unwrap();
    assert_ne!(
        fs::metadata(&f).unwrap().atime(),
        atime_before,
        "the read must move atime"
    );
    assert_eq!(before, fingerprint(&root).unwrap());
    // the root's own ctime/inode are ignored: a renamed copy of the root keeps the fingerprint
    let moved = t.path().join("moved");
    fs::rename(&root, &moved).unwrap();
    assert_eq!(before, fingerprint(&moved).unwrap());
}

#[test]
fn mount_options_select_the_xattr_namespace() {
    let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        XattrNs::from_mount_options(&o(&["lowerdir=/a", "userxattr"])),
        XattrNs::User
    );
    assert_eq!(
        XattrNs::from_mount_options(&o(&["index=off,userxattr,upperdir=/u"])),
        XattrNs::User
    );
    assert_eq!(
        XattrNs::from_mount_options(&o(&["lowerdir=/userxattr", "index=off"])),
        XattrNs::Trusted
    );
    assert_eq!(XattrNs::from_mount_options(&[]), XattrNs::Trusted);
    assert_eq!(XattrNs::User.overlay_xattr("opaque"), "user.overlay.opaque");
}

#[test]
fn large_files_stream_with_bounded_buffers() {
    // A 40 MiB file crosses many 1 MiB buffer boundaries on both sides.
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let mut f = File::create(src.join("big")).unwrap();
    let chunk: Vec<u8> = (0..(1 << 20) + 7).map(|i: u32| (i % 251) as u8).collect();
    for _ in 0..40 {
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    let (spool, stats) = pack(&src, t.path(), 2);
    let dst = t.path().join("dst");
    unpack_file(&spool, &stats.digest, &dst, &UnpackOptions::default(), None).unwrap();
    let a = Sha256::digest(fs::read(src.join("big")).unwrap());
    let b = Sha256::digest(fs::read(dst.join("big")).unwrap());
    assert_eq!(a, b);
}

/// Every restore path writes the staging tree back before it takes the target's name, and
/// writes the name back before returning (absent target: rename; empty target: exchange).
#[test]
fn restores_are_durable_before_they_are_swapped_in() {
    use super::target::durability::{self, Op};
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/f"), b"data").unwrap();
    let (spool, stats) = pack(&src, t.path(), 1);
    let opts = UnpackOptions::default();
    type Restore<'a> = Box<dyn Fn(&Path) -> Result<UnpackStats> + 'a>;
    let paths: Vec<(&str, Restore<'_>)> = vec![
        (
            "unpack_file",
            Box::new(|dst: &Path| unpack_file(&spool, &stats.digest, dst, &opts, None)),
        ),
        (
            "unpack_reader",
            Box::new(|dst: &Path| {
                let name = spool.as_path();
                let f = File::open(name).unwrap();
                let size = stats.compressed_size;
                unpack_reader(f, name, size, &stats.digest, dst, &opts, None)
            }),
        ),
        (
            "copy_tree",
            Box::new(|dst: &Path| copy_tree(&src, dst, &opts)),
        ),
    ];
    for (what, restore) in &paths {
        for existing_empty in [false, true] {
            let dst = t.path().join(format!("{what}-{existing_empty}"));
            if existing_empty {
                fs::create_dir(&dst).unwrap();
            }
            durability::take();
            restore(&dst).unwrap();
            assert_eq!(
                durability::take(),
                [Op::SyncStagingTree, Op::Swap, Op::SyncParent],
                "{what}, target existed: {existing_empty}"
            );
            assert_eq!(fs::read(dst.join("d/f")).unwrap(), b"data");
        }
    }
    // A refused restore neither syncs nor swaps anything.
    durability::take();
    let bad = "0".repeat(64);
    unpack_file(&spool, &bad, &t.path().join("bad"), &opts, None).unwrap_err();
    assert_eq!(durability::take(), []);
    assert_no_staging(t.path());
}

/// The staging dir is private (0700) while the tree is extracted into it, whatever the umask,
/// and gets the archived root's mode only when it is complete.
#[test]
fn restore_staging_is_private_until_finished() {
    use crate::util::private::testing::{for_each_umask, mode_of};
    use std::sync::Mutex;
    for_each_umask(|mask| {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        // Incompressible and above the 4 MiB progress step, so progress fires mid-restore.
        let mut data = vec![0u8; 6 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for b in &mut data {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        fs::write(src.join("big"), &data).unwrap();
        chmod(&src.join("big"), 0o640);
        chmod(&src, 0o751);
        let (spool, stats) = pack(&src, t.path(), 1);
        let parent = t.path().join("restore");
        fs::create_dir(&parent).unwrap();
        let seen = Mutex::new(Vec::new());
        let progress = |_: u64| {
            for e in fs::read_dir(&parent).unwrap() {
                let p = e.unwrap().path();
                seen.lock().unwrap().push(mode_of(&p));
            }
        };
        let dst = parent.join("upper");
        unpack_file(&spool, &stats.digest, &dst, &root_opts(), Some(&progress)).unwrap();
        let seen = seen.into_inner().unwrap();
        assert!(!seen.is_empty(), "progress never saw the staging dir");
        let octal: Vec<String> = seen.iter().map(|m| format!("{m:04o}")).collect();
        assert!(
            seen.iter().all(|m| *m == 0o700),
            "umask {mask:03o}: {octal:?}"
        );
        assert_eq!(mode_of(&dst), 0o751);
        assert_eq!(mode_of(&dst.join("big")), 0o640);
    });
}
