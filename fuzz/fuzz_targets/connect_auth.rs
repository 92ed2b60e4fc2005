//! Fuzz target: see `gateway::fuzzing::connect_auth` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gateway::fuzzing::connect_auth(data));
