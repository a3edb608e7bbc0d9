//! Where a step's time goes, for diagnosis only. With `--phase-times sync` each phase of a
//! forward pass (projections, attention, feed-forward, head, ...) ends with a device synchronize and
//! its wall time is added to a per-thread tally, which the engine logs every 50 steps (warmup and
//! calibration steps left out). With `--phase-times host` nothing synchronizes: the tally is
//! the host's time to queue each phase (what bounds a GPU stage whose kernels are small), and each
//! layer's queue time is kept by its place in the stage, so a slow first layer shows apart from
//! uniformly slow ones. Off (the default), a mark is one relaxed load.
//!
//! The mode is chosen once at load (`StageOptions::phase_times`) and held as a [`PhaseTimer`] by the
//! stage, which hands it down to its layers in the step context; the tally belongs to the compute
//! thread that runs the steps.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use candle_core::Device;

/// What the phase marks do (`off`, `sync`, `host` on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Off = 0,
    /// Each mark waits for the device.
    Synced = 1,
    /// Marks read the clock only.
    Host = 2,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "0" => Ok(Self::Off),
            "sync" | "1" => Ok(Self::Synced),
            "host" => Ok(Self::Host),
            other => Err(format!(
                "unknown phase-times mode {other:?}; expected off, sync or host"
            )),
        }
    }
}

/// The marks of one stage's steps, in the mode the stage was loaded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PhaseTimer {
    mode: Mode,
}

#[derive(Default)]
struct Tally {
    /// Steps started since the tally was last taken.
    steps: u32,
    /// When the last phase ended.
    since: Option<Instant>,
    /// Each phase's total so far.
    phases: Vec<(&'static str, Duration)>,
    /// When the current layer started.
    layer_since: Option<Instant>,
    /// Per layer of the stage, in order: its total so far.
    layers: Vec<Duration>,
}

thread_local! {
    static TALLY: RefCell<Tally> = RefCell::new(Tally::default());
}

impl PhaseTimer {
    pub fn new(mode: Mode) -> Self {
        Self { mode }
    }

    fn sync(self, device: &Device) {
        if self.mode == Mode::Synced {
            let _ = device.synchronize();
        }
    }

    /// Whether marks do anything (a step whose phases are timed is not replayed as a CUDA graph).
    pub fn active(self) -> bool {
        self.mode != Mode::Off
    }

    /// Starts timing a step.
    pub fn start(self, device: &Device) {
        if self.mode == Mode::Off {
            return;
        }
        self.sync(device);
        TALLY.with(|t| {
            let mut t = t.borrow_mut();
            t.steps += 1;
            t.since = Some(Instant::now());
        });
    }

    /// Ends the phase `name` (the time since the previous mark).
    pub fn mark(self, device: &Device, name: &'static str) {
        if self.mode == Mode::Off {
            return;
        }
        self.sync(device);
        TALLY.with(|t| {
            let mut t = t.borrow_mut();
            let now = Instant::now();
            let Some(since) = t.since.replace(now) else {
                return;
            };
            match t.phases.iter_mut().find(|(n, _)| *n == name) {
                Some((_, total)) => *total += now - since,
                None => t.phases.push((name, now - since)),
            }
        });
    }

    /// Starts timing the stage's layer at `index` (host time only, in `host` mode).
    pub fn layer_start(self) {
        if self.mode != Mode::Host {
            return;
        }
        TALLY.with(|t| t.borrow_mut().layer_since = Some(Instant::now()));
    }

    /// Ends the stage's layer at `index`.
    pub fn layer_end(self, index: usize) {
        if self.mode != Mode::Host {
            return;
        }
        TALLY.with(|t| {
            let mut t = t.borrow_mut();
            let Some(since) = t.layer_since.take() else {
                return;
            };
            if t.layers.len() <= index {
                t.layers.resize(index + 1, Duration::ZERO);
            }
            t.layers[index] += since.elapsed();
        });
    }
}

/// What the steps since the last `take` (or `discard`) spent.
#[derive(Debug, Default)]
struct Taken {
    steps: u32,
    phases: Vec<(&'static str, Duration)>,
    /// Per layer of the stage (empty unless in `host` mode).
    layers: Vec<Duration>,
}

/// The tally so far, emptied (empty while marks are off: nothing was added).
fn take() -> Taken {
    TALLY.with(|t| {
        let mut t = t.borrow_mut();
        Taken {
            steps: std::mem::take(&mut t.steps),
            phases: std::mem::take(&mut t.phases),
            layers: std::mem::take(&mut t.layers),
        }
    })
}

/// Forgets the tally so far: warmup and calibration steps pay first-use costs that serving does not.
pub fn discard() {
    let _ = take();
}

/// Logs the tally so far, emptied: each phase's share and time per step, and each layer's time per
/// step in `host` mode. Nothing when the marks are off or no step ran.
pub fn log_report() {
    let Taken {
        steps,
        phases,
        layers,
    } = take();
    if phases.is_empty() {
        return;
    }
    let total: Duration = phases.iter().map(|(_, d)| *d).sum();
    let per_step = |d: &Duration| d.as_micros() / u128::from(steps.max(1));
    let shares: Vec<String> = phases
        .iter()
        .map(|(name, d)| {
            format!(
                "{name} {:.1}% ({} us/step)",
                100.0 * d.as_secs_f64() / total.as_secs_f64(),
                per_step(d)
            )
        })
        .collect();
    let layers: Vec<String> = layers.iter().map(|d| per_step(d).to_string()).collect();
    tracing::info!(
        steps,
        total_ms = total.as_millis() as u64,
        phases = %shares.join(", "),
        layer_us = %layers.join(" "),
        "phase times"
    );
}
