//! Mail the outcome of a job to the address given at submission (`code-submit task
//! --email`). Workers send it after the job ends; each mail has a Message-ID fixed by
//! the job and its end, so a mail sent again after a crash (between the server's
//! acceptance and the row saying "sent") is recognisably the same message, and the
//! outbox keeps one file per Message-ID.

use std::fmt::Write as _;

use labrelay::config::{Config, ConfigError};
use labrelay::mail::{Mailer, OutgoingMail};

use crate::store::{Job, Store};

/// Bytes of stdout and of stderr quoted in the mail.
const EXCERPT: usize = 4000;

/// Sends outcome mails.
pub struct Notifier {
    mailer: Mailer,
    from: String,
}

impl Notifier {
    /// From `[mail] from` and `[smtp]` (or the outbox). `None` without `[mail] from`.
    pub fn from_config(config: &Config) -> Result<Option<Notifier>, anyhow::Error> {
        let Some(from) = config.mail.from.clone() else {
            return Ok(None);
        };
        let mailer = Mailer::from_config(config.smtp.as_ref(), &config.outbox_dir())?;
        Ok(Some(Notifier { mailer, from }))
    }

    /// Check at submission that an outcome mail can be sent and addressed.
    pub fn check(config: &Config, to: &str) -> Result<(), anyhow::Error> {
        check_address(config.mail.from.as_deref(), to)
    }

    /// The mail for `job`'s outcome.
    pub fn message(&self, job: &Job) -> OutgoingMail {
        let base = OutgoingMail::new(self.from.clone());
        let domain = base
            .id()
            .trim_end_matches('>')
            .rsplit_once('@')
            .map_or("labrelay.invalid", |(_, d)| d)
            .to_owned();
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
            .message_id(format!(
                "labrelay-job-{}-{}@{domain}",
                job.id,
                job.finished_ms.unwrap_or_default()
            ))
    }

    /// Send the outcome mails that are due; returns how many went out.
    pub async fn send_due(&self, store: &Store) -> anyhow::Result<u64> {
        let mut sent = 0;
        for job in store.claim_notifications(20, 120_000).await? {
            match self.mailer.send(&self.message(&job)).await {
                Ok(m) => {
                    store.notified(job.id).await?;
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
