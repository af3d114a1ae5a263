//! `mail-query`: answer SQL queries sent by e-mail. Reads new mail over IMAP, checks
//! the sender and the SQL, runs the query read-only on the named database and mails
//! the result back as files.
//!
//! Only the command line exists so far; the behaviour lands with its own issue.

use clap::Parser;
use labrelay::cli::{Context, GlobalArgs, ToolArgs};
use labrelay::exit::Exit;

/// Answer SQL queries sent by e-mail
///
/// Reads new messages from the configured IMAP folder, checks that the sender is
/// allowed and that the attached SQL only reads, runs it on the named database with a
/// read-only session, and replies with the result files. Processed messages are moved
/// to another folder, so each is answered once.
#[derive(Debug, Parser)]
#[command(name = "mail-query", version, after_help = labrelay::after_help!("\
  mail-query --once                 # cron: answer what is new, then exit
  mail-query --watch                # stay connected (IMAP IDLE)
  mail-query --once --dry-run --json"))]
pub struct Args {
    /// Process new mail once and exit (for cron)
    #[arg(long, conflicts_with = "watch")]
    pub once: bool,
    /// Stay connected and answer mail as it arrives (IMAP IDLE)
    #[arg(long)]
    pub watch: bool,
    /// IMAP folder to read (default: [imap] folder)
    #[arg(long, value_name = "FOLDER")]
    pub folder: Option<String>,
    /// Check and report, but run no query and send no mail
    #[arg(long)]
    pub dry_run: bool,
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
#[allow(clippy::unused_async, clippy::needless_pass_by_value)] // filled in by the mail-query issue
pub async fn run(_args: Args, _ctx: Context) -> anyhow::Result<Exit> {
    Err(labrelay::cli::not_implemented("mail-query"))
}
