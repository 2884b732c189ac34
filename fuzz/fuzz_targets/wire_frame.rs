#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    assert!(logmesh::fuzzing::run("wire_frame", data), "unknown fuzz target");
});
