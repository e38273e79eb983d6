//! Where the NIC's frames go: a [`NetBackend`], on the host a [`Tap`].
//!
//! Frames cross the backend with the 12-byte virtio-net header in front, as the tap speaks it
//! with `IFF_VNET_HDR` and `TUNSETVNETHDRSZ` 12. We turn every offload off (`TUNSETOFFLOAD` 0),
//! so the kernel hands us whole frames no larger than the tap's MTU, with a zeroed header.

use std::ffi::CString;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// The host side of a NIC. Both calls are non-blocking and thread-safe: the device thread
/// receives and transmits, and the announcer writes RARP frames from its own thread.
pub trait NetBackend: Send + Sync + Debug {
    /// Reads one frame (header first) into `buf`; `Ok(None)` when none is waiting. A frame
    /// longer than `buf` is cut to it.
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>>;

    /// Sends one frame, header first.
    fn send(&self, frame: &[u8]) -> io::Result<()>;

    /// The descriptor the event loop watches for frames to read.
    fn as_raw_fd(&self) -> RawFd;

    /// The host's name for it (the tap's interface name).
    fn name(&self) -> &str;
}

/// How the VMM asks for a tap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapConfig {
    /// The interface name (at most 15 bytes).
    pub name: String,
    /// Create the tap if it does not exist. Without this, a missing tap is an error: on a
    /// migration destination a typo must not silently give the VM a NIC on no network.
    pub create: bool,
    /// A bridge to add the tap to.
    pub bridge: Option<String>,
}

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("{0:?} is not a network interface name (1 to 15 bytes, no '/', ':' or spaces)")]
    BadName(String),
    #[error(
        "tap {0:?} does not exist in this network namespace (create it with `ip tuntap add \
         {0} mode tap`, or ask ferry to with create=on)"
    )]
    Missing(String),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("interface {name:?} cannot be opened as a tap (is it a tap, and not in use?)")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot {what} on tap {name:?}")]
    Configure {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot add tap {name:?} to bridge {bridge:?}")]
    Bridge {
        name: String,
        bridge: String,
        #[source]
        source: io::Error,
    },
}

// <linux/if_tun.h> and <linux/sockios.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// `struct ifreq`: a name and a 24-byte union, of which we use the flags (a short) and the
/// interface index (an int).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }

    fn with_short(name: &str, value: i16) -> IfReq {
        let mut req = IfReq::new(name);
        req.data[..2].copy_from_slice(&value.to_ne_bytes());
        req
    }

    fn with_int(name: &str, value: i32) -> IfReq {
        let mut req = IfReq::new(name);
        req.data[..4].copy_from_slice(&value.to_ne_bytes());
        req
    }

    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }
}

/// A tap device opened for one VM.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// The index of interface `name` in this thread's network namespace, if it exists.
fn if_index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// An `ioctl` on `fd` with an `ifreq`.
fn ifreq_ioctl(fd: RawFd, request: libc::c_ulong, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: every request used here reads or writes a `struct ifreq`, which `req` is in
    // layout and size, and `req` lives through the call.
    let ret = unsafe { libc::ioctl(fd, request as _, req as *mut IfReq) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An `ioctl` on `fd` whose argument is a pointer to an int.
fn int_ioctl(fd: RawFd, request: libc::c_ulong, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the request reads one int through the pointer, which is valid for the call.
    let ret = unsafe { libc::ioctl(fd, request as _, &value as *const libc::c_int) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A datagram socket for interface ioctls.
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Tap {
    /// Opens (or creates, if asked) the tap `config.name` in this thread's network namespace,
    /// non-blocking, with a 12-byte vnet header and no offloads; sets it up, and adds it to
    /// `config.bridge` if given.
    pub fn open(config: &TapConfig) -> Result<Tap, TapError> {
        let name = config.name.as_str();
        if !valid_name(name) {
            return Err(TapError::BadName(name.to_owned()));
        }
        if let Some(bridge) = &config.bridge {
            if !valid_name(bridge) {
                return Err(TapError::BadName(bridge.clone()));
            }
        }
        if !config.create && if_index(name).is_none() {
            return Err(TapError::Missing(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::with_short(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        ifreq_ioctl(file.as_raw_fd(), TUNSETIFF, &mut req).map_err(|source| TapError::Attach {
            name: name.to_owned(),
            source,
        })?;
        let configure = |what, source| TapError::Configure {
            name: name.to_owned(),
            what,
            source,
        };
        int_ioctl(
            file.as_raw_fd(),
            TUNSETVNETHDRSZ,
            super::NET_HDR_LEN as libc::c_int,
        )
        .map_err(|e| configure("set the vnet header size", e))?;
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD as _, 0 as libc::c_ulong) } < 0 {
            return Err(configure("turn offloads off", io::Error::last_os_error()));
        }
        let sock = control_socket().map_err(|e| configure("open a control socket", e))?;
        let mut flags = IfReq::new(name);
        ifreq_ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut flags)
            .map_err(|e| configure("read the interface flags", e))?;
        if flags.short() & libc::IFF_UP as i16 == 0 {
            let mut up = IfReq::with_short(name, flags.short() | libc::IFF_UP as i16);
            ifreq_ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut up)
                .map_err(|e| configure("set the interface up", e))?;
        }
        if let Some(bridge) = &config.bridge {
            let index = if_index(name).ok_or_else(|| {
                configure(
                    "find the interface index",
                    io::Error::from(io::ErrorKind::NotFound),
                )
            })?;
            let mut req = IfReq::with_int(bridge, index as i32);
            match ifreq_ioctl(sock.as_raw_fd(), SIOCBRADDIF, &mut req) {
                // Already a port of that bridge.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(source) => {
                    return Err(TapError::Bridge {
                        name: name.to_owned(),
                        bridge: bridge.clone(),
                        source,
                    })
                }
                Ok(()) => {}
            }
        }
        Ok(Tap {
            file,
            name: name.to_owned(),
        })
    }
}

impl NetBackend for Tap {
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match (&self.file).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // A tap takes a whole frame per write, or refuses it.
        (&self.file).write(frame).map(drop)
    }

    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        for bad in ["", "a/b", "a:b", "a b", "sixteen-letters!", "tab\t"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        for good in ["tap0", "fe-1234567890ab", "x"] {
            assert!(valid_name(good), "{good:?}");
        }
    }

    #[test]
    fn a_missing_tap_is_refused_by_name() {
        let err = Tap::open(&TapConfig {
            name: "ferrynotthere0".into(),
            create: false,
            bridge: None,
        })
        .unwrap_err();
        assert!(matches!(err, TapError::Missing(_)), "{err}");
        assert!(err.to_string().contains("ferrynotthere0"));
    }

    #[test]
    fn a_bad_name_is_refused_before_anything_is_opened() {
        let err = Tap::open(&TapConfig {
            name: "no/slashes".into(),
            create: true,
            bridge: None,
        })
        .unwrap_err();
        assert!(matches!(err, TapError::BadName(_)), "{err}");
    }
}
