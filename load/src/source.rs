//! Where a model's weights come from, one piece at a time: [`ModelSource`].
//!
//! The loaders (a safetensors directory, a GGUF file), the random-weight generator
//! (`tern::bench::RandomSource`) and the in-memory [`HostModel`] implement it.
//! `tern::model::Model::upload` asks for the tables and the final norm, then for one layer at a
//! time: each layer is read from the memory-mapped file (or generated), converted to the canonical
//! layout of [`crate::ternary`], handed to the backend, which repacks it into its own layout, and
//! dropped before the next one is read. So the memory a load needs is the backend's final footprint
//! plus one layer in the canonical layout (and the conversion's temporaries of one tensor), never
//! the whole model twice. Tables a loader finds in a dtype the backends read as is stay in the
//! mapped file ([`crate::ternary::DenseData::Mapped`]).
//!
//! A source returns [`Cow`]s: the in-memory model lends its tensors, a streaming source hands over
//! what it has just built.

use crate::config::ModelConfig;
use crate::ternary::{DenseMatrix, TernaryMatrix};
use anyhow::{Result, ensure};
use std::borrow::Cow;

/// A model's weights, served piece by piece in the canonical layout.
pub trait ModelSource {
    fn config(&self) -> &ModelConfig;
    /// Where the weights come from and how they are stored, for `tern info` and logs.
    fn format(&self) -> &str;
    /// Token embedding, `[vocab, hidden]`.
    fn embed(&self) -> Result<Cow<'_, DenseMatrix>>;
    /// Output head `[vocab, hidden]`; `None` when tied to the embedding.
    fn output(&self) -> Result<Option<Cow<'_, DenseMatrix>>>;
    fn final_norm(&self) -> Result<Cow<'_, [f32]>>;
    /// Layer `index` (`< config().layers`).
    fn layer(&self, index: usize) -> Result<Cow<'_, HostLayer>>;
}

/// One transformer block's weights.
#[derive(Clone, Debug)]
pub struct HostLayer {
    pub attn_norm: Vec<f32>,
    pub q: TernaryMatrix,
    pub k: TernaryMatrix,
    pub v: TernaryMatrix,
    pub attn_sub_norm: Option<Vec<f32>>,
    pub o: TernaryMatrix,
    pub ffn_norm: Vec<f32>,
    pub gate: TernaryMatrix,
    pub up: TernaryMatrix,
    pub ffn_sub_norm: Option<Vec<f32>>,
    pub down: TernaryMatrix,
}

impl HostLayer {
    pub fn linears(&self) -> [&TernaryMatrix; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }
}

/// A whole model in host memory: what tests, the weight goldens and small tools inspect. Loading
/// for inference streams from the file instead ([`crate::loader::open_model`]).
#[derive(Clone, Debug)]
pub struct HostModel {
    pub config: ModelConfig,
    /// Where the weights came from and how they were stored, for `tern info` and logs.
    pub format: String,
    /// Token embedding, `[vocab, hidden]`.
    pub embed: DenseMatrix,
    /// Output head `[vocab, hidden]`; `None` when tied to the embedding.
    pub output: Option<DenseMatrix>,
    pub final_norm: Vec<f32>,
    pub layers: Vec<HostLayer>,
}

impl HostModel {
    /// Reads every piece of `source` into memory.
    pub fn collect(source: &dyn ModelSource) -> Result<Self> {
        let config = source.config().clone();
        let layers = (0..config.layers)
            .map(|l| source.layer(l).map(Cow::into_owned))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            format: source.format().to_string(),
            embed: source.embed()?.into_owned(),
            output: source.output()?.map(Cow::into_owned),
            final_norm: source.final_norm()?.into_owned(),
            layers,
            config,
        })
    }

    /// The matrix the logits are computed with.
    pub fn head(&self) -> &DenseMatrix {
        self.output.as_ref().unwrap_or(&self.embed)
    }

    /// Ternary weights, in parameters and in packed bytes.
    pub fn ternary_size(&self) -> (usize, usize) {
        self.config.ternary_size()
    }
}

impl ModelSource for HostModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn format(&self) -> &str {
        &self.format
    }

    fn embed(&self) -> Result<Cow<'_, DenseMatrix>> {
        Ok(Cow::Borrowed(&self.embed))
    }

    fn output(&self) -> Result<Option<Cow<'_, DenseMatrix>>> {
        Ok(self.output.as_ref().map(Cow::Borrowed))
    }

    fn final_norm(&self) -> Result<Cow<'_, [f32]>> {
        Ok(Cow::Borrowed(&self.final_norm))
    }

    fn layer(&self, index: usize) -> Result<Cow<'_, HostLayer>> {
        ensure!(
            index < self.layers.len(),
            "layer {index} of a model with {} layers",
            self.layers.len()
        );
        Ok(Cow::Borrowed(&self.layers[index]))
    }
}
