//! Host probes and syscall seams, kept apart so the logic that uses them is testable without root.

/// Pausing one container through its cgroup freezer, for checkpoints.
pub mod freezer;
pub mod overlay;
/// Private (0600/0700) files and directories; lives in the leaf `util` so `archive` can use it.
pub use crate::util::private;
pub mod socket;
pub mod systemd;
