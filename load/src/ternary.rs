//! The canonical host-side weight types: ternary matrices and dense (full-precision) matrices.
//!
//! Every loader produces these; every backend repacks them into its own layout at upload.
//! A [`TernaryMatrix`] uses the packed 2-bit layout of [`tern_cpu::bitlinear::reference`] (row-major by output,
//! `code = value + 1`, four codes per byte, least significant pair first) with one per-tensor scale
//! that **multiplies**: `W_eff = W_ternary * scale`.
//!
//! A [`DenseMatrix`] either owns its values or, when a loader finds them in a memory-mapped file in
//! a dtype a backend reads as is (f32, f16, bf16, little endian, aligned to the element), serves
//! them from the map ([`DenseData::Mapped`]): the pages are read on demand and belong to the page
//! cache, not to the process's heap, and cloning the matrix copies no values. A backend that reads
//! a few scattered rows (an embedding gather, a head's re-scored candidates) reads them with
//! positioned reads instead ([`MappedValues::read_rows`]): a fault on a mapped page maps the whole
//! page-cache folio around it (up to 2 MiB on kernels with large folios), so a few hundred rows
//! read through the map made most of a table resident.

use anyhow::{Context, Result, bail};
use half::{bf16, f16};
use memmap2::Mmap;
use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
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
    /// Values read in place from a memory-mapped file.
    Mapped(MappedValues),
}

/// The element types a table can be served in from a file as is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableDtype {
    F32,
    F16,
    Bf16,
}

impl TableDtype {
    pub fn bytes(self) -> usize {
        match self {
            TableDtype::F32 => 4,
            TableDtype::F16 | TableDtype::Bf16 => 2,
        }
    }
}

/// A file opened read-only with its memory map; dereferences to the mapped bytes.
pub struct MappedFile {
    file: File,
    map: Mmap,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only and private to this process; a file truncated underneath a
        // running load is the one case it cannot defend against, as for any mmap reader.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        Ok(Self { file, map })
    }

    /// Fills `buf` with the file's bytes from `offset` without touching the map.
    fn read_at(&self, offset: usize, buf: &mut [u8]) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            self.file.read_exact_at(buf, offset as u64)
        }
        #[cfg(not(unix))]
        {
            let _ = &self.file;
            buf.copy_from_slice(&self.map[offset..offset + buf.len()]);
            Ok(())
        }
    }
}

impl std::ops::Deref for MappedFile {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map
    }
}

/// Drops the pages holding `map[range]` from this process's resident memory, best effort: they
/// stay in the page cache (a later load of the file is still warm), and reading them again faults
/// the same bytes back in. Pages the range shares with its neighbours are dropped too and come back
/// the same way. A streaming load calls it on a tensor once the backend holds its own copy, so the
/// file's copy and the backend's are not resident together.
pub fn release_pages(map: &MappedFile, range: Range<usize>) {
    if range.end > map.len() || range.is_empty() {
        return;
    }
    // SAFETY: `map` is a read-only mapping of a file; after MADV_DONTNEED a read of any of its
    // pages faults the file's unchanged bytes back in, so every borrowed slice keeps reading the
    // same values. The range lies inside the map (checked above).
    let dropped = unsafe {
        map.map
            .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len())
    };
    if let Err(e) = dropped {
        tracing::debug!("cannot release mapped pages: {e}");
    }
}

/// A range of a memory-mapped file holding little-endian values of one [`TableDtype`], aligned to
/// the element size (checked in [`MappedValues::new`], so [`MappedValues::view`] cannot fail).
#[derive(Clone)]
pub struct MappedValues {
    map: Arc<MappedFile>,
    range: Range<usize>,
    dtype: TableDtype,
}

impl MappedValues {
    /// The values in `bytes`, which must lie inside `map`; `None` where they cannot be read in
    /// place (misaligned for the dtype, a length that is not a whole number of elements, or a
    /// big-endian machine), so the caller copies them instead.
    pub fn new(map: &Arc<MappedFile>, bytes: &[u8], dtype: TableDtype) -> Option<Self> {
        let start = (bytes.as_ptr() as usize).checked_sub(map.as_ptr() as usize)?;
        let range = start..start + bytes.len();
        let inside = range.end <= map.len();
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(dtype.bytes())
            && bytes.len().is_multiple_of(dtype.bytes());
        (inside && aligned && cfg!(target_endian = "little")).then(|| Self {
            map: Arc::clone(map),
            range,
            dtype,
        })
    }

    pub fn dtype(&self) -> TableDtype {
        self.dtype
    }

    /// Drops the pages of values `values` (element indices) from this process's resident memory
    /// ([`release_pages`]).
    pub fn release(&self, values: Range<usize>) {
        let size = self.dtype.bytes();
        let start = self.range.start + values.start * size;
        let end = (self.range.start + values.end * size).min(self.range.end);
        release_pages(&self.map, start..end);
    }

    pub fn view(&self) -> DenseView<'_> {
        let cast = "length and alignment checked in MappedValues::new";
        view_of(self.dtype, &self.map[self.range.clone()]).expect(cast)
    }

    /// Rows `rows` of `cols` values each, read from the file with positioned reads (not through
    /// the map, see the module documentation) into `buf`: a view of `rows.len()` rows in that
    /// order. A row outside the values is an error.
    pub fn read_rows<'b>(
        &self,
        rows: &[usize],
        cols: usize,
        buf: &'b mut Vec<u32>,
    ) -> Result<DenseView<'b>> {
        let row_bytes = cols * self.dtype.bytes();
        buf.resize((rows.len() * row_bytes).div_ceil(4), 0);
        let bytes = &mut bytemuck::cast_slice_mut::<u32, u8>(buf)[..rows.len() * row_bytes];
        for (&r, out) in rows.iter().zip(bytes.chunks_exact_mut(row_bytes.max(1))) {
            let start = r
                .checked_mul(row_bytes)
                .filter(|&s| {
                    s.checked_add(row_bytes)
                        .is_some_and(|e| e <= self.range.len())
                })
                .with_context(|| format!("row {r} of {cols} values is outside the table"))?;
            self.map.read_at(self.range.start + start, out)?;
        }
        Ok(view_of(self.dtype, bytes).expect("a u32 buffer is aligned for every dtype"))
    }
}

/// `bytes` as values of `dtype` (`None` if misaligned or not a whole number of values).
fn view_of(dtype: TableDtype, bytes: &[u8]) -> Option<DenseView<'_>> {
    Some(match dtype {
        TableDtype::F32 => DenseView::F32(bytemuck::try_cast_slice(bytes).ok()?),
        TableDtype::F16 => DenseView::F16(bytemuck::try_cast_slice(bytes).ok()?),
        TableDtype::Bf16 => DenseView::Bf16(bytemuck::try_cast_slice(bytes).ok()?),
    })
}

impl std::fmt::Debug for MappedValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MappedValues({:?} bytes {:?})", self.dtype, self.range)
    }
}

impl PartialEq for MappedValues {
    fn eq(&self, other: &Self) -> bool {
        self.dtype == other.dtype && self.map[self.range.clone()] == other.map[other.range.clone()]
    }
}

/// A full-precision row-major matrix (token embeddings, output heads).
#[derive(Clone, Debug, PartialEq)]
pub struct DenseMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: DenseData,
}

impl DenseMatrix {
    /// Values served in place from a file: drops the pages of rows `rows` from resident memory
    /// ([`release_pages`]); reading them again brings them back. Owned values stay as they are.
    pub fn release_mapped(&self, rows: Range<usize>) {
        if let DenseData::Mapped(m) = &self.data {
            m.release(rows.start * self.cols..rows.end * self.cols);
        }
    }

    pub fn view(&self) -> DenseView<'_> {
        match &self.data {
            DenseData::F32(v) => DenseView::F32(v),
            DenseData::F16(v) => DenseView::F16(v),
            DenseData::Bf16(v) => DenseView::Bf16(v),
            DenseData::Mapped(m) => m.view(),
        }
    }

    pub fn dtype(&self) -> TableDtype {
        match &self.data {
            DenseData::F32(_) => TableDtype::F32,
            DenseData::F16(_) => TableDtype::F16,
            DenseData::Bf16(_) => TableDtype::Bf16,
            DenseData::Mapped(m) => m.dtype(),
        }
    }

    /// Whether the values are served from a memory-mapped file rather than held in memory.
    pub fn is_mapped(&self) -> bool {
        self.mapped().is_some()
    }

    /// The values served from a file, for reading scattered rows ([`MappedValues::read_rows`]).
    pub fn mapped(&self) -> Option<&MappedValues> {
        match &self.data {
            DenseData::Mapped(m) => Some(m),
            _ => None,
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
        self.rows * self.cols * self.dtype().bytes()
    }

    pub fn dtype_name(&self) -> &'static str {
        match self.dtype() {
            TableDtype::F32 => "f32",
            TableDtype::F16 => "f16",
            TableDtype::Bf16 => "bf16",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary file holding `values`, mapped.
    fn mapped_file(values: &[f32]) -> (tempfile::NamedTempFile, Arc<MappedFile>) {
        use std::io::Write;
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(bytemuck::cast_slice(values)).unwrap();
        let map = Arc::new(MappedFile::open(file.path()).unwrap());
        (file, map)
    }

    /// Released pages come back with the file's bytes: the values read the same before and after,
    /// and a range outside the map is ignored.
    #[test]
    fn released_mapped_values_read_the_same() {
        let values: Vec<f32> = (0..5000).map(|i| i as f32 * 0.5 - 7.0).collect();
        let (_file, map) = mapped_file(&values);
        let mapped = MappedValues::new(&map, &map[4096..], TableDtype::F32).unwrap();
        let table = DenseMatrix {
            rows: 1,
            cols: values.len() - 1024,
            data: DenseData::Mapped(mapped),
        };
        let read = |t: &DenseMatrix| match t.view() {
            DenseView::F32(v) => v.to_vec(),
            _ => unreachable!(),
        };
        let before = read(&table);
        assert_eq!(before, values[1024..]);
        table.release_mapped(0..1);
        release_pages(&map, 0..map.len() + 1);
        assert_eq!(read(&table), before);
    }

    /// Rows read from the file are the mapped rows, in the order asked; a row past the table is
    /// an error.
    #[test]
    fn rows_read_from_the_file_equal_the_mapped_rows() {
        let values: Vec<f32> = (0..3000).map(|i| i as f32 - 100.0).collect();
        let (_file, map) = mapped_file(&values);
        // 7 rows of 300 values from value 512 on (an offset that is not a page boundary).
        let bytes = &map[2048..2048 + 7 * 300 * 4];
        let mapped = MappedValues::new(&map, bytes, TableDtype::F32).unwrap();
        let mut buf = Vec::new();
        let rows = [6, 0, 3, 3];
        let DenseView::F32(read) = mapped.read_rows(&rows, 300, &mut buf).unwrap() else {
            unreachable!()
        };
        let want: Vec<f32> = rows
            .iter()
            .flat_map(|&r| values[512 + 300 * r..][..300].to_vec())
            .collect();
        assert_eq!(read, want);
        assert!(mapped.read_rows(&[7], 300, &mut buf).is_err());
        assert!(mapped.read_rows(&[usize::MAX], 300, &mut buf).is_err());
    }

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
