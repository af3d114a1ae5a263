//! The labrelay job platform, shared by `job-worker` (runs and administers jobs) and
//! `code-submit` (submits them).
//!
//! - [`config`]: `[jobs]` and the task registry `[tasks.NAME]`, checked at start.
//! - [`store`]: the job table in the state database (SQLite, PostgreSQL or MariaDB):
//!   submit (unique keys), claim (leases; `FOR UPDATE SKIP LOCKED` on the servers),
//!   heartbeat, finish fenced by attempt, cancel, retry, purge, list, stats.
//! - [`runner`]: one attempt of a task: argv without a shell, a clean environment, its
//!   own process group, captured output.
//! - [`worker`]: the loop that claims, runs with heartbeats, records and shuts down
//!   gracefully.
//! - [`notify`]: the outcome mail to the address given at submission.
//! - [`api`]: the signed requests of `job-worker serve` (the server lives in
//!   `job-worker`); [`client`]: `code-submit`'s side of them.

pub mod api;
pub mod client;
pub mod code;
pub mod config;
pub mod engine;
pub mod notify;
pub mod rabbit;
pub mod runner;
pub mod store;
pub mod webhook;
pub mod worker;

pub use config::{Registry, Task};
pub use store::{Job, NewJob, Store};

/// The PostgreSQL channel a submit notifies, so idle workers start at once.
pub const NOTIFY_CHANNEL: &str = "labrelay_jobs";

/// Errors about a job the user named.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// No job has this id.
    #[error("no such job: {0}")]
    NoSuchJob(i64),
    /// The job has not finished: ask again later (exit 75).
    #[error("job {id} is {state}: no result yet")]
    NotFinished {
        /// Job id.
        id: i64,
        /// Its state.
        state: String,
    },
}

impl labrelay::exit::ExitClass for JobError {
    fn exit_class(&self) -> labrelay::exit::Exit {
        match self {
            JobError::NoSuchJob(_) => labrelay::exit::Exit::Failed,
            JobError::NotFinished { .. } => labrelay::exit::Exit::TempFail,
        }
    }
}
labrelay::exit_class!(JobError);

/// Who is running this command: `$USER`, `$LOGNAME`, or `uid:N`.
pub fn current_user() -> String {
    ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| format!("uid:{}", rustix::process::getuid().as_raw()))
}
