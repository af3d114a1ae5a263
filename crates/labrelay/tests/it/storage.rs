//! Storage contract tests: one set of test bodies, run against every backend — a local
//! temp directory, Garage (S3) and OpenSSH (SFTP), both started by scripts/services —
//! plus backend-specific tests (the 3 GiB multipart upload, the multipart API,
//! `remote_md5`, error classes).
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use labrelay::Exit;
use labrelay::config::Config;
use labrelay::ssh::{SshParams, SshSession, shell_quote};
use labrelay::storage::{
    AnyStorage, ObjectStorage, PutOptions, STAGING_DIR, StorageError, staging_key_hash,
};
use md5::{Digest, Md5};

const MIB: u64 = 1024 * 1024;

/// Which backend a fixture is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Local,
    S3,
    Sftp,
}

/// A fresh, empty target for one test.
struct Fixture {
    kind: Kind,
    storage: AnyStorage,
    /// Local: the root directory.
    local_root: Option<tempfile::TempDir>,
    /// SFTP: the remote base directory and a session to inspect/clean it.
    sftp_base: Option<(String, SshParams)>,
}

fn open(toml: &str) -> AnyStorage {
    let config = Config::from_toml(toml).unwrap();
    AnyStorage::open(&config.storage["t"]).unwrap()
}

fn s3_toml(prefix: &str) -> Option<String> {
    test_support::s3_storage_toml("t", prefix)
}

fn sftp_params() -> Option<SshParams> {
    Some(SshParams {
        host: test_support::require("SFTP_HOST")?,
        port: test_support::require_parsed("SFTP_PORT")?,
        user: test_support::require("SFTP_USER")?,
        key_file: Some(PathBuf::from(test_support::require("SFTP_KEY")?)),
        key_passphrase: None,
        password: None,
        known_hosts: PathBuf::from(test_support::require("SFTP_KNOWN_HOSTS")?),
        host_key_policy: labrelay::ssh::HostKeyPolicy::Strict,
        timeout: Duration::from_secs(20),
    })
}

async fn run_remote(p: &SshParams, command: &str) -> String {
    let mut s = SshSession::connect(p).await.unwrap();
    let out = s.exec(command, Duration::from_mins(1)).await.unwrap();
    assert!(out.success(), "{command}: {}", out.stderr_text());
    out.stdout_text()
}

impl Fixture {
    async fn new(kind: Kind) -> Option<Fixture> {
        match kind {
            Kind::Local => {
                let dir = test_support::tempdir();
                let storage = open(&format!(
                    "[storage.t]\nurl = \"{}\"\n",
                    dir.path().display()
                ));
                Some(Fixture {
                    kind,
                    storage,
                    local_root: Some(dir),
                    sftp_base: None,
                })
            }
            Kind::S3 => {
                let prefix = test_support::unique("storage");
                let storage = open(&s3_toml(&prefix)?);
                Some(Fixture {
                    kind,
                    storage,
                    local_root: None,
                    sftp_base: None,
                })
            }
            Kind::Sftp => {
                let params = sftp_params()?;
                let root = test_support::require("SFTP_ROOT")?;
                let base = format!("{root}/{}", test_support::unique("storage"));
                // The base must exist (the backend creates directories only below it).
                run_remote(&params, &format!("mkdir -p {}", shell_quote(&base))).await;
                let storage = open(&format!(
                    r#"
                    [storage.t]
                    url = "sftp://{user}@{host}:{port}{base}"
                    key_file = "{key}"
                    known_hosts = "{known_hosts}"
                    timeout_secs = 20
                    "#,
                    user = params.user,
                    host = params.host,
                    port = params.port,
                    key = params.key_file.as_ref()?.display(),
                    known_hosts = params.known_hosts.display(),
                ));
                Some(Fixture {
                    kind,
                    storage,
                    local_root: None,
                    sftp_base: Some((base, params)),
                })
            }
        }
    }

    /// Every file name physically present in `dir` (relative to the base), including
    /// temp and partial files the backend hides; `None` for S3, which has no such files.
    async fn raw_names(&self, dir: &str) -> Option<Vec<String>> {
        match self.kind {
            Kind::S3 => None,
            Kind::Local => {
                let p = self.local_root.as_ref()?.path().join(dir);
                let mut names: Vec<String> = match std::fs::read_dir(&p) {
                    Ok(rd) => rd
                        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                        .collect(),
                    Err(_) => Vec::new(),
                };
                names.sort();
                Some(names)
            }
            Kind::Sftp => {
                let (base, params) = self.sftp_base.as_ref()?;
                let path = format!("{base}/{dir}");
                let out = run_remote(
                    params,
                    &format!("ls -A {} 2>/dev/null || true", shell_quote(&path)),
                )
                .await;
                let mut names: Vec<String> = out.lines().map(str::to_owned).collect();
                names.sort();
                Some(names)
            }
        }
    }

    /// Put a file into the staging folder, as a put killed `age` ago would leave it;
    /// `false` for S3, which has no staging folder.
    async fn plant_staging(&self, name: &str, age: Duration) -> bool {
        let mtime = std::time::SystemTime::now() - age;
        match self.kind {
            Kind::S3 => false,
            Kind::Local => {
                let dir = self.local_root.as_ref().unwrap().path().join(STAGING_DIR);
                std::fs::create_dir_all(&dir).unwrap();
                let f = std::fs::File::create(dir.join(name)).unwrap();
                f.set_modified(mtime).unwrap();
                true
            }
            Kind::Sftp => {
                let (base, params) = self.sftp_base.as_ref().unwrap();
                let dir = format!("{base}/{STAGING_DIR}");
                let epoch = mtime
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                run_remote(
                    params,
                    &format!(
                        "mkdir -p {d} && touch -d @{epoch} {d}/{name}",
                        d = shell_quote(&dir)
                    ),
                )
                .await;
                true
            }
        }
    }

    /// Remove what the test stored (S3 objects, the SFTP directory).
    async fn cleanup(self) {
        match self.kind {
            Kind::Local => {}
            Kind::S3 => {
                for o in self.storage.list("").await.unwrap() {
                    self.storage.delete(&o.key).await.unwrap();
                }
            }
            Kind::Sftp => {
                if let Some((base, params)) = &self.sftp_base {
                    run_remote(params, &format!("rm -rf {}", shell_quote(base))).await;
                }
            }
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn md5_raw(data: &[u8]) -> [u8; 16] {
    Md5::digest(data).into()
}

fn md5_hex(data: &[u8]) -> String {
    hex::encode(Md5::digest(data))
}

fn md5_of_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Md5::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

fn keys(list: &[labrelay::storage::ObjectInfo]) -> Vec<&str> {
    list.iter().map(|o| o.key.as_str()).collect()
}

/// Run each contract test body against every backend.
macro_rules! contract {
    ($($test:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let Some(fx) = super::Fixture::new(super::Kind::Local).await else { return };
                    super::$test(&fx).await;
                    fx.cleanup().await;
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let Some(fx) = super::Fixture::new(super::Kind::S3).await else { return };
                    super::$test(&fx).await;
                    fx.cleanup().await;
                }
            )*
        }
        mod sftp {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let Some(fx) = super::Fixture::new(super::Kind::Sftp).await else { return };
                    super::$test(&fx).await;
                    fx.cleanup().await;
                }
            )*
        }
    };
}

contract!(
    round_trip_with_nested_keys,
    empty_object,
    non_ascii_key,
    put_returns_the_md5_of_the_file,
    overwrite_replaces_the_object,
    invalid_keys_are_refused,
    failing_reader_leaves_nothing_under_the_final_name,
    aborted_upload_leaves_nothing_under_the_final_name,
    file_larger_than_one_part,
    presigned_url,
    killed_put_leftovers_are_cleaned_from_staging,
    partial_suffix_is_an_ordinary_key,
);

async fn round_trip_with_nested_keys(fx: &Fixture) {
    let s = &fx.storage;
    let objects = [
        ("a/b/c.txt", "c"),
        ("a/b/d.txt", "dd"),
        ("a/e.txt", "eee"),
        ("top.txt", "tttt"),
        ("a/bc/f.txt", "f"),
    ];
    for (k, v) in objects {
        let o = s.put_bytes(k, Bytes::from(v)).await.unwrap();
        assert_eq!(o.size, v.len() as u64);
        assert_eq!(o.md5_hex, md5_hex(v.as_bytes()));
    }
    for (k, v) in objects {
        let info = s.head(k).await.unwrap().unwrap();
        assert_eq!(info.key, k);
        assert_eq!(info.size, v.len() as u64);
        assert!(info.last_modified.is_some());
        assert_eq!(s.get_bytes(k).await.unwrap(), v.as_bytes());
    }
    assert_eq!(s.head("a/b/nope.txt").await.unwrap(), None);
    assert_eq!(
        s.head("a/b").await.unwrap(),
        None,
        "a directory is not an object"
    );

    let all = s.list("").await.unwrap();
    assert_eq!(
        keys(&all),
        ["a/b/c.txt", "a/b/d.txt", "a/bc/f.txt", "a/e.txt", "top.txt"]
    );
    // Prefixes end at a `/`: `a/b` does not list `a/bc/…`.
    assert_eq!(
        keys(&s.list("a/b").await.unwrap()),
        ["a/b/c.txt", "a/b/d.txt"]
    );
    assert_eq!(
        keys(&s.list("a/b/").await.unwrap()),
        ["a/b/c.txt", "a/b/d.txt"]
    );
    assert!(s.list("a/x").await.unwrap().is_empty());

    let got = s.get_into("a/e.txt", Vec::new()).await.unwrap();
    assert_eq!(got.size, 3);
    assert_eq!(got.md5_hex, md5_hex(b"eee"));
    let dir = test_support::tempdir();
    let dest = dir.path().join("sub").join("e.txt");
    let got = s.get_to_file("a/e.txt", &dest).await.unwrap();
    assert_eq!(got.size, 3);
    assert_eq!(std::fs::read(&dest).unwrap(), b"eee");

    s.delete("a/b/c.txt").await.unwrap();
    assert_eq!(s.head("a/b/c.txt").await.unwrap(), None);
    assert_eq!(keys(&s.list("a/b").await.unwrap()), ["a/b/d.txt"]);
    // Deleting what is not there is fine; reading it is a per-item failure.
    s.delete("a/b/c.txt").await.unwrap();
    let err = s.get_bytes("a/b/c.txt").await.unwrap_err();
    assert!(matches!(err, StorageError::NotFound { .. }), "{err:?}");
    assert_eq!(err.exit(), Exit::Failed);
    let err = s.get_into("a/b/c.txt", std::io::sink()).await.unwrap_err();
    assert!(matches!(err, StorageError::NotFound { .. }), "{err:?}");
}

async fn empty_object(fx: &Fixture) {
    let s = &fx.storage;
    let o = s.put_bytes("empty/bytes", Bytes::new()).await.unwrap();
    assert_eq!(o.size, 0);
    assert_eq!(o.md5_hex, "d41d8cd98f00b204e9800998ecf8427e");
    let dir = test_support::tempdir();
    let f = dir.path().join("zero");
    std::fs::write(&f, b"").unwrap();
    let o = s
        .put_file(&f, "empty/file", &PutOptions::default())
        .await
        .unwrap();
    assert_eq!(o.size, 0);
    assert_eq!(o.md5_hex, "d41d8cd98f00b204e9800998ecf8427e");
    if fx.kind == Kind::S3 {
        assert_eq!(o.etag.as_deref(), Some(o.md5_hex.as_str()));
    }
    for k in ["empty/bytes", "empty/file"] {
        assert_eq!(s.head(k).await.unwrap().unwrap().size, 0);
        assert!(s.get_bytes(k).await.unwrap().is_empty());
    }
    assert_eq!(s.list("empty").await.unwrap().len(), 2);
}

async fn non_ascii_key(fx: &Fixture) {
    let s = &fx.storage;
    let key = "报告/样本 1 (最终版)/résumé ü.txt";
    let data = "测序结果 ✓".as_bytes();
    s.put_bytes(key, Bytes::copy_from_slice(data))
        .await
        .unwrap();
    let info = s.head(key).await.unwrap().unwrap();
    assert_eq!(info.key, key);
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(keys(&s.list("报告").await.unwrap()), [key]);
    assert_eq!(s.get_bytes(key).await.unwrap(), data);
    s.delete(key).await.unwrap();
    assert!(s.list("").await.unwrap().is_empty());
}

async fn put_returns_the_md5_of_the_file(fx: &Fixture) {
    let s = &fx.storage;
    let dir = test_support::tempdir();
    let f = dir.path().join("data.bin");
    let data = pattern(3 * MIB as usize + 17, 7);
    std::fs::write(&f, &data).unwrap();
    let o = s
        .put_file(&f, "md5/data.bin", &PutOptions::default())
        .await
        .unwrap();
    assert_eq!(o.size, data.len() as u64);
    assert_eq!(o.md5_hex, md5_of_file(&f));
    assert_eq!(o.parts, 0, "smaller than a part: one request");
    let info = s.head("md5/data.bin").await.unwrap().unwrap();
    assert_eq!(info.size, data.len() as u64);
    if fx.kind == Kind::S3 {
        assert_eq!(o.etag.as_deref(), Some(o.md5_hex.as_str()));
        assert_eq!(info.etag.as_deref(), Some(o.md5_hex.as_str()));
        assert_eq!(o.expected_etag(), o.md5_hex);
    } else {
        assert_eq!(info.etag, None);
    }
    let got = s.get_into("md5/data.bin", std::io::sink()).await.unwrap();
    assert_eq!(got.md5_hex, o.md5_hex);
}

async fn overwrite_replaces_the_object(fx: &Fixture) {
    let s = &fx.storage;
    s.put_bytes("ow/k.txt", Bytes::from("first")).await.unwrap();
    s.put_bytes("ow/k.txt", Bytes::from("second version"))
        .await
        .unwrap();
    assert_eq!(s.get_bytes("ow/k.txt").await.unwrap(), "second version");
    let dir = test_support::tempdir();
    let f = dir.path().join("third");
    std::fs::write(&f, "third, from a file").unwrap();
    s.put_file(&f, "ow/k.txt", &PutOptions::default())
        .await
        .unwrap();
    assert_eq!(s.get_bytes("ow/k.txt").await.unwrap(), "third, from a file");
    let list = s.list("ow").await.unwrap();
    assert_eq!(keys(&list), ["ow/k.txt"]);
    assert_eq!(list[0].size, 18);
    if let Some(names) = fx.raw_names("ow").await {
        assert_eq!(names, ["k.txt"], "no temp or partial files left");
    }
}

async fn invalid_keys_are_refused(fx: &Fixture) {
    let s = &fx.storage;
    for key in [
        "",
        "/abs",
        "a//b",
        "a/",
        "../escape",
        "a/../b",
        "a\nb",
        ".labrelay-staging/x",
    ] {
        let err = s.put_bytes(key, Bytes::from("x")).await.unwrap_err();
        assert!(
            matches!(err, StorageError::InvalidKey { .. }),
            "{key:?}: {err:?}"
        );
        assert!(s.head(key).await.is_err(), "{key:?}");
    }
    assert!(s.list("../").await.is_err());
    assert!(s.list("").await.unwrap().is_empty());
}

/// Yields `limit` bytes, then fails.
struct FailingReader {
    data: Vec<u8>,
    pos: usize,
}

impl Read for FailingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.data.len() {
            return Err(std::io::Error::other("disk on fire"));
        }
        let n = buf.len().min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

async fn failing_reader_leaves_nothing_under_the_final_name(fx: &Fixture) {
    let s = &fx.storage;
    // 20 MiB with 8 MiB parts: on S3 two parts are uploaded before the failure.
    let reader = FailingReader {
        data: pattern(20 * MIB as usize, 3),
        pos: 0,
    };
    let opts = PutOptions {
        part_size: Some(8 * MIB),
        ..PutOptions::default()
    };
    let err = s
        .put_reader(reader, "fail/big.bin", &opts)
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Source { .. }), "{err:?}");
    assert!(err.to_string().contains("disk on fire"), "{err}");
    assert_eq!(s.head("fail/big.bin").await.unwrap(), None);
    assert!(s.list("").await.unwrap().is_empty());
    if let Some(names) = fx.raw_names("fail").await {
        assert!(names.is_empty(), "left behind: {names:?}");
    }
    assert_still_usable(fx, "fail/after.bin").await;
}

/// After a failed or cancelled put the storage still works: for SFTP the next put may
/// run on the same pooled connection, which must not be left mid-request.
async fn assert_still_usable(fx: &Fixture, key: &str) {
    let data = Bytes::from(pattern(9 * MIB as usize + 3, 5));
    let out = fx.storage.put_bytes(key, data.clone()).await.unwrap();
    assert_eq!(out.md5_hex, md5_hex(&data));
    assert_eq!(fx.storage.get_bytes(key).await.unwrap(), data);
    fx.storage.delete(key).await.unwrap();
}

/// Yields `limit` bytes, reports that, then blocks until released (and fails).
struct StallingReader {
    sent: u64,
    limit: u64,
    reached: Option<tokio::sync::oneshot::Sender<()>>,
    release: mpsc::Receiver<()>,
    dropped: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Read for StallingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.sent < self.limit {
            let n = buf.len().min((self.limit - self.sent) as usize);
            buf[..n].fill(0x5a);
            self.sent += n as u64;
            return Ok(n);
        }
        if let Some(tx) = self.reached.take() {
            let _ = tx.send(());
        }
        // Returns Err once the test drops the sender.
        let _ = self.release.recv();
        Err(std::io::Error::other("released"))
    }
}

impl Drop for StallingReader {
    fn drop(&mut self) {
        if let Some(tx) = self.dropped.take() {
            let _ = tx.send(());
        }
    }
}

async fn aborted_upload_leaves_nothing_under_the_final_name(fx: &Fixture) {
    let (reached_tx, reached_rx) = tokio::sync::oneshot::channel();
    let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let reader = StallingReader {
        sent: 0,
        // 12 MiB with 8 MiB parts: S3 has started a multipart upload and sent part 1.
        limit: 12 * MIB,
        reached: Some(reached_tx),
        release: release_rx,
        dropped: Some(dropped_tx),
    };
    let storage = fx.storage.clone();
    let task = tokio::spawn(async move {
        let opts = PutOptions {
            part_size: Some(8 * MIB),
            ..PutOptions::default()
        };
        storage.put_reader(reader, "abort/big.bin", &opts).await
    });
    reached_rx.await.unwrap();
    // While the put runs, the customer's folder holds nothing (its temporary file is
    // in the staging folder, which a kill -9 now would leave behind).
    if let Some(names) = fx.raw_names("abort").await {
        assert!(names.is_empty(), "visible during the put: {names:?}");
    }
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(fx.storage.head("abort/big.bin").await.unwrap(), None);
    // Let the blocking side run to its end, then check again: the cancelled upload
    // must not publish anything late either.
    drop(release_tx);
    dropped_rx.await.unwrap();
    assert_eq!(fx.storage.head("abort/big.bin").await.unwrap(), None);
    assert!(fx.storage.list("").await.unwrap().is_empty());
    if let Some(names) = fx.raw_names("abort").await {
        assert!(names.is_empty(), "left behind: {names:?}");
    }
    assert_still_usable(fx, "abort/after.bin").await;
}

async fn file_larger_than_one_part(fx: &Fixture) {
    let s = &fx.storage;
    let dir = test_support::tempdir();
    let f = dir.path().join("forty.bin");
    let data = pattern(40 * MIB as usize + 5, 11);
    std::fs::write(&f, &data).unwrap();
    let want_md5 = md5_hex(&data);
    drop(data);
    let opts = PutOptions {
        part_size: Some(8 * MIB),
        part_concurrency: Some(3),
        ..PutOptions::default()
    };
    let o = s.put_file(&f, "mp/forty.bin", &opts).await.unwrap();
    assert_eq!(o.size, 40 * MIB + 5);
    assert_eq!(o.md5_hex, want_md5);
    let info = s.head("mp/forty.bin").await.unwrap().unwrap();
    assert_eq!(info.size, 40 * MIB + 5);
    if fx.kind == Kind::S3 {
        assert_eq!(o.parts, 6);
        assert_eq!(o.part_size, 8 * MIB);
        assert_eq!(o.part_md5_hex.len(), 6);
        assert_eq!(
            o.part_md5_hex[0],
            md5_hex(&pattern(40 * MIB as usize + 5, 11)[..8 << 20])
        );
        assert!(o.expected_etag().ends_with("-6"));
        assert_eq!(o.etag.as_deref(), Some(o.expected_etag().as_str()));
        assert_eq!(info.etag.as_deref(), Some(o.expected_etag().as_str()));
    } else {
        assert_eq!(o.parts, 0);
    }
    let got = s.get_into("mp/forty.bin", std::io::sink()).await.unwrap();
    assert_eq!(got.size, 40 * MIB + 5);
    assert_eq!(got.md5_hex, want_md5);
    let back = dir.path().join("back.bin");
    s.get_to_file("mp/forty.bin", &back).await.unwrap();
    assert_eq!(md5_of_file(&back), want_md5);
}

/// A put killed with `kill -9` leaves its temporary file in the staging folder (never
/// in the customer's folder); `clean_staging` with the key removes it, and any staging
/// file older than a week, but not a fresh one of another key (a put may be running).
async fn killed_put_leftovers_are_cleaned_from_staging(fx: &Fixture) {
    let s = &fx.storage;
    s.put_bytes("run/done.txt", Bytes::from("done"))
        .await
        .unwrap();
    let mine = format!("{}.00112233aabbccdd", staging_key_hash("run/data.bin"));
    let other = format!("{}.0123456789abcdef", staging_key_hash("run/other.bin"));
    let planted = fx.plant_staging(&mine, Duration::ZERO).await
        && fx.plant_staging(&other, Duration::ZERO).await
        && fx
            .plant_staging("stray-old", Duration::from_hours(8 * 24))
            .await;
    // The staging folder is never listed, whatever the prefix.
    assert_eq!(keys(&s.list("").await.unwrap()), ["run/done.txt"]);
    assert!(s.list(STAGING_DIR).await.is_err());
    let removed = s
        .clean_staging(&["run/data.bin".to_owned(), "run/done.txt".to_owned()])
        .await
        .unwrap();
    if !planted {
        assert_eq!(removed, 0, "S3 has no staging files");
        return;
    }
    assert_eq!(removed, 2, "the key's leftover and the week-old one");
    assert_eq!(fx.raw_names(STAGING_DIR).await.unwrap(), [other.as_str()]);
    // Nothing to do the second time.
    assert_eq!(
        s.clean_staging(&["run/data.bin".to_owned()]).await.unwrap(),
        0
    );
    // A put of the key still works and leaves only itself behind.
    s.put_bytes("run/data.bin", Bytes::from("data"))
        .await
        .unwrap();
    assert_eq!(fx.raw_names("run").await.unwrap(), ["data.bin", "done.txt"]);
    assert_eq!(fx.raw_names(STAGING_DIR).await.unwrap(), [other.as_str()]);
    assert_eq!(
        keys(&s.list("").await.unwrap()),
        ["run/data.bin", "run/done.txt"]
    );
}

/// Keys ending in `.partial` used to be reserved for SFTP uploads in progress; a real
/// file named so must deliver, and be listed.
async fn partial_suffix_is_an_ordinary_key(fx: &Fixture) {
    let s = &fx.storage;
    let dir = test_support::tempdir();
    let f = dir.path().join("x.partial");
    std::fs::write(&f, "a file that happens to be called x.partial").unwrap();
    let o = s
        .put_file(&f, "dir/x.partial", &PutOptions::default())
        .await
        .unwrap();
    assert_eq!(o.size, 42);
    s.put_bytes("top.partial", Bytes::from("t")).await.unwrap();
    assert_eq!(
        keys(&s.list("").await.unwrap()),
        ["dir/x.partial", "top.partial"]
    );
    assert_eq!(keys(&s.list("dir").await.unwrap()), ["dir/x.partial"]);
    assert_eq!(s.head("dir/x.partial").await.unwrap().unwrap().size, 42);
    if let Some(names) = fx.raw_names("dir").await {
        assert_eq!(names, ["x.partial"], "nothing but the object");
    }
}

async fn presigned_url(fx: &Fixture) {
    let s = &fx.storage;
    let data = pattern(100_000, 5);
    s.put_bytes("share/报告 1.bin", Bytes::from(data.clone()))
        .await
        .unwrap();
    let url = s
        .presign_get("share/报告 1.bin", Duration::from_mins(5))
        .await
        .unwrap();
    if fx.kind != Kind::S3 {
        assert_eq!(url, None);
        return;
    }
    let url = url.unwrap();
    assert!(
        url.query().unwrap_or("").contains("X-Amz-Signature"),
        "{url}"
    );
    let resp = reqwest::get(url.clone()).await.unwrap();
    assert_eq!(resp.status(), 200, "{url}");
    assert_eq!(resp.bytes().await.unwrap(), data);
    // Tampering with the signature is refused: the URL really is signed.
    let forged = url
        .as_str()
        .replace("X-Amz-Expires=300", "X-Amz-Expires=301");
    assert_eq!(reqwest::get(forged).await.unwrap().status(), 403);
}

// ----------------------------------------------------------------------------------
// Backend-specific tests.

/// The required one: a 3 GiB sparse file through multipart to Garage, read back
/// streamed, with the same MD5 and the expected multipart ETag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_three_gib_sparse_file_through_multipart() {
    let Some(fx) = Fixture::new(Kind::S3).await else {
        return;
    };
    let dir = test_support::tempdir();
    let path = dir.path().join("sparse.bin");
    let len = 3 * 1024 * MIB;
    {
        let mut f = std::fs::File::create(&path).unwrap();
        f.set_len(len).unwrap();
        // A few marks (start, across a part boundary, the last byte) so the parts differ.
        for (at, mark) in [
            (0, &b"start"[..]),
            (8 * MIB - 2, b"boundary"),
            (len / 2, b"middle"),
            (len - 1, b"!"),
        ] {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(mark).unwrap();
        }
    }
    let started = Instant::now();
    let want_md5 = md5_of_file(&path);
    let hashed = started.elapsed();

    let started = Instant::now();
    let o = fx
        .storage
        .put_file(&path, "big/sparse.bin", &PutOptions::default())
        .await
        .unwrap();
    let uploaded = started.elapsed();
    assert_eq!(o.size, len);
    assert_eq!(o.md5_hex, want_md5);
    assert_eq!(o.part_size, 8 * MIB, "derived from the size");
    assert_eq!(o.parts, 384);
    assert_eq!(
        o.etag.as_deref(),
        Some(o.expected_etag().as_str()),
        "server ETag is md5(part md5s)-N"
    );
    let info = fx.storage.head("big/sparse.bin").await.unwrap().unwrap();
    assert_eq!(info.size, len);
    assert_eq!(info.etag.as_deref(), Some(o.expected_etag().as_str()));

    let started = Instant::now();
    let got = fx
        .storage
        .get_into("big/sparse.bin", std::io::sink())
        .await
        .unwrap();
    let downloaded = started.elapsed();
    assert_eq!(got.size, len);
    assert_eq!(got.md5_hex, want_md5);
    eprintln!(
        "3 GiB sparse file: local md5 {hashed:?}, upload {uploaded:?}, streamed read-back {downloaded:?}"
    );
    fx.cleanup().await;
}

/// The low-level multipart API the delivery tool journals and resumes with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_multipart_api_completes_and_aborts() {
    let Some(fx) = Fixture::new(Kind::S3).await else {
        return;
    };
    let AnyStorage::S3(s3) = &fx.storage else {
        panic!("not S3")
    };
    let p1 = Bytes::from(pattern(5 * MIB as usize, 1));
    let p2 = Bytes::from(pattern(1000, 2));
    let upload = s3.create_multipart("api/two-parts.bin").await.unwrap();
    assert!(!upload.upload_id.is_empty());
    // Out of order, as a resumed upload would send them.
    let second = s3
        .put_part(&upload, 1, p2.clone(), md5_raw(&p2), true)
        .await
        .unwrap();
    let first = s3
        .put_part(&upload, 0, p1.clone(), md5_raw(&p1), true)
        .await
        .unwrap();
    // The part ETag as the server sent it (quoted), to be passed back unchanged.
    assert_eq!(first.etag, format!("\"{}\"", md5_hex(&p1)));
    assert_eq!(
        s3.head("api/two-parts.bin").await.unwrap(),
        None,
        "not visible before completion"
    );
    assert!(s3.list("api").await.unwrap().is_empty());
    let etag = s3
        .complete_multipart(&upload, vec![first, second])
        .await
        .unwrap();
    let want = labrelay::storage::multipart_etag(&[md5_hex(&p1), md5_hex(&p2)]).unwrap();
    assert_eq!(etag.as_deref(), Some(want.as_str()));
    let mut whole = p1.to_vec();
    whole.extend_from_slice(&p2);
    assert_eq!(s3.get_bytes("api/two-parts.bin").await.unwrap(), whole);

    let upload = s3.create_multipart("api/aborted.bin").await.unwrap();
    s3.put_part(&upload, 0, p1.clone(), md5_raw(&p1), true)
        .await
        .unwrap();
    // A part whose bytes do not match its Content-MD5 (damaged on the way) is refused
    // by the server, and nothing of it is kept.
    let err = s3
        .put_part(&upload, 1, p2.clone(), md5_raw(&p1), false)
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Integrity { .. }), "{err:?}");
    assert!(err.to_string().contains("BadDigest"), "{err}");
    s3.abort_multipart(&upload).await.unwrap();
    assert_eq!(s3.head("api/aborted.bin").await.unwrap(), None);
    assert_eq!(keys(&s3.list("api").await.unwrap()), ["api/two-parts.bin"]);
    fx.cleanup().await;
}

/// `sign_payload = true` puts the SHA-256 of the body into the signature instead of
/// UNSIGNED-PAYLOAD; single and multipart uploads both still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_signed_payload_uploads() {
    let prefix = test_support::unique("storage");
    let Some(toml) = s3_toml(&prefix) else { return };
    let s = open(&format!("{toml}sign_payload = true\npart_size_mib = 5\n"));
    let small = Bytes::from(pattern(1000, 3));
    s.put_bytes("signed/small", small.clone()).await.unwrap();
    let big = Bytes::from(pattern(11 * MIB as usize, 4));
    let out = s.put_bytes("signed/big", big.clone()).await.unwrap();
    assert_eq!(out.parts, 3);
    assert_eq!(out.md5_hex, md5_hex(&big));
    assert_eq!(s.get_bytes("signed/small").await.unwrap(), small);
    assert_eq!(s.get_bytes("signed/big").await.unwrap(), big);
    for k in ["signed/small", "signed/big"] {
        s.delete(k).await.unwrap();
    }
}

/// The object's headers as a plain GET (through a presigned URL) returns them.
async fn s3_object_headers(s: &AnyStorage, key: &str) -> reqwest::header::HeaderMap {
    let url = s
        .presign_get(key, Duration::from_mins(5))
        .await
        .unwrap()
        .unwrap();
    let resp = reqwest::get(url).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.headers().clone()
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Objects carry rclone's `X-Amz-Meta-Md5chksum` (base64 of the raw MD5) and a
/// Content-Type from the file name: single PUTs always, multipart uploads when the
/// caller knows the whole file's MD5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_objects_carry_md5_metadata_and_content_type() {
    use base64::Engine as _;
    let Some(fx) = Fixture::new(Kind::S3).await else {
        return;
    };
    let s = &fx.storage;
    let b64 = |data: &[u8]| base64::engine::general_purpose::STANDARD.encode(md5_raw(data));

    let pdf = Bytes::from(pattern(1000, 1));
    s.put_bytes("meta/report.pdf", pdf.clone()).await.unwrap();
    let hd = s3_object_headers(s, "meta/report.pdf").await;
    assert_eq!(
        header(&hd, "x-amz-meta-md5chksum"),
        Some(b64(&pdf).as_str())
    );
    assert_eq!(header(&hd, "content-type"), Some("application/pdf"));

    // Multipart with the whole file's MD5 known (and checked).
    let dir = test_support::tempdir();
    let f = dir.path().join("reads.fastq.gz");
    let data = pattern(17 * MIB as usize, 2);
    std::fs::write(&f, &data).unwrap();
    let opts = PutOptions {
        part_size: Some(8 * MIB),
        md5: Some(md5_raw(&data)),
        ..PutOptions::default()
    };
    let out = s.put_file(&f, "meta/reads.fastq.gz", &opts).await.unwrap();
    assert_eq!(out.parts, 3);
    let hd = s3_object_headers(s, "meta/reads.fastq.gz").await;
    assert_eq!(
        header(&hd, "x-amz-meta-md5chksum"),
        Some(b64(&data).as_str())
    );
    assert_eq!(header(&hd, "content-type"), Some("application/gzip"));

    // A wrong MD5 from the caller fails the put and leaves no object claiming it.
    let wrong = PutOptions {
        md5: Some(md5_raw(b"something else")),
        ..opts.clone()
    };
    let err = s
        .put_file(&f, "meta/wrong.fastq.gz", &wrong)
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Integrity { .. }), "{err:?}");
    assert_eq!(s.head("meta/wrong.fastq.gz").await.unwrap(), None);

    // Multipart without it: the type still, no MD5 metadata.
    let opts = PutOptions {
        part_size: Some(8 * MIB),
        ..PutOptions::default()
    };
    s.put_file(&f, "meta/unknown.bam", &opts).await.unwrap();
    let hd = s3_object_headers(s, "meta/unknown.bam").await;
    assert_eq!(header(&hd, "x-amz-meta-md5chksum"), None);
    assert_eq!(
        header(&hd, "content-type"),
        Some("application/octet-stream")
    );

    // The low-level API the delivery tool resumes with.
    let AnyStorage::S3(s3) = s else {
        panic!("not S3")
    };
    let part = Bytes::from(pattern(1000, 3));
    let upload = s3
        .create_multipart_with_md5("meta/api.csv", Some(md5_raw(&part)))
        .await
        .unwrap();
    let done = s3
        .put_part(&upload, 0, part.clone(), md5_raw(&part), true)
        .await
        .unwrap();
    s3.complete_multipart(&upload, vec![done]).await.unwrap();
    let hd = s3_object_headers(s, "meta/api.csv").await;
    assert_eq!(
        header(&hd, "x-amz-meta-md5chksum"),
        Some(b64(&part).as_str())
    );
    assert_eq!(header(&hd, "content-type"), Some("text/csv; charset=utf-8"));
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_wrong_secret_is_a_config_error_without_the_secret() {
    let Some(toml) = s3_toml(&test_support::unique("storage")) else {
        return;
    };
    let real = test_support::require("S3_SECRET_ACCESS_KEY").unwrap_or_default();
    let wrong = "0".repeat(real.len());
    let s = open(&toml.replace(&real, &wrong));
    let err = s.put_bytes("x", Bytes::from("x")).await.unwrap_err();
    assert!(matches!(err, StorageError::Auth { .. }), "{err:?}");
    assert_eq!(err.exit(), Exit::Config);
    assert!(!err.to_string().contains(&wrong) && !err.to_string().contains(&real));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_unreachable_endpoint_is_a_temporary_failure() {
    let Some(toml) = s3_toml("x") else { return };
    let endpoint = test_support::require("S3_ENDPOINT").unwrap_or_default();
    let s = open(&toml.replace(&endpoint, "http://127.0.0.1:1"));
    let err = s.head("x").await.unwrap_err();
    // object_store retried it under the one policy; nobody above retries it again.
    let StorageError::GaveUp { attempts, last } = &err else {
        panic!("not retried: {err:?}");
    };
    assert!(*attempts > 1, "{err}");
    assert!(*attempts <= labrelay::retry::policy().attempts, "{err}");
    assert!(matches!(**last, StorageError::Connect { .. }), "{err:?}");
    assert!(!err.is_temporary());
    assert_eq!(err.exit(), Exit::TempFail);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_remote_md5_matches_the_streamed_md5() {
    let Some(fx) = Fixture::new(Kind::Sftp).await else {
        return;
    };
    let AnyStorage::Sftp(sftp) = &fx.storage else {
        panic!("not SFTP")
    };
    let o = sftp
        .put_bytes("v/it's here.bin", Bytes::from(pattern(1_000_003, 9)))
        .await
        .unwrap();
    assert_eq!(sftp.remote_md5("v/it's here.bin").await.unwrap(), o.md5_hex);
    let err = sftp.remote_md5("v/missing").await.unwrap_err();
    assert!(matches!(err, StorageError::NotFound { .. }), "{err:?}");
    fx.cleanup().await;
}

/// A large file is hashed in ranges while it streams; the server computes the same
/// ranges in parallel, and a damaged byte shows in the range that holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_remote_md5_ranges_match_the_streamed_ranges() {
    let Some(fx) = Fixture::new(Kind::Sftp).await else {
        return;
    };
    let AnyStorage::Sftp(sftp) = &fx.storage else {
        panic!("not SFTP")
    };
    let dir = test_support::tempdir();
    let local = dir.path().join("big.bin");
    let data = pattern(130 * MIB as usize + 5, 21);
    std::fs::write(&local, &data).unwrap();
    let key = "v/big file's.bin";
    let o = sftp
        .put_file(&local, key, &PutOptions::default())
        .await
        .unwrap();
    // 130 MiB: 4 ranges would be under 64 MiB each, so 64 + 64 + 2 MiB (+5 bytes).
    assert_eq!(o.range_size, 64 * MIB);
    let want: Vec<String> = data.chunks(64 * MIB as usize).map(md5_hex).collect();
    assert_eq!(want.len(), 3);
    assert_eq!(o.range_md5_hex, want);
    assert_eq!(o.md5_hex, md5_hex(&data));
    assert_eq!(
        sftp.remote_md5_ranges(key, o.range_size, 3).await.unwrap(),
        want
    );
    assert_eq!(sftp.remote_md5(key).await.unwrap(), o.md5_hex);

    // Flip one byte in the second range on the server.
    let (base, params) = fx.sftp_base.as_ref().unwrap();
    let remote = format!("{base}/{key}");
    let offset = 64 * MIB + 1000;
    run_remote(
        params,
        &format!(
            "printf 'X' | dd of={} bs=1 seek={offset} conv=notrunc 2>/dev/null",
            shell_quote(&remote)
        ),
    )
    .await;
    let got = sftp.remote_md5_ranges(key, o.range_size, 3).await.unwrap();
    assert_eq!(got[0], want[0]);
    assert_ne!(got[1], want[1]);
    assert_eq!(got[2], want[2]);
    // A small file is not split.
    let tiny = dir.path().join("tiny.bin");
    std::fs::write(&tiny, b"tiny").unwrap();
    let o = sftp
        .put_file(&tiny, "v/tiny.bin", &PutOptions::default())
        .await
        .unwrap();
    assert_eq!((o.range_size, o.range_md5_hex.len()), (0, 0));
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_wrong_password_is_a_config_error_without_the_password() {
    let Some(p) = sftp_params() else { return };
    let Some(root) = test_support::require("SFTP_ROOT") else {
        return;
    };
    let wrong = "wrong-pw-Kx7";
    let s = open(&format!(
        r#"
        [storage.t]
        url = "sftp://{}@{}:{}{root}"
        password = "{wrong}"
        known_hosts = "{}"
        "#,
        p.user,
        p.host,
        p.port,
        p.known_hosts.display()
    ));
    let err = s.head("x").await.unwrap_err();
    assert!(matches!(err, StorageError::Ssh(_)), "{err:?}");
    assert_eq!(err.exit(), Exit::Config);
    assert!(!err.to_string().contains(wrong), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_password_login_and_missing_base_directory() {
    let Some(p) = sftp_params() else { return };
    let Some(root) = test_support::require("SFTP_ROOT") else {
        return;
    };
    let Some(password) = test_support::require("SFTP_PASSWORD") else {
        return;
    };
    let missing = format!("{root}/{}", test_support::unique("missing"));
    let s = open(&format!(
        r#"
        [storage.t]
        url = "sftp://{}@{}:{}{missing}"
        password = "{password}"
        known_hosts = "{}"
        "#,
        p.user,
        p.host,
        p.port,
        p.known_hosts.display()
    ));
    assert_eq!(s.head("x").await.unwrap(), None);
    let err = s.put_bytes("x", Bytes::from("x")).await.unwrap_err();
    assert!(matches!(err, StorageError::Config { .. }), "{err:?}");
    let err = s.put_bytes("a/x", Bytes::from("x")).await.unwrap_err();
    assert!(matches!(err, StorageError::Config { .. }), "{err:?}");
    assert!(err.to_string().contains("base folder"), "{err}");
}

#[tokio::test]
async fn local_root_must_exist() {
    let dir = test_support::tempdir();
    let root = dir.path().join("nope");
    let config =
        Config::from_toml(&format!("[storage.nas]\nurl = \"{}\"\n", root.display())).unwrap();
    let err = AnyStorage::open(&config.storage["nas"]).unwrap_err();
    assert!(matches!(err, StorageError::Config { .. }), "{err:?}");
    assert_eq!(err.exit(), Exit::Config);
    let msg = err.to_string();
    assert!(msg.contains("[storage.nas]"), "{msg}");
    assert!(msg.contains(&root.display().to_string()), "{msg}");
    assert!(msg.contains("create_root"), "{msg}");
    assert!(!root.exists());
}

/// `create_root = true` creates a missing local root (with its parents) at start, and
/// `check_root` notices when it goes away later (an unmounted share).
#[tokio::test]
async fn local_create_root_creates_the_folder() {
    let dir = test_support::tempdir();
    let root = dir.path().join("new/deliveries");
    let config = Config::from_toml(&format!(
        "[storage.nas]\nurl = \"{}\"\ncreate_root = true\n",
        root.display()
    ))
    .unwrap();
    let s = AnyStorage::open_checked(&config.storage["nas"])
        .await
        .unwrap();
    assert!(root.is_dir());
    s.put_bytes("a/b.txt", Bytes::from("b")).await.unwrap();
    s.check_root().await.unwrap();
    // Without create_root, a root that disappears after the start is an error again.
    let plain =
        Config::from_toml(&format!("[storage.nas]\nurl = \"{}\"\n", root.display())).unwrap();
    let s = AnyStorage::open(&plain.storage["nas"]).unwrap();
    std::fs::remove_dir_all(&root).unwrap();
    let err = s.check_root().await.unwrap_err();
    assert_eq!(err.exit(), Exit::Config);
    assert!(err.to_string().contains("[storage.nas]"), "{err}");
}

fn sftp_toml(params: &SshParams, path: &str, extra: &str) -> String {
    format!(
        r#"
        [storage.customer]
        url = "sftp://{user}@{host}:{port}{path}"
        key_file = "{key}"
        known_hosts = "{known_hosts}"
        timeout_secs = 20
        {extra}
        "#,
        user = params.user,
        host = params.host,
        port = params.port,
        key = params.key_file.as_ref().unwrap().display(),
        known_hosts = params.known_hosts.display(),
    )
}

/// A missing SFTP base folder is found at start (not at the first put), as a
/// configuration error naming the section and the folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_missing_base_folder_is_a_config_error_at_start() {
    let Some(params) = sftp_params() else { return };
    let Some(root) = test_support::require("SFTP_ROOT") else {
        return;
    };
    let missing = format!("{root}/{}/deeper", test_support::unique("missing"));
    let config = Config::from_toml(&sftp_toml(&params, &missing, "")).unwrap();
    // Opening makes no connection; the check does.
    let s = AnyStorage::open(&config.storage["customer"]).unwrap();
    let err = s.check_root().await.unwrap_err();
    assert!(matches!(err, StorageError::Config { .. }), "{err:?}");
    assert_eq!(err.exit(), Exit::Config);
    let msg = err.to_string();
    assert!(msg.contains("[storage.customer]"), "{msg}");
    assert!(msg.contains(&missing), "{msg}");
    let err = AnyStorage::open_checked(&config.storage["customer"])
        .await
        .unwrap_err();
    assert_eq!(err.exit(), Exit::Config);
    // A put into the missing base says the same.
    let err = s.put_bytes("x", Bytes::from("x")).await.unwrap_err();
    assert!(err.to_string().contains("[storage.customer]"), "{err}");
}

/// `create_root = true` creates the base folder, every missing level of it; a path
/// after `/~/` is relative to the login folder, any other path is absolute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_create_root_creates_the_base_folder() {
    let Some(params) = sftp_params() else { return };
    let Some(root) = test_support::require("SFTP_ROOT") else {
        return;
    };
    let top = test_support::unique("created");
    let absolute = format!("{root}/{top}/a/b");
    let config = Config::from_toml(&sftp_toml(&params, &absolute, "create_root = true")).unwrap();
    let s = AnyStorage::open_checked(&config.storage["customer"])
        .await
        .unwrap();
    s.put_bytes("x.txt", Bytes::from("x")).await.unwrap();
    run_remote(
        &params,
        &format!("test -f {}/x.txt", shell_quote(&absolute)),
    )
    .await;
    run_remote(
        &params,
        &format!("rm -rf {}", shell_quote(&format!("{root}/{top}"))),
    )
    .await;

    let rel = test_support::unique("home-relative");
    let config = Config::from_toml(&sftp_toml(
        &params,
        &format!("/~/{rel}/out"),
        "create_root = true",
    ))
    .unwrap();
    let s = AnyStorage::open_checked(&config.storage["customer"])
        .await
        .unwrap();
    s.put_bytes("y.txt", Bytes::from("y")).await.unwrap();
    // Relative to the login folder ($HOME of the SFTP user), wherever that is.
    run_remote(
        &params,
        &format!("cd && test -f {}/out/y.txt", shell_quote(&rel)),
    )
    .await;
    run_remote(&params, &format!("cd && rm -rf {}", shell_quote(&rel))).await;
}

/// S3: the check is one HeadBucket; a missing bucket is a configuration error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_check_root_finds_a_missing_bucket() {
    let Some(toml) = s3_toml(&test_support::unique("storage")) else {
        return;
    };
    open(&toml).check_root().await.unwrap();
    let bucket = test_support::require("S3_BUCKET").unwrap_or_default();
    let s = open(&toml.replace(&format!("s3://{bucket}"), "s3://labrelay-no-such-bucket"));
    let err = s.check_root().await.unwrap_err();
    assert!(matches!(err, StorageError::Config { .. }), "{err:?}");
    assert!(err.to_string().contains("[storage.t]"), "{err}");
}
