//! The native agent protocol (`docs/agent-protocol.md`): one WebSocket per
//! call, JSON text messages for control, binary messages for 16-bit LE PCM.
//!
//! Owns: the message formats ([`start_message`], [`event_message`],
//! [`parse_agent_text`], PCM packing) and the connection task ([`run`]).
//! Must not touch: call or media state (it only talks to the call task
//! through the channels in [`Channels`]). The WebSocket itself is
//! tokio-tungstenite's; nothing of RFC 6455 is written here, and the
//! connection is opened by [`super::connect`] (shared with the Twilio and Telnyx modes).

use super::connect::{AgentSocket, close, open, report_end};
use super::{AgentCommand, AgentTarget, CallInfo, Event};
use crate::call::{PcmFrame, PipelineAudio};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tracing::debug;

pub use super::connect::{AgentError, CONNECT_TIMEOUT, MAX_MESSAGE_BYTES};

/// How long the bridge waits, after `stop`, for the close handshake.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The task's ends of the channels to and from the call task.
#[derive(Debug)]
pub(crate) struct Channels {
    pub(crate) audio: mpsc::Receiver<PcmFrame>,
    pub(crate) events: mpsc::Receiver<Event>,
    pub(crate) commands: mpsc::Sender<AgentCommand>,
}

/// The `start` message; `reconnect` is 0 on a call's first connection and n
/// on its n-th reconnect.
pub fn start_message(info: &CallInfo, reconnect: u32) -> String {
    // The native `start` has its own `reconnect` field.
    let custom = info.custom_parameters(0);
    serde_json::json!({
        "event": "start",
        "call_id": info.call_id,
        "tenant": info.tenant,
        "direction": info.direction.as_str(),
        "from": info.from,
        "to": info.to,
        "codec": "pcm_s16le",
        "sample_rate": info.sample_rate,
        "custom": custom,
        "reconnect": reconnect,
    })
    .to_string()
}

fn event_message(ev: &Event) -> String {
    match ev {
        Event::Dtmf(d) => serde_json::json!({"event": "dtmf", "digit": d.to_string()}),
        Event::Mark { name, cleared } => {
            serde_json::json!({"event": "mark", "name": name, "cleared": cleared})
        }
        Event::Transcript(t) => return super::deepgram::transcript_message(t),
        Event::Stats {
            media_time,
            quality,
        } => return stats_message(*media_time, quality),
        Event::Transfer(u) => {
            let mut m = super::transfer_fields(u);
            m.insert("event".into(), "transfer".into());
            serde_json::Value::Object(m)
        }
    }
    .to_string()
}

/// The `stats` event: the CDR's `quality` object as it stands, with
/// `event` and `media_time_ms` (since the call's media started).
pub fn stats_message(
    media_time: std::time::Duration,
    quality: &crate::call::QualitySummary,
) -> String {
    let mut v = serde_json::to_value(quality).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        obj.insert("event".into(), "stats".into());
        obj.insert(
            "media_time_ms".into(),
            u64::try_from(media_time.as_millis())
                .unwrap_or(u64::MAX)
                .into(),
        );
    }
    v.to_string()
}

/// The `stop` message.
pub fn stop_message() -> String {
    serde_json::json!({"event": "stop"}).to_string()
}

/// Samples as 16-bit little-endian bytes.
pub fn pcm_to_bytes(samples: &[i16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// 16-bit little-endian bytes as samples (a trailing odd byte is ignored).
pub fn bytes_to_pcm(bytes: &[u8]) -> Vec<i16> {
    bytes
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// A text message from the agent as a command; `None` for anything that is
/// not a known, well-formed event (ignored and logged by the caller).
pub fn parse_agent_text(text: &str) -> Option<AgentCommand> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    match v.get("event")?.as_str()? {
        "mark" => Some(AgentCommand::Mark(v.get("name")?.as_str()?.to_owned())),
        "clear" => Some(AgentCommand::Clear),
        "hangup" => Some(AgentCommand::HangUp),
        "dtmf" => Some(AgentCommand::SendDtmf(
            v.get("digits")?.as_str()?.chars().take(256).collect(),
        )),
        "pause_recording" => Some(AgentCommand::PauseRecording(true)),
        "resume_recording" => Some(AgentCommand::PauseRecording(false)),
        "transfer" => super::transfer_command(&v),
        _ => None,
    }
}

/// The connection task: connect, report [`AgentCommand::Connected`], send
/// `start`, then relay both ways until the call task drops its handle
/// (→ `stop`, close) or the connection fails. A failure is logged once with
/// the call id, the attempt and the redacted URL, and reported as
/// [`AgentCommand::Failed`]; what follows (reconnect, fallback, carry on) is
/// the call's supervisor's decision. If the handle is dropped while
/// connecting, the attempt is abandoned at once.
pub(crate) async fn run(target: AgentTarget, info: CallInfo, attempt: u32, mut chans: Channels) {
    let Some(ws) = open(&target, &info.call_id, attempt, &chans.commands, "native").await else {
        return;
    };
    let result = session(ws, &info, attempt, &mut chans).await;
    report_end(
        &target,
        &info.call_id,
        attempt,
        result,
        &chans.commands,
        "native",
    )
    .await;
}

/// Relays both ways until the call task drops its handle (`Ok`) or the
/// connection fails.
async fn relay(ws: &mut AgentSocket, chans: &mut Channels) -> Result<(), AgentError> {
    loop {
        tokio::select! {
            frame = chans.audio.recv() => match frame {
                Some(frame) => ws.send(Message::binary(pcm_to_bytes(&frame.samples))).await?,
                None => return Ok(()),
            },
            ev = chans.events.recv() => match ev {
                Some(ev) => ws.send(Message::text(event_message(&ev))).await?,
                None => return Ok(()),
            },
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(bytes))) => {
                    let cmd = AgentCommand::Play(PipelineAudio::Pcm(bytes_to_pcm(&bytes)));
                    if chans.commands.send(cmd).await.is_err() {
                        return Ok(());
                    }
                }
                Some(Ok(Message::Text(text))) => match parse_agent_text(&text) {
                    Some(cmd) => {
                        if chans.commands.send(cmd).await.is_err() {
                            return Ok(());
                        }
                    }
                    None => debug!("agent message ignored"),
                },
                Some(Ok(Message::Close(_))) | None => {
                    return Err(AgentError::Ws("agent closed the connection".to_owned()));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
            },
        }
    }
}

async fn session(
    mut ws: AgentSocket,
    info: &CallInfo,
    attempt: u32,
    chans: &mut Channels,
) -> Result<(), AgentError> {
    ws.send(Message::text(start_message(info, attempt))).await?;
    // The call task dropping its handle ends the relay even while a send
    // waits for an agent that stopped reading.
    let dropped = chans.commands.clone();
    tokio::select! {
        r = relay(&mut ws, chans) => r?,
        () = dropped.closed() => {}
    }
    // The call ended: send what is still queued, then stop, then close — all
    // bounded, so an agent that stopped reading cannot keep this task alive.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Ok(frame) = chans.audio.try_recv() {
            ws.send(Message::binary(pcm_to_bytes(&frame.samples)))
                .await?;
        }
        while let Ok(ev) = chans.events.try_recv() {
            ws.send(Message::text(event_message(&ev))).await?;
        }
        ws.send(Message::text(stop_message())).await?;
        close(&mut ws).await
    })
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_message_has_every_field() {
        let info = CallInfo {
            call_id: "abc@h".into(),
            direction: crate::call::CallDirection::Inbound,
            tenant: "demo".into(),
            account_sid: None,
            from: "+1555".into(),
            to: "+1666".into(),
            custom: vec![("X-Order".into(), "42".into())],
            sample_rate: 16_000,
        };
        let v: serde_json::Value = serde_json::from_str(&start_message(&info, 2)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"start","call_id":"abc@h","tenant":"demo","direction":"inbound",
                "from":"+1555","to":"+1666","codec":"pcm_s16le","sample_rate":16000,
                "custom":{"X-Order":"42"},"reconnect":2})
        );
    }

    #[test]
    fn events_and_stop() {
        assert_eq!(
            event_message(&Event::Dtmf('5')),
            r#"{"digit":"5","event":"dtmf"}"#
        );
        let v: serde_json::Value = serde_json::from_str(&event_message(&Event::Mark {
            name: "m1".into(),
            cleared: false,
        }))
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"mark","name":"m1","cleared":false})
        );
        assert_eq!(stop_message(), r#"{"event":"stop"}"#);
    }

    /// `stats` is the CDR's `quality` object plus `event` and
    /// `media_time_ms`.
    #[test]
    fn stats_message_is_the_quality_object_with_event_and_media_time() {
        let mut m = crate::media::quality::LatencyHistogram::default();
        m.record(Duration::from_millis(12));
        let q = crate::call::QualitySummary::from_quality(&crate::call::MediaQuality {
            jitter_ms: 1.25,
            loss_pct: 0.5,
            concealed: 2,
            jb_depth_current: 1,
            jb_depth_avg: 1.5,
            jb_depth_max: 3,
            jb_target: Duration::from_millis(40),
            mos: Some(4.0123),
            one_way_delay_ms: 60.0,
            latency_in: m.clone(),
            latency_in_beyond_target: Default::default(),
            latency_out: m.clone(),
            mark_to_playout: m,
        });
        let v: serde_json::Value =
            serde_json::from_str(&stats_message(Duration::from_millis(3020), &q)).unwrap();
        let lat = serde_json::json!({"count":1,"p50":12.0,"p99":12.0,"max":12.0});
        assert_eq!(
            v,
            serde_json::json!({"event":"stats","media_time_ms":3020,"jitter_ms":1.3,
                "loss_pct":0.5,"concealed":2,"jb_depth":{"avg":1.5,"max":3},"jb_target_ms":40,
                "mos":4.01,"one_way_delay_ms":60.0,"latency_in_ms":lat,
                "latency_in_beyond_target_ms":{"count":0,"p50":null,"p99":null,"max":null},
                "latency_out_ms":lat,"mark_to_playout_ms":lat})
        );
    }

    #[test]
    fn agent_text_parsing() {
        assert_eq!(
            parse_agent_text(r#"{"event":"mark","name":"a"}"#),
            Some(AgentCommand::Mark("a".into()))
        );
        assert_eq!(
            parse_agent_text(r#"{"event":"clear"}"#),
            Some(AgentCommand::Clear)
        );
        assert_eq!(
            parse_agent_text(r#"{"event":"hangup"}"#),
            Some(AgentCommand::HangUp)
        );
        assert_eq!(
            parse_agent_text(r#"{"event":"pause_recording"}"#),
            Some(AgentCommand::PauseRecording(true))
        );
        assert_eq!(
            parse_agent_text(r#"{"event":"resume_recording"}"#),
            Some(AgentCommand::PauseRecording(false))
        );
        assert_eq!(parse_agent_text(r#"{"event":"mark"}"#), None);
        assert_eq!(parse_agent_text(r#"{"event":"nope"}"#), None);
        assert_eq!(parse_agent_text("not json"), None);
        assert_eq!(parse_agent_text(r#"[1,2]"#), None);
    }

    #[test]
    fn pcm_round_trip_little_endian() {
        let bytes = pcm_to_bytes(&[1, -2, i16::MAX]);
        assert_eq!(bytes, vec![1, 0, 0xfe, 0xff, 0xff, 0x7f]);
        assert_eq!(bytes_to_pcm(&bytes), vec![1, -2, i16::MAX]);
        assert_eq!(bytes_to_pcm(&[1, 0, 9]), vec![1]);
    }

    #[test]
    fn dtmf_from_the_agent_is_a_command() {
        assert_eq!(
            parse_agent_text(r#"{"event":"dtmf","digits":"12#"}"#),
            Some(AgentCommand::SendDtmf("12#".into()))
        );
        assert_eq!(parse_agent_text(r#"{"event":"dtmf"}"#), None);
        assert_eq!(parse_agent_text(r#"{"event":"dtmf","digits":7}"#), None);
    }

    #[test]
    fn transfer_both_ways() {
        assert_eq!(
            parse_agent_text(r#"{"event":"transfer","to":"tel:+15557654321","mode":"blind"}"#),
            Some(AgentCommand::Transfer {
                to: "tel:+15557654321".into(),
                mode: Some("blind".into())
            })
        );
        assert_eq!(
            parse_agent_text(r#"{"event":"transfer","to":"+15557654321"}"#),
            Some(AgentCommand::Transfer {
                to: "+15557654321".into(),
                mode: None
            })
        );
        assert_eq!(parse_agent_text(r#"{"event":"transfer"}"#), None);
        assert_eq!(parse_agent_text(r#"{"event":"transfer","to":5}"#), None);
        assert_eq!(
            parse_agent_text(r#"{"event":"transfer","to":"sip:a@b","mode":1}"#),
            None
        );
        let long = format!(r#"{{"event":"transfer","to":"{}"}}"#, "9".repeat(5000));
        match parse_agent_text(&long) {
            Some(AgentCommand::Transfer { to, .. }) => assert_eq!(to.len(), 512),
            other => panic!("{other:?}"),
        }
        use crate::call::transfer::{TransferFailure, TransferMode, TransferState, TransferUpdate};
        let v: serde_json::Value =
            serde_json::from_str(&event_message(&Event::Transfer(TransferUpdate {
                to: "tel:+15557654321".into(),
                mode: TransferMode::Blind,
                state: TransferState::Failed(TransferFailure::Refused),
                status: Some(403),
            })))
            .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"transfer","result":"failed","reason":"refused",
                "status":403,"to":"tel:+15557654321","mode":"blind"})
        );
        let v: serde_json::Value =
            serde_json::from_str(&event_message(&Event::Transfer(TransferUpdate {
                to: "tel:+1".into(),
                mode: TransferMode::Blind,
                state: TransferState::Accepted,
                status: Some(202),
            })))
            .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"transfer","result":"accepted","status":202,
                "to":"tel:+1","mode":"blind"})
        );
    }
}
