//! Waiting for a message by polling first.
//!
//! On the lent VMs a thread parked in the kernel takes tens of µs to run again once woken, and a hop
//! between two stages wakes several (the worker's async thread when a request arrives and again when
//! its compute thread answers, the coordinator's when the reply comes back). Where a message is due
//! within a step's time, polling for it keeps the thread running instead. Costs a core while it
//! polls, so GPU pipelines use it and CPU ones, whose cores do the compute, do not.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// `fut`'s output, polled in a loop for up to `budget` (yielding to the runtime between polls, so
/// other tasks and the I/O driver still run) before it is awaited normally. A zero budget only awaits.
pub async fn spin_first<F: Future>(fut: F, budget: Duration) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    if !budget.is_zero() {
        let deadline = Instant::now() + budget;
        loop {
            if let Poll::Ready(output) = poll_once(fut.as_mut()) {
                return output;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    fut.await
}

/// One poll with a waker that does nothing: the loop above polls again by itself.
fn poll_once<F: Future>(fut: Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

/// How long a thread waiting for a pipeline's next message polls before it parks: 5 ms where the
/// stage computes on an accelerator (a step takes a few ms and the host has cores to spare), none
/// where it computes on the CPU (whose cores do the compute). The worker's compute thread, its async
/// side and the coordinator's wait for a stage's reply all use it (BENCHMARKS.md has the measurements).
pub fn default_budget(on_cpu: bool) -> Duration {
    if on_cpu {
        Duration::ZERO
    } else {
        Duration::from_millis(5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_message_sent_while_polling_arrives() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let _ = tx.send(7);
        });
        // The sender's task (and the timer driver) run on this thread too: they must get turns
        // while we poll, or the answer would only come after the 5 s budget.
        let started = Instant::now();
        assert_eq!(spin_first(rx, Duration::from_secs(5)).await, Ok(7));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn past_the_budget_it_waits_normally() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.send(1);
        });
        let started = Instant::now();
        assert_eq!(spin_first(rx, Duration::from_millis(1)).await, Ok(1));
        assert!(started.elapsed() >= Duration::from_millis(15));
    }
}
