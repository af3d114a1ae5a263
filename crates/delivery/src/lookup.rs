//! Lookup: an analysis id (or, for upload-pure, a project id) → the folder to deliver,
//! the project and the contacts, from configured SQL on any `[databases.NAME]` or from
//! an external command that prints JSON (for sources such as the seed's MongoDB or a
//! LIMS REST API). The command runs without a shell, with a timeout; its stdout is
//! data, its stderr is quoted in errors.
//!
//! Field (column) names: `analysis_path`, `project_id`, `customer_email`,
//! `customer_name`, `action_email`, `sales_email`, `info_email`, and optionally
//! `customer_password` (the customer's password of the ordering system, which the seed
//! reused for the delivery account; kept as a secret, never passed to templates or
//! printed). E-mail fields may hold several addresses separated by `,` or `;`; when
//! several rows come back, their addresses are merged and the first row gives the other
//! fields.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use labrelay::config::Config;
use labrelay::db::Db;
use labrelay::exit::{Exit, tagged};
use labrelay::secret::Secret;
use tokio::io::AsyncReadExt;

use crate::config::LookupConfig;
use crate::report::{Analysis, Staff};
use crate::sql::{self, Value};

/// What is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// An analysis (plan) id: `[delivery.lookup]`.
    Analysis(String),
    /// A project id: `[delivery.project_lookup]`.
    Project(String),
}

impl Key {
    fn section(&self) -> &'static str {
        match self {
            Key::Analysis(_) => "delivery.lookup",
            Key::Project(_) => "delivery.project_lookup",
        }
    }

    fn describe(&self) -> String {
        match self {
            Key::Analysis(id) => format!("analysis {id}"),
            Key::Project(id) => format!("project {id}"),
        }
    }

    fn params(&self) -> BTreeMap<&'static str, Value> {
        let mut p = BTreeMap::new();
        match self {
            Key::Analysis(id) => {
                p.insert("analysis_id", Value::from(id.as_str()));
            }
            Key::Project(id) => {
                p.insert("project_id", Value::from(id.as_str()));
            }
        }
        p
    }
}

/// Look `key` up with `lookup`. A key that finds nothing is an error (exit 1) naming
/// the key and where it was looked for.
pub async fn lookup(config: &Config, lookup: &LookupConfig, key: &Key) -> anyhow::Result<Analysis> {
    let rows = match (&lookup.sql, &lookup.command) {
        (Some(sql_text), _) => {
            let name = lookup.database.as_deref().unwrap_or_default();
            let db = Db::connect(config.database(name)?).await?;
            let rows = sql::fetch(&db, sql_text, &key.params(), key.section()).await;
            db.close().await;
            rows.map_err(|e| {
                e.context(format!(
                    "looking up {} in [databases.{name}]",
                    key.describe()
                ))
            })?
        }
        (None, Some(argv)) => {
            run_command(argv, key, Duration::from_secs(lookup.timeout_secs.max(1)))
                .await
                .map_err(|e| {
                    e.context(format!(
                        "looking up {} with [{}] command",
                        key.describe(),
                        key.section()
                    ))
                })?
        }
        (None, None) => {
            return Err(tagged(
                Exit::Config,
                format!("[{}] needs sql or command", key.section()),
            ));
        }
    };
    if rows.is_empty() {
        return Err(tagged(
            Exit::Failed,
            format!("{} not found by [{}]", key.describe(), key.section()),
        ));
    }
    Ok(merge_rows(key, &rows))
}

fn split_addresses(v: Option<&String>) -> Vec<String> {
    v.map(|s| {
        s.split([',', ';'])
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default()
}

fn push_unique(list: &mut Vec<String>, more: Vec<String>) {
    for a in more {
        if !list.iter().any(|x| x.eq_ignore_ascii_case(&a)) {
            list.push(a);
        }
    }
}

const KNOWN: &[&str] = &[
    "analysis_id",
    "analysis_path",
    "project_id",
    "customer_email",
    "customer_name",
    "action_email",
    "sales_email",
    "info_email",
    "customer_password",
];

fn merge_rows(key: &Key, rows: &[BTreeMap<String, String>]) -> Analysis {
    let first = &rows[0];
    let nonempty = |k: &str| first.get(k).filter(|v| !v.trim().is_empty()).cloned();
    let mut a = Analysis {
        analysis_id: match key {
            Key::Analysis(id) => id.clone(),
            Key::Project(_) => nonempty("analysis_id").unwrap_or_default(),
        },
        project_id: match key {
            Key::Project(id) => Some(id.clone()),
            Key::Analysis(_) => nonempty("project_id"),
        },
        path: nonempty("analysis_path").map(PathBuf::from),
        customer_name: nonempty("customer_name"),
        customer_emails: Vec::new(),
        staff: Staff::default(),
        extra: first
            .iter()
            .filter(|(k, _)| !KNOWN.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        customer_password: first
            .get("customer_password")
            .filter(|v| !v.is_empty())
            .map(|v| Secret::new(v.clone())),
    };
    for row in rows {
        push_unique(
            &mut a.customer_emails,
            split_addresses(row.get("customer_email")),
        );
        push_unique(
            &mut a.staff.action,
            split_addresses(row.get("action_email")),
        );
        push_unique(&mut a.staff.sales, split_addresses(row.get("sales_email")));
        push_unique(&mut a.staff.info, split_addresses(row.get("info_email")));
    }
    a
}

/// Run the lookup command; its JSON object (or array of objects) as rows.
async fn run_command(
    argv: &[String],
    key: &Key,
    timeout: Duration,
) -> anyhow::Result<Vec<BTreeMap<String, String>>> {
    let (analysis_id, project_id) = match key {
        Key::Analysis(id) => (id.as_str(), ""),
        Key::Project(id) => ("", id.as_str()),
    };
    let expanded: Vec<String> = argv
        .iter()
        .map(|a| {
            a.replace("{analysis_id}", analysis_id)
                .replace("{project_id}", project_id)
        })
        .collect();
    let program = &expanded[0];
    let mut child = tokio::process::Command::new(program)
        .args(&expanded[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            tagged(
                Exit::Config,
                format!("cannot run lookup command {program}: {e}"),
            )
        })?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout pipe"))?;
    let mut stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr pipe"))?;
    let work = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let (a, b) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        a?;
        b?;
        let status = child.wait().await?;
        Ok::<_, std::io::Error>((status, out, err))
    };
    let (status, out, err) = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| {
            tagged(
                Exit::TempFail,
                format!(
                    "lookup command {program} did not finish within {} s",
                    timeout.as_secs()
                ),
            )
        })?
        .map_err(|e| anyhow::anyhow!("running lookup command {program}: {e}"))?;
    let err_text = String::from_utf8_lossy(&err);
    let err_tail = err_text.trim().lines().last().unwrap_or("").to_owned();
    if !status.success() {
        // 75 from the command means "try later" (its LIMS is down), as for our own tools.
        let exit = if status.code() == Some(i32::from(Exit::TempFail.code())) {
            Exit::TempFail
        } else {
            Exit::Failed
        };
        return Err(tagged(
            exit,
            format!(
                "lookup command {program} failed ({status}){}",
                if err_tail.is_empty() {
                    String::new()
                } else {
                    format!(": {err_tail}")
                }
            ),
        ));
    }
    parse_json_rows(&out)
        .map_err(|m| tagged(Exit::Failed, format!("lookup command {program}: {m}")))
}

fn parse_json_rows(out: &[u8]) -> Result<Vec<BTreeMap<String, String>>, String> {
    let text = String::from_utf8_lossy(out);
    if text.trim().is_empty() || text.trim() == "null" {
        return Ok(Vec::new());
    }
    let v: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|e| format!("output is not JSON: {e}"))?;
    let objects = match v {
        serde_json::Value::Array(a) => a,
        o @ serde_json::Value::Object(_) => vec![o],
        _ => return Err("output must be a JSON object or an array of objects".into()),
    };
    objects
        .into_iter()
        .map(|o| match o {
            serde_json::Value::Object(m) => Ok(m
                .into_iter()
                .filter_map(|(k, v)| {
                    let s = match v {
                        serde_json::Value::Null => return None,
                        serde_json::Value::String(s) => s,
                        serde_json::Value::Array(items) => items
                            .iter()
                            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                            .collect::<Vec<_>>()
                            .join(","),
                        other => other.to_string(),
                    };
                    Some((k.to_ascii_lowercase(), s))
                })
                .collect()),
            _ => Err("array items must be JSON objects".to_owned()),
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rows_merge_addresses() {
        let rows = parse_json_rows(
            br#"[{"analysis_path":"/nas/a","project_id":"V3fmjM","customer_email":"a@x.org; b@x.org",
                 "action_email":["zhao@lab.org"],"customer_name":"Dr. Li","batch":7},
                {"customer_email":"B@x.org, c@x.org","sales_email":"cai@lab.org"}]"#,
        )
        .unwrap();
        let a = merge_rows(&Key::Analysis("6cLB4ma".into()), &rows);
        assert_eq!(a.analysis_id, "6cLB4ma");
        assert_eq!(a.project_id.as_deref(), Some("V3fmjM"));
        assert_eq!(a.path, Some(PathBuf::from("/nas/a")));
        assert_eq!(a.customer_emails, ["a@x.org", "b@x.org", "c@x.org"]);
        assert_eq!(a.staff.all(), ["zhao@lab.org", "cai@lab.org"]);
        assert_eq!(a.extra["batch"], "7");
        assert!(parse_json_rows(b"[1]").is_err());
        assert!(parse_json_rows(b"").unwrap().is_empty());
    }

    #[tokio::test]
    async fn command_lookup_runs_without_a_shell() {
        let argv = vec![
            "/bin/echo".to_owned(),
            r#"{"analysis_path":"/p/{analysis_id}","customer_email":"c@x.org"}"#.to_owned(),
        ];
        let rows = run_command(
            &argv,
            &Key::Analysis("A;rm -rf".into()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(rows[0]["analysis_path"], "/p/A;rm -rf");
        let err = run_command(
            &["/bin/false".to_owned()],
            &Key::Analysis("A".into()),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        assert_eq!(labrelay::exit::classify(&err), Exit::Failed);
        let err = run_command(
            &["/bin/sleep".to_owned(), "5".to_owned()],
            &Key::Analysis("A".into()),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert_eq!(labrelay::exit::classify(&err), Exit::TempFail);
    }
}
