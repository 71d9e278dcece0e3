//! A GGUF v3 writer with 32-byte alignment. Tensor data is produced one tensor at a time by a
//! callback, so a model is never held twice in memory; the file is replaced atomically.

use std::io::{BufWriter, Write};
use std::path::Path;

use super::types::{GgmlType, MetaValue};
use super::{DEFAULT_ALIGNMENT, MAGIC};
use crate::error::Result;
use crate::io::atomic::write_atomic;

/// The version written.
pub const VERSION: u32 = 3;

/// A tensor to write: its name, dimensions (innermost first) and type.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
}

impl TensorEntry {
    /// A `[rows, cols]` row-major matrix (ne = [cols, rows]), or a vector when `rows` is `None`.
    pub fn new(name: String, cols: usize, rows: Option<usize>, ggml_type: GgmlType) -> Self {
        let mut dims = vec![cols as u64];
        dims.extend(rows.map(|r| r as u64));
        TensorEntry {
            name,
            dims,
            ggml_type,
        }
    }

    fn size(&self) -> u64 {
        let n: u64 = self.dims.iter().product();
        self.ggml_type.bytes_for(n).expect("a writable size")
    }
}

fn put_string<W: Write>(w: &mut W, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_value<W: Write>(w: &mut W, v: &MetaValue) -> std::io::Result<()> {
    match v {
        MetaValue::U8(x) => w.write_all(&[*x]),
        MetaValue::I8(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::Bool(x) => w.write_all(&[*x as u8]),
        MetaValue::String(s) => put_string(w, s),
        MetaValue::U64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::Array(ty, items) => {
            w.write_all(&(*ty as u32).to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for item in items {
                if item.value_type() != *ty {
                    return Err(std::io::Error::other(format!(
                        "array of {ty:?} holds a {:?}",
                        item.value_type()
                    )));
                }
                put_value(w, item)?;
            }
            Ok(())
        }
    }
}

/// Zero bytes up to the next multiple of the alignment after `written` bytes.
fn pad<W: Write>(w: &mut W, written: u64) -> std::io::Result<()> {
    let padding = written.next_multiple_of(DEFAULT_ALIGNMENT as u64) - written;
    w.write_all(&vec![0u8; padding as usize])
}

/// Counts the bytes going through a writer.
struct Counting<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a GGUF file: `metadata` (plus `general.alignment`), then `tensors`, whose bytes
/// `data(i)` returns for tensor `i` (exactly the entry's size, checked).
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, MetaValue)],
    tensors: &[TensorEntry],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let mut failure = None;
    let result = write_atomic(path, |file| {
        let mut w = Counting {
            inner: BufWriter::new(file),
            written: 0,
        };
        w.write_all(&MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&(tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(metadata.len() as u64 + 1).to_le_bytes())?;
        let alignment = MetaValue::U32(DEFAULT_ALIGNMENT as u32);
        for (key, value) in metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .chain([("general.alignment", &alignment)])
        {
            put_string(&mut w, key)?;
            w.write_all(&(value.value_type() as u32).to_le_bytes())?;
            put_value(&mut w, value)?;
        }
        let mut offset = 0u64;
        for t in tensors {
            put_string(&mut w, &t.name)?;
            w.write_all(&(t.dims.len() as u32).to_le_bytes())?;
            for d in &t.dims {
                w.write_all(&d.to_le_bytes())?;
            }
            w.write_all(&t.ggml_type.id().to_le_bytes())?;
            w.write_all(&offset.to_le_bytes())?;
            offset = (offset + t.size()).next_multiple_of(DEFAULT_ALIGNMENT as u64);
        }
        let header_len = w.written;
        pad(&mut w, header_len)?;
        for (i, t) in tensors.iter().enumerate() {
            let bytes = match data(i) {
                Ok(b) => b,
                Err(e) => {
                    failure = Some(e);
                    return Err(std::io::Error::other("tensor data could not be produced"));
                }
            };
            if bytes.len() as u64 != t.size() {
                return Err(std::io::Error::other(format!(
                    "tensor {} has {} bytes of data, expected {}",
                    t.name,
                    bytes.len(),
                    t.size()
                )));
            }
            w.write_all(&bytes)?;
            pad(&mut w, bytes.len() as u64)?;
        }
        w.flush()
    });
    match failure {
        Some(e) => Err(e),
        None => result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::quant::quantize;
    use crate::io::gguf::GgufFile;

    #[test]
    fn written_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let meta = vec![
            ("a.u32".to_string(), MetaValue::U32(7)),
            ("a.str".to_string(), MetaValue::String("hé".into())),
            (
                "a.list".to_string(),
                MetaValue::strings(["x".to_string(), "yz".to_string()]),
            ),
            ("a.f64".to_string(), MetaValue::F64(-0.5)),
        ];
        let m: Vec<f32> = (0..64).map(|i| i as f32 / 8.0 - 4.0).collect();
        let v = [1.5f32, -2.0, 3.25];
        let tensors = vec![
            TensorEntry::new("m".into(), 32, Some(2), GgmlType::Q8_0),
            TensorEntry::new("v".into(), 3, None, GgmlType::F32),
            TensorEntry::new("h".into(), 32, Some(2), GgmlType::F16),
        ];
        write_gguf(&path, &meta, &tensors, |i| {
            Ok(match i {
                0 => quantize(GgmlType::Q8_0, &m),
                1 => quantize(GgmlType::F32, &v),
                _ => quantize(GgmlType::F16, &m),
            })
        })
        .unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.header().version, 3);
        for (k, v) in &meta {
            assert_eq!(f.metadata().get(k), Some(v), "{k}");
        }
        assert_eq!(f.header().tensor("m").unwrap().dims, [32, 2]);
        assert_eq!(f.read_f32("v").unwrap(), v);
        assert_eq!(f.read_f32("h").unwrap(), m);
        let q = f.read_f32("m").unwrap();
        assert!(q.iter().zip(&m).all(|(a, b)| (a - b).abs() < 0.02));
        for t in &f.header().tensors {
            assert_eq!(t.start % DEFAULT_ALIGNMENT, 0);
        }
    }
}
