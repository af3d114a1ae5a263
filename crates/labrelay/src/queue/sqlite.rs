//! The embedded broker: exchanges, queues, bindings and messages in one SQLite file, for
//! sites without RabbitMQ and for tests.
//!
//! Several processes may use the same file at once: the database runs in WAL mode with
//! a busy timeout, and every state change is one `BEGIN IMMEDIATE` transaction, so two
//! consumers never claim the same message. Commits are `synchronous = FULL`: a publish
//! that returned `Ok` survives a power cut.
//!
//! Delivery works by lease. Claiming a message increments its delivery count and hides it
//! for the lease time under a random token; a live [`Delivery`](super::Delivery) renews
//! the lease in the background until it is settled, so a slow consumer keeps its message
//! while a crashed one's message becomes visible again when the lease lapses. Settling
//! checks the token, so a consumer whose lease was lost cannot ack a message that someone
//! else now holds. A message whose delivery count reached the queue's `max_deliveries`
//! moves to `<queue>.dead` instead of being delivered again: on a nack at once, and when
//! its consumer died holding it, at the next poll of any consumer of the same file after
//! the lease lapsed (there is no broker process to notice sooner).
//!
//! Consumers poll, starting at 20 ms and backing off to 500 ms while the queue is empty;
//! an empty poll is a read, not a write, so idle consumers do not contend for the lock.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{
    Broker, BrokerSettings, Consumer, ConsumerInner, Delivery, ExchangeKind, FIRST_DEATH_EXCHANGE,
    FIRST_DEATH_QUEUE, FIRST_DEATH_REASON, PublishOptions, QueueError, QueueSpec, Settle, topic,
    validate_name,
};
use crate::secret::RedactedUrl;

const POLL_MIN: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(500);
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS queue_exchanges (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS queue_queues (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        max_deliveries INTEGER,
        dead_letter TEXT
    )",
    "CREATE TABLE IF NOT EXISTS queue_bindings (
        exchange TEXT NOT NULL,
        queue TEXT NOT NULL,
        key TEXT NOT NULL,
        PRIMARY KEY (exchange, queue, key)
    )",
    // visible_at: unix milliseconds from which the message may be claimed; a claim moves
    // it one lease into the future. lease: the token of the current holder, NULL when
    // nobody holds it. deliveries: how many times it has been claimed.
    "CREATE TABLE IF NOT EXISTS queue_messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        message_id TEXT,
        exchange TEXT NOT NULL,
        routing_key TEXT NOT NULL,
        body BLOB NOT NULL,
        headers TEXT NOT NULL,
        enqueued_at INTEGER NOT NULL,
        visible_at INTEGER NOT NULL,
        deliveries INTEGER NOT NULL DEFAULT 0,
        lease TEXT
    )",
    "CREATE INDEX IF NOT EXISTS queue_messages_by_queue ON queue_messages (queue, id)",
    // Held (or once held and not yet reclaimed) messages are few; this keeps the search
    // for expired leases from scanning whole queues.
    "CREATE INDEX IF NOT EXISTS queue_messages_leased ON queue_messages (visible_at)
       WHERE lease IS NOT NULL",
];

/// Whether a database error means "busy, try again later".
pub(crate) fn is_temporary(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes.
            .is_some_and(|c| matches!(c & 0xff, 5 | 6)),
        _ => false,
    }
}

/// The embedded SQLite broker. Cloning is cheap and shares the connection pool.
#[derive(Clone)]
pub struct SqliteBroker {
    inner: Arc<Inner>,
}

struct Inner {
    pool: SqlitePool,
    path: String,
    lease: Duration,
    /// Added to the system clock; only tests move it, to expire leases without sleeping.
    clock_offset_ms: AtomicI64,
}

impl std::fmt::Debug for SqliteBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBroker")
            .field("path", &self.inner.path)
            .field("lease", &self.inner.lease)
            .finish_non_exhaustive()
    }
}

struct Claimed {
    id: i64,
    token: String,
    message_id: Option<String>,
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    headers: String,
    deliveries: i64,
}

impl SqliteBroker {
    /// Open (creating if needed) the queue database named by a `sqlite://PATH` URL
    /// (`sqlite::memory:` for a private in-memory broker).
    pub async fn open(url: &RedactedUrl, settings: &BrokerSettings) -> Result<Self, QueueError> {
        let text = url.expose().as_str();
        let options =
            SqliteConnectOptions::from_str(text).map_err(|e| QueueError::InvalidConfig {
                what: url.redacted(),
                message: e.to_string(),
            })?;
        let memory = text.contains(":memory:") || text.contains("mode=memory");
        let path = if memory {
            ":memory:".to_owned()
        } else {
            options.get_filename().display().to_string()
        };
        if !memory
            && let Some(dir) = options
                .get_filename()
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
        {
            fs_err::create_dir_all(dir).map_err(|e| QueueError::InvalidConfig {
                what: url.redacted(),
                message: e.to_string(),
            })?;
        }
        let mut options = options
            .create_if_missing(true)
            .busy_timeout(BUSY_TIMEOUT)
            .synchronous(SqliteSynchronous::Full);
        if !memory {
            options = options.journal_mode(SqliteJournalMode::Wal);
        }
        // An in-memory database lives as long as its one connection, so the pool must
        // keep exactly one open forever.
        let pool = if memory {
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            SqlitePoolOptions::new().max_connections(4)
        }
        .acquire_timeout(BUSY_TIMEOUT * 2)
        .connect_with(options)
        .await
        .map_err(|source| QueueError::Sqlite {
            path: path.clone(),
            source,
        })?;
        let broker = SqliteBroker {
            inner: Arc::new(Inner {
                pool,
                path,
                lease: settings.lease.max(Duration::from_millis(100)),
                clock_offset_ms: AtomicI64::new(0),
            }),
        };
        broker.migrate().await?;
        Ok(broker)
    }

    /// Open a broker on a database file.
    pub async fn open_path(
        path: &std::path::Path,
        settings: &BrokerSettings,
    ) -> Result<Self, QueueError> {
        let url = url::Url::from_file_path(path)
            .map_err(|()| QueueError::InvalidConfig {
                what: path.display().to_string(),
                message: "not an absolute path".into(),
            })?
            .to_string();
        let url = RedactedUrl::parse(&url.replacen("file://", "sqlite://", 1)).map_err(|e| {
            QueueError::InvalidConfig {
                what: path.display().to_string(),
                message: e.to_string(),
            }
        })?;
        SqliteBroker::open(&url, settings).await
    }

    /// The database file (`:memory:` for an in-memory broker).
    pub fn path(&self) -> &str {
        &self.inner.path
    }

    async fn migrate(&self) -> Result<(), QueueError> {
        let mut tx = self.begin().await?;
        for statement in SCHEMA {
            sqlx::query(statement)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    fn err(&self, source: sqlx::Error) -> QueueError {
        QueueError::Sqlite {
            path: self.inner.path.clone(),
            source,
        }
    }

    fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis() + self.inner.clock_offset_ms.load(Ordering::Relaxed)
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.inner.lease.as_millis()).unwrap_or(i64::MAX / 4)
    }

    #[cfg(test)]
    fn advance_clock(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(0);
        self.inner.clock_offset_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// A write transaction. `BEGIN IMMEDIATE` takes the write lock up front (waiting up
    /// to the busy timeout); a deferred transaction that reads first could fail to
    /// upgrade when another process wrote in between, and that failure is not retried.
    async fn begin(&self) -> Result<Transaction<'static, Sqlite>, QueueError> {
        self.inner
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.err(e))
    }

    async fn queue_exists(&self, name: &str) -> Result<bool, QueueError> {
        let found: Option<(String,)> =
            sqlx::query_as("SELECT name FROM queue_queues WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(|e| self.err(e))?;
        Ok(found.is_some())
    }

    async fn declare_queue_in(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        spec: &QueueSpec,
    ) -> Result<(), QueueError> {
        let max = spec.max_deliveries.map(i64::from);
        let dead = spec.dead_letter_queue();
        sqlx::query(
            "INSERT INTO queue_queues (name, kind, max_deliveries, dead_letter) VALUES (?, ?, ?, ?)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&spec.name)
        .bind(spec.kind.as_str())
        .bind(max)
        .bind(&dead)
        .execute(&mut **tx)
        .await
        .map_err(|e| self.err(e))?;
        let (kind, have_max, have_dead): (String, Option<i64>, Option<String>) = sqlx::query_as(
            "SELECT kind, max_deliveries, dead_letter FROM queue_queues WHERE name = ?",
        )
        .bind(&spec.name)
        .fetch_one(&mut **tx)
        .await
        .map_err(|e| self.err(e))?;
        let mut differences = Vec::new();
        if kind != spec.kind.as_str() {
            differences.push(format!("kind {kind}, not {}", spec.kind.as_str()));
        }
        if have_max != max {
            differences.push(format!("max_deliveries {have_max:?}, not {max:?}"));
        }
        if have_dead != dead {
            differences.push(format!("dead-letter queue {have_dead:?}, not {dead:?}"));
        }
        if differences.is_empty() {
            Ok(())
        } else {
            Err(QueueError::Mismatch {
                what: format!("queue {:?}", spec.name),
                message: differences.join(", "),
            })
        }
    }

    /// Claim the oldest visible message of `queue`. On the way, dead-letter the
    /// messages of any queue whose last consumer died holding their last delivery: with
    /// no broker process, the consumers' polls are what notices expired leases.
    async fn claim(&self, queue: &str) -> Result<Option<Claimed>, QueueError> {
        // Reads first, so that polling an empty queue takes no write lock.
        let (exists, ready, stale): (bool, bool, bool) = sqlx::query_as(
            "SELECT
               EXISTS (SELECT 1 FROM queue_queues WHERE name = ?1),
               EXISTS (SELECT 1 FROM queue_messages WHERE queue = ?1 AND visible_at <= ?2),
               EXISTS (SELECT 1 FROM queue_messages m JOIN queue_queues q ON q.name = m.queue
                       WHERE m.lease IS NOT NULL AND m.visible_at <= ?2
                         AND m.deliveries >= q.max_deliveries)",
        )
        .bind(queue)
        .bind(self.now_ms())
        .fetch_one(&self.inner.pool)
        .await
        .map_err(|e| self.err(e))?;
        if !exists {
            // As RabbitMQ cancels the consumers of a deleted queue.
            return Err(QueueError::Cancelled {
                queue: queue.to_owned(),
            });
        }
        if !ready && !stale {
            return Ok(None);
        }
        let mut tx = self.begin().await?;
        if stale {
            self.sweep(&mut tx).await?;
        }
        let Some((max, dead)): Option<(Option<i64>, Option<String>)> =
            sqlx::query_as("SELECT max_deliveries, dead_letter FROM queue_queues WHERE name = ?")
                .bind(queue)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.err(e))?
        else {
            return Ok(None);
        };
        loop {
            let now = self.now_ms();
            let next: Option<(i64, i64)> = sqlx::query_as(
                "SELECT id, deliveries FROM queue_messages
                 WHERE queue = ? AND visible_at <= ? ORDER BY id LIMIT 1",
            )
            .bind(queue)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
            let Some((id, deliveries)) = next else {
                tx.commit().await.map_err(|e| self.err(e))?;
                return Ok(None);
            };
            if max.is_some_and(|m| deliveries >= m) {
                self.dead_letter(&mut tx, id, queue, dead.as_deref(), "delivery_limit")
                    .await?;
                continue;
            }
            let token = uuid::Uuid::new_v4().to_string();
            let row: (Option<String>, String, String, Vec<u8>, String, i64) = sqlx::query_as(
                "UPDATE queue_messages
                 SET deliveries = deliveries + 1, lease = ?, visible_at = ?
                 WHERE id = ?
                 RETURNING message_id, exchange, routing_key, body, headers, deliveries",
            )
            .bind(&token)
            .bind(now + self.lease_ms())
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
            tx.commit().await.map_err(|e| self.err(e))?;
            return Ok(Some(Claimed {
                id,
                token,
                message_id: row.0,
                exchange: row.1,
                routing_key: row.2,
                body: row.3,
                headers: row.4,
                deliveries: row.5,
            }));
        }
    }

    /// Dead-letter every message whose lease expired on its last allowed delivery.
    async fn sweep(&self, tx: &mut Transaction<'static, Sqlite>) -> Result<(), QueueError> {
        let exhausted: Vec<(i64, String, Option<String>)> = sqlx::query_as(
            "SELECT m.id, m.queue, q.dead_letter
             FROM queue_messages m JOIN queue_queues q ON q.name = m.queue
             WHERE m.lease IS NOT NULL AND m.visible_at <= ? AND m.deliveries >= q.max_deliveries",
        )
        .bind(self.now_ms())
        .fetch_all(&mut **tx)
        .await
        .map_err(|e| self.err(e))?;
        for (id, queue, dead) in exhausted {
            self.dead_letter(tx, id, &queue, dead.as_deref(), "delivery_limit")
                .await?;
        }
        Ok(())
    }

    /// Move message `id` to the dead-letter queue (or drop it when there is none),
    /// recording where it came from and why, as RabbitMQ does.
    async fn dead_letter(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        id: i64,
        queue: &str,
        dead: Option<&str>,
        reason: &str,
    ) -> Result<(), QueueError> {
        if let Some(dead) = dead {
            let (exchange, headers): (String, String) =
                sqlx::query_as("SELECT exchange, headers FROM queue_messages WHERE id = ?")
                    .bind(id)
                    .fetch_one(&mut **tx)
                    .await
                    .map_err(|e| self.err(e))?;
            let mut headers = parse_headers(&headers);
            if !headers.contains_key(FIRST_DEATH_REASON) {
                headers.insert(FIRST_DEATH_QUEUE.to_owned(), queue.to_owned());
                headers.insert(FIRST_DEATH_REASON.to_owned(), reason.to_owned());
                headers.insert(FIRST_DEATH_EXCHANGE.to_owned(), exchange);
            }
            let now = self.now_ms();
            sqlx::query(
                "INSERT INTO queue_messages
                   (queue, message_id, exchange, routing_key, body, headers, enqueued_at, visible_at)
                 SELECT ?, message_id, exchange, routing_key, body, ?, ?, ?
                 FROM queue_messages WHERE id = ?",
            )
            .bind(dead)
            .bind(headers_json(&headers))
            .bind(now)
            .bind(now)
            .bind(id)
            .execute(&mut **tx)
            .await
            .map_err(|e| self.err(e))?;
            tracing::info!(
                queue,
                dead_letter_queue = dead,
                reason,
                "message dead-lettered"
            );
        } else {
            tracing::warn!(
                queue,
                reason,
                "message dropped: the queue has no dead-letter queue"
            );
        }
        sqlx::query("DELETE FROM queue_messages WHERE id = ?")
            .bind(id)
            .execute(&mut **tx)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn renew(&self, id: i64, token: &str) -> Result<bool, QueueError> {
        let done =
            sqlx::query("UPDATE queue_messages SET visible_at = ? WHERE id = ? AND lease = ?")
                .bind(self.now_ms() + self.lease_ms())
                .bind(id)
                .bind(token)
                .execute(&self.inner.pool)
                .await
                .map_err(|e| self.err(e))?;
        Ok(done.rows_affected() == 1)
    }
}

fn parse_headers(json: &str) -> BTreeMap<String, String> {
    serde_json::from_str(json).unwrap_or_default()
}

fn headers_json(headers: &BTreeMap<String, String>) -> String {
    // A map of strings always serialises.
    serde_json::to_string(headers).unwrap_or_else(|_| "{}".to_owned())
}

impl Broker for SqliteBroker {
    async fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<(), QueueError> {
        validate_name("exchange", name)?;
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO queue_exchanges (name, kind) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(kind.as_str())
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let (have,): (String,) = sqlx::query_as("SELECT kind FROM queue_exchanges WHERE name = ?")
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        if have == kind.as_str() {
            Ok(())
        } else {
            Err(QueueError::Mismatch {
                what: format!("exchange {name:?}"),
                message: format!("type {have}, not {}", kind.as_str()),
            })
        }
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), QueueError> {
        spec.validate()?;
        let mut tx = self.begin().await?;
        if let Some(dead) = spec.dead_letter_queue() {
            let mut dlq = QueueSpec::new(dead).without_dead_letter();
            dlq.kind = spec.kind;
            self.declare_queue_in(&mut tx, &dlq).await?;
        }
        self.declare_queue_in(&mut tx, spec).await?;
        tx.commit().await.map_err(|e| self.err(e))
    }

    async fn bind(&self, queue: &str, exchange: &str, key: &str) -> Result<(), QueueError> {
        if exchange.is_empty() {
            return Err(QueueError::Invalid(format!(
                "cannot bind queue {queue:?} to the default exchange"
            )));
        }
        let mut tx = self.begin().await?;
        let found: Option<(String,)> =
            sqlx::query_as("SELECT kind FROM queue_exchanges WHERE name = ?")
                .bind(exchange)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        if found.is_none() {
            return Err(QueueError::NotFound {
                what: format!("exchange {exchange:?}"),
            });
        }
        let found: Option<(String,)> =
            sqlx::query_as("SELECT name FROM queue_queues WHERE name = ?")
                .bind(queue)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        if found.is_none() {
            return Err(QueueError::NotFound {
                what: format!("queue {queue:?}"),
            });
        }
        sqlx::query("INSERT OR IGNORE INTO queue_bindings (exchange, queue, key) VALUES (?, ?, ?)")
            .bind(exchange)
            .bind(queue)
            .bind(key)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        options: &PublishOptions,
    ) -> Result<(), QueueError> {
        let mut tx = self.begin().await?;
        let mut targets = BTreeSet::new();
        if exchange.is_empty() {
            let found: Option<(String,)> =
                sqlx::query_as("SELECT name FROM queue_queues WHERE name = ?")
                    .bind(routing_key)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| self.err(e))?;
            targets.extend(found.map(|(q,)| q));
        } else {
            let found: Option<(String,)> =
                sqlx::query_as("SELECT kind FROM queue_exchanges WHERE name = ?")
                    .bind(exchange)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| self.err(e))?;
            let Some((kind,)) = found else {
                return Err(QueueError::NotFound {
                    what: format!("exchange {exchange:?}"),
                });
            };
            let bindings: Vec<(String, String)> =
                sqlx::query_as("SELECT queue, key FROM queue_bindings WHERE exchange = ?")
                    .bind(exchange)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(|e| self.err(e))?;
            let topic = kind == ExchangeKind::Topic.as_str();
            targets.extend(
                bindings
                    .into_iter()
                    .filter(|(_, key)| {
                        if topic {
                            topic::matches(key, routing_key)
                        } else {
                            key == routing_key
                        }
                    })
                    .map(|(queue, _)| queue),
            );
        }
        if targets.is_empty() {
            // Dropping the transaction rolls it back; nothing was written anyway.
            return if options.mandatory {
                Err(QueueError::Unroutable {
                    exchange: exchange.to_owned(),
                    routing_key: routing_key.to_owned(),
                })
            } else {
                Ok(())
            };
        }
        let now = self.now_ms();
        let headers = headers_json(&options.headers);
        for queue in &targets {
            sqlx::query(
                "INSERT INTO queue_messages
                   (queue, message_id, exchange, routing_key, body, headers, enqueued_at, visible_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(queue)
            .bind(&options.message_id)
            .bind(exchange)
            .bind(routing_key)
            .bind(body)
            .bind(&headers)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Consumer, QueueError> {
        if !self.queue_exists(queue).await? {
            return Err(QueueError::NotFound {
                what: format!("queue {queue:?}"),
            });
        }
        let permits = if prefetch == 0 {
            Semaphore::MAX_PERMITS
        } else {
            usize::from(prefetch)
        };
        Ok(Consumer {
            inner: ConsumerInner::Sqlite(SqliteConsumer {
                broker: self.clone(),
                queue: queue.to_owned(),
                permits: Arc::new(Semaphore::new(permits)),
            }),
        })
    }

    async fn ready_count(&self, queue: &str) -> Result<u64, QueueError> {
        if !self.queue_exists(queue).await? {
            return Err(QueueError::NotFound {
                what: format!("queue {queue:?}"),
            });
        }
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM queue_messages WHERE queue = ? AND visible_at <= ?",
        )
        .bind(queue)
        .bind(self.now_ms())
        .fetch_one(&self.inner.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn delete_queue(&self, name: &str) -> Result<(), QueueError> {
        let mut tx = self.begin().await?;
        for statement in [
            "DELETE FROM queue_messages WHERE queue = ?",
            "DELETE FROM queue_bindings WHERE queue = ?",
            "DELETE FROM queue_queues WHERE name = ?",
        ] {
            sqlx::query(statement)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }

    async fn delete_exchange(&self, name: &str) -> Result<(), QueueError> {
        let mut tx = self.begin().await?;
        for statement in [
            "DELETE FROM queue_bindings WHERE exchange = ?",
            "DELETE FROM queue_exchanges WHERE name = ?",
        ] {
            sqlx::query(statement)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }
}

/// A polling consumer of one queue of the embedded broker.
pub(crate) struct SqliteConsumer {
    broker: SqliteBroker,
    queue: String,
    /// One permit per unsettled delivery: this is how prefetch is enforced.
    permits: Arc<Semaphore>,
}

impl SqliteConsumer {
    pub(crate) fn queue(&self) -> &str {
        &self.queue
    }

    pub(crate) async fn next_until(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<Delivery>, QueueError> {
        let permit =
            match tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned()).await {
                Err(_) => return Ok(None),
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => {
                    return Err(QueueError::Invalid(format!(
                        "consumer of queue {:?} is closed",
                        self.queue
                    )));
                }
            };
        let mut pause = POLL_MIN;
        loop {
            if let Some(claimed) = self.broker.claim(&self.queue).await? {
                return Ok(Some(self.delivery(claimed, permit)));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    fn delivery(&self, claimed: Claimed, permit: OwnedSemaphorePermit) -> Delivery {
        let renewal = tokio::spawn(keep_lease(
            self.broker.clone(),
            self.queue.clone(),
            claimed.id,
            claimed.token.clone(),
        ));
        Delivery {
            body: claimed.body,
            exchange: claimed.exchange,
            routing_key: claimed.routing_key,
            message_id: claimed.message_id,
            headers: parse_headers(&claimed.headers),
            delivery_count: u32::try_from(claimed.deliveries).unwrap_or(u32::MAX),
            settle: Some(Settle::Sqlite(SqliteSettle {
                broker: self.broker.clone(),
                queue: self.queue.clone(),
                id: claimed.id,
                token: claimed.token,
                renewal,
                _permit: permit,
            })),
        }
    }
}

/// Renew a delivery's lease every third of the lease time until the task is aborted
/// (the delivery was settled or dropped) or the lease turns out to be lost.
async fn keep_lease(broker: SqliteBroker, queue: String, id: i64, token: String) {
    let every = broker.inner.lease / 3;
    loop {
        tokio::time::sleep(every).await;
        match broker.renew(id, &token).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    queue,
                    "lost the lease of a delivery; it will be delivered again"
                );
                return;
            }
            // Keep trying: the lease still has two thirds to run.
            Err(e) => tracing::warn!(queue, "renewing a delivery's lease failed: {e}"),
        }
    }
}

/// How a delivery of the embedded broker is settled: by its row id and lease token.
pub(crate) struct SqliteSettle {
    broker: SqliteBroker,
    queue: String,
    id: i64,
    token: String,
    renewal: JoinHandle<()>,
    /// Released when the delivery is settled or dropped, freeing a prefetch slot.
    _permit: OwnedSemaphorePermit,
}

impl Drop for SqliteSettle {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

impl SqliteSettle {
    fn lost(&self) -> QueueError {
        QueueError::DeliveryLost {
            queue: self.queue.clone(),
            message: "its lease expired and it was delivered again".into(),
        }
    }

    pub(crate) async fn ack(self) -> Result<(), QueueError> {
        self.renewal.abort();
        let b = &self.broker;
        let done = sqlx::query("DELETE FROM queue_messages WHERE id = ? AND lease = ?")
            .bind(self.id)
            .bind(&self.token)
            .execute(&b.inner.pool)
            .await
            .map_err(|e| b.err(e))?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(self.lost())
        }
    }

    /// Acknowledge `settles` in one statement per 400 (one each when they come from
    /// different brokers); a delivery whose lease lapsed meanwhile makes it an error, as
    /// [`SqliteSettle::ack`] does, after the others are gone.
    pub(crate) async fn ack_many(settles: Vec<SqliteSettle>) -> Result<(), QueueError> {
        let Some(first) = settles.first() else {
            return Ok(());
        };
        if !settles
            .iter()
            .all(|s| Arc::ptr_eq(&s.broker.inner, &first.broker.inner))
        {
            for s in settles {
                s.ack().await?;
            }
            return Ok(());
        }
        for s in &settles {
            s.renewal.abort();
        }
        let b = first.broker.clone();
        let mut lost = None;
        for chunk in settles.chunks(400) {
            let pairs = vec!["(id = ? AND lease = ?)"; chunk.len()].join(" OR ");
            let sql = format!("DELETE FROM queue_messages WHERE {pairs}");
            let mut q = sqlx::query(&sql);
            for s in chunk {
                q = q.bind(s.id).bind(&s.token);
            }
            let done = q.execute(&b.inner.pool).await.map_err(|e| b.err(e))?;
            if done.rows_affected() != chunk.len() as u64 {
                lost = Some(chunk[0].lost());
            }
        }
        lost.map_or(Ok(()), Err)
    }

    pub(crate) async fn nack_requeue(self) -> Result<(), QueueError> {
        self.settle(false).await
    }

    pub(crate) async fn reject(self) -> Result<(), QueueError> {
        self.settle(true).await
    }

    async fn settle(self, reject: bool) -> Result<(), QueueError> {
        self.renewal.abort();
        let b = &self.broker;
        let mut tx = b.begin().await?;
        let held: Option<(i64, Option<i64>, Option<String>)> = sqlx::query_as(
            "SELECT m.deliveries, q.max_deliveries, q.dead_letter
             FROM queue_messages m LEFT JOIN queue_queues q ON q.name = m.queue
             WHERE m.id = ? AND m.lease = ?",
        )
        .bind(self.id)
        .bind(&self.token)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| b.err(e))?;
        let Some((deliveries, max, dead)) = held else {
            return Err(self.lost());
        };
        if reject {
            b.dead_letter(&mut tx, self.id, &self.queue, dead.as_deref(), "rejected")
                .await?;
        } else if max.is_some_and(|m| deliveries >= m) {
            b.dead_letter(
                &mut tx,
                self.id,
                &self.queue,
                dead.as_deref(),
                "delivery_limit",
            )
            .await?;
        } else {
            sqlx::query("UPDATE queue_messages SET lease = NULL, visible_at = ? WHERE id = ?")
                .bind(b.now_ms())
                .bind(self.id)
                .execute(&mut *tx)
                .await
                .map_err(|e| b.err(e))?;
        }
        tx.commit().await.map_err(|e| b.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn memory() -> SqliteBroker {
        let url = RedactedUrl::parse("sqlite::memory:").unwrap();
        SqliteBroker::open(&url, &BrokerSettings::default())
            .await
            .unwrap()
    }

    async fn take(c: &mut Consumer) -> Option<Delivery> {
        c.next_timeout(Duration::ZERO).await.unwrap()
    }

    #[tokio::test]
    async fn direct_topic_and_default_exchange_routing() {
        let b = memory().await;
        for q in ["a", "b", "c"] {
            b.declare_queue(&QueueSpec::new(q)).await.unwrap();
        }
        b.declare_exchange("d", ExchangeKind::Direct).await.unwrap();
        b.declare_exchange("t", ExchangeKind::Topic).await.unwrap();
        b.bind("a", "d", "k").await.unwrap();
        b.bind("b", "t", "lims.*").await.unwrap();
        b.bind("c", "t", "#").await.unwrap();
        // Bound twice with matching patterns: still one copy.
        b.bind("c", "t", "lims.#").await.unwrap();
        let o = PublishOptions::new();
        b.publish("d", "k", b"1", &o).await.unwrap();
        b.publish("t", "lims.x", b"2", &o).await.unwrap();
        b.publish("", "a", b"3", &o).await.unwrap();
        assert_eq!(b.ready_count("a").await.unwrap(), 2);
        assert_eq!(b.ready_count("b").await.unwrap(), 1);
        assert_eq!(b.ready_count("c").await.unwrap(), 1);
        let err = b.publish("d", "other", b"x", &o).await.unwrap_err();
        assert!(matches!(err, QueueError::Unroutable { .. }), "{err}");
        b.publish("d", "other", b"x", &o.clone().not_mandatory())
            .await
            .unwrap();
        let err = b.publish("nope", "k", b"x", &o).await.unwrap_err();
        assert!(matches!(err, QueueError::NotFound { .. }), "{err}");
    }

    #[tokio::test]
    async fn redeclaring_with_other_settings_is_a_mismatch() {
        let b = memory().await;
        b.declare_queue(&QueueSpec::new("q").with_max_deliveries(3))
            .await
            .unwrap();
        b.declare_queue(&QueueSpec::new("q").with_max_deliveries(3))
            .await
            .unwrap();
        let err = b
            .declare_queue(&QueueSpec::new("q").with_max_deliveries(4))
            .await
            .unwrap_err();
        assert!(matches!(err, QueueError::Mismatch { .. }), "{err}");
        b.declare_exchange("e", ExchangeKind::Direct).await.unwrap();
        let err = b
            .declare_exchange("e", ExchangeKind::Topic)
            .await
            .unwrap_err();
        assert!(matches!(err, QueueError::Mismatch { .. }), "{err}");
    }

    #[tokio::test]
    async fn expired_lease_makes_the_message_visible_and_the_old_holder_loses_it() {
        let b = memory().await;
        b.declare_queue(&QueueSpec::new("q")).await.unwrap();
        b.publish("", "q", b"m", &PublishOptions::new())
            .await
            .unwrap();
        let mut first = b.consume("q", 1).await.unwrap();
        let mut second = b.consume("q", 1).await.unwrap();
        let held = take(&mut first).await.unwrap();
        assert!(
            take(&mut second).await.is_none(),
            "leased message was visible"
        );
        // The lease (60 s) is renewed only every 20 s of real time, so moving the clock
        // past it stands for a consumer that died.
        b.advance_clock(Duration::from_secs(61));
        let again = take(&mut second).await.unwrap();
        assert_eq!(again.delivery_count, 2);
        let err = held.ack().await.unwrap_err();
        assert!(matches!(err, QueueError::DeliveryLost { .. }), "{err}");
        again.ack().await.unwrap();
        assert_eq!(b.ready_count("q").await.unwrap(), 0);
    }

    #[tokio::test]
    async fn exhausted_message_of_a_dead_consumer_is_dead_lettered_on_the_next_claim() {
        let b = memory().await;
        b.declare_queue(&QueueSpec::new("q").with_max_deliveries(1))
            .await
            .unwrap();
        b.publish("", "q", b"m", &PublishOptions::new().message_id("m1"))
            .await
            .unwrap();
        let mut c = b.consume("q", 1).await.unwrap();
        let held = take(&mut c).await.unwrap();
        // Forget it without requeueing, as a crashed process would.
        if let Some(Settle::Sqlite(s)) = &held.settle {
            s.renewal.abort();
        }
        std::mem::forget(held);
        b.advance_clock(Duration::from_secs(61));
        let mut c = b.consume("q", 1).await.unwrap();
        assert!(take(&mut c).await.is_none());
        let mut dead = b.consume("q.dead", 1).await.unwrap();
        let d = take(&mut dead).await.unwrap();
        assert_eq!(d.message_id.as_deref(), Some("m1"));
        assert_eq!(d.headers[FIRST_DEATH_REASON], "delivery_limit");
        assert_eq!(d.headers[FIRST_DEATH_QUEUE], "q");
        assert_eq!(d.delivery_count, 1);
        d.ack().await.unwrap();
    }

    #[tokio::test]
    async fn reject_without_dead_letter_queue_drops() {
        let b = memory().await;
        b.declare_queue(&QueueSpec::new("q").without_dead_letter())
            .await
            .unwrap();
        b.publish("", "q", b"m", &PublishOptions::new())
            .await
            .unwrap();
        let mut c = b.consume("q", 1).await.unwrap();
        take(&mut c).await.unwrap().reject().await.unwrap();
        assert_eq!(b.ready_count("q").await.unwrap(), 0);
        assert!(!b.queue_exists("q.dead").await.unwrap());
    }

    #[tokio::test]
    async fn open_path_handles_spaces_and_a_second_opener_shares_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("with space/queue.db");
        let first = SqliteBroker::open_path(&path, &BrokerSettings::default())
            .await
            .unwrap();
        assert_eq!(std::path::Path::new(first.path()), path);
        first.declare_queue(&QueueSpec::new("q")).await.unwrap();
        first
            .publish("", "q", b"m", &PublishOptions::new())
            .await
            .unwrap();
        let second = SqliteBroker::open_path(&path, &BrokerSettings::default())
            .await
            .unwrap();
        assert_eq!(second.ready_count("q").await.unwrap(), 1);
    }

    #[test]
    fn busy_errors_are_temporary() {
        assert!(is_temporary(&sqlx::Error::PoolTimedOut));
        assert!(!is_temporary(&sqlx::Error::RowNotFound));
    }
}
