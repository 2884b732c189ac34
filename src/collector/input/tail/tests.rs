use super::*;
use crate::collector::record::{RecordSpec, SeqAllocator};
use serde_json::Value;
use std::io::Write;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

struct Running {
    task: JoinHandle<Result<(), InputError>>,
    rx: mpsc::Receiver<InputBatch>,
    cancel: CancellationToken,
    /// Deliveries not acknowledged yet (when the test holds them).
    held: Vec<Delivery>,
}

fn cfg(glob: &Path, data: &Path) -> TailConfig {
    let mut c = TailConfig::new(vec![glob.to_string_lossy().into_owned()], data.to_owned());
    c.poll_interval = Duration::from_millis(20);
    c.rotate_wait = Duration::from_millis(200);
    c.shutdown_grace = Duration::from_millis(500);
    c
}

fn start_with(c: TailConfig, max_record_bytes: usize) -> Running {
    let seq = SeqAllocator::open(&c.data_dir).unwrap();
    let mut spec = RecordSpec::new("c1");
    spec.max_record_bytes = max_record_bytes;
    let b = RecordBuilder::new(Arc::new(spec), seq).unwrap();
    let (tx, rx) = mpsc::channel(8);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(run_tail(c, b, tx, cancel.clone()));
    Running {
        task,
        rx,
        cancel,
        held: Vec::new(),
    }
}

fn start(c: TailConfig) -> Running {
    start_with(c, 1 << 20)
}

impl Running {
    /// Receive until `n` records arrived; returns their parsed values.
    async fn recv(&mut self, n: usize, hold: bool) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            let batch = tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out with {} of {n} records", out.len()))
                .expect("tail input stopped");
            assert!(batch.delivery.is_some());
            for c in &batch.chunks {
                for l in c.data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    out.push(serde_json::from_slice::<Value>(l).unwrap());
                }
            }
            if hold {
                self.held.extend(batch.delivery);
            }
        }
        assert_eq!(out.len(), n, "more records than expected");
        out
    }

    /// Nothing more arrives within `d`.
    async fn quiet(&mut self, d: Duration) {
        if let Ok(Some(b)) = tokio::time::timeout(d, self.rx.recv()).await {
            panic!("unexpected batch of {} records", b.records);
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        let Running { task, rx, held, .. } = self;
        drop(held);
        drop(rx);
        tokio::time::timeout(WAIT, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

fn msgs(v: &[Value]) -> Vec<String> {
    v.iter()
        .map(|v| v["message"].as_str().unwrap().to_owned())
        .collect()
}

fn write_lines(f: &mut std::fs::File, prefix: &str, range: std::ops::Range<usize>) {
    let mut s = String::new();
    for i in range {
        s.push_str(&format!("{prefix}-{i}\n"));
    }
    f.write_all(s.as_bytes()).unwrap();
    f.flush().unwrap();
}

fn names(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}-{i}")).collect()
}

fn append(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

fn saved_offset(data: &Path) -> Option<u64> {
    let text = std::fs::read(data.join(super::super::checkpoint::CHECKPOINT_FILE)).ok()?;
    let v: Value = serde_json::from_slice(&text).unwrap();
    v["files"][0]["offset"].as_u64()
}

#[tokio::test]
async fn follows_appends_and_waits_for_whole_lines() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let mut f = append(&log);
    write_lines(&mut f, "a", 0..100);
    f.write_all(b"partial").unwrap();
    let mut r = start(cfg(&dir.path().join("*.log"), &dir.path().join("data")));
    let got = r.recv(100, false).await;
    assert_eq!(msgs(&got), names("a", 0..100));
    assert_eq!(got[0]["_tag"], "app.log");
    r.quiet(Duration::from_millis(300)).await;
    f.write_all(b"-end\n").unwrap();
    write_lines(&mut f, "b", 0..50);
    let got = msgs(&r.recv(51, false).await);
    assert_eq!(got[0], "partial-end");
    assert_eq!(&got[1..], names("b", 0..50).as_slice());
    // a new file matching the glob is picked up
    let mut g = append(&dir.path().join("other.log"));
    write_lines(&mut g, "o", 0..5);
    let got = r.recv(5, false).await;
    assert_eq!(msgs(&got), names("o", 0..5));
    assert_eq!(got[0]["_tag"], "other.log");
    r.stop().await;
}

#[tokio::test]
async fn overlong_unfinished_line_is_sent_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let mut f = append(&log);
    f.write_all(&[b'x'; 500]).unwrap();
    let mut r = start_with(cfg(&log, &dir.path().join("data")), 100);
    let got = r.recv(1, false).await;
    assert_eq!(got[0]["_truncated"], true);
    assert_eq!(got[0]["message"].as_str().unwrap().len(), 100);
    f.write_all(b"rest of the long line\nnext\n").unwrap();
    assert_eq!(msgs(&r.recv(1, false).await), vec!["next"]);
    r.stop().await;
}

#[tokio::test]
async fn rename_and_create_rotation_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let mut old = append(&log);
    write_lines(&mut old, "old", 0..1000);
    let mut r = start(cfg(&log, &dir.path().join("data")));
    let mut got = r.recv(1000, false).await;
    std::fs::rename(&log, dir.path().join("app.log.1")).unwrap();
    // the writer keeps writing to the renamed file for a while, then reopens
    write_lines(&mut old, "old", 1000..1500);
    let mut new = append(&log);
    write_lines(&mut new, "new", 0..500);
    old.write_all(b"old-last-without-newline").unwrap();
    got.extend(r.recv(1001, false).await);
    let all = msgs(&got);
    let olds: Vec<String> = all
        .iter()
        .filter(|m| m.starts_with("old"))
        .cloned()
        .collect();
    let mut expect = names("old", 0..1500);
    expect.push("old-last-without-newline".into());
    assert_eq!(olds, expect, "the old file read to its end, in order, once");
    let news: Vec<String> = all
        .iter()
        .filter(|m| m.starts_with("new"))
        .cloned()
        .collect();
    assert_eq!(news, names("new", 0..500));
    r.quiet(Duration::from_millis(300)).await;
    r.stop().await;
}

#[tokio::test]
async fn copytruncate_reads_from_start_again() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let mut f = append(&log);
    write_lines(&mut f, "x", 0..100);
    let mut r = start(cfg(&log, &dir.path().join("data")));
    assert_eq!(msgs(&r.recv(100, false).await), names("x", 0..100));
    f.set_len(0).unwrap();
    write_lines(&mut f, "y", 0..10);
    assert_eq!(msgs(&r.recv(10, false).await), names("y", 0..10));
    r.quiet(Duration::from_millis(200)).await;
    r.stop().await;
}

#[tokio::test]
async fn restart_continues_after_delivered_records() {
    let dir = tempfile::tempdir().unwrap();
    let (log, data) = (dir.path().join("app.log"), dir.path().join("data"));
    let mut f = append(&log);
    write_lines(&mut f, "a", 0..300);
    let mut r = start(cfg(&log, &data));
    assert_eq!(msgs(&r.recv(300, false).await), names("a", 0..300));
    r.stop().await;
    assert_eq!(saved_offset(&data), Some(f.metadata().unwrap().len()));
    write_lines(&mut f, "b", 0..200);
    let mut r = start(cfg(&log, &data));
    assert_eq!(
        msgs(&r.recv(200, false).await),
        names("b", 0..200),
        "none repeated"
    );
    r.quiet(Duration::from_millis(300)).await;
    r.stop().await;
}

#[tokio::test]
async fn undelivered_records_are_read_again_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (log, data) = (dir.path().join("app.log"), dir.path().join("data"));
    let mut f = append(&log);
    write_lines(&mut f, "a", 0..300);
    let mut c = cfg(&log, &data);
    c.shutdown_grace = Duration::from_millis(100);
    let mut r = start(c);
    assert_eq!(msgs(&r.recv(300, true).await), names("a", 0..300));
    // cancel while the deliveries are still held: nothing may be marked as read
    r.cancel.cancel();
    tokio::time::timeout(WAIT, &mut r.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(saved_offset(&data), Some(0));
    drop(r);
    write_lines(&mut f, "b", 0..100);
    let mut r = start(cfg(&log, &data));
    let mut expect = names("a", 0..300);
    expect.extend(names("b", 0..100));
    assert_eq!(msgs(&r.recv(400, false).await), expect, "none skipped");
    r.stop().await;
}

#[tokio::test]
async fn checkpoint_only_advances_past_delivered_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (log, data) = (dir.path().join("app.log"), dir.path().join("data"));
    let mut f = append(&log);
    write_lines(&mut f, "a", 0..100);
    let mut r = start(cfg(&log, &data));
    r.recv(100, true).await;
    let first = std::mem::take(&mut r.held);
    write_lines(&mut f, "b", 0..100);
    r.recv(100, false).await; // delivered at once
                              // saves happen about once a second: give it two chances
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        saved_offset(&data).unwrap_or(0),
        0,
        "the first batch is not delivered yet"
    );
    drop(first);
    let size = f.metadata().unwrap().len();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while saved_offset(&data) != Some(size) {
        assert!(
            std::time::Instant::now() < deadline,
            "checkpoint never advanced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r.stop().await;
}

#[tokio::test]
async fn rejects_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let seq = SeqAllocator::open(dir.path()).unwrap();
    let b = RecordBuilder::new(Arc::new(RecordSpec::new("c")), seq).unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let c = TailConfig::new(vec!["/tmp/[".into()], dir.path().to_owned());
    let e = run_tail(c, b.clone(), tx.clone(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(e, InputError::BadGlob { .. }), "{e}");
    let c = TailConfig::new(vec![], dir.path().to_owned());
    let e = run_tail(c, b, tx, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(e, InputError::NoGlobs), "{e}");
}
