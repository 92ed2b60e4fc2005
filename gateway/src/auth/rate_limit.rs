//! CONNECT rate limits: one token bucket per source address and one for the whole
//! gateway (`auth.connect_rate_per_ip` / `auth.connect_rate_global`, with bursts).
//!
//! The per-address table is bounded ([`MAX_TRACKED_ADDRESSES`]) and pruned: a bucket that
//! has refilled completely carries no information (a new bucket starts full), so it is
//! dropped, every [`PRUNE_EVERY`] and whenever the table is full. When the table is still
//! full of recently active addresses, a new address is not tracked and only the global
//! bucket applies to it. IPv6 addresses are grouped by their /64 prefix (one subscriber
//! line), IPv4-mapped IPv6 addresses count as IPv4.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most source addresses tracked at once (about 64 bytes each).
pub const MAX_TRACKED_ADDRESSES: usize = 65_536;
/// How often idle (full) buckets are dropped in passing.
pub const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// Which limit refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    PerAddress,
    Global,
}

#[derive(Debug, Clone, Copy)]
struct Rate {
    per_sec: f64,
    burst: f64,
}

impl Rate {
    /// `None` when unlimited (rate 0).
    fn new(per_sec: u32, burst: u32) -> Option<Rate> {
        (per_sec > 0).then(|| Rate {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst.max(1)),
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            tokens: rate.burst,
            last: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_sec).min(rate.burst);
        self.last = now;
    }

    fn take(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has refilled completely by `now` (it can be forgotten).
    fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * rate.per_sec >= rate.burst
    }
}

#[derive(Debug)]
struct State {
    global: Option<Bucket>,
    addresses: HashMap<IpAddr, Bucket>,
    last_prune: Instant,
}

/// The CONNECT admission check, shared by every listener.
#[derive(Debug)]
pub struct ConnectLimiter {
    per_address: Option<Rate>,
    global: Option<Rate>,
    capacity: usize,
    state: Mutex<State>,
}

impl ConnectLimiter {
    pub fn new(per_ip: u32, per_ip_burst: u32, global: u32, global_burst: u32) -> Self {
        Self::with_capacity(per_ip, per_ip_burst, global, global_burst, MAX_TRACKED_ADDRESSES)
    }

    fn with_capacity(
        per_ip: u32,
        per_ip_burst: u32,
        global: u32,
        global_burst: u32,
        capacity: usize,
    ) -> Self {
        let now = Instant::now();
        let global = Rate::new(global, global_burst);
        ConnectLimiter {
            per_address: Rate::new(per_ip, per_ip_burst),
            global,
            capacity,
            state: Mutex::new(State {
                global: global.map(|r| Bucket::full(r, now)),
                addresses: HashMap::new(),
                last_prune: now,
            }),
        }
    }

    /// Takes a token for one CONNECT attempt from `ip`, or says which limit refuses it.
    pub fn admit(&self, ip: IpAddr) -> Result<(), Limited> {
        self.admit_at(ip, Instant::now())
    }

    fn admit_at(&self, ip: IpAddr, now: Instant) -> Result<(), Limited> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rate) = self.per_address {
            let key = group(ip);
            let full = st.addresses.len() >= self.capacity;
            if (full && !st.addresses.contains_key(&key))
                || now.saturating_duration_since(st.last_prune) >= PRUNE_EVERY
            {
                // When full, prune at most every 100 ms: a flood of new addresses must not
                // turn every attempt into a scan of the table.
                if !full || now.saturating_duration_since(st.last_prune) >= Duration::from_millis(100) {
                    st.addresses.retain(|_, b| !b.is_full(rate, now));
                    st.last_prune = now;
                }
            }
            if st.addresses.len() < self.capacity || st.addresses.contains_key(&key) {
                let bucket = st.addresses.entry(key).or_insert_with(|| Bucket::full(rate, now));
                if !bucket.take(rate, now) {
                    return Err(Limited::PerAddress);
                }
            }
        }
        if let (Some(rate), Some(bucket)) = (self.global, st.global.as_mut()) {
            if !bucket.take(rate, now) {
                return Err(Limited::Global);
            }
        }
        Ok(())
    }

    /// Addresses currently tracked (bounded by [`MAX_TRACKED_ADDRESSES`]).
    pub fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .addresses
            .len()
    }
}

/// The unit one per-address bucket covers.
fn group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn per_address_burst_then_refill() {
        let l = ConnectLimiter::new(2, 3, 0, 0);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.admit_at(ip("10.0.0.1"), t0), Ok(()));
        }
        assert_eq!(l.admit_at(ip("10.0.0.1"), t0), Err(Limited::PerAddress));
        // Another address has its own bucket.
        assert_eq!(l.admit_at(ip("10.0.0.2"), t0), Ok(()));
        // Half a second at 2/s refills one token.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(l.admit_at(ip("10.0.0.1"), t1), Ok(()));
        assert_eq!(l.admit_at(ip("10.0.0.1"), t1), Err(Limited::PerAddress));
    }

    #[test]
    fn global_bucket_covers_all_addresses() {
        let l = ConnectLimiter::new(0, 0, 1, 2);
        let t0 = Instant::now();
        assert_eq!(l.admit_at(ip("10.0.0.1"), t0), Ok(()));
        assert_eq!(l.admit_at(ip("10.0.0.2"), t0), Ok(()));
        assert_eq!(l.admit_at(ip("10.0.0.3"), t0), Err(Limited::Global));
        assert_eq!(
            l.tracked(),
            0,
            "no per-address table when per-address is unlimited"
        );
    }

    #[test]
    fn ipv6_is_grouped_by_64_and_mapped_v4_is_v4() {
        let l = ConnectLimiter::new(1, 1, 0, 0);
        let t0 = Instant::now();
        assert_eq!(l.admit_at(ip("2001:db8:1:2::1"), t0), Ok(()));
        assert_eq!(
            l.admit_at(ip("2001:db8:1:2:ffff::9"), t0),
            Err(Limited::PerAddress),
            "same /64"
        );
        assert_eq!(l.admit_at(ip("10.1.1.1"), t0), Ok(()));
        assert_eq!(l.admit_at(ip("::ffff:10.1.1.1"), t0), Err(Limited::PerAddress));
    }

    #[test]
    fn table_is_bounded_and_pruned() {
        let l = ConnectLimiter::with_capacity(1, 1, 0, 0, 100);
        let t0 = Instant::now();
        for i in 0..1000u32 {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0A00_0000 + i));
            assert_eq!(l.admit_at(a, t0), Ok(()), "untracked addresses still pass");
            assert!(l.tracked() <= 100);
        }
        assert_eq!(l.tracked(), 100);
        // A second later every bucket is full again: the next new address prunes them.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.admit_at(ip("192.168.0.1"), t1), Ok(()));
        assert_eq!(l.tracked(), 1);
        // And the periodic prune keeps an idle table small without filling it.
        let t2 = t1 + PRUNE_EVERY;
        assert_eq!(l.admit_at(ip("192.168.0.2"), t2), Ok(()));
        assert_eq!(l.tracked(), 1);
    }
}
