//! Container layer identity and synchronisation.

pub mod types;
