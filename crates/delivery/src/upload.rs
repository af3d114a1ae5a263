//! The upload engine: many files at once, parts in parallel within a large file, every
//! object verified, every finished file and part journaled so a re-run sends only what
//! is missing.
//!
//! - Concurrency: files smaller than `large_bytes` share `parallel_small` slots, larger
//!   ones `parallel_large` slots (default 16 / 4), so a few huge files never starve the
//!   thousands of small ones and vice versa.
//! - Memory is bounded whatever the number of files: tasks are spawned only when a
//!   place is free, and multipart parts are read only when an upload slot and room in
//!   a shared buffer budget ([`PART_BUDGET_MIB`]) are free.
//! - Each file is read once: the MD5 (and the optional SHA-256) is computed while the
//!   bytes stream to the target.
//! - S3 files of at least one part go up as multipart uploads driven from here (not by
//!   the storage's own `put_file`), so the upload id and each finished part are journaled
//!   in the state database. After a crash the re-run reads the file again (to hash it),
//!   sends only the parts that are not journaled, and completes the same upload. Each
//!   part's ETag must equal its MD5, and the completed object's ETag the multipart ETag.
//! - Verification: S3 single PUTs by the ETag the server returns (= MD5 of what it
//!   stored); multipart by the recomputed multipart ETag and a HEAD for the size; SFTP by
//!   `md5sum` on the server, for files from 128 MiB in up to 4 ranges at once (size when
//!   the account has no shell); local by size. Every S3 request also carries
//!   `Content-MD5`, which the server checks before storing.
//! - Resume trusts the target, not the journal: a journaled file (same size and mtime)
//!   counts as delivered only after the target confirms it in this run — S3 by HEAD
//!   (size and ETag), a local directory by size and the MD5 of the stored copy, SFTP by
//!   size and, when the server's `md5sum` verified it before ([`SFTP_MD5_VERIFIED`]),
//!   by `md5sum` again. Anything missing or different is sent again.
//! - Temporary errors (75-class) are retried under `[retry]` ([`labrelay::retry`]), by
//!   exactly one layer: a part or a buffered PUT by the storage client, a file whose
//!   stream broke off by [`one_file`].
//! - [`Cancel`]: no new file or part starts; the ones in flight finish and are
//!   journaled (SIGTERM under `--listen`, Ctrl-C on the command line).

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use labrelay::exit::{Exit, classify};
use labrelay::hash::Md5Parts;
use labrelay::storage::{
    AnyStorage, MultipartUpload, ObjectStorage, PutOptions, PutOutcome, S3Storage, StorageError,
    UploadedPart, multipart_etag, part_size_for, read_full,
};
use md5::{Digest, Md5};
use sha2::Sha256;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::events::{Events, FileEvent};
use crate::manifest::Entry;
use crate::report::DeliveredFile;
use crate::state::{DoneFile, State};

const MIB: u64 = 1024 * 1024;

/// A stop request shared by everything of one run; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A fresh, unset flag.
    pub fn new() -> Cancel {
        Cancel::default()
    }
    /// Ask everything to stop after the work in flight.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether a stop was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The run stopped because of [`Cancel`]; what is journaled stays journaled.
#[derive(Debug, thiserror::Error)]
#[error("interrupted; run again to resume")]
pub struct Interrupted;

/// How to upload.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// Small files at once.
    pub parallel_small: usize,
    /// Large files at once.
    pub parallel_large: usize,
    /// Size from which a file is large.
    pub large_bytes: u64,
    /// Compute SHA-256 too.
    pub sha256: bool,
    /// `[storage.NAME] part_size_mib`.
    pub part_size_mib: Option<u64>,
    /// Parts of one file in flight.
    pub part_concurrency: usize,
    /// Ignore the journal of finished files.
    pub force: bool,
}

impl UploadOptions {
    /// The part size for a file of `len` bytes: the configured size (grown when the file
    /// would need more than 10,000 parts), else the storage default.
    pub fn part_size(&self, len: u64) -> u64 {
        let needed = part_size_for(len);
        match self.part_size_mib {
            Some(mib) => (mib * MIB).max(needed),
            None => needed,
        }
    }
}

/// A file that could not be delivered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FailedFile {
    /// Path relative to the folder.
    pub rel: String,
    /// Object key.
    pub key: String,
    /// Why.
    pub error: String,
    /// The exit class of the error (75 when retrying later may help).
    pub exit: Exit,
}

/// What an upload did.
#[derive(Debug, Clone, Default)]
pub struct UploadResult {
    /// Delivered files (sent now or finished by an earlier run), sorted by key.
    pub delivered: Vec<DeliveredFile>,
    /// Files that failed.
    pub failed: Vec<FailedFile>,
    /// Files sent by this run.
    pub files_sent: u64,
    /// Files finished by an earlier run (journal).
    pub files_resumed: u64,
    /// Bytes sent by this run.
    pub bytes_sent: u64,
    /// Multipart parts sent by this run.
    pub parts_sent: u64,
    /// Multipart parts finished by an earlier run and not sent again.
    pub parts_resumed: u64,
    /// Stopped by [`Cancel`] before every file was done.
    pub interrupted: bool,
}

struct Ctx {
    storage: AnyStorage,
    state: State,
    run_id: String,
    opts: UploadOptions,
    events: Events,
    cancel: Cancel,
    journal: mpsc::Sender<DoneFile>,
    bytes_sent: AtomicU64,
    parts_sent: AtomicU64,
    parts_resumed: AtomicU64,
    remote_md5_broken: AtomicBool,
    /// MiB of multipart part buffers in memory at once, across all files.
    part_budget: Arc<Semaphore>,
}

/// The shared budget of part buffers (MiB) across every file of an upload: with 4
/// large files × 4 parts in flight × 8 MiB parts this is what bounds memory, not the
/// number of files.
pub const PART_BUDGET_MIB: u32 = 64;

/// The object key of a file: `<prefix>/<rel>`.
pub fn object_key(prefix: &str, rel: &str) -> String {
    if prefix.is_empty() {
        rel.to_owned()
    } else {
        format!("{prefix}/{rel}")
    }
}

/// Where and how an upload runs.
#[derive(Debug, Clone, Copy)]
pub struct Job<'a> {
    /// The target.
    pub storage: &'a AnyStorage,
    /// The state database (journal).
    pub state: &'a State,
    /// The delivery run the journal belongs to.
    pub run_id: &'a str,
    /// Key prefix of every file.
    pub prefix: &'a str,
    /// Options.
    pub opts: &'a UploadOptions,
    /// Events.
    pub events: &'a Events,
    /// Stop request.
    pub cancel: &'a Cancel,
}

/// A file on the target, and whether an earlier run had sent it (confirmed now).
type Done = (DeliveredFile, bool);

/// What one file's task ends with.
type Settled = (Entry, String, anyhow::Result<Option<Done>>);

/// Count one finished task into the result.
fn settle(
    result: &mut UploadResult,
    events: &Events,
    joined: Result<Settled, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    let (entry, key, r) = joined.map_err(|e| anyhow::anyhow!("upload task failed: {e}"))?;
    match r {
        Ok(Some((d, true))) => {
            result.files_resumed += 1;
            result.delivered.push(d);
        }
        Ok(Some((d, false))) => {
            result.files_sent += 1;
            result.delivered.push(d);
        }
        Ok(None) => result.interrupted = true,
        Err(e) if e.downcast_ref::<Interrupted>().is_some() => result.interrupted = true,
        Err(e) => {
            let error = format!("{e:#}");
            events.file_failed(&key, &entry.rel, &error);
            result.failed.push(FailedFile {
                rel: entry.rel,
                key,
                error,
                exit: classify(&e),
            });
        }
    }
    Ok(())
}

/// Upload `entries` below the job's prefix, journaling under its run.
pub async fn upload(job: &Job<'_>, entries: Vec<Entry>) -> anyhow::Result<UploadResult> {
    let Job {
        storage,
        state,
        run_id,
        prefix,
        opts,
        events,
        cancel,
    } = *job;
    let done = if opts.force {
        HashMap::new()
    } else {
        state.done_files(run_id).await?
    };
    // Temporary files a killed run left in the target's staging folder (never in the
    // customer's folder) go before anything is sent again.
    let keys: Vec<String> = entries.iter().map(|e| object_key(prefix, &e.rel)).collect();
    let removed = storage.clean_staging(&keys).await?;
    drop(keys);
    if removed > 0 {
        tracing::info!(
            removed,
            "removed temporary files an interrupted run left behind"
        );
    }
    let (tx, mut rx) = mpsc::channel::<DoneFile>(4096);
    let writer_state = state.clone();
    let writer_run = run_id.to_owned();
    // Finished small files are committed in batches: one transaction per burst instead
    // of one per file. A crash loses at most the last batch, whose files are sent again.
    let writer = tokio::spawn(async move {
        let mut batch = Vec::new();
        while let Some(f) = rx.recv().await {
            batch.push(f);
            while batch.len() < 512 {
                match rx.try_recv() {
                    Ok(f) => batch.push(f),
                    Err(_) => break,
                }
            }
            writer_state.record_files(&writer_run, &batch).await?;
            batch.clear();
        }
        Ok::<_, anyhow::Error>(())
    });
    let ctx = Arc::new(Ctx {
        storage: storage.clone(),
        state: state.clone(),
        run_id: run_id.to_owned(),
        opts: opts.clone(),
        events: events.clone(),
        cancel: cancel.clone(),
        journal: tx,
        bytes_sent: AtomicU64::new(0),
        parts_sent: AtomicU64::new(0),
        parts_resumed: AtomicU64::new(0),
        remote_md5_broken: AtomicBool::new(false),
        part_budget: Arc::new(Semaphore::new(PART_BUDGET_MIB as usize)),
    });
    let small = Arc::new(Semaphore::new(opts.parallel_small.max(1)));
    let large = Arc::new(Semaphore::new(opts.parallel_large.max(1)));
    let mut result = UploadResult::default();
    // Tasks are spawned only when one of a bounded number of places is free, and
    // finished ones are settled as the loop goes, so memory does not grow with the
    // number of files (10^5–10^6 in single-cell deliveries).
    let inflight = Arc::new(Semaphore::new(
        opts.parallel_small.max(1) + 2 * opts.parallel_large.max(1) + 16,
    ));
    let mut set: JoinSet<Settled> = JoinSet::new();
    for entry in entries {
        let Ok(place) = Arc::clone(&inflight).acquire_owned().await else {
            break;
        };
        while let Some(joined) = set.try_join_next() {
            settle(&mut result, events, joined)?;
        }
        let key = object_key(prefix, &entry.rel);
        // A journaled file counts only after the target confirms it in this run.
        let journaled = done
            .get(&key)
            .filter(|d| d.size == entry.size && d.mtime_ns == entry.mtime_ns)
            .cloned();
        // A file sent as a multipart upload holds several parts in memory: it is large
        // whatever `large_bytes` says, so memory stays bounded by the large slots.
        let multipart =
            matches!(storage, AnyStorage::S3(_)) && entry.size >= opts.part_size(entry.size);
        let sem = if entry.size >= opts.large_bytes || multipart {
            Arc::clone(&large)
        } else {
            Arc::clone(&small)
        };
        let ctx = Arc::clone(&ctx);
        set.spawn(async move {
            let _place = place;
            let Ok(_permit) = sem.acquire_owned().await else {
                return (entry, key, Err(anyhow::anyhow!("upload slots closed")));
            };
            if ctx.cancel.is_cancelled() {
                return (entry, key, Ok(None));
            }
            if let Some(d) = journaled {
                match recheck(&ctx, &d).await {
                    Ok(true) => {
                        ctx.events.file(&FileEvent {
                            key: &key,
                            rel: &entry.rel,
                            size: d.size,
                            md5: &d.md5,
                            sha256: d.sha256.as_deref(),
                            parts: d.parts,
                            parts_sent: 0,
                            resumed: true,
                            attempts: 0,
                            retries: 0,
                        });
                        let file = DeliveredFile {
                            rel: entry.rel.clone(),
                            key: key.clone(),
                            size: d.size,
                            md5: d.md5,
                            sha256: d.sha256,
                        };
                        return (entry, key, Ok(Some((file, true))));
                    }
                    Ok(false) => {
                        tracing::warn!(
                            key,
                            "journaled as delivered but missing or different on the target; sending it again"
                        );
                    }
                    Err(e) => return (entry, key, Err(e)),
                }
                if ctx.cancel.is_cancelled() {
                    return (entry, key, Ok(None));
                }
            }
            let r = one_file(&ctx, &entry, &key).await;
            (entry, key, r.map(|d| Some((d, false))))
        });
    }
    while let Some(joined) = set.join_next().await {
        settle(&mut result, events, joined)?;
    }
    let ctx = Arc::into_inner(ctx).ok_or_else(|| anyhow::anyhow!("upload tasks still running"))?;
    result.bytes_sent = ctx.bytes_sent.load(Ordering::Relaxed);
    result.parts_sent = ctx.parts_sent.load(Ordering::Relaxed);
    result.parts_resumed = ctx.parts_resumed.load(Ordering::Relaxed);
    drop(ctx.journal);
    writer
        .await
        .map_err(|e| anyhow::anyhow!("journal writer failed: {e}"))?
        .map_err(|e| e.context("journaling finished files"))?;
    // One syncfs instead of two fsyncs per file (local directory targets).
    storage.sync().await?;
    result.delivered.sort_by(|a, b| a.key.cmp(&b.key));
    result.failed.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(result)
}

/// The marker a journal row carries in `etag` for an SFTP file whose MD5 the server
/// itself computed (`md5sum`); a resume checks such a file's MD5 on the server again.
pub const SFTP_MD5_VERIFIED: &str = "md5sum";

/// Whether the target still holds a journaled file exactly as it was delivered: S3 by
/// size and ETag (HEAD), a local directory by size and MD5 of the stored copy, SFTP by
/// size and — when the server's `md5sum` verified it before — by `md5sum` again.
/// `Ok(false)`: missing or different, send it again.
async fn recheck(ctx: &Ctx, d: &DoneFile) -> anyhow::Result<bool> {
    let Some(info) = ctx.storage.head(&d.key).await? else {
        return Ok(false);
    };
    if info.size != d.size {
        return Ok(false);
    }
    Ok(match &ctx.storage {
        AnyStorage::S3(_) => match (&info.etag, &d.etag) {
            (Some(now), Some(then)) => now
                .trim_matches('"')
                .eq_ignore_ascii_case(then.trim_matches('"')),
            // An object without an ETag cannot be confirmed: send it again.
            _ => false,
        },
        AnyStorage::Local(_) => {
            let got = ctx.storage.get_into(&d.key, std::io::sink()).await?;
            got.size == d.size && got.md5_hex == d.md5
        }
        AnyStorage::Sftp(s) => {
            if d.etag.as_deref() == Some(SFTP_MD5_VERIFIED) {
                match s.remote_md5(&d.key).await {
                    Ok(remote) => remote == d.md5,
                    Err(e @ StorageError::Connect { .. }) => return Err(e.into()),
                    Err(e) => {
                        tracing::warn!(
                            key = d.key,
                            "md5sum on the server failed: {e}; sending the file again"
                        );
                        false
                    }
                }
            } else {
                true
            }
        }
    })
}

/// Send one file and journal it. The file as a whole is retried here, under the one
/// policy of [`labrelay::retry`], only for temporary failures that no layer below has
/// retried: a stream cut off mid-file (which only this layer can replay, by reading the
/// file again) or a local read error. A part or a PUT that the storage client already
/// retried comes back as given up and is not sent again from here.
async fn one_file(ctx: &Ctx, entry: &Entry, key: &str) -> anyhow::Result<DeliveredFile> {
    let multipart = match &ctx.storage {
        AnyStorage::S3(s3) if entry.size >= ctx.opts.part_size(entry.size) => Some(s3.clone()),
        _ => None,
    };
    let multipart = &multipart;
    labrelay::retry::run(
        labrelay::retry::policy(),
        || format!("uploading {}", entry.rel),
        |attempt| async move {
            match multipart {
                Some(s3) => multipart_file(ctx, s3, entry, key, attempt).await,
                None => single_file(ctx, entry, key, attempt).await,
            }
        },
    )
    .await
    .map(|done| done.value)
    .map_err(|failed| failed.into_anyhow(|| format!("uploading {}", entry.rel)))
}

/// A reader that hashes SHA-256 and counts bytes as they pass.
struct Sha256Reader<R> {
    inner: R,
    sha: Arc<std::sync::Mutex<(Sha256, u64)>>,
}

impl<R: Read> Read for Sha256Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut g = self
            .sha
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.0.update(&buf[..n]);
        g.1 += n as u64;
        Ok(n)
    }
}

async fn single_file(
    ctx: &Ctx,
    entry: &Entry,
    key: &str,
    attempt: u32,
) -> anyhow::Result<DeliveredFile> {
    let (out, sha256) = if ctx.opts.sha256 {
        let file = fs_err::File::open(&entry.path)?;
        let sha = Arc::new(std::sync::Mutex::new((Sha256::new(), 0u64)));
        let reader = Sha256Reader {
            inner: file,
            sha: Arc::clone(&sha),
        };
        // A part as large as the file keeps S3 at one request (small files only come
        // here; large ones take the journaled multipart path).
        let opts = PutOptions {
            part_size: Some(ctx.opts.part_size(entry.size)),
            defer_sync: true,
            ..PutOptions::default()
        };
        let out = ctx.storage.put_reader(reader, key, &opts).await?;
        let (hasher, n) = {
            let g = sha
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (g.0.clone(), g.1)
        };
        if n != entry.size {
            let _ = ctx.storage.delete(key).await;
            return Err(StorageError::Changed {
                path: entry.path.clone(),
                expected: entry.size,
                actual: n,
            }
            .into());
        }
        (out, Some(hex::encode(hasher.finalize())))
    } else {
        // Local files are made durable all at once after the upload (AnyStorage::sync).
        let opts = PutOptions {
            defer_sync: true,
            ..PutOptions::default()
        };
        let out = ctx.storage.put_file(&entry.path, key, &opts).await?;
        (out, None)
    };
    ctx.bytes_sent.fetch_add(out.size, Ordering::Relaxed);
    ctx.events.bytes(out.size);
    let verified_by = verify(ctx, key, &out).await?;
    let done = DoneFile {
        key: key.to_owned(),
        size: out.size,
        mtime_ns: entry.mtime_ns,
        md5: out.md5_hex.clone(),
        sha256: sha256.clone(),
        etag: out.etag.clone().or(verified_by.map(str::to_owned)),
        parts: out.parts,
    };
    ctx.journal
        .send(done)
        .await
        .map_err(|_| anyhow::anyhow!("the journal writer stopped"))?;
    ctx.events.file(&FileEvent {
        key,
        rel: &entry.rel,
        size: out.size,
        md5: &out.md5_hex,
        sha256: sha256.as_deref(),
        parts: out.parts,
        parts_sent: out.parts,
        resumed: false,
        attempts: attempt,
        retries: out.retries,
    });
    Ok(DeliveredFile {
        rel: entry.rel.clone(),
        key: key.to_owned(),
        size: out.size,
        md5: out.md5_hex,
        sha256,
    })
}

/// Check a stored object. S3 single PUTs were already checked by the storage against
/// the ETag the server returned. Returns [`SFTP_MD5_VERIFIED`] when the server's
/// `md5sum` confirmed the bytes.
async fn verify(ctx: &Ctx, key: &str, out: &PutOutcome) -> anyhow::Result<Option<&'static str>> {
    let (size, md5) = (out.size, out.md5_hex.as_str());
    match &ctx.storage {
        // S3: checked against the ETag already. Local: the put counted the bytes it
        // wrote and renamed the file into place; the listing before the mail compares
        // every size again.
        AnyStorage::S3(_) | AnyStorage::Local(_) => Ok(None),
        AnyStorage::Sftp(s) => {
            if !ctx.remote_md5_broken.load(Ordering::Relaxed) {
                // A large file: its ranges in parallel on the server; the whole file's
                // md5sum only decides when they disagree (or the ranges cannot be
                // computed there).
                if out.range_size > 0 {
                    match s
                        .remote_md5_ranges(key, out.range_size, out.range_md5_hex.len())
                        .await
                    {
                        Ok(remote) if remote == out.range_md5_hex => {
                            return Ok(Some(SFTP_MD5_VERIFIED));
                        }
                        Ok(_) => {
                            tracing::warn!(key, "range md5sums differ; checking the whole file");
                        }
                        Err(e @ StorageError::Connect { .. }) => return Err(e.into()),
                        Err(e) => tracing::debug!(key, "range md5sums failed: {e}"),
                    }
                }
                match s.remote_md5(key).await {
                    Ok(remote) if remote == md5 => return Ok(Some(SFTP_MD5_VERIFIED)),
                    Ok(remote) => {
                        return Err(integrity(
                            &ctx.storage,
                            key,
                            format!("md5sum on the server gives {remote}, we sent {md5}"),
                        ));
                    }
                    Err(e @ StorageError::Connect { .. }) => return Err(e.into()),
                    Err(e) => {
                        // An account without a shell (internal-sftp) cannot run md5sum.
                        ctx.remote_md5_broken.store(true, Ordering::Relaxed);
                        tracing::warn!(
                            "cannot run md5sum on {}: {e}; verifying sizes only",
                            ctx.storage.describe()
                        );
                    }
                }
            }
            verify_size(&ctx.storage, key, size).await.map(|()| None)
        }
    }
}

fn integrity(storage: &AnyStorage, key: &str, message: String) -> anyhow::Error {
    StorageError::Integrity {
        target: storage.describe(),
        key: key.to_owned(),
        message,
    }
    .into()
}

async fn verify_size(storage: &AnyStorage, key: &str, size: u64) -> anyhow::Result<()> {
    match storage.head(key).await? {
        Some(info) if info.size == size => Ok(()),
        Some(info) => Err(integrity(
            storage,
            key,
            format!(
                "stored size {} differs from the {size} bytes sent",
                info.size
            ),
        )),
        None => Err(integrity(
            storage,
            key,
            "not found right after upload".into(),
        )),
    }
}

/// The local file being read part by part, with the whole-file hashes.
struct PartReader {
    file: fs_err::File,
    whole: Md5Parts,
    sha: Option<Sha256>,
    total: u64,
}

async fn read_part(mut r: PartReader, len: u64) -> anyhow::Result<(PartReader, Bytes, [u8; 16])> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        let filled = read_full(&mut r.file, &mut buf)?;
        buf.truncate(filled);
        let md5 = r.whole.part(&buf);
        if let Some(s) = &mut r.sha {
            s.update(&buf);
        }
        r.total += filled as u64;
        Ok((r, Bytes::from(buf), md5))
    })
    .await
    .map_err(|e| anyhow::anyhow!("file reader task failed: {e}"))?
}

/// Whether an S3 error says the multipart upload no longer exists (aborted, expired).
fn upload_gone(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<StorageError>(),
            Some(StorageError::NotFound { .. })
        ) || c.to_string().contains("NoSuchUpload")
    })
}

async fn multipart_file(
    ctx: &Ctx,
    s3: &S3Storage,
    entry: &Entry,
    key: &str,
    attempt: u32,
) -> anyhow::Result<DeliveredFile> {
    match multipart_once(ctx, s3, entry, key, attempt).await {
        Err(e) if upload_gone(&e) && !ctx.cancel.is_cancelled() => {
            tracing::warn!(
                key,
                "the journaled multipart upload is gone on the server; starting it again"
            );
            ctx.state.clear_multipart(&ctx.run_id, key).await?;
            multipart_once(ctx, s3, entry, key, attempt).await
        }
        r => r,
    }
}

#[allow(clippy::too_many_lines)]
async fn multipart_once(
    ctx: &Ctx,
    s3: &S3Storage,
    entry: &Entry,
    key: &str,
    attempt: u32,
) -> anyhow::Result<DeliveredFile> {
    let size = entry.size;
    let part_size = ctx.opts.part_size(size);
    let n_parts = size.div_ceil(part_size) as usize;
    let mut journal = ctx.state.multipart(&ctx.run_id, key).await?;
    if let Some(j) = &journal
        && (j.size != size || j.mtime_ns != entry.mtime_ns || j.part_size != part_size)
    {
        // The file changed since the interrupted run: its parts are worthless.
        let stale = MultipartUpload {
            key: key.to_owned(),
            upload_id: j.upload_id.clone(),
        };
        if let Err(e) = s3.abort_multipart(&stale).await {
            tracing::debug!(key, "aborting a stale multipart upload failed: {e}");
        }
        ctx.state.clear_multipart(&ctx.run_id, key).await?;
        journal = None;
    }
    let (upload, done_parts, prehashed) = if let Some(j) = journal {
        tracing::info!(
            key,
            journaled = j.parts.len(),
            parts = n_parts,
            "resuming multipart upload"
        );
        (
            MultipartUpload {
                key: key.to_owned(),
                upload_id: j.upload_id,
            },
            j.parts,
            None,
        )
    } else {
        // rclone checks a multipart object by its X-Amz-Meta-Md5chksum, and metadata is
        // fixed when the upload starts: read the file once first for its MD5, as rclone
        // does (a resumed upload keeps the metadata of the run that started it).
        let path = entry.path.clone();
        let (hashed_size, md5, _) =
            tokio::task::spawn_blocking(move || hash_file_blocking(&path, false))
                .await
                .map_err(|e| anyhow::anyhow!("hashing task failed: {e}"))??;
        if hashed_size != size {
            return Err(StorageError::Changed {
                path: entry.path.clone(),
                expected: size,
                actual: hashed_size,
            }
            .into());
        }
        let u = s3.create_multipart_with_md5(key, Some(md5)).await?;
        ctx.state
            .start_multipart(
                &ctx.run_id,
                key,
                &u.upload_id,
                part_size,
                size,
                entry.mtime_ns,
            )
            .await?;
        (u, HashMap::new(), Some(md5))
    };
    let mut reader = PartReader {
        file: fs_err::File::open(&entry.path)?,
        whole: Md5Parts::new(),
        sha: ctx.opts.sha256.then(Sha256::new),
        total: 0,
    };
    let mut part_md5 = vec![String::new(); n_parts];
    let mut etags: Vec<Option<String>> = vec![None; n_parts];
    let mut tasks: JoinSet<(usize, u64, anyhow::Result<UploadedPart>)> = JoinSet::new();
    let mut sent_now = PartTally::default();
    let mut interrupted = false;
    let mut first_error: Option<anyhow::Error> = None;
    let concurrency = ctx.opts.part_concurrency.max(1);
    for index in 0..n_parts {
        if ctx.cancel.is_cancelled() {
            interrupted = true;
            break;
        }
        if first_error.is_some() {
            break;
        }
        // A free slot first, then room in the shared buffer budget, then the read: no
        // part waits in memory for an upload slot.
        while tasks.len() >= concurrency {
            if let Some(j) = tasks.join_next().await {
                finish_part(
                    ctx,
                    key,
                    j,
                    &part_md5,
                    &mut etags,
                    &mut sent_now,
                    &mut first_error,
                )
                .await;
            }
        }
        if first_error.is_some() {
            break;
        }
        let want = part_size.min(size - index as u64 * part_size);
        let need = (want.div_ceil(MIB) as u32).clamp(1, PART_BUDGET_MIB);
        let budget = Arc::clone(&ctx.part_budget)
            .acquire_many_owned(need)
            .await
            .map_err(|_| anyhow::anyhow!("upload buffer budget closed"))?;
        let (r, data, md5_raw) = read_part(reader, want).await?;
        reader = r;
        let md5 = hex::encode(md5_raw);
        if data.len() as u64 != want {
            first_error = Some(
                StorageError::Changed {
                    path: entry.path.clone(),
                    expected: size,
                    actual: reader.total,
                }
                .into(),
            );
            break;
        }
        if let Some((etag, journaled_md5)) = done_parts.get(&index) {
            if *journaled_md5 == md5 {
                ctx.parts_resumed.fetch_add(1, Ordering::Relaxed);
                ctx.events.bytes(want);
                etags[index] = Some(etag.clone());
                part_md5[index] = md5;
                continue;
            }
            // Same size and mtime but different bytes: rewrite this part.
            tracing::warn!(
                key,
                part = index + 1,
                "journaled part differs from the file; sending it again"
            );
        }
        part_md5[index] = md5;
        let s3c = s3.clone();
        let up = upload.clone();
        tasks.spawn(async move {
            // The storage client retries the part (the bytes are in memory).
            let r = s3c
                .put_part(&up, index, data, md5_raw, true)
                .await
                .map_err(anyhow::Error::from);
            drop(budget);
            (index, want, r)
        });
    }
    while let Some(j) = tasks.join_next().await {
        finish_part(
            ctx,
            key,
            j,
            &part_md5,
            &mut etags,
            &mut sent_now,
            &mut first_error,
        )
        .await;
    }
    if let Some(e) = first_error {
        return Err(e.context(format!("uploading {}", entry.path.display())));
    }
    if interrupted {
        return Err(Interrupted.into());
    }
    if reader.total != size {
        return Err(StorageError::Changed {
            path: entry.path.clone(),
            expected: size,
            actual: reader.total,
        }
        .into());
    }
    let parts: Vec<UploadedPart> = etags
        .into_iter()
        .enumerate()
        .map(|(index, etag)| UploadedPart {
            attempts: 0,
            index,
            etag: etag.unwrap_or_default(),
        })
        .collect();
    let etag = s3.complete_multipart(&upload, parts).await?;
    let expected = multipart_etag(&part_md5).unwrap_or_default();
    if let Some(etag) = &etag
        && !etag.eq_ignore_ascii_case(&expected)
    {
        return Err(integrity(
            &ctx.storage,
            key,
            format!("server ETag {etag} differs from the expected multipart ETag {expected}"),
        ));
    }
    match s3.head(key).await? {
        Some(info) if info.size == size => {}
        other => {
            return Err(integrity(
                &ctx.storage,
                key,
                format!(
                    "stored size {:?} differs from the {size} bytes sent",
                    other.map(|o| o.size)
                ),
            ));
        }
    }
    let md5 = hex::encode(reader.whole.finalize());
    if let Some(pre) = prehashed
        && hex::encode(pre) != md5
    {
        // The object's metadata names the MD5 read before: the file changed meanwhile.
        return Err(integrity(
            &ctx.storage,
            key,
            format!(
                "the file changed while it was sent (MD5 {} before, {md5} while sending)",
                hex::encode(pre)
            ),
        ));
    }
    let sha256 = reader.sha.map(|s| hex::encode(s.finalize()));
    ctx.state
        .record_files(
            &ctx.run_id,
            &[DoneFile {
                key: key.to_owned(),
                size,
                mtime_ns: entry.mtime_ns,
                md5: md5.clone(),
                sha256: sha256.clone(),
                etag: etag.clone(),
                parts: n_parts as u32,
            }],
        )
        .await?;
    ctx.state.clear_multipart(&ctx.run_id, key).await?;
    ctx.events.file(&FileEvent {
        key,
        rel: &entry.rel,
        size,
        md5: &md5,
        sha256: sha256.as_deref(),
        parts: n_parts as u32,
        parts_sent: sent_now.sent,
        resumed: false,
        attempts: attempt,
        retries: sent_now.retries,
    });
    Ok(DeliveredFile {
        rel: entry.rel.clone(),
        key: key.to_owned(),
        size,
        md5,
        sha256,
    })
}

/// Settle one part task (its ETag was checked by `put_part`): journal it, count it.
/// Parts sent by this attempt at a file, and the requests the storage client sent again.
#[derive(Default)]
struct PartTally {
    sent: u32,
    retries: u32,
}

async fn finish_part(
    ctx: &Ctx,
    key: &str,
    joined: Result<(usize, u64, anyhow::Result<UploadedPart>), tokio::task::JoinError>,
    part_md5: &[String],
    etags: &mut [Option<String>],
    sent_now: &mut PartTally,
    first_error: &mut Option<anyhow::Error>,
) {
    let (index, len, r) = match joined {
        Ok(x) => x,
        Err(e) => {
            first_error.get_or_insert_with(|| anyhow::anyhow!("part upload task failed: {e}"));
            return;
        }
    };
    let part = match r {
        Ok(p) => p,
        Err(e) => {
            first_error.get_or_insert(e);
            return;
        }
    };
    if let Err(e) = ctx
        .state
        .record_part(&ctx.run_id, key, index, &part.etag, &part_md5[index])
        .await
    {
        first_error.get_or_insert(e.context("journaling a finished part"));
        return;
    }
    ctx.parts_sent.fetch_add(1, Ordering::Relaxed);
    ctx.bytes_sent.fetch_add(len, Ordering::Relaxed);
    ctx.events.bytes(len);
    sent_now.sent += 1;
    sent_now.retries += part.attempts.saturating_sub(1);
    etags[index] = Some(part.etag);
}

/// Upload a small generated object (md5sum.txt) and verify it like a file.
pub async fn put_generated(storage: &AnyStorage, key: &str, data: Bytes) -> anyhow::Result<String> {
    let len = data.len() as u64;
    let out = storage.put_bytes(key, data).await?;
    match storage {
        AnyStorage::S3(_) => {}
        AnyStorage::Sftp(s) => {
            if let Ok(remote) = s.remote_md5(key).await
                && remote != out.md5_hex
            {
                return Err(integrity(
                    storage,
                    key,
                    format!(
                        "md5sum on the server gives {remote}, we sent {}",
                        out.md5_hex
                    ),
                ));
            }
            verify_size(storage, key, len).await?;
        }
        AnyStorage::Local(_) => verify_size(storage, key, len).await?,
    }
    Ok(out.md5_hex)
}

/// Hash every file locally (MD5 and optionally SHA-256), `parallel` at a time: for
/// targets that move the bytes themselves (a vendor CLI uploading the folder).
pub async fn hash_files(
    prefix: &str,
    entries: Vec<Entry>,
    sha256: bool,
    parallel: usize,
    events: &Events,
) -> anyhow::Result<Vec<DeliveredFile>> {
    let sem = Arc::new(Semaphore::new(parallel.max(1)));
    let mut set: JoinSet<anyhow::Result<DeliveredFile>> = JoinSet::new();
    for entry in entries {
        let sem = Arc::clone(&sem);
        let key = object_key(prefix, &entry.rel);
        let events = events.clone();
        set.spawn(async move {
            let _permit = sem
                .acquire_owned()
                .await
                .map_err(|_| anyhow::anyhow!("hashing slots closed"))?;
            let path = entry.path.clone();
            let (size, md5, sha) =
                tokio::task::spawn_blocking(move || hash_file_blocking(&path, sha256))
                    .await
                    .map_err(|e| anyhow::anyhow!("hashing task failed: {e}"))??;
            let md5 = hex::encode(md5);
            if size != entry.size {
                return Err(StorageError::Changed {
                    path: entry.path.clone(),
                    expected: entry.size,
                    actual: size,
                }
                .into());
            }
            events.bytes(size);
            events.file(&FileEvent {
                key: &key,
                rel: &entry.rel,
                size,
                md5: &md5,
                sha256: sha.as_deref(),
                parts: 0,
                parts_sent: 0,
                resumed: false,
                // Handed to the vendor's command once, which sends it itself.
                attempts: 1,
                retries: 0,
            });
            Ok(DeliveredFile {
                rel: entry.rel,
                key,
                size,
                md5,
                sha256: sha,
            })
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.map_err(|e| anyhow::anyhow!("hashing task failed: {e}"))??);
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// Read `path` to the end: its size, MD5 (raw) and, with `sha256`, SHA-256 (hex).
fn hash_file_blocking(
    path: &std::path::Path,
    sha256: bool,
) -> std::io::Result<(u64, [u8; 16], Option<String>)> {
    let mut f = fs_err::File::open(path)?;
    let mut md5 = Md5::new();
    let mut sha = sha256.then(Sha256::new);
    let mut buf = vec![0u8; 1024 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        md5.update(&buf[..n]);
        if let Some(s) = &mut sha {
            s.update(&buf[..n]);
        }
        size += n as u64;
    }
    Ok((
        size,
        md5.finalize().into(),
        sha.map(|s| hex::encode(s.finalize())),
    ))
}
