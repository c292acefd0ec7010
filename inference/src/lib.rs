//! Qwen3-VL on candle: the vision tower, the text decoder, the processor and the streaming engine.
//!
//! - [`files::ModelFiles`] finds a checkpoint in the Hugging Face layout (a local directory or a
//!   Hub id), [`config::Config`] reads `config.json` in both serializer layouts.
//! - [`model::Qwen3VL`] is the model: [`vision::VisionModel`] (patch embedding, interpolated
//!   learned positions, 2-D rotary attention within each frame pair, mergers, DeepStack taps) and
//!   [`text::TextModel`] (interleaved MRoPE, q/k RMSNorm, GQA, DeepStack injection, a growing KV
//!   cache).
//! - [`processor::Processor`] renders the chat template, expands video placeholders with their
//!   timestamps, tokenizes and computes 3-D positions ([`positions`]).
//! - [`answer`] constrains answers while decoding (a choice, a regex, a JSON schema) with
//!   llguidance and reports when an answer is decided.
//! - [`reuse::VisionCache`] keeps each frame pair's vision features for the overlapping
//!   windows that contain it again.
//! - [`engine::Engine`] owns a loaded model on its own thread, serves several requests at once
//!   (continuous batching: chunked vision and prefill between batched decode steps, admission
//!   within a KV budget, interactive first and sources in turn) and streams
//!   [`engine::EngineEvent`]s for each request.
//!
//! - [`gemm`] is the CPU GEMM of the model's linears (weights packed at load, AVX-512 or AVX2
//!   tiles chosen by the CPU's features); it and the other CPU kernels run their loops on
//!   candle's own worker pool (`parallel`).
//!
//! Everything follows `reference/qwen3-vl.md` and is checked against transformers 5.24.0 by the
//! tests in `tests/`.
#![deny(unsafe_code)]
#![forbid(clippy::print_stdout, clippy::print_stderr)]

pub mod answer;
pub mod config;
pub mod device;
pub mod engine;
mod fastmath;
pub mod files;
pub mod gemm;
pub mod model;
mod ops;
mod parallel;
pub mod positions;
pub mod processor;
pub mod reuse;
pub mod sampling;
pub mod text;
pub mod vision;

pub use candle_core::DType;
pub use device::{DeviceChoice, parse_dtype};
pub use engine::{
    Engine, EngineEvent, FinishReason, GenerationParams, LoadOptions, Priority, Request, Schedule, Slot, Timings,
    Usage, VideoInput,
};

/// Everything that can go wrong in this crate, by fault.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The checkpoint's files are missing or unreadable.
    #[error("model files: {0}")]
    Files(String),
    /// The Hub could not be reached.
    #[error("{0}")]
    Hub(String),
    /// `config.json` is invalid or unsupported.
    #[error("model config: {0}")]
    Config(String),
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed.
    #[error("chat template: {0}")]
    Template(String),
    /// The request does not fit the model.
    #[error("invalid request: {0}")]
    Input(String),
    /// The device cannot be used.
    #[error("device: {0}")]
    Device(String),
    /// A tensor operation failed.
    #[error("model: {0}")]
    Model(String),
    /// The request queue is full.
    #[error("the engine queue is full ({0} requests waiting); try again later")]
    QueueFull(usize),
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Model(e.to_string())
    }
}
