#!/usr/bin/env bash
# Everything in kd that needs a GPU, in one command, on a bare machine with one NVIDIA GPU (torch + CUDA + triton,
# no DeepSpeed, no package registry):
#
#   tools/gpu_check.sh OUT_DIR [--wheels DIR] [--cpu-smoke]
#
# Stages (each with its own time limit and log OUT_DIR/<stage>.log; a failing stage does not stop the others):
#   install        DeepSpeed 0.19.8 and whatever else the machine lacks, offline, from DIR (tools/gpu_wheels.sh DIR
#                  fetched it on a machine that reaches the registry) into $KD_SITE/site-packages (default /tmp/site)
#   pytest_gpu     pytest -m gpu (the kernels at real sizes)
#   bench_kernels  tools/bench_kernels.py --json (kd's kernels vs eager, torch.compile, Liger, the floor)
#   assets         tools/gpu_check.py assets: a Qwen2.5-sized tokenizer (151,665 entries), random-word corpus, recipes
#                  with randomly initialised Qwen2.5-1.5B-shaped teacher and 0.5B-shaped student (bf16)
#   bench_step_dense / bench_step_fused   tools/bench_step.py on that recipe, loss.fused_linear off / on
#   train          kd train, 20 steps on 1 GPU with a checkpoint every 10: SIGKILL after the step-10 save, rerun
#                  (resume: auto continues from it), check the 20 steps in metrics.jsonl, kd export
#   bench_generate tools/bench_generate.py: ZeRO-3 generation gathered once vs layer by layer vs HF generate on a
#                  replica (a random 16-layer Llama; one rank per visible GPU)
# then OUT_DIR/summary.md: stage | status | seconds | key number. Exit 0 when every stage that ran passed.
#
# --cpu-smoke runs the same stages at tiny sizes on a CPU machine, skipping the CUDA-only ones (pytest -m gpu; the
# kernel benchmark runs at tiny shapes). GPU_CHECK_BUDGET (seconds, default 480 on a GPU) bounds the whole run: each
# stage gets min(its own limit, what is left).
set -u

usage() { echo "usage: $0 OUT_DIR [--wheels DIR] [--cpu-smoke]" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$REPO/tools/gpu_check.sh"
PY=${PYTHON:-python3}

# ---- internal: the train stage (run as its own process so that `timeout` can bound it) --------------------------
if [ "${1:-}" = "__train" ]; then
  recipe=$2 out=$3; shift 3
  run=$("$PY" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['run']['output_dir'])" "$recipe")
  rm -rf "$run"
  echo "== first run (killed after the step-10 checkpoint): $recipe $*"
  # the step-20 save lingers 5 s before `latest` moves (kd's test hook): a run fast enough to finish between two
  # polls (tiny sizes on --cpu-smoke did) is still killed after step 10, never at the end
  KD_TEST_SAVE_DELAY=5@20 setsid "$PY" -m kd.cli train "$recipe" "$@" --nproc 1 > "$out/train_first.log" 2>&1 &
  first=$!
  # setsid made the run its own process group; `latest` moves only once a tag is complete on every rank
  while kill -0 "$first" 2>/dev/null && [ "$(cat "$run/checkpoints/latest" 2>/dev/null)" != step_00000010 ]; do
    sleep 0.2
  done
  if kill -0 "$first" 2>/dev/null; then
    kill -KILL -- "-$first"; wait "$first" 2>/dev/null
    echo "killed the run (latest: $(cat "$run/checkpoints/latest"))"
  else
    wait "$first"; rc=$?
    echo "the first run ended by itself (exit $rc) before it could be killed"; tail -20 "$out/train_first.log"
    [ "$rc" = 0 ] || exit 1
  fi
  echo "== second run (resume: auto)"
  "$PY" -m kd.cli train "$recipe" "$@" --nproc 1 > "$out/train_resume.log" 2>&1 || { tail -40 "$out/train_resume.log"; exit 1; }
  grep "resumed from" "$out/train_resume.log"
  echo "== export"
  "$PY" -m kd.cli export "$run/checkpoints" "$run/hf" || exit 1
  "$PY" - "$run" "$out/train.json" "$out/train_resume.log" <<'EOF'
import json, os, sys
run, dest, log = sys.argv[1:]
records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
steps = [r["step"] for r in records if "loss" in r]
resumed = [line.strip() for line in open(log) if "resumed from" in line]
exported = sorted(os.listdir(os.path.join(run, "hf")))
# the resume must have come from the step-10 checkpoint the first run was killed after
ok = steps == list(range(1, 21)) and bool(resumed) and " at step 10 " in resumed[0] and "config.json" in exported
last = next(r for r in reversed(records) if "loss" in r)
summary = (f"{'ok' if ok else 'WRONG'}: steps {steps[0]}..{steps[-1]} ({len(steps)} records), "
           f"{'resumed at ' + resumed[0].split(' at ')[-1].split(' (')[0] if resumed else 'not resumed'}, final loss {last['loss']:.3f}, "
           f"export {len(exported)} files")
json.dump({"ok": ok, "steps": steps, "resumed": resumed, "exported": exported, "final": last, "summary": summary},
          open(dest, "w"), indent=1)
print(summary)
sys.exit(0 if ok else 1)
EOF
  exit $?
fi

# ---- internal: the offline install of what the machine lacks (tools/gpu_wheels.sh fetched it) -----------------
if [ "${1:-}" = "__install" ]; then
  wheels_dir=$2 site=$3
  set -e
  mkdir -p "$site"
  wheels=()
  for whl in "$wheels_dir"/*.whl; do
    [ -e "$whl" ] || continue
    dist=$(basename "$whl" | cut -d- -f1)
    [ "$dist" = pydantic_core ] && dist=pydantic  # pydantic pins its core's exact version: both or neither
    if "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null; then
      echo "present: $dist"
    else
      wheels+=("$whl")
    fi
  done
  if [ ${#wheels[@]} -gt 0 ]; then
    echo "installing: ${wheels[*]##*/}"
    "$PY" -m pip install --no-index --no-deps --upgrade --target "$site" "${wheels[@]}"
  fi
  if ! "$PY" -c "import deepspeed" 2>/dev/null; then
    # DS_BUILD_OPS=0: no CUDA extension is compiled at install time (DeepSpeed builds one on first use if it can)
    DS_BUILD_OPS=0 "$PY" -m pip install --no-index --no-deps --no-build-isolation --upgrade --target "$site" \
      "$wheels_dir"/deepspeed-*.tar.gz
  fi
  "$PY" -c "import deepspeed, datasets, pydantic, pytest; print('deepspeed', deepspeed.__version__, 'datasets', \
datasets.__version__, 'pydantic', pydantic.__version__, 'pytest', pytest.__version__)"
  exit 0
fi

# ---- arguments ---------------------------------------------------------------------------------------------------
[ $# -ge 1 ] || usage
OUT=$1; shift
WHEELS="" SMOKE=0
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) [ $# -ge 2 ] || usage; WHEELS=$(cd "$2" && pwd) || exit 2; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    *) usage ;;
  esac
done
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
BUDGET=${GPU_CHECK_BUDGET:-$([ $SMOKE = 1 ] && echo 2400 || echo 480)}
# the install target must have "site-packages" in its path: dill (datasets' fingerprints) pickles any module from
# elsewhere by value, and fails on pyarrow's
SITE=${KD_SITE:-/tmp/site}/site-packages
SCALE=$([ $SMOKE = 1 ] && echo 3 || echo 1)  # stage limits x3 on a (possibly shared) CPU machine
START=$SECONDS
: > "$OUT/stages.tsv"
cd "$REPO"
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
export PYTHONUNBUFFERED=1

record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$OUT/stages.tsv"; printf '%-18s %-30s %ss\n' "$1" "$2" "$3"; }
skip() { record "$1" "skipped: $2" 0; }
FAILED=0
CURRENT=""
trap '[ -n "$CURRENT" ] && kill -TERM -- "-$CURRENT" 2>/dev/null; exit 143' TERM INT HUP

# stage NAME LIMIT_S COMMAND...: run with min(LIMIT_S, time left), output to OUT/NAME.log
stage() {
  local name=$1 limit=$2; shift 2
  limit=$((limit * SCALE))
  local left=$((BUDGET - (SECONDS - START)))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then skip "$name" "no time left in the ${BUDGET}s budget"; FAILED=1; return; fi
  local t0=$SECONDS rc
  # in the background so that a signal to this script reaches the trap below at once (timeout leads its own group)
  timeout -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1 &
  CURRENT=$!
  wait "$CURRENT"; rc=$?
  CURRENT=""
  local took=$((SECONDS - t0))
  case $rc in
    0) record "$name" ok "$took" ;;
    124|137) record "$name" "timeout after ${limit}s" "$took"; FAILED=1 ;;
    *) record "$name" "failed (exit $rc)" "$took"; FAILED=1 ;;
  esac
}

has() { "$PY" -c "import $1" > /dev/null 2>&1; }

if [ -n "$WHEELS" ]; then
  stage install 300 "$SELF" __install "$WHEELS" "$SITE"
elif has deepspeed && has datasets; then
  skip install "deepspeed and datasets are importable"
else
  skip install "no --wheels DIR given"
fi

READY=1
for module in deepspeed datasets pydantic; do
  has "$module" || { READY=0; MISSING="${MISSING:-}$module "; }
done
NVCC=0
command -v nvcc > /dev/null && command -v ninja > /dev/null && NVCC=1
# DeepSpeed's fused Adam compiles itself on first use (nvcc + ninja); without them, torch's AdamW
EXTRA=()
[ $NVCC = 1 ] || EXTRA+=("deepspeed.optimizer.params.torch_adam=true")

# ---- GPU stages ----------------------------------------------------------------------------------------------------
if [ $SMOKE = 1 ]; then
  skip pytest_gpu "--cpu-smoke (needs CUDA)"
  stage bench_kernels 100 "$PY" tools/bench_kernels.py --fused 64,32,48,1031 --dense 64,1031 --no-compile --no-liger \
    --divergences forward_kl --warmup 1 --iters 1 --dtype fp32 --json "$OUT/bench_kernels.json"
else
  stage pytest_gpu 180 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/kernels tests/unit/engine \
    tests/unit/generation
  stage bench_kernels 120 "$PY" tools/bench_kernels.py --json "$OUT/bench_kernels.json"
fi

ASSETS="$OUT/assets"
stage assets 120 "$PY" tools/gpu_check.py assets "$ASSETS" $([ $SMOKE = 1 ] && echo --tiny)
if [ ! -f "$ASSETS/train.yaml" ]; then
  for s in bench_step_dense bench_step_fused train bench_generate; do skip $s "no assets (see assets.log)"; done
elif [ $READY = 0 ]; then
  for s in bench_step_dense bench_step_fused train bench_generate; do
    skip $s "${MISSING}not installed (pass --wheels DIR)"
  done
else
  steps=(--steps 5 --warmup 2)
  [ $SMOKE = 1 ] && steps=(--steps 2 --warmup 1)
  for mode in dense fused; do
    fused=$([ $mode = fused ] && echo true || echo false)
    stage bench_step_$mode 120 sh -c '"$@" > "$0"' "$OUT/bench_step_$mode.json" \
      "$PY" tools/bench_step.py "$ASSETS/bench.yaml" loss.fused_linear=$fused "${EXTRA[@]}" "${steps[@]}" --json
  done
  stage train 240 "$SELF" __train "$ASSETS/train.yaml" "$OUT" "${EXTRA[@]}"
  # one rank per GPU: NCCL refuses two ranks on one device, so a 1-GPU machine measures a 1-rank ZeRO-3 engine
  gen=(--layers 16 --hidden 1024 --vocab 32000 --batch 16 --prompt-len 128 --new-tokens 128
       --nproc "$("$PY" -c 'import torch; print(max(1, torch.cuda.device_count()))')")
  [ $SMOKE = 1 ] && gen=(--layers 2 --hidden 64 --vocab 256 --batch 4 --prompt-len 16 --new-tokens 8 --nproc 2)
  stage bench_generate 120 sh -c '"$@" > "$0"' "$OUT/bench_generate.json" "$PY" tools/bench_generate.py "${gen[@]}"
fi

"$PY" tools/gpu_check.py summary "$OUT" || FAILED=1
echo "total $((SECONDS - START))s; logs, JSON and summary.md in $OUT"
exit $FAILED
