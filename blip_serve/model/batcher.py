"""The model service's scheduling policy: which queued images take the decoder's free seats (or
share the next beam-search `generate`), and when.

BentoML's own batcher (`batchable=True`) corks requests on a latency guess built from recent queue
waits: with concurrent clients it settles into half-full batches, after an overload it holds lone
requests for tens of seconds, it splits a big request into chunks that jump the queue, and it runs
jobs whose clients are gone. blip-serve calls the model service through a plain async API and
schedules here instead. The policy, in full:

1. **Admits in images.** At most `max_queued` images wait (the API refuses a request that would go
   past it with 503 + Retry-After, at once). A call's images are admitted whole or not at all.
2. **Shares by cost and client.** An image costs `num_beams * max_new_tokens`. Start-time fair
   queueing: each image gets a tag, its call's start plus the cost of the call's images before it;
   a call starts at the queue's virtual time, or where its client's last call ended if that is
   later, so a client's calls (on one connection or on many) share one fair share. The virtual time
   advances by the cost taken divided by the clients waiting. The image with the smallest tag goes
   first: a 32-image request takes turns with single ones, and an image asking for 100 tokens counts
   5 times an ordinary one.
3. **Seats, one step at a time** (`Seats`: engine.py behind the captioner). Greedy images take the
   decoder's free seats in fair order, whatever their options, at most `max_joining` between two
   steps, and none of a client's while `max_joining` of its images wait for their encoding; each
   step advances every seated caption, and a caption is answered the step it ends.
   While other clients are active (images queued or seated, or answered within RECENT_S), no client
   takes more than half the seats. The images of a client holding more seats than another are
   encoded in pieces between steps (`spread`), the other's at once.
4. **Beam batches.** Beam search runs as whole `generate` batches of images with the same options,
   at most `max_batch_size` sequences (images x beams) and `max_batch_cost` of cost, between steps.
   With no caption seated and a batch not full, it waits for the clients the last batch answered to
   come back, never longer than `GATHER_FRACTION` of the last batch's duration.
5. **Lets go.** A call whose caller has gone (the API request was answered with a timeout, or its
   client disconnected: the caller cancels the call) or whose deadline has passed is removed from
   the queue, and its seated images free their seats before the next step.

`Batcher` is driven by asyncio and knows nothing about BLIP: `run_batch` captions a list of jobs and
`seats` runs the decoder (in the model service: on the model's own thread); tests drive both with
fixed-cost fakes."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

logger = logging.getLogger("bentoml.blip_serve")
GATHER_FRACTION = 0.2  # the longest wait for a fuller batch, as a share of the last batch's duration
# A client answered this recently is still active: its next request is on its way (upload, decode).
RECENT_S = 1.0


class Job(Protocol):
    num_beams: int
    max_new_tokens: int

    def generation_options(self) -> Hashable: ...


J = TypeVar("J", bound=Job)
R = TypeVar("R")


class QueueFull(Exception):
    """The call would take the queue past its bound: refuse it (503) rather than queue it."""


class CallDropped(Exception):
    """The call's deadline passed before the model reached it."""


@dataclass(eq=False)
class Pending(Generic[J]):
    job: J
    flow: Flow
    tag: float  # virtual start time: the queue serves the smallest first
    order: int  # arrival order, to break ties
    future: asyncio.Future
    enqueued: float

    @property
    def sequences(self) -> int:
        return max(1, self.job.num_beams)


@dataclass(eq=False)
class Flow:
    """One call's images: they share its deadline and its fate."""

    deadline: float  # time.monotonic() past which nobody waits for it
    client: Hashable = None  # who sent it: a client's calls share one fair share (None: the call alone)
    pending: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.client is None:
            self.client = self


def job_cost(job: Job) -> float:
    return max(1, job.num_beams) * max(1, job.max_new_tokens)


class FairQueue(Generic[J]):
    """The queue's rules without the clock or the model: admission, fair order, batch forming."""

    def __init__(self, max_batch_size: int, max_queued: int, max_batch_cost: float | None = None):
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        self.max_batch_cost = max_batch_cost or float("inf")
        self.virtual_time = 0.0  # the start tag of the last image taken
        self.queued: list[Pending[J]] = []
        self.counter = itertools.count()
        # Each client's last tag: its next call starts there (or at the virtual time, if later), so
        # a client's calls, on one connection or on many, share one fair share.
        self.client_finish: dict[Hashable, float] = {}

    def __len__(self) -> int:
        return len(self.queued)

    def add(self, jobs: list[J], flow: Flow, loop: asyncio.AbstractEventLoop, now: float) -> list[Pending[J]]:
        if len(self.queued) + len(jobs) > self.max_queued:
            raise QueueFull(f"{len(self.queued)} images queued, at most {self.max_queued}")
        start = max(self.virtual_time, self.client_finish.get(flow.client, 0.0))
        for job in jobs:
            flow.pending.append(Pending(job, flow, start, next(self.counter), loop.create_future(), now))
            start += job_cost(job)
        self.client_finish[flow.client] = start
        self.queued.extend(flow.pending)
        return list(flow.pending)

    def remove(self, flow: Flow) -> list[Pending[J]]:
        """Take a flow's images out of the queue (its caller gave up, or its deadline passed)."""
        gone = [p for p in self.queued if p.flow is flow]
        self.queued = [p for p in self.queued if p.flow is not flow]
        return gone

    def expired(self, now: float) -> list[Flow]:
        flows = {id(p.flow): p.flow for p in self.queued if p.flow.deadline <= now}
        return list(flows.values())

    def full(self) -> bool:
        """Is a full batch queued among the images due now (tag at most the virtual time)? Images of
        clients that come back join at the virtual time, ahead of any image tagged later."""
        due = [p for p in self.queued if p.tag <= self.virtual_time]
        if not due or min(self.queued, key=self.sort_key).tag > self.virtual_time:
            return False
        batch = self.form(due)
        options = batch[0].job.generation_options()
        left_out = [p for p in due if p not in batch and p.job.generation_options() == options]
        return self.batch_is_full(batch) or bool(left_out)

    @staticmethod
    def sort_key(pending: Pending) -> tuple[float, int]:
        return (pending.tag, pending.order)

    def form(self, candidates: list[Pending[J]]) -> list[Pending[J]]:
        """A batch from `candidates`: the fairest image sets the options; then, in fair order, the
        images with the same options while the batch has room for their sequences (images x beams,
        up to max_batch_size) and their cost (up to max_batch_cost); always at least one image."""
        ordered = sorted(candidates, key=self.sort_key)
        options = ordered[0].job.generation_options() if ordered else None
        batch, room, budget = [], self.max_batch_size, self.max_batch_cost
        for pending in ordered:
            if pending.job.generation_options() != options:
                continue
            if batch and (pending.sequences > room or job_cost(pending.job) > budget):
                break
            batch.append(pending)
            room -= pending.sequences
            budget -= job_cost(pending.job)
            if room <= 0 or budget <= 0:
                break
        return batch

    def batch_is_full(self, batch: list[Pending[J]]) -> bool:
        sequences = sum(p.sequences for p in batch)
        cost = sum(job_cost(p.job) for p in batch)
        return sequences >= self.max_batch_size or cost >= self.max_batch_cost

    def fairest(self) -> Pending[J] | None:
        return min(self.queued, key=self.sort_key, default=None)

    def take_batch(self) -> list[Pending[J]]:
        """The next batch (see `form`), out of the queue."""
        return self.take(self.form(self.queued)) if self.queued else []

    def take_seats(
        self,
        room: int,
        fits: Callable[[J], bool],
        held: Counter | None = None,
        recent: frozenset = frozenset(),
        waiting: Counter | None = None,
        most_waiting: int | None = None,
    ) -> list[Pending[J]]:
        """Up to `room` images for the decoder's free seats: in fair order, any options, while they
        `fit` the seats (the first that does not, a beam search, waits for its own batch). While
        other clients have images queued or seated, or were answered just now (`recent`), no client
        takes more than half the seats (`held`: seats per client now): a seat is held for a whole
        caption, so one client's long captions could otherwise take every seat another's frees.
        Nor does a client take a seat while `most_waiting` of its images wait in theirs for their
        encoding (`waiting`): alone, a 32-image request took every seat for images that then waited
        seconds to be encoded, and the next client waited for a seat until one of its captions
        ended (6 s, full model, CPU). Its other images wait in the queue, in fair order."""
        held, waiting = Counter(held), Counter(waiting)
        most = -(-self.max_batch_size // 2)
        active = self.active_clients(held, recent)
        chosen = []
        for pending in sorted(self.queued, key=self.sort_key):
            if len(chosen) == room or not fits(pending.job):
                break
            client = pending.flow.client
            if held[client] >= most and active - {client}:
                continue
            if most_waiting is not None and waiting[client] >= most_waiting:
                continue
            chosen.append(pending)
            held[client] += 1
            waiting[client] += 1
        return self.take(chosen) if chosen else []

    def active_clients(self, held: Counter, recent: frozenset) -> set:
        """The clients sharing the seats: images queued, seats `held`, or answered just now (`recent`)."""
        return {p.flow.client for p in self.queued} | {client for client, seats in held.items() if seats} | recent

    def take(self, batch: list[Pending[J]]) -> list[Pending[J]]:
        # The virtual time moves on by the batch's cost shared among the clients waiting for the
        # model (as a fair share of the model would), and never lags the batch's own tags.
        active = len({p.flow.client for p in self.queued})
        cost = sum(job_cost(p.job) for p in batch)
        self.virtual_time = max(self.virtual_time + cost / active, min(p.tag for p in batch))
        taken = set(map(id, batch))
        self.queued = [p for p in self.queued if id(p) not in taken]
        for pending in batch:
            pending.flow.pending.remove(pending)
        # A client whose last tag the virtual time has passed starts from the virtual time anyway:
        # forget it (the table stays as small as the clients with work ahead of the virtual time).
        self.client_finish = {c: t for c, t in self.client_finish.items() if t > self.virtual_time}
        return batch


class Seats(Protocol[J, R]):
    """The step-level decoder (blip_serve/model/engine.py behind the captioner): images join free
    seats and leave the step their caption ends. Only the batcher's loop calls it, one call at a time."""

    def fits(self, job: J) -> bool: ...  # may this job take a seat (greedy), or does it need a batch?

    def free_seats(self) -> int: ...

    def busy_seats(self) -> int: ...

    def waiting_to_encode(self) -> list[object]: ...  # the tickets of seated images not yet encoded

    async def join(self, tickets: list[object], jobs: list[J], priorities: list[float]) -> list[tuple[object, R]]: ...

    async def step(self, spread: set) -> list[tuple[object, R]]: ...

    def release(self, ticket: object) -> None: ...

    def last_step(self) -> tuple[int, float]: ...  # the last decoder step's captions and seconds


class Batcher(Generic[J, R]):
    """Feeds the model from the FairQueue: images join the decoder's free seats between steps
    (`seats`), and what cannot take a seat (beam search) runs as whole batches (`run_batch`)."""

    def __init__(
        self,
        run_batch: Callable[[list[J]], Awaitable[list[R]]],
        max_batch_size: int,
        max_queued: int,
        observer: BatchObserver | None = None,
        max_batch_cost: float | None = None,
        seats: Seats[J, R] | None = None,
        max_joining: int | None = None,
    ):
        self.run_batch = run_batch
        self.queue: FairQueue[J] = FairQueue(max_batch_size, max_queued, max_batch_cost)
        self.observer = observer or BatchObserver()
        self.seats = seats
        # Images that join between two steps, at most: unless they are spread (`step`), they are
        # encoded before the next step, and the seated captions wait for them.
        self.max_joining = max_joining or max(1, max_batch_size // 4)
        self.seated: list[Pending[J]] = []
        self.answered_at: dict[Hashable, float] = {}  # when each client's last image was answered
        self.arrived = asyncio.Event()
        self.worker: asyncio.Task | None = None
        self.last_duration = 0.0  # of the last batch
        self.last_end = -float("inf")
        self.expected_back = 0  # images the last batch answered: their clients may send more
        self.waiting_at_end = 0  # images already queued when the last batch ended

    @staticmethod
    def clock() -> float:
        """The event loop's clock: time.monotonic() in a server; a test's loop may run virtual time."""
        return asyncio.get_running_loop().time()

    async def submit(self, jobs: list[J], timeout_s: float, client: Hashable = None) -> list[R]:
        """Caption `jobs` as one call of `client` (its calls share one fair share; None: the call is
        a client of its own); raises QueueFull (nothing queued) or CallDropped (deadline).
        Cancelling the caller takes its images out of the queue and their seats back."""
        if not jobs:
            return []
        loop = asyncio.get_running_loop()
        if self.worker is None or self.worker.done():
            self.worker = loop.create_task(self.run_forever())
        flow = Flow(deadline=self.clock() + timeout_s, client=client)
        try:
            pending = self.queue.add(jobs, flow, loop, self.clock())
        except QueueFull:
            self.observer.dropped("refused", len(jobs))
            raise
        self.observer.queued(len(self.queue))
        self.arrived.set()
        try:
            return list(await asyncio.gather(*(p.future for p in pending)))
        except asyncio.CancelledError:
            self.drop(flow, "cancelled")
            raise

    def drop(self, flow: Flow, reason: str) -> None:
        """The flow's queued images leave the queue; its seated ones free their seats before the next
        step (the batcher's loop sees their futures done)."""
        gone = self.queue.remove(flow)
        for pending in [*flow.pending, *(p for p in self.seated if p.flow is flow)]:
            if not pending.future.done():
                pending.future.set_exception(CallDropped(reason))
                pending.future.exception()  # retrieved: nobody may be left awaiting it
        flow.pending.clear()
        self.arrived.set()
        if gone:
            self.observer.dropped(reason, len(gone))
            self.observer.queued(len(self.queue))

    async def run_forever(self) -> None:
        while True:
            try:
                await self.next_batch()
            except Exception:  # a bug here must not strand every queued caller
                logger.exception("the batcher failed forming a batch; carrying on")
                await asyncio.sleep(0.1)

    async def next_batch(self) -> None:
        """One turn: seat what the free seats take, or run a batch, then one decoder step."""
        if not len(self.queue) and not self.seated:
            self.arrived.clear()
            await self.arrived.wait()
        for flow in self.queue.expired(self.clock()):
            self.drop(flow, "deadline")
        self.leave_gone_seats()
        fairest = self.queue.fairest()
        if fairest is not None and self.seats is not None and self.seats.fits(fairest.job):
            room = min(self.seats.free_seats(), self.max_joining)
            if room:
                held = Counter(p.flow.client for p in self.seated)
                waiting = Counter(p.flow.client for p in self.seats.waiting_to_encode())
                joining = self.queue.take_seats(
                    room, self.seats.fits, held, self.recent_clients(), waiting, self.max_joining
                )
                if joining:
                    await self.join(joining)
        elif fairest is not None:
            if not self.seated:  # seated captions never wait for a fuller batch
                await self.gather()
            batch = self.queue.take_batch()
            if batch:
                await self.run(batch)
        if self.seated:
            await self.step()

    def leave_gone_seats(self) -> None:
        """Seats whose caller is gone (cancelled) or whose deadline passed: free before the next step."""
        now = self.clock()
        for pending in self.seated:
            if not pending.future.done() and pending.flow.deadline <= now:
                pending.future.set_exception(CallDropped("deadline"))
                pending.future.exception()
        for pending in [p for p in self.seated if p.future.done()]:
            self.seats.release(pending)
            self.seated.remove(pending)

    async def join(self, joining: list[Pending[J]]) -> None:
        started = self.clock()
        self.observer.batch(len(joining), [started - p.enqueued for p in joining])
        self.observer.queued(len(self.queue))
        self.seated.extend(joining)
        try:
            self.answer(await self.seats.join(joining, [p.job for p in joining], [p.tag for p in joining]))
        except Exception as exc:  # the seats answer per job; this is a fault of the whole join
            self.fail(joining, exc)
        self.observer.batch_done(self.clock() - started)
        self.observer.seats(self.seats.busy_seats())

    async def step(self) -> None:
        """Encode what joined, then one decoder step. The images of a client that holds more seats
        than another are encoded in pieces between steps (`spread`), half a step's time each: its
        images, however many, do not stall the other's captions, and the other's images encode at once."""
        started = self.clock()
        held = Counter(p.flow.client for p in self.seated)
        # Active clients as take_seats counts them, the queued included (a client whose first image
        # waits for a seat would otherwise wait for another's encodes, whole).
        fewest = min((held[client] for client in self.queue.active_clients(held, self.recent_clients())), default=0)
        spread = {p for p in self.seated if held[p.flow.client] > fewest}
        try:
            self.answer(await self.seats.step(spread))
        except Exception as exc:
            self.fail(list(self.seated), exc)
        captions, step_s = self.seats.last_step()
        self.observer.step(captions, step_s, self.clock() - started)
        self.observer.seats(self.seats.busy_seats())

    def recent_clients(self) -> frozenset:
        """Clients answered within RECENT_S: between two requests a client holds no seat, and
        another's images would otherwise be encoded whole just as its next image arrives."""
        now = self.clock()
        self.answered_at = {c: t for c, t in self.answered_at.items() if now - t < RECENT_S}
        return frozenset(self.answered_at)

    def answer(self, finished: list[tuple[object, R]]) -> None:
        for ticket, result in finished:
            self.answered_at[ticket.flow.client] = self.clock()
            self.seated.remove(ticket)
            if not ticket.future.done():
                ticket.future.set_result(result)

    def fail(self, pendings: list[Pending[J]], exc: Exception) -> None:
        for pending in pendings:
            if pending in self.seated:
                self.seats.release(pending)
                self.seated.remove(pending)
            if not pending.future.done():
                pending.future.set_exception(exc)

    async def gather(self) -> None:
        """Wait while a fuller batch is on its way: the clients the last batch answered come back
        within a round trip. Never past GATHER_FRACTION of the last batch's duration."""
        until = self.last_end + GATHER_FRACTION * self.last_duration
        while not self.queue.full() and len(self.queue) < self.expected_back + self.waiting_at_end:
            left = until - self.clock()
            if left <= 0:
                return
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except TimeoutError:
                return

    async def run(self, batch: list[Pending[J]]) -> None:
        started = self.clock()
        self.observer.batch(len(batch), [started - p.enqueued for p in batch])
        self.observer.queued(len(self.queue))
        try:
            results = await self.run_batch([p.job for p in batch])
        except Exception as exc:  # the callback answers per job; this is a fault of the whole batch
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        else:
            for pending, result in zip(batch, results):
                if not pending.future.done():
                    pending.future.set_result(result)
        self.last_end = self.clock()
        self.last_duration = self.last_end - started
        self.observer.batch_done(self.last_duration)
        self.expected_back = len(batch)
        self.waiting_at_end = len(self.queue)


class BatchObserver:
    """What the batcher reports (the model service sends it to /metrics); silent by default."""

    def batch(self, size: int, waits_s: list[float]) -> None:
        pass

    def batch_done(self, duration_s: float) -> None:
        pass

    def queued(self, images: int) -> None:
        pass

    def dropped(self, reason: str, images: int) -> None:
        pass

    def step(self, captions: int, step_s: float, turn_s: float) -> None:
        """A decoder step advanced `captions` in `step_s`; with the encoding before it, `turn_s`."""

    def seats(self, busy: int) -> None:
        pass


class MetricsObserver(BatchObserver):
    """The batcher's figures on the service's /metrics (BentoML's Prometheus registry)."""

    def __init__(self, max_batch_size: int):
        import bentoml

        sizes = sorted({2**k for k in range(max_batch_size.bit_length())} | {max_batch_size})
        self.sizes = bentoml.metrics.Histogram(
            name="blip_batch_size", documentation="Images in each batch the model ran", buckets=sizes
        )
        self.waits = bentoml.metrics.Histogram(
            name="blip_queue_wait_seconds",
            documentation="How long each image waited in the queue before its batch started",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.queue = bentoml.metrics.Gauge(
            name="blip_images_queued", documentation="Images waiting for the model", multiprocess_mode="livesum"
        )
        self.in_batch = bentoml.metrics.Gauge(
            name="blip_images_in_batch", documentation="Images in the batch running now", multiprocess_mode="livesum"
        )
        self.busy = bentoml.metrics.Counter(
            name="blip_model_busy_seconds",
            documentation="Time the model spent running batches: its rate over wall time is how busy the model is",
        )
        self.drops = bentoml.metrics.Counter(
            name="blip_images_dropped",
            documentation="Queued images dropped before the model reached them (reason: cancelled, deadline, refused)",
            labelnames=["reason"],
        )
        self.busy_seats = bentoml.metrics.Gauge(
            name="blip_seats_busy",
            documentation=f"Decoder seats holding a caption being written, of {max_batch_size}",
            multiprocess_mode="livesum",
        )
        self.steps = bentoml.metrics.Histogram(
            name="blip_step_seconds",
            documentation="How long each decoder step took (one token for every seated caption)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.step_rows = bentoml.metrics.Histogram(
            name="blip_step_captions",
            documentation="Captions each decoder step advanced",
            buckets=sizes,
        )

    def batch(self, size: int, waits_s: list[float]) -> None:
        self.sizes.observe(size)
        for wait in waits_s:
            self.waits.observe(wait)
        self.in_batch.set(size)

    def batch_done(self, duration_s: float) -> None:
        self.in_batch.set(0)
        self.busy.inc(duration_s)

    def queued(self, images: int) -> None:
        self.queue.set(images)

    def dropped(self, reason: str, images: int) -> None:
        self.drops.labels(reason=reason).inc(images)

    def step(self, captions: int, step_s: float, turn_s: float) -> None:
        if captions:
            self.steps.observe(step_s)
            self.step_rows.observe(captions)
        self.busy.inc(turn_s)

    def seats(self, busy: int) -> None:
        self.busy_seats.set(busy)
