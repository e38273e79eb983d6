//! The virtio-net device serving its three queues as the input lays them out, with frames
//! arriving from the host side too.
//!
//! ```text
//! offset  size  field
//!      0     1  bit 0: the driver accepts CTRL_VQ (the control queue is live)
//!      1    21  for queues 0 (rx), 1 (tx), 2 (ctrl): log2 of the size (u8), then the
//!               descriptor table, available ring and used ring addresses (u16 LE each)
//!     22     1  frames from the host (0-3), each then: length (u16 LE), bytes
//!      -     -  guest memory from address 0
//! ```
//!
//! Besides never panicking: every chain the device takes from a healthy queue goes back to its
//! used ring, and a queue the driver broke comes with DEVICE_NEEDS_RESET.

#![no_main]

use ferry_devices::fuzzing::{queue_layouts, run_net_queues, NetQueueRun};
use libfuzzer_sys::fuzz_target;

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes([*data.get(at)?, *data.get(at + 1)?]))
}

fn check(name: &str, q: NetQueueRun, needs_reset: bool) {
    if q.broken {
        assert!(needs_reset, "{name}: broken without DEVICE_NEEDS_RESET: {q:?}");
    } else {
        assert_eq!(q.consumed, q.returned, "{name}: a chain never returned: {q:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(&flags) = data.first() else {
        return;
    };
    let Some(layouts) = queue_layouts::<3>(data, 1) else {
        return;
    };
    let Some(&count) = data.get(22) else {
        return;
    };
    let mut at = 23;
    let mut frames = Vec::new();
    for _ in 0..count % 4 {
        let Some(len) = u16_at(data, at) else {
            return;
        };
        let start = at + 2;
        let end = (start + usize::from(len)).min(data.len());
        frames.push(&data[start..end]);
        at = end;
    }
    let memory = &data[at.min(data.len())..];
    let Some(run) = run_net_queues(memory, layouts, flags & 1 != 0, &frames) else {
        return;
    };
    check("rx", run.rx, run.needs_reset);
    check("tx", run.tx, run.needs_reset);
    if let Some(ctrl) = run.ctrl {
        check("ctrl", ctrl, run.needs_reset);
    }
});
