//! Mail: outgoing messages, their delivery, and incoming mail.
//!
//! This module owns
//! - building a message once ([`OutgoingMail`]: text with an optional HTML alternative,
//!   attachments, UTF-8 headers, a Message-ID, reply headers),
//! - delivering it ([`Mailer`]): over SMTP with lettre, or, when no `[smtp]` section is
//!   configured, as an `.eml` file in the outbox directory, so nothing is lost,
//! - reading mail ([`ImapClient`], blocking): log in, select, search by UID, fetch raw
//!   messages, set flags, move, IDLE,
//! - parsing a raw message ([`parse`]) into an [`IncomingMail`] whose texts, subject and
//!   attachment names are UTF-8 whatever the sender's charset (GBK, GB2312, GB18030, Big5,
//!   RFC 2047 and RFC 2231 encodings included), and building a reply to it.
//!
//! It must not decide policy (which folder to watch, what to answer): tools do. It never
//! logs or puts a password in an error; server replies are quoted in errors because they
//! say what went wrong, and they never contain the password we sent.

mod encoding;
mod imap;
mod message;
mod outbox;
mod parse;
mod send;

use std::path::PathBuf;

use crate::exit::Exit;
use crate::secret::SecretError;

pub use self::imap::{Flag, ImapClient, MailboxInfo, MoveMethod, encode_mailbox_name, quote};
pub use self::message::{Attachment, OutgoingMail, guess_content_type};
pub use self::outbox::{ENVELOPE_FROM_HEADER, ENVELOPE_TO_HEADER};
pub use self::parse::{IncomingAttachment, IncomingMail, MailAddress, parse, parse_with_fallback};
pub use self::send::{Mailer, SentMail, SmtpMailer};

/// Mail errors. None of them contains a password.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// The server could not be reached, timed out, or dropped the connection (exit 75).
    #[error("cannot reach mail server {server}: {message}")]
    Connect {
        /// host:port.
        server: String,
        /// Why.
        message: String,
    },
    /// The server refused the login (exit 78).
    #[error("mail server {server} refused the login of {user}: {message}")]
    Auth {
        /// host:port.
        server: String,
        /// The user name (never the password).
        user: String,
        /// The server's reply.
        message: String,
    },
    /// The mail configuration cannot work: a TLS mode the server does not offer, an
    /// invalid From address in the configuration, a missing password (exit 78).
    #[error("invalid mail configuration: {0}")]
    Config(String),
    /// A configured password could not be resolved (exit 78).
    #[error("mail password: {0}")]
    Secret(#[from] SecretError),
    /// The server refused for now (SMTP 4xx); sending again later may work (exit 75).
    #[error("mail server {server} temporarily refused: {message}")]
    Temporary {
        /// host:port.
        server: String,
        /// The server's reply.
        message: String,
    },
    /// A temporary failure that the retry layer ([`crate::retry`]) tried again until its
    /// attempts or deadline ran out: the last error's class, but no longer transient, so
    /// no caller retries it once more.
    #[error("{last} (tried {attempts} times)")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        #[source]
        last: Box<MailError>,
    },
    /// The server refused for good (SMTP 5xx, IMAP NO/BAD to a command) (exit 1).
    #[error("mail server {server} refused: {message}")]
    Rejected {
        /// host:port.
        server: String,
        /// The command and the server's reply.
        message: String,
    },
    /// The server answered something this client does not understand (exit 1).
    #[error("unexpected answer from mail server {server}: {message}")]
    Protocol {
        /// host:port.
        server: String,
        /// What was unexpected.
        message: String,
    },
    /// The message cannot be built: a bad address, an invalid header (exit 1).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// Raw bytes that are not a mail message (exit 1).
    #[error("cannot parse mail message: {0}")]
    Parse(String),
    /// A UID that is not (or no longer) in the selected folder (exit 1).
    #[error("no message with UID {uid} in folder {folder}")]
    NoSuchMessage {
        /// The UID.
        uid: u32,
        /// The selected folder.
        folder: String,
    },
    /// Writing an outbox file failed (exit 1).
    #[error("cannot write outbox file {path}: {source}")]
    Outbox {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl MailError {
    /// Exit status: unreachable servers, timeouts and 4xx replies are temporary (75);
    /// login failures and unusable configuration are configuration errors (78); permanent
    /// refusals and bad messages are failures (1).
    pub fn exit(&self) -> Exit {
        match self {
            MailError::GaveUp { last, .. } => last.exit(),
            MailError::Connect { .. } | MailError::Temporary { .. } => Exit::TempFail,
            MailError::Auth { .. } | MailError::Config(_) | MailError::Secret(_) => Exit::Config,
            MailError::Rejected { .. }
            | MailError::Protocol { .. }
            | MailError::InvalidMessage(_)
            | MailError::Parse(_)
            | MailError::NoSuchMessage { .. }
            | MailError::Outbox { .. } => Exit::Failed,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn error_classes_follow_the_exit_table() {
        let connect = MailError::Connect {
            server: "127.0.0.1:9".into(),
            message: "refused".into(),
        };
        assert_eq!(connect.exit(), Exit::TempFail);
        let auth = MailError::Auth {
            server: "s".into(),
            user: "u".into(),
            message: "no".into(),
        };
        assert_eq!(auth.exit(), Exit::Config);
        let rejected = MailError::Rejected {
            server: "s".into(),
            message: "550".into(),
        };
        assert_eq!(rejected.exit(), Exit::Failed);
        let any = anyhow::Error::new(connect).context("sending report");
        assert_eq!(crate::exit::classify(&any), Exit::TempFail);
    }
}

impl crate::exit::ExitClass for MailError {
    fn exit_class(&self) -> Exit {
        self.exit()
    }

    fn is_transient(&self) -> bool {
        !matches!(self, MailError::GaveUp { .. }) && self.exit() == Exit::TempFail
    }
}
crate::exit_class!(MailError);

impl crate::retry::GiveUp for MailError {
    fn gave_up(attempts: u32, last: Self) -> Self {
        MailError::GaveUp {
            attempts,
            last: Box::new(last),
        }
    }
}
