#!/usr/bin/env bash
# Carry the GPU suite (benchmarks/gpu_suite.py, issue 21) to a CUDA machine that has PyTorch but
# no diffusers and no network, and run it there unattended.
#
#   bash scripts/gpu_bundle.sh build [--dir .gpu-bundle]      # here, with PyPI
#   bash scripts/gpu_bundle.sh run [--dir .gpu-bundle] [--out DIR] [-- SUITE-ARGS...]   # there
#
# build: `pip download --no-deps` the pinned wheels below into DIR (gitignored) for CPython
#   $PYTHON_VERSION (default 3.12, the GPU machine's) on manylinux x86_64; builds diffgeo's own
#   wheel (`pip wheel --no-deps .`) to check that it builds, but does not keep it: it would carry
#   a second copy of the 15 MiB default model that the working tree already carries, and the
#   device tool sends at most 64 MiB of tree and bundle together. Prints the sizes and fails if
#   the bundle and the working tree together exceed that.
# run: installs from DIR with `pip install --no-deps --no-index --target $DIFFGEO_SITE` (default
#   /tmp/diffgeo-site, put first on PYTHONPATH), leaving the environment's own packages and torch
#   untouched: diffusers always; every other wheel only where the environment lacks that
#   distribution (the GPU image has transformers, huggingface_hub, tokenizers, safetensors,
#   accelerate, ... of its own; the Hugging Face pins below are the versions seen there, so a
#   filled gap matches the rest, and the others are those the project is tested with here).
#   Checked here: a venv holding only torch and numpy, this install offline, then the smoke run.
#   numpy is not carried: every PyTorch environment has it. diffgeo is imported from the working
#   tree that travelled (src/ on PYTHONPATH). Then it runs
#   `python3 benchmarks/gpu_suite.py --out DIR SUITE-ARGS` (DIR: --out, else $OUT) under a
#   9-minute timeout, with its log written beside the report as gpu-suite.log. The suite writes
#   its report after every section, so a run cut short still returns what it measured.
#   $PYTHON picks the interpreter (default python3).
#
# With the project's device tool (the working tree plus `carry` travel, what is written under
# $OUT comes back), after `bash scripts/gpu_bundle.sh build` here:
#
#   run(command="bash scripts/gpu_bundle.sh run", carry=[".gpu-bundle"], timeout_s=600)
#
# then copy the returned gpu-<device>-<date>.md/.json into benchmarks/results/ and commit them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
SITE="${DIFFGEO_SITE:-/tmp/diffgeo-site}"
LIMIT_MIB=64
MANIFEST=MANIFEST.txt  # what build wrote (and may replace)
SUITE_TIMEOUT_S=540
# Installed whatever the environment has (what the GPU machine lacks).
REQUIRED=(diffusers==0.42.1)
# Installed only where the environment lacks the distribution.
FALLBACK=(
  transformers==5.17.0 huggingface_hub==1.33.0 tokenizers==0.23.2 safetensors==0.8.0
  accelerate==1.15.0 hf-xet==1.8.0 httpx==0.29.0 httpcore==1.0.9 h11==0.16.0 anyio==4.16.0
  sniffio==1.3.1 idna==3.20 certifi==2026.5.20 requests==2.34.2 urllib3==2.7.0
  charset-normalizer==3.4.7 click==8.5.1 filelock==4.3.2 fsspec==2026.9.0 packaging==26.2
  tqdm==4.70.1 typing_extensions==4.16.0 typer==0.29.2 shellingham==1.5.4 rich==15.0.0
  markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.20.0 annotated-doc==0.0.7 psutil==7.2.2
  pyyaml==6.0.3 regex==2026.5.9 pillow==12.3.0
)

usage() {
  cat <<EOF
usage: gpu_bundle.sh build [--dir DIR]
       gpu_bundle.sh run [--dir DIR] [--out RESULTS] [-- SUITE-ARGS...]

build  download the wheels the GPU machine lacks into DIR
       (default .gpu-bundle, gitignored); fails if DIR plus the working tree pass ${LIMIT_MIB} MiB
run    on the GPU machine: install DIR's wheels offline (--no-deps --no-index) into
       \$DIFFGEO_SITE (default /tmp/diffgeo-site; it and src/ first on PYTHONPATH), then run
       benchmarks/gpu_suite.py --out RESULTS (default \$OUT) SUITE-ARGS

Device tool: run(command="bash scripts/gpu_bundle.sh run", carry=[".gpu-bundle"], timeout_s=600)
Environment: PYTHON (interpreter, default python3), PYTHON_VERSION (build: target CPython,
default 3.12), DIFFGEO_SITE.
EOF
}

die() { echo "error: $*" >&2; exit "${2:-1}"; }

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

tree_bytes() {  # what the device tool sends: tracked files and untracked, not ignored ones
  (cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 -r stat -c %s 2>/dev/null \
    | awk '{ s += $1 } END { print s + 0 }')
}

build() {
  local dir="$1"
  # a folder of someone else's files is refused: only a previous build's wheels are replaced
  if [[ -d "$dir" && -n "$(ls -A "$dir")" && ! -f "$dir/$MANIFEST" ]]; then
    die "$dir is not empty and was not made by this script (no $MANIFEST): choose another --dir"
  fi
  mkdir -p "$dir"
  rm -f "$dir"/*.whl "$dir/$MANIFEST"
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --implementation cp \
    --python-version "$PYTHON_VERSION" --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dir" "${REQUIRED[@]}" "${FALLBACK[@]}"
  local built
  built=$(mktemp -d)
  "$PYTHON" -m pip wheel --no-deps -q -w "$built" "$ROOT"
  echo "diffgeo builds: $(basename "$built"/diffgeo-*.whl) (not carried: src/ travels)"
  rm -r "$built"
  local wheels bundle tree
  wheels=$(find "$dir" -maxdepth 1 -name '*.whl' | wc -l)
  bundle=$(find "$dir" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
  tree=$(tree_bytes)  # the bundle is ignored by git: carry sends it beside the tree
  (cd "$dir" && ls -1 ./*.whl | sed 's|^\./||') >"$dir/$MANIFEST"
  echo "bundle: $wheels wheels, $(mib "$bundle") MiB in $dir; working tree $(mib "$tree") MiB;" \
       "together $(mib $((bundle + tree))) MiB of ${LIMIT_MIB} MiB"
  if (( bundle + tree > LIMIT_MIB * 1048576 )); then
    die "the bundle and the working tree exceed ${LIMIT_MIB} MiB: they would not travel"
  fi
}

# The wheels of DIR to install: REQUIRED ones always, the rest where missing.
wheels_to_install() {
  local dir="$1"
  "$PYTHON" - "$dir" "${REQUIRED[@]%%==*}" <<'EOF'
import importlib.metadata as md
import re
import sys
from pathlib import Path

folder, required = Path(sys.argv[1]), set(sys.argv[2:])


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


required = {norm(n) for n in required}
for wheel in sorted(folder.glob("*.whl")):
    name = norm(wheel.name.split("-")[0])
    if name in required:
        print(wheel)
        continue
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        print(wheel)
EOF
}

run_suite() {
  local dir="$1" results="$2"
  shift 2
  [[ -n "$results" ]] || die "no results folder: pass --out DIR or set OUT" 2
  compgen -G "$dir/diffusers-*.whl" >/dev/null \
    || die "no diffusers wheel in $dir: run 'bash scripts/gpu_bundle.sh build' first and carry $dir"
  mkdir -p "$results"
  "$PYTHON" -c "import torch, numpy; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'available', torch.cuda.is_available(), '| numpy', numpy.__version__)" \
    || die "$PYTHON lacks torch or numpy: the bundle carries neither"
  local -a wheels
  mapfile -t wheels < <(wheels_to_install "$dir")
  echo "installing ${#wheels[@]} wheel(s) into $SITE: $(for w in "${wheels[@]}"; do
    basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')"
  "$PYTHON" -m pip install -q --no-deps --no-index --no-compile --no-cache-dir --upgrade \
    --disable-pip-version-check --root-user-action=ignore --target "$SITE" "${wheels[@]}"
  export PYTHONPATH="$ROOT/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_VERBOSITY=error \
    PYTHONUNBUFFERED=1 TQDM_DISABLE=1
  "$PYTHON" -c "import diffgeo, diffusers, transformers; print('diffgeo from', \
diffgeo.__file__, '| diffusers', diffusers.__version__, '| transformers', \
transformers.__version__)"
  cd "$ROOT"
  set +e
  timeout "$SUITE_TIMEOUT_S" "$PYTHON" benchmarks/gpu_suite.py --out "$results" "$@" 2>&1 \
    | tee "$results/gpu-suite.log"
  local rc=${PIPESTATUS[0]}
  set -e
  (( rc != 124 )) || echo "gpu_suite.py passed its ${SUITE_TIMEOUT_S} s timeout: the report" \
    "holds the sections that finished" >&2
  return "$rc"
}

main() {
  local cmd="${1:-}"
  [[ -n "$cmd" ]] || { usage >&2; exit 2; }
  shift
  case "$cmd" in
    -h|--help|help) usage; return 0 ;;
    build|run) ;;
    *) echo "error: unknown command '$cmd' (build or run)" >&2; usage >&2; exit 2 ;;
  esac
  local dir="$ROOT/.gpu-bundle" results="${OUT:-}"
  while (( $# )); do
    case "$1" in
      --dir) dir="${2:?--dir needs a folder}"; shift 2 ;;
      --out) results="${2:?--out needs a folder}"; shift 2 ;;
      -h|--help) usage; return 0 ;;
      --) shift; break ;;
      *) die "unknown option '$1' (see --help)" 2 ;;
    esac
  done
  if [[ "$cmd" == build ]]; then
    (( $# == 0 )) || die "build takes no suite arguments" 2
    build "$dir"
  else
    run_suite "$dir" "$results" "$@"
  fi
}

main "$@"
