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
#[cfg(feature = "oracle")]
mod oracle;
pub mod process;
pub mod remote;
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
    /// Run one SQL file as a mailed request would run, into a result file
    ///
    /// The same path as a request, without mail: the SQL check, then each statement
    /// read-only on the queryable database NAME with its row cap and time limit, rows
    /// streamed to OUTPUT (one file per statement: `OUTPUT`, or `STEM-N.EXT` beside it
    /// when the file holds several). For admins reproducing an answer, and for
    /// benchmarks. Exit 1 when a statement is refused or fails.
    #[command(after_help = labrelay::after_help!("\
  mail-query export --database lims --output runs.csv runs.sql
  mail-query export --database lims --format xlsx --output report.xlsx report.sql"))]
    Export(ExportArgs),
    /// The request log: who asked what, when, and the answer
    ///
    /// One line per request (with `--json` one record): when it was received, the
    /// sender, the database, statements, rows, the verdict and the reply's Message-ID.
    #[command(after_help = labrelay::after_help!("\
  mail-query log --since 2026-11-01
  mail-query log --json | jq 'select(.verdict == \"refused\")'"))]
    Log(LogArgs),
}

/// Arguments of `mail-query export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The queryable database ([mail_query.databases.NAME] or an alias)
    #[arg(long, value_name = "NAME")]
    pub database: String,
    /// File format (default: [mail_query] format)
    #[arg(long, value_parser = ["csv", "tsv", "xlsx"])]
    pub format: Option<String>,
    /// Start CSV with a UTF-8 byte order mark (for Excel)
    #[arg(long)]
    pub bom: bool,
    /// The result file
    #[arg(long, short, value_name = "FILE")]
    pub output: PathBuf,
    /// The SQL file (`-`: stdin)
    #[arg(value_name = "SQL")]
    pub sql: PathBuf,
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
        Some(Command::Export(export)) => return run_export(&export, &config, &ctx).await,
        None => {}
    }
    let shared = std::sync::Arc::new(ctx.config);
    let ctx_config = &*shared;
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
    let (imap, folders) = mailbox(&args, ctx_config, &config)?;
    let _lock = if args.dry_run {
        None
    } else {
        Some(labrelay::lock::InstanceLock::acquire(
            &ctx_config.data_dir(),
            "mail-query",
        )?)
    };
    if args.watch {
        return watch(&args, shared, config, &ctx.out).await;
    }
    let service = process::Service::open(shared.clone(), config, args.dry_run).await?;
    let tally = intake::once(&service, ctx_config, &imap, &folders, &ctx.out).await?;
    Ok(tally.exit())
}

/// `--watch`, reloading the configuration on SIGHUP. A configuration that fails to
/// load or check is reported and the running one kept.
async fn watch(
    args: &Args,
    mut config: std::sync::Arc<labrelay::config::Config>,
    mut mq: MailQueryConfig,
    out: &Printer,
) -> anyhow::Result<Exit> {
    loop {
        let (imap, folders) = mailbox(args, &config, &mq)?;
        let service = process::Service::open(config.clone(), mq.clone(), args.dry_run).await?;
        match intake::watch(&service, &config, &imap, &folders, out).await? {
            intake::WatchEnd::Stop => return Ok(Exit::Ok),
            intake::WatchEnd::Reload => {}
        }
        let loaded = labrelay::config::Config::load(&labrelay::config::LoadOptions {
            explicit: args.global.config.clone(),
            no_config: args.global.no_config,
        })
        .map_err(anyhow::Error::new)
        .and_then(|l| {
            let m = MailQueryConfig::from_config(&l.config)?;
            mailbox(args, &l.config, &m)?;
            Ok((l.config, m))
        });
        match loaded {
            Ok((c, m)) => {
                labrelay::retry::set_policy(c.retry.clone());
                config = std::sync::Arc::new(c);
                mq = m;
                tracing::info!("configuration reloaded");
            }
            Err(e) => tracing::error!("configuration not reloaded, keeping the running one: {e:#}"),
        }
    }
}

/// The `[imap]` section and the folders of `--once`/`--watch`.
fn mailbox(
    args: &Args,
    config: &labrelay::config::Config,
    mq: &MailQueryConfig,
) -> Result<(labrelay::config::ImapConfig, intake::Folders), ConfigError> {
    let imap = config.imap.clone().ok_or_else(|| {
        ConfigError::Missing("[imap] section (the mailbox requests arrive in)".into())
    })?;
    let folders = intake::Folders {
        inbox: args
            .folder
            .clone()
            .or_else(|| mq.folder.clone())
            .unwrap_or_else(|| imap.folder.clone()),
        processed: mq.processed_folder.clone(),
        rejected: mq.rejected_folder.clone(),
    };
    Ok((imap, folders))
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

/// One exported statement's JSON record.
#[derive(serde::Serialize)]
struct ExportRecord {
    index: usize,
    file: String,
    rows: u64,
    truncated: bool,
    seconds: f64,
}

async fn run_export(
    args: &ExportArgs,
    config: &MailQueryConfig,
    ctx: &Context,
) -> anyhow::Result<Exit> {
    let (name, db) = config
        .lookup(&args.database)
        .ok_or_else(|| ConfigError::Missing(format!("[mail_query.databases.{}]", args.database)))?;
    let text = read(&args.sql)?;
    let statements = check::check(db.engine, &text);
    if let Some(r) = statements.iter().find_map(check::Statement::reason) {
        tracing::error!("{r}");
        return Ok(Exit::Failed);
    }
    if statements.is_empty() {
        return Err(labrelay::exit::usage("the SQL file holds no statement"));
    }
    let format = match args.format.as_deref() {
        Some("tsv") => config::Format::Tsv,
        Some("xlsx") => config::Format::Xlsx,
        Some(_) => config::Format::Csv,
        None => config.format,
    };
    let format = remote::format_for(db, format);

    let limits = run::Limits {
        max_rows: db.max_rows.unwrap_or(config.max_rows),
        max_query_seconds: db.max_query_seconds.unwrap_or(config.max_query_seconds),
    };
    let many = statements.len() > 1;
    for s in &statements {
        let path = if many {
            let stem = args
                .output
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy();
            let ext = args
                .output
                .extension()
                .map(|e| format!(".{}", e.to_string_lossy()));
            args.output
                .with_file_name(format!("{stem}-{}{}", s.index, ext.unwrap_or_default()))
        } else {
            args.output.clone()
        };
        let started = std::time::Instant::now();
        let outcome = remote::run_statement(
            &ctx.config,
            db,
            &s.sql,
            limits,
            run::Output {
                format,
                bom: args.bom,
            },
            &path,
        )
        .await
        .with_context(|| format!("{name}: statement {}", s.index))?;
        let record = ExportRecord {
            index: s.index,
            file: path.display().to_string(),
            rows: outcome.rows,
            truncated: outcome.truncated,
            seconds: started.elapsed().as_secs_f64(),
        };
        ctx.out.emit("export", &record, || {
            format!(
                "statement {}: {} rows{} in {:.2} s -> {}",
                record.index,
                record.rows,
                if record.truncated { " (truncated)" } else { "" },
                record.seconds,
                record.file
            )
        })?;
    }
    Ok(Exit::Ok)
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
