//! The request log in labrelay's state database (migration `0004_mail_query.sql`).
//!
//! Intake is durable first: a request mail gets its row (and its raw copy on disk, kept
//! by the caller) before anything else is done with it. The row's `stage` then records
//! how far the answer went, so that a run after a crash finishes the request instead of
//! answering it again:
//!
//! - `received`: recorded, nothing else done. A re-run processes it from the start
//!   (checks and queries are read-only, so running them again changes nothing).
//! - `built`: the verdict is known and the reply mails are on disk in the request's
//!   folder; `mails_sent` of them have been accepted. A re-run sends the rest of the
//!   SAME files (fixed Message-IDs), never new ones.
//! - `replied`: every reply mail was accepted by SMTP or written to the outbox.
//! - `filed`: the request mail was moved to the processed or rejected folder (IMAP), or
//!   there is nothing to move (`--eml`).

use chrono::{DateTime, Utc};
use labrelay::db::{Db, Engine, opt_text, text};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use sqlx::Row as _;
use sqlx::any::AnyRow;

/// How far a request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Recorded; nothing else done.
    Received,
    /// Verdict known, reply mails on disk.
    Built,
    /// Every reply mail accepted.
    Replied,
    /// The request mail is in its final folder (or has none).
    Filed,
}

impl Stage {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Received => "received",
            Stage::Built => "built",
            Stage::Replied => "replied",
            Stage::Filed => "filed",
        }
    }

    fn parse(s: &str) -> Stage {
        match s {
            "built" => Stage::Built,
            "replied" => Stage::Replied,
            "filed" => Stage::Filed,
            _ => Stage::Received,
        }
    }
}

/// One request's row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RequestRow {
    /// [`request_id`]: SHA-256 (hex) of the Message-ID and the body.
    pub id: String,
    /// The request's Message-ID (with angle brackets), when it has one.
    pub message_id: Option<String>,
    /// Where it came from: `imap:FOLDER` or `eml`.
    pub source: String,
    /// Its UID in that folder when it was recorded (IMAP only).
    pub imap_uid: Option<i64>,
    /// The raw copy in the data directory.
    pub raw_path: String,
    /// The From address.
    pub sender: Option<String>,
    /// The queryable database named (its configured name when known).
    pub database: Option<String>,
    /// How far the answer went.
    pub stage: Stage,
    /// `answered`, `refused` or `failed`, once known.
    pub verdict: Option<String>,
    /// Why it was refused or failed.
    pub reason: Option<String>,
    /// Statements in the request.
    pub statements: i64,
    /// Rows exported in all.
    pub rows: i64,
    /// Result files.
    pub files: i64,
    /// Reply mails (0: no reply is sent).
    pub mails: i64,
    /// Reply mails accepted so far.
    pub mails_sent: i64,
    /// The first reply's Message-ID.
    pub reply_message_id: Option<String>,
    /// When the request was recorded (RFC 3339, UTC).
    pub received_at: String,
    /// When the last reply mail was accepted.
    pub replied_at: Option<String>,
    /// When the request mail was filed.
    pub filed_at: Option<String>,
}

/// What a built answer records.
#[derive(Debug, Clone, Default)]
pub struct Built<'a> {
    /// Queryable database (configured name, or what the mail said when unknown).
    pub database: Option<&'a str>,
    /// `answered`, `refused` or `failed`.
    pub verdict: &'a str,
    /// Why, for refused and failed requests.
    pub reason: Option<&'a str>,
    /// Statements.
    pub statements: u64,
    /// Rows exported.
    pub rows: u64,
    /// Result files.
    pub files: u64,
    /// Reply mails.
    pub mails: u64,
    /// First reply's Message-ID.
    pub reply_message_id: Option<&'a str>,
}

/// The id of a request: SHA-256 of its Message-ID, sender and body (line ends ignored), so
/// the same message delivered again (more Received headers) is one request, while a
/// different message that reuses a Message-ID (a forgery sent first) is not taken for
/// it; without a Message-ID, of the whole message.
pub fn request_id(message_id: Option<&str>, sender: Option<&str>, raw: &[u8]) -> String {
    let mut h = Sha256::new();
    if let Some(id) = message_id {
        h.update(b"message-id:");
        h.update(id.trim().as_bytes());
        h.update(b"\nfrom:");
        h.update(sender.unwrap_or_default().as_bytes());
        h.update(b"\nbody:");
        let body = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 4)
            .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| i + 2))
            .map_or(&[][..], |i| &raw[i..]);
        for chunk in body.split(|b| *b == b'\r') {
            h.update(chunk);
        }
    } else {
        h.update(b"raw:");
        h.update(raw);
    }
    hex::encode(h.finalize())
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

const COLUMNS: &str = "id, message_id, source, imap_uid, raw_path, sender, database_name, stage, \
                       verdict, reason, statements, rows_total, files, mails, mails_sent, \
                       reply_message_id, received_at, replied_at, filed_at";

/// The request log.
#[derive(Debug, Clone)]
pub struct Requests {
    db: Db,
}

impl Requests {
    /// Wrap an open, migrated state database.
    pub fn new(db: Db) -> Requests {
        Requests { db }
    }

    fn p(&self, n: usize) -> String {
        self.db.engine().placeholder(n)
    }

    /// `UPDATE … SET c1 = ?, c2 = ?, … WHERE id = ?` with this engine's placeholders:
    /// bind the columns' values in order, then the id.
    fn update_sql(&self, columns: &[&str]) -> String {
        let sets: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c} = {}", self.p(i + 1)))
            .collect();
        format!(
            "UPDATE mail_query_requests SET {} WHERE id = {}",
            sets.join(", "),
            self.p(columns.len() + 1)
        )
    }

    /// The rows `sql` selects with `arg` bound.
    async fn rows(&self, sql: &str, arg: String) -> anyhow::Result<Vec<RequestRow>> {
        let rows = sqlx::query(sql)
            .bind(arg)
            .fetch_all(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        Ok(rows.iter().map(Self::row).collect::<Result<Vec<_>, _>>()?)
    }

    fn row(row: &AnyRow) -> Result<RequestRow, sqlx::Error> {
        Ok(RequestRow {
            id: text(row, "id")?,
            message_id: opt_text(row, "message_id")?,
            source: text(row, "source")?,
            imap_uid: row.try_get("imap_uid")?,
            raw_path: text(row, "raw_path")?,
            sender: opt_text(row, "sender")?,
            database: opt_text(row, "database_name")?,
            stage: Stage::parse(&text(row, "stage")?),
            verdict: opt_text(row, "verdict")?,
            reason: opt_text(row, "reason")?,
            statements: row.try_get("statements")?,
            rows: row.try_get("rows_total")?,
            files: row.try_get("files")?,
            mails: row.try_get("mails")?,
            mails_sent: row.try_get("mails_sent")?,
            reply_message_id: opt_text(row, "reply_message_id")?,
            received_at: text(row, "received_at")?,
            replied_at: opt_text(row, "replied_at")?,
            filed_at: opt_text(row, "filed_at")?,
        })
    }

    /// The row of request `id`.
    pub async fn get(&self, id: &str) -> anyhow::Result<Option<RequestRow>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM mail_query_requests WHERE id = {}",
            self.p(1)
        );
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        Ok(row.map(|r| Self::row(&r)).transpose()?)
    }

    /// Record a new request; when `id` is already recorded, nothing is written and the
    /// existing row is returned (`false`: not new).
    pub async fn record(
        &self,
        id: &str,
        message_id: Option<&str>,
        source: &str,
        imap_uid: Option<u32>,
        raw_path: &str,
        sender: Option<&str>,
    ) -> anyhow::Result<(RequestRow, bool)> {
        let t = now();
        let verb = match self.db.engine() {
            Engine::Mysql => "INSERT IGNORE INTO",
            Engine::Sqlite => "INSERT OR IGNORE INTO",
            Engine::Postgres => "INSERT INTO",
        };
        let tail = if self.db.engine() == Engine::Postgres {
            " ON CONFLICT (id) DO NOTHING"
        } else {
            ""
        };
        let sql = format!(
            "{verb} mail_query_requests (id, message_id, source, imap_uid, raw_path, sender, \
             stage, received_at, updated_at) VALUES ({}){tail}",
            (1..=9).map(|n| self.p(n)).collect::<Vec<_>>().join(", ")
        );
        let done = sqlx::query(&sql)
            .bind(id)
            .bind(message_id.map(str::to_owned))
            .bind(source)
            .bind(imap_uid.map(i64::from))
            .bind(raw_path)
            .bind(sender.map(str::to_owned))
            .bind(Stage::Received.as_str())
            .bind(&t)
            .bind(&t)
            .execute(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        let row = self
            .get(id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("request {id} vanished from the state database"))?;
        Ok((row, done.rows_affected() == 1))
    }

    /// The verdict is known and the reply mails are on disk.
    pub async fn set_built(&self, id: &str, b: &Built<'_>) -> anyhow::Result<()> {
        let sql = self.update_sql(&[
            "stage",
            "database_name",
            "verdict",
            "reason",
            "statements",
            "rows_total",
            "files",
            "mails",
            "mails_sent",
            "reply_message_id",
            "updated_at",
        ]);
        #[allow(clippy::cast_possible_wrap)] // counts are far below i64::MAX
        sqlx::query(&sql)
            .bind(Stage::Built.as_str())
            .bind(b.database.map(str::to_owned))
            .bind(b.verdict)
            .bind(b.reason.map(str::to_owned))
            .bind(b.statements as i64)
            .bind(b.rows as i64)
            .bind(b.files as i64)
            .bind(b.mails as i64)
            .bind(0_i64)
            .bind(b.reply_message_id.map(str::to_owned))
            .bind(now())
            .bind(id)
            .execute(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        Ok(())
    }

    /// Reply mail number `sent` (1-based) was accepted; the last one moves the request to
    /// `replied`.
    pub async fn set_sent(&self, id: &str, sent: u64, of: u64) -> anyhow::Result<()> {
        let t = now();
        let stage = if sent >= of {
            Stage::Replied
        } else {
            Stage::Built
        };
        let sql = self.update_sql(&["mails_sent", "stage", "replied_at", "updated_at"]);
        #[allow(clippy::cast_possible_wrap)]
        sqlx::query(&sql)
            .bind(sent as i64)
            .bind(stage.as_str())
            .bind((stage == Stage::Replied).then(|| t.clone()))
            .bind(&t)
            .bind(id)
            .execute(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        Ok(())
    }

    /// The request mail is filed (or has nothing to file).
    pub async fn set_filed(&self, id: &str) -> anyhow::Result<()> {
        let t = now();
        let sql = self.update_sql(&["stage", "filed_at", "updated_at"]);
        sqlx::query(&sql)
            .bind(Stage::Filed.as_str())
            .bind(&t)
            .bind(&t)
            .bind(id)
            .execute(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        Ok(())
    }

    /// Give up on sending the reply of `id` (the server refused it for good): the
    /// request counts as replied (so its mail is filed), verdict `failed`.
    pub async fn give_up(&self, id: &str, reason: &str) -> anyhow::Result<()> {
        let sql = self.update_sql(&["stage", "verdict", "reason", "updated_at"]);
        sqlx::query(&sql)
            .bind(Stage::Replied.as_str())
            .bind("failed")
            .bind(reason)
            .bind(now())
            .bind(id)
            .execute(self.db.pool())
            .await
            .map_err(|e| self.db.err(e))?;
        Ok(())
    }

    /// Requests recorded at or after `since`, oldest first.
    pub async fn list(&self, since: Option<DateTime<Utc>>) -> anyhow::Result<Vec<RequestRow>> {
        let since = since.map_or_else(String::new, |t| {
            t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        });
        let sql = format!(
            "SELECT {COLUMNS} FROM mail_query_requests WHERE received_at >= {} \
             ORDER BY received_at, id",
            self.p(1)
        );
        self.rows(&sql, since).await
    }

    /// Requests not yet filed, oldest first (a run finishes these first).
    pub async fn unfinished(&self) -> anyhow::Result<Vec<RequestRow>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM mail_query_requests WHERE stage <> {} \
             ORDER BY received_at, id",
            self.p(1)
        );
        self.rows(&sql, Stage::Filed.as_str().to_owned()).await
    }
}
