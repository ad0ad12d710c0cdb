//! GGUF files: a bounds-checked reader over a memory map, the tensor types ternary models use, the
//! mapping to [`crate::loader::HostModel`] ([`model`]) and a writer ([`write`]).
//!
//! Layout (GGUF v2/v3, little endian), every field checked against the file's length before use:
//! ```text
//! u32 magic "GGUF" | u32 version | u64 tensor_count | u64 metadata_count
//! metadata_count × { string key | u32 value_type | value }
//! tensor_count   × { string name | u32 n_dims (1..=4) | u64 ne[n_dims] | u32 ggml_type | u64 offset }
//! padding to `general.alignment` (default 32) | tensor data
//! string = u64 length + UTF-8 bytes; array = u32 element_type + u64 count + elements
//! ```
//! `ne[0]` is the contiguous dimension: a linear `[out, in]` is `ne = [in, out]`. Each tensor's
//! `offset` is relative to the data section and a multiple of the alignment. A file may end before
//! the padding (llama.cpp's vocab-only files do): its data section is empty, which only tensors of
//! no bytes fit.
//!
//! No allocation is sized by a count the file states before the bytes behind it are known to
//! exist: an array of `count` elements needs at least `count × (smallest element)` bytes left, so a
//! lying count fails cleanly instead of reserving memory.
//!
//! Type ids follow ggml, except that bitnet.cpp reuses ids upstream ggml reserves: 36 is I2_S in
//! bitnet.cpp and unassigned upstream, so it is read as I2_S; 38/39 are bitnet.cpp's TL1/TL2 but 39
//! is MXFP4 upstream, so they are interpreted by architecture (see [`GgmlType::from_id`]).

pub mod model;
pub mod quants;
pub mod vocab;
pub mod write;

use crate::ternary::MappedFile;
use anyhow::{Context, Result, anyhow, bail, ensure};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;

/// Whether `path` starts with the GGUF magic (a short or unreadable file is simply not GGUF).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == MAGIC
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// Value type ids of the GGUF specification.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(_) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// Any integer type that is non-negative, as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short description for `tern info` and errors: scalars as is, arrays by length.
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.len() > 80 => format!("string ({} bytes)", s.len()),
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) => format!("array[{}]", a.len()),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            Value::Bool(v) => v.to_string(),
            other => other
                .as_u64()
                .map_or_else(|| format!("{other:?}"), |v| v.to_string()),
        }
    }
}

/// The tensor element types tern reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Bf16,
    Q4_0,
    Q8_0,
    Q6K,
    /// llama.cpp's ternary types.
    Tq1_0,
    Tq2_0,
    /// bitnet.cpp's 2-bit type: whole-tensor layout, codes then a 32-byte tail holding the scale.
    I2S,
}

impl GgmlType {
    /// The type of ggml id `id`; `architecture` decides the ids bitnet.cpp and upstream disagree on.
    pub fn from_id(id: u32, architecture: &str) -> Result<Self> {
        let bitnet_cpp = matches!(architecture, "bitnet-b1.58" | "bitnet-25" | "bitnet");
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            8 => GgmlType::Q8_0,
            14 => GgmlType::Q6K,
            30 => GgmlType::Bf16,
            34 => GgmlType::Tq1_0,
            35 => GgmlType::Tq2_0,
            // Unassigned upstream (reserved since IQ4_NL_4_4 and friends were removed): only
            // bitnet.cpp writes it.
            36 => GgmlType::I2S,
            38 | 39 if bitnet_cpp => bail!(
                "ggml type {id} is bitnet.cpp's {} layout, tuned to one machine's kernels; convert \
                 the original checkpoint (or an I2_S/TQ2_0 file) instead",
                if id == 38 { "TL1" } else { "TL2" }
            ),
            3 | 6 | 7 | 9..=13 | 15..=29 | 31..=33 | 39 => bail!(
                "ggml type {id} ({}) is not supported (tern reads F32, F16, BF16, Q8_0, Q6_K, \
                 Q4_0, TQ1_0, TQ2_0 and I2_S)",
                upstream_type_name(id)
            ),
            other => bail!("unknown ggml type id {other}"),
        })
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q8_0 => 8,
            GgmlType::Q6K => 14,
            GgmlType::Bf16 => 30,
            GgmlType::Tq1_0 => 34,
            GgmlType::Tq2_0 => 35,
            GgmlType::I2S => 36,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Bf16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Tq1_0 => "TQ1_0",
            GgmlType::Tq2_0 => "TQ2_0",
            GgmlType::I2S => "I2_S",
        }
    }

    pub fn is_ternary(self) -> bool {
        matches!(self, GgmlType::Tq1_0 | GgmlType::Tq2_0 | GgmlType::I2S)
    }

    /// (elements per block, bytes per block) of the block types.
    fn block(self) -> (u64, u64) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::Bf16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q6K => (256, 210),
            GgmlType::Tq1_0 => (256, 54),
            GgmlType::Tq2_0 => (256, 66),
            GgmlType::I2S => (4, 1),
        }
    }

    /// Bytes of a tensor with shape `ne`; errors when the row length does not fit the block size.
    pub fn tensor_bytes(self, ne: &[u64]) -> Result<u64> {
        let count = ne
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| anyhow!("element count of {ne:?} overflows"))?;
        let (block, bytes) = self.block();
        let row = ne.first().copied().unwrap_or(1);
        ensure!(
            row % block == 0,
            "{} rows of {row} elements are not a whole number of {block}-element blocks",
            self.name()
        );
        if self == GgmlType::I2S {
            ensure!(
                row % quants::I2S_GROUP as u64 == 0,
                "I2_S rows of {row} elements are not a multiple of {} (the x86 layout); a row \
                 length that is only a multiple of 64 means bitnet.cpp's ARM layout, which tern \
                 does not read",
                quants::I2S_GROUP
            );
            // Codes, then the 32-byte tail whose first 4 bytes are the f32 scale.
            return Ok(count / 4 + quants::I2S_TAIL as u64);
        }
        (count / block)
            .checked_mul(bytes)
            .ok_or_else(|| anyhow!("byte size of {ne:?} overflows"))
    }
}

fn upstream_type_name(id: u32) -> &'static str {
    const NAMES: [&str; 40] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
        "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16", "Q4_0_4_4",
        "Q4_0_4_8", "Q4_0_8_8", "TQ1_0", "TQ2_0", "?", "?", "?", "MXFP4",
    ];
    NAMES.get(id as usize).copied().unwrap_or("?")
}

/// One tensor's description; `data` is its byte range in the file, already bounds-checked.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Shape, contiguous dimension first.
    pub ne: Vec<u64>,
    pub ggml_type: GgmlType,
    pub data: std::ops::Range<usize>,
}

/// What [`parse`] reads before the tensor data: everything but the data itself.
#[derive(Debug)]
pub struct Header {
    pub version: u32,
    pub alignment: u64,
    pub metadata: BTreeMap<String, Value>,
    /// Each tensor's data range is checked to lie inside the parsed bytes.
    pub tensors: Vec<TensorInfo>,
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    map: Arc<MappedFile>,
    pub version: u32,
    pub alignment: u64,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let map = MappedFile::open(path)?;
        let header =
            parse(&map).with_context(|| format!("{}: not a valid GGUF file", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            map: Arc::new(map),
            version: header.version,
            alignment: header.alignment,
            metadata: header.metadata,
            tensors: header.tensors,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of a tensor (its range was checked against the file at parse time).
    pub fn data(&self, tensor: &TensorInfo) -> &[u8] {
        &self.map[tensor.data.clone()]
    }

    /// Drops the pages of a tensor's bytes from this process's resident memory
    /// ([`crate::ternary::release_pages`]).
    pub fn release(&self, tensor: &TensorInfo) {
        crate::ternary::release_pages(&self.map, tensor.data.clone());
    }

    /// The file's memory map, for values served from it in place.
    pub fn map(&self) -> &Arc<MappedFile> {
        &self.map
    }
}

/// A bounds-checked little-endian cursor.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let left = self.bytes.len() - self.pos;
        ensure!(
            n <= left as u64,
            "truncated at byte {}: {what} needs {n} bytes, {left} left",
            self.pos
        );
        let out = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(out)
    }

    fn left(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("length taken"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| anyhow!("{what} is not UTF-8"))
    }

    fn value(&mut self, type_id: u32, what: &str, depth: u32) -> Result<Value> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("{what}: bool byte {b} is neither 0 nor 1"),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                ensure!(depth < 2, "{what}: arrays nested deeper than 2 levels");
                let element = self.u32(what)?;
                let count = self.u64(what)?;
                let smallest = match element {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => bail!("{what}: unknown array element type {other}"),
                };
                ensure!(
                    count
                        .checked_mul(smallest)
                        .is_some_and(|n| n <= self.left()),
                    "{what}: array of {count} elements cannot fit in the {} bytes left",
                    self.left()
                );
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(element, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => bail!("{what}: unknown value type {other}"),
        })
    }
}

/// Parses and checks a whole GGUF file held in `bytes`.
pub fn parse(bytes: &[u8]) -> Result<Header> {
    let mut c = Cursor { bytes, pos: 0 };
    ensure!(
        &c.array::<4>("magic")? == MAGIC,
        "the file does not start with the GGUF magic"
    );
    let version = c.u32("version")?;
    ensure!(
        matches!(version, 2 | 3),
        "GGUF version {version} is not supported (expected 2 or 3)"
    );
    let tensor_count = c.u64("tensor count")?;
    let metadata_count = c.u64("metadata count")?;
    // Each metadata entry takes at least 12 bytes (key length + type), each tensor info 28.
    ensure!(
        metadata_count.saturating_mul(12) <= c.left()
            && tensor_count.saturating_mul(28) <= c.left(),
        "{metadata_count} metadata entries and {tensor_count} tensors cannot fit in the file"
    );
    let mut metadata = BTreeMap::new();
    for i in 0..metadata_count {
        let key = c.string(&format!("metadata key #{i}"))?;
        let type_id = c.u32(&format!("type of `{key}`"))?;
        let value = c.value(type_id, &format!("metadata `{key}`"), 0)?;
        ensure!(
            metadata.insert(key.clone(), value).is_none(),
            "metadata key `{key}` appears twice"
        );
    }
    let architecture = metadata
        .get("general.architecture")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => {
            let a = v
                .as_u64()
                .ok_or_else(|| anyhow!("`general.alignment` is not an integer"))?;
            ensure!(
                a > 0 && a.is_power_of_two() && a <= 1 << 20,
                "`general.alignment` {a} is not a power of two up to 1 MiB"
            );
            a
        }
    };
    let mut raw = Vec::new();
    for i in 0..tensor_count {
        let name = c.string(&format!("name of tensor #{i}"))?;
        let n_dims = c.u32(&format!("tensor `{name}` dimensions"))?;
        ensure!(
            (1..=MAX_DIMS).contains(&n_dims),
            "tensor `{name}` has {n_dims} dimensions (expected 1 to {MAX_DIMS})"
        );
        let ne = (0..n_dims)
            .map(|_| c.u64(&format!("tensor `{name}` shape")))
            .collect::<Result<Vec<_>>>()?;
        let type_id = c.u32(&format!("tensor `{name}` type"))?;
        let offset = c.u64(&format!("tensor `{name}` offset"))?;
        raw.push((name, ne, type_id, offset));
    }
    // A file may end before the padding that would precede its data (llama.cpp's vocab-only files
    // do, and llama.cpp reads them): its data section is then empty, so any tensor that has bytes
    // fails the range check below.
    let data_start = (c.pos as u64)
        .next_multiple_of(alignment)
        .min(bytes.len() as u64);
    let data_len = bytes.len() as u64 - data_start;
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(raw.len());
    for (name, ne, type_id, offset) in raw {
        ensure!(
            !tensors.iter().any(|t| t.name == name),
            "tensor `{name}` appears twice"
        );
        let ggml_type = GgmlType::from_id(type_id, &architecture)
            .with_context(|| format!("tensor `{name}`"))?;
        let size = ggml_type
            .tensor_bytes(&ne)
            .with_context(|| format!("tensor `{name}` (shape {ne:?})"))?;
        ensure!(
            offset % alignment == 0,
            "tensor `{name}`: offset {offset} is not a multiple of the alignment {alignment}"
        );
        ensure!(
            offset.checked_add(size).is_some_and(|end| end <= data_len),
            "tensor `{name}`: {size} bytes at offset {offset} run past the end of the data \
             section ({data_len} bytes): truncated file or lying offset"
        );
        let start = (data_start + offset) as usize;
        tensors.push(TensorInfo {
            name,
            ne,
            ggml_type,
            data: start..start + size as usize,
        });
    }
    Ok(Header {
        version,
        alignment,
        metadata,
        tensors,
    })
}

#[cfg(test)]
mod tests;
