//! `delivery-upload --listen`: take delivery requests from the queue — the seed's
//! RabbitMQ exchange, queue and routing key `DELIVERY` with `{"plan_code": "…"}`
//! messages, pressed by staff in the web page — and deliver each one.
//!
//! - A message is acknowledged only after the delivery's status row is committed
//!   (`delivered`, or `already_delivered` for a repeated request), so a listener killed
//!   at any point leaves the message to be delivered again; the re-run resumes from the
//!   journal and does not mail the customer twice.
//! - A temporary failure (server down, lock held, files that failed on the network) is
//!   requeued after `retry_delay_secs`; after `max_tries` deliveries of the message the
//!   broker dead-letters it to `<queue>.dead`. A permanent failure (unknown analysis,
//!   broken files, bad configuration) is reported to staff by mail and dead-lettered at
//!   once: retrying cannot help.
//! - A request for an analysis that another process is delivering right now (its lock
//!   is held) is not a failure: the request is published again as a fresh message and
//!   the original acknowledged, so no try is spent and the listener goes on with other
//!   requests; when it comes back after the running delivery ended, it finds the
//!   analysis delivered and is acknowledged as a duplicate.
//! - SIGTERM/SIGINT: no new message is taken; the delivery in flight stops starting new
//!   files, finishes and journals the ones in flight, and its message is requeued.

use std::time::Duration;

use labrelay::exit::{Exit, classify};
use labrelay::lock::LockError;
use labrelay::queue::{
    AnyBroker, Broker, Delivery, ExchangeKind, PublishOptions, QueueError, QueueSpec,
};
use serde::Deserialize;

use crate::notify::{DeliverySteps, FailureFacts};
use crate::report::{Analysis, Tool};
use crate::run::{DeliveryFailed, Env, Request, deliver};
use crate::upload::Cancel;

/// A delivery request as the web page sends it.
#[derive(Debug, Deserialize)]
struct Message {
    /// The seed's field name for the analysis id.
    plan_code: Option<String>,
    analysis_id: Option<String>,
    /// Optional: a target other than the default.
    target: Option<String>,
}

/// Parse a message body; the error says what is wrong with it.
fn parse(body: &[u8]) -> Result<(String, Option<String>), String> {
    let m: Message = serde_json::from_slice(body)
        .map_err(|e| format!("not a JSON object with plan_code or analysis_id: {e}"))?;
    let id = m
        .analysis_id
        .or(m.plan_code)
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .ok_or("no plan_code or analysis_id in the message")?;
    Ok((id, m.target))
}

/// The listener's queue setup: the exchange, the queue (with its dead-letter queue)
/// and the binding; idempotent. Returns the broker and the number of tries.
async fn declare(env: &Env<'_>) -> anyhow::Result<(AnyBroker, u32)> {
    let lc = &env.delivery.listen;
    let max_tries = lc
        .max_tries
        .unwrap_or(env.config.queue.max_deliveries)
        .max(1);
    let broker = AnyBroker::from_config(env.config).await?;
    broker
        .declare_exchange(&lc.exchange, ExchangeKind::Direct)
        .await?;
    match broker
        .declare_queue(&QueueSpec::new(&lc.queue).with_max_deliveries(max_tries))
        .await
    {
        Ok(()) => {}
        // A facility switching over keeps its LIMS publishing to the queue it has (the
        // seed's classic durable DELIVERY queue): consume it as it is.
        Err(QueueError::Mismatch { what, message }) => tracing::warn!(
            "{what} already exists with other arguments ({message}); consuming it as it is. \
             Without labrelay's dead-letter queue {q}.dead and delivery limit, a request that \
             fails for good is dropped after the staff report, and one that keeps failing \
             for now is retried every {delay} s without a limit. To migrate, see \
             docs/delivery-upload.md (\"Switching over from an existing queue\")",
            q = lc.queue,
            delay = lc.retry_delay_secs,
        ),
        Err(e) => return Err(e.into()),
    }
    broker
        .bind(&lc.queue, &lc.exchange, &lc.routing_key)
        .await?;
    Ok((broker, max_tries))
}

/// `delivery-upload request`: publish a delivery request for `analysis_id` to the
/// configured exchange (declaring the exchange, queue and binding first, so a request
/// published before any listener started waits in the queue). Prints a `request`
/// record with the message id.
pub async fn request(
    env: &Env<'_>,
    analysis_id: &str,
    target: Option<&str>,
) -> anyhow::Result<Exit> {
    env.delivery.check_id(analysis_id)?;
    let lc = &env.delivery.listen;
    let (broker, _) = declare(env).await?;
    let body = serde_json::json!({"analysis_id": analysis_id, "target": target});
    let message_id = uuid::Uuid::new_v4().to_string();
    broker
        .publish(
            &lc.exchange,
            &lc.routing_key,
            body.to_string().as_bytes(),
            &PublishOptions::new().message_id(message_id.clone()),
        )
        .await?;
    let record = serde_json::json!({
        "analysis_id": analysis_id,
        "target": target,
        "exchange": lc.exchange,
        "routing_key": lc.routing_key,
        "queue": lc.queue,
        "message_id": message_id,
    });
    if let Err(e) = env.events.printer().emit("request", &record, || {
        format!(
            "queued a delivery request for {analysis_id} on {} (message {message_id})",
            lc.queue
        )
    }) {
        tracing::debug!("writing the request record failed: {e}");
    }
    Ok(Exit::Ok)
}

/// Consume delivery requests until SIGTERM/SIGINT; exit 0 after a clean stop.
pub async fn listen(env: &Env<'_>, steps: &DeliverySteps) -> anyhow::Result<Exit> {
    let lc = &env.delivery.listen;
    let (broker, max_tries) = declare(env).await?;
    let mut consumer = broker.consume(&lc.queue, env.config.queue.prefetch).await?;
    tracing::info!(queue = %lc.queue, exchange = %lc.exchange, "waiting for delivery requests");
    env.events.record(
        "listening",
        &serde_json::json!({"queue": lc.queue, "exchange": lc.exchange, "routing_key": lc.routing_key}),
    );
    let cancel = Cancel::new();
    let stop = labrelay::cli::shutdown_signal();
    tokio::pin!(stop);
    loop {
        let delivery = tokio::select! {
            () = &mut stop => break,
            d = consumer.next() => match d {
                Ok(d) => d,
                // The connection dropped while we held a message: it comes back by itself.
                Err(e @ labrelay::queue::QueueError::DeliveryLost { .. }) => {
                    tracing::warn!("{e}");
                    continue;
                }
                Err(e) => return Err(e.into()),
            },
        };
        let work = handle(env, steps, &broker, delivery, &cancel, max_tries);
        tokio::pin!(work);
        let mut stopping = false;
        tokio::select! {
            r = &mut work => r?,
            () = &mut stop => {
                tracing::warn!("stopping: finishing the files in flight, then requeueing the request");
                stopping = true;
                cancel.cancel();
                work.await?;
            }
        }
        if stopping {
            break;
        }
    }
    tracing::info!("listener stopped");
    Ok(Exit::Ok)
}

/// Deliver one request and settle its message.
async fn handle(
    env: &Env<'_>,
    steps: &DeliverySteps,
    broker: &AnyBroker,
    delivery: Delivery,
    cancel: &Cancel,
    max_tries: u32,
) -> anyhow::Result<()> {
    let (id, target) = match parse(&delivery.body) {
        Ok(x) => x,
        Err(why) => {
            tracing::error!(message_id = ?delivery.message_id, "rejecting a delivery request: {why}");
            let err = anyhow::anyhow!("unreadable delivery request: {why}");
            report_failure(
                env,
                steps,
                "(unreadable request)",
                None,
                &err,
                delivery.delivery_count,
            )
            .await;
            settle(delivery.reject().await);
            return Ok(());
        }
    };
    tracing::info!(analysis_id = %id, try_ = delivery.delivery_count, "delivery request");
    let req = Request {
        tool: Tool::DeliveryUpload,
        analysis_id: Some(id.clone()),
        project_id: None,
        path: None,
        name: None,
        target,
        dry_run: false,
        force: false,
        request_id: delivery.message_id.clone(),
    };
    match deliver(env, &req, steps, cancel).await {
        Ok(o) if o.exit == Exit::Ok => settle(delivery.ack().await),
        Ok(_) => {
            // Interrupted by SIGTERM: the journal keeps what is done; deliver it later.
            settle(delivery.nack_requeue().await);
        }
        Err(e)
            if e.chain()
                .any(|c| matches!(c.downcast_ref::<LockError>(), Some(LockError::Held { .. }))) =>
        {
            // Being delivered right now by another process: not a failed try. Queue a
            // fresh copy (no try spent), then let go of this one.
            tracing::info!(
                analysis_id = %id,
                "being delivered by another process; queueing the request again"
            );
            let mut opts = PublishOptions::new();
            if let Some(mid) = &delivery.message_id {
                opts = opts.message_id(mid.clone());
            }
            let lc = &env.delivery.listen;
            match broker
                .publish(&lc.exchange, &lc.routing_key, &delivery.body, &opts)
                .await
            {
                Ok(()) => settle(delivery.ack().await),
                Err(pe) => {
                    tracing::warn!("queueing the request again failed ({pe}); requeueing it");
                    settle(delivery.nack_requeue().await);
                }
            }
            // Give the running delivery a moment before the copy comes back.
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
                () = wait_cancel(cancel) => {}
            }
        }
        Err(e) => {
            let exit = classify(&e);
            let error = format!("{e:#}");
            let last = delivery.delivery_count >= max_tries;
            if exit == Exit::TempFail && !last && !cancel.is_cancelled() {
                let delay = Duration::from_secs(env.delivery.listen.retry_delay_secs);
                tracing::warn!(
                    analysis_id = %id,
                    try_ = delivery.delivery_count,
                    max_tries,
                    "delivery failed for now, retrying in {delay:?}: {error}"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = wait_cancel(cancel) => {}
                }
                settle(delivery.nack_requeue().await);
            } else {
                tracing::error!(analysis_id = %id, "delivery failed; dead-lettering the request: {error}");
                report_failure(
                    env,
                    steps,
                    &id,
                    req.target.as_deref(),
                    &e,
                    delivery.delivery_count,
                )
                .await;
                settle(delivery.reject().await);
            }
        }
    }
    Ok(())
}

async fn wait_cancel(cancel: &Cancel) {
    while !cancel.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A settle that fails means the broker will deliver the message again: log it only.
fn settle(r: Result<(), labrelay::queue::QueueError>) {
    if let Err(e) = r {
        tracing::warn!("settling the queue message failed (it will come again): {e}");
    }
}

/// Mail the failure notice to the analysis's staff and `[delivery] staff` (best effort:
/// a mail failure is logged, never fatal).
pub async fn report_failure(
    env: &Env<'_>,
    steps: &DeliverySteps,
    analysis_id: &str,
    target: Option<&str>,
    error: &anyhow::Error,
    attempt: u32,
) {
    let failed = error.downcast_ref::<DeliveryFailed>();
    let analysis = failed.map_or_else(
        || Analysis {
            analysis_id: analysis_id.to_owned(),
            ..Analysis::default()
        },
        |f| f.analysis.clone(),
    );
    // A failure before the target was resolved (lock, unreadable request) still names
    // where the delivery was going.
    let target = failed.map_or_else(
        || {
            target.or(env.delivery.target.as_deref()).map_or_else(
                || "(default target)".to_owned(),
                |t| format!("[storage.{t}]"),
            )
        },
        |f| format!("{} ({})", f.summary.target, f.summary.target_url),
    );
    let mut facts = FailureFacts::new(&analysis, &target, error, &env.delivery.staff);
    facts.attempt = attempt;
    facts.file_count = failed.map_or(0, |f| f.summary.files);
    if facts.to.is_empty() {
        tracing::warn!(
            analysis_id,
            "no staff address (lookup or [delivery] staff): the failure is only logged"
        );
        return;
    }
    if let Err(e) = steps.notify_failure(env.config, &facts).await {
        tracing::error!(analysis_id, "mailing the failure notice failed: {e:#}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn messages_of_the_web_page_parse() {
        assert_eq!(parse(br#"{"plan_code": "6cLB4ma"}"#).unwrap().0, "6cLB4ma");
        let (id, t) = parse(br#"{"analysis_id": " A1 ", "target": "oss"}"#).unwrap();
        assert_eq!((id.as_str(), t.as_deref()), ("A1", Some("oss")));
        assert!(parse(b"{}").is_err());
        assert!(parse(b"6cLB4ma").is_err());
        assert!(parse(br#"{"plan_code": ""}"#).is_err());
    }
}
