//! The NIC's flow table reading frames from either side: arbitrary bytes as Ethernet frames.
//! Besides never panicking: the table stays within its bounds.
//!
//! Input: a sequence of (direction and length byte, bytes): bit 7 of the first byte is the
//! direction, bits 0-6 the frame length.

#![no_main]

use std::time::{Duration, Instant};

use ferry_devices::virtio::net::{Direction, FlowTable, MAX_CONNECTIONS, MAX_PEERS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut table = FlowTable::new();
    let start = Instant::now();
    let mut rest = data;
    let mut i = 0u64;
    while let Some((&head, tail)) = rest.split_first() {
        let len = usize::from(head & 0x7f).min(tail.len());
        let direction = if head & 0x80 != 0 {
            Direction::FromGuest
        } else {
            Direction::ToGuest
        };
        table.record(&tail[..len], direction, start + Duration::from_millis(i));
        rest = &tail[len..];
        i += 1;
    }
    let flows = table.flows(start + Duration::from_millis(i));
    assert!(flows.peers.len() <= MAX_PEERS);
    assert!(flows.connections.len() <= MAX_CONNECTIONS);
    let again = FlowTable::restore(&flows, start);
    assert!(again.flows(start).connections.len() <= MAX_CONNECTIONS);
});
