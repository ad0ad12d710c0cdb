//! tern's CUDA kernels (`cuda/*.cu`) compiled as C++ and run on the CPU (see `emu/emu.h` for the
//! execution model), for tests that prove the kernels without a GPU.
//!
//! Memory comes from [`DeviceMemory`]: zeroed, with inaccessible pages at both ends, so a kernel
//! that reads or writes outside its buffers stops the process with a message naming the kernel.

use std::ffi::{CStr, c_char, c_int, c_long, c_void};

unsafe extern "C" {
    fn tern_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        args: *mut *mut c_void,
        reverse: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn tern_emu_alloc(bytes: usize) -> *mut c_void;
    fn tern_emu_layout(name: *const c_char, field: c_int, field_name: *mut *const c_char)
    -> c_long;
    fn tern_emu_free(ptr: *mut c_void, bytes: usize);
}

/// In which order a block's threads run between synchronization points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Thread 0 first.
    Forward,
    /// The last thread first: a result that differs from [`Order::Forward`]'s reveals a race.
    Reverse,
}

/// Runs kernel `name` over `grid` blocks of `block` threads, with one pointer per kernel parameter
/// in `args` (as `cuLaunchKernel` takes them).
///
/// # Safety
/// `args` must point to values of the kernel's parameter types, and every device pointer among
/// them must address memory of [`DeviceMemory`] large enough for what the kernel accesses (an
/// access outside it stops the process).
pub unsafe fn launch(
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    args: &[*const c_void],
    order: Order,
) -> Result<(), String> {
    let cname = std::ffi::CString::new(name).map_err(|_| format!("bad kernel name {name:?}"))?;
    let mut err = [0 as c_char; 512];
    let mut args: Vec<*mut c_void> = args.iter().map(|p| *p as *mut c_void).collect();
    let (g, b) = ([grid.0, grid.1, grid.2], [block.0, block.1, block.2]);
    // SAFETY: the caller guarantees the arguments; the rest are live local buffers.
    let rc = unsafe {
        tern_emu_launch(
            cname.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            args.as_mut_ptr(),
            c_int::from(order == Order::Reverse),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    match rc {
        0 => Ok(()),
        -1 => Err(format!("no emulated kernel named {name}")),
        _ => {
            // SAFETY: the runtime wrote a NUL-terminated message into `err`.
            Err(unsafe { CStr::from_ptr(err.as_ptr()) }
                .to_string_lossy()
                .into_owned())
        }
    }
}

/// The layout of C struct `name` of the kernel sources as the C++ compiler lays it out: its size
/// and its fields' names and offsets in declaration order; `None` if no source defines it.
pub fn c_layout(name: &str) -> Option<(usize, Vec<(String, usize)>)> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name; the runtime writes a pointer to a static string or nothing.
    let query =
        |i: c_int, field: &mut *const c_char| unsafe { tern_emu_layout(cname.as_ptr(), i, field) };
    let size = usize::try_from(query(-1, &mut std::ptr::null())).ok()?;
    let mut fields = Vec::new();
    for i in 0.. {
        let mut field = std::ptr::null();
        let Ok(offset) = usize::try_from(query(i, &mut field)) else {
            break;
        };
        // SAFETY: a static NUL-terminated field name from the generated table.
        let field = unsafe { CStr::from_ptr(field) }
            .to_string_lossy()
            .into_owned();
        fields.push((field, offset));
    }
    Some((size, fields))
}

/// One emulated device allocation.
pub struct DeviceMemory {
    ptr: *mut c_void,
    bytes: usize,
}

// SAFETY: plain memory owned by this value alone.
unsafe impl Send for DeviceMemory {}

impl DeviceMemory {
    /// `bytes` zeroed bytes, 4-byte aligned, ending at an inaccessible page.
    pub fn new(bytes: usize) -> Self {
        // SAFETY: tern_emu_alloc returns a fresh mapping of at least `bytes` bytes or null.
        let ptr = unsafe { tern_emu_alloc(bytes) };
        assert!(!ptr.is_null(), "cuda-emu: cannot map {bytes} bytes");
        Self { ptr, bytes }
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr.cast()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping made by `new` for the same size.
        unsafe { tern_emu_free(self.ptr, self.bytes) }
    }
}
