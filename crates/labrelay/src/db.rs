//! Databases: open PostgreSQL, MariaDB/MySQL or SQLite from a URL, with connect and
//! statement timeouts, and create labrelay's own state tables by migration.
//!
//! One pool type ([`sqlx::AnyPool`]) serves all three engines so a tool's code does not
//! branch on the engine except for SQL dialect, which [`Db::engine`] exposes. Each
//! migration exists once per engine under `migrations/<engine>/`, with the same number
//! and name, so the three schemas stay in step (a test checks they list the same files).
//! This module does not know any tool's tables beyond running their migrations.
//!
//! Several tools or listeners may start at the same moment on a fresh database, and
//! each runs the migrations. [`Db::migrate`] therefore holds a lock around them on every
//! engine, so one process migrates and the others then find the schema up to date:
//! PostgreSQL a session advisory lock (`pg_advisory_lock`), MariaDB/MySQL a named lock
//! (`GET_LOCK`) on the same connection, SQLite an exclusive `flock` on a file beside the
//! database (`state.db.migrate-lock`). sqlx's own migration lock is not enough: it is a
//! no-op on SQLite (two processes then both apply migration 1 and one dies with
//! `UNIQUE constraint failed: _sqlx_migrations.version`), and on MariaDB its
//! `GET_LOCK(name, -1)` returns NULL at once instead of waiting (MariaDB takes no
//! negative timeout). The regression tests start several migrations at once per engine.

use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor, Row};

use crate::config::DatabaseConfig;
use crate::exit::Exit;
use crate::secret::RedactedUrl;

/// Database errors. Messages name the database by its redacted URL.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The server could not be reached in time (exit 75).
    #[error("cannot connect to database {url}: {message}")]
    Connect {
        /// Redacted URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The server refused our credentials or the URL is unusable (exit 78).
    #[error("database {url} refused the configuration: {message}")]
    Config {
        /// Redacted URL.
        url: String,
        /// Why.
        message: String,
    },
    /// A migration failed (exit 1).
    #[error("migrating database {url}: {message}")]
    Migrate {
        /// Redacted URL.
        url: String,
        /// Why.
        message: String,
    },
    /// A statement failed (exit 1, or 75 when the connection dropped).
    #[error("database {url}: {source}")]
    Query {
        /// Redacted URL.
        url: String,
        /// The driver error.
        #[source]
        source: sqlx::Error,
    },
}

impl DbError {
    /// Exit status.
    pub fn exit(&self) -> Exit {
        match self {
            DbError::Connect { .. } => Exit::TempFail,
            DbError::Config { .. } => Exit::Config,
            DbError::Migrate { .. } => Exit::Failed,
            DbError::Query { source, .. } => match source {
                sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
                    Exit::TempFail
                }
                _ => Exit::Failed,
            },
        }
    }
}

/// The database engine behind a URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// PostgreSQL.
    Postgres,
    /// MariaDB or MySQL.
    Mysql,
    /// SQLite.
    Sqlite,
}

impl Engine {
    /// The engine for a URL scheme.
    pub fn from_url(url: &url::Url) -> Option<Engine> {
        match url.scheme() {
            "postgres" | "postgresql" => Some(Engine::Postgres),
            "mysql" | "mariadb" => Some(Engine::Mysql),
            "sqlite" => Some(Engine::Sqlite),
            _ => None,
        }
    }

    /// Bind placeholder number `n` (1-based) in this engine's dialect.
    pub fn placeholder(self, n: usize) -> String {
        match self {
            Engine::Postgres => format!("${n}"),
            Engine::Mysql | Engine::Sqlite => "?".to_owned(),
        }
    }
}

/// An open connection pool.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    engine: Engine,
    url: RedactedUrl,
}

static MIGRATE_SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static MIGRATE_POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
static MIGRATE_MYSQL: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/mysql");

impl Db {
    /// Open a pool for a `[databases.NAME]` section. The password may come from the
    /// section's `password` secret instead of the URL.
    pub async fn connect(cfg: &DatabaseConfig) -> Result<Db, DbError> {
        sqlx::any::install_default_drivers();
        let mut url = cfg.url.clone();
        if let Some(spec) = &cfg.password {
            let pw = spec.resolve().map_err(|e| DbError::Config {
                url: cfg.url.to_string(),
                message: e.to_string(),
            })?;
            url = url.with_password(&pw);
        }
        let shown = url.to_string();
        let engine = Engine::from_url(url.expose()).ok_or_else(|| DbError::Config {
            url: shown.clone(),
            message: "unsupported scheme; use postgres://, mysql://, mariadb:// or sqlite://"
                .into(),
        })?;
        let mut raw = url.expose().clone();
        if raw.scheme() == "mariadb" {
            // sqlx knows MariaDB as mysql; the scheme is the only difference.
            let s = raw.as_str().replacen("mariadb://", "mysql://", 1);
            raw = url::Url::parse(&s).map_err(|e| DbError::Config {
                url: shown.clone(),
                message: e.to_string(),
            })?;
        }
        if engine == Engine::Sqlite {
            prepare_sqlite_path(&raw, cfg.read_only).map_err(|message| DbError::Config {
                url: shown.clone(),
                message,
            })?;
            if cfg.read_only && !raw.query_pairs().any(|(k, _)| k == "mode") {
                raw.query_pairs_mut().append_pair("mode", "ro");
            }
        }
        let opts: AnyConnectOptions =
            raw.as_str()
                .parse()
                .map_err(|e: sqlx::Error| DbError::Config {
                    url: shown.clone(),
                    message: crate::secret::scrub(&e.to_string()).into_owned(),
                })?;
        let statement_timeout = cfg.statement_timeout_secs;
        let read_only = cfg.read_only;
        let pool_opts = AnyPoolOptions::new()
            .max_connections(cfg.max_connections.max(1))
            .acquire_timeout(Duration::from_secs(cfg.connect_timeout_secs.max(1)))
            .after_connect(move |conn, _meta| {
                Box::pin(
                    async move { session_setup(conn, engine, statement_timeout, read_only).await },
                )
            });
        let connect = pool_opts.connect_with(opts);
        let pool = tokio::time::timeout(
            Duration::from_secs(cfg.connect_timeout_secs.max(1)),
            connect,
        )
        .await
        .map_err(|_| DbError::Connect {
            url: shown.clone(),
            message: format!("no answer within {} s", cfg.connect_timeout_secs),
        })?
        .map_err(|e| classify_connect_error(&shown, &e))?;
        tracing::debug!(url = %shown, ?engine, read_only, "connected to database");
        Ok(Db {
            pool,
            engine,
            url: cfg.url.clone(),
        })
    }

    /// Open the state database and bring its schema up to date.
    pub async fn open_state(config: &crate::config::Config) -> Result<Db, anyhow::Error> {
        let cfg = config.state_database()?;
        let db = Db::connect(&cfg).await?;
        db.migrate().await?;
        Ok(db)
    }

    /// Apply labrelay's migrations for this engine (idempotent), holding the engine's
    /// migration lock so that processes starting together migrate one after another.
    pub async fn migrate(&self) -> Result<(), DbError> {
        let m = match self.engine {
            Engine::Sqlite => &MIGRATE_SQLITE,
            Engine::Postgres => &MIGRATE_POSTGRES,
            Engine::Mysql => &MIGRATE_MYSQL,
        };
        let failed = |message: String| DbError::Migrate {
            url: self.url.to_string(),
            message,
        };
        // SQLite: the file lock is taken before any connection, so a process waiting for
        // it holds no SQLite lock the migrating one could need.
        let _file_lock = match self.engine {
            Engine::Sqlite => match self.sqlite_lock_path() {
                Some(path) => Some(lock_file(path).await.map_err(failed)?),
                None => None,
            },
            Engine::Postgres | Engine::Mysql => None,
        };
        let mut conn = self.pool.acquire().await.map_err(|e| self.err(e))?;
        // Server engines: a session lock on the connection that runs the migrations.
        // PostgreSQL waits for it as long as the session's statement_timeout allows.
        let locked = match self.engine {
            Engine::Postgres => {
                sqlx::query(&format!("SELECT pg_advisory_lock({PG_MIGRATE_LOCK_KEY})"))
                    .execute(&mut *conn)
                    .await
                    .map(drop)
                    .map_err(|e| format!("taking the migration lock: {e}"))
            }
            Engine::Mysql => mysql_get_lock(&mut conn).await,
            Engine::Sqlite => Ok(()),
        };
        let locked_ok = locked.is_ok();
        let result = match locked {
            Ok(()) => m.run_direct(&mut *conn).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        if self.engine != Engine::Sqlite {
            // After a clean run the lock is released and the session goes back to the
            // pool (a new connection would cost the next statement a few milliseconds);
            // otherwise closing the session releases its locks whatever happened above.
            // (Not for SQLite: the last connection of an in-memory database is the
            // database.)
            let release = match self.engine {
                Engine::Postgres => format!("SELECT pg_advisory_unlock({PG_MIGRATE_LOCK_KEY})"),
                _ => format!("SELECT RELEASE_LOCK({MYSQL_MIGRATE_LOCK})"),
            };
            let released = result.is_ok()
                && locked_ok
                && sqlx::query(&release)
                    .fetch_one(&mut *conn)
                    .await
                    .is_ok_and(|r| {
                        r.try_get::<Option<bool>, _>(0).ok().flatten() == Some(true)
                            || r.try_get::<Option<i64>, _>(0).ok().flatten() == Some(1)
                    });
            if released {
                // Back in the pool before the next statement asks for a connection (a
                // dropped one is returned by a background task, which may come too late).
                conn.return_to_pool().await;
            } else {
                let _ = conn.close().await;
            }
        }
        result.map_err(failed)?;
        tracing::debug!(url = %self.url, migrations = m.iter().count(), "schema up to date");
        Ok(())
    }

    /// The file whose `flock` serialises migrations of a SQLite database file; `None` for
    /// an in-memory database, which no other process can see.
    fn sqlite_lock_path(&self) -> Option<std::path::PathBuf> {
        let path = sqlite_file(self.url.expose())?;
        let mut name = path.file_name()?.to_os_string();
        name.push(".migrate-lock");
        Some(path.with_file_name(name))
    }

    /// Tell processes waiting on `channel` ([`Wakeup::listen_or_watch`]) that there is
    /// new work: a PostgreSQL NOTIFY, or a write to the SQLite database file's wake file
    /// when a waiting process created it; nothing on MariaDB, whose waiters poll. Best
    /// effort: a waiter finds the work at its next poll anyway.
    pub async fn notify(&self, channel: &str) {
        match self.engine {
            Engine::Postgres => {
                let _ = sqlx::query("SELECT pg_notify($1, '')")
                    .bind(channel)
                    .execute(&self.pool)
                    .await;
            }
            Engine::Sqlite => {
                if let Some(p) = sqlite_wake_path(self.url.expose(), channel) {
                    // Never created here: only a waiter's file is written.
                    if let Ok(mut f) = std::fs::OpenOptions::new()
                        .write(true)
                        .truncate(true)
                        .open(&p)
                    {
                        let _ = std::io::Write::write_all(&mut f, b"1");
                    }
                }
            }
            Engine::Mysql => {}
        }
    }

    /// [`Db::notify`] on a connection the caller holds (the one that just wrote the
    /// work): no second connection is taken from the pool for it.
    pub async fn notify_on(&self, conn: &mut sqlx::AnyConnection, channel: &str) {
        if self.engine == Engine::Postgres {
            let _ = sqlx::query("SELECT pg_notify($1, '')")
                .bind(channel)
                .execute(&mut *conn)
                .await;
        } else {
            self.notify(channel).await;
        }
    }

    /// The pool.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The engine.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The URL, for messages (Display is redacted).
    pub fn url(&self) -> &RedactedUrl {
        &self.url
    }

    /// Wrap a driver error with this database's name.
    pub fn err(&self, source: sqlx::Error) -> DbError {
        DbError::Query {
            url: self.url.to_string(),
            source,
        }
    }

    /// Read a value from the `labrelay_kv` state table.
    pub async fn kv_get(&self, scope: &str, name: &str) -> Result<Option<String>, DbError> {
        let sql = format!(
            "SELECT value FROM labrelay_kv WHERE scope = {} AND name = {}",
            self.engine.placeholder(1),
            self.engine.placeholder(2)
        );
        let row = sqlx::query(&sql)
            .bind(scope)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        row.map(|r| text(&r, 0))
            .transpose()
            .map_err(|e| self.err(e))
    }

    /// Insert or replace a value in the `labrelay_kv` state table.
    pub async fn kv_set(&self, scope: &str, name: &str, value: &str) -> Result<(), DbError> {
        let p = |n| self.engine.placeholder(n);
        let sql = match self.engine {
            Engine::Postgres | Engine::Sqlite => format!(
                "INSERT INTO labrelay_kv (scope, name, value, updated_at) VALUES ({}, {}, {}, {}) \
                 ON CONFLICT (scope, name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                p(1),
                p(2),
                p(3),
                p(4)
            ),
            Engine::Mysql => format!(
                "INSERT INTO labrelay_kv (scope, name, value, updated_at) VALUES ({}, {}, {}, {}) \
                 ON DUPLICATE KEY UPDATE value = VALUES(value), updated_at = VALUES(updated_at)",
                p(1),
                p(2),
                p(3),
                p(4)
            ),
        };
        sqlx::query(&sql)
            .bind(scope)
            .bind(name)
            .bind(value)
            .bind(chrono::Utc::now().to_rfc3339())
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Close the pool, waiting for connections to finish.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Read a text column from any engine. Through the `Any` driver, MariaDB/MySQL report
/// `TEXT`/`LONGTEXT` columns as `BLOB`; this accepts both and requires valid UTF-8.
pub fn text<I>(row: &sqlx::any::AnyRow, index: I) -> Result<String, sqlx::Error>
where
    I: sqlx::ColumnIndex<sqlx::any::AnyRow> + Copy + std::fmt::Debug,
{
    match row.try_get::<String, _>(index) {
        Ok(s) => Ok(s),
        Err(sqlx::Error::ColumnDecode { .. }) => {
            let bytes: Vec<u8> = row.try_get(index)?;
            String::from_utf8(bytes).map_err(|e| sqlx::Error::ColumnDecode {
                index: format!("{index:?}"),
                source: Box::new(e),
            })
        }
        Err(e) => Err(e),
    }
}

/// [`text`] for a column that may be NULL.
pub fn opt_text<I>(row: &sqlx::any::AnyRow, index: I) -> Result<Option<String>, sqlx::Error>
where
    I: sqlx::ColumnIndex<sqlx::any::AnyRow> + Copy + std::fmt::Debug,
{
    match row.try_get::<Option<String>, _>(index) {
        Ok(v) => Ok(v),
        Err(sqlx::Error::ColumnDecode { .. }) => {
            let bytes: Option<Vec<u8>> = row.try_get(index)?;
            bytes
                .map(|b| {
                    String::from_utf8(b).map_err(|e| sqlx::Error::ColumnDecode {
                        index: format!("{index:?}"),
                        source: Box::new(e),
                    })
                })
                .transpose()
        }
        Err(e) => Err(e),
    }
}

/// PostgreSQL advisory lock key of labrelay's migrations (advisory locks are scoped to
/// the current database). The ASCII bytes of "labrelay".
const PG_MIGRATE_LOCK_KEY: i64 = 0x6c61_6272_656c_6179;

/// How long a process waits for another one's migrations on MariaDB/MySQL.
const MYSQL_MIGRATE_LOCK_WAIT_SECS: u32 = 300;
/// The name of the MariaDB/MySQL migration lock: one per database.
const MYSQL_MIGRATE_LOCK: &str = "SHA1(CONCAT('labrelay migrate ', DATABASE()))";

/// Take labrelay's migration lock for the current database on this MariaDB/MySQL
/// session. Named locks are server-wide, so the name includes the database (hashed:
/// MySQL limits names to 64 characters).
async fn mysql_get_lock(conn: &mut sqlx::AnyConnection) -> Result<(), String> {
    let row = sqlx::query(&format!(
        "SELECT GET_LOCK({MYSQL_MIGRATE_LOCK}, \
         {MYSQL_MIGRATE_LOCK_WAIT_SECS})"
    ))
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| format!("taking the migration lock: {e}"))?;
    // 1 = taken, 0 = timed out, NULL = error.
    match row.try_get::<Option<i64>, _>(0) {
        Ok(Some(1)) => Ok(()),
        Ok(_) => Err(format!(
            "another process held the migration lock for {MYSQL_MIGRATE_LOCK_WAIT_SECS} s"
        )),
        Err(e) => Err(format!("taking the migration lock: {e}")),
    }
}

/// Take an exclusive `flock` on `path` (created if missing), waiting on a blocking
/// thread. The lock lasts as long as the returned file is open.
async fn lock_file(path: std::path::PathBuf) -> Result<std::fs::File, String> {
    tokio::task::spawn_blocking(move || {
        let file = fs_err::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("taking the migration lock: {e}"))?
            .into_parts()
            .0;
        file.lock()
            .map_err(|e| format!("taking the migration lock: locking {}: {e}", path.display()))?;
        Ok(file)
    })
    .await
    .map_err(|e| format!("taking the migration lock: {e}"))?
}

/// The file beside a SQLite database through which [`Db::notify`] wakes the waiters on
/// `channel`: `NAME.CHANNEL.wake`.
fn sqlite_wake_path(url: &url::Url, channel: &str) -> Option<std::path::PathBuf> {
    let path = sqlite_file(url)?;
    let mut name = path.file_name()?.to_os_string();
    name.push(format!(".{channel}.wake"));
    Some(path.with_file_name(name))
}

/// The file of a `sqlite:` URL; `None` for an in-memory database.
fn sqlite_file(url: &url::Url) -> Option<std::path::PathBuf> {
    let rest = url
        .as_str()
        .trim_start_matches("sqlite:")
        .trim_start_matches("//");
    let path = rest.split('?').next().unwrap_or("");
    if path.is_empty()
        || path.starts_with(':')
        || url.query_pairs().any(|(k, v)| k == "mode" && v == "memory")
    {
        return None;
    }
    Some(std::path::PathBuf::from(path))
}

fn prepare_sqlite_path(url: &url::Url, read_only: bool) -> Result<(), String> {
    let Some(path) = sqlite_file(url) else {
        return Ok(());
    };
    if read_only {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create directory {}: {e}", parent.display()))?;
    }
    Ok(())
}

async fn session_setup(
    conn: &mut sqlx::AnyConnection,
    engine: Engine,
    statement_timeout: u64,
    read_only: bool,
) -> Result<(), sqlx::Error> {
    match engine {
        Engine::Postgres => {
            if statement_timeout > 0 {
                conn.execute(format!("SET statement_timeout = '{statement_timeout}s'").as_str())
                    .await?;
            }
            if read_only {
                conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
                    .await?;
            } else {
                // labrelay's own statements (state, queues, job rows, LIMS lookups) are
                // short and many: compiling one with JIT, which PostgreSQL does when a
                // plan's estimate passes jit_above_cost, costs milliseconds of CPU and
                // saves nothing (bench/README.md). Read-only sessions run people's
                // queries (mail-query) and keep the server's setting. A server without
                // JIT (before 11) refuses the name: fine.
                let _ = conn.execute("SET jit = off").await;
            }
        }
        Engine::Mysql => {
            if statement_timeout > 0 {
                // MariaDB calls it max_statement_time (seconds); MySQL max_execution_time
                // (milliseconds, SELECT only).
                let mariadb = conn
                    .execute(
                        format!("SET SESSION max_statement_time = {statement_timeout}").as_str(),
                    )
                    .await;
                if mariadb.is_err() {
                    conn.execute(
                        format!(
                            "SET SESSION max_execution_time = {}",
                            statement_timeout * 1000
                        )
                        .as_str(),
                    )
                    .await?;
                }
            }
            if read_only {
                conn.execute("SET SESSION TRANSACTION READ ONLY").await?;
            }
            conn.execute("SET NAMES utf8mb4").await?;
        }
        Engine::Sqlite => {
            // Several labrelay processes share one state file; wait for a lock rather
            // than fail at once, and let readers proceed during writes.
            let wait_ms = if statement_timeout > 0 {
                statement_timeout.min(30) * 1000
            } else {
                30_000
            };
            conn.execute(format!("PRAGMA busy_timeout = {wait_ms}").as_str())
                .await?;
            if read_only {
                conn.execute("PRAGMA query_only = 1").await?;
            } else {
                // In-memory databases answer "memory" and cannot use WAL; that is fine.
                let _ = conn.execute("PRAGMA journal_mode = WAL").await;
                conn.execute("PRAGMA synchronous = NORMAL").await?;
            }
            conn.execute("PRAGMA foreign_keys = ON").await?;
        }
    }
    Ok(())
}

fn classify_connect_error(url: &str, e: &sqlx::Error) -> DbError {
    let message = crate::secret::scrub(&e.to_string()).into_owned();
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => DbError::Connect {
            url: url.to_owned(),
            message,
        },
        _ => DbError::Config {
            url: url.to_owned(),
            message,
        },
    }
}

/// What a process waits on for work: PostgreSQL notifications on a channel (a wait
/// ends as soon as something is announced), or only the polling interval on other
/// engines or when listening fails.
pub enum Wakeup {
    /// LISTEN on a PostgreSQL database.
    Listen(Box<sqlx::postgres::PgListener>),
    /// inotify on a SQLite database's wake file ([`Db::notify`]).
    Watch(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>),
    /// Only the interval.
    Poll,
}

impl Wakeup {
    /// LISTEN on `channel` when `cfg` is PostgreSQL; polling otherwise or when that fails
    /// (with a warning: work is still found, only later).
    pub async fn listen(cfg: &DatabaseConfig, channel: &str) -> Wakeup {
        if Engine::from_url(cfg.url.expose()) != Some(Engine::Postgres) {
            return Wakeup::Poll;
        }
        let mut url = cfg.url.clone();
        if let Some(spec) = &cfg.password {
            match spec.resolve() {
                Ok(pw) => url = url.with_password(&pw),
                Err(_) => return Wakeup::Poll,
            }
        }
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect(url.expose().as_str()).await?;
            l.listen(channel).await?;
            Ok::<_, sqlx::Error>(l)
        };
        match listener.await {
            Ok(l) => Wakeup::Listen(Box::new(l)),
            Err(e) => {
                tracing::warn!(url = %cfg.url, error = %crate::secret::scrub(&e.to_string()),
                    "cannot LISTEN for notifications; polling instead");
                Wakeup::Poll
            }
        }
    }

    /// [`Wakeup::listen`], and on a SQLite database file also a watch of its wake file
    /// (created here), which [`Db::notify`] writes: processes on one machine sharing
    /// the embedded database wake each other without polling fast.
    pub async fn listen_or_watch(cfg: &DatabaseConfig, channel: &str) -> Wakeup {
        if Engine::from_url(cfg.url.expose()) != Some(Engine::Sqlite) {
            return Wakeup::listen(cfg, channel).await;
        }
        let Some(path) = sqlite_wake_path(cfg.url.expose(), channel) else {
            return Wakeup::Poll;
        };
        let watch = || -> std::io::Result<Wakeup> {
            use rustix::fs::inotify;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)?;
            inotify::add_watch(
                &fd,
                &path,
                inotify::WatchFlags::MODIFY | inotify::WatchFlags::CLOSE_WRITE,
            )?;
            // SAFETY: `fd` is an open inotify descriptor owned by the AsyncFd from here on;
            // an OwnedFd's raw descriptor never changes while it is open.
            #[allow(unsafe_code)]
            let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }?;
            Ok(Wakeup::Watch(fd))
        };
        match watch() {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e,
                    "cannot watch the wake file; polling instead");
                Wakeup::Poll
            }
        }
    }

    /// Wait for a notification or the interval, whichever comes first; `true` when a
    /// notification came.
    pub async fn wait(&mut self, interval: Duration) -> bool {
        match self {
            Wakeup::Poll => {
                tokio::time::sleep(interval).await;
                false
            }
            Wakeup::Listen(l) => {
                tokio::select! {
                    r = l.recv() => {
                        if r.is_err() {
                            // The listener reconnects by itself on the next recv; do not spin.
                            tokio::time::sleep(interval).await;
                            return false;
                        }
                        true
                    }
                    () = tokio::time::sleep(interval) => false,
                }
            }
            Wakeup::Watch(fd) => {
                tokio::select! {
                    ready = fd.readable() => {
                        let Ok(mut guard) = ready else {
                            tokio::time::sleep(interval).await;
                            return false;
                        };
                        // Take every event queued: one wake for all of them.
                        let mut buf = [0u8; 4096];
                        while rustix::io::read(guard.get_inner(), &mut buf).is_ok_and(|n| n > 0) {}
                        guard.clear_ready();
                        true
                    }
                    () = tokio::time::sleep(interval) => false,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite_memory() -> DatabaseConfig {
        DatabaseConfig::from_url(RedactedUrl::parse("sqlite::memory:").unwrap())
    }

    #[tokio::test]
    async fn sqlite_memory_migrates_and_stores_state() {
        let mut cfg = sqlite_memory();
        cfg.max_connections = 1;
        let db = Db::connect(&cfg).await.unwrap();
        db.migrate().await.unwrap();
        db.migrate().await.unwrap();
        assert_eq!(db.kv_get("imap", "last_uid").await.unwrap(), None);
        db.kv_set("imap", "last_uid", "41").await.unwrap();
        db.kv_set("imap", "last_uid", "42").await.unwrap();
        assert_eq!(
            db.kv_get("imap", "last_uid").await.unwrap().as_deref(),
            Some("42")
        );
    }

    #[test]
    fn every_migration_exists_for_every_engine() {
        let list = |engine: &str| -> Vec<String> {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .join(engine);
            let mut v: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let sqlite = list("sqlite");
        assert!(!sqlite.is_empty());
        assert_eq!(sqlite, list("postgres"));
        assert_eq!(sqlite, list("mysql"));
    }

    #[tokio::test]
    async fn unreachable_server_is_a_temporary_failure_without_password() {
        let mut cfg = DatabaseConfig::from_url(
            RedactedUrl::parse("postgres://u:pw-never-shown@127.0.0.1:1/x").unwrap(),
        );
        cfg.connect_timeout_secs = 2;
        let err = Db::connect(&cfg).await.unwrap_err();
        assert_eq!(err.exit(), Exit::TempFail, "{err}");
        assert!(!err.to_string().contains("pw-never-shown"), "{err}");
    }

    #[test]
    fn placeholders_follow_the_dialect() {
        assert_eq!(Engine::Postgres.placeholder(2), "$2");
        assert_eq!(Engine::Mysql.placeholder(2), "?");
    }
}

impl crate::exit::ExitClass for DbError {
    fn exit_class(&self) -> Exit {
        self.exit()
    }
}
crate::exit_class!(DbError);
