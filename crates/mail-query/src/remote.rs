//! Remote export over SSH (the old system's `filepg` step), per queryable database:
//! `[mail_query.databases.NAME.remote]`. For databases that are only reachable, or only
//! fast to export, on their own host.
//!
//! For each statement that passed the check: a private folder is made under `work_dir`
//! on the host (SFTP, mode 0700), the statement is written there as `query.sql`, the
//! configured `command` runs over SSH with `{sql}` and `{output}` replaced by the two
//! remote paths (every argv item shell-quoted: the SQL never passes through a shell),
//! and the CSV it wrote is fetched by SFTP, counting records and stopping at the row
//! cap. The folder is removed afterwards, also after a failure. Host keys are checked
//! as for every `[ssh.X]` section. The time limit is the command's: after
//! `max_query_seconds` the channel is closed and the request answered "query too long"
//! (a remote process that ignores its closed pipes may run on; give the command its own
//! timeout, e.g. `timeout 300 psql …`).
//!
//! The command is trusted to run the statement read-only (give it a read-only
//! account); the result is always CSV with a header row.

use std::io::{BufReader, Write as _};
use std::path::Path;
use std::time::Duration;

use labrelay::ssh::{SshError, SshParams, SshSession, shell_quote};
use serde::Deserialize;

use crate::config::{Format, QueryDatabase};
use crate::run::{Limits, Outcome, Output, RunError};

/// Run one checked statement of a queryable database into `path`: on its own database
/// connection ([`crate::run::run_to_file`]), or through its remote export (always CSV).
///
/// # Errors
/// See [`RunError`].
pub async fn run_statement(
    config: &labrelay::config::Config,
    db: &QueryDatabase,
    sql: &str,
    limits: Limits,
    output: Output,
    path: &Path,
) -> Result<Outcome, RunError> {
    let Some(remote) = &db.remote else {
        let section = config
            .database(&db.database)
            .map_err(|e| RunError::Config {
                url: format!("[databases.{}]", db.database),
                message: e.to_string(),
            })?;
        return crate::run::run_to_file(section, sql, limits, output, path).await;
    };
    let ssh = config
        .ssh
        .get(&remote.ssh)
        .ok_or_else(|| RunError::Config {
            url: format!("[ssh.{}]", remote.ssh),
            message: "no such section".into(),
        })?;
    let params = SshParams::from_config(ssh).map_err(|e| RunError::Config {
        url: format!("[ssh.{}]", remote.ssh),
        message: e.to_string(),
    })?;
    let (remote, sql, path) = (remote.clone(), sql.to_owned(), path.to_owned());
    tokio::task::spawn_blocking(move || run_blocking(&params, &remote, &sql, limits, &path))
        .await
        .map_err(|e| RunError::Query {
            message: format!("the remote export thread failed: {e}"),
        })?
}

/// The format a database's results come in: CSV for remote exports, else `wanted`.
pub fn format_for(db: &QueryDatabase, wanted: Format) -> Format {
    if db.remote.is_some() {
        Format::Csv
    } else {
        wanted
    }
}

/// `[mail_query.databases.NAME.remote]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteExport {
    /// The `[ssh.X]` section of the database host.
    pub ssh: String,
    /// The export command as an argv list; `{sql}` and `{output}` are replaced by the
    /// remote paths of the statement file and of the CSV it must write.
    pub command: Vec<String>,
    /// Folder on the host for the two files (default `/tmp`).
    #[serde(default = "default_work_dir")]
    pub work_dir: String,
}

fn default_work_dir() -> String {
    "/tmp".to_owned()
}

impl RemoteExport {
    /// A problem with the section, for the configuration check: the key and what is
    /// wrong.
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if self.command.is_empty() {
            return Some(("command", "must not be empty".into()));
        }
        for p in ["{sql}", "{output}"] {
            if !self.command.iter().any(|a| a.contains(p)) {
                return Some(("command", format!("must contain {p}")));
            }
        }
        if !self.work_dir.starts_with('/') {
            return Some(("work_dir", "must be an absolute path".into()));
        }
        None
    }
}

fn unreachable(params: &SshParams, e: &SshError) -> RunError {
    match labrelay::exit::classify_error(e) {
        labrelay::exit::Exit::Config => RunError::Config {
            url: format!("ssh://{}", params.server()),
            message: e.to_string(),
        },
        _ => RunError::Unreachable {
            url: format!("ssh://{}", params.server()),
            message: e.to_string(),
        },
    }
}

/// Run `sql` through the remote export and write its CSV to `local` (blocking: call it
/// on a blocking thread).
///
/// # Errors
/// See [`RunError`]: an unreachable host is 75, a refused login or host key 78, a
/// failed command 1 with its exit status and the start of its stderr.
pub fn run_blocking(
    params: &SshParams,
    remote: &RemoteExport,
    sql: &str,
    limits: Limits,
    local: &Path,
) -> Result<Outcome, RunError> {
    let session = SshSession::connect_blocking(params).map_err(|e| unreachable(params, &e))?;
    let sftp = session.sftp().map_err(|e| unreachable(params, &e))?;
    let dir = format!(
        "{}/labrelay-mq-{}",
        remote.work_dir.trim_end_matches('/'),
        uuid::Uuid::new_v4().simple()
    );
    let sftp_err = |what: &str, e: &ssh2::Error| RunError::Query {
        message: format!("{what} on {}: {}", params.server(), e.message()),
    };
    sftp.mkdir(Path::new(&dir), 0o700)
        .map_err(|e| sftp_err(&format!("creating {dir}"), &e))?;
    let sql_path = format!("{dir}/query.sql");
    let out_path = format!("{dir}/result.csv");
    let result = (|| {
        let mut f = sftp
            .create(Path::new(&sql_path))
            .map_err(|e| sftp_err("writing the statement", &e))?;
        f.write_all(sql.as_bytes())
            .and_then(|()| f.write_all(b"\n"))
            .map_err(|e| RunError::Query {
                message: format!("writing the statement on {}: {e}", params.server()),
            })?;
        drop(f);
        let command: Vec<String> = remote
            .command
            .iter()
            .map(|a| shell_quote(&a.replace("{sql}", &sql_path).replace("{output}", &out_path)))
            .collect();
        let timeout = Duration::from_secs(if limits.max_query_seconds > 0 {
            limits.max_query_seconds
        } else {
            86_400
        });
        let out = match session.exec_blocking(&command.join(" "), timeout) {
            Ok(out) => out,
            Err(SshError::CommandTimeout { .. }) => {
                return Err(RunError::Timeout {
                    seconds: limits.max_query_seconds,
                });
            }
            Err(e) => return Err(unreachable(params, &e)),
        };
        if !out.success() {
            let err: String = out.stderr_text().chars().take(500).collect();
            return Err(RunError::Query {
                message: format!(
                    "the export command on {} failed (exit {}): {}",
                    params.server(),
                    out.status,
                    err.trim()
                ),
            });
        }
        let f = sftp
            .open(Path::new(&out_path))
            .map_err(|e| sftp_err("reading the result", &e))?;
        copy_records(
            BufReader::with_capacity(256 * 1024, f),
            local,
            limits.max_rows,
        )
    })();
    // Best effort: the folder is private and under work_dir either way.
    let _ = sftp.unlink(Path::new(&sql_path));
    let _ = sftp.unlink(Path::new(&out_path));
    let _ = sftp.rmdir(Path::new(&dir));
    result
}

/// Copy CSV records (header first) from `input` to `local`, at most `max_rows` after
/// the header (`0`: all). Record ends are line feeds outside double quotes; a last
/// record without a line feed counts too.
fn copy_records(
    mut input: impl std::io::BufRead,
    local: &Path,
    max_rows: u64,
) -> Result<Outcome, RunError> {
    let werr = |source| RunError::Write {
        path: local.to_owned(),
        source,
    };
    let rerr = |e: std::io::Error| RunError::Query {
        message: format!("reading the result: {e}"),
    };
    let mut out = std::io::BufWriter::new(fs_err::File::create(local).map_err(werr)?);
    let mut header = Vec::new();
    let mut records: u64 = 0;
    let mut quoted = false;
    let mut pending = false;
    let mut truncated = false;
    loop {
        let buf = input.fill_buf().map_err(rerr)?;
        if buf.is_empty() {
            break;
        }
        let mut cut = None;
        for (i, b) in buf.iter().enumerate() {
            if records == 0 && header.len() < 64 * 1024 {
                header.push(*b);
            }
            match b {
                b'"' => quoted = !quoted,
                b'\n' if !quoted => {
                    records += 1;
                    if max_rows > 0 && records == max_rows + 1 {
                        cut = Some(i + 1);
                        break;
                    }
                }
                _ => {}
            }
        }
        let n = buf.len();
        let end = cut.unwrap_or(n);
        out.write_all(&buf[..end]).map_err(werr)?;
        pending = end > 0 && buf[end - 1] != b'\n';
        if let Some(end) = cut {
            let more_here = end < n;
            input.consume(n);
            truncated = more_here || !input.fill_buf().map_err(rerr)?.is_empty();
            pending = false;
            break;
        }
        input.consume(n);
    }
    if pending {
        records += 1;
    }
    let file = out.into_inner().map_err(|e| werr(e.into_error()))?;
    file.sync_all().map_err(werr)?;
    let columns = String::from_utf8_lossy(&header)
        .trim_end()
        .split(',')
        .map(|c| c.trim_matches('"').to_owned())
        .collect();
    Ok(Outcome {
        columns,
        rows: records.saturating_sub(1),
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(text: &str, max_rows: u64) -> (String, u64, bool) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.csv");
        // A tiny buffer, so records cross buffer ends.
        let o = copy_records(BufReader::with_capacity(3, text.as_bytes()), &p, max_rows).unwrap();
        (std::fs::read_to_string(&p).unwrap(), o.rows, o.truncated)
    }

    #[test]
    fn records_are_counted_outside_quotes_and_cut_at_the_cap() {
        let csv = "a,b\n1,\"x\ny\"\n2,z\n3,w\n";
        assert_eq!(copy(csv, 0), (csv.to_owned(), 3, false));
        assert_eq!(copy(csv, 3), (csv.to_owned(), 3, false));
        assert_eq!(copy(csv, 2), ("a,b\n1,\"x\ny\"\n2,z\n".to_owned(), 2, true));
        assert_eq!(copy(csv, 1), ("a,b\n1,\"x\ny\"\n".to_owned(), 1, true));
        assert_eq!(copy("a\n1\n2", 0), ("a\n1\n2".to_owned(), 2, false));
        assert_eq!(copy("", 0), (String::new(), 0, false));
    }
}
