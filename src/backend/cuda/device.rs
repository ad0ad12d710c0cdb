//! Finding the CUDA driver and NVRTC, opening the device, and the on-disk kernel cache.
//!
//! Both libraries are loaded dynamically (the driver through cudarc, NVRTC by [`super::nvrtc`]), so
//! tern builds and starts without CUDA; every entry point here checks that the library is present
//! before the first call into it, because cudarc panics when a call needs a library that is missing.
//!
//! Kernel cache: `$TERN_CUDA_CACHE`, else `$XDG_CACHE_HOME/tern/cuda`, else `~/.cache/tern/cuda`;
//! one file per kernel source and target, named `<source>-<target>-<hash>.{cubin,ptx}`, where the
//! hash covers the full source text, the NVRTC options and the NVRTC version. A cache that cannot
//! be written is not an error (the kernels are compiled again next time).

use super::kernels::Source;
use anyhow::{Context, Result, bail};
use cudarc::driver::CudaContext;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// True if the CUDA driver library (`libcuda.so`) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names; calls no CUDA function.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// An opened device: its context, name and the NVRTC architecture to compile for.
pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub name: String,
    /// `XY` for compute capability X.Y (NVRTC targets `sm_XY` and `compute_XY`).
    pub arch: String,
    /// Compute capability 8.0 or newer: int8 tensor cores through `mma.sync`.
    pub has_int8_mma: bool,
}

/// Opens device `ordinal`, or says why CUDA cannot be used on this machine.
pub fn open(ordinal: usize) -> Result<Device> {
    if !driver_present() {
        bail!(
            "no CUDA driver (libcuda.so not found): this machine has no usable NVIDIA GPU driver"
        );
    }
    super::nvrtc::version().context("the CUDA driver is present but NVRTC is not")?;
    let count = CudaContext::device_count().context("CUDA driver: cannot count devices")?;
    if ordinal as i32 >= count {
        bail!("CUDA device {ordinal} does not exist ({count} devices)");
    }
    let ctx =
        CudaContext::new(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))?;
    let (major, minor) = ctx.compute_capability()?;
    if major < 6 || (major == 6 && minor < 1) {
        bail!(
            "CUDA device {ordinal} has compute capability {major}.{minor}; tern needs 6.1 (dp4a)"
        );
    }
    Ok(Device {
        name: ctx.name()?,
        arch: format!("{major}{minor}"),
        has_int8_mma: major >= 8,
        ctx,
    })
}

/// Where compiled PTX is kept, if a cache directory can be named.
pub fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("TERN_CUDA_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("tern/cuda")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/tern/cuda")))
}

/// 64-bit FNV-1a: stable across Rust versions and platforms (unlike `DefaultHasher`).
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &b in *part {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3); // separates the parts
    }
    h
}

/// The compiled image of `source` for `target` (`sm_XY`: a CUBIN; `compute_XY`: PTX text): from
/// the cache when present, else compiled (and cached).
pub fn cached_image(source: &Source, target: &str, cache: Option<&Path>) -> Result<Vec<u8>> {
    let (version, _) = super::nvrtc::version()?;
    let text = source.text();
    let options = Source::options(target).join(" ");
    let hash = fnv1a(&[text.as_bytes(), options.as_bytes(), version.as_bytes()]);
    let stem = source.file.trim_end_matches(".cu");
    let ext = if target.starts_with("sm_") {
        "cubin"
    } else {
        "ptx"
    };
    let path = cache.map(|d| d.join(format!("{stem}-{target}-{hash:016x}.{ext}")));
    if let Some(image) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        tracing::debug!("cuda/{}: {target} image from the cache", source.file);
        return Ok(image);
    }
    let started = std::time::Instant::now();
    let image = source.compile(target)?;
    tracing::debug!(
        "cuda/{}: compiled for {target} with NVRTC {version} in {:.2?}",
        source.file,
        started.elapsed()
    );
    if let Some(path) = path {
        // Written to a temporary name and renamed, so a concurrent reader never sees half a file.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let stored = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, &image))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = stored {
            tracing::debug!("cannot cache a kernel image at {}: {e}", path.display());
        }
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_separates_parts_and_is_stable() {
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
    }
}
