//! The floor under any migration of a guest's data on this host: the same bytes of noise
//! over loopback TCP into fresh guest-like memory, with nothing else. No protocol, no dirty
//! log, no checksums, no VMM: a sender thread writes 1 MiB slices of a buffer filled ahead of
//! time, and a receiver reads them straight into memory mapped for the run (anonymous 4 KiB
//! pages, or the huge page pool), so the kernel's copy is also the first touch, as a
//! destination's is. One more thread spins the whole time, as the benchmark's guest keeps one
//! vCPU busy verifying its memory. No VMM can move that data faster over that link into that
//! memory, so a ratio against QEMU that this floor rules out is not reachable on this host.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ferry_lab::kit::xorshift::XorShift;

/// Guest-like memory for one run, unmapped on drop.
struct Fresh {
    at: *mut u8,
    len: usize,
}

impl Fresh {
    fn map(len: usize, hugepages: bool) -> Result<Fresh> {
        let huge = if hugepages { libc::MAP_HUGETLB } else { 0 };
        // SAFETY: a new private anonymous mapping at an address the kernel picks; nothing
        // else refers to it.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | huge,
                -1,
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot map {} MiB for the floor", len >> 20));
        }
        Ok(Fresh { at: at.cast(), len })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes, readable and writable, owned by self alone for
        // the borrow's length.
        unsafe { std::slice::from_raw_parts_mut(self.at, self.len) }
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no slice of it outlives self.
        unsafe { libc::munmap(self.at.cast(), self.len) };
    }
}

/// Keeps one core busy until dropped.
struct BusyCore {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BusyCore {
    fn start() -> Result<BusyCore> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("floor-busy".into())
            .spawn(move || {
                let mut x = 1u64;
                while !flag.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })?;
        Ok(BusyCore {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for BusyCore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Noise that no link or codec shrinks, as the benchmark guest's payload.
fn noise(len: usize) -> Vec<u8> {
    XorShift::new(0x9e37_79b9_7f4a_7c15).bytes(len)
}

/// Milliseconds to move `bytes` of noise over loopback into fresh memory (the pool's 2 MiB
/// pages if `hugepages`), from the connection to the last byte in place, beside a busy core.
pub fn measure(bytes: usize, hugepages: bool) -> Result<f64> {
    if bytes == 0 {
        bail!("the floor needs some bytes to move");
    }
    let data = Arc::new(noise(bytes));
    let listener = TcpListener::bind("127.0.0.1:0").context("floor: bind")?;
    let addr = listener.local_addr()?;
    let _busy = BusyCore::start()?;
    let sender = {
        let data = data.clone();
        std::thread::Builder::new()
            .name("floor-send".into())
            .spawn(move || -> std::io::Result<()> {
                let mut s = TcpStream::connect(addr)?;
                for slice in data.chunks(1 << 20) {
                    s.write_all(slice)?;
                }
                Ok(())
            })?
    };
    let (mut conn, _) = listener.accept().context("floor: accept")?;
    let started = Instant::now();
    let mut memory = Fresh::map(bytes, hugepages)?;
    let into = memory.as_mut_slice();
    let mut at = 0;
    while at < bytes {
        let end = (at + (1 << 20)).min(bytes);
        match conn.read(&mut into[at..end]) {
            Ok(0) => bail!("floor: the sender closed after {at} of {bytes} bytes"),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("floor: read"),
        }
    }
    let ms = started.elapsed().as_secs_f64() * 1e3;
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("floor: the sender panicked"))?
        .context("floor: send")?;
    if into[..] != data[..] {
        bail!("floor: the bytes that arrived differ from those sent");
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_moves_every_byte_and_takes_some_time() {
        let ms = measure(8 << 20, false).expect("floor");
        assert!(ms > 0.0);
        assert!(measure(0, false).is_err());
    }
}
