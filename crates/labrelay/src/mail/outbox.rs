//! The outbox: messages written as `.eml` files when no SMTP server is configured.
//!
//! A file is the message exactly as SMTP would have carried it, preceded by two headers
//! recording the envelope ([`ENVELOPE_FROM_HEADER`], [`ENVELOPE_TO_HEADER`]), because the
//! envelope is where Bcc recipients live. Files appear atomically (written under a
//! temporary name, synced, renamed), so a process sweeping the directory never sees half
//! a message; their names sort by time: `<UTC timestamp>-<Message-ID>.eml`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::MailError;

/// Header naming the envelope sender in an outbox file.
pub const ENVELOPE_FROM_HEADER: &str = "X-Labrelay-Envelope-From";
/// Header listing the envelope recipients (To, Cc and Bcc) in an outbox file.
pub const ENVELOPE_TO_HEADER: &str = "X-Labrelay-Envelope-To";

/// A Message-ID made safe for a file name: no brackets, only `[A-Za-z0-9._@+-]`.
pub(crate) fn sanitise_id(message_id: &str) -> String {
    let inner = message_id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>');
    let mut s: String = inner
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '+' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(120)
        .collect();
    if s.is_empty() || s.starts_with('.') {
        s.insert(0, 'm');
    }
    s
}

fn io_err(path: &Path, source: std::io::Error) -> MailError {
    MailError::Outbox {
        path: path.to_owned(),
        source,
    }
}

/// Write one message into `dir` (created if missing) and return the file's path.
pub(crate) fn write(
    dir: &Path,
    message_id: &str,
    envelope_from: Option<&str>,
    envelope_to: &[String],
    message: &[u8],
) -> Result<PathBuf, MailError> {
    fs_err::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ");
    let base = format!("{stamp}-{}", sanitise_id(message_id));
    let tmp = dir.join(format!(".{base}.{}.tmp", uuid::Uuid::new_v4().simple()));

    let mut content = Vec::with_capacity(message.len() + 256);
    // Addresses are ASCII (lettre refuses others without SMTPUTF8) and header-safe.
    content.extend_from_slice(
        format!(
            "{ENVELOPE_FROM_HEADER}: <{}>\r\n{ENVELOPE_TO_HEADER}: {}\r\n",
            envelope_from.unwrap_or(""),
            envelope_to
                .iter()
                .map(|a| format!("<{a}>"))
                .collect::<Vec<_>>()
                .join(",\r\n ")
        )
        .as_bytes(),
    );
    content.extend_from_slice(message);

    let result = (|| {
        let mut f = fs_err::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        f.write_all(&content).map_err(|e| io_err(&tmp, e))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        drop(f);
        // Two messages with one ID in the same microsecond (a retry loop) must not
        // replace each other.
        let mut target = dir.join(format!("{base}.eml"));
        let mut n = 1;
        while target.exists() {
            target = dir.join(format!("{base}-{n}.eml"));
            n += 1;
        }
        fs_err::rename(&tmp, &target).map_err(|e| io_err(&target, e))?;
        // Make the rename itself durable; a failure here leaves a complete file anyway.
        if let Ok(d) = fs_err::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(target)
    })();
    if result.is_err() {
        let _ = fs_err::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn ids_become_safe_file_names() {
        assert_eq!(sanitise_id("<abc.1@x.example>"), "abc.1@x.example");
        assert_eq!(sanitise_id("<a/b\\c d>"), "a_b_c_d");
        assert_eq!(sanitise_id("<../x>"), "m.._x");
        assert_eq!(sanitise_id("<>"), "m");
    }

    #[test]
    fn write_is_atomic_and_names_sort_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("outbox");
        let a = write(
            &out,
            "<1@x>",
            Some("a@x"),
            &["b@y".into()],
            b"Subject: a\r\n\r\nA\r\n",
        )
        .unwrap();
        let b = write(
            &out,
            "<1@x>",
            Some("a@x"),
            &["b@y".into()],
            b"Subject: b\r\n\r\nB\r\n",
        )
        .unwrap();
        assert_ne!(a, b);
        let names: Vec<_> = fs_err::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file is left: {names:?}");
        assert!(names.iter().all(|n| n.ends_with("-1@x.eml")), "{names:?}");
        let text = fs_err::read_to_string(&a).unwrap();
        assert!(
            text.starts_with(
                "X-Labrelay-Envelope-From: <a@x>\r\nX-Labrelay-Envelope-To: <b@y>\r\n"
            )
        );
        assert!(
            a.file_name() < b.file_name() || a.to_string_lossy().len() < b.to_string_lossy().len()
        );
    }
}
