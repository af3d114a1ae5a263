//! Three sites — PostgreSQL, MariaDB, SQLite — over the real RabbitMQ, and three SQLite
//! sites over the embedded queue: capture, relay, apply, converge.

use labrelay::db::Engine;

use crate::harness::World;

const ALL: &[Engine] = &[Engine::Postgres, Engine::Mysql, Engine::Sqlite];

/// The same LIMS content at every site.
async fn assert_converged(w: &World) {
    let first = &w.sites[0];
    let (users, labs, equipment, orgs) = (
        first.users().await,
        first.labs().await,
        first.equipment().await,
        first.org_units().await,
    );
    for s in &w.sites[1..] {
        assert_eq!(
            s.users().await,
            users,
            "users at {} vs {}",
            s.name,
            first.name
        );
        assert_eq!(s.labs().await, labs, "labs at {} vs {}", s.name, first.name);
        assert_eq!(
            s.org_units().await,
            orgs,
            "org units at {} vs {}",
            s.name,
            first.name
        );
        let names: Vec<String> = s
            .equipment()
            .await
            .into_iter()
            .map(|r| r[0].clone())
            .collect();
        let first_names: Vec<String> = equipment.iter().map(|r| r[0].clone()).collect();
        assert_eq!(names, first_names, "equipment at {}", s.name);
    }
}

/// Create, update, deactivate, delete at each site; converge; nothing echoes back.
async fn converge(world: &World) {
    let (a, b, c) = (world.site("a"), world.site("b"), world.site("c"));
    let truth = |engine: Engine| {
        if engine == Engine::Postgres {
            "TRUE"
        } else {
            "1"
        }
    };
    a.exec("INSERT INTO org_unit (name) VALUES ('Life Sciences')")
        .await;
    a.exec(
        "INSERT INTO org_unit (name, parent_id) SELECT 'Biology', id FROM org_unit WHERE name = 'Life Sciences'",
    )
    .await;
    a.exec(
        "INSERT INTO users (name, email, org_unit_id, password_hash) \
         SELECT 'Alice', 'alice@x.org', id, 'secret-hash' FROM org_unit WHERE name = 'Biology'",
    )
    .await;
    a.exec("INSERT INTO lab (name, pi_id) SELECT 'Alice lab', id FROM users WHERE email = 'alice@x.org'")
        .await;
    a.exec(
        "INSERT INTO user_lab (user_id, lab_id) SELECT u.id, l.id FROM users u, lab l \
         WHERE u.email = 'alice@x.org' AND l.name = 'Alice lab'",
    )
    .await;
    a.exec(&format!(
        "INSERT INTO users (name, email, is_temp) VALUES ('Visitor', 'tmp@x.org', {})",
        truth(a.engine())
    ))
    .await;
    b.exec("INSERT INTO users (name, email, phone) VALUES ('Bob', 'bob@x.org', '555')")
        .await;
    c.exec("INSERT INTO equipment (name) VALUES ('NMR 600')")
        .await;
    c.exec("INSERT INTO equipment (name) VALUES ('Old scope')")
        .await;
    world.sync();
    assert_converged(world).await;
    let users = b.users().await;
    assert_eq!(
        users["alice@x.org"],
        ["Alice", "1", "Biology", "-"],
        "{users:?}"
    );
    assert_eq!(
        b.int("SELECT COUNT(*) FROM users WHERE email = 'tmp@x.org'")
            .await,
        0,
        "temporary users never sync"
    );
    assert_eq!(
        c.labs().await["Alice lab"],
        ["1", "alice@x.org", "alice@x.org"]
    );
    assert_eq!(
        c.org_units().await,
        [
            vec!["Biology".to_string(), "Life Sciences".into()],
            vec!["Life Sciences".into(), "-".into()]
        ]
    );
    // Password hashes stay home.
    assert_eq!(
        b.int("SELECT COUNT(*) FROM users WHERE password_hash IS NOT NULL")
            .await,
        0
    );
    // Equipment from another site is mapped into a's list with its origin.
    assert_eq!(
        a.equipment().await,
        [
            vec!["NMR 600".to_string(), "c".into()],
            vec!["Old scope".into(), "c".into()]
        ]
    );

    // Two sites edit different fields of one person at the same time: both survive.
    b.exec("UPDATE users SET phone = '123' WHERE email = 'alice@x.org'")
        .await;
    c.exec("UPDATE users SET name = 'Alice Smith' WHERE email = 'alice@x.org'")
        .await;
    // The same field at two sites: the later change wins everywhere.
    a.exec("UPDATE users SET phone = 'from-a' WHERE email = 'bob@x.org'")
        .await;
    std::thread::sleep(std::time::Duration::from_millis(20));
    c.exec("UPDATE users SET phone = 'from-c' WHERE email = 'bob@x.org'")
        .await;
    world.sync();
    assert_converged(world).await;
    let users = a.users().await;
    assert_eq!(users["alice@x.org"], ["Alice Smith", "1", "Biology", "123"]);
    assert_eq!(users["bob@x.org"][3], "from-c");

    // Deactivation follows; a delete of a person becomes a deactivation elsewhere; an
    // equipment delete (allowed) deletes everywhere; an org unit rename follows.
    c.exec(&format!(
        "UPDATE users SET active = {} WHERE email = 'alice@x.org'",
        if c.engine() == Engine::Postgres {
            "FALSE"
        } else {
            "0"
        }
    ))
    .await;
    a.exec("DELETE FROM users WHERE email = 'bob@x.org'").await;
    b.exec("DELETE FROM equipment WHERE name = 'Old scope'")
        .await;
    a.exec("UPDATE org_unit SET name = 'Biology Dept' WHERE name = 'Biology'")
        .await;
    world.sync();
    for s in [b, c] {
        let users = s.users().await;
        assert_eq!(users["alice@x.org"][1], "0", "at {}", s.name);
        assert_eq!(users["bob@x.org"][1], "0", "bob deactivated at {}", s.name);
        assert_eq!(users["alice@x.org"][2], "Biology Dept", "at {}", s.name);
    }
    assert!(!a.users().await.contains_key("bob@x.org"));
    for s in [a, b, c] {
        let names: Vec<String> = s
            .equipment()
            .await
            .into_iter()
            .map(|r| r[0].clone())
            .collect();
        assert_eq!(names, ["NMR 600"], "at {}", s.name);
    }

    // Applied changes are not captured again: a further round sends nothing.
    for s in [a, b, c] {
        let r = world.json(&["relay", "--site", s.name]);
        assert_eq!(r["sent"], 0, "{} echoed: {r}", s.name);
        let st = world.json(&["status", "--site", s.name]);
        assert_eq!(st["backlog"], 0, "{st}");
        assert_eq!(st["parked"], 0, "{st}");
        assert_eq!(st["dead"], 0, "{st}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_engines_converge_over_rabbitmq() {
    let amqp = test_support::require!("AMQP_URL");
    let Some(w) = World::new(ALL, Some(&amqp)).await else {
        return;
    };
    converge(&w).await;
    w.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn three_sqlite_sites_converge_over_the_embedded_queue() {
    let w = World::new(&[Engine::Sqlite; 3], None).await.unwrap();
    converge(&w).await;
    w.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lab_arriving_before_its_pi_is_parked_then_applied() {
    let amqp = test_support::require!("AMQP_URL");
    let Some(w) = World::new(&[Engine::Mysql, Engine::Postgres], Some(&amqp)).await else {
        return;
    };
    let (a, b) = (w.site("a"), w.site("b"));
    // The PI is still a temporary user: the lab goes, the PI does not.
    a.exec("INSERT INTO users (name, email, is_temp) VALUES ('Pat', 'pat@x.org', 1)")
        .await;
    a.exec(
        "INSERT INTO lab (name, pi_id) SELECT 'Pat lab', id FROM users WHERE email = 'pat@x.org'",
    )
    .await;
    w.sync();
    assert!(b.labs().await.is_empty());
    assert_eq!(w.json(&["status", "--site", "b"])["parked"], 1);
    // The PI becomes a real user: it arrives, and the parked lab with it.
    a.exec("UPDATE users SET is_temp = 0 WHERE email = 'pat@x.org'")
        .await;
    w.sync();
    assert_eq!(b.labs().await["Pat lab"], ["1", "pat@x.org", ""]);
    assert_eq!(w.json(&["status", "--site", "b"])["parked"], 0);
    w.drop().await;
}

/// Publish a raw message as if from a site.
async fn publish_raw(
    amqp: &str,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    headers: &[(&str, String)],
) {
    use labrelay::queue::{AnyBroker, Broker, BrokerSettings, PublishOptions};
    let broker = AnyBroker::connect(
        &labrelay::secret::RedactedUrl::parse(amqp).unwrap(),
        &BrokerSettings::default(),
    )
    .await
    .unwrap();
    let mut opts = PublishOptions::new().message_id(uuid_like());
    for (k, v) in headers {
        opts = opts.header(*k, v.clone());
    }
    broker
        .publish(exchange, routing_key, body, &opts)
        .await
        .unwrap();
}

fn uuid_like() -> String {
    test_support::unique("ev")
}

fn user_event(site: &str, name: Option<&str>, email: &str) -> Vec<u8> {
    use sync_publish::event::{Event, FORMAT, Op, Ref, Version, now_ms};
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        "name".to_owned(),
        name.map_or(serde_json::Value::Null, |n| {
            serde_json::Value::String(n.into())
        }),
    );
    fields.insert("email".to_owned(), serde_json::Value::String(email.into()));
    // Every field: a change to some fields of an unknown object would wait (parked).
    fields.insert("phone".to_owned(), serde_json::Value::Null);
    fields.insert("active".to_owned(), serde_json::Value::Bool(true));
    fields.insert("org_unit".to_owned(), serde_json::Value::Null);
    let ev = Event {
        format: FORMAT,
        id: uuid_like(),
        site: site.into(),
        object_type: "user".into(),
        op: Op::Save,
        object: Ref {
            uuid: uuid_like(),
            origin: site.into(),
            key: "99999".into(),
        },
        right: None,
        version: Version::new(now_ms(), 0, site),
        fields,
        versions: std::collections::BTreeMap::new(),
    };
    serde_json::to_vec(&ev).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_unsigned_and_poison_messages_go_to_the_dead_letter_queue_and_the_queue_flows() {
    use sync_publish::event::{SIGNATURE_HEADER, SITE_HEADER, sign};
    let amqp = test_support::require!("AMQP_URL");
    let Some(w) = World::new(&[Engine::Sqlite, Engine::Postgres], Some(&amqp)).await else {
        return;
    };
    // Declare the queues (a first relay does).
    w.ok(&["relay", "--site", "b"]);
    let exchange = w.exchange();
    let key_b = "signing-key-of-site-b";
    let good = user_event("b", Some("Mallory"), "m@x.org");
    // Unsigned.
    publish_raw(&amqp, &exchange, "b.user.save", &good, &[]).await;
    // Signed with the wrong key.
    publish_raw(
        &amqp,
        &exchange,
        "b.user.save",
        &good,
        &[
            (SITE_HEADER, "b".into()),
            (SIGNATURE_HEADER, sign(b"not-the-key-of-b", &good)),
        ],
    )
    .await;
    // Correctly signed but cannot be applied (NOT NULL name): fails, retried, dead.
    let poison = user_event("b", None, "p@x.org");
    publish_raw(
        &amqp,
        &exchange,
        "b.user.save",
        &poison,
        &[
            (SITE_HEADER, "b".into()),
            (SIGNATURE_HEADER, sign(key_b.as_bytes(), &poison)),
        ],
    )
    .await;
    // A real change behind them still arrives.
    w.site("b")
        .exec("INSERT INTO users (name, email) VALUES ('Real', 'real@x.org')")
        .await;
    w.ok(&["relay", "--site", "b"]);
    let out = w.json(&["consume", "--site", "a", "--once"]);
    assert_eq!(out["stats"]["applied"], 1, "{out}");
    assert_eq!(out["stats"]["dead"], 3, "{out}");
    let users = w.site("a").users().await;
    assert_eq!(users.keys().collect::<Vec<_>>(), ["real@x.org"]);
    let st = w.json(&["status", "--site", "a"]);
    assert_eq!(st["dead"], 3, "{st}");
    assert_eq!(st["dead_queue"], 3, "{st}");
    let reasons = w
        .site("a")
        .rows("SELECT reason FROM labrelay_sync_dead ORDER BY id")
        .await;
    assert!(reasons[0][0].contains("unsigned"), "{reasons:?}");
    assert!(reasons[1][0].contains("bad signature"), "{reasons:?}");
    assert!(
        reasons[2][0].contains("NOT NULL") || reasons[2][0].contains("null"),
        "{reasons:?}"
    );
    w.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_made_while_the_broker_is_unreachable_wait_in_the_outbox_and_all_arrive() {
    let amqp = test_support::require!("AMQP_URL");
    let Some(w) = World::new(&[Engine::Mysql, Engine::Sqlite], Some(&amqp)).await else {
        return;
    };
    w.ok(&["relay", "--site", "a"]);
    // The same sites with a broker nobody listens on.
    let text = std::fs::read_to_string(&w.config).unwrap();
    let down = w.home.path().join("down.toml");
    std::fs::write(
        &down,
        text.replace(&amqp, "amqp://guest:guest@127.0.0.1:9/%2f"),
    )
    .unwrap();
    std::fs::set_permissions(&down, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    for i in 0..20 {
        w.site("a")
            .exec(&format!(
                "INSERT INTO users (name, email) VALUES ('U{i}', 'u{i}@x.org')"
            ))
            .await;
        let out = test_support::cli::run(
            crate::BIN,
            w.home.path(),
            &["--config", down.to_str().unwrap(), "relay", "--site", "a"],
        );
        assert_eq!(out.status.code(), Some(75), "{out:?}");
    }
    assert_eq!(w.json(&["status", "--site", "a"])["backlog"], 20);
    w.sync();
    assert_eq!(w.site("b").users().await.len(), 20);
    assert_eq!(w.json(&["status", "--site", "a"])["backlog"], 0);
    w.drop().await;
}

/// Named for the nextest `heavy` group (one at a time): it stops and starts a RabbitMQ
/// node of its own while a site keeps writing and the relay and a consumer keep running.
#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_restart_while_a_site_keeps_writing_loses_no_change() {
    use std::time::{Duration, Instant};
    let Some(node) = tokio::task::spawn_blocking(test_support::rabbitmq::RabbitNode::start)
        .await
        .unwrap()
    else {
        return;
    };
    let node = std::sync::Arc::new(node);
    let Some(w) = World::new(&[Engine::Postgres, Engine::Mysql], Some(&node.url())).await else {
        return;
    };
    let (a, b) = (w.site("a"), w.site("b"));
    let spawn = |args: &[&str]| {
        test_support::cli::command(crate::BIN, w.home.path())
            .arg("--config")
            .arg(&w.config)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let relay = spawn(&["relay", "--site", "a", "--follow", "--interval-ms", "200"]);
    let consumer = spawn(&["consume", "--site", "b"]);
    let write = |from: usize, to: usize| async move {
        for i in from..to {
            a.exec(&format!(
                "INSERT INTO users (name, email) VALUES ('R{i}', 'r{i}@x.org')"
            ))
            .await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    write(0, 100).await;
    // Stop the broker and keep writing while it is down; start it again.
    let n = node.clone();
    let halted = tokio::task::spawn_blocking(move || n.halt()).await.unwrap();
    assert!(halted, "stopping the node failed");
    write(100, 200).await;
    let n = node.clone();
    let booted = tokio::task::spawn_blocking(move || n.boot()).await.unwrap();
    assert!(booted, "starting the node again failed");
    write(200, 300).await;

    let deadline = Instant::now() + Duration::from_secs(90);
    while b.int("SELECT COUNT(*) FROM users").await < 300 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stop = |child: std::process::Child| {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let (relay_log, consumer_log) = (stop(relay), stop(consumer));
    assert_eq!(
        b.int("SELECT COUNT(*) FROM users").await,
        300,
        "relay:\n{relay_log}\nconsumer:\n{consumer_log}"
    );
    assert_eq!(a.users().await, b.users().await);
    assert_eq!(b.int("SELECT COUNT(*) FROM labrelay_sync_inbox").await, 300);
    assert_eq!(w.json(&["status", "--site", "a"])["backlog"], 0);
    w.drop().await;
}

/// A pseudo-random number below `n` (no rand dependency in tests).
fn below(n: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    u64::from(nanos.wrapping_mul(2_654_435_761)) % n
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_killed_at_random_moments_applies_every_change_once() {
    let amqp = test_support::require!("AMQP_URL");
    let Some(w) = World::new(&[Engine::Postgres, Engine::Mysql], Some(&amqp)).await else {
        return;
    };
    let (a, b) = (w.site("a"), w.site("b"));
    a.exec("INSERT INTO org_unit (name) VALUES ('Chemistry')")
        .await;
    for i in 0..300 {
        a.exec(&format!(
            "INSERT INTO users (name, email, org_unit_id) SELECT 'P{i}', 'p{i}@x.org', id FROM org_unit"
        ))
        .await;
    }
    w.ok(&["relay", "--site", "a"]);
    let mut killed = 0;
    for _ in 0..12 {
        let mut child = test_support::cli::command(crate::BIN, w.home.path())
            .args([
                "--config",
                w.config.to_str().unwrap(),
                "consume",
                "--site",
                "b",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(150 + below(600)));
        if child.try_wait().unwrap().is_none() {
            killed += 1;
        }
        let _ = std::process::Command::new("kill")
            .args(["-9", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
    assert!(killed >= 10, "only {killed} runs were killed mid-way");
    w.ok(&["consume", "--site", "b", "--once"]);
    assert_eq!(b.int("SELECT COUNT(*) FROM users").await, 300);
    assert_eq!(b.int("SELECT COUNT(DISTINCT email) FROM users").await, 300);
    assert_eq!(b.int("SELECT COUNT(*) FROM org_unit").await, 1);
    assert_eq!(
        b.int("SELECT COUNT(*) FROM labrelay_sync_inbox").await,
        301,
        "one inbox row per event"
    );
    assert_eq!(a.users().await, b.users().await);
    w.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bootstrap_of_ten_thousand_history_objects_converges_a_fresh_site_and_changes_nothing_at_the_source()
 {
    let amqp = test_support::require!("AMQP_URL");
    let Some(w) = World::new(&[Engine::Postgres, Engine::Mysql], Some(&amqp)).await else {
        return;
    };
    let (a, b) = (w.site("a"), w.site("b"));
    // History written before syncing was installed.
    w.ok(&["uninstall", "--site", "a"]);
    a.exec("INSERT INTO org_unit (name) VALUES ('History')")
        .await;
    a.exec(
        "INSERT INTO users (name, email, phone, org_unit_id) \
         SELECT 'User ' || g, 'user' || g || '@x.org', CAST(g AS TEXT), (SELECT id FROM org_unit) \
         FROM generate_series(1, 10000) AS g",
    )
    .await;
    a.exec("INSERT INTO lab (name, pi_id) SELECT 'History lab', id FROM users WHERE email = 'user1@x.org'")
        .await;
    a.exec(
        "INSERT INTO user_lab (user_id, lab_id) SELECT u.id, l.id FROM users u, lab l \
         WHERE u.email IN ('user1@x.org', 'user2@x.org')",
    )
    .await;
    w.ok(&["install", "--site", "a"]);
    let fingerprint =
        "SELECT COUNT(*) + SUM(id) + SUM(LENGTH(name)) + SUM(LENGTH(phone)) FROM users";
    let before = a.int(fingerprint).await;
    let started = std::time::Instant::now();
    let out = w.json(&["bootstrap", "--site", "a"]);
    assert_eq!(out["published"]["user"], 10000, "{out}");
    assert_eq!(out["published"]["org_unit"], 1, "{out}");
    assert_eq!(out["published"]["lab"], 1, "{out}");
    assert_eq!(out["published"]["user_lab"], 2, "{out}");
    eprintln!("bootstrap of 10,000 users: {:?}", started.elapsed());
    let started = std::time::Instant::now();
    let consumed = w.json(&["consume", "--site", "b", "--once"]);
    eprintln!("apply of 10,000 users: {:?}", started.elapsed());
    assert_eq!(consumed["stats"]["applied"], 10004, "{consumed}");
    assert_eq!(b.int("SELECT COUNT(*) FROM users").await, 10000);
    assert_eq!(a.users().await, b.users().await);
    assert_eq!(a.labs().await, b.labs().await);
    assert_eq!(b.labs().await["History lab"][2], "user1@x.org,user2@x.org");
    // Nothing written at the source: same rows, empty outbox, no identities recorded.
    assert_eq!(a.int(fingerprint).await, before);
    for t in [
        "labrelay_sync_outbox",
        "labrelay_sync_ids",
        "labrelay_sync_fields",
    ] {
        assert_eq!(a.int(&format!("SELECT COUNT(*) FROM {t}")).await, 0, "{t}");
    }
    // A second bootstrap rewrites nothing at the receiver.
    w.json(&["bootstrap", "--site", "a"]);
    let again = w.json(&["consume", "--site", "b", "--once"]);
    assert_eq!(again["stats"]["applied"], 0, "{again}");
    assert_eq!(again["stats"]["unchanged"], 10004, "{again}");
    // Later edits at the source win over the bootstrap's lowest versions.
    a.exec("UPDATE users SET phone = 'new' WHERE email = 'user7@x.org'")
        .await;
    w.ok(&["relay", "--site", "a"]);
    w.ok(&["consume", "--site", "b", "--once"]);
    assert_eq!(b.users().await["user7@x.org"][3], "new");
    w.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_finds_hand_made_drift_and_repair_fixes_it() {
    let amqp = test_support::require!("AMQP_URL");
    let Some(w) = World::new(&[Engine::Postgres, Engine::Sqlite], Some(&amqp)).await else {
        return;
    };
    let (a, b) = (w.site("a"), w.site("b"));
    a.exec("INSERT INTO users (name, email, phone) VALUES ('Xu', 'xu@x.org', '1'), ('Yan', 'yan@x.org', '2')")
        .await;
    a.exec("INSERT INTO lab (name, pi_id) SELECT 'Xu lab', id FROM users WHERE email = 'xu@x.org'")
        .await;
    a.exec(
        "INSERT INTO user_lab (user_id, lab_id) SELECT u.id, l.id FROM users u, lab l WHERE l.name = 'Xu lab'",
    )
    .await;
    w.sync();
    assert_eq!(a.labs().await, b.labs().await);
    assert_eq!(a.labs().await["Xu lab"][2], "xu@x.org,yan@x.org");
    assert_eq!(
        w.run(&["reconcile", "--site", "a", "--with", "b"])
            .status
            .code(),
        Some(0)
    );
    // Someone edits b's database behind the triggers' back.
    b.exec(
        "INSERT INTO labrelay_sync_applying (token) VALUES (1); \
         UPDATE users SET phone = 'drift' WHERE email = 'xu@x.org'; \
         DELETE FROM user_lab WHERE user_id IN (SELECT id FROM users WHERE email = 'yan@x.org'); \
         DELETE FROM users WHERE email = 'yan@x.org'; \
         DELETE FROM user_lab WHERE user_id IN (SELECT id FROM users WHERE email = 'xu@x.org'); \
         DELETE FROM labrelay_sync_applying;",
    )
    .await;
    let out = w.run(&["--json", "reconcile", "--site", "a", "--with", "b"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let found: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = found.iter().map(|f| f["kind"].as_str().unwrap()).collect();
    // Yan missing, Xu's phone stale, both memberships missing.
    assert_eq!(found.len(), 4, "{text}");
    let links: Vec<&serde_json::Value> = found
        .iter()
        .filter(|f| f["object_type"] == "user_lab")
        .collect();
    assert_eq!(links.len(), 2, "{text}");
    assert!(
        links.iter().all(|f| f["kind"] == "missing_at_other"),
        "{text}"
    );
    assert!(kinds.contains(&"missing_at_other"), "{text}");
    // b's phone has no version: it changed outside sync, so a's versioned value is newer.
    assert!(kinds.contains(&"stale_at_other"), "{text}");
    w.ok(&["reconcile", "--site", "a", "--with", "b", "--repair"]);
    w.ok(&["consume", "--site", "b", "--once"]);
    assert_eq!(a.users().await, b.users().await);
    assert_eq!(a.labs().await, b.labs().await);
    let out = w.ok(&["reconcile", "--site", "a", "--with", "b"]);
    assert!(out.contains("0 difference"), "{out}");
    w.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn emit_records_a_change_for_sites_without_triggers_and_install_is_idempotent() {
    let amqp = test_support::require!("AMQP_URL");
    let Some(w) = World::new(&[Engine::Mysql, Engine::Postgres], Some(&amqp)).await else {
        return;
    };
    // Install twice; uninstall removes the triggers, so writes are no longer captured.
    w.ok(&["install", "--site", "a"]);
    w.ok(&["uninstall", "--site", "a"]);
    w.ok(&["uninstall", "--site", "a"]);
    let a = w.site("a");
    a.exec("INSERT INTO users (name, email) VALUES ('Hook', 'hook@x.org')")
        .await;
    assert_eq!(a.int("SELECT COUNT(*) FROM labrelay_sync_outbox").await, 0);
    let id = a
        .int("SELECT id FROM users WHERE email = 'hook@x.org'")
        .await;
    let mut child = test_support::cli::command(crate::BIN, w.home.path())
        .args([
            "--config",
            w.config.to_str().unwrap(),
            "emit",
            "--site",
            "a",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{{\"type\":\"user\",\"op\":\"save\",\"key\":{id}}}").unwrap();
    }
    assert!(child.wait().unwrap().success());
    // A bad line is a usage error naming the line.
    let out = test_support::cli::command(crate::BIN, w.home.path())
        .args([
            "--config",
            w.config.to_str().unwrap(),
            "emit",
            "--site",
            "a",
        ])
        .stdin(
            std::fs::File::open(write_tmp(
                &w,
                "{\"type\":\"robot\",\"op\":\"save\",\"key\":1}\n",
            ))
            .unwrap(),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 1"));
    w.sync();
    assert!(w.site("b").users().await.contains_key("hook@x.org"));
    // --print shows the SQL and runs nothing.
    let sql = w.ok(&["install", "--site", "a", "--print"]);
    assert!(
        sql.contains("CREATE TRIGGER labrelay_sync_user_ins AFTER INSERT ON `users`"),
        "{sql}"
    );
    a.exec("INSERT INTO users (name, email) VALUES ('Later', 'later@x.org')")
        .await;
    assert_eq!(
        a.int("SELECT COUNT(*) FROM labrelay_sync_outbox WHERE state = 'new'")
            .await,
        0
    );
    w.drop().await;
}

fn write_tmp(w: &World, text: &str) -> std::path::PathBuf {
    let p = w.home.path().join(test_support::unique("stdin"));
    std::fs::write(&p, text).unwrap();
    p
}
