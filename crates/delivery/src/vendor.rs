//! The fourth target kind: a vendor's command-line client (`bo`-style) run step by
//! step from argv templates, and the external-command runner that [`crate::access`]
//! reuses for account-creating commands.
//!
//! The seed delivered through the vendor CLI `bo`:
//!
//! ```text
//! bo login --token ****** --noprojects
//! bo select V3fmjM                  # "Could not find a project" → create it
//! bo new project V3fmjM
//! bo mkdir PROJECT:/6cLB4ma
//! bo upload -c 5 -f /nas1/…/6cLB4ma/result/upload PROJECT:/6cLB4ma/
//! bo new delivery_user -p 2vXfofO -d 30 807729670online
//! bo set_permission -p PROJECT 807729670online dv
//! ```
//!
//! Here each of those steps is an argv template in the configuration ([`VendorSteps`]),
//! with placeholders such as `{project}`, `{analysis_id}`, `{local_dir}`, `{user}`,
//! `{days}` ([`placeholders`] lists them per step). This module owns:
//! - parsing and checking the templates when the configuration is loaded: unknown
//!   placeholders are refused, and so is any placeholder that would put a secret on a
//!   command line (`{password}`, `{token}`, or the name of a configured secret
//!   variable): a command line is readable by every user of the machine through `ps`;
//! - running a step with no shell, the secrets (the vendor token, the customer's
//!   generated password) in environment variables of the child only, stdin closed,
//!   stdout/stderr read as they come, logged at debug with secrets scrubbed, a timeout;
//! - mapping the exit status to ours ([`CommandError::exit`]): a non-zero code is a
//!   failure naming the step and the code, or a temporary failure (75) for the codes
//!   listed in `temporary_exit_codes`.
//!
//! A vendor CLI that only accepts its token as an argument must be wrapped (a script
//! reading the variable); the exposure is then the vendor's, never ours.
//!
//! It must not decide what is delivered or when: the delivery engine calls
//! [`VendorTarget::deliver`] with the folder it has checked, then
//! [`crate::access`] calls [`VendorTarget::create_user`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use labrelay::exit::Exit;
use labrelay::secret::{Secret, SecretError, SecretSpec, scrub};
use serde::Deserialize;
use tokio::io::AsyncReadExt as _;

/// Environment variable in which `create_user` receives the customer's password,
/// unless `password_env` names another one.
pub const DEFAULT_PASSWORD_ENV: &str = "LABRELAY_VENDOR_PASSWORD";

/// Default limit for every step but `upload` (seconds).
pub const DEFAULT_STEP_TIMEOUT_SECS: u64 = 300;

/// Bytes of each output stream kept for error messages (the rest is only logged).
const TAIL_BYTES: usize = 16 * 1024;

/// How long to wait for the output pipes to close after the process exited: a
/// grandchild the vendor CLI left behind may hold them open.
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// Errors of external commands (vendor steps and access commands). None of them
/// contains a secret: output quoted in them is scrubbed.
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
            | CommandError::BadValue { .. } => Exit::Failed,
        }
    }

    /// The same error wrapped so that `labrelay::exit::classify` maps it to
    /// [`CommandError::exit`] (it only knows labrelay's own error types).
    pub fn into_anyhow(self) -> anyhow::Error {
        labrelay::exit::tagged(self.exit(), self.to_string())
    }
}

// ---------------------------------------------------------------------------------
// Argv templates.

/// Names that may never be placeholders: their values are secrets.
const SECRET_WORDS: &[&str] = &["password", "passwd", "token", "secret", "credential"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Var(String),
}

/// A command line template: argv\[0\] is a literal program, every other element a mix
/// of literal text and `{name}` placeholders (`{{` and `}}` stand for literal braces).
/// Expanded elements are passed to the program as they are: there is no shell, so no
/// quoting, globbing or word splitting happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgvTemplate {
    key: String,
    args: Vec<Vec<Piece>>,
}

/// Values for placeholders.
pub type Vars = BTreeMap<&'static str, String>;

impl ArgvTemplate {
    /// Parse `argv` (configuration key `key`, for messages), accepting only the
    /// placeholders in `allowed`. A placeholder naming a secret — `{password}`,
    /// `{token}`, anything containing those words, or one of `secret_env` (names of
    /// variables that carry secrets) — is refused with a message saying where the
    /// command finds the value instead.
    pub fn parse(
        key: &str,
        argv: &[String],
        allowed: &[&str],
        secret_env: &[&str],
    ) -> Result<ArgvTemplate, CommandError> {
        let err = |message: String| CommandError::Config {
            key: key.to_owned(),
            message,
        };
        let Some(program) = argv.first() else {
            return Err(err(
                "the command is empty; give [\"program\", \"arg\", …]".into()
            ));
        };
        if program.is_empty() {
            return Err(err("the program (first element) is empty".into()));
        }
        let mut parsed = Vec::with_capacity(argv.len());
        for (i, raw) in argv.iter().enumerate() {
            let pieces = parse_pieces(raw).map_err(|m| err(format!("element {i} {raw:?}: {m}")))?;
            for p in &pieces {
                let Piece::Var(name) = p else { continue };
                if i == 0 {
                    return Err(err(format!(
                        "the program (first element) must be literal, not {{{name}}}"
                    )));
                }
                let lower = name.to_ascii_lowercase();
                if SECRET_WORDS.iter().any(|w| lower.contains(w))
                    || secret_env.iter().any(|e| e.eq_ignore_ascii_case(name))
                {
                    let hint = if secret_env.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; this command receives its secrets in the environment variable(s) {}",
                            secret_env.join(", ")
                        )
                    };
                    return Err(err(format!(
                        "{{{name}}} would put a secret on the command line, where any user of the machine can read it (ps); secrets are passed only in environment variables{hint}. If the program accepts a secret only as an argument, wrap it in a script that reads the variable"
                    )));
                }
                if !allowed.contains(&name.as_str()) {
                    return Err(err(format!(
                        "unknown placeholder {{{name}}}; this command may use {}",
                        if allowed.is_empty() {
                            "none".to_owned()
                        } else {
                            allowed
                                .iter()
                                .map(|a| format!("{{{a}}}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    )));
                }
            }
            parsed.push(pieces);
        }
        Ok(ArgvTemplate {
            key: key.to_owned(),
            args: parsed,
        })
    }

    /// A one-line text template (an account name, a directory shown in mail) with the
    /// same placeholder syntax; expand it with [`ArgvTemplate::expand_text`].
    pub fn text(key: &str, text: &str, allowed: &[&str]) -> Result<ArgvTemplate, CommandError> {
        ArgvTemplate::parse(key, &["text".to_owned(), text.to_owned()], allowed, &[])
    }

    /// Expand a template made by [`ArgvTemplate::text`].
    pub fn expand_text(&self, what: &str, vars: &Vars) -> Result<String, CommandError> {
        Ok(self.expand(what, vars)?.pop().unwrap_or_default())
    }

    /// The configuration key the template came from.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// argv\[0\].
    pub fn program(&self) -> String {
        self.args
            .first()
            .map(|p| render_literal(p))
            .unwrap_or_default()
    }

    /// Placeholders the template uses.
    pub fn placeholders(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .args
            .iter()
            .flatten()
            .filter_map(|p| match p {
                Piece::Var(n) => Some(n.as_str()),
                Piece::Lit(_) => None,
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Expand with `vars`. A value is refused when it contains a control character,
    /// or when it starts an element and begins with `-` (the program would read it as
    /// an option: a project named `--delete` must not become a flag).
    pub fn expand(&self, step: &str, vars: &Vars) -> Result<Vec<String>, CommandError> {
        let bad = |placeholder: &str, reason: &str| CommandError::BadValue {
            step: step.to_owned(),
            placeholder: placeholder.to_owned(),
            reason: reason.to_owned(),
        };
        let mut out = Vec::with_capacity(self.args.len());
        for pieces in &self.args {
            let mut s = String::new();
            for (j, p) in pieces.iter().enumerate() {
                match p {
                    Piece::Lit(l) => s.push_str(l),
                    Piece::Var(name) => {
                        let v = vars
                            .get(name.as_str())
                            .ok_or_else(|| bad(name, "no value is known for it in this step"))?;
                        if v.chars().any(char::is_control) {
                            return Err(bad(name, "it contains a control character"));
                        }
                        if j == 0 && v.starts_with('-') {
                            return Err(bad(
                                name,
                                "it starts with `-` and would be read as an option",
                            ));
                        }
                        s.push_str(v);
                    }
                }
            }
            out.push(s);
        }
        Ok(out)
    }
}

fn render_literal(pieces: &[Piece]) -> String {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Lit(l) => l.clone(),
            Piece::Var(v) => format!("{{{v}}}"),
        })
        .collect()
}

fn parse_pieces(raw: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                lit.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) if c.is_ascii_alphanumeric() || c == '_' => name.push(c),
                        Some(c) => {
                            return Err(format!(
                                "`{c}` inside a placeholder; write {{name}} with letters, digits and _, or {{{{ for a literal brace"
                            ));
                        }
                        None => return Err("unclosed `{`".into()),
                    }
                }
                if name.is_empty() {
                    return Err("empty placeholder {}".into());
                }
                if !lit.is_empty() {
                    pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                }
                pieces.push(Piece::Var(name));
            }
            '}' => return Err("unmatched `}`; write }} for a literal brace".into()),
            c => lit.push(c),
        }
    }
    if !lit.is_empty() || pieces.is_empty() {
        pieces.push(Piece::Lit(lit));
    }
    Ok(pieces)
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

// ---------------------------------------------------------------------------------
// Running one step.

/// How one step ran.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StepReport {
    /// The step name (`login`, `upload`, …).
    pub step: String,
    /// Its exit code (0, or the "project missing" code of `project_exists`).
    pub exit_code: i32,
    /// Wall-clock time in milliseconds.
    pub millis: u64,
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
}

/// A finished command: exit code 0, or a non-zero code when `allow_failure`.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) code: i32,
    pub(crate) millis: u64,
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
        .map(|s| tokio::spawn(read_stream(s, step.clone(), "stdout")));
    let err_task = child
        .stderr
        .take()
        .map(|s| tokio::spawn(read_stream(s, step.clone(), "stderr")));

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
    let output = Output {
        stdout: collect(out_task).await,
        stderr: collect(err_task).await,
    };
    let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    tracing::debug!(step = %step, status = %status, millis, "external command finished");

    match status.code() {
        Some(0) => Ok(Finished { code: 0, millis }),
        Some(code) => {
            let temporary = inv.temporary_codes.contains(&code);
            if allow_failure && !temporary {
                return Ok(Finished { code, millis });
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

async fn collect(task: Option<tokio::task::JoinHandle<Vec<u8>>>) -> String {
    let Some(mut task) = task else {
        return String::new();
    };
    let bytes = match tokio::time::timeout(PIPE_GRACE, &mut task).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => Vec::new(),
        Err(_) => {
            task.abort();
            Vec::new()
        }
    };
    scrub(&String::from_utf8_lossy(&bytes)).into_owned()
}

/// Read a stream to its end, logging each line (split at `\n` or `\r`, as progress
/// bars print) at debug with secrets scrubbed, and return the last [`TAIL_BYTES`].
async fn read_stream<R: tokio::io::AsyncRead + Unpin>(
    mut stream: R,
    step: String,
    which: &'static str,
) -> Vec<u8> {
    let mut tail: Vec<u8> = Vec::new();
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
        for &b in &buf[..n] {
            if b == b'\n' || b == b'\r' {
                log(&line);
                line.clear();
            } else if line.len() < 64 * 1024 {
                line.push(b);
            }
        }
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 2 * TAIL_BYTES {
            tail.drain(..tail.len() - TAIL_BYTES);
        }
    }
    log(&line);
    if tail.len() > TAIL_BYTES {
        tail.drain(..tail.len() - TAIL_BYTES);
    }
    tail
}

// ---------------------------------------------------------------------------------
// The vendor target.

/// `[…vendor]`: how to deliver through a vendor CLI. The engine's target section
/// embeds it (e.g. `[delivery.targets.online.vendor]`).
///
/// ```toml
/// [delivery.targets.online.vendor]
/// env = { BO_TOKEN = "env:LABRELAY_BO_TOKEN" }   # secrets, for the child only
/// password_env = "BO_PASSWORD"                   # create_user reads the password here
/// temporary_exit_codes = [75, 111]
/// [delivery.targets.online.vendor.steps]
/// login = ["bo-login-from-env", "--noprojects"]
/// project_exists = ["bo", "select", "{project}"]
/// create_project = ["bo", "new", "project", "{project}"]
/// mkdir = ["bo", "mkdir", "{project}:/{remote_dir}"]
/// upload = ["bo", "upload", "-c", "5", "-f", "{local_dir}", "{project}:/{remote_dir}/"]
/// upload_file = ["bo", "upload", "-f", "{local_file}", "{project}:/{remote_dir}/"]
/// create_user = ["bo", "new", "delivery_user", "-d", "{days}", "{user}"]
/// grant = ["bo", "set_permission", "-p", "{project}", "{user}", "dv"]
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VendorConfig {
    /// The steps, each an argv template.
    pub steps: VendorSteps,
    /// Environment variables set for every step; values are secrets (`env:NAME`,
    /// `file:PATH` or literal) and never appear on a command line.
    #[serde(default)]
    pub env: BTreeMap<String, SecretSpec>,
    /// The variable in which `create_user` receives the customer's password
    /// (default [`DEFAULT_PASSWORD_ENV`]).
    #[serde(default = "default_password_env")]
    pub password_env: String,
    /// Exit codes of the vendor CLI meaning "try again later" (our exit 75).
    #[serde(default)]
    pub temporary_exit_codes: Vec<i32>,
    /// Limit for each step but `upload`, in seconds (default 300; 0 = none).
    #[serde(default = "default_step_timeout")]
    pub timeout_secs: u64,
    /// Limit for `upload` and each `upload_file`, in seconds (default 0 = none).
    #[serde(default)]
    pub upload_timeout_secs: u64,
    /// Working directory of the commands (default: the tool's).
    #[serde(default)]
    pub workdir: Option<PathBuf>,
}

impl VendorConfig {
    /// Type the raw `[delivery.vendors.NAME]` table; a bad key is reported as
    /// `delivery.vendors.NAME.<key>` (exit 78). Check the templates with
    /// [`VendorTarget::new`].
    pub fn from_value(
        name: &str,
        value: &toml::Value,
    ) -> Result<VendorConfig, labrelay::config::ConfigError> {
        VendorConfig::deserialize(value.clone()).map_err(|e| {
            labrelay::config::ConfigError::Invalid {
                key: format!("delivery.vendors.{name}"),
                message: e.message().trim().to_owned(),
            }
        })
    }
}

fn default_password_env() -> String {
    DEFAULT_PASSWORD_ENV.to_owned()
}

fn default_step_timeout() -> u64 {
    DEFAULT_STEP_TIMEOUT_SECS
}

/// The argv templates of a vendor delivery, run in this order. Only `upload` is
/// required.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VendorSteps {
    /// Log in (run before every delivery and every account creation).
    #[serde(default)]
    pub login: Option<Vec<String>>,
    /// Probe: exit 0 when the project exists; any other non-temporary code means it
    /// does not, and `create_project` runs.
    #[serde(default)]
    pub project_exists: Option<Vec<String>>,
    /// Create the project (always run when there is no `project_exists` probe, so it
    /// must then succeed for an existing project).
    #[serde(default)]
    pub create_project: Option<Vec<String>>,
    /// Create the remote directory.
    #[serde(default)]
    pub mkdir: Option<Vec<String>>,
    /// Upload the delivery folder.
    #[serde(default)]
    pub upload: Vec<String>,
    /// Upload one extra file (the md5sum.txt written outside the analysis folder).
    #[serde(default)]
    pub upload_file: Option<Vec<String>>,
    /// Create the customer's account, valid `{days}` days; the password is in the
    /// `password_env` variable.
    #[serde(default)]
    pub create_user: Option<Vec<String>>,
    /// Grant the account the project.
    #[serde(default)]
    pub grant: Option<Vec<String>>,
}

/// Placeholders every step may use.
const COMMON: &[&str] = &["analysis_id", "project", "remote_dir", "customer_email"];

/// The placeholders a step may use.
pub fn placeholders(step: &str) -> Vec<&'static str> {
    let extra: &[&str] = match step {
        "upload" => &["local_dir"],
        "upload_file" => &["local_file", "file_name"],
        "create_user" | "grant" => &["user", "days", "expires"],
        _ => &[],
    };
    COMMON.iter().chain(extra).copied().collect()
}

/// One vendor delivery: what the engine has checked and wants sent.
#[derive(Debug, Clone)]
pub struct VendorUpload {
    /// The analysis id (`{analysis_id}`).
    pub analysis_id: String,
    /// The vendor project (`{project}`): the LIMS project id in the seed.
    pub project: String,
    /// Directory in the project (`{remote_dir}`): `<prefix>/<analysis-id>` or just the
    /// analysis id, as the seed did.
    pub remote_dir: String,
    /// The folder to upload (`{local_dir}`); must be UTF-8.
    pub local_dir: PathBuf,
    /// Extra files uploaded one by one with `upload_file` (`{local_file}`,
    /// `{file_name}`), e.g. md5sum.txt written to a temporary directory.
    pub extra_files: Vec<PathBuf>,
    /// The customer's first e-mail (`{customer_email}`).
    pub customer_email: String,
}

/// An account to create on the vendor platform.
#[derive(Debug, Clone)]
pub struct VendorUser {
    /// The analysis id (`{analysis_id}`).
    pub analysis_id: String,
    /// The vendor project (`{project}`).
    pub project: String,
    /// Directory in the project (`{remote_dir}`).
    pub remote_dir: String,
    /// The customer's first e-mail (`{customer_email}`).
    pub customer_email: String,
    /// The account name (`{user}`).
    pub user: String,
    /// Its password: in the `password_env` variable only.
    pub password: Secret,
    /// Validity in days (`{days}`).
    pub days: u32,
    /// When it expires (`{expires}`, `YYYY-MM-DD`, UTC).
    pub expires_at: DateTime<Utc>,
}

/// What a vendor run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VendorReport {
    /// The steps run, in order.
    pub steps: Vec<StepReport>,
    /// Whether `create_project` ran.
    pub project_created: bool,
}

#[derive(Debug, Clone)]
struct Steps {
    login: Option<ArgvTemplate>,
    project_exists: Option<ArgvTemplate>,
    create_project: Option<ArgvTemplate>,
    mkdir: Option<ArgvTemplate>,
    upload: ArgvTemplate,
    upload_file: Option<ArgvTemplate>,
    create_user: Option<ArgvTemplate>,
    grant: Option<ArgvTemplate>,
}

/// A vendor CLI target, checked and with its secrets resolved.
#[derive(Debug, Clone)]
pub struct VendorTarget {
    key: String,
    steps: Steps,
    env: Vec<(String, Secret)>,
    password_env: String,
    temporary_codes: Vec<i32>,
    timeout: Option<Duration>,
    upload_timeout: Option<Duration>,
    workdir: Option<PathBuf>,
}

impl VendorTarget {
    /// Check `config` (found at configuration key `key`, e.g.
    /// `delivery.targets.online.vendor`) and resolve its secrets. Every template
    /// problem is reported here, before anything runs.
    pub fn new(key: &str, config: &VendorConfig) -> Result<VendorTarget, CommandError> {
        Self::compile(key, config, true)
    }

    /// Check `config` as [`VendorTarget::new`] does, without resolving its secrets
    /// (for start-up checks of targets a run may not use).
    pub fn check(key: &str, config: &VendorConfig) -> Result<(), CommandError> {
        Self::compile(key, config, false).map(|_| ())
    }

    fn compile(
        key: &str,
        config: &VendorConfig,
        resolve: bool,
    ) -> Result<VendorTarget, CommandError> {
        check_env_name(&format!("{key}.password_env"), &config.password_env)?;
        if config.env.contains_key(&config.password_env) {
            return Err(CommandError::Config {
                key: format!("{key}.env"),
                message: format!(
                    "{} is the password_env variable (the customer's password); choose another name",
                    config.password_env
                ),
            });
        }
        let mut secret_env: Vec<&str> = config.env.keys().map(String::as_str).collect();
        secret_env.push(&config.password_env);
        let parse = |name: &str, argv: &Option<Vec<String>>| {
            argv.as_ref()
                .map(|a| {
                    ArgvTemplate::parse(
                        &format!("{key}.steps.{name}"),
                        a,
                        &placeholders(name),
                        &secret_env,
                    )
                })
                .transpose()
        };
        if config.steps.upload.is_empty() {
            return Err(CommandError::Config {
                key: format!("{key}.steps.upload"),
                message: "a vendor target needs an upload command".into(),
            });
        }
        let steps = Steps {
            login: parse("login", &config.steps.login)?,
            project_exists: parse("project_exists", &config.steps.project_exists)?,
            create_project: parse("create_project", &config.steps.create_project)?,
            mkdir: parse("mkdir", &config.steps.mkdir)?,
            upload: ArgvTemplate::parse(
                &format!("{key}.steps.upload"),
                &config.steps.upload,
                &placeholders("upload"),
                &secret_env,
            )?,
            upload_file: parse("upload_file", &config.steps.upload_file)?,
            create_user: parse("create_user", &config.steps.create_user)?,
            grant: parse("grant", &config.steps.grant)?,
        };
        let env = if resolve {
            resolve_env(key, &config.env)?
        } else {
            for name in config.env.keys() {
                check_env_name(&format!("{key}.env.{name}"), name)?;
            }
            Vec::new()
        };
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        Ok(VendorTarget {
            key: key.to_owned(),
            steps,
            env,
            password_env: config.password_env.clone(),
            temporary_codes: config.temporary_exit_codes.clone(),
            timeout: secs(config.timeout_secs),
            upload_timeout: secs(config.upload_timeout_secs),
            workdir: config.workdir.clone(),
        })
    }

    /// The target as it may be shown: `vendor:<program of upload>`.
    pub fn describe(&self) -> String {
        format!("vendor:{}", self.steps.upload.program())
    }

    /// Whether accounts can be created (`steps.create_user` is configured).
    pub fn can_create_users(&self) -> bool {
        self.steps.create_user.is_some()
    }

    async fn step(
        &self,
        name: &str,
        template: &ArgvTemplate,
        vars: &Vars,
        opts: StepOpts<'_>,
        report: &mut VendorReport,
    ) -> Result<i32, CommandError> {
        let argv = template.expand(name, vars)?;
        let mut env: Vec<(&str, &Secret)> = self.env.iter().map(|(n, s)| (n.as_str(), s)).collect();
        env.extend(opts.password);
        let done = run(
            Invocation {
                step: name,
                argv,
                env,
                timeout: if opts.upload {
                    self.upload_timeout
                } else {
                    self.timeout
                },
                temporary_codes: &self.temporary_codes,
                workdir: self.workdir.as_deref(),
            },
            opts.probe,
        )
        .await?;
        report.steps.push(StepReport {
            step: name.to_owned(),
            exit_code: done.code,
            millis: done.millis,
        });
        Ok(done.code)
    }

    /// Upload a delivery: `login`, `project_exists`/`create_project`, `mkdir`,
    /// `upload`, then `upload_file` for each extra file. The first failing step stops
    /// the run with an error naming it.
    pub async fn deliver(&self, req: &VendorUpload) -> Result<VendorReport, CommandError> {
        let mut report = VendorReport::default();
        let mut vars = common_vars(
            &req.analysis_id,
            &req.project,
            &req.remote_dir,
            &req.customer_email,
        );
        vars.insert(
            "local_dir",
            utf8_path("upload", "local_dir", &req.local_dir)?,
        );
        self.login_and_project(&vars, &mut report).await?;
        if let Some(t) = &self.steps.mkdir {
            self.step("mkdir", t, &vars, StepOpts::default(), &mut report)
                .await?;
        }
        self.step(
            "upload",
            &self.steps.upload,
            &vars,
            StepOpts::upload(),
            &mut report,
        )
        .await?;
        if !req.extra_files.is_empty() {
            let Some(t) = &self.steps.upload_file else {
                return Err(CommandError::Config {
                    key: format!("{}.steps.upload_file", self.key),
                    message: "extra files (md5sum.txt) must be sent but no upload_file command is configured".into(),
                });
            };
            for f in &req.extra_files {
                let mut v = vars.clone();
                v.insert("local_file", utf8_path("upload_file", "local_file", f)?);
                v.insert(
                    "file_name",
                    f.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                );
                self.step("upload_file", t, &v, StepOpts::upload(), &mut report)
                    .await?;
            }
        }
        tracing::info!(target = %self.key, analysis_id = %req.analysis_id, steps = report.steps.len(), "vendor upload finished");
        Ok(report)
    }

    async fn login_and_project(
        &self,
        vars: &Vars,
        report: &mut VendorReport,
    ) -> Result<(), CommandError> {
        if let Some(t) = &self.steps.login {
            self.step("login", t, vars, StepOpts::default(), report)
                .await?;
        }
        let exists = match &self.steps.project_exists {
            Some(t) => {
                self.step("project_exists", t, vars, StepOpts::probe(), report)
                    .await?
                    == 0
            }
            None => false,
        };
        if !exists {
            match &self.steps.create_project {
                Some(t) => {
                    self.step("create_project", t, vars, StepOpts::default(), report)
                        .await?;
                    report.project_created = true;
                }
                None if self.steps.project_exists.is_some() => {
                    return Err(CommandError::Config {
                        key: format!("{}.steps.create_project", self.key),
                        message: format!(
                            "project {} does not exist and no create_project command is configured",
                            vars.get("project").map_or("", String::as_str)
                        ),
                    });
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Create the customer's account (`login`, `create_user` with the password in the
    /// `password_env` variable, then `grant`).
    pub async fn create_user(&self, req: &VendorUser) -> Result<VendorReport, CommandError> {
        let Some(create) = &self.steps.create_user else {
            return Err(CommandError::Config {
                key: format!("{}.steps.create_user", self.key),
                message: "customer accounts are requested but no create_user command is configured"
                    .into(),
            });
        };
        let mut report = VendorReport::default();
        let mut vars = common_vars(
            &req.analysis_id,
            &req.project,
            &req.remote_dir,
            &req.customer_email,
        );
        vars.insert("user", req.user.clone());
        vars.insert("days", req.days.to_string());
        vars.insert("expires", req.expires_at.format("%Y-%m-%d").to_string());
        if let Some(t) = &self.steps.login {
            self.step("login", t, &vars, StepOpts::default(), &mut report)
                .await?;
        }
        self.step(
            "create_user",
            create,
            &vars,
            StepOpts {
                password: Some((&self.password_env, &req.password)),
                ..StepOpts::default()
            },
            &mut report,
        )
        .await?;
        if let Some(t) = &self.steps.grant {
            self.step("grant", t, &vars, StepOpts::default(), &mut report)
                .await?;
        }
        tracing::info!(target = %self.key, user = %req.user, days = req.days, "vendor account created");
        Ok(report)
    }
}

/// How a vendor step runs.
#[derive(Debug, Clone, Copy, Default)]
struct StepOpts<'a> {
    /// The customer's password, in this variable.
    password: Option<(&'a str, &'a Secret)>,
    /// An upload: `upload_timeout_secs` applies.
    upload: bool,
    /// A probe: a non-zero, non-temporary code is an answer, not a failure.
    probe: bool,
}

impl StepOpts<'_> {
    fn upload() -> Self {
        StepOpts {
            upload: true,
            ..StepOpts::default()
        }
    }

    fn probe() -> Self {
        StepOpts {
            probe: true,
            ..StepOpts::default()
        }
    }
}

fn common_vars(analysis_id: &str, project: &str, remote_dir: &str, email: &str) -> Vars {
    let mut v = Vars::new();
    v.insert("analysis_id", analysis_id.to_owned());
    v.insert("project", project.to_owned());
    v.insert("remote_dir", remote_dir.to_owned());
    v.insert("customer_email", email.to_owned());
    v
}

fn utf8_path(step: &str, placeholder: &str, p: &Path) -> Result<String, CommandError> {
    p.to_str()
        .map(ToOwned::to_owned)
        .ok_or_else(|| CommandError::BadValue {
            step: step.to_owned(),
            placeholder: placeholder.to_owned(),
            reason: format!("{} is not UTF-8", p.display()),
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn templates_expand_without_a_shell() {
        let t = ArgvTemplate::parse(
            "k",
            &s(&[
                "bo",
                "upload",
                "-f",
                "{local_dir}",
                "{project}:/{remote_dir}/",
                "{{x}}",
            ]),
            &placeholders("upload"),
            &[],
        )
        .unwrap();
        assert_eq!(t.program(), "bo");
        assert_eq!(t.placeholders(), ["local_dir", "project", "remote_dir"]);
        let mut v = Vars::new();
        v.insert("local_dir", "/data/a b;rm -rf /".into());
        v.insert("project", "P1".into());
        v.insert("remote_dir", "6cLB4ma".into());
        let argv = t.expand("upload", &v).unwrap();
        assert_eq!(
            argv,
            [
                "bo",
                "upload",
                "-f",
                "/data/a b;rm -rf /",
                "P1:/6cLB4ma/",
                "{x}"
            ]
        );
    }

    #[test]
    fn secret_placeholders_are_refused_with_a_clear_error() {
        for bad in [
            "{password}",
            "--token={token}",
            "{BO_TOKEN}",
            "{user_password}",
        ] {
            let err = ArgvTemplate::parse(
                "delivery.vendor.steps.create_user",
                &s(&["bo", "new", bad]),
                &placeholders("create_user"),
                &["BO_TOKEN", "BO_PASSWORD"],
            )
            .unwrap_err();
            let msg = err.to_string();
            assert_eq!(err.exit(), Exit::Config, "{msg}");
            assert!(msg.contains("delivery.vendor.steps.create_user"), "{msg}");
            assert!(msg.contains("environment variable"), "{msg}");
            assert!(msg.contains("BO_PASSWORD"), "{msg}");
        }
    }

    #[test]
    fn unknown_and_malformed_placeholders_are_refused() {
        let allowed = placeholders("login");
        let err = ArgvTemplate::parse("k", &s(&["bo", "{local_dir}"]), &allowed, &[]).unwrap_err();
        assert!(
            err.to_string().contains("unknown placeholder {local_dir}"),
            "{err}"
        );
        for bad in ["{", "a}", "{a b}", "{}"] {
            assert!(
                ArgvTemplate::parse("k", &s(&["bo", bad]), &allowed, &[]).is_err(),
                "{bad}"
            );
        }
        assert!(ArgvTemplate::parse("k", &s(&["{project}"]), &allowed, &[]).is_err());
        assert!(ArgvTemplate::parse("k", &[], &allowed, &[]).is_err());
    }

    #[test]
    fn option_like_and_control_values_are_refused() {
        let t = ArgvTemplate::parse(
            "k",
            &s(&["bo", "new", "project", "{project}", "x={project}"]),
            &placeholders("create_project"),
            &[],
        )
        .unwrap();
        let mut v = Vars::new();
        v.insert("project", "--all".into());
        let err = t.expand("create_project", &v).unwrap_err();
        assert!(matches!(err, CommandError::BadValue { .. }), "{err}");
        v.insert("project", "a\nb".into());
        assert!(t.expand("create_project", &v).is_err());
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
        let any = failed(true).into_anyhow();
        assert_eq!(labrelay::exit::classify(&any), Exit::TempFail);
        let any = failed(false).into_anyhow().context("delivering A1");
        assert_eq!(labrelay::exit::classify(&any), Exit::Failed);
    }

    #[test]
    fn vendor_config_is_checked_at_load_time() {
        let cfg: VendorConfig = toml::from_str(
            r#"
            env = { BO_TOKEN = "literal-token-value" }
            [steps]
            upload = ["bo", "upload", "{local_dir}"]
            create_user = ["bo", "new", "delivery_user", "-p", "{password}", "{user}"]
            "#,
        )
        .unwrap();
        let err = VendorTarget::new("delivery.targets.online.vendor", &cfg).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "invalid configuration delivery.targets.online.vendor.steps.create_user"
            ),
            "{msg}"
        );
        assert!(msg.contains(DEFAULT_PASSWORD_ENV), "{msg}");

        let unknown = toml::from_str::<VendorConfig>("[steps]\nupload = [\"bo\"]\nuplaod = []\n");
        assert!(unknown.unwrap_err().to_string().contains("uplaod"));

        let cfg: VendorConfig =
            toml::from_str("password_env = \"1BAD\"\n[steps]\nupload = [\"bo\"]\n").unwrap();
        assert!(VendorTarget::new("k", &cfg).is_err());
        let cfg: VendorConfig = toml::from_str("[steps]\nupload = []\n").unwrap();
        assert!(
            VendorTarget::new("k", &cfg)
                .unwrap_err()
                .to_string()
                .contains("upload")
        );
    }

    #[tokio::test]
    async fn a_secret_in_a_literal_argument_is_never_run() {
        let secret = Secret::new("very-secret-token-1234");
        let err = run(
            Invocation {
                step: "login",
                argv: s(&["/bin/true", "--token", "very-secret-token-1234"]),
                env: vec![("BO_TOKEN", &secret)],
                timeout: None,
                temporary_codes: &[],
                workdir: None,
            },
            false,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CommandError::SecretInArgv { .. }));
        assert!(!err.to_string().contains("very-secret"));
    }

    #[tokio::test]
    async fn output_is_scrubbed_and_timeouts_are_temporary() {
        let secret = Secret::new("pw-that-leaks-9876");
        let err = run(
            Invocation {
                step: "create_user",
                argv: s(&["/bin/sh", "-c", "echo \"bad password $P\" >&2; exit 4"]),
                env: vec![("P", &secret)],
                timeout: None,
                temporary_codes: &[75],
                workdir: None,
            },
            false,
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(!msg.contains("pw-that-leaks"), "{msg}");
        assert!(
            msg.contains("exited with code 4: bad password ****"),
            "{msg}"
        );

        let err = run(
            Invocation {
                step: "upload",
                argv: s(&["/bin/sleep", "10"]),
                env: vec![],
                timeout: Some(Duration::from_millis(200)),
                temporary_codes: &[],
                workdir: None,
            },
            false,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CommandError::Timeout { .. }), "{err}");
        assert_eq!(err.exit(), Exit::TempFail);

        let err = run(
            Invocation {
                step: "login",
                argv: s(&["/nonexistent/bo"]),
                env: vec![],
                timeout: None,
                temporary_codes: &[],
                workdir: None,
            },
            false,
        )
        .await
        .unwrap_err();
        assert_eq!(err.exit(), Exit::Config, "{err}");
    }
}
