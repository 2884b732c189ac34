//! Disk faults and resets against the real binary: the collector spool on a full disk, a sink
//! after its aggregator's WAL was removed, and `--overflow drop-oldest` on a small budget.
//!
//! (a) needs root to mount a small tmpfs; without it the test prints why and passes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use util::{free_udp_port, tail, wait_until, Cluster};

/// One NDJSON record `uid` of about 200 bytes that compresses poorly (so the spool fills).
fn record(out: &mut Vec<u8>, uid: u64) {
    let mut x = uid.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut noise = String::with_capacity(160);
    for _ in 0..10 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.push_str(&format!("{x:016x}"));
    }
    writeln!(
        out,
        r#"{{"uid":{uid},"svc":"s{}","noise":"{noise}"}}"#,
        uid % 3
    )
    .unwrap();
}

fn records(range: std::ops::Range<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    for uid in range {
        record(&mut out, uid);
    }
    out
}

/// Distinct uids in a file sink's output.
fn uids(out_dir: &Path) -> HashMap<u64, u32> {
    let mut seen = HashMap::new();
    for recs in util::read_sink(out_dir).values() {
        for r in recs {
            if let Some(u) = r["uid"].as_u64() {
                *seen.entry(u).or_insert(0) += 1;
            }
        }
    }
    seen
}

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// "... (D delivered); S of them are kept in the spool ..." from the collector's exit message.
fn kept_in_spool(output: &str) -> Option<(u64, u64)> {
    let line = output
        .lines()
        .rev()
        .find(|l| l.contains("are kept in the spool"))?;
    let num_before = |pat: &str| -> Option<u64> {
        let head = &line[..line.find(pat)?];
        head.rsplit(|c: char| !c.is_ascii_digit())
            .find(|w| !w.is_empty())?
            .parse()
            .ok()
    };
    Some((num_before(" delivered)")?, num_before(" of them are kept")?))
}

#[test]
fn full_spool_disk_keeps_every_record_it_claims() {
    let mut c = Cluster::new(&[("agg-1", "aggregator"), ("col-1", "collector")]);
    let spool_dir = c.data_dir("col-1");
    let _mnt = match Tmpfs::mount(&spool_dir, "3m") {
        Ok(m) => m,
        Err(e) => {
            println!("SKIPPED: needs a small tmpfs for the collector's data dir: {e}");
            return;
        }
    };
    // most of the disk is taken, so spilling hits ENOSPC part-way through a write
    let filler = spool_dir.join("filler");
    fs::write(&filler, vec![0u8; 2_600_000]).unwrap();
    let port = free_udp_port();
    let list = format!("agg-1@127.0.0.1:{port}"); // down for now
    let flags = [
        "--stdin",
        "--stream-key",
        "{svc}",
        "--buffer-memory-bytes",
        "1048576",
        "--batch-max-bytes",
        "32768",
        "--drain-timeout",
        "3s",
    ];
    let n = 20_000u64;
    let mut col = c.start_collector("col-1", &list, true, &flags);
    let mut stdin = col.proc.take_stdin();
    let (freed_tx, freed_rx) = std::sync::mpsc::channel::<()>();
    // far more than the free space, then (once the filler is gone) the rest
    let writer = std::thread::spawn(move || {
        stdin.write_all(&records(0..12_000)).unwrap();
        let _ = freed_rx.recv_timeout(Duration::from_secs(30));
        stdin.write_all(&records(12_000..n)).unwrap();
    });
    std::thread::sleep(Duration::from_secs(4));
    fs::remove_file(&filler).unwrap();
    freed_tx.send(()).unwrap();
    writer.join().unwrap();
    let st = col.proc.wait_exit(Duration::from_secs(60));
    let out = col.proc.output();
    assert!(!st.success(), "nothing could be delivered: {st}");
    let (delivered, kept) = kept_in_spool(&out)
        .unwrap_or_else(|| panic!("no spool summary in the output:\n{}", tail(&out, 30)));
    println!("collector: {delivered} delivered, {kept} of {n} kept in the spool");
    assert_eq!(delivered, 0);
    assert!(kept > 0, "{}", tail(&out, 30));

    let agg = c.start_aggregator_on("agg-1", Some(port), &[]);
    let mut col = c.start_collector("col-1", &agg.static_entry(), true, &flags[..7]);
    drop(col.proc.take_stdin());
    let st = col.proc.wait_exit(Duration::from_secs(60));
    assert!(
        st.success(),
        "resending the spool: {st}\n{}",
        tail(&col.proc.output(), 30)
    );
    let mut got = 0;
    wait_until(
        Duration::from_secs(20),
        "the spool's records in the sink",
        || {
            got = uids(&agg.out_dir).len() as u64;
            got >= kept
        },
    );
    println!("after the restart: {got} distinct records delivered (claimed kept: {kept})");
    assert!(uids(&agg.out_dir).keys().all(|u| *u < n));
}

#[test]
fn wal_reset_under_a_file_sink_writes_new_records() {
    let mut c = Cluster::new(&[("agg-1", "aggregator"), ("col-1", "collector")]);
    let agg = c.start_aggregator("agg-1", &[]);
    let port = agg.quic.port();
    let send = |c: &mut Cluster, range: std::ops::Range<u64>, list: &str| {
        let mut col = c.start_collector("col-1", list, true, &["--stdin", "--stream-key", "{svc}"]);
        let mut stdin = col.proc.take_stdin();
        stdin.write_all(&records(range)).unwrap();
        drop(stdin);
        let st = col.proc.wait_exit(Duration::from_secs(60));
        assert!(
            st.success(),
            "collector: {st}\n{}",
            tail(&col.proc.output(), 30)
        );
    };
    let list = agg.static_entry();
    send(&mut c, 0..1_000, &list);
    wait_until(
        Duration::from_secs(20),
        "the first records in the sink",
        || uids(&agg.out_dir).len() == 1_000,
    );
    let (data_dir, out_dir) = (agg.data_dir.clone(), agg.out_dir.clone());
    let mut agg = agg;
    let st = agg.proc.stop(Duration::from_secs(30));
    assert!(st.success(), "aggregator stop: {st}");
    // the store (WAL, checkpoints) is lost; the sink's output and its own position remain
    fs::remove_dir_all(data_dir.join("store")).unwrap();
    let agg = c.start_aggregator_on("agg-1", Some(port), &[]);
    assert_eq!(agg.out_dir, out_dir);
    send(&mut c, 1_000..1_500, &list);
    let mut got = 0;
    let ok = (0..200).any(|_| {
        got = uids(&agg.out_dir).len();
        std::thread::sleep(Duration::from_millis(100));
        got == 1_500
    });
    assert!(
        ok,
        "after the WAL reset only {got} of 1500 records are in the file sink:\n{}",
        tail(&agg.proc.output(), 20)
    );
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[test]
fn drop_oldest_with_an_8_mib_budget_bounds_memory_and_counts_drops() {
    let mut c = Cluster::new(&[("agg-1", "aggregator"), ("col-1", "collector")]);
    let list = format!("agg-1@127.0.0.1:{}", free_udp_port()); // never up
    let mut col = c.start_collector(
        "col-1",
        &list,
        true,
        &[
            "--stdin",
            "--stream-key",
            "{svc}",
            "--buffer-max-bytes",
            "8388608",
            "--buffer-memory-bytes",
            "1048576",
            "--overflow",
            "drop-oldest",
            "--drain-timeout",
            "2s",
        ],
    );
    let pid = col.proc.pid();
    let admin: SocketAddr = col.admin;
    let mut stdin = col.proc.take_stdin();
    let n = 120_000u64; // about 24 MB, three times the budget
    let start = Instant::now();
    let mut max_rss = 0;
    for chunk in (0..n).step_by(10_000) {
        stdin.write_all(&records(chunk..chunk + 10_000)).unwrap();
        max_rss = max_rss.max(rss_kib(pid).unwrap_or(0));
    }
    let mut dropped = 0.0;
    wait_until(
        Duration::from_secs(60),
        "records dropped by drop-oldest",
        || {
            max_rss = max_rss.max(rss_kib(pid).unwrap_or(0));
            dropped = util::http_get(&format!("http://{admin}/metrics"))
                .map(|t| util::parse_metrics(&t))
                .and_then(|m| {
                    m.get("logmesh_records_dropped_total{reason=\"spool_overflow\"}")
                        .copied()
                })
                .unwrap_or(0.0);
            dropped > 0.0
        },
    );
    drop(stdin);
    let st = col.proc.wait_exit(Duration::from_secs(60));
    let out = col.proc.output();
    println!(
        "drop-oldest: {dropped} records dropped (metric), max RSS {max_rss} KiB, {:.1}s",
        start.elapsed().as_secs_f64()
    );
    assert!(!st.success(), "nothing was delivered: {st}");
    assert!(
        out.contains("were dropped because the spool was full"),
        "{}",
        tail(&out, 20)
    );
    // the spool never holds more than its budget
    let spool: u64 = fs::read_dir(c.data_dir("col-1").join("spool"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(spool <= 8 << 20, "spool holds {spool} bytes");
    // 1 MiB memory tier + batches in flight: far below the 24 MB written
    assert!(max_rss < 120 * 1024, "collector RSS reached {max_rss} KiB");
}
