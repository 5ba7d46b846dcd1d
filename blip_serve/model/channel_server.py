"""The model service's end of an API worker's channel (blip_serve/shared/channel.py): each call goes to
the batcher as its own task, answered when its captions are; a cancel, or the channel closing, cancels
the call's task, which takes its images out of the queue and their seats back."""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.websockets import WebSocket, WebSocketDisconnect

from blip_serve.model.batcher import Batcher, CallDropped, QueueFull
from blip_serve.shared import channel

log = logging.getLogger("blip_serve.channel")


async def serve_channel(websocket: WebSocket, batcher: Batcher) -> None:
    await websocket.accept()
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
