//! Command-line glue shared by every tool: the global flags, and [`run_main`], the one
//! exit path of every binary.
//!
//! A tool's `main.rs` is one line: `fn main() -> ExitCode { labrelay::cli::run_main(tool::run) }`.
//! `run_main` parses the arguments, loads the configuration, sets up logging and a tokio
//! runtime, runs the tool, prints an error with its whole chain, and maps it to the exit
//! codes of [`crate::exit`]. A closed stdout (`tool | head`) is not an error.
//!
//! It also gives every tool two commands of its own: `TOOL completions SHELL` prints a
//! shell completion script (clap_complete) and `TOOL man` the man page as roff
//! (clap_mangen), both to stdout (`TOOL man --dir DIR` writes the pages of the tool and
//! of each subcommand into DIR instead). They are added to the tool's clap command (so its
//! `--help` lists them) and answered before any configuration is read, so they work
//! with no config file and no server; `scripts/install` uses them. A tool keeps its own
//! arguments and subcommands unchanged, except that a positional argument given first
//! can no longer be the bare word `completions` or `man` (write `./man`). In a tool
//! without subcommands of its own, the command comes first (`code-submit man -q`).

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
    let args = match parse::<A, _, _>(std::env::args_os()) {
        Ok(Parsed::Tool(a)) => a,
        Ok(Parsed::Builtin(builtin)) => {
            let mut stdout = std::io::stdout().lock();
            return finish(builtin.write::<A>(&mut stdout)).into();
        }
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
    finish(execute(args, &global, run)).into()
}

/// The one place an outcome becomes an exit status: the error chain goes to stderr
/// (secrets scrubbed), a closed stdout is success.
fn finish(outcome: anyhow::Result<Exit>) -> Exit {
    match outcome {
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
    }
}

const COMPLETIONS: &str = "completions";
const MAN: &str = "man";

/// A tool's full clap command: its own arguments plus the `completions` and `man`
/// commands every tool has. This is what `run_main` parses and what the man page and
/// the completion scripts describe.
pub fn command<A: ToolArgs>() -> clap::Command {
    let cmd = A::command();
    let name = cmd.get_name().to_owned();
    let own_subcommands = cmd.has_subcommands();
    let cmd = cmd
        // `sync-publish man` must not ask for `--site`.
        .subcommand_negates_reqs(true)
        .subcommand(
            clap::Command::new(COMPLETIONS)
                .about("Print the completion script for a shell")
                .long_about(format!(
                    "Print the completion script for a shell to stdout. scripts/install puts \
                     them where bash, zsh and fish look for them; by hand: \
                     `source <({name} completions bash)`."
                ))
                .arg(
                    clap::Arg::new("shell")
                        .value_name("SHELL")
                        .required(true)
                        .value_parser(clap::value_parser!(clap_complete::Shell)),
                ),
        )
        .subcommand(
            clap::Command::new(MAN)
                .about("Print the man page (roff) to stdout")
                .long_about(format!(
                    "Print the man page (roff) to stdout; to read it without installing: \
                     `{name} man | man -l -`. With --dir, write this page and one per \
                     subcommand ({name}-SUBCOMMAND.1) into DIR instead and print their \
                     paths, as scripts/install does."
                ))
                .arg(
                    clap::Arg::new("dir")
                        .long("dir")
                        .value_name("DIR")
                        .help("Write every page of the tool into DIR")
                        .value_parser(clap::value_parser!(PathBuf)),
                ),
        );
    if own_subcommands {
        cmd
    } else {
        // A tool that had no subcommands keeps its usage line (`code-submit [FILE]` is
        // not followed by a command) and gets no `help` command (`code-submit help`
        // still names a file).
        cmd.args_conflicts_with_subcommands(true)
            .disable_help_subcommand(true)
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Parsed<A> {
    /// The tool's own work.
    Tool(A),
    /// A command [`run_main`] answers itself.
    Builtin(Builtin),
}

/// The commands every tool has, answered without configuration or servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Builtin {
    /// `TOOL completions SHELL`.
    Completions(clap_complete::Shell),
    /// `TOOL man`, or `TOOL man --dir DIR`.
    Man(Option<PathBuf>),
}

impl Builtin {
    /// Write the completion script or the man page of tool `A` to `out`.
    pub fn write<A: ToolArgs>(self, out: &mut dyn Write) -> anyhow::Result<Exit> {
        let mut cmd = command::<A>();
        // Rendered into memory first: clap_complete panics on a write error, and a
        // closed stdout must stay a quiet success.
        let mut buf = Vec::new();
        match self {
            Builtin::Completions(shell) => {
                let name = cmd.get_name().to_owned();
                clap_complete::generate(shell, &mut cmd, name, &mut buf);
            }
            Builtin::Man(None) => {
                // The tool's own page comes first.
                if let Some((_, page)) = man_pages(cmd)?.into_iter().next() {
                    buf = page;
                }
            }
            Builtin::Man(Some(dir)) => {
                for (file, page) in man_pages(cmd)? {
                    let path = dir.join(file);
                    fs_err::write(&path, page)?;
                    writeln!(buf, "{}", path.display())?;
                }
            }
        }
        out.write_all(&buf)?;
        out.flush()?;
        Ok(Exit::Ok)
    }
}

/// The man pages of a command: its own (`TOOL.1`) and one per visible subcommand, all
/// levels (`TOOL-SUB.1`), which the SUBCOMMANDS section of the parent page refers to.
fn man_pages(cmd: clap::Command) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    fn collect(cmd: clap::Command, pages: &mut Vec<(String, Vec<u8>)>) -> anyhow::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            collect(sub.clone(), pages)?;
        }
        let man = clap_mangen::Man::new(cmd);
        let mut page = Vec::new();
        man.render(&mut page)
            .map_err(|e| anyhow::Error::new(e).context("rendering the man page"))?;
        pages.push((man.get_filename(), page));
        Ok(())
    }
    // Built first so that subcommands know their full names (`delivery-upload-renew`);
    // `help` has no page of its own.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    collect(cmd, &mut pages)?;
    pages.reverse();
    Ok(pages)
}

/// Parse a command line (program name first) for tool `A`.
pub fn parse<A, I, T>(argv: I) -> Result<Parsed<A>, clap::Error>
where
    A: ToolArgs,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut cmd = command::<A>();
    let mut matches = cmd.try_get_matches_from_mut(argv)?;
    match matches.subcommand() {
        Some((COMPLETIONS, sub)) => {
            let shell = sub
                .get_one::<clap_complete::Shell>("shell")
                .copied()
                .ok_or_else(|| {
                    cmd.error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "a shell is required",
                    )
                })?;
            Ok(Parsed::Builtin(Builtin::Completions(shell)))
        }
        Some((MAN, sub)) => Ok(Parsed::Builtin(Builtin::Man(
            sub.get_one::<PathBuf>("dir").cloned(),
        ))),
        _ => A::from_arg_matches_mut(&mut matches)
            .map(Parsed::Tool)
            .map_err(|e| e.format(&mut cmd)),
    }
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
    let result = runtime.block_on(run(args, ctx));
    // A blocking call the tool stopped waiting for (an IMAP IDLE when a stop signal
    // came) must not hold the exit: give such threads a moment, then leave them.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    result
}

/// How long the exit waits for blocking threads still running after the tool returned.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

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
    use super::*;

    /// A tool with a required flag, a positional argument and its own subcommand: the
    /// shapes the six tools have between them.
    #[derive(Debug, clap::Parser)]
    #[command(name = "demo-tool", version, after_help = after_help!("demo-tool --site x"))]
    struct DemoArgs {
        /// A file
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
        /// Required unless a subcommand is given
        #[arg(long)]
        site: String,
        #[command(flatten)]
        global: GlobalArgs,
        #[command(subcommand)]
        command: Option<DemoCommand>,
    }

    #[derive(Debug, clap::Subcommand, PartialEq, Eq)]
    enum DemoCommand {
        /// The tool's own subcommand
        Renew {
            /// Id
            #[arg(long)]
            id: String,
        },
    }

    impl ToolArgs for DemoArgs {
        fn global(&self) -> &GlobalArgs {
            &self.global
        }
    }

    fn parse_demo(argv: &[&str]) -> Result<Parsed<DemoArgs>, clap::Error> {
        parse::<DemoArgs, _, _>(std::iter::once("demo-tool").chain(argv.iter().copied()))
    }

    fn builtin(argv: &[&str]) -> Builtin {
        match parse_demo(argv).unwrap() {
            Parsed::Builtin(b) => b,
            Parsed::Tool(a) => panic!("parsed as the tool's own command: {a:?}"),
        }
    }

    fn tool(argv: &[&str]) -> DemoArgs {
        match parse_demo(argv).unwrap() {
            Parsed::Tool(a) => a,
            Parsed::Builtin(b) => panic!("parsed as {b:?}"),
        }
    }

    fn written(b: Builtin) -> String {
        let mut out = Vec::new();
        assert_eq!(b.write::<DemoArgs>(&mut out).unwrap(), Exit::Ok);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn completions_and_man_need_none_of_the_tools_required_arguments() {
        assert_eq!(builtin(&["man"]), Builtin::Man(None));
        assert_eq!(
            builtin(&["man", "--dir", "/x"]),
            Builtin::Man(Some(PathBuf::from("/x")))
        );
        for (name, shell) in [
            ("bash", clap_complete::Shell::Bash),
            ("zsh", clap_complete::Shell::Zsh),
            ("fish", clap_complete::Shell::Fish),
        ] {
            assert_eq!(builtin(&["completions", name]), Builtin::Completions(shell));
        }
        // Global flags are accepted around them (no config is read either way).
        assert_eq!(
            builtin(&["--config", "/nonexistent.toml", "man", "-q"]),
            Builtin::Man(None)
        );
    }

    #[test]
    fn the_tools_own_command_line_is_unchanged() {
        let a = tool(&["--site", "x", "man.py", "--json"]);
        assert_eq!(a.site, "x");
        assert_eq!(a.file.as_deref(), Some(std::path::Path::new("man.py")));
        assert!(a.global.json);
        assert_eq!(a.command, None);
        let a = tool(&["--site", "x", "renew", "--id", "7"]);
        assert_eq!(a.command, Some(DemoCommand::Renew { id: "7".into() }));

        let err = parse_demo(&[]).unwrap_err();
        assert!(err.use_stderr(), "{err}");
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(err.to_string().contains("--site"), "{err}");
    }

    /// A tool without subcommands of its own (code-submit's shape).
    #[derive(Debug, clap::Parser)]
    #[command(name = "flat-tool", version)]
    struct FlatArgs {
        /// A file
        #[arg(value_name = "FILE", required_unless_present = "task")]
        file: Option<PathBuf>,
        /// A task
        #[arg(long)]
        task: Option<String>,
        #[command(flatten)]
        global: GlobalArgs,
    }

    impl ToolArgs for FlatArgs {
        fn global(&self) -> &GlobalArgs {
            &self.global
        }
    }

    #[test]
    fn a_tool_without_subcommands_keeps_its_positional_arguments() {
        let parse = |argv: &[&str]| {
            parse::<FlatArgs, _, _>(std::iter::once("flat-tool").chain(argv.iter().copied()))
        };
        assert!(matches!(
            parse(&["man"]),
            Ok(Parsed::Builtin(Builtin::Man(None)))
        ));
        assert!(matches!(
            parse(&["completions", "fish", "-q"]),
            Ok(Parsed::Builtin(Builtin::Completions(
                clap_complete::Shell::Fish
            )))
        ));
        // `help` is still a file name, and a file given first stays the tool's.
        for argv in [&["help"][..], &["--task", "t", "man"], &["./man"]] {
            match parse(argv) {
                Ok(Parsed::Tool(a)) => assert!(a.file.is_some(), "{argv:?}: {a:?}"),
                other => panic!("{argv:?}: {other:?}"),
            }
        }
        let help = command::<FlatArgs>().render_help().to_string();
        assert!(
            help.contains("Usage: flat-tool [OPTIONS] [FILE]\n       flat-tool <COMMAND>"),
            "{help}"
        );
    }

    #[test]
    fn completions_need_a_known_shell() {
        for argv in [&["completions"][..], &["completions", "tcsh"]] {
            let err = parse_demo(argv).unwrap_err();
            assert!(err.use_stderr(), "{argv:?}: {err}");
        }
    }

    #[test]
    fn completion_scripts_complete_the_tools_flags() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let script = written(Builtin::Completions(shell));
            assert!(script.contains("demo-tool"), "{shell}: {script}");
            assert!(script.contains("site"), "{shell}: {script}");
            assert!(script.contains("renew"), "{shell}: {script}");
        }
    }

    #[test]
    fn man_page_is_roff_with_the_tools_options_and_exit_status() {
        let page = written(Builtin::Man(None));
        assert!(
            page.lines().any(|l| l.starts_with(".TH demo-tool")),
            "{page}"
        );
        assert!(page.contains("site"), "{page}");
        assert!(page.contains("completions"), "{page}");
        assert!(page.contains("EXIT STATUS"), "{page}");
    }

    #[test]
    fn man_dir_writes_a_page_for_the_tool_and_each_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let listed = written(Builtin::Man(Some(dir.path().to_path_buf())));
        let mut files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "demo-tool-completions.1",
                "demo-tool-man.1",
                "demo-tool-renew.1",
                "demo-tool.1"
            ]
        );
        // stdout lists the written files, the tool's own page first.
        let first = listed.lines().next().unwrap();
        assert!(first.ends_with("/demo-tool.1"), "{listed}");
        assert_eq!(listed.lines().count(), 4, "{listed}");
        let renew = std::fs::read_to_string(dir.path().join("demo-tool-renew.1")).unwrap();
        assert!(
            renew
                .lines()
                .any(|l| l.starts_with(".TH demo-tool-renew 1")),
            "{renew}"
        );
        let main = std::fs::read_to_string(dir.path().join("demo-tool.1")).unwrap();
        assert_eq!(main, written(Builtin::Man(None)));
    }

    #[test]
    fn help_lists_completions_and_man() {
        let help = command::<DemoArgs>().render_long_help().to_string();
        assert!(help.contains("completions"), "{help}");
        assert!(help.contains("man "), "{help}");
    }

    #[test]
    fn after_help_block_matches_the_exit_table() {
        let s = after_help!("tool --x");
        assert!(s.ends_with(crate::exit::EXIT_STATUS_HELP), "{s}");
        assert!(s.starts_with("EXAMPLES:\n  tool --x"));
    }
}
