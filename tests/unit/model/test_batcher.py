"""The batching policy in-process (blip_serve/model/batcher.py): a fixed-cost model callback, asyncio clients.

No timing assertions beyond ratios to the callback's own cost: what is checked is which jobs
share a batch, which never reach the model, and what is refused."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from blip_serve.host.disconnect import CallerGone, until_disconnected
from blip_serve.model.batcher import Batcher, BatchObserver, CallDropped, QueueFull
from support import virtual_time


@dataclass
class Job:
    name: str
    num_beams: int = 1
    max_new_tokens: int = 20

    def generation_options(self) -> tuple:
        return (self.num_beams, self.max_new_tokens)


class Recorder(BatchObserver):
    def __init__(self):
        self.waits: list[list[float]] = []
        self.drops: dict[str, int] = {}

    def batch(self, size, waits_s):
        self.waits.append(waits_s)

    def dropped(self, reason, images):
        self.drops[reason] = self.drops.get(reason, 0) + images


class Model:
    """A model whose every batch takes `cost_s`, whatever its size; remembers every batch."""

    def __init__(self, cost_s: float = 0.05):
        self.cost_s = cost_s
        self.batches: list[list[str]] = []

    async def __call__(self, jobs: list[Job]) -> list[str]:
        self.batches.append([job.name for job in jobs])
        await asyncio.sleep(self.cost_s)
        return [f"caption of {job.name}" for job in jobs]


def batcher(
    model: Model, max_batch_size: int = 8, max_queued: int = 64, max_batch_cost: float | None = None
) -> Batcher:
    return Batcher(
        model, max_batch_size=max_batch_size, max_queued=max_queued, observer=Recorder(), max_batch_cost=max_batch_cost
    )


def test_answers_each_job_in_order():
    async def scenario():
        b = batcher(Model())
        return await b.submit([Job("a"), Job("b"), Job("c")], timeout_s=10)

    assert virtual_time.run(scenario()) == ["caption of a", "caption of b", "caption of c"]


def test_two_cohorts_of_four_merge_into_full_batches():
    """Eight closed-loop clients that start as two groups of four: BentoML's cork kept them apart
    (mean batch 4); here they merge within a couple of batches."""
    model = Model(cost_s=0.05)

    async def client(b: Batcher, name: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        for i in range(12):
            await b.submit([Job(f"{name}{i}")], timeout_s=30)

    async def scenario():
        b = batcher(model)
        await asyncio.gather(
            *(client(b, f"a{k}-", 0) for k in range(4)), *(client(b, f"b{k}-", 0.025) for k in range(4))
        )

    virtual_time.run(scenario())
    steady = [len(batch) for batch in model.batches[3:-3]]
    assert sum(steady) / len(steady) >= 7.2, model.batches


def test_a_lone_request_after_a_burst_starts_at_once():
    model = Model(cost_s=0.1)
    observer = Recorder()

    async def scenario():
        b = Batcher(model, max_batch_size=8, max_queued=64, observer=observer)
        burst = [b.submit([Job(f"burst{i}-{k}") for k in range(8)], timeout_s=30) for i in range(8)]
        refused = await asyncio.gather(*burst, b.submit([Job("over")], timeout_s=30), return_exceptions=True)
        assert isinstance(refused[-1], QueueFull)
        await asyncio.sleep(0.3)  # idle for a while
        return await b.submit([Job("lone")], timeout_s=30)

    assert virtual_time.run(scenario()) == ["caption of lone"]
    burst_waits = [w for batch in observer.waits[:-1] for w in batch]
    lone_wait = observer.waits[-1][0]
    assert model.batches[-1] == ["lone"]
    assert max(burst_waits) >= 0.5  # the burst queued for several batches
    assert lone_wait < 0.2 * model.cost_s  # ...and left nothing behind that holds a lone request


def test_a_big_request_takes_turns_with_single_ones():
    model = Model(cost_s=0.05)

    async def scenario():
        b = batcher(model)
        big = asyncio.create_task(b.submit([Job(f"big{i}") for i in range(32)], timeout_s=30))
        await asyncio.sleep(0.01)  # the first batch of the big request runs
        singles = await asyncio.gather(*(b.submit([Job(f"single{k}")], timeout_s=30) for k in range(4)))
        await big
        return singles

    assert virtual_time.run(scenario()) == [[f"caption of single{k}"] for k in range(4)]
    assert model.batches[0] == [f"big{i}" for i in range(8)]
    assert {f"single{k}" for k in range(4)} <= set(model.batches[1])  # not behind the other 24
    assert sorted(name for batch in model.batches for name in batch if name.startswith("big")) == sorted(
        f"big{i}" for i in range(32)
    )


def test_cost_counts_beams_and_tokens():
    """A heavy request (4 beams, 100 tokens: 20x an ordinary image) gets a fair share of the model's
    work, not of its images: ordinary requests run many images per heavy one, and a batch never
    costs more than a full ordinary one (8 x 20 tokens), so a heavy image runs alone."""
    model = Model(cost_s=0.05)

    async def ordinary(b: Batcher, k: int) -> None:
        for i in range(10):
            await b.submit([Job(f"light{k}-{i}")], timeout_s=30)

    async def scenario():
        b = batcher(model, max_batch_cost=8 * 20)
        heavy = asyncio.create_task(
            b.submit([Job(f"heavy{i}", num_beams=4, max_new_tokens=100) for i in range(32)], timeout_s=30)
        )
        await asyncio.sleep(0.001)
        await asyncio.gather(*(ordinary(b, k) for k in range(4)))
        heavy.cancel()

    virtual_time.run(scenario())
    last_light = max(i for i, batch in enumerate(model.batches) if batch[0].startswith("light"))
    heavy_batches = [batch for batch in model.batches[:last_light] if batch[0].startswith("heavy")]
    assert all(len(batch) == 1 for batch in heavy_batches)  # cost 400 each: alone, though 2 x 4 beams would fit
    light_batches = [batch for batch in model.batches if batch[0].startswith("light")]
    assert max(len(batch) for batch in light_batches) == 4  # the ordinary ones still share batches
    assert 1 <= len(heavy_batches) <= 3  # while the ordinary clients ran their 40 images: not starved either


def test_a_cancelled_call_never_reaches_the_model():
    model = Model(cost_s=0.1)
    observer = Recorder()

    async def scenario():
        b = Batcher(model, max_batch_size=1, max_queued=64, observer=observer)
        first = asyncio.create_task(b.submit([Job("first")], timeout_s=30))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(b.submit([Job("gone1"), Job("gone2")], timeout_s=30))
        last = asyncio.create_task(b.submit([Job("last")], timeout_s=30))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.gather(first, last)

    virtual_time.run(scenario())
    assert model.batches == [["first"], ["last"]]
    assert observer.drops == {"cancelled": 2}


def test_a_call_past_its_deadline_is_dropped_before_the_model():
    model = Model(cost_s=0.2)
    observer = Recorder()

    async def scenario():
        b = Batcher(model, max_batch_size=1, max_queued=64, observer=observer)
        first = asyncio.create_task(b.submit([Job("first")], timeout_s=30))
        await asyncio.sleep(0.01)
        with pytest.raises(CallDropped):
            await b.submit([Job("late")], timeout_s=0.05)
        await first

    virtual_time.run(scenario())
    assert model.batches == [["first"]]
    assert observer.drops == {"deadline": 1}


def test_admission_counts_images_and_refuses_a_call_whole():
    model = Model(cost_s=0.1)
    observer = Recorder()

    async def scenario():
        b = Batcher(model, max_batch_size=4, max_queued=10, observer=observer)
        running = asyncio.create_task(b.submit([Job(f"a{i}") for i in range(4)], timeout_s=30))
        await asyncio.sleep(0.01)  # four images in the model, none queued
        queued = asyncio.create_task(b.submit([Job(f"b{i}") for i in range(8)], timeout_s=30))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit([Job(f"c{i}") for i in range(3)], timeout_s=30)  # 8 + 3 > 10
        fits = await b.submit([Job("d0"), Job("d1")], timeout_s=30)  # 8 + 2 fits
        await asyncio.gather(running, queued)
        return fits

    assert virtual_time.run(scenario()) == ["caption of d0", "caption of d1"]
    assert not any(name.startswith("c") for batch in model.batches for name in batch)
    assert observer.drops == {"refused": 3}


def test_a_caller_that_hangs_up_cancels_its_call():
    cancelled = []

    class Request:
        async def receive(self) -> dict:
            await asyncio.sleep(0.05)
            return {"type": "http.disconnect"}

    async def slow_call() -> str:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return "never"

    async def scenario():
        with pytest.raises(CallerGone):
            await until_disconnected(Request(), slow_call())

    virtual_time.run(scenario())
    assert cancelled == [True]


def test_the_batch_cost_bound_still_fills_ordinary_batches():
    model = Model(cost_s=0.05)

    async def scenario():
        b = batcher(model, max_batch_cost=8 * 20)
        await b.submit([Job(f"big{i}") for i in range(16)], timeout_s=10)  # 20 tokens each
        await b.submit([Job(f"long{i}", max_new_tokens=40) for i in range(8)], timeout_s=10)

    virtual_time.run(scenario())
    assert [len(batch) for batch in model.batches] == [8, 8, 4, 4]  # 40-token captions: 4 a batch
