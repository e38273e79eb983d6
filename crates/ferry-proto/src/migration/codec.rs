//! Messages to frames and back.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::blocks::BlockBatch;
use super::error::ProtocolError;
use super::message::{Message, MessageKind};
use super::pages::PageBatch;
use crate::frame::{read_frame_reusing, write_frame, FrameError};

/// Writes one message as one frame and flushes, so a buffered writer never holds back a
/// message the peer is waiting for. A page batch or state is written straight from its
/// buffer. A message that breaks its own rules ([`Message::validate`]) is refused with
/// [`io::ErrorKind::InvalidInput`] before a byte is written.
pub fn write_message<W: Write>(w: &mut W, m: &Message) -> io::Result<()> {
    m.validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let version = m.kind().format_version();
    let kind = m.kind() as u16;
    let frame = |w: &mut W, payload: &[u8]| write_frame(w, version, kind, payload);
    match m {
        Message::Hello(h) => frame(w, &json(h)?)?,
        Message::Setup(s) => frame(w, &json(s)?)?,
        Message::IterationDone(d) => frame(w, &json(d)?)?,
        Message::Complete(c) => frame(w, &json(c)?)?,
        Message::Running(r) => frame(w, &json(r)?)?,
        Message::Applied(a) => frame(w, &json(a)?)?,
        Message::Resolve(r) => frame(w, &json(r)?)?,
        Message::Resolved(r) => frame(w, &json(r)?)?,
        Message::Attach(a) => frame(w, &json(a)?)?,
        Message::Attached(a) => frame(w, &json(a)?)?,
        Message::Abort(a) => frame(w, &json(a)?)?,
        Message::Pages(batch) => frame(w, batch.as_bytes())?,
        Message::Blocks(batch) => frame(w, batch.as_bytes())?,
        Message::State(state) => frame(w, state)?,
        Message::SetupOk | Message::Prepared | Message::Commit => frame(w, &[])?,
    }
    w.flush()
}

fn json<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(io::Error::other)
}

/// Reads one message. The end of the stream is an error ([`ProtocolError::Closed`]): the
/// protocol ends with explicit messages, so a peer that hangs up has failed.
///
/// The length is bounded by the message kind before anything is allocated; then the checksum,
/// the format version, the payload and the message's own rules are checked.
pub fn read_message<R: Read>(r: &mut R) -> Result<Message, ProtocolError> {
    read_message_reusing(r, Vec::new())
}

/// Like [`read_message`], reading the payload into `spare` (its capacity reused): a Pages
/// batch then owns that buffer, and [`PageBatch::into_bytes`] gives it back for the next read.
pub fn read_message_reusing<R: Read>(r: &mut R, spare: Vec<u8>) -> Result<Message, ProtocolError> {
    let mut raw_kind = None;
    let read = read_frame_reusing(
        r,
        |header| {
            raw_kind = Some(header.kind);
            MessageKind::from_u16(header.kind).map_or(0, |k| {
                u32::try_from(k.max_payload()).expect("every kind's limit fits a frame")
            })
        },
        spare,
    );
    let frame = match read {
        Ok(Some(frame)) => frame,
        Ok(None) => return Err(ProtocolError::Closed),
        Err(FrameError::TooLarge { len, limit }) => {
            let raw = raw_kind.unwrap_or_default();
            return Err(match MessageKind::from_u16(raw) {
                Some(kind) => ProtocolError::TooLarge {
                    what: kind.name(),
                    len: u64::from(len),
                    limit: u64::from(limit),
                },
                None => ProtocolError::UnknownMessage(raw),
            });
        }
        Err(e) => return Err(ProtocolError::Frame(e)),
    };
    let kind =
        MessageKind::from_u16(frame.kind).ok_or(ProtocolError::UnknownMessage(frame.kind))?;
    if frame.version != kind.format_version() {
        return Err(ProtocolError::FrameVersion {
            kind,
            version: frame.version,
            supported: kind.format_version(),
        });
    }
    let payload = frame.payload;
    let message = match kind {
        MessageKind::Hello => Message::Hello(from_json(kind, &payload)?),
        MessageKind::Setup => Message::Setup(from_json(kind, &payload)?),
        MessageKind::IterationDone => Message::IterationDone(from_json(kind, &payload)?),
        MessageKind::Complete => Message::Complete(from_json(kind, &payload)?),
        MessageKind::Running => Message::Running(from_json(kind, &payload)?),
        MessageKind::Abort => Message::Abort(from_json(kind, &payload)?),
        MessageKind::Applied => Message::Applied(from_json(kind, &payload)?),
        MessageKind::Resolve => Message::Resolve(from_json(kind, &payload)?),
        MessageKind::Resolved => Message::Resolved(from_json(kind, &payload)?),
        MessageKind::Attach => Message::Attach(from_json(kind, &payload)?),
        MessageKind::Attached => Message::Attached(from_json(kind, &payload)?),
        MessageKind::Pages => Message::Pages(PageBatch::from_bytes(payload)?),
        MessageKind::Blocks => Message::Blocks(BlockBatch::from_bytes(payload)?),
        MessageKind::State => Message::State(payload),
        // Their limit is 0: the frame reader refused any payload.
        MessageKind::SetupOk => Message::SetupOk,
        MessageKind::Prepared => Message::Prepared,
        MessageKind::Commit => Message::Commit,
    };
    message.validate()?;
    Ok(message)
}

fn from_json<T: DeserializeOwned>(kind: MessageKind, payload: &[u8]) -> Result<T, ProtocolError> {
    serde_json::from_slice(payload).map_err(|source| ProtocolError::Decode {
        what: kind.name(),
        source,
    })
}
