#!/usr/bin/env bash
# Hermetic bento and OCI image, without Docker: the wheels are downloaded here, the bento carries
# them, and buildah builds on the local base image with no package index.
#   container/build-offline.sh [TAG]                 (default blip-serve:offline)
# Needs: buildah, the base image (container/build-base-image.sh), a model imported into the
# BentoML model store (python -m tools.import_model DIR), and this repo's venv active.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-blip-serve:offline}
base=${BLIP_BASE_IMAGE:-localhost/blip-serve-base:bookworm}
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
export CONTAINERS_STORAGE_CONF=${CONTAINERS_STORAGE_CONF:-$PWD/container/storage.conf}
work=build/offline
mkdir -p "$work/wheelhouse"

# 1. Every wheel the image needs, for the image's Python (3.11, glibc manylinux, x86_64).
pip download -q --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -r requirements.txt -d "$work/wheelhouse"

# 2. A bentofile that adds the wheels, the local base image and the offline Dockerfile block.
python - "$work" "$base" <<'PY'
import sys, yaml, pathlib
work, base = pathlib.Path(sys.argv[1]), sys.argv[2]
config = yaml.safe_load(open("bentofile.yaml"))
config["python"]["wheels"] = sorted(str(p) for p in (work / "wheelhouse").glob("*.whl"))  # relative: BentoML wants them so
config["docker"].update(base_image=base, dockerfile_template="container/Dockerfile.offline.j2")
config["docker"].pop("python_version", None)  # the base image's Python
(work / "bentofile.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
PY
bento=$(bentoml build -f "$work/bentofile.yaml" --output tag . | tail -n1 | sed 's/^__tag__://')
echo "built bento $bento"

# 3. The image: BentoML's Dockerfile with our block, built by buildah.
# BentoML 1.4 refuses a dockerfile_template outside the working directory, and copies it into a
# temporary build folder: keep that folder below this one.
mkdir -p build/tmp
TMPDIR=$PWD/build/tmp bentoml containerize "$bento" --backend buildah -t "$tag"
echo "built image $tag"
