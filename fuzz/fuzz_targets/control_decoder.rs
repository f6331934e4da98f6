//! The control-frame decoder, as the broker and a client run it.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| memsock_tests::fuzz::control_decoder(input));
