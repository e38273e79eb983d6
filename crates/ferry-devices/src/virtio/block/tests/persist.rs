//! Saving a disk behind its transport and restoring it, as a snapshot or a migration does: into
//! a copy of guest memory, a new event loop, a new interrupt line, maybe a new image path.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempdir::TempDir;

use super::*;
use crate::persist::Persist;
use crate::virtio::block::{
    save_block, BlockArgs, BlockRestoreError, VirtioBlock, VirtioBlockArgs,
    VirtioBlockRestoreError, VirtioBlockState, DISK_ID_LEN, QUEUE_SIZE,
};
use crate::virtio::mmio::{Disagreement, MmioRestoreError, MMIO_NOTIFY_OFFSET};
use crate::virtio::test_queue::QUEUE_BASE;
use crate::virtio::{QueueRestoreError, QueueSetupError, INTERRUPT_USED_BUFFER};

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

const REG_QUEUE_SEL: u64 = 0x30;
const REG_QUEUE_NUM_MAX: u64 = 0x34;
const REG_QUEUE_READY: u64 = 0x44;
const REG_DEVICE_FEATURES: u64 = 0x10;
const REG_DEVICE_FEATURES_SEL: u64 = 0x14;
const REG_INTERRUPT_STATUS: u64 = 0x60;
const REG_INTERRUPT_ACK: u64 = 0x64;
const NEEDS_RESET: u32 = 0x40;

/// Requests served before the snapshot in [`workload`], and left waiting in the queue.
const SERVED: u16 = 3;
const WAITING: u16 = 2;

/// A disk behind its transport, with the VMM's event loop and interrupt line.
struct Rig {
    mem: GuestMemory,
    dev: VirtioBlock,
    irq: Arc<EventFd>,
    em: EventManager<Subscriber>,
}

impl Rig {
    fn wire(mem: GuestMemory, dev: VirtioBlock, irq: Arc<EventFd>) -> Self {
        let mut em = EventManager::<Subscriber>::new().unwrap();
        em.add_subscriber(dev.block.clone());
        Rig { mem, dev, irq, em }
    }

    /// Runs the event loop until nothing is ready.
    fn run(&mut self) {
        while self.em.run_with_timeout(0).unwrap() > 0 {}
    }

    /// The driver's kick, as KVM's ioeventfd delivers it.
    fn kick(&self) {
        self.dev.transport.queue_evts()[0].write(1).unwrap();
    }

    fn write(&mut self, offset: u64, value: u32) {
        write_reg(&mut self.dev.transport, offset, value);
    }

    fn read(&mut self, offset: u64) -> u32 {
        read_reg(&mut self.dev.transport, offset)
    }

    fn irq_fired(&self) -> bool {
        self.irq.read().is_ok()
    }
}

/// A new disk (see [`Harness`]) wired as the VMM wires it; the temporary directory holds the
/// image.
fn fresh() -> (Rig, PathBuf, TempDir) {
    let Harness {
        mem,
        block,
        irq,
        image,
        _dir,
        ..
    } = Harness::new();
    let block = Arc::new(Mutex::new(block));
    let transport = MmioTransport::new(mem.clone(), block.clone(), irq.clone());
    (
        Rig::wire(mem, VirtioBlock { block, transport }, irq),
        image,
        _dir,
    )
}

fn try_restore(
    state: &VirtioBlockState,
    mem: &GuestMemory,
    path: &Path,
) -> Result<Rig, VirtioBlockRestoreError> {
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let args = VirtioBlockArgs {
        mem: mem.clone(),
        path: path.to_owned(),
        interrupt: irq.clone(),
    };
    let dev = VirtioBlock::restore(args, state)?;
    Ok(Rig::wire(mem.clone(), dev, irq))
}

fn restore(state: &VirtioBlockState, mem: &GuestMemory, path: &Path) -> Rig {
    try_restore(state, mem, path).expect("restore")
}

/// A new guest memory with the same regions and every byte of `mem`.
fn copy_memory(mem: &GuestMemory) -> GuestMemory {
    let ranges: Vec<(GuestAddress, usize)> = mem
        .iter()
        .map(|r| (r.start_addr(), r.len() as usize))
        .collect();
    let copy = GuestMemory::from_ranges(&ranges).unwrap();
    for &(start, len) in &ranges {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, start).unwrap();
        copy.write_slice(&buf, start).unwrap();
    }
    copy
}

/// Descriptor head of test request `n`: chains of three, reused every five requests.
fn head(n: u16) -> u16 {
    (3 * n) % 15
}

/// Makes request `n` available: read sector `n` into its own buffer, with its own header and
/// status byte, so several can wait in the queue at once.
fn add_read(mem: &GuestMemory, vq: &TestQueue, n: u16) {
    let n64 = u64::from(n);
    let (header, data, status) = (HEADER + 16 * n64, DATA + 512 * n64, STATUS + n64);
    write_header(mem, header, T_IN, n64);
    mem.write_obj(UNTOUCHED, GuestAddress(status)).unwrap();
    vq.add_chain(head(n), &[r(header, 16), w(data, 512), w(status, 1)]);
}

/// The status byte of request `n`.
fn read_status(mem: &GuestMemory, n: u16) -> u8 {
    mem.read_obj(GuestAddress(STATUS + u64::from(n))).unwrap()
}

/// Checks request `n` completed: status OK, sector `n` in its buffer.
fn assert_read_done(mem: &GuestMemory, n: u16) {
    assert_eq!(read_status(mem, n), S_OK, "request {n}");
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA + 512 * u64::from(n)))
        .unwrap();
    let sector = u64::from(n) * SECTOR_SIZE;
    let expected: Vec<u8> = (sector..sector + SECTOR_SIZE).map(pattern).collect();
    assert_eq!(got, expected, "data of request {n}");
}

/// A device in the middle of its work: [`SERVED`] requests completed (interrupt not yet
/// acknowledged), [`WAITING`] more made available whose kick the device has not seen, and
/// registers away from their defaults.
fn workload() -> (Rig, TestQueue, PathBuf, TempDir) {
    let (mut rig, image, dir) = fresh();
    let vq = TestQueue::new(&rig.mem, QSIZE);
    driver_init(&mut rig.dev.transport, &vq);
    for n in 0..SERVED {
        add_read(&rig.mem, &vq, n);
    }
    rig.kick();
    rig.run();
    assert_eq!(vq.used_idx(), SERVED);
    for n in SERVED..SERVED + WAITING {
        add_read(&rig.mem, &vq, n);
    }
    rig.write(REG_QUEUE_SEL, 7);
    rig.write(REG_DEVICE_FEATURES_SEL, 1);
    (rig, vq, image, dir)
}

#[test]
fn save_restore_save_gives_the_same_state() {
    let (rig, _vq, image, _dir) = workload();
    let state = rig.dev.save();
    let live = state.block.queue.expect("active");
    assert_eq!(
        (live.queue.next_avail, live.queue.next_used),
        (SERVED, SERVED)
    );
    assert_eq!(state.transport.interrupt_status, INTERRUPT_USED_BUFFER);
    assert_eq!(
        (
            state.transport.queue_sel,
            state.transport.device_features_sel
        ),
        (7, 1)
    );

    let restored = restore(&state, &copy_memory(&rig.mem), &image);
    assert_eq!(restored.dev.save(), state);

    // A device the driver never touched.
    let (rig, image, _dir) = fresh();
    let state = rig.dev.save();
    assert!(state.block.queue.is_none());
    assert_eq!(restore(&state, &rig.mem, &image).dev.save(), state);
}

#[test]
fn restored_device_serves_waiting_then_new_requests_in_copied_memory() {
    let (mut old, _vq, image, _dir) = workload();
    let state = old.dev.save();
    let mem = copy_memory(&old.mem);
    let mut rig = restore(&state, &mem, &image);
    let vq = TestQueue::attach(&mem, QUEUE_BASE, QSIZE);
    assert_eq!(
        rig.read(REG_QUEUE_NUM_MAX),
        0,
        "QueueSel 7 restored: no such queue"
    );
    rig.write(REG_QUEUE_SEL, 0);
    assert_eq!(rig.read(REG_QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
    assert_eq!(rig.read(REG_QUEUE_READY), 1);
    assert!(
        rig.irq_fired(),
        "the unacknowledged interrupt is raised again"
    );

    // Requests served before the snapshot must not be served again.
    for n in 0..SERVED {
        mem.write_obj(UNTOUCHED, GuestAddress(STATUS + u64::from(n)))
            .unwrap();
    }

    // No kick: the requests made available before the snapshot are served as soon as the
    // event loop runs the device.
    rig.run();
    for n in 0..SERVED {
        assert_eq!(read_status(&mem, n), UNTOUCHED, "request {n} served twice");
    }
    assert_eq!(vq.used_idx(), SERVED + WAITING, "used index continues");
    for n in SERVED..SERVED + WAITING {
        assert_eq!(vq.used(n), (u32::from(head(n)), 513), "used entry {n}");
        assert_read_done(&mem, n);
    }
    assert!(rig.irq_fired());
    assert_eq!(rig.read(REG_INTERRUPT_STATUS), INTERRUPT_USED_BUFFER);
    rig.write(REG_INTERRUPT_ACK, INTERRUPT_USED_BUFFER);

    // New requests, kicked through the ioeventfd and through the register.
    let n = SERVED + WAITING;
    add_read(&mem, &vq, n);
    rig.kick();
    rig.run();
    assert_eq!(vq.used_idx(), n + 1);
    assert_read_done(&mem, n);
    add_read(&mem, &vq, n + 1);
    rig.write(MMIO_NOTIFY_OFFSET, 0);
    rig.run();
    assert_eq!(vq.used_idx(), n + 2);
    assert_eq!(vq.used(n + 1), (u32::from(head(n + 1)), 513));
    assert_read_done(&mem, n + 1);
    assert_eq!(rig.dev.block.lock().unwrap().metrics().requests, 4);

    // The old guest memory was left alone, and the old device still waits for its kick.
    assert_eq!(read_status(&old.mem, SERVED), UNTOUCHED);
    old.run();
    assert_eq!(read_status(&old.mem, SERVED), UNTOUCHED);
}

#[test]
fn disk_id_survives_a_restore_from_another_path() {
    let (mut old, image, _dir) = fresh();
    let vq = TestQueue::new(&old.mem, QSIZE);
    driver_init(&mut old.dev.transport, &vq);
    let id = old.dev.block.lock().unwrap().disk_id();
    assert!(id.starts_with("ferry-"), "derived from the path: {id}");
    let state = old.dev.save();
    assert_eq!(state.block.disk_id, id);

    let dir = TempDir::new_with_prefix("/tmp/ferry-devices-test-").unwrap();
    let moved = dir.as_path().join("elsewhere.raw");
    std::fs::copy(&image, &moved).unwrap();
    let mut rig = restore(&state, &copy_memory(&old.mem), &moved);
    let info = rig.dev.block.lock().unwrap().info();
    assert_eq!(info.path, moved.display().to_string());
    assert_eq!(info.id, id);

    // The guest reads the same serial.
    let vq = TestQueue::attach(&rig.mem, QUEUE_BASE, QSIZE);
    add_request(
        &rig.mem,
        &vq,
        0,
        T_GET_ID,
        0,
        &[w(DATA, DISK_ID_LEN as u32)],
    );
    rig.kick();
    rig.run();
    assert_eq!(vq.used_idx(), 1);
    let mut got = [0u8; DISK_ID_LEN];
    rig.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(&got[..id.len()], id.as_bytes());
    assert!(got[id.len()..].iter().all(|&b| b == 0));
}

#[test]
fn disk_id_with_inner_and_trailing_zeros_round_trips() {
    let h = Harness::with(SECTORS, false, Some("a\0b\0"));
    let mut bytes = [0u8; DISK_ID_LEN];
    bytes[..3].copy_from_slice(b"a\0b");
    let state = h.block.save();
    assert_eq!(state.disk_id, "a\0b");
    let restored = Block::restore(
        BlockArgs {
            backend: h.block.backend().clone(),
            mem: h.mem.clone(),
            interrupt: h.interrupt.clone(),
        },
        &state,
    )
    .unwrap();
    assert_eq!(restored.disk.id, bytes);
    assert_eq!(restored.save(), state);
}

#[test]
fn restored_unactivated_device_can_be_set_up_from_scratch() {
    let (old, image, _dir) = fresh();
    let state = old.dev.save();
    let mut rig = restore(&state, &old.mem, &image);
    assert!(!rig.irq_fired(), "nothing was pending");
    let vq = TestQueue::new(&rig.mem, QSIZE);
    driver_init(&mut rig.dev.transport, &vq);
    add_read(&rig.mem, &vq, 0);
    rig.kick();
    rig.run();
    assert_eq!(vq.used_idx(), 1);
    assert_read_done(&rig.mem, 0);
}

#[test]
fn restore_in_the_middle_of_queue_setup_lets_the_driver_finish() {
    let (mut old, image, _dir) = fresh();
    let vq = TestQueue::new(&old.mem, QSIZE);
    old.write(STATUS_REG, 1);
    old.write(STATUS_REG, 1 | 2);
    old.write(0x24, 1);
    old.write(0x20, 1); // VIRTIO_F_VERSION_1
    old.write(STATUS_REG, 1 | 2 | 8);
    old.write(REG_QUEUE_SEL, 0);
    old.write(0x38, u32::from(QSIZE));
    old.write(0x80, vq.desc_table_addr().0 as u32);
    let state = old.dev.save();
    assert_eq!(
        state.block.acked_features,
        crate::virtio::VIRTIO_F_VERSION_1
    );

    let mut rig = restore(&state, &copy_memory(&old.mem), &image);
    let vq = TestQueue::attach(&rig.mem, QUEUE_BASE, QSIZE);
    rig.write(0x90, vq.avail_addr().0 as u32);
    rig.write(0xa0, vq.used_addr().0 as u32);
    rig.write(REG_QUEUE_READY, 1);
    rig.write(STATUS_REG, ALL_OK);
    assert_eq!(
        rig.read(STATUS_REG),
        ALL_OK,
        "activated with what was set before"
    );
    add_read(&rig.mem, &vq, 0);
    rig.kick();
    rig.run();
    assert_eq!(vq.used_idx(), 1);
    assert_read_done(&rig.mem, 0);
}

#[test]
fn acknowledged_interrupt_is_not_raised_again() {
    let (mut old, _vq, image, _dir) = workload();
    old.write(REG_INTERRUPT_ACK, INTERRUPT_USED_BUFFER);
    let state = old.dev.save();
    assert_eq!(state.transport.interrupt_status, 0);
    let rig = restore(&state, &copy_memory(&old.mem), &image);
    assert!(!rig.irq_fired());
}

#[test]
fn broken_queue_stays_broken_until_the_driver_resets() {
    let (mut old, image, _dir) = fresh();
    let vq = TestQueue::new(&old.mem, QSIZE);
    driver_init(&mut old.dev.transport, &vq);
    vq.set_avail_idx(QSIZE + 1); // more entries than the queue holds
    old.kick();
    old.run();
    assert_eq!(old.read(STATUS_REG), ALL_OK | NEEDS_RESET);
    let state = old.dev.save();
    assert!(state.block.queue.is_some_and(|q| q.broken));

    let mut rig = restore(&state, &copy_memory(&old.mem), &image);
    assert_eq!(rig.read(STATUS_REG), ALL_OK | NEEDS_RESET);
    rig.run();
    assert_eq!(vq.used_idx(), 0);
    rig.write(STATUS_REG, 0);
    let vq = TestQueue::new(&rig.mem, QSIZE);
    driver_init(&mut rig.dev.transport, &vq);
    add_read(&rig.mem, &vq, 0);
    rig.kick();
    rig.run();
    assert_eq!(vq.used_idx(), 1);
}

#[test]
fn state_round_trips_through_serde_json() {
    let (rig, _vq, _image, _dir) = workload();
    let state = rig.dev.save();
    let json = serde_json::to_string(&state).unwrap();
    assert!(json.contains("\"next_used\":3"), "{json}");
    let back: VirtioBlockState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
}

#[test]
#[should_panic(expected = "not the transport's device")]
fn save_block_refuses_a_block_of_another_transport() {
    let (a, _image, _dir) = fresh();
    let (b, _image2, _dir2) = fresh();
    let block = b.dev.block.lock().unwrap();
    save_block(&a.dev.transport, &block);
}

/// The state of [`workload`], and what it needs to be restored.
fn hostile_setup() -> (VirtioBlockState, GuestMemory, PathBuf, TempDir) {
    let (rig, _vq, image, dir) = workload();
    let state = rig.dev.save();
    assert!(try_restore(&state, &rig.mem, &image).is_ok());
    (state, rig.mem.clone(), image, dir)
}

fn refused(state: &VirtioBlockState, mem: &GuestMemory, image: &Path) -> VirtioBlockRestoreError {
    match try_restore(state, mem, image) {
        Ok(_) => panic!("hostile state accepted: {state:?}"),
        Err(e) => e,
    }
}

/// Applies `change` to the saved live queue (if there is one) and to the transport's registers
/// of it alike, so the halves agree and the queue's own checks are what refuse it.
fn change_queue(state: &mut VirtioBlockState, change: impl Fn(&mut crate::virtio::VirtqueueState)) {
    let Some(live) = state.block.queue.as_mut().map(|q| &mut q.queue) else {
        return;
    };
    change(live);
    let cfg = live.config();
    let regs = &mut state.transport.queues[0];
    (regs.max_size, regs.size) = (cfg.max_size, cfg.size);
    (regs.desc, regs.driver, regs.device) = (cfg.desc, cfg.driver, cfg.device);
}

fn queue_error(e: VirtioBlockRestoreError) -> QueueRestoreError {
    match e {
        VirtioBlockRestoreError::Block(BlockRestoreError::Queue(e)) => e,
        other => panic!("not a queue error: {other:?}"),
    }
}

#[test]
fn queue_size_that_is_not_a_power_of_two_is_refused() {
    let (mut state, mem, image, _dir) = hostile_setup();
    change_queue(&mut state, |q| q.size = 3);
    let e = queue_error(refused(&state, &mem, &image));
    assert!(
        matches!(
            e,
            QueueRestoreError::Setup(QueueSetupError::Size { size: 3, .. })
        ),
        "{e:?}"
    );
    change_queue(&mut state, |q| q.size = QUEUE_SIZE * 2);
    let e = queue_error(refused(&state, &mem, &image));
    assert!(matches!(
        e,
        QueueRestoreError::Setup(QueueSetupError::Size { .. })
    ));
}

#[test]
fn rings_outside_guest_memory_are_refused() {
    let (mut state, mem, image, _dir) = hostile_setup();
    for (ring, addr) in [(0, MEM_END), (1, MEM_END - 2), (2, u64::MAX - 3)] {
        let mut s = state.clone();
        change_queue(&mut s, |q| match ring {
            0 => q.desc_table = addr,
            1 => q.avail_ring = addr,
            _ => q.used_ring = addr,
        });
        let e = queue_error(refused(&s, &mem, &image));
        assert!(
            matches!(
                e,
                QueueRestoreError::Setup(QueueSetupError::OutOfMemory { .. })
            ),
            "ring {ring}: {e:?}"
        );
    }
    change_queue(&mut state, |q| q.avail_ring = q.desc_table);
    let e = queue_error(refused(&state, &mem, &image));
    assert!(matches!(
        e,
        QueueRestoreError::Setup(QueueSetupError::Overlap(..))
    ));
    change_queue(&mut state, |q| q.max_size = 3);
    let e = queue_error(refused(&state, &mem, &image));
    assert!(
        matches!(e, QueueRestoreError::MaxSize { saved: 3, .. }),
        "{e:?}"
    );
}

#[test]
fn absurd_ring_indices_are_refused() {
    let (state, mem, image, _dir) = hostile_setup();
    // Indices far from the driver's are not the state's fault alone (the guest writes the
    // avail index): restore accepts them and the device sorts it out when it runs.
    let mut s = state.clone();
    change_queue(&mut s, |q| (q.next_avail, q.next_used) = (1000, 1000));
    assert!(try_restore(&s, &mem, &image).is_ok());

    // A chain taken but never returned: the driver would wait for it forever.
    let mut s = state.clone();
    change_queue(&mut s, |q| q.next_avail += 1);
    let e = queue_error(refused(&s, &mem, &image));
    assert!(
        matches!(e, QueueRestoreError::InFlight { in_flight: 1, .. }),
        "{e:?}"
    );
    let mut s = state;
    change_queue(&mut s, |q| q.next_used = q.next_used.wrapping_add(5));
    let e = queue_error(refused(&s, &mem, &image));
    assert!(matches!(e, QueueRestoreError::InFlight { .. }), "{e:?}");
}

/// Regression (found by fuzz/mmio_registers): a guest that writes a bogus available index and
/// never kicks made every restore of its VM fail, so it could block its own migration.
#[test]
fn a_bogus_avail_index_written_by_the_guest_does_not_block_restore() {
    let (state, mem, image, _dir) = hostile_setup();
    let avail = state
        .block
        .queue
        .as_ref()
        .expect("active queue")
        .queue
        .avail_ring;
    mem.write_obj(4096u16, vm_memory::GuestAddress(avail + 2))
        .unwrap();
    assert!(try_restore(&state, &mem, &image).is_ok());
}

#[test]
fn changed_disk_size_is_refused() {
    let (mut state, mem, image, _dir) = hostile_setup();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    file.set_len((SECTORS + 1) * SECTOR_SIZE).unwrap();
    let e = refused(&state, &mem, &image);
    assert!(
        matches!(
            e,
            VirtioBlockRestoreError::Block(BlockRestoreError::DiskSizeChanged {
                saved: SECTORS,
                found,
                ..
            }) if found == SECTORS + 1
        ),
        "{e:?}"
    );
    let VirtioBlockRestoreError::Block(inner) = e else {
        unreachable!()
    };
    assert!(
        inner.to_string().starts_with("disk size changed"),
        "{inner}"
    );

    file.set_len(SECTORS * SECTOR_SIZE).unwrap();
    state.block.capacity_sectors = u64::MAX;
    assert!(matches!(
        refused(&state, &mem, &image),
        VirtioBlockRestoreError::Block(BlockRestoreError::DiskSizeChanged { .. })
    ));
    let missing = image.with_file_name("missing.img");
    assert!(matches!(
        refused(&state, &mem, &missing),
        VirtioBlockRestoreError::Open(_)
    ));
}

#[test]
fn unknown_or_impossible_device_status_is_refused() {
    let (state, mem, image, _dir) = hostile_setup();
    for bits in [NEEDS_RESET, 0x100, 1 << 31] {
        let mut s = state.clone();
        s.transport.device_status |= bits;
        let e = refused(&s, &mem, &image);
        assert!(
            matches!(
                e,
                VirtioBlockRestoreError::Transport(MmioRestoreError::UnknownStatusBits { .. })
            ),
            "{bits:#x}: {e:?}"
        );
    }
    // An active device without DRIVER_OK; DRIVER_OK on an inactive device that is fine.
    let (fresh_rig, fresh_image, _fresh_dir) = fresh();
    let mut s = fresh_rig.dev.save();
    s.transport.device_status = 1 | 8; // ACKNOWLEDGE | FEATURES_OK, DRIVER skipped
    let e = refused(&s, &fresh_rig.mem, &fresh_image);
    assert!(
        matches!(
            e,
            VirtioBlockRestoreError::Transport(MmioRestoreError::StatusSkipsStep(9))
        ),
        "{e:?}"
    );
    let mut s = state.clone();
    s.block.queue = None;
    let e = refused(&s, &mem, &image);
    assert!(
        matches!(
            e,
            VirtioBlockRestoreError::Transport(MmioRestoreError::Activation { .. })
        ),
        "{e:?}"
    );
    let mut s = state;
    s.transport.interrupt_status |= 4;
    let e = refused(&s, &mem, &image);
    assert!(
        matches!(
            e,
            VirtioBlockRestoreError::Transport(MmioRestoreError::InterruptStatus(5))
        ),
        "{e:?}"
    );
}

#[test]
fn halves_that_disagree_or_features_never_offered_are_refused() {
    let (state, mem, image, _dir) = hostile_setup();
    let mut s = state.clone();
    s.block.acked_features = 0;
    assert!(matches!(
        refused(&s, &mem, &image),
        VirtioBlockRestoreError::Halves(Disagreement::Features { acked: 0, .. })
    ));
    let mut s = state.clone();
    s.transport.queues[0].desc += 0x100;
    assert!(matches!(
        refused(&s, &mem, &image),
        VirtioBlockRestoreError::Halves(Disagreement::Queue(0))
    ));
    let mut s = state.clone();
    s.block.acked_features |= 1 << 40;
    s.transport.driver_features |= 1 << 40;
    let e = refused(&s, &mem, &image);
    assert!(
        matches!(
            e,
            VirtioBlockRestoreError::Block(BlockRestoreError::Features { .. })
        ),
        "{e:?}"
    );
    let mut s = state.clone();
    s.transport.queues.push(s.transport.queues[0]);
    let e = refused(&s, &mem, &image);
    assert!(
        matches!(
            e,
            VirtioBlockRestoreError::Transport(MmioRestoreError::QueueCount { saved: 2, .. })
        ),
        "{e:?}"
    );
    let mut s = state;
    s.block.read_only = true; // offers RO: not the device the driver negotiated with
    let e = refused(&s, &mem, &image);
    assert!(
        matches!(
            e,
            VirtioBlockRestoreError::Transport(MmioRestoreError::DeviceFeatures { .. })
        ),
        "{e:?}"
    );
}

/// A small xorshift generator: the test is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Mostly values near what a real state holds, sometimes anything.
    fn value(&mut self) -> u64 {
        match self.next() % 4 {
            0 => self.next(),
            1 => self.next() % 32,
            2 => (self.next() % MEM_END) & !0xf,
            _ => QUEUE_BASE + self.next() % 0x400,
        }
    }
}

#[test]
fn mutated_states_never_panic_and_accepted_ones_are_restored_exactly() {
    let (state, mem, image, _dir) = hostile_setup();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut accepted = 0;
    for _ in 0..400 {
        let mut s = state.clone();
        for _ in 0..1 + rng.next() % 3 {
            let v = rng.value();
            let t = &mut s.transport;
            match rng.next() % 16 {
                0 => t.device_status = v as u32 & 0xff,
                1 => t.driver_features = v,
                2 => t.queues[0].size = v as u32,
                3 => t.interrupt_status = v as u32 & 7,
                4 => t.needs_reset = v & 1 != 0,
                5 => (t.queue_sel, t.driver_features_sel) = (v as u32, v as u32 >> 3),
                6 => s.block.capacity_sectors = v,
                7 => s.block.disk_id = "x".repeat(v as usize % 30),
                8 => s.block.queue = None,
                9 => s.block.acked_features = v,
                10 => change_queue(&mut s, |q| q.desc_table = v),
                11 => change_queue(&mut s, |q| q.avail_ring = v),
                12 => change_queue(&mut s, |q| q.used_ring = v),
                13 => change_queue(&mut s, |q| q.next_avail = v as u16),
                14 => change_queue(&mut s, |q| (q.next_used, q.size) = (v as u16, v as u16)),
                _ => {
                    if let Some(q) = s.block.queue.as_mut() {
                        q.broken = !q.broken;
                    }
                }
            }
        }
        if let Ok(rig) = try_restore(&s, &mem, &image) {
            accepted += 1;
            assert_eq!(rig.dev.save(), s, "an accepted state is restored exactly");
        }
    }
    assert!(accepted > 0, "some mutations are harmless");
}

#[test]
fn queue_registers_of_the_restored_transport_read_back() {
    let (mut old, _vq, image, _dir) = workload();
    let state = old.dev.save();
    let mut rig = restore(&state, &copy_memory(&old.mem), &image);
    // QueueSel is 7 and DeviceFeaturesSel 1: QueueNumMax reads 0, DeviceFeatures the high word.
    for reg in [REG_QUEUE_NUM_MAX, REG_DEVICE_FEATURES, STATUS_REG, 0xfc] {
        assert_eq!(rig.read(reg), old.read(reg), "register {reg:#x}");
    }
    for sel in [0, 1] {
        rig.write(REG_QUEUE_SEL, sel);
        old.write(REG_QUEUE_SEL, sel);
        for reg in [REG_QUEUE_NUM_MAX, REG_QUEUE_READY] {
            assert_eq!(
                rig.read(reg),
                old.read(reg),
                "queue {sel} register {reg:#x}"
            );
        }
    }
    let mut config = [[0u8; 24]; 2];
    rig.dev.transport.read(0x100, &mut config[0]);
    old.dev.transport.read(0x100, &mut config[1]);
    assert_eq!(config[0], config[1], "configuration space");
}
