//! A TLS server stream on rustls' unbuffered API, whose buffers are ours to size.
//!
//! Why not `tokio-rustls`: a buffered rustls connection keeps a zero-filled 4 KiB receive
//! buffer for its whole life (rustls' deframer sizes it before every read and never
//! below that), and an idle vehicle pays for it forever: it was a third of a TLS
//! connection's memory. Here the ciphertext buffers are allocated while bytes are in
//! flight and freed when a connection goes quiet, so an idle TLS vehicle holds rustls'
//! keys and state and nothing else.
//!
//! The rules of the unbuffered API (`process_tls_records`) that this relies on:
//! - every call gets the whole unprocessed input `incoming[..used]`, also on the write
//!   path: rustls' handshake joiner remembers how far into our buffer it has read, so
//!   any other slice (an empty one, say) breaks it;
//! - a state is handled completely (records read, messages encoded) and `discard`
//!   applied before the next call;
//! - handshake and post-handshake messages (session tickets, alerts, key update answers)
//!   come out as `EncodeTlsData`; they are appended to `out`, which is sent in order
//!   ahead of anything encrypted later, so calling `TransmitTlsData::done` once they are
//!   queued (not yet sent) keeps the record order;
//! - after an error, one more call may yield the fatal alert rustls queued; it is sent
//!   on a best-effort basis before the error is returned.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Read size while the peer is quiet: a PINGREQ is one 24-byte record in TLS 1.3.
const IDLE_READ: usize = 64;
/// Read size while bytes stream in (and during the handshake).
const READ_CHUNK: usize = 4096;
/// Largest TLS record on the wire (16 KiB of plaintext plus the most expansion
/// TLS allows, plus its header); rustls refuses anything larger.
const MAX_RECORD: usize = 16384 + 2048 + 5;
/// Most ciphertext held at once: rustls joins a handshake message of up to 64 KiB (a
/// client certificate chain) across records it leaves in our buffer until complete.
const MAX_BUFFERED: usize = 0xffff + MAX_RECORD;

/// A server-side TLS connection over TCP. Build it with [`accept`].
pub struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Ciphertext received and not yet processed: `incoming[..used]`. Freed when empty
    /// and the peer is quiet.
    incoming: Vec<u8>,
    used: usize,
    /// The latest socket read filled a full chunk: more is likely waiting, so reads
    /// are full-sized. Cleared (and the buffer freed) as soon as the socket runs dry.
    streaming: bool,
    /// Plaintext decrypted and not yet handed to the reader.
    plaintext: BytesMut,
    /// Ciphertext to send: `out[sent..]`. Freed once everything was sent.
    out: Vec<u8>,
    sent: usize,
    /// The peer sent close_notify, or closed the socket: reads return end of stream.
    eof: bool,
    /// We queued our close_notify.
    closing: bool,
}

/// What a pass over rustls' state machine is for.
#[derive(Clone, Copy)]
enum Goal<'d> {
    /// Decrypt what arrived (and answer what rustls must answer).
    Read,
    /// Encrypt this application data.
    Write(&'d [u8]),
    /// Queue our close_notify.
    Close,
}

/// What one call of `process_tls_records` led to.
enum Step {
    /// Something changed (plaintext, queued records): look again.
    Progress,
    /// Nothing more can happen without more bytes from the peer.
    NeedBytes,
    /// The write or close goal was queued in `out`.
    Done,
    /// The peer sent close_notify: no more data from it (we may still write).
    PeerClosed,
    /// Closed both ways.
    Closed,
}

/// Completes the TLS handshake on `tcp` (the caller bounds it in time).
pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
    let conn = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
    let mut s = TlsStream {
        tcp,
        conn,
        incoming: Vec::new(),
        used: 0,
        streaming: false,
        plaintext: BytesMut::new(),
        out: Vec::new(),
        sent: 0,
        eof: false,
        closing: false,
    };
    std::future::poll_fn(|cx| s.poll_handshake(cx)).await?;
    Ok(s)
}

impl TlsStream {
    /// The client's certificate chain, when it presented one (verified by rustls).
    pub fn peer_certificates(&self) -> Option<&[rustls::pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.process_or_alert(cx, Goal::Read)? {
                Step::Progress | Step::Done => {}
                Step::PeerClosed | Step::Closed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed during the TLS handshake",
                    )))
                }
                Step::NeedBytes => {
                    ready!(self.poll_send(cx))?;
                    if !self.conn.is_handshaking() {
                        return Poll::Ready(Ok(()));
                    }
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed during the TLS handshake",
                        )));
                    }
                }
            }
        }
    }

    /// [`Self::process`], and on an error a last try to send the alert rustls queued.
    fn process_or_alert(&mut self, cx: &mut Context<'_>, goal: Goal<'_>) -> io::Result<Step> {
        let result = self.process(goal);
        if result.is_err() {
            let _ = self.poll_send(cx);
        }
        result
    }

    /// Runs rustls over the received bytes once and acts on the state it reaches.
    fn process(&mut self, goal: Goal<'_>) -> io::Result<Step> {
        let UnbufferedStatus { mut discard, state } =
            self.conn.process_tls_records(&mut self.incoming[..self.used]);
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                self.discard(discard);
                self.queue_alert();
                return Err(invalid(e));
            }
        };
        let step = match state {
            ConnectionState::ReadTraffic(mut records) => {
                while let Some(record) = records.next_record() {
                    let record = record.map_err(invalid)?;
                    discard += record.discard;
                    self.plaintext.extend_from_slice(record.payload);
                }
                Step::Progress
            }
            ConnectionState::EncodeTlsData(mut encode) => {
                append(&mut self.out, 512, |buf| encode.encode(buf).map_err(encode_room))?;
                Step::Progress
            }
            // Queued in `out` above, ahead of anything written later.
            ConnectionState::TransmitTlsData(transmit) => {
                transmit.done();
                Step::Progress
            }
            ConnectionState::WriteTraffic(mut w) => match goal {
                Goal::Read => Step::NeedBytes,
                Goal::Write(data) => {
                    // Room for the records' headers and tags; rustls says if it needs more.
                    let guess = data.len() + (data.len() / 16384 + 1) * 64;
                    append(&mut self.out, guess, |buf| {
                        w.encrypt(data, buf).map_err(encrypt_room)
                    })?;
                    Step::Done
                }
                Goal::Close => {
                    append(&mut self.out, 64, |buf| {
                        w.queue_close_notify(buf).map_err(encrypt_room)
                    })?;
                    Step::Done
                }
            },
            ConnectionState::BlockedHandshake => Step::NeedBytes,
            ConnectionState::PeerClosed => Step::PeerClosed,
            ConnectionState::Closed => Step::Closed,
            // Early data is never enabled (`max_early_data_size` is 0), and later states
            // are not known to this code: refuse rather than guess.
            _ => return Err(invalid("unexpected TLS connection state")),
        };
        self.discard(discard);
        if self.used == 0 && !self.streaming && !self.incoming.is_empty() {
            // Quiet peer, nothing pending: no buffer while idle.
            self.incoming = Vec::new();
        }
        Ok(step)
    }

    fn discard(&mut self, discard: usize) {
        if discard > 0 {
            let discard = discard.min(self.used);
            self.incoming.copy_within(discard..self.used, 0);
            self.used -= discard;
        }
    }

    /// After an error: rustls may have queued a fatal alert, which one more call hands
    /// out (exactly one: a second would deframe the bad input again).
    fn queue_alert(&mut self) {
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut self.incoming[..self.used]);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = state {
            let _ = append(&mut self.out, 64, |buf| encode.encode(buf).map_err(encode_room));
        }
    }

    /// Reads more ciphertext from the socket; `Ok(0)` is the peer closing it.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let want = if self.conn.is_handshaking() || self.streaming {
            // While handshaking, rustls may hold a joined message at the front of the
            // buffer, so no record header can be read there: read whole chunks.
            match self.incoming.get(..self.used).and_then(record_len) {
                Some(len) if len > self.used && !self.conn.is_handshaking() => {
                    (len - self.used).max(READ_CHUNK)
                }
                _ => READ_CHUNK,
            }
        } else {
            match self.incoming.get(..self.used).and_then(record_len) {
                // The rest of a record whose header arrived.
                Some(len) if len > self.used => len - self.used,
                _ => IDLE_READ,
            }
        };
        if self.used + want > MAX_BUFFERED {
            return Poll::Ready(Err(invalid("TLS message larger than this server accepts")));
        }
        if self.incoming.len() < self.used + want {
            self.incoming.resize(self.used + want, 0);
        }
        let mut buf = ReadBuf::new(&mut self.incoming[self.used..]);
        if Pin::new(&mut self.tcp).poll_read(cx, &mut buf)?.is_pending() {
            if self.used == 0 {
                // The socket ran dry: the peer went quiet, keep no buffer while it is.
                self.streaming = false;
                self.incoming = Vec::new();
            }
            return Poll::Pending;
        }
        let n = buf.filled().len();
        // Only a full chunk counts: a read that just completes a record is not a stream.
        self.streaming = want >= READ_CHUNK && n == want;
        self.used += n;
        Poll::Ready(Ok(n))
    }

    /// Sends what is queued in `out`; ready once all of it is on the socket.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if !self.out.is_empty() {
            // Sent: a quiet connection keeps no send buffer.
            self.out = Vec::new();
            self.sent = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Drives rustls until `goal` (a write or our close_notify) is queued in `out`.
    /// Records that arrived meanwhile are decrypted into `plaintext` for the next read.
    fn queue(&mut self, cx: &mut Context<'_>, goal: Goal<'_>) -> io::Result<()> {
        loop {
            match self.process_or_alert(cx, goal)? {
                Step::Done => return Ok(()),
                Step::Progress => {}
                Step::PeerClosed => self.eof = true,
                Step::Closed => return Err(io::ErrorKind::BrokenPipe.into()),
                Step::NeedBytes => return Err(invalid("TLS connection cannot send application data now")),
            }
        }
    }
}

/// Appends what `f` writes to `out`, giving it `guess` bytes of room first and, when it
/// answers `Err(Ok(required))`, exactly that much.
fn append(
    out: &mut Vec<u8>,
    guess: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<usize, Result<usize, io::Error>>,
) -> io::Result<()> {
    let start = out.len();
    out.resize(start + guess, 0);
    let written = match f(&mut out[start..]) {
        Ok(n) => n,
        Err(Ok(required)) => {
            out.resize(start + required, 0);
            match f(&mut out[start..]) {
                Ok(n) => n,
                Err(Ok(_)) => {
                    out.truncate(start);
                    return Err(io::Error::other("TLS output larger than rustls asked for"));
                }
                Err(Err(e)) => {
                    out.truncate(start);
                    return Err(e);
                }
            }
        }
        Err(Err(e)) => {
            out.truncate(start);
            return Err(e);
        }
    };
    out.truncate(start + written);
    Ok(())
}

/// For [`append`]: the room rustls asked for, or the error.
fn encode_room(e: EncodeError) -> Result<usize, io::Error> {
    match e {
        EncodeError::InsufficientSize(s) => Ok(s.required_size),
        e => Err(io::Error::other(e)),
    }
}

/// For [`append`]: the room rustls asked for, or the error.
fn encrypt_room(e: EncryptError) -> Result<usize, io::Error> {
    match e {
        EncryptError::InsufficientSize(s) => Ok(s.required_size),
        e => Err(io::Error::other(e)),
    }
}

fn invalid<E: std::fmt::Display>(e: E) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Total length of the first TLS record in `buf`, once its 5-byte header is there.
fn record_len(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..5)?;
    Some(5 + usize::from(u16::from_be_bytes([header[3], header[4]])))
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.plaintext.is_empty() {
                let n = this.plaintext.len().min(buf.remaining());
                buf.put_slice(&this.plaintext[..n]);
                this.plaintext.advance(n);
                if this.plaintext.is_empty() {
                    this.plaintext = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // Records rustls queued (an alert, a key update answer) go out as we read;
            // a peer slow to read them must not stop us reading.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            match this.process_or_alert(cx, Goal::Read)? {
                Step::Progress | Step::Done => {}
                Step::PeerClosed | Step::Closed => this.eof = true,
                Step::NeedBytes => {
                    if ready!(this.poll_fill(cx))? == 0 {
                        // The socket closed without close_notify: end of stream for MQTT,
                        // which frames its own packets.
                        this.eof = true;
                    }
                }
            }
        }
    }
}

impl crate::session::ReadReady for TlsStream {
    /// Ready when plaintext or unprocessed ciphertext is here, or the socket has bytes.
    /// Records rustls queued for the peer (an alert, a key update answer) go out too:
    /// an idle session waits only here.
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Poll::Ready(Err(e)) = self.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        if !self.plaintext.is_empty() || self.used > 0 || self.eof {
            return Poll::Ready(Ok(()));
        }
        self.tcp.poll_read_ready(cx)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        // At most one batch waits in `out`: a peer that does not read pushes back here.
        ready!(this.poll_send(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = data.len().min(64 * 1024);
        this.queue(cx, Goal::Write(&data[..n]))?;
        // Start sending now; what the socket does not take goes with the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.closing {
            this.closing = true;
            // Best effort: a connection in a state that cannot say goodbye just closes.
            let _ = this.queue(cx, Goal::Close);
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    struct Pair {
        server: TlsStream,
        client: tokio_rustls::client::TlsStream<TcpStream>,
    }

    fn configs(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let der: CertificateDer<'static> = cert.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A listener that accepts one connection and runs [`accept`] on it: its address,
    /// and the server side's outcome.
    async fn serve_one(
        cfg: Arc<ServerConfig>,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<io::Result<TlsStream>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepting = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(tcp, cfg).await
        });
        (addr, accepting)
    }

    async fn connect(
        addr: std::net::SocketAddr,
        cfg: Arc<rustls::ClientConfig>,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
    }

    async fn pair_with(server_cfg: Arc<ServerConfig>, client_cfg: Arc<rustls::ClientConfig>) -> Pair {
        let (addr, accepting) = serve_one(server_cfg).await;
        let client = connect(addr, client_cfg).await.unwrap();
        Pair {
            server: accepting.await.unwrap().unwrap(),
            client,
        }
    }

    async fn pair(versions: &[&'static rustls::SupportedProtocolVersion]) -> Pair {
        let (server_cfg, client_cfg) = configs(versions);
        pair_with(server_cfg, client_cfg).await
    }

    /// Bytes both ways, small and large (records larger than any read, reads spanning
    /// records), in TLS 1.3 and 1.2, arrive intact and in order.
    #[tokio::test]
    async fn data_crosses_both_ways_intact() {
        for versions in [&[&rustls::version::TLS13][..], &[&rustls::version::TLS12][..]] {
            let Pair {
                mut server,
                mut client,
            } = pair(versions).await;
            let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            let send = big.clone();
            let writer = tokio::spawn(async move {
                client.write_all(b"hello").await.unwrap();
                client.write_all(&send).await.unwrap();
                client.flush().await.unwrap();
                let mut back = vec![0u8; 300_000];
                client.read_exact(&mut back).await.unwrap();
                (client, back)
            });
            let mut got = vec![0u8; 5 + big.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(&got[..5], b"hello");
            assert!(got[5..] == big[..], "payload differs");
            server.write_all(&big).await.unwrap();
            server.flush().await.unwrap();
            let (_client, back) = writer.await.unwrap();
            assert!(back == big, "echo differs");
        }
    }

    /// The point of this stream: a connection that went quiet holds no ciphertext or
    /// plaintext buffer (a buffered rustls connection keeps 4 KiB for its whole life).
    #[tokio::test]
    async fn a_quiet_connection_keeps_no_buffers() {
        let Pair {
            mut server,
            mut client,
        } = pair(&[&rustls::version::TLS13]).await;
        client.write_all(&[0xC0, 0x00]).await.unwrap(); // a PINGREQ
        client.flush().await.unwrap();
        let mut ping = [0u8; 2];
        server.read_exact(&mut ping).await.unwrap();
        server.write_all(&[0xD0, 0x00]).await.unwrap();
        server.flush().await.unwrap();
        let mut pong = [0u8; 2];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(pong, [0xD0, 0x00]);
        assert_eq!(server.incoming.capacity(), 0, "receive buffer kept while idle");
        assert_eq!(server.out.capacity(), 0, "send buffer kept while idle");
        assert_eq!(server.plaintext.capacity(), 0, "plaintext buffer kept while idle");
    }

    /// close_notify (and a plain socket close) end the stream as end-of-file.
    #[tokio::test]
    async fn close_notify_is_end_of_stream() {
        let Pair {
            mut server,
            mut client,
        } = pair(&[&rustls::version::TLS13]).await;
        client.write_all(b"last").await.unwrap();
        client.shutdown().await.unwrap();
        let mut all = Vec::new();
        server.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"last");
        server.shutdown().await.unwrap();
    }

    /// A peer that stops reading pushes back on the writer instead of growing our
    /// buffer: at most one write's worth of records waits here.
    #[tokio::test]
    async fn a_peer_that_never_reads_pushes_back() {
        let Pair {
            mut server,
            client: _client,
        } = pair(&[&rustls::version::TLS13]).await;
        let chunk = vec![7u8; 64 * 1024];
        let mut accepted = 0usize;
        let stuck = tokio::time::timeout(std::time::Duration::from_secs(3), async {
            loop {
                server.write_all(&chunk).await.unwrap();
                accepted += chunk.len();
            }
        })
        .await;
        assert!(stuck.is_err(), "writes never blocked");
        assert!(
            server.out.len() <= 64 * 1024 + 4096,
            "send buffer grew to {}",
            server.out.len()
        );
        assert!(
            accepted < 64 * 1024 * 1024,
            "accepted {accepted} bytes with nobody reading"
        );
    }

    /// Garbage instead of a ClientHello fails the handshake with an error, no panic.
    #[tokio::test]
    async fn garbage_fails_the_handshake() {
        let (server_cfg, _) = configs(&[&rustls::version::TLS13]);
        let (addr, accepting) = serve_one(server_cfg).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"CONNECT not tls at all\r\n\r\n\x16\x03\x01\xff\xff")
            .await
            .unwrap();
        let Err(err) = accepting.await.unwrap() else {
            panic!("garbage completed a handshake")
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    /// A vehicle that sent one large message and went quiet holds no receive buffer:
    /// the buffer goes as soon as the socket runs dry, however the last read ended.
    #[tokio::test]
    async fn quiet_after_a_large_record_keeps_no_buffer() {
        let Pair {
            mut server,
            mut client,
        } = pair(&[&rustls::version::TLS13]).await;
        let big = vec![9u8; 10_000];
        client.write_all(&big).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0u8; big.len()];
        server.read_exact(&mut got).await.unwrap();
        // The session then waits for more: one read that finds nothing.
        let mut more = [0u8; 16];
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(200), server.read(&mut more)).await;
        assert!(waited.is_err(), "no more bytes were sent");
        assert_eq!(
            server.incoming.capacity(),
            0,
            "receive buffer kept after a large record"
        );
    }

    /// A client the server refuses (here: TLS 1.2 only against a TLS 1.3 server) is told
    /// why with an alert, not a bare close.
    #[tokio::test]
    async fn a_refused_handshake_sends_an_alert() {
        let (server_cfg, _) = configs(&[&rustls::version::TLS13]);
        let (_, client_cfg) = configs(&[&rustls::version::TLS12]);
        let (addr, accepting) = serve_one(server_cfg).await;
        let err = connect(addr, client_cfg).await.unwrap_err();
        assert!(err.to_string().contains("fatal alert"), "client saw: {err}");
        assert!(accepting.await.unwrap().is_err());
    }

    /// A handshake message split across records after the handshake (here the first
    /// two bytes of a KeyUpdate, then silence) leaves rustls holding part of our
    /// buffer; a write must still work (it once panicked: the write path gave rustls an
    /// empty buffer instead of the one it was reading from).
    #[tokio::test]
    async fn a_write_after_a_partial_post_handshake_message_works() {
        use rustls::crypto::cipher::{OutboundChunks, OutboundPlainMessage};
        use rustls::{ConnectionTrafficSecrets, ContentType, ProtocolVersion};

        let (server_cfg, client_cfg) = configs(&[&rustls::version::TLS13]);
        let mut client_cfg = (*client_cfg).clone();
        client_cfg.enable_secret_extraction = true;
        let Pair { mut server, client } = pair_with(server_cfg, Arc::new(client_cfg)).await;
        let (mut tcp, conn) = client.into_inner();
        let suite = conn.negotiated_cipher_suite().unwrap();
        let (seq, secrets) = conn.dangerous_extract_secrets().unwrap().tx;
        let (key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
            _ => panic!("unexpected suite secrets"),
        };
        let rustls::SupportedCipherSuite::Tls13(suite) = suite else {
            panic!("TLS 1.3 expected")
        };
        let mut encrypter = suite.aead_alg.encrypter(key, iv);
        let partial = [0x18u8, 0x00]; // KeyUpdate type and the first length byte
        let record = encrypter
            .encrypt(
                OutboundPlainMessage {
                    typ: ContentType::Handshake,
                    version: ProtocolVersion::TLSv1_2,
                    payload: OutboundChunks::Single(&partial),
                },
                seq,
            )
            .unwrap()
            .encode();
        tcp.write_all(&record).await.unwrap();
        let mut buf = [0u8; 16];
        let waited = tokio::time::timeout(std::time::Duration::from_millis(300), server.read(&mut buf)).await;
        assert!(waited.is_err(), "nothing readable was sent");
        server.write_all(&[0xD0, 0x00]).await.unwrap();
        server.flush().await.unwrap();
    }
}
