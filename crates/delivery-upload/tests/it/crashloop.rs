//! The crash loop: deliveries killed with SIGKILL at random points (startup, lookup,
//! upload, checksums, confirmation, mail, LIMS status, commit), each followed by a
//! re-run, until the analysis is delivered. Then every delivered tree must pass
//! `md5sum -c`, every analysis must have exactly one customer mail and one LIMS row,
//! and the target must hold nothing but the delivered files (no temporary file left in
//! a customer's folder).
//!
//! The random delays come from a seed printed at the start (`CRASHLOOP_SEED=N` repeats
//! a run).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use labrelay::storage::ObjectStorage;
use sqlx::Row;

use crate::common::{
    Home, Lims, LimsKind, TargetFixture, TargetKind, md5_file, stderr, write_random,
};

/// An idempotent status write (an upsert on the LIMS's unique plan_code), counting how
/// often it ran in `times`.
const STATUS_UPSERT: &str = "INSERT INTO t_microbe_delivery (plan_code, status, account, path, files, updated_at, times) \
     VALUES (:analysis_id, :status, :account, :path, :files, :delivered_at, 1) \
     ON CONFLICT (plan_code) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at, \
     times = t_microbe_delivery.times + 1";

/// Kills per target kind (two kinds: at least 60 in all).
const KILLS: usize = 30;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// 120 small files in 8 folders and one 12 MiB file: rel → md5.
fn crash_tree(root: &Path, seed: u64) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for i in 0..120u64 {
        let rel = format!("d{}/f{i:03}.txt", i % 8);
        let p = root.join(&rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        write_random(&p, 1024 + (i as usize * 137) % 15_000, seed ^ (i + 1));
        out.insert(rel, md5_file(&p));
    }
    let big = root.join("big/reads.bin");
    std::fs::create_dir_all(big.parent().unwrap()).unwrap();
    write_random(&big, 12 * 1024 * 1024, seed ^ 0xb16);
    out.insert("big/reads.bin".into(), md5_file(&big));
    out
}

async fn crash_loop(kind: TargetKind) {
    let Some(target) = TargetFixture::new(kind, "part_size_mib = 5\npart_concurrency = 1\n").await
    else {
        return;
    };
    let lims = Lims::new(LimsKind::Sqlite).await.unwrap();
    {
        let db = lims.db().await;
        for stmt in [
            "ALTER TABLE t_microbe_delivery ADD COLUMN times INTEGER NOT NULL DEFAULT 0",
            "CREATE UNIQUE INDEX t_microbe_delivery_plan ON t_microbe_delivery (plan_code)",
        ] {
            sqlx::query(stmt).execute(db.pool()).await.unwrap();
        }
        db.close().await;
    }
    let home = Home::new();
    home.config(&format!(
        "[delivery]\nkey_prefix = \"online\"\nparallel_files = 4\n\n{}\n{}",
        target.toml,
        lims.config(STATUS_UPSERT)
    ));
    let seed: u64 = std::env::var("CRASHLOOP_SEED").ok().map_or_else(
        || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        },
        |s| s.parse().expect("CRASHLOOP_SEED must be a number"),
    );
    eprintln!("crash loop on {kind:?}: CRASHLOOP_SEED={seed}");
    let mut rng = Rng(seed | 1);

    // How long one uninterrupted delivery takes: kills land anywhere in that span.
    let cal_root = home.path().join("analysis/CAL");
    let cal = crash_tree(&cal_root, seed);
    lims.add_analysis("CAL", &cal_root).await;
    let t0 = Instant::now();
    let out = home.run(&["--analysis-id", "CAL", "-q"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let span = t0.elapsed();
    let mut trees: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    trees.insert("CAL".into(), cal);

    let mut kills = 0usize;
    let mut runs = 1usize;
    let mut a = 0;
    while kills < KILLS {
        a += 1;
        let id = format!("K{a}");
        let root = home.path().join(format!("analysis/{id}"));
        trees.insert(id.clone(), crash_tree(&root, seed ^ (a << 32)));
        lims.add_analysis(&id, &root).await;
        // Kill until a run gets through (or enough kills), then finish it.
        loop {
            let delay = Duration::from_micros(rng.below(span.as_micros() as u64 + 1));
            let mut child = home
                .command(&["--analysis-id", &id, "-q"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            runs += 1;
            tokio::time::sleep(delay).await;
            if child.try_wait().unwrap().is_some() {
                break;
            }
            child.kill().unwrap();
            child.wait().unwrap();
            kills += 1;
            if kills >= KILLS {
                break;
            }
        }
        let out = home.run(&["--analysis-id", &id, "--json"]);
        runs += 1;
        assert_eq!(out.status.code(), Some(0), "{id}: {}", stderr(&out));
    }

    // Every tree is complete and verifies; nothing else is on the target.
    let mut expected_keys: Vec<String> = Vec::new();
    for (id, files) in &trees {
        let prefix = format!("online/{id}");
        for rel in files.keys() {
            expected_keys.push(format!("{prefix}/{rel}"));
        }
        expected_keys.push(format!("{prefix}/md5sum.txt"));
        let md5sum = String::from_utf8(
            target
                .storage
                .get_bytes(&format!("{prefix}/md5sum.txt"))
                .await
                .unwrap()
                .to_vec(),
        )
        .unwrap();
        let want: String = files
            .iter()
            .flat_map(|(rel, md5)| [md5.as_str(), "  ", rel.as_str(), "\n"])
            .collect();
        assert_eq!(md5sum, want, "{id}: md5sum.txt");
        if kind == TargetKind::Local {
            let dir = Path::new(&target.storage.describe()).join(&prefix);
            let check = std::process::Command::new("md5sum")
                .args(["-c", "--quiet", "md5sum.txt"])
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "{id}: md5sum -c: {}",
                String::from_utf8_lossy(&check.stdout)
            );
        } else {
            for (key, _, md5) in target.contents(&prefix).await {
                if let Some(rel) = key.strip_prefix(&format!("{prefix}/"))
                    && let Some(want) = files.get(rel)
                {
                    assert_eq!(&md5, want, "{key}");
                }
            }
        }
    }
    expected_keys.sort();
    let stored: Vec<String> = target
        .storage
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(
        stored, expected_keys,
        "the target holds exactly the deliveries"
    );
    if kind == TargetKind::Local {
        // Not even a hidden temporary file in a customer's folder.
        let mut leftovers = Vec::new();
        let root = Path::new(&target.storage.describe()).join("online");
        let mut stack = vec![root];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.file_name().unwrap().to_string_lossy().starts_with('.') {
                    leftovers.push(p);
                }
            }
        }
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }

    // No half-written mail left in the outbox either.
    let outbox_tmp: Vec<_> = std::fs::read_dir(home.data_dir().join("outbox"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(outbox_tmp.is_empty(), "{outbox_tmp:?}");

    // One customer mail per analysis, one LIMS row per analysis.
    let mut mails: BTreeMap<String, usize> = BTreeMap::new();
    for m in home.outbox() {
        if m.lines()
            .any(|l| l.trim_end() == "X-Labrelay-Mail: delivery")
            && let Some(id) = m
                .lines()
                .find_map(|l| l.trim_end().strip_prefix("X-Labrelay-Analysis: "))
        {
            *mails.entry(id.to_owned()).or_default() += 1;
        }
    }
    let db = lims.db().await;
    let rows = sqlx::query("SELECT plan_code, times FROM t_microbe_delivery ORDER BY plan_code")
        .fetch_all(db.pool())
        .await
        .unwrap();
    db.close().await;
    let writes: usize = rows
        .iter()
        .map(|r| r.try_get::<i64, _>(1).unwrap() as usize)
        .sum();
    eprintln!(
        "crash loop on {kind:?}: {kills} kills over {} analyses, {runs} runs (one delivery takes {span:?}); \
         customer mails {}, LIMS rows {}, LIMS status writes {writes}",
        trees.len(),
        mails.values().sum::<usize>(),
        rows.len()
    );
    for id in trees.keys() {
        assert_eq!(mails.get(id), Some(&1), "{id}: customer mails {mails:?}");
    }
    assert_eq!(rows.len(), trees.len());
    target.cleanup().await;
}

#[tokio::test]
async fn crash_loop_kill_9_local_target() {
    crash_loop(TargetKind::Local).await;
}

#[tokio::test]
async fn crash_loop_kill_9_s3_target() {
    crash_loop(TargetKind::S3).await;
}
