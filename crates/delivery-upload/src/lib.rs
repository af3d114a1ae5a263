//! `delivery-upload`: deliver an analysis to its customer — look the analysis up in the
//! LIMS, upload its folder to the configured target, create expiring customer access,
//! mail the customer with staff in copy, and record the delivery.
//!
//! Only the command line exists so far; the delivery engine lands with its own issue.

use std::path::PathBuf;

use clap::Parser;
use labrelay::cli::{Context, GlobalArgs, ToolArgs};
use labrelay::exit::Exit;

/// Deliver an analysis folder to its customer
///
/// Looks the analysis up in the LIMS database, uploads its delivery folder (with an
/// md5sum.txt manifest) to the storage target, creates expiring customer access, mails
/// the customer with staff in Cc, and records the delivery. With --listen, takes
/// delivery requests from the queue instead.
#[derive(Debug, Parser)]
#[command(name = "delivery-upload", version, after_help = labrelay::after_help!("\
  delivery-upload --analysis-id 6cLB4ma
  delivery-upload --analysis-id 6cLB4ma --target oss --dry-run
  delivery-upload --listen --json >> /var/log/labrelay/delivery.jsonl"))]
pub struct Args {
    /// Analysis (plan) id to deliver
    #[arg(
        long,
        short = 's',
        value_name = "ID",
        required_unless_present = "listen"
    )]
    pub analysis_id: Option<String>,
    /// Storage target: the name of a [storage.NAME] config section
    #[arg(long, value_name = "NAME")]
    pub target: Option<String>,
    /// Show what would be uploaded and mailed; change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Deliver again even if the analysis was already delivered
    #[arg(long)]
    pub force: bool,
    /// Consume delivery requests from the queue until stopped
    #[arg(long, conflicts_with = "analysis_id")]
    pub listen: bool,
    /// Local copy of the delivery folder, when it differs from the LIMS path
    #[arg(long, value_name = "PATH", hide = true)]
    pub path_override: Option<PathBuf>,
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
#[allow(clippy::unused_async, clippy::needless_pass_by_value)] // filled in by the delivery issue
pub async fn run(args: Args, _ctx: Context) -> anyhow::Result<Exit> {
    let what = if args.listen {
        "delivery-upload --listen".to_owned()
    } else {
        format!(
            "delivery-upload --analysis-id {}",
            args.analysis_id.as_deref().unwrap_or_default()
        )
    };
    Err(labrelay::cli::not_implemented(&what))
}
