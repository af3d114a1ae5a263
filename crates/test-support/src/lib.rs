//! Helpers for labrelay's tests: where the real test servers are, unique names, temp dirs.
//!
//! `scripts/services` starts the servers and writes `target/services.env`; tests read
//! the settings from the process environment first, then from that file. When a server
//! is missing, a test is skipped with a message, except under `CI=true`, where it fails:
//! CI must never pass by silently skipping.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .expect("crates/test-support lives two levels below the root")
}

/// The services file written by `scripts/services`.
pub fn services_file() -> PathBuf {
    std::env::var_os("LABRELAY_SERVICES_ENV").map_or_else(
        || {
            std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| workspace_root().join("target"), PathBuf::from)
                .join("services.env")
        },
        PathBuf::from,
    )
}

fn file_values() -> &'static BTreeMap<String, String> {
    static VALUES: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    VALUES.get_or_init(|| {
        let Ok(text) = std::fs::read_to_string(services_file()) else {
            return BTreeMap::new();
        };
        text.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| {
                let v = v.trim();
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v);
                (k.trim().to_owned(), v.to_owned())
            })
            .collect()
    })
}

/// A setting `LABRELAY_TEST_<name>` from the environment or the services file.
pub fn setting(name: &str) -> Option<String> {
    let key = format!("LABRELAY_TEST_{name}");
    std::env::var(&key)
        .ok()
        .or_else(|| file_values().get(&key).cloned())
        .filter(|v| !v.is_empty())
}

/// Whether missing servers must fail the test (`CI=true`).
pub fn strict() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A required setting: `Some(value)`, or `None` after printing why the test is skipped.
/// Under `CI=true` a missing setting panics instead.
pub fn require(name: &str) -> Option<String> {
    if let Some(v) = setting(name) {
        return Some(v);
    }
    let msg = format!(
        "test server setting LABRELAY_TEST_{name} is missing (run scripts/services; looked in {})",
        services_file().display()
    );
    assert!(!strict(), "{msg}");
    eprintln!("SKIPPED: {msg}");
    None
}

/// [`require`], parsed: a missing setting skips (fails under `CI=true`), but a value
/// that does not parse always fails, naming the setting: a broken services file must
/// never look like a missing server.
pub fn require_parsed<T>(name: &str) -> Option<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    require(name).map(|raw| parse_setting(name, &raw))
}

fn parse_setting<T>(name: &str, raw: &str) -> T
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match raw.parse() {
        Ok(v) => v,
        Err(e) => panic!("test server setting LABRELAY_TEST_{name} = {raw:?} is malformed: {e}"),
    }
}

/// Return early from a test when a server setting is missing (fails under `CI=true`).
#[macro_export]
macro_rules! require {
    ($name:literal) => {
        match $crate::require($name) {
            Some(v) => v,
            None => return,
        }
    };
}

/// A name unique to this test run and process, for queues, buckets prefixes, databases.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}-{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("labrelay-test-")
        .tempdir()
        .expect("creating a temp dir")
}

/// Write a config file into `dir` and return its path.
pub fn write_config(dir: &std::path::Path, toml: &str) -> PathBuf {
    let p = dir.join("config.toml");
    std::fs::write(&p, toml).expect("writing test config");
    p
}

/// A `[storage.NAME]` section for the test Garage bucket under `prefix` (no trailing
/// newline issues: it ends with a newline). `None` (or a panic under `CI=true`) when the
/// S3 settings are missing.
pub fn s3_storage_toml(name: &str, prefix: &str) -> Option<String> {
    Some(format!(
        "[storage.{name}]\n\
         url = \"s3://{bucket}/{prefix}\"\n\
         endpoint = \"{endpoint}\"\n\
         region = \"{region}\"\n\
         path_style = true\n\
         allow_http = true\n\
         access_key_id = \"{key_id}\"\n\
         secret_access_key = \"{secret}\"\n\
         timeout_secs = 30\n",
        bucket = require("S3_BUCKET")?,
        endpoint = require("S3_ENDPOINT")?,
        region = require("S3_REGION")?,
        key_id = require("S3_ACCESS_KEY_ID")?,
        secret = require("S3_SECRET_ACCESS_KEY")?,
    ))
}

/// Running a tool binary in a clean environment.
pub mod postgres;
pub mod rabbitmq;

/// A loopback TCP port that was free a moment ago (bound, noted, closed).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a loopback port")
        .port()
}

pub mod cli {
    use std::path::Path;
    use std::process::{Command, Output};

    /// A command for `bin` with no config files, no inherited `LABRELAY_*` variables,
    /// and data/config homes inside `home`.
    pub fn command(bin: &str, home: &Path) -> Command {
        let mut cmd = Command::new(bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("LABRELAY_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.env("LABRELAY_SYSTEM_CONFIG", home.join("no-system-config.toml"))
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("XDG_DATA_HOME", home.join("data"))
            .env("HOME", home)
            .env("NO_COLOR", "1")
            .env("COLUMNS", "100")
            .env("LABRELAY_NO_PROGRESS", "1")
            .stdin(std::process::Stdio::null());
        cmd
    }

    /// Another tool binary built beside `bin` (a workspace test run builds every binary;
    /// with `-p` alone, build the other one first).
    pub fn sibling(bin: &str, name: &str) -> String {
        let path = Path::new(bin).with_file_name(name);
        assert!(
            path.exists(),
            "{} is missing: cargo build -p {name}",
            path.display()
        );
        path.to_string_lossy().into_owned()
    }

    /// A child process, killed and reaped when dropped (a test that fails half-way
    /// leaves no server or worker running).
    #[derive(Debug)]
    pub struct KillOnDrop(pub std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Run and collect output.
    pub fn run(bin: &str, home: &Path, args: &[&str]) -> Output {
        command(bin, home)
            .args(args)
            .output()
            .expect("running the tool binary")
    }

    /// `--help` output, for snapshot tests.
    pub fn help(bin: &str) -> String {
        let home = crate::tempdir();
        let out = run(bin, home.path(), &["--help"]);
        assert_eq!(out.status.code(), Some(0), "--help failed: {out:?}");
        assert!(out.stderr.is_empty(), "--help wrote to stderr");
        String::from_utf8(out.stdout).expect("help is UTF-8")
    }

    /// The checks every tool must pass whatever it does: usage errors exit 2, a config
    /// file with an unknown key exits 78 naming the key and the file, `--version` works.
    /// `valid_args` is an argument list that parses.
    pub fn assert_common_contract(bin: &str, valid_args: &[&str]) {
        let home = crate::tempdir();
        let out = run(bin, home.path(), &["--no-such-flag"]);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));

        let out = run(bin, home.path(), &["--version"]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");

        let cfg = crate::write_config(
            home.path(),
            "[paths]\ndata_dir = \"/tmp/x\"\n\n[smtp]\nhost = \"127.0.0.1\"\npasword = \"oops\"\n",
        );
        let mut args = vec!["--config", cfg.to_str().expect("utf-8 temp path")];
        args.extend_from_slice(valid_args);
        let out = run(bin, home.path(), &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(78),
            "unknown key must exit 78: {err}"
        );
        assert!(err.contains("pasword"), "error must name the key: {err}");
        assert!(
            err.contains("config.toml"),
            "error must name the file: {err}"
        );
        assert!(out.stdout.is_empty(), "errors go to stderr, not stdout");

        let mut args = vec!["--config", "/nonexistent/labrelay.toml"];
        args.extend_from_slice(valid_args);
        let out = run(bin, home.path(), &args);
        assert_eq!(out.status.code(), Some(78), "{out:?}");
    }

    /// A tool whose behaviour a later issue builds: valid arguments give a clear
    /// "not implemented yet" error on stderr, exit 2, and nothing on stdout.
    pub fn assert_not_implemented_yet(bin: &str, valid_args: &[&str]) {
        let home = crate::tempdir();
        let mut args = vec!["--no-config"];
        args.extend_from_slice(valid_args);
        let out = run(bin, home.path(), &args);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not implemented yet"), "{err}");
        assert!(out.stdout.is_empty());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[should_panic(expected = "LABRELAY_TEST_SFTP_PORT = \"22x\" is malformed")]
    fn a_malformed_setting_fails_instead_of_skipping() {
        let _: u16 = super::parse_setting("SFTP_PORT", "22x");
    }

    #[test]
    fn a_good_setting_parses() {
        assert_eq!(super::parse_setting::<u16>("SFTP_PORT", "2222"), 2222);
    }
}
