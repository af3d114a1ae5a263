//! Command-line contract of `sync-publish`, and the sync itself between real databases
//! over real brokers (`sites`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod harness;
mod sites;

const BIN: &str = env!("CARGO_BIN_EXE_sync-publish");
const VALID: &[&str] = &["status", "--site", "s1"];

#[test]
fn help_is_stable() {
    insta::assert_snapshot!(test_support::cli::help(BIN));
}

#[test]
fn usage_and_config_errors_have_their_exit_codes() {
    test_support::cli::assert_common_contract(BIN, VALID);
}

#[test]
fn no_sync_section_or_unknown_site_exits_78_naming_it() {
    let home = test_support::tempdir();
    let out = test_support::cli::run(BIN, home.path(), &["--no-config", "status", "--site", "x"]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("[sync]"));

    let cfg = test_support::write_config(
        home.path(),
        "[databases.a]\nurl = \"sqlite:///tmp/x.db\"\n[sync.sites.a]\ndatabase = \"a\"\nkey = \"0123456789abcdef\"\n\
         [sync.objects.user]\ntable = \"users\"\nfields = { name = \"name\" }\n",
    );
    let cfg = cfg.to_str().unwrap();
    let out = test_support::cli::run(
        BIN,
        home.path(),
        &["--config", cfg, "status", "--site", "nope"],
    );
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope"), "{err}");
    // allow_delete = false needs an active field.
    let out = test_support::cli::run(
        BIN,
        home.path(),
        &["--config", cfg, "install", "--site", "a", "--print"],
    );
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("sync.objects.user.active"));
}

#[test]
fn password_columns_are_refused_unless_a_rule_opts_in() {
    let home = test_support::tempdir();
    let base = "[databases.a]\nurl = \"sqlite:///tmp/x.db\"\n[sync.sites.a]\ndatabase = \"a\"\nkey = \"0123456789abcdef\"\n\
                [sync.objects.user]\ntable = \"users\"\nallow_delete = true\n";
    let cfg = test_support::write_config(
        home.path(),
        &format!("{base}fields = {{ name = \"name\", pw = \"password_hash\" }}\n"),
    );
    let out = test_support::cli::run(
        BIN,
        home.path(),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "install",
            "--site",
            "a",
            "--print",
        ],
    );
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("password_hash"));

    let cfg = test_support::write_config(
        home.path(),
        &format!(
            "{base}fields = {{ name = \"name\", pw = \"password_hash\" }}\nexclude = []\nallow_secret_columns = true\n"
        ),
    );
    let out = test_support::cli::run(
        BIN,
        home.path(),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "install",
            "--site",
            "a",
            "--print",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let sql = String::from_utf8_lossy(&out.stdout);
    assert!(
        sql.contains("CREATE TRIGGER labrelay_sync_user_ins AFTER INSERT ON \"users\""),
        "{sql}"
    );
    assert!(sql.contains("labrelay_sync_outbox"), "{sql}");
}
