//! `job-worker`: run registered tasks from the job table (claims are leases with
//! heartbeats; a worker that dies loses its jobs to another), and administer jobs:
//! list, status, result, cancel, retry, purge, tasks, stats.

use std::fmt::Write as _;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use jobs::Registry;
use jobs::store::{self, Cancelled, ListFilter, Store};
use jobs::worker::{self, WorkerOptions};
use labrelay::cli::{Context, GlobalArgs, ToolArgs};
use labrelay::exit::Exit;

pub mod serve;

/// Run registered tasks from the job queue, and administer jobs
///
/// `run` claims jobs (a lease renewed by heartbeats), runs each task's command in its
/// own process group, records the outcome, retries failures with backoff and marks a
/// job dead after its last attempt. The other subcommands read or change the job table.
#[derive(Debug, Parser)]
#[command(name = "job-worker", version, after_help = labrelay::after_help!("\
  job-worker run --concurrency 4            # until SIGTERM
  job-worker run --once                     # cron: run what is ready, then exit
  job-worker list --state dead --json
  job-worker status 42
  job-worker result 42 > out.json
  job-worker cancel 42
  job-worker serve --listen 127.0.0.1:8080  # the signed HTTP API"))]
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
    /// Run jobs until SIGTERM (or, with --once, until nothing is ready)
    Run {
        /// Queues to take jobs from (comma-separated; default: every queue of a task)
        #[arg(long, value_name = "Q,...", value_delimiter = ',')]
        queues: Vec<String>,
        /// Jobs at the same time
        #[arg(long, value_name = "N", default_value_t = 1)]
        concurrency: u16,
        /// Run the jobs ready now, then exit
        #[arg(long)]
        once: bool,
        /// Exit after this many jobs
        #[arg(long, value_name = "N")]
        max_jobs: Option<u64>,
        /// This worker's name in the job table (default host:pid)
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// List jobs, newest first
    List {
        /// Only jobs in this state (queued, running, succeeded, failed, dead, cancelled)
        #[arg(long, value_name = "STATE")]
        state: Option<String>,
        /// Only jobs of this submitter
        #[arg(long, value_name = "USER")]
        submitter: Option<String>,
        /// At most this many
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: i64,
    },
    /// Show one job
    Status {
        /// Job id
        id: i64,
    },
    /// Print a job's output (its JSON result when the task printed one)
    Result {
        /// Job id
        id: i64,
        /// The whole stdout, from [jobs] output_storage, when it was longer than the row
        /// keeps (raw bytes, not JSON)
        #[arg(long)]
        full: bool,
    },
    /// Cancel a job (a running one is killed, with everything it started)
    Cancel {
        /// Job id
        id: i64,
    },
    /// Queue a failed, dead or cancelled job again with fresh attempts
    Retry {
        /// Job id
        id: i64,
    },
    /// Delete dead jobs
    Purge {
        /// Only dead jobs (the only kind purged; required so the intent is explicit)
        #[arg(long, required = true)]
        dead: bool,
        /// Only those that died longer ago than this (30s, 15m, 12h, 7d; default 0s)
        #[arg(long, value_name = "AGE", value_parser = parse_age, default_value = "0s")]
        older_than: i64,
    },
    /// List the registered tasks
    Tasks,
    /// Per queue: queued, running, dead, age of the oldest ready job
    Stats,
    /// Serve the HTTP API (signed requests; docs/job-worker.md) until SIGTERM
    Serve {
        /// Address to listen on (default [jobs] listen, 127.0.0.1:8080; port 0 picks one)
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<String>,
    },
}

impl ToolArgs for Args {
    fn global(&self) -> &GlobalArgs {
        &self.global
    }
}

/// `30s`, `15m`, `12h`, `7d` → milliseconds.
fn parse_age(s: &str) -> Result<i64, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n
        .parse()
        .map_err(|_| format!("`{s}` is not an age like 30s, 15m, 12h or 7d"))?;
    let ms = match unit {
        "s" | "" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("`{s}`: the unit is s, m, h or d")),
    };
    n.checked_mul(ms)
        .ok_or_else(|| format!("`{s}` is too long"))
}

/// The worker's queues (given, or every task's) and, when they include the code queue,
/// the sandbox that runs code jobs. Without a sandbox here the code queue is left out
/// of the default queues (with a warning); named with --queues it is an error (78).
async fn with_code(
    ctx: &Context,
    registry: &Registry,
    store: Store,
    queues: Vec<String>,
) -> anyhow::Result<(Store, Vec<String>)> {
    let code_queue = registry.settings.code_queue.clone();
    let given = !queues.is_empty();
    let mut queues = if given {
        queues
    } else {
        let mut q: Vec<String> = registry.tasks.values().map(|t| t.queue.clone()).collect();
        q.sort();
        q.dedup();
        q
    };
    if !queues.contains(&code_queue) {
        return Ok((store, queues));
    }
    let settings = sandbox::Settings::from_config(&ctx.config)?;
    match sandbox_here(&settings).await? {
        Ok(sb) => {
            tracing::info!(limits = sb.limits_label(), "code jobs run in the sandbox");
            let storage =
                jobs::code::code_storage(&ctx.config, registry.settings.code_storage.as_deref())
                    .await?;
            let submissions = jobs::code::Submissions::new(store.db().clone());
            Ok((
                store.with_code(jobs::code::CodeRunner {
                    sandbox: Ok(sb),
                    settings,
                    storage,
                    submissions,
                }),
                queues,
            ))
        }
        Err(e) if given => Err(labrelay::config::ConfigError::Invalid {
            key: "sandbox".into(),
            message: format!(
                "--queues names the code queue `{code_queue}`, but code cannot run here: {e}"
            ),
        }
        .into()),
        Err(e) => {
            tracing::warn!("not taking code jobs (queue `{code_queue}`): {e}");
            queues.retain(|q| *q != code_queue);
            Ok((store, queues))
        }
    }
}

/// The sandbox of this host, or why there is none; built off the async threads (it
/// removes what boxes of dead workers left behind).
async fn sandbox_here(
    settings: &sandbox::Settings,
) -> anyhow::Result<Result<Arc<sandbox::Sandbox>, String>> {
    let s = settings.clone();
    Ok(tokio::task::spawn_blocking(move || sandbox::Sandbox::new(s).map(Arc::new)).await?)
}

/// `[jobs] output_storage`, opened, and the folder for temporary files beside it.
async fn output_storage(
    ctx: &Context,
    registry: &Registry,
) -> anyhow::Result<Option<(labrelay::storage::AnyStorage, std::path::PathBuf)>> {
    let Some(name) = &registry.settings.output_storage else {
        return Ok(None);
    };
    let storage = labrelay::storage::AnyStorage::open_checked(ctx.config.storage(name)?).await?;
    let dir = ctx.config.data_dir().join("job-output");
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    Ok(Some((storage, dir)))
}

/// Open the state database (migrated) and the checked registry.
async fn open(ctx: &Context) -> anyhow::Result<(Store, Arc<Registry>)> {
    let registry = Registry::from_config(&ctx.config)?;
    let db = labrelay::db::Db::open_state(&ctx.config).await?;
    Ok((Store::new(db), Arc::new(registry)))
}

fn ms_text(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

fn no_such(id: i64) -> anyhow::Error {
    jobs::JobError::NoSuchJob(id).into()
}

/// Run the tool.
pub async fn run(args: Args, ctx: Context) -> anyhow::Result<Exit> {
    match args.command {
        Command::Serve { listen } => {
            let (store, registry) = open(&ctx).await?;
            let listen = listen.unwrap_or_else(|| registry.settings.listen.clone());
            let settings = sandbox::Settings::from_config(&ctx.config)?;
            let made = sandbox_here(&settings).await?;
            if let Err(e) = &made {
                tracing::info!("POST /api/v2/execute answers 503: {e}");
            }
            let code = serve::CodeApi {
                submissions: jobs::code::Submissions::new(store.db().clone()),
                storage: jobs::code::code_storage(
                    &ctx.config,
                    registry.settings.code_storage.as_deref(),
                )
                .await?,
                settings,
                sandbox: made,
            };
            let output = output_storage(&ctx, &registry).await?;
            let mut state =
                serve::ApiState::new(store, registry, code, ctx.config.mail.from.clone())?;
            if let Some((storage, dir)) = output {
                state = state.with_output(storage, dir);
            }
            let out = &ctx.out;
            serve::serve(
                Arc::new(state),
                &listen,
                |addr| {
                    tracing::info!(%addr, "serving the job API");
                    Ok(out.emit(
                        "listening",
                        &serde_json::json!({"listen": addr.to_string()}),
                        || format!("listening on http://{addr}"),
                    )?)
                },
                labrelay::cli::shutdown_signal(),
            )
            .await?;
            Ok(Exit::Ok)
        }
        Command::Run {
            queues,
            concurrency,
            once,
            max_jobs,
            name,
        } => {
            let (store, registry) = open(&ctx).await?;
            let store = match output_storage(&ctx, &registry).await? {
                Some((storage, dir)) => store.with_output(jobs::runner::Spill {
                    storage,
                    dir,
                    max: registry.settings.output_max_bytes,
                }),
                None => store,
            };
            let notifier = jobs::notify::Notifier::from_config(&ctx.config)?;
            let (store, queues) = with_code(&ctx, &registry, store, queues).await?;
            let opts = WorkerOptions {
                queues,
                concurrency: usize::from(concurrency.max(1)),
                once,
                max_jobs,
                name: name.unwrap_or_else(worker::default_name),
            };
            let wake = match ctx.config.state_database() {
                Ok(cfg) if !once => {
                    labrelay::db::Wakeup::listen_or_watch(&cfg, jobs::NOTIFY_CHANNEL).await
                }
                _ => labrelay::db::Wakeup::Poll,
            };
            let dispatch = if registry.settings.broker == "rabbitmq" && !once {
                Some(jobs::rabbit::Dispatch::connect(&ctx.config, &opts.queues).await?)
            } else {
                None
            };
            tracing::info!(worker = %opts.name, queues = ?opts.queues, concurrency = opts.concurrency, broker = %registry.settings.broker, "worker started");
            let out = &ctx.out;
            let mut write_failed = None;
            let totals = worker::run(
                &store,
                registry,
                &opts,
                wake,
                notifier.as_ref(),
                dispatch.as_ref(),
                labrelay::cli::shutdown_signal(),
                |r| {
                    let shown = out.emit("job", r, || {
                        format!(
                            "job {} {} attempt {}: {}{}",
                            r.id,
                            r.task,
                            r.attempt,
                            r.state,
                            r.error
                                .as_deref()
                                .map_or(String::new(), |e| format!(" ({e})"))
                        )
                    });
                    if let Err(e) = shown {
                        write_failed.get_or_insert(e);
                    }
                },
            )
            .await?;
            if let Some(d) = &dispatch {
                d.close().await;
            }
            if let Some(e) = write_failed {
                return Err(e.into());
            }
            out.emit("worker", &totals, || {
                let states: Vec<String> = totals
                    .by_state
                    .iter()
                    .map(|(s, n)| format!("{n} {s}"))
                    .collect();
                format!(
                    "{} attempts: {}",
                    totals.claimed,
                    if states.is_empty() {
                        "none".into()
                    } else {
                        states.join(", ")
                    }
                )
            })?;
            Ok(Exit::Ok)
        }
        Command::List {
            state,
            submitter,
            limit,
        } => {
            if let Some(s) = &state
                && !worker::is_state(s)
            {
                return Err(labrelay::exit::usage(format!(
                    "--state {s}: not a state (one of {})",
                    store::STATES.join(", ")
                )));
            }
            let (store, _) = open(&ctx).await?;
            let jobs = store
                .list(&ListFilter {
                    state,
                    submitter,
                    limit,
                })
                .await?;
            for j in &jobs {
                ctx.out.emit("job", &j.summary(), || {
                    format!(
                        "{:>8}  {:<10} {:<20} {:<10} attempt {}/{}  {}",
                        j.id,
                        j.state,
                        j.task,
                        j.queue,
                        j.attempt,
                        j.max_attempts,
                        ms_text(Some(j.created_ms))
                    )
                })?;
            }
            Ok(Exit::Ok)
        }
        Command::Status { id } => {
            let (store, _) = open(&ctx).await?;
            let j = store.get(id).await?.ok_or_else(|| no_such(id))?;
            ctx.out.emit("job", &j.summary(), || {
                let mut t = format!(
                    "job {}: {}\ntask: {} {}\nqueue: {} (priority {})\nattempt: {} of {}\nsubmitter: {}\nsubmitted: {}\nstarted: {}\nfinished: {}",
                    j.id,
                    j.state,
                    j.task,
                    j.args,
                    j.queue,
                    j.priority,
                    j.attempt,
                    j.max_attempts,
                    j.submitter,
                    ms_text(Some(j.created_ms)),
                    ms_text(j.started_ms),
                    ms_text(j.finished_ms)
                );
                if j.state == store::QUEUED && j.run_at_ms > store::now_ms() {
                    let _ = write!(t, "\nruns at: {}", ms_text(Some(j.run_at_ms)));
                }
                if let Some(w) = &j.worker {
                    let _ = write!(t, "\nworker: {w}");
                }
                if let Some(c) = j.exit_code {
                    let _ = write!(t, "\nexit code: {c}");
                }
                if let Some(d) = j.duration_ms {
                    let _ = write!(t, "\nduration: {d} ms");
                }
                if let Some(e) = &j.error {
                    let _ = write!(t, "\nerror: {e}");
                }
                t
            })?;
            Ok(Exit::Ok)
        }
        Command::Result { id, full } => {
            let (store, registry) = open(&ctx).await?;
            let j = store.get(id).await?.ok_or_else(|| no_such(id))?;
            if !j.is_finished() {
                return Err(jobs::JobError::NotFinished { id, state: j.state }.into());
            }
            if full && let Some(key) = &j.stdout_ref {
                use labrelay::storage::ObjectStorage as _;
                let name = registry.settings.output_storage.clone().ok_or_else(|| {
                    labrelay::config::ConfigError::Missing(format!(
                        "[jobs] output_storage (job {id} kept its whole stdout as {key})"
                    ))
                })?;
                let storage =
                    labrelay::storage::AnyStorage::open_checked(ctx.config.storage(&name)?).await?;
                storage.get_into(key, std::io::stdout()).await?;
                return Ok(if j.state == store::SUCCEEDED {
                    Exit::Ok
                } else {
                    Exit::Failed
                });
            }
            let record = j.result_record();
            ctx.out
                .emit("result", &record, || store::result_text(&record))?;
            Ok(if j.state == store::SUCCEEDED {
                Exit::Ok
            } else {
                Exit::Failed
            })
        }
        Command::Cancel { id } => {
            let (store, _) = open(&ctx).await?;
            let by = jobs::current_user();
            let done = store.cancel(id, &by).await?.ok_or_else(|| no_such(id))?;
            ctx.out.emit(
                "cancel",
                &serde_json::json!({"id": id, "outcome": done}),
                || match done {
                    Cancelled::Queued => format!("job {id} cancelled (it had not started)"),
                    Cancelled::Running => {
                        format!("job {id} cancelled; its worker kills it within a heartbeat")
                    }
                    Cancelled::AlreadyFinished => {
                        format!("job {id} had already finished; nothing changed")
                    }
                },
            )?;
            Ok(if done == Cancelled::AlreadyFinished {
                Exit::Failed
            } else {
                Exit::Ok
            })
        }
        Command::Retry { id } => {
            let (store, _) = open(&ctx).await?;
            let j = store.get(id).await?.ok_or_else(|| no_such(id))?;
            if !store.retry(id).await? {
                return Err(anyhow::anyhow!(
                    "job {id} is {}: only failed, dead or cancelled jobs are retried",
                    j.state
                ));
            }
            ctx.out.emit("retry", &serde_json::json!({"id": id}), || {
                format!("job {id} queued again")
            })?;
            Ok(Exit::Ok)
        }
        Command::Purge {
            dead: _,
            older_than,
        } => {
            let (store, _) = open(&ctx).await?;
            let n = store.purge_dead(store::now_ms() - older_than).await?;
            ctx.out
                .emit("purge", &serde_json::json!({"deleted": n}), || {
                    format!("{n} dead jobs deleted")
                })?;
            Ok(Exit::Ok)
        }
        Command::Tasks => {
            let registry = Registry::from_config(&ctx.config)?;
            for t in registry.tasks.values() {
                ctx.out.emit("task", t, || {
                    format!(
                        "{:<20} queue {:<10} {} attempt(s), timeout {} s  {}",
                        t.name, t.queue, t.max_attempts, t.timeout_secs, t.description
                    )
                })?;
            }
            Ok(Exit::Ok)
        }
        Command::Stats => {
            let (store, _) = open(&ctx).await?;
            for (queue, s) in store.stats().await? {
                let record = serde_json::json!({"queue": queue, "queued": s.queued, "running": s.running, "dead": s.dead, "oldest_ready_ms": s.oldest_ready_ms});
                ctx.out.emit("queue", &record, || {
                    format!(
                        "{queue:<12} queued {:>6}  running {:>4}  dead {:>5}  oldest ready {}",
                        s.queued,
                        s.running,
                        s.dead,
                        s.oldest_ready_ms.map_or_else(
                            || "-".into(),
                            |ms| format!("{:.1} s", ms as f64 / 1000.0)
                        )
                    )
                })?;
            }
            Ok(Exit::Ok)
        }
    }
}
