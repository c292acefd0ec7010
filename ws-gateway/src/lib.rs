//! The `lookout` service: the glue between sources (`ingest`), sampling (`sampler`) and the
//! command line. Later issues add the model engine, the WebSocket gateway and the REST API.
#![forbid(unsafe_code, clippy::print_stdout, clippy::print_stderr)]

pub mod clip;
pub mod server;
pub mod tensors;
pub(crate) mod watch;
