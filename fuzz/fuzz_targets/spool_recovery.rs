#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    assert!(logmesh::fuzzing::run("spool_recovery", data), "unknown fuzz target");
});
