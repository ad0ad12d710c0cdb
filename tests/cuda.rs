//! The CUDA backend against the CPU reference backend, op by op, on random data of real and odd
//! shapes: the ternary product bit for bit, attention (prefill, decode, several slots, GQA) within
//! float tolerance, on-device argmax exactly. Skipped with a printed reason where no CUDA device
//! can be used (the golden fixtures run on CUDA too, through `common::backends()`).

use tern::backend::cpu::CpuBackend;
use tern::backend::cuda::CudaBackend;
use tern::backend::{Activations, Backend, KvSpec, TokenPosition};
use tern::ternary::TernaryMatrix;
use tern_cpu::bitlinear::reference::pack;

fn cuda() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("skipped: {e:#}");
            None
        }
    }
}

/// Deterministic pseudo-random numbers (no dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }

    /// Roughly normal values, with an occasional outlier as real activations have.
    fn activations(&mut self, n: usize) -> Vec<f32> {
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

    fn ternary(&mut self, rows: usize, cols: usize) -> TernaryMatrix {
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

fn put(b: &mut dyn Backend, data: &[f32]) -> Activations {
    let a = b.alloc(data.len()).unwrap();
    b.write(a, data).unwrap();
    a
}

fn get(b: &mut dyn Backend, a: Activations, len: usize) -> Vec<f32> {
    let mut out = vec![0f32; len];
    b.read(a, &mut out).unwrap();
    out
}

#[test]
fn bitlinear_is_bit_identical_to_the_cpu_reference() {
    let Some(mut gpu) = cuda() else { return };
    let mut cpu = CpuBackend::new(0).unwrap();
    let mut rng = Rng(3);
    // (part rows, cols): odd shapes, then BitNet 2B-4T's q‖k‖v, o, gate‖up and down.
    let shapes: [(&[usize], usize); 7] = [
        (&[1], 1),
        (&[5, 3], 63),
        (&[67], 130),
        (&[2560, 640, 640], 2560),
        (&[2560], 2560),
        (&[6912, 6912], 2560),
        (&[2560], 6912),
    ];
    for (parts, cols) in shapes {
        let mats: Vec<TernaryMatrix> = parts.iter().map(|&r| rng.ternary(r, cols)).collect();
        let refs: Vec<&TernaryMatrix> = mats.iter().collect();
        let n_out: usize = parts.iter().sum();
        let (lg, lc) = (
            gpu.upload_linear(&refs).unwrap(),
            cpu.upload_linear(&refs).unwrap(),
        );
        // Decode, batched decode at the GEMV limit, and GEMM batches with partial tiles.
        for tokens in [1, 3, 8, 9, 64, 130] {
            let x = rng.activations(tokens * cols);
            let (xg, xc) = (put(&mut gpu, &x), put(&mut cpu, &x));
            let (og, oc) = (
                gpu.alloc(tokens * n_out).unwrap(),
                cpu.alloc(tokens * n_out).unwrap(),
            );
            gpu.bitlinear(xg, lg, tokens, og).unwrap();
            cpu.bitlinear(xc, lc, tokens, oc).unwrap();
            let (g, c) = (
                get(&mut gpu, og, tokens * n_out),
                get(&mut cpu, oc, tokens * n_out),
            );
            if let Some(i) = (0..g.len()).find(|&i| g[i].to_bits() != c[i].to_bits()) {
                panic!(
                    "{parts:?}x{cols}, {tokens} tokens: output {i} (token {}, row {}) is {} on \
                     CUDA and {} on the CPU",
                    i / n_out,
                    i % n_out,
                    g[i],
                    c[i]
                );
            }
            for a in [xg, og] {
                gpu.free(a);
            }
            for a in [xc, oc] {
                cpu.free(a);
            }
        }
    }
}

#[test]
fn attention_matches_the_cpu_over_slots_and_positions() {
    let Some(mut gpu) = cuda() else { return };
    let mut cpu = CpuBackend::new(0).unwrap();
    let mut rng = Rng(9);
    let spec = KvSpec {
        layers: 2,
        slots: 3,
        capacity: 600,
        heads: 20,
        kv_heads: 5,
        head_dim: 128,
        rope_theta: 500000.0,
    };
    gpu.alloc_kv(&spec).unwrap();
    cpu.alloc_kv(&spec).unwrap();
    let (width, q_dim) = (spec.qkv_width(), spec.heads * spec.head_dim);
    // A 517-token prefill in slot 1, then one batched decode step over slots 0, 1 and 2.
    let prefill: Vec<TokenPosition> = (0..517)
        .map(|position| TokenPosition { slot: 1, position })
        .collect();
    let decode = [
        TokenPosition {
            slot: 0,
            position: 0,
        },
        TokenPosition {
            slot: 1,
            position: 517,
        },
        TokenPosition {
            slot: 2,
            position: 0,
        },
    ];
    for layer in [1, 0] {
        for rows in [&prefill[..], &decode[..]] {
            let qkv = rng.activations(rows.len() * width);
            let (qg, qc) = (put(&mut gpu, &qkv), put(&mut cpu, &qkv));
            let n = rows.len() * q_dim;
            let (og, oc) = (gpu.alloc(n).unwrap(), cpu.alloc(n).unwrap());
            gpu.attention(layer, qg, rows, og).unwrap();
            cpu.attention(layer, qc, rows, oc).unwrap();
            let (g, c) = (get(&mut gpu, og, n), get(&mut cpu, oc, n));
            for (i, (a, b)) in g.iter().zip(&c).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "layer {layer}, {} rows: output {i} is {a} on CUDA and {b} on the CPU",
                    rows.len()
                );
            }
        }
    }
}

#[test]
fn argmax_on_the_device_picks_the_first_maximum() {
    let Some(mut gpu) = cuda() else { return };
    let mut rng = Rng(1);
    let (rows, width) = (5, 128_256);
    let mut x = rng.activations(rows * width);
    x[3 * width + 77] = 1e6; // a tie: the first index wins
    x[3 * width + 99_000] = 1e6;
    let a = put(&mut gpu, &x);
    let want: Vec<u32> = x
        .chunks_exact(width)
        .map(|r| (0..width).fold(0, |b, i| if r[i] > r[b] { i } else { b }) as u32)
        .collect();
    assert_eq!(gpu.argmax(a, rows, width).unwrap(), want);
    assert_eq!(want[3], 77);
}
