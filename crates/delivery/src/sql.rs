//! Configured SQL with named parameters (`:analysis_id`), run on any engine labrelay
//! opens: the names are replaced by the engine's placeholders and bound in order, so a
//! value is never spliced into the SQL text.
//!
//! The scanner skips string literals (`'…'`, `"…"`, `` `…` ``), comments and
//! PostgreSQL's `::type` casts, so a colon inside them is left alone.

use std::collections::BTreeMap;

use labrelay::db::{Db, Engine};
use sqlx::any::AnyRow;
use sqlx::{Column, Row};

/// A statement rewritten for one engine, with the parameter names in bind order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The SQL with placeholders.
    pub sql: String,
    /// Parameter names, one per placeholder.
    pub names: Vec<String>,
}

/// Replace `:name` parameters with `engine`'s placeholders.
pub fn prepare(sql: &str, engine: Engine) -> Prepared {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = String::with_capacity(sql.len());
    let mut names = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\'' | '"' | '`' => {
                // Copy the literal through its closing quote (a doubled quote escapes).
                out.push(c);
                i += 1;
                while i < chars.len() {
                    out.push(chars[i]);
                    if chars[i] == '\\' && c == '\'' && engine == Engine::Mysql {
                        if let Some(n) = chars.get(i + 1) {
                            out.push(*n);
                        }
                        i += 2;
                        continue;
                    }
                    if chars[i] == c {
                        if chars.get(i + 1) == Some(&c) {
                            out.push(c);
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            '-' if chars.get(i + 1) == Some(&'-') => {
                while i < chars.len() && chars[i] != '\n' {
                    out.push(chars[i]);
                    i += 1;
                }
            }
            '/' if chars.get(i + 1) == Some(&'*') => {
                out.push_str("/*");
                i += 2;
                while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                    out.push(chars[i]);
                    i += 1;
                }
                if i < chars.len() {
                    out.push_str("*/");
                    i += 2;
                }
            }
            ':' if chars.get(i + 1) == Some(&':') => {
                out.push_str("::");
                i += 2;
            }
            ':' if chars
                .get(i + 1)
                .is_some_and(|n| n.is_ascii_alphabetic() || *n == '_') =>
            {
                let start = i + 1;
                let mut end = start;
                while end < chars.len() && (chars[end].is_ascii_alphanumeric() || chars[end] == '_')
                {
                    end += 1;
                }
                names.push(chars[start..end].iter().collect());
                out.push_str(&engine.placeholder(names.len()));
                i = end;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    Prepared { sql: out, names }
}

/// A parameter value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Text.
    Text(String),
    /// An integer.
    Int(i64),
    /// SQL NULL.
    Null,
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}
impl From<Option<String>> for Value {
    fn from(s: Option<String>) -> Self {
        s.map_or(Value::Null, Value::Text)
    }
}
impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}

/// Errors of configured SQL.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The SQL names a parameter that this statement does not provide.
    #[error("{what}: unknown parameter :{name} (available: {available})")]
    UnknownParameter {
        /// Which configured statement.
        what: String,
        /// The parameter.
        name: String,
        /// The names that exist.
        available: String,
    },
    /// The database refuses to prepare a configured statement (checked at start).
    #[error("invalid configuration value {what}: the database refuses the statement: {why}")]
    Refused {
        /// Which configured statement.
        what: String,
        /// The database's message.
        why: String,
    },
}

impl labrelay::exit::ExitClass for SqlError {
    /// Configured SQL that cannot work is a configuration error (78).
    fn exit_class(&self) -> labrelay::Exit {
        labrelay::Exit::Config
    }
}
labrelay::exit_class!(SqlError);

fn bind_all<'q>(
    prepared: &'q Prepared,
    params: &BTreeMap<&str, Value>,
    what: &str,
) -> Result<sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>, SqlError> {
    let mut q = sqlx::query(&prepared.sql);
    for name in &prepared.names {
        let v = params
            .get(name.as_str())
            .ok_or_else(|| SqlError::UnknownParameter {
                what: what.to_owned(),
                name: name.clone(),
                available: params
                    .keys()
                    .map(|k| format!(":{k}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        q = match v {
            Value::Text(s) => q.bind(s.clone()),
            Value::Int(n) => q.bind(*n),
            Value::Null => q.bind(None::<String>),
        };
    }
    Ok(q)
}

/// Run a configured SELECT; rows as column name → text (NULLs left out).
pub async fn fetch(
    db: &Db,
    sql: &str,
    params: &BTreeMap<&str, Value>,
    what: &str,
) -> anyhow::Result<Vec<BTreeMap<String, String>>> {
    let prepared = prepare(sql, db.engine());
    let q = bind_all(&prepared, params, what)?;
    let rows = q.fetch_all(db.pool()).await.map_err(|e| db.err(e))?;
    Ok(rows.iter().map(row_to_map).collect())
}

/// Run a configured statement that changes data; the number of rows affected.
pub async fn execute(
    db: &Db,
    sql: &str,
    params: &BTreeMap<&str, Value>,
    what: &str,
) -> anyhow::Result<u64> {
    let prepared = prepare(sql, db.engine());
    let q = bind_all(&prepared, params, what)?;
    let r = q.execute(db.pool()).await.map_err(|e| db.err(e))?;
    Ok(r.rows_affected())
}

/// Prepare a configured statement on the database without running it, so a wrong
/// table or column is found at start: the error (exit 78) names `what` (the config
/// key) and the server's message once. A database that cannot be reached is a
/// temporary failure (75).
pub async fn check(db: &Db, sql: &str, what: &str) -> anyhow::Result<()> {
    use sqlx::Executor as _;
    let prepared = prepare(sql, db.engine());
    let mut conn = db.pool().acquire().await.map_err(|e| db.err(e))?;
    match (&mut *conn).prepare(prepared.sql.as_str()).await {
        Ok(_) => Ok(()),
        Err(e @ (sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed)) => {
            Err(db.err(e).into())
        }
        Err(e) => {
            let why = match &e {
                sqlx::Error::Database(d) => d.message().to_owned(),
                other => other.to_string(),
            };
            Err(SqlError::Refused {
                what: what.to_owned(),
                why,
            }
            .into())
        }
    }
}

/// Every column of a row as text: strings (TEXT comes back as BLOB from MariaDB through
/// the Any driver), integers, floats and booleans; NULLs are left out.
fn row_to_map(row: &AnyRow) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (i, col) in row.columns().iter().enumerate() {
        let v = if let Ok(Some(s)) = row.try_get::<Option<String>, _>(i) {
            Some(s)
        } else if let Ok(Some(n)) = row.try_get::<Option<i64>, _>(i) {
            Some(n.to_string())
        } else if let Ok(Some(n)) = row.try_get::<Option<i32>, _>(i) {
            Some(n.to_string())
        } else if let Ok(Some(f)) = row.try_get::<Option<f64>, _>(i) {
            Some(f.to_string())
        } else if let Ok(Some(b)) = row.try_get::<Option<bool>, _>(i) {
            Some(b.to_string())
        } else if let Ok(Some(bytes)) = row.try_get::<Option<Vec<u8>>, _>(i) {
            String::from_utf8(bytes).ok()
        } else {
            None
        };
        if let Some(v) = v {
            out.insert(col.name().to_ascii_lowercase(), v);
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn named_parameters_become_placeholders() {
        let p = prepare(
            "SELECT a::text, ':x' AS c, \"q:y\" FROM t -- :z\nWHERE id = :analysis_id AND p = :project_id /* :w */",
            Engine::Postgres,
        );
        assert_eq!(
            p.sql,
            "SELECT a::text, ':x' AS c, \"q:y\" FROM t -- :z\nWHERE id = $1 AND p = $2 /* :w */"
        );
        assert_eq!(p.names, ["analysis_id", "project_id"]);
        let p = prepare(
            "SELECT 'it''s :no', :a, :a FROM t WHERE x = 'a\\':b'",
            Engine::Mysql,
        );
        assert_eq!(p.sql, "SELECT 'it''s :no', ?, ? FROM t WHERE x = 'a\\':b'");
        assert_eq!(p.names, ["a", "a"]);
        let p = prepare("SELECT '12:30', :t1", Engine::Sqlite);
        assert_eq!(p.sql, "SELECT '12:30', ?");
    }

    #[tokio::test]
    async fn sqlite_round_trip_and_unknown_parameter() {
        let cfg = labrelay::config::DatabaseConfig::from_url(
            labrelay::secret::RedactedUrl::parse("sqlite::memory:").unwrap(),
        );
        let db = Db::connect(&cfg).await.unwrap();
        let mut params = BTreeMap::new();
        params.insert("id", Value::from("A1"));
        params.insert("n", Value::Int(7));
        let rows = fetch(&db, "SELECT :id AS ID, :n AS n, NULL AS z", &params, "test")
            .await
            .unwrap();
        assert_eq!(rows[0]["id"], "A1");
        assert_eq!(rows[0]["n"], "7");
        assert!(!rows[0].contains_key("z"));
        let err = fetch(&db, "SELECT :nope", &params, "delivery.lookup")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":nope") && err.contains("delivery.lookup"),
            "{err}"
        );
    }
}
