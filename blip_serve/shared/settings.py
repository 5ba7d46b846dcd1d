"""Every setting of the server, read once from `BLIP_*` environment variables and validated.

The README's configuration table documents each one (a test keeps the two in step). A bad value
stops the server at start with one line naming the variable, the value and what is allowed; so
does a BLIP_* variable whose name is a near miss of a setting's.
"""

from __future__ import annotations

import difflib
import os
import shutil
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BLIP_", env_ignore_empty=True, frozen=True, extra="ignore")

    # The model and how it runs
    model: str = ""  # local directory or hub id; empty: the stored model, else DEFAULT_MODEL
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "hybrid", "fp16"] = "auto"
    attention: Literal["sdpa", "eager"] = "sdpa"
    torch_threads: int = Field(0, ge=0, le=1024)  # 0: one per core the model process may use
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile the decoder step (and on a CPU the vision tower)
    compile_cache: str = ""  # a directory for torch.compile's artifacts, kept across restarts; empty: torch's default
    api_workers: int = Field(1, ge=1, le=256)  # API service processes (decode + resize)
    model_workers: int = Field(1, ge=1, le=64)  # model processes: one per GPU; on a CPU they split the cores
    # Sequences (images x beams) in one generate; 16 did the most images a second on a CPU.
    max_batch_size: int = Field(16, ge=1, le=4096)
    max_queued_images: int = Field(0, ge=0)  # waiting for the model; 0: 8 x max_batch_size, at least a /captions

    # What a request may ask for
    max_new_tokens: int = Field(30, ge=1)
    min_new_tokens: int = Field(0, ge=0)  # benchmarks force a fixed caption length with it
    max_new_tokens_limit: int = Field(100, ge=1)  # clamped to what the model's positions allow
    max_beams: int = Field(4, ge=1, le=64)
    max_prompt_chars: int = Field(200, ge=0)

    # What an upload may cost
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024)  # one image; a /caption body
    max_files_per_request: int = Field(32, ge=1, le=1024)  # images in one POST /captions
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024)  # a /captions body
    max_reading_bytes: int = Field(256 * 1024 * 1024, ge=1024)  # bodies being read and decoded, per API worker
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_image_side: int = Field(12_000, ge=1)
    jpeg_draft: bool = False  # decode JPEGs at a reduced DCT scale: faster, not bit-exact
    gpu_decode: bool = False  # baseline JPEGs decoded and resized on the model's device (nvJPEG): not bit-exact
    decode_processes: int = Field(0, ge=0, le=256)  # per API worker, for small images; 0: one per core
    max_concurrent_decodes: int = Field(0, ge=0, le=256)  # large (over 4 MP) decodes at once; 0: half the cores
    decode_cpu_s: float = Field(10.0, gt=0, le=3600)  # CPU seconds for a max_image_pixels decode; in proportion below
    decode_memory_mb: int = Field(1024, ge=64)  # memory one upload's decode may take

    # Time limits
    request_timeout_s: int = Field(120, ge=1)
    drain_s: float = Field(5.0, ge=0)  # after SIGTERM: serve on with /readyz 503 this long, then finish
    body_timeout_s: float = Field(60.0, gt=0)  # the whole body must arrive within this
    header_timeout_s: float = Field(10.0, gt=0)  # a connection must send its headers within this

    # The OpenAI-compatible routes (/v1/...)
    served_model_name: str = ""  # the model id /v1/models lists; empty: the hub id, directory name or stored model
    fetch_url_hosts: str = ""  # host names whose image URLs /v1/chat/completions fetches, comma-separated; empty: none
    fetch_timeout_s: float = Field(10.0, gt=0, le=300)  # for a whole fetched image
    fetch_allow_private: bool = False  # fetch from private and local addresses too (an image store on your network)

    api_key: str = ""  # empty: the caption routes are open
    tracing: bool = False  # BentoML's OpenTelemetry middleware retains spans: off unless asked

    @field_validator("compile", mode="before")
    @classmethod
    def compile_as_switch(cls, value):
        """BLIP_COMPILE=true/false (its values before `auto`) still mean on/off."""
        if isinstance(value, bool):
            return "on" if value else "off"
        words = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}
        return words.get(str(value).strip().lower(), value)

    def fetch_hosts(self) -> frozenset[str]:
        return frozenset(host.strip().lower() for host in self.fetch_url_hosts.split(",") if host.strip())

    def chat_body_bytes(self) -> int:
        """The largest /v1/chat/completions body: the image in base64 (a third larger) and 1 MB of
        messages."""
        return self.max_upload_bytes * 4 // 3 + 1024 * 1024

    def queued_images_limit(self) -> int:
        """BLIP_MAX_QUEUED_IMAGES, or its default: a few batches, and never less than one /captions."""
        return self.max_queued_images or max(8 * self.max_batch_size, self.max_files_per_request)

    def model_post_init(self, context) -> None:
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"BLIP_MAX_NEW_TOKENS={self.max_new_tokens} is more than "
                f"BLIP_MAX_NEW_TOKENS_LIMIT={self.max_new_tokens_limit}"
            )
        if self.compile == "on" and not cxx_compiler():
            raise ValueError(
                "BLIP_COMPILE=on needs a C++ compiler, and none was found ($CXX, else g++ on the PATH): "
                "install g++ (Debian: apt-get install g++), or set BLIP_COMPILE=auto or off"
            )
        if self.max_queued_images and self.max_queued_images < self.max_files_per_request:
            raise ValueError(
                f"BLIP_MAX_QUEUED_IMAGES={self.max_queued_images} is less than "
                f"BLIP_MAX_FILES_PER_REQUEST={self.max_files_per_request}: a full /captions could never be queued"
            )


def cxx_compiler() -> str | None:
    """The C++ compiler torch's inductor would run to compile the model ($CXX, else g++): a slim
    container has none, and compiling would fail after the model loaded, at every restart."""
    return shutil.which(os.environ.get("CXX") or "g++")


class BadSetting(SystemExit):
    """Raised at start for an invalid BLIP_* value; its text is the one line the operator sees."""


# BLIP_* names that other parts of the project read (the client and notebook, compose, the
# container and benchmark scripts), or that the server no longer reads: never a mistyped setting.
OTHER_BLIP_VARIABLES = {"BLIP_SERVER_URL", "BLIP_IMAGE_DIR", "BLIP_HTTP_PORT", "BLIP_IMAGE", "BLIP_BASE_IMAGE"}
RETIRED_SETTINGS = {"BLIP_MAX_LATENCY_MS"}  # replaced by BLIP_MAX_QUEUED_IMAGES (README)


def mistyped_names(environ) -> list[str]:
    """`BLIP_NAME: no such setting (did you mean ...?)` for each BLIP_* variable that is no setting
    but close to one: a typo would otherwise be ignored without a word."""
    known = [f"BLIP_{name.upper()}" for name in Settings.model_fields]
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith("BLIP_") or upper in known or upper.startswith("BLIP_BENCH_"):
            continue
        if upper in OTHER_BLIP_VARIABLES | RETIRED_SETTINGS:
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
        if close:
            found.append(f"{name}: no such setting (did you mean {close[0]}?)")
    return found


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Settings from the environment (or `environ`); BadSetting names every bad variable."""
    typos = mistyped_names(os.environ if environ is None else environ)
    if typos:
        raise BadSetting("invalid settings: " + "; ".join(typos))
    try:
        if environ is None:
            return Settings()
        # pydantic-settings reads os.environ; a given mapping is passed as values instead.
        values = {
            name.removeprefix("BLIP_").lower(): value
            for name, value in environ.items()
            if name.startswith("BLIP_") and value != ""
        }
        return Settings(**values)
    except ValidationError as exc:
        raise BadSetting("invalid settings: " + "; ".join(describe(error) for error in exc.errors())) from None


def describe(error: dict) -> str:
    """One pydantic error as `BLIP_NAME='value': what is allowed`."""
    message = error.get("msg", "invalid value")
    if not error.get("loc"):  # a check across fields (model_post_init) names its own variables
        return message.removeprefix("Value error, ")
    name = "BLIP_" + "_".join(str(part) for part in error["loc"]).upper()
    if error.get("type") == "literal_error":
        message = "must be one of " + message.removeprefix("Input should be ").replace("'", "")
    else:
        message = message[0].lower() + message[1:]
    return f"{name}={error.get('input')!r}: {message}"
