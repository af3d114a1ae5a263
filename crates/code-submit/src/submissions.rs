//! `code-submit add / run / status / enable`: code submissions in the state database,
//! their sources in the code storage, runs as jobs of the built-in task `code`.

use std::path::{Path, PathBuf};

use jobs::Registry;
use jobs::code::{self, Queued, Submissions};
use jobs::store::Store;
use labrelay::cli::Context;
use labrelay::exit::Exit;
use labrelay::storage::AnyStorage;

fn usage(m: impl Into<String>) -> anyhow::Error {
    labrelay::exit::usage(m)
}

/// `code-submit add`.
#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// The source file
    pub file: PathBuf,
    /// Its language (`code-submit languages`); default: from the file's extension
    #[arg(long, short = 'l', value_name = "L")]
    pub language: Option<String>,
    /// Who gets the result by mail
    #[arg(long, value_name = "E")]
    pub email: String,
    /// stdin of the program (UTF-8 text)
    #[arg(long, value_name = "FILE")]
    pub stdin: Option<PathBuf>,
    /// The output the program must print (else Wrong Answer)
    #[arg(long, value_name = "FILE")]
    pub expected: Option<PathBuf>,
    /// The submission's id (1-64 of A-Z a-z 0-9 _ -); default: a new random one
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
}

/// `code-submit status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// One submission
    #[arg(required_unless_present = "email", conflicts_with = "email")]
    pub id: Option<String>,
    /// Every submission of this address
    #[arg(long, value_name = "E")]
    pub email: Option<String>,
}

fn read_text(what: &str, path: &Path) -> anyhow::Result<String> {
    let meta =
        std::fs::metadata(path).map_err(|e| usage(format!("{what}{}: {e}", path.display())))?;
    if meta.len() > code::MAX_INPUT_BYTES as u64 {
        return Err(usage(format!(
            "{what}{}: {} bytes, more than the {} allowed",
            path.display(),
            meta.len(),
            code::MAX_INPUT_BYTES
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| usage(format!("{what}{}: {e}", path.display())))?;
    String::from_utf8(bytes).map_err(|_| usage(format!("{what}{}: not UTF-8 text", path.display())))
}

struct Local {
    registry: Registry,
    store: Store,
    submissions: Submissions,
    storage: AnyStorage,
}

/// The state database here, or a remote `job-worker serve` (`[jobs] api_url`).
enum Target {
    Local(Box<Local>),
    Remote(jobs::client::Client),
}

async fn target(ctx: &Context) -> anyhow::Result<Target> {
    let registry = Registry::from_config(&ctx.config)?;
    if let Some(c) = jobs::client::Client::from_config(&registry.settings)? {
        return Ok(Target::Remote(c));
    }
    Ok(Target::Local(Box::new(open_local(ctx, registry).await?)))
}

async fn open_local(ctx: &Context, registry: Registry) -> anyhow::Result<Local> {
    let storage =
        code::code_storage(&ctx.config, registry.settings.code_storage.as_deref()).await?;
    let db = labrelay::db::Db::open_state(&ctx.config).await?;
    Ok(Local {
        registry,
        store: Store::new(db.clone()),
        submissions: Submissions::new(db),
        storage,
    })
}

/// Run `code-submit add`.
pub async fn add(a: AddArgs, ctx: &Context) -> anyhow::Result<Exit> {
    let settings = sandbox::Settings::from_config(&ctx.config)?;
    let lang = crate::exec::language_for(&settings, a.language.as_deref(), &a.file)?.clone();
    let source = read_text("", &a.file)?;
    let stdin = a
        .stdin
        .as_deref()
        .map(|p| read_text("--stdin ", p))
        .transpose()?;
    let expected = a
        .expected
        .as_deref()
        .map(|p| read_text("--expected ", p))
        .transpose()?;
    let req = code::AddRequest {
        id: a.id,
        language: lang.key.clone(),
        source,
        email: a.email.clone(),
        stdin,
        expected,
    };
    let l = match target(ctx).await? {
        Target::Remote(c) => {
            let sub = c.add_submission(&req).await?;
            ctx.out.emit(
                "added",
                &serde_json::json!({"id": sub.id, "language": sub.language, "email": sub.email}),
                || sub.id.clone(),
            )?;
            return Ok(Exit::Ok);
        }
        Target::Local(l) => l,
    };
    // A bad address is a usage error before anything is stored; no sender is 78.
    jobs::notify::Notifier::check(&ctx.config, &a.email)?;
    let sub = match code::add(
        &l.submissions,
        &l.storage,
        &settings,
        ctx.config.mail.from.as_deref(),
        req,
        &jobs::current_user(),
    )
    .await
    {
        Ok(s) => s,
        Err(code::AddError::Invalid(m)) => return Err(usage(m)),
        Err(e) => return Err(e.into()),
    };
    ctx.out.emit(
        "added",
        &serde_json::json!({"id": sub.id, "language": sub.language, "email": sub.email, "source": code::link(&l.storage, &sub.source_key)}),
        || sub.id.clone(),
    )?;
    Ok(Exit::Ok)
}

/// Run `code-submit run`.
pub async fn run(id: &str, wait: bool, ctx: &Context) -> anyhow::Result<Exit> {
    let l = match target(ctx).await? {
        Target::Remote(c) => return run_remote(&c, id, wait, ctx).await,
        Target::Local(l) => l,
    };
    let queued = code::queue_run(
        &l.submissions,
        &l.store,
        &l.registry,
        id,
        &jobs::current_user(),
    )
    .await?;
    let job = match queued {
        Queued::NoSuch => anyhow::bail!("no such submission: {id}"),
        Queued::Disabled => anyhow::bail!(
            "submission {id} is disabled after an error; `code-submit enable {id}` allows another run"
        ),
        Queued::Job(j) => j,
    };
    if !wait {
        return emit_queued(ctx, id, job);
    }
    crate::poll(|| async {
        let j = l
            .store
            .get(job)
            .await?
            .ok_or(jobs::JobError::NoSuchJob(job))?;
        Ok(j.is_finished().then_some(()))
    })
    .await?;
    let sub = l
        .submissions
        .get(id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no such submission: {id}"))?;
    let sub = l.submissions.settle(&l.store, sub).await?;
    let accepted = sub.status == sandbox::Status::Accepted.as_str();
    let source_link = code::link(&l.storage, &sub.source_key);
    ctx.out
        .emit("submission", &sub.record(&source_link), || sub.line())?;
    Ok(if accepted { Exit::Ok } else { Exit::Failed })
}

/// The answer of `run` without `--wait`: the job that will run the submission.
fn emit_queued(ctx: &Context, id: &str, job: i64) -> anyhow::Result<Exit> {
    ctx.out
        .emit("queued", &serde_json::json!({"id": id, "job": job}), || {
            job.to_string()
        })?;
    Ok(Exit::Ok)
}

/// `code-submit run` through a remote `job-worker serve`.
async fn run_remote(
    c: &jobs::client::Client,
    id: &str,
    wait: bool,
    ctx: &Context,
) -> anyhow::Result<Exit> {
    let job = c.run_submission(id).await?;
    if !wait {
        return emit_queued(ctx, id, job);
    }
    crate::poll(|| async {
        let j = c.job(job).await?;
        let state = j.get("state").and_then(serde_json::Value::as_str);
        Ok((!matches!(state, Some(jobs::store::QUEUED | jobs::store::RUNNING))).then_some(()))
    })
    .await?;
    let v = c.submission(id).await?;
    emit_remote(ctx, &v)?;
    Ok(if v["status"] == sandbox::Status::Accepted.as_str() {
        Exit::Ok
    } else {
        Exit::Failed
    })
}

/// A submission record from a remote server, as `status` prints one.
fn emit_remote(ctx: &Context, v: &serde_json::Value) -> anyhow::Result<()> {
    let line = serde_json::from_value::<code::Submission>(v.clone())
        .map_or_else(|_| v.to_string(), |s| s.line());
    ctx.out.emit("submission", v, || line.clone())?;
    Ok(())
}

/// Run `code-submit status`.
pub async fn status(a: StatusArgs, ctx: &Context) -> anyhow::Result<Exit> {
    let l = match target(ctx).await? {
        Target::Remote(c) => {
            let list = if let Some(id) = &a.id {
                vec![c.submission(id).await?]
            } else {
                c.submissions(a.email.as_deref().unwrap_or_default())
                    .await?
            };
            for v in &list {
                emit_remote(ctx, v)?;
            }
            return Ok(Exit::Ok);
        }
        Target::Local(l) => l,
    };
    let list = if let Some(id) = &a.id {
        vec![
            l.submissions
                .get(id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no such submission: {id}"))?,
        ]
    } else {
        l.submissions
            .by_email(a.email.as_deref().unwrap_or_default())
            .await?
    };
    for s in list {
        let s = l.submissions.settle(&l.store, s).await?;
        let source_link = code::link(&l.storage, &s.source_key);
        ctx.out
            .emit("submission", &s.record(&source_link), || s.line())?;
    }
    Ok(Exit::Ok)
}

/// Run `code-submit enable`.
pub async fn enable(id: &str, ctx: &Context) -> anyhow::Result<Exit> {
    match target(ctx).await? {
        Target::Remote(c) => {
            c.enable_submission(id).await?;
        }
        Target::Local(l) => {
            if !l.submissions.enable(id).await? {
                anyhow::bail!("no such submission: {id}");
            }
        }
    }
    ctx.out
        .emit("enabled", &serde_json::json!({"id": id}), || {
            format!("{id} enabled")
        })?;
    Ok(Exit::Ok)
}
