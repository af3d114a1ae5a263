//! `code-submit`: submit jobs to the job platform. `task` submits a registered task;
//! the code-file commands (`add`, `run`, `status`, `exec`, ...) come with the sandbox.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use jobs::store::{self, NewJob, Store};
use jobs::{JobError, Registry};
use labrelay::cli::{Context, GlobalArgs, ToolArgs};
use labrelay::exit::Exit;

/// Submit jobs to the labrelay job queue
///
/// `task` submits a registered task ([tasks.NAME] in the configuration) with its
/// arguments, prints the job id, or with --wait the job's result, exiting with the
/// job's outcome.
#[derive(Debug, Parser)]
#[command(name = "code-submit", version, after_help = labrelay::after_help!("\
  code-submit task rebuild-index
  code-submit task align --arg sample=S1 --arg lane=2 --wait
  code-submit task report --args-json args.json --unique-key report-2026-11
  code-submit task nightly --run-at 2026-12-01T03:00:00Z --priority -1"))]
pub struct Args {
    /// What to do
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub global: GlobalArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a registered task
    Task {
        /// Task name, as in [tasks.NAME] (`job-worker tasks` lists them)
        name: String,
        /// An argument (repeatable)
        #[arg(long = "arg", value_name = "KEY=VALUE")]
        args: Vec<String>,
        /// Arguments as a JSON object, from a file or - for stdin
        #[arg(long, value_name = "FILE|-", conflicts_with = "each")]
        args_json: Option<PathBuf>,
        /// One job per line of FILE (- for stdin), each line a JSON object of arguments
        /// (merged over --arg); prints one id per line
        #[arg(long, value_name = "FILE|-", conflicts_with_all = ["unique_key", "wait"])]
        each: Option<PathBuf>,
        /// Idempotency key: submitting the same key again returns the first job
        #[arg(long, value_name = "KEY")]
        unique_key: Option<String>,
        /// Not before this time (RFC 3339, e.g. 2026-12-01T03:00:00Z)
        #[arg(long, value_name = "TIME")]
        run_at: Option<String>,
        /// Higher runs first (default 0)
        #[arg(
            long,
            value_name = "P",
            default_value_t = 0,
            allow_negative_numbers = true
        )]
        priority: i64,
        /// Mail the outcome to this address when the job ends (needs [mail] from)
        #[arg(long, value_name = "ADDRESS")]
        email: Option<String>,
        /// Wait for the job to finish and print its result; exit with its outcome
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds (exit 75; the job goes on)
        #[arg(long, value_name = "SECS", requires = "wait")]
        timeout: Option<u64>,
    },
}

impl ToolArgs for Args {
    fn global(&self) -> &GlobalArgs {
        &self.global
    }
}

fn usage(m: impl Into<String>) -> anyhow::Error {
    labrelay::exit::usage(m)
}

/// The arguments from `--args-json` and `--arg` (the latter win).
fn collect_args(
    pairs: &[String],
    json: Option<&PathBuf>,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let mut args = serde_json::Map::new();
    if let Some(path) = json {
        let text = if path.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            s
        } else {
            std::fs::read_to_string(path)
                .map_err(|e| usage(format!("--args-json {}: {e}", path.display())))?
        };
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(m)) => args = m,
            Ok(_) => {
                return Err(usage(format!(
                    "--args-json {}: not a JSON object",
                    path.display()
                )));
            }
            Err(e) => return Err(usage(format!("--args-json {}: {e}", path.display()))),
        }
    }
    for p in pairs {
        let Some((k, v)) = p.split_once('=') else {
            return Err(usage(format!("--arg {p}: expected KEY=VALUE")));
        };
        args.insert(k.to_owned(), serde_json::Value::String(v.to_owned()));
    }
    Ok(args)
}

/// Run the tool.
pub async fn run(args: Args, ctx: Context) -> anyhow::Result<Exit> {
    let Command::Task {
        name,
        args: pairs,
        args_json,
        each,
        unique_key,
        run_at,
        priority,
        email,
        wait,
        timeout,
    } = args.command;
    let registry = Registry::from_config(&ctx.config)?;
    let task = registry.task(&name).map_err(usage)?;
    let job_args = collect_args(&pairs, args_json.as_ref())?;
    if each.is_none() {
        task.check_args(&job_args).map_err(usage)?;
    }
    let run_at_ms = run_at
        .as_deref()
        .map(|t| {
            chrono::DateTime::parse_from_rfc3339(t)
                .map(|d| d.timestamp_millis())
                .map_err(|e| {
                    usage(format!(
                        "--run-at {t}: {e} (use RFC 3339, e.g. 2026-12-01T03:00:00Z)"
                    ))
                })
        })
        .transpose()?;
    if let Some(to) = &email {
        jobs::notify::Notifier::check(&ctx.config, to)?;
    }
    let db = labrelay::db::Db::open_state(&ctx.config).await?;
    let store = Store::new(db);
    let submitter = jobs::current_user();
    if let Some(path) = each {
        let reader: Box<dyn std::io::BufRead> = if path.as_os_str() == "-" {
            Box::new(std::io::BufReader::new(std::io::stdin()))
        } else {
            Box::new(std::io::BufReader::new(
                std::fs::File::open(&path)
                    .map_err(|e| usage(format!("--each {}: {e}", path.display())))?,
            ))
        };
        // Every line is checked before any job is submitted.
        let mut batch = Vec::new();
        for (n, line) in std::io::BufRead::lines(reader).enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("--each {} line {}", path.display(), n + 1);
            let serde_json::Value::Object(extra) =
                serde_json::from_str(&line).map_err(|e| usage(format!("{}: {e}", at())))?
            else {
                return Err(usage(format!("{}: not a JSON object", at())));
            };
            let mut args = job_args.clone();
            args.extend(extra);
            task.check_args(&args)
                .map_err(|e| usage(format!("{}: {e}", at())))?;
            batch.push(NewJob {
                task: task.name.clone(),
                args,
                queue: task.queue.clone(),
                priority,
                max_attempts: task.max_attempts,
                run_at_ms,
                unique_key: None,
                submitter: submitter.clone(),
                notify: email.clone(),
            });
        }
        let ids = store.submit_many(&batch).await?;
        for id in ids {
            ctx.out.emit(
                "submitted",
                &serde_json::json!({"id": id, "task": name, "created": true}),
                || id.to_string(),
            )?;
        }
        return Ok(Exit::Ok);
    }
    let (id, created) = store
        .submit(&NewJob {
            task: task.name.clone(),
            args: job_args,
            queue: task.queue.clone(),
            priority,
            max_attempts: task.max_attempts,
            run_at_ms,
            unique_key: unique_key.clone(),
            submitter,
            notify: email,
        })
        .await?;
    if !wait {
        ctx.out.emit(
            "submitted",
            &serde_json::json!({"id": id, "task": name, "created": created}),
            || {
                if created {
                    id.to_string()
                } else {
                    tracing::info!(
                        "unique key {} was used by job {id}: not submitted again",
                        unique_key.as_deref().unwrap_or("")
                    );
                    id.to_string()
                }
            },
        )?;
        return Ok(Exit::Ok);
    }
    let deadline = timeout.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut pause = Duration::from_millis(50);
    let job = loop {
        let j = store.get(id).await?.ok_or(JobError::NoSuchJob(id))?;
        if !matches!(j.state.as_str(), store::QUEUED | store::RUNNING) {
            break j;
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Err(JobError::NotFinished { id, state: j.state }.into());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    };
    let record = serde_json::json!({
        "id": job.id,
        "state": job.state,
        "exit_code": job.exit_code,
        "result": job.result,
        "stdout": job.stdout,
        "stderr": job.stderr,
        "error": job.error,
    });
    ctx.out.emit("result", &record, || match &job.result {
        Some(r) => r.to_string(),
        None => job.stdout.clone().unwrap_or_default().trim_end().to_owned(),
    })?;
    if job.state != store::SUCCEEDED {
        tracing::warn!(job = id, state = %job.state, error = job.error.as_deref().unwrap_or(""), "the job did not succeed");
        return Ok(Exit::Failed);
    }
    Ok(Exit::Ok)
}
