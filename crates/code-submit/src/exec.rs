//! `code-submit exec` (one run in the sandbox, no queue, no database) and
//! `code-submit languages`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use labrelay::cli::Context;
use labrelay::exit::Exit;
use sandbox::{Sandbox, Settings, Status};

/// `code-submit exec`.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The source file
    pub file: PathBuf,
    /// Its language (`code-submit languages`); default: from the file's extension
    #[arg(long, short = 'l', value_name = "L")]
    pub language: Option<String>,
    /// stdin of the program (default: empty)
    #[arg(long, value_name = "FILE")]
    pub stdin: Option<PathBuf>,
    /// The output the program must print (else Wrong Answer)
    #[arg(long, value_name = "FILE")]
    pub expected: Option<PathBuf>,
    /// CPU time limit of the run, seconds (wall-clock: twice this plus one)
    #[arg(long, value_name = "S")]
    pub time_limit: Option<f64>,
    /// Memory limit of the run, MiB
    #[arg(long, value_name = "M")]
    pub memory_mib: Option<u64>,
}

fn usage(m: impl Into<String>) -> anyhow::Error {
    labrelay::exit::usage(m)
}

/// The language of `file`: `given`, or the one whose source file has its extension.
pub fn language_for<'s>(
    settings: &'s Settings,
    given: Option<&str>,
    file: &Path,
) -> anyhow::Result<&'s sandbox::Language> {
    if let Some(l) = given {
        return settings.language(l).map_err(usage);
    }
    let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
    let found: Vec<_> = settings
        .languages
        .values()
        .filter(|l| !ext.is_empty() && l.extension().eq_ignore_ascii_case(ext))
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(usage(format!(
            "{}: no language for the extension `{ext}`: give --language",
            file.display()
        ))),
        _ => Err(usage(format!(
            "{}: several languages use `.{ext}`: give --language",
            file.display()
        ))),
    }
}

fn read(what: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| usage(format!("{what} {}: {e}", path.display())))
}

/// Run `code-submit exec`.
pub async fn exec(args: ExecArgs, ctx: &Context) -> anyhow::Result<Exit> {
    let settings = Settings::from_config(&ctx.config)?;
    let lang = language_for(&settings, args.language.as_deref(), &args.file)?.clone();
    let source = read("", &args.file)?;
    let stdin = args
        .stdin
        .as_deref()
        .map(|p| read("--stdin", p))
        .transpose()?;
    let expected = args
        .expected
        .as_deref()
        .map(|p| read("--expected", p))
        .transpose()?;
    let mut limits = lang.limits;
    if let Some(t) = args.time_limit {
        if !(t.is_finite() && t > 0.0 && t <= 86_400.0) {
            return Err(usage(format!(
                "--time-limit {t}: must be between 0 and 86400"
            )));
        }
        limits.time_secs = t;
        limits.wall_secs = t * 2.0 + 1.0;
    }
    if let Some(m) = args.memory_mib {
        if m < 8 {
            return Err(usage(format!("--memory-mib {m}: must be at least 8")));
        }
        limits.memory_mib = m;
    }
    let local = if lang.remote.is_some() {
        Err("the language runs remotely".to_owned())
    } else {
        tokio::task::spawn_blocking(move || Sandbox::new(settings).map(Arc::new)).await?
    };
    let report = jobs::engine::execute(
        local,
        lang,
        jobs::engine::Input {
            source,
            stdin,
            expected,
            limits,
        },
        Arc::new(AtomicBool::new(false)),
    )
    .await;
    if ctx.out.is_json() {
        ctx.out.record("exec", &report)?;
    } else {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        out.write_all(report.stdout.as_bytes())?;
        out.flush()?;
        let mut err = std::io::stderr().lock();
        if !report.compile_output.is_empty() && report.status == Status::CompilationError {
            err.write_all(report.compile_output.as_bytes())?;
        }
        err.write_all(report.stderr.as_bytes())?;
        writeln!(err, "{}", report.summary())?;
    }
    Ok(if report.status == Status::Accepted {
        Exit::Ok
    } else {
        Exit::Failed
    })
}

/// Run `code-submit languages`.
pub fn languages(ctx: &Context) -> anyhow::Result<Exit> {
    let settings = Settings::from_config(&ctx.config)?;
    for l in settings.languages.values() {
        let at = l.installed(&settings.sandbox.path);
        let rec = serde_json::json!({
            "language": l.key,
            "name": l.name,
            "source": l.source,
            "installed": at.is_some(),
            "program": at.as_ref().map_or_else(|| l.tool().to_owned(), |p| p.display().to_string()),
            "compile": l.compile,
            "run": l.run,
            "limits": l.limits,
        });
        ctx.out.emit("language", &rec, || {
            format!(
                "{:<12} {:<22} {}",
                l.key,
                l.name,
                at.as_ref().map_or_else(
                    || format!("not installed ({} not found)", l.tool()),
                    |p| p.display().to_string()
                )
            )
        })?;
    }
    Ok(Exit::Ok)
}
