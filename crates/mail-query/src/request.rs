//! What a request mail asks for: the database keyword, the optional format keyword and
//! the SQL attachments, read from a parsed message ([`labrelay::mail::parse`]).
//!
//! Keywords are lines of the body (the HTML body turned into text when there is no
//! text part): `database: NAME` (also `db:` and `数据库:`), `format: xlsx|csv|tsv`
//! (also `格式:`); case-insensitive, ASCII or full-width colon, `=` accepted. SQL comes
//! from attachments named `*.sql` or `*.txt`, in UTF-8, UTF-16 with BOM or GBK/GB18030;
//! every other attachment (signature images, inline pictures) is ignored and named in
//! the reply.

use labrelay::mail::{IncomingAttachment, IncomingMail};

use crate::config::Format;

/// One SQL attachment.
#[derive(Debug, Clone)]
pub struct SqlFile {
    /// The attachment's name as the sender gave it.
    pub name: String,
    /// Its name made safe for result files (no path, no control characters).
    pub stem: String,
    /// Its text.
    pub text: String,
}

/// A request, as the mail states it.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// The `database:` keyword, as written.
    pub database: Option<String>,
    /// The `format:` keyword, when given and known.
    pub format: Option<Format>,
    /// An unknown `format:` value, as written.
    pub bad_format: Option<String>,
    /// SQL attachments, in order.
    pub sql: Vec<SqlFile>,
    /// SQL attachments that could not be decoded: name and why.
    pub unreadable: Vec<(String, String)>,
    /// Other attachments, by name (or content type), not used.
    pub ignored: Vec<String>,
    /// The request is written in Chinese (subject or body).
    pub chinese: bool,
}

/// Read the request out of `mail`.
pub fn read(mail: &IncomingMail) -> Request {
    let body = mail.body_text().unwrap_or_default();
    let mut req = Request {
        chinese: has_cjk(&mail.subject) || has_cjk(&body),
        ..Request::default()
    };
    for line in body.lines().chain(std::iter::once(mail.subject.as_str())) {
        if let Some(v) = keyword(line, &["database", "db", "数据库"]) {
            req.database.get_or_insert(v);
        } else if let Some(v) = keyword(line, &["format", "格式"])
            && req.format.is_none()
            && req.bad_format.is_none()
        {
            match v.to_ascii_lowercase().as_str() {
                "csv" => req.format = Some(Format::Csv),
                "tsv" => req.format = Some(Format::Tsv),
                "xlsx" | "excel" => req.format = Some(Format::Xlsx),
                _ => req.bad_format = Some(v),
            }
        }
    }
    let mut stems: Vec<String> = Vec::new();
    for a in &mail.attachments {
        let name = display_name(a);
        if !is_sql(a) {
            req.ignored.push(name);
            continue;
        }
        match crate::input::decode(&a.data) {
            Ok(text) => {
                let mut stem = stem(&name);
                let base = stem.clone();
                let mut n = 2;
                while stems.contains(&stem) {
                    stem = format!("{base}_{n}");
                    n += 1;
                }
                stems.push(stem.clone());
                req.sql.push(SqlFile { name, stem, text });
            }
            Err(e) => req.unreadable.push((name, e.to_string())),
        }
    }
    req
}

/// The value of `KEY: value` when `line` starts with one of `keys` (any case).
fn keyword(line: &str, keys: &[&str]) -> Option<String> {
    let line = line.trim_start_matches(|c: char| c.is_whitespace() || c == '>');
    for key in keys {
        let Some(head) = line.get(..key.len()) else {
            continue;
        };
        if !head.eq_ignore_ascii_case(key) {
            continue;
        }
        let rest = line[key.len()..].trim_start();
        let Some(rest) = rest
            .strip_prefix(':')
            .or_else(|| rest.strip_prefix('：'))
            .or_else(|| rest.strip_prefix('='))
        else {
            continue;
        };
        let value = rest
            .trim()
            .split(char::is_whitespace)
            .next()
            .unwrap_or_default()
            .trim_end_matches(['.', ',', ';', '。', '，', '；']);
        if !value.is_empty() {
            return Some(value.to_owned());
        }
    }
    None
}

fn display_name(a: &IncomingAttachment) -> String {
    a.name
        .clone()
        .unwrap_or_else(|| format!("unnamed {}", a.content_type))
}

fn is_sql(a: &IncomingAttachment) -> bool {
    let Some(name) = &a.name else {
        return a.content_type.eq_ignore_ascii_case("application/sql");
    };
    std::path::Path::new(name)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("sql") || e.eq_ignore_ascii_case("txt"))
}

/// A file-name stem from an attachment name: the last path component without its
/// extension; characters other than letters, digits, `-` and `_` become `_`.
pub fn stem(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let base = base.rsplit_once('.').map_or(base, |(s, _)| s);
    let s: String = base
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(80)
        .collect();
    let s = s.trim_matches('_').to_owned();
    if s.is_empty() { "query".to_owned() } else { s }
}

/// Whether `s` holds CJK ideographs.
pub fn has_cjk(s: &str) -> bool {
    s.chars()
        .any(|c| matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_in_any_case_with_full_width_colons() {
        assert_eq!(
            keyword("database: lims", &["database"]),
            Some("lims".into())
        );
        assert_eq!(
            keyword("  DataBase：LIMS。", &["database"]),
            Some("LIMS".into())
        );
        assert_eq!(keyword("> db = erp", &["db"]), Some("erp".into()));
        assert_eq!(
            keyword("数据库：样本库", &["数据库"]),
            Some("样本库".into())
        );
        assert_eq!(keyword("the database is lims", &["database"]), None);
        assert_eq!(keyword("database:", &["database"]), None);
        assert_eq!(keyword("databases: x", &["database"]), None);
    }

    #[test]
    fn stems_are_safe_file_names() {
        assert_eq!(stem("report.sql"), "report");
        assert_eq!(stem("../../etc/passwd.sql"), "passwd");
        assert_eq!(stem("C:\\x\\月报 2024.sql"), "月报_2024");
        assert_eq!(stem(".sql"), "query");
        assert_eq!(stem("a\u{0}b.txt"), "a_b");
    }
}
