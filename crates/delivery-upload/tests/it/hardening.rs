//! Regressions found by trying delivery-upload as a hostile user would: a resume that
//! trusted its journal, symlinks out of the folder, a missing customer address counted
//! as success, configuration errors found after the upload, ids that nest deliveries.

use labrelay::storage::ObjectStorage;

use crate::common::{
    Home, Lims, LimsKind, STATUS_INSERT, TargetFixture, TargetKind, records, stderr, summary, tree,
};

/// A LIMS whose project has no customer address.
async fn clear_customer_email(lims: &Lims) {
    let db = lims.db().await;
    sqlx::query("UPDATE t_project SET customer_email = NULL")
        .execute(db.pool())
        .await
        .unwrap();
    db.close().await;
}

async fn set_customer_email(lims: &Lims) {
    let db = lims.db().await;
    sqlx::query("UPDATE t_project SET customer_email = 'customer@labrelay.test'")
        .execute(db.pool())
        .await
        .unwrap();
    db.close().await;
}

fn mails_of_kind(home: &Home, kind: &str) -> Vec<String> {
    home.outbox()
        .into_iter()
        .filter(|m| {
            m.lines()
                .any(|l| l.trim_end() == format!("X-Labrelay-Mail: {kind}"))
        })
        .collect()
}

fn local_root(target: &TargetFixture) -> std::path::PathBuf {
    std::path::PathBuf::from(target.storage.describe())
}

#[tokio::test]
async fn regression_no_customer_address_fails_and_a_resume_rechecks_the_target() {
    let target = TargetFixture::new(TargetKind::Local, "").await.unwrap();
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let home = Home::new();
    let (root, expected) = tree(&home.path().join("analysis"), 0);
    lims.add_analysis("N1", &root).await;
    clear_customer_email(&lims).await;
    home.config(&format!(
        "[delivery]\nkey_prefix = \"online\"\nstaff = [\"staff@labrelay.test\"]\n\n{}\n{}",
        target.toml,
        lims.config(STATUS_INSERT)
    ));

    // No customer address: uploaded, but a failed delivery, staff told, nobody else.
    let out = home.run(&["--analysis-id", "N1", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(s["status"], "failed", "{s}");
    assert!(
        s["error"].as_str().unwrap().contains("no customer e-mail"),
        "{s}"
    );
    assert!(mails_of_kind(&home, "delivery").is_empty());
    let staff = mails_of_kind(&home, "delivery-failure");
    assert_eq!(staff.len(), 1, "{:?}", home.outbox());
    assert!(staff[0].contains("staff@labrelay.test"));
    // The staff mail names the target the delivery went to: `[storage.t]` and its URL.
    let subject = labrelay::mail::parse(staff[0].as_bytes()).unwrap().subject;
    assert!(subject.contains("交付到 t (file:///"), "{subject}");
    assert!(lims.status_rows().await.is_empty());

    // What reached the target is damaged behind our back: one file deleted, one
    // changed in place (same size).
    let base = local_root(&target).join("online/N1");
    std::fs::remove_file(base.join("report.html")).unwrap();
    let fq = base.join("clean/S1/lane2/S1_R1.fq");
    let len = std::fs::metadata(&fq).unwrap().len() as usize;
    std::fs::write(&fq, "X".repeat(len)).unwrap();

    // The resume confirms each journaled file on the target and sends the two again.
    set_customer_email(&lims).await;
    let out = home.run(&["--analysis-id", "N1", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(s["status"], "delivered", "{s}");
    assert_eq!(s["files_sent"], 2, "{s}");
    assert_eq!(s["files_resumed"], expected.len() - 2, "{s}");
    for (rel, md5) in &expected {
        assert_eq!(&crate::common::md5_file(&base.join(rel)), md5, "{rel}");
    }
    assert_eq!(mails_of_kind(&home, "delivery").len(), 1);
    assert_eq!(lims.status_rows().await.len(), 1);
}

#[tokio::test]
async fn regression_a_changed_target_url_starts_a_new_delivery() {
    let first = TargetFixture::new(TargetKind::Local, "").await.unwrap();
    let second = TargetFixture::new(TargetKind::Local, "").await.unwrap();
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let home = Home::new();
    let (root, expected) = tree(&home.path().join("analysis"), 0);
    lims.add_analysis("U1", &root).await;
    clear_customer_email(&lims).await;
    let config = |t: &TargetFixture| {
        format!(
            "[delivery]\nkey_prefix = \"online\"\n\n{}\n{}",
            t.toml,
            lims.config(STATUS_INSERT)
        )
    };
    home.config(&config(&first));
    let out = home.run(&["--analysis-id", "U1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // Same section name, another place: nothing there counts as delivered.
    set_customer_email(&lims).await;
    home.config(&config(&second));
    let out = home.run(&["--analysis-id", "U1", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(s["files_sent"], expected.len(), "{s}");
    assert_eq!(s["files_resumed"], 0, "{s}");
    let base = local_root(&second).join("online/U1");
    for (rel, md5) in &expected {
        assert_eq!(&crate::common::md5_file(&base.join(rel)), md5, "{rel}");
    }
}

#[tokio::test]
async fn regression_an_extra_object_on_the_target_fails_before_the_mail() {
    let target = TargetFixture::new(TargetKind::Local, "").await.unwrap();
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let home = Home::new();
    let (root, _) = tree(&home.path().join("analysis"), 0);
    lims.add_analysis("E1", &root).await;
    home.config(&format!(
        "[delivery]\nkey_prefix = \"online\"\n\n{}\n{}",
        target.toml,
        lims.config(STATUS_INSERT)
    ));
    let stray = local_root(&target).join("online/E1/old/stale.txt");
    std::fs::create_dir_all(stray.parent().unwrap()).unwrap();
    std::fs::write(&stray, "from another delivery").unwrap();
    let out = home.run(&["--analysis-id", "E1", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let s = summary(&out);
    let error = s["error"].as_str().unwrap();
    assert!(
        error.contains("not part of this delivery") && error.contains("online/E1/old/stale.txt"),
        "{error}"
    );
    assert!(mails_of_kind(&home, "delivery").is_empty());
    assert!(lims.status_rows().await.is_empty());
}

#[tokio::test]
async fn regression_symlinks_out_of_the_folder_stop_the_delivery_before_any_byte_moves() {
    let target = TargetFixture::new(TargetKind::Local, "").await.unwrap();
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let home = Home::new();
    let root = home.path().join("analysis/upload");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("ok.txt"), "ok").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("passwd")).unwrap();
    std::os::unix::fs::symlink("/etc/ssh", root.join("ssh")).unwrap();
    lims.add_analysis("S1", &root).await;
    home.config(&format!("{}\n{}", target.toml, lims.config(STATUS_INSERT)));
    let out = home.run(&["--analysis-id", "S1", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let problems: Vec<serde_json::Value> = records(&out)
        .into_iter()
        .filter(|r| r["type"] == "problem")
        .collect();
    let text = format!("{problems:?}");
    assert_eq!(problems.len(), 2, "{text}");
    assert!(
        text.contains("/etc/passwd") && text.contains("upload/passwd"),
        "{text}"
    );
    assert!(
        text.contains("/etc/ssh") && text.contains("outside the analysis folder"),
        "{text}"
    );
    assert!(
        target.storage.list("").await.unwrap().is_empty(),
        "nothing may be uploaded"
    );

    // A folder outside [delivery] data_roots is refused as a whole.
    let elsewhere = test_support::tempdir();
    std::fs::write(elsewhere.path().join("f.txt"), "f").unwrap();
    lims.add_analysis("S2", elsewhere.path()).await;
    let out = home.run(&["--analysis-id", "S2"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("data_roots"), "{}", stderr(&out));
    assert!(target.storage.list("").await.unwrap().is_empty());
}

#[tokio::test]
async fn regression_bad_status_sql_is_a_configuration_error_before_any_upload() {
    let target = TargetFixture::new(TargetKind::Local, "").await.unwrap();
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let home = Home::new();
    let (root, _) = tree(&home.path().join("analysis"), 0);
    lims.add_analysis("C1", &root).await;
    home.config(&format!(
        "{}\n{}",
        target.toml,
        lims.config("INSERT INTO t_microbe_delivery (plan_code) VALUES (:analysis_idd)")
    ));
    let out = home.run(&["--analysis-id", "C1"]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("delivery.status.on_delivered") && err.contains(":analysis_idd"),
        "{err}"
    );
    assert_eq!(
        err.matches(":analysis_idd").count(),
        1,
        "printed once: {err}"
    );
    assert!(target.storage.list("").await.unwrap().is_empty());
}

#[tokio::test]
async fn regression_ids_that_would_nest_deliveries_are_refused() {
    let target = TargetFixture::new(TargetKind::Local, "").await.unwrap();
    let home = Home::new();
    home.config(&target.toml);
    for id in ["A/B", "..", "a b", &"x".repeat(129)] {
        let out = home.run(&["--analysis-id", id]);
        assert_eq!(out.status.code(), Some(2), "{id}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("not a valid analysis id"),
            "{}",
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn regression_an_sftp_target_without_customer_access_is_a_configuration_error() {
    let Some(target) = TargetFixture::new(TargetKind::Sftp, "").await else {
        return;
    };
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let home = Home::new();
    let (root, _) = tree(&home.path().join("analysis"), 0);
    lims.add_analysis("P1", &root).await;
    home.config(&format!("{}\n{}", target.toml, lims.config(STATUS_INSERT)));
    let out = home.run(&["--analysis-id", "P1"]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("[delivery.access"),
        "{}",
        stderr(&out)
    );
    assert!(target.storage.list("").await.unwrap().is_empty());
    assert!(home.outbox().is_empty());
    target.cleanup().await;
}

#[tokio::test]
async fn links_prints_the_current_links_until_the_recorded_expiry() {
    let Some(target) = TargetFixture::new(TargetKind::S3, "").await else {
        return;
    };
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let home = Home::new();
    let (root, expected) = tree(&home.path().join("analysis"), 0);
    lims.add_analysis("L1", &root).await;
    home.config(&format!("{}\n{}", target.toml, lims.config(STATUS_INSERT)));
    let out = home.run(&["--analysis-id", "L1", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let delivered = summary(&out);
    assert_eq!(delivered["access"], "presigned", "{delivered}");
    // Keys and places as they really are: the bucket key with the URL's prefix, a URL.
    let url = delivered["target_url"].as_str().unwrap();
    let prefix = delivered["key_prefix"].as_str().unwrap();
    assert!(
        url.starts_with("s3://") && !url.contains(" at "),
        "{delivered}"
    );
    assert!(prefix.ends_with("/L1") && prefix != "L1", "{delivered}");
    assert_eq!(delivered["location"], format!("{url}/L1"), "{delivered}");
    assert_eq!(
        delivered["md5sum_key"],
        format!("{prefix}/md5sum.txt"),
        "{delivered}"
    );
    for r in records(&out).iter().filter(|r| r["type"] == "file") {
        let key = r["key"].as_str().unwrap();
        assert_eq!(
            key,
            format!("{prefix}/{}", r["rel"].as_str().unwrap()),
            "{r}"
        );
        // The object is really there under that key in the bucket.
        assert!(
            url.ends_with(&format!("/{}", prefix.rsplit_once('/').unwrap().0)),
            "{url} {prefix}"
        );
    }

    let out = home.run(&["links", "--analysis-id", "L1", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let recs = records(&out);
    let links: Vec<&serde_json::Value> = recs.iter().filter(|r| r["type"] == "link").collect();
    // Every delivered file.
    assert_eq!(links.len(), expected.len(), "{recs:?}");
    let s = summary(&out);
    assert_eq!(s["expires_at"], delivered["expires_at"], "{s}");
    // A link works: the object comes back with its content.
    let link = links.iter().find(|l| l["rel"] == "report.html").unwrap();
    let got = std::process::Command::new("curl")
        .args(["-sf", link["url"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(got.status.success(), "{got:?}");
    assert_eq!(
        String::from_utf8_lossy(&got.stdout),
        std::fs::read_to_string(root.join("report.html")).unwrap()
    );
    target.cleanup().await;
}

/// `%E6%8A%A5` → the bytes, as UTF-8 (the request paths of the keys).
fn percent_decoded(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = path
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An S3 endpoint that answers HEAD (the bucket check) and cuts every other request off
/// after reading its headers: a server that keeps failing temporarily. It records each
/// request's method and path.
/// The requests an endpoint saw: method and decoded path.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

fn failing_s3_endpoint() -> (u16, Seen) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&seen);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).unwrap_or(0) == 0 {
                continue;
            }
            // The rest of the head.
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 2 {
                line.clear();
            }
            let mut words = request.split_whitespace();
            let method = words.next().unwrap_or_default().to_owned();
            let path = percent_decoded(words.next().unwrap_or_default());
            log.lock().unwrap().push((method.clone(), path));
            if method == "HEAD" {
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
            // Anything else: the connection closes without an answer.
        }
    });
    (port, seen)
}

#[tokio::test]
async fn regression_a_failing_upload_is_sent_attempts_times_not_attempts_squared() {
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let home = Home::new();
    let (root, expected) = tree(&home.path().join("analysis"), 0);
    lims.add_analysis("R1", &root).await;
    let (port, seen) = failing_s3_endpoint();
    home.config(&format!(
        "[delivery]\nkey_prefix = \"online\"\n\n\
         [retry]\nattempts = 3\nbase_delay_ms = 1\nmax_delay_ms = 5\n\n\
         [storage.flaky]\nurl = \"s3://bucket/p\"\nendpoint = \"http://127.0.0.1:{port}\"\n\
         region = \"r\"\npath_style = true\nallow_http = true\naccess_key_id = \"k\"\n\
         secret_access_key = \"s\"\ntimeout_secs = 5\n\n{}",
        lims.config(STATUS_INSERT)
    ));
    let out = home.run(&["--analysis-id", "R1", "--json"]);
    // Every file failed temporarily: run again later.
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    let puts: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(m, _)| m == "PUT")
        .map(|(_, p)| p.clone())
        .collect();
    // Each file was sent exactly `attempts` times: the storage client retried its PUT,
    // and the upload of the file did not retry the given-up error once more (before the
    // one retry layer: 4 PUTs inside the request times 3 attempts per file).
    for (rel, _) in &expected {
        let sent = puts
            .iter()
            .filter(|p| p.ends_with(&format!("/{rel}")))
            .count();
        assert_eq!(sent, 3, "{rel}: {puts:?}");
    }
    assert_eq!(puts.len(), 3 * expected.len(), "{puts:?}");
    lims.cleanup().await;
}

#[tokio::test]
async fn regression_status_times_fit_a_strict_mariadb_datetime_column() {
    let target = TargetFixture::new(TargetKind::Local, "").await.unwrap();
    let Some(lims) = Lims::new(LimsKind::Mariadb).await else {
        return;
    };
    let db = lims.db().await;
    // Strict mode (MariaDB's default) refuses a value a DATETIME cannot hold, such as an
    // RFC 3339 string with `T` and an offset, instead of storing zeros.
    let mode: String = sqlx::Row::get(
        &sqlx::query("SELECT @@SESSION.sql_mode")
            .fetch_one(db.pool())
            .await
            .unwrap(),
        0,
    );
    assert!(mode.contains("STRICT_TRANS_TABLES"), "{mode}");
    sqlx::query(
        "CREATE TABLE t_delivery_time (plan_code VARCHAR(255) NOT NULL, \
         delivered DATETIME NOT NULL)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let home = Home::new();
    let (root, _) = tree(&home.path().join("analysis"), 0);
    lims.add_analysis("T1", &root).await;
    home.config(&format!(
        "[delivery]\nkey_prefix = \"online\"\n\n{}\n{}",
        target.toml,
        lims.config(
            "INSERT INTO t_delivery_time (plan_code, delivered) VALUES (:analysis_id, :delivered_at)"
        )
    ));
    let out = home.run(&["--analysis-id", "T1", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let row = sqlx::query(
        "SELECT plan_code, delivered > NOW() - INTERVAL 1 DAY AND delivered < NOW() + INTERVAL 1 DAY \
         FROM t_delivery_time",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(labrelay::db::text(&row, 0).unwrap(), "T1");
    let recent: i64 = sqlx::Row::get(&row, 1);
    assert_eq!(recent, 1, "the delivery time was stored as a real date");
    db.close().await;
    lims.cleanup().await;
}

#[tokio::test]
async fn regression_a_relative_analysis_path_in_the_lims_is_refused_naming_it() {
    let target = TargetFixture::new(TargetKind::Local, "").await.unwrap();
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let home = Home::new();
    lims.add_analysis("P1", std::path::Path::new("data/P1"))
        .await;
    home.config(&format!(
        "[delivery]\nkey_prefix = \"online\"\n\n{}\n{}",
        target.toml,
        lims.config(STATUS_INSERT)
    ));
    let out = home.run(&["--analysis-id", "P1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("relative analysis_path \"data/P1\"") && err.contains("must be absolute"),
        "{err}"
    );
}

#[tokio::test]
async fn an_analysis_being_delivered_elsewhere_is_a_temporary_failure_naming_the_holder() {
    let target = TargetFixture::new(TargetKind::Local, "").await.unwrap();
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let home = Home::new();
    let (root, _) = tree(&home.path().join("analysis"), 0);
    lims.add_analysis("L1", &root).await;
    home.config(&format!(
        "[delivery]\nkey_prefix = \"online\"\n\n{}\n{}",
        target.toml,
        lims.config(STATUS_INSERT)
    ));
    // Another process (this test) delivers L1 right now.
    let held = labrelay::lock::InstanceLock::acquire(&home.data_dir(), "delivery-L1").unwrap();
    let out = home.run(&["--analysis-id", "L1"]);
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("analysis L1 is being delivered by another process")
            && err.contains(&format!("(pid {}", std::process::id())),
        "{err}"
    );
    drop(held);
    let out = home.run(&["--analysis-id", "L1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // A file whose name is not UTF-8 is delivered under a readable name, and said so.
    assert!(
        stderr(&out).contains("is not a UTF-8 name (decoded as GB18030"),
        "{}",
        stderr(&out)
    );
}
