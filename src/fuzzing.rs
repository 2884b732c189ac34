//! Fuzz entry points: each takes arbitrary bytes and drives one decoder that reads what a
//! client, a peer or the disk hands us. Used by the coverage-guided targets in `fuzz/` and
//! by `tests/fuzz_corpus.rs`, which replays their corpus on stable Rust in CI.
//!
//! Not an API. Each entry is a thin wrapper over the decoder's public functions (so it keeps
//! compiling while their internals change) plus cheap invariant checks: a panic here is a
//! bug in the decoder (or a broken invariant), never an expected outcome. Gossip entries
//! live in `discovery::gossip::fuzzing`.

use std::io::Write as _;
use std::path::Path;

use crate::aggregator::wal;
use crate::collector::container::{ContainerDecoder, ContainerFormat, DecodeMode, Decoded};
use crate::collector::input::forward::decode::{ForwardDecoder, Message};
use crate::collector::input::forward::handshake::{self, Handshake};
use crate::collector::input::syslog::{SyslogParser, TcpFramer};
use crate::collector::record::DEFAULT_MAX_RECORD_BYTES;
use crate::collector::spool::{self, Spool};
use crate::wire;

/// Decompressed-size limit of the wire frame target (small so the fuzzer stays fast).
const WIRE_MAX_RAW: usize = 1 << 20;
/// Frame and decompressed limits of the Forward target.
const FORWARD_MAX_FRAME: usize = 1 << 20;
const FORWARD_MAX_DECOMPRESSED: usize = 4 << 20;
/// Shared key, server hostname and nonce of the Forward handshake target (fixed, so the
/// seed corpus can hold a PING with a valid digest).
pub const FORWARD_SHARED_KEY: &str = "fuzz-shared-key";
pub const FORWARD_HOSTNAME: &str = "fuzz-server";
pub const FORWARD_NONCE: &str = "0123456789abcdef0123456789abcdef";
/// Frames decoded from one input at most (each consumes at least one byte anyway).
const MAX_MESSAGES: usize = 4096;

fn assert_json(what: &str, json: &[u8]) {
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(json) {
        panic!(
            "{what} produced invalid JSON ({e}): {:?}",
            String::from_utf8_lossy(json)
        );
    }
}

/// Split `data` into pieces whose sizes follow `step` (1..=256): how a stream may arrive
/// in reads.
fn pieces(data: &[u8], step: u8) -> impl Iterator<Item = &[u8]> {
    let step = usize::from(step).max(1);
    data.chunks(if step == 255 { usize::MAX } else { step })
}

/// Collector → aggregator batch frame, raw chunk payload and acknowledgement decoding.
pub fn wire_frame(data: &[u8]) {
    if let Ok(b) = wire::decode_batch(data, WIRE_MAX_RAW) {
        assert!(b.payload.len() <= WIRE_MAX_RAW, "payload over max_raw");
        let mut total = 0u64;
        for c in &b.chunks {
            std::hint::black_box(b.key(c));
            let d = b.data(c);
            assert_eq!(
                memchr::memchr_iter(b'\n', d).count() as u64,
                u64::from(c.count),
                "chunk line count not as validated"
            );
            total += u64::from(c.count);
        }
        assert_eq!(total, b.header.records, "record total not as validated");
    }
    if let Ok(chunks) = wire::parse_chunks(data) {
        for c in chunks {
            assert!(c.key.end <= data.len() && c.data.end <= data.len());
        }
    }
    if let Ok(ack) = wire::decode_ack(data) {
        // The encoder cuts messages to 1 KiB; shorter ones must round-trip exactly.
        let short = match &ack {
            wire::Ack::Committed => true,
            wire::Ack::Busy(m) | wire::Ack::Rejected(m) => m.len() <= 1024,
        };
        let mut out = Vec::new();
        wire::encode_ack(&ack, &mut out);
        let again = wire::decode_ack(&out);
        assert!(again.is_ok(), "an encoded ack does not decode");
        if short {
            assert_eq!(again.ok(), Some(ack), "ack does not round-trip");
        }
    }
}

/// A Forward-protocol connection: byte 0 holds flags (bit 0: shared-key handshake first),
/// byte 1 the read size, the rest is the stream as received.
pub fn forward_stream(data: &[u8]) {
    let [flags, step, stream @ ..] = data else {
        return;
    };
    let mut dec = ForwardDecoder::new(FORWARD_MAX_FRAME, FORWARD_MAX_DECOMPRESSED);
    let mut hs = (flags & 1 == 1).then(|| {
        let h = Handshake::new(FORWARD_SHARED_KEY, FORWARD_HOSTNAME, FORWARD_NONCE.into());
        std::hint::black_box(h.helo());
        h
    });
    dec.set_expect_ping(hs.is_some());
    let mut messages = 0;
    for piece in pieces(stream, *step) {
        dec.feed(piece);
        loop {
            if messages >= MAX_MESSAGES {
                return;
            }
            messages += 1;
            match dec.next(1_700_000_000_000_000_000) {
                Ok(None) => break,
                Err(_) => return,
                Ok(Some(Message::Ping(ping))) => {
                    let Some(h) = hs.as_mut() else {
                        // PINGs outside the handshake are not returned as pings
                        panic!("PING returned while no handshake was pending");
                    };
                    let pong = h.on_ping(&ping);
                    if !pong.ok {
                        return;
                    }
                    dec.set_expect_ping(false);
                }
                Ok(Some(Message::Events(mut ev))) => {
                    if let Some(h) = &hs {
                        assert!(h.authenticated(), "events returned before the handshake");
                    }
                    assert!(ev.tag.len() <= 4096, "tag over the limit");
                    // a record over the limit comes back cut (the record builder marks it)
                    while let Ok(Some((_, json))) = ev.next_event() {
                        if json.len() <= DEFAULT_MAX_RECORD_BYTES {
                            assert_json("forward decoder", json);
                        }
                    }
                    if let Some(chunk) = ev.chunk {
                        std::hint::black_box(handshake::ack(chunk));
                    }
                }
            }
        }
    }
    assert!(dec.buffered() <= stream.len());
}

/// Syslog over TCP (byte 0: record limit, byte 1: read size) through the framer and the
/// parser; the whole rest is also parsed as one UDP datagram.
pub fn syslog_stream(data: &[u8]) {
    let [limit, step, stream @ ..] = data else {
        return;
    };
    let max = 64 + usize::from(*limit) * 16;
    let mut parser = SyslogParser::new(max);
    let mut parse = |frame: &[u8]| {
        assert!(frame.len() <= max, "framer emitted a frame over its limit");
        std::hint::black_box(parser.parse(frame, 1_700_000_000_000_000_000));
        assert_json("syslog parser", &parser.obj);
    };
    let mut framer = TcpFramer::new(max);
    for piece in pieces(stream, *step) {
        framer.feed(piece, |frame, _| parse(frame));
    }
    framer.finish(|frame, _| parse(frame));
    let mut parser = SyslogParser::new(max);
    std::hint::black_box(parser.parse(stream, 0));
    assert_json("syslog parser", &parser.obj);
}

/// Container log lines (byte 0: format — detect, Docker or CRI — and message limit), one
/// per `\n`, through the decoder and its partial-line joining.
pub fn container_lines(data: &[u8]) {
    let [mode, lines @ ..] = data else {
        return;
    };
    let decode_mode = match mode % 3 {
        0 => DecodeMode::Detect,
        1 => DecodeMode::Fixed(ContainerFormat::Docker),
        _ => DecodeMode::Fixed(ContainerFormat::Cri),
    };
    let max = 1 + usize::from(mode / 3) * 8;
    let mut dec = ContainerDecoder::new(decode_mode, max);
    let check = |msg: &[u8]| assert!(msg.len() <= max, "message over the limit");
    for line in lines.split(|b| *b == b'\n') {
        match dec.push(line) {
            Decoded::Record(r) => check(r.msg),
            Decoded::Held | Decoded::Plain(_) | Decoded::Malformed(_) | Decoded::Blank => {}
        }
        assert!(dec.pending_raw_bytes() <= data.len() as u64 + 1);
    }
    dec.flush(|r| check(r.msg));
    assert!(!dec.has_pending(), "flush left a held message");
}

/// A temp dir for the recovery targets (`$TMPDIR`: put it on tmpfs when fuzzing).
fn temp_dir() -> Option<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("logmesh-fuzz")
        .tempdir()
        .ok()
}

fn write_file(path: &Path, data: &[u8]) -> bool {
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(data))
        .is_ok()
}

/// WAL recovery of one segment holding `data`, then every recovered record read back by a
/// sink cursor; recovery must leave a log that a second recovery finds clean.
pub fn wal_recovery(data: &[u8]) {
    std::hint::black_box(wal::scan_segment(data));
    let Some(tmp) = temp_dir() else {
        return;
    };
    let dir = tmp.path().join("wal");
    if std::fs::create_dir_all(&dir).is_err() || !write_file(&dir.join(wal::segment_name(1)), data)
    {
        return;
    }
    let Ok((w, recovered, _)) = wal::Wal::open(&dir, 1 << 20, false) else {
        return;
    };
    let segments = w.segment_firsts();
    let last = w.next_seq().saturating_sub(1);
    drop(w);
    let mut cursor = wal::WalCursor::new(&dir);
    let mut read = 0usize;
    let mut pos = 1;
    for _ in 0..1024 {
        let Ok(r) = cursor.read(&segments, pos, last, 1 << 20) else {
            break;
        };
        for (seq, batch) in &r.batches {
            assert!(
                *seq >= pos && *seq <= last,
                "cursor returned seq {seq} outside {pos}..={last}"
            );
            std::hint::black_box(batch);
            pos = seq + 1;
            read += 1;
        }
        if r.at_end || r.batches.is_empty() {
            break;
        }
    }
    assert!(
        read <= recovered.len(),
        "cursor read more records than recovery found"
    );
    let Ok((_, again, report)) = wal::Wal::open(&dir, 1 << 20, false) else {
        panic!("WAL recovery left a log that does not open again");
    };
    assert_eq!(again, recovered, "second recovery found other records");
    assert_eq!(report.truncated_tails, 0, "second recovery truncated again");
}

/// Spool recovery of one segment holding `data`; every recovered frame must read back
/// from disk as recovered, and a second recovery must find the same.
pub fn spool_recovery(data: &[u8]) {
    std::hint::black_box(spool::scan(data));
    let Some(tmp) = temp_dir() else {
        return;
    };
    let dir = tmp.path().join("spool");
    if std::fs::create_dir_all(&dir).is_err()
        || !write_file(&dir.join(format!("{:020}.spool", 1)), data)
    {
        return;
    }
    let Ok((s, recovered)) = Spool::open(&dir, 1 << 30, 1 << 20) else {
        return;
    };
    for (id, frame) in &recovered {
        match s.read(*id) {
            Ok(back) => assert_eq!(&back, frame, "spooled frame reads back differently"),
            Err(e) => panic!("recovered spool entry does not read back: {e}"),
        }
    }
    drop(s);
    let Ok((_, again)) = Spool::open(&dir, 1 << 30, 1 << 20) else {
        panic!("spool recovery left a spool that does not open again");
    };
    assert_eq!(again, recovered, "second recovery found other frames");
}

/// Run `target`'s entry point on `data`; false for an unknown target name.
pub fn run(target: &str, data: &[u8]) -> bool {
    match target {
        "wire_frame" => wire_frame(data),
        "forward" => forward_stream(data),
        "syslog" => syslog_stream(data),
        "container" => container_lines(data),
        "wal_recovery" => wal_recovery(data),
        "spool_recovery" => spool_recovery(data),
        "gossip_packet" => discovery::gossip::fuzzing::gossip_packets(data),
        "gossip_record" => discovery::gossip::fuzzing::member_record(data),
        _ => return false,
    }
    true
}

/// Every target name [`run`] knows.
pub const TARGETS: [&str; 8] = [
    "wire_frame",
    "forward",
    "syslog",
    "container",
    "wal_recovery",
    "spool_recovery",
    "gossip_packet",
    "gossip_record",
];

// ---------------------------------------------------------------------------------------
// Seed corpus

/// Named seed inputs of one target.
type Seeds = Vec<(String, Vec<u8>)>;

fn mp(v: &rmpv::Value) -> Vec<u8> {
    let mut out = Vec::new();
    // writing to a Vec cannot fail
    let _ = rmpv::encode::write_value(&mut out, v);
    out
}

fn event_time(sec: u32, nsec: u32) -> rmpv::Value {
    let mut b = sec.to_be_bytes().to_vec();
    b.extend_from_slice(&nsec.to_be_bytes());
    rmpv::Value::Ext(0, b)
}

fn forward_seeds() -> Seeds {
    use rmpv::Value as V;
    let record = || {
        V::Map(vec![
            (V::from("log"), V::from("hello \"world\"\n\u{1}é")),
            (V::from("n"), V::from(-42)),
            (V::from("f"), V::F64(1.5)),
            (V::from("ok"), V::from(true)),
            (V::from("none"), V::Nil),
            (V::from("bin"), V::Binary(vec![0, 159, 255])),
            (
                V::from("nested"),
                V::Array(vec![
                    V::from(1u64 << 63),
                    V::Map(vec![(V::from(7), event_time(1, 2))]),
                ]),
            ),
        ])
    };
    let entry = |t: V| V::Array(vec![t, record()]);
    let entries: Vec<u8> = [
        entry(V::from(1_700_000_000)),
        entry(event_time(1_700_000_001, 5)),
    ]
    .iter()
    .flat_map(mp)
    .collect();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = gz.write_all(&entries);
    let gzipped = gz.finish().unwrap_or_default();
    let chunk = |c: &str| V::Map(vec![(V::from("chunk"), V::from(c))]);
    let frames = [
        (
            "message",
            V::Array(vec![
                V::from("app.web"),
                event_time(1_700_000_000, 1),
                record(),
            ]),
        ),
        (
            "forward",
            V::Array(vec![
                V::from("app.web"),
                V::Array(vec![entry(V::from(1_700_000_000)), entry(event_time(3, 4))]),
                chunk("Y2h1bmsx"),
            ]),
        ),
        (
            "packed",
            V::Array(vec![
                V::from("app.packed"),
                V::Binary(entries.clone()),
                chunk("c2"),
            ]),
        ),
        (
            "compressed",
            V::Array(vec![
                V::from("app.gz"),
                V::Binary(gzipped),
                V::Map(vec![
                    (V::from("compressed"), V::from("gzip")),
                    (V::from("chunk"), V::from("c3")),
                ]),
            ]),
        ),
    ];
    let mut out = Vec::new();
    let mut all = Vec::new();
    for (name, v) in &frames {
        let bytes = mp(v);
        all.extend_from_slice(&bytes);
        out.push((name.to_string(), [&[0u8, 255][..], &bytes].concat()));
    }
    out.push(("all-in-small-reads".into(), [&[0u8, 7][..], &all].concat()));
    // The handshake: a PING with the right digest for the fixed nonce, then events.
    let salt = b"fuzz-salt".to_vec();
    let digest = handshake::digest_hex(
        &salt,
        b"fuzz-client",
        FORWARD_NONCE.as_bytes(),
        FORWARD_SHARED_KEY.as_bytes(),
    );
    let ping = mp(&V::Array(vec![
        V::from("PING"),
        V::from("fuzz-client"),
        V::Binary(salt),
        V::from(digest),
        V::from(""),
        V::from(""),
    ]));
    out.push((
        "handshake".into(),
        [&[1u8, 255][..], &ping, &mp(&frames[1].1)].concat(),
    ));
    out
}

fn wire_seeds() -> Seeds {
    let chunks = [
        wire::StreamChunk {
            key: "app.web".into(),
            count: 2,
            data: b"{\"a\":1}\n{\"b\":2}\n".to_vec(),
        },
        wire::StreamChunk {
            key: "k8s/ns/pod".into(),
            count: 1,
            data: b"{\"log\":\"x\"}\n".to_vec(),
        },
    ];
    let header = wire::BatchHeader {
        collector: "col-1".into(),
        batch_id: 1_700_000_000_000_000_000,
        records: 3,
        raw_len: 0,
        ring_version: 7,
    };
    let mut out = Vec::new();
    let mut frame = Vec::new();
    let mut scratch = Vec::new();
    if wire::encode_batch(&header, &chunks, 1, &mut scratch, &mut frame).is_ok() {
        out.push(("batch".to_string(), frame.clone()));
    }
    let mut payload = Vec::new();
    wire::encode_chunks(&chunks, &mut payload);
    out.push(("payload".to_string(), payload));
    for (name, ack) in [
        ("ack-committed", wire::Ack::Committed),
        ("ack-busy", wire::Ack::Busy("store full".into())),
        ("ack-rejected", wire::Ack::Rejected("bad frame".into())),
    ] {
        let mut a = Vec::new();
        wire::encode_ack(&ack, &mut a);
        out.push((name.to_string(), a));
    }
    out
}

fn wal_seeds() -> Seeds {
    let Some((_, frame)) = wire_seeds().into_iter().find(|(n, _)| n == "batch") else {
        return Vec::new();
    };
    let Ok(batch) = wire::decode_batch(&frame, WIRE_MAX_RAW) else {
        return Vec::new();
    };
    let mut seg = Vec::new();
    for seq in 1..=3 {
        if wal::encode_record(seq, &batch, 1_700_000_000_000, &mut seg).is_err() {
            return Vec::new();
        }
    }
    let one = seg.len() / 3;
    let mut corrupt = seg.clone();
    corrupt[one + wal::HEADER_LEN + 3] ^= 0xff;
    let torn = seg[..seg.len() - 5].to_vec();
    vec![
        ("three-records".into(), seg),
        ("corrupt-middle".into(), corrupt),
        ("torn-tail".into(), torn),
    ]
}

fn spool_seeds() -> Seeds {
    let Some(tmp) = temp_dir() else {
        return Vec::new();
    };
    let dir = tmp.path().join("spool");
    let frames: Vec<Vec<u8>> = wire_seeds().into_iter().map(|(_, f)| f).take(2).collect();
    let Ok((mut s, _)) = Spool::open(&dir, 1 << 30, 1 << 20) else {
        return Vec::new();
    };
    let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    if s.append(&refs).is_err() {
        return Vec::new();
    }
    drop(s);
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            if let Ok(bytes) = std::fs::read(e.path()) {
                out.push(("two-frames".to_string(), bytes.clone()));
                out.push(("torn-tail".to_string(), bytes[..bytes.len() / 2].to_vec()));
            }
        }
    }
    out
}

fn syslog_seeds() -> Seeds {
    let lines: [(&str, &[u8]); 5] = [
        ("rfc3164", b"<34>Oct 11 22:14:15 mymachine su[123]: 'su root' failed for lonvick on /dev/pts/8\n"),
        ("rfc5424", b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut=\"3\" eventSource=\"Application\" eventID=\"1011\"][x@1 a=\"\\]\"] \xEF\xBB\xBFAn application event log entry\n"),
        ("octet-counted", b"27 <13>1 - - - - - - hello\n9 <14>short"),
        ("no-pri", b"just a line without priority\r\n\x00"),
        ("rfc5424-nil", b"<0>1 2024-02-29T23:59:60.123456+14:00 - app 1 - - \xff\xfe\n"),
    ];
    let mut out: Vec<(String, Vec<u8>)> = lines
        .iter()
        .map(|(n, l)| (n.to_string(), [&[16u8, 255][..], l].concat()))
        .collect();
    let all: Vec<u8> = lines.iter().flat_map(|(_, l)| l.iter().copied()).collect();
    out.push((
        "all-small-limit-small-reads".into(),
        [&[0u8, 5][..], &all].concat(),
    ));
    out
}

fn container_seeds() -> Seeds {
    let docker: &[u8] = b"{\"log\":\"part one \",\"stream\":\"stdout\",\"time\":\"2024-01-01T00:00:00.123456789Z\"}\n\
{\"log\":\"and two\\n\",\"stream\":\"stdout\",\"time\":\"2024-01-01T00:00:01Z\"}\n\
{\"log\":\"err \\u00e9\\\"q\\\"\\n\",\"stream\":\"stderr\",\"time\":\"2024-01-01T00:00:02+01:00\"}\n\
\n\
not json at all\n\
{\"log\":\"held\",\"stream\":\"stderr\",\"time\":\"2024-01-01T00:00:03Z\"}";
    let cri: &[u8] = b"2024-01-01T00:00:00.123456789Z stdout P part one \n\
2024-01-01T00:00:00.2Z stdout F and two\n\
2024-01-01T00:00:01+02:00 stderr F \xc3\xa9\xc3\xa9\xc3\xa9\n\
garbage line\n\
2024-01-01T00:00:02Z stderr P held";
    vec![
        ("docker-detect".into(), [&[3 * 20][..], docker].concat()),
        ("docker-fixed-small".into(), [&[1 + 3][..], docker].concat()),
        ("cri-detect".into(), [&[3 * 20][..], cri].concat()),
        ("cri-fixed-small".into(), [&[2][..], cri].concat()),
    ]
}

/// Valid inputs for each target's seed corpus, made with the real encoders:
/// `(target, name, bytes)`. Captured client bytes (`shared/fixtures`) are added by the
/// corpus writer in `tests/fuzz_corpus.rs`.
pub fn seed_inputs() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let groups: [(&'static str, Seeds); 6] = [
        ("wire_frame", wire_seeds()),
        ("forward", forward_seeds()),
        ("syslog", syslog_seeds()),
        ("container", container_seeds()),
        ("wal_recovery", wal_seeds()),
        ("spool_recovery", spool_seeds()),
    ];
    for (target, seeds) in groups {
        out.extend(seeds.into_iter().map(|(n, b)| (target, n, b)));
    }
    out.extend(discovery::gossip::fuzzing::seed_inputs());
    out
}
