//! `mail-query`: answer SQL queries sent by e-mail. Reads new mail over IMAP, checks
//! the sender and the SQL, runs the query read-only on the named database and mails
//! the result back as files.
//!
//! Built so far: the typed `[mail_query]` configuration ([`config`]), the SQL check
//! ([`check`]) and `mail-query check`, which runs that check on files or stdin; running
//! one statement read-only with its rows streamed to CSV/TSV ([`run`], [`export`]), a
//! library step no command calls yet. Reading mail (`--once`, `--watch`) answers "not
//! implemented yet" (exit 2).

#![deny(missing_docs)]

pub mod check;
pub mod config;
pub mod export;
pub mod input;
pub mod run;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use labrelay::cli::{Context, GlobalArgs, ToolArgs};
use labrelay::config::ConfigError;
use labrelay::exit::Exit;
use labrelay::output::Printer;

use crate::check::Engine;
use crate::config::MailQueryConfig;

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
  mail-query --once --dry-run --json
  mail-query check --engine postgres query.sql   # why would this SQL be refused?"))]
pub struct Args {
    /// Process new mail once and exit (for cron)
    #[arg(long, conflicts_with = "watch")]
    pub once: bool,
    /// Stay connected and answer mail as it arrives (IMAP IDLE)
    #[arg(long)]
    pub watch: bool,
    /// IMAP folder to read (default: [mail_query] folder, else [imap] folder)
    #[arg(long, value_name = "FOLDER")]
    pub folder: Option<String>,
    /// Check and report, but run no query and send no mail
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    #[allow(missing_docs)]
    pub command: Option<Command>,
}

/// `mail-query`'s own commands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Check SQL as a mailed request would be checked, without any connection
    ///
    /// Splits each FILE (stdin when none, or `-`) into statements and says for each
    /// whether it would run: only read-only queries are accepted (SELECT, WITH …
    /// SELECT, VALUES, EXPLAIN without ANALYZE), and no denied function may appear
    /// anywhere in them. A refusal names the statement and the construct. Files may be
    /// UTF-8, UTF-16 with BOM or GBK/GB18030. Exit 0 when every statement is accepted,
    /// 1 when any is refused, 2 when a file cannot be read.
    #[command(after_help = labrelay::after_help!("\
  mail-query check --engine mariadb report.sql
  mail-query check --database lims --json < query.sql
  mail-query check --engine sqlite a.sql b.sql"))]
    Check(CheckArgs),
}

/// Arguments of `mail-query check`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("dialect").required(true).args(["database", "engine"])))]
pub struct CheckArgs {
    /// Check in the dialect of this queryable database ([mail_query.databases.NAME] or an alias)
    #[arg(long, value_name = "NAME")]
    pub database: Option<String>,
    /// Check in this engine's dialect (no configuration needed)
    #[arg(long, value_enum, value_name = "ENGINE")]
    pub engine: Option<Engine>,
    /// SQL files to check (stdin when none; `-` is stdin)
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

impl ToolArgs for Args {
    fn global(&self) -> &GlobalArgs {
        &self.global
    }
}

/// Run the tool.
#[allow(clippy::unused_async)] // the mail commands to come are async
pub async fn run(args: Args, ctx: Context) -> anyhow::Result<Exit> {
    // Checked first, whatever the command: a bad [mail_query] exits 78 before any work.
    let config = MailQueryConfig::from_config(&ctx.config)?;
    match args.command {
        Some(Command::Check(check)) => run_check(&check, &config, &ctx.out),
        None => Err(labrelay::cli::not_implemented("mail-query")),
    }
}

/// One statement's JSON record.
#[derive(serde::Serialize)]
struct StatementRecord<'a> {
    file: &'a str,
    index: usize,
    sql: &'a str,
    verdict: &'static str,
    reason: Option<String>,
}

/// The final JSON record.
#[derive(serde::Serialize)]
struct Summary {
    engine: Engine,
    files: usize,
    unreadable: usize,
    statements: usize,
    accepted: usize,
    refused: usize,
}

fn run_check(args: &CheckArgs, config: &MailQueryConfig, out: &Printer) -> anyhow::Result<Exit> {
    let engine = match (&args.database, args.engine) {
        (_, Some(engine)) => engine,
        (Some(name), None) => {
            let (_, db) = config.lookup(name).ok_or_else(|| {
                let known: Vec<&str> = config.databases.keys().map(String::as_str).collect();
                ConfigError::Missing(format!(
                    "[mail_query.databases.{name}] (queryable databases: {})",
                    if known.is_empty() {
                        "none configured".to_owned()
                    } else {
                        known.join(", ")
                    }
                ))
            })?;
            db.engine
        }
        (None, None) => return Err(labrelay::exit::usage("give --database NAME or --engine")),
    };
    let stdin = [PathBuf::from("-")];
    let files = if args.files.is_empty() {
        &stdin[..]
    } else {
        &args.files[..]
    };
    let mut summary = Summary {
        engine,
        files: files.len(),
        unreadable: 0,
        statements: 0,
        accepted: 0,
        refused: 0,
    };
    for file in files {
        let name = file.to_string_lossy();
        let text = match read(file) {
            Ok(t) => t,
            Err(e) => {
                // Keep going: report this file, check the others, exit 2 at the end.
                tracing::error!("{e:#}");
                summary.unreadable += 1;
                continue;
            }
        };
        for s in check::check(engine, &text) {
            summary.statements += 1;
            if s.accepted() {
                summary.accepted += 1;
            } else {
                summary.refused += 1;
            }
            let record = StatementRecord {
                file: &name,
                index: s.index,
                sql: &s.sql,
                verdict: if s.accepted() { "accepted" } else { "refused" },
                reason: s.reason(),
            };
            out.emit("statement", &record, || match &record.reason {
                None => format!("{name}: statement {}: accepted", s.index),
                Some(_) => format!(
                    "{name}: statement {}: refused: {}\n{}",
                    s.index,
                    s.refusal.as_deref().unwrap_or_default(),
                    quote(&s.sql)
                ),
            })?;
        }
    }
    out.emit("summary", &summary, || {
        format!(
            "{}: {} accepted, {} refused{}",
            plural(summary.statements, "statement"),
            summary.accepted,
            summary.refused,
            if summary.unreadable > 0 {
                format!(", {} unreadable", plural(summary.unreadable, "file"))
            } else {
                String::new()
            }
        )
    })?;
    if summary.unreadable > 0 {
        return Err(labrelay::exit::usage(format!(
            "{} could not be read",
            plural(summary.unreadable, "file")
        )));
    }
    Ok(if summary.refused > 0 {
        Exit::Failed
    } else {
        Exit::Ok
    })
}

fn read(file: &std::path::Path) -> anyhow::Result<String> {
    let bytes = if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut buf)
            .context("reading SQL from stdin")?;
        buf
    } else {
        fs_err::read(file)?
    };
    input::decode(&bytes).with_context(|| format!("reading {}", file.display()))
}

/// A statement indented under its verdict, so the text output stays readable.
fn quote(sql: &str) -> String {
    sql.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}
