//! `code-submit`'s side of the HTTP API: with `[jobs] api_url` set, submissions and
//! status requests go to `job-worker serve`, signed with the user's key, instead of to
//! the state database.

use std::time::Duration;

use labrelay::config::ConfigError;
use labrelay::exit::Exit;
use labrelay::secret::Secret;

use crate::JobError;
use crate::api::{self, SubmitRequest, Submitted};
use crate::config::JobsConfig;

/// What went wrong talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The server could not be reached or did not answer in time (exit 75).
    #[error("{url}: {message}")]
    Unreachable {
        /// Where.
        url: String,
        /// Why.
        message: String,
    },
    /// The server refused the signature or the user (exit 78: a key or clock problem).
    #[error("{url}: refused: {message} (check [jobs] api_user, api_key and the clock)")]
    Refused {
        /// Where.
        url: String,
        /// The server's reason.
        message: String,
    },
    /// The server refused the request itself (exit 2).
    #[error("{0}")]
    Invalid(String),
    /// The server failed (exit 75).
    #[error("{url}: the server answered {status}: {message}")]
    Server {
        /// Where.
        url: String,
        /// HTTP status.
        status: u16,
        /// Its message.
        message: String,
    },
}

impl labrelay::exit::ExitClass for ApiError {
    fn exit_class(&self) -> Exit {
        match self {
            ApiError::Unreachable { .. } | ApiError::Server { .. } => Exit::TempFail,
            ApiError::Refused { .. } => Exit::Config,
            ApiError::Invalid(_) => Exit::Usage,
        }
    }
}
labrelay::exit_class!(ApiError);

/// A signed-request client of one `job-worker serve`.
pub struct Client {
    http: reqwest::Client,
    base: String,
    user: String,
    key: Secret,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// The client of `[jobs] api_url`, or `None` when it is not set. A missing key or
    /// a bad user name is a configuration error.
    pub fn from_config(settings: &JobsConfig) -> Result<Option<Client>, ConfigError> {
        let Some(url) = &settings.api_url else {
            return Ok(None);
        };
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.into(),
            message,
        };
        let spec = settings.api_key.as_ref().ok_or_else(|| {
            invalid(
                "jobs.api_key",
                "required with jobs.api_url (env:NAME or file:PATH)".into(),
            )
        })?;
        let key = spec
            .resolve()
            .map_err(|e| invalid("jobs.api_key", e.to_string()))?;
        let user = settings
            .api_user
            .clone()
            .unwrap_or_else(crate::current_user);
        if !api::is_user_name(&user) {
            return Err(invalid(
                "jobs.api_user",
                format!("`{user}` is not a user name (1 to 64 of A-Z a-z 0-9 . _ @ -)"),
            ));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_mins(1))
            .build()
            .map_err(|e| invalid("jobs.api_url", e.to_string()))?;
        Ok(Some(Client {
            http,
            base: url.trim_end_matches('/').to_owned(),
            user,
            key,
        }))
    }

    /// One signed request; the JSON answer of a 2xx, or the error it stands for.
    async fn call(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<serde_json::Value> {
        let url = reqwest::Url::parse(&format!("{}{path_and_query}", self.base))
            .map_err(|e| ApiError::Invalid(format!("{}{path_and_query}: {e}", self.base)))?;
        let shown = format!("{} {}", method, url.path());
        let body = body.unwrap_or_default();
        let ts = chrono::Utc::now().timestamp();
        let auth = api::authorization(
            &self.user,
            &self.key,
            &api::Target {
                method: method.as_str(),
                path: url.path(),
                query: url.query().unwrap_or(""),
                body: &body,
            },
            ts,
            &api::new_nonce(),
        );
        let mut req = self
            .http
            .request(method, url)
            .header(reqwest::header::AUTHORIZATION, auth);
        if !body.is_empty() {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let resp = req.send().await.map_err(|e| ApiError::Unreachable {
            url: shown.clone(),
            message: labrelay::secret::scrub(&e.to_string()).into_owned(),
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| ApiError::Unreachable {
            url: shown.clone(),
            message: e.to_string(),
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        if status.is_success() {
            return Ok(value);
        }
        let message = value
            .get("error")
            .and_then(serde_json::Value::as_str)
            .map_or_else(|| value.to_string(), str::to_owned);
        Err(match status.as_u16() {
            409 if value.get("state").is_some() => JobError::NotFinished {
                id: value
                    .get("id")
                    .and_then(serde_json::Value::as_i64)
                    .unwrap_or_default(),
                state: value["state"].as_str().unwrap_or_default().to_owned(),
            }
            .into(),
            401 | 403 => ApiError::Refused {
                url: shown,
                message,
            }
            .into(),
            400 | 409 | 413 | 415 | 422 => ApiError::Invalid(message).into(),
            s => ApiError::Server {
                url: shown,
                status: s,
                message,
            }
            .into(),
        })
    }

    /// Submit a task.
    pub async fn submit(&self, req: &SubmitRequest) -> anyhow::Result<Submitted> {
        let body = serde_json::to_vec(req)?;
        let v = self
            .call(reqwest::Method::POST, "/v1/jobs", Some(body))
            .await?;
        Ok(serde_json::from_value(v)?)
    }

    /// Submit `reqs` (no unique keys) in batches of at most [`crate::api::MAX_BATCH`]
    /// jobs and 512 KiB each; the ids in order. A failed batch ends it: its error says
    /// how many jobs the earlier batches submitted.
    pub async fn submit_many(&self, reqs: &[SubmitRequest]) -> anyhow::Result<Vec<i64>> {
        const MAX_BYTES: usize = 512 * 1024;
        let mut ids = Vec::with_capacity(reqs.len());
        let mut rest = reqs;
        while !rest.is_empty() {
            let (mut n, mut bytes) = (0, 0);
            while n < rest.len() && n < crate::api::MAX_BATCH {
                let size = serde_json::to_vec(&rest[n])?.len() + 1;
                if n > 0 && bytes + size > MAX_BYTES {
                    break;
                }
                bytes += size;
                n += 1;
            }
            let body = serde_json::to_vec(&crate::api::BatchRequest {
                jobs: rest[..n].to_vec(),
            })?;
            let v = self
                .call(reqwest::Method::POST, "/v1/jobs/batch", Some(body))
                .await
                .map_err(|e| {
                    if ids.is_empty() {
                        e
                    } else {
                        e.context(format!(
                            "{} of the {} jobs were submitted before this failure",
                            ids.len(),
                            reqs.len()
                        ))
                    }
                })?;
            let got: crate::api::BatchSubmitted = serde_json::from_value(v)?;
            ids.extend(got.ids);
            rest = &rest[n..];
        }
        Ok(ids)
    }

    async fn get_job(&self, path: String, id: i64) -> anyhow::Result<serde_json::Value> {
        match self.call(reqwest::Method::GET, &path, None).await {
            Err(e)
                if matches!(
                    e.downcast_ref::<ApiError>(),
                    Some(ApiError::Server { status: 404, .. })
                ) =>
            {
                Err(JobError::NoSuchJob(id).into())
            }
            other => other,
        }
    }

    /// A job's summary (no output).
    pub async fn job(&self, id: i64) -> anyhow::Result<serde_json::Value> {
        self.get_job(format!("/v1/jobs/{id}"), id).await
    }

    /// A finished job's result: id, state, exit_code, result, stdout, stderr, error.
    pub async fn result(&self, id: i64) -> anyhow::Result<serde_json::Value> {
        self.get_job(format!("/v1/jobs/{id}/result"), id).await
    }

    /// A submission call: 404 is "no such submission", 409 (exists, disabled) a failure
    /// (exit 1) with the server's words.
    async fn submission_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        id: &str,
    ) -> anyhow::Result<serde_json::Value> {
        match self.call(method, path, body).await {
            Err(e) => match e.downcast_ref::<ApiError>() {
                Some(ApiError::Server { status: 404, .. }) => {
                    Err(anyhow::anyhow!("no such submission: {id}"))
                }
                Some(ApiError::Invalid(m))
                    if m.contains("exists already") || m.contains("disabled") =>
                {
                    Err(anyhow::anyhow!("{m}"))
                }
                _ => Err(e),
            },
            ok => ok,
        }
    }

    /// Add a code submission; its record.
    pub async fn add_submission(
        &self,
        req: &crate::code::AddRequest,
    ) -> anyhow::Result<crate::code::Submission> {
        let id = req.id.clone().unwrap_or_default();
        let v = self
            .submission_call(
                reqwest::Method::POST,
                "/v1/submissions",
                Some(serde_json::to_vec(req)?),
                &id,
            )
            .await?;
        Ok(serde_json::from_value(v)?)
    }

    /// One submission, with its `link`.
    pub async fn submission(&self, id: &str) -> anyhow::Result<serde_json::Value> {
        let path = format!("/v1/submissions/{}", enc(id));
        self.submission_call(reqwest::Method::GET, &path, None, id)
            .await
    }

    /// Every submission of `email` the user may see.
    pub async fn submissions(&self, email: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let path = format!("/v1/submissions?email={}", enc(email));
        let v = self.call(reqwest::Method::GET, &path, None).await?;
        Ok(serde_json::from_value(v)?)
    }

    /// Queue a run; the job id.
    pub async fn run_submission(&self, id: &str) -> anyhow::Result<i64> {
        let path = format!("/v1/submissions/{}/run", enc(id));
        let v = self
            .submission_call(reqwest::Method::POST, &path, None, id)
            .await?;
        v.get("job")
            .and_then(serde_json::Value::as_i64)
            .ok_or_else(|| anyhow::anyhow!("the server's answer has no job: {v}"))
    }

    /// Allow another run.
    pub async fn enable_submission(&self, id: &str) -> anyhow::Result<serde_json::Value> {
        let path = format!("/v1/submissions/{}/enable", enc(id));
        self.submission_call(reqwest::Method::POST, &path, None, id)
            .await
    }
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
