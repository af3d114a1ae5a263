//! The mails of a delivery: the customer's (links or account, expiry date, file count,
//! total size, md5sum.txt attached; staff in Cc) and the staff's failure notice.
//!
//! Mails are rendered from templates, text and HTML, in Chinese and English. The
//! templates shipped in `examples/templates/delivery/` are built in; `[delivery.mail]
//! templates_dir` replaces them file by file. The language is the customer's (the
//! lookup's `language` field, or `[delivery.mail] languages` by address or domain),
//! else `[delivery.mail] language` (default `zh`).
//!
//! The template syntax is [`crate::template::MailTemplate`]'s small subset of
//! Mustache. Names are checked when the templates are loaded ([`Notifier::new`])
//! against the fields each mail offers (listed here): a misspelt name in an operator's
//! template stops the tool at start-up (exit 78) with the file and line, not
//! mid-delivery. The first line of a `.txt` template is `Subject: …`.
//!
//! Files: `customer.<lang>.txt`, `customer.<lang>.html`, `failure.<lang>.txt`,
//! `failure.<lang>.html`; an empty `.html` file sends text only. The names each template
//! may use are listed in `examples/templates/delivery/README.md`.
//!
//! This module decides what the mails say ([`Notifier`]; the facts in [`MailFacts`] and
//! [`FailureFacts`], the settings in [`NotifyConfig`]); `labrelay::mail` builds and
//! sends them (SMTP or outbox); [`DeliverySteps`] (in [`crate::steps`]) decides when.
//! It never logs a mail's body: it holds a password or links.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use chrono::{DateTime, FixedOffset, Local, Offset as _, TimeZone as _, Utc};
use labrelay::config::MailConfig;
use labrelay::exit::Exit;
use labrelay::mail::{Attachment, MailError, Mailer, OutgoingMail, SentMail};

use crate::access::AccessMethod;
use crate::template::{Kind, MailTemplate, Schema, Scope, TemplateError, Value};

mod config;
mod facts;

pub use self::config::{Language, NotifyConfig};
pub use self::facts::{
    FailedFile, FailureFacts, MailFacts, MailFile, human_size, parse_utc_offset, split_addresses,
};
use self::facts::{bare_address, host_name};
// Moved to their own modules; the old paths stay.
pub use crate::steps::DeliverySteps;
pub use crate::template::escape_html;

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
        include_str!("../../../../examples/templates/delivery/customer.zh.txt"),
    ),
    (
        "customer.zh.html",
        include_str!("../../../../examples/templates/delivery/customer.zh.html"),
    ),
    (
        "customer.en.txt",
        include_str!("../../../../examples/templates/delivery/customer.en.txt"),
    ),
    (
        "customer.en.html",
        include_str!("../../../../examples/templates/delivery/customer.en.html"),
    ),
    (
        "failure.zh.txt",
        include_str!("../../../../examples/templates/delivery/failure.zh.txt"),
    ),
    (
        "failure.zh.html",
        include_str!("../../../../examples/templates/delivery/failure.zh.html"),
    ),
    (
        "failure.en.txt",
        include_str!("../../../../examples/templates/delivery/failure.en.txt"),
    ),
    (
        "failure.en.html",
        include_str!("../../../../examples/templates/delivery/failure.en.html"),
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
}

impl labrelay::exit::ExitClass for NotifyError {
    fn exit_class(&self) -> Exit {
        self.exit()
    }

    fn is_transient(&self) -> bool {
        match self {
            NotifyError::Mail(e) => labrelay::exit::ExitClass::is_transient(e),
            other => other.exit() == Exit::TempFail,
        }
    }
}
labrelay::exit_class!(NotifyError);

impl From<TemplateError> for NotifyError {
    fn from(e: TemplateError) -> Self {
        match e {
            TemplateError::Invalid {
                name,
                line,
                message,
            } => NotifyError::Template {
                name,
                line: line.unwrap_or(1),
                message,
            },
            // Mail templates expand no command line; kept total for the compiler.
            TemplateError::BadValue {
                step,
                placeholder,
                reason,
            } => NotifyError::Template {
                name: step,
                line: 1,
                message: format!("{{{{{placeholder}}}}}: {reason}"),
            },
        }
    }
}

// ---------------------------------------------------------------------------------
// Templates.

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

/// The templates of one mail in one language.
#[derive(Debug, Clone)]
struct MailTemplates {
    subject: MailTemplate,
    text: MailTemplate,
    html: Option<MailTemplate>,
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
    let subject = MailTemplate::parse(&name, subject.trim(), false, schema)?;
    // The body starts after the blank line that follows the subject.
    let body = body
        .strip_prefix("\r\n")
        .or_else(|| body.strip_prefix('\n'))
        .unwrap_or(body);
    let text = MailTemplate::parse(&name, body, false, schema).map_err(|e| match e.into() {
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
        Some(MailTemplate::parse(&hname, &html, true, schema)?)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;
    use crate::access::{AccessGrant, Account, FileLink};
    use labrelay::secret::Secret;

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
