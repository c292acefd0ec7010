//! The Lookout web UI (Yew, wasm32).
//!
//! Not implemented yet: this crate is a placeholder in the workspace layout; the UI arrives with
//! its own issue and will depend on `protocol` only.
#![forbid(unsafe_code)]
