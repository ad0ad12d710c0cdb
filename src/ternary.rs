//! The canonical host-side weight types: ternary matrices and dense (full-precision) matrices.
//!
//! Every loader produces these; every backend repacks them into its own layout at upload.
//! A [`TernaryMatrix`] uses the packed 2-bit layout of [`tern_cpu::bitlinear::reference`] (row-major by output,
//! `code = value + 1`, four codes per byte, least significant pair first) with one per-tensor scale
//! that **multiplies**: `W_eff = W_ternary * scale`.

use anyhow::{Result, bail};
use half::{bf16, f16};
use tern_cpu::bitlinear::reference::{TernaryView, row_bytes};
use tern_cpu::table::DenseView;

/// A ternary linear layer's weights: `rows` outputs × `cols` inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct TernaryMatrix {
    pub rows: usize,
    pub cols: usize,
    /// Packed codes, `rows * ceil(cols / 4)` bytes.
    pub codes: Vec<u8>,
    /// Multiplies the integer product: `y = acc / activation_scale * scale`.
    pub scale: f32,
}

impl TernaryMatrix {
    /// Checks that the codes fit the shape and hold no invalid code; `name` appears in errors.
    pub fn new(name: &str, rows: usize, cols: usize, codes: Vec<u8>, scale: f32) -> Result<Self> {
        let m = Self {
            rows,
            cols,
            codes,
            scale,
        };
        let view = TernaryView::new(&m.codes, rows, cols)
            .map_err(|e| anyhow::anyhow!("tensor `{name}`: {e}"))?;
        if view.has_invalid_code() {
            bail!("tensor `{name}`: holds the 2-bit code 3, which is not a ternary value");
        }
        if !scale.is_finite() {
            bail!("tensor `{name}`: weight scale {scale} is not finite");
        }
        Ok(m)
    }

    pub fn view(&self) -> TernaryView<'_> {
        TernaryView::new(&self.codes, self.rows, self.cols).expect("length checked in new")
    }

    /// Unpacks to int8 values, row-major `[rows, cols]`.
    pub fn to_i8(&self) -> Vec<i8> {
        let mut out = vec![0i8; self.rows * self.cols];
        let view = self.view();
        for (n, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            view.unpack_row(n, row);
        }
        out
    }

    pub fn packed_bytes(&self) -> usize {
        self.rows * row_bytes(self.cols)
    }
}

/// Element storage of a dense matrix; kept in the checkpoint's dtype (no rounding at load).
#[derive(Clone, Debug, PartialEq)]
pub enum DenseData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

/// A full-precision row-major matrix (token embeddings, output heads).
#[derive(Clone, Debug, PartialEq)]
pub struct DenseMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: DenseData,
}

impl DenseMatrix {
    pub fn view(&self) -> DenseView<'_> {
        match &self.data {
            DenseData::F32(v) => DenseView::F32(v),
            DenseData::F16(v) => DenseView::F16(v),
            DenseData::Bf16(v) => DenseView::Bf16(v),
        }
    }

    /// An error unless the data holds exactly `rows × cols` values (what a backend checks before
    /// uploading a table).
    pub fn check_shape(&self) -> Result<()> {
        let len = self.view().len();
        if len != self.rows * self.cols {
            bail!("table of {}x{} holds {len} values", self.rows, self.cols);
        }
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        let per = match self.data {
            DenseData::F32(_) => 4,
            DenseData::F16(_) | DenseData::Bf16(_) => 2,
        };
        self.rows * self.cols * per
    }

    pub fn dtype_name(&self) -> &'static str {
        match self.data {
            DenseData::F32(_) => "f32",
            DenseData::F16(_) => "f16",
            DenseData::Bf16(_) => "bf16",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_must_hold_rows_times_cols_values() {
        let table = |n| DenseMatrix {
            rows: 2,
            cols: 3,
            data: DenseData::F32(vec![0.0; n]),
        };
        assert!(table(6).check_shape().is_ok());
        for n in [0, 5, 7] {
            let err = table(n).check_shape().unwrap_err().to_string();
            assert!(err.contains("2x3") && err.contains(&n.to_string()), "{err}");
        }
    }
}
