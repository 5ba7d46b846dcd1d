"""Load BLIP and caption batches of preprocessed images: the model service's whole job."""

from __future__ import annotations

import logging
import os
import types
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bentoml import IODescriptor
from transformers import BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor
from transformers.models.blip.modeling_blip import BlipAttention

from .settings import DEFAULT_MODEL, Settings

logger = logging.getLogger("bentoml.blip_serve")

PRECISIONS = ("auto", "fp32", "bf16", "hybrid", "fp16")


class CaptionJob(IODescriptor):
    """One image's share of a batch, as the API service sends it to the model service.

    An IODescriptor (a pydantic model BentoML knows) so that the numpy array field validates.
    """

    pixel_values: np.ndarray  # (3, H, W) float32, the image processor's output
    prompt: str | None = None
    max_new_tokens: int
    num_beams: int = 1


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def pick_precision(setting: str, device: str) -> str:
    if setting not in PRECISIONS:
        raise ValueError(f"BLIP_PRECISION must be one of {', '.join(PRECISIONS)}, got {setting!r}")
    if setting != "auto":
        return setting
    if device == "cuda":
        return "fp16"
    # bf16 pays off only where the CPU multiplies bf16 natively (AMX): measured on a CPU without
    # it (AVX-512 VNNI only), a bf16 vision tower ran 3.8x slower than fp32.
    return "hybrid" if cpu_has_amx() else "fp32"


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " amx_bf16" in line for line in cpuinfo)
    except OSError:
        return False


def pick_torch_threads(setting: int) -> int:
    if setting > 0:
        return setting
    # All the cores this process may use. Measured on 2 cores (full-size model, 20 tokens, 8
    # concurrent clients through HTTP): 2 threads 1.00 img/s, 1 thread 0.57 img/s. Decoding and
    # preprocessing in the API process take ~1% of a core per image; they do not need a core held back.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def sdpa_attention_forward(self: BlipAttention, hidden_states: torch.Tensor, **kwargs) -> tuple:
    """BLIP's vision attention through torch's fused scaled_dot_product_attention.

    Same maths as BlipAttention.forward (no mask, no dropout at inference); transformers 5.x does
    not offer `attn_implementation="sdpa"` for BLIP, so the project swaps this in itself.
    """
    batch, length, embed_dim = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim)
    query, key, value = qkv.permute(2, 0, 3, 1, 4)
    context = F.scaled_dot_product_attention(query, key, value, scale=self.scale)
    context = context.transpose(1, 2).reshape(batch, length, embed_dim)
    return self.projection(context), None


def use_sdpa_attention(model: torch.nn.Module) -> None:
    """Point every BlipAttention in `model` at the SDPA forward."""
    for module in model.modules():
        if isinstance(module, BlipAttention):
            module.forward = types.MethodType(sdpa_attention_forward, module)


def apply_precision(model: BlipForConditionalGeneration, precision: str) -> torch.dtype:
    """Cast the model for `precision`; returns the dtype its pixel input must have."""
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        model.half()
        return torch.float16
    if precision == "bf16":
        model.to(torch.bfloat16)
        return torch.bfloat16
    if precision == "hybrid":
        # The vision tower (~85% of the FLOPs) in bf16, the decoder that picks tokens in fp32.
        model.vision_model.to(torch.bfloat16)

        def image_embeds_to_fp32(module, inputs, output):
            output.last_hidden_state = output.last_hidden_state.float()
            return output

        model.vision_model.register_forward_hook(image_embeds_to_fp32)
        return torch.bfloat16
    raise ValueError(f"unknown precision {precision!r}")


STORE_MODEL = "blip-captioning"  # the name `python -m blip_serve.import_model` stores a model under
HUB_EXCLUDE = ["tf_model.h5", "*.msgpack", "*.onnx"]


def model_source(setting: str):
    """Where BLIP's files come from, as a BentoML service class attribute:

    - BLIP_MODEL a local directory: that directory (a str);
    - BLIP_MODEL a hub id: bentoml.models.HuggingFaceModel, downloaded on first use;
    - BLIP_MODEL unset: the model store's `blip-captioning` (a BentoModel, which `bentoml build`
      packs into the bento) when there is one, else the hub's Salesforce/blip-image-captioning-base.
    """
    import bentoml

    if setting and Path(setting).is_dir():
        return setting
    if setting:
        return bentoml.models.HuggingFaceModel(setting, exclude=HUB_EXCLUDE)
    try:
        return bentoml.models.BentoModel(bentoml.models.get(STORE_MODEL).tag)
    except bentoml.exceptions.NotFound:
        return bentoml.models.HuggingFaceModel(DEFAULT_MODEL, exclude=HUB_EXCLUDE)


def model_dir(resolved) -> str:
    """The directory behind a resolved model attribute: a path string, or a stored BentoML model."""
    return str(getattr(resolved, "path", resolved))


def load_image_processor(model_dir: str) -> BlipImageProcessor:
    return BlipProcessor.from_pretrained(model_dir).image_processor


def preprocess(image_processor: BlipImageProcessor, image) -> np.ndarray:
    """One RGB image -> the (3, H, W) float32 array the model takes, exactly as BlipProcessor does it."""
    return image_processor(images=image, return_tensors="np")["pixel_values"][0].astype(np.float32)


class BlipCaptioner:
    """BLIP on one device, captioning lists of CaptionJobs."""

    def __init__(self, model_dir: str, settings: Settings):
        self.device = pick_device(settings.device)
        self.precision = pick_precision(settings.precision, self.device)
        if self.device == "cpu":
            torch.set_num_threads(pick_torch_threads(settings.torch_threads))
        self.threads = torch.get_num_threads()
        self.processor = BlipProcessor.from_pretrained(model_dir)
        model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
        if settings.attention == "sdpa":
            use_sdpa_attention(model)
        elif settings.attention != "eager":
            raise ValueError(f"BLIP_ATTENTION must be sdpa or eager, got {settings.attention!r}")
        self.input_dtype = apply_precision(model, self.precision)
        self.model = model.to(self.device)
        self.min_new_tokens = settings.min_new_tokens
        logger.info(
            "BLIP loaded from %s on %s, precision %s, attention %s, torch threads %d",
            model_dir, self.device, self.precision, settings.attention, self.threads,
        )

    @torch.inference_mode()
    def caption(self, jobs: list[CaptionJob]) -> list[str]:
        """Caption every job; jobs that share prompt and generation options share one generate."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, job in enumerate(jobs):
            groups[(job.prompt, job.max_new_tokens, job.num_beams)].append(index)

        captions: list[str] = [""] * len(jobs)
        for (prompt, max_new_tokens, num_beams), indices in groups.items():
            pixels = np.stack([jobs[i].pixel_values for i in indices])
            texts = self.generate(pixels, prompt, max_new_tokens, num_beams)
            for index, text in zip(indices, texts):
                captions[index] = text
        return captions

    def generate(self, pixels: np.ndarray, prompt: str | None, max_new_tokens: int, num_beams: int) -> list[str]:
        pixel_values = torch.from_numpy(pixels)
        if self.device == "cuda":  # page-locked memory: the copy to the GPU runs asynchronously
            pixel_values = pixel_values.pin_memory()
        pixel_values = pixel_values.to(self.device, self.input_dtype, non_blocking=True)
        prompt_inputs = {}
        if prompt:
            tokens = self.processor.tokenizer([prompt] * len(pixels), return_tensors="pt")
            prompt_inputs = {
                "input_ids": tokens["input_ids"].to(self.device),
                "attention_mask": tokens["attention_mask"].to(self.device),
            }
        output = self.model.generate(
            pixel_values=pixel_values,
            **prompt_inputs,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min(self.min_new_tokens, max_new_tokens) or None,
            num_beams=num_beams,
            do_sample=False,
        )
        return self.processor.batch_decode(output, skip_special_tokens=True)
