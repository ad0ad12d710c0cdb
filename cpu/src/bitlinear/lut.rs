//! Lookup-table ternary kernels (W1.58A8): per token, a table of the 27 possible dot products of
//! three weights with three activations; per weight, a 5-bit index into it. Integer-exact.
//!
//! # The arithmetic
//! Three consecutive columns `3j, 3j+1, 3j+2` of a weight row (a *triple*) take one of 27 value
//! patterns; pattern `p = Σ_i code_i · 3^i` with `code = value + 1 ∈ {0, 1, 2}`. For each token and
//! triple, [`LutTables`] holds 32 i16 entries: `entry[p] = Σ_i (digit_i(p) − 1) · x[3j + i]` for
//! `p < 27`, zero above. A row's dot product is then the sum of one entry per triple, with no
//! correction term (the table holds values, not codes).
//!
//! On AVX-512BW `vpermw` looks up 32 i16 lanes at once in a 32-entry table held in one register,
//! using only the low 5 bits of each 16-bit index: the 27 patterns fit the 32 entries, word lookups
//! give i16 sums directly (no widening multiply), and 3 indices fit in one u16 word, so a weight
//! costs 16/9 ≈ 1.78 bits instead of the 2 of [`crate::bitlinear::mad`].
//!
//! # Why i16 accumulation is exact
//! Activation codes lie in −128..=127 (quantization gives −127..=127), so `|entry| ≤ 3 · 128 = 384`.
//! The kernels add at most 28 chunks · 3 = 84 lookups in i16 lanes before widening them to
//! i32, and every partial sum of ≤ 84 entries is within `84 · 384 = 32256 ≤ 32767`. (At 127 the
//! limit would be 86 lookups, `86 · 381 = 32766`; 87 overflow, which the extreme-value test sees.)
//! The result is exact, so it equals [`gemm_reference`](crate::bitlinear::reference::gemm_reference) bit for bit.
//!
//! # Layout ([`PackedLut`], repacked at upload from the canonical layout)
//! Columns are padded with value 0 to a multiple of [`CHUNK_COLS`] = 9 (`chunks = ⌈cols / 9⌉`),
//! rows with value 0 to a multiple of [`PANEL_TILES`] · [`TILE_ROWS`] = 128. A *line* is 64 bytes:
//! 32 u16 words, word `r` being row `r` of a 32-row *tile* over one chunk of 9 columns, the patterns
//! of its triples `3c`, `3c + 1`, `3c + 2` at bits 0..5, 5..10 and 10..15 (bit 15 zero). Panels of 4
//! tiles are stored one after another; inside a panel the tiles are interleaved by chunk:
//! `line(tile, c) = (tile / 4) · 4 · chunks + 4c + tile % 4`, so the 4 lines of one chunk are
//! adjacent and a pass over a panel streams one contiguous run (4 separate tile streams measured
//! 5-10% slower from memory). The buffer and the tables are 64-byte aligned: every load is one whole
//! cache line.
//!
//! Tables ([`LutTables`], built once per activation batch, so one build serves every matrix that
//! reads the same input): token `t`'s table for triple `j` is the 64-byte line `t · 3 · chunks + j`.
//!
//! # Blocking
//! [`gemm`] walks tiles of up to 4 tokens and, for each, passes of 4 row tiles (then single tiles
//! for the rest of the range, which may start inside a panel): each table line serves 4 tiles
//! (128 rows) and each weight line every token of the tile, with the 4 × T i16 accumulators in
//! registers. Token tiles are the outer loop so that their tables (192 bytes per 9 columns and
//! token, 220 KB for 4 tokens at 2560 columns) stay in L2 while the weights stream. Each lookup is
//! added to its accumulator at once: summing the three first let LLVM hoist all of a chunk's
//! `vpermw` results and spill them (2× slower at 4 tokens).
//!
//! # Levels
//! [`Isa::Scalar`] (plain Rust on the same layout) and [`Isa::Avx512`]. The other levels lack a
//! 32-lane word permute; [`gemm`] returns an error for them ([`supports`] says which levels work),
//! so the caller keeps the [`crate::bitlinear::mad`] kernels there. [`LutTables::build`] runs at every level.

use crate::bitlinear::quant::QuantizedRows;
use crate::bitlinear::reference::TernaryView;
use crate::isa::Isa;
use crate::{Error, check_len};
use std::ops::Range;

/// Rows per tile (the lanes of one `vpermw`).
pub const TILE_ROWS: usize = 32;
/// Columns per u16 word: three triples.
pub const CHUNK_COLS: usize = 9;
/// Chunks (3 lookups each) added in i16 before widening to i32: see the module documentation.
#[cfg(target_arch = "x86_64")]
const WIDEN_CHUNKS: usize = 28;
/// Tiles per panel: interleaved by chunk in the layout, and sharing each table load.
pub const PANEL_TILES: usize = 4;
/// Tokens sharing each weight load.
const TOKENS_PER_PASS: usize = 4;

/// One 64-byte line of weight words: one chunk of one tile.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Words([u16; TILE_ROWS]);

/// One 64-byte line of table entries: one triple of one token.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
struct Table([i16; 32]);

/// The pattern of three values (in {-1, 0, +1}).
const fn pattern(v: [i8; 3]) -> u16 {
    ((v[0] + 1) + 3 * (v[1] + 1) + 9 * (v[2] + 1)) as u16
}

/// The word of a padding row: value 0 everywhere.
const PAD_WORD: u16 = pattern([0; 3]) * (1 + (1 << 5) + (1 << 10));

/// `DIGITS[i][p]` = digit `i` of pattern `p` in base 3, minus 1 (the weight value); 0 for `p ≥ 27`.
const DIGITS: [[i16; 32]; 3] = {
    let mut d = [[0i16; 32]; 3];
    let mut p = 0;
    while p < 27 {
        d[0][p] = (p % 3) as i16 - 1;
        d[1][p] = (p / 3 % 3) as i16 - 1;
        d[2][p] = (p / 9) as i16 - 1;
        p += 1;
    }
    d
};

/// A ternary matrix in the LUT kernels' layout (see the module documentation).
#[derive(Clone, Debug)]
pub struct PackedLut {
    data: Vec<Words>,
    rows: usize,
    cols: usize,
    chunks: usize,
}

impl PackedLut {
    /// Repacks a canonical matrix (codes of 3, which validated matrices never hold, read as 0, and
    /// so do the padding columns and rows).
    pub fn from_canonical(w: TernaryView<'_>) -> Self {
        let (rows, cols) = (w.rows(), w.cols());
        let chunks = cols.div_ceil(CHUNK_COLS);
        let panels = rows.div_ceil(PANEL_TILES * TILE_ROWS);
        let mut data = vec![Words([PAD_WORD; TILE_ROWS]); panels * PANEL_TILES * chunks];
        // `unpack_row` writes the first `cols` values only: the padding columns stay 0.
        let mut values = vec![0i8; chunks * CHUNK_COLS];
        for n in 0..rows {
            w.unpack_row(n, &mut values[..cols]);
            let tile = &mut data[first_line(n / TILE_ROWS, chunks)..];
            let lines = tile.iter_mut().step_by(PANEL_TILES);
            for (line, chunk) in lines.zip(values.chunks_exact(CHUNK_COLS)) {
                line.0[n % TILE_ROWS] =
                    chunk.chunks_exact(3).enumerate().fold(0, |word, (j, v)| {
                        word | pattern([v[0], v[1], v[2]]) << (5 * j)
                    });
            }
        }
        Self {
            data,
            rows,
            cols,
            chunks,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of packed weights (with padding).
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.data.as_slice())
    }

    /// Tile `i`'s lines from its first: its chunk `c` is line `PANEL_TILES · c`.
    fn tile(&self, i: usize) -> &[Words] {
        let panel = i / PANEL_TILES;
        &self.data[first_line(i, self.chunks)..(panel + 1) * PANEL_TILES * self.chunks]
    }
}

/// The index of tile `i`'s chunk 0 in a matrix of `chunks` chunks.
fn first_line(i: usize, chunks: usize) -> usize {
    i / PANEL_TILES * PANEL_TILES * chunks + i % PANEL_TILES
}

/// The per-token lookup tables of a batch of quantized activation rows (see the module
/// documentation); reused across calls, so rebuilding allocates nothing once the buffer has grown.
#[derive(Clone, Debug, Default)]
pub struct LutTables {
    tables: Vec<Table>,
    tokens: usize,
    cols: usize,
}

impl LutTables {
    /// Builds the tables of every row of `x` with the `isa` level's vectorization.
    pub fn build(&mut self, isa: Isa, x: &QuantizedRows) -> Result<(), Error> {
        isa.check()?;
        let (tokens, cols) = (x.rows(), x.cols());
        let per_token = 3 * cols.div_ceil(CHUNK_COLS);
        self.tables.resize(tokens * per_token, Table::default());
        (self.tokens, self.cols) = (tokens, cols);
        for t in 0..tokens {
            let tables = &mut self.tables[t * per_token..(t + 1) * per_token];
            isa.vectorized(
                #[inline(always)]
                || fill_tables(&x.row(t)[..cols], tables),
            )?;
        }
        Ok(())
    }

    /// Activation rows the tables were built from.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Columns of the activation rows.
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn token(&self, t: usize) -> &[Table] {
        let per_token = 3 * self.cols.div_ceil(CHUNK_COLS);
        &self.tables[t * per_token..(t + 1) * per_token]
    }
}

/// The vectorizable body: each table is 32 independent lanes of three multiply-adds. Columns past
/// `x` (the padding of the last chunk) read as 0.
#[inline(always)]
fn fill_tables(x: &[i8], tables: &mut [Table]) {
    for (j, table) in tables.iter_mut().enumerate() {
        let v: [i16; 3] = std::array::from_fn(|i| x.get(3 * j + i).map_or(0, |&c| i16::from(c)));
        for (p, e) in table.0.iter_mut().enumerate() {
            *e = DIGITS[0][p] * v[0] + DIGITS[1][p] * v[1] + DIGITS[2][p] * v[2];
        }
    }
}

/// Whether [`gemm`] runs at `isa` on this CPU.
pub fn supports(isa: Isa) -> bool {
    matches!(isa, Isa::Scalar | Isa::Avx512) && isa.is_supported()
}

/// `acc[(n - rows.start) · tokens + t] = Σ_k W[n][k] · x[t][k]` for `n` in `rows`, exactly, with
/// the `x` of `tables` (the output contract of [`crate::bitlinear::mad::gemm`]).
///
/// `rows.start` must be a multiple of [`TILE_ROWS`] (so threads split on tile boundaries); the
/// output is row-major by weight row, so disjoint row ranges write disjoint slices. Levels other
/// than [`Isa::Scalar`] and [`Isa::Avx512`] are an error (see [`supports`]).
pub fn gemm(
    isa: Isa,
    w: &PackedLut,
    rows: Range<usize>,
    tables: &LutTables,
    acc: &mut [i32],
) -> Result<(), Error> {
    isa.check()?;
    if tables.cols != w.cols {
        return Err(Error::Shape(format!(
            "LUT gemm: the tables were built for {} columns, the weights have {}",
            tables.cols, w.cols
        )));
    }
    if rows.start > rows.end || rows.end > w.rows || !rows.start.is_multiple_of(TILE_ROWS) {
        return Err(Error::Shape(format!(
            "LUT gemm: row range {rows:?} must lie in 0..{} and start at a multiple of \
             {TILE_ROWS}",
            w.rows
        )));
    }
    check_len(
        "LUT gemm accumulators",
        acc.len(),
        rows.len() * tables.tokens,
    )?;
    match isa {
        Isa::Scalar => run::<Scalar>(w, rows, tables, acc),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => run::<x86::Avx512>(w, rows, tables, acc),
        _ => {
            return Err(Error::Shape(format!(
                "the LUT kernels need AVX-512BW or run at the scalar level, not `{isa}`"
            )));
        }
    }
    Ok(())
}

/// A micro-kernel: `R` row tiles times `T` tokens.
trait MicroKernel {
    /// Returns `Σ_k W[r][k] · x[t][k]` for the 32 rows of each tile `r` and each token `t`.
    ///
    /// # Safety
    /// The CPU supports the kernel's ISA; every token has `3 · chunks` tables and every tile
    /// `chunks` lines, its line `c` at index `PANEL_TILES · c`.
    unsafe fn tiles<const R: usize, const T: usize>(
        tiles: [&[Words]; R],
        tables: [&[Table]; T],
    ) -> [[[i32; TILE_ROWS]; T]; R];
}

/// The blocking loop shared by the levels (see the module documentation).
fn run<K: MicroKernel>(w: &PackedLut, rows: Range<usize>, x: &LutTables, acc: &mut [i32]) {
    let tiles = rows.start / TILE_ROWS..rows.end.div_ceil(TILE_ROWS);
    for t0 in (0..x.tokens).step_by(TOKENS_PER_PASS) {
        let tokens = (x.tokens - t0).min(TOKENS_PER_PASS);
        let mut tile = tiles.start;
        while tile < tiles.end {
            // Passes of 4 tiles, then single tiles for what remains of the range.
            let pass = if tiles.end - tile >= PANEL_TILES {
                PANEL_TILES
            } else {
                1
            };
            macro_rules! pass {
                ($r:literal, $t:literal) => {{
                    let ws: [&[Words]; $r] = std::array::from_fn(|i| w.tile(tile + i));
                    let ts: [&[Table]; $t] = std::array::from_fn(|i| x.token(t0 + i));
                    // SAFETY: `gemm` checked the ISA and that the tables were built for the
                    // weights' columns, so every token has `3 · chunks` tables, and `tile` spans
                    // a tile's chunks.
                    let out = unsafe { K::tiles::<$r, $t>(ws, ts) };
                    for (i, tile_out) in out.iter().enumerate() {
                        for (t, token_out) in tile_out.iter().enumerate() {
                            let first = (tile + i) * TILE_ROWS;
                            for (n, &v) in (first..rows.end).zip(token_out) {
                                acc[(n - rows.start) * x.tokens + t0 + t] = v;
                            }
                        }
                    }
                }};
            }
            match (pass, tokens) {
                (1, 1) => pass!(1, 1),
                (1, 2) => pass!(1, 2),
                (1, 3) => pass!(1, 3),
                (1, _) => pass!(1, 4),
                (_, 1) => pass!(4, 1),
                (_, 2) => pass!(4, 2),
                (_, 3) => pass!(4, 3),
                (_, _) => pass!(4, 4),
            }
            tile += pass;
        }
    }
}

/// Portable kernel: the same lookups into plain arrays, accumulated in i32.
struct Scalar;

impl MicroKernel for Scalar {
    unsafe fn tiles<const R: usize, const T: usize>(
        tiles: [&[Words]; R],
        tables: [&[Table]; T],
    ) -> [[[i32; TILE_ROWS]; T]; R] {
        let mut out = [[[0i32; TILE_ROWS]; T]; R];
        for (out_r, tile) in out.iter_mut().zip(tiles) {
            for (out_t, token) in out_r.iter_mut().zip(tables) {
                let lines = tile.iter().step_by(PANEL_TILES);
                for (line, triples) in lines.zip(token.chunks_exact(3)) {
                    for (o, &word) in out_t.iter_mut().zip(&line.0) {
                        for (j, table) in triples.iter().enumerate() {
                            // The low 5 bits, as `vpermw` reads them.
                            *o += i32::from(table.0[usize::from(word >> (5 * j)) & 31]);
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MicroKernel, PANEL_TILES, TILE_ROWS, Table, WIDEN_CHUNKS, Words};
    use crate::isa::{PREFETCH_AHEAD, prefetch};
    use std::arch::x86_64::*;

    /// AVX-512BW: three `vpermw` per weight line and token (the tables as memory operands), summed
    /// in i16 for up to 28 chunks, then widened into two i32 vectors per tile and token.
    pub struct Avx512;

    impl MicroKernel for Avx512 {
        unsafe fn tiles<const R: usize, const T: usize>(
            tiles: [&[Words]; R],
            tables: [&[Table]; T],
        ) -> [[[i32; TILE_ROWS]; T]; R] {
            // SAFETY: forwarded from the trait's contract.
            unsafe { tiles_avx512::<R, T>(tiles, tables) }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn tiles_avx512<const R: usize, const T: usize>(
        tiles: [&[Words]; R],
        tables: [&[Table]; T],
    ) -> [[[i32; TILE_ROWS]; T]; R] {
        let chunks = tables[0].len() / 3;
        let mut wide = [[[_mm512_setzero_si512(); 2]; T]; R];
        let mut start = 0;
        while start < chunks {
            let end = (start + WIDEN_CHUNKS).min(chunks);
            let mut narrow = [[_mm512_setzero_si512(); T]; R];
            for c in start..end {
                for r in 0..R {
                    let line = tiles[r].as_ptr().wrapping_add(PANEL_TILES * c);
                    prefetch(line.cast::<u8>().wrapping_add(PREFETCH_AHEAD));
                    // SAFETY: `c < chunks`, so inside the tile (trait contract); lines are
                    // 64-byte aligned.
                    let w0 = unsafe { _mm512_load_si512(line.cast()) };
                    let w1 = _mm512_srli_epi16::<5>(w0);
                    let w2 = _mm512_srli_epi16::<10>(w0);
                    for t in 0..T {
                        // SAFETY: every token has `3 · chunks` aligned tables (trait contract).
                        let [t0, t1, t2] = std::array::from_fn(|j| unsafe {
                            _mm512_load_si512(tables[t].as_ptr().add(3 * c + j).cast())
                        });
                        let mut a = narrow[r][t];
                        a = _mm512_add_epi16(a, _mm512_permutexvar_epi16(w0, t0));
                        a = _mm512_add_epi16(a, _mm512_permutexvar_epi16(w1, t1));
                        narrow[r][t] = _mm512_add_epi16(a, _mm512_permutexvar_epi16(w2, t2));
                    }
                }
            }
            for r in 0..R {
                for t in 0..T {
                    let lo = _mm512_castsi512_si256(narrow[r][t]);
                    let hi = _mm512_extracti64x4_epi64::<1>(narrow[r][t]);
                    wide[r][t][0] = _mm512_add_epi32(wide[r][t][0], _mm512_cvtepi16_epi32(lo));
                    wide[r][t][1] = _mm512_add_epi32(wide[r][t][1], _mm512_cvtepi16_epi32(hi));
                }
            }
            start = end;
        }
        let mut out = [[[0i32; TILE_ROWS]; T]; R];
        for r in 0..R {
            for t in 0..T {
                for (half, v) in wide[r][t].iter().enumerate() {
                    // SAFETY: 16 i32 lanes into rows 16·half .. 16·half + 16 of a 32-row array.
                    unsafe { _mm512_storeu_si512(out[r][t][16 * half..].as_mut_ptr().cast(), *v) };
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitlinear::reference::pack;
    use crate::bitlinear::testing::{case, raw_codes, real_shape_cases, reference};

    /// Every level's product over `0..rows` and over `rows` split at tile boundaries as threads
    /// split it, against `want`; the levels without LUT kernels must refuse.
    fn check_against(packed: &PackedLut, q: &QuantizedRows, want: &[i32], what: &str) {
        let (rows, tokens) = (packed.rows(), q.rows());
        for isa in Isa::ALL.into_iter().filter(|i| i.is_supported()) {
            let mut tables = LutTables::default();
            tables.build(isa, q).unwrap();
            let mut got = vec![0i32; rows * tokens];
            if !supports(isa) {
                assert!(gemm(isa, packed, 0..rows, &tables, &mut got).is_err());
                continue;
            }
            gemm(isa, packed, 0..rows, &tables, &mut got).unwrap();
            assert!(got == want, "{isa}: {what}");
            let tiles = rows.div_ceil(TILE_ROWS);
            let cuts: Vec<usize> = [0, tiles / 3, tiles / 3 + 1, tiles - tiles / 4]
                .map(|t| t * TILE_ROWS)
                .into_iter()
                .filter(|&n| n == 0 || n < rows)
                .chain([rows])
                .collect();
            let mut split = vec![0i32; rows * tokens];
            for pair in cuts.windows(2) {
                let part = &mut split[pair[0] * tokens..pair[1] * tokens];
                gemm(isa, packed, pair[0]..pair[1], &tables, part).unwrap();
            }
            assert!(split == want, "{isa}: {what}, split");
        }
    }

    fn check(rows: usize, cols: usize, tokens: usize, seed: u64) {
        let (codes, q) = case(rows, cols, tokens, seed);
        let view = TernaryView::new(&codes, rows, cols).unwrap();
        let what = format!("{rows}x{cols}, {tokens} tokens");
        check_against(
            &PackedLut::from_canonical(view),
            &q,
            &reference(view, &q),
            &what,
        );
    }

    #[test]
    fn every_level_is_integer_exact_on_the_real_shapes() {
        for (rows, cols, tokens, seed) in real_shape_cases() {
            check(rows, cols, tokens, seed);
        }
    }

    #[test]
    fn every_level_is_integer_exact_on_awkward_shapes() {
        for (rows, cols, tokens) in [
            (1, 1, 1),
            (3, 5, 2),
            (7, 300, 3),
            (13, 1000, 5),
            (33, 300, 4),
            (33, 5, 9),
            (160, 1000, 2),
            // Multiples of 9 columns (no padding column), around the widening interval of 28
            // chunks: 27, 28, 29 and 56 chunks.
            (64, 243, 1),
            (7, 252, 3),
            (13, 261, 2),
            (200, 504, 6),
            (1, 2304, 1),
        ] {
            check(rows, cols, tokens, (rows * cols + tokens) as u64);
        }
    }

    #[test]
    fn invalid_codes_and_padding_read_as_zero_like_the_reference() {
        // Raw random bytes: codes of 3 everywhere and garbage in the padding pairs of 301 columns.
        let (rows, cols, tokens) = (37, 301, 2);
        let codes = raw_codes(rows, cols, 3);
        let view = TernaryView::new(&codes, rows, cols).unwrap();
        assert!(view.has_invalid_code());
        let (_, q) = case(0, cols, tokens, 4);
        let packed = PackedLut::from_canonical(view);
        check_against(&packed, &q, &reference(view, &q), "invalid codes");
    }

    #[test]
    fn extreme_values_stay_exact_in_i16() {
        // All weights -1 or all +1 against -127 everywhere: every lookup is ±381, the largest
        // magnitude, so an i16 partial sum of more than 86 lookups would wrap. 160 rows and 5
        // tokens run passes of 4 and 1 tiles and of 4 and 1 tokens.
        let (rows, cols, tokens) = (160, 6912, 5);
        let mut q = QuantizedRows::default();
        // absmax 128 → scale 127/128: every code is round(-127) = -127.
        q.quantize(Isa::Scalar, &vec![-128.0; tokens * cols], tokens, cols)
            .unwrap();
        for value in [-1i8, 1] {
            let codes = pack(&vec![value; rows * cols], rows, cols).unwrap();
            let packed = PackedLut::from_canonical(TernaryView::new(&codes, rows, cols).unwrap());
            let want = vec![-127 * cols as i32 * i32::from(value); rows * tokens];
            check_against(&packed, &q, &want, &format!("all {value}"));
        }
    }

    #[test]
    fn layout_is_the_documented_one() {
        // Row 1 of 2, 10 columns: chunk 0 = [+1, -1, 0 | 0, 0, 0 | -1, -1, -1], chunk 1 = [+1]
        // then 8 padding zeros.
        let mut values = vec![0i8; 20];
        values[10..].copy_from_slice(&[1, -1, 0, 0, 0, 0, -1, -1, -1, 1]);
        let codes = pack(&values, 2, 10).unwrap();
        let packed = PackedLut::from_canonical(TernaryView::new(&codes, 2, 10).unwrap());
        // One panel of 4 tiles (3 all padding) × 2 chunks, interleaved by chunk.
        assert_eq!(packed.bytes(), 4 * 2 * 64);
        // Patterns: [+1, -1, 0] = 2 + 3·0 + 9·1 = 11, zeros 13, -1s 0, [+1, 0, 0] 14.
        assert_eq!(packed.data[0].0[1], 11 | (13 << 5));
        assert_eq!(packed.data[PANEL_TILES].0[1], 14 | (13 << 5) | (13 << 10));
        assert_eq!(packed.data[0].0[2], PAD_WORD);
        assert!(
            packed.data[1..PANEL_TILES]
                .iter()
                .all(|l| l.0 == [PAD_WORD; 32])
        );
        // The table of triple 0 for x = [5, -7, 11]: entry p = Σ_i (digit_i(p) - 1) · x_i.
        let mut q = QuantizedRows::default();
        q.quantize(Isa::Scalar, &[5.0, -7.0, 11.0], 1, 3).unwrap();
        let x = &q.row(0)[..3];
        let mut tables = LutTables::default();
        tables.build(Isa::Scalar, &q).unwrap();
        for p in 0..32 {
            let want: i16 = if p < 27 {
                (0..3)
                    .map(|i| (p / 3i16.pow(i as u32) % 3 - 1) * i16::from(x[i]))
                    .sum()
            } else {
                0
            };
            assert_eq!(tables.token(0)[0].0[p as usize], want, "entry {p}");
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let (codes, q) = case(64, 100, 1, 9);
        let packed = PackedLut::from_canonical(TernaryView::new(&codes, 64, 100).unwrap());
        let mut tables = LutTables::default();
        tables.build(Isa::Scalar, &q).unwrap();
        let mut acc = [0i32; 64];
        assert!(gemm(Isa::Scalar, &packed, 0..64, &tables, &mut acc).is_ok());
        assert!(gemm(Isa::Scalar, &packed, 16..64, &tables, &mut acc[..48]).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 32..0;
        assert!(gemm(Isa::Scalar, &packed, backwards, &tables, &mut acc[..0]).is_err());
        assert!(gemm(Isa::Scalar, &packed, 0..65, &tables, &mut [0; 65]).is_err());
        assert!(gemm(Isa::Scalar, &packed, 0..64, &tables, &mut acc[..63]).is_err());
        let (_, other) = case(0, 99, 1, 9);
        tables.build(Isa::Scalar, &other).unwrap();
        let e = gemm(Isa::Scalar, &packed, 0..64, &tables, &mut acc).unwrap_err();
        assert!(e.to_string().contains("99"), "{e}");
        tables.build(Isa::Scalar, &q).unwrap();
        for isa in Isa::ALL.into_iter().filter(|&i| !supports(i)) {
            let e = gemm(isa, &packed, 0..64, &tables, &mut acc).unwrap_err();
            assert!(e.to_string().contains(isa.name()), "{e}");
        }
    }
}
