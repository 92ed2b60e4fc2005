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
//!   `online` accepts, or round robin among all members when none is online (their
//!   sessions queue it). Shared deliveries are separate targets (`shared = true`), never
//!   merged with the key's non-shared target; `no_local` is ignored for them (setting it
//!   on a shared subscription is a protocol error the caller rejects at SUBSCRIBE).
//! * Routing takes `&self`: the round-robin cursor of a group is an atomic, so routing
//!   runs under a read lock. Concurrent routers may pick the same member twice in a row;
//!   that only bends fairness, never delivers to zero or two members.
//! * Cost: a route visits each trie node at most once and only nodes on paths that can
//!   match (a literal level follows one child, `+` and `#` one each); subscribers are
//!   stored in their filter's node keyed by `K`, so a filter with many subscribers is
//!   one hash map walk, and merging is only done when several filters matched.
//! * Memory: unsubscribing frees every node left without subscriptions or children; when
//!   the last subscription goes, the trie is back to its initial, empty allocation.
//!   Nodes live in an arena (indices, not boxes), so neither a very deep filter nor
//!   dropping the trie recurses.
//!
//! The order of the targets `route` returns is unspecified.

use std::collections::HashMap;
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

impl<K: Clone + Eq + Hash> Default for SubscriptionTrie<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Clone + Eq + Hash> SubscriptionTrie<K> {
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
                if let Some(g) = subs.shared.get_mut(group) {
                    g.insert(key, opts)
                } else {
                    let mut g = Group::default();
                    g.insert(key, opts);
                    subs.shared.insert(group.into(), g);
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
            FilterKind::Shared { group, .. } => match subs.shared.get_mut(group) {
                Some(g) => {
                    let removed = g.remove(key);
                    if g.members.is_empty() {
                        subs.shared.remove(group);
                    }
                    removed
                }
                None => false,
            },
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
    /// shared-group member can take a delivery now.
    pub fn route(&self, topic: &str, publisher: Option<&K>, online: impl Fn(&K) -> bool) -> Vec<Target<K>> {
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
            if let Some(&c) = node.children.get(*level) {
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
                if opts.no_local && publisher == Some(key) {
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
            for group in self.tree.node(n).payload.shared.values() {
                if let Some((key, opts)) = group.pick(&online) {
                    out.push(target(key, opts, true));
                }
            }
        }
        out
    }
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
    direct: HashMap<K, SubOptions>,
    /// By share name: the groups whose inner filter ends here.
    shared: HashMap<Box<str>, Group<K>>,
}

impl<K> Default for Subs<K> {
    fn default() -> Self {
        Subs {
            direct: HashMap::new(),
            shared: HashMap::new(),
        }
    }
}

impl<K> Payload for Subs<K> {
    fn is_empty(&self) -> bool {
        self.direct.is_empty() && self.shared.is_empty()
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

    /// The next online member after the previous pick, or the next member at all when
    /// none is online. `None` only for an empty group (never stored).
    fn pick(&self, online: &impl Fn(&K) -> bool) -> Option<&(K, SubOptions)> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.next.load(Ordering::Relaxed) % n;
        let chosen = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| self.members.get(i).is_some_and(|m| online(&m.0)))
            .unwrap_or(start);
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

#[derive(Debug)]
pub(super) struct Node<P> {
    pub(super) children: HashMap<Box<str>, usize>,
    pub(super) payload: P,
}

impl<P: Default> Default for Node<P> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            payload: P::default(),
        }
    }
}

/// Node `ROOT` always exists; freed nodes are reset to empty and reused.
#[derive(Debug)]
pub(super) struct Tree<P> {
    nodes: Vec<Node<P>>,
    free: Vec<usize>,
}

impl<P: Payload> Tree<P> {
    pub(super) fn new() -> Self {
        Tree {
            nodes: vec![Node::default()],
            free: Vec::new(),
        }
    }

    /// Indices come only from this tree (children maps, paths), so they are in range.
    pub(super) fn node(&self, at: usize) -> &Node<P> {
        &self.nodes[at]
    }

    pub(super) fn node_mut(&mut self, at: usize) -> &mut Node<P> {
        &mut self.nodes[at]
    }

    /// All nodes, free ones included (their payload is empty).
    pub(super) fn nodes(&self) -> impl Iterator<Item = &Node<P>> {
        self.nodes.iter()
    }

    pub(super) fn node_count(&self) -> usize {
        self.nodes.len() - 1 - self.free.len()
    }

    /// The node at the end of `levels`, created as needed.
    pub(super) fn insert_path<'a>(&mut self, levels: impl Iterator<Item = &'a str>) -> usize {
        let mut at = ROOT;
        for level in levels {
            at = match self.nodes[at].children.get(level) {
                Some(&c) => c,
                None => {
                    let c = self.alloc();
                    self.nodes[at].children.insert(level.into(), c);
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
            at = *self.nodes[at].children.get(*level)?;
            path.push(at);
        }
        Some(path)
    }

    pub(super) fn find<'a>(&self, levels: impl Iterator<Item = &'a str>) -> Option<usize> {
        let mut at = ROOT;
        for level in levels {
            at = *self.nodes[at].children.get(level)?;
        }
        Some(at)
    }

    /// Frees the nodes at the end of `path` (as returned by `find_path` for `levels`)
    /// that hold nothing any more; back to the initial allocation once all is empty.
    pub(super) fn prune(&mut self, path: &[usize], levels: &[&str]) {
        for i in (1..path.len()).rev() {
            let at = path[i];
            let node = &self.nodes[at];
            if !node.children.is_empty() || !node.payload.is_empty() {
                break;
            }
            self.nodes[path[i - 1]].children.remove(levels[i - 1]);
            self.nodes[at] = Node::default();
            self.free.push(at);
        }
        let root = &self.nodes[ROOT];
        if root.children.is_empty() && root.payload.is_empty() {
            *self = Tree::new();
        }
    }

    fn alloc(&mut self) -> usize {
        match self.free.pop() {
            Some(at) => at,
            None => {
                self.nodes.push(Node::default());
                self.nodes.len() - 1
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
