//! The stages of one delivery ([`Run`]), after [`super::deliver`]'s entry checks: one
//! method per stage, each recording what it learnt in the run's summary and in the
//! status row; the once-only steps record intent and outcome in `delivery_steps`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use chrono::Utc;
use labrelay::db::Db;
use labrelay::exit::Exit;

use crate::error::DeliveryError;
use labrelay::storage::{AnyStorage, ObjectStorage};

use super::{
    DeliveryFailed, Env, Outcome, Request, ResolvedTarget, SHA256_NAME, Summary, build_manifest,
    delivered_text, find, folder_of, md5sum_text, print_summary, sha256sum_text,
};
use crate::access::AccessGrant;
use crate::events::Events;
use crate::manifest;
use crate::report::{Analysis, CustomerSteps, DeliveredFile, DeliveryReport, StepContext, Tool};
use crate::sql::{self, Value};
use crate::state::{Status, Update};
use crate::upload::{self, Cancel, Interrupted, UploadOptions, UploadResult};
use crate::vendor::{VendorTarget, VendorUpload};

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
            Err(DeliveryError::EmptyTarget.into())
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
            return Err(DeliveryError::FilesFailed {
                failed: up.failed.len(),
                files: summary.files,
                first: up.failed[0].rel.clone(),
                reason: up.failed[0].error.clone(),
                class: exit,
            }
            .into());
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
        let project = analysis
            .project_id
            .clone()
            .ok_or_else(|| DeliveryError::NoProjectId(analysis.analysis_id.clone()))?;
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
        let report = vendor.deliver(&req).await.map_err(anyhow::Error::from)?;
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
    Err(DeliveryError::TargetMismatch {
        target: storage.describe(),
        prefix: prefix.to_owned(),
        what: what.join(", "),
    }
    .into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    //! Each stage of [`Run`] on the embedded backends: SQLite state, a local directory
    //! as the target, the mail outbox, and a lookup command printing JSON.

    use labrelay::config::Config;
    use labrelay::exit::classify;
    use labrelay::output::{Captured, Printer};
    use md5::{Digest as _, Md5};

    use super::*;
    use crate::run::{Env, Request, ResolvedTarget, Summary};
    use crate::state::NewRun;
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
