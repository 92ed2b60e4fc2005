//! The admin listener's own accept loop: bounded and timed, so that the operator's port
//! cannot be used to exhaust the process.
//!
//! `axum::serve` accepts without limit and waits for request headers forever: a few
//! thousand idle sockets to the admin port used to take the process to its open-file
//! limit, after which the journal could not create a segment (EMFILE). Here:
//!
//! * at most `admin.max_connections` connections at once; beyond that a new socket is
//!   closed at accept and counted (`gateway_admin_connections_rejected_total`);
//! * request headers must arrive within `admin.request_timeout_secs`, and a whole
//!   connection (keep-alive included) lives at most [`MAX_LIFETIME_FACTOR`] times that,
//!   so a slow body or an idle keep-alive cannot hold a slot for long;
//! * accept errors (EMFILE and friends) back off instead of spinning;
//! * on shutdown the loop stops accepting and open connections finish gracefully.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// A connection's total lifetime, in units of the request timeout.
pub const MAX_LIFETIME_FACTOR: u32 = 6;

/// Bounds of the admin listener (`[admin]` keys).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub request_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown`, within `limits`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    rejected: prometheus::IntCounter,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let lifetime = limits.request_timeout * MAX_LIFETIME_FACTOR;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "admin: accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            rejected.inc();
            warn!(%peer, max = limits.max_connections, "admin: connection refused, admin.max_connections reached");
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.request_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let deadline = tokio::time::sleep(lifetime);
            tokio::pin!(deadline);
            let mut draining = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            debug!(%peer, error = %e, "admin: connection ended with an error");
                        }
                        return;
                    }
                    _ = stop.cancelled(), if !draining => {
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = &mut deadline => {
                        debug!(%peer, "admin: connection closed at its maximum lifetime");
                        return;
                    }
                }
            }
        });
    }
}
