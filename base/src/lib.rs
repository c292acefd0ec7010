//! Plumbing shared by the Lookout crates, kept in one small place (the role moonfire-nvr's
//! `base` crate plays): the [`shutdown`] signal that every thread and task of a pipeline obeys.
#![forbid(unsafe_code, clippy::print_stdout, clippy::print_stderr)]

pub mod shutdown;
