//! Supervision of the producer pipeline: an error or a panic never ends forwarding
//! silently.
//!
//! [`supervise`] runs [`crate::producer::run`] in its own task and watches how it ends:
//!
//! * **Shutdown** (it returned `Ok` after [`Shutdown::stop_by`]): supervision ends.
//! * **Error or panic**: logged as an error, counted in [`BridgeStatus::restarts`], and the
//!   pipeline is started again after a back-off (by default 500 ms, doubling up to 30 s).
//!   Every restart replays from the release watermark, so nothing is lost.
//! * **Persistent failure**: after [`RestartPolicy::fail_after`] consecutive failures, or
//!   at once for an error a restart cannot fix ([`BridgeError::is_persistent`]: invalid
//!   producer configuration, corrupt journal data), the bridge is marked failed:
//!   [`BridgeStatus::failed`] gives the reason and [`BridgeStatus::state`] is
//!   [`State::Failed`] (`"failed"`), so `/healthz` and the metrics tell. Retries continue
//!   at the maximum back-off: an operator fix (topic created, disk repaired) is picked up.
//! * **Healthy again**: once a started pipeline has run for [`RestartPolicy::healthy_after`]
//!   without ending, the failure mark is cleared and the back-off and failure count reset.
//!
//! [`State::Failed`]: crate::producer::State::Failed

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{error, info};

use crate::journal::Journal;
use crate::producer::{self, BridgeControl, BridgeError, BridgeStatus, ProducerConfig, Shutdown};
use crate::routes::Routes;

/// Restart back-off and the failure thresholds.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    /// Wait before the first restart; doubles per consecutive failure.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// A pipeline that ran this long counts as healthy: failure mark cleared, back-off reset.
    pub healthy_after: Duration,
    /// Consecutive failures after which the bridge is marked failed.
    pub fail_after: u32,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            healthy_after: Duration::from_secs(30),
            fail_after: 3,
        }
    }
}

/// Runs the Kafka pipeline until `shutdown`, restarting it on errors and panics; see the
/// module doc. Returns once the pipeline stopped after a shutdown request.
pub async fn supervise<J: Journal>(
    journal: Arc<J>,
    routes: Arc<Routes>,
    cfg: ProducerConfig,
    status: Arc<BridgeStatus>,
    control: BridgeControl,
    shutdown: Shutdown,
    policy: RestartPolicy,
) {
    let st = status.clone();
    let stop = shutdown.clone();
    supervise_with(status, shutdown, policy, move || {
        producer::run(
            journal.clone(),
            routes.clone(),
            cfg.clone(),
            st.clone(),
            control.clone(),
            stop.clone(),
        )
    })
    .await
}

/// The supervision loop around any pipeline future `start()` makes (used by
/// [`supervise`]; public for tests of the policy without Kafka).
pub async fn supervise_with<F, Fut>(
    status: Arc<BridgeStatus>,
    shutdown: Shutdown,
    policy: RestartPolicy,
    mut start: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), BridgeError>> + Send + 'static,
{
    let mut backoff = policy.initial_backoff;
    let mut consecutive: u32 = 0;
    loop {
        let started = Instant::now();
        let mut task = tokio::spawn(start());
        let mut healthy = false;
        let joined = loop {
            tokio::select! {
                joined = &mut task => break joined,
                _ = tokio::time::sleep_until(started + policy.healthy_after), if !healthy => {
                    healthy = true;
                    consecutive = 0;
                    backoff = policy.initial_backoff;
                    if let Some(why) = status.failed() {
                        info!(previous = %why, "kafka bridge: pipeline healthy again");
                        status.set_failed(None);
                    }
                }
            }
        };
        let (reason, persistent) = match joined {
            Ok(Ok(())) => {
                if shutdown.is_requested() {
                    return;
                }
                ("pipeline ended without a shutdown request".to_string(), false)
            }
            Ok(Err(e)) => (e.to_string(), e.is_persistent()),
            Err(join) if join.is_panic() => {
                let payload = join.into_panic();
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-text panic payload".into());
                (format!("pipeline panicked: {msg}"), false)
            }
            Err(_) => ("pipeline task cancelled".to_string(), false),
        };
        if shutdown.is_requested() {
            error!(error = %reason, "kafka bridge: pipeline failed during shutdown; unconfirmed records stay in the journal");
            return;
        }
        consecutive = consecutive.saturating_add(1);
        status.restarts.inc();
        status.set_error(reason.clone());
        if persistent || consecutive >= policy.fail_after {
            let why = if persistent {
                format!(
                    "{reason} (not transient: fix the cause; retrying every {:?})",
                    policy.max_backoff
                )
            } else {
                format!("{reason} ({consecutive} consecutive failures)")
            };
            status.set_failed_persistent(persistent);
            status.set_failed(Some(why));
            if persistent {
                backoff = policy.max_backoff;
            }
        }
        error!(
            error = %reason,
            consecutive,
            persistent,
            retry_in = ?backoff,
            "kafka bridge: pipeline failed; restarting (the journal buffers meanwhile)"
        );
        tokio::select! {
            _ = shutdown.requested() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(policy.max_backoff);
    }
}
