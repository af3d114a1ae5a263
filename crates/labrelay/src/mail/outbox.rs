//! The outbox: messages written as `.eml` files when no SMTP server is configured.
//!
//! A file is the message exactly as SMTP would have carried it, preceded by two headers
//! recording the envelope ([`ENVELOPE_FROM_HEADER`], [`ENVELOPE_TO_HEADER`]), because the
//! envelope is where Bcc recipients live. Files appear atomically (written under a
//! temporary name, synced, renamed), so a process sweeping the directory never sees half
//! a message; their names sort by time: `<UTC timestamp>-<Message-ID>.eml`.
//!
//! Writing is idempotent per Message-ID: when the directory already holds a file for
//! the ID, nothing is written and that file is returned, so a delivery re-run after a
//! crash never queues a second mail. Writers of one directory take turns through an
//! advisory lock (`flock`) on the directory itself (released by the kernel if a writer
//! dies), so two processes writing one ID at once also make one file. IDs are compared as they
//! appear in file names ([`sanitise_id`]): two IDs that differ only in characters a
//! file name cannot hold, or after 120 characters, count as one — IDs labrelay makes
//! never do.

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

/// What [`write`] did.
#[derive(Debug)]
pub(crate) struct Written {
    /// The message's file.
    pub(crate) path: PathBuf,
    /// The file was already there (same Message-ID); nothing was written.
    pub(crate) existed: bool,
}

/// An exclusive advisory lock (`flock`) on the directory itself, held until dropped:
/// no lock file appears among the messages.
struct DirLock(std::fs::File);

impl DirLock {
    fn acquire(dir: &Path) -> Result<DirLock, MailError> {
        let file = fs_err::File::open(dir)
            .map_err(|e| io_err(dir, e))?
            .into_parts()
            .0;
        file.lock().map_err(|e| io_err(dir, e))?;
        Ok(DirLock(file))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; this only makes it explicit.
        let _ = self.0.unlock();
    }
}

/// The outbox file of the (sanitised) Message-ID `id`, if there is one:
/// `<timestamp>-<id>.eml`. (Older versions named a second file of one ID
/// `<timestamp>-<id>-<n>.eml`; those are not matched, since `<id>-<n>` may as well be
/// another message's ID.)
fn existing(dir: &Path, id: &str) -> Result<Option<PathBuf>, MailError> {
    let mut found: Option<String> = None;
    for entry in fs_err::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        // Only one writer holds the directory lock, so a temporary file seen here was
        // left by a writer that died before its rename: remove it.
        if name.starts_with('.') && Path::new(&name).extension().is_some_and(|x| x == "tmp") {
            let _ = fs_err::remove_file(entry.path());
            continue;
        }
        let Some(rest) = name
            .strip_suffix(".eml")
            .filter(|_| !name.starts_with('.'))
            .and_then(|n| n.split_once('-'))
            .map(|(_, rest)| rest)
        else {
            continue;
        };
        // The earliest one is the message that was sent first.
        if rest == id && found.as_ref().is_none_or(|f| name < *f) {
            found = Some(name);
        }
    }
    Ok(found.map(|n| dir.join(n)))
}

/// Write one message into `dir` (created if missing) and return its file; when `dir`
/// already holds a file for `message_id`, return that one and write nothing. Temporary
/// files of writers killed before their rename are removed on the way.
pub(crate) fn write(
    dir: &Path,
    message_id: &str,
    envelope_from: Option<&str>,
    envelope_to: &[String],
    message: &[u8],
) -> Result<Written, MailError> {
    fs_err::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let id = sanitise_id(message_id);
    let _lock = DirLock::acquire(dir)?;
    if let Some(path) = existing(dir, &id)? {
        return Ok(Written {
            path,
            existed: true,
        });
    }
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ");
    let base = format!("{stamp}-{id}");
    let tmp = dir.join(format!(".{base}.{}.tmp", uuid::Uuid::new_v4().simple()));

    let mut content = Vec::with_capacity(message.len() + 256);
    // Addresses are header-safe; their domains are ASCII (punycode), a name before the
    // `@` may be UTF-8 (RFC 6532), as an SMTPUTF8 server would have received it.
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
        // Under the lock and after `existing` found nothing, the name is free.
        let target = dir.join(format!("{base}.eml"));
        fs_err::rename(&tmp, &target).map_err(|e| io_err(&target, e))?;
        // Make the rename itself durable; a failure here leaves a complete file anyway.
        if let Ok(d) = fs_err::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(Written {
            path: target,
            existed: false,
        })
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

    fn eml_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs_err::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn regression_a_killed_writers_temporary_file_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("outbox");
        fs_err::create_dir_all(&out).unwrap();
        let stale = out.join(".20261130T000000.000000Z-1@x.0123.tmp");
        fs_err::write(&stale, "Subject: half\r\n").unwrap();
        write(
            &out,
            "<2@x>",
            None,
            &["b@y".into()],
            b"Subject: b\r\n\r\nB\r\n",
        )
        .unwrap();
        assert!(!stale.exists());
        assert_eq!(eml_names(&out).len(), 1);
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
        assert!(!a.existed);
        let b = write(
            &out,
            "<2@x>",
            None,
            &["b@y".into()],
            b"Subject: b\r\n\r\nB\r\n",
        )
        .unwrap();
        let names = eml_names(&out);
        assert_eq!(names.len(), 2, "no temporary file is left: {names:?}");
        assert!(names[0].ends_with("-1@x.eml"), "{names:?}");
        let text = fs_err::read_to_string(&a.path).unwrap();
        assert!(
            text.starts_with(
                "X-Labrelay-Envelope-From: <a@x>\r\nX-Labrelay-Envelope-To: <b@y>\r\n"
            )
        );
        assert!(a.path.file_name() < b.path.file_name());
    }

    /// A delivery re-run after a crash sends its mails again with the same Message-IDs:
    /// the outbox must not get a second copy.
    #[test]
    fn writing_a_message_id_again_returns_the_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("outbox");
        let first = write(
            &out,
            "<run-7@x>",
            Some("a@x"),
            &["b@y".into()],
            b"Subject: a\r\n\r\nA\r\n",
        )
        .unwrap();
        let again = write(
            &out,
            "<run-7@x>",
            Some("a@x"),
            &["b@y".into()],
            b"Subject: a2\r\n\r\nA2\r\n",
        )
        .unwrap();
        assert!(again.existed);
        assert_eq!(again.path, first.path);
        assert_eq!(eml_names(&out).len(), 1);
        assert!(
            fs_err::read_to_string(&first.path)
                .unwrap()
                .contains("Subject: a\r\n")
        );
        // An ID that merely starts like it is another message.
        let other = write(&out, "<run-7@x.org>", None, &["b@y".into()], b"\r\n").unwrap();
        assert!(!other.existed);
        assert_eq!(eml_names(&out).len(), 2);
        // A file written by another run long ago counts, whatever its timestamp.
        let old = out.join("20200101T000000.000000Z-old@x.eml");
        fs_err::write(&old, "x").unwrap();
        let w = write(&out, "<old@x>", None, &["b@y".into()], b"\r\n").unwrap();
        assert!(w.existed);
        assert_eq!(w.path, old);
    }

    /// Two writers of one Message-ID at once (two processes re-running one delivery)
    /// still leave one file.
    #[test]
    fn concurrent_writes_of_one_id_make_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("outbox");
        let paths: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        write(&out, "<same@x>", None, &["b@y".into()], b"\r\nbody\r\n")
                            .unwrap()
                            .path
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(paths.iter().all(|p| *p == paths[0]), "{paths:?}");
        assert_eq!(eml_names(&out).len(), 1);
    }
}
