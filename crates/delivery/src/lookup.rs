//! Lookup: an analysis id (or, for upload-pure, a project id) → the folder to deliver,
//! the project and the contacts, from configured SQL on any `[databases.NAME]` or from
//! an external command that prints JSON (for sources such as the seed's MongoDB or a
//! LIMS REST API). The command is an argv template whose only placeholders are
//! `{analysis_id}` and `{project_id}` (any other brace is literal, so an argument may
//! hold JSON); it runs through [`crate::command`] without a shell, with a timeout; its
//! stdout is data (at most [`MAX_COMMAND_OUTPUT`] bytes, never logged), its stderr is
//! quoted in errors, and its exit code 75 means "try again later".
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
use std::time::Duration;

use labrelay::config::Config;
use labrelay::db::Db;
use labrelay::exit::Exit;

use crate::error::DeliveryError;
use labrelay::secret::Secret;

use crate::command::{self, CommandError, Invocation};
use crate::config::{LOOKUP_PARAMS, LookupConfig};
use crate::report::{Analysis, Staff};
use crate::sql::{self, Value};
use crate::template::{ArgvTemplate, Vars};

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
            return Err(DeliveryError::LookupWithoutSource(key.section()).into());
        }
    };
    if rows.is_empty() {
        return Err(DeliveryError::NotFound {
            what: key.describe(),
            section: key.section(),
        }
        .into());
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

/// Most bytes a lookup command may print (its JSON rows).
pub const MAX_COMMAND_OUTPUT: usize = 16 * 1024 * 1024;

/// Run the lookup command; its JSON object (or array of objects) as rows.
async fn run_command(
    argv: &[String],
    key: &Key,
    timeout: Duration,
) -> anyhow::Result<Vec<BTreeMap<String, String>>> {
    let template =
        ArgvTemplate::parse_known(&format!("{}.command", key.section()), argv, LOOKUP_PARAMS)
            .map_err(CommandError::from)?;
    let (analysis_id, project_id) = match key {
        Key::Analysis(id) => (id.as_str(), ""),
        Key::Project(id) => ("", id.as_str()),
    };
    let mut vars = Vars::new();
    vars.insert("analysis_id", analysis_id.to_owned());
    vars.insert("project_id", project_id.to_owned());
    // Lenient: ids were checked against `analysis_id_pattern` at the entry, and the
    // command has always received them as they are.
    let expanded = template
        .expand_lenient("lookup", &vars)
        .map_err(CommandError::from)?;
    let program = template.program();
    // 75 from the command means "try later" (its LIMS is down), as for our own tools.
    let temporary = [i32::from(Exit::TempFail.code())];
    let done = command::run(
        Invocation {
            step: "lookup",
            argv: expanded,
            env: Vec::new(),
            timeout: Some(timeout),
            temporary_codes: &temporary,
            workdir: None,
            capture_stdout: Some(MAX_COMMAND_OUTPUT),
        },
        false,
    )
    .await
    .map_err(anyhow::Error::from)?;
    parse_json_rows(&done.stdout).map_err(|message| {
        DeliveryError::LookupOutput {
            program: program.clone(),
            message,
        }
        .into()
    })
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
        let err = run_command(
            &[
                "/bin/sh".to_owned(),
                "-c".to_owned(),
                "echo LIMS down >&2; exit 75".to_owned(),
            ],
            &Key::Project("P".into()),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        assert_eq!(labrelay::exit::classify(&err), Exit::TempFail);
        assert!(format!("{err:#}").contains("LIMS down"), "{err:#}");
        let err = run_command(
            &["/nonexistent/lookup".to_owned()],
            &Key::Analysis("A".into()),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        assert_eq!(labrelay::exit::classify(&err), Exit::Config);
    }

    #[tokio::test]
    async fn command_placeholders_are_template_values_not_text_replacement() {
        // With str::replace, an analysis id holding `{project_id}` was replaced a
        // second time; a template substitutes each placeholder once.
        let argv = vec![
            "/bin/echo".to_owned(),
            r#"{"analysis_path":"/p/{analysis_id}","project_id":"x{project_id}x"}"#.to_owned(),
        ];
        let rows = run_command(
            &argv,
            &Key::Analysis("A{project_id}".into()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(rows[0]["analysis_path"], "/p/A{project_id}");
        assert_eq!(rows[0]["project_id"], "xx");
        let rows = run_command(&argv, &Key::Project("V3".into()), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(rows[0]["analysis_path"], "/p/");
        assert_eq!(rows[0]["project_id"], "xV3x");
    }
}
