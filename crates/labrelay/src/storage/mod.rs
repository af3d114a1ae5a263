//! Delivery storage: one trait, [`ObjectStorage`], over the places analysis results are
//! delivered to — a local directory ([`LocalStorage`]), an S3-compatible bucket
//! ([`S3Storage`], also Aliyun OSS and Garage) and an SFTP server ([`SftpStorage`]) —
//! and [`AnyStorage`], which opens the right one from a `[storage.NAME]` section.
//!
//! The contract every backend keeps:
//! - keys are `/`-separated relative paths below the target's base (see [`validate_key`]);
//! - a put is all-or-nothing: while it runs, and after it fails or is cancelled, nothing
//!   is visible under the final key (local and SFTP: a temporary file in the staging
//!   folder, then a rename; S3: single PUT or a multipart upload that is aborted on
//!   failure);
//! - a put never leaves anything but the object itself in the customer's folders: local
//!   and SFTP puts write their temporary file into [`STAGING_DIR`] at the storage root
//!   (same filesystem, so the final rename is atomic), named after a hash of the key
//!   ([`staging_key_hash`]). A killed process can leave a file there;
//!   [`ObjectStorage::clean_staging`] removes it on the next run. Keys and prefixes
//!   below [`STAGING_DIR`] are refused, and `list` never shows it;
//! - a put streams its source once, computing the MD5 on the way ([`PutOutcome`]), with
//!   memory bounded by parts in flight × part size, never the whole file;
//! - `head`/`list` report objects only, never in-progress uploads;
//! - errors know their exit class ([`StorageError::exit`]) and never contain a secret.
//!
//! - the base folder (local, SFTP) or bucket (S3) must exist: [`AnyStorage::check_root`]
//!   finds a missing one at start, as a configuration error (exit 78) naming the
//!   `[storage.NAME]` section and the folder; `create_root = true` creates the folder
//!   instead.
//!
//! This module does not decide *what* to deliver or retry; the delivery tool does.

use std::future::Future;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use md5::{Digest, Md5};

use crate::config::StorageConfig;
use crate::exit::Exit;
use crate::secret::SecretError;
use crate::ssh::SshError;

mod local;
mod s3;
mod s3_put;
mod sftp;

pub use local::LocalStorage;
pub use s3::{MultipartUpload, S3Storage, UploadedPart};
pub use sftp::SftpStorage;

/// Storage errors. None of them contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The `[storage.NAME]` settings are incomplete or invalid.
    #[error("invalid storage configuration for {target}: {message}")]
    Config {
        /// The target (URL, without credentials).
        target: String,
        /// What is wrong.
        message: String,
    },
    /// A credential could not be resolved.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// An SSH problem of the SFTP backend (connect, host key, authentication).
    #[error(transparent)]
    Ssh(#[from] SshError),
    /// A key that cannot be used.
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// Why.
        reason: &'static str,
    },
    /// The server could not be reached or did not answer in time.
    #[error("cannot reach storage {target}: {message}")]
    Connect {
        /// The target.
        target: String,
        /// Why.
        message: String,
    },
    /// The server refused the credentials or the operation.
    #[error("storage {target} refused access: {message}")]
    Auth {
        /// The target.
        target: String,
        /// The server's answer.
        message: String,
    },
    /// The object does not exist.
    #[error("{key} not found in {target}")]
    NotFound {
        /// The target.
        target: String,
        /// The key.
        key: String,
    },
    /// Any other failure of a storage operation.
    #[error("{op} {key} on {target} failed: {message}")]
    Backend {
        /// The target.
        target: String,
        /// `put`, `get`, `head`, `list`, `delete`, `presign`, `clean`.
        op: &'static str,
        /// The key or prefix.
        key: String,
        /// Why.
        message: String,
        /// Whether retrying later may help (server error, lost connection).
        temporary: bool,
    },
    /// A local file could not be read or written; the message names the file.
    #[error("{0}")]
    Local(std::io::Error),
    /// The data source of a put failed while it was read.
    #[error("reading the data for {key}: {source}")]
    Source {
        /// The key being written.
        key: String,
        /// The reader's error.
        source: std::io::Error,
    },
    /// A local file changed size while it was uploaded.
    #[error("{path} changed while it was uploaded ({expected} bytes at the start, {actual} read)")]
    Changed {
        /// The file.
        path: PathBuf,
        /// Its size when the upload started.
        expected: u64,
        /// Bytes actually read.
        actual: u64,
    },
    /// An operation that failed temporarily every time it was tried (the retry layer
    /// gave up): the last error, with the same exit class, but no longer worth retrying
    /// by a caller ([`crate::retry`]: one layer retries).
    #[error("{last} (tried {attempts} times)")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        #[source]
        last: Box<StorageError>,
    },
    /// The server's checksum (ETag) does not match what was sent.
    #[error("{key} on {target} failed verification: {message}")]
    Integrity {
        /// The target.
        target: String,
        /// The key.
        key: String,
        /// What differs.
        message: String,
    },
}

impl StorageError {
    /// Exit status: unreachable or timed-out server → 75; configuration, credentials,
    /// host keys → 78; a missing object, a local file problem or a failed check → 1.
    pub fn exit(&self) -> Exit {
        match self {
            StorageError::Config { .. } | StorageError::Auth { .. } => Exit::Config,
            StorageError::Secret(e) => e.exit(),
            StorageError::Ssh(e) => e.exit(),
            StorageError::Connect { .. } => Exit::TempFail,
            StorageError::GaveUp { last, .. } => last.exit(),
            StorageError::Backend { temporary, .. } => {
                if *temporary {
                    Exit::TempFail
                } else {
                    Exit::Failed
                }
            }
            StorageError::InvalidKey { .. }
            | StorageError::NotFound { .. }
            | StorageError::Local(_)
            | StorageError::Source { .. }
            | StorageError::Changed { .. }
            | StorageError::Integrity { .. } => Exit::Failed,
        }
    }

    /// Whether trying again may succeed: a temporary failure that no retry layer below
    /// has retried yet ([`StorageError::GaveUp`] is not).
    pub fn is_temporary(&self) -> bool {
        !matches!(self, StorageError::GaveUp { .. }) && self.exit() == Exit::TempFail
    }
}

/// Where a `[storage.NAME] url` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A local directory.
    Local(PathBuf),
    /// An S3 bucket and key prefix (no leading or trailing slash).
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix, possibly empty.
        prefix: String,
    },
    /// An SFTP server directory.
    Sftp {
        /// Login user.
        user: String,
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// Remote base directory.
        path: String,
    },
}

impl Target {
    /// Parse a storage URL; the error message says what is wrong.
    pub fn parse(text: &str) -> Result<Target, String> {
        if text.starts_with('/') || text.starts_with('.') || !text.contains("://") {
            if text.is_empty() {
                return Err("empty storage url".into());
            }
            return Ok(Target::Local(PathBuf::from(text)));
        }
        let url = url::Url::parse(text)
            .map_err(|e| format!("not a URL ({e}): {}", crate::secret::redact_unparsed(text)))?;
        match url.scheme() {
            "file" => Ok(Target::Local(PathBuf::from(url.path()))),
            "s3" => {
                let bucket = url
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or("s3:// url needs a bucket: s3://BUCKET/PREFIX")?
                    .to_owned();
                let prefix = url.path().trim_matches('/').to_owned();
                Ok(Target::S3 { bucket, prefix })
            }
            "sftp" => {
                let host = url
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or("sftp:// url needs a host: sftp://USER@HOST:PORT/PATH")?
                    .to_owned();
                if url.username().is_empty() {
                    return Err("sftp:// url needs a user: sftp://USER@HOST:PORT/PATH".into());
                }
                if url.password().is_some() {
                    return Err(
                        "put the SFTP password in `password = \"env:NAME\"`, not in the url".into(),
                    );
                }
                Ok(Target::Sftp {
                    user: url.username().to_owned(),
                    host,
                    port: url.port().unwrap_or(22),
                    path: url.path().to_owned(),
                })
            }
            other => Err(format!(
                "unsupported scheme `{other}:`; use a local path, s3://BUCKET/PREFIX or sftp://USER@HOST:PORT/PATH"
            )),
        }
    }
}

/// The folder at the storage root (local and SFTP) holding the temporary files of
/// puts in progress. Keys and prefixes may not start with it.
pub const STAGING_DIR: &str = ".labrelay-staging";

/// Staging files older than this are removed by [`ObjectStorage::clean_staging`]
/// whatever key they belong to (a put takes hours at most, never a week).
pub const STAGING_MAX_AGE: Duration = Duration::from_hours(7 * 24);

/// Length of the key hash that starts a staging file name.
const STAGING_HASH_LEN: usize = 32;
/// Length of the random part of a staging file name.
const STAGING_RANDOM_LEN: usize = 16;

/// The first 32 hex digits of the SHA-256 of `key`: the start of the names of the
/// staging files of puts of `key`, so [`ObjectStorage::clean_staging`] can find a
/// killed put's leftovers without storing anything else.
pub fn staging_key_hash(key: &str) -> String {
    let mut h = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    h.truncate(STAGING_HASH_LEN);
    h
}

/// A fresh staging file name for a put of `key`: `<staging_key_hash(key)>.<16 random
/// hex>` (unique, so concurrent puts of one key never share a file).
pub(crate) fn staging_name(key: &str) -> String {
    format!("{}.{:016x}", staging_key_hash(key), rand::random::<u64>())
}

/// The key hash of a staging file name, or `None` when `name` is not one of
/// [`staging_name`]'s.
pub(crate) fn staging_name_hash(name: &str) -> Option<&str> {
    let (hash, random) = name.split_once('.')?;
    let hexdigits = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (hexdigits(hash, STAGING_HASH_LEN) && hexdigits(random, STAGING_RANDOM_LEN)).then_some(hash)
}

/// Which staging files [`ObjectStorage::clean_staging`] removes: those of the given
/// keys, and any older than [`STAGING_MAX_AGE`] (or with a modification time in the
/// future by more than that, a clock gone wrong).
pub(crate) struct StagingSweep {
    hashes: std::collections::HashSet<String>,
    now: std::time::SystemTime,
}

impl StagingSweep {
    pub(crate) fn new(keys: &[String]) -> StagingSweep {
        StagingSweep {
            hashes: keys.iter().map(|k| staging_key_hash(k)).collect(),
            now: std::time::SystemTime::now(),
        }
    }

    /// Whether the staging entry `name`, last modified at `modified`, goes.
    pub(crate) fn removes(&self, name: &str, modified: Option<std::time::SystemTime>) -> bool {
        if staging_name_hash(name).is_some_and(|h| self.hashes.contains(h)) {
            return true;
        }
        let age = modified.map(|m| match self.now.duration_since(m) {
            Ok(age) => age,
            Err(ahead) => ahead.duration(),
        });
        age.is_some_and(|a| a > STAGING_MAX_AGE)
    }
}

/// Longest key accepted, in bytes (S3's limit, prefix included).
pub const MAX_KEY_LEN: usize = 1024;

/// Check a key: non-empty, relative, `/`-separated, no empty, `.` or `..` segment, no
/// control character, not inside [`STAGING_DIR`] (reserved for uploads in progress),
/// at most [`MAX_KEY_LEN`] bytes.
pub fn validate_key(key: &str) -> Result<(), StorageError> {
    check_path(key).map_err(|reason| StorageError::InvalidKey {
        key: key.to_owned(),
        reason,
    })
}

/// Check a list prefix: empty (everything) or a relative path like a key, with a
/// trailing `/` allowed. Returns it without the trailing `/`.
pub fn validate_prefix(prefix: &str) -> Result<String, StorageError> {
    let p = prefix.strip_suffix('/').unwrap_or(prefix);
    if p.is_empty() {
        return Ok(String::new());
    }
    check_path(p).map_err(|reason| StorageError::InvalidKey {
        key: prefix.to_owned(),
        reason,
    })?;
    Ok(p.to_owned())
}

fn check_path(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("empty key");
    }
    if key.starts_with('/') {
        return Err("keys are relative; remove the leading /");
    }
    if key.len() > MAX_KEY_LEN {
        return Err("longer than 1024 bytes");
    }
    if key.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    for segment in key.split('/') {
        match segment {
            "" => return Err("empty path segment (// or a trailing /)"),
            "." | ".." => return Err("`.` and `..` segments are not allowed"),
            _ => {}
        }
    }
    if key.split('/').next() == Some(STAGING_DIR) {
        return Err("the .labrelay-staging folder is reserved for uploads in progress");
    }
    Ok(())
}

const MIB: u64 = 1024 * 1024;

/// Smallest part size used (S3's minimum is 5 MiB; 8 MiB keeps request counts sane).
pub const MIN_PART_SIZE: u64 = 8 * MIB;
/// Largest part size S3 accepts.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * MIB;
/// Most parts S3 accepts in one upload.
pub const MAX_PARTS: u64 = 10_000;
/// Parts uploaded at once within one file unless configured.
pub const DEFAULT_PART_CONCURRENCY: usize = 4;

/// The multipart part size for a file of `len` bytes: at least [`MIN_PART_SIZE`], large
/// enough that the file needs at most [`MAX_PARTS`] parts, rounded up to a whole MiB
/// (500 GiB → 52 MiB parts, 9,847 of them), at most [`MAX_PART_SIZE`].
pub fn part_size_for(len: u64) -> u64 {
    let needed = len.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
    needed.clamp(MIN_PART_SIZE, MAX_PART_SIZE)
}

/// Read from `reader` until `buf` is full or the data ends; returns the bytes read
/// (fewer than `buf.len()` only at the end). Interrupted reads are retried.
pub fn read_full(reader: &mut (impl Read + ?Sized), buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The ETag S3 gives a multipart object: MD5 of the concatenated binary part MD5s,
/// `-`, the number of parts. `None` if a part MD5 is not 32 hex digits.
pub fn multipart_etag<S: AsRef<str>>(part_md5_hex: &[S]) -> Option<String> {
    let mut h = Md5::new();
    for p in part_md5_hex {
        let raw = hex::decode(p.as_ref()).ok().filter(|r| r.len() == 16)?;
        h.update(&raw);
    }
    Some(format!(
        "{}-{}",
        hex::encode(h.finalize()),
        part_md5_hex.len()
    ))
}

/// The `Content-Type` for a key, from its file name: a small table of the files a
/// sequencing facility delivers (reports, checksums, tables, images, archives, reads,
/// alignments, variants), `application/octet-stream` for anything else. Compressed
/// files are typed by their last suffix (`x.fastq.gz` is `application/gzip`), because
/// S3 serves the stored bytes as they are. Mail attachments use the same table.
pub fn content_type_for(key: &str) -> &'static str {
    let name = key.rsplit('/').next().unwrap_or(key);
    let Some((_, ext)) = name.rsplit_once('.') else {
        return "application/octet-stream";
    };
    match ext.to_ascii_lowercase().as_str() {
        // .vcf is the Variant Call Format here, not a vCard: plain text, so a browser
        // shows it rather than offering to import a contact.
        "txt" | "log" | "md5" | "sha256" | "sha1" | "fastq" | "fq" | "fasta" | "fa" | "fna"
        | "sam" | "bed" | "gtf" | "gff" | "gff3" | "vcf" => "text/plain; charset=utf-8",
        "md" => "text/markdown; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "tsv" => "text/tab-separated-values; charset=utf-8",
        "html" | "htm" => "text/html; charset=utf-8",
        "json" => "application/json",
        "xml" => "application/xml",
        "pdf" => "application/pdf",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "svg" => "image/svg+xml",
        "gz" | "tgz" | "bgz" => "application/gzip",
        "bz2" => "application/x-bzip2",
        "xz" => "application/x-xz",
        "zst" => "application/zstd",
        "zip" => "application/zip",
        "tar" => "application/x-tar",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "xls" => "application/vnd.ms-excel",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "sql" => "application/sql",
        // bam, bai, cram, crai and the rest: binary without a registered type.
        _ => "application/octet-stream",
    }
}

/// Options of one put. `None` fields fall back to the storage's configuration.
#[derive(Debug, Clone)]
pub struct PutOptions {
    /// Multipart part size in bytes (S3); default from the config, else [`part_size_for`].
    pub part_size: Option<u64>,
    /// Parts uploaded at once (S3); default from the config, else
    /// [`DEFAULT_PART_CONCURRENCY`].
    pub part_concurrency: Option<usize>,
    /// Compare S3 part and object ETags with the MD5s computed while streaming; a
    /// mismatch fails the put. Turn off only for servers whose ETags are not MD5s
    /// (SSE-KMS encryption).
    pub verify_etag: bool,
    /// S3: the whole content's MD5 (raw bytes), when the caller knows it before the
    /// upload. A multipart upload then carries it as `X-Amz-Meta-Md5chksum` (a single
    /// PUT always does, from the MD5 computed while streaming); a put whose data has
    /// another MD5 fails and leaves no object. Other backends ignore it.
    pub md5: Option<[u8; 16]>,
    /// Local directory: skip the per-file fsyncs; the caller makes everything durable
    /// at once with [`AnyStorage::sync`] before it relies on the files (a delivery
    /// re-checks every file on resume, so a file lost to a power cut in between is
    /// sent again). Other backends ignore it.
    pub defer_sync: bool,
}

impl Default for PutOptions {
    fn default() -> Self {
        PutOptions {
            part_size: None,
            part_concurrency: None,
            verify_etag: true,
            md5: None,
            defer_sync: false,
        }
    }
}

/// What a put stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOutcome {
    /// Bytes stored.
    pub size: u64,
    /// MD5 of the content, lowercase hex, computed while streaming.
    pub md5_hex: String,
    /// The ETag the server reported (S3), without quotes.
    pub etag: Option<String>,
    /// Number of multipart parts; 0 when the object was sent in one request (or the
    /// backend has no parts).
    pub parts: u32,
    /// Part size in bytes (0 when `parts` is 0).
    pub part_size: u64,
    /// MD5 of each part, lowercase hex, in order.
    pub part_md5_hex: Vec<String>,
    /// SFTP: the content was also hashed in consecutive ranges of this many bytes (the
    /// last one shorter), so the server can verify them in parallel
    /// ([`SftpStorage::remote_md5_ranges`]); 0 when not.
    pub range_size: u64,
    /// MD5 of each range, lowercase hex, in order; empty when `range_size` is 0.
    pub range_md5_hex: Vec<String>,
    /// Requests that were sent again after a temporary failure ([`crate::retry`]),
    /// summed over the parts; 0 when every request succeeded at once.
    pub retries: u32,
}

impl PutOutcome {
    /// The ETag an S3 server should report for this object: its MD5 for a single PUT,
    /// [`multipart_etag`] for a multipart upload.
    pub fn expected_etag(&self) -> String {
        if self.parts == 0 {
            self.md5_hex.clone()
        } else {
            multipart_etag(&self.part_md5_hex).unwrap_or_default()
        }
    }
}

/// What a get read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetOutcome {
    /// Bytes read.
    pub size: u64,
    /// MD5 of the content, lowercase hex.
    pub md5_hex: String,
}

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the target's base.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// ETag without quotes (S3 only).
    pub etag: Option<String>,
    /// Last modification time, when the backend reports one.
    pub last_modified: Option<DateTime<Utc>>,
}

/// The operations every delivery target supports.
///
/// Futures are `Send`, so a delivery can run many puts on a multi-threaded runtime;
/// implementations are cheap to clone (shared state behind an `Arc`).
pub trait ObjectStorage: Send + Sync {
    /// The target as it may be shown (URL without credentials).
    fn describe(&self) -> String;

    /// Upload a local file under `key`, replacing any object there.
    fn put_file(
        &self,
        local: &Path,
        key: &str,
        opts: &PutOptions,
    ) -> impl Future<Output = Result<PutOutcome, StorageError>> + Send;

    /// Upload everything `reader` yields under `key`. The reader runs on a blocking
    /// thread. On S3 the part size is `opts.part_size` or the configured one, else
    /// [`MIN_PART_SIZE`] (so at most ~78 GiB; use `put_file` for big files).
    fn put_reader<R: Read + Send + 'static>(
        &self,
        reader: R,
        key: &str,
        opts: &PutOptions,
    ) -> impl Future<Output = Result<PutOutcome, StorageError>> + Send;

    /// Upload a small in-memory object.
    fn put_bytes(
        &self,
        key: &str,
        data: Bytes,
    ) -> impl Future<Output = Result<PutOutcome, StorageError>> + Send;

    /// The object's metadata, or `None` if there is no object under `key`.
    fn head(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Option<ObjectInfo>, StorageError>> + Send;

    /// All objects below `prefix` (a key prefix at `/` boundaries: `a/b` lists `a/b/…`,
    /// not `a/bc`; empty lists everything), sorted by key.
    fn list(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<ObjectInfo>, StorageError>> + Send;

    /// Stream the object into `writer` (on a blocking thread), computing its MD5.
    fn get_into<W: Write + Send + 'static>(
        &self,
        key: &str,
        writer: W,
    ) -> impl Future<Output = Result<GetOutcome, StorageError>> + Send;

    /// The whole object in memory (for small objects).
    fn get_bytes(&self, key: &str) -> impl Future<Output = Result<Bytes, StorageError>> + Send;

    /// Download the object to `local`, atomically (temp file + rename).
    fn get_to_file(
        &self,
        key: &str,
        local: &Path,
    ) -> impl Future<Output = Result<GetOutcome, StorageError>> + Send {
        async move {
            let temp = TempPath::beside(local)?;
            let file = Arc::new(
                fs_err::File::create(temp.path())
                    .map_err(StorageError::Local)?
                    .into_parts()
                    .0,
            );
            let outcome = self.get_into(key, Arc::clone(&file)).await?;
            file.sync_all()
                .map_err(|e| local_io("syncing", temp.path(), &e))?;
            drop(file);
            temp.persist(local)?;
            Ok(outcome)
        }
    }

    /// Remove the object; removing a missing object is not an error.
    fn delete(&self, key: &str) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Remove leftover temporary files of puts that were killed (power loss, `kill -9`)
    /// from [`STAGING_DIR`]: those of any of `keys` (matched by
    /// [`staging_key_hash`]), and any older than [`STAGING_MAX_AGE`]. Returns how many
    /// were removed.
    ///
    /// Call it before (re)starting puts of `keys`, e.g. at the start of a delivery run
    /// with the keys it is about to upload: a put of one of them that is running at the
    /// same moment would lose its temporary file and fail. S3 has no visible temporary
    /// objects (an unfinished multipart upload is not listed and never becomes an
    /// object), so there it does nothing and returns 0; it aborts no multipart upload.
    fn clean_staging(
        &self,
        keys: &[String],
    ) -> impl Future<Output = Result<u64, StorageError>> + Send;

    /// A URL anyone can GET the object from until `expires_in` passes, or `None` when
    /// the backend has no such thing (local, SFTP).
    fn presign_get(
        &self,
        key: &str,
        expires_in: Duration,
    ) -> impl Future<Output = Result<Option<url::Url>, StorageError>> + Send;
}

macro_rules! dispatch {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            AnyStorage::Local($s) => $body,
            AnyStorage::S3($s) => $body,
            AnyStorage::Sftp($s) => $body,
        }
    };
}

/// Any of the backends, chosen by the target URL.
#[derive(Debug, Clone)]
pub enum AnyStorage {
    /// A local directory.
    Local(LocalStorage),
    /// An S3-compatible bucket.
    S3(S3Storage),
    /// An SFTP server.
    Sftp(SftpStorage),
}

impl AnyStorage {
    /// [`open`](Self::open) and [`check_root`](Self::check_root): what a tool should call
    /// at start, so a missing folder or bucket stops it before any work.
    pub async fn open_checked(config: &StorageConfig) -> Result<AnyStorage, StorageError> {
        let storage = AnyStorage::open(config)?;
        storage.check_root().await?;
        Ok(storage)
    }

    /// Check that the target's base exists, creating it when the section says
    /// `create_root = true`:
    /// - local: the root directory (also checked by [`open`](Self::open); checked again
    ///   here because a mount can go away);
    /// - SFTP: the base folder (one connection and a `stat`; `mkdir` of each missing
    ///   level with `create_root`);
    /// - S3: the bucket, with one HeadBucket request (cheap, and it also proves the
    ///   credentials); `create_root` does not create buckets, and a key prefix needs no
    ///   folder.
    ///
    /// A missing base is [`StorageError::Config`] (exit 78) naming the section and the
    /// folder; an unreachable server is a temporary failure (75) as usual.
    pub async fn check_root(&self) -> Result<(), StorageError> {
        dispatch!(self, s => s.check_root().await)
    }

    /// The target as a URL a person or script can use: `s3://bucket/prefix`,
    /// `sftp://user@host:port/path`, `file:///path`.
    pub fn url(&self) -> String {
        match self {
            AnyStorage::S3(s) => s.url().to_owned(),
            AnyStorage::Sftp(s) => s.describe(),
            AnyStorage::Local(s) => format!("file://{}", s.root().display()),
        }
    }

    /// Where `key` really is on the target: the key in the bucket for S3 (the URL's
    /// prefix included); the path below the base folder (as given) for the others.
    pub fn real_key(&self, key: &str) -> String {
        match self {
            AnyStorage::S3(s) => s.bucket_key(key),
            AnyStorage::Sftp(_) | AnyStorage::Local(_) => key.to_owned(),
        }
    }

    /// Make every put with [`PutOptions::defer_sync`] durable: one `syncfs` of a local
    /// directory's filesystem; nothing for S3 and SFTP, whose servers store a put
    /// before they answer it.
    pub async fn sync(&self) -> Result<(), StorageError> {
        match self {
            AnyStorage::Local(s) => s.sync().await,
            AnyStorage::S3(_) | AnyStorage::Sftp(_) => Ok(()),
        }
    }

    /// Open the target a `[storage.NAME]` section describes. No network traffic
    /// happens here; credentials are resolved now, so a missing one fails early. A
    /// local root is checked (and created with `create_root`) here already.
    pub fn open(config: &StorageConfig) -> Result<AnyStorage, StorageError> {
        let target = Target::parse(&config.url).map_err(|message| StorageError::Config {
            target: crate::secret::redact_unparsed(&config.url),
            message,
        })?;
        let storage = match target {
            Target::Local(dir) => AnyStorage::Local(LocalStorage::open_config(&dir, config)?),
            Target::S3 { bucket, prefix } => {
                AnyStorage::S3(S3Storage::open(&bucket, &prefix, config)?)
            }
            Target::Sftp {
                user,
                host,
                port,
                path,
            } => AnyStorage::Sftp(SftpStorage::open(&user, &host, port, &path, config)?),
        };
        tracing::debug!(target_ = %storage.describe(), "storage opened");
        Ok(storage)
    }
}

impl ObjectStorage for AnyStorage {
    fn describe(&self) -> String {
        dispatch!(self, s => s.describe())
    }

    async fn put_file(
        &self,
        local: &Path,
        key: &str,
        opts: &PutOptions,
    ) -> Result<PutOutcome, StorageError> {
        let out = dispatch!(self, s => s.put_file(local, key, opts).await)?;
        tracing::debug!(key, size = out.size, md5 = %out.md5_hex, parts = out.parts, "stored file");
        Ok(out)
    }

    async fn put_reader<R: Read + Send + 'static>(
        &self,
        reader: R,
        key: &str,
        opts: &PutOptions,
    ) -> Result<PutOutcome, StorageError> {
        dispatch!(self, s => s.put_reader(reader, key, opts).await)
    }

    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<PutOutcome, StorageError> {
        let out = dispatch!(self, s => s.put_bytes(key, data).await)?;
        tracing::debug!(key, size = out.size, md5 = %out.md5_hex, "stored bytes");
        Ok(out)
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        dispatch!(self, s => s.head(key).await)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        dispatch!(self, s => s.list(prefix).await)
    }

    async fn get_into<W: Write + Send + 'static>(
        &self,
        key: &str,
        writer: W,
    ) -> Result<GetOutcome, StorageError> {
        dispatch!(self, s => s.get_into(key, writer).await)
    }

    async fn get_bytes(&self, key: &str) -> Result<Bytes, StorageError> {
        dispatch!(self, s => s.get_bytes(key).await)
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        dispatch!(self, s => s.delete(key).await)?;
        tracing::debug!(key, "deleted");
        Ok(())
    }

    async fn clean_staging(&self, keys: &[String]) -> Result<u64, StorageError> {
        let removed = dispatch!(self, s => s.clean_staging(keys).await)?;
        if removed > 0 {
            tracing::info!(
                removed,
                "removed leftover temporary files of interrupted uploads"
            );
        }
        Ok(removed)
    }

    async fn presign_get(
        &self,
        key: &str,
        expires_in: Duration,
    ) -> Result<Option<url::Url>, StorageError> {
        dispatch!(self, s => s.presign_get(key, expires_in).await)
    }
}

// ---------------------------------------------------------------------------------
// Helpers shared by the backends.

/// How a message names a storage section: `[storage.NAME]`, or `storage` when the
/// section's name is unknown.
pub(crate) fn section_label(name: &str) -> String {
    if name.is_empty() {
        "storage".to_owned()
    } else {
        format!("[storage.{name}]")
    }
}

/// The configuration error for a base folder that is not there.
pub(crate) fn missing_root(section: &str, target: String, folder: &str) -> StorageError {
    let section = section_label(section);
    StorageError::Config {
        target,
        message: format!(
            "{section}: the base folder {folder} does not exist; create it (or mount it), \
             or set create_root = true in {section}"
        ),
    }
}

/// Buffer size for streaming copies: large enough for SFTP pipelining and few syscalls.
pub(crate) const COPY_BUF: usize = 1024 * 1024;

pub(crate) fn local_io(action: &str, path: &Path, e: &std::io::Error) -> StorageError {
    StorageError::Local(std::io::Error::new(
        e.kind(),
        format!("{action} {}: {e}", path.display()),
    ))
}

/// Set when the future that started a blocking upload is dropped, so the blocking side
/// stops and never publishes the object under its final name.
#[derive(Debug)]
pub(crate) struct CancelOnDrop(Arc<AtomicBool>);

impl CancelOnDrop {
    pub(crate) fn new() -> (CancelOnDrop, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(false));
        (CancelOnDrop(Arc::clone(&flag)), flag)
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Why a streaming copy stopped.
#[derive(Debug)]
pub(crate) enum CopyError {
    /// The source failed.
    Read(std::io::Error),
    /// The destination failed.
    Write(std::io::Error),
    /// The caller went away.
    Cancelled,
}

/// Copy `reader` to `writer`, returning the byte count and MD5. Checks `cancel` between
/// buffers.
pub(crate) fn copy_hashing(
    reader: &mut dyn Read,
    writer: &mut dyn Write,
    cancel: Option<&AtomicBool>,
) -> Result<(u64, [u8; 16]), CopyError> {
    copy_hashing_sized(reader, writer, cancel, None)
}

/// [`copy_hashing`] for a source of about `size` bytes: the buffer is no larger than
/// needed (a zeroed 1 MiB buffer per 1 KiB file was most of the CPU of a delivery of
/// 10^5 small files).
pub(crate) fn copy_hashing_sized(
    reader: &mut dyn Read,
    writer: &mut dyn Write,
    cancel: Option<&AtomicBool>,
    size: Option<u64>,
) -> Result<(u64, [u8; 16]), CopyError> {
    // One byte more than the size, so the end of the file is seen in the same read.
    let len = size.map_or(COPY_BUF, |s| {
        (s as usize).saturating_add(1).clamp(4096, COPY_BUF)
    });
    let mut buf = vec![0u8; len];
    let mut md5 = Md5::new();
    let mut total = 0u64;
    loop {
        if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
            return Err(CopyError::Cancelled);
        }
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        md5.update(&buf[..n]);
        writer.write_all(&buf[..n]).map_err(CopyError::Write)?;
        total += n as u64;
    }
    writer.flush().map_err(CopyError::Write)?;
    Ok((total, md5.finalize().into()))
}

/// A temporary file, removed on drop unless persisted.
pub(crate) struct TempPath {
    path: Option<PathBuf>,
}

impl TempPath {
    /// `dir/.name.partial-<random>` beside `target` (so the rename stays on one
    /// filesystem); the parent directory is created. For downloads to local files.
    pub(crate) fn beside(target: &Path) -> Result<TempPath, StorageError> {
        let dir = target.parent().unwrap_or_else(|| Path::new("."));
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !dir.as_os_str().is_empty() {
            fs_err::create_dir_all(dir).map_err(StorageError::Local)?;
        }
        Ok(TempPath {
            path: Some(dir.join(local_temp_name(&name))),
        })
    }

    /// `path` itself (a staging file name, already unique).
    pub(crate) fn at(path: PathBuf) -> TempPath {
        TempPath { path: Some(path) }
    }

    pub(crate) fn path(&self) -> &Path {
        self.path.as_deref().unwrap_or_else(|| Path::new(""))
    }

    /// Rename over `target`.
    pub(crate) fn persist(mut self, target: &Path) -> Result<(), StorageError> {
        if let Some(p) = self.path.take()
            && let Err(e) = fs_err::rename(&p, target)
        {
            let _ = std::fs::remove_file(&p);
            return Err(StorageError::Local(e));
        }
        Ok(())
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `.name.partial-<16 hex>`: hidden, and unique so concurrent writers never collide.
fn local_temp_name(name: &str) -> String {
    format!(".{name}.partial-{:016x}", rand::random::<u64>())
}

/// Decode `%XX` escapes of a URL path (invalid escapes and non-UTF-8 results are kept
/// as written).
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| char::from(b).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_owned())
}

/// Strip S3's quotes from an ETag.
pub(crate) fn clean_etag(etag: &str) -> String {
    etag.trim().trim_matches('"').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_size_grows_with_the_file() {
        assert_eq!(part_size_for(0), MIN_PART_SIZE);
        assert_eq!(part_size_for(40 * MIB), MIN_PART_SIZE);
        // 78 GiB still fits 10,000 parts of 8 MiB.
        assert_eq!(part_size_for(MAX_PARTS * MIN_PART_SIZE), MIN_PART_SIZE);
        assert_eq!(part_size_for(MAX_PARTS * MIN_PART_SIZE + 1), 9 * MIB);
        let big = 500 * 1024 * MIB;
        let ps = part_size_for(big);
        assert_eq!(ps, 52 * MIB);
        assert_eq!(ps % MIB, 0);
        assert!(big.div_ceil(ps) <= MAX_PARTS);
        // 5 TiB, S3's object limit, is the largest the formula must handle.
        let huge = 5 * 1024 * 1024 * MIB;
        assert!(huge.div_ceil(part_size_for(huge)) <= MAX_PARTS);
        assert_eq!(part_size_for(u64::MAX), MAX_PART_SIZE);
    }

    #[test]
    fn multipart_etag_matches_s3() {
        // Two parts "a" and "b": md5(md5("a") ‖ md5("b")) - 2.
        let a = hex::encode(Md5::digest(b"a"));
        let b = hex::encode(Md5::digest(b"b"));
        let mut cat = Md5::digest(b"a").to_vec();
        cat.extend_from_slice(&Md5::digest(b"b"));
        let want = format!("{}-2", hex::encode(Md5::digest(&cat)));
        assert_eq!(multipart_etag(&[a, b]).unwrap(), want);
        assert_eq!(multipart_etag(&["zz"]), None);
    }

    #[test]
    fn keys_are_checked() {
        for ok in [
            "a",
            "a/b/c.fastq.gz",
            "报告/样本 1.pdf",
            "a..b",
            ".hidden",
            "x.partial",
            "a/.labrelay-staging/x",
        ] {
            validate_key(ok).unwrap();
        }
        for bad in [
            "",
            "/abs",
            "a//b",
            "a/",
            "../x",
            "a/./b",
            "a/../b",
            "a\nb",
            ".labrelay-staging",
            ".labrelay-staging/x",
        ] {
            let err = validate_key(bad).unwrap_err();
            assert!(matches!(err, StorageError::InvalidKey { .. }), "{bad:?}");
            assert_eq!(err.exit(), Exit::Failed);
        }
        assert!(validate_key(&"a".repeat(1025)).is_err());
        assert_eq!(validate_prefix("").unwrap(), "");
        assert_eq!(validate_prefix("a/b/").unwrap(), "a/b");
        assert!(validate_prefix("../a").is_err());
        assert!(validate_prefix(".labrelay-staging/").is_err());
    }

    #[test]
    fn staging_names_carry_the_key_hash() {
        let h = staging_key_hash("a/b.txt");
        assert_eq!(h.len(), 32);
        // sha256("a/b.txt"), first 128 bits.
        assert_eq!(h, &hex::encode(sha2::Sha256::digest(b"a/b.txt"))[..32]);
        let n = staging_name("a/b.txt");
        assert_eq!(staging_name_hash(&n), Some(h.as_str()));
        assert_ne!(n, staging_name("a/b.txt"), "unique per put");
        assert_eq!(staging_name_hash("x.txt"), None);
        assert_eq!(staging_name_hash(&format!("{h}.zz")), None);
        assert_eq!(staging_name_hash(&format!("{h}.0123456789ABCDEF")), None);
    }

    #[test]
    fn staging_sweep_takes_named_and_old_files() {
        let sweep = StagingSweep::new(&["a/b.txt".to_owned()]);
        let now = std::time::SystemTime::now();
        let day = Duration::from_hours(24);
        assert!(sweep.removes(&staging_name("a/b.txt"), Some(now)));
        assert!(!sweep.removes(&staging_name("a/c.txt"), Some(now)));
        assert!(!sweep.removes(&staging_name("a/c.txt"), Some(now - 6 * day)));
        assert!(sweep.removes(&staging_name("a/c.txt"), Some(now - 8 * day)));
        assert!(sweep.removes("junk", Some(now - 8 * day)));
        assert!(!sweep.removes("junk", None));
    }

    #[test]
    fn content_types_follow_the_file_name() {
        assert_eq!(
            content_type_for("a/md5sum.txt"),
            "text/plain; charset=utf-8"
        );
        assert_eq!(content_type_for("a/files.MD5"), "text/plain; charset=utf-8");
        assert_eq!(content_type_for("s/x.fastq.gz"), "application/gzip");
        assert_eq!(content_type_for("s/x.fq"), "text/plain; charset=utf-8");
        assert_eq!(content_type_for("report.PDF"), "application/pdf");
        assert_eq!(
            content_type_for("t.tsv"),
            "text/tab-separated-values; charset=utf-8"
        );
        assert_eq!(content_type_for("x.bam"), "application/octet-stream");
        assert_eq!(content_type_for("x.vcf"), "text/plain; charset=utf-8");
        assert_eq!(content_type_for("README"), "application/octet-stream");
        assert_eq!(content_type_for("dir.d/README"), "application/octet-stream");
    }

    #[test]
    fn exit_classes() {
        let e = StorageError::Connect {
            target: "s3://b".into(),
            message: "refused".into(),
        };
        assert_eq!(e.exit(), Exit::TempFail);
        let e = StorageError::Auth {
            target: "s3://b".into(),
            message: "403".into(),
        };
        assert_eq!(e.exit(), Exit::Config);
        let e = StorageError::NotFound {
            target: "s3://b".into(),
            key: "k".into(),
        };
        assert_eq!(e.exit(), Exit::Failed);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("/%E6%8A%A5%E5%91%8A/a%20b"), "/报告/a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn copy_hashing_counts_and_hashes() {
        let mut out = Vec::new();
        let (n, md5) = copy_hashing(&mut &b"hello"[..], &mut out, None).unwrap();
        assert_eq!(n, 5);
        assert_eq!(hex::encode(md5), "5d41402abc4b2a76b9719d911017c592");
        assert_eq!(out, b"hello");
    }
}

impl crate::exit::ExitClass for StorageError {
    fn exit_class(&self) -> Exit {
        self.exit()
    }

    fn is_transient(&self) -> bool {
        self.is_temporary()
    }
}
crate::exit_class!(StorageError);

impl crate::retry::GiveUp for StorageError {
    fn gave_up(attempts: u32, last: Self) -> Self {
        StorageError::GaveUp {
            attempts,
            last: Box::new(last),
        }
    }
}
