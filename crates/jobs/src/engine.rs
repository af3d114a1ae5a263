//! Where a submission runs: the local sandbox, or a remote engine
//! (`[languages.NAME] remote`): Piston's `POST /api/v2/execute` or Judge0's
//! `POST /submissions`, both of which another labrelay's `job-worker serve` also answers
//! (signed; Piston's with its whole report).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use sandbox::config::RemoteConfig;
use sandbox::{Language, Limits, Report, Sandbox, Status};

/// One run's input.
#[derive(Debug, Clone)]
pub struct Input {
    /// The code.
    pub source: Vec<u8>,
    /// stdin.
    pub stdin: Option<Vec<u8>>,
    /// The expected output.
    pub expected: Option<Vec<u8>>,
    /// Limits of the run step.
    pub limits: Limits,
}

/// Run `input` in `lang`: on its remote engine when it has one, else in `local` (or an
/// Internal Error saying why there is no sandbox here). `cancel` stops a local run.
pub async fn execute(
    local: Result<Arc<Sandbox>, String>,
    lang: Language,
    input: Input,
    cancel: Arc<AtomicBool>,
) -> Report {
    if let Some(remote) = lang.remote.clone() {
        return if remote.api == "judge0" {
            judge0(&remote, &lang, &input).await
        } else {
            piston(&remote, &lang, &input).await
        };
    }
    let sb = match local {
        Ok(sb) => sb,
        Err(why) => return Report::internal(format!("no sandbox here: {why}"), "none"),
    };
    let run = tokio::task::spawn_blocking(move || {
        sb.run(
            &sandbox::Request {
                language: &lang,
                source: &input.source,
                stdin: input.stdin.as_deref(),
                expected: input.expected.as_deref(),
                limits: input.limits,
            },
            &cancel,
        )
    });
    match run.await {
        Ok(r) => r,
        Err(e) => Report::internal(format!("the sandbox thread failed: {e}"), "none"),
    }
}

/// The Piston request for `input`.
pub fn piston_request(remote: &RemoteConfig, lang: &Language, input: &Input) -> serde_json::Value {
    let ms = |s: f64| (s * 1000.0).round() as u64;
    serde_json::json!({
        "language": remote.language.clone().unwrap_or_else(|| lang.key.clone()),
        "version": remote.version,
        "files": [{"name": lang.source, "content": String::from_utf8_lossy(&input.source)}],
        "stdin": input.stdin.as_deref().map(String::from_utf8_lossy).unwrap_or_default(),
        "args": [],
        "compile_timeout": ms(lang.compile_limits.wall_secs),
        "run_timeout": ms(input.limits.wall_secs),
        "compile_memory_limit": lang.compile_limits.memory_mib << 20,
        "run_memory_limit": input.limits.memory_mib << 20,
    })
}

/// Post `body` to the engine at `url` (signed as the configured user, or with Judge0's
/// token) and return its JSON answer; an Internal Error report when there is none.
async fn post(
    remote: &RemoteConfig,
    lang: &Language,
    input: &Input,
    url: reqwest::Url,
    body: String,
) -> Result<serde_json::Value, Report> {
    let label = "remote";
    let timeout = remote.timeout_secs.map_or_else(
        || Duration::from_secs_f64(lang.compile_limits.wall_secs + input.limits.wall_secs + 30.0),
        Duration::from_secs,
    );
    let http = reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .map_err(|e| Report::internal(format!("HTTP client: {e}"), label))?;
    let mut req = http
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    if let Some(key) = &remote.key {
        let key = key
            .resolve()
            .map_err(|e| Report::internal(format!("remote engine key: {e}"), label))?;
        if let Some(user) = &remote.user {
            let auth = crate::api::authorization(
                user,
                &key,
                &crate::api::Target {
                    method: "POST",
                    path: url.path(),
                    query: url.query().unwrap_or(""),
                    body: body.as_bytes(),
                },
                chrono::Utc::now().timestamp(),
                &crate::api::new_nonce(),
            );
            req = req.header(reqwest::header::AUTHORIZATION, auth);
        } else {
            // Judge0's token (checked when the configuration loads: judge0 only).
            let mut token = reqwest::header::HeaderValue::from_str(key.expose())
                .map_err(|_| Report::internal("remote engine key: not a header value", label))?;
            token.set_sensitive(true);
            req = req.header("X-Auth-Token", token);
        }
    }
    let shown = format!("{}{}", url.host_str().unwrap_or(""), url.path());
    let resp = req.body(body).send().await.map_err(|e| {
        Report::internal(
            format!(
                "remote engine {shown}: {}",
                labrelay::secret::scrub(&e.to_string())
            ),
            label,
        )
    })?;
    let status = resp.status();
    let v: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| Report::internal(format!("remote engine {shown}: {e}"), label))?;
    if !status.is_success() {
        let why = v
            .get("message")
            .or_else(|| v.get("error"))
            .and_then(serde_json::Value::as_str)
            .map_or_else(|| v.to_string(), str::to_owned);
        return Err(Report::internal(
            format!("remote engine {shown} answered {status}: {why}"),
            label,
        ));
    }
    Ok(v)
}

/// Run on a Piston-compatible engine.
async fn piston(remote: &RemoteConfig, lang: &Language, input: &Input) -> Report {
    let body = piston_request(remote, lang, input).to_string();
    let url = match reqwest::Url::parse(&remote.url) {
        Ok(u) => u,
        Err(e) => return Report::internal(format!("{}: {e}", remote.url), "remote"),
    };
    let v = match post(remote, lang, input, url, body).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    // Another labrelay sends its whole report.
    if let Some(r) = v
        .get("labrelay")
        .and_then(|r| serde_json::from_value::<Report>(r.clone()).ok())
    {
        let mut r = r;
        r.limits = format!("{} (remote)", r.limits);
        return r;
    }
    from_piston(&v, input)
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A base64 field of a Judge0 answer (line breaks allowed, as Judge0 sends them).
fn unb64(v: &serde_json::Value, k: &str) -> String {
    use base64::Engine as _;
    let Some(s) = v.get(k).and_then(serde_json::Value::as_str) else {
        return String::new();
    };
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    match base64::engine::general_purpose::STANDARD.decode(compact) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(_) => s.to_owned(),
    }
}

/// The Judge0 request for `input` (base64 fields; the limits in Judge0's units).
pub fn judge0_request(language_id: u32, input: &Input) -> serde_json::Value {
    let mut v = serde_json::json!({
        "source_code": b64(&input.source),
        "language_id": language_id,
        "stdin": b64(input.stdin.as_deref().unwrap_or_default()),
        "cpu_time_limit": input.limits.time_secs,
        "wall_time_limit": input.limits.wall_secs,
        "memory_limit": input.limits.memory_mib * 1024,
    });
    if let Some(e) = &input.expected {
        v["expected_output"] = serde_json::Value::String(b64(e));
    }
    v
}

/// Run on a Judge0-compatible engine: `POST {url}?base64_encoded=true&wait=true`.
async fn judge0(remote: &RemoteConfig, lang: &Language, input: &Input) -> Report {
    let Some(id) = remote.judge0_language_id(&lang.key) else {
        return Report::internal(format!("no Judge0 id for {}", lang.key), "remote");
    };
    let mut url = match reqwest::Url::parse(&remote.url) {
        Ok(u) => u,
        Err(e) => return Report::internal(format!("{}: {e}", remote.url), "remote"),
    };
    url.query_pairs_mut()
        .append_pair("base64_encoded", "true")
        .append_pair("wait", "true");
    let body = judge0_request(id, input).to_string();
    match post(remote, lang, input, url, body).await {
        Ok(v) => from_judge0(&v),
        Err(r) => r,
    }
}

/// Judge0's status id and description for a report.
pub fn judge0_status(r: &Report) -> (u32, &'static str) {
    match r.status {
        Status::InQueue => (1, "In Queue"),
        Status::Processing => (2, "Processing"),
        Status::Accepted => (3, "Accepted"),
        Status::WrongAnswer => (4, "Wrong Answer"),
        Status::TimeLimitExceeded => (5, "Time Limit Exceeded"),
        Status::CompilationError => (6, "Compilation Error"),
        Status::RuntimeError | Status::MemoryLimitExceeded | Status::OutputLimitExceeded => {
            match (r.signal, r.status) {
                (Some(11), _) => (7, "Runtime Error (SIGSEGV)"),
                (Some(25), _) => (8, "Runtime Error (SIGXFSZ)"),
                (Some(8), _) => (9, "Runtime Error (SIGFPE)"),
                (Some(6), _) => (10, "Runtime Error (SIGABRT)"),
                (None, Status::RuntimeError) => (11, "Runtime Error (NZEC)"),
                _ => (12, "Runtime Error (Other)"),
            }
        }
        Status::InternalError => (13, "Internal Error"),
    }
}

/// A report from a Judge0 answer with base64 fields (`base64_encoded=true`).
pub fn from_judge0(v: &serde_json::Value) -> Report {
    let mut r = Report::internal("", "remote");
    let id = v
        .get("status")
        .and_then(|s| s.get("id"))
        .and_then(serde_json::Value::as_u64);
    r.stdout = unb64(v, "stdout");
    r.stderr = unb64(v, "stderr");
    r.compile_output = unb64(v, "compile_output");
    let message = unb64(v, "message");
    r.message = (!message.is_empty()).then_some(message);
    r.exit_code = int(v, "exit_code");
    r.signal = int(v, "exit_signal").filter(|s| *s > 0);
    // Judge0 gives times as strings of seconds ("0.012") and memory in KiB.
    let secs = |k: &str| {
        v.get(k)
            .and_then(|x| {
                x.as_str()
                    .and_then(|s| s.parse::<f64>().ok())
                    .or(x.as_f64())
            })
            .map_or(0, |s| (s * 1000.0).round() as u64)
    };
    r.time_ms = secs("time");
    r.wall_ms = secs("wall_time");
    r.memory_kib = v
        .get("memory")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    r.status = match id {
        Some(3) => Status::Accepted,
        Some(4) => Status::WrongAnswer,
        Some(5) => Status::TimeLimitExceeded,
        Some(6) => Status::CompilationError,
        Some(7..=12) => Status::RuntimeError,
        Some(1 | 2) => {
            r.message = Some("the Judge0 engine did not wait for the run (enable its wait)".into());
            Status::InternalError
        }
        _ => {
            if r.message.is_none() {
                r.message = Some("the Judge0 engine's answer has no known status".into());
            }
            Status::InternalError
        }
    };
    r
}

fn int(v: &serde_json::Value, k: &str) -> Option<i32> {
    v.get(k)
        .and_then(serde_json::Value::as_i64)
        .and_then(|x| i32::try_from(x).ok())
}

fn text(v: &serde_json::Value, k: &str) -> String {
    v.get(k)
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// Signals by number and name (the same numbers on x86-64 and aarch64), for Piston's
/// `signal` field both ways.
const SIGNALS: &[(i32, &str)] = &[
    (1, "HUP"),
    (2, "INT"),
    (3, "QUIT"),
    (4, "ILL"),
    (6, "ABRT"),
    (8, "FPE"),
    (9, "KILL"),
    (11, "SEGV"),
    (13, "PIPE"),
    (14, "ALRM"),
    (15, "TERM"),
    (24, "XCPU"),
    (25, "XFSZ"),
];

/// `SIGKILL` for 9; `SIGn` for a signal without a name here.
pub fn signal_name(n: i32) -> String {
    SIGNALS
        .iter()
        .find(|(k, _)| *k == n)
        .map_or_else(|| format!("SIG{n}"), |(_, name)| format!("SIG{name}"))
}

/// 9 for `SIGKILL` (or `KILL`, or `SIG9`); 0 for a name unknown here.
pub fn signal_number(name: &str) -> i32 {
    let bare = name.trim_start_matches("SIG");
    SIGNALS
        .iter()
        .find(|(_, s)| *s == bare)
        .map(|(n, _)| *n)
        .or_else(|| bare.parse().ok())
        .unwrap_or(0)
}

/// A report from Piston's answer `{"run": {...}, "compile": {...}}`.
pub fn from_piston(v: &serde_json::Value, input: &Input) -> Report {
    let mut r = Report::internal("", "remote");
    r.message = None;
    let compile = v.get("compile").filter(|c| c.is_object());
    if let Some(c) = compile {
        r.compile_output = text(c, "output");
        let failed = int(c, "code") != Some(0) || c.get("signal").is_some_and(|s| !s.is_null());
        if failed {
            r.status = Status::CompilationError;
            r.exit_code = int(c, "code");
            r.message = c
                .get("message")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned);
            return r;
        }
    }
    let Some(run) = v.get("run").filter(|x| x.is_object()) else {
        r.message = Some("the remote engine's answer has no `run`".into());
        return r;
    };
    r.stdout = text(run, "stdout");
    r.stderr = text(run, "stderr");
    r.exit_code = int(run, "code");
    r.signal = run
        .get("signal")
        .and_then(serde_json::Value::as_str)
        .map(signal_number);
    let num = |k: &str| run.get(k).and_then(serde_json::Value::as_f64);
    r.time_ms = num("cpu_time").unwrap_or(0.0) as u64;
    r.wall_ms = num("wall_time").unwrap_or(0.0) as u64;
    r.memory_kib = (num("memory").unwrap_or(0.0) / 1024.0) as u64;
    r.message = run
        .get("message")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned);
    let status = run.get("status").and_then(serde_json::Value::as_str);
    r.status = match status {
        Some("TO") => Status::TimeLimitExceeded,
        Some("OL" | "EL") => Status::OutputLimitExceeded,
        Some("XX") => Status::InternalError,
        _ if r.signal.is_some() || r.exit_code != Some(0) => Status::RuntimeError,
        _ => match &input.expected {
            Some(e) if !sandbox::same_output(r.stdout.as_bytes(), e) => Status::WrongAnswer,
            _ => Status::Accepted,
        },
    };
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(expected: Option<&str>) -> Input {
        Input {
            source: Vec::new(),
            stdin: None,
            expected: expected.map(|e| e.as_bytes().to_vec()),
            limits: Limits::RUN,
        }
    }

    /// Answers in the shape Piston's documentation gives for `POST /api/v2/execute`.
    #[test]
    fn piston_answers_map_to_judge0_statuses() {
        let ok = serde_json::json!({"language": "python", "version": "3.10.0",
            "run": {"stdout": "hi\n", "stderr": "", "code": 0, "signal": null, "output": "hi\n"}});
        let r = from_piston(&ok, &input(None));
        assert_eq!((r.status, r.stdout.as_str()), (Status::Accepted, "hi\n"));
        assert_eq!(
            from_piston(&ok, &input(Some("ho"))).status,
            Status::WrongAnswer
        );
        let killed = serde_json::json!({"run": {"stdout": "", "stderr": "", "code": null,
            "signal": "SIGKILL", "status": "TO", "message": "Timeout", "output": ""}});
        let r = from_piston(&killed, &input(None));
        assert_eq!((r.status, r.signal), (Status::TimeLimitExceeded, Some(9)));
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!((signal_number("SIGXCPU"), signal_number("SIG31")), (24, 31));
        let crashed = serde_json::json!({"run": {"stdout": "", "stderr": "boom", "code": 3,
            "signal": null, "output": "boom"}});
        assert_eq!(
            from_piston(&crashed, &input(None)).status,
            Status::RuntimeError
        );
        let bad = serde_json::json!({"compile": {"stdout": "", "stderr": "error: x",
            "code": 1, "signal": null, "output": "error: x"},
            "run": {"stdout": "", "stderr": "", "code": null, "signal": null, "output": ""}});
        let r = from_piston(&bad, &input(None));
        assert_eq!(
            (r.status, r.compile_output.as_str()),
            (Status::CompilationError, "error: x")
        );
        let nothing = serde_json::json!({"message": "odd"});
        assert_eq!(
            from_piston(&nothing, &input(None)).status,
            Status::InternalError
        );
    }

    /// Answers in the shape Judge0's documentation gives for
    /// `POST /submissions?base64_encoded=true&wait=true`.
    #[test]
    fn judge0_answers_map_to_reports() {
        let ok = serde_json::json!({"stdout": "aGkK\n", "stderr": null, "compile_output": null,
            "message": null, "exit_code": 0, "exit_signal": null,
            "status": {"id": 3, "description": "Accepted"}, "time": "0.012",
            "wall_time": "0.05", "memory": 3456, "token": "x"});
        let r = from_judge0(&ok);
        assert_eq!(
            (
                r.status,
                r.stdout.as_str(),
                r.time_ms,
                r.wall_ms,
                r.memory_kib
            ),
            (Status::Accepted, "hi\n", 12, 50, 3456)
        );
        assert_eq!(r.message, None);
        let segv = serde_json::json!({"stdout": null, "stderr": null, "exit_code": null,
            "exit_signal": 11, "status": {"id": 7, "description": "Runtime Error (SIGSEGV)"}});
        let r = from_judge0(&segv);
        assert_eq!((r.status, r.signal), (Status::RuntimeError, Some(11)));
        assert_eq!(judge0_status(&r), (7, "Runtime Error (SIGSEGV)"));
        let ce = serde_json::json!({"compile_output": "bWFpbi5jOjE6IGVycm9y",
            "status": {"id": 6, "description": "Compilation Error"}});
        let r = from_judge0(&ce);
        assert_eq!(
            (r.status, r.compile_output.as_str()),
            (Status::CompilationError, "main.c:1: error")
        );
        let queued = serde_json::json!({"token": "x", "status": {"id": 1}});
        let r = from_judge0(&queued);
        assert_eq!(r.status, Status::InternalError);
        assert!(r.message.unwrap().contains("did not wait"));
        let mut nzec = from_judge0(&ok);
        nzec.status = Status::RuntimeError;
        nzec.exit_code = Some(3);
        assert_eq!(judge0_status(&nzec).0, 11);
        nzec.status = Status::MemoryLimitExceeded;
        nzec.signal = Some(9);
        assert_eq!(judge0_status(&nzec).0, 12);
        let req = judge0_request(71, &input(Some("x")));
        assert_eq!(req["language_id"], 71);
        assert_eq!(req["expected_output"], "eA==");
        assert_eq!(req["memory_limit"], Limits::RUN.memory_mib * 1024);
    }
}
