"""OpenAI chat messages carrying an image, as the SDK's users write them."""

from __future__ import annotations

import base64

from support.images import encode, scene

JPEG = encode(scene(71, (320, 240)), "JPEG")
DATA_URL = "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()


def image_message(url: str = DATA_URL, text: str | None = None) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    if text:
        content.insert(0, {"type": "text", "text": text})
    return [{"role": "user", "content": content}]
