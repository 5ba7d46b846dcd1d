"""What crosses between the two services: a CaptionJob per image in, a CaptionResult per image out.

Both are IODescriptors (pydantic models BentoML knows), so the numpy array field validates.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from bentoml import IODescriptor


class CaptionJob(IODescriptor):
    """One image's share of a batch, as the API service sends it to the model service."""

    pixels: np.ndarray  # (3, H, W) uint8, already resized to the model's input size; empty with `jpeg`
    jpeg: bytes = b""  # BLIP_GPU_DECODE: a checked JPEG, decoded and resized on the model's device
    prompt: str | None = None
    max_new_tokens: int
    num_beams: int = 1

    def generation_options(self) -> tuple:
        """Jobs whose options are equal can share one generate."""
        return (self.prompt, self.max_new_tokens, self.num_beams)


class CaptionResult(IODescriptor):
    """A caption, or why this one job got none (status: the HTTP status its client should get)."""

    caption: str | None = None
    error: str | None = None
    status: int = 200
    new_tokens: int = 0  # tokens generated, the end-of-text token included
    stopped: bool = True  # the model ended the caption (not max_new_tokens)


def group_jobs(jobs: list[CaptionJob]) -> list[list[int]]:
    """Indices of `jobs`, grouped by generation options, each group in arrival order."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, job in enumerate(jobs):
        groups[job.generation_options()].append(index)
    return list(groups.values())
