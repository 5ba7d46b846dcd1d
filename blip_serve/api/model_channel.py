"""An API worker's end of its channels to the model service (blip_serve/shared/channel.py): a WebSocket
to each model worker, opened on the first call and again after it closes, that carries this API
worker's calls to it."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import aiohttp

from blip_serve.shared import channel
from blip_serve.shared.errors import Unavailable
from blip_serve.shared.jobs import CaptionJob, CaptionResult

REOPEN_S = 1.0  # how long calls pass over a channel that closed under them or failed to open


class ChannelClosed(aiohttp.ServerDisconnectedError):
    """The channel closed under a call (a model worker died or is being replaced): like a lost
    keep-alive connection, the call may be sent again (api/model_client.py)."""


class ModelChannel:
    def __init__(self, address: str):
        """`address`: the model service's, file:///a/socket or http://host:port (host/runner.py)."""
        if address.startswith("file://"):
            self.url, self.socket_path = "http://model" + channel.PATH + "/", address.removeprefix("file://")
        else:
            self.url, self.socket_path = address.rstrip("/") + channel.PATH + "/", None
        self.session: aiohttp.ClientSession | None = None
        self.websocket: aiohttp.ClientWebSocketResponse | None = None
        self.connecting = asyncio.Lock()
        self.sending = asyncio.Lock()
        self.waiting: dict[int, tuple[aiohttp.ClientWebSocketResponse, asyncio.Future]] = {}
        self.tasks: set[asyncio.Task] = set()  # readers, sends and cancels under way
        self.ids = itertools.count(1)
        self.failed_at = -REOPEN_S  # when it last closed under its calls, or failed to open (time.monotonic())

    async def call(self, jobs: list[CaptionJob], timeout_s: float, client: str = "") -> list[CaptionResult]:
        """The jobs' results, as BlipModelService.caption_batch answers them. Raises ChannelClosed
        (send again), Unavailable (the queue is full: 503) or RuntimeError (a fault in the model
        service: 500). Cancelling the call cancels it in the model service too."""
        websocket = await self.connected()
        call_id = next(self.ids)
        answer = asyncio.get_running_loop().create_future()
        self.waiting[call_id] = (websocket, answer)
        header, chunks = channel.call_message(call_id, jobs, timeout_s, client)
        # Sent whole even if the caller is cancelled meanwhile: half a call would garble the channel.
        sent = self.in_background(self.send(websocket, header, chunks))
        try:
            await asyncio.shield(sent)
            message = await answer
        except asyncio.CancelledError:
            if not websocket.closed:  # the caller is gone: its images leave the queue (sent after the call)
                self.in_background(self.cancel(websocket, call_id))
            raise
        finally:
            self.waiting.pop(call_id, None)
            if answer.done() and not answer.cancelled():
                answer.exception()  # retrieved: a send that failed first leaves it unread
        if "unavailable" in message:
            raise Unavailable("the server is at capacity; retry shortly")
        if "fault" in message:
            raise RuntimeError(f"the model service failed: {message['fault']}")
        return channel.read_results(message)

    async def send(self, websocket: aiohttp.ClientWebSocketResponse, header: str, chunks: list) -> None:
        try:
            async with self.sending:
                await websocket.send_str(header)
                for chunk in chunks:
                    await websocket.send_bytes(chunk)
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise ChannelClosed(f"the channel to the model closed: {exc}") from None

    def in_background(self, work) -> asyncio.Task:
        """A task kept until it ends (the event loop keeps only weak references)."""
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(lambda done: done.cancelled() or done.exception())  # its caller may be gone
        return task

    async def cancel(self, websocket: aiohttp.ClientWebSocketResponse, call_id: int) -> None:
        try:
            async with self.sending:
                await websocket.send_str(channel.cancel_message(call_id))
        except (ConnectionError, aiohttp.ClientError):
            pass  # closed: the model service cancels every call of a closed channel

    async def connected(self) -> aiohttp.ClientWebSocketResponse:
        async with self.connecting:
            if self.websocket is None or self.websocket.closed:
                if self.session is None:
                    connector = aiohttp.UnixConnector(self.socket_path) if self.socket_path else None
                    # The timeout bounds opening the channel; the calls on it have their own deadlines.
                    self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))
                try:
                    self.websocket = await self.session.ws_connect(self.url, max_msg_size=0)
                except aiohttp.WSServerHandshakeError as exc:  # the model worker is not serving yet
                    self.failed_at = time.monotonic()
                    raise ChannelClosed(f"the model service refused the channel: {exc.status}") from None
                except aiohttp.ClientError:  # nobody serves the socket (a worker being replaced)
                    self.failed_at = time.monotonic()
                    raise
                self.in_background(self.read_answers(self.websocket))
            return self.websocket

    async def read_answers(self, websocket: aiohttp.ClientWebSocketResponse) -> None:
        """Hand each answer to its call; when the channel closes, its calls in flight are lost (they
        raise ChannelClosed, and are sent again on a new channel)."""
        try:
            async for message in websocket:
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                answer = json.loads(message.data)
                _, future = self.waiting.get(answer["call"], (None, None))
                if future is not None and not future.done():
                    future.set_result(answer)
        finally:
            if self.websocket is websocket:
                self.websocket = None  # the next call opens a new channel
                self.failed_at = time.monotonic()  # the worker is gone, or being replaced
            for on, future in list(self.waiting.values()):
                if on is websocket and not future.done():
                    future.set_exception(ChannelClosed("the channel to the model closed"))
            await websocket.close()

    async def close(self) -> None:
        if self.websocket is not None:
            await self.websocket.close()
        if self.session is not None:
            await self.session.close()


class ModelChannels:
    """An API worker's channels to the model service: one to each address of
    channel.worker_addresses (each model worker's own socket). A call goes on the channel with the
    fewest images in flight (the next in turn among equals), passing over a channel that closed or
    failed to open in the last REOPEN_S (its model worker is being replaced). When every one has,
    a call goes on a new channel to the service's own socket (`shared`), where the replacement
    worker answers once it has loaded: a call lost with its worker waits for it rather than failing."""

    def __init__(self, addresses: list[str], shared: str | None = None):
        self.channels = [ModelChannel(address) for address in addresses]
        self.shared = shared
        self.in_flight = dict.fromkeys(self.channels, 0)
        self.turns = itertools.count()

    async def call(self, jobs: list[CaptionJob], timeout_s: float, client: str = "") -> list[CaptionResult]:
        """ModelChannel.call on the least busy channel."""
        now, turn = time.monotonic(), next(self.turns) % len(self.channels)
        in_turn = self.channels[turn:] + self.channels[:turn]
        least_busy = min(in_turn, key=lambda c: (now - c.failed_at < REOPEN_S, self.in_flight[c]))
        if self.shared and now - least_busy.failed_at < REOPEN_S:
            # A channel of its own: one kept open could still reach the worker that just died.
            fresh = ModelChannel(self.shared)
            try:
                return await fresh.call(jobs, timeout_s, client)
            finally:
                await fresh.close()
        self.in_flight[least_busy] += len(jobs)
        try:
            return await least_busy.call(jobs, timeout_s, client)
        finally:
            self.in_flight[least_busy] -= len(jobs)

    async def close(self) -> None:
        for each in self.channels:
            await each.close()
