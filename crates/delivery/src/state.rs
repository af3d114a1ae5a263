//! Deliveries in labrelay's state database (migration `0002_delivery.sql`): the status
//! row of each delivery (`delivery_runs`) and the resume journal — finished files
//! (`delivery_files`), multipart uploads in progress with their finished parts
//! (`delivery_multipart`, `delivery_parts`).
//!
//! The journal belongs to one delivery run; a re-run of an unfinished delivery reuses
//! the run and its journal, `--force` starts a new run with an empty one. Object keys
//! are indexed by their SHA-256 (`key_hash`) because a key may be longer than MariaDB
//! can index.

use std::collections::HashMap;

use chrono::Utc;
use labrelay::db::{Db, Engine};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::any::AnyRow;

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Received (from the queue or the command line), nothing done yet.
    Queued,
    /// Files are being uploaded.
    Uploading,
    /// Every file and md5sum.txt is on the target and verified.
    Uploaded,
    /// Customer access granted and the customer mailed.
    Notified,
    /// Done: the LIMS status was written too.
    Delivered,
    /// Stopped by an error (see `error`); a re-run resumes it.
    Failed,
}

impl Status {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Uploading => "uploading",
            Status::Uploaded => "uploaded",
            Status::Notified => "notified",
            Status::Delivered => "delivered",
            Status::Failed => "failed",
        }
    }

    /// Parse a stored name.
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "queued" => Status::Queued,
            "uploading" => Status::Uploading,
            "uploaded" => Status::Uploaded,
            "notified" => Status::Notified,
            "delivered" => Status::Delivered,
            "failed" => Status::Failed,
            _ => return None,
        })
    }
}

/// A `delivery_runs` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunRow {
    /// Delivery id (UUID).
    pub id: String,
    /// `delivery-upload` or `upload-pure`.
    pub tool: String,
    /// Analysis id (upload-pure: the delivery's name).
    pub analysis_id: String,
    /// Project id.
    pub project_id: Option<String>,
    /// Target name.
    pub target: String,
    /// The target's identity ([`target_id`]); `None` for rows written before it was
    /// recorded.
    pub target_id: Option<String>,
    /// Key prefix of the delivered files.
    pub key_prefix: String,
    /// The local folder.
    pub source_path: Option<String>,
    /// Status.
    pub status: String,
    /// Files in the manifest.
    pub files: i64,
    /// Bytes in the manifest.
    pub bytes: i64,
    /// Files that failed.
    pub failed_files: i64,
    /// Customer account.
    pub account: Option<String>,
    /// Kind of customer access.
    pub access_kind: Option<String>,
    /// When the access ends (RFC 3339).
    pub expires_at: Option<String>,
    /// When the customer was told (RFC 3339); a re-run does not tell them again.
    pub notified_at: Option<String>,
    /// Key of md5sum.txt.
    pub md5sum_key: Option<String>,
    /// Last error.
    pub error: Option<String>,
    /// The queue message id that requested it.
    pub request_id: Option<String>,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Last change (RFC 3339).
    pub updated_at: String,
    /// When it reached delivered or failed (RFC 3339).
    pub finished_at: Option<String>,
}

impl RunRow {
    /// The parsed status (`Failed` for an unknown value).
    pub fn status(&self) -> Status {
        Status::parse(&self.status).unwrap_or(Status::Failed)
    }
}

/// A file recorded as finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoneFile {
    /// The object key.
    pub key: String,
    /// Size.
    pub size: u64,
    /// Source mtime when it was uploaded.
    pub mtime_ns: i64,
    /// MD5 hex.
    pub md5: String,
    /// SHA-256 hex.
    pub sha256: Option<String>,
    /// ETag (S3).
    pub etag: Option<String>,
    /// Multipart parts (0: single request).
    pub parts: u32,
}

/// A multipart upload in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultipartRow {
    /// The server's upload id.
    pub upload_id: String,
    /// Part size used.
    pub part_size: u64,
    /// Source size.
    pub size: u64,
    /// Source mtime.
    pub mtime_ns: i64,
    /// Finished parts: index → (ETag as the server sent it, MD5 hex).
    pub parts: HashMap<usize, (String, String)>,
}

/// SHA-256 of a key, hex (the journal's index).
pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The identity of a target: SHA-256 (hex) of what decides where the bytes land —
/// kind, URL (bucket and base folder or prefix included) and endpoint — so a journal
/// written for one place is never trusted for another that kept the section's name.
pub fn target_id(kind: &str, url: &str, endpoint: Option<&str>) -> String {
    let mut h = Sha256::new();
    for part in [kind, url, endpoint.unwrap_or("")] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}

/// A once-only step of a delivery (`delivery_steps`): begun (intent recorded) and, once
/// its effect is committed, done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRow {
    /// When the step was first begun (RFC 3339).
    pub started_at: String,
    /// When its effect was confirmed (RFC 3339); `None`: begun, outcome unknown (a
    /// crash came between the effect and this record).
    pub done_at: Option<String>,
    /// What the step recorded (the Message-ID of a mail, say).
    pub detail: Option<String>,
}

fn now() -> String {
    Utc::now().to_rfc3339()
}

fn opt_text(row: &AnyRow, col: &str) -> Result<Option<String>, sqlx::Error> {
    labrelay::db::opt_text(row, col)
}

fn text(row: &AnyRow, col: &str) -> Result<String, sqlx::Error> {
    labrelay::db::text(row, col)
}

/// The state database, seen by the delivery engine.
#[derive(Debug, Clone)]
pub struct State {
    db: Db,
}

/// What a new run records.
#[derive(Debug, Clone)]
pub struct NewRun<'a> {
    /// Tool name.
    pub tool: &'a str,
    /// Analysis id / delivery name.
    pub analysis_id: &'a str,
    /// Project id, if known.
    pub project_id: Option<&'a str>,
    /// Target name.
    pub target: &'a str,
    /// The target's identity ([`target_id`]).
    pub target_id: &'a str,
    /// Key prefix.
    pub key_prefix: &'a str,
    /// Queue message id.
    pub request_id: Option<&'a str>,
}

/// Fields that change after the row exists; `None` leaves a column as it is.
#[derive(Debug, Clone, Default)]
pub struct Update<'a> {
    /// New status.
    pub status: Option<Status>,
    /// Project id.
    pub project_id: Option<&'a str>,
    /// Source folder.
    pub source_path: Option<&'a str>,
    /// Manifest files.
    pub files: Option<u64>,
    /// Manifest bytes.
    pub bytes: Option<u64>,
    /// Failed files.
    pub failed_files: Option<u64>,
    /// Account.
    pub account: Option<&'a str>,
    /// Access kind.
    pub access_kind: Option<&'a str>,
    /// Access expiry (RFC 3339).
    pub expires_at: Option<&'a str>,
    /// When the customer was told (RFC 3339).
    pub notified_at: Option<&'a str>,
    /// md5sum.txt key.
    pub md5sum_key: Option<&'a str>,
    /// Error text; `Some("")` clears it.
    pub error: Option<&'a str>,
    /// Queue message id.
    pub request_id: Option<&'a str>,
}

impl State {
    /// Wrap an open, migrated state database.
    pub fn new(db: Db) -> State {
        State { db }
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    fn p(&self, n: usize) -> String {
        self.db.engine().placeholder(n)
    }

    fn ps(&self, from: usize, count: usize) -> String {
        (from..from + count)
            .map(|n| self.p(n))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn upsert(&self, table: &str, cols: &[&str], keys: &[&str]) -> String {
        let values = self.ps(1, cols.len());
        let updates: Vec<&&str> = cols.iter().filter(|c| !keys.contains(c)).collect();
        match self.db.engine() {
            Engine::Postgres | Engine::Sqlite => format!(
                "INSERT INTO {table} ({}) VALUES ({values}) ON CONFLICT ({}) DO UPDATE SET {}",
                cols.join(", "),
                keys.join(", "),
                updates
                    .iter()
                    .map(|c| format!("{c} = excluded.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Engine::Mysql => format!(
                "INSERT INTO {table} ({}) VALUES ({values}) ON DUPLICATE KEY UPDATE {}",
                cols.join(", "),
                updates
                    .iter()
                    .map(|c| format!("{c} = VALUES({c})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    fn run_row(row: &AnyRow) -> Result<RunRow, sqlx::Error> {
        Ok(RunRow {
            id: text(row, "id")?,
            tool: text(row, "tool")?,
            analysis_id: text(row, "analysis_id")?,
            project_id: opt_text(row, "project_id")?,
            target: text(row, "target")?,
            target_id: opt_text(row, "target_id")?,
            key_prefix: text(row, "key_prefix")?,
            source_path: opt_text(row, "source_path")?,
            status: text(row, "status")?,
            files: row.try_get("files")?,
            bytes: row.try_get("bytes")?,
            failed_files: row.try_get("failed_files")?,
            account: opt_text(row, "account")?,
            access_kind: opt_text(row, "access_kind")?,
            expires_at: opt_text(row, "expires_at")?,
            notified_at: opt_text(row, "notified_at")?,
            md5sum_key: opt_text(row, "md5sum_key")?,
            error: opt_text(row, "error")?,
            request_id: opt_text(row, "request_id")?,
            created_at: text(row, "created_at")?,
            updated_at: text(row, "updated_at")?,
            finished_at: opt_text(row, "finished_at")?,
        })
    }

    /// Run rows selected by `WHERE filter ORDER BY order` (the same SQL on all three
    /// engines, `LIMIT` included), placeholders bound from `args`.
    async fn select_runs(
        &self,
        filter: &str,
        order: &str,
        args: &[&str],
    ) -> anyhow::Result<Vec<RunRow>> {
        let sql = format!("SELECT * FROM delivery_runs WHERE {filter} ORDER BY {order}");
        let mut query = sqlx::query(&sql);
        for a in args {
            query = query.bind(*a);
        }
        let rows = query
            .fetch_all(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        Ok(rows
            .iter()
            .map(Self::run_row)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.db.err(e))?)
    }

    /// The most recent run of `analysis_id` to `target`.
    pub async fn latest(&self, analysis_id: &str, target: &str) -> anyhow::Result<Option<RunRow>> {
        let filter = format!("analysis_id = {} AND target = {}", self.p(1), self.p(2));
        let rows = self
            .select_runs(
                &filter,
                "created_at DESC, id DESC LIMIT 1",
                &[analysis_id, target],
            )
            .await?;
        Ok(rows.into_iter().next())
    }

    /// The most recent delivered run of `analysis_id` (any target).
    pub async fn latest_delivered(&self, analysis_id: &str) -> anyhow::Result<Option<RunRow>> {
        let filter = format!("analysis_id = {} AND status = 'delivered'", self.p(1));
        let rows = self
            .select_runs(&filter, "created_at DESC, id DESC LIMIT 1", &[analysis_id])
            .await?;
        Ok(rows.into_iter().next())
    }

    /// A run by id.
    pub async fn run(&self, id: &str) -> anyhow::Result<Option<RunRow>> {
        let filter = format!("id = {}", self.p(1));
        Ok(self
            .select_runs(&filter, "id", &[id])
            .await?
            .into_iter()
            .next())
    }

    /// Every run of `analysis_id`, oldest first.
    pub async fn runs(&self, analysis_id: &str) -> anyhow::Result<Vec<RunRow>> {
        let filter = format!("analysis_id = {}", self.p(1));
        self.select_runs(&filter, "created_at, id", &[analysis_id])
            .await
    }

    /// Create a run in status `queued`; returns its id.
    pub async fn create_run(&self, new: &NewRun<'_>) -> anyhow::Result<String> {
        let id = uuid::Uuid::new_v4().to_string();
        let t = now();
        let sql = format!(
            "INSERT INTO delivery_runs (id, tool, analysis_id, project_id, target, target_id, \
             key_prefix, status, request_id, created_at, updated_at) VALUES ({})",
            self.ps(1, 11)
        );
        sqlx::query(&sql)
            .bind(&id)
            .bind(new.tool)
            .bind(new.analysis_id)
            .bind(new.project_id.map(str::to_owned))
            .bind(new.target)
            .bind(new.target_id)
            .bind(new.key_prefix)
            .bind(Status::Queued.as_str())
            .bind(new.request_id.map(str::to_owned))
            .bind(&t)
            .bind(&t)
            .execute(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        Ok(id)
    }

    /// Change a run. `delivered` and `failed` also set `finished_at`.
    pub async fn update(&self, id: &str, u: &Update<'_>) -> anyhow::Result<()> {
        enum V {
            S(String),
            OptS(Option<String>),
            I(i64),
        }
        let mut sets: Vec<(&str, V)> = Vec::new();
        if let Some(s) = u.status {
            sets.push(("status", V::S(s.as_str().to_owned())));
            if matches!(s, Status::Delivered | Status::Failed) {
                sets.push(("finished_at", V::S(now())));
            }
        }
        let opt = |v: Option<&str>| v.map(|s| V::OptS((!s.is_empty()).then(|| s.to_owned())));
        for (col, v) in [
            ("project_id", opt(u.project_id)),
            ("source_path", opt(u.source_path)),
            ("account", opt(u.account)),
            ("access_kind", opt(u.access_kind)),
            ("expires_at", opt(u.expires_at)),
            ("notified_at", opt(u.notified_at)),
            ("md5sum_key", opt(u.md5sum_key)),
            ("error", opt(u.error)),
            ("request_id", opt(u.request_id)),
        ] {
            if let Some(v) = v {
                sets.push((col, v));
            }
        }
        for (col, v) in [
            ("files", u.files),
            ("bytes", u.bytes),
            ("failed_files", u.failed_files),
        ] {
            if let Some(v) = v {
                sets.push((col, V::I(v as i64)));
            }
        }
        sets.push(("updated_at", V::S(now())));
        let assignments: Vec<String> = sets
            .iter()
            .enumerate()
            .map(|(i, (c, _))| format!("{c} = {}", self.p(i + 1)))
            .collect();
        let sql = format!(
            "UPDATE delivery_runs SET {} WHERE id = {}",
            assignments.join(", "),
            self.p(sets.len() + 1)
        );
        let mut q = sqlx::query(&sql);
        for (_, v) in sets {
            q = match v {
                V::S(s) => q.bind(s),
                V::OptS(s) => q.bind(s),
                V::I(n) => q.bind(n),
            };
        }
        q.bind(id)
            .execute(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        Ok(())
    }

    /// Files of run `run_id` recorded as finished, by key.
    pub async fn done_files(&self, run_id: &str) -> anyhow::Result<HashMap<String, DoneFile>> {
        let sql = format!(
            "SELECT file_key, size, mtime_ns, md5, sha256, etag, parts FROM delivery_files \
             WHERE run_id = {}",
            self.p(1)
        );
        let rows = sqlx::query(&sql)
            .bind(run_id)
            .fetch_all(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        let mut out = HashMap::with_capacity(rows.len());
        for r in rows {
            let f = (|| -> Result<DoneFile, sqlx::Error> {
                Ok(DoneFile {
                    key: text(&r, "file_key")?,
                    size: r.try_get::<i64, _>("size")? as u64,
                    mtime_ns: r.try_get("mtime_ns")?,
                    md5: text(&r, "md5")?,
                    sha256: opt_text(&r, "sha256")?,
                    etag: opt_text(&r, "etag")?,
                    parts: r.try_get::<i64, _>("parts")? as u32,
                })
            })()
            .map_err(|e| self.db.err(e))?;
            out.insert(f.key.clone(), f);
        }
        Ok(out)
    }

    /// Record finished files in one transaction.
    pub async fn record_files(&self, run_id: &str, files: &[DoneFile]) -> anyhow::Result<()> {
        if files.is_empty() {
            return Ok(());
        }
        let sql = self.upsert(
            "delivery_files",
            &[
                "run_id",
                "key_hash",
                "file_key",
                "size",
                "mtime_ns",
                "md5",
                "sha256",
                "etag",
                "parts",
                "finished_at",
            ],
            &["run_id", "key_hash"],
        );
        let mut tx = self.db.pool().begin().await.map_err(|e| self.db.err(e))?;
        let t = now();
        for f in files {
            sqlx::query(&sql)
                .bind(run_id)
                .bind(key_hash(&f.key))
                .bind(&f.key)
                .bind(f.size as i64)
                .bind(f.mtime_ns)
                .bind(&f.md5)
                .bind(f.sha256.clone())
                .bind(f.etag.clone())
                .bind(i64::from(f.parts))
                .bind(&t)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.db.err(e))?;
        }
        tx.commit().await.map_err(|e| self.db.err(e))?;
        Ok(())
    }

    /// Forget every finished file of a run (so that everything is sent again).
    pub async fn clear_files(&self, run_id: &str) -> anyhow::Result<()> {
        let sql = format!("DELETE FROM delivery_files WHERE run_id = {}", self.p(1));
        sqlx::query(&sql)
            .bind(run_id)
            .execute(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        Ok(())
    }

    /// The multipart upload in progress for `key`, with its finished parts.
    pub async fn multipart(&self, run_id: &str, key: &str) -> anyhow::Result<Option<MultipartRow>> {
        let kh = key_hash(key);
        let sql = format!(
            "SELECT upload_id, part_size, size, mtime_ns FROM delivery_multipart \
             WHERE run_id = {} AND key_hash = {}",
            self.p(1),
            self.p(2)
        );
        let Some(r) = sqlx::query(&sql)
            .bind(run_id)
            .bind(&kh)
            .fetch_optional(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?
        else {
            return Ok(None);
        };
        let mut row = (|| -> Result<MultipartRow, sqlx::Error> {
            Ok(MultipartRow {
                upload_id: text(&r, "upload_id")?,
                part_size: r.try_get::<i64, _>("part_size")? as u64,
                size: r.try_get::<i64, _>("size")? as u64,
                mtime_ns: r.try_get("mtime_ns")?,
                parts: HashMap::new(),
            })
        })()
        .map_err(|e| self.db.err(e))?;
        let sql = format!(
            "SELECT part_index, etag, md5 FROM delivery_parts WHERE run_id = {} AND key_hash = {}",
            self.p(1),
            self.p(2)
        );
        let parts = sqlx::query(&sql)
            .bind(run_id)
            .bind(&kh)
            .fetch_all(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        for p in parts {
            let (i, etag, md5) = (|| -> Result<(i64, String, String), sqlx::Error> {
                Ok((
                    p.try_get("part_index")?,
                    text(&p, "etag")?,
                    text(&p, "md5")?,
                ))
            })()
            .map_err(|e| self.db.err(e))?;
            row.parts.insert(i as usize, (etag, md5));
        }
        Ok(Some(row))
    }

    /// Record a new multipart upload of `key` (replacing any older record).
    pub async fn start_multipart(
        &self,
        run_id: &str,
        key: &str,
        upload_id: &str,
        part_size: u64,
        size: u64,
        mtime_ns: i64,
    ) -> anyhow::Result<()> {
        self.clear_multipart(run_id, key).await?;
        let sql = format!(
            "INSERT INTO delivery_multipart (run_id, key_hash, file_key, upload_id, part_size, \
             size, mtime_ns, created_at) VALUES ({})",
            self.ps(1, 8)
        );
        sqlx::query(&sql)
            .bind(run_id)
            .bind(key_hash(key))
            .bind(key)
            .bind(upload_id)
            .bind(part_size as i64)
            .bind(size as i64)
            .bind(mtime_ns)
            .bind(now())
            .execute(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        Ok(())
    }

    /// Record a finished part.
    pub async fn record_part(
        &self,
        run_id: &str,
        key: &str,
        index: usize,
        etag: &str,
        md5: &str,
    ) -> anyhow::Result<()> {
        let sql = self.upsert(
            "delivery_parts",
            &["run_id", "key_hash", "part_index", "etag", "md5"],
            &["run_id", "key_hash", "part_index"],
        );
        sqlx::query(&sql)
            .bind(run_id)
            .bind(key_hash(key))
            .bind(index as i64)
            .bind(etag)
            .bind(md5)
            .execute(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        Ok(())
    }

    /// Forget the multipart upload of `key` and its parts.
    pub async fn clear_multipart(&self, run_id: &str, key: &str) -> anyhow::Result<()> {
        let kh = key_hash(key);
        for table in ["delivery_parts", "delivery_multipart"] {
            let sql = format!(
                "DELETE FROM {table} WHERE run_id = {} AND key_hash = {}",
                self.p(1),
                self.p(2)
            );
            sqlx::query(&sql)
                .bind(run_id)
                .bind(&kh)
                .execute(self.db.pool())
                .await
                .map_err(|e| self.db.err(e))?;
        }
        Ok(())
    }

    /// The step `step` of run `run_id`, if it was ever begun.
    pub async fn step(&self, run_id: &str, step: &str) -> anyhow::Result<Option<StepRow>> {
        let sql = format!(
            "SELECT started_at, done_at, detail FROM delivery_steps WHERE run_id = {} AND step = {}",
            self.p(1),
            self.p(2)
        );
        let row = sqlx::query(&sql)
            .bind(run_id)
            .bind(step)
            .fetch_optional(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        row.map(|r| {
            Ok(StepRow {
                started_at: text(&r, "started_at")?,
                done_at: opt_text(&r, "done_at")?,
                detail: opt_text(&r, "detail")?,
            })
        })
        .transpose()
        .map_err(|e: sqlx::Error| self.db.err(e).into())
    }

    /// Record the intent to run `step` (committed before its effect); a step begun
    /// before keeps its first `started_at` and detail.
    pub async fn step_begin(
        &self,
        run_id: &str,
        step: &str,
        detail: Option<&str>,
    ) -> anyhow::Result<()> {
        let values = self.ps(1, 4);
        let sql = match self.db.engine() {
            Engine::Postgres | Engine::Sqlite => format!(
                "INSERT INTO delivery_steps (run_id, step, started_at, detail) VALUES ({values}) \
                 ON CONFLICT (run_id, step) DO NOTHING"
            ),
            Engine::Mysql => format!(
                "INSERT IGNORE INTO delivery_steps (run_id, step, started_at, detail) VALUES ({values})"
            ),
        };
        sqlx::query(&sql)
            .bind(run_id)
            .bind(step)
            .bind(now())
            .bind(detail.map(str::to_owned))
            .execute(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        Ok(())
    }

    /// Record that `step`'s effect is committed.
    pub async fn step_done(
        &self,
        run_id: &str,
        step: &str,
        detail: Option<&str>,
    ) -> anyhow::Result<()> {
        self.step_begin(run_id, step, detail).await?;
        let sql = format!(
            "UPDATE delivery_steps SET done_at = {}, detail = COALESCE({}, detail) \
             WHERE run_id = {} AND step = {}",
            self.p(1),
            self.p(2),
            self.p(3),
            self.p(4)
        );
        sqlx::query(&sql)
            .bind(now())
            .bind(detail.map(str::to_owned))
            .bind(run_id)
            .bind(step)
            .execute(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        Ok(())
    }

    /// Every multipart upload still recorded for a run: (key, upload id).
    pub async fn open_multiparts(&self, run_id: &str) -> anyhow::Result<Vec<(String, String)>> {
        let sql = format!(
            "SELECT file_key, upload_id FROM delivery_multipart WHERE run_id = {}",
            self.p(1)
        );
        let rows = sqlx::query(&sql)
            .bind(run_id)
            .fetch_all(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        rows.iter()
            .map(|r| Ok((text(r, "file_key")?, text(r, "upload_id")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(|e| self.db.err(e).into())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn memory() -> State {
        let mut cfg = labrelay::config::DatabaseConfig::from_url(
            labrelay::secret::RedactedUrl::parse("sqlite::memory:").unwrap(),
        );
        cfg.max_connections = 1;
        let db = Db::connect(&cfg).await.unwrap();
        db.migrate().await.unwrap();
        State::new(db)
    }

    #[tokio::test]
    async fn runs_and_journal_round_trip() {
        let s = memory().await;
        let id = s
            .create_run(&NewRun {
                tool: "delivery-upload",
                analysis_id: "A1",
                project_id: None,
                target: "oss",
                target_id: &target_id("s3", "s3://b/p", None),
                key_prefix: "online/A1",
                request_id: Some("m-1"),
            })
            .await
            .unwrap();
        s.update(
            &id,
            &Update {
                status: Some(Status::Uploading),
                files: Some(3),
                bytes: Some(10),
                error: Some("boom"),
                ..Update::default()
            },
        )
        .await
        .unwrap();
        let r = s.latest("A1", "oss").await.unwrap().unwrap();
        assert_eq!(r.status(), Status::Uploading);
        assert_eq!((r.files, r.bytes), (3, 10));
        assert_eq!(r.error.as_deref(), Some("boom"));
        s.update(
            &id,
            &Update {
                status: Some(Status::Delivered),
                error: Some(""),
                ..Update::default()
            },
        )
        .await
        .unwrap();
        let r = s.run(&id).await.unwrap().unwrap();
        assert_eq!(r.error, None);
        assert!(r.finished_at.is_some());
        assert_eq!(s.latest_delivered("A1").await.unwrap().unwrap().id, id);

        let f = DoneFile {
            key: "online/A1/a.txt".into(),
            size: 1,
            mtime_ns: 5,
            md5: "m".into(),
            sha256: None,
            etag: Some("e".into()),
            parts: 0,
        };
        s.record_files(&id, std::slice::from_ref(&f)).await.unwrap();
        s.record_files(&id, std::slice::from_ref(&f)).await.unwrap();
        assert_eq!(s.done_files(&id).await.unwrap()["online/A1/a.txt"], f);

        s.start_multipart(&id, "k", "up-1", 8, 20, 1).await.unwrap();
        s.record_part(&id, "k", 0, "\"e0\"", "m0").await.unwrap();
        s.record_part(&id, "k", 1, "\"e1\"", "m1").await.unwrap();
        let mp = s.multipart(&id, "k").await.unwrap().unwrap();
        assert_eq!(mp.upload_id, "up-1");
        assert_eq!(mp.parts.len(), 2);
        assert_eq!(s.open_multiparts(&id).await.unwrap().len(), 1);
        s.clear_multipart(&id, "k").await.unwrap();
        assert!(s.multipart(&id, "k").await.unwrap().is_none());

        assert_eq!(s.step(&id, "mail").await.unwrap(), None);
        s.step_begin(&id, "mail", Some("<m1@x>")).await.unwrap();
        s.step_begin(&id, "mail", Some("<m2@x>")).await.unwrap();
        let st = s.step(&id, "mail").await.unwrap().unwrap();
        assert_eq!((st.done_at, st.detail.as_deref()), (None, Some("<m1@x>")));
        s.step_done(&id, "mail", None).await.unwrap();
        let st = s.step(&id, "mail").await.unwrap().unwrap();
        assert!(st.done_at.is_some());
        assert_eq!(st.detail.as_deref(), Some("<m1@x>"));
    }

    #[test]
    fn target_ids_differ_by_url_and_endpoint() {
        let a = target_id("s3", "s3://b/p", Some("http://a"));
        assert_ne!(a, target_id("s3", "s3://b/q", Some("http://a")));
        assert_ne!(a, target_id("s3", "s3://b/p", Some("http://b")));
        assert_eq!(a, target_id("s3", "s3://b/p", Some("http://a")));
    }
}
