//! `[mail_query]`: the tool's typed configuration section, checked when the tool starts
//! so that a bad key or value exits 78 before any work.
//!
//! This module owns the keys and their validation; it opens no connection. The
//! `[databases.X]` sections it refers to belong to the shared crate.

use std::collections::BTreeMap;

use labrelay::config::{Config, ConfigError};
use serde::Deserialize;

use crate::check::Engine;

/// The keys of `[mail_query]`.
const KEYS: &[&str] = &[
    "folder",
    "processed_folder",
    "rejected_folder",
    "max_workers",
    "max_query_seconds",
    "max_rows",
    "max_mail_bytes",
    "format",
    "trust",
    "authserv_id",
    "staff_cc",
    "language",
    "refusal_reply",
    "dkim_keys",
    "databases",
];

/// The keys of `[mail_query.databases.NAME]`.
const DATABASE_KEYS: &[&str] = &[
    "database",
    "remote",
    "aliases",
    "allow",
    "max_rows",
    "max_query_seconds",
];

/// The smallest `max_mail_bytes`: room for headers, the summary and some data.
pub const MIN_MAIL_BYTES: u64 = 64 * 1024;

/// `[mail_query]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailQueryConfig {
    /// IMAP folder to read (default: `[imap] folder`).
    pub folder: Option<String>,
    /// Where answered messages are moved.
    #[serde(default = "default_processed")]
    pub processed_folder: String,
    /// Where refused messages are moved.
    #[serde(default = "default_rejected")]
    pub rejected_folder: String,
    /// Queries run at once.
    #[serde(default = "default_workers")]
    pub max_workers: usize,
    /// Seconds a query may run before it is cancelled ("query too long").
    #[serde(default = "default_query_seconds")]
    pub max_query_seconds: u64,
    /// Rows exported per statement; more are cut off and the reply says so.
    #[serde(default = "default_rows")]
    pub max_rows: u64,
    /// Largest reply mail, counted after base64; bigger replies are split.
    #[serde(default = "default_mail_bytes")]
    pub max_mail_bytes: u64,
    /// Result file format.
    #[serde(default)]
    pub format: Format,
    /// How a sender is trusted.
    #[serde(default)]
    pub trust: Trust,
    /// The authserv-id of our own MTA's Authentication-Results header.
    pub authserv_id: Option<String>,
    /// Addresses copied on every reply.
    #[serde(default)]
    pub staff_cc: Vec<String>,
    /// Language of replies.
    #[serde(default)]
    pub language: Language,
    /// Send a short refusal (no data) to a sender that is not trusted or not allowed;
    /// off by default, since a forged From would turn refusals into backscatter.
    #[serde(default)]
    pub refusal_reply: bool,
    /// DKIM key records by DNS name (`selector._domainkey.domain` = `"v=DKIM1; k=rsa;
    /// p=…"`), used instead of DNS for these names: for sites without DNS for their
    /// internal domains, and for tests.
    #[serde(default)]
    pub dkim_keys: BTreeMap<String, String>,
    /// The databases that may be queried, by the name a mail uses.
    #[serde(default)]
    pub databases: BTreeMap<String, QueryDatabase>,
}

/// `[mail_query.databases.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryDatabase {
    /// The `[databases.X]` section to connect with (ideally a read-only account).
    pub database: String,
    /// Other names a mail may use (case-insensitive).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Who may query: exact addresses and `@domain` entries.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Overrides `[mail_query] max_rows`.
    pub max_rows: Option<u64>,
    /// Overrides `[mail_query] max_query_seconds`.
    pub max_query_seconds: Option<u64>,
    /// Export on the database host over SSH instead of through a connection.
    pub remote: Option<crate::remote::RemoteExport>,
    /// The engine, from the `[databases.X]` URL; filled in at load.
    #[serde(skip, default = "default_engine")]
    pub engine: Engine,
}

fn default_engine() -> Engine {
    Engine::Sqlite
}

/// `format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// RFC 4180 CSV, UTF-8.
    #[default]
    Csv,
    /// Tab-separated.
    Tsv,
    /// Excel.
    Xlsx,
}

/// `trust`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trust {
    /// A valid DKIM signature aligned with the From domain.
    #[default]
    Dkim,
    /// The verdict of our own MTA's topmost Authentication-Results header.
    AuthenticationResults,
    /// The allowlist alone (warned at every start).
    Allowlist,
}

/// `language`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// Chinese when the request is Chinese, else English.
    #[default]
    Auto,
    /// English.
    En,
    /// Chinese.
    Zh,
}

fn default_processed() -> String {
    "Processed".to_owned()
}
fn default_rejected() -> String {
    "Rejected".to_owned()
}
fn default_workers() -> usize {
    2
}
fn default_query_seconds() -> u64 {
    300
}
fn default_rows() -> u64 {
    1_000_000
}
fn default_mail_bytes() -> u64 {
    20 * 1024 * 1024
}

impl Default for MailQueryConfig {
    fn default() -> Self {
        MailQueryConfig {
            folder: None,
            processed_folder: default_processed(),
            rejected_folder: default_rejected(),
            max_workers: default_workers(),
            max_query_seconds: default_query_seconds(),
            max_rows: default_rows(),
            max_mail_bytes: default_mail_bytes(),
            format: Format::default(),
            trust: Trust::default(),
            authserv_id: None,
            staff_cc: Vec::new(),
            language: Language::default(),
            refusal_reply: false,
            dkim_keys: BTreeMap::new(),
            databases: BTreeMap::new(),
        }
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: format!("mail_query.{key}"),
        message: message.into(),
    }
}

impl MailQueryConfig {
    /// `[mail_query]` of `config` (defaults when absent), checked against the rest of
    /// the configuration.
    pub fn from_config(config: &Config) -> Result<MailQueryConfig, ConfigError> {
        let mut c: MailQueryConfig = match config.section("mail_query") {
            Ok(c) => c.unwrap_or_default(),
            Err(e) => {
                // The section parser names the file and line; name the dotted key too.
                return Err(match config.mail_query.as_ref().and_then(unknown_key) {
                    Some(key) => invalid(&key, format!("unknown key ({e})")),
                    None => e,
                });
            }
        };
        c.validate(config)?;
        Ok(c)
    }

    fn validate(&mut self, config: &Config) -> Result<(), ConfigError> {
        for (key, value) in [
            ("folder", self.folder.as_deref()),
            ("processed_folder", Some(self.processed_folder.as_str())),
            ("rejected_folder", Some(self.rejected_folder.as_str())),
        ] {
            if value.is_some_and(|v| v.trim().is_empty()) {
                return Err(invalid(key, "must not be empty"));
            }
        }
        if self.processed_folder == self.rejected_folder {
            return Err(invalid(
                "rejected_folder",
                "must differ from processed_folder",
            ));
        }
        let inbox = self
            .folder
            .clone()
            .or_else(|| config.imap.as_ref().map(|i| i.folder.clone()))
            .unwrap_or_else(|| "INBOX".to_owned());
        for (key, folder) in [
            ("processed_folder", &self.processed_folder),
            ("rejected_folder", &self.rejected_folder),
        ] {
            if *folder == inbox {
                return Err(invalid(
                    key,
                    format!(
                        "must differ from the folder read ({inbox}), or mail is answered again"
                    ),
                ));
            }
        }
        if self.max_workers == 0 {
            return Err(invalid("max_workers", "must be at least 1"));
        }
        if self.max_query_seconds == 0 {
            return Err(invalid("max_query_seconds", "must be at least 1"));
        }
        if self.max_rows == 0 {
            return Err(invalid("max_rows", "must be at least 1"));
        }
        if self.max_mail_bytes < MIN_MAIL_BYTES {
            return Err(invalid(
                "max_mail_bytes",
                format!("must be at least {MIN_MAIL_BYTES}"),
            ));
        }
        match (&self.trust, &self.authserv_id) {
            (Trust::AuthenticationResults, None) => {
                return Err(invalid(
                    "authserv_id",
                    "is required with trust = \"authentication-results\"",
                ));
            }
            (_, Some(id)) if id.trim().is_empty() || id.contains(char::is_whitespace) => {
                return Err(invalid(
                    "authserv_id",
                    "must be a host name, without spaces",
                ));
            }
            _ => {}
        }
        for (name, record) in &self.dkim_keys {
            if !name.contains("._domainkey.") {
                return Err(invalid(
                    &format!("dkim_keys.{name:?}"),
                    "must be a DNS name selector._domainkey.domain",
                ));
            }
            if let Err(e) = <mail_auth::common::verify::DomainKey as mail_auth::common::parse::TxtRecordParser>::parse(
                record.as_bytes(),
            ) {
                return Err(invalid(
                    &format!("dkim_keys.{name:?}"),
                    format!("not a DKIM key record: {e}"),
                ));
            }
        }
        for (i, a) in self.staff_cc.iter().enumerate() {
            if !is_address(a) {
                return Err(invalid(
                    &format!("staff_cc[{i}]"),
                    format!("{a:?} is not an e-mail address (user@domain)"),
                ));
            }
        }
        let mut names: BTreeMap<String, String> = BTreeMap::new();
        for (name, db) in &mut self.databases {
            let key = |k: &str| format!("databases.{name}.{k}");
            let section = config.databases.get(&db.database).ok_or_else(|| {
                invalid(
                    &key("database"),
                    format!("no [databases.{}] section", db.database),
                )
            })?;
            let scheme = section.url.expose().scheme();
            db.engine = Engine::from_scheme(scheme).ok_or_else(|| {
                invalid(
                    &key("database"),
                    format!(
                        "[databases.{}] is a {scheme}: database; mail-query queries \
                         postgres, mysql/mariadb, sqlite and oracle",
                        db.database
                    ),
                )
            })?;
            for (i, n) in std::iter::once(name).chain(&db.aliases).enumerate() {
                let k = if i == 0 {
                    format!("databases.{name}")
                } else {
                    key(&format!("aliases[{}]", i - 1))
                };
                if n.trim().is_empty() || n.trim() != n {
                    return Err(invalid(&k, format!("{n:?} is not a usable name")));
                }
                if let Some(other) = names.insert(n.to_lowercase(), name.clone()) {
                    return Err(invalid(
                        &k,
                        format!("{n:?} already names [mail_query.databases.{other}]"),
                    ));
                }
            }
            for (i, a) in db.allow.iter().enumerate() {
                let ok = match a.strip_prefix('@') {
                    Some(domain) => is_domain(domain),
                    None => is_address(a),
                };
                if !ok {
                    return Err(invalid(
                        &key(&format!("allow[{i}]")),
                        format!("{a:?} is neither an address (user@domain) nor @domain"),
                    ));
                }
            }
            if let Some(r) = &db.remote {
                if !config.ssh.contains_key(&r.ssh) {
                    return Err(invalid(
                        &key("remote.ssh"),
                        format!("no [ssh.{}] section", r.ssh),
                    ));
                }
                if let Some((k, p)) = r.problem() {
                    return Err(invalid(&key(&format!("remote.{k}")), p));
                }
            }
            if db.max_rows == Some(0) {
                return Err(invalid(&key("max_rows"), "must be at least 1"));
            }
            if db.max_query_seconds == Some(0) {
                return Err(invalid(&key("max_query_seconds"), "must be at least 1"));
            }
        }
        Ok(())
    }

    /// The queryable database a mail or `--database` names: its name or an alias,
    /// case-insensitive.
    pub fn lookup(&self, name: &str) -> Option<(&str, &QueryDatabase)> {
        let wanted = name.trim().to_lowercase();
        self.databases.iter().find_map(|(n, db)| {
            (n.to_lowercase() == wanted || db.aliases.iter().any(|a| a.to_lowercase() == wanted))
                .then_some((n.as_str(), db))
        })
    }
}

/// The dotted path of the first unknown key in a raw `[mail_query]` section.
fn unknown_key(section: &toml::Value) -> Option<String> {
    let table = section.as_table()?;
    if let Some(k) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Some(k.clone());
    }
    let dbs = table.get("databases")?.as_table()?;
    dbs.iter().find_map(|(name, db)| {
        db.as_table()?
            .keys()
            .find(|k| !DATABASE_KEYS.contains(&k.as_str()))
            .map(|k| format!("databases.{name}.{k}"))
    })
}

/// `user@domain`, plain (no display name, no spaces).
fn is_address(a: &str) -> bool {
    match a.rsplit_once('@') {
        Some((user, domain)) => {
            !user.is_empty()
                && !user.contains(|c: char| c.is_whitespace() || "<>,;\"".contains(c))
                && is_domain(domain)
        }
        None => false,
    }
}

fn is_domain(d: &str) -> bool {
    !d.is_empty()
        && d.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<MailQueryConfig, ConfigError> {
        let config = Config::from_toml(text).unwrap();
        MailQueryConfig::from_config(&config)
    }

    const DBS: &str = "[databases.lims]\nurl = \"postgres://reader@127.0.0.1/lims\"\n\
                       [databases.erp]\nurl = \"oracle://reader@erp.example.org:1521/ERP\"\n";

    #[test]
    fn the_shipped_example_config_is_valid() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/config.toml");
        let c = load(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(c.databases["lims"].engine, Engine::Mariadb);
        assert_eq!(c.lookup("样本库").map(|(n, _)| n), Some("lims"));
    }

    #[test]
    fn every_key_parses_and_engines_come_from_the_url() {
        let c = load(&format!(
            "{DBS}[mail_query]\nfolder = \"SQL\"\nprocessed_folder = \"Done\"\n\
             rejected_folder = \"Refused\"\nmax_workers = 4\nmax_query_seconds = 60\n\
             max_rows = 1000\nmax_mail_bytes = 1048576\nformat = \"xlsx\"\n\
             trust = \"authentication-results\"\nauthserv_id = \"mx.example.org\"\n\
             staff_cc = [\"dba@example.org\"]\nlanguage = \"zh\"\n\
             [mail_query.databases.lims]\ndatabase = \"lims\"\naliases = [\"LIMS-prod\"]\n\
             allow = [\"a@example.org\", \"@lab.example.org\"]\nmax_rows = 10\n\
             max_query_seconds = 5\n\
             [mail_query.databases.erp]\ndatabase = \"erp\"\n"
        ))
        .unwrap();
        assert_eq!(c.format, Format::Xlsx);
        assert_eq!(c.trust, Trust::AuthenticationResults);
        assert_eq!(c.language, Language::Zh);
        assert_eq!(c.databases["lims"].engine, Engine::Postgres);
        assert_eq!(c.databases["erp"].engine, Engine::Oracle);
        assert_eq!(c.lookup("lims-PROD").map(|(n, _)| n), Some("lims"));
        assert!(c.lookup("nope").is_none());
        let d = load("").unwrap();
        assert_eq!(
            (d.format, d.trust, d.max_workers),
            (Format::Csv, Trust::Dkim, 2)
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        for (text, key) in [
            (
                "[mail_query]\nmax_worker = 3\n".to_owned(),
                "mail_query.max_worker",
            ),
            (
                format!("{DBS}[mail_query.databases.lims]\ndatabase = \"lims\"\nallowed = []\n"),
                "mail_query.databases.lims.allowed",
            ),
        ] {
            let err = load(&text).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(key), "{msg}");
            assert!(msg.contains("line"), "{msg}");
            assert_eq!(err.exit(), labrelay::exit::Exit::Config);
        }
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        for (text, key) in [
            ("[mail_query]\nmax_workers = 0\n", "mail_query.max_workers"),
            (
                "[mail_query]\nmax_mail_bytes = 100\n",
                "mail_query.max_mail_bytes",
            ),
            (
                "[mail_query]\ntrust = \"authentication-results\"\n",
                "mail_query.authserv_id",
            ),
            (
                "[mail_query]\nprocessed_folder = \"INBOX\"\n",
                "mail_query.processed_folder",
            ),
            (
                "[mail_query]\nrejected_folder = \"Processed\"\n",
                "mail_query.rejected_folder",
            ),
            (
                "[mail_query]\nstaff_cc = [\"Boss <b@x.org>\"]\n",
                "mail_query.staff_cc[0]",
            ),
            ("[mail_query]\nformat = \"pdf\"\n", "unknown variant `pdf`"),
            ("[mail_query]\ntrust = \"none\"\n", "unknown variant `none`"),
            (
                "[mail_query.databases.x]\ndatabase = \"missing\"\n",
                "mail_query.databases.x.database",
            ),
            (
                "[databases.m]\nurl = \"mongodb://h/db\"\n[mail_query.databases.x]\ndatabase = \"m\"\n",
                "mail_query.databases.x.database",
            ),
            (
                "[databases.l]\nurl = \"sqlite::memory:\"\n[mail_query.databases.x]\n\
                 database = \"l\"\nallow = [\"not an address\"]\n",
                "mail_query.databases.x.allow[0]",
            ),
            (
                "[databases.l]\nurl = \"sqlite::memory:\"\n[mail_query.databases.x]\n\
                 database = \"l\"\n[mail_query.databases.y]\ndatabase = \"l\"\naliases = [\"X\"]\n",
                "mail_query.databases.y.aliases[0]",
            ),
            (
                "[databases.l]\nurl = \"sqlite::memory:\"\n[mail_query.databases.x]\n\
                 database = \"l\"\n[mail_query.databases.x.remote]\nssh = \"nope\"\n\
                 command = [\"x\", \"{sql}\", \"{output}\"]\n",
                "mail_query.databases.x.remote.ssh",
            ),
            (
                "[databases.l]\nurl = \"sqlite::memory:\"\n[ssh.h]\nhost = \"h\"\nuser = \"u\"\n\
                 [mail_query.databases.x]\ndatabase = \"l\"\n[mail_query.databases.x.remote]\n\
                 ssh = \"h\"\ncommand = [\"psql\", \"-f\", \"{sql}\"]\n",
                "mail_query.databases.x.remote.command",
            ),
            (
                "[databases.l]\nurl = \"sqlite::memory:\"\n[mail_query]\n\
                 dkim_keys = { \"s._domainkey.x.org\" = \"v=DKIM1; p=!!\" }\n",
                "dkim_keys",
            ),
        ] {
            let err = load(text).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
            assert_eq!(err.exit(), labrelay::exit::Exit::Config);
        }
    }
}
