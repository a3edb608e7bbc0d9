//! OpenAI's completions, chat completions and models endpoints, converted to and from
//! [`v1::GenerateRequest`] and the coordinator's event stream. Streaming is server-sent events in
//! OpenAI's chunk format, ending with `data: [DONE]`; errors use OpenAI's `{"error": {...}}` shape.
//!
//! - `request.rs`: the request bodies, and what they ask of the generation.
//! - `stream.rs`: a generation's events as OpenAI's chunks (streamed) or one answer (collected).
//! - `error.rs`: OpenAI's error shape, and the body read within its limits.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};
use strata_model::ModelFile;
use strata_proto::v1;
use strata_transport::Caller;

use super::AppState;
use crate::metrics::Api;
use crate::service::{request_id, Events};

mod error;
mod request;
mod stream;
#[cfg(test)]
mod tests;

use error::parse_body;
pub use error::ApiError;
pub use request::{ChatRequest, CompletionRequest};
use request::{Common, MessageContent};

/// The most alternatives per token the logprobs options may ask for (the gRPC API's limit).
const MAX_TOP_LOGPROBS: u32 = 20;
use stream::{collect, now_secs, sse, usage, ChunkWriter, Flavor, Logprobs};

/// The id clients name the model by: the file's name without `.gguf`, or the directory's name.
pub fn model_id(model: &ModelFile) -> String {
    model
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| model.name.clone())
}

/// Starts `n` generations of one HTTP request (choice `i` seeded with `seed + i`); the request id
/// comes from `x-request-id` or is made up, and choice `i > 0` logs as `ID-i`. If one cannot start,
/// the ones started are dropped, which cancels them.
async fn start(
    state: &AppState,
    headers: &HeaderMap,
    caller: Caller,
    request: v1::GenerateRequest,
    n: u32,
) -> Result<(Vec<Events>, String), ApiError> {
    let id = request_id(headers.get("x-request-id").and_then(|v| v.to_str().ok()));
    let mut choices = Vec::with_capacity(n as usize);
    for i in 0..n {
        let mut request = request.clone();
        if let Some(s) = &mut request.sampling {
            s.seed = s.seed.wrapping_add(i as u64);
        }
        let choice_id = if i == 0 {
            id.clone()
        } else {
            format!("{id}-{i}").into()
        };
        let events = state
            .service
            .start_generation(request, None, choice_id, caller.clone(), Api::OpenAi)
            .await?;
        choices.push(events);
    }
    Ok((choices, id.to_string()))
}

fn with_request_id(mut response: Response, id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

pub async fn completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body: CompletionRequest = parse_body(body).await?;
    if body.echo {
        return Err(ApiError::invalid("echo is not supported", Some("echo")));
    }
    if let Some(n) = body.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
        return Err(ApiError::invalid(
            format!("logprobs {n} is over the limit of {MAX_TOP_LOGPROBS}"),
            Some("logprobs"),
        ));
    }
    let prompts = body.prompt.into_vec();
    let [prompt] = <[String; 1]>::try_from(prompts).map_err(|p| {
        ApiError::invalid(
            format!(
                "give one prompt (got {}); send one request per prompt",
                p.len()
            ),
            Some("prompt"),
        )
    })?;
    let mut request = body
        .common
        .to_request(&state, Some(body.common.max_tokens.unwrap_or(16)))?;
    request.prompt = prompt;
    request.parse_special = body.parse_special;
    request.top_logprobs = body.logprobs.unwrap_or(0);
    respond(
        &state,
        &headers,
        caller,
        request,
        Flavor::Completion,
        &body.common,
        body.logprobs.is_some(),
    )
    .await
}

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body: ChatRequest = parse_body(body).await?;
    let top_logprobs = body.top_logprobs.unwrap_or(0);
    if top_logprobs > 0 && !body.logprobs {
        return Err(ApiError::invalid(
            "top_logprobs needs logprobs: true",
            Some("top_logprobs"),
        ));
    }
    if top_logprobs > MAX_TOP_LOGPROBS {
        return Err(ApiError::invalid(
            format!("top_logprobs {top_logprobs} is over the limit of {MAX_TOP_LOGPROBS}"),
            Some("top_logprobs"),
        ));
    }
    if body.messages.is_empty() {
        return Err(ApiError::invalid("messages is empty", Some("messages")));
    }
    let (tools, tool_choice) = body.wire_tools()?;
    let messages = body
        .messages
        .into_iter()
        .map(|m| {
            let content = match m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t,
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        if part.kind != "text" {
                            return Err(ApiError::invalid(
                                format!("content parts of type {:?} are not supported: this model reads text", part.kind),
                                Some("messages"),
                            ));
                        }
                        text.push_str(part.text.as_deref().unwrap_or_default());
                    }
                    text
                }
            };
            let tool_calls = m
                .tool_calls
                .into_iter()
                .flatten()
                .map(|c| v1::ToolCall {
                    id: c.id,
                    name: c.function.name,
                    arguments_json: match c.function.arguments {
                        Some(Value::String(text)) => text,
                        Some(v) => v.to_string(),
                        None => String::new(),
                    },
                })
                .collect();
            Ok(v1::ChatMessage {
                role: m.role,
                content,
                tool_calls,
                tool_call_id: m.tool_call_id.unwrap_or_default(),
                name: m.name.unwrap_or_default(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let max_tokens = body.max_completion_tokens.or(body.common.max_tokens);
    let mut request = body.common.to_request(&state, max_tokens)?;
    request.messages = messages;
    request.top_logprobs = top_logprobs;
    request.tools = tools;
    request.tool_choice = tool_choice;
    respond(
        &state,
        &headers,
        caller,
        request,
        Flavor::Chat,
        &body.common,
        body.logprobs,
    )
    .await
}

/// Starts the generations, then streams them as SSE or answers with the whole completion.
async fn respond(
    state: &AppState,
    headers: &HeaderMap,
    caller: Caller,
    request: v1::GenerateRequest,
    flavor: Flavor,
    common: &Common,
    logprobs: bool,
) -> Result<Response, ApiError> {
    let n = common.choices()?;
    let model = model_id(state.service.model());
    let (choices, id) = start(state, headers, caller, request, n).await?;
    let calls = choices.first().and_then(Events::call_reader);
    let (prefix, object) = match flavor {
        Flavor::Completion => ("cmpl", "text_completion"),
        Flavor::Chat => ("chatcmpl", "chat.completion"),
    };
    let completion_id = format!("{prefix}-{id}");
    let logprobs = logprobs.then(|| Logprobs {
        service: state.service.clone(),
        flavor,
    });
    let response = if common.stream {
        let writer = ChunkWriter::new(
            flavor,
            completion_id,
            model,
            choices.len(),
            common.include_usage(),
            logprobs,
            calls,
        );
        sse(choices, writer).into_response()
    } else {
        let keep = logprobs.is_some();
        let collected =
            futures::future::try_join_all(choices.into_iter().map(|e| collect(e, keep))).await?;
        let mut completion_tokens = 0;
        let mut prompt_tokens = 0;
        // The request's prompt counts once: its other choices copy what the first computes.
        let cached_tokens = collected.iter().map(|c| c.cached_tokens).min().unwrap_or(0);
        let choices: Vec<Value> = collected
            .iter()
            .enumerate()
            .map(|(index, c)| {
                completion_tokens += c.tokens;
                prompt_tokens = c.prompt_tokens;
                let logprobs = logprobs
                    .as_ref()
                    .map_or(Value::Null, |l| l.of(&c.generated, 0));
                match flavor {
                    Flavor::Completion => json!({
                        "index": index, "text": c.text, "logprobs": logprobs,
                        "finish_reason": c.reason,
                    }),
                    Flavor::Chat if !c.tool_calls.is_empty() => json!({
                        "index": index,
                        "message": {
                            "role": "assistant",
                            "content": (!c.text.is_empty()).then_some(&c.text),
                            "tool_calls": c.tool_calls.iter().map(stream::openai_call).collect::<Vec<_>>(),
                        },
                        "logprobs": logprobs,
                        // A reply cut by the limit says so, whatever calls it holds.
                        "finish_reason": if c.reason == "length" { "length" } else { "tool_calls" },
                    }),
                    Flavor::Chat => json!({
                        "index": index,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": logprobs,
                        "finish_reason": c.reason,
                    }),
                }
            })
            .collect();
        Json(json!({
            "id": completion_id,
            "object": object,
            "created": now_secs(),
            "model": model,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
        }))
        .into_response()
    };
    Ok(with_request_id(response, &id))
}

pub async fn models(State(state): State<AppState>) -> Json<Value> {
    let model = state.service.model();
    Json(json!({
        "object": "list",
        "data": [{
            "id": model_id(model),
            "object": "model",
            "created": 0,
            "owned_by": "strata",
            "context_length": model.config.context_length,
        }],
    }))
}
