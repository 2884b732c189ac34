#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    assert!(logmesh::fuzzing::run("syslog", data), "unknown fuzz target");
});
