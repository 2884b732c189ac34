//! End-to-end pipeline tests with the real binary: collector → aggregators over QUIC/mTLS,
//! consistent-hash routing, file sink. Inputs: stdin, tailed files (rotation + restart),
//! bad input; and the drain timeout when no aggregator answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use util::*;

/// Input record number `uid` of stream `svc-<uid % streams>`, with assorted JSON types.
fn input_record(uid: u64, streams: u64) -> Value {
    json!({
        "svc": format!("svc-{:02}", uid % streams),
        "uid": uid,
        "msg": format!("request {uid} done \"quoted\" \\ back/slash ünïcode ✓"),
        "level": match uid % 7 { 0 => "warn", _ => "info" },
        "latency_ms": (uid % 1000) as f64 + 0.5,
        "ok": matches!(uid % 3, 1 | 2),
        "nothing": null,
        "nested": {"a": [1, 2, {"b": uid}], "empty": {}},
    })
}

/// Check that `out` carries every field of `input` unchanged, only `_`-prefixed metadata and
/// `labels` besides, and the standard metadata.
fn assert_fields_unchanged(input: &Value, out: &Value, labels: &[(&str, &str)], collector: &str) {
    let (i, o) = (input.as_object().unwrap(), out.as_object().unwrap());
    for (k, v) in i {
        assert_eq!(
            o.get(k),
            Some(v),
            "field {k:?} changed: in {input} out {out}"
        );
    }
    for (k, v) in o {
        if i.contains_key(k) || k.starts_with('_') {
            continue;
        }
        match labels.iter().find(|(lk, _)| lk == k) {
            Some((_, lv)) => assert_eq!(v.as_str(), Some(*lv), "label {k} in {out}"),
            None => panic!("unexpected field {k:?} in {out}"),
        }
    }
    for (lk, _) in labels {
        assert!(o.contains_key(*lk), "label {lk} missing in {out}");
    }
    for m in ["_ts", "_stream", "_id"] {
        assert!(
            o.get(m).is_some_and(Value::is_string),
            "{m} missing in {out}"
        );
    }
    assert!(
        o["_id"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{collector}-")),
        "_id of {out} does not name the collector"
    );
}

/// Sink contents of several aggregators, keyed by aggregator id.
fn sinks(aggs: &[&Aggregator]) -> HashMap<String, HashMap<String, Vec<Value>>> {
    aggs.iter()
        .map(|a| (a.id.clone(), read_sink(&a.out_dir)))
        .collect()
}

fn total_lines(aggs: &[&Aggregator]) -> usize {
    aggs.iter().map(|a| count_sink_lines(&a.out_dir)).sum()
}

/// Wait until the sinks of `aggs` hold `n` lines (or more: duplicates are found later), then
/// give stragglers a moment so that extra copies would show up too.
fn wait_for_lines(aggs: &[&Aggregator], n: usize, timeout: Duration) {
    let mut last = 0;
    let start = Instant::now();
    while Instant::now() < start + timeout {
        last = total_lines(aggs);
        if last >= n {
            std::thread::sleep(Duration::from_millis(1500));
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the sinks hold {last} of {n} records after {timeout:?}");
}

/// Every uid in `0..n` exactly once over all sinks, every `_id` unique, every record's fields
/// unchanged, each stream in exactly one aggregator's sink: the ring's owner.
fn assert_exactly_once_on_owners(
    aggs: &[&Aggregator],
    n: u64,
    streams: u64,
    labels: &[(&str, &str)],
    collector: &str,
) {
    let all = sinks(aggs);
    let ring = logmesh::ring::Ring::new(aggs.iter().map(|a| (a.id.clone(), 1)));
    let mut seen_uid = vec![0u32; n as usize];
    let mut ids = BTreeSet::new();
    let mut stream_home: HashMap<String, String> = HashMap::new();
    for (agg, sink) in &all {
        for (stream, records) in sink {
            if let Some(other) = stream_home.insert(stream.clone(), agg.clone()) {
                panic!("stream {stream:?} is in the sinks of both {other} and {agg}");
            }
            let owner = ring.owner(stream).unwrap();
            assert_eq!(
                owner,
                agg,
                "stream {stream:?} ({} records) landed on {agg}, the ring says {owner}",
                records.len()
            );
            for r in records {
                let uid = r["uid"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("record without uid: {r}"));
                assert!(uid < n, "unknown uid in {r}");
                seen_uid[uid as usize] += 1;
                assert_fields_unchanged(&input_record(uid, streams), r, labels, collector);
                assert_eq!(r["_stream"].as_str(), r["svc"].as_str(), "stream of {r}");
                let id = r["_id"].as_str().unwrap().to_string();
                assert!(ids.insert(id.clone()), "_id {id} appears twice");
            }
        }
    }
    let missing: Vec<usize> = (0..n as usize).filter(|&u| seen_uid[u] == 0).collect();
    let dup: Vec<usize> = (0..n as usize).filter(|&u| seen_uid[u] > 1).collect();
    assert!(
        missing.is_empty() && dup.is_empty(),
        "{} records missing (first {:?}), {} duplicated (first {:?})",
        missing.len(),
        &missing[..missing.len().min(10)],
        dup.len(),
        &dup[..dup.len().min(10)]
    );
    assert_eq!(stream_home.len() as u64, streams, "number of streams");
}

#[test]
fn stdin_100k_records_48_streams_three_aggregators_exactly_once_on_ring_owner() {
    const N: u64 = 100_000;
    const STREAMS: u64 = 48;
    let mut c = Cluster::new(&[
        ("agg-1", "aggregator"),
        ("agg-2", "aggregator"),
        ("agg-3", "aggregator"),
        ("col-1", "collector"),
    ]);
    let a1 = c.start_aggregator("agg-1", &[]);
    let a2 = c.start_aggregator("agg-2", &[]);
    let a3 = c.start_aggregator("agg-3", &[]);
    let aggs = [&a1, &a2, &a3];

    let mut input = Vec::with_capacity(N as usize * 220);
    for uid in 0..N {
        serde_json::to_writer(&mut input, &input_record(uid, STREAMS)).unwrap();
        input.push(b'\n');
    }
    let mut col = c.start_collector(
        "col-1",
        &static_list(&aggs),
        true,
        &["--stdin", "--stream-key", "{svc}", "--label", "env=it"],
    );
    let writer = feed_stdin(col.proc.take_stdin(), input);
    let status = col.proc.wait_exit(Duration::from_secs(60));
    writer
        .join()
        .unwrap()
        .expect("writing the collector's stdin");
    assert!(
        status.success(),
        "collector exited with {status}:\n{}",
        tail(&col.proc.output(), 30)
    );

    wait_for_lines(&aggs, N as usize, Duration::from_secs(30));
    assert_exactly_once_on_owners(&aggs, N, STREAMS, &[("env", "it")], "col-1");
    // every aggregator got a share (48 streams over 3 nodes), and the metrics add up
    for a in aggs {
        assert!(
            a.metric("logmesh_records_in_total") > 0.0,
            "{} received nothing",
            a.id
        );
    }
    let sum = |name: &str| aggs.iter().map(|a| a.metric(name)).sum::<f64>();
    // (a batch retried after a lost ack is acknowledged again and may count twice here)
    let records_in = sum("logmesh_records_in_total");
    assert!(
        records_in >= N as f64,
        "records_in over all aggregators: {records_in}"
    );
    wait_until(
        Duration::from_secs(10),
        "records_out over all aggregators to reach N",
        || sum("logmesh_records_out_total") == N as f64,
    );
}

/// Append records `range` to `path` (one JSON line each), flushing every 100 lines with a
/// short pause so the tailer sees a live file.
fn append_records(path: &Path, range: std::ops::Range<u64>, streams: u64) {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let mut buf = Vec::new();
    for uid in range {
        serde_json::to_writer(&mut buf, &input_record(uid, streams)).unwrap();
        buf.push(b'\n');
        if uid % 100 == 99 {
            f.write_all(&buf).unwrap();
            buf.clear();
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    f.write_all(&buf).unwrap();
    f.flush().unwrap();
}

#[test]
fn tail_with_rotation_and_collector_restart_delivers_exactly_once() {
    const N: u64 = 20_000;
    const STREAMS: u64 = 8;
    let mut c = Cluster::new(&[
        ("agg-1", "aggregator"),
        ("agg-2", "aggregator"),
        ("col-1", "collector"),
    ]);
    let a1 = c.start_aggregator("agg-1", &[]);
    let a2 = c.start_aggregator("agg-2", &[]);
    let aggs = [&a1, &a2];
    let list = static_list(&aggs);
    let logs = c.path().join("applogs");
    fs::create_dir_all(&logs).unwrap();
    let app = logs.join("app.log");
    let glob = format!("{}/app.log*", logs.display());
    let flags = [
        "--tail",
        &glob,
        "--tag",
        "app",
        "--stream-key",
        "{svc}",
        "--batch-linger",
        "50ms",
    ];
    // records already in the file before the collector starts
    append_records(&app, 0..2_000, STREAMS);
    let mut col = c.start_collector("col-1", &list, false, &flags);
    append_records(&app, 2_000..6_000, STREAMS);
    wait_until(
        Duration::from_secs(30),
        "the first 6000 records to arrive",
        || {
            col.proc.assert_running();
            total_lines(&aggs) >= 6_000
        },
    );
    append_records(&app, 6_000..8_000, STREAMS);
    // rename-and-create rotation
    fs::rename(&app, logs.join("app.log.1")).unwrap();
    append_records(&app, 8_000..11_000, STREAMS);
    // graceful restart while lines keep being written
    std::thread::sleep(Duration::from_millis(300));
    let st = col.proc.stop(Duration::from_secs(40));
    assert!(
        st.success(),
        "collector exit on SIGTERM: {st}\n{}",
        tail(&col.proc.output(), 30)
    );
    append_records(&app, 11_000..14_000, STREAMS);
    drop(col);
    let mut col = c.start_collector("col-1", &list, false, &flags);
    append_records(&app, 14_000..N, STREAMS);

    let start = Instant::now();
    loop {
        col.proc.assert_running();
        let n = total_lines(&aggs);
        if n >= N as usize {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "after the restart only {n} of {N} records arrived"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // let re-reads, if any, show up before judging exactly-once
    std::thread::sleep(Duration::from_secs(2));
    assert_exactly_once_on_owners(&aggs, N, STREAMS, &[], "col-1");
    let st = col.proc.stop(Duration::from_secs(40));
    assert!(st.success(), "collector exit on SIGTERM: {st}");
}

#[test]
fn bad_input_never_crashes_and_never_loses_the_rest() {
    let mut c = Cluster::new(&[("agg-1", "aggregator"), ("col-1", "collector")]);
    let a1 = c.start_aggregator("agg-1", &[]);
    let mut input: Vec<u8> = Vec::new();
    let mut good = 0u64;
    let mut push_good = |input: &mut Vec<u8>, n: u64| {
        for _ in 0..n {
            serde_json::to_writer(&mut *input, &json!({"svc": "good", "uid": good})).unwrap();
            input.push(b'\n');
            good += 1;
        }
    };
    push_good(&mut input, 50);
    input.extend_from_slice(b"{\"svc\":\"bad\",\"uid\":\xff\xfe broken utf8 \xc3\x28}\n");
    push_good(&mut input, 50);
    input.extend_from_slice(b"{\"svc\":\"bad\", \"uid\": 7, broken json\n");
    push_good(&mut input, 50);
    let big = format!("{{\"svc\":\"big\",\"pad\":\"{}\"}}", "x".repeat(10_000));
    input.extend_from_slice(big.as_bytes());
    input.push(b'\n');
    input.extend_from_slice(b"\xff\xff\xff\n");
    input.extend_from_slice(b"\n   \n");
    input.extend_from_slice(&[0u8, 1, 2, b'\n']);
    push_good(&mut input, 50);
    let last_line = b"{\"svc\":\"good\",\"uid\":200,\"final\":true}"; // no trailing newline
    input.extend_from_slice(last_line);

    let mut col = c.start_collector(
        "col-1",
        &static_list(&[&a1]),
        true,
        &[
            "--stdin",
            "--stream-key",
            "{svc}",
            "--max-record-bytes",
            "4096",
        ],
    );
    let w = feed_stdin(col.proc.take_stdin(), input);
    let st = col.proc.wait_exit(Duration::from_secs(30));
    w.join().unwrap().unwrap();
    assert!(
        st.success(),
        "collector: {st}\n{}",
        tail(&col.proc.output(), 30)
    );
    // 201 good + invalid-utf8 + broken json + big + \xff line + control-byte line
    let expect = 201 + 5;
    wait_until(Duration::from_secs(20), "all records in the sink", || {
        count_sink_lines(&a1.out_dir) >= expect
    });
    std::thread::sleep(Duration::from_millis(500));
    let sink = read_sink(&a1.out_dir);
    assert_eq!(total(&sink), expect, "records in the sink: {sink:#?}");

    let goods = &sink["good"];
    let uids: BTreeSet<u64> = goods.iter().map(|r| r["uid"].as_u64().unwrap()).collect();
    assert_eq!(uids, (0..=200).collect(), "good records");
    assert!(goods.iter().any(|r| r["final"] == json!(true)));

    // lines that are not JSON objects (or were cut) have no `svc`: they share stream "_"
    assert!(
        !sink.contains_key("big") && !sink.contains_key("bad"),
        "cut or broken JSON must be kept as raw messages, not parsed: {:?}",
        sink.keys().collect::<Vec<_>>()
    );
    let raw = &sink["_"];
    let truncated: Vec<&Value> = raw
        .iter()
        .filter(|r| r["_truncated"] == json!(true))
        .collect();
    assert_eq!(truncated.len(), 1, "one truncated record: {raw:#?}");
    let msg = truncated[0]["message"].as_str().unwrap();
    assert!(
        msg.len() <= 4096 && big.starts_with(msg) && msg.len() > 1000,
        "truncated message is a prefix of the line, at most 4096 bytes (got {})",
        msg.len()
    );
    let broken: Vec<&Value> = raw
        .iter()
        .filter(|r| r["message"] == json!("{\"svc\":\"bad\", \"uid\": 7, broken json"))
        .collect();
    assert_eq!(
        broken.len(),
        1,
        "broken JSON kept as a raw message: {raw:#?}"
    );
    let invalid: Vec<&Value> = raw
        .iter()
        .filter(|r| r["_invalid_utf8"] == json!(true))
        .collect();
    assert_eq!(
        invalid.len(),
        2,
        "two invalid UTF-8 lines flagged: {raw:#?}"
    );
    assert!(invalid
        .iter()
        .any(|r| r["message"].as_str().unwrap().contains("broken utf8")));
    // the aggregator is still fine
    wait_http_ok(
        &format!("http://{}/healthz", a1.admin),
        Duration::from_secs(5),
    );
    let mut a1 = a1;
    a1.proc.assert_running();
}

#[test]
fn drain_timeout_without_aggregator_exits_nonzero_and_counts_undelivered() {
    let mut c = Cluster::new(&[("agg-1", "aggregator"), ("col-1", "collector")]);
    // nobody listens on this port
    let dead = format!("agg-1@127.0.0.1:{}", free_udp_port());
    let mut input = Vec::new();
    for uid in 0..100u64 {
        serde_json::to_writer(&mut input, &json!({"svc": "s", "uid": uid})).unwrap();
        input.push(b'\n');
    }
    let start = Instant::now();
    let mut col = c.start_collector("col-1", &dead, true, &["--stdin", "--drain-timeout", "2s"]);
    let w = feed_stdin(col.proc.take_stdin(), input);
    let st = col.proc.wait_exit(Duration::from_secs(20));
    let took = start.elapsed();
    w.join().unwrap().unwrap();
    let out = col.proc.output();
    assert!(
        !st.success(),
        "collector should fail, it exited {st}:\n{}",
        tail(&out, 20)
    );
    assert!(
        took < Duration::from_secs(10),
        "collector took {took:?} to give up with --drain-timeout 2s"
    );
    assert!(
        out.contains("100 records were not delivered"),
        "stderr should say 100 records were not delivered:\n{}",
        tail(&out, 20)
    );
}
