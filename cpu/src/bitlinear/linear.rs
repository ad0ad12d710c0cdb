//! A whole BitLinear on the thread pool: [`Linear::forward`] quantizes the activations
//! ([`crate::bitlinear::quant`]), runs its kernel family's exact product over weight-row chunks in
//! parallel, and dequantizes ([`crate::bitlinear::dequantize`]) into token-major outputs.
//!
//! A [`Linear`] is one matrix in one [`Family`]'s layout with one weight scale per output row
//! (so fused matrices, e.g. q‖k‖v, keep their own scales), repacked from the canonical layout.
//!
//! # Parallel split
//! The product splits the weight rows into chunks on the family's row boundary
//! ([`crate::bitlinear::mad::ROW_GROUP`], [`crate::bitlinear::lut::TILE_ROWS`]), about
//! [`TASKS_PER_THREAD`](crate::pool::TASKS_PER_THREAD) per thread and at least [`MIN_ROWS_PER_TASK`];
//! each chunk writes its own contiguous slice of a `[weight row][token]` accumulator. One token
//! (decode): each task dequantizes its own chunk, whose outputs are already in order. More tokens:
//! a second parallel pass transposes and dequantizes chunks of
//! [`TOKENS_BLOCK`] tokens. Outputs are the same bits at every thread count.

use crate::bitlinear::amx;
use crate::bitlinear::base3::{self, PackedBase3};
use crate::bitlinear::dequantize::{TOKENS_BLOCK, dequantize};
use crate::bitlinear::lut::{self, LutTables, PackedLut};
use crate::bitlinear::mad::{self, PackedTernary, ROW_GROUP};
use crate::bitlinear::quant::QuantizedRows;
use crate::bitlinear::reference::TernaryView;
use crate::isa::Isa;
use crate::pool::ThreadPool;
use crate::{Error, check_len, grown};

/// Output rows per parallel task, at least: a multiple of every family's row boundary.
pub const MIN_ROWS_PER_TASK: usize = 16 * ROW_GROUP;

/// Environment variable that picks a [`Family`] (`mad`, `base3` or `lut`; unset or `auto`:
/// [`Family::default_for`]).
pub const FAMILY_ENV: &str = "TERN_CPU_KERNELS";

/// Which ternary kernel family runs a linear's products (`TERN_CPU_KERNELS`).
///
/// The rule ([`Family::default_for`]): base 3 at AVX-512, multiply-add otherwise; lookup tables
/// never by default. Base 3 reads 20% fewer bytes and holds 20% less memory; its AVX-512 GEMV
/// computes ~150 G weights/s on one core, which a thread streaming from memory rarely exceeds (at
/// one thread it ties multiply-add on an Intel Xeon with ~10 GB/s a thread and is 3% slower on an
/// AMD EPYC with ~40). The levels without AVX-512 VNNI would decode base 3 for every product;
/// lookup tables stream about the same weights per second as multiply-add from memory and their
/// tables outgrow the caches in prompts. The measurements behind the rule are in
/// `scripts/benchmark-log.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Multiply-add ([`PackedTernary`], 2 bits per weight).
    Mad,
    /// Lookup tables ([`PackedLut`], 1.78 bits per weight; only at the levels [`lut::supports`]).
    Lut,
    /// Multiply-add on five weights per byte ([`PackedBase3`], 1.6 bits per weight).
    Base3,
}

impl Family {
    pub const ALL: [Family; 3] = [Family::Mad, Family::Base3, Family::Lut];

    /// The name [`FAMILY_ENV`] takes.
    pub fn name(self) -> &'static str {
        match self {
            Family::Mad => "mad",
            Family::Base3 => "base3",
            Family::Lut => "lut",
        }
    }

    /// What the kernels do, for people.
    pub fn describe(self) -> &'static str {
        match self {
            Family::Mad => "multiply-add",
            Family::Base3 => "base-3 multiply-add",
            Family::Lut => "lookup-table",
        }
    }

    /// Bits a weight takes in this family's layout, padding aside.
    pub fn bits_per_weight(self) -> f64 {
        match self {
            Family::Mad => 2.0,
            Family::Base3 => 1.6,
            Family::Lut => 16.0 / 9.0,
        }
    }

    /// A family by [`Family::name`]; `auto` is `None`.
    pub fn parse(name: &str) -> Result<Option<Self>, Error> {
        let name = name.trim().to_ascii_lowercase();
        if name == "auto" {
            return Ok(None);
        }
        Family::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .map(Some)
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "{FAMILY_ENV}={name}: expected auto, mad, base3 or lut"
                ))
            })
    }

    /// The measured choice at `isa` (see the type's documentation).
    pub fn default_for(isa: Isa) -> Self {
        if isa == Isa::Avx512 {
            Family::Base3
        } else {
            Family::Mad
        }
    }

    /// [`FAMILY_ENV`] if set to a family (an error if unknown, or not available at `isa`), else
    /// [`Family::default_for`].
    pub fn selected(isa: Isa) -> Result<Self, Error> {
        let chosen = match std::env::var(FAMILY_ENV) {
            Ok(name) if !name.trim().is_empty() => Family::parse(&name)?,
            _ => None,
        };
        let family = chosen.unwrap_or_else(|| Family::default_for(isa));
        family.check(isa)?;
        Ok(family)
    }

    /// An error unless this family runs at `isa` on this CPU.
    pub fn check(self, isa: Isa) -> Result<(), Error> {
        isa.check()?;
        if self == Family::Lut && !lut::supports(isa) {
            return Err(Error::Unsupported(format!(
                "{FAMILY_ENV}=lut: the lookup-table kernels need AVX-512 (or the scalar level), \
                 not `{isa}`"
            )));
        }
        Ok(())
    }
}

/// A linear's weights in its family's layout.
#[derive(Clone, Debug)]
enum Packed {
    Mad(PackedTernary),
    Lut(PackedLut),
    Base3(PackedBase3),
}

/// One BitLinear: weights in one [`Family`]'s layout and one weight scale per output row.
#[derive(Clone, Debug)]
pub struct Linear {
    packed: Packed,
    in_features: usize,
    row_scales: Vec<f32>,
}

/// What [`Linear::forward`] keeps between calls (quantized activations, lookup tables,
/// accumulators), so that a decode step allocates nothing once it has grown.
#[derive(Debug, Default)]
pub struct LinearScratch {
    quantized: QuantizedRows,
    lut_tables: LutTables,
    acc: Vec<i32>,
}

impl Linear {
    /// Repacks the canonical matrix `w` (`out_features × in_features`) for `family`, with
    /// `row_scales[n]` the weight scale of output `n`.
    pub fn new(family: Family, w: TernaryView<'_>, row_scales: Vec<f32>) -> Result<Self, Error> {
        check_len("linear row scales", row_scales.len(), w.rows())?;
        let packed = match family {
            Family::Lut => Packed::Lut(PackedLut::from_canonical(w)),
            Family::Base3 => Packed::Base3(PackedBase3::from_canonical(w)),
            Family::Mad => Packed::Mad(PackedTernary::from_canonical(w)),
        };
        Ok(Self {
            packed,
            in_features: w.cols(),
            row_scales,
        })
    }

    /// The family whose kernels run this linear.
    pub fn family(&self) -> Family {
        match self.packed {
            Packed::Mad(_) => Family::Mad,
            Packed::Lut(_) => Family::Lut,
            Packed::Base3(_) => Family::Base3,
        }
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.row_scales.len()
    }

    /// Bytes of packed weights (with their layout's padding).
    pub fn bytes(&self) -> usize {
        match &self.packed {
            Packed::Mad(w) => w.bytes(),
            Packed::Lut(w) => w.bytes(),
            Packed::Base3(w) => w.bytes(),
        }
    }

    /// `out[t · out_features + n] = BitLinear(x[t])[n]` for `tokens` rows of `in_features`
    /// activations in `x`, on `pool` at `isa` (see the module documentation); batches of at least
    /// `amx_from` tokens run their products on AMX ([`amx::AmxUse::min_tokens`] gives it).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        pool: &ThreadPool,
        isa: Isa,
        amx_from: Option<usize>,
        x: &[f32],
        tokens: usize,
        out: &mut [f32],
        scratch: &mut LinearScratch,
    ) -> Result<(), Error> {
        let (n_out, cols) = (self.out_features(), self.in_features);
        check_len("bitlinear activations", x.len(), tokens * cols)?;
        check_len("bitlinear outputs", out.len(), tokens * n_out)?;
        if tokens == 0 || n_out == 0 {
            return Ok(());
        }
        let LinearScratch {
            quantized,
            lut_tables,
            acc,
        } = scratch;
        quantized.quantize(isa, x, tokens, cols)?;
        if let Packed::Lut(_) = self.packed {
            lut_tables.build(isa, quantized)?;
        }
        let (quantized, lut_tables) = (&*quantized, &*lut_tables);
        let row_multiple = match self.packed {
            Packed::Mad(_) | Packed::Base3(_) => ROW_GROUP,
            Packed::Lut(_) => lut::TILE_ROWS,
        };
        let per_task = pool.chunk_len(n_out, MIN_ROWS_PER_TASK, row_multiple);
        // acc[n · tokens + t]: chunk `i` of weight rows is rows `i · per_task..`, tokens each.
        let on_amx = amx_from.is_some_and(|min| tokens >= min);
        let product = |chunk: usize, acc: &mut [i32]| {
            let start = chunk * per_task;
            let rows = start..start + acc.len() / tokens;
            match &self.packed {
                Packed::Mad(w) if on_amx => amx::gemm(w, rows, quantized, acc),
                Packed::Base3(w) if on_amx => amx::gemm_base3(w, rows, quantized, acc),
                Packed::Mad(w) => mad::gemm(isa, w, rows, quantized, acc),
                Packed::Lut(w) => lut::gemm(isa, w, rows, lut_tables, acc),
                Packed::Base3(w) => base3::gemm(isa, w, rows, quantized, acc),
            }
            .map(|()| start)
        };
        let scales = quantized.scales();
        if tokens == 1 {
            // Each chunk's outputs are its rows in order: dequantized by the task, while in cache.
            return pool.try_for_each(
                grown(acc, n_out, 0)
                    .chunks_mut(per_task)
                    .zip(out.chunks_mut(per_task))
                    .enumerate(),
                |(chunk, (acc, out))| {
                    let start = product(chunk, acc)?;
                    let row_scales = &self.row_scales[start..start + acc.len()];
                    dequantize(isa, acc, 1, scales, row_scales, out)
                },
            );
        }
        if on_amx && !matches!(self.packed, Packed::Lut(_)) {
            // Each task's rows of every token's output: the AMX products are dequantized as they
            // leave the tiles, and no accumulators travel through memory.
            let mut parts: Vec<Vec<&mut [f32]>> = (0..n_out.div_ceil(per_task))
                .map(|_| Vec::with_capacity(tokens))
                .collect();
            for row in out.chunks_mut(n_out) {
                for (part, rows) in parts.iter_mut().zip(row.chunks_mut(per_task)) {
                    part.push(rows);
                }
            }
            return pool.try_for_each(parts.into_iter().enumerate(), |(chunk, mut outs)| {
                let start = chunk * per_task;
                let rows = start..(start + per_task).min(n_out);
                let products = amx::Products::Dequantized {
                    outs: &mut outs,
                    token_scales: scales,
                    row_scales: &self.row_scales[rows.clone()],
                };
                match &self.packed {
                    Packed::Mad(w) => amx::gemm_into(w, rows, quantized, products),
                    Packed::Base3(w) => amx::gemm_base3_into(w, rows, quantized, products),
                    Packed::Lut(_) => Err(Error::Unsupported(
                        "no AMX kernel reads the lookup-table layout".to_string(),
                    )),
                }
            });
        }
        let acc = grown(acc, n_out * tokens, 0);
        pool.try_for_each(
            acc.chunks_mut(per_task * tokens).enumerate(),
            |(chunk, acc)| product(chunk, acc).map(drop),
        )?;
        let acc = &*acc;
        pool.try_for_each(
            out.chunks_mut(TOKENS_BLOCK * n_out).enumerate(),
            |(chunk, part)| {
                let t0 = chunk * TOKENS_BLOCK;
                let scales = &scales[t0..t0 + part.len() / n_out];
                dequantize(isa, &acc[t0..], tokens, scales, &self.row_scales, part)
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitlinear::quant::quantize_row;
    use crate::bitlinear::reference::{gemm_reference, pack};
    use crate::bitlinear::testing::lcg;

    /// BitLinear by the plain formulas: the reference quantization and product, then
    /// `acc / s · w` (bits the kernels must reproduce).
    fn reference(values: &[i8], cols: usize, scales: &[f32], x: &[f32]) -> Vec<f32> {
        let rows = scales.len();
        let codes = pack(values, rows, cols).unwrap();
        let view = TernaryView::new(&codes, rows, cols).unwrap();
        let mut out = Vec::new();
        for xt in x.chunks_exact(cols) {
            let mut q = vec![0i8; cols];
            let s = quantize_row(xt, &mut q).unwrap();
            let mut acc = vec![0i32; rows];
            gemm_reference(view, &q, 1, &mut acc).unwrap();
            out.extend(acc.iter().zip(scales).map(|(&a, &w)| a as f32 / s * w));
        }
        out
    }

    #[test]
    fn every_family_level_and_thread_count_gives_the_reference_bits() {
        let mut seed = 3u64;
        // Rows that end inside a group and a tile, columns inside a block, tokens past one
        // dequantization block and past two AMX token tiles; rows enough for several tasks at 3
        // threads.
        for (rows, cols, tokens) in [
            (37, 300, 1),
            (37, 300, 19),
            (45, 300, 40),
            (1000, 77, 1),
            (1000, 77, 5),
        ] {
            let values: Vec<i8> = (0..rows * cols)
                .map(|_| (lcg(&mut seed) % 3) as i8 - 1)
                .collect();
            // Two fused parts with their own scales.
            let scales: Vec<f32> = (0..rows)
                .map(|n| if n < rows / 3 { 0.75 } else { 1.3 })
                .collect();
            let x: Vec<f32> = (0..tokens * cols)
                .map(|_| (lcg(&mut seed) % 2001) as f32 / 300.0 - 3.3)
                .collect();
            let want = reference(&values, cols, &scales, &x);
            let codes = pack(&values, rows, cols).unwrap();
            let view = TernaryView::new(&codes, rows, cols).unwrap();
            for threads in [1, 3] {
                let pool = ThreadPool::new(threads).unwrap();
                for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
                    for family in Family::ALL.into_iter().filter(|f| f.check(isa).is_ok()) {
                        let linear = Linear::new(family, view, scales.clone()).unwrap();
                        assert_eq!(linear.family(), family);
                        // AMX where this CPU and OS run it (for the families it serves): every
                        // batch of two tokens or more on it.
                        let amx = amx::AmxUse::On
                            .min_tokens(isa, family)
                            .ok()
                            .and_then(|a| a.0);
                        for amx_from in [None, amx]
                            .into_iter()
                            .collect::<std::collections::BTreeSet<_>>()
                        {
                            let mut scratch = LinearScratch::default();
                            let mut out = vec![f32::NAN; tokens * rows];
                            linear
                                .forward(&pool, isa, amx_from, &x, tokens, &mut out, &mut scratch)
                                .unwrap();
                            let bits =
                                |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                            assert!(
                                bits(&out) == bits(&want),
                                "{family:?} at {isa} (AMX from {amx_from:?}), {threads} threads: \
                                 {rows}x{cols}, {tokens} tokens"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let codes = pack(&[1, 0, -1, 1, 1, 0], 2, 3).unwrap();
        let view = TernaryView::new(&codes, 2, 3).unwrap();
        assert!(Linear::new(Family::Mad, view, vec![1.0]).is_err());
        let linear = Linear::new(Family::Mad, view, vec![1.0, 2.0]).unwrap();
        let (pool, mut scratch) = (ThreadPool::new(1).unwrap(), LinearScratch::default());
        let mut out = [0f32; 4];
        let x = [1.0f32; 6];
        assert!(
            linear
                .forward(&pool, Isa::Scalar, None, &x, 2, &mut out, &mut scratch)
                .is_ok()
        );
        assert_eq!(out, [0.0, 4.0, 0.0, 4.0]);
        assert!(
            linear
                .forward(&pool, Isa::Scalar, None, &x[..5], 2, &mut out, &mut scratch)
                .is_err()
        );
        assert!(
            linear
                .forward(&pool, Isa::Scalar, None, &x, 2, &mut out[..3], &mut scratch)
                .is_err()
        );
        assert!(
            linear
                .forward(&pool, Isa::Scalar, None, &[], 0, &mut [], &mut scratch)
                .is_ok()
        );
    }

    #[test]
    fn families_parse_and_the_default_follows_the_measured_rule() {
        assert_eq!(Family::parse("auto").unwrap(), None);
        for f in Family::ALL {
            assert_eq!(Family::parse(f.name()).unwrap(), Some(f));
        }
        assert!(Family::parse("fast").is_err());
        assert_eq!(Family::default_for(Isa::Avx512), Family::Base3);
        assert_eq!(Family::default_for(Isa::Avx2), Family::Mad);
        assert!(Family::Lut.check(Isa::Avx2).is_err());
    }
}
