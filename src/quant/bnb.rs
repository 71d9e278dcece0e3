//! NF4 weights of a bitsandbytes-4bit checkpoint (transformers `load_in_4bit=True` saved with
//! `save_pretrained`, or any state dict of bitsandbytes `Linear4bit` modules).
//!
//! bitsandbytes stores one quantized weight `X.weight` as up to six tensors (the names of
//! `QuantState.as_dict(packed=True)`, each prefixed with `X.weight.`):
//!
//! ```text
//!     X.weight                                  packed codes; U8 [⌈n/2⌉, 1] (another dtype when
//!                                               `quant_storage` was not uint8: the same bytes)
//!     X.weight.absmax                           U8 [blocks] with double quantization, else F32
//!     X.weight.quant_map                        F32 [16], the NF4 code book
//!     X.weight.nested_absmax                    F32 [⌈blocks/256⌉]     (double quantization only)
//!     X.weight.nested_quant_map                 F32 [256], the 8-bit map (double quantization only)
//!     X.weight.quant_state.bitsandbytes__nf4    U8 [len]: UTF-8 JSON of the non-tensor fields
//! ```
//!
//! The JSON holds `quant_type` ("nf4"), `blocksize` (64), `dtype` (of the weight before
//! quantization: "bfloat16", "float16" or "float32"), `shape` ([out, in]) and, with double
//! quantization, `nested_blocksize` (256), `nested_dtype` ("float32") and `nested_offset` (the mean
//! subtracted from the absmax values, an f32 printed as a number). See [`super::nf4`] for what the
//! tensors mean.
//!
//! Reading copies the packed bytes and 8-bit codes out of the memory map; nothing is expanded to
//! full precision.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::safetensors::{Dtype, SafetensorsFile, TensorInfo};
use crate::quant::nf4::{Absmax, DoubleQuant, Nf4Tensor, BLOCK, NESTED_BLOCK, NF4_CODE};

/// Suffix (after `X.weight`) of the packed JSON quant state of an NF4 weight.
pub const NF4_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";

/// Suffix of the packed JSON quant state of an FP4 weight (recognised, not supported).
pub const FP4_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__fp4";

/// Finds the safetensors file holding a tensor. A checkpoint split into shards may put the
/// tensors of one weight in different files, so each tensor is looked up on its own.
pub trait TensorLookup {
    /// The file holding `name`, if any.
    fn file_with(&self, name: &str) -> Option<&SafetensorsFile>;

    /// What to name in an error about a missing tensor.
    fn describe(&self) -> &Path;
}

impl TensorLookup for SafetensorsFile {
    fn file_with(&self, name: &str) -> Option<&SafetensorsFile> {
        self.info(name).map(|_| self)
    }

    fn describe(&self) -> &Path {
        self.path()
    }
}

impl TensorLookup for [SafetensorsFile] {
    fn file_with(&self, name: &str) -> Option<&SafetensorsFile> {
        self.iter().find(|f| f.info(name).is_some())
    }

    fn describe(&self) -> &Path {
        self.first().map_or(Path::new("(no files)"), |f| f.path())
    }
}

/// The fields of the packed JSON quant state, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantState {
    /// `[rows, cols]` of the weight.
    pub shape: [usize; 2],
    /// The weight's dtype before quantization ("bfloat16", "float16", "float32").
    pub dtype: String,
    /// Values per NF4 block (always [`BLOCK`] here).
    pub blocksize: usize,
    /// The double-quantization offset, when the absmax values are double quantized.
    pub nested_offset: Option<f32>,
}

/// Whether `weight` (e.g. `model.layers.0.self_attn.q_proj.weight`) is stored as a bitsandbytes
/// 4-bit weight (NF4 or FP4).
pub fn is_bnb_4bit<S: TensorLookup + ?Sized>(source: &S, weight: &str) -> bool {
    source
        .file_with(&format!("{weight}{NF4_STATE_SUFFIX}"))
        .is_some()
        || source
            .file_with(&format!("{weight}{FP4_STATE_SUFFIX}"))
            .is_some()
}

/// Reads and checks the JSON quant state of `weight`.
pub fn read_quant_state<S: TensorLookup + ?Sized>(source: &S, weight: &str) -> Result<QuantState> {
    let name = format!("{weight}{NF4_STATE_SUFFIX}");
    let Some(file) = source.file_with(&name) else {
        let fp4 = format!("{weight}{FP4_STATE_SUFFIX}");
        if let Some(file) = source.file_with(&fp4) {
            return Err(Error::format(
                file.path(),
                format!("weight {weight:?} is quantized to FP4 ({fp4:?}); only NF4 is supported"),
            ));
        }
        return Err(Error::MissingTensor {
            name,
            path: source.describe().to_path_buf(),
        });
    };
    let bad = |message: String| Error::format(file.path(), format!("tensor {name:?}: {message}"));
    let info = file.info(&name).expect("looked up");
    if info.dtype != Dtype::U8 || info.shape.len() != 1 {
        return Err(bad(format!(
            "expected a 1-D U8 tensor of JSON bytes, found {} {:?}",
            info.dtype, info.shape
        )));
    }
    let text =
        std::str::from_utf8(file.raw_bytes(&name)?).map_err(|e| bad(format!("not UTF-8 ({e})")))?;
    let json: Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
    let field = |key: &str| {
        json.get(key)
            .ok_or_else(|| bad(format!("the quant state has no {key:?}")))
    };
    let usize_field = |key: &str| {
        field(key)?
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| bad(format!("{key:?} is not a non-negative integer")))
    };
    let str_field = |key: &str| {
        field(key)?
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| bad(format!("{key:?} is not a string")))
    };

    let quant_type = str_field("quant_type")?;
    if quant_type != "nf4" {
        return Err(bad(format!(
            "quant_type is {quant_type:?}; only \"nf4\" is supported"
        )));
    }
    let blocksize = usize_field("blocksize")?;
    if blocksize != BLOCK {
        return Err(bad(format!(
            "blocksize is {blocksize}; only {BLOCK} is supported"
        )));
    }
    let dtype = str_field("dtype")?;
    if !matches!(dtype.as_str(), "bfloat16" | "float16" | "float32") {
        return Err(bad(format!(
            "dtype is {dtype:?}; expected \"bfloat16\", \"float16\" or \"float32\""
        )));
    }
    let shape: Vec<usize> = field("shape")?
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|v| v.as_u64().and_then(|v| usize::try_from(v).ok()))
                .collect()
        })
        .ok_or_else(|| bad("\"shape\" is not an array of non-negative integers".into()))?;
    let shape: [usize; 2] = match shape[..] {
        [rows, cols] if rows > 0 && cols > 0 && rows.checked_mul(cols).is_some() => [rows, cols],
        _ => {
            return Err(bad(format!(
                "shape is {shape:?}; expected a 2-D matrix [rows, cols] with no zero dimension"
            )))
        }
    };

    let nested_offset = if json.get("nested_offset").is_some() {
        let nested_blocksize = usize_field("nested_blocksize")?;
        if nested_blocksize != NESTED_BLOCK {
            return Err(bad(format!(
                "nested_blocksize is {nested_blocksize}; only {NESTED_BLOCK} is supported"
            )));
        }
        let nested_dtype = str_field("nested_dtype")?;
        if nested_dtype != "float32" {
            return Err(bad(format!(
                "nested_dtype is {nested_dtype:?}; only \"float32\" is supported"
            )));
        }
        // An f32 written as a decimal double: the nearest f32 is the value bitsandbytes held.
        let offset = field("nested_offset")?
            .as_f64()
            .map(|v| v as f32)
            .filter(|v| v.is_finite())
            .ok_or_else(|| bad("\"nested_offset\" is not a finite number".into()))?;
        Some(offset)
    } else {
        None
    };
    Ok(QuantState {
        shape,
        dtype,
        blocksize,
        nested_offset,
    })
}

/// Reads the NF4 weight `weight` (the name of its packed tensor, e.g.
/// `model.layers.0.mlp.down_proj.weight`) and its quant state. Every tensor is checked against the
/// JSON state: dtype, element count, the code book; an error names the file and the tensor.
pub fn read_nf4<S: TensorLookup + ?Sized>(source: &S, weight: &str) -> Result<Nf4Tensor> {
    let state = read_quant_state(source, weight)?;
    let [rows, cols] = state.shape;
    let n = rows * cols;
    let blocks = n.div_ceil(BLOCK);
    let tensors = Tensors { source, weight };

    // X.weight: the packed codes, whatever dtype `quant_storage` gave them.
    let (file, info, bytes) = tensors.get("")?;
    if bytes.len() != n.div_ceil(2) {
        return Err(tensors.bad(
            file,
            "",
            format!(
                "holds {} bytes ({} {:?}), but shape {:?} from the quant state packs into {}",
                bytes.len(),
                info.dtype,
                info.shape,
                state.shape,
                n.div_ceil(2)
            ),
        ));
    }
    let packed = bytes.to_vec();

    // X.weight.quant_map: must be the NF4 code book (the kernels hard-code it).
    let quant_map = tensors.f32s(".quant_map", Some(16))?;
    if let Some(i) = (0..16).find(|&i| quant_map[i].to_bits() != NF4_CODE[i].to_bits()) {
        let (file, _, _) = tensors.get(".quant_map")?;
        return Err(tensors.bad(
            file,
            ".quant_map",
            format!(
                "is not the NF4 code book: entry {i} is {}, NF4 has {}",
                quant_map[i], NF4_CODE[i]
            ),
        ));
    }

    let absmax = match state.nested_offset {
        Some(offset) => {
            let (file, info, codes) = tensors.get(".absmax")?;
            if info.dtype != Dtype::U8 || info.numel() != blocks {
                return Err(tensors.bad(
                    file,
                    ".absmax",
                    format!(
                        "expected U8 [{blocks}] (8-bit codes, one per block of {BLOCK} of {rows}x{cols}), found {} {:?}",
                        info.dtype, info.shape
                    ),
                ));
            }
            let codes = codes.to_vec();
            let nested = tensors.f32s(".nested_absmax", Some(blocks.div_ceil(NESTED_BLOCK)))?;
            let map: [f32; 256] = tensors
                .f32s(".nested_quant_map", Some(256))?
                .try_into()
                .expect("256 values");
            let double = DoubleQuant::from_parts(codes, nested, offset, map).map_err(|e| {
                let (file, _, _) = tensors.get(".nested_absmax").expect("read above");
                tensors.bad(file, ".nested_absmax", inner_message(e))
            })?;
            Absmax::Double(double)
        }
        None => {
            if let Some(file) = source.file_with(&format!("{weight}.nested_absmax")) {
                return Err(tensors.bad(
                    file,
                    ".nested_absmax",
                    "is present, but the quant state has no nested_offset".into(),
                ));
            }
            Absmax::Plain(tensors.f32s(".absmax", Some(blocks))?)
        }
    };
    Nf4Tensor::from_parts(rows, cols, packed, absmax).map_err(|e| {
        let (file, _, _) = tensors.get(".absmax").expect("read above");
        tensors.bad(file, ".absmax", inner_message(e))
    })
}

/// The message of an [`Error::InvalidArgument`] (other errors as displayed).
fn inner_message(e: Error) -> String {
    match e {
        Error::InvalidArgument(m) => m,
        other => other.to_string(),
    }
}

/// The companion tensors of one weight.
struct Tensors<'a, S: ?Sized> {
    source: &'a S,
    weight: &'a str,
}

impl<'a, S: TensorLookup + ?Sized> Tensors<'a, S> {
    fn name(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.weight)
    }

    fn bad(&self, file: &SafetensorsFile, suffix: &str, message: String) -> Error {
        Error::format(
            file.path(),
            format!(
                "tensor {:?} (bitsandbytes NF4): {message}",
                self.name(suffix)
            ),
        )
    }

    /// The file, header entry and bytes of `weight + suffix`.
    fn get(&self, suffix: &str) -> Result<(&'a SafetensorsFile, &'a TensorInfo, &'a [u8])> {
        let name = self.name(suffix);
        let file = self
            .source
            .file_with(&name)
            .ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                path: self.source.describe().to_path_buf(),
            })?;
        let info = file.info(&name).expect("looked up");
        Ok((file, info, file.raw_bytes(&name)?))
    }

    /// `weight + suffix` as F32 values, with `count` of them if given.
    fn f32s(&self, suffix: &str, count: Option<usize>) -> Result<Vec<f32>> {
        let (file, info, _) = self.get(suffix)?;
        if info.dtype != Dtype::F32 || count.is_some_and(|c| info.numel() != c) {
            let want = count.map_or("F32".to_string(), |c| format!("F32 [{c}]"));
            return Err(self.bad(
                file,
                suffix,
                format!("expected {want}, found {} {:?}", info.dtype, info.shape),
            ));
        }
        let values = file.read_f32(&self.name(suffix))?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(self.bad(
                file,
                suffix,
                format!("value {i} is {}, not finite", values[i]),
            ));
        }
        Ok(values)
    }
}
