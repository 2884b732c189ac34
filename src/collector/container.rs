//! Container log files (sans-IO): Docker `json-file` and CRI (containerd, CRI-O) line formats,
//! auto-detection, joining of partial lines, and Kubernetes metadata from file paths.
//!
//! Owns: [`ContainerDecoder`] (one per tailed file: detects the format from the first
//! non-blank line or uses the one given, decodes each physical line and joins partial lines
//! back into one message, per output stream, bounded by `max_record_bytes`), the line parsers
//! ([`parse_docker`], [`parse_cri`]), [`K8sMeta`] ([`K8sMeta::from_path`]) and
//! [`parse_rfc3339_nanos`].
//! Must not: do I/O, read clocks, or build output records (the tail input hands what the
//! decoder yields to `RecordBuilder::push_auto`).
//!
//! Formats:
//! - Docker json-file: `{"log":"text\n","stream":"stdout","time":"2024-05-01T12:00:00.1Z"}`.
//!   Docker cuts lines longer than 16 KiB: a `log` value that does not end in `\n` continues
//!   in the next line of the same stream.
//! - CRI: `<RFC 3339 time> <stdout|stderr> <P|F>[:more tags] <message>`; `P` marks a partial
//!   line, `F` the last (or only) part.
//!
//! Joining keeps one partial message per stream (stdout and stderr parts may interleave).
//! A joined message keeps the time of its first part. A message longer than `max` is cut (at
//! a UTF-8 char boundary) and flagged truncated; the rest of its parts are dropped.
//! [`ContainerDecoder::pending_raw_bytes`] says how many bytes of input, counted from the
//! first part of the oldest unfinished message, are not yet covered by an emitted record, so
//! a checkpoint never lands inside a message that is still being joined.

use std::fmt;
use std::path::Path;

use memchr::memchr;
use serde::de::{self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, Visitor};

/// Longest physical line of a container log the tail input waits for (Docker and containerd
/// cut messages at 16 KiB; JSON escaping can make a Docker line up to 6 times longer).
pub const CONTAINER_LINE_MAX: usize = 128 * 1024;

/// Which output stream of the container a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    fn idx(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }

    fn parse(s: &[u8]) -> Option<Stream> {
        match s {
            b"stdout" => Some(Stream::Stdout),
            b"stderr" => Some(Stream::Stderr),
            _ => None,
        }
    }
}

/// A container log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerFormat {
    Docker,
    Cri,
}

impl fmt::Display for ContainerFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContainerFormat::Docker => "docker",
            ContainerFormat::Cri => "cri",
        })
    }
}

// ---------------------------------------------------------------------------------------
// Time

/// Parse an RFC 3339 timestamp (`2024-05-01T12:00:00.123456789Z`, `...+02:00`; a space or
/// lower-case `t`/`z` accepted; fraction digits beyond nanoseconds ignored) into Unix
/// nanoseconds. None if malformed or out of the i64-nanosecond range.
pub fn parse_rfc3339_nanos(s: &[u8]) -> Option<i64> {
    if s.len() < 20 {
        return None;
    }
    let num = |a: usize, b: usize| -> Option<i64> {
        let mut v = 0i64;
        for &c in s.get(a..b)? {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + i64::from(c - b'0');
        }
        Some(v)
    };
    let sep = |i: usize, c: u8| s.get(i) == Some(&c);
    if !(sep(4, b'-') && sep(7, b'-') && sep(13, b':') && sep(16, b':')) {
        return None;
    }
    if !matches!(s[10], b'T' | b't' | b' ') {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, sec) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 {
        return None;
    }
    if sec > 60 {
        return None;
    }
    let sec = sec.min(59); // a leap second is folded into :59
    let mut i = 19;
    let mut nanos = 0i64;
    if s.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        let mut scale = 100_000_000;
        while let Some(c) = s.get(i).filter(|c| c.is_ascii_digit()) {
            nanos += i64::from(c - b'0') * scale;
            scale /= 10;
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset = match s.get(i)? {
        b'Z' | b'z' => {
            i += 1;
            0
        }
        c @ (b'+' | b'-') => {
            if !sep(i + 3, b':') {
                return None;
            }
            let (oh, om) = (num(i + 1, i + 3)?, num(i + 4, i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            i += 6;
            let o = oh * 3600 + om * 60;
            if *c == b'-' {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    if i != s.len() {
        return None;
    }
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// ---------------------------------------------------------------------------------------
// Line parsers

/// The fields of one Docker json-file line (the `log` text goes to the caller's buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DockerLine {
    pub stream: Stream,
    /// Unix nanoseconds; None if `time` is missing or malformed.
    pub time: Option<i64>,
}

/// Parse a Docker json-file line; the unescaped `log` value is appended to `log`.
/// None (and `log` unspecified) if the line is not a JSON object with a string `log` and a
/// `stream` of stdout or stderr.
pub fn parse_docker(line: &[u8], log: &mut Vec<u8>) -> Option<DockerLine> {
    let line = line.trim_ascii();
    if line.first() != Some(&b'{') {
        return None;
    }
    let mut de = serde_json::Deserializer::from_slice(line);
    let found = de.deserialize_map(DockerVisitor { log }).ok()?;
    de.end().ok()?;
    match found {
        (true, Some(stream), time) => Some(DockerLine { stream, time }),
        _ => None,
    }
}

struct DockerVisitor<'s> {
    log: &'s mut Vec<u8>,
}

enum DockerKey {
    Log,
    Stream,
    Time,
    Other,
}

impl<'de> de::Deserialize<'de> for DockerKey {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DockerKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, k: &str) -> Result<DockerKey, E> {
                Ok(match k {
                    "log" => DockerKey::Log,
                    "stream" => DockerKey::Stream,
                    "time" => DockerKey::Time,
                    _ => DockerKey::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Visitor<'de> for DockerVisitor<'_> {
    type Value = (bool, Option<Stream>, Option<i64>);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Docker json-file log object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut has_log, mut stream, mut time) = (false, None, None);
        while let Some(k) = map.next_key::<DockerKey>()? {
            match k {
                DockerKey::Log if !has_log => {
                    map.next_value_seed(StrSeed(|s: &str| {
                        self.log.extend_from_slice(s.as_bytes())
                    }))?;
                    has_log = true;
                }
                DockerKey::Stream => {
                    map.next_value_seed(StrSeed(|s: &str| stream = Stream::parse(s.as_bytes())))?
                }
                DockerKey::Time => map
                    .next_value_seed(StrSeed(|s: &str| time = parse_rfc3339_nanos(s.as_bytes())))?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok((has_log, stream, time))
    }
}

/// Deserialize a JSON string and hand it to a closure (no allocation unless it has escapes).
struct StrSeed<F>(F);

impl<'de, F: FnOnce(&str)> DeserializeSeed<'de> for StrSeed<F> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<F: FnOnce(&str)> Visitor<'_> for StrSeed<F> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<(), E> {
        (self.0)(s);
        Ok(())
    }
}

/// One CRI log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CriLine<'a> {
    pub time: i64,
    pub stream: Stream,
    /// `P`: the message continues in the next line of this stream.
    pub partial: bool,
    pub msg: &'a [u8],
}

/// Parse `<time> <stdout|stderr> <P|F>[:tags] <message>`; None if the line is not one.
pub fn parse_cri(line: &[u8]) -> Option<CriLine<'_>> {
    let sp = memchr(b' ', line)?;
    let time = parse_rfc3339_nanos(&line[..sp])?;
    let rest = &line[sp + 1..];
    let sp = memchr(b' ', rest)?;
    let stream = Stream::parse(&rest[..sp])?;
    let rest = &rest[sp + 1..];
    let (tags, msg) = match memchr(b' ', rest) {
        Some(p) => (&rest[..p], &rest[p + 1..]),
        None => (rest, &rest[rest.len()..]),
    };
    let first = tags.split(|&c| c == b':').next().unwrap_or(b"");
    let partial = match first {
        b"P" => true,
        b"F" => false,
        _ => return None,
    };
    Some(CriLine {
        time,
        stream,
        partial,
        msg,
    })
}

/// Which container format a line is in, if any (Docker is tried first).
pub fn detect(line: &[u8], scratch: &mut Vec<u8>) -> Option<ContainerFormat> {
    scratch.clear();
    if parse_docker(line, scratch).is_some() {
        Some(ContainerFormat::Docker)
    } else if parse_cri(line).is_some() {
        Some(ContainerFormat::Cri)
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------
// Kubernetes metadata

/// Pod metadata taken from a container log file's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sMeta {
    pub pod: String,
    pub namespace: String,
    pub container: String,
    /// Empty when the path does not carry it (`/var/log/pods/...`).
    pub container_id: String,
}

impl K8sMeta {
    /// From `.../containers/<pod>_<namespace>_<container>-<id>.log` (the kubelet's symlinks,
    /// any parent directory named `containers`) or
    /// `.../pods/<namespace>_<pod>_<uid>/<container>/<n>.log`. None for any other path.
    pub fn from_path(path: &Path) -> Option<K8sMeta> {
        let name = path.file_name()?.to_str()?;
        let parent = path.parent()?;
        let parent_name = parent.file_name()?.to_str()?;
        if parent_name == "containers" {
            let stem = name.strip_suffix(".log")?;
            let mut it = stem.split('_');
            let (pod, namespace, rest) = (it.next()?, it.next()?, it.next()?);
            if it.next().is_some() {
                return None;
            }
            let (container, id) = rest.rsplit_once('-')?;
            let ok = |s: &str| !s.is_empty();
            let id_ok = ok(id) && id.bytes().all(|b| b.is_ascii_alphanumeric());
            if !(ok(pod) && ok(namespace) && ok(container) && id_ok) {
                return None;
            }
            return Some(K8sMeta {
                pod: pod.to_owned(),
                namespace: namespace.to_owned(),
                container: container.to_owned(),
                container_id: id.to_owned(),
            });
        }
        // /var/log/pods/<namespace>_<pod>_<uid>/<container>/<n>.log
        let n = name.strip_suffix(".log")?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let pod_dir = parent.parent()?;
        if pod_dir.parent()?.file_name()?.to_str()? != "pods" {
            return None;
        }
        let mut it = pod_dir.file_name()?.to_str()?.split('_');
        let (namespace, pod, uid) = (it.next()?, it.next()?, it.next()?);
        if it.next().is_some() || namespace.is_empty() || pod.is_empty() || uid.is_empty() {
            return None;
        }
        Some(K8sMeta {
            pod: pod.to_owned(),
            namespace: namespace.to_owned(),
            container: parent_name.to_owned(),
            container_id: String::new(),
        })
    }

    /// `(label, value)` pairs to add to records (`container_id` only when known).
    pub fn labels(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("pod", self.pod.clone()),
            ("namespace", self.namespace.clone()),
            ("container", self.container.clone()),
        ];
        if !self.container_id.is_empty() {
            v.push(("container_id", self.container_id.clone()));
        }
        v
    }
}

// ---------------------------------------------------------------------------------------
// Decoder

/// How a decoder treats lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeMode {
    /// Decide from the first non-blank line: Docker, CRI, or neither (plain lines).
    Detect,
    /// Every line is in this format; a line that is not is reported as malformed.
    Fixed(ContainerFormat),
}

/// One whole container log message (joined if it came in parts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerRecord<'a> {
    pub stream: Stream,
    /// Time of the (first) line, Unix nanoseconds; None if the line had none.
    pub time: Option<i64>,
    /// The message, without Docker's trailing `\n`, at most `max` bytes.
    pub msg: &'a [u8],
    pub truncated: bool,
}

/// What one input line turned into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole message.
    Record(ContainerRecord<'a>),
    /// A partial line, held until its last part.
    Held,
    /// The file is not a container log (detected as plain): build the line as usual.
    Plain(&'a [u8]),
    /// The line is not in the file's container format: keep it as a raw message.
    Malformed(&'a [u8]),
    /// A blank line.
    Blank,
}

#[derive(Debug, Clone, Default)]
struct Partial {
    buf: Vec<u8>,
    time: Option<i64>,
    truncated: bool,
    /// Input position (see `ContainerDecoder::total`) where the first part started.
    start: u64,
    active: bool,
}

impl Partial {
    fn reset(&mut self) {
        self.buf.clear();
        self.time = None;
        self.truncated = false;
        self.active = false;
    }

    fn append(&mut self, part: &[u8], time: Option<i64>, start: u64, max: usize) {
        if !self.active {
            self.active = true;
            self.time = time;
            self.start = start;
        }
        if !self.truncated {
            let room = max.saturating_sub(self.buf.len());
            let (keep, cut) = bounded(part, room);
            self.buf.extend_from_slice(keep);
            self.truncated = cut;
        }
    }
}

/// `part` cut to at most `max` bytes, backing off to a UTF-8 char start; and whether it was.
fn bounded(part: &[u8], max: usize) -> (&[u8], bool) {
    if part.len() <= max {
        return (part, false);
    }
    let mut cut = max;
    while cut > 0 && max - cut < 3 && (part[cut] & 0xC0) == 0x80 {
        cut -= 1;
    }
    (&part[..cut], true)
}

/// Per-file container log decoding and partial-line joining. Feed it every line of the file
/// in order ([`ContainerDecoder::push`]); reuse it for the life of the file.
#[derive(Debug, Clone)]
pub struct ContainerDecoder {
    mode: Option<ContainerFormat>,
    /// Detection done (with `mode` None: a plain file).
    decided: bool,
    explicit: bool,
    max: usize,
    parts: [Partial; 2],
    scratch: Vec<u8>,
    /// Input bytes seen, each line counted with its `\n`.
    total: u64,
    /// A part buffer returned by the last push, to clear on the next.
    emitted: Option<usize>,
}

impl ContainerDecoder {
    /// `max`: longest message; longer ones are cut and flagged truncated.
    pub fn new(mode: DecodeMode, max: usize) -> Self {
        let (m, explicit) = match mode {
            DecodeMode::Detect => (None, false),
            DecodeMode::Fixed(f) => (Some(f), true),
        };
        ContainerDecoder {
            mode: m,
            decided: explicit,
            explicit,
            max: max.max(1),
            parts: Default::default(),
            scratch: Vec::new(),
            total: 0,
            emitted: None,
        }
    }

    /// The format in use: None while undecided or for a plain file.
    pub fn format(&self) -> Option<ContainerFormat> {
        self.mode
    }

    /// True once the file was found not to be a container log (only in detect mode).
    pub fn is_plain(&self) -> bool {
        self.decided && self.mode.is_none()
    }

    /// Decode one line (without its `\n`).
    pub fn push<'a>(&'a mut self, line: &'a [u8]) -> Decoded<'a> {
        if let Some(i) = self.emitted.take() {
            self.parts[i].reset();
        }
        let start = self.total;
        self.total += line.len() as u64 + 1;
        if !self.decided {
            if line.trim_ascii().is_empty() {
                return Decoded::Blank;
            }
            self.mode = detect(line, &mut self.scratch);
            self.decided = true;
            if let Some(f) = self.mode {
                tracing::debug!(format = %f, "container log format detected");
            }
        }
        let max = self.max;
        match self.mode {
            None => Decoded::Plain(line),
            Some(ContainerFormat::Docker) => {
                self.scratch.clear();
                let Some(d) = parse_docker(line, &mut self.scratch) else {
                    return self.malformed(line);
                };
                let last = self.scratch.last() == Some(&b'\n');
                if last {
                    self.scratch.pop();
                }
                let i = d.stream.idx();
                let p = &mut self.parts[i];
                if !last {
                    p.append(&self.scratch, d.time, start, max);
                    return Decoded::Held;
                }
                if p.active {
                    p.append(&self.scratch, d.time, start, max);
                    self.emitted = Some(i);
                    return Decoded::Record(ContainerRecord {
                        stream: d.stream,
                        time: p.time,
                        msg: &p.buf,
                        truncated: p.truncated,
                    });
                }
                let (msg, truncated) = bounded(&self.scratch, max);
                Decoded::Record(ContainerRecord {
                    stream: d.stream,
                    time: d.time,
                    msg,
                    truncated,
                })
            }
            Some(ContainerFormat::Cri) => {
                let Some(c) = parse_cri(line) else {
                    return self.malformed(line);
                };
                let i = c.stream.idx();
                let p = &mut self.parts[i];
                if c.partial {
                    p.append(c.msg, Some(c.time), start, max);
                    return Decoded::Held;
                }
                if p.active {
                    p.append(c.msg, Some(c.time), start, max);
                    self.emitted = Some(i);
                    return Decoded::Record(ContainerRecord {
                        stream: c.stream,
                        time: p.time,
                        msg: &p.buf,
                        truncated: p.truncated,
                    });
                }
                let (msg, truncated) = bounded(c.msg, max);
                Decoded::Record(ContainerRecord {
                    stream: c.stream,
                    time: Some(c.time),
                    msg,
                    truncated,
                })
            }
        }
    }

    fn malformed<'a>(&self, line: &'a [u8]) -> Decoded<'a> {
        if line.trim_ascii().is_empty() {
            Decoded::Blank
        } else {
            if !self.explicit {
                tracing::trace!("line is not in the file's detected container format");
            }
            Decoded::Malformed(line)
        }
    }

    /// Input bytes, from the start of the oldest message still being joined, that no emitted
    /// record covers yet (0 when nothing is held). A safe read position is the position after
    /// the last fed line minus this.
    pub fn pending_raw_bytes(&self) -> u64 {
        self.parts
            .iter()
            .enumerate()
            .filter(|(i, p)| p.active && self.emitted != Some(*i))
            .map(|(_, p)| self.total - p.start)
            .max()
            .unwrap_or(0)
    }

    /// True if a partial message is held.
    pub fn has_pending(&self) -> bool {
        self.pending_raw_bytes() > 0
    }

    /// Emit every held partial message as it is (oldest first): the file ended or went quiet
    /// without their last part.
    pub fn flush(&mut self, mut emit: impl FnMut(ContainerRecord<'_>)) {
        if let Some(i) = self.emitted.take() {
            self.parts[i].reset();
        }
        let mut order = [0usize, 1];
        order.sort_by_key(|&i| self.parts[i].start);
        for i in order {
            let p = &mut self.parts[i];
            if p.active {
                let stream = if i == 0 {
                    Stream::Stdout
                } else {
                    Stream::Stderr
                };
                emit(ContainerRecord {
                    stream,
                    time: p.time,
                    msg: &p.buf,
                    truncated: p.truncated,
                });
                p.reset();
            }
        }
    }

    /// The file was truncated and is read again from its start: drop held parts.
    pub fn reset(&mut self) {
        self.parts.iter_mut().for_each(Partial::reset);
        self.emitted = None;
        self.total = 0;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
