//! Everything between the journal and Kafka.
//!
//! Data path: the write-ahead [`journal`] (every vehicle message is durable there before
//! the vehicle gets its PUBACK) → the [`producer`] pipeline (reads the journal in order,
//! writes to Kafka with `acks=all` and idempotence, releases records on confirmed
//! delivery) using [`routes`] to pick topic and key, under the [`supervisor`] (restarts
//! with back-off, marks the bridge failed); records Kafka refuses for good go to the
//! [`parked`] store. An operator [`replay`] re-sends records Kafka already confirmed from
//! the segments the journal retains for it. [`embedded`] is the dev-only
//! in-process Kafka for a first run.

pub mod commands;
pub mod embedded;
pub mod feed;
#[doc(hidden)]
pub mod fuzzing;
pub mod journal;
pub mod metrics;
pub mod parked;
pub mod producer;
pub mod replay;
pub mod routes;
pub mod supervisor;
pub mod topic;

pub use journal::{
    Entry, EntryKind, EntryRef, FullPolicy, Journal, JournalConfig, JournalError, JournalStats, Record,
    SegmentedJournal, TryAppend,
};
