#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    assert!(logmesh::fuzzing::run("wal_recovery", data), "unknown fuzz target");
});
