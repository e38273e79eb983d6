//! Migration over mutual TLS between two hosts: the VM moves when both sides hold
//! certificates of one CA; a plaintext source, a source of another CA and a TLS source facing
//! a plaintext receiver are refused with errors that say why, and the source runs on.

mod common;

use std::path::{Path, PathBuf};

use common::migration::{
    assert_handed_over, assert_source_goes_on, hosts_or_skip, migrate, receiver_with, source,
    status_json, BOOT,
};
use common::{ferry, Boot, TempDir};

/// `ferry tls-certs` for hosts "src" and "dst" at these addresses; returns their folders.
fn certificates(out: &Path, src_addr: &str, dst_addr: &str) -> (PathBuf, PathBuf) {
    let made = ferry()
        .args(["tls-certs", "--out"])
        .arg(out)
        .args(["--host", &format!("src={src_addr}")])
        .args(["--host", &format!("dst={dst_addr}")])
        .output()
        .expect("ferry tls-certs");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    (out.join("src"), out.join("dst"))
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The failure `ferry migrate` reported: its exit code and the status's error.
fn refused(out: &std::process::Output) -> (i32, String, String) {
    let status = status_json(out);
    assert!(!out.status.success(), "it should fail: {status}");
    assert_eq!(status["phase"], "failed", "{status}");
    (
        out.status.code().unwrap_or(-1),
        status["error"]["kind"].as_str().unwrap_or("").to_string(),
        status["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string(),
    )
}

#[test]
fn mutual_tls_moves_the_vm_and_refuses_plaintext_and_strangers() {
    let test = "mutual_tls_moves_the_vm_and_refuses_plaintext_and_strangers";
    let Some(hosts) = hosts_or_skip("tls", test) else {
        return;
    };
    let dir = TempDir::new("tls");
    let (src_tls, dst_tls) = certificates(&dir.join("pki"), &hosts.a_addr, &hosts.b_addr);
    let (stranger_tls, _) = certificates(&dir.join("other"), &hosts.a_addr, &hosts.b_addr);

    let listen = format!("{}:7000", hosts.b_addr);
    let dst = receiver_with(&hosts.b, &listen, &["--tls-dir", path(&dst_tls)], None);
    let plain_listen = format!("{}:7001", hosts.b_addr);
    let plain_dst = receiver_with(&hosts.b, &plain_listen, &[], None);
    let (mut src, socket) = source(
        &hosts.a,
        &dir,
        Boot::guest("workload=mem mem_mib=16 mem_rate=20"),
        None,
    );

    // Plaintext to a receiver that requires TLS: it says so, in plaintext the source reads.
    let (code, kind, message) = refused(&migrate(&socket, &listen, &[]));
    assert_eq!((code, kind.as_str()), (1, "incompatible"), "{message}");
    assert!(message.contains("requires TLS"), "{message}");
    assert_source_goes_on(&src, &socket);

    // A certificate of another CA: the two sides do not trust each other.
    let (code, kind, message) = refused(&migrate(
        &socket,
        &listen,
        &["--tls-dir", path(&stranger_tls)],
    ));
    assert_eq!((code, kind.as_str()), (1, "authentication"), "{message}");
    assert!(message.contains("not signed by the CA"), "{message}");
    assert_source_goes_on(&src, &socket);

    // TLS to a receiver without it.
    let (code, kind, message) = refused(&migrate(
        &socket,
        &plain_listen,
        &["--tls-dir", path(&src_tls)],
    ));
    assert_eq!((code, kind.as_str()), (1, "authentication"), "{message}");
    assert!(message.contains("TLS"), "{message}");
    assert_source_goes_on(&src, &socket);
    assert!(
        plain_dst.stderr().contains("runs without --tls-dir"),
        "{}",
        plain_dst.stderr()
    );

    // Unreadable TLS settings are refused before anything is sent.
    let out = migrate(&socket, &listen, &["--tls-dir", "/nonexistent-ferry-tls"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nonexistent-ferry-tls"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The receiver refused each of them and still waits; with the right certificate the VM
    // moves.
    let out = migrate(&socket, &listen, &["--tls-dir", path(&src_tls)]);
    assert_handed_over(&mut src, &out);
    let (first, later) = dst.wait_for_ticks(BOOT);
    assert!(later.mem_written >= first.mem_written);
    dst.assert_clean();
    let log = dst.stderr();
    assert!(log.contains("requires TLS"), "{log}");
    assert!(log.contains("refused this host's certificate"), "{log}");
}
