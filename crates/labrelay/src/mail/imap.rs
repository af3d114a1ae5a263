//! A blocking IMAP client for reading mail: log in, select, search by UID, fetch raw
//! messages, flag, move, IDLE.
//!
//! Blocking because the imap crate is; an async tool runs it on a blocking thread
//! (`tokio::task::spawn_blocking`), typically the whole watch loop there. Every network
//! read and write has the configured timeout, IDLE included, so a dead server turns into
//! an error (exit 75) instead of a hang.
//!
//! The socket is opened here rather than by the imap crate's builder, which connects
//! without a timeout; TLS is the crate's own rustls connector with the system's root
//! certificates, plus those of `[imap] ca_file` (a private CA) when set. A certificate
//! that none of them vouches for is refused (exit 78), never accepted.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use ::imap::extensions::idle::SetReadTimeout;
use ::imap::types::UnsolicitedResponse;
use base64::Engine as _;
use rustls_connector::{RustlsConnectorConfig, TlsStream};

use super::MailError;
use crate::config::{CaCerts, ImapConfig, TlsMode};

/// A message flag.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Flag {
    /// `\Seen`.
    Seen,
    /// `\Answered`.
    Answered,
    /// `\Flagged`.
    Flagged,
    /// `\Deleted`.
    Deleted,
    /// `\Draft`.
    Draft,
    /// A keyword, e.g. `$Processed` (an IMAP atom: no spaces, parentheses or quotes).
    Keyword(String),
}

impl Flag {
    fn as_imap(&self) -> Result<String, MailError> {
        Ok(match self {
            Flag::Seen => "\\Seen".to_owned(),
            Flag::Answered => "\\Answered".to_owned(),
            Flag::Flagged => "\\Flagged".to_owned(),
            Flag::Deleted => "\\Deleted".to_owned(),
            Flag::Draft => "\\Draft".to_owned(),
            Flag::Keyword(k) => {
                let atom = !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_graphic() && !"(){%*\"\\]".contains(c))
                    && !k.starts_with('\\');
                if !atom {
                    return Err(MailError::InvalidMessage(format!(
                        "IMAP keyword {k:?} must be an atom (ASCII, no spaces, ( ) {{ % * \" \\ ])"
                    )));
                }
                k.clone()
            }
        })
    }

    fn from_imap(f: &::imap::types::Flag<'_>) -> Option<Flag> {
        use ::imap::types::Flag as F;
        Some(match f {
            F::Seen => Flag::Seen,
            F::Answered => Flag::Answered,
            F::Flagged => Flag::Flagged,
            F::Deleted => Flag::Deleted,
            F::Draft => Flag::Draft,
            F::Custom(s) => Flag::Keyword(s.to_string()),
            _ => return None,
        })
    }
}

/// How [`ImapClient::move_to`] moved a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveMethod {
    /// `UID MOVE` (RFC 6851).
    Move,
    /// `UID COPY`, `\Deleted`, `UID EXPUNGE` of that message only (UIDPLUS).
    CopyUidExpunge,
    /// `UID COPY`, `\Deleted`, `EXPUNGE`: also removes other messages already marked
    /// `\Deleted` in the folder (servers without MOVE and UIDPLUS).
    CopyExpunge,
}

/// What SELECT reported about a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxInfo {
    /// Number of messages.
    pub exists: u32,
    /// UIDVALIDITY: UIDs stored from an earlier session are valid only while it is unchanged.
    pub uid_validity: Option<u32>,
    /// The UID the next message will get.
    pub uid_next: Option<u32>,
}

/// Quote a string for an IMAP command (`"…"` with `\` and `"` escaped), for search
/// values: `client.uid_search(&format!("SUBJECT {}", quote(token)))`. Line breaks are
/// removed; they cannot be quoted.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\r' | '\n' => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A folder name in IMAP's modified UTF-7 (RFC 3501 5.1.3): `已处理` → `&XfJZBHQG-`.
/// ASCII names are unchanged except `&` → `&-`.
pub fn encode_mailbox_name(name: &str) -> String {
    fn flush(buf: &mut Vec<u16>, out: &mut String) {
        if buf.is_empty() {
            return;
        }
        let bytes: Vec<u8> = buf.iter().flat_map(|u| u.to_be_bytes()).collect();
        let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
        out.push('&');
        out.push_str(&b64.replace('/', ","));
        out.push('-');
        buf.clear();
    }
    let mut out = String::with_capacity(name.len());
    let mut buf = Vec::new();
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut buf, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut units = [0u16; 2];
            buf.extend_from_slice(c.encode_utf16(&mut units));
        }
    }
    flush(&mut buf, &mut out);
    out
}

/// Plain or TLS TCP.
enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// The socket under the imap crate.
struct ImapStream {
    inner: Transport,
    timeout: Duration,
    /// Called once when the server has accepted IDLE ([`ImapClient::idle_notify`]);
    /// shared with the client, which cannot reach the stream inside the session.
    on_idle: IdleHook,
}

type IdleHook = std::sync::Arc<std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>>;

impl ImapStream {
    fn tcp(&self) -> &TcpStream {
        match &self.inner {
            Transport::Plain(t) => t,
            Transport::Tls(t) => t.get_ref(),
        }
    }
}

impl Read for ImapStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.inner {
            Transport::Plain(t) => t.read(buf),
            Transport::Tls(t) => t.read(buf),
        }
    }
}

impl Write for ImapStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.inner {
            Transport::Plain(t) => t.write(buf),
            Transport::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.inner {
            Transport::Plain(t) => t.flush(),
            Transport::Tls(t) => t.flush(),
        }
    }
}

impl SetReadTimeout for ImapStream {
    // The imap crate sets the IDLE interval before waiting and `None` afterwards; `None`
    // would leave later commands without any timeout, so it means "our timeout" here.
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> ::imap::Result<()> {
        // The imap crate sets the IDLE interval right after the server's "+ idling"
        // continuation: from here on, new mail is announced.
        if timeout.is_some()
            && let Some(ready) = self.on_idle.lock().ok().and_then(|mut h| h.take())
        {
            ready();
        }
        self.tcp()
            .set_read_timeout(Some(timeout.unwrap_or(self.timeout)))
            .map_err(::imap::Error::Io)
    }
}

/// A logged-in IMAP session. Blocking; see the module documentation.
pub struct ImapClient {
    session: ::imap::Session<ImapStream>,
    server: String,
    user: String,
    capabilities: ::imap::types::Capabilities,
    selected: Option<String>,
    on_idle: IdleHook,
}

impl std::fmt::Debug for ImapClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImapClient")
            .field("server", &self.server)
            .field("user", &self.user)
            .field("selected", &self.selected)
            .finish_non_exhaustive()
    }
}

fn default_port(mode: TlsMode) -> u16 {
    match mode {
        TlsMode::Tls => 993,
        TlsMode::None | TlsMode::Starttls => 143,
    }
}

fn io_error(server: &str, what: &str, e: &std::io::Error) -> MailError {
    MailError::Connect {
        server: server.to_owned(),
        message: format!("{what}: {e}"),
    }
}

/// TCP connect to the first address that answers within `timeout`, with read and write
/// timeouts set.
fn tcp_connect(
    host: &str,
    port: u16,
    timeout: Duration,
    server: &str,
) -> Result<TcpStream, MailError> {
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| io_error(server, "resolving", &e))?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(tcp) => {
                tcp.set_read_timeout(Some(timeout))
                    .and_then(|()| tcp.set_write_timeout(Some(timeout)))
                    .map_err(|e| io_error(server, "connecting", &e))?;
                return Ok(tcp);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => io_error(server, "connecting", &e),
        None => MailError::Connect {
            server: server.to_owned(),
            message: format!("{host} resolves to no address"),
        },
    })
}

fn tls_wrap(
    tcp: TcpStream,
    host: &str,
    server: &str,
    ca: Option<&CaCerts>,
) -> Result<Transport, MailError> {
    let mut roots = RustlsConnectorConfig::new_with_native_certs().map_err(|e| {
        MailError::Config(format!(
            "TLS for IMAP server {server}: root certificates: {e}"
        ))
    })?;
    if let Some(ca) = ca {
        // Each certificate was checked to be a usable trust anchor when it was loaded.
        roots.add_parsable_certificates(ca.der.clone());
    }
    let connector = roots.connector_with_no_client_auth();
    let tls = connector.connect(host, tcp).map_err(|e| {
        let message = e.to_string();
        // A certificate the system does not trust, or for another name, will not get
        // better by retrying: that is configuration.
        if message.to_ascii_lowercase().contains("certificate") {
            MailError::Config(format!("TLS with IMAP server {server}: {message}"))
        } else {
            MailError::Connect {
                server: server.to_owned(),
                message: format!("TLS handshake: {message}"),
            }
        }
    })?;
    Ok(Transport::Tls(Box::new(tls)))
}

/// One CRLF-terminated line, read byte by byte so nothing after it is consumed (the TLS
/// handshake follows the STARTTLS reply).
fn read_line(stream: &mut TcpStream, server: &str) -> Result<String, MailError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = stream
            .read(&mut byte)
            .map_err(|e| io_error(server, "STARTTLS", &e))?;
        if n == 0 {
            return Err(MailError::Connect {
                server: server.to_owned(),
                message: "connection closed during STARTTLS".to_owned(),
            });
        }
        line.push(byte[0]);
        if byte[0] == b'\n' || line.len() > 8192 {
            return Ok(String::from_utf8_lossy(&line).trim_end().to_owned());
        }
    }
}

/// Greeting and `STARTTLS` on the plain socket; the caller does the handshake.
fn starttls(stream: &mut TcpStream, server: &str) -> Result<(), MailError> {
    let greeting = read_line(stream, server)?;
    if !greeting.starts_with("* OK") {
        return Err(MailError::Connect {
            server: server.to_owned(),
            message: format!("unexpected greeting: {greeting}"),
        });
    }
    stream
        .write_all(b"S0 STARTTLS\r\n")
        .and_then(|()| stream.flush())
        .map_err(|e| io_error(server, "STARTTLS", &e))?;
    loop {
        let line = read_line(stream, server)?;
        if let Some(status) = line.strip_prefix("S0 ") {
            if !status.to_ascii_uppercase().starts_with("OK") {
                return Err(MailError::Config(format!(
                    "IMAP server {server} refused STARTTLS ({status}); set security = \"tls\" or \"none\""
                )));
            }
            return Ok(());
        }
    }
}

impl ImapClient {
    /// Connect, log in with the configured password and read the capabilities. Selects
    /// nothing: call [`ImapClient::select`] (usually with `cfg.folder`).
    ///
    /// A server that cannot be reached (or answers a temporary failure) is tried again
    /// under [`crate::retry::policy`]; a refused login or a TLS problem is not.
    pub fn connect(cfg: &ImapConfig) -> Result<ImapClient, MailError> {
        let port = cfg.port.unwrap_or_else(|| default_port(cfg.security));
        crate::retry::run_blocking(
            crate::retry::policy(),
            || format!("connecting to IMAP server {}:{port}", cfg.host),
            |_| ImapClient::connect_once(cfg),
        )
        .map(|done| done.value)
        .map_err(crate::retry::Failed::into_error)
    }

    fn connect_once(cfg: &ImapConfig) -> Result<ImapClient, MailError> {
        let port = cfg.port.unwrap_or_else(|| default_port(cfg.security));
        let server = format!("{}:{port}", cfg.host);
        let password = cfg.password.resolve()?;
        let timeout = Duration::from_secs(cfg.timeout_secs.max(1));
        // Checked before connecting, so a bad file is a configuration error whatever
        // the server's state.
        let ca = CaCerts::load_optional("imap.ca_file", cfg.ca_file.as_deref())
            .map_err(|e| MailError::Config(e.to_string()))?;

        let mut tcp = tcp_connect(&cfg.host, port, timeout, &server)?;
        let (transport, greeted) = match cfg.security {
            TlsMode::None => (Transport::Plain(tcp), false),
            TlsMode::Tls => (tls_wrap(tcp, &cfg.host, &server, ca.as_ref())?, false),
            TlsMode::Starttls => {
                starttls(&mut tcp, &server)?;
                (tls_wrap(tcp, &cfg.host, &server, ca.as_ref())?, true)
            }
        };

        let on_idle = IdleHook::default();
        let mut client = ::imap::Client::new(ImapStream {
            inner: transport,
            timeout,
            on_idle: on_idle.clone(),
        });
        if greeted {
            client.greeting_read = true;
        } else {
            let greeting = client
                .read_greeting()
                .map_err(|e| imap_error(&server, "greeting", e))?;
            if !greeting.starts_with(b"* OK") && !greeting.starts_with(b"* PREAUTH") {
                return Err(MailError::Connect {
                    server,
                    message: format!(
                        "unexpected greeting: {}",
                        String::from_utf8_lossy(&greeting).trim_end()
                    ),
                });
            }
        }

        let mut session =
            client
                .login(&cfg.username, password.expose())
                .map_err(|(e, _)| match e {
                    ::imap::Error::No(ref r) => MailError::Auth {
                        server: server.clone(),
                        user: cfg.username.clone(),
                        message: r.to_string(),
                    },
                    ::imap::Error::Bad(ref r) => MailError::Auth {
                        server: server.clone(),
                        user: cfg.username.clone(),
                        message: r.to_string(),
                    },
                    // A line break in the password: say so without showing it.
                    ::imap::Error::Validate(_) => MailError::Config(format!(
                        "IMAP password of {} contains a line break",
                        cfg.username
                    )),
                    e => imap_error(&server, "LOGIN", e),
                })?;
        let capabilities = session
            .capabilities()
            .map_err(|e| imap_error(&server, "CAPABILITY", e))?;
        let client = ImapClient {
            session,
            server,
            user: cfg.username.clone(),
            capabilities,
            selected: None,
            on_idle,
        };
        tracing::debug!(server = %client.server, user = %client.user, "IMAP login ok");
        Ok(client)
    }

    /// Whether the server advertised capability `name` after login (`IDLE`, `MOVE`,
    /// `UIDPLUS`; servers write them in capitals).
    pub fn has_capability(&self, name: &str) -> bool {
        self.capabilities.has_str(name) || self.capabilities.has_str(name.to_ascii_uppercase())
    }

    fn err(&self, command: &str, e: ::imap::Error) -> MailError {
        imap_error(&self.server, command, e)
    }

    fn folder(&self) -> String {
        self.selected.clone().unwrap_or_default()
    }

    /// Select a folder (a Unicode name; encoded as modified UTF-7).
    pub fn select(&mut self, folder: &str) -> Result<MailboxInfo, MailError> {
        let mb = self
            .session
            .select(encode_mailbox_name(folder))
            .map_err(|e| imap_error(&self.server, &format!("SELECT {folder}"), e))?;
        self.selected = Some(folder.to_owned());
        Ok(MailboxInfo {
            exists: mb.exists,
            uid_validity: mb.uid_validity,
            uid_next: mb.uid_next,
        })
    }

    /// `UID SEARCH query` in the selected folder, UIDs ascending. The query is IMAP
    /// search syntax (`UNSEEN`, `SINCE 1-Mar-2024`, `HEADER Message-ID "<…>"`); put
    /// values through [`quote`].
    pub fn uid_search(&mut self, query: &str) -> Result<Vec<u32>, MailError> {
        let set = self
            .session
            .uid_search(query)
            .map_err(|e| self.err(&format!("UID SEARCH {query}"), e))?;
        let mut uids: Vec<u32> = set.into_iter().collect();
        uids.sort_unstable();
        Ok(uids)
    }

    /// UIDs of messages with this Message-ID (with or without angle brackets).
    pub fn search_message_id(&mut self, message_id: &str) -> Result<Vec<u32>, MailError> {
        let id = super::message::bracket_id(message_id);
        self.uid_search(&format!("HEADER Message-ID {}", quote(&id)))
    }

    /// The whole message, as stored. Uses `BODY.PEEK[]`, so `\Seen` is not set: mark
    /// messages with [`ImapClient::add_flags`] once they are processed.
    pub fn fetch_raw(&mut self, uid: u32) -> Result<Vec<u8>, MailError> {
        let fetches = self
            .session
            .uid_fetch(uid.to_string(), "(UID BODY.PEEK[])")
            .map_err(|e| self.err(&format!("UID FETCH {uid}"), e))?;
        fetches
            .iter()
            .find(|f| f.uid == Some(uid))
            .and_then(|f| f.body())
            .map(<[u8]>::to_vec)
            .ok_or_else(|| MailError::NoSuchMessage {
                uid,
                folder: self.folder(),
            })
    }

    /// The flags of a message.
    pub fn flags(&mut self, uid: u32) -> Result<Vec<Flag>, MailError> {
        let fetches = self
            .session
            .uid_fetch(uid.to_string(), "(UID FLAGS)")
            .map_err(|e| self.err(&format!("UID FETCH {uid} FLAGS"), e))?;
        let f = fetches.iter().find(|f| f.uid == Some(uid)).ok_or_else(|| {
            MailError::NoSuchMessage {
                uid,
                folder: self.folder(),
            }
        })?;
        Ok(f.flags().iter().filter_map(Flag::from_imap).collect())
    }

    fn store(&mut self, uid: u32, op: &str, flags: &[Flag]) -> Result<(), MailError> {
        if flags.is_empty() {
            return Ok(());
        }
        let list = flags
            .iter()
            .map(Flag::as_imap)
            .collect::<Result<Vec<_>, _>>()?
            .join(" ");
        self.session
            .uid_store(uid.to_string(), format!("{op} ({list})"))
            .map_err(|e| self.err(&format!("UID STORE {uid} {op} ({list})"), e))?;
        Ok(())
    }

    /// Add flags to a message.
    pub fn add_flags(&mut self, uid: u32, flags: &[Flag]) -> Result<(), MailError> {
        self.store(uid, "+FLAGS.SILENT", flags)
    }

    /// Remove flags from a message.
    pub fn remove_flags(&mut self, uid: u32, flags: &[Flag]) -> Result<(), MailError> {
        self.store(uid, "-FLAGS.SILENT", flags)
    }

    fn require_exists(&mut self, uid: u32) -> Result<(), MailError> {
        if self.uid_search(&format!("UID {uid}"))?.contains(&uid) {
            Ok(())
        } else {
            Err(MailError::NoSuchMessage {
                uid,
                folder: self.folder(),
            })
        }
    }

    /// Remove one message: `\Deleted`, then `UID EXPUNGE` (or `EXPUNGE` without UIDPLUS,
    /// which also removes other messages already marked `\Deleted`).
    pub fn delete(&mut self, uid: u32) -> Result<(), MailError> {
        self.require_exists(uid)?;
        self.add_flags(uid, &[Flag::Deleted])?;
        self.expunge_one(uid).map(|_| ())
    }

    fn expunge_one(&mut self, uid: u32) -> Result<bool, MailError> {
        if self.has_capability("UIDPLUS") {
            self.session
                .uid_expunge(uid.to_string())
                .map_err(|e| self.err(&format!("UID EXPUNGE {uid}"), e))?;
            Ok(true)
        } else {
            self.session.expunge().map_err(|e| self.err("EXPUNGE", e))?;
            Ok(false)
        }
    }

    /// Move a message to `folder` (which must exist; see
    /// [`ImapClient::create_folder_if_missing`]): `UID MOVE` when the server has MOVE,
    /// else [`ImapClient::copy_and_expunge`].
    pub fn move_to(&mut self, uid: u32, folder: &str) -> Result<MoveMethod, MailError> {
        if !self.has_capability("MOVE") {
            return self.copy_and_expunge(uid, folder);
        }
        self.require_exists(uid)?;
        self.session
            .uid_mv(uid.to_string(), encode_mailbox_name(folder))
            .map_err(|e| self.err(&format!("UID MOVE {uid} {folder}"), e))?;
        Ok(MoveMethod::Move)
    }

    /// Move without the MOVE extension: `UID COPY`, `\Deleted`, then `UID EXPUNGE` with
    /// UIDPLUS or `EXPUNGE` without.
    pub fn copy_and_expunge(&mut self, uid: u32, folder: &str) -> Result<MoveMethod, MailError> {
        self.require_exists(uid)?;
        self.session
            .uid_copy(uid.to_string(), encode_mailbox_name(folder))
            .map_err(|e| self.err(&format!("UID COPY {uid} {folder}"), e))?;
        self.add_flags(uid, &[Flag::Deleted])?;
        Ok(if self.expunge_one(uid)? {
            MoveMethod::CopyUidExpunge
        } else {
            MoveMethod::CopyExpunge
        })
    }

    /// Create `folder` unless it exists; `true` if it was created.
    pub fn create_folder_if_missing(&mut self, folder: &str) -> Result<bool, MailError> {
        let name = encode_mailbox_name(folder);
        if self.folder_exists_encoded(&name)? {
            return Ok(false);
        }
        match self.session.create(&name) {
            Ok(()) => Ok(true),
            // Another process created it between LIST and CREATE.
            Err(::imap::Error::No(_)) if self.folder_exists_encoded(&name)? => Ok(false),
            Err(e) => Err(self.err(&format!("CREATE {folder}"), e)),
        }
    }

    /// Whether `folder` exists.
    pub fn folder_exists(&mut self, folder: &str) -> Result<bool, MailError> {
        self.folder_exists_encoded(&encode_mailbox_name(folder))
    }

    fn folder_exists_encoded(&mut self, name: &str) -> Result<bool, MailError> {
        let names = self
            .session
            .list(Some(""), Some(name))
            .map_err(|e| self.err(&format!("LIST {name}"), e))?;
        Ok(names.iter().any(|n| n.name() == name))
    }

    /// Delete a folder and its messages.
    pub fn delete_folder(&mut self, folder: &str) -> Result<(), MailError> {
        if self.selected.as_deref() == Some(folder) {
            self.session.close().map_err(|e| self.err("CLOSE", e))?;
            self.selected = None;
        }
        self.session
            .delete(encode_mailbox_name(folder))
            .map_err(|e| self.err(&format!("DELETE {folder}"), e))
    }

    /// Store a message in `folder` (a copy in Sent, a fixture), with flags.
    pub fn append(
        &mut self,
        folder: &str,
        message: &[u8],
        flags: &[Flag],
    ) -> Result<(), MailError> {
        let name = encode_mailbox_name(folder);
        let flags = flags
            .iter()
            .map(|f| f.as_imap().map(::imap::types::Flag::from))
            .collect::<Result<Vec<_>, _>>()?;
        self.session
            .append(&name, message)
            .flags(flags)
            .finish()
            .map_err(|e| imap_error(&self.server, &format!("APPEND {folder}"), e))?;
        Ok(())
    }

    /// Wait up to about `timeout` for new mail in the selected folder; `true` when a
    /// message arrived (or had arrived unnoticed since the last command). Uses IDLE, or
    /// NOOP every few seconds on a server without it. Other changes (flags, expunges by
    /// other sessions) do not end the wait.
    pub fn idle(&mut self, timeout: Duration) -> Result<bool, MailError> {
        self.idle_notify(timeout, || {})
    }

    /// [`idle`](Self::idle), calling `ready` once the server has accepted IDLE (from
    /// then on it announces new mail). `ready` is not called when the wait ends without
    /// IDLE: mail noticed before, or a server without IDLE (polled with NOOP).
    pub fn idle_notify(
        &mut self,
        timeout: Duration,
        ready: impl FnOnce() + Send + 'static,
    ) -> Result<bool, MailError> {
        // Responses that came with earlier commands are queued in the session; an EXISTS
        // among them is mail IDLE would not announce again.
        if self.take_new_mail_notices() {
            return Ok(true);
        }
        if !self.has_capability("IDLE") {
            return self.poll(timeout);
        }
        let deadline = Instant::now() + timeout;
        let mut new_mail = false;
        if let Ok(mut hook) = self.on_idle.lock() {
            *hook = Some(Box::new(ready));
        }
        let result = {
            let mut handle = self.session.idle();
            handle.timeout(timeout).keepalive(false);
            handle.wait_while(|r| {
                if matches!(r, UnsolicitedResponse::Exists(_)) {
                    new_mail = true;
                    return false;
                }
                Instant::now() < deadline
            })
        };
        if let Ok(mut hook) = self.on_idle.lock() {
            *hook = None;
        }
        match result {
            Ok(_) => Ok(new_mail || self.take_new_mail_notices()),
            Err(e) => Err(self.err("IDLE", e)),
        }
    }

    fn take_new_mail_notices(&mut self) -> bool {
        self.session
            .take_all_unsolicited()
            // The queue is emptied by the call, not by iterating, so `any` may stop early.
            .any(|r| matches!(r, UnsolicitedResponse::Exists(_)))
    }

    fn poll(&mut self, timeout: Duration) -> Result<bool, MailError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.session.noop().map_err(|e| self.err("NOOP", e))?;
            if self.take_new_mail_notices() {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            std::thread::sleep(left.min(Duration::from_secs(5)));
        }
    }

    /// Log out politely. Dropping the client closes the connection too.
    pub fn logout(mut self) -> Result<(), MailError> {
        self.session.logout().map_err(|e| self.err("LOGOUT", e))
    }
}

fn imap_error(server: &str, command: &str, e: ::imap::Error) -> MailError {
    let server = server.to_owned();
    match e {
        ::imap::Error::Io(io) => MailError::Connect {
            server,
            message: format!("{command}: {io}"),
        },
        ::imap::Error::ConnectionLost => MailError::Connect {
            server,
            message: format!("{command}: connection lost"),
        },
        ::imap::Error::Bye(b) => MailError::Connect {
            server,
            message: format!("{command}: server closed the session: {b}"),
        },
        ::imap::Error::No(r) => MailError::Rejected {
            server,
            message: format!("{command}: {r}"),
        },
        ::imap::Error::Bad(r) => MailError::Rejected {
            server,
            message: format!("{command}: {r}"),
        },
        ::imap::Error::Validate(v) => MailError::InvalidMessage(format!("{command}: {v}")),
        e => MailError::Protocol {
            server,
            message: format!("{command}: {e}"),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn mailbox_names_use_modified_utf7() {
        assert_eq!(encode_mailbox_name("INBOX"), "INBOX");
        assert_eq!(encode_mailbox_name("R&D"), "R&-D");
        // RFC 3501's own example.
        assert_eq!(
            encode_mailbox_name("~peter/mail/台北/日本語"),
            "~peter/mail/&U,BTFw-/&ZeVnLIqe-"
        );
        assert_eq!(encode_mailbox_name("已处理"), "&XfJZBHQG-");
    }

    #[test]
    fn quote_escapes() {
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(quote("x\r\ny"), "\"xy\"");
    }

    #[test]
    fn keywords_must_be_atoms() {
        assert_eq!(
            Flag::Keyword("$Processed".into()).as_imap().unwrap(),
            "$Processed"
        );
        assert!(Flag::Keyword("two words".into()).as_imap().is_err());
        assert!(Flag::Keyword("a)".into()).as_imap().is_err());
        assert_eq!(Flag::Seen.as_imap().unwrap(), "\\Seen");
    }

    #[test]
    fn unreachable_server_is_temporary_and_password_free() {
        // Port 1 on loopback: nothing listens there.
        let cfg = ImapConfig {
            host: "127.0.0.1".into(),
            port: Some(1),
            security: TlsMode::None,
            username: "u".into(),
            password: crate::secret::SecretSpec::parse("hunter2-imap"),
            folder: "INBOX".into(),
            timeout_secs: 5,
            ca_file: None,
        };
        let err = ImapClient::connect(&cfg).unwrap_err();
        assert_eq!(err.exit(), crate::exit::Exit::TempFail, "{err}");
        assert!(!err.to_string().contains("hunter2"));
    }
}
