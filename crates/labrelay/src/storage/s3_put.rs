//! The S3 uploads themselves (PutObject and UploadPart), sent directly rather than
//! through object_store, whose multipart API takes no per-part headers.
//!
//! Every upload carries `Content-MD5`, so the server rejects a body that was damaged on
//! the way (`BadDigest`) before storing it, and the ETag it returns is compared with
//! the same MD5 afterwards. The payload is not hashed into the signature by default
//! (`x-amz-content-sha256: UNSIGNED-PAYLOAD`, as the AWS SDKs do over HTTPS): the
//! `Content-MD5` header is itself signed, and skipping a SHA-256 of every byte saves
//! CPU on both ends. `sign_payload = true` restores the SHA-256 for servers that demand
//! it. Requests are signed with object_store's SigV4 implementation.
//!
//! Objects carry the metadata other tools read: a `Content-Type` guessed from the key
//! ([`content_type_for`](super::content_type_for)) and, when the whole content's MD5 is
//! known, `X-Amz-Meta-Md5chksum` (base64 of the raw MD5, the name rclone uses). A single
//! PUT always knows it; a multipart upload only when the caller passes it to
//! CreateMultipartUpload ([`Uploader::create_multipart`]), which is sent from here too
//! because object_store's `MultipartStore` takes no headers.

use std::fmt::Write as _;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use object_store::aws::{AwsAuthorizer, AwsCredential};
use object_store::client::HttpRequest;
use sha2::{Digest, Sha256};

use super::StorageError;

/// The bytes every key is percent-encoded with, besides `/`: all but RFC 3986's
/// unreserved characters, as SigV4's canonical URI expects.
const KEY_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// Everything needed to sign and send an upload request.
pub(super) struct Uploader {
    client: reqwest::Client,
    credential: AwsCredential,
    region: String,
    /// `scheme://host[:port]/[bucket/]`: object URLs are this plus the encoded key.
    base: String,
    sign_payload: bool,
    target: String,
}

/// The user-metadata header holding the base64 MD5 of the whole object (rclone's name).
pub(super) const MD5_METADATA_HEADER: &str = "x-amz-meta-md5chksum";

/// The headers that describe an object (sent on PutObject and CreateMultipartUpload).
fn object_headers(key: &str, md5: Option<[u8; 16]>) -> Vec<(&'static str, String)> {
    let mut headers = vec![("content-type", super::content_type_for(key).to_owned())];
    if let Some(md5) = md5 {
        headers.push((
            MD5_METADATA_HEADER,
            base64::engine::general_purpose::STANDARD.encode(md5),
        ));
    }
    headers
}

/// Where an upload goes: a whole object, or one part of a multipart upload.
pub(super) enum Dest<'a> {
    Object,
    Part { upload_id: &'a str, number: usize },
}

impl Uploader {
    // One call site (S3Storage::open), which has every piece at hand; a settings struct
    // would only repeat these names.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        credential: AwsCredential,
        region: &str,
        base: String,
        sign_payload: bool,
        connect_timeout: Duration,
        timeout: Duration,
        target: String,
        ca: Option<&crate::config::CaCerts>,
    ) -> Result<Uploader, StorageError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .timeout(timeout);
        // `ca_file`: trusted next to the system's roots, as by object_store's client.
        for der in ca.iter().flat_map(|ca| &ca.der) {
            let cert = reqwest::Certificate::from_der(der).map_err(|e| StorageError::Config {
                target: target.clone(),
                message: format!(
                    "ca_file {}: {e}",
                    ca.map_or_else(String::new, |c| c.path.display().to_string())
                ),
            })?;
            builder = builder.add_root_certificate(cert);
        }
        // Proxies from the environment (HTTPS_PROXY, NO_PROXY) apply as they do to
        // object_store's client for the other calls.
        let client = builder.build().map_err(|e| StorageError::Config {
            target: target.clone(),
            message: format!("cannot build the HTTP client: {e}"),
        })?;
        Ok(Uploader {
            client,
            credential,
            region: region.to_owned(),
            base,
            sign_payload,
            target,
        })
    }

    /// The URL of `full_key` (prefix included).
    fn url(&self, full_key: &str, dest: &Dest<'_>) -> String {
        let mut url = format!(
            "{}{}",
            self.base,
            percent_encoding::utf8_percent_encode(full_key, KEY_ENCODE)
        );
        if let Dest::Part { upload_id, number } = dest {
            let id = percent_encoding::utf8_percent_encode(
                upload_id,
                percent_encoding::NON_ALPHANUMERIC,
            );
            let _ = write!(url, "?partNumber={number}&uploadId={id}");
        }
        url
    }

    /// PUT `data` with its `md5`; returns the ETag exactly as the server sent it (S3:
    /// in quotes), as CompleteMultipartUpload wants it back, and the attempts it took
    /// (temporary failures are retried here, by [`crate::retry`]).
    /// `key` (relative to the target) is only for messages.
    pub(super) async fn put(
        &self,
        key: &str,
        full_key: &str,
        dest: Dest<'_>,
        data: Bytes,
        md5: [u8; 16],
    ) -> Result<(Option<String>, u32), StorageError> {
        let url = self.url(full_key, &dest);
        let content_md5 = base64::engine::general_purpose::STANDARD.encode(md5);
        let digest: Option<[u8; 32]> = self.sign_payload.then(|| Sha256::digest(&data).into());
        // Parts carry no object headers: those belong to CreateMultipartUpload.
        let headers = match dest {
            Dest::Object => object_headers(key, Some(md5)),
            Dest::Part { .. } => Vec::new(),
        };
        // The one retry layer of a buffered upload: the same bytes are sent again.
        let part = match dest {
            Dest::Object => None,
            Dest::Part { number, .. } => Some(number),
        };
        let what = || match part {
            None => format!("PUT {key}"),
            Some(number) => format!("PUT {key} part {number}"),
        };
        crate::retry::run(crate::retry::policy(), what, |_| {
            self.put_once(key, &url, &content_md5, &headers, digest, data.clone())
        })
        .await
        .map(|done| (done.value, done.attempts))
        .map_err(crate::retry::Failed::into_error)
    }

    async fn put_once(
        &self,
        key: &str,
        url: &str,
        content_md5: &str,
        headers: &[(&'static str, String)],
        digest: Option<[u8; 32]>,
        data: Bytes,
    ) -> Result<Option<String>, StorageError> {
        let len = data.len();
        let mut builder = http::Request::builder()
            .method(http::Method::PUT)
            .uri(url)
            .header("content-md5", content_md5)
            .header(http::header::CONTENT_LENGTH, len);
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        let mut signed: HttpRequest = builder
            .body(Bytes::new().into())
            .map_err(|e| self.backend(key, format!("bad request: {e}"), false))?;
        AwsAuthorizer::new(&self.credential, "s3", &self.region)
            .with_sign_payload(self.sign_payload)
            .authorize(&mut signed, digest.as_ref().map(<[u8; 32]>::as_slice));
        let response = self
            .client
            .put(url)
            .headers(signed.headers().clone())
            .body(data)
            .send()
            .await
            .map_err(|e| self.transport(key, &e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response
                .headers()
                .get(http::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned));
        }
        let body = response.text().await.unwrap_or_default();
        Err(self.status_error(key, status, &body))
    }

    /// CreateMultipartUpload for `full_key` with the object's headers (`md5`: the whole
    /// content's MD5, when known); returns the upload id.
    pub(super) async fn create_multipart(
        &self,
        key: &str,
        full_key: &str,
        md5: Option<[u8; 16]>,
    ) -> Result<String, StorageError> {
        let url = format!("{}?uploads=", self.url(full_key, &Dest::Object));
        let headers = object_headers(key, md5);
        crate::retry::run(
            crate::retry::policy(),
            || format!("CreateMultipartUpload {key}"),
            |_| self.create_multipart_once(key, &url, &headers),
        )
        .await
        .map(|done| done.value)
        .map_err(crate::retry::Failed::into_error)
    }

    async fn create_multipart_once(
        &self,
        key: &str,
        url: &str,
        headers: &[(&'static str, String)],
    ) -> Result<String, StorageError> {
        let mut builder = http::Request::builder()
            .method(http::Method::POST)
            .uri(url)
            .header(http::header::CONTENT_LENGTH, 0);
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        let mut signed: HttpRequest = builder
            .body(Bytes::new().into())
            .map_err(|e| self.backend(key, format!("bad request: {e}"), false))?;
        let digest: Option<[u8; 32]> = self.sign_payload.then(|| Sha256::digest(b"").into());
        AwsAuthorizer::new(&self.credential, "s3", &self.region)
            .with_sign_payload(self.sign_payload)
            .authorize(&mut signed, digest.as_ref().map(<[u8; 32]>::as_slice));
        let response = self
            .client
            .post(url)
            .headers(signed.headers().clone())
            .body(Bytes::new())
            .send()
            .await
            .map_err(|e| self.transport(key, &e))?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(self.status_error(key, status, &body));
        }
        xml_field(&body, "UploadId")
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                self.backend(
                    key,
                    "the server's answer to CreateMultipartUpload has no UploadId".into(),
                    false,
                )
            })
    }

    /// HeadBucket: `Ok` when the bucket exists and the credentials may use it; a
    /// missing bucket is a configuration error naming `section`.
    pub(super) async fn head_bucket(&self, section: &str) -> Result<(), StorageError> {
        let url = self.base.clone();
        crate::retry::run(
            crate::retry::policy(),
            || "HeadBucket".into(),
            |_| self.head_bucket_once(&url, section),
        )
        .await
        .map(|done| done.value)
        .map_err(crate::retry::Failed::into_error)
    }

    async fn head_bucket_once(&self, url: &str, section: &str) -> Result<(), StorageError> {
        let mut signed: HttpRequest = http::Request::builder()
            .method(http::Method::HEAD)
            .uri(url)
            .body(Bytes::new().into())
            .map_err(|e| self.backend("", format!("bad request: {e}"), false))?;
        let digest: Option<[u8; 32]> = self.sign_payload.then(|| Sha256::digest(b"").into());
        AwsAuthorizer::new(&self.credential, "s3", &self.region)
            .with_sign_payload(self.sign_payload)
            .authorize(&mut signed, digest.as_ref().map(<[u8; 32]>::as_slice));
        let response = self
            .client
            .head(url)
            .headers(signed.headers().clone())
            .send()
            .await
            .map_err(|e| self.transport("", &e))?;
        let status = response.status();
        match status.as_u16() {
            s if (200..300).contains(&s) => Ok(()),
            404 => {
                let section = super::section_label(section);
                Err(StorageError::Config {
                    target: self.target.clone(),
                    message: format!(
                        "{section}: the bucket does not exist (or is not visible to this key)"
                    ),
                })
            }
            // HEAD answers have no body, so no S3 error code to refine this.
            _ => Err(self.status_error("", status, "")),
        }
    }

    fn backend(&self, key: &str, message: String, temporary: bool) -> StorageError {
        StorageError::Backend {
            target: self.target.clone(),
            op: "put",
            key: key.to_owned(),
            message,
            temporary,
        }
    }

    fn transport(&self, key: &str, e: &reqwest::Error) -> StorageError {
        // reqwest's message names the URL: the key and upload id, nothing secret.
        let message = error_chain(e);
        if let Some(tls) = super::s3::certificate_error(e) {
            // Not a reason to retry: see S3Storage::error.
            return StorageError::Config {
                target: self.target.clone(),
                message: format!("TLS: {tls} (for a private CA, set ca_file)"),
            };
        }
        if e.is_connect() || e.is_timeout() || e.is_request() || e.is_body() {
            StorageError::Connect {
                target: self.target.clone(),
                message,
            }
        } else {
            self.backend(key, message, true)
        }
    }

    fn status_error(&self, key: &str, status: reqwest::StatusCode, body: &str) -> StorageError {
        let code = xml_field(body, "Code").unwrap_or_default();
        let detail = xml_field(body, "Message").unwrap_or_default();
        let message = match (code.is_empty(), detail.is_empty()) {
            (true, _) => format!("HTTP {status}"),
            (false, true) => format!("HTTP {status}: {code}"),
            (false, false) => format!("HTTP {status}: {code}: {detail}"),
        };
        match (status.as_u16(), code.as_str()) {
            (_, "BadDigest" | "InvalidDigest") => StorageError::Integrity {
                target: self.target.clone(),
                key: key.to_owned(),
                message: format!("the server refused the data as damaged ({message})"),
            },
            (401 | 403, _) => StorageError::Auth {
                target: self.target.clone(),
                message,
            },
            (404, "NoSuchUpload" | "NoSuchKey" | "") => StorageError::NotFound {
                target: self.target.clone(),
                key: key.to_owned(),
            },
            (s, _) => self.backend(key, message, s >= 500 || s == 429 || code == "SlowDown"),
        }
    }
}

/// A reqwest error with its causes, e.g. "error sending request: connection refused".
fn error_chain(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    message
}

/// The text of the first `<name>…</name>` of an S3 error body.
fn xml_field(body: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..].find(&close)? + start;
    Some(body[start..end].trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded_for_sigv4() {
        let u = Uploader::new(
            AwsCredential {
                key_id: "id".into(),
                secret_key: "secret".into(),
                token: None,
            },
            "garage",
            "http://127.0.0.1:3900/bucket/".into(),
            false,
            Duration::from_secs(1),
            Duration::from_secs(1),
            "s3://bucket".into(),
            None,
        )
        .unwrap();
        assert_eq!(
            u.url("p/a b/数据+(1).txt", &Dest::Object),
            "http://127.0.0.1:3900/bucket/p/a%20b/%E6%95%B0%E6%8D%AE%2B%281%29.txt"
        );
        assert_eq!(
            u.url(
                "k",
                &Dest::Part {
                    upload_id: "a/b=",
                    number: 3
                }
            ),
            "http://127.0.0.1:3900/bucket/k?partNumber=3&uploadId=a%2Fb%3D"
        );
    }

    #[test]
    fn object_headers_carry_type_and_md5() {
        let md5: [u8; 16] = md5::Md5::digest(b"hello").into();
        assert_eq!(
            object_headers("r/report.pdf", Some(md5)),
            [
                ("content-type", "application/pdf".to_owned()),
                (MD5_METADATA_HEADER, "XUFAKrxLKna5cZ2REBfFkg==".to_owned()),
            ]
        );
        assert_eq!(
            object_headers("r/x.bam", None),
            [("content-type", "application/octet-stream".to_owned())]
        );
    }

    #[test]
    fn error_bodies_are_classified() {
        let body = "<?xml version=\"1.0\"?><Error><Code>BadDigest</Code><Message>The Content-MD5 you specified did not match</Message></Error>";
        assert_eq!(xml_field(body, "Code").as_deref(), Some("BadDigest"));
        assert_eq!(xml_field("<Error></Error>", "Code"), None);
    }
}
