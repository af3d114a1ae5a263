//! Secrets never reach the logs: a child process logs in to every server with a
//! password at the highest verbosity (-vvv), and the parent greps everything it wrote.

use std::process::Command;

use labrelay::config::Config;
use labrelay::db::Db;
use labrelay::mail::{ImapClient, Mailer, OutgoingMail};
use labrelay::queue::{AnyBroker, Broker, PublishOptions, QueueSpec};
use labrelay::storage::{AnyStorage, ObjectStorage};

const PROBE: &str = "LABRELAY_TEST_LEAK_PROBE";
const WRONG_IMAP_PASSWORD: &str = "wrong-imap-pw-Z9q";
const PG_PASSWORD: &str = "pg-pw-never-logged-8Hd";

fn config() -> Option<Config> {
    let s = |k: &str| test_support::require(k);
    let text = format!(
        r#"
[paths]
data_dir = "/nonexistent-labrelay-probe"
[databases.pg]
url = "{pg}"
password = "{PG_PASSWORD}"
[queue]
url = "amqp://{amqp_user}@127.0.0.1:5672/%2f"
password = "{amqp_pw}"
[smtp]
host = "{smtp_host}"
port = {smtp_port}
security = "none"
[imap]
host = "{imap_host}"
port = {imap_port}
security = "none"
username = "alice@{domain}"
password = "{alice_pw}"
[storage.s3]
url = "s3://{bucket}/leak-probe"
endpoint = "{s3_endpoint}"
region = "{s3_region}"
path_style = true
allow_http = true
access_key_id = "{s3_key}"
secret_access_key = "{s3_secret}"
[storage.sftp]
url = "sftp://{sftp_user}@{sftp_host}:{sftp_port}{sftp_root}"
password = "{sftp_pw}"
known_hosts = "{known_hosts}"
"#,
        pg = s("PG_URL")?,
        amqp_user = s("AMQP_USER")?,
        amqp_pw = s("AMQP_PASSWORD")?,
        smtp_host = s("SMTP_HOST")?,
        smtp_port = s("SMTP_PORT")?,
        imap_host = s("IMAP_HOST")?,
        imap_port = s("IMAP_PORT")?,
        domain = s("MAIL_DOMAIN")?,
        alice_pw = s("MAIL_PASS_ALICE")?,
        bucket = s("S3_BUCKET")?,
        s3_endpoint = s("S3_ENDPOINT")?,
        s3_region = s("S3_REGION")?,
        s3_key = s("S3_ACCESS_KEY_ID")?,
        s3_secret = s("S3_SECRET_ACCESS_KEY")?,
        sftp_user = s("SFTP_USER")?,
        sftp_host = s("SFTP_HOST")?,
        sftp_port = s("SFTP_PORT")?,
        sftp_root = s("SFTP_ROOT")?,
        sftp_pw = s("SFTP_PASSWORD")?,
        known_hosts = s("SFTP_KNOWN_HOSTS")?,
    );
    Some(Config::from_toml(&text).unwrap())
}

/// Every client logs in with a password and does real work. Run directly, it checks
/// that each login works; run as the probe child, it also logs everything at -vvv.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_logs_in_with_a_password() {
    if std::env::var_os(PROBE).is_some() {
        labrelay::logging::init(3, labrelay::logging::ColorChoice::Never);
    }
    let Some(config) = config() else { return };
    let token = test_support::unique("leak");

    // PostgreSQL (trust auth here accepts the password; it still travels in the URL).
    let db = Db::connect(config.database("pg").unwrap()).await.unwrap();
    db.close().await;

    // RabbitMQ with a user whose password differs from its name.
    let broker = AnyBroker::from_config(&config).await.unwrap();
    let queue = format!("{token}.q");
    broker
        .declare_queue(&QueueSpec::new(queue.clone()))
        .await
        .unwrap();
    broker
        .publish("", &queue, b"probe", &PublishOptions::new())
        .await
        .unwrap();
    let mut consumer = broker.consume(&queue, 1).await.unwrap();
    consumer.next().await.unwrap().ack().await.unwrap();
    broker.delete_queue(&queue).await.unwrap();
    broker
        .delete_queue(&labrelay::queue::dead_letter_name(&queue))
        .await
        .unwrap();

    // SMTP, then IMAP with the right and a wrong password.
    let domain = test_support::setting("MAIL_DOMAIN").unwrap();
    let mailer =
        Mailer::from_config(config.smtp.as_ref(), std::path::Path::new("/nonexistent")).unwrap();
    let mail = OutgoingMail::new(format!("probe@{domain}"))
        .to(format!("alice@{domain}"))
        .subject(format!("probe {token}"))
        .text("probe");
    let sent = mailer.send(&mail).await.unwrap();
    let imap_cfg = config.imap.clone().unwrap();
    let message_id = sent.message_id.clone();
    tokio::task::spawn_blocking(move || {
        let mut imap = ImapClient::connect(&imap_cfg).unwrap();
        imap.select("INBOX").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let uids = imap.search_message_id(&message_id).unwrap();
            if let Some(uid) = uids.first() {
                imap.fetch_raw(*uid).unwrap();
                imap.delete(*uid).unwrap();
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "probe mail never arrived"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        imap.logout().unwrap();
        let mut wrong = imap_cfg.clone();
        wrong.password = labrelay::secret::SecretSpec::parse(WRONG_IMAP_PASSWORD);
        let err = ImapClient::connect(&wrong).unwrap_err();
        tracing::error!("expected login failure: {err:#}");
    })
    .await
    .unwrap();

    // S3 (secret key signs requests and presigned URLs) and SFTP with a password.
    for target in ["s3", "sftp"] {
        let storage = AnyStorage::open(config.storage(target).unwrap()).unwrap();
        let key = format!("{token}/probe.txt");
        storage
            .put_bytes(&key, b"probe".to_vec().into())
            .await
            .unwrap();
        assert_eq!(storage.get_bytes(&key).await.unwrap().as_ref(), b"probe");
        if let Some(url) = storage
            .presign_get(&key, std::time::Duration::from_mins(1))
            .await
            .unwrap()
        {
            tracing::info!(%url, "presigned URL");
        }
        storage.delete(&key).await.unwrap();
    }
}

#[test]
fn no_password_in_any_log_line_at_trace_level() {
    if std::env::var_os(PROBE).is_some() {
        return; // we are the child of this very test
    }
    let Some(_) = config() else { return };
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "secrets::every_client_logs_in_with_a_password",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROBE, "1")
        .env_remove("RUST_LOG")
        .env_remove("LABRELAY_LOG")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "probe failed:\n{text}");
    let log_lines = text
        .lines()
        .filter(|l| l.contains("DEBUG") || l.contains("TRACE") || l.contains(" INFO "))
        .count();
    assert!(
        log_lines >= 5,
        "the probe logged too little to prove anything:\n{text}"
    );
    assert!(text.contains("expected login failure"), "{text}");
    let s = |k: &str| test_support::setting(k).unwrap();
    for secret in [
        PG_PASSWORD.to_owned(),
        WRONG_IMAP_PASSWORD.to_owned(),
        s("AMQP_PASSWORD"),
        s("MAIL_PASS_ALICE"),
        s("S3_SECRET_ACCESS_KEY"),
        s("SFTP_PASSWORD"),
    ] {
        assert!(
            !text.contains(&secret),
            "a password leaked into the logs:\n{text}"
        );
    }
}
