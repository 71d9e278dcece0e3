//! bitsandbytes-4bit checkpoints written by hand: raw safetensors entries in the layout of
//! `Linear4bit.state_dict()` (see src/quant/bnb.rs), for reader tests and tiny 4-bit models.

use finetune::quant::{Absmax, Nf4Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// Raw tensors by name: (dtype, shape, bytes).
pub type RawTensors = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

/// Writes a safetensors file from raw tensors.
pub fn write_raw(path: &Path, tensors: &RawTensors) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, (dtype, shape, bytes)) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape,
                               "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend_from_slice(bytes);
    }
    let header = serde_json::Value::Object(header).to_string();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

/// An F32 entry.
pub fn f32_entry(shape: Vec<usize>, values: &[f32]) -> (String, Vec<usize>, Vec<u8>) {
    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    ("F32".into(), shape, bytes)
}

/// The entries bitsandbytes saves for the NF4 weight `weight` (such as
/// `model.layers.0.mlp.up_proj.weight`) quantized to `q`, which was `dtype` before.
pub fn nf4_entries(weight: &str, q: &Nf4Tensor, dtype: &str) -> RawTensors {
    let mut out = RawTensors::new();
    let packed = q.packed().to_vec();
    out.insert(
        weight.to_string(),
        ("U8".into(), vec![packed.len(), 1], packed),
    );
    out.insert(
        format!("{weight}.quant_map"),
        f32_entry(vec![16], &finetune::quant::nf4::NF4_CODE),
    );
    let mut state = serde_json::json!({
        "quant_type": "nf4", "blocksize": 64, "dtype": dtype, "shape": q.shape(),
    });
    match q.absmax() {
        Absmax::Plain(v) => {
            out.insert(format!("{weight}.absmax"), f32_entry(vec![v.len()], v));
        }
        Absmax::Double(d) => {
            out.insert(
                format!("{weight}.absmax"),
                ("U8".into(), vec![d.len()], d.codes().to_vec()),
            );
            let nested = d.nested_absmax();
            out.insert(
                format!("{weight}.nested_absmax"),
                f32_entry(vec![nested.len()], nested),
            );
            out.insert(
                format!("{weight}.nested_quant_map"),
                f32_entry(vec![256], d.map()),
            );
            state["nested_blocksize"] = 256.into();
            state["nested_dtype"] = "float32".into();
            state["nested_offset"] = f64::from(d.offset()).into();
        }
    }
    let json = state.to_string().into_bytes();
    out.insert(
        format!("{weight}.quant_state.bitsandbytes__nf4"),
        ("U8".into(), vec![json.len()], json),
    );
    out
}
