//! A small SQLite "LIMS" for `scripts/demo`: one project, one analysis (DEMO1) whose
//! result folder is created with a few sample files, and the seed's
//! `t_microbe_delivery` status table.
//!
//! Usage: `demo_lims create DB FOLDER` (creates both), `demo_lims show DB` (prints the
//! status table).
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::Context as _;
use labrelay::config::DatabaseConfig;
use labrelay::db::Db;
use labrelay::secret::RedactedUrl;
use sqlx::Row;

async fn open(db: &str) -> anyhow::Result<Db> {
    let url = RedactedUrl::parse(&format!("sqlite://{db}?mode=rwc"))?;
    Ok(Db::connect(&DatabaseConfig::from_url(url)).await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("create") => {
            let db = args.get(2).context("usage: demo_lims create DB FOLDER")?;
            let folder = PathBuf::from(args.get(3).context("usage: demo_lims create DB FOLDER")?);
            create(db, &folder).await
        }
        Some("show") => show(args.get(2).context("usage: demo_lims show DB")?).await,
        _ => anyhow::bail!("usage: demo_lims create DB FOLDER | demo_lims show DB"),
    }
}

async fn create(db: &str, folder: &std::path::Path) -> anyhow::Result<()> {
    fs_err::create_dir_all(folder.join("clean_data"))?;
    fs_err::create_dir_all(folder.join("report/figures"))?;
    fs_err::write(
        folder.join("clean_data/S1.clean.fq"),
        "@r1\nACGTACGTAC\n+\nIIIIIIIIII\n@r2\nTTGACCAGTA\n+\nIIIIIIIIII\n",
    )?;
    fs_err::write(
        folder.join("otu_table.tsv"),
        "#OTU\tS1\tS2\nOTU_1\t120\t98\nOTU_2\t7\t31\n",
    )?;
    fs_err::write(
        folder.join("report/figures/alpha.svg"),
        "<svg xmlns=\"http://www.w3.org/2000/svg\"/>\n",
    )?;
    fs_err::write(folder.join("report/EMPTY_SAMPLES.txt"), "")?;
    // Pipelines link their outputs; the delivery follows links.
    let linked = folder.join("report/summary.txt");
    if !linked.exists() {
        std::os::unix::fs::symlink("../otu_table.tsv", &linked)?;
    }

    let lims = open(db).await?;
    for stmt in [
        "CREATE TABLE IF NOT EXISTS t_project (project_id TEXT PRIMARY KEY, customer_name TEXT, \
         customer_email TEXT, action_man TEXT, sale_man TEXT, info_email TEXT)",
        "CREATE TABLE IF NOT EXISTS t_analysis (plan_code TEXT PRIMARY KEY, project_id TEXT, \
         analysis_path TEXT)",
        "CREATE TABLE IF NOT EXISTS t_microbe_delivery (plan_code TEXT, status TEXT, \
         account TEXT, path TEXT, files INTEGER, updated_at TEXT)",
        "DELETE FROM t_project",
        "DELETE FROM t_analysis",
        "INSERT INTO t_project VALUES ('V3fmjM', 'Dr. Li Wei', 'li.wei@customer.example', \
         'analyst@lab.example', 'sales@lab.example', 'info@lab.example')",
    ] {
        sqlx::query(stmt).execute(lims.pool()).await?;
    }
    sqlx::query("INSERT INTO t_analysis VALUES ('DEMO1', 'V3fmjM', ?)")
        .bind(folder.display().to_string())
        .execute(lims.pool())
        .await?;
    println!(
        "LIMS       {db}: project V3fmjM, analysis DEMO1 → {}",
        folder.display()
    );
    Ok(())
}

async fn show(db: &str) -> anyhow::Result<()> {
    let lims = open(db).await?;
    let rows = sqlx::query("SELECT plan_code, status, files, updated_at FROM t_microbe_delivery")
        .fetch_all(lims.pool())
        .await?;
    for r in rows {
        println!(
            "{}\t{}\t{} files\t{}",
            labrelay::db::text(&r, 0)?,
            labrelay::db::text(&r, 1)?,
            r.try_get::<i64, _>(2)?,
            labrelay::db::text(&r, 3)?
        );
    }
    Ok(())
}
