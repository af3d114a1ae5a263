//! Running one accepted statement read-only and streaming its rows to a file.
//!
//! [`run_to_file`] takes the text of ONE statement that [`crate::check`] accepted and a
//! `[databases.X]` section (a text of several statements is refused before any
//! connection), opens a dedicated connection, and runs the statement inside
//! a read-only transaction that is rolled back at the end:
//!
//! - PostgreSQL: `BEGIN TRANSACTION READ ONLY`, `SET LOCAL statement_timeout`; on the
//!   client side a watchdog sends `pg_cancel_backend` from a second connection.
//! - MariaDB/MySQL: `SET SESSION max_statement_time` (MySQL: `max_execution_time`),
//!   `START TRANSACTION READ ONLY`; the watchdog sends `KILL QUERY`.
//! - SQLite: the file opened `mode=ro`, `PRAGMA query_only = 1`, and a progress handler
//!   that interrupts the statement at the deadline.
//!
//! Rows are read one at a time and written through [`crate::export::RowWriter`]; the
//! row cap stops reading and reports `truncated`. The statement is sent as plain text
//! (PostgreSQL's simple query protocol, MySQL's text protocol), so every value arrives
//! as the server's own text rendering: numerics keep their exact digits and no type is
//! unsupported. Dates and timestamps become ISO 8601 (`T` between date and time;
//! PostgreSQL `timestamptz` in UTC, the time zone sqlx opens every session with),
//! booleans `true`/`false`, binary values lower-case hex.
//!
//! This module does not use `labrelay::db::Db`: its `Any` pool cannot decode
//! timestamps, numerics or binary values, and a pooled connection would carry our
//! session settings to the next user. It reads the same `DatabaseConfig`.
//!
//! This module does not check SQL (that is [`crate::check`]) and does not name files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::time::{Duration, Instant};

use futures::TryStreamExt as _;
use labrelay::config::DatabaseConfig;
use labrelay::exit::Exit;
use sqlx::{Column as _, ConnectOptions as _, Connection as _, Executor as _, Row as _};
use sqlx::{TypeInfo as _, ValueRef as _};

use crate::config::Format;
use crate::export::{FileFormat, RowWriter, hex};

/// Limits for one statement.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Stop after this many rows (`0` = no cap).
    pub max_rows: u64,
    /// Time limit for the statement, reading its rows included (`0` = none).
    pub max_query_seconds: u64,
}

/// The output file.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// `format` from the configuration.
    pub format: Format,
    /// CSV only: start with a UTF-8 byte order mark (for Excel).
    pub bom: bool,
}

/// What a statement produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Column names, in order.
    pub columns: Vec<String>,
    /// Rows written (without the header).
    pub rows: u64,
    /// The row cap stopped reading before the end of the result.
    pub truncated: bool,
}

/// Why a statement produced no complete file.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The database server could not be reached (exit 75: try again later).
    #[error("cannot reach database {url}: {message}")]
    Unreachable {
        /// Redacted URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The `[databases.X]` section is unusable (bad URL, password, login refused; 78).
    #[error("database {url} refused the configuration: {message}")]
    Config {
        /// Redacted URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The database reported a syntax error (1).
    #[error("syntax error{}: {message}", position.map(|p| format!(" at character {p}")).unwrap_or_default())]
    Syntax {
        /// 1-based character position in the statement, when the database gives one.
        position: Option<usize>,
        /// The database's message.
        message: String,
    },
    /// The statement ran beyond `max_query_seconds` and was cancelled (1).
    #[error("query too long: cancelled after {seconds} s")]
    Timeout {
        /// The limit.
        seconds: u64,
    },
    /// The account may not read something the statement needs (1).
    #[error("permission denied: {message}")]
    PermissionDenied {
        /// The database's message.
        message: String,
    },
    /// The statement tried to write; the transaction is read-only (1).
    #[error("refused by the database: the query tried to write ({message})")]
    ReadOnly {
        /// The database's message.
        message: String,
    },
    /// Any other error the database reported for the statement (1).
    #[error("the database reported: {message}")]
    Query {
        /// The database's message.
        message: String,
    },
    /// The result file could not be written (1).
    #[error("writing {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The text holds more than one statement (1). The caller runs the statements that
    /// the check split, one at a time; stacked text never reaches a server, since
    /// MariaDB would run every statement of it.
    #[error("the text holds {count} statements; run them one at a time")]
    NotOneStatement {
        /// How many statements the check found.
        count: usize,
    },
}

impl labrelay::exit::ExitClass for RunError {
    fn exit_class(&self) -> Exit {
        match self {
            RunError::Unreachable { .. } => Exit::TempFail,
            RunError::Config { .. } => Exit::Config,
            _ => Exit::Failed,
        }
    }
}
labrelay::exit_class!(RunError);

/// The database's engine, from the URL scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Postgres,
    Mysql,
    Sqlite,
    Oracle,
}

/// Run `sql` (one statement, accepted by the check) on `db` read-only and write its rows
/// to `path` (created or truncated).
///
/// # Errors
/// See [`RunError`]; on error the file may hold part of the result.
pub async fn run_to_file(
    db: &DatabaseConfig,
    sql: &str,
    limits: Limits,
    output: Output,
    path: &Path,
) -> Result<Outcome, RunError> {
    let file_format = match output.format {
        Format::Csv => FileFormat::Csv { bom: output.bom },
        Format::Tsv => FileFormat::Tsv,
        Format::Xlsx => FileFormat::Xlsx,
    };
    let shown = db.url.to_string();
    let mut url = db.url.clone();
    if let Some(spec) = &db.password {
        let pw = spec.resolve().map_err(|e| RunError::Config {
            url: shown.clone(),
            message: e.to_string(),
        })?;
        url = url.with_password(&pw);
    }
    let raw = url.expose().as_str();
    let (kind, raw) = match url.expose().scheme() {
        "postgres" | "postgresql" => (Kind::Postgres, raw.to_owned()),
        "mysql" => (Kind::Mysql, raw.to_owned()),
        "mariadb" => (Kind::Mysql, raw.replacen("mariadb://", "mysql://", 1)),
        "sqlite" => (Kind::Sqlite, raw.to_owned()),
        "oracle" => (Kind::Oracle, raw.to_owned()),
        other => {
            return Err(RunError::Config {
                url: shown,
                message: format!("unsupported scheme {other}"),
            });
        }
    };
    let engine = match kind {
        Kind::Postgres => crate::check::Engine::Postgres,
        Kind::Mysql => crate::check::Engine::Mariadb,
        Kind::Sqlite => crate::check::Engine::Sqlite,
        Kind::Oracle => crate::check::Engine::Oracle,
    };
    if kind == Kind::Oracle && !cfg!(feature = "oracle") {
        return Err(RunError::Config {
            url: shown,
            message: "this mail-query was built without Oracle support (cargo feature \
                      `oracle`, which needs Oracle Instant Client at run time)"
                .into(),
        });
    }
    // Only the statement count is enforced here, not the verdict: the read-only
    // transaction is the layer below the check, and is tested on its own.
    let count = crate::check::check(engine, sql).len();
    if count != 1 {
        return Err(RunError::NotOneStatement { count });
    }
    let mut writer = RowWriter::create(path, file_format).map_err(|source| RunError::Write {
        path: path.to_owned(),
        source,
    })?;
    let ctx = Ctx {
        shown,
        connect_timeout: Duration::from_secs(db.connect_timeout_secs.max(1)),
        limits,
        kind,
    };
    let outcome = match kind {
        Kind::Postgres => run_postgres(&ctx, &raw, sql, &mut writer).await?,
        Kind::Mysql => run_mysql(&ctx, &raw, sql, &mut writer).await?,
        Kind::Sqlite => run_sqlite(&ctx, &raw, sql, &mut writer).await?,
        Kind::Oracle => {
            let (outcome, back) = run_oracle(&ctx, url.expose(), sql, writer).await?;
            writer = back;
            outcome
        }
    };
    writer.finish().map_err(|source| RunError::Write {
        path: path.to_owned(),
        source,
    })?;
    Ok(outcome)
}

/// Oracle's client library is blocking: the statement runs on a blocking thread, which
/// hands the writer back when done.
#[cfg(feature = "oracle")]
async fn run_oracle(
    ctx: &Ctx,
    url: &url::Url,
    sql: &str,
    mut writer: RowWriter,
) -> Result<(Outcome, RowWriter), RunError> {
    let (url, shown, sql, limits) = (url.clone(), ctx.shown.clone(), sql.to_owned(), ctx.limits);
    tokio::task::spawn_blocking(move || {
        crate::oracle::run_blocking(&url, &shown, &sql, limits, &mut writer).map(|o| (o, writer))
    })
    .await
    .map_err(|e| RunError::Query {
        message: format!("the Oracle worker thread failed: {e}"),
    })?
}

#[cfg(not(feature = "oracle"))]
#[allow(clippy::unused_async)] // the same signature as with the feature
async fn run_oracle(
    ctx: &Ctx,
    _url: &url::Url,
    _sql: &str,
    _writer: RowWriter,
) -> Result<(Outcome, RowWriter), RunError> {
    Err(RunError::Config {
        url: ctx.shown.clone(),
        message: "built without the `oracle` feature".into(),
    })
}

struct Ctx {
    shown: String,
    connect_timeout: Duration,
    limits: Limits,
    kind: Kind,
}

impl Ctx {
    fn deadline(&self) -> Option<Instant> {
        (self.limits.max_query_seconds > 0)
            .then(|| Instant::now() + Duration::from_secs(self.limits.max_query_seconds))
    }

    fn timeout(&self) -> RunError {
        RunError::Timeout {
            seconds: self.limits.max_query_seconds,
        }
    }

    async fn connect<F, T>(&self, fut: F) -> Result<T, RunError>
    where
        F: Future<Output = Result<T, sqlx::Error>>,
    {
        match tokio::time::timeout(self.connect_timeout, fut).await {
            Err(_) => Err(RunError::Unreachable {
                url: self.shown.clone(),
                message: format!("no answer within {} s", self.connect_timeout.as_secs()),
            }),
            Ok(Err(e)) => Err(match e {
                sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut => {
                    RunError::Unreachable {
                        url: self.shown.clone(),
                        message: labrelay::secret::scrub(&e.to_string()).into_owned(),
                    }
                }
                _ => RunError::Config {
                    url: self.shown.clone(),
                    message: labrelay::secret::scrub(&e.to_string()).into_owned(),
                },
            }),
            Ok(Ok(c)) => Ok(c),
        }
    }

    fn config_err(&self, e: &sqlx::Error) -> RunError {
        RunError::Config {
            url: self.shown.clone(),
            message: labrelay::secret::scrub(&e.to_string()).into_owned(),
        }
    }

    /// Classify an error of the statement (or of the session setup around it).
    fn query_err(&self, e: &sqlx::Error, timed_out: bool) -> RunError {
        if timed_out {
            return self.timeout();
        }
        let sqlx::Error::Database(db) = e else {
            return match e {
                sqlx::Error::Io(_) | sqlx::Error::Tls(_) => RunError::Unreachable {
                    url: self.shown.clone(),
                    message: e.to_string(),
                },
                _ => RunError::Query {
                    message: e.to_string(),
                },
            };
        };
        let message = db.message().to_owned();
        match self.kind {
            Kind::Postgres => {
                let pg = db.downcast_ref::<sqlx::postgres::PgDatabaseError>();
                match pg.code() {
                    "42601" => RunError::Syntax {
                        position: match pg.position() {
                            Some(sqlx::postgres::PgErrorPosition::Original(p)) => Some(p),
                            _ => None,
                        },
                        message,
                    },
                    "57014" => self.timeout(),
                    "42501" => RunError::PermissionDenied { message },
                    "25006" => RunError::ReadOnly { message },
                    _ => RunError::Query { message },
                }
            }
            Kind::Mysql => {
                let my = db.downcast_ref::<sqlx::mysql::MySqlDatabaseError>();
                match my.number() {
                    1064 => RunError::Syntax {
                        position: None,
                        message,
                    },
                    // ER_STATEMENT_TIMEOUT (MariaDB), ER_QUERY_TIMEOUT (MySQL),
                    // ER_QUERY_INTERRUPTED (our KILL QUERY).
                    1969 | 3024 | 1317 => self.timeout(),
                    1044 | 1142 | 1143 | 1227 | 1370 => RunError::PermissionDenied { message },
                    1792 => RunError::ReadOnly { message },
                    _ => RunError::Query { message },
                }
            }
            // Oracle errors never come through sqlx (crate::oracle maps its own).
            Kind::Oracle => RunError::Query { message },
            Kind::Sqlite => {
                // Primary result codes: 9 SQLITE_INTERRUPT, 8 SQLITE_READONLY, 23 SQLITE_AUTH.
                let code = db
                    .code()
                    .and_then(|c| c.parse::<i32>().ok())
                    .map(|c| c & 0xff);
                match code {
                    Some(9) => self.timeout(),
                    Some(8) => RunError::ReadOnly { message },
                    Some(23) => RunError::PermissionDenied { message },
                    _ if message.contains("syntax error") => RunError::Syntax {
                        position: None,
                        message,
                    },
                    // PRAGMA query_only answers "attempt to write a readonly database"
                    // with the generic code on some versions.
                    _ if message.contains("readonly database") => RunError::ReadOnly { message },
                    _ => RunError::Query { message },
                }
            }
        }
    }

    fn write_err(path: &Path, source: std::io::Error) -> RunError {
        RunError::Write {
            path: path.to_owned(),
            source,
        }
    }
}

/// How one engine renders a value of a column as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Render {
    /// As the server sent it.
    Text,
    /// `YYYY-MM-DD hh:mm:ss…` → `YYYY-MM-DDThh:mm:ss…`.
    Timestamp,
    /// `t`/`f` or `1`/`0` → `true`/`false`.
    Bool,
    /// PostgreSQL `\x…` hex: drop the prefix.
    PgBytea,
    /// Raw bytes → hex.
    Bytes,
}

fn render_text(render: Render, text: &str, buf: &mut String) {
    buf.clear();
    match render {
        Render::Timestamp if text.as_bytes().get(10) == Some(&b' ') => {
            buf.push_str(&text[..10]);
            buf.push('T');
            buf.push_str(&text[11..]);
        }
        Render::Bool => buf.push_str(match text {
            "t" | "1" => "true",
            "f" | "0" => "false",
            other => other,
        }),
        Render::PgBytea => buf.push_str(text.strip_prefix("\\x").unwrap_or(text)),
        _ => buf.push_str(text),
    }
}

/// Read rows from `stream` into `writer` until the end, the row cap, or an error.
/// `cells` writes one row's fields. Returns (rows, truncated, header written).
async fn pump<R, S>(
    ctx: &Ctx,
    mut stream: S,
    writer: &mut RowWriter,
    header: &mut Option<Vec<String>>,
    mut cells: impl FnMut(&R, &mut RowWriter) -> Result<(), RunError>,
) -> Result<(u64, bool), RunError>
where
    R: sqlx::Row,
    S: futures::Stream<Item = Result<R, sqlx::Error>> + Unpin,
{
    let mut rows = 0u64;
    loop {
        let next = stream
            .try_next()
            .await
            .map_err(|e| ctx.query_err(&e, false))?;
        let Some(row) = next else {
            return Ok((rows, false));
        };
        if ctx.limits.max_rows > 0 && rows >= ctx.limits.max_rows {
            return Ok((rows, true));
        }
        if header.is_none() {
            let names: Vec<String> = row.columns().iter().map(|c| c.name().to_owned()).collect();
            writer
                .header(&names)
                .map_err(|e| Ctx::write_err(writer.path(), e))?;
            *header = Some(names);
        }
        cells(&row, writer)?;
        writer
            .end_row()
            .map_err(|e| Ctx::write_err(writer.path(), e))?;
        rows += 1;
    }
}

/// Write the header of an empty result from the statement's description.
async fn header_from_describe<'c, E>(
    ctx: &Ctx,
    conn: E,
    sql: &str,
    writer: &mut RowWriter,
) -> Result<Vec<String>, RunError>
where
    E: sqlx::Executor<'c>,
{
    let d = conn
        .describe(sql)
        .await
        .map_err(|e| ctx.query_err(&e, false))?;
    let names: Vec<String> = d.columns().iter().map(|c| c.name().to_owned()).collect();
    writer
        .header(&names)
        .map_err(|e| Ctx::write_err(writer.path(), e))?;
    Ok(names)
}

async fn run_postgres(
    ctx: &Ctx,
    url: &str,
    sql: &str,
    writer: &mut RowWriter,
) -> Result<Outcome, RunError> {
    let opts = sqlx::postgres::PgConnectOptions::from_str(url).map_err(|e| ctx.config_err(&e))?;
    let mut conn = ctx.connect(sqlx::PgConnection::connect_with(&opts)).await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .map_err(|e| ctx.query_err(&e, false))?;
    let mut setup = String::from(
        "BEGIN TRANSACTION READ ONLY; SET LOCAL DateStyle = 'ISO, YMD'; \
         SET LOCAL IntervalStyle = 'iso_8601'; SET LOCAL bytea_output = 'hex'; \
         SET LOCAL extra_float_digits = 1;",
    );
    if ctx.limits.max_query_seconds > 0 {
        let _ = write!(
            setup,
            " SET LOCAL statement_timeout = '{}s';",
            ctx.limits.max_query_seconds
        );
    }
    conn.execute(setup.as_str())
        .await
        .map_err(|e| ctx.query_err(&e, false))?;

    let deadline = ctx.deadline();
    let mut header = None;
    let mut buf = String::new();
    let mut renders: Vec<Render> = Vec::new();
    let result = {
        let stream = conn.fetch(sql);
        let work = pump(
            ctx,
            stream,
            writer,
            &mut header,
            |row: &sqlx::postgres::PgRow, w| {
                if renders.is_empty() {
                    renders = row
                        .columns()
                        .iter()
                        .map(|c| match c.type_info().name() {
                            "TIMESTAMP" | "TIMESTAMPTZ" => Render::Timestamp,
                            "BOOL" => Render::Bool,
                            "BYTEA" => Render::PgBytea,
                            _ => Render::Text,
                        })
                        .collect();
                }
                for (i, render) in renders.iter().enumerate() {
                    let raw = row.try_get_raw(i).map_err(|e| ctx.query_err(&e, false))?;
                    if raw.is_null() {
                        w.field(None)
                    } else {
                        let text = raw.as_str().map_err(|e| RunError::Query {
                            message: e.to_string(),
                        })?;
                        render_text(*render, text, &mut buf);
                        w.field(Some(&buf))
                    }
                    .map_err(|e| Ctx::write_err(w.path(), e))?;
                }
                Ok(())
            },
        );
        with_deadline(deadline, work).await
    };
    finish(ctx, conn, result, header, writer, sql, || async {
        // Cancel from a second connection, as psql does on Ctrl-C.
        if let Ok(mut c) = sqlx::PgConnection::connect_with(&opts).await {
            let _ = sqlx::query("SELECT pg_cancel_backend($1)")
                .bind(pid)
                .execute(&mut c)
                .await;
            let _ = c.close().await;
        }
    })
    .await
}

async fn run_mysql(
    ctx: &Ctx,
    url: &str,
    sql: &str,
    writer: &mut RowWriter,
) -> Result<Outcome, RunError> {
    let opts = sqlx::mysql::MySqlConnectOptions::from_str(url).map_err(|e| ctx.config_err(&e))?;
    let mut conn = ctx
        .connect(sqlx::MySqlConnection::connect_with(&opts))
        .await?;
    let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
        .fetch_one(&mut conn)
        .await
        .map_err(|e| ctx.query_err(&e, false))?;
    let secs = ctx.limits.max_query_seconds;
    if secs > 0 {
        // MariaDB calls it max_statement_time (seconds); MySQL max_execution_time (ms).
        if conn
            .execute(format!("SET SESSION max_statement_time = {secs}").as_str())
            .await
            .is_err()
        {
            conn.execute(format!("SET SESSION max_execution_time = {}", secs * 1000).as_str())
                .await
                .map_err(|e| ctx.query_err(&e, false))?;
        }
    }
    // The session default too: a statement that commits implicitly (DDL) would
    // otherwise leave the read-only transaction and run in a writable one.
    conn.execute("SET SESSION TRANSACTION READ ONLY; START TRANSACTION READ ONLY")
        .await
        .map_err(|e| ctx.query_err(&e, false))?;

    let deadline = ctx.deadline();
    let mut header = None;
    let mut buf = String::new();
    let mut renders: Vec<Render> = Vec::new();
    let result =
        {
            let stream = conn.fetch(sql);
            let work =
                pump(
                    ctx,
                    stream,
                    writer,
                    &mut header,
                    |row: &sqlx::mysql::MySqlRow, w| {
                        if renders.is_empty() {
                            renders = row
                                .columns()
                                .iter()
                                .map(|c| match c.type_info().name() {
                                    "DATETIME" | "TIMESTAMP" => Render::Timestamp,
                                    "BOOLEAN" => Render::Bool,
                                    "BINARY" | "VARBINARY" | "TINYBLOB" | "BLOB" | "MEDIUMBLOB"
                                    | "LONGBLOB" | "BIT" | "GEOMETRY" => Render::Bytes,
                                    _ => Render::Text,
                                })
                                .collect();
                        }
                        for (i, render) in renders.iter().enumerate() {
                            let raw = row.try_get_raw(i).map_err(|e| ctx.query_err(&e, false))?;
                            if raw.is_null() {
                                w.field(None)
                            } else if *render == Render::Bytes {
                                let bytes = <&[u8] as sqlx::Decode<sqlx::MySql>>::decode(raw)
                                    .map_err(|e| RunError::Query {
                                        message: e.to_string(),
                                    })?;
                                w.field(Some(&hex(bytes)))
                            } else {
                                let text = <&str as sqlx::Decode<sqlx::MySql>>::decode(raw)
                                    .map_err(|e| RunError::Query {
                                        message: e.to_string(),
                                    })?;
                                render_text(*render, text, &mut buf);
                                w.field(Some(&buf))
                            }
                            .map_err(|e| Ctx::write_err(w.path(), e))?;
                        }
                        Ok(())
                    },
                );
            with_deadline(deadline, work).await
        };
    finish(ctx, conn, result, header, writer, sql, || async {
        if let Ok(mut c) = sqlx::MySqlConnection::connect_with(&opts).await {
            let _ = c.execute(format!("KILL QUERY {id}").as_str()).await;
            let _ = c.close().await;
        }
    })
    .await
}

async fn run_sqlite(
    ctx: &Ctx,
    url: &str,
    sql: &str,
    writer: &mut RowWriter,
) -> Result<Outcome, RunError> {
    let opts = sqlx::sqlite::SqliteConnectOptions::from_str(url)
        .map_err(|e| ctx.config_err(&e))?
        .read_only(true)
        .create_if_missing(false);
    let mut conn = ctx.connect(opts.connect()).await?;
    conn.execute("PRAGMA query_only = 1; BEGIN")
        .await
        .map_err(|e| ctx.query_err(&e, false))?;
    let deadline = ctx.deadline();
    if let Some(deadline) = deadline {
        // SQLite has no server to cancel: the engine asks this every 1000 steps.
        let mut handle = conn
            .lock_handle()
            .await
            .map_err(|e| ctx.query_err(&e, false))?;
        handle.set_progress_handler(1000, move || Instant::now() < deadline);
    }
    let mut header = None;
    let mut buf = String::new();
    let result = {
        let stream = conn.fetch(sql);
        let work =
            pump(
                ctx,
                stream,
                writer,
                &mut header,
                |row: &sqlx::sqlite::SqliteRow, w| {
                    for i in 0..row.len() {
                        let raw = row.try_get_raw(i).map_err(|e| ctx.query_err(&e, false))?;
                        if raw.is_null() {
                            w.field(None)
                        } else {
                            // SQLite types each value, not each column.
                            let ty = raw.type_info().name().to_owned();
                            match ty.as_str() {
                                "BLOB" => {
                                    let b = <&[u8] as sqlx::Decode<sqlx::Sqlite>>::decode(raw)
                                        .map_err(|e| RunError::Query {
                                            message: e.to_string(),
                                        })?;
                                    w.field(Some(&hex(b)))
                                }
                                "INTEGER" => {
                                    let v = <i64 as sqlx::Decode<sqlx::Sqlite>>::decode(raw)
                                        .map_err(|e| RunError::Query {
                                            message: e.to_string(),
                                        })?;
                                    w.field(Some(&v.to_string()))
                                }
                                "REAL" => {
                                    let v = <f64 as sqlx::Decode<sqlx::Sqlite>>::decode(raw)
                                        .map_err(|e| RunError::Query {
                                            message: e.to_string(),
                                        })?;
                                    w.field(Some(&v.to_string()))
                                }
                                _ => {
                                    let t = <&str as sqlx::Decode<sqlx::Sqlite>>::decode(raw)
                                        .map_err(|e| RunError::Query {
                                            message: e.to_string(),
                                        })?;
                                    buf.clear();
                                    buf.push_str(t);
                                    w.field(Some(&buf))
                                }
                            }
                        }
                        .map_err(|e| Ctx::write_err(w.path(), e))?;
                    }
                    Ok(())
                },
            );
        with_deadline(deadline, work).await
    };
    // The progress handler interrupts the statement itself; nothing else to cancel.
    finish(ctx, conn, result, header, writer, sql, || async {}).await
}

/// `None` when the deadline passed first.
async fn with_deadline<T>(deadline: Option<Instant>, work: impl Future<Output = T>) -> Option<T> {
    match deadline {
        None => Some(work.await),
        // One extra second: the server's own timeout should answer first, with its error.
        Some(d) => tokio::time::timeout_at((d + Duration::from_secs(1)).into(), work)
            .await
            .ok(),
    }
}

/// End the transaction and turn the pumped result into an outcome.
async fn finish<C, F>(
    ctx: &Ctx,
    mut conn: C,
    result: Option<Result<(u64, bool), RunError>>,
    header: Option<Vec<String>>,
    writer: &mut RowWriter,
    sql: &str,
    cancel: impl FnOnce() -> F,
) -> Result<Outcome, RunError>
where
    C: sqlx::Connection,
    for<'c> &'c mut C: sqlx::Executor<'c, Database = C::Database>,
    F: Future<Output = ()>,
{
    match result {
        None => {
            // The watchdog fired: cancel server-side, then drop the connection (the
            // server rolls the transaction back when the session ends).
            cancel().await;
            let _ = conn.close_hard().await;
            Err(ctx.timeout())
        }
        Some(Err(e)) => {
            let _ = conn.close_hard().await;
            Err(e)
        }
        Some(Ok((rows, truncated))) => {
            if truncated {
                // Rows still in flight would be read by a ROLLBACK; stop the statement
                // and end the session instead (the server rolls back).
                cancel().await;
                let _ = conn.close_hard().await;
            } else {
                let columns = match header {
                    Some(h) => h,
                    None => header_from_describe(ctx, &mut conn, sql, writer).await?,
                };
                conn.execute("ROLLBACK")
                    .await
                    .map_err(|e| ctx.query_err(&e, false))?;
                let _ = conn.close().await;
                return Ok(Outcome {
                    columns,
                    rows,
                    truncated,
                });
            }
            Ok(Outcome {
                columns: header.unwrap_or_default(),
                rows,
                truncated,
            })
        }
    }
}
