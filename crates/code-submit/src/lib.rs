//! `code-submit`: submit code and tasks to the job platform. `exec` runs one file in the
//! sandbox right here; `languages` lists what the sandbox can run; `task` submits a
//! registered task.

mod exec;
mod submissions;

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use jobs::api::SubmitRequest;
use jobs::store::{self, Store};
use jobs::{JobError, Registry};
use labrelay::cli::{Context, GlobalArgs, ToolArgs};
use labrelay::exit::Exit;

/// Submit code and tasks to the labrelay job queue, or run code in the sandbox
///
/// `exec` runs one source file in a fresh sandbox box and reports its status (exit 0 when
/// Accepted). `languages` lists the sandbox's languages and which are installed. `task`
/// submits a registered task ([tasks.NAME] in the configuration) with its arguments,
/// prints the job id, or with --wait the job's result, exiting with the job's outcome.
#[derive(Debug, Parser)]
#[command(name = "code-submit", version, after_help = labrelay::after_help!("\
  code-submit add hello.py --language python --email alice@example.org --stdin in.txt
  code-submit run 3f2a9c0e1b7d4a55
  code-submit status --email alice@example.org
  code-submit exec hello.py --language python
  code-submit exec solution.c --language c --stdin input.txt --time-limit 2 --json
  code-submit languages
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
    /// Add a code submission: the source goes to the code storage, a row to the state
    /// database; prints its id
    Add(submissions::AddArgs),
    /// Queue a run of a submission (a job of the built-in task `code`); prints the job id
    Run {
        /// The submission's id
        id: String,
        /// Wait for the run and print the submission's status; exit 0 when Accepted
        #[arg(long)]
        wait: bool,
    },
    /// Status of a submission, or of every submission of an address
    Status(submissions::StatusArgs),
    /// Allow another run of a submission disabled after an error
    Enable {
        /// The submission's id
        id: String,
    },
    /// Run one source file in the sandbox here (no queue, no database)
    Exec(exec::ExecArgs),
    /// The sandbox's languages, and which are installed here
    Languages,
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
        /// POST the outcome to this webhook ([jobs.webhooks.NAME]) when the job ends
        #[arg(long, value_name = "NAME")]
        webhook: Option<String>,
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

/// Where submissions go: the state database, or a remote `job-worker serve`.
enum Target {
    Local(Store, Box<Registry>),
    Remote(jobs::client::Client),
}

impl Target {
    async fn submit(&self, req: &SubmitRequest) -> anyhow::Result<(i64, bool)> {
        match self {
            Target::Local(store, registry) => {
                let job = registry
                    .new_job(req, &jobs::current_user())
                    .map_err(usage)?;
                store.submit(&job).await
            }
            Target::Remote(client) => client.submit(req).await.map(|s| (s.id, s.created)),
        }
    }

    /// The job's result record once it has finished, `None` while it runs.
    async fn finished(&self, id: i64) -> anyhow::Result<Option<serde_json::Value>> {
        match self {
            Target::Local(store, _) => {
                let j = store.get(id).await?.ok_or(JobError::NoSuchJob(id))?;
                Ok(j.is_finished().then(|| j.result_record()))
            }
            Target::Remote(client) => {
                let j = client.job(id).await?;
                let state = j.get("state").and_then(serde_json::Value::as_str);
                if matches!(state, Some(store::QUEUED | store::RUNNING)) {
                    return Ok(None);
                }
                client.result(id).await.map(Some)
            }
        }
    }
}

/// The requests of `--each` (every line checked before any is submitted).
fn each_requests(
    path: &PathBuf,
    base: &SubmitRequest,
    registry: Option<&Registry>,
) -> anyhow::Result<Vec<SubmitRequest>> {
    let reader: Box<dyn std::io::BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path)
                .map_err(|e| usage(format!("--each {}: {e}", path.display())))?,
        ))
    };
    let mut out = Vec::new();
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
        let mut req = base.clone();
        req.args.extend(extra);
        if let Some(r) = registry {
            r.new_job(&req, "")
                .map_err(|e| usage(format!("{}: {e}", at())))?;
        }
        out.push(req);
    }
    Ok(out)
}

/// Ask `check` until it gives a value: after 50 ms, then twice as long each time, at
/// most a second apart (waiting for a job or a run to finish).
async fn poll<T, F, Fut>(mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let mut pause = Duration::from_millis(50);
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Run the tool.
pub async fn run(args: Args, ctx: Context) -> anyhow::Result<Exit> {
    match args.command {
        Command::Add(a) => submissions::add(a, &ctx).await,
        Command::Run { id, wait } => submissions::run(&id, wait, &ctx).await,
        Command::Status(a) => submissions::status(a, &ctx).await,
        Command::Enable { id } => submissions::enable(&id, &ctx).await,
        Command::Exec(a) => exec::exec(a, &ctx).await,
        Command::Languages => exec::languages(&ctx),
        task @ Command::Task { .. } => submit_task(task, ctx).await,
    }
}

/// `code-submit task`.
async fn submit_task(command: Command, ctx: Context) -> anyhow::Result<Exit> {
    let Command::Task {
        name,
        args: pairs,
        args_json,
        each,
        unique_key,
        run_at,
        priority,
        email,
        webhook,
        wait,
        timeout,
    } = command
    else {
        unreachable!("submit_task is called with Command::Task");
    };
    let registry = Registry::from_config(&ctx.config)?;
    let client = jobs::client::Client::from_config(&registry.settings)?;
    let base = SubmitRequest {
        task: name.clone(),
        args: collect_args(&pairs, args_json.as_ref())?,
        unique_key: unique_key.clone(),
        run_at,
        priority,
        email,
        webhook,
    };
    // Checked here when the registry is ours; a remote server checks its own.
    let local_registry = client.is_none().then_some(&registry);
    if let Some(r) = local_registry {
        if each.is_none() {
            r.new_job(&base, "").map_err(usage)?;
        }
        if let Some(to) = &base.email {
            jobs::notify::Notifier::check(&ctx.config, to)?;
        }
    }
    let batch = each
        .as_ref()
        .map(|p| each_requests(p, &base, local_registry))
        .transpose()?;
    let target = if let Some(c) = client {
        Target::Remote(c)
    } else {
        let db = labrelay::db::Db::open_state(&ctx.config).await?;
        Target::Local(Store::new(db), Box::new(registry))
    };
    if let Some(batch) = batch {
        let ids = match &target {
            Target::Local(store, registry) => {
                let user = jobs::current_user();
                let jobs = batch
                    .iter()
                    .map(|r| registry.new_job(r, &user).map_err(usage))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                store.submit_many(&jobs).await?
            }
            Target::Remote(client) => client.submit_many(&batch).await?,
        };
        for id in ids {
            ctx.out.emit(
                "submitted",
                &serde_json::json!({"id": id, "task": name, "created": true}),
                || id.to_string(),
            )?;
        }
        return Ok(Exit::Ok);
    }
    let (id, created) = target.submit(&base).await?;
    if !wait {
        if !created {
            tracing::info!(
                "unique key {} was used by job {id}: not submitted again",
                unique_key.as_deref().unwrap_or("")
            );
        }
        ctx.out.emit(
            "submitted",
            &serde_json::json!({"id": id, "task": name, "created": created}),
            || id.to_string(),
        )?;
        return Ok(Exit::Ok);
    }
    let deadline = timeout.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let record = poll(|| async {
        if let Some(r) = target.finished(id).await? {
            return Ok(Some(r));
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Err(JobError::NotFinished {
                id,
                state: "not finished".into(),
            }
            .into());
        }
        Ok(None)
    })
    .await?;
    ctx.out
        .emit("result", &record, || store::result_text(&record))?;
    let state = record["state"].as_str().unwrap_or_default();
    if state != store::SUCCEEDED {
        tracing::warn!(
            job = id,
            state,
            error = record["error"].as_str().unwrap_or(""),
            "the job did not succeed"
        );
        return Ok(Exit::Failed);
    }
    Ok(Exit::Ok)
}
