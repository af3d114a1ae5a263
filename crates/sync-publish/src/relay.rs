//! Outbox to broker. A captured row is first *prepared* (its changed fields found, a
//! version stamped, the message stored in the row: state `ready`), in one transaction
//! with the field versions it sets; then published with a publisher confirm and marked
//! `sent`. A crash between the two publishes the same message (same event id) again,
//! which the receiving inbox drops.

use std::collections::{BTreeMap, HashMap, HashSet};

use labrelay::db::Engine;

use labrelay::queue::{AnyBroker, Broker, PublishOptions, QueueError};
use labrelay::secret::Secret;
use serde::Serialize;
use serde_json::Value;
use sqlx::{AnyConnection, Row};

use crate::cache::Cache;
use crate::event::{self, Event, FORMAT, Op, Ref, Version};
use crate::site::{ObjectRow, Site, canonical};

/// Counts of one relay pass.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RelayStats {
    /// Messages published and confirmed.
    pub sent: u64,
    /// Captured rows with nothing to send (temporary, unchanged, not published here).
    pub skipped: u64,
    /// Messages no site's queue accepts.
    pub unrouted: u64,
}

/// What preparing one outbox row gave.
enum Prepared {
    Ready(Box<Event>),
    Skipped(&'static str),
}

/// The publishing half shared by relay, bootstrap and repair.
pub struct Publisher<'a> {
    /// The broker.
    pub broker: &'a AnyBroker,
    /// The exchange.
    pub exchange: String,
    /// This site's name.
    pub site: String,
    /// This site's key.
    pub key: Secret,
}

impl Publisher<'_> {
    /// Sign and publish a serialized event; `Ok(false)` when no queue takes it.
    pub async fn publish(
        &self,
        event_id: &str,
        routing_key: &str,
        body: &[u8],
    ) -> Result<bool, QueueError> {
        let opts = PublishOptions::new()
            .message_id(event_id)
            .header(event::SITE_HEADER, self.site.clone())
            .header(
                event::SIGNATURE_HEADER,
                event::sign(self.key.expose().as_bytes(), body),
            );
        match self
            .broker
            .publish(&self.exchange, routing_key, body, &opts)
            .await
        {
            Ok(()) => Ok(true),
            Err(QueueError::Unroutable { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sign and publish several serialized events (pipelined confirms); one entry per
    /// event, `false` when no queue takes it.
    pub async fn publish_many(
        &self,
        events: &[(String, String, Vec<u8>)],
    ) -> Result<Vec<bool>, QueueError> {
        let messages: Vec<labrelay::queue::Outgoing> = events
            .iter()
            .map(|(id, routing_key, body)| labrelay::queue::Outgoing {
                routing_key: routing_key.clone(),
                options: PublishOptions::new()
                    .message_id(id.as_str())
                    .header(event::SITE_HEADER, self.site.clone())
                    .header(
                        event::SIGNATURE_HEADER,
                        event::sign(self.key.expose().as_bytes(), body),
                    ),
                body: body.clone(),
            })
            .collect();
        self.broker.publish_batch(&self.exchange, &messages).await
    }

    /// Serialize and publish an event.
    pub async fn publish_event(&self, ev: &Event) -> anyhow::Result<bool> {
        let body = serde_json::to_vec(ev)?;
        Ok(self.publish(&ev.id, &ev.routing_key(), &body).await?)
    }
}

/// The least delivery limit of a site's queue at the broker.
pub const BROKER_DELIVERY_LIMIT: u32 = 20;

/// Declare the exchange and every consuming site's queue and bindings, so a message
/// published before a consumer first starts waits for it.
pub async fn declare_topology(site: &Site, broker: &AnyBroker) -> Result<(), QueueError> {
    let plan = &site.plan;
    broker
        .declare_exchange(&plan.cfg.exchange, labrelay::queue::ExchangeKind::Topic)
        .await?;
    for (name, s) in &plan.cfg.sites {
        if !s.consume {
            continue;
        }
        let queue = plan.queue_name(name);
        let spec = labrelay::queue::QueueSpec::new(&queue).with_max_deliveries(
            // The consumer dead-letters after `max_failures` itself, with the reason;
            // the broker's limit only catches a message that crashes the consumer
            // every time. Every message a killed consumer held counts one delivery, so
            // the limit is generous: a restart loop must not bury healthy messages.
            plan.cfg
                .max_failures
                .saturating_mul(4)
                .max(BROKER_DELIVERY_LIMIT),
        );
        broker.declare_queue(&spec).await?;
        for pattern in plan.bindings(name) {
            broker.bind(&queue, &plan.cfg.exchange, &pattern).await?;
        }
    }
    Ok(())
}

struct OutboxRow {
    id: i64,
    object_type: String,
    local_key: String,
    right_key: Option<String>,
    op: String,
    captured_ms: i64,
}

/// Prepare up to one batch of new outbox rows; returns how many rows it handled.
///
/// The rows' objects, identities and field versions are read in set queries, and the
/// identities, field versions and prepared messages written in multi-row statements.
async fn prepare_batch(site: &Site, stats: &mut RelayStats) -> anyhow::Result<usize> {
    let mut tx = site.db.pool().begin().await.map_err(|e| site.db.err(e))?;
    let mut clock = site.lock_clock(&mut tx).await?;
    let sql = format!(
        "SELECT id, object_type, local_key, right_key, op, captured_ms FROM labrelay_sync_outbox \
         WHERE state = 'new' ORDER BY id LIMIT {}",
        site.plan.cfg.batch
    );
    let rows = sqlx::query(&sql)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| site.db.err(e))?;
    let mut batch = Vec::with_capacity(rows.len());
    for r in &rows {
        batch.push(OutboxRow {
            id: r.try_get(0).map_err(|e| site.db.err(e))?,
            object_type: labrelay::db::text(r, 1)?,
            local_key: labrelay::db::text(r, 2)?,
            right_key: labrelay::db::opt_text(r, 3)?,
            op: labrelay::db::text(r, 4)?,
            captured_ms: r.try_get(5).map_err(|e| site.db.err(e))?,
        });
    }
    if batch.is_empty() {
        return Ok(0);
    }
    let plan = site.plan.clone();
    // The current rows of the saved objects, one query per type and chunk.
    let mut objects: HashMap<(String, String), ObjectRow> = HashMap::new();
    let mut by_type: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for row in &batch {
        if row.op == "save" && plan.objects.contains_key(&row.object_type) {
            by_type
                .entry(row.object_type.as_str())
                .or_default()
                .push(row.local_key.as_str());
        }
    }
    for (ty, keys) in by_type {
        let o = &plan.objects[ty];
        for obj in site.read_objects(&mut tx, o, &keys).await? {
            objects.insert((ty.to_owned(), obj.key.clone()), obj);
        }
    }
    // Identities of the rows' objects and of everything they refer to.
    let mut wanted: HashSet<(String, String)> = HashSet::new();
    for row in &batch {
        if let Some(l) = plan.links.get(&row.object_type) {
            wanted.insert((l.left.object.clone(), row.local_key.clone()));
            if let Some(r) = &row.right_key {
                wanted.insert((l.right.object.clone(), r.clone()));
            }
        } else {
            wanted.insert((row.object_type.clone(), row.local_key.clone()));
        }
    }
    for ((ty, _), obj) in &objects {
        for f in &plan.objects[ty].fields {
            if let (Some(target), Some(v)) = (&f.reference, obj.values.get(&f.name))
                && !v.is_null()
            {
                wanted.insert((target.clone(), key_of(v)));
            }
        }
    }
    let mut cache = Cache::default();
    cache.load_refs(site, &mut tx, &wanted).await?;
    // Stored field versions of every object (and link) in the batch.
    let mut field_keys: HashSet<(String, String)> = HashSet::new();
    for row in &batch {
        if let Some(l) = plan.links.get(&row.object_type) {
            if let Some(r) = &row.right_key {
                let left = cache.peek_ref(site, &l.left.object, &row.local_key);
                let right = cache.peek_ref(site, &l.right.object, r);
                field_keys.insert((l.name.clone(), Event::link_id(&left.uuid, &right.uuid)));
            }
        } else if plan.objects.contains_key(&row.object_type) {
            let me = cache.peek_ref(site, &row.object_type, &row.local_key);
            field_keys.insert((row.object_type.clone(), me.uuid));
        }
    }
    cache.load_fields(site, &mut tx, &field_keys).await?;
    let mut updates = Vec::with_capacity(batch.len());
    for row in &batch {
        let prepared = prepare_row(site, &mut tx, &mut cache, &objects, &mut clock, row).await?;
        updates.push(match prepared {
            Prepared::Ready(ev) => OutboxUpdate {
                state: "ready",
                event_id: Some(ev.id.clone()),
                routing_key: Some(ev.routing_key()),
                event: Some(serde_json::to_string(&*ev)?),
                note: None,
            },
            Prepared::Skipped(note) => {
                stats.skipped += 1;
                OutboxUpdate {
                    state: "skipped",
                    event_id: None,
                    routing_key: None,
                    event: None,
                    note: Some(note),
                }
            }
        });
    }
    cache.flush(site, &mut tx).await?;
    write_outbox(site, &mut tx, &batch, &updates).await?;
    site.save_clock(&mut tx, clock).await?;
    tx.commit().await.map_err(|e| site.db.err(e))?;
    Ok(batch.len())
}

/// A prepared outbox row's new state.
struct OutboxUpdate {
    state: &'static str,
    event_id: Option<String>,
    routing_key: Option<String>,
    event: Option<String>,
    note: Option<&'static str>,
}

/// Write the prepared rows back, many per statement (an upsert on the row id).
async fn write_outbox(
    site: &Site,
    conn: &mut AnyConnection,
    batch: &[OutboxRow],
    updates: &[OutboxUpdate],
) -> anyhow::Result<()> {
    let e = site.engine();
    let pairs: Vec<(&OutboxRow, &OutboxUpdate)> = batch.iter().zip(updates).collect();
    for chunk in pairs.chunks(300) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| {
                let p: Vec<String> = (1..=11).map(|k| e.placeholder(i * 11 + k)).collect();
                format!("({})", p.join(", "))
            })
            .collect();
        let head = format!(
            "INSERT INTO labrelay_sync_outbox (id, object_type, local_key, right_key, op, captured_ms, \
             state, event_id, routing_key, event, note) VALUES {}",
            values.join(", ")
        );
        let sql = match e {
            Engine::Postgres | Engine::Sqlite => format!(
                "{head} ON CONFLICT (id) DO UPDATE SET state = excluded.state, event_id = excluded.event_id, \
                 routing_key = excluded.routing_key, event = excluded.event, note = excluded.note"
            ),
            Engine::Mysql => format!(
                "{head} ON DUPLICATE KEY UPDATE state = VALUES(state), event_id = VALUES(event_id), \
                 routing_key = VALUES(routing_key), event = VALUES(event), note = VALUES(note)"
            ),
        };
        let mut q = sqlx::query(&sql);
        for (row, u) in chunk {
            q = q
                .bind(row.id)
                .bind(row.object_type.clone())
                .bind(row.local_key.clone())
                .bind(row.right_key.clone())
                .bind(row.op.clone())
                .bind(row.captured_ms)
                .bind(u.state)
                .bind(u.event_id.clone())
                .bind(u.routing_key.clone())
                .bind(u.event.clone())
                .bind(u.note);
        }
        q.execute(&mut *conn).await.map_err(|e| site.db.err(e))?;
    }
    Ok(())
}

/// A referenced local key as text.
fn key_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn new_event(site: &Site, object_type: &str, op: Op, object: Ref, version: Version) -> Event {
    Event {
        format: FORMAT,
        id: uuid::Uuid::new_v4().to_string(),
        site: site.name().to_owned(),
        object_type: object_type.to_owned(),
        op,
        object,
        right: None,
        version,
        fields: BTreeMap::new(),
        versions: BTreeMap::new(),
    }
}

/// The wire values of an object row: references become [`Ref`]s. Returns the values
/// and their canonical texts (a reference compares by uuid).
pub async fn wire_values(
    site: &Site,
    conn: &mut AnyConnection,
    o: &crate::config::ObjectSpec,
    values: &BTreeMap<String, Value>,
    record: bool,
) -> anyhow::Result<BTreeMap<String, (Value, Option<String>)>> {
    let mut out = BTreeMap::new();
    for f in &o.fields {
        let v = values.get(&f.name).cloned().unwrap_or(Value::Null);
        let entry = match (&f.reference, &v) {
            (Some(target), v) if !v.is_null() => {
                let r = site.ref_of(conn, target, &key_of(v), record).await?;
                let canon = canonical(&Value::String(r.uuid.clone()));
                (serde_json::to_value(&r)?, canon)
            }
            _ => {
                let canon = canonical(&v);
                (v, canon)
            }
        };
        out.insert(f.name.clone(), entry);
    }
    Ok(out)
}

/// [`wire_values`] from the batch's view; new identities are recorded there.
fn wire_values_cached(
    site: &Site,
    cache: &mut Cache,
    o: &crate::config::ObjectSpec,
    values: &BTreeMap<String, Value>,
) -> anyhow::Result<BTreeMap<String, (Value, Option<String>)>> {
    let mut out = BTreeMap::new();
    for f in &o.fields {
        let v = values.get(&f.name).cloned().unwrap_or(Value::Null);
        let entry = match (&f.reference, &v) {
            (Some(target), v) if !v.is_null() => {
                let r = cache.ref_of(site, target, &key_of(v));
                let canon = canonical(&Value::String(r.uuid.clone()));
                (serde_json::to_value(&r)?, canon)
            }
            _ => {
                let canon = canonical(&v);
                (v, canon)
            }
        };
        out.insert(f.name.clone(), entry);
    }
    Ok(out)
}

async fn prepare_row(
    site: &Site,
    conn: &mut AnyConnection,
    cache: &mut Cache,
    objects: &HashMap<(String, String), ObjectRow>,
    clock: &mut event::Clock,
    row: &OutboxRow,
) -> anyhow::Result<Prepared> {
    let plan = site.plan.clone();
    let Some(op) = Op::parse(&row.op) else {
        return Ok(Prepared::Skipped("unknown operation"));
    };
    if !plan.publishes(site.name(), &row.object_type, op.as_str()) {
        return Ok(Prepared::Skipped("topic not published by this site"));
    }
    let stamp = |clock: &mut event::Clock| {
        clock.tick(u64::try_from(row.captured_ms).unwrap_or(0));
        clock.version(site.name())
    };
    if let Some(o) = plan.objects.get(&row.object_type) {
        match op {
            Op::Save => {
                let Some(obj) = objects.get(&(o.name.clone(), row.local_key.clone())) else {
                    return Ok(Prepared::Skipped("row gone before it was relayed"));
                };
                if obj.temporary {
                    return Ok(Prepared::Skipped("temporary"));
                }
                let me = cache.ref_of(site, &o.name, &obj.key);
                let wire = wire_values_cached(site, cache, o, &obj.values)?;
                let stored = cache.stored(site, conn, &o.name, &me.uuid).await?;
                let changed: Vec<(&String, &(Value, Option<String>))> = wire
                    .iter()
                    .filter(|(name, (_, canon))| {
                        stored.get(*name).is_none_or(|(old, _)| old != canon)
                    })
                    .collect();
                let deleted = stored.contains_key("_deleted");
                if changed.is_empty() && !deleted {
                    return Ok(Prepared::Skipped("no synced field changed"));
                }
                let version = stamp(clock);
                let mut ev = new_event(site, &o.name, Op::Save, me.clone(), version.clone());
                // A re-created object (after a delete) is sent whole.
                let send: Vec<_> = if deleted {
                    wire.iter().collect()
                } else {
                    changed
                };
                let mut stored_now = Vec::with_capacity(send.len());
                for (name, (value, canon)) in send {
                    stored_now.push((name.as_str(), canon.as_deref(), &version));
                    ev.fields.insert(name.clone(), value.clone());
                }
                cache.store(&o.name, &me.uuid, &stored_now);
                if deleted {
                    cache
                        .remove_field(site, conn, &o.name, &me.uuid, "_deleted")
                        .await?;
                }
                Ok(Prepared::Ready(Box::new(ev)))
            }
            Op::Delete => {
                let me = cache.peek_ref(site, &o.name, &row.local_key);
                let stored = cache.stored(site, conn, &o.name, &me.uuid).await?;
                if stored.is_empty() {
                    return Ok(Prepared::Skipped("deleted before it was ever sent"));
                }
                let version = stamp(clock);
                cache.store(&o.name, &me.uuid, &[("_deleted", Some("true"), &version)]);
                Ok(Prepared::Ready(Box::new(new_event(
                    site,
                    &o.name,
                    Op::Delete,
                    me,
                    version,
                ))))
            }
            Op::Connect | Op::Disconnect => Ok(Prepared::Skipped("not an operation on objects")),
        }
    } else if let Some(l) = plan.links.get(&row.object_type) {
        if !matches!(op, Op::Connect | Op::Disconnect) {
            return Ok(Prepared::Skipped("not an operation on links"));
        }
        let Some(right_key) = &row.right_key else {
            return Ok(Prepared::Skipped("link row without its right key"));
        };
        let left = cache.ref_of(site, &l.left.object, &row.local_key);
        let right = cache.ref_of(site, &l.right.object, right_key);
        let id = Event::link_id(&left.uuid, &right.uuid);
        let version = stamp(clock);
        let linked = if op == Op::Connect { "true" } else { "false" };
        cache.store(&l.name, &id, &[("_linked", Some(linked), &version)]);
        let mut ev = new_event(site, &l.name, op, left, version);
        ev.right = Some(right);
        Ok(Prepared::Ready(Box::new(ev)))
    } else {
        Ok(Prepared::Skipped("type not configured"))
    }
}

/// Remove one stored field.
pub async fn remove_field(
    site: &Site,
    conn: &mut AnyConnection,
    object_type: &str,
    uuid: &str,
    field: &str,
) -> anyhow::Result<()> {
    let e = site.engine();
    let sql = format!(
        "DELETE FROM labrelay_sync_fields WHERE object_type = {} AND uuid = {} AND field = {}",
        e.placeholder(1),
        e.placeholder(2),
        e.placeholder(3)
    );
    sqlx::query(&sql)
        .bind(object_type)
        .bind(uuid)
        .bind(field)
        .execute(&mut *conn)
        .await
        .map_err(|e| site.db.err(e))?;
    Ok(())
}

/// Publish the prepared rows, oldest first; stop at the first broker error (the row
/// stays `ready` and goes out on the next run).
async fn publish_ready(
    site: &Site,
    publisher: &Publisher<'_>,
    stats: &mut RelayStats,
) -> anyhow::Result<usize> {
    let sql = format!(
        "SELECT id, event_id, routing_key, event FROM labrelay_sync_outbox WHERE state = 'ready' ORDER BY id LIMIT {}",
        site.plan.cfg.batch
    );
    let rows = sqlx::query(&sql)
        .fetch_all(site.db.pool())
        .await
        .map_err(|e| site.db.err(e))?;
    let mut ids = Vec::with_capacity(rows.len());
    let mut events = Vec::with_capacity(rows.len());
    for r in &rows {
        ids.push(r.try_get::<i64, _>(0).map_err(|e| site.db.err(e))?);
        events.push((
            labrelay::db::text(r, 1)?,
            labrelay::db::text(r, 2)?,
            labrelay::db::text(r, 3)?.into_bytes(),
        ));
    }
    // An error leaves every row of the batch `ready`: the next run sends them again
    // (the receivers' inboxes drop what already arrived).
    let routed = publisher.publish_many(&events).await?;
    let (mut sent, mut unrouted) = (Vec::new(), Vec::new());
    for (id, ok) in ids.into_iter().zip(routed) {
        if ok {
            sent.push(id);
        } else {
            unrouted.push(id);
        }
    }
    mark(site, &sent, "sent").await?;
    mark(site, &unrouted, "unrouted").await?;
    stats.sent += sent.len() as u64;
    stats.unrouted += unrouted.len() as u64;
    Ok(rows.len())
}

async fn mark(site: &Site, ids: &[i64], state: &str) -> anyhow::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    for chunk in ids.chunks(500) {
        let list: Vec<String> = chunk.iter().map(i64::to_string).collect();
        let sql = format!(
            "UPDATE labrelay_sync_outbox SET state = '{state}', sent_ms = {} WHERE id IN ({})",
            event::now_ms(),
            list.join(", ")
        );
        sqlx::query(&sql)
            .execute(site.db.pool())
            .await
            .map_err(|e| site.db.err(e))?;
    }
    Ok(())
}

/// One pass: prepare and publish until the outbox has nothing new or ready.
pub async fn relay_pass(site: &Site, publisher: &Publisher<'_>) -> anyhow::Result<RelayStats> {
    let mut stats = RelayStats::default();
    loop {
        // Rows left `ready` by an earlier run go first, in their order.
        let sent_rows = publish_ready(site, publisher, &mut stats).await?;
        let prepared = prepare_batch(site, &mut stats).await?;
        site.wrote(u64::try_from(prepared).unwrap_or(u64::MAX));
        if sent_rows == 0 && prepared == 0 {
            return Ok(stats);
        }
    }
}

/// Outbox rows by state.
pub async fn outbox_counts(site: &Site) -> anyhow::Result<BTreeMap<String, i64>> {
    let rows = sqlx::query("SELECT state, COUNT(*) FROM labrelay_sync_outbox GROUP BY state")
        .fetch_all(site.db.pool())
        .await
        .map_err(|e| site.db.err(e))?;
    let mut out = BTreeMap::new();
    for r in rows {
        out.insert(
            labrelay::db::text(&r, 0)?,
            r.try_get::<i64, _>(1).map_err(|e| site.db.err(e))?,
        );
    }
    Ok(out)
}

/// Add an outbox row by hand (`emit`).
pub async fn emit(
    site: &Site,
    object_type: &str,
    op: Op,
    key: &str,
    right_key: Option<&str>,
) -> anyhow::Result<()> {
    let e = site.engine();
    let sql = format!(
        "INSERT INTO labrelay_sync_outbox (object_type, local_key, right_key, op, captured_ms) VALUES ({}, {}, {}, {}, {})",
        e.placeholder(1),
        e.placeholder(2),
        e.placeholder(3),
        e.placeholder(4),
        e.placeholder(5)
    );
    sqlx::query(&sql)
        .bind(object_type)
        .bind(key)
        .bind(right_key.map(str::to_owned))
        .bind(op.as_str())
        .bind(i64::try_from(event::now_ms()).unwrap_or(i64::MAX))
        .execute(site.db.pool())
        .await
        .map_err(|e| site.db.err(e))?;
    Ok(())
}

/// What `relay --follow` waits on between passes: PostgreSQL notifications from the
/// capture triggers (a pass starts as soon as a change commits), or the interval.
pub async fn wakeup(config: &labrelay::config::Config, site: &Site) -> labrelay::db::Wakeup {
    match config.database(&site.plan.me().database) {
        Ok(cfg) => labrelay::db::Wakeup::listen(cfg, crate::schema::NOTIFY_CHANNEL).await,
        Err(_) => labrelay::db::Wakeup::Poll,
    }
}
