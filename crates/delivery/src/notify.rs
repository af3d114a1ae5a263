//! The mails of a delivery: the customer's (links or account, expiry date, file count,
//! total size, md5sum.txt attached; staff in Cc) and the staff's failure notice.
//!
//! Mails are rendered from templates, text and HTML, in Chinese and English. The
//! templates shipped in `examples/templates/delivery/` are built in; `[delivery.mail]
//! templates_dir` replaces them file by file. The language is the customer's (the
//! lookup's `language` field, or `[delivery.mail] languages` by address or domain),
//! else `[delivery.mail] language` (default `zh`).
//!
//! The template syntax is a small, safe subset of Mustache, rendered here rather than
//! by a template engine (none is needed for five constructs):
//!
//! | syntax | meaning |
//! |---|---|
//! | `{{name}}` | a value; HTML-escaped in `.html` templates |
//! | `{{#name}}…{{/name}}` | a list (repeated per item, whose names come first), or a condition |
//! | `{{^name}}…{{/name}}` | rendered when `name` is false, empty or an empty list |
//! | `{{! comment }}` | nothing |
//!
//! A section tag alone on its line takes the line with it. Names are checked when the
//! templates are loaded ([`Notifier::new`]): a misspelt name in an operator's template
//! stops the tool at start-up (exit 78) with the file and line, not mid-delivery. The
//! first line of a `.txt` template is `Subject: …`.
//!
//! Files: `customer.<lang>.txt`, `customer.<lang>.html`, `failure.<lang>.txt`,
//! `failure.<lang>.html`; an empty `.html` file sends text only. The names each template
//! may use are listed in `examples/templates/delivery/README.md`.
//!
//! This module decides what the mails say; `labrelay::mail` builds and sends them (SMTP
//! or outbox). It never logs a mail's body: it holds a password or links.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, FixedOffset, Local, Offset as _, TimeZone as _, Utc};
use futures::future::BoxFuture;
use labrelay::config::{Config, ConfigError, MailConfig};
use labrelay::exit::Exit;
use labrelay::mail::{Attachment, MailError, Mailer, OutgoingMail, SentMail};
use serde::{Deserialize, Serialize};

use crate::access::{Access, AccessConfig, AccessError, AccessGrant, AccessMethod, AccessRequest};
use crate::config::DeliveryConfig;
use crate::report::{
    Analysis, CustomerSteps, DeliveryReport, MailReceipt, StepContext, TargetKind,
};
use crate::vendor::{CommandError, VendorConfig, VendorTarget};

/// Sender used when neither `[delivery.mail] from` nor `[mail] from` is set (the
/// embedded-defaults demo writes to the outbox and needs none).
pub const FALLBACK_FROM: &str = "labrelay delivery <delivery@localhost>";
/// Files listed in the body of the customer mail unless configured; with more, the
/// full list of links is attached as `links.tsv`.
pub const DEFAULT_MAX_LISTED_FILES: usize = 100;
/// Header carrying the analysis id, to find a delivery's mail.
pub const ANALYSIS_HEADER: &str = "X-Labrelay-Analysis";
/// Header saying which mail it is (`delivery` or `delivery-failure`).
pub const KIND_HEADER: &str = "X-Labrelay-Mail";

const BUILTIN: &[(&str, &str)] = &[
    (
        "customer.zh.txt",
        include_str!("../../../examples/templates/delivery/customer.zh.txt"),
    ),
    (
        "customer.zh.html",
        include_str!("../../../examples/templates/delivery/customer.zh.html"),
    ),
    (
        "customer.en.txt",
        include_str!("../../../examples/templates/delivery/customer.en.txt"),
    ),
    (
        "customer.en.html",
        include_str!("../../../examples/templates/delivery/customer.en.html"),
    ),
    (
        "failure.zh.txt",
        include_str!("../../../examples/templates/delivery/failure.zh.txt"),
    ),
    (
        "failure.zh.html",
        include_str!("../../../examples/templates/delivery/failure.zh.html"),
    ),
    (
        "failure.en.txt",
        include_str!("../../../examples/templates/delivery/failure.en.txt"),
    ),
    (
        "failure.en.html",
        include_str!("../../../examples/templates/delivery/failure.en.html"),
    ),
];

/// Notification errors. None contains a password or a link.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `[delivery.mail]` is invalid (exit 78).
    #[error("invalid configuration {key}: {message}")]
    Config {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A template does not parse or uses an unknown name (exit 78).
    #[error("mail template {name}, line {line}: {message}")]
    Template {
        /// The file (built-in name or path).
        name: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A template file cannot be read (exit 78); the message names the file.
    #[error("{0}")]
    Io(std::io::Error),
    /// There is nobody to send the mail to (exit 1).
    #[error("no recipient for the {what}")]
    NoRecipient {
        /// Which mail.
        what: &'static str,
    },
    /// Building or sending failed (exit of the mail error).
    #[error(transparent)]
    Mail(#[from] MailError),
}

impl NotifyError {
    /// Exit status (see each variant).
    pub fn exit(&self) -> Exit {
        match self {
            NotifyError::Config { .. } | NotifyError::Template { .. } | NotifyError::Io(_) => {
                Exit::Config
            }
            NotifyError::NoRecipient { .. } => Exit::Failed,
            NotifyError::Mail(e) => e.exit(),
        }
    }

    /// The error as an `anyhow::Error` that `labrelay::exit::classify` maps to
    /// [`NotifyError::exit`] (a [`MailError`] is kept as the source, which classify
    /// knows).
    pub fn into_anyhow(self) -> anyhow::Error {
        match self {
            NotifyError::Mail(e) => anyhow::Error::new(e),
            other => labrelay::exit::tagged(other.exit(), other.to_string()),
        }
    }
}

// ---------------------------------------------------------------------------------
// Configuration.

/// A mail language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// Simplified Chinese.
    #[default]
    #[serde(alias = "zh-cn", alias = "zh_cn", alias = "cn", alias = "chinese")]
    Zh,
    /// English.
    #[serde(alias = "en-us", alias = "en_us", alias = "en-gb", alias = "english")]
    En,
}

impl Language {
    /// Parse a language as a LIMS might store it: `zh`, `zh-CN`, `cn`, `中文`, `en`,
    /// `en-US`, `English`… (case-insensitive).
    pub fn parse(text: &str) -> Option<Language> {
        let t = text.trim().to_ascii_lowercase();
        if t.starts_with("zh") || t == "cn" || t == "chinese" || text.trim() == "中文" {
            Some(Language::Zh)
        } else if t.starts_with("en") || text.trim() == "英文" {
            Some(Language::En)
        } else {
            None
        }
    }

    /// `zh` or `en`, as in template file names.
    pub fn code(self) -> &'static str {
        match self {
            Language::Zh => "zh",
            Language::En => "en",
        }
    }

    const ALL: [Language; 2] = [Language::Zh, Language::En];
}

/// `[delivery.mail]`.
///
/// ```toml
/// [delivery.mail]
/// language = "zh"                          # zh | en; the customer's language wins
/// languages = { "partner.example.com" = "en", "li@example.org" = "zh" }
/// templates_dir = "/etc/labrelay/templates/delivery"
/// from = "华大测序交付 <delivery@example.org>"   # default: [mail] from
/// cc = ["archive@example.org"]
/// utc_offset = "+08:00"                    # dates in mails; default: the host's zone
/// max_listed_files = 100
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// Language of mails when the customer's is unknown, and of failure notices.
    #[serde(default)]
    pub language: Language,
    /// Language by customer address or domain (lower case), before `language`.
    #[serde(default)]
    pub languages: BTreeMap<String, Language>,
    /// A directory whose template files replace the built-in ones (file by file).
    #[serde(default)]
    pub templates_dir: Option<PathBuf>,
    /// Sender; default `[mail] from`.
    #[serde(default)]
    pub from: Option<String>,
    /// Reply-To of customer mails (e.g. the support desk).
    #[serde(default)]
    pub reply_to: Option<String>,
    /// Extra Cc of every customer mail.
    #[serde(default)]
    pub cc: Vec<String>,
    /// Bcc of every customer mail (an archive).
    #[serde(default)]
    pub bcc: Vec<String>,
    /// Put the analysis's staff (action, sales, info) in Cc, as the seed did.
    #[serde(default = "default_true")]
    pub cc_staff: bool,
    /// Offset of the dates shown in mails (`+08:00`); default: the host's time zone.
    #[serde(default)]
    pub utc_offset: Option<String>,
    /// Files listed in the mail body; with more, all links go into `links.tsv`.
    #[serde(default = "default_max_listed")]
    pub max_listed_files: usize,
    /// Attach md5sum.txt to the customer mail.
    #[serde(default = "default_true")]
    pub attach_md5sum: bool,
}

fn default_true() -> bool {
    true
}
fn default_max_listed() -> usize {
    DEFAULT_MAX_LISTED_FILES
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            language: Language::Zh,
            languages: BTreeMap::new(),
            templates_dir: None,
            from: None,
            reply_to: None,
            cc: Vec::new(),
            bcc: Vec::new(),
            cc_staff: true,
            utc_offset: None,
            max_listed_files: DEFAULT_MAX_LISTED_FILES,
            attach_md5sum: true,
        }
    }
}

impl NotifyConfig {
    /// Type the raw `[delivery.mail]` table (defaults when absent); a bad key is
    /// reported as `delivery.mail.<key>` (exit 78).
    pub fn from_value(value: Option<&toml::Value>) -> Result<NotifyConfig, ConfigError> {
        typed_section(value, "delivery.mail")
    }
}

/// Type a raw TOML table of the `[delivery]` section, naming `key` in errors.
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

// ---------------------------------------------------------------------------------
// Facts: what the mails are about, filled by the engine.

/// A delivered file, as listed in the customer mail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MailFile {
    /// Path relative to the delivery folder.
    pub path: String,
    /// Its key on the target (to match presigned links).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// MD5, lowercase hex.
    pub md5: String,
}

/// Everything the customer mail says. Plain data: the engine fills it from its
/// delivery report and the [`AccessGrant`].
#[derive(Debug, Clone)]
pub struct MailFacts {
    /// The analysis id.
    pub analysis_id: String,
    /// The LIMS project id.
    pub project_id: Option<String>,
    /// The customer's name, for the greeting.
    pub customer_name: Option<String>,
    /// The customer's addresses (To); an entry may hold several, separated by `,`
    /// or `;`.
    pub customer_emails: Vec<String>,
    /// Staff addresses (Cc unless `cc_staff = false`): action, sales, info.
    pub staff: Vec<String>,
    /// The customer's language as the lookup gave it (`zh`, `en`, `中文`…), if any.
    pub language: Option<String>,
    /// The target as it may be shown (name or URL without credentials).
    pub target: String,
    /// Where the files are, for deliveries without links or account (a directory).
    pub location: Option<String>,
    /// The delivered files (md5sum.txt not among them), in order.
    pub files: Vec<MailFile>,
    /// Number of delivered files.
    pub file_count: u64,
    /// Their total size in bytes.
    pub total_bytes: u64,
    /// md5sum.txt (name, content), attached when `attach_md5sum` is on.
    pub md5sum: Option<(String, Vec<u8>)>,
    /// The access granted.
    pub access: AccessGrant,
    /// When the delivery finished.
    pub delivered_at: DateTime<Utc>,
    /// What makes the customer mail's Message-ID (`<delivery-KEY@domain-of-from>`): the
    /// delivery id, so a re-run after a crash sends the same message (an outbox write
    /// is then a no-op; an SMTP server or client sees the same Message-ID). `None`: a
    /// fresh Message-ID.
    pub message_key: Option<String>,
}

/// A file that could not be delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedFile {
    /// Path relative to the delivery folder.
    pub path: String,
    /// Why.
    pub error: String,
}

/// Everything the staff failure notice says.
#[derive(Debug, Clone)]
pub struct FailureFacts {
    /// The analysis id (or the delivery's name).
    pub analysis_id: String,
    /// The LIMS project id, when known.
    pub project_id: Option<String>,
    /// The target as it may be shown.
    pub target: String,
    /// The analysis folder, when known.
    pub location: Option<String>,
    /// The error (`{:#}` of the chain); scrubbed of known secrets here again.
    pub error: String,
    /// Files that failed (the first 200 are listed).
    pub failed_files: Vec<FailedFile>,
    /// Files in the delivery.
    pub file_count: u64,
    /// Recipients: the analysis's staff and `[delivery] staff`.
    pub to: Vec<String>,
    /// Which attempt failed (1 for a command-line run).
    pub attempt: u32,
    /// Whether the request will be tried again (queue redelivery).
    pub will_retry: bool,
    /// When it failed.
    pub failed_at: DateTime<Utc>,
}

impl MailFacts {
    /// The facts of a verified delivery and the access granted: the report's
    /// analysis, contacts (staff in Cc), files and totals, md5sum.txt for attaching,
    /// the customer's language from the lookup's `language` field; for deliveries
    /// without links or account, the target directory as the location.
    pub fn from_report(report: &DeliveryReport, access: &AccessGrant) -> MailFacts {
        let a = &report.analysis;
        let md5sum_name = report
            .md5sum_key
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .unwrap_or("md5sum.txt")
            .to_owned();
        let location = (access.method == AccessMethod::None).then(|| {
            format!(
                "{}/{}",
                report.target.describe.trim_end_matches('/'),
                report.key_prefix
            )
        });
        MailFacts {
            analysis_id: a.analysis_id.clone(),
            project_id: a.project_id.clone(),
            customer_name: a.customer_name.clone(),
            customer_emails: a.customer_emails.clone(),
            staff: a.staff.all(),
            language: a.extra.get("language").cloned(),
            target: report.target.describe.clone(),
            location,
            files: report
                .files
                .iter()
                .map(|f| MailFile {
                    path: f.rel.clone(),
                    key: f.key.clone(),
                    size: f.size,
                    md5: f.md5.clone(),
                })
                .collect(),
            file_count: report.total_files,
            total_bytes: report.total_bytes,
            md5sum: (!report.md5sum_text.is_empty())
                .then(|| (md5sum_name, report.md5sum_text.clone().into_bytes())),
            access: access.clone(),
            delivered_at: report.finished_at,
            message_key: Some(report.delivery_id.clone()),
        }
    }
}

impl FailureFacts {
    /// The facts of a failed delivery of `analysis` to `target`: the error chain as
    /// text, the analysis's staff and `extra_staff` (`[delivery] staff`) as
    /// recipients, attempt 1, no retry, now. Set `failed_files`, `file_count`,
    /// `attempt` and `will_retry` when known.
    pub fn new(
        analysis: &Analysis,
        target: &str,
        error: &anyhow::Error,
        extra_staff: &[String],
    ) -> FailureFacts {
        let mut to = analysis.staff.all();
        to.extend(extra_staff.iter().cloned());
        FailureFacts {
            analysis_id: analysis.analysis_id.clone(),
            project_id: analysis.project_id.clone(),
            target: target.to_owned(),
            location: analysis.path.as_ref().map(|p| p.display().to_string()),
            error: format!("{error:#}"),
            failed_files: Vec::new(),
            file_count: 0,
            to,
            attempt: 1,
            will_retry: false,
            failed_at: Utc::now(),
        }
    }
}

// ---------------------------------------------------------------------------------
// Formatting helpers.

/// A size for people: `0 B`, `999 B`, `1.0 KiB`, `12.3 MiB`, `1.5 GiB` (binary units,
/// one decimal).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut i = 0;
    // Round first, so 1,048,575 bytes is "1.0 MiB", not "1024.0 KiB".
    while (v * 10.0).round() / 10.0 >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", UNITS[i])
}

/// Parse `+08:00`, `-05:30`, `+0800`, `UTC` or `Z`.
pub fn parse_utc_offset(text: &str) -> Option<FixedOffset> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("utc") || t == "Z" {
        return FixedOffset::east_opt(0);
    }
    let (sign, rest) = match t.as_bytes().first()? {
        b'+' => (1, &t[1..]),
        b'-' => (-1, &t[1..]),
        _ => return None,
    };
    let digits: String = rest.chars().filter(|c| *c != ':').collect();
    if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let h: i32 = digits[..2].parse().ok()?;
    let m: i32 = digits[2..].parse().ok()?;
    if h > 14 || m > 59 {
        return None;
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60))
}

/// Escape text for HTML content and attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Addresses from entries that may hold lists (`a@x, b@y; c@z`), trimmed, each once
/// (case-insensitive), in order.
pub fn split_addresses<S: AsRef<str>>(entries: &[S]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in entries {
        for a in e.as_ref().split([',', ';']) {
            let a = a.trim();
            if !a.is_empty() && !out.iter().any(|o| o.eq_ignore_ascii_case(a)) {
                out.push(a.to_owned());
            }
        }
    }
    out
}

/// The bare `user@domain` of `Name <user@domain>`, lower-cased.
fn bare_address(a: &str) -> String {
    match (a.rfind('<'), a.rfind('>')) {
        (Some(l), Some(r)) if l < r => a[l + 1..r].trim().to_ascii_lowercase(),
        _ => a.trim().to_ascii_lowercase(),
    }
}

fn host_name() -> String {
    fs_err::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown host".to_owned())
}

// ---------------------------------------------------------------------------------
// Templates.

/// A template value.
#[derive(Debug, Clone)]
enum Value {
    Text(String),
    Bool(bool),
    List(Vec<Scope>),
}

type Scope = BTreeMap<&'static str, Value>;

/// What kind of value a name holds, for checking templates.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Text,
    Bool,
    List(&'static [&'static str]),
}

/// The names a template may use.
type Schema = &'static [(&'static str, Kind)];

const FILE_ITEM: &[&str] = &[
    "path", "size", "bytes", "md5", "link", "has_link", "has_md5",
];
const FAILED_ITEM: &[&str] = &["path", "error"];

const CUSTOMER_SCHEMA: Schema = &[
    ("analysis_id", Kind::Text),
    ("project_id", Kind::Text),
    ("customer_name", Kind::Text),
    ("customer_email", Kind::Text),
    ("target", Kind::Text),
    ("location", Kind::Text),
    ("file_count", Kind::Text),
    ("total_size", Kind::Text),
    ("total_bytes", Kind::Text),
    ("delivered_at", Kind::Text),
    ("expires_date", Kind::Text),
    ("expires_at", Kind::Text),
    ("valid_days", Kind::Text),
    ("method", Kind::Text),
    ("account_user", Kind::Text),
    ("account_password", Kind::Text),
    ("account_login", Kind::Text),
    ("account_directory", Kind::Text),
    ("files_not_listed", Kind::Text),
    ("md5sum_name", Kind::Text),
    ("has_project_id", Kind::Bool),
    ("has_customer_name", Kind::Bool),
    ("has_location", Kind::Bool),
    ("has_links", Kind::Bool),
    ("has_account", Kind::Bool),
    ("has_login", Kind::Bool),
    ("has_directory", Kind::Bool),
    ("has_expiry", Kind::Bool),
    ("md5sum_attached", Kind::Bool),
    ("links_attached", Kind::Bool),
    ("files_truncated", Kind::Bool),
    ("files", Kind::List(FILE_ITEM)),
];

const FAILURE_SCHEMA: Schema = &[
    ("analysis_id", Kind::Text),
    ("project_id", Kind::Text),
    ("target", Kind::Text),
    ("location", Kind::Text),
    ("error", Kind::Text),
    ("file_count", Kind::Text),
    ("failed_count", Kind::Text),
    ("failed_not_listed", Kind::Text),
    ("failed_at", Kind::Text),
    ("host", Kind::Text),
    ("attempt", Kind::Text),
    ("has_project_id", Kind::Bool),
    ("has_location", Kind::Bool),
    ("has_failed_files", Kind::Bool),
    ("failed_truncated", Kind::Bool),
    ("will_retry", Kind::Bool),
    ("failed_files", Kind::List(FAILED_ITEM)),
];

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    Var(String),
    Section {
        name: String,
        inverted: bool,
        body: Vec<Node>,
    },
}

/// A parsed, checked template.
#[derive(Debug, Clone)]
struct Template {
    html: bool,
    nodes: Vec<Node>,
}

fn template_error(name: &str, src: &str, at: usize, message: String) -> NotifyError {
    NotifyError::Template {
        name: name.to_owned(),
        line: src[..at.min(src.len())].matches('\n').count() + 1,
        message,
    }
}

/// Parse `src` (named `name` in errors, `offset` bytes into its file) and check its
/// names against `schema`.
fn parse_template(
    name: &str,
    src: &str,
    html: bool,
    schema: Schema,
) -> Result<Template, NotifyError> {
    struct Open {
        name: String,
        inverted: bool,
        at: usize,
        outer: Vec<Node>,
    }
    let mut stack: Vec<Open> = Vec::new();
    let mut cur: Vec<Node> = Vec::new();
    let mut pos = 0;
    let push_text = |cur: &mut Vec<Node>, text: &str| {
        if !text.is_empty() {
            cur.push(Node::Text(text.to_owned()));
        }
    };
    while let Some(rel) = src[pos..].find("{{") {
        let start = pos + rel;
        let Some(close) = src[start + 2..].find("}}") else {
            return Err(template_error(
                name,
                src,
                start,
                "`{{` is never closed".into(),
            ));
        };
        let end = start + 2 + close + 2;
        let inner = src[start + 2..end - 2].trim();
        let sigil = inner.chars().next().unwrap_or(' ');
        let mut text_end = start;
        let mut next = end;
        if matches!(sigil, '#' | '^' | '/' | '!') {
            // A section tag alone on its line takes the line with it.
            let line_start = src[..start].rfind('\n').map_or(0, |i| i + 1);
            let line_end = src[end..].find('\n').map_or(src.len(), |i| end + i);
            let blank = |s: &str| s.chars().all(|c| c == ' ' || c == '\t' || c == '\r');
            if line_start >= pos && blank(&src[line_start..start]) && blank(&src[end..line_end]) {
                text_end = line_start;
                next = (line_end + 1).min(src.len());
            }
        }
        push_text(&mut cur, &src[pos..text_end]);
        pos = next;
        if sigil == '!' {
            continue;
        }
        let tag_name = if matches!(sigil, '#' | '^' | '/') {
            inner[1..].trim()
        } else {
            inner
        };
        if tag_name.is_empty()
            || !tag_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(template_error(
                name,
                src,
                start,
                format!("`{{{{{inner}}}}}` is not a tag; names use letters, digits and _"),
            ));
        }
        match sigil {
            '#' | '^' => stack.push(Open {
                name: tag_name.to_owned(),
                inverted: sigil == '^',
                at: start,
                outer: std::mem::take(&mut cur),
            }),
            '/' => {
                let Some(open) = stack.pop() else {
                    return Err(template_error(
                        name,
                        src,
                        start,
                        format!("`{{{{/{tag_name}}}}}` closes no section"),
                    ));
                };
                if open.name != tag_name {
                    return Err(template_error(
                        name,
                        src,
                        start,
                        format!(
                            "`{{{{/{tag_name}}}}}` closes `{{{{#{}}}}}` (opened on line {})",
                            open.name,
                            src[..open.at].matches('\n').count() + 1
                        ),
                    ));
                }
                let body = std::mem::replace(&mut cur, open.outer);
                cur.push(Node::Section {
                    name: open.name,
                    inverted: open.inverted,
                    body,
                });
            }
            _ => cur.push(Node::Var(tag_name.to_owned())),
        }
    }
    push_text(&mut cur, &src[pos..]);
    if let Some(open) = stack.pop() {
        return Err(template_error(
            name,
            src,
            open.at,
            format!("`{{{{#{}}}}}` is never closed", open.name),
        ));
    }
    check_names(name, src, &cur, schema, &mut Vec::new())?;
    Ok(Template { html, nodes: cur })
}

fn check_names(
    name: &str,
    src: &str,
    nodes: &[Node],
    schema: Schema,
    items: &mut Vec<&'static [&'static str]>,
) -> Result<(), NotifyError> {
    let unknown = |n: &str, what: &str, items: &[&'static [&'static str]]| {
        let mut known: Vec<&str> = schema.iter().map(|(k, _)| *k).collect();
        for i in items {
            known.extend(i.iter());
        }
        // The position of the first use, for the line number.
        let at = src.find(&format!("{{{{{n}")).unwrap_or(0);
        template_error(
            name,
            src,
            at,
            format!("unknown {what} `{n}`; known names: {}", known.join(", ")),
        )
    };
    for node in nodes {
        match node {
            Node::Text(_) => {}
            Node::Var(n) => {
                let in_item = items.iter().rev().any(|i| i.contains(&n.as_str()));
                let top = schema.iter().find(|(k, _)| k == n).map(|(_, kind)| *kind);
                if !in_item && !matches!(top, Some(Kind::Text)) {
                    return Err(unknown(n, "value", items));
                }
            }
            Node::Section { name: n, body, .. } => {
                let in_item = items.iter().rev().any(|i| i.contains(&n.as_str()));
                match schema.iter().find(|(k, _)| k == n).map(|(_, kind)| *kind) {
                    _ if in_item => check_names(name, src, body, schema, items)?,
                    Some(Kind::List(item)) => {
                        items.push(item);
                        let r = check_names(name, src, body, schema, items);
                        items.pop();
                        r?;
                    }
                    Some(Kind::Bool | Kind::Text) => check_names(name, src, body, schema, items)?,
                    None => return Err(unknown(n, "section", items)),
                }
            }
        }
    }
    Ok(())
}

impl Template {
    fn render(&self, scope: &Scope) -> String {
        let mut out = String::new();
        let mut stack = vec![scope];
        self.render_nodes(&self.nodes, &mut stack, &mut out);
        out
    }

    fn render_nodes<'a>(&self, nodes: &'a [Node], stack: &mut Vec<&'a Scope>, out: &mut String)
    where
        Self: 'a,
    {
        for node in nodes {
            match node {
                Node::Text(t) => out.push_str(t),
                Node::Var(n) => {
                    if let Some(Value::Text(v)) = lookup(stack, n) {
                        if self.html {
                            out.push_str(&escape_html(v));
                        } else {
                            out.push_str(v);
                        }
                    }
                }
                Node::Section {
                    name,
                    inverted,
                    body,
                } => {
                    let value = lookup(stack, name);
                    let truthy = match value {
                        Some(Value::Bool(b)) => *b,
                        Some(Value::Text(t)) => !t.is_empty(),
                        Some(Value::List(l)) => !l.is_empty(),
                        None => false,
                    };
                    if *inverted {
                        if !truthy {
                            self.render_nodes(body, stack, out);
                        }
                    } else if let Some(Value::List(items)) = value {
                        for item in items {
                            stack.push(item);
                            self.render_nodes(body, stack, out);
                            stack.pop();
                        }
                    } else if truthy {
                        self.render_nodes(body, stack, out);
                    }
                }
            }
        }
    }
}

fn lookup<'a>(stack: &[&'a Scope], name: &str) -> Option<&'a Value> {
    stack.iter().rev().find_map(|s| s.get(name))
}

/// The templates of one mail in one language.
#[derive(Debug, Clone)]
struct MailTemplates {
    subject: Template,
    text: Template,
    html: Option<Template>,
}

/// Load a template file: from `dir` when it has the file, else built in.
fn source(dir: Option<&Path>, file: &str) -> Result<(String, String), NotifyError> {
    if let Some(dir) = dir {
        let p = dir.join(file);
        if p.exists() {
            let text = fs_err::read_to_string(&p).map_err(NotifyError::Io)?;
            return Ok((p.display().to_string(), text));
        }
    }
    let text = BUILTIN
        .iter()
        .find(|(n, _)| *n == file)
        .map(|(_, t)| (*t).to_owned())
        .unwrap_or_default();
    Ok((format!("built-in {file}"), text))
}

fn load_pair(dir: Option<&Path>, kind: &str, lang: Language) -> Result<MailTemplates, NotifyError> {
    let schema = if kind == "customer" {
        CUSTOMER_SCHEMA
    } else {
        FAILURE_SCHEMA
    };
    let (name, text) = source(dir, &format!("{kind}.{}.txt", lang.code()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let (first, body) = text.split_once('\n').unwrap_or((text, ""));
    let Some(subject) = first.trim_end_matches('\r').strip_prefix("Subject:") else {
        return Err(NotifyError::Template {
            name,
            line: 1,
            message: "the first line must be `Subject: …`".into(),
        });
    };
    let subject = parse_template(&name, subject.trim(), false, schema)?;
    // The body starts after the blank line that follows the subject.
    let body = body
        .strip_prefix("\r\n")
        .or_else(|| body.strip_prefix('\n'))
        .unwrap_or(body);
    let text = parse_template(&name, body, false, schema).map_err(|e| match e {
        NotifyError::Template {
            name,
            line,
            message,
        } => NotifyError::Template {
            name,
            line: line + 2,
            message,
        },
        other => other,
    })?;
    let (hname, html) = source(dir, &format!("{kind}.{}.html", lang.code()))?;
    let html = if html.trim().is_empty() {
        None
    } else {
        Some(parse_template(&hname, &html, true, schema)?)
    };
    Ok(MailTemplates {
        subject,
        text,
        html,
    })
}

// ---------------------------------------------------------------------------------
// The notifier.

/// Renders and sends the delivery mails; built once per run from `[delivery.mail]`.
#[derive(Debug, Clone)]
pub struct Notifier {
    config: NotifyConfig,
    from: String,
    offset: Option<FixedOffset>,
    customer: BTreeMap<&'static str, MailTemplates>,
    failure: BTreeMap<&'static str, MailTemplates>,
}

/// A rendered mail, before it is built into a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The subject.
    pub subject: String,
    /// The plain-text body.
    pub text: String,
    /// The HTML body, unless the template is empty.
    pub html: Option<String>,
    /// The language used.
    pub language: Language,
}

impl Notifier {
    /// Load and check every template (built-in, or from `templates_dir`), and pick the
    /// sender: `[delivery.mail] from`, else `[mail] from`, else [`FALLBACK_FROM`].
    pub fn new(config: &NotifyConfig, mail: &MailConfig) -> Result<Notifier, NotifyError> {
        let offset = match &config.utc_offset {
            None => None,
            Some(t) => Some(parse_utc_offset(t).ok_or_else(|| NotifyError::Config {
                key: "delivery.mail.utc_offset".into(),
                message: format!("{t:?} is not an offset like \"+08:00\" or \"UTC\""),
            })?),
        };
        if let Some(dir) = &config.templates_dir
            && !dir.is_dir()
        {
            return Err(NotifyError::Config {
                key: "delivery.mail.templates_dir".into(),
                message: format!("{} is not a directory", dir.display()),
            });
        }
        let dir = config.templates_dir.as_deref();
        let mut customer = BTreeMap::new();
        let mut failure = BTreeMap::new();
        for lang in Language::ALL {
            customer.insert(lang.code(), load_pair(dir, "customer", lang)?);
            failure.insert(lang.code(), load_pair(dir, "failure", lang)?);
        }
        let from = config
            .from
            .clone()
            .or_else(|| mail.from.clone())
            .unwrap_or_else(|| FALLBACK_FROM.to_owned());
        Ok(Notifier {
            config: config.clone(),
            from,
            offset,
            customer,
            failure,
        })
    }

    /// The sender.
    pub fn from(&self) -> &str {
        &self.from
    }

    /// The language of the customer mail: the customer's own (`facts.language`), else
    /// `languages` by address then domain, else `language`.
    pub fn language_for(&self, facts: &MailFacts) -> Language {
        if let Some(l) = facts.language.as_deref().and_then(Language::parse) {
            return l;
        }
        for addr in split_addresses(&facts.customer_emails) {
            let bare = bare_address(&addr);
            if let Some(l) = self.config.languages.get(&bare) {
                return *l;
            }
            if let Some((_, domain)) = bare.rsplit_once('@')
                && let Some(l) = self.config.languages.get(domain)
            {
                return *l;
            }
        }
        self.config.language
    }

    fn date(&self, t: DateTime<Utc>) -> (String, String) {
        let offset = self
            .offset
            .unwrap_or_else(|| Local.offset_from_utc_datetime(&t.naive_utc()).fix());
        let local = t.with_timezone(&offset);
        (
            local.format("%Y-%m-%d").to_string(),
            local.format("%Y-%m-%d %H:%M UTC%:z").to_string(),
        )
    }

    fn customer_scope(&self, facts: &MailFacts) -> (Scope, Option<Attachment>) {
        let text = |s: &str| Value::Text(s.to_owned());
        let access = &facts.access;
        let mut links: BTreeMap<&str, &str> = access
            .links
            .iter()
            .map(|l| (l.key.as_str(), l.url.as_str()))
            .collect();
        let mut items: Vec<Scope> = Vec::new();
        let file_item = |path: &str, size: u64, md5: &str, link: Option<&str>| -> Scope {
            let mut m = Scope::new();
            m.insert("path", text(path));
            m.insert("size", Value::Text(human_size(size)));
            m.insert("bytes", Value::Text(size.to_string()));
            m.insert("md5", text(md5));
            m.insert("has_md5", Value::Bool(!md5.is_empty()));
            m.insert("link", text(link.unwrap_or("")));
            m.insert("has_link", Value::Bool(link.is_some()));
            m
        };
        for f in &facts.files {
            let link = links.remove(f.key.as_str());
            items.push(file_item(&f.path, f.size, &f.md5, link));
        }
        // Links to files not in the list (md5sum.txt), in the grant's order.
        for l in &access.links {
            if links.remove(l.key.as_str()).is_some() {
                items.push(file_item(&l.path, l.size, "", Some(l.url.as_str())));
            }
        }
        let max = self.config.max_listed_files;
        let not_listed = items.len().saturating_sub(max);
        let truncated = not_listed > 0;
        items.truncate(max);
        let links_file = (truncated && !access.links.is_empty()).then(|| {
            let mut tsv = String::from("path\tsize\turl\n");
            for l in &access.links {
                let _ = writeln!(tsv, "{}\t{}\t{}", l.path, l.size, l.url);
            }
            Attachment::new(
                "links.tsv",
                "text/tab-separated-values; charset=utf-8",
                tsv.into_bytes(),
            )
        });

        let mut s = Scope::new();
        s.insert("analysis_id", text(&facts.analysis_id));
        let project = facts.project_id.clone().unwrap_or_default();
        s.insert("has_project_id", Value::Bool(!project.is_empty()));
        s.insert("project_id", Value::Text(project));
        let name = facts.customer_name.clone().unwrap_or_default();
        s.insert("has_customer_name", Value::Bool(!name.trim().is_empty()));
        s.insert("customer_name", Value::Text(name));
        s.insert(
            "customer_email",
            Value::Text(split_addresses(&facts.customer_emails).join(", ")),
        );
        s.insert("target", text(&facts.target));
        let location = facts.location.clone().unwrap_or_default();
        s.insert("has_location", Value::Bool(!location.is_empty()));
        s.insert("location", Value::Text(location));
        s.insert("file_count", Value::Text(facts.file_count.to_string()));
        s.insert("total_size", Value::Text(human_size(facts.total_bytes)));
        s.insert("total_bytes", Value::Text(facts.total_bytes.to_string()));
        s.insert("delivered_at", Value::Text(self.date(facts.delivered_at).1));
        let (exp_date, exp_at) = access.expires_at.map(|e| self.date(e)).unwrap_or_default();
        s.insert("has_expiry", Value::Bool(access.expires_at.is_some()));
        s.insert("expires_date", Value::Text(exp_date));
        s.insert("expires_at", Value::Text(exp_at));
        s.insert(
            "valid_days",
            Value::Text(access.valid_days.map(|d| d.to_string()).unwrap_or_default()),
        );
        s.insert("method", text(access.method.as_str()));
        s.insert(
            "has_links",
            Value::Bool(access.method == AccessMethod::Presigned && !access.links.is_empty()),
        );
        let account = access.account.as_ref();
        s.insert("has_account", Value::Bool(account.is_some()));
        s.insert(
            "account_user",
            text(account.map_or("", |a| a.user.as_str())),
        );
        s.insert(
            "account_password",
            text(account.map_or("", |a| a.password.expose())),
        );
        let login = account.and_then(|a| a.login.clone()).unwrap_or_default();
        s.insert("has_login", Value::Bool(!login.is_empty()));
        s.insert("account_login", Value::Text(login));
        let dir = account
            .and_then(|a| a.directory.clone())
            .unwrap_or_default();
        s.insert("has_directory", Value::Bool(!dir.is_empty()));
        s.insert("account_directory", Value::Text(dir));
        let md5_attached = self.config.attach_md5sum && facts.md5sum.is_some();
        s.insert("md5sum_attached", Value::Bool(md5_attached));
        s.insert(
            "md5sum_name",
            text(
                facts
                    .md5sum
                    .as_ref()
                    .map_or("md5sum.txt", |(n, _)| n.as_str()),
            ),
        );
        s.insert("files_truncated", Value::Bool(truncated));
        s.insert("files_not_listed", Value::Text(not_listed.to_string()));
        s.insert("links_attached", Value::Bool(links_file.is_some()));
        s.insert("files", Value::List(items));
        (s, links_file)
    }

    fn render(templates: &MailTemplates, scope: &Scope, language: Language) -> Rendered {
        let subject = templates
            .subject
            .render(scope)
            .replace(['\r', '\n'], " ")
            .trim()
            .to_owned();
        Rendered {
            subject,
            text: templates.text.render(scope),
            html: templates.html.as_ref().map(|h| h.render(scope)),
            language,
        }
    }

    fn templates<'a>(
        map: &'a BTreeMap<&'static str, MailTemplates>,
        lang: Language,
    ) -> Result<&'a MailTemplates, NotifyError> {
        map.get(lang.code()).ok_or_else(|| NotifyError::Config {
            key: "delivery.mail.language".into(),
            message: format!("no templates for {}", lang.code()),
        })
    }

    /// Render the customer mail (for a preview, or a test).
    pub fn render_customer(&self, facts: &MailFacts) -> Result<Rendered, NotifyError> {
        let lang = self.language_for(facts);
        let (scope, _) = self.customer_scope(facts);
        Ok(Self::render(
            Self::templates(&self.customer, lang)?,
            &scope,
            lang,
        ))
    }

    /// Build the customer mail: To the customer, Cc staff (and `cc`), Bcc `bcc`,
    /// md5sum.txt attached, `links.tsv` attached when not every link is in the body.
    pub fn customer_mail(&self, facts: &MailFacts) -> Result<OutgoingMail, NotifyError> {
        let to = split_addresses(&facts.customer_emails);
        if to.is_empty() {
            return Err(NotifyError::NoRecipient {
                what: "customer mail (the analysis has no customer e-mail)",
            });
        }
        let lang = self.language_for(facts);
        let (scope, links_file) = self.customer_scope(facts);
        let r = Self::render(Self::templates(&self.customer, lang)?, &scope, lang);
        let mut mail = OutgoingMail::new(self.from.clone())
            .subject(r.subject)
            .text(r.text)
            .header(ANALYSIS_HEADER, facts.analysis_id.clone())
            .header(KIND_HEADER, "delivery");
        if let Some(k) = &facts.message_key {
            mail = mail.message_id(fixed_message_id(k, &self.from));
        }
        if let Some(h) = r.html {
            mail = mail.html(h);
        }
        let to_bare: Vec<String> = to.iter().map(|a| bare_address(a)).collect();
        for a in &to {
            mail = mail.to(a.clone());
        }
        let mut cc_list: Vec<String> = Vec::new();
        if self.config.cc_staff {
            cc_list.extend(facts.staff.iter().cloned());
        }
        cc_list.extend(self.config.cc.iter().cloned());
        for a in split_addresses(&cc_list) {
            if !to_bare.contains(&bare_address(&a)) {
                mail = mail.cc(a);
            }
        }
        for a in split_addresses(&self.config.bcc) {
            mail = mail.bcc(a);
        }
        if let Some(r) = &self.config.reply_to {
            mail = mail.reply_to(r.clone());
        }
        if self.config.attach_md5sum
            && let Some((name, data)) = &facts.md5sum
        {
            mail = mail.attach(Attachment::new(
                name.clone(),
                "text/plain; charset=utf-8",
                data.clone(),
            ));
        }
        if let Some(f) = links_file {
            mail = mail.attach(f);
        }
        Ok(mail)
    }

    /// Build and send the customer mail; the log line names the analysis and the
    /// Message-ID, never the body.
    pub async fn send_customer(
        &self,
        mailer: &Mailer,
        facts: &MailFacts,
    ) -> Result<SentMail, NotifyError> {
        let mail = self.customer_mail(facts)?;
        let sent = mailer.send(&mail).await?;
        tracing::info!(
            analysis_id = %facts.analysis_id,
            message_id = %sent.message_id,
            recipients = sent.recipients.len(),
            "customer mail sent"
        );
        Ok(sent)
    }

    fn failure_scope(&self, facts: &FailureFacts) -> Scope {
        const MAX_FAILED: usize = 200;
        let text = |s: &str| Value::Text(s.to_owned());
        let mut s = Scope::new();
        s.insert("analysis_id", text(&facts.analysis_id));
        let project = facts.project_id.clone().unwrap_or_default();
        s.insert("has_project_id", Value::Bool(!project.is_empty()));
        s.insert("project_id", Value::Text(project));
        s.insert("target", text(&facts.target));
        let location = facts.location.clone().unwrap_or_default();
        s.insert("has_location", Value::Bool(!location.is_empty()));
        s.insert("location", Value::Text(location));
        s.insert(
            "error",
            Value::Text(labrelay::secret::scrub(&facts.error).into_owned()),
        );
        s.insert("file_count", Value::Text(facts.file_count.to_string()));
        s.insert(
            "failed_count",
            Value::Text(facts.failed_files.len().to_string()),
        );
        let not_listed = facts.failed_files.len().saturating_sub(MAX_FAILED);
        s.insert("failed_truncated", Value::Bool(not_listed > 0));
        s.insert("failed_not_listed", Value::Text(not_listed.to_string()));
        s.insert("failed_at", Value::Text(self.date(facts.failed_at).1));
        s.insert("host", Value::Text(host_name()));
        s.insert("attempt", Value::Text(facts.attempt.to_string()));
        s.insert("will_retry", Value::Bool(facts.will_retry));
        s.insert(
            "has_failed_files",
            Value::Bool(!facts.failed_files.is_empty()),
        );
        let items = facts
            .failed_files
            .iter()
            .take(MAX_FAILED)
            .map(|f| {
                let mut m = Scope::new();
                m.insert("path", text(&f.path));
                m.insert(
                    "error",
                    Value::Text(labrelay::secret::scrub(&f.error).into_owned()),
                );
                m
            })
            .collect();
        s.insert("failed_files", Value::List(items));
        s
    }

    /// Render the staff failure notice.
    pub fn render_failure(&self, facts: &FailureFacts) -> Result<Rendered, NotifyError> {
        let lang = self.config.language;
        let scope = self.failure_scope(facts);
        Ok(Self::render(
            Self::templates(&self.failure, lang)?,
            &scope,
            lang,
        ))
    }

    /// Build the staff failure notice (in `language`), To `facts.to`.
    pub fn failure_mail(&self, facts: &FailureFacts) -> Result<OutgoingMail, NotifyError> {
        let to = split_addresses(&facts.to);
        if to.is_empty() {
            return Err(NotifyError::NoRecipient {
                what: "failure notice (no staff address: set [delivery] staff)",
            });
        }
        let r = self.render_failure(facts)?;
        let mut mail = OutgoingMail::new(self.from.clone())
            .subject(r.subject)
            .text(r.text)
            .header(ANALYSIS_HEADER, facts.analysis_id.clone())
            .header(KIND_HEADER, "delivery-failure");
        if let Some(h) = r.html {
            mail = mail.html(h);
        }
        for a in to {
            mail = mail.to(a);
        }
        Ok(mail)
    }

    /// Build and send the staff failure notice.
    pub async fn send_failure(
        &self,
        mailer: &Mailer,
        facts: &FailureFacts,
    ) -> Result<SentMail, NotifyError> {
        let mail = self.failure_mail(facts)?;
        let sent = mailer.send(&mail).await?;
        tracing::info!(
            analysis_id = %facts.analysis_id,
            message_id = %sent.message_id,
            "failure notice sent to staff"
        );
        Ok(sent)
    }
}

// ---------------------------------------------------------------------------------
// The engine's customer steps.

/// The customer steps of a delivery ([`CustomerSteps`]): [`Access::grant`] by the
/// target's kind, then the templated customer mail. Built once per run or listener
/// from the configuration, which it checks: a mistake in `[delivery.access]`,
/// `[delivery.mail]`, a template or a `[delivery.vendors.NAME]` stops the tool at
/// start-up (exit 78), not after an upload.
#[derive(Debug, Clone)]
pub struct DeliverySteps {
    access: Access,
    notifier: Notifier,
    vendors: BTreeMap<String, VendorConfig>,
}

impl DeliverySteps {
    /// Check and load `[delivery.access]`, `[delivery.mail]` (and its templates) and
    /// every `[delivery.vendors.NAME]` (whose secrets are resolved only when used).
    pub fn new(config: &Config, delivery: &DeliveryConfig) -> anyhow::Result<DeliverySteps> {
        let access_cfg = AccessConfig::from_value(delivery.access.as_ref())?;
        let access =
            Access::new("delivery.access", &access_cfg).map_err(AccessError::into_anyhow)?;
        let notify_cfg = NotifyConfig::from_value(delivery.mail.as_ref())?;
        let notifier =
            Notifier::new(&notify_cfg, &config.mail).map_err(NotifyError::into_anyhow)?;
        let mut vendors = BTreeMap::new();
        for (name, raw) in &delivery.vendors {
            let v = VendorConfig::from_value(name, raw)?;
            VendorTarget::check(&format!("delivery.vendors.{name}"), &v)
                .map_err(CommandError::into_anyhow)?;
            vendors.insert(name.clone(), v);
        }
        Ok(DeliverySteps {
            access,
            notifier,
            vendors,
        })
    }

    /// The access settings.
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// The mail renderer.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// The vendor target `[delivery.vendors.NAME]`, its secrets resolved now; `None`
    /// when there is no such section.
    pub fn vendor_target(&self, name: &str) -> anyhow::Result<Option<VendorTarget>> {
        self.vendors
            .get(name)
            .map(|v| {
                VendorTarget::new(&format!("delivery.vendors.{name}"), v)
                    .map_err(CommandError::into_anyhow)
            })
            .transpose()
    }

    /// `delivery-upload renew`: fresh presigned links for a recorded delivery (its
    /// report rebuilt from the journal), valid `[delivery.access] expiry_days` from
    /// now; every key is checked to still exist first. Mail them with
    /// [`CustomerSteps::notify`]. Fails with exit 78 for a target whose access is not
    /// by links (accounts are renewed by delivering again with `--force`).
    pub async fn renew_links(
        &self,
        ctx: StepContext<'_>,
        report: &DeliveryReport,
    ) -> anyhow::Result<AccessGrant> {
        let method = self
            .access
            .method_for(&report.target.name, ctx.storage, None);
        let (AccessMethod::Presigned, Some(storage)) = (method, ctx.storage) else {
            return Err(labrelay::exit::tagged(
                Exit::Config,
                format!(
                    "target {} gives access by {method}, not by presigned links; there are no links to renew",
                    report.target.name
                ),
            ));
        };
        let req = AccessRequest::from_report(report);
        let grant = crate::access::renew(storage, &req.files, self.access.expiry_days(), req.now)
            .await
            .map_err(AccessError::into_anyhow)?;
        tracing::info!(
            analysis_id = %report.analysis.analysis_id,
            links = grant.links.len(),
            expires_at = ?grant.expires_at,
            "links renewed"
        );
        Ok(grant)
    }

    /// Mail the staff failure notice through the configured mailer (SMTP or outbox).
    pub async fn notify_failure(
        &self,
        config: &Config,
        facts: &FailureFacts,
    ) -> anyhow::Result<MailReceipt> {
        let mailer = Mailer::from_config(config.smtp.as_ref(), &config.outbox_dir())?;
        let sent = self
            .notifier
            .send_failure(&mailer, facts)
            .await
            .map_err(NotifyError::into_anyhow)?;
        Ok(MailReceipt {
            message_id: sent.message_id,
            recipients: sent.recipients,
            outbox_path: sent.outbox_path,
        })
    }
}

/// `<delivery-KEY@domain>` with the domain of the From address (`labrelay.invalid`
/// when it has none); KEY keeps only characters a Message-ID may hold.
fn fixed_message_id(key: &str, from: &str) -> String {
    let domain: String = from
        .rsplit_once('@')
        .map(|(_, d)| d)
        .unwrap_or_default()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
        .collect();
    let domain = if domain.is_empty() {
        "labrelay.invalid".to_owned()
    } else {
        domain
    };
    let key: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("<delivery-{key}@{domain}>")
}

impl CustomerSteps for DeliverySteps {
    fn check_target(
        &self,
        target: &crate::report::TargetInfo,
        storage: Option<&labrelay::storage::AnyStorage>,
    ) -> anyhow::Result<()> {
        // An SFTP server is ours: without an account for the customer they cannot reach
        // the data, and the mail would carry our own login and path.
        if target.kind == TargetKind::Sftp
            && !self.access.has_method_for(&target.name)
            && self.access.method_for(&target.name, storage, None) == AccessMethod::None
        {
            return Err(labrelay::exit::tagged(
                labrelay::exit::Exit::Config,
                format!(
                    "[storage.{name}] is an SFTP target, but [delivery.access] has no command to \
                     create the customer's account there: configure [delivery.access.command], or \
                     set [delivery.access] methods = {{ {name} = \"none\" }} if customers log in \
                     with accounts of their own",
                    name = target.name
                ),
            ));
        }
        Ok(())
    }

    fn grant<'a>(
        &'a self,
        ctx: StepContext<'a>,
        report: &'a DeliveryReport,
    ) -> BoxFuture<'a, anyhow::Result<AccessGrant>> {
        Box::pin(async move {
            let req = AccessRequest::from_report(report);
            let vendor = if report.target.kind == TargetKind::Vendor {
                self.vendor_target(&report.target.name)?
            } else {
                None
            };
            self.access
                .grant(&req, ctx.storage, vendor.as_ref())
                .await
                .map_err(AccessError::into_anyhow)
        })
    }

    fn notify<'a>(
        &'a self,
        ctx: StepContext<'a>,
        report: &'a DeliveryReport,
        access: &'a AccessGrant,
    ) -> BoxFuture<'a, anyhow::Result<Option<MailReceipt>>> {
        Box::pin(async move {
            let facts = MailFacts::from_report(report, access);
            if split_addresses(&facts.customer_emails).is_empty() {
                if report.tool == crate::report::Tool::UploadPure
                    && ctx.delivery.project_lookup.is_none()
                {
                    // upload-pure without a project lookup has no contacts by
                    // configuration (warned about at the lookup): nobody to tell.
                    return Ok(None);
                }
                // The data is there but nobody can use it: a failed step, reported to
                // staff, never a silent success.
                return Err(labrelay::exit::tagged(
                    labrelay::exit::Exit::Failed,
                    format!(
                        "analysis {} has no customer e-mail address in the LIMS: the data is \
                         uploaded but the customer was not told (fix the address and run again)",
                        facts.analysis_id
                    ),
                ));
            }
            let mailer = Mailer::from_config(ctx.config.smtp.as_ref(), &ctx.config.outbox_dir())?;
            let sent = self
                .notifier
                .send_customer(&mailer, &facts)
                .await
                .map_err(NotifyError::into_anyhow)?;
            Ok(Some(MailReceipt {
                message_id: sent.message_id,
                recipients: sent.recipients,
                outbox_path: sent.outbox_path,
            }))
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;
    use crate::access::{Account, FileLink};
    use labrelay::secret::Secret;

    fn t(src: &str, html: bool) -> Template {
        parse_template("test", src, html, CUSTOMER_SCHEMA).unwrap()
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn notifier(lang: Language) -> Notifier {
        let cfg = NotifyConfig {
            language: lang,
            utc_offset: Some("+08:00".into()),
            ..NotifyConfig::default()
        };
        Notifier::new(&cfg, &MailConfig::default()).unwrap()
    }

    fn facts(access: AccessGrant) -> MailFacts {
        MailFacts {
            analysis_id: "6cLB4ma".into(),
            project_id: Some("V3fmjM".into()),
            customer_name: Some("王老师".into()),
            customer_emails: vec!["wang@example.cn".into()],
            staff: vec![
                "zhao@lab.example".into(),
                "cai@lab.example, zeng@lab.example".into(),
                "WANG@example.cn".into(),
            ],
            language: None,
            target: "oss".into(),
            location: None,
            files: vec![
                MailFile {
                    path: "clean/S1 <R1>.fq.gz".into(),
                    key: "online/6cLB4ma/clean/S1 <R1>.fq.gz".into(),
                    size: 1_572_864,
                    md5: "0123456789abcdef0123456789abcdef".into(),
                },
                MailFile {
                    path: "报告/结题报告.pdf".into(),
                    key: "online/6cLB4ma/报告/结题报告.pdf".into(),
                    size: 2048,
                    md5: "fedcba9876543210fedcba9876543210".into(),
                },
            ],
            file_count: 2,
            total_bytes: 1_574_912,
            md5sum: Some(("md5sum.txt".into(), b"0123  a\n".to_vec())),
            access,
            delivered_at: at("2025-01-30T02:00:00Z"),
            message_key: None,
        }
    }

    fn links() -> AccessGrant {
        let link = |path: &str, key: &str| FileLink {
            path: path.into(),
            key: key.into(),
            size: 10,
            url: url::Url::parse(&format!(
                "https://s3.example/b/{key}?X-Amz-Expires=604800&X-Amz-Signature=abc"
            ))
            .unwrap(),
        };
        AccessGrant {
            method: AccessMethod::Presigned,
            links: vec![
                link("clean/S1 <R1>.fq.gz", "online/6cLB4ma/clean/S1 <R1>.fq.gz"),
                link("报告/结题报告.pdf", "online/6cLB4ma/报告/结题报告.pdf"),
                link("md5sum.txt", "online/6cLB4ma/md5sum.txt"),
            ],
            account: None,
            expires_at: Some(at("2025-02-06T02:00:00Z")),
            valid_days: Some(7),
            clamped_from: Some(30),
        }
    }

    #[test]
    fn sizes_are_human_readable() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1024), "1.0 KiB");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(1_048_575), "1.0 MiB");
        assert_eq!(human_size(1_572_864), "1.5 MiB");
        assert_eq!(human_size(200 * 1024 * 1024 * 1024), "200.0 GiB");
        assert_eq!(human_size(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn offsets_parse() {
        assert_eq!(
            parse_utc_offset("+08:00").unwrap().local_minus_utc(),
            8 * 3600
        );
        assert_eq!(parse_utc_offset("-0530").unwrap().local_minus_utc(), -19800);
        assert_eq!(parse_utc_offset("UTC").unwrap().local_minus_utc(), 0);
        assert!(parse_utc_offset("8").is_none());
        assert!(parse_utc_offset("+25:00").is_none());
    }

    #[test]
    fn values_are_escaped_in_html_only() {
        let mut s = Scope::new();
        s.insert(
            "customer_name",
            Value::Text("<b>Tom & \"Jerry\"</b>".into()),
        );
        assert_eq!(
            t("Hi {{customer_name}}!", true).render(&s),
            "Hi &lt;b&gt;Tom &amp; &quot;Jerry&quot;&lt;/b&gt;!"
        );
        assert_eq!(
            t("Hi {{customer_name}}!", false).render(&s),
            "Hi <b>Tom & \"Jerry\"</b>!"
        );
        // Template text itself is not a value: it is never escaped.
        assert_eq!(t("<p>{{! note }}</p>", true).render(&s), "<p></p>");
    }

    #[test]
    fn sections_repeat_and_standalone_lines_vanish() {
        let mut s = Scope::new();
        let item = |p: &str| {
            let mut m = Scope::new();
            m.insert("path", Value::Text(p.into()));
            m
        };
        s.insert("files", Value::List(vec![item("a"), item("b")]));
        s.insert("has_links", Value::Bool(false));
        s.insert("analysis_id", Value::Text("A1".into()));
        let tpl = t(
            "Files of {{analysis_id}}:\n{{#files}}\n  - {{path}} ({{analysis_id}})\n{{/files}}\n{{#has_links}}\nlinks\n{{/has_links}}\n{{^has_links}}\nno links\n{{/has_links}}\nend\n",
            false,
        );
        assert_eq!(
            tpl.render(&s),
            "Files of A1:\n  - a (A1)\n  - b (A1)\nno links\nend\n"
        );
        let mut empty = s.clone();
        empty.insert("files", Value::List(vec![]));
        assert_eq!(
            t("{{#files}}x{{/files}}{{^files}}none{{/files}}", false).render(&empty),
            "none"
        );
    }

    #[test]
    fn template_mistakes_are_reported_with_a_line() {
        let err = |src: &str| {
            parse_template("customer.zh.txt", src, false, CUSTOMER_SCHEMA)
                .unwrap_err()
                .to_string()
        };
        let e = err("line1\n{{analysis_idd}}\n");
        assert!(e.contains("line 2") && e.contains("analysis_idd"), "{e}");
        assert!(err("{{#files}}\n{{/has_links}}").contains("closes"));
        assert!(err("{{#files}}").contains("never closed"));
        assert!(err("{{analysis_id").contains("never closed"));
        assert!(err("{{/files}}").contains("closes no section"));
        assert!(err("{{a b}}").contains("not a tag"));
        assert!(
            err("{{path}}").contains("unknown value `path`"),
            "outside files"
        );
        assert!(err("{{#nope}}x{{/nope}}").contains("unknown section"));
        assert!(
            err("{{files}}").contains("unknown value"),
            "a list is not text"
        );
    }

    #[test]
    fn builtin_templates_load_and_render_chinese() {
        let n = notifier(Language::Zh);
        let r = n.render_customer(&facts(links())).unwrap();
        assert_eq!(r.language, Language::Zh);
        assert!(r.subject.contains("6cLB4ma"), "{}", r.subject);
        assert!(r.text.contains("王老师"), "{}", r.text);
        assert!(r.text.contains("1.5 MiB"), "{}", r.text);
        assert!(r.text.contains("2025-02-06 10:00 UTC+08:00"), "{}", r.text);
        assert!(r.text.contains("报告/结题报告.pdf"), "{}", r.text);
        assert!(
            r.text.contains("https://s3.example/b/online/6cLB4ma/md5sum.txt?X-Amz-Expires=604800&X-Amz-Signature=abc"),
            "{}",
            r.text
        );
        let html = r.html.unwrap();
        assert!(html.contains("S1 &lt;R1&gt;.fq.gz"), "{html}");
        assert!(
            html.contains("X-Amz-Expires=604800&amp;X-Amz-Signature=abc"),
            "{html}"
        );
        assert!(!html.contains("<R1>"), "{html}");
    }

    #[test]
    fn language_follows_the_customer() {
        let mut cfg = NotifyConfig::default();
        cfg.languages
            .insert("partner.example.com".into(), Language::En);
        let n = Notifier::new(&cfg, &MailConfig::default()).unwrap();
        let mut f = facts(links());
        assert_eq!(n.language_for(&f), Language::Zh);
        f.customer_emails = vec!["Bob <bob@Partner.example.com>".into()];
        assert_eq!(n.language_for(&f), Language::En);
        f.language = Some("zh-CN".into());
        assert_eq!(n.language_for(&f), Language::Zh);
        f.language = Some("English".into());
        let r = n.render_customer(&f).unwrap();
        assert_eq!(r.language, Language::En);
        assert!(r.text.contains("Dear"), "{}", r.text);
        assert_eq!(Language::parse("中文"), Some(Language::Zh));
        assert_eq!(Language::parse("fr"), None);
    }

    #[test]
    fn account_mail_carries_the_password_and_no_links() {
        let grant = AccessGrant {
            method: AccessMethod::Vendor,
            links: vec![],
            account: Some(Account {
                user: "807729670online".into(),
                password: Secret::new("Xy7-generated-pw"),
                login: Some("https://online.example.org".into()),
                directory: Some("6cLB4ma".into()),
            }),
            expires_at: Some(at("2025-03-01T00:00:00Z")),
            valid_days: Some(30),
            clamped_from: None,
        };
        for lang in Language::ALL {
            let r = notifier(lang)
                .render_customer(&facts(grant.clone()))
                .unwrap();
            assert!(r.text.contains("807729670online"), "{}", r.text);
            assert!(r.text.contains("Xy7-generated-pw"), "{}", r.text);
            assert!(r.text.contains("https://online.example.org"), "{}", r.text);
            assert!(r.text.contains("2025-03-01"), "{}", r.text);
            assert!(!r.text.contains("X-Amz"), "{}", r.text);
            assert!(r.html.unwrap().contains("Xy7-generated-pw"));
        }
    }

    #[test]
    fn recipients_dedupe_and_attachments() {
        let n = notifier(Language::Zh);
        let mail = n.customer_mail(&facts(links())).unwrap();
        let dbg = format!("{mail:?}");
        assert!(dbg.contains("md5sum.txt"), "{dbg}");
        assert!(!dbg.contains("links.tsv"), "{dbg}");
        // The customer address listed among staff is not repeated in Cc.
        assert!(dbg.contains("zeng@lab.example"), "{dbg}");
        assert!(!dbg.contains("WANG@example.cn"), "{dbg}");

        let cfg = NotifyConfig {
            max_listed_files: 1,
            ..NotifyConfig::default()
        };
        let n = Notifier::new(&cfg, &MailConfig::default()).unwrap();
        let r = n.render_customer(&facts(links())).unwrap();
        assert!(r.text.contains("links.tsv"), "{}", r.text);
        let mail = n.customer_mail(&facts(links())).unwrap();
        assert!(format!("{mail:?}").contains("links.tsv"));

        let mut nobody = facts(links());
        nobody.customer_emails = vec![" ; ".into()];
        let err = n.customer_mail(&nobody).unwrap_err();
        assert_eq!(err.exit(), Exit::Failed);
    }

    #[test]
    fn failure_notice_scrubs_secrets() {
        let leaked = Secret::new("db-password-in-error-42");
        let facts = FailureFacts {
            analysis_id: "A1".into(),
            project_id: None,
            target: "oss".into(),
            location: Some("/nas1/A1".into()),
            error: format!(
                "connecting mysql://root:{}@db/lims: refused",
                leaked.expose()
            ),
            failed_files: vec![FailedFile {
                path: "a/b.fq.gz".into(),
                error: "permission denied".into(),
            }],
            file_count: 10,
            to: vec!["zhao@lab.example".into()],
            attempt: 2,
            will_retry: true,
            failed_at: at("2025-01-30T02:00:00Z"),
        };
        for lang in Language::ALL {
            let cfg = NotifyConfig {
                language: lang,
                ..NotifyConfig::default()
            };
            let n = Notifier::new(&cfg, &MailConfig::default()).unwrap();
            let r = n.render_failure(&facts).unwrap();
            assert!(r.subject.contains("A1"), "{}", r.subject);
            assert!(!r.text.contains("db-password"), "{}", r.text);
            assert!(r.text.contains("a/b.fq.gz"), "{}", r.text);
            assert!(r.text.contains("permission denied"), "{}", r.text);
            assert!(r.html.unwrap().contains("/nas1/A1"));
        }
        let mut nobody = facts;
        nobody.to.clear();
        assert!(notifier(Language::Zh).failure_mail(&nobody).is_err());
    }

    #[test]
    fn templates_dir_overrides_file_by_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("customer.en.txt"),
            "Subject: Data {{analysis_id}}\n\nHello {{customer_name}}, {{file_count}} files.\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("customer.en.html"), "").unwrap();
        let cfg = NotifyConfig {
            language: Language::En,
            templates_dir: Some(dir.path().to_owned()),
            ..NotifyConfig::default()
        };
        let n = Notifier::new(&cfg, &MailConfig::default()).unwrap();
        let r = n.render_customer(&facts(links())).unwrap();
        assert_eq!(r.subject, "Data 6cLB4ma");
        assert_eq!(r.text, "Hello 王老师, 2 files.\n");
        assert_eq!(r.html, None);

        std::fs::write(
            dir.path().join("failure.zh.txt"),
            "Subject: x\n\n{{#failed_files}}{{pathh}}{{/failed_files}}\n",
        )
        .unwrap();
        let err = Notifier::new(&cfg, &MailConfig::default()).unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.exit(), Exit::Config);
        assert!(
            msg.contains("failure.zh.txt") && msg.contains("line 3"),
            "{msg}"
        );
        assert!(msg.contains("pathh"), "{msg}");

        std::fs::write(dir.path().join("failure.zh.txt"), "no subject\n").unwrap();
        assert!(Notifier::new(&cfg, &MailConfig::default()).is_err());
    }

    #[test]
    fn config_section_is_typed() {
        let v: toml::Value = toml::from_str("language = \"en\"\nmax_listed_files = 5\n").unwrap();
        let c = NotifyConfig::from_value(Some(&v)).unwrap();
        assert_eq!(c.language, Language::En);
        assert_eq!(c.max_listed_files, 5);
        let v: toml::Value = toml::from_str("langauge = \"en\"\n").unwrap();
        let e = NotifyConfig::from_value(Some(&v)).unwrap_err();
        assert!(e.to_string().contains("langauge"), "{e}");
        assert_eq!(e.exit(), Exit::Config);
        let v: toml::Value = toml::from_str("utc_offset = \"China\"\n").unwrap();
        let c = NotifyConfig::from_value(Some(&v)).unwrap();
        assert!(Notifier::new(&c, &MailConfig::default()).is_err());
    }
}
