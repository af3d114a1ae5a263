//! `job-worker serve` end to end over real HTTP: signed requests (valid, expired,
//! future-dated, replayed, forged, body altered), users who may only see their own
//! jobs, the OpenAPI document, /metrics, configuration errors, and `code-submit` talking
//! to a remote server through `[jobs] api_url`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jobs::api;
use labrelay::secret::Secret;

const BIN: &str = env!("CARGO_BIN_EXE_job-worker");
const ALICE: &str = "alice-key-0123456789";
const BOB: &str = "bob-key-9876543210";
const ROOT: &str = "root-key-5555555555";

static SUBMIT: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| test_support::cli::sibling(BIN, "code-submit"));

/// A configured home and, once started, its server.
struct Api {
    dir: tempfile::TempDir,
    config: PathBuf,
    server: Option<Child>,
    base: String,
    http: reqwest::Client,
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Api {
    /// A home on `state_url` (None: SQLite in the home) with alice, bob and an admin.
    fn home(state_url: Option<String>, extra: &str) -> Api {
        let dir = test_support::tempdir();
        let state_url = state_url.unwrap_or_else(|| {
            format!(
                "sqlite://{}?mode=rwc",
                dir.path().join("state.db").display()
            )
        });
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
queue = "{queue}"

[jobs.users.alice]
key = "env:ALICE_KEY"

[jobs.users.bob]
key = "env:BOB_KEY"

[jobs.users.root]
key = "env:ROOT_KEY"
admin = true

[tasks.echo]
command = ["printf", "%s\n{{{{\"sample\": \"%s\"}}}}\n", "{{sample}}", "{{sample}}"]
description = "prints its sample, then a JSON result"
{extra}"#,
            data = dir.path().join("data").display(),
        );
        let config = test_support::write_config(dir.path(), &toml);
        Api {
            dir,
            config,
            server: None,
            base: String::new(),
            http: reqwest::Client::new(),
        }
    }

    /// Make this home a client of `server`'s API as `user` (`[jobs] api_url`, api_user,
    /// api_key).
    fn use_api_of(&self, server: &Api, user: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap().replacen(
            "[jobs]\n",
            &format!(
                "[jobs]\napi_url = \"{}\"\napi_user = \"{user}\"\napi_key = \"env:{}_KEY\"\n",
                server.base,
                user.to_uppercase()
            ),
            1,
        );
        std::fs::write(&self.config, text).unwrap();
    }

    /// A `job-worker run ARGS` on this home, killed when dropped (also when an assertion
    /// fails first).
    fn worker(&self, args: &[&str]) -> test_support::cli::KillOnDrop {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        test_support::cli::KillOnDrop(
            self.command(BIN, &all)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    fn command(&self, bin: &str, args: &[&str]) -> Command {
        let mut cmd = test_support::cli::command(bin, self.dir.path());
        cmd.env("ALICE_KEY", ALICE)
            .env("BOB_KEY", BOB)
            .env("ROOT_KEY", ROOT)
            .arg("--config")
            .arg(&self.config)
            .args(args);
        cmd
    }

    /// Start `serve` on a free port.
    fn start(mut self) -> Api {
        let mut child = self
            .command(BIN, &["--json", "serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).expect(&line);
        self.base = format!("http://{}", v["listen"].as_str().unwrap());
        self.server = Some(child);
        self
    }

    /// A request signed by `user` with `key`, its clock `skew` seconds off, and the
    /// body sent possibly differing from the body signed.
    #[allow(clippy::too_many_arguments)]
    async fn raw(
        &self,
        user: &str,
        key: &str,
        method: &str,
        path_and_query: &str,
        signed_body: &[u8],
        sent_body: &[u8],
        skew: i64,
        nonce: &str,
    ) -> (u16, serde_json::Value) {
        let url = reqwest::Url::parse(&format!("{}{path_and_query}", self.base)).unwrap();
        let auth = api::authorization(
            user,
            &Secret::new(key),
            &api::Target {
                method,
                path: url.path(),
                query: url.query().unwrap_or(""),
                body: signed_body,
            },
            chrono::Utc::now().timestamp() + skew,
            nonce,
        );
        self.send(method, url, Some(auth), sent_body).await
    }

    async fn send(
        &self,
        method: &str,
        url: reqwest::Url,
        auth: Option<String>,
        body: &[u8],
    ) -> (u16, serde_json::Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), url)
            .body(body.to_vec());
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    /// A correctly signed request.
    async fn call(
        &self,
        user: &str,
        method: &str,
        path_and_query: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let key = match user {
            "alice" => ALICE,
            "bob" => BOB,
            _ => ROOT,
        };
        let body = if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        self.raw(
            user,
            key,
            method,
            path_and_query,
            &body,
            &body,
            0,
            &api::new_nonce(),
        )
        .await
    }
}

fn echo(sample: &str) -> serde_json::Value {
    serde_json::json!({"task": "echo", "args": {"sample": sample}})
}

#[tokio::test]
async fn only_a_fresh_correct_signature_over_this_very_request_is_accepted() {
    let api = Api::home(None, "").start();
    let body = echo("S1").to_string().into_bytes();
    let nonce = api::new_nonce();
    let (s, v) = api
        .raw("alice", ALICE, "POST", "/v1/jobs", &body, &body, 0, &nonce)
        .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["created"], true);
    // The same request again, byte for byte: a replay.
    let (s, v) = api
        .raw("alice", ALICE, "POST", "/v1/jobs", &body, &body, 0, &nonce)
        .await;
    assert_eq!(s, 401, "{v}");
    assert!(v["error"].as_str().unwrap().contains("replayed"), "{v}");
    // Expired and future-dated, both beyond the 60 s window.
    let (s, v) = api
        .raw(
            "alice",
            ALICE,
            "POST",
            "/v1/jobs",
            &body,
            &body,
            -90,
            &api::new_nonce(),
        )
        .await;
    assert_eq!(s, 401);
    assert!(v["error"].as_str().unwrap().contains("expired"), "{v}");
    let (s, v) = api
        .raw(
            "alice",
            ALICE,
            "POST",
            "/v1/jobs",
            &body,
            &body,
            90,
            &api::new_nonce(),
        )
        .await;
    assert_eq!(s, 401);
    assert!(v["error"].as_str().unwrap().contains("ahead"), "{v}");
    // Within the window either way: fine.
    for skew in [-50, 50] {
        let (s, v) = api
            .raw(
                "alice",
                ALICE,
                "GET",
                "/v1/tasks",
                b"",
                b"",
                skew,
                &api::new_nonce(),
            )
            .await;
        assert_eq!(s, 200, "skew {skew}: {v}");
    }
    // Forged: bob's key under alice's name, an unknown user, a made-up signature.
    let (s, _) = api
        .raw(
            "alice",
            BOB,
            "GET",
            "/v1/tasks",
            b"",
            b"",
            0,
            &api::new_nonce(),
        )
        .await;
    assert_eq!(s, 401);
    let (s, _) = api
        .raw(
            "mallory",
            ALICE,
            "GET",
            "/v1/tasks",
            b"",
            b"",
            0,
            &api::new_nonce(),
        )
        .await;
    assert_eq!(s, 401);
    let url = reqwest::Url::parse(&format!("{}/v1/tasks", api.base)).unwrap();
    let forged = format!(
        "LABRELAY-HMAC-SHA256 user=alice, ts={}, nonce={}, sig={}",
        chrono::Utc::now().timestamp(),
        api::new_nonce(),
        "ab".repeat(32)
    );
    let (s, _) = api.send("GET", url.clone(), Some(forged), b"").await;
    assert_eq!(s, 401);
    // No header, and the seed's old Basic scheme.
    let (s, _) = api.send("GET", url.clone(), None, b"").await;
    assert_eq!(s, 401);
    let (s, _) = api
        .send("GET", url, Some("Basic YWxpY2U6cHc=".into()), b"")
        .await;
    assert_eq!(s, 401);
    // Body altered after signing: another sample, same signature.
    let altered = echo("S2").to_string().into_bytes();
    let (s, v) = api
        .raw(
            "alice",
            ALICE,
            "POST",
            "/v1/jobs",
            &body,
            &altered,
            0,
            &api::new_nonce(),
        )
        .await;
    assert_eq!(s, 401, "{v}");
    // Query altered: signed for one state, sent with another.
    let q = reqwest::Url::parse(&format!("{}/v1/jobs?state=queued", api.base)).unwrap();
    let auth = api::authorization(
        "alice",
        &Secret::new(ALICE),
        &api::Target {
            method: "GET",
            path: "/v1/jobs",
            query: "state=dead",
            body: b"",
        },
        chrono::Utc::now().timestamp(),
        &api::new_nonce(),
    );
    let (s, _) = api.send("GET", q, Some(auth), b"").await;
    assert_eq!(s, 401);
    // Only the first submission exists.
    let (s, v) = api
        .call("alice", "GET", "/v1/jobs", &serde_json::Value::Null)
        .await;
    assert_eq!(s, 200);
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    // The refusals are counted by reason; no key appears anywhere in the metrics.
    let metrics = reqwest::get(format!("{}/metrics", api.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for reason in [
        "replayed",
        "expired",
        "future",
        "signature",
        "missing",
        "malformed",
    ] {
        assert!(
            metrics.contains(&format!(
                "labrelay_api_refused_total{{reason=\"{reason}\"}}"
            )),
            "{reason}: {metrics}"
        );
    }
    assert!(
        metrics.contains(
            "labrelay_api_requests_total{method=\"POST\",route=\"/v1/jobs\",status=\"201\"} 1"
        ),
        "{metrics}"
    );
    for key in [ALICE, BOB, ROOT] {
        assert!(!metrics.contains(key));
    }
}

#[tokio::test]
async fn a_batch_is_checked_whole_before_any_job_is_stored() {
    let api = Api::home(None, "").start();
    let count = |v: &serde_json::Value| v.as_array().map_or(usize::MAX, Vec::len);
    let (_, before) = api
        .call("alice", "GET", "/v1/jobs", &serde_json::Value::Null)
        .await;
    let mut keyed = echo("K");
    keyed["unique_key"] = "k1".into();
    for (body, why) in [
        (
            serde_json::json!({"jobs": []}),
            "jobs: 0 given, 1 to 1000 allowed",
        ),
        (
            serde_json::json!({"jobs": [echo("A"), {"task": "nope"}]}),
            "jobs[1]: ",
        ),
        (
            serde_json::json!({"jobs": [echo("A"), keyed]}),
            "jobs[1]: jobs submitted together take no unique key",
        ),
        (
            serde_json::json!({"jobs": [echo("A")], "extra": 1}),
            "request body: unknown field `extra`",
        ),
    ] {
        let (s, v) = api.call("alice", "POST", "/v1/jobs/batch", &body).await;
        assert_eq!(s, 400, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{body}: {v}");
    }
    let (_, after) = api
        .call("alice", "GET", "/v1/jobs", &serde_json::Value::Null)
        .await;
    assert_eq!(count(&after), count(&before), "nothing stored: {after}");
    let jobs: Vec<serde_json::Value> = (0..5).map(|i| echo(&format!("B{i}"))).collect();
    let (s, v) = api
        .call(
            "alice",
            "POST",
            "/v1/jobs/batch",
            &serde_json::json!({"jobs": jobs}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let ids: Vec<i64> = serde_json::from_value(v["ids"].clone()).unwrap();
    assert_eq!(ids.len(), 5);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let (_, listed) = api
        .call("alice", "GET", "/v1/jobs", &serde_json::Value::Null)
        .await;
    assert_eq!(count(&listed), count(&before) + 5, "{listed}");
    for (i, id) in ids.iter().enumerate() {
        let (s, v) = api
            .call(
                "alice",
                "GET",
                &format!("/v1/jobs/{id}"),
                &serde_json::Value::Null,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["args"]["sample"], format!("B{i}"), "{v}");
        assert_eq!(v["submitter"], "alice", "{v}");
    }
    // GET on the batch route answers like an id that is no job.
    let (s, v) = api
        .call("alice", "GET", "/v1/jobs/batch", &serde_json::Value::Null)
        .await;
    assert_eq!(s, 404, "{v}");
}

#[tokio::test]
async fn users_see_and_cancel_only_their_own_jobs_and_an_admin_sees_all() {
    let api = Api::home(None, "").start();
    let (s, v) = api.call("alice", "POST", "/v1/jobs", &echo("A")).await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_i64().unwrap();
    for path in [format!("/v1/jobs/{id}"), format!("/v1/jobs/{id}/result")] {
        let (s, v) = api
            .call("bob", "GET", &path, &serde_json::Value::Null)
            .await;
        assert_eq!(s, 404, "bob reads {path}: {v}");
        assert_eq!(v["error"], format!("no such job: {id}"));
    }
    let (s, _) = api
        .call(
            "bob",
            "POST",
            &format!("/v1/jobs/{id}/cancel"),
            &serde_json::Value::Null,
        )
        .await;
    assert_eq!(s, 404, "bob cancels alice's job");
    let (s, v) = api
        .call("bob", "GET", "/v1/jobs", &serde_json::Value::Null)
        .await;
    assert_eq!((s, v.as_array().unwrap().len()), (200, 0), "{v}");
    let (s, v) = api
        .call(
            "bob",
            "GET",
            "/v1/jobs?submitter=alice",
            &serde_json::Value::Null,
        )
        .await;
    assert_eq!((s, v.as_array().unwrap().len()), (200, 0), "{v}");
    // Bob cannot reach alice's job through her unique key either.
    let mut keyed = echo("K");
    keyed["unique_key"] = "nightly-1".into();
    assert_eq!(api.call("alice", "POST", "/v1/jobs", &keyed).await.0, 201);
    assert_eq!(api.call("alice", "POST", "/v1/jobs", &keyed).await.0, 200);
    let (s, v) = api.call("bob", "POST", "/v1/jobs", &keyed).await;
    assert_eq!(s, 409, "{v}");
    assert!(v.get("id").is_none(), "{v}");
    // Alice sees hers; no result before it ran.
    let (s, v) = api
        .call(
            "alice",
            "GET",
            &format!("/v1/jobs/{id}"),
            &serde_json::Value::Null,
        )
        .await;
    assert_eq!((s, v["state"].as_str()), (200, Some("queued")), "{v}");
    assert_eq!(v["submitter"], "alice");
    let (s, v) = api
        .call(
            "alice",
            "GET",
            &format!("/v1/jobs/{id}/result"),
            &serde_json::Value::Null,
        )
        .await;
    assert_eq!((s, v["state"].as_str()), (409, Some("queued")), "{v}");
    // The admin sees and may cancel it.
    let (s, v) = api
        .call("root", "GET", "/v1/jobs", &serde_json::Value::Null)
        .await;
    assert_eq!((s, v.as_array().unwrap().len()), (200, 2), "{v}");
    let (s, v) = api
        .call(
            "root",
            "POST",
            &format!("/v1/jobs/{id}/cancel"),
            &serde_json::Value::Null,
        )
        .await;
    assert_eq!((s, v["outcome"].as_str()), (200, Some("queued")), "{v}");
    let (s, v) = api
        .call(
            "alice",
            "POST",
            &format!("/v1/jobs/{id}/cancel"),
            &serde_json::Value::Null,
        )
        .await;
    assert_eq!(
        (s, v["outcome"].as_str()),
        (409, Some("already_finished")),
        "{v}"
    );
    let (s, v) = api
        .call(
            "alice",
            "GET",
            &format!("/v1/jobs/{id}/result"),
            &serde_json::Value::Null,
        )
        .await;
    assert_eq!((s, v["state"].as_str()), (200, Some("cancelled")), "{v}");
    // Bad submissions are 400s that name the problem.
    for (body, says) in [
        (serde_json::json!({"task": "nope"}), "no task named `nope`"),
        (serde_json::json!({"task": "echo"}), "sample"),
        (
            serde_json::json!({"task": "echo", "args": {"sample": "x"}, "run_at": "tomorrow"}),
            "RFC 3339",
        ),
        (
            serde_json::json!({"task": "echo", "colour": 1}),
            "unknown field",
        ),
    ] {
        let (s, v) = api.call("alice", "POST", "/v1/jobs", &body).await;
        assert_eq!(s, 400, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{body}: {v}");
    }
    let (s, v) = api
        .call(
            "alice",
            "GET",
            "/v1/jobs?state=finished",
            &serde_json::Value::Null,
        )
        .await;
    assert_eq!(s, 400, "{v}");
}

#[tokio::test]
async fn the_openapi_document_is_served_and_lists_every_route() {
    let api = Api::home(None, "").start();
    let doc: serde_json::Value = reqwest::get(format!("{}/openapi.json", api.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let on_disk: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/job-worker-api.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(doc, on_disk);
    let paths: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for p in [
        "/v1/jobs",
        "/v1/jobs/batch",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/result",
        "/v1/jobs/{id}/cancel",
        "/v1/jobs/{id}/output/{stream}",
        "/v1/tasks",
        "/v1/submissions",
        "/v1/submissions/{id}",
        "/v1/submissions/{id}/run",
        "/v1/submissions/{id}/enable",
        "/metrics",
    ] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
    let health: serde_json::Value = reqwest::get(format!("{}/healthz", api.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["ok"], true);
}

#[tokio::test]
async fn code_submissions_are_added_run_and_read_over_the_signed_api() {
    let api = Api::home(None, "\n[mail]\nfrom = \"labrelay@example.org\"\n").start();
    let null = serde_json::Value::Null;
    let hello = serde_json::json!({
        "id": "api-hello", "language": "python", "email": "alice@example.org",
        "source": "import sys\nprint('hi', sys.stdin.read().strip())\n", "stdin": "api\n",
    });
    let (s, v) = api.call("alice", "POST", "/v1/submissions", &hello).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        (v["id"].as_str(), v["status"].as_str()),
        (Some("api-hello"), Some("Not Run"))
    );
    assert_eq!(
        api.call("alice", "POST", "/v1/submissions", &hello).await.0,
        409
    );
    for (body, says) in [
        (
            serde_json::json!({"language": "cobol", "source": "x", "email": "a@example.org"}),
            "cobol",
        ),
        (
            serde_json::json!({"language": "python", "source": "x", "email": "nope"}),
            "email",
        ),
        (
            serde_json::json!({"id": "../x", "language": "python", "source": "x", "email": "a@example.org"}),
            "id",
        ),
    ] {
        let (s, v) = api.call("alice", "POST", "/v1/submissions", &body).await;
        assert_eq!(s, 400, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{v}");
    }
    let broken = serde_json::json!({
        "id": "api-broken", "language": "c", "email": "alice@example.org",
        "source": "int main(void) { return nope; }\n",
    });
    assert_eq!(
        api.call("alice", "POST", "/v1/submissions", &broken)
            .await
            .0,
        201
    );
    // Bob sees neither, and cannot run them.
    for path in ["/v1/submissions/api-hello", "/v1/submissions/api-hello/run"] {
        let method = if path.ends_with("run") { "POST" } else { "GET" };
        assert_eq!(api.call("bob", method, path, &null).await.0, 404, "{path}");
    }
    let (s, v) = api
        .call(
            "bob",
            "GET",
            "/v1/submissions?email=alice%40example.org",
            &null,
        )
        .await;
    assert_eq!((s, v.as_array().unwrap().len()), (200, 0), "{v}");
    let (s, v) = api
        .call("alice", "POST", "/v1/submissions/api-hello/run", &null)
        .await;
    assert_eq!(s, 202, "{v}");
    let job = v["job"].as_i64().unwrap();
    assert_eq!(
        api.call("alice", "POST", "/v1/submissions/api-hello/run", &null)
            .await
            .1["job"],
        job,
        "a second run while queued is the same job"
    );
    assert_eq!(
        api.call("alice", "POST", "/v1/submissions/api-broken/run", &null)
            .await
            .0,
        202
    );
    // The code job is an ordinary job of alice's.
    assert_eq!(
        api.call("alice", "GET", &format!("/v1/jobs/{job}"), &null)
            .await
            .0,
        200
    );
    let out = api
        .command(BIN, &["run", "--once", "--queues", "code"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (s, v) = api
        .call("alice", "GET", "/v1/submissions/api-hello", &null)
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        (v["status"].as_str(), v["stdout"].as_str()),
        (Some("Accepted"), Some("hi api\n")),
        "{v}"
    );
    let (_, v) = api
        .call("alice", "GET", "/v1/submissions/api-broken", &null)
        .await;
    assert_eq!(
        (v["status"].as_str(), v["disabled"].as_bool()),
        (Some("Compilation Error"), Some(true)),
        "{v}"
    );
    assert_eq!(
        api.call("alice", "POST", "/v1/submissions/api-broken/run", &null)
            .await
            .0,
        409
    );
    let (s, v) = api
        .call("alice", "POST", "/v1/submissions/api-broken/enable", &null)
        .await;
    assert_eq!((s, v["disabled"].as_bool()), (200, Some(false)), "{v}");
    assert_eq!(
        api.call("alice", "POST", "/v1/submissions/api-broken/run", &null)
            .await
            .0,
        202
    );
    let (s, v) = api
        .call(
            "alice",
            "GET",
            "/v1/submissions?email=alice%40example.org",
            &null,
        )
        .await;
    assert_eq!(s, 200);
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["api-hello", "api-broken"]);
    // An admin sees them all.
    assert_eq!(
        api.call("root", "GET", "/v1/submissions/api-hello", &null)
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn the_whole_output_is_served_from_the_output_storage() {
    let api = Api::home(None, "");
    let store_dir = api.dir.path().join("outputs");
    let text = std::fs::read_to_string(&api.config).unwrap().replacen(
        "[jobs]\n",
        "[jobs]\noutput_cap_bytes = 1000\noutput_storage = \"outputs\"\n",
        1,
    );
    std::fs::write(
        &api.config,
        format!(
            "{text}\n[storage.outputs]\nurl = \"{}\"\ncreate_root = true\n\n[tasks.long]\ncommand = [\"seq\", \"1\", \"100000\"]\n",
            store_dir.display()
        ),
    )
    .unwrap();
    let api = api.start();
    let null = serde_json::Value::Null;
    let (s, v) = api
        .call(
            "alice",
            "POST",
            "/v1/jobs",
            &serde_json::json!({"task": "long"}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_i64().unwrap();
    let path = format!("/v1/jobs/{id}/output/stdout");
    assert_eq!(
        api.call("alice", "GET", &path, &null).await.0,
        409,
        "not run yet"
    );
    let out = api.command(BIN, &["run", "--once"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let (s, body) = api.call("alice", "GET", &path, &null).await;
    assert_eq!(s, 200);
    let want = String::from_utf8(
        Command::new("seq")
            .args(["1", "100000"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let got = body.as_str().unwrap();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "the whole stdout, byte for byte");
    // A stream that stayed in the row comes from the row; others see nothing.
    let (s, body) = api
        .call(
            "alice",
            "GET",
            &format!("/v1/jobs/{id}/output/stderr"),
            &null,
        )
        .await;
    assert_eq!((s, body.as_str()), (200, Some("")));
    assert_eq!(api.call("bob", "GET", &path, &null).await.0, 404);
    assert_eq!(
        api.call("alice", "GET", &format!("/v1/jobs/{id}/output/both"), &null)
            .await
            .0,
        404
    );
    // No download is left behind.
    let left: Vec<_> = std::fs::read_dir(api.dir.path().join("data/job-output"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("api-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn serve_without_users_or_with_a_short_key_exits_78_before_listening() {
    let api = Api::home(None, "");
    let text = std::fs::read_to_string(&api.config).unwrap();
    let no_users: String = text
        .split("\n[")
        .filter(|s| !s.starts_with("jobs.users"))
        .collect::<Vec<_>>()
        .join("\n[");
    std::fs::write(&api.config, no_users).unwrap();
    let out = api
        .command(BIN, &["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("jobs.users"),
        "{out:?}"
    );
    let api = Api::home(None, "");
    let out = api
        .command(BIN, &["serve", "--listen", "127.0.0.1:0"])
        .env("BOB_KEY", "short")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("jobs.users.bob.key"), "{err}");
    assert!(!err.contains("short"), "the key is not echoed: {err}");
}

/// `code-submit` with `[jobs] api_url`: submit, wait and read the result through a
/// remote server while a worker runs the job; a wrong key exits 78.
#[test]
fn code_submit_adds_runs_and_reads_submissions_through_a_remote_serve() {
    let server = Api::home(None, "\n[mail]\nfrom = \"labrelay@example.org\"\n").start();
    let client = Api::home(None, "");
    client.use_api_of(&server, "alice");
    let _worker = server.worker(&["--queues", "code"]);
    let src = client.dir.path().join("sum.py");
    std::fs::write(&src, "print(sum(map(int, input().split())))\n").unwrap();
    let input = client.dir.path().join("in.txt");
    std::fs::write(&input, "40 2\n").unwrap();
    let run = |args: &[&str]| client.command(&SUBMIT, args).output().unwrap();
    let out = run(&[
        "add",
        src.to_str().unwrap(),
        "--email",
        "alice@example.org",
        "--stdin",
        input.to_str().unwrap(),
        "--id",
        "remote-sum",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "remote-sum");
    let out = run(&["--json", "run", "remote-sum", "--wait"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["status"].as_str(), v["stdout"].as_str()),
        (Some("Accepted"), Some("42\n")),
        "{v}"
    );
    let out = run(&["status", "--email", "alice@example.org"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("remote-sum  python  Accepted"),
        "{out:?}"
    );
    for (args, code, says) in [
        (vec!["run", "nope"], 1, "no such submission: nope"),
        (vec!["status", "nope"], 1, "no such submission: nope"),
        (vec!["enable", "nope"], 1, "no such submission: nope"),
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{out:?}"
        );
    }
    let out = run(&[
        "add",
        src.to_str().unwrap(),
        "--email",
        "alice@example.org",
        "--id",
        "remote-sum",
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exists already"),
        "{out:?}"
    );
}

/// A client home whose languages run on a remote engine: write files in it and run
/// `code-submit --json exec` there.
struct EngineClient(Api);

impl EngineClient {
    fn file(&self, name: &str, text: &str) -> String {
        let p = self.0.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    }

    fn exec(&self, args: &[&str]) -> (Option<i32>, serde_json::Value) {
        let out = self.0.command(&SUBMIT, args).output().unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{args:?}: {out:?}"));
        (out.status.code(), v)
    }

    /// A C compile error and a non-zero exit through the engine, as language `lang`.
    fn c_failures(&self, lang: &str) {
        let c = self.file("bad.c", "int main(void) { return nope; }\n");
        let (code, v) = self.exec(&["--json", "exec", &c, "--language", lang]);
        assert_eq!(
            (code, v["status"].as_str()),
            (Some(1), Some("Compilation Error")),
            "{v}"
        );
        assert!(
            v["compile_output"].as_str().unwrap().contains("nope"),
            "{v}"
        );
        let c = self.file("crash.c", "int main(void) { return 7; }\n");
        let (_, v) = self.exec(&["--json", "exec", &c, "--language", lang]);
        assert_eq!(
            (v["status"].as_str(), v["exit_code"].as_i64()),
            (Some("Runtime Error"), Some(7)),
            "{v}"
        );
    }

    /// The engine refuses the request (401): an Internal Error that says so, no run.
    fn refused(&self, file: &str, lang: &str) {
        let (code, v) = self.exec(&["--json", "exec", file, "--language", lang]);
        assert_eq!(
            (code, v["status"].as_str()),
            (Some(1), Some("Internal Error")),
            "{v}"
        );
        assert!(v["message"].as_str().unwrap().contains("401"), "{v}");
    }
}

#[test]
fn a_language_can_run_on_a_remote_piston_compatible_engine() {
    // The engine: another labrelay's serve, which answers Piston's execute request.
    let engine = Api::home(None, "").start();
    let url = format!("{}/api/v2/execute", engine.base);
    let client = EngineClient(Api::home(
        None,
        &format!(
            "\n[languages.rpython]\nsource = \"main.py\"\nrun = [\"python3\"]\n\
             remote = {{ url = \"{url}\", language = \"python\", user = \"alice\", key = \"env:ALICE_KEY\" }}\n\
             [languages.rc]\nsource = \"main.c\"\nrun = [\"./main\"]\n\
             remote = {{ url = \"{url}\", language = \"c\", user = \"alice\", key = \"env:ALICE_KEY\" }}\n\
             [languages.unsigned]\nsource = \"main.py\"\nrun = [\"python3\"]\n\
             remote = {{ url = \"{url}\", language = \"python\" }}\n"
        ),
    ));
    let py = client.file(
        "a.py",
        "import sys\nprint(sys.stdin.read().strip()[::-1])\n",
    );
    let input = client.file("in.txt", "remote\n");
    let (code, v) = client.exec(&[
        "--json",
        "exec",
        &py,
        "--language",
        "rpython",
        "--stdin",
        &input,
    ]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(
        (v["status"].as_str(), v["stdout"].as_str()),
        (Some("Accepted"), Some("etomer\n")),
        "{v}"
    );
    assert!(v["limits"].as_str().unwrap().ends_with("(remote)"), "{v}");
    client.c_failures("rc");
    client.refused(&py, "unsigned");
    // `languages` shows where a remote language runs.
    let out = client.0.command(&SUBMIT, &["languages"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&url),
        "{out:?}"
    );
}

#[test]
fn a_language_can_run_on_a_remote_judge0_compatible_engine() {
    // The engine: another labrelay's serve, which answers Judge0's submissions; the
    // client maps Judge0's fields (no labrelay report in these answers).
    let engine = Api::home(None, "").start();
    let url = format!("{}/submissions", engine.base);
    let client = EngineClient(Api::home(
        None,
        &format!(
            "\n[languages.jpython]\nsource = \"main.py\"\nrun = [\"python3\"]\n\
             remote = {{ api = \"judge0\", url = \"{url}\", language_id = 71, user = \"alice\", key = \"env:ALICE_KEY\" }}\n\
             [languages.c]\nsource = \"main.c\"\nrun = [\"./main\"]\n\
             remote = {{ api = \"judge0\", url = \"{url}\", user = \"alice\", key = \"env:ALICE_KEY\" }}\n\
             [languages.token]\nsource = \"main.py\"\nrun = [\"python3\"]\n\
             remote = {{ api = \"judge0\", url = \"{url}\", language_id = 71, key = \"env:ALICE_KEY\" }}\n"
        ),
    ));
    // UTF-8 both ways through base64.
    let py = client.file(
        "a.py",
        "import sys\nprint(sys.stdin.read().strip()[::-1], '样品')\n",
    );
    let input = client.file("in.txt", "judge\n");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--json",
            "exec",
            &py,
            "--language",
            "jpython",
            "--stdin",
            &input,
        ];
        args.extend_from_slice(extra);
        client.exec(&args)
    };
    let (code, v) = run(&[]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(
        (
            v["status"].as_str(),
            v["stdout"].as_str(),
            v["limits"].as_str()
        ),
        (Some("Accepted"), Some("egduj 样品\n"), Some("remote")),
        "{v}"
    );
    // The expected output goes to the engine, which judges.
    let want = client.file("want.txt", "something else\n");
    let (code, v) = run(&["--expected", &want]);
    assert_eq!(
        (code, v["status"].as_str()),
        (Some(1), Some("Wrong Answer")),
        "{v}"
    );
    // A compile error, a non-zero exit and a signal, by Judge0's status ids.
    client.c_failures("c");
    let c = client.file("segv.c", "int main(void) { return *(volatile int *)0; }\n");
    let (_, v) = client.exec(&["--json", "exec", &c, "--language", "c"]);
    assert_eq!(
        (v["status"].as_str(), v["signal"].as_i64()),
        (Some("Runtime Error"), Some(11)),
        "{v}"
    );
    // Judge0's token header is not a labrelay signature: refused.
    client.refused(&py, "token");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The ids it answers, and what it refuses.
    let (status, langs) =
        rt.block_on(engine.call("alice", "GET", "/languages", &serde_json::Value::Null));
    assert_eq!(status, 200, "{langs}");
    let ids: Vec<i64> = langs
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["id"].as_i64())
        .collect();
    assert!(ids.contains(&71) && ids.contains(&50), "{langs}");
    let body = serde_json::json!({"source_code": "print(1)", "language_id": 71});
    let (status, v) = rt.block_on(engine.call("alice", "POST", "/submissions", &body));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("wait=true"), "{v}");
    let (status, v) = rt.block_on(engine.call("alice", "POST", "/submissions?wait=true", &body));
    assert_eq!((status, v["stdout"].as_str()), (201, Some("1\n")), "{v}");
    assert_eq!(v["status"]["id"], 3, "{v}");
    let unknown = serde_json::json!({"source_code": "x", "language_id": 9999});
    let (status, v) = rt.block_on(engine.call("alice", "POST", "/submissions?wait=true", &unknown));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("9999"), "{v}");
}

#[test]
fn code_submit_talks_to_a_remote_serve_with_the_users_key() {
    let Some(pg) = test_support::require("PG_URL") else {
        return;
    };
    let server = Api::home(Some(pg.clone()), "").start();
    let client = Api::home(Some(pg), "");
    client.use_api_of(&server, "alice");
    // The worker runs on the server's home (same queue), the submitter is remote.
    let _worker = server.worker(&["--concurrency", "2"]);
    let out = client
        .command(
            &SUBMIT,
            &[
                "task",
                "echo",
                "--arg",
                "sample=remote-1",
                "--wait",
                "--timeout",
                "60",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"sample":"remote-1"}"#
    );
    // Plain submit prints the id; the job belongs to alice.
    let out = client
        .command(
            &SUBMIT,
            &["--json", "task", "echo", "--arg", "sample=remote-2"],
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = v["id"].as_i64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = server
            .command(BIN, &["--json", "status", &id.to_string()])
            .output()
            .unwrap();
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["submitter"], "alice");
        if j["state"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < deadline, "{j}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // --each: one batch request for all lines, not one per line; the jobs are alice's
    // and run.
    let lines = client.dir.path().join("each.jsonl");
    let each = |text: &str| {
        std::fs::write(&lines, text).unwrap();
        client
            .command(
                &SUBMIT,
                &["task", "echo", "--each", lines.to_str().unwrap()],
            )
            .output()
            .unwrap()
    };
    let out =
        each("{\"sample\": \"each-1\"}\n\n{\"sample\": \"each-2\"}\n{\"sample\": \"each-3\"}\n");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let ids: Vec<i64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{out:?}");
    for (n, id) in ids.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = server
                .command(BIN, &["--json", "result", &id.to_string()])
                .output()
                .unwrap();
            if out.status.code() == Some(0) {
                let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(j["result"]["sample"], format!("each-{}", n + 1), "{j}");
                break;
            }
            assert!(Instant::now() < deadline, "{out:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let metrics = tokio::runtime::Runtime::new().unwrap().block_on(async {
        reqwest::get(format!("{}/metrics", server.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    assert!(
        metrics.contains(
            r#"labrelay_api_requests_total{method="POST",route="/v1/jobs/batch",status="201"} 1"#
        ),
        "{metrics}"
    );
    // A bad line is found before anything is sent.
    let out = each("{\"sample\": \"ok\"}\n[1, 2]\n");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2: not a JSON object"));
    // An unknown task is the server's 400: a usage error here.
    let out = client.command(&SUBMIT, &["task", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no task named `nope`"));
    // A wrong key: refused, exit 78, the key never printed.
    let out = client
        .command(&SUBMIT, &["task", "echo", "--arg", "sample=x"])
        .env("ALICE_KEY", "wrong-key-0000000000")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused"), "{err}");
    assert!(!err.contains("wrong-key"), "{err}");
    // A server that is not there: temporary, exit 75.
    drop(server);
    let out = client
        .command(&SUBMIT, &["task", "echo", "--arg", "sample=x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{out:?}");
}
