//! Hooks for the fuzz targets in `fuzz/` (cargo feature `fuzzing`, off by default).
//!
//! The targets drive the device models with guest memory, descriptors and register accesses
//! taken from the fuzzer's input. Most of what they need is public API; this module adds what
//! is not: serving a block queue the way the device's event loop does on a kick, and bringing a
//! device up through its transport the way a driver does. It is no API for anything else and
//! changes with the targets.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio as reg;
use vm_memory::{Bytes, GuestAddress};

use crate::bus::BusDevice;
use crate::interrupt::Interrupt;
use crate::persist::Persist;
use crate::virtio::block::Block;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::VirtioDevice;
use crate::GuestMemory;

/// Bytes of the guest memory of [`guest_memory`]: two adjacent regions of half this size, so
/// a buffer or a ring can straddle a region boundary.
pub const MEMORY_SIZE: u64 = 0x8000;

/// Passes over the queue in [`run_block_queue`]: as many kicks at most.
pub const MAX_PASSES: usize = 8;

/// Guest memory of [`MEMORY_SIZE`] bytes at address 0 that holds `image` from address 0 (cut
/// to fit; the rest is zero).
pub fn guest_memory(image: &[u8]) -> GuestMemory {
    let half = MEMORY_SIZE / 2;
    let mem = GuestMemory::from_ranges(&[
        (GuestAddress(0), half as usize),
        (GuestAddress(half), half as usize),
    ])
    .expect("two small anonymous mappings");
    let len = image.len().min(MEMORY_SIZE as usize);
    mem.write_slice(&image[..len], GuestAddress(0))
        .expect("the image was cut to the memory size");
    mem
}

/// An interrupt line that goes nowhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullInterrupt;

impl Interrupt for NullInterrupt {
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Serves `block`'s request queue once, as the device's event loop does when the driver kicks
/// it. Returns whether requests may be left.
pub fn serve_block_queue(block: &mut Block) -> bool {
    block.process_queue()
}

/// Queue 0 as a driver writes it into the queue registers. Nothing is checked here: the
/// transport checks it at DRIVER_OK.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueLayout {
    /// QueueNum.
    pub size: u32,
    /// QueueDesc: the descriptor table.
    pub desc: u64,
    /// QueueDriver: the available ring.
    pub driver: u64,
    /// QueueDevice: the used ring.
    pub device: u64,
}

/// `N` queue layouts from the fuzzer's input at `at`, 7 bytes each: log2 of the size (u8),
/// then the descriptor table, available ring and used ring addresses (u16 LE each). `None` if
/// the input is too short.
pub fn queue_layouts<const N: usize>(data: &[u8], at: usize) -> Option<[QueueLayout; N]> {
    let u16_at = |i: usize| Some(u16::from_le_bytes([*data.get(i)?, *data.get(i + 1)?]));
    let mut layouts = [QueueLayout::default(); N];
    for (i, l) in layouts.iter_mut().enumerate() {
        let at = at + i * 7;
        *l = QueueLayout {
            size: 1 << (data.get(at)? & 0xf),
            desc: u64::from(u16_at(at + 1)?),
            driver: u64::from(u16_at(at + 3)?),
            device: u64::from(u16_at(at + 5)?),
        };
    }
    Some(layouts)
}

/// Writes the registers a Linux-like driver writes to bring up a device with queue 0 at
/// `layout`: ACKNOWLEDGE, DRIVER, the features (VERSION_1 and `features_low`), FEATURES_OK,
/// the queue, QueueReady, DRIVER_OK. Whether the device came up is for the caller to ask.
pub fn driver_init(transport: &mut MmioTransport, layout: QueueLayout, features_low: u32) {
    driver_init_queues(transport, &[layout], features_low);
}

/// [`driver_init`] with queue `i` at `layouts[i]`.
pub fn driver_init_queues(
    transport: &mut MmioTransport,
    layouts: &[QueueLayout],
    features_low: u32,
) {
    let mut write =
        |offset: u32, value: u32| transport.write(u64::from(offset), &value.to_le_bytes());
    let (ack, driver) = (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER);
    write(reg::VIRTIO_MMIO_STATUS, ack);
    write(reg::VIRTIO_MMIO_STATUS, ack | driver);
    write(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write(reg::VIRTIO_MMIO_DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1 is bit 32.
    write(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    write(reg::VIRTIO_MMIO_DRIVER_FEATURES, features_low);
    let features_ok = ack | driver | VIRTIO_CONFIG_S_FEATURES_OK;
    write(reg::VIRTIO_MMIO_STATUS, features_ok);
    for (i, layout) in layouts.iter().enumerate() {
        write(reg::VIRTIO_MMIO_QUEUE_SEL, i as u32);
        write(reg::VIRTIO_MMIO_QUEUE_NUM, layout.size);
        // Each address is a low register and the high one after it.
        for (low, addr) in [
            (reg::VIRTIO_MMIO_QUEUE_DESC_LOW, layout.desc),
            (reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, layout.driver),
            (reg::VIRTIO_MMIO_QUEUE_USED_LOW, layout.device),
        ] {
            write(low, addr as u32);
            write(low + 4, (addr >> 32) as u32);
        }
        write(reg::VIRTIO_MMIO_QUEUE_READY, 1);
    }
    write(
        reg::VIRTIO_MMIO_STATUS,
        features_ok | VIRTIO_CONFIG_S_DRIVER_OK,
    );
}

/// What the device did with a queue in [`run_block_queue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueRun {
    /// Chains taken from the available ring (the queue's `next_avail`; it starts at 0 and
    /// cannot wrap in [`MAX_PASSES`] passes).
    pub consumed: u16,
    /// Chains put in the used ring (`next_used`).
    pub returned: u16,
    /// Requests the device served (counted before each goes back to the used ring).
    pub requests: u64,
    /// The device gave up on the queue until a reset.
    pub broken: bool,
    /// The transport reports DEVICE_NEEDS_RESET.
    pub needs_reset: bool,
    /// The device still had requests after the last pass.
    pub more: bool,
}

/// Puts `block` behind a virtio-mmio transport over [`guest_memory`]`(memory_image)`, brings
/// it up with [`driver_init`] and queue 0 at `layout`, serves the queue as kicks would, at most
/// [`MAX_PASSES`] times, and reports what the device did. `None` if the device did not come up
/// (the transport refused the layout, so the device never saw the queue).
pub fn run_block_queue(block: Block, memory_image: &[u8], layout: QueueLayout) -> Option<QueueRun> {
    let mem = guest_memory(memory_image);
    let block = Arc::new(Mutex::new(block));
    let mut transport = MmioTransport::new(mem, block.clone(), Arc::new(NullInterrupt));
    driver_init(&mut transport, layout, 0);
    let mut block = block.lock().unwrap_or_else(PoisonError::into_inner);
    if !block.is_activated() {
        return None;
    }
    let mut more = true;
    for _ in 0..MAX_PASSES {
        if !more {
            break;
        }
        more = block.process_queue();
    }
    let queue = block.save().queue?;
    Some(QueueRun {
        consumed: queue.queue.next_avail,
        returned: queue.queue.next_used,
        requests: block.metrics().requests,
        broken: queue.broken,
        needs_reset: transport.interrupt().needs_reset(),
        more,
    })
}

/// What the NIC did with one of its queues in [`run_net_queues`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetQueueRun {
    /// Chains taken from the available ring, and put in the used ring.
    pub consumed: u16,
    pub returned: u16,
    pub broken: bool,
}

/// What the NIC did in [`run_net_queues`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRun {
    pub rx: NetQueueRun,
    pub tx: NetQueueRun,
    pub ctrl: Option<NetQueueRun>,
    pub needs_reset: bool,
    /// Frames that reached the host end of the backend.
    pub frames_out: usize,
}

/// Puts a NIC over a socket pair behind a virtio-mmio transport over
/// [`guest_memory`]`(memory_image)`, brings it up with its queues at `layouts` (the control
/// queue too if `ctrl`), has the host send `host_frames`, serves every queue as kicks would
/// ([`MAX_PASSES`] times each), and reports what the device did. `None` if the device did not
/// come up.
pub fn run_net_queues(
    memory_image: &[u8],
    layouts: [QueueLayout; 3],
    ctrl: bool,
    host_frames: &[&[u8]],
) -> Option<NetRun> {
    use std::os::unix::net::UnixDatagram;

    use crate::virtio::net::{Net, NetConfig};

    let (device_end, host) = UnixDatagram::pair().ok()?;
    device_end.set_nonblocking(true).ok()?;
    host.set_nonblocking(true).ok()?;
    let backend = Arc::new(DatagramBackend(device_end));
    let net = Net::new(
        backend,
        NetConfig {
            mac: [2, 0, 0, 0, 0, 1],
        },
    )
    .ok()?;
    let net = Arc::new(Mutex::new(net));
    let mem = guest_memory(memory_image);
    let mut transport = MmioTransport::new(mem, net.clone(), Arc::new(NullInterrupt));
    let ctrl_bit = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ;
    let queues = if ctrl { &layouts[..] } else { &layouts[..2] };
    driver_init_queues(&mut transport, queues, if ctrl { ctrl_bit } else { 0 });
    let mut net = net.lock().unwrap_or_else(PoisonError::into_inner);
    if !net.is_activated() {
        return None;
    }
    for frame in host_frames {
        let _ = host.send(frame);
    }
    for _ in 0..MAX_PASSES {
        net.process_tx();
        net.process_ctrl();
        net.process_rx();
    }
    let mut frames_out = 0;
    let mut buf = vec![0u8; 1 << 17];
    while host.recv(&mut buf).is_ok() {
        frames_out += 1;
    }
    let queues = net.save().queues?;
    let run = |q: &crate::virtio::net::NetQueueState| NetQueueRun {
        consumed: q.queue.next_avail,
        returned: q.queue.next_used,
        broken: q.broken,
    };
    Some(NetRun {
        rx: run(&queues.rx),
        tx: run(&queues.tx),
        ctrl: queues.ctrl.as_ref().map(run),
        needs_reset: transport.interrupt().needs_reset(),
        frames_out,
    })
}

/// What the balloon did in [`run_balloon_queues`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonRun {
    /// One per queue the features use, in queue order.
    pub queues: Vec<NetQueueRun>,
    /// The statistics queue's index, if negotiated.
    pub stats_queue: Option<usize>,
    /// The device holds a statistics chain.
    pub stats_held: bool,
    pub needs_reset: bool,
}

/// Puts a balloon behind a virtio-mmio transport over [`guest_memory`]`(memory_image)`,
/// brings it up with `features_low` (its optional feature bits) and its queues at
/// `layouts` (as many as the features use), starts a free page hint command, serves every
/// queue as kicks would ([`MAX_PASSES`] times each, asking for statistics between passes)
/// and reports what the device did. `None` if the device did not come up.
pub fn run_balloon_queues(
    memory_image: &[u8],
    layouts: &[QueueLayout],
    features_low: u32,
) -> Option<BalloonRun> {
    use crate::virtio::balloon::{roles, Balloon, Role};

    let balloon = Arc::new(Mutex::new(Balloon::new().ok()?));
    let mem = guest_memory(memory_image);
    let mut transport = MmioTransport::new(mem, balloon.clone(), Arc::new(NullInterrupt));
    let used = roles(u64::from(features_low)).len();
    driver_init_queues(
        &mut transport,
        &layouts[..used.min(layouts.len())],
        features_low,
    );
    let mut balloon = balloon.lock().unwrap_or_else(PoisonError::into_inner);
    if !balloon.is_activated() {
        return None;
    }
    balloon.start_hinting();
    for pass in 0..MAX_PASSES {
        for q in 0..used {
            balloon.process_queue(q);
        }
        if pass % 2 == 1 {
            balloon.request_stats();
        }
    }
    balloon.finish_hinting();
    let state = balloon.save();
    let features = state.acked_features;
    let queues = state.queues?;
    Some(BalloonRun {
        queues: queues
            .iter()
            .map(|q| NetQueueRun {
                consumed: q.queue.next_avail,
                returned: q.queue.next_used,
                broken: q.broken,
            })
            .collect(),
        stats_queue: roles(features).iter().position(|&r| r == Role::Stats),
        stats_held: state.stats_head.is_some(),
        needs_reset: transport.interrupt().needs_reset(),
    })
}

/// A NIC backend over one end of a datagram socket pair: one datagram, one frame.
#[derive(Debug)]
struct DatagramBackend(std::os::unix::net::UnixDatagram);

impl crate::virtio::net::NetBackend for DatagramBackend {
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.0.recv(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        self.0.send(frame).map(drop)
    }

    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.0)
    }

    fn name(&self) -> &str {
        "fuzz"
    }
}
