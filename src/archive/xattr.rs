//! Which xattrs travel in an archive, and how overlay-private ones are treated.
//!
//! Portable xattrs (`user.*` except `user.overlay.*`, `security.*`, POSIX ACLs) are stored as
//! `SCHILY.xattr.*`. Overlay-private xattrs live under `trusted.overlay.` or `user.overlay.`
//! (the latter with `userxattr` mounts); both are treated as private because the mount mode is
//! not known at archive time. Of those, `opaque` becomes a `.wh..wh..opq` entry, `protattr`
//! travels under a neutral PAX key, bookkeeping (`origin`, `impure`, `uuid`, `nlink`, `upper`)
//! is stripped, and `metacopy`/`redirect` make the upper non-portable.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use super::error::{ArchiveError, Result, io_err};

/// PAX key carrying overlay's `protattr` (chattr +i/+a through the mount).
pub const PROTATTR_PAX_KEY: &str = "ZLAYER.overlay.protattr";
/// PAX key prefix of stored xattrs (the de-facto standard used by GNU tar, libarchive, Go).
pub const XATTR_PAX_PREFIX: &str = "SCHILY.xattr.";

const OVERLAY_PREFIXES: [&[u8]; 2] = [b"trusted.overlay.", b"user.overlay."];

/// The overlay-private suffix of `name` (`opaque` for `trusted.overlay.opaque`), if any.
pub fn overlay_suffix(name: &[u8]) -> Option<&[u8]> {
    OVERLAY_PREFIXES.iter().find_map(|p| name.strip_prefix(*p))
}

/// Whether an xattr belongs in (and may be restored from) an archive.
pub fn is_portable(name: &[u8]) -> bool {
    if overlay_suffix(name).is_some() {
        return false;
    }
    (name.starts_with(b"user.") && name.len() > 5)
        || (name.starts_with(b"security.") && name.len() > 9)
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

/// What the walker learned from one inode's xattrs.
#[derive(Debug, Default)]
pub struct Classified {
    /// Portable xattrs, sorted by name.
    pub portable: Vec<(Vec<u8>, Vec<u8>)>,
    /// `overlay.opaque = "y"`.
    pub opaque: bool,
    /// The value of `overlay.protattr`.
    pub protattr: Option<Vec<u8>>,
}

/// Where xattrs are read from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// An open file or directory (the walker's race-free way).
    Fd(BorrowedFd<'a>),
    /// A path whose final symlink is not followed (special files, which cannot be opened for
    /// reading without side effects).
    Path,
}

/// Reads and classifies the xattrs of the inode at `path` (read through `src`).
pub fn read_classified(path: &Path, src: Source<'_>) -> Result<Classified> {
    let mut out = Classified::default();
    let names = list(path, src).map_err(io_err("list xattrs of", path))?;
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if let Some(suffix) = overlay_suffix(name) {
            let display = String::from_utf8_lossy(name).into_owned();
            match suffix {
                b"origin" | b"impure" | b"uuid" | b"nlink" | b"upper" => {}
                b"metacopy" | b"redirect" => {
                    return Err(ArchiveError::NotPortable {
                        path: path.to_owned(),
                        xattr: display,
                    });
                }
                b"opaque" => {
                    let value = get(path, src, name).map_err(io_err("read xattr of", path))?;
                    if value != b"y" {
                        return Err(ArchiveError::UnknownOverlayXattr {
                            path: path.to_owned(),
                            xattr: format!("{display}={}", String::from_utf8_lossy(&value)),
                        });
                    }
                    out.opaque = true;
                }
                b"protattr" => {
                    out.protattr =
                        Some(get(path, src, name).map_err(io_err("read xattr of", path))?);
                }
                _ => {
                    return Err(ArchiveError::UnknownOverlayXattr {
                        path: path.to_owned(),
                        xattr: display,
                    });
                }
            }
        } else if is_portable(name) {
            let value = get(path, src, name).map_err(io_err("read xattr of", path))?;
            out.portable.push((name.to_vec(), value));
        } else {
            tracing::debug!(path = %path.display(), xattr = %String::from_utf8_lossy(name), "xattr not archived");
        }
    }
    out.portable.sort();
    Ok(out)
}

/// `flistxattr`/`llistxattr`, growing the buffer as needed; unsupported filesystems yield no
/// names.
pub fn list(path: &Path, src: Source<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 1024];
    loop {
        let res = match src {
            Source::Fd(fd) => rustix::fs::flistxattr(fd, &mut buf[..]),
            Source::Path => rustix::fs::llistxattr(path, &mut buf[..]),
        };
        match res {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => {
                let need = match src {
                    Source::Fd(fd) => rustix::fs::flistxattr_query(fd)?,
                    Source::Path => rustix::fs::llistxattr_query(path)?,
                };
                buf.resize(need.max(buf.len() * 2), 0);
            }
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// `fgetxattr`/`lgetxattr`, growing the buffer as needed.
fn get(path: &Path, src: Source<'_>, name: &[u8]) -> io::Result<Vec<u8>> {
    let name = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name);
    let mut buf = vec![0u8; 256];
    loop {
        let res = match src {
            Source::Fd(fd) => rustix::fs::fgetxattr(fd, name, &mut buf[..]),
            Source::Path => rustix::fs::lgetxattr(path, name, &mut buf[..]),
        };
        match res {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => {
                let need = match src {
                    Source::Fd(fd) => rustix::fs::fgetxattr_query(fd, name)?,
                    Source::Path => rustix::fs::lgetxattr_query(path, name)?,
                };
                buf.resize(need.max(buf.len() * 2), 0);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Borrows `fd` as an xattr source.
pub fn of_fd(fd: &impl AsFd) -> Source<'_> {
    Source::Fd(fd.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist() {
        assert!(is_portable(b"user.foo"));
        assert!(is_portable(b"security.capability"));
        assert!(is_portable(b"security.selinux"));
        assert!(is_portable(b"system.posix_acl_access"));
        assert!(is_portable(b"system.posix_acl_default"));
        assert!(!is_portable(b"user.overlay.opaque"));
        assert!(!is_portable(b"trusted.overlay.opaque"));
        assert!(!is_portable(b"trusted.foo"));
        assert!(!is_portable(b"system.nfs4_acl"));
        assert!(!is_portable(b"user."));
    }

    #[test]
    fn overlay_suffixes() {
        assert_eq!(
            overlay_suffix(b"trusted.overlay.origin"),
            Some(&b"origin"[..])
        );
        assert_eq!(
            overlay_suffix(b"user.overlay.redirect"),
            Some(&b"redirect"[..])
        );
        assert_eq!(overlay_suffix(b"user.overlayfoo"), None);
    }
}
