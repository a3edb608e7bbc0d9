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
}

impl std::str::FromStr for SplitSpec {
    type Err = PlanError;

    /// Parses `even` or a list like `0-15,15-30` (half-open ranges `start-end`).
    fn from_str(spec: &str) -> Result<Self, PlanError> {
        let spec = spec.trim();
        if spec.eq_ignore_ascii_case("even") {
            return Ok(Self::Even);
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
