//! The SQL check: decides, without any connection, whether each statement of a SQL
//! text may run. The same code answers `mail-query check` and (later) each mailed SQL
//! file, so an admin sees exactly why a request was refused.
//!
//! A statement is accepted only when it is a read-only query: `SELECT`, `WITH … SELECT`,
//! `VALUES`, or `EXPLAIN` of one of those without `ANALYZE`. The check works in layers,
//! each on the engine's own reading of the text:
//!
//! 1. Tokens, in the engine's dialect (comments, string literals and quoted
//!    identifiers are tokens of their own, so they cannot hide or fake anything): the
//!    text is split into statements at top-level semicolons only; tokens that write or
//!    lock are refused before parsing (`INTO`, `OUTFILE`, `DUMPFILE`, `FOR UPDATE`,
//!    `FOR SHARE`, `LOCK IN SHARE MODE`), as are MariaDB/MySQL executable comments
//!    (`/*! … */`, `/*M! … */`, which the server runs and a parser would skip), string
//!    literals whose end depends on the server's backslash setting (`'…\'…'`), and
//!    characters that only look like SQL (a full-width semicolon `；`).
//! 2. The parser (sqlparser) in the engine's dialect: each statement must parse, alone,
//!    into exactly one statement; anything the parser does not understand is refused.
//! 3. The statement tree: its kind, every nested statement (a data-modifying `WITH`),
//!    `SELECT … INTO`, row locks, and every function call anywhere in it (select list,
//!    `WHERE`, subqueries, CTEs, `FROM` table functions) against a per-engine denylist.
//!
//! It does not run anything and cannot know what a user-defined function does: the
//! statements it accepts must still run one at a time, each as its own text (the `sql`
//! of [`Statement`], never the whole file), in a read-only transaction on a read-only
//! account with a statement timeout.

use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, ObjectName, ObjectNamePart, Query, SetExpr, Statement as Ast, TableFactor, Visit, Visitor,
};
use sqlparser::dialect::{Dialect, MySqlDialect, OracleDialect, PostgreSqlDialect, SQLiteDialect};
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer, Whitespace};

/// The database engines whose SQL the check knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// PostgreSQL.
    Postgres,
    /// MariaDB or MySQL.
    #[value(alias = "mysql")]
    Mariadb,
    /// SQLite.
    Sqlite,
    /// Oracle.
    Oracle,
}

impl Engine {
    /// The engine of a database URL scheme (`[databases.X] url`).
    pub fn from_scheme(scheme: &str) -> Option<Engine> {
        match scheme {
            "postgres" | "postgresql" => Some(Engine::Postgres),
            "mysql" | "mariadb" => Some(Engine::Mariadb),
            "sqlite" => Some(Engine::Sqlite),
            "oracle" => Some(Engine::Oracle),
            _ => None,
        }
    }

    /// The name used on the command line and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::Mariadb => "mariadb",
            Engine::Sqlite => "sqlite",
            Engine::Oracle => "oracle",
        }
    }

    /// The dialect statements are parsed in.
    fn parser_dialect(self) -> Box<dyn Dialect> {
        match self {
            Engine::Postgres => Box::new(PostgreSqlDialect {}),
            Engine::Mariadb => Box::new(MySqlDialect {}),
            Engine::Sqlite => Box::new(SQLiteDialect {}),
            Engine::Oracle => Box::new(OracleDialect {}),
        }
    }

    /// The dialect the text is split in. MySqlDialect turns `/*! … */` comments into
    /// code while tokenizing; the splitter must see them as comments to refuse them
    /// (MariaDB also runs `/*M! … */`, which sqlparser would skip).
    fn lexer_dialect(self) -> Box<dyn Dialect> {
        match self {
            Engine::Mariadb => Box::new(MariadbLexer),
            other => other.parser_dialect(),
        }
    }

    /// Functions refused on this engine, with what they do. Matched case-insensitively
    /// on the function's own name (the last part of `schema.name`); an entry ending in
    /// `*` is a prefix.
    fn denied_functions(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Engine::Postgres => POSTGRES_DENIED,
            Engine::Mariadb => MARIADB_DENIED,
            Engine::Sqlite => SQLITE_DENIED,
            Engine::Oracle => ORACLE_DENIED,
        }
    }
}

/// MySqlDialect's tokens, but executable comments stay comments (see
/// [`Engine::lexer_dialect`]).
#[derive(Debug)]
struct MariadbLexer;

impl Dialect for MariadbLexer {
    fn is_identifier_start(&self, ch: char) -> bool {
        MySqlDialect {}.is_identifier_start(ch)
    }
    fn is_identifier_part(&self, ch: char) -> bool {
        MySqlDialect {}.is_identifier_part(ch)
    }
    fn is_delimited_identifier_start(&self, ch: char) -> bool {
        MySqlDialect {}.is_delimited_identifier_start(ch)
    }
    fn identifier_quote_style(&self, identifier: &str) -> Option<char> {
        MySqlDialect {}.identifier_quote_style(identifier)
    }
    fn supports_string_literal_backslash_escape(&self) -> bool {
        true
    }
    fn supports_numeric_prefix(&self) -> bool {
        true
    }
    fn supports_hash_comment(&self) -> bool {
        true
    }
    fn requires_single_line_comment_whitespace(&self) -> bool {
        true
    }
    fn supports_multiline_comment_hints(&self) -> bool {
        false
    }
}

/// Functions shared by every engine's list: names that sleep, read files or load code
/// on some engine are refused on all of them (harmless where they do not exist).
const COMMON_DENIED: &[(&str, &str)] = &[
    ("sleep", "sleeps, holding a connection"),
    ("pg_sleep*", "sleeps, holding a connection"),
    ("benchmark", "burns CPU on the server"),
    ("load_file", "reads a file on the database server"),
    ("load_extension", "loads native code into the database"),
    ("dblink*", "connects to another database server"),
];

const POSTGRES_DENIED: &[(&str, &str)] = &[
    ("pg_read_file", "reads a file on the database server"),
    ("pg_read_binary_file", "reads a file on the database server"),
    ("pg_ls_*", "lists directories on the database server"),
    ("pg_stat_file", "reads file metadata on the database server"),
    (
        "pg_file_*",
        "writes files on the database server (adminpack)",
    ),
    ("lo_*", "reads or writes large objects and server files"),
    ("pg_advisory*", "takes a lock"),
    ("pg_try_advisory*", "takes a lock"),
    ("pg_terminate_backend", "administers the server"),
    ("pg_cancel_backend", "administers the server"),
    ("pg_reload_conf", "administers the server"),
    (
        "pg_stat_reset*",
        "administers the server (resets statistics)",
    ),
    (
        "pg_stat_statements_reset",
        "administers the server (resets statistics)",
    ),
    ("pg_log_*", "administers the server"),
    ("pg_export_snapshot", "administers the server"),
    ("pg_wal_replay_*", "administers the server"),
    ("pg_rotate_logfile", "administers the server"),
    ("pg_switch_wal", "administers the server"),
    ("pg_promote", "administers the server"),
    ("pg_backup_*", "administers the server"),
    (
        "pg_create_*",
        "administers the server (replication slots, restore points)",
    ),
    ("pg_drop_replication_slot", "administers the server"),
    ("pg_replication_*", "administers the server"),
    ("pg_logical_*", "administers the server (logical decoding)"),
    ("pg_import_system_collations", "changes the catalog"),
    ("set_config", "changes session settings"),
    ("pg_notify", "sends a notification (a side effect)"),
    ("nextval", "advances a sequence (a write)"),
    ("setval", "changes a sequence (a write)"),
    ("query_to_xml*", "runs SQL given as a string, unchecked"),
    ("cursor_to_xml*", "runs SQL given as a string, unchecked"),
    ("table_to_xml*", "dumps whole tables"),
    ("schema_to_xml*", "dumps whole schemas"),
    ("database_to_xml*", "dumps the whole database"),
    ("postgres_fdw*", "connects to another database server"),
];

const MARIADB_DENIED: &[(&str, &str)] = &[
    ("get_lock", "takes a lock"),
    ("release_lock", "releases a lock"),
    ("release_all_locks", "releases locks"),
    ("master_pos_wait", "waits on replication"),
    ("source_pos_wait", "waits on replication"),
    ("master_gtid_wait", "waits on replication"),
    ("wait_for_executed_gtid_set", "waits on replication"),
    ("wait_until_sql_thread_after_gtids", "waits on replication"),
    ("sys_exec", "runs a shell command (UDF)"),
    ("sys_eval", "runs a shell command (UDF)"),
    ("nextval", "advances a sequence (a write)"),
    ("setval", "changes a sequence (a write)"),
    ("lastval", "reads session sequence state"),
];

const SQLITE_DENIED: &[(&str, &str)] = &[
    ("readfile", "reads a file (sqlite3 shell)"),
    ("writefile", "writes a file (sqlite3 shell)"),
    ("edit", "starts an editor (sqlite3 shell)"),
    ("fts3_tokenizer", "registers native code (fts3)"),
    ("randomblob", "allocates memory without bound"),
    ("zeroblob", "allocates memory without bound"),
    ("sqlite_dbpage", "reads raw database pages"),
];

const ORACLE_DENIED: &[(&str, &str)] = &[
    ("bfilename", "reads a file on the database server"),
    ("httpuritype", "reaches the network"),
];

/// Oracle supplied packages refused as a whole (`DBMS_LOCK.SLEEP`, `UTL_FILE.FOPEN`):
/// they sleep, lock, read files, reach the network or run SQL given as a string.
const ORACLE_DENIED_PACKAGES: &[&str] = &["dbms_*", "utl_*", "sys.dbms_*", "sys.utl_*"];
/// Supplied packages that only compute.
const ORACLE_ALLOWED_PACKAGES: &[&str] = &["dbms_random"];

/// The words a read-only statement may start with (`(` for a parenthesised query).
const QUERY_STARTS: &[&str] = &["SELECT", "WITH", "VALUES", "EXPLAIN", "TABLE", "("];

const NOT_A_QUERY: &str =
    "is not a read-only query (accepted: SELECT, WITH … SELECT, VALUES, EXPLAIN without ANALYZE)";

/// One statement of a SQL text and its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// 1-based position in the text.
    pub index: usize,
    /// The statement's text (no trailing semicolon); what would run.
    pub sql: String,
    /// Why it is refused (the construct and what it does); `None` when accepted.
    pub refusal: Option<String>,
}

impl Statement {
    /// Whether it may run.
    pub fn accepted(&self) -> bool {
        self.refusal.is_none()
    }

    /// The refusal as a sentence that names the statement: `statement 2: DROP …`.
    pub fn reason(&self) -> Option<String> {
        self.refusal
            .as_ref()
            .map(|r| format!("statement {}: {r}", self.index))
    }
}

/// Check every statement of `text` for `engine`. A text with no statement at all
/// yields one refused entry, so an empty request is never "all accepted".
pub fn check(engine: Engine, text: &str) -> Vec<Statement> {
    let lexer = engine.lexer_dialect();
    let tokens = match Tokenizer::new(&*lexer, text)
        .with_unescape(false)
        .tokenize_with_location()
    {
        Ok(t) => t,
        Err(e) => {
            return vec![Statement {
                index: 1,
                sql: text.trim().to_owned(),
                refusal: Some(format!("cannot be read as SQL: {e}")),
            }];
        }
    };
    let offsets = Offsets::new(text);
    let mut out = Vec::new();
    for piece in tokens.split(|t| t.token == Token::SemiColon) {
        let significant: Vec<&TokenWithSpan> =
            piece.iter().filter(|t| !is_whitespace(&t.token)).collect();
        let Some(first) = significant.first() else {
            // Only comments and blanks: nothing would run, unless MariaDB would run a
            // comment (`SELECT 1; /*! DROP TABLE t */`).
            if let Some(refusal) = executable_comment(engine, piece) {
                let text = piece
                    .iter()
                    .map(|t| t.token.to_string())
                    .collect::<String>();
                out.push(Statement {
                    index: out.len() + 1,
                    sql: text.trim().to_owned(),
                    refusal: Some(refusal),
                });
            }
            continue;
        };
        // The text runs to the last comment before the semicolon, so a refused
        // executable comment (`SELECT 1 /*! … */`) is quoted with its statement.
        let Some(last) = piece.iter().rev().find(|t| !is_blank(&t.token)) else {
            continue;
        };
        let sql = text[offsets.byte(first.span.start)..offsets.byte(last.span.end)]
            .trim()
            .to_owned();
        let index = out.len() + 1;
        let refusal =
            check_tokens(engine, piece, &significant).or_else(|| check_parsed(engine, &sql).err());
        out.push(Statement {
            index,
            sql,
            refusal,
        });
    }
    if out.is_empty() {
        out.push(Statement {
            index: 1,
            sql: String::new(),
            refusal: Some("no SQL statement found".to_owned()),
        });
    }
    out
}

fn is_blank(t: &Token) -> bool {
    matches!(
        t,
        Token::EOF | Token::Whitespace(Whitespace::Space | Whitespace::Newline | Whitespace::Tab)
    )
}

fn is_whitespace(t: &Token) -> bool {
    matches!(t, Token::Whitespace(_) | Token::EOF)
}

/// Token locations (1-based line, column in characters) to byte offsets.
struct Offsets<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Offsets<'a> {
    fn new(text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Offsets { text, line_starts }
    }

    fn byte(&self, loc: sqlparser::tokenizer::Location) -> usize {
        let line = usize::try_from(loc.line).unwrap_or(usize::MAX).max(1) - 1;
        let Some(&start) = self.line_starts.get(line) else {
            return self.text.len();
        };
        let col = usize::try_from(loc.column).unwrap_or(usize::MAX).max(1) - 1;
        self.text[start..]
            .char_indices()
            .nth(col)
            .map_or(self.text.len(), |(i, _)| start + i)
    }
}

/// Characters that look like SQL punctuation to a person but are not to a server.
const FULL_WIDTH: &[char] = &['；', '＇', '＂', '（', '）', '，'];

fn full_width(c: char) -> String {
    format!("full-width character '{c}' outside a string (not SQL; write ASCII punctuation)")
}

/// MariaDB and MySQL run the content of `/*! … */` and `/*M! … */` comments.
fn executable_comment(engine: Engine, piece: &[TokenWithSpan]) -> Option<String> {
    if engine != Engine::Mariadb {
        return None;
    }
    piece.iter().find_map(|t| match &t.token {
        Token::Whitespace(Whitespace::MultiLineComment(c))
            if c.starts_with('!') || c.starts_with("M!") || c.starts_with("m!") =>
        {
            Some(
                "executable comment /*! … */ (MariaDB and MySQL run its content; write \
                 the SQL without it)"
                    .to_owned(),
            )
        }
        _ => None,
    })
}

/// Layer 1: what the tokens alone say.
fn check_tokens(
    engine: Engine,
    piece: &[TokenWithSpan],
    significant: &[&TokenWithSpan],
) -> Option<String> {
    if let Some(refusal) = executable_comment(engine, piece) {
        return Some(refusal);
    }
    if engine == Engine::Postgres {
        // `U&"\0070g_sleep"` names pg_sleep in escapes the denylist would not see.
        for w in piece.windows(3) {
            if let [a, b, c] = w
                && matches!(&a.token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("u"))
                && b.token == Token::Ampersand
                && matches!(&c.token, Token::Word(w) if w.quote_style.is_some())
            {
                return Some(
                    "Unicode-escaped identifier U&\"…\" (hides a name from the check; \
                     write the name itself)"
                        .to_owned(),
                );
            }
        }
    }
    let first_word = match significant.first().map(|t| &t.token) {
        Some(Token::Word(w)) if w.quote_style.is_none() => w.value.to_ascii_uppercase(),
        Some(Token::LParen) => "(".to_owned(),
        _ => String::new(),
    };
    if !QUERY_STARTS.contains(&first_word.as_str()) {
        let sql: String = significant
            .iter()
            .map(|t| t.token.to_string())
            .collect::<Vec<_>>()
            .join(" ");
        return Some(format!("{} {NOT_A_QUERY}", kind(&sql)));
    }
    let words: Vec<String> = significant
        .iter()
        .map(|t| match &t.token {
            Token::Word(w) if w.quote_style.is_none() => w.value.to_ascii_uppercase(),
            _ => String::new(),
        })
        .collect();
    for (i, t) in significant.iter().enumerate() {
        match &t.token {
            // Some dialects read non-ASCII characters as part of a name (`1；DROP`).
            Token::Char(c) if FULL_WIDTH.contains(c) => return Some(full_width(*c)),
            Token::Word(w) if w.quote_style.is_none() => {
                if let Some(c) = w.value.chars().find(|c| FULL_WIDTH.contains(c)) {
                    return Some(full_width(c));
                }
            }
            Token::SingleQuotedString(s) | Token::DoubleQuotedString(s)
                if matches!(engine, Engine::Mariadb | Engine::Postgres)
                    && (s.contains("\\'") || s.contains("\\\"") || s.ends_with('\\')) =>
            {
                return Some(
                    "backslash before a quote in a string literal (where the string ends \
                     depends on the server's settings; double a quote instead: 'it''s')"
                        .to_owned(),
                );
            }
            _ => {}
        }
        let next = |k: usize| words.get(i + k).map_or("", String::as_str);
        match words[i].as_str() {
            "INTO" if matches!(next(1), "OUTFILE" | "DUMPFILE") => {
                return Some(format!(
                    "INTO {} (writes a file on the database server)",
                    next(1)
                ));
            }
            "INTO" => {
                return Some("INTO (SELECT … INTO writes a table, variables or a file)".to_owned());
            }
            w @ ("OUTFILE" | "DUMPFILE") => {
                return Some(format!("INTO {w} (writes a file on the database server)"));
            }
            "FOR" if matches!(next(1), "UPDATE" | "SHARE" | "NO" | "KEY") => {
                let what = if next(1) == "NO" || next(1) == "KEY" {
                    format!("FOR {} {}", next(1), next(2))
                } else {
                    format!("FOR {}", next(1))
                };
                return Some(format!("{what} (locks rows)"));
            }
            "LOCK" if next(1) == "IN" && next(2) == "SHARE" => {
                return Some("LOCK IN SHARE MODE (locks rows)".to_owned());
            }
            _ => {}
        }
    }
    None
}

/// Layers 2 and 3: parse alone, then walk the tree.
fn check_parsed(engine: Engine, sql: &str) -> Result<(), String> {
    let dialect = engine.parser_dialect();
    let parsed = Parser::parse_sql(&*dialect, sql).map_err(|e| {
        let e = e.to_string();
        let e = e.strip_prefix("sql parser error: ").unwrap_or(&e);
        format!("syntax error: {e} (only read-only queries are accepted)")
    })?;
    let [stmt] = parsed.as_slice() else {
        return Err(format!(
            "{} statements where one was expected",
            parsed.len()
        ));
    };
    let query = top_query(stmt, sql)?;
    let mut walker = Walker { engine };
    match query.visit(&mut walker) {
        ControlFlow::Break(reason) => Err(reason),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// The query a statement reads with, or why the statement is not a query.
fn top_query<'a>(stmt: &'a Ast, sql: &str) -> Result<&'a Query, String> {
    match stmt {
        Ast::Query(q) => Ok(q),
        Ast::Explain {
            analyze,
            statement,
            options,
            ..
        } => {
            let analyze_option = options.iter().flatten().any(|o| {
                o.name.value.eq_ignore_ascii_case("analyze")
                    && !matches!(&o.arg, Some(Expr::Value(v)) if v.to_string().eq_ignore_ascii_case("false"))
            });
            if *analyze || analyze_option {
                return Err("EXPLAIN ANALYZE (runs the statement it explains)".to_owned());
            }
            match statement.as_ref() {
                Ast::Query(q) => Ok(q),
                other => Err(format!(
                    "EXPLAIN of {} (only queries may be explained)",
                    kind(&other.to_string())
                )),
            }
        }
        _ => Err(format!("{} {NOT_A_QUERY}", kind(sql))),
    }
}

/// A statement's kind for messages: its leading keywords (`DROP TABLE`, `SET`, `COPY`).
fn kind(sql: &str) -> String {
    let words: Vec<&str> = sql
        .split(|c: char| !c.is_alphanumeric() && c != '_')
        .filter(|w| !w.is_empty())
        .take(2)
        .collect();
    let first = words.first().map_or_else(String::new, |w| w.to_uppercase());
    match first.as_str() {
        "CREATE" | "DROP" | "ALTER" | "TRUNCATE" | "LOCK" | "LOAD" | "VACUUM" | "GRANT"
        | "REVOKE" => match words.get(1) {
            Some(w) => format!("{first} {}", w.to_uppercase()),
            None => first,
        },
        "" => "this statement".to_owned(),
        _ => first,
    }
}

/// Walks a query's whole tree; breaks with the first refusal.
struct Walker {
    engine: Engine,
}

impl Walker {
    fn function(&self, name: &ObjectName, what: &str) -> ControlFlow<String> {
        let parts: Vec<String> = name
            .0
            .iter()
            .map(|p| match p {
                ObjectNamePart::Identifier(i) => i.value.to_lowercase(),
                ObjectNamePart::Function(f) => f.name.value.to_lowercase(),
            })
            .collect();
        let Some(own) = parts.last() else {
            return ControlFlow::Continue(());
        };
        let shown = name.to_string();
        for (pattern, why) in COMMON_DENIED.iter().chain(self.engine.denied_functions()) {
            if matches_pattern(pattern, own) {
                return ControlFlow::Break(format!("{what} {shown} ({why})"));
            }
        }
        if self.engine == Engine::Oracle && parts.len() > 1 {
            let package = parts[..parts.len() - 1].join(".");
            let allowed = ORACLE_ALLOWED_PACKAGES
                .iter()
                .any(|p| package == *p || package == format!("sys.{p}"));
            if !allowed
                && ORACLE_DENIED_PACKAGES
                    .iter()
                    .any(|p| matches_pattern(p, &package))
            {
                return ControlFlow::Break(format!(
                    "{what} {shown} (Oracle package {}: may sleep, lock, read files, \
                     reach the network or run SQL)",
                    package.to_uppercase()
                ));
            }
        }
        ControlFlow::Continue(())
    }
}

fn matches_pattern(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

impl Visitor for Walker {
    type Break = String;

    fn pre_visit_statement(&mut self, stmt: &Ast) -> ControlFlow<String> {
        // The top statement is a query (checked before the walk); any statement found
        // inside it is a data-modifying CTE or subquery (`WITH d AS (DELETE …)`).
        if matches!(stmt, Ast::Query(_)) {
            return ControlFlow::Continue(());
        }
        ControlFlow::Break(format!(
            "{} inside a query (a data-modifying WITH or subquery)",
            kind(&stmt.to_string())
        ))
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<String> {
        if let Some(lock) = query.locks.first() {
            return ControlFlow::Break(format!("FOR {} (locks rows)", lock.lock_type));
        }
        match query.body.as_ref() {
            SetExpr::Insert(s) | SetExpr::Update(s) | SetExpr::Delete(s) | SetExpr::Merge(s) => {
                ControlFlow::Break(format!(
                    "{} inside a query (a data-modifying WITH or subquery)",
                    kind(&s.to_string())
                ))
            }
            SetExpr::Select(select) if select.into.is_some() => ControlFlow::Break(
                "INTO (SELECT … INTO writes a table, variables or a file)".to_owned(),
            ),
            _ => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<String> {
        if let Expr::Function(f) = expr {
            return self.function(&f.name, "function");
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<String> {
        match factor {
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            }
            | TableFactor::Function { name, .. } => self.function(name, "table function"),
            _ => ControlFlow::Continue(()),
        }
    }
}

#[cfg(test)]
mod tests;
