//! `[jobs] broker = "rabbitmq"`: RabbitMQ hands out the jobs, the state database still
//! holds them.
//!
//! - Every job queue `Q` has a durable quorum queue `labrelay.jobs.Q` (delivery limit
//!   [`MAX_DELIVERIES`], dead-letter queue `labrelay.jobs.Q.dead`).
//! - Publishing is a transactional outbox: workers take ready, unpublished rows
//!   ([`Store::take_for_publish`], marked in the same statement), publish `job id`
//!   messages with publisher confirms, and unmark what the broker did not confirm. A
//!   crash between the mark and the confirm leaves a mark that goes stale after
//!   `[jobs] republish_secs`, and the job is published again. Jobs whose worker died
//!   (lease expired) are published again the same way.
//! - A consumer (prefetch = the worker's concurrency) waits for a free slot, then claims
//!   the jobs their messages name, many per statement ([`Store::claim_ids`]: fenced like every claim), runs them,
//!   records the outcome, and only then acknowledges the message. A message for a job
//!   that is no longer ready (a duplicate, a cancelled job) is acknowledged and dropped.
//! - Tasks with a concurrency limit are not published: workers claim them from the table.

use std::sync::Arc;
use std::time::Duration;

use labrelay::config::Config;
use labrelay::queue::{
    AnyBroker, Broker as _, Delivery, Outgoing, PublishOptions, QueueError, QueueSpec,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::store::{Job, Store};

/// A message delivered this many times without an ack goes to the dead-letter queue
/// (the job row stays: it is published again when its lease runs out).
pub const MAX_DELIVERIES: u32 = 20;

/// Jobs published per batch.
const BATCH: usize = 1000;

/// The RabbitMQ queue of job queue `queue`.
pub fn queue_name(queue: &str) -> String {
    format!("labrelay.jobs.{queue}")
}

/// A claimed job from RabbitMQ, with its message and its slot.
pub struct Fed {
    /// The job, claimed by this worker.
    pub job: Job,
    /// Its message: acknowledge after the outcome is recorded.
    pub delivery: Delivery,
    /// The worker slot it runs in.
    pub permit: OwnedSemaphorePermit,
}

impl Fed {
    /// Give a claimed job that will not run here back: its row to the queue, its
    /// message to RabbitMQ.
    pub async fn give_back(self, store: &Store, worker: &str) {
        if let Err(e) = store.release(&self.job, worker).await {
            tracing::warn!(
                job = self.job.id,
                "giving the job back failed (its lease runs out): {e:#}"
            );
        }
        settle(self.delivery.nack_requeue().await);
    }
}

/// The RabbitMQ side of a worker.
pub struct Dispatch {
    broker: AnyBroker,
    queues: Vec<String>,
}

impl Dispatch {
    /// Connect to `[queue] url` and declare the queues of `queues`.
    pub async fn connect(config: &Config, queues: &[String]) -> anyhow::Result<Dispatch> {
        let broker = AnyBroker::from_config(config).await?;
        for q in queues {
            broker
                .declare_queue(&QueueSpec::new(queue_name(q)).with_max_deliveries(MAX_DELIVERIES))
                .await?;
        }
        Ok(Dispatch {
            broker,
            queues: queues.to_vec(),
        })
    }

    /// Publish the jobs that are due; how many went out.
    pub async fn publish_due(&self, store: &Store, republish_ms: i64) -> anyhow::Result<usize> {
        let mut total = 0;
        loop {
            let batch = store
                .take_for_publish(&self.queues, BATCH, republish_ms)
                .await?;
            if batch.is_empty() {
                return Ok(total);
            }
            let messages: Vec<Outgoing> = batch
                .iter()
                .map(|(id, q)| Outgoing {
                    routing_key: queue_name(q),
                    body: id.to_string().into_bytes(),
                    options: PublishOptions::new().message_id(format!("job-{id}")),
                })
                .collect();
            match self.broker.publish_batch("", &messages).await {
                Ok(routed) => {
                    let lost: Vec<i64> = batch
                        .iter()
                        .zip(&routed)
                        .filter(|(_, ok)| !**ok)
                        .map(|((id, _), _)| *id)
                        .collect();
                    if !lost.is_empty() {
                        tracing::warn!(
                            jobs = lost.len(),
                            "no RabbitMQ queue took these jobs; publishing them again later"
                        );
                        store.unpublish(&lost).await?;
                    }
                    total += batch.len() - lost.len();
                }
                Err(e) => {
                    let ids: Vec<i64> = batch.iter().map(|(id, _)| *id).collect();
                    store.unpublish(&ids).await?;
                    return Err(e.into());
                }
            }
            if batch.len() < BATCH {
                return Ok(total);
            }
        }
    }

    /// Start one consumer per queue. Each waits for a free slot of `slots`, claims the
    /// job its message names and sends it on; the receiver closing stops them (a job
    /// claimed meanwhile is given back).
    pub fn feed(
        &self,
        store: &Store,
        worker: &str,
        lease_ms: i64,
        slots: &Arc<Semaphore>,
        prefetch: u16,
    ) -> (mpsc::Receiver<Fed>, Vec<tokio::task::JoinHandle<()>>) {
        let (tx, rx) = mpsc::channel(usize::from(prefetch.max(1)));
        let (pending_tx, pending_rx) = mpsc::unbounded_channel();
        let mut handles: Vec<tokio::task::JoinHandle<()>> = self
            .queues
            .iter()
            .map(|q| {
                let (broker, slots, pending) =
                    (self.broker.clone(), slots.clone(), pending_tx.clone());
                let queue = queue_name(q);
                tokio::spawn(async move {
                    consume(&broker, &queue, &slots, prefetch, &pending).await;
                })
            })
            .collect();
        let (store, worker, queues) = (store.clone(), worker.to_owned(), self.queues.clone());
        handles.push(tokio::spawn(async move {
            claim_batches(pending_rx, &store, &worker, &queues, lease_ms, &tx).await;
        }));
        (rx, handles)
    }

    /// Close the connection.
    pub async fn close(&self) {
        self.broker.close().await;
    }
}

/// A message waiting for its claim, with the slot it will run in.
type Pending = (i64, Delivery, OwnedSemaphorePermit);

/// Consume `queue`: for each message, wait for a free slot, then hand it to the claimer.
async fn consume(
    broker: &AnyBroker,
    queue: &str,
    slots: &Arc<Semaphore>,
    prefetch: u16,
    pending: &mpsc::UnboundedSender<Pending>,
) {
    loop {
        let mut consumer = match broker.consume(queue, prefetch).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(queue, "consuming failed, trying again in 2 s: {e}");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        loop {
            let delivery = match consumer.next().await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(queue, "the RabbitMQ consumer stopped, starting again: {e}");
                    break;
                }
            };
            let id = std::str::from_utf8(&delivery.body)
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok());
            let Some(id) = id else {
                tracing::warn!(queue, "a message that names no job: dead-lettered");
                settle(delivery.reject().await);
                continue;
            };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            if pending.send((id, delivery, permit)).is_err() {
                return;
            }
        }
        consumer.close().await;
    }
}

/// Claim what the consumers took, many jobs per statement (one commit for all the
/// messages that arrived while the last claim ran), and hand the claimed jobs on;
/// acknowledge the messages of jobs that are not ready any more.
async fn claim_batches(
    mut pending: mpsc::UnboundedReceiver<Pending>,
    store: &Store,
    worker: &str,
    queues: &[String],
    lease_ms: i64,
    tx: &mpsc::Sender<Fed>,
) {
    while let Some(first) = pending.recv().await {
        let mut batch = vec![first];
        while batch.len() < 512 {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let ids: Vec<i64> = batch.iter().map(|(id, ..)| *id).collect();
        let claimed = match store.claim_ids(&ids, worker, queues, lease_ms).await {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::warn!(
                    jobs = ids.len(),
                    "claiming failed, the messages come again: {e:#}"
                );
                for (_, d, _) in batch {
                    settle(d.nack_requeue().await);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut jobs: std::collections::HashMap<i64, Job> =
            claimed.into_iter().map(|j| (j.id, j)).collect();
        for (id, delivery, permit) in batch {
            // A duplicate message in one batch: the job goes with the first.
            let Some(job) = jobs.remove(&id) else {
                // Not ready any more: a duplicate, cancelled, finished, or not due.
                settle(delivery.ack().await);
                continue;
            };
            if let Err(mpsc::error::SendError(fed)) = tx
                .send(Fed {
                    job,
                    delivery,
                    permit,
                })
                .await
            {
                // The worker is stopping: give the job back.
                fed.give_back(store, worker).await;
            }
        }
    }
}

/// A settle that failed (the connection dropped) needs nothing: the broker delivers the
/// message again and the claim finds the job's true state.
fn settle(r: Result<(), QueueError>) {
    if let Err(e) = r {
        tracing::debug!("settling a job message failed (it comes again): {e}");
    }
}
