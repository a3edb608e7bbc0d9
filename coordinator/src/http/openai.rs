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
use stream::{collect, now_secs, sse, usage, Flavor};

/// The id clients name the model by: the file's name without `.gguf`, or the directory's name.
pub fn model_id(model: &ModelFile) -> String {
    model
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| model.name.clone())
}

/// Starts a generation for an HTTP request; the request id comes from `x-request-id` or is made up.
async fn start(
    state: &AppState,
    headers: &HeaderMap,
    caller: Caller,
    request: v1::GenerateRequest,
) -> Result<(Events, String), ApiError> {
    let id = request_id(headers.get("x-request-id").and_then(|v| v.to_str().ok()));
    let events = state
        .service
        .start_generation(request, None, id.clone(), caller, Api::OpenAi)
        .await?;
    Ok((events, id.to_string()))
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
    if body.logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::invalid(
            "logprobs are not supported on the HTTP API yet (the gRPC API returns top_logprobs)",
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
    respond(
        &state,
        &headers,
        caller,
        request,
        Flavor::Completion,
        &body.common,
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
    if body.logprobs {
        return Err(ApiError::invalid(
            "logprobs are not supported on the HTTP API yet (the gRPC API returns top_logprobs)",
            Some("logprobs"),
        ));
    }
    if body.messages.is_empty() {
        return Err(ApiError::invalid("messages is empty", Some("messages")));
    }
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
            Ok(v1::ChatMessage {
                role: m.role,
                content,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let max_tokens = body.max_completion_tokens.or(body.common.max_tokens);
    let mut request = body.common.to_request(&state, max_tokens)?;
    request.messages = messages;
    respond(
        &state,
        &headers,
        caller,
        request,
        Flavor::Chat,
        &body.common,
    )
    .await
}

/// Starts the generation, then streams it as SSE or answers with the whole completion.
async fn respond(
    state: &AppState,
    headers: &HeaderMap,
    caller: Caller,
    request: v1::GenerateRequest,
    flavor: Flavor,
    common: &Common,
) -> Result<Response, ApiError> {
    let model = model_id(state.service.model());
    let (events, id) = start(state, headers, caller, request).await?;
    let (prefix, object) = match flavor {
        Flavor::Completion => ("cmpl", "text_completion"),
        Flavor::Chat => ("chatcmpl", "chat.completion"),
    };
    let completion_id = format!("{prefix}-{id}");
    let response = if common.stream {
        sse(events, flavor, completion_id, model, common.include_usage()).into_response()
    } else {
        let c = collect(events).await?;
        let choice = match flavor {
            Flavor::Completion => json!({
                "index": 0, "text": c.text, "logprobs": null, "finish_reason": c.reason,
            }),
            Flavor::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": null,
                "finish_reason": c.reason,
            }),
        };
        Json(json!({
            "id": completion_id,
            "object": object,
            "created": now_secs(),
            "model": model,
            "choices": [choice],
            "usage": usage(c.prompt_tokens, c.tokens),
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
