//! `mail-query`: answer SQL queries sent by e-mail. Reads new mail over IMAP, checks
//! the sender and the SQL, runs the query read-only on the named database and mails
//! the result back as files.
//!
//! The parts: the typed `[mail_query]` configuration ([`config`]); what a mail asks
//! for ([`request`]); whether its sender is trusted ([`trust`]); the SQL check
//! ([`check`]); running one statement read-only into a CSV/TSV file ([`run`],
//! [`export`]); the reply, zipped and split ([`reply`]); one request from record to
//! sent reply ([`process`], logged in [`state`]); and where requests come from
//! (`--eml`, `--once`, `--watch`: [`intake`]).

#![deny(missing_docs)]

pub mod check;
pub mod config;
pub mod export;
pub mod input;
pub mod intake;
pub mod process;
pub mod reply;
pub mod request;
pub mod run;
pub mod state;
pub mod trust;

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
  mail-query --eml message.eml      # one message (procmail, Postfix pipe: --eml -)
  mail-query log --since 2026-11-01
  mail-query check --engine postgres query.sql   # why would this SQL be refused?"))]
pub struct Args {
    /// Process new mail once and exit (for cron)
    #[arg(long, conflicts_with_all = ["watch", "eml"])]
    pub once: bool,
    /// Stay connected and answer mail as it arrives (IMAP IDLE)
    #[arg(long, conflicts_with = "eml")]
    pub watch: bool,
    /// Answer one raw RFC 822 message from FILE (`-`: stdin), e.g. from a mail filter
    #[arg(long, value_name = "FILE")]
    pub eml: Option<PathBuf>,
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
    /// The request log: who asked what, when, and the answer
    ///
    /// One line per request (with `--json` one record): when it was received, the
    /// sender, the database, statements, rows, the verdict and the reply's Message-ID.
    #[command(after_help = labrelay::after_help!("\
  mail-query log --since 2026-11-01
  mail-query log --json | jq 'select(.verdict == \"refused\")'"))]
    Log(LogArgs),
}

/// Arguments of `mail-query log`.
#[derive(Debug, clap::Args)]
pub struct LogArgs {
    /// Only requests received on or after DATE (YYYY-MM-DD, UTC, or RFC 3339)
    #[arg(long, value_name = "DATE", value_parser = parse_since)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
}

fn parse_since(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc())
        .map_err(|_| format!("{s:?} is not a date (YYYY-MM-DD or RFC 3339)"))
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
pub async fn run(args: Args, ctx: Context) -> anyhow::Result<Exit> {
    // Checked first, whatever the command: a bad [mail_query] exits 78 before any work.
    let config = MailQueryConfig::from_config(&ctx.config)?;
    match args.command {
        Some(Command::Check(check)) => return run_check(&check, &config, &ctx.out),
        Some(Command::Log(log)) => return run_log(&log, &ctx).await,
        None => {}
    }
    if config.trust == config::Trust::Allowlist {
        tracing::warn!(
            "trust = \"allowlist\": senders are not authenticated; a forged From address \
             on the allowlist gets data"
        );
    }
    let shared = std::sync::Arc::new(ctx.config);
    let ctx_config = &*shared;
    let imap = || {
        ctx_config.imap.clone().ok_or_else(|| {
            ConfigError::Missing("[imap] section (the mailbox requests arrive in)".into())
        })
    };
    let folders = |imap: &labrelay::config::ImapConfig| intake::Folders {
        inbox: args
            .folder
            .clone()
            .or_else(|| config.folder.clone())
            .unwrap_or_else(|| imap.folder.clone()),
        processed: config.processed_folder.clone(),
        rejected: config.rejected_folder.clone(),
    };
    if let Some(file) = &args.eml {
        let raw = read_bytes(file)?;
        let service = process::Service::open(shared.clone(), config, args.dry_run).await?;
        return intake::eml(&service, &raw, &ctx.out).await;
    }
    if !args.once && !args.watch {
        return Err(labrelay::exit::usage(
            "give --once, --watch, --eml FILE or a command (see --help)",
        ));
    }
    let imap = imap()?;
    let folders = folders(&imap);
    let _lock = if args.dry_run {
        None
    } else {
        Some(labrelay::lock::InstanceLock::acquire(
            &ctx_config.data_dir(),
            "mail-query",
        )?)
    };
    let service = process::Service::open(shared.clone(), config, args.dry_run).await?;
    if args.watch {
        intake::watch(&service, ctx_config, &imap, &folders, &ctx.out).await
    } else {
        let tally = intake::once(&service, ctx_config, &imap, &folders, &ctx.out).await?;
        Ok(tally.exit())
    }
}

fn read_bytes(file: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut buf)
            .context("reading the message from stdin")?;
        Ok(buf)
    } else {
        Ok(fs_err::read(file)?)
    }
}

async fn run_log(args: &LogArgs, ctx: &Context) -> anyhow::Result<Exit> {
    let db = labrelay::db::Db::open_state(&ctx.config).await?;
    let rows = state::Requests::new(db).list(args.since).await?;
    for r in &rows {
        ctx.out.emit("request", r, || {
            format!(
                "{}  {}  {}  {}  {} statements, {} rows  {}{}",
                r.received_at,
                r.sender.as_deref().unwrap_or("-"),
                r.database.as_deref().unwrap_or("-"),
                r.verdict.as_deref().unwrap_or(r.stage.as_str()),
                r.statements,
                r.rows,
                r.reply_message_id.as_deref().unwrap_or("-"),
                r.reason
                    .as_deref()
                    .map(|x| format!("  ({x})"))
                    .unwrap_or_default(),
            )
        })?;
    }
    Ok(Exit::Ok)
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
    let bytes = read_bytes(file)?;
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
