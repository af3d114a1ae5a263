//! The worker loop: claim as many jobs as there are free slots, run each with a
//! heartbeat beside it, record the outcome (fenced by attempt), and on shutdown stop
//! claiming, let running jobs finish within the grace period, then kill them and give
//! their jobs back.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};

use crate::config::Registry;
use crate::runner::{self, Ran, Stop};
use crate::store::{self, Job, NewJob, Outcome, Store};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Queues to take jobs from.
    pub queues: Vec<String>,
    /// Jobs at the same time.
    pub concurrency: usize,
    /// Exit when nothing is ready (instead of waiting for more).
    pub once: bool,
    /// Stop claiming after this many jobs.
    pub max_jobs: Option<u64>,
    /// This worker's name in the job rows.
    pub name: String,
}

/// One finished attempt, as the worker reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Job id.
    pub id: i64,
    /// Task.
    pub task: String,
    /// Attempt number.
    pub attempt: i64,
    /// The job's state now (`queued` when it will be retried); `refused` when the
    /// attempt was no longer this worker's; `released` when given back at shutdown.
    pub state: String,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Why it failed.
    pub error: Option<String>,
    /// Run time.
    pub duration_ms: i64,
}

/// Totals of a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Totals {
    /// Attempts started.
    pub claimed: u64,
    /// By the state each attempt left its job in.
    pub by_state: std::collections::BTreeMap<String, u64>,
}

/// Run until `shutdown` fires (or, with `once`, until nothing is ready), calling
/// `report` for every attempt that ended.
#[allow(clippy::too_many_arguments)] // each is one of the worker's outside connections
pub async fn run(
    store: &Store,
    registry: Arc<Registry>,
    opts: &WorkerOptions,
    mut wake: labrelay::db::Wakeup,
    notifier: Option<&crate::notify::Notifier>,
    dispatch: Option<&crate::rabbit::Dispatch>,
    shutdown: impl std::future::Future<Output = ()>,
    mut report: impl FnMut(&Report),
) -> anyhow::Result<Totals> {
    let limited = store.clone().with_limits(registry.limits());
    let store = &limited;
    let s = &registry.settings;
    let lease_ms = i64::try_from(s.lease_secs * 1000).unwrap_or(i64::MAX);
    let grace = Duration::from_secs(s.grace_secs);
    let poll = Duration::from_millis(s.poll_ms.max(10));
    let slots = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let (stop_tx, stop_rx) = watch::channel(Stop::No);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Report>();
    let mut totals = Totals::default();
    let mut running = 0usize;
    tokio::pin!(shutdown);
    let mut stopping = false;
    let finisher = Finisher::start(store.clone(), opts.name.clone());
    let mut scheduled_until = chrono::Local::now();
    let mut mailed_at = std::time::Instant::now();
    let mut ended = 0u64;
    let mut claim_failures = 0u32;
    // RabbitMQ: consumers claim what their messages name; this loop publishes what is
    // due and claims from the table only the tasks with a concurrency limit. `--once`
    // claims from the table (cron wants "what is ready now", not a subscription).
    let dispatch = dispatch.filter(|_| !opts.once);
    let republish_ms = i64::try_from(s.republish_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let (mut feed, feeders) = match dispatch {
        Some(d) => {
            let prefetch = u16::try_from(opts.concurrency).unwrap_or(u16::MAX);
            let (rx, handles) = d.feed(store, &opts.name, lease_ms, &slots, prefetch);
            (Some(rx), handles)
        }
        None => (None, Vec::new()),
    };
    let mut swept_at: Option<std::time::Instant> = None;
    let mut woken = true;
    // A sweep that found nothing to publish doubles the wait before the next one (up to
    // a second, or poll_ms if longer); a notification or a find brings it back to poll_ms.
    let mut sweep_every = poll;
    // Idle, the wait between claims doubles up to a second (or poll_ms if longer): no
    // busy polling of an idle database. A notification (PostgreSQL, the SQLite wake file)
    // or a claim that found work brings it back to poll_ms; MariaDB, which has no
    // notifications, finds new work within that second.
    let idle_max = poll.max(Duration::from_secs(1));
    let mut idle_wait = poll;
    loop {
        if let Some(d) = dispatch
            && (woken || swept_at.is_none_or(|t| t.elapsed() >= sweep_every))
        {
            woken = false;
            swept_at = Some(std::time::Instant::now());
            if let Err(e) = store.maintain().await {
                tracing::warn!("looking for jobs of dead workers failed: {e:#}");
            }
            match d.publish_due(store, republish_ms).await {
                Ok(0) => sweep_every = (sweep_every * 2).min(poll.max(Duration::from_secs(1))),
                Ok(_) => sweep_every = poll,
                Err(e) => {
                    sweep_every = poll;
                    tracing::warn!("publishing jobs to RabbitMQ failed (tried again): {e:#}");
                }
            }
        }
        if !registry.schedules.is_empty() {
            fire_schedules(store, &registry, &opts.queues, &mut scheduled_until).await;
        }
        // Outcome mails: after jobs ended here, and every 10 s for any left over (a
        // worker that died before sending them).
        let ended_now: u64 = totals.by_state.values().sum();
        if let Some(n) = notifier
            && (ended_now > ended || mailed_at.elapsed() > Duration::from_secs(10))
        {
            ended = ended_now;
            mailed_at = std::time::Instant::now();
            if let Err(e) = n.send_due(store).await {
                tracing::warn!("sending outcome mails failed: {e:#}");
            }
        }
        // Collect what ended.
        while let Ok(r) = done_rx.try_recv() {
            running -= 1;
            *totals.by_state.entry(r.state.clone()).or_default() += 1;
            report(&r);
        }
        let budget = opts
            .max_jobs
            .map_or(u64::MAX, |m| m.saturating_sub(totals.claimed));
        if stopping || budget == 0 {
            break;
        }
        let free = slots
            .available_permits()
            .min(usize::try_from(budget).unwrap_or(usize::MAX));
        let mut claimed = Vec::new();
        let from_table = dispatch.is_none() || !registry.limits().is_empty();
        if free > 0 && from_table {
            let claim = if dispatch.is_some() {
                store
                    .claim_limited_tasks(&opts.name, &opts.queues, free, lease_ms)
                    .await
            } else {
                store.claim(&opts.name, &opts.queues, free, lease_ms).await
            };
            match claim {
                Ok(jobs) => {
                    if !jobs.is_empty() {
                        idle_wait = poll;
                    }
                    claimed = jobs;
                    claim_failures = 0;
                }
                // A worker outlives a database restart: running jobs go on, claims are
                // tried again with backoff. `--once` (cron) reports it instead (exit 75).
                Err(e)
                    if !opts.once
                        && labrelay::exit::classify(&e) == labrelay::exit::Exit::TempFail =>
                {
                    claim_failures = claim_failures.saturating_add(1);
                    let pause = poll
                        .saturating_mul(1 << claim_failures.min(6))
                        .min(Duration::from_secs(10));
                    tracing::warn!("claiming jobs failed, trying again in {pause:?}: {e:#}");
                    tokio::select! {
                        () = &mut shutdown => stopping = true,
                        () = tokio::time::sleep(pause) => {}
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        for job in claimed.drain(..) {
            let permit = slots.clone().acquire_owned().await.expect("semaphore open");
            totals.claimed += 1;
            running += 1;
            let (store, registry, stop, done, name, finisher) = (
                store.clone(),
                registry.clone(),
                stop_rx.clone(),
                done_tx.clone(),
                opts.name.clone(),
                finisher.clone(),
            );
            tokio::spawn(async move {
                let r = attempt(&store, &finisher, &registry, &name, job, stop, lease_ms).await;
                drop(permit);
                let _ = done.send(r);
            });
        }
        // What the RabbitMQ consumers claimed meanwhile.
        while let Some(rx) = feed.as_mut()
            && let Ok(fed) = rx.try_recv()
        {
            running += 1;
            totals.claimed += 1;
            spawn_fed(
                fed, store, &registry, &opts.name, &finisher, &stop_rx, &done_tx, lease_ms,
            );
        }
        if free > 0 && running == 0 && opts.once {
            // Nothing was ready and nothing runs: done.
            break;
        }
        // Wait for a slot to free up, new work, the next poll, or shutdown.
        tokio::select! {
            () = &mut shutdown => stopping = true,
            r = done_rx.recv() => {
                if let Some(r) = r {
                    running -= 1;
                    *totals.by_state.entry(r.state.clone()).or_default() += 1;
                    report(&r);
                }
            }
            arrived = async { feed.as_mut().expect("checked").recv().await }, if feed.is_some() => {
                if let Some(fed) = arrived {
                    running += 1;
                    totals.claimed += 1;
                    spawn_fed(fed, store, &registry, &opts.name, &finisher, &stop_rx, &done_tx, lease_ms);
                }
            }
            by_notify = wake.wait(idle_wait), if slots.available_permits() > 0 || dispatch.is_some() => {
                if by_notify {
                    woken = true;
                    sweep_every = poll;
                    idle_wait = poll;
                } else {
                    idle_wait = (idle_wait * 2).min(idle_max);
                }
            }
            // Schedules are looked at every second even while every slot is busy.
            () = tokio::time::sleep(Duration::from_secs(1)), if !registry.schedules.is_empty() => {}
        }
    }
    // Done claiming. What the consumers claimed and nobody started goes back.
    if let Some(mut rx) = feed.take() {
        rx.close();
        while let Some(fed) = rx.recv().await {
            fed.give_back(store, &opts.name).await;
        }
    }
    for f in feeders {
        f.abort();
    }
    // Running jobs finish; on shutdown they get the grace period, then are killed and
    // given back.
    let mut deadline = stopping.then(|| tokio::time::Instant::now() + grace);
    while running > 0 {
        let until =
            deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_hours(24));
        tokio::select! {
            r = done_rx.recv() => {
                let Some(r) = r else { break };
                running -= 1;
                *totals.by_state.entry(r.state.clone()).or_default() += 1;
                report(&r);
            }
            () = &mut shutdown, if deadline.is_none() => {
                tracing::info!(running, "waiting up to {grace:?} for running jobs");
                deadline = Some(tokio::time::Instant::now() + grace);
            }
            () = tokio::time::sleep_until(until), if deadline.is_some() => {
                tracing::warn!(running, "grace period over: killing running jobs and giving them back");
                let _ = stop_tx.send(Stop::Shutdown);
                deadline = Some(tokio::time::Instant::now() + Duration::from_hours(24));
            }
        }
    }
    if let Some(n) = notifier
        && let Err(e) = n.send_due(store).await
    {
        tracing::warn!("sending outcome mails failed: {e:#}");
    }
    Ok(totals)
}

/// Run a job a RabbitMQ consumer claimed; acknowledge its message once the outcome was
/// written (or the write failed: then the row still says running, its lease runs out
/// and the job is published again).
#[allow(clippy::too_many_arguments)]
fn spawn_fed(
    fed: crate::rabbit::Fed,
    store: &Store,
    registry: &Arc<Registry>,
    worker: &str,
    finisher: &Finisher,
    stop: &watch::Receiver<Stop>,
    done: &mpsc::UnboundedSender<Report>,
    lease_ms: i64,
) {
    let (store, registry, stop, done, name, finisher) = (
        store.clone(),
        registry.clone(),
        stop.clone(),
        done.clone(),
        worker.to_owned(),
        finisher.clone(),
    );
    tokio::spawn(async move {
        let crate::rabbit::Fed {
            job,
            delivery,
            permit,
        } = fed;
        let r = attempt(&store, &finisher, &registry, &name, job, stop, lease_ms).await;
        if let Err(e) = delivery.ack().await {
            tracing::debug!(
                job = r.id,
                "acknowledging the job message failed (a duplicate comes, and is dropped): {e}"
            );
        }
        drop(permit);
        let _ = done.send(r);
    });
}

/// Upload the whole stdout and stderr of an attempt whose output was longer than the
/// row keeps, to `jobs/ID/ATTEMPT/stdout` and `.../stderr` of `[jobs] output_storage`.
/// A failed upload keeps the row's excerpt only (and says so in stderr).
async fn keep_whole_output(store: &Store, job: &Job, outcome: &mut Outcome) {
    use labrelay::storage::ObjectStorage as _;
    let files = [
        ("stdout", outcome.stdout_file.take()),
        ("stderr", outcome.stderr_file.take()),
    ];
    for (stream, file) in files {
        let Some(file) = file else { continue };
        if let Some(spill) = store.output() {
            let key = format!("jobs/{}/{}/{stream}", job.id, job.attempt);
            let put = spill
                .storage
                .put_file(&file, &key, &labrelay::storage::PutOptions::default())
                .await;
            match put {
                Ok(_) if stream == "stdout" => outcome.stdout_ref = Some(key),
                Ok(_) => outcome.stderr_ref = Some(key),
                Err(e) => {
                    tracing::warn!(job = job.id, "keeping the whole {stream} failed: {e}");
                    let _ = write!(
                        outcome.stderr,
                        "\n[labrelay: keeping the whole {stream} in the storage failed: {e}]\n"
                    );
                }
            }
        }
        let _ = tokio::fs::remove_file(&file).await;
    }
}

type Reply = tokio::sync::oneshot::Sender<anyhow::Result<Option<&'static str>>>;

/// Records results in batches: the attempts that end while a commit is under way go
/// together in the next one (a group commit: one disk flush for many jobs).
#[derive(Clone)]
struct Finisher {
    tx: mpsc::UnboundedSender<(Job, Outcome, i64, Reply)>,
}

impl Finisher {
    fn start(store: Store, worker: String) -> Finisher {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Job, Outcome, i64, Reply)>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < 256 {
                    match rx.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let result = {
                    let ends: Vec<(&Job, &Outcome, i64)> =
                        batch.iter().map(|(j, o, r, _)| (j, o, *r)).collect();
                    store.finish_many(&worker, &ends).await
                };
                match result {
                    Ok(states) => {
                        for ((.., reply), state) in batch.into_iter().zip(states) {
                            let _ = reply.send(Ok(state));
                        }
                    }
                    Err(e) => {
                        let message = format!("{e:#}");
                        for (.., reply) in batch {
                            let _ = reply.send(Err(anyhow::anyhow!(message.clone())));
                        }
                    }
                }
            }
        });
        Finisher { tx }
    }

    async fn finish(
        &self,
        job: &Job,
        outcome: &Outcome,
        retry_in_ms: i64,
    ) -> anyhow::Result<Option<&'static str>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || anyhow::anyhow!("the result recorder stopped");
        self.tx
            .send((job.clone(), outcome.clone(), retry_in_ms, reply))
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Submit the scheduled tasks (of these queues) whose times fell after `since`, up to
/// now. Every worker does the same; the unique key `schedule:TASK:TIME` makes it one job
/// per time. A time when no worker ran is not made up for later.
async fn fire_schedules(
    store: &Store,
    registry: &Registry,
    queues: &[String],
    since: &mut chrono::DateTime<chrono::Local>,
) {
    let now = chrono::Local::now();
    for (name, cron) in &registry.schedules {
        let task = &registry.tasks[name];
        if !queues.contains(&task.queue) {
            continue;
        }
        // Whole seconds: croner keeps the fraction of the time it starts from.
        let mut t = chrono::Timelike::with_nanosecond(since, 0).unwrap_or(*since);
        // At most a few per pass: a pattern firing every second cannot flood the table.
        for _ in 0..10 {
            let next = match cron.find_next_occurrence(&t, false) {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(task = %name, "no next time for the schedule: {e}");
                    break;
                }
            };
            if next > now {
                break;
            }
            let job = NewJob {
                task: name.clone(),
                args: task.schedule_args.clone(),
                queue: task.queue.clone(),
                priority: 0,
                max_attempts: task.max_attempts,
                run_at_ms: Some(next.timestamp_millis()),
                unique_key: Some(format!("schedule:{name}:{}", next.timestamp_millis())),
                submitter: "schedule".into(),
                notify: task.email.clone(),
                webhook: task.webhook.clone(),
            };
            match store.submit(&job).await {
                Ok((id, true)) => {
                    tracing::info!(task = %name, at = %next, job = id, "scheduled run submitted");
                }
                Ok((_, false)) => {}
                Err(e) => {
                    // Try this time again on the next pass.
                    tracing::warn!(task = %name, "submitting a scheduled run failed: {e:#}");
                    return;
                }
            }
            t = next;
        }
    }
    *since = now;
}

/// Run one claimed attempt with its heartbeat, and record its end.
async fn attempt(
    store: &Store,
    finisher: &Finisher,
    registry: &Registry,
    worker: &str,
    job: Job,
    shutdown: watch::Receiver<Stop>,
    lease_ms: i64,
) -> Report {
    let mut report = Report {
        id: job.id,
        task: job.task.clone(),
        attempt: job.attempt,
        state: String::new(),
        exit_code: None,
        error: None,
        duration_ms: 0,
    };
    let Ok(task) = registry.task(&job.task).cloned() else {
        let outcome = Outcome {
            error: Some(format!(
                "no task named `{}` is registered at this worker",
                job.task
            )),
            permanent: true,
            ..Outcome::default()
        };
        return record(finisher, &job, &outcome, None, report).await;
    };
    // The heartbeat: renews the lease, and turns a lost one (cancel, or claimed again)
    // into a stop. A shutdown from the worker is passed on.
    let (stop_tx, stop_rx) = watch::channel(Stop::No);
    let beat = {
        let (store, job, worker) = (store.clone(), job.clone(), worker.to_owned());
        let mut shutdown = shutdown.clone();
        let every = Duration::from_secs(registry.settings.heartbeat_secs);
        async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        match store.heartbeat(&job, &worker, lease_ms).await {
                            Ok(true) => {}
                            Ok(false) => {
                                let _ = stop_tx.send(Stop::Lost);
                                return;
                            }
                            // A database hiccup: the lease has room for a few misses.
                            Err(e) => tracing::warn!(job = job.id, "heartbeat failed: {e:#}"),
                        }
                    }
                    r = shutdown.changed() => {
                        if r.is_err() || *shutdown.borrow() == Stop::Shutdown {
                            let _ = stop_tx.send(Stop::Shutdown);
                            return;
                        }
                    }
                }
            }
        }
    };
    let run = runner::run(
        &task,
        &job,
        registry.settings.output_cap_bytes,
        store.output(),
        store.code(),
        stop_rx,
    );
    tokio::pin!(run);
    let ran = tokio::select! {
        ran = &mut run => ran,
        // The heartbeat ends only after sending a stop, which ends the run soon.
        () = beat => run.await,
    };
    match ran {
        Ran::Done(mut outcome) => {
            keep_whole_output(store, &job, &mut outcome).await;
            let retry_in = i64::try_from(
                task.backoff(u32::try_from(job.attempt).unwrap_or(u32::MAX))
                    .as_millis(),
            )
            .unwrap_or(i64::MAX);
            record(finisher, &job, &outcome, Some(retry_in), report).await
        }
        Ran::Stopped(Stop::Shutdown) => {
            report.state = match store.release(&job, worker).await {
                Ok(true) => "released".into(),
                Ok(false) => "refused".into(),
                Err(e) => {
                    // The lease runs out and another worker takes the job.
                    tracing::warn!(job = job.id, "giving the job back failed: {e:#}");
                    "lease-expires".into()
                }
            };
            report
        }
        Ran::Stopped(_) => {
            tracing::info!(
                job = job.id,
                "stopped: the job was cancelled or claimed again"
            );
            report.state = "refused".into();
            report
        }
    }
}

async fn record(
    finisher: &Finisher,
    job: &Job,
    outcome: &Outcome,
    retry_in_ms: Option<i64>,
    mut report: Report,
) -> Report {
    report.exit_code = outcome.exit_code;
    report.error.clone_from(&outcome.error);
    report.duration_ms = outcome.duration_ms;
    // The result must be recorded: a database outage is retried for as long as the
    // lease would have lasted, then the job is left to expire and run again.
    let mut backoff =
        labrelay::retry::Backoff::until(std::time::Instant::now() + Duration::from_mins(1));
    loop {
        match finisher
            .finish(job, outcome, retry_in_ms.unwrap_or(0))
            .await
        {
            Ok(Some(state)) => {
                report.state = state.to_owned();
                return report;
            }
            Ok(None) => {
                tracing::warn!(
                    job = job.id,
                    attempt = job.attempt,
                    "result refused: the attempt is no longer this worker's"
                );
                report.state = "refused".into();
                return report;
            }
            Err(e) => {
                let Some(p) = backoff.pause() else {
                    tracing::error!(job = job.id, "recording the result failed: {e:#}");
                    report.state = "unrecorded".into();
                    return report;
                };
                tracing::warn!(job = job.id, "recording the result failed, retrying: {e:#}");
                tokio::time::sleep(p).await;
            }
        }
    }
}

/// Default worker name: host and process id.
pub fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "localhost".into(), |h| h.trim().to_owned());
    format!("{host}:{}", std::process::id())
}

/// States a job can be listed by.
pub fn is_state(s: &str) -> bool {
    store::STATES.contains(&s)
}
