//! Exit codes shared by every labrelay tool, and the mapping from errors to them.
//!
//! The codes follow `sysexits.h` where one fits, so cron and shell scripts can tell
//! "try again later" (75) from "fix the configuration" (78). This module owns the
//! table; tools never pick a number themselves.

use std::fmt;

/// The exit status of a labrelay tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Exit {
    /// 0: everything succeeded.
    Ok,
    /// 1: the run finished, but some items (files, messages, jobs) failed.
    Failed,
    /// 2: bad command line or input the user must correct.
    Usage,
    /// 75 (`EX_TEMPFAIL`): a server was unreachable or busy; running again later may work.
    TempFail,
    /// 78 (`EX_CONFIG`): the configuration is invalid.
    Config,
}

impl Exit {
    /// The numeric process exit code.
    pub const fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Failed => 1,
            Exit::Usage => 2,
            Exit::TempFail => 75,
            Exit::Config => 78,
        }
    }

    /// The more severe of two statuses (used when a run collects several outcomes).
    #[must_use]
    pub fn worst(self, other: Exit) -> Exit {
        fn rank(e: Exit) -> u8 {
            match e {
                Exit::Ok => 0,
                Exit::Failed => 1,
                Exit::TempFail => 2,
                Exit::Usage => 3,
                Exit::Config => 4,
            }
        }
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code())
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e.code())
    }
}

/// The EXIT STATUS block appended to every tool's `--help`.
pub const EXIT_STATUS_HELP: &str = "\
EXIT STATUS:
  0   success
  1   finished, but some items failed (each is reported)
  2   usage error: bad arguments or input
  75  temporary failure: a server was unreachable or busy; retry later
  78  configuration error";

/// An error tagged with the exit status it should produce.
///
/// Library modules return their own error types, which [`classify`] knows; a tool that
/// needs a specific status for an error of its own wraps it with [`tagged`].
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Tagged {
    /// The status this error maps to.
    pub exit: Exit,
    message: String,
}

/// Build an error with a given exit status and message.
pub fn tagged(exit: Exit, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Tagged {
        exit,
        message: message.into(),
    })
}

/// Shorthand for a usage error (exit 2).
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    tagged(Exit::Usage, message)
}

/// Whether an error chain ends in a closed stdout (`| head`), which is not a failure.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Map an error chain to an exit status: the first error in the chain that knows its
/// class decides; anything unknown is a plain failure (1).
pub fn classify(err: &anyhow::Error) -> Exit {
    for cause in err.chain() {
        if let Some(t) = cause.downcast_ref::<Tagged>() {
            return t.exit;
        }
        if let Some(e) = cause.downcast_ref::<crate::config::ConfigError>() {
            return e.exit();
        }
        if let Some(e) = cause.downcast_ref::<crate::secret::SecretError>() {
            return e.exit();
        }
        if let Some(e) = cause.downcast_ref::<crate::db::DbError>() {
            return e.exit();
        }
        if let Some(e) = cause.downcast_ref::<crate::queue::QueueError>() {
            return e.exit();
        }
        if let Some(e) = cause.downcast_ref::<crate::storage::StorageError>() {
            return e.exit();
        }
        if let Some(e) = cause.downcast_ref::<crate::mail::MailError>() {
            return e.exit();
        }
        if let Some(e) = cause.downcast_ref::<crate::ssh::SshError>() {
            return e.exit();
        }
        if let Some(e) = cause.downcast_ref::<crate::lock::LockError>() {
            return e.exit();
        }
        if let Some(e) = cause.downcast_ref::<clap::Error>() {
            return if e.use_stderr() {
                Exit::Usage
            } else {
                Exit::Ok
            };
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && is_temporary_io(io.kind())
        {
            return Exit::TempFail;
        }
    }
    Exit::Failed
}

/// I/O error kinds that mean "the other side is not there right now".
pub fn is_temporary_io(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        kind,
        K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::NotConnected
            | K::TimedOut
            | K::HostUnreachable
            | K::NetworkUnreachable
            | K::NetworkDown
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_documented_table() {
        assert_eq!(Exit::Ok.code(), 0);
        assert_eq!(Exit::Failed.code(), 1);
        assert_eq!(Exit::Usage.code(), 2);
        assert_eq!(Exit::TempFail.code(), 75);
        assert_eq!(Exit::Config.code(), 78);
        for c in ["0 ", "1 ", "2 ", "75 ", "78 "] {
            assert!(EXIT_STATUS_HELP.contains(c), "{c} missing from help");
        }
    }

    #[test]
    fn worst_prefers_configuration_over_failure() {
        assert_eq!(Exit::Ok.worst(Exit::Failed), Exit::Failed);
        assert_eq!(Exit::Config.worst(Exit::Failed), Exit::Config);
        assert_eq!(Exit::TempFail.worst(Exit::Ok), Exit::TempFail);
    }

    #[test]
    fn classify_finds_tags_deep_in_the_chain() {
        let e = usage("bad --foo").context("parsing").context("running");
        assert_eq!(classify(&e), Exit::Usage);
        let io = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
            .context("connecting to 127.0.0.1:9");
        assert_eq!(classify(&io), Exit::TempFail);
        assert_eq!(classify(&anyhow::anyhow!("boom")), Exit::Failed);
    }

    #[test]
    fn broken_pipe_is_recognised_through_context() {
        let e = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("writing stdout");
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::anyhow!("x")));
    }
}
