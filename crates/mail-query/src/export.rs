//! Writing result rows to a file, one row at a time: CSV (RFC 4180), TSV and XLSX.
//!
//! This module owns the file formats only; it never sees a database. Each value arrives
//! already as text (or as NULL) from [`crate::run`], which owns the conversion of
//! database values to text. Nothing is kept beyond the current field: memory does not
//! grow with the number of rows.
//!
//! - CSV: UTF-8, optional byte order mark (Excel needs it to read UTF-8), a header row
//!   with the column names, CRLF line ends; a field is quoted when it contains a comma,
//!   a double quote, CR or LF (quotes doubled). NULL is an empty field; an empty string
//!   is `""`, so the two stay distinguishable.
//! - TSV: UTF-8, header row, LF line ends; in values a backslash is written `\\`, a tab
//!   `\t`, a line feed `\n`, a carriage return `\r`. NULL and the empty string are both
//!   an empty field.
//! - XLSX: rust_xlsxwriter in constant-memory mode (each finished row goes to a
//!   temporary file beside the result, the workbook is assembled at the end); a header
//!   row, then one row per result row. A value that reads as a plain decimal number
//!   (no leading zeros, at most 15 significant digits, so Excel keeps it exact) is a
//!   number cell, anything else a text cell; NULL is an empty cell. Text longer than
//!   Excel's 32,767 characters is cut there. After 1,048,575 rows the rows continue on
//!   a new sheet (`result 2`, …) with the header again.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The file formats this module writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// RFC 4180 CSV; `bom` puts a UTF-8 byte order mark first (for Excel).
    Csv {
        /// Write a UTF-8 byte order mark before the header.
        bom: bool,
    },
    /// Tab-separated values with backslash escapes.
    Tsv,
    /// Excel workbook.
    Xlsx,
}

/// Rows of one XLSX sheet, the header included (Excel's limit).
const XLSX_SHEET_ROWS: u32 = 1_048_576;
/// Characters of one XLSX cell (Excel's limit).
const XLSX_CELL_CHARS: usize = 32_767;

/// An XLSX workbook being written.
struct Xlsx {
    book: rust_xlsxwriter::Workbook,
    sheet: usize,
    row: u32,
    col: u16,
    header: Vec<String>,
}

fn xlsx_err(e: &rust_xlsxwriter::XlsxError) -> io::Error {
    io::Error::other(format!("writing the workbook: {e}"))
}

impl Xlsx {
    fn new(dir: &Path) -> io::Result<Xlsx> {
        let mut book = rust_xlsxwriter::Workbook::new();
        book.set_tempdir(dir).map_err(|e| xlsx_err(&e))?;
        let mut x = Xlsx {
            book,
            sheet: 0,
            row: 0,
            col: 0,
            header: Vec::new(),
        };
        x.add_sheet()?;
        x.sheet = 0;
        Ok(x)
    }

    fn add_sheet(&mut self) -> io::Result<()> {
        let n = self.sheet + 1;
        let ws = self
            .book
            .add_worksheet_with_constant_memory()
            .map_err(|e| xlsx_err(&e))?;
        ws.set_name(if n == 1 {
            "result".to_owned()
        } else {
            format!("result {n}")
        })
        .map_err(|e| xlsx_err(&e))?;
        Ok(())
    }

    fn field(&mut self, value: Option<&str>) -> io::Result<()> {
        if self.row >= XLSX_SHEET_ROWS {
            self.sheet += 1;
            self.add_sheet()?;
            self.row = 0;
            let header = std::mem::take(&mut self.header);
            for (i, h) in header.iter().enumerate() {
                let ws = self
                    .book
                    .worksheet_from_index(self.sheet)
                    .map_err(|e| xlsx_err(&e))?;
                ws.write_string(0, u16::try_from(i).unwrap_or(u16::MAX), h)
                    .map_err(|e| xlsx_err(&e))?;
            }
            self.header = header;
            self.row = 1;
        }
        let (row, col) = (self.row, self.col);
        self.col = self.col.saturating_add(1);
        let Some(v) = value else { return Ok(()) };
        let ws = self
            .book
            .worksheet_from_index(self.sheet)
            .map_err(|e| xlsx_err(&e))?;
        match as_number(v) {
            Some(n) => ws.write_number(row, col, n),
            None => ws.write_string(row, col, cut(v)),
        }
        .map_err(|e| xlsx_err(&e))?;
        Ok(())
    }

    fn end_row(&mut self) {
        self.row += 1;
        self.col = 0;
    }
}

/// `v` as a number cell, when Excel would keep it exactly as written.
fn as_number(v: &str) -> Option<f64> {
    let digits = v.strip_prefix('-').unwrap_or(v);
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let plain = !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
        && (int == "0" || !int.starts_with('0'))
        && !(digits.contains('.') && frac.is_empty());
    let significant = int.trim_start_matches('0').len() + frac.len();
    if !plain || significant > 15 {
        return None;
    }
    v.parse().ok()
}

fn cut(v: &str) -> &str {
    match v.char_indices().nth(XLSX_CELL_CHARS) {
        Some((i, _)) => &v[..i],
        None => v,
    }
}

enum Sink {
    Text(io::BufWriter<fs_err::File>),
    Xlsx(Box<Xlsx>),
}

/// A result file being written.
pub struct RowWriter {
    out: Sink,
    format: FileFormat,
    path: PathBuf,
    /// No field written yet in the current row.
    row_start: bool,
}

impl std::fmt::Debug for RowWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowWriter")
            .field("format", &self.format)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RowWriter {
    /// Create (or truncate) `path`.
    ///
    /// # Errors
    /// The file cannot be created (the error names it).
    pub fn create(path: &Path, format: FileFormat) -> io::Result<RowWriter> {
        let file = fs_err::File::create(path)?;
        let out = if format == FileFormat::Xlsx {
            // The file exists now (a bad path fails here); the workbook is written to
            // it by `finish`, its rows meanwhile in temporary files beside it.
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            Sink::Xlsx(Box::new(Xlsx::new(dir.unwrap_or(Path::new(".")))?))
        } else {
            let mut out = io::BufWriter::with_capacity(64 * 1024, file);
            if let FileFormat::Csv { bom: true } = format {
                out.write_all("\u{feff}".as_bytes())?;
            }
            Sink::Text(out)
        };
        Ok(RowWriter {
            out,
            format,
            path: path.to_owned(),
            row_start: true,
        })
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write one field of the current row; `None` is SQL NULL.
    ///
    /// # Errors
    /// Writing failed.
    pub fn field(&mut self, value: Option<&str>) -> io::Result<()> {
        let out = match &mut self.out {
            Sink::Xlsx(x) => return x.field(value),
            Sink::Text(out) => out,
        };
        if !self.row_start {
            out.write_all(if self.format == FileFormat::Tsv {
                b"\t"
            } else {
                b","
            })?;
        }
        self.row_start = false;
        let Some(v) = value else { return Ok(()) };
        if self.format == FileFormat::Tsv {
            write_tsv_field(out, v)
        } else {
            write_csv_field(out, v)
        }
    }

    /// End the current row.
    ///
    /// # Errors
    /// Writing failed.
    pub fn end_row(&mut self) -> io::Result<()> {
        self.row_start = true;
        match &mut self.out {
            Sink::Xlsx(x) => {
                x.end_row();
                Ok(())
            }
            Sink::Text(out) => out.write_all(if self.format == FileFormat::Tsv {
                b"\n"
            } else {
                b"\r\n"
            }),
        }
    }

    /// Write a whole row of non-NULL text (the header).
    ///
    /// # Errors
    /// Writing failed.
    pub fn header<S: AsRef<str>>(&mut self, names: &[S]) -> io::Result<()> {
        if let Sink::Xlsx(x) = &mut self.out {
            // Text cells whatever they look like, and kept for the next sheets.
            x.header = names.iter().map(|n| n.as_ref().to_owned()).collect();
            for (i, n) in names.iter().enumerate() {
                let ws = x
                    .book
                    .worksheet_from_index(x.sheet)
                    .map_err(|e| xlsx_err(&e))?;
                ws.write_string(x.row, u16::try_from(i).unwrap_or(u16::MAX), cut(n.as_ref()))
                    .map_err(|e| xlsx_err(&e))?;
            }
            x.end_row();
            return Ok(());
        }
        for n in names {
            self.field(Some(n.as_ref()))?;
        }
        self.end_row()
    }

    /// Flush and sync the file.
    ///
    /// # Errors
    /// Writing failed.
    pub fn finish(self) -> io::Result<()> {
        match self.out {
            Sink::Text(out) => {
                let file = out.into_inner().map_err(io::IntoInnerError::into_error)?;
                file.sync_all()
            }
            Sink::Xlsx(mut x) => {
                x.book.save(&self.path).map_err(|e| xlsx_err(&e))?;
                fs_err::File::open(&self.path)?.sync_all()
            }
        }
    }
}

fn write_csv_field(out: &mut impl Write, v: &str) -> io::Result<()> {
    if v.is_empty() {
        // An empty string, unlike NULL, is quoted.
        return out.write_all(b"\"\"");
    }
    if !v.contains([',', '"', '\r', '\n']) {
        return out.write_all(v.as_bytes());
    }
    out.write_all(b"\"")?;
    let mut rest = v;
    while let Some(i) = rest.find('"') {
        out.write_all(&rest.as_bytes()[..=i])?;
        out.write_all(b"\"")?;
        rest = &rest[i + 1..];
    }
    out.write_all(rest.as_bytes())?;
    out.write_all(b"\"")
}

fn write_tsv_field(out: &mut impl Write, v: &str) -> io::Result<()> {
    let mut start = 0;
    for (i, b) in v.bytes().enumerate() {
        let esc: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.write_all(&v.as_bytes()[start..i])?;
        out.write_all(esc)?;
        start = i + 1;
    }
    out.write_all(&v.as_bytes()[start..])
}

/// Lower-case hexadecimal, as binary values are written.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(format: FileFormat, rows: &[&[Option<&str>]]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut w = RowWriter::create(&path, format).unwrap();
        for r in rows {
            for f in *r {
                w.field(*f).unwrap();
            }
            w.end_row().unwrap();
        }
        w.finish().unwrap();
        std::fs::read(&path).unwrap()
    }

    #[test]
    fn csv_quotes_only_what_needs_quoting_and_keeps_null_apart_from_empty() {
        let got = write(
            FileFormat::Csv { bom: false },
            &[&[
                Some("a"),
                None,
                Some(""),
                Some("x,y"),
                Some("say \"hi\""),
                Some("l1\r\nl2"),
            ]],
        );
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "a,,\"\",\"x,y\",\"say \"\"hi\"\"\",\"l1\r\nl2\"\r\n"
        );
    }

    #[test]
    fn csv_bom_comes_first() {
        let got = write(FileFormat::Csv { bom: true }, &[&[Some("名")]]);
        assert_eq!(got, "\u{feff}名\r\n".as_bytes());
    }

    #[test]
    fn tsv_escapes_tab_newline_and_backslash() {
        let got = write(
            FileFormat::Tsv,
            &[&[Some("a\tb"), None, Some("c\nd\\e\rf"), Some("中文")]],
        );
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "a\\tb\t\tc\\nd\\\\e\\rf\t中文\n"
        );
    }

    #[test]
    fn hex_is_lower_case_two_digits_per_byte() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }

    #[test]
    fn only_exact_plain_decimals_become_numbers() {
        for (v, n) in [
            ("42", Some(42.0)),
            ("-2.5", Some(-2.5)),
            ("0.125", Some(0.125)),
        ] {
            assert_eq!(as_number(v), n, "{v}");
        }
        for v in [
            "007",
            "1e5",
            "12345678901234567",
            "1.",
            ".5",
            "NaN",
            "inf",
            "2026-03-01",
            "",
            "-",
            "1,5",
            " 1",
        ] {
            assert_eq!(as_number(v), None, "{v}");
        }
    }

    #[test]
    fn long_text_is_cut_at_the_cell_limit() {
        let long = "é".repeat(XLSX_CELL_CHARS + 10);
        assert_eq!(cut(&long).chars().count(), XLSX_CELL_CHARS);
        assert_eq!(cut("short"), "short");
    }
}
