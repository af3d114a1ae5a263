//! `job-worker` and `code-submit task` end to end, on the embedded SQLite state database
//! and on PostgreSQL: submit, run, result; retries; a worker killed with kill -9; cancel
//! of a running job; SIGTERM with a grace period; configuration errors.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_job-worker");
/// `code-submit`, built beside `job-worker` (a workspace test run builds both; with
/// `-p job-worker` alone, build it first: `cargo build -p code-submit`).
static SUBMIT: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| test_support::cli::sibling(BIN, "code-submit"));
const VALID: &[&str] = &["tasks"];

#[test]
fn help_is_stable() {
    insta::assert_snapshot!(test_support::cli::help(BIN));
}

#[test]
fn usage_and_config_errors_have_their_exit_codes() {
    test_support::cli::assert_common_contract(BIN, VALID);
}

/// A configured home: state database, `[jobs]` with short leases, the test tasks on a
/// queue of this test's own (so tests sharing a PostgreSQL database never take each
/// other's jobs).
struct Home {
    dir: tempfile::TempDir,
    config: PathBuf,
    queue: String,
    rabbit: bool,
}

impl Drop for Home {
    /// The RabbitMQ queues of this test's job queue are deleted (the server is shared).
    fn drop(&mut self) {
        if !self.rabbit {
            return;
        }
        let Some(url) = test_support::require("AMQP_URL") else {
            return;
        };
        let queue = jobs::rabbit::queue_name(&self.queue);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use labrelay::queue::Broker as _;
            let url = labrelay::secret::RedactedUrl::parse(&url).unwrap();
            let b = labrelay::queue::AnyBroker::connect(
                &url,
                &labrelay::queue::BrokerSettings::default(),
            )
            .await
            .unwrap();
            let _ = b.delete_queue(&queue).await;
            let _ = b
                .delete_queue(&labrelay::queue::dead_letter_name(&queue))
                .await;
            b.close().await;
        });
    }
}

enum State {
    Sqlite,
    Postgres,
    /// PostgreSQL state, RabbitMQ hands out the jobs.
    Rabbit,
}

impl Home {
    fn new(state: &State, extra: &str) -> Option<Home> {
        let dir = test_support::tempdir();
        let state_url = match state {
            State::Sqlite => format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("state.db").display()
            ),
            State::Postgres | State::Rabbit => test_support::require("PG_URL")?,
        };
        let broker = match state {
            State::Rabbit => format!(
                "broker = \"rabbitmq\"\nrepublish_secs = 5\n\n[queue]\nurl = \"{}\"\n",
                test_support::require("AMQP_URL")?
            ),
            _ => String::new(),
        };
        let queue = test_support::unique("q").replace('-', "_").to_lowercase();
        let toml = format!(
            r#"[paths]
data_dir = "{data}"

[state]
url = "{state_url}"

[jobs]
lease_secs = 3
heartbeat_secs = 1
poll_ms = 100
grace_secs = 2
queue = "{queue}"
{broker}

[tasks.echo]
command = ["printf", "%s\n{{{{\"sample\": \"%s\"}}}}\n", "{{sample}}", "{{sample}}"]
description = "prints its sample, then a JSON result"

[tasks.fail]
command = ["sh", "-c", "echo boom >&2; exit 3"]
max_attempts = 2
backoff_secs = 1

[tasks.slow]
command = ["sh", "-c", "echo $LABRELAY_JOB_ATTEMPT >> {{marker}}; sleep 3; echo done"]

[tasks.sleeper]
command = ["sh", "-c", "sleep {{secs}} & sleep {{secs}}; wait"]
{extra}"#,
            data = dir.path().join("data").display(),
        );
        let config = test_support::write_config(dir.path(), &toml);
        let rabbit = matches!(state, State::Rabbit);
        Some(Home {
            dir,
            config,
            queue,
            rabbit,
        })
    }

    fn command(&self, bin: &str, args: &[&str]) -> Command {
        let mut cmd = test_support::cli::command(bin, self.dir.path());
        cmd.arg("--config").arg(&self.config).args(args);
        cmd
    }

    fn run(&self, bin: &str, args: &[&str]) -> Output {
        self.command(bin, args).output().unwrap()
    }

    fn ok(&self, bin: &str, args: &[&str]) -> String {
        let out = self.run(bin, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    fn submit(&self, args: &[&str]) -> i64 {
        let mut all = vec!["task"];
        all.extend_from_slice(args);
        self.ok(&SUBMIT, &all).trim().parse().unwrap()
    }

    fn job(&self, id: i64) -> serde_json::Value {
        let out = self.ok(BIN, &["--json", "status", &id.to_string()]);
        serde_json::from_str(out.trim()).unwrap()
    }

    /// Submit `echo` jobs for samples `S{from}` to `S{to - 1}` in one `--each`; their ids.
    fn submit_samples(&self, from: usize, to: usize) -> Vec<i64> {
        let lines = self.dir.path().join(format!("batch{from}.jsonl"));
        std::fs::write(&lines, samples(from, to)).unwrap();
        self.ok(
            &SUBMIT,
            &["task", "echo", "--each", lines.to_str().unwrap()],
        )
        .lines()
        .map(|l| l.parse::<i64>().unwrap())
        .collect()
    }

    /// Point the configuration at `url` instead of the shared server of `setting`.
    fn use_server(&self, setting: &str, url: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let shared = test_support::require(setting).unwrap();
        std::fs::write(&self.config, text.replace(&shared, url)).unwrap();
    }

    fn spawn_worker(&self, args: &[&str]) -> Worker {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        Worker(Some(
            self.command(BIN, &all)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ))
    }
}

/// A worker process, killed when dropped still running (a test that fails before it
/// stops its workers leaves none behind).
struct Worker(Option<Child>);

impl Worker {
    fn wait_with_output(mut self) -> std::io::Result<Output> {
        self.0
            .take()
            .expect("not waited for yet")
            .wait_with_output()
    }
}

impl std::ops::Deref for Worker {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("not waited for yet")
    }
}

impl std::ops::DerefMut for Worker {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("not waited for yet")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut()
            && c.try_wait().ok().flatten().is_none()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Poll `f` until it holds (panics after `secs`).
fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn signal(child: &Child, sig: &str) {
    Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
}

fn submit_run_and_read_the_result(state: &State) {
    let Some(h) = Home::new(state, "") else {
        return;
    };
    let id = h.submit(&["echo", "--arg", "sample=S1; rm -rf /"]);
    let out = h.ok(BIN, &["run", "--once"]);
    assert!(
        out.contains(&format!("job {id} echo attempt 1: succeeded")),
        "{out}"
    );
    let result = h.ok(BIN, &["result", &id.to_string()]);
    let v: serde_json::Value = serde_json::from_str(result.trim()).unwrap();
    assert_eq!(v["sample"], "S1; rm -rf /", "one argv item, no shell");
    let job = h.job(id);
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["queue"], h.queue.as_str());
    // Submissions are checked against the registry.
    let out = h.run(&SUBMIT, &["task", "echo"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`sample` is missing"),
        "{out:?}"
    );
    let out = h.run(&SUBMIT, &["task", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no task named `nope`"),
        "{out:?}"
    );
    // One job per line of --each; every line is checked before anything is submitted.
    let lines = h.dir.path().join("samples.jsonl");
    std::fs::write(&lines, "{\"sample\": \"A\"}\n\n{\"sample\": \"B\"}\n").unwrap();
    let out = h.ok(
        &SUBMIT,
        &["task", "echo", "--each", lines.to_str().unwrap()],
    );
    let ids: Vec<i64> = out.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(ids.len(), 2, "{out}");
    assert_eq!(h.job(ids[1])["args"]["sample"], "B");
    std::fs::write(&lines, "{\"sample\": \"C\"}\n{\"other\": 1}\n").unwrap();
    let out = h.run(
        &SUBMIT,
        &["task", "echo", "--each", lines.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 2"),
        "{out:?}"
    );
    let listed = h.ok(BIN, &["--json", "list", "--limit", "1000"]);
    assert!(
        !listed.contains("\"sample\":\"C\""),
        "nothing of a bad file is submitted"
    );
    h.ok(BIN, &["run", "--once", "--concurrency", "4"]);
    assert_eq!(h.job(ids[0])["state"], "succeeded");
    // Unique keys: one job.
    let a = h.submit(&["noop", "--unique-key", &format!("k-{}", h.queue)]);
    let b = h.submit(&["noop", "--unique-key", &format!("k-{}", h.queue)]);
    assert_eq!(a, b);
    // A failing task: retried after its backoff, then dead with the last error.
    let failing = h.submit(&["fail"]);
    wait_for("the failing job to die", 20, || {
        h.ok(BIN, &["run", "--once"]);
        h.job(failing)["state"] == "dead"
    });
    let job = h.job(failing);
    assert_eq!(job["attempt"], 2);
    assert_eq!(job["error"], "exited with 3");
    let out = h.run(BIN, &["--json", "result", &failing.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["stderr"], "boom\n");
    // --wait prints the result and exits with the job's outcome.
    let mut worker = h.spawn_worker(&[]);
    let out = h.run(
        &SUBMIT,
        &[
            "task",
            "echo",
            "--arg",
            "sample=S2",
            "--wait",
            "--timeout",
            "30",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"sample":"S2"}"#
    );
    let out = h.run(&SUBMIT, &["task", "fail", "--wait", "--timeout", "30"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    signal(&worker, "-TERM");
    assert!(worker.wait().unwrap().success());
    // Administration.
    let out = h.ok(BIN, &["--json", "list", "--state", "dead"]);
    assert!(
        out.lines()
            .any(|l| l.contains(&format!("\"id\":{failing}"))),
        "{out}"
    );
    assert!(h.ok(BIN, &["stats"]).contains(&h.queue));
    let out = h.run(BIN, &["status", "99999999"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such job: 99999999"));
    h.ok(BIN, &["retry", &failing.to_string()]);
    assert_eq!(h.job(failing)["state"], "queued");
}

#[test]
fn submit_run_and_read_the_result_sqlite() {
    submit_run_and_read_the_result(&State::Sqlite);
}

#[test]
fn submit_run_and_read_the_result_postgres() {
    submit_run_and_read_the_result(&State::Postgres);
}

/// No busy polling when idle: with `poll_ms` at a minute, a submission still starts at
/// once, because the submitter writes the SQLite wake file the worker watches (inotify;
/// on PostgreSQL, NOTIFY does the same). Twice: the watch outlives its first wake.
#[test]
fn an_idle_worker_on_sqlite_wakes_on_a_submission_not_on_a_timer() {
    let h = Home::new(&State::Sqlite, "").unwrap();
    let text = std::fs::read_to_string(&h.config).unwrap();
    std::fs::write(&h.config, text.replace("poll_ms = 100", "poll_ms = 60000")).unwrap();
    let wake = h.dir.path().join("state.db.labrelay_jobs.wake");
    let w = h.spawn_worker(&["--concurrency", "1"]);
    wait_for("the worker's wake file", 30, || wake.exists());
    for sample in ["S1", "S2"] {
        // The worker's claim found nothing: it now waits up to a minute.
        std::thread::sleep(Duration::from_millis(500));
        let id = h.submit(&["echo", "--arg", &format!("sample={sample}")]);
        wait_for(
            "the job to end (a minute without the wake file)",
            20,
            || h.job(id)["state"] == "succeeded",
        );
    }
    signal(&w, "-TERM");
    let out = w.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn a_killed_worker_loses_its_job_to_another(state: &State) {
    let Some(h) = Home::new(state, "") else {
        return;
    };
    let marker = h.dir.path().join("attempts");
    let id = h.submit(&["slow", "--arg", &format!("marker={}", marker.display())]);
    let first = h.spawn_worker(&[]);
    wait_for("the first attempt to start", 20, || read(&marker) == "1\n");
    signal(&first, "-KILL");
    let _ = first.wait_with_output();
    // Another worker takes the job once its lease (3 s) has expired, and runs it again.
    let out = h.ok(BIN, &["run", "--max-jobs", "1"]);
    assert!(
        out.contains(&format!("job {id} slow attempt 2: succeeded")),
        "{out}"
    );
    let job = h.job(id);
    assert_eq!(
        (job["state"].as_str(), job["attempt"].as_i64()),
        (Some("succeeded"), Some(2))
    );
    assert_eq!(read(&marker), "1\n2\n");
}

#[test]
fn a_killed_worker_loses_its_job_to_another_sqlite() {
    a_killed_worker_loses_its_job_to_another(&State::Sqlite);
}

#[test]
fn a_killed_worker_loses_its_job_to_another_postgres() {
    a_killed_worker_loses_its_job_to_another(&State::Postgres);
}

#[test]
fn a_killed_worker_loses_its_job_to_another_rabbitmq() {
    a_killed_worker_loses_its_job_to_another(&State::Rabbit);
}

fn sleeping(secs: &str) -> bool {
    Command::new("pgrep")
        .args(["-f", &format!("^sleep {secs}$")])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn cancel_of_a_running_job_kills_its_process_group() {
    cancel_kills_the_group(&State::Sqlite);
}

#[test]
fn cancel_of_a_running_job_kills_its_process_group_rabbitmq() {
    cancel_kills_the_group(&State::Rabbit);
}

fn cancel_kills_the_group(state: &State) {
    let Some(h) = Home::new(state, "") else {
        return;
    };
    let secs = format!(
        "{}.{}",
        300 + std::process::id() % 500,
        std::process::id() % 997
    );
    let id = h.submit(&["sleeper", "--arg", &format!("secs={secs}")]);
    let mut worker = h.spawn_worker(&[]);
    wait_for("the job's processes", 20, || sleeping(&secs));
    let out = h.ok(BIN, &["cancel", &id.to_string()]);
    assert!(out.contains("cancelled"), "{out}");
    wait_for("every process of the job to end", 10, || !sleeping(&secs));
    assert_eq!(h.job(id)["state"], "cancelled");
    signal(&worker, "-TERM");
    assert!(worker.wait().unwrap().success());
    let out = h.run(BIN, &["cancel", &id.to_string()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "cancelling a finished job changes nothing"
    );
}

#[test]
fn sigterm_gives_running_jobs_the_grace_period_then_gives_them_back() {
    sigterm_grace(&State::Sqlite);
}

#[test]
fn sigterm_gives_running_jobs_the_grace_period_then_gives_them_back_rabbitmq() {
    sigterm_grace(&State::Rabbit);
}

fn sigterm_grace(state: &State) {
    let Some(h) = Home::new(state, "") else {
        return;
    };
    let secs = format!(
        "{}.{}",
        800 + std::process::id() % 500,
        std::process::id() % 991
    );
    let id = h.submit(&["sleeper", "--arg", &format!("secs={secs}")]);
    let mut worker = h.spawn_worker(&[]);
    wait_for("the job's processes", 20, || sleeping(&secs));
    let started = Instant::now();
    signal(&worker, "-TERM");
    assert!(worker.wait().unwrap().success());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "the grace period is 2 s: {took:?}"
    );
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert!(!sleeping(&secs), "the job's processes were killed");
    let job = h.job(id);
    assert_eq!(job["state"], "queued", "{job}");
    assert_eq!(job["attempt"], 0, "a shutdown does not count as an attempt");
}

#[test]
fn a_bad_task_definition_is_a_configuration_error_before_any_work() {
    let Some(h) = Home::new(&State::Sqlite, "\n[tasks.broken]\ncommand = []\n") else {
        return;
    };
    for (bin, args) in [
        (BIN, &["run", "--once"][..]),
        (SUBMIT.as_str(), &["task", "noop"][..]),
    ] {
        let out = h.run(bin, args);
        assert_eq!(out.status.code(), Some(78), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("tasks.broken.command"),
            "{out:?}"
        );
    }
    assert!(
        !h.dir.path().join("state.db").exists(),
        "no work before the check"
    );
}

#[test]
fn a_scheduled_task_runs_once_per_period_however_many_workers_run() {
    scheduled_once_per_period(&State::Sqlite);
}

#[test]
fn a_scheduled_task_runs_once_per_period_with_rabbitmq() {
    scheduled_once_per_period(&State::Rabbit);
}

fn scheduled_once_per_period(state: &State) {
    let extra = "\n[tasks.tick]\ncommand = [\"true\"]\nschedule = \"*/2 * * * * *\"\n";
    let Some(h) = Home::new(state, extra) else {
        return;
    };
    let workers: Vec<Worker> = (0..3)
        .map(|_| h.spawn_worker(&["--concurrency", "2"]))
        .collect();
    std::thread::sleep(Duration::from_millis(7_500));
    for w in &workers {
        signal(w, "-TERM");
    }
    for w in workers {
        assert!(w.wait_with_output().unwrap().status.success());
    }
    let out = h.ok(BIN, &["--json", "list", "--submitter", "schedule"]);
    // This test's queue only: a PostgreSQL state database is shared.
    let jobs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|j| j["queue"] == h.queue.as_str())
        .collect();
    // Every 2 s for 7.5 s: 3 or 4 periods, one job each, not one per worker.
    assert!((3..=4).contains(&jobs.len()), "{out}");
    let mut times: Vec<i64> = jobs
        .iter()
        .map(|j| j["run_at_ms"].as_i64().unwrap())
        .collect();
    times.sort_unstable();
    times.dedup();
    assert_eq!(times.len(), jobs.len(), "one job per period: {out}");
    assert!(times.iter().all(|t| t % 2000 == 0), "{times:?}");
    // Newest first: a run submitted just as the workers stopped may still be queued.
    assert!(jobs[1..].iter().all(|j| j["state"] == "succeeded"), "{out}");
    assert!(
        ["succeeded", "queued"].contains(&jobs[0]["state"].as_str().unwrap()),
        "{out}"
    );
}

fn outbox(h: &Home) -> Vec<String> {
    let dir = h.dir.path().join("data/outbox");
    let mut mails: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
                .collect()
        })
        .unwrap_or_default();
    mails.sort();
    mails
}

#[test]
fn the_outcome_is_mailed_once_to_the_address_given_at_submission() {
    let Some(h) = Home::new(
        &State::Sqlite,
        "\n[mail]\nfrom = \"Lab jobs <jobs@lab.example>\"\n",
    ) else {
        return;
    };
    let id = h.submit(&["echo", "--arg", "sample=S9", "--email", "alice@lab.example"]);
    let quiet = h.submit(&["noop"]);
    h.ok(BIN, &["run", "--once"]);
    let mails = outbox(&h);
    assert_eq!(mails.len(), 1, "only the job with --email: {mails:?}");
    let mail = &mails[0];
    assert!(
        mail.contains(&format!("Subject: [labrelay] job {id} echo: succeeded")),
        "{mail}"
    );
    assert!(mail.contains("To: alice@lab.example"), "{mail}");
    assert!(
        mail.contains(&format!("Message-ID: <labrelay-job-{id}-")),
        "{mail}"
    );
    assert!(mail.contains("S9"), "{mail}");
    // Later runs send nothing again.
    h.ok(BIN, &["run", "--once"]);
    assert_eq!(outbox(&h).len(), 1);
    assert_eq!(h.job(quiet)["state"], "succeeded");
    // A bad address is refused at submission.
    let out = h.run(&SUBMIT, &["task", "noop", "--email", "not an address"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // Without [mail] from, --email is a configuration error.
    let plain = Home::new(&State::Sqlite, "").unwrap();
    let out = plain.run(&SUBMIT, &["task", "noop", "--email", "alice@lab.example"]);
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[mail] from"),
        "{out:?}"
    );
}

/// What a webhook receiver got: (headers, body) per request.
type Received = std::sync::Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, String)>>>;

/// An HTTP receiver on a free port: `/flaky` answers 503 to its first request and 200
/// after, `/refuse` always 400. Runs until the test process ends.
fn receiver() -> (String, Received) {
    let got: Received = std::sync::Arc::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = got.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let record = |seen: Received, code: fn(usize) -> u16| {
                move |headers: axum::http::HeaderMap, body: String| async move {
                    let n = {
                        let mut s = seen.lock().unwrap();
                        s.push((headers, body));
                        s.len()
                    };
                    axum::http::StatusCode::from_u16(code(n)).unwrap()
                }
            };
            let app = axum::Router::new()
                .route(
                    "/flaky",
                    axum::routing::post(record(seen.clone(), |n| if n == 1 { 503 } else { 200 })),
                )
                .route("/refuse", axum::routing::post(record(seen, |_| 400)));
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    (base, got)
}

#[test]
fn a_webhook_is_signed_retried_after_a_5xx_and_delivered_once() {
    let (base, got) = receiver();
    let key = "hook-key-0123456789abcdef";
    let Some(h) = Home::new(
        &State::Sqlite,
        &format!(
            "\n[jobs.webhooks.lims]\nurl = \"{base}/flaky\"\nkey = \"{key}\"\n\n\
             [jobs.webhooks.strict]\nurl = \"{base}/refuse\"\nkey = \"{key}\"\n\n\
             [tasks.hooked]\ncommand = [\"true\"]\nwebhook = \"lims\"\n"
        ),
    ) else {
        return;
    };
    // The task's own webhook, and one named at submission.
    let id = h.submit(&["hooked"]);
    let refused = h.submit(&["noop", "--webhook", "strict"]);
    let mut worker = h.spawn_worker(&[]);
    wait_for("the retried delivery", 30, || {
        h.job(id)["webhook_done_ms"].is_i64() && h.job(refused)["webhook_done_ms"].is_i64()
    });
    signal(&worker, "-TERM");
    worker.wait().unwrap();
    let j = h.job(id);
    assert_eq!(j["webhook_attempts"], 2, "{j}");
    assert!(j["webhook_error"].is_null(), "{j}");
    let r = h.job(refused);
    assert_eq!(r["webhook_attempts"], 1, "a 400 is not retried: {r}");
    assert!(r["webhook_error"].as_str().unwrap().contains("400"), "{r}");
    let got = got.lock().unwrap();
    let flaky: Vec<_> = got
        .iter()
        .filter(|(_, b)| b.contains(&format!("\"delivery\":\"job-{id}-")))
        .collect();
    assert_eq!(flaky.len(), 2, "one 503, one delivery");
    let ids: Vec<&str> = flaky
        .iter()
        .map(|(hd, _)| hd["x-labrelay-delivery"].to_str().unwrap())
        .collect();
    assert_eq!(ids[0], ids[1], "the same delivery id on the retry");
    for (headers, body) in flaky {
        let ts = headers["x-labrelay-timestamp"].to_str().unwrap();
        let sig = headers["x-labrelay-signature"].to_str().unwrap();
        let sig = sig.strip_prefix("v1=").unwrap();
        assert!(labrelay::sign::verify_hmac_sha256(
            key.as_bytes(),
            format!("{ts}.{body}").as_bytes(),
            sig
        ));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["event"], "job.finished");
        assert_eq!(v["job"]["id"], id);
        assert_eq!(v["result"]["state"], "succeeded");
    }
    // A webhook nobody configured is refused before anything is submitted.
    let out = h.run(&SUBMIT, &["task", "noop", "--webhook", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("webhook nope"),
        "{out:?}"
    );
}

/// RabbitMQ hands out 60 jobs to two workers: each runs once; a duplicate message for a
/// finished job is acknowledged and dropped; no message is left behind.
#[test]
fn rabbitmq_workers_share_the_jobs_and_drop_duplicate_messages() {
    let Some(h) = Home::new(&State::Rabbit, "") else {
        return;
    };
    let ids = h.submit_samples(0, 60);
    let workers: Vec<Worker> = (0..2)
        .map(|i| h.spawn_worker(&["--concurrency", "4", "--name", &format!("w{i}")]))
        .collect();
    wait_for("60 jobs", 60, || {
        ids.iter().all(|id| h.job(*id)["state"] == "succeeded")
    });
    // A stray copy of the first job's message: dropped, the job does not run again.
    let url = test_support::require("AMQP_URL").unwrap();
    let queue = jobs::rabbit::queue_name(&h.queue);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let broker = rt.block_on(async {
        let url = labrelay::secret::RedactedUrl::parse(&url).unwrap();
        labrelay::queue::AnyBroker::connect(&url, &labrelay::queue::BrokerSettings::default())
            .await
            .unwrap()
    });
    rt.block_on(async {
        use labrelay::queue::Broker as _;
        broker
            .publish(
                "",
                &queue,
                ids[0].to_string().as_bytes(),
                &labrelay::queue::PublishOptions::new(),
            )
            .await
            .unwrap();
    });
    wait_for("the duplicate to be consumed", 20, || {
        rt.block_on(async {
            use labrelay::queue::Broker as _;
            broker.ready_count(&queue).await.unwrap() == 0
        })
    });
    std::thread::sleep(Duration::from_millis(500));
    for w in &workers {
        signal(w, "-TERM");
    }
    for w in workers {
        assert!(w.wait_with_output().unwrap().status.success());
    }
    for id in &ids {
        let j = h.job(*id);
        assert_eq!(
            (j["state"].as_str(), j["attempt"].as_i64()),
            (Some("succeeded"), Some(1)),
            "{j}"
        );
    }
    rt.block_on(broker.close());
}

/// RabbitMQ stopped and started again while jobs are submitted and running: every job
/// ends succeeded, once.
#[test]
fn rabbitmq_restart_mid_run_loses_no_job() {
    let Some(node) = test_support::rabbitmq::RabbitNode::start() else {
        return;
    };
    let Some(h) = Home::new(&State::Rabbit, "") else {
        return;
    };
    // This test's own node, not the shared server.
    h.use_server("AMQP_URL", &node.url());
    let mut ids = h.submit_samples(0, 20);
    let worker = h.spawn_worker(&["--concurrency", "2"]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(node.halt(), "stopping the node");
    ids.extend(h.submit_samples(20, 40));
    std::thread::sleep(Duration::from_secs(2));
    assert!(node.boot(), "starting the node again");
    ids.extend(h.submit_samples(40, 60));
    let succeeded = |id: &i64| h.job(*id)["state"] == "succeeded";
    wait_for("all 60 jobs after the restart", 90, || {
        ids.iter().all(succeeded)
    });
    signal(&worker, "-TERM");
    let out = worker.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    for id in &ids {
        assert_eq!(h.job(*id)["attempt"], 1, "job {id} ran once");
    }
}

/// JSON Lines of echo arguments, samples `S{from}` to `S{to - 1}`.
fn samples(from: usize, to: usize) -> String {
    use std::fmt::Write as _;
    (from..to).fold(String::new(), |mut out, i| {
        let _ = writeln!(out, "{{\"sample\": \"S{i}\"}}");
        out
    })
}

/// With RabbitMQ, a failing job is retried after its backoff (published again when due)
/// and is dead after its last attempt.
#[test]
fn rabbitmq_retries_follow_the_backoff_then_the_job_is_dead() {
    let Some(h) = Home::new(&State::Rabbit, "") else {
        return;
    };
    let id = h.submit(&["fail"]);
    let started = Instant::now();
    let mut worker = h.spawn_worker(&[]);
    wait_for("the job to die", 30, || h.job(id)["state"] == "dead");
    let took = started.elapsed();
    signal(&worker, "-TERM");
    assert!(worker.wait().unwrap().success());
    let job = h.job(id);
    assert_eq!(job["attempt"], 2, "{job}");
    assert!(job["error"].as_str().unwrap().contains("exit"), "{job}");
    // The retry waited for its backoff (1 s base, jittered over its upper half).
    assert!(took >= Duration::from_millis(500), "{took:?}");
}

/// PostgreSQL stopped and started again under a running worker: the worker stays up,
/// reconnects, and runs what is submitted afterwards.
#[test]
fn postgres_restart_under_a_worker_it_reconnects() {
    let Some(pg) = test_support::postgres::PgNode::start() else {
        return;
    };
    let Some(h) = Home::new(&State::Postgres, "") else {
        return;
    };
    h.use_server("PG_URL", &pg.url());
    let first = h.submit_samples(0, 10);
    let mut worker = h.spawn_worker(&["--concurrency", "2"]);
    let succeeded = |ids: &[i64]| ids.iter().all(|id| h.job(*id)["state"] == "succeeded");
    wait_for("the first jobs", 30, || succeeded(&first));
    assert!(pg.halt(), "stopping PostgreSQL");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        worker.try_wait().unwrap().is_none(),
        "the worker outlives the outage"
    );
    assert!(pg.boot(), "starting PostgreSQL again");
    let second = h.submit_samples(10, 20);
    wait_for("the jobs submitted after the restart", 60, || {
        succeeded(&second)
    });
    signal(&worker, "-TERM");
    assert!(worker.wait().unwrap().success());
}

/// An output longer than the row keeps: the row has the first `output_cap_bytes`, the
/// storage backend the whole stream, and `result --full` prints it byte for byte.
#[test]
fn a_long_output_is_kept_whole_in_the_storage_backend() {
    let Some(h) = Home::new(&State::Sqlite, "") else {
        return;
    };
    let store_dir = h.dir.path().join("outputs");
    std::fs::create_dir_all(&store_dir).unwrap();
    let text = std::fs::read_to_string(&h.config).unwrap().replacen(
        "[jobs]\n",
        "[jobs]\noutput_cap_bytes = 1000\noutput_storage = \"outputs\"\n",
        1,
    );
    std::fs::write(
        &h.config,
        format!(
            "{text}\n[storage.outputs]\nurl = \"{}\"\n\n[tasks.long]\ncommand = [\"seq\", \"1\", \"200000\"]\n",
            store_dir.display()
        ),
    )
    .unwrap();
    let id = h.submit(&["long"]);
    let short = h.submit(&["echo", "--arg", "sample=S1"]);
    h.ok(BIN, &["run", "--once"]);
    let job = h.job(id);
    assert_eq!(job["state"], "succeeded", "{job}");
    let out = h.ok(BIN, &["--json", "result", &id.to_string()]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let kept = v["stdout"].as_str().unwrap();
    assert!(kept.starts_with("1\n2\n3\n"), "{kept}");
    assert!(kept.contains("more bytes not kept here"), "{kept}");
    assert_eq!(v["stdout_ref"], format!("jobs/{id}/1/stdout"));
    let full = h.run(BIN, &["result", "--full", &id.to_string()]);
    assert_eq!(full.status.code(), Some(0), "{full:?}");
    let want = Command::new("seq")
        .args(["1", "200000"])
        .output()
        .unwrap()
        .stdout;
    assert_eq!(full.stdout.len(), want.len());
    assert!(full.stdout == want, "the whole stdout, byte for byte");
    // A short output stays in the row only; no temporary file is left behind.
    let v: serde_json::Value =
        serde_json::from_str(h.ok(BIN, &["--json", "result", &short.to_string()]).trim()).unwrap();
    assert!(v["stdout_ref"].is_null(), "{v}");
    let spill = h.dir.path().join("data/job-output");
    assert_eq!(std::fs::read_dir(&spill).unwrap().count(), 0);
}
