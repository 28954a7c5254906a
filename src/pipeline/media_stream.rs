//! The connection task shared by the carrier dialects (Twilio Media Streams,
//! [`super::twilio`]; Telnyx Media Streaming, [`super::telnyx`]): JSON text
//! frames both ways, caller audio as base64 `media`, and the call held on
//! the stream until the agent closes it.
//!
//! Owns: the relay loop ([`run`]) and what a dialect must provide to it
//! ([`StreamDialect`]). Must not touch: message formats (each dialect's),
//! call or media state (only the channels in [`Channels`]); the connection is
//! opened by [`super::connect`] and reported to the call's supervisor the
//! same way as the native dialect's.

use super::connect::{AgentError, AgentSocket, close, open, report_end};
use super::native::{CLOSE_TIMEOUT, Channels};
use super::{AgentCommand, AgentTarget, CallInfo, Event};
use crate::call::PcmFrame;
use crate::call::supervisor::ConnectionFailure;
use futures_util::{SinkExt, StreamExt};
use std::time::SystemTime;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};

/// What a frame from the agent comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentFrame {
    /// A command for the call.
    Command(AgentCommand),
    /// Nothing for the call; this message goes back to the agent (the
    /// dialect's error frame).
    Reply(String),
    /// Nothing at all (logged at debug level).
    Ignored,
}

/// One stream's messages, pure: bridge events in, JSON text out; agent
/// frames in, [`AgentFrame`]s out.
pub(crate) trait StreamDialect: Send {
    /// `twilio` or `telnyx`, for logs.
    const MODE: &'static str;
    /// This stream resumes the call after its `n`-th reconnect (0: the
    /// first); `start` says so in its custom parameters.
    fn set_reconnect(&mut self, n: u32);
    /// The messages that open the stream (`connected`, `start`).
    fn opening(&mut self, info: &CallInfo) -> Vec<String>;
    /// `media` for one caller frame (in the call's pipeline format).
    fn media_message(&mut self, frame: &PcmFrame) -> String;
    /// An event towards the agent (`None`: the dialect has no message for it).
    fn event_message(&mut self, ev: &Event, now: SystemTime) -> Option<String>;
    /// `stop`, the last message.
    fn stop_message(&mut self) -> String;
    /// A text frame from the agent.
    fn agent_text(&mut self, text: &str) -> AgentFrame;
    /// A binary frame from the agent (neither dialect uses them).
    fn agent_binary(&mut self) -> AgentFrame;
}

/// Runs the connection task on a stream the dialect built for the call, or,
/// when it could not build one (an unsupported rate), reports the failure
/// to the call's supervisor at once.
pub(crate) async fn start<D: StreamDialect, E: std::fmt::Display>(
    target: AgentTarget,
    info: CallInfo,
    attempt: u32,
    chans: Channels,
    stream: Result<D, E>,
) {
    match stream {
        Ok(mut stream) => {
            stream.set_reconnect(attempt);
            run(target, info, attempt, chans, stream).await;
        }
        Err(e) => {
            warn!(
                call_id = %crate::logging::wire(&info.call_id),
                mode = D::MODE,
                error = %e,
                "media stream not started"
            );
            let _ = chans
                .commands
                .send(AgentCommand::Failed(ConnectionFailure::Unreachable))
                .await;
        }
    }
}

/// The connection task: connect (reported to the call's supervisor, see
/// [`super::connect::open`]), the opening messages, then relay both ways
/// until the call task drops its handle (→ `stop`, close), the agent closes
/// the stream (→ hang up: the call is held on the stream, as on the carrier)
/// or the connection fails (→ reported, the supervisor decides).
pub(crate) async fn run<D: StreamDialect>(
    target: AgentTarget,
    info: CallInfo,
    attempt: u32,
    mut chans: Channels,
    mut stream: D,
) {
    let Some(ws) = open(&target, &info.call_id, attempt, &chans.commands, D::MODE).await else {
        return;
    };
    let result = session(ws, &mut stream, &info, &mut chans).await;
    report_end(
        &target,
        &info.call_id,
        attempt,
        result,
        &chans.commands,
        D::MODE,
    )
    .await;
}

async fn session<D: StreamDialect>(
    mut ws: AgentSocket,
    stream: &mut D,
    info: &CallInfo,
    chans: &mut Channels,
) -> Result<(), AgentError> {
    debug!(call_id = %crate::logging::wire(&info.call_id), mode = D::MODE, "media stream starting");
    for m in stream.opening(info) {
        ws.send(Message::text(m)).await?;
    }
    // The call task dropping its handle ends the relay even while a send
    // waits for an agent that stopped reading.
    let dropped = chans.commands.clone();
    let agent_closed = tokio::select! {
        r = relay(&mut ws, stream, info, chans) => r?,
        () = dropped.closed() => false,
    };
    if agent_closed {
        return Ok(());
    }
    // Bounded: an agent that stopped reading cannot keep this task alive.
    tokio::time::timeout(CLOSE_TIMEOUT, finish(&mut ws, stream, chans))
        .await
        .unwrap_or(Ok(()))
}

/// Relays both ways until the call task drops its handle (`Ok(false)`), the
/// agent closes the stream (`Ok(true)`: the call is asked to hang up) or the
/// connection fails.
async fn relay<D: StreamDialect>(
    ws: &mut AgentSocket,
    stream: &mut D,
    info: &CallInfo,
    chans: &mut Channels,
) -> Result<bool, AgentError> {
    loop {
        tokio::select! {
            frame = chans.audio.recv() => match frame {
                Some(frame) => ws.send(Message::text(stream.media_message(&frame))).await?,
                None => return Ok(false),
            },
            ev = chans.events.recv() => match ev {
                Some(ev) => {
                    if let Some(m) = stream.event_message(&ev, SystemTime::now()) {
                        ws.send(Message::text(m)).await?;
                    }
                }
                None => return Ok(false),
            },
            msg = ws.next() => {
                let frame = match msg {
                    Some(Ok(Message::Text(text))) => stream.agent_text(&text),
                    Some(Ok(Message::Binary(_))) => stream.agent_binary(),
                    Some(Ok(Message::Close(_))) => {
                        info!(call_id = %crate::logging::wire(&info.call_id), mode = D::MODE, "agent closed the stream: hanging up");
                        let _ = chans.commands.send(AgentCommand::HangUp).await;
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(None)).await;
                        return Ok(true);
                    }
                    Some(Ok(_)) => AgentFrame::Ignored,
                    Some(Err(e)) => return Err(e.into()),
                    None => {
                        return Err(AgentError::Ws("agent dropped the connection".to_owned()));
                    }
                };
                match frame {
                    AgentFrame::Command(cmd) => {
                        if chans.commands.send(cmd).await.is_err() {
                            return Ok(false);
                        }
                    }
                    AgentFrame::Reply(m) => {
                        debug!(mode = D::MODE, "agent message refused");
                        ws.send(Message::text(m)).await?;
                    }
                    AgentFrame::Ignored => debug!(mode = D::MODE, "agent message ignored"),
                }
            }
        }
    }
}

/// The call ended: send what is still queued, then `stop`, then close.
async fn finish<D: StreamDialect>(
    ws: &mut AgentSocket,
    stream: &mut D,
    chans: &mut Channels,
) -> Result<(), AgentError> {
    while let Ok(frame) = chans.audio.try_recv() {
        ws.send(Message::text(stream.media_message(&frame))).await?;
    }
    while let Ok(ev) = chans.events.try_recv() {
        if let Some(m) = stream.event_message(&ev, SystemTime::now()) {
            ws.send(Message::text(m)).await?;
        }
    }
    ws.send(Message::text(stream.stop_message())).await?;
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, close(ws)).await;
    Ok(())
}
