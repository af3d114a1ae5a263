//! Bootstrap (publish a snapshot), reconcile (compare two sites) and status.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

use crate::event::{Clock, Event, FORMAT, Op, Ref, Version};
use crate::relay::{Publisher, wire_values};
use crate::site::Site;

/// One object as a site holds it: identity, wire values, canonical texts, versions.
#[derive(Debug, Clone)]
pub struct Snap {
    /// Identity.
    pub object: Ref,
    /// Wire values.
    pub values: BTreeMap<String, Value>,
    /// Canonical texts (a reference by uuid).
    pub canon: BTreeMap<String, Option<String>>,
    /// Stored versions of fields whose stored value is the current one.
    pub versions: BTreeMap<String, Version>,
}

/// Every non-temporary object of a type at a site, by uuid. Reads only.
pub async fn snapshot(site: &Site, object_type: &str) -> anyhow::Result<BTreeMap<String, Snap>> {
    let o = &site.plan.objects[object_type];
    let rows = site.all_objects(o).await?;
    let fields = site.all_fields(object_type).await?;
    let mut conn = site.db.pool().acquire().await.map_err(|e| site.db.err(e))?;
    let mut out = BTreeMap::new();
    for row in rows {
        if row.temporary {
            continue;
        }
        let object = site.ref_of(&mut conn, object_type, &row.key, false).await?;
        let wire = wire_values(site, &mut conn, o, &row.values, false).await?;
        let stored = fields.get(&object.uuid);
        let mut snap = Snap {
            object: object.clone(),
            values: BTreeMap::new(),
            canon: BTreeMap::new(),
            versions: BTreeMap::new(),
        };
        for (name, (value, canon)) in wire {
            if let Some((v, version)) = stored.and_then(|s| s.get(&name))
                && v == &canon
            {
                snap.versions.insert(name.clone(), version.clone());
            }
            snap.values.insert(name.clone(), value);
            snap.canon.insert(name, canon);
        }
        out.insert(object.uuid.clone(), snap);
    }
    Ok(out)
}

/// One link as a site holds it: both ends and the version of its `_linked` state when
/// the stored one says linked.
#[derive(Debug, Clone)]
pub struct LinkSnap {
    /// Left end.
    pub left: Ref,
    /// Right end.
    pub right: Ref,
    /// Stored version of the link, if any.
    pub version: Option<Version>,
}

/// Every link of a link type whose two ends are synced objects (not temporary), by link
/// id. Reads only.
pub async fn link_snapshot(site: &Site, link: &str) -> anyhow::Result<BTreeMap<String, LinkSnap>> {
    let l = &site.plan.links[link];
    let mut live: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for object_type in [&l.left.object, &l.right.object] {
        if !live.contains_key(object_type.as_str()) {
            let rows = site.all_objects(&site.plan.objects[object_type]).await?;
            let keys = rows.into_iter().filter(|r| !r.temporary).map(|r| r.key);
            live.insert(object_type, keys.collect());
        }
    }
    let fields = site.all_fields(link).await?;
    let mut conn = site.db.pool().acquire().await.map_err(|e| site.db.err(e))?;
    let mut out = BTreeMap::new();
    for (lk, rk) in site.all_links(l).await? {
        if !live[l.left.object.as_str()].contains(&lk)
            || !live[l.right.object.as_str()].contains(&rk)
        {
            continue;
        }
        let left = site.ref_of(&mut conn, &l.left.object, &lk, false).await?;
        let right = site.ref_of(&mut conn, &l.right.object, &rk, false).await?;
        let id = Event::link_id(&left.uuid, &right.uuid);
        let version = fields
            .get(&id)
            .and_then(|f| f.get("_linked"))
            .filter(|(value, _)| value.as_deref() == Some("true"))
            .map(|(_, version)| version.clone());
        out.insert(
            id,
            LinkSnap {
                left,
                right,
                version,
            },
        );
    }
    Ok(out)
}

fn link_event(site: &Site, link: &str, snap: &LinkSnap, version: Version) -> Event {
    Event {
        format: FORMAT,
        id: uuid::Uuid::new_v4().to_string(),
        site: site.name().to_owned(),
        object_type: link.to_owned(),
        op: Op::Connect,
        object: snap.left.clone(),
        right: Some(snap.right.clone()),
        version,
        fields: BTreeMap::new(),
        versions: BTreeMap::new(),
    }
}

/// What bootstrap published.
#[derive(Debug, Default, Serialize)]
pub struct BootstrapStats {
    /// Objects published, by type.
    pub published: BTreeMap<String, u64>,
    /// Messages no queue took.
    pub unrouted: u64,
}

fn snapshot_event(site: &Site, object_type: &str, snap: &Snap, version: &Version) -> Event {
    let mut ev = Event {
        format: FORMAT,
        id: uuid::Uuid::new_v4().to_string(),
        site: site.name().to_owned(),
        object_type: object_type.to_owned(),
        op: Op::Save,
        object: snap.object.clone(),
        right: None,
        version: version.clone(),
        fields: snap.values.clone(),
        versions: BTreeMap::new(),
    };
    for name in snap.values.keys() {
        let v = snap
            .versions
            .get(name)
            .cloned()
            .unwrap_or_else(|| Version::zero(site.name()));
        if &v != version {
            ev.versions.insert(name.clone(), v);
        }
    }
    ev
}

/// Publish every object this site publishes, with the versions it holds (fields never
/// changed since syncing began get the lowest version, so they never override a real
/// change elsewhere). Writes nothing at this site.
pub async fn bootstrap(site: &Site, publisher: &Publisher<'_>) -> anyhow::Result<BootstrapStats> {
    let mut stats = BootstrapStats::default();
    // Referenced types first (org units before users before labs) keeps parking rare.
    for object_type in order_by_references(site) {
        if !site.plan.publishes(site.name(), &object_type, "save") {
            continue;
        }
        let snaps = snapshot(site, &object_type).await?;
        let mut n = 0;
        let all: Vec<&Snap> = snaps.values().collect();
        for chunk in all.chunks(site.plan.cfg.batch) {
            let mut events = Vec::with_capacity(chunk.len());
            for snap in chunk {
                let ev = snapshot_event(site, &object_type, snap, &Version::zero(site.name()));
                events.push((ev.id.clone(), ev.routing_key(), serde_json::to_vec(&ev)?));
            }
            for routed in publisher.publish_many(&events).await? {
                if routed {
                    n += 1;
                } else {
                    stats.unrouted += 1;
                }
            }
        }
        stats.published.insert(object_type, n);
    }
    // Links after the objects they join.
    for link in site.plan.links.keys() {
        if !site.plan.publishes(site.name(), link, "connect") {
            continue;
        }
        let snaps = link_snapshot(site, link).await?;
        let mut n = 0;
        let all: Vec<&LinkSnap> = snaps.values().collect();
        for chunk in all.chunks(site.plan.cfg.batch) {
            let mut events = Vec::with_capacity(chunk.len());
            for snap in chunk {
                let version = snap
                    .version
                    .clone()
                    .unwrap_or_else(|| Version::zero(site.name()));
                let ev = link_event(site, link, snap, version);
                events.push((ev.id.clone(), ev.routing_key(), serde_json::to_vec(&ev)?));
            }
            for routed in publisher.publish_many(&events).await? {
                if routed {
                    n += 1;
                } else {
                    stats.unrouted += 1;
                }
            }
        }
        stats.published.insert(link.clone(), n);
    }
    Ok(stats)
}

/// Object types, referenced ones before those referring to them.
pub fn order_by_references(site: &Site) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut left: Vec<&crate::config::ObjectSpec> = site.plan.objects.values().collect();
    while !left.is_empty() {
        let before = left.len();
        left.retain(|o| {
            let ready = o.fields.iter().all(|f| {
                f.reference
                    .as_ref()
                    .is_none_or(|r| r == &o.name || out.contains(r))
            });
            if ready {
                out.push(o.name.clone());
            }
            !ready
        });
        if left.len() == before {
            // A cycle: the rest in name order; parking sorts it out.
            out.extend(left.iter().map(|o| o.name.clone()));
            break;
        }
    }
    out
}

/// One difference found by reconcile.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Object type.
    #[serde(rename = "object_type")]
    pub object_type: String,
    /// Object uuid.
    pub uuid: String,
    /// `missing_at_other`, `missing_here`, `stale_at_other`, `stale_here`, `conflict`.
    pub kind: &'static str,
    /// The fields that differ.
    pub fields: Vec<String>,
    /// Whether `--repair` re-published it.
    pub repaired: bool,
}

/// Compare `site` with `other`, object by object. With `repair`, re-publish from `site`
/// every object `other` lacks or holds older or conflicting values of, with fresh
/// versions so that `other` takes them.
pub async fn reconcile(
    site: &Site,
    other: &Site,
    publisher: Option<&Publisher<'_>>,
) -> anyhow::Result<Vec<Finding>> {
    let mut findings = Vec::new();
    for object_type in order_by_references(site) {
        let mine = snapshot(site, &object_type).await?;
        let theirs = snapshot(other, &object_type).await?;
        let uuids: BTreeSet<&String> = mine.keys().chain(theirs.keys()).collect();
        for uuid in uuids {
            let spec = &site.plan.objects[&object_type];
            // Where deletes are not allowed, a site that deleted its row while the
            // others hold it deactivated is in sync: that is what its delete meant.
            let deactivated = |snap: &Snap| {
                !spec.allow_delete
                    && spec
                        .active
                        .as_ref()
                        .is_some_and(|a| snap.values.get(a) == Some(&Value::Bool(false)))
            };
            let finding = match (mine.get(uuid), theirs.get(uuid)) {
                (Some(a), None) if deactivated(a) => None,
                (None, Some(b)) if deactivated(b) => None,
                (Some(_), None) => Some(("missing_at_other", Vec::new())),
                (None, Some(_)) => Some(("missing_here", Vec::new())),
                (Some(a), Some(b)) => {
                    let differ: Vec<String> = a
                        .canon
                        .iter()
                        .filter(|(k, v)| b.canon.get(*k) != Some(*v))
                        .map(|(k, _)| k.clone())
                        .collect();
                    if differ.is_empty() {
                        None
                    } else {
                        let mut kind = "conflict";
                        let (mut ahead_here, mut ahead_other) = (false, false);
                        for f in &differ {
                            match (a.versions.get(f), b.versions.get(f)) {
                                (Some(x), Some(y)) if x > y => ahead_here = true,
                                (Some(x), Some(y)) if x < y => ahead_other = true,
                                (Some(_), None) => ahead_here = true,
                                (None, Some(_)) => ahead_other = true,
                                _ => {}
                            }
                        }
                        if ahead_here && !ahead_other {
                            kind = "stale_at_other";
                        } else if ahead_other && !ahead_here {
                            kind = "stale_here";
                        }
                        Some((kind, differ))
                    }
                }
                (None, None) => None,
            };
            if let Some((kind, fields)) = finding {
                findings.push(Finding {
                    object_type: object_type.clone(),
                    uuid: uuid.clone(),
                    kind,
                    fields,
                    repaired: false,
                });
            }
        }
        if let Some(publisher) = publisher {
            for f in findings.iter_mut().filter(|f| {
                f.object_type == object_type && f.kind != "missing_here" && f.kind != "stale_here"
            }) {
                let snap = &mine[&f.uuid];
                let fields: Vec<(&str, Option<&str>)> = snap
                    .canon
                    .iter()
                    .map(|(name, canon)| (name.as_str(), canon.as_deref()))
                    .collect();
                let version = fresh_version(site, &object_type, &f.uuid, &fields).await?;
                let mut ev = snapshot_event(site, &object_type, snap, &version);
                ev.versions.clear();
                publisher.publish_event(&ev).await?;
                f.repaired = true;
            }
        }
    }
    for link in site.plan.links.keys() {
        let mine = link_snapshot(site, link).await?;
        let theirs = link_snapshot(other, link).await?;
        for (id, kind) in mine
            .keys()
            .filter(|id| !theirs.contains_key(*id))
            .map(|id| (id, "missing_at_other"))
            .chain(
                theirs
                    .keys()
                    .filter(|id| !mine.contains_key(*id))
                    .map(|id| (id, "missing_here")),
            )
        {
            let mut finding = Finding {
                object_type: link.clone(),
                uuid: id.clone(),
                kind,
                fields: Vec::new(),
                repaired: false,
            };
            if let (Some(publisher), "missing_at_other") = (publisher, kind) {
                let version = fresh_version(site, link, id, &[("_linked", Some("true"))]).await?;
                publisher
                    .publish_event(&link_event(site, link, &mine[id], version))
                    .await?;
                finding.repaired = true;
            }
            findings.push(finding);
        }
    }
    Ok(findings)
}

/// Stamp a fresh version on `fields` (name, canonical value) of object or link `uuid`
/// and store them at `site`, so re-published values win at the other site and stay
/// consistent here.
async fn fresh_version(
    site: &Site,
    o_type: &str,
    uuid: &str,
    fields: &[(&str, Option<&str>)],
) -> anyhow::Result<Version> {
    let mut tx = site.db.pool().begin().await.map_err(|e| site.db.err(e))?;
    let mut clock: Clock = site.lock_clock(&mut tx).await?;
    clock.tick(crate::event::now_ms());
    let version = clock.version(site.name());
    let fields: Vec<(&str, Option<&str>, &Version)> = fields
        .iter()
        .map(|(name, canon)| (*name, *canon, &version))
        .collect();
    site.store_fields(&mut tx, o_type, uuid, &fields).await?;
    site.save_clock(&mut tx, clock).await?;
    tx.commit().await.map_err(|e| site.db.err(e))?;
    Ok(version)
}

/// `status`: the site's backlog and health.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The site.
    pub site: String,
    /// Outbox rows by state.
    pub outbox: BTreeMap<String, i64>,
    /// Rows not yet published (`new` + `ready`).
    pub backlog: i64,
    /// Events applied here.
    pub applied: i64,
    /// When the last one was applied (ms since the epoch).
    pub last_applied_ms: Option<i64>,
    /// Events waiting for an object they refer to.
    pub parked: i64,
    /// Messages refused or failing too often, recorded here.
    pub dead: i64,
    /// Messages in this site's dead-letter queue now (when the broker was reachable).
    pub dead_queue: Option<u64>,
    /// Messages waiting in this site's queue now.
    pub queued: Option<u64>,
}

/// Gather the status.
pub async fn status(
    site: &Site,
    broker: Option<&labrelay::queue::AnyBroker>,
) -> anyhow::Result<Status> {
    use labrelay::queue::Broker;
    let outbox = crate::relay::outbox_counts(site).await?;
    let backlog =
        outbox.get("new").copied().unwrap_or(0) + outbox.get("ready").copied().unwrap_or(0);
    let applied = crate::apply::count(site, "SELECT COUNT(*) FROM labrelay_sync_inbox").await?;
    let last = crate::apply::count(site, "SELECT MAX(applied_ms) FROM labrelay_sync_inbox").await?;
    let parked = crate::apply::count(site, "SELECT COUNT(*) FROM labrelay_sync_parked").await?;
    let dead = crate::apply::count(site, "SELECT COUNT(*) FROM labrelay_sync_dead").await?;
    let (mut dead_queue, mut queued) = (None, None);
    if let Some(b) = broker
        && site.plan.me().consume
    {
        let q = site.plan.queue_name(site.name());
        queued = b.ready_count(&q).await.ok();
        dead_queue = b
            .ready_count(&labrelay::queue::dead_letter_name(&q))
            .await
            .ok();
    }
    Ok(Status {
        site: site.name().to_owned(),
        outbox,
        backlog,
        applied,
        last_applied_ms: (last > 0).then_some(last),
        parked,
        dead,
        dead_queue,
        queued,
    })
}
