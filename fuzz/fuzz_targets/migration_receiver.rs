//! The destination of a live migration reading a hostile source: `read_message` over
//! arbitrary bytes, each message fed to the `ReceiverMachine` and, for page batches, every
//! record decoded. Nothing may panic, allocate beyond the protocol's bounds, or get the
//! receiver past Prepared without a complete, consistent transfer.
//!
//! Input: the byte stream the source would send.

#![no_main]

use ferry_proto::migration::{read_message, Message, ReceiverMachine, ReceiverState};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    let mut machine = ReceiverMachine::new();
    let mut completed = false;
    while let Ok(message) = read_message(&mut stream) {
        if let Message::Pages(batch) = &message {
            for record in batch.records() {
                if record.is_err() {
                    break;
                }
            }
        }
        let is_complete = matches!(message, Message::Complete(_));
        if machine.received(&message).is_err() {
            break;
        }
        completed |= is_complete;
        // A receiver that accepted Complete must have seen Setup, a State and matching totals:
        // the machine checked them, so reaching here means they held.
        if is_complete {
            assert_eq!(machine.state(), ReceiverState::Completed);
        }
    }
    // The destination only says Prepared after Complete; the machine must refuse it otherwise.
    let prepared = machine.sent(&Message::Prepared);
    assert_eq!(prepared.is_ok(), completed && machine.state() == ReceiverState::Prepared);
});
