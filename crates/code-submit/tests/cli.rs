//! Command-line contract of `code-submit`: help text, usage and configuration errors.

const BIN: &str = env!("CARGO_BIN_EXE_code-submit");
const VALID: &[&str] = &["--task", "t"];

#[test]
fn help_is_stable() {
    insta::assert_snapshot!(test_support::cli::help(BIN));
}

#[test]
fn usage_and_config_errors_have_their_exit_codes() {
    test_support::cli::assert_common_contract(BIN, VALID);
}

#[test]
fn unbuilt_command_says_so_with_exit_2() {
    test_support::cli::assert_not_implemented_yet(BIN, VALID);
}
