//! `sync-publish` binary: see the library for arguments and behaviour.

fn main() -> std::process::ExitCode {
    labrelay::cli::run_main(sync_publish::run)
}
