//! Request mails answered end to end by the `mail-query` binary: `--eml` on the embedded
//! defaults (SQLite, replies in the outbox), and `--once` against the real Postfix and
//! Dovecot with PostgreSQL, MariaDB and SQLite as the queried databases.
//!
//! Request mails are DKIM-signed with a key made for the test; the tool gets its public
//! key through `[mail_query.dkim_keys]`, so no DNS is involved.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose
#![allow(clippy::many_single_char_names)] // t(able), m(ail), r(ecord) in every test

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Output;

use base64::Engine as _;
use labrelay::mail::{Attachment, IncomingMail, OutgoingMail};
use mail_auth::common::crypto::Ed25519Key;
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::DkimSigner;

use crate::BIN;
use crate::export::TempDb;

mod imap;

/// A DKIM key of the test, and the TXT record that publishes it.
pub(crate) struct Signer {
    pkcs8: Vec<u8>,
    pub(crate) record: String,
}

impl Signer {
    pub(crate) fn new() -> Signer {
        let pkcs8 = Ed25519Key::generate_pkcs8().unwrap();
        let key = Ed25519Key::from_pkcs8_der(&pkcs8).unwrap();
        let record = format!(
            "v=DKIM1; k=ed25519; p={}",
            base64::engine::general_purpose::STANDARD.encode(key.public_key())
        );
        Signer { pkcs8, record }
    }

    /// `raw` with a DKIM-Signature of `domain`, selector `s1`; `l=` when `body_length`.
    pub(crate) fn sign(&self, raw: &[u8], domain: &str, body_length: bool) -> Vec<u8> {
        let key = Ed25519Key::from_pkcs8_der(&self.pkcs8).unwrap();
        let sig = DkimSigner::from_key(key)
            .domain(domain)
            .selector("s1")
            .headers([
                "From",
                "To",
                "Cc",
                "Subject",
                "Date",
                "Message-ID",
                "Reply-To",
            ])
            .body_length(body_length)
            .sign(raw)
            .unwrap();
        let mut out = sig.to_header().into_bytes();
        out.extend_from_slice(raw);
        out
    }
}

pub(crate) const LAB: &str = "lab.example";

/// A request from `from` naming `database`, with SQL attachments.
pub(crate) fn request(from: &str, to: &str, body: &str, sql: &[(&str, &str)]) -> OutgoingMail {
    let mut m = OutgoingMail::new(from)
        .to(to)
        .subject(test_support::unique("query"))
        .text(body);
    for (name, text) in sql {
        m = m.attach(Attachment::new(
            *name,
            "application/sql",
            text.as_bytes().to_vec(),
        ));
    }
    m
}

/// A Foxmail-style request: GBK text body in base64, RFC 2047 GBK sender name and
/// subject, an RFC 2231 GBK attachment name and GBK SQL.
pub(crate) struct Foxmail<'a> {
    pub(crate) from: &'a str,
    pub(crate) to: &'a str,
    pub(crate) message_id: &'a str,
    pub(crate) subject: &'a str,
    pub(crate) body: &'a str,
    pub(crate) file: &'a str,
    pub(crate) sql: &'a str,
}

pub(crate) fn foxmail_gbk(m: &Foxmail<'_>) -> String {
    let gbk = |s: &str| encoding_rs::GBK.encode(s).0.into_owned();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let name_pct = gbk(m.file).iter().fold(String::new(), |mut s, b| {
        let _ = std::fmt::Write::write_fmt(&mut s, format_args!("%{b:02X}"));
        s
    });
    format!(
        "From: =?GBK?B?{name}?= <{from}>\r\nTo: {to}\r\nSubject: =?GBK?B?{subject}?=\r\n\
         Message-ID: {id}\r\nDate: Mon, 30 Nov 2026 10:00:00 +0800\r\nMIME-Version: 1.0\r\n\
         X-Mailer: Foxmail 7.2\r\nContent-Type: multipart/mixed; boundary=\"fx\"\r\n\r\n\
         --fx\r\nContent-Type: text/plain; charset=\"GBK\"\r\nContent-Transfer-Encoding: base64\r\n\r\n\
         {body}\r\n--fx\r\nContent-Type: application/octet-stream\r\n\
         Content-Disposition: attachment; filename*=GBK''{name_pct}\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{sql}\r\n--fx--\r\n",
        name = b64(&gbk("张三")),
        from = m.from,
        to = m.to,
        id = m.message_id,
        subject = b64(&gbk(m.subject)),
        body = b64(&gbk(m.body)),
        sql = b64(&gbk(m.sql)),
    )
}

pub(crate) fn raw(m: &OutgoingMail) -> Vec<u8> {
    m.build().unwrap().formatted()
}

/// A home folder with a config file.
pub(crate) struct Home {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) config: PathBuf,
}

impl Home {
    pub(crate) fn new(toml: &str) -> Home {
        let dir = test_support::tempdir();
        let data = dir.path().join("data");
        let text = format!(
            "[paths]\ndata_dir = \"{}\"\n[mail]\nfrom = \"SQL robot <sql@labrelay.test>\"\n{toml}",
            data.display()
        );
        let config = test_support::write_config(dir.path(), &text);
        Home { dir, config }
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        let mut cmd = test_support::cli::command(BIN, self.dir.path());
        cmd.arg("--config").arg(&self.config).args(args);
        cmd.output().unwrap()
    }

    /// `mail-query --eml FILE --json`, the request written to a file first.
    pub(crate) fn eml(&self, raw: &[u8]) -> Output {
        let f = self
            .dir
            .path()
            .join(format!("{}.eml", test_support::unique("req")));
        std::fs::write(&f, raw).unwrap();
        self.run(&["--json", "--eml", f.to_str().unwrap()])
    }

    pub(crate) fn outbox(&self) -> Vec<PathBuf> {
        let dir = self.dir.path().join("data/outbox");
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        v.retain(|p| p.extension().is_some_and(|e| e == "eml"));
        v.sort();
        v
    }
}

pub(crate) fn record(out: &Output) -> serde_json::Value {
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("\"type\":\"request\""))
        .unwrap_or_else(|| panic!("no request record: {out:?}"));
    serde_json::from_str(line).unwrap()
}

/// The zip of a reply (whole, or its parts joined) as (name, bytes) files.
pub(crate) fn unzip(bytes: Vec<u8>) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut data = Vec::new();
            f.read_to_end(&mut data).unwrap();
            (f.name().unwrap().into_owned(), data)
        })
        .collect()
}

pub(crate) fn parse_file(p: &Path) -> IncomingMail {
    labrelay::mail::parse(&std::fs::read(p).unwrap()).unwrap()
}

fn sqlite_config(t: &TempDb, signer: &Signer, extra: &str) -> String {
    format!(
        "[databases.lims]\nurl = \"{}\"\n\
         [mail_query]\nstaff_cc = [\"dba@labrelay.test\"]\n{extra}\n\
         [mail_query.dkim_keys]\n\"s1._domainkey.{LAB}\" = \"{}\"\n\
         \"s1._domainkey.other.example\" = \"{}\"\n\
         [mail_query.databases.lims]\ndatabase = \"lims\"\naliases = [\"样本库\"]\n\
         allow = [\"alice@{LAB}\"]\n",
        t.cfg.url.expose(),
        signer.record,
        signer.record
    )
}

async fn samples() -> TempDb {
    let t = TempDb::sqlite().await;
    t.exec("CREATE TABLE samples (id INTEGER PRIMARY KEY, name TEXT, reads INTEGER)")
        .await;
    t.exec("INSERT INTO samples VALUES (1, 'S-001', 1200), (2, '样本二', NULL), (3, 'a,\"b\"', 7)")
        .await;
    t
}

#[tokio::test]
async fn eml_request_is_answered_once_with_the_csv_in_a_zip() {
    let t = samples().await;
    let signer = Signer::new();
    let home = Home::new(&sqlite_config(&t, &signer, ""));
    let m = request(
        &format!("Alice <alice@{LAB}>"),
        "sql@labrelay.test",
        "Hello,\r\n\r\ndatabase: LIMS\r\n",
        &[(
            "report.sql",
            "SELECT id, name, reads FROM samples ORDER BY id;\nSELECT COUNT(*) AS n FROM samples",
        )],
    )
    .cc(format!("boss@{LAB}"))
    .reply_to("attacker@evil.example");
    let request_bytes = signer.sign(&raw(&m), LAB, false);
    let out = home.eml(&request_bytes);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let r = record(&out);
    assert_eq!(r["verdict"], "answered", "{r}");
    assert_eq!(r["database"], "lims");
    assert_eq!(r["statements"], 2);
    assert_eq!(r["rows"], 4);
    assert_eq!(r["mails"], 1);
    assert_eq!(r["from"], format!("alice@{LAB}"));
    let mails = home.outbox();
    assert_eq!(mails.len(), 1, "{mails:?}");
    let text = std::fs::read_to_string(&mails[0]).unwrap_or_default();
    // The envelope: the sender and staff_cc only; neither Cc nor Reply-To.
    // The envelope header (folded over lines) and the mail's own headers.
    let envelope = text.split("\r\n\r\n").next().unwrap().to_owned();
    assert!(
        envelope.contains(labrelay::mail::ENVELOPE_TO_HEADER),
        "{envelope}"
    );
    assert!(envelope.contains(&format!("alice@{LAB}")), "{envelope}");
    assert!(envelope.contains("dba@labrelay.test"), "{envelope}");
    assert!(!envelope.contains("boss@"), "{envelope}");
    assert!(!envelope.contains("attacker@"), "{envelope}");
    let reply = parse_file(&mails[0]);
    assert_eq!(reply.in_reply_to, vec![m.id().to_owned()]);
    assert!(reply.references.contains(&m.id().to_owned()));
    let body = reply.body_text().unwrap();
    assert!(body.contains("Database: lims"), "{body}");
    assert!(body.contains("report.sql #1: 3 rows"), "{body}");
    let zip = reply
        .attachments
        .iter()
        .find(|a| a.name.as_deref() == Some("result.zip"))
        .unwrap();
    let files = unzip(zip.data.clone());
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["report-1.csv", "report-2.csv"]);
    assert_eq!(
        String::from_utf8(files[0].1.clone()).unwrap(),
        "id,name,reads\r\n1,S-001,1200\r\n2,样本二,\r\n3,\"a,\"\"b\"\"\",7\r\n"
    );
    assert_eq!(String::from_utf8(files[1].1.clone()).unwrap(), "n\r\n3\r\n");

    // The same message again (a second delivery, a re-run): no second answer.
    let again = home.eml(&request_bytes);
    assert_eq!(again.status.code(), Some(0), "{again:?}");
    let r2 = record(&again);
    assert_eq!(r2["duplicate"], true, "{r2}");
    assert_eq!(r2["mails"], 0);
    assert_eq!(home.outbox().len(), 1);

    // The log shows it.
    let log = home.run(&["log", "--json"]);
    assert_eq!(log.status.code(), Some(0), "{log:?}");
    let rows: Vec<serde_json::Value> = String::from_utf8(log.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["verdict"], "answered");
    assert_eq!(rows[0]["stage"], "filed");
    assert_eq!(
        rows[0]["reply_message_id"],
        reply.message_id.clone().unwrap()
    );
    let future = home.run(&["log", "--json", "--since", "2999-01-01"]);
    assert!(future.stdout.is_empty(), "{future:?}");
    t.cleanup().await;
}

#[tokio::test]
async fn untrusted_senders_get_no_data_and_no_reply() {
    let t = samples().await;
    let signer = Signer::new();
    let other = Signer::new();
    let home = Home::new(&sqlite_config(&t, &signer, ""));
    let sql = [("q.sql", "SELECT * FROM samples")];
    let from = format!("alice@{LAB}");
    let body = "database: lims\r\n";
    // A new message (Message-ID) per case: a request already seen is not judged again.
    let plain = || raw(&request(&from, "sql@labrelay.test", body, &sql));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("no signature", plain(), "no DKIM signature"),
        (
            "signed by another domain",
            signer.sign(&plain(), "other.example", false),
            "not aligned",
        ),
        (
            "signed with another key",
            other.sign(&plain(), LAB, false),
            "DKIM signature of lab.example: fail",
        ),
        (
            "body changed after signing",
            {
                let mut s = signer.sign(&plain(), LAB, false);
                let at = s.windows(14).position(|w| w == b"database: lims").unwrap();
                s[at + 10..at + 14].copy_from_slice(b"LIMS");
                s.extend_from_slice(b"more\r\n");
                s
            },
            "DKIM signature of lab.example: neutral",
        ),
        (
            "signature with l=",
            signer.sign(&plain(), LAB, true),
            // mail-auth already calls it insecure; our own check says the same.
            "l=",
        ),
    ];
    for (what, raw, why) in cases {
        let out = home.eml(&raw);
        assert_eq!(out.status.code(), Some(0), "{what}: {out:?}");
        let r = record(&out);
        assert_eq!(r["verdict"], "refused", "{what}: {r}");
        let reason = r["reason"].as_str().unwrap();
        assert!(reason.contains(why), "{what}: {reason}");
        assert_eq!(r["mails"], 0, "{what}");
    }
    // Signed and aligned, but not on the allowlist.
    let bob = raw(&request(
        &format!("bob@{LAB}"),
        "sql@labrelay.test",
        body,
        &sql,
    ));
    let r = record(&home.eml(&signer.sign(&bob, LAB, false)));
    assert_eq!(r["verdict"], "refused", "{r}");
    assert!(
        r["reason"].as_str().unwrap().contains("may not query lims"),
        "{r}"
    );
    assert!(home.outbox().is_empty(), "{:?}", home.outbox());
    t.cleanup().await;
}

#[tokio::test]
async fn authentication_results_of_our_own_mta_decide_in_that_mode() {
    let t = samples().await;
    let signer = Signer::new();
    let home = Home::new(&sqlite_config(
        &t,
        &signer,
        "trust = \"authentication-results\"\nauthserv_id = \"mx.labrelay.test\"",
    ));
    let from = format!("alice@{LAB}");
    let sql = [("q.sql", "SELECT name FROM samples WHERE id = 1")];
    let with = |headers: &[&str]| {
        let mut v = Vec::new();
        for h in headers {
            v.extend_from_slice(format!("Authentication-Results: {h}\r\n").as_bytes());
        }
        v.extend_from_slice(&raw(&request(
            &from,
            "sql@labrelay.test",
            "database: lims",
            &sql,
        )));
        v
    };
    let ok = home.eml(&with(&[&format!(
        "mx.labrelay.test; dkim=pass header.d={LAB}; dmarc=pass header.from={LAB}"
    )]));
    assert_eq!(record(&ok)["verdict"], "answered", "{ok:?}");
    for headers in [
        vec![format!("evil.example; dmarc=pass header.from={LAB}")],
        vec![
            format!("mx.labrelay.test; dmarc=fail header.from={LAB}"),
            format!("mx.labrelay.test; dmarc=pass header.from={LAB}"),
        ],
        vec!["mx.labrelay.test; dkim=pass header.d=evil.example".to_owned()],
    ] {
        let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
        let r = record(&home.eml(&with(&refs)));
        assert_eq!(r["verdict"], "refused", "{headers:?}: {r}");
    }
    assert_eq!(home.outbox().len(), 1);
    t.cleanup().await;
}

#[tokio::test]
async fn refused_sql_is_quoted_in_the_reply_and_changes_nothing() {
    let t = samples().await;
    let signer = Signer::new();
    let home = Home::new(&sqlite_config(&t, &signer, ""));
    let m = request(
        &format!("alice@{LAB}"),
        "sql@labrelay.test",
        "database: lims",
        &[(
            "bad.sql",
            "SELECT 1;\nDELETE FROM samples;\nATTACH DATABASE '/tmp/x.db' AS x",
        )],
    );
    let r = record(&home.eml(&signer.sign(&raw(&m), LAB, false)));
    assert_eq!(r["verdict"], "refused", "{r}");
    assert_eq!(r["statements"], 3);
    let mails = home.outbox();
    assert_eq!(mails.len(), 1);
    let body = parse_file(&mails[0]).body_text().unwrap();
    assert!(body.contains("2 of 3 statements refused"), "{body}");
    assert!(body.contains("DELETE FROM samples"), "{body}");
    assert!(body.contains("ATTACH"), "{body}");
    assert!(parse_file(&mails[0]).attachments.is_empty());
    assert_eq!(t.count("samples").await, 3);
    t.cleanup().await;
}

#[tokio::test]
async fn unknown_database_is_answered_with_the_names_the_sender_may_use() {
    let t = samples().await;
    let signer = Signer::new();
    let home = Home::new(&sqlite_config(&t, &signer, ""));
    let m = request(
        &format!("alice@{LAB}"),
        "sql@labrelay.test",
        "database: erp",
        &[("q.sql", "SELECT 1")],
    );
    let r = record(&home.eml(&signer.sign(&raw(&m), LAB, false)));
    assert_eq!(r["verdict"], "refused", "{r}");
    let body = parse_file(&home.outbox()[0]).body_text().unwrap();
    assert!(body.contains("unknown database \"erp\""), "{body}");
    assert!(body.contains("you may query: lims"), "{body}");
    t.cleanup().await;
}

#[tokio::test]
async fn gbk_request_with_an_alias_gets_a_chinese_answer() {
    let t = samples().await;
    let signer = Signer::new();
    let home = Home::new(&sqlite_config(&t, &signer, ""));
    let raw = foxmail_gbk(&Foxmail {
        from: &format!("alice@{LAB}"),
        to: "sql@labrelay.test",
        message_id: &format!("<{}@{LAB}>", test_support::unique("gbk")),
        subject: "查询样本",
        body: "您好：\r\n数据库：样本库\r\n谢谢",
        file: "查询.sql",
        sql: "SELECT name FROM samples WHERE name = '样本二'",
    });
    let r = record(&home.eml(&signer.sign(raw.as_bytes(), LAB, false)));
    assert_eq!(r["verdict"], "answered", "{r}");
    assert_eq!(r["rows"], 1);
    let reply = parse_file(&home.outbox()[0]);
    let body = reply.body_text().unwrap();
    assert!(body.contains("数据库：lims"), "{body}");
    assert!(body.contains("查询.sql 第 1 条：1 行"), "{body}");
    let files = unzip(reply.attachments[0].data.clone());
    assert_eq!(files[0].0, "查询-1.csv");
    assert_eq!(
        String::from_utf8(files[0].1.clone()).unwrap(),
        "name\r\n样本二\r\n"
    );
    t.cleanup().await;
}

#[tokio::test]
async fn outlook_html_request_with_an_inline_image_names_the_ignored_image() {
    let t = samples().await;
    let signer = Signer::new();
    let home = Home::new(&sqlite_config(&t, &signer, ""));
    let png = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG\r\n\x1a\nnot really");
    let sql = base64::engine::general_purpose::STANDARD
        .encode("\u{feff}SELECT COUNT(*) AS n FROM samples\r\n");
    let raw = format!(
        "From: Alice <alice@{LAB}>\r\nTo: sql@labrelay.test\r\nSubject: counts\r\n\
         Message-ID: <{id}@{LAB}>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"m\"\r\n\r\n\
         --m\r\nContent-Type: multipart/related; boundary=\"r\"\r\n\r\n\
         --r\r\nContent-Type: text/html; charset=\"utf-8\"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
         <html><body><p>Hi,</p><p>database: lims</p><p><img src=3D\"cid:logo\"></p></body></html>\r\n\
         --r\r\nContent-Type: image/png; name=\"image001.png\"\r\nContent-ID: <logo>\r\n\
         Content-Disposition: inline; filename=\"image001.png\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{png}\r\n\
         --r--\r\n--m\r\nContent-Type: application/octet-stream; name=\"counts.sql\"\r\n\
         Content-Disposition: attachment; filename=\"counts.sql\"\r\nContent-Transfer-Encoding: base64\r\n\r\n\
         {sql}\r\n--m--\r\n",
        id = test_support::unique("outlook"),
    );
    let r = record(&home.eml(&signer.sign(raw.as_bytes(), LAB, false)));
    assert_eq!(r["verdict"], "answered", "{r}");
    let body = parse_file(&home.outbox()[0]).body_text().unwrap();
    assert!(body.contains("Ignored attachments: image001.png"), "{body}");
    assert!(body.contains("counts.sql #1: 1 rows"), "{body}");
    t.cleanup().await;
}

#[tokio::test]
async fn a_large_reply_is_split_into_parts_that_rejoin_to_the_zip() {
    let t = samples().await;
    let signer = Signer::new();
    let home = Home::new(&sqlite_config(&t, &signer, "max_mail_bytes = 65536"));
    let m = request(
        &format!("alice@{LAB}"),
        "sql@labrelay.test",
        "database: lims",
        &[(
            "big.sql",
            "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 4000) \
             SELECT n, printf('%x-%x-%x-%x', n * 2654435761 % 4294967291, \
             n * 1103515245 % 2147483647, n * 69069 % 4294967291, n * 22695477 % 4294967291) \
             AS noise FROM c",
        )],
    );
    let r = record(&home.eml(&signer.sign(&raw(&m), LAB, false)));
    assert_eq!(r["verdict"], "answered", "{r}");
    let mails = home.outbox();
    let n = mails.len();
    assert!(n >= 3, "expected at least 3 parts, got {n}");
    assert_eq!(r["mails"], n);
    let mut joined = Vec::new();
    let mut parts: Vec<(String, Vec<u8>)> = Vec::new();
    for p in &mails {
        assert!(std::fs::metadata(p).unwrap().len() <= 65536 + 512, "{p:?}");
        let mail = parse_file(p);
        let body = mail.body_text().unwrap();
        assert!(body.contains(&format!("of {n} of the result")), "{body}");
        let a = &mail.attachments[0];
        parts.push((a.name.clone().unwrap(), a.data.clone()));
    }
    parts.sort();
    for (i, (name, data)) in parts.iter().enumerate() {
        assert_eq!(name, &format!("result.zip.{:03}", i + 1));
        joined.extend_from_slice(data);
    }
    let files = unzip(joined);
    let csv = String::from_utf8(files[0].1.clone()).unwrap();
    assert_eq!(csv.lines().count(), 4001);
    t.cleanup().await;
}

#[tokio::test]
async fn dry_run_records_nothing_and_sends_nothing() {
    let t = samples().await;
    let signer = Signer::new();
    let home = Home::new(&sqlite_config(&t, &signer, ""));
    let m = request(
        &format!("alice@{LAB}"),
        "sql@labrelay.test",
        "database: lims",
        &[("q.sql", "SELECT 1")],
    );
    let f = home.dir.path().join("dry.eml");
    std::fs::write(&f, signer.sign(&raw(&m), LAB, false)).unwrap();
    let out = home.run(&["--json", "--dry-run", "--eml", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(record(&out)["verdict"], "accepted");
    assert!(home.outbox().is_empty());
    let log = home.run(&["log"]);
    assert!(log.stdout.is_empty(), "{log:?}");
    t.cleanup().await;
}

/// A query that would run for hours, with `max_query_seconds = 2`: answered "query too
/// long" within the limit plus 2 s, and the server is no longer running it. (A mailed
/// `pg_sleep(600)` / `SLEEP(600)` never gets this far: the check refuses sleep
/// functions; the executor's own tests cancel them.)
async fn long_query_is_answered_query_too_long(t: TempDb, sql: &str, running: &str) {
    let signer = Signer::new();
    let home = Home::new(&format!(
        "[databases.lims]\nurl = \"{}\"\n[mail_query]\nmax_query_seconds = 2\n\
         [mail_query.dkim_keys]\n\"s1._domainkey.{LAB}\" = \"{}\"\n\
         [mail_query.databases.lims]\ndatabase = \"lims\"\nallow = [\"@{LAB}\"]\n",
        t.cfg.url.expose(),
        signer.record
    ));
    let m = request(
        &format!("alice@{LAB}"),
        "sql@labrelay.test",
        "database: lims",
        &[("slow.sql", sql)],
    );
    let started = std::time::Instant::now();
    let out = home.eml(&signer.sign(&raw(&m), LAB, false));
    let took = started.elapsed();
    let r = record(&out);
    assert_eq!(r["verdict"], "failed", "{r}");
    assert!(
        r["reason"].as_str().unwrap().contains("query too long"),
        "{r}"
    );
    assert!(took < std::time::Duration::from_secs(4), "took {took:?}");
    let body = parse_file(&home.outbox()[0]).body_text().unwrap();
    assert!(
        body.contains("slow.sql #1: error: query too long: cancelled after 2 s"),
        "{body}"
    );
    // The cancel reaches the backend asynchronously: it must be gone by the limit + 2 s.
    loop {
        let left: i64 = sqlx::query_scalar(running)
            .bind(sql)
            .fetch_one(t.db.pool())
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(4),
            "the server still runs {sql} after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    t.cleanup().await;
}

#[tokio::test]
async fn postgres_long_query_is_answered_query_too_long_and_stopped() {
    let admin = test_support::require!("PG_URL");
    long_query_is_answered_query_too_long(
        TempDb::server(&admin).await,
        "SELECT COUNT(*) FROM generate_series(1, 100000000000) g",
        "SELECT COUNT(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'",
    )
    .await;
}

#[tokio::test]
async fn mariadb_long_query_is_answered_query_too_long_and_stopped() {
    let admin = test_support::require!("MYSQL_URL");
    long_query_is_answered_query_too_long(
        TempDb::server(&admin).await,
        "SELECT COUNT(*) FROM seq_1_to_1000000 a, seq_1_to_1000000 b",
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO = ?",
    )
    .await;
}

#[tokio::test]
async fn export_runs_a_file_as_a_request_would() {
    let t = samples().await;
    let signer = Signer::new();
    let home = Home::new(&sqlite_config(&t, &signer, ""));
    let sql = home.dir.path().join("q.sql");
    std::fs::write(
        &sql,
        "SELECT id, name FROM samples ORDER BY id;\nSELECT 1 AS one",
    )
    .unwrap();
    let out_file = home.dir.path().join("out.tsv");
    let out = home.run(&[
        "--json",
        "export",
        "--database",
        "样本库",
        "--format",
        "tsv",
        "--output",
        out_file.to_str().unwrap(),
        sql.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let first = home.dir.path().join("out-1.tsv");
    assert_eq!(
        std::fs::read_to_string(&first).unwrap(),
        "id\tname\n1\tS-001\n2\t样本二\n3\ta,\"b\"\n"
    );
    assert_eq!(
        std::fs::read_to_string(home.dir.path().join("out-2.tsv")).unwrap(),
        "one\n1\n"
    );
    std::fs::write(&sql, "DELETE FROM samples").unwrap();
    let refused = home.run(&[
        "export",
        "--database",
        "lims",
        "--output",
        out_file.to_str().unwrap(),
        sql.to_str().unwrap(),
    ]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("DELETE is not a read-only query"));
    assert_eq!(t.count("samples").await, 3);
    t.cleanup().await;
}

#[test]
fn oracle_without_the_feature_is_a_configuration_error_naming_it() {
    let home = Home::new(
        "[databases.erp]\nurl = \"oracle://reader@127.0.0.1:1/ERP\"\n\
         [mail_query.databases.erp]\ndatabase = \"erp\"\nallow = [\"@lab.example\"]\n",
    );
    let sql = home.dir.path().join("q.sql");
    std::fs::write(&sql, "SELECT 1 FROM dual").unwrap();
    let out = home.run(&[
        "export",
        "--database",
        "erp",
        "--output",
        home.dir.path().join("o.csv").to_str().unwrap(),
        sql.to_str().unwrap(),
    ]);
    if cfg!(feature = "oracle") {
        // Built with Oracle: nothing listens on port 1, or no Instant Client is there.
        assert_ne!(out.status.code(), Some(0), "{out:?}");
    } else {
        assert_eq!(out.status.code(), Some(78), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("without Oracle support"), "{err}");
    }
}

/// `[mail_query.databases.NAME.remote]`: the statement exported on the database host
/// over SSH (the test sshd; `psql --csv` as the export command) and fetched by SFTP,
/// with the row cap applied while fetching; a failing command is a failed statement.
#[tokio::test]
async fn remote_export_over_ssh_answers_with_the_fetched_csv() {
    let admin = test_support::require!("PG_URL");
    let port = test_support::require!("SFTP_PORT");
    let user = test_support::require!("SFTP_USER");
    let key = test_support::require!("SFTP_KEY");
    let known_hosts = test_support::require!("SFTP_KNOWN_HOSTS");
    let t = TempDb::server(&admin).await;
    t.exec("CREATE TABLE runs (id INTEGER, flowcell TEXT)")
        .await;
    t.exec("INSERT INTO runs VALUES (1, 'HX,1'), (2, 'HY'), (3, 'HZ')")
        .await;
    let signer = Signer::new();
    let url = t.cfg.url.expose().to_string();
    let home = Home::new(&format!(
        "[databases.lims]\nurl = \"{url}\"\n\
         [ssh.dbhost]\nhost = \"127.0.0.1\"\nport = {port}\nuser = \"{user}\"\n\
         key_file = \"{key}\"\nknown_hosts = \"{known_hosts}\"\n\
         [mail_query.dkim_keys]\n\"s1._domainkey.{LAB}\" = \"{}\"\n\
         [mail_query.databases.lims]\ndatabase = \"lims\"\nallow = [\"@{LAB}\"]\nmax_rows = 2\n\
         [mail_query.databases.lims.remote]\nssh = \"dbhost\"\n\
         command = [\"psql\", \"--csv\", \"-X\", \"-q\", \"-v\", \"ON_ERROR_STOP=1\", \
         \"-f\", \"{{sql}}\", \"-o\", \"{{output}}\", \"{url}\"]\n",
        signer.record
    ));
    let m = request(
        &format!("alice@{LAB}"),
        "sql@labrelay.test",
        "database: lims\nformat: xlsx",
        &[(
            "runs.sql",
            "SELECT id, flowcell FROM runs ORDER BY id;\nSELECT nosuchcolumn FROM runs",
        )],
    );
    let r = record(&home.eml(&signer.sign(&raw(&m), LAB, false)));
    assert_eq!(r["verdict"], "failed", "{r}");
    assert_eq!(r["rows"], 2, "{r}");
    // The reason (logged, printed) names the kind of error, never the SQL it quotes.
    let reason = r["reason"].as_str().unwrap();
    assert_eq!(reason, "1 of 2 statements failed (database error)", "{r}");
    let reply = parse_file(&home.outbox()[0]);
    let body = reply.body_text().unwrap();
    assert!(body.contains("runs.sql #1: 2 rows"), "{body}");
    assert!(body.contains("(truncated at 2 rows)"), "{body}");
    assert!(
        body.contains("runs.sql #2: error: the database reported: the export command on"),
        "{body}"
    );
    assert!(body.contains("nosuchcolumn"), "{body}");
    let files = unzip(reply.attachments[0].data.clone());
    // Remote exports are CSV whatever the request asked for.
    assert_eq!(files[0].0, "runs-1.csv");
    assert_eq!(
        String::from_utf8(files[0].1.clone()).unwrap(),
        "id,flowcell\n1,\"HX,1\"\n2,HY\n"
    );
    t.cleanup().await;
}

#[tokio::test]
async fn allowlist_mode_answers_unsigned_mail_and_warns_at_every_start() {
    let t = samples().await;
    let signer = Signer::new();
    let home = Home::new(&sqlite_config(&t, &signer, "trust = \"allowlist\""));
    let m = request(
        &format!("alice@{LAB}"),
        "sql@labrelay.test",
        "database: lims",
        &[("q.sql", "SELECT COUNT(*) AS n FROM samples")],
    );
    let out = home.eml(&raw(&m));
    assert_eq!(record(&out)["verdict"], "answered", "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("senders are not authenticated"), "{err}");
    // The allowlist itself still holds.
    let bob = request(
        &format!("bob@{LAB}"),
        "sql@labrelay.test",
        "database: lims",
        &[("q.sql", "SELECT 1")],
    );
    assert_eq!(record(&home.eml(&raw(&bob)))["verdict"], "refused");
    t.cleanup().await;
}
