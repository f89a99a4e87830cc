//! Host probes and syscall seams, kept apart so the logic that uses them is testable without root.

pub mod overlay;
pub mod private;
