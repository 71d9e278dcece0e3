//! Training records from a JSONL file (one JSON object a line) or a JSON array, in four shapes:
//!
//! | shape    | fields                                        | loss (by default)   |
//! |----------|-----------------------------------------------|---------------------|
//! | text     | `text`                                        | every token         |
//! | alpaca   | `instruction`, optional `input`, `output`     | the output          |
//! | chat     | `messages`: [{`role`, `content`}]             | assistant turns     |
//! | ShareGPT | `conversations`: [{`from`, `value`}]          | assistant turns     |
//!
//! `prompt` + `completion` records are read like alpaca.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Message {
    /// "system", "user" or "assistant".
    pub role: String,
    pub content: String,
}

/// One training record.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// Plain text to continue.
    Text(String),
    /// A prompt and the completion to learn.
    PromptCompletion { prompt: String, completion: String },
    /// A conversation; assistant turns are learned.
    Chat(Vec<Message>),
}

/// What to do with a record that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRecords {
    /// Stop with an error naming the file and line.
    Fail,
    /// Leave it out and count it.
    Skip,
}

/// A record that was left out, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct SkippedRecord {
    pub line: usize,
    pub reason: String,
}

/// The records of a dataset file.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub examples: Vec<Example>,
    /// The line (or array position) of each example, for messages.
    pub lines: Vec<usize>,
    pub skipped: Vec<SkippedRecord>,
}

fn string_field(
    obj: &Map<String, Value>,
    key: &str,
) -> std::result::Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("field \"{key}\" must be a string, got {other}")),
    }
}

fn required(obj: &Map<String, Value>, key: &str) -> std::result::Result<String, String> {
    string_field(obj, key)?.ok_or_else(|| format!("missing field \"{key}\""))
}

fn normalise_role(role: &str) -> std::result::Result<&'static str, String> {
    match role {
        "system" => Ok("system"),
        "user" | "human" => Ok("user"),
        "assistant" | "gpt" | "model" => Ok("assistant"),
        other => Err(format!(
            "unknown role {other:?} (expected system, user or assistant)"
        )),
    }
}

fn turns(
    list: &Value,
    key: &str,
    role_key: &str,
    text_key: &str,
) -> std::result::Result<Vec<Message>, String> {
    let items = list
        .as_array()
        .ok_or_else(|| format!("field \"{key}\" must be a list"))?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let obj = item
            .as_object()
            .ok_or_else(|| format!("{key}[{i}] must be an object"))?;
        let role = required(obj, role_key).map_err(|e| format!("{key}[{i}]: {e}"))?;
        let content = required(obj, text_key).map_err(|e| format!("{key}[{i}]: {e}"))?;
        let role = normalise_role(&role).map_err(|e| format!("{key}[{i}]: {e}"))?;
        out.push(Message {
            role: role.into(),
            content,
        });
    }
    if !out.iter().any(|m| m.role == "assistant") {
        return Err(format!("field \"{key}\" has no assistant turn to learn"));
    }
    Ok(out)
}

/// Interprets one JSON record; the error says what is wrong with it (without the location).
pub fn parse_record(v: &Value) -> std::result::Result<Example, String> {
    let obj = v.as_object().ok_or("a record must be a JSON object")?;
    if let Some(m) = obj.get("messages") {
        return turns(m, "messages", "role", "content").map(Example::Chat);
    }
    if let Some(c) = obj.get("conversations") {
        return turns(c, "conversations", "from", "value").map(Example::Chat);
    }
    if obj.contains_key("instruction") {
        let instruction = required(obj, "instruction")?;
        let prompt = match string_field(obj, "input")? {
            Some(input) if !input.trim().is_empty() => format!("{instruction}\n\n{input}"),
            _ => instruction,
        };
        return Ok(Example::PromptCompletion {
            prompt,
            completion: required(obj, "output")?,
        });
    }
    if obj.contains_key("prompt") {
        return Ok(Example::PromptCompletion {
            prompt: required(obj, "prompt")?,
            completion: required(obj, "completion")?,
        });
    }
    if obj.contains_key("text") {
        return Ok(Example::Text(required(obj, "text")?));
    }
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    Err(format!(
        "unrecognised record with fields {keys:?} (expected text; instruction/input/output; prompt/completion; messages; or conversations)"
    ))
}

impl Dataset {
    /// Reads `path`: a JSON array if its first non-blank character is `[`, JSONL otherwise.
    pub fn read(path: &Path, bad: BadRecords) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut ds = Dataset {
            path: path.to_path_buf(),
            examples: Vec::new(),
            lines: Vec::new(),
            skipped: Vec::new(),
        };
        let mut take = |line: usize, parsed: std::result::Result<Example, String>| -> Result<()> {
            match (parsed, bad) {
                (Ok(ex), _) => {
                    ds.examples.push(ex);
                    ds.lines.push(line);
                }
                (Err(reason), BadRecords::Skip) => ds.skipped.push(SkippedRecord { line, reason }),
                (Err(reason), BadRecords::Fail) => {
                    return Err(Error::format(path, format!("line {line}: {reason}")))
                }
            }
            Ok(())
        };
        if text.trim_start().starts_with('[') {
            let all: Vec<Value> = serde_json::from_str(&text).map_err(|e| {
                Error::format(path, format!("line {}: invalid JSON array: {e}", e.line()))
            })?;
            // Elements of an array are located by their 1-based position, which the message names.
            for (i, v) in all.iter().enumerate() {
                take(
                    i + 1,
                    parse_record(v).map_err(|e| format!("(array element {}) {e}", i + 1)),
                )?;
            }
        } else {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let parsed = serde_json::from_str::<Value>(line)
                    .map_err(|e| format!("invalid JSON at column {}: {e}", e.column()))
                    .and_then(|v| parse_record(&v));
                take(i + 1, parsed)?;
            }
        }
        if ds.examples.is_empty() {
            return Err(Error::format(path, "no usable record"));
        }
        Ok(ds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> std::result::Result<Example, String> {
        parse_record(&serde_json::from_str(s).unwrap())
    }

    #[test]
    fn every_shape_is_recognised() {
        assert_eq!(parse(r#"{"text":"hi"}"#), Ok(Example::Text("hi".into())));
        assert_eq!(
            parse(r#"{"instruction":"Add","input":"1 1","output":"2"}"#),
            Ok(Example::PromptCompletion {
                prompt: "Add\n\n1 1".into(),
                completion: "2".into()
            })
        );
        assert_eq!(
            parse(r#"{"instruction":"Say hi","input":"","output":"hi"}"#),
            Ok(Example::PromptCompletion {
                prompt: "Say hi".into(),
                completion: "hi".into()
            })
        );
        let chat = parse(
            r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#,
        )
        .unwrap();
        let sharegpt =
            parse(r#"{"conversations":[{"from":"human","value":"a"},{"from":"gpt","value":"b"}]}"#)
                .unwrap();
        assert_eq!(chat, sharegpt);
    }

    #[test]
    fn bad_records_say_why() {
        assert!(parse(r#"{"foo":1}"#).unwrap_err().contains("\"foo\""));
        assert!(parse(r#"{"text":3}"#)
            .unwrap_err()
            .contains("must be a string"));
        assert!(parse(r#"{"messages":[{"role":"user","content":"a"}]}"#)
            .unwrap_err()
            .contains("no assistant"));
        assert!(parse(r#"{"messages":[{"role":"robot","content":"a"}]}"#)
            .unwrap_err()
            .contains("robot"));
    }
}
