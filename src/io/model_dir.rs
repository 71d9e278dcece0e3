//! The weights of a Hugging Face model directory, whichever way they are split across files.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::json::read_json;
use crate::io::safetensors::{Dtype, SafetensorsFile, TensorInfo};
use crate::model::weights::{TensorSpec, TensorValues};
use crate::quant::bnb::{is_bnb_4bit, read_nf4, TensorLookup};

/// The single-file weights name.
const SINGLE_FILE: &str = "model.safetensors";
/// The index of sharded weights.
const INDEX_FILE: &str = "model.safetensors.index.json";

/// Every tensor of a model, looked up by name across one or more safetensors files.
///
/// [`WeightSource::open`] accepts, in order of preference: a path to a single safetensors file; a
/// directory holding `model.safetensors`; a directory holding `model.safetensors.index.json`
/// whose `weight_map` sends each tensor to a shard; or a directory whose `*.safetensors` files
/// together hold the weights.
#[derive(Debug)]
pub struct WeightSource {
    path: PathBuf,
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    locations: BTreeMap<String, usize>,
}

impl WeightSource {
    /// Opens and validates every weight file under `path` (a directory or a single file).
    pub fn open(path: &Path) -> Result<Self> {
        let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_file() {
            let dir = match path.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            return Self::from_files(path, dir, vec![SafetensorsFile::open(path)?]);
        }
        let single = path.join(SINGLE_FILE);
        let index = path.join(INDEX_FILE);
        if single.is_file() {
            Self::from_files(path, path, vec![SafetensorsFile::open(&single)?])
        } else if index.is_file() {
            Self::from_index(path, &index)
        } else {
            Self::from_files(path, path, open_all_in(path)?)
        }
    }

    /// Indexes every tensor of `files`; a name held by two files is an error.
    fn from_files(path: &Path, dir: &Path, files: Vec<SafetensorsFile>) -> Result<Self> {
        let mut locations = BTreeMap::new();
        for (i, file) in files.iter().enumerate() {
            for name in file.names() {
                if let Some(&other) = locations.get(name) {
                    let other: &SafetensorsFile = &files[other];
                    return Err(Error::format(
                        dir,
                        format!(
                            "tensor {name:?} is in both {} and {}",
                            other.path().display(),
                            file.path().display()
                        ),
                    ));
                }
                locations.insert(name.to_string(), i);
            }
        }
        Ok(WeightSource {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            files,
            locations,
        })
    }

    /// Follows the index's `weight_map`, opening each shard once and checking that it holds the
    /// tensors mapped to it.
    fn from_index(dir: &Path, index: &Path) -> Result<Self> {
        let json = read_json(index)?;
        let weight_map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::format(index, "missing \"weight_map\" object"))?;
        let mut files = Vec::new();
        let mut shard_ids: BTreeMap<&str, usize> = BTreeMap::new();
        let mut locations = BTreeMap::new();
        for (name, shard) in weight_map {
            let shard = shard.as_str().ok_or_else(|| {
                Error::format(
                    index,
                    format!("weight_map entry for tensor {name:?} is not a file name: {shard}"),
                )
            })?;
            let id = match shard_ids.get(shard) {
                Some(&id) => id,
                None => {
                    files.push(open_shard(dir, index, name, shard)?);
                    shard_ids.insert(shard, files.len() - 1);
                    files.len() - 1
                }
            };
            if files[id].info(name).is_none() {
                return Err(Error::format(
                    index,
                    format!("weight_map puts tensor {name:?} in shard {shard:?}, which does not contain it"),
                ));
            }
            locations.insert(name.clone(), id);
        }
        Ok(WeightSource {
            path: dir.to_path_buf(),
            dir: dir.to_path_buf(),
            files,
            locations,
        })
    }

    /// The directory holding the weights (the parent when a single file was opened).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a tensor called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.locations.contains_key(name)
    }

    /// All tensor names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.locations.keys().map(String::as_str)
    }

    /// The shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.locate(name).map(|(_, info)| info.shape.as_slice())
    }

    /// The stored element type of `name`, if present.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.locate(name).map(|(_, info)| info.dtype)
    }

    /// Reads `name` as f32 after checking that its shape is `expected_shape`.
    pub fn read_f32(&self, name: &str, expected_shape: &[usize]) -> Result<Vec<f32>> {
        let (file, info) = self.locate(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: self.path.clone(),
        })?;
        if info.shape != expected_shape {
            return Err(Error::format(
                file.path(),
                format!(
                    "tensor {name:?} has shape {:?}, expected {expected_shape:?}",
                    info.shape
                ),
            ));
        }
        file.read_f32(name)
    }

    /// Reads the tensor of `spec`: a bitsandbytes-4bit weight (its packed codes and quant state)
    /// as NF4, copying only the packed bytes, anything else as f32 of the spec's shape.
    pub fn read_tensor(&self, spec: &TensorSpec) -> Result<TensorValues> {
        if is_bnb_4bit(self, &spec.name) {
            read_nf4(self, &spec.name).map(TensorValues::Nf4)
        } else {
            self.read_f32(&spec.name, &spec.file_shape())
                .map(TensorValues::F32)
        }
    }

    fn locate(&self, name: &str) -> Option<(&SafetensorsFile, &TensorInfo)> {
        let file = &self.files[*self.locations.get(name)?];
        file.info(name).map(|info| (file, info))
    }
}

impl TensorLookup for WeightSource {
    fn file_with(&self, name: &str) -> Option<&SafetensorsFile> {
        self.locate(name).map(|(file, _)| file)
    }

    fn describe(&self) -> &Path {
        &self.path
    }
}

/// Opens the shard an index names, which must be a plain file in the index's directory.
fn open_shard(dir: &Path, index: &Path, name: &str, shard: &str) -> Result<SafetensorsFile> {
    let path = dir.join(shard);
    if Path::new(shard).file_name() != Some(shard.as_ref()) || !path.is_file() {
        return Err(Error::format(
            index,
            format!(
                "weight_map puts tensor {name:?} in shard {shard:?}, but {} does not exist",
                path.display()
            ),
        ));
    }
    SafetensorsFile::open(&path)
}

/// Opens every `*.safetensors` file in `dir`, in name order; at least one must exist.
fn open_all_in(dir: &Path) -> Result<Vec<SafetensorsFile>> {
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.extension().is_some_and(|ext| ext == "safetensors") && path.is_file() {
            paths.push(path);
        }
    }
    if paths.is_empty() {
        return Err(Error::format(
            dir,
            format!("no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors file"),
        ));
    }
    paths.sort();
    paths.iter().map(|p| SafetensorsFile::open(p)).collect()
}

/// Reads `dir/config.json`. Malformed JSON is an [`Error::Format`] giving the line and column.
pub fn read_config_json(dir: &Path) -> Result<Value> {
    read_json(&dir.join("config.json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::safetensors::write_safetensors;

    fn write(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let list: Vec<(String, Vec<usize>, &[f32])> = tensors
            .iter()
            .map(|(n, s, v)| (n.to_string(), s.clone(), v.as_slice()))
            .collect();
        write_safetensors(path, &list, Dtype::F32, &BTreeMap::new()).unwrap();
    }

    #[test]
    fn single_file_directory_and_direct_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(SINGLE_FILE);
        write(&file, &[("w", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0])]);
        for path in [dir.path(), file.as_path()] {
            let source = WeightSource::open(path).unwrap();
            assert_eq!(source.dir(), dir.path());
            assert!(source.contains("w") && !source.contains("x"));
            assert_eq!(source.shape("w"), Some(&[2, 2][..]));
            assert_eq!(source.dtype("w"), Some(Dtype::F32));
            assert_eq!(source.read_f32("w", &[2, 2]).unwrap(), [1.0, 2.0, 3.0, 4.0]);
        }
    }

    #[test]
    fn sharded_index_maps_tensors_to_shards() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("model-00001-of-00002.safetensors"),
            &[("a", vec![1], vec![1.0]), ("b", vec![2], vec![2.0, 3.0])],
        );
        write(
            &dir.path().join("model-00002-of-00002.safetensors"),
            &[("c", vec![1, 1], vec![4.0])],
        );
        let index = serde_json::json!({
            "metadata": {"total_size": 16},
            "weight_map": {
                "a": "model-00001-of-00002.safetensors",
                "b": "model-00001-of-00002.safetensors",
                "c": "model-00002-of-00002.safetensors"
            }
        });
        fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
        let source = WeightSource::open(dir.path()).unwrap();
        assert_eq!(source.names().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(source.files.len(), 2);
        assert_eq!(source.read_f32("b", &[2]).unwrap(), [2.0, 3.0]);
        assert_eq!(source.read_f32("c", &[1, 1]).unwrap(), [4.0]);
    }

    #[test]
    fn directory_of_unindexed_files() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("one.safetensors"),
            &[("a", vec![1], vec![1.0])],
        );
        write(
            &dir.path().join("two.safetensors"),
            &[("b", vec![1], vec![2.0])],
        );
        let source = WeightSource::open(dir.path()).unwrap();
        assert_eq!(source.names().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(source.read_f32("b", &[1]).unwrap(), [2.0]);

        write(
            &dir.path().join("three.safetensors"),
            &[("a", vec![1], vec![3.0])],
        );
        let message = WeightSource::open(dir.path()).unwrap_err().to_string();
        assert!(message.contains("tensor \"a\" is in both"), "{message}");
    }

    #[test]
    fn empty_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let message = WeightSource::open(dir.path()).unwrap_err().to_string();
        assert!(message.contains("no model.safetensors"), "{message}");
    }

    #[test]
    fn reads_config_json() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("config.json"), r#"{"hidden_size": 64}"#).unwrap();
        let config = read_config_json(dir.path()).unwrap();
        assert_eq!(config["hidden_size"], 64);
    }
}
