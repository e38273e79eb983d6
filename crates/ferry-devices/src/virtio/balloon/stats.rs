//! The guest's memory statistics (virtio 1.2 §5.5.6.3): a buffer of `(u16 tag, u64 value)`
//! entries, little-endian and packed, that the driver fills and the device holds until it
//! wants fresher figures.

pub use ferry_api::BalloonStats;

/// Bytes of one entry.
pub const STAT_ENTRY: usize = 10;
/// The most entries the device reads from one buffer: the spec defines ten tags, and a guest
/// may repeat them, but not without bound.
pub const MAX_STAT_ENTRIES: usize = 64;

/// The statistics in `buf` (what the driver's buffer holds). Unknown tags are skipped, a
/// trailing partial entry is ignored, a repeated tag keeps its last value.
pub fn parse_stats(buf: &[u8]) -> BalloonStats {
    let mut s = BalloonStats::default();
    for entry in buf.chunks_exact(STAT_ENTRY).take(MAX_STAT_ENTRIES) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let mut value = [0u8; 8];
        value.copy_from_slice(&entry[2..]);
        let value = Some(u64::from_le_bytes(value));
        let field = match tag {
            0 => &mut s.swap_in,
            1 => &mut s.swap_out,
            2 => &mut s.major_faults,
            3 => &mut s.minor_faults,
            4 => &mut s.free_memory,
            5 => &mut s.total_memory,
            6 => &mut s.available_memory,
            7 => &mut s.disk_caches,
            8 => &mut s.hugetlb_allocations,
            9 => &mut s.hugetlb_failures,
            _ => continue,
        };
        *field = value;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: u16, value: u64) -> Vec<u8> {
        let mut e = tag.to_le_bytes().to_vec();
        e.extend_from_slice(&value.to_le_bytes());
        e
    }

    #[test]
    fn known_tags_are_read_and_the_rest_skipped() {
        let mut buf = entry(4, 1 << 30);
        buf.extend(entry(5, 2 << 30));
        buf.extend(entry(99, 7));
        buf.extend(entry(4, 3 << 20));
        buf.extend([1, 2, 3]); // a partial entry
        let s = parse_stats(&buf);
        assert_eq!(s.free_memory, Some(3 << 20), "the last value wins");
        assert_eq!(s.total_memory, Some(2 << 30));
        assert_eq!(s.available_memory, None);
    }

    #[test]
    fn malformed_buffers_give_what_they_can() {
        assert_eq!(parse_stats(&[]), BalloonStats::default());
        assert_eq!(parse_stats(&[4, 0, 1]), BalloonStats::default());
        // Past the bound, entries are not read.
        let mut buf: Vec<u8> = (0..MAX_STAT_ENTRIES).flat_map(|_| entry(99, 0)).collect();
        buf.extend(entry(4, 1));
        assert_eq!(parse_stats(&buf).free_memory, None);
    }
}
