//! Delivery storage (placeholder until the storage module lands).
use std::path::PathBuf;

use crate::exit::Exit;

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The server could not be reached.
    #[error("cannot reach storage {target}: {message}")]
    Connect {
        /// Redacted target.
        target: String,
        /// Why.
        message: String,
    },
}

impl StorageError {
    /// Exit status.
    pub fn exit(&self) -> Exit {
        Exit::TempFail
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
