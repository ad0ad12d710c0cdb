//! The weight storage the multiply-add families share ([`crate::bitlinear::mad`], [`crate::bitlinear::base3`]).
//!
//! # Layout
//! Rows are padded to a multiple of [`ROW_GROUP`] = 4 and columns to whole blocks of
//! [`Coding::BLOCK_COLS`]. Groups of 4 rows follow each other; inside a group, for each block, the 4
//! rows' 64-byte chunks: `offset(group, block, r) = ((group · blocks + block) · 4 + r) · 64`. So a
//! product streams one contiguous buffer, and a micro-kernel finds a group's 4 rows side by side.
//! What the bytes of a chunk hold is the family's [`Coding`].
//!
//! # Token chunks
//! A product over many tokens ([`Grouped::for_each_group`]) takes them in chunks of at most
//! [`L2_ACTIVATION_BYTES`] of activation rows, and each chunk runs over every group of the row
//! range: a group's unpacked weights (a few KiB, in L1) serve every token of the chunk, the chunk's
//! activations stay in L2 while all the groups pass over them, and the weights stream from memory
//! once per chunk. Without chunks a 512-token prompt's activations (3.9 MB for the 6912 columns of
//! `down`) left L2 and were read from L3 again for every group.

use crate::bitlinear::quant::QuantizedRows;
use crate::isa::Isa;
use crate::{Error, check_len};
use std::marker::PhantomData;
use std::ops::Range;

/// Rows stored together (the micro-kernels' row tile).
pub const ROW_GROUP: usize = 4;
/// Bytes of one row's block (the widest vector).
pub(crate) const CHUNK: usize = 64;

/// Activation bytes a chunk of tokens may take (see the module documentation). Half of the
/// smallest per-core L2 of the CPUs with AVX-512 or AVX-VNNI (1 MiB on Zen 4/5, 1.25 MiB on Alder
/// Lake, 2 MiB on Sapphire Rapids), leaving the other half to the weights and outputs; the
/// measurements are in `scripts/benchmark-log.md`.
pub(crate) const L2_ACTIVATION_BYTES: usize = 512 << 10;

/// Tokens per chunk for activation rows of `padded_cols` bytes: as many as fit
/// [`L2_ACTIVATION_BYTES`], a multiple of `multiple` (the micro-kernels' token tile), at least one
/// tile.
pub(crate) fn chunk_tokens(padded_cols: usize, multiple: usize) -> usize {
    let fit = L2_ACTIVATION_BYTES / padded_cols.max(1);
    (fit / multiple).max(1) * multiple
}

/// How a family codes one row's block of columns into a chunk.
pub trait Coding {
    /// Columns per block.
    const BLOCK_COLS: usize;
    /// The family's name, for errors.
    const NAME: &'static str;
}

/// A ternary matrix in the grouped layout of one [`Coding`].
#[derive(Clone, Debug)]
pub struct Grouped<C> {
    data: Vec<u8>,
    rows: usize,
    cols: usize,
    blocks: usize,
    coding: PhantomData<C>,
}

impl<C: Coding> Grouped<C> {
    /// A `rows × cols` matrix of zero bytes, for a family's repacking to fill.
    pub(crate) fn zeroed(rows: usize, cols: usize) -> Self {
        let blocks = cols.div_ceil(C::BLOCK_COLS);
        Self {
            data: vec![0; rows.div_ceil(ROW_GROUP) * ROW_GROUP * blocks * CHUNK],
            rows,
            cols,
            blocks,
            coding: PhantomData,
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
        self.data.len()
    }

    /// Blocks per row.
    pub(crate) fn blocks(&self) -> usize {
        self.blocks
    }

    /// Group `g`'s bytes.
    pub(crate) fn group(&self, g: usize) -> &[u8] {
        let len = self.blocks * ROW_GROUP * CHUNK;
        &self.data[g * len..(g + 1) * len]
    }

    /// Row `n`'s chunk of block `b` (`n` may be a padding row).
    pub(crate) fn chunk_mut(&mut self, n: usize, b: usize) -> &mut [u8] {
        let at = (((n / ROW_GROUP) * self.blocks + b) * ROW_GROUP + n % ROW_GROUP) * CHUNK;
        &mut self.data[at..at + CHUNK]
    }

    /// Checks the arguments of a product of `rows` of this matrix with `x` into `acc` (laid out
    /// `acc[(n − rows.start) · tokens + t]`), then, for each chunk of [`chunk_tokens`] tokens (a
    /// multiple of `tile`) in order, calls `product(g, chunk, out)` for each group `g` the range
    /// covers, `out` being its rows' part of `acc` (all tokens: the product writes the chunk's).
    ///
    /// `rows.start` must be a multiple of [`ROW_GROUP`], so that threads split on group boundaries.
    pub(crate) fn for_each_group(
        &self,
        isa: Isa,
        rows: Range<usize>,
        x: &QuantizedRows,
        acc: &mut [i32],
        tile: usize,
        mut product: impl FnMut(usize, Range<usize>, &mut [i32]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.check_product(isa, rows.clone(), x, acc)?;
        let tokens = x.rows();
        let per_chunk = chunk_tokens(x.padded_cols(), tile);
        for t0 in (0..tokens).step_by(per_chunk) {
            for g in rows.start / ROW_GROUP..rows.end.div_ceil(ROW_GROUP) {
                let first = g * ROW_GROUP - rows.start;
                let n = (rows.len() - first).min(ROW_GROUP);
                let chunk = t0..tokens.min(t0 + per_chunk);
                product(g, chunk, &mut acc[first * tokens..][..n * tokens])?;
            }
        }
        Ok(())
    }

    /// The checks of [`Self::for_each_group`]: the level, the activations' width, the row range
    /// and the accumulators' length.
    pub(crate) fn check_product(
        &self,
        isa: Isa,
        rows: Range<usize>,
        x: &QuantizedRows,
        acc: &[i32],
    ) -> Result<(), Error> {
        self.check_operands(isa, rows.clone(), x)?;
        check_len(
            "ternary gemm accumulators",
            acc.len(),
            rows.len() * x.rows(),
        )
    }

    /// [`Self::check_product`] without the accumulators: the level, the activations' width and
    /// the row range.
    pub(crate) fn check_operands(
        &self,
        isa: Isa,
        rows: Range<usize>,
        x: &QuantizedRows,
    ) -> Result<(), Error> {
        isa.check()?;
        if x.cols() != self.cols {
            return Err(Error::Shape(format!(
                "{} gemm: activations have {} columns, the weights {}",
                C::NAME,
                x.cols(),
                self.cols
            )));
        }
        if rows.start > rows.end || rows.end > self.rows || !rows.start.is_multiple_of(ROW_GROUP) {
            return Err(Error::Shape(format!(
                "{} gemm: row range {rows:?} must lie in 0..{} and start at a multiple of \
                 {ROW_GROUP}",
                C::NAME,
                self.rows
            )));
        }
        Ok(())
    }
}
