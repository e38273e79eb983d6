//! Page encoding end to end: each codec forced, and auto, moves a guest whose pages then pass
//! the guest's own verification on the destination; what each codec saved shows in the status.

mod common;

use std::os::unix::fs::FileExt;

use common::hosts::receiver;
use common::migration::{assert_handed_over, hosts_or_skip, migrate, source, BOOT};
use common::{sparse_image, Boot, TempDir};

/// Moves a guest booted with `guest` under `args`; returns the final status, or `None` when
/// the test is skipped.
fn moved(test: &str, guest: &str, args: &[&str]) -> Option<serde_json::Value> {
    let hosts = hosts_or_skip("enc", test)?;
    let dir = TempDir::new(test);
    let listen = format!("{}:7000", hosts.b_addr);
    let dst = receiver(&hosts.b, &listen, None, &[]);
    let (mut src, socket) = source(&hosts.a, &dir, Boot::guest(guest), None);
    let out = migrate(&socket, &listen, args);
    let status = assert_handed_over(&mut src, &out);
    // The destination verifies every page it owns, rewrites some, and goes on.
    let (i, _) = dst.wait_for_from(0, "ferry-guest: status", BOOT);
    dst.wait_for_from(i + 1, "ferry-guest: status", BOOT);
    dst.assert_clean();
    Some(status)
}

/// Pages the status says `codec` encoded.
fn encoded(status: &serde_json::Value, codec: &str) -> u64 {
    status["encoding"]["pages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["codec"] == codec)
        .map(|c| c["pages"].as_u64().expect("a count"))
        .sum()
}

fn data_bytes(status: &serde_json::Value) -> u64 {
    status["data_pages_sent"].as_u64().expect("pages") * 4096
}

/// Text-like pages at a capped link: a compressor forced on them sends well under half.
fn compressor_forced(test: &str, codec: &str) {
    let Some(s) = moved(
        test,
        "workload=mem mem_mib=64 mem_rate=20 mem_data=text",
        &["--encoding", codec, "--bandwidth", "100MiB"],
    ) else {
        return;
    };
    let pages = s["data_pages_sent"].as_u64().expect("pages");
    assert!(encoded(&s, codec) > pages / 2, "{codec}: {s}");
    assert!(
        s["bytes_sent"].as_u64().expect("bytes") < data_bytes(&s) / 2,
        "{s}"
    );
    assert_eq!(s["encoding"]["chosen"], codec, "{s}");
}

#[test]
fn lz4_forced_moves_text_pages_in_under_half_their_size() {
    compressor_forced(
        "lz4_forced_moves_text_pages_in_under_half_their_size",
        "lz4",
    );
}

#[test]
fn zstd_forced_moves_text_pages_in_under_half_their_size() {
    compressor_forced(
        "zstd_forced_moves_text_pages_in_under_half_their_size",
        "zstd",
    );
}

#[test]
fn delta_forced_sends_rewritten_pages_as_their_changes() {
    let test = "delta_forced_sends_rewritten_pages_as_their_changes";
    // 50 MiB/s of rewrites against a 100 MiB/s link: several passes, each resending pages a
    // rewrite changed in one word in 64.
    let Some(s) = moved(
        test,
        "workload=mem mem_mib=64 mem_rate=50 mem_data=delta",
        &["--encoding", "delta", "--bandwidth", "100MiB"],
    ) else {
        return;
    };
    assert!(encoded(&s, "delta") > 1000, "{s}");
}

#[test]
fn sparse_forced_moves_a_guest_intact() {
    let test = "sparse_forced_moves_a_guest_intact";
    let Some(s) = moved(
        test,
        "workload=mem mem_mib=32 mem_rate=20",
        &["--encoding", "sparse"],
    ) else {
        return;
    };
    // The guest's own page tables and tables are mostly zero: some pages go sparse; its
    // working set is noise and goes raw.
    assert!(encoded(&s, "sparse") > 0, "{s}");
    assert!(s["encoding"]["raw_pages"].as_u64().expect("raw") > 0, "{s}");
}

#[test]
fn auto_compresses_text_while_the_link_is_the_bottleneck() {
    let test = "auto_compresses_text_while_the_link_is_the_bottleneck";
    let Some(s) = moved(
        test,
        "workload=mem mem_mib=64 mem_rate=20 mem_data=text",
        &["--encoding", "auto", "--bandwidth", "50MiB"],
    ) else {
        return;
    };
    let compressed = encoded(&s, "lz4") + encoded(&s, "zstd");
    assert!(compressed > 0, "{s}");
    assert!(
        s["bytes_sent"].as_u64().expect("bytes") < data_bytes(&s),
        "{s}"
    );
    assert!(
        s["encoding"]["why"]
            .as_str()
            .is_some_and(|w| w.contains("bottleneck")),
        "{s}"
    );
}

#[test]
fn zstd_on_worker_threads_moves_text_pages_in_under_half_their_size() {
    let test = "zstd_on_worker_threads_moves_text_pages_in_under_half_their_size";
    let Some(s) = moved(
        test,
        "workload=mem mem_mib=64 mem_rate=20 mem_data=text",
        &[
            "--encoding",
            "zstd",
            "--encode-threads",
            "2",
            "--bandwidth",
            "100MiB",
        ],
    ) else {
        return;
    };
    let pages = s["data_pages_sent"].as_u64().expect("pages");
    assert!(encoded(&s, "zstd") > pages / 2, "{s}");
    assert!(
        s["bytes_sent"].as_u64().expect("bytes") < data_bytes(&s) / 2,
        "{s}"
    );
}

#[test]
fn auto_on_worker_threads_keeps_delta_bases_equal_to_what_was_sent() {
    // Pages rewritten one word in 64 at a capped link: some go as deltas from the scanner,
    // the rest compressed by the workers, and the copies kept for later deltas must be the
    // very bytes the workers compressed, or the destination's pages drift from the guest's.
    let test = "auto_on_worker_threads_keeps_delta_bases_equal_to_what_was_sent";
    let Some(s) = moved(
        test,
        "workload=mem mem_mib=64 mem_rate=50 mem_data=delta",
        &[
            "--encoding",
            "auto",
            "--encode-threads",
            "2",
            "--bandwidth",
            "100MiB",
        ],
    ) else {
        return;
    };
    assert!(
        s["encoding"]["why"]
            .as_str()
            .is_some_and(|w| w.contains("2 compression workers")),
        "{s}"
    );
}

#[test]
fn auto_sends_noise_raw_on_a_fast_link() {
    let test = "auto_sends_noise_raw_on_a_fast_link";
    let Some(s) = moved(
        test,
        "workload=mem mem_mib=64 mem_rate=20",
        &["--encoding", "auto"],
    ) else {
        return;
    };
    let pages = s["data_pages_sent"].as_u64().expect("pages");
    let compressed = encoded(&s, "lz4") + encoded(&s, "zstd");
    assert!(compressed < pages / 20, "{s}");
    assert_eq!(s["encoding"]["chosen"], "raw", "{s}");
}

/// `n` bytes of text-like data: words of a small vocabulary.
fn text(n: usize) -> Vec<u8> {
    let words = [
        "disk ",
        "blocks ",
        "move ",
        "with ",
        "the ",
        "guest, ",
        "compressed. ",
    ];
    let mut x = 7u32;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.extend_from_slice(words[(x % 7) as usize].as_bytes());
    }
    out.truncate(n);
    out
}

#[test]
fn a_disk_of_text_moves_compressed_and_arrives_byte_for_byte() {
    let test = "a_disk_of_text_moves_compressed_and_arrives_byte_for_byte";
    let Some(hosts) = hosts_or_skip("enc", test) else {
        return;
    };
    let dir = TempDir::new(test);
    let image = dir.join("a.img");
    let landing = dir.join("b.img");
    sparse_image(&image, 64 << 20);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .expect("open image");
    f.write_all_at(&text(16 << 20), 0).expect("write text");
    // A block of noise, which no compressor shrinks: it goes raw.
    let noise: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1)
        .collect();
    f.write_all_at(&noise, 32 << 20).expect("write noise");
    drop(f);
    let listen = format!("{}:7000", hosts.b_addr);
    let landing_arg = landing.display().to_string();
    let dst = common::migration::receiver_with(&hosts.b, &listen, &["--disk", &landing_arg], None);
    // The guest leaves its disk alone: the images must match exactly afterwards.
    let boot = Boot {
        disks: vec![image.clone()],
        ..Boot::guest("workload=idle")
    };
    let (mut src, socket) = source(&hosts.a, &dir, boot, None);
    let out = migrate(&socket, &listen, &["--encoding", "zstd"]);
    let s = assert_handed_over(&mut src, &out);
    let (i, _) = dst.wait_for_from(0, "ferry-guest: status", BOOT);
    dst.wait_for_from(i + 1, "ferry-guest: status", BOOT);
    dst.assert_clean();
    let a = std::fs::read(&image).expect("source image");
    let b = std::fs::read(&landing).expect("destination image");
    assert!(a == b, "the images differ");
    // Memory pages (whatever they took), the noise raw, and the text in well under half.
    let memory = s["data_pages_sent"].as_u64().expect("pages") * 4105;
    let sent = s["bytes_sent"].as_u64().expect("bytes");
    assert!(
        sent < memory + (1 << 20) + (8 << 20),
        "{sent} bytes sent, {memory} of them memory at most: {s}"
    );
}
