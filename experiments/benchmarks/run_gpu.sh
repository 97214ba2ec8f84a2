#!/usr/bin/env bash
# The GPU measurements of issue 6, sized for a short GPU lease (15 minutes of device time,
# at most 10 minutes a command, no network). From the repository root, on the GPU machine:
#
#   OUT=/some/dir bash experiments/benchmarks/run_gpu.sh A      # preflight + section A (~5 min)
#   OUT=/some/dir bash experiments/benchmarks/run_gpu.sh B      # preflight + section B (~5 min)
#   OUT=/some/dir bash experiments/benchmarks/run_gpu.sh preflight   # seconds: is it all there?
#   (also: C = the rest of the compile grid, D = DEX dispatch and plain MAE (dex_rows.py);
#   "A B" or "all" in one command of up to ~9.5 min;
#   at most two sections a call: a GPU call returns at most 8 files from $OUT)
#
# Writes results only under $OUT (status.json, gpu_preflight.json, gpu_<section>.json/.md,
# run.log: 7 files for "A B"); carried wheels, if needed, go to a scratch
# site-packages ($MIDOL_BENCH_SITE, default ${TMPDIR:-/tmp}/midol_bench_site), never into the
# checkout. Never touches the network: pip runs with --no-index on the wheels in $WHEELS
# (default ./wheels; see experiments/benchmarks/wheels.txt for the list and how to download it).
# No `set -e`: every step runs under its own `timeout`, its outcome goes to $OUT/status.json and
# the script goes on; a failed preflight skips the sections (and says why) within seconds.
#
# Environment:
#   OUT                 results folder (required)
#   WHEELS              folder of carried wheels (default: wheels)
#   MIDOL_BENCH_DRY=1   CPU dry run: --device cpu --micro and short timeouts (the tests use it)
#   MIDOL_BENCH_ARGS    extra arguments for every section, e.g. "--peak-flops 756e12"
#   MIDOL_BENCH_CALL_S  wall-clock limit of the whole command (default 345 s for one section,
#                       570 s for two or more); sections are cut to fit inside it
#   MIDOL_BENCH_FORCE_WHEELS=1  install every carried wheel, even where the machine has one
#   MIDOL_BENCH_BREAK   module names whose import is made to fail (tests of a broken preflight)
#   PYTHON              interpreter (default python3)
set -uo pipefail

if [[ -z "${OUT:-}" ]]; then
    echo "run_gpu.sh: OUT is not set. Give the results folder: OUT=/path bash $0 SECTION" >&2
    exit 2
fi
usage() {
    echo "usage: OUT=DIR bash experiments/benchmarks/run_gpu.sh {preflight|A|B|C|D|all} ..." >&2
    exit 2
}
(($# > 0)) || usage
SECTIONS=()
for arg in "$@"; do
    case "$arg" in
        preflight) ;;
        A | B | C | D) SECTIONS+=("$arg") ;;
        all) SECTIONS+=(A B) ;;
        *) usage ;;
    esac
done
if ((${#SECTIONS[@]} > 2)); then
    echo "run_gpu.sh: at most two sections a command (a GPU call returns at most 8 files)" >&2
    exit 2
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd) || exit 2
cd "$ROOT" || exit 2
mkdir -p "$OUT" || { echo "run_gpu.sh: cannot create OUT=$OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
SUITE=experiments/benchmarks/gpu_suite.py
WHEELS=${WHEELS:-wheels}
WHEELS_LIST=${WHEELS_LIST:-experiments/benchmarks/wheels.txt}
SITE=${MIDOL_BENCH_SITE:-${TMPDIR:-/tmp}/midol_bench_site}
LOG="$OUT/run.log"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MIDOL_BENCH_COMMAND="OUT=$OUT bash experiments/benchmarks/run_gpu.sh $*"
read -r -a EXTRA <<<"${MIDOL_BENCH_ARGS:-}"

if [[ "${MIDOL_BENCH_DRY:-0}" == 1 ]]; then
    MODE=(--device cpu --micro)
    T_PIP=60 T_PRE=60 T_SEC=120 MARGIN=10 CALL_DEFAULT=300
else
    MODE=(--device cuda)
    # preflight ~30-40 s (imports, one tiny inductor compile, 2 micro steps); a section is cut
    # at 270 s (less if the call's limit comes first) and starts no row that it expects not to
    # finish 25 s before that.
    T_PIP=60 T_PRE=90 T_SEC=270 MARGIN=25
    if ((${#SECTIONS[@]} > 1)); then CALL_DEFAULT=570; else CALL_DEFAULT=345; fi
fi
CALL_S=${MIDOL_BENCH_CALL_S:-$CALL_DEFAULT}

note() { echo "== run_gpu.sh: $*" | tee -a "$LOG"; }
st() {  # st KEY NAME STATUS RC SECONDS [NOTE]
    "$PY" "$SUITE" status --out "$OUT" --key "$1" --name "$2" --status "$3" --rc "$4" \
        --seconds "$5" --note "${6:-}" >>"$LOG" 2>&1 || note "could not write status.json"
}
outcome() {  # exit status of a timed step -> status word
    case "$1" in
        0) echo ok ;;
        124) echo timeout ;;
        137) echo "killed (timeout -k)" ;;
        *) echo "failed (rc $1)" ;;
    esac
}
finish() {
    note "status: $OUT/status.json"
    cat "$OUT/status.json" 2>/dev/null
    echo
    exit "$1"
}

note "start $(date -Is) in $ROOT, sections: ${SECTIONS[*]:-(preflight only)}, call limit ${CALL_S} s"
st setup run started 0 0 "$MIDOL_BENCH_COMMAND; dry=${MIDOL_BENCH_DRY:-0}"

# ---- 1. carried wheels: only what this interpreter lacks, never from the network
t0=$SECONDS
ALL=()
[[ "${MIDOL_BENCH_FORCE_WHEELS:-0}" == 1 ]] && ALL=(--all)
missing=$("$PY" "$SUITE" missing-wheels --list "$WHEELS_LIST" "${ALL[@]}" 2>>"$LOG")
rc=$?
if ((rc != 0)); then
    st setup wheels "failed (rc $rc)" "$rc" $((SECONDS - t0)) "could not read $WHEELS_LIST"
elif [[ -z "$missing" ]]; then
    st setup wheels ok 0 $((SECONDS - t0)) "nothing missing"
elif ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    st setup wheels missing 0 $((SECONDS - t0)) "not installed, and no wheels in $WHEELS: $missing"
else
    note "installing from $WHEELS into $SITE: $missing"
    pip_install() {
        timeout -k 5 "$T_PIP" "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps \
            --no-compile --no-cache-dir --disable-pip-version-check -q --upgrade \
            --target "$SITE" "$@" 2>&1 | tee -a "$LOG"
        return "${PIPESTATUS[0]}"
    }
    failed=()
    # shellcheck disable=SC2086  # $missing is a list of name==version
    if ! pip_install $missing; then  # one bad wheel must not stop the others
        for req in $missing; do pip_install "$req" || failed+=("$req"); done
    fi
    export PYTHONPATH="$ROOT:$SITE${PYTHONPATH#"$ROOT"}"
    if ((${#failed[@]} == 0)); then
        st setup wheels ok 0 $((SECONDS - t0)) "installed into $SITE: $missing"
    else
        st setup wheels partial 1 $((SECONDS - t0)) "installed into $SITE; failed: ${failed[*]}"
    fi
fi

# ---- 2. preflight: seconds, and it says what broke
t0=$SECONDS
note "preflight"
timeout -k 5 "$T_PRE" "$PY" "$SUITE" preflight "${MODE[@]}" --out "$OUT" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
st sections preflight "$(outcome "$rc")" "$rc" $((SECONDS - t0))
if ((rc != 0)); then
    note "preflight failed (rc $rc): the sections are skipped; see $OUT/gpu_preflight.json"
    for s in "${SECTIONS[@]}"; do st sections "$s" "skipped: preflight failed" -1 0; done
    finish 1
fi

# ---- 3. the sections, each under its own timeout, inside the call's limit
all_ok=1
for s in "${SECTIONS[@]}"; do
    left=$((CALL_S - SECONDS - 5))
    t=$((left < T_SEC ? left : T_SEC))
    if ((t < 30)); then
        st sections "$s" "skipped: no time left in this call (${left} s)" -1 0
        all_ok=0
        continue
    fi
    t0=$SECONDS
    note "section $s (timeout ${t} s)"
    timeout -k 10 "$t" "$PY" "$SUITE" section "$s" "${MODE[@]}" --out "$OUT" \
        --budget-s $((t - MARGIN)) "${EXTRA[@]}" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    st sections "$s" "$(outcome "$rc")" "$rc" $((SECONDS - t0))
    ((rc == 0)) || all_ok=0
done
note "done in ${SECONDS} s"
if ((all_ok)); then finish 0; else finish 1; fi
