//! The `lookout` service: it owns the watches and serves them.
//!
//! - `watch`: a watch is one source's pipeline (source → decode → frame ring → windows →
//!   engine → events), owned by the server, with its threads and tasks joined when it stops; a
//!   registry holds the running ones and clients subscribe to their events.
//! - [`server`]: the axum routes (WebSocket sessions that start or follow watches, the REST and
//!   OpenAI-style APIs, WHIP, uploads, metrics, the embedded UI) and the service's settings.
//! - [`clip`] and [`tensors`]: clip mode (`lookout sample`), a whole file sampled as the reference
//!   does, and its safetensors output.
#![forbid(unsafe_code, clippy::print_stdout, clippy::print_stderr)]

pub mod clip;
pub(crate) mod monitors;
pub mod server;
pub mod store;
pub mod tensors;
pub(crate) mod watch;
