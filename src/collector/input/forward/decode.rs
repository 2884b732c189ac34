//! Sans-IO decoder of the Fluentd Forward Protocol v1 (the bytes a client sends over TCP).
//!
//! Owns: [`ForwardDecoder`] — fed bytes in any pieces, it yields complete [`Message`]s
//! (events of the Message, Forward, PackedForward and CompressedPackedForward modes, with
//! their `chunk` option; or a handshake `PING`) or a precise [`DecodeError`]; the msgpack →
//! JSON conversion of records. Must not: do I/O, read clocks (`now` is an argument), panic
//! on any input, or let one frame use memory beyond its own bytes plus fixed bounds.
//!
//! How: an iterative scanner finds where the next top-level msgpack value ends without
//! building anything (incomplete input remembers how many bytes it needs at least, so a big
//! frame arriving in small reads is not rescanned on every read; a frame that cannot fit in
//! the frame limit is an error at once — 64 KiB while a shared-key handshake is pending).
//! A complete frame is then read head by head: the tag, option map and PING fields by their
//! expected msgpack heads only (never a generic value tree), with element-count and byte
//! caps; the entries are walked once to check their shape and nesting (nothing allocated),
//! then [`Events::next_event`] transcodes one record at a time straight from msgpack into a
//! reused JSON buffer, stopping at `max_record_bytes` + 1 (the record builder then cuts and
//! flags it). So a frame costs its own bytes (or its decompressed bytes, capped) plus one
//! record, whatever its shape. A frame is all or nothing: if any entry is malformed, none of
//! its events is returned.
//!
//! Entries are `[time, record]` or, as Fluent Bit ≥ 2.1 sends by default, `[[time,
//! metadata], record]`: a non-empty metadata map is kept as the record's `_meta` field, any
//! other metadata is ignored.
//!
//! Conversion: strings and binaries become JSON strings (invalid UTF-8 replaced by U+FFFD),
//! non-string map keys their JSON text (`1` → `"1"`), ext values base64 of their data,
//! NaN/∞ `null`. Event time is integer seconds, a float, or EventTime (ext 0: u32 seconds,
//! u32 nanoseconds, big-endian); time 0 means "now" (as fluentd does). Nil records are
//! skipped (as fluentd does); any other non-map record is an error.

use std::borrow::Cow;
use std::io::Read as _;

use base64::Engine as _;

use crate::collector::parse::write_json_str;
use crate::collector::record::DEFAULT_MAX_RECORD_BYTES;

/// Default largest frame (one top-level msgpack value): 64 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 << 20;
/// Default largest decompressed entries of one CompressedPackedForward frame: 64 MiB.
pub const DEFAULT_MAX_DECOMPRESSED_BYTES: usize = 64 << 20;
/// Largest frame before the shared-key handshake is done (a PING is a few hundred bytes).
pub const MAX_PREAUTH_FRAME_BYTES: usize = 64 * 1024;
/// Nesting allowed inside a record.
const MAX_DEPTH: usize = 64;
/// Largest option map (the last element of a frame), in bytes and in entries.
const MAX_OPTION_BYTES: usize = 64 * 1024;
const MAX_OPTION_ENTRIES: usize = 64;
/// Largest tag.
const MAX_TAG_BYTES: usize = 4096;
/// Largest PING field and `chunk` id.
const MAX_FIELD_BYTES: usize = 1024;
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

impl DecodeError {
    /// A size limit was hit (rather than a malformed frame).
    pub fn is_too_large(&self) -> bool {
        match self {
            DecodeError::TooLarge { .. } | DecodeError::TooLargeDecompressed(_) => true,
            DecodeError::Failed(e) => e.is_too_large(),
            _ => false,
        }
    }
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

/// The events of one frame (already checked), each transcoded on demand to a JSON object
/// with its time in Unix nanoseconds.
#[derive(Debug)]
pub struct Events<'d> {
    pub tag: &'d str,
    pub mode: Mode,
    /// The `chunk` option: the client wants `{"ack": chunk}` once these are safe.
    pub chunk: Option<&'d str>,
    /// The entries (Message mode: the time and the record, without an entry array).
    rd: Rd<'d>,
    in_array: bool,
    now: i64,
    max_record: usize,
    json: &'d mut Vec<u8>,
    key: &'d mut Vec<u8>,
}

impl Events<'_> {
    /// The next event as `(time_unix_nanos, json_object)`, `None` after the last. A record
    /// longer than `max_record_bytes` is returned cut just past that length.
    pub fn next_event(&mut self) -> Result<Option<(i64, &[u8])>, DecodeError> {
        while !self.rd.is_empty() {
            let Some(e) = read_entry(&mut self.rd, self.now, self.in_array)? else {
                continue; // nil record
            };
            self.json.clear();
            transcode(&e, self.json, self.key, self.max_record)?;
            return Ok(Some((e.time, &self.json[..])));
        }
        Ok(None)
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
    max_record: usize,
    expect_ping: bool,
    failed: Option<DecodeError>,
    s: Scratch,
}

/// Where a checked frame's entries are.
enum Decoded {
    Events {
        mode: Mode,
        /// In the frame, or (CompressedPackedForward) in `Scratch::inflated`.
        range: (usize, usize),
        inflated: bool,
        in_array: bool,
    },
    Ping(Ping),
}

impl ForwardDecoder {
    pub fn new(max_frame_bytes: usize, max_decompressed_bytes: usize) -> Self {
        ForwardDecoder {
            buf: Vec::new(),
            pos: 0,
            need: 1,
            max_frame: max_frame_bytes.max(16),
            max_decompressed: max_decompressed_bytes,
            max_record: DEFAULT_MAX_RECORD_BYTES,
            expect_ping: false,
            failed: None,
            s: Scratch::default(),
        }
    }

    /// Records are transcoded up to this many bytes of JSON (plus one, so the record builder
    /// sees them as too long and cuts them); the rest of such a record is skipped.
    pub fn with_max_record_bytes(mut self, max: usize) -> Self {
        self.max_record = max.max(64);
        self
    }

    /// While set, every frame must be a `PING` (the shared-key handshake is pending) and no
    /// frame may exceed [`MAX_PREAUTH_FRAME_BYTES`].
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
        // a big frame's buffer is not kept once it is consumed
        if self.buf.is_empty() && self.buf.capacity() > 8 << 20 {
            self.buf = Vec::new();
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
        let max = if self.expect_ping {
            self.max_frame.min(MAX_PREAUTH_FRAME_BYTES)
        } else {
            self.max_frame
        };
        let len = match scan_value(avail, max) {
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
        let decoded = decode_frame(
            &self.buf[start..start + len],
            &mut self.s,
            self.expect_ping,
            self.max_decompressed,
            now_unix_nanos,
        );
        match decoded {
            Ok(Decoded::Ping(p)) => Ok(Some(Message::Ping(p))),
            Ok(Decoded::Events {
                mode,
                range: (a, b),
                inflated,
                in_array,
            }) => {
                let src = if inflated {
                    &self.s.inflated[..]
                } else {
                    &self.buf[start..start + len]
                };
                Ok(Some(Message::Events(Events {
                    tag: &self.s.tag,
                    mode,
                    chunk: self.s.has_chunk.then_some(self.s.chunk.as_str()),
                    rd: Rd {
                        b: src.get(a..b).unwrap_or_default(),
                        pos: 0,
                    },
                    in_array,
                    now: now_unix_nanos,
                    max_record: self.max_record,
                    json: &mut self.s.json,
                    key: &mut self.s.key,
                })))
            }
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
#[derive(Debug, Clone, Copy)]
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

    fn is_empty(&self) -> bool {
        self.pos >= self.b.len()
    }

    /// Step over the next value, checking its markers, lengths and nesting (at most
    /// [`MAX_DEPTH`] levels below it, as [`to_json`] allows); returns its bytes.
    fn skip(&mut self) -> Result<&'a [u8], DecodeError> {
        let start = self.pos;
        self.skip_values(1)?;
        Ok(&self.b[start..self.pos])
    }

    /// Step over `n` values like [`Rd::skip`]. Iterative, allocation-free.
    fn skip_values(&mut self, n: u64) -> Result<(), DecodeError> {
        // values still to read on each open level
        let mut left = [0u64; MAX_DEPTH + 1];
        let mut d = 0usize;
        left[0] = n;
        loop {
            while left[d] == 0 {
                if d == 0 {
                    return Ok(());
                }
                d -= 1;
            }
            left[d] -= 1;
            let n = match self.head()? {
                Head::Str(n) | Head::Bin(n) | Head::Ext(_, n) => {
                    self.bytes(n)?;
                    continue;
                }
                Head::Array(n) => n as u64,
                Head::Map(n) => 2 * n as u64,
                _ => continue,
            };
            if n > 0 {
                if d == MAX_DEPTH {
                    return Err(too_deep(self.pos));
                }
                d += 1;
                left[d] = n;
            }
        }
    }

    /// A str (or bin, or nil as empty) of at most `max` bytes.
    fn short_str(&mut self, max: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let n = match self.head()? {
            Head::Str(n) | Head::Bin(n) => n,
            Head::Nil => 0,
            _ => return Err(proto(format!("{what} must be a string"))),
        };
        if n > max {
            return Err(proto(format!("{what} longer than {max} bytes")));
        }
        self.bytes(n)
    }
}

fn too_deep(offset: usize) -> DecodeError {
    DecodeError::Msgpack {
        offset,
        what: "nested deeper than 64 levels",
    }
}

// ---------------------------------------------------------------- frames

fn decode_frame(
    frame: &[u8],
    s: &mut Scratch,
    expect_ping: bool,
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
    let tag = match rd.head()? {
        Head::Str(t) if t <= MAX_TAG_BYTES => rd.bytes(t)?,
        Head::Str(_) => return Err(proto("tag longer than 4096 bytes")),
        _ => return Err(proto("the tag (first item) must be a string")),
    };
    s.tag.clear();
    s.tag.push_str(&String::from_utf8_lossy(tag));
    s.has_chunk = false;

    let events = |mode, range, inflated, in_array| Decoded::Events {
        mode,
        range,
        inflated,
        in_array,
    };
    let (mode, range, in_array) = match rd.peek()? {
        Head::Array(_) if !message_with_metadata(rd) => {
            if n > 3 {
                return Err(proto("Forward mode is [tag, entries, option?]"));
            }
            let entries = match rd.head()? {
                Head::Array(k) => k,
                _ => return Err(proto("entries must be an array")),
            };
            let start = rd.pos;
            for _ in 0..entries {
                read_entry(&mut rd, now, true)?;
            }
            (Mode::Forward, (start, rd.pos), true)
        }
        Head::Str(_) | Head::Bin(_) => {
            if n > 3 {
                return Err(proto("PackedForward mode is [tag, entries, option?]"));
            }
            let k = match rd.head()? {
                Head::Str(k) | Head::Bin(k) => k,
                _ => return Err(proto("packed entries must be str or bin")),
            };
            let start = rd.pos;
            let packed = rd.bytes(k)?;
            let end = rd.pos;
            if option(&mut rd, s)? {
                gunzip(packed, &mut s.inflated, max_decompressed)?;
                check_packed(&s.inflated, now)?;
                let all = (0, s.inflated.len());
                return Ok(events(Mode::CompressedPackedForward, all, true, true));
            }
            check_packed(packed, now)?;
            return Ok(events(Mode::PackedForward, (start, end), false, true));
        }
        _ => {
            if n < 3 {
                return Err(proto("Message mode is [tag, time, record, option?]"));
            }
            let start = rd.pos;
            read_entry(&mut rd, now, false)?;
            (Mode::Message, (start, rd.pos), false)
        }
    };
    option(&mut rd, s)?;
    Ok(events(mode, range, false, in_array))
}

/// Message mode with Fluent Bit's `[time, metadata]` as the time: `[tag, [time, {..}],
/// record, option?]` (Forward mode's entries array holds arrays, or nothing).
fn message_with_metadata(mut rd: Rd<'_>) -> bool {
    matches!(rd.head(), Ok(Head::Array(2))) && !matches!(rd.peek(), Ok(Head::Array(_)) | Err(_))
}

fn check_packed(data: &[u8], now: i64) -> Result<(), DecodeError> {
    let mut rd = Rd { b: data, pos: 0 };
    while !rd.is_empty() {
        read_entry(&mut rd, now, true).map_err(|e| match e {
            DecodeError::Msgpack {
                what: "value cut short",
                ..
            } => proto(format!(
                "packed entries end in a cut entry at byte {}",
                rd.pos
            )),
            e => e,
        })?;
    }
    Ok(())
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
    let n = match rd.head()? {
        Head::Map(n) if n <= MAX_OPTION_ENTRIES => n,
        Head::Map(_) => return Err(proto("option map with more than 64 entries")),
        Head::Nil => return Ok(false),
        _ => return Err(proto("option must be a map")),
    };
    let mut gzip = false;
    for _ in 0..n {
        let key = match rd.peek()? {
            Head::Str(_) => rd.short_str(MAX_FIELD_BYTES, "option key")?,
            _ => rd.skip()?,
        };
        match key {
            b"chunk" => {
                let c = rd.short_str(MAX_FIELD_BYTES, "option chunk")?;
                s.chunk.clear();
                s.chunk.push_str(&String::from_utf8_lossy(c));
                s.has_chunk = true;
            }
            b"compressed" => {
                gzip = match rd.short_str(16, "option compressed") {
                    Ok(b"gzip") => true,
                    Ok(b"text") => false,
                    _ => return Err(proto("option compressed must be \"gzip\" or \"text\"")),
                }
            }
            _ => {
                rd.skip()?;
            }
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
        out.clear();
        return Err(DecodeError::TooLargeDecompressed(limit));
    }
    Ok(())
}

/// One entry, checked: its time and the bytes of its record and metadata.
struct Entry<'a> {
    time: i64,
    record: &'a [u8],
    /// A non-empty metadata map.
    meta: Option<&'a [u8]>,
}

/// One `[time, record]` or `[[time, metadata], record]` entry (without its array in Message
/// mode); `None` for a nil record.
fn read_entry<'a>(
    rd: &mut Rd<'a>,
    now: i64,
    in_array: bool,
) -> Result<Option<Entry<'a>>, DecodeError> {
    if in_array && !matches!(rd.head()?, Head::Array(2)) {
        return Err(proto("an entry must be [time, record]"));
    }
    let (t, meta) = match rd.peek()? {
        Head::Array(2) => {
            rd.head()?;
            let t = time(rd, now)?;
            let is_map = matches!(rd.peek()?, Head::Map(m) if m > 0);
            let meta = rd.skip()?;
            (t, is_map.then_some(meta))
        }
        Head::Array(_) => return Err(proto("an event time with metadata must be [time, map]")),
        _ => (time(rd, now)?, None),
    };
    match rd.peek()? {
        Head::Map(_) => {}
        Head::Nil => {
            rd.head()?;
            return Ok(None);
        }
        _ => return Err(proto("a record must be a map")),
    }
    Ok(Some(Entry {
        time: t,
        record: rd.skip()?,
        meta,
    }))
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

/// The record of a checked entry as one JSON object (non-empty metadata as `_meta`), cut
/// once it passes `max_record` bytes (then longer than `max_record`, so the record builder
/// cuts and flags it).
fn transcode(
    e: &Entry<'_>,
    out: &mut Vec<u8>,
    key: &mut Vec<u8>,
    max_record: usize,
) -> Result<(), DecodeError> {
    let limit = out.len() + max_record.saturating_add(1);
    let r = to_json(
        &mut Rd {
            b: e.record,
            pos: 0,
        },
        out,
        key,
        0,
        limit,
    )
    .and_then(|()| {
        let Some(meta) = e.meta else { return Ok(()) };
        if out.last() == Some(&b'}') {
            out.pop();
            if out.last() != Some(&b'{') {
                out.push(b',');
            }
            out.extend_from_slice(b"\"_meta\":");
            to_json(&mut Rd { b: meta, pos: 0 }, out, key, 0, limit)?;
            out.push(b'}');
        }
        Ok(())
    });
    match r {
        Ok(()) => Ok(()),
        Err(Stop::Cut) => {
            if out.len() < limit {
                out.resize(limit, b' ');
            }
            Ok(())
        }
        Err(Stop::Bad(e)) => Err(e),
    }
}

/// Why transcoding stopped early.
enum Stop {
    /// The output reached its limit: the rest of the record is not needed (the entry's
    /// end is known from the check).
    Cut,
    Bad(DecodeError),
}

impl From<DecodeError> for Stop {
    fn from(e: DecodeError) -> Self {
        Stop::Bad(e)
    }
}

fn lossy(b: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(b)
}

/// Transcode the value at `rd` to JSON, stopping with [`Stop::Cut`] once `out` reaches
/// `limit` bytes (a long string or ext is written only up to it).
fn to_json(
    rd: &mut Rd<'_>,
    out: &mut Vec<u8>,
    key: &mut Vec<u8>,
    depth: usize,
    limit: usize,
) -> Result<(), Stop> {
    if depth > MAX_DEPTH {
        return Err(too_deep(rd.pos).into());
    }
    if out.len() >= limit {
        return Err(Stop::Cut);
    }
    let room = limit - out.len();
    match rd.head()? {
        Head::Nil => out.extend_from_slice(b"null"),
        Head::Bool(true) => out.extend_from_slice(b"true"),
        Head::Bool(false) => out.extend_from_slice(b"false"),
        Head::Uint(u) => write_display(out, u),
        Head::Int(i) => write_display(out, i),
        Head::F32(f) => write_f64(out, f64::from(f)),
        Head::F64(f) => write_f64(out, f),
        Head::Str(n) | Head::Bin(n) => {
            let b = rd.bytes(n)?;
            write_json_str(out, &lossy(&b[..n.min(room)]));
        }
        Head::Ext(_, n) => {
            let b = rd.bytes(n)?;
            out.push(b'"');
            let mut enc = String::new();
            base64::engine::general_purpose::STANDARD.encode_string(&b[..n.min(room)], &mut enc);
            out.extend_from_slice(enc.as_bytes());
            out.push(b'"');
        }
        Head::Array(n) => {
            out.push(b'[');
            for i in 0..n {
                if i > 0 {
                    out.push(b',');
                }
                to_json(rd, out, key, depth + 1, limit)?;
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
                        let b = rd.bytes(k)?;
                        let room = limit.saturating_sub(out.len());
                        write_json_str(out, &lossy(&b[..k.min(room)]));
                    }
                    _ => {
                        // a non-string key: its JSON text as the key
                        let mut k = std::mem::take(key);
                        k.clear();
                        let room = limit.saturating_sub(out.len()).min(MAX_KEY_JSON_BYTES + 1);
                        let mut r = to_json(rd, &mut k, &mut Vec::new(), depth + 1, room);
                        // Each level escapes the key text of the level inside it, which
                        // doubles its size: unbounded, 300 bytes of nested keys take
                        // 2^depth time and memory.
                        if k.len() > MAX_KEY_JSON_BYTES {
                            r = Err(Stop::Bad(DecodeError::Msgpack {
                                offset: rd.pos,
                                what: "non-string map key longer than 4096 bytes as JSON",
                            }));
                        }
                        if r.is_ok() {
                            write_json_str(out, &lossy(&k));
                        }
                        *key = k;
                        r?;
                    }
                }
                out.push(b':');
                to_json(rd, out, key, depth + 1, limit)?;
            }
            out.push(b'}');
        }
        Head::Reserved => {
            return Err(Stop::Bad(DecodeError::Msgpack {
                offset: rd.pos,
                what: "reserved marker 0xc1",
            }))
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
    if rd.short_str(MAX_FIELD_BYTES, "PING type")? != b"PING" {
        return Err(proto(
            "expected the handshake PING first (a shared key is configured)",
        ));
    }
    let mut field = |what: &'static str| rd.short_str(MAX_FIELD_BYTES, what);
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let hostname = s(field("PING hostname")?);
    let salt = field("PING shared_key_salt")?.to_vec();
    let digest = s(field("PING shared_key_hexdigest")?);
    let username = s(field("PING username")?);
    let password_digest = s(field("PING password")?);
    Ok(Ping {
        hostname,
        salt,
        digest,
        username,
        password_digest,
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
