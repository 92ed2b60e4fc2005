//! The admin listener cannot be used against the gateway: its connections are bounded
//! and timed out, and its token is checked.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use integration::{http_get, http_request, Gateway, ANON};

/// Status line and body of one GET with an optional bearer token.
fn request(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    http_request(addr, "GET", path, token)
}

/// True when the server closed `s` (EOF or reset) within `within`.
fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).expect("timeout");
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

#[test]
fn idle_sockets_cannot_exhaust_the_admin_port() {
    let gw = Gateway::start_env(
        ANON,
        &[
            ("GATEWAY_ADMIN__MAX_CONNECTIONS", "4"),
            ("GATEWAY_ADMIN__REQUEST_TIMEOUT_SECS", "1"),
        ],
    );
    let admin = gw.admin.expect("admin listener");
    let started = Instant::now();
    let mut idle: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect(admin).expect("connect"))
        .collect();
    // Beyond the bound, sockets are closed at once.
    let refused = idle
        .iter_mut()
        .filter_map(|s| {
            s.set_read_timeout(Some(Duration::from_millis(300))).ok()?;
            let mut b = [0u8; 1];
            matches!(s.read(&mut b), Ok(0)).then_some(())
        })
        .count();
    assert!(
        refused >= 6,
        "only {refused} of 10 idle sockets refused past max_connections = 4"
    );
    // The ones admitted never send headers: they are closed at the request timeout.
    for s in idle.iter_mut() {
        assert!(
            closed_by_server(s, Duration::from_secs(5)),
            "an idle admin socket was still open after {:?}",
            started.elapsed()
        );
    }
    let (code, body) = request(admin, "/healthz", None);
    assert_eq!(code, 200, "{body}");
    let m = gw.metric("gateway_admin_connections_rejected_total");
    assert!(m >= 6, "gateway_admin_connections_rejected_total = {m}");
}

#[test]
fn slow_headers_are_cut_off() {
    let gw = Gateway::start_env(ANON, &[("GATEWAY_ADMIN__REQUEST_TIMEOUT_SECS", "1")]);
    let admin = gw.admin.expect("admin listener");
    let mut s = TcpStream::connect(admin).expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    let t = Instant::now();
    // Dribble a header byte now and then, never finishing the request.
    let mut closed = false;
    while t.elapsed() < Duration::from_secs(8) {
        if s.write_all(b"X").is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        s.set_read_timeout(Some(Duration::from_millis(1)))
            .expect("timeout");
        let mut b = [0u8; 256];
        if let Ok(n) = s.read(&mut b) {
            // Either EOF or a 408 before closing: both end the slowloris.
            let _ = n;
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a slowloris request was still open after {:?}",
        t.elapsed()
    );
    assert!(http_get(admin, "/healthz").contains("ok"));
}

#[test]
fn api_requires_the_token() {
    let gw = Gateway::start_env(ANON, &[("GATEWAY_ADMIN__TOKEN", "correct-horse-battery-staple")]);
    let admin = gw.admin.expect("admin listener");
    let (code, body) = request(admin, "/api/v1/status", None);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("unauthorized"), "{body}");
    let (code, _) = request(admin, "/api/v1/status", Some("correct-horse-battery-stapl"));
    assert_eq!(code, 401);
    let (code, _) = request(admin, "/api/v1/status", Some("correct-horse-battery-staple!"));
    assert_eq!(code, 401);
    let (code, body) = request(admin, "/api/v1/status", Some("correct-horse-battery-staple"));
    assert_eq!(code, 200, "{body}");
    // Health and metrics stay open for probes and Prometheus.
    assert_eq!(request(admin, "/healthz", None).0, 200);
    assert_eq!(request(admin, "/metrics", None).0, 200);
}
