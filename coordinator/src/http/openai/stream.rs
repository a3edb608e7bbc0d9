//! A generation's events in OpenAI's shapes: streamed chunks (server-sent events) or one collected answer.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde_json::{json, Value};
use strata_proto::v1;
use tonic::Status;

use super::ApiError;
use crate::service::Events;

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

/// The text, token count, finish reason and prompt length of a whole (non-streamed) generation.
pub(super) struct Collected {
    pub(super) text: String,
    pub(super) tokens: u32,
    pub(super) reason: &'static str,
    pub(super) prompt_tokens: usize,
}

pub(super) async fn collect(mut events: Events) -> Result<Collected, ApiError> {
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

pub(super) fn usage(prompt_tokens: usize, completion_tokens: u32) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens as usize,
    })
}

/// How one API shapes streamed chunks.
#[derive(Clone, Copy)]
pub(super) enum Flavor {
    Completion,
    Chat,
}

/// The SSE body: one chunk per token text (empty texts skipped), a final chunk with the finish
/// reason, a usage chunk if asked, then `[DONE]`. An error after the stream began is sent as an
/// `{"error": ...}` chunk, which OpenAI's clients raise.
pub(super) fn sse(
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
pub(super) struct ChunkWriter {
    pub(super) flavor: Flavor,
    pub(super) id: String,
    pub(super) model: String,
    pub(super) created: u64,
    pub(super) include_usage: bool,
    /// No chunk written yet (chat's first delta carries the role).
    pub(super) first: bool,
    /// The final chunk (or an error) is written; nothing more is.
    pub(super) done: bool,
}

impl ChunkWriter {
    /// The chunks for one event (`None`: the events ended).
    pub(super) fn write(
        &mut self,
        item: Option<Result<v1::GenerateResponse, Status>>,
    ) -> Vec<SseEvent> {
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

    pub(super) fn error(&mut self, status: Status) -> Vec<SseEvent> {
        self.done = true;
        vec![SseEvent::default().data(ApiError::from(status).body().to_string())]
    }

    /// A chunk with one choice: `text` (as chat's delta content), and the finish reason if any.
    pub(super) fn chunk(&mut self, text: Option<&str>, finish: Option<&str>) -> SseEvent {
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

    pub(super) fn event(&self, choices: Value, usage: Option<Value>) -> SseEvent {
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
