# Sourced by container/smoke.sh and container/compose-smoke.sh (from the repo root): this project's
# container store and settings, the base image, and the model imported into a BentoML home of its own.
container/check-prerequisites.sh ${PREREQUISITES:-} || exit 1
export BUILDAH_ISOLATION=chroot
export CONTAINERS_STORAGE_CONF=${CONTAINERS_STORAGE_CONF:-$PWD/container/storage.conf}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/container/containers.conf}
export BENTOML_HOME=${BENTOML_HOME:-/var/tmp/blip-serve-smoke/bentoml}   # a model store of its own
export BENTOML_DO_NOT_TRACK=True
base=localhost/blip-serve-base:bookworm
seconds() { date +%s; }

model=${MODEL_DIR:-build/tiny-model}   # tiny random model unless MODEL_DIR is given
[ -f "$model/config.json" ] || python -m tools.tiny_model "$model"
python -m tools.import_model "$model"
