use std::net::{TcpListener, TcpStream};
use std::thread;

use super::*;

fn config() -> SessionConfig {
    SessionConfig {
        chunk: 64 << 10,
        window: 4 << 20,
        silence: Duration::from_secs(2),
        resume_window: Duration::from_secs(3),
    }
}

/// A loopback connection between `a` and `b` as their connection `index`.
fn connect(a: &Session, b: &Session, index: usize) -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let left = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (right, _) = listener.accept().expect("accept");
    let (lt, rt) = (
        left.try_clone().expect("clone"),
        right.try_clone().expect("clone"),
    );
    a.attach(index, Wire::plain(left), b.consumed())
        .expect("attach a");
    b.attach(index, Wire::plain(right), a.consumed())
        .expect("attach b");
    (lt, rt)
}

/// The byte at `i` of the test stream.
fn byte(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 7) as u8
}

fn write_stream(mut w: SessionWriter, len: u64) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut at = 0u64;
        let mut buf = vec![0u8; 100_000];
        while at < len {
            let n = buf.len().min((len - at) as usize);
            for (k, b) in buf[..n].iter_mut().enumerate() {
                *b = byte(at + k as u64);
            }
            let mut part = &buf[..n];
            while !part.is_empty() {
                match w.write(part) {
                    Ok(k) => part = &part[k..],
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                    Err(e) => panic!("write at {at}: {e}"),
                }
            }
            at += n as u64;
            w.flush().expect("flush");
        }
    })
}

fn read_stream(r: &mut SessionReader, len: u64) {
    let mut at = 0u64;
    let mut buf = vec![0u8; 77_777];
    while at < len {
        let n = r.read(&mut buf).expect("read");
        assert!(n > 0, "end of stream at {at}");
        for (k, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, byte(at + k as u64), "byte {}", at + k as u64);
        }
        at += n as u64;
    }
}

#[test]
fn three_connections_carry_one_ordered_stream_each_way_and_close_cleanly() {
    let (a, b) = (Session::new(config()), Session::new(config()));
    for i in 0..3 {
        connect(&a, &b, i);
    }
    let len = 40 << 20;
    let sender = write_stream(a.writer(), len);
    let back = write_stream(b.writer(), 1 << 20);
    read_stream(&mut b.reader(), len);
    read_stream(&mut a.reader(), 1 << 20);
    sender.join().expect("sender");
    back.join().expect("back");
    // Every connection carried some of it.
    assert!(a.stats().sent_bytes.load(Ordering::Relaxed) >= len);
    assert_eq!(a.stats().resent_bytes.load(Ordering::Relaxed), 0);
    let closer = {
        let a = a.clone();
        thread::spawn(move || a.close(Duration::from_secs(5)))
    };
    let mut rest = Vec::new();
    b.reader().read_to_end(&mut rest).expect("a clean end");
    assert!(rest.is_empty());
    closer.join().expect("close");
    // Regression: the peer's connections going away after its Close were logged and
    // counted as lost.
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.live() > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(b.live(), 0, "a's close shut its connections");
    assert_eq!(
        b.stats().lost.load(Ordering::Relaxed),
        0,
        "an end, not a loss"
    );
    b.close(Duration::from_secs(1));
}

#[test]
fn a_lost_connection_is_replaced_and_nothing_is_lost_or_reordered() {
    let (a, b) = (Session::new(config()), Session::new(config()));
    let (first, _) = connect(&a, &b, 0);
    connect(&a, &b, 1);
    let len = 24 << 20;
    let sender = write_stream(a.writer(), len);
    let reader = {
        let b = b.clone();
        thread::spawn(move || read_stream(&mut b.reader(), len))
    };
    thread::sleep(Duration::from_millis(30));
    // Both connections die (as a reset would kill them); the session waits for new ones.
    first.shutdown(Shutdown::Both).expect("kill 0");
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.live() == 2 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    connect(&a, &b, 0);
    reader.join().expect("all of it, in order");
    sender.join().expect("sender");
    assert!(a.stats().lost.load(Ordering::Relaxed) >= 1);
}

#[test]
fn all_connections_lost_resume_within_the_window_and_fail_after_it() {
    let (a, b) = (Session::new(config()), Session::new(config()));
    a.watch().expect("watch");
    b.watch().expect("watch");
    let (c0, _) = connect(&a, &b, 0);
    let len = 8 << 20;
    let sender = write_stream(a.writer(), len);
    let reader = {
        let b = b.clone();
        thread::spawn(move || read_stream(&mut b.reader(), len))
    };
    thread::sleep(Duration::from_millis(20));
    c0.shutdown(Shutdown::Both).expect("kill");
    thread::sleep(Duration::from_millis(500));
    assert!(
        a.down_for().is_some() && !a.is_over(),
        "down, within the window"
    );
    connect(&a, &b, 0);
    reader.join().expect("resumed: all of it");
    sender.join().expect("sender");

    // Now lost for good: both sides fail after the resume window, readers and writers too.
    let (c0, _) = connect(&a, &b, 0);
    c0.shutdown(Shutdown::Both).expect("kill");
    let started = Instant::now();
    let mut one = [0u8; 1];
    let err = b.reader().read(&mut one).expect_err("the session fails");
    assert!(err.to_string().contains("network lost"), "{err}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a.is_over() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(a.failure().expect("failed").contains("network lost"));
    assert!(
        a.writer().write(b"x").is_err(),
        "a failed session takes no more"
    );
}

/// A peer that breaks the framing's rules fails the session: it is not resumed with.
#[test]
fn a_peer_that_lies_fails_the_session() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("overlap", {
            let mut f = Vec::new();
            frame::write_data(&mut f, 0, 10, &[1; 20]).expect("w");
            frame::write_data(&mut f, 0, 20, &[1; 20]).expect("w");
            f
        }),
        ("too far ahead", {
            let mut f = Vec::new();
            frame::write_data(&mut f, 0, MAX_AHEAD, &[1; 8]).expect("w");
            f
        }),
        (
            "acknowledges the unsent",
            frame::ack_frame(1 << 40).to_vec(),
        ),
        ("garbage", vec![0xee; 64]),
    ];
    for (name, bytes) in cases {
        let victim = Session::new(config());
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut liar = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (theirs, _) = listener.accept().expect("accept");
        victim.attach(0, Wire::plain(theirs), 0).expect("attach");
        liar.write_all(&bytes).expect("lie");
        let deadline = Instant::now() + Duration::from_secs(5);
        while victim.failure().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert!(victim.failure().is_some(), "{name}: the session fails");
        let mut one = [0u8; 1];
        assert!(victim.reader().read(&mut one).is_err(), "{name}");
    }
}

#[test]
fn duplicates_are_dropped_and_chunks_are_read_in_offset_order() {
    let mut s = Session::new(config()).shared.lock().clone_for_test();
    assert!(take_chunk(&mut s, 4, vec![2; 4]).is_ok());
    assert!(
        take_chunk(&mut s, 4, vec![2; 4]).is_ok(),
        "a resend of one had"
    );
    assert!(
        take_chunk(&mut s, 4, vec![2; 5]).is_err(),
        "same offset, other length"
    );
    assert!(take_chunk(&mut s, 0, vec![1; 4]).is_ok());
    assert_eq!(s.pending.keys().copied().collect::<Vec<_>>(), vec![0, 4]);
    s.consumed = 8;
    s.pending.clear();
    assert!(
        take_chunk(&mut s, 0, vec![1; 4]).is_ok(),
        "already read: dropped"
    );
    assert!(s.pending.is_empty());
    assert!(
        take_chunk(&mut s, 6, vec![1; 4]).is_err(),
        "straddles what was read"
    );
}

/// Regression: a session that failed (its resume window over) reported it as a timeout, which
/// a patient writer took for a full window and retried for its whole patience (the
/// destination then lingered 70 s after giving up).
#[test]
fn a_patient_writer_stops_at_once_when_the_session_fails() {
    let session = Session::new(config());
    let mut w = PatientWriter {
        inner: session.writer(),
        patience: Duration::from_secs(30),
    };
    session
        .shared
        .fail(io::ErrorKind::TimedOut, "network lost".into());
    let started = Instant::now();
    let err = w.write(b"x").expect_err("failed");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_ne!(err.kind(), io::ErrorKind::TimedOut);
}

#[test]
fn the_fuzz_entry_survives_hostile_streams() {
    let mut stream = Vec::new();
    frame::write_data(&mut stream, 0, 8192, &[1; 100]).expect("w");
    frame::write_data(&mut stream, 0, 0, &[2; 8192]).expect("w");
    frame::write_data(&mut stream, 0, 0, &[2; 8192]).expect("a duplicate");
    stream.extend_from_slice(&frame::close_frame(0, 9000));
    frame::write_data(&mut stream, 0, 50, &[3; 10]).expect("an overlap ends it");
    fuzzing::receive(&stream);
    fuzzing::receive(&[0xff; 300]);
    for cut in 0..stream.len() {
        fuzzing::receive(&stream[..cut]);
    }
}

/// Without a connection to take them, the writer stops after [`FEED_CHUNKS`] chunks: data
/// waits in the session, not in an ever deeper queue.
#[test]
fn the_writer_stops_when_no_connection_takes_its_chunks() {
    let a = Session::new(config());
    let mut w = a.writer();
    let mut written = 0u64;
    let buf = vec![5u8; 10_000];
    loop {
        match w.write(&buf) {
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => break,
            Err(e) => panic!("write: {e}"),
        }
        assert!(written <= 64 << 20, "the writer never stopped");
    }
    let chunk = config().chunk as u64;
    assert_eq!(written, FEED_CHUNKS * chunk);
    assert_eq!(a.unacknowledged(), written);
}

/// A receiver that reads nothing holds the acknowledgements: the writer stops at the window,
/// however fast the connections take chunks.
#[test]
fn unacknowledged_bytes_never_exceed_the_window() {
    let (a, b) = (Session::new(config()), Session::new(config()));
    connect(&a, &b, 0);
    connect(&a, &b, 1);
    let mut w = a.writer();
    let buf = vec![9u8; 64 << 10];
    let started = Instant::now();
    let mut stalled_since: Option<Instant> = None;
    while stalled_since.is_none_or(|t| t.elapsed() < Duration::from_millis(300)) {
        assert!(started.elapsed() < Duration::from_secs(10), "no stall");
        match w.write(&buf) {
            Ok(_) => stalled_since = None,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                stalled_since.get_or_insert_with(Instant::now);
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    let held = a.unacknowledged();
    assert!(
        held <= config().window && held >= cap::FLOOR.min(config().window),
        "{held}"
    );
    // Reading frees it.
    let mut r = b.reader();
    read_some(&mut r, 1 << 20);
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.unacknowledged() >= held {
        assert!(Instant::now() < deadline, "the acknowledgements never came");
        thread::sleep(Duration::from_millis(5));
    }
}

fn read_some(r: &mut SessionReader, len: usize) {
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).expect("read");
}

/// Small messages one way (each flushed, as the destination's reports are) get through while
/// the other way streams as fast as it can.
#[test]
fn small_flushed_messages_get_through_against_a_bulk_stream() {
    let (a, b) = (Session::new(config()), Session::new(config()));
    connect(&a, &b, 0);
    let bulk = write_stream(a.writer(), 200 << 20);
    let sink = {
        let mut r = b.reader();
        thread::spawn(move || read_stream(&mut r, 200 << 20))
    };
    let mut w = b.writer();
    let mut r = a.reader();
    for i in 0..200u32 {
        let msg = i.to_le_bytes();
        let mut part = &msg[..];
        while !part.is_empty() {
            match w.write(part) {
                Ok(k) => part = &part[k..],
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                Err(e) => panic!("write {i}: {e}"),
            }
        }
        w.flush().expect("flush");
        let mut got = [0u8; 4];
        r.read_exact(&mut got).expect("read");
        assert_eq!(u32::from_le_bytes(got), i);
    }
    bulk.join().expect("bulk");
    sink.join().expect("sink");
}

/// A connection whose far end reads nothing holds the chunks it took: the stream would stand
/// still behind them until the connection is given up. The other connection sends copies
/// of the chunk the reader waits for, so the stream goes on and nothing is lost, with the
/// silent connection still attached.
#[test]
fn a_chunk_stuck_on_one_connection_is_hedged_on_another() {
    let config = SessionConfig {
        silence: Duration::from_secs(60),
        resume_window: Duration::from_secs(60),
        ..config()
    };
    let (a, b) = (Session::new(config), Session::new(config));
    // Connection 0 reaches a socket nobody reads: what it carries never arrives.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (_deaf, _) = listener.accept().expect("accept");
    a.attach(0, Wire::plain(dead), 0)
        .expect("attach the dead one");
    connect(&a, &b, 1);
    let len = 4 << 20;
    let sender = write_stream(a.writer(), len);
    let (done_tx, done) = std::sync::mpsc::channel();
    let mut r = b.reader();
    thread::spawn(move || {
        read_stream(&mut r, len);
        let _ = done_tx.send(());
    });
    done.recv_timeout(Duration::from_secs(30))
        .expect("the stream stood still behind the dead connection");
    sender.join().expect("sender");
    assert_eq!(a.stats().lost.load(Ordering::Relaxed), 0);
    assert!(a.stats().resent_bytes.load(Ordering::Relaxed) > 0);
    assert!(a.connected(0), "the silent connection is still attached");
}
