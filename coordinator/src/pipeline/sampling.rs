//! How the last stage picks a token, and what it picked, as the scheduler sees them.

use strata_proto::v1;

/// How the last stage picks a sequence's next token (validated by the service).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: u32,
    /// 1 keeps every token.
    pub top_p: f32,
    pub seed: u64,
}

impl Sampling {
    /// What a request without sampling parameters gets.
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };
}

impl From<v1::SamplingParams> for Sampling {
    fn from(s: v1::SamplingParams) -> Self {
        Self {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed: s.seed,
        }
    }
}

impl From<Sampling> for v1::SamplingParams {
    fn from(s: Sampling) -> Self {
        Self {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed: s.seed,
        }
    }
}

/// The token the last stage picked for a sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub id: u32,
    pub logprob: f32,
    /// The most likely alternatives `(id, log-probability)`, as many as asked for.
    pub top_logprobs: Vec<(u32, f32)>,
}

impl From<v1::SampledToken> for Sampled {
    fn from(s: v1::SampledToken) -> Self {
        Self {
            id: s.id,
            logprob: s.logprob,
            top_logprobs: s
                .top_logprobs
                .into_iter()
                .map(|t| (t.id, t.logprob))
                .collect(),
        }
    }
}
