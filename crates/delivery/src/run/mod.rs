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
//! over to a `Run` (submodule `stages`), which has one method per stage (lookup,
//! manifest, upload, checksums, confirm, access, mail, LIMS status, commit) and records
//! each stage's outcome in the summary and the status row.
//!
//! Inputs are checked at the entry: the analysis id against
//! `[delivery] analysis_id_pattern`, the folder against `data_roots`, the target's root
//! and the customer's access to it before any byte moves.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use chrono::Utc;
use indicatif::HumanBytes;
use labrelay::config::{Config, StorageConfig};
use labrelay::db::Db;
use labrelay::exit::{Exit, classify};

use crate::error::DeliveryError;
use labrelay::lock::InstanceLock;
use labrelay::storage::{AnyStorage, ObjectStorage, Target};
use serde::Serialize;

use crate::config::DeliveryConfig;
use crate::events::Events;
use crate::lookup::{self, Key};
use crate::manifest::{self, Filter, WalkOptions};
use crate::report::{
    Analysis, CustomerSteps, DeliveredFile, DeliveryReport, StepContext, TargetInfo, TargetKind,
    Tool,
};
use crate::sql;
use crate::state::{NewRun, State, Status, Update};
use crate::upload::{self, Cancel};
use crate::vendor::{VendorConfig, VendorTarget};

mod stages;

use self::stages::{Earlier, Parts, Run};

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
                    return Err(DeliveryError::NoTarget.into());
                }
                (Some(_), Some(_)) => {
                    return Err(DeliveryError::AmbiguousTarget {
                        names: config
                            .storage
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", "),
                    }
                    .into());
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
                .map_err(anyhow::Error::from)?;
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
        Err(DeliveryError::UnknownTarget(name.clone()).into())
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
            let l = env
                .delivery
                .lookup
                .as_ref()
                .ok_or(DeliveryError::MissingSection {
                    needs: "delivery-upload",
                    section: "[delivery.lookup] (sql on a [databases.NAME], or a command)",
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
        .ok_or_else(|| DeliveryError::NoAnalysisPath(analysis.analysis_id.clone()))?;
    if from_lims && !path.is_absolute() {
        return Err(DeliveryError::RelativeAnalysisPath {
            id: analysis.analysis_id.clone(),
            path: path.display().to_string(),
        }
        .into());
    }
    if let Ok(real) = std::fs::canonicalize(&path) {
        let outside_roots = !d.data_roots.is_empty()
            && !d
                .data_roots
                .iter()
                .any(|r| std::fs::canonicalize(r).is_ok_and(|r| real.starts_with(r)));
        if manifest::is_forbidden(&real) || outside_roots {
            return Err(DeliveryError::OutsideDataRoots {
                path,
                real,
                roots: d
                    .data_roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
            .into());
        }
    }
    match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => Ok(path),
        Ok(_) => Err(DeliveryError::NotADirectory(path).into()),
        Err(source) => Err(DeliveryError::Unreadable { path, source }.into()),
    }
}

fn walk_options(d: &DeliveryConfig) -> anyhow::Result<WalkOptions> {
    let mut reserved = vec![d.md5sum_name.clone()];
    if d.sha256 {
        reserved.push(SHA256_NAME.to_owned());
    }
    Ok(WalkOptions {
        filter: Filter::new(&d.include, &d.exclude).map_err(DeliveryError::Filter)?,
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
        .map_err(|p| DeliveryError::Walk(p.to_string()))?;
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
        return Err(DeliveryError::Problems {
            count: m.problems.len(),
            path: path.to_owned(),
            first: m.problems[0].to_string(),
        }
        .into());
    }
    if m.entries.is_empty() {
        return Err(DeliveryError::NothingToDeliver(path.to_owned()).into());
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
        () = watcher => Err(DeliveryError::InterruptedTwice.into()),
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
            DeliveryError::NoFinishedDelivery {
                id: analysis_id.to_owned(),
                target: target.info.name.clone(),
            }
            .into()
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
            return Err(DeliveryError::LinksExpired {
                id: analysis_id.to_owned(),
                expired: row
                    .expires_at
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), human_time),
            }
            .into());
        };
        let validity = (until - now).to_std().unwrap_or_default();
        let prefix = format!("{}/", row.key_prefix);
        let mut files: Vec<_> = env.state.done_files(&row.id).await?.into_values().collect();
        files.sort_by(|a, b| a.key.cmp(&b.key));
        for f in files {
            if storage.head(&f.key).await?.is_none() {
                return Err(DeliveryError::Gone {
                    key: f.key.clone(),
                    target: storage.describe(),
                }
                .into());
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
    let lookup = env
        .delivery
        .lookup
        .as_ref()
        .ok_or(DeliveryError::MissingSection {
            needs: "renew",
            section: "[delivery.lookup] for the contacts",
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
        .map_err(anyhow::Error::from)?;
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
mod wording_tests {
    use super::*;

    #[test]
    fn times_and_counts_read_as_people_write_them() {
        assert_eq!(
            human_time("2026-11-30T20:57:03+08:00"),
            "2026-11-30 12:57 UTC"
        );
        assert_eq!(human_time("2026-11-30T12:57:59Z"), "2026-11-30 12:57 UTC");
        // Not a time: shown as it is, never hidden.
        assert_eq!(human_time("tomorrow"), "tomorrow");
        assert_eq!(count(0, "file"), "0 files");
        assert_eq!(count(1, "file"), "1 file");
        assert_eq!(count(2, "mail"), "2 mails");
    }
}
