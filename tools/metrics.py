"""Reading blip-serve's /metrics page, and percentiles of latencies: for the tests and the load tests alike."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def parse_batch_histogram(metrics_text: str) -> dict[str, float]:
    """The blip_batch_size histogram (the model service's batches) in a /metrics page: {"le=<bound>":
    cumulative batches, ..., "sum": images, "count": batches}, summed over label sets; "busy_s",
    the model's compute time so far (blip_model_busy_seconds_total); and "step_captions" and
    "steps", the captions the decoder's steps advanced and how many steps (blip_step_captions)."""
    histogram: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "blip_model_busy_seconds":
            histogram["busy_s"] = sum(s.value for s in family.samples if s.name.endswith("_total"))
        if family.name == "blip_step_captions":
            for sample in family.samples:
                for kind, key in (("_sum", "step_captions"), ("_count", "steps")):
                    if sample.name.endswith(kind):
                        histogram[key] = histogram.get(key, 0.0) + sample.value
        if family.name != "blip_batch_size":
            continue
        for sample in family.samples:
            kind = sample.name.removeprefix(family.name + "_")
            key = f"le={sample.labels['le']}" if kind == "bucket" else kind
            histogram[key] = histogram.get(key, 0.0) + sample.value
    return histogram


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]
