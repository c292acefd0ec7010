//! Runnable examples for Lookout; see the files next to this crate's `Cargo.toml`.
