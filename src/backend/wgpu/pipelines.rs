//! The WGSL kernels, their bind-group layouts, and caches of compiled pipelines and bind groups.
//!
//! Every kernel's binding 0 is its parameter block: a read-only window of the parameter arena
//! bound with a dynamic offset (see `buffers::ParamArena`), so a bind group depends only on the
//! kernel and its data buffers and is built once per combination, then reused for every step.
//! Pipelines are compiled on first use. Shader variants are chosen by text: a feature-specific
//! snippet (`bitlinear_reduce_*.wgsl`, `table_*.wgsl`) is prepended to the op family's source.

use super::buffers::GBuf;
use super::device::Gpu;
use anyhow::{Context, Result};
use std::collections::HashMap;

const BITLINEAR: &str = include_str!("../../../shaders/bitlinear.wgsl");
const REDUCE_SUBGROUP: &str = include_str!("../../../shaders/bitlinear_reduce_subgroup.wgsl");
const REDUCE_WORKGROUP: &str = include_str!("../../../shaders/bitlinear_reduce_workgroup.wgsl");
const NORM: &str = include_str!("../../../shaders/norm.wgsl");
const ATTENTION: &str = include_str!("../../../shaders/attention.wgsl");
const ELEMENTWISE: &str = include_str!("../../../shaders/elementwise.wgsl");
const TABLE: &str = include_str!("../../../shaders/table.wgsl");
const TABLE_F32: &str = include_str!("../../../shaders/table_f32.wgsl");
const TABLE_F16: &str = include_str!("../../../shaders/table_f16.wgsl");
const TABLE_F16_PACKED: &str = include_str!("../../../shaders/table_f16_packed.wgsl");
const TABLE_BF16: &str = include_str!("../../../shaders/table_bf16.wgsl");

/// Invocations per workgroup in every kernel (`WG` in the shaders).
pub const WORKGROUP: u32 = 64;
/// Tokens per accumulator tile of the ternary product (`TILE` in bitlinear.wgsl).
pub const TOKEN_TILE: usize = 8;
/// Largest head dimension attention supports (`MAX_HEAD_DIM` in attention.wgsl).
pub const MAX_HEAD_DIM: usize = 256;
/// Words of the attention parameter header before the (slot, position) pairs (`ROWS_AT`).
pub const ATTENTION_ROWS_AT: usize = 8;
/// Words of the embed parameter header before the token ids.
pub const EMBED_TOKENS_AT: usize = 4;

/// Element type of a dense table as stored on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TableType {
    F32,
    F16,
    Bf16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    Quantize,
    /// The ternary product for at most `TOKEN_TILE` tokens (decode).
    Gemv,
    /// The ternary product for more tokens (prefill).
    Gemm,
    RmsNorm,
    RopeAppend,
    Attend,
    Gated,
    Add,
    Embed(TableType),
    Logits(TableType),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}
use Access::{Read, Write};

impl Kernel {
    fn entry_point(self) -> &'static str {
        match self {
            Kernel::Quantize => "quantize",
            Kernel::Gemv => "gemv",
            Kernel::Gemm => "gemm",
            Kernel::RmsNorm => "rms_norm",
            Kernel::RopeAppend => "rope_append",
            Kernel::Attend => "attend",
            Kernel::Gated => "gated",
            Kernel::Add => "add",
            Kernel::Embed(_) => "embed",
            Kernel::Logits(_) => "logits",
        }
    }

    /// The data bindings after the parameter block, in the order `dispatch` receives buffers.
    fn bindings(self) -> &'static [(u32, Access)] {
        match self {
            Kernel::Quantize => &[(1, Read), (2, Write), (3, Write)],
            Kernel::Gemv | Kernel::Gemm => {
                &[(4, Read), (5, Read), (6, Read), (7, Read), (8, Write)]
            }
            Kernel::RmsNorm => &[(1, Read), (2, Read), (3, Write)],
            Kernel::RopeAppend => &[(1, Write), (2, Read), (3, Write), (4, Write)],
            Kernel::Attend => &[(5, Read), (6, Read), (7, Read), (8, Write)],
            Kernel::Gated => &[(1, Read), (2, Write)],
            Kernel::Add => &[(3, Write), (4, Read)],
            Kernel::Embed(_) => &[(1, Read), (2, Write)],
            Kernel::Logits(_) => &[(1, Read), (3, Read), (4, Write)],
        }
    }

    /// The module source for this kernel on a device with the given features.
    fn source(self, gpu: &Gpu) -> String {
        let table_prelude = |t: TableType| match t {
            TableType::F32 => TABLE_F32,
            TableType::F16 if gpu.f16 => TABLE_F16,
            TableType::F16 => TABLE_F16_PACKED,
            TableType::Bf16 => TABLE_BF16,
        };
        let (prelude, body) = match self {
            Kernel::Quantize | Kernel::Gemv | Kernel::Gemm if gpu.subgroups => {
                (REDUCE_SUBGROUP, BITLINEAR)
            }
            Kernel::Quantize | Kernel::Gemv | Kernel::Gemm => (REDUCE_WORKGROUP, BITLINEAR),
            Kernel::RmsNorm => ("", NORM),
            Kernel::RopeAppend | Kernel::Attend => ("", ATTENTION),
            Kernel::Gated | Kernel::Add => ("", ELEMENTWISE),
            Kernel::Embed(t) | Kernel::Logits(t) => (table_prelude(t), TABLE),
        };
        format!("{prelude}\n{body}")
    }
}

struct Compiled {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// Compiled pipelines and bind groups, each created once.
#[derive(Default)]
pub struct Pipelines {
    compiled: HashMap<Kernel, Compiled>,
    bind_groups: HashMap<(Kernel, Vec<u64>), wgpu::BindGroup>,
}

impl Pipelines {
    fn compiled(&mut self, gpu: &Gpu, kernel: Kernel) -> Result<&Compiled> {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.compiled.entry(kernel) {
            slot.insert(
                compile(gpu, kernel)
                    .with_context(|| format!("cannot build the `{kernel:?}` GPU kernel"))?,
            );
        }
        Ok(&self.compiled[&kernel])
    }

    /// The pipeline and a bind group of `params` (a `window`-byte dynamic-offset binding) and
    /// `buffers` for `kernel`.
    pub fn prepare(
        &mut self,
        gpu: &Gpu,
        kernel: Kernel,
        params: &GBuf,
        window: u64,
        buffers: &[&GBuf],
    ) -> Result<(wgpu::ComputePipeline, wgpu::BindGroup)> {
        let pipeline = self.compiled(gpu, kernel)?.pipeline.clone();
        let key = (
            kernel,
            std::iter::once(params.id)
                .chain(buffers.iter().map(|b| b.id))
                .collect::<Vec<_>>(),
        );
        if let Some(group) = self.bind_groups.get(&key) {
            return Ok((pipeline, group.clone()));
        }
        let layout = &self.compiled[&kernel].layout;
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &params.buffer,
                offset: 0,
                size: wgpu::BufferSize::new(window),
            }),
        }];
        entries.extend(
            kernel
                .bindings()
                .iter()
                .zip(buffers)
                .map(|(&(binding, _), b)| wgpu::BindGroupEntry {
                    binding,
                    resource: b.buffer.as_entire_binding(),
                }),
        );
        let group = gpu.scoped(&format!("a bind group for `{kernel:?}`"), |d| {
            d.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(kernel.entry_point()),
                layout,
                entries: &entries,
            })
        })?;
        self.bind_groups.insert(key, group.clone());
        Ok((pipeline, group))
    }

    /// Forgets bind groups (e.g. after the buffers they name were dropped).
    pub fn clear_bind_groups(&mut self) {
        self.bind_groups.clear();
    }

    /// How many data buffers `kernel` takes.
    pub fn arity(kernel: Kernel) -> usize {
        kernel.bindings().len()
    }
}

fn storage(binding: u32, read_only: bool, dynamic: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: dynamic,
            min_binding_size: None,
        },
        count: None,
    }
}

fn compile(gpu: &Gpu, kernel: Kernel) -> Result<Compiled> {
    let source = kernel.source(gpu);
    let name = kernel.entry_point();
    gpu.scoped(&format!("the `{name}` shader"), |d| {
        let module = d.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let mut entries = vec![storage(0, true, true)];
        entries.extend(
            kernel
                .bindings()
                .iter()
                .map(|&(binding, access)| storage(binding, access == Read, false)),
        );
        let layout = d.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(name),
            entries: &entries,
        });
        let pipeline_layout = d.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(name),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(name),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(name),
            compilation_options: Default::default(),
            cache: None,
        });
        Compiled { pipeline, layout }
    })
}
