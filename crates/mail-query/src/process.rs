//! Answering one request mail, durable first and once only.
//!
//! [`Service::handle`] takes the raw message, keeps a copy in
//! `<data_dir>/mail-query/<id>/request.eml`, records it in the request log
//! ([`crate::state`]), and then works through the stages: decide (trust, database,
//! allowlist, SQL check, queries), build the reply mails into the request's folder,
//! send them one by one (each acceptance recorded), and leave the filing (IMAP move)
//! to the caller. Every step after the record can be interrupted: a later call with
//! the same message resumes at the recorded stage and sends the same reply files,
//! never a second answer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use labrelay::config::Config;
use labrelay::exit::Exit;
use labrelay::lock::InstanceLock;
use labrelay::mail::{IncomingMail, Mailer, OutgoingMail};
use serde::{Deserialize, Serialize};

use crate::check;
use crate::config::{Format, Language, MailQueryConfig};
use crate::reply::{self, Lang, StatementLine};
use crate::request::{self, Request};
use crate::run::{Limits, Output, RunError};
use crate::state::{Built, Requests, Stage};
use crate::trust::{self, Checker};

/// Why a request could not be finished now; the mail stays where it is.
#[derive(Debug, thiserror::Error)]
pub enum Later {
    /// The sender check could not be made (DNS).
    #[error("sender check not possible now: {0}")]
    Trust(String),
    /// Another process is answering this request.
    #[error("request {0} is being answered by another process")]
    Busy(String),
}

impl labrelay::exit::ExitClass for Later {
    fn exit_class(&self) -> Exit {
        Exit::TempFail
    }
}
labrelay::exit_class!(Later);

/// One request's JSON record (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// The request id (SHA-256 of the Message-ID).
    pub id: String,
    /// The request's Message-ID.
    pub message_id: Option<String>,
    /// The From address.
    pub from: Option<String>,
    /// The database named.
    pub database: Option<String>,
    /// `answered`, `refused` or `failed` (`accepted` with `--dry-run`).
    pub verdict: String,
    /// Why it was refused or failed.
    pub reason: Option<String>,
    /// Statements.
    pub statements: i64,
    /// Rows exported.
    pub rows: i64,
    /// Result files.
    pub files: i64,
    /// Reply mails sent for it.
    pub mails: i64,
    /// The request had been answered before; nothing was sent now.
    pub duplicate: bool,
}

impl Record {
    /// The folder the request mail is filed in.
    pub fn refused(&self) -> bool {
        self.verdict == "refused"
    }
}

/// What the reply files are sent with (`reply.json` beside them).
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    from: String,
    recipients: Vec<String>,
    message_ids: Vec<String>,
}

/// A decision on a request, before its reply is built.
struct Decision {
    verdict: &'static str,
    reason: Option<String>,
    database: Option<String>,
    /// Send a reply (trusted and allowed senders, or `refusal_reply`).
    reply: bool,
    body: String,
    statements: u64,
    rows: u64,
    /// Result files (path, name in the zip).
    files: Vec<(PathBuf, String)>,
}

/// Everything a request needs, shared by the requests of a run.
pub struct Service {
    config: Arc<Config>,
    mq: MailQueryConfig,
    requests: Requests,
    mailer: Mailer,
    checker: Checker,
    from: String,
    dir: PathBuf,
    dry_run: bool,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("mailer", &self.mailer)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The plain address of a `Name <addr>` string.
fn plain_address(s: &str) -> String {
    match (s.rfind('<'), s.rfind('>')) {
        (Some(l), Some(r)) if l < r => s[l + 1..r].trim().to_owned(),
        _ => s.trim().to_owned(),
    }
}

/// Write `data` to `path` atomically (temporary name, sync, rename).
fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs_err::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, data)?;
        f.sync_all()?;
    }
    fs_err::rename(&tmp, path)?;
    // The rename itself must survive a power cut before the stage says the file is there.
    if let Some(dir) = path.parent() {
        fs_err::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Service {
    /// Open what a run needs: the state database (migrated), the mailer, the sender
    /// check. Nothing is read from the mailbox.
    ///
    /// # Errors
    /// A missing `[mail] from`, an unusable state database or mailer.
    pub async fn open(
        config: Arc<Config>,
        mq: MailQueryConfig,
        dry_run: bool,
    ) -> anyhow::Result<Service> {
        let from = config.mail.from.clone().ok_or_else(|| {
            labrelay::config::ConfigError::Missing(
                "[mail] from (the address replies are sent from)".into(),
            )
        })?;
        if mq.trust == crate::config::Trust::Allowlist {
            tracing::warn!(
                "trust = \"allowlist\": senders are not authenticated; a forged From address \
                 on the allowlist gets data"
            );
        }
        let checker = Checker::new(&mq)?;
        let mailer = Mailer::from_config(config.smtp.as_ref(), &config.outbox_dir())?;
        let db = labrelay::db::Db::open_state(&config).await?;
        let dir = config.data_dir().join("mail-query");
        Ok(Service {
            config,
            mq,
            requests: Requests::new(db),
            mailer,
            checker,
            from,
            dir,
            dry_run,
        })
    }

    /// The request log.
    pub fn requests(&self) -> &Requests {
        &self.requests
    }

    /// Checks and reports only: no record, no query, no mail.
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// The typed `[mail_query]`.
    pub fn settings(&self) -> &MailQueryConfig {
        &self.mq
    }

    /// Handle one raw message from `source` (`imap:FOLDER` with its UID, or `eml`).
    /// Returns its record
    /// once every reply mail is accepted (the caller then files the mail and calls
    /// [`Service::filed`]).
    ///
    /// # Errors
    /// [`Later`] and unreachable databases/servers (try again), configuration errors.
    pub async fn handle(
        &self,
        raw: &[u8],
        source: &str,
        imap_uid: Option<u32>,
    ) -> anyhow::Result<Record> {
        let mail = labrelay::mail::parse(raw)?;
        let sender_address = mail.from.as_ref().map(|a| a.address.to_lowercase());
        let id =
            crate::state::request_id(mail.message_id.as_deref(), sender_address.as_deref(), raw);
        let sender = mail.from.as_ref().map(|a| a.address.clone());
        if self.dry_run {
            return self.check_only(&id, &mail).await;
        }
        let dir = self.dir.join(&id);
        fs_err::create_dir_all(&dir)?;
        let _lock = InstanceLock::acquire(&dir, "answer").map_err(|e| match e {
            labrelay::lock::LockError::Held { .. } => anyhow::Error::new(Later::Busy(id.clone())),
            other @ labrelay::lock::LockError::Io { .. } => anyhow::Error::new(other),
        })?;
        let raw_path = dir.join("request.eml");
        if !raw_path.exists() {
            write_atomic(&raw_path, raw)?;
        }
        let (mut row, new) = self
            .requests
            .record(
                &id,
                mail.message_id.as_deref(),
                source,
                imap_uid,
                &raw_path.to_string_lossy(),
                sender.as_deref(),
            )
            .await?;
        if new {
            tracing::info!(request = %id, "request recorded");
        } else {
            tracing::info!(request = %id, stage = row.stage.as_str(), "request seen before");
        }
        let duplicate = row.stage >= Stage::Replied;
        if row.stage == Stage::Received {
            self.decide_and_build(&id, &mail, &dir).await?;
            row = self
                .requests
                .get(&id)
                .await?
                .context("request row vanished")?;
        }
        if row.stage == Stage::Built {
            self.send(&id, &dir, row.mails_sent).await?;
            row = self
                .requests
                .get(&id)
                .await?
                .context("request row vanished")?;
        }
        Ok(Record {
            id,
            message_id: row.message_id,
            from: row.sender,
            database: row.database,
            verdict: row.verdict.unwrap_or_default(),
            reason: row.reason,
            statements: row.statements,
            rows: row.rows,
            files: row.files,
            mails: if duplicate { 0 } else { row.mails },
            duplicate,
        })
    }

    /// The request mail of `id` is filed.
    ///
    /// # Errors
    /// The state database.
    pub async fn filed(&self, id: &str) -> anyhow::Result<()> {
        self.requests.set_filed(id).await
    }

    fn lang(&self, req: &Request) -> Lang {
        match self.mq.language {
            Language::Zh => Lang::Zh,
            Language::Auto if req.chinese => Lang::Zh,
            Language::En | Language::Auto => Lang::En,
        }
    }

    async fn check_only(&self, id: &str, mail: &IncomingMail) -> anyhow::Result<Record> {
        let req = request::read(mail);
        let d = self.decide(mail, &req, None).await?;
        Ok(Record {
            id: id.to_owned(),
            message_id: mail.message_id.clone(),
            from: mail.from.as_ref().map(|a| a.address.clone()),
            database: d.database,
            verdict: d.verdict.to_owned(),
            reason: d.reason,
            statements: i64::try_from(d.statements).unwrap_or(i64::MAX),
            rows: 0,
            files: 0,
            mails: 0,
            duplicate: false,
        })
    }

    /// The decision on a request; runs the queries into `results` (none in a dry run).
    #[allow(clippy::too_many_lines)] // one decision ladder, read top to bottom
    async fn decide(
        &self,
        mail: &IncomingMail,
        req: &Request,
        results: Option<&Path>,
    ) -> anyhow::Result<Decision> {
        let lang = self.lang(req);
        let refuse = |reason: String, reply: bool, database: Option<String>| Decision {
            verdict: "refused",
            body: reply::refusal_text(lang, &reason, &[]),
            reason: Some(reason),
            database,
            reply,
            statements: 0,
            rows: 0,
            files: Vec::new(),
        };
        if mail.is_automatic() {
            return Ok(refuse(
                "automatic message (auto-reply, bounce or list mail)".into(),
                false,
                None,
            ));
        }
        let Some(from) = mail.from.as_ref().map(|a| a.address.clone()) else {
            return Ok(refuse(
                "the message has no From address".into(),
                false,
                None,
            ));
        };
        // An address no reply can go to is refused now, not after the queries ran (a
        // reply that cannot be built would leave the request to be run again forever).
        if let Err(e) = OutgoingMail::new(self.from.clone())
            .to(from.clone())
            .build()
        {
            return Ok(refuse(
                format!("the From address cannot be answered: {e}"),
                false,
                None,
            ));
        }
        match self.checker.check(mail).await {
            trust::Verdict::Trusted(how) => tracing::debug!(how, "sender trusted"),
            trust::Verdict::Untrusted(why) => {
                tracing::warn!(from, why, "sender not trusted; request refused");
                return Ok(refuse(
                    format!("sender not authenticated: {why}"),
                    self.mq.refusal_reply,
                    req.database.clone(),
                ));
            }
            trust::Verdict::Unknown(why) => return Err(Later::Trust(why).into()),
        }
        let allowed_names: Vec<&str> = self
            .mq
            .databases
            .iter()
            .filter(|(_, db)| trust::allowed(&db.allow, &from))
            .map(|(n, _)| n.as_str())
            .collect();
        let Some(asked) = &req.database else {
            let reason = match lang {
                Lang::En => format!(
                    "no database named; write a line \"database: NAME\" in the message ({})",
                    names_you_may_query(lang, &allowed_names)
                ),
                Lang::Zh => format!(
                    "未指定数据库；请在正文中写一行 \"database: 名称\"（{}）",
                    names_you_may_query(lang, &allowed_names)
                ),
            };
            return Ok(refuse(
                reason,
                !allowed_names.is_empty() || self.mq.refusal_reply,
                None,
            ));
        };
        let Some((name, db)) = self.mq.lookup(asked) else {
            let reason = match lang {
                Lang::En => format!(
                    "unknown database {asked:?} ({})",
                    names_you_may_query(lang, &allowed_names)
                ),
                Lang::Zh => format!(
                    "未知数据库 {asked:?}（{}）",
                    names_you_may_query(lang, &allowed_names)
                ),
            };
            return Ok(refuse(
                reason,
                !allowed_names.is_empty() || self.mq.refusal_reply,
                Some(asked.clone()),
            ));
        };
        if !trust::allowed(&db.allow, &from) {
            tracing::warn!(from, database = name, "sender not on the allowlist");
            return Ok(refuse(
                format!("{from} may not query {name}"),
                self.mq.refusal_reply,
                Some(name.to_owned()),
            ));
        }
        let database = Some(name.to_owned());
        if let Some(bad) = &req.bad_format {
            return Ok(refuse(
                format!("unknown format {bad:?}: csv, tsv or xlsx"),
                true,
                database,
            ));
        }
        if let Some((file, why)) = req.unreadable.first() {
            return Ok(refuse(
                format!("{file} cannot be read: {why}"),
                true,
                database,
            ));
        }
        if req.sql.is_empty() {
            let reason = match lang {
                Lang::En => "no SQL attached (attach .sql or .txt files)".to_owned(),
                Lang::Zh => "没有 SQL 附件（请附上 .sql 或 .txt 文件）".to_owned(),
            };
            return Ok(refuse(reason, true, database));
        }
        // Check every statement of every file before any runs.
        let mut checked = Vec::new();
        let mut refusals = Vec::new();
        for f in &req.sql {
            for s in check::check(db.engine, &f.text) {
                if let Some(r) = s.reason() {
                    refusals.push(format!("{} #{}: {r}\n{}", f.name, s.index, indent(&s.sql)));
                }
                checked.push((f, s));
            }
        }
        let statements = checked.len() as u64;
        if statements == 0 {
            return Ok(refuse(
                "the SQL files hold no statement".into(),
                true,
                database,
            ));
        }
        if !refusals.is_empty() {
            let reason = format!(
                "{} of {statements} statements refused (only read-only queries run)",
                refusals.len()
            );
            return Ok(Decision {
                verdict: "refused",
                body: reply::refusal_text(lang, &reason, &refusals),
                reason: Some(reason),
                database,
                reply: true,
                statements,
                rows: 0,
                files: Vec::new(),
            });
        }
        let Some(results) = results else {
            return Ok(Decision {
                verdict: "accepted",
                reason: None,
                database,
                reply: false,
                body: String::new(),
                statements,
                rows: 0,
                files: Vec::new(),
            });
        };
        fs_err::create_dir_all(results)?;
        let format = crate::remote::format_for(db, req.format.unwrap_or(self.mq.format));
        let ext = match format {
            Format::Csv => "csv",
            Format::Tsv => "tsv",
            Format::Xlsx => "xlsx",
        };
        let limits = Limits {
            max_rows: db.max_rows.unwrap_or(self.mq.max_rows),
            max_query_seconds: db.max_query_seconds.unwrap_or(self.mq.max_query_seconds),
        };
        let mut lines = Vec::new();
        let mut files = Vec::new();
        let mut rows = 0;
        for (f, s) in &checked {
            let file_name = format!("{}-{}.{ext}", f.stem, s.index);
            let path = results.join(&file_name);
            let started = Instant::now();
            let done = crate::remote::run_statement(
                &self.config,
                db,
                &s.sql,
                limits,
                Output { format, bom: false },
                &path,
            )
            .await;
            let seconds = started.elapsed().as_secs_f64();
            let mut line = StatementLine {
                file: f.name.clone(),
                index: s.index,
                result: None,
                rows: 0,
                truncated: false,
                seconds,
                error: None,
                kind: None,
            };
            match done {
                Ok(outcome) => {
                    rows += outcome.rows;
                    line.rows = outcome.rows;
                    line.truncated = outcome.truncated;
                    line.result = Some(file_name.clone());
                    files.push((path, file_name));
                }
                Err(e @ (RunError::Unreachable { .. } | RunError::Config { .. })) => {
                    // Not the sender's fault: the request waits for the database.
                    return Err(e.into());
                }
                Err(e) => {
                    // The database's message may quote the SQL: only at debug level.
                    let what = match &e {
                        RunError::Timeout { .. } => "query too long",
                        RunError::Syntax { .. } => "syntax error",
                        RunError::PermissionDenied { .. } => "permission denied",
                        RunError::ReadOnly { .. } => "tried to write",
                        RunError::Write { .. } => "result file not written",
                        _ => "database error",
                    };
                    tracing::info!(
                        database = name,
                        statement = s.index,
                        what,
                        "statement failed"
                    );
                    tracing::debug!(error = %e, "statement error");
                    line.kind = Some(what);
                    line.error = Some(e.to_string());
                    let _ = fs_err::remove_file(&path);
                }
            }
            lines.push(line);
        }
        let failed = lines.iter().filter(|l| l.error.is_some()).count();
        let body = reply::answer_text(
            lang,
            &reply::Summary {
                database: name,
                statements: &lines,
                ignored: &req.ignored,
                max_rows: limits.max_rows,
            },
        );
        Ok(Decision {
            verdict: if failed == 0 { "answered" } else { "failed" },
            // Categories only: the database's own messages may quote the SQL, and the
            // reason is logged and printed; the reply has them in full.
            reason: (failed > 0).then(|| {
                let mut kinds: Vec<&str> = lines.iter().filter_map(|l| l.kind).collect();
                kinds.sort_unstable();
                kinds.dedup();
                format!(
                    "{failed} of {statements} statements failed ({})",
                    kinds.join(", ")
                )
            }),
            database,
            reply: true,
            body,
            statements,
            rows,
            files,
        })
    }

    async fn decide_and_build(
        &self,
        id: &str,
        mail: &IncomingMail,
        dir: &Path,
    ) -> anyhow::Result<()> {
        let req = request::read(mail);
        let results = dir.join("results");
        if results.exists() {
            fs_err::remove_dir_all(&results)?;
        }
        let mut d = self.decide(mail, &req, Some(&results)).await?;
        d.body = reply::cap_body(std::mem::take(&mut d.body));
        let lang = self.lang(&req);
        let mut mails = Vec::new();
        if d.reply {
            let base = |body: &str| {
                let mut m = mail
                    .reply_to_sender(self.from.clone())
                    .text(body.to_owned());
                for cc in &self.mq.staff_cc {
                    m = m.cc(cc.clone());
                }
                m.header("Auto-Submitted", "auto-replied")
            };
            if d.files.is_empty() {
                mails.push(base(&d.body));
            } else {
                let zip_path = dir.join(reply::ZIP_NAME);
                let len = reply::zip_files(&d.files, &zip_path)?;
                let ranges = reply::split(len, reply::part_capacity(self.mq.max_mail_bytes));
                let n = ranges.len();
                for (i, range) in ranges.into_iter().enumerate() {
                    let mut body = d.body.clone();
                    if n > 1 {
                        body = format!("{}\n{body}", reply::part_text(lang, i, n));
                    }
                    let mut m = base(&body).attach(reply::part_attachment(&zip_path, range, i, n)?);
                    if n > 1 {
                        let subject = format!("{} [{}/{n}]", m.subject_text(), i + 1);
                        m = m.subject(subject);
                    }
                    mails.push(m);
                }
            }
        }
        // Fixed Message-IDs: the same request always gets the same reply IDs.
        let domain = plain_address(&self.from)
            .rsplit_once('@')
            .map_or_else(|| "labrelay.invalid".to_owned(), |(_, d)| d.to_owned());
        let n = mails.len();
        let mails: Vec<OutgoingMail> = mails
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.message_id(format!("mq.{}.{}of{n}@{domain}", &id[..24], i + 1)))
            .collect();
        let mut recipients = vec![
            mail.from
                .as_ref()
                .map(|a| a.address.clone())
                .unwrap_or_default(),
        ];
        recipients.extend(self.mq.staff_cc.iter().cloned());
        let envelope = Envelope {
            from: plain_address(&self.from),
            recipients,
            message_ids: mails.iter().map(|m| m.id().to_owned()).collect(),
        };
        for (i, m) in mails.iter().enumerate() {
            let bytes = m.build()?.formatted();
            write_atomic(&dir.join(format!("reply-{}.eml", i + 1)), &bytes)?;
        }
        write_atomic(&dir.join("reply.json"), &serde_json::to_vec(&envelope)?)?;
        let files = d.files.len() as u64;
        self.requests
            .set_built(
                id,
                &Built {
                    database: d.database.as_deref(),
                    verdict: d.verdict,
                    reason: d.reason.as_deref(),
                    statements: d.statements,
                    rows: d.rows,
                    files,
                    mails: n as u64,
                    reply_message_id: envelope.message_ids.first().map(String::as_str),
                },
            )
            .await?;
        tracing::info!(request = id, verdict = d.verdict, mails = n, "reply built");
        Ok(())
    }

    /// Send the reply mails of `dir` from number `sent + 1` on.
    async fn send(&self, id: &str, dir: &Path, sent: i64) -> anyhow::Result<()> {
        let envelope: Envelope = serde_json::from_slice(&fs_err::read(dir.join("reply.json"))?)
            .context("reading reply.json")?;
        let n = envelope.message_ids.len() as u64;
        let recipients: Vec<&str> = envelope.recipients.iter().map(String::as_str).collect();
        let start = usize::try_from(sent).unwrap_or(0);
        for (i, message_id) in envelope.message_ids.iter().enumerate().skip(start) {
            let bytes = fs_err::read(dir.join(format!("reply-{}.eml", i + 1)))?;
            match self
                .mailer
                .send_raw(Some(&envelope.from), &recipients, message_id, &bytes)
                .await
            {
                Ok(_) => self.requests.set_sent(id, i as u64 + 1, n).await?,
                Err(e) if labrelay::exit::ExitClass::is_transient(&e) => return Err(e.into()),
                Err(e) => {
                    // The server refuses this mail for good (an address it rejects, a
                    // size it will not take): trying again would loop forever.
                    tracing::error!(request = id, "reply {} of {n} refused: {e}", i + 1);
                    self.requests
                        .give_up(
                            id,
                            &format!("the reply was refused by the mail server: {e}"),
                        )
                        .await?;
                    return Ok(());
                }
            }
        }
        if n == 0 {
            self.requests.set_sent(id, 0, 0).await?;
        }
        Ok(())
    }
}

fn names_you_may_query(lang: Lang, names: &[&str]) -> String {
    match (lang, names.is_empty()) {
        (Lang::En, true) => "you may query no database".into(),
        (Lang::En, false) => format!("you may query: {}", names.join(", ")),
        (Lang::Zh, true) => "您无权查询任何数据库".into(),
        (Lang::Zh, false) => format!("您可查询：{}", names.join("，")),
    }
}

fn indent(sql: &str) -> String {
    sql.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
