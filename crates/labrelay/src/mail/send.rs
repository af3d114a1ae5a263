//! Delivering messages: SMTP with lettre, or the outbox directory.
//!
//! Internationalised addresses: a Unicode domain is sent as punycode (see
//! [`ascii_domain`](super::message::ascii_domain)), so it works with any server. A
//! Unicode name before the `@` (`用户@example.org`) needs SMTPUTF8 (RFC 6531): lettre
//! uses it when the server offers it and otherwise sends nothing; that refusal is
//! reported as [`MailError::Rejected`] naming the addresses. Raw 8-bit addresses never
//! go to a server that did not ask for them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lettre::address::{Address, Envelope};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::message::OutgoingMail;
use super::{MailError, outbox};
use crate::config::{CaCerts, SmtpConfig, TlsMode};

/// Where messages go: an SMTP server, or `.eml` files in the outbox directory.
///
/// Built once per run with [`Mailer::from_config`] (which resolves the password, so a
/// missing secret stops the tool before any work) and shared; every send opens its own
/// SMTP connection.
#[derive(Clone)]
pub enum Mailer {
    /// Send through an SMTP server.
    Smtp(Box<SmtpMailer>),
    /// Write `.eml` files into this directory: each is the message as SMTP would have
    /// carried it, preceded by [`ENVELOPE_FROM_HEADER`](super::ENVELOPE_FROM_HEADER) and
    /// [`ENVELOPE_TO_HEADER`](super::ENVELOPE_TO_HEADER) (Bcc recipients appear only
    /// there), named `<UTC timestamp>-<Message-ID>.eml` and created atomically. A
    /// message whose Message-ID already has a file is not written again: the send
    /// returns that file (a re-run after a crash must not queue a second mail).
    Outbox(PathBuf),
}

/// An SMTP connection recipe (server, TLS, credentials, timeout).
#[derive(Clone)]
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    server: String,
    user: Option<String>,
}

impl std::fmt::Debug for SmtpMailer {
    // The transport holds the credentials; show only what is safe.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpMailer")
            .field("server", &self.server)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mailer::Smtp(s) => f.debug_tuple("Smtp").field(s).finish(),
            Mailer::Outbox(p) => f.debug_tuple("Outbox").field(p).finish(),
        }
    }
}

/// What a successful send produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMail {
    /// The Message-ID, with angle brackets.
    pub message_id: String,
    /// The envelope recipients.
    pub recipients: Vec<String>,
    /// The outbox file, when the message went to the outbox.
    pub outbox_path: Option<PathBuf>,
    /// The SMTP server's final reply (`250 2.0.0 Ok: queued as …`), when sent by SMTP.
    pub server_reply: Option<String>,
    /// SMTP transactions it took: temporary failures (unreachable server, 4xx replies)
    /// are retried under [`crate::retry::policy`]; 1 for the outbox.
    pub attempts: u32,
}

fn default_port(mode: TlsMode) -> u16 {
    match mode {
        TlsMode::None => 25,
        TlsMode::Starttls => 587,
        TlsMode::Tls => 465,
    }
}

impl Mailer {
    /// SMTP when `smtp` is configured, else the outbox directory (usually
    /// [`Config::outbox_dir`](crate::config::Config::outbox_dir)).
    pub fn from_config(smtp: Option<&SmtpConfig>, outbox_dir: &Path) -> Result<Mailer, MailError> {
        match smtp {
            Some(cfg) => Ok(Mailer::Smtp(Box::new(SmtpMailer::new(cfg)?))),
            None => Ok(Mailer::Outbox(outbox_dir.to_owned())),
        }
    }

    /// Where messages go, for logs: `smtp://host:port` or the outbox directory.
    pub fn describe(&self) -> String {
        match self {
            Mailer::Smtp(s) => format!("smtp://{}", s.server),
            Mailer::Outbox(dir) => dir.display().to_string(),
        }
    }

    /// Build and deliver a message.
    pub async fn send(&self, mail: &OutgoingMail) -> Result<SentMail, MailError> {
        let message = mail.build()?;
        let envelope = message.envelope().clone();
        let recipients: Vec<String> = envelope.to().iter().map(ToString::to_string).collect();
        let bytes = message.formatted();
        self.deliver(mail.id(), &envelope, bytes, recipients).await
    }

    /// Deliver an already formatted message (forwarding, or bytes built elsewhere) to
    /// `recipients`, with envelope sender `from` (empty for a bounce-style `<>`).
    /// `message_id` only names the outbox file and the log line.
    pub async fn send_raw(
        &self,
        from: Option<&str>,
        recipients: &[&str],
        message_id: &str,
        message: &[u8],
    ) -> Result<SentMail, MailError> {
        let parse = |a: &str| -> Result<Address, MailError> {
            let address = a
                .trim()
                .parse()
                .map_err(|e| MailError::InvalidMessage(format!("address {a:?}: {e}")))?;
            super::message::ascii_domain(address)
        };
        let from = from.filter(|f| !f.is_empty()).map(parse).transpose()?;
        let to = recipients
            .iter()
            .map(|a| parse(a))
            .collect::<Result<Vec<_>, _>>()?;
        let envelope = Envelope::new(from, to)
            .map_err(|e| MailError::InvalidMessage(format!("envelope: {e}")))?;
        let list = recipients.iter().map(|a| a.trim().to_owned()).collect();
        self.deliver(message_id, &envelope, message.to_vec(), list)
            .await
    }

    async fn deliver(
        &self,
        message_id: &str,
        envelope: &Envelope,
        bytes: Vec<u8>,
        recipients: Vec<String>,
    ) -> Result<SentMail, MailError> {
        match self {
            Mailer::Smtp(smtp) => {
                // Sending again after a temporary failure is safe to the extent a
                // fixed Message-ID makes it: a server that accepted the message and
                // then lost the connection before its reply may deliver it twice.
                let done = crate::retry::run(
                    crate::retry::policy(),
                    || format!("sending {message_id} to {}", smtp.server),
                    |_| async {
                        smtp.transport
                            .send_raw(envelope, &bytes)
                            .await
                            .map_err(|e| smtp.send_error(&e, envelope))
                    },
                )
                .await
                .map_err(crate::retry::Failed::into_error)?;
                let (reply, attempts) = (done.value, done.attempts);
                let reply_text = format!(
                    "{} {}",
                    reply.code(),
                    reply.message().collect::<Vec<_>>().join(" ")
                );
                tracing::info!(
                    message_id,
                    recipients = recipients.len(),
                    server = %smtp.server,
                    reply = %reply_text,
                    "mail sent"
                );
                Ok(SentMail {
                    message_id: message_id.to_owned(),
                    recipients,
                    outbox_path: None,
                    server_reply: Some(reply_text),
                    attempts,
                })
            }
            Mailer::Outbox(dir) => {
                let dir = dir.clone();
                let id = message_id.to_owned();
                let from = envelope.from().map(ToString::to_string);
                let to = recipients.clone();
                let written = tokio::task::spawn_blocking(move || {
                    outbox::write(&dir, &id, from.as_deref(), &to, &bytes)
                })
                .await
                .map_err(|e| MailError::Outbox {
                    path: PathBuf::new(),
                    source: std::io::Error::other(e.to_string()),
                })??;
                let path = written.path;
                if written.existed {
                    tracing::info!(
                        message_id,
                        path = %path.display(),
                        "mail already in the outbox; not written again"
                    );
                } else {
                    tracing::info!(
                        message_id,
                        recipients = recipients.len(),
                        path = %path.display(),
                        "mail written to the outbox (no [smtp] configured)"
                    );
                }
                Ok(SentMail {
                    message_id: message_id.to_owned(),
                    recipients,
                    outbox_path: Some(path),
                    server_reply: None,
                    attempts: 1,
                })
            }
        }
    }
}

impl SmtpMailer {
    /// A transport for `cfg`; resolves the password and reads `ca_file` now.
    pub fn new(cfg: &SmtpConfig) -> Result<SmtpMailer, MailError> {
        let port = cfg.port.unwrap_or_else(|| default_port(cfg.security));
        let server = format!("{}:{port}", cfg.host);
        let ca = CaCerts::load_optional("smtp.ca_file", cfg.ca_file.as_deref())
            .map_err(|e| MailError::Config(e.to_string()))?;
        let tls_params = || {
            let tls_error = |e: lettre::transport::smtp::Error| {
                MailError::Config(format!("TLS for SMTP server {server}: {e}"))
            };
            // The system's roots (through the platform verifier), plus the private CA.
            let mut builder = TlsParameters::builder(cfg.host.clone());
            for der in ca.iter().flat_map(|ca| &ca.der) {
                builder = builder
                    .add_root_certificate(Certificate::from_der(der.to_vec()).map_err(tls_error)?);
            }
            builder.build_rustls().map_err(tls_error)
        };
        let tls = match cfg.security {
            TlsMode::None => Tls::None,
            TlsMode::Starttls => Tls::Required(tls_params()?),
            TlsMode::Tls => Tls::Wrapper(tls_params()?),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(cfg.host.clone())
            .port(port)
            .tls(tls)
            .timeout(Some(Duration::from_secs(cfg.timeout_secs.max(1))));
        if let Some(name) = &cfg.hello_name {
            builder = builder.hello_name(ClientId::Domain(name.clone()));
        }
        match (&cfg.username, &cfg.password) {
            (Some(user), Some(password)) => {
                let secret = password.resolve()?;
                builder =
                    builder.credentials(Credentials::new(user.clone(), secret.expose().to_owned()));
            }
            (Some(user), None) => {
                return Err(MailError::Config(format!(
                    "[smtp] username {user:?} is set but password is not"
                )));
            }
            (None, Some(_)) => {
                return Err(MailError::Config(
                    "[smtp] password is set but username is not".to_owned(),
                ));
            }
            (None, None) => {}
        }
        Ok(SmtpMailer {
            transport: builder.build(),
            server,
            user: cfg.username.clone(),
        })
    }

    /// [`error`](Self::error), except that lettre's refusal to send a non-ASCII address
    /// to a server without SMTPUTF8 (it sends nothing then) names the addresses.
    fn send_error(&self, e: &lettre::transport::smtp::Error, envelope: &Envelope) -> MailError {
        let utf8: Vec<String> = envelope
            .from()
            .into_iter()
            .chain(envelope.to())
            .filter(|a| !a.user().is_ascii())
            .map(ToString::to_string)
            .collect();
        if !utf8.is_empty() && e.is_client() && e.to_string().contains("SMTPUTF8") {
            return MailError::Rejected {
                server: self.server.clone(),
                message: format!(
                    "{} has a non-ASCII name before the @, which needs SMTPUTF8, and the \
                     server does not offer it; nothing was sent",
                    utf8.join(", ")
                ),
            };
        }
        self.error(e)
    }

    /// Map a lettre error onto our classes. lettre's messages contain the server's reply
    /// and I/O causes, never the credentials.
    fn error(&self, e: &lettre::transport::smtp::Error) -> MailError {
        let message = e.to_string();
        let server = self.server.clone();
        if e.is_transient() {
            return MailError::Temporary { server, message };
        }
        if e.is_permanent() {
            // 530 authentication required, 534 mechanism too weak, 535 bad credentials,
            // 538 encryption required for the mechanism: the configuration must change.
            let code = e.status().map(|c| c.to_string()).unwrap_or_default();
            if matches!(code.as_str(), "530" | "534" | "535" | "538") {
                return MailError::Auth {
                    server,
                    user: self.user.clone().unwrap_or_default(),
                    message,
                };
            }
            return MailError::Rejected { server, message };
        }
        let lower = message.to_ascii_lowercase();
        // lettre reports these as "client" or TLS errors with no code; only the text
        // tells a missing STARTTLS or auth mechanism or a bad certificate apart.
        if lower.contains("starttls")
            || lower.contains("authentication mechanism")
            || lower.contains("certificate")
            || (e.is_tls() && !e.is_timeout())
        {
            return MailError::Config(format!("SMTP server {server}: {message}"));
        }
        if e.is_client() {
            return MailError::Rejected { server, message };
        }
        // Connection, network, timeout, malformed or missing response: the server is not
        // (properly) there now.
        MailError::Connect { server, message }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;
    use crate::secret::SecretSpec;

    fn smtp(port: u16) -> SmtpConfig {
        SmtpConfig {
            host: "127.0.0.1".into(),
            port: Some(port),
            security: TlsMode::None,
            username: None,
            password: None,
            timeout_secs: 5,
            hello_name: Some("labrelay.test".into()),
            ca_file: None,
        }
    }

    #[test]
    fn username_without_password_is_a_config_error() {
        let mut cfg = smtp(25);
        cfg.username = Some("u".into());
        let err = Mailer::from_config(Some(&cfg), Path::new("/x")).unwrap_err();
        assert_eq!(err.exit(), crate::exit::Exit::Config);
        cfg.password = Some(SecretSpec::parse("env:LABRELAY_TEST_SURELY_UNSET_SMTP_PW"));
        let err = Mailer::from_config(Some(&cfg), Path::new("/x")).unwrap_err();
        assert_eq!(err.exit(), crate::exit::Exit::Config);
        assert!(
            err.to_string()
                .contains("LABRELAY_TEST_SURELY_UNSET_SMTP_PW")
        );
    }

    #[test]
    fn debug_never_shows_the_password() {
        let mut cfg = smtp(25);
        cfg.username = Some("u".into());
        cfg.password = Some(SecretSpec::parse("hunter2-smtp"));
        let m = Mailer::from_config(Some(&cfg), Path::new("/x")).unwrap();
        assert!(!format!("{m:?}").contains("hunter2"));
        assert_eq!(m.describe(), "smtp://127.0.0.1:25");
        let outbox = Mailer::from_config(None, Path::new("/data/outbox")).unwrap();
        assert!(matches!(outbox, Mailer::Outbox(ref p) if p == Path::new("/data/outbox")));
    }

    #[tokio::test]
    async fn outbox_mode_writes_a_parseable_file() {
        let dir = tempfile::tempdir().unwrap();
        let mailer = Mailer::from_config(None, &dir.path().join("outbox")).unwrap();
        let mail = OutgoingMail::new("Lab <lab@seq.example.org>")
            .to("cust@example.com")
            .bcc("audit@seq.example.org")
            .subject("结果")
            .text("见附件");
        let sent = mailer.send(&mail).await.unwrap();
        let path = sent.outbox_path.unwrap();
        let raw = fs_err::read(&path).unwrap();
        let parsed = crate::mail::parse(&raw).unwrap();
        assert_eq!(parsed.subject, "结果");
        assert_eq!(parsed.message_id.as_deref(), Some(mail.id()));
        assert_eq!(
            parsed.header(super::super::ENVELOPE_TO_HEADER).as_deref(),
            Some("<cust@example.com>, <audit@seq.example.org>")
        );
        // Sending the same message again (a re-run) returns the same file.
        let again = mailer.send(&mail).await.unwrap();
        assert_eq!(again.outbox_path.as_deref(), Some(path.as_path()));
        let emls = fs_err::read_dir(dir.path().join("outbox"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".eml")
            })
            .count();
        assert_eq!(emls, 1);
    }
}
