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
