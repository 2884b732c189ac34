//! Replays every fuzz target's corpus (`fuzz/corpus/<target>/`) and its crash regressions
//! (`fuzz/regressions/<target>/`) through the same entry points the coverage-guided
//! targets use, so CI checks them on stable Rust without a fuzzer. See fuzz/README.md.

use std::path::{Path, PathBuf};

use logmesh::fuzzing::{run, seed_inputs, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}

/// Run `target` on every file in `dir`; a panic names the file to reproduce with.
fn replay(target: &str, dir: &Path) -> usize {
    let inputs = files(dir);
    for path in &inputs {
        let data = std::fs::read(path)
            .unwrap_or_else(|e| panic!("cannot read corpus file {}: {e}", path.display()));
        let r = std::panic::catch_unwind(|| run(target, &data));
        match r {
            Ok(true) => {}
            Ok(false) => panic!("{} is not a known fuzz target", target),
            Err(_) => panic!(
                "fuzz target {target} panicked on {} (reproduce: cd fuzz && cargo +nightly fuzz run {target} {})",
                path.display(),
                path.display()
            ),
        }
    }
    inputs.len()
}

#[test]
fn every_target_replays_its_corpus() {
    for target in TARGETS {
        let n = replay(target, &fuzz_dir().join("corpus").join(target));
        assert!(
            n > 0,
            "fuzz/corpus/{target}/ is empty: run the seed writer (see fuzz/README.md)"
        );
    }
}

#[test]
fn crash_regressions_stay_fixed() {
    for target in TARGETS {
        replay(target, &fuzz_dir().join("regressions").join(target));
    }
}

#[test]
fn fuzz_targets_match_the_entry_points() {
    for target in TARGETS {
        let src = fuzz_dir().join("fuzz_targets").join(format!("{target}.rs"));
        assert!(src.is_file(), "no fuzz target file {}", src.display());
    }
}

#[test]
fn seed_inputs_cover_every_target_and_decode() {
    let seeds = seed_inputs();
    for target in TARGETS {
        assert!(
            seeds.iter().any(|(t, _, _)| *t == target),
            "no seed input for {target}"
        );
    }
    for (target, name, bytes) in &seeds {
        assert!(run(target, bytes), "{target}/{name}: unknown target");
    }
}

/// Writes the seed corpus: the inputs built by the real encoders plus the captured client
/// bytes in shared/fixtures. Run by hand (see fuzz/README.md), then minimise with
/// `cargo fuzz cmin`.
#[test]
#[ignore = "writes fuzz/corpus; run by hand when the seeds change"]
fn write_seed_corpus() {
    for (target, name, bytes) in seed_inputs() {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
    }
    let fixtures =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/fluent-bit-5.1.1");
    let fixtures = std::env::var_os("LOGMESH_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or(fixtures);
    for path in files(&fixtures) {
        if path.extension().is_some_and(|e| e == "bin") {
            let bytes = std::fs::read(&path).expect("read fixture");
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("fixture");
            let dir = fuzz_dir().join("corpus").join("forward");
            // flags 0 (no handshake), one read of the whole capture
            std::fs::write(
                dir.join(format!("fixture-{name}")),
                [&[0u8, 255][..], &bytes].concat(),
            )
            .expect("write fixture seed");
        }
    }
}

/// Found by the `forward` target: a map whose key is a map whose key is a map… Each level
/// escaped the JSON text of the key inside it, doubling its size, so 300 bytes of nested
/// keys took 2^depth time and memory. Depth 20 must be refused, not turned into megabytes.
#[test]
fn forward_nested_non_string_map_keys_are_bounded() {
    use logmesh::collector::input::forward::decode::{ForwardDecoder, Message};
    // ["app", 1700000000, {{{…{1: 1}: 1}…: 1}: 1}]  (key nested 20 deep)
    let depth = 20;
    let mut frame = vec![0x93, 0xa3, b'a', b'p', b'p', 0xce, 0x65, 0x53, 0xf1, 0x00];
    frame.extend_from_slice(&vec![0x81; depth + 1]);
    frame.push(0x01);
    frame.extend_from_slice(&vec![0x01; depth + 1]);
    let mut dec = ForwardDecoder::new(1 << 20, 1 << 20);
    dec.feed(&frame);
    match dec.next(0) {
        Err(_) => {}
        // events are transcoded one by one: the refusal may come from the first
        Ok(Some(Message::Events(mut ev))) => match ev.next_event() {
            Err(_) => {}
            Ok(Some((_, json))) => {
                panic!("nested keys accepted as a {}-byte JSON object", json.len())
            }
            Ok(None) => panic!("the event vanished"),
        },
        Ok(other) => panic!("unexpected decode result: {other:?}"),
    }
}
