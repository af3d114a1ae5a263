//! `code-submit`: submit a code file (with its language, stdin and the submitter's
//! e-mail) or a registered task to the job queue.
//!
//! Only the command line exists so far; the behaviour lands with its own issue.

use std::path::PathBuf;

use clap::Parser;
use labrelay::cli::{Context, GlobalArgs, ToolArgs};
use labrelay::exit::Exit;

/// Submit code or a registered task to the job queue
///
/// Records the job in the state database, queues it for a job-worker, and prints the
/// job id. The submitter is mailed the result when the job finishes.
#[derive(Debug, Parser)]
#[command(name = "code-submit", version, after_help = labrelay::after_help!("\
  code-submit analyse.py --language python --email alice@example.org
  code-submit count.R --language r --stdin samples.tsv
  code-submit --task rebuild-index --json"))]
pub struct Args {
    /// Code file to run
    #[arg(value_name = "FILE", required_unless_present = "task")]
    pub file: Option<PathBuf>,
    /// Language of the code file (python, r, bash, ...)
    #[arg(long, short = 'l', value_name = "LANG", requires = "file")]
    pub language: Option<String>,
    /// File given to the program on standard input
    #[arg(long, value_name = "FILE")]
    pub stdin: Option<PathBuf>,
    /// Where to mail the result
    #[arg(long, value_name = "ADDRESS")]
    pub email: Option<String>,
    /// Run a registered task instead of a code file
    #[arg(long, value_name = "NAME", conflicts_with = "file")]
    pub task: Option<String>,
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
    Err(labrelay::cli::not_implemented("code-submit"))
}
