//! One long-lived `ForwardStream` per stage.
//!
//! A unary `Forward` per step costs a new HTTP/2 stream, its headers, the token check and a few task
//! hand-offs on both sides; on a token-at-a-time pipeline that is most of a hop's overhead. The link
//! keeps one bidirectional stream open to its worker: each step is one message each way, matched to
//! its caller by `step_id`. A stream that breaks fails the steps waiting on it (as a failed call
//! would); the next step opens a new one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_proto::v1;
use strata_proto::v1::worker_client::WorkerClient;
use strata_transport::AuthChannel;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

type Reply = Result<v1::ForwardResponse, Status>;

/// Steps waiting for their reply: `step_id → (stream generation, where to answer)`.
type Pending = Arc<Mutex<HashMap<u64, (u64, oneshot::Sender<Reply>)>>>;

#[derive(Debug)]
pub struct ForwardLink {
    client: WorkerClient<AuthChannel>,
    /// How long a step polls for its reply before parking (`strata_transport::spin`).
    spin: Duration,
    /// The open stream's sender and generation.
    open: tokio::sync::Mutex<Option<(mpsc::Sender<v1::ForwardRequest>, u64)>>,
    pending: Pending,
}

impl ForwardLink {
    pub fn new(client: WorkerClient<AuthChannel>, spin: Duration) -> Self {
        Self {
            client,
            spin,
            open: tokio::sync::Mutex::new(None),
            pending: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Runs one micro-batch on the worker. Dropping the future forgets the step (its reply, if it
    /// comes, is ignored).
    pub async fn forward(&self, request: v1::ForwardRequest) -> Reply {
        let step_id = request.step_id;
        let (sender, generation) = self.sender().await?;
        let (answer, reply) = oneshot::channel();
        lock(&self.pending).insert(step_id, (generation, answer));
        let _forget = Forget {
            pending: &self.pending,
            step_id,
        };
        if sender.send(request).await.is_err() {
            return Err(closed());
        }
        strata_transport::spin::spin_first(reply, self.spin)
            .await
            .unwrap_or_else(|_| Err(closed()))
    }

    /// The open stream, or a new one.
    async fn sender(&self) -> Result<(mpsc::Sender<v1::ForwardRequest>, u64), Status> {
        let mut open = self.open.lock().await;
        if let Some((sender, generation)) = open.as_ref() {
            if !sender.is_closed() {
                return Ok((sender.clone(), *generation));
            }
        }
        let generation = open.as_ref().map_or(0, |(_, g)| g + 1);
        let (sender, requests) = mpsc::channel(4);
        let replies = self
            .client
            .clone()
            .forward_stream(ReceiverStream::new(requests))
            .await?
            .into_inner();
        tokio::spawn(read_replies(replies, self.pending.clone(), generation));
        *open = Some((sender.clone(), generation));
        Ok((sender, generation))
    }
}

/// Hands each reply to its step; when the stream ends, fails the steps still waiting on it.
async fn read_replies(mut replies: Streaming<v1::ForwardReply>, pending: Pending, generation: u64) {
    let why = loop {
        match replies.message().await {
            Ok(Some(reply)) => {
                let result = match reply.response {
                    Some(response) => Ok(response),
                    None => Err(Status::new(
                        Code::from(reply.error_code),
                        reply.error_message,
                    )),
                };
                if let Some((_, answer)) = lock(&pending).remove(&reply.step_id) {
                    let _ = answer.send(result);
                }
            }
            Ok(None) => break closed(),
            Err(status) => break status,
        }
    };
    let mut pending = lock(&pending);
    let stranded: Vec<u64> = pending
        .iter()
        .filter(|(_, (g, _))| *g == generation)
        .map(|(id, _)| *id)
        .collect();
    for id in stranded {
        if let Some((_, answer)) = pending.remove(&id) {
            let _ = answer.send(Err(why.clone()));
        }
    }
}

/// Removes a step from `pending` however its future ends.
struct Forget<'a> {
    pending: &'a Pending,
    step_id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        lock(self.pending).remove(&self.step_id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn closed() -> Status {
    Status::unavailable("the worker closed the Forward stream")
}
