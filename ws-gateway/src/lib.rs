//! The `lookout` service: it owns the watches and serves them.
//!
//! - `watch`: a watch is one source's pipeline (source → decode → frame ring → windows →
//!   engine → events), owned by the server, with its threads and tasks joined when it stops; a
//!   registry holds the running ones and clients subscribe to their events.
//! - `monitors`: standing watches kept in the store, run without a viewer and across restarts,
//!   their history written by one task and pruned by retention.
//! - `alerts`: rules decided on each window's answer as it streams, and incidents with key
//!   frames; each change and its notifications stored together (the outbox).
//! - `notify`: delivery from the outbox (signed webhooks, MQTT with Home Assistant discovery),
//!   at least once and across restarts.
//! - [`store`]: monitors, history, incidents and the outbox behind one narrow interface (SQLite
//!   for one node, PostgreSQL for several).
//! - `cluster`: with several nodes, the lease loop that decides which node runs each monitor
//!   (heartbeats, claims, hand-over, failover).
//! - [`server`]: the accept loop (HTTP/1.1 with a header-read timeout), the one API key check,
//!   the axum routes (WebSocket sessions that start or follow watches, monitors, the REST and
//!   OpenAI-style APIs with constrained answers, WHIP, uploads, metrics, the embedded UI) and the
//!   service's settings.
//! - [`clip`] and [`tensors`]: clip mode (`lookout sample`), a whole file sampled as the reference
//!   does, and its safetensors output.
#![forbid(unsafe_code, clippy::print_stdout, clippy::print_stderr)]

pub(crate) mod alerts;
pub mod clip;
pub(crate) mod cluster;
pub(crate) mod monitors;
pub(crate) mod notify;
pub mod server;
pub mod store;
pub mod tensors;
pub(crate) mod watch;
