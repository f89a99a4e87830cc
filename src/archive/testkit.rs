//! Builders for hand-made (mostly hostile) archives, and the fixture corpus generated from them.
//!
//! The corpus is committed under `integration/fixtures/archive/` (used by the integration
//! test); `fixtures_are_current` checks that the files match this generator.

use tar::{EntryType, Header};

use super::tarout::pax_record;

/// Raw tar bytes, header by header, with no validation at all.
#[derive(Debug, Default)]
pub struct RawTar {
    pub buf: Vec<u8>,
}

pub fn header(path: &[u8], etype: EntryType, size: u64) -> Header {
    let mut h = Header::new_ustar();
    if let Some(u) = h.as_ustar_mut() {
        let n = path.len().min(100);
        u.name[..n].copy_from_slice(&path[..n]);
    }
    h.set_mode(if etype == EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(size);
    h.set_entry_type(etype);
    h
}

impl RawTar {
    pub fn new() -> Self {
        RawTar::default()
    }

    pub fn raw(&mut self, mut h: Header, data: &[u8]) -> &mut Self {
        h.set_cksum();
        self.buf.extend_from_slice(h.as_bytes());
        self.data(data)
    }

    fn data(&mut self, data: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(data);
        let rem = data.len() % 512;
        if rem != 0 {
            self.buf.extend(std::iter::repeat_n(0u8, 512 - rem));
        }
        self
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.raw(header(path.as_bytes(), EntryType::Directory, 0), &[])
    }

    pub fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.raw(
            header(path.as_bytes(), EntryType::Regular, data.len() as u64),
            data,
        )
    }

    pub fn link(&mut self, etype: EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = header(path.as_bytes(), etype, 0);
        if let Some(u) = h.as_ustar_mut() {
            u.linkname[..target.len()].copy_from_slice(target.as_bytes());
        }
        self.raw(h, &[])
    }

    pub fn device(&mut self, etype: EntryType, path: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = header(path.as_bytes(), etype, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.raw(h, &[])
    }

    pub fn pax(&mut self, records: &[(&[u8], &[u8])]) -> &mut Self {
        let mut body = Vec::new();
        for (k, v) in records {
            pax_record(&mut body, k, v);
        }
        let h = header(b"././@PaxHeader", EntryType::XHeader, body.len() as u64);
        self.raw(h, &body)
    }

    pub fn end(&mut self) -> &mut Self {
        self.buf.extend_from_slice(&[0u8; 1024]);
        self
    }
}

pub fn zstd(tar: &[u8]) -> Vec<u8> {
    zstd::encode_all(tar, 3).unwrap()
}

/// One corpus archive and the `ArchiveError` variant it must produce.
#[derive(Debug)]
pub struct Case {
    pub name: &'static str,
    pub expect: &'static str,
    pub compressed: Vec<u8>,
}

fn case(name: &'static str, expect: &'static str, tar: &RawTar) -> Case {
    Case {
        name,
        expect,
        compressed: zstd(&tar.buf),
    }
}

/// The hostile corpus. Every archive starts with a valid root entry where that matters.
pub fn hostile_cases() -> Vec<Case> {
    use EntryType::*;
    let mut v = Vec::new();
    let t = || {
        let mut t = RawTar::new();
        t.dir("./");
        t
    };
    v.push(case(
        "dotdot",
        "UnsafePath",
        t().file("./../escape", b"x").end(),
    ));
    v.push(case(
        "dotdot_nested",
        "UnsafePath",
        t().dir("./a/").file("./a/../../escape", b"x").end(),
    ));
    v.push(case(
        "absolute",
        "UnsafePath",
        t().file("/abs-escape", b"x").end(),
    ));
    v.push(case(
        "root_not_dir",
        "UnsafePath",
        RawTar::new().file("./", b"x").end(),
    ));
    v.push(case(
        "nul_in_pax_path",
        "UnsafePath",
        t().pax(&[(b"path", b"a\0b")])
            .file("./placeholder", b"x")
            .end(),
    ));
    v.push(case(
        "symlink_escape_relative",
        "EscapesTarget",
        t().link(Symlink, "./link", "..")
            .file("./link/escape", b"x")
            .end(),
    ));
    v.push(case(
        "symlink_escape_absolute",
        "EscapesTarget",
        t().link(Symlink, "./link", "/tmp")
            .file("./link/escape", b"x")
            .end(),
    ));
    v.push(case(
        "symlink_chain_escape",
        "EscapesTarget",
        t().link(Symlink, "./a", "b")
            .link(Symlink, "./b", "../..")
            .dir("./a/sub/")
            .end(),
    ));
    v.push(case(
        "hardlink_dotdot",
        "UnsafePath",
        t().link(Link, "./x", "../outside/secret").end(),
    ));
    v.push(case(
        "hardlink_absolute",
        "UnsafePath",
        t().link(Link, "./x", "/etc/passwd").end(),
    ));
    v.push(case(
        "hardlink_missing",
        "BadLinkTarget",
        t().link(Link, "./x", "./nope").end(),
    ));
    v.push(case(
        "hardlink_later",
        "BadLinkTarget",
        t().link(Link, "./x", "./y").file("./y", b"data").end(),
    ));
    v.push(case(
        "hardlink_through_symlink",
        "EscapesTarget",
        t().link(Symlink, "./l", "/etc")
            .link(Link, "./x", "./l/passwd")
            .end(),
    ));
    v.push(case(
        "hardlink_to_dir",
        "BadLinkTarget",
        t().dir("./d/").link(Link, "./x", "./d").end(),
    ));
    v.push(case(
        "duplicate_file",
        "DuplicateEntry",
        t().file("./a", b"1").file("./a", b"2").end(),
    ));
    v.push(case(
        "duplicate_dir",
        "DuplicateEntry",
        t().dir("./d/").dir("./d/").end(),
    ));
    v.push(case(
        "duplicate_root",
        "DuplicateEntry",
        t().dir("./").end(),
    ));
    v.push(case(
        "duplicate_opaque",
        "DuplicateEntry",
        t().dir("./d/")
            .file("./d/.wh..wh..opq", b"")
            .file("./d/.wh..wh..opq", b"")
            .end(),
    ));
    v.push(case(
        "whiteout_conflict",
        "DuplicateEntry",
        t().file("./a", b"1").file("./.wh.a", b"").end(),
    ));
    v.push(case(
        "symlink_then_file",
        "DuplicateEntry",
        t().link(Symlink, "./a", "/tmp/zlayer-hostile-target")
            .file("./a", b"x")
            .end(),
    ));
    v.push(case(
        "char_device",
        "DeviceNotAllowed",
        t().device(Char, "./null", 1, 3).end(),
    ));
    v.push(case(
        "block_device",
        "DeviceNotAllowed",
        t().device(Block, "./sda", 8, 0).end(),
    ));
    v.push(case(
        "whiteout_empty",
        "BadWhiteout",
        t().file("./.wh.", b"").end(),
    ));
    v.push(case(
        "whiteout_dot",
        "BadWhiteout",
        t().file("./.wh..", b"").end(),
    ));
    v.push(case(
        "whiteout_dotdot",
        "BadWhiteout",
        t().file("./.wh...", b"").end(),
    ));
    v.push(case(
        "whiteout_aufs_meta",
        "BadWhiteout",
        t().file("./.wh..wh.plnk", b"").end(),
    ));
    v.push(case(
        "whiteout_not_regular",
        "BadWhiteout",
        t().dir("./.wh.x/").end(),
    ));
    v.push(case(
        "pax_oversized",
        "HeaderTooLarge",
        t().pax(&[(b"comment", &vec![b'x'; 2 << 20])])
            .file("./a", b"x")
            .end(),
    ));
    let mut long = RawTar::new();
    long.dir("./");
    long.raw(
        header(b"././@LongLink", GNULongName, 3 << 20),
        &vec![b'a'; 3 << 20],
    )
    .file("./a", b"x")
    .end();
    v.push(case("gnu_longname_oversized", "HeaderTooLarge", &long));
    v.push(case(
        "pax_size_mismatch",
        "Malformed",
        t().pax(&[(b"size", b"5")]).file("./a", b"0123456789").end(),
    ));
    v.push(case(
        "xattr_overlay_redirect",
        "ForbiddenXattr",
        t().pax(&[(b"SCHILY.xattr.trusted.overlay.redirect", b"/etc")])
            .file("./a", b"x")
            .end(),
    ));
    v.push(case(
        "xattr_overlay_user_opaque",
        "ForbiddenXattr",
        t().pax(&[(b"SCHILY.xattr.user.overlay.opaque", b"y")])
            .dir("./d/")
            .end(),
    ));
    v.push(case(
        "xattr_trusted_other",
        "ForbiddenXattr",
        t().pax(&[(b"SCHILY.xattr.trusted.foo", b"1")])
            .file("./a", b"x")
            .end(),
    ));
    v.push(case(
        "gnu_sparse_pax",
        "Unsupported",
        t().pax(&[(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0")])
            .file("./a", b"x")
            .end(),
    ));
    let mut sparse = t();
    let mut h = header(b"./sparse", GNUSparse, 0);
    h.set_cksum();
    sparse.raw(h, &[]).end();
    v.push(case("gnu_sparse_entry", "Unsupported", &sparse));
    let mut global = t();
    global
        .raw(header(b"pax_global_header", XGlobalHeader, 0), &[])
        .end();
    v.push(case("global_pax_header", "Unsupported", &global));
    let mut bad_sum = t();
    let mut h = header(b"./a", Regular, 0);
    h.set_cksum();
    h.as_mut_bytes()[0] = b'b';
    bad_sum.buf.extend_from_slice(h.as_bytes());
    bad_sum.end();
    v.push(case("bad_checksum", "Malformed", &bad_sum));
    v.push(case(
        "missing_parent",
        "MissingParent",
        t().file("./nodir/x", b"x").end(),
    ));
    v.push(case(
        "file_in_whiteout",
        "MissingParent",
        t().file("./.wh.x", b"").file("./x/y", b"y").end(),
    ));
    let mut cut = t();
    cut.file("./big", &[7u8; 4096]);
    cut.buf.truncate(cut.buf.len() - 3000);
    v.push(case("truncated_in_data", "Truncated", &cut));
    v.push(case(
        "truncated_no_end_marker",
        "Truncated",
        t().file("./a", b"x"),
    ));
    v.push(case(
        "trailing_data",
        "TrailingData",
        t().file("./a", b"x").end().file("./b", b"y"),
    ));
    let full = zstd(&t().file("./a", &[1u8; 100_000]).end().buf);
    v.push(Case {
        name: "truncated_zstd",
        expect: "Truncated",
        compressed: full[..full.len() / 2].to_vec(),
    });
    v.push(Case {
        name: "not_zstd",
        expect: "Decompress",
        compressed: b"this is not a zstd frame at all, just text".to_vec(),
    });
    v.push(bomb());
    v
}

/// 256 MiB of zeros in one file: about 8 KiB compressed, far above the default 10,000x ratio.
pub fn bomb() -> Case {
    const SIZE: usize = 256 << 20;
    let mut head = RawTar::new();
    head.dir("./");
    head.raw(header(b"./zeros", EntryType::Regular, SIZE as u64), &[]);
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    std::io::Write::write_all(&mut enc, &head.buf).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(SIZE >> 20) {
        std::io::Write::write_all(&mut enc, &zeros).unwrap();
    }
    std::io::Write::write_all(&mut enc, &[0u8; 1024]).unwrap();
    Case {
        name: "zstd_bomb",
        expect: "RatioExceeded",
        compressed: enc.finish().unwrap(),
    }
}
