"""Write a random-weight BLIP (model + processor) to a directory with `save_pretrained`.

    python -m tools.tiny_model DIR          # tiny: for tests, loads in a second
    python -m tools.tiny_model DIR --micro  # BLIP's real 384x384 input, tiny layers: measures the server
    python -m tools.tiny_model DIR --full   # the base architecture (~247M params): for benchmarks

The real weights live on the Hugging Face hub, which this project's machines cannot reach.
Both modes are served through exactly the code path the real model takes.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from blip_serve.shared.model_files import RANDOM_WEIGHTS

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "at",
    "by",
    "near",
    "photography",
    "picture",
    "photo",
    "painting",
    "drawing",
    "dog",
    "dogs",
    "cat",
    "cats",
    "man",
    "woman",
    "child",
    "people",
    "bird",
    "horse",
    "car",
    "bus",
    "train",
    "boat",
    "plane",
    "sitting",
    "standing",
    "running",
    "lying",
    "walking",
    "flying",
    "riding",
    "eating",
    "holding",
    "looking",
    "red",
    "blue",
    "green",
    "white",
    "black",
    "yellow",
    "brown",
    "small",
    "large",
    "big",
    "two",
    "three",
    "table",
    "street",
    "field",
    "grass",
    "water",
    "beach",
    "road",
    "room",
    "bed",
    "couch",
    "tree",
    "sky",
    "snow",
]
LETTERS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")


def tiny_vocab() -> dict[str, int]:
    """A small WordPiece vocabulary: special tokens, words, and letters to spell anything else."""
    tokens = SPECIAL_TOKENS + WORDS + LETTERS + [f"##{c}" for c in LETTERS]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}


SIZES = ("tiny", "micro", "full")


def make_blip(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Save a random BLIP and its processor to `out_dir` and return the path. `size`: "tiny" for
    tests; "micro", the real 384x384 input and patch size with tiny layers, so that the model costs
    almost nothing and a load test measures the server around it; "full", the base architecture."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, not {size!r}")
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    out_dir = Path(out_dir)
    vocab = tiny_vocab()
    # transformers 5.x silently ignores vocab_file=; the vocabulary must be passed as a dict.
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    text_ids = {
        "vocab_size": len(vocab),
        "pad_token_id": vocab["[PAD]"],
        "bos_token_id": vocab["[DEC]"],
        "sep_token_id": vocab["[SEP]"],
        "eos_token_id": vocab["[SEP]"],
    }
    # BLIP's default vision initializer_range (1e-10) makes every image embed alike and so
    # give the same caption; 0.02 (BERT's) makes captions depend on the image.
    if size == "full":
        config = BlipConfig(text_config=text_ids, vision_config={"initializer_range": 0.02})
        image_size = config.vision_config.image_size
    else:
        # micro: 577 patches of the real input, so one layer with one head (~4 ms of CPU an image
        # for 20 tokens on a 2-core Xeon, against ~9 ms for the tiny layout at that size).
        image_size, layers, heads = (384, 1, 1) if size == "micro" else (64, 2, 4)
        config = BlipConfig(
            text_config={
                **text_ids,
                "hidden_size": 32,
                "encoder_hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "max_position_embeddings": 128,
            },
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "image_size": image_size,
                "patch_size": 16,
                "initializer_range": 0.02,
            },
            projection_dim=32,
        )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    if size != "full":
        # At this size the decoder barely listens to the image through cross-attention: widen
        # those weights (and the vision tower's) so that different images get different captions.
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if weight.dim() >= 2 and ("vision_model" in name or "crossattention" in name):
                    weight.normal_(0.0, 0.3 if "crossattention" in name else 0.1)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / RANDOM_WEIGHTS).write_text("random weights from tools.tiny_model: the captions are gibberish\n")
    logger.info("wrote a %s random BLIP to %s", size, out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    kinds = parser.add_mutually_exclusive_group()
    kinds.add_argument("--full", action="store_true", help="base architecture (BlipConfig defaults)")
    kinds.add_argument("--micro", action="store_true", help="384x384 input, tiny layers: a near-free model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_blip(args.out_dir, "full" if args.full else "micro" if args.micro else "tiny", seed=args.seed)


if __name__ == "__main__":
    main()
