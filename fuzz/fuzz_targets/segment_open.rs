//! A stream segment whose header and tables a hostile peer scribbles on.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| memsock_tests::fuzz::segment_open(input));
