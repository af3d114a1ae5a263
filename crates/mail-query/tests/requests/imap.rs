//! `mail-query --once` against the real Postfix and Dovecot: request mails are sent over
//! SMTP to `carol+FOLDER` (Dovecot files them in FOLDER), the tool reads that folder,
//! answers through Postfix to `alice+REPLIES`, and the test reads the replies over
//! IMAP. Every test has its own folders.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use labrelay::config::{ImapConfig, TlsMode};
use labrelay::mail::{ImapClient, Mailer, OutgoingMail};
use labrelay::secret::SecretSpec;

use super::{Home, Signer, raw, request, unzip};
use crate::export::TempDb;

const WAIT: Duration = Duration::from_secs(30);

struct Mail {
    smtp_port: String,
    imap_port: String,
    domain: String,
    carol: String,
    alice: String,
}

macro_rules! mail {
    () => {
        Mail {
            smtp_port: test_support::require!("SMTP_PORT"),
            imap_port: test_support::require!("IMAP_PORT"),
            domain: test_support::require!("MAIL_DOMAIN"),
            carol: test_support::require!("MAIL_PASS_CAROL"),
            alice: test_support::require!("MAIL_PASS_ALICE"),
        }
    };
}

impl Mail {
    fn imap(&self, user: &str) -> ImapClient {
        let password = if user == "carol" {
            &self.carol
        } else {
            &self.alice
        };
        let cfg = ImapConfig {
            host: "127.0.0.1".into(),
            port: Some(self.imap_port.parse().unwrap()),
            security: TlsMode::None,
            username: user.into(),
            password: SecretSpec::parse(password),
            folder: "INBOX".into(),
            timeout_secs: 20,
            ca_file: None,
        };
        ImapClient::connect(&cfg).unwrap()
    }

    fn mailer(&self) -> Mailer {
        let smtp = labrelay::config::SmtpConfig {
            host: "127.0.0.1".into(),
            port: Some(self.smtp_port.parse().unwrap()),
            security: TlsMode::None,
            username: None,
            password: None,
            timeout_secs: 20,
            hello_name: Some("client.labrelay.test".into()),
            ca_file: None,
        };
        Mailer::from_config(Some(&smtp), std::path::Path::new("/nonexistent")).unwrap()
    }

    /// Folders of one test: requests arrive in `inbox` (carol), replies in `replies`
    /// (alice).
    fn folders(&self) -> Folders {
        let base = test_support::unique("mq").replace('-', "_");
        let f = Folders {
            inbox: base.clone(),
            processed: format!("{base}_done"),
            rejected: format!("{base}_refused"),
            replies: format!("{base}_re"),
        };
        let mut c = self.imap("carol");
        c.create_folder_if_missing(&f.inbox).unwrap();
        c.logout().unwrap();
        let mut a = self.imap("alice");
        a.create_folder_if_missing(&f.replies).unwrap();
        a.logout().unwrap();
        f
    }

    fn config(&self, f: &Folders, db_url: &str, signer: &Signer) -> String {
        format!(
            "[smtp]\nhost = \"127.0.0.1\"\nport = {smtp}\nsecurity = \"none\"\n\
             [imap]\nhost = \"127.0.0.1\"\nport = {imap}\nsecurity = \"none\"\n\
             username = \"carol\"\npassword = \"env:MQ_TEST_IMAP_PASSWORD\"\n\
             [databases.lims]\nurl = \"{db_url}\"\n\
             [mail_query]\nfolder = \"{inbox}\"\nprocessed_folder = \"{done}\"\n\
             rejected_folder = \"{refused}\"\n\
             [mail_query.dkim_keys]\n\"s1._domainkey.{domain}\" = \"{record}\"\n\
             [mail_query.databases.lims]\ndatabase = \"lims\"\nallow = [\"@{domain}\"]\n",
            smtp = self.smtp_port,
            imap = self.imap_port,
            inbox = f.inbox,
            done = f.processed,
            refused = f.rejected,
            domain = self.domain,
            record = signer.record,
        )
    }

    /// Send a signed request from `alice+REPLIES` to `carol+INBOX`; its Message-ID.
    async fn send(&self, f: &Folders, signer: &Signer, body: &str, sql: &str) -> String {
        let m: OutgoingMail = request(
            &format!("alice+{}@{}", f.replies, self.domain),
            &format!("carol+{}@{}", f.inbox, self.domain),
            body,
            &[("q.sql", sql)],
        );
        let bytes = signer.sign(&raw(&m), &self.domain, false);
        let to = format!("carol+{}@{}", f.inbox, self.domain);
        self.mailer()
            .send_raw(
                Some(&format!("alice@{}", self.domain)),
                &[to.as_str()],
                m.id(),
                &bytes,
            )
            .await
            .unwrap();
        m.id().to_owned()
    }

    /// Wait until `folder` of `user` holds `n` messages; their raw texts by UID.
    fn wait_count(&self, user: &str, folder: &str, n: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + WAIT;
        let mut c = self.imap(user);
        loop {
            c.select(folder).unwrap();
            let uids = c.uid_search("ALL").unwrap();
            if uids.len() >= n || Instant::now() > deadline {
                let raws = uids.iter().map(|u| c.fetch_raw(*u).unwrap()).collect();
                c.logout().unwrap();
                return raws;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn count(&self, user: &str, folder: &str) -> usize {
        let mut c = self.imap(user);
        let n = if c.folder_exists(folder).unwrap() {
            c.select(folder).unwrap();
            c.uid_search("ALL").unwrap().len()
        } else {
            0
        };
        c.logout().unwrap();
        n
    }

    fn cleanup(&self, f: &Folders) {
        let mut c = self.imap("carol");
        for folder in [&f.inbox, &f.processed, &f.rejected] {
            if c.folder_exists(folder).unwrap() {
                c.delete_folder(folder).unwrap();
            }
        }
        c.logout().unwrap();
        let mut a = self.imap("alice");
        a.delete_folder(&f.replies).unwrap();
        a.logout().unwrap();
    }
}

struct Folders {
    inbox: String,
    processed: String,
    rejected: String,
    replies: String,
}

fn once(home: &Home, mail: &Mail) -> std::process::Output {
    let mut cmd = test_support::cli::command(crate::BIN, home.dir.path());
    cmd.env("MQ_TEST_IMAP_PASSWORD", &mail.carol)
        .arg("--config")
        .arg(&home.config)
        .args(["--json", "--once"]);
    cmd.output().unwrap()
}

/// `yield_gb` as the engine renders 812.50 (SQLite keeps NUMERIC as a REAL: 812.5).
async fn round_trip(t: TempDb, yield_gb: &str) {
    let mail = mail!();
    t.exec(
        "CREATE TABLE runs (id INTEGER PRIMARY KEY, flowcell VARCHAR(20), yield_gb NUMERIC(8,2))",
    )
    .await;
    t.exec("INSERT INTO runs VALUES (1, 'HXXXXDSX7', 812.50), (2, 'HYYYYDSX7', NULL)")
        .await;
    let signer = Signer::new();
    let f = mail.folders();
    let home = Home::new(&mail.config(&f, t.cfg.url.expose().as_str(), &signer));
    let id = mail
        .send(
            &f,
            &signer,
            "database: lims",
            "SELECT id, flowcell, yield_gb FROM runs ORDER BY id",
        )
        .await;
    let refused = mail
        .send(&f, &signer, "database: lims", "DROP TABLE runs")
        .await;
    mail.wait_count("carol", &f.inbox, 2);
    let out = once(&home, &mail);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let replies = mail.wait_count("alice", &f.replies, 2);
    assert_eq!(replies.len(), 2);
    let mut answered = None;
    for r in &replies {
        let m = labrelay::mail::parse(r).unwrap();
        if m.in_reply_to == vec![id.clone()] {
            answered = Some(m);
        } else {
            assert_eq!(m.in_reply_to, vec![refused.clone()]);
            assert!(m.body_text().unwrap().contains("DROP TABLE runs"));
        }
    }
    let answered = answered.expect("no answer to the query");
    let zip = answered
        .attachments
        .iter()
        .find(|a| a.name.as_deref() == Some("result.zip"))
        .unwrap();
    let files = unzip(zip.data.clone());
    assert_eq!(
        String::from_utf8(files[0].1.clone()).unwrap(),
        format!("id,flowcell,yield_gb\r\n1,HXXXXDSX7,{yield_gb}\r\n2,HYYYYDSX7,\r\n")
    );
    assert_eq!(mail.count("carol", &f.inbox), 0);
    assert_eq!(mail.count("carol", &f.processed), 1);
    assert_eq!(mail.count("carol", &f.rejected), 1);
    assert_eq!(t.count("runs").await, 2);
    // The request log has both, with where they came from.
    let log = home.run(&["log", "--json"]);
    let rows: Vec<serde_json::Value> = String::from_utf8(log.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert_eq!(r["source"], format!("imap:{}", f.inbox), "{r}");
        assert!(r["imap_uid"].as_i64().is_some_and(|u| u > 0), "{r}");
        assert_eq!(r["stage"], "filed", "{r}");
    }
    // Nothing new: a second pass sends nothing.
    let again = once(&home, &mail);
    assert_eq!(again.status.code(), Some(0), "{again:?}");
    assert!(again.stdout.is_empty(), "{again:?}");
    assert_eq!(mail.count("alice", &f.replies), 2);
    mail.cleanup(&f);
    t.cleanup().await;
}

#[tokio::test]
async fn once_answers_over_imap_and_smtp_on_postgres() {
    let admin = test_support::require!("PG_URL");
    round_trip(TempDb::server(&admin).await, "812.50").await;
}

#[tokio::test]
async fn once_answers_over_imap_and_smtp_on_mariadb() {
    let admin = test_support::require!("MYSQL_URL");
    round_trip(TempDb::server(&admin).await, "812.50").await;
}

#[tokio::test]
async fn once_answers_over_imap_and_smtp_on_sqlite() {
    test_support::require!("SMTP_PORT");
    round_trip(TempDb::sqlite().await, "812.5").await;
}

/// kill -9 at random moments of `--once` over several requests, again and again, then a
/// run to the end: each request has one answer (one Message-ID; SMTP may repeat it
/// only for a kill between the server's acceptance and our record) and its mail is
/// filed once.
#[tokio::test]
async fn kill_9_crash_loop_answers_each_request_once_and_files_it_once() {
    let mail = mail!();
    let t = TempDb::sqlite().await;
    t.exec("CREATE TABLE t (n INTEGER)").await;
    t.exec("INSERT INTO t VALUES (1), (2), (3)").await;
    let signer = Signer::new();
    let f = mail.folders();
    let home = Home::new(&mail.config(&f, t.cfg.url.expose().as_str(), &signer));
    let mut ids = Vec::new();
    // Each query counts to 200,000 (a tenth of a second or more), so that kills land
    // in every stage of a run.
    for i in 0..10 {
        let sql = format!(
            "SELECT n, {i} AS i, (WITH RECURSIVE c(k) AS (SELECT 1 UNION ALL SELECT k + 1 \
             FROM c WHERE k < 200000) SELECT COUNT(*) FROM c) AS work FROM t"
        );
        ids.push(mail.send(&f, &signer, "database: lims", &sql).await);
    }
    mail.wait_count("carol", &f.inbox, ids.len());
    let mut kills = 0;
    let mut seed: u64 = std::process::id().into();
    // At least 25 runs, and on until 10 of them were killed (a fast machine finishes
    // many runs before their kill comes), at most 100.
    let mut runs = 0;
    while runs < 25 || (kills < 10 && runs < 100) {
        runs += 1;
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        // Short enough that most runs die while requests are still open.
        let delay = Duration::from_millis(5 + (seed >> 33) % 150);
        let mut cmd = test_support::cli::command(crate::BIN, home.dir.path());
        cmd.env("MQ_TEST_IMAP_PASSWORD", &mail.carol)
            .arg("--config")
            .arg(&home.config)
            .arg("--once")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = cmd.spawn().unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
    }
    let out = once(&home, &mail);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        kills >= 5,
        "only {kills} runs were killed; the loop tests too little"
    );
    eprintln!("{kills} of {runs} runs killed with SIGKILL before the final run");
    let replies = mail.wait_count("alice", &f.replies, ids.len());
    let mut by_request: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &replies {
        let m = labrelay::mail::parse(r).unwrap();
        by_request
            .entry(m.in_reply_to.first().cloned().unwrap_or_default())
            .or_default()
            .push(m.message_id.clone().unwrap());
    }
    for id in &ids {
        let got = by_request
            .get(id)
            .unwrap_or_else(|| panic!("{id} has no answer: {by_request:?}"));
        let first = &got[0];
        assert!(
            got.iter().all(|m| m == first),
            "{id}: answers with different Message-IDs: {got:?}"
        );
    }
    assert_eq!(by_request.len(), ids.len(), "{by_request:?}");
    assert_eq!(mail.count("carol", &f.inbox), 0);
    assert_eq!(mail.count("carol", &f.processed), ids.len());
    mail.cleanup(&f);
    t.cleanup().await;
}

/// `--watch`: answers mail as it arrives (IDLE), reloads its configuration on SIGHUP
/// (here: the reply language), and stops with exit 0 on SIGTERM.
#[tokio::test]
async fn watch_answers_as_mail_arrives_reloads_on_sighup_and_stops_on_sigterm() {
    let mail = mail!();
    let t = TempDb::sqlite().await;
    t.exec("CREATE TABLE t (n INTEGER)").await;
    t.exec("INSERT INTO t VALUES (1)").await;
    let signer = Signer::new();
    let f = mail.folders();
    let base = mail.config(&f, t.cfg.url.expose().as_str(), &signer);
    let home = Home::new(&base);
    let mut cmd = test_support::cli::command(crate::BIN, home.dir.path());
    cmd.env("MQ_TEST_IMAP_PASSWORD", &mail.carol)
        .arg("--config")
        .arg(&home.config)
        .args(["--json", "-v", "--watch"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    let pid = child.id().to_string();
    let signal = |sig: &str| {
        let st = std::process::Command::new("kill")
            .args([sig, pid.as_str()])
            .status()
            .unwrap();
        assert!(st.success(), "kill {sig} {pid}");
    };
    let first = mail
        .send(&f, &signer, "database: lims", "SELECT n FROM t")
        .await;
    let replies = mail.wait_count("alice", &f.replies, 1);
    assert_eq!(replies.len(), 1, "no answer from --watch");
    let reply = labrelay::mail::parse(&replies[0]).unwrap();
    assert_eq!(reply.in_reply_to, vec![first]);
    assert!(reply.body_text().unwrap().contains("Database: lims"));

    // Chinese replies from now on, without a restart.
    let text = std::fs::read_to_string(&home.config).unwrap();
    std::fs::write(
        &home.config,
        text.replace("[mail_query]\n", "[mail_query]\nlanguage = \"zh\"\n"),
    )
    .unwrap();
    signal("-HUP");
    std::thread::sleep(Duration::from_millis(500));
    let second = mail
        .send(&f, &signer, "database: lims", "SELECT n FROM t")
        .await;
    let replies = mail.wait_count("alice", &f.replies, 2);
    let zh = replies
        .iter()
        .map(|r| labrelay::mail::parse(r).unwrap())
        .find(|m| m.in_reply_to == vec![second.clone()])
        .expect("no answer after SIGHUP");
    assert!(
        zh.body_text().unwrap().contains("数据库：lims"),
        "{:?}",
        zh.body_text()
    );

    let stopping = Instant::now();
    signal("-TERM");
    let out = child.wait_with_output().unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "--watch took {:?} to stop",
        stopping.elapsed()
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("configuration reloaded"), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    mail.cleanup(&f);
    t.cleanup().await;
}

/// A Foxmail-style GBK request (GBK body, RFC 2047 GBK subject and sender name,
/// RFC 2231 GBK attachment name, GBK SQL) carried by Postfix and Dovecot, answered
/// with `--once` in Chinese.
#[tokio::test]
async fn gbk_request_through_postfix_and_dovecot_is_answered_in_chinese() {
    let mail = mail!();
    let t = TempDb::sqlite().await;
    t.exec("CREATE TABLE samples (id INTEGER, name TEXT)").await;
    t.exec("INSERT INTO samples VALUES (1, '样本一'), (2, '样本二')")
        .await;
    let signer = Signer::new();
    let f = mail.folders();
    let home = Home::new(&mail.config(&f, t.cfg.url.expose().as_str(), &signer));
    let id = format!("<{}@{}>", test_support::unique("gbk"), mail.domain);
    let from = format!("alice+{}@{}", f.replies, mail.domain);
    let to = format!("carol+{}@{}", f.inbox, mail.domain);
    let raw = super::foxmail_gbk(&super::Foxmail {
        from: &from,
        to: &to,
        message_id: &id,
        subject: "样本查询",
        body: "您好：\r\n数据库：lims\r\n",
        file: "样本.sql",
        sql: "SELECT name FROM samples ORDER BY id",
    });
    let bytes = signer.sign(raw.as_bytes(), &mail.domain, false);
    mail.mailer()
        .send_raw(Some(&from), &[to.as_str()], &id, &bytes)
        .await
        .unwrap();
    mail.wait_count("carol", &f.inbox, 1);
    let out = once(&home, &mail);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let replies = mail.wait_count("alice", &f.replies, 1);
    let reply = labrelay::mail::parse(&replies[0]).unwrap();
    assert_eq!(reply.in_reply_to, vec![id]);
    assert!(reply.subject.contains("样本查询"), "{}", reply.subject);
    let body = reply.body_text().unwrap();
    assert!(body.contains("样本.sql 第 1 条：2 行"), "{body}");
    let zip = reply
        .attachments
        .iter()
        .find(|a| a.name.as_deref() == Some("result.zip"))
        .unwrap();
    let files = unzip(zip.data.clone());
    assert_eq!(files[0].0, "样本-1.csv");
    assert_eq!(
        String::from_utf8(files[0].1.clone()).unwrap(),
        "name\r\n样本一\r\n样本二\r\n"
    );
    mail.cleanup(&f);
    t.cleanup().await;
}
