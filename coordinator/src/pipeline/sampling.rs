//! How the last stage picks a token, and what it picked, as the scheduler sees them.

use std::sync::Arc;

use strata_proto::v1;

/// How the last stage picks a sequence's next token (validated by the service).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: u32,
    /// 1 keeps every token.
    pub top_p: f32,
    /// 0 keeps every token.
    pub min_p: f32,
    pub seed: u64,
    /// 0 is none.
    pub presence_penalty: f32,
    /// 0 is none.
    pub frequency_penalty: f32,
    /// 0 or 1 is none.
    pub repetition_penalty: f32,
    /// Added to these tokens' logits; shared, since every step of the sequence sends it.
    pub logit_bias: Arc<[(u32, f32)]>,
}

impl Sampling {
    /// What a request without sampling parameters gets.
    pub fn greedy() -> Self {
        Self::from(v1::SamplingParams {
            top_p: 1.0,
            ..Default::default()
        })
    }

    /// Whether the last stage needs the sequence's tokens so far to pick its next one.
    pub fn penalizes(&self) -> bool {
        strata_proto::penalties_apply(
            self.presence_penalty,
            self.frequency_penalty,
            self.repetition_penalty,
        )
    }
}

impl From<v1::SamplingParams> for Sampling {
    fn from(s: v1::SamplingParams) -> Self {
        Self {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            seed: s.seed,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            repetition_penalty: s.repetition_penalty,
            logit_bias: s.logit_bias.iter().map(|b| (b.id, b.bias)).collect(),
        }
    }
}

impl From<&Sampling> for v1::SamplingParams {
    fn from(s: &Sampling) -> Self {
        Self {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed: s.seed,
            min_p: s.min_p,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            repetition_penalty: s.repetition_penalty,
            logit_bias: s
                .logit_bias
                .iter()
                .map(|&(id, bias)| v1::TokenBias { id, bias })
                .collect(),
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
