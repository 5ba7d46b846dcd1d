"""BLIP_COMPILE: greedy captioning with a static KV cache and a compiled decode step.

`generate` runs BLIP's text decoder one token at a time through a growing cache: a few hundred small
kernels per token, each sized by the step. Here the prompt goes through transformers' own decoder
once (the same prefill `generate` does), its keys and values are copied into fixed-size buffers, and
every later token runs one `torch.compile`d step over those buffers: fused kernels on a CPU, one
replayed CUDA graph per batch size on a GPU. Greedy search only, with `generate`'s rules (min new
tokens, stop at [SEP], pad after it); beam search and generation configs that add logits processors
go through `generate`. The step sums over the padded cache, so its floats differ from `generate`'s
in the last bits and a near-tie can pick another token: BLIP_COMPILE=auto leaves the exact fp32 path
to `generate` (README: figures).
"""

from __future__ import annotations

import math

import torch
from transformers import BlipForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from blip_serve.shared.model_config import decoder_prompt

# Generation settings that add logits processors this decoder does not apply: if a model's
# generation config sets one, captions go through `generate`.
UNSUPPORTED = {
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_repetition_penalty": (None, 1.0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
}
CACHE_BLOCK = 32  # cache lengths are rounded up to this, so a few compiled shapes serve every request


def unsupported_settings(model: BlipForConditionalGeneration) -> list[str]:
    config = model.text_decoder.generation_config
    return [name for name, plain in UNSUPPORTED.items() if getattr(config, name, None) not in plain]


class StaticCacheDecoder:
    """Greedy decoding of BLIP's text decoder, the per-token step compiled."""

    def __init__(self, model: BlipForConditionalGeneration, device: str):
        self.model = model
        self.decoder = model.text_decoder
        text = model.config.text_config
        self.bos, self.eos, self.pad = text.bos_token_id, text.sep_token_id, text.pad_token_id
        self.heads = text.num_attention_heads
        self.head_dim = text.hidden_size // text.num_attention_heads
        self.layers = self.decoder.bert.encoder.layer
        self.buffers: dict[tuple[int, int], tuple[list, list, list, list]] = {}
        # On a GPU the step is recorded as CUDA graphs (what mode="reduce-overhead" sets). The batch
        # dimension is dynamic, so one compilation serves every batch size. Inductor's pattern
        # matcher is off: it rewrites the attention into an SDPA call that fails with a dynamic batch.
        options = {"pattern_matcher": False, "triton.cudagraphs": device.startswith("cuda")}
        self.step = torch.compile(self.decode_step, dynamic=True, fullgraph=True, options=options)

    def attend(self, attention, hidden, keys, values, mask=None):
        """One attention block (BlipTextSelfAttention + its output) for the one new token."""
        batch = hidden.shape[0]
        query = attention.self.query(hidden).view(batch, 1, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(query, keys.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        context = torch.matmul(scores.softmax(dim=-1), values)
        context = context.transpose(1, 2).reshape(batch, 1, self.heads * self.head_dim)
        return attention.output(context, hidden)

    def decode_step(self, tokens, position, self_keys, self_values, cross_keys, cross_values):
        """Logits for the token after `tokens` (batch, 1) at `position`; writes its keys and values
        into the self-attention cache in place."""
        embeddings = self.decoder.bert.embeddings
        hidden = embeddings.word_embeddings(tokens) + embeddings.position_embeddings(position.view(1, 1))
        hidden = embeddings.LayerNorm(hidden)
        length = self_keys[0].shape[2]
        visible = torch.arange(length, device=tokens.device) <= position
        mask = torch.where(visible, 0.0, torch.finfo(hidden.dtype).min).to(hidden.dtype).view(1, 1, 1, length)
        batch = tokens.shape[0]
        for index, layer in enumerate(self.layers):
            own = layer.attention.self
            key = own.key(hidden).view(batch, 1, self.heads, self.head_dim).transpose(1, 2)
            value = own.value(hidden).view(batch, 1, self.heads, self.head_dim).transpose(1, 2)
            self_keys[index].index_copy_(2, position.view(1), key)
            self_values[index].index_copy_(2, position.view(1), value)
            hidden = self.attend(layer.attention, hidden, self_keys[index], self_values[index], mask)
            hidden = self.attend(layer.crossattention, hidden, cross_keys[index], cross_values[index])
            hidden = layer.output(layer.intermediate(hidden), hidden)
        return self.decoder.cls(hidden)[:, -1, :].float()

    def cache_buffers(self, rows: int, length: int, cache: EncoderDecoderCache) -> tuple[list, list, list, list]:
        """Key and value buffers for `rows` sequences of `length` tokens, made once per shape and
        reused, so a CUDA graph recorded on them replays (rows past a batch hold stale values, used
        by nothing)."""
        if (rows, length) not in self.buffers:
            self_layer, cross_layer = cache.self_attention_cache.layers[0], cache.cross_attention_cache.layers[0]
            self_shape = (rows, self.heads, length, self.head_dim)
            cross_shape = (rows, *cross_layer.keys.shape[1:])
            buffers = (
                [self_layer.keys.new_zeros(self_shape) for _ in self.layers],
                [self_layer.keys.new_zeros(self_shape) for _ in self.layers],
                [cross_layer.keys.new_zeros(cross_shape) for _ in self.layers],
                [cross_layer.keys.new_zeros(cross_shape) for _ in self.layers],
            )
            for tensor in (t for group in buffers for t in group):
                torch._dynamo.mark_static_address(tensor)  # CUDA graphs read them in place
            self.buffers[(rows, length)] = buffers
        return self.buffers[(rows, length)]

    @torch.inference_mode()
    def generate(
        self, pixel_values: torch.Tensor, prompt_ids: torch.Tensor | None, max_new_tokens: int, min_new_tokens: int
    ) -> torch.Tensor:
        """Token ids as `model.generate(..., num_beams=1, do_sample=False)` returns them."""
        image_embeds = self.model.vision_model(pixel_values=pixel_values)[0]
        batch = image_embeds.shape[0]
        # The batch shares one prompt (the tokenizer's ids, one row per image), or none.
        tokens = decoder_prompt(prompt_ids[0].tolist() if prompt_ids is not None else [], self.bos)
        prompt_ids = torch.tensor([tokens], device=image_embeds.device).repeat(batch, 1)
        start = prompt_ids.shape[1]
        cache = EncoderDecoderCache(DynamicCache(config=self.decoder.config), DynamicCache(config=self.decoder.config))
        prefill = self.decoder(
            input_ids=prompt_ids,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
            past_key_values=cache,
            use_cache=True,
        )
        length = -(-(start + max_new_tokens) // CACHE_BLOCK) * CACHE_BLOCK
        # Batches run padded to a power of two, at least 2: few cache shapes, and one compiled step
        # (a dimension of 1 would be compiled apart).
        rows = max(2, 1 << (batch - 1).bit_length())
        self_keys, self_values, cross_keys, cross_values = self.cache_buffers(rows, length, cache)
        for layer, keys, values in zip(cache.self_attention_cache.layers, self_keys, self_values):
            keys[:batch, :, :start] = layer.keys
            values[:batch, :, :start] = layer.values
        for layer, keys, values in zip(cache.cross_attention_cache.layers, cross_keys, cross_values):
            keys[:batch] = layer.keys
            values[:batch] = layer.values
        padded = torch.full((rows, 1), self.pad, dtype=torch.long, device=prompt_ids.device)

        logits = prefill.logits[:, -1, :].float()
        sequences = [prompt_ids]
        finished = torch.zeros(batch, dtype=torch.bool, device=prompt_ids.device)
        for new in range(max_new_tokens):
            if new < min_new_tokens:
                logits[:, self.eos] = -math.inf
            tokens = logits.argmax(dim=-1)
            tokens = torch.where(finished, self.pad, tokens)
            sequences.append(tokens[:, None])
            finished |= tokens == self.eos
            if new + 1 == max_new_tokens or bool(finished.all()):
                break
            padded[:batch, 0] = tokens
            position = torch.tensor(start + new, device=tokens.device)
            logits = self.step(padded, position, self_keys, self_values, cross_keys, cross_values)[:batch].clone()
        return torch.cat(sequences, dim=1)
