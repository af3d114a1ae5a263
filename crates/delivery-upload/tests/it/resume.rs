//! Resume after a crash: `kill -9` during a multipart upload to Garage, then a re-run
//! that sends only the parts the journal does not have, completes the same upload, and
//! delivers identical bytes.

use std::time::{Duration, Instant};

use labrelay::storage::ObjectStorage;
use sqlx::Row;

use crate::common::{
    Home, Lims, LimsKind, STATUS_INSERT, TargetFixture, TargetKind, md5_file, records, stderr,
    summary, tree,
};

/// Parts of the 200 MiB file at 8 MiB.
const PARTS: u64 = 25;

async fn journaled_parts(home: &Home) -> Option<u64> {
    if !home.data_dir().join("state.db").exists() {
        return None;
    }
    let db = home.state().await;
    let n = sqlx::query("SELECT COUNT(*) FROM delivery_parts")
        .fetch_one(db.pool())
        .await
        .ok()
        .map(|r| r.try_get::<i64, _>(0).unwrap() as u64);
    db.close().await;
    n
}

#[tokio::test]
async fn kill_9_during_multipart_then_rerun_sends_only_missing_parts() {
    // One part at a time, so the kill lands in the middle of the big file.
    let Some(target) =
        TargetFixture::new(TargetKind::S3, "part_size_mib = 8\npart_concurrency = 1\n").await
    else {
        return;
    };
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    let home = Home::new();
    let (root, expected) = tree(&home.path().join("analysis"), 200);
    lims.add_analysis("K1", &root).await;
    home.config(&format!(
        "[delivery]\nkey_prefix = \"online\"\n\n{}\n{}",
        target.toml,
        lims.config(STATUS_INSERT)
    ));

    let mut child = home
        .command(&["--analysis-id", "K1", "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if journaled_parts(&home).await.unwrap_or(0) >= 3 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the upload finished before it could be killed"
        );
        assert!(
            started.elapsed() < Duration::from_mins(2),
            "no part was journaled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL: no cleanup, no abort of the multipart upload
    child.wait().unwrap();
    let journaled = journaled_parts(&home).await.unwrap();
    assert!(
        (3..PARTS).contains(&journaled),
        "{journaled} parts journaled"
    );
    eprintln!("killed with {journaled} of {PARTS} parts journaled");
    let big_key = "online/K1/big/reads.bin";
    assert!(
        target.storage.head(big_key).await.unwrap().is_none(),
        "an unfinished multipart upload must not be visible"
    );

    let out = home.run(&["--analysis-id", "K1", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(s["status"], "delivered", "{s}");
    assert_eq!(s["parts_resumed"], journaled, "{s}");
    assert_eq!(s["parts_sent"], PARTS - journaled, "{s}");
    let big = records(&out)
        .into_iter()
        .find(|r| r["type"] == "file" && r["rel"] == "big/reads.bin")
        .unwrap();
    assert_eq!(big["parts"], PARTS);
    assert_eq!(big["parts_sent"], PARTS - journaled);
    // Sent once, no request sent again (the retry layer's counts in the record).
    assert_eq!(big["attempts"], 1, "{big}");
    assert_eq!(big["retries"], 0, "{big}");

    // Identical bytes: the object's MD5 is the local file's, and md5sum.txt says so.
    let local_md5 = md5_file(&root.join("big/reads.bin"));
    let got = target
        .storage
        .get_into(big_key, std::io::sink())
        .await
        .unwrap();
    assert_eq!(got.md5_hex, local_md5);
    assert_eq!(got.size, 200 * 1024 * 1024);
    // rclone's X-Amz-Meta-Md5chksum on the multipart object: set when the first run
    // started the upload, kept by the resume.
    let url = target
        .storage
        .presign_get(big_key, std::time::Duration::from_mins(5))
        .await
        .unwrap()
        .unwrap();
    let head = std::process::Command::new("curl")
        .args([
            "-sf",
            "-r",
            "0-0",
            "-D",
            "-",
            "-o",
            "/dev/null",
            url.as_str(),
        ])
        .output()
        .unwrap();
    assert!(head.status.success(), "{head:?}");
    let headers = String::from_utf8_lossy(&head.stdout).to_lowercase();
    let want = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(hex::decode(&local_md5).unwrap())
    };
    assert!(
        headers.contains(&format!("x-amz-meta-md5chksum: {}", want.to_lowercase())),
        "{headers}"
    );
    let md5sum = target
        .storage
        .get_bytes("online/K1/md5sum.txt")
        .await
        .unwrap();
    let md5sum = String::from_utf8(md5sum.to_vec()).unwrap();
    assert!(
        md5sum.contains(&format!("{local_md5}  big/reads.bin\n")),
        "{md5sum}"
    );
    assert_eq!(md5sum.lines().count(), expected.len());
    // The journal of the finished upload is gone.
    let db = home.state().await;
    let open: i64 = sqlx::query("SELECT COUNT(*) FROM delivery_multipart")
        .fetch_one(db.pool())
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
    assert_eq!(open, 0);
    assert_eq!(home.outbox().len(), 1);
    target.cleanup().await;
}
