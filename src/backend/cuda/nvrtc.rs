//! NVRTC, the CUDA runtime compiler, loaded by tern itself (not through cudarc, whose search list
//! stops at CUDA 12) so that NVRTC 12 and 13 are both found, and so kernels can be compiled to CUBIN.
//!
//! Search order ([`candidates`]): `$TERN_NVRTC` (a file), then the names `libnvrtc.so.13`,
//! `libnvrtc.so.12`, `libnvrtc.so` on the dynamic loader's path (`LD_LIBRARY_PATH`, ldconfig), then
//! the same names in the CUDA toolkit folders and in the lib folders of NVIDIA's PyPI wheels
//! (`nvidia/cu13/lib` of CUDA 13's, `nvidia/cuda_nvrtc/lib` of CUDA 12's) inside the site-packages of
//! every `python3` on `PATH`, of `$VIRTUAL_ENV`, `~/.local` and the system's Python.

use anyhow::{Result, anyhow, bail};
use std::ffi::{CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Library names, newest first.
const NAMES: [&str; 3] = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];
/// Lib folders of NVIDIA's wheels, relative to a site-packages folder.
const WHEEL_DIRS: [&str; 2] = ["nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"];

/// Where to look for NVRTC, in order: bare names go through the dynamic loader's own search.
pub fn candidates(env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = env("TERN_NVRTC")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .collect();
    out.extend(NAMES.iter().map(PathBuf::from));
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(cuda) = env("CUDA_PATH").or_else(|| env("CUDA_HOME")) {
        dirs.push(Path::new(&cuda).join("lib64"));
    }
    dirs.push("/usr/local/cuda/lib64".into());
    // Python prefixes: each python3 on PATH (a venv's bin/ or /usr/bin), $VIRTUAL_ENV, ~/.local.
    let mut prefixes: Vec<PathBuf> = env("PATH")
        .unwrap_or_default()
        .split(':')
        .map(Path::new)
        .filter(|bin| bin.join("python3").exists())
        .filter_map(|bin| bin.parent().map(Path::to_path_buf))
        .collect();
    prefixes.extend(env("VIRTUAL_ENV").map(PathBuf::from));
    prefixes.extend(env("HOME").map(|h| Path::new(&h).join(".local")));
    prefixes.extend(["/usr/local".into(), "/usr".into()]);
    for prefix in prefixes {
        let Ok(entries) = std::fs::read_dir(prefix.join("lib")) else {
            continue;
        };
        let mut pythons: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        pythons.sort();
        for python in pythons.iter().rev() {
            for site in ["site-packages", "dist-packages"] {
                dirs.extend(WHEEL_DIRS.iter().map(|w| python.join(site).join(w)));
            }
        }
    }
    for dir in dirs.into_iter().filter(|d| d.is_dir()) {
        out.extend(NAMES.iter().map(|n| dir.join(n)));
    }
    out
}

type Program = *mut c_void;
type Status = c_int;

/// The NVRTC entry points tern calls.
struct Api {
    /// Keeps the library loaded for the functions below.
    _lib: libloading::Library,
    path: PathBuf,
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> Status,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
    create: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> Status,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> Status,
    destroy: unsafe extern "C" fn(*mut Program) -> Status,
    log_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    log: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    ptx_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    ptx: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    cubin_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    cubin: unsafe extern "C" fn(Program, *mut c_char) -> Status,
}

fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let tried = candidates(&|k| std::env::var(k).ok());
        for path in &tried {
            // SAFETY: loading NVRTC runs its (trusted) initializers; every symbol below is looked
            // up with the signature of NVRTC's C API, the same in versions 12 and 13.
            unsafe {
                let Ok(lib) = libloading::Library::new(path) else {
                    continue;
                };
                let api = (|| -> std::result::Result<Api, libloading::Error> {
                    Ok(Api {
                        version: *lib.get(b"nvrtcVersion\0")?,
                        error_string: *lib.get(b"nvrtcGetErrorString\0")?,
                        create: *lib.get(b"nvrtcCreateProgram\0")?,
                        compile: *lib.get(b"nvrtcCompileProgram\0")?,
                        destroy: *lib.get(b"nvrtcDestroyProgram\0")?,
                        log_size: *lib.get(b"nvrtcGetProgramLogSize\0")?,
                        log: *lib.get(b"nvrtcGetProgramLog\0")?,
                        ptx_size: *lib.get(b"nvrtcGetPTXSize\0")?,
                        ptx: *lib.get(b"nvrtcGetPTX\0")?,
                        cubin_size: *lib.get(b"nvrtcGetCUBINSize\0")?,
                        cubin: *lib.get(b"nvrtcGetCUBIN\0")?,
                        path: path.clone(),
                        _lib: lib,
                    })
                })();
                match api {
                    Ok(api) => return Ok(api),
                    Err(e) => tracing::debug!("{} is not a usable NVRTC: {e}", path.display()),
                }
            }
        }
        Err(format!(
            "NVRTC (the CUDA runtime compiler) not found: tried {}; install a CUDA toolkit, or \
             `pip install nvidia-cuda-nvrtc` (CUDA 13) or `nvidia-cuda-nvrtc-cu12`, or set \
             TERN_NVRTC to the library file",
            tried
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
    .as_ref()
    .map_err(|e| anyhow!("{e}"))
}

/// True if an NVRTC library can be loaded.
pub fn present() -> bool {
    api().is_ok()
}

/// NVRTC's version as `major.minor`, and the file it was loaded from.
pub fn version() -> Result<(String, PathBuf)> {
    let api = api()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: nvrtcVersion writes two ints.
    check(
        api,
        unsafe { (api.version)(&mut major, &mut minor) },
        "nvrtcVersion",
    )?;
    Ok((format!("{major}.{minor}"), api.path.clone()))
}

fn check(api: &Api, status: Status, what: &str) -> Result<()> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: nvrtcGetErrorString returns a static NUL-terminated string for any status.
    let msg = unsafe { std::ffi::CStr::from_ptr((api.error_string)(status)) };
    bail!("{what}: {}", msg.to_string_lossy())
}

/// What to get out of a compilation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// PTX text (for `--gpu-architecture=compute_XY`).
    Ptx,
    /// A CUBIN for one real architecture (`--gpu-architecture=sm_XY`).
    Cubin,
}

/// Compiles `source` (named `name` in messages) with `options`; on a compile error the message
/// carries NVRTC's log.
pub fn compile(source: &str, name: &str, options: &[String], output: Output) -> Result<Vec<u8>> {
    let api = api()?;
    let src = CString::new(source).map_err(|_| anyhow!("{name}: NUL byte in the source"))?;
    let cname = CString::new(name).map_err(|_| anyhow!("{name}: NUL byte in the name"))?;
    let opts: Vec<CString> = options
        .iter()
        .map(|o| CString::new(o.as_str()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| anyhow!("{name}: NUL byte in an option"))?;
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: Program = std::ptr::null_mut();
    // SAFETY: every pointer passed is a live NUL-terminated string (or an array of them, with its
    // length), and `prog` is destroyed on every path below.
    unsafe {
        let headers = std::ptr::null();
        check(
            api,
            (api.create)(&mut prog, src.as_ptr(), cname.as_ptr(), 0, headers, headers),
            "nvrtcCreateProgram",
        )?;
        let result = (|| {
            let status = (api.compile)(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr());
            if status != 0 {
                let mut size = 0;
                check(
                    api,
                    (api.log_size)(prog, &mut size),
                    "nvrtcGetProgramLogSize",
                )?;
                let mut log = vec![0u8; size.max(1)];
                check(
                    api,
                    (api.log)(prog, log.as_mut_ptr().cast()),
                    "nvrtcGetProgramLog",
                )?;
                let log = String::from_utf8_lossy(&log);
                bail!("{}", log.trim_end_matches('\0').trim_end());
            }
            let (size_fn, get_fn, what) = match output {
                Output::Ptx => (api.ptx_size, api.ptx, "nvrtcGetPTX"),
                Output::Cubin => (api.cubin_size, api.cubin, "nvrtcGetCUBIN"),
            };
            let mut size = 0;
            check(api, size_fn(prog, &mut size), what)?;
            let mut out = vec![0u8; size];
            check(api, get_fn(prog, out.as_mut_ptr().cast()), what)?;
            if output == Output::Ptx {
                // PTX comes NUL-terminated.
                while out.last() == Some(&0) {
                    out.pop();
                }
            }
            Ok(out)
        })();
        (api.destroy)(&mut prog);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wheels' lib folders are found through a venv's python3 on PATH, CUDA 13's first.
    #[test]
    fn finds_the_wheels_of_a_python_on_path() {
        let root = tempfile::tempdir().unwrap();
        let venv = root.path().join("venv");
        std::fs::create_dir_all(venv.join("bin")).unwrap();
        std::fs::write(venv.join("bin/python3"), "").unwrap();
        let site = venv.join("lib/python3.12/site-packages");
        for w in WHEEL_DIRS {
            std::fs::create_dir_all(site.join(w)).unwrap();
        }
        let path = format!("/nonexistent:{}", venv.join("bin").display());
        let env = |k: &str| match k {
            "PATH" => Some(path.clone()),
            "TERN_NVRTC" => Some("/opt/x/libnvrtc.so.13".into()),
            _ => None,
        };
        let found = candidates(&env);
        assert_eq!(found[0], PathBuf::from("/opt/x/libnvrtc.so.13"));
        assert_eq!(found[1], PathBuf::from("libnvrtc.so.13"));
        let cu13 = found
            .iter()
            .position(|p| *p == site.join("nvidia/cu13/lib/libnvrtc.so.13"))
            .expect("the CUDA 13 wheel's folder is searched");
        let cu12 = found
            .iter()
            .position(|p| *p == site.join("nvidia/cuda_nvrtc/lib/libnvrtc.so.12"))
            .expect("the CUDA 12 wheel's folder is searched");
        assert!(cu13 < cu12);
    }
}
