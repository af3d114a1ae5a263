//! The state database against real PostgreSQL and MariaDB servers (and SQLite files):
//! the same body runs for each engine.

use labrelay::config::DatabaseConfig;
use labrelay::db::{Db, Engine};
use labrelay::exit::Exit;
use labrelay::secret::RedactedUrl;
use sqlx::Row;

/// A fresh, empty database on the server at `admin_url`, dropped on `cleanup`.
struct TempDb {
    admin: Db,
    name: String,
    url: RedactedUrl,
}

impl TempDb {
    async fn create(admin_url: &str) -> TempDb {
        let admin = Db::connect(&DatabaseConfig::from_url(
            RedactedUrl::parse(admin_url).unwrap(),
        ))
        .await
        .unwrap();
        let name = test_support::unique("lr").replace('-', "_");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(admin.pool())
            .await
            .unwrap();
        let mut url = admin.url().expose().clone();
        url.set_path(&format!("/{name}"));
        TempDb {
            admin,
            name,
            url: RedactedUrl::new(url),
        }
    }

    async fn cleanup(self) {
        let force = if self.admin.engine() == Engine::Postgres {
            " WITH (FORCE)"
        } else {
            ""
        };
        sqlx::query(&format!("DROP DATABASE IF EXISTS {}{force}", self.name))
            .execute(self.admin.pool())
            .await
            .unwrap();
    }
}

async fn contract(url: RedactedUrl, engine: Engine) {
    let mut cfg = DatabaseConfig::from_url(url.clone());
    cfg.statement_timeout_secs = 1;
    let db = Db::connect(&cfg).await.unwrap();
    assert_eq!(db.engine(), engine);
    // Migrations are idempotent.
    db.migrate().await.unwrap();
    db.migrate().await.unwrap();
    // The migration lock is released when migrating ends, though the session that held
    // it goes back to the pool: another process migrates at once.
    let other = Db::connect(&cfg).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), other.migrate())
        .await
        .expect("the migration lock was still held")
        .unwrap();
    other.close().await;
    // State round trip with UTF-8 (Chinese) values.
    db.kv_set("delivery", "客户", "交付完成 ✓").await.unwrap();
    db.kv_set("delivery", "客户", "交付完成 ✓✓").await.unwrap();
    assert_eq!(
        db.kv_get("delivery", "客户").await.unwrap().as_deref(),
        Some("交付完成 ✓✓")
    );
    // PostgreSQL: labrelay's own sessions never JIT-compile; read-only ones keep the
    // server's setting (checked below).
    if engine == Engine::Postgres {
        let jit: String = sqlx::query("SHOW jit")
            .fetch_one(db.pool())
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(jit, "off");
    }
    // A statement running past the statement timeout is stopped.
    let slow = match engine {
        Engine::Postgres => "SELECT pg_sleep(5)",
        Engine::Mysql => {
            "SELECT COUNT(*) FROM information_schema.columns a, information_schema.columns b, information_schema.columns c"
        }
        Engine::Sqlite => return,
    };
    let started = std::time::Instant::now();
    let res = sqlx::query(slow).fetch_one(db.pool()).await;
    assert!(res.is_err(), "slow statement was not stopped");
    assert!(started.elapsed() < std::time::Duration::from_secs(4));
    // Read-only sessions refuse writes.
    let mut ro = DatabaseConfig::from_url(url);
    ro.read_only = true;
    let ro = Db::connect(&ro).await.unwrap();
    let n: i64 = sqlx::query("SELECT COUNT(*) FROM labrelay_kv")
        .fetch_one(ro.pool())
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
    assert_eq!(n, 1);
    if engine == Engine::Postgres {
        let server: String = sqlx::query("SELECT reset_val FROM pg_settings WHERE name = 'jit'")
            .fetch_one(ro.pool())
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        let jit: String = sqlx::query("SHOW jit")
            .fetch_one(ro.pool())
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(jit, server);
    }
    let write = ro.kv_set("x", "y", "z").await;
    assert!(write.is_err(), "read-only connection accepted a write");
    ro.close().await;
    db.close().await;
}

#[tokio::test]
async fn postgres_contract() {
    let admin = test_support::require!("PG_URL");
    let tmp = TempDb::create(&admin).await;
    contract(tmp.url.clone(), Engine::Postgres).await;
    tmp.cleanup().await;
}

#[tokio::test]
async fn mariadb_contract() {
    let admin = test_support::require!("MYSQL_URL");
    let tmp = TempDb::create(&admin).await;
    contract(tmp.url.clone(), Engine::Mysql).await;
    tmp.cleanup().await;
}

#[tokio::test]
async fn sqlite_file_contract() {
    let dir = test_support::tempdir();
    let path = dir.path().join("nested/dir/state.db");
    let url = RedactedUrl::parse(&format!("sqlite://{}?mode=rwc", path.display())).unwrap();
    contract(url.clone(), Engine::Sqlite).await;
    assert!(path.exists());
    // A second pool (as a second process would) sees the same state.
    let db = Db::connect(&DatabaseConfig::from_url(url)).await.unwrap();
    assert!(db.kv_get("delivery", "客户").await.unwrap().is_some());
}

#[tokio::test]
async fn wrong_password_is_a_configuration_error() {
    let admin = test_support::require!("PG_URL");
    // Trust authentication accepts any password on this test server, so use a user that
    // does not exist instead: the server refuses it, which is a configuration problem.
    let mut url = url::Url::parse(&admin).unwrap();
    url.set_username("no_such_user_labrelay").unwrap();
    url.set_password(Some("hunter2-secret")).unwrap();
    let err = Db::connect(&DatabaseConfig::from_url(RedactedUrl::new(url)))
        .await
        .unwrap_err();
    assert_eq!(err.exit(), Exit::Config, "{err}");
    assert!(!err.to_string().contains("hunter2-secret"));
}

/// Several tools or listeners starting at once on a fresh database each run the
/// migrations; all must succeed and the schema be migrated exactly once.
async fn migrate_concurrently(url: &RedactedUrl) {
    const STARTS: usize = 6;
    // Each its own pool, as separate processes have; connected first so that the
    // migrations, not the connects, start together.
    let mut dbs = Vec::new();
    for _ in 0..STARTS {
        dbs.push(
            Db::connect(&DatabaseConfig::from_url(url.clone()))
                .await
                .unwrap(),
        );
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(STARTS));
    let mut tasks = tokio::task::JoinSet::new();
    for db in dbs {
        let barrier = barrier.clone();
        tasks.spawn(async move {
            barrier.wait().await;
            let r = db.migrate().await.map_err(|e| e.to_string());
            db.close().await;
            r
        });
    }
    let failures: Vec<String> = tasks
        .join_all()
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
    assert!(
        failures.is_empty(),
        "concurrent migrations failed: {failures:#?}"
    );

    let migrations = std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite"),
    )
    .unwrap()
    .count() as i64;
    let db = Db::connect(&DatabaseConfig::from_url(url.clone()))
        .await
        .unwrap();
    let row = sqlx::query("SELECT COUNT(*), COUNT(DISTINCT version) FROM _sqlx_migrations")
        .fetch_one(db.pool())
        .await
        .unwrap();
    let (rows, versions): (i64, i64) = (row.try_get(0).unwrap(), row.try_get(1).unwrap());
    assert_eq!((rows, versions), (migrations, migrations));
    let done: i64 = sqlx::query("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(db.pool())
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
    assert_eq!(done, migrations);
    // And the schema works.
    db.kv_set("start", "n", "1").await.unwrap();
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regression_concurrent_start_migrates_postgres_once() {
    let admin = test_support::require!("PG_URL");
    let tmp = TempDb::create(&admin).await;
    migrate_concurrently(&tmp.url).await;
    tmp.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regression_concurrent_start_migrates_mariadb_once() {
    let admin = test_support::require!("MYSQL_URL");
    let tmp = TempDb::create(&admin).await;
    migrate_concurrently(&tmp.url).await;
    tmp.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regression_concurrent_start_migrates_sqlite_once() {
    // The reported bug: `UNIQUE constraint failed: _sqlx_migrations.version`. A few
    // fresh files, because one race is lost only most of the time without the lock.
    let dir = test_support::tempdir();
    for round in 0..5 {
        let path = dir.path().join(format!("{round}/state.db"));
        // As the state database's default URL (`sqlite://<data_dir>/state.db?mode=rwc`).
        let url = RedactedUrl::parse(&format!("sqlite://{}?mode=rwc", path.display())).unwrap();
        migrate_concurrently(&url).await;
        assert!(path.with_file_name("state.db.migrate-lock").exists());
    }
}
