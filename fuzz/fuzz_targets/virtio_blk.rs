//! The virtio-blk device serving a request queue that the input lays out: queue size and ring
//! addresses (checked by the virtio-mmio transport at DRIVER_OK, as for a real guest), and all
//! of guest memory: descriptor table, available ring, request headers, data. The input layout
//! is in `ferry_fuzz::blk`; the disk is a small scratch image reset before every input.
//!
//! Besides never panicking: every chain the device takes from the available ring is served,
//! and every one goes back to the used ring, except, when the driver broke the queue, the one
//! chain that broke it, and then the device asks for a reset.

#![no_main]

use ferry_devices::fuzzing::run_block_queue;
use ferry_fuzz::blk::BlkInput;
use ferry_fuzz::disk::ScratchDisk;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(input) = BlkInput::decode(data) else {
        return;
    };
    let block = ScratchDisk::get().block(input.read_only);
    let Some(run) = run_block_queue(block, input.memory, input.layout) else {
        return; // The transport refused the queue; the device never saw it.
    };
    assert_eq!(
        u64::from(run.consumed),
        run.requests,
        "a chain taken but not served: {run:?}"
    );
    if run.broken {
        assert!(
            run.needs_reset,
            "a broken queue without DEVICE_NEEDS_RESET: {run:?}"
        );
        assert!(
            run.consumed.wrapping_sub(run.returned) <= 1,
            "chains lost besides the one that broke the queue: {run:?}"
        );
    } else {
        assert_eq!(
            run.consumed, run.returned,
            "a chain never returned: {run:?}"
        );
    }
});
