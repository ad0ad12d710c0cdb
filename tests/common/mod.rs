//! Shared helpers for the golden-fixture tests: locating fixtures, reading golden arrays, comparing.
#![allow(dead_code)] // each test binary uses a different subset

pub mod cuda_emu;
pub mod cuda_ops;

use std::path::PathBuf;
use tern::backend::Backend;
use tern::backend::cpu::CpuBackend;
use tern::backend::cuda::CudaBackend;
use tern::backend::wgpu::{WgpuBackend, WgpuOptions};
use tern::engine::Engine;
use tern::loader::{HostModel, load_model_files};
use tern_cpu::bitlinear::{Family, lut};
use tern_cpu::isa::Isa;

/// The Hugging Face-format fixtures every backend must reproduce.
pub const HF_FIXTURES: [&str; 3] = ["tiny-packed", "tiny-bf16", "tiny-bitlinear"];

/// The GGUF fixtures: tiny-packed's weights and tokenizer, so tiny-packed's goldens apply.
pub const GGUF_FIXTURES: [&str; 3] = [
    "gguf/tiny-i2_s.gguf",
    "gguf/tiny-tq2_0.gguf",
    "gguf/tiny-tq1_0.gguf",
];

/// Every fixture the golden checks run on.
pub fn all_fixtures() -> impl Iterator<Item = &'static str> {
    HF_FIXTURES.into_iter().chain(GGUF_FIXTURES)
}

/// The fixture directory whose goldens `name` must reproduce.
pub fn golden_dir(name: &str) -> PathBuf {
    fixture_dir(if name.ends_with(".gguf") {
        "tiny-packed"
    } else {
        name
    })
}

/// `TERN_FIXTURES` overrides the location, for test binaries run outside the source tree
/// (scripts/gpu-check.sh).
pub fn fixture_dir(name: &str) -> PathBuf {
    std::env::var_os("TERN_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
        .join(name)
}

pub fn golden(name: &str) -> serde_json::Value {
    let path = golden_dir(name).join("golden.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// A raw little-endian f32 array from a fixture directory.
pub fn read_f32(name: &str, file: &str) -> Vec<f32> {
    std::fs::read(golden_dir(name).join(file))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

pub fn load(name: &str) -> HostModel {
    load_model_files(&fixture_dir(name)).unwrap().0
}

/// Every backend (and kernel variant) the golden checks run on, by name. A backend that cannot run
/// on this machine is left out with a printed reason, never silently. `TERN_TEST_BACKENDS` (a
/// comma-separated list of name prefixes, e.g. `cuda,wgpu` in scripts/gpu-check.sh) keeps only
/// the backends it names.
pub fn backends() -> Vec<(String, Box<dyn Backend>)> {
    let mut list = all_backends();
    if let Ok(keep) = std::env::var("TERN_TEST_BACKENDS") {
        list.retain(|(name, _)| {
            keep.split(',')
                .any(|p| !p.is_empty() && name.starts_with(p))
        });
        eprintln!(
            "TERN_TEST_BACKENDS={keep}: backends {:?}",
            list.iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
    }
    list
}

fn all_backends() -> Vec<(String, Box<dyn Backend>)> {
    let mut list = Vec::new();
    // The CPU backend once per kernel level this CPU has (the default level is one of them), again
    // with the base-3 kernels, and with the lookup-table kernels at the levels that have them.
    for isa in Isa::ALL {
        match CpuBackend::with_isa(2, isa) {
            Ok(b) => list.push((format!("cpu-{isa}"), Box::new(b) as Box<dyn Backend>)),
            Err(e) => eprintln!("skipping backend cpu-{isa}: {e}"),
        }
        match CpuBackend::with_family(2, isa, Family::Base3) {
            Ok(b) => list.push((format!("cpu-{isa}-base3"), Box::new(b))),
            Err(e) => eprintln!("skipping backend cpu-{isa}-base3: {e}"),
        }
        if lut::supports(isa) {
            let b = CpuBackend::with_family(2, isa, Family::Lut).unwrap();
            list.push((format!("cpu-{isa}-lut"), Box::new(b)));
        } else {
            eprintln!("no backend cpu-{isa}-lut: no lookup-table kernels at this level or CPU");
        }
    }
    match CudaBackend::new(0) {
        Ok(cuda) => list.push(("cuda".to_string(), Box::new(cuda))),
        Err(e) => eprintln!("cuda backend skipped: {e:#}"),
    }
    list.extend(
        wgpu_backends()
            .into_iter()
            .map(|(name, b)| (name, Box::new(b) as Box<dyn Backend>)),
    );
    list
}

/// The CUDA backend on the CPU emulation of its kernels (cuda-emu/): the tensor-core GEMM with the
/// threads of a block in order, and the dp4a GEMM with them in reverse order (a result that depends
/// on the order is a race). Slower than the other backends, so only the module-level goldens and
/// the self-test run on them.
pub fn emulated_cuda_backends() -> Vec<(String, Box<dyn Backend>)> {
    vec![
        (
            "cuda-emu".to_string(),
            Box::new(cuda_emu::backend(true, cuda_emu::Order::Forward)),
        ),
        (
            "cuda-emu-dp4a-reverse".to_string(),
            Box::new(cuda_emu::backend(false, cuda_emu::Order::Reverse)),
        ),
    ]
}

/// The wgpu backend with every optional feature the adapter has (`wgpu`), and with none of them
/// and tables split into small pieces (`wgpu-no-f16-no-subgroups`). Without an adapter this is
/// empty with a printed reason, unless `TERN_REQUIRE_WGPU=1` (CI), where it is a failure.
pub fn wgpu_backends() -> Vec<(String, WgpuBackend)> {
    let base = WgpuOptions::from_env();
    let variants = [
        ("wgpu", base.clone()),
        (
            "wgpu-no-f16-no-subgroups",
            WgpuOptions {
                no_f16: true,
                no_subgroups: true,
                table_piece_bytes: Some(64 * 1024),
                ..base
            },
        ),
    ];
    let mut found = Vec::new();
    for (name, options) in variants {
        match WgpuBackend::new(&options) {
            Ok(b) => found.push((name.to_string(), b)),
            Err(e) if std::env::var("TERN_REQUIRE_WGPU").is_ok_and(|v| v == "1") => {
                panic!("TERN_REQUIRE_WGPU=1 but the {name} backend cannot start: {e:#}")
            }
            Err(e) => eprintln!("skipping the {name} backend: {e:#}"),
        }
    }
    found
}

/// An engine with one sequence slot on the given backend.
pub fn engine(model: &HostModel, backend: Box<dyn Backend>, ctx: usize) -> Engine {
    Engine::new(model, backend, ctx, 1).unwrap()
}

/// (max |a - b|, mean |a - b|).
pub fn diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let max = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let mean = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .sum::<f64>()
        / a.len() as f64;
    (max, mean as f32)
}

pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv { (i, x) } else { (bi, bv) }
        })
        .0
}

/// `spec` with a pool of twice every slot's whole context: room for the contiguous table
/// ([`KvSpec::contiguous_table`], the first half) and [`shuffled_pages`] (the second) side by side.
pub fn double_pool(spec: tern::backend::KvSpec) -> tern::backend::KvSpec {
    tern::backend::KvSpec {
        pages: 2 * spec.slots * spec.pages_per_slot(),
        ..spec
    }
}

/// [`shuffled_pages`] moved to the first half of the pool: the contiguous table's pages in a
/// scrambled order. Reading, through it, a cache written through the contiguous table reads each
/// position's neighbours, which a backend reproduces only if it follows the table.
pub fn scrambled_first_half(spec: &tern::backend::KvSpec) -> Vec<u32> {
    let n = (spec.slots * spec.pages_per_slot()) as u32;
    shuffled_pages(spec).into_iter().map(|p| p - n).collect()
}

/// A page table for a [`double_pool`] that gives the slots the second half of the pool in a
/// scrambled order: slot `s`'s page `i` is page `n + (k · 7 + 3) mod n` for
/// `k = s · pages_per_slot + i` and `n = slots · pages_per_slot`.
pub fn shuffled_pages(spec: &tern::backend::KvSpec) -> Vec<u32> {
    let n = spec.slots * spec.pages_per_slot();
    assert_eq!(spec.pages, 2 * n, "a double pool");
    assert!(!n.is_multiple_of(7), "7 must be coprime to the page count");
    (0..n).map(|k| (n + (k * 7 + 3) % n) as u32).collect()
}
