//! `delivery-upload`: deliver an analysis to its customer — look the analysis up in the
//! LIMS, upload its folder to the configured target, create expiring customer access,
//! mail the customer with staff in copy, and record the delivery.
//!
//! The work is done by the `delivery` crate; this crate is the command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use delivery::events::Events;
use delivery::notify::DeliverySteps;
use delivery::report::Tool;
use delivery::run::{Env, Request};
use labrelay::cli::{Context, GlobalArgs, ToolArgs};
use labrelay::exit::Exit;

/// Deliver an analysis folder to its customer
///
/// Looks the analysis up in the LIMS database, uploads its delivery folder (with an
/// md5sum.txt manifest) to the storage target, creates expiring customer access, mails
/// the customer with staff in Cc, and records the delivery. With --listen, takes
/// delivery requests from the queue instead.
#[derive(Debug, Parser)]
#[command(name = "delivery-upload", version, subcommand_negates_reqs = true, after_help = labrelay::after_help!("\
  delivery-upload --analysis-id 6cLB4ma
  delivery-upload --analysis-id 6cLB4ma --target oss --dry-run
  delivery-upload --listen --json >> /var/log/labrelay/delivery.jsonl
  delivery-upload renew --analysis-id 6cLB4ma
  delivery-upload links --analysis-id 6cLB4ma --json
  delivery-upload request --analysis-id 6cLB4ma"))]
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
    #[command(subcommand)]
    #[allow(missing_docs)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Re-issue the expired presigned links of a delivered analysis and mail them again
    Renew {
        /// Analysis (plan) id whose links to renew
        #[arg(long, short = 's', value_name = "ID")]
        analysis_id: String,
        /// Storage target the analysis was delivered to
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
    },
    /// Print the customer's current links (or account) and their expiry; staff only
    Links {
        /// Analysis (plan) id
        #[arg(long, short = 's', value_name = "ID")]
        analysis_id: String,
        /// Storage target the analysis was delivered to
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
    },
    /// Queue a delivery request for a running `--listen` (RabbitMQ or the embedded queue)
    Request {
        /// Analysis (plan) id to deliver
        #[arg(long, short = 's', value_name = "ID")]
        analysis_id: String,
        /// Storage target, when not the default
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
    },
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
    // Checks [delivery.access], [delivery.mail] and the templates now (exit 78 before
    // any upload).
    let steps = DeliverySteps::new(&ctx.config, &env.delivery)?;
    if let Some(Command::Renew {
        analysis_id,
        target,
    }) = &args.command
    {
        return delivery::run::renew(&env, &steps, analysis_id, target.as_deref()).await;
    }
    if let Some(Command::Links {
        analysis_id,
        target,
    }) = &args.command
    {
        return delivery::run::links(&env, analysis_id, target.as_deref()).await;
    }
    if let Some(Command::Request {
        analysis_id,
        target,
    }) = &args.command
    {
        return delivery::listen::request(&env, analysis_id, target.as_deref()).await;
    }
    // Every configured statement is prepared on its database now: a wrong table or
    // column is exit 78 before any upload.
    env.check_statements().await?;
    if args.listen {
        return delivery::listen::listen(&env, &steps).await;
    }
    let req = Request {
        tool: Tool::DeliveryUpload,
        analysis_id: args.analysis_id.clone(),
        project_id: None,
        path: args.path_override.clone(),
        name: None,
        target: args.target.clone(),
        dry_run: args.dry_run,
        force: args.force,
        request_id: None,
    };
    let r = delivery::run::deliver_until_signalled(&env, &req, &steps).await;
    // A delivery that failed for good (not a temporary failure, a usage or a
    // configuration error) is reported to staff, as the listener does when it gives up.
    if let Err(e) = &r
        && delivery::run::exit_of(e) == Exit::Failed
        && let Some(id) = &args.analysis_id
    {
        delivery::listen::report_failure(&env, &steps, id, args.target.as_deref(), e, 1).await;
    }
    r
}
