//! The reply: result files zipped, the zip split over several mails when one would be
//! larger than `max_mail_bytes` (counted after base64), and a plain-text summary in
//! English or Chinese.
//!
//! Split parts are byte ranges of one zip file, attached as `result.zip.001`,
//! `result.zip.002`, …, so that `cat result.zip.0* > result.zip` (or `copy /b` on
//! Windows) rejoins them; every part's body says "part i of n" and how to join.

use std::fmt::Write as _;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use labrelay::mail::Attachment;

/// Room left in each mail for headers and the body text.
const MAIL_OVERHEAD: u64 = 32 * 1024;

/// The name of the zip in the reply.
pub const ZIP_NAME: &str = "result.zip";

/// Zip `files` (path, name in the archive) into `zip_path`, streaming each file.
///
/// # Errors
/// I/O errors reading a file or writing the zip.
pub fn zip_files(files: &[(PathBuf, String)], zip_path: &Path) -> anyhow::Result<u64> {
    let out = fs_err::File::create(zip_path)?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(out));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    for (path, name) in files {
        zip.start_file(name.as_str(), options)?;
        let mut f = fs_err::File::open(path)?;
        std::io::copy(&mut f, &mut zip)?;
    }
    let mut inner = zip.finish()?;
    inner.flush()?;
    let file = inner
        .into_inner()
        .map_err(std::io::IntoInnerError::into_error)?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

/// The largest attachment (raw bytes) that fits a mail of `max_mail_bytes` once
/// base64-encoded (4/3, plus CRLF every 76 characters).
pub fn part_capacity(max_mail_bytes: u64) -> u64 {
    let room = max_mail_bytes.saturating_sub(MAIL_OVERHEAD);
    // 57 raw bytes make one 76-character line plus CRLF: 78 bytes.
    (room / 78 * 57).max(1024)
}

/// The zip's byte ranges, one per mail.
pub fn split(len: u64, capacity: u64) -> Vec<(u64, u64)> {
    if len == 0 {
        return vec![(0, 0)];
    }
    (0..len.div_ceil(capacity))
        .map(|i| (i * capacity, ((i + 1) * capacity).min(len)))
        .collect()
}

/// The attachments of mail `i` (0-based) of `n`: the whole zip when `n == 1`, else part
/// `i + 1` as `result.zip.00N`.
pub fn part_attachment(
    zip_path: &Path,
    range: (u64, u64),
    i: usize,
    n: usize,
) -> anyhow::Result<Attachment> {
    let mut f = fs_err::File::open(zip_path)?;
    f.seek(std::io::SeekFrom::Start(range.0))?;
    let len = usize::try_from(range.1 - range.0)?;
    let mut data = vec![0; len];
    f.read_exact(&mut data)?;
    Ok(if n == 1 {
        Attachment::new(ZIP_NAME, "application/zip", data)
    } else {
        Attachment::new(
            format!("{ZIP_NAME}.{:03}", i + 1),
            "application/octet-stream",
            data,
        )
    })
}

/// The language of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// English.
    En,
    /// Chinese.
    Zh,
}

/// One statement's line in the summary.
#[derive(Debug, Clone)]
pub struct StatementLine {
    /// Attachment name.
    pub file: String,
    /// 1-based statement number in its attachment.
    pub index: usize,
    /// Result file name, when it ran.
    pub result: Option<String>,
    /// Rows exported.
    pub rows: u64,
    /// The row cap cut the result.
    pub truncated: bool,
    /// Seconds it took.
    pub seconds: f64,
    /// Why it produced no result, in plain words.
    pub error: Option<String>,
    /// The error's category ("syntax error", "query too long", …), for logs.
    pub kind: Option<&'static str>,
}

/// The longest body text (bytes): each mail of a reply repeats it, and its encoded
/// size must stay inside the room kept for headers and text.
pub const MAX_BODY: usize = 12 * 1024;

/// `text` cut to [`MAX_BODY`] at a line end, saying how much was left out.
pub fn cap_body(text: String) -> String {
    if text.len() <= MAX_BODY {
        return text;
    }
    let mut end = MAX_BODY - 200;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let end = text[..end].rfind('\n').unwrap_or(end);
    let left = text[end..].lines().filter(|l| !l.trim().is_empty()).count();
    format!("{}\n… ({left} more lines not shown)\n", &text[..end])
}

/// The summary of an answered request.
#[derive(Debug, Clone)]
pub struct Summary<'a> {
    /// Queryable database.
    pub database: &'a str,
    /// Statements, in order.
    pub statements: &'a [StatementLine],
    /// Attachments that were not used.
    pub ignored: &'a [String],
    /// Row cap.
    pub max_rows: u64,
}

/// The words of an answer, per language.
struct Words {
    head: fn(&str, usize, usize, usize) -> String,
    error: fn(&str, usize, &str) -> String,
    result: fn(&str, usize, u64, f64, &str) -> String,
    truncated: fn(u64) -> String,
    ignored: &'static str,
    separator: &'static str,
    attached: &'static str,
}

const EN: Words = Words {
    head: |db, n, ok, failed| {
        format!("Database: {db}\nStatements: {n} ({ok} answered, {failed} failed)\n")
    },
    error: |file, i, e| format!("{file} #{i}: error: {e}"),
    result: |file, i, rows, secs, r| format!("{file} #{i}: {rows} rows in {secs:.1} s -> {r}"),
    truncated: |max| format!(" (truncated at {max} rows)"),
    ignored: "Ignored attachments: ",
    separator: ", ",
    attached: "The results are in the attached result.zip.",
};

const ZH: Words = Words {
    head: |db, n, ok, failed| {
        format!("数据库：{db}\n语句：{n} 条（成功 {ok} 条，失败 {failed} 条）\n")
    },
    error: |file, i, e| format!("{file} 第 {i} 条：错误：{e}"),
    result: |file, i, rows, secs, r| {
        format!("{file} 第 {i} 条：{rows} 行，用时 {secs:.1} 秒 -> {r}")
    },
    truncated: |max| format!("（结果已截断，仅前 {max} 行）"),
    ignored: "未使用的附件：",
    separator: "，",
    attached: "结果见附件 result.zip。",
};

/// The body of an answered request.
pub fn answer_text(lang: Lang, s: &Summary<'_>) -> String {
    let w = match lang {
        Lang::En => &EN,
        Lang::Zh => &ZH,
    };
    let ok = s.statements.iter().filter(|l| l.error.is_none()).count();
    let mut t = (w.head)(s.database, s.statements.len(), ok, s.statements.len() - ok);
    t.push('\n');
    for l in s.statements {
        let line = match (&l.result, &l.error) {
            (_, Some(e)) => (w.error)(&l.file, l.index, e),
            (Some(r), None) => {
                let mut line = (w.result)(&l.file, l.index, l.rows, l.seconds, r);
                if l.truncated {
                    line.push_str(&(w.truncated)(s.max_rows));
                }
                line
            }
            (None, None) => continue,
        };
        t.push_str(&line);
        t.push('\n');
    }
    if !s.ignored.is_empty() {
        let _ = writeln!(t, "\n{}{}", w.ignored, s.ignored.join(w.separator));
    }
    if ok > 0 {
        let _ = writeln!(t, "\n{}", w.attached);
    }
    t
}

/// The line that tells how to join split parts, for mail `i` (0-based) of `n`.
pub fn part_text(lang: Lang, i: usize, n: usize) -> String {
    match lang {
        Lang::En => format!(
            "This is part {} of {n} of the result. Save all {n} parts in one folder, then \
             join them:\n  cat {ZIP_NAME}.0* > {ZIP_NAME}          (Linux, macOS)\n  \
             copy /b {ZIP_NAME}.001+{ZIP_NAME}.002... {ZIP_NAME}   (Windows)\n",
            i + 1
        ),
        Lang::Zh => format!(
            "这是结果的第 {} 部分，共 {n} 部分。请把 {n} 个部分保存在同一文件夹，然后合并：\n  \
             cat {ZIP_NAME}.0* > {ZIP_NAME}          （Linux、macOS）\n  \
             copy /b {ZIP_NAME}.001+{ZIP_NAME}.002... {ZIP_NAME}   （Windows）\n",
            i + 1
        ),
    }
}

/// A refusal or failure body: `reason` in plain words, and the statements refused.
pub fn refusal_text(lang: Lang, reason: &str, details: &[String]) -> String {
    let mut t = match lang {
        Lang::En => format!("Your query was not run: {reason}\n"),
        Lang::Zh => format!("您的查询未执行：{reason}\n"),
    };
    if !details.is_empty() {
        t.push('\n');
        for d in details {
            t.push_str(d);
            t.push('\n');
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_zip_exactly() {
        assert_eq!(split(0, 10), vec![(0, 0)]);
        assert_eq!(split(10, 10), vec![(0, 10)]);
        assert_eq!(split(25, 10), vec![(0, 10), (10, 20), (20, 25)]);
    }

    #[test]
    fn a_part_fits_its_mail_after_base64() {
        for max in [64 * 1024, 1024 * 1024, 20 * 1024 * 1024] {
            let cap = part_capacity(max);
            let encoded = cap.div_ceil(57) * 78;
            assert!(encoded + MAIL_OVERHEAD <= max, "{max}: {cap} -> {encoded}");
        }
    }
}
