//! `--listen` against RabbitMQ: a request is acknowledged only after the delivery's
//! status row is committed. The listener is killed (SIGKILL) while the LIMS status
//! statement runs — after the upload and the mail, before the commit — so the message
//! comes back; a second listener completes it from the journal without mailing twice,
//! dead-letters an unknown analysis after reporting it to staff, and stops cleanly on
//! SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use labrelay::queue::{AnyBroker, Broker, BrokerSettings, PublishOptions};
use labrelay::secret::RedactedUrl;
use sqlx::Row;

use crate::common::{Home, Lims, LimsKind, TargetFixture, TargetKind, tree};

/// Upsert keyed by plan code, slowed by pg_sleep so the test can kill the listener
/// while it runs.
const SLOW_UPSERT: &str = "INSERT INTO t_microbe_delivery (plan_code, status, account, path, files, updated_at) \
     SELECT :analysis_id, :status, :account, :path, :files, :delivered_at FROM pg_sleep(3) \
     ON CONFLICT (plan_code) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at";

struct Listener {
    child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
}

impl Listener {
    fn start(home: &Home) -> Listener {
        let mut child = home
            .command(&["--listen", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        Listener { child, lines }
    }

    /// Send SIGTERM (a clean stop).
    fn terminate(&mut self) {
        let pid = self.child.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// The next record matching `pred`, within a minute.
    fn wait_for(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_mins(1);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if pred(&v) => return v,
                Ok(_) => {}
                Err(e) => panic!("no {what} record from the listener: {e}"),
            }
        }
    }
}

async fn count(db: &labrelay::db::Db, sql: &str) -> i64 {
    sqlx::query(sql)
        .fetch_one(db.pool())
        .await
        .unwrap()
        .try_get(0)
        .unwrap()
}

#[tokio::test]
async fn listen_acks_only_after_commit_and_dead_letters_failures() {
    let amqp = test_support::require!("AMQP_URL");
    let Some(lims) = Lims::new(LimsKind::Postgres).await else {
        return;
    };
    let target = TargetFixture::new(TargetKind::Local, "").await.unwrap();
    let home = Home::new();
    let (root, expected) = tree(&home.path().join("analysis"), 0);
    lims.add_analysis("L1", &root).await;
    let db = lims.db().await;
    sqlx::query("CREATE UNIQUE INDEX ON t_microbe_delivery (plan_code)")
        .execute(db.pool())
        .await
        .unwrap();
    db.close().await;
    let exchange = test_support::unique("dl-ex");
    let queue = test_support::unique("dl-q");
    home.config(&format!(
        r#"[queue]
url = "{amqp}"
max_deliveries = 3

[delivery]
staff = ["staff@labrelay.test"]

[delivery.listen]
exchange = "{exchange}"
queue = "{queue}"
routing_key = "DELIVERY"
retry_delay_secs = 1

{target}
{lims}"#,
        target = target.toml,
        lims = lims.config(SLOW_UPSERT),
    ));
    let broker = AnyBroker::connect(
        &RedactedUrl::parse(&amqp).unwrap(),
        &BrokerSettings::default(),
    )
    .await
    .unwrap();

    // 1. Killed after upload and mail, during the LIMS write: no ack.
    let mut first = Listener::start(&home);
    first.wait_for("listening", |r| r["type"] == "listening");
    broker
        .publish(
            &exchange,
            "DELIVERY",
            br#"{"plan_code": "L1"}"#,
            &PublishOptions::new().message_id("req-1"),
        )
        .await
        .unwrap();
    first.wait_for("lims_status stage", |r| r["stage"] == "lims_status");
    std::thread::sleep(Duration::from_millis(300));
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let state = home.state().await;
    let row = sqlx::query("SELECT status, request_id FROM delivery_runs")
        .fetch_one(state.pool())
        .await
        .unwrap();
    assert_eq!(labrelay::db::text(&row, 0).unwrap(), "notified");
    assert_eq!(labrelay::db::text(&row, 1).unwrap(), "req-1");
    assert_eq!(
        home.outbox().len(),
        1,
        "the customer mail went out before the kill"
    );

    // 2. The message comes back; the second listener finishes from the journal.
    let second = Listener::start(&home);
    let s = second.wait_for("summary", |r| r["type"] == "summary");
    assert_eq!(s["status"], "delivered", "{s}");
    assert_eq!(s["files_sent"], 0, "{s}");
    assert_eq!(s["files_resumed"], expected.len(), "{s}");
    assert_eq!(home.outbox().len(), 1, "the customer is not mailed twice");

    // 3. An unknown analysis is reported to staff and dead-lettered at once.
    broker
        .publish(
            &exchange,
            "DELIVERY",
            br#"{"plan_code": "NOPE"}"#,
            &PublishOptions::new(),
        )
        .await
        .unwrap();
    let f = second.wait_for("failure summary", |r| r["type"] == "summary");
    assert_eq!(f["status"], "failed", "{f}");
    let dead = format!("{queue}.dead");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while broker.ready_count(&dead).await.unwrap() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 4. SIGTERM stops the listener cleanly.
    let mut second = second;
    second.terminate();
    let status = second.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "listener exit after SIGTERM");

    // Delivered once, acked once, mailed once (plus the staff report).
    assert_eq!(broker.ready_count(&queue).await.unwrap(), 0);
    assert_eq!(broker.ready_count(&dead).await.unwrap(), 1);
    assert_eq!(
        count(
            &state,
            "SELECT COUNT(*) FROM delivery_runs WHERE status = 'delivered'"
        )
        .await,
        1
    );
    let mails = home.outbox();
    assert_eq!(mails.len(), 2);
    assert!(
        mails
            .iter()
            .any(|m| m.contains("staff@labrelay.test") && m.contains("NOPE"))
    );
    assert_eq!(
        lims.status_rows().await,
        [("L1".to_owned(), "delivered".to_owned())]
    );

    for q in [&queue, &dead] {
        broker.delete_queue(q).await.unwrap();
    }
    broker.delete_exchange(&exchange).await.unwrap();
    lims.cleanup().await;
}

#[tokio::test]
async fn request_queues_for_the_listener_and_a_locked_analysis_is_not_a_failed_try() {
    // The embedded queue: no [queue] url.
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let target = TargetFixture::new(TargetKind::Local, "").await.unwrap();
    let home = Home::new();
    let (root, _) = tree(&home.path().join("analysis"), 0);
    lims.add_analysis("Q1", &root).await;
    lims.add_analysis("Q2", &root).await;
    home.config(&format!(
        "[queue]\nmax_deliveries = 2\n\n[delivery]\nstaff = [\"staff@labrelay.test\"]\n\n\
         [delivery.listen]\nretry_delay_secs = 1\n\n{}\n{}",
        target.toml,
        lims.config(crate::common::STATUS_INSERT)
    ));
    // Published before any listener ran: it waits in the queue.
    let out = home.run(&["request", "--analysis-id", "Q1", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        crate::common::stderr(&out)
    );
    let rec = crate::common::records(&out);
    assert_eq!(rec[0]["type"], "request", "{rec:?}");
    assert_eq!(rec[0]["analysis_id"], "Q1");
    let out = home.run(&["request", "--analysis-id", "A/B"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        crate::common::stderr(&out)
    );

    // Q2 is being delivered by someone else (its lock is held) when its request comes,
    // more often than max_deliveries: it must wait, not fail.
    let lock = labrelay::lock::InstanceLock::acquire(&home.data_dir(), "delivery-Q2").unwrap();
    for _ in 0..3 {
        let out = home.run(&["request", "--analysis-id", "Q2"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            crate::common::stderr(&out)
        );
    }
    let listener = Listener::start(&home);
    let s = listener.wait_for("Q1 summary", |v| {
        v["type"] == "summary" && v["analysis_id"] == "Q1"
    });
    assert_eq!(s["status"], "delivered", "{s}");
    std::thread::sleep(Duration::from_secs(6));
    drop(lock);
    let s = listener.wait_for("Q2 summary", |v| {
        v["type"] == "summary" && v["analysis_id"] == "Q2"
    });
    assert_eq!(s["status"], "delivered", "{s}");
    // The other two requests are duplicates of a finished delivery.
    for _ in 0..2 {
        let s = listener.wait_for("Q2 duplicate", |v| {
            v["type"] == "summary" && v["analysis_id"] == "Q2"
        });
        assert_eq!(s["status"], "already_delivered", "{s}");
    }
    let mut listener = listener;
    listener.terminate();
    assert_eq!(listener.child.wait().unwrap().code(), Some(0));
    // No false failure report to staff.
    let failures: Vec<String> = home
        .outbox()
        .into_iter()
        .filter(|m| m.contains("X-Labrelay-Mail: delivery-failure"))
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
}

#[tokio::test]
async fn regression_an_existing_classic_queue_is_consumed_as_it_is() {
    let amqp = test_support::require!("AMQP_URL");
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let target = TargetFixture::new(TargetKind::Local, "").await.unwrap();
    let home = Home::new();
    let (root, _) = tree(&home.path().join("analysis"), 0);
    lims.add_analysis("C1", &root).await;
    let exchange = test_support::unique("seed-ex");
    let queue = test_support::unique("seed-q");
    // The seed's queue: classic, durable, no dead-lettering, no delivery limit.
    let broker = AnyBroker::connect(
        &RedactedUrl::parse(&amqp).unwrap(),
        &BrokerSettings::default(),
    )
    .await
    .unwrap();
    let mut seed = labrelay::queue::QueueSpec::new(&queue).without_dead_letter();
    seed.kind = labrelay::queue::QueueKind::Classic;
    seed.max_deliveries = None;
    broker.declare_queue(&seed).await.unwrap();
    home.config(&format!(
        "[queue]\nurl = \"{amqp}\"\n\n[delivery.listen]\nexchange = \"{exchange}\"\n\
         queue = \"{queue}\"\nrouting_key = \"DELIVERY\"\n\n{}\n{}",
        target.toml,
        lims.config(crate::common::STATUS_INSERT)
    ));
    let out = home.run(&["request", "--analysis-id", "C1"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        crate::common::stderr(&out)
    );
    assert!(
        crate::common::stderr(&out).contains("consuming it as it is"),
        "{}",
        crate::common::stderr(&out)
    );
    let listener = Listener::start(&home);
    let s = listener.wait_for("C1 summary", |v| {
        v["type"] == "summary" && v["analysis_id"] == "C1"
    });
    assert_eq!(s["status"], "delivered", "{s}");
    let mut listener = listener;
    listener.terminate();
    assert_eq!(listener.child.wait().unwrap().code(), Some(0));
    for q in [queue.clone(), format!("{queue}.dead")] {
        broker.delete_queue(&q).await.unwrap();
    }
    broker.delete_exchange(&exchange).await.unwrap();
}
