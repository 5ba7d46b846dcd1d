"""The step-level decoder in-process (blip_serve/model/engine.py, tiny model, fp32): captions with
their own prompts and lengths share steps, join and leave between them, and each equals transformers'
`generate` for that image alone, token for token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip_serve.decoding.images import ImageLimits, ResizeSpec, prepare_image
from blip_serve.shared.settings import load_settings
from support.images import encode, scene

PROMPTS = [None, "a picture of", "dog", None, "a photo of a", "the"]


@pytest.fixture(scope="module")
def captioner(tiny_model_dir):
    from blip_serve.model.captioner import BlipCaptioner

    return BlipCaptioner(tiny_model_dir, load_settings({"BLIP_PRECISION": "fp32"}))


@pytest.fixture(scope="module")
def pixels(tiny_model_dir) -> list[np.ndarray]:
    spec = ResizeSpec.from_model_dir(tiny_model_dir)
    return [prepare_image(encode(scene(900 + i), "PNG"), ImageLimits(), spec).pixels for i in range(12)]


def generate_alone(captioner, pixels: np.ndarray, prompt: str | None, max_new_tokens: int, min_new_tokens: int):
    """transformers' generate for one image: its token ids, the padding after [SEP] none (one row)."""
    inputs = {}
    if prompt:
        tokens = captioner.processor.tokenizer(prompt, return_tensors="pt")
        inputs = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    with torch.inference_mode():
        output = captioner.model.generate(
            pixel_values=captioner.normalize(pixels[None]),
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens or None,
            num_beams=1,
            do_sample=False,
            **inputs,
        )
    return output[0].tolist()


def engine(captioner, seats: int):
    from blip_serve.model.engine import SeatEngine

    return SeatEngine(captioner.model, seats)


def join(captioner, engine, requests: list[tuple[int, np.ndarray, str | None, int, int]]):
    tickets = [ticket for ticket, *_ in requests]
    values = captioner.normalize(np.stack([pixels for _, pixels, *_ in requests]))
    prompts = [captioner.start_tokens(prompt or "") for _, _, prompt, _, _ in requests]
    limits = [(most, least) for *_, most, least in requests]
    engine.join(tickets, values, prompts, limits)


def test_mixed_prompts_and_lengths_sharing_steps_equal_generate_alone(captioner, pixels):
    """Twelve images, six prompts, lengths 3 to 25, some with a minimum: four seats, two joining
    between steps, each leaving when it ends."""
    requests = [(i, pixels[i], PROMPTS[i % len(PROMPTS)], 3 + (i * 7) % 23, 5 if i % 4 == 1 else 0) for i in range(12)]
    seats = engine(captioner, 4)
    waiting, tokens, steps_shared = list(requests), {}, []
    while waiting or seats.busy_seats():
        joining, waiting = waiting[: min(2, seats.free_seats())], waiting[min(2, seats.free_seats()) :]
        if joining:
            join(captioner, seats, joining)
        steps_shared.append({seat.ticket for seat in seats.seats if seat is not None})
        tokens.update({done.ticket: done.tokens for done in seats.step()})

    assert max(len(shared) for shared in steps_shared) == 4  # the steps were shared
    for ticket, image, prompt, most, least in requests:
        assert tokens[ticket] == generate_alone(captioner, image, prompt, most, least), (ticket, prompt, most)


def test_a_seat_frees_the_step_its_caption_ends_and_the_next_image_takes_it(captioner, pixels):
    seats = engine(captioner, 2)
    join(captioner, seats, [("long", pixels[0], None, 20, 20), ("short", pixels[1], None, 3, 3)])
    assert seats.step() == [] and seats.step() == []  # the first and second token of each
    [short] = seats.step()  # the short caption's third and last token
    assert short.ticket == "short" and seats.free_seats() == 1
    join(captioner, seats, [("next", pixels[2], "a picture of", 6, 6)])
    assert seats.free_seats() == 0
    finished = {}
    while seats.busy_seats():
        finished.update({done.ticket: done.tokens for done in seats.step()})
    assert list(finished) == ["next", "long"]  # the later image ends first: it never waited for "long"
    assert short.tokens == generate_alone(captioner, pixels[1], None, 3, 3)
    assert finished["next"] == generate_alone(captioner, pixels[2], "a picture of", 6, 6)
    assert finished["long"] == generate_alone(captioner, pixels[0], None, 20, 20)


def test_a_released_seat_is_free_at_once_and_never_answered(captioner, pixels):
    seats = engine(captioner, 2)
    join(captioner, seats, [("gone", pixels[0], None, 10, 10), ("stays", pixels[1], None, 4, 4)])
    seats.release("gone")
    assert seats.free_seats() == 1
    answered = [done.ticket for _ in range(4) for done in seats.step()]
    assert answered == ["stays"] and seats.busy_seats() == 0


def test_a_caption_that_ends_at_its_first_token_frees_its_seat_at_the_first_step(captioner, pixels):
    seats = engine(captioner, 1)
    join(captioner, seats, [("one", pixels[0], None, 1, 0)])
    assert seats.free_seats() == 0
    [done] = seats.step()
    assert done.tokens == generate_alone(captioner, pixels[0], None, 1, 0) and seats.free_seats() == 1
    with pytest.raises(ValueError, match="2 images for 1 free seats"):
        join(captioner, seats, [("a", pixels[0], None, 5, 0), ("b", pixels[1], None, 5, 0)])


def test_a_long_prompt_is_read_a_token_a_step_beside_captions_being_written(captioner, pixels):
    """The steps read a prompt's tokens before they pick any: a caption with no prompt and one with
    a four-token prompt, seated together, start writing three steps apart, and both equal generate."""
    seats = engine(captioner, 2)
    join(captioner, seats, [("plain", pixels[0], None, 6, 6), ("prompted", pixels[1], "a photo of a", 6, 6)])
    prompted = next(seat for seat in seats.seats if seat.ticket == "prompted")
    assert prompted.start == len(captioner.start_tokens("a photo of a")) > 3
    for _ in range(prompted.start - 1):
        seats.step()
        assert prompted.generated <= 0  # still the prompt's tokens
    finished = {}
    while seats.busy_seats():
        finished.update({done.ticket: done.tokens for done in seats.step()})
    assert finished["plain"] == generate_alone(captioner, pixels[0], None, 6, 6)
    assert finished["prompted"] == generate_alone(captioner, pixels[1], "a photo of a", 6, 6)


def test_the_cache_grows_for_a_long_caption_while_others_decode(captioner, pixels):
    """A caption that needs more positions than the buffers hold grows them between steps; the
    captions already seated keep their keys and values."""
    seats = engine(captioner, 2)
    join(captioner, seats, [("short", pixels[0], None, 8, 8)])
    seats.step()
    capacity = seats.self_keys[0].shape[2]
    join(captioner, seats, [("long", pixels[1], "a picture of", 60, 60)])
    assert seats.self_keys[0].shape[2] > capacity
    finished = {}
    while seats.busy_seats():
        finished.update({done.ticket: done.tokens for done in seats.step()})
    assert finished["short"] == generate_alone(captioner, pixels[0], None, 8, 8)
    assert finished["long"] == generate_alone(captioner, pixels[1], "a picture of", 60, 60)


def test_through_the_captioner_a_job_that_fails_joining_fails_alone(captioner, pixels, monkeypatch):
    """The captioner's side of the seats: a refused job is answered 400 at once, a job whose encode
    fails unexpectedly gets its own 500, and the others are seated and captioned as generate would."""
    from blip_serve.shared.jobs import CaptionJob

    real_join = captioner.engine.join

    def join_that_fails_on_a_marked_image(tickets, *args, **kwargs):
        if "marked" in tickets:
            raise RuntimeError("simulated device fault")
        return real_join(tickets, *args, **kwargs)

    monkeypatch.setattr(captioner.engine, "join", join_that_fails_on_a_marked_image)
    tickets = ["a", "wrong shape", "marked", "b"]
    jobs = [
        CaptionJob(pixels=pixels[0], max_new_tokens=8),
        CaptionJob(pixels=np.zeros((3, 10, 10), np.uint8), max_new_tokens=8),
        CaptionJob(pixels=pixels[1], max_new_tokens=8),
        CaptionJob(pixels=pixels[2], prompt="a picture of", max_new_tokens=12),
    ]
    answered = dict(captioner.join_here(tickets, jobs))
    while captioner.busy_seats():
        answered.update(captioner.step_here())

    assert answered["wrong shape"].status == 400 and "pixels must be" in answered["wrong shape"].error
    assert answered["marked"].status == 500
    assert answered["marked"].error == "internal error: the model failed on this image; see the server log"
    assert answered["a"].caption == captioner.processor.decode(
        generate_alone(captioner, pixels[0], None, 8, 0), skip_special_tokens=True
    )
    assert answered["b"].caption == captioner.processor.decode(
        generate_alone(captioner, pixels[2], "a picture of", 12, 0), skip_special_tokens=True
    )
    assert captioner.free_seats() == captioner.engine.free_seats() == len(captioner.engine.seats)


def test_the_vision_tower_in_pieces_between_steps_gives_generates_captions(captioner, pixels):
    """Images wait for their encoding in priority order and go through the vision tower a layer
    (and, within a budget, an image) at a time, between the seated captions' steps."""
    seats = engine(captioner, 3)
    join(captioner, seats, [("seated", pixels[0], None, 12, 12)])
    requests = [("later", pixels[1], "a picture of", 6, 6), ("sooner", pixels[2], None, 5, 5)]
    values = captioner.normalize(np.stack([image for _, image, *_ in requests]))
    prompts = [captioner.start_tokens(prompt or "") for _, _, prompt, _, _ in requests]
    seats.join(["later", "sooner"], values, prompts, [(6, 6), (5, 5)], priorities=[2.0, 1.0], encode_now=False)
    assert seats.free_seats() == 0 and seats.decoding() == 1  # their seats are kept while they encode

    spread = {"later", "sooner"}
    seats.encode(budget_s=0.0, spread=spread)  # the smallest budget: one image, one layer
    assert {image.ticket: image.layer for image in seats.encoding} == {"sooner": 1, "later": 0}
    finished = {}
    while seats.busy_seats():  # about one image through one layer a step
        seats.encode(budget_s=seats.piece_s[id(seats.by_layer)], spread=spread)
        finished.update({done.ticket: done.tokens for done in seats.step()})
    assert finished["sooner"] == generate_alone(captioner, pixels[2], None, 5, 5)
    assert finished["later"] == generate_alone(captioner, pixels[1], "a picture of", 6, 6)
    assert finished["seated"] == generate_alone(captioner, pixels[0], None, 12, 12)


def test_spread_work_past_its_budget_is_paid_back_by_the_next_steps(captioner, pixels):
    """The least a call encodes (one image through one layer) can take longer than its budget: the
    calls after it encode nothing spread until their budgets have covered it, so that on average
    spread images take their budget's share of the time and no more."""
    seats = engine(captioner, 2)
    join(captioner, seats, [("seated", pixels[0], None, 30, 30)])
    values = captioner.normalize(pixels[1][None])
    seats.join(["crowd"], values, [captioner.start_tokens("")], [(5, 5)], encode_now=False)
    seats.encode(budget_s=0.0, spread={"crowd"})
    assert seats.encoding[0].layer == 1  # at least one layer, whatever the budget
    owed, budget = seats.spread_owed, seats.piece_s[id(seats.by_layer)] / 100
    assert owed > 2 * budget
    seats.step()
    seats.encode(budget_s=budget, spread={"crowd"})
    assert seats.encoding[0].layer == 1  # nothing more until the budgets cover what was owed
    assert seats.spread_owed == pytest.approx(owed - budget)
    seats.spread_owed = budget / 2  # paid back but half a budget
    seats.encode(budget_s=budget, spread={"crowd"})
    layers = len(seats.vision.encoder.layers)
    assert (seats.encoding[0].layer if seats.encoding else layers) == 2  # one more layer (of the tiny model's 2)
    seats.spread_owed = 1.0
    seats.encode(budget_s=None, spread={"crowd"})  # no budget: encoded whole, nothing owed
    assert seats.encoding == [] and seats.spread_owed == 0.0 and seats.decoding() == 2


def test_no_encode_call_runs_past_its_turn(captioner, pixels):
    """With `turn_s`, a call stops once its time is up, whoever's images wait: at the least, one
    group through one layer (images left waiting never run whole in one long call)."""
    seats = engine(captioner, 3)
    values = captioner.normalize(np.stack(pixels[:3]))
    seats.join(["a", "b", "c"], values, [captioner.start_tokens("")] * 3, [(5, 5)] * 3, encode_now=False)
    seats.encode(turn_s=0.0)
    assert sorted(image.layer for image in seats.encoding) == [1, 1, 1]  # one layer, the three together
    seats.encode(turn_s=0.0)  # the layer's time now known: one image, one layer
    assert sorted(image.layer for image in seats.encoding) == [1, 1] and seats.decoding() == 1
    seats.encode()
    assert seats.encoding == [] and seats.decoding() == 3


def test_images_not_spread_are_encoded_whole_before_the_spread_ones(captioner, pixels):
    seats = engine(captioner, 3)
    values = captioner.normalize(np.stack(pixels[:3]))
    prompts = [captioner.start_tokens("")] * 3
    seats.join(["a", "b", "urgent"], values, prompts, [(5, 5)] * 3, priorities=[0.0, 1.0, 2.0], encode_now=False)
    seats.encode(budget_s=0.0, spread={"a", "b"})
    assert seats.decoding() == 1 and [seat.ticket for seat in seats.seats if seat] == ["urgent"]
    assert {image.ticket: image.layer for image in seats.encoding} == {"a": 1, "b": 0}


def test_a_tower_compiled_whole_runs_whole_for_images_not_spread_and_by_layer_for_spread_ones(captioner, pixels):
    """Where the vision tower is compiled as a whole (BLIP_COMPILE on a CPU), images not spread run
    through it whole and first; spread images go through its layers a piece at a time within their
    budget (a whole image between two steps held other clients' captions for 0.46 s), what ran
    past it is paid back, an image keeps the pieces it started on, and the captions equal generate's."""
    from blip_serve.model.engine import SeatEngine

    seats = SeatEngine(captioner.model, 4, piecewise=False)
    join(captioner, seats, [("seated", pixels[0], None, 12, 12)])
    assert seats.decoding() == 1 and seats.encoding == []  # encode_now: whole, at once
    values = captioner.normalize(np.stack(pixels[1:4]))
    prompts = [captioner.start_tokens(prompt) for prompt in ("", "a picture of", "")]
    limits = [(6, 6), (5, 5), (7, 7)]
    seats.join(["crowd1", "crowd2", "own"], values, prompts, limits, priorities=[1.0, 2.0, 3.0], encode_now=False)
    crowd1, crowd2, own = seats.encoding
    spread = {"crowd1", "crowd2"}
    seats.encode(budget_s=0.0, spread=spread)  # the smallest budget: the image not spread, then one layer
    seated = [seat.ticket for seat in seats.seats if seat is not None]
    assert seated == ["seated", "own"] and own.pieces is seats.whole
    assert seats.encoding == [crowd1, crowd2] and (crowd1.layer, crowd2.layer) == (1, 1)  # one batch, one layer
    assert crowd1.pieces is crowd2.pieces is seats.by_layer
    assert seats.spread_owed > 0  # a layer ran past a budget of nothing
    seats.encode(budget_s=seats.spread_owed / 4, spread=spread)
    assert (crowd1.layer, crowd2.layer) == (1, 1)  # paying back: nothing spread runs
    finished = {done.ticket: done.tokens for done in seats.step()}
    seats.encode()  # nothing spread now: they go on through the layers they started on
    assert crowd1.pieces is crowd2.pieces is seats.by_layer and seats.encoding == []
    while seats.busy_seats():
        finished.update({done.ticket: done.tokens for done in seats.step()})
    assert finished["seated"] == generate_alone(captioner, pixels[0], None, 12, 12)
    assert finished["crowd1"] == generate_alone(captioner, pixels[1], None, 6, 6)
    assert finished["crowd2"] == generate_alone(captioner, pixels[2], "a picture of", 5, 5)
    assert finished["own"] == generate_alone(captioner, pixels[3], None, 7, 7)


def test_an_image_released_while_it_encodes_frees_its_seat(captioner, pixels):
    seats = engine(captioner, 1)
    values = captioner.normalize(pixels[0][None])
    seats.join(["gone"], values, [captioner.start_tokens("")], [(5, 5)], encode_now=False)
    assert seats.free_seats() == 0
    seats.release("gone")
    seats.encode()
    assert seats.free_seats() == 1 and seats.decoding() == 0 and seats.step() == []


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build with oneDNN")
def test_a_packed_linear_computes_what_nn_linear_does():
    from blip_serve.model.captioner import PackedLinear

    for layer in (torch.nn.Linear(48, 80), torch.nn.Linear(48, 80, bias=False)):
        packed = PackedLinear(layer)
        with torch.inference_mode():
            for shape in ((1, 48), (3, 48), (2, 1, 48), (5, 7, 48)):
                hidden = torch.randn(shape)
                torch.testing.assert_close(packed(hidden), layer(hidden), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build with oneDNN")
def test_hybrid_packs_its_fp32_decoders_linears_and_the_exact_fp32_keeps_nn_linear(tiny_model_dir):
    from blip_serve.model.captioner import BlipCaptioner, PackedLinear

    def kinds(module):
        return {type(m).__name__ for m in module.modules() if isinstance(m, (torch.nn.Linear, PackedLinear))}

    hybrid = BlipCaptioner(tiny_model_dir, load_settings({"BLIP_PRECISION": "hybrid", "BLIP_COMPILE": "off"}))
    exact = BlipCaptioner(tiny_model_dir, load_settings({"BLIP_PRECISION": "fp32", "BLIP_COMPILE": "off"}))
    assert kinds(hybrid.model.text_decoder) == {"PackedLinear"}
    assert kinds(hybrid.model.vision_model) == {"Linear"}  # bf16: nn.Linear calls oneDNN already
    assert kinds(exact.model.text_decoder) == kinds(exact.model.vision_model) == {"Linear"}


def test_hybrid_keeps_the_image_keys_and_values_in_bf16_and_agrees_with_its_generate(tiny_model_dir, pixels):
    """`hybrid`: the tower's bf16 carries on into the cross-attention's keys and values over the
    image (half the bytes a step reads, and bf16 matrix kernels to compute them); the decoder and
    its self-attention stay fp32. Not bit for bit with generate's fp32 keys and values, but close."""
    from blip_serve.model.captioner import BlipCaptioner
    from blip_serve.shared.jobs import CaptionJob

    hybrid = BlipCaptioner(tiny_model_dir, load_settings({"BLIP_PRECISION": "hybrid", "BLIP_COMPILE": "off"}))
    jobs = [CaptionJob(pixels=image, max_new_tokens=12) for image in pixels]
    in_seats = [result.caption for result in hybrid.caption_in_seats(jobs)]
    engine = hybrid.engine
    assert {buffer.dtype for buffer in engine.cross_keys + engine.cross_values} == {torch.bfloat16}
    assert {buffer.dtype for buffer in engine.self_keys + engine.self_values} == {torch.float32}
    assert next(engine.decoder.parameters()).dtype == torch.float32
    by_generate = [result.caption for result in hybrid.caption_jobs(jobs)]  # fp32 keys and values
    same = sum(a == b for a, b in zip(in_seats, by_generate))
    assert same >= len(jobs) - 1, list(zip(in_seats, by_generate))
