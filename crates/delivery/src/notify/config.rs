//! `[delivery.mail]`: the languages, templates, sender and recipients of the delivery
//! mails, typed from the raw table (unknown keys are an error naming
//! `delivery.mail.<key>`). Checking the templates and the offset is
//! [`super::Notifier::new`]'s work.

use std::collections::BTreeMap;
use std::path::PathBuf;

use labrelay::config::ConfigError;
use serde::{Deserialize, Serialize};

use super::DEFAULT_MAX_LISTED_FILES;

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

    /// Every language with built-in templates.
    pub const ALL: [Language; 2] = [Language::Zh, Language::En];
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
        crate::config::typed_section(value, "delivery.mail")
    }
}
