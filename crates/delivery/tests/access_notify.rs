//! Customer access, the delivery mails and vendor-CLI targets against real programs:
//! presigned links signed for Garage and fetched with reqwest; mails sent through
//! Postfix and read back from Dovecot over IMAP (Chinese and English templates), and
//! written to the outbox; a shell script standing in for the vendor CLI (`bo`) and for
//! an account command, recording its argv and environment to a file.
//!
//! The mailboxes alice and bob are shared with other tests running at the same time:
//! every test finds its message by Message-ID (and a unique token in the analysis id)
//! and deletes it afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use delivery::access::{
    Access, AccessConfig, AccessError, AccessGrant, AccessMethod, AccessRequest, FileLink,
    SharedFile, renew,
};
use delivery::notify::{
    DeliverySteps, FailedFile, FailureFacts, Language, MailFacts, MailFile, Notifier, NotifyConfig,
};
use delivery::report::{
    Analysis, CustomerSteps, DeliveredFile, DeliveryReport, Staff, StepContext, TargetInfo,
    TargetKind, Tool,
};
use delivery::vendor::{CommandError, VendorConfig, VendorTarget, VendorUpload};
use labrelay::config::{Config, ImapConfig, MailConfig, SmtpConfig, TlsMode};
use labrelay::exit::{Exit, classify};
use labrelay::mail::{ImapClient, IncomingMail, Mailer, parse};
use labrelay::secret::SecretSpec;
use labrelay::storage::{AnyStorage, ObjectStorage};
use md5::{Digest, Md5};
use test_support::unique;

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn md5_hex(data: &[u8]) -> String {
    hex::encode(Md5::digest(data))
}

/// Deterministic, incompressible-enough test data.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

// ---------------------------------------------------------------------------------
// Servers.

fn s3_toml(name: &str) -> Option<String> {
    test_support::s3_storage_toml(name, "labrelay-delivery-tests")
}

struct MailServers {
    smtp_host: String,
    smtp_port: u16,
    imap_host: String,
    imap_port: u16,
    domain: String,
}

impl MailServers {
    fn get() -> Option<MailServers> {
        let s = MailServers {
            smtp_host: test_support::require("SMTP_HOST")?,
            smtp_port: test_support::require_parsed("SMTP_PORT")?,
            imap_host: test_support::require("IMAP_HOST")?,
            imap_port: test_support::require_parsed("IMAP_PORT")?,
            domain: test_support::require("MAIL_DOMAIN")?,
        };
        test_support::require("MAIL_PASS_ALICE")?;
        test_support::require("MAIL_PASS_BOB")?;
        Some(s)
    }

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
            hello_name: Some("delivery-tests.labrelay.test".into()),
            ca_file: None,
        }
    }

    fn mailer(&self) -> Mailer {
        Mailer::from_config(Some(&self.smtp()), Path::new("/nonexistent")).unwrap()
    }

    fn config_toml(&self) -> String {
        format!(
            "[smtp]\nhost = \"{}\"\nport = {}\nsecurity = \"none\"\ntimeout_secs = 20\n",
            self.smtp_host, self.smtp_port
        )
    }

    /// Logged in as `user` with INBOX selected.
    fn imap(&self, user: &str) -> ImapClient {
        let pass = match user {
            "alice" => test_support::setting("MAIL_PASS_ALICE"),
            _ => test_support::setting("MAIL_PASS_BOB"),
        }
        .unwrap();
        let cfg = ImapConfig {
            host: self.imap_host.clone(),
            port: Some(self.imap_port),
            security: TlsMode::None,
            username: user.to_owned(),
            password: SecretSpec::parse(&pass),
            folder: "INBOX".into(),
            timeout_secs: 20,
            ca_file: None,
        };
        let mut c = ImapClient::connect(&cfg).unwrap();
        c.select("INBOX").unwrap();
        c
    }
}

/// The message with this Message-ID, waiting for delivery; it is deleted from the
/// mailbox once read.
fn take_message(c: &mut ImapClient, message_id: &str) -> IncomingMail {
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    loop {
        if let Some(uid) = c.search_message_id(message_id).unwrap().first().copied() {
            let m = parse(&c.fetch_raw(uid).unwrap()).unwrap();
            c.delete(uid).unwrap();
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "message {message_id} did not arrive within {DELIVERY_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

// ---------------------------------------------------------------------------------
// Presigned links on Garage.

#[tokio::test]
async fn presigned_links_from_garage_return_the_objects_and_renew_reissues_them() {
    let Some(toml) = s3_toml("garage") else {
        return;
    };
    let config = Config::from_toml(&toml).unwrap();
    let storage = AnyStorage::open(&config.storage["garage"]).unwrap();
    let prefix = unique("access-presign");
    let objects: Vec<(&str, Vec<u8>)> = vec![
        ("clean/S1_R1.fq.gz", pattern(300_000, 1)),
        ("报告/结题 报告.pdf", pattern(5_000, 2)),
        (
            "md5sum.txt",
            b"0123456789abcdef0123456789abcdef  clean/S1_R1.fq.gz\n".to_vec(),
        ),
    ];
    let mut files = Vec::new();
    for (path, data) in &objects {
        let key = format!("{prefix}/{path}");
        storage
            .put_bytes(&key, Bytes::from(data.clone()))
            .await
            .unwrap();
        files.push(SharedFile {
            path: (*path).to_owned(),
            key,
            size: data.len() as u64,
        });
    }

    // 30 days are asked for; SigV4 signs at most 7.
    let cfg: AccessConfig = toml::from_str("expiry_days = 30\n").unwrap();
    let access = Access::new("delivery.access", &cfg).unwrap();
    let now = Utc::now();
    let req = AccessRequest {
        target: "garage".into(),
        analysis_id: prefix.clone(),
        project_id: "P1".into(),
        customer_emails: vec!["wang@example.cn".into()],
        key_prefix: prefix.clone(),
        files: files.clone(),
        password: None,
        now,
    };
    let grant = access.grant(&req, Some(&storage), None).await.unwrap();
    assert_eq!(grant.method, AccessMethod::Presigned);
    assert_eq!(grant.valid_days, Some(7));
    assert_eq!(grant.clamped_from, Some(30));
    assert_eq!(grant.expires_at, Some(now + chrono::Duration::days(7)));
    assert_eq!(grant.links.len(), objects.len());
    let client = reqwest::Client::new();
    for (link, (path, data)) in grant.links.iter().zip(&objects) {
        assert_eq!(link.path, *path);
        assert!(
            link.url.query().unwrap().contains("X-Amz-Expires=604800"),
            "{}",
            link.url
        );
        let resp = client.get(link.url.clone()).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.bytes().await.unwrap().as_ref(), data.as_slice());
        let signature = link
            .url
            .query_pairs()
            .find(|(k, _)| k == "X-Amz-Signature")
            .map(|(_, v)| v.into_owned())
            .unwrap();
        assert!(!format!("{link:?}").contains(&signature), "{link:?}");
    }
    let record = serde_json::to_string(&grant.record()).unwrap();
    assert!(record.contains("\"links\":3"), "{record}");
    assert!(!record.contains("X-Amz"), "{record}");

    // Renewal: fresh links, a new expiry, the same objects.
    let later = now + chrono::Duration::days(10);
    assert!(grant.is_expired(later));
    let renewed = renew(&storage, &files, 2, Utc::now()).await.unwrap();
    assert_eq!(renewed.valid_days, Some(2));
    assert!(renewed.expires_at.unwrap() > grant.expires_at.unwrap() - chrono::Duration::days(6));
    assert_ne!(renewed.links[0].url, grant.links[0].url);
    assert!(
        renewed.links[0]
            .url
            .query()
            .unwrap()
            .contains("X-Amz-Expires=172800")
    );
    let body = client
        .get(renewed.links[1].url.clone())
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.as_ref(), objects[1].1.as_slice());

    // Renewing links to an object that is gone fails instead of mailing a dead link.
    storage.delete(&files[0].key).await.unwrap();
    let err = renew(&storage, &files, 2, Utc::now()).await.unwrap_err();
    assert!(matches!(err, AccessError::Storage(_)), "{err}");
    assert_eq!(err.exit(), Exit::Failed);
    for f in &files {
        storage.delete(&f.key).await.unwrap();
    }
}

// ---------------------------------------------------------------------------------
// Mails through Postfix and Dovecot.

fn links_grant(token: &str) -> AccessGrant {
    let link = |path: &str| {
        FileLink {
        path: path.into(),
        key: format!("online/{token}/{path}"),
        size: 1_572_864,
        url: url::Url::parse(&format!(
            "https://download.labrelay.test/online/{token}/{path}?X-Amz-Expires=604800&X-Amz-Signature=sig{token}"
        ))
        .unwrap(),
    }
    };
    AccessGrant {
        method: AccessMethod::Presigned,
        links: vec![link("clean/S1_R1.fq.gz"), link("md5sum.txt")],
        account: None,
        expires_at: Some(at("2025-02-06T02:00:00Z")),
        valid_days: Some(7),
        clamped_from: None,
    }
}

fn mail_facts(s: &MailServers, token: &str, language: Language) -> MailFacts {
    MailFacts {
        analysis_id: token.to_owned(),
        project_id: Some("V3fmjM".into()),
        customer_name: Some(match language {
            Language::Zh => "爱丽丝老师".into(),
            Language::En => "Dr Alice".into(),
        }),
        customer_emails: vec![s.addr("alice")],
        staff: vec![s.addr("bob")],
        language: Some(language.code().to_owned()),
        target: "garage".into(),
        location: None,
        files: vec![MailFile {
            path: "clean/S1_R1.fq.gz".into(),
            key: format!("online/{token}/clean/S1_R1.fq.gz"),
            size: 1_572_864,
            md5: "0123456789abcdef0123456789abcdef".into(),
        }],
        file_count: 1,
        total_bytes: 1_572_864,
        md5sum: Some((
            "md5sum.txt".into(),
            format!("0123456789abcdef0123456789abcdef  clean/S1_R1.fq.gz\n# {token}\n")
                .into_bytes(),
        )),
        access: links_grant(token),
        delivered_at: at("2025-01-30T02:00:00Z"),
        message_key: None,
    }
}

fn customer_mail_round_trip(language: Language) {
    let Some(s) = MailServers::get() else {
        return;
    };
    let token = unique(&format!("deliv-{}", language.code()));
    let cfg = NotifyConfig {
        utc_offset: Some("+08:00".into()),
        ..NotifyConfig::default()
    };
    let mail_cfg = MailConfig {
        from: Some(format!("交付系统 <{}>", s.addr("bob"))),
        ..MailConfig::default()
    };
    let notifier = Notifier::new(&cfg, &mail_cfg).unwrap();
    let facts = mail_facts(&s, &token, language);
    let mail = notifier.customer_mail(&facts).unwrap();
    let sent = block_on(s.mailer().send(&mail)).unwrap();
    assert_eq!(sent.recipients.len(), 2, "{sent:?}");

    let mut alice = s.imap("alice");
    let m = take_message(&mut alice, mail.id());
    alice.logout().unwrap();
    assert!(m.subject.contains(&token), "{}", m.subject);
    assert_eq!(m.to[0].address, s.addr("alice"));
    assert_eq!(m.cc.len(), 1, "{:?}", m.cc);
    assert_eq!(m.cc[0].address, s.addr("bob"));
    assert_eq!(
        m.header("X-Labrelay-Analysis").as_deref(),
        Some(token.as_str())
    );
    let text = m.text.clone().unwrap();
    let html = m.html.clone().unwrap();
    for link in &facts.access.links {
        assert!(text.contains(link.url.as_str()), "{text}");
        let escaped = link.url.as_str().replace('&', "&amp;");
        assert!(html.contains(&format!("href=\"{escaped}\"")), "{html}");
    }
    assert!(text.contains("1.5 MiB"), "{text}");
    assert!(text.contains("2025-02-06 10:00 UTC+08:00"), "{text}");
    match language {
        Language::Zh => {
            assert!(m.subject.contains("数据交付"), "{}", m.subject);
            assert!(text.contains("爱丽丝老师，您好"), "{text}");
            assert!(text.contains("链接有效期至"), "{text}");
        }
        Language::En => {
            assert!(m.subject.contains("Data delivery"), "{}", m.subject);
            assert!(text.contains("Dear Dr Alice"), "{text}");
            assert!(text.contains("valid until"), "{text}");
        }
    }
    let md5sum = m
        .attachments
        .iter()
        .find(|a| a.name.as_deref() == Some("md5sum.txt"))
        .expect("md5sum.txt is attached");
    assert_eq!(md5sum.data, facts.md5sum.as_ref().unwrap().1);

    // Staff in Cc received the same message.
    let mut bob = s.imap("bob");
    let copy = take_message(&mut bob, mail.id());
    bob.logout().unwrap();
    assert_eq!(copy.subject, m.subject);
}

#[test]
fn chinese_customer_mail_reaches_the_customer_with_staff_in_cc() {
    customer_mail_round_trip(Language::Zh);
}

#[test]
fn english_customer_mail_reaches_the_customer_with_staff_in_cc() {
    customer_mail_round_trip(Language::En);
}

#[test]
fn outbox_mode_writes_the_customer_eml() {
    let dir = test_support::tempdir();
    let outbox = dir.path().join("outbox");
    let mailer = Mailer::from_config(None, &outbox).unwrap();
    let s = MailServers {
        smtp_host: String::new(),
        smtp_port: 0,
        imap_host: String::new(),
        imap_port: 0,
        domain: "labrelay.test".into(),
    };
    let token = unique("outbox");
    let notifier = Notifier::new(&NotifyConfig::default(), &MailConfig::default()).unwrap();
    let facts = mail_facts(&s, &token, Language::Zh);
    let sent = block_on(notifier.send_customer(&mailer, &facts)).unwrap();
    let path = sent.outbox_path.unwrap();
    assert!(path.starts_with(&outbox) && path.extension().unwrap() == "eml");
    let raw = fs_err::read(&path).unwrap();
    let m = parse(&raw).unwrap();
    assert!(m.subject.contains(&token));
    assert_eq!(m.to[0].address, "alice@labrelay.test");
    assert_eq!(m.cc[0].address, "bob@labrelay.test");
    assert!(
        m.text
            .as_deref()
            .unwrap()
            .contains(facts.access.links[0].url.as_str())
    );
    assert!(
        m.attachments
            .iter()
            .any(|a| a.name.as_deref() == Some("md5sum.txt"))
    );
    let envelope = m.header(labrelay::mail::ENVELOPE_TO_HEADER).unwrap();
    assert!(envelope.contains("alice@labrelay.test") && envelope.contains("bob@labrelay.test"));
}

#[test]
fn failure_notice_reaches_staff() {
    let Some(s) = MailServers::get() else {
        return;
    };
    let token = unique("failed");
    let cfg = NotifyConfig {
        utc_offset: Some("+08:00".into()),
        ..NotifyConfig::default()
    };
    let notifier = Notifier::new(&cfg, &MailConfig::default()).unwrap();
    let leaked = labrelay::secret::Secret::new(format!("lims-pw-{token}"));
    let facts = FailureFacts {
        analysis_id: token.clone(),
        project_id: Some("V3fmjM".into()),
        target: "garage".into(),
        location: Some("/nas1/production_16s/analysis/report/x/result/upload".into()),
        error: format!(
            "looking up {token}: mysql://reader:{}@lims/lims: connection refused",
            leaked.expose()
        ),
        failed_files: vec![FailedFile {
            path: "clean/S2_R1.fq.gz".into(),
            error: "Permission denied (os error 13)".into(),
        }],
        file_count: 12,
        to: vec![s.addr("bob")],
        attempt: 3,
        will_retry: false,
        failed_at: Utc::now(),
    };
    let sent = block_on(notifier.send_failure(&s.mailer(), &facts)).unwrap();
    let mut bob = s.imap("bob");
    let m = take_message(&mut bob, &sent.message_id);
    bob.logout().unwrap();
    assert!(
        m.subject.contains("交付失败") && m.subject.contains(&token),
        "{}",
        m.subject
    );
    let text = m.text.clone().unwrap();
    assert!(text.contains("connection refused"), "{text}");
    assert!(!text.contains(leaked.expose()), "{text}");
    assert!(text.contains("clean/S2_R1.fq.gz"), "{text}");
    assert!(text.contains("第 3 次"), "{text}");
    assert_eq!(
        m.header("X-Labrelay-Mail").as_deref(),
        Some("delivery-failure")
    );
}

/// The engine's view: a delivery report goes through [`DeliverySteps`] (configured from
/// TOML as the tools load it): links are presigned on Garage, the customer mail goes
/// through Postfix, and the links read back from the mail download the objects.
#[test]
fn delivery_steps_mail_working_garage_links_for_a_report() {
    let Some(s3) = s3_toml("garage") else {
        return;
    };
    let Some(s) = MailServers::get() else {
        return;
    };
    let dir = test_support::tempdir();
    let token = unique("steps");
    let toml = format!(
        "[paths]\ndata_dir = \"{}\"\n[mail]\nfrom = \"Delivery <{}>\"\n{}\n{s3}\n[delivery]\ntarget = \"garage\"\n[delivery.mail]\nlanguage = \"en\"\nutc_offset = \"+08:00\"\n[delivery.access]\nexpiry_days = 3\n",
        dir.path().display(),
        s.addr("bob"),
        s.config_toml(),
    );
    let config = Config::from_toml(&toml).unwrap();
    let delivery = delivery::config::DeliveryConfig::from_config(&config).unwrap();
    let steps = DeliverySteps::new(&config, &delivery).unwrap();
    let storage = AnyStorage::open(&config.storage["garage"]).unwrap();

    block_on(async {
        let key_prefix = format!("labrelay-delivery-tests-steps/{token}");
        let data = pattern(70_000, 9);
        let key = format!("{key_prefix}/clean/S1_R1.fq.gz");
        storage
            .put_bytes(&key, Bytes::from(data.clone()))
            .await
            .unwrap();
        let md5sum_text = format!("{}  clean/S1_R1.fq.gz\n", md5_hex(&data));
        let md5sum_key = format!("{key_prefix}/md5sum.txt");
        storage
            .put_bytes(&md5sum_key, Bytes::from(md5sum_text.clone()))
            .await
            .unwrap();
        let report = DeliveryReport {
            delivery_id: token.clone(),
            tool: Tool::DeliveryUpload,
            analysis: Analysis {
                analysis_id: token.clone(),
                project_id: Some("V3fmjM".into()),
                path: Some(PathBuf::from("/nas1/x")),
                customer_name: Some("Dr Alice".into()),
                customer_emails: vec![s.addr("alice")],
                staff: Staff {
                    action: vec![s.addr("bob")],
                    sales: vec![],
                    info: vec![],
                },
                extra: std::collections::BTreeMap::new(),
                customer_password: None,
            },
            target: TargetInfo {
                name: "garage".into(),
                kind: TargetKind::S3,
                describe: storage.describe(),
            },
            key_prefix: key_prefix.clone(),
            files: vec![DeliveredFile {
                rel: "clean/S1_R1.fq.gz".into(),
                key: key.clone(),
                size: data.len() as u64,
                md5: md5_hex(&data),
                sha256: None,
            }],
            total_files: 1,
            total_bytes: data.len() as u64,
            md5sum_key: md5sum_key.clone(),
            md5sum_text: md5sum_text.clone(),
            sha256sum_key: None,
            started_at: Utc::now(),
            finished_at: Utc::now(),
        };
        let state = labrelay::db::Db::open_state(&config).await.unwrap();
        let ctx = StepContext {
            config: &config,
            delivery: &delivery,
            storage: Some(&storage),
            state: &state,
        };
        let grant = steps.grant(ctx, &report).await.unwrap();
        assert_eq!(grant.method, AccessMethod::Presigned);
        assert_eq!(grant.valid_days, Some(3));
        assert_eq!(grant.links.len(), 2, "the data file and md5sum.txt");
        let receipt = steps.notify(ctx, &report, &grant).await.unwrap().unwrap();
        assert!(receipt.outbox_path.is_none());

        let mut alice = s.imap("alice");
        let m = take_message(&mut alice, &receipt.message_id);
        alice.logout().unwrap();
        let text = m.text.unwrap();
        let urls: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("http"))
            .collect();
        assert_eq!(urls.len(), 2, "{text}");
        let client = reqwest::Client::new();
        let first = client.get(urls[0]).send().await.unwrap();
        assert_eq!(first.status(), 200, "{}", urls[0]);
        assert_eq!(first.bytes().await.unwrap().as_ref(), data.as_slice());
        let second = client.get(urls[1]).send().await.unwrap();
        assert_eq!(second.text().await.unwrap(), md5sum_text);
        let attached = m
            .attachments
            .iter()
            .find(|a| a.name.as_deref() == Some("md5sum.txt"))
            .unwrap();
        assert_eq!(attached.data, md5sum_text.as_bytes());
        let mut bob = s.imap("bob");
        take_message(&mut bob, &receipt.message_id);
        bob.logout().unwrap();

        // `renew`: fresh links to the same objects.
        let renewed = steps.renew_links(ctx, &report).await.unwrap();
        assert_eq!(renewed.links.len(), 2);
        assert_eq!(renewed.valid_days, Some(3));
        let again = client
            .get(renewed.links[0].url.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(again.bytes().await.unwrap().as_ref(), data.as_slice());
        state.close().await;
        storage.delete(&key).await.unwrap();
        storage.delete(&md5sum_key).await.unwrap();
    });
}

// ---------------------------------------------------------------------------------
// The vendor CLI and the account command: real programs (shell scripts).

/// A script that records each call (argv, and the secret variables it sees) in
/// `calls.log` next to it, and behaves like `bo` enough for the steps: `select`
/// fails unless a `project_exists` marker file exists; `fail CODE` prints the token on
/// stderr and exits with CODE.
fn write_script(dir: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(name);
    let script = r#"#!/bin/sh
here=$(dirname "$0")
{
  printf 'ARGV'
  for a in "$@"; do printf ' [%s]' "$a"; done
  printf '\n'
  printf 'ENV token=[%s] password=[%s]\n' "${BO_TOKEN-}" "${BO_PASSWORD-}${LABRELAY_ACCESS_PASSWORD-}"
  printf 'CMDLINE '
  tr '\0' ' ' < /proc/$$/cmdline
  printf '\n'
} >> "$here/calls.log"
case "$1" in
  select)
    [ -f "$here/project_exists" ] && exit 0
    echo "Could not find a project named '$2'" >&2
    exit 1 ;;
  fail)
    echo "upload refused for token $BO_TOKEN" >&2
    exit "$2" ;;
esac
exit 0
"#;
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

struct Call {
    argv: String,
    env: String,
    cmdline: String,
}

fn calls(dir: &Path) -> Vec<Call> {
    let log = std::fs::read_to_string(dir.join("calls.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines
        .chunks(3)
        .map(|c| Call {
            argv: c[0].to_owned(),
            env: c[1].to_owned(),
            cmdline: c.get(2).copied().unwrap_or_default().to_owned(),
        })
        .collect()
}

fn vendor_config(bo: &Path, token: &str, upload: &[&str]) -> VendorConfig {
    let bo = bo.display().to_string();
    let argv = |args: &[&str]| {
        let mut v = vec![format!("\"{bo}\"")];
        v.extend(args.iter().map(|a| format!("\"{a}\"")));
        format!("[{}]", v.join(", "))
    };
    let toml = format!(
        r#"
        env = {{ BO_TOKEN = "{token}" }}
        password_env = "BO_PASSWORD"
        temporary_exit_codes = [75]
        [steps]
        login = {login}
        project_exists = {select}
        create_project = {create}
        mkdir = {mkdir}
        upload = {upload}
        upload_file = {upload_file}
        create_user = {create_user}
        grant = {grant}
        "#,
        login = argv(&["login", "--noprojects"]),
        select = argv(&["select", "{project}"]),
        create = argv(&["new", "project", "{project}"]),
        mkdir = argv(&["mkdir", "{project}:/{remote_dir}"]),
        upload = argv(upload),
        upload_file = argv(&["upload", "-f", "{local_file}", "{project}:/{remote_dir}/"]),
        create_user = argv(&["new", "delivery_user", "-d", "{days}", "{user}"]),
        grant = argv(&["set_permission", "-p", "{project}", "{user}", "dv"]),
    );
    VendorConfig::from_value("online", &toml::from_str(&toml).unwrap()).unwrap()
}

#[tokio::test]
async fn vendor_cli_gets_secrets_only_in_its_environment() {
    let dir = test_support::tempdir();
    let bo = write_script(dir.path(), "bo");
    let token = format!("tok-{}", unique("bo"));
    let cfg = vendor_config(
        &bo,
        &token,
        &[
            "upload",
            "-c",
            "5",
            "-f",
            "{local_dir}",
            "{project}:/{remote_dir}/",
        ],
    );
    let vendor = VendorTarget::new("delivery.vendors.online", &cfg).unwrap();
    assert!(vendor.describe().starts_with("vendor:"));
    let data = dir.path().join("6cLB4ma/result/upload");
    std::fs::create_dir_all(&data).unwrap();
    let md5sum = dir.path().join("md5sum.txt");
    std::fs::write(&md5sum, "x  a\n").unwrap();
    let upload = VendorUpload {
        analysis_id: "6cLB4ma".into(),
        project: "V3fmjM".into(),
        remote_dir: "6cLB4ma".into(),
        local_dir: data.clone(),
        extra_files: vec![md5sum.clone()],
        customer_email: "807729670@qq.com".into(),
    };
    let report = vendor.deliver(&upload).await.unwrap();
    assert!(report.project_created);
    let steps: Vec<&str> = report.steps.iter().map(|s| s.step.as_str()).collect();
    assert_eq!(
        steps,
        [
            "login",
            "project_exists",
            "create_project",
            "mkdir",
            "upload",
            "upload_file"
        ]
    );
    assert_eq!(report.steps[1].exit_code, 1);

    // The account, as the seed made it: e-mail prefix + "online", valid 30 days.
    let access_cfg: AccessConfig = toml::from_str(
        "account = \"{email_prefix}online\"\nlogin = \"https://online.example.org\"\n",
    )
    .unwrap();
    let access = Access::new("delivery.access", &access_cfg).unwrap();
    let now = Utc::now();
    let req = AccessRequest {
        target: "online".into(),
        analysis_id: "6cLB4ma".into(),
        project_id: "V3fmjM".into(),
        customer_emails: vec!["807729670@qq.com".into()],
        key_prefix: "6cLB4ma".into(),
        files: vec![],
        password: None,
        now,
    };
    let grant = access.grant(&req, None, Some(&vendor)).await.unwrap();
    assert_eq!(grant.method, AccessMethod::Vendor);
    let account = grant.account.clone().unwrap();
    assert_eq!(account.user, "807729670online");
    let password = account.password.expose().to_owned();
    assert_eq!(password.len(), 16);
    assert_eq!(grant.valid_days, Some(30));
    assert_eq!(grant.expires_at, Some(now + chrono::Duration::days(30)));

    let calls = calls(dir.path());
    let argvs: Vec<&str> = calls.iter().map(|c| c.argv.as_str()).collect();
    let dir_s = data.display().to_string();
    assert_eq!(
        argvs,
        [
            "ARGV [login] [--noprojects]".to_owned(),
            "ARGV [select] [V3fmjM]".to_owned(),
            "ARGV [new] [project] [V3fmjM]".to_owned(),
            "ARGV [mkdir] [V3fmjM:/6cLB4ma]".to_owned(),
            format!("ARGV [upload] [-c] [5] [-f] [{dir_s}] [V3fmjM:/6cLB4ma/]"),
            format!(
                "ARGV [upload] [-f] [{}] [V3fmjM:/6cLB4ma/]",
                md5sum.display()
            ),
            "ARGV [login] [--noprojects]".to_owned(),
            "ARGV [new] [delivery_user] [-d] [30] [807729670online]".to_owned(),
            "ARGV [set_permission] [-p] [V3fmjM] [807729670online] [dv]".to_owned(),
        ]
    );
    for c in &calls {
        // Secrets never on a command line (what `ps` shows: /proc/PID/cmdline)…
        assert!(
            !c.argv.contains(&token) && !c.argv.contains(&password),
            "{}",
            c.argv
        );
        assert!(
            !c.cmdline.contains(&token) && !c.cmdline.contains(&password),
            "{}",
            c.cmdline
        );
        // …always the token in the environment…
        assert!(c.env.contains(&format!("token=[{token}]")), "{}", c.env);
        // …and the password only for the step that needs it.
        if c.argv.contains("delivery_user") {
            assert!(
                c.env.contains(&format!("password=[{password}]")),
                "{}",
                c.env
            );
        } else {
            assert!(c.env.ends_with("password=[]"), "{}", c.env);
        }
    }
    assert!(!format!("{grant:?}").contains(&password));

    // With the project there, it is not created again.
    std::fs::write(dir.path().join("project_exists"), "").unwrap();
    let again = vendor.deliver(&upload).await.unwrap();
    assert!(!again.project_created);
    assert!(again.steps.iter().all(|s| s.step != "create_project"));
}

#[tokio::test]
async fn vendor_exit_codes_map_to_ours() {
    let dir = test_support::tempdir();
    let bo = write_script(dir.path(), "bo");
    std::fs::write(dir.path().join("project_exists"), "").unwrap();
    let token = format!("tok-{}", unique("bo-exit"));
    let upload = VendorUpload {
        analysis_id: "A1".into(),
        project: "P1".into(),
        remote_dir: "A1".into(),
        local_dir: dir.path().to_owned(),
        extra_files: vec![],
        customer_email: "x@example.org".into(),
    };
    for (code, exit) in [("3", Exit::Failed), ("75", Exit::TempFail)] {
        let cfg = vendor_config(&bo, &token, &["fail", code]);
        let vendor = VendorTarget::new("delivery.vendors.online", &cfg).unwrap();
        let err = vendor.deliver(&upload).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, CommandError::Failed { step, code: c, .. } if step == "upload" && c.to_string() == code),
            "{msg}"
        );
        assert!(
            msg.contains("step `upload`") && msg.contains(&format!("code {code}")),
            "{msg}"
        );
        assert!(msg.contains("upload refused for token ****"), "{msg}");
        assert!(!msg.contains(&token), "{msg}");
        assert_eq!(err.exit(), exit);
        assert_eq!(
            classify(&anyhow::Error::from(err).context("delivering A1")),
            exit
        );
    }

    // A missing program is a configuration error.
    let cfg = vendor_config(Path::new("/nonexistent/bo"), &token, &["upload"]);
    let vendor = VendorTarget::new("delivery.vendors.online", &cfg).unwrap();
    assert_eq!(
        vendor.deliver(&upload).await.unwrap_err().exit(),
        Exit::Config
    );
}

#[tokio::test]
async fn sftp_account_command_gets_a_generated_password_in_its_environment() {
    let dir = test_support::tempdir();
    let script = write_script(dir.path(), "mkaccount");
    let toml = format!(
        r#"
        methods = {{ sftp = "sftp-account" }}
        [command]
        argv = ["{}", "{{user}}", "{{directory}}", "{{expires}}", "{{days}}"]
        login = "sftp://sftp.labrelay.test:2222"
        directory = "/data/delivery/{{key_prefix}}"
        "#,
        script.display()
    );
    let cfg = AccessConfig::from_value(Some(&toml::from_str(&toml).unwrap())).unwrap();
    let access = Access::new("delivery.access", &cfg).unwrap();
    let now = at("2025-01-30T02:00:00Z");
    let req = AccessRequest {
        target: "sftp".into(),
        analysis_id: "A1".into(),
        project_id: "P1".into(),
        customer_emails: vec!["Wang Wei <Wang.Wei@pku.edu.cn>".into()],
        key_prefix: "online/A1".into(),
        files: vec![],
        password: None,
        now,
    };
    let grant = access.grant(&req, None, None).await.unwrap();
    assert_eq!(grant.method, AccessMethod::Command);
    let account = grant.account.clone().unwrap();
    assert_eq!(account.user, "wang.wei");
    assert_eq!(
        account.directory.as_deref(),
        Some("/data/delivery/online/A1")
    );
    assert_eq!(
        account.login.as_deref(),
        Some("sftp://sftp.labrelay.test:2222")
    );
    assert_eq!(grant.expires_at, Some(at("2025-03-01T02:00:00Z")));
    let password = account.password.expose().to_owned();
    let calls = calls(dir.path());
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].argv,
        "ARGV [wang.wei] [/data/delivery/online/A1] [2025-03-01] [30]"
    );
    assert!(!calls[0].cmdline.contains(&password));
    assert!(calls[0].env.ends_with(&format!("password=[{password}]")));
    let record = serde_json::to_string(&grant.record()).unwrap();
    assert!(!record.contains(&password), "{record}");
    assert!(record.contains("\"method\":\"sftp-account\""), "{record}");

    // Two grants never share a password.
    let again = access.grant(&req, None, None).await.unwrap();
    assert_ne!(again.account.unwrap().password.expose(), password);
}

#[test]
fn a_password_placeholder_stops_the_tool_at_start_up() {
    let toml = r#"
        [delivery.vendors.online.steps]
        upload = ["bo", "upload", "{local_dir}"]
        create_user = ["bo", "new", "delivery_user", "-p", "{password}", "{user}"]
    "#;
    let config = Config::from_toml(toml).unwrap();
    let delivery = delivery::config::DeliveryConfig::from_config(&config).unwrap();
    let err = DeliverySteps::new(&config, &delivery).unwrap_err();
    assert_eq!(classify(&err), Exit::Config);
    let msg = format!("{err:#}");
    assert!(
        msg.contains("delivery.vendors.online.steps.create_user"),
        "{msg}"
    );
    assert!(msg.contains("environment variable"), "{msg}");

    let config = Config::from_toml("[delivery.mail]\nlanguage = \"fr\"\n").unwrap();
    let delivery = delivery::config::DeliveryConfig::from_config(&config).unwrap();
    let err = DeliverySteps::new(&config, &delivery).unwrap_err();
    assert_eq!(classify(&err), Exit::Config);
    assert!(format!("{err:#}").contains("delivery.mail"), "{err:#}");
}

#[tokio::test]
async fn renewing_a_target_without_links_is_a_configuration_error() {
    let dir = test_support::tempdir();
    let toml = format!(
        "[paths]\ndata_dir = \"{d}\"\n[storage.nas]\nurl = \"{d}/nas\"\n",
        d = dir.path().display()
    );
    let config = Config::from_toml(&toml).unwrap();
    let delivery = delivery::config::DeliveryConfig::from_config(&config).unwrap();
    let steps = DeliverySteps::new(&config, &delivery).unwrap();
    std::fs::create_dir(dir.path().join("nas")).unwrap();
    let storage = AnyStorage::open(&config.storage["nas"]).unwrap();
    let state = labrelay::db::Db::open_state(&config).await.unwrap();
    let ctx = StepContext {
        config: &config,
        delivery: &delivery,
        storage: Some(&storage),
        state: &state,
    };
    let report = DeliveryReport {
        delivery_id: "d1".into(),
        tool: Tool::UploadPure,
        analysis: Analysis {
            analysis_id: "A1".into(),
            customer_emails: vec!["alice@labrelay.test".into()],
            ..Analysis::default()
        },
        target: TargetInfo {
            name: "nas".into(),
            kind: TargetKind::Local,
            describe: storage.describe(),
        },
        key_prefix: "A1".into(),
        files: vec![],
        total_files: 0,
        total_bytes: 0,
        md5sum_key: "A1/md5sum.txt".into(),
        md5sum_text: String::new(),
        sha256sum_key: None,
        started_at: Utc::now(),
        finished_at: Utc::now(),
    };
    let grant = steps.grant(ctx, &report).await.unwrap();
    assert_eq!(grant.method, AccessMethod::None);
    let err = steps.renew_links(ctx, &report).await.unwrap_err();
    assert_eq!(classify(&err), Exit::Config);
    assert!(err.to_string().contains("nas"), "{err}");
    state.close().await;
}
