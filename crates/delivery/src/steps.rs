//! The customer steps of a delivery ([`CustomerSteps`]) as the tools run them: customer
//! access by the target's kind ([`crate::access`]), then the templated customer mail
//! ([`crate::notify`]); plus the renewal of links and the staff failure notice.
//!
//! Built once per run or listener from the configuration, which it checks, so a mistake
//! in `[delivery.access]`, `[delivery.mail]`, a template or a `[delivery.vendors.NAME]`
//! stops the tool at start-up (exit 78). It does not upload or record: the engine
//! ([`crate::run`]) calls it after a verified upload and records what it returns.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use labrelay::config::Config;
use labrelay::mail::Mailer;

use crate::access::{Access, AccessConfig, AccessGrant, AccessMethod, AccessRequest};
use crate::config::DeliveryConfig;
use crate::error::DeliveryError;
use crate::notify::{FailureFacts, MailFacts, Notifier, NotifyConfig, split_addresses};
use crate::report::{CustomerSteps, DeliveryReport, MailReceipt, StepContext, TargetKind};
use crate::vendor::{VendorConfig, VendorTarget};

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
        let access = Access::new("delivery.access", &access_cfg).map_err(anyhow::Error::from)?;
        let notify_cfg = NotifyConfig::from_value(delivery.mail.as_ref())?;
        let notifier = Notifier::new(&notify_cfg, &config.mail).map_err(anyhow::Error::from)?;
        let mut vendors = BTreeMap::new();
        for (name, raw) in &delivery.vendors {
            let v = VendorConfig::from_value(name, raw)?;
            VendorTarget::check(&format!("delivery.vendors.{name}"), &v)
                .map_err(anyhow::Error::from)?;
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
                    .map_err(anyhow::Error::from)
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
            return Err(DeliveryError::NoLinks {
                target: report.target.name.clone(),
                method: method.to_string(),
            }
            .into());
        };
        let req = AccessRequest::from_report(report);
        let grant = crate::access::renew(storage, &req.files, self.access.expiry_days(), req.now)
            .await
            .map_err(anyhow::Error::from)?;
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
            .map_err(anyhow::Error::from)?;
        Ok(MailReceipt {
            message_id: sent.message_id,
            recipients: sent.recipients,
            outbox_path: sent.outbox_path,
        })
    }
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
            return Err(DeliveryError::SftpWithoutAccess(target.name.clone()).into());
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
                .map_err(anyhow::Error::from)
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
                return Err(DeliveryError::NoCustomerAddress(facts.analysis_id.clone()).into());
            }
            let mailer = Mailer::from_config(ctx.config.smtp.as_ref(), &ctx.config.outbox_dir())?;
            let sent = self
                .notifier
                .send_customer(&mailer, &facts)
                .await
                .map_err(anyhow::Error::from)?;
            Ok(Some(MailReceipt {
                message_id: sent.message_id,
                recipients: sent.recipients,
                outbox_path: sent.outbox_path,
            }))
        })
    }
}
