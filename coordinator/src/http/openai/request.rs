//! The completions and chat completions request bodies, checked and turned into a generation request.

use std::collections::HashMap;

use serde::Deserialize;
use strata_proto::v1;

use super::AppState;
use super::{model_id, ApiError};
use crate::service::random_u64;

/// A string or a list of strings (OpenAI's `prompt` and `stop`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(super) fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }

    pub(super) fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct StreamOptions {
    #[serde(default)]
    pub(super) include_usage: bool,
}

/// What completions and chat completions share. Unknown fields are ignored, as OpenAI-compatible
/// servers do; fields strata cannot honor are refused by name.
#[derive(Debug, Deserialize)]
pub(super) struct Common {
    #[serde(default)]
    pub(super) model: Option<String>,
    #[serde(default)]
    pub(super) max_tokens: Option<u32>,
    #[serde(default)]
    pub(super) temperature: Option<f32>,
    #[serde(default)]
    pub(super) top_p: Option<f32>,
    /// Not in OpenAI's API; llama.cpp and vLLM accept it.
    #[serde(default)]
    pub(super) top_k: Option<u32>,
    #[serde(default)]
    pub(super) seed: Option<u64>,
    #[serde(default)]
    pub(super) stop: Option<OneOrMany>,
    #[serde(default)]
    pub(super) stream: bool,
    #[serde(default)]
    pub(super) stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub(super) n: Option<u32>,
    #[serde(default)]
    pub(super) presence_penalty: Option<f32>,
    #[serde(default)]
    pub(super) frequency_penalty: Option<f32>,
    /// Token id (as a string, OpenAI's shape) to a bias added to its logit.
    #[serde(default)]
    pub(super) logit_bias: Option<HashMap<String, f32>>,
    /// Not in OpenAI's API; vLLM and llama.cpp accept it.
    #[serde(default)]
    pub(super) repetition_penalty: Option<f32>,
    /// Not in OpenAI's API; vLLM and llama.cpp accept it.
    #[serde(default)]
    pub(super) min_p: Option<f32>,
    /// Not in OpenAI's API; vLLM accepts it.
    #[serde(default)]
    pub(super) ignore_eos: bool,
    /// OpenAI's structured output (chat); vLLM and llama.cpp take it on completions too.
    #[serde(default)]
    pub(super) response_format: Option<ResponseFormat>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ResponseFormat {
    #[serde(rename = "type")]
    pub(super) kind: String,
    #[serde(default)]
    pub(super) json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Deserialize)]
pub(super) struct JsonSchemaFormat {
    #[serde(default)]
    pub(super) schema: Option<serde_json::Value>,
}

impl ResponseFormat {
    /// The constraint it asks for (`text`: none).
    fn constraint(&self) -> Result<Option<v1::OutputConstraint>, ApiError> {
        let schema = match self.kind.as_str() {
            "text" => return Ok(None),
            "json_object" => serde_json::json!({"type": "object"}),
            "json_schema" => self
                .json_schema
                .as_ref()
                .and_then(|j| j.schema.clone())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "response_format json_schema needs json_schema.schema",
                        Some("response_format"),
                    )
                })?,
            other => {
                return Err(ApiError::invalid(
                    format!(
                        "response_format type {other:?}: use \"text\", \"json_object\" or \"json_schema\""
                    ),
                    Some("response_format"),
                ))
            }
        };
        Ok(Some(v1::OutputConstraint {
            grammar: Some(v1::output_constraint::Grammar::JsonSchema(
                schema.to_string(),
            )),
        }))
    }
}

/// The most choices one request may ask for: each is a sequence of its own in the scheduler.
pub(super) const MAX_CHOICES: u32 = 16;

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub(super) prompt: OneOrMany,
    #[serde(default)]
    pub(super) echo: bool,
    #[serde(default)]
    pub(super) logprobs: Option<u32>,
    /// An extension (llama.cpp's server has it too): read control-token text in the prompt as
    /// those tokens. Off, the prompt is text.
    #[serde(default)]
    pub(super) parse_special: bool,
    #[serde(flatten)]
    pub(super) common: Common,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub(super) struct ContentPart {
    #[serde(rename = "type")]
    pub(super) kind: String,
    #[serde(default)]
    pub(super) text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Message {
    pub(super) role: String,
    #[serde(default)]
    pub(super) content: Option<MessageContent>,
    /// An assistant turn's calls.
    #[serde(default)]
    pub(super) tool_calls: Option<Vec<MessageToolCall>>,
    /// A tool turn's answer is to this call.
    #[serde(default)]
    pub(super) tool_call_id: Option<String>,
    #[serde(default)]
    pub(super) name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct MessageToolCall {
    #[serde(default)]
    pub(super) id: String,
    pub(super) function: FunctionCall,
}

#[derive(Debug, Deserialize)]
pub(super) struct FunctionCall {
    pub(super) name: String,
    /// JSON text, as OpenAI sends it (an object is taken too).
    #[serde(default)]
    pub(super) arguments: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ToolSpec {
    #[serde(rename = "type")]
    pub(super) kind: String,
    pub(super) function: FunctionSpec,
}

#[derive(Debug, Deserialize)]
pub(super) struct FunctionSpec {
    pub(super) name: String,
    #[serde(default)]
    pub(super) description: Option<String>,
    #[serde(default)]
    pub(super) parameters: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub(super) messages: Vec<Message>,
    #[serde(default)]
    pub(super) max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub(super) logprobs: bool,
    #[serde(default)]
    pub(super) top_logprobs: Option<u32>,
    #[serde(default)]
    pub(super) tools: Option<Vec<ToolSpec>>,
    /// `"auto"`, `"none"`, `"required"` or `{"type": "function", "function": {"name": ...}}`.
    #[serde(default)]
    pub(super) tool_choice: Option<serde_json::Value>,
    #[serde(flatten)]
    pub(super) common: Common,
}

impl ChatRequest {
    /// The tools and tool choice on the wire.
    pub(super) fn wire_tools(&self) -> Result<(Vec<v1::Tool>, Option<v1::ToolChoice>), ApiError> {
        let tools = self
            .tools
            .iter()
            .flatten()
            .map(|t| {
                if t.kind != "function" {
                    return Err(ApiError::invalid(
                        format!(
                            "tools of type {:?} are not supported: use \"function\"",
                            t.kind
                        ),
                        Some("tools"),
                    ));
                }
                Ok(v1::Tool {
                    name: t.function.name.clone(),
                    description: t.function.description.clone().unwrap_or_default(),
                    parameters_json: t
                        .function
                        .parameters
                        .as_ref()
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        use v1::tool_choice::Choice;
        let choice = match &self.tool_choice {
            None => None,
            Some(serde_json::Value::String(mode)) => Some(Choice::Mode(match mode.as_str() {
                "auto" => v1::ToolMode::Auto as i32,
                "none" => v1::ToolMode::None as i32,
                "required" => v1::ToolMode::Required as i32,
                other => {
                    return Err(ApiError::invalid(
                        format!("tool_choice {other:?}: use \"auto\", \"none\", \"required\" or a function"),
                        Some("tool_choice"),
                    ))
                }
            })),
            Some(v) => match v["function"]["name"].as_str() {
                Some(name) => Some(Choice::Function(name.to_string())),
                None => {
                    return Err(ApiError::invalid(
                        "tool_choice must be a mode or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        Some("tool_choice"),
                    ))
                }
            },
        };
        Ok((tools, choice.map(|c| v1::ToolChoice { choice: Some(c) })))
    }
}

impl Common {
    /// The shared part of a generation request; `max_tokens` is OpenAI's (16 for completions when
    /// absent, the coordinator's default for chat).
    pub(super) fn to_request(
        &self,
        state: &AppState,
        max_tokens: Option<u32>,
    ) -> Result<v1::GenerateRequest, ApiError> {
        let model = state.service.model();
        if let Some(asked) = self.model.as_deref().filter(|m| !m.is_empty()) {
            let id = model_id(model);
            if asked != id && asked != model.name {
                return Err(ApiError {
                    code: Some("model_not_found"),
                    param: Some("model"),
                    ..ApiError::not_found(format!(
                        "the model `{asked}` does not exist here: this server runs `{id}`"
                    ))
                });
            }
        }
        let bias = self
            .logit_bias
            .iter()
            .flatten()
            .map(|(id, &bias)| {
                let id = id.trim().parse::<u32>().map_err(|_| {
                    ApiError::invalid(
                        format!("logit_bias keys are token ids; {id:?} is not one"),
                        Some("logit_bias"),
                    )
                })?;
                Ok(v1::TokenBias { id, bias })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        // OpenAI samples at temperature 1 unless told otherwise, with a fresh seed each time.
        let temperature = self.temperature.unwrap_or(1.0);
        let seed = self.seed.unwrap_or_else(random_u64);
        Ok(v1::GenerateRequest {
            prompt: String::new(),
            max_tokens: max_tokens.unwrap_or(0),
            sampling: Some(v1::SamplingParams {
                temperature,
                top_k: self.top_k.unwrap_or(0),
                top_p: self.top_p.unwrap_or(1.0),
                seed,
                min_p: self.min_p.unwrap_or(0.0),
                presence_penalty: self.presence_penalty.unwrap_or(0.0),
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
                repetition_penalty: self.repetition_penalty.unwrap_or(0.0),
                logit_bias: bias,
            }),
            stop: self
                .stop
                .as_ref()
                .map(OneOrMany::to_vec)
                .unwrap_or_default(),
            top_logprobs: 0,
            ignore_eos: self.ignore_eos,
            messages: Vec::new(),
            parse_special: false,
            tools: Vec::new(),
            tool_choice: None,
            constraint: self
                .response_format
                .as_ref()
                .map(ResponseFormat::constraint)
                .transpose()?
                .flatten(),
        })
    }

    /// How many choices are asked for, within [`MAX_CHOICES`].
    pub(super) fn choices(&self) -> Result<u32, ApiError> {
        match self.n.unwrap_or(1) {
            0 => Err(ApiError::invalid("n must be at least 1", Some("n"))),
            n if n > MAX_CHOICES => Err(ApiError::invalid(
                format!("n {n} is over the limit of {MAX_CHOICES}"),
                Some("n"),
            )),
            n => Ok(n),
        }
    }

    pub(super) fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}
