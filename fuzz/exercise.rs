//! One input through every SIP message entry point. Shared by the cargo-fuzz target
//! (`fuzz_targets/parse_message.rs`) and the corpus replay test (`tests/fuzz_corpus.rs`).
//!
//! Properties checked beyond "no panic": anything that parses re-parses after printing
//! and prints identically the second time; every error response we would send parses as
//! a response; the stream decoder returns the same messages as the datagram parser for
//! a message with Content-Length, however the bytes are split.

use sipbridge::sip::error::SipError;
use sipbridge::sip::message::{
    MAX_MESSAGE_SIZE, Message, Response, StreamDecoder, error_response, parse_datagram,
    validate_request, validate_response,
};

fn stream(data: &[u8], chunk: usize) -> Vec<Message> {
    let mut d = StreamDecoder::new(MAX_MESSAGE_SIZE);
    let mut out = Vec::new();
    for part in data.chunks(chunk.max(1)) {
        d.push(part);
        while let Ok(Some(m)) = d.next_message() {
            out.push(m);
        }
    }
    out
}

pub(crate) fn exercise(data: &[u8]) {
    match parse_datagram(data) {
        Ok(msg) => {
            let enc = msg.encode();
            let again = match parse_datagram(&enc) {
                Ok(m) => m,
                Err(e) => panic!("printed message does not re-parse: {e}"),
            };
            assert_eq!(again.encode(), enc, "print is not stable");
            match &msg {
                Message::Request(r) => {
                    let _ = (r.vias(), r.from(), r.to(), r.call_id(), r.cseq());
                    let _ = (r.contacts(), r.record_routes(), r.max_forwards());
                    if let Err(e) = validate_request(r) {
                        let resp = Response::for_error(r, &e).encode();
                        assert!(matches!(parse_datagram(&resp), Ok(Message::Response(_))));
                    }
                }
                Message::Response(r) => {
                    let _ = validate_response(r);
                }
            }
            // The printed form always carries Content-Length, so a stream must frame it
            // to the same message, whole or byte-split.
            let whole = stream(&enc, enc.len());
            assert_eq!(whole.len(), 1, "stream did not frame a printed message");
            assert_eq!(whole[0].encode(), enc);
            let split = stream(&enc, 3);
            assert_eq!(split.len(), 1);
        }
        Err(e) => {
            if let Some(resp) = error_response(data, &SipError::from(e)) {
                assert!(
                    matches!(parse_datagram(&resp), Ok(Message::Response(_))),
                    "error response does not parse"
                );
            }
        }
    }
    let _ = stream(data, 17);
}
