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

/// An error type that knows its exit class.
///
/// Every error type that should map to something other than "failed" (1) implements
/// this trait and registers itself with [`exit_class!`](crate::exit_class), in the crate
/// that defines it. [`classify`] then finds it anywhere in an `anyhow` chain, so an error
/// keeps its type and its source chain all the way to the exit path: no crate flattens
/// errors into strings to carry a status.
///
/// ```
/// use labrelay::exit::{Exit, ExitClass};
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("no such sample sheet column {0}")]
/// struct SheetError(String);
///
/// impl ExitClass for SheetError {
///     fn exit_class(&self) -> Exit {
///         Exit::Config
///     }
/// }
/// labrelay::exit_class!(SheetError);
///
/// let err = anyhow::Error::new(SheetError("lane".into())).context("reading sheet.csv");
/// assert_eq!(labrelay::exit::classify(&err), Exit::Config);
/// ```
pub trait ExitClass: std::error::Error + Send + Sync + 'static {
    /// The exit status this error stands for.
    fn exit_class(&self) -> Exit;

    /// Whether trying the same operation again may succeed. The retry layer
    /// ([`crate::retry`]) retries exactly these; by default the temporary class (75).
    fn is_transient(&self) -> bool {
        self.exit_class() == Exit::TempFail
    }
}

/// One registered error type: a probe that recognises it in an error chain.
#[doc(hidden)]
#[derive(Clone, Copy)]
pub struct Classifier {
    probe: fn(&(dyn std::error::Error + 'static)) -> Option<(Exit, bool)>,
}

impl Classifier {
    /// The classifier of `E` (used by [`exit_class!`](crate::exit_class)).
    pub const fn of<E: ExitClass>() -> Self {
        Classifier { probe: probe::<E> }
    }
}

fn probe<E: ExitClass>(e: &(dyn std::error::Error + 'static)) -> Option<(Exit, bool)> {
    e.downcast_ref::<E>()
        .map(|e| (e.exit_class(), e.is_transient()))
}

inventory::collect!(Classifier);

#[doc(hidden)]
pub use inventory as __inventory;

/// Register error types that implement [`ExitClass`], so that [`classify`] and the retry
/// layer recognise them in any error chain. Write it once per type, next to the type.
#[macro_export]
macro_rules! exit_class {
    ($($ty:ty),+ $(,)?) => {
        $(
            $crate::exit::__inventory::submit! {
                $crate::exit::Classifier::of::<$ty>()
            }
        )+
    };
}

/// A usage error (exit 2): bad arguments or input the user must correct.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl ExitClass for UsageError {
    fn exit_class(&self) -> Exit {
        Exit::Usage
    }
}
crate::exit_class!(UsageError);

/// Shorthand for a usage error (exit 2).
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(message.into()))
}

/// Whether an error chain ends in a closed stdout (`| head`), which is not a failure.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// What the first error in a chain that knows its class says: exit status and whether
/// trying again may help. `None` when no error in the chain is classified.
fn class_of(
    chain: &mut dyn Iterator<Item = &(dyn std::error::Error + 'static)>,
) -> Option<(Exit, bool)> {
    for cause in chain {
        for c in inventory::iter::<Classifier> {
            if let Some(found) = (c.probe)(cause) {
                return Some(found);
            }
        }
        if let Some(e) = cause.downcast_ref::<clap::Error>() {
            let exit = if e.use_stderr() {
                Exit::Usage
            } else {
                Exit::Ok
            };
            return Some((exit, false));
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && is_temporary_io(io.kind())
        {
            return Some((Exit::TempFail, true));
        }
    }
    None
}

/// Map an error chain to an exit status: the first error in the chain that knows its
/// class ([`ExitClass`], a clap error, a temporary I/O error) decides; anything unknown
/// is a plain failure (1).
pub fn classify(err: &anyhow::Error) -> Exit {
    class_of(&mut err.chain()).map_or(Exit::Failed, |(exit, _)| exit)
}

/// [`classify`] for any error value (not only `anyhow`), walking its `source()` chain.
pub fn classify_error(err: &(dyn std::error::Error + 'static)) -> Exit {
    class_of(&mut std::iter::successors(Some(err), |e| e.source()))
        .map_or(Exit::Failed, |(exit, _)| exit)
}

/// Whether trying again may help: the first classified error in the chain says so
/// ([`ExitClass::is_transient`]); unknown errors are not retried.
pub fn is_transient(err: &anyhow::Error) -> bool {
    class_of(&mut err.chain()).is_some_and(|(_, transient)| transient)
}

/// [`is_transient`] for any error value.
pub fn is_transient_error(err: &(dyn std::error::Error + 'static)) -> bool {
    class_of(&mut std::iter::successors(Some(err), |e| e.source())).is_some_and(|(_, t)| t)
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

    /// An error type of "another crate": it joins the exit path by implementing the
    /// trait and registering, with no change to this module.
    #[derive(Debug, thiserror::Error)]
    #[error("sheet column {0} is missing")]
    struct SheetError(&'static str, #[source] std::io::Error);

    impl ExitClass for SheetError {
        fn exit_class(&self) -> Exit {
            Exit::Config
        }
    }
    crate::exit_class!(SheetError);

    #[derive(Debug, thiserror::Error)]
    #[error("not registered")]
    struct Unregistered;

    #[test]
    fn registered_types_are_classified_anywhere_in_the_chain_and_keep_their_source() {
        let err = anyhow::Error::new(SheetError("lane", std::io::Error::other("short read")))
            .context("reading sheet.csv")
            .context("delivering A1");
        assert_eq!(classify(&err), Exit::Config);
        // The chain is intact: the typed error and its source are still there.
        assert!(err.downcast_ref::<SheetError>().is_some());
        assert_eq!(
            format!("{err:#}"),
            "delivering A1: reading sheet.csv: sheet column lane is missing: short read"
        );
        assert!(!is_transient(&err));
        assert_eq!(classify(&anyhow::Error::new(Unregistered)), Exit::Failed);
        // Library errors are registered the same way.
        let cfg = anyhow::Error::new(crate::config::ConfigError::Missing("[smtp]".into()));
        assert_eq!(classify(&cfg), Exit::Config);
        // And plain error values (not anyhow) are classified through source().
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(classify_error(&io), Exit::TempFail);
        assert!(is_transient_error(&io));
    }

    #[test]
    fn broken_pipe_is_recognised_through_context() {
        let e = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("writing stdout");
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::anyhow!("x")));
    }
}
