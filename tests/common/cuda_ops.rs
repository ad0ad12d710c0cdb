//! Op-by-op checks of a GPU backend against the CPU reference backend, on random data of odd and
//! real shapes: ternary products bit for bit (NaN and ±Inf rows included), the float ops within
//! the golden tolerances, argmax exactly. tests/cuda.rs runs them on a CUDA device,
//! tests/cuda_emu.rs on the CPU emulation of the same kernels.

use tern::backend::cpu::CpuBackend;
use tern::backend::{Activations, Backend, KvSpec, TokenPosition, VectorId};

use super::{double_pool, scrambled_first_half, shuffled_pages};
use tern::ternary::{DenseData, DenseMatrix, TernaryMatrix};
use tern_cpu::bitlinear::reference::pack;
use tern_cpu::elementwise::GateActivation;

/// Deterministic pseudo-random numbers (no dependency).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    /// Roughly normal values, with an occasional outlier as real activations have.
    pub fn activations(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u = (0..4)
                    .map(|_| self.next() as f32 / u32::MAX as f32)
                    .sum::<f32>()
                    - 2.0;
                if self.next().is_multiple_of(97) {
                    u * 40.0
                } else {
                    u
                }
            })
            .collect()
    }

    pub fn ternary(&mut self, rows: usize, cols: usize) -> TernaryMatrix {
        let values: Vec<i8> = (0..rows * cols)
            .map(|_| (self.next() % 3) as i8 - 1)
            .collect();
        let scale = 0.5 + (self.next() % 1000) as f32 / 1000.0;
        TernaryMatrix::new(
            "random",
            rows,
            cols,
            pack(&values, rows, cols).unwrap(),
            scale,
        )
        .unwrap()
    }
}

pub fn put(b: &mut dyn Backend, data: &[f32]) -> Activations {
    let a = b.alloc(data.len()).unwrap();
    b.write(a, data).unwrap();
    a
}

pub fn get(b: &mut dyn Backend, a: Activations, len: usize) -> Vec<f32> {
    let mut out = vec![0f32; len];
    b.read(a, &mut out).unwrap();
    out
}

/// Same bits, or both NaN (the GPU's canonical NaN differs from the CPU's).
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Within the golden tolerance of the float ops: |a - b| ≤ tol · (1 + |b|); NaN and ±Inf agree.
fn close(a: f32, b: f32, tol: f32) -> bool {
    same(a, b) || (a - b).abs() <= tol * (1.0 + b.abs())
}

fn compare(what: &str, g: &[f32], c: &[f32], ok: impl Fn(f32, f32) -> bool) {
    if let Some(i) = (0..g.len()).find(|&i| !ok(g[i], c[i])) {
        panic!(
            "{what}: value {i} is {} on the GPU and {} on the CPU",
            g[i], c[i]
        );
    }
}

/// Puts NaN, +Inf and -Inf into rows 1, 2 and 3 of `x` (rows of `cols`), where they exist.
pub fn poison_rows(x: &mut [f32], cols: usize) {
    let rows = x.len() / cols.max(1);
    for (row, v) in [(1, f32::NAN), (2, f32::INFINITY), (3, f32::NEG_INFINITY)] {
        if row < rows && cols > 0 {
            x[row * cols + (7 * row) % cols] = v;
        }
    }
}

/// The bitlinear op on `gpu` and the CPU for each linear shape (part rows, cols) and batch size:
/// every output bit-identical, rows holding NaN or ±Inf included.
pub fn check_bitlinear(gpu: &mut dyn Backend, shapes: &[(&[usize], usize)], batches: &[usize]) {
    let mut cpu = CpuBackend::new(0).unwrap();
    let mut rng = Rng(3);
    for &(parts, cols) in shapes {
        let mats: Vec<TernaryMatrix> = parts.iter().map(|&r| rng.ternary(r, cols)).collect();
        let refs: Vec<&TernaryMatrix> = mats.iter().collect();
        let n_out: usize = parts.iter().sum();
        let (lg, lc) = (
            gpu.upload_linear(&refs).unwrap(),
            cpu.upload_linear(&refs).unwrap(),
        );
        for &tokens in batches {
            let mut x = rng.activations(tokens * cols);
            poison_rows(&mut x, cols);
            let (xg, xc) = (put(gpu, &x), put(&mut cpu, &x));
            let (og, oc) = (
                gpu.alloc(tokens * n_out).unwrap(),
                cpu.alloc(tokens * n_out).unwrap(),
            );
            gpu.bitlinear(xg, lg, tokens, og).unwrap();
            cpu.bitlinear(xc, lc, tokens, oc).unwrap();
            let (g, c) = (
                get(gpu, og, tokens * n_out),
                get(&mut cpu, oc, tokens * n_out),
            );
            compare(
                &format!("bitlinear {parts:?}x{cols}, {tokens} tokens (row-major token × row)"),
                &g,
                &c,
                same,
            );
            for a in [xg, og] {
                gpu.free(a);
            }
            for a in [xc, oc] {
                cpu.free(a);
            }
        }
    }
}

/// Attention on `gpu` and the CPU: a prefill of `prefill` rows in slot 1, then one batched
/// decode step over slots 0, 1 and 2, in two layers, the pages in a scrambled order; on `gpu`
/// also with the contiguous table, which must give the same bits; then the contiguous pages read
/// back in a scrambled order, which only a backend that follows the table reads as the CPU does.
pub fn check_attention(gpu: &mut dyn Backend, spec: KvSpec, prefill: usize) {
    let spec = double_pool(spec);
    let pages = shuffled_pages(&spec);
    let contiguous = spec.contiguous_table();
    let mut cpu = CpuBackend::new(0).unwrap();
    let mut rng = Rng(9);
    gpu.alloc_kv(&spec).unwrap();
    cpu.alloc_kv(&spec).unwrap();
    let (width, q_dim) = (spec.qkv_width(), spec.heads * spec.head_dim);
    let prefill_rows: Vec<TokenPosition> = (0..prefill)
        .map(|position| TokenPosition { slot: 1, position })
        .collect();
    let decode = [
        TokenPosition {
            slot: 0,
            position: 0,
        },
        TokenPosition {
            slot: 1,
            position: prefill,
        },
        TokenPosition {
            slot: 2,
            position: 0,
        },
    ];
    for layer in [1, 0] {
        for rows in [&prefill_rows[..], &decode[..]] {
            let qkv = rng.activations(rows.len() * width);
            let (qg, qc) = (put(gpu, &qkv), put(&mut cpu, &qkv));
            let n = rows.len() * q_dim;
            let (og, oc) = (gpu.alloc(n).unwrap(), cpu.alloc(n).unwrap());
            // The contiguous pages first: the same K and V land in other pages, which the
            // shuffled pass must not read.
            gpu.attention(layer, qg, rows, &contiguous, og).unwrap();
            cpu.attention(layer, qc, rows, &contiguous, oc).unwrap();
            let g_contiguous = get(gpu, og, n);
            let (qg, qc) = (put(gpu, &qkv), put(&mut cpu, &qkv));
            gpu.attention(layer, qg, rows, &pages, og).unwrap();
            cpu.attention(layer, qc, rows, &pages, oc).unwrap();
            let (g, c) = (get(gpu, og, n), get(&mut cpu, oc, n));
            assert_eq!(
                g, g_contiguous,
                "attention through scrambled pages, layer {layer}"
            );
            compare(
                &format!("attention, layer {layer}, {} rows", rows.len()),
                &g,
                &c,
                |a, b| close(a, b, 1e-4),
            );
        }
        let scrambled = scrambled_first_half(&spec);
        let qkv = rng.activations(decode.len() * width);
        let (qg, qc) = (put(gpu, &qkv), put(&mut cpu, &qkv));
        let n = decode.len() * q_dim;
        let (og, oc) = (gpu.alloc(n).unwrap(), cpu.alloc(n).unwrap());
        gpu.attention(layer, qg, &decode, &scrambled, og).unwrap();
        cpu.attention(layer, qc, &decode, &scrambled, oc).unwrap();
        let (g, c) = (get(gpu, og, n), get(&mut cpu, oc, n));
        compare(
            &format!("attention, layer {layer}, contiguous pages read scrambled"),
            &g,
            &c,
            |a, b| close(a, b, 1e-4),
        );
    }
}

/// rms_norm, gated (both activations) and add on `rows` rows of `width` values, NaN/Inf rows
/// included.
pub fn check_float_ops(gpu: &mut dyn Backend, rows: usize, width: usize) {
    let mut cpu = CpuBackend::new(0).unwrap();
    let mut rng = Rng(5);
    let n = rows * width;
    let mut x = rng.activations(n);
    poison_rows(&mut x, width);
    let weight = rng.activations(width);
    let (wg, wc): (VectorId, VectorId) = (
        gpu.upload_vector(&weight).unwrap(),
        cpu.upload_vector(&weight).unwrap(),
    );
    let (xg, xc) = (put(gpu, &x), put(&mut cpu, &x));
    let (og, oc) = (gpu.alloc(n).unwrap(), cpu.alloc(n).unwrap());
    gpu.rms_norm(xg, wg, 1e-5, rows, og).unwrap();
    cpu.rms_norm(xc, wc, 1e-5, rows, oc).unwrap();
    let what = format!("rms_norm {rows}x{width}");
    compare(&what, &get(gpu, og, n), &get(&mut cpu, oc, n), |a, b| {
        close(a, b, 1e-5)
    });

    let mut gate_up = rng.activations(2 * n);
    poison_rows(&mut gate_up, 2 * width);
    let (gg, gc) = (put(gpu, &gate_up), put(&mut cpu, &gate_up));
    for act in [GateActivation::Relu2, GateActivation::Silu] {
        gpu.gated(gg, act, rows, width, og).unwrap();
        cpu.gated(gc, act, rows, width, oc).unwrap();
        let what = format!("gated {act:?} {rows}x{width}");
        compare(&what, &get(gpu, og, n), &get(&mut cpu, oc, n), |a, b| {
            close(a, b, 1e-6)
        });
    }
    gpu.add(og, xg, n).unwrap();
    cpu.add(oc, xc, n).unwrap();
    compare(
        &format!("add {n}"),
        &get(gpu, og, n),
        &get(&mut cpu, oc, n),
        same,
    );
}

/// embed and logits for a `vocab` × `cols` table in each dtype, `rows` tokens; argmax of the
/// logits against the CPU's first maximum.
pub fn check_tables(gpu: &mut dyn Backend, vocab: usize, cols: usize, rows: usize) {
    let mut cpu = CpuBackend::new(0).unwrap();
    let mut rng = Rng(7);
    let values = rng.activations(vocab * cols);
    let tables = [
        DenseData::F32(values.clone()),
        DenseData::F16(values.iter().map(|&v| half::f16::from_f32(v)).collect()),
        DenseData::Bf16(values.iter().map(|&v| half::bf16::from_f32(v)).collect()),
    ];
    let ids: Vec<u32> = (0..rows).map(|_| rng.next() % vocab as u32).collect();
    for data in tables {
        let m = DenseMatrix {
            rows: vocab,
            cols,
            data,
        };
        let what = format!("{} table {vocab}x{cols}", m.dtype_name());
        let (tg, tc) = (gpu.upload_table(&m).unwrap(), cpu.upload_table(&m).unwrap());
        let (eg, ec) = (
            gpu.alloc(rows * cols).unwrap(),
            cpu.alloc(rows * cols).unwrap(),
        );
        gpu.embed(tg, &ids, eg).unwrap();
        cpu.embed(tc, &ids, ec).unwrap();
        let e = get(&mut cpu, ec, rows * cols);
        compare(
            &format!("embed, {what}"),
            &get(gpu, eg, rows * cols),
            &e,
            same,
        );

        let (lg, lc) = (
            gpu.alloc(rows * vocab).unwrap(),
            cpu.alloc(rows * vocab).unwrap(),
        );
        gpu.logits(eg, tg, rows, lg).unwrap();
        cpu.logits(ec, tc, rows, lc).unwrap();
        let (g, c) = (get(gpu, lg, rows * vocab), get(&mut cpu, lc, rows * vocab));
        compare(&format!("logits, {what}"), &g, &c, |a, b| {
            close(a, b, 1e-4 * (cols as f32).sqrt())
        });
        let want: Vec<u32> = g
            .chunks_exact(vocab)
            .map(|r| (0..vocab).fold(0, |b, i| if r[i] > r[b] { i } else { b }) as u32)
            .collect();
        assert_eq!(gpu.argmax(lg, rows, vocab).unwrap(), want, "argmax, {what}");
    }
}

/// argmax over rows of `width` with a tie (the first index wins).
pub fn check_argmax_ties(gpu: &mut dyn Backend, rows: usize, width: usize) {
    let mut rng = Rng(1);
    let mut x = rng.activations(rows * width);
    let r = rows - 1;
    x[r * width + width / 7] = 1e6; // a tie: the first index wins
    x[r * width + width - 1] = 1e6;
    let a = put(gpu, &x);
    let want: Vec<u32> = x
        .chunks_exact(width)
        .map(|r| (0..width).fold(0, |b, i| if r[i] > r[b] { i } else { b }) as u32)
        .collect();
    assert_eq!(want[r] as usize, width / 7);
    assert_eq!(gpu.argmax(a, rows, width).unwrap(), want);
}
