"""The model service's captioner in-process (tiny model, fp32): parity with transformers, and a job
that fails inside generate fails alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip_serve.decoding.images import ImageLimits, ResizeSpec, decode_image, prepare_image
from blip_serve.shared.jobs import CaptionJob
from blip_serve.shared.settings import load_settings
from support.images import encode, scene, upload_corpus


@pytest.fixture(scope="module")
def captioner(tiny_model_dir):
    from blip_serve.model.captioner import BlipCaptioner

    return BlipCaptioner(tiny_model_dir, load_settings({"BLIP_PRECISION": "fp32"}))


@pytest.fixture(scope="module")
def jobs(tiny_model_dir) -> list[tuple[bytes, CaptionJob]]:
    spec = ResizeSpec.from_model_dir(tiny_model_dir)
    images = [encode(scene(400 + i), "PNG") for i in range(8)]
    return [
        (data, CaptionJob(pixels=prepare_image(data, ImageLimits(), spec).pixels, max_new_tokens=20)) for data in images
    ]


def test_normalized_pixels_equal_the_image_processor_bit_for_bit(captioner, tiny_model_dir):
    from transformers import BlipProcessor

    processor = BlipProcessor.from_pretrained(tiny_model_dir).image_processor
    spec = ResizeSpec.from_model_dir(tiny_model_dir)
    images = [decode_image(data, ImageLimits()) for data in upload_corpus().values()]
    pixels = np.stack([prepare_image(data, ImageLimits(), spec).pixels for data in upload_corpus().values()])
    expected = np.stack([processor(images=image, return_tensors="np")["pixel_values"][0] for image in images])
    assert np.array_equal(captioner.normalize(pixels).numpy(), expected)
    # The torch lookup a GPU runs, here on the CPU: the same values.
    assert np.array_equal(captioner.normalize.on_device(torch.from_numpy(pixels)).numpy(), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pixels_normalized_straight_to_a_half_dtype_equal_the_float32_ones_cast(captioner, dtype):
    rng = np.random.default_rng(0)
    every_level = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(16, 16), (3, 16, 16))
    images = [every_level.copy(), *(rng.integers(0, 256, (3, 16, 16), dtype=np.uint8) for _ in range(2))]
    cast = captioner.normalize(np.stack(images)).to(dtype)
    straight = captioner.normalize(images, dtype)
    assert straight.dtype == dtype
    assert torch.equal(straight.view(torch.int16), cast.view(torch.int16))  # bit for bit, -0.0 and all


def test_a_batch_equals_one_generate_per_image(captioner, jobs, reference):
    results = captioner.caption_jobs([job for _, job in jobs])
    assert [r.caption for r in results] == [reference.caption(data, max_new_tokens=20) for data, _ in jobs]


def test_failing_jobs_fail_alone_and_the_rest_are_captioned(captioner, jobs, reference):
    good = [job for _, job in jobs]
    wrong_shape = CaptionJob(pixels=np.zeros((3, 10, 10), np.uint8), max_new_tokens=20)
    too_long = CaptionJob(pixels=good[0].pixels, prompt="dog " * 120, max_new_tokens=20)  # past the positions
    batch = good[:3] + [wrong_shape] + good[3:6] + [too_long] + good[6:]
    results = captioner.caption_jobs(batch)

    assert [r.status for r in results] == [200] * 3 + [400] + [200] * 3 + [400] + [200] * 2
    captions = [r.caption for r in results if r.status == 200]
    assert captions == [reference.caption(data, max_new_tokens=20) for data, _ in jobs]
    assert "pixels must be (3, 64, 64) uint8" in results[3].error
    assert "positions" in results[7].error


def test_an_unexpected_failure_is_a_500_for_that_job_only(captioner, jobs, monkeypatch):
    real_generate = captioner.generate

    def generate_that_fails_on_a_marked_image(group):
        if any(job.pixels[0, 0, 0] == 7 for job in group):
            raise RuntimeError("simulated device fault")
        return real_generate(group)

    monkeypatch.setattr(captioner, "generate", generate_that_fails_on_a_marked_image)
    marked = jobs[0][1].model_copy(update={"pixels": np.full_like(jobs[0][1].pixels, 7)})
    results = captioner.caption_jobs([job for _, job in jobs[:4]] + [marked])
    assert [r.status for r in results] == [200, 200, 200, 200, 500]
    assert results[4].error == "internal error: the model failed on this image; see the server log"
