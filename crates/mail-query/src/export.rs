//! Writing result rows to a file, one row at a time: CSV (RFC 4180) and TSV.
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
}

/// A result file being written.
pub struct RowWriter {
    out: io::BufWriter<fs_err::File>,
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
        let mut out = io::BufWriter::with_capacity(64 * 1024, file);
        if let FileFormat::Csv { bom: true } = format {
            out.write_all("\u{feff}".as_bytes())?;
        }
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
        if !self.row_start {
            self.out.write_all(match self.format {
                FileFormat::Csv { .. } => b",",
                FileFormat::Tsv => b"\t",
            })?;
        }
        self.row_start = false;
        let Some(v) = value else { return Ok(()) };
        match self.format {
            FileFormat::Csv { .. } => write_csv_field(&mut self.out, v),
            FileFormat::Tsv => write_tsv_field(&mut self.out, v),
        }
    }

    /// End the current row.
    ///
    /// # Errors
    /// Writing failed.
    pub fn end_row(&mut self) -> io::Result<()> {
        self.row_start = true;
        self.out.write_all(match self.format {
            FileFormat::Csv { .. } => b"\r\n",
            FileFormat::Tsv => b"\n",
        })
    }

    /// Write a whole row of non-NULL text (the header).
    ///
    /// # Errors
    /// Writing failed.
    pub fn header<S: AsRef<str>>(&mut self, names: &[S]) -> io::Result<()> {
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
        let file = self
            .out
            .into_inner()
            .map_err(io::IntoInnerError::into_error)?;
        file.sync_all()
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
}
