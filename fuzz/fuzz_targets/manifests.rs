//! Fuzz target: see `warmspare_shared::fuzzing::manifests`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    warmspare_shared::fuzzing::manifests(data);
});
