//! Applying other sites' changes. Each event is applied in one transaction that also
//! records its id in the inbox, so a redelivery (after a crash before the ack) changes
//! nothing; the message is acknowledged only after that commit.
//!
//! Per field, the higher version wins (ties are impossible: the version ends in the
//! site name), so two sites editing different fields both keep their change and every
//! site ends with the same value. A change that refers to an object this site does not
//! have yet is parked in the database (and acknowledged) until that object arrives.

use std::collections::BTreeMap;

use labrelay::db::Engine;
use labrelay::queue::Delivery;
use labrelay::secret::Secret;
use serde::Serialize;
use serde_json::Value;
use sqlx::{AnyConnection, Row};

use crate::cache::Cache;
use crate::config::{FieldType, ObjectSpec};
use crate::event::{self, Event, FORMAT, Op, Ref, Version};
use crate::site::{Site, bind_key, bind_value, canonical, q};

/// What became of one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Changed this site.
    Applied,
    /// Nothing newer in it (or it was applied before).
    Unchanged,
    /// Seen before (inbox).
    Duplicate,
    /// Waiting for an object it refers to.
    Parked,
}

/// Why an event can never be applied: it goes to the dead-letter queue at once.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The result of checking a delivery.
pub struct Checked {
    /// The event.
    pub event: Event,
}

/// Check a delivery's origin and signature and parse it.
pub fn check_delivery(
    site: &Site,
    keys: &BTreeMap<String, Secret>,
    body: &[u8],
    headers: &BTreeMap<String, String>,
) -> Result<Checked, Refused> {
    let from = headers
        .get(event::SITE_HEADER)
        .ok_or_else(|| Refused("unsigned: no site header".into()))?;
    let sig = headers
        .get(event::SIGNATURE_HEADER)
        .ok_or_else(|| Refused(format!("unsigned message claiming site {from:?}")))?;
    let key = keys
        .get(from)
        .ok_or_else(|| Refused(format!("site {from:?} is not configured")))?;
    if from == site.name() {
        return Err(Refused("a message signed as this site itself".into()));
    }
    if !event::verify(key.expose().as_bytes(), body, sig) {
        return Err(Refused(format!(
            "bad signature for site {from:?} (forged, or the keys differ)"
        )));
    }
    let event: Event = serde_json::from_slice(body)
        .map_err(|e| Refused(format!("malformed event from {from:?}: {e}")))?;
    if event.format != FORMAT {
        return Err(Refused(format!("unknown event format {}", event.format)));
    }
    if &event.site != from {
        return Err(Refused(format!(
            "event says site {:?} but is signed by {from:?}",
            event.site
        )));
    }
    if event.version.parts().is_none() || event.versions.values().any(|v| v.parts().is_none()) {
        return Err(Refused(format!("malformed version {:?}", event.version.0)));
    }
    let plan = &site.plan;
    let known = match event.op {
        Op::Save | Op::Delete => plan.objects.contains_key(&event.object_type),
        Op::Connect | Op::Disconnect => {
            plan.links.contains_key(&event.object_type) && event.right.is_some()
        }
    };
    if !known {
        return Err(Refused(format!(
            "{}.{} is not a configured object or link operation",
            event.object_type,
            event.op.as_str()
        )));
    }
    if let Some(o) = plan.objects.get(&event.object_type)
        && let Some(bad) = event.fields.keys().find(|f| o.field(f).is_none())
    {
        return Err(Refused(format!(
            "field {bad:?} is not a synced field of {}",
            event.object_type
        )));
    }
    let skew_ms = plan.cfg.max_skew_secs.saturating_mul(1000);
    let newest = event
        .versions
        .values()
        .chain(std::iter::once(&event.version))
        .filter_map(|v| v.parts().map(|p| p.0))
        .max()
        .unwrap_or(0);
    if newest > event::now_ms().saturating_add(skew_ms) {
        return Err(Refused(format!(
            "version {} is more than {} s ahead of this site's clock",
            event.version, plan.cfg.max_skew_secs
        )));
    }
    Ok(Checked { event })
}

/// Mark the applier's writes so the capture triggers ignore them.
async fn begin_applying(site: &Site, conn: &mut AnyConnection) -> anyhow::Result<()> {
    let sql = match site.engine() {
        Engine::Postgres => "SELECT set_config('labrelay.applying', 'on', true)",
        Engine::Mysql => "SET @labrelay_applying = 1",
        // Also makes this transaction the writer from its first statement.
        Engine::Sqlite => "INSERT INTO labrelay_sync_applying (token) VALUES (1)",
    };
    sqlx::query(sql)
        .execute(&mut *conn)
        .await
        .map_err(|e| site.db.err(e))?;
    Ok(())
}

async fn end_applying(site: &Site, conn: &mut AnyConnection) -> anyhow::Result<()> {
    let sql = match site.engine() {
        Engine::Postgres => return Ok(()),
        Engine::Mysql => "SET @labrelay_applying = NULL",
        Engine::Sqlite => "DELETE FROM labrelay_sync_applying",
    };
    sqlx::query(sql)
        .execute(&mut *conn)
        .await
        .map_err(|e| site.db.err(e))?;
    Ok(())
}

async fn exec(
    site: &Site,
    conn: &mut AnyConnection,
    sql: &str,
    binds: &[&str],
) -> anyhow::Result<u64> {
    let mut query = sqlx::query(sql);
    for b in binds {
        query = query.bind(*b);
    }
    Ok(query
        .execute(&mut *conn)
        .await
        .map_err(|e| site.db.err(e))?
        .rows_affected())
}

/// The result of applying one event: its outcome and, when it created an object here,
/// that object's (type, uuid), which parked events may be waiting for.
pub type Applied = (Outcome, Option<(String, String)>);

/// Apply one checked event (from the queue or from the parked table) in its own
/// transaction.
pub async fn apply(site: &Site, ev: &Event, from_parked: bool) -> anyhow::Result<Applied> {
    let mut out = apply_batch(site, std::slice::from_ref(ev), from_parked).await?;
    Ok(out.remove(0))
}

/// Apply events in one transaction (one commit for the lot): all or none.
pub async fn apply_batch(
    site: &Site,
    events: &[Event],
    from_parked: bool,
) -> anyhow::Result<Vec<Applied>> {
    let mut conn = site.db.pool().acquire().await.map_err(|e| site.db.err(e))?;
    let mut tx = sqlx::Connection::begin(&mut *conn)
        .await
        .map_err(|e| site.db.err(e))?;
    begin_applying(site, &mut tx).await?;
    let mut results = Vec::with_capacity(events.len());
    let mut observed = false;
    let mut clock = site.lock_clock(&mut tx).await?;
    let mut cache = Cache::prefetch(site, &mut tx, events).await?;
    for ev in events {
        let r = apply_in(site, &mut tx, ev, from_parked, &mut cache).await?;
        if matches!(r.0, Outcome::Applied | Outcome::Unchanged) {
            observed = true;
            for v in ev.versions.values().chain(std::iter::once(&ev.version)) {
                if let Some((wall, counter, _)) = v.parts() {
                    clock.observe(wall, counter);
                }
            }
        }
        results.push(r);
    }
    cache.flush(site, &mut tx).await?;
    if observed {
        site.save_clock(&mut tx, clock).await?;
    }
    end_applying(site, &mut tx).await?;
    tx.commit().await.map_err(|e| site.db.err(e))?;
    drop(conn);
    site.wrote(u64::try_from(events.len()).unwrap_or(u64::MAX));
    Ok(results)
}

/// Apply one event inside the caller's transaction (capture already silenced).
async fn apply_in(
    site: &Site,
    tx: &mut AnyConnection,
    ev: &Event,
    from_parked: bool,
    cache: &mut Cache,
) -> anyhow::Result<Applied> {
    let e = site.engine();
    let seen = cache.seen(&ev.id);
    if seen {
        if from_parked {
            unpark(site, tx, &ev.id).await?;
        }
        return Ok((Outcome::Duplicate, None));
    }
    let mut created = None;
    let outcome = match ev.op {
        Op::Save | Op::Delete => {
            let o = site.plan.objects[&ev.object_type].clone();
            if ev.op == Op::Save {
                apply_save(site, tx, &o, ev, &mut created, cache).await?
            } else {
                apply_delete(site, tx, &o, ev, cache).await?
            }
        }
        Op::Connect | Op::Disconnect => apply_link(site, tx, ev, cache).await?,
    };
    match &outcome {
        Park::Waiting(ty, uuid) => {
            unpark(site, tx, &ev.id).await?;
            let sql = format!(
                "INSERT INTO labrelay_sync_parked (event_id, waiting_type, waiting_uuid, parked_ms, event) VALUES ({}, {}, {}, {}, {})",
                e.placeholder(1),
                e.placeholder(2),
                e.placeholder(3),
                e.placeholder(4),
                e.placeholder(5)
            );
            sqlx::query(&sql)
                .bind(&ev.id)
                .bind(ty.as_str())
                .bind(uuid.as_str())
                .bind(i64::try_from(event::now_ms()).unwrap_or(i64::MAX))
                .bind(serde_json::to_string(ev)?)
                .execute(&mut *tx)
                .await
                .map_err(|e| site.db.err(e))?;
            Ok((Outcome::Parked, None))
        }
        Park::Done(changed) => {
            if from_parked {
                unpark(site, tx, &ev.id).await?;
            }
            cache.inbox(ev, if *changed { "applied" } else { "unchanged" });
            let outcome = if *changed {
                Outcome::Applied
            } else {
                Outcome::Unchanged
            };
            Ok((outcome, created))
        }
    }
}

async fn unpark(site: &Site, conn: &mut AnyConnection, event_id: &str) -> anyhow::Result<()> {
    exec(
        site,
        conn,
        &format!(
            "DELETE FROM labrelay_sync_parked WHERE event_id = {}",
            site.engine().placeholder(1)
        ),
        &[event_id],
    )
    .await?;
    Ok(())
}

enum Park {
    /// Applied or found stale; `true` when something changed.
    Done(bool),
    /// Waiting for (type, uuid).
    Waiting(String, String),
}

/// Find the local row of `r`: by identity, or adopt a pre-existing row with the same
/// match fields.
async fn resolve_object(
    site: &Site,
    conn: &mut AnyConnection,
    spec: &ObjectSpec,
    wanted: &Ref,
    fields: &BTreeMap<String, Value>,
    cache: &mut Cache,
) -> anyhow::Result<Option<String>> {
    if let Some(k) = cache.local_key(site, conn, &spec.name, wanted).await? {
        return Ok(Some(k));
    }
    if spec.match_fields.is_empty() || !spec.match_fields.iter().all(|m| fields.contains_key(m)) {
        return Ok(None);
    }
    let e = site.engine();
    let key_text = match e {
        Engine::Mysql => format!("CAST({} AS CHAR)", q(e, &spec.key)),
        Engine::Postgres | Engine::Sqlite => format!("CAST({} AS TEXT)", q(e, &spec.key)),
    };
    // Only rows without an identity can be adopted; once per transaction, find out
    // whether there are any (rows this transaction inserts get one at once).
    // The queries below read labrelay_sync_ids: write what the batch recorded first.
    cache.flush_ids(site, conn).await?;
    if !cache.unmapped.contains_key(&spec.name) {
        let sql = format!(
            "SELECT 1 FROM {table} WHERE {key_text} NOT IN \
             (SELECT local_key FROM labrelay_sync_ids WHERE object_type = {p}) LIMIT 1",
            table = q(e, &spec.table),
            p = e.placeholder(1)
        );
        let any = sqlx::query(&sql)
            .bind(spec.name.clone())
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| site.db.err(e))?
            .is_some();
        cache.unmapped.insert(spec.name.clone(), any);
    }
    if cache.unmapped.get(&spec.name) == Some(&false) {
        return Ok(None);
    }
    let mut conds = Vec::new();
    for (i, m) in spec.match_fields.iter().enumerate() {
        let f = spec.field(m).map_or(m.as_str(), |f| f.column.as_str());
        conds.push(format!("{} = {}", q(e, f), e.placeholder(i + 1)));
    }
    let n = spec.match_fields.len();
    let sql = format!(
        "SELECT {key} FROM {table} WHERE {conds} AND {cast} NOT IN \
         (SELECT local_key FROM labrelay_sync_ids WHERE object_type = {p})",
        key = q(e, &spec.key),
        table = q(e, &spec.table),
        conds = conds.join(" AND "),
        cast = key_text,
        p = e.placeholder(n + 1),
    );
    let mut query = sqlx::query(&sql);
    for m in &spec.match_fields {
        let f = spec.field(m).map_or(FieldType::Text, |f| f.ty);
        query = bind_value(query, &fields[m], f, e);
    }
    query = query.bind(spec.name.clone());
    let rows = query
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| site.db.err(e))?;
    if rows.len() != 1 {
        return Ok(None);
    }
    let key = crate::site::read_key(&rows[0], 0, spec.key_type).map_err(|e| site.db.err(e))?;
    cache.record_id(&spec.name, wanted, &key);
    tracing::info!(object = %spec.name, uuid = %wanted.uuid, key, "adopted an existing row matching the synced object");
    Ok(Some(key))
}

async fn apply_save(
    site: &Site,
    conn: &mut AnyConnection,
    spec: &ObjectSpec,
    ev: &Event,
    created: &mut Option<(String, String)>,
    cache: &mut Cache,
) -> anyhow::Result<Park> {
    let e = site.engine();
    // References first: anything missing parks the whole change.
    let mut local_values: BTreeMap<String, Value> = BTreeMap::new();
    let mut canon: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (name, value) in &ev.fields {
        let Some(f) = spec.field(name) else { continue };
        match (&f.reference, value) {
            (Some(target), v) if !v.is_null() => {
                let target_ref: Ref = serde_json::from_value(v.clone())
                    .map_err(|err| Refused(format!("field {name}: not a reference: {err}")))?;
                let Some(key) = cache.local_key(site, conn, target, &target_ref).await? else {
                    return Ok(Park::Waiting(target.clone(), target_ref.uuid));
                };
                let tk = site.plan.objects[target].key_type;
                local_values.insert(
                    name.clone(),
                    match tk {
                        crate::config::KeyType::Integer => key
                            .parse::<i64>()
                            .map_or(Value::String(key.clone()), Value::from),
                        crate::config::KeyType::Text => Value::String(key.clone()),
                    },
                );
                canon.insert(name.clone(), canonical(&Value::String(target_ref.uuid)));
            }
            _ => {
                local_values.insert(name.clone(), value.clone());
                canon.insert(name.clone(), canonical(value));
            }
        }
    }
    let key = resolve_object(site, conn, spec, &ev.object, &ev.fields, cache).await?;
    // A change to some fields of an object this site does not have (its creation is
    // still on the way, or only a bootstrap will bring it) waits for the object.
    if key.is_none() && spec.fields.iter().any(|f| !ev.fields.contains_key(&f.name)) {
        return Ok(Park::Waiting(spec.name.clone(), ev.object.uuid.clone()));
    }
    let stored = cache
        .stored(site, conn, &spec.name, &ev.object.uuid)
        .await?;
    if let Some((_, tomb)) = stored.get("_deleted")
        && tomb >= &ev.version
    {
        return Ok(Park::Done(false));
    }
    let newer: Vec<&String> = local_values
        .keys()
        .filter(|f| stored.get(*f).is_none_or(|(_, v)| ev.field_version(f) > v))
        .collect();
    if newer.is_empty() && key.is_some() {
        return Ok(Park::Done(false));
    }
    let origin_col = site.plan.me().origin_columns.get(&spec.name).cloned();
    let exists = match &key {
        Some(k) => site.read_object(conn, spec, k).await?.is_some(),
        None => false,
    };
    if exists {
        let key = key.clone().unwrap_or_default();
        let mut sets = Vec::new();
        for (i, f) in newer.iter().enumerate() {
            let col = &spec
                .field(f)
                .map_or_else(|| (*f).clone(), |f| f.column.clone());
            sets.push(format!("{} = {}", q(e, col), e.placeholder(i + 1)));
        }
        if let Some(c) = &origin_col {
            sets.push(format!("{} = {}", q(e, c), e.placeholder(sets.len() + 1)));
        }
        if !sets.is_empty() {
            let sql = format!(
                "UPDATE {} SET {} WHERE {} = {}",
                q(e, &spec.table),
                sets.join(", "),
                q(e, &spec.key),
                e.placeholder(sets.len() + 1)
            );
            let mut query = sqlx::query(&sql);
            for f in &newer {
                let ty = spec.field(f).map_or(FieldType::Text, |f| f.ty);
                query = bind_value(query, &local_values[*f], ty, e);
            }
            if origin_col.is_some() {
                query = query.bind(ev.object.origin.clone());
            }
            bind_key(query, &key, spec.key_type)
                .execute(&mut *conn)
                .await
                .map_err(|e| site.db.err(e))?;
        }
    } else {
        // New here (or its row was removed by hand): insert every value we hold.
        let mut cols = Vec::new();
        let mut vals: Vec<(Value, FieldType)> = Vec::new();
        for f in &spec.fields {
            if let Some(v) = local_values.get(&f.name) {
                cols.push(q(e, &f.column));
                vals.push((v.clone(), f.ty));
            }
        }
        if let Some(c) = &origin_col {
            cols.push(q(e, c));
            vals.push((Value::String(ev.object.origin.clone()), FieldType::Text));
        }
        let ph: Vec<String> = (1..=vals.len()).map(|n| e.placeholder(n)).collect();
        let sql = format!(
            "INSERT INTO {} ({}) VALUES ({}) RETURNING {}",
            q(e, &spec.table),
            cols.join(", "),
            ph.join(", "),
            q(e, &spec.key)
        );
        let mut query = sqlx::query(&sql);
        for (v, ty) in &vals {
            query = bind_value(query, v, *ty, e);
        }
        let row = query
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| site.db.err(e))?;
        let new_key = crate::site::read_key(&row, 0, spec.key_type).map_err(|e| site.db.err(e))?;
        if key.is_some() {
            cache
                .remove_id(site, conn, &spec.name, &ev.object.uuid)
                .await?;
        }
        cache.record_id(&spec.name, &ev.object, &new_key);
        *created = Some((spec.name.clone(), ev.object.uuid.clone()));
    }
    let stored_now: Vec<(&str, Option<&str>, &Version)> = newer
        .iter()
        .map(|f| {
            (
                f.as_str(),
                canon.get(*f).and_then(Option::as_deref),
                ev.field_version(f),
            )
        })
        .collect();
    cache.store(&spec.name, &ev.object.uuid, &stored_now);
    if stored.contains_key("_deleted") {
        cache
            .remove_field(site, conn, &spec.name, &ev.object.uuid, "_deleted")
            .await?;
    }
    Ok(Park::Done(true))
}

async fn apply_delete(
    site: &Site,
    conn: &mut AnyConnection,
    o: &ObjectSpec,
    ev: &Event,
    cache: &mut Cache,
) -> anyhow::Result<Park> {
    let e = site.engine();
    let Some(key) = cache.local_key(site, conn, &o.name, &ev.object).await? else {
        return Ok(Park::Done(false));
    };
    let stored = cache.stored(site, conn, &o.name, &ev.object.uuid).await?;
    if o.allow_delete {
        // A change newer than the delete (re-created or edited after) keeps the object.
        if stored.values().any(|(_, v)| v > &ev.version) {
            return Ok(Park::Done(false));
        }
        let sql = format!(
            "DELETE FROM {} WHERE {} = {}",
            q(e, &o.table),
            q(e, &o.key),
            e.placeholder(1)
        );
        let n = bind_key(sqlx::query(&sql), &key, o.key_type)
            .execute(&mut *conn)
            .await
            .map_err(|e| site.db.err(e))?
            .rows_affected();
        cache.store(
            &o.name,
            &ev.object.uuid,
            &[("_deleted", Some("true"), &ev.version)],
        );
        return Ok(Park::Done(n > 0));
    }
    // Deletes are not allowed: the delete is a deactivation with the delete's version.
    let Some(active) = o.active.as_ref().and_then(|a| o.field(a)) else {
        return Ok(Park::Done(false));
    };
    if stored
        .get(&active.name)
        .is_some_and(|(_, v)| v >= &ev.version)
    {
        return Ok(Park::Done(false));
    }
    let sql = format!(
        "UPDATE {} SET {} = {} WHERE {} = {}",
        q(e, &o.table),
        q(e, &active.column),
        e.placeholder(1),
        q(e, &o.key),
        e.placeholder(2)
    );
    let query = bind_value(sqlx::query(&sql), &Value::Bool(false), FieldType::Bool, e);
    bind_key(query, &key, o.key_type)
        .execute(&mut *conn)
        .await
        .map_err(|e| site.db.err(e))?;
    let inactive = canonical(&Value::Bool(false));
    cache.store(
        &o.name,
        &ev.object.uuid,
        &[(&active.name, inactive.as_deref(), &ev.version)],
    );
    Ok(Park::Done(true))
}

async fn apply_link(
    site: &Site,
    conn: &mut AnyConnection,
    ev: &Event,
    cache: &mut Cache,
) -> anyhow::Result<Park> {
    let e = site.engine();
    let l = site.plan.links[&ev.object_type].clone();
    let Some(right) = &ev.right else {
        return Ok(Park::Done(false));
    };
    let Some(lk) = cache
        .local_key(site, conn, &l.left.object, &ev.object)
        .await?
    else {
        return Ok(Park::Waiting(l.left.object.clone(), ev.object.uuid.clone()));
    };
    let Some(rk) = cache.local_key(site, conn, &l.right.object, right).await? else {
        return Ok(Park::Waiting(l.right.object.clone(), right.uuid.clone()));
    };
    let id = Event::link_id(&ev.object.uuid, &right.uuid);
    let stored = cache.stored(site, conn, &l.name, &id).await?;
    if stored.get("_linked").is_some_and(|(_, v)| v >= &ev.version) {
        return Ok(Park::Done(false));
    }
    let lt = site.plan.objects[&l.left.object].key_type;
    let rt = site.plan.objects[&l.right.object].key_type;
    let pair_cond = format!(
        "{} = {} AND {} = {}",
        q(e, &l.left.column),
        e.placeholder(1),
        q(e, &l.right.column),
        e.placeholder(2)
    );
    let present = bind_key(
        bind_key(
            sqlx::query(&format!(
                "SELECT 1 FROM {} WHERE {pair_cond}",
                q(e, &l.table)
            )),
            &lk,
            lt,
        ),
        &rk,
        rt,
    )
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| site.db.err(e))?
    .is_some();
    let changed = match (ev.op, present) {
        (Op::Connect, false) => {
            let sql = format!(
                "INSERT INTO {} ({}, {}) VALUES ({}, {})",
                q(e, &l.table),
                q(e, &l.left.column),
                q(e, &l.right.column),
                e.placeholder(1),
                e.placeholder(2)
            );
            bind_key(bind_key(sqlx::query(&sql), &lk, lt), &rk, rt)
                .execute(&mut *conn)
                .await
                .map_err(|e| site.db.err(e))?;
            true
        }
        (Op::Disconnect, true) => {
            let sql = format!("DELETE FROM {} WHERE {pair_cond}", q(e, &l.table));
            bind_key(bind_key(sqlx::query(&sql), &lk, lt), &rk, rt)
                .execute(&mut *conn)
                .await
                .map_err(|e| site.db.err(e))?;
            true
        }
        _ => false,
    };
    let linked = if ev.op == Op::Connect {
        "true"
    } else {
        "false"
    };
    cache.store(&l.name, &id, &[("_linked", Some(linked), &ev.version)]);
    Ok(Park::Done(changed))
}

/// Apply the parked events that wait for the objects just created (`waiting`: type,
/// uuid), and those waiting for what they create in turn; with `waiting` empty, every
/// parked event once. Events found together are applied in one transaction (one by one
/// when that fails). Returns how many were applied.
pub async fn retry_parked(site: &Site, waiting: Vec<(String, String)>) -> anyhow::Result<u64> {
    if count(site, "SELECT COUNT(*) FROM labrelay_sync_parked").await? == 0 {
        return Ok(0);
    }
    let mut applied = 0;
    let mut frontier = waiting;
    let mut everything = frontier.is_empty();
    while everything || !frontier.is_empty() {
        let events = if everything {
            everything = false;
            parked_events(site, None).await?
        } else {
            parked_events(site, Some(std::mem::take(&mut frontier))).await?
        };
        if events.is_empty() {
            break;
        }
        let results = if let Ok(results) = apply_batch(site, &events, true).await {
            results
        } else {
            let mut results = Vec::with_capacity(events.len());
            for ev in &events {
                results.push(apply(site, ev, true).await?);
            }
            results
        };
        for (outcome, created) in results {
            if outcome == Outcome::Applied {
                applied += 1;
            }
            frontier.extend(created);
        }
    }
    Ok(applied)
}

/// Parked events waiting for any of `waiting` (all of them with `None`), oldest first.
async fn parked_events(
    site: &Site,
    waiting: Option<Vec<(String, String)>>,
) -> anyhow::Result<Vec<Event>> {
    let select = "SELECT event, parked_ms FROM labrelay_sync_parked";
    let rows = match waiting {
        None => sqlx::query(select)
            .fetch_all(site.db.pool())
            .await
            .map_err(|e| site.db.err(e))?,
        Some(waiting) => {
            let mut conn = site.db.pool().acquire().await.map_err(|e| site.db.err(e))?;
            let pairs = waiting.iter().map(|(t, u)| (t.as_str(), u.as_str()));
            crate::cache::select_by_type(
                site,
                &mut conn,
                select,
                "waiting_type",
                "waiting_uuid",
                pairs,
            )
            .await?
            .into_iter()
            .map(|(_, row)| row)
            .collect()
        }
    };
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let parked_ms: i64 = row.try_get(1).map_err(|e| site.db.err(e))?;
        let ev: Event = serde_json::from_str(&labrelay::db::text(&row, 0)?)?;
        events.push((parked_ms, ev));
    }
    events.sort_by_key(|(ms, _)| *ms);
    Ok(events.into_iter().map(|(_, ev)| ev).collect())
}

/// Record a message that will never be applied, with the reason.
pub async fn record_dead(site: &Site, delivery: &Delivery, reason: &str) -> anyhow::Result<()> {
    let e = site.engine();
    let sql = format!(
        "INSERT INTO labrelay_sync_dead (event_id, site, reason, dead_ms, body) VALUES ({}, {}, {}, {}, {})",
        e.placeholder(1),
        e.placeholder(2),
        e.placeholder(3),
        e.placeholder(4),
        e.placeholder(5)
    );
    let reason: String = reason.chars().take(900).collect();
    sqlx::query(&sql)
        .bind(delivery.message_id.clone())
        .bind(delivery.headers.get(event::SITE_HEADER).cloned())
        .bind(reason)
        .bind(i64::try_from(event::now_ms()).unwrap_or(i64::MAX))
        .bind(String::from_utf8_lossy(&delivery.body).into_owned())
        .execute(site.db.pool())
        .await
        .map_err(|e| site.db.err(e))?;
    Ok(())
}

/// A count from a one-value query.
pub async fn count(site: &Site, sql: &str) -> anyhow::Result<i64> {
    let row = sqlx::query(sql)
        .fetch_one(site.db.pool())
        .await
        .map_err(|e| site.db.err(e))?;
    Ok(row
        .try_get::<Option<i64>, _>(0)
        .map_err(|e| site.db.err(e))?
        .unwrap_or(0))
}
