//! One site's database: the mapped LIMS tables and labrelay's bookkeeping tables beside
//! them. Reading objects, identities, field versions and the clock; typed values on
//! every engine.

use std::collections::BTreeMap;
use std::sync::Arc;

use labrelay::config::{Config, ConfigError};
use labrelay::db::{Db, Engine};
use serde_json::Value;
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::{Any, AnyConnection, Row};

use crate::config::{FieldType, KeyType, LinkSpec, ObjectSpec, Plan};
use crate::event::{Clock, Ref, Version, home_uuid};

/// A query being built.
pub type Query<'q> = sqlx::query::Query<'q, Any, AnyArguments<'q>>;

/// A site's database is not ready for syncing (exit 78).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `install` has not run.
    #[error(
        "site {site}: the sync tables are missing in its database {url}; run `sync-publish install --site {site}` first"
    )]
    NotInstalled {
        /// The site.
        site: String,
        /// Redacted URL.
        url: String,
    },
    /// A mapped table or column does not exist.
    #[error("site {site}: [sync.{kind}.{name}] does not match its table: {message}")]
    Mapping {
        /// The site.
        site: String,
        /// `objects` or `links`.
        kind: &'static str,
        /// The type.
        name: String,
        /// The database's message.
        message: String,
    },
}

impl labrelay::exit::ExitClass for SetupError {
    fn exit_class(&self) -> labrelay::exit::Exit {
        labrelay::exit::Exit::Config
    }
}
labrelay::exit_class!(SetupError);

/// A site: its plan and database.
#[derive(Debug, Clone)]
pub struct Site {
    /// The checked configuration, as seen from this site.
    pub plan: Arc<Plan>,
    /// The site's LIMS database.
    pub db: Db,
    /// Bookkeeping rows written since the planner statistics were last refreshed.
    written: Arc<std::sync::atomic::AtomicU64>,
    /// An ANALYZE runs in the background.
    analyzing: Arc<std::sync::atomic::AtomicBool>,
}

/// Refresh the planner statistics of the bookkeeping tables after this many rows were
/// written. They start empty, and a bulk change (a first relay of history, a
/// bootstrap) grows them by hundreds of thousands of rows long before autovacuum (when
/// it is on at all) looks at them: PostgreSQL then still plans the batch reads for an
/// empty table and scans every row of a type per batch (1.5 s per batch at 100,000
/// rows instead of 20 ms).
const ANALYZE_EVERY: u64 = 20_000;

/// Quote an identifier.
pub fn q(engine: Engine, ident: &str) -> String {
    match engine {
        Engine::Mysql => format!("`{ident}`"),
        Engine::Postgres | Engine::Sqlite => format!("\"{ident}\""),
    }
}

/// One object read from its table.
#[derive(Debug, Clone)]
pub struct ObjectRow {
    /// Local key, as text.
    pub key: String,
    /// Field values by wire name; references hold the referenced local key.
    pub values: BTreeMap<String, Value>,
    /// Whether the temporary predicate holds.
    pub temporary: bool,
}

impl Site {
    /// Connect to `site`'s database (as named in `[sync.sites.SITE] database`).
    pub async fn connect(config: &Config, plan: Arc<Plan>) -> anyhow::Result<Site> {
        let name = &plan.me().database;
        let cfg = config.database(name)?;
        let db = Db::connect(cfg).await?;
        Ok(Site {
            plan,
            db,
            written: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            analyzing: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        })
    }

    /// The plan of another configured site, sharing this configuration.
    pub fn plan_for(plan: &Plan, site: &str) -> Result<Arc<Plan>, ConfigError> {
        if !plan.cfg.sites.contains_key(site) {
            return Err(ConfigError::Invalid {
                key: "sync.sites".into(),
                message: format!("no site {site:?}"),
            });
        }
        let mut p = plan.clone();
        site.clone_into(&mut p.site);
        Ok(Arc::new(p))
    }

    /// This site's name.
    pub fn name(&self) -> &str {
        &self.plan.site
    }

    /// The engine.
    pub fn engine(&self) -> Engine {
        self.db.engine()
    }

    /// Check that `install` ran and every mapped table and column exists.
    pub async fn check(&self) -> anyhow::Result<()> {
        let e = self.engine();
        if sqlx::query("SELECT wall FROM labrelay_sync_clock WHERE id = 1")
            .fetch_optional(self.db.pool())
            .await
            .ok()
            .flatten()
            .is_none()
        {
            return Err(SetupError::NotInstalled {
                site: self.name().to_owned(),
                url: self.db.url().to_string(),
            }
            .into());
        }
        for o in self.plan.objects.values() {
            let sql = format!("{} WHERE 1 = 0", self.select_sql(o));
            if let Err(err) = sqlx::query(&sql).fetch_all(self.db.pool()).await {
                return Err(SetupError::Mapping {
                    site: self.name().to_owned(),
                    kind: "objects",
                    name: o.name.clone(),
                    message: labrelay::secret::scrub(&err.to_string()).into_owned(),
                }
                .into());
            }
            if let Some(col) = self.plan.me().origin_columns.get(&o.name) {
                let sql = format!("SELECT {} FROM {} WHERE 1 = 0", q(e, col), q(e, &o.table));
                if let Err(err) = sqlx::query(&sql).fetch_all(self.db.pool()).await {
                    return Err(SetupError::Mapping {
                        site: self.name().to_owned(),
                        kind: "objects",
                        name: o.name.clone(),
                        message: format!("origin column {col}: {err}"),
                    }
                    .into());
                }
            }
        }
        for l in self.plan.links.values() {
            let sql = format!(
                "SELECT {}, {} FROM {} WHERE 1 = 0",
                q(e, &l.left.column),
                q(e, &l.right.column),
                q(e, &l.table)
            );
            if let Err(err) = sqlx::query(&sql).fetch_all(self.db.pool()).await {
                return Err(SetupError::Mapping {
                    site: self.name().to_owned(),
                    kind: "links",
                    name: l.name.clone(),
                    message: labrelay::secret::scrub(&err.to_string()).into_owned(),
                }
                .into());
            }
        }
        Ok(())
    }

    /// `SELECT key, fields..., temporary FROM table` (no WHERE).
    pub fn select_sql(&self, o: &ObjectSpec) -> String {
        let e = self.engine();
        let mut cols = vec![q(e, &o.key)];
        cols.extend(o.fields.iter().map(|f| match (e, f.ty) {
            // The Any driver cannot decode MariaDB's TINYINT (booleans); widen it.
            (Engine::Mysql, FieldType::Bool | FieldType::Integer) => {
                format!("CAST({} AS SIGNED)", q(e, &f.column))
            }
            _ => q(e, &f.column),
        }));
        cols.push(match &o.temporary {
            Some(t) => format!("CASE WHEN ({t}) THEN 1 ELSE 0 END"),
            None => "0".into(),
        });
        format!("SELECT {} FROM {}", cols.join(", "), q(e, &o.table))
    }

    /// Decode a row of [`Site::select_sql`].
    pub fn decode_object(&self, o: &ObjectSpec, row: &AnyRow) -> Result<ObjectRow, sqlx::Error> {
        let key = read_key(row, 0, o.key_type)?;
        let mut values = BTreeMap::new();
        for (i, f) in o.fields.iter().enumerate() {
            values.insert(f.name.clone(), read_value(row, i + 1, f.ty)?);
        }
        let temporary = read_value(row, o.fields.len() + 1, FieldType::Integer)?
            .as_i64()
            .is_some_and(|v| v != 0);
        Ok(ObjectRow {
            key,
            values,
            temporary,
        })
    }

    /// One object by local key.
    pub async fn read_object(
        &self,
        conn: &mut AnyConnection,
        o: &ObjectSpec,
        key: &str,
    ) -> anyhow::Result<Option<ObjectRow>> {
        let sql = format!(
            "{} WHERE {} = {}",
            self.select_sql(o),
            q(self.engine(), &o.key),
            self.engine().placeholder(1)
        );
        let row = bind_key(sqlx::query(&sql), key, o.key_type)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.db.err(e))?;
        row.map(|r| self.decode_object(o, &r))
            .transpose()
            .map_err(|e| self.db.err(e).into())
    }

    /// Objects by local keys (those that exist), in one query per chunk of keys.
    pub async fn read_objects(
        &self,
        conn: &mut AnyConnection,
        o: &ObjectSpec,
        keys: &[&str],
    ) -> anyhow::Result<Vec<ObjectRow>> {
        let e = self.engine();
        let mut out = Vec::with_capacity(keys.len());
        let unique: Vec<&str> = keys
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for chunk in unique.chunks(500) {
            let ph: Vec<String> = (1..=chunk.len()).map(|i| e.placeholder(i)).collect();
            let sql = format!(
                "{} WHERE {} IN ({})",
                self.select_sql(o),
                q(e, &o.key),
                ph.join(", ")
            );
            let mut query = sqlx::query(&sql);
            for k in chunk {
                query = bind_key(query, k, o.key_type);
            }
            let rows = query
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| self.db.err(e))?;
            for r in &rows {
                out.push(self.decode_object(o, r).map_err(|e| self.db.err(e))?);
            }
        }
        Ok(out)
    }

    /// The identity of a local object: recorded, or its home uuid (recorded when
    /// `record`).
    pub async fn ref_of(
        &self,
        conn: &mut AnyConnection,
        object_type: &str,
        key: &str,
        record: bool,
    ) -> anyhow::Result<Ref> {
        let e = self.engine();
        let sql = format!(
            "SELECT uuid, origin, origin_key FROM labrelay_sync_ids WHERE object_type = {} AND local_key = {}",
            e.placeholder(1),
            e.placeholder(2)
        );
        let row = sqlx::query(&sql)
            .bind(object_type)
            .bind(key)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.db.err(e))?;
        if let Some(row) = row {
            return Ok(Ref {
                uuid: labrelay::db::text(&row, 0)?,
                origin: labrelay::db::text(&row, 1)?,
                key: labrelay::db::text(&row, 2)?,
            });
        }
        let r = Ref {
            uuid: home_uuid(self.name(), object_type, key),
            origin: self.name().to_owned(),
            key: key.to_owned(),
        };
        if record {
            self.record_id(conn, object_type, &r, key).await?;
        }
        Ok(r)
    }

    /// Record that `local_key` is the object `r`.
    pub async fn record_id(
        &self,
        conn: &mut AnyConnection,
        object_type: &str,
        r: &Ref,
        local_key: &str,
    ) -> anyhow::Result<()> {
        let e = self.engine();
        let sql = format!(
            "INSERT INTO labrelay_sync_ids (object_type, uuid, local_key, origin, origin_key) VALUES ({}, {}, {}, {}, {})",
            e.placeholder(1),
            e.placeholder(2),
            e.placeholder(3),
            e.placeholder(4),
            e.placeholder(5)
        );
        sqlx::query(&sql)
            .bind(object_type)
            .bind(&r.uuid)
            .bind(local_key)
            .bind(&r.origin)
            .bind(&r.key)
            .execute(&mut *conn)
            .await
            .map_err(|e| self.db.err(e))?;
        Ok(())
    }

    /// The local key of an object known by uuid: recorded, or ours by home uuid.
    pub async fn local_key(
        &self,
        conn: &mut AnyConnection,
        object_type: &str,
        r: &Ref,
    ) -> anyhow::Result<Option<String>> {
        let e = self.engine();
        let sql = format!(
            "SELECT local_key FROM labrelay_sync_ids WHERE object_type = {} AND uuid = {}",
            e.placeholder(1),
            e.placeholder(2)
        );
        let row = sqlx::query(&sql)
            .bind(object_type)
            .bind(&r.uuid)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.db.err(e))?;
        if let Some(row) = row {
            return Ok(Some(labrelay::db::text(&row, 0)?));
        }
        // One of ours that was published before its identity was recorded (bootstrap):
        // its home uuid proves the key.
        if r.origin == self.name() && home_uuid(self.name(), object_type, &r.key) == r.uuid {
            let Some(o) = self.plan.objects.get(object_type) else {
                return Ok(None);
            };
            if self.read_object(conn, o, &r.key).await?.is_some() {
                self.record_id(conn, object_type, r, &r.key).await?;
                return Ok(Some(r.key.clone()));
            }
        }
        Ok(None)
    }

    /// The stored (value, version) of each field of an object.
    pub async fn stored_fields(
        &self,
        conn: &mut AnyConnection,
        object_type: &str,
        uuid: &str,
    ) -> anyhow::Result<BTreeMap<String, (Option<String>, Version)>> {
        let e = self.engine();
        let sql = format!(
            "SELECT field, value, version FROM labrelay_sync_fields WHERE object_type = {} AND uuid = {}",
            e.placeholder(1),
            e.placeholder(2)
        );
        let rows = sqlx::query(&sql)
            .bind(object_type)
            .bind(uuid)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| self.db.err(e))?;
        let mut out = BTreeMap::new();
        for row in rows {
            out.insert(
                labrelay::db::text(&row, 0)?,
                (
                    labrelay::db::opt_text(&row, 1)?,
                    Version(labrelay::db::text(&row, 2)?),
                ),
            );
        }
        Ok(out)
    }

    /// Store several fields' values and versions of one object in one statement.
    pub async fn store_fields(
        &self,
        conn: &mut AnyConnection,
        object_type: &str,
        uuid: &str,
        fields: &[(&str, Option<&str>, &Version)],
    ) -> anyhow::Result<()> {
        let rows: Vec<(&str, &str, &str, Option<&str>, &Version)> = fields
            .iter()
            .map(|(f, v, ver)| (object_type, uuid, *f, *v, *ver))
            .collect();
        self.store_field_rows(conn, &rows).await
    }

    /// Store (type, uuid, field, value, version) rows in one statement (an upsert).
    pub async fn store_field_rows(
        &self,
        conn: &mut AnyConnection,
        rows: &[(&str, &str, &str, Option<&str>, &Version)],
    ) -> anyhow::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let e = self.engine();
        let mut n = 0;
        let mut values = Vec::with_capacity(rows.len());
        for _ in rows {
            let p: Vec<String> = (1..=5).map(|k| e.placeholder(n + k)).collect();
            n += 5;
            values.push(format!("({})", p.join(", ")));
        }
        let head = format!(
            "INSERT INTO labrelay_sync_fields (object_type, uuid, field, value, version) VALUES {}",
            values.join(", ")
        );
        let sql = match e {
            Engine::Postgres | Engine::Sqlite => format!(
                "{head} ON CONFLICT (object_type, uuid, field) DO UPDATE SET value = excluded.value, version = excluded.version"
            ),
            Engine::Mysql => format!(
                "{head} ON DUPLICATE KEY UPDATE value = VALUES(value), version = VALUES(version)"
            ),
        };
        let mut query = sqlx::query(&sql);
        for (object_type, uuid, field, value, version) in rows {
            query = query
                .bind((*object_type).to_owned())
                .bind((*uuid).to_owned())
                .bind((*field).to_owned())
                .bind(value.map(str::to_owned))
                .bind(version.0.clone());
        }
        query
            .execute(&mut *conn)
            .await
            .map_err(|e| self.db.err(e))?;
        Ok(())
    }

    /// Lock the clock row for this transaction and read it. Taking a write lock first
    /// also makes a SQLite transaction a writer from its first statement.
    pub async fn lock_clock(&self, conn: &mut AnyConnection) -> anyhow::Result<Clock> {
        sqlx::query("UPDATE labrelay_sync_clock SET wall = wall WHERE id = 1")
            .execute(&mut *conn)
            .await
            .map_err(|e| self.db.err(e))?;
        let row = sqlx::query("SELECT wall, counter FROM labrelay_sync_clock WHERE id = 1")
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| self.db.err(e))?;
        let wall: i64 = row.try_get(0).map_err(|e| self.db.err(e))?;
        let counter: i64 = row.try_get(1).map_err(|e| self.db.err(e))?;
        Ok(Clock {
            wall: u64::try_from(wall).unwrap_or(0),
            counter: u64::try_from(counter).unwrap_or(0),
        })
    }

    /// Write the clock back.
    pub async fn save_clock(&self, conn: &mut AnyConnection, clock: Clock) -> anyhow::Result<()> {
        let e = self.engine();
        let sql = format!(
            "UPDATE labrelay_sync_clock SET wall = {}, counter = {} WHERE id = 1",
            e.placeholder(1),
            e.placeholder(2)
        );
        sqlx::query(&sql)
            .bind(i64::try_from(clock.wall).unwrap_or(i64::MAX))
            .bind(i64::try_from(clock.counter).unwrap_or(i64::MAX))
            .execute(&mut *conn)
            .await
            .map_err(|e| self.db.err(e))?;
        Ok(())
    }

    /// Every object of a type (temporary ones included; the caller filters).
    pub async fn all_objects(&self, o: &ObjectSpec) -> anyhow::Result<Vec<ObjectRow>> {
        let sql = format!(
            "{} ORDER BY {}",
            self.select_sql(o),
            q(self.engine(), &o.key)
        );
        let rows = sqlx::query(&sql)
            .fetch_all(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        rows.iter()
            .map(|r| self.decode_object(o, r).map_err(|e| self.db.err(e).into()))
            .collect()
    }

    /// Every row of a link table: (left local key, right local key), in key order.
    pub async fn all_links(&self, l: &LinkSpec) -> anyhow::Result<Vec<(String, String)>> {
        let e = self.engine();
        let (left, right) = (q(e, &l.left.column), q(e, &l.right.column));
        let sql = format!(
            "SELECT {left}, {right} FROM {} WHERE {left} IS NOT NULL AND {right} IS NOT NULL ORDER BY {left}, {right}",
            q(e, &l.table)
        );
        let rows = sqlx::query(&sql)
            .fetch_all(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        let lt = self.plan.objects[&l.left.object].key_type;
        let rt = self.plan.objects[&l.right.object].key_type;
        rows.iter()
            .map(|r| {
                Ok((read_key(r, 0, lt)?, read_key(r, 1, rt)?))
                    .map_err(|e: sqlx::Error| self.db.err(e).into())
            })
            .collect()
    }

    /// Note `n` bookkeeping rows written; every [`ANALYZE_EVERY`] rows (and the first
    /// time past a tenth of that) refresh the planner statistics of the bookkeeping
    /// tables (PostgreSQL and SQLite; InnoDB does it itself), in the background (an ANALYZE of large tables takes hundreds of
    /// milliseconds, which the changes waiting behind it would feel as latency), one at
    /// a time. Best effort: a failure is logged, never fatal; a run that ends first
    /// leaves it to the next.
    pub fn wrote(&self, n: u64) {
        use std::sync::atomic::Ordering;
        let before = self.written.fetch_add(n, Ordering::Relaxed);
        let after = before + n;
        let first = before < ANALYZE_EVERY / 10 && after >= ANALYZE_EVERY / 10;
        if !first && before / ANALYZE_EVERY == after / ANALYZE_EVERY {
            return;
        }
        let tables =
            "labrelay_sync_ids, labrelay_sync_fields, labrelay_sync_inbox, labrelay_sync_outbox";
        let sql = match self.engine() {
            Engine::Postgres => format!("ANALYZE {tables}"),
            // InnoDB recalculates its persistent statistics by itself when a tenth of a
            // table changed (innodb_stats_auto_recalc), in a background thread; an
            // ANALYZE TABLE would hold the tables' locks while writers wait.
            Engine::Mysql => return,
            Engine::Sqlite => "ANALYZE".to_owned(),
        };
        if self.analyzing.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = self.db.pool().clone();
        let busy = self.analyzing.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            match sqlx::query(&sql).fetch_all(&pool).await {
                Ok(_) => tracing::debug!(took = ?started.elapsed(), "planner statistics refreshed"),
                Err(e) => tracing::warn!(
                    "refreshing planner statistics failed: {}",
                    labrelay::secret::scrub(&e.to_string())
                ),
            }
            busy.store(false, Ordering::Release);
        });
    }

    /// All recorded identities of a type: local key -> ref.
    pub async fn all_ids(&self, object_type: &str) -> anyhow::Result<BTreeMap<String, Ref>> {
        let e = self.engine();
        let sql = format!(
            "SELECT local_key, uuid, origin, origin_key FROM labrelay_sync_ids WHERE object_type = {}",
            e.placeholder(1)
        );
        let rows = sqlx::query(&sql)
            .bind(object_type)
            .fetch_all(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        let mut out = BTreeMap::new();
        for row in rows {
            out.insert(
                labrelay::db::text(&row, 0)?,
                Ref {
                    uuid: labrelay::db::text(&row, 1)?,
                    origin: labrelay::db::text(&row, 2)?,
                    key: labrelay::db::text(&row, 3)?,
                },
            );
        }
        Ok(out)
    }

    /// All stored field versions of a type: uuid -> field -> (value, version).
    pub async fn all_fields(
        &self,
        object_type: &str,
    ) -> anyhow::Result<BTreeMap<String, BTreeMap<String, (Option<String>, Version)>>> {
        let e = self.engine();
        let sql = format!(
            "SELECT uuid, field, value, version FROM labrelay_sync_fields WHERE object_type = {}",
            e.placeholder(1)
        );
        let rows = sqlx::query(&sql)
            .bind(object_type)
            .fetch_all(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        let mut out: BTreeMap<String, BTreeMap<String, (Option<String>, Version)>> =
            BTreeMap::new();
        for row in rows {
            out.entry(labrelay::db::text(&row, 0)?).or_default().insert(
                labrelay::db::text(&row, 1)?,
                (
                    labrelay::db::opt_text(&row, 2)?,
                    Version(labrelay::db::text(&row, 3)?),
                ),
            );
        }
        Ok(out)
    }
}

/// Read a local key as text.
pub fn read_key(row: &AnyRow, i: usize, ty: KeyType) -> Result<String, sqlx::Error> {
    match ty {
        KeyType::Integer => match row.try_get::<i64, _>(i) {
            Ok(v) => Ok(v.to_string()),
            Err(_) => labrelay::db::text(row, i),
        },
        KeyType::Text => labrelay::db::text(row, i),
    }
}

/// Read a typed value (NULL as `Value::Null`).
pub fn read_value(row: &AnyRow, i: usize, ty: FieldType) -> Result<Value, sqlx::Error> {
    Ok(match ty {
        FieldType::Text => labrelay::db::opt_text(row, i)?.map_or(Value::Null, Value::String),
        FieldType::Integer => match row.try_get::<Option<i64>, _>(i) {
            Ok(v) => v.map_or(Value::Null, Value::from),
            Err(_) => match labrelay::db::opt_text(row, i)? {
                Some(s) => s
                    .trim()
                    .parse::<i64>()
                    .map_or(Value::String(s), Value::from),
                None => Value::Null,
            },
        },
        FieldType::Float => match row.try_get::<Option<f64>, _>(i) {
            Ok(v) => v.map_or(Value::Null, Value::from),
            Err(_) => match row.try_get::<Option<f32>, _>(i) {
                Ok(v) => v.map_or(Value::Null, |f| Value::from(f64::from(f))),
                Err(_) => match labrelay::db::opt_text(row, i)? {
                    Some(s) => s
                        .trim()
                        .parse::<f64>()
                        .map_or(Value::String(s), Value::from),
                    None => Value::Null,
                },
            },
        },
        FieldType::Bool => match row.try_get::<Option<bool>, _>(i) {
            Ok(v) => v.map_or(Value::Null, Value::Bool),
            Err(_) => match row.try_get::<Option<i64>, _>(i) {
                Ok(v) => v.map_or(Value::Null, |n| Value::Bool(n != 0)),
                Err(_) => match labrelay::db::opt_text(row, i)? {
                    Some(s) => Value::Bool(matches!(s.trim(), "1" | "t" | "true" | "TRUE")),
                    None => Value::Null,
                },
            },
        },
    })
}

/// Bind a local key.
pub fn bind_key<'q>(query: Query<'q>, key: &str, ty: KeyType) -> Query<'q> {
    match ty {
        KeyType::Integer => match key.parse::<i64>() {
            Ok(n) => query.bind(n),
            Err(_) => query.bind(key.to_owned()),
        },
        KeyType::Text => query.bind(key.to_owned()),
    }
}

/// Bind a typed value.
pub fn bind_value<'q>(query: Query<'q>, v: &Value, ty: FieldType, engine: Engine) -> Query<'q> {
    match ty {
        FieldType::Text => match v {
            Value::Null => query.bind(None::<String>),
            Value::String(s) => query.bind(s.clone()),
            other => query.bind(other.to_string()),
        },
        FieldType::Integer => match v {
            Value::Null => query.bind(None::<i64>),
            Value::Bool(b) => query.bind(i64::from(*b)),
            other => match other.as_i64() {
                Some(n) => query.bind(n),
                None => query.bind(other.as_str().map(str::to_owned)),
            },
        },
        FieldType::Float => match v.as_f64() {
            Some(f) => query.bind(f),
            None => query.bind(None::<f64>),
        },
        FieldType::Bool => {
            let b = match v {
                Value::Bool(b) => Some(*b),
                Value::Number(n) => Some(n.as_i64().unwrap_or(0) != 0),
                _ => None,
            };
            if engine == Engine::Postgres {
                query.bind(b)
            } else {
                query.bind(b.map(i64::from))
            }
        }
    }
}

/// The canonical text of a value, as stored in `labrelay_sync_fields` and compared.
pub fn canonical(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        other => Some(other.to_string()),
    }
}
