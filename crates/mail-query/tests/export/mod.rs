//! `mail_query::run`: one statement run read-only on real PostgreSQL, MariaDB and SQLite
//! databases (a fresh database per test), its rows streamed to CSV/TSV.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use labrelay::config::DatabaseConfig;
use labrelay::db::{Db, Engine};
use labrelay::exit::Exit;
use labrelay::secret::RedactedUrl;
use mail_query::config::Format;
use mail_query::run::{Limits, Outcome, Output, RunError, run_to_file};

/// A fresh database, dropped on `cleanup`.
pub(crate) struct TempDb {
    admin: Option<Db>,
    name: String,
    /// Full access, for setting up and checking.
    pub(crate) db: Db,
    /// The section the executor gets.
    pub(crate) cfg: DatabaseConfig,
    _dir: Option<tempfile::TempDir>,
}

impl TempDb {
    pub(crate) async fn server(admin_url: &str) -> TempDb {
        let admin = Db::connect(&DatabaseConfig::from_url(
            RedactedUrl::parse(admin_url).unwrap(),
        ))
        .await
        .unwrap();
        let name = test_support::unique("mq").replace('-', "_");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(admin.pool())
            .await
            .unwrap();
        let mut url = admin.url().expose().clone();
        url.set_path(&format!("/{name}"));
        let cfg = DatabaseConfig::from_url(RedactedUrl::new(url));
        let db = Db::connect(&cfg).await.unwrap();
        TempDb {
            admin: Some(admin),
            name,
            db,
            cfg,
            _dir: None,
        }
    }

    pub(crate) async fn sqlite() -> TempDb {
        let dir = test_support::tempdir();
        let path = dir.path().join("q.db");
        let url = RedactedUrl::parse(&format!("sqlite://{}", path.display())).unwrap();
        let rwc = RedactedUrl::parse(&format!("sqlite://{}?mode=rwc", path.display())).unwrap();
        let db = Db::connect(&DatabaseConfig::from_url(rwc)).await.unwrap();
        TempDb {
            admin: None,
            name: String::new(),
            db,
            cfg: DatabaseConfig::from_url(url),
            _dir: Some(dir),
        }
    }

    pub(crate) async fn exec(&self, sql: &str) {
        sqlx::query(sql).execute(self.db.pool()).await.unwrap();
    }

    pub(crate) async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(self.db.pool())
            .await
            .unwrap()
    }

    pub(crate) async fn cleanup(self) {
        self.db.close().await;
        if let Some(admin) = self.admin {
            let force = if admin.engine() == Engine::Postgres {
                " WITH (FORCE)"
            } else {
                ""
            };
            sqlx::query(&format!("DROP DATABASE IF EXISTS {}{force}", self.name))
                .execute(admin.pool())
                .await
                .unwrap();
        }
    }
}

const CSV: Output = Output {
    format: Format::Csv,
    bom: false,
};

fn limits(max_rows: u64, max_query_seconds: u64) -> Limits {
    Limits {
        max_rows,
        max_query_seconds,
    }
}

async fn run(
    t: &TempDb,
    sql: &str,
    l: Limits,
    out: Output,
) -> (Result<Outcome, RunError>, Vec<u8>) {
    let dir = test_support::tempdir();
    let path = dir.path().join("result");
    let r = run_to_file(&t.cfg, sql, l, out, &path).await;
    let bytes = std::fs::read(&path).unwrap_or_default();
    (r, bytes)
}

/// RFC 4180 parser for the checks: `None` is an unquoted empty field (NULL).
fn parse_csv(text: &str) -> Vec<Vec<Option<String>>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        // One field.
        let mut field = String::new();
        let mut quoted = false;
        if chars.peek() == Some(&'"') {
            quoted = true;
            chars.next();
            loop {
                match chars.next().expect("unterminated quoted field") {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    '"' => break,
                    c => field.push(c),
                }
            }
        }
        while let Some(&c) = chars.peek() {
            if c == ',' || c == '\r' {
                break;
            }
            assert!(!quoted, "text after a closing quote");
            field.push(c);
            chars.next();
        }
        row.push(if field.is_empty() && !quoted {
            None
        } else {
            Some(field)
        });
        match chars.next() {
            Some(',') => {}
            Some('\r') => {
                assert_eq!(chars.next(), Some('\n'), "CR without LF");
                rows.push(std::mem::take(&mut row));
                if chars.peek().is_none() {
                    return rows;
                }
            }
            None => panic!("last row has no CRLF"),
            Some(c) => panic!("unexpected {c:?}"),
        }
    }
}

/// Names with the characters CSV must quote, and Chinese.
const NAMES: [&str; 3] = [
    "Zhang, \"Wei\" 张伟 ok",
    "line one\nline two 李娜",
    "plain name twenty ch",
];

async fn round_trip(t: &TempDb, ddl: &str, expected_sql: &str) {
    t.exec(ddl).await;
    let ts = [
        "2026-03-01 08:30:00",
        "1999-12-31 23:59:59",
        "2026-11-30 00:00:01",
    ];
    for (i, name) in NAMES.iter().enumerate() {
        let id = i + 1;
        let amount = ["12345.6700", "-0.0100", "NULL"][i];
        let flag = ["TRUE", "FALSE", "NULL"][i];
        let note = if i == 1 {
            "NULL".to_owned()
        } else {
            "'备注'".to_owned()
        };
        let name = name.replace('\'', "''");
        t.exec(&format!(
            "INSERT INTO t (id, name, at, amount, flag, note) VALUES \
             ({id}, '{name}', '{}', {amount}, {flag}, {note})",
            ts[i]
        ))
        .await;
    }
    let (r, bytes) = run(
        t,
        "SELECT id, name, at, amount, flag, note FROM t ORDER BY id",
        limits(0, 30),
        CSV,
    )
    .await;
    let outcome = r.unwrap();
    assert_eq!(outcome.rows, 3);
    assert!(!outcome.truncated);
    assert_eq!(
        outcome.columns,
        ["id", "name", "at", "amount", "flag", "note"]
    );
    let got = parse_csv(std::str::from_utf8(&bytes).unwrap());
    assert_eq!(got.len(), 4);
    assert_eq!(
        got[0],
        ["id", "name", "at", "amount", "flag", "note"].map(|s| Some(s.to_owned()))
    );
    // What the database holds, rendered as text by the database itself.
    let rows = sqlx::query(expected_sql)
        .fetch_all(t.db.pool())
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    for (row, csv) in rows.iter().zip(&got[1..]) {
        let want: Vec<Option<String>> = (0..6)
            .map(|i| {
                let v = labrelay::db::text(row, i).unwrap();
                (v != "<NULL>").then_some(v)
            })
            .collect();
        assert_eq!(csv, &want);
    }
    // And the exact renderings promised in the documentation.
    assert_eq!(got[1][0].as_deref(), Some("1"));
    assert_eq!(got[1][1].as_deref(), Some(NAMES[0]));
    assert_eq!(got[2][1].as_deref(), Some(NAMES[1]));
    assert_eq!(got[1][2].as_deref(), Some("2026-03-01T08:30:00"));
    assert_eq!(got[1][3].as_deref(), Some("12345.6700"));
    assert_eq!(got[2][3].as_deref(), Some("-0.0100"));
    assert_eq!(got[3][3], None);
    assert_eq!(got[1][4].as_deref(), Some("true"));
    assert_eq!(got[2][4].as_deref(), Some("false"));
    assert_eq!(got[3][4], None);
    assert_eq!(got[1][5].as_deref(), Some("备注"));
    assert_eq!(got[2][5], None);
}

#[tokio::test]
async fn postgres_round_trip_matches_the_database_field_by_field() {
    let admin = test_support::require!("PG_URL");
    let t = TempDb::server(&admin).await;
    round_trip(
        &t,
        "CREATE TABLE t (id int, name text, at timestamp, amount numeric(12,4), flag boolean, note text)",
        "SELECT id::text, name, to_char(at, 'YYYY-MM-DD\"T\"HH24:MI:SS'), \
         COALESCE(amount::text, '<NULL>'), COALESCE(flag::text, '<NULL>'), \
         COALESCE(note, '<NULL>') FROM t ORDER BY id",
    )
    .await;
    t.cleanup().await;
}

#[tokio::test]
async fn mariadb_round_trip_matches_the_database_field_by_field() {
    let admin = test_support::require!("MYSQL_URL");
    let t = TempDb::server(&admin).await;
    round_trip(
        &t,
        "CREATE TABLE t (id int, name varchar(100), at datetime, amount decimal(12,4), flag boolean, note text) CHARACTER SET utf8mb4",
        "SELECT CAST(id AS CHAR), name, DATE_FORMAT(at, '%Y-%m-%dT%H:%i:%s'), \
         COALESCE(CAST(amount AS CHAR), '<NULL>'), \
         CASE WHEN flag IS NULL THEN '<NULL>' WHEN flag THEN 'true' ELSE 'false' END, COALESCE(note, '<NULL>') \
         FROM t ORDER BY id",
    )
    .await;
    t.cleanup().await;
}

#[tokio::test]
async fn sqlite_round_trip_matches_the_database_field_by_field() {
    let t = TempDb::sqlite().await;
    // SQLite keeps what it is given: timestamps as ISO text, numerics as text, booleans
    // as text here, so the file shows exactly the stored values.
    t.exec("CREATE TABLE t (id INTEGER, name TEXT, at TEXT, amount TEXT, flag TEXT, note TEXT)")
        .await;
    for (i, name) in NAMES.iter().enumerate() {
        let name = name.replace('\'', "''");
        let (at, amount, flag, note) = [
            ("'2026-03-01T08:30:00'", "'12345.6700'", "'true'", "'备注'"),
            ("'1999-12-31T23:59:59'", "'-0.0100'", "'false'", "NULL"),
            ("'2026-11-30T00:00:01'", "NULL", "NULL", "'备注'"),
        ][i];
        t.exec(&format!(
            "INSERT INTO t VALUES ({}, '{name}', {at}, {amount}, {flag}, {note})",
            i + 1
        ))
        .await;
    }
    let (r, bytes) = run(
        &t,
        "SELECT id, name, at, amount, flag, note FROM t ORDER BY id",
        limits(0, 30),
        CSV,
    )
    .await;
    assert_eq!(r.unwrap().rows, 3);
    let got = parse_csv(std::str::from_utf8(&bytes).unwrap());
    let rows = sqlx::query(
        "SELECT CAST(id AS TEXT), name, at, COALESCE(amount, '<NULL>'), \
         COALESCE(flag, '<NULL>'), COALESCE(note, '<NULL>') FROM t ORDER BY id",
    )
    .fetch_all(t.db.pool())
    .await
    .unwrap();
    for (row, csv) in rows.iter().zip(&got[1..]) {
        let want: Vec<Option<String>> = (0..6)
            .map(|i| {
                let v = labrelay::db::text(row, i).unwrap();
                (v != "<NULL>").then_some(v)
            })
            .collect();
        assert_eq!(csv, &want);
    }
    assert_eq!(got[2][1].as_deref(), Some(NAMES[1]));
    assert_eq!(got[3][3], None);
    t.cleanup().await;
}

#[tokio::test]
async fn sqlite_integers_reals_and_blobs_are_rendered_as_documented() {
    let t = TempDb::sqlite().await;
    let (r, bytes) = run(
        &t,
        "SELECT 42 AS i, 2.5 AS r, x'00ff10' AS b, '' AS e, NULL AS n",
        limits(0, 30),
        CSV,
    )
    .await;
    assert_eq!(r.unwrap().rows, 1);
    assert_eq!(
        std::str::from_utf8(&bytes).unwrap(),
        "i,r,b,e,n\r\n42,2.5,00ff10,\"\",\r\n"
    );
    t.cleanup().await;
}

#[tokio::test]
async fn postgres_values_are_rendered_as_documented_whatever_the_server_defaults() {
    let admin = test_support::require!("PG_URL");
    let t = TempDb::server(&admin).await;
    // Server defaults that would change the rendering; the run sets its own (and the
    // driver's startup sets TimeZone = UTC, so timestamptz is always in UTC).
    t.exec(&format!(
        "ALTER DATABASE {} SET timezone = 'Asia/Shanghai'",
        t.name
    ))
    .await;
    t.exec(&format!(
        "ALTER DATABASE {} SET DateStyle = 'SQL, DMY'",
        t.name
    ))
    .await;
    t.exec(&format!(
        "ALTER DATABASE {} SET bytea_output = 'escape'",
        t.name
    ))
    .await;
    let (r, bytes) = run(
        &t,
        "SELECT '\\x00ff10'::bytea AS b, '2026-03-01 08:30:00+00'::timestamptz AT TIME ZONE 'UTC' AS ts, \
         '2026-03-01 08:30:00+00'::timestamptz AS tz, DATE '2026-03-01' AS d, TIME '08:30:00' AS tm, \
         INTERVAL '1 day 2 hours' AS iv, 1.5::float8 AS f",
        limits(0, 30),
        Output { format: Format::Tsv, bom: false },
    )
    .await;
    assert_eq!(r.unwrap().rows, 1);
    assert_eq!(
        std::str::from_utf8(&bytes).unwrap(),
        "b\tts\ttz\td\ttm\tiv\tf\n\
         00ff10\t2026-03-01T08:30:00\t2026-03-01T08:30:00+00\t2026-03-01\t08:30:00\tP1DT2H\t1.5\n"
    );
    t.cleanup().await;
}

#[tokio::test]
async fn mariadb_binary_is_hex() {
    let admin = test_support::require!("MYSQL_URL");
    let t = TempDb::server(&admin).await;
    t.exec("CREATE TABLE b (v varbinary(10))").await;
    t.exec("INSERT INTO b VALUES (x'00ff10')").await;
    let (r, bytes) = run(&t, "SELECT v FROM b", limits(0, 30), CSV).await;
    assert_eq!(r.unwrap().rows, 1);
    assert_eq!(std::str::from_utf8(&bytes).unwrap(), "v\r\n00ff10\r\n");
    t.cleanup().await;
}

async fn writes_are_refused(t: &TempDb) {
    t.exec("CREATE TABLE t (id int)").await;
    t.exec("INSERT INTO t VALUES (1)").await;
    for sql in [
        "INSERT INTO t VALUES (2)",
        "UPDATE t SET id = 3",
        "DELETE FROM t",
        // DDL commits implicitly on MariaDB: only the session default (SET SESSION
        // TRANSACTION READ ONLY) keeps the statement after that commit read-only.
        "CREATE TABLE made (id int)",
        "DROP TABLE t",
    ] {
        let (r, _) = run(t, sql, limits(0, 30), CSV).await;
        let e = r.expect_err(sql);
        assert!(matches!(e, RunError::ReadOnly { .. }), "{sql}: {e:?}");
        assert_eq!(labrelay::exit::classify_error(&e), Exit::Failed);
    }
    assert_eq!(t.count("t").await, 1);
    let sel = "SELECT COUNT(*) FROM t";
    let (r, _) = run(t, sel, limits(0, 30), CSV).await;
    r.unwrap();
    // The table `made` does not exist.
    assert!(
        sqlx::query("SELECT 1 FROM made")
            .execute(t.db.pool())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn postgres_write_fails_in_the_read_only_transaction_and_changes_nothing() {
    let admin = test_support::require!("PG_URL");
    let t = TempDb::server(&admin).await;
    writes_are_refused(&t).await;
    // A function with a side effect, which no SQL check could see through.
    t.exec("CREATE FUNCTION sneaky() RETURNS int LANGUAGE sql VOLATILE AS 'INSERT INTO t VALUES (9); SELECT 1'")
        .await;
    let (r, _) = run(&t, "SELECT sneaky()", limits(0, 30), CSV).await;
    assert!(matches!(r, Err(RunError::ReadOnly { .. })), "{r:?}");
    assert_eq!(t.count("t").await, 1);
    t.cleanup().await;
}

#[tokio::test]
async fn mariadb_write_fails_in_the_read_only_transaction_and_changes_nothing() {
    let admin = test_support::require!("MYSQL_URL");
    let t = TempDb::server(&admin).await;
    writes_are_refused(&t).await;
    t.exec("CREATE FUNCTION sneaky() RETURNS int MODIFIES SQL DATA BEGIN INSERT INTO t VALUES (9); RETURN 1; END")
        .await;
    let (r, _) = run(&t, "SELECT sneaky()", limits(0, 30), CSV).await;
    assert!(matches!(r, Err(RunError::ReadOnly { .. })), "{r:?}");
    assert_eq!(t.count("t").await, 1);
    t.cleanup().await;
}

#[tokio::test]
async fn sqlite_write_fails_on_the_read_only_connection_and_changes_nothing() {
    let t = TempDb::sqlite().await;
    writes_are_refused(&t).await;
    t.cleanup().await;
}

#[tokio::test]
async fn stacked_text_never_reaches_the_server() {
    let admin = test_support::require!("MYSQL_URL");
    let t = TempDb::server(&admin).await;
    t.exec("CREATE TABLE t (id int)").await;
    let (r, _) = run(
        &t,
        "SELECT 1; SET SESSION TRANSACTION READ WRITE; INSERT INTO t VALUES (1)",
        limits(0, 30),
        CSV,
    )
    .await;
    assert!(
        matches!(r, Err(RunError::NotOneStatement { count: 3 })),
        "{r:?}"
    );
    assert_eq!(t.count("t").await, 0);
    t.cleanup().await;
}

async fn assert_times_out(t: &TempDb, sql: &str) {
    let start = std::time::Instant::now();
    let (r, _) = run(t, sql, limits(0, 1), CSV).await;
    let took = start.elapsed();
    assert!(matches!(r, Err(RunError::Timeout { seconds: 1 })), "{r:?}");
    assert_eq!(
        r.unwrap_err().to_string(),
        "query too long: cancelled after 1 s"
    );
    assert!(took < std::time::Duration::from_secs(4), "took {took:?}");
}

#[tokio::test]
async fn postgres_sleep_beyond_the_limit_is_query_too_long_and_the_backend_stops() {
    let admin = test_support::require!("PG_URL");
    let t = TempDb::server(&admin).await;
    assert_times_out(&t, "SELECT pg_sleep(60)").await;
    let left: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active' AND datname = current_database()",
    )
    .fetch_one(t.db.pool())
    .await
    .unwrap();
    assert_eq!(left, 0);
    t.cleanup().await;
}

#[tokio::test]
async fn mariadb_sleep_beyond_the_limit_is_query_too_long_and_the_query_stops() {
    let admin = test_support::require!("MYSQL_URL");
    let t = TempDb::server(&admin).await;
    assert_times_out(&t, "SELECT SLEEP(60)").await;
    let left: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO = 'SELECT SLEEP(60)'",
    )
    .fetch_one(t.db.pool())
    .await
    .unwrap();
    assert_eq!(left, 0);
    t.cleanup().await;
}

#[tokio::test]
async fn sqlite_long_query_is_interrupted_at_the_limit() {
    let t = TempDb::sqlite().await;
    assert_times_out(
        &t,
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT MAX(n) FROM c",
    )
    .await;
    t.cleanup().await;
}

const THOUSAND: &str = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 1000) SELECT n FROM c";

async fn row_cap(t: &TempDb) {
    let (r, bytes) = run(t, THOUSAND, limits(10, 30), CSV).await;
    let o = r.unwrap();
    assert_eq!((o.rows, o.truncated), (10, true));
    let text = String::from_utf8(bytes).unwrap();
    assert_eq!(text.lines().count(), 11);
    assert!(text.ends_with("\r\n10\r\n"), "{text}");
    // Exactly at the cap is not truncated.
    let (r, _) = run(t, THOUSAND, limits(1000, 30), CSV).await;
    let o = r.unwrap();
    assert_eq!((o.rows, o.truncated), (1000, false));
    // An empty result still has its header.
    let (r, bytes) = run(t, "SELECT 1 AS a WHERE 1 = 0", limits(10, 30), CSV).await;
    let o = r.unwrap();
    assert_eq!((o.rows, o.truncated), (0, false));
    assert_eq!(o.columns, ["a"]);
    assert_eq!(bytes, b"a\r\n");
}

#[tokio::test]
async fn postgres_row_cap_truncates() {
    let admin = test_support::require!("PG_URL");
    let t = TempDb::server(&admin).await;
    row_cap(&t).await;
    t.cleanup().await;
}

#[tokio::test]
async fn mariadb_row_cap_truncates() {
    let admin = test_support::require!("MYSQL_URL");
    let t = TempDb::server(&admin).await;
    row_cap(&t).await;
    t.cleanup().await;
}

#[tokio::test]
async fn sqlite_row_cap_truncates() {
    let t = TempDb::sqlite().await;
    row_cap(&t).await;
    t.cleanup().await;
}

#[tokio::test]
async fn postgres_syntax_error_has_its_position() {
    let admin = test_support::require!("PG_URL");
    let t = TempDb::server(&admin).await;
    let (r, _) = run(&t, "SELECT 1 FRM t", limits(0, 30), CSV).await;
    match r {
        // `FRM` reads as a column alias; the error is at `t`, character 14.
        Err(RunError::Syntax { position, .. }) => assert_eq!(position, Some(14)),
        other => panic!("{other:?}"),
    }
    t.cleanup().await;
}

#[tokio::test]
async fn mariadb_syntax_error_is_typed() {
    let admin = test_support::require!("MYSQL_URL");
    let t = TempDb::server(&admin).await;
    let (r, _) = run(&t, "SELECT 1 FRM t", limits(0, 30), CSV).await;
    assert!(matches!(r, Err(RunError::Syntax { .. })), "{r:?}");
    t.cleanup().await;
}

#[tokio::test]
async fn postgres_permission_denied_is_typed() {
    let admin = test_support::require!("PG_URL");
    let t = TempDb::server(&admin).await;
    let role = test_support::unique("mqro").replace('-', "_");
    t.exec(&format!("CREATE ROLE {role} LOGIN")).await;
    t.exec("CREATE TABLE secret_t (id int)").await;
    let mut cfg = t.cfg.clone();
    let mut url = cfg.url.expose().clone();
    url.set_username(&role).unwrap();
    url.set_password(None).unwrap();
    cfg.url = RedactedUrl::new(url);
    let dir = test_support::tempdir();
    let r = run_to_file(
        &cfg,
        "SELECT * FROM secret_t",
        limits(0, 30),
        CSV,
        &dir.path().join("f"),
    )
    .await;
    assert!(matches!(r, Err(RunError::PermissionDenied { .. })), "{r:?}");
    t.cleanup().await;
    t_drop_role(&admin, &role).await;
}

async fn t_drop_role(admin_url: &str, role: &str) {
    let admin = Db::connect(&DatabaseConfig::from_url(
        RedactedUrl::parse(admin_url).unwrap(),
    ))
    .await
    .unwrap();
    sqlx::query(&format!("DROP ROLE IF EXISTS {role}"))
        .execute(admin.pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn unreachable_database_is_exit_75() {
    let mut cfg =
        DatabaseConfig::from_url(RedactedUrl::parse("postgres://u:pw@127.0.0.1:1/x").unwrap());
    cfg.connect_timeout_secs = 2;
    let dir = test_support::tempdir();
    let e = run_to_file(&cfg, "SELECT 1", limits(0, 30), CSV, &dir.path().join("f"))
        .await
        .unwrap_err();
    assert!(matches!(e, RunError::Unreachable { .. }), "{e:?}");
    assert_eq!(labrelay::exit::classify_error(&e), Exit::TempFail);
    assert!(!e.to_string().contains("pw"), "{e}");
    let a = anyhow::Error::new(e).context("running statement 1");
    assert_eq!(labrelay::exit::classify(&a), Exit::TempFail);
}

#[tokio::test]
async fn xlsx_holds_numbers_as_numbers_and_everything_else_as_text() {
    let t = TempDb::sqlite().await;
    let dir = test_support::tempdir();
    let path = dir.path().join("f.xlsx");
    let o = run_to_file(
        &t.cfg,
        "SELECT 1200 AS reads, '样本二' AS name, '007' AS code, NULL AS missing, 2.5 AS ratio \
         UNION ALL SELECT 7, 'a<b&c', '12345678901234567', NULL, -0.125",
        limits(0, 30),
        Output {
            format: Format::Xlsx,
            bom: false,
        },
        &path,
    )
    .await
    .unwrap();
    assert_eq!((o.rows, o.truncated), (2, false));
    let mut z = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
    let mut sheet = String::new();
    std::io::Read::read_to_string(
        &mut z.by_name("xl/worksheets/sheet1.xml").unwrap(),
        &mut sheet,
    )
    .unwrap();
    let cell = |r: &str| -> String {
        let start = sheet
            .find(&format!("<c r=\"{r}\""))
            .unwrap_or_else(|| panic!("no cell {r} in {sheet}"));
        let end = start + sheet[start..].find("</c>").unwrap();
        sheet[start..end].to_owned()
    };
    assert!(cell("A1").contains(">reads<"), "{}", cell("A1"));
    assert!(cell("A2").contains("<v>1200</v>"), "{}", cell("A2"));
    assert!(cell("B2").contains("样本二"), "{}", cell("B2"));
    assert!(cell("C2").contains(">007<"), "{}", cell("C2"));
    assert!(!cell("C2").contains("<v>"), "{}", cell("C2"));
    assert!(
        !sheet.contains("<c r=\"D2\""),
        "NULL must be an empty cell: {sheet}"
    );
    assert!(cell("E2").contains("<v>2.5</v>"), "{}", cell("E2"));
    assert!(cell("B3").contains("a&lt;b&amp;c"), "{}", cell("B3"));
    assert!(cell("C3").contains(">12345678901234567<"), "{}", cell("C3"));
    assert!(cell("E3").contains("<v>-0.125</v>"), "{}", cell("E3"));
    // No temporary row files are left beside the result.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("f.xlsx")]);
    t.cleanup().await;
}

#[tokio::test]
async fn csv_bom_for_excel() {
    let t = TempDb::sqlite().await;
    let (r, bytes) = run(
        &t,
        "SELECT '名' AS n",
        limits(0, 30),
        Output {
            format: Format::Csv,
            bom: true,
        },
    )
    .await;
    r.unwrap();
    assert_eq!(bytes, "\u{feff}n\r\n名\r\n".as_bytes());
    t.cleanup().await;
}

/// Resident memory now and its peak since the last reset, in KiB (Linux).
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// nextest runs each test in its own process, so the peak belongs to this export.
async fn memory_stays_flat(t: &TempDb, sql: &str) {
    // Warm up (connection, buffers, allocator), then reset the peak to the current RSS.
    let (r, _) = run(t, sql, limits(1000, 60), CSV).await;
    r.unwrap();
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let (before, _) = rss_kib();
    let dir = test_support::tempdir();
    let path = dir.path().join("big.csv");
    let o = run_to_file(&t.cfg, sql, limits(0, 120), CSV, &path)
        .await
        .unwrap();
    assert_eq!(o.rows, 2_000_000);
    let size = std::fs::metadata(&path).unwrap().len();
    let (_, peak) = rss_kib();
    let growth_kib = peak.saturating_sub(before);
    eprintln!("file {} KiB, peak RSS growth {growth_kib} KiB", size / 1024);
    // Holding the rows would need more than the file's size; streaming needs buffers.
    assert!(size > 120 * 1024 * 1024, "file only {size} bytes");
    assert!(growth_kib < 8 * 1024, "peak RSS grew by {growth_kib} KiB");
    // Control: the measurement does see a whole result held in memory.
    let held = std::fs::read(&path).unwrap();
    let (_, peak) = rss_kib();
    assert!(
        peak.saturating_sub(before) > size / 1024 / 2,
        "peak RSS missed {} KiB held in memory",
        held.len() / 1024
    );
}

#[tokio::test]
async fn postgres_export_of_2000000_rows_keeps_memory_flat() {
    let admin = test_support::require!("PG_URL");
    let t = TempDb::server(&admin).await;
    memory_stays_flat(
        &t,
        "SELECT n, 'name, \"quoted\" 名字 ' || n AS name, TIMESTAMP '2026-01-01' + n * INTERVAL '1 second' AS at, \
         n * 1.25::numeric(12,2) AS amount, NULL AS note, repeat('x', 20) AS pad \
         FROM generate_series(1, 2000000) AS n",
    )
    .await;
    t.cleanup().await;
}

#[tokio::test]
async fn mariadb_export_of_2000000_rows_keeps_memory_flat() {
    let admin = test_support::require!("MYSQL_URL");
    let t = TempDb::server(&admin).await;
    memory_stays_flat(
        &t,
        "SELECT seq AS n, CONCAT('name, \"quoted\" 名字 ', seq) AS name, \
         TIMESTAMP '2026-01-01 00:00:00' + INTERVAL seq SECOND AS at, \
         seq * CAST(1.25 AS DECIMAL(12,2)) AS amount, NULL AS note, REPEAT('x', 20) AS pad \
         FROM seq_1_to_2000000",
    )
    .await;
    t.cleanup().await;
}
