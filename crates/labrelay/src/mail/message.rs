//! Outgoing messages, built once and sent by any [`Mailer`](super::Mailer).

use lettre::Address;
use lettre::message::header::{ContentTransferEncoding, ContentType, HeaderName, HeaderValue};
use lettre::message::{Body, Mailbox, Mailboxes, MultiPart, SinglePart};

use super::MailError;

/// `address` with its domain in ASCII (IDNA/punycode: `user@bücher.example` becomes
/// `user@xn--bcher-kva.example`), so only a non-ASCII name before the `@` needs the
/// server's SMTPUTF8. lettre accepts Unicode domains but would send them as UTF-8.
pub(crate) fn ascii_domain(address: Address) -> Result<Address, MailError> {
    if address.domain().is_ascii() {
        return Ok(address);
    }
    let invalid = |why: String| MailError::InvalidMessage(format!("address {address}: {why}"));
    // The URL parser applies the same IDNA processing (UTS 46) browsers use.
    let ascii = match url::Host::parse(address.domain()) {
        Ok(url::Host::Domain(d)) => d,
        Ok(_) => return Err(invalid("not a domain name".into())),
        Err(e) => return Err(invalid(format!("domain: {e}"))),
    };
    Address::new(address.user(), ascii).map_err(|e| invalid(e.to_string()))
}

/// A file attached to an outgoing message.
#[derive(Clone, PartialEq, Eq)]
pub struct Attachment {
    /// File name as the recipient sees it; any Unicode (sent RFC 2231-encoded).
    pub name: String,
    /// MIME type, e.g. `text/csv; charset=utf-8`.
    pub content_type: String,
    /// The bytes, sent base64-encoded so they arrive unchanged (line endings included).
    pub data: Vec<u8>,
}

impl Attachment {
    /// An attachment with an explicit MIME type.
    pub fn new(name: impl Into<String>, content_type: impl Into<String>, data: Vec<u8>) -> Self {
        Attachment {
            name: name.into(),
            content_type: content_type.into(),
            data,
        }
    }

    /// An attachment whose MIME type is guessed from the file name's extension.
    pub fn guessed(name: impl Into<String>, data: Vec<u8>) -> Self {
        let name = name.into();
        let content_type = guess_content_type(&name).to_owned();
        Attachment {
            name,
            content_type,
            data,
        }
    }
}

impl std::fmt::Debug for Attachment {
    // Attachments can be megabytes; show their size, not their bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("name", &self.name)
            .field("content_type", &self.content_type)
            .field("len", &self.data.len())
            .finish()
    }
}

/// The MIME type for a file name (the table of
/// [`content_type_for`](crate::storage::content_type_for)); `application/octet-stream`
/// for anything else.
pub fn guess_content_type(name: &str) -> &'static str {
    crate::storage::content_type_for(name)
}

/// Headers the builder writes itself; an extra header by one of these names would
/// duplicate or contradict them.
const OWN_HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
];

/// An outgoing message: plain text with an optional HTML alternative, attachments,
/// reply headers and extra headers. Addresses are `addr@host` or `Name <addr@host>`,
/// names and subjects any Unicode (encoded as RFC 2047 on the wire); a string may hold
/// a comma-separated list. Nothing is validated until [`OutgoingMail::build`].
///
/// The Message-ID is fixed when the value is created (`<uuid@domain-of-from>`), so a
/// tool can record it before sending and a retry sends the same ID.
#[derive(Debug, Clone)]
pub struct OutgoingMail {
    from: String,
    to: Vec<String>,
    cc: Vec<String>,
    bcc: Vec<String>,
    reply_to: Vec<String>,
    subject: String,
    text: String,
    html: Option<String>,
    attachments: Vec<Attachment>,
    in_reply_to: Option<String>,
    references: Vec<String>,
    headers: Vec<(String, String)>,
    message_id: String,
}

/// `<id>` for `id` or `<id>`.
pub(crate) fn bracket_id(id: &str) -> String {
    let id = id.trim();
    let inner = id.trim_start_matches('<').trim_end_matches('>');
    format!("<{inner}>")
}

/// The domain of the first address in `from`, if it has one.
fn domain_of(from: &str) -> Option<String> {
    let addr = match (from.rfind('<'), from.rfind('>')) {
        (Some(l), Some(r)) if l < r => &from[l + 1..r],
        _ => from,
    };
    let domain = addr.rsplit_once('@')?.1.trim();
    let ok = !domain.is_empty()
        && domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    ok.then(|| domain.to_ascii_lowercase())
}

fn new_message_id(from: &str) -> String {
    let domain = domain_of(from).unwrap_or_else(|| {
        // Only the host name is available; an odd one must not break the header.
        let host = hostname_fallback();
        if host.is_empty() {
            "labrelay.invalid".to_owned()
        } else {
            host
        }
    });
    format!("<{}@{domain}>", uuid::Uuid::new_v4().simple())
}

fn hostname_fallback() -> String {
    let raw = fs_err::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs_err::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    raw.trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
        .collect()
}

fn mailboxes(field: &str, value: &str) -> Result<Vec<Mailbox>, MailError> {
    let parsed: Mailboxes = value
        .parse()
        .map_err(|e| MailError::InvalidMessage(format!("{field} address {value:?}: {e}")))?;
    parsed
        .into_iter()
        .map(|m| Ok(Mailbox::new(m.name, ascii_domain(m.email)?)))
        .collect()
}

impl OutgoingMail {
    /// A new message from `from` (usually `[mail] from` of the configuration), with a
    /// fresh Message-ID.
    pub fn new(from: impl Into<String>) -> Self {
        let from = from.into();
        let message_id = new_message_id(&from);
        OutgoingMail {
            from,
            to: Vec::new(),
            cc: Vec::new(),
            bcc: Vec::new(),
            reply_to: Vec::new(),
            subject: String::new(),
            text: String::new(),
            html: None,
            attachments: Vec::new(),
            in_reply_to: None,
            references: Vec::new(),
            headers: Vec::new(),
            message_id,
        }
    }

    /// Add a To recipient (or a comma-separated list).
    #[must_use]
    pub fn to(mut self, address: impl Into<String>) -> Self {
        self.to.push(address.into());
        self
    }

    /// Add a Cc recipient (or a comma-separated list).
    #[must_use]
    pub fn cc(mut self, address: impl Into<String>) -> Self {
        self.cc.push(address.into());
        self
    }

    /// Add a Bcc recipient (or a comma-separated list); it is in the envelope only.
    #[must_use]
    pub fn bcc(mut self, address: impl Into<String>) -> Self {
        self.bcc.push(address.into());
        self
    }

    /// Add a Reply-To address.
    #[must_use]
    pub fn reply_to(mut self, address: impl Into<String>) -> Self {
        self.reply_to.push(address.into());
        self
    }

    /// Set the subject (any Unicode).
    #[must_use]
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = subject.into();
        self
    }

    /// Set the plain-text body.
    #[must_use]
    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.text = text.into();
        self
    }

    /// Set an HTML alternative to the text body.
    #[must_use]
    pub fn html(mut self, html: impl Into<String>) -> Self {
        self.html = Some(html.into());
        self
    }

    /// Attach a file.
    #[must_use]
    pub fn attach(mut self, attachment: Attachment) -> Self {
        self.attachments.push(attachment);
        self
    }

    /// Set In-Reply-To (a Message-ID, with or without angle brackets).
    #[must_use]
    pub fn in_reply_to(mut self, message_id: impl AsRef<str>) -> Self {
        self.in_reply_to = Some(bracket_id(message_id.as_ref()));
        self
    }

    /// Append Message-IDs to References, oldest first.
    #[must_use]
    pub fn references<I, S>(mut self, message_ids: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.references
            .extend(message_ids.into_iter().map(|id| bracket_id(id.as_ref())));
        self
    }

    /// Add another header (`X-Labrelay-Job: 42`). The value may be any Unicode. Headers
    /// the builder writes itself (From, Subject, Content-Type…) are refused by `build`.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Replace the generated Message-ID (with or without angle brackets), e.g. to resend
    /// a message recorded earlier under its ID.
    #[must_use]
    pub fn message_id(mut self, message_id: impl AsRef<str>) -> Self {
        self.message_id = bracket_id(message_id.as_ref());
        self
    }

    /// The Message-ID, with angle brackets.
    pub fn id(&self) -> &str {
        &self.message_id
    }

    /// The subject.
    pub fn subject_text(&self) -> &str {
        &self.subject
    }

    /// The attachments.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Build the MIME message: `text/plain` alone, or `multipart/alternative` with the
    /// HTML, wrapped in `multipart/mixed` when there are attachments. The Date header is
    /// the time of the call.
    pub fn build(&self) -> Result<lettre::Message, MailError> {
        let mut b = lettre::Message::builder()
            .message_id(Some(self.message_id.clone()))
            .subject(self.subject.clone());
        let from = mailboxes("From", &self.from)?;
        if from.len() != 1 {
            return Err(MailError::InvalidMessage(format!(
                "From must be exactly one address, got {:?}",
                self.from
            )));
        }
        for m in from {
            b = b.from(m);
        }
        let mut recipients = 0;
        for a in &self.to {
            for m in mailboxes("To", a)? {
                b = b.to(m);
                recipients += 1;
            }
        }
        for a in &self.cc {
            for m in mailboxes("Cc", a)? {
                b = b.cc(m);
                recipients += 1;
            }
        }
        for a in &self.bcc {
            for m in mailboxes("Bcc", a)? {
                b = b.bcc(m);
                recipients += 1;
            }
        }
        if recipients == 0 {
            return Err(MailError::InvalidMessage(format!(
                "message {} has no recipients",
                self.message_id
            )));
        }
        for a in &self.reply_to {
            for m in mailboxes("Reply-To", a)? {
                b = b.reply_to(m);
            }
        }
        if let Some(id) = &self.in_reply_to {
            b = b.in_reply_to(id.clone());
        }
        if !self.references.is_empty() {
            b = b.references(self.references.join(" "));
        }
        for (name, value) in &self.headers {
            if OWN_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(MailError::InvalidMessage(format!(
                    "header {name} is set by the message builder, not as an extra header"
                )));
            }
            let header_name = HeaderName::new_from_ascii(name.clone())
                .map_err(|e| MailError::InvalidMessage(format!("header name {name:?}: {e}")))?;
            if value.contains(['\r', '\n']) {
                return Err(MailError::InvalidMessage(format!(
                    "header {name} contains a line break"
                )));
            }
            b = b.raw_header(HeaderValue::new(header_name, value.clone()));
        }

        let text = SinglePart::plain(self.text.clone());
        let result = match (&self.html, self.attachments.is_empty()) {
            (None, true) => b.singlepart(text),
            (Some(html), true) => b.multipart(
                MultiPart::alternative()
                    .singlepart(text)
                    .singlepart(SinglePart::html(html.clone())),
            ),
            (html, false) => {
                let mut mixed = match html {
                    None => MultiPart::mixed().singlepart(text),
                    Some(html) => MultiPart::mixed().multipart(
                        MultiPart::alternative()
                            .singlepart(text)
                            .singlepart(SinglePart::html(html.clone())),
                    ),
                };
                for a in &self.attachments {
                    mixed = mixed.singlepart(attachment_part(a)?);
                }
                b.multipart(mixed)
            }
        };
        result.map_err(|e| MailError::InvalidMessage(format!("message {}: {e}", self.message_id)))
    }
}

fn attachment_part(a: &Attachment) -> Result<SinglePart, MailError> {
    let content_type = ContentType::parse(&a.content_type).map_err(|e| {
        MailError::InvalidMessage(format!(
            "attachment {:?}: content type {:?}: {e}",
            a.name, a.content_type
        ))
    })?;
    // Base64 whatever the content: 7bit or quoted-printable would let relays rewrite
    // line endings of text files, and the recipient must get the bytes we have.
    let body =
        Body::new_with_encoding(a.data.clone(), ContentTransferEncoding::Base64).map_err(|_| {
            MailError::InvalidMessage(format!("attachment {:?} cannot be encoded", a.name))
        })?;
    Ok(lettre::message::Attachment::new(a.name.clone()).body(body, content_type))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn message_id_uses_the_from_domain_and_is_stable() {
        let m = OutgoingMail::new("Lab 实验室 <lab@seq.example.org>");
        assert!(
            m.id().starts_with('<') && m.id().ends_with("@seq.example.org>"),
            "{}",
            m.id()
        );
        let again = m.clone().to("a@b.example");
        assert_eq!(m.id(), again.id());
        assert_ne!(m.id(), OutgoingMail::new("lab@seq.example.org").id());
        assert_eq!(bracket_id("x@y"), "<x@y>");
        assert_eq!(bracket_id(" <x@y> "), "<x@y>");
    }

    #[test]
    fn build_writes_encoded_headers_and_base64_attachments() {
        let m = OutgoingMail::new("Lab <lab@seq.example.org>")
            .to("客户 <cust@example.com>, other@example.com")
            .cc("staff@seq.example.org")
            .bcc("hidden@seq.example.org")
            .subject("查询结果 report")
            .text("你好\nline 2\n")
            .html("<p>你好</p>")
            .attach(Attachment::guessed("结果 表.csv", b"a,b\n1,2\n".to_vec()))
            .in_reply_to("orig@client.example")
            .references(["first@client.example", "<orig@client.example>"])
            .header("X-Labrelay-Job", "job 42 任务");
        let msg = m.build().unwrap();
        let raw = String::from_utf8(msg.formatted()).unwrap();
        assert!(raw.is_ascii(), "headers and bodies are 7-bit on the wire");
        assert!(raw.contains("Message-ID: <"), "{raw}");
        assert!(raw.contains("In-Reply-To: <orig@client.example>"), "{raw}");
        assert!(
            raw.contains("References: <first@client.example> <orig@client.example>"),
            "{raw}"
        );
        assert!(raw.contains("multipart/mixed") && raw.contains("multipart/alternative"));
        assert!(!raw.contains("hidden@"), "Bcc stays out of the headers");
        assert_eq!(msg.envelope().to().len(), 4);
        let parsed = crate::mail::parse(raw.as_bytes()).unwrap();
        assert_eq!(parsed.subject, "查询结果 report");
        assert_eq!(parsed.text.as_deref(), Some("你好\nline 2\n"));
        assert_eq!(parsed.html.as_deref(), Some("<p>你好</p>"));
        assert_eq!(parsed.to[0].name.as_deref(), Some("客户"));
        assert_eq!(parsed.attachments.len(), 1);
        assert_eq!(parsed.attachments[0].name.as_deref(), Some("结果 表.csv"));
        assert_eq!(parsed.attachments[0].data, b"a,b\n1,2\n");
        assert_eq!(parsed.in_reply_to, vec!["<orig@client.example>".to_owned()]);
        assert_eq!(
            parsed.header("X-Labrelay-Job").as_deref(),
            Some("job 42 任务")
        );
    }

    /// Unicode domains go out as punycode, in the envelope and the headers, so they need
    /// no SMTPUTF8; a Unicode name before the `@` stays as it is.
    #[test]
    fn unicode_domains_become_punycode() {
        let m = OutgoingMail::new("Lab <lab@seq.example.org>")
            .to("Kunde <kunde@bücher.example>, 用户@例子.测试")
            .text("x");
        let msg = m.build().unwrap();
        let to: Vec<String> = msg
            .envelope()
            .to()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            to,
            [
                "kunde@xn--bcher-kva.example",
                "用户@xn--fsqu00a.xn--0zwm56d"
            ]
        );
        let raw = String::from_utf8(msg.formatted()).unwrap();
        assert!(raw.contains("kunde@xn--bcher-kva.example"), "{raw}");
        assert!(!raw.contains("bücher"), "{raw}");
    }

    #[test]
    fn build_refuses_bad_input() {
        let no_rcpt = OutgoingMail::new("lab@seq.example.org").subject("x");
        assert!(matches!(no_rcpt.build(), Err(MailError::InvalidMessage(_))));
        let bad_addr = OutgoingMail::new("lab@seq.example.org").to("not an address");
        let err = bad_addr.build().unwrap_err();
        assert!(err.to_string().contains("not an address"), "{err}");
        assert_eq!(err.exit(), crate::exit::Exit::Failed);
        let own = OutgoingMail::new("lab@seq.example.org")
            .to("a@b.example")
            .header("Subject", "x");
        assert!(own.build().is_err());
        let injected = OutgoingMail::new("lab@seq.example.org")
            .to("a@b.example")
            .header("X-A", "x\r\nBcc: evil@example.com");
        assert!(injected.build().is_err());
    }

    #[test]
    fn text_only_message_is_single_part() {
        let msg = OutgoingMail::new("lab@seq.example.org")
            .to("a@b.example")
            .subject("plain")
            .text("hello")
            .build()
            .unwrap();
        let raw = String::from_utf8(msg.formatted()).unwrap();
        assert!(
            raw.contains("Content-Type: text/plain; charset=utf-8"),
            "{raw}"
        );
        assert!(!raw.contains("multipart"));
    }
}
