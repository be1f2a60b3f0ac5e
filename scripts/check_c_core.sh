#!/usr/bin/env bash
# Builds the numeric C core (src/aviary/csrc/*.c without module.c: no Python headers) with its self-test
# (tests/csrc/selftest.c) and runs it: natively with the host compiler, then cross-compiled for aarch64 with
# Debian's aarch64-linux-gnu-gcc and run under qemu-user when those are installed. Also checks that the
# generic path's hot loops compile to NEON (fmla on v registers, vector widening) on aarch64.
#
#   bash scripts/check_c_core.sh                      # what the installed tools allow; says what it skipped
#   bash scripts/check_c_core.sh --require-aarch64    # fail when the cross compiler or qemu is missing
#   bash scripts/check_c_core.sh --install            # apt-get install the tools first (as root)
#
# Options: --install, --require-aarch64, --strict-neon (fail when a hot loop is partly scalarised),
# --static (also link the native binary statically), --out DIR (keep the binaries and assembly there),
# -h. Environment: CC (native compiler, default cc), AARCH64_CC (default aarch64-linux-gnu-gcc),
# QEMU_AARCH64 (default qemu-aarch64, else qemu-aarch64-static). Exit status 0 when everything that ran
# passed (and nothing was missing under --require-aarch64).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

INSTALL=0 REQUIRE=0 STRICT_NEON=0 STATIC=0 OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --install) INSTALL=1 ;;
        --require-aarch64) REQUIRE=1 ;;
        --strict-neon) STRICT_NEON=1 ;;
        --static) STATIC=1 ;;
        --out) OUT="${2:?--out needs a directory}"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "check_c_core: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

CSRC=src/aviary/csrc
SELFTEST=tests/csrc/selftest.c
FAILED=()   # what failed
SKIPPED=()  # what was not run, and why
PASSED=()
say() { printf 'check_c_core: %s\n' "$*"; }
fail() { say "FAIL: $*"; FAILED+=("$*"); }
skip() { say "SKIP: $*"; SKIPPED+=("$*"); }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

if [ -z "$OUT" ]; then
    OUT="$(mktemp -d "${TMPDIR:-/tmp}/aviary-c-core.XXXXXX")"
    trap 'rm -rf "$OUT"' EXIT
fi
mkdir -p "$OUT"

# ---- 0. the tools (optional) ------------------------------------------------------------------------
if [ "$INSTALL" = 1 ]; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        fail "--install needs root and apt-get"
    else
        t0=$(now)
        say "installing gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user (apt-get)"
        # libc6-dev-arm64-cross is only a Recommends of the cross compiler: name it for --no-install-recommends setups
        if DEBIAN_FRONTEND=noninteractive timeout 600 apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq \
                gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null; then
            say "installed in $(since "$t0")"
        else
            fail "apt-get install of the aarch64 tools"
        fi
    fi
fi

# ---- 1. the core has no Python in it -----------------------------------------------------------------
CORE=()
for f in "$CSRC"/*.c; do
    [ "$(basename "$f")" = module.c ] || CORE+=("$f")
done
py=$(grep -lE '#[[:space:]]*include[[:space:]]*[<"](Python|py[a-z]*)\.h' "${CORE[@]}" "$CSRC"/*.h 2>/dev/null)
if [ -n "$py" ]; then
    fail "the numeric core includes Python headers: $py (only module.c may)"
else
    PASSED+=("core free of Python headers")
fi
say "core: ${CORE[*]##*/} (+ $SELFTEST)"

# The self-test's last line must be "selftest: N passed, 0 failed".
run_selftest() { # name, command...
    local name="$1" t0 out rc last
    shift
    t0=$(now)
    out=$(timeout 900 "$@" 2>&1)
    rc=$?
    printf '%s\n' "$out" | grep -E '^(FAIL|selftest:)' | head -40 | sed "s/^/  [$name] /"
    last=$(printf '%s\n' "$out" | tail -n 1)
    if [ $rc -eq 0 ] && [[ "$last" =~ ^selftest:\ [0-9]+\ passed,\ 0\ failed$ ]]; then
        say "$name: passed ($(since "$t0"))"
        PASSED+=("$name")
    else
        [ $rc -eq 124 ] && say "$name: timed out"
        fail "$name (exit $rc): $last"
    fi
}

# ---- 2. native ------------------------------------------------------------------------------------------
CC="${CC:-cc}"
if ! command -v "$CC" >/dev/null; then
    skip "native build: no C compiler ($CC)"
else
    t0=$(now)
    flags=(-O3 -pthread -Wall -Wextra)
    [ "$STATIC" = 1 ] && flags+=(-static)
    if nice -n 10 "$CC" "${flags[@]}" -I"$CSRC" "$SELFTEST" "${CORE[@]}" -lm -o "$OUT/selftest-native"; then
        say "native build ($CC ${flags[*]}): $(since "$t0")"
        run_selftest "native selftest ($(uname -m))" "$OUT/selftest-native"
    else
        fail "native build ($CC ${flags[*]})"
    fi
fi

# ---- 3. aarch64: cross-compiled, run under qemu-user ----------------------------------------------------
XCC="${AARCH64_CC:-aarch64-linux-gnu-gcc}"
QEMU=""
for q in ${QEMU_AARCH64:-qemu-aarch64 qemu-aarch64-static}; do
    if command -v "$q" >/dev/null; then QEMU="$q"; break; fi
done
missing_tool() { # what, why
    if [ "$REQUIRE" = 1 ]; then fail "$1: $2 (--require-aarch64)"; else skip "$1: $2"; fi
}
hint="apt-get install gcc-aarch64-linux-gnu qemu-user, or run with --install as root"
if ! command -v "$XCC" >/dev/null; then
    missing_tool "aarch64 cross-compile and qemu run" "no $XCC ($hint)"
else
    # armv8-a (the Debian cross compiler's default -march) always has NEON: no -march needed
    defs=$("$XCC" -dM -E - </dev/null 2>&1)
    if [[ "$defs" != *"__ARM_NEON 1"* ]]; then
        fail "$XCC's default target has no NEON (__ARM_NEON undefined)"
    fi
    t0=$(now)
    if nice -n 10 "$XCC" -O3 -static -pthread -Wall -Wextra -I"$CSRC" "$SELFTEST" "${CORE[@]}" -lm \
        -o "$OUT/selftest-aarch64"; then
        say "aarch64 cross build ($XCC -O3 -static -pthread, default -march=armv8-a): $(since "$t0")"
        PASSED+=("aarch64 cross build")
        if [ -z "$QEMU" ]; then
            missing_tool "aarch64 selftest under qemu" "no ${QEMU_AARCH64:-qemu-aarch64 or qemu-aarch64-static} ($hint)"
        else
            # cortex-a53: plain ARMv8.0-A, what every aarch64 CPU has; max: every feature qemu emulates
            for cpu in cortex-a53 max; do
                run_selftest "aarch64 selftest ($QEMU -cpu $cpu)" "$QEMU" -cpu "$cpu" "$OUT/selftest-aarch64"
            done
        fi
    else
        fail "aarch64 cross build ($XCC -O3 -static -pthread)"
    fi

    # NEON code of the generic path: the hot loops of each function in isa_generic.c's assembly
    if ! command -v python3 >/dev/null; then
        skip "NEON assembly check: no python3"
    elif ! nice -n 10 "$XCC" -O3 -S -I"$CSRC" "$CSRC/isa_generic.c" -o "$OUT/isa_generic-aarch64.s"; then
        fail "aarch64 -S of isa_generic.c"
    else
        python3 - "$OUT/isa_generic-aarch64.s" <<'EOF'
"""Innermost loops (a backward branch to a label, with no other such loop inside) of each function: the
hot ones must use NEON (fmla on .4s registers; int8/bf16 weights widened with vector shifts, scvtf);
a hot loop that moves values between general and vector registers lane by lane (ins v.s[i], w / fmov
s, w / ubfx / umov / ldrh, ldrb) builds its vectors element by element: partly scalarised."""
import re
import sys
from collections import Counter

funcs, cur = {}, None
for line in open(sys.argv[1]).read().split("\n"):
    m = re.match(r"^([A-Za-z_]\w*):", line)
    if m:
        cur = funcs.setdefault(m.group(1), [])
    elif cur is not None and (re.match(r"^\.L\d+:", line) or (line.startswith("\t") and not line.startswith("\t."))):
        cur.append(line.strip())


def inner_loops(ls):
    labels = {x[:-1]: i for i, x in enumerate(ls) if re.match(r"^\.L\d+:$", x)}
    found = []
    for i, x in enumerate(ls):
        m = re.match(r"^(b[a-z.]*|cbn?z|tbn?z)\s.*?(\.L\d+)$", x)
        if m and m.group(2) in labels and labels[m.group(2)] < i:
            found.append((labels[m.group(2)], i))
    inner = [(a, b) for a, b in found if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in found)]
    return [[x for x in ls[a : b + 1] if not x.startswith(".L")] for a, b in inner]


VEC = re.compile(r"\bv\d+\.(4s|8h|16b|2d)")
LANE = re.compile(r"^(ins\s+v\d+\.[hs]\[\d\],\s*[wxv]|fmov\s+[sd]\d+,\s*[wx]|[us]bfx\s|[us]mov\s|ldrs?[bh]\s)")


def stats(body):
    c = Counter()
    for x in body:
        op = x.split()[0]
        vec = bool(VEC.search(x))
        if op == "fmla" and vec:
            c["fmla .4s"] += 1
        elif op in ("shl", "sshr", "ushr") and ".4s" in x:
            c["shift .4s"] += 1
        elif op == "and" and ".16b" in x:
            c["and .16b"] += 1
        elif op in ("zip1", "zip2", "uxtl", "ushll", "sxtl", "sshll"):
            c[op] += 1
        elif op in ("scvtf", "fdiv", "fcvtzs") and vec:
            c[op + " .4s"] += 1
        if LANE.match(x):
            c["lane moves"] += 1
    return c


bad, partly = [], []


def report(name, need, what):
    ls = funcs.get(name)
    if ls is None:
        print(f"  {name}: not in the assembly")
        bad.append(name)
        return
    hot = [s for s in map(stats, inner_loops(ls)) if any(s[k] for k in ("fmla .4s", "shift .4s", "scvtf .4s", "fcvtzs .4s"))]
    total = sum(hot, Counter())
    shown = ", ".join(f"{k} x{v}" for k, v in sorted(total.items()))
    missing = [k for k in need if not total[k]]
    lanes = [s["lane moves"] for s in hot if s["lane moves"]]
    if not hot or missing:
        bad.append(name)
        print(f"  {name} ({what}): NOT VECTORISED, missing {missing or 'hot loops'}: {shown}")
    elif lanes:
        partly.append(name)
        print(f"  {name} ({what}): PARTLY SCALARISED: {len(lanes)} of {len(hot)} hot loops build vectors lane by "
              f"lane through general registers ({sum(lanes)} lane moves): {shown}")
    else:
        print(f"  {name} ({what}): NEON ({len(hot)} hot loops: {shown})")


print("check_c_core: NEON in isa_generic.c for aarch64 (-O3), innermost loops per function:")
report("rows_f32_generic", ["fmla .4s"], "f32 [out,in], one row of x")
report("rows_f32_blocked_generic", ["fmla .4s"], "f32 tiles, M > 1")
report("rows_bf16_generic", ["fmla .4s", "shift .4s", "and .16b"], "bf16 widened by shl/and")
report("rows_bf16_blocked_generic", ["fmla .4s", "shift .4s", "and .16b"], "bf16 tiles")
report("rows_i8_generic", ["fmla .4s", "shift .4s", "scvtf .4s"], "int8 widened by shl/sshr/scvtf")
report("rows_i8_blocked_generic", ["fmla .4s", "shift .4s", "scvtf .4s"], "int8 tiles")
report("rows_t_f32_generic", ["fmla .4s"], "f32 [in,out] LoRA")
report("rows_t_bf16_generic", ["fmla .4s", "shift .4s"], "bf16 [in,out] LoRA, ld_bf16")
report("gate_generic", ["fmla .4s", "fdiv .4s", "fcvtzs .4s"], "sigmoid/silu, vector exp")
report("v6_tail_job_generic", ["fcvtzs .4s"], "decays: exp(-exp) inlined")
report("v7_tail_job_generic", ["fcvtzs .4s", "fdiv .4s"], "v7_gates inlined")
report("gla_job_generic", ["fmla .4s"], "auto-vectorised")
report("delta_job_generic", ["fmla .4s"], "auto-vectorised")
print(f"check_c_core: NEON: {len(bad)} not vectorised {bad}, {len(partly)} partly scalarised {partly}")
sys.exit(2 if bad else 3 if partly else 0)
EOF
        rc=$?
        if [ $rc -eq 0 ]; then
            PASSED+=("NEON assembly check")
        elif [ $rc -eq 3 ] && [ "$STRICT_NEON" = 0 ]; then
            say "NOTE: part of the generic path builds vectors lane by lane on aarch64 (see above; --strict-neon fails on it)"
            PASSED+=("NEON assembly check (with notes)")
        else
            fail "NEON assembly check"
        fi
    fi
fi

# ---- summary ----------------------------------------------------------------------------------------------
say "passed: ${#PASSED[@]}, skipped: ${#SKIPPED[@]}, failed: ${#FAILED[@]}"
for s in "${SKIPPED[@]}"; do say "  skipped: $s"; done
for f in "${FAILED[@]}"; do say "  failed: $f"; done
[ ${#FAILED[@]} -eq 0 ]
