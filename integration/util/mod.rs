//! Shared helpers for integration tests.
pub mod containerd;
pub mod garage;
pub mod image;
pub mod require;
