use super::*;
use proptest::prelude::*;
use std::path::PathBuf;

fn docker_line(log: &str, stream: &str, time: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"log": log, "stream": stream, "time": time})).unwrap()
}

/// Everything the decoder emits for `lines`, then a flush, as (stream, time, msg, truncated).
fn run(dec: &mut ContainerDecoder, lines: &[Vec<u8>]) -> Vec<(Stream, Option<i64>, Vec<u8>, bool)> {
    let mut out = Vec::new();
    for l in lines {
        if let Decoded::Record(r) = dec.push(l) {
            out.push((r.stream, r.time, r.msg.to_vec(), r.truncated));
        }
    }
    dec.flush(|r| out.push((r.stream, r.time, r.msg.to_vec(), r.truncated)));
    out
}

const T0: &str = "2024-05-01T12:00:00.123456789Z";
const T0_NANOS: i64 = 1_714_564_800_123_456_789;

#[test]
fn rfc3339_parses_offsets_fractions_and_rejects_garbage() {
    assert_eq!(parse_rfc3339_nanos(T0.as_bytes()), Some(T0_NANOS));
    assert_eq!(
        parse_rfc3339_nanos(b"2024-05-01T14:00:00.123456789+02:00"),
        Some(T0_NANOS)
    );
    assert_eq!(
        parse_rfc3339_nanos(b"2024-05-01T11:30:00.123456789123-00:30"),
        Some(T0_NANOS)
    );
    assert_eq!(
        parse_rfc3339_nanos(b"1970-01-01T00:00:00Z"),
        Some(0),
        "no fraction"
    );
    assert_eq!(
        parse_rfc3339_nanos(b"1970-01-01 00:00:01.5z"),
        Some(1_500_000_000)
    );
    for bad in [
        &b"2024-13-01T00:00:00Z"[..],
        b"2024-02-30T00:00:00Z",
        b"2024-05-01T12:00:00",
        b"2024-05-01T12:00:00.Z",
        b"2024-05-01T12:00:00Zx",
        b"2024-05-01T25:00:00Z",
        b"2024-05-01T12:00:00+0200",
        b"hello",
        b"",
    ] {
        assert_eq!(
            parse_rfc3339_nanos(bad),
            None,
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(
        parse_rfc3339_nanos(b"2024-02-29T00:00:00Z"),
        Some(days_from_civil(2024, 2, 29) * 86_400 * 1_000_000_000)
    );
}

#[test]
fn docker_and_cri_lines_parse() {
    let mut log = Vec::new();
    let d = parse_docker(&docker_line("hi \"there\"\n", "stderr", T0), &mut log).unwrap();
    assert_eq!(d.stream, Stream::Stderr);
    assert_eq!(d.time, Some(T0_NANOS));
    assert_eq!(log, b"hi \"there\"\n");
    log.clear();
    let with_attrs = br#"{"log":"x","attrs":{"a":"b"},"stream":"stdout","time":"bad"}"#;
    let d = parse_docker(with_attrs, &mut log).unwrap();
    assert_eq!(
        (d.stream, d.time, &log[..]),
        (Stream::Stdout, None, &b"x"[..])
    );
    for bad in [
        &br#"{"log":"x","stream":"other","time":"2024-05-01T12:00:00Z"}"#[..],
        br#"{"stream":"stdout"}"#,
        br#"{"log":1,"stream":"stdout"}"#,
        br#"{"log":"x","stream":"stdout"} trailing"#,
        b"plain",
    ] {
        assert!(parse_docker(bad, &mut Vec::new()).is_none());
    }

    let c = parse_cri(b"2024-05-01T12:00:00.123456789Z stdout P hello world").unwrap();
    assert_eq!(
        c,
        CriLine {
            time: T0_NANOS,
            stream: Stream::Stdout,
            partial: true,
            msg: b"hello world"
        }
    );
    let c = parse_cri(b"2024-05-01T12:00:00Z stderr F:x ").unwrap();
    assert_eq!((c.partial, c.msg), (false, &b""[..]));
    let c = parse_cri(b"2024-05-01T12:00:00Z stderr F").unwrap();
    assert_eq!(c.msg, b"");
    assert!(parse_cri(b"2024-05-01T12:00:00Z stdin F x").is_none());
    assert!(parse_cri(b"2024-05-01T12:00:00Z stdout X x").is_none());
    assert!(parse_cri(b"yesterday stdout F x").is_none());
}

#[test]
fn detection() {
    let mut s = Vec::new();
    assert_eq!(
        detect(&docker_line("a\n", "stdout", T0), &mut s),
        Some(ContainerFormat::Docker)
    );
    assert_eq!(
        detect(b"2024-05-01T12:00:00Z stdout F {\"a\":1}", &mut s),
        Some(ContainerFormat::Cri)
    );
    assert_eq!(detect(br#"{"level":"info","msg":"x"}"#, &mut s), None);
    assert_eq!(detect(b"2024-05-01 plain text log", &mut s), None);

    let mut d = ContainerDecoder::new(DecodeMode::Detect, 1000);
    assert_eq!(d.push(b"  "), Decoded::Blank);
    assert_eq!(d.format(), None);
    assert!(!d.is_plain());
    assert_eq!(d.push(b"hello"), Decoded::Plain(b"hello"));
    assert!(d.is_plain());
    // once plain, a container-looking line stays plain
    let l = docker_line("a\n", "stdout", T0);
    assert_eq!(d.push(&l), Decoded::Plain(&l));
}

#[test]
fn docker_partials_join_and_strip_newline() {
    let mut d = ContainerDecoder::new(DecodeMode::Detect, 1 << 20);
    let lines = vec![
        docker_line("part one ", "stdout", T0),
        docker_line("err whole\n", "stderr", "2024-05-01T12:00:01Z"),
        docker_line("part two\n", "stdout", "2024-05-01T12:00:02Z"),
        docker_line("\n", "stdout", "2024-05-01T12:00:03Z"),
    ];
    let got = run(&mut d, &lines);
    assert_eq!(d.format(), Some(ContainerFormat::Docker));
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].0, Stream::Stderr);
    assert_eq!(got[0].2, b"err whole");
    assert_eq!(got[1].0, Stream::Stdout);
    assert_eq!(
        got[1].1,
        Some(T0_NANOS),
        "a joined record keeps its first time"
    );
    assert_eq!(got[1].2, b"part one part two");
    assert_eq!(
        got[2].2, b"",
        "an empty line is a record (the builder skips it)"
    );
}

#[test]
fn malformed_lines_in_a_container_file() {
    let mut d = ContainerDecoder::new(DecodeMode::Fixed(ContainerFormat::Cri), 100);
    assert_eq!(d.push(b"not cri"), Decoded::Malformed(b"not cri"));
    assert_eq!(d.push(b""), Decoded::Blank);
    let mut d = ContainerDecoder::new(DecodeMode::Detect, 100);
    assert!(matches!(
        d.push(b"2024-05-01T12:00:00Z stdout F ok"),
        Decoded::Record(_)
    ));
    assert_eq!(d.push(b"garbage"), Decoded::Malformed(b"garbage"));
}

#[test]
fn joined_message_is_bounded_and_cut_at_a_char_boundary() {
    let mut d = ContainerDecoder::new(DecodeMode::Fixed(ContainerFormat::Cri), 10);
    let lines: Vec<Vec<u8>> = vec![
        "2024-05-01T12:00:00Z stdout P 123456789".into(),
        "2024-05-01T12:00:00Z stdout P é€more".into(),
        "2024-05-01T12:00:00Z stdout F tail".into(),
        "2024-05-01T12:00:00Z stdout F short".into(),
        "2024-05-01T12:00:00Z stdout F 0123456789abc".into(),
    ];
    let got = run(&mut d, &lines);
    assert_eq!(got.len(), 3);
    assert_eq!(
        got[0].2,
        "123456789".as_bytes(),
        "é would straddle the limit"
    );
    assert!(got[0].3);
    assert_eq!((got[1].2.as_slice(), got[1].3), (&b"short"[..], false));
    assert_eq!((got[2].2.as_slice(), got[2].3), (&b"0123456789"[..], true));
}

#[test]
fn pending_raw_bytes_cover_the_oldest_unfinished_message() {
    let mut d = ContainerDecoder::new(DecodeMode::Fixed(ContainerFormat::Cri), 1000);
    let a = b"2024-05-01T12:00:00Z stdout P aaaa".to_vec();
    let b = b"2024-05-01T12:00:00Z stderr F bbbb".to_vec();
    let c = b"2024-05-01T12:00:00Z stdout F cccc".to_vec();
    assert_eq!(d.push(&a), Decoded::Held);
    assert_eq!(d.pending_raw_bytes(), a.len() as u64 + 1);
    assert!(matches!(d.push(&b), Decoded::Record(_)));
    assert_eq!(d.pending_raw_bytes(), (a.len() + b.len()) as u64 + 2);
    assert!(matches!(d.push(&c), Decoded::Record(r) if r.msg == b"aaaacccc"));
    assert_eq!(d.pending_raw_bytes(), 0);
    assert!(!d.has_pending());
}

#[test]
fn flush_emits_held_parts_oldest_first() {
    let mut d = ContainerDecoder::new(DecodeMode::Fixed(ContainerFormat::Docker), 1000);
    assert_eq!(d.push(&docker_line("e1", "stderr", T0)), Decoded::Held);
    assert_eq!(d.push(&docker_line("o1", "stdout", T0)), Decoded::Held);
    let mut got = Vec::new();
    d.flush(|r| got.push((r.stream, r.msg.to_vec())));
    assert_eq!(
        got,
        vec![
            (Stream::Stderr, b"e1".to_vec()),
            (Stream::Stdout, b"o1".to_vec())
        ]
    );
    assert_eq!(d.pending_raw_bytes(), 0);
}

#[test]
fn kubernetes_metadata_from_paths() {
    let m = K8sMeta::from_path(&PathBuf::from(
        "/var/log/containers/web-7d9f_shop_nginx-sidecar-0123abcd.log",
    ))
    .unwrap();
    assert_eq!(
        m,
        K8sMeta {
            pod: "web-7d9f".into(),
            namespace: "shop".into(),
            container: "nginx-sidecar".into(),
            container_id: "0123abcd".into()
        }
    );
    assert_eq!(m.labels().len(), 4);
    let m = K8sMeta::from_path(&PathBuf::from(
        "/var/log/pods/shop_web-7d9f_0f6c1a2b-uid/nginx/0.log",
    ))
    .unwrap();
    assert_eq!(
        (m.pod.as_str(), m.namespace.as_str(), m.container.as_str()),
        ("web-7d9f", "shop", "nginx")
    );
    assert_eq!(m.labels().len(), 3);
    for p in [
        "/var/log/app_server_x-1.log",
        "/var/log/containers/nounderscores.log",
        "/var/log/containers/a_b_c.log",
        "/var/log/containers/a_b_c-d.txt",
        "/var/log/containers/a__c-d.log",
        "/var/log/containers/a_b_c_d-e.log",
        "/var/log/pods/x/nginx/0.log",
    ] {
        assert_eq!(K8sMeta::from_path(&PathBuf::from(p)), None, "{p}");
    }
}

/// Split `msg` into parts at the given (sorted, in-range) char positions.
fn split_at(msg: &str, cuts: &[usize]) -> Vec<String> {
    let chars: Vec<char> = msg.chars().collect();
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (chars.len() + 1)).collect();
    cuts.sort_unstable();
    let mut parts = Vec::new();
    let mut prev = 0;
    for c in cuts {
        parts.push(chars[prev..c].iter().collect());
        prev = c;
    }
    parts.push(chars[prev..].iter().collect());
    parts
}

proptest! {
    #[test]
    fn docker_joining_over_any_split(
        msg in "[^\n]{0,200}",
        other in "[a-z ]{0,20}",
        cuts in proptest::collection::vec(0usize..400, 0..6),
        interleave in 0usize..8,
    ) {
        let parts = split_at(&msg, &cuts);
        let mut lines = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let log = if last { format!("{p}\n") } else { p.clone() };
            lines.push(docker_line(&log, "stdout", T0));
            if i == interleave {
                lines.push(docker_line(&format!("{other}\n"), "stderr", T0));
            }
        }
        let mut d = ContainerDecoder::new(DecodeMode::Detect, 1 << 20);
        let got = run(&mut d, &lines);
        let out: Vec<_> = got.iter().filter(|r| r.0 == Stream::Stdout).collect();
        prop_assert_eq!(out.len(), 1);
        prop_assert_eq!(&out[0].2, msg.as_bytes());
        prop_assert!(!out[0].3);
        prop_assert_eq!(d.pending_raw_bytes(), 0);
    }

    #[test]
    fn cri_joining_over_any_split(
        msg in "[^\n]{0,200}",
        cuts in proptest::collection::vec(0usize..400, 0..6),
        max in 1usize..300,
    ) {
        let parts = split_at(&msg, &cuts);
        let lines: Vec<Vec<u8>> = parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let tag = if i + 1 == parts.len() { "F" } else { "P" };
                format!("{T0} stderr {tag} {p}").into_bytes()
            })
            .collect();
        let mut d = ContainerDecoder::new(DecodeMode::Detect, max);
        let got = run(&mut d, &lines);
        prop_assert_eq!(d.format(), Some(ContainerFormat::Cri));
        prop_assert_eq!(got.len(), 1);
        let (stream, time, m, truncated) = &got[0];
        prop_assert_eq!(*stream, Stream::Stderr);
        prop_assert_eq!(*time, Some(T0_NANOS));
        prop_assert!(m.len() <= max);
        prop_assert!(std::str::from_utf8(m).is_ok(), "cut inside a char");
        prop_assert!(msg.as_bytes().starts_with(m));
        prop_assert_eq!(*truncated, msg.len() > max);
        if !truncated {
            prop_assert_eq!(m.as_slice(), msg.as_bytes());
        }
    }

    #[test]
    fn detection_never_mistakes_plain_lines(line in "[^\n]{0,120}") {
        // arbitrary text is only detected when it really is one of the formats
        let mut s = Vec::new();
        match detect(line.as_bytes(), &mut s) {
            Some(ContainerFormat::Docker) => prop_assert!(parse_docker(line.as_bytes(), &mut Vec::new()).is_some()),
            Some(ContainerFormat::Cri) => prop_assert!(parse_cri(line.as_bytes()).is_some()),
            None => {}
        }
        let mut d = ContainerDecoder::new(DecodeMode::Detect, 1000);
        let _ = d.push(line.as_bytes());
    }

    #[test]
    fn rfc3339_roundtrips_humantime(secs in 0u64..9_000_000_000, nanos in 0u32..1_000_000_000) {
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos);
        let s = humantime::format_rfc3339_nanos(t).to_string();
        let want = secs as i64 * 1_000_000_000 + i64::from(nanos);
        prop_assert_eq!(parse_rfc3339_nanos(s.as_bytes()), Some(want));
    }

    #[test]
    fn detected_docker_lines_decode(log in "\\PC{0,50}", err in any::<bool>()) {
        let stream = if err { "stderr" } else { "stdout" };
        let line = docker_line(&format!("{log}\n"), stream, T0);
        let mut d = ContainerDecoder::new(DecodeMode::Detect, 1 << 20);
        match d.push(&line) {
            Decoded::Record(r) => {
                prop_assert_eq!(r.msg, log.as_bytes());
                prop_assert_eq!(r.stream.as_str(), stream);
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }
}

#[test]
fn push_auto_adds_extra_fields_visible_to_the_template() {
    use crate::collector::record::{Accumulator, Extra, RecordBuilder, RecordSpec, SeqAllocator};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = RecordSpec::new("c1");
    spec.format = crate::collector::parse::Format::Cri;
    spec.stream_key = "{namespace}/{container}".parse().unwrap();
    spec.labels = vec![
        ("namespace".into(), "static".into()),
        ("env".into(), "prod".into()),
    ];
    let mut b =
        RecordBuilder::new(Arc::new(spec), SeqAllocator::open(dir.path()).unwrap()).unwrap();
    let mut acc = Accumulator::new();
    let fields = [
        ("stream", "stderr"),
        ("namespace", "shop"),
        ("container", "nginx"),
    ];
    let extra = Extra {
        fields: &fields,
        truncated: false,
        parse_error: false,
    };
    assert!(b.push_auto(
        "t",
        br#"{"level":"warn","container":"own"}"#,
        extra,
        T0_NANOS,
        &mut acc
    ));
    assert!(b.push_auto("t", b"plain text", extra, T0_NANOS, &mut acc));
    assert!(!b.push_auto("t", b"  ", extra, T0_NANOS, &mut acc));
    let trunc = Extra {
        truncated: true,
        ..extra
    };
    assert!(b.push_auto("t", b"cut", trunc, T0_NANOS, &mut acc));
    let chunks = acc.take();
    let mut recs = Vec::new();
    for c in &chunks {
        for l in std::str::from_utf8(&c.data).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            // no duplicate keys
            let n_keys = l.matches("\":").count();
            assert_eq!(n_keys, v.as_object().unwrap().len(), "{l}");
            recs.push((c.key.clone(), v));
        }
    }
    assert_eq!(recs.len(), 3);
    let (k, v) = &recs[0];
    assert_eq!(k, "shop/own", "the input's own field wins");
    assert_eq!(v["container"], "own");
    assert_eq!(v["level"], "warn");
    assert_eq!(
        v["namespace"], "shop",
        "an extra field replaces the static label"
    );
    assert_eq!(v["env"], "prod");
    assert_eq!(v["stream"], "stderr");
    assert_eq!(v["_ts"], T0);
    let (k, v) = &recs[1];
    assert_eq!(k, "shop/nginx");
    assert_eq!(v["message"], "plain text");
    assert_eq!(recs[2].1["_truncated"], true);
}
