//! Where a step's device time goes, for diagnosis only: with `STRATA_PHASE_TIMES=1` each phase of a
//! forward pass (projections, attention, feed-forward, head, ...) ends with a device synchronize and
//! its wall time is added to a per-thread tally, which the engine logs every 50 steps. Off (the
//! default), a mark is one relaxed load.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::Device;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("STRATA_PHASE_TIMES").is_ok_and(|v| v == "1"))
}

/// When the last phase ended, and each phase's total so far.
type Tally = (Option<Instant>, Vec<(&'static str, Duration)>);

thread_local! {
    static TALLY: RefCell<Tally> = const { RefCell::new((None, Vec::new())) };
}

/// Starts timing a step.
pub fn start(device: &Device) {
    if !enabled() {
        return;
    }
    let _ = device.synchronize();
    TALLY.with(|t| t.borrow_mut().0 = Some(Instant::now()));
}

/// Ends the phase `name` (the time since the previous mark).
pub fn mark(device: &Device, name: &'static str) {
    if !enabled() {
        return;
    }
    let _ = device.synchronize();
    TALLY.with(|t| {
        let mut t = t.borrow_mut();
        let now = Instant::now();
        let Some(since) = t.0.replace(now) else {
            return;
        };
        match t.1.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total += now - since,
            None => t.1.push((name, now - since)),
        }
    });
}

/// The tally so far, emptied.
pub fn take() -> Vec<(&'static str, Duration)> {
    if !enabled() {
        return Vec::new();
    }
    TALLY.with(|t| std::mem::take(&mut t.borrow_mut().1))
}
