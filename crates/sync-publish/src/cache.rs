//! What one apply transaction knows about the site and has yet to write: the inbox ids,
//! identities and field versions of every object a batch of events touches are read
//! in a few set queries up front, and the inbox, identity and field rows the batch
//! writes go out as multi-row statements before the commit. A batch of N events then
//! costs about N statements (the LIMS row writes) instead of 7 N.

use std::collections::{BTreeMap, HashMap, HashSet};

use labrelay::db::Engine;
use sqlx::AnyConnection;
use sqlx::any::AnyRow;

use crate::event::{self, Event, Op, Ref, Version};
use crate::site::Site;

/// Field values and versions of one object: field -> (canonical value, version).
pub type Fields = BTreeMap<String, (Option<String>, Version)>;

/// Rows per multi-row statement (well under every engine's bind limit).
const CHUNK: usize = 500;

/// The batch's view of the bookkeeping tables.
#[derive(Default)]
pub struct Cache {
    seen: HashSet<String>,
    ids: HashMap<(String, String), Option<String>>,
    /// (type, local key) -> identity, for the relay.
    keys: HashMap<(String, String), Ref>,
    fields: HashMap<(String, String), Fields>,
    /// Per object type: whether rows without an identity exist (adoption possible).
    pub unmapped: BTreeMap<String, bool>,
    new_ids: Vec<(String, Ref, String)>,
    new_fields: BTreeMap<(String, String, String), (Option<String>, Version)>,
    inbox: Vec<(String, String, &'static str)>,
}

fn placeholders(e: Engine, from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| e.placeholder(i))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The rows of `{select} WHERE {type_column} = ? AND {column} IN (…)` for (type, value)
/// pairs: grouped by type, so each query uses the table's (type, …) key, and chunked;
/// each row with its type.
pub async fn select_by_type<'a>(
    site: &Site,
    conn: &mut AnyConnection,
    select: &str,
    type_column: &str,
    column: &str,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> anyhow::Result<Vec<(String, AnyRow)>> {
    let e = site.engine();
    let mut by_type: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (t, v) in pairs {
        by_type.entry(t).or_default().push(v);
    }
    let mut out = Vec::new();
    for (t, values) in by_type {
        for chunk in values.chunks(CHUNK) {
            let sql = format!(
                "{select} WHERE {type_column} = {} AND {column} IN ({})",
                e.placeholder(1),
                placeholders(e, 2, chunk.len())
            );
            let mut q = sqlx::query(&sql).bind(t);
            for v in chunk {
                q = q.bind(*v);
            }
            for row in q.fetch_all(&mut *conn).await.map_err(|e| site.db.err(e))? {
                out.push((t.to_owned(), row));
            }
        }
    }
    Ok(out)
}

impl Cache {
    /// Read what `events` will look up, in a few queries.
    pub async fn prefetch(
        site: &Site,
        conn: &mut AnyConnection,
        events: &[Event],
    ) -> anyhow::Result<Cache> {
        let e = site.engine();
        let mut cache = Cache::default();
        let ids: Vec<&str> = events.iter().map(|ev| ev.id.as_str()).collect();
        // (type, uuid) of every object and reference, and the uuids whose fields matter.
        let mut objects: HashSet<(String, String)> = HashSet::new();
        let mut field_keys: HashSet<(String, String)> = HashSet::new();
        for ev in events {
            match ev.op {
                Op::Save | Op::Delete => {
                    let Some(spec) = site.plan.objects.get(&ev.object_type) else {
                        continue;
                    };
                    objects.insert((ev.object_type.clone(), ev.object.uuid.clone()));
                    field_keys.insert((ev.object_type.clone(), ev.object.uuid.clone()));
                    for f in &spec.fields {
                        if let (Some(target), Some(v)) = (&f.reference, ev.fields.get(&f.name))
                            && let Ok(r) = serde_json::from_value::<Ref>(v.clone())
                        {
                            objects.insert((target.clone(), r.uuid));
                        }
                    }
                }
                Op::Connect | Op::Disconnect => {
                    let (Some(l), Some(right)) = (site.plan.links.get(&ev.object_type), &ev.right)
                    else {
                        continue;
                    };
                    objects.insert((l.left.object.clone(), ev.object.uuid.clone()));
                    objects.insert((l.right.object.clone(), right.uuid.clone()));
                    field_keys.insert((
                        ev.object_type.clone(),
                        Event::link_id(&ev.object.uuid, &right.uuid),
                    ));
                }
            }
        }
        for chunk in ids.chunks(CHUNK) {
            let sql = format!(
                "SELECT event_id FROM labrelay_sync_inbox WHERE event_id IN ({})",
                placeholders(e, 1, chunk.len())
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(*id);
            }
            for row in q.fetch_all(&mut *conn).await.map_err(|e| site.db.err(e))? {
                cache.seen.insert(labrelay::db::text(&row, 0)?);
            }
        }
        let pairs = objects.iter().map(|(t, u)| (t.as_str(), u.as_str()));
        let select = "SELECT uuid, local_key FROM labrelay_sync_ids";
        for (t, row) in select_by_type(site, conn, select, "object_type", "uuid", pairs).await? {
            cache.ids.insert(
                (t, labrelay::db::text(&row, 0)?),
                Some(labrelay::db::text(&row, 1)?),
            );
        }
        for key in objects {
            cache.ids.entry(key).or_insert(None);
        }
        cache.load_fields(site, conn, &field_keys).await?;
        Ok(cache)
    }

    /// Read the stored fields of objects (type, uuid) not read yet.
    pub async fn load_fields(
        &mut self,
        site: &Site,
        conn: &mut AnyConnection,
        keys: &HashSet<(String, String)>,
    ) -> anyhow::Result<()> {
        let pairs = keys
            .iter()
            .filter(|k| !self.fields.contains_key(*k))
            .map(|(t, u)| (t.as_str(), u.as_str()));
        let select = "SELECT uuid, field, value, version FROM labrelay_sync_fields";
        for (t, row) in select_by_type(site, conn, select, "object_type", "uuid", pairs).await? {
            self.fields
                .entry((t, labrelay::db::text(&row, 0)?))
                .or_default()
                .insert(
                    labrelay::db::text(&row, 1)?,
                    (
                        labrelay::db::opt_text(&row, 2)?,
                        Version(labrelay::db::text(&row, 3)?),
                    ),
                );
        }
        for key in keys {
            self.fields.entry(key.clone()).or_default();
        }
        Ok(())
    }

    /// Read the identities of local objects (type, key) not read yet.
    pub async fn load_refs(
        &mut self,
        site: &Site,
        conn: &mut AnyConnection,
        wanted: &HashSet<(String, String)>,
    ) -> anyhow::Result<()> {
        let pairs = wanted
            .iter()
            .filter(|k| !self.keys.contains_key(*k))
            .map(|(t, k)| (t.as_str(), k.as_str()));
        let select = "SELECT local_key, uuid, origin, origin_key FROM labrelay_sync_ids";
        for (t, row) in
            select_by_type(site, conn, select, "object_type", "local_key", pairs).await?
        {
            let r = Ref {
                uuid: labrelay::db::text(&row, 1)?,
                origin: labrelay::db::text(&row, 2)?,
                key: labrelay::db::text(&row, 3)?,
            };
            self.keys.insert((t, labrelay::db::text(&row, 0)?), r);
        }
        Ok(())
    }

    /// The identity of a local object, without recording it: recorded, or its home
    /// uuid. Call [`Cache::load_refs`] for it first.
    pub fn peek_ref(&self, site: &Site, object_type: &str, key: &str) -> Ref {
        self.keys
            .get(&(object_type.to_owned(), key.to_owned()))
            .cloned()
            .unwrap_or_else(|| Ref {
                uuid: crate::event::home_uuid(site.name(), object_type, key),
                origin: site.name().to_owned(),
                key: key.to_owned(),
            })
    }

    /// The identity of a local object, recorded (at the next flush) when it is new.
    pub fn ref_of(&mut self, site: &Site, object_type: &str, key: &str) -> Ref {
        let k = (object_type.to_owned(), key.to_owned());
        if let Some(r) = self.keys.get(&k) {
            return r.clone();
        }
        let r = self.peek_ref(site, object_type, key);
        self.keys.insert(k, r.clone());
        self.record_id(object_type, &r, key);
        r
    }

    /// Whether the event was applied before (or earlier in this batch).
    pub fn seen(&self, event_id: &str) -> bool {
        self.seen.contains(event_id)
    }

    /// Record an applied event (written at [`Cache::flush`]).
    pub fn inbox(&mut self, ev: &Event, outcome: &'static str) {
        self.seen.insert(ev.id.clone());
        self.inbox.push((ev.id.clone(), ev.site.clone(), outcome));
    }

    /// The local key of an object, as [`Site::local_key`] but from the batch's view.
    pub async fn local_key(
        &mut self,
        site: &Site,
        conn: &mut AnyConnection,
        object_type: &str,
        r: &Ref,
    ) -> anyhow::Result<Option<String>> {
        let k = (object_type.to_owned(), r.uuid.clone());
        match self.ids.get(&k) {
            Some(Some(key)) => return Ok(Some(key.clone())),
            // Known absent; only one of ours can still be found by its home uuid.
            Some(None) if r.origin != site.name() => return Ok(None),
            _ => {}
        }
        self.flush_ids(site, conn).await?;
        let found = site.local_key(conn, object_type, r).await?;
        self.ids.insert(k, found.clone());
        Ok(found)
    }

    /// Record an identity (written at the next flush).
    pub fn record_id(&mut self, object_type: &str, r: &Ref, local_key: &str) {
        self.ids.insert(
            (object_type.to_owned(), r.uuid.clone()),
            Some(local_key.to_owned()),
        );
        self.new_ids
            .push((object_type.to_owned(), r.clone(), local_key.to_owned()));
    }

    /// Forget an identity now (the object's row is being replaced).
    pub async fn remove_id(
        &mut self,
        site: &Site,
        conn: &mut AnyConnection,
        object_type: &str,
        uuid: &str,
    ) -> anyhow::Result<()> {
        self.flush_ids(site, conn).await?;
        let e = site.engine();
        let sql = format!(
            "DELETE FROM labrelay_sync_ids WHERE object_type = {} AND uuid = {}",
            e.placeholder(1),
            e.placeholder(2)
        );
        sqlx::query(&sql)
            .bind(object_type)
            .bind(uuid)
            .execute(&mut *conn)
            .await
            .map_err(|e| site.db.err(e))?;
        self.ids
            .insert((object_type.to_owned(), uuid.to_owned()), None);
        Ok(())
    }

    /// The stored fields of an object.
    pub async fn stored(
        &mut self,
        site: &Site,
        conn: &mut AnyConnection,
        object_type: &str,
        uuid: &str,
    ) -> anyhow::Result<Fields> {
        let k = (object_type.to_owned(), uuid.to_owned());
        if let Some(f) = self.fields.get(&k) {
            return Ok(f.clone());
        }
        let f = site.stored_fields(conn, object_type, uuid).await?;
        self.fields.insert(k, f.clone());
        Ok(f)
    }

    /// Store field values and versions (written at [`Cache::flush`]).
    pub fn store(
        &mut self,
        object_type: &str,
        uuid: &str,
        fields: &[(&str, Option<&str>, &Version)],
    ) {
        let entry = self
            .fields
            .entry((object_type.to_owned(), uuid.to_owned()))
            .or_default();
        for (field, value, version) in fields {
            let v = (value.map(str::to_owned), (*version).clone());
            entry.insert((*field).to_owned(), v.clone());
            self.new_fields.insert(
                (object_type.to_owned(), uuid.to_owned(), (*field).to_owned()),
                v,
            );
        }
    }

    /// Remove a stored field now.
    pub async fn remove_field(
        &mut self,
        site: &Site,
        conn: &mut AnyConnection,
        object_type: &str,
        uuid: &str,
        field: &str,
    ) -> anyhow::Result<()> {
        self.new_fields
            .remove(&(object_type.to_owned(), uuid.to_owned(), field.to_owned()));
        if let Some(f) = self
            .fields
            .get_mut(&(object_type.to_owned(), uuid.to_owned()))
        {
            f.remove(field);
        }
        crate::relay::remove_field(site, conn, object_type, uuid, field).await
    }

    /// Write the identities recorded so far (before anything that reads the table).
    pub async fn flush_ids(&mut self, site: &Site, conn: &mut AnyConnection) -> anyhow::Result<()> {
        let e = site.engine();
        for chunk in self.new_ids.chunks(CHUNK) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|i| format!("({})", placeholders(e, i * 5 + 1, 5)))
                .collect();
            let sql = format!(
                "INSERT INTO labrelay_sync_ids (object_type, uuid, local_key, origin, origin_key) VALUES {}",
                rows.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for (t, r, key) in chunk {
                q = q
                    .bind(t.clone())
                    .bind(r.uuid.clone())
                    .bind(key.clone())
                    .bind(r.origin.clone())
                    .bind(r.key.clone());
            }
            q.execute(&mut *conn).await.map_err(|e| site.db.err(e))?;
        }
        self.new_ids.clear();
        Ok(())
    }

    /// Write everything recorded: identities, field versions, inbox rows.
    pub async fn flush(&mut self, site: &Site, conn: &mut AnyConnection) -> anyhow::Result<()> {
        self.flush_ids(site, conn).await?;
        let rows: Vec<(&str, &str, &str, Option<&str>, &Version)> = self
            .new_fields
            .iter()
            .map(|((t, u, f), (v, ver))| (t.as_str(), u.as_str(), f.as_str(), v.as_deref(), ver))
            .collect();
        for chunk in rows.chunks(CHUNK) {
            site.store_field_rows(conn, chunk).await?;
        }
        self.new_fields.clear();
        let e = site.engine();
        let now = i64::try_from(event::now_ms()).unwrap_or(i64::MAX);
        for chunk in self.inbox.chunks(CHUNK) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|i| format!("({})", placeholders(e, i * 4 + 1, 4)))
                .collect();
            let sql = format!(
                "INSERT INTO labrelay_sync_inbox (event_id, site, applied_ms, outcome) VALUES {}",
                rows.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for (id, from, outcome) in chunk {
                q = q
                    .bind(id.clone())
                    .bind(from.clone())
                    .bind(now)
                    .bind(*outcome);
            }
            q.execute(&mut *conn).await.map_err(|e| site.db.err(e))?;
        }
        self.inbox.clear();
        Ok(())
    }
}
