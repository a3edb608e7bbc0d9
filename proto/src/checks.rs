//! What makes a [`v1::SamplingParams`] valid: one rule for the coordinator, which checks what
//! clients send, and the workers, which check what reaches them.

use crate::v1;

/// The most `logit_bias` entries a request may carry (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;

/// Whether penalties of these strengths change any logit: 0 is none, and a repetition penalty of 0
/// (unset) or 1 is none.
pub fn penalties_apply(presence: f32, frequency: f32, repetition: f32) -> bool {
    presence != 0.0 || frequency != 0.0 || (repetition != 0.0 && repetition != 1.0)
}

impl v1::SamplingParams {
    /// Why these parameters are out of range, if they are. Token ids are checked by whoever knows
    /// the vocabulary.
    pub fn check(&self) -> Result<(), String> {
        let in_range = |name: &str, v: f32, lo: f32, hi: f32| {
            if v.is_finite() && (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} {v} must be in [{lo}, {hi}]"))
            }
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature {} must be a finite number ≥ 0",
                self.temperature
            ));
        }
        in_range("top_p", self.top_p, 0.0, 1.0)?;
        in_range("min_p", self.min_p, 0.0, 1.0)?;
        in_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        in_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        if self.repetition_penalty != 0.0 {
            in_range("repetition_penalty", self.repetition_penalty, 0.01, 10.0)?;
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(format!(
                "{} logit_bias entries; at most {MAX_LOGIT_BIAS} are allowed",
                self.logit_bias.len()
            ));
        }
        for b in &self.logit_bias {
            in_range("a logit_bias value", b.bias, -100.0, 100.0)?;
        }
        Ok(())
    }

    /// Whether these parameters change the logits before the choice, so the last stage needs the
    /// sequence's tokens so far ([`v1::TokenCount`]s) to apply them.
    pub fn penalizes(&self) -> bool {
        penalties_apply(
            self.presence_penalty,
            self.frequency_penalty,
            self.repetition_penalty,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> v1::SamplingParams {
        v1::SamplingParams {
            temperature: 0.7,
            top_p: 1.0,
            ..Default::default()
        }
    }

    #[test]
    fn each_bound_is_checked() {
        assert_eq!(params().check(), Ok(()));
        let cases: Vec<(v1::SamplingParams, &str)> = vec![
            (
                v1::SamplingParams {
                    temperature: -1.0,
                    ..params()
                },
                "temperature -1",
            ),
            (
                v1::SamplingParams {
                    temperature: f32::NAN,
                    ..params()
                },
                "temperature NaN",
            ),
            (
                v1::SamplingParams {
                    top_p: 1.5,
                    ..params()
                },
                "top_p 1.5",
            ),
            (
                v1::SamplingParams {
                    min_p: -0.1,
                    ..params()
                },
                "min_p -0.1",
            ),
            (
                v1::SamplingParams {
                    presence_penalty: 2.5,
                    ..params()
                },
                "presence_penalty 2.5",
            ),
            (
                v1::SamplingParams {
                    frequency_penalty: f32::INFINITY,
                    ..params()
                },
                "frequency_penalty inf",
            ),
            (
                v1::SamplingParams {
                    repetition_penalty: -1.0,
                    ..params()
                },
                "repetition_penalty -1",
            ),
            (
                v1::SamplingParams {
                    repetition_penalty: 11.0,
                    ..params()
                },
                "repetition_penalty 11",
            ),
            (
                v1::SamplingParams {
                    logit_bias: vec![v1::TokenBias { id: 1, bias: 101.0 }],
                    ..params()
                },
                "a logit_bias value 101",
            ),
            (
                v1::SamplingParams {
                    logit_bias: vec![v1::TokenBias { id: 1, bias: 1.0 }; MAX_LOGIT_BIAS + 1],
                    ..params()
                },
                "301 logit_bias entries",
            ),
        ];
        for (p, want) in cases {
            let err = p.check().expect_err(want);
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn only_penalties_need_the_tokens_so_far() {
        assert!(!params().penalizes());
        let biased = v1::SamplingParams {
            logit_bias: vec![v1::TokenBias { id: 1, bias: 5.0 }],
            min_p: 0.1,
            ..params()
        };
        assert!(!biased.penalizes());
        assert!(!v1::SamplingParams {
            repetition_penalty: 1.0,
            ..params()
        }
        .penalizes());
        assert!(v1::SamplingParams {
            repetition_penalty: 1.1,
            ..params()
        }
        .penalizes());
        assert!(v1::SamplingParams {
            presence_penalty: 0.5,
            ..params()
        }
        .penalizes());
        assert!(v1::SamplingParams {
            frequency_penalty: -0.5,
            ..params()
        }
        .penalizes());
    }
}
