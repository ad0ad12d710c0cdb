//! Chat templates: Hugging Face Jinja `chat_template`s rendered with minijinja.
//!
//! Invariants:
//! - A [`ChatTemplate`] always holds a template that compiled: syntax errors are reported by
//!   [`ChatTemplate::new`], never at render time.
//! - Rendering follows transformers' `apply_chat_template`: Jinja `trim_blocks` and `lstrip_blocks`
//!   are on, nothing is HTML-escaped, and the context holds `messages`, `bos_token`, `eos_token`
//!   and `add_generation_prompt`. Python string/dict methods (`.strip()`, `.get()`, ...) work through
//!   minijinja-contrib's pycompat callback, and `raise_exception(msg)` fails the render with `msg`.
//! - The rendered text already contains whatever special tokens the template writes (typically BOS),
//!   so callers tokenize it *without* adding special tokens.
//! - There is no built-in fallback template: a model without one has no [`ChatTemplate`], and callers
//!   must say so rather than guess a format.

use anyhow::{Context, Result};
use minijinja::{AutoEscape, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

/// Name under which the single template is stored in the environment.
const TEMPLATE_NAME: &str = "chat_template";

/// One turn of a conversation, as Hugging Face chat templates expect it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (templates may accept others, e.g. `tool`).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// Builds a message from a role and its content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template together with the special-token strings it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` (a Jinja chat template). `bos_token`/`eos_token` are the texts the template sees
    /// as `bos_token`/`eos_token` (empty when the model has none). Fails on a template syntax error.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // transformers compiles chat templates with trim_blocks and lstrip_blocks; whitespace must match.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Templates emit raw special-token markup such as `<|eot_id|>`: never escape.
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| anyhow::anyhow!("chat template does not compile: {e:#}"))?;
        Ok(ChatTemplate {
            env,
            source: source.to_owned(),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// The Jinja source the template was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` to the prompt text. With `add_generation_prompt` the template appends the
    /// header that opens the assistant's turn. Errors (including `raise_exception` calls) are returned,
    /// never panicked on.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .context("chat template missing from its environment")?;
        template
            .render(minijinja::context! {
                messages => messages,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
                add_generation_prompt => add_generation_prompt,
            })
            .map_err(|e| anyhow::anyhow!("chat template failed to render: {e:#}"))
    }

    /// The text the template sees as `bos_token`.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The text the template sees as `eos_token`.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// `raise_exception(message)`: how Hugging Face templates reject a conversation they cannot format.
fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BitNet b1.58 2B-4T's template, as in `tests/fixtures/tiny-packed/tokenizer_config.json`.
    const BITNET_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}";

    fn fixtures_dir() -> std::path::PathBuf {
        std::env::var_os("TERN_FIXTURES")
            .map(Into::into)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
            })
    }

    #[test]
    fn bitnet_system_user_prompt() {
        let t = ChatTemplate::new(BITNET_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let messages = [
            ChatMessage::new("system", "You are a helpful assistant."),
            ChatMessage::new("user", "What is 2 + 2?"),
        ];
        assert_eq!(
            t.render(&messages, true).unwrap(),
            "<|begin_of_text|>System: You are a helpful assistant.<|eot_id|>User: What is 2 + 2?<|eot_id|>Assistant: "
        );
        assert_eq!(
            t.render(&messages, false).unwrap(),
            "<|begin_of_text|>System: You are a helpful assistant.<|eot_id|>User: What is 2 + 2?<|eot_id|>"
        );
    }

    #[test]
    fn fixture_case_5_renders_golden_text() {
        let dir = fixtures_dir().join("tiny-packed");
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("tokenizer_config.json")).unwrap())
                .unwrap();
        let golden: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap();
        let case = &golden["tokenization"][4];
        let messages: Vec<ChatMessage> =
            serde_json::from_value(case["chat_messages"].clone()).unwrap();
        let t = ChatTemplate::new(
            config["chat_template"].as_str().unwrap(),
            config["bos_token"].as_str().unwrap(),
            config["eos_token"].as_str().unwrap(),
        )
        .unwrap();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(
            t.render(&messages, add).unwrap(),
            case["text"].as_str().unwrap()
        );
    }

    #[test]
    fn syntax_error_is_an_error() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }", "", "").unwrap_err();
        assert!(format!("{err:#}").contains("does not compile"), "{err:#}");
        assert!(ChatTemplate::new("{% if %}", "", "").is_err());
    }

    #[test]
    fn raise_exception_fails_the_render() {
        let src = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{{ m.content }}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "hi")], false).unwrap(),
            "hi"
        );
        let err = t
            .render(&[ChatMessage::new("system", "x")], false)
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("Only user and assistant roles are supported!"),
            "{err:#}"
        );
    }

    #[test]
    fn llama3_style_template_with_python_methods() {
        // Llama 3.1 Instruct's layout (whitespace-controlled block tags on their own lines), using
        // `.strip()` as many community templates do.
        let src = r#"{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'].strip() + eos_token }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;
        let t = ChatTemplate::new(src, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let out = t
            .render(
                &[
                    ChatMessage::new("system", "  Be brief. "),
                    ChatMessage::new("user", "\nHi!\n"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let err = t
            .render(&[ChatMessage::new("tool", "x")], false)
            .unwrap_err();
        assert!(format!("{err:#}").contains("unknown role tool"), "{err:#}");
    }

    #[test]
    fn block_whitespace_matches_transformers() {
        // transformers uses trim_blocks + lstrip_blocks: the newline after a block tag and the
        // indentation before one are dropped.
        let t = ChatTemplate::new("{% if true %}\n  x\n  {% endif %}\n", "", "").unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "  x\n");
    }
}
