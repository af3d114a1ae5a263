//! What the delivery mails are about: the facts the engine fills from its report
//! ([`MailFacts`], [`FailureFacts`]) and the small formatting helpers the mails use.
//! Plain data: nothing here renders a template or sends a mail.

use chrono::{DateTime, FixedOffset, Utc};
use serde::Serialize;

use crate::access::{AccessGrant, AccessMethod};
use crate::report::{Analysis, DeliveryReport};

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
pub(crate) fn bare_address(a: &str) -> String {
    match (a.rfind('<'), a.rfind('>')) {
        (Some(l), Some(r)) if l < r => a[l + 1..r].trim().to_ascii_lowercase(),
        _ => a.trim().to_ascii_lowercase(),
    }
}

pub(crate) fn host_name() -> String {
    fs_err::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown host".to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

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
}
