//! Webhooks: when a job ends, POST its outcome to a configured URL, signed, retried
//! with backoff until it is taken or given up.
//!
//! The request body is `{"event": "job.finished", "delivery": "job-ID-FINISHED_MS",
//! "job": {...the job without its output...}, "result": {...id, state, exit_code,
//! result, stdout, stderr, error...}}` with the headers
//!
//! - `X-Labrelay-Event: job.finished`
//! - `X-Labrelay-Delivery: job-ID-FINISHED_MS` (the same on every retry: a receiver
//!   that saw it already can ignore it)
//! - `X-Labrelay-Timestamp: UNIX_SECONDS`
//! - `X-Labrelay-Signature: v1=HEX`, the HMAC-SHA256 under the webhook's key of
//!   `TIMESTAMP.BODY`.
//!
//! A 2xx answer delivers it. A timeout, a connection failure, 408, 429 or 5xx is tried
//! again after 5 s × 2^(tries−1) (capped at an hour, with jitter) up to the webhook's
//! `max_attempts`; any other answer gives up at once (the receiver refused the request
//! itself). A delivery given up keeps its reason in the job row (`webhook_error`).

use std::collections::BTreeMap;
use std::time::Duration;

use labrelay::config::ConfigError;
use labrelay::secret::Secret;

use crate::config::WebhookConfig;
use crate::store::{Due, Job, Store, now_ms};

/// The minimum key length.
const MIN_KEY_LEN: usize = 16;

struct Hook {
    url: String,
    key: Secret,
    timeout: Duration,
    max_attempts: u32,
}

/// The configured webhooks and an HTTP client.
pub struct Webhooks {
    hooks: BTreeMap<String, Hook>,
    http: reqwest::Client,
}

/// What one try came to.
#[derive(Debug, PartialEq, Eq)]
enum Try {
    Delivered,
    Again(String),
    Refused(String),
}

impl Webhooks {
    /// From `[jobs.webhooks]`, keys resolved (a missing or short key is a
    /// configuration error naming it).
    pub fn from_config(cfg: &BTreeMap<String, WebhookConfig>) -> Result<Webhooks, ConfigError> {
        let mut hooks = BTreeMap::new();
        for (name, w) in cfg {
            let key = w.key.resolve().map_err(|e| ConfigError::Invalid {
                key: format!("jobs.webhooks.{name}.key"),
                message: e.to_string(),
            })?;
            if key.expose().len() < MIN_KEY_LEN {
                return Err(ConfigError::Invalid {
                    key: format!("jobs.webhooks.{name}.key"),
                    message: format!("at least {MIN_KEY_LEN} characters"),
                });
            }
            hooks.insert(
                name.clone(),
                Hook {
                    url: w.url.clone(),
                    key,
                    timeout: Duration::from_secs(w.timeout_secs),
                    max_attempts: w.max_attempts,
                },
            );
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ConfigError::Invalid {
                key: "jobs.webhooks".into(),
                message: e.to_string(),
            })?;
        Ok(Webhooks { hooks, http })
    }

    /// Whether none is configured.
    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty()
    }

    /// The body of a job's delivery.
    pub fn body(job: &Job) -> serde_json::Value {
        serde_json::json!({
            "event": "job.finished",
            "delivery": delivery_id(job),
            "job": job.summary(),
            "result": job.result_record(),
        })
    }

    async fn try_once(&self, hook: &Hook, job: &Job) -> Try {
        let body = Self::body(job).to_string();
        let ts = chrono::Utc::now().timestamp().to_string();
        let sig = labrelay::sign::hmac_sha256_hex(
            hook.key.expose().as_bytes(),
            format!("{ts}.{body}").as_bytes(),
        );
        let sent = self
            .http
            .post(&hook.url)
            .timeout(hook.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Labrelay-Event", "job.finished")
            .header("X-Labrelay-Delivery", delivery_id(job))
            .header("X-Labrelay-Timestamp", &ts)
            .header("X-Labrelay-Signature", format!("v1={sig}"))
            .body(body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => Try::Delivered,
            Ok(r) => {
                let s = r.status();
                let why = format!("the receiver answered {s}");
                if s.is_server_error() || s.as_u16() == 408 || s.as_u16() == 429 {
                    Try::Again(why)
                } else {
                    Try::Refused(why)
                }
            }
            Err(e) => Try::Again(labrelay::secret::scrub(&e.to_string()).into_owned()),
        }
    }

    /// Send the deliveries that are due; returns how many were delivered.
    pub async fn send_due(&self, store: &Store) -> anyhow::Result<u64> {
        let mut delivered = 0;
        // The hold covers one try of the slowest hook.
        let hold = self
            .hooks
            .values()
            .map(|h| h.timeout)
            .max()
            .unwrap_or_default()
            .as_millis();
        let hold = i64::try_from(hold)
            .unwrap_or(i64::MAX)
            .saturating_add(30_000);
        for job in store.claim_due(Due::Webhook, 20, hold).await? {
            let name = job.webhook.clone().unwrap_or_default();
            let Some(hook) = self.hooks.get(&name) else {
                let why = format!("webhook {name} is not configured on this worker");
                tracing::warn!(job = job.id, "{why}: given up");
                store.sent(Due::Webhook, job.id, Some(&why)).await?;
                continue;
            };
            // `webhook_attempts` was counted by the claim: this is try number N.
            let tries = u32::try_from(job.webhook_attempts).unwrap_or(u32::MAX);
            match self.try_once(hook, &job).await {
                Try::Delivered => {
                    store.sent(Due::Webhook, job.id, None).await?;
                    tracing::info!(job = job.id, webhook = %name, tries, "outcome delivered");
                    delivered += 1;
                }
                Try::Refused(why) => {
                    tracing::warn!(job = job.id, webhook = %name, "webhook given up: {why}");
                    store.sent(Due::Webhook, job.id, Some(&why)).await?;
                }
                Try::Again(why) if tries >= hook.max_attempts => {
                    let why = format!("{why} (after {tries} tries)");
                    tracing::warn!(job = job.id, webhook = %name, "webhook given up: {why}");
                    store.sent(Due::Webhook, job.id, Some(&why)).await?;
                }
                Try::Again(why) => {
                    let wait = backoff(tries);
                    tracing::warn!(job = job.id, webhook = %name, tries, "webhook failed, tried again in {:.1} s: {why}", wait.as_secs_f64());
                    let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
                    store
                        .send_later(Due::Webhook, job.id, now_ms().saturating_add(wait_ms))
                        .await?;
                }
            }
        }
        Ok(delivered)
    }
}

/// The delivery id: the job and when it ended.
pub fn delivery_id(job: &Job) -> String {
    format!("job-{}-{}", job.id, job.finished_ms.unwrap_or_default())
}

/// The wait after `tries` failed tries: 5 s × 2^(tries−1), at most an hour, the upper
/// half jittered.
fn backoff(tries: u32) -> Duration {
    let full = 5_000u64
        .saturating_mul(1 << tries.saturating_sub(1).min(20))
        .min(3_600_000);
    let half = full / 2;
    Duration::from_millis(half + rand::random_range(0..=half))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        for (tries, lo, hi) in [
            (1, 2_500, 5_000),
            (2, 5_000, 10_000),
            (30, 1_800_000, 3_600_000),
        ] {
            let ms = u64::try_from(backoff(tries).as_millis()).unwrap_or(u64::MAX);
            assert!((lo..=hi).contains(&ms), "{tries}: {ms}");
        }
    }
}
