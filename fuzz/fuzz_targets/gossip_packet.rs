#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    assert!(logmesh::fuzzing::run("gossip_packet", data), "unknown fuzz target");
});
