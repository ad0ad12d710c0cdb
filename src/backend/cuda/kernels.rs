//! The kernel sources (`cuda/*.cu`), their NVRTC compilation, and the loaded functions.
//!
//! Every `.cu` file is compiled with `cuda/common.cuh` prepended (no include paths, no toolkit
//! headers), with `--fmad=false` and IEEE division and square root so float results follow the CPU
//! reference operation by operation. Each is compiled to a CUBIN for the device's own architecture
//! (`sm_XY`), which any driver of the device loads whatever NVRTC made it; PTX for `compute_XY` is
//! the fallback when NVRTC cannot make that CUBIN or the driver rejects it. Compiled images are
//! cached on disk by source hash and target (see [`super::device`]).

use super::nvrtc::{self, Output};
use anyhow::{Context, Result, anyhow};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;
use std::path::Path;
use std::sync::Arc;

const PRELUDE: &str = include_str!("../../../cuda/common.cuh");

/// One kernel file and the entry points it defines.
pub struct Source {
    pub file: &'static str,
    pub code: &'static str,
    pub entries: &'static [&'static str],
}

/// The source that needs compute capability 8.0 (int8 `mma.sync`).
const MMA_SOURCE: &str = "bitlinear_mma.cu";

/// One file per op of the `Backend` trait, named like the op (the CPU's `tern_cpu` modules and the
/// WGSL shaders carry the same names).
pub const SOURCES: [Source; 7] = [
    Source {
        file: "bitlinear.cu",
        code: include_str!("../../../cuda/bitlinear.cu"),
        entries: &[
            "bitlinear_quantize",
            "bitlinear_gemv1",
            "bitlinear_gemv",
            "bitlinear_gemm",
        ],
    },
    Source {
        file: MMA_SOURCE,
        code: include_str!("../../../cuda/bitlinear_mma.cu"),
        entries: &["bitlinear_gemm_mma"],
    },
    Source {
        file: "norm.cu",
        code: include_str!("../../../cuda/norm.cu"),
        entries: &["rms_norm"],
    },
    Source {
        file: "elementwise.cu",
        code: include_str!("../../../cuda/elementwise.cu"),
        entries: &["gated", "add"],
    },
    Source {
        file: "table.cu",
        code: include_str!("../../../cuda/table.cu"),
        entries: &[
            "embed_f32",
            "embed_f16",
            "embed_bf16",
            "logits_f32",
            "logits_f16",
            "logits_bf16",
        ],
    },
    Source {
        file: "argmax.cu",
        code: include_str!("../../../cuda/argmax.cu"),
        entries: &["argmax_rows"],
    },
    Source {
        file: "attention.cu",
        code: include_str!("../../../cuda/attention.cu"),
        entries: &[
            "rope_append_f32",
            "rope_append_f16",
            "attend_partial_f32",
            "attend_partial_f16",
            "attend_combine",
        ],
    },
];

impl Source {
    /// The full text NVRTC compiles.
    pub fn text(&self) -> String {
        format!("{PRELUDE}\n#line 1 \"{}\"\n{}", self.file, self.code)
    }

    /// NVRTC options for `target` (`compute_90` for PTX, `sm_90` for a CUBIN).
    pub fn options(target: &str) -> Vec<String> {
        vec![
            format!("--gpu-architecture={target}"),
            "--fmad=false".into(),
            "--prec-div=true".into(),
            "--prec-sqrt=true".into(),
            "--std=c++17".into(),
        ]
    }

    /// Compiles for `target`: PTX text for `compute_XY`, a CUBIN for `sm_XY`; the error carries
    /// NVRTC's log.
    pub fn compile(&self, target: &str) -> Result<Vec<u8>> {
        let output = if target.starts_with("sm_") {
            Output::Cubin
        } else {
            Output::Ptx
        };
        nvrtc::compile(&self.text(), self.file, &Self::options(target), output)
            .with_context(|| format!("NVRTC could not compile cuda/{} for {target}", self.file))
    }
}

/// Every kernel, loaded into one context, by entry-point name.
pub struct Kernels {
    functions: Vec<(&'static str, CudaFunction)>,
}

impl Kernels {
    /// Compiles (or reads from `cache`) every source for compute capability `arch` (`"90"` for
    /// 9.0) and loads it into `ctx`: the CUBIN for `sm_<arch>`, else the PTX for `compute_<arch>`;
    /// `bitlinear_mma.cu` only when `mma` (the device has int8 `mma.sync`, compute capability 8.0+).
    pub fn load(
        ctx: &Arc<CudaContext>,
        arch: &str,
        cache: Option<&Path>,
        mma: bool,
    ) -> Result<Self> {
        let mut modules: Vec<(&Source, Arc<CudaModule>)> = Vec::new();
        for s in SOURCES.iter().filter(|s| mma || s.file != MMA_SOURCE) {
            let cubin = super::device::cached_image(s, &format!("sm_{arch}"), cache)
                .and_then(|image| Ok(ctx.load_module(Ptx::from_binary(image))?));
            let module = match cubin {
                Ok(module) => module,
                Err(e) => {
                    tracing::debug!("cuda/{}: no CUBIN for sm_{arch} ({e:#}); using PTX", s.file);
                    let ptx = super::device::cached_image(s, &format!("compute_{arch}"), cache)?;
                    let ptx =
                        String::from_utf8(ptx).context("NVRTC returned PTX that is not UTF-8")?;
                    ctx.load_module(Ptx::from_src(ptx)).with_context(|| {
                        format!(
                            "the CUDA driver rejected the CUBIN and the PTX of cuda/{} (an NVRTC \
                             newer than the driver? use the libnvrtc of the driver's CUDA version)",
                            s.file
                        )
                    })?
                }
            };
            modules.push((s, module));
        }
        let mut functions = Vec::new();
        for (s, module) in &modules {
            for &name in s.entries {
                let f = module
                    .load_function(name)
                    .with_context(|| format!("cannot load CUDA kernel {name}"))?;
                functions.push((name, f));
            }
        }
        Ok(Self { functions })
    }

    /// True if kernel `name` is loaded (`bitlinear_gemm_mma` is not, below compute capability 8.0).
    pub fn has(&self, name: &str) -> bool {
        self.functions.iter().any(|(n, _)| *n == name)
    }

    pub fn get(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| f)
            .ok_or_else(|| anyhow!("CUDA kernel {name} is not loaded"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles every kernel for Ampere and Hopper with the real NVRTC library, to PTX and to
    /// CUBIN, so a kernel that does not compile fails the tests on machines without a GPU. NVRTC is
    /// loaded dynamically ([`nvrtc::candidates`]; the `nvidia-cuda-nvrtc-cu12` wheel has it and
    /// `.ci/run` installs it). Without it the test is skipped with a message, unless `TERN_REQUIRE_NVRTC=1`.
    /// With `TERN_PTXAS` naming a `ptxas` binary (the `nvidia-cuda-nvcc-cu12` wheel has one), the
    /// PTX is also assembled for sm_80 and sm_90, which must succeed without register spills.
    #[test]
    fn every_kernel_compiles_with_nvrtc() {
        if !nvrtc::present() {
            let msg = "NVRTC (libnvrtc.so) not found";
            assert!(
                std::env::var_os("TERN_REQUIRE_NVRTC").is_none(),
                "{msg}, and TERN_REQUIRE_NVRTC is set"
            );
            eprintln!("skipped: {msg}");
            return;
        }
        for arch in ["compute_80", "compute_90"] {
            for s in &SOURCES {
                let ptx = s.compile(arch).unwrap_or_else(|e| panic!("{e:#}"));
                let ptx = String::from_utf8(ptx).unwrap();
                for entry in s.entries {
                    assert!(
                        ptx.contains(&format!(".entry {entry}(")),
                        "{arch} cuda/{}: no entry point {entry}",
                        s.file
                    );
                }
                // Local memory (spilled or dynamically indexed register arrays) is a slow path.
                assert!(
                    !ptx.contains(".local"),
                    "{arch} cuda/{} uses local memory",
                    s.file
                );
                let sm = arch.replace("compute_", "sm_");
                let cubin = s.compile(&sm).unwrap_or_else(|e| panic!("{e:#}"));
                assert!(
                    cubin.starts_with(b"\x7fELF"),
                    "{sm} cuda/{}: not a CUBIN",
                    s.file
                );
                if let Some(ptxas) = std::env::var_os("TERN_PTXAS") {
                    assemble(&ptxas, &ptx, &sm, s.file);
                }
            }
        }
    }

    /// Runs `ptxas -v` on `ptx` for `sm`; fails on an error or a register spill.
    fn assemble(ptxas: &std::ffi::OsStr, ptx: &str, sm: &str, file: &str) {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("kernel.ptx");
        std::fs::write(&input, ptx).unwrap();
        let run = std::process::Command::new(ptxas)
            .args(["-v", "-arch", sm, "-o"])
            .arg(dir.path().join("kernel.cubin"))
            .arg(&input)
            .output()
            .expect("TERN_PTXAS does not name a runnable ptxas");
        let log = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "ptxas {sm} cuda/{file}:\n{log}");
        eprintln!("ptxas {sm} cuda/{file}:\n{log}");
        for line in log.lines().filter(|l| l.contains("spill")) {
            assert!(
                line.contains("0 bytes spill stores, 0 bytes spill loads"),
                "{sm} cuda/{file} spills registers: {line}"
            );
        }
    }
}
