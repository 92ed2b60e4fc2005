//! MQTT topic names and filters: validation and matching (MQTT 3.1.1 §4.7, 5.0 §4.7).

/// A topic name in a PUBLISH: non-empty, no wildcards, no NUL.
pub fn validate_name(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err("topic name is empty");
    }
    if topic.contains(['+', '#']) {
        return Err("wildcard in a PUBLISH topic name");
    }
    if topic.contains('\0') {
        return Err("NUL character in topic name");
    }
    Ok(())
}

/// A topic filter in a SUBSCRIBE or an ACL: `#` only last and alone in its level, `+`
/// alone in its level.
pub fn validate_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() {
        return Err("topic filter is empty");
    }
    if filter.contains('\0') {
        return Err("NUL character in topic filter");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err("'#' must be the last level on its own");
        }
        if level.contains('+') && *level != "+" {
            return Err("'+' must be a level on its own");
        }
    }
    Ok(())
}

/// Whether `topic` matches `filter`. Topics starting with `$` are not matched by a
/// leading wildcard.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    matches_levels(filter, topic)
}

/// Whether `topic` (or an ACL pattern) is in the server's own `$SYS` tree, where no
/// client may publish.
pub fn is_sys(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}

/// Whether `topic` matches `filter` level by level, a leading wildcard matching a
/// `$` level too: for access rules, which say what a client may reach (as [`covers`]
/// does), not which subscriptions a message is delivered to.
pub fn matches_levels(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic `inner` can match is matched by `outer` (used to authorise a
/// SUBSCRIBE filter against the subscribe ACL).
pub fn covers(outer: &str, inner: &str) -> bool {
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(_), Some("+")) => return false,
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        assert!(matches("vehicles/v1/#", "vehicles/v1/telemetry"));
        assert!(matches("vehicles/v1/#", "vehicles/v1"));
        assert!(matches("vehicles/+/telemetry", "vehicles/v1/telemetry"));
        assert!(!matches("vehicles/v1/#", "vehicles/v2/telemetry"));
        assert!(!matches("#", "$SYS/x"));
        assert!(matches_levels("#", "$SYS/x"));
        assert!(matches_levels("+/x", "$a/x"));
        assert!(!matches_levels("a/+", "a"));
        assert!(validate_filter("a/#/b").is_err());
        assert!(validate_filter("a/b+").is_err());
        assert!(validate_name("a/+").is_err());
        assert!(covers("vehicles/v1/commands/#", "vehicles/v1/commands/+"));
        assert!(!covers("vehicles/v1/commands/+", "vehicles/v1/commands/#"));
        assert!(!covers("vehicles/v1/#", "vehicles/+/x"));
    }
}
