//! Assembles the gateway: opens the journal, binds the listeners, runs the admin API,
//! and shuts down in two phases (stop accepting, drain sessions within the grace
//! period, flush and close the journal).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bridge::commands::CommandConsumerConfig;
use bridge::embedded::EmbeddedKafka;
use bridge::journal::ReplayRetention;
use bridge::producer::{self, BridgeControl, BridgeStatus, ProducerConfig};
use bridge::replay::Replays;
use bridge::supervisor::{self, RestartPolicy};
use bridge::{Journal, JournalConfig, SegmentedJournal};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn, Instrument};

use crate::auth::Auth;
use crate::commands::{self, outcome, Commands};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::router::Router;
use crate::session::state::{OutItem, Qos2In, SessionCell, SessionState};
use crate::state::Shared;
use crate::store::Store;
use crate::tls::CertIdentity;
use crate::{admin, session, tls};

/// Runs until `shutdown` is cancelled, then drains and returns.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let mut jcfg = JournalConfig::new(cfg.journal.dir.clone(), cfg.journal.max_bytes);
    jcfg.segment_bytes = cfg.journal.segment_bytes;
    jcfg.replay_retention = ReplayRetention {
        max_age: Duration::from_secs(cfg.journal.replay_retention_secs),
        max_bytes: cfg.journal.replay_retention_bytes,
    };
    let journal = tokio::task::spawn_blocking(move || SegmentedJournal::open(jcfg))
        .await
        .context("journal open task")?
        .with_context(|| format!("journal.dir = {}", cfg.journal.dir.display()))?;
    let routes = Arc::new(cfg.routing());
    let embedded = if cfg.kafka.bootstrap == "embedded" {
        let mut topics = routes.topics();
        if !cfg.kafka.dead_letter_topic.is_empty() {
            topics.push(cfg.kafka.dead_letter_topic.clone());
        }
        let kafka = EmbeddedKafka::start(&topics, cfg.kafka.embedded_partitions)
            .map_err(|e| anyhow::anyhow!("kafka.bootstrap = \"embedded\": {e}"))?;
        warn!(
            bootstrap = %kafka.bootstrap,
            topics = ?topics,
            "embedded Kafka: DEV-ONLY in-process mock cluster, in memory, NOT durable; read it with `kcat -b {} -t <topic> -C`",
            kafka.bootstrap
        );
        Some(kafka)
    } else {
        None
    };
    let bootstrap = embedded
        .as_ref()
        .map(|k| k.bootstrap.clone())
        .unwrap_or_else(|| cfg.kafka.bootstrap.clone());
    let store_dir = cfg.store_dir();
    let store = tokio::task::spawn_blocking(move || Store::open(&store_dir))
        .await
        .context("store open task")?
        .with_context(|| format!("sessions.store_dir = {}", cfg.store_dir().display()))?;
    let flusher = store.spawn_flusher();
    let journal = Arc::new(journal);
    let parked_dir = cfg.journal.dir.join("parked");
    let producer_cfg = ProducerConfig {
        bootstrap: bootstrap.clone(),
        compression: cfg.kafka.compression.clone(),
        linger_ms: cfg.kafka.linger_ms,
        batch_bytes: cfg.kafka.batch_bytes,
        max_inflight: cfg.kafka.max_inflight,
        gateway_id: cfg.gateway_id(),
        dead_letter_topic: cfg.kafka.dead_letter_topic.clone(),
        properties: cfg.kafka.properties.clone(),
        journal_id: journal.id().to_string(),
        parked_dir: parked_dir.clone(),
        max_parked: cfg.kafka.max_parked,
        stall_rebuild: Duration::from_secs(cfg.kafka.stall_rebuild_secs),
    };
    let metrics = Metrics::default();
    let setups = Arc::new(session::gate::Gate::new(
        session::gate::permits(cfg.mqtt.max_concurrent_setups),
        metrics.setups_waiting.clone(),
    ));
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        gateway_id: producer_cfg.gateway_id.clone().into_boxed_str(),
        replays: Replays::new(journal.clone(), routes.clone(), producer_cfg.clone()),
        journal,
        auth: Auth::new(&cfg.auth),
        registry: Registry::default(),
        router: Router::default(),
        store: store.clone(),
        metrics,
        shutdown: shutdown.clone(),
        routes: routes.clone(),
        full_policy: cfg.full_policy(),
        bridge: Arc::new(BridgeStatus::default()),
        bootstrap: bootstrap.clone(),
        embedded: embedded.is_some(),
        admin_token: cfg.admin_token().map_err(|p| anyhow::anyhow!("{p}"))?,
        bridge_control: BridgeControl::new(),
        parked_dir,
        commands: Commands::default(),
        setups,
        keep_alive: Arc::default(),
    });
    if restore(&shared)? > 0 {
        shared.store.flush().await.context("flushing restored sessions")?;
    }
    tokio::spawn(session::will::expire_sessions(shared.clone()));
    tokio::spawn(session::keepalive::run(
        shared.keep_alive.clone(),
        shutdown.clone(),
    ));
    let (commands_task, kafka_readers) = start_commands(&shared, &bootstrap);
    let grace = Duration::from_secs(cfg.gateway.shutdown_grace_secs);
    // Supervised: an error or a panic restarts the pipeline with back-off and a
    // persistent failure turns /readyz unhealthy, instead of ending the task unseen.
    let bridge_stop = producer::Shutdown::new();
    let bridge_task = tokio::spawn(supervisor::supervise(
        shared.journal.clone(),
        routes,
        producer_cfg,
        shared.bridge.clone(),
        shared.bridge_control.clone(),
        bridge_stop.clone(),
        RestartPolicy::default(),
    ));
    // In a region: tell it this gateway (re)started, before any vehicle can connect (and
    // after the bridge started, so that a full journal can drain).
    session::presence::journal_start(&shared).await;

    let tracker = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(cfg.mqtt.max_connections));
    let mut accept_loops = Vec::new();
    if !cfg.mqtt.listen.is_empty() {
        let listener = bind(&cfg.mqtt.listen, "mqtt.listen").await?;
        info!(kind = "tcp", addr = %listener.local_addr()?, "mqtt listener bound");
        accept_loops.push(tokio::spawn(accept_loop(
            listener,
            None,
            shared.clone(),
            limit.clone(),
            tracker.clone(),
        )));
    }
    if !cfg.mqtt.tls_listen.is_empty() {
        let (acceptor, cert) = tls::acceptor(
            &cfg.tls,
            shared.metrics.tls_cert_reloads.clone(),
            shared.metrics.tls_cert_expiry.clone(),
        )?;
        // SIGHUP or a changed tls.cert / tls.key: new handshakes get the new pair.
        cert.spawn_watch(shutdown.clone())?;
        let listener = bind(&cfg.mqtt.tls_listen, "mqtt.tls_listen").await?;
        info!(kind = "tls", addr = %listener.local_addr()?, mtls = !cfg.tls.client_ca.is_empty(), "mqtt listener bound");
        accept_loops.push(tokio::spawn(accept_loop(
            listener,
            Some(acceptor),
            shared.clone(),
            limit.clone(),
            tracker.clone(),
        )));
    } else {
        // SIGHUP reloads the TLS certificate; without a TLS listener it must not end the
        // process (its default action) when an operator's rotation script sends it.
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                info!("SIGHUP received: no TLS listener, nothing to reload");
            }
        });
    }
    // The admin listener outlives the drain: during it /readyz answers 503
    // `shutting_down` (a load balancer or Kubernetes takes the node out on an answer, not
    // on a refused connection it may retry), and /metrics shows the drain.
    let admin_stop = CancellationToken::new();
    if !cfg.admin.listen.is_empty() {
        let listener = bind(&cfg.admin.listen, "admin.listen").await?;
        info!(kind = "admin", addr = %listener.local_addr()?, "admin listener bound");
        let app = admin::router(shared.clone());
        let limits = admin::listener::Limits {
            max_connections: cfg.admin.max_connections,
            request_timeout: Duration::from_secs(cfg.admin.request_timeout_secs),
        };
        tokio::spawn(admin::listener::serve(
            listener,
            app,
            limits,
            shared.metrics.admin_connections_rejected.clone(),
            admin_stop.clone(),
        ));
    }
    // Whether this build serves connections first woken, first served (gateway/src/main.rs):
    // a build with RUSTFLAGS set ignores .cargo/config.toml and keeps tokio's LIFO slot.
    info!(
        version = env!("CARGO_PKG_VERSION"),
        connections_in_arrival_order = cfg!(tokio_unstable),
        "gateway ready"
    );

    shutdown.cancelled().await;
    // From here a command dropped with its session is not an outcome: it stays unsettled
    // (Kafka re-delivers it) or, in a persistent session's store, pending.
    shared.commands.close();
    // The set-up gate opens: goodbyes and connections still setting up run at once (every
    // waiting one sees the shutdown now, and the drain has the whole machine).
    shared.setups.close();
    // Sessions wait on their cell, not on the token (one fewer wait per idle vehicle).
    shared.registry.wake_all();
    // One grace period for the whole shutdown: sessions, journal flush and the bridge's
    // last confirmations all end by the same deadline.
    let deadline = tokio::time::Instant::now() + grace;
    // A running replay stops first (it ends `failed`, "interrupted"); it is never resumed.
    shared.replays.shutdown(deadline).await;
    info!(
        grace_secs = grace.as_secs(),
        "shutting down: no new connections, draining sessions"
    );
    for l in &accept_loops {
        l.abort();
    }
    tracker.close();
    // Sessions get at most four fifths of the grace: the bridge keeps a slice to collect
    // confirmations, however slow a client is to take its goodbye.
    let sessions_by = deadline - grace / 5;
    if tokio::time::timeout_at(sessions_by, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = tracker.len(),
            "grace period over; closing remaining connections"
        );
    }
    // Sessions are done: their commands' last outcomes are reported.
    shared.commands.stop();
    let flushed = tokio::time::timeout_at(deadline, shared.journal.flush()).await;
    match flushed {
        Ok(Ok(())) => info!(
            durable_seq = *shared.journal.durable().borrow(),
            "journal flushed"
        ),
        Ok(Err(e)) => error!(error = %e, "journal flush failed"),
        Err(_) => error!("journal flush did not finish within the grace period"),
    }
    // The bridge gets what is left of the grace period to collect confirmations of what
    // is in flight, so that fewer records are re-sent after the restart.
    bridge_stop.stop_by(deadline);
    match tokio::time::timeout_at(deadline + Duration::from_secs(1), bridge_task).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!(error = %e, "kafka bridge supervisor panicked"),
        Err(_) => warn!("kafka bridge did not stop within the grace period"),
    }
    if tokio::time::timeout_at(deadline + Duration::from_secs(1), commands_task)
        .await
        .is_err()
    {
        warn!("command outcomes did not settle within the grace period");
    }
    // The Kafka consumers (commands, the region's presence feed) stopped with the
    // shutdown token; their clients close here, before an embedded cluster goes (else
    // they log its disappearance as errors).
    for reader in kafka_readers {
        let _ = tokio::time::timeout_at(deadline + Duration::from_secs(1), reader).await;
    }
    let journal = shared.journal.clone();
    tokio::task::spawn_blocking(move || journal.close()).await.ok();
    if let Err(e) = shared.store.flush().await {
        error!(error = %e, "session store flush failed");
    }
    shared.store.close();
    let _ = flusher.await;
    admin_stop.cancel();
    drop(embedded);
    info!("gateway stopped");
    Ok(())
}

/// Starts the outcome task and, with `commands.enabled`, the Kafka command consumer and
/// its dispatcher. Returns the outcome task (it settles what it can after shutdown) and
/// the tasks that hold Kafka consumers (they end with the shutdown token).
fn start_commands(
    shared: &Arc<Shared>,
    bootstrap: &str,
) -> (tokio::task::JoinHandle<()>, Vec<tokio::task::JoinHandle<()>>) {
    let cfg = &shared.cfg;
    let mut readers = Vec::new();
    let Some(reports) = shared.commands.take_reports() else {
        return (tokio::spawn(async {}), readers);
    };
    let drain = Duration::from_secs(cfg.gateway.shutdown_grace_secs);
    if cfg.commands.many_gateways {
        shared.commands.expect_copies();
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        readers.push(tokio::spawn(bridge::feed::run(
            bootstrap.to_string(),
            cfg.presence.kafka_topic.clone(),
            cfg.kafka.properties.clone(),
            tx,
            shared.shutdown.clone(),
        )));
        tokio::spawn(commands::region::follow(shared.clone(), rx));
    }
    if !cfg.commands.enabled {
        let stop = shared.commands.stopping.clone();
        let outcomes = tokio::spawn(outcome::run(shared.clone(), reports, None, stop, drain));
        return (outcomes, readers);
    }
    let (settle_tx, settle_rx) = tokio::sync::mpsc::unbounded_channel();
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let consumer = CommandConsumerConfig {
        bootstrap: bootstrap.to_string(),
        group: cfg
            .commands
            .consumer_group
            .replace("{gateway_id}", &cfg.gateway_id()),
        topic: cfg.commands.kafka_topic.clone(),
        max_pending: cfg.commands.max_pending,
        properties: cfg.kafka.properties.clone(),
    };
    let (committed_tx, committed_rx) = tokio::sync::mpsc::unbounded_channel();
    let channels = bridge::commands::Channels {
        out: tx,
        settled: settle_rx,
        committed: committed_tx,
        status: shared.commands.consumer.clone(),
    };
    readers.push(tokio::spawn(bridge::commands::run(
        consumer,
        channels,
        shared.shutdown.clone(),
    )));
    tokio::spawn(commands::kafka::forget_committed(shared.clone(), committed_rx));
    tokio::spawn(commands::kafka::dispatch(shared.clone(), rx));
    let stop = shared.commands.stopping.clone();
    let outcomes = tokio::spawn(outcome::run(
        shared.clone(),
        reports,
        Some(settle_tx),
        stop,
        drain,
    ));
    (outcomes, readers)
}

/// Puts back what the store kept: persistent sessions (offline until their vehicle
/// reconnects; a session held by a connection when the gateway died counts as
/// disconnected now), their subscriptions and queues, and the retained messages.
fn restore(shared: &Shared) -> anyhow::Result<usize> {
    let sessions = shared
        .store
        .load_sessions()
        .context("loading persistent sessions from the store")?;
    let retained = shared
        .store
        .load_retained()
        .context("loading retained messages from the store")?;
    let now = crate::message::now_ms();
    // What the journal kept: a QoS 2 id whose record lies beyond it was in an unsynced
    // tail and is forgotten, so the client's re-send is journaled, not taken for a duplicate.
    let recovered = *shared.journal.durable().borrow();
    // Sequences of another journal (a replaced journal directory) mean nothing here.
    let journal_id = shared.journal.id().to_string();
    let bound = shared
        .store
        .journal_binding()
        .context("reading the store's journal binding")?;
    let same_journal = bound.as_deref().is_none_or(|b| b == journal_id);
    if !same_journal {
        warn!(
            store_journal = bound.as_deref().unwrap_or(""),
            journal = %journal_id,
            "the session store refers to another journal: inbound QoS 2 packet ids of journaled messages are forgotten"
        );
    }
    // QoS 2 publishes a crash caught between their marker and their session record: the
    // journal says which were journaled (`session::qos2_pending`).
    let markers = shared
        .store
        .load_qos2_pending()
        .context("loading the store's inbound QoS 2 markers")?;
    let mut journaled: std::collections::HashMap<String, Vec<(u16, u64)>> = Default::default();
    if same_journal {
        // Unreadable: a possible duplicate in Kafka, not a gateway that does not start.
        let found = session::qos2_pending::find_journaled(&*shared.journal, &markers)
            .unwrap_or_else(|e| {
                warn!(error = %e, markers = markers.len(), "cannot read the journal for QoS 2 publishes a crash interrupted: their re-sends will be journaled again");
                Default::default()
            });
        for ((client_id, pkid), seq) in found {
            journaled.entry(client_id).or_default().push((pkid, seq));
        }
    }
    let (count, mut queued, mut rewritten) = (sessions.len(), 0, 0);
    for s in sessions {
        let client_id: Arc<str> = Arc::from(s.client_id.as_str());
        let mut state = SessionState::new(
            None,
            s.record.expiry_secs,
            crate::session::state::DisconnectedAt::at(Some(s.record.disconnected_at_ms.unwrap_or(now))),
            s.record.protocol,
        );
        state.inbound_qos2 = s
            .record
            .inbound_qos2
            .iter()
            .filter(|(_, seq)| qos2_id_kept(*seq, same_journal, recovered))
            .map(|(pkid, seq)| (*pkid, Qos2In { seq: *seq, gen: 0 }))
            .collect();
        for (id, rec) in s.queue {
            queued += 1;
            let command = rec.command.clone().map(|c| shared.commands.restore(c));
            let mut item = OutItem::from_record(id, rec);
            item.command = command;
            state.out.restore(item, &shared.metrics);
        }
        let forgot = state.inbound_qos2.len() != s.record.inbound_qos2.len();
        let mut found = 0;
        for (pkid, seq) in journaled.remove(&s.client_id).unwrap_or_default() {
            if state.inbound_qos2.get(&pkid).is_none() {
                state.inbound_qos2.insert(pkid, Qos2In { seq, gen: 0 });
                found += 1;
            }
        }
        if found > 0 {
            info!(client_id = %client_id, ids = found, "QoS 2 packet ids of publishes journaled just before a crash restored: the vehicle's re-sends are duplicates, not journaled again");
        }
        let cell = SessionCell::new(client_id.clone(), state);
        let key = cell.key();
        for (filter, opts) in s.record.subscriptions {
            match shared.router.subscribe(&key, &filter, opts) {
                Ok(_) => {
                    shared.metrics.subscriptions_active.inc();
                    cell.lock().subscriptions.insert(filter, opts);
                }
                Err(e) => {
                    warn!(client_id = %client_id, filter, error = e, "stored subscription not restored")
                }
            }
        }
        if found > 0 && !forgot {
            cell.persist(&shared.store, &shared.metrics)
                .context("rewriting a restored session")?;
            rewritten += 1;
        }
        if forgot {
            // Written back at once: a later restart (when new records reuse those
            // sequences) must not bring the forgotten ids back.
            warn!(client_id = %client_id, "QoS 2 packet ids whose record the journal did not keep were forgotten; the vehicle's re-send will be journaled");
            cell.persist(&shared.store, &shared.metrics)
                .context("rewriting a restored session")?;
            rewritten += 1;
        }
        shared.registry.restore(cell, &shared.metrics);
    }
    // Resolved (or, for a session that is gone, moot): written after the records above,
    // so a flush covering these removals covers them.
    for m in &markers {
        shared
            .store
            .remove_qos2_pending(&m.client_id, m.pkid)
            .context("removing an inbound QoS 2 marker")?;
        rewritten += 1;
    }
    if bound.as_deref() != Some(journal_id.as_str()) {
        shared
            .store
            .bind_journal(&journal_id)
            .context("binding the store to the journal")?;
        rewritten += 1;
    }
    let retained_count = retained.len();
    shared.router.restore_retained(retained, &shared.metrics);
    info!(
        sessions = count,
        queued,
        retained = retained_count,
        "restored persistent sessions and retained messages"
    );
    Ok(rewritten)
}

/// Whether an inbound QoS 2 packet id stored with journal sequence `seq` is still a
/// duplicate guard after a restart: its record is in the journal that was recovered (up
/// to `recovered`). Sequence 0 means nothing was journaled (delivered here only): no
/// journal can have lost it, and forgetting it would deliver the client's re-send twice.
fn qos2_id_kept(seq: u64, same_journal: bool, recovered: u64) -> bool {
    seq == 0 || (same_journal && seq <= recovered)
}

async fn bind(addr: &str, key: &str) -> anyhow::Result<TcpListener> {
    let addr: SocketAddr = addr.parse().with_context(|| format!("{key} = {addr:?}"))?;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{key}: cannot listen on {addr}"))
}

/// Accepts connections and hands each to its own task at once: the TLS handshake and
/// the CONNECT run there under their timeouts, never here.
async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
) {
    let kind = if tls.is_some() { "tls" } else { "tcp" };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // The connection's span, from accept until its CONNACK: every refusal (limits,
        // TLS handshake, CONNECT, authentication) carries the listener and the peer, and
        // the client id once the CONNECT named it. The live session then runs under its
        // own debug span (see `session::open`): an enabled span costs its connection
        // about 0.5 KiB in the subscriber for as long as it lives.
        let span = tracing::info_span!("conn", listener = kind, %peer, client_id = tracing::field::Empty);
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            // The peer in the event too: with RUST_LOG=warn the span is not recorded.
            span.in_scope(|| {
                bridge::counted!(warn, shared.metrics.connections_rejected, "max_connections", %peer, max = shared.cfg.mqtt.max_connections, "connection refused: mqtt.max_connections reached")
            });
            // Told with a CONNACK (3 / 0x97) when its CONNECT comes within a second.
            session::refuse_busy(stream, peer, tls.clone(), &shared);
            continue;
        };
        shared.metrics.connections_accepted.inc(kind);
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        // Plain and TLS connections are separate task types, so a plain connection's task
        // reserves no room for TLS state (an idle connection's memory is mostly its task).
        match &tls {
            None => tracker.spawn(plain_connection(stream, peer, shared, permit, span)),
            Some(acceptor) => tracker.spawn(tls_connection(
                stream,
                peer,
                acceptor.clone(),
                shared,
                permit,
                span,
            )),
        };
    }
}

/// A plain connection's task is its session's future, nothing around it. (An async
/// wrapper keeps its arguments, and a future built first and awaited from a capture is
/// stored twice: that once made every idle connection's task 1,152 bytes instead of
/// about 640, measured with heaptrack.)
pub(crate) fn plain_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
    span: tracing::Span,
) -> impl std::future::Future<Output = ()> + Send {
    session::run(stream, peer, None, shared, permit, span)
}

/// A TLS connection's task: the handshake (boxed, freed once done), then the session.
/// Not an `async fn`, for the reasons given at [`plain_connection`]: the task keeps only
/// what the session needs for its whole life.
pub(crate) fn tls_connection(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
    span: tracing::Span,
) -> impl std::future::Future<Output = ()> + Send {
    // Everything the session needs goes into the boxed handshake and comes back out with
    // its result: captured by the task itself it would cost every TLS connection its
    // size for good (the task stores a capture beside the session's future).
    // Behind the set-up gate: a storm's handshakes take turns (a handshake waiting for
    // its peer's next flight holds no turn).
    // (Boxed once more: the gate's state inline would grow every TLS vehicle's task.)
    let gate = shared.setups.clone();
    let handshaking = Box::pin(session::gate::Gated::new(
        Box::pin(async move {
            let done = tls_handshake(stream, peer, acceptor, shared.clone())
                .instrument(span.clone())
                .await;
            done.map(|(tls_stream, identity)| (tls_stream, peer, identity, shared, permit, span))
        }),
        &gate,
    ));
    async move {
        // `let else`, not `if let`: an `if let` keeps its scrutinee (the whole TLS state)
        // alive, and so stored in the task, for as long as its body runs.
        let Some((tls_stream, peer, identity, shared, permit, span)) = handshaking.await else {
            return;
        };
        session::run(tls_stream, peer, identity, shared, permit, span).await;
    }
}

/// The TLS handshake under `tls.handshake_timeout_secs` (a connection still without a
/// session does not hold up a shutdown), and the identity of a verified client
/// certificate.
async fn tls_handshake(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
) -> Option<(tls::stream::TlsStream, Option<CertIdentity>)> {
    let handshake = Duration::from_secs(shared.cfg.tls.handshake_timeout_secs);
    let config = acceptor.config().clone();
    let handshaking = tokio::time::timeout(handshake, Box::pin(tls::stream::accept(stream, config)));
    let handshaken = tokio::select! {
        _ = shared.shutdown.cancelled() => return None,
        r = handshaking => r,
    };
    let tls_stream = match handshaken {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            bridge::counted!(warn, shared.metrics.connections_rejected, "tls_handshake_failed", %peer, error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            bridge::counted!(warn, shared.metrics.connections_rejected, "tls_handshake_timeout", %peer, "TLS handshake timed out");
            return None;
        }
    };
    let identity = tls_stream
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|c| CertIdentity::from_der(c.as_ref()));
    Some((tls_stream, identity))
}

#[cfg(test)]
mod tests {
    use super::qos2_id_kept;

    #[test]
    fn inbound_qos2_ids_are_forgotten_only_where_the_journal_lost_their_record() {
        // Journaled and kept by the journal: still a guard against the re-send.
        assert!(qos2_id_kept(7, true, 7));
        // Journaled in a tail the journal did not keep, or in another journal: forgotten,
        // so the re-send is journaled.
        assert!(!qos2_id_kept(8, true, 7));
        assert!(!qos2_id_kept(7, false, 7));
        // Never journaled (local delivery only): kept whatever the journal is.
        assert!(qos2_id_kept(0, true, 0));
        assert!(qos2_id_kept(0, false, 7));
    }
}
