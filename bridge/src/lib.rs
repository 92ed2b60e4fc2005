//! Everything between the journal and Kafka.
//!
//! Today this is the write-ahead [`journal`]: the durable log every vehicle message is
//! appended to before the vehicle gets its PUBACK. The Kafka producer pipeline that
//! drains it (and releases records once Kafka confirmed them) lands here next.

pub mod journal;

pub use journal::{Entry, Journal, JournalConfig, JournalError, JournalStats, Record, SegmentedJournal};
