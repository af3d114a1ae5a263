//! RabbitMQ through lapin.
//!
//! How the [contract](super) is kept:
//!
//! - **Publishing** goes through one channel in confirm mode, one message at a time,
//!   with `mandatory` set by default and delivery mode 2 (persistent). `publish` returns
//!   when the broker acks; a message the broker returned (no queue matched) is
//!   [`QueueError::Unroutable`]. When the connection breaks before the ack, the broker
//!   reconnects with backoff (up to [`BrokerSettings::reconnect_for`]) and publishes
//!   the same message again: a duplicate is possible, a loss is not. A broker nack is
//!   retried the same way.
//! - **Queues** are quorum queues by default: replicated, on disk, and they count
//!   deliveries, which is what `max_deliveries` needs (`x-delivery-limit`). Dead-lettering
//!   goes through the default exchange to `<queue>.dead` with the `at-least-once`
//!   strategy, so a message is not lost between the two queues either.
//! - **Consumers** each have their own connection (RabbitMQ throttles publishing
//!   connections under memory pressure; consumers must keep acking meanwhile) and one
//!   channel with `basic.qos(prefetch)`. When the connection drops, [`Consumer::next`]
//!   reconnects and subscribes again; deliveries held at that moment were requeued by
//!   the broker and settling them fails with [`QueueError::DeliveryLost`].
//!
//! Connections are named (`labrelay <program> pid <pid>`) so they can be told apart in
//! the management UI. Errors and logs show the URL only redacted.
//!
//! **TLS.** `amqps://` trusts the system's root certificates plus those of
//! [`BrokerSettings::ca_file`] (`[queue] ca_file`, a private CA), read and checked before
//! the first connection. A certificate none of them vouches for is a configuration
//! error (exit 78), not a reason to reconnect.
//!
//! **Runtime.** lapin runs on the caller's tokio runtime: its tasks are spawned with
//! `tokio-executor-trait` and its socket and timers use tokio's reactor
//! (`tokio-reactor-trait`), so lapin starts no async-global-executor threads and no
//! async-io reactor thread. What remains of lapin 2's own design is one `lapin-io-loop`
//! thread per connection, which drives the socket, and the blocking TCP/TLS connect,
//! which runs on tokio's blocking pool. A connection therefore lives as long as the
//! runtime it was opened on (tools have one, made by `cli::run_main`); its sockets are
//! registered with that runtime's reactor. The lock file still lists async-io 1 and 2,
//! async-global-executor and async-executor: lapin 2.5 depends on
//! `async-global-executor-trait` and `async-reactor-trait` without a feature to turn
//! them off, so they are compiled (and unused). lapin 3 makes the runtime a feature
//! (`tokio`, through async-rs); moving to it changes lapin's API and is left for its
//! own change.
//!
//! [`Consumer::next`]: super::Consumer::next

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::publisher_confirm::Confirmation;
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{
    Broker, BrokerSettings, Consumer, ConsumerInner, Delivery, ExchangeKind, PublishOptions,
    QueueError, QueueKind, QueueSpec, Settle, connection_name, validate_name,
};
use crate::config::CaCerts;
use crate::secret::RedactedUrl;

/// The longest pause between reconnection attempts: the pauses follow the one retry
/// policy ([`crate::retry::Backoff`]: `[retry]` base delay, doubling, full jitter), up
/// to this, until [`BrokerSettings::reconnect_for`] has passed, so that a broker that is
/// back is noticed within seconds.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

fn backoff(deadline: Instant) -> crate::retry::Backoff {
    crate::retry::Backoff::until(deadline.into_std()).max_pause(BACKOFF_MAX)
}
/// A confirm that takes longer than this is treated as a broken connection.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Heartbeat asked for unless the URL sets one: a dead peer is noticed within ~2× this.
const HEARTBEAT_SECS: u16 = 15;
const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// A handshake or request the broker has not answered within this counts as a broken
/// connection. The TCP connect timeout alone leaves a broker that accepts connections
/// but never answers (a wedged node) hanging its clients forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `request`, or a timed-out I/O error (transient) when the broker has not answered
/// within [`REQUEST_TIMEOUT`].
async fn answered<T>(request: impl Future<Output = lapin::Result<T>>) -> lapin::Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(result) => result,
        Err(_) => Err(lapin::Error::IOError(Arc::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no answer from the broker within {} s",
                REQUEST_TIMEOUT.as_secs()
            ),
        )))),
    }
}
const DELIVERY_COUNT: &str = "x-delivery-count";

/// A RabbitMQ broker. Cloning is cheap and shares the publishing connection.
#[derive(Clone)]
pub struct AmqpBroker {
    shared: Arc<Shared>,
    /// The publishing connection and its confirm-mode channel; declarations open
    /// short-lived channels on the same connection. `None` until needed after a failure.
    publisher: Arc<Mutex<Option<Publisher>>>,
}

struct Shared {
    /// Holds the password: never formatted.
    uri: AMQPUri,
    /// The redacted URL, for errors and logs.
    shown: String,
    properties: ConnectionProperties,
    /// Connection name prefix; each connection adds its role.
    name: String,
    reconnect_for: Duration,
    /// `amqps://`: extra trusted CA certificates (PEM), from `ca_file`.
    ca_pem: Option<String>,
}

/// The AMQP properties of a publish: persistent, timestamped, id and headers.
fn properties(options: &PublishOptions) -> BasicProperties {
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_timestamp(u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0));
    if let Some(id) = &options.message_id {
        properties = properties.with_message_id(ShortString::from(id.as_str()));
    }
    if !options.headers.is_empty() {
        properties = properties.with_headers(header_table(&options.headers));
    }
    properties
}

struct Publisher {
    connection: Connection,
    channel: Channel,
}

impl Publisher {
    fn healthy(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }
}

impl std::fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("url", &self.shared.shown)
            .finish_non_exhaustive()
    }
}

/// Errors that a new connection or channel may cure.
fn is_transient(e: &lapin::Error) -> bool {
    match e {
        lapin::Error::IOError(_)
        | lapin::Error::InvalidConnectionState(_)
        | lapin::Error::InvalidChannelState(_)
        | lapin::Error::MissingHeartbeatError
        | lapin::Error::ParsingError(_) => true,
        // Hard errors close the connection (320 CONNECTION_FORCED when the broker shuts
        // down); soft errors are about the request and would fail again.
        lapin::Error::ProtocolError(p) => matches!(p.kind(), AMQPErrorKind::Hard(_)),
        _ => false,
    }
}

fn soft_error(e: &lapin::Error) -> Option<(AMQPSoftError, String)> {
    match e {
        lapin::Error::ProtocolError(p) => match p.kind() {
            AMQPErrorKind::Soft(s) => Some((s.clone(), p.get_message().to_string())),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// What a failed request was, to name it in the error.
enum Request<'a> {
    Declare(String),
    Other(&'a str),
}

impl Shared {
    /// One connection attempt; `role` ("publisher", "consumer of Q") is appended to
    /// the connection name shown in the management UI.
    async fn connect_once(&self, role: &str) -> Result<Connection, lapin::Error> {
        let properties = self
            .properties
            .clone()
            .with_connection_name(LongString::from(format!("{} ({role})", self.name)))
            // The runtime we are called on (see the module documentation).
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio);
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.ca_pem.clone(),
        };
        answered(Connection::connect_uri_with_config(
            self.uri.clone(),
            properties,
            tls,
        ))
        .await
    }

    /// Connect, retrying transient failures until `deadline`.
    async fn connect_until(&self, deadline: Instant) -> Result<Connection, QueueError> {
        let mut backoff = backoff(deadline);
        loop {
            match self.connect_once("publisher").await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    let e = self.connect_error(&e);
                    if !matches!(e, QueueError::Connect { .. }) {
                        return Err(e);
                    }
                    let Some(pause) = backoff.pause() else {
                        return Err(e);
                    };
                    tracing::info!(url = %self.shown, "reconnecting in {pause:?}: {e}");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    fn connect_error(&self, e: &lapin::Error) -> QueueError {
        match soft_error(e) {
            Some((AMQPSoftError::ACCESSREFUSED, message)) => QueueError::Auth {
                url: self.shown.clone(),
                message,
            },
            Some((AMQPSoftError::NOTFOUND, message)) => QueueError::InvalidConfig {
                what: self.shown.clone(),
                message,
            },
            // A certificate the trusted roots do not vouch for (or for another name)
            // will not get better by reconnecting: that is configuration.
            _ if e.to_string().to_ascii_lowercase().contains("certificate") => {
                QueueError::InvalidConfig {
                    what: self.shown.clone(),
                    message: format!(
                        "TLS: {e} (for a private CA, set [queue] ca_file to its PEM file)"
                    ),
                }
            }
            _ => QueueError::Connect {
                url: self.shown.clone(),
                message: e.to_string(),
            },
        }
    }

    fn error(&self, e: &lapin::Error, request: &Request<'_>) -> QueueError {
        if is_transient(e) {
            return QueueError::ConnectionLost {
                url: self.shown.clone(),
                message: e.to_string(),
            };
        }
        match (soft_error(e), request) {
            (Some((AMQPSoftError::NOTFOUND, message)), _) => QueueError::NotFound {
                what: message.trim_start_matches("NOT_FOUND - ").to_owned(),
            },
            (Some((AMQPSoftError::PRECONDITIONFAILED, message)), Request::Declare(what)) => {
                QueueError::Mismatch {
                    what: what.clone(),
                    message: message
                        .trim_start_matches("PRECONDITION_FAILED - ")
                        .to_owned(),
                }
            }
            (_, Request::Declare(what)) => QueueError::Broker {
                url: self.shown.clone(),
                message: format!("declaring {what}: {e}"),
            },
            (_, Request::Other(what)) => QueueError::Broker {
                url: self.shown.clone(),
                message: format!("{what}: {e}"),
            },
        }
    }
}

impl AmqpBroker {
    /// Connect to `amqp://` or `amqps://` `url`. The first connection is tried once, so
    /// an unreachable broker fails fast with [`QueueError::Connect`] (exit 75).
    pub async fn connect(url: &RedactedUrl, settings: &BrokerSettings) -> Result<Self, QueueError> {
        let shown = url.redacted();
        let ca = CaCerts::load_optional("queue.ca_file", settings.ca_file.as_deref())?;
        let mut uri: AMQPUri =
            url.expose()
                .as_str()
                .parse()
                .map_err(|message: String| QueueError::InvalidConfig {
                    what: shown.clone(),
                    message,
                })?;
        if let Some(password) = &settings.password {
            password
                .expose()
                .clone_into(&mut uri.authority.userinfo.password);
        }
        uri.query.heartbeat.get_or_insert(HEARTBEAT_SECS);
        uri.query
            .connection_timeout
            .get_or_insert(CONNECT_TIMEOUT_MS);
        let mut properties = ConnectionProperties::default();
        properties.client_properties.insert(
            ShortString::from("product"),
            AMQPValue::LongString(LongString::from("labrelay")),
        );
        properties.client_properties.insert(
            ShortString::from("version"),
            AMQPValue::LongString(LongString::from(env!("CARGO_PKG_VERSION"))),
        );
        let shared = Arc::new(Shared {
            uri,
            shown,
            properties,
            name: connection_name(settings),
            reconnect_for: settings.reconnect_for,
            ca_pem: ca.map(|ca| ca.pem),
        });
        let connection = shared
            .connect_once("publisher")
            .await
            .map_err(|e| shared.connect_error(&e))?;
        let publisher = open_publisher(connection)
            .await
            .map_err(|e| shared.connect_error(&e))?;
        Ok(AmqpBroker {
            shared,
            publisher: Arc::new(Mutex::new(Some(publisher))),
        })
    }

    /// Publish several messages to one exchange with their confirms pipelined: all are
    /// sent, then all confirms awaited, which is many times faster than one
    /// [`Broker::publish`] after the other. `Ok(routed)` has one entry per message,
    /// `false` for a mandatory message no queue took. If anything goes wrong on the way
    /// (connection lost, a nack, a confirm late), the messages are published again one
    /// by one with [`Broker::publish`]'s reconnects, so a consumer may see some twice;
    /// `Err` means that failed too and any of the messages may be unconfirmed.
    pub async fn publish_batch(
        &self,
        exchange: &str,
        messages: &[super::Outgoing],
    ) -> Result<Vec<bool>, QueueError> {
        if let Some(routed) = self.publish_pipelined(exchange, messages).await {
            return Ok(routed);
        }
        let mut routed = Vec::with_capacity(messages.len());
        for m in messages {
            match self
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

    /// The fast path of [`AmqpBroker::publish_batch`]; `None` when it did not work out.
    async fn publish_pipelined(
        &self,
        exchange: &str,
        messages: &[super::Outgoing],
    ) -> Option<Vec<bool>> {
        // Which confirm carries a returned (unroutable) message is not reliable when
        // confirms are pipelined, so returns are matched by message id: every message
        // needs a distinct one, or the batch goes the slow way.
        let ids: std::collections::HashSet<&str> = messages
            .iter()
            .filter_map(|m| m.options.message_id.as_deref())
            .collect();
        if ids.len() != messages.len() {
            return None;
        }
        let deadline = Instant::now() + self.shared.reconnect_for;
        let mut publisher = self.publisher.lock().await;
        self.ensure_publisher(&mut publisher, deadline).await.ok()?;
        let p = publisher.as_ref()?;
        let mut confirms = Vec::with_capacity(messages.len());
        for m in messages {
            let confirm = p
                .channel
                .basic_publish(
                    exchange,
                    &m.routing_key,
                    BasicPublishOptions {
                        mandatory: m.options.mandatory,
                        immediate: false,
                    },
                    &m.body,
                    properties(&m.options),
                )
                .await
                .ok()?;
            confirms.push(confirm);
        }
        let mut returned = std::collections::HashSet::new();
        for confirm in confirms {
            match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                Ok(Ok(Confirmation::Ack(None))) => {}
                Ok(Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)))) => {
                    let id = r.delivery.properties.message_id().as_ref()?.to_string();
                    if !ids.contains(id.as_str()) || !returned.insert(id) {
                        return None;
                    }
                }
                _ => return None,
            }
        }
        Some(
            messages
                .iter()
                .map(|m| {
                    m.options
                        .message_id
                        .as_ref()
                        .is_none_or(|id| !returned.contains(id))
                })
                .collect(),
        )
    }

    /// Close the publishing connection (after the last publish; a later call reconnects).
    /// Closing before the process ends keeps the connection's I/O thread from reporting
    /// errors while the runtime shuts down.
    pub async fn close(&self) {
        if let Some(p) = self.publisher.lock().await.take() {
            let _ = answered(p.connection.close(200, "done")).await;
        }
    }

    /// The redacted URL.
    pub fn url(&self) -> &str {
        &self.shared.shown
    }

    /// Run a request on a fresh channel of the publishing connection, reconnecting and
    /// retrying when the connection breaks. Only for idempotent requests.
    async fn on_channel<'a, T: Send>(
        &self,
        request: Request<'_>,
        op: impl Fn(Channel) -> BoxFuture<'a, lapin::Result<T>> + Send + Sync,
    ) -> Result<T, QueueError> {
        let deadline = Instant::now() + self.shared.reconnect_for;
        let mut backoff = backoff(deadline);
        loop {
            let channel = {
                let mut publisher = self.publisher.lock().await;
                self.ensure_publisher(&mut publisher, deadline).await?;
                match publisher.as_ref() {
                    Some(p) => answered(p.connection.create_channel()).await,
                    None => continue,
                }
            };
            // The channel closes when dropped; a failed request has closed it already.
            let result = match channel {
                Ok(channel) => answered(op(channel)).await,
                Err(e) => Err(e),
            };
            let e = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let pause = if is_transient(&e) {
                backoff.pause()
            } else {
                None
            };
            let Some(pause) = pause else {
                return Err(self.shared.error(&e, &request));
            };
            tracing::info!(url = %self.shared.shown, "retrying in {pause:?}: {e}");
            self.forget_publisher().await;
            tokio::time::sleep(pause).await;
        }
    }

    /// Make sure `slot` holds a working publisher, reconnecting until `deadline`.
    async fn ensure_publisher(
        &self,
        slot: &mut Option<Publisher>,
        deadline: Instant,
    ) -> Result<(), QueueError> {
        if slot.as_ref().is_some_and(Publisher::healthy) {
            return Ok(());
        }
        // A connection that is up but whose channel died (a soft error such as a publish
        // to a missing exchange) only needs a new channel.
        if let Some(p) = slot.take().filter(|p| p.connection.status().connected())
            && let Ok(channel) = confirm_channel(&p.connection).await
        {
            *slot = Some(Publisher {
                connection: p.connection,
                channel,
            });
            return Ok(());
        }
        let mut backoff = backoff(deadline);
        loop {
            let connection = self.shared.connect_until(deadline).await?;
            let e = match open_publisher(connection).await {
                Ok(p) => {
                    tracing::info!(url = %self.shared.shown, "connected to RabbitMQ");
                    *slot = Some(p);
                    return Ok(());
                }
                Err(e) => e,
            };
            let pause = if is_transient(&e) {
                backoff.pause()
            } else {
                None
            };
            let Some(pause) = pause else {
                return Err(self.shared.connect_error(&e));
            };
            tokio::time::sleep(pause).await;
        }
    }

    async fn forget_publisher(&self) {
        if let Some(p) = self.publisher.lock().await.take() {
            // Best effort: the connection is probably gone already.
            let _ = answered(p.connection.close(200, "reconnecting")).await;
        }
    }

    async fn subscribe(&self, queue: &str, prefetch: u16) -> Result<AmqpConsumer, QueueError> {
        let mut consumer = AmqpConsumer {
            shared: self.shared.clone(),
            queue: queue.to_owned(),
            prefetch,
            session: None,
        };
        let deadline = Instant::now() + self.shared.reconnect_for;
        consumer.session = Some(consumer.subscribe_until(deadline).await?);
        Ok(consumer)
    }
}

async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    answered(confirm_channel_unbounded(connection)).await
}

async fn confirm_channel_unbounded(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

async fn open_publisher(connection: Connection) -> Result<Publisher, lapin::Error> {
    let channel = confirm_channel(&connection).await?;
    Ok(Publisher {
        connection,
        channel,
    })
}

fn queue_arguments(spec: &QueueSpec) -> FieldTable {
    let mut args = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    args.insert("x-queue-type".into(), text(spec.kind.as_str()));
    if let Some(n) = spec.max_deliveries {
        // RabbitMQ 3.10 dead-letters a message when it has been returned more than
        // x-delivery-limit times, i.e. on its (limit + 2)th delivery attempt, having
        // delivered it limit + 1 times; so N deliveries means a limit of N - 1
        // (checked by the contract test `nack_n_times_lands_in_dead_letter_queue`).
        let limit = i64::from(n) - 1;
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
    }
    if let Some(dead) = spec.dead_letter_queue() {
        args.insert("x-dead-letter-exchange".into(), text(""));
        args.insert("x-dead-letter-routing-key".into(), text(&dead));
        if spec.kind == QueueKind::Quorum {
            // At-least-once dead-lettering keeps the message in this queue until the
            // dead-letter queue has confirmed it; it requires reject-publish overflow.
            args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
            args.insert("x-overflow".into(), text("reject-publish"));
        }
    }
    args
}

fn header_table(headers: &BTreeMap<String, String>) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        table.insert(
            ShortString::from(k.as_str()),
            AMQPValue::LongString(LongString::from(v.as_str())),
        );
    }
    table
}

/// A header value as text, if it is text, a number or a boolean.
fn header_text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

impl Broker for AmqpBroker {
    async fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<(), QueueError> {
        validate_name("exchange", name)?;
        let lapin_kind = match kind {
            ExchangeKind::Direct => lapin::ExchangeKind::Direct,
            ExchangeKind::Topic => lapin::ExchangeKind::Topic,
        };
        self.on_channel(Request::Declare(format!("exchange {name:?}")), |ch| {
            let kind = lapin_kind.clone();
            Box::pin(async move {
                ch.exchange_declare(
                    name,
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
            })
        })
        .await
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), QueueError> {
        spec.validate()?;
        let mut queues = Vec::new();
        if let Some(dead) = spec.dead_letter_queue() {
            let mut dlq = QueueSpec::new(dead).without_dead_letter();
            dlq.kind = spec.kind;
            queues.push(dlq);
        }
        queues.push(spec.clone());
        for q in &queues {
            let args = queue_arguments(q);
            self.on_channel(Request::Declare(format!("queue {:?}", q.name)), |ch| {
                let args = args.clone();
                Box::pin(async move {
                    ch.queue_declare(
                        &q.name,
                        QueueDeclareOptions {
                            durable: true,
                            ..QueueDeclareOptions::default()
                        },
                        args,
                    )
                    .await
                    .map(drop)
                })
            })
            .await?;
        }
        Ok(())
    }

    async fn bind(&self, queue: &str, exchange: &str, key: &str) -> Result<(), QueueError> {
        if exchange.is_empty() {
            return Err(QueueError::Invalid(format!(
                "cannot bind queue {queue:?} to the default exchange"
            )));
        }
        self.on_channel(Request::Other("binding"), |ch| {
            Box::pin(async move {
                ch.queue_bind(
                    queue,
                    exchange,
                    key,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
            })
        })
        .await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        options: &PublishOptions,
    ) -> Result<(), QueueError> {
        let properties = properties(options);
        let publish_options = BasicPublishOptions {
            mandatory: options.mandatory,
            immediate: false,
        };
        let unroutable = || QueueError::Unroutable {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        };
        let deadline = Instant::now() + self.shared.reconnect_for;
        let mut backoff = backoff(deadline);
        // One publish at a time on the confirm channel, so a returned message always
        // belongs to the confirm being awaited.
        let mut publisher = self.publisher.lock().await;
        loop {
            self.ensure_publisher(&mut publisher, deadline).await?;
            let Some(p) = publisher.as_ref() else {
                continue;
            };
            let attempt = async {
                let confirm = p
                    .channel
                    .basic_publish(
                        exchange,
                        routing_key,
                        publish_options,
                        body,
                        properties.clone(),
                    )
                    .await?;
                match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                    Ok(confirmation) => confirmation,
                    Err(_) => Err(lapin::Error::MissingHeartbeatError),
                }
            };
            let failure = match attempt.await {
                Ok(Confirmation::Ack(None)) => return Ok(()),
                Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_))) => {
                    return Err(unroutable());
                }
                Ok(Confirmation::Nack(None)) => {
                    tracing::warn!(url = %self.shared.shown, exchange, routing_key,
                        "RabbitMQ refused a message; publishing it again");
                    None
                }
                Ok(Confirmation::NotRequested) => {
                    return Err(QueueError::Broker {
                        url: self.shared.shown.clone(),
                        message: "publisher confirms are off on the publishing channel".into(),
                    });
                }
                Err(e) if is_transient(&e) => Some(e),
                Err(e) => {
                    return Err(self.shared.error(&e, &Request::Other("publishing")));
                }
            };
            let Some(pause) = backoff.pause() else {
                return Err(match failure {
                    Some(e) => self.shared.error(&e, &Request::Other("publishing")),
                    None => QueueError::Refused {
                        exchange: exchange.to_owned(),
                        routing_key: routing_key.to_owned(),
                    },
                });
            };
            if let Some(e) = failure {
                tracing::warn!(url = %self.shared.shown,
                    "publish not confirmed ({e}); reconnecting and publishing again");
                if let Some(p) = publisher.take() {
                    let _ = answered(p.connection.close(200, "reconnecting")).await;
                }
            }
            tokio::time::sleep(pause).await;
        }
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Consumer, QueueError> {
        Ok(Consumer {
            inner: ConsumerInner::Amqp(Box::new(self.subscribe(queue, prefetch).await?)),
        })
    }

    async fn ready_count(&self, queue: &str) -> Result<u64, QueueError> {
        let q = self
            .on_channel(Request::Other("counting messages"), |ch| {
                Box::pin(async move {
                    ch.queue_declare(
                        queue,
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                })
            })
            .await?;
        Ok(u64::from(q.message_count()))
    }

    async fn delete_queue(&self, name: &str) -> Result<(), QueueError> {
        let deleted = self
            .on_channel(Request::Other("deleting a queue"), |ch| {
                Box::pin(async move {
                    ch.queue_delete(name, QueueDeleteOptions::default())
                        .await
                        .map(drop)
                })
            })
            .await;
        match deleted {
            Err(QueueError::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    async fn delete_exchange(&self, name: &str) -> Result<(), QueueError> {
        let deleted = self
            .on_channel(Request::Other("deleting an exchange"), |ch| {
                Box::pin(async move {
                    ch.exchange_delete(name, ExchangeDeleteOptions::default())
                        .await
                })
            })
            .await;
        match deleted {
            Err(QueueError::NotFound { .. }) => Ok(()),
            other => other,
        }
    }
}

/// A subscription on its own connection.
pub(crate) struct AmqpConsumer {
    shared: Arc<Shared>,
    queue: String,
    prefetch: u16,
    session: Option<Session>,
}

struct Session {
    connection: Connection,
    channel: Channel,
    consumer: lapin::Consumer,
    /// Tags of this channel's deliveries not yet settled ([`ack_many`]).
    outstanding: Outstanding,
}

/// The unsettled delivery tags of one channel.
type Outstanding = Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>;

impl AmqpConsumer {
    pub(crate) fn queue(&self) -> &str {
        &self.queue
    }

    /// Cancel the subscription and close its connection. Deliveries not yet settled
    /// return to the queue.
    pub(crate) async fn close(mut self) {
        if let Some(session) = self.session.take() {
            let tag = session.consumer.tag();
            let _ = answered(
                session
                    .channel
                    .basic_cancel(tag.as_str(), BasicCancelOptions::default()),
            )
            .await;
            let _ = answered(session.connection.close(200, "consumer done")).await;
        }
    }

    /// Connect and subscribe. The flag tells whether the failure came while connecting
    /// (where NOT_FOUND means a missing vhost) or after (a missing queue).
    async fn subscribe_once(&self) -> Result<Session, (lapin::Error, bool)> {
        let role = format!("consumer of {}", self.queue);
        let connection = self
            .shared
            .connect_once(&role)
            .await
            .map_err(|e| (e, true))?;
        let subscribed = async {
            let channel = connection.create_channel().await?;
            channel
                .basic_qos(self.prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    &self.queue,
                    "",
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok((channel, consumer))
        };
        let (channel, consumer) = answered(subscribed).await.map_err(|e| (e, false))?;
        Ok(Session {
            connection,
            channel,
            consumer,
            outstanding: Outstanding::default(),
        })
    }

    async fn subscribe_until(&self, deadline: Instant) -> Result<Session, QueueError> {
        let mut backoff = backoff(deadline);
        loop {
            match self.subscribe_once().await {
                Ok(s) => return Ok(s),
                Err((e, _)) if is_transient(&e) => {
                    let Some(pause) = backoff.pause() else {
                        return Err(QueueError::ConnectionLost {
                            url: self.shared.shown.clone(),
                            message: e.to_string(),
                        });
                    };
                    tracing::info!(url = %self.shared.shown, queue = self.queue,
                        "subscribing again in {pause:?}: {e}");
                    tokio::time::sleep(pause).await;
                }
                Err((e, true)) => return Err(self.shared.connect_error(&e)),
                Err((e, false)) => return Err(self.shared.error(&e, &Request::Other("consuming"))),
            }
        }
    }

    pub(crate) async fn next_until(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<Delivery>, QueueError> {
        loop {
            if self.session.is_none() {
                let until = Instant::now() + self.shared.reconnect_for;
                let s = self.subscribe_until(until).await?;
                tracing::info!(url = %self.shared.shown, queue = self.queue, "subscribed again");
                self.session = Some(s);
            }
            let Some(session) = self.session.as_mut() else {
                continue;
            };
            let Ok(item) = tokio::time::timeout_at(deadline, session.consumer.next()).await else {
                return Ok(None);
            };
            match item {
                Some(Ok(d)) => {
                    let channel = session.channel.clone();
                    let outstanding = session.outstanding.clone();
                    return Ok(Some(self.delivery(d, channel, outstanding)));
                }
                Some(Err(e)) => {
                    tracing::warn!(url = %self.shared.shown, queue = self.queue,
                        "consumer connection failed ({e}); reconnecting");
                    self.session = None;
                }
                None if session.channel.status().connected() => {
                    self.session = None;
                    return Err(QueueError::Cancelled {
                        queue: self.queue.clone(),
                    });
                }
                None => self.session = None,
            }
        }
    }

    fn delivery(
        &self,
        d: lapin::message::Delivery,
        channel: Channel,
        outstanding: Outstanding,
    ) -> Delivery {
        if let Ok(mut o) = outstanding.lock() {
            o.insert(d.delivery_tag);
        }
        let mut headers = BTreeMap::new();
        let mut returned = 0u32;
        if let Some(table) = d.properties.headers() {
            for (k, v) in table.inner() {
                if k.as_str() == DELIVERY_COUNT {
                    returned = header_text(v).and_then(|n| n.parse().ok()).unwrap_or(0);
                } else if let Some(text) = header_text(v) {
                    headers.insert(k.as_str().to_owned(), text);
                }
            }
        }
        // Quorum queues count earlier failed deliveries in x-delivery-count; classic
        // queues only say "redelivered".
        let delivery_count = (returned.saturating_add(1)).max(if d.redelivered { 2 } else { 1 });
        Delivery {
            message_id: d
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned()),
            exchange: d.exchange.as_str().to_owned(),
            routing_key: d.routing_key.as_str().to_owned(),
            headers,
            delivery_count,
            settle: Some(Settle::Amqp(AmqpSettle {
                acker: d.acker,
                tag: d.delivery_tag,
                outstanding,
                _channel: channel,
                queue: self.queue.clone(),
            })),
            body: d.data,
        }
    }
}

impl Drop for AmqpConsumer {
    fn drop(&mut self) {
        // Stop the broker from sending more; deliveries still held keep the channel (and
        // so the connection) open until they are settled, then it closes.
        let Some(session) = self.session.take() else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let tag = session.consumer.tag();
                let _ = session
                    .channel
                    .basic_cancel(tag.as_str(), BasicCancelOptions::default())
                    .await;
            });
        }
    }
}

/// How a RabbitMQ delivery is settled.
pub(crate) struct AmqpSettle {
    acker: lapin::acker::Acker,
    tag: u64,
    outstanding: Outstanding,
    /// Keeps the channel open while the delivery is held, even after the consumer is gone.
    _channel: Channel,
    queue: String,
}

impl AmqpSettle {
    fn error(&self, e: &lapin::Error) -> QueueError {
        if is_transient(e) {
            QueueError::DeliveryLost {
                queue: self.queue.clone(),
                message: e.to_string(),
            }
        } else {
            QueueError::Invalid(format!("settling a delivery from {}: {e}", self.queue))
        }
    }

    /// No longer outstanding: it is being settled.
    fn settling(&self) {
        if let Ok(mut o) = self.outstanding.lock() {
            o.remove(&self.tag);
        }
    }

    pub(crate) async fn ack(self) -> Result<(), QueueError> {
        self.settling();
        self.acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| self.error(&e))
    }

    /// Acknowledge `settles` (all of one consumer): when they are all of their channel's
    /// unsettled deliveries up to the newest of them, one `basic.ack` with `multiple`
    /// for that newest; otherwise one each (a `multiple` ack would also settle an older
    /// delivery still held elsewhere).
    pub(crate) async fn ack_many(mut settles: Vec<AmqpSettle>) -> Result<(), QueueError> {
        let Some(newest) = settles.iter().map(|s| s.tag).max() else {
            return Ok(());
        };
        let one_channel = settles
            .iter()
            .all(|s| Arc::ptr_eq(&s.outstanding, &settles[0].outstanding));
        let together = one_channel
            && settles.len() > 1
            && settles[0].outstanding.lock().is_ok_and(|mut o| {
                let ours: std::collections::BTreeSet<u64> = settles.iter().map(|s| s.tag).collect();
                let all_ours = o.range(..=newest).all(|t| ours.contains(t));
                if all_ours {
                    for t in &ours {
                        o.remove(t);
                    }
                }
                all_ours
            });
        if together {
            settles.sort_by_key(|s| s.tag);
            let last = settles.pop().expect("at least two");
            // The others are settled by this one ack; their ackers go unused.
            drop(settles);
            return last
                .acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .map_err(|e| last.error(&e));
        }
        for s in settles {
            s.ack().await?;
        }
        Ok(())
    }

    pub(crate) async fn nack_requeue(self) -> Result<(), QueueError> {
        self.settling();
        self.acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await
            .map_err(|e| self.error(&e))
    }

    pub(crate) async fn reject(self) -> Result<(), QueueError> {
        self.settling();
        self.acker
            .reject(BasicRejectOptions { requeue: false })
            .await
            .map_err(|e| self.error(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_queue_arguments() {
        let args = queue_arguments(&QueueSpec::new("jobs").with_max_deliveries(5));
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(
            get("x-queue-type"),
            Some(AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(get("x-delivery-limit"), Some(AMQPValue::LongLongInt(4)));
        assert_eq!(
            get("x-dead-letter-routing-key"),
            Some(AMQPValue::LongString("jobs.dead".into()))
        );
        let classic = queue_arguments(&QueueSpec::new("c").classic().without_dead_letter());
        assert!(classic.inner().get("x-delivery-limit").is_none());
        assert!(classic.inner().get("x-dead-letter-exchange").is_none());
    }

    #[test]
    fn header_values_become_text() {
        assert_eq!(
            header_text(&AMQPValue::LongString("a".into())).as_deref(),
            Some("a")
        );
        assert_eq!(
            header_text(&AMQPValue::LongLongInt(3)).as_deref(),
            Some("3")
        );
        assert_eq!(header_text(&AMQPValue::FieldArray(Vec::new().into())), None);
    }

    #[test]
    fn broker_shutdown_is_transient_but_a_missing_exchange_is_not() {
        use lapin::protocol::{AMQPError, AMQPHardError};
        let forced = lapin::Error::ProtocolError(AMQPError::new(
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            "shutdown".into(),
        ));
        assert!(is_transient(&forced));
        let missing = lapin::Error::ProtocolError(AMQPError::new(
            AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND),
            "NOT_FOUND - no exchange 'x' in vhost '/'".into(),
        ));
        assert!(!is_transient(&missing));
    }
}
