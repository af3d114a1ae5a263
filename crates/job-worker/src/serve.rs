//! `job-worker serve`: the HTTP API (submit, status, result, cancel, list, tasks) over
//! the job table, with signed requests (`jobs::api`), the OpenAPI document at
//! `/openapi.json` and Prometheus text at `/metrics`.
//!
//! Every `/v1/` request is authenticated before its handler runs: the signature covers
//! method, path, query, body hash, timestamp and nonce; the timestamp must be within
//! ±60 s of this clock; the nonce is recorded in the state database, so a replay is
//! refused by every serve process that shares it. A user sees and cancels only the
//! jobs it submitted (another user's job is "not found"); an admin sees all.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use jobs::api::{self, SubmitRequest, Submitted};
use jobs::store::{Cancelled, ListFilter, STATES};
use jobs::{Registry, Store};
use labrelay::config::ConfigError;
use labrelay::secret::Secret;

/// The OpenAPI document, kept in docs/ and served as is.
pub const OPENAPI: &str = include_str!("../../../docs/job-worker-api.json");

/// Request bodies larger than this are refused (413).
const MAX_BODY: usize = 1 << 20;

/// Most jobs one list request returns.
const MAX_LIST: i64 = 1000;

struct User {
    key: Secret,
    admin: bool,
}

/// Who made an authenticated request.
#[derive(Debug, Clone)]
struct Caller {
    name: String,
    admin: bool,
}

#[derive(Default)]
struct Metrics {
    /// (method, route, status) → count.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    /// reason → count.
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

/// What the submission endpoints need: the table, the sources, the languages.
pub struct CodeApi {
    /// The submissions table.
    pub submissions: jobs::code::Submissions,
    /// `[jobs] code_storage`.
    pub storage: labrelay::storage::AnyStorage,
    /// The sandbox's languages (to check a submission's language).
    pub settings: sandbox::Settings,
    /// The sandbox `POST /api/v2/execute` runs code in, or why there is none here.
    pub sandbox: Result<Arc<sandbox::Sandbox>, String>,
}

/// Everything a handler needs.
pub struct ApiState {
    store: Store,
    registry: Arc<Registry>,
    code: CodeApi,
    /// `[jobs] output_storage` and a folder for downloads from it.
    output: Option<(labrelay::storage::AnyStorage, std::path::PathBuf)>,
    users: BTreeMap<String, User>,
    mail_from: Option<String>,
    metrics: Metrics,
}

impl ApiState {
    /// The API over `store`, with the users of `[jobs.users]` (keys resolved now: a
    /// missing or short key is a configuration error, as is having no user at all).
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        code: CodeApi,
        mail_from: Option<String>,
    ) -> Result<ApiState, ConfigError> {
        let mut users = BTreeMap::new();
        for (name, u) in &registry.settings.users {
            let key = u.key.resolve().map_err(|e| ConfigError::Invalid {
                key: format!("jobs.users.{name}.key"),
                message: e.to_string(),
            })?;
            if key.expose().len() < api::MIN_KEY_LEN {
                return Err(ConfigError::Invalid {
                    key: format!("jobs.users.{name}.key"),
                    message: format!("at least {} characters", api::MIN_KEY_LEN),
                });
            }
            users.insert(
                name.clone(),
                User {
                    key,
                    admin: u.admin,
                },
            );
        }
        if users.is_empty() {
            return Err(ConfigError::Missing(
                "[jobs.users.NAME] key = \"env:...\" (nobody could use the API)".into(),
            ));
        }
        Ok(ApiState {
            store,
            registry,
            code,
            output: None,
            users,
            mail_from,
            metrics: Metrics::default(),
        })
    }
}

impl ApiState {
    /// Serve whole outputs kept in `storage` (`[jobs] output_storage`), downloading
    /// through temporary files in `dir`.
    #[must_use]
    pub fn with_output(
        mut self,
        storage: labrelay::storage::AnyStorage,
        dir: std::path::PathBuf,
    ) -> ApiState {
        self.output = Some((storage, dir));
        self
    }
}

/// An error answer: a status and `{"error": message, ...extra}`.
struct ApiErr {
    status: StatusCode,
    body: serde_json::Value,
}

impl ApiErr {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiErr {
        ApiErr {
            status,
            body: serde_json::json!({ "error": message.into() }),
        }
    }

    fn with(mut self, key: &str, value: impl serde::Serialize) -> ApiErr {
        if let Some(o) = self.body.as_object_mut() {
            o.insert(key.into(), serde_json::to_value(value).unwrap_or_default());
        }
        self
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(api::SCHEME),
            );
        }
        r
    }
}

/// A state database failure: 503, so clients retry; the detail goes to the log.
fn unavailable(e: &anyhow::Error) -> ApiErr {
    tracing::warn!(error = %labrelay::secret::scrub(&format!("{e:#}")), "state database");
    ApiErr::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the state database is not available; try again",
    )
}

fn bad(message: impl Into<String>) -> ApiErr {
    ApiErr::new(StatusCode::BAD_REQUEST, message)
}

/// A request body as `T`; a 400 naming what is wrong otherwise.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiErr> {
    serde_json::from_slice(body).map_err(|e| bad(format!("request body: {e}")))
}

fn not_found(id: &str) -> ApiErr {
    ApiErr::new(StatusCode::NOT_FOUND, format!("no such job: {id}"))
}

/// The router (for `serve` and for tests).
pub fn router(state: Arc<ApiState>) -> Router {
    let v1 = Router::new()
        .route("/v1/tasks", get(tasks))
        .route("/v1/jobs", post(submit).get(list))
        // GET answers as GET /v1/jobs/{id} does for an id that is not a job.
        .route(
            "/v1/jobs/batch",
            post(submit_batch).get(|| async { Err::<(), _>(not_found("batch")) }),
        )
        .route("/v1/jobs/{id}", get(status))
        .route("/v1/jobs/{id}/result", get(result))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/output/{stream}", get(output))
        .route(
            "/v1/submissions",
            post(add_submission).get(list_submissions),
        )
        .route("/v1/submissions/{id}", get(get_submission))
        .route("/v1/submissions/{id}/run", post(run_submission))
        .route("/v1/submissions/{id}/enable", post(enable_submission))
        .route("/api/v2/execute", post(piston_execute))
        .route("/submissions", post(judge0_submit))
        .route("/languages", get(judge0_languages))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/healthz", get(health))
        .merge(v1)
        .route_layer(middleware::from_fn_with_state(state.clone(), count))
        .fallback(|| async { ApiErr::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(state)
}

/// Count every routed request by method, route and status.
async fn count(State(st): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(String::new, |p| p.as_str().to_owned());
    let resp = next.run(req).await;
    let key = (method, route, resp.status().as_u16());
    if let Ok(mut m) = st.metrics.requests.lock() {
        *m.entry(key).or_default() += 1;
    }
    resp
}

/// Check the signature, the clock window and the nonce; hand the handler the caller.
async fn authenticate(State(st): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    match check(&st, req).await {
        Ok(req) => next.run(req).await,
        Err((reason, e)) => {
            if let Ok(mut m) = st.metrics.refused.lock() {
                *m.entry(reason).or_default() += 1;
            }
            e.into_response()
        }
    }
}

async fn check(st: &ApiState, req: Request) -> Result<Request, (&'static str, ApiErr)> {
    let refuse = |reason: &'static str, message: &str| {
        (reason, ApiErr::new(StatusCode::UNAUTHORIZED, message))
    };
    let (parts, body) = req.into_parts();
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| {
            refuse(
                "missing",
                "no Authorization header: sign requests with LABRELAY-HMAC-SHA256",
            )
        })?
        .to_str()
        .map_err(|_| refuse("malformed", "the Authorization header is not ASCII"))?;
    let creds = api::parse_authorization(value).map_err(|m| refuse("malformed", m))?;
    let now = chrono::Utc::now().timestamp();
    if creds.ts < now - api::WINDOW_SECS {
        return Err(refuse(
            "expired",
            "the signature has expired (ts is more than 60 s old; check the clock)",
        ));
    }
    if creds.ts > now + api::WINDOW_SECS {
        return Err(refuse(
            "future",
            "the signature is dated more than 60 s ahead (check the clock)",
        ));
    }
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        (
            "too_large",
            ApiErr::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over {MAX_BODY} bytes"),
            ),
        )
    })?;
    // One answer for an unknown user and a wrong signature: no user enumeration.
    let signed = st.users.get(&creds.user).is_some_and(|u| {
        api::verify(
            &u.key,
            &creds,
            &api::Target {
                method: parts.method.as_str(),
                path: parts.uri.path(),
                query: parts.uri.query().unwrap_or(""),
                body: &bytes,
            },
        )
    });
    if !signed {
        return Err(refuse("signature", "unknown user or wrong signature"));
    }
    let fresh = st
        .store
        .use_nonce(
            &creds.user,
            &creds.nonce,
            (creds.ts + api::WINDOW_SECS + 1) * 1000,
        )
        .await
        .map_err(|e| ("unavailable", unavailable(&e)))?;
    if !fresh {
        return Err(refuse(
            "replayed",
            "this nonce was used already: a replayed request",
        ));
    }
    let admin = st.users.get(&creds.user).is_some_and(|u| u.admin);
    let mut req = Request::from_parts(parts, Body::from(bytes));
    req.extensions_mut().insert(Caller {
        name: creds.user,
        admin,
    });
    Ok(req)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn health(State(st): State<Arc<ApiState>>) -> Result<Json<serde_json::Value>, ApiErr> {
    // The per-queue counts: one cheap query that proves the database answers.
    st.store.stats().await.map_err(|e| unavailable(&e))?;
    Ok(Json(serde_json::json!({ "ok": true })))
}

async fn tasks(State(st): State<Arc<ApiState>>) -> Json<Vec<serde_json::Value>> {
    Json(
        st.registry
            .tasks
            .values()
            .map(|t| {
                serde_json::json!({
                    "name": t.name,
                    "description": t.description,
                    "queue": t.queue,
                    "params": t.params,
                    "args_on_stdin": t.args_on_stdin,
                    "max_attempts": t.max_attempts,
                    "timeout_secs": t.timeout_secs,
                    "schedule": t.schedule,
                })
            })
            .collect(),
    )
}

async fn submit(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiErr> {
    let req: SubmitRequest = json_body(&body)?;
    let job = st.registry.new_job(&req, &caller.name).map_err(bad)?;
    if let Some(to) = &req.email {
        jobs::notify::check_address(st.mail_from.as_deref(), to)
            .map_err(|e| bad(format!("email: {e}")))?;
    }
    let (id, created) = st.store.submit(&job).await.map_err(|e| unavailable(&e))?;
    if !created {
        let first = st.store.get(id).await.map_err(|e| unavailable(&e))?;
        if first.is_none_or(|j| j.submitter != caller.name && !caller.admin) {
            return Err(ApiErr::new(
                StatusCode::CONFLICT,
                "this unique key is taken by another user's job",
            ));
        }
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(Submitted {
            id,
            task: job.task,
            created,
        }),
    )
        .into_response())
}

/// `POST /v1/jobs/batch`: every job checked before any is stored, then one insert.
async fn submit_batch(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiErr> {
    let req: jobs::api::BatchRequest = json_body(&body)?;
    if req.jobs.is_empty() || req.jobs.len() > jobs::api::MAX_BATCH {
        return Err(bad(format!(
            "jobs: {} given, 1 to {} allowed",
            req.jobs.len(),
            jobs::api::MAX_BATCH
        )));
    }
    let mut new = Vec::with_capacity(req.jobs.len());
    for (i, r) in req.jobs.iter().enumerate() {
        if r.unique_key.is_some() {
            return Err(bad(format!(
                "jobs[{i}]: jobs submitted together take no unique key"
            )));
        }
        new.push(
            st.registry
                .new_job(r, &caller.name)
                .map_err(|e| bad(format!("jobs[{i}]: {e}")))?,
        );
        if let Some(to) = &r.email {
            jobs::notify::check_address(st.mail_from.as_deref(), to)
                .map_err(|e| bad(format!("jobs[{i}].email: {e}")))?;
        }
    }
    let ids = st
        .store
        .submit_many(&new)
        .await
        .map_err(|e| unavailable(&e))?;
    Ok((StatusCode::CREATED, Json(jobs::api::BatchSubmitted { ids })).into_response())
}

/// The job `id` if the caller may see it.
async fn visible(st: &ApiState, caller: &Caller, id: &str) -> Result<jobs::Job, ApiErr> {
    let n: i64 = id.parse().map_err(|_| not_found(id))?;
    match st.store.get(n).await.map_err(|e| unavailable(&e))? {
        Some(j) if caller.admin || j.submitter == caller.name => Ok(j),
        _ => Err(not_found(id)),
    }
}

async fn status(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiErr> {
    Ok(Json(visible(&st, &caller, &id).await?.summary()))
}

async fn result(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiErr> {
    let j = visible(&st, &caller, &id).await?;
    if !j.is_finished() {
        return Err(ApiErr::new(
            StatusCode::CONFLICT,
            format!("job {} is {}: no result yet", j.id, j.state),
        )
        .with("id", j.id)
        .with("state", &j.state));
    }
    Ok(Json(j.result_record()))
}

/// A finished job's whole stdout or stderr as text: from `[jobs] output_storage` when
/// the stream was kept there (streamed, never held in memory), else the row's text.
async fn output(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path((id, stream)): Path<(String, String)>,
) -> Result<Response, ApiErr> {
    use labrelay::storage::ObjectStorage as _;
    let j = visible(&st, &caller, &id).await?;
    let (text, key) = match stream.as_str() {
        "stdout" => (j.stdout.clone(), j.stdout_ref.clone()),
        "stderr" => (j.stderr.clone(), j.stderr_ref.clone()),
        _ => {
            return Err(ApiErr::new(
                StatusCode::NOT_FOUND,
                format!("no such stream: {stream} (stdout, stderr)"),
            ));
        }
    };
    if !j.is_finished() {
        return Err(ApiErr::new(
            StatusCode::CONFLICT,
            format!("job {} is {}: no output yet", j.id, j.state),
        )
        .with("id", j.id)
        .with("state", &j.state));
    }
    let text_plain = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if let (Some(key), Some((storage, dir))) = (key, &st.output) {
        let path = dir.join(format!("api-{}-{stream}-{}", j.id, api::new_nonce()));
        let fetched = storage.get_to_file(&key, &path).await;
        let file = match fetched {
            Ok(_) => tokio::fs::File::open(&path).await,
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(unavailable(&anyhow::anyhow!("{key}: {e}")));
            }
        };
        // Unlinked at once: the open descriptor keeps the data until it is sent.
        let _ = tokio::fs::remove_file(&path).await;
        let file = file.map_err(|e| unavailable(&anyhow::anyhow!("{key}: {e}")))?;
        let chunks = futures::stream::unfold(file, |mut f| async move {
            use tokio::io::AsyncReadExt as _;
            let mut buf = vec![0u8; 64 * 1024];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), f))
                }
                Err(e) => Some((Err(e), f)),
            }
        });
        let body = Body::from_stream(chunks);
        return Ok((text_plain, body).into_response());
    }
    Ok((text_plain, text.unwrap_or_default()).into_response())
}

async fn cancel(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiErr> {
    let j = visible(&st, &caller, &id).await?;
    let done = st
        .store
        .cancel(j.id, &caller.name)
        .await
        .map_err(|e| unavailable(&e))?
        .ok_or_else(|| not_found(&id))?;
    if done == Cancelled::AlreadyFinished {
        return Err(ApiErr::new(
            StatusCode::CONFLICT,
            format!("job {} had already finished; nothing changed", j.id),
        )
        .with("id", j.id)
        .with("outcome", done));
    }
    Ok(Json(serde_json::json!({ "id": j.id, "outcome": done })))
}

async fn list(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<serde_json::Value>>, ApiErr> {
    let mut filter = ListFilter {
        state: None,
        submitter: None,
        limit: 100,
    };
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "state" if STATES.contains(&v.as_ref()) => filter.state = Some(v.into_owned()),
            "state" => {
                return Err(bad(format!(
                    "state {v}: not a state (one of {})",
                    STATES.join(", ")
                )));
            }
            "submitter" => filter.submitter = Some(v.into_owned()),
            "limit" => {
                filter.limit = v
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=MAX_LIST).contains(n))
                    .ok_or_else(|| bad(format!("limit {v}: a number from 1 to {MAX_LIST}")))?;
            }
            other => {
                return Err(bad(format!(
                    "unknown query parameter `{other}` (state, submitter, limit)"
                )));
            }
        }
    }
    if !caller.admin {
        match &filter.submitter {
            Some(s) if *s != caller.name => return Ok(Json(Vec::new())),
            _ => filter.submitter = Some(caller.name.clone()),
        }
    }
    let jobs = st.store.list(&filter).await.map_err(|e| unavailable(&e))?;
    Ok(Json(jobs.iter().map(jobs::Job::summary).collect()))
}

fn no_submission(id: &str) -> ApiErr {
    ApiErr::new(StatusCode::NOT_FOUND, format!("no such submission: {id}"))
}

fn submission_json(st: &ApiState, s: &jobs::code::Submission) -> serde_json::Value {
    s.record(&jobs::code::link(&st.code.storage, &s.source_key))
}

/// The submission `id` if the caller may see it.
async fn visible_submission(
    st: &ApiState,
    caller: &Caller,
    id: &str,
) -> Result<jobs::code::Submission, ApiErr> {
    if !jobs::code::valid_id(id) {
        return Err(no_submission(id));
    }
    match st
        .code
        .submissions
        .get(id)
        .await
        .map_err(|e| unavailable(&e))?
    {
        Some(s) if caller.admin || s.submitter == caller.name => st
            .code
            .submissions
            .settle(&st.store, s)
            .await
            .map_err(|e| unavailable(&e)),
        _ => Err(no_submission(id)),
    }
}

/// `code-submit add` over HTTP.
async fn add_submission(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiErr> {
    let req: jobs::code::AddRequest = json_body(&body)?;
    let sub = jobs::code::add(
        &st.code.submissions,
        &st.code.storage,
        &st.code.settings,
        st.mail_from.as_deref(),
        req,
        &caller.name,
    )
    .await
    .map_err(|e| match e {
        jobs::code::AddError::Invalid(m) => bad(m),
        jobs::code::AddError::Exists(id) => ApiErr::new(
            StatusCode::CONFLICT,
            format!("submission {id} exists already"),
        ),
        jobs::code::AddError::Failed(e) => unavailable(&e),
    })?;
    Ok((StatusCode::CREATED, Json(submission_json(&st, &sub))).into_response())
}

/// The seed's `check_user`: every submission of an address (the caller's own).
async fn list_submissions(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<serde_json::Value>>, ApiErr> {
    let mut email = None;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "email" if !v.is_empty() => email = Some(v.into_owned()),
            "email" => return Err(bad("email: empty")),
            other => {
                return Err(bad(format!("unknown query parameter `{other}` (email)")));
            }
        }
    }
    let email = email.ok_or_else(|| bad("the query parameter `email` is required"))?;
    let list = st
        .code
        .submissions
        .by_email(&email)
        .await
        .map_err(|e| unavailable(&e))?;
    let mut out = Vec::new();
    for s in list {
        if caller.admin || s.submitter == caller.name {
            let s = st
                .code
                .submissions
                .settle(&st.store, s)
                .await
                .map_err(|e| unavailable(&e))?;
            out.push(submission_json(&st, &s));
        }
    }
    Ok(Json(out))
}

async fn get_submission(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiErr> {
    let s = visible_submission(&st, &caller, &id).await?;
    Ok(Json(submission_json(&st, &s)))
}

/// `code-submit run` over HTTP: 202 with the job (the same job while it is queued).
async fn run_submission(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiErr> {
    visible_submission(&st, &caller, &id).await?;
    let q = jobs::code::queue_run(
        &st.code.submissions,
        &st.store,
        &st.registry,
        &id,
        &caller.name,
    )
    .await
    .map_err(|e| unavailable(&e))?;
    match q {
        jobs::code::Queued::Job(job) => Ok((
            StatusCode::ACCEPTED,
            Json(serde_json::json!({"id": id, "job": job})),
        )
            .into_response()),
        jobs::code::Queued::NoSuch => Err(no_submission(&id)),
        jobs::code::Queued::Disabled => Err(ApiErr::new(
            StatusCode::CONFLICT,
            format!(
                "submission {id} is disabled after an error; POST /v1/submissions/{id}/enable allows another run"
            ),
        )),
    }
}

async fn enable_submission(
    State(st): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiErr> {
    visible_submission(&st, &caller, &id).await?;
    st.code
        .submissions
        .enable(&id)
        .await
        .map_err(|e| unavailable(&e))?;
    let s = visible_submission(&st, &caller, &id).await?;
    Ok(Json(submission_json(&st, &s)))
}

/// One file of a Piston request.
#[derive(serde::Deserialize)]
struct PistonFile {
    content: String,
}

/// Limits a remote caller asked for; they may only lower the language's here.
struct Asked {
    wall_secs: Option<f64>,
    cpu_secs: Option<f64>,
    memory_bytes: Option<u64>,
}

/// Run one program of language `key` in this host's sandbox, for an engine request
/// (Piston's or Judge0's). The language's limits here cap what the request asks for; no
/// sandbox, or a box that could not be built, is a 503.
async fn run_here(
    st: &ApiState,
    key: &str,
    source: Vec<u8>,
    stdin: Option<Vec<u8>>,
    expected: Option<Vec<u8>>,
    asked: Asked,
) -> Result<(sandbox::Report, sandbox::Language), ApiErr> {
    let lang = st.code.settings.language(key).map_err(bad)?.clone();
    if lang.remote.is_some() {
        return Err(bad(format!(
            "language {} runs on a remote engine here too",
            lang.key
        )));
    }
    let over = |b: &Option<Vec<u8>>| {
        b.as_ref()
            .is_some_and(|b| b.len() > jobs::code::MAX_INPUT_BYTES)
    };
    if source.len() > jobs::code::MAX_INPUT_BYTES || over(&stdin) || over(&expected) {
        return Err(bad("the program, stdin or expected output is over 1 MiB"));
    }
    let sb = st.code.sandbox.clone().map_err(|why| {
        ApiErr::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no sandbox on this server: {why}"),
        )
    })?;
    let mut limits = lang.limits;
    if let Some(w) = asked.wall_secs.filter(|w| w.is_finite() && *w > 0.0) {
        limits.wall_secs = limits.wall_secs.min(w).max(0.001);
        limits.time_secs = limits.time_secs.min(limits.wall_secs);
    }
    if let Some(c) = asked.cpu_secs.filter(|c| c.is_finite() && *c > 0.0) {
        limits.time_secs = limits.time_secs.min(c).max(0.001);
    }
    if let Some(bytes) = asked.memory_bytes.filter(|b| *b > 0) {
        limits.memory_mib = limits.memory_mib.min((bytes >> 20).max(8));
    }
    let report = jobs::engine::execute(
        Ok(sb),
        lang.clone(),
        jobs::engine::Input {
            source,
            stdin,
            expected,
            limits,
        },
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    )
    .await;
    if report.status == sandbox::Status::InternalError {
        return Err(ApiErr::new(
            StatusCode::SERVICE_UNAVAILABLE,
            report.message.unwrap_or_default(),
        ));
    }
    Ok((report, lang))
}

/// Judge0's `POST /submissions` request (the fields labrelay uses; others ignored).
#[derive(serde::Deserialize)]
struct Judge0Request {
    source_code: String,
    language_id: u32,
    #[serde(default)]
    stdin: Option<String>,
    #[serde(default)]
    expected_output: Option<String>,
    #[serde(default)]
    cpu_time_limit: Option<f64>,
    #[serde(default)]
    wall_time_limit: Option<f64>,
    /// KiB.
    #[serde(default)]
    memory_limit: Option<f64>,
}

/// A Judge0-compatible engine: run one submission in this host's sandbox while the
/// request waits (`wait=true` only: nothing is stored to fetch later), and answer with
/// Judge0's fields, base64-encoded when the request is (`base64_encoded=true`).
async fn judge0_submit(
    State(st): State<Arc<ApiState>>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiErr> {
    use base64::Engine as _;
    let flag = |name: &str| {
        url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
            .any(|(k, v)| k == name && v == "true")
    };
    let encoded = flag("base64_encoded");
    if !flag("wait") {
        return Err(bad(
            "wait=true is required: this engine runs the submission while the request waits \
             and keeps nothing to fetch later",
        ));
    }
    let req: Judge0Request = json_body(&body)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let field = |name: &str, v: Option<String>| -> Result<Option<Vec<u8>>, ApiErr> {
        match v {
            Some(t) if encoded => {
                let compact: String = t.chars().filter(|c| !c.is_whitespace()).collect();
                b64.decode(compact)
                    .map(Some)
                    .map_err(|e| bad(format!("{name}: not base64 ({e})")))
            }
            other => Ok(other.map(String::into_bytes)),
        }
    };
    let key = sandbox::config::judge0_language(req.language_id).ok_or_else(|| {
        bad(format!(
            "language_id {}: not one of this engine's (GET /languages)",
            req.language_id
        ))
    })?;
    let source = field("source_code", Some(req.source_code))?.unwrap_or_default();
    let stdin = field("stdin", req.stdin)?;
    let expected = field("expected_output", req.expected_output)?;
    let (report, _) = run_here(
        &st,
        key,
        source,
        stdin,
        expected,
        Asked {
            wall_secs: req.wall_time_limit,
            cpu_secs: req.cpu_time_limit,
            memory_bytes: req
                .memory_limit
                .filter(|k| k.is_finite() && *k > 0.0)
                .map(|k| (k * 1024.0) as u64),
        },
    )
    .await?;
    let text = |s: &str| -> serde_json::Value {
        if s.is_empty() {
            serde_json::Value::Null
        } else if encoded {
            b64.encode(s).into()
        } else {
            s.into()
        }
    };
    let (id, description) = jobs::engine::judge0_status(&report);
    let answer = serde_json::json!({
        "token": uuid::Uuid::new_v4().to_string(),
        "stdout": text(&report.stdout),
        "stderr": text(&report.stderr),
        "compile_output": text(&report.compile_output),
        "message": text(report.message.as_deref().unwrap_or("")),
        "exit_code": report.exit_code,
        "exit_signal": report.signal,
        "status": {"id": id, "description": description},
        "time": format!("{:.3}", report.time_ms as f64 / 1000.0),
        "wall_time": format!("{:.3}", report.wall_ms as f64 / 1000.0),
        "memory": report.memory_kib,
        "language_id": req.language_id,
    });
    Ok((StatusCode::CREATED, Json(answer)))
}

/// Judge0's `GET /languages`: the ids this engine answers, for the languages installed
/// here that run locally.
async fn judge0_languages(State(st): State<Arc<ApiState>>) -> Json<serde_json::Value> {
    let mut out = Vec::new();
    for (key, ids) in sandbox::config::JUDGE0_LANGUAGES {
        let Ok(lang) = st.code.settings.language(key) else {
            continue;
        };
        if lang.remote.is_some() || lang.installed(&st.code.settings.sandbox.path).is_none() {
            continue;
        }
        for id in *ids {
            out.push(serde_json::json!({"id": id, "name": format!("{} (labrelay)", lang.name)}));
        }
    }
    Json(serde_json::Value::Array(out))
}

/// Piston's `POST /api/v2/execute` request (the fields labrelay uses; others ignored).
#[derive(serde::Deserialize)]
struct PistonRequest {
    language: String,
    files: Vec<PistonFile>,
    #[serde(default)]
    stdin: Option<String>,
    #[serde(default)]
    run_timeout: Option<i64>,
    #[serde(default)]
    run_memory_limit: Option<i64>,
}

/// A Piston-compatible engine: run one program in this host's sandbox and answer in
/// Piston's shape, with labrelay's whole report under `labrelay`. The language's limits
/// here cap what the request asks for.
async fn piston_execute(
    State(st): State<Arc<ApiState>>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiErr> {
    let req: PistonRequest = json_body(&body)?;
    let Some(file) = req.files.into_iter().next() else {
        return Err(bad("files: at least one file (the program)"));
    };
    let (report, lang) = run_here(
        &st,
        &req.language,
        file.content.into_bytes(),
        req.stdin.map(String::into_bytes),
        None,
        Asked {
            wall_secs: req
                .run_timeout
                .filter(|ms| *ms > 0)
                .map(|ms| ms as f64 / 1000.0),
            cpu_secs: None,
            memory_bytes: req.run_memory_limit.filter(|b| *b > 0).map(|b| b as u64),
        },
    )
    .await?;
    let (compiles, key) = (lang.compile.is_some(), lang.key);
    let status = match report.status {
        sandbox::Status::TimeLimitExceeded => Some("TO"),
        sandbox::Status::OutputLimitExceeded => Some("OL"),
        sandbox::Status::MemoryLimitExceeded | sandbox::Status::RuntimeError
            if report.signal.is_some() =>
        {
            Some("SG")
        }
        sandbox::Status::RuntimeError => Some("RE"),
        _ => None,
    };
    let run = serde_json::json!({
        "stdout": report.stdout,
        "stderr": report.stderr,
        "output": format!("{}{}", report.stdout, report.stderr),
        "code": report.exit_code,
        "signal": report.signal.map(jobs::engine::signal_name),
        "status": status,
        "message": report.message,
        "cpu_time": report.time_ms,
        "wall_time": report.wall_ms,
        "memory": report.memory_kib * 1024,
    });
    let mut answer = serde_json::json!({
        "language": key,
        "version": "labrelay",
        "run": run,
        "labrelay": report,
    });
    if compiles {
        let failed = report.status == sandbox::Status::CompilationError;
        answer["compile"] = serde_json::json!({
            "stdout": "",
            "stderr": report.compile_output,
            "output": report.compile_output,
            "code": if failed { report.exit_code.unwrap_or(1) } else { 0 },
            "signal": serde_json::Value::Null,
        });
        if failed {
            answer["run"] = serde_json::Value::Null;
        }
    }
    Ok(Json(answer))
}

/// Prometheus text: request and refusal counters, jobs per queue and state.
async fn metrics(State(st): State<Arc<ApiState>>) -> Response {
    use std::fmt::Write as _;
    let mut out = String::new();
    out.push_str("# HELP labrelay_api_requests_total API requests by method, route and status.\n# TYPE labrelay_api_requests_total counter\n");
    if let Ok(m) = st.metrics.requests.lock() {
        for ((method, route, status), n) in m.iter() {
            let _ = writeln!(
                out,
                "labrelay_api_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
    }
    out.push_str("# HELP labrelay_api_refused_total Requests refused before a handler ran, by reason.\n# TYPE labrelay_api_refused_total counter\n");
    if let Ok(m) = st.metrics.refused.lock() {
        for (reason, n) in m.iter() {
            let _ = writeln!(out, "labrelay_api_refused_total{{reason=\"{reason}\"}} {n}");
        }
    }
    match st.store.stats().await {
        Ok(stats) => {
            out.push_str("# HELP labrelay_jobs Jobs per queue and state (queued, running, dead).\n# TYPE labrelay_jobs gauge\n");
            for (queue, s) in &stats {
                let q = escape(queue);
                for (state, n) in [
                    ("queued", s.queued),
                    ("running", s.running),
                    ("dead", s.dead),
                ] {
                    let _ = writeln!(out, "labrelay_jobs{{queue=\"{q}\",state=\"{state}\"}} {n}");
                }
            }
            out.push_str("# HELP labrelay_jobs_oldest_ready_seconds Age of the oldest job ready to run, per queue.\n# TYPE labrelay_jobs_oldest_ready_seconds gauge\n");
            for (queue, s) in &stats {
                let age = s.oldest_ready_ms.unwrap_or(0) as f64 / 1000.0;
                let _ = writeln!(
                    out,
                    "labrelay_jobs_oldest_ready_seconds{{queue=\"{}\"}} {age}",
                    escape(queue)
                );
            }
            out.push_str("# HELP labrelay_state_database_up Whether the state database answered.\n# TYPE labrelay_state_database_up gauge\nlabrelay_state_database_up 1\n");
        }
        Err(e) => {
            tracing::warn!(error = %labrelay::secret::scrub(&format!("{e:#}")), "metrics: state database");
            out.push_str("# HELP labrelay_state_database_up Whether the state database answered.\n# TYPE labrelay_state_database_up gauge\nlabrelay_state_database_up 0\n");
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serve until `shutdown` resolves; `bound` is told the address once listening.
pub async fn serve(
    state: Arc<ApiState>,
    listen: &str,
    bound: impl FnOnce(std::net::SocketAddr) -> anyhow::Result<()>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::Error::from(e).context(format!("listen {listen}"))
        } else {
            ConfigError::Invalid {
                key: "jobs.listen".into(),
                message: format!("`{listen}`: {e}"),
            }
            .into()
        }
    })?;
    bound(listener.local_addr()?)?;
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
