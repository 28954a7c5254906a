//! Media, sans-IO: RTP/RTCP, jitter buffer, G.711, 8↔16 kHz resampling,
//! RFC 4733 telephone-events, the disclosure prompt, the playout queue and
//! call-quality figures (E-model MOS, latency histograms).
//!
//! Nothing in here imports tokio, opens sockets or reads a clock: the daemon
//! shell owns the RTP sockets and passes packets and time in.

pub mod dtmf;
pub mod g711;
pub mod jitter;
pub mod noise;
pub mod playout;
pub mod prompt;
pub mod quality;
pub mod resample;
pub mod rtp;
pub mod srtp;
