//! Contract tests of `labrelay::queue`: each behaviour is one async function taking a
//! [`Fixture`], and `contract!` instantiates every function twice, as
//! `queue::sqlite::NAME` (embedded broker in a temp dir) and `queue::rabbitmq::NAME`
//! (the RabbitMQ of `LABRELAY_TEST_AMQP_URL`).
//!
//! Crashes are real: "killed before ack" and "two processes at once" run consumers in
//! child processes (the helper binary `labrelay-queue-child`, built from
//! `tests/helpers/queue_child.rs`) and SIGKILL them. The RabbitMQ restart test starts a throwaway node
//! of its own, because other tests use the shared one concurrently.

// clippy.toml's allow-unwrap-in-tests covers `#[test]` functions only, not the helpers
// of an integration test crate.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use labrelay::Exit;
use labrelay::queue::{
    AnyBroker, Broker, BrokerSettings, Consumer, Delivery, ExchangeKind, FIRST_DEATH_QUEUE,
    FIRST_DEATH_REASON, PublishOptions, QueueError, QueueSpec, ack_all,
};
use labrelay::secret::RedactedUrl;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Long enough for any expected message to arrive on a loaded machine.
const ARRIVES: Duration = Duration::from_secs(15);
/// How long to wait before concluding that no message is coming.
const QUIET: Duration = Duration::from_millis(700);
/// Lease of the embedded broker in these tests: short, so a killed consumer's message
/// comes back quickly.
const LEASE: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Sqlite,
    Rabbitmq,
}

struct Fixture {
    backend: Backend,
    /// The full URL (with password) handed to brokers and child processes.
    url: String,
    _dir: Option<tempfile::TempDir>,
    /// Queues and exchanges to delete afterwards on the shared RabbitMQ.
    created: Mutex<Vec<(bool, String)>>,
}

impl Fixture {
    fn sqlite() -> Fixture {
        let dir = test_support::tempdir();
        let url = format!("sqlite://{}", dir.path().join("queue.db").display());
        Fixture {
            backend: Backend::Sqlite,
            url,
            _dir: Some(dir),
            created: Mutex::default(),
        }
    }

    fn rabbitmq() -> Option<Fixture> {
        let url = test_support::require("AMQP_URL")?;
        Some(Fixture {
            backend: Backend::Rabbitmq,
            url,
            _dir: None,
            created: Mutex::default(),
        })
    }

    fn settings() -> BrokerSettings {
        BrokerSettings {
            lease: LEASE,
            reconnect_for: Duration::from_secs(30),
            connection_name: Some(format!("labrelay queue test pid {}", std::process::id())),
            ..BrokerSettings::default()
        }
    }

    async fn broker(&self) -> AnyBroker {
        let url = RedactedUrl::parse(&self.url).unwrap();
        AnyBroker::connect(&url, &Fixture::settings())
            .await
            .unwrap()
    }

    /// A unique queue name, remembered (with its dead-letter queue) for cleanup.
    fn queue(&self, prefix: &str) -> String {
        let name = test_support::unique(prefix);
        let mut created = self.created.lock().unwrap();
        created.push((true, name.clone()));
        created.push((true, format!("{name}.dead")));
        name
    }

    fn exchange(&self, prefix: &str) -> String {
        let name = test_support::unique(prefix);
        self.created.lock().unwrap().push((false, name.clone()));
        name
    }

    /// Start a consumer in a child process.
    fn child(&self, mode: &str, queue: &str, prefetch: u16) -> Child {
        Child::spawn(&[
            ("LRQ_CHILD", mode),
            ("LRQ_URL", &self.url),
            ("LRQ_QUEUE", queue),
            ("LRQ_PREFETCH", &prefetch.to_string()),
            ("LRQ_LEASE_SECS", &LEASE.as_secs().to_string()),
        ])
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if self.backend != Backend::Rabbitmq {
            return; // the temp dir goes with the fixture
        }
        let created = std::mem::take(&mut *self.created.lock().unwrap());
        let url = self.url.clone();
        // Drop runs inside the test's runtime, which cannot block on a future; a thread
        // with its own runtime can. Cleanup runs even when the test failed.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let url = RedactedUrl::parse(&url).unwrap();
                let Ok(b) = AnyBroker::connect(&url, &Fixture::settings()).await else {
                    return;
                };
                for (is_queue, name) in created {
                    let _ = if is_queue {
                        b.delete_queue(&name).await
                    } else {
                        b.delete_exchange(&name).await
                    };
                }
            });
        })
        .join();
    }
}

/// A consumer running in a child process, killed when dropped.
struct Child {
    process: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Child {
    fn spawn(env: &[(&str, &str)]) -> Child {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_labrelay-queue-child"));
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut process = cmd.spawn().unwrap();
        let stdout = process.stdout.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Child { process, lines }
    }

    /// The next line the child reported, or a panic after `ARRIVES`.
    async fn line(&mut self) -> String {
        tokio::time::timeout(ARRIVES, self.lines.recv())
            .await
            .expect("child process said nothing in time")
            .expect("child process exited early")
    }

    async fn kill(mut self) {
        self.process.kill().await.unwrap();
    }

    /// Wait for the child to exit; every line it reported.
    async fn finish(mut self) -> Vec<String> {
        let status = tokio::time::timeout(Duration::from_mins(1), self.process.wait())
            .await
            .expect("child process did not finish")
            .unwrap();
        assert!(status.success(), "child process failed: {status}");
        let mut out = Vec::new();
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_secs(5), self.lines.recv()).await
        {
            out.push(line);
        }
        out
    }
}

async fn next(c: &mut Consumer) -> Delivery {
    c.next_timeout(ARRIVES)
        .await
        .unwrap()
        .expect("no message arrived in time")
}

async fn nothing(c: &mut Consumer) {
    if let Some(d) = c.next_timeout(QUIET).await.unwrap() {
        panic!("unexpected delivery {d:?}");
    }
}

fn id(i: impl std::fmt::Display) -> PublishOptions {
    PublishOptions::new().message_id(i.to_string())
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let fx = super::Fixture::sqlite();
                    super::$name(&fx).await;
                }
            )*
        }
        mod rabbitmq {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(fx) = super::Fixture::rabbitmq() else {
                        return;
                    };
                    super::$name(&fx).await;
                }
            )*
        }
    };
}

contract!(
    round_trip_keeps_body_headers_and_id,
    direct_exchange_routes_by_equal_key,
    topic_exchange_routes_by_pattern,
    unroutable_mandatory_publish_is_an_error,
    redeclaring_with_other_settings_is_a_mismatch,
    consume_of_a_missing_queue_is_not_found,
    deleting_the_queue_cancels_its_consumer,
    consumer_killed_before_ack_gets_the_message_again,
    dropped_delivery_is_delivered_again,
    slow_live_consumer_keeps_its_message,
    nack_n_times_lands_in_dead_letter_queue,
    max_deliveries_one_dead_letters_on_the_first_nack,
    killed_consumer_counts_as_a_delivery,
    reject_dead_letters_at_once,
    classic_queue_redelivers_and_dead_letters,
    prefetch_is_respected,
    two_consumers_share_without_double_delivery,
    two_processes_consume_one_queue_at_once,
    batch_publish_keeps_order_and_reports_unroutable_messages,
    ack_all_settles_a_batch_and_never_an_older_held_delivery,
);

async fn ack_all_settles_a_batch_and_never_an_older_held_delivery(fx: &Fixture) {
    let b = fx.broker().await;
    let q = fx.queue("ackall");
    b.declare_queue(&QueueSpec::new(&q)).await.unwrap();
    for i in 1..=5 {
        b.publish("", &q, format!("m{i}").as_bytes(), &id(format!("a-{i}")))
            .await
            .unwrap();
    }
    let mut c = b.consume(&q, 10).await.unwrap();
    let mut ds = Vec::new();
    for i in 1..=5 {
        let d = next(&mut c).await;
        assert_eq!(d.message_id, Some(format!("a-{i}")));
        ds.push(d);
    }
    let (d5, d4, d3) = (ds.pop().unwrap(), ds.pop().unwrap(), ds.pop().unwrap());
    // The two oldest together (on RabbitMQ: one ack with `multiple`).
    ack_all(ds).await.unwrap();
    // Newer ones while an older one is still held: that one must stay unsettled.
    ack_all(vec![d5, d4]).await.unwrap();
    drop(d3);
    let again = next(&mut c).await;
    assert_eq!(again.message_id.as_deref(), Some("a-3"));
    assert_eq!(again.delivery_count, 2);
    ack_all(vec![again]).await.unwrap();
    nothing(&mut c).await;
    drop(c);
    let mut c = b.consume(&q, 10).await.unwrap();
    nothing(&mut c).await;
}

async fn batch_publish_keeps_order_and_reports_unroutable_messages(fx: &Fixture) {
    let b = fx.broker().await;
    let exchange = fx.exchange("batch");
    let q = fx.queue("batch");
    b.declare_exchange(&exchange, ExchangeKind::Topic)
        .await
        .unwrap();
    b.declare_queue(&QueueSpec::new(&q)).await.unwrap();
    b.bind(&q, &exchange, "a.#").await.unwrap();
    let messages: Vec<labrelay::queue::Outgoing> = (0..300)
        .map(|i| labrelay::queue::Outgoing {
            // Every seventh message matches no binding.
            routing_key: if i % 7 == 3 {
                format!("b.{i}")
            } else {
                format!("a.{i}")
            },
            body: format!("m{i}").into_bytes(),
            options: id(i),
        })
        .collect();
    let routed = b.publish_batch(&exchange, &messages).await.unwrap();
    let want: Vec<bool> = (0..300).map(|i| i % 7 != 3).collect();
    assert_eq!(routed, want);
    let mut c = b.consume(&q, 50).await.unwrap();
    for i in (0..300).filter(|i| i % 7 != 3) {
        let d = next(&mut c).await;
        assert_eq!(d.body, format!("m{i}").into_bytes(), "in publish order");
        d.ack().await.unwrap();
    }
    nothing(&mut c).await;
}

async fn round_trip_keeps_body_headers_and_id(fx: &Fixture) {
    let b = fx.broker().await;
    let q = fx.queue("rt");
    b.declare_queue(&QueueSpec::new(&q)).await.unwrap();
    // Every byte value, and more than one AMQP frame (128 KiB default frame size).
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let options = id("m-1")
        .header("sample", "S-0042")
        .header("encoding", "näive ✓");
    b.publish("", &q, &body, &options).await.unwrap();
    assert_eq!(b.ready_count(&q).await.unwrap(), 1);
    let mut c = b.consume(&q, 1).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(d.body, body);
    assert_eq!(d.message_id.as_deref(), Some("m-1"));
    assert_eq!(d.headers.get("sample").map(String::as_str), Some("S-0042"));
    assert_eq!(
        d.headers.get("encoding").map(String::as_str),
        Some("näive ✓")
    );
    assert_eq!(d.exchange, "");
    assert_eq!(d.routing_key, q);
    assert_eq!(d.delivery_count, 1);
    assert!(!d.is_redelivered());
    d.ack().await.unwrap();
    nothing(&mut c).await;
    assert_eq!(b.ready_count(&q).await.unwrap(), 0);
}

async fn direct_exchange_routes_by_equal_key(fx: &Fixture) {
    let b = fx.broker().await;
    let x = fx.exchange("direct");
    let (qa, qb) = (fx.queue("da"), fx.queue("db"));
    b.declare_exchange(&x, ExchangeKind::Direct).await.unwrap();
    for q in [&qa, &qb] {
        b.declare_queue(&QueueSpec::new(q)).await.unwrap();
    }
    b.bind(&qa, &x, "sample.created").await.unwrap();
    b.bind(&qb, &x, "sample.*").await.unwrap(); // literal in a direct exchange
    b.publish(&x, "sample.created", b"1", &id(1)).await.unwrap();
    b.publish(&x, "sample.*", b"2", &id(2)).await.unwrap();
    let mut ca = b.consume(&qa, 10).await.unwrap();
    let mut cb = b.consume(&qb, 10).await.unwrap();
    let d = next(&mut ca).await;
    assert_eq!(
        (d.body.as_slice(), d.exchange.as_str()),
        (&b"1"[..], x.as_str())
    );
    assert_eq!(d.routing_key, "sample.created");
    d.ack().await.unwrap();
    let d = next(&mut cb).await;
    assert_eq!(d.body, b"2");
    d.ack().await.unwrap();
    nothing(&mut ca).await;
    nothing(&mut cb).await;
}

async fn topic_exchange_routes_by_pattern(fx: &Fixture) {
    let b = fx.broker().await;
    let x = fx.exchange("topic");
    b.declare_exchange(&x, ExchangeKind::Topic).await.unwrap();
    let patterns = ["lims.*.created", "lims.#", "#.deleted", "*"];
    let mut queues = Vec::new();
    for p in patterns {
        let q = fx.queue("tp");
        b.declare_queue(&QueueSpec::new(&q)).await.unwrap();
        b.bind(&q, &x, p).await.unwrap();
        queues.push(q);
    }
    let keys = [
        "lims.sample.created",
        "lims",
        "crm.order.deleted",
        "single",
        "lims.a.b.created",
    ];
    for (i, k) in keys.iter().enumerate() {
        b.publish(&x, k, k.as_bytes(), &id(i)).await.unwrap();
    }
    let expected: [&[&str]; 4] = [
        &["lims.sample.created"],
        &["lims.sample.created", "lims", "lims.a.b.created"],
        &["crm.order.deleted"],
        &["lims", "single"],
    ];
    for (q, want) in queues.iter().zip(expected) {
        let mut c = b.consume(q, 10).await.unwrap();
        let mut got = BTreeSet::new();
        for _ in 0..want.len() {
            let d = next(&mut c).await;
            got.insert(String::from_utf8(d.body.clone()).unwrap());
            d.ack().await.unwrap();
        }
        nothing(&mut c).await;
        let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(got, want, "queue bound with its pattern");
    }
}

async fn unroutable_mandatory_publish_is_an_error(fx: &Fixture) {
    let b = fx.broker().await;
    let x = fx.exchange("nobody");
    b.declare_exchange(&x, ExchangeKind::Direct).await.unwrap();
    let err = b
        .publish(&x, "k", b"lost?", &PublishOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::Unroutable { .. }), "{err}");
    assert_eq!(err.exit(), Exit::Failed);
    let missing_queue = test_support::unique("missing");
    let err = b
        .publish("", &missing_queue, b"lost?", &PublishOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::Unroutable { .. }), "{err}");
    // Explicitly not mandatory: dropped without an error.
    b.publish(&x, "k", b"dropped", &PublishOptions::new().not_mandatory())
        .await
        .unwrap();
    let missing_exchange = test_support::unique("missing-x");
    let err = b
        .publish(&missing_exchange, "k", b"x", &PublishOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::NotFound { .. }), "{err}");
    // The broker is still usable afterwards.
    let q = fx.queue("after");
    b.declare_queue(&QueueSpec::new(&q)).await.unwrap();
    b.publish("", &q, b"ok", &PublishOptions::new())
        .await
        .unwrap();
    assert_eq!(b.ready_count(&q).await.unwrap(), 1);
}

async fn redeclaring_with_other_settings_is_a_mismatch(fx: &Fixture) {
    let b = fx.broker().await;
    let q = fx.queue("redecl");
    let spec = QueueSpec::new(&q).with_max_deliveries(3);
    b.declare_queue(&spec).await.unwrap();
    b.declare_queue(&spec).await.unwrap();
    let err = b
        .declare_queue(&QueueSpec::new(&q).with_max_deliveries(4))
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::Mismatch { .. }), "{err}");
    assert_eq!(err.exit(), Exit::Config);
    let x = fx.exchange("redecl");
    b.declare_exchange(&x, ExchangeKind::Topic).await.unwrap();
    b.declare_exchange(&x, ExchangeKind::Topic).await.unwrap();
    let err = b
        .declare_exchange(&x, ExchangeKind::Direct)
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::Mismatch { .. }), "{err}");
    // And the broker still works.
    b.publish("", &q, b"x", &PublishOptions::new())
        .await
        .unwrap();
}

async fn consume_of_a_missing_queue_is_not_found(fx: &Fixture) {
    let b = fx.broker().await;
    let err = b
        .consume(&test_support::unique("missing"), 1)
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::NotFound { .. }), "{err}");
}

async fn deleting_the_queue_cancels_its_consumer(fx: &Fixture) {
    let b = fx.broker().await;
    let q = fx.queue("deleted");
    b.declare_queue(&QueueSpec::new(&q)).await.unwrap();
    let mut c = b.consume(&q, 1).await.unwrap();
    nothing(&mut c).await;
    b.delete_queue(&q).await.unwrap();
    let err = c.next_timeout(ARRIVES).await.unwrap_err();
    assert!(matches!(err, QueueError::Cancelled { .. }), "{err}");
    assert_eq!(err.exit(), Exit::Failed);
    // Deleting it again is not an error.
    b.delete_queue(&q).await.unwrap();
}

async fn consumer_killed_before_ack_gets_the_message_again(fx: &Fixture) {
    let b = fx.broker().await;
    let q = fx.queue("killed");
    b.declare_queue(&QueueSpec::new(&q).with_max_deliveries(5))
        .await
        .unwrap();
    let mut child = fx.child("hold", &q, 1);
    assert_eq!(child.line().await, "READY");
    b.publish("", &q, b"precious", &id("job-1")).await.unwrap();
    assert_eq!(child.line().await, "GOT job-1 1");
    let mut c = b.consume(&q, 1).await.unwrap();
    // The child holds (and renews) the delivery: nobody else gets it.
    nothing(&mut c).await;
    let killed = Instant::now();
    child.kill().await;
    let d = next(&mut c).await;
    eprintln!("redelivered {:?} after the kill", killed.elapsed());
    assert_eq!(d.body, b"precious");
    assert_eq!(d.message_id.as_deref(), Some("job-1"));
    assert_eq!(d.delivery_count, 2);
    assert!(d.is_redelivered());
    d.ack().await.unwrap();
    nothing(&mut c).await;
}

async fn dropped_delivery_is_delivered_again(fx: &Fixture) {
    let b = fx.broker().await;
    let q = fx.queue("dropped");
    b.declare_queue(&QueueSpec::new(&q)).await.unwrap();
    b.publish("", &q, b"again", &id("d-1")).await.unwrap();
    let mut c = b.consume(&q, 1).await.unwrap();
    let d = next(&mut c).await;
    drop(d); // e.g. a panic while processing
    let d = next(&mut c).await;
    assert_eq!(d.message_id.as_deref(), Some("d-1"));
    assert_eq!(d.delivery_count, 2);
    d.ack().await.unwrap();
}

async fn slow_live_consumer_keeps_its_message(fx: &Fixture) {
    let b = fx.broker().await;
    let q = fx.queue("slow");
    b.declare_queue(&QueueSpec::new(&q)).await.unwrap();
    b.publish("", &q, b"slow", &id("s-1")).await.unwrap();
    let mut slow = b.consume(&q, 1).await.unwrap();
    let mut other = b.consume(&q, 1).await.unwrap();
    let d = next(&mut slow).await;
    // Well past the embedded broker's lease: the lease is renewed meanwhile.
    let none = other.next_timeout(LEASE * 3).await.unwrap();
    assert!(
        none.is_none(),
        "a held message was delivered to another consumer"
    );
    d.ack().await.unwrap();
    nothing(&mut other).await;
}

async fn nack_n_times_lands_in_dead_letter_queue(fx: &Fixture) {
    nack_until_dead(fx, 3).await;
}

async fn max_deliveries_one_dead_letters_on_the_first_nack(fx: &Fixture) {
    nack_until_dead(fx, 1).await;
}

/// With `max_deliveries = max` a message is delivered exactly `max` times, then dead-lettered
/// with its body, id and headers intact.
async fn nack_until_dead(fx: &Fixture, max: u32) {
    let b = fx.broker().await;
    let q = fx.queue("poison");
    let spec = QueueSpec::new(&q).with_max_deliveries(max);
    b.declare_queue(&spec).await.unwrap();
    let body = b"\x00poison\xff".to_vec();
    b.publish("", &q, &body, &id("p-1").header("origin", "lims"))
        .await
        .unwrap();
    let mut c = b.consume(&q, 1).await.unwrap();
    for count in 1..=max {
        let d = next(&mut c).await;
        assert_eq!(d.delivery_count, count, "delivery {count}");
        d.nack_requeue().await.unwrap();
    }
    nothing(&mut c).await;
    let dead = spec.dead_letter_queue().unwrap();
    let mut dc = b.consume(&dead, 1).await.unwrap();
    let d = next(&mut dc).await;
    assert_eq!(d.body, body);
    assert_eq!(d.message_id.as_deref(), Some("p-1"));
    assert_eq!(d.headers.get("origin").map(String::as_str), Some("lims"));
    assert_eq!(d.headers.get(FIRST_DEATH_QUEUE), Some(&q));
    assert_eq!(
        d.headers.get(FIRST_DEATH_REASON).map(String::as_str),
        Some("delivery_limit"),
        "{:?}",
        d.headers
    );
    d.ack().await.unwrap();
    assert_eq!(b.ready_count(&q).await.unwrap(), 0);
}

async fn killed_consumer_counts_as_a_delivery(fx: &Fixture) {
    let b = fx.broker().await;
    let q = fx.queue("crashy");
    b.declare_queue(&QueueSpec::new(&q).with_max_deliveries(1))
        .await
        .unwrap();
    let mut child = fx.child("hold", &q, 1);
    assert_eq!(child.line().await, "READY");
    b.publish("", &q, b"crashes its consumer", &id("c-1"))
        .await
        .unwrap();
    assert_eq!(child.line().await, "GOT c-1 1");
    child.kill().await;
    // Its one delivery is used up: it goes to the dead-letter queue, not round again.
    let mut dc = b.consume(&format!("{q}.dead"), 1).await.unwrap();
    let d = next(&mut dc).await;
    assert_eq!(d.message_id.as_deref(), Some("c-1"));
    assert_eq!(
        d.headers.get(FIRST_DEATH_REASON).map(String::as_str),
        Some("delivery_limit")
    );
    d.ack().await.unwrap();
    let mut c = b.consume(&q, 1).await.unwrap();
    nothing(&mut c).await;
}

async fn reject_dead_letters_at_once(fx: &Fixture) {
    let b = fx.broker().await;
    let q = fx.queue("reject");
    b.declare_queue(&QueueSpec::new(&q).with_max_deliveries(5))
        .await
        .unwrap();
    b.publish("", &q, b"bad", &id("r-1")).await.unwrap();
    let mut c = b.consume(&q, 1).await.unwrap();
    next(&mut c).await.reject().await.unwrap();
    nothing(&mut c).await;
    let mut dc = b.consume(&format!("{q}.dead"), 1).await.unwrap();
    let d = next(&mut dc).await;
    assert_eq!(d.body, b"bad");
    assert_eq!(
        d.headers.get(FIRST_DEATH_REASON).map(String::as_str),
        Some("rejected")
    );
    d.ack().await.unwrap();
}

async fn classic_queue_redelivers_and_dead_letters(fx: &Fixture) {
    let b = fx.broker().await;
    let q = fx.queue("classic");
    // RabbitMQ does not count a classic queue's deliveries, so no limit there.
    let err = b
        .declare_queue(&QueueSpec::new(&q).classic().with_max_deliveries(2))
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::Invalid(_)), "{err}");
    b.declare_queue(&QueueSpec::new(&q).classic())
        .await
        .unwrap();
    b.publish("", &q, b"c", &id("c-1")).await.unwrap();
    let mut c = b.consume(&q, 1).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(d.delivery_count, 1);
    d.nack_requeue().await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(d.delivery_count, 2);
    d.reject().await.unwrap();
    nothing(&mut c).await;
    let mut dc = b.consume(&format!("{q}.dead"), 1).await.unwrap();
    let d = next(&mut dc).await;
    assert_eq!(d.message_id.as_deref(), Some("c-1"));
    assert_eq!(
        d.headers.get(FIRST_DEATH_REASON).map(String::as_str),
        Some("rejected")
    );
    d.ack().await.unwrap();
}

async fn prefetch_is_respected(fx: &Fixture) {
    let b = fx.broker().await;
    let q = fx.queue("prefetch");
    b.declare_queue(&QueueSpec::new(&q)).await.unwrap();
    for i in 0..4 {
        b.publish("", &q, b"p", &id(i)).await.unwrap();
    }
    let mut c = b.consume(&q, 2).await.unwrap();
    let first = next(&mut c).await;
    let second = next(&mut c).await;
    nothing(&mut c).await;
    first.ack().await.unwrap();
    let third = next(&mut c).await;
    nothing(&mut c).await;
    let ids: Vec<_> = [&second, &third]
        .iter()
        .map(|d| d.message_id.clone().unwrap())
        .collect();
    assert_eq!(ids, ["1", "2"]);
    second.ack().await.unwrap();
    third.ack().await.unwrap();
    next(&mut c).await.ack().await.unwrap();
}

async fn two_consumers_share_without_double_delivery(fx: &Fixture) {
    let b = fx.broker().await;
    let q = fx.queue("share");
    b.declare_queue(&QueueSpec::new(&q)).await.unwrap();
    let n = 40;
    for i in 0..n {
        b.publish("", &q, b"w", &id(i)).await.unwrap();
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for worker in 0..2 {
        let mut c = b.consume(&q, 1).await.unwrap();
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(d) = c.next_timeout(Duration::from_secs(2)).await.unwrap() {
                tokio::time::sleep(Duration::from_millis(10)).await;
                seen.lock()
                    .unwrap()
                    .push((worker, d.message_id.clone().unwrap()));
                d.ack().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seen = seen.lock().unwrap();
    let ids: BTreeSet<_> = seen.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(seen.len(), n, "a message was delivered twice or not at all");
    assert_eq!(ids.len(), n);
    for worker in 0..2 {
        assert!(
            seen.iter().any(|(w, _)| *w == worker),
            "consumer {worker} got nothing"
        );
    }
}

async fn two_processes_consume_one_queue_at_once(fx: &Fixture) {
    let b = fx.broker().await;
    let q = fx.queue("procs");
    b.declare_queue(&QueueSpec::new(&q)).await.unwrap();
    let mut children = vec![fx.child("drain", &q, 1), fx.child("drain", &q, 1)];
    for c in &mut children {
        assert_eq!(c.line().await, "READY");
    }
    // Published while both processes consume.
    let n = 100;
    for i in 0..n {
        b.publish("", &q, b"w", &id(i)).await.unwrap();
    }
    for _ in 0..2 {
        b.publish("", &q, b"stop", &id("stop")).await.unwrap();
    }
    let mut per_child = Vec::new();
    for c in children {
        let lines = c.finish().await;
        assert_eq!(lines.last().map(String::as_str), Some("STOP"), "{lines:?}");
        per_child.push(
            lines
                .iter()
                .filter_map(|l| l.strip_prefix("ACK "))
                .map(str::to_owned)
                .collect::<Vec<_>>(),
        );
    }
    let mut count = BTreeMap::new();
    for id in per_child.iter().flatten() {
        *count.entry(id.clone()).or_insert(0) += 1;
    }
    assert_eq!(count.len(), n, "missing messages");
    assert!(
        count.values().all(|&c| c == 1),
        "double delivery: {count:?}"
    );
    assert!(
        per_child.iter().all(|acked| !acked.is_empty()),
        "one process got nothing: {:?}",
        per_child.iter().map(Vec::len).collect::<Vec<_>>()
    );
    // The children exit right after their last ack; a quorum queue applies settlements
    // through its Raft log, so its count may show a message for a moment after the ack
    // was sent (seen under load). Nothing may stay ready.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut ready = b.ready_count(&q).await.unwrap();
    while ready > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        ready = b.ready_count(&q).await.unwrap();
    }
    assert_eq!(ready, 0);
}

// ---------------------------------------------------------------------------------------
// Backend-specific tests.

#[tokio::test]
async fn sqlite_url_creates_the_database_and_its_directory() {
    let dir = test_support::tempdir();
    let path = dir.path().join("nested/dir/queue.db");
    let url = RedactedUrl::parse(&format!("sqlite://{}", path.display())).unwrap();
    let b = AnyBroker::connect(&url, &Fixture::settings())
        .await
        .unwrap();
    assert!(matches!(b, AnyBroker::Sqlite(_)));
    b.declare_queue(&QueueSpec::new("q")).await.unwrap();
    assert!(path.exists());
}

#[tokio::test]
async fn rabbitmq_bad_password_is_a_config_error_without_the_password() {
    let Some(url) = test_support::require("AMQP_URL") else {
        return;
    };
    let mut url = url::Url::parse(&url).unwrap();
    url.set_password(Some("wrong-Secret-9")).unwrap();
    let err = AnyBroker::connect(&RedactedUrl::new(url), &Fixture::settings())
        .await
        .unwrap_err();
    assert_eq!(err.exit(), Exit::Config, "{err}");
    assert!(!err.to_string().contains("wrong-Secret-9"), "{err}");
}

#[tokio::test]
async fn rabbitmq_unreachable_is_a_temporary_failure() {
    // A port nobody listens on: bind, note it, close.
    let port = test_support::free_port();
    let url = RedactedUrl::parse(&format!("amqp://guest:s3cret@127.0.0.1:{port}/%2f")).unwrap();
    let err = AnyBroker::connect(&url, &Fixture::settings())
        .await
        .unwrap_err();
    assert_eq!(err.exit(), Exit::TempFail, "{err}");
    let shown = err.to_string();
    assert!(shown.contains("guest:****@127.0.0.1"), "{shown}");
    assert!(!shown.contains("s3cret"), "{shown}");
}

/// A broker that accepts connections and never answers (a wedged node) fails the
/// connect as temporary instead of hanging it.
#[tokio::test]
async fn rabbitmq_that_never_answers_is_a_temporary_failure() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accept and hold the connections, reading nothing.
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in listener.incoming().take(1) {
            open.push(stream);
            std::thread::sleep(Duration::from_secs(40));
        }
    });
    let url = RedactedUrl::parse(&format!("amqp://guest:s3cret@127.0.0.1:{port}/%2f")).unwrap();
    let started = Instant::now();
    let err = AnyBroker::connect(&url, &Fixture::settings())
        .await
        .unwrap_err();
    assert_eq!(err.exit(), Exit::TempFail, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(35),
        "{:?}",
        started.elapsed()
    );
    assert!(!err.to_string().contains("s3cret"), "{err}");
    drop(held);
}

/// Named for the nextest `heavy` group (one at a time): it runs a RabbitMQ node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restart_during_publish_loses_no_confirmed_message() {
    let started = Instant::now();
    let Some(node) = tokio::task::spawn_blocking(test_support::rabbitmq::RabbitNode::start)
        .await
        .unwrap()
    else {
        return;
    };
    let node = Arc::new(node);
    eprintln!(
        "throwaway node {} up after {:?}",
        node.name,
        started.elapsed()
    );
    let url = RedactedUrl::parse(&node.url()).unwrap();
    let settings = BrokerSettings {
        reconnect_for: Duration::from_mins(1),
        ..Fixture::settings()
    };
    let broker = AnyBroker::connect(&url, &settings).await.unwrap();
    let q = "restart-test";
    broker.declare_queue(&QueueSpec::new(q)).await.unwrap();

    // A consumer that keeps running across the restart (it must reconnect by itself).
    let consumed = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop_consumer = Arc::new(tokio::sync::Notify::new());
    let consuming = {
        let mut c = broker.consume(q, 20).await.unwrap();
        let consumed = consumed.clone();
        let stop = stop_consumer.clone();
        tokio::spawn(async move {
            loop {
                let d = tokio::select! {
                    () = stop.notified() => break,
                    d = c.next() => d.unwrap(),
                };
                let id = d.message_id.clone().unwrap();
                match d.ack().await {
                    // Acked or not, it was consumed; an unacked one comes again.
                    Ok(()) | Err(QueueError::DeliveryLost { .. }) => {
                        consumed.lock().unwrap().push(id);
                    }
                    Err(e) => panic!("ack failed: {e}"),
                }
            }
        })
    };

    // The publish loop: every publish that returned Ok is recorded.
    let confirmed = Arc::new(Mutex::new(Vec::<u64>::new()));
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let failed = Arc::new(Mutex::new(0u32));
    let stop_publisher = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let broker = broker.clone();
        let (confirmed, slowest, failed, stop) = (
            confirmed.clone(),
            slowest.clone(),
            failed.clone(),
            stop_publisher.clone(),
        );
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                match broker.publish("", q, &i.to_le_bytes(), &id(i)).await {
                    Ok(()) => confirmed.lock().unwrap().push(i),
                    Err(e) => {
                        eprintln!("publish {i} failed: {e}");
                        *failed.lock().unwrap() += 1;
                    }
                }
                let took = t.elapsed();
                {
                    let mut s = slowest.lock().unwrap();
                    *s = (*s).max(took);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let confirmed_count = || confirmed.lock().unwrap().len();
    while confirmed_count() < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = confirmed_count();
    let restart = Instant::now();
    let n = node.clone();
    let restarted = tokio::task::spawn_blocking(move || n.halt() && n.boot())
        .await
        .unwrap();
    let downtime = restart.elapsed();
    assert!(restarted, "restarting the node failed");
    // Keep publishing until well after the restart.
    let target = confirmed_count() + 100;
    let deadline = Instant::now() + Duration::from_secs(70);
    while confirmed_count() < target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_publisher.store(true, std::sync::atomic::Ordering::Relaxed);
    publisher.await.unwrap();

    let confirmed: BTreeSet<String> = confirmed
        .lock()
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    // Let the consumer catch up, then check that every confirmed message arrived.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen: BTreeSet<String> = consumed.lock().unwrap().iter().cloned().collect();
        let missing: Vec<_> = confirmed.difference(&seen).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} confirmed messages never arrived, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_consumer.notify_one();
    consuming.await.unwrap();
    let consumed = consumed.lock().unwrap().len();
    let slowest = *slowest.lock().unwrap();
    eprintln!(
        "restart test: {before} confirmed before the restart, {} in all, {consumed} consumed \
         ({} duplicates), {} publishes failed; node down for {downtime:?}; slowest publish \
         {slowest:?}; total {:?}",
        confirmed.len(),
        consumed.saturating_sub(confirmed.len()),
        *failed.lock().unwrap(),
        started.elapsed()
    );
    // A publish was in flight across the restart and waited for the node to come back.
    assert!(
        slowest > Duration::from_secs(1),
        "no publish spanned the restart"
    );
    assert_eq!(
        *failed.lock().unwrap(),
        0,
        "publishes failed within reconnect_for"
    );
}
