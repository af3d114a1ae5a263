//! The one retry layer of labrelay: how often, how long apart and for how long an
//! operation that failed *temporarily* is tried again.
//!
//! Every client (storage, mail, queue, ssh) and every tool retries through this module,
//! with one [`RetryPolicy`] (from `[retry]` in the configuration):
//!
//! - attempts: at most [`RetryPolicy::attempts`] tries in all (the first one included);
//! - backoff: exponential from [`RetryPolicy::base_delay`], capped at
//!   [`RetryPolicy::max_delay`], with full jitter (each pause is uniform in
//!   `0..=cap`), so that many workers that failed together do not retry together;
//! - deadline: no new attempt starts once [`RetryPolicy::deadline`] has passed since
//!   the first one, and no pause runs past it;
//! - which errors: only those whose class says so ([`crate::exit::ExitClass::is_transient`],
//!   [`crate::exit::is_transient`]): unreachable servers, timeouts, 4xx SMTP replies,
//!   HTTP 5xx/429. A refusal or a bad configuration fails at once.
//!
//! **Exactly one layer retries.** When the retries of an operation are used up, the error
//! comes back wrapped in [`Exhausted`], which keeps its exit class (75) and its source
//! chain but is no longer transient: a caller further up that also retries (a file
//! upload around its part uploads) does not multiply the attempts. A part upload is thus
//! tried at most `attempts` times, not `attempts` to the power of the layers.
//!
//! This module does not decide *what* is safe to repeat: callers retry only idempotent
//! operations (a PUT of the same bytes, a connection, a send whose Message-ID is fixed).

use std::future::Future;
use std::time::{Duration, Instant};

use rand::Rng;
use serde::Deserialize;

use crate::exit::{Exit, ExitClass};

/// How an operation that failed temporarily is retried. `[retry]` in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Tries in all, the first included (1 = never retry). Default 4.
    pub attempts: u32,
    /// First pause before a retry, in milliseconds; doubled for each further retry.
    /// Default 200 ms.
    #[serde(rename = "base_delay_ms", with = "millis")]
    pub base_delay: Duration,
    /// Longest pause between two attempts, in milliseconds. Default 10 s.
    #[serde(rename = "max_delay_ms", with = "millis")]
    pub max_delay: Duration,
    /// No attempt starts later than this after the first one, in seconds. Default 300 s.
    #[serde(rename = "deadline_secs", with = "secs")]
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
            deadline: Duration::from_mins(5),
        }
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

impl RetryPolicy {
    /// A policy that never retries (one attempt).
    pub fn none() -> Self {
        RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// Check the values (called when the configuration loads): at least one attempt,
    /// a base delay not above the maximum.
    pub fn validate(&self) -> Result<(), String> {
        if self.attempts == 0 {
            return Err("attempts must be at least 1".into());
        }
        if self.base_delay > self.max_delay {
            return Err(format!(
                "base_delay_ms ({}) is larger than max_delay_ms ({})",
                self.base_delay.as_millis(),
                self.max_delay.as_millis()
            ));
        }
        Ok(())
    }

    /// The cap of the pause after the `failed`-th failed attempt (1-based):
    /// `base * 2^(failed-1)`, at most `max_delay`. The pause itself is uniform in
    /// `0..=cap` (full jitter).
    pub fn delay_cap(&self, failed: u32) -> Duration {
        delay_cap(self.base_delay, self.max_delay, failed)
    }

    /// The jittered pause after the `failed`-th failed attempt.
    pub fn delay(&self, failed: u32) -> Duration {
        jitter(self.delay_cap(failed))
    }

    /// After the `failed`-th attempt (the first began at `started`) ended in `error`: the
    /// pause before the next one (logged), or the error to give back.
    fn after_failure<E: Transient + std::fmt::Display>(
        &self,
        what: impl Fn() -> String,
        failed: u32,
        error: E,
        started: Instant,
    ) -> Result<Duration, Failed<E>> {
        let pause = (error.is_transient() && failed < self.attempts)
            .then(|| self.delay(failed))
            .filter(|pause| started.elapsed() + *pause < self.deadline);
        let Some(pause) = pause else {
            return Err(Failed {
                error,
                attempts: failed,
            });
        };
        tracing::info!(
            attempt = failed,
            of = self.attempts,
            "{}: {error}; trying again in {} ms",
            what(),
            pause.as_millis()
        );
        Ok(pause)
    }
}

/// `base * 2^(failed-1)`, at most `max`.
fn delay_cap(base: Duration, max: Duration, failed: u32) -> Duration {
    let factor = 1u32
        .checked_shl(failed.saturating_sub(1))
        .unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(max).min(max)
}

/// A pause uniform in `0..=cap` (full jitter).
fn jitter(cap: Duration) -> Duration {
    let ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

static POLICY: std::sync::OnceLock<RetryPolicy> = std::sync::OnceLock::new();

/// Set the process's policy (from `[retry]`; [`crate::cli::run_main`] does this once,
/// after loading the configuration). Later calls are ignored.
pub fn set_policy(policy: RetryPolicy) {
    let _ = POLICY.set(policy);
}

/// The process's policy: the configured one, or the default.
pub fn policy() -> &'static RetryPolicy {
    POLICY.get_or_init(RetryPolicy::default)
}

/// The pauses of a retry loop that is not one operation to repeat (a reconnect inside a
/// publish loop, a subscription that waits for the broker to come back): the policy's
/// exponential backoff with full jitter, until a deadline rather than a number of
/// attempts.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    deadline: Instant,
    failed: u32,
}

impl Backoff {
    /// Pauses of the process's policy until `deadline`.
    pub fn until(deadline: Instant) -> Backoff {
        let p = policy();
        Backoff {
            base: p.base_delay,
            max: p.max_delay,
            deadline,
            failed: 0,
        }
    }

    /// Cap each pause at `max` as well (a reconnect should notice a server that is back
    /// within seconds).
    #[must_use]
    pub fn max_pause(mut self, max: Duration) -> Backoff {
        self.max = self.max.min(max);
        self.base = self.base.min(self.max);
        self
    }

    /// The pause before the next try, or `None` when it would end past the deadline.
    pub fn pause(&mut self) -> Option<Duration> {
        self.failed += 1;
        let pause = jitter(delay_cap(self.base, self.max, self.failed));
        (Instant::now() + pause <= self.deadline).then_some(pause)
    }

    /// Tries that failed so far.
    pub fn failures(&self) -> u32 {
        self.failed
    }
}

/// Errors the retry layer can judge: transient or not.
pub trait Transient {
    /// Whether trying again may help.
    fn is_transient(&self) -> bool;
}

impl Transient for anyhow::Error {
    fn is_transient(&self) -> bool {
        crate::exit::is_transient(self)
    }
}

impl<E: ExitClass> Transient for E {
    fn is_transient(&self) -> bool {
        ExitClass::is_transient(self)
    }
}

/// The error of an operation whose retries are used up (or whose deadline passed).
///
/// It keeps the last error as its source and its exit class (75 for a temporary
/// failure), but is not transient itself, so no outer layer retries it again.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed {attempts} times; giving up")]
pub struct Exhausted {
    /// The operation, for people ("uploading part 3 of data/a.bam").
    pub what: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// The last error.
    #[source]
    pub source: anyhow::Error,
}

impl ExitClass for Exhausted {
    fn exit_class(&self) -> Exit {
        crate::exit::classify(&self.source)
    }

    fn is_transient(&self) -> bool {
        false
    }
}
crate::exit_class!(Exhausted);

/// The result of a retried operation that succeeded: its value and how many attempts it
/// took (1 = the first one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempted<T> {
    /// The operation's value.
    pub value: T,
    /// Attempts made, the successful one included.
    pub attempts: u32,
}

/// Why a retried operation failed: the error, and the attempts made.
#[derive(Debug)]
pub struct Failed<E> {
    /// The last error (not transient, or the retries were used up).
    pub error: E,
    /// Attempts made.
    pub attempts: u32,
}

impl<E> Failed<E> {
    /// Whether the operation was retried (more than one attempt): then the error was
    /// transient and the retries ran out, and no outer layer should retry it again.
    pub fn retried(&self) -> bool {
        self.attempts > 1
    }
}

/// A typed error that can say "the retries were used up" itself (a `GaveUp` variant
/// holding the last error, with its class but not transient).
pub trait GiveUp: Sized {
    /// Wrap `last`, the error of the last of `attempts` attempts.
    fn gave_up(attempts: u32, last: Self) -> Self;
}

impl<E: GiveUp> Failed<E> {
    /// The error for typed callers: as it is after a single attempt,
    /// [`GiveUp::gave_up`] when it was retried.
    pub fn into_error(self) -> E {
        if self.retried() {
            E::gave_up(self.attempts, self.error)
        } else {
            self.error
        }
    }
}

impl<E: Into<anyhow::Error>> Failed<E> {
    /// The error for `anyhow` callers: as it is after a single attempt, or wrapped in
    /// [`Exhausted`] (not transient any more) when it was retried.
    pub fn into_anyhow(self, what: impl FnOnce() -> String) -> anyhow::Error {
        let attempts = self.attempts;
        let error: anyhow::Error = self.error.into();
        if attempts > 1 {
            anyhow::Error::new(Exhausted {
                what: what(),
                attempts,
                source: error,
            })
        } else {
            error
        }
    }
}

/// Run `op` (given the 1-based attempt number) until it succeeds, fails with an error
/// that is not transient, runs out of attempts or passes the deadline.
///
/// `what` names the operation for the log line of a retry; it is only called then.
pub async fn run<T, E, F, Fut>(
    policy: &RetryPolicy,
    what: impl Fn() -> String,
    mut op: F,
) -> Result<Attempted<T>, Failed<E>>
where
    E: Transient + std::fmt::Display,
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op(attempt).await {
            Ok(value) => {
                return Ok(Attempted {
                    value,
                    attempts: attempt,
                });
            }
            Err(error) => {
                let pause = policy.after_failure(&what, attempt, error, started)?;
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// [`run`] for blocking code (ssh2, IMAP): the pauses sleep the thread.
pub fn run_blocking<T, E, F>(
    policy: &RetryPolicy,
    what: impl Fn() -> String,
    mut op: F,
) -> Result<Attempted<T>, Failed<E>>
where
    E: Transient + std::fmt::Display,
    F: FnMut(u32) -> Result<T, E>,
{
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op(attempt) {
            Ok(value) => {
                return Ok(Attempted {
                    value,
                    attempts: attempt,
                });
            }
            Err(error) => {
                let pause = policy.after_failure(&what, attempt, error, started)?;
                std::thread::sleep(pause);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct TestError(Exit);

    impl ExitClass for TestError {
        fn exit_class(&self) -> Exit {
            self.0
        }
    }
    crate::exit_class!(TestError);

    fn quick(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
            deadline: Duration::from_secs(30),
        }
    }

    #[tokio::test]
    async fn transient_errors_are_retried_up_to_the_attempts() {
        let calls = AtomicU32::new(0);
        let r: Result<Attempted<()>, _> = run(
            &quick(4),
            || "op".into(),
            |_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(TestError(Exit::TempFail))
            },
        )
        .await;
        let failed = r.unwrap_err();
        assert_eq!(failed.attempts, 4);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn success_after_failures_reports_the_attempts() {
        let r = run(
            &quick(5),
            || "op".into(),
            |n| async move {
                if n < 3 {
                    Err(TestError(Exit::TempFail))
                } else {
                    Ok(n * 10)
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(r.value, 30);
        assert_eq!(r.attempts, 3);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        for exit in [Exit::Failed, Exit::Config, Exit::Usage] {
            let r: Result<Attempted<()>, _> = run(
                &quick(5),
                || "op".into(),
                |_| async move { Err(TestError(exit)) },
            )
            .await;
            assert_eq!(r.unwrap_err().attempts, 1, "{exit:?}");
        }
    }

    #[test]
    fn exhausted_errors_keep_their_class_but_are_not_retried_again() {
        // The inner layer retried 4 times and gave up.
        let inner: Result<Attempted<()>, _> = run_blocking(
            &quick(4),
            || "part 3".into(),
            |_| Err(TestError(Exit::TempFail)),
        );
        let err = inner.unwrap_err().into_anyhow(|| "uploading part 3".into());
        assert_eq!(crate::exit::classify(&err), Exit::TempFail);
        assert!(!crate::exit::is_transient(&err));
        assert!(err.to_string().contains("4 times"), "{err}");
        // An outer layer sees a non-transient error: one attempt, no multiplication.
        let mut outer_calls = 0;
        let mut err = Some(err);
        let outer: Result<Attempted<()>, Failed<anyhow::Error>> = run_blocking(
            &quick(3),
            || "file".into(),
            |_| {
                outer_calls += 1;
                Err(err.take().unwrap_or_else(|| anyhow::anyhow!("again")))
            },
        );
        assert_eq!(outer.unwrap_err().attempts, 1);
        assert_eq!(outer_calls, 1);
    }

    #[test]
    fn a_single_attempt_keeps_the_error_as_it_is() {
        let r: Result<Attempted<()>, _> =
            run_blocking(&quick(4), || "op".into(), |_| Err(TestError(Exit::Config)));
        let err = r.unwrap_err().into_anyhow(|| "op".into());
        assert!(err.downcast_ref::<TestError>().is_some());
    }

    #[test]
    fn the_deadline_stops_retries() {
        let policy = RetryPolicy {
            attempts: 1000,
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(20),
            deadline: Duration::from_millis(60),
        };
        let started = Instant::now();
        let r: Result<Attempted<()>, _> =
            run_blocking(&policy, || "op".into(), |_| Err(TestError(Exit::TempFail)));
        let attempts = r.unwrap_err().attempts;
        assert!(attempts < 1000, "{attempts}");
        // No pause runs past the deadline (generous bound: this is not a timing test).
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn delays_grow_exponentially_up_to_the_cap() {
        let p = RetryPolicy {
            attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            deadline: Duration::from_mins(1),
        };
        assert_eq!(p.delay_cap(1), Duration::from_millis(100));
        assert_eq!(p.delay_cap(2), Duration::from_millis(200));
        assert_eq!(p.delay_cap(4), Duration::from_millis(800));
        assert_eq!(p.delay_cap(5), Duration::from_secs(1));
        assert_eq!(p.delay_cap(40), Duration::from_secs(1));
        for n in 1..10 {
            assert!(p.delay(n) <= p.delay_cap(n));
        }
    }

    #[test]
    fn backoff_pauses_stop_at_the_deadline() {
        let mut b = Backoff::until(Instant::now() + Duration::from_millis(50))
            .max_pause(Duration::from_millis(30));
        let mut slept = Duration::ZERO;
        while let Some(p) = b.pause() {
            assert!(p <= Duration::from_millis(30));
            std::thread::sleep(p);
            slept += p;
            assert!(b.failures() < 10_000);
        }
        assert!(slept <= Duration::from_millis(50), "{slept:?}");
        let mut past = Backoff::until(Instant::now());
        // Only a zero pause fits a deadline that has passed.
        assert!(past.pause().is_none_or(|p| p.is_zero()));
    }

    #[test]
    fn policy_values_are_checked() {
        assert!(RetryPolicy::default().validate().is_ok());
        assert!(
            RetryPolicy {
                attempts: 0,
                ..RetryPolicy::default()
            }
            .validate()
            .is_err()
        );
        let p: RetryPolicy = toml::from_str("attempts = 2\nbase_delay_ms = 50").unwrap();
        assert_eq!(p.attempts, 2);
        assert_eq!(p.base_delay, Duration::from_millis(50));
        assert_eq!(p.max_delay, Duration::from_secs(10));
        assert!(toml::from_str::<RetryPolicy>("tries = 2").is_err());
    }
}
