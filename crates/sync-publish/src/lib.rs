//! `sync-publish`: keep people, research groups, org units and equipment in sync
//! between LIMS sites over a message queue.
//!
//! Only the command line exists so far; the behaviour lands with its own issue.

use clap::Parser;
use labrelay::cli::{Context, GlobalArgs, ToolArgs};
use labrelay::exit::Exit;

/// The kinds of records kept in sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Entity {
    /// People (users).
    People,
    /// Research groups.
    Groups,
    /// Organisation units.
    Orgs,
    /// Equipment.
    Equipment,
}

/// Keep LIMS sites in sync over a message queue
///
/// Publishes changes of people, research groups, org units and equipment from this
/// site's database, and applies changes published by the other sites.
#[derive(Debug, Parser)]
#[command(name = "sync-publish", version, after_help = labrelay::after_help!("\
  sync-publish --site shenzhen --entity people --entity groups
  sync-publish --site wuhan --listen"))]
pub struct Args {
    /// This site's name, as the other sites know it
    #[arg(long, value_name = "NAME")]
    pub site: String,
    /// Record kinds to publish (default: all)
    #[arg(long, value_enum, value_name = "KIND")]
    pub entity: Vec<Entity>,
    /// Apply changes from the other sites until stopped
    #[arg(long)]
    pub listen: bool,
    /// Show what would be published or applied; change nothing
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
#[allow(clippy::unused_async, clippy::needless_pass_by_value)] // filled in by the sync issue
pub async fn run(args: Args, _ctx: Context) -> anyhow::Result<Exit> {
    Err(labrelay::cli::not_implemented(&format!(
        "sync-publish --site {}",
        args.site
    )))
}
