//! A throwaway RabbitMQ node for tests that stop and start a broker (the shared one
//! on 127.0.0.1:5672 is never restarted by a test).

use std::path::PathBuf;
use std::process::Stdio;

use crate::free_port;

/// A RabbitMQ node of this test's own, in a temp dir, stopped (and killed if need be)
/// when dropped.
pub struct RabbitNode {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// The Erlang node name (`lrtest-…@localhost`).
    pub name: String,
    port: u16,
}

impl RabbitNode {
    /// The directory of `rabbitmq-server` and `rabbitmqctl`. The Debian scripts in
    /// /usr/sbin switch to the `rabbitmq` user when run as root, which could not read our
    /// temp dir; the real scripts live in /usr/lib/rabbitmq/bin.
    fn bin_dir() -> Option<PathBuf> {
        if let Some(dir) = crate::setting("RABBITMQ_BIN_DIR") {
            return Some(PathBuf::from(dir));
        }
        let mut candidates = vec![PathBuf::from("/usr/lib/rabbitmq/bin")];
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path));
        }
        candidates
            .into_iter()
            .find(|d| d.join("rabbitmq-server").is_file() && d.join("rabbitmqctl").is_file())
    }

    pub fn start() -> Option<RabbitNode> {
        let Some(bin) = RabbitNode::bin_dir() else {
            let msg = "rabbitmq-server not found (set LABRELAY_TEST_RABBITMQ_BIN_DIR)";
            assert!(!crate::strict(), "{msg}");
            eprintln!("SKIPPED: {msg}");
            return None;
        };
        // A port taken between our check and the node's bind makes the start fail; try
        // again with other ports.
        for _ in 0..3 {
            let dir = crate::tempdir();
            let node = RabbitNode {
                name: format!("lrtest-{}-{}@localhost", std::process::id(), free_port()),
                port: free_port(),
                bin: bin.clone(),
                dir,
            };
            node.prepare();
            if node.boot() {
                return Some(node);
            }
            node.dump_log();
        }
        panic!("could not start a throwaway RabbitMQ node");
    }

    fn prepare(&self) {
        use std::os::unix::fs::PermissionsExt;
        let d = self.dir.path();
        for sub in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(d.join(sub)).expect("setting up the throwaway RabbitMQ node");
        }
        // Our own cookie in our own HOME: rabbitmqctl and the node must agree, and the
        // shared node's cookie is not ours to read.
        let cookie = d.join("home/.erlang.cookie");
        std::fs::write(&cookie, crate::unique("LRCOOKIE").replace('-', "X"))
            .expect("setting up the throwaway RabbitMQ node");
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))
            .expect("setting up the throwaway RabbitMQ node");
        // Our config, not /etc/rabbitmq's (which pins the listener to 5672).
        std::fs::write(d.join("rabbitmq.conf"), "loopback_users = none\n")
            .expect("setting up the throwaway RabbitMQ node");
        std::fs::write(d.join("rabbitmq-env.conf"), "")
            .expect("setting up the throwaway RabbitMQ node");
    }

    fn command(&self, program: &str) -> std::process::Command {
        let d = self.dir.path();
        let mut cmd = std::process::Command::new(self.bin.join(program));
        cmd.env("HOME", d.join("home"))
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", self.pid_file())
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_ENABLED_PLUGINS", "")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.path().join("rabbit.pid")
    }

    fn ctl(&self, args: &[&str]) -> bool {
        let mut cmd = self.command("rabbitmqctl");
        cmd.arg("-n").arg(&self.name).args(args);
        cmd.status().is_ok_and(|s| s.success())
    }

    /// Start the node (again) and wait until it accepts clients.
    pub fn boot(&self) -> bool {
        let mut server = self.command("rabbitmq-server");
        server.arg("-detached").stdout(
            std::fs::File::create(self.dir.path().join("log/server.out"))
                .expect("setting up the throwaway RabbitMQ node"),
        );
        if !server.status().is_ok_and(|s| s.success()) {
            return false;
        }
        let pid = self.pid_file();
        self.ctl(&[
            "wait",
            "--timeout",
            "120",
            pid.to_str()
                .expect("setting up the throwaway RabbitMQ node"),
        ])
    }

    /// Stop the node and wait until its process is gone.
    pub fn halt(&self) -> bool {
        let pid = self.pid_file();
        self.ctl(&[
            "stop",
            pid.to_str()
                .expect("setting up the throwaway RabbitMQ node"),
        ])
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn dump_log(&self) {
        let log = self
            .dir
            .path()
            .join("log")
            .join(format!("{}.log", self.name));
        if let Ok(text) = std::fs::read_to_string(log) {
            let tail: Vec<_> = text.lines().rev().take(30).collect();
            eprintln!(
                "RabbitMQ log tail:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if self.halt() {
            return;
        }
        // rabbitmqctl could not stop it: kill the process named in the pid file.
        if let Ok(pid) = std::fs::read_to_string(self.pid_file()) {
            let _ = std::process::Command::new("kill")
                .args(["-9", pid.trim()])
                .status();
        }
    }
}
