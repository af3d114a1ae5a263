//! The S3 backend, through object_store: AWS, Aliyun OSS, Garage, MinIO and other
//! S3-compatible servers.
//!
//! Settings come only from the `[storage.NAME]` section, never from `AWS_*` environment
//! variables or instance metadata, so a stray `AWS_PROFILE` cannot redirect a delivery.
//! Requests are signed with SigV4, never with aws-chunked streaming trailers, which
//! Aliyun OSS rejects. Uploads (PutObject, UploadPart) are sent by [`s3_put`](super::s3_put)
//! with `Content-MD5` and, unless `sign_payload = true`, an unsigned payload; the other
//! calls go through object_store.
//!
//! An `https://` endpoint is checked against the system's root certificates plus those
//! of `ca_file` (a private CA), in both HTTP clients (object_store's and the
//! uploader's). A certificate none of them vouches for is a configuration error (exit
//! 78), not a temporary one.
//!
//! Every object carries a `Content-Type` guessed from its key and, when its MD5 is known
//! before it is published, `X-Amz-Meta-Md5chksum` (see [`s3_put`](super::s3_put)): always
//! for a single PUT, for a multipart upload only when the caller passes the MD5
//! ([`PutOptions::md5`], [`S3Storage::create_multipart_with_md5`]).
//!
//! A file larger than one part goes up as a multipart upload (created by
//! [`s3_put`](super::s3_put) with the object's headers; object_store's
//! [`MultipartStore`] completes and aborts it), with several parts in flight;
//! each part's ETag is checked against the part's MD5 and the final ETag against
//! `md5(part md5s)-N`. The upload id and parts are exposed
//! ([`S3Storage::create_multipart`] and friends) so the delivery tool can journal them
//! and resume. An upload that fails is aborted; one whose future is dropped is aborted
//! in the background, so no half-written object ever appears under its key.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use object_store::aws::{AmazonS3, AmazonS3Builder, AwsCredential};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{ClientOptions, ObjectMeta, ObjectStore, RetryConfig};
use tokio::task::JoinSet;

use super::s3_put::{Dest, Uploader};
use super::{
    DEFAULT_PART_CONCURRENCY, GetOutcome, MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE, ObjectInfo,
    ObjectStorage, PutOptions, PutOutcome, StorageError, clean_etag, multipart_etag, part_size_for,
    percent_decode, validate_key, validate_prefix,
};
use crate::config::{CaCerts, StorageConfig};
use crate::hash::Md5Parts;
use crate::secret::SecretSpec;

/// S3's smallest allowed part (all but the last).
const S3_MIN_PART: u64 = 5 * 1024 * 1024;
/// Longest validity SigV4 allows for a presigned URL.
const MAX_PRESIGN: Duration = Duration::from_hours(7 * 24);
/// Whole-request limit: a part of a few hundred MiB must fit on a slow uplink.
const REQUEST_TIMEOUT: Duration = Duration::from_mins(10);

/// A bucket (and key prefix) on an S3-compatible server.
#[derive(Clone)]
pub struct S3Storage {
    inner: Arc<Inner>,
}

struct Inner {
    store: AmazonS3,
    uploader: Uploader,
    prefix: String,
    target: String,
    /// `s3://bucket/prefix`.
    url: String,
    part_size: Option<u64>,
    part_concurrency: Option<usize>,
    /// The `[storage.NAME]` section, for messages (may be empty).
    section: String,
}

impl std::fmt::Debug for S3Storage {
    // Not derived: object_store's Debug would print the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Storage")
            .field("target", &self.inner.target)
            .finish_non_exhaustive()
    }
}

/// A multipart upload in progress: enough to add parts, complete or abort it later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultipartUpload {
    /// The key (relative to the target's prefix).
    pub key: String,
    /// The server's upload id.
    pub upload_id: String,
}

/// A part the server has accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedPart {
    /// 0-based part index (S3 part number − 1).
    pub index: usize,
    /// The part's ETag as the server sent it (S3: the part's MD5 in quotes); pass it
    /// back unchanged to [`S3Storage::complete_multipart`].
    pub etag: String,
    /// Requests sent for this part (1 when it succeeded at once; 0 for a part
    /// uploaded by an earlier run).
    pub attempts: u32,
}

impl S3Storage {
    /// Build the client for `s3://bucket/prefix` from explicit settings only.
    pub fn open(
        bucket: &str,
        prefix: &str,
        config: &StorageConfig,
    ) -> Result<S3Storage, StorageError> {
        let prefix = percent_decode(prefix.trim_matches('/'));
        let mut target = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        let url = target.clone();
        if let Some(ep) = &config.endpoint {
            target = format!("{target} at {ep}");
        }
        let config_err = |message: String| StorageError::Config {
            target: target.clone(),
            message,
        };
        if !prefix.is_empty() {
            super::check_path(&prefix)
                .map_err(|reason| config_err(format!("bad key prefix {prefix:?}: {reason}")))?;
        }
        let resolve = |spec: &Option<SecretSpec>, name: &str| {
            spec.as_ref()
                .ok_or_else(|| config_err(format!("{name} is required for s3:// targets")))
                .and_then(|s| s.resolve().map_err(StorageError::Secret))
        };
        let key_id = resolve(&config.access_key_id, "access_key_id")?;
        let secret = resolve(&config.secret_access_key, "secret_access_key")?;
        let part_size = config
            .part_size_mib
            .map(|mib| {
                let bytes = mib.saturating_mul(1024 * 1024);
                if (S3_MIN_PART..=MAX_PART_SIZE).contains(&bytes) {
                    Ok(bytes)
                } else {
                    Err(config_err(format!(
                        "part_size_mib = {mib} is outside S3's limits (5 to 5120)"
                    )))
                }
            })
            .transpose()?;
        if config.part_concurrency == Some(0) {
            return Err(config_err("part_concurrency must be at least 1".into()));
        }
        let timeout = Duration::from_secs(config.timeout_secs.unwrap_or(30).max(1));
        // A private CA for an https:// endpoint, trusted next to the system's roots by
        // both HTTP clients (object_store's and the uploader's).
        let ca_key = if config.name.is_empty() {
            "storage.ca_file".to_owned()
        } else {
            format!("storage.{}.ca_file", config.name)
        };
        let ca = CaCerts::load_optional(&ca_key, config.ca_file.as_deref())
            .map_err(|e| config_err(e.to_string()))?;
        let mut client = ClientOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(REQUEST_TIMEOUT.max(timeout));
        for der in ca.iter().flat_map(|ca| &ca.der) {
            let cert = object_store::Certificate::from_der(der)
                .map_err(|e| config_err(format!("{ca_key}: {e}")))?;
            client = client.with_root_certificate(cert);
        }
        // object_store's own retries (list, head, delete, complete) follow the one
        // policy of crate::retry: the same attempts, backoff and deadline.
        let policy = crate::retry::policy();
        let retry = RetryConfig {
            max_retries: policy.attempts.saturating_sub(1) as usize,
            retry_timeout: policy.deadline,
            backoff: object_store::BackoffConfig {
                init_backoff: policy.base_delay,
                max_backoff: policy.max_delay,
                base: 2.0,
            },
        };
        // The builder starts empty (`new`, not `from_env`): no AWS_* variable applies.
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(config.region.as_deref().unwrap_or("us-east-1"))
            .with_access_key_id(key_id.expose())
            .with_secret_access_key(secret.expose())
            .with_client_options(client)
            .with_retry(retry)
            .with_virtual_hosted_style_request(!config.path_style)
            // After with_client_options, which would reset it.
            .with_allow_http(config.allow_http);
        if let Some(ep) = &config.endpoint {
            builder = builder.with_endpoint(
                endpoint_url(ep, bucket, config.path_style, config.allow_http)
                    .map_err(config_err)?,
            );
        }
        let store = builder.build().map_err(|e| config_err(e.to_string()))?;
        let region = config.region.as_deref().unwrap_or("us-east-1");
        let base = match &config.endpoint {
            Some(ep) => {
                let ep = endpoint_url(ep, bucket, config.path_style, config.allow_http)
                    .map_err(config_err)?;
                if config.path_style {
                    format!("{ep}/{bucket}/")
                } else {
                    format!("{ep}/")
                }
            }
            None if config.path_style => format!("https://s3.{region}.amazonaws.com/{bucket}/"),
            None => format!("https://{bucket}.s3.{region}.amazonaws.com/"),
        };
        let uploader = Uploader::new(
            AwsCredential {
                key_id: key_id.expose().to_owned(),
                secret_key: secret.expose().to_owned(),
                token: None,
            },
            region,
            base,
            config.sign_payload,
            timeout,
            REQUEST_TIMEOUT.max(timeout),
            target.clone(),
            ca.as_ref(),
        )?;
        Ok(S3Storage {
            inner: Arc::new(Inner {
                store,
                uploader,
                prefix,
                target,
                url,
                part_size,
                part_concurrency: config.part_concurrency,
                section: config.name.clone(),
            }),
        })
    }

    /// The target as a URL: `s3://bucket/prefix` (the endpoint is not part of it).
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The object's key in the bucket: the URL's prefix, then `key`.
    pub fn bucket_key(&self, key: &str) -> String {
        if self.inner.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.inner.prefix)
        }
    }

    fn full_path(&self, key: &str) -> Result<ObjectPath, StorageError> {
        validate_key(key)?;
        let full = if self.inner.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.inner.prefix)
        };
        if full.len() > super::MAX_KEY_LEN {
            return Err(StorageError::InvalidKey {
                key: key.to_owned(),
                reason: "longer than 1024 bytes with the target's prefix",
            });
        }
        ObjectPath::parse(&full).map_err(|_| StorageError::InvalidKey {
            key: key.to_owned(),
            reason: "not a valid object path",
        })
    }

    fn relative_key(&self, location: &ObjectPath) -> String {
        let full: &str = location.as_ref();
        if self.inner.prefix.is_empty() {
            full.to_owned()
        } else {
            full.strip_prefix(&self.inner.prefix)
                .and_then(|r| r.strip_prefix('/'))
                .unwrap_or(full)
                .to_owned()
        }
    }

    fn info(&self, meta: &ObjectMeta) -> ObjectInfo {
        ObjectInfo {
            key: self.relative_key(&meta.location),
            size: meta.size,
            etag: meta.e_tag.as_deref().map(clean_etag),
            last_modified: Some(meta.last_modified),
        }
    }

    /// Map an object_store error to ours: 401/403 → access refused (78), 404 → not
    /// found, connection problems and 5xx after retries → temporary (75).
    fn error(&self, op: &'static str, key: &str, e: object_store::Error) -> StorageError {
        let target = self.inner.target.clone();
        match e {
            object_store::Error::NotFound { .. } => StorageError::NotFound {
                target,
                key: key.to_owned(),
            },
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => StorageError::Auth {
                target,
                message: e.to_string(),
            },
            e => {
                let message = e.to_string();
                // object_store's HttpError (which knows Connect/Timeout) sits behind a
                // private `transparent` enum, so it never shows up in the chain; look for
                // the io error underneath instead, and treat a transport failure without
                // an HTTP status ("HTTP error: error sending request") as unreachable.
                let mut connect =
                    message.contains("HTTP error") && !message.contains("status code");
                // A server certificate the trusted roots do not vouch for: retrying
                // will not help, the configuration (`ca_file`, the endpoint's name) must
                // change.
                if let Some(tls) = certificate_error(&e) {
                    return StorageError::Config {
                        target,
                        message: format!(
                            "TLS: {tls} (for a private CA, set ca_file in [storage.{}])",
                            self.inner.section
                        ),
                    };
                }
                let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
                while let Some(c) = cause {
                    if let Some(io) = c.downcast_ref::<std::io::Error>() {
                        connect |= crate::exit::is_temporary_io(io.kind());
                    }
                    if let Some(h) = c.downcast_ref::<object_store::client::HttpError>() {
                        use object_store::client::HttpErrorKind as K;
                        connect |= matches!(h.kind(), K::Connect | K::Timeout | K::Interrupted);
                    }
                    cause = c.source();
                }
                let retries = retries_in(&message);
                let error = if connect {
                    StorageError::Connect { target, message }
                } else {
                    let temporary = message.contains("status code: 5")
                        || message.contains("status code: 429")
                        || message.contains("SlowDown");
                    StorageError::Backend {
                        target,
                        op,
                        key: key.to_owned(),
                        message,
                        temporary,
                    }
                };
                // object_store already retried it under the one policy: no caller
                // retries it again.
                match retries {
                    Some(n) if n > 0 && error.is_temporary() => StorageError::GaveUp {
                        attempts: n + 1,
                        last: Box::new(error),
                    },
                    _ => error,
                }
            }
        }
    }

    fn integrity(&self, key: &str, message: String) -> StorageError {
        StorageError::Integrity {
            target: self.inner.target.clone(),
            key: key.to_owned(),
            message,
        }
    }

    /// Compare the ETag the server returned with the one the sent bytes imply (the MD5,
    /// or the multipart ETag); on a mismatch the object is deleted, so a corrupt upload
    /// never stays under its final name.
    async fn check_etag(
        &self,
        key: &str,
        etag: Option<&str>,
        expected: &str,
    ) -> Result<(), StorageError> {
        match etag {
            Some(etag) if !etag.eq_ignore_ascii_case(expected) => {
                let _ = self.delete(key).await;
                Err(self.integrity(
                    key,
                    format!(
                        "server ETag {etag} differs from {expected}, computed from the data sent"
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// The part size for an upload of `len` bytes (if known).
    fn part_size(&self, opts: &PutOptions, len: Option<u64>) -> Result<u64, StorageError> {
        let needed = len.map_or(MIN_PART_SIZE, part_size_for);
        let size = match opts.part_size.or(self.inner.part_size) {
            None => needed,
            Some(ps) if !(S3_MIN_PART..=MAX_PART_SIZE).contains(&ps) => {
                return Err(StorageError::Config {
                    target: self.inner.target.clone(),
                    message: format!("part size {ps} is outside S3's limits (5 MiB to 5 GiB)"),
                });
            }
            // A configured size that would need more than 10,000 parts grows instead.
            Some(ps) => len.map_or(ps, |l| {
                if l.div_ceil(ps) > MAX_PARTS {
                    needed
                } else {
                    ps
                }
            }),
        };
        if let Some(l) = len
            && l.div_ceil(size) > MAX_PARTS
        {
            return Err(StorageError::Config {
                target: self.inner.target.clone(),
                message: format!("{l} bytes is more than one S3 object can hold"),
            });
        }
        Ok(size)
    }

    /// Check that the bucket exists and the credentials may use it: one HeadBucket
    /// request. A missing bucket is a configuration error naming the section;
    /// `create_root` does not create buckets (that is the storage admin's job).
    pub async fn check_root(&self) -> Result<(), StorageError> {
        self.inner.uploader.head_bucket(&self.inner.section).await
    }

    /// Start a multipart upload of `key`. The object gets a `Content-Type` from its
    /// name but no `X-Amz-Meta-Md5chksum`: use
    /// [`create_multipart_with_md5`](Self::create_multipart_with_md5) when the whole
    /// file's MD5 is known.
    pub async fn create_multipart(&self, key: &str) -> Result<MultipartUpload, StorageError> {
        self.create_multipart_with_md5(key, None).await
    }

    /// Start a multipart upload of `key` whose whole content has the MD5 `md5` (raw
    /// bytes), stored as `X-Amz-Meta-Md5chksum` (base64, as rclone reads it). Metadata
    /// is fixed when the upload starts, so it can only be set from an MD5 computed
    /// before; it is not checked against the parts (the caller must pass the right one;
    /// `None` leaves the metadata out).
    pub async fn create_multipart_with_md5(
        &self,
        key: &str,
        md5: Option<[u8; 16]>,
    ) -> Result<MultipartUpload, StorageError> {
        let path = self.full_path(key)?;
        let upload_id = self
            .inner
            .uploader
            .create_multipart(key, path.as_ref(), md5)
            .await?;
        Ok(MultipartUpload {
            key: key.to_owned(),
            upload_id,
        })
    }

    /// Upload part `index` (0-based) of `upload`, whose MD5 is `md5`. Parts may be sent
    /// in any order and concurrently; all but the last must be the same size, at least
    /// 5 MiB. The server checks the bytes against `md5` (`Content-MD5`); with
    /// `verify_etag` the part ETag it returns must equal `md5` too (servers that encrypt
    /// with KMS keys return other ETags).
    pub async fn put_part(
        &self,
        upload: &MultipartUpload,
        index: usize,
        data: Bytes,
        md5: [u8; 16],
        verify_etag: bool,
    ) -> Result<UploadedPart, StorageError> {
        let path = self.full_path(&upload.key)?;
        let (etag, attempts) = self
            .inner
            .uploader
            .put(
                &upload.key,
                path.as_ref(),
                Dest::Part {
                    upload_id: &upload.upload_id,
                    number: index + 1,
                },
                data,
                md5,
            )
            .await?;
        let Some(etag) = etag else {
            return Err(self.integrity(
                &upload.key,
                format!("the server sent no ETag for part {}", index + 1),
            ));
        };
        if verify_etag {
            let want = hex::encode(md5);
            let got = clean_etag(&etag);
            if !got.eq_ignore_ascii_case(&want) {
                return Err(self.integrity(
                    &upload.key,
                    format!(
                        "part {} ETag {got} is not the MD5 {want} of the data sent",
                        index + 1
                    ),
                ));
            }
        }
        Ok(UploadedPart {
            index,
            etag,
            attempts,
        })
    }

    /// Complete `upload` from its parts in order (`parts[i].index == i`), publishing
    /// the object. Returns the object's ETag without quotes.
    pub async fn complete_multipart(
        &self,
        upload: &MultipartUpload,
        parts: Vec<UploadedPart>,
    ) -> Result<Option<String>, StorageError> {
        if parts.iter().enumerate().any(|(i, p)| p.index != i) {
            return Err(self.integrity(
                &upload.key,
                "parts passed to complete_multipart are not 0..N in order".into(),
            ));
        }
        let path = self.full_path(&upload.key)?;
        let ids = parts
            .into_iter()
            .map(|p| PartId { content_id: p.etag })
            .collect();
        let result = self
            .inner
            .store
            .complete_multipart(&path, &upload.upload_id, ids)
            .await
            .map_err(|e| self.error("put", &upload.key, e))?;
        Ok(result.e_tag.as_deref().map(clean_etag))
    }

    /// Abort `upload`, freeing the parts stored so far.
    pub async fn abort_multipart(&self, upload: &MultipartUpload) -> Result<(), StorageError> {
        let path = self.full_path(&upload.key)?;
        self.inner
            .store
            .abort_multipart(&path, &upload.upload_id)
            .await
            .map_err(|e| self.error("abort", &upload.key, e))
    }

    /// The streaming upload behind every put.
    async fn upload(
        &self,
        reader: Box<dyn Read + Send>,
        key: &str,
        len: Option<u64>,
        source_path: Option<PathBuf>,
        opts: &PutOptions,
    ) -> Result<PutOutcome, StorageError> {
        let path = self.full_path(key)?;
        let part_size = self.part_size(opts, len)?;
        let concurrency = opts
            .part_concurrency
            .or(self.inner.part_concurrency)
            .unwrap_or(DEFAULT_PART_CONCURRENCY)
            .max(1);
        let is_file = source_path.is_some();
        let source = Source {
            reader,
            whole: Md5Parts::new(),
            total: 0,
        };
        // A file known to be smaller than a part needs a buffer of its size (+1 byte to
        // notice growth), not a whole part: 16 small files in flight would otherwise
        // hold 16 part-sized buffers, which the allocator keeps resident.
        let first_len = len.map_or(part_size, |l| part_size.min(l.saturating_add(1)));
        let (source, first) = next_chunk(source, first_len, key, is_file).await?;
        let outcome = if (first.data.len() as u64) < part_size {
            self.single_put(&path, key, first, opts.verify_etag).await?
        } else {
            let upload = self.create_multipart_with_md5(key, opts.md5).await?;
            let mut guard = AbortOnDrop {
                store: self.inner.store.clone(),
                path: path.clone(),
                upload_id: upload.upload_id.clone(),
                armed: true,
            };
            let result = self
                .multipart(
                    &upload,
                    source,
                    first,
                    part_size,
                    concurrency,
                    opts.verify_etag,
                )
                .await;
            guard.armed = false;
            match result {
                Ok(o) => o,
                Err(e) => {
                    if let Err(abort) = self.abort_multipart(&upload).await {
                        tracing::warn!(key, "aborting the failed multipart upload failed: {abort}");
                    }
                    return Err(e);
                }
            }
        };
        if let Some(md5) = opts.md5
            && hex::encode(md5) != outcome.md5_hex
        {
            // Its metadata (multipart) would claim an MD5 the content does not have.
            let _ = self.delete(key).await;
            return Err(self.integrity(
                key,
                format!(
                    "the data's MD5 {} is not the {} the caller gave",
                    outcome.md5_hex,
                    hex::encode(md5)
                ),
            ));
        }
        if let (Some(path), Some(expected)) = (source_path, len)
            && outcome.size != expected
        {
            // Already published; remove the inconsistent object rather than leave it.
            let _ = self.delete(key).await;
            return Err(StorageError::Changed {
                path,
                expected,
                actual: outcome.size,
            });
        }
        Ok(outcome)
    }

    async fn single_put(
        &self,
        path: &ObjectPath,
        key: &str,
        chunk: Chunk,
        verify: bool,
    ) -> Result<PutOutcome, StorageError> {
        let size = chunk.data.len() as u64;
        let md5_hex = hex::encode(chunk.md5);
        let (etag, attempts) = self
            .inner
            .uploader
            .put(key, path.as_ref(), Dest::Object, chunk.data, chunk.md5)
            .await?;
        let etag = etag.as_deref().map(clean_etag);
        if verify {
            self.check_etag(key, etag.as_deref(), &md5_hex).await?;
        }
        Ok(PutOutcome {
            size,
            md5_hex,
            etag,
            parts: 0,
            part_size: 0,
            part_md5_hex: Vec::new(),
            range_size: 0,
            range_md5_hex: Vec::new(),
            retries: attempts.saturating_sub(1),
        })
    }

    async fn multipart(
        &self,
        upload: &MultipartUpload,
        mut source: Source,
        first: Chunk,
        part_size: u64,
        concurrency: usize,
        verify: bool,
    ) -> Result<PutOutcome, StorageError> {
        let key = upload.key.as_str();
        let mut tasks: JoinSet<(usize, Result<UploadedPart, StorageError>)> = JoinSet::new();
        let mut part_md5s: Vec<String> = Vec::new();
        let mut parts: Vec<Option<UploadedPart>> = Vec::new();
        let mut pending = Some(first);
        let mut eof = false;
        loop {
            while !eof && tasks.len() < concurrency {
                let chunk = if let Some(c) = pending.take() {
                    c
                } else {
                    let (s, c) = next_chunk(source, part_size, key, false).await?;
                    source = s;
                    c
                };
                if (chunk.data.len() as u64) < part_size {
                    eof = true;
                    if chunk.data.is_empty() {
                        break;
                    }
                }
                let index = part_md5s.len();
                if index as u64 >= MAX_PARTS {
                    return Err(StorageError::Backend {
                        target: self.inner.target.clone(),
                        op: "put",
                        key: key.to_owned(),
                        message: format!(
                            "the data needs more than {MAX_PARTS} parts of {part_size} bytes"
                        ),
                        temporary: false,
                    });
                }
                part_md5s.push(hex::encode(chunk.md5));
                parts.push(None);
                let this = self.clone();
                let upload = upload.clone();
                tasks.spawn(async move {
                    let r = this
                        .put_part(&upload, index, chunk.data, chunk.md5, verify)
                        .await;
                    (index, r)
                });
            }
            let Some(joined) = tasks.join_next().await else {
                break;
            };
            let (index, result) = joined.map_err(|e| StorageError::Backend {
                target: self.inner.target.clone(),
                op: "put",
                key: key.to_owned(),
                message: format!("part upload task failed: {e}"),
                temporary: false,
            })?;
            parts[index] = Some(result?);
        }
        let parts: Vec<UploadedPart> = parts.into_iter().flatten().collect();
        let retries = parts.iter().map(|p| p.attempts.saturating_sub(1)).sum();
        if parts.len() != part_md5s.len() {
            return Err(self.integrity(key, "a part went missing".into()));
        }
        let n_parts = parts.len() as u32;
        let etag = self.complete_multipart(upload, parts).await?;
        let expected = multipart_etag(&part_md5s).unwrap_or_default();
        if verify {
            self.check_etag(key, etag.as_deref(), &expected).await?;
        }
        Ok(PutOutcome {
            size: source.total,
            md5_hex: hex::encode(source.whole.finalize()),
            etag,
            parts: n_parts,
            part_size,
            part_md5_hex: part_md5s,
            range_size: 0,
            range_md5_hex: Vec::new(),
            retries,
        })
    }
}

/// The retries object_store made before it gave up, from its message ("Error after 3
/// retries in 1.2s, ..."); `None` when it did not retry.
fn retries_in(message: &str) -> Option<u32> {
    let rest = &message[message.find("after ")? + "after ".len()..];
    let n = rest.split_once(" retries")?.0;
    n.parse().ok()
}

/// Aborts a multipart upload in the background if the upload future is dropped.
struct AbortOnDrop {
    store: AmazonS3,
    path: ObjectPath,
    upload_id: String,
    armed: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let store = self.store.clone();
            let path = self.path.clone();
            let id = std::mem::take(&mut self.upload_id);
            handle.spawn(async move {
                if let Err(e) = store.abort_multipart(&path, &id).await {
                    tracing::warn!(path = %path, "aborting a cancelled multipart upload failed: {e}");
                }
            });
        }
    }
}

/// The data source of an upload, with the running MD5 of everything read.
struct Source {
    reader: Box<dyn Read + Send>,
    whole: Md5Parts,
    total: u64,
}

/// One part's data and MD5.
struct Chunk {
    data: Bytes,
    md5: [u8; 16],
}

/// Chunks up to this size of a local file are read on the calling task: a thread
/// handoff per small file costs more CPU (context switches) than the read itself.
const INLINE_READ: u64 = 64 * 1024;

/// Read up to `size` bytes (short only at the end of the data), on a blocking thread
/// unless it is a small chunk of a local file.
async fn next_chunk(
    source: Source,
    size: u64,
    key: &str,
    is_file: bool,
) -> Result<(Source, Chunk), StorageError> {
    if is_file && size <= INLINE_READ {
        return fill_chunk(source, size).map_err(StorageError::Local);
    }
    let key = key.to_owned();
    let joined = tokio::task::spawn_blocking(move || fill_chunk(source, size))
        .await
        .map_err(|e| StorageError::Source {
            key: key.clone(),
            source: std::io::Error::other(format!("reader task failed: {e}")),
        })?;
    joined.map_err(|source| {
        if is_file {
            StorageError::Local(source)
        } else {
            StorageError::Source { key, source }
        }
    })
}

/// Read up to `size` bytes from `source` and hash them.
fn fill_chunk(mut source: Source, size: u64) -> std::io::Result<(Source, Chunk)> {
    let mut buf = vec![0u8; size as usize];
    let filled = super::read_full(&mut source.reader, &mut buf)?;
    buf.truncate(filled);
    let md5 = source.whole.part(&buf);
    source.total += filled as u64;
    let chunk = Chunk {
        data: Bytes::from(buf),
        md5,
    };
    Ok((source, chunk))
}

/// The endpoint object_store should use: for virtual-hosted style it must already
/// contain the bucket (`https://BUCKET.oss-cn-shenzhen.aliyuncs.com`).
fn endpoint_url(
    endpoint: &str,
    bucket: &str,
    path_style: bool,
    allow_http: bool,
) -> Result<String, String> {
    let mut url = url::Url::parse(endpoint).map_err(|e| format!("endpoint is not a URL: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_http => {}
        "http" => {
            return Err(
                "endpoint is plain http://; set allow_http = true to permit it (trusted networks only)"
                    .into(),
            );
        }
        other => {
            return Err(format!(
                "endpoint scheme must be https or http, not {other}"
            ));
        }
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        return Err("endpoint must be scheme://host[:port] without a path".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "put credentials in access_key_id / secret_access_key, not the endpoint".into(),
        );
    }
    if !path_style {
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(_) => {
                return Err(
                    "virtual-hosted-style addressing needs a DNS name; set path_style = true for an IP endpoint"
                        .into(),
                );
            }
            None => return Err("endpoint has no host".into()),
        };
        if !host.starts_with(&format!("{bucket}.")) {
            url.set_host(Some(&format!("{bucket}.{host}")))
                .map_err(|e| format!("cannot put the bucket into the endpoint host: {e}"))?;
        }
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

impl ObjectStorage for S3Storage {
    fn describe(&self) -> String {
        self.inner.target.clone()
    }

    async fn put_file(
        &self,
        local: &Path,
        key: &str,
        opts: &PutOptions,
    ) -> Result<PutOutcome, StorageError> {
        validate_key(key)?;
        let file = fs_err::File::open(local).map_err(StorageError::Local)?;
        let len = file.metadata().map_err(StorageError::Local)?.len();
        self.upload(Box::new(file), key, Some(len), Some(local.to_owned()), opts)
            .await
    }

    async fn put_reader<R: Read + Send + 'static>(
        &self,
        reader: R,
        key: &str,
        opts: &PutOptions,
    ) -> Result<PutOutcome, StorageError> {
        self.upload(Box::new(reader), key, None, None, opts).await
    }

    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<PutOutcome, StorageError> {
        let len = data.len() as u64;
        self.upload(
            Box::new(std::io::Cursor::new(data)),
            key,
            Some(len),
            None,
            &PutOptions::default(),
        )
        .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        let path = self.full_path(key)?;
        match self.inner.store.head(&path).await {
            Ok(meta) => Ok(Some(self.info(&meta))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("head", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let prefix = validate_prefix(prefix)?;
        let full = match (self.inner.prefix.is_empty(), prefix.is_empty()) {
            (true, _) => prefix.clone(),
            (false, true) => self.inner.prefix.clone(),
            (false, false) => format!("{}/{prefix}", self.inner.prefix),
        };
        let full = if full.is_empty() {
            None
        } else {
            Some(
                ObjectPath::parse(&full).map_err(|_| StorageError::InvalidKey {
                    key: prefix.clone(),
                    reason: "not a valid object path",
                })?,
            )
        };
        let metas: Vec<ObjectMeta> = self
            .inner
            .store
            .list(full.as_ref())
            .try_collect()
            .await
            .map_err(|e| self.error("list", &prefix, e))?;
        let mut out: Vec<ObjectInfo> = metas
            .iter()
            .map(|m| self.info(m))
            // Nothing is ever put there (keys below it are refused); objects another
            // tool left there stay hidden, as on the other backends.
            .filter(|o| o.key.split('/').next() != Some(super::STAGING_DIR))
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn get_into<W: Write + Send + 'static>(
        &self,
        key: &str,
        mut writer: W,
    ) -> Result<GetOutcome, StorageError> {
        let path = self.full_path(key)?;
        let result = self
            .inner
            .store
            .get(&path)
            .await
            .map_err(|e| self.error("get", key, e))?;
        let mut stream = result.into_stream();
        // The network side stays async; hashing and writing happen on a blocking
        // thread, fed through a small bounded channel (memory stays a few MiB).
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(32);
        let write_key = key.to_owned();
        let writer_task = tokio::task::spawn_blocking(move || {
            let mut md5 = Md5::new();
            let mut total = 0u64;
            while let Some(chunk) = rx.blocking_recv() {
                md5.update(&chunk);
                writer.write_all(&chunk)?;
                total += chunk.len() as u64;
            }
            writer.flush()?;
            Ok::<_, std::io::Error>((total, md5.finalize()))
        });
        let mut stream_error = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => {
                    if tx.send(c).await.is_err() {
                        break; // the writer failed; its error is reported below
                    }
                }
                Err(e) => {
                    stream_error = Some(self.error("get", key, e));
                    break;
                }
            }
        }
        drop(tx);
        let written = writer_task.await.map_err(|e| {
            StorageError::Local(std::io::Error::other(format!(
                "download writer failed: {e}"
            )))
        })?;
        if let Some(e) = stream_error {
            return Err(e);
        }
        let (size, md5) = written.map_err(|e| {
            StorageError::Local(std::io::Error::new(
                e.kind(),
                format!("writing the download of {write_key}: {e}"),
            ))
        })?;
        Ok(GetOutcome {
            size,
            md5_hex: hex::encode(md5),
        })
    }

    async fn get_bytes(&self, key: &str) -> Result<Bytes, StorageError> {
        let path = self.full_path(key)?;
        let result = self
            .inner
            .store
            .get(&path)
            .await
            .map_err(|e| self.error("get", key, e))?;
        result.bytes().await.map_err(|e| self.error("get", key, e))
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.full_path(key)?;
        match self.inner.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("delete", key, e)),
        }
    }

    /// Nothing to do: S3 has no visible temporary objects (an unfinished multipart
    /// upload is never listed as an object). Aborts no multipart upload either: the
    /// delivery tool may be about to resume one.
    async fn clean_staging(&self, _keys: &[String]) -> Result<u64, StorageError> {
        Ok(0)
    }

    async fn presign_get(
        &self,
        key: &str,
        expires_in: Duration,
    ) -> Result<Option<url::Url>, StorageError> {
        let path = self.full_path(key)?;
        if expires_in > MAX_PRESIGN || expires_in.is_zero() {
            return Err(StorageError::Backend {
                target: self.inner.target.clone(),
                op: "presign",
                key: key.to_owned(),
                message: "a presigned URL must expire within 1 s to 7 days".into(),
                temporary: false,
            });
        }
        // `Default::default()` is `http::Method::GET`; naming the type would need the
        // http crate as a direct dependency just for this constant.
        #[allow(clippy::default_trait_access)]
        let url = self
            .inner
            .store
            .signed_url(Default::default(), &path, expires_in)
            .await
            .map_err(|e| self.error("presign", key, e))?;
        Ok(Some(url))
    }
}

/// The message of a TLS certificate failure in `e`'s chain of causes (rustls: "invalid
/// peer certificate: UnknownIssuer"), if there is one.
pub(super) fn certificate_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if text.to_ascii_lowercase().contains("certificate") {
            return Some(text);
        }
        cause = c.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            endpoint_url("https://oss-cn-shenzhen.aliyuncs.com", "b", false, false).unwrap(),
            "https://b.oss-cn-shenzhen.aliyuncs.com"
        );
        assert_eq!(
            endpoint_url("https://b.oss-cn-shenzhen.aliyuncs.com/", "b", false, false).unwrap(),
            "https://b.oss-cn-shenzhen.aliyuncs.com"
        );
        assert_eq!(
            endpoint_url("http://127.0.0.1:3900", "b", true, true).unwrap(),
            "http://127.0.0.1:3900"
        );
        assert!(endpoint_url("http://127.0.0.1:3900", "b", true, false).is_err());
        assert!(endpoint_url("http://127.0.0.1:3900", "b", false, true).is_err());
        assert!(endpoint_url("https://h/x", "b", true, false).is_err());
    }

    fn config(toml: &str) -> StorageConfig {
        let c = crate::config::Config::from_toml(toml).unwrap();
        c.storage["t"].clone()
    }

    #[test]
    fn credentials_are_required_and_never_shown() {
        let c =
            config("[storage.t]\nurl = \"s3://bkt/pre\"\nendpoint = \"https://s3.example.org\"\n");
        let err = S3Storage::open("bkt", "pre", &c).unwrap_err();
        assert!(err.to_string().contains("access_key_id"), "{err}");
        assert_eq!(err.exit(), crate::exit::Exit::Config);
        let c = config(
            "[storage.t]\nurl = \"s3://bkt/pre\"\nendpoint = \"https://s3.example.org\"\n\
             access_key_id = \"AKIDEXAMPLE\"\nsecret_access_key = \"wJalrXUtnFEMI\"\n",
        );
        let s = S3Storage::open("bkt", "pre", &c).unwrap();
        assert!(!format!("{s:?}").contains("wJalrXUtnFEMI"));
        assert_eq!(s.describe(), "s3://bkt/pre at https://s3.example.org");
    }

    #[test]
    fn configured_part_size_is_checked_and_grows() {
        let c = config(
            "[storage.t]\nurl = \"s3://bkt\"\npath_style = true\nendpoint = \"https://s3.example.org\"\n\
             access_key_id = \"a\"\nsecret_access_key = \"b\"\npart_size_mib = 8\n",
        );
        let s = S3Storage::open("bkt", "", &c).unwrap();
        let o = PutOptions::default();
        assert_eq!(s.part_size(&o, Some(1)).unwrap(), 8 << 20);
        let big = 500u64 << 30;
        assert_eq!(s.part_size(&o, Some(big)).unwrap(), part_size_for(big));
        let tiny = PutOptions {
            part_size: Some(1 << 20),
            ..PutOptions::default()
        };
        assert!(s.part_size(&tiny, Some(1)).is_err());
    }
}
