//! What a delivery tells the world while it runs: JSON Lines records on stdout with
//! `--json`, a progress bar on stderr for people, log lines for everything else.
//!
//! Records (`"type"` first):
//!
//! | type | when | fields |
//! |---|---|---|
//! | `stage` | a step begins | `stage` (`lookup`, `manifest`, `upload`, `checksums`, `access`, `mail`, `lims_status`, `commit`), `delivery_id`, `analysis_id` |
//! | `problem` | the manifest found a file that cannot be delivered | `path`, `message` |
//! | `file` | a file is on the target and verified | `key`, `rel`, `size`, `md5`, `sha256`, `parts`, `parts_sent`, `resumed` |
//! | `file_failed` | a file could not be delivered | `key`, `rel`, `error` |
//! | `summary` | the delivery ends | see [`crate::run::Summary`] |
//!
//! In text mode only the summary goes to stdout; failures are logged on stderr. When
//! stderr is not a terminal (cron, a service), a progress line is logged at info level
//! every 10 seconds instead of the bar.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::ProgressBar;
use labrelay::output::Printer;
use serde::Serialize;

/// How often a progress line is logged when stderr is not a terminal.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The event sink of one delivery; cheap to clone.
#[derive(Clone, Debug)]
pub struct Events {
    out: Printer,
    bar: ProgressBar,
    files_done: Arc<AtomicU64>,
    files_total: Arc<AtomicU64>,
    bytes_done: Arc<AtomicU64>,
    ticker: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// The target, so records show where a key really is (an S3 URL's prefix included).
    target: Option<labrelay::storage::AnyStorage>,
}

/// A `file` record.
#[derive(Debug, Clone, Serialize)]
pub struct FileEvent<'a> {
    /// Object key.
    pub key: &'a str,
    /// Path relative to the folder.
    pub rel: &'a str,
    /// Size.
    pub size: u64,
    /// MD5.
    pub md5: &'a str,
    /// SHA-256, when computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<&'a str>,
    /// Multipart parts (0: one request).
    pub parts: u32,
    /// Parts sent by this run (the others were finished by an earlier run).
    pub parts_sent: u32,
    /// Finished by an earlier run (nothing sent now).
    pub resumed: bool,
    /// Times the whole file was sent by this run (1 unless a temporary failure made the
    /// retry layer send it again; 0 when resumed).
    pub attempts: u32,
    /// Requests sent again inside those attempts (a part or a PUT retried by the
    /// storage client after a temporary failure).
    pub retries: u32,
}

impl Events {
    /// Events on `out`.
    pub fn new(out: Printer) -> Events {
        Events {
            out,
            bar: ProgressBar::hidden(),
            files_done: Arc::default(),
            files_total: Arc::default(),
            bytes_done: Arc::default(),
            ticker: Arc::default(),
            target: None,
        }
    }

    /// Show keys as they are on `target` in `file` and `file_failed` records.
    pub fn set_target(&mut self, target: Option<labrelay::storage::AnyStorage>) {
        self.target = target;
    }

    /// `key` as it really is on the target.
    pub fn real_key(&self, key: &str) -> String {
        self.target
            .as_ref()
            .map_or_else(|| key.to_owned(), |t| t.real_key(key))
    }

    /// The printer.
    pub fn printer(&self) -> &Printer {
        &self.out
    }

    /// Start the progress bar (bytes, with the file count as its message).
    pub fn start_progress(&mut self, files: u64, bytes: u64) {
        self.bar = self.out.progress(bytes, true);
        self.files_total.store(files, Ordering::Relaxed);
        self.files_done.store(0, Ordering::Relaxed);
        self.bar.set_message(format!("0/{files} files"));
        self.bytes_done.store(0, Ordering::Relaxed);
        if !std::io::IsTerminal::is_terminal(&std::io::stderr())
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let (done, total, sent) = (
                Arc::clone(&self.files_done),
                Arc::clone(&self.files_total),
                Arc::clone(&self.bytes_done),
            );
            let started = std::time::Instant::now();
            let handle = rt.spawn(async move {
                let mut tick = tokio::time::interval(PROGRESS_EVERY);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let b = sent.load(Ordering::Relaxed);
                    let rate = b as f64 / started.elapsed().as_secs_f64().max(0.001);
                    tracing::info!(
                        "progress: {}/{} files, {} of {}, {}/s",
                        done.load(Ordering::Relaxed),
                        total.load(Ordering::Relaxed),
                        indicatif::HumanBytes(b),
                        indicatif::HumanBytes(bytes),
                        indicatif::HumanBytes(rate as u64)
                    );
                }
            });
            if let Some(old) = self.lock_ticker().replace(handle) {
                old.abort();
            }
        }
    }

    fn lock_ticker(&self) -> std::sync::MutexGuard<'_, Option<tokio::task::JoinHandle<()>>> {
        self.ticker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Bytes went out.
    pub fn bytes(&self, n: u64) {
        self.bar.inc(n);
        self.bytes_done.fetch_add(n, Ordering::Relaxed);
    }

    fn file_finished(&self) {
        let done = self.files_done.fetch_add(1, Ordering::Relaxed) + 1;
        let total = self.files_total.load(Ordering::Relaxed);
        self.bar.set_message(format!("{done}/{total} files"));
    }

    /// Remove the bar.
    pub fn finish_progress(&self) {
        self.bar.finish_and_clear();
        if let Some(t) = self.lock_ticker().take() {
            t.abort();
        }
    }

    /// A JSON record (ignored in text mode). A closed stdout is not worth failing a
    /// delivery over, so write errors are only logged.
    pub fn record<T: Serialize>(&self, kind: &str, value: &T) {
        if let Err(e) = self.out.record(kind, value) {
            tracing::debug!("writing a {kind} record failed: {e}");
        }
    }

    /// A `stage` record and a log line.
    pub fn stage(&self, stage: &str, delivery_id: &str, analysis_id: &str) {
        tracing::info!(stage, delivery_id, analysis_id, "delivery step");
        self.record(
            "stage",
            &serde_json::json!({"stage": stage, "delivery_id": delivery_id, "analysis_id": analysis_id}),
        );
    }

    /// A file is done.
    pub fn file(&self, e: &FileEvent<'_>) {
        self.file_finished();
        if e.resumed {
            self.bytes(e.size);
        }
        tracing::debug!(
            key = e.key,
            size = e.size,
            md5 = e.md5,
            resumed = e.resumed,
            "file delivered"
        );
        let key = self.real_key(e.key);
        self.record(
            "file",
            &FileEvent {
                key: &key,
                ..e.clone()
            },
        );
    }

    /// A file failed.
    pub fn file_failed(&self, key: &str, rel: &str, error: &str) {
        self.file_finished();
        let key = self.real_key(key);
        tracing::error!(key, "{rel}: {error}");
        self.record(
            "file_failed",
            &serde_json::json!({"key": key, "rel": rel, "error": error}),
        );
    }

    /// A manifest problem.
    pub fn problem(&self, p: &crate::manifest::Problem) {
        tracing::error!("cannot deliver {p}");
        self.record("problem", p);
    }
}
