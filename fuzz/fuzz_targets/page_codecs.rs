//! `ferry_proto::migration::PageDecoder` over arbitrary bodies: an encoded page as a
//! destination takes it from the network. The first byte picks the codec, the next 4096 bytes
//! (zero-padded) are the page the destination holds, the rest is the body.
//!
//! Besides never panicking: a body that decodes yields one page, and re-encoding that page
//! with the same codec (against the same base) decodes to it again.

#![no_main]

use ferry_proto::migration::{PageCodec, PageDecoder, PageEncoder, MAX_ENCODED_BODY, PAGE_SIZE};
use libfuzzer_sys::fuzz_target;

const PAGE: usize = PAGE_SIZE as usize;

fuzz_target!(|data: &[u8]| {
    let Some((&raw, rest)) = data.split_first() else {
        return;
    };
    let codec = PageCodec::ALL[usize::from(raw) % PageCodec::ALL.len()];
    let mut base = vec![0u8; PAGE];
    let take = rest.len().min(PAGE);
    base[..take].copy_from_slice(&rest[..take]);
    let body = &rest[take..];

    let mut page = base.clone();
    if PageDecoder::new().decode(codec, body, &mut page).is_err() {
        return;
    }
    let mut again = Vec::new();
    if PageEncoder::new().encode(codec, &page, Some(&base), MAX_ENCODED_BODY, &mut again) {
        let mut out = base.clone();
        PageDecoder::new()
            .decode(codec, &again, &mut out)
            .expect("what the encoder wrote decodes");
        assert_eq!(out, page);
    }
});
