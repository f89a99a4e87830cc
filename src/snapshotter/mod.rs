//! snapshotter (in progress)
