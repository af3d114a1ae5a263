//! `upload-pure`: the delivery engine with the folder given by hand — look up the
//! project's contacts, upload, mail, record in labrelay's state (not in the LIMS).
//!
//! The work is done by the `delivery` crate; this crate is the command line.

use std::path::PathBuf;

use clap::Parser;
use delivery::events::Events;
use delivery::notify::DeliverySteps;
use delivery::report::Tool;
use delivery::run::{Env, Request};
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
    /// Name of the delivery folder on the target [default: the folder's own name]
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Storage target: the name of a [storage.NAME] config section
    #[arg(long, value_name = "NAME")]
    pub target: Option<String>,
    /// Show what would be uploaded and mailed; change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Deliver again even if this folder was already delivered under this name
    #[arg(long)]
    pub force: bool,
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
pub async fn run(args: Args, ctx: Context) -> anyhow::Result<Exit> {
    let events = Events::new(ctx.out.clone());
    let env = Env::open(&ctx.config, events).await?;
    let steps = DeliverySteps::new(&ctx.config, &env.delivery)?;
    env.check_statements().await?;
    let req = Request {
        tool: Tool::UploadPure,
        analysis_id: None,
        project_id: Some(args.project_id.clone()),
        path: Some(args.analysis_path.clone()),
        name: args.name.clone(),
        target: args.target.clone(),
        dry_run: args.dry_run,
        force: args.force,
        request_id: None,
    };
    delivery::run::deliver_until_signalled(&env, &req, &steps).await
}
