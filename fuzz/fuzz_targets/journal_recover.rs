//! Fuzz target: see `bridge::fuzzing::journal_recover` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bridge::fuzzing::journal_recover(data));
