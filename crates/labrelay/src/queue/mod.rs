//! Message queues: one [`Broker`] trait and two implementations, RabbitMQ ([`amqp`]) and
//! an embedded SQLite broker ([`sqlite`]), chosen at run time from the `[queue] url`.
//!
//! This module owns the delivery contract every tool relies on, whichever backend runs:
//!
//! - **Nothing is lost.** [`Broker::publish`] returns only after the broker has stored
//!   the message (RabbitMQ publisher confirm; SQLite commit). A consumer acknowledges a
//!   [`Delivery`] only after its effect is committed; until then a crash of the consumer,
//!   of the connection or of the broker makes the message come back.
//! - **At least once, not exactly once.** A message may be delivered twice (a publish is
//!   repeated when its confirmation was lost; a consumer may crash after its effect but
//!   before its ack), so consumers make their effects idempotent, e.g. by `message_id`.
//! - **Poison messages do not loop forever.** A queue declared with
//!   [`QueueSpec::with_max_deliveries`] moves a message that was delivered that many
//!   times without an ack into its dead-letter queue `<queue>.dead`
//!   ([`dead_letter_name`]); [`Delivery::reject`] moves it there at once.
//! - Routing follows AMQP 0-9-1: `direct` and `topic` exchanges (`*` one word, `#` zero
//!   or more), and the default exchange `""` routes to the queue named by the key.
//!
//! The module does not know what messages mean; tools do. It never logs message bodies
//! or a URL's password (only [`RedactedUrl`] Display). (lapin itself logs a message the
//! broker returned, body included, at WARN under the target `lapin::returned_messages`;
//! the logging filter should hold that target at ERROR.)
//!
//! Tools pick the backend at run time: `AnyBroker::from_config(&config)` and then the
//! [`Broker`] methods; the backends are also usable directly.

pub mod amqp;
pub mod sqlite;
mod topic;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use crate::config::{Config, ConfigError, QueueConfig};
use crate::exit::Exit;
use crate::secret::{RedactedUrl, Secret, SecretError, SecretSpec};

pub use amqp::AmqpBroker;
pub use sqlite::SqliteBroker;

/// Queue errors. None of them contains a password or a message body.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The URL's scheme names no backend.
    #[error("unsupported queue URL {url}: expected amqp://, amqps:// or sqlite://PATH")]
    UnsupportedUrl {
        /// Redacted URL.
        url: String,
    },
    /// The URL or another setting is malformed.
    #[error("invalid queue configuration {what}: {message}")]
    InvalidConfig {
        /// The redacted URL or the setting.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// Resolving `[queue]` from the configuration failed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The `[queue] password` secret could not be resolved.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The broker refused the credentials.
    #[error("the queue broker at {url} refused the login: {message}")]
    Auth {
        /// Redacted URL.
        url: String,
        /// The broker's reason.
        message: String,
    },
    /// The broker could not be reached (at start, or again within the reconnect time).
    #[error("cannot reach the queue broker at {url}: {message}")]
    Connect {
        /// Redacted URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The connection broke and could not be re-established in time.
    #[error("lost the connection to the queue broker at {url}: {message}")]
    ConnectionLost {
        /// Redacted URL.
        url: String,
        /// Why.
        message: String,
    },
    /// A delivery can no longer be settled by this consumer: its connection dropped or its
    /// lease expired. The broker delivers the message again, so the caller just moves on.
    #[error(
        "delivery from queue {queue} is no longer held by this consumer ({message}); it will be delivered again"
    )]
    DeliveryLost {
        /// The queue.
        queue: String,
        /// Why.
        message: String,
    },
    /// A mandatory message matched no queue.
    #[error("message to exchange {exchange:?} with routing key {routing_key:?} matched no queue")]
    Unroutable {
        /// The exchange (`""` is the default exchange).
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
    /// The broker refused to store a message (RabbitMQ nack) and kept refusing.
    #[error(
        "the queue broker refused the message to exchange {exchange:?} with routing key {routing_key:?}"
    )]
    Refused {
        /// The exchange.
        exchange: String,
        /// The routing key.
        routing_key: String,
    },
    /// An exchange or queue does not exist.
    #[error("not found: {what}")]
    NotFound {
        /// e.g. `exchange "jobs"`.
        what: String,
    },
    /// An exchange or queue exists with different settings.
    #[error("{what} already exists with different settings: {message}")]
    Mismatch {
        /// e.g. `queue "jobs"`.
        what: String,
        /// The difference.
        message: String,
    },
    /// A consumer was cancelled by the broker (its queue was deleted).
    #[error("the consumer of queue {queue} was cancelled by the broker")]
    Cancelled {
        /// The queue.
        queue: String,
    },
    /// A request the broker cannot carry out (bad name, unsupported combination).
    #[error("invalid queue request: {0}")]
    Invalid(String),
    /// Any other error reported by RabbitMQ.
    #[error("queue broker at {url}: {message}")]
    Broker {
        /// Redacted URL.
        url: String,
        /// The broker's or client's message.
        message: String,
    },
    /// An error of the embedded queue's database.
    #[error("embedded queue {path}: {source}")]
    Sqlite {
        /// The database file.
        path: String,
        /// The database error.
        source: sqlx::Error,
    },
}

impl QueueError {
    /// The exit status this error maps to: 75 when running again later may work (broker
    /// unreachable, connection lost, database busy), 78 for configuration, else 1.
    pub fn exit(&self) -> Exit {
        match self {
            QueueError::UnsupportedUrl { .. }
            | QueueError::InvalidConfig { .. }
            | QueueError::Config(_)
            | QueueError::Secret(_)
            | QueueError::Auth { .. }
            | QueueError::Mismatch { .. } => Exit::Config,
            QueueError::Connect { .. }
            | QueueError::ConnectionLost { .. }
            | QueueError::DeliveryLost { .. }
            | QueueError::Refused { .. } => Exit::TempFail,
            QueueError::Sqlite { source, .. } if sqlite::is_temporary(source) => Exit::TempFail,
            QueueError::Unroutable { .. }
            | QueueError::NotFound { .. }
            | QueueError::Cancelled { .. }
            | QueueError::Invalid(_)
            | QueueError::Broker { .. }
            | QueueError::Sqlite { .. } => Exit::Failed,
        }
    }
}

/// The type of an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    /// Routes to the queues bound with a key equal to the message's routing key.
    Direct,
    /// Routes by dot-separated patterns: `*` matches one word, `#` zero or more.
    Topic,
}

impl ExchangeKind {
    /// The AMQP name of the type.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Topic => "topic",
        }
    }
}

/// How RabbitMQ stores a queue. The embedded broker stores every queue the same way but
/// remembers the kind, so that redeclaring with another kind fails on both backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum QueueKind {
    /// Replicated, durable; counts deliveries, so `max_deliveries` works (default).
    #[default]
    Quorum,
    /// Classic durable queue; RabbitMQ 3.10 does not count its deliveries, so it cannot
    /// have `max_deliveries`.
    Classic,
}

impl QueueKind {
    /// The value of RabbitMQ's `x-queue-type`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueKind::Quorum => "quorum",
            QueueKind::Classic => "classic",
        }
    }
}

/// The name of the dead-letter queue of `queue`.
pub fn dead_letter_name(queue: &str) -> String {
    format!("{queue}.dead")
}

/// Header naming the queue a dead-lettered message came from (as RabbitMQ sets it).
pub const FIRST_DEATH_QUEUE: &str = "x-first-death-queue";
/// Header giving why a message was dead-lettered: `rejected` or `delivery_limit`.
pub const FIRST_DEATH_REASON: &str = "x-first-death-reason";
/// Header naming the exchange a dead-lettered message was first published to.
pub const FIRST_DEATH_EXCHANGE: &str = "x-first-death-exchange";

/// A durable queue to declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// The queue name (non-empty; AMQP allows up to 255 bytes).
    pub name: String,
    /// A message delivered this many times without an ack is dead-lettered (or dropped
    /// when `dead_letter` is false). `None`: redeliver forever.
    pub max_deliveries: Option<u32>,
    /// Declare `<name>.dead` and route rejected and exhausted messages there.
    pub dead_letter: bool,
    /// RabbitMQ queue type.
    pub kind: QueueKind,
}

impl QueueSpec {
    /// A quorum queue with a dead-letter queue and no delivery limit.
    pub fn new(name: impl Into<String>) -> Self {
        QueueSpec {
            name: name.into(),
            max_deliveries: None,
            dead_letter: true,
            kind: QueueKind::Quorum,
        }
    }

    /// A queue with the delivery limit of `[queue] max_deliveries`.
    pub fn from_config(name: impl Into<String>, config: &QueueConfig) -> Self {
        QueueSpec::new(name).with_max_deliveries(config.max_deliveries)
    }

    /// Dead-letter a message after `n` deliveries (`n` ≥ 1).
    #[must_use]
    pub fn with_max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = Some(n);
        self
    }

    /// No dead-letter queue: rejected and exhausted messages are dropped.
    #[must_use]
    pub fn without_dead_letter(mut self) -> Self {
        self.dead_letter = false;
        self
    }

    /// A classic RabbitMQ queue instead of a quorum queue.
    #[must_use]
    pub fn classic(mut self) -> Self {
        self.kind = QueueKind::Classic;
        self
    }

    /// The dead-letter queue's name, if the queue has one.
    pub fn dead_letter_queue(&self) -> Option<String> {
        self.dead_letter.then(|| dead_letter_name(&self.name))
    }

    fn validate(&self) -> Result<(), QueueError> {
        validate_name("queue", &self.name)?;
        if self.max_deliveries == Some(0) {
            return Err(QueueError::Invalid(format!(
                "queue {:?}: max_deliveries must be at least 1",
                self.name
            )));
        }
        if self.max_deliveries.is_some() && self.kind == QueueKind::Classic {
            return Err(QueueError::Invalid(format!(
                "queue {:?}: max_deliveries needs a quorum queue",
                self.name
            )));
        }
        Ok(())
    }
}

fn validate_name(what: &str, name: &str) -> Result<(), QueueError> {
    if name.is_empty() || name.len() > 255 {
        return Err(QueueError::Invalid(format!(
            "{what} name {name:?} must be 1 to 255 bytes"
        )));
    }
    Ok(())
}

/// Options of one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOptions {
    /// An id consumers can deduplicate by (AMQP `message-id`).
    pub message_id: Option<String>,
    /// String headers (AMQP header table).
    pub headers: BTreeMap<String, String>,
    /// Fail with [`QueueError::Unroutable`] when no queue receives the message
    /// (default `true`: a message nobody will read is a lost message).
    pub mandatory: bool,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            message_id: None,
            headers: BTreeMap::new(),
            mandatory: true,
        }
    }
}

impl PublishOptions {
    /// Defaults: mandatory, no id, no headers.
    pub fn new() -> Self {
        PublishOptions::default()
    }

    /// Set the message id.
    #[must_use]
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Add a header.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Allow the message to be dropped when no queue matches.
    #[must_use]
    pub fn not_mandatory(mut self) -> Self {
        self.mandatory = false;
        self
    }
}

/// A message queue broker: [`AmqpBroker`], [`SqliteBroker`], or [`AnyBroker`] (either,
/// chosen by URL). Only this module implements it, since [`Consumer`] and [`Delivery`]
/// are built here.
///
/// Exchanges and queues are durable and messages persistent. Declarations are
/// idempotent: declaring again with the same settings is a no-op, with different
/// settings [`QueueError::Mismatch`].
pub trait Broker: Send + Sync {
    /// Declare a durable exchange.
    fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Declare a durable queue, and its dead-letter queue when `spec.dead_letter`.
    fn declare_queue(
        &self,
        spec: &QueueSpec,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Bind `queue` to `exchange` with a routing key (direct) or pattern (topic).
    fn bind(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Publish a persistent message and wait until the broker has stored it.
    ///
    /// `Ok` means the message is safe. After a connection failure the message is sent
    /// again (RabbitMQ), so consumers may see it twice; it is never lost once `Ok`.
    fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        options: &PublishOptions,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Start consuming `queue`, holding at most `prefetch` unsettled deliveries
    /// (0: no limit).
    fn consume(
        &self,
        queue: &str,
        prefetch: u16,
    ) -> impl Future<Output = Result<Consumer, QueueError>> + Send;

    /// Messages ready for delivery in `queue` (not counting unsettled deliveries).
    fn ready_count(&self, queue: &str) -> impl Future<Output = Result<u64, QueueError>> + Send;

    /// Delete a queue and its messages (not its dead-letter queue). Deleting a queue that
    /// does not exist is not an error.
    fn delete_queue(&self, name: &str) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Delete an exchange and its bindings. Not an error when it does not exist.
    fn delete_exchange(&self, name: &str) -> impl Future<Output = Result<(), QueueError>> + Send;
}

/// Settings for [`AnyBroker::connect`] that are not part of the URL.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// AMQP password, if not in the URL.
    pub password: Option<Secret>,
    /// Embedded queue: how long a delivery stays invisible to other consumers unless its
    /// consumer, still alive, renews it.
    pub lease: Duration,
    /// RabbitMQ: how long to keep reconnecting after a connection broke before failing
    /// with a temporary error.
    pub reconnect_for: Duration,
    /// RabbitMQ: the connection name shown in the management UI (default
    /// `labrelay <program> pid <pid>`).
    pub connection_name: Option<String>,
    /// RabbitMQ over `amqps://`: a PEM file of CA certificates trusted in addition to
    /// the system's (`[queue] ca_file`).
    pub ca_file: Option<std::path::PathBuf>,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        BrokerSettings {
            password: None,
            lease: Duration::from_mins(1),
            reconnect_for: Duration::from_mins(1),
            connection_name: None,
            ca_file: None,
        }
    }
}

impl BrokerSettings {
    /// Settings from `[queue]`, resolving the password secret.
    pub fn from_config(config: &QueueConfig) -> Result<Self, QueueError> {
        Ok(BrokerSettings {
            password: config
                .password
                .as_ref()
                .map(SecretSpec::resolve)
                .transpose()?,
            lease: Duration::from_secs(config.lease_secs.max(1)),
            ca_file: config.ca_file.clone(),
            ..BrokerSettings::default()
        })
    }
}

/// One message of [`AnyBroker::publish_batch`].
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The routing key.
    pub routing_key: String,
    /// The body.
    pub body: Vec<u8>,
    /// Id, headers, mandatory.
    pub options: PublishOptions,
}

/// A broker chosen at run time from a URL scheme: `amqp://`/`amqps://` (RabbitMQ) or
/// `sqlite://PATH` (embedded).
#[derive(Debug, Clone)]
pub enum AnyBroker {
    /// RabbitMQ.
    Amqp(AmqpBroker),
    /// Embedded SQLite broker.
    Sqlite(SqliteBroker),
}

impl AnyBroker {
    /// Connect to the broker of `[queue]` (URL default `sqlite://<data_dir>/queue.db`).
    pub async fn from_config(config: &Config) -> Result<Self, QueueError> {
        let url = config.queue_url()?;
        let settings = BrokerSettings::from_config(&config.queue)?;
        AnyBroker::connect(&url, &settings).await
    }

    /// Publish several messages to one exchange. RabbitMQ pipelines them (see
    /// [`AmqpBroker::publish_batch`]); the embedded broker stores them one by one. One
    /// entry per message: `false` when it was mandatory and no queue took it. After
    /// `Err`, any of them may be unconfirmed: publish them again (consumers deduplicate).
    pub async fn publish_batch(
        &self,
        exchange: &str,
        messages: &[Outgoing],
    ) -> Result<Vec<bool>, QueueError> {
        match self {
            AnyBroker::Amqp(b) => b.publish_batch(exchange, messages).await,
            AnyBroker::Sqlite(b) => {
                let mut routed = Vec::with_capacity(messages.len());
                for m in messages {
                    match b
                        .publish(exchange, &m.routing_key, &m.body, &m.options)
                        .await
                    {
                        Ok(()) => routed.push(true),
                        Err(QueueError::Unroutable { .. }) => routed.push(false),
                        Err(e) => return Err(e),
                    }
                }
                Ok(routed)
            }
        }
    }

    /// Close the broker's connections (RabbitMQ), so that nothing is left running while
    /// the process exits. Call it when done; using the broker afterwards reconnects.
    pub async fn close(&self) {
        match self {
            AnyBroker::Amqp(b) => b.close().await,
            AnyBroker::Sqlite(_) => {}
        }
    }

    /// Connect to the broker named by `url`.
    pub async fn connect(url: &RedactedUrl, settings: &BrokerSettings) -> Result<Self, QueueError> {
        match url.expose().scheme() {
            "amqp" | "amqps" => Ok(AnyBroker::Amqp(AmqpBroker::connect(url, settings).await?)),
            "sqlite" => Ok(AnyBroker::Sqlite(SqliteBroker::open(url, settings).await?)),
            _ => Err(QueueError::UnsupportedUrl {
                url: url.redacted(),
            }),
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $call:expr) => {
        match $self {
            AnyBroker::Amqp($b) => $call.await,
            AnyBroker::Sqlite($b) => $call.await,
        }
    };
}

impl Broker for AnyBroker {
    async fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<(), QueueError> {
        dispatch!(self, b => b.declare_exchange(name, kind))
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), QueueError> {
        dispatch!(self, b => b.declare_queue(spec))
    }

    async fn bind(&self, queue: &str, exchange: &str, key: &str) -> Result<(), QueueError> {
        dispatch!(self, b => b.bind(queue, exchange, key))
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        options: &PublishOptions,
    ) -> Result<(), QueueError> {
        dispatch!(self, b => b.publish(exchange, routing_key, body, options))
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Consumer, QueueError> {
        dispatch!(self, b => b.consume(queue, prefetch))
    }

    async fn ready_count(&self, queue: &str) -> Result<u64, QueueError> {
        dispatch!(self, b => b.ready_count(queue))
    }

    async fn delete_queue(&self, name: &str) -> Result<(), QueueError> {
        dispatch!(self, b => b.delete_queue(name))
    }

    async fn delete_exchange(&self, name: &str) -> Result<(), QueueError> {
        dispatch!(self, b => b.delete_exchange(name))
    }
}

/// A subscription to one queue, from [`Broker::consume`].
///
/// Dropping it stops the subscription; deliveries still held can be settled.
pub struct Consumer {
    inner: ConsumerInner,
}

enum ConsumerInner {
    // Boxed: the AMQP consumer is several times larger than the SQLite one.
    Amqp(Box<amqp::AmqpConsumer>),
    Sqlite(sqlite::SqliteConsumer),
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("queue", &self.queue())
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// Stop consuming and close the subscription's connection (RabbitMQ). Deliveries
    /// not settled yet come again.
    pub async fn close(self) {
        match self.inner {
            ConsumerInner::Amqp(c) => c.close().await,
            ConsumerInner::Sqlite(_) => {}
        }
    }

    /// The queue consumed.
    pub fn queue(&self) -> &str {
        match &self.inner {
            ConsumerInner::Amqp(c) => c.queue(),
            ConsumerInner::Sqlite(c) => c.queue(),
        }
    }

    /// Wait for the next delivery.
    ///
    /// RabbitMQ: when the connection drops, this reconnects and subscribes again (for up
    /// to [`BrokerSettings::reconnect_for`], then [`QueueError::ConnectionLost`]); the
    /// deliveries held at that moment can no longer be settled
    /// ([`QueueError::DeliveryLost`]) and come again.
    ///
    /// Cancelling this future never loses a message: one claimed by a cancelled call is
    /// delivered again (SQLite: after the lease).
    pub async fn next(&mut self) -> Result<Delivery, QueueError> {
        loop {
            if let Some(d) = self.next_timeout(Duration::from_hours(1)).await? {
                return Ok(d);
            }
        }
    }

    /// Like [`Consumer::next`], but `Ok(None)` when no message came within `timeout`.
    pub async fn next_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<Delivery>, QueueError> {
        let deadline = tokio::time::Instant::now() + timeout;
        match &mut self.inner {
            ConsumerInner::Amqp(c) => c.next_until(deadline).await,
            ConsumerInner::Sqlite(c) => c.next_until(deadline).await,
        }
    }
}

/// One delivered message. Settle it with [`ack`](Delivery::ack) once its effect is
/// committed, or with [`nack_requeue`](Delivery::nack_requeue) /
/// [`reject`](Delivery::reject).
///
/// Dropping it unsettled requeues it, like `nack_requeue` (best effort; if even that
/// fails, the broker returns it when the connection closes or the lease lapses).
pub struct Delivery {
    /// The message body, as published.
    pub body: Vec<u8>,
    /// The exchange it was published to (`""`: default exchange).
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// The publisher's message id.
    pub message_id: Option<String>,
    /// Headers. Dead-lettered messages carry [`FIRST_DEATH_QUEUE`] and
    /// [`FIRST_DEATH_REASON`]; non-string AMQP headers are converted when they are
    /// numbers or booleans and left out otherwise.
    pub headers: BTreeMap<String, String>,
    /// How many times this message has been delivered from this queue, this delivery
    /// included (1 on first delivery). RabbitMQ classic queues only know "redelivered",
    /// so there it is 1 or 2.
    pub delivery_count: u32,
    settle: Option<Settle>,
}

pub(crate) enum Settle {
    Amqp(amqp::AmqpSettle),
    Sqlite(sqlite::SqliteSettle),
}

impl std::fmt::Debug for Delivery {
    // The body is left out: it may be large or confidential.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("message_id", &self.message_id)
            .field("headers", &self.headers)
            .field("delivery_count", &self.delivery_count)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl Delivery {
    /// Whether an earlier delivery of this message was not acknowledged.
    pub fn is_redelivered(&self) -> bool {
        self.delivery_count > 1
    }

    /// Acknowledge: the message is done and removed.
    pub async fn ack(mut self) -> Result<(), QueueError> {
        match self.settle.take() {
            Some(Settle::Amqp(s)) => s.ack().await,
            Some(Settle::Sqlite(s)) => s.ack().await,
            None => Ok(()),
        }
    }

    /// Return the message to the queue for another delivery; once it has been delivered
    /// `max_deliveries` times it goes to the dead-letter queue instead.
    pub async fn nack_requeue(mut self) -> Result<(), QueueError> {
        match self.settle.take() {
            Some(Settle::Amqp(s)) => s.nack_requeue().await,
            Some(Settle::Sqlite(s)) => s.nack_requeue().await,
            None => Ok(()),
        }
    }

    /// Refuse the message for good: it goes to the dead-letter queue now (or is dropped
    /// when the queue has none).
    pub async fn reject(mut self) -> Result<(), QueueError> {
        match self.settle.take() {
            Some(Settle::Amqp(s)) => s.reject().await,
            Some(Settle::Sqlite(s)) => s.reject().await,
            None => Ok(()),
        }
    }
}

/// Acknowledge `deliveries` together, once their effect is committed: on RabbitMQ one
/// `basic.ack` with `multiple` when they are the oldest unsettled deliveries of their
/// channel (one each otherwise), on the embedded queue one DELETE. A consumer that
/// applies a batch in one transaction settles it with one round trip instead of one per
/// message.
pub async fn ack_all(deliveries: Vec<Delivery>) -> Result<(), QueueError> {
    let mut amqp = Vec::new();
    let mut sqlite = Vec::new();
    for mut d in deliveries {
        match d.settle.take() {
            Some(Settle::Amqp(s)) => amqp.push(s),
            Some(Settle::Sqlite(s)) => sqlite.push(s),
            None => {}
        }
    }
    amqp::AmqpSettle::ack_many(amqp).await?;
    sqlite::SqliteSettle::ack_many(sqlite).await
}

impl Drop for Delivery {
    fn drop(&mut self) {
        let Some(settle) = self.settle.take() else {
            return;
        };
        // Requeue in the background so the message is not stuck until the connection
        // closes or the lease lapses. Without a runtime (process exiting) the broker's
        // own recovery still returns it.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let result = match settle {
                Settle::Amqp(s) => s.nack_requeue().await,
                Settle::Sqlite(s) => s.nack_requeue().await,
            };
            if let Err(e) = result {
                tracing::debug!("requeueing a dropped delivery failed: {e}");
            }
        });
    }
}

fn connection_name(settings: &BrokerSettings) -> String {
    settings.connection_name.clone().unwrap_or_else(|| {
        let program = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "unknown".to_owned());
        format!("labrelay {program} pid {}", std::process::id())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_classes() {
        let url = "amqp://u:****@h/".to_owned();
        assert_eq!(
            QueueError::Connect {
                url: url.clone(),
                message: "refused".into()
            }
            .exit(),
            Exit::TempFail
        );
        assert_eq!(
            QueueError::ConnectionLost {
                url: url.clone(),
                message: "reset".into()
            }
            .exit(),
            Exit::TempFail
        );
        assert_eq!(QueueError::UnsupportedUrl { url }.exit(), Exit::Config);
        assert_eq!(
            QueueError::Unroutable {
                exchange: String::new(),
                routing_key: "q".into()
            }
            .exit(),
            Exit::Failed
        );
        let busy = QueueError::Sqlite {
            path: "q.db".into(),
            source: sqlx::Error::PoolTimedOut,
        };
        assert_eq!(busy.exit(), Exit::TempFail);
    }

    #[test]
    fn classify_finds_queue_errors() {
        let e = anyhow::Error::new(QueueError::UnsupportedUrl {
            url: "redis://h/".into(),
        })
        .context("connecting");
        assert_eq!(crate::exit::classify(&e), Exit::Config);
    }

    #[test]
    fn spec_validation() {
        assert!(QueueSpec::new("").validate().is_err());
        assert!(
            QueueSpec::new("q")
                .with_max_deliveries(0)
                .validate()
                .is_err()
        );
        assert!(
            QueueSpec::new("q")
                .with_max_deliveries(3)
                .classic()
                .validate()
                .is_err()
        );
        assert!(
            QueueSpec::new("q")
                .with_max_deliveries(3)
                .validate()
                .is_ok()
        );
        assert_eq!(
            QueueSpec::new("q").dead_letter_queue().as_deref(),
            Some("q.dead")
        );
        assert_eq!(
            QueueSpec::new("q")
                .without_dead_letter()
                .dead_letter_queue(),
            None
        );
    }

    #[tokio::test]
    async fn default_config_opens_the_embedded_queue_in_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.paths.data_dir = Some(dir.path().join("data"));
        let broker = AnyBroker::from_config(&config).await.unwrap();
        let AnyBroker::Sqlite(b) = &broker else {
            panic!("expected the embedded broker, got {broker:?}");
        };
        assert_eq!(
            std::path::Path::new(b.path()),
            dir.path().join("data/queue.db")
        );
        broker.declare_queue(&QueueSpec::new("q")).await.unwrap();
        broker
            .publish("", "q", b"x", &PublishOptions::new())
            .await
            .unwrap();
        assert_eq!(broker.ready_count("q").await.unwrap(), 1);
    }

    #[tokio::test]
    async fn unknown_scheme_is_a_config_error_without_the_password() {
        let url = RedactedUrl::parse("redis://user:hunter2@127.0.0.1:6379/0").unwrap();
        let err = AnyBroker::connect(&url, &BrokerSettings::default())
            .await
            .unwrap_err();
        assert_eq!(err.exit(), Exit::Config);
        let shown = err.to_string();
        assert!(shown.contains("redis://user:****@127.0.0.1"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}

impl crate::exit::ExitClass for QueueError {
    fn exit_class(&self) -> Exit {
        self.exit()
    }
}
crate::exit_class!(QueueError);
