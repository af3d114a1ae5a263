//! `job-worker` binary: see the library for arguments and behaviour.

fn main() -> std::process::ExitCode {
    // First, while there is one thread: the sandbox's mounts stay in this process.
    sandbox::private_mounts();
    labrelay::cli::run_main(job_worker::run)
}
