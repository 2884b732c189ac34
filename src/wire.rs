//! The collector → aggregator wire format. Sans-IO: bytes in, bytes out.
//!
//! One QUIC bidirectional stream carries one batch and its acknowledgement:
//!
//! ```text
//! request  = magic "LMB1" | u32 header_len | header (msgpack BatchHeader) | payload (zstd)
//! payload  = chunk*                      (after zstd decompression, exactly header.raw_len bytes)
//! chunk    = u16 key_len | key | u32 count | u32 data_len | data (count NDJSON lines)
//! response = magic "LMA1" | u8 status | u16 msg_len | msg
//! ```
//!
//! Every length is checked against the configured maximums before anything is allocated,
//! so a malformed or hostile frame costs an error, never a crash or an unbounded buffer.
//! Every chunk holds at least one record (an empty or zero-count chunk is refused), a payload
//! holds at most [`MAX_CHUNKS`] chunks, and the payload is decompressed in steps with each
//! chunk head checked as soon as it is out, so a small "zstd bomb" of empty chunks is refused
//! after a few KiB instead of being inflated to the full `raw_len`.

use serde::{Deserialize, Serialize};

pub const BATCH_MAGIC: &[u8; 4] = b"LMB1";
pub const ACK_MAGIC: &[u8; 4] = b"LMA1";
/// Upper bound on the msgpack header.
pub const MAX_HEADER_LEN: usize = 4096;
/// Upper bound on the chunks (streams) of one batch.
pub const MAX_CHUNKS: usize = 65_536;
/// Largest zstd window accepted (32 MiB): bounds the decoder's own buffer whatever the frame
/// asks for; the collector's levels (≤ 19) use at most 8 MiB.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 25;
/// Decompression step: the payload grows by at most this much before chunk heads are checked.
const DECODE_STEP: usize = 128 << 10;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad magic: not a logmesh batch frame")]
    BadMagic,
    #[error("frame truncated: {0}")]
    Truncated(&'static str),
    #[error("header of {0} bytes exceeds the {MAX_HEADER_LEN}-byte limit")]
    HeaderTooLarge(usize),
    #[error("malformed header: {0}")]
    BadHeader(String),
    #[error("batch of {size} bytes exceeds the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
    #[error("decompression failed: {0}")]
    Decompress(String),
    #[error("payload is {actual} bytes, header says {expected}")]
    LengthMismatch { expected: usize, actual: usize },
    #[error("chunk for stream {key:?} says {expected} records but holds {actual} lines")]
    CountMismatch {
        key: String,
        expected: u32,
        actual: u32,
    },
    #[error("stream key is not valid UTF-8")]
    BadKey,
    #[error("header says {expected} records, chunks hold {actual}")]
    RecordTotalMismatch { expected: u64, actual: u64 },
    #[error("chunk for stream {key:?} holds no records (empty chunks are not allowed)")]
    EmptyChunk { key: String },
    #[error("chunk for stream {key:?} says {count} records in only {data_len} bytes")]
    ChunkTooShort {
        key: String,
        count: u32,
        data_len: usize,
    },
    #[error("batch has more than {MAX_CHUNKS} chunks")]
    TooManyChunks,
}

/// Per-batch metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchHeader {
    /// Sender's node id.
    pub collector: String,
    /// Unique per collector (survives restarts); (collector, batch_id) is the dedupe key.
    pub batch_id: u64,
    /// Total records over all chunks.
    pub records: u64,
    /// Uncompressed payload length.
    pub raw_len: u64,
    /// Ring version the collector routed with (for status / disagreement detection).
    pub ring_version: u64,
}

/// Records of one stream: `count` NDJSON lines in `data`, each ending in `\n`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamChunk {
    pub key: String,
    pub count: u32,
    pub data: Vec<u8>,
}

impl StreamChunk {
    pub fn encoded_len(&self) -> usize {
        2 + self.key.len() + 8 + self.data.len()
    }
}

/// Append the raw (uncompressed) payload encoding of `chunks` to `out`. Chunks without
/// records are left out (receivers refuse them).
pub fn encode_chunks(chunks: &[StreamChunk], out: &mut Vec<u8>) {
    for c in chunks.iter().filter(|c| c.count > 0) {
        let key = c.key.as_bytes();
        let klen = key.len().min(u16::MAX as usize);
        out.extend_from_slice(&(klen as u16).to_be_bytes());
        out.extend_from_slice(&key[..klen]);
        out.extend_from_slice(&c.count.to_be_bytes());
        out.extend_from_slice(&(c.data.len() as u32).to_be_bytes());
        out.extend_from_slice(&c.data);
    }
}

/// Per-thread zstd contexts. Creating a context allocates and clears hundreds of KiB, so
/// doing it per batch is measurable; batches are encoded and decoded on a few worker
/// threads, so one context of each kind per thread is reused for all of them.
struct Codecs {
    compressor: Option<(i32, zstd::bulk::Compressor<'static>)>,
    decompressor: Option<zstd::stream::raw::Decoder<'static>>,
    /// Compressed output before it is copied into an exactly sized frame.
    compressed: Vec<u8>,
    /// One decompression step's output.
    step: Vec<u8>,
}

thread_local! {
    static CODECS: std::cell::RefCell<Codecs> = const {
        std::cell::RefCell::new(Codecs {
            compressor: None,
            decompressor: None,
            compressed: Vec::new(),
            step: Vec::new(),
        })
    };
}

fn compress_into(raw: &[u8], level: i32, out: &mut Vec<u8>) -> std::io::Result<()> {
    CODECS.with(|c| {
        let mut c = c.borrow_mut();
        let Codecs {
            compressor,
            compressed,
            ..
        } = &mut *c;
        let comp = match compressor {
            Some((l, comp)) if *l == level => comp,
            _ => {
                &mut compressor
                    .insert((level, zstd::bulk::Compressor::new(level)?))
                    .1
            }
        };
        compressed.clear();
        compressed.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        // writes into the spare capacity: no zero-fill of the bound
        let n = comp.compress_to_buffer(raw, compressed)?;
        // the frame is held until acknowledged: keep it exactly sized, not at the bound
        out.reserve_exact(n);
        out.extend_from_slice(&compressed[..n]);
        Ok(())
    })
}

/// Decompress `frame` into exactly `raw_len` bytes, step by step: the payload never grows
/// past `raw_len`, and `scan` checks each chunk head as soon as it is out, so a frame whose
/// first chunks are empty is refused before the rest is inflated.
fn decompress(frame: &[u8], raw_len: usize, scan: &mut ChunkScan) -> Result<Vec<u8>, WireError> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    let io = |e: std::io::Error| WireError::Decompress(e.to_string());
    // the frame must declare its size (ours always do), and declare the size the header says:
    // refused before any allocation otherwise
    match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(n)) if n == raw_len as u64 => {}
        Ok(Some(n)) => {
            return Err(WireError::LengthMismatch {
                expected: raw_len,
                actual: usize::try_from(n).unwrap_or(usize::MAX),
            })
        }
        Ok(None) => {
            return Err(WireError::Decompress(
                "zstd frame does not declare its content size".into(),
            ))
        }
        Err(_) => return Err(WireError::Decompress("not a zstd frame".into())),
    }
    CODECS.with(|c| {
        let mut c = c.borrow_mut();
        let Codecs {
            decompressor, step, ..
        } = &mut *c;
        let d = match decompressor {
            Some(d) => d,
            slot => {
                let mut d = zstd::stream::raw::Decoder::new().map_err(io)?;
                d.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(
                    ZSTD_WINDOW_LOG_MAX,
                ))
                .map_err(io)?;
                slot.insert(d)
            }
        };
        d.reinit().map_err(io)?;
        step.resize(DECODE_STEP, 0);
        // sized once (raw_len is bounded by the caller): pages are only touched as they are
        // written, so a frame refused early costs little memory, and nothing is reallocated
        let mut payload = Vec::with_capacity(raw_len);
        let mut input = InBuffer::around(frame);
        loop {
            let before = input.pos();
            let mut out = OutBuffer::around(&mut step[..]);
            let hint = d.run(&mut input, &mut out).map_err(io)?;
            let n = out.pos();
            if n > raw_len - payload.len() {
                return Err(WireError::LengthMismatch {
                    expected: raw_len,
                    actual: payload.len().saturating_add(n),
                });
            }
            payload.extend_from_slice(&step[..n]);
            scan.advance(&payload)?;
            if input.pos() == frame.len() && n < step.len() {
                if hint != 0 {
                    return Err(WireError::Decompress("zstd frame is truncated".into()));
                }
                break;
            }
            if n == 0 && input.pos() == before {
                return Err(WireError::Decompress(
                    "zstd decoder made no progress".into(),
                ));
            }
        }
        Ok(payload)
    })
}

/// Encode a complete batch frame into `out` (cleared first). `scratch` is reused between
/// calls to hold the uncompressed payload.
pub fn encode_batch(
    header: &BatchHeader,
    chunks: &[StreamChunk],
    zstd_level: i32,
    scratch: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    scratch.clear();
    encode_chunks(chunks, scratch);
    let mut h = header.clone();
    h.raw_len = scratch.len() as u64;
    let hbytes = rmp_serde::to_vec_named(&h).map_err(std::io::Error::other)?;
    out.clear();
    out.extend_from_slice(BATCH_MAGIC);
    out.extend_from_slice(&(hbytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&hbytes);
    compress_into(scratch, zstd_level, out)
}

/// [`encode_batch`] with this thread's reusable payload buffer.
pub fn encode_batch_reusing(
    header: &BatchHeader,
    chunks: &[StreamChunk],
    zstd_level: i32,
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|s| encode_batch(header, chunks, zstd_level, &mut s.borrow_mut(), out))
}

/// A decoded batch: header plus the decompressed payload, with chunk boundaries indexed.
#[derive(Debug, Clone)]
pub struct DecodedBatch {
    pub header: BatchHeader,
    /// Uncompressed payload.
    pub payload: Vec<u8>,
    /// (key range, data range) into `payload` per chunk, with its record count.
    pub chunks: Vec<ChunkRef>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRef {
    pub key: std::ops::Range<usize>,
    pub count: u32,
    pub data: std::ops::Range<usize>,
}

impl DecodedBatch {
    pub fn key(&self, c: &ChunkRef) -> &str {
        // validated as UTF-8 in parse_chunks
        std::str::from_utf8(&self.payload[c.key.clone()]).unwrap_or("")
    }
    pub fn data(&self, c: &ChunkRef) -> &[u8] {
        &self.payload[c.data.clone()]
    }

    /// Move the chunks flagged in `moved` (one flag per chunk, in order) into one chunk
    /// under `key`, placed last; the payload is re-encoded and re-indexed.
    pub fn merge_chunks_into(&mut self, moved: &[bool], key: &str) -> Result<(), WireError> {
        if !moved.iter().any(|m| *m) {
            return Ok(());
        }
        let mut out = Vec::with_capacity(self.payload.len() + 2 + key.len() + 8);
        let mut merged = StreamChunk {
            key: key.to_string(),
            count: 0,
            data: Vec::new(),
        };
        for (i, c) in self.chunks.iter().enumerate() {
            if moved.get(i).copied().unwrap_or(false) {
                merged.count = merged.count.saturating_add(c.count);
                merged.data.extend_from_slice(self.data(c));
            } else {
                // the chunk's encoding, copied as it is
                out.extend_from_slice(&self.payload[c.key.start - 2..c.data.end]);
            }
        }
        encode_chunks(std::slice::from_ref(&merged), &mut out);
        self.chunks = parse_chunks(&out)?;
        self.payload = out;
        self.header.raw_len = self.payload.len() as u64;
        Ok(())
    }
}

fn take<'a>(buf: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
    if buf.len() < n {
        return Err(WireError::Truncated(what));
    }
    let (a, b) = buf.split_at(n);
    *buf = b;
    Ok(a)
}

/// Checks chunk heads of a payload as it grows (see [`decompress`]): every chunk holds at
/// least one record, its data is long enough for its count, and there are at most
/// [`MAX_CHUNKS`] chunks.
#[derive(Debug, Default)]
struct ChunkScan {
    /// Offset of the next chunk head not yet checked.
    next: usize,
    chunks: usize,
}

impl ChunkScan {
    fn advance(&mut self, payload: &[u8]) -> Result<(), WireError> {
        while let Some(rest) = payload.get(self.next..) {
            let Some(klen) = rest
                .get(..2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
            else {
                return Ok(());
            };
            let Some(head) = rest.get(2..2 + klen + 8) else {
                return Ok(());
            };
            let key = &head[..klen];
            let count =
                u32::from_be_bytes([head[klen], head[klen + 1], head[klen + 2], head[klen + 3]]);
            let dlen = u32::from_be_bytes([
                head[klen + 4],
                head[klen + 5],
                head[klen + 6],
                head[klen + 7],
            ]) as usize;
            check_chunk_head(key, count, dlen, self.chunks)?;
            self.chunks += 1;
            self.next += 2 + klen + 8 + dlen;
        }
        Ok(())
    }
}

/// The checks every chunk head must pass before its data is looked at; `seen` is the number
/// of chunks before it.
fn check_chunk_head(key: &[u8], count: u32, dlen: usize, seen: usize) -> Result<(), WireError> {
    if seen >= MAX_CHUNKS {
        return Err(WireError::TooManyChunks);
    }
    if count == 0 {
        return Err(WireError::EmptyChunk {
            key: String::from_utf8_lossy(key).into_owned(),
        });
    }
    // each record is a line ending in '\n'
    if dlen < count as usize {
        return Err(WireError::ChunkTooShort {
            key: String::from_utf8_lossy(key).into_owned(),
            count,
            data_len: dlen,
        });
    }
    Ok(())
}

/// Index and validate a raw payload: lengths in bounds, keys UTF-8, line counts as declared.
/// For payloads this node wrote itself (WAL replay); what a peer sent goes through
/// [`parse_chunks_checked`].
pub fn parse_chunks(payload: &[u8]) -> Result<Vec<ChunkRef>, WireError> {
    index_chunks(payload, false)
}

/// [`parse_chunks`] plus the bounds on what a peer may send: no empty chunk, at most
/// [`MAX_CHUNKS`] chunks.
pub fn parse_chunks_checked(payload: &[u8]) -> Result<Vec<ChunkRef>, WireError> {
    index_chunks(payload, true)
}

fn index_chunks(payload: &[u8], checked: bool) -> Result<Vec<ChunkRef>, WireError> {
    let mut chunks = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        let base = payload.len() - rest.len();
        let klen = u16::from_be_bytes(
            take(&mut rest, 2, "chunk key length")?
                .try_into()
                .map_err(|_| WireError::Truncated("chunk key length"))?,
        ) as usize;
        let key = take(&mut rest, klen, "chunk key")?;
        std::str::from_utf8(key).map_err(|_| WireError::BadKey)?;
        let count = u32::from_be_bytes(
            take(&mut rest, 4, "chunk count")?
                .try_into()
                .map_err(|_| WireError::Truncated("chunk count"))?,
        );
        let dlen = u32::from_be_bytes(
            take(&mut rest, 4, "chunk data length")?
                .try_into()
                .map_err(|_| WireError::Truncated("chunk data length"))?,
        ) as usize;
        if checked {
            check_chunk_head(key, count, dlen, chunks.len())?;
        }
        let data = take(&mut rest, dlen, "chunk data")?;
        let lines = memchr::memchr_iter(b'\n', data).count() as u32;
        if lines != count || (!data.is_empty() && data[data.len() - 1] != b'\n') {
            return Err(WireError::CountMismatch {
                key: String::from_utf8_lossy(key).into_owned(),
                expected: count,
                actual: lines,
            });
        }
        let kstart = base + 2;
        let dstart = kstart + klen + 8;
        chunks.push(ChunkRef {
            key: kstart..kstart + klen,
            count,
            data: dstart..dstart + dlen,
        });
    }
    Ok(chunks)
}

/// The header of a batch frame and the compressed payload after it, without decompressing.
fn split_frame(frame: &[u8]) -> Result<(BatchHeader, &[u8]), WireError> {
    let mut rest = frame;
    if take(&mut rest, 4, "magic")? != BATCH_MAGIC {
        return Err(WireError::BadMagic);
    }
    let hlen = u32::from_be_bytes(
        take(&mut rest, 4, "header length")?
            .try_into()
            .map_err(|_| WireError::Truncated("header length"))?,
    ) as usize;
    if hlen > MAX_HEADER_LEN {
        return Err(WireError::HeaderTooLarge(hlen));
    }
    let hbytes = take(&mut rest, hlen, "header")?;
    let header: BatchHeader =
        rmp_serde::from_slice(hbytes).map_err(|e| WireError::BadHeader(e.to_string()))?;
    Ok((header, rest))
}

/// Read only the header of a batch frame (e.g. to size the memory decoding it will take).
pub fn peek_header(frame: &[u8]) -> Result<BatchHeader, WireError> {
    split_frame(frame).map(|(h, _)| h)
}

/// Decode and validate a whole batch frame. `max_raw` bounds the decompressed size.
pub fn decode_batch(frame: &[u8], max_raw: usize) -> Result<DecodedBatch, WireError> {
    let (header, rest) = split_frame(frame)?;
    let raw_len = usize::try_from(header.raw_len).unwrap_or(usize::MAX);
    if raw_len > max_raw {
        return Err(WireError::TooLarge {
            size: raw_len,
            max: max_raw,
        });
    }
    let payload = decompress(rest, raw_len, &mut ChunkScan::default())?;
    if payload.len() != raw_len {
        return Err(WireError::LengthMismatch {
            expected: raw_len,
            actual: payload.len(),
        });
    }
    let chunks = parse_chunks_checked(&payload)?;
    let total: u64 = chunks.iter().map(|c| c.count as u64).sum();
    if total != header.records {
        return Err(WireError::RecordTotalMismatch {
            expected: header.records,
            actual: total,
        });
    }
    Ok(DecodedBatch {
        header,
        payload,
        chunks,
    })
}

/// An aggregator's answer to one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ack {
    /// Durably committed (or already committed earlier: a retry).
    Committed,
    /// Not taken now (buffer full, leaving); try another owner or later.
    Busy(String),
    /// Malformed or not allowed; retrying the same bytes will not help.
    Rejected(String),
}

pub fn encode_ack(ack: &Ack, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(ACK_MAGIC);
    let (code, msg) = match ack {
        Ack::Committed => (0u8, ""),
        Ack::Busy(m) => (1, m.as_str()),
        Ack::Rejected(m) => (2, m.as_str()),
    };
    out.push(code);
    let m = &msg.as_bytes()[..msg.len().min(1024)];
    out.extend_from_slice(&(m.len() as u16).to_be_bytes());
    out.extend_from_slice(m);
}

pub fn decode_ack(frame: &[u8]) -> Result<Ack, WireError> {
    let mut rest = frame;
    if take(&mut rest, 4, "ack magic")? != ACK_MAGIC {
        return Err(WireError::BadMagic);
    }
    let code = take(&mut rest, 1, "ack status")?[0];
    let mlen = u16::from_be_bytes(
        take(&mut rest, 2, "ack message length")?
            .try_into()
            .map_err(|_| WireError::Truncated("ack message length"))?,
    ) as usize;
    let msg = String::from_utf8_lossy(take(&mut rest, mlen, "ack message")?).into_owned();
    match code {
        0 => Ok(Ack::Committed),
        1 => Ok(Ack::Busy(msg)),
        2 => Ok(Ack::Rejected(msg)),
        _ => Err(WireError::BadHeader(format!("unknown ack status {code}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(records: u64) -> BatchHeader {
        BatchHeader {
            collector: "c1".into(),
            batch_id: 7,
            records,
            raw_len: 0,
            ring_version: 3,
        }
    }

    fn roundtrip(chunks: &[StreamChunk]) -> DecodedBatch {
        let total = chunks.iter().map(|c| c.count as u64).sum();
        let (mut s, mut out) = (Vec::new(), Vec::new());
        encode_batch(&header(total), chunks, 1, &mut s, &mut out).unwrap();
        decode_batch(&out, 1 << 30).unwrap()
    }

    #[test]
    fn roundtrip_simple() {
        let chunks = vec![
            StreamChunk {
                key: "a".into(),
                count: 2,
                data: b"{\"x\":1}\n{\"x\":2}\n".to_vec(),
            },
            StreamChunk {
                key: "ns/app".into(),
                count: 1,
                data: b"{}\n".to_vec(),
            },
        ];
        let d = roundtrip(&chunks);
        assert_eq!(d.header.records, 3);
        assert_eq!(d.chunks.len(), 2);
        assert_eq!(d.key(&d.chunks[1]), "ns/app");
        assert_eq!(d.data(&d.chunks[0]), chunks[0].data.as_slice());
    }

    #[test]
    fn rejects_oversized_and_bad_counts() {
        let chunks = vec![StreamChunk {
            key: "a".into(),
            count: 1,
            data: vec![b'x'; 1000]
                .into_iter()
                .chain(std::iter::once(b'\n'))
                .collect(),
        }];
        let (mut s, mut out) = (Vec::new(), Vec::new());
        encode_batch(&header(1), &chunks, 1, &mut s, &mut out).unwrap();
        assert!(matches!(
            decode_batch(&out, 100),
            Err(WireError::TooLarge { .. })
        ));
        let bad = vec![StreamChunk {
            key: "a".into(),
            count: 5,
            data: b"x\n".to_vec(),
        }];
        encode_batch(&header(5), &bad, 1, &mut s, &mut out).unwrap();
        assert!(matches!(
            decode_batch(&out, 1 << 20),
            Err(WireError::ChunkTooShort { .. })
        ));
        let bad = vec![StreamChunk {
            key: "a".into(),
            count: 2,
            data: b"x\nyyy".to_vec(),
        }];
        encode_batch(&header(2), &bad, 1, &mut s, &mut out).unwrap();
        assert!(matches!(
            decode_batch(&out, 1 << 20),
            Err(WireError::CountMismatch { .. })
        ));
        assert_eq!(decode_batch(b"XXXX", 10).unwrap_err(), WireError::BadMagic);
    }

    /// A frame around an arbitrary raw payload (what a hostile client can send).
    fn raw_frame(records: u64, raw: &[u8]) -> Vec<u8> {
        let mut h = header(records);
        h.raw_len = raw.len() as u64;
        let hb = rmp_serde::to_vec_named(&h).unwrap();
        let mut out = BATCH_MAGIC.to_vec();
        out.extend_from_slice(&(hb.len() as u32).to_be_bytes());
        out.extend_from_slice(&hb);
        out.extend_from_slice(&zstd::bulk::compress(raw, 3).unwrap());
        out
    }

    fn chunk(key: &str, count: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(key.len() as u16).to_be_bytes());
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn zstd_bomb_of_empty_chunks_is_refused_early() {
        // 64 MiB of zeros: 6.7 M empty chunks, ~2 KiB compressed
        let frame = raw_frame(0, &vec![0u8; 64 << 20]);
        assert!(frame.len() < 8 << 10, "{}", frame.len());
        let mut scan = ChunkScan::default();
        let hlen = u32::from_be_bytes(frame[4..8].try_into().unwrap()) as usize;
        let err = decompress(&frame[8 + hlen..], 64 << 20, &mut scan).unwrap_err();
        assert!(matches!(err, WireError::EmptyChunk { .. }), "{err}");
        assert!(matches!(
            decode_batch(&frame, 64 << 20),
            Err(WireError::EmptyChunk { .. })
        ));
    }

    #[test]
    fn empty_zero_count_short_and_too_many_chunks_are_refused() {
        let empty = chunk("a", 0, b"");
        assert!(matches!(
            decode_batch(&raw_frame(0, &empty), 1 << 20),
            Err(WireError::EmptyChunk { .. })
        ));
        assert!(matches!(
            parse_chunks_checked(&empty),
            Err(WireError::EmptyChunk { .. })
        ));
        // what this node wrote itself (WAL replay) is read as it is
        assert_eq!(parse_chunks(&empty).unwrap().len(), 1);
        let short = chunk("a", 1000, b"x\n");
        assert!(matches!(
            decode_batch(&raw_frame(1000, &short), 1 << 20),
            Err(WireError::ChunkTooShort { .. })
        ));
        let mut many = Vec::new();
        for _ in 0..=MAX_CHUNKS {
            many.extend_from_slice(&chunk("", 1, b"\n"));
        }
        let n = MAX_CHUNKS as u64 + 1;
        assert_eq!(
            decode_batch(&raw_frame(n, &many), 1 << 30).unwrap_err(),
            WireError::TooManyChunks
        );
        assert_eq!(
            parse_chunks_checked(&many).unwrap_err(),
            WireError::TooManyChunks
        );
        // exactly MAX_CHUNKS is fine
        let ok = &many[..many.len() - 11];
        assert_eq!(
            decode_batch(&raw_frame(n - 1, ok), 1 << 30)
                .unwrap()
                .chunks
                .len(),
            MAX_CHUNKS
        );
    }

    #[test]
    fn declared_size_must_match_and_be_present() {
        let raw = chunk("a", 1, b"x\n");
        let mut frame = raw_frame(1, &raw);
        // header claims more than the zstd frame declares: refused before decompressing
        let mut h = header(1);
        h.raw_len = raw.len() as u64 + 10;
        let hb = rmp_serde::to_vec_named(&h).unwrap();
        let mut lying = BATCH_MAGIC.to_vec();
        lying.extend_from_slice(&(hb.len() as u32).to_be_bytes());
        lying.extend_from_slice(&hb);
        let body_at = frame.len() - zstd::bulk::compress(&raw, 3).unwrap().len();
        lying.extend_from_slice(&frame[body_at..]);
        assert!(matches!(
            decode_batch(&lying, 1 << 20),
            Err(WireError::LengthMismatch { .. })
        ));
        // a frame without a content size
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        std::io::Write::write_all(&mut enc, &raw).unwrap();
        let body = enc.finish().unwrap();
        frame.truncate(body_at);
        frame.extend_from_slice(&body);
        assert!(matches!(
            decode_batch(&frame, 1 << 20),
            Err(WireError::Decompress(_))
        ));
        // truncated body
        let good = raw_frame(1, &raw);
        assert!(decode_batch(&good[..good.len() - 2], 1 << 20).is_err());
        assert!(decode_batch(&good, 1 << 20).is_ok());
    }

    #[test]
    fn overflowing_chunks_merge_into_one() {
        let chunks: Vec<StreamChunk> = ["a", "b", "c", "d"]
            .iter()
            .map(|k| StreamChunk {
                key: (*k).into(),
                count: 1,
                data: format!("{{\"k\":\"{k}\"}}\n").into_bytes(),
            })
            .collect();
        let mut d = roundtrip(&chunks);
        assert_eq!(
            peek_header(&{
                let (mut s, mut out) = (Vec::new(), Vec::new());
                encode_batch(&header(4), &chunks, 1, &mut s, &mut out).unwrap();
                out
            })
            .unwrap()
            .records,
            4
        );
        d.merge_chunks_into(&[false, true, false, true], "_overflow")
            .unwrap();
        let keys: Vec<&str> = d.chunks.iter().map(|c| d.key(c)).collect();
        assert_eq!(keys, ["a", "c", "_overflow"]);
        assert_eq!(d.chunks[2].count, 2);
        assert_eq!(d.data(&d.chunks[2]), b"{\"k\":\"b\"}\n{\"k\":\"d\"}\n");
        assert_eq!(d.data(&d.chunks[1]), b"{\"k\":\"c\"}\n");
        assert_eq!(d.header.raw_len, d.payload.len() as u64);
    }

    #[test]
    fn encoder_leaves_out_empty_chunks() {
        let chunks = vec![
            StreamChunk {
                key: "empty".into(),
                count: 0,
                data: Vec::new(),
            },
            StreamChunk {
                key: "a".into(),
                count: 1,
                data: b"{}\n".to_vec(),
            },
        ];
        let d = roundtrip(&chunks);
        assert_eq!(d.chunks.len(), 1);
        assert_eq!(d.key(&d.chunks[0]), "a");
    }

    #[test]
    fn ack_roundtrip() {
        let mut out = Vec::new();
        for a in [
            Ack::Committed,
            Ack::Busy("full".into()),
            Ack::Rejected("no".into()),
        ] {
            encode_ack(&a, &mut out);
            assert_eq!(decode_ack(&out).unwrap(), a);
        }
        assert!(decode_ack(b"LMA1").is_err());
    }

    proptest! {
        /// Chunk-head checks while decompressing agree with the full parse: any payload the
        /// streaming decoder accepts also parses, and any it refuses early does not.
        #[test]
        fn prop_streaming_checks_agree_with_parse(parts in proptest::collection::vec((0u32..3, 0usize..4), 0..20)) {
            let mut raw = Vec::new();
            let mut total = 0u64;
            for (count, dlen) in &parts {
                let data: Vec<u8> = (0..*dlen).map(|i| if i + 1 == *dlen { b'\n' } else { b'x' }).collect();
                raw.extend_from_slice(&chunk("k", *count, &data));
                total += *count as u64;
            }
            let streamed = decode_batch(&raw_frame(total, &raw), 1 << 20);
            let parsed = parse_chunks_checked(&raw);
            // (the error may differ: heads are checked ahead of the data before them)
            prop_assert_eq!(streamed.is_ok(), parsed.is_ok() && parsed.as_ref().map(|c| c.iter().map(|c| c.count as u64).sum::<u64>()) == Ok(total));
        }

        #[test]
        fn prop_roundtrip(streams in proptest::collection::vec(("[a-z/]{0,12}", proptest::collection::vec("[ -~]{0,40}", 0..20)), 0..8)) {
            // chunks without records are not sent
            let chunks: Vec<StreamChunk> = streams.iter().filter(|(_, lines)| !lines.is_empty()).map(|(k, lines)| {
                let mut data = Vec::new();
                for l in lines { data.extend_from_slice(l.as_bytes()); data.push(b'\n'); }
                StreamChunk { key: k.clone(), count: lines.len() as u32, data }
            }).collect();
            let d = roundtrip(&chunks);
            prop_assert_eq!(d.chunks.len(), chunks.len());
            for (c, r) in chunks.iter().zip(&d.chunks) {
                prop_assert_eq!(d.key(r), c.key.as_str());
                prop_assert_eq!(d.data(r), c.data.as_slice());
                prop_assert_eq!(r.count, c.count);
            }
        }

        #[test]
        fn prop_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_batch(&bytes, 1 << 16);
            let _ = parse_chunks(&bytes);
            let _ = decode_ack(&bytes);
            let mut framed = BATCH_MAGIC.to_vec();
            framed.extend_from_slice(&bytes);
            let _ = decode_batch(&framed, 1 << 16);
        }
    }
}
