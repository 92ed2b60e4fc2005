//! The end-of-run audit of the fault suite: what the fleet had acknowledged against what
//! Kafka holds. Lost (acknowledged, absent) must be zero; duplicates are counted and split
//! into gateway replays (the same journal record produced again, recognised by the
//! `gateway.journal` + `gateway.seq` headers) and client retries (a vehicle re-sent a
//! message whose PUBACK it never got: a new journal record with a new sequence).
//!
//! The consumer dedupe recipe (docs/RELIABILITY.md): read each partition in offset order;
//! per (`gateway.journal`, partition) remember the highest `gateway.seq` seen; drop a record
//! whose `gateway.seq` is not above it.

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::fleet::{parse_payload, VehicleLog};
use crate::kafka::Consumed;

#[derive(Debug, Default)]
pub struct Audit {
    /// PUBACKs the fleet received.
    pub acked: usize,
    /// Records in Kafka from this fleet.
    pub records: usize,
    /// Distinct (vehicle, counter) in Kafka.
    pub unique: usize,
    /// Acknowledged and absent from Kafka (count, first few).
    pub lost: usize,
    pub lost_examples: Vec<String>,
    /// `records - unique`.
    pub duplicates: usize,
    /// Vehicles whose first deliveries are not in counter order (first few).
    pub order_violations: Vec<String>,
    /// Every record carries `gateway.seq` and `gateway.journal`.
    pub headers_present: bool,
    /// Records the dedupe recipe dropped (gateway replays).
    pub replays: usize,
    /// Their `gateway.seq` values.
    pub replay_seqs: Vec<u64>,
    /// Records left after dedupe that repeat a (vehicle, counter) the vehicle itself sent
    /// more than once (client retries).
    pub client_retries: usize,
    /// Repeats after dedupe that client retries do not explain (must be empty).
    pub unexplained: Vec<String>,
    /// Records whose payload is not from this fleet.
    pub foreign: usize,
}

impl Audit {
    pub fn new(logs: &[VehicleLog], records: &[Consumed]) -> Audit {
        let mut a = Audit {
            acked: logs.iter().map(|l| l.acked.len()).sum(),
            headers_present: true,
            ..Audit::default()
        };
        let fleet: HashMap<&str, &VehicleLog> = logs.iter().map(|l| (l.id.as_str(), l)).collect();
        let mut sorted: Vec<&Consumed> = records.iter().collect();
        sorted.sort_by_key(|r| (r.partition, r.offset));
        let mut seen: HashSet<(String, u64)> = HashSet::new();
        let mut first_order: HashMap<String, Vec<u64>> = HashMap::new();
        let mut high: HashMap<(String, i32), u64> = HashMap::new();
        let mut kept: HashMap<(String, u64), u32> = HashMap::new();
        for r in sorted {
            let Some((id, n)) = parse_payload(&r.payload) else {
                a.foreign += 1;
                continue;
            };
            if !fleet.contains_key(id) {
                a.foreign += 1;
                continue;
            }
            a.records += 1;
            if seen.insert((id.to_string(), n)) {
                first_order.entry(id.to_string()).or_default().push(n);
            }
            let seq = r.header("gateway.seq").and_then(|s| s.parse::<u64>().ok());
            let journal = r.header("gateway.journal");
            let (Some(seq), Some(journal)) = (seq, journal) else {
                a.headers_present = false;
                continue;
            };
            let h = high.entry((journal.to_string(), r.partition)).or_insert(0);
            if seq <= *h {
                a.replays += 1;
                a.replay_seqs.push(seq);
                continue;
            }
            *h = seq;
            *kept.entry((id.to_string(), n)).or_insert(0) += 1;
        }
        a.unique = seen.len();
        a.duplicates = a.records - a.unique;
        for l in logs {
            for n in &l.acked {
                if !seen.contains(&(l.id.clone(), *n)) {
                    a.lost += 1;
                    if a.lost_examples.len() < 10 {
                        a.lost_examples.push(format!("{}:{n}", l.id));
                    }
                }
            }
        }
        for (id, ns) in &first_order {
            if let Some(w) = ns.windows(2).find(|w| w[1] <= w[0]) {
                if a.order_violations.len() < 10 {
                    a.order_violations
                        .push(format!("{id}: {} delivered first after {}", w[1], w[0]));
                }
            }
        }
        if a.headers_present {
            for ((id, n), count) in &kept {
                if *count <= 1 {
                    continue;
                }
                let sends = fleet
                    .get(id.as_str())
                    .and_then(|l| l.sent.get(n))
                    .copied()
                    .unwrap_or(0);
                if *count <= sends {
                    a.client_retries += (*count - 1) as usize;
                } else if a.unexplained.len() < 10 {
                    a.unexplained.push(format!(
                        "{id}:{n} kept {count} times after dedupe, sent {sends} times"
                    ));
                }
            }
        }
        a
    }

    /// Client re-sends the fleet made (upper bound of client-retry records).
    pub fn resends(logs: &[VehicleLog]) -> u64 {
        logs.iter()
            .flat_map(|l| l.resent().map(|(_, n)| u64::from(n - 1)))
            .sum()
    }
}

impl fmt::Display for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "acked {} | kafka records {} unique {} | lost {} {:?} | duplicates {} | order violations {:?} | \
             headers {} | replays (deduped) {} | client retries {} | unexplained {:?} | foreign {}",
            self.acked,
            self.records,
            self.unique,
            self.lost,
            self.lost_examples,
            self.duplicates,
            self.order_violations,
            self.headers_present,
            self.replays,
            self.client_retries,
            self.unexplained,
            self.foreign
        )
    }
}

/// Appends a line of figures to `$EDGE_FAULT_REPORT` (if set) and prints it.
pub fn report(test: &str, line: &str) {
    eprintln!("FAULT-REPORT {test}: {line}");
    if let Some(path) = std::env::var_os("EDGE_FAULT_REPORT") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{test}: {line}");
        }
    }
}

/// Whether the long variant was asked for (`EDGE_FAULT_LONG=1`).
pub fn long() -> bool {
    std::env::var("EDGE_FAULT_LONG").is_ok_and(|v| v == "1")
}

/// A small deterministic generator (xorshift); the seed comes from `EDGE_FAULT_SEED` or
/// the clock and is printed so that a failing run can be repeated.
pub struct Rng(u64);

impl Rng {
    pub fn from_env(test: &str) -> Rng {
        let seed = std::env::var("EDGE_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{test}: EDGE_FAULT_SEED={seed}");
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `lo..hi` (milliseconds, say).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }
}

/// Waits until the bridge released everything the journal made durable (both read from
/// `/metrics`), or `within` passes.
pub fn wait_drained(gw: &crate::Gateway, within: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        let m = gw.metrics();
        let durable = metric(&m, "gateway_journal_durable_seq");
        if durable > 0 && metric(&m, "gateway_journal_released_seq") == durable {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    false
}

/// One unlabelled (or exactly labelled) metric from Prometheus text; 0 when absent.
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|v| v as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(partition: i32, offset: i64, payload: &str, journal: &str, seq: u64) -> Consumed {
        Consumed {
            partition,
            offset,
            key: payload.split(':').next().unwrap_or("").to_string(),
            payload: payload.to_string(),
            headers: vec![
                ("gateway.journal".into(), journal.into()),
                ("gateway.seq".into(), seq.to_string()),
            ],
        }
    }

    fn log(id: &str, acked: &[u64], sent: &[(u64, u32)]) -> VehicleLog {
        VehicleLog {
            id: id.into(),
            acked: acked.to_vec(),
            sent: sent.iter().copied().collect(),
            connects: 1,
            next: acked.len() as u64,
        }
    }

    /// The recipe drops a replay (seq not above the highest seen), keeps a client retry
    /// (new seq), flags a repeat the client never sent, and finds a lost id.
    #[test]
    fn dedupe_recipe_separates_replays_from_client_retries() {
        let logs = vec![log("v", &[0, 1, 2, 3], &[(0, 1), (1, 1), (2, 2), (3, 1)])];
        let records = vec![
            rec(0, 0, "v:0", "j1", 1),
            rec(0, 1, "v:1", "j1", 2),
            rec(0, 2, "v:2", "j1", 3),
            // crash: replay from the checkpoint (seq 2), then the client's re-send of 2
            rec(0, 3, "v:1", "j1", 2),
            rec(0, 4, "v:2", "j1", 3),
            rec(0, 5, "v:2", "j1", 4),
        ];
        let a = Audit::new(&logs, &records);
        assert_eq!(a.lost, 1, "{a}");
        assert_eq!(a.duplicates, 3);
        assert_eq!(a.replays, 2);
        assert_eq!(a.client_retries, 1);
        assert!(a.unexplained.is_empty(), "{a}");
        assert!(a.order_violations.is_empty());
        let logs = vec![log("v", &[0, 1], &[(0, 1), (1, 1)])];
        let records = vec![
            rec(0, 0, "v:0", "j1", 1),
            rec(0, 1, "v:1", "j1", 2),
            rec(0, 2, "v:0", "j2", 1), // a recreated journal: a new identity, not a replay
        ];
        let a = Audit::new(&logs, &records);
        assert_eq!(a.replays, 0);
        assert_eq!(a.unexplained.len(), 1, "{a}");
        assert!(a.order_violations.is_empty());
    }
}
