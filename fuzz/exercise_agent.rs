//! One input through every parser of text the pipeline's peers send: the
//! native agent protocol, Twilio Media Streams mode, and Deepgram's live
//! results. Shared by the cargo-fuzz target (`fuzz_targets/agent_json.rs`)
//! and the corpus replay test (`tests/fuzz_corpus.rs`).
//!
//! Properties beyond "no panic": Twilio mode ignores any message whose
//! `streamSid` is not the stream's; `media` is the payload's µ-law codes as
//! they are (no resampling), never more codes than the payload implies.

use sipbridge::call::PipelineAudio;
use sipbridge::media::g711::Law;
use sipbridge::pipeline::{AgentCommand, CallInfo};
use sipbridge::pipeline::{deepgram, native, twilio::TwilioStream};

/// The stream SID the corpus uses (Twilio's shape: `MZ` + 32 hex digits).
pub(crate) const STREAM_SID: &str = "MZ00112233445566778899aabbccddeeff";

fn info(rate: u32) -> CallInfo {
    CallInfo {
        call_id: "fuzz@example".to_owned(),
        direction: sipbridge::call::CallDirection::Inbound,
        tenant: "t".to_owned(),
        account_sid: None,
        from: "+15550000001".to_owned(),
        to: "+15550000002".to_owned(),
        custom: Vec::new(),
        sample_rate: rate,
    }
}

/// An agent's transfer request as the call checks it: a target that passes
/// renders (into `Refer-To` or a Request-URI) without a line break, and
/// renders the same once parsed again.
fn check_transfer(to: &str, mode: Option<&str>) {
    use sipbridge::call::transfer::{TransferMode, TransferTarget};
    let _ = TransferMode::parse(mode.unwrap_or("blind"));
    if let Ok(target) = TransferTarget::parse(to) {
        let shown = target.to_string();
        assert!(
            !shown.contains(['\r', '\n']),
            "a line break in a transfer target: {shown:?}"
        );
        let again = TransferTarget::parse(&shown).map(|t| t.to_string());
        assert_eq!(again.as_deref(), Ok(shown.as_str()), "{to:?}");
    }
}

pub(crate) fn exercise(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Some(AgentCommand::Transfer { to, mode }) = native::parse_agent_text(&text) {
        check_transfer(&to, mode.as_deref());
    }
    let _ = deepgram::parse_server_text(&text);
    for rate in [8000, 16000] {
        let Ok(mut stream) = TwilioStream::new(&info(rate), STREAM_SID.to_owned()) else {
            panic!("rate {rate} refused");
        };
        let cmd = stream.parse_agent_text(&text);
        if let Some(AgentCommand::Transfer { to, mode }) = &cmd {
            check_transfer(to, mode.as_deref());
        }
        if cmd.is_some() {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            assert_eq!(
                v.get("streamSid").and_then(serde_json::Value::as_str),
                Some(STREAM_SID),
                "command from a message for another stream"
            );
        }
        if let Some(AgentCommand::Play(audio)) = &cmd {
            // base64 gives at most 3 bytes per 4 characters, one µ-law code
            // per byte, played as it is at any pipeline rate.
            let PipelineAudio::G711 {
                law: Law::Mu,
                codes,
            } = audio
            else {
                panic!("Twilio media is µ-law: {audio:?}");
            };
            assert!(!codes.is_empty() && codes.len() <= text.len() * 3 / 4);
        }
        // The same text twice: stateful decoding never panics on a second pass.
        let _ = stream.parse_agent_text(&text);
    }
}
