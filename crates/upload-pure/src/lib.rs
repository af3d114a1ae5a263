//! `upload-pure`: the delivery engine with the folder given by hand — look up the
//! project's contacts, upload, mail, record in labrelay's state (not in the LIMS).
//!
//! Only the command line exists so far; the delivery engine lands with its own issue.

use std::path::PathBuf;

use clap::Parser;
use labrelay::cli::{Context, GlobalArgs, ToolArgs};
use labrelay::exit::Exit;

/// Deliver a folder given by path to a project's customer
///
/// Like delivery-upload, but the folder is given on the command line instead of being
/// looked up by analysis id; the project's contacts still come from the LIMS. The
/// delivery is recorded in labrelay's own state, not in the LIMS status table.
#[derive(Debug, Parser)]
#[command(name = "upload-pure", version, after_help = labrelay::after_help!("\
  upload-pure --project-id V3fmjM --analysis-path /nas1/analysis/6cLB4ma/result/upload
  upload-pure -p V3fmjM -a ./upload --target sftp-customer --json"))]
pub struct Args {
    /// Project (sub-project) id whose contacts receive the delivery
    #[arg(long, short = 'p', value_name = "ID")]
    pub project_id: String,
    /// Folder to deliver
    #[arg(long, short = 'a', value_name = "PATH")]
    pub analysis_path: PathBuf,
    /// Storage target: the name of a [storage.NAME] config section
    #[arg(long, value_name = "NAME")]
    pub target: Option<String>,
    /// Show what would be uploaded and mailed; change nothing
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
#[allow(clippy::unused_async, clippy::needless_pass_by_value)] // filled in by the delivery issue
pub async fn run(args: Args, _ctx: Context) -> anyhow::Result<Exit> {
    Err(labrelay::cli::not_implemented(&format!(
        "upload-pure --project-id {}",
        args.project_id
    )))
}
