//! Code submissions (`code-submit add / run / status / enable`) and the built-in `code`
//! task that runs one in the sandbox.
//!
//! A submission is a row of `labrelay_code_submissions` and its source in the storage
//! backend as `ID.EXT`. `run` queues a job of the task `code` with the unique key
//! `code:ID:RUNS` (so a `run` repeated after a crash finds the same job); the worker
//! runs the source in the sandbox and stores the report in the row, fenced by the job id
//! (a stale job cannot overwrite a newer run's result). A run that ends in an error of
//! the code (compile or runtime error, a limit) disables the submission until
//! `code-submit enable ID`, as the seed's `enable` flag did.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use labrelay::db::{Db, opt_text, text};
use labrelay::storage::ObjectStorage as _;
use sandbox::{Report, Sandbox, Settings, Status};
use sqlx::Row as _;
use tokio::sync::watch;

use crate::runner::{Ran, Stop};
use crate::store::{Job, Outcome};

/// The built-in task that runs a submission.
pub const CODE: &str = "code";

/// Status of a submission that was never run.
pub const NOT_RUN: &str = "Not Run";

/// Largest source, stdin or expected output accepted.
pub const MAX_INPUT_BYTES: usize = 1 << 20;

/// One submission.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Submission {
    /// Its id.
    pub id: String,
    /// Who gets the result.
    pub email: String,
    /// `[languages.NAME]` key.
    pub language: String,
    /// Key of the source in the code storage.
    pub source_key: String,
    /// stdin of the run.
    #[serde(skip)]
    pub stdin: Option<String>,
    /// The expected output.
    #[serde(skip)]
    pub expected: Option<String>,
    /// Who added it.
    pub submitter: String,
    /// Disabled after an error of the code.
    pub disabled: bool,
    /// `Not Run` or a Judge0 status.
    pub status: String,
    /// The job of the latest run.
    pub job_id: Option<i64>,
    /// Runs finished.
    pub runs: i64,
    /// The run's exit code.
    pub exit_code: Option<i64>,
    /// The signal that ended the run.
    pub signal: Option<i64>,
    /// CPU time, ms.
    pub time_ms: Option<i64>,
    /// Wall-clock time, ms.
    pub wall_ms: Option<i64>,
    /// Peak memory, KiB.
    pub memory_kib: Option<i64>,
    /// stdout of the run.
    pub stdout: Option<String>,
    /// stderr of the run.
    pub stderr: Option<String>,
    /// The compiler's output.
    pub compile_output: Option<String>,
    /// Which limit was hit, or what went wrong.
    pub message: Option<String>,
    /// What enforced the limits.
    pub limits_by: Option<String>,
    /// Added at (ms since the epoch).
    pub created_ms: i64,
    /// Latest run queued at.
    pub queued_ms: Option<i64>,
    /// Latest run finished at.
    pub finished_ms: Option<i64>,
}

const COLUMNS: &str = "id, email, language, source_key, stdin, expected, submitter, disabled, \
    status, job_id, runs, exit_code, term_signal, time_ms, wall_ms, memory_kib, stdout, stderr, \
    compile_output, message, limits_by, created_ms, queued_ms, finished_ms";

fn decode(r: &sqlx::any::AnyRow) -> Result<Submission, sqlx::Error> {
    Ok(Submission {
        id: text(r, 0)?,
        email: text(r, 1)?,
        language: text(r, 2)?,
        source_key: text(r, 3)?,
        stdin: opt_text(r, 4)?,
        expected: opt_text(r, 5)?,
        submitter: text(r, 6)?,
        disabled: r.try_get::<i64, _>(7)? != 0,
        status: text(r, 8)?,
        job_id: r.try_get(9)?,
        runs: r.try_get(10)?,
        exit_code: r.try_get(11)?,
        signal: r.try_get(12)?,
        time_ms: r.try_get(13)?,
        wall_ms: r.try_get(14)?,
        memory_kib: r.try_get(15)?,
        stdout: opt_text(r, 16)?,
        stderr: opt_text(r, 17)?,
        compile_output: opt_text(r, 18)?,
        message: opt_text(r, 19)?,
        limits_by: opt_text(r, 20)?,
        created_ms: r.try_get(21)?,
        queued_ms: r.try_get(22)?,
        finished_ms: r.try_get(23)?,
    })
}

/// The first `n` characters of `s`, with `…` when there is more.
pub fn excerpt(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

impl Submission {
    /// The status list's record (`code-submit status`): everything but the inputs, the
    /// output cut to an excerpt, and the source's link.
    pub fn record(&self, link: &str) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["link"] = serde_json::Value::String(link.to_owned());
        v["output"] = serde_json::Value::String(excerpt(self.stdout.as_deref().unwrap_or(""), 200));
        v
    }

    /// The stored report of the latest run, when it finished.
    pub fn report(&self) -> Option<Report> {
        self.finished_ms?;
        Some(Report {
            status: Status::parse(&self.status)?,
            exit_code: self.exit_code.map(|c| c as i32),
            signal: self.signal.map(|c| c as i32),
            time_ms: self.time_ms.unwrap_or(0) as u64,
            wall_ms: self.wall_ms.unwrap_or(0) as u64,
            memory_kib: self.memory_kib.unwrap_or(0) as u64,
            stdout: self.stdout.clone().unwrap_or_default(),
            stderr: self.stderr.clone().unwrap_or_default(),
            compile_output: self.compile_output.clone().unwrap_or_default(),
            message: self.message.clone(),
            limits: self.limits_by.clone().unwrap_or_default(),
        })
    }

    /// The report that job `job` stored for run `run`, when it did (the row has moved
    /// past that run with that job).
    pub fn stored_by(&self, job: i64, run: i64) -> Option<Report> {
        (self.job_id == Some(job) && self.runs > run)
            .then(|| self.report())
            .flatten()
    }

    /// One line of `code-submit status`.
    pub fn line(&self) -> String {
        let mut s = format!("{}  {}  {}", self.id, self.language, self.status);
        if let Some(c) = self.exit_code {
            let _ = write!(s, "  exit {c}");
        }
        if let Some(t) = self.time_ms {
            let _ = write!(s, "  {t} ms");
        }
        if let Some(m) = self.memory_kib {
            let _ = write!(s, "  {m} KiB");
        }
        if self.disabled {
            s.push_str("  (disabled)");
        }
        if let Some(out) = self.stdout.as_deref().filter(|o| !o.trim().is_empty()) {
            let _ = write!(s, "  {:?}", excerpt(out.trim_end(), 60));
        }
        s
    }
}

/// What `add` stores.
#[derive(Debug, Clone)]
pub struct NewSubmission {
    /// Its id.
    pub id: String,
    /// Who gets the result.
    pub email: String,
    /// Language key.
    pub language: String,
    /// Key of the source in the code storage.
    pub source_key: String,
    /// stdin of the run.
    pub stdin: Option<String>,
    /// Expected output.
    pub expected: Option<String>,
    /// Who adds it.
    pub submitter: String,
}

/// A submission id: 1-64 of A-Z a-z 0-9 _ - (it becomes a storage key).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A new random id.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_owned()
}

/// The submissions table.
#[derive(Debug, Clone)]
pub struct Submissions {
    db: Db,
}

/// What `run` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queued {
    /// A job for this run (new, or found again after a crash).
    Job(i64),
    /// No such submission.
    NoSuch,
    /// Disabled after an error.
    Disabled,
}

impl Submissions {
    /// On the state database.
    pub fn new(db: Db) -> Submissions {
        Submissions { db }
    }

    fn p(&self, n: usize) -> String {
        self.db.engine().placeholder(n)
    }

    fn err(&self, e: sqlx::Error) -> anyhow::Error {
        self.db.err(e).into()
    }

    /// Insert; `false` when the id is taken.
    pub async fn insert(&self, s: &NewSubmission) -> anyhow::Result<bool> {
        let sql = format!(
            "INSERT INTO labrelay_code_submissions (id, email, language, source_key, stdin, expected, \
             submitter, status, created_ms) VALUES ({}, {}, {}, {}, {}, {}, {}, {}, {})",
            self.p(1),
            self.p(2),
            self.p(3),
            self.p(4),
            self.p(5),
            self.p(6),
            self.p(7),
            self.p(8),
            self.p(9)
        );
        let r = sqlx::query(&sql)
            .bind(&s.id)
            .bind(&s.email)
            .bind(&s.language)
            .bind(&s.source_key)
            .bind(&s.stdin)
            .bind(&s.expected)
            .bind(&s.submitter)
            .bind(NOT_RUN)
            .bind(crate::store::now_ms())
            .execute(self.db.pool())
            .await;
        match r {
            Ok(_) => Ok(true),
            // The id is taken (the primary key says so on every engine).
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    /// One submission.
    pub async fn get(&self, id: &str) -> anyhow::Result<Option<Submission>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM labrelay_code_submissions WHERE id = {}",
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

    /// Every submission of `email`, oldest first.
    pub async fn by_email(&self, email: &str) -> anyhow::Result<Vec<Submission>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM labrelay_code_submissions WHERE email = {} ORDER BY created_ms, id",
            self.p(1)
        ))
        .bind(email)
        .fetch_all(self.db.pool())
        .await
        .map_err(|e| self.err(e))?;
        rows.iter()
            .map(decode)
            .collect::<Result<_, _>>()
            .map_err(|e| self.err(e))
    }

    /// Clear the disabled flag; `false` when there is no such submission.
    pub async fn enable(&self, id: &str) -> anyhow::Result<bool> {
        let r = sqlx::query(&format!(
            "UPDATE labrelay_code_submissions SET disabled = 0 WHERE id = {}",
            self.p(1)
        ))
        .bind(id)
        .execute(self.db.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(r.rows_affected() > 0 || self.get(id).await?.is_some())
    }

    /// Queue a run: a job of `code` with the arguments `{"submission": ID, "run": RUNS}`
    /// and the unique key `code:ID:RUNS`, submitted by `submit` (which returns the job
    /// id, the first one when the key was used).
    pub async fn queue<F, Fut>(&self, id: &str, submit: F) -> anyhow::Result<Queued>
    where
        F: FnOnce(serde_json::Map<String, serde_json::Value>, String) -> Fut,
        Fut: Future<Output = anyhow::Result<i64>>,
    {
        let Some(s) = self.get(id).await? else {
            return Ok(Queued::NoSuch);
        };
        if s.disabled {
            return Ok(Queued::Disabled);
        }
        let mut args = serde_json::Map::new();
        args.insert("submission".into(), id.into());
        args.insert("run".into(), s.runs.into());
        let job = submit(args, format!("code:{id}:{}", s.runs)).await?;
        // Only the run it belongs to: a result stored meanwhile moved `runs` on.
        sqlx::query(&format!(
            "UPDATE labrelay_code_submissions SET status = {}, job_id = {}, queued_ms = {} \
             WHERE id = {} AND runs = {} AND (job_id IS NULL OR job_id <> {})",
            self.p(1),
            self.p(2),
            self.p(3),
            self.p(4),
            self.p(5),
            self.p(6)
        ))
        .bind(Status::InQueue.as_str())
        .bind(job)
        .bind(crate::store::now_ms())
        .bind(id)
        .bind(s.runs)
        .bind(job)
        .execute(self.db.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(Queued::Job(job))
    }

    /// `sub` as it stands, after closing a run whose job ended without storing a result
    /// (dead after its workers died one after another, or cancelled): an Internal Error
    /// naming the job's end, so the submission does not stay In Queue or Processing and
    /// the next `run` queues a new job.
    pub async fn settle(
        &self,
        store: &crate::Store,
        sub: Submission,
    ) -> anyhow::Result<Submission> {
        if !matches!(
            Status::parse(&sub.status),
            Some(Status::InQueue | Status::Processing)
        ) {
            return Ok(sub);
        }
        let Some(job_id) = sub.job_id else {
            return Ok(sub);
        };
        let Some(job) = store.get(job_id).await? else {
            return Ok(sub);
        };
        if !matches!(
            job.state.as_str(),
            crate::store::DEAD | crate::store::CANCELLED | crate::store::FAILED
        ) {
            return Ok(sub);
        }
        let report = Report::internal(
            format!(
                "job {job_id} ended {}{}",
                job.state,
                job.error.map(|e| format!(": {e}")).unwrap_or_default()
            ),
            "none",
        );
        self.finish(&sub.id, sub.runs, job_id, &report).await?;
        Ok(self.get(&sub.id).await?.unwrap_or(sub))
    }

    /// The worker takes run `run` with job `job`; `false` when that run is over.
    pub async fn processing(&self, id: &str, run: i64, job: i64) -> anyhow::Result<bool> {
        let r = sqlx::query(&format!(
            "UPDATE labrelay_code_submissions SET status = {}, job_id = {} WHERE id = {} AND runs = {}",
            self.p(1),
            self.p(2),
            self.p(3),
            self.p(4)
        ))
        .bind(Status::Processing.as_str())
        .bind(job)
        .bind(id)
        .bind(run)
        .execute(self.db.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(r.rows_affected() > 0)
    }

    /// Store the report of run `run` (job `job`); `false` when that run is over.
    pub async fn finish(&self, id: &str, run: i64, job: i64, r: &Report) -> anyhow::Result<bool> {
        let disable = disables(r.status);
        let cols = [
            "status",
            "exit_code",
            "term_signal",
            "time_ms",
            "wall_ms",
            "memory_kib",
            "stdout",
            "stderr",
            "compile_output",
            "message",
            "limits_by",
            "finished_ms",
        ];
        let set: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c} = {}", self.p(i + 1)))
            .collect();
        let n = cols.len();
        let sql = format!(
            "UPDATE labrelay_code_submissions SET {}, runs = runs + 1, disabled = {} \
             WHERE id = {} AND runs = {} AND job_id = {}",
            set.join(", "),
            if disable { "1" } else { "disabled" },
            self.p(n + 1),
            self.p(n + 2),
            self.p(n + 3)
        );
        let res = sqlx::query(&sql)
            .bind(r.status.as_str())
            .bind(r.exit_code.map(i64::from))
            .bind(r.signal.map(i64::from))
            .bind(r.time_ms as i64)
            .bind(r.wall_ms as i64)
            .bind(r.memory_kib as i64)
            .bind(&r.stdout)
            .bind(&r.stderr)
            .bind(&r.compile_output)
            .bind(&r.message)
            .bind(&r.limits)
            .bind(crate::store::now_ms())
            .bind(id)
            .bind(run)
            .bind(job)
            .execute(self.db.pool())
            .await
            .map_err(|e| self.err(e))?;
        Ok(res.rows_affected() > 0)
    }
}

/// What `add` is given (from the command line or the HTTP API).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddRequest {
    /// The id; default: a new random one.
    #[serde(default)]
    pub id: Option<String>,
    /// Language key.
    pub language: String,
    /// The code.
    pub source: String,
    /// Who gets the result by mail.
    pub email: String,
    /// stdin of the run.
    #[serde(default)]
    pub stdin: Option<String>,
    /// The expected output.
    #[serde(default)]
    pub expected: Option<String>,
}

/// Why `add` refused.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// Bad input (exit 2, HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The id is taken (exit 1, HTTP 409).
    #[error("submission {0} exists already")]
    Exists(String),
    /// The storage or the database failed.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Add a submission: checked, the source into `storage` as `ID.EXT`, then the row.
/// Returns the new submission.
pub async fn add(
    subs: &Submissions,
    storage: &labrelay::storage::AnyStorage,
    settings: &Settings,
    mail_from: Option<&str>,
    req: AddRequest,
    submitter: &str,
) -> Result<Submission, AddError> {
    let lang = settings
        .language(&req.language)
        .map_err(AddError::Invalid)?;
    crate::notify::check_address(mail_from, &req.email)
        .map_err(|e| AddError::Invalid(format!("email: {e:#}")))?;
    let id = match req.id {
        Some(id) if valid_id(&id) => id,
        Some(id) => {
            return Err(AddError::Invalid(format!(
                "id {id:?}: an id is 1-64 of A-Z a-z 0-9 _ -"
            )));
        }
        None => new_id(),
    };
    for (what, len) in [
        ("source", Some(req.source.len())),
        ("stdin", req.stdin.as_ref().map(String::len)),
        ("expected", req.expected.as_ref().map(String::len)),
    ] {
        if len.is_some_and(|n| n > MAX_INPUT_BYTES) {
            return Err(AddError::Invalid(format!(
                "{what}: more than the {MAX_INPUT_BYTES} bytes allowed"
            )));
        }
    }
    if subs.get(&id).await?.is_some() {
        return Err(AddError::Exists(id));
    }
    let key = format!("{id}.{}", lang.extension());
    // The source first: a row never names a source that is not there.
    storage
        .put_bytes(&key, req.source.into_bytes().into())
        .await
        .map_err(anyhow::Error::from)?;
    let created = subs
        .insert(&NewSubmission {
            id: id.clone(),
            email: req.email,
            language: lang.key.clone(),
            source_key: key,
            stdin: req.stdin,
            expected: req.expected,
            submitter: submitter.to_owned(),
        })
        .await?;
    if !created {
        return Err(AddError::Exists(id));
    }
    subs.get(&id)
        .await?
        .ok_or_else(|| AddError::Failed(anyhow::anyhow!("submission {id} vanished")))
}

/// Queue a run of submission `id` as `user`: a job of the task `code` in `store`, mailed
/// to the submission's address.
pub async fn queue_run(
    subs: &Submissions,
    store: &crate::Store,
    registry: &crate::Registry,
    id: &str,
    user: &str,
) -> anyhow::Result<Queued> {
    let Some(sub) = subs.get(id).await? else {
        return Ok(Queued::NoSuch);
    };
    let sub = subs.settle(store, sub).await?;
    subs.queue(id, |args, key| {
        let req = crate::api::SubmitRequest {
            task: CODE.into(),
            args,
            unique_key: Some(key),
            run_at: None,
            priority: 0,
            email: Some(sub.email.clone()),
            webhook: None,
        };
        let job = registry.new_job(&req, user);
        async move {
            let job = job.map_err(|e| anyhow::anyhow!(e))?;
            Ok(store.submit(&job).await?.0)
        }
    })
    .await
}

/// The link of a source in the code storage.
pub fn link(storage: &labrelay::storage::AnyStorage, key: &str) -> String {
    format!("{}/{key}", storage.url().trim_end_matches('/'))
}

/// Whether a run that ended so disables its submission: an error of the code (the seed
/// disabled on any error), not a wrong answer and not our own failure.
pub fn disables(s: Status) -> bool {
    matches!(
        s,
        Status::CompilationError
            | Status::RuntimeError
            | Status::TimeLimitExceeded
            | Status::MemoryLimitExceeded
            | Status::OutputLimitExceeded
    )
}

/// Where sources live and what runs them: the worker's side of code jobs.
#[derive(Debug)]
pub struct CodeRunner {
    /// The sandbox, or why there is none here (code jobs then end in Internal Error).
    pub sandbox: Result<Arc<Sandbox>, String>,
    /// Languages and limits.
    pub settings: Settings,
    /// `[jobs] code_storage`.
    pub storage: labrelay::storage::AnyStorage,
    /// The submissions table.
    pub submissions: Submissions,
}

/// The storage that holds submitted sources: `[jobs] code_storage`, or the folder
/// `code` in the data directory.
pub async fn code_storage(
    config: &labrelay::config::Config,
    name: Option<&str>,
) -> anyhow::Result<labrelay::storage::AnyStorage> {
    let cfg = if let Some(name) = name {
        config.storage(name)?.clone()
    } else {
        let dir = config.data_dir().join("code");
        let text = format!(
            "url = {}\ncreate_root = true\n",
            toml_string(&dir.to_string_lossy())
        );
        toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("the code folder {}: {e}", dir.display()))?
    };
    Ok(labrelay::storage::AnyStorage::open_checked(&cfg).await?)
}

fn toml_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

impl CodeRunner {
    /// Run the submission of `job` (argument `submission`) and store its report.
    pub async fn run(&self, job: &Job, mut stop: watch::Receiver<Stop>) -> Ran {
        let started = std::time::Instant::now();
        let elapsed = || i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let fail = |error: String, permanent: bool| failed(error, permanent, elapsed());
        let (Some(id), Some(run)) = (
            job.args.get("submission").and_then(|v| v.as_str()),
            job.args.get("run").and_then(serde_json::Value::as_i64),
        ) else {
            return fail(
                "a code job needs the arguments `submission` and `run` (`code-submit run ID` queues one)".into(),
                true,
            );
        };
        let sub = match self.submissions.get(id).await {
            Ok(Some(s)) => s,
            Ok(None) => return fail(format!("no such submission: {id}"), true),
            Err(e) => return fail(format!("reading submission {id}: {e:#}"), false),
        };
        let lang = match self.settings.language(&sub.language) {
            Ok(l) => l.clone(),
            Err(e) => return fail(e, true),
        };
        let source = match self.storage.get_bytes(&sub.source_key).await {
            Ok(b) => b.to_vec(),
            Err(e) => return fail(format!("reading {}: {e}", sub.source_key), false),
        };
        match self.submissions.processing(id, run, job.id).await {
            Ok(true) => {}
            Ok(false) => return self.already_done(id, run, job, elapsed()).await,
            Err(e) => return fail(format!("{e:#}"), false),
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let remote = lang.remote.is_some();
        let limits = lang.limits;
        let running = crate::engine::execute(
            self.sandbox.clone(),
            lang,
            crate::engine::Input {
                source,
                stdin: sub.stdin.clone().map(String::into_bytes),
                expected: sub.expected.clone().map(String::into_bytes),
                limits,
            },
            cancel.clone(),
        );
        tokio::pin!(running);
        let mut stopped = Stop::No;
        let report = loop {
            tokio::select! {
                r = &mut running => break r,
                c = stop.changed(), if stopped == Stop::No => {
                    let v = if c.is_err() { Stop::Lost } else { *stop.borrow() };
                    if v != Stop::No {
                        stopped = v;
                        // A local box is killed and ends soon; a remote request is
                        // dropped.
                        cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                        if remote {
                            return Ran::Stopped(v);
                        }
                    }
                }
            }
        };
        if stopped != Stop::No {
            return Ran::Stopped(stopped);
        }
        if report.status == Status::InternalError && report.message.as_deref() == Some("stopped") {
            return Ran::Stopped(Stop::Shutdown);
        }
        // An Internal Error is ours: retried (another worker may have a sandbox) until the
        // job's attempts run out; only then is it the submission's result.
        let last_attempt = job.attempt >= job.max_attempts;
        if report.status != Status::InternalError || last_attempt {
            match self.submissions.finish(id, run, job.id, &report).await {
                Ok(true) => {}
                Ok(false) => return self.already_done(id, run, job, elapsed()).await,
                Err(e) => return fail(format!("storing the result: {e:#}"), false),
            }
        }
        done(&report, elapsed())
    }

    /// Run `run` of submission `id` cannot start: if this very job already stored its
    /// result (its worker died between that and the job's own completion), the job ends
    /// with that result again, so the submitter gets one mail with the real outcome;
    /// otherwise a newer run owns the submission and this job is void.
    async fn already_done(&self, id: &str, run: i64, job: &Job, elapsed: i64) -> Ran {
        match self.submissions.get(id).await {
            Ok(Some(sub)) if let Some(report) = sub.stored_by(job.id, run) => {
                tracing::info!(
                    job = job.id,
                    submission = id,
                    "the result was stored before a crash: the job ends with it"
                );
                done(&report, elapsed)
            }
            Ok(_) => failed(
                format!("run {run} of submission {id} is over"),
                true,
                elapsed,
            ),
            Err(e) => failed(format!("{e:#}"), false, elapsed),
        }
    }
}

/// A code job that failed before or beside its run: `permanent` failures are not retried.
fn failed(error: String, permanent: bool, elapsed: i64) -> Ran {
    Ran::Done(Outcome {
        error: Some(error),
        permanent,
        duration_ms: elapsed,
        ..Outcome::default()
    })
}

/// A code job's outcome from its report: succeeded when Accepted, else failed for good
/// (the code's own failure is not retried) except an Internal Error (ours: retried).
fn done(report: &Report, elapsed: i64) -> Ran {
    let accepted = report.status == Status::Accepted;
    let error = (!accepted).then(|| {
        report.message.as_ref().map_or_else(
            || report.status.to_string(),
            |m| format!("{}: {m}", report.status),
        )
    });
    Ran::Done(Outcome {
        exit_code: Some(i32::from(!accepted)),
        signal: None,
        stdout: report.stdout.clone(),
        stderr: report.stderr.clone(),
        result: serde_json::to_value(report).ok(),
        permanent: report.status != Status::InternalError,
        error,
        duration_ms: elapsed,
        ..Outcome::default()
    })
}

/// `job` with the result its submission stored, when the job row has none: a worker
/// killed between storing the result and completing the job leaves a job that ends
/// dead without one, and its mail must still tell the outcome `code-submit status`
/// shows.
pub async fn with_stored_result(store: &crate::Store, mut job: Job) -> Job {
    if job.task != CODE || job.result.is_some() {
        return job;
    }
    let (Some(id), Some(run)) = (
        job.args.get("submission").and_then(|v| v.as_str()),
        job.args.get("run").and_then(serde_json::Value::as_i64),
    ) else {
        return job;
    };
    let subs = Submissions::new(store.db().clone());
    match subs.get(id).await {
        Ok(Some(sub)) => {
            if let Some(r) = sub.stored_by(job.id, run) {
                job.result = serde_json::to_value(r).ok();
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(job = job.id, "reading submission {id} for its mail: {e:#}"),
    }
    job
}

/// The outcome mail of a code job: subject, text and HTML (the result as a table).
pub fn mail(job: &Job) -> Option<(String, String, String)> {
    // A job that ended without a report (dead after its workers died, cancelled) is the
    // submission's Internal Error, as `status` shows it.
    let r: Report = job
        .result
        .clone()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_else(|| {
            Report::internal(
                format!(
                    "job {} ended {}{}",
                    job.id,
                    job.state,
                    job.error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
                "none",
            )
        });
    let id = job
        .args
        .get("submission")
        .and_then(|v| v.as_str())
        .unwrap_or("?");
    let mut rows: Vec<(&str, String)> = vec![
        ("Submission", id.to_owned()),
        ("Status", r.status.to_string()),
    ];
    if let Some(c) = r.exit_code {
        rows.push(("Exit code", c.to_string()));
    }
    if let Some(s) = r.signal {
        rows.push(("Signal", s.to_string()));
    }
    rows.push(("CPU time", format!("{} ms", r.time_ms)));
    rows.push(("Wall time", format!("{} ms", r.wall_ms)));
    rows.push(("Memory", format!("{} KiB", r.memory_kib)));
    if let Some(m) = &r.message {
        rows.push(("Note", m.clone()));
    }
    if disables(r.status) {
        rows.push((
            "Disabled",
            format!("yes: `code-submit enable {id}` allows another run"),
        ));
    }
    let mut text = String::new();
    for (k, v) in &rows {
        let _ = writeln!(text, "{k:<12} {v}");
    }
    let mut html = String::from(
        "<html><body><table border=\"1\" cellpadding=\"4\" style=\"border-collapse:collapse\">\n",
    );
    for (k, v) in &rows {
        let _ = writeln!(
            html,
            "<tr><th align=\"left\">{}</th><td>{}</td></tr>",
            esc(k),
            esc(v)
        );
    }
    html.push_str("</table>\n");
    for (name, body) in [
        ("Compiler output", &r.compile_output),
        ("Output", &r.stdout),
        ("Errors", &r.stderr),
    ] {
        if !body.trim().is_empty() {
            let cut = excerpt(body, 20_000);
            let _ = write!(text, "\n{name}:\n{cut}\n");
            let _ = writeln!(html, "<h4>{name}</h4><pre>{}</pre>", esc(&cut));
        }
    }
    html.push_str("</body></html>\n");
    Some((
        format!("[labrelay] submission {id}: {}", r.status),
        text,
        html,
    ))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
