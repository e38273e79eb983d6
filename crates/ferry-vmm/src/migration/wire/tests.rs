use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use ferry_proto::migration::{read_message, write_message, Hello, Message};
use vmm_sys_util::tempdir::TempDir;

use super::pki::{self, HostSpec};
use super::*;

/// A CA with hosts "src" and "dst", both reachable as 127.0.0.1.
fn pki_dirs(name: &str) -> (TempDir, PathBuf, PathBuf) {
    let tmp = TempDir::new_with_prefix("/tmp/ferry-tls").expect("tmp");
    let host = |name: &str| HostSpec {
        name: name.into(),
        addresses: vec!["127.0.0.1".into(), "localhost".into()],
    };
    let dirs = pki::make(tmp.as_path(), name, &[host("src"), host("dst")]).expect("pki");
    (tmp, dirs[0].clone(), dirs[1].clone())
}

/// A listening server that shakes hands with one client; the thread returns its end.
fn serve_one(
    config: TlsConfig,
) -> (
    std::net::SocketAddr,
    std::thread::JoinHandle<Result<Wire, TlsError>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().expect("accept");
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Wire::server(tcp, &config)
    });
    (addr, server)
}

fn dial(addr: std::net::SocketAddr) -> TcpStream {
    let tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    tcp
}

#[test]
fn mutual_tls_carries_messages_and_bulk_both_ways_with_write_timeouts() {
    let (_tmp, src, dst) = pki_dirs("ferry test CA");
    let (addr, server) = serve_one(TlsConfig::load(&dst).expect("dst config"));
    let client = Wire::client(
        dial(addr),
        &TlsConfig::load(&src).expect("src config"),
        server_name("127.0.0.1:4000").expect("name"),
    )
    .expect("client handshake");
    let server = server.join().expect("server").expect("server handshake");
    assert!(client.is_tls() && server.is_tls());

    // A protocol message each way.
    let hello = Message::Hello(Hello::new("test", &["a"]));
    write_message(&mut client.writer().expect("w"), &hello).expect("send");
    let got = read_message(&mut server.reader().expect("r")).expect("receive");
    assert_eq!(got, hello);

    // 24 MiB one way while the other side reads slowly: short write timeouts make the
    // writer come back with ciphertext still pending, which must never be lost or reordered.
    let mut writer = client.writer().expect("w");
    client
        .tcp()
        .set_write_timeout(Some(Duration::from_millis(1)))
        .expect("timeout");
    let sender = std::thread::spawn(move || {
        let data: Vec<u8> = (0..24u32 << 20).map(|i| (i % 251) as u8).collect();
        let mut left = &data[..];
        while !left.is_empty() {
            match writer.write(left) {
                Ok(n) => left = &left[n..],
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("write: {e}"),
            }
        }
        loop {
            match writer.flush() {
                Ok(()) => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("flush: {e}"),
            }
        }
    });
    let mut reader = server.reader().expect("r");
    let mut got = vec![0u8; 24 << 20];
    let mut at = 0;
    while at < got.len() {
        let n = reader
            .read(&mut got[at..(at + 65536).min(24 << 20)])
            .expect("read");
        assert!(n > 0, "closed early at {at}");
        at += n;
        if at % (4 << 20) < 65536 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    sender.join().expect("sender");
    assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));

    // And back, on the same session.
    let answer = Message::Prepared;
    write_message(&mut server.writer().expect("w"), &answer).expect("answer");
    assert_eq!(
        read_message(&mut client.reader().expect("r")).expect("read"),
        answer
    );

    // A peer that hangs up without close_notify is an error, not a clean end.
    server
        .tcp()
        .shutdown(std::net::Shutdown::Both)
        .expect("shut");
    let mut one = [0u8; 1];
    assert!(client.reader().expect("r").read(&mut one).is_err());
}

#[test]
fn a_peer_of_another_ca_is_refused_both_ways() {
    let (_tmp, src, dst) = pki_dirs("ferry test CA");
    let (_other, stranger, _) = pki_dirs("another CA");
    // A source the destination's CA never signed.
    let (addr, server) = serve_one(TlsConfig::load(&dst).expect("dst"));
    let client = Wire::client(
        dial(addr),
        &TlsConfig::load(&stranger).expect("stranger"),
        server_name("127.0.0.1:1").expect("name"),
    );
    let server_side = server.join().expect("server");
    let err = server_side.expect_err("the destination refuses the stranger");
    assert!(
        err.to_string().contains("refused this host's certificate"),
        "{err}"
    );
    // The stranger learns it too: it does not trust the destination either.
    assert!(client.is_err());

    // A destination the source's CA never signed: a CA of another name, or of the same
    // name with another key.
    for other_name in ["another CA", "ferry test CA"] {
        let (_other, _, stranger_dst) = pki_dirs(other_name);
        let (addr, server) = serve_one(TlsConfig::load(&stranger_dst).expect("stranger"));
        let err = Wire::client(
            dial(addr),
            &TlsConfig::load(&src).expect("src"),
            server_name("127.0.0.1:1").expect("name"),
        )
        .expect_err("the source refuses the destination");
        assert!(err.to_string().contains("not signed by the CA in"), "{err}");
        assert!(!err.is_timeout());
        let _ = server.join();
    }
}

#[test]
fn the_destination_must_hold_the_name_the_source_dialled() {
    let (_tmp, src, dst) = pki_dirs("ferry test CA");
    let (addr, server) = serve_one(TlsConfig::load(&dst).expect("dst"));
    let err = Wire::client(
        dial(addr),
        &TlsConfig::load(&src).expect("src"),
        server_name("10.9.9.9:4000").expect("name"),
    )
    .expect_err("a certificate for 127.0.0.1 is not one for 10.9.9.9");
    assert!(err.to_string().contains("not valid for name"), "{err}");
    let _ = server.join();
}

#[test]
fn a_plaintext_peer_fails_the_handshake_with_a_hint() {
    let (_tmp, _src, dst) = pki_dirs("ferry test CA");
    let (addr, server) = serve_one(TlsConfig::load(&dst).expect("dst"));
    let mut plain = dial(addr);
    write_message(&mut plain, &Message::Hello(Hello::new("plain", &[]))).expect("hello");
    let err = server
        .join()
        .expect("server")
        .expect_err("plaintext is no handshake");
    assert!(err.to_string().contains("TLS handshake"), "{err}");

    // A receiver peeks before it shakes hands: a ferry frame is not TLS.
    let mut frame = Vec::new();
    write_message(&mut frame, &Message::Hello(Hello::new("plain", &[]))).expect("frame");
    assert!(!looks_like_tls(&frame));
    assert!(looks_like_tls(&[0x16, 0x03, 0x01]));
    assert!(!looks_like_tls(&[0x16]));
}

#[test]
fn bad_tls_folders_are_named_in_the_error() {
    let (_tmp, src, dst) = pki_dirs("ferry test CA");
    let empty = TempDir::new_with_prefix("/tmp/ferry-tls-empty").expect("tmp");
    let err = TlsConfig::load(empty.as_path()).expect_err("no files");
    assert!(err.to_string().contains("ca.pem"), "{err}");

    // Garbage where a certificate should be.
    let broken = TempDir::new_with_prefix("/tmp/ferry-tls-broken").expect("tmp");
    for f in [CA_FILE, CERT_FILE, KEY_FILE] {
        std::fs::copy(src.join(f), broken.as_path().join(f)).expect("copy");
    }
    std::fs::write(broken.as_path().join(CERT_FILE), "not a certificate").expect("write");
    let err = TlsConfig::load(broken.as_path()).expect_err("garbage cert");
    assert!(err.to_string().contains("cert.pem"), "{err}");

    // A key that is not the certificate's.
    std::fs::copy(src.join(CERT_FILE), broken.as_path().join(CERT_FILE)).expect("copy");
    std::fs::copy(dst.join(KEY_FILE), broken.as_path().join(KEY_FILE)).expect("copy");
    let err = TlsConfig::load(broken.as_path()).expect_err("mismatched key");
    assert!(err.to_string().contains("key.pem"), "{err}");
}

#[test]
fn server_names_come_from_the_address_dialled() {
    assert_eq!(
        server_name("10.0.0.2:4000").expect("v4").to_str(),
        "10.0.0.2"
    );
    assert_eq!(server_name("[::1]:4000").expect("v6").to_str(), "::1");
    assert_eq!(
        server_name("host-b.example:4000").expect("dns").to_str(),
        "host-b.example"
    );
    assert!(server_name("bad name:1").is_err());
    assert!(pki::make(
        std::path::Path::new("/tmp"),
        "x",
        &[HostSpec {
            name: "../up".into(),
            addresses: vec![]
        }]
    )
    .is_err());
}
