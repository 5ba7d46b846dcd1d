import pytest

from blip_serve.model import pick_precision
from blip_serve.settings import Settings


def test_defaults():
    settings = Settings.from_env({})
    assert settings.model == ""  # the stored model if any, else DEFAULT_MODEL
    assert settings.max_upload_bytes == 10 * 1024 * 1024


def test_values_come_from_blip_variables():
    settings = Settings.from_env({"BLIP_MODEL": "/models/blip", "BLIP_MAX_BATCH_SIZE": "4", "BLIP_TORCH_THREADS": "0"})
    assert (settings.model, settings.max_batch_size, settings.torch_threads) == ("/models/blip", 4, 0)


def test_a_bad_integer_names_its_variable():
    with pytest.raises(ValueError, match="BLIP_MAX_BATCH_SIZE"):
        Settings.from_env({"BLIP_MAX_BATCH_SIZE": "lots"})


def test_auto_precision_is_fp16_on_cuda_and_a_bad_name_is_refused():
    assert pick_precision("auto", "cuda") == "fp16"
    with pytest.raises(ValueError, match="BLIP_PRECISION"):
        pick_precision("fp8", "cpu")
