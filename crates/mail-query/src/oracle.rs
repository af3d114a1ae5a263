//! Oracle as a queried database (cargo feature `oracle`, off by default): the seed's
//! own engine, through the `oracle` crate (ODPI-C, compiled in; Oracle Instant Client
//! 19c or newer is needed at run time, found through `LD_LIBRARY_PATH` or ldconfig).
//!
//! The statement runs in a `SET TRANSACTION READ ONLY` transaction that is rolled back,
//! with the connection's call timeout at `max_query_seconds` (Oracle breaks the call
//! on the server, ORA-03156 / DPI-1067, answered "query too long"). Session formats make
//! dates and timestamps ISO 8601 and the decimal separator a point; RAW and BLOB values
//! are lower-case hex, like the other engines. The URL is
//! `oracle://USER@HOST:PORT/SERVICE` (password from the URL or `password = "env:…"`).
//!
//! Not tested against an Oracle server here (none can be installed on the test
//! machines); `cargo check --features oracle` runs in `scripts/test`.

use std::time::Duration;

use oracle::sql_type::OracleType;

use crate::export::{RowWriter, hex};
use crate::run::{Limits, Outcome, RunError};

/// The session settings every connection gets before the statement.
const SESSION: &[&str] = &[
    "ALTER SESSION SET NLS_DATE_FORMAT = 'YYYY-MM-DD\"T\"HH24:MI:SS'",
    "ALTER SESSION SET NLS_TIMESTAMP_FORMAT = 'YYYY-MM-DD\"T\"HH24:MI:SS.FF6'",
    "ALTER SESSION SET NLS_TIMESTAMP_TZ_FORMAT = 'YYYY-MM-DD\"T\"HH24:MI:SS.FF6TZH:TZM'",
    "ALTER SESSION SET NLS_NUMERIC_CHARACTERS = '.,'",
    "SET TRANSACTION READ ONLY",
];

fn code(e: &oracle::Error) -> Option<i32> {
    e.db_error().map(oracle::DbError::code)
}

fn classify(e: &oracle::Error, shown: &str, seconds: u64) -> RunError {
    let message = e.to_string();
    match code(e) {
        // Call timeout, user requested cancel.
        Some(3156 | 1013) => RunError::Timeout { seconds },
        _ if message.contains("DPI-1067") => RunError::Timeout { seconds },
        // TNS: no listener, timeouts, unknown host/service, connection lost.
        Some(12170 | 12514 | 12541 | 12543 | 12545 | 12537 | 3113 | 3114 | 3135) => {
            RunError::Unreachable {
                url: shown.to_owned(),
                message,
            }
        }
        // Invalid username/password, account locked, no CREATE SESSION.
        Some(1017 | 28000 | 1045) => RunError::Config {
            url: shown.to_owned(),
            message,
        },
        Some(1031 | 942) => RunError::PermissionDenied { message },
        Some(1456) => RunError::ReadOnly { message },
        Some(900..=999) => RunError::Syntax {
            position: None,
            message,
        },
        _ => RunError::Query { message },
    }
}

/// Run `sql` on the Oracle database of `url` (blocking: call it on a blocking thread).
pub(crate) fn run_blocking(
    url: &url::Url,
    shown: &str,
    sql: &str,
    limits: Limits,
    writer: &mut RowWriter,
) -> Result<Outcome, RunError> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let user = decode(url.username());
    let password = url.password().map(decode).unwrap_or_default();
    let host = url.host_str().unwrap_or("localhost");
    let port = url.port().unwrap_or(1521);
    let service = url.path().trim_start_matches('/');
    let connect_string = format!("//{host}:{port}/{service}");
    let seconds = limits.max_query_seconds;
    let err = |e: &oracle::Error| classify(e, shown, seconds);
    let conn = oracle::Connection::connect(&user, &password, &connect_string).map_err(|e| {
        // A refused login is the configuration's fault whatever its code says.
        match err(&e) {
            RunError::Query { message } => RunError::Unreachable {
                url: shown.to_owned(),
                message,
            },
            other => other,
        }
    })?;
    if seconds > 0 {
        conn.set_call_timeout(Some(Duration::from_secs(seconds)))
            .map_err(|e| err(&e))?;
    }
    for s in SESSION {
        conn.execute(s, &[]).map_err(|e| err(&e))?;
    }
    let rows = conn.query(sql, &[]).map_err(|e| err(&e))?;
    let columns: Vec<String> = rows
        .column_info()
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    let binary: Vec<bool> = rows
        .column_info()
        .iter()
        .map(|c| {
            matches!(
                c.oracle_type(),
                OracleType::Raw(_) | OracleType::LongRaw | OracleType::BLOB
            )
        })
        .collect();
    let path = writer.path().to_owned();
    let write = |source| RunError::Write {
        path: path.clone(),
        source,
    };
    writer.header(&columns).map_err(write)?;
    let mut outcome = Outcome {
        columns,
        rows: 0,
        truncated: false,
    };
    for row in rows {
        let row = row.map_err(|e| err(&e))?;
        if limits.max_rows > 0 && outcome.rows >= limits.max_rows {
            outcome.truncated = true;
            break;
        }
        for (i, is_binary) in binary.iter().enumerate() {
            if *is_binary {
                let v: Option<Vec<u8>> = row.get(i).map_err(|e| err(&e))?;
                writer
                    .field(v.as_deref().map(hex).as_deref())
                    .map_err(write)?;
            } else {
                let v: Option<String> = row.get(i).map_err(|e| err(&e))?;
                writer.field(v.as_deref()).map_err(write)?;
            }
        }
        writer.end_row().map_err(write)?;
        outcome.rows += 1;
    }
    let _ = conn.rollback();
    let _ = conn.close();
    Ok(outcome)
}
