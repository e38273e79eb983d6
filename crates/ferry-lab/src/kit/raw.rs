//! Raw Ethernet frames onto a LAN: what the tests use to throw malformed frames at a VM's NIC
//! from the network side.

use std::ffi::CString;
use std::io;

use super::lan::in_netns;

/// Sends each of `frames` (whole Ethernet frames, no checksum) out of interface `ifname` in
/// namespace `ns`; returns how many went out.
pub fn send_raw_frames(ns: Option<&str>, ifname: &str, frames: &[Vec<u8>]) -> io::Result<usize> {
    let name = CString::new(ifname).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    in_netns(ns, || {
        // SAFETY: `name` is a NUL-terminated string that outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain socket(2); the result is checked before use and closed below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value to fill in.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        addr.sll_halen = 6;
        let mut sent = 0;
        for frame in frames {
            // SAFETY: `frame` and `addr` are valid for the call and their lengths are given.
            let n = unsafe {
                libc::sendto(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n >= 0 {
                sent += 1;
            }
        }
        // SAFETY: `fd` is ours and closed once.
        unsafe { libc::close(fd) };
        Ok(sent)
    })
}
