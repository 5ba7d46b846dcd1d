"""A second yardstick: BLIP on LitServe, written the way LitServe's documentation writes a server.

A `LitAPI` with `max_batch_size`: LitServe gathers concurrent requests into one `predict`, which runs
BLIP's own processor and `generate` in fp32 with transformers' default attention. Same contract
(`POST /caption`, field `file`), same model directory and generation settings as blip-serve
(BLIP_MODEL, BLIP_MAX_NEW_TOKENS, BLIP_MIN_NEW_TOKENS, BLIP_MAX_BATCH_SIZE), so the load test compares
servers, not models:

    BLIP_MODEL=models/blip-base PORT=8000 python -m load_test.litserve_baseline

With BLIP_BENCH_AUTOCAST=bf16, `generate` runs under `torch.autocast(..., dtype=torch.bfloat16)`:
what a user on a CPU with AMX writes to use it (`load_test compare --servers litserve-bf16`).
"""

# No `from __future__ import annotations`: LitServe compares decode_request's annotation with
# fastapi.Request itself, and a string annotation would send it the unpicklable request object.
import contextlib
import io
import os

import litserve as ls
import torch
from fastapi import Request
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor

from blip_serve.shared.settings import load_settings

settings = load_settings()
AUTOCAST = os.environ.get("BLIP_BENCH_AUTOCAST", "") == "bf16"


class BlipLitAPI(ls.LitAPI):
    def setup(self, device):
        self.device = device
        self.processor = BlipProcessor.from_pretrained(settings.model)
        self.model = BlipForConditionalGeneration.from_pretrained(settings.model).eval().to(device)

    def decode_request(self, request: Request):
        return Image.open(io.BytesIO(request["file"].file.read())).convert("RGB")

    def predict(self, images):
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        autocast = (
            torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16) if AUTOCAST else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            output = self.model.generate(
                **inputs, max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens or None
            )
        return self.processor.batch_decode(output, skip_special_tokens=True)

    def encode_response(self, caption):
        return {"caption": caption}


if __name__ == "__main__":
    api = BlipLitAPI(max_batch_size=settings.max_batch_size, batch_timeout=0.05, api_path="/caption")
    server = ls.LitServer(api, accelerator="auto", healthcheck_path="/readyz", timeout=settings.request_timeout_s)
    server.run(host="127.0.0.1", port=int(os.environ.get("PORT", "8000")), generate_client_file=False)
