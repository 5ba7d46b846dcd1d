"""Captions straight from transformers' own `generate`, one image at a time: the parity reference."""

from __future__ import annotations

import torch
from transformers import BlipForConditionalGeneration, BlipProcessor

from blip_serve.images import decode_image


class ReferenceCaptioner:
    def __init__(self, model_dir: str):
        self.processor = BlipProcessor.from_pretrained(model_dir)
        self.model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()

    @torch.inference_mode()
    def caption(self, data: bytes, prompt: str | None = None, max_new_tokens: int = 30, num_beams: int = 1) -> str:
        image = decode_image(data, max_pixels=40_000_000)
        inputs = self.processor(images=image, text=prompt, return_tensors="pt")
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams)
        return self.processor.decode(output[0], skip_special_tokens=True)

    @torch.inference_mode()
    def caption_image(self, image, max_new_tokens: int = 30) -> str:
        """The reference for an already decoded PIL image (no project code involved)."""
        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt")
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens)
        return self.processor.decode(output[0], skip_special_tokens=True)
