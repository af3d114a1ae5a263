//! Where a submission runs: the local sandbox, or a remote Piston-compatible engine
//! (`[languages.NAME] remote`): Piston's `POST /api/v2/execute`, which another labrelay's
//! `job-worker serve` also answers (signed, and with its whole report).

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
        return piston(&remote, &lang, &input).await;
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

/// Run on a Piston-compatible engine.
async fn piston(remote: &RemoteConfig, lang: &Language, input: &Input) -> Report {
    let label = "remote";
    let body = piston_request(remote, lang, input).to_string();
    let url = match reqwest::Url::parse(&remote.url) {
        Ok(u) => u,
        Err(e) => return Report::internal(format!("{}: {e}", remote.url), label),
    };
    let timeout = remote.timeout_secs.map_or_else(
        || Duration::from_secs_f64(lang.compile_limits.wall_secs + input.limits.wall_secs + 30.0),
        Duration::from_secs,
    );
    let http = match reqwest::Client::builder().timeout(timeout).build() {
        Ok(c) => c,
        Err(e) => return Report::internal(format!("HTTP client: {e}"), label),
    };
    let mut req = http
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    if let (Some(user), Some(key)) = (&remote.user, &remote.key) {
        let key = match key.resolve() {
            Ok(k) => k,
            Err(e) => return Report::internal(format!("remote engine key: {e}"), label),
        };
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
    }
    let shown = format!("{}{}", url.host_str().unwrap_or(""), url.path());
    let resp = match req.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            return Report::internal(
                format!(
                    "remote engine {shown}: {}",
                    labrelay::secret::scrub(&e.to_string())
                ),
                label,
            );
        }
    };
    let status = resp.status();
    let v: serde_json::Value = match resp.json().await {
        Ok(v) => v,
        Err(e) => return Report::internal(format!("remote engine {shown}: {e}"), label),
    };
    if !status.is_success() {
        let why = v
            .get("message")
            .or_else(|| v.get("error"))
            .and_then(serde_json::Value::as_str)
            .unwrap_or("no reason given");
        return Report::internal(
            format!("remote engine {shown} answered {status}: {why}"),
            label,
        );
    }
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
}
