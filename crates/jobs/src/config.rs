//! `[jobs]` (worker and lease settings) and `[tasks.NAME]` (the registry), checked
//! once at start so that a bad entry exits 78 before any job is claimed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use labrelay::config::{Config, ConfigError};
use labrelay::secret::SecretSpec;
use serde::Deserialize;

/// The name of the built-in task that runs no process (health checks, benchmarks).
pub const NOOP: &str = "noop";

/// `[jobs]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// How long a claim holds a job without a heartbeat.
    pub lease_secs: u64,
    /// How often a running job's lease is renewed (and a cancel noticed).
    pub heartbeat_secs: u64,
    /// On SIGTERM: how long running jobs may take to finish before they are killed.
    pub grace_secs: u64,
    /// How often an idle worker looks for new jobs.
    pub poll_ms: u64,
    /// Bytes of stdout and of stderr kept per job in the row (the rest is counted, or
    /// kept whole in `output_storage`).
    pub output_cap_bytes: usize,
    /// A `[storage.NAME]` where the whole output of a stream longer than
    /// `output_cap_bytes` is kept (`job-worker result ID --full`).
    pub output_storage: Option<String>,
    /// Bytes of one stream kept whole at most.
    pub output_max_bytes: u64,
    /// Tasks without `max_attempts` get this.
    pub max_attempts: u32,
    /// Tasks without `timeout_secs` get this.
    pub timeout_secs: u64,
    /// Queue of tasks without `queue`.
    pub queue: String,
    /// How workers get jobs: `database` (claims from the job table) or `rabbitmq`
    /// (`[queue] url`: the table publishes ready jobs to one quorum queue per job queue).
    pub broker: String,
    /// `rabbitmq`: a job published this long ago and still not claimed is published
    /// again (a message lost with a broker's disk, say).
    pub republish_secs: u64,
    /// `job-worker serve`: the address to listen on.
    pub listen: String,
    /// `code-submit`: submit through this `job-worker serve` instead of the database.
    pub api_url: Option<String>,
    /// `code-submit` with `api_url`: who signs (default: the login name).
    pub api_user: Option<String>,
    /// `code-submit` with `api_url`: the user's signing key (`env:NAME`, `file:PATH`).
    pub api_key: Option<SecretSpec>,
    /// `job-worker serve`: the API users, `[jobs.users.NAME] key = ..., admin = false`.
    pub users: BTreeMap<String, ApiUser>,
    /// Webhooks a task or a submission may name, `[jobs.webhooks.NAME]`.
    pub webhooks: BTreeMap<String, WebhookConfig>,
    /// A `[storage.NAME]` for submitted sources (`code-submit add`); default: the
    /// folder `code` in the data directory.
    pub code_storage: Option<String>,
    /// The queue of code jobs (the built-in task `code`).
    pub code_queue: String,
}

/// `[jobs.webhooks.NAME]`: where a job's outcome is POSTed, signed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The http(s) URL.
    pub url: String,
    /// The signing key (`env:NAME`, `file:PATH`; at least 16 characters).
    pub key: SecretSpec,
    /// Give up on one try after this long.
    #[serde(default = "default_webhook_timeout")]
    pub timeout_secs: u64,
    /// Tries before giving up (with exponential backoff between them).
    #[serde(default = "default_webhook_attempts")]
    pub max_attempts: u32,
}

fn default_webhook_timeout() -> u64 {
    10
}

fn default_webhook_attempts() -> u32 {
    8
}

/// `[jobs.users.NAME]`: one user of the HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiUser {
    /// The user's signing key (`env:NAME`, `file:PATH`; at least 16 characters).
    pub key: SecretSpec,
    /// Sees and cancels every job, not only its own.
    #[serde(default)]
    pub admin: bool,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            lease_secs: 30,
            heartbeat_secs: 5,
            grace_secs: 30,
            poll_ms: 500,
            output_cap_bytes: 1 << 20,
            output_storage: None,
            output_max_bytes: 1 << 30,
            max_attempts: 3,
            timeout_secs: 3600,
            queue: "default".into(),
            broker: "database".into(),
            republish_secs: 300,
            listen: "127.0.0.1:8080".into(),
            api_url: None,
            api_user: None,
            api_key: None,
            users: BTreeMap::new(),
            webhooks: BTreeMap::new(),
            code_storage: None,
            code_queue: "code".into(),
        }
    }
}

/// `[tasks.NAME]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    command: Vec<String>,
    #[serde(default)]
    workdir: Option<PathBuf>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    timeout_secs: Option<u64>,
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default)]
    backoff_secs: Option<u64>,
    #[serde(default)]
    backoff_max_secs: Option<u64>,
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    args_on_stdin: bool,
    #[serde(default)]
    schedule: Option<String>,
    #[serde(default)]
    schedule_args: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    concurrency: Option<u32>,
    #[serde(default)]
    webhook: Option<String>,
    #[serde(default)]
    email: Option<String>,
}

/// One registered task, checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Task {
    /// Its name.
    pub name: String,
    /// argv; `{name}` marks where an argument goes (inside one item, never split).
    pub command: Vec<String>,
    /// Working directory (default: the worker's).
    pub workdir: Option<PathBuf>,
    /// Names of the worker's environment variables passed through.
    pub env: Vec<String>,
    /// Killed after this long.
    pub timeout_secs: u64,
    /// Attempts before the job is dead.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, with jitter.
    pub backoff_secs: u64,
    /// Retry delay cap.
    pub backoff_max_secs: u64,
    /// Queue the task's jobs go to.
    pub queue: String,
    /// Shown by `job-worker tasks`.
    pub description: String,
    /// Arguments go to stdin as one JSON object instead of into argv.
    pub args_on_stdin: bool,
    /// The argument names the command uses, in order of first use.
    pub params: Vec<String>,
    /// Cron pattern (machine's local time) on which workers submit the task themselves.
    pub schedule: Option<String>,
    /// Arguments of scheduled runs.
    pub schedule_args: serde_json::Map<String, serde_json::Value>,
    /// At most this many of the task's jobs run at once, across every worker.
    pub concurrency: Option<u32>,
    /// `[jobs.webhooks.NAME]` POSTed when a job of the task ends (unless the
    /// submission names another).
    pub webhook: Option<String>,
    /// Mailed when a job of the task ends (unless the submission gives an address).
    pub email: Option<String>,
}

impl Task {
    /// The delay before attempt `failed + 1`: base × 2^(failed-1), capped, with full
    /// jitter over its upper half (so retries of many jobs spread out).
    pub fn backoff(&self, failed: u32) -> Duration {
        let exp = failed.saturating_sub(1).min(30);
        let full = self
            .backoff_secs
            .saturating_mul(1 << exp)
            .min(self.backoff_max_secs)
            .saturating_mul(1000);
        let half = full / 2;
        let jitter = if half == 0 {
            0
        } else {
            rand::random_range(0..=half)
        };
        Duration::from_millis(half + jitter)
    }

    /// The argv for `args`, or the first argument that is missing or cannot go in argv.
    pub fn argv(
        &self,
        args: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Vec<String>, String> {
        // With `args_on_stdin` there is no placeholder (checked at start), but `{{` and
        // `}}` still stand for one brace.
        let mut out = Vec::with_capacity(self.command.len());
        for item in &self.command {
            let mut text = String::new();
            for part in split_template(item) {
                match part {
                    Part::Text(t) => text.push_str(t),
                    Part::Param(p) => text.push_str(&arg_text(p, args.get(p))?),
                }
            }
            out.push(text);
        }
        Ok(out)
    }

    /// Check submitted arguments against the command: every parameter given, no unknown
    /// name, values that fit in argv.
    pub fn check_args(
        &self,
        args: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), String> {
        if self.args_on_stdin {
            return Ok(());
        }
        for name in args.keys() {
            if !self.params.contains(name) {
                return Err(if self.params.is_empty() {
                    format!("task {} takes no arguments, got `{name}`", self.name)
                } else {
                    format!(
                        "task {} has no argument `{name}` (it takes: {})",
                        self.name,
                        self.params.join(", ")
                    )
                });
            }
        }
        self.argv(args).map(drop)
    }
}

fn arg_text(name: &str, value: Option<&serde_json::Value>) -> Result<String, String> {
    match value {
        None => Err(format!("argument `{name}` is missing")),
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => Ok(v.to_string()),
        Some(_) => Err(format!(
            "argument `{name}` must be a string, number or boolean to go into the command line"
        )),
    }
}

enum Part<'a> {
    Text(&'a str),
    Param(&'a str),
}

/// `a{b}c` → Text(a), Param(b), Text(c). `{{` and `}}` are literal braces.
fn split_template(item: &str) -> Vec<Part<'_>> {
    let mut parts = Vec::new();
    let mut rest = item;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("{{") {
            parts.push(Part::Text("{"));
            rest = r;
        } else if let Some(r) = rest.strip_prefix("}}") {
            parts.push(Part::Text("}"));
            rest = r;
        } else if rest.starts_with('{')
            && let Some(end) = rest.find('}')
            && is_param_name(&rest[1..end])
        {
            parts.push(Part::Param(&rest[1..end]));
            rest = &rest[end + 1..];
        } else {
            let next = rest[1..].find(['{', '}']).map_or(rest.len(), |i| i + 1);
            parts.push(Part::Text(&rest[..next]));
            rest = &rest[next..];
        }
    }
    parts
}

fn is_param_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn is_name(s: &str) -> bool {
    is_param_name(s)
}

/// The worker settings and the task registry, checked.
#[derive(Debug, Clone)]
pub struct Registry {
    /// `[jobs]`.
    pub settings: JobsConfig,
    /// Tasks by name, `noop` included.
    pub tasks: BTreeMap<String, Task>,
    /// Parsed schedules of the tasks that have one.
    pub schedules: Vec<(String, croner::Cron)>,
}

/// Parse a cron pattern: five fields (minute hour day month weekday), or six with
/// seconds first; `@daily` and friends.
pub fn parse_schedule(pattern: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(pattern)
        .map_err(|e| format!("`{pattern}` is not a cron pattern: {e}"))
}

impl Registry {
    /// Read and check `[jobs]` and `[tasks]`.
    pub fn from_config(config: &Config) -> Result<Registry, ConfigError> {
        let settings: JobsConfig = config.section("jobs")?.unwrap_or_default();
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.to_owned(),
            message,
        };
        if settings.lease_secs == 0 || settings.heartbeat_secs == 0 {
            return Err(invalid(
                "jobs.lease_secs",
                "lease and heartbeat must be at least 1 s".into(),
            ));
        }
        if settings.heartbeat_secs * 2 > settings.lease_secs {
            return Err(invalid(
                "jobs.heartbeat_secs",
                format!(
                    "a heartbeat every {} s cannot keep a {} s lease (at most half of it)",
                    settings.heartbeat_secs, settings.lease_secs
                ),
            ));
        }
        if !is_name(&settings.queue) {
            return Err(invalid(
                "jobs.queue",
                format!(
                    "`{}` is not a queue name (a-z, 0-9, _ and -)",
                    settings.queue
                ),
            ));
        }
        for name in settings.users.keys() {
            if !crate::api::is_user_name(name) {
                return Err(invalid(
                    &format!("jobs.users.{name}"),
                    "a user name is 1 to 64 of A-Z a-z 0-9 . _ @ -".into(),
                ));
            }
        }
        if let Some(name) = &settings.code_storage {
            config.storage(name).map_err(|_| {
                invalid(
                    "jobs.code_storage",
                    format!("no [storage.{name}] is configured"),
                )
            })?;
        }
        if !is_name(&settings.code_queue) {
            return Err(invalid(
                "jobs.code_queue",
                "a queue name is 1-64 of a-z, 0-9, _ and -".into(),
            ));
        }
        if let Some(name) = &settings.output_storage {
            config.storage(name).map_err(|_| {
                invalid(
                    "jobs.output_storage",
                    format!("no [storage.{name}] is configured"),
                )
            })?;
        }
        match settings.broker.as_str() {
            "database" => {}
            "rabbitmq" => {
                let url = config.queue_url()?;
                if !matches!(url.expose().scheme(), "amqp" | "amqps") {
                    return Err(invalid(
                        "jobs.broker",
                        format!(
                            "rabbitmq needs [queue] url = \"amqp://...\" (it is {})",
                            url.redacted()
                        ),
                    ));
                }
                if settings.republish_secs < settings.lease_secs {
                    return Err(invalid("jobs.republish_secs", "at least lease_secs".into()));
                }
            }
            other => {
                return Err(invalid(
                    "jobs.broker",
                    format!("`{other}`: database or rabbitmq"),
                ));
            }
        }
        for (name, w) in &settings.webhooks {
            let k = format!("jobs.webhooks.{name}");
            if !is_name(name) {
                return Err(invalid(&k, "a webhook name is a-z, 0-9, _ and -".into()));
            }
            match url::Url::parse(&w.url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => {
                    return Err(invalid(
                        &format!("{k}.url"),
                        format!("`{}` is not an http(s) URL", w.url),
                    ));
                }
            }
            if w.max_attempts == 0 || w.timeout_secs == 0 {
                return Err(invalid(
                    &k,
                    "timeout_secs and max_attempts are at least 1".into(),
                ));
            }
        }
        if let Some(url) = &settings.api_url {
            match url::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                Ok(_) => {
                    return Err(invalid(
                        "jobs.api_url",
                        format!("`{url}`: only http and https"),
                    ));
                }
                Err(e) => return Err(invalid("jobs.api_url", format!("`{url}`: {e}"))),
            }
        }
        let raw: BTreeMap<String, RawTask> = config.section("tasks")?.unwrap_or_default();
        let mut tasks = BTreeMap::new();
        let mut schedules = Vec::new();
        tasks.insert(
            NOOP.to_owned(),
            Task {
                name: NOOP.into(),
                command: Vec::new(),
                workdir: None,
                env: Vec::new(),
                timeout_secs: settings.timeout_secs,
                max_attempts: 1,
                backoff_secs: 1,
                backoff_max_secs: 1,
                queue: settings.queue.clone(),
                description: "built in: runs no process and succeeds (health checks, benchmarks)"
                    .into(),
                args_on_stdin: true,
                params: Vec::new(),
                schedule: None,
                schedule_args: serde_json::Map::new(),
                concurrency: None,
                webhook: None,
                email: None,
            },
        );
        tasks.insert(
            crate::code::CODE.to_owned(),
            Task {
                name: crate::code::CODE.into(),
                command: Vec::new(),
                workdir: None,
                env: Vec::new(),
                timeout_secs: settings.timeout_secs,
                max_attempts: 3,
                backoff_secs: 5,
                backoff_max_secs: 60,
                queue: settings.code_queue.clone(),
                description:
                    "built in: runs a code submission in the sandbox (`code-submit run ID`)".into(),
                args_on_stdin: false,
                params: vec!["submission".into(), "run".into()],
                schedule: None,
                schedule_args: serde_json::Map::new(),
                concurrency: None,
                webhook: None,
                email: None,
            },
        );
        for (name, t) in raw {
            let key = |k: &str| format!("tasks.{name}.{k}");
            if name == crate::code::CODE {
                return Err(invalid(
                    &format!("tasks.{name}"),
                    "`code` is built in and cannot be redefined".into(),
                ));
            }
            if name == NOOP {
                return Err(invalid(
                    &format!("tasks.{NOOP}"),
                    "`noop` is built in and cannot be redefined".into(),
                ));
            }
            if !is_name(&name) {
                return Err(invalid(
                    &format!("tasks.{name}"),
                    "a task name uses a-z, 0-9, _ and -".into(),
                ));
            }
            if t.command.is_empty() || t.command[0].trim().is_empty() {
                return Err(invalid(
                    &key("command"),
                    "the command needs at least the program".into(),
                ));
            }
            let mut params = Vec::new();
            for item in &t.command {
                for part in split_template(item) {
                    if let Part::Param(p) = part
                        && !params.iter().any(|q: &String| q == p)
                    {
                        params.push(p.to_owned());
                    }
                }
                if item.contains('{')
                    && !item.contains("{{")
                    && split_template(item)
                        .iter()
                        .all(|p| matches!(p, Part::Text(_)))
                {
                    return Err(invalid(
                        &key("command"),
                        format!(
                            "`{item}`: a placeholder is `{{name}}` with a-z, 0-9, _ or - (write `{{{{` for a brace)"
                        ),
                    ));
                }
            }
            if t.args_on_stdin && !params.is_empty() {
                return Err(invalid(
                    &key("args_on_stdin"),
                    "arguments go either on stdin or into the command, not both".into(),
                ));
            }
            for v in &t.env {
                if v.is_empty() || v.contains('=') {
                    return Err(invalid(
                        &key("env"),
                        format!("`{v}` is not a variable name"),
                    ));
                }
            }
            let queue = t.queue.unwrap_or_else(|| settings.queue.clone());
            if !is_name(&queue) {
                return Err(invalid(
                    &key("queue"),
                    format!("`{queue}` is not a queue name (a-z, 0-9, _ and -)"),
                ));
            }
            let max_attempts = t.max_attempts.unwrap_or(settings.max_attempts);
            if max_attempts == 0 {
                return Err(invalid(&key("max_attempts"), "at least 1".into()));
            }
            let timeout_secs = t.timeout_secs.unwrap_or(settings.timeout_secs);
            if timeout_secs == 0 {
                return Err(invalid(&key("timeout_secs"), "at least 1".into()));
            }
            if let Some(dir) = &t.workdir
                && !dir.is_absolute()
            {
                return Err(invalid(
                    &key("workdir"),
                    format!("`{}` must be an absolute path", dir.display()),
                ));
            }
            let backoff_secs = t.backoff_secs.unwrap_or(10);
            if let Some(w) = &t.webhook
                && !settings.webhooks.contains_key(w)
            {
                return Err(invalid(
                    &key("webhook"),
                    format!("no [jobs.webhooks.{w}] is configured"),
                ));
            }
            if let Some(to) = &t.email {
                crate::notify::check_address(config.mail.from.as_deref(), to)
                    .map_err(|e| invalid(&key("email"), format!("{e:#}")))?;
            }
            if t.concurrency == Some(0) {
                return Err(invalid(
                    &key("concurrency"),
                    "at least 1 (leave it out for no limit)".into(),
                ));
            }
            if let Some(pattern) = &t.schedule {
                let cron = parse_schedule(pattern).map_err(|m| invalid(&key("schedule"), m))?;
                schedules.push((name.clone(), cron));
            } else if !t.schedule_args.is_empty() {
                return Err(invalid(
                    &key("schedule_args"),
                    "only for a task with a schedule".into(),
                ));
            }
            tasks.insert(
                name.clone(),
                Task {
                    name: name.clone(),
                    command: t.command,
                    workdir: t.workdir,
                    env: t.env,
                    timeout_secs,
                    max_attempts,
                    backoff_secs,
                    backoff_max_secs: t.backoff_max_secs.unwrap_or(3600).max(backoff_secs),
                    queue,
                    description: t.description.unwrap_or_default(),
                    args_on_stdin: t.args_on_stdin,
                    params,
                    schedule: t.schedule,
                    schedule_args: t.schedule_args,
                    concurrency: t.concurrency,
                    webhook: t.webhook,
                    email: t.email,
                },
            );
            let task = &tasks[&name];
            if task.schedule.is_some() {
                task.check_args(&task.schedule_args)
                    .map_err(|m| invalid(&key("schedule_args"), m))?;
            }
        }
        Ok(Registry {
            settings,
            tasks,
            schedules,
        })
    }

    /// The tasks with a concurrency limit, and their limits.
    pub fn limits(&self) -> BTreeMap<String, u32> {
        self.tasks
            .values()
            .filter_map(|t| t.concurrency.map(|n| (t.name.clone(), n)))
            .collect()
    }

    /// A checked job for a submission: the task is registered, its arguments fit and
    /// `run_at` is RFC 3339. The error says what is wrong (a usage error).
    pub fn new_job(
        &self,
        req: &crate::api::SubmitRequest,
        submitter: &str,
    ) -> Result<crate::NewJob, String> {
        let task = self.task(&req.task)?;
        task.check_args(&req.args)?;
        let run_at_ms = req
            .run_at
            .as_deref()
            .map(|t| {
                chrono::DateTime::parse_from_rfc3339(t)
                    .map(|d| d.timestamp_millis())
                    .map_err(|e| {
                        format!("run_at {t}: {e} (use RFC 3339, e.g. 2026-12-01T03:00:00Z)")
                    })
            })
            .transpose()?;
        let webhook = req.webhook.clone().or_else(|| task.webhook.clone());
        if let Some(w) = &webhook
            && !self.settings.webhooks.contains_key(w)
        {
            return Err(format!(
                "webhook {w}: not configured (known: {})",
                self.settings
                    .webhooks
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Some(k) = &req.unique_key
            && (k.is_empty() || k.len() > 200)
        {
            return Err("a unique key is 1 to 200 characters".into());
        }
        Ok(crate::NewJob {
            task: task.name.clone(),
            args: req.args.clone(),
            queue: task.queue.clone(),
            priority: req.priority,
            max_attempts: task.max_attempts,
            run_at_ms,
            unique_key: req.unique_key.clone(),
            submitter: submitter.to_owned(),
            notify: req.email.clone().or_else(|| task.email.clone()),
            webhook,
        })
    }

    /// The task, or a message naming the known ones.
    pub fn task(&self, name: &str) -> Result<&Task, String> {
        self.tasks.get(name).ok_or_else(|| {
            format!(
                "no task named `{name}` is registered (known: {}; see `job-worker tasks`)",
                self.tasks.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(command: &[&str]) -> Task {
        let mut params = Vec::new();
        for item in command {
            for p in split_template(item) {
                if let Part::Param(p) = p
                    && !params.contains(&p.to_owned())
                {
                    params.push(p.to_owned());
                }
            }
        }
        Task {
            name: "t".into(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            workdir: None,
            env: Vec::new(),
            timeout_secs: 1,
            max_attempts: 1,
            backoff_secs: 2,
            backoff_max_secs: 60,
            queue: "q".into(),
            description: String::new(),
            args_on_stdin: false,
            params,
            schedule: None,
            schedule_args: serde_json::Map::new(),
            concurrency: None,
            webhook: None,
            email: None,
        }
    }

    #[test]
    fn placeholders_fill_whole_items_and_never_split() {
        let t = task(&[
            "prog",
            "--sample",
            "{sample}",
            "--out={dir}/x",
            "{{literal}}",
        ]);
        let args = serde_json::json!({"sample": "a b; rm -rf /", "dir": "/d"});
        let line = t.argv(args.as_object().unwrap()).unwrap();
        assert_eq!(
            line,
            [
                "prog",
                "--sample",
                "a b; rm -rf /",
                "--out=/d/x",
                "{literal}"
            ]
        );
        assert_eq!(t.params, ["sample", "dir"]);
    }

    #[test]
    fn doubled_braces_are_literal_also_with_arguments_on_stdin() {
        let mut t = task(&["python3", "-c", "print({{'a': 1}})"]);
        t.args_on_stdin = true;
        let line = t.argv(&serde_json::Map::new()).unwrap();
        assert_eq!(line[2], "print({'a': 1})");
    }

    #[test]
    fn arguments_are_checked_by_name_and_kind() {
        let t = task(&["prog", "{sample}"]);
        let err = t
            .check_args(serde_json::json!({}).as_object().unwrap())
            .unwrap_err();
        assert!(err.contains("`sample` is missing"), "{err}");
        let err = t
            .check_args(
                serde_json::json!({"sample": "x", "other": 1})
                    .as_object()
                    .unwrap(),
            )
            .unwrap_err();
        assert!(
            err.contains("no argument `other` (it takes: sample)"),
            "{err}"
        );
        let err = t
            .check_args(serde_json::json!({"sample": [1]}).as_object().unwrap())
            .unwrap_err();
        assert!(err.contains("string, number or boolean"), "{err}");
        t.check_args(serde_json::json!({"sample": 3}).as_object().unwrap())
            .unwrap();
    }

    #[test]
    fn backoff_doubles_within_jitter_and_is_capped() {
        let t = task(&["p"]);
        for failed in 1..=8 {
            let full = (2u64 << (failed - 1)).min(60) * 1000;
            let d = t.backoff(failed);
            let ms = u64::try_from(d.as_millis()).unwrap();
            assert!(
                ms >= full / 2 && ms <= full,
                "attempt {failed}: {ms} ms of {full}"
            );
        }
    }
}

#[cfg(test)]
mod schedule_tests {
    use super::parse_schedule;
    use chrono::TimeZone as _;

    #[test]
    fn five_and_six_field_patterns() {
        let at = chrono::Utc
            .with_ymd_and_hms(2026, 12, 1, 2, 59, 59)
            .unwrap();
        let daily = parse_schedule("0 3 * * *").unwrap();
        assert_eq!(
            daily.find_next_occurrence(&at, false).unwrap(),
            chrono::Utc.with_ymd_and_hms(2026, 12, 1, 3, 0, 0).unwrap()
        );
        let every_two = parse_schedule("*/2 * * * * *").unwrap();
        assert_eq!(
            every_two.find_next_occurrence(&at, false).unwrap(),
            chrono::Utc.with_ymd_and_hms(2026, 12, 1, 3, 0, 0).unwrap()
        );
        assert!(parse_schedule("61 * * * *").is_err());
        let now = chrono::Local::now();
        let next = every_two.find_next_occurrence(&now, false).unwrap();
        assert!(
            next > now && next - now <= chrono::Duration::seconds(2),
            "{now} -> {next}"
        );
    }
}
