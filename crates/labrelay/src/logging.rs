//! Diagnostics: tracing to stderr, configured once per process.
//!
//! `-q` shows errors only, the default shows warnings, `-v` info, `-vv` debug and `-vvv`
//! trace — for labrelay's own crates. Dependencies stay at `warn` (`info` with `-vvv`)
//! because drivers at debug level echo connection details. `LABRELAY_LOG` or `RUST_LOG`
//! replace the whole filter. Every line passes through [`crate::secret::scrub`], so a
//! secret value that some library formats by accident is still masked.

use std::io::{self, IsTerminal, Write};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::env;

/// Whether to colour stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// Colour when stderr is a terminal and `NO_COLOR` is unset.
    #[default]
    Auto,
    /// Always colour.
    Always,
    /// Never colour.
    Never,
}

impl ColorChoice {
    /// Resolve `auto` against the terminal and `NO_COLOR`.
    pub fn enabled(self) -> bool {
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => env::get(env::NO_COLOR).is_none() && io::stderr().is_terminal(),
        }
    }
}

/// Our crates, which get the verbosity the user asked for.
const OWN_CRATES: &[&str] = &[
    "labrelay",
    "delivery",
    "jobs",
    "sandbox",
    "delivery_upload",
    "upload_pure",
    "mail_query",
    "sync_publish",
    "code_submit",
    "job_worker",
];

/// The filter directive for a verbosity (-1 = quiet).
pub fn filter_for(verbosity: i8) -> String {
    let (own, deps) = match verbosity {
        i8::MIN..=-1 => ("error", "error"),
        0 => ("warn", "warn"),
        1 => ("info", "warn"),
        2 => ("debug", "warn"),
        _ => ("trace", "info"),
    };
    // lapin logs a returned (unroutable) message with its body at WARN; bodies may be
    // confidential and the publisher reports the failure itself.
    let mut f = format!("{deps},lapin::returned_messages=error");
    for c in OWN_CRATES {
        f.push(',');
        f.push_str(c);
        f.push('=');
        f.push_str(own);
    }
    f
}

/// Set up the global subscriber. Safe to call twice (the second call does nothing).
pub fn init(verbosity: i8, color: ColorChoice) {
    let filter = env::get(env::LABRELAY_LOG)
        .or_else(|| env::get(env::RUST_LOG))
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(filter_for(verbosity)));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(ScrubbingStderr)
        .with_ansi(color.enabled())
        .with_target(verbosity >= 2)
        .try_init();
}

/// A stderr writer that masks registered secrets in each formatted event.
#[derive(Debug, Clone, Copy)]
pub struct ScrubbingStderr;

/// Buffers one event, scrubs it and writes it to stderr on drop.
#[derive(Debug, Default)]
pub struct ScrubbingWriter(Vec<u8>);

impl Write for ScrubbingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ScrubbingWriter {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        let _ = io::stderr().write_all(crate::secret::scrub(&text).as_bytes());
    }
}

impl<'a> MakeWriter<'a> for ScrubbingStderr {
    type Writer = ScrubbingWriter;
    fn make_writer(&'a self) -> Self::Writer {
        ScrubbingWriter::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_stay_quiet_below_trace() {
        assert!(filter_for(2).starts_with("warn,"));
        assert!(filter_for(3).contains("lapin::returned_messages=error"));
        assert!(filter_for(2).contains("labrelay=debug"));
        assert!(filter_for(3).starts_with("info,"));
        assert!(filter_for(-1).contains("labrelay=error"));
        for v in [-1, 0, 1, 2, 3] {
            assert!(EnvFilter::try_new(filter_for(v)).is_ok());
        }
    }
}
