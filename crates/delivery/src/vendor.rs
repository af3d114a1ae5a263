//! The fourth target kind: a vendor's command-line client (`bo`-style) run step by
//! step from argv templates ([`crate::template::ArgvTemplate`]) by the shared runner
//! ([`crate::command`]).
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
//! - the vendor section and its steps, checked when the configuration is loaded: each
//!   step may use its own placeholders only, and none that would put a secret on a
//!   command line (`{password}`, `{token}`, or the name of a configured secret
//!   variable; [`ArgvTemplate::parse`] refuses them): a command line is readable by
//!   every user of the machine through `ps`;
//! - the order of the steps and what each receives: the secrets (the vendor token, the
//!   customer's generated password) in environment variables of the child only, its
//!   timeout, its temporary exit codes (`temporary_exit_codes`, exit 75). Running a
//!   step — no shell, output scrubbed, [`CommandError`] naming the step, program and
//!   code — is [`crate::command`]'s.
//!
//! A vendor CLI that only accepts its token as an argument must be wrapped (a script
//! reading the variable); the exposure is then the vendor's, never ours.
//!
//! It must not decide what is delivered or when: the delivery engine calls
//! [`VendorTarget::deliver`] with the folder it has checked, then
//! [`crate::access`] calls [`VendorTarget::create_user`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use labrelay::secret::{Secret, SecretSpec};
use serde::Deserialize;

use crate::command::{Invocation, check_env_name, resolve_env, run};
// The runner's error and the templates were first defined here; the paths stay.
pub use crate::command::CommandError;
pub use crate::template::{ArgvTemplate, Vars};

/// Environment variable in which `create_user` receives the customer's password,
/// unless `password_env` names another one.
pub const DEFAULT_PASSWORD_ENV: &str = "LABRELAY_VENDOR_PASSWORD";

/// Default limit for every step but `upload` (seconds).
pub const DEFAULT_STEP_TIMEOUT_SECS: u64 = 300;

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
                capture_stdout: None,
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
    fn each_step_may_use_its_own_placeholders_only() {
        let parse = |step: &str, arg: &str| {
            ArgvTemplate::parse("k", &s(&["bo", arg]), &placeholders(step), &[])
        };
        assert!(parse("upload", "{local_dir}").is_ok());
        let err = CommandError::from(parse("login", "{local_dir}").unwrap_err());
        assert_eq!(err.exit(), labrelay::exit::Exit::Config);
        assert!(
            err.to_string().contains("unknown placeholder {local_dir}"),
            "{err}"
        );
        assert!(parse("upload_file", "{file_name}").is_ok());
        assert!(parse("grant", "{expires}").is_ok());
        assert!(parse("mkdir", "{user}").is_err());
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
}
