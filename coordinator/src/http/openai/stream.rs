//! A generation's events in OpenAI's shapes: streamed chunks (server-sent events) or one collected answer.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde_json::{json, Value};
use strata_model::{CallReader, OutputPiece, ToolCallParser};
use strata_proto::v1;
use tonic::Status;

use super::ApiError;
use crate::service::{CoordinatorService, Events};

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// OpenAI's finish reasons: the end-of-generation token and stop strings are both "stop".
pub(super) fn finish_reason(reason: i32) -> &'static str {
    match v1::FinishReason::try_from(reason) {
        Ok(v1::FinishReason::Length | v1::FinishReason::Context) => "length",
        _ => "stop",
    }
}

/// The text, token count, finish reason and prompt length of a whole (non-streamed) generation,
/// and its tokens when logprobs are asked for.
pub(super) struct Collected {
    pub(super) text: String,
    /// The calls the output makes, when tools were offered (then `text` is the rest of it).
    pub(super) tool_calls: Vec<v1::ToolCall>,
    pub(super) tokens: u32,
    pub(super) reason: &'static str,
    pub(super) prompt_tokens: usize,
    pub(super) cached_tokens: u32,
    pub(super) generated: Vec<v1::GeneratedToken>,
}

pub(super) async fn collect(mut events: Events, keep_tokens: bool) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut generated = Vec::new();
    while let Some(event) = events.next().await {
        match event?.event {
            Some(v1::generate_response::Event::Token(t)) => {
                text.push_str(&t.text);
                if keep_tokens {
                    generated.push(t);
                }
            }
            Some(v1::generate_response::Event::Finished(f)) => {
                text.push_str(&f.trailing_text);
                if let Some(content) = events.take_content() {
                    text = content;
                }
                return Ok(Collected {
                    text,
                    tool_calls: f.tool_calls,
                    tokens: f.generated_tokens,
                    reason: finish_reason(f.reason),
                    prompt_tokens: f.prompt_ids.len(),
                    cached_tokens: f.cached_tokens,
                    generated,
                });
            }
            None => {}
        }
    }
    Err(Status::internal("the generation ended without a final event").into())
}

pub(super) fn usage(prompt_tokens: usize, completion_tokens: u32, cached_tokens: u32) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens as usize,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    })
}

/// How one API shapes streamed chunks.
#[derive(Clone, Copy)]
pub(super) enum Flavor {
    Completion,
    Chat,
}

/// Log-probabilities in OpenAI's shapes, each token's text from the model's tokenizer.
#[derive(Clone)]
pub(super) struct Logprobs {
    pub(super) service: CoordinatorService,
    pub(super) flavor: Flavor,
}

impl Logprobs {
    /// The `logprobs` of a choice for `tokens`, whose text starts `offset` characters into the
    /// choice's text (completions' `text_offset`).
    pub(super) fn of(&self, tokens: &[v1::GeneratedToken], offset: usize) -> Value {
        match self.flavor {
            Flavor::Chat => {
                let entry = |id: u32, logprob: f32| {
                    let token = self.service.token_text(id);
                    json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()})
                };
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let mut e = entry(t.id, t.logprob);
                        e["top_logprobs"] = t
                            .top_logprobs
                            .iter()
                            .map(|a| entry(a.id, a.logprob))
                            .collect();
                        e
                    })
                    .collect();
                json!({ "content": content })
            }
            Flavor::Completion => {
                let mut offsets = Vec::with_capacity(tokens.len());
                let mut at = offset;
                for t in tokens {
                    offsets.push(at);
                    at += t.text.chars().count();
                }
                let top: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let alternatives: serde_json::Map<String, Value> = t
                            .top_logprobs
                            .iter()
                            .map(|a| (self.service.token_text(a.id), json!(a.logprob)))
                            .collect();
                        Value::Object(alternatives)
                    })
                    .collect();
                json!({
                    "tokens": tokens.iter().map(|t| self.service.token_text(t.id)).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": offsets,
                })
            }
        }
    }
}

/// The SSE body for `n` choices whose events arrive interleaved: one chunk per token text (empty
/// texts skipped unless logprobs are asked for), a final chunk per choice with its finish reason,
/// then, once every choice has finished, a usage chunk if asked and `[DONE]`. An error after the
/// stream began is sent as an `{"error": ...}` chunk, which OpenAI's clients raise.
pub(super) fn sse(
    choices: Vec<Events>,
    mut writer: ChunkWriter,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    // A `None` after a choice's last event tells a stream that ended early from one that finished.
    let streams = choices.into_iter().enumerate().map(|(i, events)| {
        events
            .map(move |e| (i, Some(e)))
            .chain(futures::stream::once(async move { (i, None) }))
            .boxed()
    });
    let body = futures::stream::select_all(streams).flat_map(move |(i, item)| {
        futures::stream::iter(writer.write(i, item).into_iter().map(Ok))
    });
    Sse::new(body).keep_alive(KeepAlive::default())
}

/// Where one choice of a streamed answer is.
#[derive(Default)]
struct ChoiceState {
    /// No chunk written yet (chat's first delta carries the role).
    started: bool,
    finished: bool,
    /// Characters of text sent so far (completions' `text_offset`).
    offset: usize,
    /// Reads calls out of the text, when tools were offered.
    calls: Option<ToolCallParser>,
    /// Calls streamed so far (each `delta.tool_calls` entry's index).
    call_count: usize,
}

/// Turns a generation's events into OpenAI's streamed chunks.
pub(super) struct ChunkWriter {
    flavor: Flavor,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    logprobs: Option<Logprobs>,
    choices: Vec<ChoiceState>,
    prompt_tokens: usize,
    /// The fewest prompt tokens any choice copied from the prefix cache: the request's prompt counts
    /// once, and its other choices copy what the first computes.
    cached_tokens: Option<u32>,
    completion_tokens: u32,
    /// `[DONE]` (or an error) is written; nothing more is.
    done: bool,
}

impl ChunkWriter {
    pub(super) fn new(
        flavor: Flavor,
        id: String,
        model: String,
        n: usize,
        include_usage: bool,
        logprobs: Option<Logprobs>,
        calls: Option<CallReader>,
    ) -> Self {
        Self {
            flavor,
            id,
            model,
            created: now_secs(),
            include_usage,
            logprobs,
            choices: (0..n)
                .map(|_| ChoiceState {
                    calls: calls.as_ref().map(CallReader::parser),
                    ..ChoiceState::default()
                })
                .collect(),
            prompt_tokens: 0,
            cached_tokens: None,
            completion_tokens: 0,
            done: false,
        }
    }

    /// The chunks for one event of choice `index` (`None`: its events ended).
    pub(super) fn write(
        &mut self,
        index: usize,
        item: Option<Result<v1::GenerateResponse, Status>>,
    ) -> Vec<SseEvent> {
        use v1::generate_response::Event;
        if self.done || self.choices[index].finished {
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
            Some(Event::Token(t))
                if t.text.is_empty() && self.choices[index].started && self.logprobs.is_none() =>
            {
                Vec::new()
            }
            Some(Event::Token(t)) => {
                let logprobs = self
                    .logprobs
                    .as_ref()
                    .map(|l| l.of(std::slice::from_ref(&t), self.choices[index].offset));
                self.choices[index].offset += t.text.chars().count();
                match self.choices[index].calls.as_mut().map(|p| p.push(&t.text)) {
                    None => vec![self.chunk(index, Some(&t.text), None, logprobs)],
                    Some(pieces) => self.pieces(index, pieces, logprobs),
                }
            }
            Some(Event::Finished(f)) => {
                self.choices[index].finished = true;
                self.prompt_tokens = f.prompt_ids.len();
                self.cached_tokens = Some(
                    self.cached_tokens
                        .map_or(f.cached_tokens, |c| c.min(f.cached_tokens)),
                );
                self.completion_tokens += f.generated_tokens;
                let mut out = Vec::new();
                let text = match self.choices[index].calls.as_mut() {
                    Some(parser) => {
                        let mut pieces = parser.push(&f.trailing_text);
                        pieces.extend(parser.finish());
                        out = self.pieces(index, pieces, None);
                        None
                    }
                    None => (!f.trailing_text.is_empty()).then_some(&*f.trailing_text),
                };
                // A reply cut by the limit says so, whatever calls it holds.
                let reason = match finish_reason(f.reason) {
                    "length" => "length",
                    _ if self.choices[index].call_count > 0 => "tool_calls",
                    reason => reason,
                };
                out.push(self.chunk(index, text, Some(reason), None));
                if self.choices.iter().all(|c| c.finished) {
                    self.done = true;
                    if self.include_usage {
                        let usage = usage(
                            self.prompt_tokens,
                            self.completion_tokens,
                            self.cached_tokens.unwrap_or(0),
                        );
                        out.push(self.event(json!([]), Some(usage)));
                    }
                    out.push(SseEvent::default().data("[DONE]"));
                }
                out
            }
            None => Vec::new(),
        }
    }

    /// Chunks for text and calls read from the output: a content delta per text, a
    /// `delta.tool_calls` entry per call (whole: name and all its arguments at once). A token's
    /// logprobs go with its first chunk, or one of their own when it completed nothing yet.
    fn pieces(
        &mut self,
        index: usize,
        pieces: Vec<OutputPiece>,
        mut logprobs: Option<Value>,
    ) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for piece in pieces {
            match piece {
                OutputPiece::Text(text) => {
                    out.push(self.chunk(index, Some(&text), None, logprobs.take()));
                }
                OutputPiece::Call(call) => {
                    let call_index = self.choices[index].call_count;
                    self.choices[index].call_count += 1;
                    let wire = crate::service::tools::wire_call(&call);
                    let mut entry = openai_call(&wire);
                    entry["index"] = json!(call_index);
                    let event =
                        self.delta(index, json!({"tool_calls": [entry]}), None, logprobs.take());
                    out.push(event);
                }
            }
        }
        if let Some(l) = logprobs {
            out.push(self.chunk(index, None, None, Some(l)));
        }
        out
    }

    pub(super) fn error(&mut self, status: Status) -> Vec<SseEvent> {
        self.done = true;
        vec![SseEvent::default().data(ApiError::from(status).body().to_string())]
    }

    /// A chunk with choice `index`: `text` (as chat's delta content), the finish reason if any,
    /// and the token's logprobs if asked for.
    fn chunk(
        &mut self,
        index: usize,
        text: Option<&str>,
        finish: Option<&str>,
        logprobs: Option<Value>,
    ) -> SseEvent {
        let logprobs = logprobs.unwrap_or(Value::Null);
        let choice = match self.flavor {
            Flavor::Completion => json!({
                "index": index, "text": text.unwrap_or(""), "logprobs": logprobs,
                "finish_reason": finish,
            }),
            Flavor::Chat => {
                let mut delta = json!({});
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                return self.delta(index, delta, finish, Some(logprobs));
            }
        };
        self.choices[index].started = true;
        self.event(json!([choice]), None)
    }

    /// A chat chunk with choice `index`'s `delta` (the first one also says the role).
    fn delta(
        &mut self,
        index: usize,
        mut delta: Value,
        finish: Option<&str>,
        logprobs: Option<Value>,
    ) -> SseEvent {
        if !self.choices[index].started {
            delta["role"] = json!("assistant");
        }
        self.choices[index].started = true;
        let logprobs = logprobs.unwrap_or(Value::Null);
        let choice =
            json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish});
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

/// A call in OpenAI's shape: `{"id", "type": "function", "function": {"name", "arguments"}}`, the
/// arguments as JSON text.
pub(super) fn openai_call(call: &v1::ToolCall) -> Value {
    json!({
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json},
    })
}
