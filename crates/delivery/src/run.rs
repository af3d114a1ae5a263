//! One delivery, end to end: resolve the target, look the analysis up, build the
//! manifest, upload with the journal, deliver `md5sum.txt`, grant access and mail the
//! customer ([`CustomerSteps`]), write the LIMS status, and record every step in the
//! delivery's status row.
//!
//! Order and idempotence: the status row goes `queued → uploading → uploaded →
//! notified → delivered` (or `failed`, with the error). A re-run of an unfinished
//! delivery to the same target identity reuses its row and journal, but counts a file
//! as delivered only after the target confirms it again ([`crate::upload`]); before
//! access and mail the delivered prefix is listed and compared with the manifest. The
//! once-only steps — the LIMS `on_started`/`on_delivered` statements, access with the
//! customer mail — record intent and outcome in `delivery_steps` and are skipped once
//! their outcome is recorded; the customer mail's Message-ID is fixed per delivery, so a
//! repeat after a crash is a no-op in the outbox. A finished delivery is a no-op
//! ("already delivered") unless `force`, which starts a new run.
//!
//! Shape: [`deliver`] does the entry checks, finds or creates the status row, and hands
//! over to a `Run`, which has one method per stage (lookup, manifest, upload,
//! checksums, confirm, access, mail, LIMS status, commit) and records each stage's
//! outcome in the summary and the status row.
//!
//! Inputs are checked at the entry: the analysis id against
//! `[delivery] analysis_id_pattern`, the folder against `data_roots`, the target's root
//! and the customer's access to it before any byte moves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use chrono::Utc;
use indicatif::HumanBytes;
use labrelay::config::{Config, StorageConfig};
use labrelay::db::Db;
use labrelay::exit::{Exit, classify, tagged};
use labrelay::lock::InstanceLock;
use labrelay::storage::{AnyStorage, ObjectStorage, Target};
use serde::Serialize;

use crate::access::AccessGrant;
use crate::config::DeliveryConfig;
use crate::events::Events;
use crate::lookup::{self, Key};
use crate::manifest::{self, Filter, WalkOptions};
use crate::report::{
    Analysis, CustomerSteps, DeliveredFile, DeliveryReport, StepContext, TargetInfo, TargetKind,
    Tool,
};
use crate::sql::{self, Value};
use crate::state::{NewRun, State, Status, Update};
use crate::upload::{self, Cancel, Interrupted, UploadOptions, UploadResult};
use crate::vendor::{CommandError, VendorConfig, VendorTarget, VendorUpload};

/// What to deliver.
#[derive(Debug, Clone)]
pub struct Request {
    /// The tool.
    pub tool: Tool,
    /// Analysis id (delivery-upload).
    pub analysis_id: Option<String>,
    /// Project id (upload-pure).
    pub project_id: Option<String>,
    /// The folder: upload-pure's `--analysis-path`, or delivery-upload's override of the
    /// LIMS path.
    pub path: Option<PathBuf>,
    /// upload-pure: the delivery's name (default: the folder's name).
    pub name: Option<String>,
    /// `--target`.
    pub target: Option<String>,
    /// Change nothing; show the plan.
    pub dry_run: bool,
    /// Deliver again even if already delivered.
    pub force: bool,
    /// The queue message that asked for it.
    pub request_id: Option<String>,
}

impl Request {
    /// The delivery's name: the analysis id, else `name`, else the folder's name.
    pub fn delivery_name(&self) -> anyhow::Result<String> {
        if let Some(a) = &self.analysis_id {
            return Ok(a.clone());
        }
        if let Some(n) = &self.name {
            return Ok(n.clone());
        }
        self.path
            .as_deref()
            .and_then(|p| p.file_name())
            .map(manifest::key_component)
            .ok_or_else(|| labrelay::exit::usage("give an analysis id, a name or a folder"))
    }
}

/// The final `summary` record.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// `delivered`, `already_delivered`, `dry_run`, `failed`, `interrupted`.
    pub status: String,
    /// The status row's id.
    pub delivery_id: Option<String>,
    /// Analysis id (or upload-pure's delivery name).
    pub analysis_id: String,
    /// Project id.
    pub project_id: Option<String>,
    /// Target name.
    pub target: String,
    /// Where that is.
    pub target_url: String,
    /// Key prefix of the delivered files, as it is on the target (for S3, the key in
    /// the bucket: the URL's prefix included).
    pub key_prefix: String,
    /// Where the delivery is: the target URL and the delivery's folder
    /// (`s3://bucket/base/online/6cLB4ma`, `file:///srv/delivery/online/6cLB4ma`).
    pub location: String,
    /// Files in the delivery (md5sum.txt not counted).
    pub files: u64,
    /// Bytes in the delivery.
    pub bytes: u64,
    /// Files sent by this run.
    pub files_sent: u64,
    /// Files finished by an earlier run.
    pub files_resumed: u64,
    /// Files that failed.
    pub files_failed: u64,
    /// Bytes sent by this run.
    pub bytes_sent: u64,
    /// Multipart parts sent by this run.
    pub parts_sent: u64,
    /// Multipart parts an earlier run had sent.
    pub parts_resumed: u64,
    /// Key of md5sum.txt.
    pub md5sum_key: Option<String>,
    /// Kind of customer access: `presigned`, `command`, `vendor`, `none`.
    pub access: Option<String>,
    /// Customer account.
    pub account: Option<String>,
    /// Access expiry.
    pub expires_at: Option<String>,
    /// Message-ID of the customer mail.
    pub mail_message_id: Option<String>,
    /// Seconds the run took.
    pub seconds: f64,
    /// The error, when it failed.
    pub error: Option<String>,
}

/// The result of [`deliver`]: the summary and the exit status it implies.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The summary (already printed).
    pub summary: Summary,
    /// 0 delivered / already delivered / dry run; 1 some files failed; 75 interrupted.
    pub exit: Exit,
}

/// Everything a delivery needs from its tool.
#[derive(Debug)]
pub struct Env<'a> {
    /// The configuration.
    pub config: &'a Config,
    /// `[delivery]`.
    pub delivery: DeliveryConfig,
    /// The state database.
    pub state: State,
    /// Events and output.
    pub events: Events,
}

impl<'a> Env<'a> {
    /// Read `[delivery]` and open the state database.
    pub async fn open(config: &'a Config, events: Events) -> anyhow::Result<Env<'a>> {
        let delivery = DeliveryConfig::from_config(config)?;
        let db = Db::open_state(config).await?;
        Ok(Env {
            config,
            delivery,
            state: State::new(db),
            events,
        })
    }
}

/// The context of an error that stopped a delivery: what was known when it failed
/// (the listener mails it to staff). Shown as `delivering ID to TARGET`.
#[derive(Debug, Clone)]
pub struct DeliveryFailed {
    /// The analysis as far as it was looked up.
    pub analysis: Analysis,
    /// The summary at the time of failure.
    pub summary: Summary,
}

impl std::fmt::Display for DeliveryFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "delivering {} to {}",
            self.summary.analysis_id, self.summary.target
        )
    }
}

impl Env<'_> {
    /// Prepare every configured SQL statement (`[delivery.lookup]`,
    /// `[delivery.project_lookup]`, `[delivery.status]`) on its database, so a wrong
    /// table or column stops the tool with exit 78 before any upload.
    pub async fn check_statements(&self) -> anyhow::Result<()> {
        let d = &self.delivery;
        let mut checks: Vec<(&str, &str, String)> = Vec::new();
        for (key, l) in [("lookup", &d.lookup), ("project_lookup", &d.project_lookup)] {
            if let Some(l) = l
                && let (Some(db), Some(sql)) = (&l.database, &l.sql)
            {
                checks.push((db, sql, format!("delivery.{key}.sql")));
            }
        }
        if let Some(st) = &d.status {
            for (key, sql) in [
                ("on_started", &st.on_started),
                ("on_delivered", &st.on_delivered),
                ("on_failed", &st.on_failed),
            ] {
                if let Some(sql) = sql {
                    checks.push((&st.database, sql, format!("delivery.status.{key}")));
                }
            }
        }
        let mut open: BTreeMap<&str, Db> = BTreeMap::new();
        let mut result = Ok(());
        for (db_name, sql, what) in checks {
            if !open.contains_key(db_name) {
                open.insert(db_name, Db::connect(self.config.database(db_name)?).await?);
            }
            let db = &open[db_name];
            if let Err(e) = sql::check(db, sql, &what).await {
                result = Err(e);
                break;
            }
        }
        for (_, db) in open {
            db.close().await;
        }
        result
    }
}

/// A resolved `--target`.
#[derive(Debug, Clone)]
pub struct ResolvedTarget {
    /// What the report says about it.
    pub info: TargetInfo,
    /// The storage (not for vendor targets).
    pub storage: Option<AnyStorage>,
    /// Its `[storage.NAME]` section.
    pub config: Option<StorageConfig>,
    /// A `[delivery.vendors.NAME]` command target instead of a storage.
    pub vendor: Option<VendorTarget>,
    /// Its identity ([`crate::state::target_id`]): the journal of a run is trusted only
    /// for the same identity.
    pub id: String,
}

impl ResolvedTarget {
    /// The target as a URL (`s3://bucket/prefix`, `sftp://…`, `file:///…`); a vendor
    /// target as it describes itself.
    pub fn url(&self) -> String {
        self.storage
            .as_ref()
            .map_or_else(|| self.info.describe.clone(), AnyStorage::url)
    }

    /// `key` as it really is on the target (an S3 URL's prefix included).
    pub fn real_key(&self, key: &str) -> String {
        self.storage
            .as_ref()
            .map_or_else(|| key.to_owned(), |s| s.real_key(key))
    }

    /// The summary as it is printed: keys as they really are on the target.
    fn shown(&self, summary: &Summary) -> Summary {
        let mut s = summary.clone();
        s.location = format!(
            "{}/{}",
            self.url().trim_end_matches('/'),
            summary.key_prefix
        );
        s.key_prefix = self.real_key(&summary.key_prefix);
        s.md5sum_key = summary.md5sum_key.as_deref().map(|k| self.real_key(k));
        s
    }

    /// `--target`, else `[delivery] target`, else the only `[storage.*]` section.
    pub fn resolve(
        config: &Config,
        delivery: &DeliveryConfig,
        wanted: Option<&str>,
    ) -> anyhow::Result<ResolvedTarget> {
        let name = if let Some(n) = wanted.or(delivery.target.as_deref()) {
            n.to_owned()
        } else {
            let mut names = config.storage.keys();
            match (names.next(), names.next()) {
                (Some(only), None) => only.clone(),
                (None, _) => {
                    return Err(tagged(
                        Exit::Config,
                        "no delivery target: add a [storage.NAME] section (a local directory, \
                         s3:// or sftp:// url) and pass --target NAME",
                    ));
                }
                (Some(_), Some(_)) => {
                    return Err(tagged(
                        Exit::Config,
                        format!(
                            "several [storage.*] sections ({}): pass --target NAME or set \
                             [delivery] target",
                            config
                                .storage
                                .keys()
                                .cloned()
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
        };
        if let Some(sc) = config.storage.get(&name) {
            let storage = AnyStorage::open(sc)?;
            let kind = match Target::parse(&sc.url) {
                Ok(Target::S3 { .. }) => TargetKind::S3,
                Ok(Target::Sftp { .. }) => TargetKind::Sftp,
                _ => TargetKind::Local,
            };
            // A local directory by where it really is; others by URL and endpoint.
            let where_ = match kind {
                TargetKind::Local => storage.describe(),
                _ => sc.url.clone(),
            };
            let id = crate::state::target_id(kind.as_str(), &where_, sc.endpoint.as_deref());
            return Ok(ResolvedTarget {
                id,
                info: TargetInfo {
                    name,
                    kind,
                    describe: storage.describe(),
                },
                storage: Some(storage),
                config: Some(sc.clone()),
                vendor: None,
            });
        }
        if let Some(raw) = delivery.vendors.get(&name) {
            let vc = VendorConfig::from_value(&name, raw)?;
            let vendor = VendorTarget::new(&format!("delivery.vendors.{name}"), &vc)
                .map_err(CommandError::into_anyhow)?;
            return Ok(ResolvedTarget {
                id: crate::state::target_id("vendor", &vendor.describe(), None),
                info: TargetInfo {
                    name,
                    kind: TargetKind::Vendor,
                    describe: vendor.describe(),
                },
                storage: None,
                config: None,
                vendor: Some(vendor),
            });
        }
        Err(tagged(
            Exit::Config,
            format!("no [storage.{name}] section for target {name}"),
        ))
    }
}

fn lock_name(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("delivery-{safe}")
}

/// Deliver one analysis (or folder). Prints the `summary` record; returns the outcome,
/// or the error that stopped the delivery (already recorded in the status row).
pub async fn deliver(
    env: &Env<'_>,
    req: &Request,
    steps: &dyn CustomerSteps,
    cancel: &Cancel,
) -> anyhow::Result<Outcome> {
    let t0 = Instant::now();
    let name = req.delivery_name()?;
    env.delivery.check_id(&name)?;
    let prefix = env.delivery.delivery_prefix(&name);
    labrelay::storage::validate_prefix(&prefix)
        .map_err(|e| labrelay::exit::usage(format!("{name:?} cannot name a delivery: {e}")))?;
    let target = ResolvedTarget::resolve(env.config, &env.delivery, req.target.as_deref())?;
    steps.check_target(&target.info, target.storage.as_ref())?;
    if let Some(storage) = &target.storage {
        // A base folder or bucket that is not there is a configuration error, found
        // before any work (`create_root = true` creates a folder instead).
        storage.check_root().await?;
    }
    let mut summary = Summary {
        analysis_id: name.clone(),
        project_id: req.project_id.clone(),
        target: target.info.name.clone(),
        target_url: target.url(),
        key_prefix: prefix.clone(),
        ..Summary::default()
    };
    if req.tool == Tool::UploadPure {
        // A folder given by hand that is not there is an error even for a name that
        // was delivered before.
        folder_of(&env.delivery, req, &Analysis::default())?;
    }
    let _lock = InstanceLock::acquire(&env.config.data_dir(), &lock_name(&name)).map_err(|e| {
        anyhow::Error::from(e).context(format!(
            "analysis {name} is being delivered by another process"
        ))
    })?;
    let latest = env
        .state
        .latest(&name, &target.info.name)
        .await?
        .filter(|l| match &l.target_id {
            Some(id) if *id != target.id => {
                tracing::warn!(
                    analysis_id = %name,
                    "[storage.{}] now points somewhere else than for delivery {}: starting a new delivery",
                    target.info.name,
                    l.id
                );
                false
            }
            _ => true,
        });
    if let Some(l) = &latest
        && l.status() == Status::Delivered
        && !req.force
    {
        summary.status = "already_delivered".into();
        summary.delivery_id = Some(l.id.clone());
        summary.files = l.files as u64;
        summary.bytes = l.bytes as u64;
        summary.md5sum_key.clone_from(&l.md5sum_key);
        summary.account.clone_from(&l.account);
        summary.access.clone_from(&l.access_kind);
        summary.expires_at.clone_from(&l.expires_at);
        summary.seconds = t0.elapsed().as_secs_f64();
        let when = l
            .finished_at
            .as_deref()
            .map_or_else(|| "earlier".to_owned(), human_time);
        if req.dry_run {
            // Show what a --force run would do.
            return dry_run(env, req, &target, summary, t0, Some(&when)).await;
        }
        let summary = target.shown(&summary);
        print_summary(&env.events, &summary, || {
            format!(
                "{name} was already delivered to {} on {when} ({}, {}); use --force to deliver it again",
                target.info.name,
                count(l.files as u64, "file"),
                HumanBytes(l.bytes as u64)
            )
        });
        return Ok(Outcome {
            summary,
            exit: Exit::Ok,
        });
    }
    if req.dry_run {
        return dry_run(env, req, &target, summary, t0, None).await;
    }
    let (run_id, earlier) = match &latest {
        Some(l) if !req.force => (
            l.id.clone(),
            Earlier {
                notified: l.notified_at.is_some(),
                uploaded: l.md5sum_key.is_some(),
            },
        ),
        _ => {
            let id = env
                .state
                .create_run(&NewRun {
                    tool: req.tool.as_str(),
                    analysis_id: &name,
                    project_id: req.project_id.as_deref(),
                    target: &target.info.name,
                    target_id: &target.id,
                    key_prefix: &prefix,
                    request_id: req.request_id.as_deref(),
                })
                .await?;
            (id, Earlier::default())
        }
    };
    if let Some(rid) = &req.request_id {
        env.state
            .update(
                &run_id,
                &Update {
                    request_id: Some(rid),
                    ..Update::default()
                },
            )
            .await?;
    }
    summary.delivery_id = Some(run_id.clone());
    let mut run = Run::new(
        Parts {
            env,
            req,
            target: &target,
            steps,
            cancel,
        },
        run_id,
        earlier,
        summary,
    );
    let result = run.stages().await;
    run.finish(result, t0).await
}

/// A time for people: `2026-11-30 12:57 UTC` (an RFC 3339 text that does not parse is
/// shown as it is).
pub fn human_time(rfc3339: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(rfc3339).map_or_else(
        |_| rfc3339.to_owned(),
        |t| {
            t.with_timezone(&Utc)
                .format("%Y-%m-%d %H:%M UTC")
                .to_string()
        },
    )
}

/// `1 file`, `2 files`.
pub fn count(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn delivered_text(s: &Summary) -> String {
    use std::fmt::Write as _;
    let mut t = format!(
        "delivered {} to {} ({}): {}, {}",
        s.analysis_id,
        s.target,
        s.location,
        count(s.files, "file"),
        HumanBytes(s.bytes)
    );
    if s.files_resumed > 0 {
        let _ = write!(
            t,
            " ({} sent now, {} already there)",
            s.files_sent, s.files_resumed
        );
    }
    if let Some(k) = &s.md5sum_key {
        let _ = write!(t, "; checksums in {k}");
    }
    if let Some(a) = &s.account {
        let _ = write!(t, "; customer account {a}");
    }
    if let Some(x) = &s.expires_at {
        let _ = write!(t, "; customer access until {}", human_time(x));
    }
    t
}

fn print_summary(events: &Events, summary: &Summary, text: impl FnOnce() -> String) {
    if let Err(e) = events.printer().emit("summary", summary, text) {
        tracing::debug!("writing the summary failed: {e}");
    }
}

/// Look the analysis up: by analysis id (delivery-upload, `[delivery.lookup]`
/// required) or by project id (upload-pure, `[delivery.project_lookup]` optional).
async fn find(env: &Env<'_>, req: &Request, name: &str) -> anyhow::Result<Analysis> {
    match (req.tool, &req.analysis_id, &req.project_id) {
        (Tool::DeliveryUpload, Some(id), _) => {
            let l = env.delivery.lookup.as_ref().ok_or_else(|| {
                tagged(
                    Exit::Config,
                    "delivery-upload needs [delivery.lookup] (sql on a [databases.NAME], or a command)",
                )
            })?;
            lookup::lookup(env.config, l, &Key::Analysis(id.clone())).await
        }
        (_, _, Some(project)) => {
            let mut a = if let Some(l) = &env.delivery.project_lookup {
                lookup::lookup(env.config, l, &Key::Project(project.clone())).await?
            } else {
                tracing::warn!(
                    "no [delivery.project_lookup]: project {project} has no contacts, nobody will be mailed"
                );
                Analysis {
                    project_id: Some(project.clone()),
                    ..Analysis::default()
                }
            };
            name.clone_into(&mut a.analysis_id);
            Ok(a)
        }
        _ => Err(labrelay::exit::usage(
            "give --analysis-id, or --project-id with --analysis-path",
        )),
    }
}

/// The folder to deliver: the command line's, else the LIMS row's `analysis_path`,
/// which must be absolute, and — when `[delivery] data_roots` is set — inside one of
/// them (as it really is on disk); never under /proc, /sys or /dev.
fn folder_of(d: &DeliveryConfig, req: &Request, analysis: &Analysis) -> anyhow::Result<PathBuf> {
    let from_lims = req.path.is_none();
    let path = req
        .path
        .clone()
        .or_else(|| analysis.path.clone())
        .ok_or_else(|| {
            tagged(
                Exit::Failed,
                format!(
                    "analysis {} has no analysis_path in the LIMS",
                    analysis.analysis_id
                ),
            )
        })?;
    if from_lims && !path.is_absolute() {
        return Err(tagged(
            Exit::Failed,
            format!(
                "the LIMS row of analysis {} has a relative analysis_path {:?}; it must be absolute",
                analysis.analysis_id,
                path.display().to_string()
            ),
        ));
    }
    if let Ok(real) = std::fs::canonicalize(&path) {
        let outside_roots = !d.data_roots.is_empty()
            && !d
                .data_roots
                .iter()
                .any(|r| std::fs::canonicalize(r).is_ok_and(|r| real.starts_with(r)));
        if manifest::is_forbidden(&real) || outside_roots {
            return Err(tagged(
                Exit::Failed,
                format!(
                    "analysis path {} ({}) is outside [delivery] data_roots ({}); nothing there \
                     is delivered",
                    path.display(),
                    real.display(),
                    d.data_roots
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => Ok(path),
        Ok(_) => Err(tagged(
            Exit::Failed,
            format!("analysis path {} is not a directory", path.display()),
        )),
        Err(e) => Err(tagged(
            Exit::Failed,
            format!("analysis path {} cannot be read: {e}", path.display()),
        )),
    }
}

fn walk_options(d: &DeliveryConfig) -> anyhow::Result<WalkOptions> {
    let mut reserved = vec![d.md5sum_name.clone()];
    if d.sha256 {
        reserved.push(SHA256_NAME.to_owned());
    }
    Ok(WalkOptions {
        filter: Filter::new(&d.include, &d.exclude).map_err(|m| tagged(Exit::Config, m))?,
        follow_symlinks: d.follow_symlinks,
        allowed_roots: d.data_roots.clone(),
        reserved,
    })
}

const SHA256_NAME: &str = "sha256sum.txt";

fn md5sum_text(files: &[DeliveredFile]) -> String {
    files
        .iter()
        .map(|f| manifest::checksum_line(&f.md5, &f.rel))
        .collect()
}

fn sha256sum_text(files: &[DeliveredFile]) -> String {
    files
        .iter()
        .map(|f| manifest::checksum_line(f.sha256.as_deref().unwrap_or_default(), &f.rel))
        .collect()
}

fn build_manifest(env: &Env<'_>, path: &std::path::Path) -> anyhow::Result<manifest::Manifest> {
    let m = manifest::walk(path, &walk_options(&env.delivery)?)
        .map_err(|p| tagged(Exit::Failed, format!("cannot read the delivery folder {p}")))?;
    for s in &m.skipped {
        tracing::warn!("skipped {s}");
    }
    for e in &m.entries {
        if let Some(orig) = &e.renamed_from {
            let why = if orig.contains('\u{FFFD}') {
                "is not a UTF-8 name (decoded as GB18030, or %XX for bytes that are neither)"
            } else {
                "contains control characters (written as %XX)"
            };
            tracing::warn!("{} {why}; delivered as {}", orig.escape_debug(), e.rel);
        }
    }
    if !m.problems.is_empty() {
        for p in &m.problems {
            env.events.problem(p);
        }
        return Err(tagged(
            Exit::Failed,
            format!(
                "{} file(s) in {} cannot be delivered, nothing was uploaded (first: {})",
                m.problems.len(),
                path.display(),
                m.problems[0]
            ),
        ));
    }
    if m.entries.is_empty() {
        return Err(tagged(
            Exit::Failed,
            format!(
                "nothing to deliver in {} (check [delivery] include/exclude)",
                path.display()
            ),
        ));
    }
    Ok(m)
}

async fn dry_run(
    env: &Env<'_>,
    req: &Request,
    target: &ResolvedTarget,
    mut summary: Summary,
    t0: Instant,
    delivered_on: Option<&str>,
) -> anyhow::Result<Outcome> {
    let analysis = find(env, req, &summary.analysis_id).await?;
    let path = folder_of(&env.delivery, req, &analysis)?;
    let m = build_manifest(env, &path)?;
    summary.project_id.clone_from(&analysis.project_id);
    for e in &m.entries {
        let key = target.real_key(&upload::object_key(&summary.key_prefix, &e.rel));
        let _ = env.events.printer().emit(
            "planned",
            &serde_json::json!({"rel": e.rel, "key": key, "size": e.size, "path": e.path.to_string_lossy()}),
            || format!("{}\t{key}", e.size),
        );
    }
    summary.status = if delivered_on.is_some() {
        "already_delivered".into()
    } else {
        "dry_run".into()
    };
    summary.files = m.entries.len() as u64;
    summary.bytes = m.total_bytes();
    summary.md5sum_key = Some(upload::object_key(
        &summary.key_prefix,
        &env.delivery.md5sum_name,
    ));
    summary.seconds = t0.elapsed().as_secs_f64();
    let to: Vec<String> = analysis.customer_emails.clone();
    let summary = target.shown(&summary);
    print_summary(&env.events, &summary, || {
        let again = delivered_on.map_or_else(String::new, |when| {
            format!(
                "{} was already delivered on {when}; with --force, ",
                summary.analysis_id
            )
        });
        format!(
            "dry run: {again}would deliver {} ({}) from {} to {} ({}), mail {} with Cc {}",
            count(summary.files, "file"),
            HumanBytes(summary.bytes),
            path.display(),
            target.info.name,
            summary.location,
            if to.is_empty() {
                "nobody".into()
            } else {
                to.join(", ")
            },
            analysis.staff.all().join(", ")
        )
    });
    Ok(Outcome {
        summary,
        exit: Exit::Ok,
    })
}

/// What an earlier run of the same status row already did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Earlier {
    /// It told the customer (`notified_at` is set).
    pub(crate) notified: bool,
    /// It handed every file over (`md5sum_key` is set): a vendor target is not sent
    /// the folder again.
    pub(crate) uploaded: bool,
}

/// What a run borrows from its caller for its whole length.
#[derive(Clone, Copy)]
pub(crate) struct Parts<'r, 'a> {
    /// Configuration, state database and events.
    pub(crate) env: &'r Env<'a>,
    /// What to deliver.
    pub(crate) req: &'r Request,
    /// Where to.
    pub(crate) target: &'r ResolvedTarget,
    /// Access and mail.
    pub(crate) steps: &'r dyn CustomerSteps,
    /// Stops the upload between files.
    pub(crate) cancel: &'r Cancel,
}

/// The checksum files of a delivery, as written next to its files.
#[derive(Debug, Clone)]
pub(crate) struct Checksums {
    /// The delivered files, sorted by relative path.
    pub(crate) files: Vec<DeliveredFile>,
    /// Key of md5sum.txt.
    pub(crate) md5sum_key: String,
    /// Its text.
    pub(crate) md5sum_text: String,
    /// Key and text of sha256sum.txt, when SHA-256 is on.
    pub(crate) sha256sum: Option<(String, String)>,
}

/// One delivery past its entry checks, with one method per stage. [`deliver`] makes it
/// once the status row exists and calls [`Run::stages`], which runs the stages in
/// order; each stage records what it learnt in [`Run::summary`] (and
/// [`Run::analysis`]) and in the status row, so the stages can also be run one by one.
pub(crate) struct Run<'r, 'a> {
    env: &'r Env<'a>,
    req: &'r Request,
    target: &'r ResolvedTarget,
    steps: &'r dyn CustomerSteps,
    cancel: &'r Cancel,
    /// The status row's id.
    pub(crate) id: String,
    earlier: Earlier,
    started: chrono::DateTime<Utc>,
    /// The analysis as far as it was looked up.
    pub(crate) analysis: Analysis,
    /// The summary so far.
    pub(crate) summary: Summary,
}

impl std::fmt::Debug for Run<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("id", &self.id)
            .field("earlier", &self.earlier)
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

impl<'r, 'a> Run<'r, 'a> {
    /// A run of status row `run_id`, starting now; `summary` holds the delivery's name,
    /// target and key prefix.
    pub(crate) fn new(
        parts: Parts<'r, 'a>,
        run_id: String,
        earlier: Earlier,
        summary: Summary,
    ) -> Run<'r, 'a> {
        let analysis = Analysis {
            analysis_id: summary.analysis_id.clone(),
            project_id: parts.req.project_id.clone(),
            ..Analysis::default()
        };
        Run {
            env: parts.env,
            req: parts.req,
            target: parts.target,
            steps: parts.steps,
            cancel: parts.cancel,
            id: run_id,
            earlier,
            started: Utc::now(),
            analysis,
            summary,
        }
    }

    fn stage(&self, stage: &str) {
        self.env
            .events
            .stage(stage, &self.id, &self.summary.analysis_id);
    }

    /// Every stage, in order: lookup, manifest, LIMS `on_started`, upload, checksums,
    /// confirm, uploaded, access and mail, LIMS `on_delivered`, commit.
    pub(crate) async fn stages(&mut self) -> anyhow::Result<()> {
        let path = self.lookup().await?;
        let m = self.manifest(&path).await?;
        self.lims_started().await?;
        let files = self.upload(&path, m.entries).await?;
        let sums = self.checksums(files).await?;
        self.confirm(&sums).await?;
        let report = self.uploaded(sums).await?;
        self.customer(&report).await?;
        self.lims_delivered().await?;
        self.commit().await
    }

    /// Stage `lookup`: the analysis and its contacts, and the folder to deliver
    /// (checked against `data_roots`).
    pub(crate) async fn lookup(&mut self) -> anyhow::Result<PathBuf> {
        self.stage("lookup");
        self.analysis = find(self.env, self.req, &self.summary.analysis_id).await?;
        self.summary
            .project_id
            .clone_from(&self.analysis.project_id);
        folder_of(&self.env.delivery, self.req, &self.analysis)
    }

    /// Stage `manifest`: walk the folder (every problem fails the delivery before any
    /// byte moves); the status row goes `uploading` with the counts.
    pub(crate) async fn manifest(&mut self, path: &Path) -> anyhow::Result<manifest::Manifest> {
        self.stage("manifest");
        let m = build_manifest(self.env, path)?;
        self.summary.files = m.entries.len() as u64;
        self.summary.bytes = m.total_bytes();
        let path_text = path.display().to_string();
        self.env
            .state
            .update(
                &self.id,
                &Update {
                    status: Some(Status::Uploading),
                    project_id: self.analysis.project_id.as_deref(),
                    source_path: Some(&path_text),
                    files: Some(self.summary.files),
                    bytes: Some(self.summary.bytes),
                    error: Some(""),
                    ..Update::default()
                },
            )
            .await?;
        Ok(m)
    }

    /// The LIMS `on_started` statement (delivery-upload), once per status row.
    pub(crate) async fn lims_started(&self) -> anyhow::Result<()> {
        if self.req.tool == Tool::DeliveryUpload
            && let Some(st) = &self.env.delivery.status
            && let Some(sql_text) = &st.on_started
        {
            self.once(
                "lims_on_started",
                self.lims_status(sql_text, "on_started", Status::Uploading),
            )
            .await?;
        }
        Ok(())
    }

    /// Stage `upload`: every entry to the target (a storage with the journal, or the
    /// vendor CLI). Any failed file fails the delivery (exit 75 when every failure is
    /// temporary); a cancelled upload is [`Interrupted`].
    pub(crate) async fn upload(
        &mut self,
        path: &Path,
        entries: Vec<manifest::Entry>,
    ) -> anyhow::Result<Vec<DeliveredFile>> {
        self.stage("upload");
        let env = self.env;
        let mut events = env.events.clone();
        events.set_target(self.target.storage.clone());
        events.start_progress(self.summary.files, self.summary.bytes);
        let up = if let Some(vendor) = &self.target.vendor {
            self.upload_vendor(vendor, path, entries, &events).await
        } else if let Some(storage) = &self.target.storage {
            let sc = self.target.config.as_ref();
            let opts = UploadOptions {
                parallel_small: env.delivery.parallel_files,
                parallel_large: env.delivery.parallel_large_files,
                large_bytes: env.delivery.large_file_mib.saturating_mul(1024 * 1024),
                sha256: env.delivery.sha256,
                attempts: env.delivery.attempts,
                part_size_mib: sc.and_then(|c| c.part_size_mib),
                part_concurrency: sc
                    .and_then(|c| c.part_concurrency)
                    .unwrap_or(labrelay::storage::DEFAULT_PART_CONCURRENCY),
                force: false,
            };
            let job = upload::Job {
                storage,
                state: &env.state,
                run_id: &self.id,
                prefix: &self.summary.key_prefix,
                opts: &opts,
                events: &events,
                cancel: self.cancel,
            };
            upload::upload(&job, entries).await
        } else {
            Err(tagged(
                Exit::Config,
                "the target has neither storage nor command",
            ))
        };
        events.finish_progress();
        let up = up?;
        let summary = &mut self.summary;
        summary.files_sent = up.files_sent;
        summary.files_resumed = up.files_resumed;
        summary.files_failed = up.failed.len() as u64;
        summary.bytes_sent = up.bytes_sent;
        summary.parts_sent = up.parts_sent;
        summary.parts_resumed = up.parts_resumed;
        if !up.failed.is_empty() {
            let exit = up
                .failed
                .iter()
                .map(|f| f.exit)
                .fold(Exit::TempFail, |acc, e| {
                    if e == Exit::TempFail {
                        acc
                    } else {
                        Exit::Failed
                    }
                });
            return Err(tagged(
                exit,
                format!(
                    "{} of {} files failed (first: {}: {}); run again to retry them",
                    up.failed.len(),
                    summary.files,
                    up.failed[0].rel,
                    up.failed[0].error
                ),
            ));
        }
        if up.interrupted {
            return Err(Interrupted.into());
        }
        Ok(up.delivered)
    }

    /// A vendor CLI target: the command uploads the whole folder itself, so the engine
    /// hashes every file locally (for md5sum.txt and the mail), writes md5sum.txt (and
    /// sha256sum.txt) to a scratch directory for the `upload_file` step, and runs the
    /// vendor's steps. Resume is per delivery: a run whose files were already handed to
    /// the vendor ([`Earlier::uploaded`]) only hashes them again.
    async fn upload_vendor(
        &self,
        vendor: &VendorTarget,
        path: &Path,
        entries: Vec<manifest::Entry>,
        events: &Events,
    ) -> anyhow::Result<UploadResult> {
        let env = self.env;
        let summary = &self.summary;
        if env.delivery.include != ["**"] || !env.delivery.exclude.is_empty() {
            tracing::warn!(
                "[delivery] include/exclude are checked, but the vendor command uploads the whole folder {}",
                path.display()
            );
        }
        let files = upload::hash_files(
            &summary.key_prefix,
            entries,
            env.delivery.sha256,
            env.delivery.parallel_large_files,
            events,
        )
        .await?;
        let mut result = UploadResult {
            delivered: files,
            ..UploadResult::default()
        };
        if self.earlier.uploaded {
            tracing::info!(analysis_id = %summary.analysis_id, "the vendor already has these files; not uploading again");
            result.files_resumed = result.delivered.len() as u64;
            return Ok(result);
        }
        let scratch = env.config.data_dir().join("tmp").join(&self.id);
        fs_err::create_dir_all(&scratch)?;
        let md5sum_path = scratch.join(&env.delivery.md5sum_name);
        fs_err::write(&md5sum_path, md5sum_text(&result.delivered))?;
        let mut extra = vec![md5sum_path];
        if env.delivery.sha256 {
            let p = scratch.join(SHA256_NAME);
            fs_err::write(&p, sha256sum_text(&result.delivered))?;
            extra.push(p);
        }
        let analysis = &self.analysis;
        let project = analysis.project_id.clone().ok_or_else(|| {
            tagged(
                Exit::Failed,
                format!(
                    "analysis {} has no project_id; the vendor target needs one",
                    analysis.analysis_id
                ),
            )
        })?;
        let req = VendorUpload {
            analysis_id: summary.analysis_id.clone(),
            project,
            remote_dir: summary.key_prefix.clone(),
            local_dir: path.to_owned(),
            extra_files: extra,
            customer_email: analysis
                .customer_emails
                .first()
                .cloned()
                .unwrap_or_default(),
        };
        let report = vendor
            .deliver(&req)
            .await
            .map_err(CommandError::into_anyhow)?;
        tracing::info!(steps = report.steps.len(), "vendor steps done");
        let _ = fs_err::remove_dir_all(&scratch);
        result.files_sent = result.delivered.len() as u64;
        result.bytes_sent = result.delivered.iter().map(|f| f.size).sum();
        Ok(result)
    }

    /// Stage `checksums`: md5sum.txt (and sha256sum.txt) of the delivered files,
    /// written next to them on a storage target (a vendor target got them at upload).
    pub(crate) async fn checksums(
        &mut self,
        mut files: Vec<DeliveredFile>,
    ) -> anyhow::Result<Checksums> {
        self.stage("checksums");
        files.sort_by(|a, b| a.rel.cmp(&b.rel));
        let prefix = &self.summary.key_prefix;
        let sums = Checksums {
            md5sum_text: md5sum_text(&files),
            md5sum_key: upload::object_key(prefix, &self.env.delivery.md5sum_name),
            sha256sum: self.env.delivery.sha256.then(|| {
                (
                    upload::object_key(prefix, SHA256_NAME),
                    sha256sum_text(&files),
                )
            }),
            files,
        };
        if let Some(storage) = &self.target.storage {
            upload::put_generated(
                storage,
                &sums.md5sum_key,
                Bytes::from(sums.md5sum_text.clone()),
            )
            .await?;
            if let Some((k, text)) = &sums.sha256sum {
                upload::put_generated(storage, k, Bytes::from(text.clone())).await?;
            }
        }
        self.summary.md5sum_key = Some(sums.md5sum_key.clone());
        Ok(sums)
    }

    /// Stage `confirm` (storage targets): the target holds exactly the delivered files
    /// and the checksum files below the prefix, each of its size.
    pub(crate) async fn confirm(&self, sums: &Checksums) -> anyhow::Result<()> {
        let Some(storage) = &self.target.storage else {
            return Ok(());
        };
        self.stage("confirm");
        let mut expected: BTreeMap<String, u64> =
            sums.files.iter().map(|f| (f.key.clone(), f.size)).collect();
        expected.insert(sums.md5sum_key.clone(), sums.md5sum_text.len() as u64);
        if let Some((k, text)) = &sums.sha256sum {
            expected.insert(k.clone(), text.len() as u64);
        }
        confirm_listing(storage, &self.summary.key_prefix, &expected).await
    }

    /// The status row goes `uploaded`; the report the customer steps work from.
    pub(crate) async fn uploaded(&self, sums: Checksums) -> anyhow::Result<DeliveryReport> {
        self.env
            .state
            .update(
                &self.id,
                &Update {
                    status: Some(Status::Uploaded),
                    md5sum_key: Some(&sums.md5sum_key),
                    failed_files: Some(0),
                    ..Update::default()
                },
            )
            .await?;
        let files = sums.files;
        Ok(DeliveryReport {
            delivery_id: self.id.clone(),
            tool: self.req.tool,
            analysis: self.analysis.clone(),
            target: self.target.info.clone(),
            key_prefix: self.summary.key_prefix.clone(),
            total_files: files.len() as u64,
            total_bytes: files.iter().map(|f| f.size).sum(),
            files,
            md5sum_key: sums.md5sum_key,
            md5sum_text: sums.md5sum_text,
            sha256sum_key: sums.sha256sum.map(|(k, _)| k),
            started_at: self.started,
            finished_at: Utc::now(),
        })
    }

    /// Access and the customer mail, once per status row: skipped when an earlier run
    /// recorded its outcome (the summary then shows the recorded access); otherwise
    /// its intent is recorded, [`Run::access`] and [`Run::mail`] run, and the outcome is
    /// recorded. An earlier run that stopped in between is repeated with the same
    /// Message-ID.
    pub(crate) async fn customer(&mut self, report: &DeliveryReport) -> anyhow::Result<()> {
        let env = self.env;
        let mail_step = env.state.step(&self.id, MAIL_STEP).await?;
        if self.earlier.notified || mail_step.as_ref().is_some_and(|s| s.done_at.is_some()) {
            tracing::info!(analysis_id = %self.summary.analysis_id, "customer already informed by an earlier run; not mailing again");
            if let Some(row) = env.state.run(&self.id).await? {
                self.summary.access = row.access_kind;
                self.summary.account = row.account;
                self.summary.expires_at = row.expires_at;
            }
            return Ok(());
        }
        if mail_step.is_some() {
            tracing::warn!(
                analysis_id = %self.summary.analysis_id,
                "an earlier run stopped while granting access or mailing the customer; doing it again \
                 with the same Message-ID (an outbox keeps one copy)"
            );
        }
        env.state.step_begin(&self.id, MAIL_STEP, None).await?;
        let access = self.access(report).await?;
        self.mail(report, &access).await?;
        env.state
            .step_done(&self.id, MAIL_STEP, self.summary.mail_message_id.as_deref())
            .await
    }

    fn step_context(&self) -> StepContext<'r> {
        StepContext {
            config: self.env.config,
            delivery: &self.env.delivery,
            storage: self.target.storage.as_ref(),
            state: self.env.state.db(),
        }
    }

    /// Stage `access`: grant the customer access ([`CustomerSteps::grant`]).
    pub(crate) async fn access(&self, report: &DeliveryReport) -> anyhow::Result<AccessGrant> {
        self.stage("access");
        self.steps
            .grant(self.step_context(), report)
            .await
            .map_err(|e| e.context("granting customer access"))
    }

    /// Stage `mail`: tell the customer ([`CustomerSteps::notify`]); the status row goes
    /// `notified` with the access as recorded (no password, no link).
    pub(crate) async fn mail(
        &mut self,
        report: &DeliveryReport,
        access: &AccessGrant,
    ) -> anyhow::Result<()> {
        self.stage("mail");
        let receipt = self
            .steps
            .notify(self.step_context(), report, access)
            .await
            .map_err(|e| e.context("mailing the customer"))?;
        let record = access.record();
        let summary = &mut self.summary;
        summary.access = Some(record.method.as_str().to_owned());
        summary.account.clone_from(&record.account);
        summary.expires_at = record.expires_at.map(|t| t.to_rfc3339());
        summary.mail_message_id = receipt.map(|r| r.message_id);
        let now = Utc::now().to_rfc3339();
        self.env
            .state
            .update(
                &self.id,
                &Update {
                    status: Some(Status::Notified),
                    account: record.account.as_deref(),
                    access_kind: Some(record.method.as_str()),
                    expires_at: self.summary.expires_at.as_deref(),
                    notified_at: Some(&now),
                    ..Update::default()
                },
            )
            .await
    }

    /// Stage `lims_status`: the LIMS `on_delivered` statement (delivery-upload), once
    /// per status row.
    pub(crate) async fn lims_delivered(&self) -> anyhow::Result<()> {
        if self.req.tool == Tool::DeliveryUpload
            && let Some(st) = &self.env.delivery.status
            && let Some(sql_text) = &st.on_delivered
        {
            self.stage("lims_status");
            self.once(
                "lims_on_delivered",
                self.lims_status(sql_text, "on_delivered", Status::Delivered),
            )
            .await?;
        }
        Ok(())
    }

    /// Stage `commit`: the status row goes `delivered`.
    pub(crate) async fn commit(&self) -> anyhow::Result<()> {
        self.stage("commit");
        self.env
            .state
            .update(
                &self.id,
                &Update {
                    status: Some(Status::Delivered),
                    error: Some(""),
                    ..Update::default()
                },
            )
            .await
    }

    /// The outcome of [`Run::stages`]: the summary printed (keys as they are on the
    /// target), exit 0 when delivered, 75 when interrupted; a failure is recorded in
    /// the status row (and the LIMS `on_failed` statement) and returned with the
    /// [`DeliveryFailed`] context.
    pub(crate) async fn finish(
        self,
        result: anyhow::Result<()>,
        t0: Instant,
    ) -> anyhow::Result<Outcome> {
        let env = self.env;
        let name = self.summary.analysis_id.clone();
        let mut summary = self.summary.clone();
        summary.seconds = t0.elapsed().as_secs_f64();
        match result {
            Ok(()) => {
                summary.status = "delivered".into();
                let summary = self.target.shown(&summary);
                print_summary(&env.events, &summary, || delivered_text(&summary));
                Ok(Outcome {
                    summary,
                    exit: Exit::Ok,
                })
            }
            Err(e) if e.downcast_ref::<Interrupted>().is_some() => {
                summary.status = "interrupted".into();
                summary.error = Some(e.to_string());
                print_summary(&env.events, &summary, || {
                    format!(
                        "{name}: interrupted after {} of {} files; run again to resume",
                        summary.files_sent + summary.files_resumed,
                        summary.files
                    )
                });
                Ok(Outcome {
                    summary,
                    exit: Exit::TempFail,
                })
            }
            Err(e) => {
                let error = format!("{e:#}");
                summary.status = "failed".into();
                summary.error = Some(error.clone());
                if let Err(re) = env
                    .state
                    .update(
                        &self.id,
                        &Update {
                            status: Some(Status::Failed),
                            error: Some(&error),
                            failed_files: Some(summary.files_failed),
                            ..Update::default()
                        },
                    )
                    .await
                {
                    tracing::error!("recording the failure of {name} failed: {re:#}");
                }
                let failed = Run { summary, ..self };
                if failed.req.tool == Tool::DeliveryUpload
                    && let Some(st) = &env.delivery.status
                    && let Some(sql_text) = &st.on_failed
                    && let Err(le) = failed
                        .lims_status(sql_text, "on_failed", Status::Failed)
                        .await
                {
                    tracing::error!("writing the failure of {name} to the LIMS failed: {le:#}");
                }
                // In JSON mode the failure is a summary record too; text mode has the
                // error line.
                env.events
                    .record("summary", &failed.target.shown(&failed.summary));
                Err(e.context(DeliveryFailed {
                    analysis: failed.analysis,
                    summary: failed.summary,
                }))
            }
        }
    }

    /// Run a once-only step of this run: skipped when an earlier run recorded its
    /// outcome; otherwise its intent is recorded, it runs, and its outcome is recorded.
    /// A step begun but without an outcome (a crash between the effect and the record)
    /// runs again, which is why `[delivery.status]` statements must be idempotent.
    async fn once(
        &self,
        step: &str,
        effect: impl std::future::Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        let state = &self.env.state;
        match state.step(&self.id, step).await? {
            Some(s) if s.done_at.is_some() => {
                tracing::info!(step, "done by an earlier run; not repeated");
                return Ok(());
            }
            Some(_) => tracing::warn!(
                step,
                "an earlier run stopped after starting this step; running it again"
            ),
            None => {}
        }
        state.step_begin(&self.id, step, None).await?;
        effect.await?;
        state.step_done(&self.id, step, None).await
    }

    /// Run a `[delivery.status]` statement (`which`: `on_started`…) with the run's
    /// parameters, `status` as `:status`.
    async fn lims_status(&self, sql_text: &str, which: &str, status: Status) -> anyhow::Result<()> {
        let Some(st) = &self.env.delivery.status else {
            return Ok(());
        };
        let database = st.database.as_str();
        let (analysis, summary, target) = (&self.analysis, &self.summary, self.target);
        let mut p: BTreeMap<&str, Value> = BTreeMap::new();
        p.insert("analysis_id", Value::from(summary.analysis_id.as_str()));
        p.insert("project_id", Value::from(analysis.project_id.clone()));
        p.insert("status", Value::from(status.as_str()));
        p.insert("target", Value::from(target.info.name.as_str()));
        p.insert("key_prefix", Value::from(summary.key_prefix.as_str()));
        // :path is where the customer finds the data; :source_path the local folder.
        p.insert(
            "path",
            Value::from(format!(
                "{}/{}",
                target.info.describe.trim_end_matches('/'),
                summary.key_prefix
            )),
        );
        p.insert(
            "source_path",
            Value::from(analysis.path.as_ref().map(|p| p.display().to_string())),
        );
        p.insert("files", Value::Int(summary.files as i64));
        p.insert("bytes", Value::Int(summary.bytes as i64));
        p.insert("account", Value::from(summary.account.clone()));
        // Times as `YYYY-MM-DD HH:MM:SS` in UTC: what a MariaDB DATETIME (strict mode), a
        // SQLite text column and a PostgreSQL cast (`CAST(:delivered_at AS timestamp)`)
        // all accept.
        let sql_time = |t: chrono::DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%S").to_string();
        p.insert(
            "expires_at",
            Value::from(
                summary
                    .expires_at
                    .as_deref()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| sql_time(t.with_timezone(&Utc))),
            ),
        );
        p.insert("error", Value::from(summary.error.clone()));
        p.insert("delivered_at", Value::from(sql_time(Utc::now())));
        p.insert("delivery_id", Value::from(summary.delivery_id.clone()));
        let what = format!("delivery.status.{which}");
        let db = Db::connect(self.env.config.database(database)?).await?;
        let r = sql::execute(&db, sql_text, &p, &what).await;
        db.close().await;
        r.map_err(|e| {
            e.context(format!(
                "writing the status to [databases.{database}] ({what})"
            ))
        })?;
        Ok(())
    }
}

/// The step that grants access and mails the customer (`delivery_steps`).
const MAIL_STEP: &str = "customer_mail";

/// Compare what the target holds below `prefix` with what was delivered (key → size):
/// anything missing, of another size, or extra fails the delivery before the customer
/// is told.
async fn confirm_listing(
    storage: &AnyStorage,
    prefix: &str,
    expected: &BTreeMap<String, u64>,
) -> anyhow::Result<()> {
    let listed = storage.list(prefix).await?;
    let mut missing: Vec<String> = Vec::new();
    let mut extra: Vec<String> = Vec::new();
    let mut seen = 0usize;
    for o in &listed {
        match expected.get(&o.key) {
            Some(size) if *size == o.size => seen += 1,
            Some(size) => missing.push(format!("{} ({} bytes, not {size})", o.key, o.size)),
            None => extra.push(o.key.clone()),
        }
    }
    if seen + missing.len() < expected.len() {
        let listed_keys: std::collections::HashSet<&str> =
            listed.iter().map(|o| o.key.as_str()).collect();
        missing.extend(
            expected
                .keys()
                .filter(|k| !listed_keys.contains(k.as_str()))
                .cloned(),
        );
    }
    if missing.is_empty() && extra.is_empty() {
        return Ok(());
    }
    missing.sort();
    let mut what = Vec::new();
    if let Some(first) = missing.first() {
        what.push(format!(
            "{} missing or different (first: {first})",
            missing.len()
        ));
    }
    if let Some(first) = extra.first() {
        what.push(format!(
            "{} not part of this delivery (first: {first})",
            extra.len()
        ));
    }
    Err(tagged(
        Exit::Failed,
        format!(
            "the target {} does not hold exactly this delivery below {prefix}/: {}; the customer \
             was not told",
            storage.describe(),
            what.join(", ")
        ),
    ))
}

/// The exit status of an error that stopped a delivery (for listeners deciding whether
/// to retry).
pub fn exit_of(e: &anyhow::Error) -> Exit {
    classify(e)
}

/// [`deliver`] for a command-line run: the first SIGTERM/SIGINT stops new work and lets
/// the files in flight finish and be journaled (exit 75, "run again to resume"); a
/// second one stops at once (the journal still holds every finished file and part).
pub async fn deliver_until_signalled(
    env: &Env<'_>,
    req: &Request,
    steps: &dyn CustomerSteps,
) -> anyhow::Result<Exit> {
    let cancel = Cancel::new();
    let watcher = {
        let cancel = cancel.clone();
        async move {
            labrelay::cli::shutdown_signal().await;
            tracing::warn!(
                "stopping: finishing the files in flight (signal again to stop at once)"
            );
            cancel.cancel();
            labrelay::cli::shutdown_signal().await;
        }
    };
    tokio::select! {
        r = deliver(env, req, steps, &cancel) => Ok(r?.exit),
        () = watcher => Err(tagged(Exit::TempFail, "interrupted twice; stopped at once (run again to resume)")),
    }
}

/// The last finished delivery of `analysis_id` (checked first) to `target`.
async fn finished_run(
    env: &Env<'_>,
    analysis_id: &str,
    target: &ResolvedTarget,
) -> anyhow::Result<crate::state::RunRow> {
    env.delivery.check_id(analysis_id)?;
    env.state
        .latest(analysis_id, &target.info.name)
        .await?
        .filter(|r| r.status() == Status::Delivered)
        .ok_or_else(|| {
            tagged(
                Exit::Failed,
                format!(
                    "{analysis_id} has no finished delivery to {}; deliver it first",
                    target.info.name
                ),
            )
        })
}

/// `delivery-upload links`: the customer's current access to the last finished
/// delivery of `analysis_id` — for presigned S3 access, links to every delivered file
/// (each checked on the target) valid until the recorded expiry, not a second longer;
/// for account access, the account and its expiry (never a password). Staff-only
/// output: the links are credentials.
pub async fn links(
    env: &Env<'_>,
    analysis_id: &str,
    target_name: Option<&str>,
) -> anyhow::Result<Exit> {
    let target = ResolvedTarget::resolve(env.config, &env.delivery, target_name)?;
    let row = finished_run(env, analysis_id, &target).await?;
    let now = Utc::now();
    let expires = row
        .expires_at
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc));
    let kind = row.access_kind.clone().unwrap_or_else(|| "none".into());
    let mut links = 0usize;
    if kind == "presigned"
        && let Some(storage @ AnyStorage::S3(_)) = &target.storage
    {
        let Some(until) = expires.filter(|e| *e > now) else {
            return Err(tagged(
                Exit::Failed,
                format!(
                    "the links of {analysis_id} expired on {}; `delivery-upload renew --analysis-id {analysis_id}` issues new ones",
                    row.expires_at
                        .as_deref()
                        .map_or_else(|| "-".to_owned(), human_time)
                ),
            ));
        };
        let validity = (until - now).to_std().unwrap_or_default();
        let prefix = format!("{}/", row.key_prefix);
        let mut files: Vec<_> = env.state.done_files(&row.id).await?.into_values().collect();
        files.sort_by(|a, b| a.key.cmp(&b.key));
        for f in files {
            if storage.head(&f.key).await?.is_none() {
                return Err(tagged(
                    Exit::Failed,
                    format!("{} is no longer on {}", f.key, storage.describe()),
                ));
            }
            let Some(url) = storage.presign_get(&f.key, validity).await? else {
                continue;
            };
            let rel = f.key.strip_prefix(&prefix).unwrap_or(&f.key).to_owned();
            let record = serde_json::json!({
                "rel": rel, "key": f.key, "size": f.size, "url": url.as_str(),
                "expires_at": until.to_rfc3339(),
            });
            let _ = env
                .events
                .printer()
                .emit("link", &record, || format!("{rel}\t{url}"));
            links += 1;
        }
    }
    let summary = serde_json::json!({
        "status": "links",
        "delivery_id": row.id,
        "analysis_id": analysis_id,
        "target": target.info.name,
        "access": kind,
        "account": row.account,
        "expires_at": row.expires_at,
        "links": links,
    });
    let text = match (&row.account, &row.expires_at) {
        (Some(a), Some(x)) => format!(
            "{analysis_id}: {kind} access, account {a}, until {}",
            human_time(x)
        ),
        (Some(a), None) => format!("{analysis_id}: {kind} access, account {a}"),
        (None, Some(x)) => format!(
            "{analysis_id}: {}, valid until {}",
            count(links as u64, "link"),
            human_time(x)
        ),
        (None, None) => format!("{analysis_id}: no customer access recorded ({kind})"),
    };
    if let Err(e) = env.events.printer().emit("summary", &summary, || text) {
        tracing::debug!("writing the summary failed: {e}");
    }
    Ok(Exit::Ok)
}

/// `delivery-upload renew`: re-issue the presigned links of the last finished delivery
/// of `analysis_id` to its S3 target, valid `[delivery.access] expiry_days` from now,
/// mail them to the customer again and record the new expiry. The files come from the
/// journal; each is checked on the target before a link is made.
pub async fn renew(
    env: &Env<'_>,
    steps: &crate::steps::DeliverySteps,
    analysis_id: &str,
    target_name: Option<&str>,
) -> anyhow::Result<Exit> {
    let target = ResolvedTarget::resolve(env.config, &env.delivery, target_name)?;
    let Some(storage @ AnyStorage::S3(_)) = &target.storage else {
        return Err(labrelay::exit::usage(format!(
            "renew re-issues presigned links, which only S3 targets have; {} is {}",
            target.info.name, target.info.describe
        )));
    };
    let row = finished_run(env, analysis_id, &target).await?;
    let lookup = env.delivery.lookup.as_ref().ok_or_else(|| {
        tagged(
            Exit::Config,
            "renew needs [delivery.lookup] for the contacts",
        )
    })?;
    let mut analysis =
        lookup::lookup(env.config, lookup, &Key::Analysis(analysis_id.to_owned())).await?;
    analysis.project_id = analysis.project_id.or(row.project_id.clone());
    let prefix = format!("{}/", row.key_prefix);
    let mut files: Vec<DeliveredFile> = env
        .state
        .done_files(&row.id)
        .await?
        .into_values()
        .map(|d| DeliveredFile {
            rel: d.key.strip_prefix(&prefix).unwrap_or(&d.key).to_owned(),
            key: d.key,
            size: d.size,
            md5: d.md5,
            sha256: d.sha256,
        })
        .collect();
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    let now = Utc::now();
    let report = DeliveryReport {
        // Its own Message-ID: a renewal is a new mail, not a repeat of the delivery's.
        delivery_id: format!("{}-renewed-{}", row.id, now.format("%Y%m%dT%H%M%S")),
        tool: Tool::DeliveryUpload,
        analysis,
        target: target.info.clone(),
        key_prefix: row.key_prefix.clone(),
        total_files: files.len() as u64,
        total_bytes: files.iter().map(|f| f.size).sum(),
        md5sum_text: md5sum_text(&files),
        files,
        md5sum_key: row.md5sum_key.clone().unwrap_or_default(),
        sha256sum_key: None,
        started_at: now,
        finished_at: now,
    };
    let req = crate::access::AccessRequest::from_report(&report);
    let grant = crate::access::renew(storage, &req.files, steps.access().expiry_days(), now)
        .await
        .map_err(crate::access::AccessError::into_anyhow)?;
    let ctx = StepContext {
        config: env.config,
        delivery: &env.delivery,
        storage: Some(storage),
        state: env.state.db(),
    };
    let receipt = steps
        .notify(ctx, &report, &grant)
        .await
        .map_err(|e| e.context("mailing the renewed links"))?;
    let expires_at = grant.expires_at.map(|t| t.to_rfc3339());
    env.state
        .update(
            &row.id,
            &Update {
                expires_at: expires_at.as_deref(),
                access_kind: Some(grant.method.as_str()),
                ..Update::default()
            },
        )
        .await?;
    let summary = serde_json::json!({
        "status": "renewed",
        "delivery_id": row.id,
        "analysis_id": analysis_id,
        "target": target.info.name,
        "links": grant.links.len(),
        "expires_at": expires_at,
        "mail_message_id": receipt.as_ref().map(|r| r.message_id.clone()),
    });
    let text = format!(
        "renewed {} links of {analysis_id} until {}{}",
        grant.links.len(),
        expires_at.as_deref().unwrap_or("-"),
        if receipt.is_some() {
            "; customer mailed"
        } else {
            ""
        }
    );
    if let Err(e) = env.events.printer().emit("summary", &summary, || text) {
        tracing::debug!("writing the summary failed: {e}");
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    //! Each stage of [`Run`] on the embedded backends: SQLite state, a local directory
    //! as the target, the mail outbox, and a lookup command printing JSON.

    use labrelay::output::{Captured, Printer};
    use md5::{Digest as _, Md5};

    use super::*;
    use crate::steps::DeliverySteps;

    const S1: &str = "@r\nACGT\n+\nIIII\n";
    const REPORT: &str = "结题报告";

    /// A temporary home: the analysis folder `analysis/A1` (two files), the target
    /// `out/`, and a configuration whose lookup prints the folder and the contacts.
    struct Home {
        dir: tempfile::TempDir,
        config: Config,
    }

    fn home(delivery_extra: &str) -> Home {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let folder = d.join("analysis/A1");
        fs_err::create_dir_all(folder.join("clean")).unwrap();
        fs_err::write(folder.join("clean/S1.fq"), S1).unwrap();
        fs_err::write(folder.join("报告.txt"), REPORT).unwrap();
        fs_err::create_dir_all(d.join("out")).unwrap();
        fs_err::create_dir_all(d.join("data")).unwrap();
        let toml = format!(
            r#"[paths]
data_dir = "{d}/data"
[mail]
from = "Delivery <delivery@labrelay.test>"
[storage.nas]
url = "{d}/out"
[delivery]
key_prefix = "online"
{delivery_extra}
[delivery.lookup]
command = ["/bin/echo", '{{"analysis_path": "{d}/analysis/{{analysis_id}}", "project_id": "P1", "customer_email": "c@labrelay.test", "action_email": "a@labrelay.test"}}']
"#,
            d = d.display()
        );
        Home {
            config: Config::from_toml(&toml).unwrap(),
            dir,
        }
    }

    /// What a run borrows, owned by the test.
    struct Bench<'c> {
        env: Env<'c>,
        target: ResolvedTarget,
        steps: DeliverySteps,
        req: Request,
        cancel: Cancel,
        out: Captured,
    }

    impl Home {
        fn path(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }

        async fn bench(&self) -> Bench<'_> {
            let (printer, out) = Printer::capture(true);
            let env = Env::open(&self.config, Events::new(printer)).await.unwrap();
            let target = ResolvedTarget::resolve(&self.config, &env.delivery, None).unwrap();
            let steps = DeliverySteps::new(&self.config, &env.delivery).unwrap();
            Bench {
                env,
                target,
                steps,
                req: Request {
                    tool: Tool::DeliveryUpload,
                    analysis_id: Some("A1".into()),
                    project_id: None,
                    path: None,
                    name: None,
                    target: None,
                    dry_run: false,
                    force: false,
                    request_id: None,
                },
                cancel: Cancel::new(),
                out,
            }
        }

        fn outbox(&self) -> Vec<PathBuf> {
            let dir = self.config.outbox_dir();
            let mut v: Vec<PathBuf> = fs_err::read_dir(&dir)
                .map(|r| r.map(|e| e.unwrap().path()).collect())
                .unwrap_or_default();
            v.retain(|p| p.extension().is_some_and(|x| x == "eml"));
            v
        }
    }

    impl Bench<'_> {
        /// A new status row and a run of it.
        async fn run(&self, earlier: Earlier) -> Run<'_, '_> {
            let id = self
                .env
                .state
                .create_run(&NewRun {
                    tool: self.req.tool.as_str(),
                    analysis_id: "A1",
                    project_id: None,
                    target: &self.target.info.name,
                    target_id: &self.target.id,
                    key_prefix: "online/A1",
                    request_id: None,
                })
                .await
                .unwrap();
            self.run_of(id, earlier)
        }

        /// Another run of an existing row (a re-run).
        fn run_of(&self, id: String, earlier: Earlier) -> Run<'_, '_> {
            let summary = Summary {
                analysis_id: "A1".into(),
                target: self.target.info.name.clone(),
                target_url: self.target.url(),
                key_prefix: "online/A1".into(),
                delivery_id: Some(id.clone()),
                ..Summary::default()
            };
            Run::new(
                Parts {
                    env: &self.env,
                    req: &self.req,
                    target: &self.target,
                    steps: &self.steps,
                    cancel: &self.cancel,
                },
                id,
                earlier,
                summary,
            )
        }

        async fn row(&self, id: &str) -> crate::state::RunRow {
            self.env.state.run(id).await.unwrap().unwrap()
        }
    }

    fn md5_hex(text: &str) -> String {
        hex::encode(Md5::digest(text.as_bytes()))
    }

    /// Lookup, manifest, upload and checksums of `run`: the report's input.
    async fn through_checksums(run: &mut Run<'_, '_>) -> Checksums {
        let path = run.lookup().await.unwrap();
        let m = run.manifest(&path).await.unwrap();
        let files = run.upload(&path, m.entries).await.unwrap();
        run.checksums(files).await.unwrap()
    }

    #[tokio::test]
    async fn lookup_finds_the_analysis_its_contacts_and_its_folder() {
        let h = home("");
        let b = h.bench().await;
        let mut run = b.run(Earlier::default()).await;
        let path = run.lookup().await.unwrap();
        assert_eq!(path, h.path("analysis/A1"));
        assert_eq!(run.summary.project_id.as_deref(), Some("P1"));
        assert_eq!(run.analysis.customer_emails, ["c@labrelay.test"]);
        assert_eq!(run.analysis.staff.all(), ["a@labrelay.test"]);
        b.env.state.db().close().await;

        // A folder outside data_roots is refused at the lookup, before any upload.
        let h = home("data_roots = [\"/nonexistent-root\"]");
        let b = h.bench().await;
        let mut run = b.run(Earlier::default()).await;
        let err = run.lookup().await.unwrap_err();
        assert_eq!(classify(&err), Exit::Failed);
        assert!(err.to_string().contains("data_roots"), "{err}");
    }

    #[tokio::test]
    async fn manifest_counts_the_files_and_marks_the_row_uploading() {
        let h = home("");
        let b = h.bench().await;
        let mut run = b.run(Earlier::default()).await;
        let path = run.lookup().await.unwrap();
        let m = run.manifest(&path).await.unwrap();
        let bytes = (S1.len() + REPORT.len()) as u64;
        assert_eq!(m.entries.len(), 2);
        assert_eq!((run.summary.files, run.summary.bytes), (2, bytes));
        let row = b.row(&run.id).await;
        assert_eq!(row.status(), Status::Uploading);
        assert_eq!((row.files, row.bytes), (2, bytes as i64));
        assert_eq!(row.project_id.as_deref(), Some("P1"));
        assert_eq!(
            row.source_path.as_deref(),
            Some(path.display().to_string().as_str())
        );

        let empty = h.path("empty");
        fs_err::create_dir(&empty).unwrap();
        let err = run.manifest(&empty).await.unwrap_err();
        assert!(err.to_string().contains("nothing to deliver"), "{err}");
    }

    #[tokio::test]
    async fn upload_checksums_and_confirm_put_exactly_the_delivery_on_the_target() {
        let h = home("");
        let b = h.bench().await;
        let mut run = b.run(Earlier::default()).await;
        let sums = through_checksums(&mut run).await;
        assert_eq!((run.summary.files_sent, run.summary.files_failed), (2, 0));
        assert_eq!(
            fs_err::read_to_string(h.path("out/online/A1/clean/S1.fq")).unwrap(),
            S1
        );
        assert_eq!(
            fs_err::read_to_string(h.path("out/online/A1/报告.txt")).unwrap(),
            REPORT
        );
        // The journal holds both files, for a resume.
        assert_eq!(b.env.state.done_files(&run.id).await.unwrap().len(), 2);
        // md5sum.txt lists both, sorted by path, and lies next to them.
        let md5sum = fs_err::read_to_string(h.path("out/online/A1/md5sum.txt")).unwrap();
        assert_eq!(
            md5sum,
            format!(
                "{}  clean/S1.fq\n{}  报告.txt\n",
                md5_hex(S1),
                md5_hex(REPORT)
            )
        );
        assert_eq!(sums.md5sum_text, md5sum);
        assert_eq!(
            run.summary.md5sum_key.as_deref(),
            Some("online/A1/md5sum.txt")
        );
        run.confirm(&sums).await.unwrap();

        // Anything else below the prefix fails the confirmation: the customer would
        // get more than was delivered.
        fs_err::write(h.path("out/online/A1/stray.txt"), "x").unwrap();
        let err = run.confirm(&sums).await.unwrap_err();
        assert_eq!(classify(&err), Exit::Failed);
        assert!(
            err.to_string().contains("not part of this delivery"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_second_run_resumes_the_upload_from_the_journal() {
        let h = home("");
        let b = h.bench().await;
        let mut first = b.run(Earlier::default()).await;
        through_checksums(&mut first).await;
        let mut again = b.run_of(first.id.clone(), Earlier::default());
        let path = again.lookup().await.unwrap();
        let m = again.manifest(&path).await.unwrap();
        again.upload(&path, m.entries).await.unwrap();
        assert_eq!(
            (again.summary.files_sent, again.summary.files_resumed),
            (0, 2)
        );
    }

    #[tokio::test]
    async fn uploaded_then_access_and_mail_notify_the_customer_once() {
        let h = home("");
        let b = h.bench().await;
        let mut run = b.run(Earlier::default()).await;
        let sums = through_checksums(&mut run).await;
        let report = run.uploaded(sums).await.unwrap();
        let row = b.row(&run.id).await;
        assert_eq!(row.status(), Status::Uploaded);
        assert_eq!(row.md5sum_key.as_deref(), Some("online/A1/md5sum.txt"));
        assert_eq!(report.total_files, 2);
        assert_eq!(report.analysis.customer_emails, ["c@labrelay.test"]);
        assert!(h.outbox().is_empty());

        run.customer(&report).await.unwrap();
        let mails = h.outbox();
        assert_eq!(mails.len(), 1, "{mails:?}");
        let mail = fs_err::read_to_string(&mails[0]).unwrap();
        assert!(mail.contains("c@labrelay.test"), "{mail}");
        assert!(mail.contains("md5sum.txt"), "{mail}");
        let row = b.row(&run.id).await;
        assert_eq!(row.status(), Status::Notified);
        assert_eq!(row.access_kind.as_deref(), Some("none"));
        assert!(row.notified_at.is_some());
        let step = b.env.state.step(&run.id, MAIL_STEP).await.unwrap().unwrap();
        assert!(step.done_at.is_some());
        assert_eq!(step.detail, run.summary.mail_message_id);
        assert!(run.summary.mail_message_id.is_some());

        // A re-run of the row does not mail again: it shows the recorded access.
        fs_err::remove_file(&mails[0]).unwrap();
        let mut again = b.run_of(run.id.clone(), Earlier::default());
        again.customer(&report).await.unwrap();
        assert!(h.outbox().is_empty(), "mailed twice");
        assert_eq!(again.summary.access.as_deref(), Some("none"));
        assert_eq!(again.summary.mail_message_id, None);
    }

    #[tokio::test]
    async fn access_and_mail_are_separate_stages() {
        let h = home("");
        let b = h.bench().await;
        let mut run = b.run(Earlier::default()).await;
        let sums = through_checksums(&mut run).await;
        let report = run.uploaded(sums).await.unwrap();
        let grant = run.access(&report).await.unwrap();
        assert_eq!(grant.method, crate::access::AccessMethod::None);
        // Access alone tells nobody and records nothing.
        assert!(h.outbox().is_empty());
        assert_eq!(b.row(&run.id).await.status(), Status::Uploaded);
        run.mail(&report, &grant).await.unwrap();
        assert_eq!(h.outbox().len(), 1);
        assert_eq!(b.row(&run.id).await.status(), Status::Notified);
    }

    #[tokio::test]
    async fn commit_marks_the_row_delivered_and_finish_prints_the_summary() {
        let h = home("");
        let b = h.bench().await;
        let mut run = b.run(Earlier::default()).await;
        let result = run.stages().await;
        assert!(result.is_ok(), "{result:?}");
        let id = run.id.clone();
        assert_eq!(b.row(&id).await.status(), Status::Delivered);
        let outcome = run.finish(result, Instant::now()).await.unwrap();
        assert_eq!(outcome.exit, Exit::Ok);
        assert_eq!(outcome.summary.status, "delivered");
        assert_eq!(outcome.summary.files, 2);
        let records = b.out.records();
        let summary = records.last().unwrap();
        assert_eq!(summary["type"], "summary", "{records:?}");
        assert_eq!(summary["status"], "delivered");
        assert_eq!(summary["delivery_id"], id.as_str());
    }

    #[tokio::test]
    async fn a_failed_stage_is_recorded_in_the_row_and_the_error() {
        let h = home("");
        let b = h.bench().await;
        let mut run = b.run(Earlier::default()).await;
        let path = run.lookup().await.unwrap();
        // The folder disappears between the lookup and the manifest.
        fs_err::remove_dir_all(&path).unwrap();
        let result = run.manifest(&path).await.map(|_| ());
        let id = run.id.clone();
        let err = run.finish(result, Instant::now()).await.unwrap_err();
        let failed = err.downcast_ref::<DeliveryFailed>().unwrap();
        assert_eq!(failed.summary.status, "failed");
        assert_eq!(failed.analysis.project_id.as_deref(), Some("P1"));
        let row = b.row(&id).await;
        assert_eq!(row.status(), Status::Failed);
        assert!(
            row.error
                .as_deref()
                .unwrap_or_default()
                .contains(&path.display().to_string()),
            "{row:?}"
        );
        assert_eq!(b.out.records().last().unwrap()["status"], "failed");
    }

    #[tokio::test]
    async fn an_interrupted_upload_exits_75_and_keeps_the_row_open() {
        let h = home("");
        let b = h.bench().await;
        b.cancel.cancel();
        let mut run = b.run(Earlier::default()).await;
        let path = run.lookup().await.unwrap();
        let m = run.manifest(&path).await.unwrap();
        let result = run.upload(&path, m.entries).await.map(|_| ());
        assert!(
            result
                .as_ref()
                .is_err_and(|e| e.downcast_ref::<Interrupted>().is_some()),
            "{result:?}"
        );
        let id = run.id.clone();
        let outcome = run.finish(result, Instant::now()).await.unwrap();
        assert_eq!(outcome.exit, Exit::TempFail);
        assert_eq!(outcome.summary.status, "interrupted");
        assert_eq!(b.row(&id).await.status(), Status::Uploading);
    }
}
