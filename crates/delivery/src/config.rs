//! The `[delivery]` configuration section, typed here (the shared crate only knows its
//! name). Every table rejects unknown keys, so a misspelt key stops the tool with exit
//! 78 naming `delivery.<key>`.
//!
//! ```toml
//! [delivery]
//! target = "oss"                  # default --target: a [storage.NAME] section
//! key_prefix = "online"           # objects go to <key_prefix>/<analysis-id>/…
//! include = ["**"]
//! exclude = ["**/*.tmp", "**/.snakemake/**"]
//!
//! [delivery.lookup]               # analysis id → path, project, contacts
//! database = "lims"
//! sql = "SELECT … WHERE plan_code = :analysis_id"
//!
//! [delivery.project_lookup]       # project id → contacts (upload-pure)
//! database = "lims"
//! sql = "SELECT … WHERE project_id = :project_id"
//!
//! [delivery.status]               # seed-style status write into the LIMS
//! database = "lims"
//! on_delivered = "INSERT INTO t_microbe_delivery … VALUES (:analysis_id, :status, …)"
//!
//! [delivery.listen]               # delivery-upload --listen
//! exchange = "DELIVERY"
//! queue = "DELIVERY"
//! routing_key = "DELIVERY"
//! ```
//!
//! The sections that customer access, the customer mail and vendor targets need
//! (`[delivery.access]`, `[delivery.mail]`, `[delivery.vendors.NAME]`) are kept as raw
//! TOML here and typed by the modules that own them.

use std::collections::BTreeMap;

use labrelay::config::{Config, ConfigError};
use serde::Deserialize;

/// `[delivery]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Default target: the name of a `[storage.NAME]` (or `[delivery.vendors.NAME]`)
    /// section. Without it, the only `[storage.*]` section is used.
    pub target: Option<String>,
    /// Extra key prefix below the target's own base; objects go to
    /// `<key_prefix>/<analysis-id>/<relative path>`.
    #[serde(default)]
    pub key_prefix: String,
    /// Glob patterns (relative to the delivery folder) a file must match to be
    /// delivered. Default: everything.
    #[serde(default = "default_include")]
    pub include: Vec<String>,
    /// Glob patterns of files (and directories, whose whole subtree is then skipped)
    /// never delivered.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Follow symbolic links to files and directories (pipeline outputs are often
    /// symlinks). When false, symlinks are skipped and listed.
    #[serde(default = "default_true")]
    pub follow_symlinks: bool,
    /// Folders that delivered data may live in. A symbolic link is followed only when
    /// its target stays inside the analysis folder or one of these; when the list is
    /// set, an analysis folder outside all of them is refused. Nothing under `/proc`,
    /// `/sys` or `/dev` is ever read.
    #[serde(default)]
    pub data_roots: Vec<std::path::PathBuf>,
    /// What an analysis id (or upload-pure delivery name) must look like before it
    /// becomes a lock, key or file name (a regular expression matched against the
    /// whole id; at most 128 characters in any case).
    #[serde(default = "default_id_pattern")]
    pub analysis_id_pattern: String,
    /// Also compute SHA-256 while streaming and deliver `sha256sum.txt`.
    #[serde(default)]
    pub sha256: bool,
    /// Name of the checksum manifest delivered next to the data.
    #[serde(default = "default_md5sum_name")]
    pub md5sum_name: String,
    /// Small files uploaded at once.
    #[serde(default = "default_parallel_small")]
    pub parallel_files: usize,
    /// Large files uploaded at once (each also sends several parts at once on S3).
    #[serde(default = "default_parallel_large")]
    pub parallel_large_files: usize,
    /// Files of at least this many MiB count as large.
    #[serde(default = "default_large_mib")]
    pub large_file_mib: u64,
    /// Staff addresses that always receive failure reports (besides the analysis's
    /// staff contacts).
    #[serde(default)]
    pub staff: Vec<String>,
    /// How an analysis id is turned into a path, a project and contacts.
    pub lookup: Option<LookupConfig>,
    /// How a project id is turned into contacts (upload-pure).
    pub project_lookup: Option<LookupConfig>,
    /// Status writes into the LIMS (seed: `t_microbe_delivery`).
    pub status: Option<StatusConfig>,
    /// `--listen`: where delivery requests come from.
    #[serde(default)]
    pub listen: ListenConfig,
    /// `[delivery.access]`, typed by [`crate::access`].
    pub access: Option<toml::Value>,
    /// `[delivery.mail]`, typed by [`crate::notify`].
    pub mail: Option<toml::Value>,
    /// `[delivery.vendors.NAME]`: external-command targets, typed by [`crate::vendor`].
    #[serde(default)]
    pub vendors: BTreeMap<String, toml::Value>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            target: None,
            key_prefix: String::new(),
            include: default_include(),
            exclude: Vec::new(),
            follow_symlinks: true,
            data_roots: Vec::new(),
            analysis_id_pattern: default_id_pattern(),
            sha256: false,
            md5sum_name: default_md5sum_name(),
            parallel_files: default_parallel_small(),
            parallel_large_files: default_parallel_large(),
            large_file_mib: default_large_mib(),
            staff: Vec::new(),
            lookup: None,
            project_lookup: None,
            status: None,
            listen: ListenConfig::default(),
            access: None,
            mail: None,
            vendors: BTreeMap::new(),
        }
    }
}

fn default_include() -> Vec<String> {
    vec!["**".to_owned()]
}
fn default_id_pattern() -> String {
    DEFAULT_ID_PATTERN.to_owned()
}

/// The default `[delivery] analysis_id_pattern`.
pub const DEFAULT_ID_PATTERN: &str = "[A-Za-z0-9._-]{1,128}";

/// The longest analysis id accepted, whatever the pattern.
pub const MAX_ID_LEN: usize = 128;

fn default_true() -> bool {
    true
}
fn default_md5sum_name() -> String {
    "md5sum.txt".to_owned()
}
fn default_parallel_small() -> usize {
    16
}
fn default_parallel_large() -> usize {
    4
}
fn default_large_mib() -> u64 {
    64
}
fn default_timeout() -> u64 {
    60
}

/// A lookup: configured SQL on a `[databases.NAME]`, or an external command printing
/// JSON. Exactly one of `sql` and `command` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupConfig {
    /// The `[databases.NAME]` section the SQL runs on.
    pub database: Option<String>,
    /// A SELECT with named parameters (`:analysis_id`, `:project_id`) returning the
    /// columns `analysis_path`, `project_id`, `customer_email`, `customer_name`,
    /// `action_email`, `sales_email`, `info_email` (any may be missing; extra columns are
    /// passed to the mail templates).
    pub sql: Option<String>,
    /// Or a program and its arguments (no shell); `{analysis_id}` and `{project_id}` in
    /// an argument are replaced. It prints one JSON object (or an array of them) with
    /// the same field names.
    pub command: Option<Vec<String>>,
    /// Seconds the command may run.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

/// `[delivery.status]`: statements run on a LIMS database when a delivery changes
/// state. Named parameters: `:analysis_id`, `:project_id`, `:status`, `:target`,
/// `:key_prefix`, `:path`, `:files`, `:bytes`, `:account`, `:expires_at`, `:error`,
/// `:delivered_at`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// The `[databases.NAME]` section.
    pub database: String,
    /// Run when the upload starts.
    pub on_started: Option<String>,
    /// Run when the delivery is complete (files verified, customer informed).
    pub on_delivered: Option<String>,
    /// Run when the delivery failed.
    pub on_failed: Option<String>,
}

/// `[delivery.listen]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Exchange the web page publishes to (direct).
    #[serde(default = "default_delivery_name")]
    pub exchange: String,
    /// Queue consumed.
    #[serde(default = "default_delivery_name")]
    pub queue: String,
    /// Routing key binding the queue to the exchange.
    #[serde(default = "default_delivery_name")]
    pub routing_key: String,
    /// Deliveries of one message before it goes to `<queue>.dead` (default
    /// `[queue] max_deliveries`).
    pub max_tries: Option<u32>,
    /// Seconds to wait before requeueing a request that failed for now.
    #[serde(default = "default_retry_delay")]
    pub retry_delay_secs: u64,
}

fn default_retry_delay() -> u64 {
    30
}

fn default_delivery_name() -> String {
    "DELIVERY".to_owned()
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            exchange: default_delivery_name(),
            queue: default_delivery_name(),
            routing_key: default_delivery_name(),
            max_tries: None,
            retry_delay_secs: default_retry_delay(),
        }
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: format!("delivery.{key}"),
        message: message.into(),
    }
}

impl DeliveryConfig {
    /// `[delivery]` of `config` (defaults when absent), checked.
    pub fn from_config(config: &Config) -> Result<DeliveryConfig, ConfigError> {
        let c: DeliveryConfig = config.section("delivery")?.unwrap_or_default();
        c.validate(config)?;
        Ok(c)
    }

    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        if self.parallel_files == 0 || self.parallel_large_files == 0 {
            return Err(invalid(
                "parallel_files",
                "parallel_files and parallel_large_files must be at least 1",
            ));
        }
        if self.md5sum_name.is_empty() || self.md5sum_name.contains('/') {
            return Err(invalid("md5sum_name", "must be a plain file name"));
        }
        if !self.key_prefix.is_empty() {
            labrelay::storage::validate_prefix(&self.key_prefix)
                .map_err(|e| invalid("key_prefix", e.to_string()))?;
        }
        crate::manifest::Filter::new(&self.include, &self.exclude)
            .map_err(|e| invalid("include", e))?;
        self.id_regex()?;
        for (i, root) in self.data_roots.iter().enumerate() {
            if !root.is_absolute() {
                return Err(invalid(
                    &format!("data_roots[{i}]"),
                    format!("{} is not an absolute path", root.display()),
                ));
            }
        }
        for (key, lookup) in [
            ("lookup", &self.lookup),
            ("project_lookup", &self.project_lookup),
        ] {
            if let Some(l) = lookup {
                l.validate(key, config)?;
            }
        }
        if let Some(s) = &self.status {
            config
                .database(&s.database)
                .map_err(|_| invalid("status.database", no_db(&s.database)))?;
            for (key, sql) in [
                ("on_started", &s.on_started),
                ("on_delivered", &s.on_delivered),
                ("on_failed", &s.on_failed),
            ] {
                if let Some(sql) = sql {
                    check_params(&format!("status.{key}"), sql, STATUS_PARAMS)?;
                }
            }
        }
        Ok(())
    }

    fn id_regex(&self) -> Result<regex::Regex, ConfigError> {
        regex::Regex::new(&format!("^(?:{})$", self.analysis_id_pattern)).map_err(|e| {
            invalid(
                "analysis_id_pattern",
                format!("not a regular expression: {e}"),
            )
        })
    }

    /// Check an analysis id (or delivery name) from any entry point — command line,
    /// queue message, lookup — before it names a lock, a key or a file: at most
    /// [`MAX_ID_LEN`] characters, matching `analysis_id_pattern`, and never `.`/`..`.
    /// The error (exit 2) names the id and the rule.
    pub fn check_id(&self, id: &str) -> anyhow::Result<()> {
        let re = self.id_regex()?;
        let why = if id.is_empty() {
            Some("it is empty".to_owned())
        } else if id.chars().count() > MAX_ID_LEN {
            Some(format!("it is longer than {MAX_ID_LEN} characters"))
        } else if id == "." || id == ".." {
            Some("it is a relative folder name".to_owned())
        } else if !re.is_match(id) {
            Some(format!(
                "it does not match [delivery] analysis_id_pattern = {:?}",
                self.analysis_id_pattern
            ))
        } else {
            None
        };
        match why {
            None => Ok(()),
            Some(why) => Err(labrelay::exit::usage(format!(
                "{id:?} is not a valid analysis id: {why}"
            ))),
        }
    }

    /// The key prefix of a delivery named `name` (analysis id): `<key_prefix>/<name>`.
    pub fn delivery_prefix(&self, name: &str) -> String {
        let p = self.key_prefix.trim_matches('/');
        if p.is_empty() {
            name.to_owned()
        } else {
            format!("{p}/{name}")
        }
    }
}

/// Type a raw TOML table of the `[delivery]` section (defaults when absent), naming
/// `key` in errors (exit 78).
pub(crate) fn typed_section<T: serde::de::DeserializeOwned + Default>(
    value: Option<&toml::Value>,
    key: &str,
) -> Result<T, ConfigError> {
    match value {
        None => Ok(T::default()),
        Some(v) => T::deserialize(v.clone()).map_err(|e| ConfigError::Invalid {
            key: key.to_owned(),
            message: e.message().trim().to_owned(),
        }),
    }
}

/// The named parameters `[delivery.status]` statements may use.
pub const STATUS_PARAMS: &[&str] = &[
    "analysis_id",
    "project_id",
    "status",
    "target",
    "key_prefix",
    "path",
    "source_path",
    "files",
    "bytes",
    "account",
    "expires_at",
    "error",
    "delivered_at",
    "delivery_id",
];

/// The named parameters lookups may use.
pub const LOOKUP_PARAMS: &[&str] = &["analysis_id", "project_id"];

/// Every `:name` of `sql` must be one of `known`; the error names the key, the
/// parameter and the known ones.
fn check_params(key: &str, sql: &str, known: &[&str]) -> Result<(), ConfigError> {
    let prepared = crate::sql::prepare(sql, labrelay::db::Engine::Sqlite);
    for name in &prepared.names {
        if !known.contains(&name.as_str()) {
            return Err(invalid(
                key,
                format!(
                    "unknown parameter :{name} (known: {})",
                    known
                        .iter()
                        .map(|k| format!(":{k}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn no_db(name: &str) -> String {
    format!("no [databases.{name}] section")
}

impl LookupConfig {
    fn validate(&self, key: &str, config: &Config) -> Result<(), ConfigError> {
        match (&self.sql, &self.command) {
            (Some(_), Some(_)) => Err(invalid(key, "set either sql or command, not both")),
            (None, None) => Err(invalid(key, "set sql (with database) or command")),
            (Some(sql), None) => {
                check_params(&format!("{key}.sql"), sql, LOOKUP_PARAMS)?;
                let db = self
                    .database
                    .as_deref()
                    .ok_or_else(|| invalid(&format!("{key}.database"), "required with sql"))?;
                config
                    .database(db)
                    .map_err(|_| invalid(&format!("{key}.database"), no_db(db)))?;
                Ok(())
            }
            (None, Some(argv)) if argv.is_empty() || argv[0].is_empty() => Err(invalid(
                &format!("{key}.command"),
                "needs at least the program",
            )),
            (None, Some(_)) => Ok(()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_config_is_a_valid_delivery_setup() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/config.toml");
        let config = Config::from_toml(&std::fs::read_to_string(path).unwrap()).unwrap();
        let delivery = DeliveryConfig::from_config(&config).unwrap();
        assert_eq!(delivery.target.as_deref(), Some("oss"));
        // Access, mail templates and vendor steps are checked the way the tools check
        // them at start-up (secrets are not resolved yet).
        crate::steps::DeliverySteps::new(&config, &delivery).unwrap();
    }

    #[test]
    fn defaults_without_a_section() {
        let c = DeliveryConfig::from_config(&Config::default()).unwrap();
        assert_eq!(c.parallel_files, 16);
        assert_eq!(c.parallel_large_files, 4);
        assert!(c.follow_symlinks);
        assert_eq!(c.listen.queue, "DELIVERY");
        assert_eq!(c.delivery_prefix("A1"), "A1");
    }

    #[test]
    fn unknown_keys_and_bad_lookups_are_named() {
        let c = Config::from_toml("[delivery]\ntargte = \"x\"\n").unwrap();
        let e = DeliveryConfig::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("targte") && e.contains("delivery"), "{e}");
        let c = Config::from_toml("[delivery.lookup]\nsql = \"SELECT 1\"\n").unwrap();
        let e = DeliveryConfig::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("delivery.lookup.database"), "{e}");
        let c = Config::from_toml(
            "[delivery.lookup]\nsql = \"SELECT 1\"\ndatabase = \"lims\"\ncommand = [\"x\"]\n",
        )
        .unwrap();
        let e = DeliveryConfig::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("not both"), "{e}");
        let c = Config::from_toml("[delivery.lookup]\nsql = \"SELECT 1\"\ndatabase = \"lims\"\n")
            .unwrap();
        let e = DeliveryConfig::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("[databases.lims]"), "{e}");
        let c = Config::from_toml("[delivery]\nexclude = [\"a/{b\"]\n").unwrap();
        assert!(DeliveryConfig::from_config(&c).is_err());
        // A type error names the file, line and key, as the rest of the config does.
        let c = Config::from_toml("[paths]\n\n[delivery]\nparallel_files = \"many\"\n").unwrap();
        let e = DeliveryConfig::from_config(&c).unwrap_err().to_string();
        assert!(e.contains("<string>") && e.contains("line 4"), "{e}");
        // Unknown parameters in status SQL are found at load time.
        let c = Config::from_toml(
            "[databases.lims]\nurl = \"sqlite::memory:\"\n[delivery.status]\ndatabase = \"lims\"\n\
             on_delivered = \"UPDATE t SET s = :stauts WHERE id = :analysis_id\"\n",
        )
        .unwrap();
        let e = DeliveryConfig::from_config(&c).unwrap_err().to_string();
        assert!(
            e.contains("delivery.status.on_delivered") && e.contains(":stauts"),
            "{e}"
        );
    }

    #[test]
    fn prefix_joins() {
        let c: DeliveryConfig = Config::from_toml("[delivery]\nkey_prefix = \"online/\"\n")
            .unwrap()
            .section("delivery")
            .unwrap()
            .unwrap();
        assert_eq!(c.delivery_prefix("6cLB4ma"), "online/6cLB4ma");
    }
}
