//! The template engine of the delivery crate: every text an operator writes with
//! placeholders is parsed and checked here, once, when the configuration is loaded, and
//! expanded here.
//!
//! Two syntaxes, because the texts differ in kind:
//!
//! - [`MailTemplate`]: the subject and bodies of the delivery mails, a small, safe
//!   subset of Mustache (none of a template engine's power is needed for four
//!   constructs):
//!
//!   | syntax | meaning |
//!   |---|---|
//!   | `{{name}}` | a value; HTML-escaped in `.html` templates |
//!   | `{{#name}}…{{/name}}` | a list (repeated per item, whose names come first), or a condition |
//!   | `{{^name}}…{{/name}}` | rendered when `name` is false, empty or an empty list |
//!   | `{{! comment }}` | nothing |
//!
//!   A section tag alone on its line takes the line with it. Names are checked against
//!   a [`Schema`] at parse time: a misspelt name is an error naming it and its line.
//!
//! - [`ArgvTemplate`]: command lines (vendor steps, the access command, the lookup
//!   command) and one-line texts (account names): `{name}` placeholders, `{{`/`}}` for
//!   literal braces. Every element of the command line stays one argument: there is no
//!   shell, so no quoting, globbing or word splitting happens. Placeholders are checked
//!   against the ones the command may use, and a placeholder that names a secret is
//!   refused (a command line is readable by every user through `ps`).
//!
//! This module renders text; it never runs anything ([`crate::command`] does) and never
//! decides which names a mail or a step offers (their owners pass the schema or list).

use std::collections::BTreeMap;

/// A template that cannot be used. Converted by the owners of the templates into their
/// own errors ([`crate::notify::NotifyError`], [`crate::command::CommandError`]), which
/// carry the exit status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template does not parse, or names an unknown field (a configuration
    /// mistake).
    #[error("{}", invalid_text(.name, *.line, .message))]
    Invalid {
        /// Where the template comes from: a file (mail templates) or a configuration
        /// key (argv templates).
        name: String,
        /// 1-based line, for multi-line templates.
        line: Option<usize>,
        /// What is wrong, naming the field.
        message: String,
    },
    /// A value cannot be put into a command line safely.
    #[error("step `{step}`: value of {{{placeholder}}} refused: {reason}")]
    BadValue {
        /// The step expanding the template.
        step: String,
        /// The placeholder.
        placeholder: String,
        /// Why.
        reason: String,
    },
}

fn invalid_text(name: &str, line: Option<usize>, message: &str) -> String {
    match line {
        Some(l) => format!("{name}, line {l}: {message}"),
        None => format!("invalid configuration {name}: {message}"),
    }
}

// ---------------------------------------------------------------------------------
// Mail templates.

/// A value of a mail template.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    /// Text (escaped in HTML templates).
    Text(String),
    /// A condition.
    Bool(bool),
    /// A list of items, each with its own names.
    List(Vec<Scope>),
}

/// The values a mail template is rendered with.
pub(crate) type Scope = BTreeMap<&'static str, Value>;

/// What kind of value a name holds, for checking templates.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// A `{{name}}` value.
    Text,
    /// A condition, used as a section only.
    Bool,
    /// A list, used as a section; its items offer these names.
    List(&'static [&'static str]),
}

/// The names a mail template may use.
pub(crate) type Schema = &'static [(&'static str, Kind)];

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    Var(String),
    Section {
        name: String,
        inverted: bool,
        body: Vec<Node>,
    },
}

/// A parsed mail template whose names were checked against its schema.
#[derive(Debug, Clone)]
pub(crate) struct MailTemplate {
    html: bool,
    nodes: Vec<Node>,
}

fn template_error(name: &str, src: &str, at: usize, message: String) -> TemplateError {
    TemplateError::Invalid {
        name: name.to_owned(),
        line: Some(src[..at.min(src.len())].matches('\n').count() + 1),
        message,
    }
}

impl MailTemplate {
    /// Parse `src` (named `name` in errors) and check its names against `schema`;
    /// `html` escapes values when rendering.
    pub(crate) fn parse(
        name: &str,
        src: &str,
        html: bool,
        schema: Schema,
    ) -> Result<MailTemplate, TemplateError> {
        struct Open {
            name: String,
            inverted: bool,
            at: usize,
            outer: Vec<Node>,
        }
        let mut stack: Vec<Open> = Vec::new();
        let mut cur: Vec<Node> = Vec::new();
        let mut pos = 0;
        let push_text = |cur: &mut Vec<Node>, text: &str| {
            if !text.is_empty() {
                cur.push(Node::Text(text.to_owned()));
            }
        };
        while let Some(rel) = src[pos..].find("{{") {
            let start = pos + rel;
            let Some(close) = src[start + 2..].find("}}") else {
                return Err(template_error(
                    name,
                    src,
                    start,
                    "`{{` is never closed".into(),
                ));
            };
            let end = start + 2 + close + 2;
            let inner = src[start + 2..end - 2].trim();
            let sigil = inner.chars().next().unwrap_or(' ');
            let mut text_end = start;
            let mut next = end;
            if matches!(sigil, '#' | '^' | '/' | '!') {
                // A section tag alone on its line takes the line with it.
                let line_start = src[..start].rfind('\n').map_or(0, |i| i + 1);
                let line_end = src[end..].find('\n').map_or(src.len(), |i| end + i);
                let blank = |s: &str| s.chars().all(|c| c == ' ' || c == '\t' || c == '\r');
                if line_start >= pos && blank(&src[line_start..start]) && blank(&src[end..line_end])
                {
                    text_end = line_start;
                    next = (line_end + 1).min(src.len());
                }
            }
            push_text(&mut cur, &src[pos..text_end]);
            pos = next;
            if sigil == '!' {
                continue;
            }
            let tag_name = if matches!(sigil, '#' | '^' | '/') {
                inner[1..].trim()
            } else {
                inner
            };
            if tag_name.is_empty()
                || !tag_name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(template_error(
                    name,
                    src,
                    start,
                    format!("`{{{{{inner}}}}}` is not a tag; names use letters, digits and _"),
                ));
            }
            match sigil {
                '#' | '^' => stack.push(Open {
                    name: tag_name.to_owned(),
                    inverted: sigil == '^',
                    at: start,
                    outer: std::mem::take(&mut cur),
                }),
                '/' => {
                    let Some(open) = stack.pop() else {
                        return Err(template_error(
                            name,
                            src,
                            start,
                            format!("`{{{{/{tag_name}}}}}` closes no section"),
                        ));
                    };
                    if open.name != tag_name {
                        return Err(template_error(
                            name,
                            src,
                            start,
                            format!(
                                "`{{{{/{tag_name}}}}}` closes `{{{{#{}}}}}` (opened on line {})",
                                open.name,
                                src[..open.at].matches('\n').count() + 1
                            ),
                        ));
                    }
                    let body = std::mem::replace(&mut cur, open.outer);
                    cur.push(Node::Section {
                        name: open.name,
                        inverted: open.inverted,
                        body,
                    });
                }
                _ => cur.push(Node::Var(tag_name.to_owned())),
            }
        }
        push_text(&mut cur, &src[pos..]);
        if let Some(open) = stack.pop() {
            return Err(template_error(
                name,
                src,
                open.at,
                format!("`{{{{#{}}}}}` is never closed", open.name),
            ));
        }
        check_names(name, src, &cur, schema, &mut Vec::new())?;
        Ok(MailTemplate { html, nodes: cur })
    }

    /// Render with `scope`. A name without a value renders as nothing (the schema
    /// check guarantees the name exists).
    pub(crate) fn render(&self, scope: &Scope) -> String {
        let mut out = String::new();
        let mut stack = vec![scope];
        self.render_nodes(&self.nodes, &mut stack, &mut out);
        out
    }

    fn render_nodes<'a>(&self, nodes: &'a [Node], stack: &mut Vec<&'a Scope>, out: &mut String)
    where
        Self: 'a,
    {
        for node in nodes {
            match node {
                Node::Text(t) => out.push_str(t),
                Node::Var(n) => {
                    if let Some(Value::Text(v)) = lookup(stack, n) {
                        if self.html {
                            out.push_str(&escape_html(v));
                        } else {
                            out.push_str(v);
                        }
                    }
                }
                Node::Section {
                    name,
                    inverted,
                    body,
                } => {
                    let value = lookup(stack, name);
                    let truthy = match value {
                        Some(Value::Bool(b)) => *b,
                        Some(Value::Text(t)) => !t.is_empty(),
                        Some(Value::List(l)) => !l.is_empty(),
                        None => false,
                    };
                    if *inverted {
                        if !truthy {
                            self.render_nodes(body, stack, out);
                        }
                    } else if let Some(Value::List(items)) = value {
                        for item in items {
                            stack.push(item);
                            self.render_nodes(body, stack, out);
                            stack.pop();
                        }
                    } else if truthy {
                        self.render_nodes(body, stack, out);
                    }
                }
            }
        }
    }
}

fn check_names(
    name: &str,
    src: &str,
    nodes: &[Node],
    schema: Schema,
    items: &mut Vec<&'static [&'static str]>,
) -> Result<(), TemplateError> {
    let unknown = |n: &str, what: &str, items: &[&'static [&'static str]]| {
        let mut known: Vec<&str> = schema.iter().map(|(k, _)| *k).collect();
        for i in items {
            known.extend(i.iter());
        }
        // The position of the first use, for the line number.
        let at = src.find(&format!("{{{{{n}")).unwrap_or(0);
        template_error(
            name,
            src,
            at,
            format!("unknown {what} `{n}`; known names: {}", known.join(", ")),
        )
    };
    for node in nodes {
        match node {
            Node::Text(_) => {}
            Node::Var(n) => {
                let in_item = items.iter().rev().any(|i| i.contains(&n.as_str()));
                let top = schema.iter().find(|(k, _)| k == n).map(|(_, kind)| *kind);
                if !in_item && !matches!(top, Some(Kind::Text)) {
                    return Err(unknown(n, "value", items));
                }
            }
            Node::Section { name: n, body, .. } => {
                let in_item = items.iter().rev().any(|i| i.contains(&n.as_str()));
                match schema.iter().find(|(k, _)| k == n).map(|(_, kind)| *kind) {
                    _ if in_item => check_names(name, src, body, schema, items)?,
                    Some(Kind::List(item)) => {
                        items.push(item);
                        let r = check_names(name, src, body, schema, items);
                        items.pop();
                        r?;
                    }
                    Some(Kind::Bool | Kind::Text) => check_names(name, src, body, schema, items)?,
                    None => return Err(unknown(n, "section", items)),
                }
            }
        }
    }
    Ok(())
}

fn lookup<'a>(stack: &[&'a Scope], name: &str) -> Option<&'a Value> {
    stack.iter().rev().find_map(|s| s.get(name))
}

/// Escape text for HTML content and attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// Argv templates.

/// Names that may never be placeholders: their values are secrets.
const SECRET_WORDS: &[&str] = &["password", "passwd", "token", "secret", "credential"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Var(String),
}

/// A command line template: argv\[0\] is a literal program, every other element a mix
/// of literal text and `{name}` placeholders (`{{` and `}}` stand for literal braces).
/// Expanded elements are passed to the program as they are: there is no shell, so no
/// quoting, globbing or word splitting happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgvTemplate {
    key: String,
    args: Vec<Vec<Piece>>,
}

/// Values for placeholders.
pub type Vars = BTreeMap<&'static str, String>;

impl ArgvTemplate {
    /// Parse `argv` (configuration key `key`, for messages), accepting only the
    /// placeholders in `allowed`. A placeholder naming a secret — `{password}`,
    /// `{token}`, anything containing those words, or one of `secret_env` (names of
    /// variables that carry secrets) — is refused with a message saying where the
    /// command finds the value instead.
    pub fn parse(
        key: &str,
        argv: &[String],
        allowed: &[&str],
        secret_env: &[&str],
    ) -> Result<ArgvTemplate, TemplateError> {
        let err = |message: String| TemplateError::Invalid {
            name: key.to_owned(),
            line: None,
            message,
        };
        let Some(program) = argv.first() else {
            return Err(err(
                "the command is empty; give [\"program\", \"arg\", …]".into()
            ));
        };
        if program.is_empty() {
            return Err(err("the program (first element) is empty".into()));
        }
        let mut parsed = Vec::with_capacity(argv.len());
        for (i, raw) in argv.iter().enumerate() {
            let pieces = parse_pieces(raw).map_err(|m| err(format!("element {i} {raw:?}: {m}")))?;
            for p in &pieces {
                let Piece::Var(name) = p else { continue };
                if i == 0 {
                    return Err(err(format!(
                        "the program (first element) must be literal, not {{{name}}}"
                    )));
                }
                let lower = name.to_ascii_lowercase();
                if SECRET_WORDS.iter().any(|w| lower.contains(w))
                    || secret_env.iter().any(|e| e.eq_ignore_ascii_case(name))
                {
                    let hint = if secret_env.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; this command receives its secrets in the environment variable(s) {}",
                            secret_env.join(", ")
                        )
                    };
                    return Err(err(format!(
                        "{{{name}}} would put a secret on the command line, where any user of the machine can read it (ps); secrets are passed only in environment variables{hint}. If the program accepts a secret only as an argument, wrap it in a script that reads the variable"
                    )));
                }
                if !allowed.contains(&name.as_str()) {
                    return Err(err(format!(
                        "unknown placeholder {{{name}}}; this command may use {}",
                        if allowed.is_empty() {
                            "none".to_owned()
                        } else {
                            allowed
                                .iter()
                                .map(|a| format!("{{{a}}}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    )));
                }
            }
            parsed.push(pieces);
        }
        Ok(ArgvTemplate {
            key: key.to_owned(),
            args: parsed,
        })
    }

    /// Parse a command line in which only the names in `known` are placeholders, each
    /// written `{name}`; every other character, braces included, is literal (the
    /// lookup command's syntax, whose arguments may hold JSON). The program must be
    /// literal.
    pub fn parse_known(
        key: &str,
        argv: &[String],
        known: &[&str],
    ) -> Result<ArgvTemplate, TemplateError> {
        let Some(program) = argv.first().filter(|p| !p.is_empty()) else {
            return Err(TemplateError::Invalid {
                name: key.to_owned(),
                line: None,
                message: "needs at least the program".into(),
            });
        };
        let mut elements = vec![vec![Piece::Lit(program.clone())]];
        for raw in &argv[1..] {
            let mut pieces = Vec::new();
            let mut lit = String::new();
            let mut rest = raw.as_str();
            while !rest.is_empty() {
                let found = known.iter().find_map(|k| {
                    rest.strip_prefix('{')
                        .and_then(|r| r.strip_prefix(k))
                        .and_then(|r| r.strip_prefix('}'))
                        .map(|r| (*k, r))
                });
                if let Some((name, after)) = found {
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Var(name.to_owned()));
                    rest = after;
                } else {
                    let mut chars = rest.chars();
                    if let Some(c) = chars.next() {
                        lit.push(c);
                    }
                    rest = chars.as_str();
                }
            }
            if !lit.is_empty() || pieces.is_empty() {
                pieces.push(Piece::Lit(lit));
            }
            elements.push(pieces);
        }
        Ok(ArgvTemplate {
            key: key.to_owned(),
            args: elements,
        })
    }

    /// A one-line text template (an account name, a directory shown in mail) with the
    /// same placeholder syntax; expand it with [`ArgvTemplate::expand_text`].
    pub fn text(key: &str, text: &str, allowed: &[&str]) -> Result<ArgvTemplate, TemplateError> {
        ArgvTemplate::parse(key, &["text".to_owned(), text.to_owned()], allowed, &[])
    }

    /// Expand a template made by [`ArgvTemplate::text`].
    pub fn expand_text(&self, what: &str, vars: &Vars) -> Result<String, TemplateError> {
        Ok(self.expand(what, vars)?.pop().unwrap_or_default())
    }

    /// The configuration key the template came from.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// argv\[0\].
    pub fn program(&self) -> String {
        self.args
            .first()
            .map(|p| render_literal(p))
            .unwrap_or_default()
    }

    /// Placeholders the template uses.
    pub fn placeholders(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .args
            .iter()
            .flatten()
            .filter_map(|p| match p {
                Piece::Var(n) => Some(n.as_str()),
                Piece::Lit(_) => None,
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Expand with `vars`. A value is refused when it contains a control character,
    /// or when it starts an element and begins with `-` (the program would read it as
    /// an option: a project named `--delete` must not become a flag).
    pub fn expand(&self, step: &str, vars: &Vars) -> Result<Vec<String>, TemplateError> {
        self.expand_with(step, vars, true)
    }

    /// [`ArgvTemplate::expand`] for the lookup command: a value may start with `-`
    /// (the lookup passed ids through unchanged before it had templates, and the ids
    /// were checked against `analysis_id_pattern` at the entry).
    pub fn expand_lenient(&self, step: &str, vars: &Vars) -> Result<Vec<String>, TemplateError> {
        self.expand_with(step, vars, false)
    }

    fn expand_with(
        &self,
        step: &str,
        vars: &Vars,
        refuse_options: bool,
    ) -> Result<Vec<String>, TemplateError> {
        let bad = |placeholder: &str, reason: &str| TemplateError::BadValue {
            step: step.to_owned(),
            placeholder: placeholder.to_owned(),
            reason: reason.to_owned(),
        };
        let mut out = Vec::with_capacity(self.args.len());
        for pieces in &self.args {
            let mut s = String::new();
            for (j, p) in pieces.iter().enumerate() {
                match p {
                    Piece::Lit(l) => s.push_str(l),
                    Piece::Var(name) => {
                        let v = vars
                            .get(name.as_str())
                            .ok_or_else(|| bad(name, "no value is known for it in this step"))?;
                        if refuse_options {
                            if v.chars().any(char::is_control) {
                                return Err(bad(name, "it contains a control character"));
                            }
                            if j == 0 && v.starts_with('-') {
                                return Err(bad(
                                    name,
                                    "it starts with `-` and would be read as an option",
                                ));
                            }
                        }
                        s.push_str(v);
                    }
                }
            }
            out.push(s);
        }
        Ok(out)
    }
}

fn render_literal(pieces: &[Piece]) -> String {
    pieces
        .iter()
        .map(|p| match p {
            Piece::Lit(l) => l.clone(),
            Piece::Var(v) => format!("{{{v}}}"),
        })
        .collect()
}

fn parse_pieces(raw: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                lit.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) if c.is_ascii_alphanumeric() || c == '_' => name.push(c),
                        Some(c) => {
                            return Err(format!(
                                "`{c}` inside a placeholder; write {{name}} with letters, digits and _, or {{{{ for a literal brace"
                            ));
                        }
                        None => return Err("unclosed `{`".into()),
                    }
                }
                if name.is_empty() {
                    return Err("empty placeholder {}".into());
                }
                if !lit.is_empty() {
                    pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                }
                pieces.push(Piece::Var(name));
            }
            '}' => return Err("unmatched `}`; write }} for a literal brace".into()),
            c => lit.push(c),
        }
    }
    if !lit.is_empty() || pieces.is_empty() {
        pieces.push(Piece::Lit(lit));
    }
    Ok(pieces)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    const ITEM: &[&str] = &["path", "size"];
    const SCHEMA: Schema = &[
        ("analysis_id", Kind::Text),
        ("customer_name", Kind::Text),
        ("has_links", Kind::Bool),
        ("files", Kind::List(ITEM)),
    ];

    fn t(src: &str, html: bool) -> MailTemplate {
        MailTemplate::parse("test", src, html, SCHEMA).unwrap()
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    fn text(v: &str) -> Value {
        Value::Text(v.to_owned())
    }

    #[test]
    fn values_are_escaped_in_html_only() {
        let mut s = Scope::new();
        s.insert("customer_name", text("<b>Tom & \"Jerry\" 'n'</b>"));
        assert_eq!(
            t("Hi {{customer_name}}!", true).render(&s),
            "Hi &lt;b&gt;Tom &amp; &quot;Jerry&quot; &#39;n&#39;&lt;/b&gt;!"
        );
        assert_eq!(
            t("Hi {{customer_name}}!", false).render(&s),
            "Hi <b>Tom & \"Jerry\" 'n'</b>!"
        );
        // Template text itself is not a value: it is never escaped.
        assert_eq!(t("<p>{{! note }}</p>", true).render(&s), "<p></p>");
        assert_eq!(escape_html("a<b>&c"), "a&lt;b&gt;&amp;c");
    }

    #[test]
    fn sections_repeat_and_standalone_lines_vanish() {
        let mut s = Scope::new();
        let item = |p: &str| {
            let mut m = Scope::new();
            m.insert("path", text(p));
            m
        };
        s.insert("files", Value::List(vec![item("a"), item("b")]));
        s.insert("has_links", Value::Bool(false));
        s.insert("analysis_id", text("A1"));
        let tpl = t(
            "Files of {{analysis_id}}:\n{{#files}}\n  - {{path}} ({{analysis_id}})\n{{/files}}\n{{#has_links}}\nlinks\n{{/has_links}}\n{{^has_links}}\nno links\n{{/has_links}}\nend\n",
            false,
        );
        assert_eq!(
            tpl.render(&s),
            "Files of A1:\n  - a (A1)\n  - b (A1)\nno links\nend\n"
        );
        let mut empty = s.clone();
        empty.insert("files", Value::List(vec![]));
        assert_eq!(
            t("{{#files}}x{{/files}}{{^files}}none{{/files}}", false).render(&empty),
            "none"
        );
    }

    #[test]
    fn mail_template_mistakes_are_reported_with_a_line() {
        let err = |src: &str| {
            MailTemplate::parse("customer.zh.txt", src, false, SCHEMA)
                .unwrap_err()
                .to_string()
        };
        assert!(err("{{#files}}\n{{/has_links}}").contains("closes"));
        assert!(err("{{#files}}").contains("never closed"));
        assert!(err("{{analysis_id").contains("never closed"));
        assert!(err("{{/files}}").contains("closes no section"));
        assert!(err("{{a b}}").contains("not a tag"));
        assert!(
            err("{{path}}").contains("unknown value `path`"),
            "outside files"
        );
        assert!(err("{{#nope}}x{{/nope}}").contains("unknown section"));
        assert!(
            err("{{files}}").contains("unknown value"),
            "a list is not text"
        );
    }

    #[test]
    fn an_unknown_field_is_an_error_naming_it_and_its_line() {
        let e = MailTemplate::parse(
            "customer.zh.txt",
            "line1\n{{analysis_idd}}\n",
            false,
            SCHEMA,
        )
        .unwrap_err();
        assert_eq!(
            e,
            TemplateError::Invalid {
                name: "customer.zh.txt".into(),
                line: Some(2),
                message: "unknown value `analysis_idd`; known names: analysis_id, customer_name, has_links, files".into(),
            }
        );
        assert!(
            e.to_string().starts_with("customer.zh.txt, line 2: "),
            "{e}"
        );
        // An item's name inside its list is known; a misspelt one names the item names.
        let e = MailTemplate::parse("f", "{{#files}}{{sise}}{{/files}}", false, SCHEMA)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`sise`") && e.contains("path, size"), "{e}");

        let e = ArgvTemplate::parse("k.argv", &s(&["bo", "{local_dir}"]), &["project"], &[])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid configuration k.argv: unknown placeholder {local_dir}; this command may use {project}"
        );
    }

    #[test]
    fn utf8_text_values_and_lines() {
        let mut scope = Scope::new();
        scope.insert("customer_name", text("王老师 <李>"));
        scope.insert("analysis_id", text("分析-1"));
        let tpl = t(
            "尊敬的{{customer_name}}：\n您的数据 {{analysis_id}} 已交付。",
            true,
        );
        assert_eq!(
            tpl.render(&scope),
            "尊敬的王老师 &lt;李&gt;：\n您的数据 分析-1 已交付。"
        );
        // Line numbers count lines, not bytes, after multi-byte text.
        let e = MailTemplate::parse("f", "第一行\n第二行\n{{名字}}\n", false, SCHEMA).unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
        assert!(e.to_string().contains("not a tag"), "{e}");
        // Argv: non-ASCII literals and values pass through as they are; a non-ASCII
        // placeholder name is refused.
        let a = ArgvTemplate::parse("k", &s(&["bo", "项目:{project}/结果"]), &["project"], &[])
            .unwrap();
        let mut v = Vars::new();
        v.insert("project", "测序 V3".into());
        assert_eq!(a.expand("x", &v).unwrap(), ["bo", "项目:测序 V3/结果"]);
        assert!(ArgvTemplate::parse("k", &s(&["bo", "{项目}"]), &["project"], &[]).is_err());
    }

    #[test]
    fn templates_expand_without_a_shell() {
        let t = ArgvTemplate::parse(
            "k",
            &s(&[
                "bo",
                "upload",
                "-f",
                "{local_dir}",
                "{project}:/{remote_dir}/",
                "{{x}}",
            ]),
            &["local_dir", "project", "remote_dir"],
            &[],
        )
        .unwrap();
        assert_eq!(t.program(), "bo");
        assert_eq!(t.placeholders(), ["local_dir", "project", "remote_dir"]);
        let mut v = Vars::new();
        v.insert("local_dir", "/data/a b;rm -rf /".into());
        v.insert("project", "P1".into());
        v.insert("remote_dir", "6cLB4ma".into());
        let argv = t.expand("upload", &v).unwrap();
        assert_eq!(
            argv,
            [
                "bo",
                "upload",
                "-f",
                "/data/a b;rm -rf /",
                "P1:/6cLB4ma/",
                "{x}"
            ]
        );
    }

    #[test]
    fn secret_placeholders_are_refused_with_a_clear_error() {
        for bad in [
            "{password}",
            "--token={token}",
            "{BO_TOKEN}",
            "{user_password}",
        ] {
            let err = ArgvTemplate::parse(
                "delivery.vendor.steps.create_user",
                &s(&["bo", "new", bad]),
                &["user", "days", "BO_TOKEN", "user_password"],
                &["BO_TOKEN", "BO_PASSWORD"],
            )
            .unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, TemplateError::Invalid { .. }), "{msg}");
            assert!(msg.contains("delivery.vendor.steps.create_user"), "{msg}");
            assert!(msg.contains("environment variable"), "{msg}");
            assert!(msg.contains("BO_PASSWORD"), "{msg}");
        }
    }

    #[test]
    fn unknown_and_malformed_placeholders_are_refused() {
        let allowed = ["project"];
        for bad in ["{", "a}", "{a b}", "{}"] {
            assert!(
                ArgvTemplate::parse("k", &s(&["bo", bad]), &allowed, &[]).is_err(),
                "{bad}"
            );
        }
        assert!(ArgvTemplate::parse("k", &s(&["{project}"]), &allowed, &[]).is_err());
        assert!(ArgvTemplate::parse("k", &[], &allowed, &[]).is_err());
    }

    #[test]
    fn option_like_and_control_values_are_refused() {
        let t = ArgvTemplate::parse(
            "k",
            &s(&["bo", "new", "project", "{project}", "x={project}"]),
            &["project"],
            &[],
        )
        .unwrap();
        let mut v = Vars::new();
        v.insert("project", "--all".into());
        let err = t.expand("create_project", &v).unwrap_err();
        assert_eq!(
            err.to_string(),
            "step `create_project`: value of {project} refused: it starts with `-` and would be read as an option"
        );
        v.insert("project", "a\nb".into());
        assert!(matches!(
            t.expand("create_project", &v).unwrap_err(),
            TemplateError::BadValue { .. }
        ));
        v.clear();
        assert!(
            t.expand("create_project", &v)
                .unwrap_err()
                .to_string()
                .contains("no value is known")
        );
    }

    #[test]
    fn known_only_templates_keep_other_braces_literal() {
        let t = ArgvTemplate::parse_known(
            "delivery.lookup.command",
            &s(&[
                "/bin/echo",
                r#"{"analysis_path":"/p/{analysis_id}","p":"{project_id}","x":"{other}"}"#,
                "{analysis_id",
            ]),
            &["analysis_id", "project_id"],
        )
        .unwrap();
        assert_eq!(t.placeholders(), ["analysis_id", "project_id"]);
        let mut v = Vars::new();
        v.insert("analysis_id", "-A;rm 分析".into());
        v.insert("project_id", String::new());
        assert_eq!(
            t.expand_lenient("lookup", &v).unwrap(),
            [
                "/bin/echo",
                r#"{"analysis_path":"/p/-A;rm 分析","p":"","x":"{other}"}"#,
                "{analysis_id",
            ]
        );
        assert!(ArgvTemplate::parse_known("k", &s(&[""]), &["analysis_id"]).is_err());
        assert!(ArgvTemplate::parse_known("k", &[], &["analysis_id"]).is_err());
    }
}
