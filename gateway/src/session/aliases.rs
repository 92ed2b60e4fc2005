//! MQTT 5 topic aliases (§3.3.2.3.4) of one connection, both directions: the client's
//! (it may shorten its PUBLISHes to `mqtt.topic_alias_max` topics; see
//! `Session::alias_slot`) and the gateway's (deliveries to a client whose CONNECT allowed
//! aliases, up to `mqtt.outbound_topic_aliases`: a vehicle's command topic crosses the
//! cellular link once per connection, then as two bytes).
//!
//! Invariants: an outbound alias is used bare (empty topic) only after a PUBLISH that set
//! it was written to this connection, so the client always knows it; an alias, once set,
//! is never remapped (first topics delivered keep them: a vehicle receives few distinct
//! topics); only topics of [`OUT_ALIAS_TOPIC_MIN`] to [`OUT_ALIAS_TOPIC_MAX`] bytes get
//! one, so the table holds at most `mqtt.outbound_topic_aliases` (≤ 64) × 256 bytes; a
//! delivery that would not fit the client's Maximum Packet Size with its alias (3 bytes
//! more the first time) goes without one. Aliases end with the connection: a resumed
//! session starts with none, and messages re-sent on reconnect carry their full topic.
//!
//! Allocated on first use (boxed in the session): most vehicles use neither direction.
//! A vehicle that allows aliases and receives one command holds about 150 bytes more
//! for the rest of its connection (the box, one slot, the topic).

/// Longest topic given an outbound alias: bounds what the table holds per connection.
pub const OUT_ALIAS_TOPIC_MAX: usize = 256;

/// Shortest topic given an outbound alias: a bare alias costs 3 bytes (the property) in
/// place of the topic's, so a shorter topic gains nothing.
pub const OUT_ALIAS_TOPIC_MIN: usize = 4;

#[derive(Debug, Default)]
pub struct Aliases {
    /// The client's: slot `n` holds alias `n + 1`'s topic, once it passed validation and
    /// the publish ACL.
    pub inbound: Vec<Option<String>>,
    /// The gateway's: alias `n + 1` is `outbound[n]`, in the order they were first sent.
    outbound: Vec<String>,
}

/// How a delivery names its topic towards the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutAlias {
    /// The client knows this alias: send it with an empty topic.
    Known(u16),
    /// A free alias: send it with the topic, then [`Aliases::learn`] it.
    New(u16),
}

impl OutAlias {
    pub fn alias(self) -> u16 {
        match self {
            OutAlias::Known(a) | OutAlias::New(a) => a,
        }
    }
}

/// The alias for a delivery of `topic` to a client that allows `max` aliases, given the
/// aliases sent so far (`None`: none yet). `None` when the topic gets no alias (too
/// long, or every alias is taken).
pub fn out_alias(table: Option<&Aliases>, topic: &str, max: u16) -> Option<OutAlias> {
    if max == 0 || !(OUT_ALIAS_TOPIC_MIN..=OUT_ALIAS_TOPIC_MAX).contains(&topic.len()) {
        return None;
    }
    let sent = table.map_or(&[][..], |t| &t.outbound[..]);
    if let Some(i) = sent.iter().position(|t| t == topic) {
        return u16::try_from(i + 1).ok().map(OutAlias::Known);
    }
    let next = u16::try_from(sent.len() + 1).ok()?;
    (next <= max).then_some(OutAlias::New(next))
}

impl Aliases {
    /// Records that a PUBLISH setting `alias` for `topic` was written to the connection.
    pub fn learn(&mut self, alias: OutAlias, topic: &str) {
        if let OutAlias::New(a) = alias {
            debug_assert_eq!(usize::from(a), self.outbound.len() + 1);
            if usize::from(a) == self.outbound.len() + 1 {
                // Exactly sized: most clients get one or two topics for a long connection.
                self.outbound.reserve_exact(1);
                self.outbound.push(topic.to_owned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_handed_out_once_and_reused() {
        let mut t = Aliases::default();
        assert_eq!(out_alias(None, "t/aa", 2), Some(OutAlias::New(1)));
        assert_eq!(out_alias(None, "t/aa", 0), None, "the client allows none");
        assert_eq!(out_alias(None, "t/a", 2), None, "too short to gain from one");
        // Not learnt (the write failed): offered again.
        assert_eq!(out_alias(Some(&t), "t/aa", 2), Some(OutAlias::New(1)));
        t.learn(OutAlias::New(1), "t/aa");
        assert_eq!(out_alias(Some(&t), "t/aa", 2), Some(OutAlias::Known(1)));
        assert_eq!(out_alias(Some(&t), "t/bb", 2), Some(OutAlias::New(2)));
        t.learn(OutAlias::New(2), "t/bb");
        assert_eq!(out_alias(Some(&t), "t/cc", 2), None, "every alias is taken");
        assert_eq!(out_alias(Some(&t), "t/bb", 2), Some(OutAlias::Known(2)));
        t.learn(OutAlias::Known(2), "t/bb");
        assert_eq!(t.outbound, ["t/aa", "t/bb"]);
        assert_eq!(t.outbound.capacity(), 2, "sized exactly");
        let long = "x".repeat(OUT_ALIAS_TOPIC_MAX + 1);
        assert_eq!(out_alias(Some(&t), &long, 100), None, "too long to hold");
    }
}
