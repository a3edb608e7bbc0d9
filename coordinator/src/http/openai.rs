//! OpenAI's completions, chat completions and models endpoints, converted to and from
//! [`v1::GenerateRequest`] and the coordinator's event stream. Streaming is server-sent events in
//! OpenAI's chunk format, ending with `data: [DONE]`; errors use OpenAI's `{"error": {...}}` shape.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::{Stream, StreamExt};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{json, Value};
use strata_model::ModelFile;
use strata_proto::v1;
use strata_transport::Caller;
use tonic::{Code, Status};

use super::AppState;
use crate::metrics::Api;
use crate::service::{random_u64, request_id, Events};

/// The id clients name the model by: the file's name without `.gguf`, or the directory's name.
pub fn model_id(model: &ModelFile) -> String {
    model
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| model.name.clone())
}

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            param,
        }
    }

    fn refused(status: StatusCode, message: String) -> Self {
        Self {
            status,
            message,
            kind: "invalid_request_error",
            code: None,
            param: None,
        }
    }

    pub fn unauthorized(message: &str) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.to_string(),
            kind: "invalid_request_error",
            code: Some("invalid_api_key"),
            param: None,
        }
    }

    pub fn not_found(message: String) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message,
            kind: "invalid_request_error",
            code: None,
            param: None,
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        let (http, kind, code) = match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", None)
            }
            Code::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            Code::ResourceExhausted => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("overloaded"),
            ),
            Code::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("unavailable"),
            ),
            Code::DeadlineExceeded => {
                (StatusCode::GATEWAY_TIMEOUT, "server_error", Some("timeout"))
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        Self {
            status: http,
            message: status.message().to_string(),
            kind,
            code,
            param: None,
        }
    }
}

/// The largest request body: a prompt at the coordinator's byte limit (1 MiB) fits with room for
/// JSON's escapes; beyond it, 413 before anything is parsed.
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// How long a client may take to send a request's body once its headers are in: a body trickled
/// a byte at a time must not hold a connection (idle checks see a running request).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The body as JSON, whatever its `Content-Type` says (curl users often leave it out); read within
/// `BODY_TIMEOUT` and `MAX_BODY_BYTES`, each refused in OpenAI's error shape (408, 413).
async fn parse_body<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let limited = http_body_util::Limited::new(body, MAX_BODY_BYTES);
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => {
            return Err(ApiError::refused(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
            ))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::refused(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over the limit of {MAX_BODY_BYTES} bytes"),
            ))
        }
        Ok(Err(e)) => {
            return Err(ApiError::invalid(
                format!("cannot read the body: {e}"),
                None,
            ))
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}"), None))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// A string or a list of strings (OpenAI's `prompt` and `stop`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }

    fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// What completions and chat completions share. Unknown fields are ignored, as OpenAI-compatible
/// servers do; fields strata cannot honor are refused by name.
#[derive(Debug, Deserialize)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    /// Not in OpenAI's API; llama.cpp and vLLM accept it.
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    /// Not in OpenAI's API; vLLM accepts it.
    #[serde(default)]
    ignore_eos: bool,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    prompt: OneOrMany,
    #[serde(default)]
    echo: bool,
    #[serde(default)]
    logprobs: Option<u32>,
    /// An extension (llama.cpp's server has it too): read control-token text in the prompt as
    /// those tokens. Off, the prompt is text.
    #[serde(default)]
    parse_special: bool,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<MessageContent>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    messages: Vec<Message>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    logprobs: bool,
    #[serde(flatten)]
    common: Common,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// OpenAI's finish reasons: the end-of-generation token and stop strings are both "stop".
fn finish_reason(reason: i32) -> &'static str {
    match v1::FinishReason::try_from(reason) {
        Ok(v1::FinishReason::Length | v1::FinishReason::Context) => "length",
        _ => "stop",
    }
}

impl Common {
    /// The shared part of a generation request; `max_tokens` is OpenAI's (16 for completions when
    /// absent, the coordinator's default for chat).
    fn to_request(
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
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(
                    format!("{name} is not supported: leave it out or 0"),
                    None,
                ));
            }
        }
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
        })
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// The text, token count, finish reason and prompt length of a whole (non-streamed) generation.
struct Collected {
    text: String,
    tokens: u32,
    reason: &'static str,
    prompt_tokens: usize,
}

async fn collect(mut events: Events) -> Result<Collected, ApiError> {
    let mut text = String::new();
    while let Some(event) = events.next().await {
        match event?.event {
            Some(v1::generate_response::Event::Token(t)) => text.push_str(&t.text),
            Some(v1::generate_response::Event::Finished(f)) => {
                text.push_str(&f.trailing_text);
                return Ok(Collected {
                    text,
                    tokens: f.generated_tokens,
                    reason: finish_reason(f.reason),
                    prompt_tokens: f.prompt_ids.len(),
                });
            }
            None => {}
        }
    }
    Err(Status::internal("the generation ended without a final event").into())
}

fn usage(prompt_tokens: usize, completion_tokens: u32) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens as usize,
    })
}

/// How one API shapes streamed chunks.
#[derive(Clone, Copy)]
enum Flavor {
    Completion,
    Chat,
}

/// The SSE body: one chunk per token text (empty texts skipped), a final chunk with the finish
/// reason, a usage chunk if asked, then `[DONE]`. An error after the stream began is sent as an
/// `{"error": ...}` chunk, which OpenAI's clients raise.
fn sse(
    events: Events,
    flavor: Flavor,
    id: String,
    model: String,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let mut writer = ChunkWriter {
        flavor,
        id,
        model,
        created: now_secs(),
        include_usage,
        first: true,
        done: false,
    };
    // A `None` after the last event tells a stream that ended early from one that finished.
    let body = events
        .map(Some)
        .chain(futures::stream::once(async { None }))
        .flat_map(move |item| futures::stream::iter(writer.write(item).into_iter().map(Ok)));
    Sse::new(body).keep_alive(KeepAlive::default())
}

/// Turns a generation's events into OpenAI's streamed chunks.
struct ChunkWriter {
    flavor: Flavor,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    /// No chunk written yet (chat's first delta carries the role).
    first: bool,
    /// The final chunk (or an error) is written; nothing more is.
    done: bool,
}

impl ChunkWriter {
    /// The chunks for one event (`None`: the events ended).
    fn write(&mut self, item: Option<Result<v1::GenerateResponse, Status>>) -> Vec<SseEvent> {
        use v1::generate_response::Event;
        if self.done {
            return Vec::new();
        }
        let event = match item {
            Some(Ok(response)) => response.event,
            Some(Err(status)) => return self.error(status),
            None => {
                return self.error(Status::internal(
                    "the generation ended without a final event",
                ))
            }
        };
        match event {
            Some(Event::Token(t)) if t.text.is_empty() && !self.first => Vec::new(),
            Some(Event::Token(t)) => vec![self.chunk(Some(&t.text), None)],
            Some(Event::Finished(f)) => {
                self.done = true;
                let text = (!f.trailing_text.is_empty()).then_some(&*f.trailing_text);
                let mut out = vec![self.chunk(text, Some(finish_reason(f.reason)))];
                if self.include_usage {
                    let usage = usage(f.prompt_ids.len(), f.generated_tokens);
                    out.push(self.event(json!([]), Some(usage)));
                }
                out.push(SseEvent::default().data("[DONE]"));
                out
            }
            None => Vec::new(),
        }
    }

    fn error(&mut self, status: Status) -> Vec<SseEvent> {
        self.done = true;
        vec![SseEvent::default().data(ApiError::from(status).body().to_string())]
    }

    /// A chunk with one choice: `text` (as chat's delta content), and the finish reason if any.
    fn chunk(&mut self, text: Option<&str>, finish: Option<&str>) -> SseEvent {
        let choice = match self.flavor {
            Flavor::Completion => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
            }),
            Flavor::Chat => {
                let mut delta = json!({});
                if self.first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        };
        self.first = false;
        self.event(json!([choice]), None)
    }

    fn event(&self, choices: Value, usage: Option<Value>) -> SseEvent {
        let object = match self.flavor {
            Flavor::Completion => "text_completion",
            Flavor::Chat => "chat.completion.chunk",
        };
        let mut body = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": choices,
        });
        if let Some(u) = usage {
            body["usage"] = u;
        }
        SseEvent::default().data(body.to_string())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_openai_errors() {
        let e = ApiError::from(Status::resource_exhausted("full"));
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        let e = ApiError::from(Status::invalid_argument("bad"));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.body()["error"]["message"], "bad");
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        let e = ApiError::unauthorized("wrong auth token");
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert_eq!(e.body()["error"]["code"], "invalid_api_key");
    }

    #[test]
    fn finish_reasons_follow_openai() {
        assert_eq!(finish_reason(v1::FinishReason::Eos as i32), "stop");
        assert_eq!(finish_reason(v1::FinishReason::Stop as i32), "stop");
        assert_eq!(finish_reason(v1::FinishReason::Length as i32), "length");
        assert_eq!(finish_reason(v1::FinishReason::Context as i32), "length");
    }

    #[test]
    fn requests_parse_in_both_prompt_and_content_shapes() {
        let r: CompletionRequest =
            serde_json::from_str(r#"{"model":"m","prompt":["a"],"stop":"x","unknown":1}"#).unwrap();
        assert_eq!(r.prompt.into_vec(), vec!["a"]);
        assert_eq!(r.common.stop.unwrap().to_vec(), vec!["x"]);
        let r: ChatRequest = serde_json::from_str(
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"stream":true}"#,
        )
        .unwrap();
        assert!(r.common.stream);
        assert!(matches!(
            r.messages[0].content,
            Some(MessageContent::Parts(_))
        ));
    }
}
