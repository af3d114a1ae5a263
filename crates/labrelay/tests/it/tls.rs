//! TLS against the real test servers: IMAPS and IMAP STARTTLS (Dovecot), SMTP
//! submission with STARTTLS + AUTH and SMTPS with AUTH (Postfix, passwords checked by
//! Dovecot), amqps (RabbitMQ), each trusting the test CA through `ca_file`; the same
//! connections with an unrelated CA (or only the system's roots) must be refused as a
//! configuration error (exit 78) before any login. And `ca_file` itself: a missing,
//! empty or corrupt file is a configuration error naming the key and the file.
//!
//! S3 over HTTPS goes to Garage through stunnel (Garage speaks plain HTTP only; a TLS
//! terminator in front of it is how it is deployed), so the requests reach the real S3
//! server.
//!
//! `scripts/services` creates the CAs and the server certificate (for 127.0.0.1,
//! 127.0.0.2 and localhost); Dovecot's TLS listeners are on 127.0.0.2 because its plain
//! listener on 127.0.0.1 must offer no STARTTLS (see mail.rs).
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use labrelay::config::{CaCerts, Config, ImapConfig, SmtpConfig, TlsMode};
use labrelay::exit::Exit;
use labrelay::mail::{ImapClient, MailError, Mailer, OutgoingMail};
use labrelay::queue::{AnyBroker, Broker, BrokerSettings, PublishOptions, QueueSpec};
use labrelay::secret::{RedactedUrl, SecretSpec};
use labrelay::storage::{AnyStorage, ObjectStorage, StorageError};
use test_support::unique;

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(20);

struct Tls {
    ca: PathBuf,
    other_ca: PathBuf,
    domain: String,
    alice_pass: String,
}

macro_rules! tls {
    () => {{
        Tls {
            ca: PathBuf::from(test_support::require!("TLS_CA")),
            other_ca: PathBuf::from(test_support::require!("TLS_OTHER_CA")),
            domain: test_support::require!("MAIL_DOMAIN"),
            alice_pass: test_support::require!("MAIL_PASS_ALICE"),
        }
    }};
}

fn port(name: &str) -> Option<u16> {
    test_support::require(name).map(|p| p.parse().unwrap())
}

impl Tls {
    fn alice(&self) -> String {
        format!("alice@{}", self.domain)
    }

    /// IMAP on the TLS address of the test Dovecot, as alice.
    fn imap(&self, security: TlsMode, ca_file: Option<&Path>) -> Option<ImapConfig> {
        let port = match security {
            TlsMode::Tls => port("IMAPS_PORT")?,
            _ => port("IMAP_STARTTLS_PORT")?,
        };
        Some(ImapConfig {
            host: test_support::require("IMAP_TLS_HOST")?,
            port: Some(port),
            security,
            username: "alice".into(),
            password: SecretSpec::parse(&self.alice_pass),
            folder: "INBOX".into(),
            timeout_secs: 20,
            ca_file: ca_file.map(Path::to_owned),
        })
    }

    /// Postfix's submission (STARTTLS) or SMTPS (implicit TLS) listener, as alice.
    fn smtp(&self, security: TlsMode, ca_file: Option<&Path>) -> Option<SmtpConfig> {
        let port = match security {
            TlsMode::Tls => port("SMTPS_PORT")?,
            _ => port("SUBMISSION_PORT")?,
        };
        Some(SmtpConfig {
            host: test_support::require("SMTP_HOST")?,
            port: Some(port),
            security,
            username: Some(self.alice()),
            password: Some(SecretSpec::parse(&self.alice_pass)),
            timeout_secs: 20,
            hello_name: Some("client.labrelay.test".into()),
            ca_file: ca_file.map(Path::to_owned),
        })
    }

    fn mail(&self, what: &str) -> OutgoingMail {
        OutgoingMail::new(self.alice())
            .to(self.alice())
            .subject(unique(what))
            .text(format!("sent by the TLS test {what}"))
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Wait for the message over IMAPS (with the test CA), then delete it.
fn assert_delivered_and_clean_up(t: &Tls, message_id: &str) {
    let cfg = t.imap(TlsMode::Tls, Some(&t.ca)).unwrap();
    let mut c = ImapClient::connect(&cfg).unwrap();
    c.select("INBOX").unwrap();
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    let uid = loop {
        if let Some(uid) = c.search_message_id(message_id).unwrap().first() {
            break *uid;
        }
        assert!(
            Instant::now() < deadline,
            "message {message_id} did not arrive within {DELIVERY_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    c.delete(uid).unwrap();
    c.logout().unwrap();
}

/// A certificate refusal: exit 78, the error says why, and no password in it.
fn assert_certificate_refused(err: &dyn std::fmt::Display, exit: Exit, password: &str) {
    let text = err.to_string();
    assert_eq!(exit, Exit::Config, "{text}");
    assert!(
        text.to_ascii_lowercase().contains("certificate"),
        "the error names the certificate problem: {text}"
    );
    assert!(!text.contains(password), "password leaked: {text}");
}

// ------------------------------------------------------------------------- IMAP --

#[test]
fn imaps_with_ca_file_logs_in() {
    let t = tls!();
    let Some(cfg) = t.imap(TlsMode::Tls, Some(&t.ca)) else {
        return;
    };
    let mut c = ImapClient::connect(&cfg).unwrap();
    c.select("INBOX").unwrap();
    c.logout().unwrap();
}

#[test]
fn imap_starttls_with_ca_file_logs_in() {
    let t = tls!();
    let Some(cfg) = t.imap(TlsMode::Starttls, Some(&t.ca)) else {
        return;
    };
    let mut c = ImapClient::connect(&cfg).unwrap();
    c.select("INBOX").unwrap();
    c.logout().unwrap();
}

#[test]
fn imap_with_the_wrong_ca_is_refused() {
    let t = tls!();
    for security in [TlsMode::Tls, TlsMode::Starttls] {
        // An unrelated private CA, and the system's roots alone.
        for ca_file in [Some(t.other_ca.as_path()), None] {
            let Some(cfg) = t.imap(security, ca_file) else {
                return;
            };
            let err = ImapClient::connect(&cfg).unwrap_err();
            assert!(matches!(err, MailError::Config(_)), "{security:?}: {err:?}");
            assert_certificate_refused(&err, err.exit(), &t.alice_pass);
        }
    }
}

// ------------------------------------------------------------------------- SMTP --

#[test]
fn smtp_submission_starttls_with_auth_delivers() {
    let t = tls!();
    let Some(cfg) = t.smtp(TlsMode::Starttls, Some(&t.ca)) else {
        return;
    };
    let mailer = Mailer::from_config(Some(&cfg), Path::new("/nonexistent")).unwrap();
    let mail = t.mail("submission-starttls");
    let sent = block_on(mailer.send(&mail)).unwrap();
    assert!(
        sent.server_reply.as_deref().unwrap().starts_with("250"),
        "{sent:?}"
    );
    assert_delivered_and_clean_up(&t, mail.id());
}

#[test]
fn smtps_implicit_tls_with_auth_delivers() {
    let t = tls!();
    let Some(cfg) = t.smtp(TlsMode::Tls, Some(&t.ca)) else {
        return;
    };
    let mailer = Mailer::from_config(Some(&cfg), Path::new("/nonexistent")).unwrap();
    let mail = t.mail("smtps");
    block_on(mailer.send(&mail)).unwrap();
    assert_delivered_and_clean_up(&t, mail.id());
}

#[test]
fn smtp_with_the_wrong_ca_is_refused() {
    let t = tls!();
    for security in [TlsMode::Starttls, TlsMode::Tls] {
        for ca_file in [Some(t.other_ca.as_path()), None] {
            let Some(cfg) = t.smtp(security, ca_file) else {
                return;
            };
            let mailer = Mailer::from_config(Some(&cfg), Path::new("/nonexistent")).unwrap();
            let err = block_on(mailer.send(&t.mail("wrong-ca"))).unwrap_err();
            assert!(matches!(err, MailError::Config(_)), "{security:?}: {err:?}");
            assert_certificate_refused(&err, err.exit(), &t.alice_pass);
        }
    }
}

/// The submission listener really checks the password (through Dovecot), so the
/// success paths above did authenticate.
#[test]
fn smtp_submission_with_a_wrong_password_is_an_auth_error() {
    let t = tls!();
    let Some(mut cfg) = t.smtp(TlsMode::Starttls, Some(&t.ca)) else {
        return;
    };
    let password = format!("wrong-{}", unique("pw"));
    cfg.password = Some(SecretSpec::parse(&password));
    let mailer = Mailer::from_config(Some(&cfg), Path::new("/nonexistent")).unwrap();
    let err = block_on(mailer.send(&t.mail("wrong-password"))).unwrap_err();
    assert!(matches!(err, MailError::Auth { .. }), "{err:?}");
    assert_eq!(err.exit(), Exit::Config);
    assert!(!format!("{err} {err:?}").contains(&password));
}

/// And it refuses mail without AUTH: an unauthenticated client is not a success path.
#[test]
fn smtp_submission_without_auth_is_refused() {
    let t = tls!();
    let Some(mut cfg) = t.smtp(TlsMode::Starttls, Some(&t.ca)) else {
        return;
    };
    cfg.username = None;
    cfg.password = None;
    let mailer = Mailer::from_config(Some(&cfg), Path::new("/nonexistent")).unwrap();
    let err = block_on(mailer.send(&t.mail("no-auth"))).unwrap_err();
    assert!(matches!(err, MailError::Rejected { .. }), "{err:?}");
}

// ------------------------------------------------------------------------- AMQP --

fn amqps_settings(ca_file: Option<&Path>) -> BrokerSettings {
    BrokerSettings {
        reconnect_for: Duration::from_secs(10),
        connection_name: Some(format!("labrelay tls test pid {}", std::process::id())),
        ca_file: ca_file.map(Path::to_owned),
        ..BrokerSettings::default()
    }
}

#[tokio::test]
async fn amqps_with_ca_file_publishes_and_consumes() {
    let t = tls!();
    let url = RedactedUrl::parse(&test_support::require!("AMQPS_URL")).unwrap();
    let broker = AnyBroker::connect(&url, &amqps_settings(Some(&t.ca)))
        .await
        .unwrap();
    let q = unique("tls");
    broker.declare_queue(&QueueSpec::new(&q)).await.unwrap();
    broker
        .publish(
            "",
            &q,
            b"over amqps",
            &PublishOptions::new().message_id("m1"),
        )
        .await
        .unwrap();
    let mut consumer = broker.consume(&q, 1).await.unwrap();
    let delivery = consumer
        .next_timeout(Duration::from_secs(20))
        .await
        .unwrap()
        .expect("the message published over amqps arrives");
    assert_eq!(delivery.body, b"over amqps");
    assert_eq!(delivery.message_id.as_deref(), Some("m1"));
    delivery.ack().await.unwrap();
    drop(consumer);
    broker.delete_queue(&q).await.unwrap();
    broker.delete_queue(&format!("{q}.dead")).await.unwrap();
}

#[tokio::test]
async fn amqps_with_the_wrong_ca_is_refused() {
    let t = tls!();
    let url = RedactedUrl::parse(&test_support::require!("AMQPS_URL")).unwrap();
    for ca_file in [Some(t.other_ca.as_path()), None] {
        let err = AnyBroker::connect(&url, &amqps_settings(ca_file))
            .await
            .unwrap_err();
        assert_certificate_refused(&err, err.exit(), "guest:guest");
    }
}

/// Names of this process's threads (Linux truncates them to 15 bytes).
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

/// lapin runs on tokio: a connection, a publish and a consume start none of
/// async-global-executor's worker threads and no async-io reactor thread (lapin's
/// defaults, used before its executor and reactor were set). nextest runs each test in
/// its own process, so the threads seen are this test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_lapin_starts_no_executor_threads_of_its_own() {
    let t = tls!();
    let url = RedactedUrl::parse(&test_support::require!("AMQPS_URL")).unwrap();
    let broker = AnyBroker::connect(&url, &amqps_settings(Some(&t.ca)))
        .await
        .unwrap();
    let q = unique("tls-runtime");
    broker.declare_queue(&QueueSpec::new(&q)).await.unwrap();
    broker
        .publish("", &q, b"x", &PublishOptions::new())
        .await
        .unwrap();
    let mut consumer = broker.consume(&q, 1).await.unwrap();
    let delivery = consumer
        .next_timeout(Duration::from_secs(20))
        .await
        .unwrap()
        .expect("the message arrives");
    delivery.ack().await.unwrap();
    let names = thread_names();
    assert!(
        names.iter().any(|n| n.starts_with("lapin-io-loop")),
        "the connection is up: {names:?}"
    );
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("async-global") || n == "async-io"),
        "lapin started its own executor or reactor: {names:?}"
    );
    drop(consumer);
    broker.delete_queue(&q).await.unwrap();
    broker.delete_queue(&format!("{q}.dead")).await.unwrap();
}

// ---------------------------------------------------------------------- ca_file --

/// Every `ca_file` key is checked when the configuration loads: a missing file, a file
/// without certificates and a corrupt PEM block all exit 78 naming the key and file.
#[test]
fn bad_ca_file_is_a_configuration_error_naming_key_and_file() {
    let dir = test_support::tempdir();
    let missing = dir.path().join("no-such-ca.pem");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no certificate in here\n").unwrap();
    let corrupt = dir.path().join("corrupt.pem");
    std::fs::write(
        &corrupt,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let not_a_cert = dir.path().join("not-a-cert.pem");
    std::fs::write(
        &not_a_cert,
        "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let sections = [
        (
            "imap.ca_file",
            "[imap]\nhost = \"h\"\nusername = \"u\"\npassword = \"env:X\"\n",
        ),
        ("smtp.ca_file", "[smtp]\nhost = \"h\"\n"),
        ("queue.ca_file", "[queue]\nurl = \"amqps://u@h/%2f\"\n"),
        (
            "storage.customer.ca_file",
            "[storage.customer]\nurl = \"s3://bucket/p\"\nendpoint = \"https://s3.example.org\"\n",
        ),
    ];
    for (key, section) in sections {
        for file in [&missing, &empty, &corrupt, &not_a_cert] {
            let toml = format!("{section}ca_file = \"{}\"\n", file.display());
            let err = Config::from_toml(&toml).unwrap_err();
            let text = err.to_string();
            assert_eq!(err.exit(), Exit::Config, "{text}");
            assert!(text.contains(key), "names the key {key}: {text}");
            assert!(
                text.contains(&file.display().to_string()),
                "names the file: {text}"
            );
        }
    }
}

/// The test CA loads, from every section; so does a bundle of several CAs.
#[test]
fn ca_file_with_one_or_several_certificates_loads() {
    let t = tls!();
    let dir = test_support::tempdir();
    let bundle = dir.path().join("bundle.pem");
    let text = format!(
        "{}{}",
        std::fs::read_to_string(&t.ca).unwrap(),
        std::fs::read_to_string(&t.other_ca).unwrap()
    );
    std::fs::write(&bundle, text).unwrap();
    assert_eq!(CaCerts::load("imap.ca_file", &t.ca).unwrap().der.len(), 1);
    assert_eq!(CaCerts::load("imap.ca_file", &bundle).unwrap().der.len(), 2);
    let toml = format!(
        "[imap]\nhost = \"h\"\nusername = \"u\"\npassword = \"env:X\"\nca_file = \"{ca}\"\n\
         [smtp]\nhost = \"h\"\nca_file = \"{ca}\"\n\
         [queue]\nurl = \"amqps://u@h/%2f\"\nca_file = \"{ca}\"\n\
         [storage.customer]\nurl = \"s3://bucket/p\"\nendpoint = \"https://s3.example.org\"\n\
         ca_file = \"{bundle}\"\n",
        ca = t.ca.display(),
        bundle = bundle.display(),
    );
    let config = Config::from_toml(&toml).unwrap();
    assert_eq!(
        config.imap.unwrap().ca_file.as_deref(),
        Some(t.ca.as_path())
    );
}

/// A CA file that went bad after the configuration was read stops the target being
/// opened (exit 78), before any request.
#[test]
fn s3_target_loads_its_ca_file() {
    let t = tls!();
    let dir = test_support::tempdir();
    let ca = dir.path().join("ca.pem");
    std::fs::copy(&t.ca, &ca).unwrap();
    let toml = format!(
        "[storage.customer]\nurl = \"s3://bucket/p\"\nendpoint = \"https://127.0.0.1:1\"\n\
         region = \"garage\"\npath_style = true\naccess_key_id = \"id\"\n\
         secret_access_key = \"secret\"\nca_file = \"{}\"\n",
        ca.display()
    );
    let config = Config::from_toml(&toml).unwrap();
    let section = config.storage("customer").unwrap();
    AnyStorage::open(section).unwrap();

    std::fs::write(&ca, "garbage\n").unwrap();
    let err = AnyStorage::open(section).unwrap_err();
    assert!(matches!(err, StorageError::Config { .. }), "{err:?}");
    assert_eq!(err.exit(), Exit::Config);
    let text = err.to_string();
    assert!(text.contains("storage.customer.ca_file"), "{text}");
    assert!(text.contains(&ca.display().to_string()), "{text}");
}

// ------------------------------------------------------------------- S3 (HTTPS) --

/// `[storage.customer]` on the test bucket through the HTTPS endpoint, under a fresh
/// prefix; `None` when the settings are missing (a failure under `CI=true`).
fn s3_https(ca_file: Option<&Path>) -> Option<labrelay::config::StorageConfig> {
    let mut toml = format!(
        "[storage.customer]\n\
         url = \"s3://{bucket}/{prefix}\"\n\
         endpoint = \"{endpoint}\"\n\
         region = \"{region}\"\n\
         path_style = true\n\
         access_key_id = \"{key_id}\"\n\
         secret_access_key = \"{secret}\"\n\
         timeout_secs = 30\n",
        bucket = test_support::require("S3_BUCKET")?,
        prefix = unique("tls"),
        endpoint = test_support::require("S3_HTTPS_ENDPOINT")?,
        region = test_support::require("S3_REGION")?,
        key_id = test_support::require("S3_ACCESS_KEY_ID")?,
        secret = test_support::require("S3_SECRET_ACCESS_KEY")?,
    );
    if let Some(ca) = ca_file {
        toml = format!("{toml}ca_file = \"{}\"\n", ca.display());
    }
    Some(
        Config::from_toml(&toml)
            .unwrap()
            .storage("customer")
            .unwrap()
            .clone(),
    )
}

#[tokio::test]
async fn s3_over_https_with_ca_file_round_trips() {
    let t = tls!();
    let Some(section) = s3_https(Some(&t.ca)) else {
        return;
    };
    // open_checked sends HeadBucket through object_store's client; put goes through
    // the uploader's own client: both must trust the CA.
    let s = AnyStorage::open_checked(&section).await.unwrap();
    s.put_bytes("a/b.txt", bytes::Bytes::from_static(b"over https"))
        .await
        .unwrap();
    assert_eq!(&s.get_bytes("a/b.txt").await.unwrap()[..], b"over https");
    s.delete("a/b.txt").await.unwrap();
    assert!(s.head("a/b.txt").await.unwrap().is_none());
}

#[tokio::test]
async fn s3_over_https_with_the_wrong_ca_is_refused() {
    let t = tls!();
    let secret = test_support::require!("S3_SECRET_ACCESS_KEY");
    for ca_file in [Some(t.other_ca.as_path()), None] {
        let Some(section) = s3_https(ca_file) else {
            return;
        };
        let err = AnyStorage::open_checked(&section).await.unwrap_err();
        assert!(matches!(err, StorageError::Config { .. }), "{err:?}");
        assert_certificate_refused(&err, err.exit(), &secret);
        // The uploader's client too (a put skips the HeadBucket of open_checked).
        let s = AnyStorage::open(&section).unwrap();
        let err = s
            .put_bytes("never.txt", bytes::Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert!(matches!(err, StorageError::Config { .. }), "{err:?}");
        assert_certificate_refused(&err, err.exit(), &secret);
    }
}
