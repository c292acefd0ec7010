//! Wire types shared by the Lookout server and its clients.
//!
//! Empty for now: the WebSocket session protocol and the REST bodies (ARCHITECTURE.md) land here
//! with the streaming service. The crate has no dependencies that would keep it from compiling
//! for `wasm32-unknown-unknown`.
#![forbid(unsafe_code)]
