//! Tell about a job's outcome: mail to the address given at submission (`code-submit
//! task --email`) or by the task, and a signed POST to a configured webhook. Workers
//! send both after the job ends. Each mail has a Message-ID fixed by the job and its
//! end, so a mail sent again after a crash (between the server's acceptance and the
//! row saying "sent") is recognisably the same message, and the outbox keeps one file
//! per Message-ID; each webhook delivery carries a delivery id fixed the same way.

use std::fmt::Write as _;

use labrelay::config::{Config, ConfigError};
use labrelay::mail::{Mailer, OutgoingMail};

use crate::store::{Due, Job, Store};

/// Bytes of stdout and of stderr quoted in the mail.
const EXCERPT: usize = 4000;

/// Sends outcome mails and webhooks.
pub struct Notifier {
    mail: Option<(Mailer, String)>,
    webhooks: crate::webhook::Webhooks,
}

impl Notifier {
    /// From `[mail] from` and `[smtp]` (or the outbox), and `[jobs.webhooks]` (keys
    /// resolved now: a missing one is a configuration error). `None` when neither is
    /// configured.
    pub fn from_config(config: &Config) -> Result<Option<Notifier>, anyhow::Error> {
        let mail = match config.mail.from.clone() {
            Some(from) => Some((
                Mailer::from_config(config.smtp.as_ref(), &config.outbox_dir())?,
                from,
            )),
            None => None,
        };
        let settings: crate::config::JobsConfig = config.section("jobs")?.unwrap_or_default();
        let webhooks = crate::webhook::Webhooks::from_config(&settings.webhooks)?;
        if mail.is_none() && webhooks.is_empty() {
            return Ok(None);
        }
        Ok(Some(Notifier { mail, webhooks }))
    }

    /// Check at submission that an outcome mail can be sent and addressed.
    pub fn check(config: &Config, to: &str) -> Result<(), anyhow::Error> {
        check_address(config.mail.from.as_deref(), to)
    }

    /// The mail for `job`'s outcome.
    pub fn message(from: &str, job: &Job) -> OutgoingMail {
        let base = OutgoingMail::new(from.to_owned());
        let domain = base
            .id()
            .trim_end_matches('>')
            .rsplit_once('@')
            .map_or("labrelay.invalid", |(_, d)| d)
            .to_owned();
        let message_id = format!(
            "labrelay-job-{}-{}@{domain}",
            job.id,
            job.finished_ms.unwrap_or_default()
        );
        if job.task == crate::code::CODE
            && let Some((subject, text, html)) = crate::code::mail(job)
        {
            return base
                .to(job.notify.clone().unwrap_or_default())
                .subject(subject)
                .text(text)
                .html(html)
                .message_id(message_id);
        }
        let mut text = format!(
            "Job {} ({}) {}.\n\nArguments: {}\nAttempts: {} of {}\n",
            job.id, job.task, job.state, job.args, job.attempt, job.max_attempts
        );
        if let Some(c) = job.exit_code {
            let _ = writeln!(text, "Exit code: {c}");
        }
        if let Some(d) = job.duration_ms {
            let _ = writeln!(text, "Duration: {:.1} s", d as f64 / 1000.0);
        }
        if let Some(e) = &job.error {
            let _ = writeln!(text, "Error: {e}");
        }
        if let Some(r) = &job.result {
            let _ = write!(text, "\nResult:\n{r}\n");
        }
        for (name, out) in [("Output", &job.stdout), ("Errors", &job.stderr)] {
            if let Some(o) = out.as_deref().filter(|o| !o.trim().is_empty()) {
                let cut = o.char_indices().nth(EXCERPT).map_or(o.len(), |(i, _)| i);
                let _ = write!(text, "\n{name}:\n{}", &o[..cut]);
                if cut < o.len() {
                    let _ = writeln!(
                        text,
                        "
[… {} more bytes: job-worker result {}]",
                        o.len() - cut,
                        job.id
                    );
                }
            }
        }
        base.to(job.notify.clone().unwrap_or_default())
            .subject(format!(
                "[labrelay] job {} {}: {}",
                job.id, job.task, job.state
            ))
            .text(text)
            .message_id(message_id)
    }

    /// Send the outcome mails and webhooks that are due; returns how many went out.
    pub async fn send_due(&self, store: &Store) -> anyhow::Result<u64> {
        let mut sent = 0;
        if let Some((mailer, from)) = &self.mail {
            for job in store.claim_due(Due::Mail, 20, 120_000).await? {
                let job = crate::code::with_stored_result(store, job).await;
                match mailer.send(&Self::message(from, &job)).await {
                    Ok(m) => {
                        store.sent(Due::Mail, job.id, None).await?;
                        tracing::info!(job = job.id, to = ?m.recipients, "outcome mailed");
                        sent += 1;
                    }
                    // The hold runs out in two minutes; then it is tried again.
                    Err(e) => tracing::warn!(
                        job = job.id,
                        "mailing the outcome failed (tried again in 2 minutes): {e}"
                    ),
                }
            }
        }
        if !self.webhooks.is_empty() {
            sent += self.webhooks.send_due(store).await?;
        }
        Ok(sent)
    }
}

/// Whether outcome mail can go to `to` from `from` (`[mail] from`): a missing sender is a
/// configuration error, a bad address a usage error.
pub fn check_address(from: Option<&str>, to: &str) -> Result<(), anyhow::Error> {
    let Some(from) = from else {
        return Err(ConfigError::Missing(
            "[mail] from (the address job outcomes are mailed from)".into(),
        )
        .into());
    };
    OutgoingMail::new(from.to_owned())
        .to(to)
        .build()
        .map_err(|e| labrelay::exit::usage(format!("--email {to}: {e}")))?;
    Ok(())
}
