//! Several `delivery-upload` processes started at the same moment on a fresh SQLite
//! state database: each migrates it, and none may die of the race
//! (`UNIQUE constraint failed: _sqlx_migrations.version`, the reported bug).

use std::process::Stdio;

use sqlx::Row;

use crate::common::Home;

const PROCESSES: usize = 6;

#[tokio::test]
async fn regression_processes_started_together_on_a_fresh_state_database_all_succeed() {
    // A few fresh homes: without the migration lock one race is lost only most of the time.
    for round in 0..3 {
        let home = Home::new();
        home.config(&format!(
            "[storage.local]\nurl = \"{}\"\n\n[delivery]\ntarget = \"local\"\n",
            home.path().join("delivered").display()
        ));
        assert!(!home.data_dir().join("state.db").exists());
        // All spawned before any is waited for: they start within a few milliseconds.
        let children: Vec<_> = (0..PROCESSES)
            .map(|i| {
                home.command(&["request", "--analysis-id", &format!("R{i}"), "--json"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut failures = Vec::new();
        for child in children {
            let out = child.wait_with_output().unwrap();
            let records = crate::common::records(&out);
            if out.status.code() != Some(0)
                || records.first().map(|r| &r["type"]) != Some(&"request".into())
            {
                failures.push(format!(
                    "exit {:?}: {}",
                    out.status.code(),
                    crate::common::stderr(&out)
                ));
            }
        }
        assert!(failures.is_empty(), "round {round}: {failures:#?}");

        // The schema was migrated once: every migration recorded once, successfully.
        let state = home.state().await;
        let row = sqlx::query(
            "SELECT COUNT(*), COUNT(DISTINCT version), SUM(CASE WHEN success THEN 1 ELSE 0 END) \
             FROM _sqlx_migrations",
        )
        .fetch_one(state.pool())
        .await
        .unwrap();
        let (rows, versions, done): (i64, i64, i64) = (
            row.try_get(0).unwrap(),
            row.try_get(1).unwrap(),
            row.try_get(2).unwrap(),
        );
        assert!(rows > 0);
        assert_eq!((versions, done), (rows, rows));
        state.close().await;
    }
}
