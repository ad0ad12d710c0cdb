//! An 8-bit copy of the output head, an integer kernel over it, and exact top-k re-scoring.
//!
//! The head (the tied embedding of a small model) is the largest weight a decode step reads. A
//! [`Q8Head`] stores each row `v` as int8 codes `q_v` with one f32 scale `d_v = max_k |w_vk| / 127`
//! (`q = round_ties_even(w / d)`, so `|q| ≤ 127`), half the bytes of f16/bf16.
//!
//! # Layout
//! A row holds `stride` codes, `cols` rounded up to a multiple of `ALIGN` = 64 (the widest vector),
//! the padding zeros; rows are padded with zero rows to a multiple of `TILE` = 4. The rows of a
//! *group* (`TILE` consecutive rows, the kernels' row tile) are interleaved by 64-byte chunk: code
//! `k` of row `v` lies at `(v / TILE) · TILE · stride + (k / 64) · 64 · TILE + (v % TILE) · 64 +
//! k % 64`, so a pass over a group streams one contiguous run (four separate row streams read
//! 10-40% slower from memory, measured with one and two threads). Per row, `sums` holds `Σ_k q_vk`
//! and [`RowStats`] `d_v` and the norms below. `cols ≤ 2¹⁶`, so every integer sum below fits an i32
//! and `‖q_v‖₁` is exact in f32.
//!
//! # The arithmetic
//! An input row `x` is quantized once per token in two levels ([`Q8Input::prepare`]): the activation
//! quantization of [`crate::bitlinear::quant`] gives codes `h_x` and the dequantization scale `d_x = 1 / s` in
//! f32; the remainder `x / d_x − h_x` (at most about ½) is rounded to 1/256 steps as second codes
//! `l_x` (clamped to ±127). So `x = d_x q_x + r_x` with `q_x = h_x + l_x / 256`, and the residual
//! `r_x` (measured in f64) is about 256 times smaller than after one level. That matters: a few
//! large activation channels set `d_x`, and with one level the input's rounding dominated the bound
//! (on random weights of the 2B-4T shape, ~2800 candidates per token instead of ~280).
//!
//! The kernels compute `q_v · h_x` and `q_v · l_x` exactly in i32 at every [`Isa`] level (two
//! inputs share each weight load, so the second level costs instructions, not bytes), and they
//! agree bit for bit with the scalar one:
//! - AVX-512 VNNI: `vpdpbusd` of `h_x + 128` (unsigned) and `q_v` on 64 bytes per instruction, minus
//!   `128 · Σ_k q_vk` (precomputed), and the same for `l_x`; 4 rows share each input load.
//! - AVX-VNNI: the same on 32 bytes per instruction.
//! - AVX2: `vpmaddubsw` of `|h_x|` and `sign(h_x) · q_v` (each pair at most `2 · 128 · 127 = 32512`,
//!   so no i16 saturation), then `vpmaddwd` by ones into i32.
//! - NEON: widening `smull`/`smlal` (two products per i16 lane, at most 32512), `sadalp` into i32.
//! - NEON dot product: `sdot` of `q_v` and `h_x` (signed × signed) straight into i32.
//! - AMX-INT8, for several inputs at once ([`Q8Head::logits_tokens`]): `tdpbssd` (signed ×
//!   signed) of 16 rows' codes against 16 inputs' codes of both levels, on the tiles of
//!   [`crate::bitlinear::amx`]; its own start-up known-answer check ([`amx_status`]) guards it.
//!
//! `q_v · q_x = (256 · q_v · h_x + q_v · l_x) / 256`, the numerator exact in f64 (at most 40 bits),
//! and `approx_v = (d_v · d_x) · numerator / 256` in f32 (the numerator rounded once, the division by
//! a power of two exact). With
//! the weight residual `r_v = w_v − d_v q_v` (measured at quantization), exactly
//! `w_v · x − d_v d_x (q_v · q_x) = r_v · x + d_v q_v · r_x`, so by Hölder and Cauchy–Schwarz the
//! bound is the sum of
//! - `min(max_k |r_vk| · ‖x‖₁, ‖r_v‖₂ · ‖x‖₂)` for the weight residual;
//! - `d_v · min(‖q_v‖₁ · max_k |r_x,k|, ‖q_v‖₂ · ‖r_x‖₂)` for the input residual;
//! - `cols · 2⁻²³ · min(128 d_v ‖x‖₁, (d_v ‖q_v‖₂ + ‖r_v‖₂) · ‖x‖₂)` for the f32 rounding of the
//!   full-precision dot product the caller re-scores with (within `cols · 2⁻²⁴ · Σ_k |w_vk x_k|`,
//!   `|w_vk| ≤ 127 d_v (1 + 2⁻²³)`, `‖w_v‖₂ ≤ d_v ‖q_v‖₂ + ‖r_v‖₂`; doubled as a margin);
//! - `2⁻²⁰ · |approx_v|` for the three f32 roundings of `approx_v` (each `2⁻²⁴` relative), and
//!   `2⁻¹⁰⁰` absolute against underflow;
//!
//! all multiplied by `1 + 2⁻¹⁰`, as is every stored norm, which covers the f32 rounding of the norms
//! and of the bound's own few operations.
//!
//! [`top_candidates`] then keeps every row whose exact logit could still be among the `k` largest
//! (a NaN bound, from a non-finite input, keeps the row); the caller re-scores those with the
//! full-precision head. So the `k` largest logits and their order are exactly those of the
//! full-precision head (exact greedy decoding and top-k sampling for any `k` up to the one used);
//! the other logits are approximations within their bounds.

use crate::bitlinear::quant::QuantizedRows;
use crate::isa::Isa;
use crate::table::DenseView;
use crate::{Error, check_len};
use std::ops::Range;

/// Factor by which computed norms and bounds are rounded up, so that they stay upper bounds.
const ROUND_UP: f32 = 1.0 + 1.0 / 1024.0;
/// Row stride granularity of the codes (the widest vector, in bytes).
const ALIGN: usize = 64;
/// Rows that share each input load in the kernels.
const TILE: usize = 4;
/// Most columns (see the module documentation).
const MAX_COLS: usize = 1 << 16;
/// Lanes of the vectorizable quantization loop (divides `ALIGN`).
const LANES: usize = 16;
/// Rows whose integer dot products [`Q8Head::logits`] keeps on the stack at a time.
const BATCH: usize = 64;

/// One row's scale and norms (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct RowStats {
    /// `d_v`.
    scale: f32,
    /// `‖q_v‖₁` (exact).
    code_l1: f32,
    /// `‖q_v‖₂`, rounded up.
    code_l2: f32,
    /// `max_k |r_vk|`, rounded up.
    residual_max: f32,
    /// `‖r_v‖₂`, rounded up.
    residual_l2: f32,
}

/// A row-major int8 matrix with one scale per row and its quantization error bounds.
#[derive(Clone, Debug)]
pub struct Q8Head {
    codes: Vec<i8>,
    /// `Σ_k q_vk` per row (the VNNI kernel's offset correction).
    sums: Vec<i32>,
    stats: Vec<RowStats>,
    rows: usize,
    cols: usize,
    stride: usize,
}

/// One input row prepared for [`Q8Head::logits`]: its two levels of int8 codes, scale and norms.
/// Kept by the caller and reused, so a decode step allocates nothing once it has grown.
#[derive(Clone, Debug, Default)]
pub struct Q8Input {
    /// `h_x`, padded with zeros.
    quantized: QuantizedRows,
    /// `l_x`, as long as `h_x`'s padded row.
    low: Vec<i8>,
    /// `d_x`.
    scale: f32,
    /// `‖x‖₁`, `‖x‖₂`, `max_k |r_x,k|`, `‖r_x‖₂`, rounded up.
    l1: f32,
    l2: f32,
    residual_max: f32,
    residual_l2: f32,
}

impl Q8Input {
    /// Quantizes `x` (one row) in two levels with the `isa` kernels and measures its norms and
    /// residual.
    pub fn prepare(&mut self, isa: Isa, x: &[f32]) -> Result<(), Error> {
        self.quantized.quantize(isa, x, 1, x.len())?;
        self.scale = 1.0 / self.quantized.scales()[0];
        let d = f64::from(self.scale);
        self.low.clear();
        self.low.resize(self.quantized.row(0).len(), 0);
        let (mut l1, mut l2, mut r_max, mut r_l2) = (0f64, 0f64, 0f64, 0f64);
        for ((&v, &high), low) in x.iter().zip(self.quantized.row(0)).zip(&mut self.low) {
            let v = f64::from(v);
            // Exact in f64: `d · h` has at most 32 significant bits, and unless `h = 0` it lies
            // within `d` of `v`, whose magnitude is at least about `d / 2`.
            let remainder = v - d * f64::from(high);
            // A NaN casts to 0; the residual below stays NaN and so does every bound.
            *low = (remainder / d * 256.0)
                .round_ties_even()
                .clamp(-127.0, 127.0) as i8;
            // `d` times an integer of at most 16 bits, over a power of two: exact, and so is the
            // difference, for the same reason as above at 1/256 the scale.
            let r = remainder - d * f64::from(*low) / 256.0;
            l1 += v.abs();
            l2 += v * v;
            // Not `f64::max`, which would drop a NaN.
            r_max = if r.abs() > r_max || r.is_nan() {
                r.abs()
            } else {
                r_max
            };
            r_l2 += r * r;
        }
        let up = |v: f64| v as f32 * ROUND_UP;
        (self.l1, self.l2) = (up(l1), up(l2.sqrt()));
        (self.residual_max, self.residual_l2) = (up(r_max), up(r_l2.sqrt()));
        Ok(())
    }

    fn cols(&self) -> usize {
        self.quantized.cols()
    }
}

/// Rows [`Q8Head::quantize_with`] reports at a time.
const ROWS_PER_REPORT: usize = 1024;

impl Q8Head {
    /// Quantizes a `rows × cols` full-precision matrix, with the `isa` kernels (the result is the
    /// same at every level).
    pub fn quantize(
        isa: Isa,
        view: DenseView<'_>,
        rows: usize,
        cols: usize,
    ) -> Result<Self, Error> {
        Self::quantize_with(isa, view, rows, cols, |_| {})
    }

    /// [`quantize`](Self::quantize), calling `rows_done` with each range of rows (in order, 1024
    /// at a time) once it has been read: a caller serving the matrix from a memory-mapped file
    /// can drop those pages from memory as it goes.
    pub fn quantize_with(
        isa: Isa,
        view: DenseView<'_>,
        rows: usize,
        cols: usize,
        mut rows_done: impl FnMut(Range<usize>),
    ) -> Result<Self, Error> {
        isa.check()?;
        check_len("output head", view.len(), rows * cols)?;
        if cols > MAX_COLS {
            return Err(Error::Shape(format!(
                "an 8-bit output head holds at most {MAX_COLS} columns, not {cols}"
            )));
        }
        let stride = cols.div_ceil(ALIGN) * ALIGN;
        let mut codes = vec![0i8; rows.div_ceil(TILE) * TILE * stride];
        let (mut sums, mut stats) = (vec![0i32; rows], vec![RowStats::default(); rows]);
        // Zero padding past `cols` quantizes to zero codes and residuals.
        let (mut row, mut row_codes) = (vec![0f32; stride], vec![0i8; stride]);
        for v in 0..rows {
            view.row_to_f32(v, cols, &mut row[..cols])?;
            // Quantizes the `ALIGN`-padded row; `None` if it holds a value that is not finite.
            let quantized = isa.vectorized(
                #[inline(always)]
                || quantize_lanes(&row, &mut row_codes),
            )?;
            (sums[v], stats[v]) = quantized.ok_or_else(|| {
                Error::Shape(format!(
                    "output head row {v} holds a value that is not finite"
                ))
            })?;
            store_row(&mut codes, stride, v, &row_codes);
            if (v + 1) % ROWS_PER_REPORT == 0 || v + 1 == rows {
                rows_done(v + 1 - (v % ROWS_PER_REPORT + 1)..v + 1);
            }
        }
        Ok(Self {
            codes,
            sums,
            stats,
            rows,
            cols,
            stride,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes held: the padded codes and the per-row stats.
    pub fn bytes(&self) -> usize {
        self.codes.len() + (4 + std::mem::size_of::<RowStats>()) * self.rows
    }

    /// Approximate logits and their error bounds for rows `range` and one prepared input.
    pub fn logits(
        &self,
        isa: Isa,
        range: Range<usize>,
        x: &Q8Input,
        approx: &mut [f32],
        bounds: &mut [f32],
    ) -> Result<(), Error> {
        check_len("q8 head input", x.cols(), self.cols)?;
        check_len("q8 head logits", approx.len(), range.len())?;
        check_len("q8 head bounds", bounds.len(), range.len())?;
        if range.start > range.end || range.end > self.rows {
            return Err(Error::Shape(format!(
                "q8 head rows {range:?} are outside 0..{}",
                self.rows
            )));
        }
        let mut dots = [[0i32; 2]; BATCH];
        for ((start, approx), bounds) in range
            .clone()
            .step_by(BATCH)
            .zip(approx.chunks_mut(BATCH))
            .zip(bounds.chunks_mut(BATCH))
        {
            let n = approx.len();
            let stats = &self.stats[start..start + n];
            let sums = &self.sums[start..start + n];
            int_dots(
                isa,
                &self.codes,
                self.stride,
                start,
                [x.quantized.row(0), &x.low],
                sums,
                &mut dots[..n],
            )?;
            isa.vectorized(
                #[inline(always)]
                || bound_batch(x, stats, &dots[..n], approx, bounds),
            )?;
        }
        Ok(())
    }
}

impl Q8Head {
    /// [`logits`](Self::logits) of several prepared inputs: `parts[t]` receives the approximate
    /// logits and bounds of rows `range` for `inputs[t]`. With `amx`, the integer products of the
    /// range's whole panels of 32 rows (from its first multiple of 4) run on AMX-INT8 for all the
    /// inputs at once (an error where [`amx_status`] refuses); the rest row by row and input by
    /// input, as without. The results are the same bit for bit either way.
    pub fn logits_tokens(
        &self,
        isa: Isa,
        amx: bool,
        range: Range<usize>,
        inputs: &[Q8Input],
        parts: &mut [(&mut [f32], &mut [f32])],
    ) -> Result<(), Error> {
        check_len("q8 head outputs", parts.len(), inputs.len())?;
        let first = range.start.next_multiple_of(TILE).min(range.end);
        let panels = (range.end - first) / AMX_PANEL_ROWS;
        if !amx || panels == 0 {
            for (input, (approx, bounds)) in inputs.iter().zip(parts.iter_mut()) {
                self.logits(isa, range.clone(), input, approx, bounds)?;
            }
            return Ok(());
        }
        if let Err(why) = amx_status() {
            return Err(Error::Unsupported(format!(
                "AMX-INT8 8-bit head unavailable: {why}"
            )));
        }
        self.logits_amx(
            isa,
            range,
            first..first + panels * AMX_PANEL_ROWS,
            inputs,
            parts,
        )
    }

    /// [`logits_tokens`](Self::logits_tokens) with AMX, `on_amx` being the rows of its panels,
    /// once the CPU, OS and Linux support are known.
    fn logits_amx(
        &self,
        isa: Isa,
        range: Range<usize>,
        on_amx: Range<usize>,
        inputs: &[Q8Input],
        parts: &mut [(&mut [f32], &mut [f32])],
    ) -> Result<(), Error> {
        for (input, (approx, bounds)) in inputs.iter().zip(parts.iter_mut()) {
            check_len("q8 head input", input.cols(), self.cols)?;
            check_len("q8 head logits", approx.len(), range.len())?;
            check_len("q8 head bounds", bounds.len(), range.len())?;
            for rest in [range.start..on_amx.start, on_amx.end..range.end] {
                let at = rest.start - range.start..rest.end - range.start;
                let (a, b) = (&mut approx[at.clone()], &mut bounds[at]);
                self.logits(isa, rest, input, a, b)?;
            }
        }
        #[cfg(target_arch = "x86_64")]
        return AMX_DOTS.with_borrow_mut(|dots| {
            let dots = crate::grown(dots, inputs.len() * on_amx.len(), [0; 2]);
            let codes = &self.codes[on_amx.start * self.stride..on_amx.end * self.stride];
            x86::amx_dots(codes, self.stride, inputs, dots);
            let stats = &self.stats[on_amx.clone()];
            let at = on_amx.start - range.start..on_amx.end - range.start;
            for ((input, (approx, bounds)), dots) in inputs
                .iter()
                .zip(parts.iter_mut())
                .zip(dots.chunks_exact(on_amx.len()))
            {
                let (approx, bounds) = (&mut approx[at.clone()], &mut bounds[at.clone()]);
                isa.vectorized(
                    #[inline(always)]
                    || bound_batch(input, stats, dots, approx, bounds),
                )?;
            }
            Ok(())
        });
        #[cfg(not(target_arch = "x86_64"))]
        Err(Error::Unsupported(
            "AMX-INT8 kernels need x86-64".to_string(),
        ))
    }
}

/// Rows of the 8-bit head per AMX panel: two tiles of 16.
const AMX_PANEL_ROWS: usize = 32;

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// [`Q8Head::logits_tokens`]'s integer products on AMX, `[input][row]`.
    static AMX_DOTS: std::cell::RefCell<Vec<[i32; 2]>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether [`Q8Head::logits_tokens`] may run on AMX in this process: `Ok`, or why not. Decided once:
/// the ternary kernels' [`status`](crate::bitlinear::amx::status) (CPU, OS and Linux support), then
/// a known-answer check of a small head's logits against the scalar kernel's.
pub fn amx_status() -> &'static Result<(), String> {
    static STATUS: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    STATUS.get_or_init(|| {
        crate::bitlinear::amx::status().clone()?;
        // 75 rows (a panel of 32 past an unaligned start, and rows either side), 300 columns (a
        // partial step), 19 inputs (a partial token tile), values with the extremes mixed in.
        let (rows, cols, tokens) = (75, 300, 19);
        let mut seed = 0x5eed_u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let w: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
        let head = Q8Head::quantize(Isa::Scalar, DenseView::F32(&w), rows, cols)
            .map_err(|e| e.to_string())?;
        let mut inputs = vec![Q8Input::default(); tokens];
        for input in &mut inputs {
            let x: Vec<f32> = (0..cols).map(|k| next() * (1 + k % 5) as f32).collect();
            input.prepare(Isa::Scalar, &x).map_err(|e| e.to_string())?;
        }
        let range = 3..rows;
        let mut got = vec![[0f32; 2]; tokens * range.len()];
        let mut want = got.clone();
        for (amx, out) in [(true, &mut got), (false, &mut want)] {
            // The scalar kernel, and AMX for rows 4..68 (what `logits_tokens` picks).
            let mut approx = vec![0f32; tokens * range.len()];
            let mut bounds = approx.clone();
            let mut parts: Vec<_> = approx
                .chunks_exact_mut(range.len())
                .zip(bounds.chunks_exact_mut(range.len()))
                .collect();
            let run = if amx {
                head.logits_amx(Isa::Scalar, range.clone(), 4..68, &inputs, &mut parts)
            } else {
                head.logits_tokens(Isa::Scalar, false, range.clone(), &inputs, &mut parts)
            };
            run.map_err(|e| e.to_string())?;
            for ((o, a), b) in out.iter_mut().zip(&approx).zip(&bounds) {
                *o = [*a, *b];
            }
        }
        match got.iter().zip(&want).position(|(a, b)| a != b) {
            None => Ok(()),
            Some(at) => Err(format!(
                "the 8-bit head's start-up known-answer check differs from the scalar kernel \
                 (logit {at}: {:?} instead of {:?})",
                got[at], want[at]
            )),
        }
    })
}

/// One batch's approximate logits and bounds (see the module documentation), in plain f32
/// operations that give the same result at every level; the numerator `256 · high + low` is exact in
/// f64 (at most 40 bits), so converting it rounds once, as an integer conversion would.
#[inline(always)]
fn bound_batch(
    x: &Q8Input,
    stats: &[RowStats],
    dots: &[[i32; 2]],
    approx: &mut [f32],
    bounds: &mut [f32],
) {
    let rescore = x.cols() as f32 * 2f32.powi(-23);
    for (((a, b), s), &[high, low]) in approx.iter_mut().zip(bounds).zip(stats).zip(dots) {
        let numerator = (256.0 * f64::from(high) + f64::from(low)) as f32;
        *a = s.scale * x.scale * numerator / 256.0;
        let weight = (s.residual_max * x.l1).min(s.residual_l2 * x.l2);
        let input = s.scale * (s.code_l1 * x.residual_max).min(s.code_l2 * x.residual_l2);
        let w_l2 = s.scale * s.code_l2 + s.residual_l2;
        let exact = rescore * (128.0 * s.scale * x.l1).min(w_l2 * x.l2);
        let rounding = a.abs() * 2f32.powi(-20) + 2f32.powi(-100);
        *b = (weight + input + exact + rounding) * ROUND_UP;
    }
}

/// The vectorizable body: every statistic over `LANES` independent lanes, combined in one fixed
/// order, so each level gives the same result.
#[inline(always)]
fn quantize_lanes(w: &[f32], codes: &mut [i8]) -> Option<(i32, RowStats)> {
    let mut lane_max = [0f32; LANES];
    let mut finite = [true; LANES];
    for chunk in w.chunks_exact(LANES) {
        for ((m, f), v) in lane_max.iter_mut().zip(&mut finite).zip(chunk) {
            *m = m.max(v.abs());
            *f &= v.is_finite();
        }
    }
    if finite.contains(&false) {
        return None;
    }
    let absmax = lane_max.iter().fold(0f32, |m, &v| m.max(v));
    let d = if absmax > 0.0 { absmax / 127.0 } else { 1.0 };
    let (mut sum, mut l1, mut sq) = ([0i32; LANES], [0i32; LANES], [0i32; LANES]);
    let (mut r_max, mut r_sq) = ([0f64; LANES], [0f64; LANES]);
    for (ws, qs) in w.chunks_exact(LANES).zip(codes.chunks_exact_mut(LANES)) {
        for (l, (q, &v)) in qs.iter_mut().zip(ws).enumerate() {
            let c = (v / d).round_ties_even().clamp(-127.0, 127.0);
            *q = c as i8;
            // Exact in f64 (see `Q8Input::prepare`).
            let r = f64::from(v) - f64::from(d) * f64::from(c);
            let c = i32::from(*q);
            (sum[l], l1[l], sq[l]) = (sum[l] + c, l1[l] + c.abs(), sq[l] + c * c);
            r_max[l] = r_max[l].max(r.abs());
            r_sq[l] += r * r;
        }
    }
    let total = |s: [i32; LANES]| s.iter().map(|&v| f64::from(v)).sum::<f64>();
    let up = |v: f64| v as f32 * ROUND_UP;
    let stats = RowStats {
        scale: d,
        code_l1: total(l1) as f32,
        code_l2: up(total(sq).sqrt()),
        residual_max: up(r_max.iter().fold(0f64, |m, &v| m.max(v))),
        residual_l2: up(r_sq.iter().sum::<f64>().sqrt()),
    };
    Some((sum.iter().sum(), stats))
}

/// Writes row `v`'s `stride` codes into the interleaved layout (see the module documentation).
fn store_row(codes: &mut [i8], stride: usize, v: usize, row: &[i8]) {
    let group = &mut codes[v / TILE * TILE * stride..][..TILE * stride];
    for (c, chunk) in row.chunks_exact(ALIGN).enumerate() {
        group[(c * TILE + v % TILE) * ALIGN..][..ALIGN].copy_from_slice(chunk);
    }
}

/// Where code `k` of row `r` of a group lies in the group (see the module documentation).
#[inline(always)]
fn offset_in_group(r: usize, k: usize) -> usize {
    (k / ALIGN * TILE + r) * ALIGN + k % ALIGN
}

/// Two inputs (the levels of a [`Q8Input`]) that share each weight load.
type Inputs<'a> = [&'a [i8]; 2];

/// `out[i][j] = Σ_k q[first + i][k] · x[j][k]` exactly, for the rows `first..first + out.len()` of
/// interleaved `codes` with rows of `stride` codes (a multiple of `ALIGN`), `Σ_k` of each in `sums`.
fn int_dots(
    isa: Isa,
    codes: &[i8],
    stride: usize,
    first: usize,
    x: Inputs<'_>,
    sums: &[i32],
    out: &mut [[i32; 2]],
) -> Result<(), Error> {
    isa.check()?;
    let shortest = x[0].len().min(x[1].len());
    if stride == 0 || !stride.is_multiple_of(ALIGN) || shortest < stride {
        return Err(Error::Shape(format!(
            "q8 head: row stride {stride} must be a positive multiple of {ALIGN} and at most the \
             inputs' {shortest} codes"
        )));
    }
    let group_len = TILE * stride;
    if !codes.len().is_multiple_of(group_len) || first + out.len() > codes.len() / stride {
        return Err(Error::Shape(format!(
            "q8 head: {} codes are no whole groups of {TILE} rows of {stride}, or do not hold \
             rows {first}..{}",
            codes.len(),
            first + out.len()
        )));
    }
    check_len("q8 head code sums", sums.len(), out.len())?;
    match isa {
        Isa::Scalar => run::<Scalar>(codes, stride, first, x, sums, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => run::<x86::Avx2>(codes, stride, first, x, sums, out),
        #[cfg(target_arch = "x86_64")]
        Isa::AvxVnni => run::<x86::AvxVnni>(codes, stride, first, x, sums, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => run::<x86::Avx512>(codes, stride, first, x, sums, out),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => run::<arm::Neon>(codes, stride, first, x, sums, out),
        #[cfg(target_arch = "aarch64")]
        Isa::NeonDot => run::<arm::NeonDot>(codes, stride, first, x, sums, out),
        #[allow(unreachable_patterns)] // every level is reachable on some target
        _ => unreachable!("isa.check() passed for a level of another architecture"),
    }
    Ok(())
}

/// Dot products of a few code rows with two inputs.
trait DotKernel {
    /// What the kernel adds to every input code (its results exceed the dot products by
    /// `OFFSET · Σ_k row[k]`).
    const OFFSET: i32;

    /// `Σ_k q[first + r][k] · (x[j][k] + OFFSET)` for the rows `first..first + R` of one
    /// interleaved group and each input `j`, in wrapping i32.
    ///
    /// # Safety
    /// The CPU supports the kernel's ISA; `group` holds `TILE` rows of `group.len() / TILE` codes,
    /// a multiple of `ALIGN`; `first + R ≤ TILE`; both inputs hold at least a row's codes.
    unsafe fn tile<const R: usize>(group: &[i8], first: usize, x: Inputs<'_>) -> [[i32; 2]; R];
}

/// The loop shared by every ISA: whole groups with `TILE` rows at a time, single rows elsewhere.
fn run<K: DotKernel>(
    codes: &[i8],
    stride: usize,
    first: usize,
    x: Inputs<'_>,
    sums: &[i32],
    out: &mut [[i32; 2]],
) {
    let group = |v: usize| &codes[v / TILE * TILE * stride..][..TILE * stride];
    let mut i = 0;
    while i < out.len() {
        let v = first + i;
        if v.is_multiple_of(TILE) && out.len() - i >= TILE {
            // SAFETY: `int_dots` checked the ISA, that the codes are whole groups of rows of
            // `stride` codes, a multiple of `ALIGN`, holding row `v`, and that `x.len() ≥ stride`.
            let got = unsafe { K::tile::<TILE>(group(v), 0, x) };
            out[i..i + TILE].copy_from_slice(&got);
            i += TILE;
        } else {
            // SAFETY: as above.
            out[i] = unsafe { K::tile::<1>(group(v), v % TILE, x) }[0];
            i += 1;
        }
    }
    for (o, &s) in out.iter_mut().zip(sums) {
        *o = o.map(|v| v.wrapping_sub(K::OFFSET.wrapping_mul(s)));
    }
}

/// The reference: plain integer products.
struct Scalar;

impl DotKernel for Scalar {
    const OFFSET: i32 = 0;

    unsafe fn tile<const R: usize>(group: &[i8], first: usize, x: Inputs<'_>) -> [[i32; 2]; R] {
        std::array::from_fn(|r| {
            x.map(|x| {
                let chunks = x[..group.len() / TILE].chunks_exact(ALIGN).enumerate();
                chunks.fold(0i32, |sum, (c, x)| {
                    let row = &group[offset_in_group(first + r, c * ALIGN)..][..ALIGN];
                    row.iter()
                        .zip(x)
                        .map(|(&w, &v)| i32::from(w) * i32::from(v))
                        .fold(sum, i32::wrapping_add)
                })
            })
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{AMX_PANEL_ROWS, DotKernel, Inputs, Q8Input, TILE, offset_in_group};
    use crate::bitlinear::amx::x86::{Line, lay_out_tile, step_tiles, with_tiles};
    use crate::bitlinear::mad::x86::hsum_avx2;
    use crate::isa::{PREFETCH_AHEAD, prefetch};
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    /// Per-thread buffers of [`amx_dots`]: a panel's weight tiles and the inputs' tiles.
    #[derive(Default)]
    struct AmxScratch {
        weights: Vec<Line>,
        inputs: Vec<Line>,
    }

    thread_local! {
        static AMX_SCRATCH: RefCell<AmxScratch> = RefCell::new(AmxScratch::default());
    }

    /// `dots[t · rows + v] = [q_v · h_t, q_v · l_t]` exactly, for the `rows` rows of `codes` (whole
    /// groups in the interleaved layout, `rows` a multiple of 32) and each input `t`: `tdpbssd` of
    /// weight tiles (a panel of 32 rows, copied out of the interleaved groups so that each tile row
    /// is one weight row's 64 codes) with the inputs' tiles (16 inputs a tile, both levels), in the
    /// layout of [`crate::bitlinear::amx`]. Signed times signed, so no offset to correct.
    ///
    /// The caller has seen [`super::amx_status`]'s CPU, OS and Linux support.
    pub(super) fn amx_dots(codes: &[i8], stride: usize, inputs: &[Q8Input], dots: &mut [[i32; 2]]) {
        let rows = codes.len() / stride;
        let steps = stride / 64;
        assert!(
            rows.is_multiple_of(AMX_PANEL_ROWS)
                && stride.is_multiple_of(64)
                && codes.len() == rows * stride
                && dots.len() == inputs.len() * rows
                && inputs
                    .iter()
                    .all(|i| i.quantized.row(0).len() >= stride && i.low.len() >= stride),
            "q8 head on AMX: unchecked arguments"
        );
        AMX_SCRATCH.with_borrow_mut(|s| {
            let input_tiles = inputs.len().div_ceil(16);
            let input_lines =
                crate::grown(&mut s.inputs, input_tiles * 2 * steps * 16, Line([0; 64]));
            for (group, tiles) in inputs
                .chunks(16)
                .zip(input_lines.chunks_exact_mut(2 * steps * 16))
            {
                let (h, l) = tiles.split_at_mut(steps * 16);
                // SAFETY: AMX runs only where `amx_status` passed, which requires the AVX-512 level.
                unsafe {
                    lay_out_tile(group.len(), |n| &group[n].quantized.row(0)[..stride], h);
                    lay_out_tile(group.len(), |n| &group[n].low[..stride], l);
                }
            }
            let weights = crate::grown(&mut s.weights, 2 * steps * 16, Line([0; 64]));
            let mut out = [[[0i32; 16]; 16]; 4];
            let run = || {
                for p in 0..rows / AMX_PANEL_ROWS {
                    // Tile row `r` of half `h`, k-step `c`: row `v = 32 p + 16 h + r`'s chunk `c`,
                    // which the interleaved layout keeps beside its group's other three rows.
                    for (i, lines) in weights.chunks_exact_mut(TILE).enumerate() {
                        let (h, c, q) = (i / (steps * 4), i / 4 % steps, i % 4);
                        let v = AMX_PANEL_ROWS * p + 16 * h + TILE * q;
                        let src = &codes[v * stride + c * TILE * 64..][..TILE * 64];
                        for (line, src) in lines.iter_mut().zip(src.chunks_exact(64)) {
                            // The same line of the next panel, asked for ahead: the copy waits
                            // on memory (measured: 16-row decode steps 1-5% faster with it).
                            prefetch(src.as_ptr().wrapping_add(AMX_PANEL_ROWS * stride).cast());
                            let src: &[i8; 64] = src.try_into().expect("64-byte chunks");
                            line.0 = src.map(|b| b as u8);
                        }
                    }
                    for (u, tiles) in input_lines.chunks_exact(2 * steps * 16).enumerate() {
                        // SAFETY: `weights` holds two halves of `steps` tiles of 1024 bytes,
                        // `tiles` the input tile's two levels of `steps` tiles each, `out` four
                        // tiles of 16 × 16 i32; this runs inside `with_tiles`.
                        unsafe {
                            step_tiles(
                                weights.as_ptr().cast(),
                                tiles.as_ptr().cast(),
                                steps,
                                true,
                                &mut out,
                            )
                        };
                        // out[2 · half + level][row][input].
                        let tile_inputs = dots.chunks_exact_mut(rows).skip(16 * u).take(16);
                        for (n, input) in tile_inputs.enumerate() {
                            let row = &mut input[AMX_PANEL_ROWS * p..][..AMX_PANEL_ROWS];
                            for (r, d) in row.iter_mut().enumerate() {
                                let (h, r) = (r / 16, r % 16);
                                *d = [out[2 * h][r][n], out[2 * h + 1][r][n]];
                            }
                        }
                    }
                }
            };
            // SAFETY: the caller has seen AMX-TILE usable, with the OS's and Linux's permission.
            unsafe { with_tiles(run) }
        });
    }

    /// AVX-512 VNNI: `vpdpbusd` of `x + 128` (unsigned) and the codes, 64 bytes per instruction.
    pub struct Avx512;

    impl DotKernel for Avx512 {
        const OFFSET: i32 = 128;

        unsafe fn tile<const R: usize>(group: &[i8], first: usize, x: Inputs<'_>) -> [[i32; 2]; R] {
            // SAFETY: forwarded from the trait's contract.
            unsafe { tile_avx512(group, first, x) }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile_avx512<const R: usize>(
        group: &[i8],
        first: usize,
        x: Inputs<'_>,
    ) -> [[i32; 2]; R] {
        let flip = _mm512_set1_epi8(i8::MIN);
        let mut acc = [[_mm512_setzero_si512(); 2]; R];
        for at in (0..group.len() / TILE).step_by(64) {
            // SAFETY: `at + 64` is within a row, so within both inputs (trait contract).
            let xu = x.map(|x| unsafe { _mm512_loadu_si512(x.as_ptr().add(at).cast()) });
            let xu = xu.map(|v| _mm512_xor_si512(v, flip));
            for (r, a) in acc.iter_mut().enumerate() {
                let w = group.as_ptr().wrapping_add(offset_in_group(first + r, at));
                prefetch(w.wrapping_add(PREFETCH_AHEAD).cast());
                // SAFETY: the row's 64-byte chunk at `at` lies within the group (trait contract).
                let w = unsafe { _mm512_loadu_si512(w.cast()) };
                for (a, &xu) in a.iter_mut().zip(&xu) {
                    *a = _mm512_dpbusd_epi32(*a, xu, w);
                }
            }
        }
        acc.map(|a| a.map(|v| _mm512_reduce_add_epi32(v)))
    }

    /// AVX-VNNI: [`Avx512`]'s arithmetic with the 256-bit `vpdpbusd`, 32 bytes per instruction.
    pub struct AvxVnni;

    impl DotKernel for AvxVnni {
        const OFFSET: i32 = 128;

        unsafe fn tile<const R: usize>(group: &[i8], first: usize, x: Inputs<'_>) -> [[i32; 2]; R] {
            // SAFETY: forwarded from the trait's contract.
            unsafe { tile_avxvnni(group, first, x) }
        }
    }

    #[target_feature(enable = "avx2,avxvnni")]
    unsafe fn tile_avxvnni<const R: usize>(
        group: &[i8],
        first: usize,
        x: Inputs<'_>,
    ) -> [[i32; 2]; R] {
        let flip = _mm256_set1_epi8(i8::MIN);
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for at in (0..group.len() / TILE).step_by(32) {
            // SAFETY: `at + 32` is within a row, so within both inputs (trait contract).
            let xu = x.map(|x| unsafe { _mm256_loadu_si256(x.as_ptr().add(at).cast()) });
            let xu = xu.map(|v| _mm256_xor_si256(v, flip));
            for (r, a) in acc.iter_mut().enumerate() {
                let w = group.as_ptr().wrapping_add(offset_in_group(first + r, at));
                if at % 64 == 0 {
                    prefetch(w.wrapping_add(PREFETCH_AHEAD).cast());
                }
                // SAFETY: the 32 codes at `at` lie in one chunk of the row, within the group (trait
                // contract).
                let w = unsafe { _mm256_loadu_si256(w.cast()) };
                for (a, &xu) in a.iter_mut().zip(&xu) {
                    *a = _mm256_dpbusd_avx_epi32(*a, xu, w);
                }
            }
        }
        acc.map(|a| a.map(|v| hsum_avx2(v)))
    }

    /// AVX2: `vpmaddubsw` of `|x|` and `sign(x) · w`, then `vpmaddwd` by ones, 32 bytes per step.
    pub struct Avx2;

    impl DotKernel for Avx2 {
        const OFFSET: i32 = 0;

        unsafe fn tile<const R: usize>(group: &[i8], first: usize, x: Inputs<'_>) -> [[i32; 2]; R] {
            // SAFETY: forwarded from the trait's contract.
            unsafe { tile_avx2(group, first, x) }
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn tile_avx2<const R: usize>(
        group: &[i8],
        first: usize,
        x: Inputs<'_>,
    ) -> [[i32; 2]; R] {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for at in (0..group.len() / TILE).step_by(32) {
            // SAFETY: `at + 32` is within a row, so within both inputs (trait contract).
            let xv = x.map(|x| unsafe { _mm256_loadu_si256(x.as_ptr().add(at).cast()) });
            // -128 becomes 0x80, read as 128 by the unsigned operand.
            let magnitude = xv.map(|v| _mm256_abs_epi8(v));
            for (r, a) in acc.iter_mut().enumerate() {
                let w = group.as_ptr().wrapping_add(offset_in_group(first + r, at));
                if at % 64 == 0 {
                    prefetch(w.wrapping_add(PREFETCH_AHEAD).cast());
                }
                // SAFETY: the 32 codes at `at` lie in one chunk of the row, within the group (trait
                // contract).
                let w = unsafe { _mm256_loadu_si256(w.cast()) };
                for ((a, &m), &xv) in a.iter_mut().zip(&magnitude).zip(&xv) {
                    // Codes are at least -127, so negating them cannot overflow.
                    let pairs = _mm256_maddubs_epi16(m, _mm256_sign_epi8(w, xv));
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        acc.map(|a| a.map(|v| hsum_avx2(v)))
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{DotKernel, Inputs, TILE, offset_in_group};
    use crate::bitlinear::mad::arm::sdot;
    use std::arch::aarch64::*;

    /// NEON dot product: `sdot` of 16 codes × 16 inputs into four i32 lanes per instruction.
    pub struct NeonDot;

    impl DotKernel for NeonDot {
        const OFFSET: i32 = 0;

        unsafe fn tile<const R: usize>(group: &[i8], first: usize, x: Inputs<'_>) -> [[i32; 2]; R] {
            // SAFETY: forwarded from the trait's contract.
            unsafe { tile_neon_dot(group, first, x) }
        }
    }

    #[target_feature(enable = "neon,dotprod")]
    unsafe fn tile_neon_dot<const R: usize>(
        group: &[i8],
        first: usize,
        x: Inputs<'_>,
    ) -> [[i32; 2]; R] {
        let mut acc = [[vdupq_n_s32(0); 2]; R];
        for at in (0..group.len() / TILE).step_by(16) {
            // SAFETY: `at + 16` is within a row, so within both inputs (trait contract).
            let xv = x.map(|x| unsafe { vld1q_s8(x.as_ptr().add(at)) });
            for (r, a) in acc.iter_mut().enumerate() {
                // SAFETY: the 16 codes at `at` lie in one chunk of the row, within the group (trait
                // contract).
                let w = unsafe { vld1q_s8(group.as_ptr().add(offset_in_group(first + r, at))) };
                for (a, &xv) in a.iter_mut().zip(&xv) {
                    *a = sdot(*a, w, xv);
                }
            }
        }
        acc.map(|a| a.map(|v| vaddvq_s32(v)))
    }

    /// NEON: widening `smull`/`smlal` into i16 pairs, `sadalp` into i32, 16 bytes per step.
    pub struct Neon;

    impl DotKernel for Neon {
        const OFFSET: i32 = 0;

        unsafe fn tile<const R: usize>(group: &[i8], first: usize, x: Inputs<'_>) -> [[i32; 2]; R] {
            // SAFETY: forwarded from the trait's contract.
            unsafe { tile_neon(group, first, x) }
        }
    }

    #[target_feature(enable = "neon")]
    unsafe fn tile_neon<const R: usize>(
        group: &[i8],
        first: usize,
        x: Inputs<'_>,
    ) -> [[i32; 2]; R] {
        let mut acc = [[vdupq_n_s32(0); 2]; R];
        for at in (0..group.len() / TILE).step_by(16) {
            // SAFETY: `at + 16` is within a row, so within both inputs (trait contract).
            let xv = x.map(|x| unsafe { vld1q_s8(x.as_ptr().add(at)) });
            for (r, a) in acc.iter_mut().enumerate() {
                // SAFETY: the 16 codes at `at` lie in one chunk of the row, within the group (trait
                // contract).
                let w = unsafe { vld1q_s8(group.as_ptr().add(offset_in_group(first + r, at))) };
                for (a, &xv) in a.iter_mut().zip(&xv) {
                    let p = vmull_s8(vget_low_s8(w), vget_low_s8(xv));
                    *a = vpadalq_s16(*a, vmlal_high_s8(p, w, xv));
                }
            }
        }
        acc.map(|a| a.map(|v| vaddvq_s32(v)))
    }
}

/// Appends to `out` every index whose exact value could be among the `k` largest, given
/// `approx[v] ± bounds[v]`: those with `approx + bound ≥ t` and those whose bound is NaN (a NaN lower
/// bound counts as −∞), for a threshold `t` at most the `k`-th largest `approx − bound`.
///
/// `t` is the `k`-th largest of the lower bounds' maxima over groups of consecutive rows: `k` groups
/// reach it, so at least `k` rows do. With groups of at most [`MAX_GROUP`] rows and at least
/// [`GROUPS_PER_K`] · `k` of them, the `k` largest lower bounds almost always fall in distinct
/// groups, so `t` is at or just below the `k`-th largest, while the selection runs over ~1/64 of the
/// values (one pass that keeps them is the whole serial cost). `scratch` is reused between calls.
pub fn top_candidates(
    approx: &[f32],
    bounds: &[f32],
    k: usize,
    scratch: &mut Vec<f32>,
    out: &mut Vec<usize>,
) {
    out.clear();
    if approx.is_empty() || k == 0 {
        return;
    }
    let k = k.min(approx.len());
    let group = (approx.len() / (GROUPS_PER_K * k)).clamp(1, MAX_GROUP);
    scratch.clear();
    scratch.extend(
        approx
            .chunks(group)
            .zip(bounds.chunks(group))
            .map(|(a, b)| {
                a.iter().zip(b).fold(f32::NEG_INFINITY, |max, (a, b)| {
                    let low = a - b;
                    // Not `f32::max`, whose NaN handling costs a compare per value; a NaN never exceeds.
                    if low > max { low } else { max }
                })
            }),
    );
    let (_, kth, _) = scratch.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let threshold = *kth;
    out.extend(
        approx
            .iter()
            .zip(bounds)
            .enumerate()
            .filter(|(_, (a, b))| {
                let high = *a + *b;
                high >= threshold || high.is_nan()
            })
            .map(|(v, _)| v),
    );
}

/// Largest group of rows [`top_candidates`] reduces to one lower bound.
const MAX_GROUP: usize = 64;
/// Fewest groups per wanted row in [`top_candidates`].
const GROUPS_PER_K: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }

    fn levels() -> impl Iterator<Item = Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported())
    }

    /// Row-major codes in the interleaved layout, with zero rows up to whole groups.
    fn interleave(codes: &[i8], stride: usize) -> Vec<i8> {
        let rows = codes.len() / stride;
        let mut out = vec![0i8; rows.div_ceil(TILE) * TILE * stride];
        for (v, row) in codes.chunks_exact(stride).enumerate() {
            store_row(&mut out, stride, v, row);
        }
        out
    }

    #[test]
    fn every_isa_is_integer_exact() {
        let mut seed = 3u64;
        for (rows, stride) in [
            (1, 64),
            (3, 64),
            (4, 128),
            (9, 2560),
            (13, 6912),
            (2, 65536),
        ] {
            let mut code = |extreme: i8| match (lcg(&mut seed) * 16.0) as i32 {
                0 => extreme,
                1 => -127,
                _ => (lcg(&mut seed) * 254.0) as i8,
            };
            let codes: Vec<i8> = (0..rows * stride).map(|_| code(127)).collect();
            let x: [Vec<i8>; 2] =
                std::array::from_fn(|_| (0..stride).map(|_| code(-128)).collect());
            let sums: Vec<i32> = codes
                .chunks_exact(stride)
                .map(|r| r.iter().map(|&c| i32::from(c)).sum())
                .collect();
            let dot = |r: &[i8], x: &[i8]| {
                let v: i64 = r
                    .iter()
                    .zip(x)
                    .map(|(&a, &b)| i64::from(a) * i64::from(b))
                    .sum();
                i32::try_from(v).unwrap()
            };
            let want: Vec<[i32; 2]> = codes
                .chunks_exact(stride)
                .map(|r| [dot(r, &x[0]), dot(r, &x[1])])
                .collect();
            let interleaved = interleave(&codes, stride);
            for isa in levels() {
                // Every start row, so that whole groups, partial groups and single rows all run.
                for first in 0..rows.min(TILE + 1) {
                    let mut got = vec![[0i32; 2]; rows - first];
                    let (x, sums) = ([&x[0][..], &x[1]], &sums[first..]);
                    int_dots(isa, &interleaved, stride, first, x, sums, &mut got).unwrap();
                    assert_eq!(
                        got,
                        want[first..],
                        "{isa}: {rows}x{stride} from row {first}"
                    );
                }
            }
        }
        // The largest magnitudes: -127 against -128 (and 127) over the most columns.
        let codes = vec![-127i8; 4 * MAX_COLS];
        let x = [vec![-128i8; MAX_COLS], vec![127i8; MAX_COLS]];
        for isa in levels() {
            let mut got = [[0i32; 2]; 4];
            int_dots(
                isa,
                &codes,
                MAX_COLS,
                0,
                [&x[0], &x[1]],
                &[-127 * MAX_COLS as i32; 4],
                &mut got,
            )
            .unwrap();
            let extremes = [127 * 128 * MAX_COLS as i32, -127 * 127 * MAX_COLS as i32];
            assert_eq!(got, [extremes; 4], "{isa}");
        }
    }

    #[test]
    fn amx_batches_give_each_inputs_logits_bit_for_bit() {
        // Where the ternary AMX kernels run, the head's must too: a failed known-answer check
        // here is a failure, not a skip.
        if let Err(why) = crate::bitlinear::amx::status() {
            println!("skipped: AMX-INT8 kernels unavailable here: {why}");
            return;
        }
        if let Err(why) = amx_status() {
            panic!("AMX is usable here but the 8-bit head's check failed: {why}");
        }
        let mut seed = 21u64;
        // (rows, cols, inputs, range): unaligned starts and ends, partial input tiles, one input.
        for (rows, cols, tokens, range) in [
            (75, 300, 19, 3..75),
            (200, 2560, 16, 0..200),
            (96, 64, 1, 5..96),
            (130, 6912, 33, 1..129),
            (64, 128, 2, 0..64),
        ] {
            let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
            let head = Q8Head::quantize(Isa::Scalar, DenseView::F32(&w), rows, cols).unwrap();
            let mut inputs = vec![Q8Input::default(); tokens];
            for (t, input) in inputs.iter_mut().enumerate() {
                // One large channel per input sets its scale; the rest use both levels.
                let x: Vec<f32> = (0..cols)
                    .map(|k| lcg(&mut seed) * if k == t % cols { 300.0 } else { 3.0 })
                    .collect();
                input.prepare(Isa::best(), &x).unwrap();
            }
            let n = range.len();
            let (mut approx, mut bounds) = (vec![0f32; tokens * n], vec![0f32; tokens * n]);
            let mut parts: Vec<_> = approx
                .chunks_exact_mut(n)
                .zip(bounds.chunks_exact_mut(n))
                .collect();
            head.logits_tokens(Isa::best(), true, range.clone(), &inputs, &mut parts)
                .unwrap();
            for (t, input) in inputs.iter().enumerate() {
                let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
                head.logits(Isa::Scalar, range.clone(), input, &mut a, &mut b)
                    .unwrap();
                let at = t * n..(t + 1) * n;
                assert!(
                    approx[at.clone()] == a[..] && bounds[at] == b[..],
                    "{rows}x{cols}, {tokens} inputs, rows {range:?}: input {t}"
                );
            }
        }
    }

    #[test]
    fn bounds_hold_candidates_contain_the_exact_top_k_and_stay_few() {
        let (rows, cols) = (3000, 2560);
        let mut seed = 9u64;
        let table: Vec<bf16> = (0..rows * cols)
            .map(|_| bf16::from_f32(lcg(&mut seed) * 0.1))
            .collect();
        let x: Vec<f32> = (0..cols).map(|_| lcg(&mut seed) * 4.0).collect();
        let view = DenseView::Bf16(&table);
        let head = Q8Head::quantize(Isa::Scalar, view, rows, cols).unwrap();
        assert_eq!(head.bytes(), rows * cols + 24 * rows);
        let mut input = Q8Input::default();
        input.prepare(Isa::Scalar, &x).unwrap();
        let (mut want_approx, mut want_bounds) = (vec![0f32; rows], vec![0f32; rows]);
        head.logits(
            Isa::Scalar,
            0..rows,
            &input,
            &mut want_approx,
            &mut want_bounds,
        )
        .unwrap();
        for isa in levels() {
            let again = Q8Head::quantize(isa, view, rows, cols).unwrap();
            assert!(
                again.codes == head.codes && again.sums == head.sums,
                "{isa}"
            );
            assert!(again.stats == head.stats, "{isa}");
            input.prepare(isa, &x).unwrap();
            let (mut approx, mut bounds) = (vec![0f32; rows], vec![0f32; rows]);
            // Split as the backend splits it, at an offset that is no multiple of the tile.
            let (a_lo, a_hi) = approx.split_at_mut(1001);
            let (b_lo, b_hi) = bounds.split_at_mut(1001);
            head.logits(isa, 0..1001, &input, a_lo, b_lo).unwrap();
            head.logits(isa, 1001..rows, &input, a_hi, b_hi).unwrap();
            // Integer-exact products make every level's logits and bounds bit-identical.
            assert!(approx == want_approx && bounds == want_bounds, "{isa}");
            let mut exact = vec![0f32; rows];
            view.dot_rows(isa, 0..rows, &x, cols, &mut exact).unwrap();
            for v in 0..rows {
                assert!(
                    (exact[v] - approx[v]).abs() <= bounds[v],
                    "{isa} row {v}: exact {} approx {} bound {}",
                    exact[v],
                    approx[v],
                    bounds[v]
                );
            }
            let mut sorted: Vec<usize> = (0..rows).collect();
            sorted.sort_by(|&a, &b| exact[b].total_cmp(&exact[a]));
            let (mut scratch, mut cand) = (Vec::new(), Vec::new());
            // Measured: 12 and 126 of 3000 (random logits lie close together; 49 and 273 with one
            // input level); the limits are twice that, so much looser bounds fail.
            for (k, most) in [(1, 24), (40, 250)] {
                top_candidates(&approx, &bounds, k, &mut scratch, &mut cand);
                assert!(
                    cand.len() >= k && cand.len() <= most,
                    "{isa} top-{k}: {} candidates",
                    cand.len()
                );
                for v in &sorted[..k] {
                    assert!(cand.contains(v), "{isa}: top-{k} row {v} was dropped");
                }
            }
        }
    }

    /// `quantize_with` reports every row once, in order, a block at a time, and builds the same
    /// head as `quantize`.
    #[test]
    fn quantize_with_reports_every_row_in_order() {
        let (rows, cols) = (2 * ROWS_PER_REPORT + 5, 3);
        let w: Vec<f32> = (0..rows * cols).map(|i| (i % 7) as f32 - 3.0).collect();
        let view = DenseView::F32(&w);
        let mut reported = Vec::new();
        let head = Q8Head::quantize_with(Isa::Scalar, view, rows, cols, |r| reported.push(r));
        let want = [0..1024, 1024..2048, 2048..rows];
        assert_eq!(reported, want);
        let plain = Q8Head::quantize(Isa::Scalar, view, rows, cols).unwrap();
        assert_eq!(head.unwrap().codes, plain.codes);
    }

    #[test]
    fn degenerate_inputs() {
        let (mut scratch, mut cand) = (Vec::new(), Vec::new());
        top_candidates(&[], &[], 3, &mut scratch, &mut cand);
        assert!(cand.is_empty());
        top_candidates(&[1.0, 3.0, 2.0], &[0.0; 3], 5, &mut scratch, &mut cand);
        assert_eq!(cand, [0, 1, 2]);
        top_candidates(&[1.0, 3.0, 2.0], &[0.0; 3], 1, &mut scratch, &mut cand);
        assert_eq!(cand, [1]);
        top_candidates(
            &[1.0, 3.0, 2.0],
            &[0.0, 0.0, f32::NAN],
            1,
            &mut scratch,
            &mut cand,
        );
        assert_eq!(cand, [1, 2]);
        top_candidates(
            &[3.0, 1.0, 2.0],
            &[0.0, f32::NAN, 0.0],
            2,
            &mut scratch,
            &mut cand,
        );
        assert_eq!(cand, [0, 1, 2]);
        // The 4 largest in one group of 32 rows: the threshold falls to the 4th largest group
        // maximum (row 4031's), which still keeps them, and every row above it.
        let mut approx: Vec<f32> = (0..4096).map(|v| v as f32 * 1e-3).collect();
        approx[100..104].copy_from_slice(&[10.0, 9.0, 8.0, 7.0]);
        top_candidates(&approx, &[0.0; 4096], 4, &mut scratch, &mut cand);
        assert_eq!(cand, (100..104).chain(4031..4096).collect::<Vec<_>>());
        let zeros = vec![0f32; 8];
        let head = Q8Head::quantize(Isa::Scalar, DenseView::F32(&zeros), 2, 4).unwrap();
        let mut input = Q8Input::default();
        input.prepare(Isa::Scalar, &[1.0; 4]).unwrap();
        let (mut a, mut b) = ([0f32; 2], [0f32; 2]);
        head.logits(Isa::Scalar, 0..2, &input, &mut a, &mut b)
            .unwrap();
        assert_eq!(a, [0.0, 0.0]);
        // A non-finite input leaves every bound NaN, so every row is re-scored.
        let ones = vec![1f32; 8];
        let head = Q8Head::quantize(Isa::Scalar, DenseView::F32(&ones), 2, 4).unwrap();
        for bad in [f32::NAN, f32::INFINITY] {
            input.prepare(Isa::Scalar, &[1.0, bad, 0.0, 2.0]).unwrap();
            head.logits(Isa::Scalar, 0..2, &input, &mut a, &mut b)
                .unwrap();
            top_candidates(&a, &b, 1, &mut scratch, &mut cand);
            assert_eq!(cand, [0, 1], "{bad}: {a:?} ± {b:?}");
        }
        assert!(Q8Head::quantize(Isa::Scalar, DenseView::F32(&[f32::NAN; 4]), 1, 4).is_err());
        input.prepare(Isa::Scalar, &[1.0; 3]).unwrap();
        assert!(
            head.logits(Isa::Scalar, 0..2, &input, &mut a, &mut b)
                .is_err()
        );
        input.prepare(Isa::Scalar, &[1.0; 4]).unwrap();
        assert!(
            head.logits(Isa::Scalar, 1..3, &input, &mut a, &mut b)
                .is_err()
        );
        // A stride that is no multiple of the vector, each input shorter than the stride, codes that
        // are no whole groups, and rows past the codes.
        let (zeros, short) = ([0i8; 64], [0i8; 32]);
        for (codes, stride, first, x) in [
            (&[0i8; 192][..], 48, 0, [&zeros[..], &zeros]),
            (&[0; 256], 64, 0, [&short, &zeros]),
            (&[0; 256], 64, 0, [&zeros, &short]),
            (&[0; 128], 64, 0, [&zeros, &zeros]),
            (&[0; 256], 64, 3, [&zeros, &zeros]),
        ] {
            let out = &mut [[0; 2]; 2];
            assert!(int_dots(Isa::Scalar, codes, stride, first, x, &[0; 2], out).is_err());
        }
    }
}
