//! The WGSL kernels, their bind-group layouts, and caches of compiled pipelines and bind groups.
//!
//! Bindings are declared once, in the WGSL: a kernel's bind-group layout is what its entry point
//! uses ([`reflect`](super::reflect)), and `dispatch` names each data buffer as the WGSL names it.
//! Every kernel has one parameter block (a struct of `params`): a read-only window of the
//! parameter arena bound with a dynamic offset (see `buffers::ParamArena`), so a bind group
//! depends only on the kernel and its data buffers and is built once per combination, then
//! reused for every step. Pipelines are compiled on first use. Shader variants are chosen by
//! text: a feature-specific snippet (`bitlinear_reduce_*.wgsl`, `table_*.wgsl`) is prepended to
//! the op family's source.

use super::buffers::GBuf;
use super::device::Gpu;
use super::params::KernelParams;
use super::reflect::{Binding, EntryBindings, Reflected};
use crate::backend::KvType;
use anyhow::{Context, Result, anyhow, bail, ensure};
use std::collections::HashMap;

const BITLINEAR: &str = include_str!("../../../shaders/bitlinear.wgsl");
const REDUCE_SUBGROUP: &str = include_str!("../../../shaders/bitlinear_reduce_subgroup.wgsl");
const REDUCE_WORKGROUP: &str = include_str!("../../../shaders/bitlinear_reduce_workgroup.wgsl");
const NORM: &str = include_str!("../../../shaders/norm.wgsl");
const ATTENTION: &str = include_str!("../../../shaders/attention.wgsl");
const ATTENTION_KV_F32: &str = include_str!("../../../shaders/attention_kv_f32.wgsl");
const ATTENTION_KV_F16: &str = include_str!("../../../shaders/attention_kv_f16.wgsl");
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
    /// RoPE and the KV-cache append, for a cache of the given element type.
    RopeAppend(KvType),
    Attend(KvType),
    Gated,
    Add,
    Embed(TableType),
    Logits(TableType),
}

impl Kernel {
    fn entry_point(self) -> &'static str {
        match self {
            Kernel::Quantize => "quantize",
            Kernel::Gemv => "gemv",
            Kernel::Gemm => "gemm",
            Kernel::RmsNorm => "rms_norm",
            Kernel::RopeAppend(_) => "rope_append",
            Kernel::Attend(_) => "attend",
            Kernel::Gated => "gated",
            Kernel::Add => "add",
            Kernel::Embed(_) => "embed",
            Kernel::Logits(_) => "logits",
        }
    }

    /// The module source for this kernel on a device with (`f16`) shader-f16 and (`subgroups`)
    /// subgroup operations.
    fn source(self, f16: bool, subgroups: bool) -> String {
        let table_prelude = |t: TableType| match t {
            TableType::F32 => TABLE_F32,
            TableType::F16 if f16 => TABLE_F16,
            TableType::F16 => TABLE_F16_PACKED,
            TableType::Bf16 => TABLE_BF16,
        };
        let (prelude, body) = match self {
            Kernel::Quantize | Kernel::Gemv | Kernel::Gemm if subgroups => {
                (REDUCE_SUBGROUP, BITLINEAR)
            }
            Kernel::Quantize | Kernel::Gemv | Kernel::Gemm => (REDUCE_WORKGROUP, BITLINEAR),
            Kernel::RmsNorm => ("", NORM),
            Kernel::RopeAppend(KvType::F32) | Kernel::Attend(KvType::F32) => {
                (ATTENTION_KV_F32, ATTENTION)
            }
            Kernel::RopeAppend(KvType::F16) | Kernel::Attend(KvType::F16) => {
                (ATTENTION_KV_F16, ATTENTION)
            }
            Kernel::Gated | Kernel::Add => ("", ELEMENTWISE),
            Kernel::Embed(t) | Kernel::Logits(t) => (table_prelude(t), TABLE),
        };
        format!("{prelude}\n{body}")
    }
}

struct Compiled {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    /// The parameter block's struct type name and binding.
    params_type: &'static str,
    params_binding: u32,
    /// Data bindings by binding number.
    data: Vec<Binding>,
}

/// Compiled pipelines and bind groups, each created once.
#[derive(Default)]
pub struct Pipelines {
    compiled: HashMap<Kernel, Compiled>,
    bind_groups: HashMap<(Kernel, Vec<u64>), wgpu::BindGroup>,
}

impl Pipelines {
    fn compiled<P: KernelParams>(&mut self, gpu: &Gpu, kernel: Kernel) -> Result<&Compiled> {
        let params_type = P::LAYOUT.name;
        if let std::collections::hash_map::Entry::Vacant(slot) = self.compiled.entry(kernel) {
            slot.insert(
                compile::<P>(gpu, kernel)
                    .with_context(|| format!("cannot build the `{kernel:?}` GPU kernel"))?,
            );
        }
        let compiled = &self.compiled[&kernel];
        ensure!(
            compiled.params_type == params_type,
            "`{kernel:?}` takes {} parameters, not {params_type}",
            compiled.params_type
        );
        Ok(compiled)
    }

    /// The pipeline of `kernel` and a bind group of its parameter block (a `window`-byte
    /// dynamic-offset binding of `params` holding a `P`) and its data buffers, each named as the
    /// kernel's WGSL names it.
    pub fn prepare<P: KernelParams>(
        &mut self,
        gpu: &Gpu,
        kernel: Kernel,
        (params, window): (&GBuf, u64),
        buffers: &[(&str, &GBuf)],
    ) -> Result<(wgpu::ComputePipeline, wgpu::BindGroup)> {
        self.compiled::<P>(gpu, kernel)?;
        let compiled = &self.compiled[&kernel];
        // The given buffers in binding order, each binding named exactly once.
        let named: Vec<&GBuf> = compiled
            .data
            .iter()
            .map(|b| match buffers.iter().find(|(name, _)| *name == b.name) {
                Some((_, buf)) => Ok(*buf),
                None => Err(anyhow!("`{kernel:?}` needs a buffer for `{}`", b.name)),
            })
            .collect::<Result<_>>()?;
        if let Some((name, _)) = buffers
            .iter()
            .find(|(name, _)| !compiled.data.iter().any(|b| b.name == *name))
        {
            bail!("`{kernel:?}` binds no buffer `{name}`");
        }
        ensure!(
            buffers.len() == compiled.data.len(),
            "`{kernel:?}`: a buffer is named twice"
        );
        let pipeline = compiled.pipeline.clone();
        let key = (
            kernel,
            std::iter::once(params.id)
                .chain(named.iter().map(|b| b.id))
                .collect::<Vec<_>>(),
        );
        if let Some(group) = self.bind_groups.get(&key) {
            return Ok((pipeline, group.clone()));
        }
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: compiled.params_binding,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &params.buffer,
                offset: 0,
                size: wgpu::BufferSize::new(window),
            }),
        }];
        entries.extend(
            compiled
                .data
                .iter()
                .zip(&named)
                .map(|(b, buf)| wgpu::BindGroupEntry {
                    binding: b.binding,
                    resource: buf.buffer.as_entire_binding(),
                }),
        );
        let group = gpu.scoped(&format!("a bind group for `{kernel:?}`"), |d| {
            d.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(kernel.entry_point()),
                layout: &compiled.layout,
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

fn compile<P: KernelParams>(gpu: &Gpu, kernel: Kernel) -> Result<Compiled> {
    let source = kernel.source(gpu.f16, gpu.subgroups);
    let name = kernel.entry_point();
    let params_type = P::LAYOUT.name;
    let reflected = Reflected::new(&source)?;
    reflected.check_mirror(&P::LAYOUT, P::TAIL.as_ref())?;
    let EntryBindings { params, data } = reflected.bindings(name, params_type)?;
    ensure!(params.read_only, "`{name}` may write its parameter block");
    gpu.scoped(&format!("the `{name}` shader"), |d| {
        let module = d.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let mut entries = vec![storage(params.binding, true, true)];
        entries.extend(data.iter().map(|b| storage(b.binding, b.read_only, false)));
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
        Compiled {
            pipeline,
            layout,
            params_type,
            params_binding: params.binding,
            data,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::wgpu::params;

    /// Every kernel in every shader variant (shader-f16 and subgroups on and off).
    fn every_source() -> Vec<(Kernel, bool, bool, String)> {
        let tables = [TableType::F32, TableType::F16, TableType::Bf16];
        let kernels = [
            Kernel::Quantize,
            Kernel::Gemv,
            Kernel::Gemm,
            Kernel::RmsNorm,
            Kernel::RopeAppend(KvType::F32),
            Kernel::RopeAppend(KvType::F16),
            Kernel::Attend(KvType::F32),
            Kernel::Attend(KvType::F16),
            Kernel::Gated,
            Kernel::Add,
        ]
        .into_iter()
        .chain(tables.map(Kernel::Embed))
        .chain(tables.map(Kernel::Logits));
        kernels
            .flat_map(|k| {
                [(false, false), (true, false), (false, true), (true, true)]
                    .map(|(f16, sg)| (k, f16, sg, k.source(f16, sg)))
            })
            .collect()
    }

    #[test]
    fn rust_and_wgsl_layouts_agree() {
        let mut seen = std::collections::HashSet::new();
        for (kernel, f16, sg, source) in every_source() {
            let module = Reflected::new(&source)
                .unwrap_or_else(|e| panic!("{kernel:?} (f16 {f16}, subgroups {sg}): {e:#}"));
            // Each parameter block a kernel binds has a Rust mirror with the same layout.
            for name in module.bound_struct_types() {
                let Some((layout, tail)) = params::ALL.iter().find(|(l, _)| l.name == name) else {
                    panic!("{name} (`{kernel:?}`) has no Rust mirror in params::ALL");
                };
                if let Err(e) = module.check_mirror(layout, tail.as_ref()) {
                    panic!("`{kernel:?}` (f16 {f16}, subgroups {sg}): {e:#}");
                }
                seen.insert(layout.name);
            }
        }
        for (layout, _) in params::ALL {
            assert!(
                seen.contains(layout.name),
                "no shader declares {}",
                layout.name
            );
        }
    }
}
