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

#[test]
fn demo_sync_converges_three_sqlite_sites_over_the_embedded_queue() {
    let dir = test_support::tempdir();
    let out = std::process::Command::new(test_support::workspace_root().join("scripts/demo-sync"))
        .arg(dir.path())
        .env("LABRELAY_DEMO_NO_BUILD", "1")
        .env("LABRELAY_SYNC_PUBLISH", BIN)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("Alice Chen | 0755-1234").count(), 3, "{text}");
    assert_eq!(text.matches("Bob | 0").count(), 2, "{text}");
    assert!(
        text.contains("shenzhen vs jinan: 0 difference(s)"),
        "{text}"
    );
    // The password hash stays at its site.
    assert_eq!(text.matches("stays-home").count(), 1, "{text}");
}

#[test]
fn the_example_configuration_is_valid_for_every_site() {
    let home = test_support::tempdir();
    let cfg = test_support::workspace_root().join("examples/sync/sites.toml");
    for (site, trigger) in [
        (
            "sdu",
            "EXECUTE FUNCTION labrelay_sync_capture('user', 'id', 'save')",
        ),
        (
            "wuhan",
            "CREATE TRIGGER labrelay_sync_user_ins AFTER INSERT ON `users`",
        ),
        (
            "college",
            "CREATE TRIGGER labrelay_sync_user_ins AFTER INSERT ON \"users\"",
        ),
    ] {
        let out = test_support::cli::run(
            BIN,
            home.path(),
            &[
                "--config",
                cfg.to_str().unwrap(),
                "install",
                "--site",
                site,
                "--print",
            ],
        );
        let sql = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{site}: {out:?}");
        assert!(sql.contains(trigger), "{site}: {sql}");
    }
}
