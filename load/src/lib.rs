//! tern-load: model files on disk to host-side weights in one canonical ternary representation,
//! and the text side that comes with them. It knows nothing of backends or of the runtime: the
//! `tern` crate re-exports its modules under the same names.
//!
//! - [`config`]: `config.json` (and GGUF metadata) to one [`config::ModelConfig`];
//! - [`ternary`]: the canonical ternary and dense matrices, and memory-mapped files;
//! - [`source`]: [`source::ModelSource`], weights served one piece at a time;
//! - [`loader`]: Hugging Face directories (safetensors) and the entry point for every format;
//! - [`gguf`]: GGUF files (reading, the quantization types' decoders, the vocabulary, writing);
//! - [`tokenizer`], [`chat`]: text to token ids and back, and the chat template.

pub mod chat;
pub mod config;
pub mod gguf;
pub mod loader;
pub mod source;
pub mod ternary;
pub mod tokenizer;
