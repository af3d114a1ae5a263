//! `code-submit add / run / status / enable`: code submissions in the state database,
//! their sources in the code storage, runs as jobs of the built-in task `code`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jobs::Registry;
use jobs::api::SubmitRequest;
use jobs::code::{self, NewSubmission, Queued, Submissions};
use jobs::store::Store;
use labrelay::cli::Context;
use labrelay::exit::Exit;
use labrelay::storage::{AnyStorage, ObjectStorage as _};

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

fn read_limited(what: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
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
    std::fs::read(path).map_err(|e| usage(format!("{what}{}: {e}", path.display())))
}

fn read_text(what: &str, path: &Path) -> anyhow::Result<String> {
    String::from_utf8(read_limited(what, path)?)
        .map_err(|_| usage(format!("{what}{}: not UTF-8 text", path.display())))
}

struct Local {
    registry: Registry,
    store: Store,
    submissions: Submissions,
    storage: AnyStorage,
}

async fn open(ctx: &Context) -> anyhow::Result<Local> {
    let registry = Registry::from_config(&ctx.config)?;
    if registry.settings.api_url.is_some() {
        return Err(usage(
            "add, run, status and enable work on the state database; with [jobs] api_url \
             use the HTTP API of `job-worker serve` (/v1/submissions)",
        ));
    }
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

fn link(storage: &AnyStorage, key: &str) -> String {
    format!("{}/{key}", storage.url().trim_end_matches('/'))
}

/// Run `code-submit add`.
pub async fn add(a: AddArgs, ctx: &Context) -> anyhow::Result<Exit> {
    let settings = sandbox::Settings::from_config(&ctx.config)?;
    let lang = crate::exec::language_for(&settings, a.language.as_deref(), &a.file)?;
    jobs::notify::Notifier::check(&ctx.config, &a.email)?;
    let id = match a.id {
        Some(id) if code::valid_id(&id) => id,
        Some(id) => {
            return Err(usage(format!(
                "--id {id:?}: an id is 1-64 of A-Z a-z 0-9 _ -"
            )));
        }
        None => code::new_id(),
    };
    let source = read_limited("", &a.file)?;
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
    let l = open(ctx).await?;
    if l.submissions.get(&id).await?.is_some() {
        anyhow::bail!("submission {id} exists already");
    }
    let key = format!("{id}.{}", lang.extension());
    // The source first: a row never names a source that is not there.
    l.storage.put_bytes(&key, source.into()).await?;
    let created = l
        .submissions
        .insert(&NewSubmission {
            id: id.clone(),
            email: a.email.clone(),
            language: lang.key.clone(),
            source_key: key.clone(),
            stdin,
            expected,
            submitter: jobs::current_user(),
        })
        .await?;
    if !created {
        anyhow::bail!("submission {id} exists already");
    }
    ctx.out.emit(
        "added",
        &serde_json::json!({"id": id, "language": lang.key, "email": a.email, "source": link(&l.storage, &key)}),
        || id.clone(),
    )?;
    Ok(Exit::Ok)
}

/// Run `code-submit run`.
pub async fn run(id: &str, wait: bool, ctx: &Context) -> anyhow::Result<Exit> {
    let l = open(ctx).await?;
    let Some(sub) = l.submissions.get(id).await? else {
        anyhow::bail!("no such submission: {id}");
    };
    let queued = l
        .submissions
        .queue(id, |args, key| {
            let req = SubmitRequest {
                task: code::CODE.into(),
                args,
                unique_key: Some(key),
                run_at: None,
                priority: 0,
                email: Some(sub.email.clone()),
                webhook: None,
            };
            let store = l.store.clone();
            let job = l.registry.new_job(&req, &jobs::current_user());
            async move {
                let job = job.map_err(usage)?;
                Ok(store.submit(&job).await?.0)
            }
        })
        .await?;
    let job = match queued {
        Queued::NoSuch => anyhow::bail!("no such submission: {id}"),
        Queued::Disabled => anyhow::bail!(
            "submission {id} is disabled after an error; `code-submit enable {id}` allows another run"
        ),
        Queued::Job(j) => j,
    };
    if !wait {
        ctx.out
            .emit("queued", &serde_json::json!({"id": id, "job": job}), || {
                job.to_string()
            })?;
        return Ok(Exit::Ok);
    }
    let mut pause = Duration::from_millis(50);
    loop {
        let j = l
            .store
            .get(job)
            .await?
            .ok_or(jobs::JobError::NoSuchJob(job))?;
        if j.is_finished() {
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
    let sub = l
        .submissions
        .get(id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no such submission: {id}"))?;
    let accepted = sub.status == sandbox::Status::Accepted.as_str();
    let source_link = link(&l.storage, &sub.source_key);
    ctx.out
        .emit("submission", &sub.record(&source_link), || sub.line())?;
    Ok(if accepted { Exit::Ok } else { Exit::Failed })
}

/// Run `code-submit status`.
pub async fn status(a: StatusArgs, ctx: &Context) -> anyhow::Result<Exit> {
    let l = open(ctx).await?;
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
    for s in &list {
        let source_link = link(&l.storage, &s.source_key);
        ctx.out
            .emit("submission", &s.record(&source_link), || s.line())?;
    }
    Ok(Exit::Ok)
}

/// Run `code-submit enable`.
pub async fn enable(id: &str, ctx: &Context) -> anyhow::Result<Exit> {
    let l = open(ctx).await?;
    if !l.submissions.enable(id).await? {
        anyhow::bail!("no such submission: {id}");
    }
    ctx.out
        .emit("enabled", &serde_json::json!({"id": id}), || {
            format!("{id} enabled")
        })?;
    Ok(Exit::Ok)
}
