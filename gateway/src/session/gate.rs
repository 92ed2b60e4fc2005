//! The set-up gate: connection set-up and tear-down yield the CPU to connected vehicles.
//!
//! A reconnect storm (a NAT, a load balancer or a cell network dropping thousands of
//! vehicles, all reconnecting at once) makes thousands of connection tasks runnable at
//! the same time: TLS handshakes, CONNECTs, presence events, and for the connections that
//! were cut, their goodbyes. Tokio runs tasks in arrival order, so a connected vehicle's
//! PUBLISH would wait behind all of them (about a second for 18,000 plain reconnects on 2
//! cores, measured by `bench.py --only storm`).
//!
//! The gate bounds how many of those tasks run at a time: each poll of a gated future
//! holds a permit, given back when the poll returns; a task without a permit parks on the
//! semaphore (fair, first come first served) instead of sitting in the run queue. A task
//! waiting for its peer holds no permit. There are two queues with the same number of
//! permits: set-ups that have not started (their first poll: the TLS server flight with its
//! key exchange and signature, the whole CONNECT, the whole goodbye) and set-ups that have
//! (the client's certificate and TLS Finished, a password check's result). A started
//! set-up thus waits only behind other started ones, never behind the whole storm, which
//! ran it into its handshake timeout when there was one queue (1,125 of 18,000 TLS
//! vehicles in one storm). With `mqtt.max_concurrent_setups` below the number of worker
//! threads, part of the machine always serves the vehicles already connected.
//!
//! Not gated: a goodbye after a takeover (the new owner already runs; its predecessor's
//! Will and `disconnected` event must not come after the new connection's traffic).
//! Closed at shutdown: everything still waiting then runs at once. Gates do not nest (a
//! gated future inside another would wait for a permit its outer poll holds).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use prometheus::IntGauge;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, TryAcquireError};

type Acquiring = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// The set-up gate's two queues (see the module documentation).
pub struct Gate {
    start: Arc<Semaphore>,
    resume: Arc<Semaphore>,
    /// Tasks queued for a permit (`gateway_setups_waiting`).
    waiting: IntGauge,
}

impl Gate {
    pub fn new(permits: usize, waiting: IntGauge) -> Self {
        Gate {
            start: Arc::new(Semaphore::new(permits)),
            resume: Arc::new(Semaphore::new(permits)),
            waiting,
        }
    }

    /// Opens the gate for good (shutdown): everything waiting runs at once.
    pub fn close(&self) {
        self.start.close();
        self.resume.close();
    }
}

/// `inner`, polled only while holding one of the gate's permits.
pub struct Gated<F> {
    inner: F,
    gate: Arc<Gate>,
    /// Queued for a permit (boxed: only a task that had to wait pays for it).
    acquiring: Option<Acquiring>,
    /// The first poll ran: the rest queue as started.
    started: bool,
}

impl<F> Gated<F> {
    pub fn new(inner: F, gate: &Arc<Gate>) -> Self {
        Gated {
            inner,
            gate: gate.clone(),
            acquiring: None,
            started: false,
        }
    }
}

impl<F: Future + Unpin> Future for Gated<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let queue = if this.started {
            &this.gate.resume
        } else {
            &this.gate.start
        };
        let permit = match this.acquiring.as_mut() {
            Some(acquiring) => match acquiring.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(p) => {
                    this.acquiring = None;
                    this.gate.waiting.dec();
                    p.ok()
                }
            },
            None => match queue.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(TryAcquireError::NoPermits) => {
                    let mut acquiring: Acquiring = Box::pin(queue.clone().acquire_owned());
                    match acquiring.as_mut().poll(cx) {
                        Poll::Pending => {
                            this.acquiring = Some(acquiring);
                            this.gate.waiting.inc();
                            return Poll::Pending;
                        }
                        Poll::Ready(p) => p.ok(),
                    }
                }
                // Closed at shutdown: everything runs at once.
                Err(TryAcquireError::Closed) => None,
            },
        };
        let polled = Pin::new(&mut this.inner).poll(cx);
        this.started = true;
        // Given back as soon as this poll ends: the next waiting set-up runs now.
        drop(permit);
        polled
    }
}

impl<F> Drop for Gated<F> {
    fn drop(&mut self) {
        // Dropped while queued (the connection timed out or the gateway stopped).
        if self.acquiring.is_some() {
            self.gate.waiting.dec();
        }
    }
}

/// The permits of `mqtt.max_concurrent_setups` (0: half the runtime's worker threads, at
/// least one; the workers follow `TOKIO_WORKER_THREADS` or else the CPUs this process
/// may use).
pub fn permits(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let workers = tokio::runtime::Handle::try_current().map_or_else(
        |_| std::thread::available_parallelism().map_or(1, usize::from),
        |h| h.metrics().num_workers(),
    );
    (workers / 2).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Never more than the permits run a first poll at once, a waiting task holds none,
    /// and every task finishes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn at_most_the_permits_run_at_once_and_waiting_holds_none() {
        let gate = Arc::new(Gate::new(2, IntGauge::new("w", "w").expect("gauge")));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (running, peak) = (running.clone(), peak.clone());
            let work = Box::pin(async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                // Busy inside the first poll, so that overlapping first polls would be seen.
                std::thread::sleep(std::time::Duration::from_micros(200));
                running.fetch_sub(1, Ordering::SeqCst);
                // Waiting (a peer's round trip): no permit held meanwhile.
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            });
            tasks.push(tokio::spawn(Gated::new(work, &gate)));
        }
        for t in tasks {
            t.await.expect("gated task");
        }
        assert!(
            peak.load(Ordering::SeqCst) <= 2,
            "peak {}",
            peak.load(Ordering::SeqCst)
        );
        assert_eq!(gate.start.available_permits(), 2);
        assert_eq!(gate.resume.available_permits(), 2);
    }

    /// A started set-up does not queue behind the set-ups that have not started: its second
    /// poll runs while every start permit is taken (one queue ran a storm's handshakes
    /// into their timeout).
    #[tokio::test(flavor = "current_thread")]
    async fn a_started_setup_does_not_queue_behind_new_ones() {
        let gate = Arc::new(Gate::new(1, IntGauge::new("w", "w").expect("gauge")));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(Gated::new(Box::pin(async move { rx.await.is_ok() }), &gate));
        // One thread: after these yields the task has had its first poll (gated, Pending).
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            gate.start.available_permits(),
            1,
            "the first poll kept its permit"
        );
        let held = gate
            .start
            .clone()
            .try_acquire_owned()
            .expect("the only start permit");
        tx.send(()).expect("task alive");
        let out = tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the second poll queued behind the gate")
            .expect("gated task");
        assert!(out);
        drop(held);
    }

    /// A one-permit gate whose permit the test holds, and a set-up queued behind it
    /// (given 20 ms to reach the queue; it answers 7 once it runs).
    async fn one_waiting() -> (
        IntGauge,
        Arc<Gate>,
        OwnedSemaphorePermit,
        tokio::task::JoinHandle<i32>,
    ) {
        let waiting = IntGauge::new("w", "w").expect("gauge");
        let gate = Arc::new(Gate::new(1, waiting.clone()));
        let held = gate
            .start
            .clone()
            .try_acquire_owned()
            .expect("the only start permit");
        let task = tokio::spawn(Gated::new(Box::pin(async { 7 }), &gate));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        (waiting, gate, held, task)
    }

    /// Shutdown closes the gate: a task waiting for a permit runs at once. The queue is
    /// in `gateway_setups_waiting` while it waits, and leaves it once it runs.
    #[tokio::test]
    async fn a_closed_gate_lets_the_waiting_run() {
        let (waiting, gate, held, task) = one_waiting().await;
        assert!(!task.is_finished(), "ran without a permit");
        assert_eq!(waiting.get(), 1);
        gate.close();
        let out = tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("still waiting after the gate closed")
            .expect("gated task");
        assert_eq!(out, 7);
        assert_eq!(waiting.get(), 0);
        drop(held);
    }

    /// A set-up dropped while queued (its connection timed out) leaves the queue's gauge.
    #[tokio::test]
    async fn a_dropped_waiter_leaves_the_gauge() {
        let (waiting, _gate, held, task) = one_waiting().await;
        assert_eq!(waiting.get(), 1);
        task.abort();
        assert!(task.await.is_err(), "aborted");
        assert_eq!(waiting.get(), 0);
        drop(held);
    }

    #[test]
    fn zero_means_half_the_cores_at_least_one() {
        assert_eq!(permits(3), 3);
        assert!(permits(0) >= 1);
    }
}
