//! Run one attempt of a registered task: its argv (never a shell), a clean environment
//! with only the allowed variables, its own process group (so a timeout or a cancel
//! kills everything it started), stdout and stderr captured up to a cap.

use std::fmt::Write as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::config::{NOOP, Task};
use crate::store::{Job, Outcome};

/// Why a running attempt must stop early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Keep running.
    No,
    /// The job was cancelled or its lease lost: kill it, its result does not count.
    Lost,
    /// The worker is shutting down after its grace period: kill it, give the job back.
    Shutdown,
}

/// What became of an attempt.
// One per attempt, moved once: boxing the outcome would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Ran {
    /// It ended (well or not) by itself or by its timeout.
    Done(Outcome),
    /// It was stopped; its result does not count.
    Stopped(Stop),
}

/// Where the whole output of a stream longer than the row's cap goes: a temporary file
/// in `dir` (at most `max` bytes), uploaded to `storage` after the attempt.
#[derive(Debug, Clone)]
pub struct Spill {
    /// `[jobs] output_storage`.
    pub storage: labrelay::storage::AnyStorage,
    /// Temporary files (under the data directory).
    pub dir: std::path::PathBuf,
    /// Bytes of one stream kept at most.
    pub max: u64,
}

/// One stream, read to its end.
#[derive(Default)]
struct Captured {
    /// The first `cap` bytes.
    kept: Vec<u8>,
    /// Bytes beyond them.
    dropped: u64,
    /// The whole stream (up to the spill's `max`), when it was longer than `cap`.
    file: Option<std::path::PathBuf>,
}

/// Read up to `cap` bytes, count the rest; with `spill`, the whole stream also goes to
/// the file `spill` once it is longer than `cap`.
async fn capture(
    mut r: impl AsyncRead + Unpin,
    cap: usize,
    spill: Option<(std::path::PathBuf, u64)>,
) -> Captured {
    let mut c = Captured::default();
    let mut file: Option<(tokio::fs::File, u64)> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(c.kept.len());
                if n > room
                    && file.is_none()
                    && let Some((path, _)) = &spill
                {
                    match tokio::fs::File::create(path).await {
                        Ok(mut f) => {
                            let ok = f.write_all(&c.kept).await.is_ok();
                            if ok {
                                file = Some((f, c.kept.len() as u64));
                                c.file = Some(path.clone());
                            }
                        }
                        Err(e) => tracing::warn!("keeping a long output whole failed: {e}"),
                    }
                }
                if let (Some((f, written)), Some((_, max))) = (file.as_mut(), &spill) {
                    let take = usize::try_from(max.saturating_sub(*written))
                        .unwrap_or(usize::MAX)
                        .min(n);
                    if take > 0 && f.write_all(&buf[..take]).await.is_ok() {
                        *written += take as u64;
                    }
                }
                c.kept.extend_from_slice(&buf[..n.min(room)]);
                c.dropped += (n - n.min(room)) as u64;
            }
        }
    }
    if let Some((mut f, _)) = file {
        let _ = f.flush().await;
    }
    c
}

fn kill_group(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        // The group may be gone already.
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

fn text_of(bytes: Vec<u8>, dropped: u64) -> String {
    let mut s = String::from_utf8(bytes)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    if dropped > 0 {
        let _ = write!(
            s,
            "\n[labrelay: {dropped} more bytes not kept here (with [jobs] output_storage: `job-worker result ID --full`)]\n"
        );
    }
    s
}

/// The last non-empty line of stdout, when it is a JSON object or array.
pub fn last_line_json(stdout: &str) -> Option<serde_json::Value> {
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty())?;
    let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    (v.is_object() || v.is_array()).then_some(v)
}

/// Run `job` of `task`, stopping early when `stop` says so.
pub async fn run(
    task: &Task,
    job: &Job,
    cap: usize,
    spill: Option<&Spill>,
    code: Option<&crate::code::CodeRunner>,
    mut stop: watch::Receiver<Stop>,
) -> Ran {
    if task.name == crate::code::CODE {
        return match code {
            Some(c) => c.run(job, stop).await,
            None => Ran::Done(Outcome {
                error: Some("this worker does not run code jobs (no sandbox)".into()),
                ..Outcome::default()
            }),
        };
    }
    let started = Instant::now();
    let elapsed =
        |started: Instant| i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
    if task.name == NOOP {
        return Ran::Done(Outcome {
            exit_code: Some(0),
            duration_ms: elapsed(started),
            ..Outcome::default()
        });
    }
    let args = job.args.as_object().cloned().unwrap_or_default();
    let command = match task.argv(&args) {
        Ok(a) => a,
        Err(e) => {
            return Ran::Done(Outcome {
                error: Some(e),
                permanent: true,
                ..Outcome::default()
            });
        }
    };
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..])
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .env("LANG", "C.UTF-8")
        .env("LABRELAY_JOB_ID", job.id.to_string())
        .env("LABRELAY_JOB_ATTEMPT", job.attempt.to_string())
        .env("LABRELAY_JOB_TASK", &task.name)
        .stdin(if task.args_on_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for name in &task.env {
        if let Some(v) = std::env::var_os(name) {
            cmd.env(name, v);
        }
    }
    if let Some(dir) = &task.workdir {
        cmd.current_dir(dir);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            // A missing program or working directory does not get better by retrying
            // on this worker, but another worker may have it: retried like a failure.
            return Ran::Done(Outcome {
                error: Some(format!("could not start `{}`: {e}", command[0])),
                duration_ms: elapsed(started),
                ..Outcome::default()
            });
        }
    };
    let pid = child.id().unwrap_or(0);
    if let Some(mut stdin) = child.stdin.take() {
        let body = serde_json::Value::Object(args).to_string();
        tokio::spawn(async move {
            let _ = stdin.write_all(body.as_bytes()).await;
            let _ = stdin.shutdown().await;
        });
    }
    let spill_to = |stream: &str| {
        spill.map(|s| {
            (
                s.dir
                    .join(format!("job-{}-{}-{stream}", job.id, job.attempt)),
                s.max,
            )
        })
    };
    let out = tokio::spawn(capture(
        child.stdout.take().expect("piped stdout"),
        cap,
        spill_to("stdout"),
    ));
    let err = tokio::spawn(capture(
        child.stderr.take().expect("piped stderr"),
        cap,
        spill_to("stderr"),
    ));
    let timeout = Duration::from_secs(task.timeout_secs);
    let mut timed_out = false;
    let mut stopped = Stop::No;
    let status = tokio::select! {
        s = child.wait() => s,
        () = tokio::time::sleep(timeout) => {
            timed_out = true;
            terminate(pid, &mut child).await
        }
        why = async {
            loop {
                if stop.changed().await.is_err() {
                    // The sender is gone: nobody can stop us any more.
                    std::future::pending::<()>().await;
                }
                let v = *stop.borrow();
                if v != Stop::No {
                    return v;
                }
            }
        } => {
            stopped = why;
            terminate(pid, &mut child).await
        }
    };
    // Whatever the leader did, nothing of the group may outlive the attempt.
    kill_group(pid, rustix::process::Signal::KILL);
    let out = out.await.unwrap_or_default();
    let err = err.await.unwrap_or_default();
    if stopped != Stop::No {
        for f in [&out.file, &err.file].into_iter().flatten() {
            let _ = tokio::fs::remove_file(f).await;
        }
        return Ran::Stopped(stopped);
    }
    let stdout = text_of(out.kept, out.dropped);
    let stderr = text_of(err.kept, err.dropped);
    let mut outcome = Outcome {
        result: last_line_json(&stdout),
        stdout,
        stderr,
        stdout_file: out.file,
        stderr_file: err.file,
        duration_ms: elapsed(started),
        ..Outcome::default()
    };
    match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt as _;
            outcome.exit_code = s.code();
            outcome.signal = s.signal();
            if timed_out {
                outcome.error = Some(format!("timed out after {} s", task.timeout_secs));
            } else if let Some(sig) = s.signal() {
                outcome.error = Some(format!("killed by signal {sig}"));
            } else if s.code() != Some(0) {
                outcome.error = Some(format!("exited with {}", s.code().unwrap_or(-1)));
            }
        }
        Err(e) => outcome.error = Some(format!("waiting for the process failed: {e}")),
    }
    Ran::Done(outcome)
}

/// SIGTERM to the group, SIGKILL 5 s later if the leader is still there.
async fn terminate(
    pid: u32,
    child: &mut tokio::process::Child,
) -> std::io::Result<std::process::ExitStatus> {
    kill_group(pid, rustix::process::Signal::TERM);
    if let Ok(s) = tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        s
    } else {
        kill_group(pid, rustix::process::Signal::KILL);
        child.wait().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_is_the_last_json_line() {
        assert_eq!(
            last_line_json("log\n{\"n\": 3}\n\n"),
            Some(serde_json::json!({"n": 3}))
        );
        assert_eq!(last_line_json("{\"n\": 3}\ndone\n"), None);
        assert_eq!(last_line_json("42\n"), None);
    }
}
