//! Header encodings mail-parser leaves to us: RFC 2047 encoded-words whose multi-byte
//! characters are split across words, RFC 2231 parameters (`filename*=`, continuations
//! `filename*0*=`) whose charset applies to the joined bytes, and raw 8-bit headers in a
//! legacy charset, as Chinese Outlook and Foxmail clients send them.

use std::borrow::Cow;

use base64::Engine as _;
use encoding_rs::Encoding;

/// The charset assumed for undeclared 8-bit text that is not UTF-8. GB18030 is a superset
/// of GBK and GB2312, the encodings of the Chinese clients our customers use.
pub(crate) const DEFAULT_FALLBACK: &Encoding = encoding_rs::GB18030;

/// The encoding for a MIME charset label, including the Microsoft aliases that the WHATWG
/// label list (which encoding_rs follows) does not know.
pub(crate) fn encoding_for_label(label: &str) -> Option<&'static Encoding> {
    let label = label.trim().trim_matches('"');
    // RFC 2231 section 5: a language may follow the charset (`GBK*zh-cn`).
    let label = label.split('*').next().unwrap_or(label);
    Encoding::for_label(label.as_bytes()).or_else(|| match label.to_ascii_lowercase().as_str() {
        "cp936" | "ms936" | "windows-936" | "936" => Some(encoding_rs::GBK),
        "cp950" | "ms950" | "windows-950" | "950" | "big5hkscs" => Some(encoding_rs::BIG5),
        "cp54936" | "windows-54936" => Some(encoding_rs::GB18030),
        "cp932" | "ms932" | "windows-932" => Some(encoding_rs::SHIFT_JIS),
        "cp949" | "ms949" | "windows-949" => Some(encoding_rs::EUC_KR),
        "utf8" => Some(encoding_rs::UTF_8),
        _ => None,
    })
}

/// Decode bytes in a declared charset. An unknown or absent charset means UTF-8 when the
/// bytes are valid UTF-8 and `fallback` otherwise.
pub(crate) fn decode_bytes(
    bytes: &[u8],
    charset: Option<&str>,
    fallback: &'static Encoding,
) -> String {
    if let Some(enc) = charset.and_then(encoding_for_label) {
        return enc.decode_without_bom_handling(bytes).0.into_owned();
    }
    decode_undeclared(bytes, fallback)
}

/// UTF-8 if valid, else `fallback`.
pub(crate) fn decode_undeclared(bytes: &[u8], fallback: &'static Encoding) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => fallback.decode_without_bom_handling(bytes).0.into_owned(),
    }
}

/// Remove header folding (CRLF followed by white space) and surrounding white space.
pub(crate) fn unfold(value: &str) -> String {
    // Dropping every CR and LF unfolds: the white space that continues a line stays.
    let out: String = value.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    out.trim().to_owned()
}

/// A header value's raw bytes as text: UTF-8 (RFC 6532) if valid, else `fallback`, unfolded.
pub(crate) fn header_text(raw: &[u8], fallback: &'static Encoding) -> String {
    unfold(&decode_undeclared(raw, fallback))
}

struct EncodedWord<'a> {
    charset: &'a str,
    bytes: Vec<u8>,
    len: usize,
}

/// Parse one encoded word `=?charset?B|Q?text?=` at the start of `s`.
fn encoded_word(s: &str) -> Option<EncodedWord<'_>> {
    let rest = s.strip_prefix("=?")?;
    let q1 = rest.find('?')?;
    let charset = &rest[..q1];
    let rest = &rest[q1 + 1..];
    let mut it = rest.chars();
    let kind = it.next()?.to_ascii_uppercase();
    if it.next()? != '?' {
        return None;
    }
    let text_start = 2;
    let end = rest[text_start..].find("?=")?;
    let text = &rest[text_start..text_start + end];
    if text.contains(|c: char| c.is_whitespace()) {
        return None;
    }
    let bytes = match kind {
        'B' => base64_lenient(text)?,
        'Q' => q_decode(text)?,
        _ => return None,
    };
    Some(EncodedWord {
        charset,
        bytes,
        len: 2 + q1 + 1 + text_start + end + 2,
    })
}

fn base64_lenient(text: &str) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const ENGINE: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    ENGINE.decode(text.trim_end_matches('=')).ok()
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn q_decode(text: &str) -> Option<Vec<u8>> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'_' => out.push(b' '),
            b'=' => {
                let h = hex_val(*b.get(i + 1)?)?;
                let l = hex_val(*b.get(i + 2)?)?;
                out.push(h << 4 | l);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    Some(out)
}

/// Decode RFC 2047 encoded-words in unfolded header text. Adjacent words in the same
/// charset are joined before decoding, because encoders (Outlook among them) split a
/// multi-byte character across two words; white space between encoded words is dropped.
pub(crate) fn decode_rfc2047(text: &str, fallback: &'static Encoding) -> String {
    if !text.contains("=?") {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    // Bytes of consecutive encoded words in one charset, not yet decoded.
    let mut pending: Option<(String, Vec<u8>)> = None;
    // White space seen after an encoded word; kept only if plain text follows.
    let mut gap = String::new();
    let flush = |pending: &mut Option<(String, Vec<u8>)>, out: &mut String| {
        if let Some((charset, bytes)) = pending.take() {
            out.push_str(&decode_bytes(&bytes, Some(&charset), fallback));
        }
    };
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        if rest.starts_with("=?")
            && let Some(word) = encoded_word(rest)
        {
            match &mut pending {
                Some((cs, bytes)) if cs.eq_ignore_ascii_case(word.charset) => {
                    bytes.extend_from_slice(&word.bytes);
                }
                _ => {
                    flush(&mut pending, &mut out);
                    pending = Some((word.charset.to_owned(), word.bytes));
                }
            }
            gap.clear();
            i += word.len;
            continue;
        }
        let Some(c) = rest.chars().next() else { break };
        if pending.is_some() && (c == ' ' || c == '\t') {
            gap.push(c);
        } else {
            flush(&mut pending, &mut out);
            out.push_str(&gap);
            gap.clear();
            out.push(c);
        }
        i += c.len_utf8();
    }
    flush(&mut pending, &mut out);
    out.push_str(&gap);
    out
}

/// One `key=value` parameter of a structured header, the value unquoted.
#[derive(Debug, PartialEq, Eq)]
struct Param {
    key: String,
    value: String,
}

/// The parameters after the first `;` of a Content-Type or Content-Disposition value.
fn params(value: &str) -> Vec<Param> {
    let mut out = Vec::new();
    let mut chars = value.char_indices().peekable();
    // Skip the type/disposition itself.
    let mut in_quotes = false;
    for (_, c) in chars.by_ref() {
        match c {
            '"' => in_quotes = !in_quotes,
            ';' if !in_quotes => break,
            _ => {}
        }
    }
    loop {
        let mut key = String::new();
        while let Some(&(_, c)) = chars.peek() {
            chars.next();
            if c == '=' {
                break;
            }
            if c == ';' {
                key.clear();
                continue;
            }
            key.push(c);
        }
        let key = key.trim().to_ascii_lowercase();
        if key.is_empty() {
            break;
        }
        while chars.peek().is_some_and(|&(_, c)| c == ' ' || c == '\t') {
            chars.next();
        }
        let mut val = String::new();
        if chars.peek().is_some_and(|&(_, c)| c == '"') {
            chars.next();
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            val.push(n);
                        }
                    }
                    '"' => break,
                    c => val.push(c),
                }
            }
            // Skip to the next parameter.
            for (_, c) in chars.by_ref() {
                if c == ';' {
                    break;
                }
            }
        } else {
            for (_, c) in chars.by_ref() {
                if c == ';' {
                    break;
                }
                val.push(c);
            }
            // Leading white space was skipped above.
            val.truncate(val.trim_end().len());
        }
        out.push(Param { key, value: val });
        if chars.peek().is_none() {
            break;
        }
    }
    out
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex_val),
                b.get(i + 2).copied().and_then(hex_val),
            )
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Split an RFC 2231 extended value `charset'language'percent-encoded`.
fn split_extended(value: &str) -> (Option<&str>, &str) {
    let mut parts = value.splitn(3, '\'');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(cs), Some(_lang), Some(rest)) => ((!cs.is_empty()).then_some(cs), rest),
        _ => (None, value),
    }
}

/// The value of parameter `name` in an unfolded Content-Type/Content-Disposition value,
/// decoded: RFC 2231 `name*=charset''…` and continuations `name*0*=…; name*1*=…` (the
/// charset of segment 0 applies to the joined bytes), or a plain value that may hold RFC
/// 2047 encoded-words (what Outlook and Foxmail write).
pub(crate) fn decoded_param(
    header_value: &str,
    name: &str,
    fallback: &'static Encoding,
) -> Option<String> {
    let params = params(header_value);
    let ext_key = format!("{name}*");
    if let Some(p) = params.iter().find(|p| p.key == ext_key) {
        let (charset, rest) = split_extended(&p.value);
        return Some(decode_bytes(&percent_decode(rest), charset, fallback));
    }

    let mut segments: Vec<(u32, bool, &str)> = params
        .iter()
        .filter_map(|p| {
            let rest = p.key.strip_prefix(&ext_key)?;
            let (num, encoded) = match rest.strip_suffix('*') {
                Some(n) => (n, true),
                None => (rest, false),
            };
            Some((num.parse().ok()?, encoded, p.value.as_str()))
        })
        .collect();
    if !segments.is_empty() {
        segments.sort_by_key(|s| s.0);
        let mut charset = None;
        let mut bytes = Vec::new();
        for (i, (_, encoded, value)) in segments.iter().enumerate() {
            if *encoded {
                let value = if i == 0 {
                    let (cs, rest) = split_extended(value);
                    charset = cs;
                    rest
                } else {
                    value
                };
                bytes.extend(percent_decode(value));
            } else {
                bytes.extend_from_slice(value.as_bytes());
            }
        }
        let joined = decode_bytes(&bytes, charset, fallback);
        return Some(decode_rfc2047(&joined, fallback));
    }

    params
        .iter()
        .find(|p| p.key == name)
        .map(|p| decode_rfc2047(&p.value, fallback))
}

/// The first `;`-separated item of a structured header value, lowercased
/// (`text/plain`, `attachment`).
pub(crate) fn main_value(header_value: &str) -> String {
    header_value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches('"')
        .to_ascii_lowercase()
}

/// Re-apply a part's Content-Transfer-Encoding to its raw body bytes.
pub(crate) fn transfer_decode(raw: &[u8], encoding: mail_parser::Encoding) -> Cow<'_, [u8]> {
    match encoding {
        mail_parser::Encoding::Base64 => {
            let cleaned: Vec<u8> = raw
                .iter()
                .copied()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            let text = String::from_utf8_lossy(&cleaned);
            base64_lenient(&text).map_or(Cow::Borrowed(raw), Cow::Owned)
        }
        mail_parser::Encoding::QuotedPrintable => {
            mail_parser::decoders::quoted_printable::quoted_printable_decode(raw)
                .map_or(Cow::Borrowed(raw), Cow::Owned)
        }
        mail_parser::Encoding::None => Cow::Borrowed(raw),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    fn gbk(s: &str) -> Vec<u8> {
        encoding_rs::GBK.encode(s).0.into_owned()
    }

    fn pct(bytes: &[u8]) -> String {
        bytes.iter().fold(String::new(), |mut s, b| {
            let _ = std::fmt::Write::write_fmt(&mut s, format_args!("%{b:02X}"));
            s
        })
    }

    #[test]
    fn labels_include_microsoft_aliases() {
        assert_eq!(encoding_for_label("gb2312"), Some(encoding_rs::GBK));
        assert_eq!(encoding_for_label("CP936"), Some(encoding_rs::GBK));
        assert_eq!(encoding_for_label("GBK*zh-cn"), Some(encoding_rs::GBK));
        assert_eq!(encoding_for_label("big5"), Some(encoding_rs::BIG5));
        assert_eq!(encoding_for_label("x-unknown"), None);
    }

    #[test]
    fn split_multibyte_character_across_encoded_words_is_joined() {
        let bytes = gbk("查询结果");
        let b64 = base64::engine::general_purpose::STANDARD;
        // Split inside the second character.
        let text = format!(
            "=?GBK?B?{}?= =?GBK?B?{}?= done",
            b64.encode(&bytes[..3]),
            b64.encode(&bytes[3..])
        );
        assert_eq!(decode_rfc2047(&text, DEFAULT_FALLBACK), "查询结果 done");
    }

    #[test]
    fn q_words_and_plain_text_mix() {
        let text = "Re: =?utf-8?Q?caf=C3=A9_au_lait?= and =?ISO-8859-1?Q?na=EFve?=";
        assert_eq!(
            decode_rfc2047(text, DEFAULT_FALLBACK),
            "Re: café au lait and naïve"
        );
        assert_eq!(decode_rfc2047("=?bogus", DEFAULT_FALLBACK), "=?bogus");
    }

    #[test]
    fn rfc2231_extended_and_continued_filenames() {
        let name = "查询结果 报表.sql";
        let v = format!("attachment; filename*=GBK''{}", pct(&gbk(name)));
        assert_eq!(
            decoded_param(&v, "filename", DEFAULT_FALLBACK).as_deref(),
            Some(name)
        );

        // Continuations split in the middle of a GBK character; only segment 0 names the
        // charset, and segment 2 is not percent-encoded.
        let bytes = gbk("查询结果");
        let v = format!(
            "attachment;\r\n filename*0*=gbk'zh'{};\r\n filename*1*={};\r\n filename*2=\".sql\"",
            pct(&bytes[..3]),
            pct(&bytes[3..])
        );
        let v = unfold(&v);
        assert_eq!(
            decoded_param(&v, "filename", DEFAULT_FALLBACK).as_deref(),
            Some("查询结果.sql")
        );

        let b64 = base64::engine::general_purpose::STANDARD.encode(gbk("报表"));
        let v = format!("attachment; filename=\"=?GB2312?B?{b64}?=.sql\"; size=3");
        let v = v.as_str();
        assert_eq!(
            decoded_param(v, "filename", DEFAULT_FALLBACK).as_deref(),
            Some("报表.sql")
        );
        assert_eq!(
            decoded_param(v, "size", DEFAULT_FALLBACK).as_deref(),
            Some("3")
        );
        assert_eq!(decoded_param(v, "nothere", DEFAULT_FALLBACK), None);
    }

    #[test]
    fn quoted_values_keep_semicolons_and_escapes() {
        let v = r#"text/plain; name="a;b \"c\".txt"; charset=gbk"#;
        assert_eq!(
            decoded_param(v, "name", DEFAULT_FALLBACK).as_deref(),
            Some(r#"a;b "c".txt"#)
        );
        assert_eq!(
            decoded_param(v, "charset", DEFAULT_FALLBACK).as_deref(),
            Some("gbk")
        );
        assert_eq!(main_value(v), "text/plain");
    }

    #[test]
    fn undeclared_8bit_falls_back() {
        assert_eq!(decode_undeclared(&gbk("报表"), DEFAULT_FALLBACK), "报表");
        assert_eq!(
            decode_undeclared("报表".as_bytes(), DEFAULT_FALLBACK),
            "报表"
        );
        assert_eq!(header_text(b" a\r\n b\r\n", DEFAULT_FALLBACK), "a b");
    }
}
