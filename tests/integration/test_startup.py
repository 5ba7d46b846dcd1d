"""`bentoml serve` that cannot start says why in one line, within seconds: a bad setting, or no
model (the hub unreachable and no BLIP_MODEL)."""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest

from tools.servers import BENTOML, REPO, bento_server, free_port

pytestmark = pytest.mark.slow


def serve(env: dict[str, str], home) -> tuple[int, str, float]:
    environ = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", **env}
    started = time.monotonic()
    result = subprocess.run(
        [BENTOML, "serve", "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


@pytest.mark.parametrize(
    "variable, value, allowed",
    [
        ("BLIP_PRECISION", "fp8", "must be one of auto, fp32, bf16, hybrid or fp16"),
        ("BLIP_MAX_BATCH_SIZE", "0", "input should be greater than or equal to 1"),
        ("BLIP_DEVICE", "tpu", "must be one of auto, cpu or cuda"),
    ],
)
def test_a_bad_setting_stops_the_server_with_one_line(tiny_model_dir, tmp_path, variable, value, allowed):
    code, output, elapsed = serve({"BLIP_MODEL": tiny_model_dir, variable: value}, tmp_path)
    assert code != 0
    assert output.strip() == f"invalid settings: {variable}={value!r}: {allowed}"
    assert elapsed < 30


def test_compile_on_without_a_cxx_compiler_stops_the_server_with_one_line(tiny_model_dir, tmp_path):
    env = {"BLIP_MODEL": tiny_model_dir, "BLIP_COMPILE": "on", "CXX": "/nonexistent/g++"}
    code, output, elapsed = serve(env, tmp_path)
    assert code != 0 and elapsed < 30
    assert output.strip().startswith("invalid settings: BLIP_COMPILE=on needs a C++ compiler, and none was found")


def test_no_hub_and_no_model_says_what_to_do(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: the hub is unreachable
    env = {"HF_ENDPOINT": closed, "BLIP_MODEL": ""}
    code, output, elapsed = serve(env, tmp_path)  # an empty BENTOML_HOME: no stored model either
    lines = [line for line in output.strip().splitlines() if "torchvision" not in line]
    assert code != 0 and len(lines) == 1, output
    assert lines[0].startswith("could not download Salesforce/blip-image-captioning-base from the Hugging Face hub")
    assert "Set BLIP_MODEL to a local BLIP directory" in lines[0]
    assert "python -m tools.tiny_model models/tiny" in lines[0]
    assert "Traceback" not in output and elapsed < 60


def test_a_mistyped_model_path_is_no_such_directory(tmp_path):
    code, output, elapsed = serve({"BLIP_MODEL": "./modles/tiny"}, tmp_path)
    lines = [line for line in output.strip().splitlines() if "torchvision" not in line]
    assert code != 0 and len(lines) == 1, output
    assert lines[0].startswith("BLIP_MODEL='./modles/tiny': no such model directory (")
    assert lines[0].endswith("/modles/tiny does not exist)") and elapsed < 60


def one_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if "torchvision" not in line]
    assert len(lines) == 1, output
    return lines[0]


def test_a_folder_without_a_model_stops_the_start(tmp_path):
    """Before: the model worker failed to load, and was restarted forever (/readyz never answered)."""
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "notes.txt").write_text("no model here")
    code, output, elapsed = serve({"BLIP_MODEL": str(empty)}, tmp_path / "home")
    assert code != 0 and elapsed < 30
    assert one_line(output) == (
        f"BLIP_MODEL={str(empty)!r}: {empty} holds no saved model (save_pretrained writes config.json and "
        "model.safetensors or pytorch_model.bin): point it at the model's own folder"
    )


def test_cuda_asked_where_torch_sees_no_gpu_stops_the_start(tiny_model_dir, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: BLIP_DEVICE=cuda is right here")
    code, output, elapsed = serve({"BLIP_MODEL": tiny_model_dir, "BLIP_DEVICE": "cuda"}, tmp_path)
    assert code != 0 and elapsed < 30
    line = one_line(output)
    assert line.startswith(f"BLIP_DEVICE='cuda': torch sees no CUDA GPU (torch {torch.__version__}, ")
    assert line.endswith("or set BLIP_DEVICE=auto or cpu")
    if torch.version.cuda is None:
        assert "a CPU-only build: install requirements-gpu.txt" in line


def test_a_mistyped_setting_stops_the_start(tiny_model_dir, tmp_path):
    code, output, elapsed = serve({"BLIP_MODEL": tiny_model_dir, "BLIP_MAX_BATCH": "4"}, tmp_path)
    assert code != 0 and elapsed < 30
    assert one_line(output) == "invalid settings: BLIP_MAX_BATCH: no such setting (did you mean BLIP_MAX_BATCH_SIZE?)"


def test_a_port_in_use_is_one_line_naming_the_fix(tiny_model_dir, tmp_path):
    """Before: 57 lines of BentoML's traceback."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        environ = {**os.environ, "BENTOML_HOME": str(tmp_path), "BLIP_MODEL": tiny_model_dir}
        started = time.monotonic()
        result = subprocess.run(
            [BENTOML, "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=environ, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode != 0 and time.monotonic() - started < 30
    assert one_line(result.stdout + result.stderr) == (
        f"port {port} on 127.0.0.1 is in use (another server?): serve on another with "
        f"`bentoml serve --port {port + 1}`, or find what holds it: ss -ltnp 'sport = :{port}'"
    )


def test_a_name_that_could_be_either_says_both(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    code, output, _ = serve({"HF_ENDPOINT": closed, "BLIP_MODEL": "modles/tiny"}, tmp_path)
    lines = [line for line in output.strip().splitlines() if "torchvision" not in line]
    assert code != 0 and len(lines) == 1, output
    assert lines[0].startswith("could not download modles/tiny from the Hugging Face hub")
    assert "It is no local directory either (" in lines[0] and "/modles/tiny does not exist)" in lines[0]


def test_readyz_answers_at_once_while_the_model_loads(tiny_model_dir, tmp_path):
    """A startup probe polling every 0.2 s from the process's start, with a 1 s timeout: once the API
    worker answers at all, every answer comes within the second, 503 until the model is loaded, then
    200, never a 500. (Before that, BentoML's supervisor holds the port while the worker imports the
    service: a probe then waits for the worker, as for any server whose port opens before it serves.)"""
    server = bento_server({"BLIP_MODEL": tiny_model_dir}, tmp_path / "bentoml.log")
    server.log = open(server.log_path, "wb")  # noqa: SIM115  (closed by stop)
    server.process = subprocess.Popen(
        server.command, cwd=REPO, env=server.env, stdout=server.log, stderr=subprocess.STDOUT, start_new_session=True
    )
    seen, slowest_answer = [], 0.0
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and 200 not in seen:
            started = time.monotonic()
            try:
                status = httpx.get(f"{server.url}/readyz", timeout=1.0).status_code
            except httpx.ConnectError:
                status = None  # not listening yet
            except httpx.TimeoutException:
                status = "timeout"
            if any(isinstance(earlier, int) for earlier in seen):
                slowest_answer = max(slowest_answer, time.monotonic() - started)
            seen.append(status)
            time.sleep(0.2)
        livez = httpx.get(f"{server.url}/livez", timeout=1.0).status_code
    finally:
        server.stop()
    answered = [status for status in seen if isinstance(status, int)]
    first = seen.index(answered[0])
    assert "timeout" not in seen[first:] and 500 not in seen, seen
    assert set(answered) <= {200, 503} and answered[-1] == 200, seen
    assert 503 in answered  # it answered while loading, and said not yet
    assert slowest_answer < 1.0 and livez == 200, (slowest_answer, seen)


def test_a_second_server_under_the_same_home_stops_and_the_first_keeps_its_metrics(tiny_model_dir, tmp_path):
    home = tmp_path / "home"
    first = bento_server({"BLIP_MODEL": tiny_model_dir, "BENTOML_HOME": str(home)}, tmp_path / "first.log").start()
    try:
        image = (REPO / "examples" / "sample.jpg").read_bytes()
        assert httpx.post(f"{first.url}/caption", files={"file": image}, timeout=60).status_code == 200
        code, output, elapsed = serve({"BLIP_MODEL": tiny_model_dir}, home)
        lines = [line for line in output.strip().splitlines() if "torchvision" not in line]
        assert code != 0 and len(lines) == 1, output
        assert lines[0].startswith(f"another blip-serve server (pid {first.process.pid}) uses BENTOML_HOME={home}")
        metrics = httpx.get(f"{first.url}/metrics", timeout=10).text
        assert 'endpoint="/caption"' in metrics and "blip_batch_size_count 1.0" in metrics
    finally:
        first.stop()
    assert not (home / "blip-serve.pid").exists()  # released at exit
