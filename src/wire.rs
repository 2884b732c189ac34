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

use serde::{Deserialize, Serialize};

pub const BATCH_MAGIC: &[u8; 4] = b"LMB1";
pub const ACK_MAGIC: &[u8; 4] = b"LMA1";
/// Upper bound on the msgpack header.
pub const MAX_HEADER_LEN: usize = 4096;

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

/// Append the raw (uncompressed) payload encoding of `chunks` to `out`.
pub fn encode_chunks(chunks: &[StreamChunk], out: &mut Vec<u8>) {
    for c in chunks {
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
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    /// Compressed output before it is copied into an exactly sized frame.
    compressed: Vec<u8>,
}

thread_local! {
    static CODECS: std::cell::RefCell<Codecs> = const {
        std::cell::RefCell::new(Codecs {
            compressor: None,
            decompressor: None,
            compressed: Vec::new(),
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

fn decompress(frame: &[u8], raw_len: usize) -> std::io::Result<Vec<u8>> {
    CODECS.with(|c| {
        let mut c = c.borrow_mut();
        let d = match &mut c.decompressor {
            Some(d) => d,
            slot => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        d.decompress(frame, raw_len)
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
}

fn take<'a>(buf: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
    if buf.len() < n {
        return Err(WireError::Truncated(what));
    }
    let (a, b) = buf.split_at(n);
    *buf = b;
    Ok(a)
}

/// Index and validate a raw payload: lengths in bounds, keys UTF-8, line counts as declared.
pub fn parse_chunks(payload: &[u8]) -> Result<Vec<ChunkRef>, WireError> {
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

/// Decode and validate a whole batch frame. `max_raw` bounds the decompressed size.
pub fn decode_batch(frame: &[u8], max_raw: usize) -> Result<DecodedBatch, WireError> {
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
    let raw_len = header.raw_len as usize;
    if raw_len > max_raw {
        return Err(WireError::TooLarge {
            size: raw_len,
            max: max_raw,
        });
    }
    let payload = decompress(rest, raw_len).map_err(|e| WireError::Decompress(e.to_string()))?;
    if payload.len() != raw_len {
        return Err(WireError::LengthMismatch {
            expected: raw_len,
            actual: payload.len(),
        });
    }
    let chunks = parse_chunks(&payload)?;
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
            Err(WireError::CountMismatch { .. })
        ));
        assert_eq!(decode_batch(b"XXXX", 10).unwrap_err(), WireError::BadMagic);
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
        #[test]
        fn prop_roundtrip(streams in proptest::collection::vec(("[a-z/]{0,12}", proptest::collection::vec("[ -~]{0,40}", 0..20)), 0..8)) {
            let chunks: Vec<StreamChunk> = streams.iter().map(|(k, lines)| {
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
