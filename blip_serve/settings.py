"""Every setting of the server, read once from `BLIP_*` environment variables.

The README's configuration table documents each one; keep the two in step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"


@dataclass(frozen=True)
class Settings:
    model: str = ""  # local directory or hub id; empty: the stored model, else DEFAULT_MODEL
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | hybrid | fp16
    attention: str = "sdpa"  # sdpa | eager
    torch_threads: int = 0  # 0: one per core the model process may use
    api_workers: int = 1  # API service processes (decode + preprocess); a GPU needs several
    max_batch_size: int = 8
    max_latency_ms: int = 60_000
    max_new_tokens: int = 30
    min_new_tokens: int = 0  # benchmarks force a fixed caption length with it
    max_new_tokens_limit: int = 100  # the most a client may ask for
    max_beams: int = 4
    max_prompt_chars: int = 200
    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    request_timeout_s: int = 120
    api_key: str = ""  # empty: /caption is open
    tracing: int = 0  # 1: let BentoML's OpenTelemetry middleware trace requests (it retains spans)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Settings":
        environ = os.environ if environ is None else environ
        values = {}
        for field in fields(cls):
            raw = environ.get(f"BLIP_{field.name.upper()}")
            if raw is None or raw == "":
                continue
            try:
                values[field.name] = int(raw) if field.type == "int" else raw
            except ValueError:
                raise ValueError(f"BLIP_{field.name.upper()} must be an integer, got {raw!r}") from None
        return cls(**values)
