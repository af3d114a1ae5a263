//! The SFTP backend, over sessions from [`crate::ssh`] (so host keys and
//! authentication follow the same rules as remote commands).
//!
//! A put writes a temporary file in `<base>/.labrelay-staging/` (named `<key
//! hash>.<random>`, see [`STAGING_DIR`](super::STAGING_DIR); created on demand), then
//! renames it over `name`, so nothing but the finished object ever appears in the
//! customer's folders, even when the process is killed. OpenSSH speaks SFTP version 3,
//! whose RENAME refuses to replace an existing file; an overwrite therefore falls back
//! to an atomic `mv -f` over the same SSH connection, and only on servers without a
//! shell to remove-then-rename (a moment without the file, never a partial one under its
//! name). The staging folder must be on the same filesystem as the folders below the
//! base (true unless the server mounts something below it).
//! The MD5 is computed locally while streaming; [`SftpStorage::remote_md5`] recomputes
//! it on the server with `md5sum` for verification.
//!
//! URL paths follow curl: `sftp://u@h/data` is the absolute path `/data` on the server
//! (as the server sees it: below its chroot, if it has one), `sftp://u@h/~/data` is
//! `data` below the login directory, `sftp://u@h` is the login directory. The base
//! directory must exist ([`SftpStorage::check_root`]; `create_root = true` creates it);
//! directories below it are created as needed.
//!
//! ssh2 is blocking, so every operation runs on a blocking thread with a connection
//! taken from a small pool (one SSH connection per concurrent operation).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use chrono::DateTime;
use ssh2::{ErrorCode, OpenFlags, OpenType, RenameFlags, Sftp};

use super::local::blocking;
use super::{
    CancelOnDrop, CopyError, GetOutcome, ObjectInfo, ObjectStorage, PutOptions, PutOutcome,
    STAGING_DIR, StagingSweep, StorageError, copy_hashing, percent_decode, staging_name,
    validate_key, validate_prefix,
};
use crate::config::StorageConfig;
use crate::hash::Md5Parts;
use crate::secret::SecretSpec;
use crate::ssh::{SshParams, SshSession, default_known_hosts, shell_quote};

/// Idle connections kept for reuse.
const POOL_MAX_IDLE: usize = 16;

// SFTP status codes (draft-ietf-secsh-filexfer-02).
const FX_NO_SUCH_FILE: i32 = 2;
const FX_PERMISSION_DENIED: i32 = 3;
const FX_NO_SUCH_PATH: i32 = 10;

/// A directory on an SFTP server.
#[derive(Debug, Clone)]
pub struct SftpStorage {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    params: SshParams,
    /// Remote base directory: `""` is the login directory, otherwise a path without a
    /// trailing `/` (`/` itself stays `/`).
    base: String,
    target: String,
    /// The `[storage.NAME]` section, for messages (may be empty).
    section: String,
    create_root: bool,
    pool: Mutex<Vec<Conn>>,
}

struct Conn {
    // Field order: the SFTP channel closes before its session.
    sftp: Sftp,
    ssh: SshSession,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("ssh", &self.ssh)
            .finish_non_exhaustive()
    }
}

impl SftpStorage {
    /// Settings for `sftp://user@host:port/path`; resolves the password and passphrase.
    pub fn open(
        user: &str,
        host: &str,
        port: u16,
        path: &str,
        config: &StorageConfig,
    ) -> Result<SftpStorage, StorageError> {
        let path = percent_decode(path);
        let target = format!("sftp://{user}@{host}:{port}{path}");
        let resolve = |s: &Option<SecretSpec>| {
            s.as_ref()
                .map(SecretSpec::resolve)
                .transpose()
                .map_err(StorageError::Secret)
        };
        let server = format!("{host}:{port}");
        let params = SshParams {
            host: host.to_owned(),
            port,
            user: user.to_owned(),
            key_file: config.key_file.clone(),
            key_passphrase: resolve(&config.key_passphrase)?,
            password: resolve(&config.password)?,
            known_hosts: match &config.known_hosts {
                Some(p) => p.clone(),
                None => default_known_hosts(&server)?,
            },
            host_key_policy: config.host_key_policy,
            timeout: Duration::from_secs(config.timeout_secs.unwrap_or(30).max(1)),
        };
        if params.key_file.is_none() && params.password.is_none() {
            return Err(StorageError::Config {
                target,
                message: "set key_file or password".into(),
            });
        }
        Ok(SftpStorage {
            inner: Arc::new(Inner {
                params,
                base: base_dir(&path),
                target,
                section: config.name.clone(),
                create_root: config.create_root,
                pool: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Check that the base folder exists on the server (one `stat`), creating it level
    /// by level with `create_root = true`. A missing folder is a configuration error
    /// naming the section and the folder.
    pub async fn check_root(&self) -> Result<(), StorageError> {
        self.with_conn(|inner, conn| inner.check_root(&conn.sftp))
            .await
    }

    /// The remote path of `key`.
    pub fn remote_path(&self, key: &str) -> Result<String, StorageError> {
        validate_key(key)?;
        Ok(join(&self.inner.base, key))
    }

    /// The MD5 of the stored object, computed on the server with `md5sum` (needs a
    /// shell account). The timeout grows with the size (60 s + 1 s per 20 MiB).
    pub async fn remote_md5(&self, key: &str) -> Result<String, StorageError> {
        let path = self.remote_path(key)?;
        let key = key.to_owned();
        self.with_conn(move |inner, conn| {
            let stat = conn
                .sftp
                .stat(Path::new(&path))
                .map_err(|e| inner.sftp_error("md5", &key, &e))?;
            let out = conn.ssh.exec_blocking(
                &format!("md5sum -- {}", shell_quote(&path)),
                md5_timeout(stat.size.unwrap_or(0)),
            )?;
            let text = out.stdout_text();
            match text.split_whitespace().next().and_then(md5_word) {
                Some(hash) if out.success() => Ok(hash),
                _ => Err(inner.md5_failed(&key, "md5sum", &out)),
            }
        })
        .await
    }

    /// The MD5s of consecutive ranges of `range_size` bytes of the stored object (the
    /// last one shorter), computed on the server by `count` `md5sum`s running in
    /// parallel, so verifying a large file takes a fraction of one `md5sum`. Needs a
    /// shell with `head -c` and `tail -c`; a caller that finds a mismatch should check
    /// with [`SftpStorage::remote_md5`] before calling the file damaged.
    pub async fn remote_md5_ranges(
        &self,
        key: &str,
        range_size: u64,
        count: usize,
    ) -> Result<Vec<String>, StorageError> {
        let path = self.remote_path(key)?;
        let key = key.to_owned();
        self.with_conn(move |inner, conn| {
            let out = conn.ssh.exec_blocking(
                &ranges_command(&path, range_size, count),
                md5_timeout(range_size.saturating_mul(count as u64)),
            )?;
            let mut hashes = vec![String::new(); count];
            for line in out.stdout_text().lines() {
                let mut words = line.split_whitespace();
                if let (Some(i), Some(h)) = (words.next(), words.next().and_then(md5_word))
                    && let Ok(i) = i.parse::<usize>()
                    && i < count
                {
                    hashes[i] = h;
                }
            }
            if !out.success() || hashes.iter().any(String::is_empty) {
                return Err(inner.md5_failed(&key, &format!("md5sum of {count} ranges"), &out));
            }
            Ok(hashes)
        })
        .await
    }

    /// Run `f` with a pooled connection on a blocking thread. The connection goes back
    /// to the pool unless the operation failed in a way that may have broken it.
    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner, &Conn) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let conn = inner.checkout()?;
            let result = f(&inner, &conn);
            let reusable = match &result {
                Ok(_) => true,
                // Errors that say nothing about the connection; anything else may
                // have left the session in an unknown state, so it is dropped.
                Err(e) => matches!(
                    e,
                    StorageError::NotFound { .. }
                        | StorageError::InvalidKey { .. }
                        | StorageError::Source { .. }
                        | StorageError::Local(_)
                        | StorageError::Changed { .. }
                ),
            };
            if reusable {
                inner.checkin(conn);
            }
            result
        })
        .await
    }

    async fn put_from(
        &self,
        reader: Box<dyn Read + Send>,
        key: &str,
        source_file: Option<(PathBuf, u64)>,
    ) -> Result<PutOutcome, StorageError> {
        let dest = self.remote_path(key)?;
        let key = key.to_owned();
        let (_cancel_guard, cancel) = CancelOnDrop::new();
        self.with_conn(move |inner, conn| {
            inner.put_blocking(conn, reader, &key, &dest, source_file, &cancel)
        })
        .await
    }
}

/// The base directory from a URL path (already percent-decoded).
fn base_dir(path: &str) -> String {
    if path.is_empty() || path == "/~" {
        return String::new();
    }
    if let Some(rel) = path.strip_prefix("/~/") {
        return rel.trim_end_matches('/').to_owned();
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    }
}

fn join(base: &str, rel: &str) -> String {
    match base {
        "" => rel.to_owned(),
        "/" => format!("/{rel}"),
        b => format!("{b}/{rel}"),
    }
}

fn is_not_found(e: &ssh2::Error) -> bool {
    matches!(e.code(), ErrorCode::SFTP(FX_NO_SUCH_FILE | FX_NO_SUCH_PATH))
}

impl Inner {
    fn checkout(&self) -> Result<Conn, StorageError> {
        let idle = self
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        if let Some(c) = idle {
            return Ok(c);
        }
        let ssh = SshSession::connect_blocking(&self.params)?;
        let sftp = ssh.sftp()?;
        Ok(Conn { sftp, ssh })
    }

    fn checkin(&self, conn: Conn) {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.len() < POOL_MAX_IDLE {
            pool.push(conn);
        }
    }

    fn sftp_error(&self, op: &'static str, key: &str, e: &ssh2::Error) -> StorageError {
        let target = self.target.clone();
        match e.code() {
            ErrorCode::SFTP(FX_NO_SUCH_FILE | FX_NO_SUCH_PATH) => StorageError::NotFound {
                target,
                key: key.to_owned(),
            },
            ErrorCode::SFTP(FX_PERMISSION_DENIED) => StorageError::Backend {
                target,
                op,
                key: key.to_owned(),
                message: "permission denied".into(),
                temporary: false,
            },
            ErrorCode::SFTP(_) => StorageError::Backend {
                target,
                op,
                key: key.to_owned(),
                message: e.message().to_owned(),
                temporary: false,
            },
            ErrorCode::Session(_) if crate::ssh::is_timeout(e) => StorageError::Connect {
                target,
                message: format!("timed out after {:?}", self.params.timeout),
            },
            // Transport trouble (connection lost, protocol error): retry later.
            ErrorCode::Session(_) => StorageError::Backend {
                target,
                op,
                key: key.to_owned(),
                message: e.message().to_owned(),
                temporary: true,
            },
        }
    }

    fn io_error(&self, op: &'static str, key: &str, e: &std::io::Error) -> StorageError {
        StorageError::Backend {
            target: self.target.clone(),
            op,
            key: key.to_owned(),
            message: e.to_string(),
            temporary: matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::Other
            ),
        }
    }

    /// The base folder as a message shows it.
    fn base_shown(&self) -> &str {
        if self.base.is_empty() {
            "(the login folder)"
        } else {
            &self.base
        }
    }

    fn base_missing(&self) -> StorageError {
        super::missing_root(&self.section, self.target.clone(), self.base_shown())
    }

    fn check_root(&self, sftp: &Sftp) -> Result<(), StorageError> {
        let base = if self.base.is_empty() {
            "."
        } else {
            &self.base
        };
        match sftp.stat(Path::new(base)) {
            Ok(st) if st.is_dir() => Ok(()),
            Ok(_) => Err(StorageError::Config {
                target: self.target.clone(),
                message: format!(
                    "{}: the base folder {base} is not a directory",
                    super::section_label(&self.section)
                ),
            }),
            Err(e) if is_not_found(&e) && self.create_root => self.create_base(sftp),
            Err(e) if is_not_found(&e) => Err(self.base_missing()),
            Err(e) => Err(self.sftp_error("check", base, &e)),
        }
    }

    /// `mkdir -p` of the base folder (`create_root = true`).
    fn create_base(&self, sftp: &Sftp) -> Result<(), StorageError> {
        let mut current = if self.base.starts_with('/') {
            "/".to_owned()
        } else {
            String::new()
        };
        for segment in self.base.split('/').filter(|s| !s.is_empty()) {
            current = join(&current, segment);
            let p = Path::new(&current);
            if let Err(e) = sftp.mkdir(p, 0o755) {
                match sftp.stat(p) {
                    Ok(st) if st.is_dir() => {}
                    _ => return Err(self.sftp_error("mkdir", &current, &e)),
                }
            }
        }
        tracing::info!(target_ = %self.target, "created the base folder (create_root = true)");
        Ok(())
    }

    /// The staging folder, where puts write before the final rename.
    fn staging_dir(&self) -> String {
        join(&self.base, STAGING_DIR)
    }

    /// Create the staging folder (the base must exist).
    fn mkdir_staging(&self, sftp: &Sftp, key: &str) -> Result<(), StorageError> {
        let dir = self.staging_dir();
        let p = Path::new(&dir);
        match sftp.mkdir(p, 0o755) {
            Ok(()) => Ok(()),
            Err(e) => match sftp.stat(p) {
                Ok(st) if st.is_dir() => Ok(()),
                Ok(_) => Err(StorageError::Backend {
                    target: self.target.clone(),
                    op: "put",
                    key: key.to_owned(),
                    message: format!("{dir} exists and is not a directory"),
                    temporary: false,
                }),
                Err(_) if is_not_found(&e) => Err(self.base_missing()),
                Err(_) => Err(self.sftp_error("put", key, &e)),
            },
        }
    }

    /// Create the directories of `key`'s parent below the base, one level at a time.
    fn mkdir_p(&self, sftp: &Sftp, key: &str) -> Result<(), StorageError> {
        let base_missing = || self.base_missing();
        let Some((rel_dir, _)) = key.rsplit_once('/') else {
            // The file goes straight into the base: nothing to create.
            return Ok(());
        };
        let mut current = self.base.clone();
        for (depth, segment) in rel_dir.split('/').enumerate() {
            current = join(&current, segment);
            let p = Path::new(&current);
            if let Err(e) = sftp.mkdir(p, 0o755) {
                match sftp.stat(p) {
                    Ok(st) if st.is_dir() => {}
                    Ok(_) => {
                        return Err(StorageError::Backend {
                            target: self.target.clone(),
                            op: "put",
                            key: key.to_owned(),
                            message: format!("{current} exists and is not a directory"),
                            temporary: false,
                        });
                    }
                    Err(_) if depth == 0 && is_not_found(&e) => return Err(base_missing()),
                    Err(_) => return Err(self.sftp_error("put", key, &e)),
                }
            }
        }
        Ok(())
    }

    fn open_partial(sftp: &Sftp, partial: &str) -> Result<ssh2::File, ssh2::Error> {
        sftp.open_mode(
            Path::new(partial),
            OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE,
            0o644,
            OpenType::File,
        )
    }

    fn put_blocking(
        &self,
        conn: &Conn,
        mut reader: Box<dyn Read + Send>,
        key: &str,
        dest: &str,
        source_file: Option<(PathBuf, u64)>,
        cancel: &AtomicBool,
    ) -> Result<PutOutcome, StorageError> {
        let sftp = &conn.sftp;
        let partial = join(&self.staging_dir(), &staging_name(key));
        let mut file = match Self::open_partial(sftp, &partial) {
            Ok(f) => f,
            Err(e) if is_not_found(&e) => {
                self.mkdir_staging(sftp, key)?;
                Self::open_partial(sftp, &partial).map_err(|e| self.sftp_error("put", key, &e))?
            }
            Err(e) => return Err(self.sftp_error("put", key, &e)),
        };
        let remove_partial = || {
            let _ = sftp.unlink(Path::new(&partial));
        };
        let range_size = source_file
            .as_ref()
            .map_or(0, |(_, len)| range_size_for(*len));
        let copied = pipelined_copy(&mut reader, &mut file, cancel, range_size);
        let (size, md5, ranges) = match copied {
            Ok(r) => r,
            Err(e) => {
                drop(file);
                remove_partial();
                return Err(match e {
                    CopyError::Read(e) if source_file.is_some() => StorageError::Local(e),
                    CopyError::Read(source) => StorageError::Source {
                        key: key.to_owned(),
                        source,
                    },
                    CopyError::Write(e) => self.io_error("put", key, &e),
                    CopyError::Cancelled => self.cancelled(key),
                });
            }
        };
        if let Some((path, expected)) = source_file
            && expected != size
        {
            drop(file);
            remove_partial();
            return Err(StorageError::Changed {
                path,
                expected,
                actual: size,
            });
        }
        // fsync@openssh.com; servers without the extension just skip it.
        if let Err(e) = file.fsync() {
            tracing::debug!(key, "sftp fsync not available: {}", e.message());
        }
        if let Err(e) = file.close() {
            remove_partial();
            return Err(self.sftp_error("put", key, &e));
        }
        // The last chance to honour a cancellation: after the rename the file is public.
        if cancel.load(Ordering::SeqCst) {
            remove_partial();
            return Err(self.cancelled(key));
        }
        // The folders of the key are created only when the rename says they are
        // missing: most puts go into folders that exist, and this saves round trips.
        let renamed = match self.rename_over(conn, &partial, dest, key) {
            Err(StorageError::NotFound { .. }) if key.contains('/') => self
                .mkdir_p(sftp, key)
                .and_then(|()| self.rename_over(conn, &partial, dest, key)),
            r => r,
        };
        if let Err(e) = renamed {
            remove_partial();
            return Err(e);
        }
        Ok(PutOutcome {
            size,
            md5_hex: hex::encode(md5),
            etag: None,
            parts: 0,
            part_size: 0,
            part_md5_hex: Vec::new(),
            range_size: if ranges.is_empty() { 0 } else { range_size },
            range_md5_hex: ranges.iter().map(hex::encode).collect(),
            retries: 0,
        })
    }

    /// A remote `md5sum` (`what`) that failed or printed no hash.
    fn md5_failed(&self, key: &str, what: &str, out: &crate::ssh::Output) -> StorageError {
        StorageError::Backend {
            target: self.target.clone(),
            op: "md5",
            key: key.to_owned(),
            message: format!(
                "{what} failed (status {}): {}",
                out.status,
                out.stderr_text().trim()
            ),
            temporary: false,
        }
    }

    fn cancelled(&self, key: &str) -> StorageError {
        StorageError::Backend {
            target: self.target.clone(),
            op: "put",
            key: key.to_owned(),
            message: "cancelled".into(),
            temporary: false,
        }
    }

    fn rename_over(
        &self,
        conn: &Conn,
        partial: &str,
        dest: &str,
        key: &str,
    ) -> Result<(), StorageError> {
        let sftp = &conn.sftp;
        let flags = RenameFlags::OVERWRITE | RenameFlags::ATOMIC | RenameFlags::NATIVE;
        let Err(first) = sftp.rename(Path::new(partial), Path::new(dest), Some(flags)) else {
            return Ok(());
        };
        match sftp.stat(Path::new(dest)) {
            Err(_) => return Err(self.sftp_error("put", key, &first)),
            Ok(st) if st.is_dir() => {
                return Err(StorageError::Backend {
                    target: self.target.clone(),
                    op: "put",
                    key: key.to_owned(),
                    message: format!("{dest} is a directory"),
                    temporary: false,
                });
            }
            Ok(_) => {}
        }
        // The destination exists and SFTP v3 will not replace it: rename(2) via the shell.
        let mv = format!("mv -f -- {} {}", shell_quote(partial), shell_quote(dest));
        match conn.ssh.exec_blocking(&mv, self.params.timeout) {
            Ok(out) if out.success() => return Ok(()),
            Ok(out) => tracing::debug!(
                key,
                status = out.status,
                "mv -f failed; replacing in two steps"
            ),
            Err(e) => tracing::debug!(key, "no shell for mv -f ({e}); replacing in two steps"),
        }
        sftp.unlink(Path::new(dest))
            .map_err(|e| self.sftp_error("put", key, &e))?;
        sftp.rename(Path::new(partial), Path::new(dest), Some(flags))
            .map_err(|e| self.sftp_error("put", key, &e))
    }

    fn walk(
        &self,
        sftp: &Sftp,
        dir: &str,
        key_prefix: &str,
        out: &mut Vec<ObjectInfo>,
    ) -> Result<(), StorageError> {
        let listing_dir = if dir.is_empty() { "." } else { dir };
        let entries = match sftp.readdir(Path::new(listing_dir)) {
            Ok(e) => e,
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(self.sftp_error("list", key_prefix, &e)),
        };
        for (path, stat) in entries {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                tracing::warn!(path = %path.display(), "skipping a remote file whose name is not UTF-8");
                continue;
            };
            let key = if key_prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{key_prefix}/{name}")
            };
            if key_prefix.is_empty() && name == STAGING_DIR {
                // Uploads in progress (or killed before they could clean up).
            } else if stat.is_dir() {
                self.walk(sftp, &join(dir, name), &key, out)?;
            } else if stat.is_file() {
                out.push(stat_info(key, &stat));
            }
        }
        Ok(())
    }
}

/// How long an `md5sum` of `size` bytes on the server may take: 60 s + 1 s per 20 MiB.
fn md5_timeout(size: u64) -> Duration {
    Duration::from_secs(60 + size / (20 * 1024 * 1024))
}

/// An MD5 as `md5sum` prints it (32 hex digits), in lowercase.
fn md5_word(word: &str) -> Option<String> {
    (word.len() == 32 && word.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| word.to_ascii_lowercase())
}

/// Smallest range verified on its own on the server.
const MIN_RANGE: u64 = 64 * 1024 * 1024;
/// Most ranges verified at once on the server.
const MAX_RANGES: u64 = 4;

/// The range size for verifying a file of `len` bytes in parallel on the server: up
/// to [`MAX_RANGES`] ranges of at least [`MIN_RANGE`], a multiple of [`READ_CHUNK`];
/// 0 (one `md5sum` of the whole file) below two full ranges.
fn range_size_for(len: u64) -> u64 {
    if len < 2 * MIN_RANGE {
        return 0;
    }
    let chunk = READ_CHUNK as u64;
    (len.div_ceil(MAX_RANGES).div_ceil(chunk) * chunk).max(MIN_RANGE)
}

/// A shell command printing `<index> <md5>` for each range of `path`, the `md5sum`s
/// running in parallel. Each line comes from one `echo`, so lines never interleave.
fn ranges_command(path: &str, range_size: u64, count: usize) -> String {
    let f = shell_quote(path);
    let mut cmd = String::new();
    for i in 0..count {
        let offset = i as u64 * range_size + 1; // tail counts from 1
        let read = if i == 0 {
            format!("head -c {range_size} -- {f}")
        } else if i + 1 == count {
            format!("tail -c +{offset} -- {f}")
        } else {
            format!("tail -c +{offset} -- {f} | head -c {range_size}")
        };
        let _ = write!(cmd, "(echo \"{i} $({read} | md5sum)\") & ");
    }
    cmd.push_str("wait");
    cmd
}

/// Bytes handed to libssh2 ahead of the server's acknowledgements.
const WRITE_WINDOW: usize = 8 * 1024 * 1024;
/// Bytes read (and hashed) at a time.
const READ_CHUNK: usize = 1024 * 1024;
/// Chunks read ahead of the writer.
const READ_AHEAD: usize = 4;

/// Copy `reader` into an SFTP file, returning the byte count and MD5.
///
/// Two threads: one reads and hashes, this one writes, so the MD5 and libssh2's
/// encryption run on different cores. libssh2 turns everything passed to one
/// `sftp_write` into WRITE requests at once and returns as soon as the first is
/// acknowledged, expecting the unacknowledged rest at the start of the next call's
/// buffer; `write_all` on a fixed buffer would let the pipeline run dry at the end of
/// every buffer. Here the buffer slides instead: after each acknowledgement newly read
/// data is appended behind the requests in flight, so the server always has work.
fn pipelined_copy(
    reader: &mut (dyn Read + Send),
    file: &mut ssh2::File,
    cancel: &AtomicBool,
    range_size: u64,
) -> Result<Hashed, CopyError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(READ_AHEAD);
    let stop = AtomicBool::new(false);
    let stop = &stop;
    std::thread::scope(|scope| {
        // The sender moves into the thread: when it ends, the writer's recv ends too.
        let reading = scope.spawn(move || read_and_hash(reader, &tx, cancel, stop, range_size));
        let written = write_sliding(file, &rx, cancel);
        // Unblock and end the reader whatever happened here.
        stop.store(true, Ordering::SeqCst);
        drop(rx);
        let hashed = reading.join().unwrap_or_else(|_| {
            Err(CopyError::Read(std::io::Error::other(
                "the reading thread panicked",
            )))
        });
        match (written, hashed) {
            (Ok(total), Ok(hashed)) if total == hashed.0 => Ok(hashed),
            (Ok(_), Ok(_)) => Err(CopyError::Read(std::io::Error::other(
                "the reader and the writer disagree on the size",
            ))),
            // A read error reaches the writer through the channel; report it as such.
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
        }
    })
}

/// Bytes copied, their MD5, and the MD5s of the ranges asked for.
type Hashed = (u64, [u8; 16], Vec<[u8; 16]>);

/// The reading side of [`pipelined_copy`]: chunks go to `tx`, the MD5 stays here.
/// With `range_size` (a multiple of [`READ_CHUNK`]) the ranges are hashed in the same
/// pass.
fn read_and_hash(
    reader: &mut (dyn Read + Send),
    tx: &std::sync::mpsc::SyncSender<std::io::Result<Vec<u8>>>,
    cancel: &AtomicBool,
    stop: &AtomicBool,
    range_size: u64,
) -> Result<Hashed, CopyError> {
    let mut md5 = Md5Parts::new();
    let mut ranges = Vec::new();
    let mut in_range = false;
    loop {
        if cancel.load(Ordering::SeqCst) || stop.load(Ordering::SeqCst) {
            return Err(CopyError::Cancelled);
        }
        let mut chunk = vec![0u8; READ_CHUNK];
        let filled = match super::read_full(reader, &mut chunk) {
            Ok(n) => n,
            Err(e) => {
                let (kind, message) = (e.kind(), e.to_string());
                let _ = tx.send(Err(e));
                return Err(CopyError::Read(std::io::Error::new(kind, message)));
            }
        };
        chunk.truncate(filled);
        if range_size > 0 && filled > 0 && !in_range {
            md5.begin_segment();
            in_range = true;
        }
        md5.update(&chunk);
        let done = filled == 0;
        if in_range && (done || md5.len().is_multiple_of(range_size)) {
            ranges.push(md5.end_segment());
            in_range = false;
        }
        if tx.send(Ok(chunk)).is_err() {
            // The writer gave up; it reports why.
            return Err(CopyError::Cancelled);
        }
        if done {
            return Ok((md5.len(), md5.finalize(), ranges));
        }
    }
}

/// The writing side of [`pipelined_copy`]: an empty chunk ends the data.
fn write_sliding(
    file: &mut ssh2::File,
    rx: &std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    cancel: &AtomicBool,
) -> Result<u64, CopyError> {
    let mut window = Window {
        buf: Vec::with_capacity(WRITE_WINDOW + READ_CHUNK),
        start: 0,
    };
    match window.run(file, rx, cancel) {
        Ok(total) => {
            file.flush().map_err(CopyError::Write)?;
            Ok(total)
        }
        Err(e @ CopyError::Write(_)) => Err(e),
        Err(e) => {
            // libssh2 may hold a request it has only partly sent; anything else sent
            // on this session now (close, unlink) would be read by the server as the
            // rest of it. Finish what libssh2 was given, then report the failure.
            while window.start < window.buf.len() {
                window.start += write_acked(file, &window.buf[window.start..])?;
            }
            Err(e)
        }
    }
}

/// `buf[start..]`: data given to libssh2 and not yet acknowledged (a prefix of it may
/// already be in flight).
struct Window {
    buf: Vec<u8>,
    start: usize,
}

impl Window {
    fn run(
        &mut self,
        file: &mut ssh2::File,
        rx: &std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
        cancel: &AtomicBool,
    ) -> Result<u64, CopyError> {
        let mut total = 0u64;
        let mut eof = false;
        loop {
            if cancel.load(Ordering::SeqCst) {
                return Err(CopyError::Cancelled);
            }
            // Top up the window; block for data only when libssh2 has nothing to send.
            while !eof && self.buf.len() - self.start < WRITE_WINDOW {
                let next = if self.buf.len() == self.start {
                    rx.recv().ok()
                } else {
                    match rx.try_recv() {
                        Ok(r) => Some(r),
                        Err(std::sync::mpsc::TryRecvError::Empty) => break,
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
                    }
                };
                let chunk = match next {
                    Some(Ok(chunk)) => chunk,
                    Some(Err(e)) => return Err(CopyError::Read(e)),
                    None => return Err(CopyError::Cancelled),
                };
                if chunk.is_empty() {
                    eof = true;
                    break;
                }
                if self.buf.capacity() - self.buf.len() < chunk.len() {
                    // libssh2 copied what it already sent; only the unacknowledged
                    // bytes must stay first in the buffer.
                    self.buf.drain(..self.start);
                    self.start = 0;
                }
                total += chunk.len() as u64;
                self.buf.extend_from_slice(&chunk);
            }
            if self.start == self.buf.len() {
                if eof {
                    return Ok(total);
                }
                continue;
            }
            self.start += write_acked(file, &self.buf[self.start..])?;
        }
    }
}

/// One `sftp_write` of `data`: the bytes the server acknowledged (0 after EINTR).
fn write_acked(file: &mut ssh2::File, data: &[u8]) -> Result<usize, CopyError> {
    match file.write(data) {
        Ok(0) => Err(CopyError::Write(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "the SFTP server accepted no data",
        ))),
        Ok(n) => Ok(n),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(0),
        Err(e) => Err(CopyError::Write(e)),
    }
}

fn stat_info(key: String, stat: &ssh2::FileStat) -> ObjectInfo {
    ObjectInfo {
        key,
        size: stat.size.unwrap_or(0),
        etag: None,
        last_modified: stat
            .mtime
            .and_then(|t| DateTime::from_timestamp(i64::try_from(t).ok()?, 0)),
    }
}

impl ObjectStorage for SftpStorage {
    fn describe(&self) -> String {
        self.inner.target.clone()
    }

    async fn put_file(
        &self,
        local: &Path,
        key: &str,
        _opts: &PutOptions,
    ) -> Result<PutOutcome, StorageError> {
        validate_key(key)?;
        let file = fs_err::File::open(local).map_err(StorageError::Local)?;
        let len = file.metadata().map_err(StorageError::Local)?.len();
        self.put_from(Box::new(file), key, Some((local.to_owned(), len)))
            .await
    }

    async fn put_reader<R: Read + Send + 'static>(
        &self,
        reader: R,
        key: &str,
        _opts: &PutOptions,
    ) -> Result<PutOutcome, StorageError> {
        self.put_from(Box::new(reader), key, None).await
    }

    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<PutOutcome, StorageError> {
        self.put_from(Box::new(std::io::Cursor::new(data)), key, None)
            .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        let path = self.remote_path(key)?;
        let key = key.to_owned();
        self.with_conn(move |inner, conn| match conn.sftp.stat(Path::new(&path)) {
            Ok(st) if st.is_file() => Ok(Some(stat_info(key, &st))),
            Ok(_) => Ok(None),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(inner.sftp_error("head", &key, &e)),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let prefix = validate_prefix(prefix)?;
        let dir = if prefix.is_empty() {
            self.inner.base.clone()
        } else {
            join(&self.inner.base, &prefix)
        };
        self.with_conn(move |inner, conn| {
            let mut out = Vec::new();
            inner.walk(&conn.sftp, &dir, &prefix, &mut out)?;
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    async fn get_into<W: Write + Send + 'static>(
        &self,
        key: &str,
        mut writer: W,
    ) -> Result<GetOutcome, StorageError> {
        let path = self.remote_path(key)?;
        let key = key.to_owned();
        self.with_conn(move |inner, conn| {
            let mut file = conn
                .sftp
                .open(Path::new(&path))
                .map_err(|e| inner.sftp_error("get", &key, &e))?;
            let (size, md5) = copy_hashing(&mut file, &mut writer, None).map_err(|e| match e {
                CopyError::Read(e) => inner.io_error("get", &key, &e),
                CopyError::Write(e) => StorageError::Local(std::io::Error::new(
                    e.kind(),
                    format!("writing the download of {key}: {e}"),
                )),
                CopyError::Cancelled => inner.cancelled(&key),
            })?;
            Ok(GetOutcome {
                size,
                md5_hex: hex::encode(md5),
            })
        })
        .await
    }

    async fn get_bytes(&self, key: &str) -> Result<Bytes, StorageError> {
        let path = self.remote_path(key)?;
        let key = key.to_owned();
        self.with_conn(move |inner, conn| {
            let mut file = conn
                .sftp
                .open(Path::new(&path))
                .map_err(|e| inner.sftp_error("get", &key, &e))?;
            let mut data = Vec::new();
            file.read_to_end(&mut data)
                .map_err(|e| inner.io_error("get", &key, &e))?;
            Ok(Bytes::from(data))
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let path = self.remote_path(key)?;
        let key = key.to_owned();
        self.with_conn(
            move |inner, conn| match conn.sftp.unlink(Path::new(&path)) {
                Ok(()) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(inner.sftp_error("delete", &key, &e)),
            },
        )
        .await
    }

    async fn clean_staging(&self, keys: &[String]) -> Result<u64, StorageError> {
        let sweep = StagingSweep::new(keys);
        self.with_conn(move |inner, conn| {
            let dir = inner.staging_dir();
            let entries = match conn.sftp.readdir(Path::new(&dir)) {
                Ok(e) => e,
                Err(e) if is_not_found(&e) => return Ok(0),
                Err(e) => return Err(inner.sftp_error("clean", STAGING_DIR, &e)),
            };
            let mut removed = 0;
            for (path, stat) in entries {
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                let modified = stat
                    .mtime
                    .map(|t| std::time::UNIX_EPOCH + Duration::from_secs(t));
                if stat.is_file() && sweep.removes(name, modified) {
                    match conn.sftp.unlink(&path) {
                        Ok(()) => removed += 1,
                        Err(e) if is_not_found(&e) => {}
                        Err(e) => return Err(inner.sftp_error("clean", STAGING_DIR, &e)),
                    }
                }
            }
            Ok(removed)
        })
        .await
    }

    async fn presign_get(
        &self,
        key: &str,
        _expires_in: Duration,
    ) -> Result<Option<url::Url>, StorageError> {
        validate_key(key)?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_files_are_verified_in_up_to_four_ranges() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(range_size_for(0), 0);
        assert_eq!(range_size_for(127 * MIB), 0);
        assert_eq!(range_size_for(128 * MIB), 64 * MIB);
        assert_eq!(range_size_for(130 * MIB + 5), 64 * MIB);
        assert_eq!(range_size_for(1024 * MIB), 256 * MIB);
        assert_eq!(range_size_for(1024 * MIB + 1), 257 * MIB);
        assert_eq!(range_size_for(10 * 1024 * MIB), 2560 * MIB);
    }

    #[test]
    fn range_command_reads_each_range_once() {
        assert_eq!(
            ranges_command("/d/a b", 10, 3),
            "(echo \"0 $(head -c 10 -- '/d/a b' | md5sum)\") & \
             (echo \"1 $(tail -c +11 -- '/d/a b' | head -c 10 | md5sum)\") & \
             (echo \"2 $(tail -c +21 -- '/d/a b' | md5sum)\") & wait"
        );
    }

    #[test]
    fn base_directories_follow_curl() {
        assert_eq!(base_dir(""), "");
        assert_eq!(base_dir("/~"), "");
        assert_eq!(base_dir("/~/out/"), "out");
        assert_eq!(base_dir("/data/"), "/data");
        assert_eq!(base_dir("/"), "/");
        assert_eq!(join("", "a/b"), "a/b");
        assert_eq!(join("/", "a"), "/a");
        assert_eq!(join("/data", "a"), "/data/a");
    }
}
