//! The one runner of external programs: vendor CLI steps ([`crate::vendor`]), the
//! account command ([`crate::access`]) and the lookup command ([`crate::lookup`]).
//!
//! A command is an argv (expanded from an [`crate::template::ArgvTemplate`]), never a
//! shell line. The runner:
//! - refuses a command line that contains one of the secrets it passes (defence in
//!   depth: templates cannot name a secret, but a literal or a value from the LIMS
//!   could equal one);
//! - passes secrets only as environment variables of the child; the child otherwise
//!   inherits the tool's environment, as it always has;
//! - closes stdin, reads stdout and stderr as they come: by default it logs each line
//!   at debug (secrets scrubbed) and keeps the last [`TAIL_BYTES`] for the error
//!   message; a caller that wants stdout as data ([`Invocation::capture_stdout`]) gets
//!   it whole up to a limit, and it is then never logged (it may hold a password);
//! - kills the command after its timeout (exit 75);
//! - maps the exit status to ours ([`CommandError::exit`]): an error names the step,
//!   the program and the exit code or signal, with the last lines it printed.
//!
//! It does not decide what to run or with which values: that is the templates' and
//! their owners' business.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use labrelay::exit::Exit;
use labrelay::secret::{Secret, SecretError, SecretSpec, scrub};
use tokio::io::AsyncReadExt as _;

use crate::template::TemplateError;

/// Bytes of each output stream kept for error messages (the rest is only logged).
pub const TAIL_BYTES: usize = 16 * 1024;

/// How long to wait for the output pipes to close after the process exited: a
/// grandchild the program left behind may hold them open.
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// Errors of external commands (vendor steps, access and lookup commands). None of
/// them contains a secret: output quoted in them is scrubbed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// A template or setting is unusable (exit 78). `key` is the configuration key.
    #[error("invalid configuration {key}: {message}")]
    Config {
        /// The configuration key, e.g. `delivery.targets.online.vendor.steps.upload`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A secret of the `env` table could not be resolved (exit 78).
    #[error("{key}: {source}")]
    Secret {
        /// The configuration key of the secret.
        key: String,
        /// Why.
        source: SecretError,
    },
    /// The program does not exist or may not be executed (exit 78).
    #[error("step `{step}`: cannot run {program}: {source}")]
    NotFound {
        /// The step.
        step: String,
        /// argv\[0\].
        program: String,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// Starting or waiting for the process failed otherwise (exit 1).
    #[error("step `{step}`: running {program} failed: {source}")]
    Spawn {
        /// The step.
        step: String,
        /// argv\[0\].
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The command exited with a non-zero code (exit 75 when the code is listed in
    /// `temporary_exit_codes`, else 1).
    #[error("step `{step}` ({program}) exited with code {code}{}", detail(.output))]
    Failed {
        /// The step.
        step: String,
        /// argv\[0\].
        program: String,
        /// Its exit code.
        code: i32,
        /// Whether the code is configured as temporary.
        temporary: bool,
        /// The last lines it printed (stderr, else stdout), secrets scrubbed.
        output: String,
    },
    /// The command was killed by a signal (exit 1).
    #[error("step `{step}` ({program}) was killed by signal {signal}{}", detail(.output))]
    Signal {
        /// The step.
        step: String,
        /// argv\[0\].
        program: String,
        /// The signal number.
        signal: i32,
        /// The last lines it printed, secrets scrubbed.
        output: String,
    },
    /// The command ran longer than its limit and was killed (exit 75).
    #[error("step `{step}` ({program}) did not finish within {secs} s and was killed")]
    Timeout {
        /// The step.
        step: String,
        /// argv\[0\].
        program: String,
        /// The limit.
        secs: u64,
    },
    /// The command printed more on stdout than the caller reads as data (exit 1).
    #[error("step `{step}` ({program}) printed more than {limit} bytes on stdout")]
    TooMuchOutput {
        /// The step.
        step: String,
        /// argv\[0\].
        program: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// A value for a placeholder cannot be passed safely (exit 1): it starts with `-`
    /// where the command would take it for an option, contains a control character, or
    /// is a path that is not UTF-8.
    #[error("step `{step}`: value of {{{placeholder}}} refused: {reason}")]
    BadValue {
        /// The step.
        step: String,
        /// The placeholder.
        placeholder: String,
        /// Why.
        reason: String,
    },
    /// An expanded command line would contain a secret's value (exit 78); it was not run.
    #[error(
        "step `{step}`: the command line would contain a secret value; secrets are passed only in environment variables"
    )]
    SecretInArgv {
        /// The step.
        step: String,
    },
}

fn detail(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!(": {output}")
    }
}

impl CommandError {
    /// Exit status: unusable configuration 78, timeouts and configured temporary codes
    /// 75, anything else 1.
    pub fn exit(&self) -> Exit {
        match self {
            CommandError::Config { .. }
            | CommandError::Secret { .. }
            | CommandError::NotFound { .. }
            | CommandError::SecretInArgv { .. } => Exit::Config,
            CommandError::Timeout { .. } => Exit::TempFail,
            CommandError::Failed { temporary, .. } => {
                if *temporary {
                    Exit::TempFail
                } else {
                    Exit::Failed
                }
            }
            CommandError::Spawn { .. }
            | CommandError::Signal { .. }
            | CommandError::TooMuchOutput { .. }
            | CommandError::BadValue { .. } => Exit::Failed,
        }
    }
}

impl labrelay::exit::ExitClass for CommandError {
    fn exit_class(&self) -> Exit {
        self.exit()
    }
}
labrelay::exit_class!(CommandError);

impl From<TemplateError> for CommandError {
    /// A template that does not parse is a configuration error naming its key; a
    /// value refused at expansion is [`CommandError::BadValue`].
    fn from(e: TemplateError) -> Self {
        match e {
            TemplateError::Invalid { name, message, .. } => {
                CommandError::Config { key: name, message }
            }
            TemplateError::BadValue {
                step,
                placeholder,
                reason,
            } => CommandError::BadValue {
                step,
                placeholder,
                reason,
            },
        }
    }
}

/// Check an environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub(crate) fn check_env_name(key: &str, name: &str) -> Result<(), CommandError> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(CommandError::Config {
            key: key.to_owned(),
            message: format!(
                "{name:?} is not an environment variable name (letters, digits, _; not starting with a digit)"
            ),
        })
    }
}

/// Resolve an `env` table of secrets now, so a missing one fails at start-up.
pub(crate) fn resolve_env(
    key: &str,
    env: &BTreeMap<String, SecretSpec>,
) -> Result<Vec<(String, Secret)>, CommandError> {
    env.iter()
        .map(|(name, spec)| {
            let k = format!("{key}.env.{name}");
            check_env_name(&k, name)?;
            let secret = spec
                .resolve()
                .map_err(|source| CommandError::Secret { key: k, source })?;
            Ok((name.clone(), secret))
        })
        .collect()
}

/// What a command printed: the tails of both streams, scrubbed.
#[derive(Debug, Clone, Default)]
struct Output {
    stdout: String,
    stderr: String,
}

impl Output {
    /// The last few lines, stderr first (that is where programs explain themselves).
    fn summary(&self) -> String {
        let pick = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let lines: Vec<&str> = pick
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
        if tail.chars().count() > 400 {
            let skip = tail.chars().count() - 400;
            format!("…{}", tail.chars().skip(skip).collect::<String>())
        } else {
            tail
        }
    }
}

/// One command to run.
#[derive(Debug)]
pub(crate) struct Invocation<'a> {
    /// Step name, for logs and errors.
    pub(crate) step: &'a str,
    /// The expanded command line.
    pub(crate) argv: Vec<String>,
    /// Secrets for the child's environment (name, value).
    pub(crate) env: Vec<(&'a str, &'a Secret)>,
    /// Kill the command after this long.
    pub(crate) timeout: Option<Duration>,
    /// Exit codes meaning "temporary".
    pub(crate) temporary_codes: &'a [i32],
    /// Working directory.
    pub(crate) workdir: Option<&'a Path>,
    /// Read stdout as data, up to this many bytes (more is an error): it is returned in
    /// [`Finished::stdout`], never logged, and never quoted in errors.
    pub(crate) capture_stdout: Option<usize>,
}

/// A finished command: exit code 0, or a non-zero code when `allow_failure`.
#[derive(Debug)]
pub(crate) struct Finished {
    /// The exit code.
    pub(crate) code: i32,
    /// Wall-clock time.
    pub(crate) millis: u64,
    /// stdout, when [`Invocation::capture_stdout`] asked for it.
    pub(crate) stdout: Vec<u8>,
}

/// Run a command. With `allow_failure`, a non-zero exit code that is not a temporary
/// one is returned as `Ok` (for probe steps such as `project_exists`).
pub(crate) async fn run(
    inv: Invocation<'_>,
    allow_failure: bool,
) -> Result<Finished, CommandError> {
    let step = inv.step.to_owned();
    let program = inv.argv.first().cloned().unwrap_or_default();
    // Defence in depth: the templates cannot name a secret, but a literal written into
    // the configuration or a value from the LIMS could still equal one.
    if inv
        .argv
        .iter()
        .any(|a| inv.env.iter().any(|(_, s)| contains_secret(a, s)))
    {
        return Err(CommandError::SecretInArgv { step });
    }
    let shown = scrub(&inv.argv.join(" ")).into_owned();
    tracing::debug!(step = %step, command = %shown, "running external command");

    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&inv.argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (name, secret) in &inv.env {
        cmd.env(name, secret.expose());
    }
    if let Some(dir) = inv.workdir {
        cmd.current_dir(dir);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| {
        if matches!(
            source.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
        ) {
            CommandError::NotFound {
                step: step.clone(),
                program: program.clone(),
                source,
            }
        } else {
            CommandError::Spawn {
                step: step.clone(),
                program: program.clone(),
                source,
            }
        }
    })?;
    let out_task = child
        .stdout
        .take()
        .map(|s| tokio::spawn(read_stream(s, step.clone(), "stdout", inv.capture_stdout)));
    let err_task = child
        .stderr
        .take()
        .map(|s| tokio::spawn(read_stream(s, step.clone(), "stderr", None)));

    let waited = match inv.timeout {
        Some(t) => tokio::time::timeout(t, child.wait()).await.ok(),
        None => Some(child.wait().await),
    };
    let status = if let Some(status) = waited {
        status.map_err(|source| CommandError::Spawn {
            step: step.clone(),
            program: program.clone(),
            source,
        })?
    } else {
        let _ = child.start_kill();
        let _ = child.wait().await;
        if let Some(t) = out_task {
            t.abort();
        }
        if let Some(t) = err_task {
            t.abort();
        }
        return Err(CommandError::Timeout {
            step,
            program,
            secs: inv.timeout.map_or(0, |t| t.as_secs()),
        });
    };
    let stdout = collect(out_task).await;
    let stderr = collect(err_task).await;
    let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    tracing::debug!(step = %step, status = %status, millis, "external command finished");
    let (captured, stdout_tail) = match (inv.capture_stdout, stdout) {
        (Some(limit), Some(s)) if s.overflow => {
            return Err(CommandError::TooMuchOutput {
                step,
                program,
                limit,
            });
        }
        // Captured stdout is data (it may hold a password): never quoted in errors.
        (Some(_), Some(s)) => (s.bytes, String::new()),
        (Some(_), None) => {
            return Err(CommandError::Spawn {
                step,
                program,
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "its output stayed open after it exited (a process it started holds it)",
                ),
            });
        }
        (None, s) => (Vec::new(), s.map(|s| text_of(&s.bytes)).unwrap_or_default()),
    };
    let output = Output {
        stdout: stdout_tail,
        stderr: stderr.map(|s| text_of(&s.bytes)).unwrap_or_default(),
    };

    match status.code() {
        Some(0) => Ok(Finished {
            code: 0,
            millis,
            stdout: captured,
        }),
        Some(code) => {
            let temporary = inv.temporary_codes.contains(&code);
            if allow_failure && !temporary {
                return Ok(Finished {
                    code,
                    millis,
                    stdout: captured,
                });
            }
            Err(CommandError::Failed {
                step,
                program,
                code,
                temporary,
                output: output.summary(),
            })
        }
        None => {
            use std::os::unix::process::ExitStatusExt as _;
            Err(CommandError::Signal {
                step,
                program,
                signal: status.signal().unwrap_or(0),
                output: output.summary(),
            })
        }
    }
}

fn contains_secret(arg: &str, secret: &Secret) -> bool {
    let v = secret.expose();
    v.len() >= 4 && arg.contains(v)
}

/// Output bytes as text for messages, secrets scrubbed.
fn text_of(bytes: &[u8]) -> String {
    scrub(&String::from_utf8_lossy(bytes)).into_owned()
}

/// What was read from one stream.
#[derive(Debug, Default)]
struct Stream {
    /// The tail (logged streams) or the head up to the limit (captured stdout).
    bytes: Vec<u8>,
    /// A captured stream was longer than its limit.
    overflow: bool,
}

/// The stream read by a task, or `None` when its pipe stayed open past [`PIPE_GRACE`].
async fn collect(task: Option<tokio::task::JoinHandle<Stream>>) -> Option<Stream> {
    let Some(mut task) = task else {
        return Some(Stream::default());
    };
    match tokio::time::timeout(PIPE_GRACE, &mut task).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(_)) => Some(Stream::default()),
        Err(_) => {
            task.abort();
            None
        }
    }
}

/// Read a stream to its end. Logged (no `capture`): each line (split at `\n` or `\r`,
/// as progress bars print) at debug with secrets scrubbed, keeping the last
/// [`TAIL_BYTES`]. Captured: the first `capture` bytes, nothing logged; the rest is
/// read and dropped so the program never blocks on a full pipe.
async fn read_stream<R: tokio::io::AsyncRead + Unpin>(
    mut stream: R,
    step: String,
    which: &'static str,
    capture: Option<usize>,
) -> Stream {
    let mut kept: Vec<u8> = Vec::new();
    let mut overflow = false;
    let mut line: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 8192];
    let log = |line: &[u8]| {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end();
        if !text.is_empty() {
            tracing::debug!(step = %step, stream = which, "{}", scrub(text));
        }
    };
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(limit) = capture {
            let room = limit.saturating_sub(kept.len());
            kept.extend_from_slice(&buf[..n.min(room)]);
            overflow |= n > room;
            continue;
        }
        for &b in &buf[..n] {
            if b == b'\n' || b == b'\r' {
                log(&line);
                line.clear();
            } else if line.len() < 64 * 1024 {
                line.push(b);
            }
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 2 * TAIL_BYTES {
            kept.drain(..kept.len() - TAIL_BYTES);
        }
    }
    if capture.is_none() {
        log(&line);
        if kept.len() > TAIL_BYTES {
            kept.drain(..kept.len() - TAIL_BYTES);
        }
    }
    Stream {
        bytes: kept,
        overflow,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    fn inv<'a>(step: &'a str, argv: &[&str]) -> Invocation<'a> {
        Invocation {
            step,
            argv: s(argv),
            env: vec![],
            timeout: None,
            temporary_codes: &[],
            workdir: None,
            capture_stdout: None,
        }
    }

    #[test]
    fn exit_codes_map_to_ours() {
        let failed = |temporary| CommandError::Failed {
            step: "upload".into(),
            program: "bo".into(),
            code: 3,
            temporary,
            output: "quota exceeded".into(),
        };
        assert_eq!(failed(false).exit(), Exit::Failed);
        assert_eq!(failed(true).exit(), Exit::TempFail);
        let msg = failed(false).to_string();
        assert_eq!(msg, "step `upload` (bo) exited with code 3: quota exceeded");
        let any = anyhow::Error::from(failed(true));
        assert_eq!(labrelay::exit::classify(&any), Exit::TempFail);
        let any = anyhow::Error::from(failed(false)).context("delivering A1");
        assert_eq!(labrelay::exit::classify(&any), Exit::Failed);
        // Template errors keep their class: a bad template is configuration.
        let bad = CommandError::from(TemplateError::Invalid {
            name: "k".into(),
            line: None,
            message: "m".into(),
        });
        assert_eq!(bad.exit(), Exit::Config);
        assert_eq!(bad.to_string(), "invalid configuration k: m");
    }

    #[tokio::test]
    async fn a_secret_in_a_literal_argument_is_never_run() {
        let secret = Secret::new("very-secret-token-1234");
        let mut i = inv("login", &["/bin/true", "--token", "very-secret-token-1234"]);
        i.env = vec![("BO_TOKEN", &secret)];
        let err = run(i, false).await.unwrap_err();
        assert!(matches!(err, CommandError::SecretInArgv { .. }));
        assert!(!err.to_string().contains("very-secret"));
    }

    #[tokio::test]
    async fn output_is_scrubbed_and_timeouts_are_temporary() {
        let secret = Secret::new("pw-that-leaks-9876");
        let mut i = inv(
            "create_user",
            &["/bin/sh", "-c", "echo \"bad password $P\" >&2; exit 4"],
        );
        i.env = vec![("P", &secret)];
        i.temporary_codes = &[75];
        let err = run(i, false).await.unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains("pw-that-leaks"), "{msg}");
        assert_eq!(
            msg,
            "step `create_user` (/bin/sh) exited with code 4: bad password ****"
        );

        let mut i = inv("upload", &["/bin/sleep", "10"]);
        i.timeout = Some(Duration::from_millis(200));
        let err = run(i, false).await.unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        assert_eq!(err.exit(), Exit::TempFail);

        let err = run(inv("login", &["/nonexistent/bo"]), false)
            .await
            .unwrap_err();
        assert_eq!(err.exit(), Exit::Config, "{err}");
        assert!(err.to_string().contains("/nonexistent/bo"), "{err}");
    }

    #[tokio::test]
    async fn temporary_codes_probes_and_signals() {
        let mut i = inv("lookup", &["/bin/sh", "-c", "exit 75"]);
        i.temporary_codes = &[75];
        let err = run(i, true).await.unwrap_err();
        assert_eq!(err.exit(), Exit::TempFail, "{err}");
        // A probe's non-temporary code is an answer.
        let done = run(inv("project_exists", &["/bin/sh", "-c", "exit 3"]), true)
            .await
            .unwrap();
        assert_eq!(done.code, 3);
        let err = run(inv("x", &["/bin/sh", "-c", "kill -9 $$"]), false)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "step `x` (/bin/sh) was killed by signal 9");
        assert_eq!(err.exit(), Exit::Failed);
    }

    #[tokio::test]
    async fn captured_stdout_is_data_never_quoted_and_capped() {
        let mut i = inv(
            "lookup",
            &["/bin/sh", "-c", "printf '{\"customer_password\":\"pw\"}'"],
        );
        i.capture_stdout = Some(1024);
        let done = run(i, false).await.unwrap();
        assert_eq!(done.stdout, br#"{"customer_password":"pw"}"#);

        // On failure the error quotes stderr only, never the captured data.
        let mut i = inv("lookup", &["/bin/sh", "-c", "echo secret-row-data; exit 2"]);
        i.capture_stdout = Some(1024);
        let err = run(i, false).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "step `lookup` (/bin/sh) exited with code 2"
        );
        // Without capture, stdout is the fallback when stderr is silent.
        let err = run(inv("x", &["/bin/sh", "-c", "echo said; exit 2"]), false)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "step `x` (/bin/sh) exited with code 2: said"
        );

        let mut i = inv("lookup", &["/bin/sh", "-c", "head -c 5000 /dev/zero"]);
        i.capture_stdout = Some(100);
        let err = run(i, false).await.unwrap_err();
        assert!(
            matches!(err, CommandError::TooMuchOutput { limit: 100, .. }),
            "{err}"
        );
    }
}
