//! The gRPC boundary of the coordinator: requests are validated and tokenized here, then handed to
//! the scheduler as domain types.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use strata_model::{ModelFile, TextTokenizer};
use strata_proto::v1;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

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
            max_request_time: Duration::from_secs(600),
        }
    }
}

/// The `strata.v1.Coordinator` service.
pub struct CoordinatorService {
    pub(crate) scheduler: SchedulerHandle,
    pub(crate) tokenizer: Arc<TextTokenizer>,
    pub(crate) model: ModelFile,
    pub(crate) limits: RequestLimits,
}

fn invalid(message: String) -> Status {
    CoordinatorError::InvalidRequest(message).into()
}

impl CoordinatorService {
    fn tokenize(&self, text: &str) -> Result<Vec<u32>, Status> {
        if text.len() > self.limits.max_prompt_bytes {
            return Err(invalid(format!(
                "prompt of {} bytes is over the limit of {}",
                text.len(),
                self.limits.max_prompt_bytes
            )));
        }
        self.tokenizer
            .encode(text)
            .map_err(|e| Status::internal(format!("tokenizer: {e}")))
    }

    fn validate(
        &self,
        r: v1::GenerateRequest,
        client_timeout: Option<Duration>,
    ) -> Result<GenerationRequest, Status> {
        let prompt_ids = self.tokenize(&r.prompt)?;
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
        let sampling = r.sampling.unwrap_or(v1::SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        });
        if !sampling.temperature.is_finite() || sampling.temperature < 0.0 {
            return Err(invalid(format!(
                "temperature {} must be a finite number ≥ 0",
                sampling.temperature
            )));
        }
        if !sampling.top_p.is_finite() || !(0.0..=1.0).contains(&sampling.top_p) {
            return Err(invalid(format!(
                "top_p {} must be in [0, 1]",
                sampling.top_p
            )));
        }
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
        let time = client_timeout.map_or(self.limits.max_request_time, |t| {
            t.min(self.limits.max_request_time)
        });
        Ok(GenerationRequest {
            prompt_ids,
            max_tokens,
            sampling,
            stop: r.stop,
            top_logprobs: r.top_logprobs,
            ignore_eos: r.ignore_eos,
            deadline: Instant::now() + time,
        })
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl v1::coordinator_server::Coordinator for CoordinatorService {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let client_timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let request = self.validate(request.into_inner(), client_timeout)?;
        let (events, stream) = mpsc::unbounded_channel();
        self.scheduler.submit(request, events).await?;
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(
            stream,
        ))))
    }

    async fn tokenize(
        &self,
        request: Request<v1::TokenizeRequest>,
    ) -> Result<Response<v1::TokenizeResponse>, Status> {
        let ids = self.tokenize(&request.into_inner().text)?;
        Ok(Response::new(v1::TokenizeResponse { ids }))
    }

    async fn info(
        &self,
        _: Request<v1::CoordinatorInfoRequest>,
    ) -> Result<Response<v1::CoordinatorInfo>, Status> {
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
        Ok(Response::new(v1::CoordinatorInfo {
            model: Some(strata_model::wire::model_info(&self.model)),
            stages,
            active_sequences: stats.active as u32,
            queued_requests: stats.queued as u32,
        }))
    }

    async fn health(
        &self,
        _: Request<v1::HealthRequest>,
    ) -> Result<Response<v1::HealthResponse>, Status> {
        let stats = self.scheduler.stats().await?;
        let (status, message) = match stats.outage {
            Some(outage) => (v1::health_response::Status::NotReady, outage),
            None => (
                v1::health_response::Status::Serving,
                format!(
                    "serving {} over {} stages",
                    self.model.name,
                    stats.pipeline.stages().len()
                ),
            ),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }
}
