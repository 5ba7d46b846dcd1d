"""Greedy captioning one decoder step at a time, over a fixed number of seats.

`generate` runs a batch from its first token to its longest caption's last: a caption that ended
keeps its row, and a new image waits for the whole batch. Here every image has a seat of its own in
the decoder's key/value buffers, with its own prompt, position and max_new_tokens:

- **join**: a new image takes a seat and is encoded: the vision tower, a layer at a time, so that
  the batcher can spread that work between steps (`encode` with a time budget; where the tower is
  compiled as a whole, the images not spread run through it whole), then every decoder
  layer's cross-attention keys and values over the image, once, kept in the seat. From the next
  step on it decodes beside the others, whatever their prompts and lengths: the steps read its
  prompt ([DEC] and the prompt's tokens) a token a step, then pick its tokens. There is no prefill
  call of its own (`generate` runs the prompt in one pass): on a small model that call cost as
  much again as the image's vision tower.
- **step**: one token for every seat, in one batch; each row attends to its own positions only.
- **leave**: a seat frees the step its caption ends (the end token, or its max_new_tokens), or when
  its caller is gone (`release`), and the next image can take it at once.

In fp32 each caption equals `generate` for that image alone, token for token (tests: mixed prompts and
lengths sharing steps): the same layers in the same order, with `generate`'s rules (min new tokens,
stop at [SEP]). Rows attend over a padded cache with the padding masked; as for any batch, the
floats may differ from a lone image's in the last bits. Beam search stays on `generate`. With
`hybrid` the keys and values over the image are bf16, as the vision tower's output is: a step reads
half the bytes, and its captions are `hybrid`'s, not fp32's (README: how far each precision agrees).

The engine is plain torch on the model's thread; blip_serve/model/batcher.py decides who gets a seat.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from transformers import BlipForConditionalGeneration

# Generation settings that add logits processors the engine does not apply: if a model's
# generation config sets one, every caption goes through `generate`.
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
CACHE_BLOCK = 32  # the self-attention buffers grow (and steps attend) in blocks of this many positions


def unsupported_settings(model: BlipForConditionalGeneration) -> list[str]:
    config = model.text_decoder.generation_config
    return [name for name, plain in UNSUPPORTED.items() if getattr(config, name, None) not in plain]


@dataclass(eq=False)
class Seat:
    """One caption being decoded."""

    ticket: object  # the scheduler's handle for the job (its result goes back with it)
    prompt: list[int]  # [DEC] + the prompt's tokens
    max_new_tokens: int
    min_new_tokens: int
    tokens: list[int] = field(init=False)  # the prompt's tokens read so far, then those picked
    stopped: bool = False

    def __post_init__(self) -> None:
        self.tokens = self.prompt[:1]

    @property
    def start(self) -> int:
        return len(self.prompt)

    @property
    def reading_prompt(self) -> bool:
        """Is the next step's token still the prompt's (forced), not one to pick?"""
        return len(self.tokens) < len(self.prompt)

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.start

    @property
    def position(self) -> int:
        """Where the last picked token goes in: the position the next step runs at."""
        return len(self.tokens) - 1

    def done(self) -> bool:
        return self.stopped or self.generated >= self.max_new_tokens


@dataclass
class Finished:
    ticket: object
    tokens: list[int]
    start: int
    stopped: bool


@dataclass(eq=False)
class Encoding:
    """One image on its way through the vision tower, a piece at a time (a layer; or the whole
    tower, where it is compiled as a whole and the image is not spread); its seat is kept for it."""

    ticket: object
    prompt: list[int]
    limits: tuple[int, int]  # (max_new_tokens, min_new_tokens)
    priority: float  # the smallest goes first (the fair queue's tag)
    hidden: torch.Tensor  # (1, image tokens, width) after `layer` pieces; before any: embeddings (else pixels)
    layer: int = 0
    pieces: list | None = None  # the tower's pieces it goes through (SeatEngine.by_layer or .whole), set as it starts


class SeatEngine:
    """BLIP's text decoder over `seats` rows of key/value buffers, and the vision tower in pieces."""

    def __init__(
        self,
        model: BlipForConditionalGeneration,
        seats: int,
        compile_step: bool = False,
        piecewise: bool = True,
        image_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.decoder = model.text_decoder
        text = model.config.text_config
        self.eos, self.pad = text.sep_token_id, text.pad_token_id
        self.heads = text.num_attention_heads
        self.head_dim = text.hidden_size // text.num_attention_heads
        self.layers = self.decoder.bert.encoder.layer
        self.seats: list[Seat | None] = [None] * seats
        self.self_keys: list[torch.Tensor] = []  # per layer: (seats, heads, capacity, head_dim)
        self.self_values: list[torch.Tensor] = []
        self.cross_keys: list[torch.Tensor] = []  # per layer: (seats, heads, image tokens, head_dim)
        self.cross_values: list[torch.Tensor] = []
        self.vision = model.vision_model
        vision = model.config.vision_config
        self.image_tokens = (vision.image_size // vision.patch_size) ** 2 + 1  # the patches and [CLS]
        self.text_dtype = next(self.decoder.parameters()).dtype
        # The cross-attention keys and values over each image: in the decoder's dtype, or (`hybrid`)
        # in the vision tower's bf16, computed by bf16 copies of their projections. A step reads
        # every seat's keys and values over 577 image tokens (42 MB an image in fp32: at 16 seats
        # more than the decoder's own ~490 MB), and seating computes them (~16 GFLOP an image).
        self.image_dtype = image_dtype or self.text_dtype
        cross = [layer.crossattention.self for layer in self.layers]
        self.image_projections = [(attention.key, attention.value) for attention in cross]
        if self.image_dtype != self.text_dtype:
            self.image_projections = [
                (copy.deepcopy(key).to(self.image_dtype), copy.deepcopy(value).to(self.image_dtype))
                for key, value in self.image_projections
            ]
        # The vision tower runs layer by layer, so that its work can be spread between steps. Where
        # it is compiled as a whole (BLIP_COMPILE on a CPU: not `piecewise`), the images not spread
        # run through it whole, and the spread ones through its eager layers: on a 2-core Zen 4 a
        # bf16 image took 0.46 s compiled and 0.48 s eager, and a whole image of a 64-connection
        # client between two steps held a one-connection client's captions for that long.
        self.piecewise = piecewise
        self.by_layer = self.layer_pieces()
        self.whole = [self.whole_tower]
        self.encoding: list[Encoding] = []
        # id(pieces): one image through one of them, measured: how many fit a budget
        self.piece_s: dict[int, float] = {}
        self.spread_owed = 0.0  # spread encoding that ran past its budgets, paid back by later calls
        self.last_step_s = 0.0
        self.last_step_rows = 0  # captions the last step advanced
        self.step_rows = self.decode_step  # compiled.compile_step swaps in the AOTInductor package
        if compile_step:
            # torch.compile (a GPU): the rows and the cache length are symbolic, one graph for every step.
            options = {"pattern_matcher": False}
            self.step_rows = torch.compile(self.decode_step, dynamic=True, fullgraph=True, options=options)

    def free_seats(self) -> int:
        return self.seats.count(None) - len(self.encoding)

    def busy_seats(self) -> int:
        """Seats taken: captions being written, and images being encoded for them."""
        return len(self.seats) - self.free_seats()

    def decoding(self) -> int:
        return len(self.seats) - self.seats.count(None)

    def release(self, ticket: object) -> None:
        """Free the ticket's seat (its caller is gone): the next image may take it."""
        for index, seat in enumerate(self.seats):
            if seat is not None and seat.ticket is ticket:
                self.seats[index] = None
        self.encoding = [image for image in self.encoding if image.ticket is not ticket]

    @torch.inference_mode()
    def join(
        self,
        tickets: list[object],
        pixel_values: torch.Tensor,
        prompts: list[list[int]],
        limits: list[tuple[int, int]],
        priorities: list[float] | None = None,
        encode_now: bool = True,
    ) -> None:
        """Take a seat for each ticket's image (at most free_seats()): `prompts` are the decoder's
        start tokens ([DEC] + prompt), `limits` (max_new_tokens, min_new_tokens). With `encode_now`
        the images are encoded and seated here; else their encoding waits for `encode` (in the
        order of `priorities`, smallest first). Their captions start at the next step."""
        if len(tickets) > self.free_seats():
            raise ValueError(f"{len(tickets)} images for {self.free_seats()} free seats")
        # Not piecewise: the embeddings run in by_layer's first piece, or in the whole tower.
        hidden = self.vision.embeddings(pixel_values) if self.piecewise else pixel_values
        for row, ticket in enumerate(tickets):
            priority = priorities[row] if priorities else 0.0
            self.encoding.append(Encoding(ticket, prompts[row], limits[row], priority, hidden[row : row + 1]))
        if encode_now:
            self.encode()

    @torch.inference_mode()
    def encode(
        self, budget_s: float | None = None, spread: set | frozenset = frozenset(), turn_s: float | None = None
    ) -> None:
        """Run the waiting images through the vision tower's layers, in priority order (smallest
        first), the images of tickets in `spread` last: all of them, or, with `budget_s`, the
        images in `spread` only for that long on average; and with `turn_s`, any images only for
        about that long, so that no call holds the model for longer (waiting images would
        otherwise run whole in one call of seconds). A call runs at least one image through one
        layer (and, after the last layer, its seating), which can take longer than a budget:
        while captions are being written, the time beyond it is owed, and later calls pay it back
        before they run any spread work. Images at the same layer run as one batch. Seats the
        images that came through."""
        waiting = any(image.ticket in spread for image in self.encoding)
        owing = budget_s is not None and waiting and self.decoding() > 0
        if not owing:  # no budget, nothing spread waiting, or no caption to keep moving: nothing owed
            self.spread_owed = 0.0
        allowance = None if budget_s is None else budget_s - self.spread_owed
        started, spent, ran = time.perf_counter(), 0.0, False
        while self.encoding:
            elapsed = time.perf_counter() - started
            if turn_s is not None and ran and elapsed >= turn_s:
                break
            self.encoding.sort(key=lambda image: (image.ticket in spread, image.priority))
            first = self.encoding[0]
            spread_first = first.ticket in spread
            pieces = self.pieces_for(first, spread)
            limited = allowance is not None and spread_first
            if limited and (allowance < 0 or (spent and spent >= allowance)):
                break  # the spread images wait for the next calls
            group = [
                image
                for image in self.encoding
                if image.layer == first.layer
                and (image.ticket in spread) == spread_first
                and self.pieces_for(image, spread) is pieces
            ]
            room = [allowance - spent] if limited else []
            room += [turn_s - elapsed] if turn_s is not None else []
            piece_s = self.piece_s.get(id(pieces))
            if room and piece_s:
                group = group[: max(1, int(min(room) / piece_s))]
            before = time.perf_counter()
            hidden = pieces[first.layer](torch.cat([image.hidden for image in group]))
            for row, image in enumerate(group):
                image.hidden, image.layer, image.pieces = hidden[row : row + 1], image.layer + 1, pieces
            self.piece_s[id(pieces)], ran = (time.perf_counter() - before) / len(group), True
            through = [image for image in self.encoding if image.pieces and image.layer == len(image.pieces)]
            if through:
                self.encoding = [image for image in self.encoding if image not in through]
                embeds = torch.cat([image.hidden for image in through])
                self.seat(
                    [image.ticket for image in through],
                    embeds,
                    [image.prompt for image in through],
                    [image.limits for image in through],
                )
            if limited:
                spent += time.perf_counter() - before  # the layer, and the seating of the images it finished
        if owing:
            self.spread_owed = max(0.0, spent - allowance) if allowance >= 0 else -allowance

    def pieces_for(self, image: Encoding, spread: set | frozenset) -> list:
        """The pieces an image goes through: those it started on, else the whole tower where it is
        compiled as a whole and the image is not spread, else the layers."""
        if image.pieces is not None:
            return image.pieces
        return self.whole if not self.piecewise and image.ticket not in spread else self.by_layer

    def layer_pieces(self) -> list:
        """BlipVisionModel's forward as pieces, one a layer: the first starts with the embeddings
        (where `join` did not run them: not `piecewise`), the last ends with the post-layernorm."""
        layers = list(self.vision.encoder.layers)
        pieces = list(layers)
        pieces[0] = lambda hidden: layers[0](hidden if self.piecewise else self.vision.embeddings(hidden))
        last = pieces[-1]
        pieces[-1] = lambda hidden: self.vision.post_layernorm(last(hidden))
        return pieces

    def whole_tower(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower as one piece: pixels -> its last hidden state (post-layernorm included)."""
        return self.vision(pixel_values=pixel_values)[0]

    def seat(
        self, tickets: list[object], image_embeds: torch.Tensor, prompts: list[list[int]], limits: list[tuple[int, int]]
    ) -> None:
        """Seat each image with what its captions attend to: every decoder layer's cross-attention
        keys and values over the image's tokens, computed as BlipTextSelfAttention computes them,
        in `image_dtype`."""
        embeds = image_embeds.to(self.image_dtype)
        shape = (*embeds.shape[:-1], self.heads, self.head_dim)
        keys = [key(embeds).view(shape).transpose(1, 2) for key, _ in self.image_projections]
        values = [value(embeds).view(shape).transpose(1, 2) for _, value in self.image_projections]
        if not self.cross_keys:
            every_seat = (len(self.seats), *keys[0].shape[1:])
            self.cross_keys = [keys[0].new_zeros(every_seat) for _ in self.layers]
            self.cross_values = [keys[0].new_zeros(every_seat) for _ in self.layers]
        self.grow(max(len(prompt) + most for prompt, (most, _) in zip(prompts, limits)), keys[0])
        for row, ticket in enumerate(tickets):
            max_new_tokens, min_new_tokens = limits[row]
            index = self.seats.index(None)
            self.seats[index] = Seat(ticket, list(prompts[row]), max_new_tokens, min_new_tokens)
            for layer in range(len(self.layers)):
                self.cross_keys[layer][index] = keys[layer][row]
                self.cross_values[layer][index] = values[layer][row]

    def pick(self, seats: list[Seat], logits: torch.Tensor) -> None:
        """Each seat's next token: its prompt's next one while it reads its prompt, else from its
        row of `logits`, by generate's greedy rules: no end token before min_new_tokens."""
        early = [i for i, seat in enumerate(seats) if seat.generated < seat.min_new_tokens]
        if early:
            logits[early, self.eos] = -math.inf
        for seat, token in zip(seats, logits.argmax(dim=-1).tolist()):
            if seat.reading_prompt:
                seat.tokens.append(seat.prompt[len(seat.tokens)])
                continue
            seat.tokens.append(token)
            seat.stopped = token == self.eos

    @staticmethod
    def finish(seat: Seat) -> Finished:
        return Finished(seat.ticket, seat.tokens, seat.start, seat.stopped)

    def grow(self, positions: int, like: torch.Tensor) -> None:
        """Self-attention buffers for at least `positions` positions, in blocks of CACHE_BLOCK (on
        `like`'s device, in the decoder's dtype)."""
        capacity = self.self_keys[0].shape[2] if self.self_keys else 0
        if positions <= capacity:
            return
        wanted = -(-positions // CACHE_BLOCK) * CACHE_BLOCK
        shape = (len(self.seats), self.heads, wanted, self.head_dim)
        grown = []
        for old in self.self_keys + self.self_values:
            new = old.new_zeros(shape)
            new[:, :, :capacity] = old
            grown.append(new)
        if not grown:
            grown = [like.new_zeros(shape, dtype=self.text_dtype) for _ in range(2 * len(self.layers))]
        self.self_keys, self.self_values = grown[: len(self.layers)], grown[len(self.layers) :]

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        """One token for every seated caption; returns the captions that ended with it."""
        seated = [(index, seat) for index, seat in enumerate(self.seats) if seat is not None]
        self.last_step_rows = len(seated)
        if not seated:
            return []
        started = time.perf_counter()
        rows = seated[-1][0] + 1  # empty seats below the last one run too (their rows are ignored)
        device = self.self_keys[0].device
        tokens = torch.full((rows, 1), self.pad, dtype=torch.long)
        positions = torch.zeros(rows, dtype=torch.long)
        for index, seat in seated:
            tokens[index, 0] = seat.tokens[-1]
            positions[index] = seat.position
        length = -(-(int(positions.max()) + 1) // CACHE_BLOCK) * CACHE_BLOCK
        logits = self.step_rows(
            tokens.to(device),
            positions.to(device),
            torch.empty(length, device=device),
            self.self_keys,
            self.self_values,
            self.cross_keys,
            self.cross_values,
        )
        self.pick([seat for _, seat in seated], logits[[index for index, _ in seated]])
        self.last_step_s = time.perf_counter() - started  # pick's tolist() waited for the device
        finished = []
        for index, seat in seated:
            if seat.done():
                finished.append(self.finish(seat))
                self.seats[index] = None
        return finished

    def attend(self, attention, hidden, keys, values, mask=None):
        """One attention block (BlipTextSelfAttention and its output) for each row's one new token,
        in BlipTextSelfAttention's order of operations."""
        rows = hidden.shape[0]
        query = attention.self.query(hidden).view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
        if keys.dtype != query.dtype:  # `hybrid`'s bf16 image keys and values (`seat`): softmax in fp32
            assert mask is None, "the image's tokens are all visible: no mask"
            scores = torch.matmul(query.to(keys.dtype), keys.transpose(-1, -2)).float() / math.sqrt(self.head_dim)
            context = torch.matmul(scores.softmax(dim=-1).to(values.dtype), values).to(query.dtype)
        else:
            scores = torch.matmul(query, keys.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            context = torch.matmul(scores.softmax(dim=-1), values)
        context = context.transpose(1, 2).reshape(rows, 1, self.heads * self.head_dim)
        return attention.output(context, hidden)

    def decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        span: torch.Tensor,
        self_keys: list[torch.Tensor],
        self_values: list[torch.Tensor],
        cross_keys: list[torch.Tensor],
        cross_values: list[torch.Tensor],
    ) -> torch.Tensor:
        """Logits for the token after each row's `tokens` (rows, 1) at its own position (rows,);
        writes each row's new key and value into the self-attention buffers at that position. The
        buffers come whole (seats, heads, capacity, head_dim): the first `rows` seats and the first
        len(span) positions take part (an exported step reads the sizes from its inputs' shapes)."""
        rows, length = tokens.shape[0], span.shape[0]
        torch._check(rows <= self_keys[0].shape[0])
        torch._check(length <= self_keys[0].shape[2])
        self_keys = [keys[:rows, :, :length] for keys in self_keys]
        self_values = [values[:rows, :, :length] for values in self_values]
        cross_keys = [keys[:rows] for keys in cross_keys]
        cross_values = [values[:rows] for values in cross_values]
        embeddings = self.decoder.bert.embeddings
        hidden = embeddings.word_embeddings(tokens) + embeddings.position_embeddings(positions[:, None])
        hidden = embeddings.LayerNorm(hidden)
        visible = torch.arange(length, device=tokens.device)[None, :] <= positions[:, None]
        mask = torch.where(visible, 0.0, torch.finfo(hidden.dtype).min).to(hidden.dtype).view(rows, 1, 1, length)
        row_index = torch.arange(rows, device=tokens.device)
        for index, layer in enumerate(self.layers):
            own = layer.attention.self
            key = own.key(hidden).view(rows, self.heads, self.head_dim)
            value = own.value(hidden).view(rows, self.heads, self.head_dim)
            self_keys[index][row_index, :, positions] = key
            self_values[index][row_index, :, positions] = value
            hidden = self.attend(layer.attention, hidden, self_keys[index], self_values[index], mask)
            hidden = self.attend(layer.crossattention, hidden, cross_keys[index], cross_values[index])
            hidden = layer.output(layer.intermediate(hidden), hidden)
        return self.decoder.cls(hidden)[:, -1, :].float()
