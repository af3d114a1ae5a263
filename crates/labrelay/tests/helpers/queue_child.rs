//! `labrelay-queue-child`: a queue consumer for the queue contract tests
//! (`tests/it/queue.rs`), which start it as a separate process and SIGKILL it to test
//! crashes. Not a tool: it is built only so that the tests have a real second process.
//!
//! Settings come from the environment: `LRQ_CHILD` (the mode), `LRQ_URL` (broker URL),
//! `LRQ_QUEUE`, `LRQ_PREFETCH`, `LRQ_LEASE_SECS`. It reports on stdout, one line each:
//!
//! - `hold`: `READY`, then takes one message and reports `GOT <id> <delivery_count>`,
//!   then waits to be killed.
//! - `drain`: `READY`, then acks messages, reporting `ACK <id>` after each ack, until a
//!   message with id `stop` (acked, reported `STOP`).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use labrelay::queue::{AnyBroker, Broker, BrokerSettings};
use labrelay::secret::RedactedUrl;

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("labrelay-queue-child: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("labrelay-queue-child: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).map_err(|_| anyhow::anyhow!("{name} is not set"))
}

fn say(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

async fn run() -> anyhow::Result<()> {
    let mode = var("LRQ_CHILD")?;
    let url = RedactedUrl::parse(&var("LRQ_URL")?)?;
    let settings = BrokerSettings {
        lease: Duration::from_secs(var("LRQ_LEASE_SECS")?.parse()?),
        reconnect_for: Duration::from_secs(30),
        connection_name: Some(format!("labrelay queue child pid {}", std::process::id())),
        ..BrokerSettings::default()
    };
    let broker = AnyBroker::connect(&url, &settings).await?;
    let prefetch: u16 = var("LRQ_PREFETCH")?.parse()?;
    let mut consumer = broker.consume(&var("LRQ_QUEUE")?, prefetch).await?;
    say("READY")?;
    match mode.as_str() {
        "hold" => {
            let d = consumer.next().await?;
            say(&format!(
                "GOT {} {}",
                d.message_id.as_deref().unwrap_or("-"),
                d.delivery_count
            ))?;
            // Keep the delivery (and its lease renewal) alive until SIGKILL.
            tokio::time::sleep(Duration::from_mins(10)).await;
            drop(d);
        }
        "drain" => loop {
            let d = consumer.next().await?;
            let id = d.message_id.clone().unwrap_or_default();
            // A little work, so that the other process gets its share.
            tokio::time::sleep(Duration::from_millis(10)).await;
            d.ack().await?;
            if id == "stop" {
                say("STOP")?;
                break;
            }
            say(&format!("ACK {id}"))?;
        },
        other => anyhow::bail!("unknown LRQ_CHILD mode {other}"),
    }
    Ok(())
}
