//! Customer access to a finished delivery, by target:
//! - `presigned`: one presigned GET link per delivered file (S3 targets), valid a number
//!   of days, at most what the backend signs ([`MAX_PRESIGN_DAYS`]: SigV4 allows 7);
//!   [`renew`] re-issues them for a recorded delivery;
//! - `command`: an account (SFTP user, shared directory…) created by a configured
//!   command, argv template, no shell, password in an environment variable;
//! - `vendor`: the vendor CLI's `create_user` step ([`crate::vendor`]), valid `days`
//!   (the seed's 30), account = the customer's e-mail prefix as in the seed;
//! - `none`: no access is created (a local directory that staff hand over).
//!
//! Passwords are generated with a CSPRNG ([`generate_password`]) when the lookup gives
//! none; they live in [`Secret`]s, so they are never logged or serialized:
//! [`AccessGrant::record`] is what may be stored or printed. Presigned URLs are bearer
//! credentials too: [`FileLink`]'s Debug masks their signature.
//!
//! This module does not upload, mail or record: the engine calls [`Access::grant`] after
//! the upload, puts the [`AccessGrant`] into [`crate::notify::MailFacts`], and stores
//! [`AccessGrant::record`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use labrelay::exit::Exit;
use labrelay::secret::{RedactedUrl, Secret, SecretSpec};
use labrelay::storage::{AnyStorage, ObjectStorage, StorageError};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

use crate::command::{self, CommandError, Invocation};
use crate::template::{ArgvTemplate, TemplateError, Vars};
use crate::vendor::{self, VendorTarget, VendorUser};

/// Longest validity of a presigned link in days: SigV4 signatures (S3, Garage, MinIO,
/// Aliyun OSS through its S3 API) are valid at most 7 days.
pub const MAX_PRESIGN_DAYS: u32 = 7;
/// Validity of accounts unless configured (the seed: `bo new delivery_user -d 30`).
pub const DEFAULT_ACCOUNT_DAYS: u32 = 30;
/// Length of generated passwords unless configured.
pub const DEFAULT_PASSWORD_LENGTH: usize = 16;
/// Shortest password length accepted in the configuration.
pub const MIN_PASSWORD_LENGTH: usize = 8;
/// Longest password length accepted in the configuration.
pub const MAX_PASSWORD_LENGTH: usize = 128;
/// Characters of generated passwords: letters and digits without the look-alikes
/// `0 O 1 l I`, so a customer can type a password read from a mail; 57 symbols give
/// 5.8 bits each (16 characters ≈ 93 bits).
pub const PASSWORD_ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
/// The account name template unless configured: the customer's e-mail local part, as
/// in the seed (`"{email_prefix}online"` reproduces the seed's `807729670online`).
pub const DEFAULT_ACCOUNT_TEMPLATE: &str = "{email_prefix}";
/// Environment variable in which an access command receives the password, unless
/// `password_env` names another one.
pub const DEFAULT_ACCESS_PASSWORD_ENV: &str = "LABRELAY_ACCESS_PASSWORD";
/// Longest account name (the Linux `useradd` limit).
pub const MAX_ACCOUNT_LEN: usize = 32;

/// Placeholders of the `account` template.
const ACCOUNT_PLACEHOLDERS: &[&str] = &["email_prefix", "analysis_id", "project"];
/// Placeholders of an access command and its `directory` template.
const COMMAND_PLACEHOLDERS: &[&str] = &[
    "user",
    "directory",
    "days",
    "expires",
    "analysis_id",
    "project",
    "customer_email",
    "key_prefix",
];
const DIRECTORY_PLACEHOLDERS: &[&str] = &["user", "analysis_id", "project", "key_prefix"];

/// Access errors. None contains a password or a link.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The access settings cannot work (exit 78).
    #[error("invalid configuration {key}: {message}")]
    Config {
        /// The configuration key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The target cannot presign links (local directory, SFTP) (exit 78).
    #[error(
        "{target} cannot make presigned links (only S3-compatible storage can); use access method \"command\" or \"none\" for this target"
    )]
    NoPresign {
        /// The target as shown.
        target: String,
    },
    /// Signing failed (exit of the storage error).
    #[error("presigning links: {0}")]
    Storage(#[from] StorageError),
    /// No account name can be made from the customer's data (exit 1).
    #[error("cannot make an account name for {email:?}: {reason}")]
    Account {
        /// The customer e-mail used.
        email: String,
        /// Why.
        reason: String,
    },
    /// The delivery has no customer e-mail (exit 1).
    #[error("analysis {analysis_id} has no customer e-mail to make an account for")]
    NoCustomerEmail {
        /// The analysis.
        analysis_id: String,
    },
    /// The account command or the vendor CLI failed (exit of the command error).
    #[error("creating the customer account: {0}")]
    Command(#[from] CommandError),
}

impl AccessError {
    /// Exit status (see each variant).
    pub fn exit(&self) -> Exit {
        match self {
            AccessError::Config { .. } | AccessError::NoPresign { .. } => Exit::Config,
            AccessError::Storage(e) => e.exit(),
            AccessError::Command(e) => e.exit(),
            AccessError::Account { .. } | AccessError::NoCustomerEmail { .. } => Exit::Failed,
        }
    }
}

impl labrelay::exit::ExitClass for AccessError {
    fn exit_class(&self) -> Exit {
        self.exit()
    }

    fn is_transient(&self) -> bool {
        match self {
            AccessError::Storage(e) => e.is_temporary(),
            other => other.exit() == Exit::TempFail,
        }
    }
}
labrelay::exit_class!(AccessError);

impl From<TemplateError> for AccessError {
    /// A template problem is the account command's (see [`CommandError`]).
    fn from(e: TemplateError) -> Self {
        AccessError::Command(CommandError::from(e))
    }
}

// ---------------------------------------------------------------------------------
// Configuration.

/// `[delivery.access]`: how customers get at delivered files. The method follows the
/// target's kind unless `methods` names one for the target:
///
/// | target | method |
/// |---|---|
/// | S3 | `presigned`: links valid `expiry_days` |
/// | SFTP | `sftp-account` when `[delivery.access.command]` is set, else `none` |
/// | vendor | `vendor-user` when the vendor has a `create_user` step, else `none` |
/// | local directory | `none` |
///
/// ```toml
/// [delivery.access]
/// expiry_days = 7                  # presigned links (at most 7)
/// days = 30                        # accounts (seed: 30)
/// account = "{email_prefix}"       # seed-style: "{email_prefix}online"
/// login = "https://online.example.org"   # where vendor accounts log in
/// methods = { nas = "none", sftp-backup = "none" }
///
/// [delivery.access.command]        # SFTP accounts
/// argv = ["sudo", "/usr/local/sbin/delivery-account", "{user}", "{directory}", "{expires}"]
/// login = "sftp://sftp.example.org:22"
/// directory = "/data/delivery/{key_prefix}"
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// Method per target name, instead of the one its kind implies.
    #[serde(default)]
    pub methods: BTreeMap<String, AccessMethod>,
    /// Validity of presigned links in days, at most [`MAX_PRESIGN_DAYS`] (a larger
    /// value is clamped, with a warning); default 7.
    #[serde(default = "default_presign_days")]
    pub expiry_days: u32,
    /// Validity of accounts in days (default 30, as in the seed).
    #[serde(default = "default_account_days")]
    pub days: u32,
    /// Account name template (default `{email_prefix}`); placeholders
    /// `{email_prefix}`, `{analysis_id}`, `{project}`.
    #[serde(default = "default_account_template")]
    pub account: String,
    /// Length of generated passwords (default 16, 8–128).
    #[serde(default = "default_password_length")]
    pub password_length: usize,
    /// Where vendor accounts log in, shown in the mail.
    #[serde(default)]
    pub login: Option<String>,
    /// The command that makes SFTP (or other) accounts.
    #[serde(default)]
    pub command: Option<CommandAccessConfig>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            methods: BTreeMap::new(),
            expiry_days: default_presign_days(),
            days: default_account_days(),
            account: default_account_template(),
            password_length: default_password_length(),
            login: None,
            command: None,
        }
    }
}

impl AccessConfig {
    /// Type the raw `[delivery.access]` table (defaults when absent); a bad key is
    /// reported as `delivery.access.<key>` (exit 78).
    pub fn from_value(
        value: Option<&toml::Value>,
    ) -> Result<AccessConfig, labrelay::config::ConfigError> {
        crate::config::typed_section(value, "delivery.access")
    }
}

fn default_presign_days() -> u32 {
    MAX_PRESIGN_DAYS
}
fn default_account_days() -> u32 {
    DEFAULT_ACCOUNT_DAYS
}
fn default_account_template() -> String {
    DEFAULT_ACCOUNT_TEMPLATE.to_owned()
}
fn default_password_length() -> usize {
    DEFAULT_PASSWORD_LENGTH
}
fn default_access_password_env() -> String {
    DEFAULT_ACCESS_PASSWORD_ENV.to_owned()
}
fn default_timeout() -> u64 {
    vendor::DEFAULT_STEP_TIMEOUT_SECS
}

/// `[delivery.access.command]`: an account created by a command (an SFTP user, a
/// directory on a shared server). The command gets the password in `password_env`,
/// never in argv; placeholders: `{user}`, `{directory}`, `{days}`, `{expires}`
/// (YYYY-MM-DD, UTC), `{analysis_id}`, `{project}`, `{customer_email}`, `{key_prefix}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandAccessConfig {
    /// The command, an argv template (no shell).
    pub argv: Vec<String>,
    /// Where the customer logs in, shown in the mail (e.g. `sftp://sftp.example.org`).
    #[serde(default)]
    pub login: Option<String>,
    /// The directory shown in the mail and passed as `{directory}` (template:
    /// `{user}`, `{analysis_id}`, `{project}`, `{key_prefix}`; default `{key_prefix}`).
    #[serde(default)]
    pub directory: Option<String>,
    /// Variable in which the command receives the password.
    #[serde(default = "default_access_password_env")]
    pub password_env: String,
    /// More secrets for the command's environment (`NAME = "env:…"`).
    #[serde(default)]
    pub env: BTreeMap<String, SecretSpec>,
    /// Exit codes meaning "try again later" (our 75).
    #[serde(default)]
    pub temporary_exit_codes: Vec<i32>,
    /// Limit in seconds (default 300; 0 = none).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

/// How access was given. The names are those recorded in the status row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessMethod {
    /// Nothing was created (`none`).
    None,
    /// Presigned links (`presigned`).
    Presigned,
    /// An account made by `[delivery.access.command]` (`sftp-account`; `command` is
    /// accepted in the configuration).
    #[serde(rename = "sftp-account", alias = "command")]
    Command,
    /// An account on the vendor platform (`vendor-user`; `vendor` is accepted in the
    /// configuration).
    #[serde(rename = "vendor-user", alias = "vendor")]
    Vendor,
}

impl AccessMethod {
    /// The recorded name.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMethod::None => "none",
            AccessMethod::Presigned => "presigned",
            AccessMethod::Command => "sftp-account",
            AccessMethod::Vendor => "vendor-user",
        }
    }
}

impl fmt::Display for AccessMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------------
// Inputs and outputs.

/// A delivered file the customer should reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedFile {
    /// Path relative to the delivery folder, as shown to the customer
    /// (`clean/S1_R1.fq.gz`, `md5sum.txt`).
    pub path: String,
    /// Its key on the target (`<prefix>/<analysis-id>/clean/S1_R1.fq.gz`).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// What [`Access::grant`] needs to know about a finished delivery.
#[derive(Debug, Clone)]
pub struct AccessRequest {
    /// The target's name (`--target`), for `[delivery.access] methods`.
    pub target: String,
    /// The analysis id.
    pub analysis_id: String,
    /// The LIMS project id.
    pub project_id: String,
    /// The customer's e-mail addresses; the first names the account.
    pub customer_emails: Vec<String>,
    /// Where the delivery lies on the target: `<prefix>/<analysis-id>` (for vendor
    /// targets, the remote directory in the project).
    pub key_prefix: String,
    /// The files to link (presigned), md5sum.txt included; ignored by the account
    /// methods.
    pub files: Vec<SharedFile>,
    /// A password to use instead of generating one (the seed reused the customer's
    /// password of the ordering system).
    pub password: Option<Secret>,
    /// The time validity counts from.
    pub now: DateTime<Utc>,
}

impl AccessRequest {
    /// The request for a verified delivery: every delivered file plus md5sum.txt
    /// (linked under its own name), validity counted from now.
    pub fn from_report(report: &crate::report::DeliveryReport) -> AccessRequest {
        let mut files: Vec<SharedFile> = report
            .files
            .iter()
            .map(|f| SharedFile {
                path: f.rel.clone(),
                key: f.key.clone(),
                size: f.size,
            })
            .collect();
        if !report.md5sum_key.is_empty() {
            files.push(SharedFile {
                path: report
                    .md5sum_key
                    .rsplit('/')
                    .next()
                    .unwrap_or("md5sum.txt")
                    .to_owned(),
                key: report.md5sum_key.clone(),
                size: report.md5sum_text.len() as u64,
            });
        }
        AccessRequest {
            target: report.target.name.clone(),
            analysis_id: report.analysis.analysis_id.clone(),
            project_id: report.analysis.project_id.clone().unwrap_or_default(),
            customer_emails: report.analysis.customer_emails.clone(),
            key_prefix: report.key_prefix.clone(),
            files,
            password: report.analysis.customer_password.clone(),
            now: Utc::now(),
        }
    }
}

/// A presigned link to one file. Not serializable on purpose: a link is a credential
/// and is re-issued ([`renew`]), never stored.
#[derive(Clone, PartialEq, Eq)]
pub struct FileLink {
    /// Path relative to the delivery folder.
    pub path: String,
    /// Key on the target.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// The link; a bearer credential until it expires.
    pub url: url::Url,
}

impl fmt::Debug for FileLink {
    // The signature grants access: keep it out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileLink")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("url", &RedactedUrl::new(self.url.clone()).redacted())
            .finish_non_exhaustive()
    }
}

/// An account the customer logs in with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The account name.
    pub user: String,
    /// Its password (never printed; only the customer mail carries it).
    pub password: Secret,
    /// Where to log in, when configured.
    pub login: Option<String>,
    /// The directory the customer finds the data in, when known.
    pub directory: Option<String>,
}

/// What the customer was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessGrant {
    /// How.
    pub method: AccessMethod,
    /// Presigned links, in the order of the request's files.
    pub links: Vec<FileLink>,
    /// The account, for the account methods.
    pub account: Option<Account>,
    /// When the links or the account expire.
    pub expires_at: Option<DateTime<Utc>>,
    /// Validity in days as granted (after clamping).
    pub valid_days: Option<u32>,
    /// The configured days, when they were more than the backend allows.
    pub clamped_from: Option<u32>,
}

impl AccessGrant {
    /// No access (method `none`).
    pub fn none() -> AccessGrant {
        AccessGrant {
            method: AccessMethod::None,
            links: Vec::new(),
            account: None,
            expires_at: None,
            valid_days: None,
            clamped_from: None,
        }
    }

    /// What may be stored in the state database or printed with `--json`: no password
    /// and no link.
    pub fn record(&self) -> AccessRecord {
        AccessRecord {
            method: self.method,
            account: self.account.as_ref().map(|a| a.user.clone()),
            login: self.account.as_ref().and_then(|a| a.login.clone()),
            directory: self.account.as_ref().and_then(|a| a.directory.clone()),
            expires_at: self.expires_at,
            valid_days: self.valid_days,
            links: self.links.len(),
        }
    }

    /// Whether the links or the account have expired at `now`.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }
}

/// The recordable part of an [`AccessGrant`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRecord {
    /// How access was given.
    pub method: AccessMethod,
    /// The account name.
    pub account: Option<String>,
    /// Where to log in.
    pub login: Option<String>,
    /// The customer's directory.
    pub directory: Option<String>,
    /// Expiry of the links or account.
    pub expires_at: Option<DateTime<Utc>>,
    /// Validity in days as granted.
    pub valid_days: Option<u32>,
    /// Number of presigned links.
    pub links: usize,
}

// ---------------------------------------------------------------------------------
// Passwords, account names, expiry.

/// A new password of `length` characters from [`PASSWORD_ALPHABET`], drawn with
/// `rand::rng()` (ChaCha12 seeded from the operating system: a CSPRNG), with at least
/// one upper-case letter, one lower-case letter and one digit (platforms often demand
/// them). `length` is raised to 3 if smaller.
pub fn generate_password(length: usize) -> Secret {
    let length = length.max(3);
    let mut rng = rand::rng();
    loop {
        let pw: String = (0..length)
            .map(|_| char::from(PASSWORD_ALPHABET[rng.random_range(0..PASSWORD_ALPHABET.len())]))
            .collect();
        let classes = [
            pw.bytes().any(|b| b.is_ascii_uppercase()),
            pw.bytes().any(|b| b.is_ascii_lowercase()),
            pw.bytes().any(|b| b.is_ascii_digit()),
        ];
        // Rejection keeps the distribution uniform over the passwords that qualify.
        if classes.iter().all(|c| *c) {
            return Secret::new(pw);
        }
    }
}

/// The validity of presigned links: `days` clamped to 1..=[`MAX_PRESIGN_DAYS`], and
/// whether it was clamped.
pub fn clamp_presign_days(days: u32) -> (u32, bool) {
    let clamped = days.clamp(1, MAX_PRESIGN_DAYS);
    (clamped, clamped != days)
}

fn days_duration(days: u32) -> Duration {
    Duration::from_secs(u64::from(days) * 86_400)
}

fn expiry(now: DateTime<Utc>, days: u32) -> DateTime<Utc> {
    now + chrono::Duration::days(i64::from(days))
}

/// The local part of an e-mail address, without a `+tag`.
pub fn email_prefix(email: &str) -> Option<&str> {
    let addr = match (email.rfind('<'), email.rfind('>')) {
        (Some(l), Some(r)) if l < r => &email[l + 1..r],
        _ => email,
    };
    let (local, domain) = addr.trim().rsplit_once('@')?;
    let local = local.split('+').next().unwrap_or(local);
    (!local.is_empty() && !domain.is_empty()).then_some(local)
}

/// Check an account name made from a template: lower-cased, `[a-z0-9._-]`, starting
/// with a letter or digit, at most [`MAX_ACCOUNT_LEN`] characters.
pub fn check_account_name(name: &str) -> Result<String, String> {
    let name = name.to_ascii_lowercase();
    if name.is_empty() {
        return Err("the account name is empty".into());
    }
    if name.len() > MAX_ACCOUNT_LEN {
        return Err(format!(
            "{name:?} is longer than {MAX_ACCOUNT_LEN} characters"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{name:?} contains {c:?}; account names use letters, digits, `.`, `_` and `-` (set the account template)"
        ));
    }
    if !name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        return Err(format!("{name:?} must start with a letter or digit"));
    }
    Ok(name)
}

// ---------------------------------------------------------------------------------
// Presigned links.

/// Presign a link to every file, valid `expiry_days` (clamped to
/// [`MAX_PRESIGN_DAYS`], with a warning) from `now`. Fails with
/// [`AccessError::NoPresign`] on a backend without presigned URLs.
pub async fn presign<S: ObjectStorage>(
    storage: &S,
    files: &[SharedFile],
    expiry_days: u32,
    now: DateTime<Utc>,
) -> Result<AccessGrant, AccessError> {
    let (days, clamped) = clamp_presign_days(expiry_days);
    if clamped {
        tracing::warn!(
            configured = expiry_days,
            granted = days,
            "presigned links are valid at most {MAX_PRESIGN_DAYS} days; using {days}"
        );
    }
    let validity = days_duration(days);
    let mut links = Vec::with_capacity(files.len());
    for f in files {
        let url = storage
            .presign_get(&f.key, validity)
            .await?
            .ok_or_else(|| AccessError::NoPresign {
                target: storage.describe(),
            })?;
        links.push(FileLink {
            path: f.path.clone(),
            key: f.key.clone(),
            size: f.size,
            url,
        });
    }
    let expires_at = expiry(now, days);
    tracing::info!(links = links.len(), days, expires_at = %expires_at, "presigned links issued");
    Ok(AccessGrant {
        method: AccessMethod::Presigned,
        links,
        account: None,
        expires_at: Some(expires_at),
        valid_days: Some(days),
        clamped_from: clamped.then_some(expiry_days),
    })
}

/// Re-issue the links of a recorded delivery (`delivery-upload renew`): fresh links
/// for `files` (the delivered keys, from the journal) valid `expiry_days` from `now`.
/// Every key is checked first, so a renewal never mails links to objects that are gone:
/// a missing one fails with [`StorageError::NotFound`].
pub async fn renew<S: ObjectStorage>(
    storage: &S,
    files: &[SharedFile],
    expiry_days: u32,
    now: DateTime<Utc>,
) -> Result<AccessGrant, AccessError> {
    for f in files {
        if storage.head(&f.key).await?.is_none() {
            return Err(AccessError::Storage(StorageError::NotFound {
                target: storage.describe(),
                key: f.key.clone(),
            }));
        }
    }
    presign(storage, files, expiry_days, now).await
}

// ---------------------------------------------------------------------------------
// The configured access.

#[derive(Debug, Clone)]
struct CompiledCommand {
    argv: ArgvTemplate,
    directory: Option<ArgvTemplate>,
    login: Option<String>,
    password_env: String,
    env: Vec<(String, Secret)>,
    temporary_codes: Vec<i32>,
    timeout: Option<Duration>,
}

/// `[delivery.access]`, checked, with the command's secrets resolved.
#[derive(Debug, Clone)]
pub struct Access {
    key: String,
    methods: BTreeMap<String, AccessMethod>,
    expiry_days: u32,
    days: u32,
    account: ArgvTemplate,
    password_length: usize,
    vendor_login: Option<String>,
    command: Option<CompiledCommand>,
}

impl Access {
    /// Check `config` (at configuration key `key`, normally `delivery.access`):
    /// templates, password length, days; resolve the command's secrets.
    pub fn new(key: &str, config: &AccessConfig) -> Result<Access, AccessError> {
        let cfg_err = |sub: &str, message: String| AccessError::Config {
            key: format!("{key}.{sub}"),
            message,
        };
        let len = config.password_length;
        if !(MIN_PASSWORD_LENGTH..=MAX_PASSWORD_LENGTH).contains(&len) {
            return Err(cfg_err(
                "password_length",
                format!("{len} is not between {MIN_PASSWORD_LENGTH} and {MAX_PASSWORD_LENGTH}"),
            ));
        }
        if config.days == 0 {
            return Err(cfg_err("days", "must be at least 1".into()));
        }
        if config.expiry_days == 0 {
            return Err(cfg_err("expiry_days", "must be at least 1".into()));
        }
        if config.expiry_days > MAX_PRESIGN_DAYS {
            tracing::warn!(
                key = %format!("{key}.expiry_days"),
                configured = config.expiry_days,
                "presigned links are valid at most {MAX_PRESIGN_DAYS} days (SigV4); links will expire after {MAX_PRESIGN_DAYS}"
            );
        }
        let account = ArgvTemplate::text(
            &format!("{key}.account"),
            &config.account,
            ACCOUNT_PLACEHOLDERS,
        )?;
        let command = match &config.command {
            None => None,
            Some(c) => {
                let ckey = format!("{key}.command");
                command::check_env_name(&format!("{ckey}.password_env"), &c.password_env)?;
                let mut secret_env: Vec<&str> = c.env.keys().map(String::as_str).collect();
                secret_env.push(&c.password_env);
                let argv = ArgvTemplate::parse(
                    &format!("{ckey}.argv"),
                    &c.argv,
                    COMMAND_PLACEHOLDERS,
                    &secret_env,
                )?;
                let directory = c
                    .directory
                    .as_deref()
                    .map(|d| {
                        ArgvTemplate::text(&format!("{ckey}.directory"), d, DIRECTORY_PLACEHOLDERS)
                    })
                    .transpose()?;
                Some(CompiledCommand {
                    argv,
                    directory,
                    login: c.login.clone(),
                    password_env: c.password_env.clone(),
                    env: command::resolve_env(&ckey, &c.env)?,
                    temporary_codes: c.temporary_exit_codes.clone(),
                    timeout: (c.timeout_secs > 0).then(|| Duration::from_secs(c.timeout_secs)),
                })
            }
        };
        for (target, method) in &config.methods {
            if *method == AccessMethod::Command && command.is_none() {
                return Err(cfg_err(
                    &format!("methods.{target}"),
                    "\"sftp-account\" needs a [delivery.access.command] section".into(),
                ));
            }
        }
        Ok(Access {
            key: key.to_owned(),
            methods: config.methods.clone(),
            expiry_days: config.expiry_days,
            days: config.days,
            account,
            password_length: config.password_length,
            vendor_login: config.login.clone(),
            command,
        })
    }

    /// The method for target `target`: the configured one, else the one its kind
    /// implies (see [`AccessConfig`]). `storage` is the target's storage, `vendor` its
    /// vendor CLI (one of them is set).
    pub fn method_for(
        &self,
        target: &str,
        storage: Option<&AnyStorage>,
        vendor: Option<&VendorTarget>,
    ) -> AccessMethod {
        if let Some(m) = self.methods.get(target) {
            return *m;
        }
        if let Some(v) = vendor {
            return if v.can_create_users() {
                AccessMethod::Vendor
            } else {
                AccessMethod::None
            };
        }
        match storage {
            Some(AnyStorage::S3(_)) => AccessMethod::Presigned,
            Some(AnyStorage::Sftp(_)) if self.command.is_some() => AccessMethod::Command,
            _ => AccessMethod::None,
        }
    }

    /// Whether `[delivery.access] methods` names a method for `target` explicitly.
    pub fn has_method_for(&self, target: &str) -> bool {
        self.methods.contains_key(target)
    }

    /// The configured validity of presigned links, before clamping.
    pub fn expiry_days(&self) -> u32 {
        self.expiry_days
    }

    /// The configured validity of accounts.
    pub fn days(&self) -> u32 {
        self.days
    }

    /// The account name for the request's first customer e-mail, from the `account`
    /// template.
    pub fn account_name(&self, req: &AccessRequest) -> Result<String, AccessError> {
        let email = req
            .customer_emails
            .iter()
            .map(|e| e.trim())
            .find(|e| !e.is_empty())
            .ok_or_else(|| AccessError::NoCustomerEmail {
                analysis_id: req.analysis_id.clone(),
            })?;
        let account_err = |reason: String| AccessError::Account {
            email: email.to_owned(),
            reason,
        };
        let prefix =
            email_prefix(email).ok_or_else(|| account_err("not an e-mail address".into()))?;
        let mut vars = Vars::new();
        vars.insert("email_prefix", prefix.to_owned());
        vars.insert("analysis_id", req.analysis_id.clone());
        vars.insert("project", req.project_id.clone());
        let name = self
            .account
            .expand_text("account", &vars)
            .map_err(|e| account_err(e.to_string()))?;
        check_account_name(&name).map_err(account_err)
    }

    /// Give the customer access to a finished delivery on target `req.target`:
    /// presign links on `storage`, run the account command, or create the vendor
    /// account on `vendor` (see [`Access::method_for`]). Generated passwords come from
    /// [`generate_password`] unless the request carries one.
    pub async fn grant(
        &self,
        req: &AccessRequest,
        storage: Option<&AnyStorage>,
        vendor: Option<&VendorTarget>,
    ) -> Result<AccessGrant, AccessError> {
        let method = self.method_for(&req.target, storage, vendor);
        tracing::debug!(target_ = %req.target, method = %method, "granting customer access");
        match method {
            AccessMethod::None => Ok(AccessGrant::none()),
            AccessMethod::Presigned => {
                let storage = storage.ok_or_else(|| AccessError::NoPresign {
                    target: req.target.clone(),
                })?;
                presign(storage, &req.files, self.expiry_days, req.now).await
            }
            AccessMethod::Command => self.grant_command(req).await,
            AccessMethod::Vendor => {
                let vendor = vendor.ok_or_else(|| AccessError::Config {
                    key: format!("{}.methods.{}", self.key, req.target),
                    message: "\"vendor-user\" works only on a vendor target".into(),
                })?;
                self.grant_vendor(req, vendor).await
            }
        }
    }

    fn password(&self, req: &AccessRequest) -> Secret {
        req.password
            .clone()
            .unwrap_or_else(|| generate_password(self.password_length))
    }

    async fn grant_command(&self, req: &AccessRequest) -> Result<AccessGrant, AccessError> {
        let Some(c) = &self.command else {
            return Err(AccessError::Config {
                key: format!("{}.command", self.key),
                message: "an account command is needed for this target".into(),
            });
        };
        let user = self.account_name(req)?;
        let password = self.password(req);
        let expires_at = expiry(req.now, self.days);
        let mut vars = Vars::new();
        vars.insert("user", user.clone());
        vars.insert("analysis_id", req.analysis_id.clone());
        vars.insert("project", req.project_id.clone());
        vars.insert("key_prefix", req.key_prefix.clone());
        let dir = match &c.directory {
            Some(t) => t.expand_text("directory", &vars)?,
            None => req.key_prefix.clone(),
        };
        vars.insert("directory", dir.clone());
        vars.insert("days", self.days.to_string());
        vars.insert("expires", expires_at.format("%Y-%m-%d").to_string());
        vars.insert(
            "customer_email",
            req.customer_emails.first().cloned().unwrap_or_default(),
        );
        let mut env: Vec<(&str, &Secret)> = c.env.iter().map(|(n, s)| (n.as_str(), s)).collect();
        env.push((c.password_env.as_str(), &password));
        command::run(
            Invocation {
                step: "access",
                argv: c.argv.expand("access", &vars)?,
                env,
                timeout: c.timeout,
                temporary_codes: &c.temporary_codes,
                workdir: None,
                capture_stdout: None,
            },
            false,
        )
        .await?;
        tracing::info!(user = %user, days = self.days, expires_at = %expires_at, "customer account created by command");
        Ok(AccessGrant {
            method: AccessMethod::Command,
            links: Vec::new(),
            account: Some(Account {
                user,
                password,
                login: c.login.clone(),
                directory: Some(dir),
            }),
            expires_at: Some(expires_at),
            valid_days: Some(self.days),
            clamped_from: None,
        })
    }

    async fn grant_vendor(
        &self,
        req: &AccessRequest,
        vendor: &VendorTarget,
    ) -> Result<AccessGrant, AccessError> {
        let user = self.account_name(req)?;
        let password = self.password(req);
        let expires_at = expiry(req.now, self.days);
        vendor
            .create_user(&VendorUser {
                analysis_id: req.analysis_id.clone(),
                project: req.project_id.clone(),
                remote_dir: req.key_prefix.clone(),
                customer_email: req.customer_emails.first().cloned().unwrap_or_default(),
                user: user.clone(),
                password: password.clone(),
                days: self.days,
                expires_at,
            })
            .await?;
        Ok(AccessGrant {
            method: AccessMethod::Vendor,
            links: Vec::new(),
            account: Some(Account {
                user,
                password,
                login: self.vendor_login.clone(),
                directory: Some(req.key_prefix.clone()),
            }),
            expires_at: Some(expires_at),
            valid_days: Some(self.days),
            clamped_from: None,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn passwords_use_the_alphabet_and_differ() {
        let mut seen = std::collections::BTreeSet::new();
        for len in [8, 16, 40] {
            for _ in 0..200 {
                let pw = generate_password(len);
                let v = pw.expose();
                assert_eq!(v.len(), len);
                assert!(v.bytes().all(|b| PASSWORD_ALPHABET.contains(&b)), "{v}");
                assert!(v.bytes().any(|b| b.is_ascii_uppercase()));
                assert!(v.bytes().any(|b| b.is_ascii_lowercase()));
                assert!(v.bytes().any(|b| b.is_ascii_digit()));
                assert!(!v.contains(['0', 'O', '1', 'l', 'I']));
                assert!(seen.insert(v.to_owned()), "a password repeated: {v}");
                assert_eq!(format!("{pw}"), "****");
            }
        }
        assert_eq!(generate_password(0).expose().len(), 3);
    }

    #[test]
    fn presign_expiry_is_clamped_to_seven_days() {
        assert_eq!(clamp_presign_days(3), (3, false));
        assert_eq!(clamp_presign_days(7), (7, false));
        assert_eq!(clamp_presign_days(30), (7, true));
        assert_eq!(clamp_presign_days(0), (1, true));
        assert_eq!(days_duration(7), Duration::from_hours(7 * 24));
        let now = DateTime::parse_from_rfc3339("2025-01-30T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(expiry(now, 7).to_rfc3339(), "2025-02-06T10:00:00+00:00");
    }

    #[tokio::test]
    async fn local_targets_cannot_presign() {
        let dir = tempfile::tempdir().unwrap();
        let storage = AnyStorage::Local(labrelay::storage::LocalStorage::open(dir.path()).unwrap());
        let files = [SharedFile {
            path: "a.txt".into(),
            key: "p/A1/a.txt".into(),
            size: 1,
        }];
        let err = presign(&storage, &files, 30, Utc::now()).await.unwrap_err();
        assert!(matches!(err, AccessError::NoPresign { .. }), "{err}");
        assert_eq!(err.exit(), Exit::Config);
    }

    fn request(email: &str) -> AccessRequest {
        AccessRequest {
            target: "online".into(),
            analysis_id: "6cLB4ma".into(),
            project_id: "V3fmjM".into(),
            customer_emails: vec![email.into()],
            key_prefix: "6cLB4ma".into(),
            files: vec![],
            password: None,
            now: Utc::now(),
        }
    }

    #[test]
    fn account_names_follow_the_seed() {
        assert_eq!(email_prefix("807729670@qq.com"), Some("807729670"));
        assert_eq!(
            email_prefix("Wang Wei <wang.wei+seq@pku.edu.cn>"),
            Some("wang.wei")
        );
        assert_eq!(email_prefix("nobody"), None);
        assert_eq!(check_account_name("Wang.Wei").unwrap(), "wang.wei");
        assert!(check_account_name("-x").is_err());
        assert!(check_account_name("王伟").is_err());
        assert!(check_account_name(&"a".repeat(33)).is_err());

        let cfg: AccessConfig = toml::from_str("account = \"{email_prefix}online\"\n").unwrap();
        let access = Access::new("delivery.access", &cfg).unwrap();
        let req = request("807729670@qq.com");
        assert_eq!(access.account_name(&req).unwrap(), "807729670online");
        let mut no_mail = req.clone();
        no_mail.customer_emails = vec![" ".into()];
        assert!(matches!(
            access.account_name(&no_mail).unwrap_err(),
            AccessError::NoCustomerEmail { .. }
        ));
        let err = access
            .account_name(&request("王伟@example.cn"))
            .unwrap_err();
        assert_eq!(err.exit(), Exit::Failed);
        assert!(err.to_string().contains("account template"), "{err}");
    }

    #[test]
    fn method_follows_the_target_kind_unless_configured() {
        let dir = tempfile::tempdir().unwrap();
        let local = AnyStorage::Local(labrelay::storage::LocalStorage::open(dir.path()).unwrap());
        let cfg: labrelay::config::Config = labrelay::config::Config::from_toml(
            "[storage.s3]\nurl = \"s3://b/p\"\nendpoint = \"http://127.0.0.1:9\"\nregion = \"r\"\nallow_http = true\npath_style = true\naccess_key_id = \"AKIDEXAMPLE\"\nsecret_access_key = \"secret-example-key\"\n",
        )
        .unwrap();
        let s3 = AnyStorage::open(&cfg.storage["s3"]).unwrap();
        let access = Access::new("delivery.access", &AccessConfig::default()).unwrap();
        assert_eq!(
            access.method_for("oss", Some(&s3), None),
            AccessMethod::Presigned
        );
        assert_eq!(
            access.method_for("nas", Some(&local), None),
            AccessMethod::None
        );
        let cfg: AccessConfig =
            toml::from_str("methods = { oss = \"none\", nas = \"presigned\" }\n").unwrap();
        let access = Access::new("delivery.access", &cfg).unwrap();
        assert_eq!(
            access.method_for("oss", Some(&s3), None),
            AccessMethod::None
        );
        assert_eq!(
            access.method_for("nas", Some(&local), None),
            AccessMethod::Presigned
        );
    }

    #[test]
    fn config_is_checked() {
        let ok: AccessConfig = toml::from_str("expiry_days = 3\n").unwrap();
        let a = Access::new("k", &ok).unwrap();
        assert_eq!(a.expiry_days(), 3);
        assert_eq!(a.days(), DEFAULT_ACCOUNT_DAYS);
        let default = Access::new("k", &AccessConfig::default()).unwrap();
        assert_eq!(default.expiry_days(), MAX_PRESIGN_DAYS);

        let typo = toml::from_str::<AccessConfig>("expiry_dayz = 3\n");
        assert!(typo.unwrap_err().to_string().contains("expiry_dayz"));
        let typo = toml::from_str::<AccessConfig>("[command]\nargv = [\"x\"]\nlogn = \"x\"\n");
        assert!(typo.unwrap_err().to_string().contains("logn"));
        assert!(toml::from_str::<AccessConfig>("methods = { a = \"ftp\" }\n").is_err());
        let aliases: AccessConfig =
            toml::from_str("methods = { a = \"vendor\", b = \"vendor-user\" }\n").unwrap();
        assert_eq!(aliases.methods["a"], AccessMethod::Vendor);
        assert_eq!(aliases.methods["b"], AccessMethod::Vendor);

        let leak: AccessConfig = toml::from_str(
            "[command]\nargv = [\"mkuser\", \"{user}\", \"--password={password}\"]\n",
        )
        .unwrap();
        let err = Access::new("delivery.access", &leak).unwrap_err();
        assert_eq!(err.exit(), Exit::Config);
        let msg = err.to_string();
        assert!(msg.contains("delivery.access.command.argv"), "{msg}");
        assert!(msg.contains(DEFAULT_ACCESS_PASSWORD_ENV), "{msg}");

        let short: AccessConfig = toml::from_str("password_length = 4\n").unwrap();
        let err = Access::new("k", &short).unwrap_err();
        assert!(err.to_string().contains("password_length"), "{err}");
        let zero: AccessConfig = toml::from_str("expiry_days = 0\n").unwrap();
        assert!(Access::new("k", &zero).is_err());
        let no_cmd: AccessConfig = toml::from_str("methods = { x = \"sftp-account\" }\n").unwrap();
        let err = Access::new("delivery.access", &no_cmd).unwrap_err();
        assert!(
            err.to_string().contains("delivery.access.methods.x"),
            "{err}"
        );
    }

    #[test]
    fn records_and_debug_carry_no_secret() {
        let grant = AccessGrant {
            method: AccessMethod::Command,
            links: vec![FileLink {
                path: "a.txt".into(),
                key: "p/a.txt".into(),
                size: 3,
                url: url::Url::parse("https://s3.example/b/p/a.txt?X-Amz-Credential=AK%2F1&X-Amz-Signature=deadbeefcafe").unwrap(),
            }],
            account: Some(Account {
                user: "wang".into(),
                password: Secret::new("Pw-In-A-Record-77"),
                login: Some("sftp://sftp.example.org".into()),
                directory: Some("/data/A1".into()),
            }),
            expires_at: Some(Utc::now()),
            valid_days: Some(30),
            clamped_from: None,
        };
        let json = serde_json::to_string(&grant.record()).unwrap();
        assert!(!json.contains("Pw-In-A-Record"), "{json}");
        assert!(!json.contains("deadbeef"), "{json}");
        assert!(json.contains("\"account\":\"wang\""), "{json}");
        let dbg = format!("{grant:?}");
        assert!(!dbg.contains("Pw-In-A-Record"), "{dbg}");
        assert!(!dbg.contains("deadbeef"), "{dbg}");
        assert!(grant.is_expired(Utc::now() + chrono::Duration::seconds(1)));
    }
}
