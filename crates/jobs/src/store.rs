//! The job table in the state database: submit, claim (a lease), heartbeat, finish,
//! cancel, retry, purge, list, stats. Every write of a running job names the attempt
//! and the worker that claimed it, so a worker that lost its lease (the job was claimed
//! again, or cancelled) changes nothing: its late result is refused.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use labrelay::db::{Db, Engine, opt_text, text};
use serde::Serialize;
use sqlx::Row;
use sqlx::any::AnyRow;

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A job's state.
pub const QUEUED: &str = "queued";
/// Claimed by a worker.
pub const RUNNING: &str = "running";
/// Ran and exited 0.
pub const SUCCEEDED: &str = "succeeded";
/// Could not run at all (unknown task, bad arguments): not retried.
pub const FAILED: &str = "failed";
/// Failed on its last attempt.
pub const DEAD: &str = "dead";
/// Cancelled before it finished.
pub const CANCELLED: &str = "cancelled";
/// Every state, in lifecycle order.
pub const STATES: [&str; 6] = [QUEUED, RUNNING, SUCCEEDED, FAILED, DEAD, CANCELLED];

/// A job as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    /// Id.
    pub id: i64,
    /// Registered task.
    pub task: String,
    /// Arguments (a JSON object).
    pub args: serde_json::Value,
    /// Queue.
    pub queue: String,
    /// Higher runs first.
    pub priority: i64,
    /// State.
    pub state: String,
    /// Attempts started so far.
    pub attempt: i64,
    /// Attempts allowed.
    pub max_attempts: i64,
    /// Not before (ms).
    pub run_at_ms: i64,
    /// Idempotency key.
    pub unique_key: Option<String>,
    /// Who submitted it.
    pub submitter: String,
    /// Where to mail the outcome.
    pub notify: Option<String>,
    /// The worker holding it.
    pub worker: Option<String>,
    /// Its lease ends (ms).
    pub lease_until_ms: Option<i64>,
    /// Submitted (ms).
    pub created_ms: i64,
    /// Last attempt started (ms).
    pub started_ms: Option<i64>,
    /// Finished (ms).
    pub finished_ms: Option<i64>,
    /// Exit code of the last attempt.
    pub exit_code: Option<i64>,
    /// Signal that ended the last attempt.
    pub signal: Option<i64>,
    /// Captured stdout (capped).
    pub stdout: Option<String>,
    /// Captured stderr (capped).
    pub stderr: Option<String>,
    /// The last stdout line when it was JSON.
    pub result: Option<serde_json::Value>,
    /// Why the last attempt failed.
    pub error: Option<String>,
    /// How long the last attempt ran (ms).
    pub duration_ms: Option<i64>,
    /// The webhook POSTed when the job ends.
    pub webhook: Option<String>,
    /// When the webhook was delivered or given up (ms).
    pub webhook_done_ms: Option<i64>,
    /// Webhook tries so far.
    pub webhook_attempts: i64,
    /// Why the webhook was given up.
    pub webhook_error: Option<String>,
    /// Storage key of the whole stdout when it was longer than the row keeps.
    pub stdout_ref: Option<String>,
    /// Storage key of the whole stderr, likewise.
    pub stderr_ref: Option<String>,
}

impl Job {
    /// Whether the job has ended (no result will change).
    pub fn is_finished(&self) -> bool {
        !matches!(self.state.as_str(), QUEUED | RUNNING)
    }

    /// The job without its (possibly large) output, as `status` and `list` show it.
    pub fn summary(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.remove("stdout");
            o.remove("stderr");
        }
        v
    }

    /// The outcome, as `result` shows it.
    pub fn result_record(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "state": self.state,
            "exit_code": self.exit_code,
            "result": self.result,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "error": self.error,
            "stdout_ref": self.stdout_ref,
            "stderr_ref": self.stderr_ref,
        })
    }
}

/// The text form of a result record: the task's JSON result when it printed one,
/// otherwise its stdout.
pub fn result_text(record: &serde_json::Value) -> String {
    match record.get("result") {
        Some(r) if !r.is_null() => r.to_string(),
        _ => record
            .get("stdout")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .trim_end()
            .to_owned(),
    }
}

const COLUMNS: &str = "id, task, args, queue, priority, state, attempt, max_attempts, run_at_ms, \
    unique_key, submitter, notify, worker, lease_until_ms, created_ms, started_ms, finished_ms, \
    exit_code, term_signal, stdout, stderr, result, error, duration_ms, webhook, webhook_done_ms, \
    webhook_attempts, webhook_error, stdout_ref, stderr_ref";

fn decode(row: &AnyRow) -> Result<Job, sqlx::Error> {
    let int = |i: usize| row.try_get::<i64, _>(i);
    let opt_int = |i: usize| row.try_get::<Option<i64>, _>(i);
    let json = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
    Ok(Job {
        id: int(0)?,
        task: text(row, 1)?,
        args: json(Some(text(row, 2)?)).unwrap_or(serde_json::Value::Null),
        queue: text(row, 3)?,
        priority: int(4)?,
        state: text(row, 5)?,
        attempt: int(6)?,
        max_attempts: int(7)?,
        run_at_ms: int(8)?,
        unique_key: opt_text(row, 9)?,
        submitter: text(row, 10)?,
        notify: opt_text(row, 11)?,
        worker: opt_text(row, 12)?,
        lease_until_ms: opt_int(13)?,
        created_ms: int(14)?,
        started_ms: opt_int(15)?,
        finished_ms: opt_int(16)?,
        exit_code: opt_int(17)?,
        signal: opt_int(18)?,
        stdout: opt_text(row, 19)?,
        stderr: opt_text(row, 20)?,
        result: json(opt_text(row, 21)?),
        error: opt_text(row, 22)?,
        duration_ms: opt_int(23)?,
        webhook: opt_text(row, 24)?,
        webhook_done_ms: opt_int(25)?,
        webhook_attempts: int(26)?,
        webhook_error: opt_text(row, 27)?,
        stdout_ref: opt_text(row, 28)?,
        stderr_ref: opt_text(row, 29)?,
    })
}

/// A job to submit.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Task name (checked against the registry by the caller).
    pub task: String,
    /// Arguments.
    pub args: serde_json::Map<String, serde_json::Value>,
    /// Queue.
    pub queue: String,
    /// Priority (higher first).
    pub priority: i64,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Not before (ms); now when `None`.
    pub run_at_ms: Option<i64>,
    /// Idempotency key.
    pub unique_key: Option<String>,
    /// Who submits.
    pub submitter: String,
    /// Where to mail the outcome.
    pub notify: Option<String>,
    /// `[jobs.webhooks.NAME]` to POST the outcome to.
    pub webhook: Option<String>,
}

/// How an attempt ended, as the worker reports it.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Killing signal.
    pub signal: Option<i32>,
    /// Captured stdout.
    pub stdout: String,
    /// Captured stderr.
    pub stderr: String,
    /// Last stdout line as JSON.
    pub result: Option<serde_json::Value>,
    /// Failure reason (`None`: success).
    pub error: Option<String>,
    /// Whether the failure can never succeed (not retried).
    pub permanent: bool,
    /// The whole stdout, in a temporary file, when it was longer than the cap.
    pub stdout_file: Option<std::path::PathBuf>,
    /// The whole stderr, likewise.
    pub stderr_file: Option<std::path::PathBuf>,
    /// Storage key of the whole stdout, once uploaded.
    pub stdout_ref: Option<String>,
    /// Storage key of the whole stderr, once uploaded.
    pub stderr_ref: Option<String>,
    /// Run time.
    pub duration_ms: i64,
}

/// An outcome notification sent after a job ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// The mail to `notify`.
    Mail,
    /// The POST to `webhook`.
    Webhook,
}

impl Due {
    /// (target, sent-at, hold/next-try) columns.
    fn columns(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Due::Mail => ("notify", "notified_ms", "notify_lease_ms"),
            Due::Webhook => ("webhook", "webhook_done_ms", "webhook_next_ms"),
        }
    }
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cancelled {
    /// It was waiting: it will not run.
    Queued,
    /// It was running: its worker kills it at its next heartbeat.
    Running,
    /// It had finished already (state unchanged).
    AlreadyFinished,
}

/// Per-queue counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueStats {
    /// Waiting (run_at reached or not).
    pub queued: i64,
    /// Claimed.
    pub running: i64,
    /// Dead.
    pub dead: i64,
    /// Age of the oldest job ready to run (ms).
    pub oldest_ready_ms: Option<i64>,
}

/// Filter for `list`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this state.
    pub state: Option<String>,
    /// Only this submitter.
    pub submitter: Option<String>,
    /// At most this many, newest first.
    pub limit: i64,
}

/// The job table.
#[derive(Clone)]
pub struct Store {
    db: Db,
    /// When expired last attempts were last looked for (ms).
    buried_at: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// When expired API nonces were last deleted (ms).
    nonces_pruned_at: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// Tasks with a concurrency limit: at most this many of their jobs run at once.
    limits: std::sync::Arc<BTreeMap<String, u32>>,
    /// Where outputs larger than the row's cap go.
    output: Option<std::sync::Arc<crate::runner::Spill>>,
    /// What runs code jobs (the sandbox and the sources).
    code: Option<std::sync::Arc<crate::code::CodeRunner>>,
}

impl Store {
    /// On the state database (migrated by the caller).
    pub fn new(db: Db) -> Store {
        Store {
            db,
            buried_at: std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0)),
            nonces_pruned_at: std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0)),
            limits: std::sync::Arc::default(),
            output: None,
            code: None,
        }
    }

    /// The same store, running code jobs with `code`.
    #[must_use]
    pub fn with_code(mut self, code: crate::code::CodeRunner) -> Store {
        self.code = Some(std::sync::Arc::new(code));
        self
    }

    /// What runs code jobs, when this worker runs them.
    pub fn code(&self) -> Option<&crate::code::CodeRunner> {
        self.code.as_deref()
    }

    /// The same store, keeping outputs larger than the row's cap whole in `spill`'s
    /// storage.
    #[must_use]
    pub fn with_output(mut self, spill: crate::runner::Spill) -> Store {
        self.output = Some(std::sync::Arc::new(spill));
        self
    }

    /// The storage for large outputs, if configured.
    pub fn output(&self) -> Option<&crate::runner::Spill> {
        self.output.as_deref()
    }

    /// The same store, claiming at most `limits[task]` running jobs of each listed task
    /// across every worker (task names are registry names: `a-z 0-9 _ -`).
    #[must_use]
    pub fn with_limits(mut self, limits: BTreeMap<String, u32>) -> Store {
        self.limits = std::sync::Arc::new(limits);
        self
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    fn p(&self, n: usize) -> String {
        self.db.engine().placeholder(n)
    }

    fn err(&self, e: sqlx::Error) -> anyhow::Error {
        self.db.err(e).into()
    }

    fn decode_all(&self, rows: &[AnyRow]) -> anyhow::Result<Vec<Job>> {
        rows.iter()
            .map(decode)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))
    }

    /// Record the nonce of a signed API request until `expires_ms`; false when the same
    /// user's nonce is already recorded (a replay). Expired nonces are deleted now and
    /// then on the way.
    pub async fn use_nonce(
        &self,
        user: &str,
        nonce: &str,
        expires_ms: i64,
    ) -> anyhow::Result<bool> {
        let now = now_ms();
        let last = self
            .nonces_pruned_at
            .load(std::sync::atomic::Ordering::Relaxed);
        if now - last >= 10_000
            && self
                .nonces_pruned_at
                .compare_exchange(
                    last,
                    now,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
        {
            sqlx::query(&format!(
                "DELETE FROM labrelay_api_nonces WHERE expires_ms < {}",
                self.p(1)
            ))
            .bind(now)
            .execute(self.db.pool())
            .await
            .map_err(|e| self.err(e))?;
        }
        let inserted = sqlx::query(&format!(
            "INSERT INTO labrelay_api_nonces (user_name, nonce, expires_ms) VALUES ({}, {}, {})",
            self.p(1),
            self.p(2),
            self.p(3)
        ))
        .bind(user.to_owned())
        .bind(nonce.to_owned())
        .bind(expires_ms)
        .execute(self.db.pool())
        .await;
        match inserted {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_database_error()
                    .is_some_and(sqlx::error::DatabaseError::is_unique_violation) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.err(e)),
        }
    }

    /// Insert a job; with a unique key already used, return the existing job's id.
    /// `(id, created)`.
    pub async fn submit(&self, job: &NewJob) -> anyhow::Result<(i64, bool)> {
        let now = now_ms();
        let p = |n| self.p(n);
        let returning = if self.db.engine() == Engine::Mysql {
            ""
        } else {
            " RETURNING id"
        };
        let sql = format!(
            "INSERT INTO labrelay_jobs (task, args, queue, priority, state, attempt, max_attempts, run_at_ms, unique_key, submitter, notify, webhook, created_ms) \
             VALUES ({}, {}, {}, {}, '{QUEUED}', 0, {}, {}, {}, {}, {}, {}, {}){returning}",
            p(1),
            p(2),
            p(3),
            p(4),
            p(5),
            p(6),
            p(7),
            p(8),
            p(9),
            p(10),
            p(11)
        );
        let query = sqlx::query(&sql)
            .bind(job.task.clone())
            .bind(serde_json::Value::Object(job.args.clone()).to_string())
            .bind(job.queue.clone())
            .bind(job.priority)
            .bind(i64::from(job.max_attempts))
            .bind(job.run_at_ms.unwrap_or(now))
            .bind(job.unique_key.clone())
            .bind(job.submitter.clone())
            .bind(job.notify.clone())
            .bind(job.webhook.clone())
            .bind(now);
        let inserted = if self.db.engine() == Engine::Mysql {
            let mut conn = self.db.pool().acquire().await.map_err(|e| self.err(e))?;
            match query.execute(&mut *conn).await {
                Ok(_) => {
                    let row = sqlx::query("SELECT CAST(LAST_INSERT_ID() AS SIGNED)")
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(|e| self.err(e))?;
                    Ok(row.try_get::<i64, _>(0).map_err(|e| self.err(e))?)
                }
                Err(e) => Err(e),
            }
        } else {
            // The NOTIFY goes on the same connection: the pool takes a moment to get a
            // released one back, and a second connection would cost the wake-up a few
            // milliseconds.
            let mut conn = self.db.pool().acquire().await.map_err(|e| self.err(e))?;
            match query.fetch_one(&mut *conn).await {
                Ok(row) => {
                    let id = row.try_get::<i64, _>(0).map_err(|e| self.err(e))?;
                    self.db.notify_on(&mut conn, crate::NOTIFY_CHANNEL).await;
                    return Ok((id, true));
                }
                Err(e) => Err(e),
            }
        };
        match inserted {
            Ok(id) => {
                self.notify_workers().await;
                Ok((id, true))
            }
            Err(e)
                if job.unique_key.is_some()
                    && e.as_database_error()
                        .is_some_and(sqlx::error::DatabaseError::is_unique_violation) =>
            {
                let row = sqlx::query(&format!(
                    "SELECT id FROM labrelay_jobs WHERE unique_key = {}",
                    self.p(1)
                ))
                .bind(job.unique_key.clone())
                .fetch_one(self.db.pool())
                .await
                .map_err(|e| self.err(e))?;
                Ok((row.try_get::<i64, _>(0).map_err(|e| self.err(e))?, false))
            }
            Err(e) => Err(self.err(e)),
        }
    }

    /// Insert many jobs (without unique keys), one multi-row INSERT per 1,000; their
    /// ids, in order.
    pub async fn submit_many(&self, jobs: &[NewJob]) -> anyhow::Result<Vec<i64>> {
        const COLS: usize = 10;
        let now = now_ms();
        let engine = self.db.engine();
        let mut ids = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(1000) {
            if chunk.iter().any(|j| j.unique_key.is_some()) {
                anyhow::bail!("jobs submitted together take no unique keys");
            }
            let rows: Vec<String> = (0..chunk.len())
                .map(|r| {
                    let p: Vec<String> = (1..=COLS).map(|c| self.p(r * COLS + c)).collect();
                    format!(
                        "({}, {}, {}, {}, '{QUEUED}', 0, {}, {}, NULL, {}, {}, {}, {})",
                        p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9]
                    )
                })
                .collect();
            let returning = if engine == Engine::Mysql {
                ""
            } else {
                " RETURNING id"
            };
            let sql = format!(
                "INSERT INTO labrelay_jobs (task, args, queue, priority, state, attempt, max_attempts, run_at_ms, unique_key, submitter, notify, webhook, created_ms) \
                 VALUES {}{returning}",
                rows.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for j in chunk {
                q = q
                    .bind(j.task.clone())
                    .bind(serde_json::Value::Object(j.args.clone()).to_string())
                    .bind(j.queue.clone())
                    .bind(j.priority)
                    .bind(i64::from(j.max_attempts))
                    .bind(j.run_at_ms.unwrap_or(now))
                    .bind(j.submitter.clone())
                    .bind(j.notify.clone())
                    .bind(j.webhook.clone())
                    .bind(now);
            }
            if engine == Engine::Mysql {
                let mut conn = self.db.pool().acquire().await.map_err(|e| self.err(e))?;
                q.execute(&mut *conn).await.map_err(|e| self.err(e))?;
                // The FIRST id of the statement; a multi-row INSERT of a known number
                // of rows gets consecutive ids (InnoDB's autoinc lock modes 0 and 1; the
                // MariaDB default is 1).
                let first: i64 = sqlx::query("SELECT CAST(LAST_INSERT_ID() AS SIGNED)")
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(|e| self.err(e))?
                    .try_get(0)
                    .map_err(|e| self.err(e))?;
                let n = i64::try_from(chunk.len()).unwrap_or(i64::MAX);
                ids.extend(first..first + n);
            } else {
                // Ids are drawn in VALUES order, so ascending ids are the rows' order.
                let mut got: Vec<i64> = q
                    .fetch_all(self.db.pool())
                    .await
                    .map_err(|e| self.err(e))?
                    .iter()
                    .map(|r| r.try_get::<i64, _>(0))
                    .collect::<Result<_, _>>()
                    .map_err(|e| self.err(e))?;
                got.sort_unstable();
                ids.extend(got);
            }
        }
        self.notify_workers().await;
        Ok(ids)
    }

    /// Wake the workers waiting on `labrelay_jobs`: PostgreSQL NOTIFY, the SQLite wake
    /// file (best effort; MariaDB workers poll).
    async fn notify_workers(&self) {
        self.db.notify(crate::NOTIFY_CHANNEL).await;
    }

    /// Jobs whose worker died after their last attempt started: dead, with the reason.
    async fn bury_expired(&self, now: i64) -> anyhow::Result<u64> {
        let sql = format!(
            "UPDATE labrelay_jobs SET state = '{DEAD}', finished_ms = {now}, worker = NULL, lease_until_ms = NULL, \
             error = 'the worker running the last attempt stopped answering (lease expired)' \
             WHERE state = '{RUNNING}' AND lease_until_ms < {now} AND attempt >= max_attempts"
        );
        let done = sqlx::query(&sql)
            .execute(self.db.pool())
            .await
            .map_err(|e| self.err(e))?;
        Ok(done.rows_affected())
    }

    /// Mark jobs whose worker died after their last attempt dead (at most once a
    /// second; [`Store::claim`] does it on its own).
    pub async fn maintain(&self) -> anyhow::Result<()> {
        let now = now_ms();
        let looked = self.buried_at.load(std::sync::atomic::Ordering::Relaxed);
        if now - looked >= 1000 || now < looked {
            self.buried_at
                .store(now, std::sync::atomic::Ordering::Relaxed);
            self.bury_expired(now).await?;
        }
        Ok(())
    }

    /// Take up to `n` jobs of `queues` to publish to RabbitMQ: ready queued jobs and
    /// running jobs whose lease expired, not published within `republish_ms`, and not
    /// of a task with a concurrency limit (those are claimed from the table). They are
    /// marked published now; `(id, queue)`, highest priority first, then oldest.
    ///
    /// The rows are found through the `(state, published_ms)` index (the order by
    /// `published_ms` keeps every planner on it, whatever its statistics), so a sweep
    /// costs what is unpublished, not what waits in RabbitMQ already; the priority
    /// order is that of each batch.
    pub async fn take_for_publish(
        &self,
        queues: &[String],
        n: usize,
        republish_ms: i64,
    ) -> anyhow::Result<Vec<(i64, String)>> {
        if queues.is_empty() || n == 0 {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let stale = now - republish_ms;
        let qlist: Vec<String> = (0..queues.len()).map(|i| self.p(i + 1)).collect();
        let skip_limited = if self.limits.is_empty() {
            String::new()
        } else {
            format!(" AND task NOT IN ({})", self.limited_list())
        };
        let mut rows = Vec::new();
        for due in [
            format!("state = '{QUEUED}' AND published_ms < {stale} AND run_at_ms <= {now}"),
            format!("state = '{RUNNING}' AND published_ms < {stale} AND lease_until_ms < {now}"),
        ] {
            let left = n - rows.len();
            if left == 0 {
                break;
            }
            let due = format!("{due} AND queue IN ({}){skip_limited}", qlist.join(", "));
            rows.extend(self.mark_published(&due, queues, left, now).await?);
        }
        let mut out = rows
            .iter()
            .map(|r| {
                Ok((
                    (
                        -r.try_get::<i64, _>(2)?,
                        r.try_get::<i64, _>(3)?,
                        r.try_get::<i64, _>(0)?,
                    ),
                    text(r, 1)?,
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(|e| self.err(e))?;
        out.sort_unstable();
        Ok(out
            .into_iter()
            .map(|((_, _, id), queue)| (id, queue))
            .collect())
    }

    /// Mark up to `n` rows matching `due` published at `now`; their `id, queue,
    /// priority, run_at_ms`.
    async fn mark_published(
        &self,
        due: &str,
        queues: &[String],
        n: usize,
        now: i64,
    ) -> anyhow::Result<Vec<AnyRow>> {
        const COLS: &str = "id, queue, priority, run_at_ms";
        Ok(match self.db.engine() {
            Engine::Sqlite | Engine::Postgres => {
                let lock = if self.db.engine() == Engine::Postgres {
                    " FOR UPDATE SKIP LOCKED"
                } else {
                    ""
                };
                let sql = format!(
                    "UPDATE labrelay_jobs SET published_ms = {now} WHERE id IN \
                     (SELECT id FROM labrelay_jobs WHERE {due} ORDER BY published_ms LIMIT {n}{lock}) RETURNING {COLS}"
                );
                let mut q = sqlx::query(&sql);
                for queue in queues {
                    q = q.bind(queue.clone());
                }
                q.fetch_all(self.db.pool()).await.map_err(|e| self.err(e))?
            }
            Engine::Mysql => {
                let mut tx = self.db.pool().begin().await.map_err(|e| self.err(e))?;
                let sql = format!(
                    "SELECT {COLS} FROM labrelay_jobs WHERE {due} ORDER BY published_ms LIMIT {n} FOR UPDATE SKIP LOCKED"
                );
                let mut q = sqlx::query(&sql);
                for queue in queues {
                    q = q.bind(queue.clone());
                }
                let rows = q.fetch_all(&mut *tx).await.map_err(|e| self.err(e))?;
                if !rows.is_empty() {
                    let ids: Vec<String> = rows
                        .iter()
                        .map(|r| r.try_get::<i64, _>(0).map(|i| i.to_string()))
                        .collect::<Result<_, _>>()
                        .map_err(|e| self.err(e))?;
                    sqlx::query(&format!(
                        "UPDATE labrelay_jobs SET published_ms = {now} WHERE id IN ({})",
                        ids.join(", ")
                    ))
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.err(e))?;
                }
                tx.commit().await.map_err(|e| self.err(e))?;
                rows
            }
        })
    }

    /// Undo [`Store::take_for_publish`] for jobs whose publish failed: the next sweep
    /// takes them again.
    pub async fn unpublish(&self, ids: &[i64]) -> anyhow::Result<()> {
        for chunk in ids.chunks(500) {
            let list: Vec<String> = chunk.iter().map(ToString::to_string).collect();
            sqlx::query(&format!(
                "UPDATE labrelay_jobs SET published_ms = 0 WHERE id IN ({})",
                list.join(", ")
            ))
            .execute(self.db.pool())
            .await
            .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Claim the jobs of `ids` (of `queues`) that are ready — queued and due, or
    /// running with an expired lease — in one statement; the others (taken, finished,
    /// cancelled, not due, or of a task with a concurrency limit) are left out.
    pub async fn claim_ids(
        &self,
        ids: &[i64],
        worker: &str,
        queues: &[String],
        lease_ms: i64,
    ) -> anyhow::Result<Vec<Job>> {
        if ids.is_empty() || queues.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let list: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let mut filter = format!(
            "id IN ({}) AND ((state = '{QUEUED}' AND run_at_ms <= {now}) OR (state = '{RUNNING}' AND lease_until_ms < {now})) \
             AND attempt < max_attempts",
            list.join(", ")
        );
        if !self.limits.is_empty() {
            let _ = write!(filter, " AND task NOT IN ({})", self.limited_list());
        }
        // Waiting for locked rows, not skipping them: a sweep of another worker that
        // merely looked at one of these rows holds its lock until it commits, and a
        // skipped row would be a message dropped for a job still ready. Rows are
        // locked in id order, as every claim of named jobs does.
        self.claim_locking(
            worker,
            queues,
            &filter,
            "ORDER BY id",
            &ids.len().to_string(),
            now + lease_ms,
            false,
        )
        .await
    }

    /// Claim up to `n` ready jobs of the tasks with a concurrency limit only (the
    /// RabbitMQ broker leaves those to the table).
    pub async fn claim_limited_tasks(
        &self,
        worker: &str,
        queues: &[String],
        n: usize,
        lease_ms: i64,
    ) -> anyhow::Result<Vec<Job>> {
        let now = now_ms();
        let ready = format!("state = '{QUEUED}' AND run_at_ms <= {now}");
        let mut jobs = Vec::new();
        for (task, &limit) in self.limits.iter() {
            if jobs.len() >= n {
                break;
            }
            let more = self
                .claim_limited(
                    worker,
                    queues,
                    task,
                    limit,
                    n - jobs.len(),
                    &ready,
                    now + lease_ms,
                )
                .await?;
            jobs.extend(more);
        }
        Ok(jobs)
    }

    /// Claim up to `n` jobs of `queues` for `worker`: ready queued jobs and running jobs
    /// whose lease expired (their worker died), highest priority first, then oldest.
    pub async fn claim(
        &self,
        worker: &str,
        queues: &[String],
        n: usize,
        lease_ms: i64,
    ) -> anyhow::Result<Vec<Job>> {
        if n == 0 || queues.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut jobs = Vec::new();
        // Jobs of dead workers are looked for once a second: a lease is many seconds
        // long, and the ready jobs' query stays a plain walk down the claim index.
        let looked = self.buried_at.load(std::sync::atomic::Ordering::Relaxed);
        if now - looked >= 1000 || now < looked {
            self.buried_at
                .store(now, std::sync::atomic::Ordering::Relaxed);
            self.bury_expired(now).await?;
            let expired = format!("state = '{RUNNING}' AND lease_until_ms < {now}");
            jobs = self
                .claim_where(
                    worker,
                    queues,
                    &expired,
                    "ORDER BY id",
                    &n.to_string(),
                    now + lease_ms,
                )
                .await?;
        }
        let ready = format!("state = '{QUEUED}' AND run_at_ms <= {now}");
        let order = "ORDER BY priority DESC, run_at_ms, id";
        if jobs.len() < n {
            let cond = if self.limits.is_empty() {
                ready.clone()
            } else {
                format!("{ready} AND task NOT IN ({})", self.limited_list())
            };
            let more = self
                .claim_where(
                    worker,
                    queues,
                    &cond,
                    order,
                    &(n - jobs.len()).to_string(),
                    now + lease_ms,
                )
                .await?;
            jobs.extend(more);
        }
        if jobs.len() < n && !self.limits.is_empty() {
            let more = self
                .claim_limited_tasks(worker, queues, n - jobs.len(), lease_ms)
                .await?;
            jobs.extend(more);
        }
        Ok(jobs)
    }

    /// The limited tasks as an SQL list of literals (names are `a-z 0-9 _ -`).
    fn limited_list(&self) -> String {
        self.limits
            .keys()
            .map(|t| format!("'{}'", t.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Claim up to `n` ready jobs of `task`, leaving at most `limit` of its jobs running.
    /// The count and the claim are one step for every worker: a single statement on
    /// SQLite (which runs writes one at a time), under a per-task advisory lock on
    /// PostgreSQL and a named lock on MariaDB.
    #[allow(clippy::too_many_arguments)]
    async fn claim_limited(
        &self,
        worker: &str,
        queues: &[String],
        task: &str,
        limit: u32,
        n: usize,
        ready: &str,
        lease_until: i64,
    ) -> anyhow::Result<Vec<Job>> {
        let task_lit = format!("'{}'", task.replace('\'', "''"));
        let filter = format!("{ready} AND task = {task_lit}");
        let running = format!(
            "SELECT COUNT(*) FROM labrelay_jobs WHERE task = {task_lit} AND state = '{RUNNING}'"
        );
        let order = "ORDER BY priority DESC, run_at_ms, id";
        let lock_name = format!("labrelay_jobs:{task}");
        match self.db.engine() {
            Engine::Sqlite => {
                let take = format!("MAX(0, MIN({n}, {limit} - ({running})))");
                self.claim_where(worker, queues, &filter, order, &take, lease_until)
                    .await
            }
            Engine::Postgres => {
                let mut tx = self.db.pool().begin().await.map_err(|e| self.err(e))?;
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                    .bind(lock_name)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.err(e))?;
                let take = format!("GREATEST(0, LEAST({n}, {limit} - ({running})))");
                let jobs = self
                    .claim_on(
                        &mut tx,
                        worker,
                        queues,
                        &filter,
                        order,
                        &take,
                        lease_until,
                        " FOR UPDATE SKIP LOCKED",
                    )
                    .await?;
                tx.commit().await.map_err(|e| self.err(e))?;
                Ok(jobs)
            }
            Engine::Mysql => {
                let mut conn = self.db.pool().acquire().await.map_err(|e| self.err(e))?;
                let got: Option<i64> = sqlx::query("SELECT GET_LOCK(?, 30)")
                    .bind(lock_name.clone())
                    .fetch_one(&mut *conn)
                    .await
                    .and_then(|r| r.try_get::<Option<i64>, _>(0))
                    .map_err(|e| self.err(e))?;
                if got != Some(1) {
                    return Ok(Vec::new());
                }
                let claimed = async {
                    let busy: i64 = sqlx::query(&running)
                        .fetch_one(&mut *conn)
                        .await
                        .and_then(|r| r.try_get::<i64, _>(0))
                        .map_err(|e| self.err(e))?;
                    let take = usize::try_from(i64::from(limit) - busy).unwrap_or(0).min(n);
                    if take == 0 {
                        return Ok(Vec::new());
                    }
                    self.claim_mysql(
                        &mut conn,
                        worker,
                        queues,
                        &filter,
                        order,
                        take,
                        lease_until,
                        " FOR UPDATE SKIP LOCKED",
                    )
                    .await
                }
                .await;
                sqlx::query("SELECT RELEASE_LOCK(?)")
                    .bind(lock_name)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| self.err(e))?;
                claimed
            }
        }
    }

    /// Claim up to `take` (a number, or an SQL expression on SQLite and PostgreSQL)
    /// jobs of `queues` matching `filter`, in `order`.
    async fn claim_where(
        &self,
        worker: &str,
        queues: &[String],
        filter: &str,
        order: &str,
        take: &str,
        lease_until: i64,
    ) -> anyhow::Result<Vec<Job>> {
        self.claim_locking(worker, queues, filter, order, take, lease_until, true)
            .await
    }

    /// [`Store::claim_where`]; `skip_locked: false` waits for rows another
    /// transaction holds instead of passing them by (a claim of named jobs, which must
    /// not miss one that a concurrent sweep merely looked at).
    #[allow(clippy::too_many_arguments)]
    async fn claim_locking(
        &self,
        worker: &str,
        queues: &[String],
        filter: &str,
        order: &str,
        take: &str,
        lease_until: i64,
        skip_locked: bool,
    ) -> anyhow::Result<Vec<Job>> {
        let mut conn = self.db.pool().acquire().await.map_err(|e| self.err(e))?;
        let lock = if skip_locked {
            " FOR UPDATE SKIP LOCKED"
        } else {
            " FOR UPDATE"
        };
        if self.db.engine() == Engine::Mysql {
            let n = take.parse::<usize>().unwrap_or(0);
            self.claim_mysql(
                &mut conn,
                worker,
                queues,
                filter,
                order,
                n,
                lease_until,
                lock,
            )
            .await
        } else {
            self.claim_on(
                &mut conn,
                worker,
                queues,
                filter,
                order,
                take,
                lease_until,
                lock,
            )
            .await
        }
    }

    /// The SET clause of a claim; placeholders 1 (worker) and 2 (lease end).
    fn claim_set(&self) -> String {
        format!(
            "state = '{RUNNING}', attempt = attempt + 1, worker = {}, lease_until_ms = {}, started_ms = {}, \
             finished_ms = NULL, published_ms = 0",
            self.p(1),
            self.p(2),
            now_ms()
        )
    }

    /// `filter AND queue IN (...)`, the queues from placeholder 3 on.
    fn in_queues(&self, filter: &str, queues: &[String]) -> String {
        let qlist: Vec<String> = (0..queues.len()).map(|i| self.p(i + 3)).collect();
        format!("{filter} AND queue IN ({})", qlist.join(", "))
    }

    /// A claim in one statement (SQLite; PostgreSQL with `FOR UPDATE SKIP LOCKED`).
    #[allow(clippy::too_many_arguments)]
    async fn claim_on(
        &self,
        conn: &mut sqlx::AnyConnection,
        worker: &str,
        queues: &[String],
        filter: &str,
        order: &str,
        take: &str,
        lease_until: i64,
        lock: &str,
    ) -> anyhow::Result<Vec<Job>> {
        let lock = if self.db.engine() == Engine::Postgres {
            lock
        } else {
            ""
        };
        let chosen = if self.db.engine() == Engine::Postgres && queues.len() > 1 {
            // A list of queues cannot walk the claim index in its order: PostgreSQL would
            // read and sort every ready row of those queues for each claim. One
            // index-ordered branch per queue instead, each taking (and locking) at most
            // `take`, then the best `take` of them all.
            let branches: Vec<String> = (0..queues.len())
                .map(|i| {
                    // Row locks are not allowed in a UNION's own branches, only in
                    // the subqueries they read.
                    format!(
                        "SELECT * FROM (SELECT id, priority, run_at_ms FROM labrelay_jobs \
                         WHERE {filter} AND queue = {} {order} LIMIT {take}{lock}) AS q{i}",
                        self.p(i + 3)
                    )
                })
                .collect();
            format!(
                "SELECT id FROM ({}) AS ready {order} LIMIT {take}",
                branches.join(" UNION ALL ")
            )
        } else {
            format!(
                "SELECT id FROM labrelay_jobs WHERE {} {order} LIMIT {take}{lock}",
                self.in_queues(filter, queues)
            )
        };
        let sql = format!(
            "UPDATE labrelay_jobs SET {} WHERE id IN ({chosen}) RETURNING {COLUMNS}",
            self.claim_set()
        );
        let mut q = sqlx::query(&sql).bind(worker.to_owned()).bind(lease_until);
        for queue in queues {
            q = q.bind(queue.clone());
        }
        let rows = q.fetch_all(&mut *conn).await.map_err(|e| self.err(e))?;
        let mut jobs = self.decode_all(&rows)?;
        jobs.sort_by_key(|j| (-j.priority, j.run_at_ms, j.id));
        Ok(jobs)
    }

    /// A claim on MariaDB/MySQL: select with `FOR UPDATE SKIP LOCKED`, update, read
    /// back, in one transaction.
    #[allow(clippy::too_many_arguments)]
    async fn claim_mysql(
        &self,
        conn: &mut sqlx::AnyConnection,
        worker: &str,
        queues: &[String],
        filter: &str,
        order: &str,
        n: usize,
        lease_until: i64,
        lock: &str,
    ) -> anyhow::Result<Vec<Job>> {
        use sqlx::Connection as _;
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut tx = conn.begin().await.map_err(|e| self.err(e))?;
        // The queue placeholders are numbered from 3 in `in_queues`; MySQL's are all
        // `?`, bound in order.
        let sql = format!(
            "SELECT id FROM labrelay_jobs WHERE {} {order} LIMIT {n}{lock}",
            self.in_queues(filter, queues)
        );
        let mut q = sqlx::query(&sql);
        for queue in queues {
            q = q.bind(queue.clone());
        }
        let ids: Vec<i64> = q
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.err(e))?
            .iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))?;
        if ids.is_empty() {
            tx.commit().await.map_err(|e| self.err(e))?;
            return Ok(Vec::new());
        }
        let list = ids
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        sqlx::query(&format!(
            "UPDATE labrelay_jobs SET {} WHERE id IN ({list})",
            self.claim_set()
        ))
        .bind(worker.to_owned())
        .bind(lease_until)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM labrelay_jobs WHERE id IN ({list}) {order}"
        ))
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        self.decode_all(&rows)
    }

    /// Renew the lease. `false`: the job is no longer this worker's attempt (cancelled,
    /// or claimed again after the lease expired): stop it.
    pub async fn heartbeat(&self, job: &Job, worker: &str, lease_ms: i64) -> anyhow::Result<bool> {
        let sql = format!(
            "UPDATE labrelay_jobs SET lease_until_ms = {} WHERE id = {} AND attempt = {} AND worker = {} AND state = '{RUNNING}'",
            self.p(1),
            self.p(2),
            self.p(3),
            self.p(4)
        );
        let done = sqlx::query(&sql)
            .bind(now_ms() + lease_ms)
            .bind(job.id)
            .bind(job.attempt)
            .bind(worker.to_owned())
            .execute(self.db.pool())
            .await
            .map_err(|e| self.err(e))?;
        Ok(done.rows_affected() == 1)
    }

    /// Record how this attempt ended: succeeded; or failed, then queued again after
    /// `retry_in_ms` while attempts are left (dead after the last, failed at once when
    /// the failure is permanent). Returns the new state, or `None` when the attempt
    /// was no longer this worker's (the result is refused).
    pub async fn finish(
        &self,
        job: &Job,
        worker: &str,
        outcome: &Outcome,
        retry_in_ms: i64,
    ) -> anyhow::Result<Option<&'static str>> {
        let mut states = self
            .finish_many(worker, &[(job, outcome, retry_in_ms)])
            .await?;
        Ok(states.pop().flatten())
    }

    /// The state an attempt leaves its job in, and its `finished_ms` and `run_at_ms`.
    fn end_of(
        job: &Job,
        outcome: &Outcome,
        retry_in_ms: i64,
        now: i64,
    ) -> (&'static str, Option<i64>, i64) {
        let state = match &outcome.error {
            None => SUCCEEDED,
            Some(_) if outcome.permanent => FAILED,
            Some(_) if job.attempt < job.max_attempts => QUEUED,
            Some(_) => DEAD,
        };
        if state == QUEUED {
            (state, None, now + retry_in_ms)
        } else {
            (state, Some(now), job.run_at_ms)
        }
    }

    /// [`Store::finish_many`] on PostgreSQL: one `UPDATE … FROM (VALUES …)` for the whole
    /// group, fenced row by row (attempt, worker, running) like the one-row form.
    async fn finish_many_pg(
        &self,
        worker: &str,
        ends: &[(&Job, &Outcome, i64)],
    ) -> anyhow::Result<Vec<Option<&'static str>>> {
        const COLS: usize = 14;
        let now = now_ms();
        let rows: Vec<String> = (0..ends.len())
            .map(|r| {
                let p: Vec<String> = (1..=COLS).map(|c| format!("${}", r * COLS + c + 1)).collect();
                format!(
                    "({}::int8, {}::int8, {}::text, {}::int8, {}::int8, {}::int8, {}::int8, {}::text, {}::text, {}::text, {}::text, {}::int8, {}::text, {}::text)",
                    p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12], p[13]
                )
            })
            .collect();
        let sql = format!(
            "UPDATE labrelay_jobs AS j SET state = v.state, finished_ms = v.finished_ms, run_at_ms = v.run_at_ms, \
             worker = NULL, lease_until_ms = NULL, exit_code = v.exit_code, term_signal = v.term_signal, \
             stdout = v.stdout, stderr = v.stderr, result = v.result, error = v.error, duration_ms = v.duration_ms, \
             stdout_ref = v.stdout_ref, stderr_ref = v.stderr_ref \
             FROM (VALUES {}) AS v(id, attempt, state, finished_ms, run_at_ms, exit_code, term_signal, stdout, stderr, \
             result, error, duration_ms, stdout_ref, stderr_ref) \
             WHERE j.id = v.id AND j.attempt = v.attempt AND j.worker = $1 AND j.state = '{RUNNING}' RETURNING j.id",
            rows.join(", ")
        );
        let mut q = sqlx::query(&sql).bind(worker.to_owned());
        let mut states = Vec::with_capacity(ends.len());
        for (job, outcome, retry_in_ms) in ends {
            let (state, finished, run_at) = Self::end_of(job, outcome, *retry_in_ms, now);
            states.push(state);
            q = q
                .bind(job.id)
                .bind(job.attempt)
                .bind(state)
                .bind(finished)
                .bind(run_at)
                .bind(outcome.exit_code.map(i64::from))
                .bind(outcome.signal.map(i64::from))
                .bind(outcome.stdout.clone())
                .bind(outcome.stderr.clone())
                .bind(outcome.result.as_ref().map(ToString::to_string))
                .bind(outcome.error.clone())
                .bind(outcome.duration_ms)
                .bind(outcome.stdout_ref.clone())
                .bind(outcome.stderr_ref.clone());
        }
        let done: std::collections::HashSet<i64> = q
            .fetch_all(self.db.pool())
            .await
            .map_err(|e| self.err(e))?
            .iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))?;
        Ok(ends
            .iter()
            .zip(states)
            .map(|((job, ..), state)| done.contains(&job.id).then_some(state))
            .collect())
    }

    /// [`Store::finish`] for several attempts of this worker in one transaction (one
    /// commit, so one disk flush, for all of them): the state of each, in order.
    pub async fn finish_many(
        &self,
        worker: &str,
        ends: &[(&Job, &Outcome, i64)],
    ) -> anyhow::Result<Vec<Option<&'static str>>> {
        if self.db.engine() == Engine::Postgres && ends.len() > 1 {
            return self.finish_many_pg(worker, ends).await;
        }
        let now = now_ms();
        let p = |n| self.p(n);
        let sql = format!(
            "UPDATE labrelay_jobs SET state = {}, finished_ms = {}, run_at_ms = {}, worker = NULL, lease_until_ms = NULL, \
             exit_code = {}, term_signal = {}, stdout = {}, stderr = {}, result = {}, error = {}, duration_ms = {}, \
             stdout_ref = {}, stderr_ref = {} \
             WHERE id = {} AND attempt = {} AND worker = {} AND state = '{RUNNING}'",
            p(1),
            p(2),
            p(3),
            p(4),
            p(5),
            p(6),
            p(7),
            p(8),
            p(9),
            p(10),
            p(11),
            p(12),
            p(13),
            p(14),
            p(15)
        );
        let mut tx = self.db.pool().begin().await.map_err(|e| self.err(e))?;
        let mut states = Vec::with_capacity(ends.len());
        for (job, outcome, retry_in_ms) in ends {
            let (state, finished, run_at) = Self::end_of(job, outcome, *retry_in_ms, now);
            let done = sqlx::query(&sql)
                .bind(state)
                .bind(finished)
                .bind(run_at)
                .bind(outcome.exit_code.map(i64::from))
                .bind(outcome.signal.map(i64::from))
                .bind(outcome.stdout.clone())
                .bind(outcome.stderr.clone())
                .bind(outcome.result.as_ref().map(ToString::to_string))
                .bind(outcome.error.clone())
                .bind(outcome.duration_ms)
                .bind(outcome.stdout_ref.clone())
                .bind(outcome.stderr_ref.clone())
                .bind(job.id)
                .bind(job.attempt)
                .bind(worker.to_owned())
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
            states.push((done.rows_affected() == 1).then_some(state));
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(states)
    }

    /// Give a job back without counting the attempt (the worker is shutting down).
    pub async fn release(&self, job: &Job, worker: &str) -> anyhow::Result<bool> {
        let sql = format!(
            "UPDATE labrelay_jobs SET state = '{QUEUED}', attempt = attempt - 1, worker = NULL, lease_until_ms = NULL, \
             run_at_ms = {} WHERE id = {} AND attempt = {} AND worker = {} AND state = '{RUNNING}'",
            self.p(1),
            self.p(2),
            self.p(3),
            self.p(4)
        );
        let done = sqlx::query(&sql)
            .bind(now_ms())
            .bind(job.id)
            .bind(job.attempt)
            .bind(worker.to_owned())
            .execute(self.db.pool())
            .await
            .map_err(|e| self.err(e))?;
        Ok(done.rows_affected() == 1)
    }

    /// Hold up to `n` finished jobs whose outcome `kind` is due (not sent, not held by
    /// another worker) for `lease_ms`, and return them.
    pub async fn claim_due(&self, kind: Due, n: usize, lease_ms: i64) -> anyhow::Result<Vec<Job>> {
        let now = now_ms();
        let (target, done, hold) = kind.columns();
        let due = format!(
            "{target} IS NOT NULL AND {done} IS NULL AND state IN ('{SUCCEEDED}', '{FAILED}', '{DEAD}', '{CANCELLED}') \
             AND ({hold} IS NULL OR {hold} < {now})"
        );
        let until = now + lease_ms;
        let ids: Vec<i64> = sqlx::query(&format!(
            "SELECT id FROM labrelay_jobs WHERE {due} ORDER BY id LIMIT {n}"
        ))
        .fetch_all(self.db.pool())
        .await
        .map_err(|e| self.err(e))?
        .iter()
        .map(|r| r.try_get::<i64, _>(0))
        .collect::<Result<_, _>>()
        .map_err(|e| self.err(e))?;
        let mut taken = Vec::new();
        for id in ids {
            // The first to set the hold wins the job.
            let set = match kind {
                Due::Mail => format!("{hold} = {until}"),
                Due::Webhook => {
                    format!("{hold} = {until}, webhook_attempts = webhook_attempts + 1")
                }
            };
            let won = sqlx::query(&format!(
                "UPDATE labrelay_jobs SET {set} WHERE id = {} AND {due}",
                self.p(1)
            ))
            .bind(id)
            .execute(self.db.pool())
            .await
            .map_err(|e| self.err(e))?;
            if won.rows_affected() == 1
                && let Some(job) = self.get(id).await?
            {
                taken.push(job);
            }
        }
        Ok(taken)
    }

    /// Record that the outcome `kind` of job `id` was sent, or given up with `error`.
    pub async fn sent(&self, kind: Due, id: i64, error: Option<&str>) -> anyhow::Result<()> {
        let (_, done, hold) = kind.columns();
        let now = now_ms();
        let sql = match kind {
            Due::Mail => format!(
                "UPDATE labrelay_jobs SET {done} = {now}, {hold} = NULL WHERE id = {}",
                self.p(1)
            ),
            Due::Webhook => format!(
                "UPDATE labrelay_jobs SET {done} = {now}, {hold} = NULL, webhook_error = {} WHERE id = {}",
                self.p(1),
                self.p(2)
            ),
        };
        let q = match kind {
            Due::Mail => sqlx::query(&sql).bind(id),
            Due::Webhook => sqlx::query(&sql).bind(error.map(str::to_owned)).bind(id),
        };
        q.execute(self.db.pool()).await.map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Try the outcome `kind` of job `id` again at `next_ms` (the hold becomes the wait).
    pub async fn send_later(&self, kind: Due, id: i64, next_ms: i64) -> anyhow::Result<()> {
        let (_, _, hold) = kind.columns();
        sqlx::query(&format!(
            "UPDATE labrelay_jobs SET {hold} = {} WHERE id = {}",
            self.p(1),
            self.p(2)
        ))
        .bind(next_ms)
        .bind(id)
        .execute(self.db.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// One job.
    pub async fn get(&self, id: i64) -> anyhow::Result<Option<Job>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM labrelay_jobs WHERE id = {}",
            self.p(1)
        ))
        .bind(id)
        .fetch_optional(self.db.pool())
        .await
        .map_err(|e| self.err(e))?;
        row.as_ref()
            .map(decode)
            .transpose()
            .map_err(|e| self.err(e))
    }

    /// Cancel a job; `None` when there is no such job.
    pub async fn cancel(&self, id: i64, by: &str) -> anyhow::Result<Option<Cancelled>> {
        let Some(job) = self.get(id).await? else {
            return Ok(None);
        };
        if job.state != QUEUED && job.state != RUNNING {
            return Ok(Some(Cancelled::AlreadyFinished));
        }
        let sql = format!(
            "UPDATE labrelay_jobs SET state = '{CANCELLED}', finished_ms = {}, worker = NULL, lease_until_ms = NULL, \
             cancel_requested = 1, error = {} WHERE id = {} AND state = {}",
            self.p(1),
            self.p(2),
            self.p(3),
            self.p(4)
        );
        let done = sqlx::query(&sql)
            .bind(now_ms())
            .bind(format!("cancelled by {by}"))
            .bind(id)
            .bind(job.state.clone())
            .execute(self.db.pool())
            .await
            .map_err(|e| self.err(e))?;
        if done.rows_affected() == 0 {
            // It changed meanwhile (finished, or claimed): look again.
            return Box::pin(self.cancel(id, by)).await;
        }
        Ok(Some(if job.state == RUNNING {
            Cancelled::Running
        } else {
            Cancelled::Queued
        }))
    }

    /// Queue a finished (failed, dead or cancelled) job again with fresh attempts.
    /// `Ok(false)` when it is queued, running or succeeded.
    pub async fn retry(&self, id: i64) -> anyhow::Result<bool> {
        let sql = format!(
            "UPDATE labrelay_jobs SET state = '{QUEUED}', attempt = 0, run_at_ms = {}, finished_ms = NULL, \
             cancel_requested = 0, notified_ms = NULL, notify_lease_ms = NULL, webhook_next_ms = NULL, published_ms = 0, \
             webhook_done_ms = NULL, webhook_attempts = 0, webhook_error = NULL \
             WHERE id = {} AND state IN ('{FAILED}', '{DEAD}', '{CANCELLED}')",
            self.p(1),
            self.p(2)
        );
        let done = sqlx::query(&sql)
            .bind(now_ms())
            .bind(id)
            .execute(self.db.pool())
            .await
            .map_err(|e| self.err(e))?;
        if done.rows_affected() == 1 {
            self.notify_workers().await;
        }
        Ok(done.rows_affected() == 1)
    }

    /// Delete dead jobs that finished before `before_ms`.
    pub async fn purge_dead(&self, before_ms: i64) -> anyhow::Result<u64> {
        let done = sqlx::query(&format!(
            "DELETE FROM labrelay_jobs WHERE state = '{DEAD}' AND finished_ms < {}",
            self.p(1)
        ))
        .bind(before_ms)
        .execute(self.db.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(done.rows_affected())
    }

    /// Jobs, newest first.
    pub async fn list(&self, filter: &ListFilter) -> anyhow::Result<Vec<Job>> {
        let mut conds = Vec::new();
        let mut binds = Vec::new();
        if let Some(s) = &filter.state {
            binds.push(s.clone());
            conds.push(format!("state = {}", self.p(binds.len())));
        }
        if let Some(s) = &filter.submitter {
            binds.push(s.clone());
            conds.push(format!("submitter = {}", self.p(binds.len())));
        }
        let cond = if conds.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conds.join(" AND "))
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM labrelay_jobs {cond} ORDER BY id DESC LIMIT {}",
            filter.limit.max(1)
        );
        let mut q = sqlx::query(&sql);
        for b in binds {
            q = q.bind(b);
        }
        let rows = q.fetch_all(self.db.pool()).await.map_err(|e| self.err(e))?;
        self.decode_all(&rows)
    }

    /// Counts per queue.
    pub async fn stats(&self) -> anyhow::Result<BTreeMap<String, QueueStats>> {
        let now = now_ms();
        let sql = format!(
            "SELECT queue, state, COUNT(*), MIN(CASE WHEN state = '{QUEUED}' AND run_at_ms <= {now} THEN run_at_ms END) \
             FROM labrelay_jobs WHERE state IN ('{QUEUED}', '{RUNNING}', '{DEAD}') GROUP BY queue, state"
        );
        let rows = sqlx::query(&sql)
            .fetch_all(self.db.pool())
            .await
            .map_err(|e| self.err(e))?;
        let mut out: BTreeMap<String, QueueStats> = BTreeMap::new();
        for r in rows {
            let queue = text(&r, 0).map_err(|e| self.err(e))?;
            let state = text(&r, 1).map_err(|e| self.err(e))?;
            let n: i64 = r.try_get(2).map_err(|e| self.err(e))?;
            let oldest: Option<i64> = r.try_get(3).map_err(|e| self.err(e))?;
            let s = out.entry(queue).or_default();
            match state.as_str() {
                QUEUED => {
                    s.queued = n;
                    s.oldest_ready_ms = oldest.map(|t| now - t);
                }
                RUNNING => s.running = n,
                _ => s.dead = n,
            }
        }
        Ok(out)
    }
}
