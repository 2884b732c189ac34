//! Store tests with temp dirs: group commit, dedupe, restart, sink failures, backpressure.

use super::*;
use crate::aggregator::sink::{FileSink, SinkBatch, SinkError, SinkFuture};
use crate::wire::{self, BatchHeader, StreamChunk};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Instant;

fn batch(collector: &str, id: u64, lines: usize) -> DecodedBatch {
    let mut chunks = Vec::new();
    for s in 0..2 {
        let mut data = Vec::new();
        for i in 0..lines {
            data.extend_from_slice(
                format!("{{\"c\":\"{collector}\",\"b\":{id},\"s\":{s},\"i\":{i}}}\n").as_bytes(),
            );
        }
        chunks.push(StreamChunk {
            key: format!("ns/app{s}"),
            count: lines as u32,
            data,
        });
    }
    let mut payload = Vec::new();
    wire::encode_chunks(&chunks, &mut payload);
    let idx = wire::parse_chunks(&payload).unwrap();
    DecodedBatch {
        header: BatchHeader {
            collector: collector.into(),
            batch_id: id,
            records: 2 * lines as u64,
            raw_len: payload.len() as u64,
            ring_version: 1,
        },
        payload,
        chunks: idx,
    }
}

fn cfg(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.sink_batch_age = Duration::from_millis(20);
    c.sink_batch_bytes = 64 << 10;
    c
}

/// In-memory sink: keeps every line; fails while `fail` is set.
#[derive(Clone, Default)]
struct MemSink {
    name: String,
    lines: Arc<Mutex<Vec<(String, String)>>>,
    fail: Arc<AtomicBool>,
}

impl MemSink {
    fn new(name: &str) -> MemSink {
        MemSink {
            name: name.into(),
            ..Default::default()
        }
    }
    fn count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }
}

impl Sink for MemSink {
    fn name(&self) -> &str {
        &self.name
    }
    fn write(&mut self, batch: Arc<SinkBatch>) -> SinkFuture<'_, ()> {
        Box::pin(async move {
            if self.fail.load(Ordering::SeqCst) {
                return Err(SinkError::Other("test sink is down".into()));
            }
            let mut l = self.lines.lock().unwrap();
            for s in &batch.streams {
                let text = std::str::from_utf8(&s.data).unwrap();
                assert_eq!(text.lines().count() as u64, s.count);
                for line in text.lines() {
                    l.push((s.key.clone(), line.to_string()));
                }
            }
            Ok(())
        })
    }
}

/// A file sink that refuses writes while `closed` is set (to leave records undelivered).
struct GatedFile {
    inner: FileSink,
    closed: Arc<AtomicBool>,
}

impl Sink for GatedFile {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn open(&mut self) -> SinkFuture<'_, Option<u64>> {
        self.inner.open()
    }
    fn write(&mut self, batch: Arc<SinkBatch>) -> SinkFuture<'_, ()> {
        if self.closed.load(Ordering::SeqCst) {
            return Box::pin(std::future::ready(Err(SinkError::Other(
                "gate closed".into(),
            ))));
        }
        self.inner.write(batch)
    }
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// All lines of all files in `dir` (excluding the sink's state file).
fn file_lines(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if name.ends_with(".ndjson") {
            let text = std::fs::read_to_string(e.path()).unwrap();
            out.extend(text.lines().map(String::from));
        }
    }
    out.sort();
    out
}

fn expected_lines(collector: &str, ids: std::ops::Range<u64>, lines: usize) -> Vec<String> {
    let mut out = Vec::new();
    for id in ids {
        let b = batch(collector, id, lines);
        for c in &b.chunks {
            out.extend(
                std::str::from_utf8(b.data(c))
                    .unwrap()
                    .lines()
                    .map(String::from),
            );
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_uses_fewer_fsyncs_than_commits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let sink = FileSink::new(&out).unwrap();
    let store = Store::open(cfg(&tmp.path().join("data")), vec![Box::new(sink)])
        .await
        .unwrap();
    let n = 400u64;
    let mut set = JoinSet::new();
    for i in 0..n {
        let s = store.clone();
        set.spawn(async move { s.commit(batch(&format!("c{}", i % 4), i, 5)).await });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap().unwrap(), CommitOutcome::Committed);
    }
    let st = store.stats();
    assert_eq!(st.committed_batches, n);
    assert_eq!(st.committed_records, n * 10);
    assert!(
        st.fsyncs >= 1 && st.fsyncs < n,
        "fsyncs {} for {n} commits",
        st.fsyncs
    );
    let st = store.shutdown(Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.sinks[0].lag_batches, 0);
    assert_eq!(st.sinks[0].delivered_records, n * 10);
    let mut want = Vec::new();
    for c in 0..4u64 {
        let ids: Vec<u64> = (0..n).filter(|i| i % 4 == c).collect();
        for id in ids {
            want.extend(expected_lines(&format!("c{c}"), id..id + 1, 5));
        }
    }
    want.sort();
    assert_eq!(file_lines(&out), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_is_acknowledged_but_written_once() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let store = Store::open(
        cfg(&tmp.path().join("data")),
        vec![Box::new(FileSink::new(&out).unwrap())],
    )
    .await
    .unwrap();
    assert_eq!(
        store.commit(batch("c", 1, 3)).await.unwrap(),
        CommitOutcome::Committed
    );
    assert_eq!(
        store.commit(batch("c", 1, 3)).await.unwrap(),
        CommitOutcome::Duplicate
    );
    // a retry racing its original inside one group
    let (a, b) = tokio::join!(
        store.commit(batch("c", 2, 3)),
        store.commit(batch("c", 2, 3))
    );
    let mut got = [a.unwrap(), b.unwrap()];
    got.sort_by_key(|o| *o == CommitOutcome::Duplicate);
    assert_eq!(got, [CommitOutcome::Committed, CommitOutcome::Duplicate]);
    // same batch id from another collector is a different batch
    assert_eq!(
        store.commit(batch("d", 1, 3)).await.unwrap(),
        CommitOutcome::Committed
    );
    let st = store.shutdown(Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.duplicates, 2);
    assert_eq!(st.committed_batches, 3);
    let mut want = expected_lines("c", 1..3, 3);
    want.extend(expected_lines("d", 1..2, 3));
    want.sort();
    assert_eq!(file_lines(&out), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_commit_is_rolled_back_and_its_retry_committed_not_deduped() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let data = tmp.path().join("data");
    let store = Store::open(cfg(&data), vec![Box::new(FileSink::new(&out).unwrap())])
        .await
        .unwrap();
    assert_eq!(
        store.commit(batch("c", 1, 3)).await.unwrap(),
        CommitOutcome::Committed
    );
    store.fail_next_commit().await;
    assert!(matches!(
        store.commit(batch("c", 2, 3)).await,
        Err(StoreError::Failed(_))
    ));
    // the store goes on (not poisoned) and the retry is written
    assert_eq!(
        store.commit(batch("c", 2, 3)).await.unwrap(),
        CommitOutcome::Committed
    );
    store.fail_next_commit().await;
    assert!(store.commit(batch("c", 3, 3)).await.is_err());
    store.kill().await;
    // after a restart too, the failed batch's retry is committed, not acknowledged as a duplicate
    let store = Store::open(cfg(&data), vec![Box::new(FileSink::new(&out).unwrap())])
        .await
        .unwrap();
    assert_eq!(
        store.commit(batch("c", 3, 3)).await.unwrap(),
        CommitOutcome::Committed
    );
    let st = store.shutdown(Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.duplicates, 0);
    assert_eq!(file_lines(&out), expected_lines("c", 1..4, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_redelivers_unchecked_records_exactly_once_into_file_sink() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = tmp.path().join("out");
    let closed = Arc::new(AtomicBool::new(false));
    let sink = GatedFile {
        inner: FileSink::new(&out).unwrap(),
        closed: closed.clone(),
    };
    let store = Store::open(cfg(&data), vec![Box::new(sink)]).await.unwrap();
    for id in 0..5 {
        store.commit(batch("c", id, 4)).await.unwrap();
    }
    wait_for("first batches delivered", || {
        store.stats().sinks[0].position == 6
    })
    .await;
    closed.store(true, Ordering::SeqCst);
    for id in 5..10 {
        store.commit(batch("c", id, 4)).await.unwrap();
    }
    wait_for("a refused write", || store.stats().sinks[0].failures > 0).await;
    store.kill().await;
    // The crash also lost the store's checkpoint write, though the file sink has 1..=5.
    write_atomic(&data.join("sinks/file.ckpt"), b"1\n").unwrap();

    let store = Store::open(cfg(&data), vec![Box::new(FileSink::new(&out).unwrap())])
        .await
        .unwrap();
    assert_eq!(
        store.commit(batch("c", 7, 4)).await.unwrap(),
        CommitOutcome::Duplicate
    );
    store.commit(batch("c", 10, 4)).await.unwrap();
    let st = store.shutdown(Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.sinks[0].position, 12);
    assert_eq!(file_lines(&out), expected_lines("c", 0..11, 4));
}

/// Rejects (permanently) every write holding a line that contains `poison`, after failing
/// the first `transient` writes with a retryable error.
struct PickySink {
    inner: MemSink,
    poison: String,
    transient: Arc<AtomicU64>,
}

impl Sink for PickySink {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn write(&mut self, batch: Arc<SinkBatch>) -> SinkFuture<'_, ()> {
        if self.transient.load(Ordering::SeqCst) > 0 {
            self.transient.fetch_sub(1, Ordering::SeqCst);
            return Box::pin(std::future::ready(Err(SinkError::Other("flaky".into()))));
        }
        let bad = batch
            .streams
            .iter()
            .any(|s| String::from_utf8_lossy(&s.data).contains(&self.poison));
        if bad {
            return Box::pin(std::future::ready(Err(SinkError::Rejected(
                "bad record".into(),
            ))));
        }
        self.inner.write(batch)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_records_go_to_the_dead_letter_file_and_the_rest_flows() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mem = MemSink::new("picky");
    let poison = r#""b":2,"s":1,"i":1}"#;
    let sink = PickySink {
        inner: mem.clone(),
        poison: poison.into(),
        transient: Arc::new(AtomicU64::new(2)),
    };
    let store = Store::open(cfg(&data), vec![Box::new(sink)]).await.unwrap();
    for id in 0..6 {
        store.commit(batch("c", id, 3)).await.unwrap();
    }
    let st = store.shutdown(Duration::from_secs(20)).await.unwrap();
    let mut got: Vec<String> = mem
        .lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| l.1.clone())
        .collect();
    got.sort();
    let mut want = expected_lines("c", 0..6, 3);
    want.retain(|l| !l.contains(poison));
    assert_eq!(
        got, want,
        "everything but the poison record is delivered, once"
    );
    assert_eq!(st.sinks[0].dead_letter_records, 1);
    let path = data.join("dead-letter").join("picky.ndjson");
    assert_eq!(st.sinks[0].dead_letter_file, path);
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0]["record"].as_str().unwrap().contains(poison));
    assert_eq!(lines[0]["stream"], "ns/app1");
    assert_eq!(lines[0]["error"], "bad record");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(st.sinks[0].position, 7, "checkpointed past the dead letter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_reset_rewinds_the_file_sink_so_new_records_are_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let data = tmp.path().join("data");
    let store = Store::open(cfg(&data), vec![Box::new(FileSink::new(&out).unwrap())])
        .await
        .unwrap();
    for id in 0..5 {
        store.commit(batch("c", id, 2)).await.unwrap();
    }
    store.shutdown(Duration::from_secs(20)).await.unwrap();
    std::fs::remove_dir_all(&data).unwrap();
    let store = Store::open(cfg(&data), vec![Box::new(FileSink::new(&out).unwrap())])
        .await
        .unwrap();
    for id in 10..13 {
        store.commit(batch("c", id, 2)).await.unwrap();
    }
    let st = store.shutdown(Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.sinks[0].position, 4);
    let mut want = expected_lines("c", 0..5, 2);
    want.extend(expected_lines("c", 10..13, 2));
    want.sort();
    assert_eq!(file_lines(&out), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_restart_redelivers_everything_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let down = MemSink::new("mem");
    down.fail.store(true, Ordering::SeqCst);
    let store = Store::open(cfg(&data), vec![Box::new(down.clone())])
        .await
        .unwrap();
    for id in 0..20 {
        store.commit(batch("c", id, 2)).await.unwrap();
    }
    store.kill().await;
    assert_eq!(down.count(), 0);
    let up = MemSink::new("mem");
    let store = Store::open(cfg(&data), vec![Box::new(up.clone())])
        .await
        .unwrap();
    store.shutdown(Duration::from_secs(20)).await.unwrap();
    let mut got: Vec<String> = up
        .lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| l.1.clone())
        .collect();
    got.sort();
    assert_eq!(got, expected_lines("c", 0..20, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_sink_retries_and_loses_nothing_while_other_sink_flows() {
    let tmp = tempfile::tempdir().unwrap();
    let flaky = MemSink::new("flaky");
    flaky.fail.store(true, Ordering::SeqCst);
    let healthy = MemSink::new("healthy");
    let store = Store::open(
        cfg(&tmp.path().join("data")),
        vec![Box::new(flaky.clone()), Box::new(healthy.clone())],
    )
    .await
    .unwrap();
    for id in 0..30 {
        store.commit(batch("c", id, 3)).await.unwrap();
    }
    wait_for("healthy sink has everything", || healthy.count() == 180).await;
    wait_for("flaky sink failed twice", || {
        store.stats().sinks[0].failures >= 2
    })
    .await;
    assert_eq!(flaky.count(), 0);
    let st = store.stats();
    assert!(st.sinks[0].last_error.as_deref().unwrap().contains("down"));
    assert!(st.buffered_bytes > 0, "undelivered records are buffered");
    flaky.fail.store(false, Ordering::SeqCst);
    wait_for("flaky sink caught up", || flaky.count() == 180).await;
    let st = store.shutdown(Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.buffered_bytes, 0);
    let mut a: Vec<_> = flaky.lines.lock().unwrap().clone();
    let mut b: Vec<_> = healthy.lines.lock().unwrap().clone();
    a.sort();
    b.sort();
    assert_eq!(a, b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_when_a_stuck_sink_fills_the_buffer() {
    let tmp = tempfile::tempdir().unwrap();
    let stuck = MemSink::new("stuck");
    stuck.fail.store(true, Ordering::SeqCst);
    let mut c = cfg(&tmp.path().join("data"));
    c.max_buffer_bytes = 20_000;
    let store = Store::open(c, vec![Box::new(stuck)]).await.unwrap();
    let mut committed = 0;
    let mut full = false;
    for id in 0..1000 {
        match store.commit(batch("c", id, 10)).await {
            Ok(CommitOutcome::Committed) => committed += 1,
            Err(StoreError::Full { buffered, max }) => {
                assert_eq!(max, 20_000);
                assert!(buffered <= max);
                full = true;
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(full && committed > 0, "committed {committed} then full");
    assert!(store.stats().buffered_bytes <= 20_000);
    let err = store
        .shutdown(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::ShutdownTimeout { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_are_deleted_after_delivery_and_dedupe_survives_them() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut c = cfg(&data);
    c.segment_bytes = 4096;
    let sink = MemSink::new("mem");
    sink.fail.store(true, Ordering::SeqCst); // segments pile up while the sink is down
    let store = Store::open(c.clone(), vec![Box::new(sink.clone())])
        .await
        .unwrap();
    for id in 0..60 {
        store.commit(batch("c", id, 4)).await.unwrap();
    }
    assert!(store.stats().segments >= 4, "{:?}", store.stats());
    sink.fail.store(false, Ordering::SeqCst);
    wait_for("delivery and segment deletion", || {
        let st = store.stats();
        st.segments == 1 && st.buffered_bytes == 0
    })
    .await;
    store.shutdown(Duration::from_secs(20)).await.unwrap();
    assert_eq!(wal::list_segments(&data.join("wal")).unwrap().len(), 1);

    let sink2 = MemSink::new("mem");
    let store = Store::open(c, vec![Box::new(sink2.clone())]).await.unwrap();
    // batch 3 lived in a deleted segment: still recognised as a retry
    assert_eq!(
        store.commit(batch("c", 3, 4)).await.unwrap(),
        CommitOutcome::Duplicate
    );
    assert_eq!(
        store.commit(batch("c", 60, 4)).await.unwrap(),
        CommitOutcome::Committed
    );
    store.shutdown(Duration::from_secs(20)).await.unwrap();
    // nothing old was redelivered, the new batch was
    assert_eq!(sink2.count(), 8);
}

#[tokio::test]
async fn rejects_bad_sink_names() {
    let tmp = tempfile::tempdir().unwrap();
    for names in [vec!["../x"], vec!["a", "a"], vec![""]] {
        let sinks: Vec<Box<dyn Sink>> = names
            .iter()
            .map(|n| Box::new(MemSink::new(n)) as Box<dyn Sink>)
            .collect();
        let r = Store::open(cfg(tmp.path()), sinks).await;
        assert!(matches!(r, Err(StoreError::Config(_))));
    }
}

/// Throughput smoke run (prints figures, asserts no timing):
/// `cargo test --lib aggregator::store::tests::throughput -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_smoke() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut c = StoreConfig::new(tmp.path().join("data"));
    c.max_buffer_bytes = 4 << 30;
    let store = Store::open(c, vec![Box::new(FileSink::new(&out).unwrap())])
        .await
        .unwrap();
    // 1 MiB batches: 5000 records of 200 bytes over 50 streams.
    let line = format!("{{\"msg\":\"{}\"}}\n", "x".repeat(188));
    let template = |collector: usize, id: u64| {
        let chunks: Vec<StreamChunk> = (0..50)
            .map(|s| StreamChunk {
                key: format!("ns/app{s}"),
                count: 100,
                data: line.repeat(100).into_bytes(),
            })
            .collect();
        let mut payload = Vec::new();
        wire::encode_chunks(&chunks, &mut payload);
        let idx = wire::parse_chunks(&payload).unwrap();
        DecodedBatch {
            header: BatchHeader {
                collector: format!("c{collector}"),
                batch_id: id,
                records: 5000,
                raw_len: payload.len() as u64,
                ring_version: 1,
            },
            payload,
            chunks: idx,
        }
    };
    let per = 40u64;
    let senders = 8;
    let batches: Vec<Vec<DecodedBatch>> = (0..senders)
        .map(|c| (0..per).map(|i| template(c, i)).collect())
        .collect();
    let start = Instant::now();
    let mut set = JoinSet::new();
    for bs in batches {
        let s = store.clone();
        set.spawn(async move {
            for b in bs {
                s.commit(b).await.unwrap();
            }
        });
    }
    while set.join_next().await.is_some() {}
    let committed = start.elapsed();
    let st = store.shutdown(Duration::from_secs(60)).await.unwrap();
    let total = start.elapsed();
    let records = per * senders as u64 * 5000;
    println!(
        "{records} records: committed in {committed:?} ({:.0} rec/s, {} fsyncs), delivered to file sink in {total:?} ({:.0} rec/s)",
        records as f64 / committed.as_secs_f64(),
        st.fsyncs,
        records as f64 / total.as_secs_f64()
    );
    assert_eq!(st.sinks[0].delivered_records, records);
}
