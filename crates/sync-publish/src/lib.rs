//! `sync-publish`: keep people, research groups, org units and equipment in sync
//! between LIMS sites over a message queue (RabbitMQ, or the embedded queue).
//!
//! Capture is trigger-based: `install` adds an outbox table and triggers to each site's
//! own database ([`schema`]). `relay` publishes the outbox ([`relay`]), `consume`
//! applies the other sites' changes ([`apply`]); `bootstrap`, `reconcile` and `status`
//! are in [`ops`]. The wire format and versions are in [`event`], the configuration in
//! [`config`].

pub mod apply;
pub mod cache;
pub mod config;
pub mod event;
pub mod ops;
pub mod relay;
pub mod schema;
pub mod site;

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use labrelay::cli::{Context, GlobalArgs, ToolArgs};
use labrelay::exit::Exit;
use labrelay::queue::{AnyBroker, Broker, Delivery};
use labrelay::secret::Secret;
use serde::Serialize;

use crate::apply::{Outcome, Refused};
use crate::config::Plan;
use crate::event::Op;
use crate::relay::Publisher;
use crate::site::Site;

/// Keep LIMS sites in sync over a message queue
///
/// Captures changes of people, research groups, org units, equipment and their links in
/// each site's own database (triggers and an outbox table), publishes them signed to a
/// durable exchange, and applies the other sites' changes field by field.
#[derive(Debug, Parser)]
#[command(name = "sync-publish", version, after_help = labrelay::after_help!("\
  sync-publish install --site sdu --print
  sync-publish relay --site sdu --follow
  sync-publish consume --site wuhan
  sync-publish reconcile --site sdu --with wuhan --repair
  echo '{\"type\":\"user\",\"op\":\"save\",\"key\":\"42\"}' | sync-publish emit --site sdu"))]
pub struct Args {
    /// What to do
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub global: GlobalArgs,
}

/// The site a command acts for.
#[derive(Debug, Clone, clap::Args)]
pub struct SiteArg {
    /// This site's name, as in [sync.sites.NAME]
    #[arg(long, value_name = "NAME")]
    pub site: String,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the outbox, bookkeeping tables and capture triggers in the site's database
    Install {
        #[command(flatten)]
        #[allow(missing_docs)]
        site: SiteArg,
        /// Print the SQL instead of running it
        #[arg(long)]
        print: bool,
    },
    /// Remove the capture triggers (and with --purge the bookkeeping tables)
    Uninstall {
        #[command(flatten)]
        #[allow(missing_docs)]
        site: SiteArg,
        /// Print the SQL instead of running it
        #[arg(long)]
        print: bool,
        /// Also drop the outbox and bookkeeping tables
        #[arg(long)]
        purge: bool,
    },
    /// Record a change by hand: a JSON object {"type","op","key"[,"right_key"]} on stdin
    Emit {
        #[command(flatten)]
        #[allow(missing_docs)]
        site: SiteArg,
    },
    /// Publish the outbox to the broker (once, or --follow)
    Relay {
        #[command(flatten)]
        #[allow(missing_docs)]
        site: SiteArg,
        /// Keep relaying until SIGTERM
        #[arg(long)]
        follow: bool,
        /// With --follow: how often to look at the outbox (PostgreSQL sites are also
        /// woken by the triggers at once)
        #[arg(long, value_name = "MS", default_value_t = 100)]
        interval_ms: u64,
    },
    /// Apply the other sites' changes until SIGTERM (or --once)
    Consume {
        #[command(flatten)]
        #[allow(missing_docs)]
        site: SiteArg,
        /// Apply what is queued now, then exit (for cron)
        #[arg(long)]
        once: bool,
    },
    /// Publish a snapshot of this site's objects; changes nothing here
    Bootstrap {
        #[command(flatten)]
        #[allow(missing_docs)]
        site: SiteArg,
    },
    /// Compare this site's objects with another site's
    Reconcile {
        #[command(flatten)]
        #[allow(missing_docs)]
        site: SiteArg,
        /// The other site
        #[arg(long, value_name = "NAME")]
        with: String,
        /// Re-publish what the other site lacks or holds older
        #[arg(long)]
        repair: bool,
    },
    /// Show the outbox backlog, last applied change, parked and dead messages
    Status {
        #[command(flatten)]
        #[allow(missing_docs)]
        site: SiteArg,
    },
}

impl ToolArgs for Args {
    fn global(&self) -> &GlobalArgs {
        &self.global
    }
}

/// Run the tool.
pub async fn run(args: Args, ctx: Context) -> anyhow::Result<Exit> {
    match args.command {
        Command::Install { site, print } => install(&ctx, &site.site, print, None).await,
        Command::Uninstall { site, print, purge } => {
            install(&ctx, &site.site, print, Some(purge)).await
        }
        Command::Emit { site } => emit(&ctx, &site.site).await,
        Command::Relay {
            site,
            follow,
            interval_ms,
        } => {
            relay(
                &ctx,
                &site.site,
                follow,
                Duration::from_millis(interval_ms.max(10)),
            )
            .await
        }
        Command::Consume { site, once } => consume(&ctx, &site.site, once).await,
        Command::Bootstrap { site } => bootstrap(&ctx, &site.site).await,
        Command::Reconcile { site, with, repair } => {
            reconcile(&ctx, &site.site, &with, repair).await
        }
        Command::Status { site } => status(&ctx, &site.site).await,
    }
}

async fn open(ctx: &Context, site: &str, check: bool) -> anyhow::Result<Site> {
    let plan = Arc::new(Plan::load(&ctx.config, site)?);
    let s = Site::connect(&ctx.config, plan).await?;
    if check {
        s.check().await?;
    }
    Ok(s)
}

/// The signing keys of every site, resolved (a missing one is a configuration error).
fn keys(plan: &Plan) -> anyhow::Result<BTreeMap<String, Secret>> {
    let mut out = BTreeMap::new();
    for (name, s) in &plan.cfg.sites {
        let key = s
            .key
            .resolve()
            .map_err(|e| labrelay::config::ConfigError::Invalid {
                key: format!("sync.sites.{name}.key"),
                message: e.to_string(),
            })?;
        if key.expose().len() < 16 {
            return Err(labrelay::config::ConfigError::Invalid {
                key: format!("sync.sites.{name}.key"),
                message: "a signing key needs at least 16 characters".into(),
            }
            .into());
        }
        out.insert(name.clone(), key);
    }
    Ok(out)
}

async fn install(
    ctx: &Context,
    site: &str,
    print: bool,
    uninstall: Option<bool>,
) -> anyhow::Result<Exit> {
    let plan = Arc::new(Plan::load(&ctx.config, site)?);
    let engine = if print {
        // --print needs no connection: the engine comes from the URL.
        let url = ctx
            .config
            .database(&plan.me().database)?
            .url
            .expose()
            .clone();
        labrelay::db::Engine::from_url(&url).ok_or_else(|| {
            labrelay::config::ConfigError::Invalid {
                key: format!("databases.{}.url", plan.me().database),
                message: "unsupported scheme".into(),
            }
        })?
    } else {
        Site::connect(&ctx.config, plan.clone()).await?.engine()
    };
    let statements = match uninstall {
        None => schema::install(engine, &plan),
        Some(purge) => schema::uninstall(engine, &plan, purge),
    };
    if print {
        for s in &statements {
            ctx.out.emit("sql", &serde_json::json!({ "sql": s }), || {
                format!("{s};\n")
            })?;
        }
        return Ok(Exit::Ok);
    }
    let s = Site::connect(&ctx.config, plan).await?;
    let mut tx = s.db.pool().begin().await.map_err(|e| s.db.err(e))?;
    for stmt in &statements {
        sqlx::raw_sql(stmt)
            .execute(&mut *tx)
            .await
            .map_err(|e| anyhow::Error::new(s.db.err(e)).context(format!("running: {stmt}")))?;
    }
    tx.commit().await.map_err(|e| s.db.err(e))?;
    if uninstall.is_none() {
        s.check().await?;
    }
    let what = if uninstall.is_some() {
        "uninstalled"
    } else {
        "installed"
    };
    ctx.out.emit(
        "install",
        &serde_json::json!({ "site": site, "action": what, "statements": statements.len() }),
        || format!("{site}: {what} ({} statements)", statements.len()),
    )?;
    Ok(Exit::Ok)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EmitInput {
    #[serde(rename = "type")]
    object_type: String,
    op: Op,
    key: serde_json::Value,
    #[serde(default)]
    right_key: Option<serde_json::Value>,
}

fn key_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

async fn emit(ctx: &Context, site: &str) -> anyhow::Result<Exit> {
    let s = open(ctx, site, true).await?;
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text)?;
    let mut n = 0;
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |m: String| labrelay::exit::usage(format!("stdin line {}: {m}", i + 1));
        let input: EmitInput = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let key =
            key_text(&input.key).ok_or_else(|| bad("key must be a string or number".into()))?;
        let right = input.right_key.as_ref().and_then(key_text);
        let is_link = s.plan.links.contains_key(&input.object_type);
        let ok = match input.op {
            Op::Save | Op::Delete => s.plan.objects.contains_key(&input.object_type),
            Op::Connect | Op::Disconnect => is_link && right.is_some(),
        };
        if !ok {
            return Err(bad(format!(
                "{}.{} is not a configured object or link operation (links need right_key)",
                input.object_type,
                input.op.as_str()
            )));
        }
        relay::emit(&s, &input.object_type, input.op, &key, right.as_deref()).await?;
        n += 1;
    }
    ctx.out.emit(
        "emit",
        &serde_json::json!({ "site": site, "recorded": n }),
        || format!("{site}: {n} change(s) recorded in the outbox"),
    )?;
    Ok(Exit::Ok)
}

async fn broker(ctx: &Context) -> anyhow::Result<AnyBroker> {
    Ok(AnyBroker::from_config(&ctx.config).await?)
}

async fn relay(
    ctx: &Context,
    site: &str,
    follow: bool,
    interval: Duration,
) -> anyhow::Result<Exit> {
    let s = open(ctx, site, true).await?;
    let keys = keys(&s.plan)?;
    let _lock = labrelay::lock::InstanceLock::acquire(
        &ctx.config.data_dir(),
        &format!("sync-relay-{site}"),
    )?;
    let broker = broker(ctx).await?;
    relay::declare_topology(&s, &broker).await?;
    let publisher = Publisher {
        broker: &broker,
        exchange: s.plan.cfg.exchange.clone(),
        site: site.to_owned(),
        key: keys[site].clone(),
    };
    let mut total = relay::RelayStats::default();
    let mut wake = if follow {
        relay::wakeup(&ctx.config, &s).await
    } else {
        labrelay::db::Wakeup::Poll
    };
    let stop = labrelay::cli::shutdown_signal();
    tokio::pin!(stop);
    loop {
        let stats = match relay::relay_pass(&s, &publisher).await {
            Ok(stats) => stats,
            // A follower outlives a broker or database outage: the changes wait in the
            // outbox, and the next pass sends them.
            Err(e) if follow && labrelay::exit::classify(&e) == Exit::TempFail => {
                tracing::warn!(
                    site,
                    "relay pass failed, trying again in {interval:?}: {e:#}"
                );
                tokio::select! {
                    () = &mut stop => break,
                    () = tokio::time::sleep(interval.max(Duration::from_secs(1))) => continue,
                }
            }
            Err(e) => return Err(e),
        };
        if stats.sent + stats.skipped + stats.unrouted > 0 {
            tracing::info!(
                site,
                sent = stats.sent,
                skipped = stats.skipped,
                unrouted = stats.unrouted,
                "relayed"
            );
        }
        total.sent += stats.sent;
        total.skipped += stats.skipped;
        total.unrouted += stats.unrouted;
        if !follow {
            break;
        }
        tokio::select! {
            () = &mut stop => break,
            _ = wake.wait(interval) => {}
        }
    }
    broker.close().await;
    ctx.out.emit("relay", &serde_json::json!({ "site": site, "sent": total.sent, "skipped": total.skipped, "unrouted": total.unrouted }), || {
        format!("{site}: {} sent, {} skipped, {} unrouted", total.sent, total.skipped, total.unrouted)
    })?;
    Ok(Exit::Ok)
}

/// Counts of one consume run.
#[derive(Debug, Default, Serialize)]
struct ConsumeStats {
    applied: u64,
    unchanged: u64,
    duplicate: u64,
    parked: u64,
    ignored: u64,
    dead: u64,
    retried: u64,
    unparked: u64,
    /// Transactions the applied messages took.
    transactions: u64,
}

async fn consume(ctx: &Context, site: &str, once: bool) -> anyhow::Result<Exit> {
    let s = open(ctx, site, true).await?;
    if !s.plan.me().consume {
        return Err(labrelay::config::ConfigError::Invalid {
            key: format!("sync.sites.{site}.consume"),
            message: "this site does not consume (consume = false)".into(),
        }
        .into());
    }
    let keys = keys(&s.plan)?;
    let _lock = labrelay::lock::InstanceLock::acquire(
        &ctx.config.data_dir(),
        &format!("sync-consume-{site}"),
    )?;
    let broker = broker(ctx).await?;
    relay::declare_topology(&s, &broker).await?;
    let mut stats = ConsumeStats {
        unparked: apply::retry_parked(&s, Vec::new()).await?,
        ..ConsumeStats::default()
    };
    let queue = s.plan.queue_name(site);
    let batch_size = s.plan.cfg.batch.clamp(1, 1000);
    let prefetch = u16::try_from(batch_size)
        .unwrap_or(1000)
        .max(ctx.config.queue.prefetch);
    let mut consumer = broker.consume(&queue, prefetch).await?;
    let stop = labrelay::cli::shutdown_signal();
    tokio::pin!(stop);
    loop {
        let first = if once {
            match consumer.next_timeout(Duration::from_millis(500)).await? {
                Some(d) => d,
                None => break,
            }
        } else {
            tokio::select! {
                () = &mut stop => break,
                d = consumer.next() => d?,
            }
        };
        // Whatever else is already waiting goes into the same transaction.
        let mut batch = vec![first];
        while batch.len() < batch_size {
            match consumer.next_timeout(Duration::from_millis(2)).await? {
                Some(d) => batch.push(d),
                None => break,
            }
        }
        handle_batch(&s, &keys, batch, &mut stats).await?;
    }
    consumer.close().await;
    broker.close().await;
    ctx.out.emit("consume", &serde_json::json!({ "site": site, "stats": &stats }), || {
        format!(
            "{site}: {} applied, {} unchanged, {} duplicate, {} parked, {} unparked, {} ignored, {} dead, {} retried",
            stats.applied, stats.unchanged, stats.duplicate, stats.parked, stats.unparked, stats.ignored, stats.dead, stats.retried
        )
    })?;
    Ok(Exit::Ok)
}

/// Check a batch of deliveries, apply the good ones in one transaction, then settle
/// them. If the transaction fails, each message is tried alone, so one bad message
/// neither blocks nor sinks the others.
async fn handle_batch(
    s: &Site,
    keys: &BTreeMap<String, Secret>,
    batch: Vec<Delivery>,
    stats: &mut ConsumeStats,
) -> anyhow::Result<()> {
    let mut good: Vec<(Delivery, event::Event)> = Vec::with_capacity(batch.len());
    for delivery in batch {
        match apply::check_delivery(s, keys, &delivery.body, &delivery.headers) {
            Ok(c)
                if !s
                    .plan
                    .accepts(s.name(), &c.event.object_type, c.event.op.as_str()) =>
            {
                stats.ignored += 1;
                delivery.ack().await?;
            }
            Ok(c) => good.push((delivery, c.event)),
            Err(Refused(reason)) => {
                tracing::warn!(site = %s.name(), reason, "refused a message; it goes to the dead-letter queue");
                apply::record_dead(s, &delivery, &reason).await?;
                stats.dead += 1;
                delivery.reject().await?;
            }
        }
    }
    if good.is_empty() {
        return Ok(());
    }
    let events: Vec<event::Event> = good.iter().map(|(_, ev)| ev.clone()).collect();
    stats.transactions += 1;
    match apply::apply_batch(s, &events, false).await {
        Ok(results) => {
            let mut created = Vec::new();
            let mut applied = Vec::with_capacity(good.len());
            for ((delivery, _), (outcome, new)) in good.into_iter().zip(results) {
                stats.count(&outcome);
                applied.push(delivery);
                created.extend(new);
            }
            // Committed: the whole batch is settled in one round trip.
            labrelay::queue::ack_all(applied).await?;
            if !created.is_empty() {
                stats.unparked += apply::retry_parked(s, created).await?;
            }
        }
        Err(err) if good.len() == 1 => {
            let (delivery, ev) = good.remove(0);
            give_up_or_retry(s, delivery, &ev, &err, stats).await?;
        }
        Err(err) => {
            tracing::warn!(
                site = %s.name(),
                "applying {} messages together failed, applying them one by one: {err:#}",
                good.len()
            );
            for (delivery, ev) in good {
                match apply::apply(s, &ev, false).await {
                    Ok((outcome, created)) => {
                        stats.count(&outcome);
                        delivery.ack().await?;
                        if let Some(c) = created {
                            stats.unparked += apply::retry_parked(s, vec![c]).await?;
                        }
                    }
                    Err(err) => give_up_or_retry(s, delivery, &ev, &err, stats).await?,
                }
            }
        }
    }
    Ok(())
}

impl ConsumeStats {
    fn count(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Applied => self.applied += 1,
            Outcome::Unchanged => self.unchanged += 1,
            Outcome::Duplicate => self.duplicate += 1,
            Outcome::Parked => self.parked += 1,
        }
    }
}

/// A message that failed to apply: dead-lettered with the reason when it can never
/// apply or failed `max_failures` times, else requeued.
async fn give_up_or_retry(
    s: &Site,
    delivery: Delivery,
    ev: &event::Event,
    err: &anyhow::Error,
    stats: &mut ConsumeStats,
) -> anyhow::Result<()> {
    let permanent = err.chain().any(|c| c.downcast_ref::<Refused>().is_some());
    let reason = labrelay::secret::scrub(&format!("{err:#}")).into_owned();
    if permanent || delivery.delivery_count >= s.plan.cfg.max_failures {
        tracing::warn!(site = %s.name(), event = %ev.id, reason, "giving up on a change; it goes to the dead-letter queue");
        apply::record_dead(s, &delivery, &reason).await?;
        stats.dead += 1;
        delivery.reject().await?;
    } else {
        tracing::warn!(site = %s.name(), event = %ev.id, attempt = delivery.delivery_count, reason, "applying a change failed; it comes again");
        stats.retried += 1;
        delivery.nack_requeue().await?;
    }
    Ok(())
}

async fn bootstrap(ctx: &Context, site: &str) -> anyhow::Result<Exit> {
    let s = open(ctx, site, true).await?;
    let keys = keys(&s.plan)?;
    let broker = broker(ctx).await?;
    relay::declare_topology(&s, &broker).await?;
    let publisher = Publisher {
        broker: &broker,
        exchange: s.plan.cfg.exchange.clone(),
        site: site.to_owned(),
        key: keys[site].clone(),
    };
    let stats = ops::bootstrap(&s, &publisher).await?;
    broker.close().await;
    ctx.out.emit("bootstrap", &serde_json::json!({ "site": site, "published": &stats.published, "unrouted": stats.unrouted }), || {
        let parts: Vec<String> = stats.published.iter().map(|(t, n)| format!("{n} {t}")).collect();
        format!("{site}: published {} ({} unrouted)", parts.join(", "), stats.unrouted)
    })?;
    Ok(Exit::Ok)
}

async fn reconcile(ctx: &Context, site: &str, with: &str, repair: bool) -> anyhow::Result<Exit> {
    if site == with {
        return Err(labrelay::exit::usage("--with must name another site"));
    }
    let s = open(ctx, site, true).await?;
    let other_plan = Site::plan_for(&s.plan, with)?;
    let other = Site::connect(&ctx.config, other_plan).await?;
    other.check().await?;
    let keys = keys(&s.plan)?;
    let broker = if repair {
        Some(broker(ctx).await?)
    } else {
        None
    };
    if let Some(b) = &broker {
        relay::declare_topology(&s, b).await?;
    }
    let publisher = broker.as_ref().map(|b| Publisher {
        broker: b,
        exchange: s.plan.cfg.exchange.clone(),
        site: site.to_owned(),
        key: keys[site].clone(),
    });
    let findings = ops::reconcile(&s, &other, publisher.as_ref()).await?;
    if let Some(b) = &broker {
        b.close().await;
    }
    for f in &findings {
        ctx.out.emit("difference", f, || {
            format!(
                "{} {} {}{}{}",
                f.object_type,
                f.uuid,
                f.kind,
                if f.fields.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", f.fields.join(", "))
                },
                if f.repaired { ", re-published" } else { "" }
            )
        })?;
    }
    ctx.out.text(format!(
        "{site} vs {with}: {} difference(s)",
        findings.len()
    ))?;
    let open_findings = findings.iter().any(|f| !f.repaired);
    Ok(if open_findings {
        Exit::Failed
    } else {
        Exit::Ok
    })
}

async fn status(ctx: &Context, site: &str) -> anyhow::Result<Exit> {
    let s = open(ctx, site, true).await?;
    let broker = broker(ctx).await.ok();
    let st = ops::status(&s, broker.as_ref()).await?;
    if let Some(b) = &broker {
        b.close().await;
    }
    ctx.out.emit("status", &st, || {
        format!(
            "{}: backlog {}, applied {}, last applied {}, parked {}, dead {}{}",
            st.site,
            st.backlog,
            st.applied,
            st.last_applied_ms.map_or_else(
                || "never".to_owned(),
                |ms| {
                    chrono::DateTime::from_timestamp_millis(ms)
                        .map_or_else(|| ms.to_string(), |t| t.to_rfc3339())
                }
            ),
            st.parked,
            st.dead,
            st.dead_queue
                .map_or_else(String::new, |n| format!(", dead-letter queue {n}"))
        )
    })?;
    Ok(Exit::Ok)
}
