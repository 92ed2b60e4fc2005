//! A command's ticket: it travels with the message into the vehicle's session queue and
//! reports what became of the command.
//!
//! Invariants:
//! - Exactly one final outcome per ticket: the first final report wins, later ones are
//!   ignored. `queued` is reported at most once and never after a final outcome.
//! - A ticket dropped without a final outcome (its session was discarded or expired
//!   with the command still queued) reports `dropped` from `Drop`, so no command ends
//!   silently. At shutdown (the sink is closed) a Kafka command stays unsettled instead
//!   (Kafka delivers it again after the restart; one held in a persistent session's
//!   store is restored), while a REST or MQTT one, which nothing re-delivers, reports
//!   `dropped` / `gateway_shutdown`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::outcome::{kafka_key, KafkaKey, Outcome, Report, Sink};

/// Where a command came from. (Kept in the store with bincode: no serde tagging.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// A record of the command topic: settled by committing past its offset.
    Kafka {
        topic: String,
        partition: i32,
        offset: i64,
    },
    /// `POST /api/v1/vehicles/{client_id}/commands`.
    Rest,
    /// An operator's PUBLISH to the vehicle's command topic.
    Mqtt { publisher: String },
}

impl Source {
    pub fn label(&self) -> &'static str {
        match self {
            Source::Kafka { .. } => "kafka",
            Source::Rest => "rest",
            Source::Mqtt { .. } => "mqtt",
        }
    }
}

/// What a ticket says about its command; kept in the store with a queued command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    pub id: String,
    pub client_id: String,
    pub correlation_id: Option<String>,
    pub source: Source,
    pub issued_at_ms: u64,
    pub qos: u8,
}

/// The latest word on a command, for REST callers waiting on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub outcome: Outcome,
    pub reason: Option<&'static str>,
}

/// The immutable part of a ticket, shared with the outcome reports.
#[derive(Debug)]
pub struct TicketInfo {
    pub record: CommandRecord,
    /// Set for callers that wait (REST `?wait=delivered`); sent once the outcome record
    /// is durable in the journal.
    pub waiter: Option<watch::Sender<Option<Progress>>>,
    /// When this gateway process took the command (for `gateway_command_latency_seconds`:
    /// a Kafka record's own timestamp is the producer's clock).
    pub taken_at: std::time::Instant,
}

const PENDING: u8 = 0;
const QUEUED: u8 = 1;
const FINAL: u8 = 2;

#[derive(Debug)]
pub struct Ticket {
    pub info: Arc<TicketInfo>,
    state: AtomicU8,
    sink: Arc<Sink>,
}

impl Ticket {
    pub(super) fn new(
        record: CommandRecord,
        waiter: Option<watch::Sender<Option<Progress>>>,
        sink: Arc<Sink>,
    ) -> Arc<Self> {
        Arc::new(Ticket {
            info: Arc::new(TicketInfo {
                record,
                waiter,
                taken_at: std::time::Instant::now(),
            }),
            state: AtomicU8::new(PENDING),
            sink,
        })
    }

    pub fn id(&self) -> &str {
        &self.info.record.id
    }

    pub fn record(&self) -> CommandRecord {
        self.info.record.clone()
    }

    /// The command reached a final outcome (the first call wins).
    pub fn finish(&self, outcome: Outcome, reason: Option<&'static str>) {
        debug_assert!(outcome.is_final());
        if self.state.swap(FINAL, Ordering::AcqRel) == FINAL {
            return;
        }
        self.sink.report(Report {
            info: self.info.clone(),
            outcome: Some(outcome),
            reason,
            store_gen: None,
        });
    }

    /// The command is in an offline session's queue; reported once the store write
    /// `store_gen` is flushed (then the Kafka offset may move past it).
    pub fn queued(&self, store_gen: Option<u64>) {
        if self
            .state
            .compare_exchange(PENDING, QUEUED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        self.sink.report(Report {
            info: self.info.clone(),
            outcome: Some(Outcome::Queued),
            reason: None,
            store_gen,
        });
    }

    /// Nothing to report (this gateway does not hold the vehicle and another reports
    /// `unknown_vehicle`): settles the source without an outcome record.
    pub fn settle_silently(&self) {
        self.settle(None);
    }

    /// A second copy of a command the session already holds: ends without a word (the
    /// held copy reports and settles).
    pub fn forget(&self) {
        self.state.store(FINAL, Ordering::Release);
    }

    /// A Kafka command read again that already reached a final outcome (reported and
    /// settling, `done` says its marker is in the store, or in a region another copy of
    /// it finished lately): settles without a word, after the original. False (nothing
    /// done) otherwise, or for another source.
    pub fn settle_if_finished(&self, done: impl FnOnce(&KafkaKey) -> bool) -> bool {
        let Some(key) = kafka_key(&self.info.record.source) else {
            return false;
        };
        if self.state.load(Ordering::Acquire) == FINAL {
            return false;
        }
        let report = Report {
            info: self.info.clone(),
            outcome: None,
            reason: None,
            store_gen: None,
        };
        let settled = self.sink.report_if_finished(&key, || done(&key), report);
        if settled {
            self.state.store(FINAL, Ordering::Release);
        }
        settled
    }

    /// Whether `queued` was reported (the command is settled at its source).
    pub fn is_queued(&self) -> bool {
        self.state.load(Ordering::Acquire) == QUEUED
    }

    /// Settles the source without an outcome record once the store write `store_gen`
    /// is flushed.
    pub fn settle_after_flush(&self, store_gen: u64) {
        self.settle(Some(store_gen));
    }

    /// Final without an outcome record: the source settles (after `store_gen`).
    fn settle(&self, store_gen: Option<u64>) {
        if self.state.swap(FINAL, Ordering::AcqRel) == FINAL {
            return;
        }
        self.sink.report(Report {
            info: self.info.clone(),
            outcome: None,
            reason: None,
            store_gen,
        });
    }

    pub fn is_final(&self) -> bool {
        self.state.load(Ordering::Acquire) == FINAL
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if *self.state.get_mut() == FINAL {
            return;
        }
        let reason = if !self.sink.is_closed() {
            "session_ended"
        } else if matches!(self.info.record.source, Source::Kafka { .. }) {
            return;
        } else {
            "gateway_shutdown"
        };
        self.sink.report(Report {
            info: self.info.clone(),
            outcome: Some(Outcome::Dropped),
            reason: Some(reason),
            store_gen: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> CommandRecord {
        CommandRecord {
            id: "rest-1-1".into(),
            client_id: "VIN1".into(),
            correlation_id: None,
            source: Source::Rest,
            issued_at_ms: 1,
            qos: 1,
        }
    }

    fn outcomes(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Report>) -> Vec<Option<Outcome>> {
        let mut out = Vec::new();
        while let Ok(r) = rx.try_recv() {
            out.push(r.outcome);
        }
        out
    }

    #[test]
    fn one_final_outcome_and_queued_only_before_it() {
        let (sink, mut rx) = Sink::new();
        let t = Ticket::new(record(), None, sink);
        t.queued(Some(3));
        t.queued(Some(4));
        t.finish(Outcome::Delivered, None);
        t.finish(Outcome::Expired, None);
        t.queued(None);
        t.settle_silently();
        drop(t);
        assert_eq!(
            outcomes(&mut rx),
            vec![Some(Outcome::Queued), Some(Outcome::Delivered)]
        );
    }

    #[test]
    fn a_ticket_dropped_unfinished_reports_dropped_but_a_kafka_one_stays_unsettled_at_shutdown() {
        let (sink, mut rx) = Sink::new();
        drop(Ticket::new(record(), None, sink.clone()));
        assert_eq!(outcomes(&mut rx), vec![Some(Outcome::Dropped)]);
        sink.close();
        let kafka = CommandRecord {
            source: Source::Kafka {
                topic: "t".into(),
                partition: 0,
                offset: 1,
            },
            ..record()
        };
        // Kafka delivers it again after the restart: no outcome now.
        drop(Ticket::new(kafka, None, sink.clone()));
        assert!(outcomes(&mut rx).is_empty());
        // Nothing re-delivers a REST command: it ends here.
        drop(Ticket::new(record(), None, sink));
        assert_eq!(outcomes(&mut rx), vec![Some(Outcome::Dropped)]);
    }

    #[test]
    fn a_kafka_command_read_again_after_its_final_outcome_settles_after_it_without_a_word() {
        let (sink, mut rx) = Sink::new();
        let kafka = CommandRecord {
            source: Source::Kafka {
                topic: "t".into(),
                partition: 0,
                offset: 7,
            },
            ..record()
        };
        let first = Ticket::new(kafka.clone(), None, sink.clone());
        // Not finished yet: a re-read is a command like any other.
        let early = Ticket::new(kafka.clone(), None, sink.clone());
        assert!(!early.settle_if_finished(|_| false));
        early.forget();
        // The vehicle acknowledged it; its done marker is not in the store yet.
        first.finish(Outcome::Delivered, None);
        let again = Ticket::new(kafka.clone(), None, sink.clone());
        assert!(
            again.settle_if_finished(|_| false),
            "guarded until the marker is written"
        );
        drop(again);
        // The marker was written: the store answers from now on.
        sink.finished(&kafka.source);
        assert_eq!(sink.finishing_len(), 0);
        let later = Ticket::new(kafka.clone(), None, sink.clone());
        assert!(!later.settle_if_finished(|_| false));
        later.forget();
        let marked = Ticket::new(kafka, None, sink);
        assert!(marked.settle_if_finished(|k| k.2 == 7));
        // The original's outcome, then the re-reads' silent settlements, in that order.
        assert_eq!(outcomes(&mut rx), vec![Some(Outcome::Delivered), None, None]);
    }

    #[test]
    fn in_a_region_a_second_copy_of_a_finished_command_settles_without_a_word_either_way() {
        let (sink, mut rx) = Sink::new();
        sink.remember_recent();
        let kafka = |id: &str, partition: i32, offset: i64| CommandRecord {
            id: id.into(),
            source: Source::Kafka {
                topic: "cmds".into(),
                partition,
                offset,
            },
            ..record()
        };
        let settled_elsewhere = |r: &CommandRecord| {
            // Its marker written and the offset committed past: only the memory of
            // recent identities can still tell.
            sink.finished(&r.source);
            if let Source::Kafka {
                partition, offset, ..
            } = r.source
            {
                sink.forget_below("cmds", partition, offset + 1);
            }
        };
        // The original delivered here (read after the vehicle moved here), then the
        // copy its previous gateway handed over: another partition and offset, same id.
        let original = kafka("kafka:cmds:0:7", 0, 7);
        Ticket::new(original.clone(), None, sink.clone()).finish(Outcome::Delivered, None);
        settled_elsewhere(&original);
        let copy = Ticket::new(kafka("kafka:cmds:0:7", 1, 40), None, sink.clone());
        assert!(copy.settle_if_finished(|_| false), "the copy is the second");
        // The other way round: the copy delivered first, the original read late.
        let copy = kafka("kafka:cmds:0:9", 1, 41);
        Ticket::new(copy.clone(), None, sink.clone()).finish(Outcome::Delivered, None);
        settled_elsewhere(&copy);
        let late = Ticket::new(kafka("kafka:cmds:0:9", 0, 9), None, sink.clone());
        assert!(late.settle_if_finished(|_| false), "the original is the second");
        // A command this gateway only let pass (not held here) is no reason to drop
        // the copy that reaches it once the vehicle is here.
        let passed = Ticket::new(kafka("kafka:cmds:0:11", 0, 11), None, sink.clone());
        passed.settle_silently();
        let copy = Ticket::new(kafka("kafka:cmds:0:11", 1, 42), None, sink.clone());
        assert!(!copy.settle_if_finished(|_| false), "delivered, not dropped");
        copy.forget();
        // Nor is an outcome about where the vehicle was: the original read here before
        // the vehicle subscribed again, or while nobody seemed to hold it.
        for (n, outcome, reason) in [
            (13, Outcome::Rejected, Some("not_subscribed")),
            (15, Outcome::UnknownVehicle, None),
            (17, Outcome::Dropped, Some("session_ended")),
        ] {
            let id = format!("kafka:cmds:0:{n}");
            Ticket::new(kafka(&id, 0, n), None, sink.clone()).finish(outcome, reason);
            settled_elsewhere(&kafka(&id, 0, n));
            let copy = Ticket::new(kafka(&id, 1, 40 + n), None, sink.clone());
            assert!(!copy.settle_if_finished(|_| false), "{outcome:?} {reason:?}");
            copy.forget();
        }
        // But the vehicle refusing it, or it expiring, ends every copy.
        let id = "kafka:cmds:0:19";
        Ticket::new(kafka(id, 0, 19), None, sink.clone())
            .finish(Outcome::Rejected, Some("refused_by_vehicle"));
        let copy = Ticket::new(kafka(id, 1, 59), None, sink.clone());
        assert!(copy.settle_if_finished(|_| false));
        assert_eq!(
            outcomes(&mut rx),
            vec![
                Some(Outcome::Delivered),
                None,
                Some(Outcome::Delivered),
                None,
                None,
                Some(Outcome::Rejected),
                Some(Outcome::UnknownVehicle),
                Some(Outcome::Dropped),
                Some(Outcome::Rejected),
                None
            ]
        );
    }

    #[test]
    fn a_single_gateway_keeps_no_memory_of_finished_commands() {
        let (sink, _rx) = Sink::new();
        let original = CommandRecord {
            id: "kafka:cmds:0:7".into(),
            source: Source::Kafka {
                topic: "cmds".into(),
                partition: 0,
                offset: 7,
            },
            ..record()
        };
        Ticket::new(original.clone(), None, sink.clone()).finish(Outcome::Delivered, None);
        sink.finished(&original.source);
        let again = Ticket::new(original, None, sink);
        assert!(!again.settle_if_finished(|_| false), "the store's markers answer");
        again.forget();
    }

    #[test]
    fn settling_silently_is_final_without_an_outcome() {
        let (sink, mut rx) = Sink::new();
        let t = Ticket::new(record(), None, sink);
        t.settle_silently();
        t.finish(Outcome::UnknownVehicle, None);
        drop(t);
        assert_eq!(outcomes(&mut rx), vec![None]);
    }
}
