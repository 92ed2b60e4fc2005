//! The retained-message index: topic names to their retained value, searchable by filter.
//!
//! # Contract
//!
//! * Keys are topic *names* (validated by the caller with `topic::validate_name`: no
//!   wildcards, not empty). One value per name; `insert` replaces and returns the old one.
//! * [`RetainedIndex::matching`] visits exactly the stored names a (non-shared, valid)
//!   filter matches under MQTT 5 §4.7, the `$` rule included: a name starting with `$`
//!   is not matched by a filter whose first level is `+` or `#`. It walks the trie, so it
//!   never looks at a name that cannot match: a literal level follows one child, `+`
//!   every child, `#` the whole subtree (and the node itself: `a/#` matches `a`).
//! * Memory: `remove` frees every node left without a value or children; once the last
//!   value is removed, the index is back to its initial, empty allocation. Nodes live in
//!   an arena (the level tree shared with the subscription trie), so a very deep name
//!   neither recurses on drop nor in a walk.
//! * Visiting order (`matching`, `iter`) is unspecified.

use super::trie::{Payload, Tree, ROOT};

/// Retained values by topic name; see the module doc.
#[derive(Debug)]
pub struct RetainedIndex<V> {
    /// A node holding a value also holds its full topic name, handed to visitors.
    tree: Tree<Option<(Box<str>, V)>>,
    len: usize,
}

impl<V> Payload for Option<(Box<str>, V)> {
    fn is_empty(&self) -> bool {
        self.is_none()
    }
}

impl<V> Default for RetainedIndex<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> RetainedIndex<V> {
    pub fn new() -> Self {
        RetainedIndex {
            tree: Tree::new(),
            len: 0,
        }
    }

    /// Stores `v` for `topic` (a valid topic name), returning the value it replaces.
    pub fn insert(&mut self, topic: &str, v: V) -> Option<V> {
        let at = self.tree.insert_path(topic.split('/'));
        let old = self.tree.node_mut(at).payload.replace((topic.into(), v));
        if old.is_none() {
            self.len += 1;
        }
        old.map(|(_, v)| v)
    }

    pub fn remove(&mut self, topic: &str) -> Option<V> {
        let levels: Vec<&str> = topic.split('/').collect();
        let path = self.tree.find_path(&levels)?;
        let at = *path.last()?;
        let (_, v) = self.tree.node_mut(at).payload.take()?;
        self.len -= 1;
        self.tree.prune(&path, &levels);
        Some(v)
    }

    pub fn get(&self, topic: &str) -> Option<&V> {
        let at = self.tree.find(topic.split('/'))?;
        self.tree.node(at).payload.as_ref().map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Trie nodes in use besides the root (a memory gauge; 0 when empty).
    pub fn node_count(&self) -> usize {
        self.tree.node_count()
    }

    /// Calls `visit` with every stored name `filter` matches, and its value. `filter` must
    /// be a valid plain filter (the inner filter of a shared subscription, not the raw
    /// `$share/...` one); an invalid filter visits an unspecified subset.
    pub fn matching(&self, filter: &str, mut visit: impl FnMut(&str, &V)) {
        /// Marks a node whose whole subtree matches (below a `#`).
        const ALL: usize = usize::MAX;
        let levels: Vec<&str> = filter.split('/').collect();
        // The `$` rule: a leading wildcard skips first-level names starting with `$`.
        let guard = matches!(levels.first(), Some(&"+") | Some(&"#"));
        let skip = |depth: usize, name: &str| guard && depth == 0 && name.starts_with('$');
        let mut stack: Vec<(usize, usize)> = vec![(ROOT, 0)];
        while let Some((at, depth)) = stack.pop() {
            let node = self.tree.node(at);
            let emit = |visit: &mut dyn FnMut(&str, &V)| {
                if let Some((t, v)) = &node.payload {
                    visit(t, v);
                }
            };
            if depth == ALL {
                emit(&mut visit);
                stack.extend(node.children.values().map(|&c| (c, ALL)));
                continue;
            }
            match levels.get(depth).copied() {
                None => emit(&mut visit),
                Some("#") => {
                    emit(&mut visit);
                    for (name, &c) in &node.children {
                        if !skip(depth, name) {
                            stack.push((c, ALL));
                        }
                    }
                }
                Some("+") => {
                    for (name, &c) in &node.children {
                        if !skip(depth, name) {
                            stack.push((c, depth + 1));
                        }
                    }
                }
                Some(literal) => {
                    if let Some(&c) = node.children.get(literal) {
                        stack.push((c, depth + 1));
                    }
                }
            }
        }
    }

    /// Calls `visit` with every stored name and its value.
    pub fn iter(&self, mut visit: impl FnMut(&str, &V)) {
        for node in self.tree.nodes() {
            if let Some((t, v)) = &node.payload {
                visit(t, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn matched(index: &RetainedIndex<u32>, filter: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        index.matching(filter, |t, _| {
            assert!(out.insert(t.to_owned()), "{t} visited twice");
        });
        out
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn insert_get_remove() {
        let mut r = RetainedIndex::new();
        assert_eq!(r.insert("a/b", 1), None);
        assert_eq!(r.insert("a/b", 2), Some(1));
        assert_eq!(r.insert("a", 3), None);
        assert_eq!(r.insert("a//", 4), None);
        assert_eq!(r.len(), 3);
        assert_eq!(r.get("a/b"), Some(&2));
        assert_eq!(r.get("a/"), None);
        assert_eq!(r.get("a//"), Some(&4));
        assert_eq!(r.get("x"), None);
        assert_eq!(r.remove("a/"), None);
        assert_eq!(r.remove("a/b/c"), None);
        assert_eq!(r.remove("a"), Some(3));
        assert_eq!(r.remove("a"), None);
        assert_eq!(r.get("a/b"), Some(&2));
        assert_eq!(r.node_count(), 4);
        assert_eq!(r.remove("a//"), Some(4));
        assert_eq!(r.node_count(), 2);
        assert_eq!(r.remove("a/b"), Some(2));
        assert!(r.is_empty());
        assert_eq!(r.node_count(), 0);
    }

    #[test]
    fn filters_walk_the_trie() {
        let mut r = RetainedIndex::new();
        for (i, t) in ["a", "a/b", "a/b/c", "a//c", "/a", "b", "$SYS/a", "$SYS", "a/"]
            .into_iter()
            .enumerate()
        {
            r.insert(t, i as u32);
        }
        assert_eq!(matched(&r, "a"), set(&["a"]));
        assert_eq!(matched(&r, "a/#"), set(&["a", "a/b", "a/b/c", "a//c", "a/"]));
        assert_eq!(matched(&r, "a/+"), set(&["a/b", "a/"]));
        assert_eq!(matched(&r, "a/+/c"), set(&["a/b/c", "a//c"]));
        assert_eq!(matched(&r, "+"), set(&["a", "b"]));
        assert_eq!(matched(&r, "+/a"), set(&["/a"]));
        assert_eq!(
            matched(&r, "#"),
            set(&["a", "a/b", "a/b/c", "a//c", "/a", "b", "a/"])
        );
        assert_eq!(matched(&r, "$SYS/#"), set(&["$SYS/a", "$SYS"]));
        assert_eq!(matched(&r, "$SYS/+"), set(&["$SYS/a"]));
        assert_eq!(matched(&r, "+/+"), set(&["a/b", "/a", "a/"]));
        assert_eq!(matched(&r, "x/#"), set(&[]));
        let mut all = BTreeSet::new();
        r.iter(|t, v| {
            assert_eq!(r.get(t), Some(v));
            all.insert(t.to_owned());
        });
        assert_eq!(all.len(), 9);
    }

    #[test]
    fn deep_names_do_not_recurse() {
        let mut r = RetainedIndex::new();
        let deep = vec!["a"; 100_000].join("/");
        r.insert(&deep, 1);
        assert_eq!(matched(&r, "#").len(), 1);
        assert_eq!(matched(&r, &deep).len(), 1);
        assert_eq!(r.remove(&deep), Some(1));
        assert_eq!(r.node_count(), 0);
        r.insert(&deep, 2);
        drop(r);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(String, u32),
        Remove(String),
    }

    fn name() -> impl Strategy<Value = String> {
        let lvl = proptest::sample::select(vec!["a", "b", "", "$s"]);
        proptest::collection::vec(lvl, 1..4)
            .prop_map(|l| l.join("/"))
            .prop_filter("a topic name is not empty", |t| !t.is_empty())
    }

    fn filter() -> impl Strategy<Value = String> {
        let lvl = proptest::sample::select(vec!["a", "b", "", "$s", "+"]);
        let f = (proptest::collection::vec(lvl, 1..4), any::<bool>())
            .prop_map(|(l, hash)| {
                let mut f = l.join("/");
                if hash {
                    f.push_str("/#");
                }
                f
            })
            .prop_filter("a topic filter is not empty", |f| !f.is_empty());
        prop_oneof![4 => f, 1 => Just("#".to_owned())]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (name(), any::<u32>()).prop_map(|(t, v)| Op::Insert(t, v)),
            1 => name().prop_map(Op::Remove),
        ]
    }

    proptest! {
        #[test]
        fn matches_naive_model(
            ops in proptest::collection::vec(op(), 0..40),
            filters in proptest::collection::vec(filter(), 1..8),
        ) {
            let mut r = RetainedIndex::new();
            let mut model: BTreeMap<String, u32> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(t, v) => prop_assert_eq!(r.insert(&t, v), model.insert(t, v)),
                    Op::Remove(t) => prop_assert_eq!(r.remove(&t), model.remove(&t)),
                }
                prop_assert_eq!(r.len(), model.len());
                for f in &filters {
                    prop_assert!(topic::validate_filter(f).is_ok());
                    let mut got = BTreeMap::new();
                    r.matching(f, |t, v| {
                        got.insert(t.to_owned(), *v);
                    });
                    let want: BTreeMap<String, u32> = model
                        .iter()
                        .filter(|(t, _)| topic::matches(f, t))
                        .map(|(t, v)| (t.clone(), *v))
                        .collect();
                    prop_assert_eq!(got, want);
                }
                let mut all = BTreeMap::new();
                r.iter(|t, v| {
                    all.insert(t.to_owned(), *v);
                });
                prop_assert_eq!(&all, &model);
                for (t, v) in &model {
                    prop_assert_eq!(r.get(t), Some(v));
                }
            }
            let names: Vec<String> = model.keys().cloned().collect();
            for t in names {
                prop_assert_eq!(r.remove(&t), model.remove(&t));
            }
            prop_assert!(r.is_empty());
            prop_assert_eq!(r.node_count(), 0);
        }
    }
}
