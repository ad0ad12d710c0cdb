//! Microbenchmarks of the ternary kernels at the real BitNet b1.58 2B-4T shapes, one thread:
//! GEMV (1 token, decode), a batch of 16 tokens (the server's decode rows) and GEMM (128 tokens,
//! prefill; 512 at the widest level only) of the three
//! families (`mad`, `base3`, `lut`) at every level they support, the AMX-INT8 GEMM over the first
//! two's layouts where this CPU and OS allow it, plus the scalar reference and the output head (bf16, and the 8-bit copy
//! with its bounds). The `gemv` rows read one matrix again and again, from L2/L3; the `dram` rows
//! cycle through copies of it totalling at least 512 MB, so the weights come from memory as in a
//! decode step. Each family's timing includes preparing the activations (quantization, and for
//! `lut` the tables, also timed alone). Prints the median time of several runs, the weight
//! bandwidth it implies (GB/s of packed weights read, each family's own layout), G weights/s
//! (rows · cols per second) and int8 GOPS (2 · rows · cols · tokens). The `attention` rows time
//! one kv head's attention (a prefill block and a decode row) in f32 FLOP/s.
//!
//! `cargo bench --bench kernels` runs the quick set: `gemv` and `gemm` of the families and
//! `attention`, at the widest level this CPU has. `-- all` runs every row at every level;
//! `-- gemv`, `-- batch`, `-- gemm`, `-- dram`, `-- tables`, `-- head` or `-- attention` those rows (with the
//! reference beside `gemv` and `gemm`) at every level.

use half::{bf16, f16};
use std::hint::black_box;
use std::time::Instant;
use tern_cpu::attention::{Cache, HeadGroup, Scratch, attend};
use tern_cpu::bitlinear::amx;
use tern_cpu::bitlinear::base3::{self, PackedBase3};
use tern_cpu::bitlinear::lut::{self, LutTables, PackedLut};
use tern_cpu::bitlinear::mad::{self, PackedTernary};
use tern_cpu::bitlinear::quant::QuantizedRows;
use tern_cpu::bitlinear::reference::{TernaryView, gemm_reference, row_bytes};
use tern_cpu::isa::Isa;
use tern_cpu::table::DenseView;
use tern_cpu::table::q8::{Q8Head, Q8Input};

/// (rows, cols, what): the distinct linear shapes of 2B-4T.
const SHAPES: [(usize, usize, &str); 4] = [
    (2560, 2560, "q / o"),
    (640, 2560, "k / v"),
    (6912, 2560, "gate / up"),
    (2560, 6912, "down"),
];

fn lcg(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

/// Copies of a matrix cycled by the DRAM rows: at least this many bytes, far beyond any cache.
const DRAM_BYTES: usize = 512 << 20;

/// Median seconds of `runs` calls after one warm-up.
fn median_secs(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

/// Median seconds of `step` at each level, cycling through the copies of a packed matrix.
fn time_family<P>(
    copies: &[P],
    levels: &[Isa],
    runs: usize,
    mut step: impl FnMut(Isa, &P),
) -> Vec<(Isa, f64)> {
    let mut i = 0;
    let mut time = |isa| {
        median_secs(runs, || {
            step(isa, &copies[i % copies.len()]);
            i += 1;
        })
    };
    levels.iter().map(|&isa| (isa, time(isa))).collect()
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |name: &str| match filter.as_deref() {
        None => ["gemv", "gemm", "attention"].contains(&name),
        Some("all") => true,
        Some(f) => name.contains(f),
    };
    let isas: Vec<Isa> = match filter {
        None => vec![Isa::best()],
        Some(_) => Isa::ALL.into_iter().filter(|i| i.is_supported()).collect(),
    };
    println!(
        "| kernel | isa | shape | tokens | median ms | weight GB/s | G weights/s | int8 GOPS |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|");
    let mut seed = 1u64;
    for (shape, (rows, cols, what)) in SHAPES.into_iter().enumerate() {
        let codes: Vec<u8> = (0..rows * row_bytes(cols))
            .map(|_| {
                let mut b = 0u8;
                for i in 0..4 {
                    b |= ((lcg(&mut seed) % 3) as u8) << (2 * i);
                }
                b
            })
            .collect();
        let view = TernaryView::new(&codes, rows, cols).unwrap();
        let packed = PackedTernary::from_canonical(view);
        let packed_lut = PackedLut::from_canonical(view);
        let packed_base3 = PackedBase3::from_canonical(view);
        for (kernel, tokens) in [
            ("gemv", 1),
            ("batch", 16),
            ("gemm", 128),
            ("gemm", 512),
            ("dram gemv", 1),
            ("tables", 1),
        ] {
            if !wanted(kernel) {
                continue;
            }
            let x: Vec<f32> = (0..tokens * cols)
                .map(|_| (lcg(&mut seed) % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let mut acc = vec![0i32; rows * tokens];
            let runs = if tokens == 1 { 51 } else { 5 };
            let report = |isa: &str, secs: f64, bytes: usize| {
                let gbs = bytes as f64 / secs / 1e9;
                let gws = (rows * cols) as f64 / secs / 1e9;
                let gops = 2.0 * gws * tokens as f64;
                println!(
                    "| {kernel} | {isa} | {rows}x{cols} ({what}) | {tokens} | {:.3} | {gbs:.1} | {gws:.1} | {gops:.1} |",
                    secs * 1e3
                );
            };
            let (mut q, mut tables) = (QuantizedRows::default(), LutTables::default());
            if kernel == "tables" {
                if SHAPES[..shape].iter().any(|s| s.1 == cols) {
                    continue;
                }
                for &isa in &isas {
                    q.quantize(isa, &x, tokens, cols).unwrap();
                    let secs = median_secs(runs, || tables.build(isa, black_box(&q)).unwrap());
                    println!(
                        "| lut tables | {isa} | {cols} columns | {tokens} | {:.4} | - | - | - |",
                        secs * 1e3
                    );
                }
                continue;
            }
            // One matrix, or enough copies of it to stream from memory.
            let copies = |bytes: usize| {
                if kernel.starts_with("dram") {
                    DRAM_BYTES.div_ceil(bytes)
                } else {
                    1
                }
            };
            // 512 tokens: the widest level only (the others take minutes), against AMX.
            let isas: Vec<Isa> = if tokens > 128 {
                vec![Isa::best()]
            } else {
                isas.clone()
            };
            let mads = vec![packed.clone(); copies(packed.bytes())];
            let timed = time_family(&mads, &isas, runs, |isa, w| {
                q.quantize(isa, black_box(&x), tokens, cols).unwrap();
                mad::gemm(isa, w, 0..rows, &q, &mut acc).unwrap();
                black_box(&acc);
            });
            for (isa, secs) in timed {
                report(&format!("mad {isa}"), secs, packed.bytes());
            }
            drop(mads);
            let base3s = vec![packed_base3.clone(); copies(packed_base3.bytes())];
            let timed = time_family(&base3s, &isas, runs, |isa, w| {
                q.quantize(isa, black_box(&x), tokens, cols).unwrap();
                base3::gemm(isa, w, 0..rows, &q, &mut acc).unwrap();
                black_box(&acc);
            });
            for (isa, secs) in timed {
                report(&format!("base3 {isa}"), secs, packed_base3.bytes());
            }
            drop(base3s);
            if tokens > 1 && amx::status().is_ok() {
                let secs = median_secs(runs, || {
                    q.quantize(Isa::best(), black_box(&x), tokens, cols)
                        .unwrap();
                    amx::gemm(&packed, 0..rows, &q, &mut acc).unwrap();
                    black_box(&acc);
                });
                report("mad amx", secs, packed.bytes());
                let secs = median_secs(runs, || {
                    q.quantize(Isa::best(), black_box(&x), tokens, cols)
                        .unwrap();
                    amx::gemm_base3(&packed_base3, 0..rows, &q, &mut acc).unwrap();
                    black_box(&acc);
                });
                report("base3 amx", secs, packed_base3.bytes());
            }
            let luts = vec![packed_lut.clone(); copies(packed_lut.bytes())];
            let lut_isas: Vec<Isa> = isas.iter().copied().filter(|&i| lut::supports(i)).collect();
            let timed = time_family(&luts, &lut_isas, runs, |isa, w| {
                q.quantize(isa, black_box(&x), tokens, cols).unwrap();
                tables.build(isa, &q).unwrap();
                lut::gemm(isa, w, 0..rows, &tables, &mut acc).unwrap();
                black_box(&acc);
            });
            for (isa, secs) in timed {
                report(&format!("lut {isa}"), secs, packed_lut.bytes());
            }
            drop(luts);
            // The reference is slow: not in the quick set, nor at 512 tokens.
            if kernel.starts_with("dram") || filter.is_none() || tokens > 128 {
                continue;
            }
            let x_codes: Vec<i8> = (0..tokens)
                .flat_map(|t| q.row(t)[..cols].to_vec())
                .collect();
            let secs = median_secs(runs.min(5), || {
                gemm_reference(view, black_box(&x_codes), tokens, &mut acc).unwrap();
                black_box(&acc);
            });
            report("reference", secs, rows * row_bytes(cols));
        }
    }
    if wanted("head") {
        let (vocab, cols) = (128256, 2560);
        let table: Vec<bf16> = (0..vocab * cols)
            .map(|i| bf16::from_f32((i % 251) as f32 / 251.0 - 0.5))
            .collect();
        let f16s: Vec<f16> = table.iter().map(|v| f16::from_f32(v.to_f32())).collect();
        let x: Vec<f32> = (0..16 * cols).map(|i| (i % 17) as f32 / 17.0).collect();
        let mut out = vec![0f32; 16 * vocab];
        for &isa in &isas {
            for (dtype, view) in [
                ("bf16", DenseView::Bf16(&table)),
                ("f16", DenseView::F16(&f16s)),
            ] {
                // Batches at the best level only: the others differ from it as single rows do.
                for tokens in [1, 4, 16]
                    .into_iter()
                    .filter(|&t| t == 1 || isa == Isa::best())
                {
                    let x = &x[..tokens * cols];
                    let out = &mut out[..tokens * vocab];
                    let secs = median_secs(3, || {
                        view.dot_rows(isa, 0..vocab, black_box(x), cols, out)
                            .unwrap();
                        black_box(&out);
                    });
                    println!(
                        "| head {dtype} | {isa} | {vocab}x{cols} | {tokens} | {:.3} | {:.1} | {:.1} (f32 FLOP) |",
                        secs * 1e3,
                        (vocab * cols * 2) as f64 / secs / 1e9,
                        2.0 * (tokens * vocab * cols) as f64 / secs / 1e9
                    );
                }
            }
        }
        let x = &x[..cols];
        let mut out = vec![0f32; vocab];
        let view = DenseView::Bf16(&table);
        let (mut bounds, mut input) = (vec![0f32; vocab], Q8Input::default());
        for &isa in &isas {
            let start = Instant::now();
            let head = Q8Head::quantize(isa, view, vocab, cols).unwrap();
            println!(
                "| head q8 quantize | {isa} | {vocab}x{cols} | - | {:.3} | - | - |",
                start.elapsed().as_secs_f64() * 1e3
            );
            let secs = median_secs(5, || {
                input.prepare(isa, black_box(x)).unwrap();
                head.logits(isa, 0..vocab, &input, &mut out, &mut bounds)
                    .unwrap();
                black_box((&out, &bounds));
            });
            println!(
                "| head q8 + bounds | {isa} | {vocab}x{cols} | 1 | {:.3} | {:.1} | {:.1} |",
                secs * 1e3,
                head.bytes() as f64 / secs / 1e9,
                2.0 * (vocab * cols) as f64 / secs / 1e9
            );
        }
    }
    if wanted("attention") {
        // One kv head of 2B-4T (head dim 128, 4 query heads per kv head, 5 kv heads in a cached
        // row): a prefill block of 8 rows after 256 cached positions (the middle of a 512-token
        // prompt), the same block after 2040 (the end of a 2048-token prompt) and a decode row over
        // 512 positions.
        let (d, group, kv_stride) = (128, 4, 640);
        for (rows, first_keys) in [(8, 256), (8, 2040), (1, 512)] {
            let g = HeadGroup {
                head_dim: d,
                group,
                rows,
                first_keys,
                query_stride: group * d,
                out_stride: group * d,
                kv_stride,
            };
            let n_keys = first_keys + rows - 1;
            let mut seed = 7u64;
            let mut random = |n: usize| -> Vec<f32> {
                (0..n)
                    .map(|_| lcg(&mut seed) as f32 / (1u64 << 31) as f32 - 0.5)
                    .collect()
            };
            let (queries, keys, values) = (
                random(rows * group * d),
                random(n_keys * kv_stride),
                random(n_keys * kv_stride),
            );
            let (mut scratch, mut out) = (Scratch::default(), vec![0f32; rows * group * d]);
            // Multiply-adds of q·k and of the weighted values, over the keys each query sees.
            let seen: usize = (0..rows).map(|r| first_keys + r).sum();
            let flop = (4 * group * d * seen) as f64;
            for &isa in &isas {
                let secs = median_secs(20, || {
                    let cache = Cache::contiguous(&keys[..], &values[..]);
                    attend(isa, &g, &queries, &cache, &mut scratch, &mut out).unwrap();
                    black_box(&out);
                });
                println!(
                    "| attention | {isa} | {group}x{d}, {first_keys} keys | {rows} | {:.4} | - | - | {:.1} (f32 FLOP) |",
                    secs * 1e3,
                    flop / secs / 1e9
                );
            }
        }
    }
}
