//! A validating safetensors reader over a memory map, and a writer.
//!
//! The format: an 8-byte little-endian header length `n`, `n` bytes of UTF-8 JSON mapping each
//! tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the data
//! section) plus an optional `"__metadata__"` string map, then the data section. The reader checks
//! every field against the file before handing out bytes, so a truncated or corrupt file produces an
//! [`Error::Format`] naming the file, the tensor and the inconsistency.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;

/// Largest header accepted, as in the reference implementation; anything larger is corruption.
const MAX_HEADER_LEN: u64 = 100_000_000;

/// Tensors with at least this many elements are converted to f32 on several threads.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 20;

/// Elements converted per task (reader) or per buffered write (writer).
const CHUNK_ELEMENTS: usize = 1 << 16;

/// Element types of the safetensors format. Only [`Dtype::F32`], [`Dtype::F16`] and
/// [`Dtype::BF16`] can be read as or written from f32; the others are recognised so that a file
/// holding them opens and the error for reading them is precise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// Boolean, one byte.
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float, 4 exponent and 3 mantissa bits.
    F8E4M3,
    /// 8-bit float, 5 exponent and 2 mantissa bits.
    F8E5M2,
    /// 8-bit power-of-two scale (microscaling formats).
    F8E8M0,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16: f32's exponent range with 7 mantissa bits.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single precision.
    F32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
    /// IEEE double precision.
    F64,
}

impl Dtype {
    const ALL: [Dtype; 16] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8E4M3,
        Dtype::F8E5M2,
        Dtype::F8E8M0,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::I64,
        Dtype::U64,
        Dtype::F64,
    ];

    /// The name used in the JSON header ("F32", "BF16", ...).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F64 => "F64",
        }
    }

    /// Parses a header dtype name; `None` for names this library does not know.
    pub fn parse(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 | Dtype::F8E8M0 => {
                1
            }
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }

    /// Whether values of this type convert to and from f32 here.
    pub fn is_float32_convertible(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's header entry, validated against the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Byte range within the data section (the header's `data_offsets`).
    pub data: Range<usize>,
}

impl TensorInfo {
    /// Number of elements (product of the shape; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open, validated safetensors file. Tensor bytes are read straight from a memory map.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Mmap,
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl SafetensorsFile {
    /// Maps `path` and validates its header: the header length, the JSON, every entry's dtype,
    /// shape and offsets, and that no two tensors share bytes.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(Error::format(
                path,
                format!("file is {len} bytes, shorter than the 8-byte header length"),
            ));
        }
        // SAFETY: the map is read-only and private to this process. As with every memory-mapped
        // reader, another process truncating or rewriting the file while it is open is undefined;
        // the library itself only ever replaces files by renaming (see `write_atomic`).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header_len = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
        if header_len > len - 8 {
            return Err(Error::format(
                path,
                format!("header length {header_len} runs past the end of the file ({len} bytes)"),
            ));
        }
        if header_len > MAX_HEADER_LEN {
            return Err(Error::format(
                path,
                format!("header length {header_len} exceeds the limit of {MAX_HEADER_LEN} bytes"),
            ));
        }
        // Both fit in usize: they are bounded by the length of a mapped file.
        let data_start = 8 + header_len as usize;
        let data_len = map.len() - data_start;
        let header = std::str::from_utf8(&map[8..data_start])
            .map_err(|e| Error::format(path, format!("header is not valid UTF-8 ({e})")))?;
        let (tensors, metadata) =
            parse_header(header, data_len).map_err(|m| Error::format(path, m))?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map,
            data_start,
            tensors,
            metadata,
        })
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The header entry of `name`, if present.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The `__metadata__` string map (empty when the header has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The tensor's bytes as stored (little-endian, possibly unaligned).
    pub fn raw_bytes(&self, name: &str) -> Result<&[u8]> {
        self.tensor(name).map(|(_, bytes)| bytes)
    }

    /// The tensor converted to f32; F32, F16 and BF16 are supported.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let (info, bytes) = self.tensor(name)?;
        if !info.dtype.is_float32_convertible() {
            return Err(Error::format(
                &self.path,
                format!(
                    "unsupported dtype {} for tensor {name:?} (only F32, F16 and BF16 can be read)",
                    info.dtype
                ),
            ));
        }
        let mut out = vec![0.0f32; info.numel()];
        let size = info.dtype.size();
        if out.len() >= PARALLEL_MIN_ELEMENTS {
            out.par_chunks_mut(CHUNK_ELEMENTS)
                .zip(bytes.par_chunks(CHUNK_ELEMENTS * size))
                .for_each(|(o, b)| decode(info.dtype, b, o));
        } else {
            decode(info.dtype, bytes, &mut out);
        }
        Ok(out)
    }

    /// The header entry and bytes of `name`; a missing name is [`Error::MissingTensor`].
    fn tensor(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let info = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: self.path.clone(),
        })?;
        let range = self.data_start + info.data.start..self.data_start + info.data.end;
        Ok((info, &self.map[range]))
    }
}

type Header = (BTreeMap<String, TensorInfo>, BTreeMap<String, String>);

/// Parses and validates the JSON header against a data section of `data_len` bytes. The error is
/// the message only; the caller adds the path.
fn parse_header(header: &str, data_len: usize) -> std::result::Result<Header, String> {
    let value: Value =
        serde_json::from_str(header).map_err(|e| format!("header is not valid JSON: {e}"))?;
    let Value::Object(entries) = value else {
        return Err("header is not a JSON object".to_string());
    };
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            metadata = parse_metadata(&entry)?;
        } else {
            let info = parse_entry(&name, &entry, data_len)?;
            tensors.insert(name, info);
        }
    }
    check_overlaps(&tensors)?;
    Ok((tensors, metadata))
}

fn parse_metadata(entry: &Value) -> std::result::Result<BTreeMap<String, String>, String> {
    let Value::Object(map) = entry else {
        return Err(format!(
            "__metadata__ must be an object of strings, found {entry}"
        ));
    };
    map.iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k.clone(), s.clone())),
            other => Err(format!(
                "__metadata__ value for {k:?} must be a string, found {other}"
            )),
        })
        .collect()
}

fn parse_entry(
    name: &str,
    entry: &Value,
    data_len: usize,
) -> std::result::Result<TensorInfo, String> {
    if !entry.is_object() {
        return Err(format!(
            "tensor {name:?}: entry must be an object, found {entry}"
        ));
    }
    let field = |key: &str| {
        entry
            .get(key)
            .ok_or_else(|| format!("tensor {name:?}: missing field {key:?}"))
    };
    let dtype = match field("dtype")? {
        Value::String(s) => {
            Dtype::parse(s).ok_or_else(|| format!("tensor {name:?}: unknown dtype {s:?}"))?
        }
        other => {
            return Err(format!(
                "tensor {name:?}: dtype must be a string, found {other}"
            ))
        }
    };
    let shape = usize_array(field("shape")?).ok_or_else(|| {
        format!("tensor {name:?}: shape must be an array of non-negative integers")
    })?;
    let offsets = usize_array(field("data_offsets")?)
        .filter(|o| o.len() == 2)
        .ok_or_else(|| {
            format!("tensor {name:?}: data_offsets must be two non-negative integers [begin, end]")
        })?;
    let (begin, end) = (offsets[0], offsets[1]);
    if begin > end {
        return Err(format!(
            "tensor {name:?}: data_offsets [{begin}, {end}] begin is after end"
        ));
    }
    if end > data_len {
        return Err(format!(
            "tensor {name:?}: data_offsets [{begin}, {end}] end past the data section of {data_len} bytes"
        ));
    }
    let expected = shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("tensor {name:?}: shape {shape:?} overflows the address space"))?;
    if expected != end - begin {
        return Err(format!(
            "tensor {name:?}: dtype {dtype} with shape {shape:?} needs {expected} bytes, but data_offsets [{begin}, {end}] span {}",
            end - begin
        ));
    }
    Ok(TensorInfo {
        dtype,
        shape,
        data: begin..end,
    })
}

fn usize_array(value: &Value) -> Option<Vec<usize>> {
    value
        .as_array()?
        .iter()
        .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()))
        .collect()
}

/// Rejects tensors whose byte ranges intersect (empty tensors occupy no bytes and never overlap).
fn check_overlaps(tensors: &BTreeMap<String, TensorInfo>) -> std::result::Result<(), String> {
    let mut ranges: Vec<(&str, &Range<usize>)> = tensors
        .iter()
        .filter(|(_, info)| !info.data.is_empty())
        .map(|(name, info)| (name.as_str(), &info.data))
        .collect();
    ranges.sort_by_key(|(_, r)| (r.start, r.end));
    for pair in ranges.windows(2) {
        let ((a, ra), (b, rb)) = (pair[0], pair[1]);
        if rb.start < ra.end {
            return Err(format!(
                "tensors {a:?} [{}, {}] and {b:?} [{}, {}] overlap",
                ra.start, ra.end, rb.start, rb.end
            ));
        }
    }
    Ok(())
}

/// Converts little-endian `bytes` of `dtype` (F32, F16 or BF16) into `out`.
fn decode(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        other => unreachable!("decode called with {other}"),
    }
}

/// Appends `values` converted to `dtype` (F32, F16 or BF16, rounding to nearest even) to `out`.
fn encode(dtype: Dtype, values: &[f32], out: &mut Vec<u8>) {
    match dtype {
        Dtype::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Dtype::F16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes())),
        Dtype::BF16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes())),
        other => unreachable!("encode called with {other}"),
    }
}

/// Writes `tensors` (name, shape, row-major values) to `path` as a standard safetensors file,
/// converting every value to `dtype` (F32, F16 or BF16; rounding to nearest even). Tensors are
/// stored sorted by name; the header is padded with spaces so the data section starts at a
/// multiple of 8 bytes. `metadata`, if not empty, becomes `__metadata__`. The file is replaced
/// atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    dtype: Dtype,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    if !dtype.is_float32_convertible() {
        return Err(Error::InvalidArgument(format!(
            "cannot write dtype {dtype} (only F32, F16 and BF16) to {}",
            path.display()
        )));
    }
    let mut order: Vec<&(String, Vec<usize>, &[f32])> = tensors.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    let header = build_header(path, &order, dtype, metadata)?;
    write_atomic(path, |file| {
        let mut w = BufWriter::new(file);
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(header.as_bytes())?;
        let mut buf = Vec::with_capacity(CHUNK_ELEMENTS * dtype.size());
        for (_, _, values) in &order {
            for chunk in values.chunks(CHUNK_ELEMENTS) {
                buf.clear();
                encode(dtype, chunk, &mut buf);
                w.write_all(&buf)?;
            }
        }
        w.flush()
    })
}

/// The padded JSON header for tensors already sorted by name; checks names and element counts.
fn build_header(
    path: &Path,
    sorted: &[&(String, Vec<usize>, &[f32])],
    dtype: Dtype,
    metadata: &BTreeMap<String, String>,
) -> Result<String> {
    let invalid = |msg: String| Error::InvalidArgument(format!("{}: {msg}", path.display()));
    let mut seen = HashSet::new();
    let mut header = Map::new();
    let mut offset = 0usize;
    for (name, shape, values) in sorted {
        if name == "__metadata__" || !seen.insert(name.as_str()) {
            return Err(invalid(format!(
                "tensor name {name:?} is reserved or repeated"
            )));
        }
        let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if numel != Some(values.len()) {
            return Err(invalid(format!(
                "tensor {name:?} has {} values but shape {shape:?}",
                values.len()
            )));
        }
        let end = offset + values.len() * dtype.size();
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": dtype.name(), "shape": shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    if !metadata.is_empty() {
        header.insert("__metadata__".to_string(), serde_json::json!(metadata));
    }
    let mut text = Value::Object(header).to_string();
    let padded = (8 + text.len()).next_multiple_of(8) - 8;
    text.push_str(&" ".repeat(padded - text.len()));
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 + seed) * 0.37).sin() * 3.0)
            .collect()
    }

    fn round_trip(dtype: Dtype, tolerance: f32) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = sample(6, 1.0);
        let b = sample(4, 2.0);
        let empty: Vec<f32> = Vec::new();
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let tensors = [
            ("z.weight".to_string(), vec![2, 3], a.as_slice()),
            ("a.bias".to_string(), vec![4], b.as_slice()),
            ("e".to_string(), vec![0, 5], empty.as_slice()),
        ];
        write_safetensors(&path, &tensors, dtype, &metadata).unwrap();

        let file = SafetensorsFile::open(&path).unwrap();
        assert_eq!(
            file.names().collect::<Vec<_>>(),
            ["a.bias", "e", "z.weight"]
        );
        assert_eq!(file.metadata(), &metadata);
        let info = file.info("z.weight").unwrap();
        assert_eq!((info.dtype, info.shape.as_slice()), (dtype, &[2, 3][..]));
        for (name, expected) in [("z.weight", &a), ("a.bias", &b)] {
            let got = file.read_f32(name).unwrap();
            assert_eq!(got.len(), expected.len());
            for (g, e) in got.iter().zip(expected.iter()) {
                assert!((g - e).abs() <= tolerance * e.abs(), "{name}: {g} vs {e}");
            }
        }
        assert!(file.read_f32("e").unwrap().is_empty());

        // The reference implementation (which Python's safetensors wraps) accepts the file.
        let bytes = std::fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!((8 + header_len) % 8, 0);
        let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = reference.tensor("z.weight").unwrap();
        assert_eq!(view.shape(), &[2, 3]);
        assert_eq!(view.dtype().to_string(), dtype.name());
        assert_eq!(view.data(), file.raw_bytes("z.weight").unwrap());
    }

    #[test]
    fn round_trip_f32_is_exact() {
        round_trip(Dtype::F32, 0.0);
    }

    #[test]
    fn round_trip_f16_within_half_precision() {
        round_trip(Dtype::F16, 1.0 / 1024.0);
    }

    #[test]
    fn round_trip_bf16_within_bfloat_precision() {
        round_trip(Dtype::BF16, 1.0 / 128.0);
    }

    #[test]
    fn encoding_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly halfway between two bf16 values; ties go to the even mantissa (1.0).
        let mut out = Vec::new();
        encode(
            Dtype::BF16,
            &[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0],
            &mut out,
        );
        let mut back = [0.0f32; 2];
        decode(Dtype::BF16, &out, &mut back);
        assert_eq!(back, [1.0, 1.0 + 4.0 / 256.0]);
    }

    #[test]
    fn reads_unaligned_data_section() {
        // A 3-byte header puts the data at byte 11, unaligned for f32.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.safetensors");
        let header = r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let header = format!("{header}   ");
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&1.5f32.to_le_bytes());
        bytes.extend_from_slice(&(-2.25f32).to_le_bytes());
        assert_ne!((8 + header.len()) % 4, 0);
        std::fs::write(&path, bytes).unwrap();
        let file = SafetensorsFile::open(&path).unwrap();
        assert_eq!(file.read_f32("x").unwrap(), [1.5, -2.25]);
    }

    #[test]
    fn large_tensor_converts_in_parallel_identically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.safetensors");
        let n = PARALLEL_MIN_ELEMENTS + 123;
        let values = sample(n, 0.5);
        let tensors = [("w".to_string(), vec![n], values.as_slice())];
        write_safetensors(&path, &tensors, Dtype::BF16, &BTreeMap::new()).unwrap();
        let file = SafetensorsFile::open(&path).unwrap();
        let got = file.read_f32("w").unwrap();
        let mut serial = vec![0.0; n];
        decode(Dtype::BF16, file.raw_bytes("w").unwrap(), &mut serial);
        assert_eq!(got, serial);
    }

    #[test]
    fn non_float_dtype_opens_but_does_not_read_as_f32() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.safetensors");
        let header = r#"{"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&7i64.to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
        let file = SafetensorsFile::open(&path).unwrap();
        assert_eq!(file.raw_bytes("ids").unwrap(), 7i64.to_le_bytes());
        let message = file.read_f32("ids").unwrap_err().to_string();
        assert!(
            message.contains("unsupported dtype I64 for tensor \"ids\""),
            "{message}"
        );
    }

    #[test]
    fn writer_rejects_value_count_not_matching_shape() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        let values = [1.0f32; 5];
        let tensors = [("w".to_string(), vec![2, 3], &values[..])];
        let err = write_safetensors(&path, &tensors, Dtype::F32, &BTreeMap::new()).unwrap_err();
        assert!(
            err.to_string()
                .contains("\"w\" has 5 values but shape [2, 3]"),
            "{err}"
        );
        assert!(!path.exists());
    }
}
