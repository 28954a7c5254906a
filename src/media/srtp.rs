//! SRTP and SRTCP (RFC 3711) at the packet boundary of a call's media: the
//! datagrams the daemon receives are unprotected before RTP parsing, and the
//! RTP/RTCP the media session produces is protected just before it leaves.
//!
//! Owns: the two one-way `webrtc_srtp::context::Context`s of a call (ours
//! encrypts with our SDES key, the peer's decrypts with its key), replay
//! protection (a 64-packet window for SRTP, RFC 3711 §3.3.2, and for
//! SRTCP), and a bound on the SSRCs a context tracks. Must not touch:
//! sockets, clocks, SDP (the keys arrive as [`SrtpParams`]).
//!
//! Crate: `webrtc-srtp` 0.17.2, the webrtc-rs sibling of our `rtp`/`rtcp`
//! 0.17.2. Its `Context` is plain synchronous code over byte slices, so it
//! fits the sans-IO media layer (the crate's tokio-based `session` module is
//! not used). Its master keys are not zeroized by the crate on drop; ours are
//! ([`crate::sip::sdp::KeyMaterial`]).

use bytes::Bytes;
use webrtc_srtp::context::Context;
use webrtc_srtp::option::{srtcp_replay_protection, srtp_replay_protection};
use webrtc_srtp::protection_profile::ProtectionProfile;

use crate::sip::sdp::{CryptoSuite, KeyMaterial, SrtpParams};

/// Replay window, in packets (RFC 3711 §3.3.2's minimum is 64).
const REPLAY_WINDOW: usize = 64;
/// Distinct SSRCs a receiving context keeps state for: the crate creates a
/// state for a packet's SSRC before checking its tag, so forged packets with
/// fresh SSRCs are dropped past this many instead of growing memory.
const MAX_SSRCS: usize = 8;

/// Why a packet was not let through.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SrtpError {
    /// Authentication failed, a replay, too short, or not RTP at all.
    #[error("srtp: {0}")]
    Rejected(String),
    /// A new SSRC beyond [`MAX_SSRCS`].
    #[error("srtp: too many SSRCs")]
    TooManySsrcs,
    /// The keys do not fit the suite (caller misuse).
    #[error("srtp: bad key: {0}")]
    BadKey(String),
}

fn profile(suite: CryptoSuite) -> ProtectionProfile {
    match suite {
        CryptoSuite::AesCm128HmacSha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
        CryptoSuite::AesCm128HmacSha1_32 => ProtectionProfile::Aes128CmHmacSha1_32,
        CryptoSuite::AesCm256HmacSha1_80 => ProtectionProfile::Aes256CmHmacSha1_80,
        CryptoSuite::AesCm256HmacSha1_32 => ProtectionProfile::Aes256CmHmacSha1_32,
        CryptoSuite::AeadAes128Gcm => ProtectionProfile::AeadAes128Gcm,
        CryptoSuite::AeadAes256Gcm => ProtectionProfile::AeadAes256Gcm,
    }
}

/// Bytes SRTP adds to an RTP packet (the tag), and SRTCP to an RTCP one
/// (E flag + index, then the tag).
fn overhead(suite: CryptoSuite) -> (usize, usize) {
    match suite {
        CryptoSuite::AesCm128HmacSha1_80 | CryptoSuite::AesCm256HmacSha1_80 => (10, 4 + 10),
        CryptoSuite::AesCm128HmacSha1_32 | CryptoSuite::AesCm256HmacSha1_32 => (4, 4 + 10),
        CryptoSuite::AeadAes128Gcm | CryptoSuite::AeadAes256Gcm => (16, 4 + 16),
    }
}

fn context(suite: CryptoSuite, key: &KeyMaterial) -> Result<Context, SrtpError> {
    let (k, s) = key.split(suite);
    Context::new(
        k,
        s,
        profile(suite),
        Some(srtp_replay_protection(REPLAY_WINDOW)),
        Some(srtcp_replay_protection(REPLAY_WINDOW)),
    )
    .map_err(|e| SrtpError::BadKey(e.to_string()))
}

/// One call's SRTP: protect outbound, unprotect inbound.
pub struct SrtpSession {
    params: SrtpParams,
    outbound: Context,
    inbound: Context,
    rtp_ssrcs: Vec<u32>,
    rtcp_ssrcs: Vec<u32>,
}

impl std::fmt::Debug for SrtpSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SrtpSession")
            .field("suite", &self.params.suite)
            .finish_non_exhaustive()
    }
}

impl SrtpSession {
    /// Contexts for the negotiated suite and keys.
    pub fn new(params: &SrtpParams) -> Result<SrtpSession, SrtpError> {
        Ok(SrtpSession {
            outbound: context(params.suite, &params.local)?,
            inbound: context(params.suite, &params.remote)?,
            params: params.clone(),
            rtp_ssrcs: Vec::new(),
            rtcp_ssrcs: Vec::new(),
        })
    }

    /// Whether this session already runs `params` (a re-INVITE that kept
    /// the keys keeps the contexts, with their rollover counters).
    pub fn runs(&self, params: &SrtpParams) -> bool {
        self.params == *params
    }

    /// An SRTP packet in, the RTP packet out.
    pub fn unprotect_rtp(&mut self, packet: &[u8]) -> Result<Bytes, SrtpError> {
        let ssrc = packet
            .get(8..12)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| SrtpError::Rejected("too short".to_owned()))?;
        if packet.len() < 12 + overhead(self.params.suite).0 {
            return Err(SrtpError::Rejected("too short".to_owned()));
        }
        // webrtc-srtp 0.17.2 parses the header (with the `rtp` crate) before
        // it checks the tag, and that parser panics on an RFC 8285 element
        // longer than its extension block (found by fuzz/fuzz_targets/rtp.rs):
        // the header is walked here first.
        crate::media::rtp::check_header(packet)
            .map_err(|e| SrtpError::Rejected(format!("malformed RTP header: {e:?}")))?;
        admit(&mut self.rtp_ssrcs, ssrc)?;
        self.inbound
            .decrypt_rtp(packet)
            .map_err(|e| SrtpError::Rejected(e.to_string()))
    }

    /// An SRTCP packet in, the RTCP compound packet out.
    pub fn unprotect_rtcp(&mut self, packet: &[u8]) -> Result<Bytes, SrtpError> {
        let ssrc = packet
            .get(4..8)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| SrtpError::Rejected("too short".to_owned()))?;
        // webrtc-srtp 0.17.2 reads the SRTCP index before checking the length
        // (an arithmetic underflow panic on a short packet): checked here.
        if packet.len() < 8 + overhead(self.params.suite).1 {
            return Err(SrtpError::Rejected("too short".to_owned()));
        }
        admit(&mut self.rtcp_ssrcs, ssrc)?;
        self.inbound
            .decrypt_rtcp(packet)
            .map_err(|e| SrtpError::Rejected(e.to_string()))
    }

    /// Our RTP packet out as SRTP.
    pub fn protect_rtp(&mut self, packet: &[u8]) -> Result<Bytes, SrtpError> {
        self.outbound
            .encrypt_rtp(packet)
            .map_err(|e| SrtpError::Rejected(e.to_string()))
    }

    /// Our RTCP compound packet out as SRTCP.
    pub fn protect_rtcp(&mut self, packet: &[u8]) -> Result<Bytes, SrtpError> {
        self.outbound
            .encrypt_rtcp(packet)
            .map_err(|e| SrtpError::Rejected(e.to_string()))
    }
}

fn admit(known: &mut Vec<u32>, ssrc: u32) -> Result<(), SrtpError> {
    if known.contains(&ssrc) {
        return Ok(());
    }
    if known.len() >= MAX_SSRCS {
        return Err(SrtpError::TooManySsrcs);
    }
    known.push(ssrc);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(suite: CryptoSuite, a: u8, b: u8) -> SrtpParams {
        SrtpParams {
            suite,
            tag: 1,
            local: KeyMaterial::new(vec![a; 46]),
            remote: KeyMaterial::new(vec![b; 46]),
        }
    }

    /// The two ends of one call: ours and the peer's (keys swapped).
    fn pair(suite: CryptoSuite) -> (SrtpSession, SrtpSession) {
        let ours = SrtpSession::new(&params(suite, 1, 2)).unwrap();
        let theirs = SrtpSession::new(&params(suite, 2, 1)).unwrap();
        (ours, theirs)
    }

    fn rtp(seq: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![
            0x80,
            0,
            (seq >> 8) as u8,
            seq as u8,
            0,
            0,
            0,
            160,
            0xca,
            0xfe,
            0,
            1,
        ];
        p.extend_from_slice(payload);
        p
    }

    /// The fuzzer's find (fuzz/corpus/rtp/crash-615ca3e7…): an RFC 8285
    /// one-byte extension whose element claims 16 bytes of a 4-byte block
    /// made webrtc-srtp's header parser panic before any tag check.
    #[test]
    fn an_extension_element_past_its_block_is_rejected_not_a_panic() {
        for suite in SUITES {
            let (mut ours, _) = pair(suite);
            let mut p = vec![0x90, 0, 0, 1, 0, 0, 0, 160, 0xca, 0xfe, 0, 1];
            // profile 0xBEDE, one 32-bit word: element id 1, length 16.
            p.extend_from_slice(&[0xbe, 0xde, 0, 1, 0x1f, 0, 0, 0]);
            p.extend_from_slice(&[0u8; 40]);
            let got = ours.unprotect_rtp(&p);
            assert!(
                matches!(&got, Err(SrtpError::Rejected(why)) if why.contains("malformed")),
                "{suite:?}: {got:?}"
            );
        }
    }

    const SUITES: [CryptoSuite; 6] = [
        CryptoSuite::AesCm128HmacSha1_80,
        CryptoSuite::AesCm128HmacSha1_32,
        CryptoSuite::AesCm256HmacSha1_80,
        CryptoSuite::AesCm256HmacSha1_32,
        CryptoSuite::AeadAes128Gcm,
        CryptoSuite::AeadAes256Gcm,
    ];

    #[test]
    fn every_suite_round_trips_and_hides_the_payload() {
        for suite in SUITES {
            let (mut ours, mut theirs) = pair(suite);
            let plain = rtp(7, &[0x55; 160]);
            let wire = ours.protect_rtp(&plain).unwrap();
            assert!(
                !wire.windows(16).any(|w| w == [0x55; 16]),
                "{suite:?}: payload visible"
            );
            assert_eq!(theirs.unprotect_rtp(&wire).unwrap(), plain, "{suite:?}");
        }
    }

    #[test]
    fn a_replayed_packet_is_rejected() {
        let (mut ours, mut theirs) = pair(CryptoSuite::AesCm128HmacSha1_80);
        let wire = ours.protect_rtp(&rtp(1, &[1; 160])).unwrap();
        assert!(theirs.unprotect_rtp(&wire).is_ok());
        assert!(matches!(
            theirs.unprotect_rtp(&wire),
            Err(SrtpError::Rejected(_))
        ));
    }

    #[test]
    fn a_tampered_packet_is_rejected() {
        let (mut ours, mut theirs) = pair(CryptoSuite::AesCm128HmacSha1_32);
        let mut wire = ours.protect_rtp(&rtp(1, &[1; 160])).unwrap().to_vec();
        wire[20] ^= 1;
        assert!(theirs.unprotect_rtp(&wire).is_err());
    }

    #[test]
    fn plain_rtp_is_not_accepted() {
        let (_, mut theirs) = pair(CryptoSuite::AesCm128HmacSha1_80);
        assert!(theirs.unprotect_rtp(&rtp(1, &[1; 160])).is_err());
        assert!(theirs.unprotect_rtp(&[0x80, 0]).is_err());
    }

    #[test]
    fn srtcp_round_trips() {
        let (mut ours, mut theirs) = pair(CryptoSuite::AesCm128HmacSha1_80);
        // An RTCP receiver report with no report blocks: V=2, PT=201, length 1.
        let rr = [0x80, 201, 0, 1, 0xca, 0xfe, 0, 1];
        let wire = ours.protect_rtcp(&rr).unwrap();
        assert_ne!(&wire[..], &rr[..]);
        assert_eq!(&theirs.unprotect_rtcp(&wire).unwrap()[..], &rr[..]);
        assert!(theirs.unprotect_rtcp(&wire).is_err(), "SRTCP replay");
    }

    #[test]
    fn short_srtcp_is_rejected_not_a_panic() {
        // Found by `arbitrary_datagrams_never_panic`: an RTCP header and no room
        // for the index and tag made webrtc-srtp 0.17.2 underflow.
        for suite in SUITES {
            let (_, mut theirs) = pair(suite);
            for len in 0..40 {
                let mut p = vec![0x80, 201, 0, 1, 0xca, 0xfe, 0, 1];
                p.resize(len.max(8), 0);
                p.truncate(len);
                let _ = theirs.unprotect_rtcp(&p);
                let _ = theirs.unprotect_rtp(&p);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]
        #[test]
        fn arbitrary_datagrams_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            for suite in SUITES {
                let (_, mut theirs) = pair(suite);
                let _ = theirs.unprotect_rtp(&data);
                let _ = theirs.unprotect_rtcp(&data);
            }
        }
    }

    #[test]
    fn forged_ssrcs_are_bounded() {
        let (_, mut theirs) = pair(CryptoSuite::AesCm128HmacSha1_80);
        for ssrc in 0..100u32 {
            let mut p = rtp(1, &[0; 40]);
            p[8..12].copy_from_slice(&ssrc.to_be_bytes());
            let _ = theirs.unprotect_rtp(&p);
        }
        assert_eq!(theirs.rtp_ssrcs.len(), MAX_SSRCS);
    }
}
