//! What the CUDA backend needs from a device, as a trait: memory, copies, kernel launches by name
//! with one parameter struct ([`super::params`]), and (optionally) step graphs. [`Cuda`] is the CUDA driver; the CPU
//! emulation of the kernels (`cuda-emu/`, used by tests/cuda_emu.rs) is another implementation, so
//! every op's host side (checks, scratch sizes, launch configurations, parameters) runs
//! unchanged against the emulated kernels.

use super::graph::Graphs;
use super::kernels::Kernels;
use super::launch::Launch;
use super::params::Params;
use anyhow::{Context, Result, anyhow};
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError, LaunchConfig,
    PushKernelArg, ValidAsZeroBits, sys,
};
use std::sync::Arc;

/// An element type of device memory.
pub trait Elem: bytemuck::Pod + DeviceRepr + ValidAsZeroBits {}
impl<T: bytemuck::Pod + DeviceRepr + ValidAsZeroBits> Elem for T {}

/// Device memory of `len()` elements of `T`.
pub trait Buf {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The device address of element 0.
    fn addr(&self) -> u64;
}

/// A device the CUDA backend's kernels run on. Work is ordered as issued; only reads wait.
pub trait Gpu {
    type Buf<T: Elem>: Buf;
    /// "name, sm_XY, ..." for `Backend::describe`.
    fn describe(&self) -> String;
    /// True when `bitlinear_gemm_mma` (int8 tensor cores) is loaded.
    fn has_mma(&self) -> bool;
    /// `len.max(1)` zeroed elements; `what` names them in an out-of-memory error.
    fn alloc<T: Elem>(&self, len: usize, what: &str) -> Result<Self::Buf<T>>;
    /// A copy of `data` (one element, unwritten, if `data` is empty).
    fn upload<T: Elem>(&self, data: &[T], what: &str) -> Result<Self::Buf<T>>;
    /// `data` to the first `data.len()` elements of `dst`.
    fn write<T: Elem>(&self, dst: &mut Self::Buf<T>, data: &[T]) -> Result<()>;
    /// The first `out.len()` elements of `src`, after all issued work.
    fn read<T: Elem>(&self, src: &Self::Buf<T>, out: &mut [T]) -> Result<()>;
    /// `len` elements from `src[src_at..]` to `dst[dst_at..]`.
    fn copy<T: Elem>(
        &self,
        src: &Self::Buf<T>,
        src_at: usize,
        dst: &mut Self::Buf<T>,
        dst_at: usize,
        len: usize,
    ) -> Result<()>;
    /// Launches kernel `name` (an entry of [`super::kernels::SOURCES`]) with `params` as its one
    /// argument.
    ///
    /// # Safety
    /// `P` must be the kernel's parameter struct, and every access the kernel makes with `params`
    /// for this launch configuration must stay inside the buffers they point to.
    unsafe fn launch<P: Params>(
        &self,
        name: &'static str,
        config: Launch,
        params: &P,
    ) -> Result<()>;

    // ---- Step graphs (see graph.rs); a device without them runs every step eagerly. ----

    /// Starts a step of `rows` rows producing `logits_rows` rows of logits.
    fn begin_step(&mut self, _rows: usize, _logits_rows: usize, _graphable: bool) -> Result<()> {
        Ok(())
    }
    /// Ends the step (launching its graph, if any).
    fn end_step(&mut self) -> Result<()> {
        Ok(())
    }
    /// Folds one op's kind and parameters into the step's fingerprint.
    fn note(&mut self, _op: &str, _params: &[usize]) {}
    /// True when ops must not launch anything (a graph replays the step at `end_step`).
    fn replaying(&self) -> bool {
        false
    }
    /// True while a step is being captured (buffers must not be reallocated).
    fn capturing(&self) -> bool {
        false
    }
    /// Drops every graph (a buffer they point to is being freed or reallocated).
    fn invalidate(&mut self) {}
    /// Copies a step's host input `data` to the start of `dst` (through the graph's arena while
    /// capturing or replaying).
    fn stage(&mut self, data: &[u32], dst: &mut Self::Buf<u32>) -> Result<()> {
        self.write(dst, data)
    }
}

/// The CUDA driver: one context, one stream, the kernels compiled by NVRTC.
pub struct Cuda {
    pub(super) stream: Arc<CudaStream>,
    pub(super) kernels: Kernels,
    pub(super) graphs: Graphs,
    pub(super) description: String,
}

impl<T> Buf for CudaSlice<T> {
    fn len(&self) -> usize {
        CudaSlice::len(self)
    }
    fn addr(&self) -> u64 {
        // Event tracking is off (one stream), so the guard that comes with the pointer does nothing.
        self.device_ptr(self.stream()).0
    }
}

/// A driver error with a clear message for running out of device memory.
fn alloc_error(e: DriverError, ctx: &CudaContext, bytes: usize, what: &str) -> anyhow::Error {
    if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
        let free = ctx.mem_get_info().map_or(0, |(free, _)| free);
        anyhow!(
            "GPU out of memory allocating {} MiB for {what} ({} MiB free); lower --ctx, or use \
             --backend cpu",
            bytes >> 20,
            free >> 20
        )
    } else {
        anyhow!("CUDA error allocating {} MiB for {what}: {e}", bytes >> 20)
    }
}

impl Gpu for Cuda {
    type Buf<T: Elem> = CudaSlice<T>;

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn has_mma(&self) -> bool {
        self.kernels.has("bitlinear_gemm_mma")
    }

    fn alloc<T: Elem>(&self, len: usize, what: &str) -> Result<CudaSlice<T>> {
        let bytes = len * std::mem::size_of::<T>();
        self.stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| alloc_error(e, self.stream.context(), bytes, what))
    }

    fn upload<T: Elem>(&self, data: &[T], what: &str) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            return self.alloc(1, what);
        }
        let bytes = std::mem::size_of_val(data);
        self.stream
            .clone_htod(data)
            .map_err(|e| alloc_error(e, self.stream.context(), bytes, what))
    }

    fn write<T: Elem>(&self, dst: &mut CudaSlice<T>, data: &[T]) -> Result<()> {
        self.stream
            .memcpy_htod(data, &mut dst.slice_mut(..data.len()))
            .context("CUDA: copying to the device")
    }

    fn read<T: Elem>(&self, src: &CudaSlice<T>, out: &mut [T]) -> Result<()> {
        self.stream
            .memcpy_dtoh(&src.slice(..out.len()), out)
            .and_then(|()| self.stream.synchronize())
            .context("CUDA: reading from the device (or an earlier kernel failed)")
    }

    fn copy<T: Elem>(
        &self,
        src: &CudaSlice<T>,
        src_at: usize,
        dst: &mut CudaSlice<T>,
        dst_at: usize,
        len: usize,
    ) -> Result<()> {
        self.stream
            .memcpy_dtod(
                &src.slice(src_at..src_at + len),
                &mut dst.slice_mut(dst_at..dst_at + len),
            )
            .context("CUDA: device copy")
    }

    unsafe fn launch<P: Params>(
        &self,
        name: &'static str,
        config: Launch,
        params: &P,
    ) -> Result<()> {
        let f = self.kernels.get(name)?;
        let mut b = self.stream.launch_builder(f);
        b.arg(params);
        let cfg = LaunchConfig {
            grid_dim: config.grid,
            block_dim: config.block,
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller guarantees the arguments and the accesses they allow.
        unsafe { b.launch(cfg) }
            .map(drop)
            .with_context(|| format!("CUDA kernel {name} failed to launch"))
    }

    fn begin_step(&mut self, rows: usize, logits_rows: usize, graphable: bool) -> Result<()> {
        self.graphs
            .begin(&self.stream, rows, logits_rows, graphable)
    }

    fn end_step(&mut self) -> Result<()> {
        self.graphs.end(&self.stream)
    }

    fn note(&mut self, op: &str, params: &[usize]) {
        self.graphs.note(op, params);
    }

    fn replaying(&self) -> bool {
        self.graphs.replaying()
    }

    fn capturing(&self) -> bool {
        self.graphs.capturing()
    }

    fn invalidate(&mut self) {
        self.graphs.invalidate();
    }

    fn stage(&mut self, data: &[u32], dst: &mut CudaSlice<u32>) -> Result<()> {
        self.graphs.stage(&self.stream, data, dst)
    }
}
