"""The model service's end of an API worker's channel (blip_serve/shared/channel.py): each call goes to
the batcher as its own task, answered when its captions are; a cancel, or the channel closing, cancels
the call's task, which takes its images out of the queue and their seats back."""

from __future__ import annotations

import asyncio
import json
import logging
import os

from aiohttp import WSMsgType, web
from starlette.websockets import WebSocket, WebSocketDisconnect

from blip_serve.model.batcher import Batcher, CallDropped, QueueFull
from blip_serve.shared import channel

log = logging.getLogger("bentoml.blip_serve.channel")  # BentoML shows its own loggers only


class AiohttpWebSocket:
    """An aiohttp server's WebSocket, as serve_channel uses Starlette's."""

    def __init__(self, request: web.Request):
        # uvicorn's limit, as on the service's own route (the channel's messages are <= CHUNK)
        self.request, self.websocket = request, web.WebSocketResponse(max_msg_size=16 * 1024 * 1024)

    async def accept(self) -> None:
        await self.websocket.prepare(self.request)

    async def send_text(self, text: str) -> None:
        await self.websocket.send_str(text)

    async def receive_text(self) -> str:
        return await self.receive(WSMsgType.TEXT)

    async def receive_bytes(self) -> bytes:
        return await self.receive(WSMsgType.BINARY)

    async def receive(self, kind: WSMsgType):
        message = await self.websocket.receive()
        if message.type != kind:  # closed, or not the channel's protocol: the API worker is gone
            raise WebSocketDisconnect()
        return message.data


async def serve_worker_socket(path: str, batcher: Batcher, worker: int, open_gauge=None) -> web.AppRunner:
    """Serve the channel on this model worker's own socket at `path` (channel.worker_addresses);
    `cleanup()` the runner returned to stop."""

    async def endpoint(request: web.Request) -> web.WebSocketResponse:
        websocket = AiohttpWebSocket(request)
        await serve_channel(websocket, batcher, worker, open_gauge)
        return websocket.websocket

    app = web.Application()
    app.router.add_get(channel.PATH + "/", endpoint)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.UnixSite(runner, path).start()
    os.chmod(path, 0o600)  # this user's API workers only
    return runner


async def serve_channel(
    websocket: WebSocket | AiohttpWebSocket, batcher: Batcher, worker: int = 1, open_gauge=None
) -> None:
    """An API worker's calls to this model worker (`worker`: its number, for the log); `open_gauge`
    (blip_channels_open) counts the channels open."""
    await websocket.accept()
    log.info("model worker %d: a channel from an API worker opened", worker)
    if open_gauge is not None:
        open_gauge.inc()
    calls: dict[int, asyncio.Task] = {}
    sending = asyncio.Lock()

    async def answer(call_id: int, header: dict, data: bytearray) -> None:
        try:
            results = await batcher.submit(
                channel.read_jobs(header, data), header["timeout_s"], header["client"] or None
            )
            message = channel.answer_message(call_id, results)
        except (QueueFull, CallDropped) as exc:
            message = channel.refusal_message(call_id, "unavailable", str(exc))
        except Exception as exc:  # a server fault: the API worker answers 500, as for any other fault
            log.exception("call %s failed", call_id)
            message = channel.refusal_message(call_id, "fault", f"{type(exc).__name__}: {exc}")
        finally:
            calls.pop(call_id, None)
        try:
            async with sending:
                await websocket.send_text(message)
        except (WebSocketDisconnect, RuntimeError, OSError):  # the channel closed: nobody waits for it
            pass

    try:
        while True:
            header = json.loads(await websocket.receive_text())
            if "cancel" in header:
                if task := calls.get(header["cancel"]):
                    task.cancel()
                continue
            data, size = bytearray(), channel.payload_size(header)
            while len(data) < size:
                data += await websocket.receive_bytes()
            calls[header["call"]] = asyncio.create_task(answer(header["call"], header, data))
    except WebSocketDisconnect:
        pass
    finally:  # the API worker is gone (or replaced): nobody waits for its calls
        for task in list(calls.values()):
            task.cancel()
        if open_gauge is not None:
            open_gauge.dec()
