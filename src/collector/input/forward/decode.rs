//! Sans-IO decoder of the Fluentd Forward Protocol v1 (the bytes a client sends over TCP).
//!
//! Owns: [`ForwardDecoder`] — fed bytes in any pieces, it yields complete [`Message`]s
//! (events of the Message, Forward, PackedForward and CompressedPackedForward modes, with
//! their `chunk` option; or a handshake `PING`) or a precise [`DecodeError`]; the msgpack →
//! JSON conversion of records. Must not: do I/O, read clocks (`now` is an argument), panic
//! on any input, or let one frame use unbounded memory.
//!
//! How: an iterative scanner finds where the next top-level msgpack value ends without
//! building anything (incomplete input remembers how many bytes it needs at least, so a big
//! frame arriving in small reads is not rescanned on every read; a frame that cannot fit in
//! `max_frame_bytes` is an error at once). A complete frame is then decoded: small parts
//! (tag, option map, PING) with `rmpv`, records transcoded straight from msgpack to JSON
//! into a reused buffer — no value tree per record, so a hostile frame cannot amplify
//! memory. A frame is all or nothing: if any entry is malformed, none of its events is
//! returned.
//!
//! Conversion: strings and binaries become JSON strings (invalid UTF-8 replaced by U+FFFD),
//! non-string map keys their JSON text (`1` → `"1"`), ext values base64 of their data,
//! NaN/∞ `null`. Event time is integer seconds, a float, or EventTime (ext 0: u32 seconds,
//! u32 nanoseconds, big-endian); time 0 means "now" (as fluentd does). Nil records are
//! skipped (as fluentd does); any other non-map record is an error.

use std::borrow::Cow;
use std::io::Read as _;

use base64::Engine as _;
use rmpv::ValueRef;

use crate::collector::parse::write_json_str;

/// Default largest frame (one top-level msgpack value): 64 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 << 20;
/// Default largest decompressed entries of one CompressedPackedForward frame: 256 MiB.
pub const DEFAULT_MAX_DECOMPRESSED_BYTES: usize = 256 << 20;
/// Nesting allowed inside a record.
const MAX_DEPTH: usize = 64;
/// Largest option map (the last element of a frame).
const MAX_OPTION_BYTES: usize = 64 * 1024;
/// Largest tag.
const MAX_TAG_BYTES: usize = 4096;
/// Largest JSON text of a non-string map key (it becomes the key's string).
const MAX_KEY_JSON_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid msgpack at byte {offset} of the frame: {what}")]
    Msgpack { offset: usize, what: &'static str },
    #[error("frame needs at least {need} bytes, more than the limit of {max}")]
    TooLarge { need: u64, max: usize },
    #[error("not a forward protocol message: {0}")]
    Protocol(Cow<'static, str>),
    #[error("gzip-compressed entries: {0}")]
    Gzip(String),
    #[error("decompressed entries exceed the limit of {0} bytes")]
    TooLargeDecompressed(usize),
    #[error("the stream failed earlier: {0}")]
    Failed(Box<DecodeError>),
}

fn proto(s: impl Into<Cow<'static, str>>) -> DecodeError {
    DecodeError::Protocol(s.into())
}

/// Which carrier mode a frame used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Message,
    Forward,
    PackedForward,
    CompressedPackedForward,
}

/// A decoded frame; borrows the decoder until the next call.
#[derive(Debug)]
pub enum Message<'d> {
    Events(Events<'d>),
    Ping(Ping),
}

/// The events of one frame, each a JSON object with its time in Unix nanoseconds.
#[derive(Debug)]
pub struct Events<'d> {
    pub tag: &'d str,
    pub mode: Mode,
    /// The `chunk` option: the client wants `{"ack": chunk}` once these are safe.
    pub chunk: Option<&'d str>,
    json: &'d [u8],
    spans: &'d [(i64, usize, usize)],
}

impl<'d> Events<'d> {
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// `(time_unix_nanos, json_object)` per event, in order.
    pub fn iter(&self) -> impl Iterator<Item = (i64, &'d [u8])> + 'd {
        let json = self.json;
        self.spans
            .iter()
            .map(move |&(t, s, e)| (t, json.get(s..e).unwrap_or_default()))
    }
}

/// `["PING", hostname, shared_key_salt, sha512_hex(salt+hostname+nonce+key), user, pass]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ping {
    pub hostname: String,
    pub salt: Vec<u8>,
    pub digest: String,
    pub username: String,
    pub password_digest: String,
}

#[derive(Debug, Default)]
struct Scratch {
    tag: String,
    chunk: String,
    has_chunk: bool,
    json: Vec<u8>,
    spans: Vec<(i64, usize, usize)>,
    inflated: Vec<u8>,
    key: Vec<u8>,
}

/// Incremental decoder of one connection's byte stream.
#[derive(Debug)]
pub struct ForwardDecoder {
    buf: Vec<u8>,
    pos: usize,
    /// Bytes (from `pos`) needed before scanning again is worth it.
    need: u64,
    max_frame: usize,
    max_decompressed: usize,
    expect_ping: bool,
    failed: Option<DecodeError>,
    s: Scratch,
}

impl ForwardDecoder {
    pub fn new(max_frame_bytes: usize, max_decompressed_bytes: usize) -> Self {
        ForwardDecoder {
            buf: Vec::new(),
            pos: 0,
            need: 1,
            max_frame: max_frame_bytes.max(16),
            max_decompressed: max_decompressed_bytes,
            expect_ping: false,
            failed: None,
            s: Scratch::default(),
        }
    }

    /// While set, every frame must be a `PING` (the shared-key handshake is pending).
    pub fn set_expect_ping(&mut self, on: bool) {
        self.expect_ping = on;
    }

    /// Bytes received but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Append received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` if more bytes are needed. After an error the
    /// stream is unusable: every later call fails too.
    pub fn next(&mut self, now_unix_nanos: i64) -> Result<Option<Message<'_>>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(DecodeError::Failed(Box::new(e.clone())));
        }
        // big scratch from a big frame is not kept forever
        if self.s.json.capacity() > 8 << 20 {
            self.s.json = Vec::new();
        }
        if self.s.inflated.capacity() > 8 << 20 {
            self.s.inflated = Vec::new();
        }
        let avail = &self.buf[self.pos..];
        if avail.is_empty() || (avail.len() as u64) < self.need {
            return Ok(None);
        }
        let len = match scan_value(avail, self.max_frame) {
            Scan::Done(len) => len,
            Scan::Incomplete(need) => {
                self.need = need;
                return Ok(None);
            }
            Scan::Err(e) => return Err(self.fail(e)),
        };
        self.need = 1;
        let start = self.pos;
        self.pos += len;
        let frame = &self.buf[start..start + len];
        let decoded = decode_frame(
            frame,
            &mut self.s,
            self.expect_ping,
            self.max_frame,
            self.max_decompressed,
            now_unix_nanos,
        );
        match decoded {
            Ok(Decoded::Ping(p)) => Ok(Some(Message::Ping(p))),
            Ok(Decoded::Events(mode)) => Ok(Some(Message::Events(Events {
                tag: &self.s.tag,
                mode,
                chunk: self.s.has_chunk.then_some(self.s.chunk.as_str()),
                json: &self.s.json,
                spans: &self.s.spans,
            }))),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn fail(&mut self, e: DecodeError) -> DecodeError {
        self.failed = Some(e.clone());
        e
    }
}

// ---------------------------------------------------------------- msgpack heads

#[derive(Debug, Clone, Copy)]
enum Head {
    Nil,
    Bool(bool),
    Uint(u64),
    Int(i64),
    F32(f32),
    F64(f64),
    Str(usize),
    Bin(usize),
    Ext(i8, usize),
    Array(usize),
    Map(usize),
    Reserved,
}

/// Read a marker and its fixed-size header (for numbers: the whole value) at `*pos`.
/// `Err(n)`: the header needs `n` bytes of `b` in total.
fn head(b: &[u8], pos: &mut usize) -> Result<Head, usize> {
    let p = *pos;
    let m = *b.get(p).ok_or(p + 1)?;
    let take = |n: usize| -> Result<&[u8], usize> { b.get(p + 1..p + 1 + n).ok_or(p + 1 + n) };
    let be = |s: &[u8]| s.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x));
    let (h, hdr) = match m {
        0x00..=0x7f => (Head::Uint(u64::from(m)), 0),
        0x80..=0x8f => (Head::Map(usize::from(m & 0x0f)), 0),
        0x90..=0x9f => (Head::Array(usize::from(m & 0x0f)), 0),
        0xa0..=0xbf => (Head::Str(usize::from(m & 0x1f)), 0),
        0xc0 => (Head::Nil, 0),
        0xc1 => (Head::Reserved, 0),
        0xc2 => (Head::Bool(false), 0),
        0xc3 => (Head::Bool(true), 0),
        0xc4..=0xc6 => {
            let n = 1 << (m - 0xc4);
            (Head::Bin(be(take(n)?) as usize), n)
        }
        0xc7..=0xc9 => {
            let n = 1 << (m - 0xc7);
            let h = take(n + 1)?;
            (Head::Ext(h[n] as i8, be(&h[..n]) as usize), n + 1)
        }
        0xca => {
            let h = take(4)?;
            (Head::F32(f32::from_bits(be(h) as u32)), 4)
        }
        0xcb => (Head::F64(f64::from_bits(be(take(8)?))), 8),
        0xcc..=0xcf => {
            let n = 1 << (m - 0xcc);
            (Head::Uint(be(take(n)?)), n)
        }
        0xd0..=0xd3 => {
            let n = 1usize << (m - 0xd0);
            let v = be(take(n)?);
            let shift = 64 - 8 * n as u32;
            (Head::Int(((v << shift) as i64) >> shift), n)
        }
        0xd4..=0xd8 => {
            let h = take(1)?;
            (Head::Ext(h[0] as i8, 1 << (m - 0xd4)), 1)
        }
        0xd9..=0xdb => {
            let n = 1 << (m - 0xd9);
            (Head::Str(be(take(n)?) as usize), n)
        }
        0xdc | 0xdd => {
            let n = if m == 0xdc { 2 } else { 4 };
            (Head::Array(be(take(n)?) as usize), n)
        }
        0xde | 0xdf => {
            let n = if m == 0xde { 2 } else { 4 };
            (Head::Map(be(take(n)?) as usize), n)
        }
        0xe0..=0xff => (Head::Int(i64::from(m as i8)), 0),
    };
    *pos = p + 1 + hdr;
    Ok(h)
}

enum Scan {
    Done(usize),
    /// At least this many bytes are needed in total.
    Incomplete(u64),
    Err(DecodeError),
}

/// Where the msgpack value at the start of `b` ends, without recursion or allocation.
fn scan_value(b: &[u8], max: usize) -> Scan {
    let mut pos = 0usize;
    let mut remaining: u64 = 1; // values still to read; each needs at least one byte
    let too_large = |need: u64| Scan::Err(DecodeError::TooLarge { need, max });
    while remaining > 0 {
        remaining -= 1;
        let at = pos;
        let h = match head(b, &mut pos) {
            Ok(h) => h,
            Err(n) => {
                let need = n as u64 + remaining;
                return if need > max as u64 {
                    too_large(need)
                } else {
                    Scan::Incomplete(need)
                };
            }
        };
        match h {
            Head::Str(n) | Head::Bin(n) | Head::Ext(_, n) => {
                let end = pos as u64 + n as u64;
                if end + remaining > max as u64 {
                    return too_large(end + remaining);
                }
                if end > b.len() as u64 {
                    return Scan::Incomplete(end + remaining);
                }
                pos = end as usize;
            }
            Head::Array(n) => remaining += n as u64,
            Head::Map(n) => remaining += 2 * n as u64,
            Head::Reserved => {
                return Scan::Err(DecodeError::Msgpack {
                    offset: at,
                    what: "reserved marker 0xc1",
                })
            }
            _ => {}
        }
        if pos as u64 + remaining > max as u64 {
            return too_large(pos as u64 + remaining);
        }
    }
    Scan::Done(pos)
}

/// A reader over a complete, scanned frame.
struct Rd<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Rd<'a> {
    fn head(&mut self) -> Result<Head, DecodeError> {
        let at = self.pos;
        match head(self.b, &mut self.pos) {
            Ok(Head::Reserved) => Err(DecodeError::Msgpack {
                offset: at,
                what: "reserved marker 0xc1",
            }),
            Ok(h) => Ok(h),
            Err(_) => Err(self.short()),
        }
    }

    fn peek(&self) -> Result<Head, DecodeError> {
        let mut p = self.pos;
        head(self.b, &mut p).map_err(|_| self.short())
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let s = self
            .b
            .get(self.pos..self.pos.saturating_add(n))
            .ok_or_else(|| self.short())?;
        self.pos += n;
        Ok(s)
    }

    fn short(&self) -> DecodeError {
        DecodeError::Msgpack {
            offset: self.pos,
            what: "value cut short",
        }
    }

    /// The next whole value as raw bytes (for rmpv).
    fn raw_value(&mut self) -> Result<&'a [u8], DecodeError> {
        let rest = self.b.get(self.pos..).unwrap_or_default();
        match scan_value(rest, usize::MAX) {
            Scan::Done(n) => self.bytes(n),
            Scan::Incomplete(_) => Err(self.short()),
            Scan::Err(e) => Err(e),
        }
    }

    fn value_ref(&mut self) -> Result<ValueRef<'a>, DecodeError> {
        let at = self.pos;
        let mut raw = self.raw_value()?;
        rmpv::decode::read_value_ref_with_max_depth(&mut raw, MAX_DEPTH).map_err(|_| {
            DecodeError::Msgpack {
                offset: at,
                what: "undecodable value",
            }
        })
    }

    fn is_empty(&self) -> bool {
        self.pos >= self.b.len()
    }
}

// ---------------------------------------------------------------- frames

enum Decoded {
    Events(Mode),
    Ping(Ping),
}

fn decode_frame(
    frame: &[u8],
    s: &mut Scratch,
    expect_ping: bool,
    max_frame: usize,
    max_decompressed: usize,
    now: i64,
) -> Result<Decoded, DecodeError> {
    let mut rd = Rd { b: frame, pos: 0 };
    let n = match rd.head()? {
        Head::Array(n) => n,
        _ => return Err(proto("a frame must be a msgpack array")),
    };
    if expect_ping {
        return decode_ping(&mut rd, n).map(Decoded::Ping);
    }
    if !(2..=4).contains(&n) {
        return Err(proto(format!(
            "a frame is an array of 2 to 4 items, got {n}"
        )));
    }
    let tag = match rd.value_ref()? {
        ValueRef::String(t) if t.as_bytes().len() <= MAX_TAG_BYTES => t,
        ValueRef::String(_) => return Err(proto("tag longer than 4096 bytes")),
        _ => return Err(proto("the tag (first item) must be a string")),
    };
    s.tag.clear();
    s.tag.push_str(&String::from_utf8_lossy(tag.as_bytes()));
    s.json.clear();
    s.spans.clear();
    s.has_chunk = false;

    let mode = match rd.peek()? {
        Head::Array(_) => {
            if n > 3 {
                return Err(proto("Forward mode is [tag, entries, option?]"));
            }
            let entries = match rd.head()? {
                Head::Array(k) => k,
                _ => return Err(proto("entries must be an array")),
            };
            for _ in 0..entries {
                entry(&mut rd, s, now)?;
            }
            Mode::Forward
        }
        Head::Str(_) | Head::Bin(_) => {
            if n > 3 {
                return Err(proto("PackedForward mode is [tag, entries, option?]"));
            }
            let packed = match rd.head()? {
                Head::Str(k) | Head::Bin(k) => rd.bytes(k)?,
                _ => return Err(proto("packed entries must be str or bin")),
            };
            let gzip = option(&mut rd, s)?;
            if gzip {
                let mut inflated = std::mem::take(&mut s.inflated);
                let r = gunzip(packed, &mut inflated, max_decompressed)
                    .and_then(|()| packed_entries(&inflated, s, max_frame, now));
                s.inflated = inflated;
                r?;
                return Ok(Decoded::Events(Mode::CompressedPackedForward));
            }
            packed_entries(packed, s, max_frame, now)?;
            return Ok(Decoded::Events(Mode::PackedForward));
        }
        _ => {
            if n < 3 {
                return Err(proto("Message mode is [tag, time, record, option?]"));
            }
            let t = time(&mut rd, now)?;
            record(&mut rd, s, t)?;
            Mode::Message
        }
    };
    option(&mut rd, s)?;
    Ok(Decoded::Events(mode))
}

/// The option map if present (must be the last item): notes `chunk`; true if the entries
/// are gzip-compressed.
fn option(rd: &mut Rd<'_>, s: &mut Scratch) -> Result<bool, DecodeError> {
    if rd.is_empty() {
        return Ok(false);
    }
    if rd.b.len() - rd.pos > MAX_OPTION_BYTES {
        return Err(proto("option map larger than 64 KiB"));
    }
    let map = match rd.value_ref()? {
        ValueRef::Map(m) => m,
        ValueRef::Nil => return Ok(false),
        _ => return Err(proto("option must be a map")),
    };
    let mut gzip = false;
    for (k, v) in map {
        let ValueRef::String(k) = k else { continue };
        match k.as_bytes() {
            b"chunk" => {
                let c = match &v {
                    ValueRef::String(c) => c.as_bytes(),
                    ValueRef::Binary(c) => c,
                    _ => return Err(proto("option chunk must be a string")),
                };
                s.chunk.clear();
                s.chunk.push_str(&String::from_utf8_lossy(c));
                s.has_chunk = true;
            }
            b"compressed" => match &v {
                ValueRef::String(c) if c.as_bytes() == b"gzip" => gzip = true,
                ValueRef::String(c) if c.as_bytes() == b"text" => gzip = false,
                _ => return Err(proto("option compressed must be \"gzip\" or \"text\"")),
            },
            _ => {}
        }
    }
    Ok(gzip)
}

fn gunzip(data: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<(), DecodeError> {
    out.clear();
    let mut d = flate2::read::MultiGzDecoder::new(data).take(limit as u64 + 1);
    d.read_to_end(out)
        .map_err(|e| DecodeError::Gzip(e.to_string()))?;
    if out.len() > limit {
        return Err(DecodeError::TooLargeDecompressed(limit));
    }
    Ok(())
}

fn packed_entries(
    data: &[u8],
    s: &mut Scratch,
    max_frame: usize,
    now: i64,
) -> Result<(), DecodeError> {
    let mut rd = Rd { b: data, pos: 0 };
    while !rd.is_empty() {
        match scan_value(&data[rd.pos..], max_frame.max(data.len())) {
            Scan::Done(_) => {}
            Scan::Incomplete(_) => {
                return Err(proto(format!(
                    "packed entries end in a cut entry at byte {}",
                    rd.pos
                )))
            }
            Scan::Err(e) => return Err(e),
        }
        entry(&mut rd, s, now)?;
    }
    Ok(())
}

/// One `[time, record]` entry.
fn entry(rd: &mut Rd<'_>, s: &mut Scratch, now: i64) -> Result<(), DecodeError> {
    match rd.head()? {
        Head::Array(2) => {}
        _ => return Err(proto("an entry must be [time, record]")),
    }
    let t = time(rd, now)?;
    record(rd, s, t)
}

fn time(rd: &mut Rd<'_>, now: i64) -> Result<i64, DecodeError> {
    const NS: i64 = 1_000_000_000;
    let t = match rd.head()? {
        Head::Uint(u) => i64::try_from(u).unwrap_or(i64::MAX).saturating_mul(NS),
        Head::Int(i) => i.saturating_mul(NS),
        Head::F32(f) => (f64::from(f) * 1e9) as i64,
        Head::F64(f) => (f * 1e9) as i64,
        Head::Ext(0, 8) => {
            let b = rd.bytes(8)?;
            let sec = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            let nsec = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
            i64::from(sec) * NS + i64::from(nsec)
        }
        _ => {
            return Err(proto(
                "event time must be an integer, a float or EventTime (ext 0, 8 bytes)",
            ))
        }
    };
    Ok(if t == 0 { now } else { t })
}

fn record(rd: &mut Rd<'_>, s: &mut Scratch, t: i64) -> Result<(), DecodeError> {
    match rd.peek()? {
        Head::Map(_) => {}
        Head::Nil => {
            rd.head()?;
            return Ok(());
        }
        _ => return Err(proto("a record must be a map")),
    }
    let start = s.json.len();
    to_json(rd, &mut s.json, &mut s.key, 0)?;
    s.spans.push((t, start, s.json.len()));
    Ok(())
}

fn lossy(b: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(b)
}

/// Transcode the value at `rd` to JSON.
fn to_json(
    rd: &mut Rd<'_>,
    out: &mut Vec<u8>,
    key: &mut Vec<u8>,
    depth: usize,
) -> Result<(), DecodeError> {
    if depth > MAX_DEPTH {
        return Err(DecodeError::Msgpack {
            offset: rd.pos,
            what: "nested deeper than 64 levels",
        });
    }
    match rd.head()? {
        Head::Nil => out.extend_from_slice(b"null"),
        Head::Bool(true) => out.extend_from_slice(b"true"),
        Head::Bool(false) => out.extend_from_slice(b"false"),
        Head::Uint(u) => write_display(out, u),
        Head::Int(i) => write_display(out, i),
        Head::F32(f) => write_f64(out, f64::from(f)),
        Head::F64(f) => write_f64(out, f),
        Head::Str(n) | Head::Bin(n) => write_json_str(out, &lossy(rd.bytes(n)?)),
        Head::Ext(_, n) => {
            let b = rd.bytes(n)?;
            out.push(b'"');
            let mut enc = String::new();
            base64::engine::general_purpose::STANDARD.encode_string(b, &mut enc);
            out.extend_from_slice(enc.as_bytes());
            out.push(b'"');
        }
        Head::Array(n) => {
            out.push(b'[');
            for i in 0..n {
                if i > 0 {
                    out.push(b',');
                }
                to_json(rd, out, key, depth + 1)?;
            }
            out.push(b']');
        }
        Head::Map(n) => {
            out.push(b'{');
            for i in 0..n {
                if i > 0 {
                    out.push(b',');
                }
                match rd.peek()? {
                    Head::Str(k) | Head::Bin(k) => {
                        rd.head()?;
                        write_json_str(out, &lossy(rd.bytes(k)?));
                    }
                    _ => {
                        // a non-string key: its JSON text as the key
                        let mut k = std::mem::take(key);
                        k.clear();
                        let mut r = to_json(rd, &mut k, &mut Vec::new(), depth + 1);
                        // Each level escapes the key text of the level inside it, which
                        // doubles its size: unbounded, 300 bytes of nested keys take
                        // 2^depth time and memory.
                        if r.is_ok() && k.len() > MAX_KEY_JSON_BYTES {
                            r = Err(DecodeError::Msgpack {
                                offset: rd.pos,
                                what: "non-string map key longer than 4096 bytes as JSON",
                            });
                        }
                        if r.is_ok() {
                            write_json_str(out, &lossy(&k));
                        }
                        *key = k;
                        r?;
                    }
                }
                out.push(b':');
                to_json(rd, out, key, depth + 1)?;
            }
            out.push(b'}');
        }
        Head::Reserved => {
            return Err(DecodeError::Msgpack {
                offset: rd.pos,
                what: "reserved marker 0xc1",
            })
        }
    }
    Ok(())
}

fn write_display(out: &mut Vec<u8>, v: impl std::fmt::Display) {
    use std::io::Write as _;
    let _ = write!(out, "{v}");
}

fn write_f64(out: &mut Vec<u8>, f: f64) {
    if !f.is_finite() || serde_json::to_writer(&mut *out, &f).is_err() {
        out.extend_from_slice(b"null");
    }
}

fn decode_ping(rd: &mut Rd<'_>, n: usize) -> Result<Ping, DecodeError> {
    if n != 6 {
        return Err(proto(format!(
            "expected the handshake PING (an array of 6 items), got an array of {n}"
        )));
    }
    let mut field = |what: &'static str| -> Result<Vec<u8>, DecodeError> {
        match rd.value_ref()? {
            ValueRef::String(s) => Ok(s.as_bytes().to_vec()),
            ValueRef::Binary(b) => Ok(b.to_vec()),
            ValueRef::Nil => Ok(Vec::new()),
            _ => Err(proto(format!("PING {what} must be a string"))),
        }
    };
    if field("type")? != b"PING" {
        return Err(proto(
            "expected the handshake PING first (a shared key is configured)",
        ));
    }
    let hostname = field("hostname")?;
    let salt = field("shared_key_salt")?;
    let digest = field("shared_key_hexdigest")?;
    let username = field("username")?;
    let password_digest = field("password")?;
    let s = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    Ok(Ping {
        hostname: s(hostname),
        salt,
        digest: s(digest),
        username: s(username),
        password_digest: s(password_digest),
    })
}

#[cfg(test)]
pub(super) fn scan_for_tests(b: &[u8], max: usize) -> Result<Option<usize>, DecodeError> {
    match scan_value(b, max) {
        Scan::Done(n) => Ok(Some(n)),
        Scan::Incomplete(_) => Ok(None),
        Scan::Err(e) => Err(e),
    }
}
