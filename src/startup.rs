//! Start-up: open the store, replay the journal, bind the listener, wire the tasks.
//!
//! [`App::build`] does everything that can fail before serving, so a misconfiguration is
//! reported at once; [`App::run_until`] serves until the given future resolves, then drains
//! in the order documented in [`crate::shutdown`]. Tests build the same `App` on port 0.

use std::fs::{self, File};
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::aggregate::Aggregator;
use crate::config::{Ack, Config};
use crate::fds;
use crate::flush::Flusher;
use crate::http::BodyBudget;
use crate::http::auth::Auth;
use crate::http::rate_limit::RateLimiter;
use crate::http::serve::{ServeOptions, serve};
use crate::http::threads::{ServingThreads, runtime_thread};
use crate::http::{self, AppState, RouterOptions, body::Limits};
use crate::idle::IdleWorkers;
use crate::journal::{GroupStats, Journal, JournalOptions, no_follow, sync_parent};
use crate::metrics::{self as m, Metrics};
use crate::recovery::{self, Ownership};
use crate::store::password::PasswordFile;
use crate::store::{PgStore, SqliteStore, Store, Timed};

/// A built, not yet serving, tally instance.
pub struct App {
    config: Config,
    listener: TcpListener,
    /// `--metrics-listen`'s listener, when /metrics is served apart.
    metrics_listener: Option<TcpListener>,
    state: Arc<AppState>,
    /// Limits and guards of the main router (authorization, rate limit, timeouts).
    router: RouterOptions,
    flusher: Flusher,
    /// `--max-connections`, or fewer if the open-file limit leaves fewer.
    max_connections: usize,
    /// Held for the life of the process: a second tally on the same data directory would
    /// share its instance id and journal.
    _lock: File,
}

impl App {
    /// Opens the store named by the configuration and builds the app on it.
    ///
    /// # Errors
    ///
    /// Invalid configuration, unusable data directory, unreachable store, unreadable
    /// journal, or a listen address that cannot be bound; each with context.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        config.validate()?;
        tracing::info!(%config, "Starting tally.");
        // Before the store is touched: a limit too low to serve is reported at once.
        let max_connections = max_connections(&config)?;
        if config.flush.exceeds_contract() {
            tracing::warn!(
                interval = %humantime::format_duration(config.flush.interval),
                "Flush interval is longer than 10s: the store may lag further than the contract allows."
            );
        }
        let store: Arc<dyn Store> = match &config.store.database_url {
            Some(url) => {
                let password = config
                    .store
                    .database_password_file
                    .as_deref()
                    .map(PasswordFile::open)
                    .transpose()
                    .context("cannot read --database-password-file")?;
                let store = PgStore::connect_with(
                    url.expose(),
                    password,
                    config.store.database_ca_file.as_deref(),
                    config.store.database_pool_size.get(),
                )
                .await
                .context("cannot use the PostgreSQL store (--database-url)")?;
                // A batch that gives up first starts again from the first host.
                let before_last = store.wait_before_last_host();
                if before_last >= config.store.store_timeout {
                    tracing::warn!(
                        ?before_last,
                        store_timeout = ?config.store.store_timeout,
                        "--database-url's hosts before the last may take longer to open a \
                         connection than --store-timeout allows a batch: while they do not \
                         answer, every batch gives up before the last host is tried. Lower \
                         the URL's connect_timeout, name fewer hosts, or raise --store-timeout."
                    );
                }
                Arc::new(store)
            }
            None => {
                create_data_dir(&config.store.data_dir)?;
                let path = config.store.data_dir.join("tally.db");
                Arc::new(
                    // A lock another process holds fails a write within --store-timeout.
                    SqliteStore::open_waiting(&path, config.store.store_timeout)
                        .await
                        .with_context(|| format!("cannot open SQLite store {}", path.display()))?,
                )
            }
        };
        Self::assemble(config, store, max_connections).await
    }

    /// Builds the app on an already opened store (tests wrap a real store to inject faults).
    ///
    /// # Errors
    ///
    /// As [`App::build`].
    pub async fn build_with_store(config: Config, store: Arc<dyn Store>) -> anyhow::Result<Self> {
        config.validate()?;
        let max_connections = max_connections(&config)?;
        Self::assemble(config, store, max_connections).await
    }

    /// Builds the app on `store` from a validated configuration, serving at most
    /// `max_connections` clients at once.
    async fn assemble(
        config: Config,
        store: Arc<dyn Store>,
        max_connections: usize,
    ) -> anyhow::Result<Self> {
        let store: Arc<dyn Store> = Arc::new(Timed::new(store, config.store.store_timeout));
        create_data_dir(&config.store.data_dir)?;
        let lock = lock_data_dir(&config.store.data_dir)?;
        let instance_id: Arc<str> = instance_id(&config)?.into();
        report_went_back(&config.store.data_dir);

        let journal_dir = config.store.data_dir.join("journal");
        let options = JournalOptions {
            on_sync: Some(Arc::new(record_sync)),
            commit_delay: config.journal.commit_delay,
            stalled_after: config.journal.stalled_after,
            segment_bytes: config.journal.segment_bytes,
            // Only where requests wait on the journal: the stall is then reported.
            probe_idle: config.journal.ack == Ack::Journal,
            ..JournalOptions::default()
        };
        let (journal, replay) = Journal::open(&journal_dir, options)
            .with_context(|| format!("cannot open the journal in {}", journal_dir.display()))?;
        let journal = Arc::new(journal);
        // Whose the journal's records are: they are replayed only as the id, and under the
        // claim, that numbered them (see `crate::recovery`). Claiming fences off any earlier
        // process with this id, and waits for a batch of a predecessor still being committed,
        // so `applied` includes it.
        let mut ownership = Ownership::check(&journal_dir, &instance_id, &replay)?;
        let (claim, replay) = ownership.claim(&*store, replay).await?;
        let applied = claim.last_seq;
        tracing::info!(%instance_id, epoch = claim.epoch, applied_seq = applied, "Claimed the instance id.");

        let aggregator = Arc::new(Aggregator::new(
            applied.max(replay.max_seq) + 1,
            applied,
            config.flush.max_pending_keys.get(),
            config.flush.max_keys.get(),
        ));
        let flusher = Flusher::new(
            Arc::clone(&aggregator),
            Arc::clone(&store),
            Arc::clone(&instance_id),
            config.flush.interval,
        )
        .with_epoch(claim.epoch)
        .with_journal(Arc::clone(&journal))
        .journaled(config.journal.ack == Ack::Journal);
        recovery::replay_journal(&flusher, &journal, replay, applied).await?;
        ownership.finish()?;

        let listener = TcpListener::bind(config.http.listen)
            .await
            .with_context(|| format!("cannot listen on {} (--listen)", config.http.listen))?;
        let metrics_listener = match config.http.metrics_listen {
            None => None,
            Some(address) => Some(
                TcpListener::bind(address)
                    .await
                    .with_context(|| format!("cannot listen on {address} (--metrics-listen)"))?,
            ),
        };
        let router = RouterOptions {
            max_body_bytes: config.limits.max_body_bytes,
            request_timeout: config.http.request_timeout,
            auth: Auth::from_config(&config)?.map(Arc::new),
            rate_limit: RateLimiter::from_config(&config).map(Arc::new),
            metrics: metrics_listener.is_none(),
            max_key_bytes: config.limits.max_key_bytes.get(),
        };
        let state = Arc::new(AppState {
            aggregator,
            store,
            journal: (config.journal.ack == Ack::Journal).then_some(journal),
            instance_id,
            ack: config.journal.ack,
            limits: Limits {
                max_key_bytes: config.limits.max_key_bytes.get(),
                max_batch_items: config.limits.max_batch_items.get(),
                max_body_bytes: config.limits.max_body_bytes,
            },
            body_budget: BodyBudget::new(config.limits.max_body_memory),
            applied: flusher.applied(),
            health: flusher.health(),
            metrics: m::handle(),
            draining: CancellationToken::new(),
            store_runtime: tokio::runtime::Handle::current(),
        });
        Ok(Self {
            config,
            listener,
            metrics_listener,
            state,
            router,
            flusher,
            max_connections,
            _lock: lock,
        })
    }

    /// The address the listener is bound to (the real port when configured with port 0).
    ///
    /// # Errors
    ///
    /// If the OS cannot report it.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The address of the `--metrics-listen` listener, if there is one.
    ///
    /// # Errors
    ///
    /// If the OS cannot report it.
    pub fn metrics_addr(&self) -> std::io::Result<Option<SocketAddr>> {
        self.metrics_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()
    }

    /// This instance's id in the store's batch bookkeeping.
    pub fn instance_id(&self) -> &str {
        &self.state.instance_id
    }

    /// Serves until `shutdown` resolves, or the flusher asks for a new start (the store went
    /// back in time), then drains (see [`crate::shutdown`]).
    ///
    /// # Errors
    ///
    /// If the server fails or the final flush cannot finish in time.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            config,
            listener,
            metrics_listener,
            state,
            router,
            flusher,
            max_connections,
            _lock,
        } = self;
        // First, so that a failure leaves nothing running. The serving threads report to
        // `idle`, so that the last of them to run out of work commits the journal's group
        // (see `crate::idle`).
        let idle = IdleWorkers::new();
        let threads = Arc::new(
            ServingThreads::start(config.http_threads(), &idle)
                .context("cannot start the HTTP serving threads")?,
        );
        if let Some(journal) = &state.journal {
            journal.follow_workers(&idle);
            // One wake-up per serving thread per group (see `Journal::relay`).
            threads.spawn_on_each(|| journal.relay());
        }
        if state.ack == Ack::Store {
            // One wake-up per serving thread per applied batch (see `AppliedSeq::relay`).
            threads.spawn_on_each(|| state.applied.relay());
        }

        let flush_stop = CancellationToken::new();
        if let Some(journal) = &state.journal
            && let Err(e) = watch_for_stalls(journal, flush_stop.clone())
        {
            threads.shut_down().await;
            return Err(e).context("cannot start the journal's watch thread");
        }
        let spawned = spawn_flusher(
            flusher,
            state.store.wants_own_thread(),
            flush_stop.clone(),
            config.http.shutdown_timeout,
        );
        let (flusher, flusher_thread) = match spawned {
            Ok(spawned) => spawned,
            Err(e) => {
                threads.shut_down().await;
                return Err(e).context("cannot start the flusher's thread");
            }
        };
        if let Some(journal) = &state.journal {
            tokio::spawn(keep_journal_writable(
                Arc::clone(journal),
                flush_stop.clone(),
            ));
        }

        let http_stop = CancellationToken::new();
        let draining = state.draining.clone();
        let metrics_state = Arc::clone(&state);
        let options = ServeOptions {
            header_read_timeout: config.http.header_read_timeout,
            idle_timeout: config.http.idle_timeout,
            max_header_bytes: config.limits.max_header_bytes,
            max_connections,
            // Only the guards read the peer address (the rate limit, the failed-auth budget).
            connect_info: router.rate_limit.is_some() || router.auth.is_some(),
            draining: draining.clone(),
            threads: Some(Arc::clone(&threads)),
        };
        let (restart, health) = (state.health.restart_wanted(), Arc::clone(&state.health));
        let app = http::app(state, &router);
        let address = listener.local_addr().unwrap_or(config.http.listen);
        let mut server = tokio::spawn(serve(listener, app, options.clone(), http_stop.clone()));
        tracing::info!(%address, "Listening.");
        let metrics_server = metrics_listener.map(|listener| {
            let address = listener.local_addr().unwrap_or(address);
            tracing::info!(%address, "Serving /metrics on its own listener.");
            // Scrapes run as tasks of this runtime, apart from the requests.
            let options = ServeOptions {
                connect_info: false,
                threads: None,
                // Counted in the descriptors kept apart from the clients' (`fds::reserved`).
                max_connections: fds::METRICS_CONNECTIONS,
                ..options.clone()
            };
            tokio::spawn(serve(
                listener,
                http::metrics_router(metrics_state),
                options,
                http_stop.clone(),
            ))
        });
        // A signal, or the flusher finding that only a new start can go on (the store went
        // back in time): the same drain, and for the latter an exit code of 1 from it.
        let stop = async {
            let mut shutdown = Box::pin(shutdown);
            tokio::select! {
                () = &mut shutdown => {}
                () = restart.cancelled() => {
                    went_back(&config.store.data_dir, health.fenced().unwrap_or_default());
                    // Still heard during this drain: the first signal is said to be one
                    // more drain, the second exits at once (`shutdown::signal`).
                    tokio::spawn(shutdown);
                }
            }
        };
        let served = tokio::select! {
            result = &mut server => result,
            () = stop => {
                draining.cancel();
                if !config.http.shutdown_delay.is_zero() {
                    tracing::info!(
                        delay = %humantime::format_duration(config.http.shutdown_delay),
                        "Shutting down: /readyz answers 503 while requests are still served, then the listener closes."
                    );
                    tokio::time::sleep(config.http.shutdown_delay).await;
                }
                tracing::info!("Stopped accepting connections; finishing requests in flight.");
                http_stop.cancel();
                match tokio::time::timeout(config.http.shutdown_timeout, &mut server).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::warn!(timeout = ?config.http.shutdown_timeout, "Requests still in flight after the shutdown timeout; abandoning them.");
                        server.abort();
                        Ok(())
                    }
                }
            }
        };
        // The metrics listener only serves scrapes; nothing there needs draining.
        http_stop.cancel();
        if let Some(metrics_server) = metrics_server {
            metrics_server.abort();
        }
        // Every connection has ended, or was abandoned at the shutdown timeout: the serving
        // threads go, with any handler still running, before the final flush.
        threads.shut_down().await;
        tracing::info!("HTTP server stopped; flushing what is pending.");
        flush_stop.cancel();
        let drained = flusher.await.context("the flusher task panicked");
        if let Some(thread) = flusher_thread {
            thread.shut_down().await;
        }
        served.context("the HTTP server task panicked")?;
        drained?
    }
}

/// Spawns `flusher.run`: on this runtime, which owns the store's connections, or, for a
/// store that [wants one](Store::wants_own_thread), on a thread of its own, `tally-flusher`,
/// whose runtime runs nothing else. There the store may block ([`crate::store::allow_blocking_here`]):
/// SQLite's commit runs on the thread that waits for it, instead of on the blocking pool with
/// a wake-up each way. That thread writes on behalf of requests, so it yields to the serving
/// threads ([`crate::sched`]); it ends when the returned [`FlusherThread`] is dropped or shut
/// down.
///
/// Measured under `ack=store` on SQLite, side by side (docs/benchmarks.md): 0.089-0.096 ->
/// 0.054-0.060 context switches per request, throughput level or higher.
fn spawn_flusher(
    flusher: Flusher,
    own_thread: bool,
    stop: CancellationToken,
    drain_timeout: Duration,
) -> std::io::Result<(JoinHandle<anyhow::Result<()>>, Option<FlusherThread>)> {
    if !own_thread {
        return Ok((tokio::spawn(flusher.run(stop, drain_timeout)), None));
    }
    let thread = CancellationToken::new();
    let (runtime, join) = runtime_thread("tally-flusher".to_owned(), thread.clone(), || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    })?;
    let flusher = runtime.spawn(async move {
        crate::store::allow_blocking_here();
        crate::sched::yield_to_requests();
        flusher.run(stop, drain_timeout).await
    });
    let thread = FlusherThread {
        stop: thread.drop_guard(),
        join,
    };
    Ok((flusher, Some(thread)))
}

/// The flusher's own thread ([`spawn_flusher`]): stopped when dropped.
struct FlusherThread {
    stop: DropGuard,
    join: std::thread::JoinHandle<()>,
}

impl FlusherThread {
    /// Stops the thread and waits until it has ended: its runtime, and with it whatever the
    /// flusher's task left there, is dropped before this returns.
    async fn shut_down(self) {
        let Self { stop, join } = self;
        drop(stop);
        http::threads::join(vec![join]).await;
    }
}

/// How often a failed journal tries to start a fresh segment, and how often a stall of its
/// disk is looked for.
const JOURNAL_WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// While the journal is failed (a full disk), tries every second to recover it, so that
/// increments are taken again once the disk has room, without a restart. The journal logs
/// each change of state; failed attempts are only debug lines.
async fn keep_journal_writable(journal: Arc<Journal>, stop: CancellationToken) {
    while stop
        .run_until_cancelled(tokio::time::sleep(JOURNAL_WATCH_INTERVAL))
        .await
        .is_some()
    {
        if journal.is_failed()
            && let Err(e) = journal.recover().await
        {
            tracing::debug!(error = %e, "The journal cannot start a fresh segment yet.");
        }
    }
}

/// Logs each stall of the journal's disk once, when a write and fsync has run past
/// `--journal-stalled-after` (the journal logs its end). From a thread of its own, which
/// wakes once a second: the thread stuck in the fsync may be a serving thread, and the
/// journal's writer thread may be stuck on the same disk. It holds the journal only while
/// it looks, so that a journal dropped at shutdown is not kept open (its lock with it); it
/// ends within a second of `stop`.
fn watch_for_stalls(journal: &Arc<Journal>, stop: CancellationToken) -> std::io::Result<()> {
    let journal = Arc::downgrade(journal);
    std::thread::Builder::new()
        .name("journal-watch".to_owned())
        .spawn(move || {
            // How long the stall seen last had been running; a shorter one is a new stall.
            let mut seen: Option<Duration> = None;
            while !stop.is_cancelled() {
                std::thread::sleep(JOURNAL_WATCH_INTERVAL);
                let Some(stalled) = journal.upgrade().map(|j| j.stalled()) else {
                    return;
                };
                if let Some(running) = stalled
                    && seen.is_none_or(|seen| running < seen)
                {
                    tracing::warn!(
                        running_secs = running.as_secs(),
                        "The journal's disk is stalled: a write and fsync has been running for \
                         {}s (--journal-stalled-after). Increments under ack=journal wait for it, \
                         and /readyz answers 503 until it completes.",
                        running.as_secs()
                    );
                }
                seen = stalled;
            }
        })?;
    Ok(())
}

/// `--max-connections`, or what the open-file limit leaves for connections if that is
/// fewer (see [`crate::fds`]); exported as `tally_http_connections_max`.
fn max_connections(config: &Config) -> anyhow::Result<usize> {
    let requested = config.http.max_connections.get();
    let limit = match fds::soft_limit() {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot read the open-file limit; not capping connections by it.");
            u64::MAX
        }
    };
    // The serving threads, start-up's and the flusher's: one runtime each.
    let runtimes = config.http_threads().get() + 2;
    let store = match config.store.database_url {
        // The pool and the connection that holds the instance id's lock.
        Some(_) => (config.store.database_pool_size.get() as u64).saturating_add(1),
        None => fds::SQLITE_FILES,
    };
    let metrics = config
        .http
        .metrics_listen
        .map_or(0, |_| fds::METRICS_CONNECTIONS);
    let reserved = fds::reserved(runtimes, store, metrics);
    let cap = fds::connection_cap(requested, limit, reserved)?;
    if cap < requested {
        tracing::warn!(
            limit,
            reserved,
            cap,
            max_connections = requested,
            needed = reserved.saturating_add(requested as u64),
            "The open-file limit leaves room for fewer connections than --max-connections: \
             capping them there, so that the journal and the store keep descriptors \
             (at the cap the longest-idle connection makes room for a new client). Raise the \
             limit (`ulimit -n`, systemd's LimitNOFILE=) to `needed` to allow them all."
        );
    }
    Metrics::global().connections_max.set(cap as f64);
    Ok(cap)
}

/// The file in the data directory that says the last run ended because the store had gone
/// back in time: written by that run, read and removed by the next start.
const WENT_BACK: &str = "went-back";

/// Notes in `dir` that this run ends because the store went back in time (`reason`), for
/// the next start to report (best effort: a failure is logged).
fn went_back(dir: &Path, reason: &str) {
    if let Err(e) = fs::write(dir.join(WENT_BACK), format!("{reason}\n")) {
        tracing::warn!(error = %e, "Cannot note in the data directory why this run ends.");
    }
}

/// Reports, once, that the last run in `dir` ended because the store had gone back in time:
/// a log line and [`m::STORE_WENT_BACK`], which an alert reads. The run that found it lived a
/// few seconds, likely between two scrapes.
fn report_went_back(dir: &Path) {
    let path = dir.join(WENT_BACK);
    let Ok(reason) = fs::read_to_string(&path) else {
        return;
    };
    let when = fs::metadata(&path)
        .and_then(|meta| meta.modified())
        .unwrap_or_else(|_| std::time::SystemTime::now());
    let seconds = when
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    Metrics::global().store_went_back.set(seconds);
    tracing::warn!(
        reason = reason.trim_end(),
        "The last run ended because the store had gone back in time (a failover to a replica behind its primary, a restore from a backup). This start claims the instance id from what the store holds and writes what the journal holds above it; find out what else the database lost (docs/operations.md)."
    );
    if let Err(e) = fs::remove_file(&path) {
        tracing::warn!(error = %e, path = %path.display(), "Cannot remove the note of the last run's end; the next start reports it again.");
    }
}

fn create_data_dir(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create data directory {} (--data-dir)",
            dir.display()
        )
    })?;
    // Its own entry is durable before anything acknowledged is written inside it.
    sync_parent(dir).with_context(|| format!("cannot make {} durable", dir.display()))
}

fn lock_data_dir(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join("lock");
    let file = no_follow(File::options().create(true).truncate(false).write(true))
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => bail!(
            "another tally process is using data directory {}; give each instance its own --data-dir",
            dir.display()
        ),
        Err(fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// The configured instance id, or the one kept in the data directory (created on first run).
fn instance_id(config: &Config) -> anyhow::Result<String> {
    if let Some(id) = &config.store.instance_id {
        return Ok(id.clone());
    }
    let path = config.store.data_dir.join("instance-id");
    let read = no_follow(File::options().read(true))
        .open(&path)
        .and_then(|mut f| {
            let mut id = String::new();
            std::io::Read::read_to_string(&mut f, &mut id).map(|_| id)
        });
    match read {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let id = uuid::Uuid::new_v4().to_string();
    // The journal's meaning depends on it.
    write_durably(&path, id.as_bytes())?;
    tracing::info!(instance_id = %id, path = %path.display(), "Generated a new instance id.");
    Ok(id)
}

/// Replaces the file at `path` with `contents`, durably: written to a temporary file,
/// fsynced, renamed over it, and the directory fsynced, so that a crash leaves the old
/// contents or the new, never half of them.
pub(crate) fn write_durably(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    // Created exclusively, after removing a leftover: never written through a planted link.
    let _ = fs::remove_file(&tmp);
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, path))
        .and_then(|()| File::open(dir)?.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn record_sync(stats: GroupStats) {
    let metrics = Metrics::global();
    metrics.journal_fsync.record(stats.fsync);
    metrics.journal_group.record(stats.records as f64);
    metrics.journal_commit_delay.record(stats.waited);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[tokio::test]
    async fn shutting_down_the_flusher_thread_waits_until_its_runtime_is_gone() {
        /// Sets its flag when dropped, which happens when the runtime it was spawned on is.
        struct Dropped(Arc<AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                // Long enough that a shut_down that does not wait returns first.
                std::thread::sleep(Duration::from_millis(200));
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let stop = CancellationToken::new();
        let (runtime, join) = runtime_thread("tally-flusher-test".to_owned(), stop.clone(), || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        })
        .expect("thread");
        let dropped = Arc::new(AtomicBool::new(false));
        let held = Dropped(Arc::clone(&dropped));
        drop(runtime.spawn(async move {
            let _held = held;
            std::future::pending::<()>().await;
        }));
        let thread = FlusherThread {
            stop: stop.drop_guard(),
            join,
        };
        thread.shut_down().await;
        assert!(dropped.load(Ordering::SeqCst));
    }
}
