//! The syslog input (`--syslog ADDR`): RFC 5424 and RFC 3164 messages over UDP and TCP on
//! the same port.
//!
//! Owns: the sans-IO parts — [`SyslogParser`] (one message → a JSON object of its fields, the
//! record time and the tag) and [`TcpFramer`] (RFC 6587 octet counting `LEN SP MSG` and
//! newline framing, decided per frame by its first byte) — and the tokio edges: one UDP task
//! and one task per TCP connection (at most `max_connections` of [`ConnLimits`]; one that
//! sends nothing for `idle_timeout` is closed), each turning one read into one `InputBatch`.
//! Must not: block, allocate per message on the hot path (parser and framer reuse their
//! buffers), or promise delivery (syslog has no acknowledgements: batches carry no
//! `Delivery`; UDP datagrams the kernel drops under load are lost).
//!
//! Record: `{"facility":"daemon","severity":"info","hostname":..,"appname":..,"procid":..,
//! "msgid":..,"structured_data":{"id":{"param":"value"}},"timestamp":"<as sent>",
//! "message":..}` (absent or `-` fields left out; structured data that does not parse is
//! kept as a string); tag = appname, else `syslog`; `_ts` = the message's timestamp, else
//! the receive time. RFC 3164 timestamps have no year or zone: the year is the one that puts
//! it closest before now (+1 day), the zone UTC. A frame longer than `max_record_bytes` is
//! cut (its message shortened so the record stays within the limit) and flagged
//! `_truncated`; a message without a valid `<PRI>` is kept as `{"message": ..}` with
//! `_parse_error`. Invalid UTF-8 is replaced by U+FFFD.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use memchr::memchr;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{ConnLimits, InputError, WarnEvery};
use crate::collector::container::{days_from_civil, parse_rfc3339_nanos};
use crate::collector::parse::write_json_str;
use crate::collector::record::{unix_nanos_now, Accumulator, Extra, InputBatch, RecordBuilder};

/// Datagrams read in one go before their records are handed on.
const UDP_BURST: usize = 512;
const TCP_READ: usize = 64 * 1024;

const FACILITIES: [&str; 24] = [
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
    "ftp", "ntp", "security", "console", "clock", "local0", "local1", "local2", "local3", "local4",
    "local5", "local6", "local7",
];
const SEVERITIES: [&str; 8] = [
    "emerg", "alert", "crit", "err", "warning", "notice", "info", "debug",
];

/// What [`SyslogParser::parse`] found besides the JSON object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    /// Record time, Unix nanoseconds (the message's timestamp, else `now`).
    pub ts: i64,
    /// False if the message had no valid `<PRI>` (kept as a raw `message`).
    pub ok: bool,
    /// The message was shortened to keep the record within the limit.
    pub truncated: bool,
}

/// Parses syslog messages into JSON objects. Reuse one per task.
#[derive(Debug, Clone)]
pub struct SyslogParser {
    /// The JSON object of the last message.
    pub obj: Vec<u8>,
    /// The tag of the last message.
    pub tag: String,
    /// Largest object to build: the message text is cut to fit.
    max: usize,
}

fn text(b: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(b)
}

impl SyslogParser {
    pub fn new(max_record_bytes: usize) -> Self {
        SyslogParser {
            obj: Vec::new(),
            tag: String::new(),
            max: max_record_bytes.max(64),
        }
    }

    /// Parse one message (without framing). `now`: receive time, Unix nanoseconds.
    pub fn parse(&mut self, msg: &[u8], now: i64) -> Parsed {
        self.obj.clear();
        self.tag.clear();
        let mut end = msg.len();
        while end > 0 && matches!(msg[end - 1], b'\n' | b'\r' | 0) {
            end -= 1;
        }
        let msg = &msg[..end];
        let Some((pri, rest)) = parse_pri(msg) else {
            self.tag.push_str("syslog");
            self.obj.push(b'{');
            let truncated = self.message(msg);
            self.obj.push(b'}');
            return Parsed {
                ts: now,
                ok: false,
                truncated,
            };
        };
        self.obj.push(b'{');
        self.field("facility", FACILITIES[usize::from(pri >> 3)]);
        self.field("severity", SEVERITIES[usize::from(pri & 7)]);
        let (ts, truncated) = match rest {
            [b'1'..=b'9', b' ', ..] => self.rfc5424(&rest[2..], now),
            _ => self.rfc3164(rest, now),
        };
        if self.tag.is_empty() {
            self.tag.push_str("syslog");
        }
        self.obj.push(b'}');
        Parsed {
            ts,
            ok: true,
            truncated,
        }
    }

    fn sep(&mut self) {
        if self.obj.len() > 1 {
            self.obj.push(b',');
        }
    }

    fn field(&mut self, k: &str, v: &str) {
        self.sep();
        write_json_str(&mut self.obj, k);
        self.obj.push(b':');
        write_json_str(&mut self.obj, v);
    }

    /// A field unless it is empty or the RFC 5424 nil value `-`.
    fn opt_field(&mut self, k: &str, v: &[u8]) {
        if !v.is_empty() && v != b"-" {
            self.field(k, &text(v));
        }
    }

    /// The `message` field, cut so the object stays within `max`. Returns true if cut.
    fn message(&mut self, m: &[u8]) -> bool {
        let m = m.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(m); // RFC 5424 BOM
        let s = text(m);
        // room for `,"message":""}` after what is there
        let budget = self.max.saturating_sub(self.obj.len() + 15);
        let cut = json_cut(&s, budget);
        self.field("message", &s[..cut]);
        cut < s.len()
    }

    /// `TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD [SP MSG]`
    fn rfc5424(&mut self, rest: &[u8], now: i64) -> (i64, bool) {
        let mut it = Fields(rest);
        let (Some(ts), Some(host), Some(app), Some(pid), Some(msgid)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            // header cut short: keep what there is as the message
            return (now, self.message(rest));
        };
        self.opt_field("hostname", host);
        self.opt_field("appname", app);
        if app != b"-" {
            self.tag.push_str(&text(app));
        }
        self.opt_field("procid", pid);
        self.opt_field("msgid", msgid);
        let after = it.0;
        let (sd_len, msg) = match after.first() {
            Some(b'[') => {
                let n = sd_end(after).unwrap_or_else(|| {
                    // malformed: up to the last "] " (or all), kept as a raw string
                    after
                        .windows(2)
                        .rposition(|w| w == b"] ")
                        .map_or(after.len(), |p| p + 1)
                });
                (n, after.get(n..).unwrap_or(b""))
            }
            Some(b'-') => (0, after.get(1..).unwrap_or(b"")),
            _ => (0, after),
        };
        if sd_len > 0 {
            self.structured_data(&after[..sd_len]);
        }
        let msg = msg.strip_prefix(b" ").unwrap_or(msg);
        let time = if ts == b"-" {
            None
        } else {
            self.field("timestamp", &text(ts));
            parse_rfc3339_nanos(ts)
        };
        (time.unwrap_or(now), self.message(msg))
    }

    /// `[id k="v" ...][id2 ...]` as `{"id":{"k":"v"},...}`; a string if it does not parse.
    fn structured_data(&mut self, sd: &[u8]) {
        self.sep();
        write_json_str(&mut self.obj, "structured_data");
        self.obj.push(b':');
        let mark = self.obj.len();
        if !write_sd_object(sd, &mut self.obj) {
            self.obj.truncate(mark);
            write_json_str(&mut self.obj, &text(sd));
        }
    }

    /// `TIMESTAMP SP HOSTNAME SP TAG[PID]: MSG`, each part optional as real senders do.
    fn rfc3164(&mut self, mut rest: &[u8], now: i64) -> (i64, bool) {
        let mut time = None;
        if let Some(t) = bsd_time(rest, now) {
            self.field("timestamp", &text(&rest[..15]));
            time = Some(t);
            rest = rest.get(16..).unwrap_or(b"");
        } else if let Some(sp) = memchr(b' ', rest) {
            if let Some(t) = parse_rfc3339_nanos(&rest[..sp]) {
                self.field("timestamp", &text(&rest[..sp]));
                time = Some(t);
                rest = &rest[sp + 1..];
            }
        }
        if time.is_some() {
            // a hostname, unless the next word is already the tag
            if let Some(sp) = memchr(b' ', rest) {
                let word = &rest[..sp];
                if !word.is_empty() && !word.ends_with(b":") && memchr(b'[', word).is_none() {
                    self.opt_field("hostname", word);
                    rest = &rest[sp + 1..];
                }
            }
        }
        // TAG: alphanumerics and a few punctuation marks, up to '[' or ':'
        let n = rest
            .iter()
            .position(|&c| !(c.is_ascii_alphanumeric() || b"-_./".contains(&c)))
            .unwrap_or(rest.len());
        let (tag, after) = rest.split_at(n);
        let (pid, after) = match after.strip_prefix(b"[") {
            Some(a) => match memchr(b']', a) {
                Some(e) => (Some(&a[..e]), &a[e + 1..]),
                None => (None, after),
            },
            None => (None, after),
        };
        match after.strip_prefix(b":") {
            Some(msg) if !tag.is_empty() && n <= 48 => {
                self.opt_field("appname", tag);
                self.tag.push_str(&text(tag));
                if let Some(p) = pid {
                    self.opt_field("procid", p);
                }
                let msg = msg.strip_prefix(b" ").unwrap_or(msg);
                (time.unwrap_or(now), self.message(msg))
            }
            _ => (time.unwrap_or(now), self.message(rest)),
        }
    }
}

/// `<PRI>` (1 to 3 digits, at most 191) and what follows.
fn parse_pri(msg: &[u8]) -> Option<(u8, &[u8])> {
    let rest = msg.strip_prefix(b"<")?;
    let close = rest.iter().take(4).position(|&c| c == b'>')?;
    if close == 0 || (close > 1 && rest[0] == b'0') {
        return None;
    }
    let mut v = 0u16;
    for &c in &rest[..close] {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u16::from(c - b'0');
    }
    let pri = u8::try_from(v).ok().filter(|p| *p <= 191)?;
    Some((pri, &rest[close + 1..]))
}

/// Space-separated header fields of RFC 5424.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let sp = memchr(b' ', self.0)?;
        let f = &self.0[..sp];
        self.0 = &self.0[sp + 1..];
        (!f.is_empty()).then_some(f)
    }
}

/// Length of the structured data at the start of `s` (one or more `[...]` elements with
/// quoted values where `\"`, `\\` and `\]` are escapes); None if it does not end well.
fn sd_end(s: &[u8]) -> Option<usize> {
    let mut i = 0;
    while s.get(i) == Some(&b'[') {
        i += 1;
        let mut in_quotes = false;
        loop {
            let c = *s.get(i)?;
            i += 1;
            match c {
                b'\\' if in_quotes => i += 1,
                b'"' => in_quotes = !in_quotes,
                b']' if !in_quotes => break,
                _ => {}
            }
        }
    }
    match s.get(i) {
        None | Some(b' ') => Some(i),
        _ => None,
    }
}

/// Write `[id k="v"...]...` as a JSON object; false if it is not well formed.
fn write_sd_object(sd: &[u8], out: &mut Vec<u8>) -> bool {
    let mut val = Vec::new();
    let mut s = sd;
    out.push(b'{');
    let mut first_el = true;
    while let Some(r) = s.strip_prefix(b"[") {
        let n = r
            .iter()
            .position(|&c| c == b' ' || c == b']')
            .unwrap_or(r.len());
        if n == 0 || n >= r.len() {
            return false;
        }
        if !first_el {
            out.push(b',');
        }
        first_el = false;
        write_json_str(out, &text(&r[..n]));
        out.extend_from_slice(b":{");
        s = &r[n..];
        let mut first = true;
        loop {
            match s.first() {
                Some(b']') => {
                    s = &s[1..];
                    break;
                }
                Some(b' ') => s = &s[1..],
                Some(_) => {
                    let Some(eq) = memchr(b'=', s) else {
                        return false;
                    };
                    let name = &s[..eq];
                    if name.is_empty() || name.contains(&b' ') || s.get(eq + 1) != Some(&b'"') {
                        return false;
                    }
                    s = &s[eq + 2..];
                    val.clear();
                    loop {
                        match s.first() {
                            None => return false,
                            Some(b'\\') if matches!(s.get(1), Some(b'"' | b'\\' | b']')) => {
                                val.push(s[1]);
                                s = &s[2..];
                            }
                            Some(b'"') => {
                                s = &s[1..];
                                break;
                            }
                            Some(&c) => {
                                val.push(c);
                                s = &s[1..];
                            }
                        }
                    }
                    if !first {
                        out.push(b',');
                    }
                    first = false;
                    write_json_str(out, &text(name));
                    out.push(b':');
                    write_json_str(out, &text(&val));
                }
                None => return false,
            }
        }
        out.push(b'}');
    }
    out.push(b'}');
    s.is_empty()
}

/// Byte length of the longest prefix of `s` (at a char boundary) whose JSON string escape
/// fits in `budget` bytes.
fn json_cut(s: &str, budget: usize) -> usize {
    if s.len() <= budget / 6 {
        return s.len();
    }
    let mut used = 0;
    for (i, c) in s.char_indices() {
        used += match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        };
        if used > budget {
            return i;
        }
    }
    s.len()
}

/// `Mmm dd hh:mm:ss` (day space- or zero-padded) as Unix nanoseconds, in UTC, in the year
/// that puts it at most a day after `now`.
fn bsd_time(s: &[u8], now: i64) -> Option<i64> {
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let s = s.get(..15)?;
    let mon = MONTHS.iter().position(|m| &s[..3] == *m)? as i64 + 1;
    if s[3] != b' ' || s[6] != b' ' || s[9] != b':' || s[12] != b':' {
        return None;
    }
    let d1 = if s[4] == b' ' { b'0' } else { s[4] };
    let digits = [d1, s[5], s[7], s[8], s[10], s[11], s[13], s[14]];
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = |i: usize| i64::from(digits[i] - b'0') * 10 + i64::from(digits[i + 1] - b'0');
    let (day, h, mi, sec) = (n(0), n(2), n(4), n(6));
    if !(1..=31).contains(&day) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let now_days = now.div_euclid(86_400 * 1_000_000_000);
    let year = civil_year(now_days);
    let at = |y: i64| days_from_civil(y, mon, day) * 86_400 + h * 3600 + mi * 60 + sec.min(59);
    let limit = now / 1_000_000_000 + 86_400;
    let secs = if at(year) > limit {
        at(year - 1)
    } else {
        at(year)
    };
    secs.checked_mul(1_000_000_000)
}

/// The year of a day count since 1970-01-01.
fn civil_year(days: i64) -> i64 {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    yoe + era * 400 + i64::from(mp >= 10)
}

/// TCP stream → syslog frames: octet-counted (`LEN SP MSG`, RFC 6587) when a frame starts
/// with a digit, else newline-terminated. Whitespace between frames is skipped. Frames are
/// cut to `max` bytes (flagged); the rest of an oversized frame is skipped.
#[derive(Debug, Clone)]
pub struct TcpFramer {
    buf: Vec<u8>,
    max: usize,
    st: FrameState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameState {
    Start,
    Digits,
    Counted { remaining: usize, truncated: bool },
    Line { skipping: bool },
}

impl TcpFramer {
    pub fn new(max: usize) -> Self {
        TcpFramer {
            buf: Vec::new(),
            max: max.max(1),
            st: FrameState::Start,
        }
    }

    /// Feed received bytes; `emit(frame, truncated)` gets every complete frame.
    pub fn feed(&mut self, mut data: &[u8], mut emit: impl FnMut(&[u8], bool)) {
        while !data.is_empty() {
            match self.st {
                FrameState::Start => {
                    let skip = data
                        .iter()
                        .position(|b| !b.is_ascii_whitespace() && *b != 0)
                        .unwrap_or(data.len());
                    data = &data[skip..];
                    if let Some(c) = data.first() {
                        self.st = if c.is_ascii_digit() {
                            FrameState::Digits
                        } else {
                            FrameState::Line { skipping: false }
                        };
                    }
                }
                FrameState::Digits => {
                    let c = data[0];
                    if c.is_ascii_digit() && self.buf.len() < 9 {
                        self.buf.push(c);
                        data = &data[1..];
                    } else if c == b' ' {
                        let len = self
                            .buf
                            .iter()
                            .fold(0usize, |v, d| v * 10 + usize::from(d - b'0'));
                        self.buf.clear();
                        data = &data[1..];
                        self.st = if len == 0 {
                            FrameState::Start
                        } else {
                            FrameState::Counted {
                                remaining: len,
                                truncated: false,
                            }
                        };
                    } else {
                        // not a length: a newline-framed message that starts with digits
                        self.st = FrameState::Line { skipping: false };
                    }
                }
                FrameState::Counted {
                    remaining,
                    truncated,
                } => {
                    let take = remaining.min(data.len());
                    let keep = take.min(self.max - self.buf.len());
                    self.buf.extend_from_slice(&data[..keep]);
                    let truncated = truncated || keep < take;
                    data = &data[take..];
                    let remaining = remaining - take;
                    if remaining == 0 {
                        emit(&self.buf, truncated);
                        self.buf.clear();
                        self.st = FrameState::Start;
                    } else {
                        self.st = FrameState::Counted {
                            remaining,
                            truncated,
                        };
                    }
                }
                FrameState::Line { skipping } => {
                    let (chunk, done) = match memchr(b'\n', data) {
                        Some(p) => (&data[..p], Some(p + 1)),
                        None => (data, None),
                    };
                    if !skipping {
                        let room = self.max - self.buf.len();
                        if chunk.len() > room {
                            self.buf.extend_from_slice(&chunk[..room]);
                            emit(&self.buf, true);
                            self.buf.clear();
                            self.st = FrameState::Line { skipping: true };
                        } else {
                            self.buf.extend_from_slice(chunk);
                            if done.is_some() {
                                emit(&self.buf, false);
                                self.buf.clear();
                            }
                        }
                    }
                    match done {
                        Some(n) => {
                            data = &data[n..];
                            self.st = FrameState::Start;
                        }
                        None => data = &[],
                    }
                }
            }
        }
    }

    /// The connection ended: emit an unfinished frame (a cut octet-counted one is flagged).
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8], bool)) {
        match self.st {
            FrameState::Counted { .. } if !self.buf.is_empty() => emit(&self.buf, true),
            FrameState::Digits | FrameState::Line { skipping: false } if !self.buf.is_empty() => {
                emit(&self.buf, false)
            }
            _ => {}
        }
        self.buf.clear();
        self.st = FrameState::Start;
    }
}

/// Parse one frame and append its record.
fn push_frame(
    p: &mut SyslogParser,
    b: &mut RecordBuilder,
    acc: &mut Accumulator,
    frame: &[u8],
    frame_truncated: bool,
    now: i64,
) {
    let r = p.parse(frame, now);
    let extra = Extra {
        fields: &[],
        truncated: frame_truncated || r.truncated,
        parse_error: !r.ok,
    };
    b.push_auto(&p.tag, &p.obj, extra, r.ts, acc);
}

/// Listen for syslog on `addr` over UDP and TCP (same port; with port 0 the TCP port is
/// reused for UDP) until `cancel`. Returns an error only if it cannot listen.
pub async fn run_syslog(
    addr: SocketAddr,
    limits: ConnLimits,
    builder: RecordBuilder,
    tx: mpsc::Sender<InputBatch>,
    cancel: CancellationToken,
) -> Result<(), InputError> {
    let (tcp, udp, bound) = bind_both(addr).await?;
    tracing::info!(addr = %bound, transports = "udp,tcp", "syslog input listening");
    let mut tasks = tokio::task::JoinSet::new();
    {
        let (b, tx, c) = (builder.clone(), tx.clone(), cancel.clone());
        tasks.spawn(async move { udp_loop(udp, b, tx, c).await });
    }
    tasks.spawn(async move { tcp_accept(tcp, limits, builder, tx, cancel).await });
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// TCP and UDP sockets on the same address. With port 0, a port free for both is picked.
async fn bind_both(addr: SocketAddr) -> Result<(TcpListener, UdpSocket, SocketAddr), InputError> {
    let what = || format!("syslog address {addr} (is the port in use? set --syslog)");
    let mut attempt = 0;
    loop {
        attempt += 1;
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(InputError::io(what()))?;
        let bound = tcp.local_addr().map_err(InputError::io(what()))?;
        match UdpSocket::bind(bound).await {
            Ok(udp) => return Ok((tcp, udp, bound)),
            Err(e) if addr.port() == 0 && attempt < 20 => {
                tracing::debug!(error = %e, port = bound.port(), "UDP port taken; trying another");
            }
            Err(e) => return Err(InputError::io(what())(e)),
        }
    }
}

async fn udp_loop(
    sock: UdpSocket,
    mut b: RecordBuilder,
    tx: mpsc::Sender<InputBatch>,
    cancel: CancellationToken,
) {
    let max = b.spec().max_record_bytes;
    let mut p = SyslogParser::new(max);
    let mut acc = Accumulator::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let first = tokio::select! {
            _ = cancel.cancelled() => return,
            r = sock.recv(&mut buf) => r,
        };
        let now = unix_nanos_now();
        let mut next = Some(first);
        let mut n_read = 0;
        while let Some(r) = next.take() {
            match r {
                Ok(n) => {
                    let cut = n.min(max);
                    push_frame(&mut p, &mut b, &mut acc, &buf[..cut], cut < n, now);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!(error = %e, "syslog UDP receive failed");
                    break;
                }
            }
            n_read += 1;
            if n_read < UDP_BURST {
                next = Some(sock.try_recv(&mut buf));
            }
        }
        if !acc.is_empty() && !send(&tx, &cancel, acc.take_batch(None)).await {
            return;
        }
    }
}

/// Hand a batch on; false if the pipeline is gone or we are cancelled.
async fn send(tx: &mpsc::Sender<InputBatch>, cancel: &CancellationToken, b: InputBatch) -> bool {
    tokio::select! {
        biased;
        r = tx.send(b) => r.is_ok(),
        _ = cancel.cancelled() => false,
    }
}

async fn tcp_accept(
    listener: TcpListener,
    limits: ConnLimits,
    builder: RecordBuilder,
    tx: mpsc::Sender<InputBatch>,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut refused = WarnEvery::new(std::time::Duration::from_secs(1));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => r,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "syslog TCP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if let Some(more) = refused.due(std::time::Instant::now()) {
                tracing::warn!(%peer, limit = limits.max_connections, refused_since_last_warning = more,
                    "too many syslog TCP connections; closing new ones (raise syslog-max-connections if they are honest)");
            }
            continue;
        };
        let (b, tx, c) = (builder.clone(), tx.clone(), cancel.clone());
        conns.spawn(async move {
            tcp_conn(stream, peer, limits.idle_timeout, b, tx, c).await;
            drop(permit);
        });
    }
    conns.shutdown().await;
}

async fn tcp_conn(
    mut stream: TcpStream,
    peer: SocketAddr,
    idle: std::time::Duration,
    mut b: RecordBuilder,
    tx: mpsc::Sender<InputBatch>,
    cancel: CancellationToken,
) {
    let max = b.spec().max_record_bytes;
    let mut p = SyslogParser::new(max);
    let mut framer = TcpFramer::new(max);
    let mut acc = Accumulator::new();
    let mut buf = vec![0u8; TCP_READ];
    loop {
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(idle, stream.read(&mut buf)) => match r {
                Ok(r) => r,
                Err(_) => {
                    // what an unfinished frame held is kept
                    let now = unix_nanos_now();
                    framer.finish(|f, t| push_frame(&mut p, &mut b, &mut acc, f, t, now));
                    if !acc.is_empty() {
                        send(&tx, &cancel, acc.take_batch(None)).await;
                    }
                    tracing::info!(%peer, "syslog TCP connection idle; closing it");
                    return;
                }
            },
        };
        let now = unix_nanos_now();
        let n = match r {
            Ok(0) => {
                framer.finish(|f, t| push_frame(&mut p, &mut b, &mut acc, f, t, now));
                if !acc.is_empty() {
                    send(&tx, &cancel, acc.take_batch(None)).await;
                }
                tracing::debug!(%peer, "syslog TCP connection closed");
                return;
            }
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "syslog TCP connection failed");
                return;
            }
        };
        framer.feed(&buf[..n], |f, t| {
            push_frame(&mut p, &mut b, &mut acc, f, t, now)
        });
        if !acc.is_empty() && !send(&tx, &cancel, acc.take_batch(None)).await {
            return;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
