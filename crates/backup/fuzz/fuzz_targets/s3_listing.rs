//! An S3 endpoint's ListObjectsV2 answer is parsed without trusting it: never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = phivault_backup::target::s3::parse_list(s);
    }
});
