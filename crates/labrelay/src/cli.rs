//! Command-line glue shared by every tool: the global flags, and [`run_main`], the one
//! exit path of every binary.
//!
//! A tool's `main.rs` is one line: `fn main() -> ExitCode { labrelay::cli::run_main(tool::run) }`.
//! `run_main` parses the arguments, loads the configuration, sets up logging and a tokio
//! runtime, runs the tool, prints an error with its whole chain, and maps it to the exit
//! codes of [`crate::exit`]. A closed stdout (`tool | head`) is not an error.

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{Config, LoadOptions};
use crate::exit::{self, Exit};
use crate::logging::{self, ColorChoice};
use crate::output::Printer;

/// Flags every tool accepts.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GlobalArgs {
    /// More detail on stderr: -v info, -vv debug, -vvv trace
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors on stderr; no progress bars
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Write JSON Lines records to stdout instead of text
    #[arg(long, global = true)]
    pub json: bool,
    /// Config file to load on top of /etc/labrelay/config.toml and ~/.config/labrelay/config.toml
    #[arg(long, value_name = "FILE", global = true, env = "LABRELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Load no config file at all (defaults and environment only)
    #[arg(long, global = true)]
    pub no_config: bool,
    /// When to colour diagnostics on stderr
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = ColorChoice::Auto, global = true)]
    pub color: ColorChoice,
}

impl GlobalArgs {
    /// -1 for `-q`, else the number of `-v`.
    pub fn verbosity(&self) -> i8 {
        if self.quiet {
            -1
        } else {
            i8::try_from(self.verbose).unwrap_or(i8::MAX)
        }
    }
}

/// A tool's parsed arguments expose the global flags.
pub trait ToolArgs: clap::Parser {
    /// The flattened [`GlobalArgs`].
    fn global(&self) -> &GlobalArgs;
}

/// What a tool's `run` gets besides its arguments.
#[derive(Debug)]
pub struct Context {
    /// The loaded configuration (flags not yet applied; the tool applies its own).
    pub config: Config,
    /// The config files that were read, lowest precedence first.
    pub config_files: Vec<PathBuf>,
    /// Standard output.
    pub out: Printer,
}

impl Context {
    /// A context for tests: the given config and a capturing printer.
    pub fn for_test(config: Config, json: bool) -> (Context, crate::output::Captured) {
        let (out, cap) = Printer::capture(json);
        (
            Context {
                config,
                config_files: Vec::new(),
                out,
            },
            cap,
        )
    }
}

/// Parse, configure, run, and turn the outcome into the process exit code.
pub fn run_main<A, F, Fut>(run: F) -> ExitCode
where
    A: ToolArgs,
    F: FnOnce(A, Context) -> Fut,
    Fut: Future<Output = anyhow::Result<Exit>>,
{
    let args = match A::try_parse() {
        Ok(a) => a,
        Err(e) => {
            // --help and --version go to stdout and exit 0; real errors to stderr, exit 2.
            let _ = e.print();
            return if e.use_stderr() {
                Exit::Usage.into()
            } else {
                Exit::Ok.into()
            };
        }
    };
    let global = args.global().clone();
    logging::init(global.verbosity(), global.color);
    let status = match execute(args, &global, run) {
        Ok(status) => status,
        Err(err) if exit::is_broken_pipe(&err) => Exit::Ok,
        Err(err) => {
            let status = exit::classify(&err);
            let msg = format!("error: {err:#}");
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "{}", crate::secret::scrub(&msg));
            tracing::debug!(exit = status.code(), "exiting after error");
            status
        }
    };
    status.into()
}

fn execute<A, F, Fut>(args: A, global: &GlobalArgs, run: F) -> anyhow::Result<Exit>
where
    F: FnOnce(A, Context) -> Fut,
    Fut: Future<Output = anyhow::Result<Exit>>,
{
    let loaded = Config::load(&LoadOptions {
        explicit: global.config.clone(),
        no_config: global.no_config,
    })?;
    crate::retry::set_policy(loaded.config.retry.clone());
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    for f in &loaded.files {
        tracing::debug!(file = %f.display(), "loaded config file");
    }
    let ctx = Context {
        config: loaded.config,
        config_files: loaded.files,
        out: Printer::stdout(global.json, global.quiet),
    };
    // File I/O runs on blocking threads; tokio's default of 512 lets a delivery of
    // 10^5 small files grow hundreds of threads that only contend for the same
    // directories (and each keeps its stack and malloc arena). Every tool bounds its
    // parallel work far below this.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .map_err(|e| anyhow::Error::new(e).context("starting the async runtime"))?;
    runtime.block_on(run(args, ctx))
}

/// Blocking threads of a tool's runtime (file and SSH I/O).
pub const MAX_BLOCKING_THREADS: usize = 64;

/// Resolves when the process receives SIGTERM or SIGINT, for tools that run until told
/// to stop (queue listeners). They finish or journal the item in flight, then return.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The standard `after_help` block: the tool's examples followed by EXIT STATUS.
/// Write the examples one per line after a `"\` continuation, which strips the first
/// line's indent; the macro puts it back.
#[macro_export]
macro_rules! after_help {
    ($examples:expr) => {
        concat!(
            "EXAMPLES:\n  ",
            $examples,
            "\n\n",
            "EXIT STATUS:
  0   success
  1   finished, but some items failed (each is reported)
  2   usage error: bad arguments or input
  75  temporary failure: a server was unreachable or busy; retry later
  78  configuration error"
        )
    };
}

/// The error every tool returns for a command that a later release fills in.
pub fn not_implemented(what: &str) -> anyhow::Error {
    exit::usage(format!("{what} is not implemented yet"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn after_help_block_matches_the_exit_table() {
        let s = after_help!("tool --x");
        assert!(s.ends_with(crate::exit::EXIT_STATUS_HELP), "{s}");
        assert!(s.starts_with("EXAMPLES:\n  tool --x"));
    }
}
