//! From records to token ids with a loss mask, through the model's tokenizer and chat template.

use super::dataset::{Example, Message};
use super::template::ChatTemplate;
use crate::error::{Error, Result};
use serde_json::Value;
use std::ops::Range;
use std::path::Path;
use tokenizers::Tokenizer;

/// Which tokens carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossOn {
    /// Only what the model should produce: assistant turns, alpaca outputs, completions (and
    /// every token of plain text).
    Completions,
    /// Every token.
    All,
}

/// Token ids and, for each, whether predicting it is trained (`target[t]` concerns the label of
/// position t−1).
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<i32>,
    pub target: Vec<bool>,
}

/// A special token: id and text.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecialToken {
    pub id: u32,
    pub text: String,
}

/// A token's `(start, end)` byte offsets in the text it came from.
type ByteSpan = (usize, usize);

fn one_span(r: Range<usize>) -> Vec<Range<usize>> {
    std::iter::once(r).collect()
}

/// A tokenizer with what a model's files say about using it.
pub struct TextCodec {
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub bos: Option<SpecialToken>,
    pub eos: Option<SpecialToken>,
    /// Whether plain text starts with BOS.
    pub add_bos: bool,
}

/// A special token of tokenizer_config.json: a string or `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// tokenizer_config.json's `chat_template`: a string, or a list of named templates ("default").
fn template_source(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(String::from),
        _ => None,
    }
}

impl TextCodec {
    /// Assembles a codec; the special tokens are looked up by text in the vocabulary.
    pub fn new(
        tokenizer: Tokenizer,
        template: Option<&str>,
        bos: Option<&str>,
        eos: Option<&str>,
        add_bos: bool,
    ) -> Result<Self> {
        let special = |text: Option<&str>| {
            text.and_then(|t| {
                tokenizer.token_to_id(t).map(|id| SpecialToken {
                    id,
                    text: t.to_string(),
                })
            })
        };
        let (bos, eos) = (special(bos), special(eos));
        let template = template
            .map(|src| {
                let text = |t: &Option<SpecialToken>| {
                    t.as_ref().map(|t| t.text.clone()).unwrap_or_default()
                };
                ChatTemplate::new(src, &text(&bos), &text(&eos))
            })
            .transpose()?;
        Ok(TextCodec {
            tokenizer,
            template,
            bos,
            eos,
            add_bos,
        })
    }

    /// Reads `tokenizer.json` and `tokenizer_config.json` (if present) from a model directory;
    /// `None` when the directory has no tokenizer.json.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Ok(None);
        }
        let tokenizer =
            Tokenizer::from_file(&tok_path).map_err(|e| Error::format(&tok_path, e.to_string()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.is_file() {
            crate::io::json::read_json(&cfg_path)?
        } else {
            Value::Null
        };
        let add_bos = cfg
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let (bos, eos) = (
            token_text(cfg.get("bos_token")),
            token_text(cfg.get("eos_token")),
        );
        let template = template_source(cfg.get("chat_template"));
        Self::new(
            tokenizer,
            template.as_deref(),
            bos.as_deref(),
            eos.as_deref(),
            add_bos,
        )
        .map(Some)
    }

    /// Token ids and byte offsets of `text`; special tokens written in the text are recognised.
    fn tokenize(&self, text: &str) -> Result<(Vec<i32>, Vec<ByteSpan>)> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::InvalidArgument(format!("tokenization failed: {e}")))?;
        Ok((
            enc.get_ids().iter().map(|&i| i as i32).collect(),
            enc.get_offsets().to_vec(),
        ))
    }

    /// Token ids of `text` (with BOS first when the model wants it).
    pub fn encode_text(&self, text: &str) -> Result<Vec<i32>> {
        let mut ids = self.bos_prefix();
        ids.extend(self.tokenize(text)?.0);
        Ok(ids)
    }

    fn bos_prefix(&self) -> Vec<i32> {
        match (&self.bos, self.add_bos) {
            (Some(b), true) => vec![b.id as i32],
            _ => Vec::new(),
        }
    }

    /// The text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[i32]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| Error::InvalidArgument(format!("decoding failed: {e}")))
    }

    /// The token ids a chat model continues from to answer `messages`.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<i32>> {
        let template = self
            .template
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("the model has no chat template".into()))?;
        Ok(self.tokenize(&template.render(messages, true)?)?.0)
    }

    /// Text and the byte ranges whose tokens are trained.
    fn text_and_spans(
        &self,
        ex: &Example,
        loss: LossOn,
    ) -> Result<(String, Vec<Range<usize>>, bool)> {
        let chat = |messages: &[Message]| -> Result<(String, Vec<Range<usize>>, bool)> {
            let t = self.template.as_ref().expect("checked by caller");
            let (text, spans) = t.render_with_spans(messages)?;
            Ok((text, spans, false))
        };
        let (text, spans, plain) = match ex {
            Example::Text(s) => (s.clone(), one_span(0..s.len()), true),
            Example::Chat(m) if self.template.is_some() => chat(m)?,
            Example::PromptCompletion { prompt, completion } if self.template.is_some() => {
                chat(&[
                    Message {
                        role: "user".into(),
                        content: prompt.clone(),
                    },
                    Message {
                        role: "assistant".into(),
                        content: completion.clone(),
                    },
                ])?
            }
            Example::PromptCompletion { prompt, completion } => {
                let text = format!("{prompt}\n{completion}");
                (
                    text,
                    one_span(prompt.len() + 1..prompt.len() + 1 + completion.len()),
                    true,
                )
            }
            Example::Chat(_) => {
                return Err(Error::InvalidArgument(
                    "chat records need a model with a chat template".into(),
                ))
            }
        };
        let spans = match loss {
            LossOn::All => one_span(0..text.len()),
            LossOn::Completions => spans,
        };
        Ok((text, spans, plain))
    }

    /// Tokenizes one record and marks the tokens to learn: a token is a target when its first
    /// byte lies inside a trained span. Plain (template-less) text gets BOS first if the model
    /// wants it and EOS last, so the model learns where text ends.
    pub fn encode_example(&self, ex: &Example, loss: LossOn) -> Result<Encoded> {
        let (text, spans, plain) = self.text_and_spans(ex, loss)?;
        let (ids, offsets) = self.tokenize(&text)?;
        let mut target: Vec<bool> = offsets
            .iter()
            .map(|&(start, _)| spans.iter().any(|s| s.contains(&start)))
            .collect();
        let mut all_ids = ids;
        if plain {
            let bos = self.bos_prefix();
            target.splice(0..0, bos.iter().map(|_| false));
            all_ids.splice(0..0, bos);
            if let Some(eos) = &self.eos {
                all_ids.push(eos.id as i32);
                target.push(true);
            }
        }
        Ok(Encoded {
            ids: all_ids,
            target,
        })
    }
}
