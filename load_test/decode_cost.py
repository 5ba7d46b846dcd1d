"""What the API side costs per image, by photo size, exact and with BLIP_JPEG_DRAFT; and how often
the draft decode's captions agree with the exact ones on a model.

    python -m load_test.decode_cost --model models/blip-base --tokens 20 --count 12

Prints one JSON line per size: CPU ms per image on one core (decode + transformers' processor, as
the API did before the uint8 transport; decode + resize now; the same with the draft decode; the
model process's decode + resize with BLIP_GPU_DECODE, here on the CPU), bytes that cross to the
model service per image, and caption agreement with the exact path (fp32) of the draft decode and
of BLIP_GPU_DECODE's pixels, with their largest and mean difference in levels.
"""

from __future__ import annotations

import argparse
import json
import pickle
import time

import numpy as np

from blip_serve.decoding.images import ImageLimits, ResizeSpec, prepare_image
from blip_serve.shared.jobs import CaptionJob
from blip_serve.shared.settings import load_settings
from tools.sample_images import sample_images

SIZES = [(640, 480), (1920, 1080), (4032, 3024)]


def cpu_ms_per_image(images: list[bytes], spec: ResizeSpec, jpeg_draft: bool, repeats: int = 3) -> float:
    started = time.process_time()
    for _ in range(repeats):
        for data in images:
            prepare_image(data, ImageLimits(), spec, jpeg_draft)
    return (time.process_time() - started) * 1000 / (repeats * len(images))


def cpu_ms_with_transformers(images: list[bytes], model_dir: str, repeats: int = 3) -> float:
    """Decode, then BLIP's own image processor to float32: the API side before the uint8 transport."""
    from transformers import BlipProcessor

    from blip_serve.decoding.images import decode_image

    processor = BlipProcessor.from_pretrained(model_dir).image_processor
    started = time.process_time()
    for _ in range(repeats):
        for data in images:
            processor(images=decode_image(data, ImageLimits()), return_tensors="np")
    return (time.process_time() - started) * 1000 / (repeats * len(images))


def cpu_ms_device_path(images: list[bytes], spec: ResizeSpec, repeats: int = 3) -> float:
    """BLIP_GPU_DECODE's decode and resize, run on the CPU (the model process does it there)."""
    from blip_serve.model.device_images import DeviceJpegs

    device = DeviceJpegs("cpu", spec.height, spec.width)
    started = time.process_time()
    for _ in range(repeats):
        device(images)
    return (time.process_time() - started) * 1000 / (repeats * len(images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (its resize size and, for agreement, BLIP)")
    parser.add_argument("--count", type=int, default=12, help="images per size")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--no-captions", action="store_true", help="costs only, no caption agreement")
    args = parser.parse_args()

    spec = ResizeSpec.from_model_dir(args.model)
    captioner = None
    if not args.no_captions:
        from blip_serve.model.captioner import BlipCaptioner

        settings = load_settings({"BLIP_PRECISION": "fp32", "BLIP_MIN_NEW_TOKENS": str(args.tokens)})
        captioner = BlipCaptioner(args.model, settings)
    for size in SIZES:
        images = [data for _, data in sample_images(args.count, size)]
        exact = [prepare_image(d, ImageLimits(), spec).pixels for d in images]
        row = {
            "size": f"{size[0]}x{size[1]}",
            "jpeg_kb": round(sum(map(len, images)) / len(images) / 1024),
            "cpu_ms_transformers": round(cpu_ms_with_transformers(images, args.model), 1),
            "cpu_ms_exact": round(cpu_ms_per_image(images, spec, False), 1),
            "cpu_ms_draft": round(cpu_ms_per_image(images, spec, True), 1),
            "cpu_ms_device_path_on_cpu": round(cpu_ms_device_path(images, spec), 1),
            "uint8_bytes": exact[0].nbytes,
            "float32_bytes": exact[0].nbytes * 4,
            "pickled_job_bytes": len(pickle.dumps(CaptionJob(pixels=exact[0], max_new_tokens=args.tokens))),
        }
        if captioner:
            draft = [prepare_image(d, ImageLimits(), spec, True).pixels for d in images]

            def captions(pixels):
                jobs = [CaptionJob(pixels=p, max_new_tokens=args.tokens) for p in pixels]
                return [r.caption for r in captioner.caption_jobs(jobs)]

            from blip_serve.model.device_images import DeviceJpegs

            device = list(DeviceJpegs("cpu", spec.height, spec.width)(images).numpy())
            difference = np.abs(np.stack(device).astype(int) - np.stack(exact).astype(int))
            exact_captions = captions(exact)
            for name, pixels in (("draft", draft), ("device", device)):
                agree = sum(a == b for a, b in zip(exact_captions, captions(pixels)))
                row[f"{name}_captions_equal"] = f"{agree}/{len(images)}"
            row["device_max_level_difference"] = int(difference.max())
            row["device_mean_level_difference"] = round(float(difference.mean()), 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
