//! mail: sending through Postfix, reading back through Dovecot, the outbox, errors.
//!
//! All tests share the mailboxes alice, bob and carol and run in parallel, so each finds
//! its own messages by a unique Message-ID, waits at most 20 s for delivery, and deletes
//! what it created (folders get unique names).
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::future::Future;
use std::time::{Duration, Instant};

use base64::Engine as _;
use labrelay::config::{ImapConfig, SmtpConfig, TlsMode};
use labrelay::exit::{Exit, classify};
use labrelay::mail::{
    Attachment, Flag, ImapClient, IncomingMail, MailError, Mailer, MoveMethod, OutgoingMail, parse,
};
use labrelay::secret::SecretSpec;
use test_support::unique;

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);

struct Servers {
    smtp_host: String,
    smtp_port: u16,
    imap_host: String,
    imap_port: u16,
    domain: String,
}

impl Servers {
    fn addr(&self, user: &str) -> String {
        format!("{user}@{}", self.domain)
    }

    fn smtp(&self) -> SmtpConfig {
        SmtpConfig {
            host: self.smtp_host.clone(),
            port: Some(self.smtp_port),
            security: TlsMode::None,
            username: None,
            password: None,
            timeout_secs: 20,
            hello_name: Some("client.labrelay.test".into()),
            ca_file: None,
        }
    }

    fn mailer(&self) -> Mailer {
        Mailer::from_config(Some(&self.smtp()), std::path::Path::new("/nonexistent")).unwrap()
    }

    fn imap_config(&self, user: &str, password: &str) -> ImapConfig {
        ImapConfig {
            host: self.imap_host.clone(),
            port: Some(self.imap_port),
            security: TlsMode::None,
            username: user.to_owned(),
            password: SecretSpec::parse(password),
            folder: "INBOX".into(),
            timeout_secs: 20,
            ca_file: None,
        }
    }

    /// Logged in as `user` with INBOX selected.
    fn imap(&self, user: &str) -> ImapClient {
        let pass = match user {
            "alice" => test_support::setting("MAIL_PASS_ALICE"),
            "bob" => test_support::setting("MAIL_PASS_BOB"),
            _ => test_support::setting("MAIL_PASS_CAROL"),
        }
        .unwrap();
        let mut c = ImapClient::connect(&self.imap_config(user, &pass)).unwrap();
        c.select("INBOX").unwrap();
        c
    }
}

macro_rules! servers {
    () => {{
        let smtp_host = test_support::require!("SMTP_HOST");
        let smtp_port = test_support::require!("SMTP_PORT");
        let imap_host = test_support::require!("IMAP_HOST");
        let imap_port = test_support::require!("IMAP_PORT");
        let domain = test_support::require!("MAIL_DOMAIN");
        test_support::require!("MAIL_PASS_ALICE");
        test_support::require!("MAIL_PASS_BOB");
        test_support::require!("MAIL_PASS_CAROL");
        Servers {
            smtp_host,
            smtp_port: smtp_port.parse().unwrap(),
            imap_host,
            imap_port: imap_port.parse().unwrap(),
            domain,
        }
    }};
}

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The UID of the message with this Message-ID in the selected folder, waiting for
/// delivery.
fn wait_for(c: &mut ImapClient, message_id: &str) -> u32 {
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    loop {
        if let Some(uid) = c.search_message_id(message_id).unwrap().first() {
            return *uid;
        }
        assert!(
            Instant::now() < deadline,
            "message {message_id} did not arrive within {DELIVERY_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn fetch_parsed(c: &mut ImapClient, uid: u32) -> IncomingMail {
    parse(&c.fetch_raw(uid).unwrap()).unwrap()
}

fn gbk(s: &str) -> Vec<u8> {
    encoding_rs::GBK.encode(s).0.into_owned()
}

fn pct(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = std::fmt::Write::write_fmt(&mut s, format_args!("%{b:02X}"));
        s
    })
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Base64 in 76-column lines, as MIME wants it.
fn b64_lines(bytes: &[u8]) -> String {
    b64(bytes)
        .as_bytes()
        .chunks(76)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("\r\n")
}

#[test]
fn text_html_and_attachment_with_chinese_names_survive_postfix_and_dovecot() {
    let s = servers!();
    let token = unique("roundtrip");
    let csv: Vec<u8> = b"sample,\xe6\xa0\xb7\xe6\x9c\xac\r\nS1,ok\n\xff\x00end".to_vec();
    let mail = OutgoingMail::new(format!("实验室 Lab <{}>", s.addr("bob")))
        .to(format!("爱丽丝 <{}>", s.addr("alice")))
        .subject(format!("查询结果 报表 {token}"))
        .text("您好，\n结果见附件。\n")
        .html("<p>您好，</p><p>结果见<b>附件</b>。</p>")
        .attach(Attachment::new(
            format!("结果 报表 {token}.csv"),
            "text/csv; charset=utf-8",
            csv.clone(),
        ))
        .header("X-Labrelay-Test", token.clone());
    let sent = block_on(s.mailer().send(&mail)).unwrap();
    assert_eq!(sent.message_id, mail.id());
    assert!(
        sent.server_reply.as_deref().unwrap().starts_with("250"),
        "{sent:?}"
    );
    assert!(sent.outbox_path.is_none());

    let mut c = s.imap("alice");
    let uid = wait_for(&mut c, mail.id());
    let m = fetch_parsed(&mut c, uid);
    assert_eq!(m.subject, format!("查询结果 报表 {token}"));
    assert_eq!(m.message_id.as_deref(), Some(mail.id()));
    assert_eq!(m.text.as_deref(), Some("您好，\n结果见附件。\n"));
    assert_eq!(
        m.html.as_deref(),
        Some("<p>您好，</p><p>结果见<b>附件</b>。</p>")
    );
    let from = m.from.as_ref().unwrap();
    assert_eq!(from.name.as_deref(), Some("实验室 Lab"));
    assert_eq!(from.address, s.addr("bob"));
    assert_eq!(m.to[0].name.as_deref(), Some("爱丽丝"));
    assert_eq!(m.header("X-Labrelay-Test").as_deref(), Some(token.as_str()));
    assert!(m.date.is_some());
    assert_eq!(m.attachments.len(), 1);
    let a = &m.attachments[0];
    assert_eq!(
        a.name.as_deref(),
        Some(format!("结果 报表 {token}.csv").as_str())
    );
    assert_eq!(a.content_type, "text/csv");
    assert_eq!(
        a.data, csv,
        "attachment bytes, CRLF and all, arrive unchanged"
    );
    assert!(
        !c.flags(uid).unwrap().contains(&Flag::Seen),
        "fetching peeks; it does not mark the message read"
    );
    c.delete(uid).unwrap();
    assert!(c.search_message_id(mail.id()).unwrap().is_empty());
    c.logout().unwrap();
}

/// The foundation issue's definition of done: a message as Chinese Outlook/Foxmail
/// clients write it (GBK encoded-word subject, RFC 2231 file names in GBK and UTF-8,
/// continuations, RFC 2047 names), sent raw through Postfix and read back decoded.
#[test]
fn gbk_subject_and_rfc2231_attachment_names_survive_the_trip() {
    let s = servers!();
    let token = unique("gbk");
    let message_id = format!("<{token}@client.example.cn>");
    let subject = "查询结果 报表";
    let sql = gbk("SELECT 样本编号, 状态 FROM 样本 WHERE 项目 = '测序';\r\n");
    let csv = "编号,结果\n1,合格\n".as_bytes().to_vec();
    let xlsx = vec![0x50, 0x4b, 0x03, 0x04, 0x00, 0xff, 0x80, 0x0d, 0x0a];
    let gbk_name = gbk("查询语句.sql");
    let utf8_name = "结果 报表.csv".as_bytes();
    let raw = format!(
        "From: =?GBK?B?{from_name}?= <zhang@client.example.cn>\r\n\
         To: {to}\r\n\
         Subject: =?GBK?B?{subject}?= {token}\r\n\
         Message-ID: {message_id}\r\n\
         Date: Tue, 05 Mar 2024 09:30:00 +0800\r\n\
         MIME-Version: 1.0\r\n\
         X-Mailer: Foxmail 7.2\r\n\
         Content-Type: multipart/mixed; boundary=\"----=_NextPart_000\"\r\n\
         \r\n\
         This is a multi-part message in MIME format.\r\n\
         \r\n\
         ------=_NextPart_000\r\n\
         Content-Type: text/plain; charset=\"gb2312\"\r\n\
         Content-Transfer-Encoding: base64\r\n\
         \r\n\
         {body}\r\n\
         ------=_NextPart_000\r\n\
         Content-Type: application/octet-stream; name*=GBK''{gbk_pct}\r\n\
         Content-Disposition: attachment; filename*=GBK''{gbk_pct}\r\n\
         Content-Transfer-Encoding: base64\r\n\
         \r\n\
         {sql}\r\n\
         ------=_NextPart_000\r\n\
         Content-Type: text/csv; charset=utf-8\r\n\
         Content-Disposition: attachment;\r\n\
         \tfilename*0*=UTF-8''{utf8_pct_a};\r\n\
         \tfilename*1*={utf8_pct_b}\r\n\
         Content-Transfer-Encoding: base64\r\n\
         \r\n\
         {csv}\r\n\
         ------=_NextPart_000\r\n\
         Content-Type: application/vnd.ms-excel; name=\"=?GBK?B?{xls_name}?=\"\r\n\
         Content-Disposition: attachment; filename=\"=?GBK?B?{xls_name}?=\"\r\n\
         Content-Transfer-Encoding: base64\r\n\
         \r\n\
         {xlsx}\r\n\
         ------=_NextPart_000--\r\n",
        from_name = b64(&gbk("张三")),
        to = s.addr("alice"),
        subject = b64(&gbk(subject)),
        body = b64_lines(&gbk("您好：\r\n请查询附件中的语句。\r\n")),
        gbk_pct = pct(&gbk_name),
        // Split inside the second character: only the joined bytes are valid UTF-8.
        utf8_pct_a = pct(&utf8_name[..4]),
        utf8_pct_b = pct(&utf8_name[4..]),
        sql = b64_lines(&sql),
        csv = b64_lines(&csv),
        xls_name = b64(&gbk("样本 统计.xls")),
        xlsx = b64_lines(&xlsx),
    );
    let alice = s.addr("alice");
    let sent = block_on(s.mailer().send_raw(
        Some("zhang@client.example.cn"),
        &[alice.as_str()],
        &message_id,
        raw.as_bytes(),
    ))
    .unwrap();
    assert_eq!(sent.recipients, vec![alice.clone()]);

    let mut c = s.imap("alice");
    let uid = wait_for(&mut c, &message_id);
    let m = fetch_parsed(&mut c, uid);
    assert_eq!(m.subject, format!("{subject} {token}"));
    let from = m.from.as_ref().unwrap();
    assert_eq!(from.name.as_deref(), Some("张三"));
    assert_eq!(from.address, "zhang@client.example.cn");
    assert_eq!(m.text.as_deref(), Some("您好：\n请查询附件中的语句。\n"));
    let names: Vec<_> = m.attachments.iter().map(|a| a.name.as_deref()).collect();
    assert_eq!(
        names,
        [
            Some("查询语句.sql"),
            Some("结果 报表.csv"),
            Some("样本 统计.xls")
        ]
    );
    assert_eq!(m.attachments[0].data, sql);
    assert_eq!(
        m.attachments[0].text(),
        "SELECT 样本编号, 状态 FROM 样本 WHERE 项目 = '测序';\r\n",
        "an undeclared-charset GBK file reads as text through the fallback"
    );
    assert_eq!(m.attachments[1].data, csv);
    assert_eq!(m.attachments[1].charset.as_deref(), Some("utf-8"));
    assert_eq!(m.attachments[2].data, xlsx);
    assert_eq!(m.attachments[2].content_type, "application/vnd.ms-excel");
    c.delete(uid).unwrap();
    c.logout().unwrap();
}

#[test]
fn reply_headers_survive_the_round_trip() {
    let s = servers!();
    let token = unique("reply");
    let question = OutgoingMail::new(format!("Bob <{}>", s.addr("bob")))
        .to(s.addr("alice"))
        .subject(format!("样本 {token}"))
        .text("请回复");
    block_on(s.mailer().send(&question)).unwrap();

    let mut alice = s.imap("alice");
    let uid = wait_for(&mut alice, question.id());
    let incoming = fetch_parsed(&mut alice, uid);
    let answer = incoming
        .reply(format!("Alice <{}>", s.addr("alice")))
        .text("已回复")
        .attach(Attachment::guessed("结果.tsv", b"a\tb\n".to_vec()));
    block_on(s.mailer().send(&answer)).unwrap();
    alice.add_flags(uid, &[Flag::Answered]).unwrap();
    alice.delete(uid).unwrap();
    alice.logout().unwrap();

    let mut bob = s.imap("bob");
    let uid = wait_for(&mut bob, answer.id());
    let m = fetch_parsed(&mut bob, uid);
    assert_eq!(m.subject, format!("Re: 样本 {token}"));
    assert_eq!(m.in_reply_to, vec![question.id().to_owned()]);
    assert_eq!(m.references, vec![question.id().to_owned()]);
    assert_eq!(m.to[0].address, s.addr("bob"));
    assert_eq!(m.text.as_deref(), Some("已回复"));
    assert_eq!(m.attachments[0].name.as_deref(), Some("结果.tsv"));
    bob.delete(uid).unwrap();
    bob.logout().unwrap();
}

#[test]
fn flags_are_set_seen_and_removed() {
    let s = servers!();
    let mail = OutgoingMail::new(s.addr("carol"))
        .to(s.addr("alice"))
        .subject(unique("flags"))
        .text("x");
    block_on(s.mailer().send(&mail)).unwrap();
    let mut c = s.imap("alice");
    let uid = wait_for(&mut c, mail.id());
    assert!(!c.flags(uid).unwrap().contains(&Flag::Seen));
    let processed = Flag::Keyword("$LabrelayProcessed".into());
    c.add_flags(uid, &[Flag::Seen, processed.clone()]).unwrap();
    let flags = c.flags(uid).unwrap();
    assert!(
        flags.contains(&Flag::Seen) && flags.contains(&processed),
        "{flags:?}"
    );
    assert!(
        c.uid_search("SEEN KEYWORD $LabrelayProcessed")
            .unwrap()
            .contains(&uid)
    );
    c.remove_flags(uid, std::slice::from_ref(&processed))
        .unwrap();
    let flags = c.flags(uid).unwrap();
    assert!(
        flags.contains(&Flag::Seen) && !flags.contains(&processed),
        "{flags:?}"
    );
    assert!(matches!(
        c.add_flags(uid, &[Flag::Keyword("two words".into())]),
        Err(MailError::InvalidMessage(_))
    ));
    c.delete(uid).unwrap();
    let err = c.fetch_raw(uid).unwrap_err();
    assert!(matches!(err, MailError::NoSuchMessage { .. }), "{err}");
    c.logout().unwrap();
}

#[test]
fn messages_move_to_another_folder_with_move_and_with_copy_expunge() {
    let s = servers!();
    // A Chinese name exercises modified UTF-7; unique so parallel runs do not collide.
    let folder = format!("已处理-{}", unique("move"));
    let mut c = s.imap("carol");
    assert!(c.create_folder_if_missing(&folder).unwrap());
    assert!(!c.create_folder_if_missing(&folder).unwrap());
    assert!(c.folder_exists(&folder).unwrap());

    let first = OutgoingMail::new(s.addr("bob"))
        .to(s.addr("carol"))
        .subject(unique("move-1"))
        .text("1");
    let second = OutgoingMail::new(s.addr("bob"))
        .to(s.addr("carol"))
        .subject(unique("move-2"))
        .text("2");
    block_on(s.mailer().send(&first)).unwrap();
    block_on(s.mailer().send(&second)).unwrap();
    let uid1 = wait_for(&mut c, first.id());
    let uid2 = wait_for(&mut c, second.id());

    assert!(c.has_capability("MOVE"), "Dovecot advertises MOVE");
    assert_eq!(c.move_to(uid1, &folder).unwrap(), MoveMethod::Move);
    let method = c.copy_and_expunge(uid2, &folder).unwrap();
    assert_eq!(method, MoveMethod::CopyUidExpunge);
    assert!(
        c.search_message_id(first.id()).unwrap().is_empty(),
        "left INBOX"
    );
    assert!(
        c.search_message_id(second.id()).unwrap().is_empty(),
        "left INBOX"
    );
    let err = c.move_to(uid1, &folder).unwrap_err();
    assert!(
        matches!(err, MailError::NoSuchMessage { uid, .. } if uid == uid1),
        "{err}"
    );

    let info = c.select(&folder).unwrap();
    assert_eq!(info.exists, 2);
    let moved = wait_for(&mut c, first.id());
    assert_eq!(fetch_parsed(&mut c, moved).subject, first.subject_text());
    wait_for(&mut c, second.id());
    c.delete_folder(&folder).unwrap();
    assert!(!c.folder_exists(&folder).unwrap());
    c.logout().unwrap();
}

/// How long a test waits for the IDLE readiness signal before failing: IDLE was not
/// entered (a server without IDLE, or the client fell back to polling).
const IDLE_READY: Duration = Duration::from_secs(10);

/// An IDLE wait on its own thread that reports when the server accepted IDLE.
fn idle_in_background(
    mut c: ImapClient,
    timeout: Duration,
) -> (
    std::sync::mpsc::Receiver<()>,
    std::thread::JoinHandle<(ImapClient, bool, Duration)>,
) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let start = Instant::now();
        let woke = c
            .idle_notify(timeout, move || {
                let _ = ready_tx.send(());
            })
            .unwrap();
        (c, woke, start.elapsed())
    });
    (ready_rx, waiter)
}

#[test]
fn idle_wakes_when_mail_arrives() {
    let s = servers!();
    // A mailbox of this test's own: Dovecot saves mail for bob+FOLDER into FOLDER
    // (lmtp_save_to_detail_mailbox), so no other test's mail can wake this IDLE.
    let folder = unique("idle");
    let mut c = s.imap("bob");
    c.create_folder_if_missing(&folder).unwrap();
    c.select(&folder).unwrap();
    let mail = OutgoingMail::new(s.addr("alice"))
        .to(format!("bob+{folder}@{}", s.domain))
        .subject(unique("idle"))
        .text("wake up");
    let (ready, waiter) = idle_in_background(c, DELIVERY_TIMEOUT);
    ready
        .recv_timeout(IDLE_READY)
        .expect("the server never accepted IDLE");
    block_on(s.mailer().send(&mail)).unwrap();
    let (mut c, woke, _) = waiter.join().unwrap();
    assert!(
        woke,
        "IDLE did not report the delivery within {DELIVERY_TIMEOUT:?}"
    );
    let uid = wait_for(&mut c, mail.id());
    c.delete(uid).unwrap();
    c.select("INBOX").unwrap();
    c.delete_folder(&folder).unwrap();
    c.logout().unwrap();
}

#[test]
fn idle_times_out_quietly_and_wakes_on_append() {
    let s = servers!();
    let folder = unique("idle-quiet");
    let mut c = s.imap("carol");
    c.create_folder_if_missing(&folder).unwrap();
    c.select(&folder).unwrap();
    // Nothing arrives in a new folder: IDLE is entered and ends at its timeout.
    let (ready, waiter) = idle_in_background(c, Duration::from_secs(2));
    ready
        .recv_timeout(IDLE_READY)
        .expect("the server never accepted IDLE");
    let (c, woke, elapsed) = waiter.join().unwrap();
    assert!(!woke, "nothing arrives in a new folder");
    assert!(elapsed >= Duration::from_millis(1900), "{elapsed:?}");

    // An APPEND by another session, made once IDLE is running, wakes it.
    let imap = s.imap_config("carol", &test_support::setting("MAIL_PASS_CAROL").unwrap());
    let (ready, waiter) = idle_in_background(c, Duration::from_secs(30));
    ready
        .recv_timeout(IDLE_READY)
        .expect("the server never accepted IDLE");
    let mut other = ImapClient::connect(&imap).unwrap();
    let raw = b"From: a@b.example\r\nSubject: appended\r\nMessage-ID: <appended@x>\r\n\r\nhi\r\n";
    other.append(&folder, raw, &[Flag::Seen]).unwrap();
    other.logout().unwrap();
    let (mut c, woke, elapsed) = waiter.join().unwrap();
    assert!(woke, "APPEND by another session wakes IDLE");
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
    let uid = wait_for(&mut c, "<appended@x>");
    assert!(c.flags(uid).unwrap().contains(&Flag::Seen));
    c.delete_folder(&folder).unwrap();
    c.logout().unwrap();
}

#[test]
fn outbox_mode_writes_a_complete_eml_without_any_server() {
    let dir = test_support::tempdir();
    let outbox = dir.path().join("outbox");
    let mailer = Mailer::from_config(None, &outbox).unwrap();
    assert!(matches!(mailer, Mailer::Outbox(_)));
    let mail = OutgoingMail::new("测序中心 <seq@lab.example.org>")
        .to("客户 <customer@example.com>")
        .cc("staff1@lab.example.org, 王五 <staff2@lab.example.org>")
        .bcc("archive@lab.example.org")
        .reply_to("support@lab.example.org")
        .subject("交付通知 delivery")
        .text("数据已交付。")
        .html("<p>数据已交付。</p>")
        .attach(Attachment::guessed(
            "md5 校验.txt",
            b"abc  file.fq.gz\n".to_vec(),
        ))
        .in_reply_to("<req-1@example.com>")
        .references(["<req-0@example.com>", "<req-1@example.com>"]);
    let sent = block_on(mailer.send(&mail)).unwrap();
    let path = sent.outbox_path.clone().unwrap();
    assert_eq!(path.parent(), Some(outbox.as_path()));
    let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
    assert!(file_name.ends_with("@lab.example.org.eml"), "{file_name}");
    assert!(
        file_name.starts_with("20"),
        "sortable UTC timestamp first: {file_name}"
    );
    assert_eq!(
        std::fs::read_dir(&outbox).unwrap().count(),
        1,
        "no temporary file left"
    );

    let raw = std::fs::read(&path).unwrap();
    let m = parse(&raw).unwrap();
    assert_eq!(m.message_id.as_deref(), Some(mail.id()));
    assert_eq!(m.subject, "交付通知 delivery");
    assert_eq!(m.from.as_ref().unwrap().name.as_deref(), Some("测序中心"));
    assert_eq!(m.to[0].address, "customer@example.com");
    let cc: Vec<_> = m.cc.iter().map(ToString::to_string).collect();
    assert_eq!(
        cc,
        ["staff1@lab.example.org", "王五 <staff2@lab.example.org>"]
    );
    assert_eq!(m.reply_to[0].address, "support@lab.example.org");
    assert_eq!(m.in_reply_to, vec!["<req-1@example.com>"]);
    assert_eq!(
        m.references,
        vec!["<req-0@example.com>", "<req-1@example.com>"]
    );
    assert!(m.date.is_some());
    assert_eq!(m.text.as_deref(), Some("数据已交付。"));
    assert_eq!(m.html.as_deref(), Some("<p>数据已交付。</p>"));
    assert_eq!(m.attachments[0].name.as_deref(), Some("md5 校验.txt"));
    assert!(
        m.header("Bcc").is_none(),
        "Bcc is not a header of the message"
    );
    let envelope_to = m.header(labrelay::mail::ENVELOPE_TO_HEADER).unwrap();
    for rcpt in [
        "customer@example.com",
        "staff1@lab.example.org",
        "staff2@lab.example.org",
        "archive@lab.example.org",
    ] {
        assert!(
            envelope_to.contains(rcpt),
            "{rcpt} missing from {envelope_to}"
        );
    }
    assert_eq!(
        m.header(labrelay::mail::ENVELOPE_FROM_HEADER).as_deref(),
        Some("<seq@lab.example.org>")
    );
}

#[test]
fn unreachable_imap_server_is_retried_then_a_temporary_failure() {
    let s = servers!();
    let mut cfg = s.imap_config("alice", "x");
    // Port 1 on loopback: refused at once.
    cfg.port = Some(1);
    let err = ImapClient::connect(&cfg).unwrap_err();
    assert_eq!(err.exit(), Exit::TempFail, "{err}");
    let MailError::GaveUp { attempts, last } = &err else {
        panic!("not retried: {err:?}");
    };
    assert_eq!(*attempts, labrelay::retry::policy().attempts, "{err}");
    assert!(matches!(**last, MailError::Connect { .. }), "{err:?}");
}

#[test]
fn wrong_imap_password_is_a_configuration_error_that_does_not_show_it() {
    let s = servers!();
    let password = format!("wrong-{}", unique("pw"));
    let err = ImapClient::connect(&s.imap_config("alice", &password)).unwrap_err();
    assert_eq!(err.exit(), Exit::Config, "{err}");
    assert!(matches!(err, MailError::Auth { .. }), "{err:?}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(&password), "password leaked: {shown}");
    let chained = anyhow::Error::new(err).context("checking the mail-query inbox");
    assert_eq!(classify(&chained), Exit::Config);
    assert!(!format!("{chained:#} {chained:?}").contains(&password));
}

#[test]
fn unreachable_smtp_server_is_a_temporary_failure() {
    // A port that was just free: nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = SmtpConfig {
        host: "127.0.0.1".into(),
        port: Some(port),
        security: TlsMode::None,
        username: Some("lab".into()),
        password: Some(SecretSpec::parse("smtp-secret-never-shown")),
        timeout_secs: 5,
        hello_name: None,
        ca_file: None,
    };
    let mailer = Mailer::from_config(Some(&cfg), std::path::Path::new("/nonexistent")).unwrap();
    let mail = OutgoingMail::new("lab@example.org")
        .to("x@example.org")
        .text("x");
    let err = block_on(mailer.send(&mail)).unwrap_err();
    assert_eq!(err.exit(), Exit::TempFail, "{err}");
    // Retried under the policy, then given up: still 75, no longer transient.
    let MailError::GaveUp { attempts, last } = &err else {
        panic!("not retried: {err:?}");
    };
    assert_eq!(*attempts, labrelay::retry::policy().attempts, "{err}");
    assert!(matches!(**last, MailError::Connect { .. }), "{err:?}");
    assert!(!labrelay::exit::ExitClass::is_transient(&err));
    assert!(!format!("{err} {err:?}").contains("smtp-secret"));
    assert_eq!(classify(&anyhow::Error::new(err)), Exit::TempFail);
}

#[test]
fn unknown_recipient_is_a_permanent_failure() {
    let s = servers!();
    let mail = OutgoingMail::new(s.addr("alice"))
        .to(format!("{}@{}", unique("nobody"), s.domain))
        .subject("x")
        .text("x");
    let err = block_on(s.mailer().send(&mail)).unwrap_err();
    assert!(matches!(err, MailError::Rejected { .. }), "{err:?}");
    assert_eq!(err.exit(), Exit::Failed);
    assert!(
        err.to_string().contains("55"),
        "the server's 5xx reply is quoted: {err}"
    );
}

#[test]
fn starttls_required_but_not_offered_is_a_configuration_error() {
    // The test Dovecot has TLS off, so a STARTTLS configuration cannot work with it;
    // nothing must be sent in clear text instead.
    let s = servers!();
    let mut cfg = s.imap_config("alice", &test_support::setting("MAIL_PASS_ALICE").unwrap());
    cfg.security = TlsMode::Starttls;
    let err = ImapClient::connect(&cfg).unwrap_err();
    assert_eq!(err.exit(), Exit::Config, "{err}");
    assert!(err.to_string().contains("STARTTLS"), "{err}");
}

#[test]
fn smtp_starttls_required_but_not_offered_is_a_configuration_error() {
    let s = servers!();
    let mut cfg = s.smtp();
    cfg.security = TlsMode::Starttls;
    let mailer = Mailer::from_config(Some(&cfg), std::path::Path::new("/nonexistent")).unwrap();
    let mail = OutgoingMail::new(s.addr("alice"))
        .to(s.addr("alice"))
        .subject(unique("starttls"))
        .text("must not be sent in clear text");
    let err = block_on(mailer.send(&mail)).unwrap_err();
    assert_eq!(err.exit(), Exit::Config, "{err:?}");
}

/// An SMTP server on a free port for `connections` sessions, offering 8BITMIME but
/// not SMTPUTF8 and accepting everything; returns its port and the commands it got.
fn smtp_without_smtputf8(connections: usize) -> (u16, std::thread::JoinHandle<Vec<String>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let mut commands = Vec::new();
        for stream in listener.incoming().take(connections) {
            fake_smtp_session(stream.unwrap(), &mut commands);
        }
        commands
    });
    (port, server)
}

fn fake_smtp_session(stream: std::net::TcpStream, commands: &mut Vec<String>) {
    use std::io::{BufRead, BufReader, Write};
    {
        let mut out = stream.try_clone().unwrap();
        let mut lines = BufReader::new(stream);
        out.write_all(b"220 fake ESMTP\r\n").unwrap();
        let mut line = Vec::new();
        while lines.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text = String::from_utf8_lossy(&line).trim_end().to_owned();
            line.clear();
            let verb = text.split(' ').next().unwrap_or("").to_ascii_uppercase();
            commands.push(text);
            let reply: &[u8] = match verb.as_str() {
                "EHLO" => b"250-fake\r\n250 8BITMIME\r\n",
                "DATA" => {
                    out.write_all(b"354 go on\r\n").unwrap();
                    // Swallow the message up to the lone dot.
                    let mut body = Vec::new();
                    while lines.read_until(b'\n', &mut body).unwrap_or(0) > 0 {
                        if body.ends_with(b"\r\n.\r\n") {
                            break;
                        }
                    }
                    b"250 2.0.0 queued\r\n"
                }
                "QUIT" => {
                    out.write_all(b"221 bye\r\n").unwrap();
                    break;
                }
                _ => b"250 ok\r\n",
            };
            out.write_all(reply).unwrap();
        }
    }
}

fn plain_smtp(port: u16) -> SmtpConfig {
    SmtpConfig {
        host: "127.0.0.1".into(),
        port: Some(port),
        security: TlsMode::None,
        username: None,
        password: None,
        timeout_secs: 5,
        hello_name: Some("client.labrelay.test".into()),
        ca_file: None,
    }
}

/// A non-ASCII name before the @ needs SMTPUTF8; a server without it gets nothing, and
/// the error names the address.
#[test]
fn non_ascii_local_part_without_smtputf8_is_refused_naming_the_address() {
    // The session ends before MAIL; a second one is never opened.
    let (port, server) = smtp_without_smtputf8(1);
    let mailer = Mailer::from_config(Some(&plain_smtp(port)), std::path::Path::new("/x")).unwrap();
    let mail = OutgoingMail::new("lab@seq.example.org")
        .to("客户 <用户@example.org>")
        .subject("x")
        .text("x");
    let err = block_on(mailer.send(&mail)).unwrap_err();
    assert!(matches!(err, MailError::Rejected { .. }), "{err:?}");
    assert_eq!(err.exit(), Exit::Failed);
    let msg = err.to_string();
    assert!(
        msg.contains("用户@example.org") && msg.contains("SMTPUTF8"),
        "{msg}"
    );
    drop(mailer);
    let commands = server.join().unwrap();
    assert!(
        !commands
            .iter()
            .any(|c| c.starts_with("MAIL") || c.starts_with("RCPT")),
        "nothing was sent: {commands:?}"
    );
}

/// A Unicode domain goes out as punycode, so it needs no SMTPUTF8.
#[test]
fn unicode_domain_is_sent_as_punycode_without_smtputf8() {
    let (port, server) = smtp_without_smtputf8(2);
    let mailer = Mailer::from_config(Some(&plain_smtp(port)), std::path::Path::new("/x")).unwrap();
    let mail = OutgoingMail::new("lab@seq.example.org")
        .to("Kunde <kunde@bücher.example>")
        .subject("x")
        .text("x");
    block_on(mailer.send(&mail)).unwrap();
    block_on(mailer.send_raw(
        Some("lab@seq.example.org"),
        &["zweite@bücher.example"],
        "<raw-1@seq.example.org>",
        b"Subject: raw\r\n\r\nx\r\n",
    ))
    .unwrap();
    drop(mailer);
    let commands = server.join().unwrap();
    for rcpt in [
        "RCPT TO:<kunde@xn--bcher-kva.example>",
        "RCPT TO:<zweite@xn--bcher-kva.example>",
    ] {
        assert!(commands.iter().any(|c| c == rcpt), "{commands:?}");
    }
    assert!(commands.iter().all(|c| c.is_ascii()), "{commands:?}");
}

/// Postfix offers SMTPUTF8: a non-ASCII sender name goes through.
#[test]
fn non_ascii_local_part_is_sent_with_smtputf8_when_offered() {
    let s = servers!();
    let mail = OutgoingMail::new(format!("实验室@{}", s.domain))
        .to(s.addr("alice"))
        .subject(unique("smtputf8"))
        .text("x");
    block_on(s.mailer().send(&mail)).unwrap();
}
