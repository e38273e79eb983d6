//! Device models of the ferry VMM.
//!
//! Nothing here touches KVM: devices see guest memory through `vm-memory`, raise interrupts
//! through [`Interrupt`], and are reached by the VMM's bus through [`BusDevice`]. That keeps the
//! parsers of guest-controlled data (virtqueues, block requests) testable with plain memory.
//!
//! # Wiring a virtio-blk disk (what the VMM does)
//!
//! ```no_run
//! # use std::sync::{Arc, Mutex};
//! # use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
//! # use vmm_sys_util::eventfd::EventFd;
//! use ferry_devices::interrupt::Interrupt;
//! use ferry_devices::virtio::block::{Block, BlockConfig};
//! use ferry_devices::virtio::mmio::{MmioTransport, MMIO_NOTIFY_OFFSET, MMIO_WINDOW_SIZE};
//! # fn wire(mem: ferry_devices::GuestMemory, irq: EventFd, base: u64) -> Result<(), Box<dyn std::error::Error>> {
//! # let mut event_manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()?;
//! let block = Arc::new(Mutex::new(Block::new(BlockConfig {
//!     path: "disk.img".into(),
//!     read_only: false,
//!     id: None,
//! })?));
//! // `irq` is registered with KVM as an irqfd for the device's GSI.
//! let transport = MmioTransport::new(mem.clone(), block.clone(), Arc::new(irq) as Arc<dyn Interrupt>);
//! for (i, evt) in transport.queue_evts().iter().enumerate() {
//!     // KVM ioeventfd: address base + MMIO_NOTIFY_OFFSET, 4 bytes, datamatch i.
//! #   let _ = (i, evt, base + MMIO_NOTIFY_OFFSET);
//! }
//! event_manager.add_subscriber(block.clone()); // the device thread runs the manager
//! // mmio_bus.insert(base, MMIO_WINDOW_SIZE, Arc::new(Mutex::new(transport)))?;
//! # let _ = MMIO_WINDOW_SIZE;
//! let info = block.lock().unwrap().info(); // path, id, capacity, read_only, metrics
//! # let _ = info; Ok(()) }
//! ```
//!
//! The kernel finds the device with `virtio_mmio.device=4K@<base>:<irq>` on its command line
//! (or an ACPI/DT entry). The transport reports itself with [`virtio::MmioTransport::info`].
//!
//! # Saving and restoring it (snapshot, migration)
//!
//! Every stateful component implements [`Persist`]; for a disk the VMM saves and restores the
//! pair it wired, [`virtio::block::VirtioBlock`], so it keeps a handle on the transport besides
//! the one on the bus.
//!
//! ```no_run
//! # use std::sync::{Arc, Mutex};
//! # use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
//! # use vmm_sys_util::eventfd::EventFd;
//! use ferry_devices::interrupt::Interrupt;
//! use ferry_devices::virtio::block::{save_block, Block, VirtioBlock, VirtioBlockArgs, VirtioBlockState};
//! use ferry_devices::virtio::mmio::{MmioTransport, MMIO_NOTIFY_OFFSET};
//! use ferry_devices::Persist;
//!
//! // Source: the vCPUs and the device event loop are paused, so no request is in flight.
//! // Lock the transport before the block, as a vCPU does.
//! fn save(transport: &Mutex<MmioTransport>, block: &Mutex<Block>) -> VirtioBlockState {
//!     let transport = transport.lock().expect("not poisoned");
//!     let block = block.lock().expect("not poisoned");
//!     save_block(&transport, &block) // serde: goes into the VM's state tree
//! }
//!
//! // Destination: guest memory already holds the source's contents; `irq` is the irqfd.
//! # fn restore(mem: ferry_devices::GuestMemory, irq: EventFd, base: u64, state: &VirtioBlockState) -> Result<(), Box<dyn std::error::Error>> {
//! # let mut event_manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()?;
//! let VirtioBlock { block, transport } = VirtioBlock::restore(
//!     VirtioBlockArgs {
//!         mem,
//!         path: "/images/vm1.raw".into(), // may differ from the source's; same size
//!         interrupt: Arc::new(irq) as Arc<dyn Interrupt>,
//!     },
//!     state,
//! )?;
//! for (i, evt) in transport.queue_evts().iter().enumerate() {
//!     // KVM ioeventfd at base + MMIO_NOTIFY_OFFSET, datamatch i, as for a new disk.
//! #   let _ = (i, evt, base + MMIO_NOTIFY_OFFSET);
//! }
//! // The device starts serving as soon as the loop runs it, the requests the guest queued
//! // before the snapshot first.
//! event_manager.add_subscriber(block.clone());
//! // mmio_bus.insert(base, MMIO_WINDOW_SIZE, Arc::new(Mutex::new(transport)))?;
//! # Ok(()) }
//! ```

pub mod bus;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod interrupt;
pub mod persist;
mod ratelimit;
pub mod virtio;
pub mod zeroed;

pub use bus::BusDevice;
pub use interrupt::Interrupt;
pub use persist::Persist;

/// Guest memory as every device sees it. The bitmap records each write a device makes through
/// `vm-memory`, so the migration can add device writes to KVM's dirty log.
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
