//! Configuration: the file format, where files are found, and the order in which
//! sources override each other.
//!
//! Precedence, highest first: command-line flags (applied by each tool after loading),
//! `LABRELAY_*` environment variables, `--config FILE`,
//! `$XDG_CONFIG_HOME/labrelay/config.toml`, `/etc/labrelay/config.toml`, built-in
//! defaults. Files are merged key by key, so a
//! user file can override one `[databases.lims]` key of the system file. `--no-config`
//! loads no file at all (reproducible cron runs).
//!
//! Every table rejects unknown keys, naming the key and the file, because a misspelt
//! `pasword` silently ignored is worse than a refused start. This module does not open
//! connections; the modules that own each section do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::env;
use crate::exit::Exit;
use crate::secret::{RedactedUrl, SecretSpec};

/// Configuration problems. Always exit 78.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A config file exists but cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file given explicitly does not exist.
    #[error("config file {0} does not exist")]
    NotFound(PathBuf),
    /// Syntax error, wrong type or unknown key.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file (or `environment` for variables).
        path: PathBuf,
        /// The parser's message, which names the key.
        message: String,
    },
    /// A value that parses but makes no sense.
    #[error("invalid configuration value {key}: {message}")]
    Invalid {
        /// Dotted key, e.g. `storage.delivery.url`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A section a tool needs is absent.
    #[error("missing configuration: {0}")]
    Missing(String),
}

impl ConfigError {
    /// Configuration errors exit 78.
    pub fn exit(&self) -> Exit {
        Exit::Config
    }
}

/// The whole configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directories.
    #[serde(default)]
    pub paths: PathsConfig,
    /// labrelay's own state database.
    #[serde(default)]
    pub state: StateConfig,
    /// Named databases (`[databases.lims]`).
    #[serde(default)]
    pub databases: BTreeMap<String, DatabaseConfig>,
    /// Named storage targets (`[storage.customer]`).
    #[serde(default)]
    pub storage: BTreeMap<String, StorageConfig>,
    /// Named SSH hosts (`[ssh.cluster]`).
    #[serde(default)]
    pub ssh: BTreeMap<String, SshConfig>,
    /// Outgoing mail settings shared by SMTP and the outbox.
    #[serde(default)]
    pub mail: MailConfig,
    /// Outgoing mail server; absent means "write .eml files to the outbox".
    pub smtp: Option<SmtpConfig>,
    /// Incoming mail server.
    pub imap: Option<ImapConfig>,
    /// Message queue.
    #[serde(default)]
    pub queue: QueueConfig,
    /// When tools may start new work.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// `[retry]`: how temporary failures are retried, by every client and tool.
    #[serde(default)]
    pub retry: crate::retry::RetryPolicy,
    /// `[delivery]`: owned and typed by the `delivery` crate (see [`Config::section`]).
    pub delivery: Option<toml::Value>,
    /// `[mail_query]`: owned and typed by the `mail-query` tool.
    pub mail_query: Option<toml::Value>,
    /// `[sync]`: owned and typed by the `sync-publish` tool.
    pub sync: Option<toml::Value>,
    /// `[jobs]`: owned and typed by the `jobs` crate.
    pub jobs: Option<toml::Value>,
    /// `[tasks.NAME]`: the job registry, owned and typed by the `jobs` crate.
    pub tasks: Option<toml::Value>,
    /// `[sandbox]`: owned and typed by the `sandbox` crate.
    pub sandbox: Option<toml::Value>,
    /// `[languages.NAME]`: the sandbox's languages, owned and typed by the `sandbox` crate.
    pub languages: Option<toml::Value>,
    /// The files read (path and text), so a tool section's type error can be reported
    /// with its file and line ([`Config::section`]).
    #[serde(skip)]
    sources: Sources,
}

/// The texts of the config files read. Debug shows only the paths: a text may hold a
/// password.
#[derive(Default)]
struct Sources(Vec<(PathBuf, String)>);

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(p, _)| p))
            .finish()
    }
}

/// `[paths]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathsConfig {
    /// Where state, the embedded queue, locks and the outbox live.
    pub data_dir: Option<PathBuf>,
}

/// `[state]`: where labrelay keeps its own tables.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// A database URL; default `sqlite://<data_dir>/state.db`.
    pub url: Option<RedactedUrl>,
    /// Or the name of a `[databases.NAME]` section.
    pub database: Option<String>,
}

fn default_connect_timeout() -> u64 {
    10
}
fn default_statement_timeout() -> u64 {
    300
}
fn default_max_connections() -> u32 {
    5
}

/// `[databases.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://`, `mysql://` / `mariadb://` or `sqlite://PATH` (or `sqlite::memory:`).
    pub url: RedactedUrl,
    /// Password, if not in the URL (`env:NAME`, `file:PATH` or literal).
    pub password: Option<SecretSpec>,
    /// Seconds to wait for a connection.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Seconds a single statement may run (0 = no limit).
    #[serde(default = "default_statement_timeout")]
    pub statement_timeout_secs: u64,
    /// Pool size.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Open the connection read-only (PostgreSQL, MariaDB: read-only transactions; SQLite: `mode=ro`).
    #[serde(default)]
    pub read_only: bool,
}

/// How a host key is checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostKeyPolicy {
    /// The host must be in known_hosts with this key (default).
    #[default]
    Strict,
    /// An unknown host is added to known_hosts; a changed key is still refused.
    AcceptNew,
}

/// `[storage.NAME]`: a delivery target.
// The bools are independent TOML switches (`path_style = true`), not states.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// A local directory path (or `file:///path`), `s3://bucket/prefix`, or
    /// `sftp://user@host:port/path`.
    pub url: String,
    /// S3: endpoint URL (e.g. `https://oss-cn-shenzhen.aliyuncs.com`); default AWS.
    pub endpoint: Option<String>,
    /// S3: region; must match the server's.
    pub region: Option<String>,
    /// S3: path-style addressing (`endpoint/bucket/key`) instead of virtual-hosted.
    #[serde(default)]
    pub path_style: bool,
    /// S3: access key id.
    pub access_key_id: Option<SecretSpec>,
    /// S3: secret access key.
    pub secret_access_key: Option<SecretSpec>,
    /// S3: allow a plain-HTTP endpoint.
    #[serde(default)]
    pub allow_http: bool,
    /// S3: PEM file of CA certificates trusted for the HTTPS endpoint in addition to
    /// the system's (a private CA).
    pub ca_file: Option<PathBuf>,
    /// S3: include the SHA-256 of every upload in its signature instead of
    /// `UNSIGNED-PAYLOAD` (uploads always carry `Content-MD5`). Only for servers that
    /// refuse unsigned payloads; costs a SHA-256 pass on both ends.
    #[serde(default)]
    pub sign_payload: bool,
    /// S3: multipart part size in MiB (default derived from the file size).
    pub part_size_mib: Option<u64>,
    /// Parts uploaded at once within one file.
    pub part_concurrency: Option<usize>,
    /// SFTP: password.
    pub password: Option<SecretSpec>,
    /// SFTP: private key file.
    pub key_file: Option<PathBuf>,
    /// SFTP: passphrase of the key.
    pub key_passphrase: Option<SecretSpec>,
    /// SFTP: known_hosts file (default `~/.ssh/known_hosts`).
    pub known_hosts: Option<PathBuf>,
    /// SFTP: host key policy.
    #[serde(default)]
    pub host_key_policy: HostKeyPolicy,
    /// Seconds before a network operation is abandoned.
    pub timeout_secs: Option<u64>,
    /// Local and SFTP: create the base folder when it does not exist, instead of
    /// refusing to start. Off by default: a missing folder usually means a missing
    /// mount or a typo, which a new empty folder would hide. No effect on S3.
    #[serde(default)]
    pub create_root: bool,
    /// The section's name (`NAME` of `[storage.NAME]`), filled in when the
    /// configuration is parsed, for messages; empty for a section built otherwise.
    #[serde(skip)]
    pub name: String,
}

/// `[ssh.NAME]`: a host for remote commands.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    /// Host name or address.
    pub host: String,
    /// Port (default 22).
    #[serde(default = "default_ssh_port")]
    pub port: u16,
    /// Login user.
    pub user: String,
    /// Password authentication.
    pub password: Option<SecretSpec>,
    /// Key authentication.
    pub key_file: Option<PathBuf>,
    /// Passphrase of the key.
    pub key_passphrase: Option<SecretSpec>,
    /// known_hosts file (default `~/.ssh/known_hosts`).
    pub known_hosts: Option<PathBuf>,
    /// Host key policy.
    #[serde(default)]
    pub host_key_policy: HostKeyPolicy,
    /// Seconds before connect or a blocking call gives up.
    #[serde(default = "default_ssh_timeout")]
    pub timeout_secs: u64,
}

fn default_ssh_port() -> u16 {
    22
}
fn default_ssh_timeout() -> u64 {
    30
}

/// TLS mode of a mail connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain TCP (only sensible on loopback).
    None,
    /// Plain TCP upgraded with STARTTLS (required).
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS 465, IMAPS 993).
    Tls,
}

/// `[mail]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailConfig {
    /// Default From address, e.g. `"Lab delivery <delivery@example.org>"`.
    pub from: Option<String>,
    /// Where .eml files go when no `[smtp]` is configured (default `<data_dir>/outbox`).
    pub outbox_dir: Option<PathBuf>,
}

/// `[smtp]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// Server host.
    pub host: String,
    /// Port (default by security: 25 none, 587 starttls, 465 tls).
    pub port: Option<u16>,
    /// TLS mode.
    #[serde(default)]
    pub security: TlsMode,
    /// Login user (no authentication when absent).
    pub username: Option<String>,
    /// Login password.
    pub password: Option<SecretSpec>,
    /// Seconds before a send is abandoned.
    #[serde(default = "default_mail_timeout")]
    pub timeout_secs: u64,
    /// Name sent in EHLO (default: the host name).
    pub hello_name: Option<String>,
    /// PEM file of CA certificates trusted in addition to the system's (a private CA).
    pub ca_file: Option<PathBuf>,
}

/// `[imap]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImapConfig {
    /// Server host.
    pub host: String,
    /// Port (default 143, or 993 with `security = "tls"`).
    pub port: Option<u16>,
    /// TLS mode.
    #[serde(default)]
    pub security: TlsMode,
    /// Login user.
    pub username: String,
    /// Login password.
    pub password: SecretSpec,
    /// Folder to read (default INBOX).
    #[serde(default = "default_folder")]
    pub folder: String,
    /// Seconds before a network operation is abandoned.
    #[serde(default = "default_mail_timeout")]
    pub timeout_secs: u64,
    /// PEM file of CA certificates trusted in addition to the system's (a private CA).
    pub ca_file: Option<PathBuf>,
}

fn default_mail_timeout() -> u64 {
    60
}
fn default_folder() -> String {
    "INBOX".to_owned()
}

/// `[queue]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// `amqp://user@host:5672/vhost` or `sqlite://PATH`; default `sqlite://<data_dir>/queue.db`.
    pub url: Option<RedactedUrl>,
    /// AMQP password if not in the URL.
    pub password: Option<SecretSpec>,
    /// Unacknowledged messages a consumer may hold.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Deliveries after which a message goes to the dead-letter queue.
    #[serde(default = "default_max_deliveries")]
    pub max_deliveries: u32,
    /// Embedded queue: seconds a delivered message stays invisible before it is
    /// redelivered, unless its consumer is alive and renews the lease.
    #[serde(default = "default_lease")]
    pub lease_secs: u64,
    /// `amqps://`: PEM file of CA certificates trusted in addition to the system's (a
    /// private CA).
    pub ca_file: Option<PathBuf>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            url: None,
            password: None,
            prefetch: default_prefetch(),
            max_deliveries: default_max_deliveries(),
            lease_secs: default_lease(),
            ca_file: None,
        }
    }
}

fn default_prefetch() -> u16 {
    1
}
fn default_max_deliveries() -> u32 {
    5
}
fn default_lease() -> u64 {
    60
}

/// `[schedule]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Hours (local time) when tools start no new work, e.g. `"0-6,22-23"`.
    pub rest_hours: Option<String>,
}

/// The certificates of a `ca_file` key: trusted roots added to the system's for one
/// TLS connection (a facility's private CA).
#[derive(Debug, Clone)]
pub struct CaCerts {
    /// The file, for messages.
    pub path: PathBuf,
    /// The file's text (PEM), for libraries that take PEM.
    pub pem: String,
    /// The certificates, DER-encoded, in file order.
    pub der: Vec<rustls_pki_types::CertificateDer<'static>>,
}

impl CaCerts {
    /// Read and check the PEM file of key `key` (`imap.ca_file`): it must hold at least
    /// one certificate, and each must be usable as a trust anchor. Any problem is a
    /// [`ConfigError::Invalid`] naming the key and the file (exit 78).
    pub fn load(key: &str, path: &Path) -> Result<CaCerts, ConfigError> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject as _;

        let invalid = |message: String| ConfigError::Invalid {
            key: key.to_owned(),
            message: format!("{}: {message}", path.display()),
        };
        let bytes = fs_err::read(path).map_err(|e| ConfigError::Invalid {
            key: key.to_owned(),
            // fs-err's message already names the file.
            message: e.to_string(),
        })?;
        let pem = String::from_utf8(bytes)
            .map_err(|_| invalid("not a PEM file (not text)".to_owned()))?;
        let der = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("not a valid PEM file: {e}")))?;
        if der.is_empty() {
            return Err(invalid(
                "holds no certificate (expected PEM blocks \"-----BEGIN CERTIFICATE-----\")"
                    .to_owned(),
            ));
        }
        for (i, cert) in der.iter().enumerate() {
            webpki::anchor_from_trusted_cert(cert)
                .map_err(|e| invalid(format!("certificate {} is not usable: {e}", i + 1)))?;
        }
        Ok(CaCerts {
            path: path.to_owned(),
            pem,
            der,
        })
    }

    /// [`CaCerts::load`] for an optional key.
    pub fn load_optional(key: &str, path: Option<&Path>) -> Result<Option<CaCerts>, ConfigError> {
        path.map(|p| CaCerts::load(key, p)).transpose()
    }
}

/// How to find config files.
#[derive(Debug, Default, Clone)]
pub struct LoadOptions {
    /// `--config FILE`.
    pub explicit: Option<PathBuf>,
    /// `--no-config`.
    pub no_config: bool,
}

/// A loaded configuration and where it came from.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The merged configuration.
    pub config: Config,
    /// Files read, lowest precedence first.
    pub files: Vec<PathBuf>,
    /// Warnings to show once logging is set up (e.g. secrets in a readable file).
    pub warnings: Vec<String>,
}

/// The system-wide config file.
pub fn system_config_path() -> PathBuf {
    env::get(env::LABRELAY_SYSTEM_CONFIG)
        .map_or_else(|| PathBuf::from("/etc/labrelay/config.toml"), PathBuf::from)
}

/// The user's config file (`$XDG_CONFIG_HOME/labrelay/config.toml`).
pub fn user_config_path() -> Option<PathBuf> {
    let base = env::get(env::XDG_CONFIG_HOME)
        .map(PathBuf::from)
        .or_else(|| env::get(env::HOME).map(|h| Path::new(&h).join(".config")))?;
    Some(base.join("labrelay").join("config.toml"))
}

/// Default data directory (`$XDG_DATA_HOME/labrelay`).
pub fn default_data_dir() -> PathBuf {
    env::get(env::XDG_DATA_HOME)
        .map(PathBuf::from)
        .or_else(|| env::get(env::HOME).map(|h| Path::new(&h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/var/lib"))
        .join("labrelay")
}

impl Config {
    /// Load files and environment with the documented precedence.
    pub fn load(opts: &LoadOptions) -> Result<Loaded, ConfigError> {
        let mut merged = toml::Table::new();
        let mut files = Vec::new();
        let mut sources = Vec::new();
        let mut warnings = Vec::new();
        let no_config = opts.no_config || env::flag(env::LABRELAY_NO_CONFIG);
        if !no_config {
            let mut candidates: Vec<(PathBuf, bool)> = vec![(system_config_path(), false)];
            if let Some(user) = user_config_path() {
                candidates.push((user, false));
            }
            let explicit = opts
                .explicit
                .clone()
                .or_else(|| env::get(env::LABRELAY_CONFIG).map(PathBuf::from));
            if let Some(p) = explicit {
                candidates.push((p, true));
            }
            for (path, required) in candidates {
                let text = match std::fs::read(&path) {
                    Ok(bytes) => decode_text(&bytes),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(ConfigError::NotFound(path));
                    }
                    Err(source) => return Err(ConfigError::Read { path, source }),
                };
                let table = parse_file(&path, &text)?;
                warnings.extend(readable_secret_warning(&path, &table));
                merge(&mut merged, table);
                sources.push((path.clone(), text));
                files.push(path);
            }
        }
        apply_env(&mut merged);
        let mut config =
            Config::deserialize(toml::Value::Table(merged)).map_err(|e| ConfigError::Parse {
                path: files
                    .last()
                    .cloned()
                    .unwrap_or_else(|| PathBuf::from("environment")),
                message: e.message().trim().to_owned(),
            })?;
        config.sources = Sources(sources);
        config.name_sections();
        config.validate()?;
        Ok(Loaded {
            config,
            files,
            warnings,
        })
    }

    /// Parse one TOML text (tests, `--config -`).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let path = PathBuf::from("<string>");
        let table = parse_file(&path, text)?;
        let mut config =
            Config::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Parse {
                path: path.clone(),
                message: e.message().trim().to_owned(),
            })?;
        config.sources = Sources(vec![(path, text.to_owned())]);
        config.name_sections();
        config.validate()?;
        Ok(config)
    }

    /// Tell each `[storage.NAME]` section its name, for messages.
    fn name_sections(&mut self) {
        for (name, s) in &mut self.storage {
            s.name.clone_from(name);
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (name, s) in &self.storage {
            crate::storage::Target::parse(&s.url).map_err(|message| ConfigError::Invalid {
                key: format!("storage.{name}.url"),
                message,
            })?;
        }
        self.retry
            .validate()
            .map_err(|message| ConfigError::Invalid {
                key: "retry".into(),
                message,
            })?;
        if let Some(h) = &self.schedule.rest_hours {
            crate::schedule::RestHours::parse(h).map_err(|message| ConfigError::Invalid {
                key: "schedule.rest_hours".into(),
                message,
            })?;
        }
        // A private CA that cannot be read is reported now, before any work, rather
        // than by the first connection.
        let ca_files = self
            .storage
            .iter()
            .map(|(name, s)| (format!("storage.{name}.ca_file"), &s.ca_file))
            .chain(
                self.smtp
                    .iter()
                    .map(|s| ("smtp.ca_file".to_owned(), &s.ca_file)),
            )
            .chain(
                self.imap
                    .iter()
                    .map(|i| ("imap.ca_file".to_owned(), &i.ca_file)),
            )
            .chain([("queue.ca_file".to_owned(), &self.queue.ca_file)]);
        for (key, path) in ca_files {
            if let Some(path) = path {
                CaCerts::load(&key, path)?;
            }
        }
        if let Some(db) = &self.state.database
            && !self.databases.contains_key(db)
        {
            return Err(ConfigError::Invalid {
                key: "state.database".into(),
                message: format!("no [databases.{db}] section"),
            });
        }
        Ok(())
    }

    /// A tool's own section, typed by the tool. The shared crate only knows the
    /// section's name; the tool's type should `deny_unknown_fields`, and a bad key is
    /// reported as `NAME.key`. `None` when the section is absent.
    pub fn section<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, ConfigError> {
        let raw = match name {
            "delivery" => &self.delivery,
            "mail_query" => &self.mail_query,
            "sync" => &self.sync,
            "jobs" => &self.jobs,
            "tasks" => &self.tasks,
            "sandbox" => &self.sandbox,
            "languages" => &self.languages,
            other => {
                return Err(ConfigError::Missing(format!(
                    "no tool section named [{other}] is known"
                )));
            }
        };
        raw.clone()
            .map(|v| {
                T::deserialize(v).map_err(|e| {
                    // Deserialize the section again from each file's text, which keeps
                    // the spans: the error then names the file, line and key.
                    self.sources
                        .0
                        .iter()
                        .find_map(|(path, text)| {
                            section_in_text::<T>(name, text).err().map(|e| {
                                match toml_error(path, text, &e) {
                                    ConfigError::Parse { path, message } => ConfigError::Parse {
                                        path,
                                        message: format!("{message} (in [{name}])"),
                                    },
                                    other => other,
                                }
                            })
                        })
                        .unwrap_or_else(|| ConfigError::Invalid {
                            key: name.to_owned(),
                            message: e.message().trim().to_owned(),
                        })
                })
            })
            .transpose()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.paths.data_dir.clone().unwrap_or_else(default_data_dir)
    }

    /// A named database section, or an error naming it.
    pub fn database(&self, name: &str) -> Result<&DatabaseConfig, ConfigError> {
        self.databases
            .get(name)
            .ok_or_else(|| ConfigError::Missing(format!("[databases.{name}] section")))
    }

    /// A named storage section, or an error naming it.
    pub fn storage(&self, name: &str) -> Result<&StorageConfig, ConfigError> {
        self.storage
            .get(name)
            .ok_or_else(|| ConfigError::Missing(format!("[storage.{name}] section")))
    }

    /// A named ssh section, or an error naming it.
    pub fn ssh(&self, name: &str) -> Result<&SshConfig, ConfigError> {
        self.ssh
            .get(name)
            .ok_or_else(|| ConfigError::Missing(format!("[ssh.{name}] section")))
    }

    /// The state database: explicit URL, a named database, or SQLite in the data dir.
    pub fn state_database(&self) -> Result<DatabaseConfig, ConfigError> {
        if let Some(url) = &self.state.url {
            return Ok(DatabaseConfig::from_url(url.clone()));
        }
        if let Some(name) = &self.state.database {
            return self.database(name).cloned();
        }
        let path = self.data_dir().join("state.db");
        let url =
            url::Url::parse(&format!("sqlite://{}?mode=rwc", path.display())).map_err(|e| {
                ConfigError::Invalid {
                    key: "paths.data_dir".into(),
                    message: e.to_string(),
                }
            })?;
        Ok(DatabaseConfig::from_url(RedactedUrl::new(url)))
    }

    /// The queue URL: configured, or the embedded SQLite queue in the data dir.
    pub fn queue_url(&self) -> Result<RedactedUrl, ConfigError> {
        if let Some(u) = &self.queue.url {
            return Ok(u.clone());
        }
        let path = self.data_dir().join("queue.db");
        url::Url::parse(&format!("sqlite://{}", path.display()))
            .map(RedactedUrl::new)
            .map_err(|e| ConfigError::Invalid {
                key: "paths.data_dir".into(),
                message: e.to_string(),
            })
    }

    /// Where outbox .eml files go.
    pub fn outbox_dir(&self) -> PathBuf {
        self.mail
            .outbox_dir
            .clone()
            .unwrap_or_else(|| self.data_dir().join("outbox"))
    }
}

impl DatabaseConfig {
    /// A section with default timeouts for a URL.
    pub fn from_url(url: RedactedUrl) -> Self {
        DatabaseConfig {
            url,
            password: None,
            connect_timeout_secs: default_connect_timeout(),
            statement_timeout_secs: default_statement_timeout(),
            max_connections: default_max_connections(),
            read_only: false,
        }
    }
}

/// Deserialize only the tool section `name` of a file's text (other keys are ignored),
/// so an error carries its span.
fn section_in_text<T: serde::de::DeserializeOwned>(
    name: &str,
    text: &str,
) -> Result<(), toml::de::Error> {
    #[derive(Deserialize)]
    struct Delivery<T> {
        #[allow(dead_code)]
        delivery: Option<T>,
    }
    #[derive(Deserialize)]
    struct MailQuery<T> {
        #[allow(dead_code)]
        mail_query: Option<T>,
    }
    #[derive(Deserialize)]
    struct Sync<T> {
        #[allow(dead_code)]
        sync: Option<T>,
    }
    #[derive(Deserialize)]
    struct Jobs<T> {
        #[allow(dead_code)]
        jobs: Option<T>,
    }
    #[derive(Deserialize)]
    struct Tasks<T> {
        #[allow(dead_code)]
        tasks: Option<T>,
    }
    match name {
        "delivery" => toml::from_str::<Delivery<T>>(text).map(drop),
        "mail_query" => toml::from_str::<MailQuery<T>>(text).map(drop),
        "sync" => toml::from_str::<Sync<T>>(text).map(drop),
        "jobs" => toml::from_str::<Jobs<T>>(text).map(drop),
        "tasks" => toml::from_str::<Tasks<T>>(text).map(drop),
        _ => Ok(()),
    }
}

/// Config files may be saved in GBK/GB2312 by editors on Chinese Windows; accept them.
fn decode_text(bytes: &[u8]) -> String {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => encoding_rs::GB18030.decode(bytes).0.into_owned(),
    }
}

fn parse_file(path: &Path, text: &str) -> Result<toml::Table, ConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
    // Check each file on its own so an unknown key is reported with its file and line.
    // Deserializing from the text (not the table) keeps the spans.
    toml::from_str::<Config>(text).map_err(|e| toml_error(path, text, &e))?;
    Ok(table)
}

/// The parser's message with a line and column, but without the quoted source line
/// that toml's Display adds: that line may hold a password.
fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("line {line}, column {col}: ")
    });
    ConfigError::Parse {
        path: path.to_owned(),
        message: format!("{}{}", at.unwrap_or_default(), e.message().trim()),
    }
}

const SECRET_KEYS: &[&str] = &[
    "password",
    "secret_access_key",
    "access_key_id",
    "key_passphrase",
];

/// The warning for a config file that holds a password (a literal secret, or a URL
/// with one inside) and that other users can read; `None` when there is nothing to say.
fn readable_secret_warning(path: &Path, table: &toml::Table) -> Option<String> {
    (has_literal_secret(table) && readable_by_others(path)).then(|| {
        format!(
            "config file {} holds a password but is readable by other users; \
             run `chmod 600` on it or use env:NAME / file:PATH secrets",
            path.display()
        )
    })
}

fn has_literal_secret(table: &toml::Table) -> bool {
    table.iter().any(|(k, v)| match v {
        toml::Value::Table(t) => has_literal_secret(t),
        toml::Value::String(s) if SECRET_KEYS.contains(&k.as_str()) => {
            SecretSpec::parse(s).is_literal()
        }
        // `[databases.NAME] url`, `[state] url`, `[queue] url`: a password inside the
        // URL is as exposed as a `password = "..."` literal.
        toml::Value::String(s) if k == "url" || k.ends_with("_url") => {
            RedactedUrl::parse(s).is_ok_and(|u| u.holds_secret())
        }
        _ => false,
    })
}

fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
}

/// Deep-merge `top` into `base`: tables merge key by key, other values replace.
fn merge(base: &mut toml::Table, top: toml::Table) {
    for (k, v) in top {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge(b, t),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set(table: &mut toml::Table, path: &[&str], value: String) {
    let (last, parents) = path.split_last().expect("non-empty key path");
    let mut t = table;
    for p in parents {
        let entry = t
            .entry((*p).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        t = entry.as_table_mut().expect("just made a table");
    }
    t.insert((*last).to_owned(), toml::Value::String(value));
}

fn apply_env(table: &mut toml::Table) {
    if let Some(v) = env::get(env::LABRELAY_DATA_DIR) {
        set(table, &["paths", "data_dir"], v);
    }
    if let Some(v) = env::get(env::LABRELAY_QUEUE_URL) {
        set(table, &["queue", "url"], v);
    }
    if let Some(v) = env::get(env::LABRELAY_STATE_URL) {
        set(table, &["state", "url"], v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_mode(dir: &Path, mode: u32, text: &str) -> (PathBuf, toml::Table) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(format!("config-{mode:o}.toml"));
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let table = parse_file(&path, text).unwrap();
        (path, table)
    }

    /// A database URL with the password inside, in a file others can read, gets the
    /// same warning as `password = "..."` there.
    #[test]
    fn password_in_a_url_in_a_readable_file_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let literal = "[smtp]\nhost = \"h\"\nusername = \"u\"\npassword = \"pw\"\n";
        let (path, table) = file_with_mode(dir.path(), 0o644, literal);
        let want = readable_secret_warning(&path, &table).unwrap();
        for text in [
            "[databases.lims]\nurl = \"mysql://u:pw@host/db\"\n",
            "[state]\nurl = \"postgres://u:pw@db.example.org/state\"\n",
            "[queue]\nurl = \"amqp://u:pw@mq.example.org:5672/%2f\"\n",
            "[databases.lims]\nurl = \"postgres://db.example.org/lims?password=pw\"\n",
        ] {
            for mode in [0o644, 0o640] {
                let (path, table) = file_with_mode(dir.path(), mode, text);
                let got = readable_secret_warning(&path, &table);
                assert_eq!(
                    got.as_deref(),
                    Some(
                        want.replace("config-644", &format!("config-{mode:o}"))
                            .as_str()
                    ),
                    "{text}"
                );
            }
            let (path, table) = file_with_mode(dir.path(), 0o600, text);
            assert_eq!(readable_secret_warning(&path, &table), None, "{text}");
        }
        for harmless in [
            "[databases.lims]\nurl = \"mysql://u@host/db\"\npassword = \"env:LIMS_PW\"\n",
            "[databases.lims]\nurl = \"sqlite:///var/lib/labrelay/lims.db\"\n",
            "[storage.nas]\nurl = \"/nas/delivery\"\n",
        ] {
            let (path, table) = file_with_mode(dir.path(), 0o644, harmless);
            assert_eq!(readable_secret_warning(&path, &table), None, "{harmless}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[smtp]\nhost = \"x\"\npasword = \"y\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("pasword"), "{msg}");
        assert_eq!(err.exit(), Exit::Config);
        let err = Config::from_toml("colour = 1\n").unwrap_err().to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn parse_errors_give_the_line_but_never_echo_a_password() {
        let err =
            Config::from_toml("[databases.x]\nurl = \"mysql://root:topsecret@db:99999999/x\"\n")
                .unwrap_err()
                .to_string();
        assert!(!err.contains("topsecret"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        let err = Config::from_toml("[smtp]\nhost = \"h\"\npassword = \"hunter22\"\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 4") && err.contains("bogus"), "{err}");
        assert!(!err.contains("hunter22"), "{err}");
    }

    #[test]
    fn named_sections_parse() {
        let c = Config::from_toml(
            r#"
            [paths]
            data_dir = "/srv/labrelay"
            [databases.lims]
            url = "mysql://reader@db.example.org/lims"
            password = "env:LIMS_PASSWORD"
            [storage.customer]
            url = "s3://delivery/online"
            endpoint = "http://127.0.0.1:3900"
            region = "garage"
            path_style = true
            [storage.archive]
            url = "sftp://deliver@sftp.example.org:2222/data"
            [queue]
            url = "amqp://guest@127.0.0.1:5672/%2f"
            [schedule]
            rest_hours = "0-6,23"
            "#,
        )
        .unwrap();
        assert_eq!(c.data_dir(), PathBuf::from("/srv/labrelay"));
        assert!(matches!(
            c.databases["lims"].password,
            Some(SecretSpec::Env(_))
        ));
        assert!(c.storage["customer"].path_style);
        assert_eq!(c.outbox_dir(), PathBuf::from("/srv/labrelay/outbox"));
        assert!(
            c.state_database()
                .unwrap()
                .url
                .to_string()
                .contains("/srv/labrelay/state.db")
        );
    }

    #[test]
    fn tool_sections_are_typed_by_their_owner() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Delivery {
            target: String,
        }
        let c = Config::from_toml("[delivery]\ntarget = \"oss\"\n").unwrap();
        let d: Delivery = c.section("delivery").unwrap().unwrap();
        assert_eq!(d.target, "oss");
        let c = Config::from_toml("[delivery]\ntarget = \"oss\"\ntargte = 1\n").unwrap();
        let err = c.section::<Delivery>("delivery").unwrap_err();
        assert!(err.to_string().contains("targte") && err.to_string().contains("delivery"));
        assert!(
            Config::default()
                .section::<Delivery>("delivery")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn bad_storage_url_names_the_key() {
        let err = Config::from_toml("[storage.x]\nurl = \"ftp://h/p\"\n").unwrap_err();
        assert!(err.to_string().contains("storage.x.url"), "{err}");
    }

    #[test]
    fn files_merge_key_by_key_and_explicit_wins() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("system.toml");
        let mine = dir.path().join("mine.toml");
        std::fs::write(
            &sys,
            "[paths]\ndata_dir = \"/a\"\n[mail]\nfrom = \"sys@x\"\n",
        )
        .unwrap();
        std::fs::write(&mine, "[paths]\ndata_dir = \"/b\"\n").unwrap();
        // SAFETY of env mutation: this test module is the only one touching these
        // variables, and the test binary for unit tests runs them in one process; we use
        // names no other test reads.
        let cfg = with_env(
            &[
                (env::LABRELAY_SYSTEM_CONFIG, sys.to_str().unwrap()),
                (
                    env::XDG_CONFIG_HOME,
                    dir.path().join("none").to_str().unwrap(),
                ),
            ],
            || {
                Config::load(&LoadOptions {
                    explicit: Some(mine.clone()),
                    no_config: false,
                })
            },
        )
        .unwrap();
        assert_eq!(cfg.config.data_dir(), PathBuf::from("/b"));
        assert_eq!(cfg.config.mail.from.as_deref(), Some("sys@x"));
        assert_eq!(cfg.files.len(), 2);
    }

    #[test]
    fn gbk_config_file_is_decoded() {
        let (bytes, _, _) = encoding_rs::GBK.encode("[mail]\nfrom = \"交付 <d@x.org>\"\n");
        let text = decode_text(&bytes);
        let c = Config::from_toml(&text).unwrap();
        assert_eq!(c.mail.from.as_deref(), Some("交付 <d@x.org>"));
    }

    #[test]
    fn shipped_example_config_is_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/config.toml");
        let text = std::fs::read_to_string(root).unwrap();
        let c = Config::from_toml(&text).unwrap();
        assert!(c.smtp.is_some() && c.imap.is_some());
        assert_eq!(c.storage.len(), 3);
        assert!(c.delivery.is_some());
    }

    #[test]
    fn every_env_var_is_documented() {
        let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md");
        let doc = std::fs::read_to_string(doc).unwrap();
        for var in env::ALL {
            assert!(
                doc.contains(&format!("`{var}`")),
                "{var} missing from docs/configuration.md"
            );
        }
    }

    #[test]
    fn literal_secret_is_detected() {
        let t: toml::Table = toml::from_str("[smtp]\nhost=\"h\"\npassword=\"x\"").unwrap();
        assert!(has_literal_secret(&t));
        let t: toml::Table = toml::from_str("[smtp]\nhost=\"h\"\npassword=\"env:X\"").unwrap();
        assert!(!has_literal_secret(&t));
    }

    #[allow(unsafe_code)]
    fn with_env<T>(vars: &[(&str, &str)], f: impl FnOnce() -> T) -> T {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _g = LOCK.lock().unwrap();
        let old: Vec<_> = vars
            .iter()
            .map(|(k, _)| (*k, std::env::var_os(k)))
            .collect();
        for (k, v) in vars {
            // SAFETY: serialised by LOCK; no other thread of this test reads these.
            unsafe { std::env::set_var(k, v) };
        }
        let out = f();
        for (k, v) in old {
            match v {
                // SAFETY: as above.
                Some(v) => unsafe { std::env::set_var(k, v) },
                None => unsafe { std::env::remove_var(k) },
            }
        }
        out
    }
}

impl crate::exit::ExitClass for ConfigError {
    fn exit_class(&self) -> Exit {
        self.exit()
    }
}
crate::exit_class!(ConfigError);
