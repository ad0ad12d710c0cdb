//! The wgpu backend: every op as a portable WGSL compute shader (shaders/*.wgsl), on any Vulkan,
//! Metal or DX12 GPU.
//!
//! # Layouts
//! - Activations: one f32 storage buffer per handle, pooled by size class
//!   ([`buffers::ActivationPool`]); row-major `rows × width` as the trait says.
//! - Linears: 16 ternary codes per u32 (see [`buffers`]) plus one f32 scale per output row.
//! - Tables: checkpoint dtype, split by rows under the storage binding limit.
//! - KV cache: per layer, one K and one V buffer `[page][position in page][kv_heads · head_dim]`
//!   f32 (the trait's paged pool, split by layer so that each buffer stays under the binding
//!   limit), the page table (uploaded when it changed since the last attention call), and a RoPE
//!   table of (cos, sin) per (position, pair) computed once on the host.
//!
//! # Execution
//! Ops record compute passes into one pending command encoder; their parameters go into the
//! parameter arena. Nothing reaches the GPU until [`Backend::read`] (or [`Backend::write`], which
//! must not overtake earlier ops) submits the encoder, so a forward pass is one submission and
//! one wait. Pipelines and bind groups are created once and reused.
//!
//! # Numerics
//! The W1.58A8 product is bit-identical to the CPU reference: the activation scale, the codes
//! (f32 multiply, round half to even) and the integer sums are exact, and the two divisions are
//! correctly rounded in the shader. Norm, attention and the head sum in f32 in a different order
//! than the CPU and agree within float tolerance.

mod buffers;
mod device;
mod params;
mod pipelines;
mod reflect;
#[cfg(target_os = "linux")]
mod wayland_log;

pub use device::{WgpuOptions, adapters};

use super::gpu_upload::{self, CODES_PER_WORD};
use super::{
    Activations, Backend, KvSpec, KvType, LinearId, PageTable, TableId, TokenPosition, VectorId,
    allocated_kv, distinct_buffers, uploaded,
};
use crate::ternary::{DenseMatrix, TernaryMatrix};
use anyhow::{Result, anyhow, bail, ensure};
use buffers::{ActivationPool, GBuf, ParamArena, WINDOW};
use device::Gpu;
use params::{
    AddParams, AttentionParams, BitlinearParams, EmbedParams, GatedParams, KernelParams,
    LogitsParams, NormParams, QuantizeParams, SlotPosition,
};
use pipelines::{Kernel, MAX_HEAD_DIM, Pipelines, TOKEN_TILE, TableType, WORKGROUP};
use tern_cpu::elementwise::GateActivation;
use tern_cpu::table::DenseView;

struct Linear {
    weights: GBuf,
    scales: GBuf,
    out_features: usize,
    in_features: usize,
}

struct TablePiece {
    row_start: usize,
    row_end: usize,
    buffer: GBuf,
}

struct Table {
    rows: usize,
    cols: usize,
    ty: TableType,
    pieces: Vec<TablePiece>,
}

struct KvStorage {
    spec: KvSpec,
    rope: GBuf,
    keys: Vec<GBuf>,
    values: Vec<GBuf>,
    /// The page table the kernels read, and the host copy of what it holds.
    table: GBuf,
    uploaded: Vec<u32>,
}

/// Quantized activations for the largest batch seen so far.
struct QuantScratch {
    codes: GBuf,
    rows: GBuf,
    words: usize,
    row_capacity: usize,
}

pub struct WgpuBackend {
    gpu: Gpu,
    pipelines: Pipelines,
    arena: ParamArena,
    encoder: Option<wgpu::CommandEncoder>,
    activations: ActivationPool,
    linears: Vec<Linear>,
    vectors: Vec<(GBuf, usize)>,
    tables: Vec<Table>,
    kv: Option<KvStorage>,
    quant: Option<QuantScratch>,
    readback: Option<wgpu::Buffer>,
}

impl WgpuBackend {
    pub fn new(options: &WgpuOptions) -> Result<Self> {
        let gpu = Gpu::open(options)?;
        let arena = ParamArena::new(&gpu)?;
        Ok(Self {
            gpu,
            pipelines: Pipelines::default(),
            arena,
            encoder: None,
            activations: ActivationPool::default(),
            linears: Vec::new(),
            vectors: Vec::new(),
            tables: Vec::new(),
            kv: None,
            quant: None,
            readback: None,
        })
    }

    /// True on a software rasterizer (e.g. lavapipe), which is slower than the CPU backend.
    pub fn is_software(&self) -> bool {
        self.gpu.info.device_type == wgpu::DeviceType::Cpu
    }

    /// The adapter's name, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub fn adapter_name(&self) -> &str {
        &self.gpu.info.name
    }

    fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.encoder.get_or_insert_with(|| {
            self.gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("tern"),
                })
        })
    }

    /// Submits the pending work (without waiting) and reports device errors so far.
    fn flush(&mut self) -> Result<()> {
        if let Some(encoder) = self.encoder.take() {
            self.arena.upload(&self.gpu);
            self.gpu.queue.submit([encoder.finish()]);
        }
        self.gpu.check()
    }

    /// Records one dispatch of `groups` workgroups (spread over x and y beyond the per-dimension
    /// limit; kernels guard their index) times `z`, with the parameter block `params` + `tail`
    /// and each data buffer named as the kernel's WGSL names it.
    fn dispatch<P: KernelParams>(
        &mut self,
        kernel: Kernel,
        (params, tail): (&P, &[P::Tail]),
        buffers: &[(&str, &GBuf)],
        groups: usize,
        z: usize,
    ) -> Result<()> {
        if groups == 0 || z == 0 {
            return Ok(());
        }
        let max = self.gpu.limits.max_compute_workgroups_per_dimension as usize;
        let x = groups.min(max);
        let y = groups.div_ceil(x);
        ensure!(
            y <= max && z <= max,
            "{kernel:?}: {groups} x {z} workgroups exceed this GPU's dispatch limit"
        );
        let offset = match self.arena.push(params, tail)? {
            Some(offset) => offset,
            None => {
                self.flush()?;
                self.arena
                    .push(params, tail)?
                    .ok_or_else(|| anyhow!("kernel parameters do not fit an empty arena"))?
            }
        };
        let (pipeline, group) = self.pipelines.prepare::<P>(
            &self.gpu,
            kernel,
            (&self.arena.buffer, WINDOW),
            buffers,
        )?;
        let mut pass = self
            .encoder()
            .begin_compute_pass(&wgpu::ComputePassDescriptor::default());
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &group, &[offset]);
        pass.dispatch_workgroups(x as u32, y as u32, z as u32);
        Ok(())
    }

    /// Bytes of one layer's K (or V) buffer for a pool of `pages` pages, checked against the
    /// binding limit.
    fn kv_layer_bytes(&self, spec: &KvSpec, pages: usize) -> Result<u64> {
        let bytes = (pages * spec.page_bytes() / 2 / spec.layers.max(1)) as u64;
        ensure!(
            bytes <= self.gpu.max_binding,
            "the KV cache needs {} MiB per layer for K (and for V); this GPU binds at most {} \
             MiB (lower --ctx or --kv-memory)",
            bytes >> 20,
            self.gpu.max_binding >> 20
        );
        Ok(bytes)
    }

    /// New K and V buffers, one per layer, for a pool of `pages` pages.
    fn kv_buffers(&self, spec: &KvSpec, pages: usize) -> Result<(Vec<GBuf>, Vec<GBuf>)> {
        let bytes = self.kv_layer_bytes(spec, pages)?;
        let cache = |what: &str| -> Result<Vec<GBuf>> {
            (0..spec.layers)
                .map(|_| GBuf::new(&self.gpu, what, bytes, buffers::STORAGE))
                .collect()
        };
        Ok((cache("KV cache keys")?, cache("KV cache values")?))
    }

    fn act(&self, a: Activations, needed: usize, what: &str) -> Result<GBuf> {
        self.activations.get(a.0, needed, what).cloned()
    }

    fn table(&self, t: TableId) -> Result<&Table> {
        uploaded(&self.tables, t.0, "table")
    }

    /// Quantization scratch for `rows` rows of `words` code words each.
    fn quant_scratch(&mut self, rows: usize, words: usize) -> Result<(GBuf, GBuf)> {
        let fits = self
            .quant
            .as_ref()
            .is_some_and(|q| q.words >= rows * words && q.row_capacity >= rows);
        if !fits {
            let words = (rows * words).max(self.quant.as_ref().map_or(0, |q| q.words));
            let row_capacity = rows.max(self.quant.as_ref().map_or(0, |q| q.row_capacity));
            self.quant = Some(QuantScratch {
                codes: GBuf::new(
                    &self.gpu,
                    "quantized activations",
                    words as u64 * 4,
                    buffers::STORAGE,
                )?,
                rows: GBuf::new(
                    &self.gpu,
                    "activation scales",
                    row_capacity as u64 * 8,
                    buffers::STORAGE,
                )?,
                words,
                row_capacity,
            });
        }
        let q = self.quant.as_ref().expect("allocated above");
        Ok((q.codes.clone(), q.rows.clone()))
    }

    /// Checks that `rows` workgroups fit one dispatch dimension (kernels indexed by `wid.x` only).
    fn check_batch(&self, tokens: usize, what: &str) -> Result<()> {
        let max = self.gpu.limits.max_compute_workgroups_per_dimension as usize;
        ensure!(
            tokens <= max,
            "{what}: a batch of {tokens} tokens exceeds {max} (use smaller batches)"
        );
        Ok(())
    }
}

impl Backend for WgpuBackend {
    fn describe(&self) -> String {
        let on = |b: bool| if b { "on" } else { "off" };
        format!(
            "wgpu ({}, {:?} {:?}; shader-f16 {}, subgroups {})",
            self.gpu.info.name,
            self.gpu.info.backend,
            self.gpu.info.device_type,
            on(self.gpu.f16),
            on(self.gpu.subgroups)
        )
    }

    fn upload_linear(&mut self, parts: &[&TernaryMatrix]) -> Result<LinearId> {
        let (words, scales, cols) = gpu_upload::pack_ternary(parts, CODES_PER_WORD)?;
        let bytes = words.len() as u64 * 4;
        ensure!(
            bytes <= self.gpu.max_binding,
            "upload_linear: {bytes} bytes of packed weights exceed the GPU's storage binding \
             limit of {} bytes",
            self.gpu.max_binding
        );
        self.linears.push(Linear {
            weights: GBuf::with_data(&self.gpu, "ternary weights", bytemuck::cast_slice(&words))?,
            scales: GBuf::with_data(&self.gpu, "weight scales", bytemuck::cast_slice(&scales))?,
            out_features: scales.len(),
            in_features: cols,
        });
        Ok(LinearId(self.linears.len() - 1))
    }

    fn upload_vector(&mut self, values: &[f32]) -> Result<VectorId> {
        let buf = GBuf::with_data(&self.gpu, "vector", bytemuck::cast_slice(values))?;
        self.vectors.push((buf, values.len()));
        Ok(VectorId(self.vectors.len() - 1))
    }

    fn upload_table(&mut self, table: &DenseMatrix) -> Result<TableId> {
        let (bytes, ty, per): (&[u8], _, _) = match table.view() {
            DenseView::F32(v) => (bytemuck::cast_slice(v), TableType::F32, 4),
            DenseView::F16(v) => (bytemuck::cast_slice(v), TableType::F16, 2),
            DenseView::Bf16(v) => (bytemuck::cast_slice(v), TableType::Bf16, 2),
        };
        table.check_shape()?;
        let (rows, cols) = (table.rows, table.cols);
        let rows_per_piece = buffers::table_rows_per_piece(cols, per, self.gpu.table_piece)?;
        let mut pieces = Vec::new();
        for row_start in (0..rows).step_by(rows_per_piece.max(1)) {
            let row_end = (row_start + rows_per_piece).min(rows);
            let data = &bytes[row_start * cols * per..row_end * cols * per];
            pieces.push(TablePiece {
                row_start,
                row_end,
                buffer: GBuf::with_data(&self.gpu, "table", data)?,
            });
        }
        self.tables.push(Table {
            rows,
            cols,
            ty,
            pieces,
        });
        Ok(TableId(self.tables.len() - 1))
    }

    fn alloc(&mut self, len: usize) -> Result<Activations> {
        let (handle, buf, reused) = self.activations.alloc(&self.gpu, len)?;
        if reused {
            self.encoder().clear_buffer(&buf.buffer, 0, None);
        }
        Ok(Activations(handle))
    }

    fn free(&mut self, buffer: Activations) {
        self.activations.free(buffer.0);
    }

    fn write(&mut self, dst: Activations, data: &[f32]) -> Result<()> {
        let buf = self.act(dst, data.len(), "write")?;
        self.flush()?; // queued writes run before the next submission: keep earlier ops first
        self.gpu
            .queue
            .write_buffer(&buf.buffer, 0, bytemuck::cast_slice(data));
        Ok(())
    }

    fn read(&mut self, src: Activations, out: &mut [f32]) -> Result<()> {
        let buf = self.act(src, out.len(), "read")?;
        if out.is_empty() {
            return Ok(());
        }
        let bytes = (out.len() * 4) as u64;
        if self.readback.as_ref().is_none_or(|r| r.size() < bytes) {
            let size = bytes.next_power_of_two();
            self.readback = Some(self.gpu.scoped("the readback buffer", |d| {
                d.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("readback"),
                    size,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            })?);
        }
        let staging = self.readback.clone().expect("created above");
        self.encoder()
            .copy_buffer_to_buffer(&buf.buffer, 0, &staging, 0, bytes);
        self.flush()?;
        let slice = staging.slice(..bytes);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.gpu
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| anyhow!("waiting for the GPU failed: {e}"))?;
        self.gpu.check()?;
        rx.recv()
            .map_err(|_| anyhow!("the GPU never answered the readback"))?
            .map_err(|e| anyhow!("cannot map the readback buffer: {e}"))?;
        {
            let view = slice
                .get_mapped_range()
                .map_err(|e| anyhow!("cannot read the readback buffer: {e}"))?;
            // Byte-wise: the mapping need not be aligned for a cast to f32.
            for (o, b) in out.iter_mut().zip(view.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        staging.unmap();
        Ok(())
    }

    fn copy(
        &mut self,
        src: Activations,
        src_offset: usize,
        dst: Activations,
        dst_offset: usize,
        len: usize,
    ) -> Result<()> {
        distinct_buffers("copy", src, dst)?;
        let from = self.act(src, src_offset + len, "copy source")?;
        let to = self.act(dst, dst_offset + len, "copy destination")?;
        if len > 0 {
            self.encoder().copy_buffer_to_buffer(
                &from.buffer,
                src_offset as u64 * 4,
                &to.buffer,
                dst_offset as u64 * 4,
                len as u64 * 4,
            );
        }
        Ok(())
    }

    fn alloc_kv(&mut self, spec: &KvSpec) -> Result<()> {
        self.kv = None; // release the old cache before allocating the new one
        self.pipelines.clear_bind_groups();
        spec.check_geometry(MAX_HEAD_DIM)?;
        ensure!(
            spec.kv_type == KvType::F32 || spec.head_dim.is_multiple_of(4),
            "the wgpu backend's f16 KV cache needs head_dim a multiple of 4, not {} (use \
             --kv-type f32)",
            spec.head_dim
        );
        let (keys, values) = self.kv_buffers(spec, spec.pages)?;
        let rope = GBuf::with_data(
            &self.gpu,
            "RoPE table",
            bytemuck::cast_slice(&gpu_upload::rope_table(spec)?),
        )?;
        let uploaded = spec.contiguous_table();
        let table = GBuf::with_data(&self.gpu, "KV page table", bytemuck::cast_slice(&uploaded))?;
        self.kv = Some(KvStorage {
            spec: *spec,
            rope,
            keys,
            values,
            table,
            uploaded,
        });
        Ok(())
    }

    fn grow_kv(&mut self, pages: usize) -> Result<()> {
        let spec = allocated_kv(self.kv.as_ref())?.spec;
        ensure!(
            pages >= spec.pages,
            "grow_kv: {pages} pages would shrink a pool of {}",
            spec.pages
        );
        let (keys, values) = self.kv_buffers(&spec, pages)?;
        let bytes = self.kv_layer_bytes(&spec, spec.pages)?;
        let kv = self.kv.take().expect("checked above");
        for (old, new) in kv
            .keys
            .iter()
            .zip(&keys)
            .chain(kv.values.iter().zip(&values))
        {
            self.encoder()
                .copy_buffer_to_buffer(&old.buffer, 0, &new.buffer, 0, bytes);
        }
        self.pipelines.clear_bind_groups();
        self.kv = Some(KvStorage {
            spec: KvSpec { pages, ..spec },
            keys,
            values,
            ..kv
        });
        Ok(())
    }

    fn embed(&mut self, table: TableId, tokens: &[u32], out: Activations) -> Result<()> {
        let t = self.table(table)?;
        let (vocab, cols, ty) = (t.rows, t.cols, t.ty);
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {id} is outside the vocabulary of {vocab} tokens");
        }
        let pieces: Vec<_> = t
            .pieces
            .iter()
            .map(|p| (p.row_start, p.row_end, p.buffer.clone()))
            .collect();
        let dst = self.act(out, tokens.len() * cols, "embed")?;
        for (row_start, row_end, buffer) in pieces {
            let params = EmbedParams {
                tokens: tokens.len() as u32,
                cols: cols as u32,
                row_start: row_start as u32,
                row_end: row_end as u32,
            };
            let groups = (tokens.len() * cols).div_ceil(WORKGROUP as usize);
            self.dispatch(
                Kernel::Embed(ty),
                (&params, tokens),
                &[("table", &buffer), ("embed_out", &dst)],
                groups,
                1,
            )?;
        }
        Ok(())
    }

    fn rms_norm(
        &mut self,
        x: Activations,
        weight: VectorId,
        eps: f32,
        tokens: usize,
        out: Activations,
    ) -> Result<()> {
        let (w, width) = uploaded(&self.vectors, weight.0, "vector")?.clone();
        distinct_buffers("rms_norm", x, out)?;
        let src = self.act(x, tokens * width, "rms_norm")?;
        let dst = self.act(out, tokens * width, "rms_norm")?;
        let params = NormParams {
            tokens: tokens as u32,
            width: width as u32,
            eps,
        };
        self.dispatch(
            Kernel::RmsNorm,
            (&params, &[]),
            &[("x", &src), ("weight", &w), ("out", &dst)],
            tokens,
            1,
        )
    }

    fn bitlinear(
        &mut self,
        x: Activations,
        linear: LinearId,
        tokens: usize,
        out: Activations,
    ) -> Result<()> {
        let lin = uploaded(&self.linears, linear.0, "linear")?;
        let (weights, scales, n_out, cols) = (
            lin.weights.clone(),
            lin.scales.clone(),
            lin.out_features,
            lin.in_features,
        );
        distinct_buffers("bitlinear", x, out)?;
        let src = self.act(x, tokens * cols, "bitlinear")?;
        let dst = self.act(out, tokens * n_out, "bitlinear")?;
        if tokens == 0 {
            return Ok(());
        }
        self.check_batch(tokens, "bitlinear")?;
        let w_words = gpu_upload::padded_cols(cols, CODES_PER_WORD) / CODES_PER_WORD;
        let (codes, row_quant) = self.quant_scratch(tokens, 4 * w_words)?;
        let params = QuantizeParams {
            tokens: tokens as u32,
            cols: cols as u32,
            x_words: 4 * w_words as u32,
        };
        self.dispatch(
            Kernel::Quantize,
            (&params, &[]),
            &[("x", &src), ("qx_out", &codes), ("quant_out", &row_quant)],
            tokens,
            1,
        )?;
        let params = BitlinearParams {
            tokens: tokens as u32,
            out_features: n_out as u32,
            w_words: w_words as u32,
        };
        let buffers = [
            ("w", &weights),
            ("row_scale", &scales),
            ("qx", &codes),
            ("quant", &row_quant),
            ("out", &dst),
        ];
        if tokens <= TOKEN_TILE {
            self.dispatch(Kernel::Gemv, (&params, &[]), &buffers, n_out, 1)
        } else {
            let invocations = n_out * tokens.div_ceil(TOKEN_TILE);
            let groups = invocations.div_ceil(WORKGROUP as usize);
            self.dispatch(Kernel::Gemm, (&params, &[]), &buffers, groups, 1)
        }
    }

    fn attention(
        &mut self,
        layer: usize,
        qkv: Activations,
        tokens: &[TokenPosition],
        pages: &PageTable,
        out: Activations,
    ) -> Result<()> {
        let kv = allocated_kv(self.kv.as_ref())?;
        let spec = kv.spec;
        spec.check_tokens(layer, tokens, pages)?;
        if kv.uploaded != pages {
            // Ops already recorded read the old table: submit them before it changes.
            self.flush()?;
            let kv = self.kv.as_mut().expect("checked above");
            self.gpu
                .queue
                .write_buffer(&kv.table.buffer, 0, bytemuck::cast_slice(pages));
            kv.uploaded.copy_from_slice(pages);
        }
        let kv = self.kv.as_ref().expect("checked above");
        let (rope, keys, values, table) = (
            kv.rope.clone(),
            kv.keys[layer].clone(),
            kv.values[layer].clone(),
            kv.table.clone(),
        );
        distinct_buffers("attention", qkv, out)?;
        let q_dim = spec.heads * spec.head_dim;
        let src = self.act(qkv, tokens.len() * spec.qkv_width(), "attention qkv")?;
        let dst = self.act(out, tokens.len() * q_dim, "attention output")?;
        if tokens.is_empty() {
            return Ok(());
        }
        self.check_batch(tokens.len(), "attention")?;
        let params = AttentionParams {
            tokens: tokens.len() as u32,
            heads: spec.heads as u32,
            kv_heads: spec.kv_heads as u32,
            head_dim: spec.head_dim as u32,
            page_size: spec.page_size as u32,
            pages_per_slot: spec.pages_per_slot() as u32,
            inv_sqrt_d: 1.0 / (spec.head_dim as f32).sqrt(),
        };
        let rows: Vec<SlotPosition> = tokens
            .iter()
            .map(|r| SlotPosition {
                slot: r.slot as u32,
                position: r.position as u32,
            })
            .collect();
        self.dispatch(
            Kernel::RopeAppend(spec.kv_type),
            (&params, &rows),
            &[
                ("qkv_rw", &src),
                ("rope", &rope),
                ("page_table", &table),
                ("k_cache_rw", &keys),
                ("v_cache_rw", &values),
            ],
            tokens.len(),
            1,
        )?;
        self.dispatch(
            Kernel::Attend(spec.kv_type),
            (&params, &rows),
            &[
                ("qkv", &src),
                ("page_table", &table),
                ("k_cache", &keys),
                ("v_cache", &values),
                ("out", &dst),
            ],
            tokens.len() * spec.heads,
            1,
        )
    }

    fn gated(
        &mut self,
        gate_up: Activations,
        activation: GateActivation,
        tokens: usize,
        width: usize,
        out: Activations,
    ) -> Result<()> {
        distinct_buffers("gated", gate_up, out)?;
        let src = self.act(gate_up, tokens * 2 * width, "gated")?;
        let dst = self.act(out, tokens * width, "gated")?;
        let params = GatedParams {
            tokens: tokens as u32,
            width: width as u32,
            activation: match activation {
                GateActivation::Relu2 => 0,
                GateActivation::Silu => 1,
            },
        };
        let groups = (tokens * width).div_ceil(WORKGROUP as usize);
        self.dispatch(
            Kernel::Gated,
            (&params, &[]),
            &[("gate_up", &src), ("gated_out", &dst)],
            groups,
            1,
        )
    }

    fn add(&mut self, acc: Activations, x: Activations, len: usize) -> Result<()> {
        distinct_buffers("add", x, acc)?;
        let dst = self.act(acc, len, "add")?;
        let src = self.act(x, len, "add")?;
        let groups = len.div_ceil(WORKGROUP as usize);
        self.dispatch(
            Kernel::Add,
            (&AddParams { len: len as u32 }, &[]),
            &[("acc", &dst), ("addend", &src)],
            groups,
            1,
        )
    }

    fn logits(
        &mut self,
        x: Activations,
        table: TableId,
        tokens: usize,
        out: Activations,
    ) -> Result<()> {
        let t = self.table(table)?;
        let (vocab, cols, ty) = (t.rows, t.cols, t.ty);
        let pieces: Vec<_> = t
            .pieces
            .iter()
            .map(|p| (p.row_start, p.row_end, p.buffer.clone()))
            .collect();
        distinct_buffers("logits", x, out)?;
        let src = self.act(x, tokens * cols, "logits")?;
        let dst = self.act(out, tokens * vocab, "logits")?;
        if tokens == 0 {
            return Ok(());
        }
        for (row_start, row_end, buffer) in pieces {
            let params = LogitsParams {
                tokens: tokens as u32,
                cols: cols as u32,
                row_start: row_start as u32,
                row_end: row_end as u32,
                vocab: vocab as u32,
            };
            self.dispatch(
                Kernel::Logits(ty),
                (&params, &[]),
                &[("table", &buffer), ("x", &src), ("logits_out", &dst)],
                ((row_end - row_start) * tokens).div_ceil(WORKGROUP as usize),
                1,
            )?;
        }
        Ok(())
    }
}
