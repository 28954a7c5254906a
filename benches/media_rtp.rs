//! Receive path cost per 20 ms frame: RTP parse from `Bytes` + receiver checks
//! (source, payload type, sequence, RFC 3550 stats) + jitter buffer push/pop.
//! The codec and resampler are benchmarked beside them (`benches/media_codec*`).

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use sipbridge::media::jitter::{JitterBuffer, JitterConfig};
use sipbridge::media::rtp::{RtpInput, RtpReceiver, RtpReceiverConfig, RtpSender};

fn receive_path(c: &mut Criterion) {
    let from: SocketAddr = "192.0.2.1:5004".parse().unwrap_or_else(|_| unreachable!());
    let frame = Duration::from_millis(20);
    c.bench_function(
        "rtp parse + receiver + jitter push/pop, per 20 ms frame",
        |b| {
            let Ok(mut rx) = RtpReceiver::new(RtpReceiverConfig::new(0, Some(101)), from) else {
                return;
            };
            let Ok(mut jb) = JitterBuffer::new(JitterConfig::new(frame)) else {
                return;
            };
            // Marshalling the next packet is set-up, outside the measurement.
            let mut tx = RtpSender::new(0x1234_5678, 65_000, 0, 0);
            let mut now = Instant::now();
            b.iter_batched(
                || tx.packet(&[0xff; 160], false, 160),
                |data: Bytes| {
                    if let RtpInput::Media {
                        ssrc,
                        timestamp,
                        payload,
                        ..
                    } = rx.on_datagram(now, from, black_box(data))
                    {
                        jb.push(now, ssrc, timestamp, payload);
                    }
                    let out = jb.pop(now);
                    now += frame;
                    out
                },
                BatchSize::SmallInput,
            );
        },
    );
}

criterion_group!(benches, receive_path);
criterion_main!(benches);
