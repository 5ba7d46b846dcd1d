"""BLIP_GPU_DECODE's code on the CPU: which uploads the model's device decodes, how close its
pixels come to the exact path's, and that a batch mixing both kinds is captioned job by job."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from blip_serve.decoding.images import ImageLimits, ResizeSpec, device_decodable, open_image, prepare_image
from blip_serve.model.device_images import DeviceJpegs, chunks_by_pixels
from blip_serve.shared.jobs import CaptionJob
from blip_serve.shared.settings import load_settings
from support.images import encode, header_only_jpeg, scene, upload_corpus


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to show
    return encode(scene(30, (200, 120)), "JPEG", exif=exif.tobytes())


ELIGIBLE = {
    "baseline colour": encode(scene(31, (640, 480)), "JPEG", quality=90),
    "baseline grey": encode(scene(32).convert("L"), "JPEG"),
    "upright EXIF": encode(scene(33), "JPEG", exif=Image.Exif().tobytes()),
}
HOST_ONLY = {
    "progressive": encode(scene(34), "JPEG", progressive=True),
    "CMYK": encode(scene(35).convert("CMYK"), "JPEG"),
    "EXIF rotation": rotated_jpeg(),
    "PNG": encode(scene(36), "PNG"),
    "WebP": encode(scene(37), "WEBP"),
    "cut off": ELIGIBLE["baseline colour"][: len(ELIGIBLE["baseline colour"]) // 2],
}


@pytest.mark.parametrize("name", ELIGIBLE)
def test_baseline_upright_jpegs_go_to_the_device(name):
    assert device_decodable(open_image(ELIGIBLE[name], ImageLimits()), ELIGIBLE[name])


@pytest.mark.parametrize("name", HOST_ONLY)
def test_everything_else_is_decoded_by_the_api(name):
    assert not device_decodable(open_image(HOST_ONLY[name], ImageLimits()), HOST_ONLY[name])


def test_device_pixels_are_within_a_few_levels_of_the_exact_path():
    """Photo-like JPEGs (grain): a few levels at most. Flat shapes with sharp edges, the worst
    case for two resize filters: further apart at the edges, as close on average."""
    sizes = [(640, 480), (1920, 1080), (300, 200), (384, 384)]
    photos = [encode(scene(40 + i, size, grain=True), "JPEG", quality=90) for i, size in enumerate(sizes)]
    drawings = [encode(scene(50 + i, size), "JPEG", quality=90) for i, size in enumerate(sizes)]
    device = DeviceJpegs("cpu", 384, 384)
    for jpegs, largest in ((photos, 3), (drawings, 16)):
        for jpeg, pixels in zip(jpegs, device(jpegs).numpy().astype(int)):
            exact = prepare_image(jpeg, ImageLimits(), ResizeSpec()).pixels.astype(int)
            difference = np.abs(pixels - exact)
            assert difference.max() <= largest and difference.mean() < 0.3, (difference.max(), difference.mean())
    # At the model's size already: no resize, the decoded pixels themselves.
    assert np.array_equal(device(photos[3:])[0].numpy(), prepare_image(photos[3], ImageLimits(), ResizeSpec()).pixels)


def test_large_photos_are_decoded_a_few_at_a_time():
    big = header_only_jpeg(6000, 4000)  # 24 MP: the header is all the grouping reads
    small = encode(scene(51, (640, 480)), "JPEG")
    assert chunks_by_pixels([big, big, small, big, big]) == [[0, 1, 2], [3, 4]]
    assert chunks_by_pixels([small] * 3) == [[0, 1, 2]]


@pytest.fixture(scope="module")
def captioner(tiny_model_dir):
    from blip_serve.model.captioner import BlipCaptioner

    return BlipCaptioner(tiny_model_dir, load_settings({"BLIP_PRECISION": "fp32", "BLIP_GPU_DECODE": "true"}))


def test_a_batch_of_device_and_api_images_is_captioned_job_by_job(captioner, tiny_model_dir, reference):
    spec = ResizeSpec.from_model_dir(tiny_model_dir)
    png = upload_corpus()["photo.png"]
    jpeg = encode(scene(60, (640, 480)), "JPEG", quality=90)
    truncated = jpeg[: len(jpeg) // 2]  # past the API's checks only if sent straight to the model
    jobs = [
        CaptionJob(pixels=np.empty((0,), np.uint8), jpeg=jpeg, max_new_tokens=20),
        CaptionJob(pixels=prepare_image(png, ImageLimits(), spec).pixels, max_new_tokens=20),
        CaptionJob(pixels=np.empty((0,), np.uint8), jpeg=truncated, max_new_tokens=20),
    ]
    results = captioner.caption_jobs(jobs)

    assert [r.status for r in results] == [200, 200, 415]
    assert results[1].caption == reference.caption(png, max_new_tokens=20)  # the exact path, unchanged
    assert "does not decode" in results[2].error
    # The device job's caption is the caption of the pixels the device path made.
    alone = captioner.caption_jobs([CaptionJob(pixels=captioner.device_jpegs([jpeg])[0].numpy(), max_new_tokens=20)])
    assert results[0].caption == alone[0].caption
    assert captioner.describe()["jpeg_decoder"] == "pillow"


def test_a_model_service_without_gpu_decode_refuses_jpeg_jobs(tiny_model_dir):
    from blip_serve.model.captioner import BlipCaptioner

    plain = BlipCaptioner(tiny_model_dir, load_settings({"BLIP_PRECISION": "fp32"}))
    [result] = plain.caption_jobs(
        [CaptionJob(pixels=np.empty((0,), np.uint8), jpeg=ELIGIBLE["baseline colour"], max_new_tokens=5)]
    )
    assert result.status == 400 and "BLIP_GPU_DECODE is off" in result.error
    assert plain.describe()["jpeg_decoder"] == "api"


def test_grey_jpegs_decode_to_three_equal_channels():
    grey = ELIGIBLE["baseline grey"]
    [pixels] = DeviceJpegs("cpu", 64, 64)([grey]).numpy()
    assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[1], pixels[2])
    assert Image.open(io.BytesIO(grey)).mode == "L"
