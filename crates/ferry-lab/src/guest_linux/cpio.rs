//! A writer for the "newc" cpio format (`070701`), the format Linux unpacks an initramfs from.
//!
//! Each entry is a 110-byte ASCII header (magic and thirteen 8-digit hex fields), the name with
//! its NUL, padding to 4 bytes, the data, padding to 4 bytes; the archive ends with an entry
//! named `TRAILER!!!`. Owners are root and times are zero, so the same inputs give the same
//! bytes.

use std::io::{self, Write};

pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFLNK: u32 = 0o120_000;
pub const S_IFCHR: u32 = 0o020_000;

pub const MAGIC: &[u8; 6] = b"070701";
pub const TRAILER: &str = "TRAILER!!!";

/// Writes a newc archive to `out`.
#[derive(Debug)]
pub struct NewcWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> NewcWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..pad])
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        if name.is_empty() || name.as_bytes().contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio entry name {name:?}"),
            ));
        }
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is over 4 GiB"))
        })?;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut header = Vec::with_capacity(110);
        header.extend_from_slice(MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.put(&header)?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | perm, 2, (0, 0), &[])
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, 1, (0, 0), data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | perm, 1, (major, minor), &[])
    }

    /// Writes the trailer and hands back the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One entry read back from a newc archive.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub ino: u32,
    pub mode: u32,
    pub nlink: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Reads a newc archive back, up to and without its trailer (for tests).
#[cfg(test)]
pub fn parse(mut bytes: &[u8]) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    let mut offset = 0usize;
    let align = |n: usize| n.next_multiple_of(4);
    loop {
        let header = bytes.get(..110).ok_or("truncated header")?;
        if &header[..6] != MAGIC {
            return Err(format!("bad magic at {offset}"));
        }
        let field = |i: usize| -> Result<u32, String> {
            let text =
                std::str::from_utf8(&header[6 + i * 8..14 + i * 8]).map_err(|e| e.to_string())?;
            u32::from_str_radix(text, 16).map_err(|e| e.to_string())
        };
        let namesize = field(11)? as usize;
        let filesize = field(6)? as usize;
        let name_end = 110 + namesize;
        let name_bytes = bytes.get(110..name_end - 1).ok_or("truncated name")?;
        if bytes.get(name_end - 1) != Some(&0) {
            return Err("name without NUL".into());
        }
        let name = String::from_utf8(name_bytes.to_vec()).map_err(|e| e.to_string())?;
        // Padding is relative to the start of the archive; every entry starts aligned.
        let data_start = align(name_end);
        let data = bytes
            .get(data_start..data_start + filesize)
            .ok_or("truncated data")?
            .to_vec();
        let next = align(data_start + filesize);
        if name == TRAILER {
            if bytes.len() != next {
                return Err("bytes after the trailer".into());
            }
            return Ok(entries);
        }
        entries.push(Entry {
            name,
            ino: field(0)?,
            mode: field(1)?,
            nlink: field(4)?,
            rdev: (field(9)?, field(10)?),
            data,
        });
        bytes = bytes.get(next..).ok_or("truncated padding")?;
        offset += next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = NewcWriter::new(Vec::new());
        w.dir("bin", 0o755).expect("dir");
        w.file("/bin/busybox", 0o755, b"\x7fELF12345")
            .expect("file");
        w.symlink("bin/sh", "busybox").expect("symlink");
        w.char_device("dev/console", 0o600, 5, 1).expect("dev");
        w.file("init", 0o755, b"#!/bin/sh\n").expect("file");
        w.finish().expect("finish")
    }

    #[test]
    fn round_trips_entries() {
        let bytes = sample();
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse(&bytes).expect("parse");
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["bin", "bin/busybox", "bin/sh", "dev/console", "init"]
        );
        assert_eq!(entries[0].mode, S_IFDIR | 0o755);
        assert_eq!(entries[0].nlink, 2);
        assert_eq!(entries[1].mode, S_IFREG | 0o755);
        assert_eq!(entries[1].data, b"\x7fELF12345");
        assert_eq!(entries[2].mode, S_IFLNK | 0o777);
        assert_eq!(entries[2].data, b"busybox");
        assert_eq!(entries[3].mode, S_IFCHR | 0o600);
        assert_eq!(entries[3].rdev, (5, 1));
        assert_eq!(entries[4].data, b"#!/bin/sh\n");
        let inos: std::collections::BTreeSet<_> = entries.iter().map(|e| e.ino).collect();
        assert_eq!(inos.len(), entries.len(), "inode numbers are distinct");
    }

    #[test]
    fn header_is_newc() {
        let bytes = sample();
        // The first header: magic, ino 1, a directory 0755, root-owned, 2 links, name "bin".
        let header = std::str::from_utf8(&bytes[..110]).expect("ascii");
        assert_eq!(
            header,
            "070701\
             00000001\
             000041ed\
             00000000\
             00000000\
             00000002\
             00000000\
             00000000\
             00000000\
             00000000\
             00000000\
             00000000\
             00000004\
             00000000"
        );
        assert_eq!(&bytes[110..114], b"bin\0");
        assert!(bytes
            .windows(TRAILER.len())
            .any(|w| w == TRAILER.as_bytes()));
    }

    #[test]
    fn same_input_same_bytes() {
        assert_eq!(sample(), sample());
    }

    #[test]
    fn rejects_empty_names() {
        let mut w = NewcWriter::new(Vec::new());
        assert!(w.file("/", 0o644, b"").is_err());
    }

    #[test]
    fn busybox_cpio_lists_it() {
        // A second judge when the host has one.
        let Some(busybox) = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| std::path::Path::new(p).is_file())
        else {
            return;
        };
        let mut child = match std::process::Command::new(busybox)
            .args(["cpio", "-t"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(_) => return,
        };
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&sample()).expect("write");
        drop(stdin);
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "bin\nbin/busybox\nbin/sh\ndev/console\ninit\n"
        );
    }
}
