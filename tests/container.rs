//! Container logs through the real binary: Docker json-file and CRI files under a directory
//! laid out like /var/log/containers → collector `--tail` (format auto) → aggregator → file
//! sink, with partial lines of more than 16 KiB joined back exactly, a rotation in the
//! middle, and `--stream-key '{namespace}/{container}'` from the Kubernetes file names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod container_syslog_util;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use container_syslog_util::{find, Mesh};
use serde_json::Value as Json;

const CHUNK: usize = 16 * 1024;

/// A long message with characters JSON must escape and multi-byte ones.
fn long_msg(seed: &str, len: usize) -> String {
    let unit = format!("{seed} \"quoted\" back\\slash tab\t é€ 😀 ");
    let mut s = String::new();
    let mut i = 0;
    while s.len() < len {
        s.push_str(&unit);
        s.push_str(&i.to_string());
        i += 1;
    }
    while s.len() > len {
        s.pop();
    }
    s
}

/// Parts of at most CHUNK bytes, cut at char boundaries (like a runtime cutting a line).
fn chunks(msg: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = msg;
    while rest.len() > CHUNK {
        let mut cut = CHUNK;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out.push(rest);
    out
}

fn docker_line(log: &str, stream: &str, time: &str) -> String {
    let mut l =
        serde_json::to_string(&serde_json::json!({"log": log, "stream": stream, "time": time}))
            .unwrap();
    l.push('\n');
    l
}

/// A Docker message as json-file lines: parts without `\n`, the last with it.
fn docker_msg(msg: &str, stream: &str, time: &str) -> Vec<String> {
    let parts = chunks(msg);
    let n = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let log = if i + 1 == n {
                format!("{p}\n")
            } else {
                p.to_string()
            };
            docker_line(&log, stream, time)
        })
        .collect()
}

/// A CRI message: `P` parts, the last `F`.
fn cri_msg(msg: &str, stream: &str, time: &str) -> Vec<String> {
    let parts = chunks(msg);
    let n = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let tag = if i + 1 == n { "F" } else { "P" };
            format!("{time} {stream} {tag} {p}\n")
        })
        .collect()
}

fn append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

fn write(f: &mut File, lines: &[String]) {
    for l in lines {
        f.write_all(l.as_bytes()).unwrap();
    }
    f.flush().unwrap();
}

fn by_message<'a>(recs: &'a [Json], msg: &str) -> &'a Json {
    let hits: Vec<&Json> = recs.iter().filter(|r| r["message"] == msg).collect();
    assert_eq!(
        hits.len(),
        1,
        "want exactly one record with message {:?}… ({} bytes); have messages {:?}",
        &msg[..msg.len().min(40)],
        msg.len(),
        recs.iter()
            .map(|r| r["message"]
                .as_str()
                .map(|m| (m.len(), m.chars().take(30).collect::<String>())))
            .collect::<Vec<_>>()
    );
    hits[0]
}

const T1: &str = "2024-05-01T12:00:01.000000001Z";
const T2: &str = "2024-05-01T12:00:02.000000002Z";
const T3: &str = "2024-05-01T12:00:03.000000003Z";
const T4: &str = "2024-05-01T12:00:04.000000004Z";
const FILE: &str = "shop%2Fnginx.ndjson";
const MAX: usize = 60_000;

#[test]
fn docker_and_cri_logs_joined_labelled_and_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let cdir = dir.path().join("containers");
    std::fs::create_dir_all(&cdir).unwrap();
    let docker_path = cdir.join("web-7d9f_shop_nginx-0123abcd.log");
    let cri_path = cdir.join("web-8e1a_shop_nginx-89abcdef.log");

    // Docker: a short line, a JSON body, a 40 KB message in 3 parts with a stderr line
    // between its parts.
    let l1 = long_msg("docker-one", 40_000);
    let l1_lines = docker_msg(&l1, "stdout", T2);
    assert_eq!(l1_lines.len(), 3);
    let mut d = append(&docker_path);
    write(&mut d, &[docker_line("hello from docker\n", "stdout", T1)]);
    write(
        &mut d,
        &[docker_line(
            "{\"level\":\"warn\",\"msg\":\"json body\"}\n",
            "stdout",
            T1,
        )],
    );
    write(&mut d, &l1_lines[..1]);
    write(&mut d, &[docker_line("an error line\n", "stderr", T3)]);
    write(&mut d, &l1_lines[1..]);

    // CRI: a short line, a 40 KB message in parts, and the first part of one whose last
    // part comes later.
    let l2 = long_msg("cri-two", 40_000);
    let l3 = long_msg("cri-three", 20_000);
    let l3_lines = cri_msg(&l3, "stdout", T4);
    let mut c = append(&cri_path);
    write(&mut c, &[format!("{T1} stdout F hello from cri\n")]);
    write(&mut c, &cri_msg(&l2, "stderr", T2));
    write(&mut c, &l3_lines[..1]);

    let mesh = Mesh::start(
        dir,
        &[
            "--tail",
            "{dir}/containers/*.log",
            "--stream-key",
            "{namespace}/{container}",
            "--max-record-bytes",
            "60000",
        ],
    );
    let recs = mesh.records(FILE, 6);
    std::thread::sleep(Duration::from_millis(500));
    let recs2 = mesh.records(FILE, 6);
    assert_eq!(
        recs2.len(),
        6,
        "the unfinished CRI message must wait: {recs:#?}"
    );

    let r = by_message(&recs, "hello from docker");
    assert_eq!(r["stream"], "stdout");
    assert_eq!(r["_ts"], T1);
    assert_eq!(r["pod"], "web-7d9f");
    assert_eq!(r["namespace"], "shop");
    assert_eq!(r["container"], "nginx");
    assert_eq!(r["container_id"], "0123abcd");
    assert_eq!(r["_stream"], "shop/nginx");
    assert_eq!(r["_tag"], "web-7d9f_shop_nginx-0123abcd.log");
    let j = find(&recs, "msg", "json body");
    assert_eq!(j["level"], "warn");
    assert_eq!(j["container"], "nginx");
    assert!(j.get("message").is_none());
    let r = by_message(&recs, &l1);
    assert_eq!(r["_ts"], T2, "a joined message keeps its first part's time");
    assert!(r.get("_truncated").is_none());
    assert_eq!(by_message(&recs, "an error line")["stream"], "stderr");
    let r = by_message(&recs, "hello from cri");
    assert_eq!(
        (r["pod"].as_str(), r["container_id"].as_str()),
        (Some("web-8e1a"), Some("89abcdef"))
    );
    let r = by_message(&recs, &l2);
    assert_eq!(
        (r["stream"].as_str(), r["_ts"].as_str()),
        (Some("stderr"), Some(T2))
    );

    // the rest of the CRI message, in a later read
    write(&mut c, &l3_lines[1..]);
    let recs = mesh.records(FILE, 7);
    assert_eq!(by_message(&recs, &l3)["_ts"], T4);

    // Rotation: rename, the runtime still finishes a message in the old file, then writes
    // to a new one.
    let l4 = long_msg("docker-four", 33_000);
    let l5 = long_msg("docker-five", 50_000);
    let l6 = "x".repeat(70_000);
    std::fs::rename(
        &docker_path,
        cdir.join("web-7d9f_shop_nginx-0123abcd.log.1"),
    )
    .unwrap();
    let l4_lines = docker_msg(&l4, "stdout", T3);
    write(&mut d, &l4_lines[..2]);
    std::thread::sleep(Duration::from_millis(400));
    write(&mut d, &l4_lines[2..]);
    let mut d2 = append(&docker_path);
    write(&mut d2, &[docker_line("after rotation\n", "stdout", T4)]);
    write(&mut d2, &docker_msg(&l5, "stdout", T4));
    write(&mut d2, &docker_msg(&l6, "stderr", T4));

    let recs = mesh.records(FILE, 11);
    by_message(&recs, &l4);
    by_message(&recs, "after rotation");
    by_message(&recs, &l5);
    let t = recs
        .iter()
        .find(|r| r["_truncated"] == true)
        .expect("the 70 KB message is cut");
    assert_eq!(t["message"].as_str().unwrap(), &l6[..MAX]);
    assert_eq!(t["stream"], "stderr");
    std::thread::sleep(Duration::from_millis(500));
    let recs = mesh.records(FILE, 11);
    assert_eq!(recs.len(), 11, "no record twice, nothing extra");
    for r in &recs {
        assert_eq!(r["namespace"], "shop");
        assert_eq!(r["_stream"], "shop/nginx");
    }
}

#[test]
fn formats_are_detected_wherever_the_file_lives() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut cri = append(&logs.join("cri.log"));
    write(
        &mut cri,
        &cri_msg(&long_msg("anywhere", 20_000), "stdout", T1),
    );
    let mut plain = append(&logs.join("plain.log"));
    write(
        &mut plain,
        &["2024-05-01T12:00:00Z stdout looks like CRI but is not\n".to_owned()],
    );
    let mut docker = append(&logs.join("docker.log"));
    write(&mut docker, &[docker_line("{\"a\":1}\n", "stdout", T2)]);

    let mesh = Mesh::start(dir, &["--tail", "{dir}/logs/*.log"]);
    let recs = mesh.records("cri.log.ndjson", 1);
    assert_eq!(recs[0]["message"], long_msg("anywhere", 20_000));
    assert_eq!(recs[0]["_ts"], T1);
    assert!(
        recs[0].get("pod").is_none(),
        "no Kubernetes labels outside containers/"
    );
    let recs = mesh.records("plain.log.ndjson", 1);
    assert_eq!(
        recs[0]["message"],
        "2024-05-01T12:00:00Z stdout looks like CRI but is not"
    );
    assert!(recs[0].get("stream").is_none());
    let recs = mesh.records("docker.log.ndjson", 1);
    assert_eq!(
        (recs[0]["a"].as_i64(), recs[0]["stream"].as_str()),
        (Some(1), Some("stdout"))
    );
}

#[test]
fn explicit_format_flags_malformed_lines() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = append(&dir.path().join("app.log"));
    write(
        &mut f,
        &[
            format!("{T1} stdout F fine\n"),
            "not a cri line\n".to_owned(),
        ],
    );
    let mesh = Mesh::start(dir, &["--tail", "{dir}/app.log", "--format", "cri"]);
    let recs = mesh.records("app.log.ndjson", 2);
    assert_eq!(by_message(&recs, "fine")["stream"], "stdout");
    assert_eq!(by_message(&recs, "not a cri line")["_parse_error"], true);
}
