//! Fuzzes what a sidecar reads from a client before anything else decides on it.
//!
//! - The protocol sniffer never panics, and a verdict it gives on a prefix of the bytes
//!   stands for all of them (more bytes never change a decided HTTP/1, HTTP/2 or opaque).
//! - The ClientHello reader (`tls` routes' server name) never panics, and a verdict it gives
//!   on a prefix stands for all the bytes too; a server name it returns is a lowercase DNS
//!   name of at most 253 bytes.
//! - Path normalization never panics, in every mode; what it returns is normal (normalizing
//!   again changes nothing), still an absolute path, free of `.` and `..` segments, and, in
//!   the merging modes, of doubled slashes; and it is accepted by `http::Uri` whenever the
//!   input was, so a request is never forwarded with the path it came with by mistake.

#![no_main]

use isthmus_core::http_path::{normalize, normalize_uri, PathNormalization};
use isthmus_sidecar::protocol::{sniff, Sniffed};
use isthmus_sidecar::sni::{server_name, Hello};
use libfuzzer_sys::fuzz_target;

const MODES: [PathNormalization; 4] = [
    PathNormalization::None,
    PathNormalization::Base,
    PathNormalization::MergeSlashes,
    PathNormalization::DecodeAndMergeSlashes,
];

fuzz_target!(|data: &[u8]| {
    let verdict = sniff(data);
    for cut in 0..data.len() {
        let early = sniff(&data[..cut]);
        if early != Sniffed::NeedMore {
            assert_eq!(
                early, verdict,
                "the verdict on {cut} bytes changed with more"
            );
        }
    }

    let hello = server_name(data);
    if let Hello::ClientHello {
        server_name: Some(name),
    } = &hello
    {
        assert!(name.len() <= 253 && !name.is_empty(), "{name:?}");
        assert_eq!(name, &name.to_ascii_lowercase());
    }
    // Checking every prefix is quadratic: the first few hundred cover the record header and
    // the ClientHello's fixed fields.
    for cut in 0..data.len().min(512) {
        let early = server_name(&data[..cut]);
        if early != Hello::NeedMore {
            assert_eq!(early, hello, "the ClientHello verdict on {cut} bytes changed with more");
        }
    }

    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    for mode in MODES {
        let Ok(normal) = normalize(path, mode) else {
            continue;
        };
        let again = normalize(&normal, mode).expect("a normalized path normalizes");
        assert_eq!(again, normal, "{mode:?}: not idempotent on {path:?}");
        if mode == PathNormalization::None || !path.starts_with('/') {
            assert_eq!(normal, path);
            continue;
        }
        assert!(
            normal.starts_with('/'),
            "{mode:?}: {path:?} became {normal:?}"
        );
        assert!(
            !normal.split('/').any(|s| s == "." || s == ".."),
            "{mode:?}: {path:?} kept a dot segment: {normal:?}"
        );
        if mode != PathNormalization::Base {
            assert!(
                !normal.contains("//"),
                "{mode:?}: {path:?} kept //: {normal:?}"
            );
        }
        if let Ok(uri) = path.parse::<http::Uri>() {
            if uri.path() == path {
                assert!(
                    normalize_uri(&uri, mode).is_ok(),
                    "{mode:?}: {path:?} parses as a URI but its normal form does not"
                );
            }
        }
    }
});
