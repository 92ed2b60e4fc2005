//! HAProxy (Debian `haproxy`) in TCP mode in front of gateways, as a region's L4 load
//! balancer: `leastconn`, a TCP health check every 300 ms (down after 2 failures, up
//! after 2 successes), connections to a dead server redispatched to another, and a
//! server marked down has its sessions shut (`on-marked-down shutdown-sessions`) so that
//! vehicles notice at once. Servers are listed by port; one whose gateway is not running
//! yet is simply down until it starts (how a scale-out joins).

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct HaProxy {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub addr: SocketAddr,
}

/// The haproxy binary, or a panic naming what is missing.
pub fn haproxy_bin() -> PathBuf {
    for p in ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"] {
        if std::path::Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    match Command::new("haproxy").arg("-v").output() {
        Ok(o) if o.status.success() => PathBuf::from("haproxy"),
        _ => panic!(
            "haproxy is not installed (not at /usr/sbin/haproxy nor on PATH): \
             `apt-get install haproxy` (./scripts/test.sh installs it)"
        ),
    }
}

impl HaProxy {
    /// Listens on a free loopback port and balances over `127.0.0.1:<port>` of `backends`.
    pub fn start(backends: &[u16]) -> HaProxy {
        let bin = haproxy_bin();
        let dir = tempfile::tempdir().expect("tempdir");
        let port = crate::kafka::free_tcp_port();
        let mut servers = String::new();
        for (i, p) in backends.iter().enumerate() {
            servers.push_str(&format!("  server gw{} 127.0.0.1:{p} check\n", i + 1));
        }
        let cfg = format!(
            "global\n  maxconn 4000\n  stats socket {sock} mode 600 level admin\n\
             defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 300s\n  timeout server 300s\n\
             \x20 retries 3\n  option redispatch 1\n\
             frontend mqtt\n  bind 127.0.0.1:{port}\n  default_backend gateways\n\
             backend gateways\n  balance leastconn\n\
             \x20 default-server inter 300ms fall 2 rise 2 on-marked-down shutdown-sessions\n{servers}",
            sock = dir.path().join("admin.sock").display()
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg).expect("haproxy.cfg");
        let check = Command::new(&bin)
            .args(["-c", "-q", "-f"])
            .arg(&path)
            .output()
            .expect("run haproxy -c");
        assert!(
            check.status.success(),
            "haproxy refused its configuration:\n{cfg}\n{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let log = std::fs::File::create(dir.path().join("haproxy.log")).expect("log");
        let child = Command::new(&bin)
            .args(["-db", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start haproxy");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let h = HaProxy {
            child: Some(child),
            dir,
            addr,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen on {addr}:\n{}",
                h.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        h
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }

    /// A command on the runtime API (`show servers state`, ...), over its socket (which
    /// haproxy may create a moment after its listeners accept: waited for, 10 s).
    pub fn runtime(&self, command: &str) -> String {
        use std::io::{Read, Write};
        let path = self.dir.path().join("admin.sock");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            match std::os::unix::net::UnixStream::connect(&path) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() >= deadline => {
                    panic!("haproxy admin socket {}: {e}\n{}", path.display(), self.log())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.write_all(format!("{command}\n").as_bytes()).expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// Each server's operational state from the runtime API: (name, up).
    pub fn servers_up(&self) -> Vec<(String, bool)> {
        // `show servers state` columns: be_id be_name srv_id srv_name srv_addr
        // srv_op_state (2 = running) ...
        self.runtime("show servers state gateways")
            .lines()
            .filter(|l| !l.starts_with('#') && l.split_whitespace().count() > 5)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some((f.get(3)?.to_string(), *f.get(5)? == "2"))
            })
            .collect()
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A gateway of a region behind the balancer: its own journal (a fresh directory), its
/// own `gateway.id`, MQTT on the fixed `port` (so that HAProxy finds it again after a
/// restart on the same directory with [`crate::Gateway::start_in`]), Kafka at `kafka`
/// (`[kafka]`, `[[routes]]` and `[auth]` sections, e.g. [`crate::kafka_config`]).
pub fn region_gateway(port: u16, id: &str, kafka: &str) -> crate::Gateway {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config_path = tmp.path().join("gateway.toml");
    let text = crate::config(&tmp.path().join("journal"), kafka)
        .replacen(
            "[mqtt]\nlisten = \"127.0.0.1:0\"",
            &format!("[mqtt]\nlisten = \"127.0.0.1:{port}\""),
            1,
        )
        .replacen("[gateway]\n", &format!("[gateway]\nid = \"{id}\"\n"), 1);
    assert!(
        text.contains(&format!("127.0.0.1:{port}")),
        "config layout changed:\n{text}"
    );
    std::fs::write(&config_path, text).expect("config");
    crate::Gateway::start_in(tmp, config_path)
}
