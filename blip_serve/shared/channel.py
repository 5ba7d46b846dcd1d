"""What the API workers and the model service say on their channel: one WebSocket per API worker
carries every call's images and answers, instead of an HTTP request per call (BentoML's handling of
a call cost the model process ~4 ms of CPU an image: docs/performance.md).

    a call      text {"call": id, "timeout_s", "client", "jobs": [options, pixels' shape, JPEG size]},
                then the jobs' bytes (pixels, then JPEG, job by job) in binary messages of <= CHUNK
    a cancel    text {"cancel": id}: the call's images leave the queue and their seats
    an answer   text {"call": id, "results": [...]}, or {"call": id, "unavailable": why} (the queue is
                full, or the call was dropped: a 503 to the client), or {"call": id, "fault": why} (a 500)

Binary messages stay under uvicorn's WebSocket message limit (16 MiB) whatever the upload limit.

Where `bentoml serve` gives the model service a Unix socket, each model worker also serves the channel
on a socket of its own (`worker_addresses`), and an API worker opens a channel to each: the workers
share the service's socket, and the kernel handed eight new connections in a row to one of two.
"""

from __future__ import annotations

import json
import math

import numpy as np

from blip_serve.shared.jobs import CaptionJob, CaptionResult

PATH = "/channel"  # where the model service serves it
CHUNK = 1024 * 1024


def worker_addresses(address: str, workers: int) -> list[str]:
    """Where the API workers reach each of the model service's `workers` (1, 2, ...) on a channel:
    beside the service's socket (file://...); else (an http:// address) the service's address,
    which reaches one worker of them."""
    if address.startswith("file://"):
        return [worker_address(address, worker) for worker in range(1, workers + 1)]
    return [address]


def worker_address(address: str, worker: int) -> str:
    """Model worker `worker`'s own socket, beside the service's (`address`: file://...)."""
    return f"{address}.worker{worker}"


def call_message(call_id: int, jobs: list[CaptionJob], timeout_s: float, client: str) -> tuple[str, list[bytes]]:
    """A call's header and its bytes, in chunks."""
    header = {
        "call": call_id,
        "timeout_s": timeout_s,
        "client": client,
        "jobs": [
            {
                "prompt": job.prompt,
                "max_new_tokens": job.max_new_tokens,
                "num_beams": job.num_beams,
                "shape": list(job.pixels.shape),
                "jpeg": len(job.jpeg),
            }
            for job in jobs
        ],
    }
    data = b"".join(part for job in jobs for part in (np.ascontiguousarray(job.pixels, np.uint8).data, job.jpeg))
    view = memoryview(data)
    return json.dumps(header), [view[start : start + CHUNK] for start in range(0, len(data), CHUNK)]


def payload_size(header: dict) -> int:
    return sum(math.prod(job["shape"]) + job["jpeg"] for job in header["jobs"])


def read_jobs(header: dict, data: bytes) -> list[CaptionJob]:
    """The jobs of a call whose `header` and bytes (`data`, payload_size(header) of them) arrived.
    The pixels are views of `data` (no copy); each job's values were checked by the API worker."""
    jobs, offset = [], 0
    for job in header["jobs"]:
        size = math.prod(job["shape"])
        pixels = np.frombuffer(data, np.uint8, size, offset).reshape(job["shape"])
        offset += size
        jpeg = bytes(memoryview(data)[offset : offset + job["jpeg"]])  # one copy
        offset += job["jpeg"]
        jobs.append(
            CaptionJob.model_construct(
                pixels=pixels,
                jpeg=jpeg,
                prompt=job["prompt"],
                max_new_tokens=job["max_new_tokens"],
                num_beams=job["num_beams"],
            )
        )
    return jobs


def answer_message(call_id: int, results: list[CaptionResult]) -> str:
    return json.dumps({"call": call_id, "results": [result.model_dump() for result in results]})


def refusal_message(call_id: int, kind: str, why: str) -> str:
    """`kind`: "unavailable" (a 503 to the client) or "fault" (a 500)."""
    return json.dumps({"call": call_id, kind: why})


def cancel_message(call_id: int) -> str:
    return json.dumps({"cancel": call_id})


def read_results(answer: dict) -> list[CaptionResult]:
    return [CaptionResult.model_construct(**result) for result in answer["results"]]
