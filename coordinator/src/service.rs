//! The gRPC boundary of the coordinator: requests are validated and tokenized here, then handed to
//! the scheduler as domain types.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use strata_model::{
    CallCheck, CallReader, ChatPromptError, ChatTemplate, ModelFile, TextTokenizer,
};
use strata_proto::v1;
use strata_transport::Caller;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::events::{EventReceiver, Failure, FinishReason, GenerationEvent};
use crate::grammar::Grammars;
use crate::metrics::{Api, Metrics};
use crate::pipeline::Sampling;
use crate::scheduler::{GenerationRequest, SchedulerHandle};
use crate::CoordinatorError;

/// Limits on what one request may ask for.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Used when a request says 0.
    pub default_max_tokens: usize,
    /// The most new tokens one request may ask for.
    pub max_new_tokens: usize,
    /// The longest prompt accepted, in bytes, before tokenizing.
    pub max_prompt_bytes: usize,
    pub max_stop_strings: usize,
    pub max_stop_bytes: usize,
    /// Chat messages in one request.
    pub max_messages: usize,
    /// The longest a request may run, queueing included; a client's `grpc-timeout` can only
    /// shorten it.
    pub max_request_time: Duration,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            default_max_tokens: 256,
            max_new_tokens: 8192,
            max_prompt_bytes: 1 << 20,
            max_stop_strings: 16,
            max_stop_bytes: 256,
            max_messages: 4096,
            max_request_time: Duration::from_secs(600),
        }
    }
}

/// The `strata.v1.Coordinator` service; the HTTP API shares it (`start_generation`, `info`).
#[derive(Clone)]
pub struct CoordinatorService {
    pub(crate) scheduler: SchedulerHandle,
    pub(crate) tokenizer: Arc<TextTokenizer>,
    pub(crate) model: Arc<ModelFile>,
    /// The model's chat template, when its files carry one.
    pub(crate) chat: Option<Arc<ChatTemplate>>,
    pub(crate) limits: RequestLimits,
    pub(crate) metrics: Arc<Metrics>,
    /// Where tokenizing and template rendering run (`prompt_threads.rs`).
    pub(crate) prompt_work: Arc<crate::prompt_threads::PromptThreads>,
    /// The vocabulary for constrained decoding, built by the first request that has a grammar.
    pub(crate) grammars: Arc<std::sync::OnceLock<Result<Grammars, String>>>,
}

fn invalid(message: String) -> Status {
    CoordinatorError::InvalidRequest(message).into()
}

impl CoordinatorService {
    /// Runs `work` (tokenizing, rendering) on the prompt threads, so the async threads keep
    /// streaming meanwhile.
    async fn off_async_threads<T: Send + 'static>(
        &self,
        work: impl FnOnce(&CoordinatorService) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let (done, result) = tokio::sync::oneshot::channel();
        let service = self.clone();
        self.prompt_work.run(Box::new(move || {
            let _ = done.send(work(&service));
        }));
        result
            .await
            .map_err(|_| Status::internal("tokenizing failed"))?
    }

    fn check_prompt_bytes(&self, bytes: usize, what: &str) -> Result<(), Status> {
        if bytes > self.limits.max_prompt_bytes {
            return Err(invalid(format!(
                "{what} of {bytes} bytes {} over the limit of {}",
                if what.ends_with('s') { "are" } else { "is" },
                self.limits.max_prompt_bytes
            )));
        }
        Ok(())
    }

    /// `text`'s ids, control-token text read as those tokens only with `parse_special`; its size
    /// is checked by the caller, before it queues the work.
    fn tokenize(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, Status> {
        self.tokenizer
            .encode_prompt(text, parse_special)
            .map_err(|e| Status::internal(format!("tokenizer: {e}")))
    }

    /// The prompt's ids: `prompt` as given, or `messages` rendered with the model's chat template,
    /// every client string in them and in `tools` tokenized as text (a control token typed in any
    /// field stays characters) and every role one of OpenAI's.
    fn prompt_ids(
        &self,
        r: &v1::GenerateRequest,
        tools: &[strata_model::Tool],
    ) -> Result<Vec<u32>, Status> {
        if r.messages.is_empty() {
            return self.tokenize(&r.prompt, r.parse_special);
        }
        if !r.prompt.is_empty() {
            return Err(invalid(
                "give either a prompt or chat messages, not both".into(),
            ));
        }
        let Some(template) = &self.chat else {
            return Err(invalid(format!(
                "{} has no chat template: send a plain prompt instead of messages",
                self.model.name
            )));
        };
        let messages = tools::chat_messages(&r.messages)
            .map_err(|e| invalid(format!("chat messages: {e}")))?;
        // `validate` has checked the messages' sizes.
        template
            .prompt_ids(
                &self.tokenizer,
                &messages,
                tools,
                self.limits.max_prompt_bytes,
            )
            .map_err(|e| match e {
                ChatPromptError::Invalid(why) => invalid(format!("chat messages: {why}")),
                ChatPromptError::Tokenizer(e) => Status::internal(format!("tokenizer: {e}")),
            })
    }

    /// The grammar side of the vocabulary (built the first time).
    fn grammars(&self) -> Result<&Grammars, Status> {
        self.grammars
            .get_or_init(|| Grammars::new(&self.tokenizer, self.model.config.vocab_size))
            .as_ref()
            .map_err(|e| Status::failed_precondition(format!("constrained decoding: {e}")))
    }

    /// `spec` compiled against the vocabulary.
    fn compile_grammar(
        &self,
        spec: &crate::grammar::GrammarSpec,
    ) -> Result<crate::grammar::Constraint, Status> {
        self.grammars()?
            .compile(spec)
            .map_err(|e| invalid(format!("the output grammar does not compile: {e}")))
    }

    /// Which calls read from the output count for a request offering `tools`: a call to one of
    /// them whose arguments fit its schema (read as a constrained output would be). Each schema
    /// must compile, or the request is refused naming the tool.
    fn call_check(&self, tools: &[strata_model::Tool]) -> Result<CallCheck, Status> {
        let grammars = self.grammars()?;
        for (i, t) in tools.iter().enumerate() {
            let spec = crate::grammar::GrammarSpec::JsonSchema(t.parameters.clone());
            grammars.compile(&spec).map_err(|e| {
                invalid(format!(
                    "tools[{i}].function.parameters: the schema cannot be checked: {e}"
                ))
            })?;
        }
        let schemas: Vec<(String, serde_json::Value)> = tools
            .iter()
            .map(|t| (t.name.clone(), t.parameters.clone()))
            .collect();
        let grammars = self.grammars.clone();
        Ok(Arc::new(move |call| {
            let Some((_, schema)) = schemas.iter().find(|(name, _)| *name == call.name) else {
                return false;
            };
            matches!(grammars.get(), Some(Ok(g)) if g.fits(schema, &call.arguments))
        }))
    }

    fn validate(
        &self,
        r: v1::GenerateRequest,
        client_timeout: Option<Duration>,
        request_id: Arc<str>,
        caller: Arc<str>,
    ) -> Result<(GenerationRequest, Option<CallReader>), Status> {
        // The cheap checks first: a request refused for its sizes costs no tokenizing.
        if r.messages.len() > self.limits.max_messages {
            return Err(invalid(format!(
                "{} chat messages; at most {} are allowed",
                r.messages.len(),
                self.limits.max_messages
            )));
        }
        let call_bytes = |m: &v1::ChatMessage| {
            m.tool_calls
                .iter()
                .map(|c| c.id.len() + c.name.len() + c.arguments_json.len())
                .sum::<usize>()
                + m.tool_call_id.len()
                + m.name.len()
        };
        let prompt_bytes = r.prompt.len()
            + r.messages
                .iter()
                .map(|m| m.content.len() + m.role.len() + call_bytes(m))
                .sum::<usize>()
            + r.tools
                .iter()
                .map(|t| t.name.len() + t.description.len() + t.parameters_json.len())
                .sum::<usize>()
            + r.constraint
                .iter()
                .filter_map(|c| c.grammar.as_ref())
                .map(|g| match g {
                    v1::output_constraint::Grammar::JsonSchema(t)
                    | v1::output_constraint::Grammar::Lark(t) => t.len(),
                })
                .sum::<usize>();
        let what = if r.messages.is_empty() {
            "prompt"
        } else {
            "messages"
        };
        self.check_prompt_bytes(prompt_bytes, what)?;
        let max_tokens = match r.max_tokens as usize {
            0 => self.limits.default_max_tokens,
            n if n > self.limits.max_new_tokens => {
                return Err(invalid(format!(
                    "max_tokens {n} is over the limit of {}",
                    self.limits.max_new_tokens
                )))
            }
            n => n,
        };
        if let Some(p) = &r.sampling {
            p.check().map_err(invalid)?;
            let vocab = self.model.config.vocab_size;
            if let Some(b) = p.logit_bias.iter().find(|b| b.id as usize >= vocab) {
                return Err(invalid(format!(
                    "logit_bias names token {}, outside the vocabulary of {vocab}",
                    b.id
                )));
            }
        }
        let sampling = r
            .sampling
            .clone()
            .map_or_else(Sampling::greedy, Sampling::from);
        if r.top_logprobs > 20 {
            return Err(invalid(format!(
                "top_logprobs {} is over the limit of 20",
                r.top_logprobs
            )));
        }
        if r.stop.len() > self.limits.max_stop_strings {
            return Err(invalid(format!(
                "{} stop strings; at most {} are allowed",
                r.stop.len(),
                self.limits.max_stop_strings
            )));
        }
        if let Some(long) = r.stop.iter().find(|s| s.len() > self.limits.max_stop_bytes) {
            return Err(invalid(format!(
                "a stop string of {} bytes is over the limit of {}",
                long.len(),
                self.limits.max_stop_bytes
            )));
        }
        let tool_use = tools::tool_use(&r, self.chat.as_deref()).map_err(invalid)?;
        let prompt_ids = self.prompt_ids(&r, &tool_use.tools)?;
        if prompt_ids.is_empty() {
            return Err(invalid(
                "the prompt is empty: give at least one token of text".into(),
            ));
        }
        let context = self.model.config.context_length;
        if prompt_ids.len() >= context {
            return Err(invalid(format!(
                "the prompt is {} tokens; the model's context length is {context}, leaving no room to generate",
                prompt_ids.len()
            )));
        }
        let time = client_timeout.map_or(self.limits.max_request_time, |t| {
            t.min(self.limits.max_request_time)
        });
        let constraint = tool_use
            .grammar
            .as_ref()
            .map(|g| self.compile_grammar(g).map(Box::new))
            .transpose()?;
        let request = GenerationRequest {
            prompt_ids,
            max_tokens,
            sampling,
            stop: r.stop,
            top_logprobs: r.top_logprobs,
            ignore_eos: r.ignore_eos,
            deadline: tokio::time::Instant::now() + time,
            request_id,
            caller,
            constraint,
        };
        let calls = match tool_use.format {
            Some(format) => Some(CallReader::new(format, self.call_check(&tool_use.tools)?)),
            None => None,
        };
        Ok((request, calls))
    }

    /// Validates, tokenizes and queues a request: the one way in for every API. Refusals and the
    /// request's events are counted in the metrics under `api` and the caller's key name.
    pub async fn start_generation(
        &self,
        request: v1::GenerateRequest,
        client_timeout: Option<Duration>,
        request_id: Arc<str>,
        caller: Caller,
        api: Api,
    ) -> Result<Events, Status> {
        let key: Arc<str> = caller.label().into();
        let started = async {
            let key = key.clone();
            let (request, calls) = self
                .off_async_threads(move |service| {
                    service.validate(request, client_timeout, request_id, key)
                })
                .await?;
            let prompt_tokens = request.prompt_ids.len();
            let (events, stream) = mpsc::unbounded_channel();
            self.scheduler.submit(request, events).await?;
            Ok::<_, Status>((stream, prompt_tokens, calls))
        }
        .await;
        match started {
            Ok((stream, prompt_tokens, calls)) => {
                self.metrics.request_accepted(prompt_tokens);
                Ok(Events {
                    stream,
                    metrics: self.metrics.clone(),
                    api,
                    key,
                    last_token: None,
                    ended: false,
                    calls,
                    text: String::new(),
                    content: None,
                })
            }
            Err(status) => {
                self.metrics
                    .request_ended(api, &key, &code_label(status.code()));
                Err(status)
            }
        }
    }

    /// The coordinator's state: model, stages and their load.
    pub async fn info(&self) -> Result<v1::CoordinatorInfo, Status> {
        let stats = self.scheduler.stats().await?;
        let pipeline = &stats.pipeline;
        let active = pipeline.active_sequences().await;
        let stages = pipeline
            .stages()
            .iter()
            .zip(active)
            .zip(pipeline.counters())
            .map(|((s, active), c)| v1::StageInfo {
                worker: s.address.clone(),
                device: s.device.clone(),
                physical_device: s.physical_device.clone(),
                layers: Some(v1::LayerRange {
                    start: s.layers.start as u32,
                    end: s.layers.end as u32,
                }),
                active_sequences: active.unwrap_or(0),
                forward_ns_total: c.forward_ns.load(Ordering::Relaxed),
                round_trip_ns_total: c.round_trip_ns.load(Ordering::Relaxed),
                steps_total: c.steps.load(Ordering::Relaxed),
            })
            .collect();
        Ok(v1::CoordinatorInfo {
            model: Some(strata_model::wire::model_info(&self.model)),
            stages,
            active_sequences: stats.active as u32,
            queued_requests: stats.queued as u32,
        })
    }

    /// Whether the pipeline serves, and a line saying so or why not.
    pub async fn health(&self) -> Result<(bool, String), Status> {
        let stats = self.scheduler.stats().await?;
        Ok(match stats.outage {
            Some(outage) => (false, outage),
            None => (
                true,
                format!(
                    "serving {} over {} stages",
                    self.model.name,
                    stats.pipeline.stages().len()
                ),
            ),
        })
    }

    /// `/metrics` in Prometheus' text format.
    pub async fn metrics_text(&self) -> Result<String, Status> {
        let stats = self.scheduler.stats().await?;
        Ok(self.metrics.render(&stats))
    }

    pub fn model(&self) -> &ModelFile {
        &self.model
    }

    /// The text of one token as the APIs show it alone (logprobs' `token`): a token that ends
    /// inside a character shows as U+FFFD.
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id]).unwrap_or_default()
    }
}

/// A request's events as the scheduler sends them, counted into the metrics as they pass and
/// converted to the wire. A stream dropped before its last event counts as a cancelled request.
pub struct Events {
    stream: EventReceiver,
    metrics: Arc<Metrics>,
    api: Api,
    /// The API key's name (`-` on an open port).
    key: Arc<str>,
    last_token: Option<Duration>,
    ended: bool,
    /// How the output's calls are read, when the request offered tools.
    calls: Option<CallReader>,
    /// The output so far, kept only with `calls`, to parse the calls at the end.
    text: String,
    /// With `calls`, once finished: the output without its calls.
    content: Option<String>,
}

impl Events {
    /// How the output's tool calls are read, when the request offered tools.
    pub fn call_reader(&self) -> Option<CallReader> {
        self.calls.clone()
    }

    /// With tools, after the final event: the output's text without the calls it makes (which are
    /// in the event's `tool_calls`), parsed once for both.
    pub fn take_content(&mut self) -> Option<String> {
        self.content.take()
    }

    fn observe(&mut self, item: &Result<GenerationEvent, Failure>) {
        match item {
            Ok(GenerationEvent::Token(token)) => {
                let gap = self
                    .last_token
                    .map(|last| token.elapsed.saturating_sub(last).as_secs_f64());
                self.metrics.token(token.elapsed.as_secs_f64(), gap);
                self.last_token = Some(token.elapsed);
            }
            Ok(GenerationEvent::Finished(finished)) => {
                self.ended = true;
                self.metrics.request_finished(finished.total.as_secs_f64());
                self.metrics
                    .request_ended(self.api, &self.key, finished.reason.label());
            }
            Err(failure) => {
                self.ended = true;
                let code = crate::error::grpc_code(failure.kind);
                self.metrics
                    .request_ended(self.api, &self.key, &code_label(code));
            }
        }
    }
}

/// A scheduler event on the wire.
fn to_wire(item: Result<GenerationEvent, Failure>) -> Result<v1::GenerateResponse, Status> {
    use v1::generate_response::Event;
    let micros = |d: Duration| d.as_micros() as u64;
    let event = match item? {
        GenerationEvent::Token(t) => Event::Token(v1::GeneratedToken {
            id: t.id,
            text: t.text,
            logprob: t.logprob,
            top_logprobs: t
                .top_logprobs
                .into_iter()
                .map(|(id, logprob)| v1::TokenLogprob { id, logprob })
                .collect(),
            elapsed_us: micros(t.elapsed),
        }),
        GenerationEvent::Finished(f) => Event::Finished(v1::GenerateFinished {
            reason: wire_reason(f.reason) as i32,
            prompt_ids: f.prompt_ids,
            generated_tokens: f.generated_tokens,
            queue_us: micros(f.queue),
            ttft_us: micros(f.ttft),
            total_us: micros(f.total),
            stage_forward_us: f.stage_forward.into_iter().map(micros).collect(),
            stage_hop_us: f.stage_hop.into_iter().map(micros).collect(),
            trailing_text: f.trailing_text,
            tool_calls: Vec::new(),
            cached_tokens: f.cached_tokens,
        }),
    };
    Ok(v1::GenerateResponse { event: Some(event) })
}

fn wire_reason(reason: FinishReason) -> v1::FinishReason {
    match reason {
        FinishReason::Eos => v1::FinishReason::Eos,
        FinishReason::Length => v1::FinishReason::Length,
        FinishReason::Stop => v1::FinishReason::Stop,
        FinishReason::Context => v1::FinishReason::Context,
    }
}

impl Stream for Events {
    type Item = Result<v1::GenerateResponse, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let polled = self.stream.poll_recv(cx);
        if let std::task::Poll::Ready(Some(item)) = &polled {
            self.observe(item);
        }
        polled.map(|item| {
            item.map(|item| {
                let calls = self.calls.clone().and_then(|reader| match &item {
                    Ok(GenerationEvent::Token(t)) => {
                        self.text.push_str(&t.text);
                        None
                    }
                    Ok(GenerationEvent::Finished(f)) => {
                        self.text.push_str(&f.trailing_text);
                        let (content, calls) = tools::split_output(&reader, &self.text);
                        self.content = Some(content);
                        Some(calls.iter().map(tools::wire_call).collect())
                    }
                    Err(_) => None,
                });
                let mut wire = to_wire(item);
                if let (
                    Some(calls),
                    Ok(v1::GenerateResponse {
                        event: Some(v1::generate_response::Event::Finished(f)),
                    }),
                ) = (calls, &mut wire)
                {
                    f.tool_calls = calls;
                }
                wire
            })
        })
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        if !self.ended {
            self.metrics.request_ended(self.api, &self.key, "cancelled");
        }
    }
}

/// A gRPC code as a metrics label: `ResourceExhausted` → `resource_exhausted`.
fn code_label(code: tonic::Code) -> String {
    let name = format!("{code:?}");
    let mut label = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            label.push('_');
        }
        label.push(c.to_ascii_lowercase());
    }
    label
}

/// The id that names a request in logs: the caller's `x-request-id` when it is a sensible token
/// (at most 64 characters of `[A-Za-z0-9._-]`), else 16 random hex digits.
pub fn request_id(header: Option<&str>) -> Arc<str> {
    if let Some(id) = header.filter(|id| {
        !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    }) {
        return id.into();
    }
    format!("{:016x}", random_u64()).into()
}

/// 64 random bits from the OS (request ids, the seeds of requests that name none); the clock's
/// nanoseconds if the OS has no randomness to give.
pub(crate) fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    match getrandom::fill(&mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64,
    }
}

#[tonic::async_trait]
impl v1::coordinator_server::Coordinator for CoordinatorService {
    type GenerateStream = Events;

    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let metadata = request.metadata();
        let client_timeout = metadata
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let id = request_id(metadata.get("x-request-id").and_then(|v| v.to_str().ok()));
        let caller = request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or_default();
        let events = self
            .start_generation(
                request.into_inner(),
                client_timeout,
                id.clone(),
                caller,
                Api::Grpc,
            )
            .await?;
        let mut response = Response::new(events);
        if let Ok(value) = id.parse() {
            response.metadata_mut().insert("x-request-id", value);
        }
        Ok(response)
    }

    async fn tokenize(
        &self,
        request: Request<v1::TokenizeRequest>,
    ) -> Result<Response<v1::TokenizeResponse>, Status> {
        let v1::TokenizeRequest {
            text,
            parse_special,
        } = request.into_inner();
        self.check_prompt_bytes(text.len(), "prompt")?;
        let ids = self
            .off_async_threads(move |service| service.tokenize(&text, parse_special))
            .await?;
        Ok(Response::new(v1::TokenizeResponse { ids }))
    }

    async fn info(
        &self,
        _: Request<v1::CoordinatorInfoRequest>,
    ) -> Result<Response<v1::CoordinatorInfo>, Status> {
        Ok(Response::new(CoordinatorService::info(self).await?))
    }

    async fn health(
        &self,
        _: Request<v1::HealthRequest>,
    ) -> Result<Response<v1::HealthResponse>, Status> {
        let (serving, message) = CoordinatorService::health(self).await?;
        let status = if serving {
            v1::health_response::Status::Serving
        } else {
            v1::health_response::Status::NotReady
        };
        Ok(Response::new(v1::HealthResponse {
            status: status as i32,
            message,
        }))
    }
}

/// A `grpc-timeout` header value (`100m`, `5S`, ...: at most 8 digits and a unit).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

pub mod tools;

#[cfg(test)]
mod tests;
