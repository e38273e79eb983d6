//! `ferry_vmm::snapshot::format::read_state` over arbitrary bytes: the snapshot loader's
//! decoder of a state file, as a damaged or hostile file presents it.
//!
//! Besides never panicking (nor allocating past the section limit): a state that decodes
//! must write back and decode again as the same state. Most inputs stop at the first frame's
//! magic or checksum; `snapshot_state_structured` starts past them.

#![no_main]

use ferry_vmm::snapshot::format::{read_state, write_state};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(state) = read_state(&mut &data[..]) else {
        return;
    };
    let mut written = Vec::new();
    write_state(&mut written, &state).expect("a Vec takes any state");
    let again = read_state(&mut &written[..]).expect("a state ferry wrote reads back");
    assert_eq!(again, state, "the state changed on a write and a read");
});
