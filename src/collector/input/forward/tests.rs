use std::io::Write as _;

use proptest::prelude::*;
use rmpv::Value;
use serde_json::json;

use super::decode::*;
use super::handshake::{self, digest_hex, Handshake};
use super::*;

const NOW: i64 = 1_700_000_000_123_456_789;

fn enc(v: &Value) -> Vec<u8> {
    let mut b = Vec::new();
    rmpv::encode::write_value(&mut b, v).unwrap();
    b
}

fn s(x: &str) -> Value {
    Value::from(x)
}

fn map(kv: &[(&str, Value)]) -> Value {
    Value::Map(kv.iter().map(|(k, v)| (s(k), v.clone())).collect())
}

fn event_time(sec: u32, nsec: u32) -> Value {
    let mut d = sec.to_be_bytes().to_vec();
    d.extend_from_slice(&nsec.to_be_bytes());
    Value::Ext(0, d)
}

fn rec(i: i64) -> Value {
    map(&[("i", Value::from(i)), ("msg", s("hello"))])
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn chunk_opt(c: &str) -> Value {
    map(&[("chunk", s(c))])
}

/// A frame in each mode, each with records i = base..base+3.
fn frames(base: i64) -> Vec<Vec<u8>> {
    let entries: Vec<Value> = (base..base + 3)
        .map(|i| Value::Array(vec![Value::from(1_700_000_000 + i), rec(i)]))
        .collect();
    let packed: Vec<u8> = entries.iter().flat_map(enc).collect();
    // multi-member gzip: two members concatenated
    let half = enc(&entries[0]);
    let mut z = gzip(&half);
    z.extend(gzip(&packed[half.len()..]));
    vec![
        enc(&Value::Array(vec![
            s("t.msg"),
            event_time(1_700_000_000, 5),
            rec(base),
            chunk_opt("c-msg"),
        ])),
        enc(&Value::Array(vec![
            s("t.fwd"),
            Value::Array(entries.clone()),
            chunk_opt("c-fwd"),
        ])),
        enc(&Value::Array(vec![
            s("t.packed"),
            Value::Binary(packed.clone()),
        ])),
        enc(&Value::Array(vec![
            s("t.gz"),
            Value::Binary(z),
            map(&[("chunk", s("c-gz")), ("compressed", s("gzip"))]),
        ])),
    ]
}

#[derive(Debug, PartialEq)]
struct Out {
    tag: String,
    mode: Mode,
    chunk: Option<String>,
    events: Vec<(i64, serde_json::Value)>,
}

/// Every event of a frame as `(time, JSON text)`.
fn events_of(e: &mut Events<'_>) -> Result<Vec<(i64, Vec<u8>)>, DecodeError> {
    let mut v = Vec::new();
    while let Some((t, j)) = e.next_event()? {
        v.push((t, j.to_vec()));
    }
    Ok(v)
}

fn drain(dec: &mut ForwardDecoder, out: &mut Vec<Out>) -> Result<(), DecodeError> {
    while let Some(m) = dec.next(NOW)? {
        match m {
            Message::Events(mut e) => out.push(Out {
                tag: e.tag.to_owned(),
                mode: e.mode,
                chunk: e.chunk.map(str::to_owned),
                events: events_of(&mut e)?
                    .into_iter()
                    .map(|(t, j)| (t, serde_json::from_slice(&j).unwrap()))
                    .collect(),
            }),
            Message::Ping(_) => panic!("unexpected ping"),
        }
    }
    Ok(())
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Out>, DecodeError> {
    let mut dec = ForwardDecoder::new(1 << 20, 1 << 20);
    dec.feed(bytes);
    let mut out = Vec::new();
    drain(&mut dec, &mut out)?;
    Ok(out)
}

#[test]
fn four_modes() {
    let bytes: Vec<u8> = frames(0).concat();
    let out = decode_all(&bytes).unwrap();
    assert_eq!(out.len(), 4);
    assert_eq!(out[0].mode, Mode::Message);
    assert_eq!(out[0].tag, "t.msg");
    assert_eq!(out[0].chunk.as_deref(), Some("c-msg"));
    assert_eq!(
        out[0].events,
        vec![(1_700_000_000_000_000_005, json!({"i": 0, "msg": "hello"}))]
    );
    assert_eq!(out[1].mode, Mode::Forward);
    assert_eq!(out[1].chunk.as_deref(), Some("c-fwd"));
    assert_eq!(out[2].mode, Mode::PackedForward);
    assert_eq!(out[2].chunk, None);
    assert_eq!(out[3].mode, Mode::CompressedPackedForward);
    assert_eq!(out[3].chunk.as_deref(), Some("c-gz"));
    for o in &out[1..] {
        let want: Vec<_> = (0..3)
            .map(|i| {
                (
                    (1_700_000_000 + i) * 1_000_000_000,
                    json!({"i": i, "msg": "hello"}),
                )
            })
            .collect();
        assert_eq!(o.events, want, "{:?}", o.mode);
    }
}

#[test]
fn times() {
    let f = |t: Value| {
        decode_all(&enc(&Value::Array(vec![s("t"), t, rec(1)]))).map(|o| o[0].events[0].0)
    };
    assert_eq!(f(Value::from(0)).unwrap(), NOW);
    assert_eq!(f(Value::from(2)).unwrap(), 2_000_000_000);
    assert_eq!(f(Value::from(-1)).unwrap(), -1_000_000_000);
    assert_eq!(f(Value::F64(1.5)).unwrap(), 1_500_000_000);
    assert_eq!(f(event_time(3, 7)).unwrap(), 3_000_000_007);
    assert!(matches!(f(s("yesterday")), Err(DecodeError::Protocol(_))));
    assert!(matches!(
        f(Value::Ext(0, vec![1, 2, 3, 4])),
        Err(DecodeError::Protocol(_))
    ));
}

#[test]
fn record_conversion() {
    let record = Value::Map(vec![
        (s("bin"), Value::Binary(b"ok\xff".to_vec())),
        (
            s("nested"),
            map(&[("a", Value::Array(vec![Value::Nil, true.into()]))]),
        ),
        (Value::from(7), s("int key")),
        (s("nan"), Value::F64(f64::NAN)),
        (s("f"), Value::F32(0.5)),
        (s("big"), Value::from(u64::MAX)),
        (s("neg"), Value::from(i64::MIN)),
        (s("ext"), Value::Ext(5, vec![1, 2, 3])),
        (s("quote\"\n"), s("tab\t")),
        (Value::Binary(b"k\xfe".to_vec()), s("v")),
    ]);
    let out = decode_all(&enc(&Value::Array(vec![s("t"), Value::from(1), record]))).unwrap();
    assert_eq!(
        out[0].events[0].1,
        json!({
            "bin": "ok\u{fffd}",
            "nested": {"a": [null, true]},
            "7": "int key",
            "nan": null,
            "f": 0.5,
            "big": u64::MAX,
            "neg": i64::MIN,
            "ext": "AQID",
            "quote\"\n": "tab\t",
            "k\u{fffd}": "v",
        })
    );
}

#[test]
fn nil_records_are_skipped_and_empty_streams_keep_their_chunk() {
    let out = decode_all(&enc(&Value::Array(vec![
        s("t"),
        Value::from(1),
        Value::Nil,
        chunk_opt("c"),
    ])))
    .unwrap();
    assert_eq!(out[0].events.len(), 0);
    assert_eq!(out[0].chunk.as_deref(), Some("c"));
    let out = decode_all(&enc(&Value::Array(vec![
        s("t"),
        Value::Array(vec![]),
        chunk_opt("d"),
    ])))
    .unwrap();
    assert!(out[0].events.is_empty());
    assert_eq!(out[0].chunk.as_deref(), Some("d"));
}

#[test]
fn malformed_frames_are_precise_errors() {
    let err = |b: &[u8]| decode_all(b).unwrap_err();
    assert!(matches!(
        err(&[0xc1]),
        DecodeError::Msgpack { offset: 0, .. }
    ));
    assert!(matches!(
        err(&enc(&map(&[("a", s("b"))]))),
        DecodeError::Protocol(_)
    ));
    // tag not a string
    assert!(matches!(
        err(&enc(&Value::Array(vec![
            Value::from(1),
            Value::from(1),
            rec(1)
        ]))),
        DecodeError::Protocol(_)
    ));
    // record not a map
    assert!(matches!(
        err(&enc(&Value::Array(vec![s("t"), Value::from(1), s("x")]))),
        DecodeError::Protocol(_)
    ));
    // wrong arity
    assert!(matches!(
        err(&enc(&Value::Array(vec![s("t")]))),
        DecodeError::Protocol(_)
    ));
    // bad gzip
    assert!(matches!(
        err(&enc(&Value::Array(vec![
            s("t"),
            Value::Binary(b"not gzip".to_vec()),
            map(&[("compressed", s("gzip"))]),
        ]))),
        DecodeError::Gzip(_)
    ));
    // packed entries cut in the middle
    let entry = enc(&Value::Array(vec![Value::from(1), rec(1)]));
    assert!(matches!(
        err(&enc(&Value::Array(vec![
            s("t"),
            Value::Binary(entry[..entry.len() - 1].to_vec()),
        ]))),
        DecodeError::Protocol(_)
    ));
    // an array32 claiming 4 billion items cannot fit: refused at once, not buffered
    assert!(matches!(
        err(&[0xdd, 0xff, 0xff, 0xff, 0xff]),
        DecodeError::TooLarge { .. }
    ));
    // a str32 over the limit
    assert!(matches!(
        err(&[0x93, 0xdb, 0x7f, 0xff, 0xff, 0xff]),
        DecodeError::TooLarge { .. }
    ));
    // later calls keep failing
    let mut dec = ForwardDecoder::new(1 << 20, 1 << 20);
    dec.feed(&[0xc1]);
    assert!(dec.next(NOW).is_err());
    dec.feed(&frames(0)[0]);
    assert!(matches!(dec.next(NOW), Err(DecodeError::Failed(_))));
}

#[test]
fn decompression_is_bounded() {
    let entry = enc(&Value::Array(vec![
        Value::from(1),
        map(&[("pad", s(&"x".repeat(10_000)))]),
    ]));
    let z = gzip(&entry.repeat(20));
    let frame = enc(&Value::Array(vec![
        s("t"),
        Value::Binary(z),
        map(&[("compressed", s("gzip"))]),
    ]));
    let mut dec = ForwardDecoder::new(1 << 20, 100_000);
    dec.feed(&frame);
    assert!(matches!(
        dec.next(NOW),
        Err(DecodeError::TooLargeDecompressed(100_000))
    ));
}

#[test]
fn truncated_input_waits_for_more() {
    let f = &frames(0)[1];
    let mut dec = ForwardDecoder::new(1 << 20, 1 << 20);
    dec.feed(&f[..f.len() - 1]);
    assert!(dec.next(NOW).unwrap().is_none());
    assert!(dec.next(NOW).unwrap().is_none());
    dec.feed(&f[f.len() - 1..]);
    assert!(matches!(dec.next(NOW).unwrap(), Some(Message::Events(_))));
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn scanner_agrees_with_rmpv() {
    for f in frames(3) {
        assert_eq!(scan_for_tests(&f, usize::MAX).unwrap(), Some(f.len()));
        for cut in 0..f.len() {
            assert_eq!(scan_for_tests(&f[..cut], usize::MAX).unwrap(), None);
        }
    }
}

#[test]
fn handshake_accepts_the_right_key_only() {
    let mut hs = Handshake::new("secret", "collector-1", "nonce123".into());
    let helo = rmpv::decode::read_value(&mut &hs.helo()[..]).unwrap();
    assert_eq!(helo[0].as_str(), Some("HELO"));
    let opts = helo[1].as_map().unwrap();
    let nonce = opts
        .iter()
        .find(|(k, _)| k.as_str() == Some("nonce"))
        .unwrap()
        .1
        .as_str()
        .unwrap();
    assert_eq!(nonce, "nonce123");

    let ping = |key: &str| {
        let d = digest_hex(b"salt", b"client", nonce.as_bytes(), key.as_bytes());
        enc(&Value::Array(vec![
            s("PING"),
            s("client"),
            s("salt"),
            s(&d),
            s(""),
            s(""),
        ]))
    };
    let decode_ping = |b: &[u8]| {
        let mut dec = ForwardDecoder::new(1 << 20, 1 << 20);
        dec.set_expect_ping(true);
        dec.feed(b);
        match dec.next(NOW).unwrap() {
            Some(Message::Ping(p)) => p,
            other => panic!("{other:?}"),
        }
    };
    let bad = hs.on_ping(&decode_ping(&ping("wrong")));
    assert!(!bad.ok);
    assert!(!hs.authenticated());
    let pong = rmpv::decode::read_value(&mut &bad.bytes[..]).unwrap();
    assert_eq!(pong[1].as_bool(), Some(false));

    let good = hs.on_ping(&decode_ping(&ping("secret")));
    assert!(good.ok);
    assert!(hs.authenticated());
    let pong = rmpv::decode::read_value(&mut &good.bytes[..]).unwrap();
    assert_eq!(pong[0].as_str(), Some("PONG"));
    assert_eq!(pong[1].as_bool(), Some(true));
    assert_eq!(pong[3].as_str(), Some("collector-1"));
    assert_eq!(
        pong[4].as_str(),
        Some(digest_hex(b"salt", b"collector-1", b"nonce123", b"secret").as_str())
    );

    // while a PING is expected, events are refused
    let mut dec = ForwardDecoder::new(1 << 20, 1 << 20);
    dec.set_expect_ping(true);
    dec.feed(&frames(0)[0]);
    assert!(matches!(dec.next(NOW), Err(DecodeError::Protocol(_))));
}

#[test]
fn ack_encoding() {
    let v = rmpv::decode::read_value(&mut &handshake::ack("abc")[..]).unwrap();
    assert_eq!(v, map(&[("ack", s("abc"))]));
}

#[test]
fn forward_addresses() {
    let p = |x: &str| parse_forward_addr(x);
    assert_eq!(p(":24225").unwrap(), "0.0.0.0:24225".parse().unwrap());
    assert_eq!(p("127.0.0.1").unwrap(), "127.0.0.1:24224".parse().unwrap());
    assert_eq!(p("127.0.0.1:9").unwrap(), "127.0.0.1:9".parse().unwrap());
    assert_eq!(p("::1").unwrap(), "[::1]:24224".parse().unwrap());
    assert_eq!(p("[::1]:5").unwrap(), "[::1]:5".parse().unwrap());
    assert_eq!(p("localhost").unwrap().port(), 24224);
    assert!(matches!(p(""), Err(AddrError::Empty)));
    assert!(matches!(p("host:x"), Err(AddrError::BadPort { .. })));
}

// ---------------------------------------------------------------- Fluent Bit and bounds

const FB: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/fluent-bit-5.1.1/"
);

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FB}{name}")).unwrap()
}

/// Captured bytes of Fluent Bit 5.1.1 in four configurations decode to the input lines,
/// with Fluent Bit's (empty) metadata dropped.
#[test]
fn fluent_bit_captures_decode_to_their_input() {
    let input: Vec<serde_json::Value> = String::from_utf8(fixture("input.ndjson"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (file, mode, chunk) in [
        ("forward-default.bin", Mode::Forward, false),
        ("forward-ack.bin", Mode::Forward, true),
        ("forward-gzip.bin", Mode::CompressedPackedForward, true),
        ("forward-compat.bin", Mode::Forward, true),
    ] {
        let out = decode_all(&fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(out.len(), 1, "{file}");
        let o = &out[0];
        assert_eq!(
            (o.tag.as_str(), o.mode, o.chunk.is_some()),
            ("app.web", mode, chunk),
            "{file}"
        );
        let recs: Vec<_> = o.events.iter().map(|(_, r)| r.clone()).collect();
        assert_eq!(recs, input, "{file}");
        // EventTime of the capture (2026-12-01T06:06:08Z and a few seconds later)
        for (t, _) in &o.events {
            assert!(
                (0..60).contains(&(t / 1_000_000_000 - 0x6b0e_63d0)),
                "{file}: {t}"
            );
        }
        assert_ne!(o.events[0].0, o.events[1].0, "{file}: nanoseconds kept");
    }
}

#[test]
fn metadata_is_kept_as_meta_when_a_non_empty_map() {
    let meta = map(&[("k", s("v"))]);
    let t = |m: Value| Value::Array(vec![event_time(1_700_000_000, 7), m]);
    let entries = Value::Array(vec![
        Value::Array(vec![t(meta.clone()), map(&[("a", Value::from(1))])]),
        Value::Array(vec![t(Value::Map(vec![])), map(&[("b", Value::from(2))])]),
        Value::Array(vec![t(Value::Nil), map(&[("c", Value::from(3))])]),
        Value::Array(vec![t(meta.clone()), Value::Map(vec![])]),
        Value::Array(vec![t(meta.clone()), Value::Nil]),
    ]);
    let packed: Vec<u8> = match &entries {
        Value::Array(es) => es.iter().flat_map(enc).collect(),
        _ => unreachable!(),
    };
    let want = vec![
        json!({"a": 1, "_meta": {"k": "v"}}),
        json!({"b": 2}),
        json!({"c": 3}),
        json!({"_meta": {"k": "v"}}),
    ];
    for frame in [
        enc(&Value::Array(vec![s("t"), entries.clone()])),
        enc(&Value::Array(vec![s("t"), Value::Binary(packed.clone())])),
        enc(&Value::Array(vec![
            s("t"),
            Value::Binary(gzip(&packed)),
            map(&[("compressed", s("gzip"))]),
        ])),
    ] {
        let out = decode_all(&frame).unwrap();
        let recs: Vec<_> = out[0].events.iter().map(|(_, r)| r.clone()).collect();
        assert_eq!(recs, want);
        assert_eq!(out[0].events[0].0, 1_700_000_000_000_000_007);
    }
    // Message mode with [time, metadata]
    let out = decode_all(&enc(&Value::Array(vec![
        s("t"),
        t(meta),
        map(&[("m", Value::from(1))]),
        chunk_opt("c"),
    ])))
    .unwrap();
    assert_eq!(out[0].mode, Mode::Message);
    assert_eq!(out[0].chunk.as_deref(), Some("c"));
    assert_eq!(out[0].events[0].1, json!({"m": 1, "_meta": {"k": "v"}}));
    // [time] alone or [time, meta, x] is not an event time
    for bad in [
        Value::Array(vec![Value::from(1)]),
        Value::Array(vec![Value::from(1), Value::Nil, Value::Nil]),
    ] {
        let f = enc(&Value::Array(vec![
            s("t"),
            Value::Array(vec![Value::Array(vec![bad, rec(1)])]),
        ]));
        assert!(matches!(decode_all(&f), Err(DecodeError::Protocol(_))));
    }
}

/// `[array32(nil × n), ...]`: the tag is read by its head only, so this is an error at
/// once, not a value tree of n items.
#[test]
fn a_huge_non_string_tag_is_refused_by_its_head() {
    let n: u32 = 2_000_000;
    let mut f = vec![0x92, 0xdd];
    f.extend_from_slice(&n.to_be_bytes());
    f.resize(f.len() + n as usize, 0xc0);
    f.push(0x01);
    let mut dec = ForwardDecoder::new(64 << 20, 1 << 20);
    dec.feed(&f);
    assert!(matches!(dec.next(NOW), Err(DecodeError::Protocol(m)) if m.contains("tag")));
}

#[test]
fn before_the_handshake_frames_are_small_and_ping_fields_bounded() {
    let mut dec = ForwardDecoder::new(64 << 20, 1 << 20);
    dec.set_expect_ping(true);
    // a str32 header claiming 70 KiB: refused before it arrives
    dec.feed(&[0x96, 0xa4, b'P', b'I', b'N', b'G', 0xdb, 0, 1, 0x18, 0]);
    assert!(matches!(
        dec.next(NOW),
        Err(DecodeError::TooLarge {
            max: MAX_PREAUTH_FRAME_BYTES,
            ..
        })
    ));
    // a PING field over 1 KiB, or not a string
    for field in [s(&"h".repeat(2000)), Value::Array(vec![Value::Nil; 100])] {
        let ping = Value::Array(vec![s("PING"), field, s(""), s(""), s(""), s("")]);
        let mut dec = ForwardDecoder::new(64 << 20, 1 << 20);
        dec.set_expect_ping(true);
        dec.feed(&enc(&ping));
        assert!(matches!(dec.next(NOW), Err(DecodeError::Protocol(_))));
    }
    // after the handshake the frame limit is the configured one again
    let mut dec = ForwardDecoder::new(64 << 20, 1 << 20);
    dec.feed(&enc(&Value::Array(vec![
        s("t"),
        Value::from(1),
        map(&[("pad", s(&"x".repeat(100_000)))]),
    ])));
    assert!(matches!(dec.next(NOW), Ok(Some(Message::Events(_)))));
}

#[test]
fn option_maps_are_bounded_in_entries() {
    let big: Vec<(Value, Value)> = (0..65).map(|i| (s(&format!("k{i}")), Value::Nil)).collect();
    let f = enc(&Value::Array(vec![
        s("t"),
        Value::Array(vec![]),
        Value::Map(big),
    ]));
    assert!(matches!(decode_all(&f), Err(DecodeError::Protocol(m)) if m.contains("64 entries")));
    let f = enc(&Value::Array(vec![
        s("t"),
        Value::Array(vec![]),
        map(&[("chunk", s(&"c".repeat(2000)))]),
    ]));
    assert!(matches!(decode_all(&f), Err(DecodeError::Protocol(_))));
}

fn one_record(max_record: usize, record: Value) -> Result<Vec<u8>, DecodeError> {
    let f = enc(&Value::Array(vec![s("t"), Value::from(1), record]));
    let mut dec = ForwardDecoder::new(64 << 20, 1 << 20).with_max_record_bytes(max_record);
    dec.feed(&f);
    match dec.next(NOW)? {
        Some(Message::Events(mut e)) => Ok(events_of(&mut e)?.remove(0).1),
        _ => panic!("no events"),
    }
}

/// A record that transcodes to more than `max_record_bytes` is cut just past it (and its
/// frame still decodes), whatever makes it long.
#[test]
fn transcoding_stops_at_max_record_bytes() {
    let nils = map(&[("k", Value::Array(vec![Value::Nil; 200_000]))]);
    let long_str = map(&[("k", s(&"\u{1}".repeat(200_000)))]);
    let long_key = Value::Map(vec![(Value::Array(vec![Value::Nil; 200_000]), Value::Nil)]);
    for r in [nils, long_str, long_key] {
        let j = one_record(1000, r).unwrap();
        assert!(j.len() > 1000 && j.len() <= 1001 * 6 + 64, "{}", j.len());
    }
    // within the limit: whole and valid
    let j = one_record(1000, rec(1)).unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&j).unwrap(),
        json!({"i": 1, "msg": "hello"})
    );
}

fn nested(depth: usize) -> Value {
    let mut v = Value::Nil;
    for _ in 0..depth {
        v = Value::Array(vec![v]);
    }
    map(&[("k", v)])
}

#[test]
fn nesting_is_bounded_the_same_when_checking_and_transcoding() {
    // the record map is level 0, its value level 1: 64 arrays put the nil at level 65
    assert!(one_record(1 << 20, nested(63)).is_ok());
    assert!(matches!(
        one_record(1 << 20, nested(64)),
        Err(DecodeError::Msgpack { what, .. }) if what.contains("nested")
    ));
    // metadata too
    let f = enc(&Value::Array(vec![
        s("t"),
        Value::Array(vec![Value::Array(vec![
            Value::Array(vec![Value::from(1), nested(64)]),
            rec(1),
        ])]),
    ]));
    assert!(decode_all(&f).is_err());
}

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,40}".prop_map(|x: String| Value::from(x)),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Binary),
        (any::<i8>(), proptest::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(t, d)| Value::Ext(t, d)),
    ];
    leaf.prop_recursive(80, 400, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec((inner.clone(), inner), 0..8).prop_map(Value::Map),
        ]
    })
}

/// Levels below `v` that hold a value.
fn depth_of(v: &Value) -> usize {
    let below = match v {
        Value::Array(a) => a.iter().map(depth_of).max(),
        Value::Map(m) => m.iter().map(|(k, v)| depth_of(k).max(depth_of(v))).max(),
        _ => None,
    };
    below.map_or(0, |d| d + 1)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any record: accepted iff nested at most 64 levels; output bounded by the record
    /// limit (escaping can grow a cut string up to 6×); valid JSON when not cut.
    #[test]
    fn records_are_bounded_in_depth_and_size(v in arb_value(), max in 64usize..4096) {
        let rec = map(&[("v", v.clone())]);
        let r = one_record(max, rec);
        let depth = 1 + depth_of(&v);
        prop_assert_eq!(r.is_ok(), depth <= 64, "depth {}", depth);
        if let Ok(j) = r {
            prop_assert!(j.len() <= 6 * (max + 1) + 2 * depth + 16, "{} > limit {}", j.len(), max);
            if j.len() <= max {
                prop_assert!(serde_json::from_slice::<serde_json::Value>(&j).is_ok());
            }
        }
    }

    /// Headers claiming more items or bytes than the frame limit are refused at once;
    /// smaller claims wait for their bytes (nothing is allocated for the claim).
    #[test]
    fn claimed_counts_and_sizes_are_bounded(marker in prop::sample::select(vec![0xdcu8, 0xdd, 0xde, 0xdf, 0xc6, 0xdb, 0xc9]),
                                           claim in any::<u32>(), max in 16usize..100_000) {
        let mut f = vec![0x92, 0xa1, b't', marker];
        match marker {
            0xdc | 0xde => f.extend_from_slice(&(claim as u16).to_be_bytes()),
            0xc9 => { f.extend_from_slice(&claim.to_be_bytes()); f.push(1); }
            _ => f.extend_from_slice(&claim.to_be_bytes()),
        }
        let mut dec = ForwardDecoder::new(max, max);
        dec.feed(&f);
        match dec.next(NOW) {
            Ok(None) | Err(DecodeError::TooLarge { .. }) | Err(DecodeError::Protocol(_)) => {}
            other => prop_assert!(false, "{:?}", other.map(|_| ())),
        }
        prop_assert!(dec.buffered() == f.len() || dec.next(NOW).is_err());
    }

    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048),
                            cuts in proptest::collection::vec(0usize..2048, 0..8),
                            ping in any::<bool>()) {
        let mut dec = ForwardDecoder::new(4096, 8192);
        dec.set_expect_ping(ping);
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
        cuts.sort();
        let mut last = 0;
        for c in cuts.into_iter().chain([data.len()]) {
            dec.feed(&data[last..c]);
            last = c;
            loop {
                match dec.next(NOW) {
                    Ok(Some(Message::Events(mut e))) => {
                        // a checked frame transcodes without error, to valid JSON
                        for (_, j) in events_of(&mut e).unwrap() {
                            serde_json::from_slice::<serde_json::Value>(&j).unwrap();
                        }
                    }
                    Ok(Some(Message::Ping(_))) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }

    #[test]
    fn mutated_frames_never_panic(idx in 0usize..4, pos in any::<prop::sample::Index>(),
                                  byte in any::<u8>()) {
        let mut f = frames(0)[idx].clone();
        let i = pos.index(f.len());
        f[i] = byte;
        let mut out = Vec::new();
        let mut dec = ForwardDecoder::new(1 << 20, 1 << 20);
        dec.feed(&f);
        let _ = drain(&mut dec, &mut out);
    }

    #[test]
    fn any_split_decodes_the_same(cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12)) {
        let stream: Vec<u8> = (0..3).flat_map(|k| frames(k * 10)).flatten().collect();
        let whole = decode_all(&stream).unwrap();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.index(stream.len())).collect();
        cuts.sort();
        let mut dec = ForwardDecoder::new(1 << 20, 1 << 20);
        let mut out = Vec::new();
        let mut last = 0;
        for c in cuts.into_iter().chain([stream.len()]) {
            dec.feed(&stream[last..c]);
            last = c;
            drain(&mut dec, &mut out).unwrap();
        }
        prop_assert_eq!(out, whole);
    }
}

// ---------------------------------------------------------------- the input over TCP

mod net {
    use super::*;
    use crate::collector::record::{RecordSpec, SeqAllocator};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    type Started = (
        SocketAddr,
        mpsc::Receiver<InputBatch>,
        CancellationToken,
        tempfile::TempDir,
    );

    async fn start(shared_key: Option<&str>) -> Started {
        let mut cfg = ForwardConfig::new("127.0.0.1:0".parse().unwrap(), "c1");
        cfg.shared_key = shared_key.map(str::to_owned);
        start_with(cfg, None).await
    }

    async fn start_with(cfg: ForwardConfig, metrics: Option<Arc<Metrics>>) -> Started {
        let dir = tempfile::tempdir().unwrap();
        let seq = SeqAllocator::open(dir.path()).unwrap();
        let b = RecordBuilder::new(Arc::new(RecordSpec::new("c1")), seq).unwrap();
        let input = ForwardInput::bind(cfg).await.unwrap();
        let addr = input.local_addr();
        let (tx, rx) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        tokio::spawn(input.run(b, tx, cancel.clone(), metrics));
        (addr, rx, cancel, dir)
    }

    async fn recv(rx: &mut mpsc::Receiver<InputBatch>) -> InputBatch {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap()
    }

    fn records(b: &InputBatch) -> Vec<serde_json::Value> {
        b.chunks
            .iter()
            .flat_map(|c| c.data.split(|x| *x == b'\n').filter(|l| !l.is_empty()))
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    async fn read_value<S: tokio::io::AsyncRead + Unpin>(c: &mut S) -> Value {
        let mut buf = Vec::new();
        let mut tmp = [0u8; 1024];
        loop {
            if let Ok(v) = rmpv::decode::read_value(&mut &buf[..]) {
                return v;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut tmp))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "connection closed");
            buf.extend_from_slice(&tmp[..n]);
        }
    }

    #[tokio::test]
    async fn ack_only_after_delivery() {
        let (addr, mut rx, cancel, _dir) = start(None).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&frames(0)[1]).await.unwrap();
        let batch = recv(&mut rx).await;
        let recs = records(&batch);
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0]["_tag"], "t.fwd");
        assert_eq!(recs[0]["msg"], "hello");
        assert_eq!(recs[0]["_ts"], "2023-11-14T22:13:20.000000000Z");
        // not acknowledged while the batch (its Delivery) is alive
        let mut tmp = [0u8; 16];
        assert!(
            tokio::time::timeout(Duration::from_millis(300), c.read(&mut tmp))
                .await
                .is_err(),
            "ack before delivery"
        );
        drop(batch);
        assert_eq!(read_value(&mut c).await, map(&[("ack", s("c-fwd"))]));
        cancel.cancel();
    }

    #[tokio::test]
    async fn garbage_closes_only_its_connection() {
        let (addr, mut rx, cancel, _dir) = start(None).await;
        let mut good = TcpStream::connect(addr).await.unwrap();
        let mut bad = TcpStream::connect(addr).await.unwrap();
        // a complete message, then garbage: the message is kept, the connection closed
        let mut b = frames(0)[2].clone();
        b.extend_from_slice(&[0x93, 0xc1, 0xc1, 0xc1]);
        bad.write_all(&b).await.unwrap();
        let batch = recv(&mut rx).await;
        assert_eq!(records(&batch).len(), 3);
        let mut tmp = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), bad.read(&mut tmp))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "bad connection closed");
        good.write_all(&frames(5)[0]).await.unwrap();
        let batch = recv(&mut rx).await;
        let recs = records(&batch);
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0]["i"], 5);
        drop(batch);
        assert_eq!(read_value(&mut good).await, map(&[("ack", s("c-msg"))]));
        cancel.cancel();
    }

    #[tokio::test]
    async fn shared_key_handshake() {
        let (addr, mut rx, cancel, _dir) = start(Some("k3y")).await;
        for (key, ok) in [("nope", false), ("k3y", true)] {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let helo = read_value(&mut c).await;
            assert_eq!(helo[0].as_str(), Some("HELO"));
            let nonce = helo[1]["nonce"].as_str().unwrap().to_owned();
            let d = digest_hex(b"s", b"me", nonce.as_bytes(), key.as_bytes());
            let ping = Value::Array(vec![s("PING"), s("me"), s("s"), s(&d), s(""), s("")]);
            c.write_all(&enc(&ping)).await.unwrap();
            let pong = read_value(&mut c).await;
            assert_eq!(pong[1].as_bool(), Some(ok));
            if ok {
                assert_eq!(
                    pong[4].as_str().unwrap(),
                    digest_hex(b"s", b"c1", nonce.as_bytes(), b"k3y")
                );
                c.write_all(&frames(0)[0]).await.unwrap();
                assert_eq!(records(&recv(&mut rx).await).len(), 1);
            }
        }
        // events without the handshake: closed, nothing accepted
        let mut c = TcpStream::connect(addr).await.unwrap();
        read_value(&mut c).await;
        c.write_all(&frames(0)[0]).await.unwrap();
        let mut tmp = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut tmp))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(rx.try_recv().is_err());
        cancel.cancel();
    }

    #[tokio::test]
    async fn udp_heartbeat_is_echoed() {
        let (addr, _rx, cancel, _dir) = start(None).await;
        let u = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        u.send_to(b"\0", addr).await.unwrap();
        let mut b = [9u8; 4];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), u.recv_from(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((n, b[0], from), (1, 0, addr));
        cancel.cancel();
    }
}

// ---------------------------------------------------------------- TLS

mod tls_net {
    use super::*;
    use crate::collector::input::forward::tls::{server_config, ForwardTlsError, ForwardTlsFiles};
    use crate::collector::record::{RecordSpec, SeqAllocator};
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::path::Path;
    use std::time::Duration;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_rustls::client::TlsStream;

    /// A self-signed server certificate for "localhost": (cert PEM, key PEM, cert DER).
    fn self_signed() -> (String, String, CertificateDer<'static>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        (
            ck.cert.pem(),
            ck.key_pair.serialize_pem(),
            ck.cert.der().clone(),
        )
    }

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    async fn start_tls(
        files: &ForwardTlsFiles,
    ) -> (
        SocketAddr,
        mpsc::Receiver<InputBatch>,
        CancellationToken,
        Arc<Metrics>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let seq = SeqAllocator::open(dir.path()).unwrap();
        let b = RecordBuilder::new(Arc::new(RecordSpec::new("c1")), seq).unwrap();
        let mut cfg = ForwardConfig::new("127.0.0.1:0".parse().unwrap(), "c1");
        cfg.tls = Some(server_config(files).unwrap());
        let input = ForwardInput::bind(cfg).await.unwrap();
        let addr = input.local_addr();
        let (tx, rx) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        let metrics = Arc::new(Metrics::new());
        tokio::spawn(input.run(b, tx, cancel.clone(), Some(metrics.clone())));
        (addr, rx, cancel, metrics, dir)
    }

    fn client_config(
        trust: CertificateDer<'static>,
        auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trust).unwrap();
        let b = rustls::ClientConfig::builder_with_provider(crate::transport::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        Arc::new(match auth {
            None => b.with_no_client_auth(),
            Some((chain, key)) => b.with_client_auth_cert(chain, key).unwrap(),
        })
    }

    async fn connect(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
        )
        .await
        .unwrap()
        .unwrap()
    }

    async fn recv(rx: &mut mpsc::Receiver<InputBatch>) -> InputBatch {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap()
    }

    fn records(b: &InputBatch) -> Vec<serde_json::Value> {
        b.chunks
            .iter()
            .flat_map(|c| c.data.split(|x| *x == b'\n').filter(|l| !l.is_empty()))
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    async fn read_value<S: AsyncRead + Unpin>(c: &mut S) -> Value {
        let mut buf = Vec::new();
        let mut tmp = [0u8; 1024];
        loop {
            if let Ok(v) = rmpv::decode::read_value(&mut &buf[..]) {
                return v;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut tmp))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "connection closed");
            buf.extend_from_slice(&tmp[..n]);
        }
    }

    /// Reads until the peer closes (EOF or error); panics if it stays open 10 s.
    async fn closed<S: AsyncRead + Unpin>(c: &mut S) {
        let mut tmp = [0u8; 256];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), c.read(&mut tmp))
                .await
                .expect("connection not closed")
            {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // e.g. a TLS alert
            }
        }
    }

    fn tls_errors(m: &Metrics) -> usize {
        m.encode_text()
            .lines()
            .filter(|l| l.starts_with("logmesh_errors_total") && l.contains("forward_tls"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as usize)
            .sum()
    }

    #[tokio::test]
    async fn forward_over_tls_with_ack_and_plaintext_client_rejected() {
        let d = tempfile::tempdir().unwrap();
        let (cert, key, der) = self_signed();
        let files = ForwardTlsFiles {
            cert: write(d.path(), "c.pem", &cert),
            key: write(d.path(), "c.key", &key),
            ca: None,
        };
        let (addr, mut rx, cancel, metrics, _dir) = start_tls(&files).await;
        let ccfg = client_config(der, None);
        // a TLS client connected before the plaintext one
        let mut good = connect(addr, ccfg.clone()).await;
        // plaintext Forward against the TLS port: closed, nothing accepted, counted
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain.write_all(&frames(0)[1]).await.unwrap();
        closed(&mut plain).await;
        assert!(rx.try_recv().is_err(), "plaintext records accepted");
        // the counter is bumped just after the close; give it a moment
        for _ in 0..100 {
            if tls_errors(&metrics) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(tls_errors(&metrics), 1);
        // Forward mode with a chunk over TLS: records arrive, ack after delivery
        good.write_all(&frames(0)[1]).await.unwrap();
        good.flush().await.unwrap();
        let batch = recv(&mut rx).await;
        let recs = records(&batch);
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0]["_tag"], "t.fwd");
        assert_eq!(recs[2]["i"], 2);
        drop(batch);
        assert_eq!(read_value(&mut good).await, map(&[("ack", s("c-fwd"))]));
        // and a client connected after the failure works too
        let mut late = connect(addr, ccfg).await;
        late.write_all(&frames(7)[0]).await.unwrap();
        late.flush().await.unwrap();
        let batch = recv(&mut rx).await;
        assert_eq!(records(&batch)[0]["i"], 7);
        drop(batch);
        assert_eq!(read_value(&mut late).await, map(&[("ack", s("c-msg"))]));
        cancel.cancel();
    }

    #[tokio::test]
    async fn client_certificate_required_with_ca() {
        let d = tempfile::tempdir().unwrap();
        let (cert, key, der) = self_signed();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let cl_key = KeyPair::generate().unwrap();
        let cl = CertificateParams::new(vec!["fluent-bit".to_owned()])
            .unwrap()
            .signed_by(&cl_key, &ca, &ca_key)
            .unwrap();
        let files = ForwardTlsFiles {
            cert: write(d.path(), "c.pem", &cert),
            key: write(d.path(), "c.key", &key),
            ca: Some(write(d.path(), "ca.pem", &ca.pem())),
        };
        let (addr, mut rx, cancel, metrics, _dir) = start_tls(&files).await;
        // without a client certificate: the server rejects the session
        let mut anon = connect(addr, client_config(der.clone(), None)).await;
        let _ = anon.write_all(&frames(0)[0]).await;
        let _ = anon.flush().await;
        closed(&mut anon).await;
        assert!(rx.try_recv().is_err());
        for _ in 0..100 {
            if tls_errors(&metrics) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(tls_errors(&metrics), 1);
        // with one issued by the CA: accepted
        let key_der = PrivateKeyDer::try_from(cl_key.serialize_der()).unwrap();
        let auth = Some((vec![cl.der().clone()], key_der));
        let mut c = connect(addr, client_config(der, auth)).await;
        c.write_all(&frames(3)[0]).await.unwrap();
        c.flush().await.unwrap();
        let batch = recv(&mut rx).await;
        assert_eq!(records(&batch)[0]["i"], 3);
        drop(batch);
        assert_eq!(read_value(&mut c).await, map(&[("ack", s("c-msg"))]));
        cancel.cancel();
    }

    #[test]
    fn bad_files_name_the_key() {
        let d = tempfile::tempdir().unwrap();
        let (cert, key, _) = self_signed();
        let (_, other_key, _) = self_signed();
        let cert_p = write(d.path(), "c.pem", &cert);
        let key_p = write(d.path(), "c.key", &key);
        let files = |cert: &Path, key: &Path, ca: Option<&Path>| ForwardTlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            ca: ca.map(Path::to_owned),
        };
        assert!(server_config(&files(&cert_p, &key_p, None)).is_ok());
        let missing = d.path().join("nope.pem");
        let e = server_config(&files(&missing, &key_p, None)).unwrap_err();
        assert!(matches!(e, ForwardTlsError::Missing { .. }), "{e}");
        assert_eq!(e.key(), "forward-tls-cert");
        let e = server_config(&files(&cert_p, &missing, None)).unwrap_err();
        assert_eq!(e.key(), "forward-tls-key");
        let wrong = write(d.path(), "o.key", &other_key);
        let e = server_config(&files(&cert_p, &wrong, None)).unwrap_err();
        assert!(matches!(e, ForwardTlsError::KeyMismatch { .. }), "{e}");
        assert_eq!(e.key(), "forward-tls-key");
        // a key where the certificate belongs, garbage as CA
        let e = server_config(&files(&key_p, &key_p, None)).unwrap_err();
        assert_eq!(e.key(), "forward-tls-cert");
        let junk = write(d.path(), "junk.pem", "not pem");
        let e = server_config(&files(&cert_p, &key_p, Some(&junk))).unwrap_err();
        assert_eq!(e.key(), "forward-tls-ca");
        let e = server_config(&files(&cert_p, &junk, None)).unwrap_err();
        assert_eq!(e.key(), "forward-tls-key");
    }
}
