//! The weight storage the multiply-add families share ([`crate::bitlinear::mad`], [`crate::bitlinear::base3`]).
//!
//! # Layout
//! Rows are padded to a multiple of [`ROW_GROUP`] = 4 and columns to whole blocks of
//! [`Coding::BLOCK_COLS`]. Groups of 4 rows follow each other; inside a group, for each block, the 4
//! rows' 64-byte chunks: `offset(group, block, r) = ((group · blocks + block) · 4 + r) · 64`. So a
//! product streams one contiguous buffer, and a micro-kernel finds a group's 4 rows side by side.
//! What the bytes of a chunk hold is the family's [`Coding`].

use crate::bitlinear::quant::QuantizedRows;
use crate::isa::Isa;
use crate::{Error, check_len};
use std::marker::PhantomData;
use std::ops::Range;

/// Rows stored together (the micro-kernels' row tile).
pub const ROW_GROUP: usize = 4;
/// Bytes of one row's block (the widest vector).
pub(crate) const CHUNK: usize = 64;

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
    /// `acc[(n − rows.start) · tokens + t]`), then calls `product(g, out)` for each group `g` the
    /// range covers, `out` being its rows' part of `acc`.
    ///
    /// `rows.start` must be a multiple of [`ROW_GROUP`], so that threads split on group boundaries.
    pub(crate) fn for_each_group(
        &self,
        isa: Isa,
        rows: Range<usize>,
        x: &QuantizedRows,
        acc: &mut [i32],
        mut product: impl FnMut(usize, &mut [i32]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.check_product(isa, rows.clone(), x, acc)?;
        let tokens = x.rows();
        for g in rows.start / ROW_GROUP..rows.end.div_ceil(ROW_GROUP) {
            let first = g * ROW_GROUP - rows.start;
            let n = (rows.len() - first).min(ROW_GROUP);
            product(g, &mut acc[first * tokens..][..n * tokens])?;
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
        check_len(
            "ternary gemm accumulators",
            acc.len(),
            rows.len() * x.rows(),
        )
    }
}
