//! `job-worker`: run submitted jobs from the queue (code in a sandbox, registered
//! tasks), store results and mail the submitter.
//!
//! Only the command line exists so far; the behaviour lands with its own issue.

use clap::Parser;
use labrelay::cli::{Context, GlobalArgs, ToolArgs};
use labrelay::exit::Exit;

/// Run submitted jobs from the queue
///
/// Takes jobs from the queue, runs code in a sandbox or a registered task, stores the
/// result and mails the submitter. A job is acknowledged only after its result is
/// stored. Starts no new job during the configured rest hours.
#[derive(Debug, Parser)]
#[command(name = "job-worker", version, after_help = labrelay::after_help!("\
  job-worker                      # run until SIGTERM
  job-worker --once               # cron: run what is queued, then exit
  job-worker --concurrency 2 --json"))]
pub struct Args {
    /// Run the jobs queued now, then exit
    #[arg(long)]
    pub once: bool,
    /// Jobs run at the same time
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub concurrency: u16,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub global: GlobalArgs,
}

impl ToolArgs for Args {
    fn global(&self) -> &GlobalArgs {
        &self.global
    }
}

/// Run the tool.
#[allow(clippy::unused_async, clippy::needless_pass_by_value)] // filled in by the jobs issue
pub async fn run(_args: Args, _ctx: Context) -> anyhow::Result<Exit> {
    Err(labrelay::cli::not_implemented("job-worker"))
}
