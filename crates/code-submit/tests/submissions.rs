//! Code submissions end to end: `code-submit add` → `run` → `job-worker` runs the code in
//! the sandbox → `status` → the result mail arrives over IMAP. On SQLite + local storage
//! and on PostgreSQL + RabbitMQ + Garage (S3); the enable flag; a worker killed with
//! kill -9 mid-run leaves no process, mount or cgroup behind.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use std::time::{Duration, Instant};
use test_support::cli::KillOnDrop;

const BIN: &str = env!("CARGO_BIN_EXE_code-submit");
static WORKER: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| test_support::cli::sibling(BIN, "job-worker"));

enum State {
    /// SQLite state, local code storage, the database broker.
    Embedded,
    /// PostgreSQL state, RabbitMQ broker, sources in Garage.
    Servers,
}

struct Home {
    dir: tempfile::TempDir,
    config: PathBuf,
    code_queue: String,
    /// The address results are mailed to (alice's mailbox), `None`: the outbox.
    mail_to: String,
    amqp: Option<String>,
    /// Appended to every submission id: the PostgreSQL database is shared.
    tag: String,
    pg: Option<String>,
}

impl Drop for Home {
    fn drop(&mut self) {
        if let Some(pg) = &self.pg {
            let _ = Command::new("psql")
                .args([
                    pg.as_str(),
                    "-qc",
                    &format!(
                        "DELETE FROM labrelay_code_submissions WHERE id LIKE '%-{}'",
                        self.tag
                    ),
                ])
                .output();
        }
        let Some(url) = &self.amqp else { return };
        let queue = jobs::rabbit::queue_name(&self.code_queue);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use labrelay::queue::Broker as _;
            let url = labrelay::secret::RedactedUrl::parse(url).unwrap();
            if let Ok(b) = labrelay::queue::AnyBroker::connect(
                &url,
                &labrelay::queue::BrokerSettings::default(),
            )
            .await
            {
                let _ = b.delete_queue(&queue).await;
                let _ = b
                    .delete_queue(&labrelay::queue::dead_letter_name(&queue))
                    .await;
                b.close().await;
            }
        });
    }
}

impl Home {
    /// `smtp`: send the results through the test Postfix (else the outbox).
    fn new(state: &State, smtp: bool) -> Option<Home> {
        let dir = test_support::tempdir();
        let code_queue = test_support::unique("code")
            .replace('-', "_")
            .to_lowercase();
        let (state_url, extra, amqp) = match state {
            State::Embedded => (
                format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("state.db").display()
                ),
                String::new(),
                None,
            ),
            State::Servers => {
                let amqp = test_support::require("AMQP_URL")?;
                let prefix = test_support::unique("code-src");
                (
                    test_support::require("PG_URL")?,
                    format!(
                        "broker = \"rabbitmq\"\ncode_storage = \"src\"\n\n[queue]\nurl = \"{amqp}\"\n\n{}",
                        test_support::s3_storage_toml("src", &prefix)?
                    ),
                    Some(amqp),
                )
            }
        };
        let (mail, mail_to) = if smtp {
            let domain = test_support::require("MAIL_DOMAIN")?;
            (
                format!(
                    "[mail]\nfrom = \"labrelay@{domain}\"\n\n[smtp]\nhost = \"{}\"\nport = {}\nsecurity = \"none\"\n",
                    test_support::require("SMTP_HOST")?,
                    test_support::require("SMTP_PORT")?
                ),
                format!("alice@{domain}"),
            )
        } else {
            (
                "[mail]\nfrom = \"labrelay@example.org\"\n".to_owned(),
                "someone@example.org".to_owned(),
            )
        };
        let toml = format!(
            r#"[paths]
data_dir = "{data}"

[state]
url = "{state_url}"

{mail}
[jobs]
lease_secs = 3
heartbeat_secs = 1
poll_ms = 100
grace_secs = 2
code_queue = "{code_queue}"
{extra}"#,
            data = dir.path().join("data").display(),
        );
        let config = test_support::write_config(dir.path(), &toml);
        let pg = matches!(state, State::Servers).then(|| state_url.clone());
        Some(Home {
            dir,
            config,
            tag: code_queue.rsplit('_').take(2).collect::<Vec<_>>().join(""),
            code_queue,
            mail_to,
            amqp,
            pg,
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

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(BIN, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    }

    /// The id of submission `name` in this test.
    fn id(&self, name: &str) -> String {
        format!("{name}-{}", self.tag)
    }

    fn add(&self, name: &str, file_name: &str, source: &str, extra: &[&str]) {
        let file = self.file(file_name, source);
        let id = self.id(name);
        let mut args = vec!["add", &file, "--email", &self.mail_to, "--id", &id];
        args.extend_from_slice(extra);
        assert_eq!(self.ok(&args).trim(), id);
    }

    /// Run `code-submit ARGS... ID-of-name`.
    fn on(&self, args: &[&str], name: &str) -> String {
        let id = self.id(name);
        let mut all = args.to_vec();
        all.push(&id);
        self.ok(&all)
    }

    fn status(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(self.on(&["--json", "status"], name).trim()).unwrap()
    }

    fn worker(&self) -> KillOnDrop {
        KillOnDrop(
            self.command(&WORKER, &["run", "--queues", &self.code_queue])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    fn wait_status(&self, id: &str, secs: u64, done: impl Fn(&str) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status(id);
            if done(s["status"].as_str().unwrap()) {
                return s;
            }
            assert!(Instant::now() < deadline, "{} is still {s}", self.id(id));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn finished(&self, id: &str) -> serde_json::Value {
        self.wait_status(id, 60, |s| {
            !matches!(s, "Not Run" | "In Queue" | "Processing")
        })
    }
}

/// The message with this Message-ID in alice's INBOX (raw), waiting for delivery; it is
/// deleted from the shared mailbox after reading.
fn mail_in_alices_inbox(message_id: &str) -> String {
    use labrelay::config::{ImapConfig, TlsMode};
    let cfg = ImapConfig {
        host: test_support::setting("IMAP_HOST").unwrap(),
        port: Some(test_support::setting("IMAP_PORT").unwrap().parse().unwrap()),
        security: TlsMode::None,
        username: "alice".into(),
        password: labrelay::secret::SecretSpec::parse(
            &test_support::setting("MAIL_PASS_ALICE").unwrap(),
        ),
        folder: "INBOX".into(),
        timeout_secs: 20,
        ca_file: None,
    };
    let mut c = labrelay::mail::ImapClient::connect(&cfg).unwrap();
    c.select("INBOX").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(uid) = c.search_message_id(message_id).unwrap().first() {
            let raw = c.fetch_raw(*uid).unwrap();
            let _ = c.delete(*uid);
            return String::from_utf8_lossy(&raw).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "mail {message_id} did not arrive"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn end_to_end(state: &State) {
    let Some(h) = Home::new(state, true) else {
        return;
    };
    let stdin = h.file("in.txt", "labrelay\n");
    h.add(
        "hello-py",
        "hello.py",
        "import sys\nprint('hello', sys.stdin.read().strip())\n",
        &["--stdin", &stdin],
    );
    h.add(
        "broken-c",
        "broken.c",
        "int main(void) { return undeclared; }\n",
        &[],
    );
    assert_eq!(h.status("hello-py")["status"], "Not Run");
    let job: i64 = h.on(&["run"], "hello-py").trim().parse().unwrap();
    // Running again while it is queued finds the same job.
    assert_eq!(h.on(&["run"], "hello-py").trim(), job.to_string());
    h.on(&["run"], "broken-c");
    assert_eq!(h.status("hello-py")["status"], "In Queue");
    let _w = h.worker();
    let s = h.finished("hello-py");
    assert_eq!(s["status"], "Accepted", "{s}");
    assert_eq!(s["stdout"], "hello labrelay\n");
    assert_eq!(s["exit_code"], 0);
    assert!(s["memory_kib"].as_i64().unwrap() > 0, "{s}");
    assert!(
        s["link"]
            .as_str()
            .unwrap()
            .ends_with(&format!("{}.py", h.id("hello-py"))),
        "{s}"
    );
    let b = h.finished("broken-c");
    assert_eq!(b["status"], "Compilation Error", "{b}");
    assert!(
        b["compile_output"].as_str().unwrap().contains("undeclared"),
        "{b}"
    );
    assert_eq!(b["disabled"], true);

    // The result mail: a table, text and HTML, with the status.
    let j: serde_json::Value = serde_json::from_str(
        String::from_utf8(
            h.run(&WORKER, &["--json", "status", &job.to_string()])
                .stdout,
        )
        .unwrap()
        .trim(),
    )
    .unwrap();
    let domain = test_support::setting("MAIL_DOMAIN").unwrap();
    let mid = format!(
        "labrelay-job-{job}-{}@{domain}",
        j["finished_ms"].as_i64().unwrap()
    );
    let raw = mail_in_alices_inbox(&mid);
    assert!(
        raw.contains(&format!(
            "Subject: [labrelay] submission {}: Accepted",
            h.id("hello-py")
        )),
        "{raw}"
    );
    assert!(raw.contains("text/html"), "{raw}");
    assert!(raw.contains("hello labrelay"), "{raw}");

    // Disabled after the error: run refuses (exit 1), enable allows it again.
    let out = h.run(BIN, &["run", &h.id("broken-c")]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("code-submit enable {}", h.id("broken-c"))),
        "{err}"
    );
    h.on(&["enable"], "broken-c");
    let again: i64 = h.on(&["run"], "broken-c").trim().parse().unwrap();
    assert_ne!(again, job);
    let b = h.finished("broken-c");
    assert_eq!(b["runs"], 2, "{b}");

    // The seed's check_user list: every submission of the address.
    let list = h.ok(&["--json", "status", "--email", &h.mail_to]);
    let ids: Vec<String> = list
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        // The PostgreSQL database is shared with other tests mailing alice.
        .filter(|id| id.ends_with(&h.tag))
        .collect();
    assert_eq!(ids, [h.id("hello-py"), h.id("broken-c")]);
}

#[test]
fn add_run_status_and_mail_on_sqlite_and_local_storage() {
    end_to_end(&State::Embedded);
}

#[test]
fn add_run_status_and_mail_on_postgres_rabbitmq_and_garage() {
    end_to_end(&State::Servers);
}

#[test]
fn bad_input_gets_its_exit_code() {
    let h = Home::new(&State::Embedded, false).unwrap();
    let f = h.file("x.py", "print(1)\n");
    for (args, code, says) in [
        (
            vec!["add", &f, "--email", "a@example.org", "--id", "../x"],
            2,
            "id \"../x\": an id is",
        ),
        (
            vec!["add", &f, "--email", "a@example.org", "--language", "cobol"],
            2,
            "cobol",
        ),
        (vec!["add", &f, "--email", "not an address"], 2, "address"),
        (vec!["run", "nope"], 1, "no such submission"),
        (vec!["status", "nope"], 1, "no such submission"),
        (vec!["enable", "nope"], 1, "no such submission"),
    ] {
        let out = h.run(BIN, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    h.add("dup", "x.py", "print(1)\n", &[]);
    let out = h.run(
        BIN,
        &["add", &f, "--email", "a@example.org", "--id", &h.id("dup")],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn exec_prints_the_report_and_exits_with_the_status() {
    let h = Home::new(&State::Embedded, false).unwrap();
    let f = h.file(
        "hi.c",
        "#include <stdio.h>\nint main(void){puts(\"hi\");return 0;}\n",
    );
    let out = h.ok(&["--json", "exec", &f]);
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for key in [
        "status",
        "exit_code",
        "signal",
        "time_ms",
        "wall_ms",
        "memory_kib",
        "stdout",
        "stderr",
        "compile_output",
    ] {
        assert!(r.get(key).is_some(), "{key} missing: {r}");
    }
    assert_eq!(r["status"], "Accepted");
    assert_eq!(r["stdout"], "hi\n");
    let f = h.file("loop.py", "while True: pass\n");
    let out = h.run(BIN, &["exec", &f, "--time-limit", "0.5"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Time Limit Exceeded"));
    let langs = h.ok(&["languages"]);
    assert!(
        langs.contains("python") && langs.contains("rust"),
        "{langs}"
    );
}

/// Host processes whose command line contains `marker`.
fn host_processes_with(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(marker)
            })
        })
        .count()
}

fn box_mounts() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains("labrelay-box"))
        .count()
}

fn cgroups_of(pid: u32) -> Vec<PathBuf> {
    let mut left = Vec::new();
    for c in ["memory", "pids", "cpuacct", "unified", ""] {
        let p = Path::new("/sys/fs/cgroup").join(c).join("labrelay-sandbox");
        for e in std::fs::read_dir(&p).into_iter().flatten().flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{pid}-"))
            {
                left.push(e.path());
            }
        }
    }
    left
}

#[test]
fn a_worker_killed_mid_run_leaves_no_process_mount_or_cgroup_and_the_run_is_redone() {
    let h = Home::new(&State::Embedded, false).unwrap();
    // Two seconds and a bit: unique to this test process, short enough to run whole.
    let marker = format!("2.{:04}", std::process::id() % 10_000);
    h.add(
        "sleepy",
        "sleepy.py",
        &format!("import subprocess\nsubprocess.run(['sleep', '{marker}'])\nprint('woke')\n"),
        &["--language", "python"],
    );
    h.on(&["run"], "sleepy");
    let mut w = h.worker();
    let deadline = Instant::now() + Duration::from_secs(30);
    while host_processes_with(&format!("sleep {marker}")) == 0 {
        assert!(Instant::now() < deadline, "the box never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(h.status("sleepy")["status"], "Processing");
    let dead = w.0.id();
    w.0.kill().unwrap(); // SIGKILL
    w.0.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while host_processes_with(&format!("sleep {marker}")) > 0 {
        assert!(Instant::now() < deadline, "the box outlived its worker");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The tmpfs lived in the worker's own mount namespace.
    assert_eq!(box_mounts(), 0, "a box mount outlived its worker");
    // Another worker takes the job once the lease runs out, removes what the dead one
    // left in the cgroup tree, and runs it to the end.
    let _w2 = h.worker();
    let s = h.wait_status("sleepy", 120, |s| s == "Accepted");
    assert_eq!(s["stdout"], "woke\n", "{s}");
    assert_eq!(cgroups_of(dead), Vec::<PathBuf>::new());
    assert_eq!(host_processes_with(&format!("sleep {marker}")), 0);
}

/// A small deterministic pseudo-random sequence (xorshift), seeded from the clock and
/// printed, so a failing run can be told apart.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        eprintln!("crash-loop seed {seed}");
        Rng(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn kill_9_crash_loop_each_submission_ends_with_one_result_and_one_mail() {
    let h = Home::new(&State::Embedded, false).unwrap();
    let n = 10;
    let marker = format!("0.2{:04}", std::process::id() % 10_000);
    for i in 0..n {
        h.add(
            &format!("c{i}"),
            &format!("c{i}.py"),
            &format!(
                "import subprocess\nsubprocess.run(['sleep', '{marker}'])\nprint('done {i}')\n"
            ),
            &[],
        );
        h.on(&["run"], &format!("c{i}"));
    }
    let finished = |h: &Home| {
        (0..n).all(|i| {
            !matches!(
                h.status(&format!("c{i}"))["status"].as_str(),
                Some("In Queue" | "Processing")
            )
        })
    };
    let mut rng = Rng::new();
    let mut killed = Vec::new();
    // Workers killed at random points, 60 times or until every run is over; a job whose
    // workers die three times is dead (its submission then says Internal Error).
    while killed.len() < 60 && !finished(&h) {
        let mut w = h.worker();
        std::thread::sleep(Duration::from_millis(30 + rng.below(600)));
        killed.push(w.0.id());
        w.0.kill().unwrap(); // SIGKILL, at a random point
        w.0.wait().unwrap();
    }
    {
        let _w = h.worker();
        let deadline = Instant::now() + Duration::from_mins(1);
        while !finished(&h) {
            assert!(
                Instant::now() < deadline,
                "runs still open after the crash loop"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    eprintln!("{} workers killed", killed.len());
    assert!(killed.len() >= 5, "only {} kills", killed.len());
    // A last worker sends what the killed ones left unsent (a mail whose sender died
    // while holding it waits out the 2-minute hold).
    let read_mails = || -> Vec<String> {
        std::fs::read_dir(h.dir.path().join("data/outbox"))
            .map(|d| {
                d.map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
                    .collect()
            })
            .unwrap_or_default()
    };
    let subject = |i: usize| format!("Subject: [labrelay] submission {}:", h.id(&format!("c{i}")));
    {
        let _w = h.worker();
        let deadline = Instant::now() + Duration::from_secs(150);
        while !(0..n).all(|i| read_mails().iter().any(|m| m.contains(&subject(i)))) {
            assert!(Instant::now() < deadline, "some outcome was never mailed");
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let mails = read_mails();
    let mut dead = 0;
    for i in 0..n {
        let name = format!("c{i}");
        let s = h.status(&name);
        assert_eq!(s["runs"], 1, "{s}");
        let status = s["status"].as_str().unwrap().to_owned();
        if status == "Accepted" {
            assert_eq!(s["stdout"], format!("done {i}\n"), "{s}");
        } else {
            // Its job died with its workers: said so, not left Processing.
            assert_eq!(status, "Internal Error", "{s}");
            assert!(s["message"].as_str().unwrap().contains("ended dead"), "{s}");
            dead += 1;
        }
        // One outcome mail (a mail written twice keeps its Message-ID), and it is the
        // real outcome.
        let subject = subject(i);
        let ids: std::collections::BTreeSet<String> = mails
            .iter()
            .filter(|m| m.contains(&subject))
            .map(|m| {
                m.lines()
                    .find(|l| l.starts_with("Message-ID:"))
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(ids.len(), 1, "{name}: {ids:?}");
        assert!(
            status != "Accepted"
                || mails
                    .iter()
                    .filter(|m| m.contains(&subject))
                    .all(|m| m.contains(&format!("{subject} Accepted"))),
            "{name}"
        );
    }
    eprintln!("{dead} of {n} jobs died with their workers");
    assert_eq!(host_processes_with(&format!("sleep {marker}")), 0);
    assert_eq!(box_mounts(), 0);
    // What the killed workers left in the cgroup tree goes at the next start.
    let f = h.file("x.py", "print(1)\n");
    h.ok(&["exec", &f]);
    for pid in killed {
        assert_eq!(cgroups_of(pid), Vec::<PathBuf>::new(), "worker {pid}");
    }
}
