//! What the gateway writes to a connection: acknowledgements it owes the client (in
//! arrival order, once durable), deliveries from the session's queue (up to the
//! client's Receive Maximum and a write budget), and the client's acknowledgements of
//! those deliveries (PUBACK, PUBREC → PUBREL, PUBCOMP).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

/// A write buffer this small is dropped once written (see `flush_within`).
const SMALL_OUT: usize = 256;

use super::state::{ConnInfo, SendLimits};
use super::ReadReady;
use super::{AckKind, Close, Pending, Session, IDLE_READ, OUT_BUDGET, READ_CHUNK, WRITE_TIMEOUT};
use crate::mqtt::codec::{frame, Framing};

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + ReadReady + Unpin + Send,
{
    /// Owes the client an acknowledgement with a failure reason (or a duplicate's), in
    /// arrival order: it waits behind this session's earlier publishes.
    pub(super) fn owe(&mut self, kind: AckKind, pkid: u16, reason: u8) {
        self.owe_since(kind, pkid, reason, None);
    }

    /// As [`Session::owe`], for the acknowledgement of a PUBLISH taken at `since`
    /// (observed in `gateway_puback_latency_seconds` when it is written).
    pub(super) fn owe_since(
        &mut self,
        kind: AckKind,
        pkid: u16,
        reason: u8,
        since: Option<std::time::Instant>,
    ) {
        self.pending.push_back(Pending {
            kind,
            pkid,
            seq: self.last_seq,
            gen: self.last_gen,
            reason,
            since,
        });
    }

    /// Writes every owed acknowledgement whose record is durable in the journal and
    /// whose store writes are flushed, in order.
    pub(super) fn ack_durable(&mut self, durable: u64, flushed: u64) {
        while let Some(p) = self.pending.front() {
            if p.seq > durable || p.gen > flushed {
                break;
            }
            match p.kind {
                AckKind::Ack => self.codec.puback(&mut self.out, p.pkid, p.reason),
                AckKind::Received => self.codec.pubrec(&mut self.out, p.pkid, p.reason),
                AckKind::Complete => self.codec.pubcomp(&mut self.out, p.pkid, p.reason),
                AckKind::Release => self.codec.pubrel(&mut self.out, p.pkid, p.reason),
            }
            if p.reason == 0 && p.kind == AckKind::Ack {
                self.shared.metrics.pubacks_sent.inc();
            }
            if let (0, Some(since)) = (p.reason, p.since) {
                self.shared
                    .metrics
                    .puback_latency
                    .observe(since.elapsed().as_secs_f64());
            }
            self.pending.pop_front();
        }
    }

    /// Whether another QoS 1/2 PUBLISH from the client may be taken now (3.1.1 pauses
    /// reading when not).
    pub(super) fn inbound_room(&self, max_inflight: usize) -> bool {
        self.owed_to_client() < max_inflight
    }

    /// Acknowledgements owed for the client's publishes (PUBREL we send is ours).
    pub(super) fn owed_to_client(&self) -> usize {
        self.pending.iter().filter(|p| p.kind != AckKind::Release).count()
    }

    /// The client's QoS 1/2 publishes not yet complete, each counted once (§4.9): owed
    /// PUBACKs and PUBCOMPs plus the QoS 2 ids held until PUBREL (a PUBREC owed is for
    /// one of those).
    pub(super) fn client_inflight(&self) -> usize {
        let owed = self
            .pending
            .iter()
            .filter(|p| matches!(p.kind, AckKind::Ack | AckKind::Complete))
            .count();
        owed + self.cell.lock().inbound_qos2.len()
    }

    pub(super) fn packet_buffered(&self) -> bool {
        !matches!(
            frame(&self.read_buf, self.codec.max_in as usize),
            Ok(Framing::Incomplete)
        )
    }

    /// Encodes queued deliveries into the write buffer. Returns whether more are ready
    /// (the write budget stopped it), and the store generation a held QoS 2 PUBLISH
    /// waits for (0: none; see `OutItem::wait_gen`).
    pub(super) fn fill_outbound(&mut self) -> (bool, u64) {
        let mut lim = SendLimits {
            conn: self.info.conn,
            codec: &self.codec,
            receive_max: usize::from(self.receive_max),
            out_budget: OUT_BUDGET,
            aliases: &mut self.aliases,
            flushed: self.shared.store.flushed_gen(),
            hold: 0,
        };
        let sent = self
            .cell
            .fill(&mut self.out, &mut lim, &self.shared.store, &self.shared.metrics);
        let hold = lim.hold;
        if sent > 0 {
            ConnInfo::add(&self.info.messages_out, sent);
        }
        (self.out.len() >= OUT_BUDGET, hold)
    }

    /// PUBACK from the client for a QoS 1 delivery. With a failure reason (MQTT 5
    /// ≥ 0x80) the flow ends too, but the message was not accepted.
    pub(super) fn on_puback(&mut self, pkid: u16, reason: u8) {
        let (store, metrics) = (&self.shared.store, &self.shared.metrics);
        if reason >= 0x80 {
            self.cell.refused(pkid, 1, store, metrics);
        } else {
            self.cell.complete(pkid, 1, store, metrics);
        }
    }

    /// PUBREC from the client: answer PUBREL (0x92 when nothing waits under that id)
    /// once "released" is flushed to the store. PUBRELs wait only for the store, so they
    /// go ahead of acknowledgements waiting for the journal, in PUBREC order among
    /// themselves; each delivery is released once, so they are bounded by what is in
    /// flight.
    pub(super) fn on_pubrec(&mut self, pkid: u16, reason: u8) -> Result<(), Close> {
        let (store, metrics) = (&self.shared.store, &self.shared.metrics);
        if reason >= 0x80 {
            // The client refused the message: the flow ends here (MQTT 5 §4.3.3).
            self.cell.refused(pkid, 2, store, metrics);
            return Ok(());
        }
        let queued = |p: &Pending| p.kind == AckKind::Release;
        match self.cell.received(pkid, store, metrics) {
            // A repeated PUBREC whose PUBREL is still queued: that one answers it (the
            // queue stays bounded by what is in flight).
            Some(Ok(_)) if self.pending.iter().any(|p| queued(p) && p.pkid == pkid) => {}
            // Flushed already and nothing queued ahead of it (PUBRELs keep PUBREC order).
            Some(Ok(gen))
                if gen <= *self.shared.store.flushed().borrow() && !self.pending.iter().any(queued) =>
            {
                self.codec.pubrel(&mut self.out, pkid, 0)
            }
            Some(Ok(gen)) => {
                let at = self
                    .pending
                    .iter()
                    .position(|p| p.kind != AckKind::Release)
                    .unwrap_or(self.pending.len());
                self.pending.insert(at, Pending::release(pkid, gen));
            }
            Some(Err(e)) => return Err(Close::StoreFailed(e.to_string())),
            None => self.codec.pubrel(&mut self.out, pkid, 0x92),
        }
        Ok(())
    }

    /// PUBCOMP from the client: the QoS 2 delivery is complete.
    pub(super) fn on_pubcomp(&mut self, pkid: u16) {
        self.cell
            .complete(pkid, 2, &self.shared.store, &self.shared.metrics);
    }

    /// Reads more bytes. An idle vehicle (nothing buffered, last read small) waits with a
    /// small buffer: at a million connections the read buffer is most of the memory.
    pub(super) fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.read_buf.is_empty() && (self.last_read as usize) < IDLE_READ {
            // Idle: wait until bytes arrive holding no buffer at all, then read them.
            if self.read_buf.capacity() > 0 {
                self.read_buf = bytes::BytesMut::new();
            }
            std::task::ready!(self.stream.poll_read_ready(cx))?;
            self.read_buf.reserve(IDLE_READ);
        } else {
            self.read_buf.reserve(READ_CHUNK);
        }
        // A poll of `read_buf` is one poll of the stream into the buffer: nothing of it
        // needs to outlive this call.
        let n = std::task::ready!(std::pin::pin!(self.stream.read_buf(&mut self.read_buf)).poll(cx))?;
        ConnInfo::add(&self.info.bytes_in, n);
        self.last_read = u32::try_from(n).unwrap_or(u32::MAX);
        Poll::Ready(Ok(n))
    }

    /// Writes what is queued. A peer that does not drain its socket for its whole
    /// keep-alive window (or [`WRITE_TIMEOUT`], whichever is shorter) is as good as gone:
    /// the write times out and the connection closes, so a client that never reads
    /// cannot hold a session (and its memory) forever.
    pub(super) async fn flush(&mut self) -> std::io::Result<()> {
        self.flush_within(WRITE_TIMEOUT.min(self.keep_alive())).await
    }

    /// Writes and flushes what the stream takes without waiting, from `written` on:
    /// true once all of `out` is written and flushed.
    fn write_now(&mut self, cx: &mut Context<'_>, written: &mut usize) -> std::io::Result<bool> {
        while *written < self.out.len() {
            match Pin::new(&mut self.stream).poll_write(cx, &self.out[*written..]) {
                Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(false),
            }
        }
        match Pin::new(&mut self.stream).poll_flush(cx) {
            Poll::Ready(r) => r.map(|()| true),
            Poll::Pending => Ok(false),
        }
    }

    pub(super) async fn flush_within(&mut self, limit: Duration) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        ConnInfo::add(&self.info.bytes_out, self.out.len());
        // The socket takes most writes at once: those are written without a timer (no
        // timer armed per delivery, and no room for one in every idle connection's
        // future). What it does not take waits, boxed, under the limit.
        let mut written = 0;
        let done = std::future::poll_fn(|cx| Poll::Ready(self.write_now(cx, &mut written))).await?;
        if !done {
            // Written and flushed: a TLS stream may hold the tail of its records until then.
            let rest = async {
                self.stream.write_all(&self.out[written..]).await?;
                self.stream.flush().await
            };
            match Box::pin(timeout(limit, rest)).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "write timed out",
                    ))
                }
            }
        }
        self.out.clear();
        let kept = self.out.capacity();
        if kept > 4 * super::OUT_BUDGET || kept <= SMALL_OUT {
            // A burst grew the buffer, or it is an acknowledgement's worth (cheap to make
            // again): an idle connection keeps no write buffer.
            self.out = bytes::BytesMut::new();
        }
        Ok(())
    }
}
