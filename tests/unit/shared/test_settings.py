"""Settings: validated once, with one line naming each bad variable; the README table in step."""

from __future__ import annotations

import os
import re
import sys

import pytest

from blip_serve.model.devices import pick_compile, pick_precision
from blip_serve.shared.settings import BadSetting, Settings, cxx_compiler, load_settings
from support.tools import require
from tools.servers import REPO

README = REPO / "README.md"


def test_defaults():
    settings = load_settings({})
    assert settings.model == ""  # the stored model if any, else DEFAULT_MODEL
    assert settings.max_upload_bytes == 10 * 1024 * 1024
    assert settings.tracing is False


def test_values_come_from_blip_variables():
    settings = load_settings(
        {"BLIP_MODEL": "/models/blip", "BLIP_MAX_BATCH_SIZE": "4", "BLIP_TRACING": "1", "OTHER": "x"}
    )
    assert (settings.model, settings.max_batch_size, settings.tracing) == ("/models/blip", 4, True)


def test_the_process_environment_is_read(monkeypatch):
    monkeypatch.setenv("BLIP_MAX_BEAMS", "2")
    monkeypatch.setenv("BLIP_MODEL", "")  # empty: unset, as compose's ${BLIP_MODEL:-} passes it
    assert (load_settings().max_beams, load_settings().model) == (2, "")


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"BLIP_PRECISION": "fp8"}, "BLIP_PRECISION='fp8': must be one of auto, fp32, bf16, hybrid or fp16"),
        ({"BLIP_MAX_BATCH_SIZE": "0"}, "BLIP_MAX_BATCH_SIZE='0': input should be greater than or equal to 1"),
        ({"BLIP_DEVICE": "tpu"}, "BLIP_DEVICE='tpu': must be one of auto, cpu or cuda"),
        ({"BLIP_MAX_BATCH_SIZE": "lots"}, "BLIP_MAX_BATCH_SIZE='lots': input should be a valid integer"),
        ({"BLIP_TRACING": "maybe"}, "BLIP_TRACING='maybe': input should be a valid boolean"),
        ({"BLIP_MAX_NEW_TOKENS": "500"}, "BLIP_MAX_NEW_TOKENS=500 is more than BLIP_MAX_NEW_TOKENS_LIMIT=100"),
    ],
)
def test_a_bad_value_is_one_line_naming_variable_value_and_what_is_allowed(environ, message):
    with pytest.raises(BadSetting) as raised:
        load_settings(environ)
    text = str(raised.value)
    assert message in text and "\n" not in text


@pytest.mark.parametrize(
    "name, meant",
    [("BLIP_MAX_BATCH", "BLIP_MAX_BATCH_SIZE"), ("BLIP_PRECSION", "BLIP_PRECISION"), ("blip_devices", "BLIP_DEVICE")],
)
def test_a_mistyped_setting_is_refused_with_the_name_it_is_close_to(name, meant):
    with pytest.raises(BadSetting) as raised:
        load_settings({name: "4"})
    assert str(raised.value) == f"invalid settings: {name}: no such setting (did you mean {meant}?)"


def test_other_blip_variables_are_not_taken_for_typos():
    """The client's, compose's and the scripts' own BLIP_* variables, and names far from any setting."""
    environ = {
        "BLIP_SERVER_URL": "http://h:1",
        "BLIP_IMAGE": "blip-serve:gpu",
        "BLIP_HTTP_PORT": "8080",
        "BLIP_BENCH_SECONDS": "60",
        "BLIP_MAX_LATENCY_MS": "100",
        "BLIP_SOMETHING_ELSE": "x",
    }
    assert load_settings(environ) == load_settings({})


def test_every_bad_variable_is_named_at_once():
    with pytest.raises(BadSetting, match="BLIP_DEVICE=.*; BLIP_ATTENTION="):
        load_settings({"BLIP_DEVICE": "tpu", "BLIP_ATTENTION": "flash"})


def test_the_readme_table_documents_exactly_the_settings():
    documented = set(re.findall(r"^\| `BLIP_([A-Z0-9_]+)` \|", README.read_text(), flags=re.MULTILINE))
    assert documented == {name.upper() for name in Settings.model_fields}


def test_each_model_worker_gets_its_own_gpu_or_a_share_of_the_cores(monkeypatch):
    import os

    import torch

    from blip_serve.model.devices import pick_device, pick_torch_threads

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [pick_device("auto", worker) for worker in (1, 2, 3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert pick_device("cpu", 2) == "cpu"
    cores = len(os.sched_getaffinity(0))
    assert pick_torch_threads(0, workers=2) == max(1, cores // 2) and pick_torch_threads(3, workers=2) == 3


def test_auto_precision_is_fp16_on_cuda():
    assert pick_precision("auto", "cuda:1") == "fp16"
    assert pick_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx2", "fma", "avx512f", "avx512_vnni"}, "fp32"),  # bf16 emulated: 3.8x slower than fp32
        ({"avx512f", "avx512_bf16"}, "hybrid"),  # AMD EPYC (Zen 4): 1.54 against 0.92 img/s
        ({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "hybrid"),
        (set(), "fp32"),  # no /proc/cpuinfo
    ],
)
def test_auto_precision_on_a_cpu_is_bf16_where_it_multiplies_bf16_natively(monkeypatch, flags, expected):
    from blip_serve.model import devices

    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    assert pick_precision("auto", "cpu") == expected
    assert pick_precision("fp32", "cpu") == "fp32"


@pytest.mark.parametrize(
    "value, expected", [("auto", "auto"), ("on", "on"), ("true", "on"), ("1", "on"), ("False", "off"), ("0", "off")]
)
def test_compile_is_auto_on_or_off_and_takes_its_old_true_false(value, expected):
    assert load_settings({"BLIP_COMPILE": value}).compile == expected


def test_a_bad_compile_value_names_what_is_allowed():
    with pytest.raises(BadSetting, match="BLIP_COMPILE='sometimes': must be one of auto, on or off"):
        load_settings({"BLIP_COMPILE": "sometimes"})


def test_compile_on_without_a_cxx_compiler_is_refused_at_start(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")  # as in a slim container: no compiler at all
    with pytest.raises(BadSetting) as raised:
        load_settings({"BLIP_COMPILE": "on"})
    assert str(raised.value) == (
        "invalid settings: BLIP_COMPILE=on needs a C++ compiler, and none was found ($CXX, else g++ on the "
        "PATH): install g++ (Debian: apt-get install g++), or set BLIP_COMPILE=auto or off"
    )
    assert load_settings({"BLIP_COMPILE": "auto"}).compile == "auto"  # auto serves uncompiled there


def test_compile_on_with_a_cxx_compiler_is_taken(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    require(cxx_compiler() is not None, "g++ (apt-get install g++)")
    assert load_settings({"BLIP_COMPILE": "on"}).compile == "on"


def test_auto_compiles_wherever_the_precision_is_not_the_exact_fp32():
    assert pick_compile("auto", "cpu", "fp32") is False  # the exact path, and too little gain on a CPU
    assert pick_compile("auto", "cuda:0", "fp32") is False
    assert pick_compile("auto", "cuda:0", "fp16") is True
    assert pick_compile("auto", "cpu", "hybrid") is True  # AMX
    assert pick_compile("on", "cpu", "fp32") is True and pick_compile("off", "cuda:0", "fp16") is False


@pytest.mark.parametrize(
    "value, is_path",
    [
        ("Salesforce/blip-image-captioning-base", False),
        ("blip", False),
        ("./models/tiny", True),
        ("/srv/blip", True),
        ("~/blip", True),
        ("models/blip/base", True),  # hub ids have one slash at most
        ("my model", True),
        ("tests/whatever", True),  # tests/ exists here: a path on its way
    ],
)
def test_a_model_setting_that_looks_like_a_path(value, is_path):
    from blip_serve.shared.model_files import looks_like_a_path

    assert looks_like_a_path(value) == is_path


def test_the_version_is_written_once():
    import tomllib

    from blip_serve import __version__

    with open("pyproject.toml", "rb") as project:
        assert tomllib.load(project)["project"]["version"] == __version__


@pytest.mark.parametrize(
    "argv, environ, address",
    [
        ([], {}, ("0.0.0.0", 3000)),
        (["--port", "3001"], {}, ("0.0.0.0", 3001)),
        (["blip-serve:latest", "-p", "8080", "--host=127.0.0.1"], {}, ("127.0.0.1", 8080)),
        (["--port=9000"], {"BENTOML_PORT": "7000"}, ("0.0.0.0", 9000)),
        (["-p7001"], {}, ("0.0.0.0", 7001)),
        ([], {"BENTOML_PORT": "7000", "BENTOML_HOST": "::1"}, ("::1", 7000)),
    ],
)
def test_the_address_bentoml_serve_will_listen_on(argv, environ, address):
    from blip_serve.host.home_lock import serve_address

    assert serve_address(argv, environ) == address


def test_the_home_lock_refuses_a_live_holder_and_takes_a_stale_one(tmp_path):
    import subprocess

    from blip_serve.host import home_lock

    (tmp_path / home_lock.LOCK_NAME).write_text("999999999")  # no such process: stale
    home_lock.take(tmp_path)
    assert (tmp_path / home_lock.LOCK_NAME).read_text() == str(os.getpid())
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "bentoml"])
    try:
        (tmp_path / home_lock.LOCK_NAME).write_text(str(holder.pid))
        with pytest.raises(home_lock.HomeInUse, match=f"another blip-serve server \\(pid {holder.pid}\\)"):
            home_lock.take(tmp_path)
    finally:
        holder.kill()
        holder.wait()


def test_the_request_time_budget_has_one_home():
    """BLIP_REQUEST_TIMEOUT_S's default lives in settings.py; every proxy and client in the tree
    waits 10 s longer, so that the server's own JSON 504 is what a client sees. Config files
    cannot import Python: their values are held to the one home here."""
    import yaml

    from blip_serve.client.library import TIMEOUT_S

    repo = REPO
    budget = Settings().request_timeout_s
    proxy_wait = budget + 10
    nginx = (repo / "nginx" / "nginx.conf").read_text()
    assert set(re.findall(r"proxy_(?:read|send)_timeout (\d+)s;", nginx)) == {str(proxy_wait)}
    ingresses = list(yaml.safe_load_all((repo / "k8s/components/ingress/ingress.yaml").read_text()))
    for ingress in ingresses:
        annotations = ingress["metadata"]["annotations"]
        assert annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"] == str(proxy_wait)
        assert annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"] == str(proxy_wait)
    kustomization = yaml.safe_load((repo / "k8s/base/kustomization.yaml").read_text())
    literals = [literal for generator in kustomization["configMapGenerator"] for literal in generator["literals"]]
    assert f"BLIP_REQUEST_TIMEOUT_S={budget}" in literals
    assert proxy_wait == TIMEOUT_S
    # The comments that quote the numbers say the same.
    for path in ("nginx/nginx.conf", "k8s/base/deployment.yaml", "k8s/components/ingress/kustomization.yaml"):
        quoted = re.findall(r"(\d+) s\b", (repo / path).read_text())
        assert set(quoted) <= {str(budget), str(proxy_wait)}, (path, quoted)
