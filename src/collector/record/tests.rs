use super::*;
use proptest::prelude::*;
use serde_json::Value;

struct Fx {
    _dir: tempfile::TempDir,
    b: RecordBuilder,
}

fn fx(f: impl FnOnce(&mut RecordSpec)) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let seq = SeqAllocator::open(dir.path()).unwrap();
    let mut spec = RecordSpec::new("col-1");
    f(&mut spec);
    let b = RecordBuilder::new(Arc::new(spec), seq).unwrap();
    Fx { _dir: dir, b }
}

const NOW: i64 = 1_700_000_000_123_456_789;

/// Push lines, return (key, raw output line) in order per chunk.
fn build(b: &mut RecordBuilder, tag: &str, lines: &[&[u8]]) -> Vec<(String, String)> {
    let mut acc = Accumulator::new();
    for l in lines {
        b.push_line(tag, l, NOW, &mut acc);
    }
    let records = acc.records();
    let bytes = acc.bytes();
    let chunks = acc.take();
    let mut out = Vec::new();
    let mut total = 0;
    for c in chunks {
        let text = String::from_utf8(c.data.clone()).unwrap();
        assert!(text.ends_with('\n'));
        let ls: Vec<&str> = text.lines().collect();
        assert_eq!(ls.len() as u32, c.count);
        total += c.data.len() as u64;
        for l in ls {
            out.push((c.key.clone(), l.to_owned()));
        }
    }
    assert_eq!(out.len() as u64, records);
    assert_eq!(total, bytes);
    out
}

fn one(b: &mut RecordBuilder, line: &[u8]) -> (String, Value, String) {
    let mut v = build(b, "app", &[line]);
    assert_eq!(v.len(), 1);
    let (k, raw) = v.remove(0);
    let val: Value = serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
    (k, val, raw)
}

#[test]
fn json_line_is_kept_and_metadata_added() {
    let mut f = fx(|s| {
        s.labels = vec![
            ("host".into(), "h1".into()),
            ("cluster".into(), "c\"1".into()),
        ];
        s.stream_key = "{ns}/{app}".parse().unwrap();
    });
    let line = br#"  {"app":"web", "ns" : "prod","host":"mine","n":[1,2,{"x":null}]} "#;
    let (k, v, raw) = one(&mut f.b, line);
    assert_eq!(k, "prod/web");
    assert!(
        raw.starts_with(r#"{"app":"web", "ns" : "prod","host":"mine","n":[1,2,{"x":null}],"_ts":"#)
    );
    assert_eq!(v["_ts"], "2023-11-14T22:13:20.123456789Z");
    assert_eq!(v["_tag"], "app");
    assert_eq!(v["_stream"], "prod/web");
    assert_eq!(v["host"], "mine", "the input wins over a label");
    assert_eq!(v["cluster"], "c\"1");
    let id = v["_id"].as_str().unwrap();
    assert!(id.starts_with("col-1-"), "{id}");
    assert!(v.get("_parse_error").is_none());
    assert_eq!(raw.matches("\"host\"").count(), 1);
}

#[test]
fn ids_are_unique_and_increasing() {
    let mut f = fx(|_| {});
    let out = build(&mut f.b, "t", &[b"a", b"b", b"c"]);
    let ids: Vec<u64> = out
        .iter()
        .map(|(_, l)| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["_id"]
                .as_str()
                .unwrap()
                .rsplit('-')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
}

#[test]
fn empty_object_and_raw_and_auto() {
    let mut f = fx(|_| {});
    let (k, v, raw) = one(&mut f.b, b"{}");
    assert_eq!(k, "app");
    assert!(raw.starts_with("{\"_ts\":"));
    assert_eq!(v.as_object().unwrap().len(), 4);
    let (_, v, _) = one(&mut f.b, b"plain text\r\n");
    assert_eq!(v["message"], "plain text");
    assert!(v.get("_parse_error").is_none(), "auto: not JSON is fine");
    let (_, v, _) = one(&mut f.b, b"{broken");
    assert_eq!(v["message"], "{broken");
    let mut f = fx(|s| s.format = Format::Raw);
    let (_, v, _) = one(&mut f.b, br#"{"a":1}"#);
    assert_eq!(v["message"], r#"{"a":1}"#);
}

#[test]
fn broken_json_under_json_format_is_flagged() {
    let mut f = fx(|s| {
        s.format = Format::Json;
        s.stream_key = "{app}".parse().unwrap();
    });
    let (k, v, _) = one(&mut f.b, br#"{"app":"web","x":}"#);
    assert_eq!(k, "_", "a half-scanned object must not leak fields");
    assert_eq!(v["message"], r#"{"app":"web","x":}"#);
    assert_eq!(v["_parse_error"], true);
    let (_, v, _) = one(&mut f.b, b"[1,2]");
    assert_eq!(v["_parse_error"], true);
}

#[test]
fn whitespace_lines_are_skipped() {
    let mut f = fx(|_| {});
    assert!(build(&mut f.b, "t", &[b"", b"   ", b"\t\r", b"\n"]).is_empty());
}

#[test]
fn truncation_at_char_boundary() {
    let mut f = fx(|s| {
        s.max_record_bytes = 64;
        s.format = Format::Json;
    });
    let mut line = b"{\"m\":\"".to_vec();
    line.extend_from_slice("é".repeat(100).as_bytes());
    line.extend_from_slice(b"\"}");
    let (_, v, _) = one(&mut f.b, &line);
    assert_eq!(v["_truncated"], true);
    assert!(v.get("_parse_error").is_none());
    let m = v["message"].as_str().unwrap();
    assert!(m.len() <= 64 && m.len() >= 62, "{}", m.len());
    assert!(!m.contains('\u{FFFD}'));
    let (_, v, _) = one(&mut f.b, &[b'x'; 65]);
    assert_eq!(v["message"].as_str().unwrap().len(), 64);
    let (_, v, _) = one(&mut f.b, &[b'x'; 64]);
    assert!(v.get("_truncated").is_none());
}

#[test]
fn invalid_utf8_is_replaced_and_flagged() {
    let mut f = fx(|_| {});
    let (_, v, _) = one(&mut f.b, b"{\"a\":\"x\xffy\"}");
    assert_eq!(v["a"], "x\u{FFFD}y");
    assert_eq!(v["_invalid_utf8"], true);
    let (_, v, _) = one(&mut f.b, b"raw \xc3");
    assert_eq!(v["message"], "raw \u{FFFD}");
    assert_eq!(v["_invalid_utf8"], true);
}

#[test]
fn reserved_input_keys_are_renamed() {
    let mut f = fx(|_| {});
    let (_, v, raw) = one(&mut f.b, br#"{"_id":"old","_ts":1,"a":2}"#);
    assert_eq!(v["_orig_id"], "old");
    assert_eq!(v["_orig_ts"], 1);
    assert_eq!(v["a"], 2);
    assert_eq!(raw.matches("\"_id\"").count(), 1);
    let mut f = fx(|s| s.format = Format::Logfmt);
    let (_, v, _) = one(&mut f.b, b"_id=x a=b");
    assert_eq!(v["_orig_id"], "x");
}

#[test]
fn logfmt_records() {
    let mut f = fx(|s| {
        s.format = Format::Logfmt;
        s.stream_key = "{svc}-{tag}".parse().unwrap();
        s.labels = vec![("level".into(), "none".into()), ("dc".into(), "eu".into())];
    });
    let (k, v, _) = one(&mut f.b, br#"level=warn svc=api msg="a \"quoted\" msg" ok"#);
    assert_eq!(k, "api-app");
    assert_eq!(v["level"], "warn");
    assert_eq!(v["msg"], "a \"quoted\" msg");
    assert_eq!(v["ok"], "");
    assert_eq!(v["dc"], "eu");
    let (k, v, _) = one(&mut f.b, b"no pairs here");
    assert_eq!(k, "_-app");
    assert_eq!(v["message"], "no pairs here");
    assert_eq!(v["_parse_error"], true);
}

#[test]
fn regex_records() {
    let mut f = fx(|s| {
        s.format = r"regex:^(?P<level>[A-Z]+) (?:\[(?P<mod>\w+)\] )?(?P<message>.*)$"
            .parse()
            .unwrap();
        s.stream_key = "{level}".parse().unwrap();
    });
    let (k, v, raw) = one(&mut f.b, b"INFO [db] connected \"x\"");
    assert_eq!(k, "INFO");
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["mod"], "db");
    assert_eq!(v["message"], "connected \"x\"");
    assert!(raw.starts_with(r#"{"level":"INFO","mod":"db","message":"#));
    let (_, v, _) = one(&mut f.b, b"WARN no module");
    assert!(v.get("mod").is_none());
    let (k, v, _) = one(&mut f.b, b"lowercase does not match");
    assert_eq!(k, "_");
    assert_eq!(v["_parse_error"], true);
    assert_eq!(v["message"], "lowercase does not match");
}

#[test]
fn raw_message_feeds_template() {
    let mut f = fx(|s| {
        s.format = Format::Raw;
        s.stream_key = "{tag}:{message}".parse().unwrap();
    });
    let (k, _, _) = one(&mut f.b, b"hi");
    assert_eq!(k, "app:hi");
}

#[test]
fn accumulator_groups_by_stream() {
    let mut f = fx(|s| s.stream_key = "{svc}".parse().unwrap());
    let mut acc = Accumulator::new();
    for i in 0..100 {
        let line = format!(r#"{{"svc":"s{}","i":{i}}}"#, i % 4);
        f.b.push_line("t", line.as_bytes(), NOW, &mut acc);
    }
    assert_eq!(acc.records(), 100);
    let batch = acc.take_batch(Some(Delivery::default()));
    assert_eq!(batch.records, 100);
    assert!(batch.delivery.is_some());
    assert_eq!(batch.chunks.len(), 4);
    for c in &batch.chunks {
        assert_eq!(c.count, 25);
        for l in c.data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let v: Value = serde_json::from_slice(l).unwrap();
            assert_eq!(v["svc"].as_str().unwrap(), c.key);
        }
        // order within a stream is input order
        let is: Vec<i64> = c
            .data
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_slice::<Value>(l).unwrap()["i"]
                    .as_i64()
                    .unwrap()
            })
            .collect();
        assert!(is.windows(2).all(|w| w[0] < w[1]));
    }
    assert_eq!(
        batch.bytes,
        batch
            .chunks
            .iter()
            .map(|c| c.data.len() as u64)
            .sum::<u64>()
    );
    assert_eq!(acc.records(), 0);
    assert_eq!(acc.bytes(), 0);
    assert!(acc.take().is_empty());
    f.b.push_line("t", b"{\"svc\":\"z\"}", NOW, &mut acc);
    let b = acc.into_input_batch(None);
    assert_eq!(b.chunks.len(), 1);
    assert_eq!(b.chunks[0].key, "z");
}

#[test]
fn spec_validation_and_labels() {
    assert_eq!(parse_label("a=b=c").unwrap(), ("a".into(), "b=c".into()));
    assert!(parse_label("nokey").is_err());
    assert!(parse_label("=v").is_err());
    let mut s = RecordSpec::new("c");
    s.labels = vec![("_id".into(), "x".into())];
    assert_eq!(s.validate(), Err(SpecError::ReservedLabel("_id".into())));
    s.labels = vec![("a".into(), "x".into()), ("a".into(), "y".into())];
    assert!(matches!(s.validate(), Err(SpecError::DuplicateLabel(_))));
    assert_eq!(
        RecordSpec::new("").validate(),
        Err(SpecError::EmptyCollectorId)
    );
}

#[test]
fn seq_never_repeats_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut all = Vec::new();
    for _ in 0..4 {
        let s = SeqAllocator::open_with_block(dir.path(), 10).unwrap();
        for _ in 0..25 {
            all.push(s.next());
        }
        assert_eq!(s.persist_failures(), 0);
    }
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), all.len());
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "monotonic across restarts"
    );
    // no id used, then restart: still no overlap
    let s = SeqAllocator::open_with_block(dir.path(), 10).unwrap();
    drop(s);
    let s = SeqAllocator::open_with_block(dir.path(), 10).unwrap();
    assert!(s.next() > *all.last().unwrap());
    std::fs::write(dir.path().join("seq"), "garbage").unwrap();
    let e = SeqAllocator::open(dir.path()).unwrap_err().to_string();
    assert!(e.contains("corrupt"), "{e}");
}

#[test]
fn seq_unique_across_threads() {
    let dir = tempfile::tempdir().unwrap();
    let s = SeqAllocator::open_with_block(dir.path(), 100).unwrap();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || (0..2000).map(|_| s.next()).collect::<Vec<u64>>())
        })
        .collect();
    let mut all: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n);
    let persisted: u64 = std::fs::read_to_string(dir.path().join("seq"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(persisted > *all.last().unwrap());
}

proptest! {
    #[test]
    fn prop_json_fields_unchanged(obj in crate::collector::parse::tests::arb_json_object(), pad in "[ \t]{0,2}") {
        let mut f = fx(|s| s.format = Format::Json);
        let text = format!("{pad}{}{pad}", serde_json::to_string(&obj).unwrap());
        let (_, v, raw) = one(&mut f.b, text.as_bytes());
        let inner = text.trim();
        let reserved = obj.as_object().unwrap().keys().any(|k| crate::collector::parse::is_reserved(k));
        if !reserved {
            prop_assert!(raw.starts_with(&inner[..inner.len() - 1]));
        }
        for (k, val) in obj.as_object().unwrap() {
            let name = if crate::collector::parse::is_reserved(k) { format!("_orig{k}") } else { k.clone() };
            prop_assert_eq!(v.get(&name), Some(val));
        }
        prop_assert!(v["_id"].is_string());
        prop_assert!(v.get("_parse_error").is_none());
    }

    #[test]
    fn prop_any_bytes_give_valid_json(line in proptest::collection::vec(any::<u8>(), 1..300), fmt in 0..4usize) {
        let mut f = fx(|s| {
            s.max_record_bytes = 128;
            s.format = match fmt { 0 => Format::Auto, 1 => Format::Json, 2 => Format::Logfmt, _ => Format::Raw };
            s.stream_key = "{a}/{tag}".parse().unwrap();
            s.labels = vec![("a".into(), "b".into())];
        });
        let line: Vec<u8> = line.into_iter().filter(|b| *b != b'\n').collect();
        let out = build(&mut f.b, "t\"", &[&line]);
        let trimmed = line.strip_suffix(b"\r").unwrap_or(&line);
        prop_assert_eq!(out.len(), usize::from(!trimmed.trim_ascii().is_empty()));
        for (k, raw) in out {
            let v: Value = serde_json::from_str(&raw).unwrap();
            prop_assert_eq!(v["_stream"].as_str().unwrap(), k);
            prop_assert_eq!(&v["_tag"], "t\"");
            prop_assert!(v.get("a").is_some());
            prop_assert_eq!(v.get("_truncated").is_some(), trimmed.len() > 128);
            if trimmed.len() <= 128 {
                prop_assert_eq!(v.get("_invalid_utf8").is_some(), std::str::from_utf8(trimmed).is_err());
            }
        }
    }

    #[test]
    fn prop_timestamp_matches_humantime(nanos in 0i64..4_102_444_800_000_000_000) {
        let mut ts = TsCache::default();
        let mut out = Vec::new();
        ts.write(&mut out, nanos);
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(nanos as u64);
        prop_assert_eq!(String::from_utf8(out).unwrap(), humantime::format_rfc3339_nanos(t).to_string());
    }
}

/// Throughput probe (no assertion on speed): `cargo test --release --lib throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput_probe() {
    for (name, fmt, tmpl) in [
        ("json {tag}", Format::Json, "{tag}"),
        ("json {ns}/{app}", Format::Json, "{ns}/{app}"),
        ("logfmt {app}", Format::Logfmt, "{app}"),
        ("raw", Format::Raw, "{tag}"),
    ] {
        let mut f = fx(|s| {
            s.format = fmt;
            s.stream_key = tmpl.parse().unwrap();
            s.labels = vec![
                ("host".into(), "node-1".into()),
                ("cluster".into(), "prod".into()),
            ];
        });
        let lines: Vec<Vec<u8>> = (0..1000)
            .map(|i| {
                if name.starts_with("logfmt") {
                    format!("ts=2024-05-01T12:00:00Z level=info app=app{} ns=prod msg=\"request handled in {i} ms\" path=/api/v1/items/{i} status=200 bytes=1234 user=alice trace=abcdef0123456789", i % 8).into_bytes()
                } else {
                    format!(r#"{{"ts":"2024-05-01T12:00:00.000Z","level":"info","app":"app{}","ns":"prod","msg":"request handled in {i} ms","path":"/api/v1/items/{i}","status":200,"bytes":1234,"user":"alice"}}"#, i % 8).into_bytes()
                }
            })
            .collect();
        let mut acc = Accumulator::new();
        let n = 2_000_000;
        let t0 = std::time::Instant::now();
        for i in 0..n {
            f.b.push_line("app.log", &lines[i % lines.len()], NOW + i as i64, &mut acc);
            if acc.records() >= 1000 {
                drop(acc.take());
            }
        }
        let dt = t0.elapsed();
        println!(
            "{name}: {:.0} lines/s ({} bytes/line in)",
            n as f64 / dt.as_secs_f64(),
            lines[0].len()
        );
    }
}
