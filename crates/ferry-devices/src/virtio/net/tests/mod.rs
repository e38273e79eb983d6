//! Tests of the NIC, with virtqueues laid out in plain memory (`TestQueue`) and a datagram
//! socket pair standing in for the tap (one datagram, one frame).

mod hostile;
mod persist;
mod queues;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
pub(super) use crate::virtio::test_queue::{r, w, TestQueue};
use crate::virtio::{VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::GuestMemory;

pub(super) const MEM_END: u64 = 0x10_0000;
/// Where the three test queues live.
pub(super) const RXQ: u64 = 0x1000;
pub(super) const TXQ: u64 = 0x8000;
pub(super) const CTRLQ: u64 = 0xf000;
/// Receive buffers, transmitted frames, control commands.
pub(super) const RX_BUF: u64 = 0x2_0000;
pub(super) const TX_BUF: u64 = 0x4_0000;
pub(super) const CTRL_BUF: u64 = 0x6_0000;
pub(super) const QSIZE: u16 = 16;
pub(super) const MAC: Mac = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
pub(super) const F_CTRL_VQ: u64 = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ;
pub(super) const F_ANNOUNCE: u64 = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_ANNOUNCE;

/// The host end of the test "tap": what the device sends, the test receives here.
#[derive(Debug)]
pub(super) struct PairBackend {
    sock: UnixDatagram,
}

impl NetBackend for PairBackend {
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.sock.recv(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        self.sock.send(frame).map(drop)
    }

    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn name(&self) -> &str {
        "pair"
    }
}

pub(super) fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_END as usize)]).expect("test guest memory")
}

/// An Ethernet frame of `len` bytes from `src` with a recognizable payload.
pub(super) fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    f[0..6].copy_from_slice(&MAC);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, seed]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental ethertype: not IP
    f
}

/// A NIC over a socket pair, with the driver's view of its queues.
pub(super) struct Harness {
    pub mem: GuestMemory,
    pub net: Net,
    pub host: UnixDatagram,
    pub interrupt: Arc<VirtioInterrupt>,
    pub irq: Arc<EventFd>,
    pub rx: TestQueue,
    pub tx: TestQueue,
    pub ctrl: TestQueue,
}

impl Harness {
    pub fn new() -> Harness {
        let (device_end, host) = UnixDatagram::pair().expect("socket pair");
        device_end.set_nonblocking(true).expect("nonblocking");
        host.set_nonblocking(true).expect("nonblocking");
        let backend = Arc::new(PairBackend { sock: device_end });
        let net = Net::new(backend, NetConfig { mac: MAC }).expect("net device");
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let interrupt = Arc::new(VirtioInterrupt::new(irq.clone()));
        let mem = guest_memory();
        Harness {
            rx: TestQueue::at(&mem, RXQ, QSIZE),
            tx: TestQueue::at(&mem, TXQ, QSIZE),
            ctrl: TestQueue::at(&mem, CTRLQ, QSIZE),
            mem,
            net,
            host,
            interrupt,
            irq,
        }
    }

    /// Negotiates `features` (VERSION_1 added) and activates with all three queues.
    pub fn activate(&mut self, features: u64) {
        self.net.ack_features(features | VIRTIO_F_VERSION_1);
        let queues = vec![
            self.rx.queue_with_max(QUEUE_SIZE),
            self.tx.queue_with_max(QUEUE_SIZE),
            self.ctrl.queue_with_max(QUEUE_SIZE),
        ];
        self.net
            .activate(self.mem.clone(), queues, self.interrupt.clone())
            .expect("activation");
    }

    /// Makes `n` receive buffers of `len` bytes available, one descriptor each, from
    /// descriptor `first` on.
    pub fn give_rx(&self, first: u16, n: u16, len: u32) {
        for i in 0..n {
            let index = first + i;
            self.rx
                .add_chain(index, &[w(RX_BUF + u64::from(index) * 0x1000, len)]);
        }
    }

    /// Queues `frame` (behind a header of `hdr_byte`s) for transmission in one descriptor.
    pub fn queue_tx(&self, index: u16, frame: &[u8], hdr_byte: u8) {
        let mut bytes = vec![hdr_byte; NET_HDR_LEN];
        bytes.extend_from_slice(frame);
        let addr = TX_BUF + u64::from(index) * 0x1000;
        self.mem
            .write_slice(&bytes, GuestAddress(addr))
            .expect("in memory");
        self.tx.add_chain(index, &[r(addr, bytes.len() as u32)]);
    }

    /// The host sends `frame` to the guest (behind a host header of `hdr_byte`s).
    pub fn host_sends(&self, frame: &[u8], hdr_byte: u8) {
        let mut bytes = vec![hdr_byte; NET_HDR_LEN];
        bytes.extend_from_slice(frame);
        self.host.send(&bytes).expect("host send");
    }

    /// The next frame the device sent to the host, header included.
    pub fn host_receives(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        match self.host.recv(&mut buf) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(_) => None,
        }
    }

    pub fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(addr))
            .expect("in memory");
        buf
    }

    /// Whether the interrupt line was raised since the last call.
    pub fn irq_fired(&self) -> bool {
        self.irq.read().is_ok()
    }
}

pub(super) fn dirty(mem: &GuestMemory, addr: u64) -> bool {
    let region = mem
        .find_region(GuestAddress(addr))
        .expect("address in memory");
    let offset = addr - region.start_addr().0;
    MmapRegion::bitmap(region).dirty_at(offset as usize)
}
