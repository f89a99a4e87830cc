//! Integration tests against real components.
