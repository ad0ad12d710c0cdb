//! tern: an inference runtime for 1.58-bit (ternary, BitNet b1.58) language models.
//!
//! Layers, innermost first (dependencies point inward):
//! - [`config`], [`ternary`], [`source`], [`loader`], [`gguf`] (the `tern-load` crate, re-exported
//!   here), [`hub`]: files on disk to host-side weights in one canonical ternary representation.
//!   They know nothing of backends.
//! - [`backend`]: the [`backend::Backend`] trait every device implements, and the CPU backend.
//! - [`kv_cache`] and [`model`]: the KV-cache manager and the BitNet transformer graph, written only
//!   against the `Backend` trait; [`capture`]: the names of the graph's intermediates and a way to
//!   read them.
//! - [`tokenizer`], [`chat`] (from `tern-load` too), [`sampler`]: text in, token ids out, and back.
//! - [`engine`], [`perplexity`], [`bench`]: generation, evaluation and benchmarking on top of the model.
//! - [`server`]: `tern serve`, an OpenAI-compatible HTTP server with a continuously batching scheduler.
//! - The `tern` binary (`src/main.rs`) is the only place that chooses a backend.

pub use tern_load::{chat, config, gguf, loader, source, ternary, tokenizer};

pub mod backend;
pub mod bench;
pub mod capture;
pub mod engine;
pub mod hub;
pub mod kv_cache;
pub mod model;
pub mod perplexity;
pub mod sampler;
pub mod server;
