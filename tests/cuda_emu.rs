//! The CUDA kernels (`cuda/*.cu`) run on the CPU through the emulation harness (`cuda-emu/`),
//! driven by the real CUDA backend code (`CudaBackend<Emulator>`), against the CPU reference
//! backend op by op (tests/common/cuda_ops.rs): every kernel, on odd shapes and on BitNet 2B-4T's
//! shapes where the emulation is fast enough, rows of NaN and ±Inf included. Each check runs with
//! the tensor-core GEMM and threads in order, and with the dp4a GEMM and threads in reverse order,
//! so a result that depends on thread order (a race, a missing barrier) fails one of them.

mod common;

use common::cuda_emu::{Order, backend};
use common::cuda_ops::*;
use tern::backend::{KvSpec, KvType};

const VARIANTS: [(bool, Order); 2] = [(true, Order::Forward), (false, Order::Reverse)];

/// Every kernel once, on the smallest shapes that still take each of its code paths: the run that
/// `.ci/run` makes under ThreadSanitizer, where the tests below (2B-4T's shapes) take too long.
/// Each shape names the paths it is there for.
#[test]
fn every_kernel_on_small_shapes() {
    for (mma, order) in VARIANTS {
        let mut gpu = backend(mma, order);
        // 132 rows: 17 GEMV blocks of 8 warps, 3 dp4a / 2 mma row tiles; 130 inputs: 3 chunks
        // staged one after another by the GEMMs. 1 token: gemv1, 3: gemv, 70: the GEMM of the
        // variant over 2 token tiles, the second partial. Quantization spans 8 warps per row.
        check_bitlinear(&mut gpu, &[(&[129, 3], 130)], &[1, 3, 70]);
        // 99 chunks: the GEMV's four loads in flight per lane, then its one-chunk tail.
        check_bitlinear(&mut gpu, &[(&[9], 6300)], &[1, 2]);
        // Capacity 70: 3 key splits of 24 for the prefill's 30 rows and for decode, so rows end
        // inside a split, before a split (skipped by attend_combine) and with idle warps; 2 query
        // heads per KV head.
        let spec = KvSpec {
            layers: 2,
            slots: 3,
            capacity: 70,
            pages: 0,
            page_size: 16,
            kv_type: KvType::F32,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            rope_theta: 10000.0,
        };
        check_attention(&mut gpu, spec, 30);
        // Rows wider than a block (rms_norm's strided sums), gated/add over 4 blocks.
        check_float_ops(&mut gpu, 3, 300);
        // 20 and 9 table rows: several logits blocks; 5 rows: two passes of 4 tokens; 264 columns:
        // vector loads, more than a warp's width of them in f16/bf16; 37: element loads.
        check_tables(&mut gpu, 20, 264, 5);
        check_tables(&mut gpu, 9, 37, 3);
        // A row of 3 strides of argmax's 1,024 threads.
        check_argmax_ties(&mut gpu, 2, 3000);
    }
}

#[test]
fn bitlinear_is_bit_identical_to_the_cpu_reference() {
    let odd: [(&[usize], usize); 5] = [
        (&[1], 1),
        (&[3], 0),
        (&[5, 3], 63),
        (&[67], 130),
        (&[129, 70], 200),
    ];
    // 2B-4T's q‖k‖v and down projections (decode and batched decode), and o at prefill size.
    let real: [(&[usize], usize); 2] = [(&[2560, 640, 640], 2560), (&[2560], 6912)];
    for (mma, order) in VARIANTS {
        let mut gpu = backend(mma, order);
        check_bitlinear(&mut gpu, &odd, &[1, 3, 8, 9, 64, 130]);
        check_bitlinear(&mut gpu, &real, &[1, 5]);
        check_bitlinear(&mut gpu, &[(&[2560], 2560)], &[70]);
    }
}

#[test]
fn attention_matches_the_cpu_over_slots_and_positions() {
    for (mma, order) in VARIANTS {
        // GQA 6 heads over 2 KV heads, an odd capacity and prefill length.
        let spec = KvSpec {
            layers: 2,
            slots: 3,
            capacity: 97,
            pages: 0,
            page_size: 8,
            kv_type: KvType::F32,
            heads: 6,
            kv_heads: 2,
            head_dim: 64,
            rope_theta: 10000.0,
        };
        check_attention(&mut backend(mma, order), spec, 45);
        // 2B-4T's heads at the largest head dimension the kernels take, decode-sized.
        let spec = KvSpec {
            layers: 2,
            slots: 3,
            capacity: 40,
            pages: 0,
            page_size: 16,
            kv_type: KvType::F32,
            heads: 20,
            kv_heads: 5,
            head_dim: 256,
            rope_theta: 500000.0,
        };
        check_attention(&mut backend(mma, order), spec, 9);
    }
}

#[test]
fn float_and_table_ops_match_the_cpu() {
    for (mma, order) in VARIANTS {
        let mut gpu = backend(mma, order);
        check_float_ops(&mut gpu, 5, 2560);
        check_float_ops(&mut gpu, 3, 37);
        // Vector loads (cols a multiple of 8) and element loads (odd cols).
        check_tables(&mut gpu, 300, 2560, 5);
        check_tables(&mut gpu, 333, 77, 3);
    }
}

#[test]
fn argmax_picks_the_first_maximum() {
    for (mma, order) in VARIANTS {
        check_argmax_ties(&mut backend(mma, order), 3, 128_256);
        check_argmax_ties(&mut backend(mma, order), 2, 5);
    }
}

/// Every kernel parameter struct of src/backend/cuda/params.rs has the size, field names and field
/// offsets of the C struct of the same name in cuda/*.cu, as the C++ compiler lays it out.
#[test]
fn parameter_structs_match_the_c_layouts() {
    use tern::backend::cuda::params::*;
    macro_rules! layouts {
        ($($name:ident { $($field:ident),* $(,)? })*) => {{
            let mut checked = 0;
            $(
                let rust = (
                    size_of::<$name>(),
                    vec![$((stringify!($field).to_string(), std::mem::offset_of!($name, $field))),*],
                );
                let c = tern_cuda_emu::c_layout(stringify!($name))
                    .unwrap_or_else(|| panic!("no C struct {} in cuda/", stringify!($name)));
                assert_eq!(rust, c, "{}: (size, [(field, offset)]) in Rust and in C", stringify!($name));
                checked += 1;
            )*
            checked
        }};
    }
    let checked = layouts! {
        QuantizeParams { x, codes, scales, sums, cols, padded }
        ProductParams { w, x, act_scales, act_sums, row_scales, y, n_rows, chunks, tokens, pad }
        RmsNormParams { x, weight, out, eps, width }
        GatedParams { gate_up, out, activation, rows, width, pad }
        AddParams { acc, x, len, pad }
        EmbedParams { table, tokens, out, cols, pad }
        LogitsParams { table, x, out, vocab, cols, rows, pad }
        ArgmaxParams { logits, ids, vocab, pad }
        Geometry { heads, kv_heads, head_dim, layers, page_size, pages_per_slot, layer, pad }
        RopeAppendParams { qkv, rows, pages, rope, k_cache, v_cache, g }
        AttendPartialParams { qkv, rows, pages, k_cache, v_cache, partial, g, keys_per_split, pad }
        AttendCombineParams { partial, out, splits, heads, head_dim, pad }
    };
    assert_eq!(checked, 12);
}
