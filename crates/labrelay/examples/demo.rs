//! The shared crate end to end on the embedded defaults, with no server at all:
//! a delivery request goes through the SQLite queue, the worker stores the analysis
//! file in local-directory storage, records the delivery in the SQLite state database,
//! writes the customer mail to the .eml outbox, and only then acknowledges the message.
//!
//! A tour of the shared crate's API (scripts/demo now runs a real delivery instead):
//! `cargo run -p labrelay --example demo -- DATA_DIR`.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::Context as _;
use labrelay::config::Config;
use labrelay::db::Db;
use labrelay::mail::{Attachment, Mailer, OutgoingMail};
use labrelay::queue::{AnyBroker, Broker, ExchangeKind, PublishOptions, QueueSpec};
use labrelay::storage::{AnyStorage, ObjectStorage, PutOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let data_dir = PathBuf::from(std::env::args().nth(1).context("usage: demo DATA_DIR")?);
    let analysis = data_dir.join("analysis/DEMO1");
    fs_err::create_dir_all(&analysis)?;
    fs_err::create_dir_all(data_dir.join("delivered"))?;
    let sample = analysis.join("otu_table.tsv");
    fs_err::write(&sample, "#OTU\tS1\tS2\nOTU_1\t120\t98\nOTU_2\t7\t31\n")?;

    // Everything embedded: no [smtp], no [queue] url, no [state] url.
    let config = Config::from_toml(&format!(
        "[paths]\ndata_dir = {dir:?}\n[mail]\nfrom = \"Lab delivery <delivery@lab.example>\"\n\
         [storage.local]\nurl = {store:?}\n",
        dir = data_dir.display().to_string(),
        store = data_dir.join("delivered").display().to_string(),
    ))?;

    let state = Db::open_state(&config).await?;
    println!("state      {} (migrated)", state.url());

    let broker = AnyBroker::from_config(&config).await?;
    broker
        .declare_exchange("DELIVERY", ExchangeKind::Direct)
        .await?;
    broker
        .declare_queue(&QueueSpec::from_config("DELIVERY", &config.queue))
        .await?;
    broker.bind("DELIVERY", "DELIVERY", "DELIVERY").await?;
    broker
        .publish(
            "DELIVERY",
            "DELIVERY",
            br#"{"analysis_id":"DEMO1"}"#,
            &PublishOptions::new().message_id("demo-1"),
        )
        .await?;
    println!(
        "queue      published {{\"analysis_id\":\"DEMO1\"}} to DELIVERY ({})",
        config.queue_url()?
    );

    let mut consumer = broker.consume("DELIVERY", 1).await?;
    let delivery = consumer.next().await?;
    let request: serde_json::Value = serde_json::from_slice(&delivery.body)?;
    let id = request["analysis_id"]
        .as_str()
        .context("analysis_id missing")?;
    println!(
        "queue      received {} (delivery {})",
        String::from_utf8_lossy(&delivery.body),
        delivery.delivery_count
    );

    let storage = AnyStorage::open(config.storage("local")?)?;
    let key = format!("{id}/otu_table.tsv");
    let put = storage
        .put_file(&sample, &key, &PutOptions::default())
        .await?;
    let back = storage.get_bytes(&key).await?;
    anyhow::ensure!(
        back.as_ref() == fs_err::read(&sample)?.as_slice(),
        "read-back differs"
    );
    println!(
        "storage    stored {key} ({} bytes, md5 {}) and read it back",
        put.size, put.md5_hex
    );

    state.kv_set("demo.delivery", id, &put.md5_hex).await?;
    println!("state      recorded delivery of {id}");

    let mailer = Mailer::from_config(config.smtp.as_ref(), &config.outbox_dir())?;
    let mail = OutgoingMail::new("Lab delivery <delivery@lab.example>")
        .to("客户 <customer@example.org>")
        .cc("analyst@lab.example")
        .subject(format!("数据交付 / Data delivery {id}"))
        .text(format!(
            "Your analysis {id} is ready: 1 file, {} bytes.\n",
            put.size
        ))
        .html(format!("<p>Your analysis <b>{id}</b> is ready.</p>"))
        .attach(Attachment::new(
            "md5sum.txt",
            "text/plain",
            format!("{}  otu_table.tsv\n", put.md5_hex).into_bytes(),
        ));
    let sent = mailer.send(&mail).await?;
    if let Some(path) = &sent.outbox_path {
        println!("mail       wrote {}", path.display());
    }

    // Acknowledge only now that every effect is committed.
    delivery.ack().await?;
    println!(
        "queue      acknowledged; {} message(s) left",
        broker.ready_count("DELIVERY").await?
    );
    Ok(())
}
