//! A small TCP proxy: a fixed local address (for example a Kafka bootstrap address)
//! forwarding every new connection to a target port that a test can re-point, like a
//! load balancer or a DNS name in front of a broker that moved. Existing connections are
//! cut when the target changes, as they would be when the old backend died.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Proxy {
    addr: SocketAddr,
    target: Arc<AtomicU16>,
    stop: Arc<AtomicBool>,
    /// Connections accepted so far (tests read it to know the proxy was used).
    pub accepted: Arc<AtomicU64>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:target`.
    pub fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let target = Arc::new(AtomicU16::new(target));
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (t, s, a, o) = (target.clone(), stop.clone(), accepted.clone(), open.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        let port = t.load(Ordering::Relaxed);
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect_timeout(
                            &SocketAddr::from(([127, 0, 0, 1], port)),
                            Duration::from_secs(2),
                        ) else {
                            continue; // refused: the client sees a closed connection
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                            let mut open = o.lock().unwrap_or_else(|e| e.into_inner());
                            open.push(c2);
                            open.push(s2);
                        }
                        pipe(client, server);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy {
            addr,
            target,
            stop,
            accepted,
            open,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// New connections go to `127.0.0.1:port`; open ones are cut.
    pub fn retarget(&self, port: u16) {
        self.target.store(port, Ordering::Relaxed);
        self.cut();
    }

    /// Closes every proxied connection (both sides).
    pub fn cut(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        for s in open.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
    }
}

fn pipe(client: TcpStream, server: TcpStream) {
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    std::thread::spawn(move || copy(client, server));
    std::thread::spawn(move || copy(s2, c2));
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
