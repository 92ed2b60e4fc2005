//! Who may connect (anonymous, username + argon2 password hash, client certificate),
//! which client ids each may use, and what a connected vehicle may publish and
//! subscribe to.
//!
//! Identity is earned (invariant 6): a password user may connect only under the client
//! ids its `[[auth.users]] client_ids` patterns allow (default: exactly its username); a
//! client certificate binds the client id through `tls.require_client_id_match` (checked
//! by the session); anonymous access (`auth.allow_anonymous`) binds nothing and is a
//! development switch, logged as a warning when the gateway starts.
//!
//! Password checks do not tell whether a username exists: an unknown user costs one
//! argon2 verification (against a configured user's hash, result ignored), exactly like
//! a wrong password. At most `auth.max_concurrent_hashes` verifications run
//! at once (each on a blocking thread); CONNECT attempts are rate-limited per source
//! address and globally before any of this ([`rate_limit`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use tokio::sync::Semaphore;
use tracing::warn;

use crate::config::{AuthSection, User};
use crate::topic;

pub mod rate_limit;

pub use rate_limit::Limited;

/// Why a CONNECT is refused, mapped to 3.1.1 return codes and 5.0 reason codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadCredentials,
    NotAuthorized,
}

/// Who a CONNECT proved to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No credentials, accepted because `auth.allow_anonymous = true`.
    Anonymous,
    /// A client certificate verified by `tls.client_ca` (bound by the session).
    Certificate,
    /// A password user, by username.
    User(String),
}

/// What a password check did. Each outcome ran exactly one argon2 verification (a
/// dummy one for an unknown user): the label of `gateway_auth_password_checks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordCheck {
    Accepted,
    WrongPassword,
    UnknownUser,
}

impl PasswordCheck {
    pub fn label(self) -> &'static str {
        match self {
            PasswordCheck::Accepted => "accepted",
            PasswordCheck::WrongPassword => "wrong_password",
            PasswordCheck::UnknownUser => "unknown_user",
        }
    }
}

/// The outcome of [`Auth::authenticate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub result: Result<Principal, Refusal>,
    /// Set when a password was checked.
    pub check: Option<PasswordCheck>,
}

#[derive(Debug)]
struct UserEntry {
    password_hash: String,
    /// Allowed client-id patterns with `{username}` already substituted.
    client_ids: Vec<String>,
    /// Operator users: their own ACLs instead of the vehicle ACLs.
    publish_acl: Option<Vec<String>>,
    subscribe_acl: Option<Vec<String>>,
    allow_retain: Option<bool>,
}

#[derive(Debug)]
pub struct Auth {
    allow_anonymous: bool,
    users: HashMap<String, UserEntry>,
    publish_acl: Vec<String>,
    subscribe_acl: Vec<String>,
    allow_retain: bool,
    /// Verified for unknown usernames so that they cost what a known one does.
    dummy_hash: String,
    /// Bounds concurrent argon2 verifications (`auth.max_concurrent_hashes`).
    hash_slots: Arc<Semaphore>,
    hashes_run: AtomicU64,
    hashes_active: AtomicUsize,
    hashes_peak: AtomicUsize,
    limiter: rate_limit::ConnectLimiter,
}

impl Auth {
    /// Builds the authenticator once at start. Logs a warning when anonymous access is
    /// on: it binds no identity and is meant for development only.
    pub fn new(cfg: &AuthSection) -> Arc<Self> {
        if cfg.allow_anonymous {
            warn!(
                "auth.allow_anonymous = true: ANYONE who reaches the MQTT listener can connect under ANY client id \
                 and publish as that vehicle; a development switch, never for production"
            );
        }
        Arc::new(Auth {
            allow_anonymous: cfg.allow_anonymous,
            users: cfg
                .users
                .iter()
                .map(|u| {
                    let patterns = u.client_ids.clone().unwrap_or_else(|| vec![u.username.clone()]);
                    (
                        u.username.clone(),
                        UserEntry {
                            password_hash: u.password_hash.clone(),
                            client_ids: patterns
                                .iter()
                                .map(|p| p.replace("{username}", &u.username))
                                .collect(),
                            publish_acl: u.publish_acl.clone(),
                            subscribe_acl: u.subscribe_acl.clone(),
                            allow_retain: u.allow_retain,
                        },
                    )
                })
                .collect(),
            publish_acl: cfg.publish_acl.clone(),
            subscribe_acl: cfg.subscribe_acl.clone(),
            allow_retain: cfg.allow_retain,
            dummy_hash: dummy_hash(&cfg.users),
            hash_slots: Arc::new(Semaphore::new(cfg.max_concurrent_hashes.max(1))),
            hashes_run: AtomicU64::new(0),
            hashes_active: AtomicUsize::new(0),
            hashes_peak: AtomicUsize::new(0),
            limiter: rate_limit::ConnectLimiter::new(
                cfg.connect_rate_per_ip,
                cfg.connect_burst_per_ip,
                cfg.connect_rate_global,
                cfg.connect_burst_global,
            ),
        })
    }

    /// Admission of one CONNECT attempt from `ip` (token buckets); call before any
    /// authentication work.
    pub fn admit(&self, ip: IpAddr) -> Result<(), Limited> {
        self.limiter.admit(ip)
    }

    /// Checks credentials. `cert` is true when TLS verified a client certificate, which
    /// authenticates the vehicle by itself. A password check waits for one of the
    /// `auth.max_concurrent_hashes` slots and runs on a blocking thread; the caller puts
    /// the whole call under its CONNECT timeout (the slot travels with the blocking
    /// work, so an abandoned check still counts against the bound until it ends).
    pub async fn authenticate_bounded(
        self: &Arc<Self>,
        username: Option<String>,
        password: Option<String>,
        cert: bool,
    ) -> Verdict {
        if password.is_none() || username.is_none() {
            return self.check(username.as_deref(), password.as_deref(), cert);
        }
        let Ok(permit) = self.hash_slots.clone().acquire_owned().await else {
            return Verdict {
                result: Err(Refusal::NotAuthorized),
                check: None,
            };
        };
        let auth = self.clone();
        tokio::task::spawn_blocking(move || {
            let verdict = auth.check(username.as_deref(), password.as_deref(), cert);
            drop(permit);
            verdict
        })
        .await
        .unwrap_or(Verdict {
            result: Err(Refusal::NotAuthorized),
            check: None,
        })
    }

    /// Checks credentials synchronously, without the concurrency bound: for tools and
    /// fuzzing (the session uses [`Auth::authenticate_bounded`]). `cert_identity` is set
    /// when TLS verified a client certificate. Argon2 is deliberately slow.
    pub fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&str>,
        cert_identity: Option<&str>,
    ) -> Result<(), Refusal> {
        self.check(username, password, cert_identity.is_some())
            .result
            .map(|_| ())
    }

    /// The synchronous check behind [`Auth::authenticate_bounded`], with who it proved
    /// and what the password check did. Argon2 is deliberately slow: call this from a
    /// blocking thread.
    pub fn check(&self, username: Option<&str>, password: Option<&str>, cert: bool) -> Verdict {
        match (username, password) {
            (Some(user), Some(pass)) => {
                let (hash, known) = match self.users.get(user) {
                    Some(u) => (u.password_hash.as_str(), true),
                    None => (self.dummy_hash.as_str(), false),
                };
                let ok = self.verify(pass, hash);
                let (result, check) = match (known, ok) {
                    (true, true) => (Ok(Principal::User(user.to_string())), PasswordCheck::Accepted),
                    (true, false) => (Err(Refusal::BadCredentials), PasswordCheck::WrongPassword),
                    (false, _) => (Err(Refusal::BadCredentials), PasswordCheck::UnknownUser),
                };
                Verdict {
                    result,
                    check: Some(check),
                }
            }
            (Some(_), None) | (None, Some(_)) => Verdict {
                result: Err(Refusal::BadCredentials),
                check: None,
            },
            (None, None) => Verdict {
                result: if cert {
                    Ok(Principal::Certificate)
                } else if self.allow_anonymous {
                    Ok(Principal::Anonymous)
                } else {
                    Err(Refusal::NotAuthorized)
                },
                check: None,
            },
        }
    }

    /// One argon2 verification (counted; the peak of concurrent ones is kept for tests).
    fn verify(&self, password: &str, hash: &str) -> bool {
        self.hashes_run.fetch_add(1, Ordering::Relaxed);
        let active = self.hashes_active.fetch_add(1, Ordering::SeqCst) + 1;
        self.hashes_peak.fetch_max(active, Ordering::SeqCst);
        let ok = PasswordHash::new(hash)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false);
        self.hashes_active.fetch_sub(1, Ordering::SeqCst);
        ok
    }

    /// Argon2 verifications run so far (real and dummy).
    pub fn hashes_run(&self) -> u64 {
        self.hashes_run.load(Ordering::Relaxed)
    }

    /// The most argon2 verifications that ran at the same time.
    pub fn hashes_peak(&self) -> usize {
        self.hashes_peak.load(Ordering::SeqCst)
    }

    /// Whether `principal` may use `client_id`. Password users are bound to their
    /// patterns; certificates are bound by the session (`tls.require_client_id_match`);
    /// anonymous clients are not bound.
    pub fn may_use_client_id(&self, principal: &Principal, client_id: &str) -> bool {
        match principal {
            Principal::User(name) => self
                .users
                .get(name)
                .is_some_and(|u| u.client_ids.iter().any(|p| pattern_matches(p, client_id))),
            Principal::Anonymous | Principal::Certificate => true,
        }
    }

    /// The id given to a password user that sent an empty client id: its username, when
    /// that is one of its allowed ids.
    pub fn assigned_client_id(&self, principal: &Principal) -> Option<String> {
        match principal {
            Principal::User(name) => {
                (valid_client_id(name) && self.may_use_client_id(principal, name)).then(|| name.clone())
            }
            _ => None,
        }
    }

    pub fn may_publish(&self, client_id: &str, topic_name: &str) -> bool {
        self.may_publish_as(None, client_id, topic_name)
    }

    pub fn may_subscribe(&self, client_id: &str, filter: &str) -> bool {
        self.may_subscribe_as(None, client_id, filter)
    }

    /// The publish ACL of `user` (an operator's own, else the vehicle ACL) applied to
    /// `topic_name`. A wildcard covers `$`-topics as well (so that `["#"]` means every
    /// topic, as the subscribe ACL's does), but no client publishes under `$SYS`: that
    /// tree is the server's own, and subscribers trust what appears there.
    pub fn may_publish_as(&self, user: Option<&str>, client_id: &str, topic_name: &str) -> bool {
        if topic::is_sys(topic_name) {
            return false;
        }
        let acl = user
            .and_then(|u| self.users.get(u))
            .and_then(|u| u.publish_acl.as_ref())
            .unwrap_or(&self.publish_acl);
        acl.iter().any(|p| matches_expanded(p, client_id, topic_name))
    }

    /// The subscribe ACL of `user` (an operator's own, else the vehicle ACL): the
    /// filter must be covered by an ACL entry, so `#` or `vehicles/#` is refused to a
    /// vehicle whose ACL is `vehicles/{client_id}/...`.
    pub fn may_subscribe_as(&self, user: Option<&str>, client_id: &str, filter: &str) -> bool {
        let acl = user
            .and_then(|u| self.users.get(u))
            .and_then(|u| u.subscribe_acl.as_ref())
            .unwrap_or(&self.subscribe_acl);
        acl.iter()
            .any(|p| expand(p, client_id).is_some_and(|p| topic::covers(&p, filter)))
    }

    /// Whether `user` may publish retained messages (`auth.allow_retain` unless the
    /// user says otherwise).
    pub fn may_retain(&self, user: Option<&str>) -> bool {
        user.and_then(|u| self.users.get(u))
            .and_then(|u| u.allow_retain)
            .unwrap_or(self.allow_retain)
    }
}

/// Substitutes `{client_id}` in an ACL pattern. An id that is not exactly one topic
/// level (it holds `/`, `+`, `#` or NUL) never matches a pattern that names it, so no
/// client id can reach outside its own level.
fn expand(pattern: &str, client_id: &str) -> Option<String> {
    if !pattern.contains("{client_id}") {
        return Some(pattern.to_string());
    }
    if client_id.is_empty() || client_id.contains(['/', '+', '#', '\0']) {
        return None;
    }
    Some(pattern.replace("{client_id}", client_id))
}

/// `topic::matches_levels(&expand(pattern, client_id)?, topic)` without building the
/// expanded pattern: this runs for every PUBLISH (the allocation and copy were 4% of the
/// gateway's CPU on durable ingest). A client id holding `/`, `+`, `#` or NUL never
/// matches a pattern that names it, as in [`expand`].
fn matches_expanded(pattern: &str, client_id: &str, topic_name: &str) -> bool {
    if !pattern.contains("{client_id}") {
        return topic::matches_levels(pattern, topic_name);
    }
    if client_id.is_empty() || client_id.contains(['/', '+', '#', '\0']) {
        return false;
    }
    // The expanded pattern's levels are the pattern's, each expanded (the id holds no
    // `/`, and is neither `+` nor `#`).
    let mut f = pattern.split('/');
    let mut t = topic_name.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if level_expands_to(a, client_id, b) => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether the pattern level `pattern`, with every `{client_id}` replaced by
/// `client_id`, equals `level`.
fn level_expands_to(pattern: &str, client_id: &str, level: &str) -> bool {
    let mut parts = pattern.split("{client_id}");
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = level.strip_prefix(first) else {
        return false;
    };
    for part in parts {
        let Some(r) = rest.strip_prefix(client_id).and_then(|r| r.strip_prefix(part)) else {
            return false;
        };
        rest = r;
    }
    rest.is_empty()
}

/// What an unknown username is verified against: the first configured user's own hash,
/// so that it costs exactly what a known user's check costs (the result is ignored: an
/// unknown user is always refused). Nothing to compute at start, whatever the cost
/// parameters. With no users, a hash with argon2's default parameters.
fn dummy_hash(users: &[User]) -> String {
    users
        .iter()
        .map(|u| u.password_hash.as_str())
        .find(|h| PasswordHash::new(h).is_ok())
        .unwrap_or(DEFAULT_DUMMY_HASH)
        .to_string()
}

/// An argon2id hash with the default parameters (of a password nobody knows).
const DEFAULT_DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$+Z4L1LP49x/L/JvalDVegw$tooklFeVem172g2bGukOybM3TVV5IeS3ZUtCJ8d+7Co";

/// An allowed-client-id pattern: an exact id, or a prefix followed by `*`.
fn pattern_matches(pattern: &str, client_id: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => client_id.starts_with(prefix),
        None => pattern == client_id,
    }
}

/// Checks an `[[auth.users]] client_ids` entry: client-id characters, `{username}`
/// allowed, `*` only as the last character.
pub fn validate_client_id_pattern(pattern: &str) -> Result<(), String> {
    let body = pattern.strip_suffix('*').unwrap_or(pattern);
    let body = body.replace("{username}", "u");
    if body.is_empty() && pattern != "*" {
        return Err("is empty; write an id, a prefix like \"bench-*\", or \"{username}\"".into());
    }
    if pattern == "*" {
        return Err(
            "\"*\" would let the user take any vehicle's id; list ids or a prefix like \"bench-*\"".into(),
        );
    }
    if body.contains('*') {
        return Err("'*' is allowed only at the end (a prefix pattern)".into());
    }
    if !body
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err("client ids use A-Z a-z 0-9 - _ . : (and {username}, a trailing *)".into());
    }
    Ok(())
}

/// Hashes a password for `auth.users[].password_hash` (argon2id, random salt).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// The `mqtt.client_id_policy = "strict"` character set: letters, digits and `- _ . :`.
pub fn valid_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Whether `id` is acceptable under the configured policy. "any": any UTF-8 id without
/// NUL or control characters up to `max_len` bytes (the specification allows any UTF-8;
/// clients and test suites send spaces); "strict": [`valid_client_id`].
pub fn client_id_allowed(id: &str, policy: crate::config::ClientIdPolicy, max_len: usize) -> bool {
    if id.is_empty() || id.len() > max_len {
        return false;
    }
    match policy {
        crate::config::ClientIdPolicy::Strict => valid_client_id(id),
        crate::config::ClientIdPolicy::Any => !id.chars().any(char::is_control),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    /// The allocation-free publish ACL check agrees with expanding, then matching.
    #[test]
    fn matches_expanded_agrees_with_expand_then_match() {
        let cases = [
            ("vehicles/{client_id}/#", "VIN1", "vehicles/VIN1/telemetry"),
            ("vehicles/{client_id}/#", "VIN1", "vehicles/VIN12/telemetry"),
            ("vehicles/{client_id}/#", "VIN1", "vehicles/VIN1"),
            ("vehicles/{client_id}", "a/b", "vehicles/a/b"),
            ("vehicles/{client_id}/+", "+", "vehicles/+/x"),
            ("v/x-{client_id}-{client_id}/t", "ab", "v/x-ab-ab/t"),
            ("v/x-{client_id}-{client_id}/t", "ab", "v/x-ab-ba/t"),
            ("{client_id}/#", "c", "c/x"),
            ("{client_id}/#", "c", "$c/x"),
            ("+/{client_id}", "c", "$SYS/c"),
            ("#", "c", "$SYS/x"),
            ("fleet/{client_id}", "", "fleet/"),
        ];
        for (p, id, t) in cases {
            let want = super::expand(p, id).is_some_and(|e| crate::topic::matches_levels(&e, t));
            assert_eq!(super::matches_expanded(p, id, t), want, "{p} {id} {t}");
        }
    }

    proptest! {
        #[test]
        fn matches_expanded_is_expand_then_match(
            p in "[ab/+#{}]{0,3}(\\{client_id\\})?[ab/+#]{0,3}",
            id in "[ab/+#$]{0,3}",
            t in "[$ab/+#]{0,6}",
        ) {
            let want = super::expand(&p, &id).is_some_and(|e| crate::topic::matches_levels(&e, &t));
            prop_assert_eq!(super::matches_expanded(&p, &id, &t), want);
        }
    }

    use super::*;

    fn cfg_with(users: Vec<User>) -> AuthSection {
        AuthSection {
            allow_anonymous: false,
            users,
            ..AuthSection::default()
        }
    }

    fn user(name: &str, hash: &str, ids: Option<&[&str]>) -> User {
        User {
            username: name.into(),
            password_hash: hash.into(),
            client_ids: ids.map(|l| l.iter().map(|s| s.to_string()).collect()),
            ..User::default()
        }
    }

    #[test]
    fn passwords_and_acl() {
        let hash = hash_password("s3cret").expect("hash");
        let auth = Auth::new(&cfg_with(vec![user("fleet", &hash, None)]));
        let ok = auth.check(Some("fleet"), Some("s3cret"), false);
        assert_eq!(ok.result, Ok(Principal::User("fleet".into())));
        assert_eq!(ok.check, Some(PasswordCheck::Accepted));
        assert_eq!(
            auth.check(Some("fleet"), Some("wrong"), false).result,
            Err(Refusal::BadCredentials)
        );
        assert_eq!(auth.check(None, None, false).result, Err(Refusal::NotAuthorized));
        assert_eq!(auth.check(None, None, true).result, Ok(Principal::Certificate));
        assert_eq!(auth.authenticate(Some("fleet"), Some("s3cret"), None), Ok(()));
        assert_eq!(auth.authenticate(None, None, Some("vin1")), Ok(()));
        assert!(auth.may_publish("vin1", "vehicles/vin1/telemetry"));
        assert!(!auth.may_publish("vin1", "vehicles/vin2/telemetry"));
        assert!(auth.may_subscribe("vin1", "vehicles/vin1/commands/#"));
        assert!(!auth.may_subscribe("vin1", "vehicles/#"));
        assert!(!valid_client_id("a/b") && !valid_client_id("+") && valid_client_id("VIN-123_x.y:z"));
    }

    /// `publish_acl = ["#"]` means every topic, `$`-topics included (a conforming
    /// server lets clients publish there), except the server's own `$SYS` tree.
    #[test]
    fn a_permissive_publish_acl_covers_dollar_topics_but_not_sys() {
        let auth = Auth::new(&AuthSection {
            allow_anonymous: true,
            publish_acl: vec!["#".into()],
            subscribe_acl: vec!["#".into()],
            ..AuthSection::default()
        });
        assert!(auth.may_publish("c", "$TopicA/B"));
        assert!(auth.may_publish("c", "a/b"));
        assert!(!auth.may_publish("c", "$SYS/broker/uptime"));
        assert!(!auth.may_publish("c", "$SYS"));
        assert!(auth.may_subscribe("c", "$TopicA/#"));
        // The vehicle default stays inside the vehicle's own tree.
        let vehicle = Auth::new(&AuthSection::default());
        assert!(!vehicle.may_publish("c", "$vehicles/c/telemetry"));
    }

    #[test]
    fn unknown_users_cost_one_hash_like_a_wrong_password() {
        let hash = hash_password("s3cret").expect("hash");
        let auth = Auth::new(&cfg_with(vec![user("fleet", &hash, None)]));
        let before = auth.hashes_run();
        let wrong = auth.check(Some("fleet"), Some("nope"), false);
        assert_eq!(auth.hashes_run(), before + 1);
        let unknown = auth.check(Some("nobody"), Some("nope"), false);
        assert_eq!(
            auth.hashes_run(),
            before + 2,
            "the dummy hash ran for the unknown user"
        );
        // Same refusal on the wire; only the metric label tells them apart.
        assert_eq!(wrong.result, unknown.result);
        assert_eq!(unknown.check, Some(PasswordCheck::UnknownUser));
        // The dummy has the configured user's cost parameters, and a known user's
        // password does not open an unknown username.
        assert_eq!(auth.dummy_hash, hash);
        assert_eq!(
            auth.check(Some("nobody"), Some("s3cret"), false).result,
            Err(Refusal::BadCredentials)
        );
        let none = Auth::new(&cfg_with(Vec::new()));
        let dummy = PasswordHash::new(&none.dummy_hash).expect("default dummy is a PHC string");
        let (params, default) = (
            argon2::Params::try_from(&dummy).expect("params"),
            argon2::Params::default(),
        );
        assert_eq!(
            (params.m_cost(), params.t_cost(), params.p_cost()),
            (default.m_cost(), default.t_cost(), default.p_cost())
        );
        assert_eq!(
            none.check(Some("x"), Some("y"), false).check,
            Some(PasswordCheck::UnknownUser)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_hashes_are_bounded() {
        let hash = hash_password("s3cret").expect("hash");
        let mut cfg = cfg_with(vec![user("fleet", &hash, None)]);
        cfg.max_concurrent_hashes = 2;
        let auth = Auth::new(&cfg);
        let checks: Vec<_> = (0..12)
            .map(|i| {
                let auth = auth.clone();
                tokio::spawn(async move {
                    let pass = if i % 2 == 0 { "s3cret" } else { "wrong" };
                    auth.authenticate_bounded(Some("fleet".into()), Some(pass.into()), false)
                        .await
                })
            })
            .collect();
        for c in checks {
            c.await.expect("task");
        }
        assert_eq!(auth.hashes_run(), 12);
        assert!(auth.hashes_peak() <= 2, "peak {}", auth.hashes_peak());
        assert!(auth.hashes_peak() >= 1);
    }

    #[test]
    fn client_ids_are_bound_to_users() {
        let hash = hash_password("x").expect("hash");
        let auth = Auth::new(&cfg_with(vec![
            user("car1", &hash, None),
            user("bench", &hash, Some(&["bench-*", "{username}", "tool"])),
            user("svc@corp", &hash, Some(&["svc-{username}-*"])),
        ]));
        let car1 = Principal::User("car1".into());
        assert!(auth.may_use_client_id(&car1, "car1"));
        assert!(
            !auth.may_use_client_id(&car1, "car2"),
            "default: exactly the username"
        );
        assert!(!auth.may_use_client_id(&car1, "car10"));
        assert_eq!(auth.assigned_client_id(&car1).as_deref(), Some("car1"));
        let bench = Principal::User("bench".into());
        for id in ["bench-1", "bench-", "bench", "tool"] {
            assert!(auth.may_use_client_id(&bench, id), "{id}");
        }
        for id in ["bench1", "car1", "tool2"] {
            assert!(!auth.may_use_client_id(&bench, id), "{id}");
        }
        let svc = Principal::User("svc@corp".into());
        assert!(auth.may_use_client_id(&svc, "svc-svc@corp-1"));
        assert_eq!(
            auth.assigned_client_id(&svc),
            None,
            "not allowed / not a valid id"
        );
        assert!(auth.may_use_client_id(&Principal::Anonymous, "anything"));
        assert!(!auth.may_use_client_id(&Principal::User("ghost".into()), "ghost"));
    }

    #[test]
    fn client_id_patterns_are_validated() {
        for ok in ["VIN1", "bench-*", "{username}", "{username}-*", "a:b.c_d"] {
            assert_eq!(validate_client_id_pattern(ok), Ok(()), "{ok}");
        }
        for bad in ["", "*", "a*b", "a/b", "x+", "**"] {
            assert!(validate_client_id_pattern(bad).is_err(), "{bad}");
        }
    }
}
