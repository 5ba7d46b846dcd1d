"""Captions straight from transformers' own `generate`, one image at a time: the parity reference."""

from __future__ import annotations

import torch
from transformers import BlipForConditionalGeneration, BlipProcessor

from blip_serve.decoding.images import ImageLimits, decode_image


class ReferenceCaptioner:
    def __init__(self, model_dir: str):
        self.processor = BlipProcessor.from_pretrained(model_dir)
        self.model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()

    def caption(self, data: bytes, prompt: str | None = None, max_new_tokens: int = 30, num_beams: int = 1) -> str:
        """The reference for uploaded bytes, decoded to RGB the way the server does it."""
        return self.caption_image(decode_image(data, ImageLimits()), prompt, max_new_tokens, num_beams)

    @torch.inference_mode()
    def caption_image(self, image, prompt: str | None = None, max_new_tokens: int = 30, num_beams: int = 1) -> str:
        """The reference for a PIL image: BlipProcessor, then one `generate` on it alone."""
        inputs = self.processor(images=image.convert("RGB"), text=prompt, return_tensors="pt")
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams)
        return self.processor.decode(output[0], skip_special_tokens=True)
