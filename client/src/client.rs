//! The Rust client of a strata coordinator: connect, generate a stream of tokens, or collect them.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use strata_proto::v1;
use strata_proto::v1::coordinator_client::CoordinatorClient;
use strata_transport::{AuthChannel, Security, TransportError};

/// What can go wrong talking to a coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator could not be reached.
    #[error("cannot connect to the coordinator at {url}: {reason}")]
    Connect { url: String, reason: String },
    /// The coordinator answered with an error (not a `source`: its text is all there is, and
    /// printing it as a cause too would repeat it).
    #[error("{}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    /// The stream broke the protocol (e.g. ended without a final message).
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        // A plaintext client talking to a TLS port sees the TLS handshake as a malformed HTTP/2
        // frame; say what that usually means.
        if strata_transport::error_chain(&status).contains("frame with invalid size") {
            let message = format!(
                "{}: the server's answer is not HTTP/2 (is it using TLS? dial it with --keys DIR or \
                 --tls-ca, or an https:// address)",
                status.message()
            );
            return Self::Status(tonic::Status::new(status.code(), message));
        }
        Self::Status(status)
    }
}

/// How to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// New tokens at most; 0 lets the coordinator choose.
    pub max_tokens: u32,
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: u32,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    pub seed: u64,
    /// OpenAI's presence and frequency penalties (over generated tokens); 0 disables.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Over prompt and generated tokens; 1 (or 0) disables.
    pub repetition_penalty: f32,
    /// `(token id, bias)` added to those logits.
    pub logit_bias: Vec<(u32, f32)>,
    pub stop: Vec<String>,
    /// Alternatives to report per token (at most 20).
    pub top_logprobs: u32,
    pub ignore_eos: bool,
    /// Send the prompt as one user message of a conversation, rendered by the coordinator with the
    /// model's chat template.
    pub chat: bool,
    /// Read control-token text in a raw prompt as those tokens (see `GenerateRequest`).
    pub parse_special: bool,
    /// The grammar the output must follow.
    pub constraint: Option<OutputConstraint>,
}

/// A grammar for the output (see `GenerateRequest.constraint`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputConstraint {
    /// A JSON Schema's text: the output is one JSON value valid under it.
    JsonSchema(String),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 0,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            stop: Vec::new(),
            top_logprobs: 0,
            ignore_eos: false,
            chat: false,
            parse_special: false,
            constraint: None,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Eos,
    /// `max_tokens` were generated.
    Length,
    /// A stop string appeared.
    Stop,
    /// The context was full.
    Context,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eos => "eos",
            Self::Length => "length",
            Self::Stop => "stop",
            Self::Context => "context",
        }
    }
}

/// A generated token as it arrives.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub id: u32,
    /// The text this token completes (may be empty inside a multi-byte character).
    pub text: String,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
    /// Since the request arrived at the coordinator.
    pub elapsed: Duration,
}

/// The end of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_ids: Vec<u32>,
    pub generated_tokens: u32,
    pub queue: Duration,
    pub ttft: Duration,
    pub total: Duration,
    /// Device time per stage over the request's steps.
    pub stage_forward: Vec<Duration>,
    /// Hop overhead per stage (round trip minus device time) over the request's steps.
    pub stage_hop: Vec<Duration>,
    /// Text that belongs after the last token's text.
    pub trailing_text: String,
    /// Prompt tokens copied from the prefix cache instead of computed.
    pub cached_tokens: u32,
}

/// One event of a generation stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token(Token),
    Finished(Finished),
}

/// A stream of events; it ends after `Event::Finished` or an error.
pub type TokenStream = Pin<Box<dyn Stream<Item = Result<Event, ClientError>> + Send>>;

/// A whole generation, collected.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub ttft: Duration,
    pub total: Duration,
    /// When each token arrived, since the request arrived.
    pub token_times: Vec<Duration>,
    /// Per token, its log-probability under the raw logits.
    pub logprobs: Vec<f32>,
    /// Per token, the most likely alternatives (if asked for).
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub stage_forward: Vec<Duration>,
    pub stage_hop: Vec<Duration>,
    /// Prompt tokens copied from the prefix cache instead of computed.
    pub cached_tokens: u32,
}

impl Generation {
    /// Decode speed: tokens after the first over the time after the first.
    pub fn decode_tokens_per_s(&self) -> f64 {
        decode_rate(self.token_ids.len(), self.ttft, self.total)
    }

    /// End-to-end speed: tokens over the whole request time.
    pub fn tokens_per_s(&self) -> f64 {
        let total = self.total.as_secs_f64();
        if total <= 0.0 {
            return 0.0;
        }
        self.token_ids.len() as f64 / total
    }
}

/// Decode speed of a stream of `tokens` whose first came at `ttft` and last at `total`: the tokens
/// after the first over the time after the first (0 when there is nothing to measure).
pub fn decode_rate(tokens: usize, ttft: Duration, total: Duration) -> f64 {
    let decode = total.saturating_sub(ttft).as_secs_f64();
    if tokens < 2 || decode <= 0.0 {
        return 0.0;
    }
    (tokens - 1) as f64 / decode
}

/// A connection to a coordinator. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct StrataClient {
    inner: CoordinatorClient<AuthChannel>,
}

impl StrataClient {
    /// Connects to `url` (`http://host:port`, or `host:port`) without TLS or a token.
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        Self::connect_with(url, &Security::none()).await
    }

    /// Connects to `url` with `security`: TLS when it trusts a CA (then `host:port` means https),
    /// and its token on every call.
    pub async fn connect_with(url: &str, security: &Security) -> Result<Self, ClientError> {
        let channel = security
            .connect(url, Duration::from_secs(5))
            .await
            .map_err(|e| match e {
                TransportError::Connect { address, reason } => ClientError::Connect {
                    url: address,
                    reason,
                },
                other => ClientError::Connect {
                    url: url.to_string(),
                    reason: other.to_string(),
                },
            })?;
        Ok(Self {
            inner: CoordinatorClient::new(channel).max_decoding_message_size(64 << 20),
        })
    }

    /// Starts a generation; tokens arrive on the stream as the pipeline produces them. Dropping the
    /// stream cancels the request.
    pub async fn generate(
        &self,
        prompt: &str,
        params: &GenerateParams,
    ) -> Result<TokenStream, ClientError> {
        let (prompt, messages) = if params.chat {
            let message = v1::ChatMessage {
                role: "user".into(),
                content: prompt.to_string(),
                ..Default::default()
            };
            (String::new(), vec![message])
        } else {
            (prompt.to_string(), Vec::new())
        };
        let request = v1::GenerateRequest {
            prompt,
            messages,
            max_tokens: params.max_tokens,
            sampling: Some(v1::SamplingParams {
                temperature: params.temperature,
                top_k: params.top_k,
                top_p: params.top_p,
                seed: params.seed,
                min_p: params.min_p,
                presence_penalty: params.presence_penalty,
                frequency_penalty: params.frequency_penalty,
                repetition_penalty: params.repetition_penalty,
                logit_bias: params
                    .logit_bias
                    .iter()
                    .map(|&(id, bias)| v1::TokenBias { id, bias })
                    .collect(),
            }),
            stop: params.stop.clone(),
            top_logprobs: params.top_logprobs,
            ignore_eos: params.ignore_eos,
            parse_special: params.parse_special,
            tools: Vec::new(),
            tool_choice: None,
            constraint: params.constraint.as_ref().map(|c| v1::OutputConstraint {
                grammar: Some(match c {
                    OutputConstraint::JsonSchema(s) => {
                        v1::output_constraint::Grammar::JsonSchema(s.clone())
                    }
                    OutputConstraint::Lark(s) => v1::output_constraint::Grammar::Lark(s.clone()),
                }),
            }),
        };
        let stream = self.inner.clone().generate(request).await?.into_inner();
        Ok(Box::pin(stream.map(|item| {
            let response = item?;
            match response.event {
                Some(v1::generate_response::Event::Token(t)) => Ok(Event::Token(Token {
                    id: t.id,
                    text: t.text,
                    logprob: t.logprob,
                    top_logprobs: t
                        .top_logprobs
                        .into_iter()
                        .map(|l| (l.id, l.logprob))
                        .collect(),
                    elapsed: Duration::from_micros(t.elapsed_us),
                })),
                Some(v1::generate_response::Event::Finished(f)) => {
                    Ok(Event::Finished(finished_from_wire(f)?))
                }
                None => Err(ClientError::Protocol("an event with no content".into())),
            }
        })))
    }

    /// Generates and collects the whole output.
    pub async fn generate_collect(
        &self,
        prompt: &str,
        params: &GenerateParams,
    ) -> Result<Generation, ClientError> {
        collect(self.generate(prompt, params).await?).await
    }

    /// Generates for several prompts at once; the coordinator batches them through the pipeline.
    /// Results come back in prompt order.
    pub async fn generate_batch(
        &self,
        prompts: &[String],
        params: &GenerateParams,
    ) -> Vec<Result<Generation, ClientError>> {
        futures::future::join_all(prompts.iter().map(|p| self.generate_collect(p, params))).await
    }

    /// Encodes text as the coordinator encodes prompts (control-token text as text).
    pub async fn tokenize(&self, text: &str) -> Result<Vec<u32>, ClientError> {
        let r = self
            .inner
            .clone()
            .tokenize(v1::TokenizeRequest {
                text: text.into(),
                parse_special: false,
            })
            .await?;
        Ok(r.into_inner().ids)
    }

    /// The coordinator's model, plan and load.
    pub async fn info(&self) -> Result<v1::CoordinatorInfo, ClientError> {
        Ok(self
            .inner
            .clone()
            .info(v1::CoordinatorInfoRequest {})
            .await?
            .into_inner())
    }

    /// Whether the coordinator can serve now (`NOT_READY` with the reason while a stage is lost).
    pub async fn health(&self) -> Result<v1::HealthResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .health(v1::HealthRequest {})
            .await?
            .into_inner())
    }
}

/// Collects a stream into a [`Generation`].
pub async fn collect(mut stream: TokenStream) -> Result<Generation, ClientError> {
    let mut token_ids = Vec::new();
    let mut text = String::new();
    let mut token_times = Vec::new();
    let mut logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    while let Some(event) = stream.next().await {
        match event? {
            Event::Token(t) => {
                token_ids.push(t.id);
                text.push_str(&t.text);
                token_times.push(t.elapsed);
                logprobs.push(t.logprob);
                top_logprobs.push(t.top_logprobs);
            }
            Event::Finished(f) => {
                text.push_str(&f.trailing_text);
                return Ok(Generation {
                    prompt_ids: f.prompt_ids,
                    token_ids,
                    text,
                    finish_reason: f.reason,
                    ttft: f.ttft,
                    total: f.total,
                    token_times,
                    logprobs,
                    top_logprobs,
                    stage_forward: f.stage_forward,
                    stage_hop: f.stage_hop,
                    cached_tokens: f.cached_tokens,
                });
            }
        }
    }
    Err(ClientError::Protocol(
        "the stream ended without a final message".into(),
    ))
}

fn finished_from_wire(f: v1::GenerateFinished) -> Result<Finished, ClientError> {
    let reason = match v1::FinishReason::try_from(f.reason) {
        Ok(v1::FinishReason::Eos) => FinishReason::Eos,
        Ok(v1::FinishReason::Length) => FinishReason::Length,
        Ok(v1::FinishReason::Stop) => FinishReason::Stop,
        Ok(v1::FinishReason::Context) => FinishReason::Context,
        _ => {
            return Err(ClientError::Protocol(format!(
                "unknown finish reason {}",
                f.reason
            )))
        }
    };
    Ok(Finished {
        reason,
        prompt_ids: f.prompt_ids,
        generated_tokens: f.generated_tokens,
        queue: Duration::from_micros(f.queue_us),
        ttft: Duration::from_micros(f.ttft_us),
        total: Duration::from_micros(f.total_us),
        stage_forward: f
            .stage_forward_us
            .into_iter()
            .map(Duration::from_micros)
            .collect(),
        stage_hop: f
            .stage_hop_us
            .into_iter()
            .map(Duration::from_micros)
            .collect(),
        trailing_text: f.trailing_text,
        cached_tokens: f.cached_tokens,
    })
}
