//! One input through SDP offer/answer, including SDES `a=crypto` lines.
//! Shared by the cargo-fuzz target (`fuzz_targets/sdp.rs`) and the corpus
//! replay test (`tests/fuzz_corpus.rs`).
//!
//! The input is a peer's SDP: answered as an offer under every encryption
//! policy (plain, optional and required SRTP over TLS, SRTP wanted over plain
//! signalling), and taken as the answer to offers we made. Properties beyond
//! "no panic": SRTP keys are only ever agreed when the policy allows them and
//! the signalling is TLS; `required` never agrees to plain RTP; our own answer
//! is itself an SDP we can answer (we never print what we cannot read).

use sipbridge::sip::sdp::{Direction, Encryption, KeyMaterial, LocalMedia, SdpSession};
use std::net::{IpAddr, Ipv4Addr};

fn local(encryption: Encryption, secure: bool) -> LocalMedia {
    let mut m = LocalMedia::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 40_000);
    m.encryption = encryption;
    m.secure_signalling = secure;
    if encryption != Encryption::Off {
        m.srtp_key = Some(KeyMaterial::new((0u8..64).collect()));
    }
    m
}

pub(crate) fn exercise(data: &[u8]) {
    let policies = [
        (Encryption::Off, false),
        (Encryption::Optional, true),
        (Encryption::Required, true),
        (Encryption::Required, false),
    ];
    for (encryption, secure) in policies {
        let ours = local(encryption, secure);
        let mut session = SdpSession::new(7, "fuzz");
        if let Ok((negotiated, body)) = session.answer(data, &ours) {
            if negotiated.srtp.is_some() {
                assert!(
                    encryption != Encryption::Off && secure,
                    "SDES keys agreed under {encryption:?} (TLS {secure})"
                );
            }
            if encryption == Encryption::Required {
                assert!(negotiated.srtp.is_some(), "`required` agreed to plain RTP");
            }
            // Our answer, taken as an offer by a peer with the same policy,
            // must parse and agree on the same codec.
            let mut peer = SdpSession::new(8, "peer");
            match peer.answer(&body, &ours) {
                Ok((again, _)) => assert_eq!(again.codec, negotiated.codec),
                Err(e) => panic!("our own answer does not negotiate: {e}"),
            }
        }
        // The input as the answer to our offer (re-INVITE / delayed offer).
        let mut session = SdpSession::new(9, "fuzz");
        let _ = session.offer(&ours, Direction::SendRecv);
        if let Ok(negotiated) = session.accept_answer(data, &ours)
            && negotiated.srtp.is_some()
        {
            assert!(encryption != Encryption::Off && secure);
        }
    }
}
