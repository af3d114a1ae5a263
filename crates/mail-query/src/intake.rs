//! Where request mails come from: one message (`--eml FILE|-`), one pass over the IMAP
//! folder (`--once`), or a connection that stays open (`--watch`: IDLE, polling when
//! the server has no IDLE, reconnecting with backoff).
//!
//! A message is moved to `processed_folder` (answered, failed) or `rejected_folder`
//! (refused) only after [`Service::handle`] returned, that is after every reply mail
//! was accepted; a message that must wait (DNS, an unreachable database) stays in the
//! folder for the next pass.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use labrelay::config::ImapConfig;
use labrelay::exit::Exit;
use labrelay::mail::{ImapClient, MailError};
use labrelay::output::Printer;
use labrelay::schedule::RestHours;

use crate::process::{Record, Service};
use crate::state::Stage;

/// What a pass did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    /// Requests finished (any verdict).
    pub done: usize,
    /// Requests left for a later pass.
    pub later: usize,
}

impl Tally {
    /// The exit status of a run that made these passes.
    pub fn exit(self) -> Exit {
        if self.later > 0 {
            Exit::TempFail
        } else {
            Exit::Ok
        }
    }
}

/// Print one request's record.
pub fn emit(out: &Printer, r: &Record) -> anyhow::Result<()> {
    out.emit("request", r, || {
        let mut line = format!(
            "{} from {}: {}",
            r.message_id.as_deref().unwrap_or("(no Message-ID)"),
            r.from.as_deref().unwrap_or("(no sender)"),
            r.verdict
        );
        if let Some(db) = &r.database {
            let _ = write!(line, " on {db}");
        }
        let _ = write!(
            line,
            ", {} statements, {} rows, {} reply mails",
            r.statements, r.rows, r.mails
        );
        if r.duplicate {
            line.push_str(" (answered before; nothing sent now)");
        }
        if let Some(reason) = &r.reason {
            let _ = write!(line, ": {reason}");
        }
        line
    })?;
    Ok(())
}

/// A blocking IMAP client used from async code: each call runs on a blocking thread.
struct Imap {
    client: Option<ImapClient>,
}

impl Imap {
    async fn connect(cfg: &ImapConfig) -> anyhow::Result<Imap> {
        let cfg = cfg.clone();
        let client = tokio::task::spawn_blocking(move || ImapClient::connect(&cfg)).await??;
        Ok(Imap {
            client: Some(client),
        })
    }

    async fn call<T, F>(&mut self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut ImapClient) -> Result<T, MailError> + Send + 'static,
    {
        let mut client = self
            .client
            .take()
            .ok_or_else(|| anyhow::anyhow!("the IMAP connection was lost"))?;
        let (client, result) = tokio::task::spawn_blocking(move || {
            let r = f(&mut client);
            (client, r)
        })
        .await?;
        self.client = Some(client);
        Ok(result?)
    }

    async fn logout(mut self) {
        if let Some(c) = self.client.take() {
            let _ = tokio::task::spawn_blocking(move || c.logout()).await;
        }
    }
}

/// The mail folders of a run.
#[derive(Debug, Clone)]
pub struct Folders {
    /// Read from.
    pub inbox: String,
    /// Answered and failed requests.
    pub processed: String,
    /// Refused requests.
    pub rejected: String,
}

fn resting(config: &labrelay::config::Config) -> bool {
    config
        .schedule
        .rest_hours
        .as_deref()
        .and_then(|h| RestHours::parse(h).ok())
        .is_some_and(RestHours::is_resting_now)
}

/// One message from a file or stdin; filed at once (there is no folder).
///
/// # Errors
/// As [`Service::handle`].
pub async fn eml(service: &Service, raw: &[u8], out: &Printer) -> anyhow::Result<Exit> {
    let record = service.handle(raw, "eml", None).await?;
    if !service.dry_run() {
        service.filed(&record.id).await?;
    }
    emit(out, &record)?;
    Ok(Exit::Ok)
}

/// One pass over the folder: answer every message in it, then return.
///
/// # Errors
/// The IMAP server (after its retries), the state database, configuration errors.
pub async fn once(
    service: &Service,
    config: &labrelay::config::Config,
    imap: &ImapConfig,
    folders: &Folders,
    out: &Printer,
) -> anyhow::Result<Tally> {
    if resting(config) {
        tracing::info!("rest hours ([schedule] rest_hours): no new queries start now");
        return Ok(Tally::default());
    }
    let mut conn = Imap::connect(imap).await?;
    let tally = pass(service, &mut conn, folders, out, true).await;
    conn.logout().await;
    tally
}

async fn prepare(conn: &mut Imap, folders: &Folders, dry_run: bool) -> anyhow::Result<()> {
    if !dry_run {
        for f in [folders.processed.clone(), folders.rejected.clone()] {
            conn.call(move |c| c.create_folder_if_missing(&f)).await?;
        }
    }
    let inbox = folders.inbox.clone();
    conn.call(move |c| c.select(&inbox)).await?;
    Ok(())
}

/// Answer what is in the folder now, on an open connection.
async fn pass(
    service: &Service,
    conn: &mut Imap,
    folders: &Folders,
    out: &Printer,
    stop_on_config: bool,
) -> anyhow::Result<Tally> {
    prepare(conn, folders, service.dry_run()).await?;
    let uids = conn.call(|c| c.uid_search("ALL")).await?;
    let mut raws = Vec::with_capacity(uids.len());
    for uid in uids {
        let raw = conn.call(move |c| c.fetch_raw(uid)).await?;
        raws.push((uid, raw));
    }
    let source = format!("imap:{}", folders.inbox);
    let workers = service.settings().max_workers;
    let results: Vec<(u32, anyhow::Result<Record>)> = futures::stream::iter(raws)
        .map(|(uid, raw)| {
            let source = &source;
            async move { (uid, service.handle(&raw, source, Some(uid)).await) }
        })
        .buffered(workers)
        .collect()
        .await;
    let mut tally = Tally::default();
    let mut stop = None;
    for (uid, result) in results {
        match result {
            Ok(record) => {
                if !service.dry_run() {
                    let folder = if record.refused() {
                        folders.rejected.clone()
                    } else {
                        folders.processed.clone()
                    };
                    conn.call(move |c| c.move_to(uid, &folder)).await?;
                    service.filed(&record.id).await?;
                }
                emit(out, &record)?;
                tally.done += 1;
            }
            Err(e) => match labrelay::exit::classify(&e) {
                Exit::TempFail => {
                    tracing::warn!(uid, "request left for a later pass: {e:#}");
                    tally.later += 1;
                }
                Exit::Config => {
                    // A database or host this request needs refuses our configuration:
                    // the request waits, the others go on; `--once` exits 78 at the end.
                    tracing::error!(uid, "request left for a later pass: {e:#}");
                    tally.later += 1;
                    if stop_on_config {
                        stop.get_or_insert(e);
                    }
                }
                _ => {
                    tracing::error!(uid, "request not answered: {e:#}");
                    tally.later += 1;
                }
            },
        }
    }
    if !service.dry_run() {
        // Requests replied to whose mail was moved before a crash let us record it.
        for row in service.requests().unfinished().await? {
            if row.stage == Stage::Replied && row.source == source {
                let id = row.message_id.clone().unwrap_or_default();
                let still_here = if id.is_empty() {
                    false
                } else {
                    match conn.call(move |c| c.search_message_id(&id)).await {
                        Ok(uids) => !uids.is_empty(),
                        Err(e) => {
                            // Left as it is; the next pass asks again.
                            tracing::warn!(request = %row.id, "cannot look for a filed request: {e:#}");
                            true
                        }
                    }
                };
                if !still_here {
                    service.filed(&row.id).await?;
                }
            }
        }
    }
    if let Some(e) = stop {
        return Err(e);
    }
    Ok(tally)
}

/// How [`watch`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    /// SIGTERM or SIGINT: stop.
    Stop,
    /// SIGHUP: load the configuration again and go on.
    Reload,
}

/// Stay connected: answer what is there, wait for new mail (IDLE), answer again; after
/// an error, reconnect with backoff. Returns on SIGTERM/SIGINT ([`WatchEnd::Stop`]) and
/// on SIGHUP ([`WatchEnd::Reload`]). A pass in progress is dropped at that moment: its
/// requests keep their recorded stage and the mails stay in the folder, so the next
/// pass finishes them (queries that were running are run again).
///
/// # Errors
/// Configuration errors, or a server unreachable for longer than the reconnect deadline
/// (`[retry] deadline_secs`).
pub async fn watch(
    service: &Service,
    config: &labrelay::config::Config,
    imap: &ImapConfig,
    folders: &Folders,
    out: &Printer,
) -> anyhow::Result<WatchEnd> {
    let shutdown = labrelay::cli::shutdown_signal();
    tokio::pin!(shutdown);
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let deadline_secs = labrelay::retry::policy().deadline.as_secs().max(60);
    let mut backoff: Option<labrelay::retry::Backoff> = None;
    loop {
        if resting(config) {
            tracing::info!("rest hours: no new queries start; checking again in a minute");
            tokio::select! {
                () = &mut shutdown => return Ok(WatchEnd::Stop),
                _ = hangup.recv() => return Ok(WatchEnd::Reload),
                () = tokio::time::sleep(Duration::from_mins(1)) => continue,
            }
        }
        let mut worked = false;
        let failed = tokio::select! {
            () = &mut shutdown => {
                tracing::info!("stopping: signal received");
                return Ok(WatchEnd::Stop);
            }
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                return Ok(WatchEnd::Reload);
            }
            r = session(service, config, imap, folders, out, &mut worked) => r.err(),
        };
        if worked {
            // The connection worked for a while: forget earlier failures.
            backoff = None;
        }
        let Some(e) = failed else { continue };
        if labrelay::exit::classify(&e) == Exit::Config {
            return Err(e);
        }
        let b = backoff.get_or_insert_with(|| {
            labrelay::retry::Backoff::until(Instant::now() + Duration::from_secs(deadline_secs))
                .max_pause(Duration::from_secs(30))
        });
        let Some(pause) = b.pause() else {
            return Err(e.context("the mailbox stayed unreachable; giving up"));
        };
        tracing::warn!(
            "mailbox connection failed ({e:#}); reconnecting in {:.1} s",
            pause.as_secs_f64()
        );
        tokio::select! {
            () = &mut shutdown => return Ok(WatchEnd::Stop),
            _ = hangup.recv() => return Ok(WatchEnd::Reload),
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// One connection: passes and IDLE waits until an error (returned) or rest hours
/// (`Ok`). `worked` is set once a pass succeeded.
async fn session(
    service: &Service,
    config: &labrelay::config::Config,
    imap: &ImapConfig,
    folders: &Folders,
    out: &Printer,
    worked: &mut bool,
) -> anyhow::Result<()> {
    let mut conn = Imap::connect(imap).await?;
    loop {
        if resting(config) {
            conn.logout().await;
            return Ok(());
        }
        pass(service, &mut conn, folders, out, false).await?;
        *worked = true;
        // New mail or not, another pass after the wait is cheap.
        conn.call(|c| c.idle(IDLE_WAIT)).await?;
    }
}

/// The longest IDLE wait before the folder is looked at again (also bounds how long a
/// stop signal waits for the IDLE thread).
const IDLE_WAIT: Duration = Duration::from_secs(25);
