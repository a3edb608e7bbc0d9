//! The threads that tokenize prompts and render chat templates. A 1 MiB prompt takes ~0.4 s and
//! ~80 MiB to tokenize: on the async threads it stalled every stream, and on tokio's blocking pool
//! each call could land on another thread and keep its memory in another allocator arena (16 such
//! calls raised the coordinator's memory by 250 MiB). A few long-lived threads, half the cores at
//! most, take the work in arrival order and reuse their memory; the other cores keep serving (and
//! computing, where workers share the host).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::CoordinatorError;

type Job = Box<dyn FnOnce() + Send>;

pub struct PromptThreads {
    jobs: mpsc::Sender<Job>,
}

impl PromptThreads {
    pub fn start(threads: usize) -> Result<Self, CoordinatorError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("strata-prompt-{i}"))
                .spawn(move || loop {
                    let job = queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match job {
                        // A panicking job drops its reply channel (the request fails with
                        // INTERNAL); the thread lives on.
                        Ok(job) => {
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                        }
                        // The coordinator is gone.
                        Err(_) => return,
                    }
                })
                .map_err(|e| {
                    CoordinatorError::Unavailable(format!("cannot start prompt threads: {e}"))
                })?;
        }
        Ok(Self { jobs })
    }

    /// Queues `job`; it runs on the next free prompt thread.
    pub fn run(&self, job: Job) {
        // The threads hold the receiver for as long as they live, and they live on.
        let _ = self.jobs.send(job);
    }
}
