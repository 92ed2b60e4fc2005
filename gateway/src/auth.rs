//! Who may connect (anonymous, username + argon2 password hash, client certificate) and
//! what a connected vehicle may publish and subscribe to.

use std::collections::HashMap;
use std::sync::Arc;

use argon2::{Argon2, PasswordHash, PasswordVerifier};

use crate::config::AuthSection;
use crate::topic;

/// Why a CONNECT is refused, mapped to 3.1.1 return codes and 5.0 reason codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadCredentials,
    NotAuthorized,
}

#[derive(Debug)]
pub struct Auth {
    allow_anonymous: bool,
    users: HashMap<String, String>,
    publish_acl: Vec<String>,
    subscribe_acl: Vec<String>,
}

impl Auth {
    pub fn new(cfg: &AuthSection) -> Arc<Self> {
        Arc::new(Auth {
            allow_anonymous: cfg.allow_anonymous,
            users: cfg
                .users
                .iter()
                .map(|u| (u.username.clone(), u.password_hash.clone()))
                .collect(),
            publish_acl: cfg.publish_acl.clone(),
            subscribe_acl: cfg.subscribe_acl.clone(),
        })
    }

    /// Checks credentials. `cert_identity` is set when TLS verified a client certificate,
    /// which authenticates the vehicle by itself. Argon2 is deliberately slow: call this
    /// from a blocking thread.
    pub fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&str>,
        cert_identity: Option<&str>,
    ) -> Result<(), Refusal> {
        match (username, password) {
            (Some(user), Some(pass)) => {
                let hash = self.users.get(user).ok_or(Refusal::BadCredentials)?;
                let parsed = PasswordHash::new(hash).map_err(|_| Refusal::BadCredentials)?;
                Argon2::default()
                    .verify_password(pass.as_bytes(), &parsed)
                    .map_err(|_| Refusal::BadCredentials)
            }
            (Some(_), None) | (None, Some(_)) => Err(Refusal::BadCredentials),
            (None, None) if cert_identity.is_some() || self.allow_anonymous => Ok(()),
            (None, None) => Err(Refusal::NotAuthorized),
        }
    }

    pub fn may_publish(&self, client_id: &str, topic_name: &str) -> bool {
        self.publish_acl
            .iter()
            .any(|p| topic::matches(&p.replace("{client_id}", client_id), topic_name))
    }

    pub fn may_subscribe(&self, client_id: &str, filter: &str) -> bool {
        self.subscribe_acl
            .iter()
            .any(|p| topic::covers(&p.replace("{client_id}", client_id), filter))
    }
}

/// Hashes a password for `auth.users[].password_hash` (argon2id, random salt).
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Client ids become topic levels through `{client_id}` and Kafka keys: only characters
/// that cannot escape a topic level or confuse a log line are allowed.
pub fn valid_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::User;

    #[test]
    fn passwords_and_acl() {
        let hash = hash_password("s3cret").expect("hash");
        let cfg = AuthSection {
            allow_anonymous: false,
            users: vec![User {
                username: "fleet".into(),
                password_hash: hash,
            }],
            ..AuthSection::default()
        };
        let auth = Auth::new(&cfg);
        assert_eq!(auth.authenticate(Some("fleet"), Some("s3cret"), None), Ok(()));
        assert_eq!(
            auth.authenticate(Some("fleet"), Some("wrong"), None),
            Err(Refusal::BadCredentials)
        );
        assert_eq!(auth.authenticate(None, None, None), Err(Refusal::NotAuthorized));
        assert_eq!(auth.authenticate(None, None, Some("vin1")), Ok(()));
        assert!(auth.may_publish("vin1", "vehicles/vin1/telemetry"));
        assert!(!auth.may_publish("vin1", "vehicles/vin2/telemetry"));
        assert!(auth.may_subscribe("vin1", "vehicles/vin1/commands/#"));
        assert!(!auth.may_subscribe("vin1", "vehicles/#"));
        assert!(!valid_client_id("a/b") && !valid_client_id("+") && valid_client_id("VIN-123_x.y:z"));
    }
}
