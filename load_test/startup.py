"""Start-to-ready: seconds from `bentoml serve` to /readyz 200, with BLIP_COMPILE on, first with an
empty BLIP_COMPILE_CACHE (compiling) and then again with the packages the first start left (warm),
and without compiling for comparison. Each start is the real server, stopped before the next.

    python -m load_test.startup --model /path/to/blip --starts 2
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from tools.servers import bento_server


def start_to_ready(env: dict[str, str], log: Path) -> dict:
    server = bento_server(env, log)
    started = time.perf_counter()
    server.start(timeout=3600)
    try:
        ready_s = time.perf_counter() - started
        text = server.log_text()
    finally:
        server.stop()
    compiled = re.search(r"BLIP_COMPILE: ready in (\d+) s \(([^;]*);", text)
    return {
        "compile": env.get("BLIP_COMPILE", "auto"),
        "ready_s": round(ready_s, 1),
        "compile_s": int(compiled.group(1)) if compiled else None,
        "packages": compiled.group(2) if compiled else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved BLIP's folder (BLIP_MODEL)")
    parser.add_argument("--precision", default="auto", help="BLIP_PRECISION")
    parser.add_argument("--starts", type=int, default=2, help="compiled starts: the first compiles, the rest load")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="blip-startup-") as folder:
        base = {"BLIP_MODEL": args.model, "BLIP_PRECISION": args.precision}
        runs = [start_to_ready({**base, "BLIP_COMPILE": "off"}, Path(folder) / "off.log")]
        compiled = {**base, "BLIP_COMPILE": "on", "BLIP_COMPILE_CACHE": str(Path(folder) / "cache")}
        for start in range(args.starts):
            runs.append(start_to_ready(compiled, Path(folder) / f"on-{start}.log"))
    for run in runs:
        print(json.dumps(run))


if __name__ == "__main__":
    main()
