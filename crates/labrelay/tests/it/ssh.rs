//! ssh tests against the OpenSSH server started by scripts/services.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::PathBuf;
use std::time::{Duration, Instant};

use labrelay::Exit;
use labrelay::secret::Secret;
use labrelay::ssh::{HostKeyPolicy, SshError, SshParams, SshSession};

/// Key-authenticated parameters for the test server, or `None` (test skipped).
fn key_params() -> Option<SshParams> {
    Some(SshParams {
        host: test_support::require("SFTP_HOST")?,
        port: test_support::require_parsed("SFTP_PORT")?,
        user: test_support::require("SFTP_USER")?,
        key_file: Some(PathBuf::from(test_support::require("SFTP_KEY")?)),
        key_passphrase: None,
        password: None,
        known_hosts: PathBuf::from(test_support::require("SFTP_KNOWN_HOSTS")?),
        host_key_policy: HostKeyPolicy::Strict,
        timeout: Duration::from_secs(20),
    })
}

fn password_params() -> Option<SshParams> {
    let password = test_support::require("SFTP_PASSWORD")?;
    Some(SshParams {
        key_file: None,
        password: Some(Secret::new(password)),
        ..key_params()?
    })
}

/// A syntactically valid ed25519 public key that is not the server's.
fn wrong_ed25519_key() -> String {
    use base64::Engine as _;
    let mut blob = Vec::new();
    blob.extend_from_slice(&11u32.to_be_bytes());
    blob.extend_from_slice(b"ssh-ed25519");
    blob.extend_from_slice(&32u32.to_be_bytes());
    blob.extend_from_slice(&[0x42; 32]);
    base64::engine::general_purpose::STANDARD.encode(blob)
}

#[tokio::test]
async fn key_auth_exec_captures_stdout_stderr_and_status() {
    let Some(p) = key_params() else { return };
    let mut s = SshSession::connect(&p).await.unwrap();
    let out = s.exec("echo hi", Duration::from_secs(20)).await.unwrap();
    assert_eq!(out.stdout, b"hi\n");
    assert!(out.stderr.is_empty());
    assert!(out.success());

    let out = s
        .exec("echo out; echo err >&2; exit 3", Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(out.stdout_text(), "out\n");
    assert_eq!(out.stderr_text(), "err\n");
    assert_eq!(out.status, 3);
    assert!(!out.success());
}

#[tokio::test]
async fn exec_drains_both_streams_beyond_the_channel_window() {
    // 3 MB on each stream: more than libssh2's 2 MiB window, so reading only stdout
    // first would deadlock.
    let Some(p) = key_params() else { return };
    let mut s = SshSession::connect(&p).await.unwrap();
    let out = s
        .exec(
            "head -c 3000000 /dev/zero >&2; head -c 3000000 /dev/zero",
            Duration::from_mins(1),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout.len(), 3_000_000);
    assert_eq!(out.stderr.len(), 3_000_000);
    assert!(out.success() && !out.truncated);
}

#[tokio::test]
async fn password_auth_works() {
    let Some(p) = password_params() else { return };
    let mut s = SshSession::connect(&p).await.unwrap();
    let out = s.exec("whoami", Duration::from_secs(20)).await.unwrap();
    assert_eq!(out.stdout_text().trim(), p.user);
}

#[tokio::test]
async fn wrong_password_is_a_config_error_without_the_password() {
    let Some(mut p) = password_params() else {
        return;
    };
    let wrong = "not-the-pw-Zq8";
    p.password = Some(Secret::new(wrong));
    let err = SshSession::connect(&p).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SshError::Auth { .. }), "{err:?}");
    assert!(!msg.contains(wrong), "{msg}");
    assert!(!format!("{err:?}").contains(wrong));
    assert!(msg.contains(&format!("{}:{}", p.host, p.port)), "{msg}");
    assert_eq!(err.exit(), Exit::Config);
}

#[tokio::test]
async fn unknown_host_is_refused_when_strict() {
    let Some(mut p) = key_params() else { return };
    let dir = test_support::tempdir();
    p.known_hosts = dir.path().join("known_hosts");
    std::fs::write(&p.known_hosts, "").unwrap();
    let err = SshSession::connect(&p).await.unwrap_err();
    assert!(matches!(err, SshError::HostKeyUnknown { .. }), "{err:?}");
    assert!(err.to_string().contains("SHA256:"), "{err}");
    assert_eq!(err.exit(), Exit::Config);
    assert_eq!(std::fs::read_to_string(&p.known_hosts).unwrap(), "");
}

#[tokio::test]
async fn accept_new_records_an_unknown_host() {
    let Some(mut p) = key_params() else { return };
    let dir = test_support::tempdir();
    // Does not exist yet, in a directory that does not exist yet.
    p.known_hosts = dir.path().join("ssh").join("known_hosts");
    p.host_key_policy = HostKeyPolicy::AcceptNew;
    let mut s = SshSession::connect(&p).await.unwrap();
    assert!(
        s.exec("true", Duration::from_secs(20))
            .await
            .unwrap()
            .success()
    );
    let text = std::fs::read_to_string(&p.known_hosts).unwrap();
    assert!(
        text.starts_with(&format!("[{}]:{} ssh-ed25519 ", p.host, p.port)),
        "{text}"
    );
    // The recorded key is now trusted under the strict policy too.
    p.host_key_policy = HostKeyPolicy::Strict;
    SshSession::connect(&p).await.unwrap();
    assert_eq!(std::fs::read_to_string(&p.known_hosts).unwrap(), text);
}

#[tokio::test]
async fn changed_host_key_is_refused_even_with_accept_new() {
    let Some(mut p) = key_params() else { return };
    let dir = test_support::tempdir();
    p.known_hosts = dir.path().join("known_hosts");
    let content = format!(
        "# a comment\n[{}]:{} ssh-ed25519 {}\n",
        p.host,
        p.port,
        wrong_ed25519_key()
    );
    std::fs::write(&p.known_hosts, &content).unwrap();
    for policy in [HostKeyPolicy::Strict, HostKeyPolicy::AcceptNew] {
        p.host_key_policy = policy;
        let err = SshSession::connect(&p).await.unwrap_err();
        assert!(matches!(err, SshError::HostKeyMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("{}:{}", p.host, p.port)), "{msg}");
        assert!(msg.contains(&p.known_hosts.display().to_string()), "{msg}");
        assert_eq!(err.exit(), Exit::Config);
    }
    assert_eq!(std::fs::read_to_string(&p.known_hosts).unwrap(), content);
}

#[tokio::test]
async fn command_exceeding_its_timeout_is_abandoned() {
    let Some(p) = key_params() else { return };
    let mut s = SshSession::connect(&p).await.unwrap();
    let started = Instant::now();
    let err = s
        .exec("sleep 30", Duration::from_secs(1))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, SshError::CommandTimeout { .. }), "{err:?}");
    assert!(err.to_string().contains("sleep 30"), "{err}");
    assert_eq!(err.exit(), Exit::TempFail);
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // The session survives an abandoned command.
    let out = s
        .exec("echo still here", Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(out.stdout_text(), "still here\n");
}

#[tokio::test]
async fn unreachable_server_is_a_temporary_failure() {
    let Some(mut p) = key_params() else { return };
    // Port 1 on loopback: refused at once.
    p.port = 1;
    let err = SshSession::connect(&p).await.unwrap_err();
    // Retried under the policy, then given up.
    let SshError::GaveUp { attempts, last } = &err else {
        panic!("not retried: {err:?}");
    };
    assert_eq!(*attempts, labrelay::retry::policy().attempts, "{err}");
    assert!(matches!(**last, SshError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&format!("{}:1", p.host)), "{err}");
    assert_eq!(err.exit(), Exit::TempFail);
}
