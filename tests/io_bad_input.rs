//! Every malformed input is rejected with a message naming the file and what is wrong with it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use finetune::io::model_dir::{read_config_json, WeightSource};
use finetune::io::peft::{load_peft_adapter, save_peft_adapter, AdapterModule, PeftAdapterConfig};
use finetune::io::safetensors::{write_safetensors, Dtype, SafetensorsFile};
use finetune::lora::{LoraConfig, TargetModule};
use finetune::Error;

/// A safetensors file: 8-byte little-endian header length, header, data.
fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    path
}

/// Asserts that `err` names `path` and contains every fragment of the expected problem.
fn assert_error(err: Error, path: &Path, fragments: &[&str]) {
    let message = err.to_string();
    assert!(
        message.contains(&path.display().to_string()),
        "message does not name {}: {message}",
        path.display()
    );
    for fragment in fragments {
        assert!(
            message.contains(fragment),
            "message lacks {fragment:?}: {message}"
        );
    }
}

/// Opens a safetensors file built from `header` and `data`, expecting a format error.
fn open_bad(header: &str, data: &[u8], fragments: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "bad.safetensors",
        &safetensors_bytes(header, data),
    );
    let err = SafetensorsFile::open(&path).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err:?}");
    assert_error(err, &path, fragments);
}

fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let list: Vec<(String, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(n, s, v)| (n.to_string(), s.clone(), v.as_slice()))
        .collect();
    write_safetensors(path, &list, Dtype::F32, &BTreeMap::new()).unwrap();
}

#[test]
fn file_shorter_than_eight_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "short.safetensors", &[1, 0, 0]);
    let err = SafetensorsFile::open(&path).unwrap_err();
    assert_error(
        err,
        &path,
        &["3 bytes", "shorter than the 8-byte header length"],
    );
}

#[test]
fn header_length_past_end_of_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let path = write_file(dir.path(), "long.safetensors", &bytes);
    let err = SafetensorsFile::open(&path).unwrap_err();
    assert_error(
        err,
        &path,
        &["header length 1000", "past the end of the file (10 bytes)"],
    );
}

#[test]
fn header_not_json() {
    open_bad("{not json", &[], &["header is not valid JSON", "line 1"]);
}

#[test]
fn header_not_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = 2u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    let path = write_file(dir.path(), "latin.safetensors", &bytes);
    let err = SafetensorsFile::open(&path).unwrap_err();
    assert_error(err, &path, &["header is not valid UTF-8"]);
}

#[test]
fn header_not_an_object() {
    open_bad("[1, 2]", &[], &["header is not a JSON object"]);
}

#[test]
fn entry_missing_field() {
    open_bad(
        r#"{"x":{"dtype":"F32","data_offsets":[0,4]}}"#,
        &[0; 4],
        &["tensor \"x\"", "missing field \"shape\""],
    );
}

#[test]
fn offsets_out_of_range() {
    open_bad(
        r#"{"x":{"dtype":"F32","shape":[25],"data_offsets":[0,100]}}"#,
        &[0; 64],
        &["tensor \"x\": data_offsets [0, 100] end past the data section of 64 bytes"],
    );
}

#[test]
fn offsets_begin_after_end() {
    open_bad(
        r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}"#,
        &[0; 8],
        &["tensor \"x\"", "[8, 4] begin is after end"],
    );
}

#[test]
fn dtype_and_shape_disagree_with_byte_length() {
    open_bad(
        r#"{"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#,
        &[0; 20],
        &[
            "tensor \"x\"",
            "F32 with shape [2, 3] needs 24 bytes",
            "span 20",
        ],
    );
}

#[test]
fn shape_overflowing_address_space() {
    open_bad(
        r#"{"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#,
        &[0; 4],
        &["tensor \"x\"", "overflows"],
    );
}

#[test]
fn overlapping_offsets() {
    open_bad(
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
        &[0; 24],
        &["tensors \"a\" [0, 16] and \"b\" [8, 24] overlap"],
    );
}

#[test]
fn unknown_dtype() {
    open_bad(
        r#"{"x":{"dtype":"Q7","shape":[4],"data_offsets":[0,4]}}"#,
        &[0; 4],
        &["tensor \"x\"", "unknown dtype \"Q7\""],
    );
}

#[test]
fn metadata_with_non_string_value() {
    open_bad(
        r#"{"__metadata__":{"format":1}}"#,
        &[],
        &["__metadata__", "\"format\" must be a string"],
    );
}

#[test]
fn malformed_config_json_reports_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "config.json",
        b"{\n  \"hidden_size\": 64,\n  \"num_layers\" 2\n}\n",
    );
    let err = read_config_json(dir.path()).unwrap_err();
    assert_error(err, &path, &["invalid JSON", "line 3"]);
}

#[test]
fn sharded_index_pointing_to_missing_shard() {
    let dir = tempfile::tempdir().unwrap();
    write_f32(
        &dir.path().join("model-00001-of-00002.safetensors"),
        &[("a", vec![1], vec![1.0])],
    );
    let index = r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#;
    let path = write_file(dir.path(), "model.safetensors.index.json", index.as_bytes());
    let err = WeightSource::open(dir.path()).unwrap_err();
    assert_error(
        err,
        &path,
        &[
            "tensor \"b\"",
            "model-00002-of-00002.safetensors",
            "does not exist",
        ],
    );
}

#[test]
fn sharded_index_naming_tensor_the_shard_lacks() {
    let dir = tempfile::tempdir().unwrap();
    write_f32(
        &dir.path().join("model-00001-of-00001.safetensors"),
        &[("a", vec![1], vec![1.0])],
    );
    let index = r#"{"weight_map": {"a": "model-00001-of-00001.safetensors", "z": "model-00001-of-00001.safetensors"}}"#;
    let path = write_file(dir.path(), "model.safetensors.index.json", index.as_bytes());
    let err = WeightSource::open(dir.path()).unwrap_err();
    assert_error(
        err,
        &path,
        &[
            "tensor \"z\"",
            "model-00001-of-00001.safetensors",
            "does not contain it",
        ],
    );
}

#[test]
fn missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    write_f32(
        &dir.path().join("model.safetensors"),
        &[("a", vec![1], vec![1.0])],
    );
    let source = WeightSource::open(dir.path()).unwrap();
    let err = source.read_f32("model.norm.weight", &[1]).unwrap_err();
    assert!(matches!(err, Error::MissingTensor { .. }), "{err:?}");
    assert_error(err, dir.path(), &["missing tensor \"model.norm.weight\""]);
}

#[test]
fn shape_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_f32(&path, &[("w", vec![2, 3], vec![0.0; 6])]);
    let source = WeightSource::open(dir.path()).unwrap();
    let err = source.read_f32("w", &[3, 2]).unwrap_err();
    assert_error(
        err,
        &path,
        &["tensor \"w\" has shape [2, 3], expected [3, 2]"],
    );
}

#[test]
fn unsupported_dtype_read_as_f32() {
    let dir = tempfile::tempdir().unwrap();
    let header = r#"{"ids":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}}"#;
    let path = write_file(
        dir.path(),
        "model.safetensors",
        &safetensors_bytes(header, &[0; 8]),
    );
    let source = WeightSource::open(dir.path()).unwrap();
    assert_eq!(source.dtype("ids"), Some(Dtype::I32));
    let err = source.read_f32("ids", &[2]).unwrap_err();
    assert_error(err, &path, &["unsupported dtype I32 for tensor \"ids\""]);
}

/// A valid adapter with one q_proj module of rank 2 on layer 0, for the adapter tests to break.
fn valid_adapter(dir: &Path) {
    let lora = LoraConfig {
        rank: 2,
        targets: TargetModule::Q.bit(),
        ..LoraConfig::default()
    };
    let cfg = PeftAdapterConfig::from_lora(&lora, "base");
    let module = AdapterModule {
        layer: 0,
        module: TargetModule::Q,
        a: vec![0.5; 8],
        b: vec![0.25; 8],
        in_features: 4,
        out_features: 4,
    };
    save_peft_adapter(dir, &cfg, &[module]).unwrap();
}

fn adapter_config_error(config: &str, fragments: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    valid_adapter(dir.path());
    let path = write_file(dir.path(), "adapter_config.json", config.as_bytes());
    let err = load_peft_adapter(dir.path()).unwrap_err();
    assert_error(err, &path, fragments);
}

#[test]
fn adapter_config_with_wrong_peft_type() {
    adapter_config_error(
        r#"{"peft_type": "IA3", "r": 2, "target_modules": ["q_proj"]}"#,
        &["field \"peft_type\"", "\"IA3\"", "only LORA"],
    );
}

#[test]
fn adapter_config_without_rank() {
    adapter_config_error(
        r#"{"peft_type": "LORA", "target_modules": ["q_proj"]}"#,
        &["field \"r\": missing"],
    );
}

#[test]
fn adapter_config_with_dora() {
    adapter_config_error(
        r#"{"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "use_dora": true}"#,
        &["field \"use_dora\"", "DoRA"],
    );
}

#[test]
fn adapter_config_with_trained_bias() {
    adapter_config_error(
        r#"{"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "bias": "all"}"#,
        &["field \"bias\"", "\"all\""],
    );
}

#[test]
fn adapter_config_with_unknown_target() {
    adapter_config_error(
        r#"{"peft_type": "LORA", "r": 2, "target_modules": ["q_proj", "lm_head"]}"#,
        &["field \"target_modules\"", "\"lm_head\""],
    );
}

#[test]
fn adapter_rank_disagreeing_with_config() {
    let dir = tempfile::tempdir().unwrap();
    valid_adapter(dir.path());
    write_file(
        dir.path(),
        "adapter_config.json",
        br#"{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}"#,
    );
    let err = load_peft_adapter(dir.path()).unwrap_err();
    assert_error(
        err,
        &dir.path().join("adapter_model.safetensors"),
        &["lora_A.weight\" has shape [2, 4], expected [r = 4, in_features]"],
    );
}

fn adapter_weights_error(tensors: &[(&str, Vec<usize>, Vec<f32>)], fragments: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    valid_adapter(dir.path());
    let path = dir.path().join("adapter_model.safetensors");
    write_f32(&path, tensors);
    let err = load_peft_adapter(dir.path()).unwrap_err();
    assert_error(err, &path, fragments);
}

#[test]
fn adapter_key_without_its_pair() {
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    adapter_weights_error(
        &[(key, vec![2, 4], vec![0.0; 8])],
        &[key, "no matching lora_B"],
    );
}

#[test]
fn adapter_unknown_key() {
    let key = "base_model.model.lm_head.lora_A.weight";
    adapter_weights_error(
        &[(key, vec![2, 4], vec![0.0; 8])],
        &["unexpected tensor", key],
    );
}

#[test]
fn adapter_pickle_weights_only() {
    let dir = tempfile::tempdir().unwrap();
    valid_adapter(dir.path());
    fs::remove_file(dir.path().join("adapter_model.safetensors")).unwrap();
    let path = write_file(dir.path(), "adapter_model.bin", b"pickle");
    let err = load_peft_adapter(dir.path()).unwrap_err();
    assert_error(err, &path, &["only adapter_model.safetensors"]);
}
