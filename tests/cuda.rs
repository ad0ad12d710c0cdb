//! The CUDA backend against the CPU reference backend, op by op (tests/common/cuda_ops.rs), on a
//! CUDA device: ternary products bit for bit on real 2B-4T shapes, attention (prefill, decode,
//! several slots, GQA), the float and table ops, on-device argmax. Skipped with a printed reason
//! where no CUDA device can be used (tests/cuda_emu.rs runs the same checks on the CPU emulation
//! of the kernels; the golden fixtures run on both through `common::backends()`).

mod common;

use common::cuda_ops::*;
use tern::backend::cuda::CudaBackend;
use tern::backend::{KvSpec, KvType};

fn cuda() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("skipped: {e:#}");
            None
        }
    }
}

#[test]
fn bitlinear_is_bit_identical_to_the_cpu_reference() {
    let Some(mut gpu) = cuda() else { return };
    // (part rows, cols): odd shapes, then BitNet 2B-4T's q‖k‖v, o, gate‖up and down; decode,
    // batched decode at the GEMV limit, and GEMM batches with partial tiles.
    let shapes: [(&[usize], usize); 8] = [
        (&[1], 1),
        (&[3], 0),
        (&[5, 3], 63),
        (&[67], 130),
        (&[2560, 640, 640], 2560),
        (&[2560], 2560),
        (&[6912, 6912], 2560),
        (&[2560], 6912),
    ];
    check_bitlinear(&mut gpu, &shapes, &[1, 3, 8, 9, 64, 130]);
}

#[test]
fn attention_matches_the_cpu_over_slots_and_positions() {
    let Some(mut gpu) = cuda() else { return };
    let spec = KvSpec {
        layers: 2,
        slots: 3,
        capacity: 600,
        pages: 0,
        page_size: 16,
        kv_type: KvType::F32,
        heads: 20,
        kv_heads: 5,
        head_dim: 128,
        rope_theta: 500000.0,
    };
    check_attention(&mut gpu, spec, 517);
}

#[test]
fn float_and_table_ops_match_the_cpu() {
    let Some(mut gpu) = cuda() else { return };
    check_float_ops(&mut gpu, 7, 2560);
    check_tables(&mut gpu, 1000, 2560, 5);
    check_tables(&mut gpu, 333, 77, 3);
}

#[test]
fn argmax_on_the_device_picks_the_first_maximum() {
    let Some(mut gpu) = cuda() else { return };
    check_argmax_ties(&mut gpu, 5, 128_256);
}
