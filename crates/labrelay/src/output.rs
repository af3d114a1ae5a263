//! Standard output is data; this module is the only writer of it.
//!
//! A [`Printer`] writes either human-readable text lines or JSON Lines records (one
//! object per line with a `"type"` field, ending with a `"summary"` record by
//! convention), and hands out progress bars that draw on stderr only when stderr is a
//! terminal, `-q` is not given and `LABRELAY_NO_PROGRESS` is unset.

use std::io::{self, IsTerminal, Write};
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::env;

type Sink = Arc<Mutex<Box<dyn Write + Send>>>;

/// Writes records to stdout (or a buffer in tests). Cheap to clone; clones share the sink.
#[derive(Clone)]
pub struct Printer {
    json: bool,
    progress: bool,
    sink: Sink,
}

impl std::fmt::Debug for Printer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Printer")
            .field("json", &self.json)
            .field("progress", &self.progress)
            .finish_non_exhaustive()
    }
}

/// What a capturing printer wrote.
#[derive(Clone, Debug, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Everything written so far, as UTF-8 (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(
            &self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }

    /// Every JSON Lines record written so far.
    pub fn records(&self) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Printer {
    /// A printer on the process's stdout.
    pub fn stdout(json: bool, quiet: bool) -> Printer {
        let progress =
            !quiet && io::stderr().is_terminal() && env::get(env::LABRELAY_NO_PROGRESS).is_none();
        Printer {
            json,
            progress,
            sink: Arc::new(Mutex::new(Box::new(io::stdout()))),
        }
    }

    /// A printer writing into memory, for tests of a tool's `run`.
    pub fn capture(json: bool) -> (Printer, Captured) {
        let buf = Captured::default();
        let p = Printer {
            json,
            progress: false,
            sink: Arc::new(Mutex::new(Box::new(CaptureWriter(buf.0.clone())))),
        };
        (p, buf)
    }

    /// Whether `--json` was given.
    pub fn is_json(&self) -> bool {
        self.json
    }

    fn write_line(&self, line: &str) -> io::Result<()> {
        let mut sink = self
            .sink
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sink.write_all(line.as_bytes())?;
        sink.write_all(b"\n")?;
        sink.flush()
    }

    /// A line of text output (ignored in JSON mode).
    pub fn text(&self, line: impl std::fmt::Display) -> io::Result<()> {
        if self.json {
            return Ok(());
        }
        self.write_line(&line.to_string())
    }

    /// A JSON Lines record `{"type": kind, ...value}` (ignored in text mode).
    /// `value` must serialize to an object.
    pub fn record<T: Serialize>(&self, kind: &str, value: &T) -> io::Result<()> {
        if !self.json {
            return Ok(());
        }
        let v = serde_json::to_value(value).map_err(io::Error::other)?;
        // "type" first, so `grep '^{"type":"file"'` and humans find records easily.
        let mut line = String::from("{\"type\":");
        line.push_str(&serde_json::Value::String(kind.to_owned()).to_string());
        match v {
            serde_json::Value::Object(m) => {
                for (k, val) in m {
                    if k == "type" {
                        continue;
                    }
                    line.push(',');
                    line.push_str(&serde_json::Value::String(k).to_string());
                    line.push(':');
                    line.push_str(&val.to_string());
                }
            }
            other => {
                line.push_str(",\"value\":");
                line.push_str(&other.to_string());
            }
        }
        line.push('}');
        self.write_line(&line)
    }

    /// Both: a record in JSON mode, the text line otherwise.
    pub fn emit<T: Serialize>(
        &self,
        kind: &str,
        value: &T,
        text: impl FnOnce() -> String,
    ) -> io::Result<()> {
        if self.json {
            self.record(kind, value)
        } else {
            self.write_line(&text())
        }
    }

    /// A progress bar of `len` units on stderr; hidden when progress is off.
    pub fn progress(&self, len: u64, bytes: bool) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        let template = if bytes {
            "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        } else {
            "{spinner} {msg} [{bar:30}] {pos}/{len} eta {eta}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_records_carry_their_type_first() {
        let (p, cap) = Printer::capture(true);
        p.record("file", &serde_json::json!({"path": "a/b", "bytes": 3}))
            .unwrap();
        p.text("ignored in json mode").unwrap();
        p.emit("summary", &serde_json::json!({"files": 1}), || "x".into())
            .unwrap();
        let text = cap.text();
        assert!(text.starts_with("{\"type\":\"file\""), "{text}");
        let recs = cap.records();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1]["type"], "summary");
        assert_eq!(recs[1]["files"], 1);
    }

    #[test]
    fn text_mode_writes_lines_only() {
        let (p, cap) = Printer::capture(false);
        p.text("hello").unwrap();
        p.record("file", &serde_json::json!({})).unwrap();
        p.emit("summary", &serde_json::json!({}), || "done".into())
            .unwrap();
        assert_eq!(cap.text(), "hello\ndone\n");
        assert!(p.progress(10, false).is_hidden());
    }
}
