//! Command-line contract of `code-submit`: help text, usage and configuration errors.
//! Submitting and waiting are tested end to end with `job-worker` (its tests/cli.rs).

const BIN: &str = env!("CARGO_BIN_EXE_code-submit");
const VALID: &[&str] = &["task", "noop"];

#[test]
fn help_is_stable() {
    insta::assert_snapshot!(test_support::cli::help(BIN));
}

#[test]
fn usage_and_config_errors_have_their_exit_codes() {
    test_support::cli::assert_common_contract(BIN, VALID);
}
