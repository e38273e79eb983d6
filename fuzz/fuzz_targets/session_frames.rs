//! A migration session's receiving side over arbitrary bytes from a peer: frames parsed,
//! chunks filed by offset and read out in order. Besides never panicking, the reassembly must
//! keep its chunks ordered, without overlaps and within its memory bound
//! (`ferry_vmm::migration::session::fuzzing::receive` checks it after every frame).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_vmm::migration::session::fuzzing::receive(data);
});
