//! The CUDA backend on the CPU emulation of its kernels (`cuda-emu/`): the real backend code
//! (`CudaBackend<G>`) over a [`Gpu`] whose memory is guarded host memory and whose launches run
//! the `cuda/*.cu` kernels compiled as C++.

use std::ffi::c_void;
use std::marker::PhantomData;
use tern::backend::cuda::CudaBackend;
use tern::backend::cuda::gpu::{Buf, Elem, Gpu};
use tern::backend::cuda::launch::Launch;
use tern::backend::cuda::params::Params;
pub use tern_cuda_emu::Order;
use tern_cuda_emu::{DeviceMemory, launch};

/// The emulated device: with or without the tensor-core GEMM, threads run in `order`.
pub struct Emulator {
    pub mma: bool,
    pub order: Order,
}

pub struct EmuBuf<T> {
    mem: DeviceMemory,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T> Buf for EmuBuf<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn addr(&self) -> u64 {
        self.mem.ptr() as u64
    }
}

impl<T> EmuBuf<T> {
    fn at(&self, i: usize) -> *mut T {
        // SAFETY (callers): i ≤ len, checked by each caller before it reads or writes.
        unsafe { self.mem.ptr().cast::<T>().add(i) }
    }
}

impl Gpu for Emulator {
    type Buf<T: Elem> = EmuBuf<T>;

    fn describe(&self) -> String {
        format!(
            "cuda-emu (cuda/*.cu on the CPU, {} GEMM, {:?} thread order)",
            if self.mma { "mma.sync" } else { "dp4a" },
            self.order
        )
    }

    fn has_mma(&self) -> bool {
        self.mma
    }

    fn alloc<T: Elem>(&self, len: usize, _what: &str) -> anyhow::Result<EmuBuf<T>> {
        let len = len.max(1);
        Ok(EmuBuf {
            mem: DeviceMemory::new(len * size_of::<T>()),
            len,
            _elem: PhantomData,
        })
    }

    fn upload<T: Elem>(&self, data: &[T], what: &str) -> anyhow::Result<EmuBuf<T>> {
        let mut b = self.alloc(data.len(), what)?;
        self.write(&mut b, data)?;
        Ok(b)
    }

    fn write<T: Elem>(&self, dst: &mut EmuBuf<T>, data: &[T]) -> anyhow::Result<()> {
        anyhow::ensure!(data.len() <= dst.len, "write past a device buffer");
        // SAFETY: dst holds at least data.len() elements (checked); the regions are distinct.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst.at(0), data.len()) };
        Ok(())
    }

    fn read<T: Elem>(&self, src: &EmuBuf<T>, out: &mut [T]) -> anyhow::Result<()> {
        anyhow::ensure!(out.len() <= src.len, "read past a device buffer");
        // SAFETY: as for `write`.
        unsafe { std::ptr::copy_nonoverlapping(src.at(0), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    fn copy<T: Elem>(
        &self,
        src: &EmuBuf<T>,
        src_at: usize,
        dst: &mut EmuBuf<T>,
        dst_at: usize,
        len: usize,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            src_at + len <= src.len && dst_at + len <= dst.len,
            "copy past a buffer"
        );
        // SAFETY: both ranges are inside their buffers (checked), which are distinct allocations.
        unsafe { std::ptr::copy_nonoverlapping(src.at(src_at), dst.at(dst_at), len) };
        Ok(())
    }

    unsafe fn launch<P: Params>(
        &self,
        name: &'static str,
        config: Launch,
        params: &P,
    ) -> anyhow::Result<()> {
        let args = [std::ptr::from_ref(params).cast::<c_void>()];
        // SAFETY: the caller (the backend) guarantees the parameters, as for a CUDA launch.
        unsafe { launch(name, config.grid, config.block, &args, self.order) }
            .map_err(|e| anyhow::anyhow!("emulated CUDA kernel {e}"))
    }
}

/// The CUDA backend on the emulator.
pub fn backend(mma: bool, order: Order) -> CudaBackend<Emulator> {
    CudaBackend::with_gpu(Emulator { mma, order }).unwrap()
}
