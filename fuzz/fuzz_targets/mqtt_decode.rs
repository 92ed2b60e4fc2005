//! Fuzz target: see `gateway::fuzzing::mqtt_decode` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gateway::fuzzing::mqtt_decode(data));
