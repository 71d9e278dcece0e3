//! A validating GGUF reader. [`GgufHeader::parse`] checks every count, length, dimension and
//! offset against the bytes it was given (with checked arithmetic and fixed caps) before anything
//! is allocated or sliced, so a malformed file yields a message saying what is wrong, never a
//! panic or a huge allocation. [`GgufFile`] is the same over a memory-mapped file.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dequant::dequantize;
use super::types::{unsupported_type_name, GgmlType, MetaValue, Metadata, ValueType};
use super::{DEFAULT_ALIGNMENT, MAGIC};
use crate::error::{Error, Result};

/// More tensors than any real model has (a 405B llama has about 1,100).
const MAX_TENSORS: u64 = 1 << 16;
/// More metadata keys than any real file has.
const MAX_KEYS: u64 = 1 << 16;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Largest accepted dimension and element count (2^40 values is 4 TiB of f32).
const MAX_ELEMENTS: u64 = 1 << 40;
/// Largest accepted alignment.
const MAX_ALIGNMENT: u64 = 1 << 16;
/// Arrays may nest (the format allows it); deeper than this is corruption.
const MAX_ARRAY_DEPTH: usize = 2;

/// Where one tensor's data lies and how to read it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, innermost first (`ne[0]` is a row's length).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset of the data from the start of the file.
    pub start: usize,
    /// Byte length of the data.
    pub size: usize,
}

impl TensorInfo {
    /// Number of values.
    pub fn elements(&self) -> usize {
        // Checked against MAX_ELEMENTS when parsed.
        self.dims.iter().product::<u64>() as usize
    }
}

/// Everything before the tensor data, validated against the file length.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub alignment: usize,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], String> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "file is truncated: {} needs {n} bytes at offset {}, only {left} remain",
                what(),
                self.pos
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], String> {
        Ok(self.take(N as u64, what)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, String> {
        let len = self.u64(&|| format!("the length of {}", what()))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{} is not valid UTF-8", what()))
    }

    fn value(
        &mut self,
        ty: ValueType,
        depth: usize,
        what: &dyn Fn() -> String,
    ) -> Result<MetaValue, String> {
        Ok(match ty {
            ValueType::U8 => MetaValue::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => MetaValue::I8(self.array::<1>(what)?[0] as i8),
            ValueType::U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => MetaValue::U32(self.u32(what)?),
            ValueType::I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => MetaValue::U64(self.u64(what)?),
            ValueType::I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => match self.array::<1>(what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => {
                    return Err(format!(
                        "{} is a bool of value {b} (expected 0 or 1)",
                        what()
                    ))
                }
            },
            ValueType::String => MetaValue::String(self.string(what)?),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("{} nests arrays too deeply", what()));
                }
                let id = self.u32(&|| format!("the element type of {}", what()))?;
                let elem = ValueType::from_id(id)
                    .ok_or_else(|| format!("{} has unknown element type {id}", what()))?;
                let count = self.u64(&|| format!("the length of {}", what()))?;
                // Every element takes at least one byte (strings and arrays at least eight), so a
                // count beyond the remaining bytes is corrupt; checking first bounds the allocation.
                let min = elem.fixed_size().unwrap_or(8) as u64;
                if count.checked_mul(min).is_none_or(|n| n > self.remaining()) {
                    return Err(format!(
                        "{} claims {count} elements, more than the {} bytes left in the file hold",
                        what(),
                        self.remaining()
                    ));
                }
                let mut items = Vec::with_capacity(count as usize);
                for i in 0..count {
                    items.push(self.value(elem, depth + 1, &|| format!("{}[{i}]", what()))?);
                }
                MetaValue::Array(elem, items)
            }
        })
    }
}

impl GgufHeader {
    /// Parses and validates the header of a whole file's `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let mut c = Cursor { bytes, pos: 0 };
        let magic: [u8; 4] = c.array(&|| "the magic number".into())?;
        if magic != MAGIC {
            return Err(format!(
                "bad magic {magic:02x?}: not a GGUF file (expected \"GGUF\")"
            ));
        }
        let version = c.u32(&|| "the version".into())?;
        if !(2..=3).contains(&version) {
            return Err(format!(
                "GGUF version {version} is not supported (supported: 2 and 3)"
            ));
        }
        let n_tensors = c.u64(&|| "the tensor count".into())?;
        let n_keys = c.u64(&|| "the metadata count".into())?;
        if n_tensors > MAX_TENSORS {
            return Err(format!(
                "tensor count {n_tensors} is absurd (at most {MAX_TENSORS})"
            ));
        }
        if n_keys > MAX_KEYS {
            return Err(format!(
                "metadata count {n_keys} is absurd (at most {MAX_KEYS})"
            ));
        }
        let mut metadata = Metadata::new();
        for i in 0..n_keys {
            let key = c.string(&|| format!("metadata key #{i}"))?;
            let id = c.u32(&|| format!("the type of metadata {key:?}"))?;
            let ty = ValueType::from_id(id)
                .ok_or_else(|| format!("metadata {key:?} has unknown value type {id}"))?;
            let value = c.value(ty, 0, &|| format!("metadata {key:?}"))?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(format!("metadata key {key:?} appears twice"));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT as u64,
            Some(MetaValue::U32(a)) if a.is_power_of_two() && u64::from(*a) <= MAX_ALIGNMENT => {
                u64::from(*a)
            }
            Some(other) => {
                return Err(format!(
                    "general.alignment {other:?} is wrong: it must be a u32 power of two up to {MAX_ALIGNMENT}"
                ))
            }
        };
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            raw.push(read_tensor_info(&mut c, i)?);
        }
        // The data section starts at the next multiple of the alignment.
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = bytes.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut index = HashMap::with_capacity(raw.len());
        for (name, dims, ggml_type, offset) in raw {
            if offset % alignment != 0 {
                return Err(format!(
                    "tensor {name:?} has offset {offset}, not a multiple of the alignment {alignment}"
                ));
            }
            let elements: u64 = dims.iter().product();
            let size = ggml_type.bytes_for(elements).expect("elements are capped");
            let start = data_start.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(size));
            let (Some(start), Some(end)) = (start, end) else {
                return Err(format!("tensor {name:?} has an absurd offset {offset}"));
            };
            if end > file_len {
                return Err(format!(
                    "tensor {name:?} data ({size} bytes at offset {start}) runs past the end of the file ({file_len} bytes)"
                ));
            }
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(format!("tensor {name:?} appears twice"));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                start: start as usize,
                size: size as usize,
            });
        }
        Ok(GgufHeader {
            version,
            alignment: alignment as usize,
            metadata,
            tensors,
            index,
        })
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }
}

/// One tensor info: name, dimensions, type and offset, with the dimensions checked.
fn read_tensor_info(
    c: &mut Cursor<'_>,
    i: u64,
) -> Result<(String, Vec<u64>, GgmlType, u64), String> {
    let name = c.string(&|| format!("the name of tensor #{i}"))?;
    let n_dims = c.u32(&|| format!("the dimension count of tensor {name:?}"))?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(format!(
            "tensor {name:?} has {n_dims} dimensions (expected 1 to {MAX_DIMS})"
        ));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    let mut elements: u64 = 1;
    for d in 0..n_dims {
        let n = c.u64(&|| format!("dimension {d} of tensor {name:?}"))?;
        elements = elements
            .checked_mul(n)
            .filter(|&e| e <= MAX_ELEMENTS)
            .ok_or_else(|| {
                format!("tensor {name:?} has absurd dimensions (more than {MAX_ELEMENTS} values)")
            })?;
        dims.push(n);
    }
    let id = c.u32(&|| format!("the type of tensor {name:?}"))?;
    let ggml_type = GgmlType::from_id(id).ok_or_else(|| match unsupported_type_name(id) {
        Some(t) => format!(
            "tensor {name:?} has type {t}, which this reader does not support (supported: {})",
            supported_list()
        ),
        None => format!("tensor {name:?} has unknown type id {id}"),
    })?;
    if dims[0] % ggml_type.block_size() as u64 != 0 {
        return Err(format!(
            "tensor {name:?} rows of {} values do not fill whole {ggml_type} blocks of {}",
            dims[0],
            ggml_type.block_size()
        ));
    }
    let offset = c.u64(&|| format!("the offset of tensor {name:?}"))?;
    Ok((name, dims, ggml_type, offset))
}

fn supported_list() -> String {
    GgmlType::ALL.map(GgmlType::name).join(", ")
}

/// Dequantizes a tensor of a parsed file's `bytes` to f32.
pub fn read_tensor_f32(bytes: &[u8], info: &TensorInfo) -> Vec<f32> {
    let mut out = vec![0.0; info.elements()];
    dequantize(
        info.ggml_type,
        &bytes[info.start..info.start + info.size],
        &mut out,
    );
    out
}

/// A memory-mapped GGUF file with a validated header.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    header: GgufHeader,
}

impl GgufFile {
    /// Opens `path` and validates its header; errors name the file and the problem.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; like every mmap-based reader we rely on the file not being
        // truncated by another process while it is open.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = GgufHeader::parse(&map).map_err(|m| Error::format(path, m))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    pub fn metadata(&self) -> &Metadata {
        &self.header.metadata
    }

    /// Reads tensor `name` as f32 values, dequantizing it.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self
            .header
            .tensor(name)
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                path: self.path.clone(),
            })?;
        Ok(read_tensor_f32(&self.map, info))
    }
}
