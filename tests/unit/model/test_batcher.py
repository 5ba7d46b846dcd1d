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


class Seats:
    """A step-level decoder whose every step takes `step_s` and every join `join_s`: each seated
    job needs max_new_tokens tokens, the first from its join, or (`encode_steps`) from the step
    after its encoding's last. Remembers who shared each step."""

    def __init__(self, seats: int = 4, step_s: float = 0.01, join_s: float = 0.02, encode_steps: int = 0):
        self.seats, self.step_s, self.join_s, self.encode_steps = seats, step_s, join_s, encode_steps
        self.seated: dict[object, list] = {}  # ticket -> [job, tokens so far]
        self.encoding: dict[object, list] = {}  # ticket -> [job, steps of encoding left]
        self.most_waiting = 0  # the most images waiting for their encoding at once
        self.steps: list[set[str]] = []
        self.joins: list[list[str]] = []
        self.released: list[str] = []
        self.spread: list[set[str]] = []  # the images each step was told to encode in pieces

    def fits(self, job: Job) -> bool:
        return job.num_beams == 1

    def free_seats(self) -> int:
        return self.seats - len(self.seated) - len(self.encoding)

    def busy_seats(self) -> int:
        return len(self.seated) + len(self.encoding)

    def waiting_to_encode(self) -> list[object]:
        return list(self.encoding)

    async def join(self, tickets, jobs, priorities):
        assert len(tickets) <= self.free_seats() and len(priorities) == len(jobs)
        self.joins.append([job.name for job in jobs])
        await asyncio.sleep(self.join_s)
        if self.encode_steps:
            self.encoding.update({ticket: [job, self.encode_steps] for ticket, job in zip(tickets, jobs)})
            self.most_waiting = max(self.most_waiting, len(self.encoding))
        else:
            self.seated.update({ticket: [job, 1] for ticket, job in zip(tickets, jobs)})
        return self.leave()

    async def step(self, spread):
        for ticket, state in list(self.encoding.items()):
            state[1] -= 1
            if not state[1]:
                self.seated[ticket] = [self.encoding.pop(ticket)[0], 0]
        names = {ticket: state[0].name for ticket, state in {**self.seated, **self.encoding}.items()}
        self.spread.append({names[ticket] for ticket in spread})
        self.steps.append({job.name for job, _ in self.seated.values()})
        await asyncio.sleep(self.step_s)
        for state in self.seated.values():
            state[1] += 1
        return self.leave()

    def leave(self):
        done = [(t, f"caption of {job.name}") for t, (job, n) in self.seated.items() if n >= job.max_new_tokens]
        for ticket, _ in done:
            del self.seated[ticket]
        return done

    def release(self, ticket) -> None:
        self.released.append((self.seated.pop(ticket, None) or self.encoding.pop(ticket))[0].name)

    def last_step(self) -> tuple[int, float]:
        return len(self.steps[-1]) if self.steps else 0, self.step_s


def seat_batcher(model: Model, seats: Seats, observer: BatchObserver | None = None, max_queued: int = 64) -> Batcher:
    return Batcher(model, max_batch_size=seats.seats, max_queued=max_queued, observer=observer, seats=seats)


def test_a_short_caption_joins_running_steps_and_leaves_before_a_long_one():
    seats = Seats(seats=4)
    finished: list[str] = []

    async def caption(b: Batcher, job: Job, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        finished.extend(await b.submit([job], timeout_s=30))

    async def scenario():
        b = seat_batcher(Model(), seats)
        await asyncio.gather(
            caption(b, Job("long", max_new_tokens=100), 0), caption(b, Job("short", max_new_tokens=5), 0.1)
        )

    virtual_time.run(scenario())
    assert finished == ["caption of short", "caption of long"]
    shared = [step for step in seats.steps if step == {"long", "short"}]
    assert len(shared) == 4  # the short one's 4 steps ran beside the long one: it never waited for it


def test_captions_with_different_options_share_steps():
    """Each client its own prompt and length: one step serves them all (a batch would not)."""
    seats = Seats(seats=8)

    async def scenario():
        b = seat_batcher(Model(), seats)
        jobs = [Job(f"client{k}", max_new_tokens=12 + 2 * k) for k in range(8)]
        return await asyncio.gather(*(b.submit([job], timeout_s=30) for job in jobs))

    virtual_time.run(scenario())
    assert max(len(step) for step in seats.steps) == 8
    assert sum(map(len, seats.joins)) == 8 and max(map(len, seats.joins)) == 2  # two encoded between steps


def test_a_client_with_many_connections_gets_one_share():
    """Client "many" sends 16 single-image calls at once (one per connection), "one" a single call
    just after: it joins among the first few, not behind the other client's 16."""
    seats = Seats(seats=1, join_s=0.01)

    async def scenario():
        b = seat_batcher(Model(), seats)
        many = [b.submit([Job(f"many{i}")], timeout_s=30, client="10.0.0.1") for i in range(16)]
        tasks = [asyncio.create_task(call) for call in many]
        await asyncio.sleep(0.001)
        await b.submit([Job("one")], timeout_s=30, client="10.0.0.2")
        await asyncio.gather(*tasks)

    virtual_time.run(scenario())
    order = [name for joined in seats.joins for name in joined]
    assert order.index("one") <= 2, order


def test_per_call_flows_without_a_client_still_take_turns():
    """Without a client (client=None) each call is its own flow, as before."""
    seats = Seats(seats=1, join_s=0.01)

    async def scenario():
        b = seat_batcher(Model(), seats)
        big = asyncio.create_task(b.submit([Job(f"big{i}") for i in range(8)], timeout_s=30))
        await asyncio.sleep(0.001)
        await b.submit([Job("single")], timeout_s=30)
        await big

    virtual_time.run(scenario())
    order = [name for joined in seats.joins for name in joined]
    assert order.index("single") <= 2, order


def test_a_cancelled_call_frees_its_seat_at_the_next_step():
    seats = Seats(seats=1)
    observer = Recorder()

    async def scenario():
        b = seat_batcher(Model(), seats, observer)
        gone = asyncio.create_task(b.submit([Job("gone", max_new_tokens=100)], timeout_s=30))
        await asyncio.sleep(0.1)  # seated, a few steps in
        waiting = asyncio.create_task(b.submit([Job("next", max_new_tokens=3)], timeout_s=30))
        await asyncio.sleep(0.05)
        steps_before = len(seats.steps)
        gone.cancel()
        result = await waiting
        return result, len(seats.steps) - steps_before

    result, steps = virtual_time.run(scenario())
    assert result == ["caption of next"]
    assert seats.released == ["gone"]
    assert steps <= 4  # at most the step running when it was cancelled, then "next"'s own


def test_a_seated_call_past_its_deadline_is_dropped():
    seats = Seats(seats=2)

    async def scenario():
        b = seat_batcher(Model(), seats)
        return await asyncio.gather(
            b.submit([Job("slow", max_new_tokens=1000)], timeout_s=1),
            b.submit([Job("quick", max_new_tokens=3)], timeout_s=1),
            return_exceptions=True,
        )

    slow, quick = virtual_time.run(scenario())
    assert isinstance(slow, CallDropped) and "deadline" in str(slow)
    assert quick == ["caption of quick"] and seats.released == ["slow"] and not seats.seated


def test_beam_searches_run_as_batches_and_greedy_ones_take_seats():
    model, seats = Model(cost_s=0.05), Seats(seats=4)

    async def scenario():
        b = seat_batcher(model, seats)
        return await asyncio.gather(
            b.submit([Job("greedy", max_new_tokens=10)], timeout_s=30),
            b.submit([Job("beams1", num_beams=2), Job("beams2", num_beams=2)], timeout_s=30),
        )

    assert virtual_time.run(scenario()) == [["caption of greedy"], ["caption of beams1", "caption of beams2"]]
    assert model.batches == [["beams1", "beams2"]]
    assert seats.joins == [["greedy"]]


def test_a_failing_step_fails_its_seated_callers_and_the_batcher_carries_on():
    seats = Seats(seats=2)

    async def broken_step(spread):
        raise RuntimeError("simulated device fault")

    async def scenario():
        b = seat_batcher(Model(), seats)
        real_step, seats.step = seats.step, broken_step
        first = await asyncio.gather(b.submit([Job("a", max_new_tokens=5)], timeout_s=30), return_exceptions=True)
        seats.step = real_step
        return first, await b.submit([Job("b", max_new_tokens=5)], timeout_s=30)

    first, second = virtual_time.run(scenario())
    assert isinstance(first[0], RuntimeError) and second == ["caption of b"]
    assert seats.released == ["a"]


def test_while_others_wait_no_client_holds_more_than_half_the_seats():
    """A client whose 8 long captions arrived first holds 2 of 4 seats once another client waits:
    the other's short captions run in the rest, and never wait for the long ones to end."""
    seats = Seats(seats=4)

    async def scenario():
        b = seat_batcher(Model(), seats)
        long = asyncio.create_task(
            b.submit([Job(f"long{i}", max_new_tokens=1000) for i in range(8)], timeout_s=300, client="heavy")
        )
        await asyncio.sleep(0.001)
        short = await asyncio.gather(
            *(b.submit([Job(f"short{i}", max_new_tokens=5)], timeout_s=300, client="light") for i in range(6))
        )
        long.cancel()
        return short

    assert virtual_time.run(scenario()) == [[f"caption of short{i}"] for i in range(6)]
    during = [step for step in seats.steps if any(name.startswith("short") for name in step)]
    assert all(sum(name.startswith("long") for name in step) <= 2 for step in during[1:]), during[:4]
    assert len(seats.steps) < 100  # the short captions never waited for a 1,000-token one


def crowd_then_one(seats: Seats, crowd: int, tokens: int, head_start_s: float) -> int:
    """Client "crowd" sends `crowd` single images of `tokens` tokens at once; `head_start_s` later,
    client "one" sends one. Returns how many steps ran before "one" sent."""

    async def scenario():
        b = seat_batcher(Model(), seats)
        calls = [
            asyncio.create_task(b.submit([Job(f"crowd{i}", max_new_tokens=tokens)], timeout_s=30, client="crowd"))
            for i in range(crowd)
        ]
        await asyncio.sleep(head_start_s)
        steps_before_one = len(seats.steps)
        await b.submit([Job("one", max_new_tokens=5)], timeout_s=30, client="one")
        await asyncio.gather(*calls)
        return steps_before_one

    return virtual_time.run(scenario())


def test_the_images_of_a_client_holding_more_seats_are_encoded_in_pieces():
    """Client "crowd" holds more seats than "one": the crowd's images are spread between steps,
    the other client's never; alone, nobody's are."""
    seats = Seats(seats=4)
    steps_before_one = crowd_then_one(seats, crowd=3, tokens=20, head_start_s=0.05)
    alone = seats.spread[:steps_before_one]
    beside = [spread for spread, step in zip(seats.spread, seats.steps) if "one" in step]
    assert alone and not any(alone)
    assert len(beside) == 4 and all(spread and spread <= {"crowd0", "crowd1", "crowd2"} for spread in beside)


def test_a_client_waiting_for_a_seat_has_the_seated_images_spread():
    """Client "crowd" came first and holds every seat (its images join one a step); client "one"
    comes while no seat is free: from then on the crowd's images are encoded in pieces, so a seat
    frees for "one" after the crowd's captions, not after whole encodes of the crowd's images."""
    seats = Seats(seats=4)
    steps_before_one = crowd_then_one(seats, crowd=4, tokens=40, head_start_s=0.2)
    first_one = next(i for i, step in enumerate(seats.steps) if "one" in step)
    assert seats.steps[steps_before_one - 1] == {f"crowd{i}" for i in range(4)}  # every seat the crowd's
    assert not any(seats.spread[:steps_before_one])  # alone, nobody's images are spread
    waiting = seats.spread[steps_before_one + 1 : first_one]  # "one" queued
    assert len(waiting) >= 10 and all(spread == {f"crowd{i}" for i in range(4)} for spread in waiting)


def test_a_client_takes_seats_no_faster_than_its_images_are_encoded():
    """A client alone took every seat for images that then waited seconds for their encoding (32
    images, full model, CPU), and a client that came next waited for a seat until one of those
    captions ended (100 steps, 6 s). At most max_joining images of a client wait for their encoding
    now; its others wait in the fair queue, and the later client's image takes a free seat at once
    (another client's images waiting to be encoded do not hold it back)."""
    seats = Seats(seats=8, encode_steps=6)
    steps_before_one = crowd_then_one(seats, crowd=16, tokens=100, head_start_s=0.1)
    first_one = next(i for i, step in enumerate(seats.steps) if "one" in step)
    assert first_one - steps_before_one <= 6 + 2  # its own encoding, and the step under way
    assert seats.most_waiting == 3  # max_joining (8 seats // 4) of the crowd's, and "one"'s


def test_a_client_between_two_requests_still_counts_as_active():
    """Client "one" sends one request at a time, "crowd" many: while "one" is between requests
    (answered less than a second ago), the crowd still holds at most half the seats and its images
    are still spread, so "one"'s next image finds a free seat and no whole encode in its way."""
    seats = Seats(seats=4, join_s=0.01)

    async def scenario():
        b = seat_batcher(Model(), seats)

        async def crowd(i):
            while not done.is_set():
                await b.submit([Job(f"crowd{i}", max_new_tokens=8)], timeout_s=60, client="crowd")

        done = asyncio.Event()
        crowds = [asyncio.create_task(crowd(i)) for i in range(8)]
        await asyncio.sleep(0.5)
        for k in range(5):
            await b.submit([Job(f"one{k}", max_new_tokens=5)], timeout_s=60, client="one")
            await asyncio.sleep(0.05)  # its next request's upload and decode
        done.set()
        await asyncio.gather(*crowds)

    virtual_time.run(scenario())
    first_one = next(i for i, step in enumerate(seats.steps) if any(name.startswith("one") for name in step))
    after = list(zip(seats.steps, seats.spread))[first_one:]
    in_between = [(step, spread) for step, spread in after if not any(n.startswith("one") for n in step)]
    assert len(in_between) >= 3  # steps while "one" was between requests
    since = after[after.index(in_between[0]) :]  # the crowd's seats from before "one" came have ended
    assert all(sum(n.startswith("crowd") for n in step) <= 2 for step, _ in since)
    assert all(spread for _, spread in in_between)
