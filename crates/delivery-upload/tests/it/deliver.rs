//! End-to-end deliveries by the binary: the same tree (nested folders, a symlink, a
//! 0-byte file, a non-UTF-8 name, a 200 MiB file) to a local directory, Garage (S3) and
//! OpenSSH (SFTP), with the LIMS on SQLite, PostgreSQL and MariaDB; and the failures
//! that must stop a delivery before any byte moves.

use labrelay::storage::ObjectStorage;
use sqlx::Row;

use crate::common::Lims;
use crate::common::{
    Home, LimsKind, STATUS_INSERT, TargetFixture, TargetKind, records, stderr, summary, tree,
};

const BIG_MIB: usize = 200;

async fn deliver_tree(lims_kind: LimsKind, kind: TargetKind) {
    let Some(target) = TargetFixture::new(kind, "").await else {
        return;
    };
    let Some(lims) = Lims::new(lims_kind).await else {
        return;
    };
    let home = Home::new();
    let id = format!("A{}", std::process::id());
    let (root, expected) = tree(&home.path().join("analysis"), BIG_MIB);
    lims.add_analysis(&id, &root).await;
    // With a LIMS on a server, labrelay's own state lives there too (state tables on
    // PostgreSQL and MariaDB); with SQLite it stays in the data dir.
    let state_in_lims = lims_kind != LimsKind::Sqlite;
    // Our SFTP server has no account command here: customers use their own logins.
    let access = if kind == TargetKind::Sftp {
        "[delivery.access]\nmethods = { t = \"none\" }\n"
    } else {
        ""
    };
    home.config(&format!(
        "{}[delivery]\ntarget = \"t\"\nkey_prefix = \"online\"\n\n{access}\n{}\n{}",
        if state_in_lims {
            "[state]\ndatabase = \"lims\"\n\n"
        } else {
            ""
        },
        target.toml,
        lims.config(STATUS_INSERT)
    ));

    let out = home.run(&["--analysis-id", &id, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(s["status"], "delivered", "{s}");
    assert_eq!(s["files"], expected.len());
    let part_count = if kind == TargetKind::S3 { 25 } else { 0 };
    assert_eq!(s["parts_sent"], part_count, "{s}");
    let files: Vec<_> = records(&out)
        .into_iter()
        .filter(|r| r["type"] == "file")
        .collect();
    assert_eq!(files.len(), expected.len());

    // Every file is there with the right content, and md5sum.txt lists them all.
    let prefix = format!("online/{id}");
    let got = target.contents(&prefix).await;
    let mut want: Vec<String> = expected
        .iter()
        .map(|(k, _)| format!("{prefix}/{k}"))
        .collect();
    want.push(format!("{prefix}/md5sum.txt"));
    want.sort();
    let keys: Vec<String> = got.iter().map(|(k, _, _)| k.clone()).collect();
    assert_eq!(keys, want);
    for (rel, md5) in &expected {
        let (_, _, got_md5) = got
            .iter()
            .find(|(k, _, _)| k == &format!("{prefix}/{rel}"))
            .unwrap();
        assert_eq!(got_md5, md5, "{rel}");
    }
    let md5sum = target
        .storage
        .get_bytes(&format!("{prefix}/md5sum.txt"))
        .await
        .unwrap();
    let want_md5sum: String = expected
        .iter()
        .flat_map(|(k, m)| [m.as_str(), "  ", k.as_str(), "\n"])
        .collect();
    assert_eq!(String::from_utf8(md5sum.to_vec()).unwrap(), want_md5sum);

    // The customer was mailed with staff in Cc; the LIMS and the state know.
    let mails = home.outbox();
    assert_eq!(mails.len(), 1);
    assert!(
        mails[0].contains("To: customer@labrelay.test"),
        "{}",
        mails[0]
    );
    assert!(mails[0].contains("analyst@labrelay.test"), "{}", mails[0]);
    assert_eq!(
        lims.status_rows().await,
        [(id.clone(), "delivered".to_owned())]
    );
    let state = if state_in_lims {
        lims.db().await
    } else {
        home.state().await
    };
    let row = sqlx::query("SELECT status, files FROM delivery_runs")
        .fetch_one(state.pool())
        .await
        .unwrap();
    assert_eq!(labrelay::db::text(&row, 0).unwrap(), "delivered");
    assert_eq!(row.try_get::<i64, _>(1).unwrap(), expected.len() as i64);

    // A second run is a no-op.
    let out = home.run(&["--analysis-id", &id, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(summary(&out)["status"], "already_delivered");
    assert_eq!(home.outbox().len(), 1);
    assert_eq!(lims.status_rows().await.len(), 1);

    target.cleanup().await;
    lims.cleanup().await;
}

#[tokio::test]
async fn tree_to_local_dir_with_sqlite_lims() {
    deliver_tree(LimsKind::Sqlite, TargetKind::Local).await;
}

#[tokio::test]
async fn tree_to_garage_s3_with_postgres_lims() {
    deliver_tree(LimsKind::Postgres, TargetKind::S3).await;
}

#[tokio::test]
async fn tree_to_sftp_with_mariadb_lims() {
    deliver_tree(LimsKind::Mariadb, TargetKind::Sftp).await;
}

#[tokio::test]
async fn broken_symlink_is_reported_before_any_upload() {
    let target = TargetFixture::new(TargetKind::Local, "").await.unwrap();
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let home = Home::new();
    let (root, _) = tree(&home.path().join("analysis"), 0);
    std::os::unix::fs::symlink(
        home.path().join("gone.fq.gz"),
        root.join("clean/gone.fq.gz"),
    )
    .unwrap();
    lims.add_analysis("B1", &root).await;
    home.config(&format!("{}\n{}", target.toml, lims.config(STATUS_INSERT)));

    let out = home.run(&["--analysis-id", "B1", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("gone.fq.gz") && err.contains("broken symbolic link"),
        "{err}"
    );
    let problems: Vec<_> = records(&out)
        .into_iter()
        .filter(|r| r["type"] == "problem")
        .collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(summary(&out)["status"], "failed");
    // Nothing moved, the customer was not mailed, staff were told, the failure is
    // recorded.
    assert!(target.storage.list("").await.unwrap().is_empty());
    let mails = home.outbox();
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert!(
        mails[0].contains("X-Labrelay-Mail: delivery-failure") && mails[0].contains("gone.fq.gz"),
        "{}",
        mails[0]
    );
    let state = home.state().await;
    let row = sqlx::query("SELECT status, error FROM delivery_runs")
        .fetch_one(state.pool())
        .await
        .unwrap();
    assert_eq!(labrelay::db::text(&row, 0).unwrap(), "failed");
    assert!(
        labrelay::db::text(&row, 1)
            .unwrap()
            .contains("cannot be delivered")
    );
    assert!(lims.status_rows().await.is_empty());
}

#[tokio::test]
async fn unknown_analysis_and_missing_folder_are_recorded_failures() {
    let target = TargetFixture::new(TargetKind::Local, "").await.unwrap();
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let home = Home::new();
    lims.add_analysis("GONE", &home.path().join("no/such/folder"))
        .await;
    home.config(&format!("{}\n{}", target.toml, lims.config(STATUS_INSERT)));

    let out = home.run(&["--analysis-id", "NOPE"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("analysis NOPE not found"),
        "{}",
        stderr(&out)
    );
    let out = home.run(&["--analysis-id", "GONE"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no/such/folder"), "{}", stderr(&out));

    let state = home.state().await;
    let rows = sqlx::query("SELECT analysis_id, status FROM delivery_runs ORDER BY analysis_id")
        .fetch_all(state.pool())
        .await
        .unwrap();
    let rows: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                labrelay::db::text(r, 0).unwrap(),
                labrelay::db::text(r, 1).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("GONE".into(), "failed".into()),
            ("NOPE".into(), "failed".into())
        ]
    );
}

#[tokio::test]
async fn dry_run_changes_nothing() {
    let target = TargetFixture::new(TargetKind::Local, "").await.unwrap();
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let home = Home::new();
    let (root, expected) = tree(&home.path().join("analysis"), 0);
    lims.add_analysis("D1", &root).await;
    home.config(&format!("{}\n{}", target.toml, lims.config(STATUS_INSERT)));
    let out = home.run(&["--analysis-id", "D1", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), expected.len() + 1, "{text}");
    assert!(text.contains("dry run: would deliver 5 files"), "{text}");
    assert!(target.storage.list("").await.unwrap().is_empty());
    assert!(home.outbox().is_empty());
    assert!(lims.status_rows().await.is_empty());
}

#[tokio::test]
async fn vendor_command_target_gets_the_folder_md5sum_and_an_account() {
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let home = Home::new();
    let (root, expected) = tree(&home.path().join("analysis"), 0);
    lims.add_analysis("V1", &root).await;
    let dest = home.path().join("vendor-platform");
    std::fs::create_dir_all(&dest).unwrap();
    let d = dest.display();
    home.config(&format!(
        r#"[delivery]
target = "bo"
key_prefix = "online"

[delivery.vendors.bo.steps]
mkdir = ["mkdir", "-p", "{d}/{{project}}/{{remote_dir}}"]
upload = ["cp", "-RL", "{{local_dir}}/.", "{d}/{{project}}/{{remote_dir}}"]
upload_file = ["cp", "{{local_file}}", "{d}/{{project}}/{{remote_dir}}/{{file_name}}"]
create_user = ["touch", "{d}/account-{{user}}-{{days}}"]

{}"#,
        lims.config(STATUS_INSERT)
    ));
    let out = home.run(&["--analysis-id", "V1", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(s["status"], "delivered", "{s}");
    assert_eq!(s["account"], "customer", "{s}");
    assert!(dest.join("account-customer-30").exists());
    let delivered = dest.join("V3fmjM/online/V1");
    let md5sum = std::fs::read_to_string(delivered.join("md5sum.txt")).unwrap();
    let want: String = expected
        .iter()
        .flat_map(|(k, m)| [m.as_str(), "  ", k.as_str(), "\n"])
        .collect();
    assert_eq!(md5sum, want);
    assert!(delivered.join("clean/S1/lane2/S1_R1.fq").exists());
    assert_eq!(home.outbox().len(), 1);
    assert_eq!(
        lims.status_rows().await,
        [("V1".to_owned(), "delivered".to_owned())]
    );
}

/// A password from the LIMS (`customer_password`) is used for the account instead of
/// a generated one; it reaches the account command (in its environment) and the
/// customer's mail, and nothing else: not stdout, stderr or the state database.
#[tokio::test]
async fn lims_password_is_used_for_the_account_and_shown_only_to_the_customer() {
    const PASSWORD: &str = "Lims-Pass-9x7Q";
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let home = Home::new();
    let (root, _) = tree(&home.path().join("analysis"), 0);
    lims.add_analysis("P1", &root).await;
    let dest = home.path().join("vendor-platform");
    std::fs::create_dir_all(&dest).unwrap();
    let d = dest.display();
    let lims_toml = lims.config(STATUS_INSERT).replace(
        "p.info_email\n",
        &format!("p.info_email, '{PASSWORD}' AS customer_password\n"),
    );
    assert!(lims_toml.contains("customer_password"), "{lims_toml}");
    home.config(&format!(
        r#"[delivery]
target = "bo"

[delivery.vendors.bo.steps]
mkdir = ["mkdir", "-p", "{d}/{{project}}/{{remote_dir}}"]
upload = ["cp", "-RL", "{{local_dir}}/.", "{d}/{{project}}/{{remote_dir}}"]
upload_file = ["cp", "{{local_file}}", "{d}/{{project}}/{{remote_dir}}/{{file_name}}"]
create_user = ["sh", "-c", "printf %s \"$LABRELAY_VENDOR_PASSWORD\" > {d}/password-of-{{user}}"]

{lims_toml}"#
    ));
    let out = home.run(&["--analysis-id", "P1", "--json", "-vv"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(summary(&out)["account"], "customer");
    assert_eq!(
        std::fs::read_to_string(dest.join("password-of-customer")).unwrap(),
        PASSWORD
    );
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(!printed.contains(PASSWORD), "password printed:\n{printed}");
    // The database file and its WAL / journal, whatever was checkpointed.
    for entry in std::fs::read_dir(home.data_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("state.db")
        {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes
                    .windows(PASSWORD.len())
                    .any(|w| w == PASSWORD.as_bytes()),
                "password stored in {}",
                path.display()
            );
        }
    }
    let outbox = home.outbox();
    assert_eq!(outbox.len(), 1);
    let mail = labrelay::mail::parse(outbox[0].as_bytes()).unwrap();
    assert!(
        mail.text.as_deref().unwrap_or_default().contains(PASSWORD),
        "{:?}",
        mail.text
    );
}

#[tokio::test]
async fn renew_reissues_the_links_of_an_s3_delivery() {
    let Some(target) = TargetFixture::new(TargetKind::S3, "").await else {
        return;
    };
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let home = Home::new();
    let (root, expected) = tree(&home.path().join("analysis"), 0);
    lims.add_analysis("R1", &root).await;
    home.config(&format!(
        "[delivery.access]\nexpiry_days = 2\n\n{}\n{}",
        target.toml,
        lims.config(STATUS_INSERT)
    ));
    let out = home.run(&["renew", "--analysis-id", "R1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no finished delivery"),
        "{}",
        stderr(&out)
    );

    let out = home.run(&["--analysis-id", "R1", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let first = summary(&out);
    assert!(first["expires_at"].is_string(), "{first}");

    let out = home.run(&["renew", "--analysis-id", "R1", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(s["status"], "renewed", "{s}");
    assert_eq!(s["links"], expected.len() + 1, "{s}");
    assert!(s["expires_at"].as_str().unwrap() >= first["expires_at"].as_str().unwrap());
    assert_eq!(home.outbox().len(), 2);
    target.cleanup().await;
}
