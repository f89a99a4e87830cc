//! Finding the overlay upper dir mounted at a path, from `/proc/self/mountinfo`.
//!
//! At poststop the runc shim still has the container's rootfs mounted at `<bundle>/rootfs` in
//! the host mount namespace (it unmounts after `runc delete` returns), so the overlay's
//! `upperdir=` names the snapshot without asking containerd.
//!
//! Line format (proc(5)): `id parent major:minor root mount-point options [optional…] - fstype
//! source super-options`. The kernel escapes space, tab, newline and backslash in paths as
//! `\ooo` octal, and overlay also escapes `,` inside option values, so splitting the super
//! options on `,` before unescaping is exact.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::util::mountinfo::unescape;

/// The filesystem type and super options of the last (topmost) mount at `mount_point`.
fn last_mount_at<'a>(mountinfo: &'a [u8], mount_point: &[u8]) -> Option<(&'a [u8], &'a [u8])> {
    let mut found = None;
    for line in mountinfo.split(|b| *b == b'\n') {
        let mut fields = line.split(|b| *b == b' ');
        // id, parent, major:minor, root, then the mount point.
        let Some(point) = fields.nth(4) else {
            continue;
        };
        // Cheap pre-check: escaping only lengthens a path.
        if point.len() < mount_point.len() || unescape(point) != mount_point {
            continue;
        }
        let mut after_separator = fields.skip_while(|f| *f != b"-").skip(1);
        let (Some(fstype), Some(_source), Some(options)) = (
            after_separator.next(),
            after_separator.next(),
            after_separator.next(),
        ) else {
            continue;
        };
        found = Some((fstype, options));
    }
    found
}

/// The `upperdir=` of the overlay mounted at `mount_point`, if the topmost mount there is one.
#[must_use]
pub fn overlay_upper(mountinfo: &[u8], mount_point: &Path) -> Option<PathBuf> {
    let (fstype, options) = last_mount_at(mountinfo, mount_point.as_os_str().as_bytes())?;
    if fstype != b"overlay" {
        return None;
    }
    options
        .split(|b| *b == b',')
        .find_map(|o| o.strip_prefix(b"upperdir="))
        .map(|v| PathBuf::from(OsString::from_vec(unescape(v))))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
25 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
301 25 0:55 / /run/containerd/io.containerd.runtime.v2.task/default/c1/rootfs rw,relatime shared:160 - overlay overlay rw,lowerdir=/var/lib/zl/snapshots/1/fs,upperdir=/var/lib/zl/snapshots/7/fs,workdir=/var/lib/zl/snapshots/7/work
302 25 0:56 / /run/containerd/io.containerd.runtime.v2.task/default/c2/rootfs rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/var/lib/zl/snapshots/8/fs,workdir=/w
";

    fn upper(text: &str, at: &str) -> Option<PathBuf> {
        overlay_upper(text.as_bytes(), Path::new(at))
    }

    #[test]
    fn finds_the_upper_dir_of_the_overlay_at_the_rootfs() {
        assert_eq!(
            upper(
                SAMPLE,
                "/run/containerd/io.containerd.runtime.v2.task/default/c1/rootfs"
            ),
            Some(PathBuf::from("/var/lib/zl/snapshots/7/fs"))
        );
        assert_eq!(
            upper(
                SAMPLE,
                "/run/containerd/io.containerd.runtime.v2.task/default/c2/rootfs"
            ),
            Some(PathBuf::from("/var/lib/zl/snapshots/8/fs"))
        );
        // A prefix of a mount point is not that mount point.
        assert_eq!(
            upper(
                SAMPLE,
                "/run/containerd/io.containerd.runtime.v2.task/default/c1"
            ),
            None
        );
        assert_eq!(upper(SAMPLE, "/"), None, "ext4: no upper dir");
        assert_eq!(upper("", "/x"), None);
    }

    #[test]
    fn decodes_octal_escapes_in_mount_points_and_option_values() {
        let text = "40 25 0:60 / /tmp/my\\040bundle/rootfs rw - overlay overlay \
                    rw,lowerdir=/l\\054x,upperdir=/data/a\\054b\\040c\\134d/fs,workdir=/w\n";
        assert_eq!(
            upper(text, "/tmp/my bundle/rootfs"),
            Some(PathBuf::from("/data/a,b c\\d/fs"))
        );
        assert_eq!(upper(text, "/tmp/my\\040bundle/rootfs"), None);
        assert_eq!(unescape(b"a\\011b\\012c"), b"a\tb\nc");
        // Not an escape: kept verbatim (short, non-octal, or past a byte).
        assert_eq!(unescape(b"a\\9zz\\12"), b"a\\9zz\\12");
        assert_eq!(unescape(b"\\777"), b"\\777");
        // Non-UTF-8 bytes come through.
        assert_eq!(
            upper("1 1 0:1 / /r rw - overlay o upperdir=/u\\377\n", "/r"),
            Some(PathBuf::from(OsString::from_vec(b"/u\xff".to_vec())))
        );
    }

    #[test]
    fn the_last_mount_at_a_mount_point_wins() {
        let stacked = format!(
            "{SAMPLE}\
             400 301 0:70 / /run/containerd/io.containerd.runtime.v2.task/default/c1/rootfs rw - overlay overlay rw,lowerdir=/l,upperdir=/newer/fs,workdir=/w\n"
        );
        let at = "/run/containerd/io.containerd.runtime.v2.task/default/c1/rootfs";
        assert_eq!(upper(&stacked, at), Some(PathBuf::from("/newer/fs")));
        // A bind mount on top hides the overlay: no upper dir (the daemon resolves by id).
        let bind = format!("{stacked}401 400 254:1 /src {at} rw - ext4 /dev/vda1 rw\n");
        assert_eq!(upper(&bind, at), None);
    }

    #[test]
    fn optional_fields_and_truncated_lines_are_handled() {
        let text = "\
50 25 0:80 / /r rw shared:3 master:2 propagate_from:1 unbindable - overlay overlay rw,upperdir=/u1\n\
51 25 0:81 / /r rw - overlay\n\
52 25 0:82 / /q\n";
        assert_eq!(upper(text, "/r"), Some(PathBuf::from("/u1")));
        assert_eq!(upper(text, "/q"), None);
        // Overlay without an upper dir (read-only view).
        assert_eq!(
            upper(
                "60 25 0:90 / /v ro - overlay overlay ro,lowerdir=/a:/b\n",
                "/v"
            ),
            None
        );
    }
}
