//! Shared helpers for integration tests.
pub mod containerd;
pub mod image;
pub mod garage;
