"""A Pipecat voice bot for sipbridge's Twilio Media Streams mode, written as for Twilio.

The bot is plain Pipecat: FastAPI's WebSocket transport, Pipecat's own
`TwilioFrameSerializer` and its default `auto_hang_up=True`. The only thing that makes it
talk to sipbridge instead of Twilio is configuration: the tenant's pipeline URL points at
this server, and `base_url` (with the tenant's `[tenant.twilio_api]` account SID and auth
token) points Pipecat's hang-up request at sipbridge's admin listener.

What it does with a call: it echoes the caller's audio back (the caller hears the bot,
the bot hears the caller) and, after HANGUP_AFTER_S seconds of call, ends its pipeline
with an `EndFrame`; Pipecat then POSTs `Status=completed` to
`{base_url}/2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json` and sipbridge hangs up
the call (BYE; the CDR cause is `agent-hangup`).

The same bot serves calls the business places (admin API `POST /v1/calls`, or
`sipbridge dial --to +1… --from +1… --trunk carrier --custom campaign=spring`): sipbridge
dials, plays the disclosure when the far end answers, then connects here exactly as for an
inbound call; the request's `custom` parameters arrive as Twilio's `customParameters`
(logged below), so a bot can tell an outbound campaign call from an inbound one.

Environment:
  TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN   the tenant's [tenant.twilio_api] credentials
  TWILIO_API_BASE_URL                     e.g. http://127.0.0.1:8089 (the admin listener)
  BOT_HOST, BOT_PORT                      where to listen (default 127.0.0.1:8765; 0 = any
                                          free port, printed as `bot listening on PORT`)
  HANGUP_AFTER_S                          seconds after `start` before the bot ends the
                                          call (default 6)
  BOT_HEARD_PATH                          optional: write the caller audio the bot heard
                                          there (raw 16-bit little-endian PCM, 8 kHz mono)

Run: python bot.py   (requirements.txt lists the packages)
"""

import asyncio
import os
import socket
import sys

import uvicorn
from fastapi import FastAPI, WebSocket
from loguru import logger
from pipecat.frames.frames import EndFrame, InputAudioRawFrame, OutputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import (
    FastAPIWebsocketParams,
    FastAPIWebsocketTransport,
)

SAMPLE_RATE = 8000

app = FastAPI()


class Echo(FrameProcessor):
    """Plays what the caller says back to them (and keeps a copy when asked to)."""

    def __init__(self, heard_path: str | None):
        super().__init__()
        self._heard = open(heard_path, "wb") if heard_path else None

    async def process_frame(self, frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            if self._heard:
                self._heard.write(frame.audio)
                self._heard.flush()
            await self.push_frame(
                OutputAudioRawFrame(
                    audio=frame.audio,
                    sample_rate=frame.sample_rate,
                    num_channels=frame.num_channels,
                )
            )
        else:
            await self.push_frame(frame, direction)


@app.websocket("/ws")
async def media_stream(websocket: WebSocket):
    await websocket.accept()
    transport_type, call_data = await parse_telephony_websocket(websocket)
    logger.info(f"call {call_data['call_id']} ({transport_type}) stream {call_data['stream_id']}")
    # customParameters: the INVITE's X- headers, or an outbound call's `custom` parameters.
    custom = call_data.get("body") or {}
    if custom:
        logger.info(f"custom parameters: {custom}")
    serializer = TwilioFrameSerializer(
        stream_sid=call_data["stream_id"],
        call_sid=call_data["call_id"],
        account_sid=os.environ.get("TWILIO_ACCOUNT_SID", ""),
        auth_token=os.environ.get("TWILIO_AUTH_TOKEN", ""),
        base_url=os.environ.get("TWILIO_API_BASE_URL"),
    )
    transport = FastAPIWebsocketTransport(
        websocket=websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            add_wav_header=False,
            serializer=serializer,
        ),
    )
    pipeline = Pipeline(
        [transport.input(), Echo(os.environ.get("BOT_HEARD_PATH")), transport.output()]
    )
    worker = PipelineWorker(
        pipeline,
        params=PipelineParams(
            audio_in_sample_rate=SAMPLE_RATE, audio_out_sample_rate=SAMPLE_RATE
        ),
    )

    async def end_later():
        await asyncio.sleep(float(os.environ.get("HANGUP_AFTER_S", "6")))
        logger.info("ending the call")
        await worker.queue_frame(EndFrame())

    ender = asyncio.create_task(end_later())
    try:
        await PipelineRunner(handle_sigint=False).run(worker)
    finally:
        ender.cancel()


def main():
    host = os.environ.get("BOT_HOST", "127.0.0.1")
    port = int(os.environ.get("BOT_PORT", "8765"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    print(f"bot listening on {sock.getsockname()[1]}", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
    asyncio.run(server.serve(sockets=[sock]))


if __name__ == "__main__":
    main()
