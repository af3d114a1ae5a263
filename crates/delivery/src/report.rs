//! The types the delivery engine hands to the customer-facing steps, and the seam
//! through which it calls them.
//!
//! The engine ([`crate::run`]) looks the analysis up ([`Analysis`]), uploads and verifies
//! the files, and then builds a [`DeliveryReport`]. Customer access ([`crate::access`])
//! and the customer mail ([`crate::notify`]) consume that report through the
//! [`CustomerSteps`] trait and answer with an [`AccessGrant`] (defined by `access`) and
//! a [`MailReceipt`]; the engine records `AccessGrant::record()` in the status row. Nothing in this module talks
//! to a server.

use std::collections::BTreeMap;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use labrelay::config::Config;
use labrelay::db::Db;
use labrelay::storage::AnyStorage;
use serde::Serialize;

use crate::access::AccessGrant;

/// Which tool ran the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tool {
    /// `delivery-upload`: looked up by analysis id; writes the LIMS status.
    DeliveryUpload,
    /// `upload-pure`: path given by hand; no LIMS status write.
    UploadPure,
}

impl Tool {
    /// The tool's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Tool::DeliveryUpload => "delivery-upload",
            Tool::UploadPure => "upload-pure",
        }
    }
}

/// Staff contacts of an analysis (seed: `action_man`, `sale_man`, `info_email`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Staff {
    /// The analyst in charge.
    pub action: Vec<String>,
    /// Sales.
    pub sales: Vec<String>,
    /// The information / bioinformatics contact.
    pub info: Vec<String>,
}

impl Staff {
    /// Every staff address once, in order action, sales, info.
    pub fn all(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for a in self.action.iter().chain(&self.sales).chain(&self.info) {
            if !out.iter().any(|o| o.eq_ignore_ascii_case(a)) {
                out.push(a.clone());
            }
        }
        out
    }
}

/// What the lookup found about an analysis (or, for upload-pure, a project).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Analysis {
    /// The analysis (plan) id; for upload-pure the delivery's name.
    pub analysis_id: String,
    /// The project (sub-project) id.
    pub project_id: Option<String>,
    /// The folder to deliver.
    pub path: Option<PathBuf>,
    /// The customer's name, for the greeting.
    pub customer_name: Option<String>,
    /// The customer's addresses (To).
    pub customer_emails: Vec<String>,
    /// Staff addresses (Cc).
    pub staff: Staff,
    /// Any other column or field the lookup returned, for templates.
    pub extra: BTreeMap<String, String>,
    /// A password for the customer's account from the LIMS (`customer_password`), used
    /// instead of a generated one; never serialized, printed or kept in `extra`.
    #[serde(skip)]
    pub customer_password: Option<labrelay::secret::Secret>,
}

/// How the files were sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// A local (or mounted) directory.
    Local,
    /// An S3-compatible bucket.
    S3,
    /// An SFTP server.
    Sftp,
    /// An external vendor command (`bo`-style).
    Vendor,
}

impl TargetKind {
    /// The lowercase name (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Local => "local",
            TargetKind::S3 => "s3",
            TargetKind::Sftp => "sftp",
            TargetKind::Vendor => "vendor",
        }
    }
}

/// Where the delivery went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetInfo {
    /// The `--target` name (`[storage.NAME]`).
    pub name: String,
    /// The backend kind.
    pub kind: TargetKind,
    /// The target as it may be shown (URL without credentials).
    pub describe: String,
}

/// One delivered file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeliveredFile {
    /// Path relative to the delivery folder, `/`-separated (as listed in md5sum.txt).
    pub rel: String,
    /// Full object key on the target (`<prefix>/<rel>`).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// MD5, lowercase hex.
    pub md5: String,
    /// SHA-256, lowercase hex, when `[delivery] sha256 = true`.
    pub sha256: Option<String>,
}

/// The outcome of a verified upload: what the customer steps work from.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryReport {
    /// The delivery's id in the state database (`delivery_runs.id`).
    pub delivery_id: String,
    /// The tool that ran it.
    pub tool: Tool,
    /// The analysis and its contacts.
    pub analysis: Analysis,
    /// The target.
    pub target: TargetInfo,
    /// The key prefix every file is below (`<key_prefix>/<analysis-id>`), no trailing `/`.
    pub key_prefix: String,
    /// The delivered files, sorted by key; md5sum.txt itself is not among them.
    pub files: Vec<DeliveredFile>,
    /// Number of files (without md5sum.txt).
    pub total_files: u64,
    /// Bytes of those files.
    pub total_bytes: u64,
    /// The key of the delivered md5sum.txt.
    pub md5sum_key: String,
    /// The text of md5sum.txt (coreutils format: `<md5>  <rel path>`), e.g. to attach it.
    pub md5sum_text: String,
    /// The key of sha256sum.txt, when SHA-256 is on.
    pub sha256sum_key: Option<String>,
    /// When the delivery run started.
    pub started_at: DateTime<Utc>,
    /// When the last file was verified.
    pub finished_at: DateTime<Utc>,
}

/// A mail sent (or written to the outbox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MailReceipt {
    /// Message-ID.
    pub message_id: String,
    /// Envelope recipients.
    pub recipients: Vec<String>,
    /// The outbox file, when there is no SMTP server.
    pub outbox_path: Option<PathBuf>,
}

/// What the customer steps may use besides the report.
#[derive(Clone, Copy)]
pub struct StepContext<'a> {
    /// The loaded configuration (`[delivery.access]`, `[delivery.mail]`, `[mail]`…).
    pub config: &'a Config,
    /// The delivery section.
    pub delivery: &'a crate::config::DeliveryConfig,
    /// The target's storage (presigned links), `None` for vendor targets.
    pub storage: Option<&'a AnyStorage>,
    /// The state database (e.g. to record links for `renew`).
    pub state: &'a Db,
}

impl std::fmt::Debug for StepContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepContext").finish_non_exhaustive()
    }
}

/// The steps after a verified upload: grant access, then tell the customer.
///
/// The engine calls [`grant`](CustomerSteps::grant) once, then
/// [`notify`](CustomerSteps::notify) with its result; an error from either fails the
/// delivery (the files stay delivered and journaled, so a re-run only repeats these
/// steps). [`crate::steps::DeliverySteps`] is the implementation the tools use.
pub trait CustomerSteps: Send + Sync {
    /// Grant the customer access to the delivered files.
    fn grant<'a>(
        &'a self,
        ctx: StepContext<'a>,
        report: &'a DeliveryReport,
    ) -> BoxFuture<'a, anyhow::Result<AccessGrant>>;

    /// Mail the customer (staff in Cc).
    fn notify<'a>(
        &'a self,
        ctx: StepContext<'a>,
        report: &'a DeliveryReport,
        access: &'a AccessGrant,
    ) -> BoxFuture<'a, anyhow::Result<Option<MailReceipt>>>;

    /// Check, before any upload, that the customer will be able to reach `target`
    /// (exit 78 when not). The default accepts every target.
    fn check_target(
        &self,
        target: &TargetInfo,
        storage: Option<&labrelay::storage::AnyStorage>,
    ) -> anyhow::Result<()> {
        let _ = (target, storage);
        Ok(())
    }
}
