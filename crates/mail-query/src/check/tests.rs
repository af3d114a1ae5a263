//! The checker's table: statements each engine accepts, and statements it refuses with
//! the reason it must give (stacked queries, comments, case and unicode tricks,
//! writable CTEs, file and sleep functions hidden in subqueries).

use super::*;

const ALL: [Engine; 4] = [
    Engine::Postgres,
    Engine::Mariadb,
    Engine::Sqlite,
    Engine::Oracle,
];

/// The first refusal's full reason (`statement N: …`), or `None` when all accepted.
fn refusal(engine: Engine, sql: &str) -> Option<String> {
    check(engine, sql).iter().find_map(Statement::reason)
}

#[track_caller]
fn assert_accepted(engine: Engine, sql: &str) {
    let got = check(engine, sql);
    assert!(
        got.iter().all(Statement::accepted),
        "{}: {sql:?} should be accepted: {got:?}",
        engine.name()
    );
}

#[track_caller]
fn assert_refused(engine: Engine, sql: &str, want: &str) {
    match refusal(engine, sql) {
        Some(reason) => assert!(
            reason.contains(want),
            "{}: {sql:?}: reason {reason:?} should contain {want:?}",
            engine.name()
        ),
        None => panic!("{}: {sql:?} should be refused ({want})", engine.name()),
    }
}

const COMMON_REFUSED: &[(&str, &str)] = &[
    (
        "DROP TABLE samples",
        "statement 1: DROP TABLE is not a read-only query",
    ),
    (
        "SELECT 1; DROP TABLE x",
        "statement 2: DROP TABLE is not a read-only query",
    ),
    ("SELECT 1 /* ; */; DROP TABLE x", "statement 2: DROP TABLE"),
    (
        "SELECT 1; -- x\n DELETE FROM samples",
        "statement 2: DELETE is not",
    ),
    ("dRoP tAbLe samples", "DROP TABLE is not a read-only query"),
    (
        "INSERT INTO t VALUES (1)",
        "INSERT is not a read-only query",
    ),
    ("UPDATE t SET a = 1", "UPDATE is not a read-only query"),
    ("DELETE FROM t", "DELETE is not a read-only query"),
    ("TRUNCATE TABLE t", "TRUNCATE TABLE is not"),
    ("CREATE TABLE t (a int)", "CREATE TABLE is not"),
    ("ALTER TABLE t ADD COLUMN b int", "ALTER TABLE is not"),
    ("GRANT SELECT ON t TO someone", "GRANT SELECT is not"),
    ("SET search_path = evil", "SET is not a read-only query"),
    ("CALL do_things()", "CALL is not a read-only query"),
    ("COPY t TO '/tmp/x'", "COPY is not a read-only query"),
    ("BEGIN", "BEGIN is not a read-only query"),
    ("COMMIT", "COMMIT is not"),
    ("/* hi */ DROP TABLE x", "DROP TABLE is not"),
    ("SELECT 1；DROP TABLE x", "full-width character '；'"),
    ("ＳＥＬＥＣＴ 1", "is not a read-only query"),
    ("SELECT * INTO new_table FROM t", "INTO (SELECT … INTO"),
    ("SELECT * FROM t FOR UPDATE", "FOR UPDATE (locks rows)"),
    ("SELECT * FROM t FOR SHARE", "FOR SHARE (locks rows)"),
    ("SELECT 'unterminated", "cannot be read as SQL"),
    ("", "no SQL statement found"),
    (
        "-- only a comment\n/* and another */",
        "no SQL statement found",
    ),
    ("SELECT sleep(10)", "function sleep (sleeps"),
    ("SELECT SLEEP(10)", "function SLEEP (sleeps"),
    (
        "SELECT load_extension('/tmp/evil.so')",
        "function load_extension",
    ),
    (
        "SELECT * FROM t WHERE id IN (SELECT id FROM u WHERE sleep(5) = 0)",
        "function sleep",
    ),
    (
        "SELECT (SELECT (SELECT pg_sleep(1))) AS deep",
        "function pg_sleep (sleeps",
    ),
    (
        "SELECT 1 FROM t WHERE 1 = 1 AND 0 = benchmark(10000000, md5('a'))",
        "function benchmark",
    ),
    (
        "SELECT load_file('/etc/passwd')",
        "function load_file (reads a file",
    ),
    (
        "SELECT selectx FROM t; SELECT 1 FROM t; UPDATE t SET a=1",
        "statement 3: UPDATE",
    ),
];

const POSTGRES_REFUSED: &[(&str, &str)] = &[
    (
        "WITH d AS (DELETE FROM samples RETURNING *) SELECT * FROM d",
        "DELETE inside a query",
    ),
    (
        "WITH u AS (UPDATE t SET a = 1 RETURNING a) SELECT * FROM u",
        "UPDATE inside a query",
    ),
    (
        "WITH i AS (INSERT INTO t VALUES (1) RETURNING *) SELECT 1",
        "INTO (SELECT … INTO",
    ),
    (
        "WITH s AS (SELECT pg_sleep(600)) SELECT * FROM s",
        "function pg_sleep (sleeps",
    ),
    (
        "SELECT pg_catalog.pg_sleep(1)",
        "function pg_catalog.pg_sleep",
    ),
    ("SELECT PG_SLEEP_FOR('5 minutes')", "function PG_SLEEP_FOR"),
    (
        "SELECT pg_read_file('/etc/passwd')",
        "function pg_read_file (reads a file",
    ),
    (
        "SELECT * FROM pg_ls_dir('/')",
        "table function pg_ls_dir (lists directories",
    ),
    (
        "SELECT lo_import('/etc/passwd')",
        "function lo_import (reads or writes large objects",
    ),
    ("SELECT lo_export(1234, '/tmp/x')", "function lo_export"),
    (
        "SELECT pg_advisory_lock(1)",
        "function pg_advisory_lock (takes a lock",
    ),
    (
        "SELECT pg_terminate_backend(123)",
        "function pg_terminate_backend (administers",
    ),
    (
        "SELECT set_config('statement_timeout', '0', false)",
        "function set_config",
    ),
    (
        "SELECT nextval('samples_id_seq')",
        "function nextval (advances a sequence",
    ),
    (
        "SELECT * FROM dblink('host=evil', 'select 1') AS t(a int)",
        "dblink",
    ),
    (
        "SELECT dblink_exec('host=x', 'DROP TABLE t')",
        "function dblink_exec",
    ),
    (
        "SELECT query_to_xml('DELETE FROM t', true, true, '')",
        "function query_to_xml (runs SQL",
    ),
    (
        "COPY (SELECT 1) TO PROGRAM 'rm -rf /'",
        "COPY is not a read-only query",
    ),
    ("EXPLAIN ANALYZE SELECT pg_sleep(1)", "EXPLAIN ANALYZE"),
    ("EXPLAIN (ANALYZE) DELETE FROM t", "EXPLAIN ANALYZE"),
    ("EXPLAIN (ANALYZE true) SELECT 1", "EXPLAIN ANALYZE"),
    ("EXPLAIN DELETE FROM t", "EXPLAIN of DELETE"),
    (
        "SELECT * FROM t FOR NO KEY UPDATE",
        "FOR NO KEY (locks rows)",
    ),
    (
        "SELECT * FROM t FOR KEY SHARE",
        "FOR KEY SHARE (locks rows)",
    ),
    (
        "SELECT 'a\\'; DROP TABLE t; --'",
        "backslash before a quote",
    ),
    ("SELECT E'\\''; DROP TABLE t", "statement 2: DROP TABLE"),
    (
        "SELECT 1 /* /* */ ; DROP TABLE t; /* */ */; DROP TABLE u",
        "statement 2: DROP TABLE",
    ),
    (
        "DO $$ BEGIN PERFORM pg_sleep(1); END $$",
        "DO is not a read-only query",
    ),
    ("PREPARE p AS DELETE FROM t", "PREPARE is not"),
    ("LISTEN chan", "LISTEN is not"),
    ("VACUUM t", "VACUUM T is not"),
    ("LOCK TABLE t", "LOCK TABLE is not"),
    ("SELECT 1 FROM t FOR UPDATE SKIP LOCKED", "FOR UPDATE"),
    ("SELECT pg_notify('c', 'x')", "function pg_notify"),
    ("SELECT pg_reload_conf()", "function pg_reload_conf"),
    ("SELECT pg_stat_reset()", "function pg_stat_reset"),
    (
        "SELECT pg_stat_statements_reset()",
        "function pg_stat_statements_reset",
    ),
    // With standard_conforming_strings off the server reads one string up to the
    // second quote and runs pg_sleep; the parser would see two strings.
    (
        "SELECT 'a\\' , ' , pg_sleep(1) -- '",
        "backslash before a quote",
    ),
    (
        "SELECT U&\"\\0070g_sleep\"(1)",
        "Unicode-escaped identifier",
    ),
    (
        "SELECT u&\"d!0070g_sleep\" UESCAPE '!' (1)",
        "Unicode-escaped identifier",
    ),
    ("SELECT * FROM (SELECT * FROM lo_get(1)) x", "lo_get"),
];

const MARIADB_REFUSED: &[(&str, &str)] = &[
    (
        "SELECT * FROM t INTO OUTFILE '/tmp/x'",
        "INTO OUTFILE (writes a file",
    ),
    (
        "SELECT * FROM t INTO DUMPFILE '/tmp/x'",
        "INTO DUMPFILE (writes a file",
    ),
    (
        "SELECT * FROM t INTO /* x */ outfile '/tmp/x'",
        "INTO OUTFILE (writes a file",
    ),
    ("SELECT 1 INTO @v", "INTO (SELECT … INTO"),
    (
        "SELECT * FROM t LOCK IN SHARE MODE",
        "LOCK IN SHARE MODE (locks rows)",
    ),
    ("SELECT 1 /*! ; DROP TABLE t */", "executable comment"),
    ("SELECT 1 /*!50000 , SLEEP(10) */", "executable comment"),
    ("SELECT 1 /*M! , SLEEP(10) */", "executable comment"),
    (
        "SELECT 'a\\'; DROP TABLE t; -- '",
        "backslash before a quote",
    ),
    ("SELECT \"a\\\"\"", "backslash before a quote"),
    ("SELECT 1 # ; \n; DROP TABLE t", "statement 2: DROP TABLE"),
    (
        "SELECT GET_LOCK('x', 10)",
        "function GET_LOCK (takes a lock",
    ),
    (
        "SELECT master_pos_wait('log', 4)",
        "function master_pos_wait",
    ),
    (
        "SELECT sys_exec('id')",
        "function sys_exec (runs a shell command",
    ),
    ("SELECT NEXTVAL(s)", "function NEXTVAL"),
    (
        "SELECT * FROM t WHERE a = (SELECT BENCHMARK(1000000, SHA1('x')))",
        "function BENCHMARK",
    ),
    (
        "LOAD DATA INFILE '/etc/passwd' INTO TABLE t",
        "LOAD DATA is not",
    ),
    ("HANDLER t OPEN", "HANDLER is not"),
    ("DO SLEEP(5)", "DO is not"),
    ("SET GLOBAL general_log = 1", "SET is not"),
    ("SHOW GRANTS", "SHOW is not"),
    ("LOCK TABLES t WRITE", "LOCK TABLES is not"),
    ("REPLACE INTO t VALUES (1)", "REPLACE is not"),
    ("INSTALL PLUGIN x SONAME 'x.so'", "INSTALL is not"),
    (
        "CREATE TABLE f (a int) ENGINE=FEDERATED CONNECTION='mysql://x'",
        "CREATE TABLE is not",
    ),
];

const SQLITE_REFUSED: &[(&str, &str)] = &[
    (
        "ATTACH DATABASE '/tmp/evil.db' AS evil",
        "ATTACH is not a read-only query",
    ),
    ("DETACH DATABASE evil", "DETACH is not"),
    ("PRAGMA writable_schema = 1", "PRAGMA is not"),
    ("VACUUM INTO '/tmp/copy.db'", "VACUUM INTO is not"),
    (
        "SELECT load_extension('evil')",
        "function load_extension (loads native code",
    ),
    (
        "SELECT writefile('/tmp/x', 'data')",
        "function writefile (writes a file",
    ),
    ("SELECT readfile('/etc/passwd')", "function readfile"),
    ("SELECT fts3_tokenizer('simple')", "function fts3_tokenizer"),
    ("SELECT randomblob(1000000000)", "function randomblob"),
    ("SELECT 1; ATTACH 'x' AS y", "statement 2: ATTACH"),
    ("REPLACE INTO t VALUES (1)", "REPLACE is not"),
    ("INSERT OR REPLACE INTO t VALUES (1)", "INSERT is not"),
    (
        "WITH x AS (SELECT 1) DELETE FROM t",
        "DELETE inside a query",
    ),
    (
        "SELECT * FROM t WHERE a IN (SELECT load_extension('x'))",
        "function load_extension",
    ),
];

const ORACLE_REFUSED: &[(&str, &str)] = &[
    (
        "SELECT DBMS_LOCK.SLEEP(10) FROM dual",
        "function DBMS_LOCK.SLEEP (sleeps",
    ),
    (
        "SELECT dbms_pipe.receive_message('x', 10) FROM dual",
        "Oracle package DBMS_PIPE",
    ),
    (
        "SELECT UTL_HTTP.REQUEST('http://evil') FROM dual",
        "Oracle package UTL_HTTP",
    ),
    (
        "SELECT sys.utl_inaddr.get_host_name('x') FROM dual",
        "Oracle package SYS.UTL_INADDR",
    ),
    (
        "SELECT dbms_xmlgen.getxml('DELETE FROM t') FROM dual",
        "Oracle package DBMS_XMLGEN",
    ),
    (
        "SELECT bfilename('DIR', 'f') FROM dual",
        "function bfilename",
    ),
    // Oracle's q'[…]' quoting: the quote inside does not end the string.
    (
        "SELECT q'[x']' , dbms_lock.sleep(1) -- ' FROM dual",
        "function dbms_lock.sleep",
    ),
    (
        "SELECT * FROM t FOR UPDATE NOWAIT",
        "FOR UPDATE (locks rows)",
    ),
    ("BEGIN DBMS_LOCK.SLEEP(10); END;", "BEGIN is not"),
    (
        "MERGE INTO t USING u ON (t.a = u.a) WHEN MATCHED THEN UPDATE SET t.b = 1",
        "MERGE is not",
    ),
];

#[test]
fn read_only_queries_are_accepted_on_every_engine() {
    for engine in ALL {
        for sql in [
            "SELECT 1",
            "select id, name from samples where name = 'a;b' order by id",
            "SeLeCt * FrOm samples",
            "SELECT 'DROP TABLE x; DELETE FROM y' AS text",
            "SELECT 1 -- ; DROP TABLE x\n",
            "SELECT 1 /* ; DROP TABLE x */",
            "SELECT '；' AS fullwidth_semicolon_in_a_string",
            "SELECT count(*) FROM samples s JOIN runs r ON r.sample_id = s.id GROUP BY s.id",
            "SELECT * FROM (SELECT id FROM samples WHERE id IN (SELECT sample_id FROM runs)) t",
            "WITH recent AS (SELECT * FROM runs WHERE id > 10) SELECT * FROM recent",
            "SELECT a FROM t UNION ALL SELECT b FROM u",
            "SELECT upper(name), lower(name), coalesce(x, 0) FROM samples",
            "SELECT 1;\nSELECT 2;\n-- trailing comment only\n",
        ] {
            assert_accepted(engine, sql);
        }
    }
    assert_accepted(Engine::Postgres, "VALUES (1, 'a'), (2, 'b')");
    assert_accepted(Engine::Postgres, "EXPLAIN SELECT * FROM samples");
    assert_accepted(Engine::Postgres, "EXPLAIN (FORMAT JSON) SELECT 1");
    assert_accepted(Engine::Postgres, "SELECT $$a;b$$ AS dollar_quoted");
    assert_accepted(
        Engine::Postgres,
        "SELECT 1 /* nested /* comment */ ; still comment */",
    );
    assert_accepted(
        Engine::Postgres,
        "SELECT now() - interval '1 day', generate_series(1, 3)",
    );
    assert_accepted(Engine::Mariadb, "SELECT `name` FROM `samples` # comment");
    assert_accepted(Engine::Mariadb, "EXPLAIN SELECT * FROM samples");
    assert_accepted(Engine::Mariadb, "SELECT 'C:\\\\data\\\\x' AS path");
    assert_accepted(Engine::Sqlite, "EXPLAIN QUERY PLAN SELECT * FROM samples");
    assert_accepted(Engine::Sqlite, "SELECT [name] FROM samples");
    assert_accepted(Engine::Sqlite, "SELECT 'it''s' AS quoted");
    assert_accepted(Engine::Oracle, "SELECT dbms_random.value FROM dual");
    assert_accepted(Engine::Oracle, "SELECT q'[it's; DROP TABLE x]' FROM dual");
    assert_accepted(Engine::Oracle, "SELECT * FROM samples WHERE ROWNUM <= 10");
}

#[test]
fn statements_are_numbered_and_keep_their_text() {
    let got = check(
        Engine::Postgres,
        "-- report\nSELECT 1;\r\n  SELECT 'a;b'  ;\n\nDROP TABLE x;",
    );
    let got: Vec<_> = got
        .iter()
        .map(|s| (s.index, s.sql.as_str(), s.accepted()))
        .collect();
    assert_eq!(
        got,
        [
            (1, "SELECT 1", true),
            (2, "SELECT 'a;b'", true),
            (3, "DROP TABLE x", false)
        ]
    );
}

#[test]
fn a_trailing_comment_is_quoted_with_its_statement() {
    let got = check(Engine::Mariadb, "SELECT 1 /*! , sleep(3) */ ;");
    assert_eq!(got[0].sql, "SELECT 1 /*! , sleep(3) */");
    assert!(!got[0].accepted());
}

#[test]
fn an_executable_comment_alone_is_a_refused_statement() {
    let got = check(
        Engine::Mariadb,
        "SELECT 1; /*! DROP TABLE t */;\n-- plain\n",
    );
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got[0].accepted());
    assert_eq!(got[1].sql, "/*! DROP TABLE t */");
    assert!(
        got[1]
            .reason()
            .is_some_and(|r| r.starts_with("statement 2: executable comment")),
        "{got:?}"
    );
    // Elsewhere a comment is a comment.
    assert_eq!(check(Engine::Postgres, "SELECT 1; /*! x */").len(), 1);
}

#[test]
fn writes_and_session_changes_are_refused_on_every_engine() {
    for engine in ALL {
        for (sql, want) in COMMON_REFUSED {
            assert_refused(engine, sql, want);
        }
    }
}

#[test]
fn quoted_function_names_are_still_denied() {
    for engine in [Engine::Postgres, Engine::Sqlite, Engine::Oracle] {
        assert_refused(engine, "SELECT \"sleep\"(10)", "function \"sleep\" (sleeps");
        assert_refused(
            engine,
            "SELECT \"LOAD_EXTENSION\"('x')",
            "function \"LOAD_EXTENSION\"",
        );
    }
    assert_refused(
        Engine::Mariadb,
        "SELECT `sleep`(10)",
        "function `sleep` (sleeps",
    );
    assert_refused(
        Engine::Sqlite,
        "SELECT [load_extension]('x')",
        "function [load_extension]",
    );
}

#[test]
fn postgres_specific_bypasses_are_refused() {
    let e = Engine::Postgres;
    for (sql, want) in POSTGRES_REFUSED {
        assert_refused(e, sql, want);
    }
}

#[test]
fn mariadb_specific_bypasses_are_refused() {
    let e = Engine::Mariadb;
    for (sql, want) in MARIADB_REFUSED {
        assert_refused(e, sql, want);
    }
}

#[test]
fn sqlite_specific_bypasses_are_refused() {
    let e = Engine::Sqlite;
    for (sql, want) in SQLITE_REFUSED {
        assert_refused(e, sql, want);
    }
}

#[test]
fn oracle_specific_bypasses_are_refused() {
    let e = Engine::Oracle;
    for (sql, want) in ORACLE_REFUSED {
        assert_refused(e, sql, want);
    }
}

fn specific(engine: Engine) -> &'static [(&'static str, &'static str)] {
    match engine {
        Engine::Postgres => POSTGRES_REFUSED,
        Engine::Mariadb => MARIADB_REFUSED,
        Engine::Sqlite => SQLITE_REFUSED,
        Engine::Oracle => ORACLE_REFUSED,
    }
}

/// `statement N: ` at the start of an expected reason, if any.
fn split_index(want: &str) -> (Option<usize>, &str) {
    want.strip_prefix("statement ")
        .and_then(|rest| rest.split_once(": "))
        .and_then(|(n, rest)| Some((Some(n.parse().ok()?), rest)))
        .unwrap_or((None, want))
}

/// Every refused case again, disguised: other letter case, a comment or blank lines
/// in front, stacked behind an accepted query, blanks replaced by comments and line
/// breaks. Each disguise is still refused; where it keeps the tokens (case, leading
/// comment, stacking) the reason is the same, with the statement number moved on.
#[test]
fn disguised_bypasses_are_still_refused() {
    let mut checked = [0usize; 4];
    for (e, engine) in ALL.into_iter().enumerate() {
        for (sql, want) in COMMON_REFUSED.iter().chain(specific(engine)) {
            let (index, construct) = split_index(want);
            // An input without statements, or one the tokenizer cannot read, is one
            // whole-text refusal; prefixes change what it is.
            let whole_text = want.contains("no SQL statement") || want.contains("cannot be read");
            let mut same_reason = vec![
                (sql.to_uppercase(), 0),
                (sql.to_lowercase(), 0),
                (format!("/* report */\n\n  {sql}"), 0),
                (format!("-- report\n{sql}"), 0),
            ];
            if !whole_text {
                same_reason.push((format!("SELECT 1;\n{sql}"), 1));
                same_reason.push((format!("SELECT 'x;y' AS a; SELECT 2;{sql}"), 2));
            }
            for (variant, shift) in same_reason {
                let reason = refusal(engine, &variant).unwrap_or_else(|| {
                    panic!("{}: {variant:?} accepted (from {sql:?})", engine.name())
                });
                let expected = match index {
                    Some(n) => format!("statement {}: {construct}", n + shift),
                    None => construct.to_owned(),
                };
                assert!(
                    reason.to_lowercase().contains(&expected.to_lowercase()),
                    "{}: {variant:?}: {reason:?} should contain {expected:?}",
                    engine.name()
                );
                checked[e] += 1;
            }
            if whole_text {
                continue;
            }
            for variant in [
                sql.replace(' ', "\n\t "),
                sql.replace(' ', " /**/ "),
                format!("{sql};\n-- done\n"),
            ] {
                assert!(
                    refusal(engine, &variant).is_some(),
                    "{}: {variant:?} accepted (from {sql:?})",
                    engine.name()
                );
                checked[e] += 1;
            }
        }
    }
    // The corpus: at least 100 refused texts per engine.
    for (e, engine) in ALL.into_iter().enumerate() {
        assert!(checked[e] >= 100, "{}: {}", engine.name(), checked[e]);
    }
}
