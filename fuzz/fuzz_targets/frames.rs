//! Fuzzes the wire protocol decoder with bytes as a hostile peer would send them:
//! frames split anywhere, lengths that lie, payloads that do not parse. Nothing may
//! panic, the buffer stays bounded, and whatever decodes re-encodes to the same bytes.
#![no_main]

use homing_transfer::proto::{ClientMessage, FrameDecoder, MAX_FRAME_PAYLOAD, ServerMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else { return };
    let step = usize::from(split).max(1);
    let mut decoder = FrameDecoder::new(MAX_FRAME_PAYLOAD);
    for piece in bytes.chunks(step) {
        decoder.push(piece);
        loop {
            let frame = match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => return,
            };
            let mut original = vec![frame.kind];
            let mut length = Vec::new();
            let mut n = frame.payload.len() as u64;
            while n >= 0x80 {
                length.push((n as u8) | 0x80);
                n >>= 7;
            }
            length.push(n as u8);
            original.extend_from_slice(&length);
            original.extend_from_slice(frame.payload);
            if let Ok(message) = ClientMessage::decode(frame) {
                let mut again = Vec::new();
                message.encode(&mut again);
                assert_eq!(again, original);
            }
            if let Ok(message) = ServerMessage::decode(frame) {
                let mut again = Vec::new();
                message.encode(&mut again);
                assert_eq!(again, original);
            }
        }
        assert!(decoder.buffered() <= MAX_FRAME_PAYLOAD + 11 + step);
    }
});
