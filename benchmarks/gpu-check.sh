#!/usr/bin/env bash
# The GPU check (issue 30), one command on a machine with a CUDA GPU, under 8 minutes: every adapter method
# on SD 1.5's UNet (random weights) at 512 px in fp16 and bf16 (step time vs LoRA, peak memory, cold and warm
# attach, merged inference) and the `shapes` quality bench for two methods. Writes benchmarks/gpu-check.json
# and benchmarks/gpu-check.md (a section for BENCHMARKS.md), rewritten after every part. The work itself is
# personalize/benchmark/gpu_check.py (`personalize bench` calls); this script finds a Python to run it.
#
#   benchmarks/gpu-check.sh [--deadline S] [--skip PART...] [--json PATH] [--markdown PATH] [--work-dir DIR]
#   benchmarks/gpu-check.sh --smoke ...      # the same parts on the CPU at toy sizes (tests/test_gpu_check.py)
#   benchmarks/gpu-check.sh --fetch-wheels   # with network: the packages a lent GPU machine lacks, into .whl/
#
# Python: $PYTHON when set; else .venv/bin/python or python3, the first that imports what the check needs;
# else python3 after installing the wheels in .whl/ into a private folder; else `make install` (needs network).
#
# A GPU machine without network whose python3 has torch with CUDA (and transformers, peft, accelerate) but not
# diffusers or open_clip: run `benchmarks/gpu-check.sh --fetch-wheels` where there is network, take .whl/ along
# with the checkout (git ignores it), and there run, e.g.
#   benchmarks/gpu-check.sh --json RESULTS/gpu-check.json --markdown RESULTS/gpu-check.md 2>&1 | tee RESULTS/gpu-check.log
# Both files are rewritten after every part, so a run stopped early still leaves the parts it finished.
set -euo pipefail
cd "$(dirname "$0")/.."

NEEDS="import torch, diffusers, transformers, peft, accelerate, open_clip"
# What such a machine lacks of the check's imports (open_clip holds the CLIP vocabulary the built-in models'
# tokenizer is made from; ftfy and wcwidth are its imports), at the versions this checkout runs with.
WHEELS=(diffusers open_clip_torch ftfy wcwidth)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    py="${PYTHON:-.venv/bin/python}"
    [[ -x "$py" ]] || py=python3
    mapfile -t pins < <("$py" -c 'import sys; from importlib.metadata import version; [print(f"{n}=={version(n)}") for n in sys.argv[1:]]' "${WHEELS[@]}")
    mkdir -p .whl
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        --dest .whl "${pins[@]}"
    echo "wrote .whl/ ($(du -sh .whl | cut -f1)): ${pins[*]}; git ignores it: take it along with the checkout"
    exit 0
fi

imports() { "$1" -c "$NEEDS" >/dev/null 2>&1; }

PY="${PYTHON:-}"
SITE=""
if [[ -z "$PY" ]]; then
    for candidate in .venv/bin/python python3; do
        if command -v "$candidate" >/dev/null && imports "$candidate"; then PY="$candidate"; break; fi
    done
fi
if [[ -z "$PY" ]] && compgen -G ".whl/*.whl" >/dev/null && command -v python3 >/dev/null; then
    SITE="${TMPDIR:-/tmp}/personalize-gpu-check-site"
    echo "gpu-check: installing $(ls .whl | wc -l) wheels from .whl/ into $SITE" >&2
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl >&2
    if PYTHONPATH="$SITE" imports python3; then PY=python3; else
        echo "gpu-check: python3 with .whl/ still cannot run: $NEEDS" >&2
        PYTHONPATH="$SITE" python3 -c "$NEEDS" || true
        exit 1
    fi
fi
if [[ -z "$PY" ]]; then
    echo "gpu-check: no Python here imports what the check needs; make install" >&2
    make install >&2
    PY=.venv/bin/python
fi

export PYTHONPATH="$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's personalize first
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1
[[ -t 2 ]] || export TQDM_DISABLE="${TQDM_DISABLE:-1}"  # no progress bars in a log file: its tail stays the results
exec "$PY" -m personalize.benchmark.gpu_check "$@"
