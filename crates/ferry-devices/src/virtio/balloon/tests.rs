//! Tests of the balloon with its queues laid out in plain memory (`TestQueue`).

use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::persist::Persist;
use crate::virtio::test_queue::{r, w, TestQueue};
use crate::virtio::{VirtioDevice, VirtioInterrupt, INTERRUPT_CONFIG_CHANGE, VIRTIO_F_VERSION_1};
use crate::GuestMemory;

const MEM_END: u64 = 0x40_0000;
const QSIZE: u16 = 16;
/// Where the driver's buffers (frame number arrays, command IDs, statistics) live.
const BUF: u64 = 0x10_0000;
/// Memory the guest gives away in the tests.
const FREE: u64 = 0x20_0000;
const ALL: u64 = 1 << F_STATS_VQ | 1 << F_FREE_PAGE_HINT | 1 << F_REPORTING;

struct Harness {
    mem: GuestMemory,
    balloon: Balloon,
    interrupt: Arc<VirtioInterrupt>,
    irq: Arc<EventFd>,
    /// The driver's queues, in queue order.
    queues: Vec<TestQueue>,
}

impl Harness {
    fn new() -> Harness {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_END as usize)]).unwrap();
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        Harness {
            queues: (0..MAX_QUEUES as u64)
                .map(|i| TestQueue::at(&mem, 0x1000 + i * 0x1000, QSIZE))
                .collect(),
            mem,
            balloon: Balloon::new().unwrap(),
            interrupt: Arc::new(VirtioInterrupt::new(irq.clone())),
            irq,
        }
    }

    /// Negotiates `features` (VERSION_1 added) and activates; the queues the features do not
    /// use are handed over not ready, as a driver leaves them.
    fn activate(&mut self, features: u64) {
        let features = features | VIRTIO_F_VERSION_1;
        self.balloon.ack_features(features);
        let used = roles(features).len();
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let mut q = q.queue_with_max(QUEUE_SIZE);
                if i >= used {
                    virtio_queue::QueueT::set_ready(&mut q, false);
                }
                q
            })
            .collect();
        self.balloon
            .activate(self.mem.clone(), queues, self.interrupt.clone())
            .unwrap();
    }

    fn config(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.balloon.read_config(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// The driver writes `bytes` at `addr` and offers them as one readable buffer on queue
    /// `q`, descriptor `index`; the device serves the queue.
    fn send(&mut self, q: usize, index: u16, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.queues[q].add_chain(index, &[r(addr, bytes.len() as u32)]);
        self.balloon.process_queue(q);
    }

    fn fill(&self, addr: u64, len: usize, byte: u8) {
        self.mem
            .write_slice(&vec![byte; len], GuestAddress(addr))
            .unwrap();
        let region = self.mem.find_region(GuestAddress(0)).unwrap();
        MmapRegion::bitmap(region).reset();
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    fn dirty(&self, addr: u64) -> bool {
        let region = self.mem.find_region(GuestAddress(0)).unwrap();
        MmapRegion::bitmap(region).dirty_at(addr as usize)
    }

    fn config_interrupt(&self) -> bool {
        self.irq.read().is_ok() && self.interrupt.status() & INTERRUPT_CONFIG_CHANGE != 0
    }
}

fn pfns(pages: &[u64]) -> Vec<u8> {
    pages
        .iter()
        .flat_map(|&gpa| ((gpa >> 12) as u32).to_le_bytes())
        .collect()
}

#[test]
fn the_driver_writes_actual_and_nothing_else() {
    let mut h = Harness::new();
    assert_eq!(h.balloon.device_type(), 5);
    h.balloon.set_target(8 << 20);
    assert_eq!(h.config(0), 2048);
    h.balloon.write_config(0, &7u32.to_le_bytes());
    h.balloon.write_config(4, &100u32.to_le_bytes());
    h.balloon.write_config(8, &9u32.to_le_bytes());
    h.balloon.write_config(14, &[1, 2, 3, 4]);
    assert_eq!(h.config(0), 2048, "the target is the host's");
    assert_eq!(h.config(4), 100);
    assert_eq!(h.config(8), 0, "the command is the host's");
    assert_eq!(h.balloon.info().actual_bytes, 100 * 4096);
}

#[test]
fn queues_are_numbered_by_the_negotiated_features() {
    assert_eq!(roles(0), vec![Role::Inflate, Role::Deflate]);
    assert_eq!(
        roles(1 << F_FREE_PAGE_HINT | 1 << F_REPORTING),
        vec![Role::Inflate, Role::Deflate, Role::Hint, Role::Report]
    );
    let mut h = Harness::new();
    h.activate(1 << F_FREE_PAGE_HINT);
    h.fill(FREE, 0x4000, 0x55);
    // Queue 2 is the free page queue here, not statistics.
    let id = h.balloon.start_hinting().unwrap();
    h.send(2, 0, BUF, &id.to_le_bytes());
    h.queues[2].add_chain(1, &[w(FREE, 0x4000)]);
    h.balloon.process_queue(2);
    let mut ranges = Vec::new();
    assert_eq!(h.balloon.hints().take(&mut ranges).pages, 4);
    assert_eq!(ranges, vec![(FREE, 0x4000)]);
}

#[test]
fn inflated_pages_go_back_to_the_host_and_deflated_ones_are_counted() {
    let mut h = Harness::new();
    h.activate(ALL);
    h.fill(FREE, 0x10000, 0xaa);
    h.send(0, 0, BUF, &pfns(&[FREE, FREE + 0x1000, FREE + 0x8000]));
    assert_eq!(h.queues[0].used_idx(), 1);
    assert!(h.bytes(FREE, 0x2000).iter().all(|&b| b == 0));
    assert!(h.bytes(FREE + 0x2000, 0x6000).iter().all(|&b| b == 0xaa));
    assert!(h.bytes(FREE + 0x8000, 0x1000).iter().all(|&b| b == 0));
    assert!(h.dirty(FREE) && h.dirty(FREE + 0x8000) && !h.dirty(FREE + 0x2000));
    h.send(1, 0, BUF, &pfns(&[FREE]));
    let info = h.balloon.info();
    assert_eq!((info.inflated_pages, info.deflated_pages), (3, 1));
    // A frame number outside memory is counted, and the chain still returns.
    h.send(0, 1, BUF, &pfns(&[MEM_END + 0x1000]));
    assert_eq!(h.queues[0].used_idx(), 2);
    assert_eq!(h.balloon.info().give_back_failures, 1);
}

#[test]
fn reported_pages_read_as_zero_and_are_dirty_before_the_chain_returns() {
    let mut h = Harness::new();
    h.activate(ALL);
    h.fill(FREE, 0x10000, 0xbb);
    h.queues[4].add_chain(0, &[w(FREE, 0x2000), w(FREE + 0x4000, 0x1000)]);
    h.balloon.process_queue(4);
    assert_eq!(h.queues[4].used_idx(), 1);
    assert!(h.bytes(FREE, 0x2000).iter().all(|&b| b == 0));
    assert!(h.bytes(FREE + 0x2000, 0x2000).iter().all(|&b| b == 0xbb));
    assert!(h.bytes(FREE + 0x4000, 0x1000).iter().all(|&b| b == 0));
    assert!(h.dirty(FREE + 0x4000));
    assert_eq!(h.balloon.info().reported_pages, 3);
}

#[test]
fn a_hint_command_runs_from_start_to_done() {
    let mut h = Harness::new();
    assert_eq!(h.balloon.start_hinting(), None, "not active");
    h.activate(ALL);
    h.irq.read().ok();
    let id = h.balloon.start_hinting().unwrap();
    assert!(id >= FIRST_CMD_ID);
    assert_eq!(h.config(8), id);
    assert!(h.config_interrupt());
    // An answer to an older command: its hints do not count.
    h.send(3, 0, BUF, &(id - 1).to_le_bytes());
    h.queues[3].add_chain(1, &[w(FREE, 0x1000)]);
    h.balloon.process_queue(3);
    let mut ranges = Vec::new();
    assert_eq!(h.balloon.hints().take(&mut ranges).pages, 0);
    // The answer, hints (a partial page does not count), STOP.
    h.send(3, 2, BUF, &id.to_le_bytes());
    h.queues[3].add_chain(3, &[w(FREE, 0x3000)]);
    h.queues[3].add_chain(4, &[w(FREE + 0x8000, 0x800)]);
    h.balloon.process_queue(3);
    h.send(3, 5, BUF + 8, &CMD_ID_STOP.to_le_bytes());
    let p = h.balloon.hints().take(&mut ranges);
    assert_eq!(ranges, vec![(FREE, 0x3000)]);
    assert!(p.answered && p.stopped);
    assert_eq!(p.pages, 3);
    assert_eq!(h.queues[3].used_idx(), 6, "every chain returns");
    // Hints only tell: the memory is left alone.
    h.balloon.finish_hinting();
    assert_eq!(h.config(8), CMD_ID_DONE);
    let next = h.balloon.start_hinting().unwrap();
    assert!(next > id, "a new command has a new ID");
}

#[test]
fn statistics_are_held_until_fresh_ones_are_wanted() {
    let mut h = Harness::new();
    h.activate(ALL);
    let mut buf = 4u16.to_le_bytes().to_vec();
    buf.extend((123u64 << 20).to_le_bytes());
    h.send(2, 0, BUF, &buf);
    assert_eq!(h.queues[2].used_idx(), 0, "held");
    let info = h.balloon.info();
    assert_eq!(info.guest_stats.unwrap().free_memory, Some(123 << 20));
    h.balloon.request_stats();
    assert_eq!(h.queues[2].used_idx(), 1, "given back for a refill");
    h.balloon.request_stats();
    assert_eq!(h.queues[2].used_idx(), 1, "nothing held");
}

#[test]
fn malformed_chains_are_returned_and_counted() {
    let mut h = Harness::new();
    h.activate(ALL);
    // Buffers outside memory, on every queue.
    for q in 0..MAX_QUEUES {
        h.queues[q].add_chain(0, &[r(MEM_END - 2, 16)]);
        h.balloon.process_queue(q);
        assert_eq!(h.queues[q].used_idx(), 1, "queue {q}");
    }
    assert_eq!(h.balloon.info().invalid_chains, MAX_QUEUES as u64);
    // A short command ID.
    h.send(3, 1, BUF, &[1, 2]);
    assert_eq!(h.balloon.info().invalid_chains, MAX_QUEUES as u64 + 1);
}

#[test]
fn state_round_trips_with_a_held_statistics_buffer() {
    let mut h = Harness::new();
    h.activate(ALL);
    h.balloon.set_target(1 << 20);
    h.balloon.write_config(4, &5u32.to_le_bytes());
    h.send(2, 0, BUF, &[4, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    let state = h.balloon.save();
    assert_eq!(state.stats_head, Some(0));
    let args = || BalloonArgs {
        mem: h.mem.clone(),
        interrupt: h.interrupt.clone(),
    };
    let mut restored = Balloon::restore(args(), &state).unwrap();
    assert_eq!(restored.save(), state);
    restored.request_stats();
    assert_eq!(
        h.queues[2].used_idx(),
        1,
        "the held buffer goes back from the new device"
    );
}

#[test]
fn a_running_hint_command_ends_on_restore() {
    let mut h = Harness::new();
    h.activate(ALL);
    h.balloon.start_hinting().unwrap();
    let state = h.balloon.save();
    let restored = Balloon::restore(
        BalloonArgs {
            mem: h.mem.clone(),
            interrupt: h.interrupt.clone(),
        },
        &state,
    )
    .unwrap();
    assert_eq!(restored.save().config.cmd_id, CMD_ID_DONE);
}

#[test]
fn impossible_states_are_refused() {
    let mut h = Harness::new();
    h.activate(ALL);
    let good = h.balloon.save();
    let args = || BalloonArgs {
        mem: h.mem.clone(),
        interrupt: h.interrupt.clone(),
    };
    let mut bad = good.clone();
    bad.acked_features |= 1 << 4;
    assert!(
        Balloon::restore(args(), &bad).is_err(),
        "poison was never offered"
    );
    let mut bad = good.clone();
    bad.queues.as_mut().unwrap().pop();
    assert!(Balloon::restore(args(), &bad).is_err(), "a queue missing");
    let mut bad = good.clone();
    bad.stats_head = Some(QSIZE);
    assert!(
        Balloon::restore(args(), &bad).is_err(),
        "a head past the queue"
    );
    let mut bad = good.clone();
    bad.queues.as_mut().unwrap()[0].queue.next_used = 3;
    assert!(
        Balloon::restore(args(), &bad).is_err(),
        "chains returned that were never taken"
    );
    let mut bad = good.clone();
    bad.acked_features &= !VIRTIO_F_VERSION_1;
    assert!(Balloon::restore(args(), &bad).is_err());
    let mut bad = good;
    bad.queues = None;
    bad.stats_head = Some(0);
    assert!(
        Balloon::restore(args(), &bad).is_err(),
        "held without a queue"
    );
}
