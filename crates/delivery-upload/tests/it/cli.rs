//! Command-line contract of `delivery-upload`: help text, usage and configuration errors.

use crate::common::{BIN, Home, stderr};

const VALID: &[&str] = &["--analysis-id", "X1"];

#[test]
fn help_is_stable() {
    insta::assert_snapshot!(test_support::cli::help(BIN));
}

#[test]
fn usage_and_config_errors_have_their_exit_codes() {
    test_support::cli::assert_common_contract(BIN, VALID);
}

#[test]
fn without_a_target_or_lookup_the_configuration_is_refused() {
    let home = test_support::tempdir();
    let mut args = vec!["--no-config"];
    args.extend_from_slice(VALID);
    let out = test_support::cli::run(BIN, home.path(), &args);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(
        stderr(&out).contains("no delivery target"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());

    let home = Home::new();
    std::fs::create_dir_all(home.path().join("out")).unwrap();
    home.config(&format!(
        "[storage.nas]\nurl = \"{}\"\n",
        home.path().join("out").display()
    ));
    let out = home.run(VALID);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(
        stderr(&out).contains("[delivery.lookup]"),
        "{}",
        stderr(&out)
    );

    home.config("[delivery.lookup]\nsql = \"SELECT 1\"\n");
    let out = home.run(VALID);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(
        stderr(&out).contains("delivery.lookup.database"),
        "{}",
        stderr(&out)
    );
}
