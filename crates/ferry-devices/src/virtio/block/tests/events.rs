//! The device driven the way the VMM drives it: through the MMIO transport and an
//! event-manager loop. Also: device writes into guest memory reach the dirty bitmap.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use super::*;
use crate::virtio::block::device::REQUESTS_PER_PASS;
use crate::virtio::mmio::{MmioTransport, MMIO_NOTIFY_OFFSET};
use crate::virtio::INTERRUPT_USED_BUFFER;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[test]
fn event_manager_drives_the_device_end_to_end() {
    let Harness {
        mem,
        block,
        irq,
        _dir,
        ..
    } = Harness::new();
    let block = Arc::new(Mutex::new(block));
    let mut em = EventManager::<Subscriber>::new().unwrap();
    em.add_subscriber(block.clone());
    let mut transport = MmioTransport::new(mem.clone(), block.clone(), irq.clone());
    assert_eq!(transport.queue_evts().len(), 1);

    let vq = TestQueue::new(&mem, QSIZE);
    driver_init(&mut transport, &vq);
    assert!(block.lock().unwrap().is_activated());
    // The activation eventfd wakes the loop, which starts watching the queue.
    assert_eq!(em.run_with_timeout(0).unwrap(), 1);

    // A kick through the queue eventfd, as KVM's ioeventfd delivers it.
    add_request(&mem, &vq, 0, T_IN, 3, &[w(DATA, 512)]);
    transport.queue_evts()[0].write(1).unwrap();
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(vq.used_idx(), 1);
    assert_eq!(vq.used(0), (0, 513));
    let expected: Vec<u8> = (3 * 512..4 * 512).map(pattern).collect();
    let mut got = vec![0u8; 512];
    vm_memory::Bytes::read_slice(&mem, &mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, expected);
    assert_eq!(irq.read().unwrap(), 1, "interrupt raised once");
    assert_eq!(read_reg(&mut transport, 0x60), INTERRUPT_USED_BUFFER);
    write_reg(&mut transport, 0x64, INTERRUPT_USED_BUFFER);
    assert_eq!(read_reg(&mut transport, 0x60), 0, "acknowledged");

    // A notification that reaches the transport (no ioeventfd) works the same.
    add_request(&mem, &vq, 3, T_FLUSH, 0, &[]);
    write_reg(&mut transport, MMIO_NOTIFY_OFFSET, 0);
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(vq.used_idx(), 2);
    assert_eq!(transport.metrics().notifications, 1);

    // After a reset kicks are drained and ignored.
    write_reg(&mut transport, STATUS_REG, 0);
    assert!(!block.lock().unwrap().is_activated());
    add_request(&mem, &vq, 6, T_IN, 0, &[w(DATA, 512)]);
    transport.queue_evts()[0].write(1).unwrap();
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(vq.used_idx(), 2);
    assert_eq!(em.run_with_timeout(0).unwrap(), 0, "the kick was drained");

    // The driver starts over with fresh rings; the queue eventfd is still watched.
    let vq = TestQueue::new(&mem, QSIZE);
    driver_init(&mut transport, &vq);
    em.run_with_timeout(0).unwrap();
    add_request(&mem, &vq, 0, T_IN, 1, &[w(DATA, 512)]);
    transport.queue_evts()[0].write(1).unwrap();
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(vq.used_idx(), 1);
    assert_eq!(block.lock().unwrap().metrics().requests, 3);
}

#[test]
fn requests_queued_before_the_loop_saw_the_activation_are_served() {
    let Harness {
        mem, block, _dir, ..
    } = Harness::new();
    let irq = Arc::new(vmm_sys_util::eventfd::EventFd::new(0).unwrap());
    let block = Arc::new(Mutex::new(block));
    let mut transport = MmioTransport::new(mem.clone(), block.clone(), irq);
    let vq = TestQueue::new(&mem, QSIZE);
    driver_init(&mut transport, &vq);
    add_request(&mem, &vq, 0, T_IN, 3, &[w(DATA, 512)]);
    transport.queue_evts()[0].write(1).unwrap();

    // The subscriber joins the loop only now.
    let mut em = EventManager::<Subscriber>::new().unwrap();
    em.add_subscriber(block.clone());
    em.run_with_timeout(0).unwrap();
    assert_eq!(vq.used_idx(), 1);
}

#[test]
fn a_long_queue_is_served_in_slices_that_re_arm_the_eventfd() {
    let Harness {
        mem,
        block,
        irq,
        _dir,
        ..
    } = Harness::new();
    let block = Arc::new(Mutex::new(block));
    let mut em = EventManager::<Subscriber>::new().unwrap();
    em.add_subscriber(block.clone());
    let vq = TestQueue::new(&mem, 128);
    let interrupt = Arc::new(VirtioInterrupt::new(irq));
    block
        .lock()
        .unwrap()
        .activate(mem.clone(), vec![vq.queue()], interrupt)
        .unwrap();
    assert_eq!(em.run_with_timeout(0).unwrap(), 1, "activation");

    // 100 flushes (all the same chain, which the device does not mind).
    add_request(&mem, &vq, 0, T_FLUSH, 0, &[]);
    for _ in 1..100 {
        vq.publish(0);
    }
    let kick = block.lock().unwrap().queue_events();
    kick[0].write(1).unwrap();
    assert_eq!(em.run_with_timeout(0).unwrap(), 1);
    assert_eq!(vq.used_idx(), REQUESTS_PER_PASS);
    assert_eq!(
        em.run_with_timeout(0).unwrap(),
        1,
        "the device kicked itself"
    );
    assert_eq!(vq.used_idx(), 100);
    assert_eq!(em.run_with_timeout(0).unwrap(), 0);
}

fn dirty(mem: &GuestMemory, addr: u64) -> bool {
    let region = mem
        .find_region(GuestAddress(addr))
        .expect("address in memory");
    let offset = addr - region.start_addr().0;
    MmapRegion::bitmap(region).dirty_at(offset as usize)
}

#[test]
fn device_writes_mark_guest_pages_dirty() {
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);
    let data = DATA + 0x3000;
    add_request(&mem, &vq, 0, T_IN, 0, &[w(data, 8192)]);
    // Forget the test's own writes.
    for region in mem.iter() {
        MmapRegion::bitmap(region).reset();
    }
    assert!(!dirty(&mem, data));

    h.run();
    assert_eq!(h.status(), S_OK);
    for addr in [data, data + 4096, data + 8191] {
        assert!(dirty(&mem, addr), "data page {addr:#x}");
    }
    assert!(dirty(&mem, STATUS), "status byte");
    assert!(dirty(&mem, vq.used_addr().0), "used ring");
    assert!(!dirty(&mem, data + 8192), "page after the buffer");
    assert!(!dirty(&mem, HEADER), "the header is only read");
}

#[test]
fn disk_writes_do_not_dirty_guest_memory() {
    let mut h = Harness::new();
    let mem = h.mem.clone();
    let vq = TestQueue::new(&mem, QSIZE);
    h.activate(&vq);
    add_request(&mem, &vq, 0, T_OUT, 0, &[r(DATA, 4096)]);
    for region in mem.iter() {
        MmapRegion::bitmap(region).reset();
    }
    h.run();
    assert_eq!(h.status(), S_OK);
    assert!(!dirty(&mem, DATA), "the data was only read");
    assert!(dirty(&mem, STATUS));
}
