//! `ferry_vmm::snapshot::format::read_state` over state files whose frames are well formed
//! (right kinds, in order, correct checksums) and whose sections' JSON comes from the input,
//! so the fuzzer works on the section decoders: machine, memory index, KVM, vCPUs, devices.
//! The input layout is in `ferry_fuzz::snapshot`.
//!
//! Besides never panicking: a state that decodes must write back and decode again as the same
//! state.

#![no_main]

use ferry_fuzz::snapshot::stream_from_input;
use ferry_vmm::snapshot::format::{read_state, write_state};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let stream = stream_from_input(data);
    let Ok(state) = read_state(&mut &stream[..]) else {
        return;
    };
    let mut written = Vec::new();
    write_state(&mut written, &state).expect("a Vec takes any state");
    let again = read_state(&mut &written[..]).expect("a state ferry wrote reads back");
    assert_eq!(again, state, "the state changed on a write and a read");
});
