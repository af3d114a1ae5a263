//! Incoming messages parsed into UTF-8, and replies to them.
//!
//! mail-parser does the MIME work and the body charsets (with its `full_encoding`
//! feature: GBK, GB2312, GB18030, Big5…). Subjects, other headers and attachment names
//! are decoded here from the raw bytes, because mail clients common in China split
//! multi-byte characters across encoded-words, continue RFC 2231 parameters whose
//! charset only the first segment names, or send raw 8-bit GBK; undeclared 8-bit text
//! that is not UTF-8 is read in a fallback charset (GB18030 by default).

use std::fmt;

use chrono::{DateTime, FixedOffset};
use encoding_rs::Encoding;
use mail_parser::{HeaderValue, MessageParser, MessagePart, MimeHeaders as _, PartType};

use super::MailError;
use super::encoding::{
    DEFAULT_FALLBACK, decode_bytes, decode_rfc2047, decoded_param, header_text, main_value,
    transfer_decode,
};
use super::message::{OutgoingMail, bracket_id};

/// A mailbox: address and optional display name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailAddress {
    /// Display name, decoded.
    pub name: Option<String>,
    /// `user@domain`.
    pub address: String,
}

impl fmt::Display for MailAddress {
    /// `Name <user@domain>` (the name quoted when it needs to be), or the bare address;
    /// the form [`OutgoingMail::to`] accepts.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name.as_deref().map(str::trim) {
            Some(name) if !name.is_empty() => {
                let special = |c: char| "()<>[]:;@\\,.\"".contains(c);
                if name.contains(special) {
                    let escaped = name.replace('\\', "\\\\").replace('"', "\\\"");
                    write!(f, "\"{escaped}\" <{}>", self.address)
                } else {
                    write!(f, "{name} <{}>", self.address)
                }
            }
            _ => f.write_str(&self.address),
        }
    }
}

/// An attachment (or inline part that is not the message body) of an incoming message.
#[derive(Clone, PartialEq, Eq)]
pub struct IncomingAttachment {
    /// File name, decoded from RFC 2231 `filename*=` (continuations included), RFC 2047
    /// encoded-words or raw 8-bit text, from Content-Disposition or else Content-Type.
    pub name: Option<String>,
    /// MIME type, lowercase, without parameters (`text/plain`, `application/pdf`).
    pub content_type: String,
    /// The declared charset, for text types.
    pub charset: Option<String>,
    /// Content-Disposition `inline` (an image in the HTML, usually).
    pub inline: bool,
    /// Content-ID, without angle brackets.
    pub content_id: Option<String>,
    /// The bytes as the sender attached them (transfer encoding removed, charset not
    /// converted: a GBK `.sql` file stays GBK here; see [`IncomingAttachment::text`]).
    pub data: Vec<u8>,
    fallback: &'static Encoding,
}

impl IncomingAttachment {
    /// The content as UTF-8 text: the declared charset, else UTF-8 when valid, else the
    /// parser's fallback charset (GB18030 by default). A UTF-8 byte-order mark is dropped.
    pub fn text(&self) -> String {
        let data = self
            .data
            .strip_prefix(b"\xEF\xBB\xBF".as_slice())
            .unwrap_or(&self.data);
        decode_bytes(data, self.charset.as_deref(), self.fallback)
    }
}

impl fmt::Debug for IncomingAttachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncomingAttachment")
            .field("name", &self.name)
            .field("content_type", &self.content_type)
            .field("charset", &self.charset)
            .field("inline", &self.inline)
            .field("len", &self.data.len())
            .finish_non_exhaustive()
    }
}

/// A parsed incoming message, everything decoded to UTF-8. Text bodies have `\n` line
/// endings.
#[derive(Clone)]
pub struct IncomingMail {
    /// Message-ID, with angle brackets.
    pub message_id: Option<String>,
    /// The From mailbox.
    pub from: Option<MailAddress>,
    /// Reply-To mailboxes.
    pub reply_to: Vec<MailAddress>,
    /// To mailboxes.
    pub to: Vec<MailAddress>,
    /// Cc mailboxes.
    pub cc: Vec<MailAddress>,
    /// Subject, decoded (empty when absent).
    pub subject: String,
    /// Date header.
    pub date: Option<DateTime<FixedOffset>>,
    /// In-Reply-To Message-IDs, with angle brackets.
    pub in_reply_to: Vec<String>,
    /// References Message-IDs, oldest first, with angle brackets.
    pub references: Vec<String>,
    /// The first `text/plain` body part.
    pub text: Option<String>,
    /// The first `text/html` body part.
    pub html: Option<String>,
    /// Attachments and inline parts other than the bodies, in message order.
    pub attachments: Vec<IncomingAttachment>,
    headers: Vec<(String, String)>,
    raw: Vec<u8>,
}

impl fmt::Debug for IncomingMail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncomingMail")
            .field("message_id", &self.message_id)
            .field("from", &self.from)
            .field("to", &self.to)
            .field("cc", &self.cc)
            .field("subject", &self.subject)
            .field("date", &self.date)
            .field("attachments", &self.attachments)
            .field("len", &self.raw.len())
            .finish_non_exhaustive()
    }
}

/// Parse a raw message (RFC 5322, as fetched over IMAP or read from an .eml file).
pub fn parse(raw: &[u8]) -> Result<IncomingMail, MailError> {
    parse_with_fallback(raw, DEFAULT_FALLBACK)
}

/// [`parse`], with another charset for undeclared 8-bit text that is not UTF-8.
pub fn parse_with_fallback(
    raw: &[u8],
    fallback: &'static Encoding,
) -> Result<IncomingMail, MailError> {
    // Raw 8-bit headers in a legacy charset (old Foxmail, some scripts) would reach
    // mail-parser as invalid UTF-8 and come out as U+FFFD; make the header block UTF-8
    // first, which mail-parser reads as RFC 6532 headers.
    let header_end = find_header_end(raw);
    let transcoded;
    let input: &[u8] = if std::str::from_utf8(&raw[..header_end]).is_err() {
        let mut v = fallback
            .decode_without_bom_handling(&raw[..header_end])
            .0
            .into_owned()
            .into_bytes();
        v.extend_from_slice(&raw[header_end..]);
        transcoded = v;
        &transcoded
    } else {
        raw
    };

    let msg = MessageParser::default()
        .parse(input)
        .filter(|m| !m.headers().is_empty())
        .ok_or_else(|| MailError::Parse(format!("no mail headers in {} bytes", raw.len())))?;
    let bytes = msg.raw_message();

    let headers: Vec<(String, String)> = msg
        .headers()
        .iter()
        .map(|h| {
            let value = slice(bytes, h.offset_start(), h.offset_end());
            (
                h.name().to_owned(),
                decode_rfc2047(&header_text(value, fallback), fallback),
            )
        })
        .collect();
    let subject = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("Subject"))
        .map(|(_, v)| v.clone())
        .unwrap_or_default();

    let date = msg.date().and_then(|d| {
        let secs = i32::from(d.tz_hour) * 3600 + i32::from(d.tz_minute) * 60;
        let offset = FixedOffset::east_opt(if d.tz_before_gmt { -secs } else { secs })?;
        DateTime::from_timestamp(d.to_timestamp(), 0).map(|t| t.with_timezone(&offset))
    });

    let text = msg.text_bodies().find_map(|p| match &p.body {
        PartType::Text(t) => Some(body_text(bytes, p, t, fallback)),
        _ => None,
    });
    let html = msg.html_bodies().find_map(|p| match &p.body {
        PartType::Html(t) => Some(body_text(bytes, p, t, fallback)),
        _ => None,
    });
    let attachments = msg
        .attachments()
        .map(|p| attachment(bytes, p, fallback))
        .collect();

    Ok(IncomingMail {
        message_id: msg.message_id().map(bracket_id),
        from: msg
            .from()
            .and_then(|a| addresses(Some(a)).into_iter().next()),
        reply_to: addresses(msg.reply_to()),
        to: addresses(msg.to()),
        cc: addresses(msg.cc()),
        subject,
        date,
        in_reply_to: ids(msg.in_reply_to()),
        references: ids(msg.references()),
        text,
        html,
        attachments,
        headers,
        raw: raw.to_vec(),
    })
}

fn find_header_end(raw: &[u8]) -> usize {
    let crlf = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = raw.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b).unwrap_or(raw.len()),
    }
}

fn slice(bytes: &[u8], start: u32, end: u32) -> &[u8] {
    let (start, end) = (start as usize, end as usize);
    bytes.get(start..end.min(bytes.len())).unwrap_or_default()
}

fn addresses(addr: Option<&mail_parser::Address<'_>>) -> Vec<MailAddress> {
    let Some(addr) = addr else {
        return Vec::new();
    };
    addr.iter()
        .filter_map(|a| {
            let address = a.address()?.trim().to_owned();
            let name = a
                .name()
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty() && *n != address);
            Some(MailAddress { name, address })
        })
        .collect()
}

fn ids(value: &HeaderValue<'_>) -> Vec<String> {
    match value {
        HeaderValue::Text(t) => vec![bracket_id(t)],
        HeaderValue::TextList(l) => l.iter().map(|t| bracket_id(t)).collect(),
        _ => Vec::new(),
    }
}

/// The raw header value of `name` in a part, unfolded and in UTF-8.
fn part_header(
    bytes: &[u8],
    part: &MessagePart<'_>,
    name: &str,
    fallback: &'static Encoding,
) -> Option<String> {
    part.headers
        .iter()
        .find(|h| h.name().eq_ignore_ascii_case(name))
        .map(|h| header_text(slice(bytes, h.offset_start(), h.offset_end()), fallback))
}

/// A body part's text with `\n` line endings. mail-parser has decoded the declared
/// charset; text without a declared charset that is not UTF-8 is decoded again from
/// the raw bytes in the fallback charset.
fn body_text(
    bytes: &[u8],
    part: &MessagePart<'_>,
    decoded: &str,
    fallback: &'static Encoding,
) -> String {
    let declared = part_header(bytes, part, "Content-Type", fallback)
        .and_then(|ct| decoded_param(&ct, "charset", fallback));
    let text = if declared.is_none() && decoded.contains('\u{FFFD}') {
        let raw = slice(bytes, part.offset_body, part.offset_end);
        decode_bytes(&transfer_decode(raw, part.encoding), None, fallback)
    } else {
        decoded.to_owned()
    };
    text.replace("\r\n", "\n")
}

fn attachment(
    bytes: &[u8],
    part: &MessagePart<'_>,
    fallback: &'static Encoding,
) -> IncomingAttachment {
    let ct = part_header(bytes, part, "Content-Type", fallback);
    let cd = part_header(bytes, part, "Content-Disposition", fallback);
    let name = cd
        .as_deref()
        .and_then(|cd| decoded_param(cd, "filename", fallback))
        .or_else(|| {
            ct.as_deref()
                .and_then(|ct| decoded_param(ct, "name", fallback))
        })
        .or_else(|| part.attachment_name().map(str::to_owned))
        .filter(|n| !n.is_empty());
    let content_type = ct
        .as_deref()
        .map(main_value)
        .filter(|t| t.contains('/'))
        .unwrap_or_else(|| "text/plain".to_owned());
    let charset = ct
        .as_deref()
        .and_then(|ct| decoded_param(ct, "charset", fallback));
    let inline = cd
        .as_deref()
        .map_or(matches!(part.body, PartType::InlineBinary(_)), |cd| {
            main_value(cd) == "inline"
        });
    let content_id = part_header(bytes, part, "Content-ID", fallback)
        .map(|id| id.trim_start_matches('<').trim_end_matches('>').to_owned());
    let data = match &part.body {
        PartType::Binary(b) | PartType::InlineBinary(b) => b.to_vec(),
        // Text parts were charset-decoded by mail-parser; the sender's bytes are in the
        // raw message. A nested message is kept as the raw message it is.
        _ => transfer_decode(
            slice(bytes, part.offset_body, part.offset_end),
            part.encoding,
        )
        .into_owned(),
    };
    IncomingAttachment {
        name,
        content_type,
        charset,
        inline,
        content_id,
        data,
        fallback,
    }
}

/// Prefixes that already mark a reply (English and the Chinese clients' own).
const REPLY_PREFIXES: &[&str] = &[
    "re:",
    "re：",
    "回复:",
    "回复：",
    "答复:",
    "答复：",
    "回覆:",
    "回覆：",
];

fn reply_subject(subject: &str) -> String {
    let s = subject.trim();
    let lower = s.to_lowercase();
    if REPLY_PREFIXES.iter().any(|p| lower.starts_with(p)) {
        s.to_owned()
    } else {
        format!("Re: {s}")
    }
}

impl IncomingMail {
    /// The first header called `name` (any case), decoded.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    /// All top-level headers in order, values unfolded and decoded.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The message as received.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// The text body, or the HTML body converted to text when there is no text part.
    pub fn body_text(&self) -> Option<String> {
        self.text.clone().or_else(|| {
            self.html
                .as_deref()
                .map(mail_parser::decoders::html::html_to_text)
        })
    }

    /// Whether the message says it was sent by a machine (Auto-Submitted, Precedence
    /// bulk/junk/list, auto-reply markers, a bounce). Tools that answer mail must not
    /// answer these, or two robots mail each other forever.
    pub fn is_automatic(&self) -> bool {
        let has = |n: &str| self.header(n).map(|v| v.trim().to_ascii_lowercase());
        if has("Auto-Submitted").is_some_and(|v| v != "no") {
            return true;
        }
        if has("Precedence").is_some_and(|v| matches!(v.as_str(), "bulk" | "junk" | "list")) {
            return true;
        }
        if has("X-Autoreply").is_some() || has("X-Autorespond").is_some() {
            return true;
        }
        if has("Return-Path").is_some_and(|v| v == "<>") {
            return true;
        }
        self.from.as_ref().is_some_and(|f| {
            let a = f.address.to_ascii_lowercase();
            a.starts_with("mailer-daemon@") || a.starts_with("postmaster@")
        })
    }

    /// A reply from `from` to the sender (Reply-To if set, else From): `Re:` subject,
    /// In-Reply-To this message, References the thread plus this message. Add the body
    /// and attachments, then send.
    pub fn reply(&self, from: impl Into<String>) -> OutgoingMail {
        let targets: Vec<&MailAddress> = if self.reply_to.is_empty() {
            self.from.iter().collect()
        } else {
            self.reply_to.iter().collect()
        };
        self.reply_with(from.into(), &targets)
    }

    /// [`IncomingMail::reply`] addressed to the From address alone, whatever Reply-To
    /// says: for answers that must reach only the authenticated sender.
    pub fn reply_to_sender(&self, from: impl Into<String>) -> OutgoingMail {
        let targets: Vec<&MailAddress> = self.from.iter().collect();
        self.reply_with(from.into(), &targets)
    }

    fn reply_with(&self, from: String, targets: &[&MailAddress]) -> OutgoingMail {
        let mut out = OutgoingMail::new(from).subject(reply_subject(&self.subject));
        for t in targets {
            out = out.to(t.to_string());
        }
        let mut refs = if self.references.is_empty() {
            // RFC 5322 3.6.4: without References, a single In-Reply-To id starts them.
            if self.in_reply_to.len() == 1 {
                self.in_reply_to.clone()
            } else {
                Vec::new()
            }
        } else {
            self.references.clone()
        };
        if let Some(id) = &self.message_id {
            out = out.in_reply_to(id);
            if !refs.contains(id) {
                refs.push(id.clone());
            }
        }
        out.references(refs)
    }

    /// [`IncomingMail::reply`], with the other To and Cc recipients in Cc (minus the
    /// address of `from` itself).
    pub fn reply_all(&self, from: impl Into<String>) -> OutgoingMail {
        let from = from.into();
        let own = from
            .rsplit_once('<')
            .map_or(from.as_str(), |(_, a)| a.trim_end_matches('>'))
            .trim()
            .to_ascii_lowercase();
        let already: Vec<String> = if self.reply_to.is_empty() {
            self.from
                .iter()
                .map(|a| a.address.to_ascii_lowercase())
                .collect()
        } else {
            self.reply_to
                .iter()
                .map(|a| a.address.to_ascii_lowercase())
                .collect()
        };
        let mut out = self.reply(from);
        let mut seen = already;
        for a in self.to.iter().chain(&self.cc) {
            let key = a.address.to_ascii_lowercase();
            if key != own && !seen.contains(&key) {
                seen.push(key);
                out = out.cc(a.to_string());
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use base64::Engine as _;

    use super::*;

    fn gbk(s: &str) -> Vec<u8> {
        encoding_rs::GBK.encode(s).0.into_owned()
    }

    fn big5(s: &str) -> Vec<u8> {
        encoding_rs::BIG5.encode(s).0.into_owned()
    }

    fn qp(bytes: &[u8]) -> String {
        bytes.iter().fold(String::new(), |mut s, b| {
            let _ = std::fmt::Write::write_fmt(&mut s, format_args!("={b:02X}"));
            s
        })
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn pct(bytes: &[u8]) -> String {
        bytes.iter().fold(String::new(), |mut s, b| {
            let _ = std::fmt::Write::write_fmt(&mut s, format_args!("%{b:02X}"));
            s
        })
    }

    #[test]
    fn gb2312_quoted_printable_body_and_gbk_subject() {
        let raw = format!(
            "From: =?GB2312?B?{}?= <zhang@client.example.cn>\r\n\
             To: lab@seq.example.org\r\n\
             Subject: =?GBK?B?{}?=\r\n\
             Message-ID: <abc@client.example.cn>\r\n\
             Date: Tue, 5 Mar 2024 09:30:00 +0800\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=\"gb2312\"\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n\
             \r\n\
             {}\r\n",
            b64(&gbk("张三")),
            b64(&gbk("查询结果 报表")),
            qp(&gbk("请查询样本编号"))
        );
        let m = parse(raw.as_bytes()).unwrap();
        assert_eq!(m.subject, "查询结果 报表");
        assert_eq!(m.text.as_deref(), Some("请查询样本编号\n"));
        let from = m.from.as_ref().unwrap();
        assert_eq!(from.name.as_deref(), Some("张三"));
        assert_eq!(from.address, "zhang@client.example.cn");
        assert_eq!(from.to_string(), "张三 <zhang@client.example.cn>");
        assert_eq!(m.message_id.as_deref(), Some("<abc@client.example.cn>"));
        assert_eq!(m.date.unwrap().to_rfc3339(), "2024-03-05T09:30:00+08:00");
        assert!(m.html.is_none());
        assert!(m.attachments.is_empty());
    }

    #[test]
    fn big5_html_body_base64() {
        let raw = format!(
            "From: a@b.example\r\nTo: c@d.example\r\nSubject: =?big5?Q?{}?=\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: text/html; charset=big5\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{}\r\n",
            qp(&big5("報告")),
            b64(&big5("<p>你好，世界</p>"))
        );
        let m = parse(raw.as_bytes()).unwrap();
        assert_eq!(m.subject, "報告");
        assert_eq!(m.html.as_deref(), Some("<p>你好，世界</p>"));
        assert_eq!(m.body_text().as_deref().map(str::trim), Some("你好，世界"));
    }

    #[test]
    fn gb18030_alternative_with_rfc2231_continued_attachment_name() {
        let sql = gbk("select * from 样本 where 名称 = '测试';\n");
        let name = gbk("查询 语句.sql");
        let raw = format!(
            "From: a@b.example\r\nTo: c@d.example\r\nSubject: q\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n\
             --XX\r\n\
             Content-Type: multipart/alternative; boundary=\"YY\"\r\n\r\n\
             --YY\r\n\
             Content-Type: text/plain; charset=GB18030\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{}\r\n\
             --YY\r\n\
             Content-Type: text/html; charset=GB18030\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{}\r\n\
             --YY--\r\n\
             --XX\r\n\
             Content-Type: text/plain; charset=gbk;\r\n name*0*=gbk''{};\r\n name*1*={}\r\n\
             Content-Disposition: attachment;\r\n filename*0*=gbk''{};\r\n filename*1*={}\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{}\r\n\
             --XX--\r\n",
            b64(&gbk("正文")),
            b64(&gbk("<b>正文</b>")),
            pct(&name[..3]),
            pct(&name[3..]),
            pct(&name[..5]),
            pct(&name[5..]),
            b64(&sql)
        );
        let m = parse(raw.as_bytes()).unwrap();
        assert_eq!(m.text.as_deref(), Some("正文"));
        assert_eq!(m.html.as_deref(), Some("<b>正文</b>"));
        assert_eq!(m.attachments.len(), 1);
        let a = &m.attachments[0];
        assert_eq!(a.name.as_deref(), Some("查询 语句.sql"));
        assert_eq!(a.content_type, "text/plain");
        assert_eq!(a.charset.as_deref(), Some("gbk"));
        assert_eq!(
            a.data, sql,
            "attachment bytes are the sender's, not re-encoded"
        );
        assert_eq!(a.text(), "select * from 样本 where 名称 = '测试';\n");
        assert!(!a.inline);
    }

    #[test]
    fn rfc2047_attachment_name_and_binary_data() {
        let pdf = b"%PDF-1.4\n\x00\x01\x02\xff".to_vec();
        let raw = format!(
            "From: a@b.example\r\nTo: c@d.example\r\nSubject: x\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: multipart/mixed; boundary=\"B\"\r\n\r\n\
             --B\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nbody\r\n\
             --B\r\n\
             Content-Type: application/pdf; name=\"=?GBK?B?{}?=\"\r\n\
             Content-Disposition: attachment; filename=\"=?GBK?B?{}?=\"\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{}\r\n\
             --B--\r\n",
            b64(&gbk("报告.pdf")),
            b64(&gbk("报告.pdf")),
            b64(&pdf)
        );
        let m = parse(raw.as_bytes()).unwrap();
        assert_eq!(m.text.as_deref(), Some("body"));
        let a = &m.attachments[0];
        assert_eq!(a.name.as_deref(), Some("报告.pdf"));
        assert_eq!(a.content_type, "application/pdf");
        assert_eq!(a.data, pdf);
    }

    #[test]
    fn raw_8bit_gbk_headers_and_undeclared_body_fall_back() {
        let mut raw = b"From: a@b.example\r\nTo: c@d.example\r\nSubject: ".to_vec();
        raw.extend(gbk("样本报告"));
        raw.extend(b"\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\n");
        raw.extend(gbk("无字符集声明"));
        raw.extend(b"\r\n");
        let m = parse(&raw).unwrap();
        assert_eq!(m.subject, "样本报告");
        assert_eq!(m.text.as_deref(), Some("无字符集声明\n"));
        assert_eq!(m.raw(), raw.as_slice());
        let big = parse_with_fallback(&raw, encoding_rs::BIG5).unwrap();
        assert_ne!(big.subject, "样本报告");
    }

    #[test]
    fn not_a_message_is_an_error() {
        let err = parse(b"").unwrap_err();
        assert_eq!(err.exit(), crate::exit::Exit::Failed);
    }

    #[test]
    fn reply_threads_and_keeps_prefixes() {
        let raw = "From: \"Li, Si\" <li@client.example>\r\n\
                   Reply-To: reports@client.example\r\n\
                   To: lab@seq.example.org, other@client.example\r\n\
                   Cc: boss@client.example\r\n\
                   Subject: =?UTF-8?B?5p+l6K+i?=\r\n\
                   Message-ID: <m2@client.example>\r\n\
                   In-Reply-To: <m1@client.example>\r\n\
                   References: <m0@client.example> <m1@client.example>\r\n\r\nhi\r\n";
        let m = parse(raw.as_bytes()).unwrap();
        assert_eq!(
            m.from.as_ref().unwrap().to_string(),
            "\"Li, Si\" <li@client.example>"
        );
        assert_eq!(
            m.references,
            vec!["<m0@client.example>", "<m1@client.example>"]
        );
        let r = m
            .reply("Lab <lab@seq.example.org>")
            .text("ok")
            .build()
            .unwrap();
        let out = parse(&r.formatted()).unwrap();
        assert_eq!(out.subject, "Re: 查询");
        assert_eq!(out.to[0].address, "reports@client.example");
        assert_eq!(out.in_reply_to, vec!["<m2@client.example>"]);
        assert_eq!(
            out.references,
            vec![
                "<m0@client.example>",
                "<m1@client.example>",
                "<m2@client.example>"
            ]
        );
        assert_eq!(reply_subject("回复：查询"), "回复：查询");
        assert_eq!(reply_subject("RE: x"), "RE: x");

        let all = parse(
            &m.reply_all("lab@seq.example.org")
                .text("ok")
                .build()
                .unwrap()
                .formatted(),
        )
        .unwrap();
        let cc: Vec<_> = all.cc.iter().map(|a| a.address.as_str()).collect();
        assert_eq!(cc, ["other@client.example", "boss@client.example"]);
        assert!(!m.is_automatic());
    }

    #[test]
    fn automatic_messages_are_recognised() {
        let m =
            parse(b"From: MAILER-DAEMON@x.example\r\nTo: a@b.example\r\nSubject: fail\r\n\r\nx")
                .unwrap();
        assert!(m.is_automatic());
        let m =
            parse(b"From: a@x.example\r\nAuto-Submitted: auto-replied\r\nSubject: ooo\r\n\r\nx")
                .unwrap();
        assert!(m.is_automatic());
    }
}
