"""The per-request baseline: the FastAPI + gunicorn design blip-serve replaces.

Each gunicorn worker loads its own BLIP; each request runs its own `generate` (batch of one) in
FastAPI's thread pool. No batching, plain transformers. Same contract (`POST /caption`, field
`file`), same model directory and generation settings (BLIP_MODEL, BLIP_MAX_NEW_TOKENS,
BLIP_MIN_NEW_TOKENS), so the load test compares designs, not models:

    BLIP_MODEL=models/blip-base gunicorn load_test.baseline:app -k uvicorn.workers.UvicornWorker -w 2
"""

from __future__ import annotations

import torch
from fastapi import FastAPI, HTTPException, UploadFile
from transformers import BlipForConditionalGeneration, BlipProcessor

from blip_serve.decoding.images import ImageLimits, decode_image
from blip_serve.shared.errors import ClientError
from blip_serve.shared.settings import load_settings

settings = load_settings()
processor = BlipProcessor.from_pretrained(settings.model)
model = BlipForConditionalGeneration.from_pretrained(settings.model).eval()
app = FastAPI(title="per-request BLIP baseline")


@app.get("/readyz")
def readyz() -> dict:
    return {"ready": True}


@app.post("/caption")
def caption(file: UploadFile) -> dict:
    try:
        image = decode_image(file.file.read(), ImageLimits(settings.max_image_pixels, settings.max_image_side))
    except ClientError as exc:
        raise HTTPException(exc.status_code, exc.message) from None
    with torch.inference_mode():
        inputs = processor(images=image, return_tensors="pt")
        output = model.generate(
            **inputs, max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens or None
        )
    return {"caption": processor.decode(output[0], skip_special_tokens=True)}
