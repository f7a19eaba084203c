//! Fuzz target: `bus_core::frame::decode` on arbitrary bytes.
//!
//! Checks more than "no panic": a datagram that decodes must re-encode to the very same bytes
//! (the encoding is canonical), and its header's fd count must be what the frame carries.
#![no_main]

use bus_core::frame::{Header, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = decode(data) else {
        return;
    };
    let mut again = Vec::new();
    frame
        .encode(&mut again)
        .expect("a decoded frame must encode");
    assert_eq!(again, data, "decode -> encode is not the identity");
    let header = Header::parse(data).expect("decode accepted the header");
    assert_eq!(usize::from(header.fd_count), frame.fd_count());
});
