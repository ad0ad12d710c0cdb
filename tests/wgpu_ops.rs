//! Per-shader checks of the wgpu backend on tiny shapes: the ternary product against the scalar
//! reference of `tern_cpu` (bit for bit), every other op against the CPU backend (float tolerance;
//! exact where no arithmetic happens). Each runs on every wgpu variant of `common::wgpu_backends`
//! and is skipped, with a printed reason, where there is no adapter.

mod common;

use half::{bf16, f16};
use tern::backend::cpu::CpuBackend;
use tern::backend::{Backend, KvSpec, KvType, TokenPosition};
use tern::ternary::{DenseData, DenseMatrix, TernaryMatrix};
use tern_cpu::bitlinear::quant::quantize_rows;
use tern_cpu::bitlinear::reference::{TernaryView, gemm_reference, pack};
use tern_cpu::elementwise::GateActivation;

/// Deterministic values in [-1, 1).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }

    fn ternary(&mut self, rows: usize, cols: usize, scale: f32) -> TernaryMatrix {
        let values: Vec<i8> = (0..rows * cols)
            .map(|_| (self.next() * 1.5).round() as i8)
            .collect();
        TernaryMatrix::new("t", rows, cols, pack(&values, rows, cols).unwrap(), scale).unwrap()
    }
}

/// Runs `op` on a fresh backend and returns what it read back.
type Op<'a> = &'a dyn Fn(&mut dyn Backend) -> Vec<f32>;

/// Runs `op` on the CPU backend and on every wgpu variant; requires max |diff| <= `atol`.
fn agree_with_cpu(what: &str, atol: f32, op: Op<'_>) {
    let want = op(&mut CpuBackend::new(2).unwrap());
    for (name, mut gpu) in common::wgpu_backends() {
        let got = op(&mut gpu);
        let (max, _) = common::diff(&got, &want);
        assert!(max <= atol, "{what} on {name}: max |diff| {max} > {atol}");
    }
}

fn upload_input(b: &mut dyn Backend, data: &[f32]) -> tern::backend::Activations {
    let a = b.alloc(data.len()).unwrap();
    b.write(a, data).unwrap();
    a
}

fn read(b: &mut dyn Backend, a: tern::backend::Activations, len: usize) -> Vec<f32> {
    let mut out = vec![0f32; len];
    b.read(a, &mut out).unwrap();
    out
}

#[test]
fn bitlinear_is_bit_identical_to_the_scalar_reference() {
    let mut rng = Lcg(3);
    // Widths off the 16-code word and 4-lane boundaries, token counts across the 8-token tile,
    // fused parts with their own scales.
    let cases: [(usize, &[usize], usize); 4] = [
        (16, &[8], 1),
        (37, &[5, 3], 3),
        (300, &[20, 12, 7], 9),
        (1030, &[70], 17),
    ];
    let backends = common::wgpu_backends();
    for (name, mut gpu) in backends {
        for &(cols, part_rows, tokens) in &cases {
            let parts: Vec<TernaryMatrix> = part_rows
                .iter()
                .enumerate()
                .map(|(i, &r)| rng.ternary(r, cols, 0.5 + i as f32))
                .collect();
            let mut x = rng.vec(tokens * cols, 3.0);
            // Row 0 has absmax 127, so s = 1 and halves are exact rounding ties (to even: 0.5 -> 0,
            // 1.5 -> 2, 2.5 -> 2); the last row is all zeros.
            let ties = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 100.5];
            let n = ties.len().min(cols);
            x[..n].copy_from_slice(&ties[..n]);
            if tokens > 1 {
                x[(tokens - 1) * cols..].fill(0.0);
            }
            // Non-finite rows: a NaN is skipped by the absmax and gives code 0; a row holding ±Inf
            // has scale 0, so every code is 0 and every output 0 / 0 = NaN.
            if tokens > 2 {
                x[cols + cols / 2] = f32::NAN;
                x[2 * cols] = f32::INFINITY;
                x[2 * cols + cols - 1] = f32::NEG_INFINITY;
            }

            let refs: Vec<&TernaryMatrix> = parts.iter().collect();
            let linear = gpu.upload_linear(&refs).unwrap();
            let n_out: usize = part_rows.iter().sum();
            let input = upload_input(&mut gpu, &x);
            let out = gpu.alloc(tokens * n_out).unwrap();
            gpu.bitlinear(input, linear, tokens, out).unwrap();
            let got = read(&mut gpu, out, tokens * n_out);

            let mut codes = vec![0i8; tokens * cols];
            let mut scales = vec![0f32; tokens];
            quantize_rows(&x, cols, &mut codes, &mut scales).unwrap();
            let packed: Vec<u8> = parts.iter().flat_map(|p| p.codes.clone()).collect();
            let row_scales: Vec<f32> = parts
                .iter()
                .flat_map(|p| std::iter::repeat_n(p.scale, p.rows))
                .collect();
            let mut acc = vec![0i32; n_out * tokens];
            let view = TernaryView::new(&packed, n_out, cols).unwrap();
            gemm_reference(view, &codes, tokens, &mut acc).unwrap();
            for t in 0..tokens {
                for n in 0..n_out {
                    let want = acc[n * tokens + t] as f32 / scales[t] * row_scales[n];
                    let g = got[t * n_out + n];
                    assert!(
                        g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                        "{name}: cols {cols} token {t} row {n}: {g} != {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn rms_norm_gated_add_and_copy_match_the_cpu() {
    let mut rng = Lcg(5);
    let (rows, width) = (3, 200);
    let x = rng.vec(rows * width, 4.0);
    let w = rng.vec(width, 1.0);
    agree_with_cpu("rms_norm", 1e-5, &|b| {
        let input = upload_input(b, &x);
        let v = b.upload_vector(&w).unwrap();
        let out = b.alloc(rows * width).unwrap();
        b.rms_norm(input, v, 1e-5, rows, out).unwrap();
        read(b, out, rows * width)
    });
    let gate_up = rng.vec(rows * 2 * width, 6.0);
    for act in [GateActivation::Relu2, GateActivation::Silu] {
        agree_with_cpu(&format!("gated {act:?}"), 1e-4, &|b| {
            let input = upload_input(b, &gate_up);
            let out = b.alloc(rows * width).unwrap();
            b.gated(input, act, rows, width, out).unwrap();
            read(b, out, rows * width)
        });
    }
    let y = rng.vec(rows * width, 1.0);
    agree_with_cpu("add and copy", 0.0, &|b| {
        let acc = upload_input(b, &x);
        let addend = upload_input(b, &y);
        b.add(acc, addend, rows * width - 7).unwrap();
        let dst = b.alloc(width).unwrap();
        b.copy(acc, width + 3, dst, 1, width - 2).unwrap();
        let mut out = read(b, acc, rows * width);
        out.extend(read(b, dst, width));
        out
    });
}

fn tables(rng: &mut Lcg, rows: usize, cols: usize) -> Vec<DenseMatrix> {
    let v = rng.vec(rows * cols, 2.0);
    [
        DenseData::F32(v.clone()),
        DenseData::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
        DenseData::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
    ]
    .into_iter()
    .map(|data| DenseMatrix { rows, cols, data })
    .collect()
}

#[test]
fn embedding_and_output_head_match_the_cpu_in_every_dtype() {
    let mut rng = Lcg(7);
    // 64 KiB pieces in the no-f16 variant: this f32 table splits in three, the half ones in two.
    let (vocab, cols, rows) = (333, 101, 4);
    let x = rng.vec(rows * cols, 1.0);
    for table in tables(&mut rng, vocab, cols) {
        let dtype = table.dtype_name();
        agree_with_cpu(&format!("embed {dtype}"), 0.0, &|b| {
            let t = b.upload_table(&table).unwrap();
            let out = b.alloc(rows * cols).unwrap();
            b.embed(t, &[0, 332, 170, 5], out).unwrap();
            read(b, out, rows * cols)
        });
        agree_with_cpu(&format!("logits {dtype}"), 1e-4, &|b| {
            let t = b.upload_table(&table).unwrap();
            let input = upload_input(b, &x);
            let out = b.alloc(rows * vocab).unwrap();
            b.logits(input, t, rows, out).unwrap();
            read(b, out, rows * vocab)
        });
    }
}

#[test]
fn attention_prefill_then_decode_in_two_slots_matches_the_cpu() {
    let mut rng = Lcg(9);
    let spec = common::double_pool(KvSpec {
        layers: 2,
        slots: 2,
        capacity: 80,
        pages: 0,
        page_size: 8,
        kv_type: KvType::F32,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        rope_theta: 10000.0,
    });
    let width = spec.qkv_width();
    let q_dim = spec.heads * spec.head_dim;
    // 70 prefill rows in slot 1 (more than one 64-key chunk, 9 pages), then one decode row in
    // each slot.
    let prefill: Vec<TokenPosition> = (0..70)
        .map(|position| TokenPosition { slot: 1, position })
        .collect();
    let decode = [
        TokenPosition {
            slot: 0,
            position: 0,
        },
        TokenPosition {
            slot: 1,
            position: 70,
        },
    ];
    let prefill_qkv = rng.vec(prefill.len() * width, 2.0);
    let decode_qkv = rng.vec(decode.len() * width, 2.0);
    let (contiguous, shuffled) = (spec.contiguous_table(), common::shuffled_pages(&spec));
    let scrambled = common::scrambled_first_half(&spec);
    agree_with_cpu("attention", 1e-4, &|b| {
        b.alloc_kv(&spec).unwrap();
        // Each table's pass reads back only what it wrote: the contiguous pass (first half of
        // the pool) gives the bits of the scrambled one (second half).
        let mut passes = [&contiguous, &shuffled].map(|pages| {
            let qkv = upload_input(b, &prefill_qkv);
            let out = b.alloc(prefill.len() * q_dim).unwrap();
            b.attention(1, qkv, &prefill, pages, out).unwrap();
            let mut got = read(b, out, prefill.len() * q_dim);
            let qkv = upload_input(b, &decode_qkv);
            b.attention(1, qkv, &decode, pages, out).unwrap();
            got.extend(read(b, out, decode.len() * q_dim));
            got
        });
        assert_eq!(passes[0], passes[1], "scrambled pages");
        // The contiguous pass's pages read in another order: the CPU and the GPU agree only if
        // both follow the table.
        let qkv = upload_input(b, &decode_qkv);
        let out = b.alloc(decode.len() * q_dim).unwrap();
        b.attention(1, qkv, &decode, &scrambled, out).unwrap();
        let mut got = std::mem::take(&mut passes[1]);
        got.extend(read(b, out, decode.len() * q_dim));
        got
    });
}

#[test]
fn bad_handles_and_shapes_are_errors() {
    for (name, mut gpu) in common::wgpu_backends() {
        assert!(
            gpu.alloc(1 << 40).is_err(),
            "{name}: larger than any binding"
        );
        assert!(
            gpu.alloc(usize::MAX).is_err(),
            "{name}: byte size overflows"
        );
        let small = gpu.alloc(4).unwrap();
        let other = gpu.alloc(4).unwrap();
        let v = gpu.upload_vector(&[1.0; 8]).unwrap();
        assert!(gpu.rms_norm(small, v, 1e-5, 1, other).is_err(), "{name}");
        assert!(gpu.add(small, small, 4).is_err(), "{name}");
        assert!(gpu.read(small, &mut [0.0; 5]).is_err(), "{name}");
        let table = DenseMatrix {
            rows: 2,
            cols: 2,
            data: DenseData::F32(vec![0.0; 4]),
        };
        let t = gpu.upload_table(&table).unwrap();
        assert!(
            gpu.embed(t, &[2], small).is_err(),
            "{name}: token past the vocabulary"
        );
        let narrow = TernaryMatrix::new("t", 1, 4, vec![0x55], 1.0).unwrap();
        let wide = TernaryMatrix::new("t", 1, 8, vec![0x55; 2], 1.0).unwrap();
        assert!(gpu.upload_linear(&[&narrow, &wide]).is_err(), "{name}");
        let id = gpu.upload_linear(&[&narrow]).unwrap();
        assert!(
            gpu.bitlinear(small, id, 2, other).is_err(),
            "{name}: input too small"
        );
        gpu.free(small);
        assert!(
            gpu.read(small, &mut [0.0; 1]).is_err(),
            "{name}: freed handle"
        );
        assert!(
            gpu.attention(0, other, &[], &[], small).is_err(),
            "{name}: no KV cache"
        );
    }
}
