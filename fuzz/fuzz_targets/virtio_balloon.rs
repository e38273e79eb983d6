//! The virtio-balloon serving its queues as the input lays them out: frame number arrays,
//! statistics, free page hints and reports, all written by a hostile driver.
//!
//! ```text
//! offset  size  field
//!      0     1  the optional features: bit 0 STATS_VQ, bit 1 FREE_PAGE_HINT, bit 2 REPORTING
//!      1    35  for queues 0-4: log2 of the size (u8), then the descriptor table, available
//!               ring and used ring addresses (u16 LE each)
//!     36     -  guest memory from address 0
//! ```
//!
//! Besides never panicking: every chain the device takes from a healthy queue goes back to its
//! used ring (but the statistics chain it holds), and a queue the driver broke comes with
//! DEVICE_NEEDS_RESET.

#![no_main]

use ferry_devices::fuzzing::{queue_layouts, run_balloon_queues};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(&flags) = data.first() else {
        return;
    };
    let mut features = 0u32;
    for (bit, feature) in [(0, 1), (1, 3), (2, 5)] {
        if flags & (1 << bit) != 0 {
            features |= 1 << feature;
        }
    }
    let Some(layouts) = queue_layouts::<5>(data, 1) else {
        return;
    };
    let Some(run) = run_balloon_queues(&data[36.min(data.len())..], &layouts, features) else {
        return;
    };
    for (i, q) in run.queues.iter().enumerate() {
        if q.broken {
            assert!(run.needs_reset, "queue {i} broken without DEVICE_NEEDS_RESET: {q:?}");
            continue;
        }
        let held = u16::from(run.stats_queue == Some(i) && run.stats_held);
        assert_eq!(
            q.consumed.wrapping_sub(q.returned),
            held,
            "queue {i}: a chain never returned: {run:?}"
        );
    }
});
