//! SSH: authenticated sessions to a host whose key is checked against a known_hosts file,
//! and remote commands with a hard timeout and captured output.
//!
//! This module owns connecting (TCP, handshake, host key check, authentication) and
//! running commands. The SFTP storage backend ([`crate::storage`]) builds on the same
//! sessions. It does not decide what to run, and it never writes a password or key
//! passphrase into an error or a log line: errors name `user@host:port` only.
//!
//! Host keys: with [`HostKeyPolicy::Strict`] (the default) the server's key must already
//! be in the known_hosts file; with [`HostKeyPolicy::AcceptNew`] an unknown host is
//! appended to the file, but a *changed* key is refused under either policy.
//!
//! ssh2 (libssh2) is a blocking library. [`SshSession::connect`] runs the handshake on a
//! blocking thread; [`SshSession::exec`] drives libssh2 in non-blocking mode from the
//! async task, so a timeout can interrupt a command that produces no output.

use std::fmt::Write as _;
use std::io::{ErrorKind, Read};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ssh2::{BlockDirections, CheckResult, HostKeyType, KnownHostFileKind, Session};
use tokio::io::Interest;

pub use crate::config::HostKeyPolicy;
use crate::config::SshConfig;
use crate::exit::Exit;
use crate::secret::{Secret, SecretError, SecretSpec};

/// Output of one stream kept in memory at most; the rest is read and dropped, and
/// [`Output::truncated`] is set, so a chatty command cannot exhaust memory.
pub const MAX_CAPTURE: usize = 64 * 1024 * 1024;

/// SSH errors. None of them contains a password or passphrase.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The server could not be reached (DNS, TCP, handshake).
    #[error("cannot connect to {server}: {message}")]
    Connect {
        /// host:port.
        server: String,
        /// Why.
        message: String,
    },
    /// Connecting or a blocking call took longer than the configured timeout.
    #[error("timed out after {timeout:?} {during} on {server}")]
    Timeout {
        /// host:port.
        server: String,
        /// What was going on (`connecting`, `authenticating`, …).
        during: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// A remote command ran longer than its timeout.
    #[error("command `{command}` on {server} did not finish within {timeout:?}")]
    CommandTimeout {
        /// host:port.
        server: String,
        /// The command line.
        command: String,
        /// The limit.
        timeout: Duration,
    },
    /// The host is not in known_hosts and the policy is strict.
    #[error(
        "host key of {server} is not in {known_hosts} (server offers {fingerprint}); \
         add it with ssh-keyscan after checking the fingerprint, or set host_key_policy = \"accept-new\""
    )]
    HostKeyUnknown {
        /// `host:port`.
        server: String,
        /// The known_hosts file consulted.
        known_hosts: PathBuf,
        /// `SHA256:…` fingerprint of the offered key.
        fingerprint: String,
    },
    /// known_hosts has a different key for this host: refused under every policy.
    #[error(
        "HOST KEY MISMATCH for {server}: the server offers {fingerprint}, which differs from \
         the key recorded in {known_hosts}; if the host key was changed on purpose, remove \
         the old entry from that file"
    )]
    HostKeyMismatch {
        /// `host:port`.
        server: String,
        /// The known_hosts file consulted.
        known_hosts: PathBuf,
        /// `SHA256:…` fingerprint of the offered key.
        fingerprint: String,
    },
    /// The known_hosts file cannot be read or written.
    #[error("known_hosts file {path}: {message}")]
    KnownHosts {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Authentication failed (wrong password, key not authorized, bad key file).
    #[error("authentication as {user}@{server} failed: {message}")]
    Auth {
        /// `host:port`.
        server: String,
        /// Login user.
        user: String,
        /// What was tried and why it failed (never the secret).
        message: String,
    },
    /// The settings are incomplete or contradictory.
    #[error("invalid ssh settings for {server}: {message}")]
    Config {
        /// `host:port`.
        server: String,
        /// What is wrong.
        message: String,
    },
    /// A password or passphrase could not be resolved.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The server stayed unreachable through every attempt of the retry layer
    /// ([`crate::retry`]): the last error's class, but no caller retries it again.
    #[error("{last} (tried {attempts} times)")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        #[source]
        last: Box<SshError>,
    },
    /// The session failed after it was established (channel refused, connection lost).
    #[error("ssh session to {server}: {message}")]
    Session {
        /// `host:port`.
        server: String,
        /// Why.
        message: String,
    },
}

impl SshError {
    /// Exit status: unreachable server or timeout → 75; configuration, credentials and
    /// host keys → 78; a broken session → 1.
    pub fn exit(&self) -> Exit {
        match self {
            SshError::GaveUp { last, .. } => last.exit(),
            SshError::Connect { .. }
            | SshError::Timeout { .. }
            | SshError::CommandTimeout { .. } => Exit::TempFail,
            SshError::HostKeyUnknown { .. }
            | SshError::HostKeyMismatch { .. }
            | SshError::KnownHosts { .. }
            | SshError::Auth { .. }
            | SshError::Config { .. } => Exit::Config,
            SshError::Secret(e) => e.exit(),
            SshError::Session { .. } => Exit::Failed,
        }
    }

    /// Whether the connection should be considered broken (reconnect before retrying).
    pub fn is_connection_lost(&self) -> bool {
        match self {
            SshError::GaveUp { last, .. } => last.is_connection_lost(),
            SshError::Connect { .. } | SshError::Timeout { .. } | SshError::Session { .. } => true,
            _ => false,
        }
    }
}

/// Everything needed to open a session, with secrets already resolved.
#[derive(Debug, Clone)]
pub struct SshParams {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Login user.
    pub user: String,
    /// Private key file; tried first when set.
    pub key_file: Option<PathBuf>,
    /// Passphrase of the key.
    pub key_passphrase: Option<Secret>,
    /// Password; tried when there is no key or the key is refused.
    pub password: Option<Secret>,
    /// known_hosts file to check (and, with `AcceptNew`, extend).
    pub known_hosts: PathBuf,
    /// How an unknown host is treated.
    pub host_key_policy: HostKeyPolicy,
    /// Limit for connecting and for each blocking protocol step.
    pub timeout: Duration,
}

impl SshParams {
    /// Settings from an `[ssh.NAME]` section; resolves the password and passphrase.
    pub fn from_config(c: &SshConfig) -> Result<SshParams, SshError> {
        let server = format!("{}:{}", c.host, c.port);
        Ok(SshParams {
            host: c.host.clone(),
            port: c.port,
            user: c.user.clone(),
            key_file: c.key_file.clone(),
            key_passphrase: c
                .key_passphrase
                .as_ref()
                .map(SecretSpec::resolve)
                .transpose()?,
            password: c.password.as_ref().map(SecretSpec::resolve).transpose()?,
            known_hosts: match &c.known_hosts {
                Some(p) => p.clone(),
                None => default_known_hosts(&server)?,
            },
            host_key_policy: c.host_key_policy,
            timeout: Duration::from_secs(c.timeout_secs.max(1)),
        })
    }

    /// `host:port`, as used in messages.
    pub fn server(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// `~/.ssh/known_hosts`.
pub fn default_known_hosts(server: &str) -> Result<PathBuf, SshError> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".ssh").join("known_hosts"))
        .ok_or_else(|| SshError::Config {
            server: server.to_owned(),
            message: "HOME is not set, so ~/.ssh/known_hosts cannot be found; set known_hosts"
                .into(),
        })
}

/// The result of a remote command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// Exit status reported by the server (0 when it reported none, e.g. after a signal).
    pub status: i32,
    /// The signal that ended the command (`TERM`, `KILL`, …), if any.
    pub signal: Option<String>,
    /// Captured standard output (at most [`MAX_CAPTURE`] bytes).
    pub stdout: Vec<u8>,
    /// Captured standard error (at most [`MAX_CAPTURE`] bytes).
    pub stderr: Vec<u8>,
    /// Whether output beyond [`MAX_CAPTURE`] was dropped.
    pub truncated: bool,
}

impl Output {
    /// Exit status 0 and no signal.
    pub fn success(&self) -> bool {
        self.status == 0 && self.signal.is_none()
    }

    /// Standard output as text (invalid UTF-8 replaced).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Standard error as text (invalid UTF-8 replaced).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// An authenticated SSH session.
pub struct SshSession {
    session: Session,
    // A second handle on the session's socket, so `exec` can wait for readiness.
    tcp: TcpStream,
    server: String,
    user: String,
    timeout: Duration,
}

impl std::fmt::Debug for SshSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshSession")
            .field("server", &self.server)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl SshSession {
    /// Connect, check the host key and authenticate (on a blocking thread).
    pub async fn connect(params: &SshParams) -> Result<SshSession, SshError> {
        let p = params.clone();
        let server = p.server();
        tokio::task::spawn_blocking(move || SshSession::connect_blocking(&p))
            .await
            .map_err(|e| SshError::Session {
                server,
                message: format!("connect task failed: {e}"),
            })?
    }

    /// [`SshSession::connect`] for callers already on a blocking thread. An unreachable
    /// server is tried again under [`crate::retry::policy`].
    pub fn connect_blocking(p: &SshParams) -> Result<SshSession, SshError> {
        crate::retry::run_blocking(
            crate::retry::policy(),
            || format!("connecting to {}", p.server()),
            |_| SshSession::connect_once(p),
        )
        .map(|done| done.value)
        .map_err(crate::retry::Failed::into_error)
    }

    fn connect_once(p: &SshParams) -> Result<SshSession, SshError> {
        let server = p.server();
        let timeout_ms = duration_ms(p.timeout);
        let tcp = tcp_connect(p, &server)?;
        let mut session = Session::new().map_err(|e| SshError::Session {
            server: server.clone(),
            message: e.message().to_owned(),
        })?;
        session.set_timeout(timeout_ms);
        let sock = tcp.try_clone().map_err(|e| SshError::Connect {
            server: server.clone(),
            message: e.to_string(),
        })?;
        session.set_tcp_stream(sock);
        session.handshake().map_err(|e| {
            if is_timeout(&e) {
                SshError::Timeout {
                    server: server.clone(),
                    during: "in the SSH handshake",
                    timeout: p.timeout,
                }
            } else {
                SshError::Connect {
                    server: server.clone(),
                    message: format!("SSH handshake failed: {}", e.message()),
                }
            }
        })?;
        check_host_key(&session, p, &server)?;
        authenticate(&session, p, &server)?;
        tracing::debug!(%server, user = %p.user, "SSH session established");
        Ok(SshSession {
            session,
            tcp,
            server,
            user: p.user.clone(),
            timeout: p.timeout,
        })
    }

    /// `host:port` of the server.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The underlying ssh2 session, for protocols this module does not wrap.
    pub fn raw(&self) -> &Session {
        &self.session
    }

    /// Open an SFTP channel (blocking).
    pub fn sftp(&self) -> Result<ssh2::Sftp, SshError> {
        self.session
            .sftp()
            .map_err(|e| self.session_error("opening SFTP", &e))
    }

    /// Run `command` through the login shell and capture its output. The command is
    /// abandoned (channel closed) when `timeout` passes; a remote process that ignores
    /// its closed pipes may keep running, since SSH has no portable way to kill it.
    pub async fn exec(&mut self, command: &str, timeout: Duration) -> Result<Output, SshError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let sock = self
            .tcp
            .try_clone()
            .map_err(|e| self.io_error("exec", &e))?;
        // libssh2 already made the socket non-blocking (from_std requires it); the
        // clone shares that flag, so this changes nothing for the session.
        sock.set_nonblocking(true)
            .map_err(|e| self.io_error("exec", &e))?;
        let fd = tokio::net::TcpStream::from_std(sock).map_err(|e| self.io_error("exec", &e))?;
        let _mode = NonBlocking::enter(&self.session);
        let timed_out = || SshError::CommandTimeout {
            server: self.server.clone(),
            command: command.to_owned(),
            timeout,
        };

        let mut channel = loop {
            match self.session.channel_session() {
                Err(e) if is_eagain(&e) => {
                    if !wait(&fd, &self.session, deadline).await {
                        return Err(timed_out());
                    }
                }
                r => break r.map_err(|e| self.session_error("opening a channel", &e))?,
            }
        };
        let result = self.run(&mut channel, &fd, command, deadline).await;
        match result {
            Ok(Some(out)) => Ok(out),
            Ok(None) => {
                // Best effort: tell the server we are gone. Non-blocking, so this never
                // waits for the remote process (sshd answers only after it exits).
                let _ = channel.close();
                Err(timed_out())
            }
            Err(e) => Err(e),
        }
    }

    /// The body of `exec`; `Ok(None)` means the deadline passed.
    async fn run(
        &self,
        channel: &mut ssh2::Channel,
        fd: &tokio::net::TcpStream,
        command: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Output>, SshError> {
        loop {
            match channel.exec(command) {
                Err(e) if is_eagain(&e) => {
                    if !wait(fd, &self.session, deadline).await {
                        return Ok(None);
                    }
                }
                r => {
                    r.map_err(|e| self.session_error("starting the command", &e))?;
                    break;
                }
            }
        }
        let mut out = Output::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut progress = false;
            for stream_id in [0, ssh2::EXTENDED_DATA_STDERR] {
                let mut stream = channel.stream(stream_id);
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            progress = true;
                            let sink = if stream_id == 0 {
                                &mut out.stdout
                            } else {
                                &mut out.stderr
                            };
                            let room = MAX_CAPTURE.saturating_sub(sink.len());
                            if room < n {
                                out.truncated = true;
                            }
                            sink.extend_from_slice(&buf[..n.min(room)]);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => return Err(self.io_error("reading command output", &e)),
                    }
                }
            }
            if progress {
                continue;
            }
            if channel.eof() {
                break;
            }
            if !wait(fd, &self.session, deadline).await {
                return Ok(None);
            }
        }
        loop {
            match channel.wait_close() {
                Err(e) if is_eagain(&e) => {
                    if !wait(fd, &self.session, deadline).await {
                        return Ok(None);
                    }
                }
                r => {
                    r.map_err(|e| self.session_error("closing the channel", &e))?;
                    break;
                }
            }
        }
        out.status = channel
            .exit_status()
            .map_err(|e| self.session_error("reading the exit status", &e))?;
        out.signal = channel.exit_signal().ok().and_then(|s| s.exit_signal);
        Ok(Some(out))
    }

    /// A blocking `exec` for commands run on a blocking thread (`mv`, `md5sum`, a remote
    /// export): stdout is read to the end before stderr, so a command writing more than
    /// the channel window (2 MiB) to stderr would stall until `timeout`.
    pub fn exec_blocking(&self, command: &str, timeout: Duration) -> Result<Output, SshError> {
        let previous = self.session.timeout();
        self.session.set_timeout(duration_ms(timeout));
        let result = (|| -> Result<Output, ssh2::Error> {
            let mut channel = self.session.channel_session()?;
            channel.exec(command)?;
            let mut out = Output::default();
            read_capped(&mut channel, &mut out.stdout, &mut out.truncated)?;
            read_capped(&mut channel.stderr(), &mut out.stderr, &mut out.truncated)?;
            channel.wait_close()?;
            out.status = channel.exit_status()?;
            out.signal = channel.exit_signal().ok().and_then(|s| s.exit_signal);
            Ok(out)
        })();
        self.session.set_timeout(previous);
        result.map_err(|e| {
            if is_timeout(&e) {
                SshError::CommandTimeout {
                    server: self.server.clone(),
                    command: command.to_owned(),
                    timeout,
                }
            } else {
                self.session_error("running a command", &e)
            }
        })
    }

    /// The per-call timeout set on this session.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn session_error(&self, during: &str, e: &ssh2::Error) -> SshError {
        if is_timeout(e) {
            return SshError::Timeout {
                server: self.server.clone(),
                during: "waiting for the server",
                timeout: self.timeout,
            };
        }
        SshError::Session {
            server: self.server.clone(),
            message: format!("{during}: {}", e.message()),
        }
    }

    fn io_error(&self, during: &str, e: &std::io::Error) -> SshError {
        SshError::Session {
            server: self.server.clone(),
            message: format!("{during}: {e}"),
        }
    }
}

/// Quote `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('\'');
    for c in s.chars() {
        if c == '\'' {
            q.push_str("'\\''");
        } else {
            q.push(c);
        }
    }
    q.push('\'');
    q
}

fn read_capped(
    r: &mut impl Read,
    sink: &mut Vec<u8>,
    truncated: &mut bool,
) -> Result<(), ssh2::Error> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                let room = MAX_CAPTURE.saturating_sub(sink.len());
                *truncated |= room < n;
                sink.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                let code = if e.kind() == ErrorKind::TimedOut {
                    ssh2::ErrorCode::Session(LIBSSH2_ERROR_TIMEOUT)
                } else {
                    ssh2::ErrorCode::Session(LIBSSH2_ERROR_SOCKET_RECV)
                };
                return Err(ssh2::Error::new(code, "reading command output failed"));
            }
        }
    }
}

// libssh2 error codes (libssh2.h); ssh2 does not re-export libssh2-sys.
const LIBSSH2_ERROR_SOCKET_RECV: i32 = -43;
const LIBSSH2_ERROR_TIMEOUT: i32 = -9;
const LIBSSH2_ERROR_EAGAIN: i32 = -37;

pub(crate) fn is_timeout(e: &ssh2::Error) -> bool {
    e.code() == ssh2::ErrorCode::Session(LIBSSH2_ERROR_TIMEOUT)
}

fn is_eagain(e: &ssh2::Error) -> bool {
    e.code() == ssh2::ErrorCode::Session(LIBSSH2_ERROR_EAGAIN)
}

fn duration_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
}

/// Puts the session in non-blocking mode until dropped, also when `exec` is cancelled.
struct NonBlocking<'a>(&'a Session);

impl<'a> NonBlocking<'a> {
    fn enter(session: &'a Session) -> Self {
        session.set_blocking(false);
        NonBlocking(session)
    }
}

impl Drop for NonBlocking<'_> {
    fn drop(&mut self) {
        self.0.set_blocking(true);
    }
}

/// Wait until libssh2 can make progress or the deadline passes (false).
///
/// Readiness is cleared before returning, and every libssh2 call that returns EAGAIN
/// has drained the socket first, so no wakeup is lost (tokio's readiness is
/// edge-triggered).
async fn wait(
    fd: &tokio::net::TcpStream,
    session: &Session,
    deadline: tokio::time::Instant,
) -> bool {
    let interest = match session.block_directions() {
        BlockDirections::Outbound => Interest::WRITABLE,
        BlockDirections::Both => Interest::READABLE | Interest::WRITABLE,
        BlockDirections::Inbound | BlockDirections::None => Interest::READABLE,
    };
    match tokio::time::timeout_at(deadline, fd.ready(interest)).await {
        Ok(Ok(_)) => {
            // A WouldBlock from try_io is how tokio clears the readiness just reported.
            let _ = fd.try_io(interest, || Err::<(), _>(ErrorKind::WouldBlock.into()));
            true
        }
        // A registration error is not a timeout: let the next libssh2 call report the
        // real problem instead of spinning.
        Ok(Err(_)) => true,
        Err(_) => false,
    }
}

fn tcp_connect(p: &SshParams, server: &str) -> Result<TcpStream, SshError> {
    let addrs = (p.host.as_str(), p.port)
        .to_socket_addrs()
        .map_err(|e| SshError::Connect {
            server: server.to_owned(),
            message: format!("cannot resolve host: {e}"),
        })?;
    let mut last: Option<std::io::Error> = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, p.timeout) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) if e.kind() == ErrorKind::TimedOut => SshError::Timeout {
            server: server.to_owned(),
            during: "connecting",
            timeout: p.timeout,
        },
        Some(e) => SshError::Connect {
            server: server.to_owned(),
            message: e.to_string(),
        },
        None => SshError::Connect {
            server: server.to_owned(),
            message: "host name resolved to no address".into(),
        },
    })
}

/// `SHA256:<base64>` as printed by OpenSSH.
fn fingerprint(session: &Session) -> String {
    use base64::Engine as _;
    session.host_key_hash(ssh2::HashType::Sha256).map_or_else(
        || "an unknown key".to_owned(),
        |h| {
            format!(
                "SHA256:{}",
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(h)
            )
        },
    )
}

fn key_type_name(t: HostKeyType) -> Option<&'static str> {
    Some(match t {
        HostKeyType::Rsa => "ssh-rsa",
        HostKeyType::Dss => "ssh-dss",
        HostKeyType::Ecdsa256 => "ecdsa-sha2-nistp256",
        HostKeyType::Ecdsa384 => "ecdsa-sha2-nistp384",
        HostKeyType::Ecdsa521 => "ecdsa-sha2-nistp521",
        HostKeyType::Ed25519 => "ssh-ed25519",
        HostKeyType::Unknown => return None,
    })
}

/// The host as known_hosts writes it: `host`, or `[host]:port` off port 22.
fn known_hosts_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

fn check_host_key(session: &Session, p: &SshParams, server: &str) -> Result<(), SshError> {
    let (key, key_type) = session.host_key().ok_or_else(|| SshError::Connect {
        server: server.to_owned(),
        message: "the server sent no host key".into(),
    })?;
    let kh_err = |message: String| SshError::KnownHosts {
        path: p.known_hosts.clone(),
        message,
    };
    let mut kh = session
        .known_hosts()
        .map_err(|e| kh_err(e.message().to_owned()))?;
    match fs_err::read_to_string(&p.known_hosts) {
        Ok(text) => {
            // Line by line: libssh2's read_file gives up on the first line it cannot
            // parse (e.g. @cert-authority or sk-* keys), which would hide later entries.
            for line in text.lines() {
                let trimmed = line.trim();
                if trimmed.is_empty() || trimmed.starts_with('#') {
                    continue;
                }
                if kh.read_str(trimmed, KnownHostFileKind::OpenSSH).is_err() {
                    tracing::debug!(file = %p.known_hosts.display(), "skipping a known_hosts line libssh2 cannot parse");
                }
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(kh_err(e.to_string())),
    }
    match kh.check_port(&p.host, p.port, key) {
        CheckResult::Match => Ok(()),
        CheckResult::Mismatch => Err(SshError::HostKeyMismatch {
            server: server.to_owned(),
            known_hosts: p.known_hosts.clone(),
            fingerprint: fingerprint(session),
        }),
        CheckResult::Failure => Err(kh_err(format!(
            "cannot check the host key of {server} against this file"
        ))),
        CheckResult::NotFound => match p.host_key_policy {
            HostKeyPolicy::Strict => Err(SshError::HostKeyUnknown {
                server: server.to_owned(),
                known_hosts: p.known_hosts.clone(),
                fingerprint: fingerprint(session),
            }),
            HostKeyPolicy::AcceptNew => {
                let type_name = key_type_name(key_type).ok_or_else(|| {
                    kh_err(format!("{server} offers a host key of an unknown type"))
                })?;
                append_known_host(
                    &p.known_hosts,
                    &known_hosts_name(&p.host, p.port),
                    type_name,
                    key,
                )
                .map_err(|e| kh_err(format!("cannot add {server}: {e}")))?;
                tracing::warn!(
                    server,
                    fingerprint = %fingerprint(session),
                    file = %p.known_hosts.display(),
                    "added a new host key to known_hosts (host_key_policy = accept-new)"
                );
                Ok(())
            }
        },
    }
}

/// Append one line; appending (not rewriting through libssh2) keeps entries libssh2
/// cannot parse and the user's comments intact.
fn append_known_host(path: &Path, host: &str, type_name: &str, key: &[u8]) -> std::io::Result<()> {
    use base64::Engine as _;
    use std::io::Write as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs_err::create_dir_all(dir)?;
    }
    let needs_newline = fs_err::read(path).is_ok_and(|b| b.last().is_some_and(|&c| c != b'\n'));
    let mut line = String::new();
    if needs_newline {
        line.push('\n');
    }
    let _ = writeln!(
        line,
        "{host} {type_name} {}",
        base64::engine::general_purpose::STANDARD.encode(key)
    );
    let mut f = fs_err::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(line.as_bytes())?;
    f.sync_all()
}

fn authenticate(session: &Session, p: &SshParams, server: &str) -> Result<(), SshError> {
    let mut failures: Vec<String> = Vec::new();
    let timeout = |during| SshError::Timeout {
        server: server.to_owned(),
        during,
        timeout: p.timeout,
    };
    if let Some(key) = &p.key_file {
        if !key.is_file() {
            return Err(SshError::Config {
                server: server.to_owned(),
                message: format!("key file {} does not exist", key.display()),
            });
        }
        match session.userauth_pubkey_file(
            &p.user,
            None,
            key,
            p.key_passphrase.as_ref().map(Secret::expose),
        ) {
            Ok(()) => {}
            Err(e) if is_timeout(&e) => return Err(timeout("authenticating with a key")),
            Err(e) => failures.push(format!("key {}: {}", key.display(), e.message())),
        }
    }
    if !session.authenticated()
        && let Some(password) = &p.password
    {
        match session.userauth_password(&p.user, password.expose()) {
            Ok(()) => {}
            Err(e) if is_timeout(&e) => return Err(timeout("authenticating with a password")),
            // libssh2's message names neither user nor password; keep it generic.
            Err(_) => failures.push("password rejected".into()),
        }
    }
    if session.authenticated() {
        return Ok(());
    }
    if p.key_file.is_none() && p.password.is_none() {
        return Err(SshError::Config {
            server: server.to_owned(),
            message: format!("no key_file or password configured for user {}", p.user),
        });
    }
    Err(SshError::Auth {
        server: server.to_owned(),
        user: p.user.clone(),
        message: failures.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn known_hosts_names_follow_openssh() {
        assert_eq!(known_hosts_name("h", 22), "h");
        assert_eq!(known_hosts_name("127.0.0.1", 2222), "[127.0.0.1]:2222");
    }

    #[test]
    fn exit_classes() {
        let e = SshError::Connect {
            server: "h:22".into(),
            message: "refused".into(),
        };
        assert_eq!(e.exit(), Exit::TempFail);
        let e = SshError::HostKeyMismatch {
            server: "h:22".into(),
            known_hosts: "/k".into(),
            fingerprint: "SHA256:x".into(),
        };
        assert_eq!(e.exit(), Exit::Config);
    }

    #[test]
    fn connection_refused_names_the_server() {
        // Port 1 on loopback: nothing listens there in any sane test environment.
        let p = SshParams {
            host: "127.0.0.1".into(),
            port: 1,
            user: "u".into(),
            key_file: None,
            key_passphrase: None,
            password: Some(Secret::new("hunter2")),
            known_hosts: "/nonexistent/known_hosts".into(),
            host_key_policy: HostKeyPolicy::Strict,
            timeout: Duration::from_secs(5),
        };
        let err = SshSession::connect_blocking(&p).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("127.0.0.1:1"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
        assert_eq!(err.exit(), Exit::TempFail);
    }
}

impl crate::exit::ExitClass for SshError {
    fn exit_class(&self) -> Exit {
        self.exit()
    }

    fn is_transient(&self) -> bool {
        !matches!(self, SshError::GaveUp { .. }) && self.exit() == Exit::TempFail
    }
}

impl crate::retry::GiveUp for SshError {
    fn gave_up(attempts: u32, last: Self) -> Self {
        SshError::GaveUp {
            attempts,
            last: Box::new(last),
        }
    }
}
crate::exit_class!(SshError);
