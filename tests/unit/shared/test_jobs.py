"""blip_serve/shared/jobs.py: which jobs share a generate."""

from __future__ import annotations

import numpy as np

from blip_serve.shared.jobs import CaptionJob, group_jobs

PIXELS = np.zeros((3, 4, 4), np.uint8)


def job(prompt=None, tokens=30, beams=1) -> CaptionJob:
    return CaptionJob(pixels=PIXELS, prompt=prompt, max_new_tokens=tokens, num_beams=beams)


def test_jobs_with_the_same_options_share_a_group_in_arrival_order():
    jobs = [job(), job("a photo of"), job(), job(tokens=5), job("a photo of"), job(beams=2)]
    assert group_jobs(jobs) == [[0, 2], [1, 4], [3], [5]]
