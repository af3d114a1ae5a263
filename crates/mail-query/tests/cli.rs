//! Command-line contract of `mail-query`: help text, usage and configuration errors.

mod export;
mod requests;

const BIN: &str = env!("CARGO_BIN_EXE_mail-query");
const VALID: &[&str] = &["--once"];

#[test]
fn help_is_stable() {
    insta::assert_snapshot!(test_support::cli::help(BIN));
}

#[test]
fn usage_and_config_errors_have_their_exit_codes() {
    test_support::cli::assert_common_contract(BIN, VALID);
}

#[test]
fn mailbox_modes_need_an_imap_section_and_say_so_with_exit_78() {
    let home = test_support::tempdir();
    for mode in ["--once", "--watch"] {
        let out = test_support::cli::run(BIN, home.path(), &["--no-config", mode]);
        assert_eq!(out.status.code(), Some(78), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("[imap]"), "{err}");
        assert!(out.stdout.is_empty());
    }
    let out = test_support::cli::run(BIN, home.path(), &["--no-config"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

mod check {
    //! `mail-query check`: the SQL check on files and stdin, text and JSON, exit codes.

    use std::io::Write as _;
    use std::path::Path;
    use std::process::{Output, Stdio};

    use super::BIN;

    fn run_in(home: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = test_support::cli::command(BIN, home);
        cmd.args(args);
        let Some(input) = stdin else {
            return cmd.output().expect("running mail-query");
        };
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("running mail-query");
        // A usage error exits before reading stdin: a closed pipe is not a failure.
        match child.stdin.take().expect("piped stdin").write_all(input) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("writing stdin: {e}"),
            _ => {}
        }
        child.wait_with_output().expect("waiting for mail-query")
    }

    fn stdout(out: &Output) -> String {
        String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
    }

    fn stderr(out: &Output) -> String {
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn records(out: &Output) -> Vec<serde_json::Value> {
        stdout(out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect()
    }

    #[test]
    fn accepted_file_exits_0_with_one_line_per_statement() {
        let home = test_support::tempdir();
        let f = home.path().join("ok.sql");
        std::fs::write(&f, "SELECT 1;\n-- note\nSELECT 'a;b' FROM t;\n").unwrap();
        let f = f.to_str().unwrap();
        let out = run_in(
            home.path(),
            &["--no-config", "check", "--engine", "postgres", f],
            None,
        );
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert_eq!(
            stdout(&out),
            format!(
                "{f}: statement 1: accepted\n{f}: statement 2: accepted\n\
                 2 statements: 2 accepted, 0 refused\n"
            )
        );
    }

    #[test]
    fn refused_statement_exits_1_and_quotes_statement_and_reason() {
        let home = test_support::tempdir();
        let f = home.path().join("bad.sql");
        std::fs::write(
            &f,
            "SELECT 1 /* ; */;\nWITH s AS (SELECT pg_sleep(600))\nSELECT * FROM s;\nDROP TABLE x",
        )
        .unwrap();
        let f = f.to_str().unwrap();
        let out = run_in(
            home.path(),
            &["--no-config", "check", "--engine", "postgres", f],
            None,
        );
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert_eq!(
            stdout(&out),
            format!(
                "{f}: statement 1: accepted\n\
                 {f}: statement 2: refused: function pg_sleep (sleeps, holding a connection)\n\
                 \x20   WITH s AS (SELECT pg_sleep(600))\n\
                 \x20   SELECT * FROM s\n\
                 {f}: statement 3: refused: DROP TABLE is not a read-only query (accepted: \
                 SELECT, WITH … SELECT, VALUES, EXPLAIN without ANALYZE)\n\
                 \x20   DROP TABLE x\n\
                 3 statements: 1 accepted, 2 refused\n"
            )
        );
        assert!(out.stderr.is_empty(), "{}", stderr(&out));
    }

    #[test]
    fn json_gives_one_record_per_statement_and_a_summary() {
        let home = test_support::tempdir();
        let out = run_in(
            home.path(),
            &["--no-config", "check", "--engine", "mariadb", "--json"],
            Some(b"SELECT 1; SELECT * FROM t INTO OUTFILE '/tmp/x'"),
        );
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let recs = records(&out);
        assert_eq!(recs.len(), 3, "{recs:?}");
        assert_eq!(
            recs[0],
            serde_json::json!({"type": "statement", "file": "-", "index": 1,
                "sql": "SELECT 1", "verdict": "accepted", "reason": null})
        );
        assert_eq!(recs[1]["type"], "statement");
        assert_eq!(recs[1]["index"], 2);
        assert_eq!(recs[1]["sql"], "SELECT * FROM t INTO OUTFILE '/tmp/x'");
        assert_eq!(recs[1]["verdict"], "refused");
        assert_eq!(
            recs[1]["reason"],
            "statement 2: INTO OUTFILE (writes a file on the database server)"
        );
        assert_eq!(
            recs[2],
            serde_json::json!({"type": "summary", "engine": "mariadb", "files": 1,
                "unreadable": 0, "statements": 2, "accepted": 1, "refused": 1})
        );
        // The first line names its type first, for grep.
        assert!(stdout(&out).starts_with("{\"type\":\"statement\""));
    }

    #[test]
    fn stdin_is_read_when_no_file_is_given_and_for_dash() {
        let home = test_support::tempdir();
        for args in [
            &["--no-config", "check", "--engine", "sqlite"][..],
            &["--no-config", "check", "--engine", "sqlite", "-"],
        ] {
            let out = run_in(
                home.path(),
                args,
                Some(b"SELECT 1;\r\nATTACH 'x.db' AS y;\r\n"),
            );
            assert_eq!(out.status.code(), Some(1), "{out:?}");
            let text = stdout(&out);
            assert!(text.starts_with("-: statement 1: accepted\n"), "{text}");
            assert!(
                text.contains("-: statement 2: refused: ATTACH is not a read-only query"),
                "{text}"
            );
        }
    }

    #[test]
    fn gbk_utf16_and_utf8_bom_files_are_decoded() {
        let home = test_support::tempdir();
        let sql = "SELECT '样本' AS 名称 FROM 样本表;\r\nSELECT 2;\r\n";
        let mut utf16 = vec![0xFF, 0xFE];
        for u in sql.encode_utf16() {
            utf16.extend_from_slice(&u.to_le_bytes());
        }
        let mut utf8_bom = b"\xEF\xBB\xBF".to_vec();
        utf8_bom.extend_from_slice(sql.as_bytes());
        let files = [
            ("gbk.sql", encoding_rs_gbk(sql)),
            ("utf16.sql", utf16),
            ("bom.sql", utf8_bom),
        ];
        let mut args = vec!["--no-config", "--json", "check", "--engine", "postgres"];
        let paths: Vec<String> = files
            .iter()
            .map(|(name, bytes)| {
                let p = home.path().join(name);
                std::fs::write(&p, bytes).unwrap();
                p.to_str().unwrap().to_owned()
            })
            .collect();
        args.extend(paths.iter().map(String::as_str));
        let out = run_in(home.path(), &args, None);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let recs = records(&out);
        assert_eq!(recs.len(), 7, "{recs:?}");
        for (i, path) in paths.iter().enumerate() {
            let first = &recs[2 * i];
            assert_eq!(first["file"], path.as_str());
            assert_eq!(first["sql"], "SELECT '样本' AS 名称 FROM 样本表", "{path}");
            assert_eq!(first["verdict"], "accepted");
            assert_eq!(recs[2 * i + 1]["sql"], "SELECT 2");
        }
        assert_eq!(recs[6]["statements"], 6);
    }

    /// GBK bytes of `text` (the test does not link encoding_rs; GBK of these few
    /// characters is fixed).
    fn encoding_rs_gbk(text: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for c in text.chars() {
            match c {
                '样' => out.extend_from_slice(&[0xD1, 0xF9]),
                '本' => out.extend_from_slice(&[0xB1, 0xBE]),
                '名' => out.extend_from_slice(&[0xC3, 0xFB]),
                '称' => out.extend_from_slice(&[0xB3, 0xC6]),
                '表' => out.extend_from_slice(&[0xB1, 0xED]),
                c if c.is_ascii() => out.push(c as u8),
                c => panic!("no GBK bytes for {c}"),
            }
        }
        out
    }

    #[test]
    fn usage_errors_exit_2() {
        let home = test_support::tempdir();
        for args in [
            &["--no-config", "check"][..],
            &["--no-config", "check", "--engine", "db2"],
            &[
                "--no-config",
                "check",
                "--engine",
                "postgres",
                "--database",
                "x",
            ],
        ] {
            let out = run_in(home.path(), args, Some(b"SELECT 1"));
            assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
            assert!(out.stdout.is_empty(), "{args:?}");
        }
    }

    #[test]
    fn an_unreadable_file_is_reported_the_others_checked_and_exit_is_2() {
        let home = test_support::tempdir();
        let good = home.path().join("good.sql");
        std::fs::write(&good, "SELECT 1").unwrap();
        let binary = home.path().join("binary.sql");
        std::fs::write(&binary, b"\x81\xFF\xFF\x00").unwrap();
        let missing = home.path().join("missing.sql");
        let out = run_in(
            home.path(),
            &[
                "--no-config",
                "check",
                "--engine",
                "postgres",
                missing.to_str().unwrap(),
                binary.to_str().unwrap(),
                good.to_str().unwrap(),
            ],
            None,
        );
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = stderr(&out);
        assert!(err.contains("missing.sql"), "{err}");
        assert!(
            err.contains("binary.sql") && err.contains("not text"),
            "{err}"
        );
        assert!(err.contains("2 files could not be read"), "{err}");
        let text = stdout(&out);
        assert!(text.contains("good.sql: statement 1: accepted"), "{text}");
        assert!(
            text.ends_with("1 statement: 1 accepted, 0 refused, 2 files unreadable\n"),
            "{text}"
        );
    }

    const CONFIG: &str = "[databases.lims_ro]\nurl = \"mysql://reader@127.0.0.1:3306/lims\"\n\
                          [mail_query.databases.lims]\ndatabase = \"lims_ro\"\n\
                          aliases = [\"LIMS-prod\"]\nallow = [\"@example.org\"]\n";

    #[test]
    fn database_name_or_alias_picks_the_engine_from_the_config() {
        let home = test_support::tempdir();
        let cfg = test_support::write_config(home.path(), CONFIG);
        // `#` starts a comment on MariaDB, so the `;` after it hides nothing.
        let sql = b"SELECT 1 # ; DROP TABLE t\n";
        for name in ["lims", "lims-PROD"] {
            let out = run_in(
                home.path(),
                &[
                    "--config",
                    cfg.to_str().unwrap(),
                    "check",
                    "--database",
                    name,
                ],
                Some(sql),
            );
            assert_eq!(out.status.code(), Some(0), "{name}: {out:?}");
        }
        // The same text read as PostgreSQL is refused: the engine really came from the URL.
        let out = run_in(
            home.path(),
            &["--no-config", "check", "--engine", "postgres"],
            Some(sql),
        );
        assert_eq!(out.status.code(), Some(1), "{out:?}");

        let out = run_in(
            home.path(),
            &[
                "--config",
                cfg.to_str().unwrap(),
                "check",
                "--database",
                "erp",
            ],
            Some(sql),
        );
        assert_eq!(out.status.code(), Some(78), "{out:?}");
        let err = stderr(&out);
        assert!(
            err.contains("mail_query.databases.erp") && err.contains("lims"),
            "{err}"
        );
    }

    #[test]
    fn unknown_mail_query_key_exits_78_naming_it() {
        let home = test_support::tempdir();
        for (extra, key) in [
            ("[mail_query]\nmax_worker = 2\n", "mail_query.max_worker"),
            (
                "[mail_query.databases.erp]\ndatabase = \"lims_ro\"\npassword = \"x\"\n",
                "mail_query.databases.erp.password",
            ),
        ] {
            let cfg = test_support::write_config(home.path(), &format!("{CONFIG}{extra}"));
            for args in [&["check", "--engine", "postgres"][..], &["--once"]] {
                let mut argv = vec!["--config", cfg.to_str().unwrap()];
                argv.extend_from_slice(args);
                let out = run_in(home.path(), &argv, Some(b"SELECT 1"));
                assert_eq!(out.status.code(), Some(78), "{argv:?}: {out:?}");
                let err = stderr(&out);
                assert!(err.contains(key) && err.contains("config.toml"), "{err}");
                assert!(out.stdout.is_empty());
            }
        }
        let cfg = test_support::write_config(home.path(), "[mail_query]\nmax_workers = 0\n");
        let out = run_in(
            home.path(),
            &[
                "--config",
                cfg.to_str().unwrap(),
                "check",
                "--engine",
                "sqlite",
            ],
            Some(b"SELECT 1"),
        );
        assert_eq!(out.status.code(), Some(78), "{out:?}");
        assert!(stderr(&out).contains("mail_query.max_workers"));
    }
}
