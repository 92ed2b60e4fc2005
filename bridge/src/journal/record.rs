//! Record framing: how one journaled message is laid out on disk.
//!
//! ```text
//! frame  = len:u32le  crc:u32le  body[len]          crc = CRC32C(body) continued
//!                                                   from the journal's secret salt
//! body   = seq:u64le  received_at_ms:u64le  qos:u8  flags:u8
//!          (flags: 1 content type, 2 expiry, 4 retain, bits 3-5 the kind:
//!           0 an MQTT message, 1 a presence event, 2 a command outcome,
//!           3 a command handed to another gateway)
//!          client_id:str16  topic:str16
//!          [content_type:str16]        (flags & HAS_CONTENT_TYPE)
//!          [message_expiry_secs:u32le] (flags & HAS_EXPIRY)
//!          [packet_id:u16le]           (flags & HAS_PACKET_ID, 64: a persistent
//!                                       session's QoS 2 PUBLISH; builds from before
//!                                       2026-12-07 take the two bytes for a malformed
//!                                       body: docs/OPERATIONS.md, rolling back)
//!          user_property_count:u16le  (key:str16 value:str16)*
//!          payload_len:u32le  payload
//! str16  = len:u16le utf8[len]
//! ```
//!
//! The salt (`<dir>/JOURNAL_KEY`, random, never sent anywhere; see [`Salt`]) keeps a
//! vehicle from planting a frame: a payload can hold the bytes of a complete frame, and
//! after a crash tears the record carrying it, recovery searches the torn bytes for the
//! next valid frame (to tell a torn tail from damage). An unsalted CRC the vehicle can
//! compute; a salted one it would have to guess, with no feedback: about one chance in
//! 2^32 per planted frame (a payload can carry many, so a large one gets a few hundred
//! guesses per torn record). The salted CRC is the plain one XOR a value of the key and
//! the body's length: the scheme holds only while no salted CRC leaves the gateway's
//! disk (none does: Kafka records and the admin API carry none).
//!
//! A frame whose `len` is zero marks the end of the written part of a pre-sized segment
//! (fresh segments are zero-filled). A frame that runs past the end of the segment, whose
//! CRC does not match, or whose sequence is not the expected next one is a bad frame: a
//! torn tail when no valid frame follows it in the head segment, corruption otherwise
//! (see "Recovery" in the journal module doc).

use bytes::Bytes;

/// Bytes of framing around every body: length and CRC.
pub const FRAME_HEADER: usize = 8;

/// The state a frame's CRC starts from: the journal's secret (`<dir>/JOURNAL_KEY`), or
/// [`Salt::NONE`] for a journal created before salts existed (and for parked records,
/// one whole file each, never searched). CRC32C continued from a secret state is
/// CRC32C(secret bytes ++ body): without the secret, a frame's CRC cannot be computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Salt(pub u32);

impl Salt {
    pub const NONE: Salt = Salt(0);

    fn crc(self, body: &[u8]) -> u32 {
        crc32c::crc32c_append(self.0, body)
    }
}

const HAS_CONTENT_TYPE: u8 = 1;
const HAS_EXPIRY: u8 = 2;
const RETAIN: u8 = 4;
const HAS_PACKET_ID: u8 = 64;
const KIND_SHIFT: u8 = 3;
const KIND_MASK: u8 = 0b111 << KIND_SHIFT;

/// What a journal record is. Vehicles' messages go where `[[routes]]` say; the
/// gateway's own events (presence, command outcomes) go to their configured topics,
/// keyed by client id, in journal order with the vehicle's telemetry. The kind is part
/// of the record, not of its topic, so no MQTT publish can pass for a gateway event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EntryKind {
    /// A PUBLISH from a vehicle (or its Will).
    #[default]
    Message,
    /// A connected / disconnected event (JSON payload).
    Presence,
    /// The final (or `queued`) outcome of a command (JSON payload).
    Outcome,
    /// A command written back to the command topic for the gateway that now holds the
    /// vehicle (its user properties are the command's Kafka headers).
    Command,
}

impl EntryKind {
    fn bits(self) -> u8 {
        match self {
            EntryKind::Message => 0,
            EntryKind::Presence => 1 << KIND_SHIFT,
            EntryKind::Outcome => 2 << KIND_SHIFT,
            EntryKind::Command => 3 << KIND_SHIFT,
        }
    }

    fn from_flags(flags: u8) -> Option<Self> {
        match (flags & KIND_MASK) >> KIND_SHIFT {
            0 => Some(EntryKind::Message),
            1 => Some(EntryKind::Presence),
            2 => Some(EntryKind::Outcome),
            3 => Some(EntryKind::Command),
            _ => None,
        }
    }
}

/// A message as the gateway hands it to the journal (before it has a sequence number).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    /// Wall-clock receive time, so downstream can measure vehicle-to-Kafka latency and
    /// expire messages even after a replay days later.
    pub received_at_ms: u64,
    pub qos: u8,
    pub retain: bool,
    /// The MQTT client id: the default Kafka key and the unit of ordering.
    pub client_id: String,
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5 properties that downstream consumers need (forwarded as Kafka headers).
    pub content_type: Option<String>,
    pub message_expiry_secs: Option<u32>,
    pub user_properties: Vec<(String, String)>,
    pub kind: EntryKind,
    /// The MQTT packet id of a vehicle's QoS 2 PUBLISH: after a crash, the gateway finds
    /// in the journal whether a QoS 2 message whose id the session store had not yet
    /// recorded was journaled (so that the vehicle's re-send is not journaled twice).
    /// Not forwarded to Kafka.
    pub packet_id: Option<u16>,
}

/// An [`Entry`] whose parts are borrowed from wherever they live: what the journal
/// encodes. The gateway's own events (presence) are appended from their parts this way,
/// with no copy on the heap: a connect burst's per-event garbage would otherwise be
/// freed between the connections' long-lived allocations and stay in the process's
/// memory as holes (see docs/BENCHMARKS.notes.md, "Idle memory").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRef<'a> {
    pub received_at_ms: u64,
    pub qos: u8,
    pub retain: bool,
    pub client_id: &'a str,
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub content_type: Option<&'a str>,
    pub message_expiry_secs: Option<u32>,
    pub user_properties: &'a [(String, String)],
    pub kind: EntryKind,
    pub packet_id: Option<u16>,
}

impl<'a> From<&'a Entry> for EntryRef<'a> {
    fn from(e: &'a Entry) -> Self {
        EntryRef {
            received_at_ms: e.received_at_ms,
            qos: e.qos,
            retain: e.retain,
            client_id: &e.client_id,
            topic: &e.topic,
            payload: &e.payload,
            content_type: e.content_type.as_deref(),
            message_expiry_secs: e.message_expiry_secs,
            user_properties: &e.user_properties,
            kind: e.kind,
            packet_id: e.packet_id,
        }
    }
}

impl EntryRef<'_> {
    /// An owned copy (what reading the record back would give).
    pub fn to_entry(&self) -> Entry {
        Entry {
            received_at_ms: self.received_at_ms,
            qos: self.qos,
            retain: self.retain,
            client_id: self.client_id.to_owned(),
            topic: self.topic.to_owned(),
            payload: Bytes::copy_from_slice(self.payload),
            content_type: self.content_type.map(str::to_owned),
            message_expiry_secs: self.message_expiry_secs,
            user_properties: self.user_properties.to_vec(),
            kind: self.kind,
            packet_id: self.packet_id,
        }
    }
}

/// A journaled message with the sequence number the journal gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position in the journal; strictly increasing by one, never reused.
    pub seq: u64,
    pub entry: Entry,
}

/// Why a record could not be encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("{field} is {len} bytes, more than the {max} a journal record allows")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
}

fn put_str16(out: &mut Vec<u8>, field: &'static str, s: &str) -> Result<(), EncodeError> {
    let len = u16::try_from(s.len()).map_err(|_| EncodeError::FieldTooLong {
        field,
        len: s.len(),
        max: u16::MAX as usize,
    })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Size of the frame `encode` would produce, so admission can be decided before copying.
pub fn frame_len<'a>(e: impl Into<EntryRef<'a>>) -> usize {
    let e = e.into();
    let mut n = FRAME_HEADER + 8 + 8 + 1 + 1 + 2 + e.client_id.len() + 2 + e.topic.len();
    if let Some(ct) = e.content_type {
        n += 2 + ct.len();
    }
    if e.message_expiry_secs.is_some() {
        n += 4;
    }
    if e.packet_id.is_some() {
        n += 2;
    }
    n += 2;
    for (k, v) in e.user_properties {
        n += 4 + k.len() + v.len();
    }
    n + 4 + e.payload.len()
}

/// Appends the frame for `e` with sequence `seq` to `out`, unsalted (parked records).
pub fn encode<'a>(out: &mut Vec<u8>, seq: u64, e: impl Into<EntryRef<'a>>) -> Result<(), EncodeError> {
    encode_salted(out, seq, e, Salt::NONE)
}

/// Appends the frame for `e` with sequence `seq` to `out`, its CRC salted.
pub fn encode_salted<'a>(
    out: &mut Vec<u8>,
    seq: u64,
    e: impl Into<EntryRef<'a>>,
    salt: Salt,
) -> Result<(), EncodeError> {
    let e = e.into();
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER]);
    let body = out.len();
    let result = encode_body(out, seq, e);
    if let Err(err) = result {
        out.truncate(start);
        return Err(err);
    }
    let body_len = out.len() - body;
    let len = u32::try_from(body_len).map_err(|_| EncodeError::FieldTooLong {
        field: "record",
        len: body_len,
        max: u32::MAX as usize,
    });
    let len = match len {
        Ok(len) => len,
        Err(err) => {
            out.truncate(start);
            return Err(err);
        }
    };
    let crc = salt.crc(&out[body..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn encode_body(out: &mut Vec<u8>, seq: u64, e: EntryRef<'_>) -> Result<(), EncodeError> {
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&e.received_at_ms.to_le_bytes());
    out.push(e.qos);
    let mut flags = 0;
    if e.content_type.is_some() {
        flags |= HAS_CONTENT_TYPE;
    }
    if e.message_expiry_secs.is_some() {
        flags |= HAS_EXPIRY;
    }
    if e.retain {
        flags |= RETAIN;
    }
    if e.packet_id.is_some() {
        flags |= HAS_PACKET_ID;
    }
    flags |= e.kind.bits();
    out.push(flags);
    put_str16(out, "client_id", e.client_id)?;
    put_str16(out, "topic", e.topic)?;
    if let Some(ct) = e.content_type {
        put_str16(out, "content_type", ct)?;
    }
    if let Some(exp) = e.message_expiry_secs {
        out.extend_from_slice(&exp.to_le_bytes());
    }
    if let Some(id) = e.packet_id {
        out.extend_from_slice(&id.to_le_bytes());
    }
    let count = u16::try_from(e.user_properties.len()).map_err(|_| EncodeError::FieldTooLong {
        field: "user_properties",
        len: e.user_properties.len(),
        max: u16::MAX as usize,
    })?;
    out.extend_from_slice(&count.to_le_bytes());
    for (k, v) in e.user_properties {
        put_str16(out, "user property key", k)?;
        put_str16(out, "user property value", v)?;
    }
    let plen = u32::try_from(e.payload.len()).map_err(|_| EncodeError::FieldTooLong {
        field: "payload",
        len: e.payload.len(),
        max: u32::MAX as usize,
    })?;
    out.extend_from_slice(&plen.to_le_bytes());
    out.extend_from_slice(e.payload);
    Ok(())
}

/// What the scanner found at one position of a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A valid record, and the number of bytes its frame occupies.
    Record(Record, usize),
    /// Zero length: nothing was ever written here.
    End,
    /// Garbage: a write that did not complete, or corruption.
    Torn(&'static str),
}

/// Reads the unsalted frame at the start of `buf` (parked records). Never panics on
/// arbitrary bytes.
pub fn decode(buf: &[u8]) -> Frame {
    decode_salted(buf, Salt::NONE)
}

/// Reads the frame at the start of `buf`, its CRC salted with `salt`. Never panics on
/// arbitrary bytes.
pub fn decode_salted(buf: &[u8], salt: Salt) -> Frame {
    if buf.len() < FRAME_HEADER {
        return if buf.iter().all(|b| *b == 0) {
            Frame::End
        } else {
            Frame::Torn("short header")
        };
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len == 0 {
        return if crc == 0 {
            Frame::End
        } else {
            Frame::Torn("zero length with checksum")
        };
    }
    let Some(body) = buf.get(FRAME_HEADER..FRAME_HEADER + len) else {
        return Frame::Torn("frame runs past the segment end");
    };
    if salt.crc(body) != crc {
        return Frame::Torn("checksum mismatch");
    }
    match decode_body(body) {
        Some(rec) => Frame::Record(rec, FRAME_HEADER + len),
        None => Frame::Torn("malformed body"),
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }
    fn str16(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

fn decode_body(body: &[u8]) -> Option<Record> {
    let mut c = Cursor(body);
    let seq = c.u64()?;
    let received_at_ms = c.u64()?;
    let qos = c.u8()?;
    let flags = c.u8()?;
    let kind = EntryKind::from_flags(flags)?;
    let client_id = c.str16()?;
    let topic = c.str16()?;
    let content_type = if flags & HAS_CONTENT_TYPE != 0 {
        Some(c.str16()?)
    } else {
        None
    };
    let message_expiry_secs = if flags & HAS_EXPIRY != 0 {
        Some(c.u32()?)
    } else {
        None
    };
    let packet_id = if flags & HAS_PACKET_ID != 0 {
        Some(c.u16()?)
    } else {
        None
    };
    let count = c.u16()? as usize;
    let mut user_properties = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        user_properties.push((c.str16()?, c.str16()?));
    }
    let plen = c.u32()? as usize;
    let payload = Bytes::copy_from_slice(c.take(plen)?);
    if !c.0.is_empty() {
        return None;
    }
    Some(Record {
        seq,
        entry: Entry {
            received_at_ms,
            qos,
            retain: flags & RETAIN != 0,
            client_id,
            topic,
            payload,
            content_type,
            message_expiry_secs,
            user_properties,
            kind,
            packet_id,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry() -> Entry {
        Entry {
            kind: Default::default(),
            received_at_ms: 1_700_000_000_000,
            qos: 1,
            retain: false,
            client_id: "vin-1".into(),
            topic: "vehicles/vin-1/telemetry".into(),
            payload: Bytes::from_static(b"{\"speed\":42}"),
            content_type: Some("application/json".into()),
            message_expiry_secs: Some(60),
            user_properties: vec![("fw".into(), "1.2.3".into())],
            packet_id: None,
        }
    }

    /// A QoS 2 record keeps its packet id; the bytes of one without stay as they were
    /// (journals written before the field existed read the same).
    #[test]
    fn a_packet_id_round_trips_and_costs_nothing_when_absent() {
        let with = Entry {
            qos: 2,
            packet_id: Some(0xBEEF),
            ..entry()
        };
        let mut a = Vec::new();
        encode(&mut a, 9, &with).expect("encodes");
        assert_eq!(a.len(), frame_len(&with));
        match decode(&a) {
            Frame::Record(r, _) => assert_eq!(r.entry, with),
            other => panic!("expected a record, got {other:?}"),
        }
        let mut b = Vec::new();
        encode(&mut b, 9, &entry()).expect("encodes");
        assert_eq!(a.len(), b.len() + 2);
        // The body of a record without it, as the format was: flags hold no bit 64.
        assert_eq!(b[8 + 17] & HAS_PACKET_ID, 0);
    }

    #[test]
    fn round_trip_and_length_prediction() {
        let mut buf = Vec::new();
        encode(&mut buf, 7, &entry()).expect("encodes");
        assert_eq!(buf.len(), frame_len(&entry()));
        match decode(&buf) {
            Frame::Record(r, n) => {
                assert_eq!(n, buf.len());
                assert_eq!(r.seq, 7);
                assert_eq!(r.entry, entry());
            }
            other => panic!("expected a record, got {other:?}"),
        }
    }

    #[test]
    fn every_kind_round_trips_and_an_unknown_kind_is_refused() {
        for kind in [
            EntryKind::Message,
            EntryKind::Presence,
            EntryKind::Outcome,
            EntryKind::Command,
        ] {
            let e = Entry { kind, ..entry() };
            let mut buf = Vec::new();
            encode(&mut buf, 3, &e).expect("encodes");
            match decode(&buf) {
                Frame::Record(r, _) => assert_eq!(r.entry, e),
                other => panic!("expected a record, got {other:?}"),
            }
        }
        // Kind 7 does not exist: a record claiming it is not guessed at.
        let mut buf = Vec::new();
        encode(&mut buf, 3, &entry()).expect("encodes");
        let flags = FRAME_HEADER + 8 + 8 + 1;
        buf[flags] |= KIND_MASK;
        let crc = crc32c::crc32c(&buf[FRAME_HEADER..]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&buf), Frame::Torn(_)));
    }

    #[test]
    fn a_salted_frame_checks_only_with_its_salt() {
        let mut plain = Vec::new();
        encode(&mut plain, 3, &entry()).expect("encodes");
        assert_eq!(
            u32::from_le_bytes([plain[4], plain[5], plain[6], plain[7]]),
            crc32c::crc32c(&plain[FRAME_HEADER..]),
            "unsalted is the plain CRC32C, as journals before salts wrote it"
        );
        let mut salted = Vec::new();
        encode_salted(&mut salted, 3, &entry(), Salt(0x5eed_1234)).expect("encodes");
        assert!(matches!(decode_salted(&salted, Salt(0x5eed_1234)), Frame::Record(r, _) if r.seq == 3));
        assert!(matches!(decode(&salted), Frame::Torn(_)));
        assert!(matches!(
            decode_salted(&salted, Salt(0x5eed_1235)),
            Frame::Torn(_)
        ));
        assert!(matches!(decode_salted(&plain, Salt(0x5eed_1234)), Frame::Torn(_)));
    }

    #[test]
    fn flipped_bit_is_a_torn_frame() {
        let mut buf = Vec::new();
        encode(&mut buf, 1, &entry()).expect("encodes");
        let last = buf.len() - 1;
        buf[last] ^= 1;
        assert!(matches!(decode(&buf), Frame::Torn(_)));
        assert_eq!(decode(&[0u8; 32]), Frame::End);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }
    }
}
