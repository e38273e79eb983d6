//! Receiving the stream: a reader thread takes messages off the socket into reused buffers
//! and checks them against the protocol; the main thread writes pages into guest memory and
//! reports its progress (Applied) to the source, so the source knows the backlog.

use std::io::BufReader;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_devices::GuestMemory;
use ferry_proto::migration::{
    read_message_reusing, Message, PageDecoder, PageRecord, ReceiverMachine, PAGE_SIZE,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::prefault::Prefaulter;

/// Messages read ahead of the one being applied.
const READ_AHEAD: usize = 3;

/// The reader thread's end of the pipeline.
#[derive(Debug)]
pub struct Reader {
    messages: Receiver<Result<Message, String>>,
    spent: SyncSender<Vec<u8>>,
    thread: Option<JoinHandle<()>>,
}

impl Reader {
    /// Starts reading `reader`; every message is checked by `machine` before it is passed on,
    /// and the memory a page batch will fill is faulted in by `prefault` on the way.
    pub fn start(
        reader: BufReader<Box<dyn std::io::Read + Send>>,
        machine: Arc<Mutex<ReceiverMachine>>,
        mut prefault: Option<Prefaulter>,
    ) -> std::io::Result<Reader> {
        let (tx, messages) = mpsc::sync_channel(READ_AHEAD);
        let (spent, buffers) = mpsc::sync_channel::<Vec<u8>>(READ_AHEAD + 2);
        let thread = crate::sched::spawn("ferry-recv".into(), move || {
            read_loop(reader, &machine, &tx, &buffers, prefault.as_mut())
        })?;
        Ok(Reader {
            messages,
            spent,
            thread: Some(thread),
        })
    }

    /// The next message. The socket's read timeout bounds the wait.
    pub fn next(&self) -> Result<Message, String> {
        self.messages
            .recv()
            .map_err(|_| "the migration connection ended".to_string())?
    }

    /// Gives a message's buffer (pages, blocks) back for the next read.
    pub fn recycle(&self, buffer: Vec<u8>) {
        let _ = self.spent.try_send(buffer);
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // The thread ends at the socket's next error or timeout; do not wait for it here.
        drop(self.thread.take());
    }
}

fn read_loop(
    mut reader: BufReader<Box<dyn std::io::Read + Send>>,
    machine: &Mutex<ReceiverMachine>,
    out: &SyncSender<Result<Message, String>>,
    buffers: &Receiver<Vec<u8>>,
    mut prefault: Option<&mut Prefaulter>,
) {
    loop {
        let spare = buffers.try_recv().unwrap_or_default();
        let result = read_message_reusing(&mut reader, spare)
            .map_err(|e| format!("reading from the source: {}", crate::error_chain(&e)))
            .and_then(|m| {
                let mut machine = machine.lock().unwrap_or_else(|p| p.into_inner());
                machine.received(&m).map_err(|e| e.to_string())?;
                Ok(m)
            });
        if let (Ok(Message::Pages(batch)), Some(p)) = (&result, prefault.as_deref_mut()) {
            p.batch(batch);
        }
        let end = result.is_err();
        if out.send(result).is_err() || end {
            return;
        }
    }
}

/// Totals applied so far, as Applied reports them.
#[derive(Debug, Default, Clone, Copy)]
pub struct AppliedTotals {
    pub bytes: u64,
    pub pages: u64,
    /// Of `bytes`, disk block data.
    pub disk_bytes: u64,
    /// When the last Applied went out.
    pub reported_at: Option<Instant>,
}

impl AppliedTotals {
    /// Whether to report now: after every batch, but not more often than every `every`.
    pub fn due(&self, every: Duration) -> bool {
        self.reported_at.is_none_or(|t| t.elapsed() >= every)
    }
}

/// Writes page records into guest memory, decoding encoded ones.
#[derive(Debug)]
pub struct PageApplier {
    decoder: PageDecoder,
    /// One page: an encoded page is decoded here, then written (for delta, the current page is
    /// read in first).
    scratch: Vec<u8>,
}

impl Default for PageApplier {
    fn default() -> Self {
        PageApplier {
            decoder: PageDecoder::new(),
            scratch: vec![0; PAGE_SIZE as usize],
        }
    }
}

impl PageApplier {
    /// Writes one page record into guest memory; records outside RAM and bodies that do not
    /// decode are refused. Returns the page data bytes written (a decoded page counts whole,
    /// as the source counts what it sent).
    pub fn apply(&mut self, mem: &GuestMemory, record: PageRecord<'_>) -> Result<u64, String> {
        match record {
            PageRecord::Data { gpa, bytes } => write_page(mem, gpa, bytes),
            PageRecord::Encoded { gpa, codec, body } => {
                if codec.reads_old_page() {
                    mem.read_slice(&mut self.scratch, GuestAddress(gpa))
                        .map_err(|e| format!("page {gpa:#x} is not in guest memory: {e}"))?;
                }
                self.decoder
                    .decode(codec, body, &mut self.scratch)
                    .map_err(|e| format!("page {gpa:#x}: {e}"))?;
                write_page(mem, gpa, &self.scratch)
            }
            PageRecord::Zero { gpa, pages } => zero_pages(mem, gpa, pages).map(|()| 0),
        }
    }
}

fn write_page(mem: &GuestMemory, gpa: u64, bytes: &[u8]) -> Result<u64, String> {
    mem.write_slice(bytes, GuestAddress(gpa))
        .map(|()| bytes.len() as u64)
        .map_err(|e| format!("page {gpa:#x} is not in guest memory: {e}"))
}

fn zero_pages(mem: &GuestMemory, gpa: u64, pages: u32) -> Result<(), String> {
    let len = u64::from(pages) * PAGE_SIZE;
    let region = mem
        .find_region(GuestAddress(gpa))
        .filter(|r| gpa + len <= r.start_addr().raw_value() + r.len())
        .ok_or_else(|| format!("zero pages {gpa:#x}+{len:#x} are not in guest memory"))?;
    ferry_devices::zeroed::zero_range(region, gpa - region.start_addr().raw_value(), len)
        .map_err(|e| format!("cannot zero pages at {gpa:#x}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_backed_guest_memory, MemoryBacking, TestHugePages};

    /// A zero-page record makes the pages read as zero whatever backs the memory: anonymous
    /// memory drops them, huge pages (which drop only whole) are written with zeros, and the
    /// pages around keep their data.
    fn zero_record_zeroes(mem: &GuestMemory) {
        let data = vec![0xa5u8; 3 * PAGE_SIZE as usize];
        mem.write_slice(&data, GuestAddress(0x10_0000))
            .expect("write");
        zero_pages(mem, 0x10_1000, 1).expect("zero");
        let mut back = vec![0u8; 3 * PAGE_SIZE as usize];
        mem.read_slice(&mut back, GuestAddress(0x10_0000))
            .expect("read");
        let page = PAGE_SIZE as usize;
        assert!(back[..page].iter().all(|&b| b == 0xa5));
        assert!(back[page..2 * page].iter().all(|&b| b == 0));
        assert!(back[2 * page..].iter().all(|&b| b == 0xa5));
        assert!(
            zero_pages(mem, 0x40_0000 - PAGE_SIZE, 2).is_err(),
            "past the end"
        );
    }

    #[test]
    fn a_zero_record_zeroes_anonymous_memory() {
        zero_record_zeroes(&create_backed_guest_memory(4 << 20, MemoryBacking::Anonymous).unwrap());
    }

    #[test]
    fn a_zero_record_zeroes_huge_pages() {
        let Some(_pool) = TestHugePages::grow(2, "a_zero_record_zeroes_huge_pages") else {
            return;
        };
        zero_record_zeroes(&create_backed_guest_memory(4 << 20, MemoryBacking::HugePages).unwrap());
    }
}
