//! The model's own chat template (GGUF `tokenizer.chat_template`, or `chat_template` in a Hugging
//! Face `tokenizer_config.json`), rendered with minijinja the way `transformers` renders it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};
use serde_json::json;

use crate::client_text::ClientText;
use crate::tool_calls::ToolCallFormat;
use crate::{ModelError, ModelFile, TextTokenizer};

/// One turn of a conversation, as templates read it (`transformers`' message dicts).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// The functions an assistant turn called.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Which call a `tool` turn answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The function a `tool` turn speaks for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A function call of an assistant turn. Templates see OpenAI's shape, `{"id", "type":
/// "function", "function": {"name", "arguments"}}`, with `arguments` an object (as
/// `transformers` users pass it) rather than the API's JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: serde_json::Value,
}

impl Serialize for ToolCall {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut call = serializer.serialize_struct("ToolCall", 3)?;
        call.serialize_field("id", &self.id)?;
        call.serialize_field("type", "function")?;
        call.serialize_field(
            "function",
            &json!({"name": self.name, "arguments": self.arguments}),
        )?;
        call.end()
    }
}

/// A function the model may call, rendered as OpenAI's `{"type": "function", "function": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// The arguments' JSON Schema.
    pub parameters: serde_json::Value,
}

impl Serialize for Tool {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut function = serde_json::Map::new();
        function.insert("name".into(), self.name.clone().into());
        if let Some(d) = &self.description {
            function.insert("description".into(), d.clone().into());
        }
        function.insert("parameters".into(), self.parameters.clone());
        json!({"type": "function", "function": function}).serialize(serializer)
    }
}

/// A compiled chat template and the special-token texts it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// How the model writes a function call, for a template that takes `tools`.
    tool_format: Option<Result<ToolCallFormat, String>>,
}

const TEMPLATE_NAME: &str = "chat";

/// A chat template as a model's files carry it, with the special-token texts it may refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplateSource {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatTemplate {
    /// The model's template (read when the model was opened), compiled; `None` when its files
    /// carry none.
    pub fn load(model: &ModelFile) -> Result<Option<Self>, ModelError> {
        model
            .chat_template
            .as_ref()
            .map(|t| {
                Self::new(
                    &model.path,
                    t.source.clone(),
                    t.bos_token.clone(),
                    t.eos_token.clone(),
                )
            })
            .transpose()
    }

    /// Compiles `source`; `path` names the model in errors.
    pub fn new(
        path: &Path,
        source: String,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        // Hugging Face templates call Python string methods (`.strip()`, `.startswith()` ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, message))
            },
        );
        let tool_format = ToolCallFormat::of_template(&source);
        env.add_filter("tojson", python_tojson);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| ModelError::invalid(path, format!("chat template: {e}")))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
            tool_format,
        })
    }

    /// How the model writes function calls; `None` when its template takes no `tools`, an error
    /// when strata cannot read the syntax it teaches.
    pub fn tool_format(&self) -> Option<Result<ToolCallFormat, String>> {
        self.tool_format.clone()
    }

    /// The prompt for `messages`, offering `tools` (none: the template is not told of any),
    /// ending where the assistant's reply begins. A template that refuses the conversation (e.g.
    /// roles out of order) says why in the error.
    pub fn render(&self, messages: &[ChatMessage], tools: &[Tool]) -> Result<String, String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| e.to_string())?;
        template
            .render(context! {
                messages => messages,
                tools => (!tools.is_empty()).then_some(tools),
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("refused").to_string(),
                _ => format!("the model's chat template failed: {e}"),
            })
    }
}

/// `transformers`' `tojson` filter: Python's `json.dumps(x, ensure_ascii=False)`, so `", "` and
/// `": "` between items (minijinja's own writes compact JSON with HTML escapes, and tools and call
/// arguments would reach the model spelled differently from how it was trained), or indented by
/// `indent` spaces.
fn python_tojson(
    value: minijinja::Value,
    kwargs: minijinja::value::Kwargs,
) -> Result<minijinja::Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // `separators` and `sort_keys` are not read by the templates strata knows.
    let _: Option<minijinja::Value> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_python_json(&json, indent, 0, &mut out);
    Ok(minijinja::Value::from_safe_string(out))
}

fn write_python_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let (comma, colon) = if indent.is_some() {
        (",", ": ")
    } else {
        (", ", ": ")
    };
    match v {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(comma);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(comma);
                }
                newline(out, depth + 1);
                out.push_str(&J::String(k.clone()).to_string());
                out.push_str(colon);
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Why a conversation did not become a prompt.
#[derive(Debug, thiserror::Error)]
pub enum ChatPromptError {
    /// The messages cannot be a prompt: a field is not acceptable (an unknown role), the template
    /// refused them, the prompt is too long, or client text could not be kept text.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Tokenizer(#[from] ModelError),
}

impl ChatTemplate {
    /// The prompt ids of `messages` offering `tools`, rendered (at most `max_bytes` long) and
    /// tokenized with every client-supplied string as data: a control token's text in any field
    /// stays characters (see `client_text.rs`), and every role is one of OpenAI's. A conversation
    /// without such text tokenizes as its rendered text.
    pub fn prompt_ids(
        &self,
        tokenizer: &TextTokenizer,
        messages: &[ChatMessage],
        tools: &[Tool],
        max_bytes: usize,
    ) -> Result<Vec<u32>, ChatPromptError> {
        let mut client = ClientText::new(tokenizer.control_texts());
        let (messages, tools) = client
            .guard_chat(messages, tools)
            .map_err(ChatPromptError::Invalid)?;
        let rendered = self
            .render(&messages, &tools)
            .map_err(ChatPromptError::Invalid)?;
        let restored = client
            .restore(&rendered)
            .map_err(ChatPromptError::Invalid)?;
        if restored.text.len() > max_bytes {
            return Err(ChatPromptError::Invalid(format!(
                "the rendered chat of {} bytes is over the limit of {max_bytes}",
                restored.text.len()
            )));
        }
        if client.is_empty() {
            return Ok(tokenizer.encode(&restored.text)?);
        }
        Ok(tokenizer.encode_with_data(&restored.text, &restored.data)?)
    }
}

/// GGUF's `tokenizer.chat_template`, and the texts of its BOS and EOS tokens.
pub(crate) fn from_gguf_metadata(md: &HashMap<String, Value>) -> Option<ChatTemplateSource> {
    let source = md.get("tokenizer.chat_template")?.to_string().ok()?.clone();
    let tokens = md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok());
    let token_text = |key: &str| -> String {
        md.get(key)
            .and_then(|v| v.to_u32().ok())
            .zip(tokens)
            .and_then(|(id, tokens)| tokens.get(id as usize))
            .and_then(|t| t.to_string().ok())
            .cloned()
            .unwrap_or_default()
    };
    Some(ChatTemplateSource {
        source,
        bos_token: token_text("tokenizer.ggml.bos_token_id"),
        eos_token: token_text("tokenizer.ggml.eos_token_id"),
    })
}

/// `chat_template` in a Hugging Face directory's `tokenizer_config.json`, if the file has one.
pub(crate) fn from_hf_dir(dir: &Path) -> Result<Option<ChatTemplateSource>, ModelError> {
    let file = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&file) else {
        return Ok(None);
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::invalid(&file, e.to_string()))?;
    // Either one template, or a list of named ones of which "default" is the chat template.
    let source = match &json["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    };
    // Special tokens appear as plain strings or as `{"content": ...}` objects.
    let token = |key: &str| match &json[key] {
        serde_json::Value::String(s) => s.clone(),
        v => v["content"].as_str().unwrap_or_default().to_string(),
    };
    Ok(source.map(|source| ChatTemplateSource {
        source,
        bos_token: token("bos_token"),
        eos_token: token("eos_token"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    // SmolLM2-Instruct's template, as its GGUF file carries it.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn user(content: &str) -> ChatMessage {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
            ..Default::default()
        }
    }

    #[test]
    fn renders_the_smollm2_template_like_transformers() {
        let t = ChatTemplate::new(Path::new("m"), SMOLLM2.into(), String::new(), String::new())
            .unwrap();
        assert_eq!(
            t.render(&[user("Hi")], &[]).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let source = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}\
                      {{ bos_token }}{{ messages[0]['content'].strip() }}";
        let t =
            ChatTemplate::new(Path::new("m"), source.into(), "<s>".into(), "</s>".into()).unwrap();
        assert_eq!(t.render(&[user("  x  ")], &[]).unwrap(), "<s>x");
        let system = ChatMessage {
            role: "system".into(),
            content: "s".into(),
            ..Default::default()
        };
        assert_eq!(
            t.render(&[system], &[]).unwrap_err(),
            "first message must be from the user"
        );
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let source = "{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}";
        let t =
            ChatTemplate::new(Path::new("m"), source.into(), String::new(), String::new()).unwrap();
        let tool = Tool {
            name: "f".into(),
            description: Some("a <b> & 'c' é".into()),
            parameters: json!({"type": "object", "properties": {"z": {}, "a": [1, 2.5]}}),
        };
        // json.dumps([tool], ensure_ascii=False) and json.dumps(tool, indent=2, ensure_ascii=False)
        assert_eq!(
            t.render(&[], std::slice::from_ref(&tool)).unwrap(),
            "[{\"type\": \"function\", \"function\": {\"name\": \"f\", \"description\": \"a <b> & 'c' é\", \
             \"parameters\": {\"type\": \"object\", \"properties\": {\"z\": {}, \"a\": [1, 2.5]}}}}]|\
             {\n  \"type\": \"function\",\n  \"function\": {\n    \"name\": \"f\",\n    \"description\": \"a <b> & 'c' é\",\n    \
             \"parameters\": {\n      \"type\": \"object\",\n      \"properties\": {\n        \"z\": {},\n        \"a\": [\n          1,\n          2.5\n        ]\n      }\n    }\n  }\n}"
        );
    }

    #[test]
    fn a_broken_template_is_named_at_load() {
        let e = ChatTemplate::new(
            Path::new("m"),
            "{% for %}".into(),
            String::new(),
            String::new(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("chat template"), "{e}");
    }
}
