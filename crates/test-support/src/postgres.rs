//! A throwaway PostgreSQL server for tests that stop and start the database (the shared
//! one on 127.0.0.1:5432 is never restarted by a test). It runs as the `postgres` user
//! (the server refuses root) from a temp dir, trust authentication, loopback only.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::free_port;

/// A PostgreSQL server of this test's own, stopped when dropped.
pub struct PgNode {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl PgNode {
    /// The newest `/usr/lib/postgresql/<version>/bin` with `initdb` and `pg_ctl`.
    fn bin_dir() -> Option<PathBuf> {
        if let Some(dir) = crate::setting("PG_BIN_DIR") {
            return Some(PathBuf::from(dir));
        }
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
            .collect();
        dirs.sort();
        dirs.pop()
    }

    /// Create and start a server; `None` (or a panic in strict mode) when PostgreSQL's
    /// server binaries are missing.
    pub fn start() -> Option<PgNode> {
        let Some(bin) = PgNode::bin_dir() else {
            let msg = "PostgreSQL server binaries not found (set LABRELAY_TEST_PG_BIN_DIR)";
            assert!(!crate::strict(), "{msg}");
            eprintln!("SKIPPED: {msg}");
            return None;
        };
        let dir = crate::tempdir();
        let node = PgNode {
            dir,
            bin,
            port: free_port(),
        };
        // The server runs as `postgres`: it must own its directory.
        let owned = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(node.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(owned, "chown of the throwaway PostgreSQL directory failed");
        let data = node.data();
        let ok = PgNode::as_postgres(&node.bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "-D"])
            .arg(&data)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "initdb of the throwaway PostgreSQL failed");
        assert!(node.boot(), "the throwaway PostgreSQL did not start");
        Some(node)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn as_postgres(program: &Path) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"])
            .arg(program)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    /// Start the server (again) and wait until it accepts connections.
    pub fn boot(&self) -> bool {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        PgNode::as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-o", &opts, "-w", "-t", "60", "start"])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Stop the server at once (`-m fast`: sessions are disconnected) and wait for it.
    pub fn halt(&self) -> bool {
        PgNode::as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "-t", "60", "stop"])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgNode {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}
