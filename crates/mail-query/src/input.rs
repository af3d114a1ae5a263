//! SQL files as staff save them: UTF-8 (with or without BOM), UTF-16 with a BOM, or
//! GBK/GB2312/GB18030 from Chinese Windows editors; CRLF line ends. This module turns
//! their bytes into text and nothing else.

use encoding_rs::{Encoding, GB18030, UTF_8};

/// The largest SQL text accepted (a query, not a data load).
pub const MAX_SQL_BYTES: usize = 4 * 1024 * 1024;

/// Why bytes are not SQL text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    /// Larger than [`MAX_SQL_BYTES`].
    #[error("larger than {MAX_SQL_BYTES} bytes; a SQL file should hold queries, not data")]
    TooLarge,
    /// Not valid in any accepted encoding.
    #[error("not text in UTF-8, UTF-16 (with BOM) or GB18030/GBK")]
    NotText,
}

/// Decode a SQL file: a BOM decides (UTF-8, UTF-16LE/BE); without one, UTF-8 when
/// valid, else GB18030 (a superset of GBK and GB2312). CRLF and lone CR become LF.
pub fn decode(bytes: &[u8]) -> Result<String, InputError> {
    if bytes.len() > MAX_SQL_BYTES {
        return Err(InputError::TooLarge);
    }
    let (encoding, body): (&'static Encoding, &[u8]) = match Encoding::for_bom(bytes) {
        Some((enc, bom_len)) => (enc, &bytes[bom_len..]),
        None if std::str::from_utf8(bytes).is_ok() => (UTF_8, bytes),
        None => (GB18030, bytes),
    };
    let text = encoding
        .decode_without_bom_handling_and_without_replacement(body)
        .ok_or(InputError::NotText)?;
    if text.contains('\0') {
        return Err(InputError::NotText);
    }
    Ok(text.replace("\r\n", "\n").replace('\r', "\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SQL: &str = "SELECT '样本' AS 名称;\nSELECT 2";

    #[test]
    fn every_accepted_encoding_decodes_to_the_same_text() {
        let gbk = encoding_rs::GBK.encode(SQL).0.into_owned();
        let mut utf8_bom = b"\xEF\xBB\xBF".to_vec();
        utf8_bom.extend_from_slice(SQL.as_bytes());
        let mut le = vec![0xFF, 0xFE];
        let mut be = vec![0xFE, 0xFF];
        for u in SQL.encode_utf16() {
            le.extend_from_slice(&u.to_le_bytes());
            be.extend_from_slice(&u.to_be_bytes());
        }
        let crlf = SQL.replace('\n', "\r\n");
        for bytes in [SQL.as_bytes(), &gbk, &utf8_bom, &le, &be, crlf.as_bytes()] {
            assert_eq!(decode(bytes).unwrap(), SQL, "{bytes:?}");
        }
    }

    #[test]
    fn binary_and_huge_inputs_are_refused() {
        assert_eq!(decode(b"SELECT 1\0"), Err(InputError::NotText));
        // 0xFF is not valid in GB18030 either.
        assert_eq!(decode(b"\x81\xFF\xFF"), Err(InputError::NotText));
        assert_eq!(
            decode(&vec![b' '; MAX_SQL_BYTES + 1]),
            Err(InputError::TooLarge)
        );
    }
}
