//! The subscription trie: which subscriptions a PUBLISH topic reaches.
//!
//! # Contract
//!
//! * A subscription is identified by its owner `K` (a client id) and its *raw* filter, as
//!   it appeared in SUBSCRIBE (`$share/<group>/<filter>` included). Subscribing again
//!   with the same key and raw filter replaces the options and reports it
//!   (`subscribe` returns `true`), which retain handling 1 needs (MQTT 5 §3.3.1.3).
//! * [`SubscriptionTrie::route`] implements MQTT 5 §4.7 matching: `+` matches exactly one
//!   level (an empty one included), `#` matches its parent level and every level below
//!   (`a/#` matches `a`), and a topic starting with `$` is not matched by a filter whose
//!   first level is `+` or `#` (also the inner filter of a shared subscription).
//! * Non-shared subscriptions yield one [`Target`] per key, merged over all of the key's
//!   matching subscriptions (§3.3.4): the highest granted QoS, every distinct
//!   subscription identifier, `retain_as_published` if any sets it. A subscription with
//!   `no_local` is skipped when its key is the publisher.
//! * A shared subscription is a group name plus an inner filter; each one that matches
//!   delivers to exactly one member (§4.8.2), chosen round robin among the members that
//!   are [`Presence::Online`], or when none is, among those whose session still exists
//!   offline (their sessions queue it); a member whose session is gone is never chosen. Shared deliveries are separate targets (`shared = true`), never
//!   merged with the key's non-shared target; `no_local` is ignored for them (setting it
//!   on a shared subscription is a protocol error the caller rejects at SUBSCRIBE).
//! * Routing takes `&self`: the round-robin cursor of a group is an atomic, so routing
//!   runs under a read lock. Concurrent routers may pick the same member twice in a row;
//!   that only bends fairness, never delivers to zero or two members.
//! * Cost: a route visits each trie node at most once and only nodes on paths that can
//!   match (a literal level follows one child, `+` and `#` one each); subscribers are
//!   stored in their filter's node keyed by `K`, so a filter with many subscribers is
//!   one map walk, and merging is only done when several filters matched. A node's
//!   children and its direct subscribers are each a `SmallMap`: a vector searched
//!   linearly while it holds at most `SMALL` (8) entries, a hash map above, so a lookup,
//!   subscribe or unsubscribe costs O(1) (amortised) however many children or
//!   subscribers one node has (a `vehicles` level with a million vehicle ids under it,
//!   a broadcast topic with a million subscribers).
//! * Memory: unsubscribing frees every node left without subscriptions or children; when
//!   the last subscription goes, the trie is back to its initial, empty allocation.
//!   Nodes live in an arena (indices, not boxes), so neither a very deep filter nor
//!   dropping the trie recurses. The common node (one child, or one subscriber, no
//!   shared group) is what the layout is for: a million `vehicles/<id>/commands/#`
//!   subscriptions are three million nodes. A subscription node is 64 bytes (144 with a
//!   hash map for the children and two for the subscribers); a single child is kept in
//!   the node, other one-entry maps are one-entry vectors; a node without shared groups
//!   pays one null pointer for them; the arena grows by fixed chunks, so it never holds
//!   more than one chunk unused nor copies itself to grow.
//!
//! The order of the targets `route` returns is unspecified.

use std::borrow::Borrow;
use std::collections::{hash_map, HashMap};
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::SubOptions;
use crate::topic;

/// A SUBSCRIBE filter, sorted into plain and shared (MQTT 5 §4.8.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterKind<'a> {
    Plain(&'a str),
    Shared { group: &'a str, filter: &'a str },
}

/// Validates a raw SUBSCRIBE filter: `$share/<group>/<filter>` with a non-empty group
/// free of `/`, `+`, `#` and a valid inner filter, or else a valid plain filter.
pub fn parse_filter(raw: &str) -> Result<FilterKind<'_>, &'static str> {
    let Some(rest) = raw.strip_prefix("$share") else {
        return plain(raw);
    };
    if rest.is_empty() {
        return Err("shared subscription without a share name and topic filter");
    }
    // `$sharefoo/x` is an ordinary filter whose first level happens to start so.
    let Some(rest) = rest.strip_prefix('/') else {
        return plain(raw);
    };
    let Some((group, filter)) = rest.split_once('/') else {
        return Err("shared subscription without a topic filter");
    };
    if group.is_empty() {
        return Err("empty share name");
    }
    if group.contains(['+', '#']) {
        return Err("wildcard in a share name");
    }
    if group.contains('\0') {
        return Err("NUL character in a share name");
    }
    topic::validate_filter(filter)?;
    Ok(FilterKind::Shared { group, filter })
}

fn plain(raw: &str) -> Result<FilterKind<'_>, &'static str> {
    topic::validate_filter(raw)?;
    Ok(FilterKind::Plain(raw))
}

/// One delivery decided by [`SubscriptionTrie::route`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<K> {
    pub key: K,
    /// Deliver at min(message QoS, this).
    pub qos: u8,
    /// Subscription Identifiers to put in the PUBLISH (MQTT 5 §3.3.4), no duplicates.
    pub subscription_ids: Vec<u32>,
    /// Keep the RETAIN flag as published on this delivery.
    pub retain_as_published: bool,
    /// Chosen as the one member of a shared subscription.
    pub shared: bool,
}

/// Subscriptions by filter; see the module doc for the rules.
#[derive(Debug)]
pub struct SubscriptionTrie<K> {
    tree: Tree<Subs<K>>,
    len: usize,
}

/// A subscriber's key in the trie. No Local (MQTT 5 §3.8.3.1) is about client ids: a
/// message is not sent back to a connection with the publisher's client id. A key that
/// carries more than the client id (a session incarnation) says how to compare clients.
pub trait SubscriberKey: Clone + Eq + Hash {
    fn same_client(&self, other: &Self) -> bool {
        self == other
    }
}

impl<K: SubscriberKey> Default for SubscriptionTrie<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: SubscriberKey> SubscriptionTrie<K> {
    pub fn new() -> Self {
        SubscriptionTrie {
            tree: Tree::new(),
            len: 0,
        }
    }

    /// Adds `key`'s subscription to `raw_filter`, or replaces its options. `Ok(true)`
    /// when it replaced (the subscription existed), `Err` when the filter is invalid.
    pub fn subscribe(&mut self, key: K, raw_filter: &str, opts: SubOptions) -> Result<bool, &'static str> {
        let kind = parse_filter(raw_filter)?;
        let filter = match kind {
            FilterKind::Plain(f) | FilterKind::Shared { filter: f, .. } => f,
        };
        let at = self.tree.insert_path(filter.split('/'));
        let subs = &mut self.tree.node_mut(at).payload;
        let replaced = match kind {
            FilterKind::Plain(_) => subs.direct.insert(key, opts).is_some(),
            FilterKind::Shared { group, .. } => {
                let shared = subs.shared.get_or_insert_with(Box::default);
                if let Some(g) = shared.get_mut(group) {
                    g.insert(key, opts)
                } else {
                    let mut g = Group::default();
                    g.insert(key, opts);
                    shared.insert(group.into(), g);
                    false
                }
            }
        };
        if !replaced {
            self.len += 1;
        }
        Ok(replaced)
    }

    /// Removes `key`'s subscription to `raw_filter`; `false` if there was none (an invalid
    /// filter included).
    pub fn unsubscribe(&mut self, key: &K, raw_filter: &str) -> bool {
        let Ok(kind) = parse_filter(raw_filter) else {
            return false;
        };
        let filter = match kind {
            FilterKind::Plain(f) | FilterKind::Shared { filter: f, .. } => f,
        };
        let levels: Vec<&str> = filter.split('/').collect();
        let Some(path) = self.tree.find_path(&levels) else {
            return false;
        };
        let Some(&at) = path.last() else {
            return false;
        };
        let subs = &mut self.tree.node_mut(at).payload;
        let removed = match kind {
            FilterKind::Plain(_) => subs.direct.remove(key).is_some(),
            FilterKind::Shared { group, .. } => {
                let Some(shared) = subs.shared.as_deref_mut() else {
                    return false;
                };
                let removed = match shared.get_mut(group) {
                    Some(g) => {
                        let removed = g.remove(key);
                        if g.members.is_empty() {
                            shared.remove(group);
                        }
                        removed
                    }
                    None => false,
                };
                if shared.is_empty() {
                    subs.shared = None;
                }
                removed
            }
        };
        if removed {
            self.len -= 1;
            self.tree.prune(&path, &levels);
        }
        removed
    }

    /// Number of subscriptions (each shared-group membership counts as one).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Trie nodes in use besides the root: a gauge for memory, and the proof in tests
    /// that unsubscribing frees what subscribing built.
    pub fn node_count(&self) -> usize {
        self.tree.node_count()
    }

    /// Who receives a PUBLISH to `topic` (a topic name; an invalid one reaches nobody).
    /// `publisher` is the sending session's key, for `no_local`; `online` says whether a
    /// shared-group member can take a delivery now (every member's session exists).
    pub fn route(&self, topic: &str, publisher: Option<&K>, online: impl Fn(&K) -> bool) -> Vec<Target<K>> {
        self.route_with(topic, publisher, |k| {
            if online(k) {
                Presence::Online
            } else {
                Presence::Offline
            }
        })
    }

    /// [`Self::route`] where `presence` also tells a member whose session is gone (a
    /// discarded session whose filters are still being removed): a shared group never
    /// picks it while another member can take the message.
    pub fn route_with(
        &self,
        topic: &str,
        publisher: Option<&K>,
        presence: impl Fn(&K) -> Presence,
    ) -> Vec<Target<K>> {
        let mut out = Vec::new();
        if topic::validate_name(topic).is_err() {
            return out;
        }
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');

        // Nodes whose subscriptions match. Each node has a fixed depth, so each is
        // pushed at most once.
        let mut matched: Vec<usize> = Vec::new();
        let mut stack: Vec<(usize, usize)> = vec![(ROOT, 0)];
        while let Some((at, depth)) = stack.pop() {
            let node = self.tree.node(at);
            let wildcards = !(dollar && depth == 0);
            if wildcards {
                if let Some(&hash) = node.children.get("#") {
                    matched.push(hash);
                }
            }
            let Some(level) = levels.get(depth) else {
                matched.push(at);
                continue;
            };
            if let Some(&c) = node.children.get(level) {
                stack.push((c, depth + 1));
            }
            if wildcards {
                if let Some(&c) = node.children.get("+") {
                    stack.push((c, depth + 1));
                }
            }
        }

        let merging = matched
            .iter()
            .filter(|&&n| !self.tree.node(n).payload.direct.is_empty())
            .count()
            > 1;
        let mut seen: HashMap<&K, usize> = HashMap::new();
        for &n in &matched {
            for (key, opts) in &self.tree.node(n).payload.direct {
                if opts.no_local && publisher.is_some_and(|p| p.same_client(key)) {
                    continue;
                }
                if merging {
                    if let Some(t) = seen.get(key).and_then(|&i| out.get_mut(i)) {
                        merge(t, opts);
                        continue;
                    }
                    seen.insert(key, out.len());
                }
                out.push(target(key, opts, false));
            }
        }
        for &n in &matched {
            for group in self.tree.node(n).payload.shared.iter().flat_map(|s| s.values()) {
                if let Some((key, opts)) = group.pick(&presence) {
                    out.push(target(key, opts, true));
                }
            }
        }
        out
    }
}

/// Whether a subscriber's session can take a delivery, for the choice among the
/// members of a shared subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Connected: delivered now.
    Online,
    /// A persistent session offline: queued.
    Offline,
    /// Discarded; its filters are on their way out of the trie.
    Gone,
}

fn target<K: Clone>(key: &K, opts: &SubOptions, shared: bool) -> Target<K> {
    Target {
        key: key.clone(),
        qos: opts.qos,
        subscription_ids: opts.id.into_iter().collect(),
        retain_as_published: opts.retain_as_published,
        shared,
    }
}

fn merge<K>(t: &mut Target<K>, opts: &SubOptions) {
    t.qos = t.qos.max(opts.qos);
    if let Some(id) = opts.id {
        if !t.subscription_ids.contains(&id) {
            t.subscription_ids.push(id);
        }
    }
    t.retain_as_published |= opts.retain_as_published;
}

/// The subscriptions whose filter ends at one node.
#[derive(Debug)]
struct Subs<K> {
    direct: SmallMap<K, SubOptions>,
    /// By share name: the groups whose inner filter ends here. Boxed and `None` when there
    /// are none (never `Some` of an empty map), because most nodes have none and should
    /// pay a pointer for them, not an empty hash map.
    // The box is the point: 8 bytes here instead of 48.
    #[allow(clippy::box_collection)]
    shared: Option<Box<HashMap<Box<str>, Group<K>>>>,
}

impl<K> Default for Subs<K> {
    fn default() -> Self {
        Subs {
            direct: SmallMap::default(),
            shared: None,
        }
    }
}

impl<K> Payload for Subs<K> {
    fn is_empty(&self) -> bool {
        self.direct.is_empty() && self.shared.is_none()
    }
}

/// One shared subscription's members, in an order the round robin walks.
#[derive(Debug)]
struct Group<K> {
    members: Vec<(K, SubOptions)>,
    /// Position of each key in `members`.
    index: HashMap<K, usize>,
    /// Where the next pick starts looking.
    next: AtomicUsize,
}

impl<K> Default for Group<K> {
    fn default() -> Self {
        Group {
            members: Vec::new(),
            index: HashMap::new(),
            next: AtomicUsize::new(0),
        }
    }
}

impl<K: Clone + Eq + Hash> Group<K> {
    /// Adds or replaces; `true` when replaced.
    fn insert(&mut self, key: K, opts: SubOptions) -> bool {
        if let Some(m) = self.index.get(&key).and_then(|&i| self.members.get_mut(i)) {
            m.1 = opts;
            return true;
        }
        self.index.insert(key.clone(), self.members.len());
        self.members.push((key, opts));
        false
    }

    fn remove(&mut self, key: &K) -> bool {
        let Some(i) = self.index.remove(key) else {
            return false;
        };
        self.members.swap_remove(i);
        if let Some((moved, _)) = self.members.get(i) {
            if let Some(slot) = self.index.get_mut(moved) {
                *slot = i;
            }
        }
        true
    }

    /// The next online member after the previous pick, else the next member whose
    /// session exists offline. `None` for an empty group (never stored) or one whose
    /// members' sessions are all gone.
    fn pick(&self, presence: &impl Fn(&K) -> Presence) -> Option<&(K, SubOptions)> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.next.load(Ordering::Relaxed) % n;
        let first = |want: Presence| {
            (0..n)
                .map(|i| (start + i) % n)
                .find(|&i| self.members.get(i).is_some_and(|m| presence(&m.0) == want))
        };
        let chosen = first(Presence::Online).or_else(|| first(Presence::Offline))?;
        self.next.store(chosen + 1, Ordering::Relaxed);
        self.members.get(chosen)
    }
}

// ---------------------------------------------------------------------------------------
// The level tree shared with the retained index: an arena of nodes, children by level.

pub(super) const ROOT: usize = 0;

/// What a node carries; a node with an empty payload and no children is freed.
pub(super) trait Payload: Default {
    fn is_empty(&self) -> bool;
}

/// Longest topic level kept inline in a [`Level`].
const INLINE_LEVEL: usize = 22;

/// A topic level as a trie key: up to [`INLINE_LEVEL`] bytes inline (`commands`, `#`, a
/// 17-character VIN), longer ones boxed. A million `vehicles/<id>/commands/#`
/// subscriptions then allocate no string for their levels (three allocations of ~32
/// bytes each per vehicle with a `Box<str>`). 24 bytes either way.
#[derive(Clone)]
pub(super) struct Level(Repr);

/// Private, so that a `Level` is only ever built by `From<&str>`: its inline bytes are
/// then always a whole UTF-8 string of `len` bytes.
#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE_LEVEL] },
    Heap(Box<str>),
}

impl Level {
    pub(super) fn as_str(&self) -> &str {
        match &self.0 {
            // Built from a `&str` (below), so always UTF-8 of that length.
            Repr::Inline { len, bytes } => {
                std::str::from_utf8(bytes.get(..usize::from(*len)).unwrap_or_default()).unwrap_or_default()
            }
            Repr::Heap(s) => s,
        }
    }

    /// Whether the name lives inline (no allocation of its own).
    #[cfg(test)]
    fn is_inline(&self) -> bool {
        matches!(self.0, Repr::Inline { .. })
    }
}

impl From<&str> for Level {
    fn from(s: &str) -> Self {
        match u8::try_from(s.len()) {
            Ok(len) if s.len() <= INLINE_LEVEL => {
                let mut bytes = [0u8; INLINE_LEVEL];
                if let Some(dst) = bytes.get_mut(..s.len()) {
                    dst.copy_from_slice(s.as_bytes());
                }
                Level(Repr::Inline { len, bytes })
            }
            _ => Level(Repr::Heap(s.into())),
        }
    }
}

impl std::ops::Deref for Level {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Level {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

/// Equality and hashing are the string's, as `Borrow<str>` requires.
impl PartialEq for Level {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Level {}

impl Hash for Level {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl std::fmt::Debug for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

#[derive(Debug)]
pub(super) struct Node<P> {
    pub(super) children: Children,
    pub(super) payload: P,
}

impl<P: Default> Default for Node<P> {
    fn default() -> Self {
        Node {
            children: Children::default(),
            payload: P::default(),
        }
    }
}

/// A node's children by level name. Nearly always none or one: a vehicle's own path
/// (`<id>` → `commands` → `#`) has one child per level, so one child is kept in the node
/// itself, and more in a [`SmallMap`]. A one-entry vector instead was an allocation of
/// 48 bytes per level for every vehicle; inline, a node is 8 bytes larger.
#[derive(Debug)]
pub(super) enum Children {
    One(Level, usize),
    /// None, or more than one.
    Map(SmallMap<Level, usize>),
}

impl Default for Children {
    fn default() -> Self {
        Children::Map(SmallMap::default())
    }
}

impl Children {
    pub(super) fn get(&self, level: &str) -> Option<&usize> {
        match self {
            Children::One(l, c) => (l.as_str() == level).then_some(c),
            Children::Map(m) => m.get(level),
        }
    }

    /// Adds or replaces, returning the replaced node.
    pub(super) fn insert(&mut self, level: Level, node: usize) -> Option<usize> {
        match self {
            Children::One(l, c) if *l == level => Some(std::mem::replace(c, node)),
            Children::One(..) => {
                let Children::One(l, c) = std::mem::take(self) else {
                    return None;
                };
                let mut m = SmallMap::default();
                m.insert(l, c);
                m.insert(level, node);
                *self = Children::Map(m);
                None
            }
            Children::Map(m) if m.is_empty() => {
                *self = Children::One(level, node);
                None
            }
            Children::Map(m) => m.insert(level, node),
        }
    }

    pub(super) fn remove(&mut self, level: &str) -> Option<usize> {
        match self {
            Children::One(l, c) if l.as_str() == level => {
                let c = *c;
                *self = Children::default();
                Some(c)
            }
            Children::One(..) => None,
            Children::Map(m) => {
                let c = m.remove(level)?;
                if m.len() == 1 {
                    // Back inline: the vector goes.
                    let one = m.iter().next().map(|(l, c)| (l.clone(), *c));
                    if let Some((l, c)) = one {
                        *self = Children::One(l, c);
                    }
                }
                Some(c)
            }
        }
    }

    pub(super) fn len(&self) -> usize {
        match self {
            Children::One(..) => 1,
            Children::Map(m) => m.len(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn iter(&self) -> ChildIter<'_> {
        let (one, map) = match self {
            Children::One(l, c) => (Some((l, c)), None),
            Children::Map(m) => (None, Some(m.iter())),
        };
        one.into_iter().chain(map.into_iter().flatten())
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &usize> {
        self.iter().map(|(_, c)| c)
    }
}

/// The entries of [`Children`], in no particular order.
pub(super) type ChildIter<'a> = std::iter::Chain<
    std::option::IntoIter<(&'a Level, &'a usize)>,
    std::iter::Flatten<std::option::IntoIter<Iter<'a, Level, usize>>>,
>;

impl<'a> IntoIterator for &'a Children {
    type Item = (&'a Level, &'a usize);
    type IntoIter = ChildIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Most entries a [`SmallMap`] keeps in a vector; one more makes it a hash map. Up to
/// here a linear search over short keys is as fast as hashing the key once.
const SMALL: usize = 8;

/// A hash map that shrinks to this many entries goes back to a vector. Lower than
/// [`SMALL`] so that a map going back and forth across the threshold does not convert
/// on every operation: between two conversions there are at least `SMALL / 2` inserts
/// or removes, so each operation stays O(1) amortised.
const BACK_TO_SMALL: usize = SMALL / 2;

/// A map for the sizes trie nodes have: nearly always zero or one entry, now and then a
/// few, once in a while a million (children of a `vehicles` level, subscribers of a
/// broadcast topic). Small, it is a vector of exactly the length it needs rounded up to a
/// power of two (no four-entry minimum, no hash table buckets and control bytes); large,
/// a boxed hash map (a pointer while small maps are the norm). 24 bytes either way.
#[derive(Debug)]
pub(super) enum SmallMap<K, V> {
    /// At most [`SMALL`] entries, unique keys, in no particular order.
    Small(Vec<(K, V)>),
    /// More than [`BACK_TO_SMALL`] entries.
    // Boxed so the enum is the vector's 24 bytes, not the hash map's 48.
    #[allow(clippy::box_collection)]
    Large(Box<HashMap<K, V>>),
}

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        SmallMap::Small(Vec::new())
    }
}

impl<K: Eq + Hash, V> SmallMap<K, V> {
    pub(super) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        match self {
            SmallMap::Small(v) => v.iter().find(|(k, _)| k.borrow() == key).map(|(_, x)| x),
            SmallMap::Large(m) => m.get(key),
        }
    }

    /// Adds or replaces, returning the replaced value.
    pub(super) fn insert(&mut self, key: K, value: V) -> Option<V> {
        let v = match self {
            SmallMap::Large(m) => return m.insert(key, value),
            SmallMap::Small(v) => v,
        };
        if let Some((_, x)) = v.iter_mut().find(|(k, _)| *k == key) {
            return Some(std::mem::replace(x, value));
        }
        if v.len() < SMALL {
            if v.len() == v.capacity() {
                // 1, 2, 4, 8: `push` would start at 4 entries.
                v.reserve_exact(v.len().max(1));
            }
            v.push((key, value));
        } else {
            let mut m = HashMap::with_capacity(2 * SMALL);
            m.extend(v.drain(..));
            m.insert(key, value);
            *self = SmallMap::Large(Box::new(m));
        }
        None
    }

    /// Removes `key`'s entry. Gives memory back as the map empties: a vector at a quarter
    /// of its capacity halves, a hash map at a quarter of its capacity is rehashed to half,
    /// and one down to [`BACK_TO_SMALL`] entries becomes a vector. Each of these moves
    /// O(n) entries only after Ω(n) operations since the last resize, so removal stays
    /// O(1) amortised, as growing a hash map is.
    pub(super) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        match self {
            SmallMap::Small(v) => {
                let i = v.iter().position(|(k, _)| k.borrow() == key)?;
                let (_, x) = v.swap_remove(i);
                if v.len() <= v.capacity() / 4 {
                    v.shrink_to(2 * v.len());
                }
                Some(x)
            }
            SmallMap::Large(m) => {
                let x = m.remove(key)?;
                if m.len() <= BACK_TO_SMALL {
                    let v: Vec<(K, V)> = m.drain().collect();
                    *self = SmallMap::Small(v);
                } else if m.len() <= m.capacity() / 4 {
                    m.shrink_to(2 * m.len());
                }
                Some(x)
            }
        }
    }
}

impl<K, V> SmallMap<K, V> {
    pub(super) fn len(&self) -> usize {
        match self {
            SmallMap::Small(v) => v.len(),
            SmallMap::Large(m) => m.len(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn iter(&self) -> Iter<'_, K, V> {
        match self {
            SmallMap::Small(v) => Iter::Small(v.iter()),
            SmallMap::Large(m) => Iter::Large(m.iter()),
        }
    }
}

impl<'a, K, V> IntoIterator for &'a SmallMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// The entries of a [`SmallMap`], in no particular order.
pub(super) enum Iter<'a, K, V> {
    Small(std::slice::Iter<'a, (K, V)>),
    Large(hash_map::Iter<'a, K, V>),
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Small(it) => it.next().map(|(k, x)| (k, x)),
            Iter::Large(it) => it.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            Iter::Small(it) => it.size_hint(),
            Iter::Large(it) => it.size_hint(),
        }
    }
}

/// log2 of the nodes per arena chunk.
const CHUNK_BITS: u32 = 10;
/// Nodes per arena chunk (a power of two: the first chunk, grown by doubling from one
/// node, reaches it exactly).
const CHUNK: usize = 1 << CHUNK_BITS;

/// Node `ROOT` always exists; freed nodes are reset to empty and reused.
#[derive(Debug)]
pub(super) struct Tree<P> {
    /// The arena, in chunks of [`CHUNK`] nodes, all full but the last; node `i` is
    /// `chunks[i / CHUNK][i % CHUNK]`. One vector of three million nodes growing by
    /// doubling would hold up to half of itself unused and copy itself at each growth
    /// (old and new buffer alive at once); chunks leave at most one chunk unused and never
    /// move a node. The first chunk grows like a vector, so a small tree stays small.
    chunks: Vec<Vec<Node<P>>>,
    free: Vec<usize>,
}

impl<P: Payload> Tree<P> {
    pub(super) fn new() -> Self {
        Tree {
            chunks: vec![vec![Node::default()]],
            free: Vec::new(),
        }
    }

    /// Indices come only from this tree (children maps, paths), so they are in range.
    pub(super) fn node(&self, at: usize) -> &Node<P> {
        &self.chunks[at >> CHUNK_BITS][at & (CHUNK - 1)]
    }

    pub(super) fn node_mut(&mut self, at: usize) -> &mut Node<P> {
        &mut self.chunks[at >> CHUNK_BITS][at & (CHUNK - 1)]
    }

    /// All nodes, free ones included (their payload is empty).
    pub(super) fn nodes(&self) -> impl Iterator<Item = &Node<P>> {
        self.chunks.iter().flatten()
    }

    pub(super) fn node_count(&self) -> usize {
        self.slots() - 1 - self.free.len()
    }

    /// Nodes in the arena, free ones included.
    fn slots(&self) -> usize {
        let full = (self.chunks.len() - 1) * CHUNK;
        full + self.chunks.last().map_or(0, Vec::len)
    }

    /// The node at the end of `levels`, created as needed.
    pub(super) fn insert_path<'a>(&mut self, levels: impl Iterator<Item = &'a str>) -> usize {
        let mut at = ROOT;
        for level in levels {
            at = match self.node(at).children.get(level) {
                Some(&c) => c,
                None => {
                    let c = self.alloc();
                    self.node_mut(at).children.insert(level.into(), c);
                    c
                }
            };
        }
        at
    }

    /// The nodes from the root to the end of `levels` (`levels.len() + 1` of them), or
    /// `None` if that path does not exist.
    pub(super) fn find_path(&self, levels: &[&str]) -> Option<Vec<usize>> {
        let mut path = Vec::with_capacity(levels.len() + 1);
        let mut at = ROOT;
        path.push(at);
        for level in levels {
            at = *self.node(at).children.get(level)?;
            path.push(at);
        }
        Some(path)
    }

    pub(super) fn find<'a>(&self, levels: impl Iterator<Item = &'a str>) -> Option<usize> {
        let mut at = ROOT;
        for level in levels {
            at = *self.node(at).children.get(level)?;
        }
        Some(at)
    }

    /// Frees the nodes at the end of `path` (as returned by `find_path` for `levels`)
    /// that hold nothing any more; back to the initial allocation once all is empty.
    pub(super) fn prune(&mut self, path: &[usize], levels: &[&str]) {
        for i in (1..path.len()).rev() {
            let at = path[i];
            let node = self.node(at);
            if !node.children.is_empty() || !node.payload.is_empty() {
                break;
            }
            self.node_mut(path[i - 1]).children.remove(levels[i - 1]);
            *self.node_mut(at) = Node::default();
            self.free.push(at);
        }
        let root = self.node(ROOT);
        if root.children.is_empty() && root.payload.is_empty() {
            *self = Tree::new();
        }
    }

    fn alloc(&mut self) -> usize {
        if let Some(at) = self.free.pop() {
            return at;
        }
        let at = self.slots();
        match self.chunks.last_mut() {
            Some(last) if last.len() < CHUNK => last.push(Node::default()),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK);
                chunk.push(Node::default());
                self.chunks.push(chunk);
            }
        }
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl SubscriberKey for u32 {}
    impl SubscriberKey for std::sync::Arc<str> {}
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    type Trie = SubscriptionTrie<u32>;

    fn opts(qos: u8) -> SubOptions {
        SubOptions::qos(qos)
    }

    fn with_id(qos: u8, id: u32) -> SubOptions {
        SubOptions {
            id: Some(id),
            ..SubOptions::qos(qos)
        }
    }

    /// Sorted keys of the non-shared targets.
    fn keys(targets: &[Target<u32>]) -> Vec<u32> {
        let mut k: Vec<u32> = targets.iter().filter(|t| !t.shared).map(|t| t.key).collect();
        k.sort_unstable();
        k
    }

    fn route(trie: &Trie, topic: &str) -> Vec<Target<u32>> {
        trie.route(topic, None, |_| true)
    }

    fn one(trie: &mut Trie, filter: &str) -> Vec<u32> {
        trie.subscribe(1, filter, opts(0)).expect("valid filter");
        let mut hits = Vec::new();
        for topic in ["a", "a/b", "a/b/c", "a//c", "/a", "b", "$SYS/a", "$SYS", "a/"] {
            if !route(trie, topic).is_empty() {
                hits.push(topic);
            }
        }
        assert!(trie.unsubscribe(&1, filter));
        hits.into_iter()
            .map(|t| match t {
                "a" => 0,
                "a/b" => 1,
                "a/b/c" => 2,
                "a//c" => 3,
                "/a" => 4,
                "b" => 5,
                "$SYS/a" => 6,
                "$SYS" => 7,
                _ => 8,
            })
            .collect()
    }

    #[test]
    fn parse_filters() {
        assert_eq!(parse_filter("a/+/#"), Ok(FilterKind::Plain("a/+/#")));
        assert_eq!(
            parse_filter("$share/g/a/+"),
            Ok(FilterKind::Shared {
                group: "g",
                filter: "a/+"
            })
        );
        assert_eq!(
            parse_filter("$share/g/#"),
            Ok(FilterKind::Shared {
                group: "g",
                filter: "#"
            })
        );
        assert_eq!(parse_filter("$sharex/a"), Ok(FilterKind::Plain("$sharex/a")));
        for bad in [
            "$share",
            "$share/",
            "$share/g",
            "$share/g/",
            "$share//a",
            "$share/g+/a",
            "$share/+/a",
            "$share/#/a",
            "$share/g#/a",
            "$share/g/a/#/b",
            "$share/g\0/a",
            "",
            "a/#/b",
            "a+",
        ] {
            assert!(parse_filter(bad).is_err(), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn wildcard_rules() {
        let mut t = Trie::new();
        // topics: a, a/b, a/b/c, a//c, /a, b, $SYS/a, $SYS, a/
        assert_eq!(one(&mut t, "a"), vec![0]);
        assert_eq!(one(&mut t, "a/#"), vec![0, 1, 2, 3, 8]);
        assert_eq!(one(&mut t, "a/+"), vec![1, 8]);
        assert_eq!(one(&mut t, "a/+/c"), vec![2, 3]);
        assert_eq!(one(&mut t, "+"), vec![0, 5]);
        assert_eq!(one(&mut t, "+/a"), vec![4]);
        assert_eq!(one(&mut t, "#"), vec![0, 1, 2, 3, 4, 5, 8]);
        assert_eq!(one(&mut t, "+/#"), vec![0, 1, 2, 3, 4, 5, 8]);
        assert_eq!(one(&mut t, "$SYS/#"), vec![6, 7]);
        assert_eq!(one(&mut t, "$SYS/+"), vec![6]);
        assert_eq!(one(&mut t, "+/+"), vec![1, 4, 8]);
        assert_eq!(one(&mut t, "$share/g/#"), vec![0, 1, 2, 3, 4, 5, 8]);
        assert_eq!(one(&mut t, "$share/g/+/a"), vec![4]);
        assert_eq!(one(&mut t, "$share/g/$SYS/#"), vec![6, 7]);
        assert!(t.is_empty());
        assert_eq!(t.node_count(), 0);
    }

    #[test]
    fn invalid_topic_reaches_nobody() {
        let mut t = Trie::new();
        t.subscribe(1, "#", opts(0)).expect("valid");
        assert!(route(&t, "").is_empty());
        assert!(route(&t, "a/+").is_empty());
        assert!(route(&t, "a/#").is_empty());
        assert_eq!(route(&t, "a").len(), 1);
    }

    #[test]
    fn subscribe_replaces_and_counts() {
        let mut t = Trie::new();
        assert_eq!(t.subscribe(1, "a/b", opts(0)), Ok(false));
        assert_eq!(t.subscribe(1, "a/b", opts(2)), Ok(true));
        assert_eq!(t.subscribe(2, "a/b", opts(1)), Ok(false));
        assert_eq!(t.subscribe(1, "$share/g/a/b", opts(1)), Ok(false));
        assert_eq!(t.subscribe(1, "$share/g/a/b", opts(1)), Ok(true));
        assert_eq!(t.subscribe(1, "$share/h/a/b", opts(1)), Ok(false));
        assert!(t.subscribe(1, "a/#/b", opts(1)).is_err());
        assert_eq!(t.len(), 4);
        let targets = route(&t, "a/b");
        let one = targets.iter().find(|x| x.key == 1 && !x.shared).expect("key 1");
        assert_eq!(one.qos, 2);
        assert!(!t.unsubscribe(&3, "a/b"));
        assert!(!t.unsubscribe(&1, "a/c"));
        assert!(!t.unsubscribe(&1, "$share/x/a/b"));
        assert!(!t.unsubscribe(&1, "a/#/b"));
        assert!(t.unsubscribe(&1, "a/b"));
        assert!(!t.unsubscribe(&1, "a/b"));
        assert!(t.unsubscribe(&1, "$share/g/a/b"));
        assert!(t.unsubscribe(&1, "$share/h/a/b"));
        assert_eq!(t.len(), 1);
        assert!(t.unsubscribe(&2, "a/b"));
        assert!(t.is_empty());
        assert_eq!(t.node_count(), 0);
    }

    #[test]
    fn pruning_frees_only_empty_nodes() {
        let mut t = Trie::new();
        t.subscribe(1, "a/b/c/d", opts(0)).expect("valid");
        t.subscribe(1, "a/b", opts(0)).expect("valid");
        t.subscribe(1, "x", opts(0)).expect("valid");
        assert_eq!(t.node_count(), 5);
        assert!(t.unsubscribe(&1, "a/b/c/d"));
        assert_eq!(t.node_count(), 3);
        assert_eq!(keys(&route(&t, "a/b")), vec![1]);
        assert!(t.unsubscribe(&1, "a/b"));
        assert_eq!(t.node_count(), 1);
        // Freed nodes are reused.
        t.subscribe(2, "p/q", opts(0)).expect("valid");
        assert_eq!(t.node_count(), 3);
        assert_eq!(keys(&route(&t, "p/q")), vec![2]);
        assert!(route(&t, "a/b").is_empty());
    }

    #[test]
    fn deep_filter_does_not_recurse() {
        let mut t = Trie::new();
        let deep = vec!["a"; 100_000].join("/");
        t.subscribe(1, &deep, opts(1)).expect("valid");
        assert_eq!(keys(&route(&t, &deep)), vec![1]);
        drop(t);
        let mut t = Trie::new();
        t.subscribe(1, &deep, opts(1)).expect("valid");
        assert!(t.unsubscribe(&1, &deep));
        assert_eq!(t.node_count(), 0);
    }

    #[test]
    fn non_shared_targets_are_merged_per_key() {
        let mut t = Trie::new();
        t.subscribe(1, "a/+", with_id(0, 7)).expect("valid");
        t.subscribe(1, "a/#", with_id(2, 8)).expect("valid");
        t.subscribe(1, "#", with_id(1, 7)).expect("valid");
        t.subscribe(
            1,
            "a/b",
            SubOptions {
                retain_as_published: true,
                ..opts(0)
            },
        )
        .expect("valid");
        t.subscribe(2, "a/b", opts(1)).expect("valid");
        let targets = route(&t, "a/b");
        assert_eq!(targets.len(), 2);
        let one = targets.iter().find(|x| x.key == 1).expect("key 1");
        assert_eq!(one.qos, 2);
        let mut ids = one.subscription_ids.clone();
        ids.sort_unstable();
        assert_eq!(ids, vec![7, 8]);
        assert!(one.retain_as_published);
        assert!(!one.shared);
        let two = targets.iter().find(|x| x.key == 2).expect("key 2");
        assert_eq!((two.qos, two.subscription_ids.is_empty()), (1, true));
        assert!(!two.retain_as_published);
        // Only `#` and `a/#` match `a`.
        let targets = route(&t, "a");
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].qos, 2);
    }

    #[test]
    fn no_local_skips_only_that_subscription() {
        let mut t = Trie::new();
        let nl = SubOptions {
            no_local: true,
            ..with_id(2, 1)
        };
        t.subscribe(1, "a/b", nl).expect("valid");
        t.subscribe(1, "a/+", with_id(0, 2)).expect("valid");
        t.subscribe(2, "a/b", nl).expect("valid");
        t.subscribe(1, "$share/g/a/b", nl).expect("valid");
        let targets = t.route("a/b", Some(&1), |_| true);
        let direct: Vec<_> = targets.iter().filter(|x| !x.shared).collect();
        assert_eq!(direct.len(), 2);
        let one = direct.iter().find(|x| x.key == 1).expect("key 1");
        assert_eq!((one.qos, one.subscription_ids.clone()), (0, vec![2]));
        // no_local does not apply to a shared subscription.
        let shared: Vec<_> = targets.iter().filter(|x| x.shared).collect();
        assert_eq!(shared.len(), 1);
        assert_eq!(shared[0].key, 1);
        // Only the no_local subscription, publisher is the key: nothing.
        assert!(t.unsubscribe(&1, "a/+"));
        let targets = t.route("a/b", Some(&1), |_| true);
        assert_eq!(keys(&targets), vec![2]);
        // Other publishers and none at all still reach it.
        assert_eq!(keys(&t.route("a/b", Some(&3), |_| true)), vec![1, 2]);
        assert_eq!(keys(&t.route("a/b", None, |_| true)), vec![1, 2]);
    }

    #[test]
    fn shared_round_robin() {
        let mut t = Trie::new();
        for k in 1..=3 {
            t.subscribe(k, "$share/g/a/+", with_id(1, 10 + k)).expect("valid");
        }
        t.subscribe(9, "$share/h/a/b", opts(2)).expect("valid");
        t.subscribe(1, "a/b", opts(0)).expect("valid");
        let mut counts = BTreeMap::new();
        for _ in 0..30 {
            let targets = route(&t, "a/b");
            assert_eq!(targets.len(), 3, "{targets:?}");
            let g: Vec<_> = targets.iter().filter(|x| x.shared && x.key != 9).collect();
            assert_eq!(g.len(), 1);
            assert_eq!(g[0].subscription_ids, vec![10 + g[0].key]);
            assert_eq!(g[0].qos, 1);
            *counts.entry(g[0].key).or_insert(0) += 1;
            // The same key's non-shared delivery is separate.
            assert!(targets.iter().any(|x| x.key == 1 && !x.shared));
            assert!(targets.iter().any(|x| x.key == 9 && x.shared && x.qos == 2));
        }
        assert_eq!(counts, BTreeMap::from([(1, 10), (2, 10), (3, 10)]));
        // `a/c` only matches group g.
        assert_eq!(route(&t, "a/c").len(), 1);
    }

    /// No Local compares client ids (MQTT 5 §3.8.3.1), not sessions: a publish from the
    /// old incarnation of a client id (a connection being taken over with clean start,
    /// or its Will) does not reach the new incarnation's No Local subscription; another
    /// client's does.
    #[test]
    fn no_local_compares_client_ids_across_incarnations() {
        use crate::router::SessionKey;
        let key = |id: &str, incarnation| SessionKey {
            id: id.into(),
            incarnation,
        };
        let mut t = SubscriptionTrie::new();
        let mut o = opts(1);
        o.no_local = true;
        t.subscribe(key("car", 2), "t/#", o).expect("valid");
        assert!(t.route("t/x", Some(&key("car", 1)), |_| true).is_empty());
        assert!(t.route("t/x", Some(&key("car", 2)), |_| true).is_empty());
        assert_eq!(t.route("t/x", Some(&key("other", 1)), |_| true).len(), 1);
        assert_eq!(t.route("t/x", None, |_| true).len(), 1);
    }

    /// A member whose session was discarded (its filters not yet removed) is never
    /// picked while another member's session exists: the message would reach nobody.
    #[test]
    fn shared_never_picks_a_gone_member() {
        let mut t = Trie::new();
        for k in 1..=3 {
            t.subscribe(k, "$share/g/x", opts(1)).expect("valid");
        }
        // Nobody online, member 2 gone: round robin over 1 and 3 (offline, queued).
        let presence = |k: &u32| {
            if *k == 2 {
                Presence::Gone
            } else {
                Presence::Offline
            }
        };
        let mut seen = BTreeMap::new();
        for _ in 0..10 {
            let targets = t.route_with("x", None, presence);
            assert_eq!(targets.len(), 1);
            *seen.entry(targets[0].key).or_insert(0) += 1;
        }
        assert_eq!(seen, BTreeMap::from([(1, 5), (3, 5)]));
        // Every member gone: no target rather than a delivery into nothing.
        assert!(t.route_with("x", None, |_| Presence::Gone).is_empty());
        // Online still wins over offline.
        let presence = |k: &u32| {
            if *k == 3 {
                Presence::Online
            } else {
                Presence::Offline
            }
        };
        assert_eq!(t.route_with("x", None, presence)[0].key, 3);
    }

    #[test]
    fn shared_prefers_online_members() {
        let mut t = Trie::new();
        for k in 1..=4 {
            t.subscribe(k, "$share/g/x", opts(1)).expect("valid");
        }
        let online = |k: &u32| *k == 2 || *k == 4;
        let mut seen = BTreeMap::new();
        for _ in 0..20 {
            let targets = t.route("x", None, online);
            assert_eq!(targets.len(), 1);
            *seen.entry(targets[0].key).or_insert(0) += 1;
        }
        assert_eq!(seen, BTreeMap::from([(2, 10), (4, 10)]));
        // Nobody online: round robin over everyone.
        let mut seen = BTreeMap::new();
        for _ in 0..20 {
            let targets = t.route("x", None, |_| false);
            assert_eq!(targets.len(), 1);
            *seen.entry(targets[0].key).or_insert(0) += 1;
        }
        assert_eq!(seen, BTreeMap::from([(1, 5), (2, 5), (3, 5), (4, 5)]));
        // Members leaving keep the group consistent.
        assert!(t.unsubscribe(&2, "$share/g/x"));
        assert!(t.unsubscribe(&1, "$share/g/x"));
        let mut seen = BTreeSet::new();
        for _ in 0..4 {
            seen.insert(t.route("x", None, |_| true)[0].key);
        }
        assert_eq!(seen, BTreeSet::from([3, 4]));
        assert!(t.unsubscribe(&3, "$share/g/x"));
        assert!(t.unsubscribe(&4, "$share/g/x"));
        assert!(route(&t, "x").is_empty());
        assert_eq!(t.node_count(), 0);
    }

    #[test]
    fn many_subscribers_and_filters() {
        let mut t = SubscriptionTrie::<std::sync::Arc<str>>::new();
        for i in 0..10_000 {
            t.subscribe(format!("c{i}").into(), &format!("fleet/v{i}/+"), opts(1))
                .expect("valid");
        }
        for i in 0..1_000 {
            t.subscribe(format!("s{i}").into(), "fleet/v7/status", opts(1))
                .expect("valid");
            t.subscribe(format!("s{i}").into(), "fleet/#", opts(0))
                .expect("valid");
        }
        let start = std::time::Instant::now();
        for _ in 0..100 {
            let targets = t.route("fleet/v7/status", None, |_| true);
            assert_eq!(targets.len(), 1_001);
        }
        // Generous: a quadratic route would take seconds per call.
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    // A naive model of non-shared routing: every subscription checked with
    // `topic::matches`, merged per key.
    #[derive(Debug, Clone)]
    enum Op {
        Sub(u32, String, SubOptions),
        Unsub(u32, String),
    }

    /// Topic names from a tiny alphabet: empty levels, `$`-prefixed levels (first or not).
    fn topic_name() -> impl Strategy<Value = String> {
        let lvl = proptest::sample::select(vec!["a", "b", "", "$s"]);
        proptest::collection::vec(lvl, 1..4)
            .prop_map(|levels| levels.join("/"))
            .prop_filter("a topic name is not empty", |t| !t.is_empty())
    }

    fn filter() -> impl Strategy<Value = String> {
        let lvl = proptest::sample::select(vec!["a", "b", "", "$s", "+"]);
        (proptest::collection::vec(lvl, 1..4), any::<bool>())
            .prop_map(|(levels, hash)| {
                let mut f = levels.join("/");
                if hash {
                    f.push_str("/#");
                }
                f
            })
            .prop_filter("a topic filter is not empty", |f| !f.is_empty())
    }

    fn any_filter() -> impl Strategy<Value = String> {
        prop_oneof![filter(), Just("#".to_owned())]
    }

    fn op() -> impl Strategy<Value = Op> {
        let o = (
            0u8..3,
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(1u32..4),
        )
            .prop_map(|(qos, no_local, retain_as_published, id)| SubOptions {
                qos,
                no_local,
                retain_as_published,
                retain_handling: 0,
                id,
            });
        prop_oneof![
            3 => (0u32..4, any_filter(), o).prop_map(|(k, f, o)| Op::Sub(k, f, o)),
            1 => (0u32..4, any_filter()).prop_map(|(k, f)| Op::Unsub(k, f)),
        ]
    }

    type Norm = BTreeMap<u32, (u8, BTreeSet<u32>, bool)>;

    fn normalise(targets: Vec<Target<u32>>) -> Norm {
        let mut out = BTreeMap::new();
        for t in targets {
            assert!(!t.shared);
            let ids: BTreeSet<u32> = t.subscription_ids.iter().copied().collect();
            assert_eq!(ids.len(), t.subscription_ids.len(), "duplicate ids");
            let previous = out.insert(t.key, (t.qos, ids, t.retain_as_published));
            assert!(previous.is_none(), "two targets for key {}", t.key);
        }
        out
    }

    fn model_route(model: &BTreeMap<(u32, String), SubOptions>, topic: &str, publisher: Option<u32>) -> Norm {
        let mut out: Norm = BTreeMap::new();
        for ((k, f), o) in model {
            if !topic::matches(f, topic) || (o.no_local && publisher == Some(*k)) {
                continue;
            }
            let e = out.entry(*k).or_insert((0, BTreeSet::new(), false));
            e.0 = e.0.max(o.qos);
            e.1.extend(o.id);
            e.2 |= o.retain_as_published;
        }
        out
    }

    proptest! {
        #[test]
        fn route_matches_naive_model(
            ops in proptest::collection::vec(op(), 0..40),
            topics in proptest::collection::vec(topic_name(), 1..8),
            publisher in proptest::option::of(0u32..4),
        ) {
            let mut trie = Trie::new();
            let mut model: BTreeMap<(u32, String), SubOptions> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Sub(k, f, o) => {
                        let replaced = trie.subscribe(k, &f, o).expect("generated filters are valid");
                        prop_assert_eq!(replaced, model.insert((k, f), o).is_some());
                    }
                    Op::Unsub(k, f) => {
                        prop_assert_eq!(trie.unsubscribe(&k, &f), model.remove(&(k, f)).is_some());
                    }
                }
                prop_assert_eq!(trie.len(), model.len());
                for topic in &topics {
                    prop_assert_eq!(
                        normalise(trie.route(topic, publisher.as_ref(), |_| true)),
                        model_route(&model, topic, publisher)
                    );
                }
            }
            for (k, f) in model.keys() {
                prop_assert!(trie.unsubscribe(k, f));
            }
            prop_assert!(trie.is_empty());
            prop_assert_eq!(trie.node_count(), 0);
            for topic in &topics {
                prop_assert!(route(&trie, topic).is_empty());
            }
        }
    }

    // --- Memory layout and the small/large threshold ---------------------------------

    use std::mem::size_of;

    /// Heap held, counted from capacities: what was asked of the allocator, an estimate
    /// of what glibc malloc hands out for it, and how many allocations.
    #[derive(Debug, Default)]
    struct Heap {
        bytes: usize,
        malloc: usize,
        allocations: usize,
    }

    impl Heap {
        fn add(&mut self, n: usize) {
            if n > 0 {
                self.bytes += n;
                // 64-bit glibc: an 8-byte header, 16-byte granules, 32 bytes at least.
                self.malloc += ((n + 8 + 15) & !15).max(32);
                self.allocations += 1;
            }
        }

        /// A hash table of `capacity` (as `HashMap::capacity` reports it), laid out as
        /// hashbrown does: power-of-two buckets filled to 7/8 (to n - 1 below 8), one
        /// control byte per bucket plus a 16-byte group.
        fn table(&mut self, capacity: usize, entry: usize) {
            if capacity > 0 {
                let buckets = if capacity < 8 {
                    (capacity + 1).next_power_of_two()
                } else {
                    (capacity * 8 / 7).next_power_of_two()
                };
                self.add(buckets * entry + buckets + 16);
            }
        }

        fn map<K, V>(&mut self, m: &SmallMap<K, V>) {
            match m {
                SmallMap::Small(v) => self.add(v.capacity() * size_of::<(K, V)>()),
                SmallMap::Large(m) => {
                    self.add(size_of::<HashMap<K, V>>());
                    self.table(m.capacity(), size_of::<(K, V)>());
                }
            }
        }
    }

    /// The heap a trie holds, keys' own heap (a `SessionKey`'s shared `Arc<str>`) aside.
    fn trie_heap<K>(t: &SubscriptionTrie<K>) -> Heap {
        let mut heap = Heap::default();
        let tree = &t.tree;
        heap.add(tree.chunks.capacity() * size_of::<Vec<Node<Subs<K>>>>());
        for chunk in &tree.chunks {
            heap.add(chunk.capacity() * size_of::<Node<Subs<K>>>());
        }
        heap.add(tree.free.capacity() * size_of::<usize>());
        for node in tree.nodes() {
            if let Children::Map(m) = &node.children {
                heap.map(m);
            }
            for (name, _) in &node.children {
                if !name.is_inline() {
                    heap.add(name.len());
                }
            }
            heap.map(&node.payload.direct);
            if let Some(shared) = &node.payload.shared {
                heap.add(size_of::<HashMap<Box<str>, Group<K>>>());
                heap.table(shared.capacity(), size_of::<(Box<str>, Group<K>)>());
                for (name, g) in shared.iter() {
                    heap.add(name.len());
                    heap.add(g.members.capacity() * size_of::<(K, SubOptions)>());
                    heap.table(g.index.capacity(), size_of::<(K, usize)>());
                }
            }
        }
        heap
    }

    fn node_at<'a, K: Clone + Eq + Hash>(t: &'a SubscriptionTrie<K>, filter: &str) -> &'a Node<Subs<K>> {
        let at = t.tree.find(filter.split('/')).expect("the filter's node exists");
        t.tree.node(at)
    }

    fn is_large<K, V>(m: &SmallMap<K, V>) -> bool {
        matches!(m, SmallMap::Large(_))
    }

    fn children_large(c: &Children) -> bool {
        matches!(c, Children::Map(m) if is_large(m))
    }

    #[test]
    fn node_layout_is_compact() {
        use crate::router::SessionKey;
        let node = size_of::<Node<Subs<SessionKey>>>();
        // Before: 144 bytes, a HashMap (48) for the children and two for the payload.
        println!("Node<Subs<SessionKey>>: {node} bytes (was 144)");
        assert!(size_of::<SmallMap<Box<str>, usize>>() <= 24);
        assert!(size_of::<SmallMap<SessionKey, SubOptions>>() <= 24);
        assert!(size_of::<Option<Box<HashMap<Box<str>, Group<SessionKey>>>>>() <= 8);
        // One child inline: 8 bytes more than the map alone.
        assert!(size_of::<Children>() <= 32);
        assert!(node <= 64, "a trie node grew to {node} bytes");
    }

    #[test]
    fn vehicle_command_subscriptions_are_compact() {
        use crate::router::SessionKey;
        let n = 10_000;
        let key = |i: usize| SessionKey {
            id: format!("vehicle-{i:06}").into(),
            incarnation: 1,
        };
        let filter = |i: usize| format!("vehicles/v{i:06}/commands/#");
        let mut t = SubscriptionTrie::<SessionKey>::new();
        let empty = trie_heap(&t);
        for i in 0..n {
            assert_eq!(t.subscribe(key(i), &filter(i), SubOptions::qos(1)), Ok(false));
        }
        assert_eq!(t.node_count(), 3 * n + 1);
        let heap = trie_heap(&t);
        let per = |x: usize| x as f64 / n as f64;
        println!(
            "per vehicles/<id>/commands/# subscription: {:.0} bytes asked, ~{:.0} bytes from \
             malloc, {:.2} allocations (was 940 / ~1056 / 6.00 with HashMaps and boxed levels, \
             ~320 / ~350 / 3.00 with one-entry vectors of children)",
            per(heap.bytes),
            per(heap.malloc),
            per(heap.allocations)
        );
        // Expected about 290 bytes asked: three 64-byte nodes (the one child of `<id>`
        // and of `commands` inline), a one-entry vector of direct subscribers at `#`
        // (40), level names inline, ~60 bytes in the `vehicles` hash map. HashMaps
        // instead of vectors, one-entry vectors of children, or 144-byte nodes overshoot
        // this.
        assert!(heap.bytes <= 310 * n, "{} bytes per subscription", heap.bytes / n);
        // One per subscription (the subscriber vector; children and level names inline),
        // plus the arena's chunks and the `vehicles` hash map.
        assert!(
            heap.allocations <= n + n / 100,
            "{} allocations",
            heap.allocations
        );
        // The shapes that make it so.
        assert!(children_large(&node_at(&t, "vehicles").children));
        let id = node_at(&t, "vehicles/v000042");
        assert!(matches!(&id.children, Children::One(..)));
        let hash = node_at(&t, "vehicles/v000042/commands/#");
        assert!(matches!(&hash.payload.direct, SmallMap::Small(v) if v.capacity() == 1));
        assert!(hash.payload.shared.is_none());
        // Still routed by a hash lookup at `vehicles`, and only to its vehicle.
        let targets = t.route("vehicles/v000042/commands/unlock", None, |_| true);
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].key, key(42));
        for i in 0..n {
            assert!(t.unsubscribe(&key(i), &filter(i)));
        }
        assert_eq!(t.node_count(), 0);
        let after = trie_heap(&t);
        assert_eq!((after.bytes, after.allocations), (empty.bytes, empty.allocations));
    }

    #[test]
    fn crossing_the_small_threshold_both_ways() {
        let mut t = Trie::new();
        let many = 3 * SMALL as u32;
        // Direct subscribers of one filter: up past the threshold, then back down.
        for k in 0..many {
            t.subscribe(k, "b/x", opts(1)).expect("valid");
            assert_eq!(keys(&route(&t, "b/x")), (0..=k).collect::<Vec<_>>());
            let large = is_large(&node_at(&t, "b/x").payload.direct);
            assert_eq!(large, k as usize + 1 > SMALL, "{} subscribers", k + 1);
        }
        for k in 0..many {
            assert!(t.unsubscribe(&k, "b/x"));
            assert_eq!(keys(&route(&t, "b/x")), (k + 1..many).collect::<Vec<_>>());
            if k + 1 < many {
                let large = is_large(&node_at(&t, "b/x").payload.direct);
                assert_eq!(large, (many - k - 1) as usize > BACK_TO_SMALL);
            }
        }
        // Children of one level, each its own subscriber, likewise; `w` is subscribed to
        // `c/+`, which walks the `+` child next to them.
        let w = 1_000;
        t.subscribe(w, "c/+", opts(0)).expect("valid");
        let only = |t: &Trie, j: u32, present: bool| {
            let got = keys(&route(t, &format!("c/l{j}")));
            assert_eq!(got, if present { vec![j, w] } else { vec![w] }, "c/l{j}");
        };
        for k in 0..many {
            t.subscribe(k, &format!("c/l{k}"), opts(0)).expect("valid");
            (0..many).for_each(|j| only(&t, j, j <= k));
            // `+` is a child too.
            assert_eq!(children_large(&node_at(&t, "c").children), k as usize + 2 > SMALL);
        }
        for k in (0..many).rev() {
            assert!(t.unsubscribe(&k, &format!("c/l{k}")));
            (0..many).for_each(|j| only(&t, j, j < k));
            assert_eq!(
                children_large(&node_at(&t, "c").children),
                k as usize + 1 > BACK_TO_SMALL
            );
        }
        assert!(t.unsubscribe(&w, "c/+"));
        assert!(t.is_empty());
        assert_eq!(t.node_count(), 0);
    }

    #[test]
    fn retained_index_across_the_threshold() {
        let mut r = super::super::retained::RetainedIndex::new();
        let many = 3 * SMALL as u32;
        let matching = |r: &super::super::retained::RetainedIndex<u32>, f: &str| {
            let mut v = Vec::new();
            r.matching(f, |_, &x| v.push(x));
            v.sort_unstable();
            v
        };
        for k in 0..many {
            assert_eq!(r.insert(&format!("r/l{k}"), k), None);
            assert_eq!(matching(&r, "r/+"), (0..=k).collect::<Vec<_>>());
            assert_eq!(matching(&r, "r/#"), (0..=k).collect::<Vec<_>>());
        }
        for k in 0..many {
            assert_eq!(r.get(&format!("r/l{k}")), Some(&k));
            assert_eq!(r.remove(&format!("r/l{k}")), Some(k));
            assert_eq!(matching(&r, "r/+"), (k + 1..many).collect::<Vec<_>>());
        }
        assert_eq!(r.node_count(), 0);
    }

    #[test]
    fn arena_grows_by_chunks() {
        let mut t = Trie::new();
        let n = 3 * CHUNK as u32;
        for k in 0..n {
            t.subscribe(k, &format!("a{k}"), opts(0)).expect("valid");
        }
        assert_eq!(t.tree.chunks.len(), 4);
        assert!(t.tree.chunks.iter().all(|c| c.capacity() == CHUNK));
        for k in 0..n {
            assert_eq!(keys(&route(&t, &format!("a{k}"))), vec![k]);
        }
        for k in 0..n {
            assert!(t.unsubscribe(&k, &format!("a{k}")));
        }
        assert_eq!(t.node_count(), 0);
        assert_eq!(t.tree.chunks.len(), 1);
    }

    #[derive(Debug, Clone)]
    enum MapOp {
        Insert(u8, u32),
        Remove(u8),
    }

    /// Filters around one hot filter (many direct subscribers) and one level with many
    /// children, so that both cross [`SMALL`] and [`BACK_TO_SMALL`].
    fn crowded_filter() -> impl Strategy<Value = String> {
        let name = proptest::sample::select(vec![
            "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "", "$s",
        ]);
        let tail = proptest::sample::select(vec!["", "/#", "/+", "/x"]);
        prop_oneof![
            3 => Just("t/a".to_owned()),
            1 => Just("t/+".to_owned()),
            1 => Just("#".to_owned()),
            6 => (name, tail).prop_map(|(n, t)| format!("t/{n}{t}")),
        ]
    }

    proptest! {
        #[test]
        fn small_map_matches_a_model(
            ops in proptest::collection::vec(
                prop_oneof![
                    (0u8..24, any::<u32>()).prop_map(|(k, v)| MapOp::Insert(k, v)),
                    (0u8..24).prop_map(MapOp::Remove),
                ],
                0..200,
            ),
        ) {
            let mut m: SmallMap<u8, u32> = SmallMap::default();
            let mut model: BTreeMap<u8, u32> = BTreeMap::new();
            for op in ops {
                match op {
                    MapOp::Insert(k, v) => prop_assert_eq!(m.insert(k, v), model.insert(k, v)),
                    MapOp::Remove(k) => prop_assert_eq!(m.remove(&k), model.remove(&k)),
                }
                prop_assert_eq!(m.len(), model.len());
                let all: BTreeMap<u8, u32> = m.iter().map(|(&k, &v)| (k, v)).collect();
                prop_assert_eq!(&all, &model);
                prop_assert_eq!(m.iter().count(), model.len());
                for k in 0..24 {
                    prop_assert_eq!(m.get(&k), model.get(&k));
                }
                match &m {
                    SmallMap::Small(v) => {
                        prop_assert!(v.len() <= SMALL);
                        prop_assert!(v.capacity() <= 4 * v.len(), "{} of {}", v.len(), v.capacity());
                    }
                    SmallMap::Large(h) => {
                        prop_assert!(h.len() > BACK_TO_SMALL);
                        prop_assert!(h.capacity() < 4 * h.len() + 4);
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn route_matches_model_across_the_threshold(
            subs in proptest::collection::vec(
                (0u32..20, crowded_filter(), 0u8..3, proptest::option::of(1u32..4)),
                0..100,
            ),
            order in proptest::collection::vec(any::<proptest::sample::Index>(), 100),
            publisher in proptest::option::of(0u32..20),
        ) {
            let topics = ["t/a", "t/b", "t/k", "t/", "t/$s", "t/a/x", "t/c/x", "t"];
            let mut trie = Trie::new();
            let mut model: BTreeMap<(u32, String), SubOptions> = BTreeMap::new();
            // Every route checked after every change, on both sides of the threshold.
            let check = |trie: &Trie, model: &BTreeMap<(u32, String), SubOptions>| {
                for topic in topics {
                    let got = normalise(trie.route(topic, publisher.as_ref(), |_| true));
                    if got != model_route(model, topic, publisher) {
                        return Err(topic);
                    }
                }
                Ok(())
            };
            // Up: past the threshold at `t/a` (direct) and `t` (children).
            for (k, f, qos, id) in subs {
                let o = SubOptions {
                    qos,
                    no_local: k % 3 == 0,
                    retain_as_published: k % 2 == 0,
                    retain_handling: 0,
                    id,
                };
                let replaced = trie.subscribe(k, &f, o).expect("generated filters are valid");
                prop_assert_eq!(replaced, model.insert((k, f), o).is_some());
                prop_assert_eq!(trie.len(), model.len());
                prop_assert_eq!(check(&trie, &model), Ok(()));
            }
            // Down, in a random order, back under it and to empty.
            for ix in order {
                if model.is_empty() {
                    break;
                }
                let victim = model.keys().nth(ix.index(model.len())).cloned();
                let Some((k, f)) = victim else { break };
                prop_assert!(trie.unsubscribe(&k, &f));
                model.remove(&(k, f));
                prop_assert_eq!(trie.len(), model.len());
                prop_assert_eq!(check(&trie, &model), Ok(()));
            }
            for (k, f) in model.keys() {
                prop_assert!(trie.unsubscribe(k, f));
            }
            prop_assert!(trie.is_empty());
            prop_assert_eq!(trie.node_count(), 0);
        }
    }

    /// Short levels live inline, long ones boxed; both compare and hash as their string,
    /// so lookups by `&str` find either.
    #[test]
    fn levels_are_inline_up_to_their_limit_and_equal_as_strings() {
        let short = Level::from("commands");
        let vin = Level::from("WVWZZZ1JZXW000001");
        let long = Level::from("a-level-longer-than-twenty-two-bytes");
        let empty = Level::from("");
        assert!(short.is_inline());
        assert!(vin.is_inline());
        assert!(!long.is_inline());
        assert_eq!(&*empty, "");
        assert_eq!(&*vin, "WVWZZZ1JZXW000001");
        assert_eq!(Level::from("ünïcödé/é"), Level::from("ünïcödé/é"));
        let mut m: HashMap<Level, u8> = HashMap::new();
        for (i, l) in [short, vin, long, empty].into_iter().enumerate() {
            m.insert(l, i as u8);
        }
        assert_eq!(m.get("commands"), Some(&0));
        assert_eq!(m.get("WVWZZZ1JZXW000001"), Some(&1));
        assert_eq!(m.get("a-level-longer-than-twenty-two-bytes"), Some(&2));
        assert_eq!(m.get(""), Some(&3));
        assert_eq!(m.get("command"), None);
        assert_eq!(size_of::<Level>(), 24);
    }

    /// Review: levels around the inline limit, multi-byte ones, a shared 22-byte prefix,
    /// empty levels, in small (vector) and large (hash map) children maps.
    #[test]
    fn review_levels_at_the_inline_boundary_route_exactly() {
        let e11 = "é".repeat(11); // 22 bytes, inline
        let e11a = format!("{e11}a"); // 23 bytes, boxed
        let x22 = "x".repeat(22);
        let x23 = "x".repeat(23);
        let x21 = "x".repeat(21);
        let long_mb = format!("{}é", "y".repeat(21)); // 23 bytes, ends in a 2-byte char
        assert!(Level::from(e11.as_str()).is_inline());
        assert!(!Level::from(e11a.as_str()).is_inline());
        assert!(!Level::from(long_mb.as_str()).is_inline());
        let levels: Vec<String> = vec![
            e11.clone(),
            e11a.clone(),
            x21,
            x22,
            x23,
            long_mb,
            String::new(),
            "é".into(),
        ];
        for extra in [0usize, 20] {
            // 20 more siblings: the children map of `t` becomes a hash map.
            let mut trie = Trie::default();
            let mut all: Vec<String> = levels.clone();
            all.extend((0..extra).map(|i| format!("pad{i}")));
            for (k, l) in all.iter().enumerate() {
                trie.subscribe(k as u32, &format!("t/{l}/z"), opts(0))
                    .expect("valid");
            }
            for (k, l) in all.iter().enumerate() {
                assert_eq!(
                    keys(&route(&trie, &format!("t/{l}/z"))),
                    vec![k as u32],
                    "level {l:?}"
                );
            }
            assert!(route(&trie, &format!("t/{}/z", "x".repeat(24))).is_empty());
            // `+` matches every one, the empty level included.
            trie.subscribe(999, "t/+/z", opts(0)).expect("valid");
            for l in &all {
                assert!(keys(&route(&trie, &format!("t/{l}/z"))).contains(&999));
            }
            assert!(trie.unsubscribe(&999, "t/+/z"));
            for (k, l) in all.iter().enumerate() {
                assert!(trie.unsubscribe(&(k as u32), &format!("t/{l}/z")), "level {l:?}");
            }
            assert_eq!(trie.node_count(), 0);
        }
    }
}
