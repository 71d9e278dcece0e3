//! Chat templates: the Jinja source Hugging Face models ship (tokenizer_config.json's
//! `chat_template`, GGUF's `tokenizer.chat_template`), rendered with minijinja and Python-style
//! string methods.

use super::dataset::Message;
use crate::error::{Error, Result};
use minijinja::{context, Environment, ErrorKind};

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(message: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the strings templates see under those names.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::InvalidArgument(format!("chat template does not compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's reply
    /// would begin.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("added in new");
        tmpl.render(context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| Error::InvalidArgument(format!("chat template failed: {e}")))
    }

    /// The conversation's text and the byte ranges of each assistant turn in it (the reply and
    /// whatever the template closes the turn with, such as an end-of-turn token).
    ///
    /// Turn i's range is `render(messages[..=i])` minus its prefix `render(messages[..i], true)`;
    /// a template for which that prefix does not hold is reported, not guessed around.
    pub fn render_with_spans(
        &self,
        messages: &[Message],
    ) -> Result<(String, Vec<std::ops::Range<usize>>)> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let prefix = self.render(&messages[..i], true)?;
            let upto = self.render(&messages[..=i], false)?;
            if !upto.starts_with(&prefix) || !full.starts_with(&upto) {
                return Err(Error::InvalidArgument(format!(
                    "chat template is not prefix-stable at message {i}: cannot tell which tokens are the assistant's"
                )));
            }
            spans.push(prefix.len()..upto.len());
        }
        Ok((full, spans))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2's / Qwen's ChatML template, in the form they ship.
    pub const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msgs() -> Vec<Message> {
        [
            ("user", "Hi"),
            ("assistant", "Hello!"),
            ("user", "Name?"),
            ("assistant", "Bran."),
        ]
        .iter()
        .map(|(r, c)| Message {
            role: r.to_string(),
            content: c.to_string(),
        })
        .collect()
    }

    #[test]
    fn chatml_spans_cover_replies_and_end_tokens() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let (text, spans) = t.render_with_spans(&msgs()).unwrap();
        let parts: Vec<&str> = spans.iter().map(|r| &text[r.clone()]).collect();
        assert_eq!(parts, ["Hello!<|im_end|>\n", "Bran.<|im_end|>\n"]);
        assert!(text.starts_with("<|im_start|>system\nYou are a helpful AI assistant."));
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let t = ChatTemplate::new(
            "{% if messages[0].role == 'system' %}{{ raise_exception('no system') }}{% endif %}{{ messages[0].content.strip() }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(t.render(&msgs()[..1], false).unwrap(), "Hi");
        let sys = vec![Message {
            role: "system".into(),
            content: "x".into(),
        }];
        assert!(t
            .render(&sys, false)
            .unwrap_err()
            .to_string()
            .contains("no system"));
    }
}
