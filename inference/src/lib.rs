//! Qwen3-VL on candle: the vision tower, the text decoder, the processor and the streaming engine.
//!
//! Not implemented yet: this crate is a placeholder in the workspace layout. Nothing in Lookout
//! runs a model today; `lookout sample` stops at the model's input tensors.
#![forbid(unsafe_code)]
