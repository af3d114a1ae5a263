//! Fixtures of the delivery tests: a LIMS on SQLite, PostgreSQL or MariaDB (a fresh
//! database per test), targets on a local directory, Garage (S3) and OpenSSH (SFTP)
//! below a unique prefix, a delivery folder with the awkward cases, and running the
//! binary with a config file.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use labrelay::config::{Config, DatabaseConfig};
use labrelay::db::{Db, Engine};
use labrelay::secret::RedactedUrl;
use labrelay::ssh::{SshParams, SshSession, shell_quote};
use labrelay::storage::{AnyStorage, ObjectStorage};
use md5::{Digest, Md5};

pub const BIN: &str = env!("CARGO_BIN_EXE_delivery-upload");
pub const MIB: usize = 1024 * 1024;

/// The LIMS of one test.
pub struct Lims {
    /// `[databases.lims]` url.
    pub url: String,
    admin: Option<(Db, String)>,
    _dir: Option<tempfile::TempDir>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LimsKind {
    Sqlite,
    Postgres,
    Mariadb,
}

impl Lims {
    /// A fresh LIMS database with the tables; `None` when the server is not configured.
    pub async fn new(kind: LimsKind) -> Option<Lims> {
        let lims = match kind {
            LimsKind::Sqlite => {
                let dir = test_support::tempdir();
                let url = format!("sqlite://{}?mode=rwc", dir.path().join("lims.db").display());
                Lims {
                    url,
                    admin: None,
                    _dir: Some(dir),
                }
            }
            LimsKind::Postgres | LimsKind::Mariadb => {
                let admin_url = test_support::require(if kind == LimsKind::Postgres {
                    "PG_URL"
                } else {
                    "MYSQL_URL"
                })?;
                let admin = Db::connect(&DatabaseConfig::from_url(
                    RedactedUrl::parse(&admin_url).unwrap(),
                ))
                .await
                .unwrap();
                let name = test_support::unique("lims").replace('-', "_");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(admin.pool())
                    .await
                    .unwrap();
                let mut url = admin.url().expose().clone();
                url.set_path(&format!("/{name}"));
                Lims {
                    url: url.to_string(),
                    admin: Some((admin, name)),
                    _dir: None,
                }
            }
        };
        let db = lims.db().await;
        let text = if db.engine() == Engine::Mysql {
            "VARCHAR(255)"
        } else {
            "TEXT"
        };
        for stmt in [
            format!(
                "CREATE TABLE t_project (project_id {text}, customer_name {text}, \
                 customer_email {text}, action_man {text}, sale_man {text}, info_email {text})"
            ),
            format!(
                "CREATE TABLE t_analysis (plan_code {text}, project_id {text}, analysis_path {text})"
            ),
            format!(
                "CREATE TABLE t_microbe_delivery (plan_code {text}, status {text}, account {text}, \
                 path {text}, files BIGINT, updated_at {text})"
            ),
            "INSERT INTO t_project VALUES ('V3fmjM', '李老师', 'customer@labrelay.test', \
             'analyst@labrelay.test', 'sales@labrelay.test', 'info@labrelay.test')"
                .to_owned(),
        ] {
            sqlx::query(&stmt).execute(db.pool()).await.unwrap();
        }
        db.close().await;
        Some(lims)
    }

    pub async fn db(&self) -> Db {
        Db::connect(&DatabaseConfig::from_url(
            RedactedUrl::parse(&self.url).unwrap(),
        ))
        .await
        .unwrap()
    }

    /// Register an analysis whose folder is `path`.
    pub async fn add_analysis(&self, id: &str, path: &Path) {
        let db = self.db().await;
        let p = |n| db.engine().placeholder(n);
        sqlx::query(&format!(
            "INSERT INTO t_analysis VALUES ({}, 'V3fmjM', {})",
            p(1),
            p(2)
        ))
        .bind(id)
        .bind(path.display().to_string())
        .execute(db.pool())
        .await
        .unwrap();
        db.close().await;
    }

    /// Rows of t_microbe_delivery: (plan_code, status).
    pub async fn status_rows(&self) -> Vec<(String, String)> {
        let db = self.db().await;
        let rows = sqlx::query("SELECT plan_code, status FROM t_microbe_delivery")
            .fetch_all(db.pool())
            .await
            .unwrap();
        db.close().await;
        rows.iter()
            .map(|r| {
                (
                    labrelay::db::text(r, 0).unwrap(),
                    labrelay::db::text(r, 1).unwrap(),
                )
            })
            .collect()
    }

    /// `[databases.lims]`, `[delivery.lookup]` and `[delivery.status]`.
    pub fn config(&self, on_delivered: &str) -> String {
        format!(
            r#"
[databases.lims]
url = "{url}"

[delivery.lookup]
database = "lims"
sql = """
SELECT a.analysis_path, a.project_id, p.customer_name, p.customer_email,
       p.action_man AS action_email, p.sale_man AS sales_email, p.info_email
FROM t_analysis a JOIN t_project p ON p.project_id = a.project_id
WHERE a.plan_code = :analysis_id"""

[delivery.status]
database = "lims"
on_delivered = """{on_delivered}"""
"#,
            url = self.url
        )
    }

    pub async fn cleanup(self) {
        if let Some((admin, name)) = &self.admin {
            let force = if admin.engine() == Engine::Postgres {
                " WITH (FORCE)"
            } else {
                ""
            };
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name}{force}"))
                .execute(admin.pool())
                .await
                .unwrap();
        }
    }
}

/// The seed-style status write.
pub const STATUS_INSERT: &str = "INSERT INTO t_microbe_delivery (plan_code, status, account, path, files, updated_at) \
     VALUES (:analysis_id, :status, :account, :path, :files, :delivered_at)";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TargetKind {
    Local,
    S3,
    Sftp,
}

/// A delivery target below a unique prefix; `storage` opens the same place for checks.
pub struct TargetFixture {
    pub kind: TargetKind,
    /// `[storage.t]`.
    pub toml: String,
    pub storage: AnyStorage,
    _dir: Option<tempfile::TempDir>,
    sftp: Option<(String, SshParams)>,
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
        timeout: Duration::from_secs(30),
    })
}

async fn remote(p: &SshParams, command: &str) {
    let mut s = SshSession::connect(p).await.unwrap();
    let out = s.exec(command, Duration::from_mins(1)).await.unwrap();
    assert!(out.success(), "{command}: {}", out.stderr_text());
}

impl TargetFixture {
    pub async fn new(kind: TargetKind, extra: &str) -> Option<TargetFixture> {
        let (toml, dir, sftp) = match kind {
            TargetKind::Local => {
                let dir = test_support::tempdir();
                (
                    format!("[storage.t]\nurl = \"{}\"\n{extra}", dir.path().display()),
                    Some(dir),
                    None,
                )
            }
            TargetKind::S3 => (
                format!(
                    "{}{extra}",
                    test_support::s3_storage_toml("t", &test_support::unique("delivery"))?
                ),
                None,
                None,
            ),
            TargetKind::Sftp => {
                let params = sftp_params()?;
                let root = test_support::require("SFTP_ROOT")?;
                let base = format!("{root}/{}", test_support::unique("delivery"));
                remote(&params, &format!("mkdir -p {}", shell_quote(&base))).await;
                (
                    format!(
                        r#"[storage.t]
url = "sftp://{user}@{host}:{port}{base}"
key_file = "{key}"
known_hosts = "{known_hosts}"
timeout_secs = 30
{extra}"#,
                        user = params.user,
                        host = params.host,
                        port = params.port,
                        key = params.key_file.as_ref()?.display(),
                        known_hosts = params.known_hosts.display(),
                    ),
                    None,
                    Some((base, params)),
                )
            }
        };
        let config = Config::from_toml(&toml).unwrap();
        let storage = AnyStorage::open(&config.storage["t"]).unwrap();
        Some(TargetFixture {
            kind,
            toml,
            storage,
            _dir: dir,
            sftp,
        })
    }

    /// Every object below `prefix`: key → (size, md5 of its content).
    pub async fn contents(&self, prefix: &str) -> Vec<(String, u64, String)> {
        let mut out = Vec::new();
        for o in self.storage.list(prefix).await.unwrap() {
            let got = self
                .storage
                .get_into(&o.key, std::io::sink())
                .await
                .unwrap();
            out.push((o.key, got.size, got.md5_hex));
        }
        out
    }

    pub async fn cleanup(self) {
        match self.kind {
            TargetKind::Local => {}
            TargetKind::S3 => {
                for o in self.storage.list("").await.unwrap() {
                    self.storage.delete(&o.key).await.unwrap();
                }
            }
            TargetKind::Sftp => {
                if let Some((base, params)) = &self.sftp {
                    remote(params, &format!("rm -rf {}", shell_quote(base))).await;
                }
            }
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), written in 1 MiB chunks.
pub fn write_random(path: &Path, len: usize, seed: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed | 1;
    let mut buf = vec![0u8; MIB];
    let mut left = len;
    while left > 0 {
        for chunk in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(MIB);
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    f.flush().unwrap();
}

pub fn md5_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Md5::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// The GBK bytes of 报告.txt: not UTF-8, delivered as 报告.txt.
pub const GBK_NAME: &[u8] = b"\xb1\xa8\xb8\xe6.txt";

/// A delivery folder with nested folders, a symlink to a file outside it, a 0-byte
/// file, a non-UTF-8 name and a `big_mib` MiB file. Returns the folder and the expected
/// (relative key → md5) of every file.
pub fn tree(base: &Path, big_mib: usize) -> (PathBuf, Vec<(String, String)>) {
    let root = base.join("result/upload");
    std::fs::create_dir_all(root.join("clean/S1/lane2")).unwrap();
    std::fs::create_dir_all(root.join("big")).unwrap();
    std::fs::write(root.join("clean/S1/lane2/S1_R1.fq"), "@r\nACGT\n+\nIIII\n").unwrap();
    std::fs::write(root.join("report.html"), "<h1>报告</h1>\n").unwrap();
    std::fs::write(root.join("empty.txt"), "").unwrap();
    let outside = base.join("otu_table.tsv");
    std::fs::write(&outside, "#OTU\tS1\nOTU_1\t3\n").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("clean/otu_table.tsv")).unwrap();
    std::fs::write(root.join(OsStr::from_bytes(GBK_NAME)), "gbk name\n").unwrap();
    if big_mib > 0 {
        write_random(&root.join("big/reads.bin"), big_mib * MIB, 0x5eed_0001);
    }
    let mut expected: Vec<(String, String)> = vec![
        (
            "clean/S1/lane2/S1_R1.fq".into(),
            md5_file(&root.join("clean/S1/lane2/S1_R1.fq")),
        ),
        ("clean/otu_table.tsv".into(), md5_file(&outside)),
        (
            "empty.txt".into(),
            "d41d8cd98f00b204e9800998ecf8427e".into(),
        ),
        ("report.html".into(), md5_file(&root.join("report.html"))),
        (
            "报告.txt".into(),
            md5_file(&root.join(OsStr::from_bytes(GBK_NAME))),
        ),
    ];
    if big_mib > 0 {
        expected.push((
            "big/reads.bin".into(),
            md5_file(&root.join("big/reads.bin")),
        ));
    }
    expected.sort();
    (root, expected)
}

/// A test home: config file, data dir.
pub struct Home {
    pub dir: tempfile::TempDir,
}

impl Home {
    pub fn new() -> Home {
        Home {
            dir: test_support::tempdir(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Write the config: `[paths]`, `[mail]`, and `body`, with the test home as
    /// `[delivery] data_roots` (the trees link to files beside the delivery folder, as
    /// pipelines link into their results tree).
    pub fn config(&self, body: &str) -> PathBuf {
        let roots = format!("data_roots = [\"{}\"]\n", self.path().display());
        let body = if body.starts_with("[delivery]\n") || body.contains("\n[delivery]\n") {
            body.replacen("[delivery]\n", &format!("[delivery]\n{roots}"), 1)
        } else {
            format!("[delivery]\n{roots}\n{body}")
        };
        let text = format!(
            "[paths]\ndata_dir = \"{}\"\n\n[mail]\nfrom = \"Delivery <delivery@labrelay.test>\"\n\n{body}",
            self.data_dir().display()
        );
        test_support::write_config(self.path(), &text)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = test_support::cli::command(BIN, self.path());
        cmd.arg("--config").arg(self.path().join("config.toml"));
        cmd.args(args);
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// The state database.
    pub async fn state(&self) -> Db {
        let url = format!("sqlite://{}", self.data_dir().join("state.db").display());
        Db::connect(&DatabaseConfig::from_url(RedactedUrl::parse(&url).unwrap()))
            .await
            .unwrap()
    }

    pub fn outbox(&self) -> Vec<String> {
        let dir = self.data_dir().join("outbox");
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        // What a sweeper of the outbox takes: `*.eml`, not hidden temporary files.
        rd.map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.ends_with(".eml") && !name.starts_with('.')
            })
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    }
}

/// JSON records of a run's stdout.
pub fn records(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

pub fn summary(out: &Output) -> serde_json::Value {
    records(out)
        .into_iter()
        .rev()
        .find(|r| r["type"] == "summary")
        .unwrap_or_else(|| panic!("no summary record: {out:?}"))
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
