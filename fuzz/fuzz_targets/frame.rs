//! `ferry_proto::read_frame` over arbitrary bytes: the first layer of every snapshot file and
//! migration stream.
//!
//! Input: one byte that sets how the stream trickles in (see [`Trickle`]), then the stream.
//! Frames are read until the end or the first error, with a small limit. Besides never
//! panicking, each frame read must be at most the limit and must encode back to exactly the
//! bytes it was read from, and reading the same stream in small pieces, interrupted, as a
//! socket delivers it, must give the same frames and the same error.

#![no_main]

use std::io::{self, Cursor, Read};

use ferry_proto::{read_frame, write_frame, Frame};
use libfuzzer_sys::fuzz_target;

/// Payload limit of the reader: small, so that lengths around it are within the fuzzer's reach.
const LIMIT: u32 = 4096;

/// Hands out the stream at most `step` bytes at a time, with an `Interrupted` error before
/// every piece.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
    interrupt: bool,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.interrupt = !self.interrupt;
        if self.interrupt {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// The frames read from `r` up to the end, and the error that stopped the reader, if any.
fn read_all(r: &mut impl Read) -> (Vec<Frame>, Option<String>) {
    let mut frames = Vec::new();
    loop {
        match read_frame(r, LIMIT) {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(format!("{e:?}"))),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else {
        return;
    };

    let mut cursor = Cursor::new(stream);
    let mut frames = Vec::new();
    let error = loop {
        let start = cursor.position() as usize;
        match read_frame(&mut cursor, LIMIT) {
            Ok(Some(frame)) => {
                assert!(
                    frame.payload.len() <= LIMIT as usize,
                    "{} bytes over the limit",
                    frame.payload.len()
                );
                let mut encoded = Vec::new();
                write_frame(&mut encoded, frame.version, frame.kind, &frame.payload)
                    .expect("a Vec takes any frame");
                let end = cursor.position() as usize;
                assert_eq!(
                    &stream[start..end],
                    &encoded[..],
                    "the frame is not the bytes it came from"
                );
                frames.push(frame);
            }
            Ok(None) => {
                assert_eq!(
                    start,
                    stream.len(),
                    "end of stream reported with bytes left"
                );
                break None;
            }
            Err(e) => break Some(format!("{e:?}")),
        }
    };

    let mut trickle = Trickle {
        data: stream,
        step: usize::from(step % 17) + 1,
        interrupt: false,
    };
    let (trickled, trickled_error) = read_all(&mut trickle);
    assert_eq!(frames, trickled, "short reads changed the frames");
    assert_eq!(error, trickled_error, "short reads changed the outcome");
});
