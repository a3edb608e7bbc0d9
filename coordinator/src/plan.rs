//! The split planner: which layers each worker runs. Pure functions, no I/O.
//!
//! A plan is a `Vec<Range<usize>>`, one range per worker in worker order, that covers `0..num_layers`
//! exactly once with contiguous, non-empty ranges. [`validate`] is the single check of that invariant;
//! every planner's output goes through it.

use std::ops::Range;

/// How the user asked to split the layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitSpec {
    /// As equal as possible; earlier workers take the remainder.
    Even,
    /// Explicit ranges, e.g. `0-15,15-30`.
    Explicit(Vec<Range<usize>>),
    /// Balanced by each worker's measured speed, within its memory ([`balanced`]).
    Auto,
}

/// What the planner knows of a worker: its measured speed and its memory (see `Calibrate`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkerProfile {
    /// Time of one layer for the calibration micro-batch.
    pub layer_ms: f64,
    /// Extra time of the embedding (first stage).
    pub embedding_ms: f64,
    /// Extra time of the final norm and output head (last stage).
    pub head_ms: f64,
    pub layer_bytes: u64,
    pub embedding_bytes: u64,
    pub head_bytes: u64,
    /// Memory the stage may take on this worker.
    pub memory_bytes: u64,
}

impl WorkerProfile {
    fn time(&self, range: &Range<usize>, num_layers: usize) -> f64 {
        range.len() as f64 * self.layer_ms
            + if range.start == 0 {
                self.embedding_ms
            } else {
                0.0
            }
            + if range.end == num_layers {
                self.head_ms
            } else {
                0.0
            }
    }

    fn fits(&self, range: &Range<usize>, num_layers: usize) -> bool {
        let bytes = range.len() as u64 * self.layer_bytes
            + if range.start == 0 {
                self.embedding_bytes
            } else {
                0
            }
            + if range.end == num_layers {
                self.head_bytes
            } else {
                0
            };
        bytes <= self.memory_bytes
    }
}

/// Why a plan cannot be made or is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "cannot split {layers} layers over {workers} workers: each worker needs at least one layer"
    )]
    TooManyWorkers { layers: usize, workers: usize },
    #[error("no workers")]
    NoWorkers,
    #[error("the split names {ranges} ranges but there are {workers} workers")]
    WrongCount { ranges: usize, workers: usize },
    #[error("invalid split {spec:?}: {reason}")]
    Syntax { spec: String, reason: String },
    #[error("invalid plan: {0}")]
    Invalid(String),
    #[error("the model does not fit: no split of {layers} layers over these workers stays within their memory")]
    DoesNotFit { layers: usize },
    #[error("--split auto needs every worker's calibration")]
    NotCalibrated,
}

impl std::str::FromStr for SplitSpec {
    type Err = PlanError;

    /// Parses `even` or a list like `0-15,15-30` (half-open ranges `start-end`).
    fn from_str(spec: &str) -> Result<Self, PlanError> {
        let spec = spec.trim();
        if spec.eq_ignore_ascii_case("even") {
            return Ok(Self::Even);
        }
        if spec.eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        let syntax = |reason: String| PlanError::Syntax {
            spec: spec.to_string(),
            reason,
        };
        let ranges = spec
            .split(',')
            .map(|part| {
                let (a, b) = part
                    .trim()
                    .split_once('-')
                    .ok_or_else(|| syntax(format!("{part:?} is not START-END")))?;
                let start = a
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| syntax(format!("{a:?} is not a layer number")))?;
                let end = b
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| syntax(format!("{b:?} is not a layer number")))?;
                Ok(start..end)
            })
            .collect::<Result<Vec<_>, PlanError>>()?;
        Ok(Self::Explicit(ranges))
    }
}

/// Makes the plan for `workers` workers over `num_layers` layers.
pub fn plan(
    spec: &SplitSpec,
    num_layers: usize,
    workers: usize,
) -> Result<Vec<Range<usize>>, PlanError> {
    let ranges = match spec {
        SplitSpec::Even => even(num_layers, workers)?,
        SplitSpec::Auto => return Err(PlanError::NotCalibrated),
        SplitSpec::Explicit(ranges) => {
            if ranges.len() != workers {
                return Err(PlanError::WrongCount {
                    ranges: ranges.len(),
                    workers,
                });
            }
            ranges.clone()
        }
    };
    validate(&ranges, num_layers)?;
    Ok(ranges)
}

/// Splits as evenly as possible; the first `num_layers % workers` workers take one layer more.
pub fn even(num_layers: usize, workers: usize) -> Result<Vec<Range<usize>>, PlanError> {
    if workers == 0 {
        return Err(PlanError::NoWorkers);
    }
    if workers > num_layers {
        return Err(PlanError::TooManyWorkers {
            layers: num_layers,
            workers,
        });
    }
    let base = num_layers / workers;
    let extra = num_layers % workers;
    let mut start = 0;
    Ok((0..workers)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect())
}

/// The split that minimizes the slowest stage's time (the pipeline's pace), with every stage within its
/// worker's memory. Exact, by dynamic programming over (worker, first layer not yet placed).
pub fn balanced(
    num_layers: usize,
    workers: &[WorkerProfile],
) -> Result<Vec<Range<usize>>, PlanError> {
    let w = workers.len();
    if w == 0 {
        return Err(PlanError::NoWorkers);
    }
    if w > num_layers {
        return Err(PlanError::TooManyWorkers {
            layers: num_layers,
            workers: w,
        });
    }
    // best[i][j]: the smallest possible slowest-stage time with layers 0..j on workers 0..i.
    let mut best = vec![vec![f64::INFINITY; num_layers + 1]; w + 1];
    let mut cut = vec![vec![0usize; num_layers + 1]; w + 1];
    best[0][0] = 0.0;
    for i in 1..=w {
        // Worker i-1 takes k..j; every worker keeps at least one layer.
        for j in i..=num_layers - (w - i) {
            for k in (i - 1)..j {
                if !best[i - 1][k].is_finite() {
                    continue;
                }
                let range = k..j;
                let p = &workers[i - 1];
                if !p.fits(&range, num_layers) {
                    continue;
                }
                let pace = best[i - 1][k].max(p.time(&range, num_layers));
                // On ties prefer more layers earlier (stable, deterministic plans).
                if pace < best[i][j] - 1e-12 {
                    best[i][j] = pace;
                    cut[i][j] = k;
                }
            }
        }
    }
    if !best[w][num_layers].is_finite() {
        return Err(PlanError::DoesNotFit { layers: num_layers });
    }
    let mut ranges = vec![0..0; w];
    let mut end = num_layers;
    for i in (1..=w).rev() {
        let start = cut[i][end];
        ranges[i - 1] = start..end;
        end = start;
    }
    validate(&ranges, num_layers)?;
    Ok(ranges)
}

/// Checks that `ranges` cover `0..num_layers` exactly once, in order, each non-empty.
pub fn validate(ranges: &[Range<usize>], num_layers: usize) -> Result<(), PlanError> {
    if ranges.is_empty() {
        return Err(PlanError::NoWorkers);
    }
    let mut next = 0;
    for (i, r) in ranges.iter().enumerate() {
        if r.start != next {
            return Err(PlanError::Invalid(format!(
                "stage {i} starts at layer {} but the previous stage ends at {next}",
                r.start
            )));
        }
        if r.end <= r.start {
            return Err(PlanError::Invalid(format!(
                "stage {i} ({}-{}) has no layers",
                r.start, r.end
            )));
        }
        next = r.end;
    }
    if next != num_layers {
        return Err(PlanError::Invalid(format!(
            "the stages end at layer {next} but the model has {num_layers}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // a one-stage plan is one range
    fn even_splits_cover_every_layer_once() {
        let table: &[(usize, usize, &[Range<usize>])] = &[
            (30, 1, &[0..30]),
            (30, 2, &[0..15, 15..30]),
            (30, 3, &[0..10, 10..20, 20..30]),
            (30, 4, &[0..8, 8..16, 16..23, 23..30]),
            (22, 3, &[0..8, 8..15, 15..22]),
            (3, 3, &[0..1, 1..2, 2..3]),
        ];
        for &(layers, workers, want) in table {
            let got = plan(&SplitSpec::Even, layers, workers).unwrap();
            assert_eq!(got, want, "{layers} layers over {workers}");
        }
        for layers in 1..40 {
            for workers in 1..=layers {
                let got = even(layers, workers).unwrap();
                validate(&got, layers).unwrap();
                let sizes: Vec<usize> = got.iter().map(|r| r.len()).collect();
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(max - min <= 1, "{sizes:?}");
            }
        }
    }

    fn profile(layer_ms: f64, head_ms: f64) -> WorkerProfile {
        WorkerProfile {
            layer_ms,
            embedding_ms: 0.0,
            head_ms,
            layer_bytes: 10,
            embedding_bytes: 0,
            head_bytes: 100,
            memory_bytes: u64::MAX,
        }
    }

    /// What a case is about, layers, workers, the expected plan.
    type Case = (&'static str, usize, Vec<WorkerProfile>, Vec<Range<usize>>);

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // a one-stage plan is one range
    fn balanced_plans_equalize_stage_times() {
        let table: &[Case] = &[
            (
                "equal workers, free head",
                30,
                vec![profile(1.0, 0.0); 2],
                vec![0..15, 15..30],
            ),
            // The head costs 8 layers: the last stage gives up 4 layers.
            (
                "equal workers, heavy head",
                30,
                vec![profile(1.0, 8.0); 2],
                vec![0..19, 19..30],
            ),
            // A device 3x faster takes 3x the layers.
            (
                "a fast and a slow worker",
                32,
                vec![profile(1.0, 0.0), profile(3.0, 0.0)],
                vec![0..24, 24..32],
            ),
            (
                "slow, fast, slow",
                30,
                vec![profile(4.0, 0.0), profile(1.0, 0.0), profile(4.0, 0.0)],
                vec![0..5, 5..25, 25..30],
            ),
            ("one worker", 7, vec![profile(1.0, 3.0)], vec![0..7]),
        ];
        for (what, layers, workers, want) in table {
            assert_eq!(&balanced(*layers, workers).unwrap(), want, "{what}");
        }
    }

    #[test]
    fn balanced_plans_respect_memory() {
        // The fast worker would take 24 layers but holds only 10.
        let mut fast = profile(1.0, 0.0);
        fast.memory_bytes = 10 * 10;
        let slow = profile(3.0, 0.0);
        assert_eq!(balanced(32, &[fast, slow]).unwrap(), vec![0..10, 10..32]);
        // The head (100 bytes) must fit on the last worker too.
        let mut small_last = profile(1.0, 0.0);
        small_last.memory_bytes = 110; // one layer plus the head
        assert_eq!(
            balanced(20, &[profile(1.0, 0.0), small_last]).unwrap(),
            vec![0..19, 19..20]
        );
        let mut tiny = profile(1.0, 0.0);
        tiny.memory_bytes = 5;
        assert_eq!(
            balanced(10, &[tiny, tiny]),
            Err(PlanError::DoesNotFit { layers: 10 })
        );
        assert_eq!(
            balanced(2, &[profile(1.0, 0.0); 3]),
            Err(PlanError::TooManyWorkers {
                layers: 2,
                workers: 3
            })
        );
    }

    #[test]
    fn impossible_plans_are_errors() {
        assert_eq!(
            even(2, 3),
            Err(PlanError::TooManyWorkers {
                layers: 2,
                workers: 3
            })
        );
        assert_eq!(even(5, 0), Err(PlanError::NoWorkers));
    }

    #[test]
    fn explicit_splits_are_parsed_and_checked() {
        let spec: SplitSpec = "0-10, 10-30".parse().unwrap();
        assert_eq!(plan(&spec, 30, 2).unwrap(), vec![0..10, 10..30]);
        assert!(matches!(
            plan(&spec, 30, 3),
            Err(PlanError::WrongCount { .. })
        ));
        let table = [
            ("0-10,11-30", "starts at layer 11"),
            ("0-10,10-29", "end at layer 29"),
            ("0-10,10-10,10-30", "has no layers"),
            ("5-30", "starts at layer 5"),
        ];
        for (text, message) in table {
            let spec: SplitSpec = text.parse().unwrap();
            let workers = text.split(',').count();
            let err = plan(&spec, 30, workers).unwrap_err().to_string();
            assert!(err.contains(message), "{text}: {err}");
        }
        assert!("0-10;10-30".parse::<SplitSpec>().is_err());
        assert!("a-b".parse::<SplitSpec>().is_err());
        assert_eq!("EVEN".parse::<SplitSpec>().unwrap(), SplitSpec::Even);
    }
}
