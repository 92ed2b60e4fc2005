//! Scanning a segment's bytes: runs of valid records and the damaged spans between them.
//!
//! Shared by recovery (the head segment at open), `verify` and `repair`. After a bad frame
//! the scanner searches forward, byte by byte, for the next *plausible* frame: its length
//! fits, its sequence is above the last good one and not further than the damaged bytes
//! could have held, its CRC matches and its body parses. Finding one means the bad frame
//! was not a torn tail but damage in the middle: records after it were written (and
//! possibly acknowledged) and must not be cut.

use super::record::{decode_salted, Frame, Salt, FRAME_HEADER};

/// Smallest possible frame: header + seq + time + qos + flags + two empty strings +
/// property count + payload length.
pub(crate) const MIN_FRAME: usize = FRAME_HEADER + 8 + 8 + 1 + 1 + 2 + 2 + 2 + 4;
/// Extra sequence distance accepted beyond what the damaged bytes could have held, for
/// sequence gaps inside one damaged area (already-repaired journals, evictions).
const SEQ_SLACK: u64 = 1 << 20;

/// Contiguous valid records with consecutive sequences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Run {
    /// Byte range `[start, end)` in the segment.
    pub start: u64,
    pub end: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// Bytes that do not decode as the expected next record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Span {
    pub offset: u64,
    pub len: u64,
    pub reason: &'static str,
    /// Sequence of the last good record before the span (`first_seq - 1` if none).
    pub after_seq: u64,
    /// Sequence of the first valid record after the span; `None` when nothing valid
    /// follows (a torn tail, if this is the head segment).
    pub resumes: Option<u64>,
}

impl Span {
    /// Sequences the span held, if known: between the records around it.
    pub fn lost(&self) -> Option<(u64, u64)> {
        let first = self.after_seq + 1;
        let last = self.resumes?.checked_sub(1)?;
        (last >= first).then_some((first, last))
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct SegmentScan {
    pub runs: Vec<Run>,
    pub spans: Vec<Span>,
}

impl SegmentScan {
    pub fn last_seq(&self) -> Option<u64> {
        self.runs.last().map(|r| r.last_seq)
    }
    pub fn records(&self) -> u64 {
        self.runs.iter().map(|r| r.last_seq - r.first_seq + 1).sum()
    }
    /// The first damaged span that valid records follow: corruption, not a torn tail.
    pub fn mid_damage(&self) -> Option<&Span> {
        self.spans.iter().find(|s| s.resumes.is_some())
    }
    /// End of the valid prefix (where a torn tail is cut).
    pub fn valid_end(&self) -> u64 {
        self.runs.first().filter(|r| r.start == 0).map_or(0, |r| r.end)
    }
}

/// Scans a whole segment whose first record should carry `first_seq`.
pub(crate) fn scan(data: &[u8], first_seq: u64, salt: Salt) -> SegmentScan {
    let mut out = SegmentScan::default();
    let mut pos = 0usize;
    let mut expect = first_seq;
    let mut run: Option<(usize, u64)> = None;
    let close = |out: &mut SegmentScan, run: &mut Option<(usize, u64)>, end: usize, last: u64| {
        if let Some((start, first)) = run.take() {
            out.runs.push(Run {
                start: start as u64,
                end: end as u64,
                first_seq: first,
                last_seq: last,
            });
        }
    };
    while pos < data.len() {
        let reason = match decode_salted(&data[pos..], salt) {
            Frame::Record(rec, n) if rec.seq == expect => {
                run.get_or_insert((pos, rec.seq));
                pos += n;
                expect += 1;
                continue;
            }
            Frame::Record(..) => "unexpected sequence",
            Frame::End => {
                if data[pos..].iter().all(|b| *b == 0) {
                    break;
                }
                "zeros followed by other bytes"
            }
            Frame::Torn(why) => why,
        };
        close(&mut out, &mut run, pos, expect - 1);
        let after_seq = expect - 1;
        match find_resume(data, pos, after_seq, salt) {
            Some((q, seq)) => {
                out.spans.push(Span {
                    offset: pos as u64,
                    len: (q - pos) as u64,
                    reason,
                    after_seq,
                    resumes: Some(seq),
                });
                pos = q;
                expect = seq;
            }
            None => {
                let end = data
                    .iter()
                    .rposition(|b| *b != 0)
                    .map_or(pos, |i| i + 1)
                    .max(pos + 1);
                out.spans.push(Span {
                    offset: pos as u64,
                    len: (end.min(data.len()) - pos) as u64,
                    reason,
                    after_seq,
                    resumes: None,
                });
                return out;
            }
        }
    }
    close(&mut out, &mut run, pos, expect - 1);
    out
}

/// The first offset at or after `from` holding a plausible frame; see the module doc.
fn find_resume(data: &[u8], from: usize, after_seq: u64, salt: Salt) -> Option<(usize, u64)> {
    let mut q = from;
    while q + MIN_FRAME <= data.len() {
        let len = u32::from_le_bytes([data[q], data[q + 1], data[q + 2], data[q + 3]]) as usize;
        if len == 0 {
            // Skip a run of zeros quickly (pre-sized segments are mostly zeros): a frame's
            // length has a non-zero byte among its four.
            match data[q + 4..].iter().position(|b| *b != 0) {
                Some(i) => q = (q + 4 + i).saturating_sub(3).max(q + 1),
                None => return None,
            }
            continue;
        }
        let fits = len >= MIN_FRAME - FRAME_HEADER && q + FRAME_HEADER + len <= data.len();
        if fits {
            let mut s = [0u8; 8];
            s.copy_from_slice(&data[q + FRAME_HEADER..q + FRAME_HEADER + 8]);
            let seq = u64::from_le_bytes(s);
            let room = ((q - from) / MIN_FRAME) as u64 + 1 + SEQ_SLACK;
            if seq > after_seq && seq - after_seq <= room {
                if let Frame::Record(rec, _) = decode_salted(&data[q..], salt) {
                    if rec.seq == seq {
                        return Some((q, seq));
                    }
                }
            }
        }
        q += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::record::{encode, Entry};

    fn segment(seqs: impl IntoIterator<Item = u64>) -> (Vec<u8>, Vec<usize>) {
        let mut buf = Vec::new();
        let mut starts = Vec::new();
        for s in seqs {
            starts.push(buf.len());
            let e = Entry {
                kind: Default::default(),
                client_id: format!("v{s}"),
                topic: "t".into(),
                payload: bytes::Bytes::from(vec![7u8; 30]),
                ..Entry::default()
            };
            encode(&mut buf, s, &e).expect("encodes");
        }
        (buf, starts)
    }

    #[test]
    fn clean_segment_is_one_run() {
        let (mut data, _) = segment(5..15);
        let end = data.len() as u64;
        data.resize(4096, 0);
        let s = scan(&data, 5, Salt::NONE);
        assert_eq!(
            s.runs,
            vec![Run {
                start: 0,
                end,
                first_seq: 5,
                last_seq: 14
            }]
        );
        assert!(s.spans.is_empty());
    }

    #[test]
    fn torn_tail_has_nothing_after_it() {
        let (mut data, starts) = segment(1..11);
        let cut = starts[7] + 5;
        data.truncate(cut);
        data.resize(4096, 0);
        let s = scan(&data, 1, Salt::NONE);
        assert_eq!(s.last_seq(), Some(7));
        assert_eq!(s.spans.len(), 1);
        assert_eq!(s.spans[0].offset, starts[7] as u64);
        assert_eq!(s.spans[0].resumes, None);
        assert!(s.mid_damage().is_none());
    }

    #[test]
    fn damage_in_the_middle_resumes_at_the_next_frame() {
        let (mut data, starts) = segment(1..21);
        data[starts[9] + 12] ^= 0xff;
        data.resize(8192, 0);
        let s = scan(&data, 1, Salt::NONE);
        assert_eq!(s.runs.len(), 2);
        assert_eq!(s.runs[1].first_seq, 11);
        assert_eq!(s.runs[1].last_seq, 20);
        let d = s.mid_damage().expect("mid damage");
        assert_eq!(d.offset, starts[9] as u64);
        assert_eq!(d.lost(), Some((10, 10)));
        assert_eq!(s.records(), 19);
    }

    proptest::proptest! {
        #[test]
        fn scan_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048), first in 1u64..1000) {
            let s = scan(&bytes, first, Salt::NONE);
            for r in &s.runs {
                proptest::prop_assert!(r.end as usize <= bytes.len() && r.first_seq <= r.last_seq);
            }
        }

        #[test]
        fn one_flipped_byte_loses_exactly_its_record(count in 3u64..40, victim_pick in 0usize..1000, byte_pick in 0usize..1000, bit in 0u8..8) {
            let (mut data, starts) = segment(1..=count);
            let victim = victim_pick % (count as usize - 1); // not the last record
            let end = starts.get(victim + 1).copied().unwrap_or(data.len());
            let at = starts[victim] + byte_pick % (end - starts[victim]);
            data[at] ^= 1 << bit;
            data.resize(data.len() + 512, 0);
            let s = scan(&data, 1, Salt::NONE);
            let d = s.mid_damage().expect("damage with records after it");
            proptest::prop_assert_eq!(d.lost(), Some((victim as u64 + 1, victim as u64 + 1)));
            proptest::prop_assert_eq!(s.records(), count - 1);
            proptest::prop_assert_eq!(s.last_seq(), Some(count));
        }
    }

    #[test]
    fn a_zeroed_block_in_the_middle_is_damage() {
        let (mut data, starts) = segment(1..21);
        for b in &mut data[starts[3]..starts[6]] {
            *b = 0;
        }
        let s = scan(&data, 1, Salt::NONE);
        let d = s.mid_damage().expect("mid damage");
        assert_eq!(d.lost(), Some((4, 6)));
    }
}
