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
//! - SIGTERM/SIGINT: no new message is taken; the delivery in flight stops starting new
//!   files, finishes and journals the ones in flight, and its message is requeued.

use std::time::Duration;

use labrelay::exit::{Exit, classify};
use labrelay::queue::{AnyBroker, Broker, Delivery, ExchangeKind, QueueSpec};
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

/// Consume delivery requests until SIGTERM/SIGINT; exit 0 after a clean stop.
pub async fn listen(env: &Env<'_>, steps: &DeliverySteps) -> anyhow::Result<Exit> {
    let lc = &env.delivery.listen;
    let max_tries = lc
        .max_tries
        .unwrap_or(env.config.queue.max_deliveries)
        .max(1);
    let broker = AnyBroker::from_config(env.config).await?;
    broker
        .declare_exchange(&lc.exchange, ExchangeKind::Direct)
        .await?;
    broker
        .declare_queue(&QueueSpec::new(&lc.queue).with_max_deliveries(max_tries))
        .await?;
    broker
        .bind(&lc.queue, &lc.exchange, &lc.routing_key)
        .await?;
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
        let work = handle(env, steps, delivery, &cancel, max_tries);
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
                report_failure(env, steps, &id, &e, delivery.delivery_count).await;
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
async fn report_failure(
    env: &Env<'_>,
    steps: &DeliverySteps,
    analysis_id: &str,
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
    let target = failed.map_or_else(String::new, |f| f.summary.target_url.clone());
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
