//! Reading JSON files with errors that name the file and the position of the problem.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// Reads and parses the JSON file at `path`. Malformed JSON is an [`Error::Format`] naming the
/// file, with serde_json's description of the problem and its line and column.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    // serde_json's message ends with "at line L column C".
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}
