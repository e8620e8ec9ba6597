#!/usr/bin/env bash
# tinyoss's kernel tests on aarch64, emulated by qemu-user on an x86_64 Debian host (as root):
#
#   scripts/arm64-tests.sh [--rebuild] [--quick] [pytest arguments...]
#
# Setup, once (network: Debian's packages, PyPI): qemu-user-static, an arm64 Debian bookworm
# root in $TINYOSS_ARM64_ROOT (default ~/.cache/tinyoss/arm64-root; --rebuild makes it afresh)
# and a venv in it of aarch64 wheels. Then, offline, pytest runs in that root on this tree,
# mounted at /repo. Without arguments: the kernel tests and the fast path's parity with the
# numpy reference model on small synthetic checkpoints (no torch). --quick: fewer of them.
# QEMU_CPU picks the emulated CPU (default max, which has dotprod; cortex-a72 has not), and
# TINYOSS_*, NUMBA_*, PYTEST_* and HYPOTHESIS_* variables are passed through.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${TINYOSS_ARM64_ROOT:-$HOME/.cache/tinyoss/arm64-root}
MIRROR=${TINYOSS_ARM64_MIRROR:-http://deb.debian.org/debian}
export QEMU_CPU=${QEMU_CPU:-max}
# the kernels against their numpy twins; the fast path against the numpy definition (full
# passes, cached prefill and decode steps) on small synthetic checkpoints; none needs torch
P=tests/test_reference_parity.py
DEFAULT=(tests/test_kernels.py tests/test_mxfp4.py "$P::test_fast_path_equals_the_numpy_definition"
         "$P::test_cached_forward_equals_full_forward[forward-f32]"
         "$P::test_cached_forward_equals_full_forward[forward-bf16]" "$P::test_last_only_is_the_last_row")
# --quick leaves out what takes longest under emulation: warm_up's compiling every kernel three
# times over (test_kernels_do_not_recompile) and the longer cached-forward runs
QUICK=(-k "not do_not_recompile and not cached_forward")
rebuild=0 quick=0 args=()
for a in "$@"; do
    case $a in --rebuild) rebuild=1 ;; --quick) quick=1 ;; *) args+=("$a") ;; esac
done
[ ${#args[@]} -gt 0 ] || args=("${DEFAULT[@]}")
[ $quick = 0 ] || args+=("${QUICK[@]}")
say() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }
die() { echo "arm64-tests: $*" >&2; exit 1; }
# what this machine lacks to emulate (exit 77: .ci/run says so and goes on; a failed test is 1)
cannot() { echo "arm64-tests: cannot emulate aarch64 here: $*" >&2; exit 77; }
[ "$(id -u)" = 0 ] || cannot "run as root (debootstrap, binfmt_misc, mounts, chroot)"

# 1. qemu-user-static, binfmt-support, debootstrap from Debian's packages
if ! command -v qemu-aarch64-static update-binfmts debootstrap >/dev/null; then
    say "installing qemu-user-static binfmt-support debootstrap"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static \
        binfmt-support debootstrap >/dev/null; } || cannot "apt-get install qemu-user-static failed"
fi
# binfmt_misc lets the kernel run aarch64 ELF files through qemu: debootstrap's second stage
# (maintainer scripts), pip's build subprocess and tests that start sys.executable all exec
# aarch64 binaries, which `qemu-aarch64-static -L ROOT` alone cannot follow. Here (root in a VM)
# binfmt_misc mounts. Flag F: the kernel opens qemu at registration, so it works in a chroot.
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
    || cannot "no binfmt_misc (a container needs --privileged or a host with it registered)"
update-binfmts --enable qemu-aarch64 2>/dev/null || true
grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 || cannot "qemu-aarch64 binfmt not registered with flag F"

# in_root CMD...: CMD in the root, in a mount namespace of its own (unshare): its mounts, this
# tree at /repo, /proc, /dev and a /proc/cpuinfo for the emulated CPU ($CPUINFO, this run's),
# go when it ends, and are never left behind on the host (so rm -rf of the root is safe)
CPUINFO=$ROOT/tmp/cpuinfo.$$
trap 'rm -f "$CPUINFO"' EXIT
ENV=(HOME=/root PATH=/opt/venv/bin:/usr/bin:/bin LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1)
in_root() {
    # shellcheck disable=SC2016  # expanded by the inner bash
    unshare --mount --propagation private bash -euc '
        root=$1 repo=$2 cpuinfo=$3; shift 3
        mount --bind "$repo" "$root/repo"
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        if [ -s "$cpuinfo" ]; then mount --bind "$cpuinfo" "$root/proc/cpuinfo"; fi
        exec chroot "$root" /usr/bin/env -i -C /repo "$@"' in_root "$ROOT" "$REPO" "$CPUINFO" "${ENV[@]}" QEMU_CPU="$QEMU_CPU" "$@"
}

# 2. the arm64 userland: debootstrap runs its second stage itself through binfmt (no --foreign)
if [ $rebuild = 1 ] || [ ! -e "$ROOT/.tinyoss-root" ]; then
    say "debootstrap arm64 bookworm into $ROOT (some minutes)"
    if [ -n "$(ls -A "$ROOT" 2>/dev/null)" ] && [ ! -e "$ROOT/.tinyoss-root" ] && [ ! -e "$ROOT/.tinyoss-building" ]; then
        die "$ROOT is not empty and not a root of this script's: not removing it"
    fi
    rm -rf "$ROOT" && mkdir -p "$ROOT" && touch "$ROOT/.tinyoss-building"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip \
        bookworm "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 || cannot "debootstrap failed: see $ROOT.log"
    mkdir -p "$ROOT/repo"
    touch "$ROOT/.tinyoss-root" && rm "$ROOT/.tinyoss-building"
fi

# 3. the venv: aarch64 wheels downloaded here by the host's pip (its index, proxy and
# certificates), installed offline inside, with `pip install -e /repo` taking the project's own
# dependencies. numpy, numba, llvmlite, pytest and hypothesis are pinned to the host's versions,
# if it has them. Redone when pyproject.toml or those pins change.
pins=$(python3 -c 'from importlib import metadata as m
for p in ("numpy", "numba", "llvmlite", "pytest", "hypothesis"):
    try: print(f"{p}=={m.version(p)}")
    except m.PackageNotFoundError: pass' 2>/dev/null || true)
stamp=$( (cat "$REPO/pyproject.toml"; echo "$pins") | sha256sum | cut -c1-16)
if [ "$(cat "$ROOT/opt/venv/.tinyoss-stamp" 2>/dev/null)" != "$stamp" ]; then
    say "aarch64 wheels (pins: ${pins//$'\n'/ })"
    wheels=$ROOT/opt/wheels
    rm -rf "$wheels" "$ROOT/opt/venv" && mkdir -p "$wheels"
    echo "$pins" >"$wheels/pins.txt"
    platforms=(--platform manylinux2014_aarch64)  # pip 23 doesn't widen manylinux_2_X itself
    for m in $(seq 17 36); do platforms+=(--platform "manylinux_2_${m}_aarch64"); done  # glibc 2.36
    deps=$(python3 -c 'import sys, tomllib; print("\n".join(tomllib.load(sys.stdin.buffer)["project"]["dependencies"]))' \
        <"$REPO/pyproject.toml")
    # shellcheck disable=SC2086  # one requirement a line
    python3 -m pip download -q -d "$wheels" --only-binary=:all: "${platforms[@]}" --python-version 3.11 \
        --implementation cp --abi cp311 -c "$wheels/pins.txt" $deps pytest hypothesis "setuptools>=68" \
        2> >(grep -v 'is neither a file nor a directory' >&2)  # (noise of a local index's config)
    for w in "$wheels"/*.whl; do  # pip install . pulls nothing x86-only: pure Python or aarch64
        [[ $w == *-none-any.whl || $w == *aarch64.whl ]] || die "neither pure Python nor aarch64: $w"
    done
    say "venv in the root, pip install -e /repo offline (some minutes under emulation)"
    in_root python3 -m venv /opt/venv
    in_root pip install -q --no-index --find-links /opt/wheels -c /opt/wheels/pins.txt -e /repo pytest hypothesis
    echo "pip install -e /repo pulled: $(in_root pip list --format=freeze | tr '\n' ' ')"
    echo "$stamp" >"$ROOT/opt/venv/.tinyoss-stamp"
fi

# 4. what the emulated CPU is to LLVM. qemu-user 7.2 shows the host's x86 /proc/cpuinfo, where
# LLVM finds no aarch64 CPU: 'generic', features -aes,-rand,-sha2,-sve (no +neon). So we write
# the one a Linux kernel would show for QEMU_CPU: its features from the HWCAP bits qemu gives
# the process, implementer and part for the CPUs qemu models (max has none: 'generic' to LLVM).
# (LLVM 20 maps asimd to +neon but not asimddp to +dotprod, here as on real ARM Linux: HWCAP
# bit 20 tells dotprod.) TINYOSS_ARM64_CPUINFO=host keeps the host's.
if [ "${TINYOSS_ARM64_CPUINFO:-}" != host ]; then
    in_root python3 -c 'import ctypes, os
aux = ctypes.CDLL(None).getauxval; aux.restype = ctypes.c_ulong
h1 = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma "
      "lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg")
h2 = "dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 i8mm bf16 dgh rng"
feats = [f for i, f in enumerate(h1.split()) if aux(16) >> i & 1] + [f for i, f in enumerate(h2.split()) if aux(26) >> i & 1]
imp, part = {"cortex-a35": (0x41, 0xd04), "cortex-a53": (0x41, 0xd03), "cortex-a57": (0x41, 0xd07),
             "cortex-a72": (0x41, 0xd08), "cortex-a76": (0x41, 0xd0b), "neoverse-n1": (0x41, 0xd0c),
             "a64fx": (0x46, 0x001)}.get(os.environ["QEMU_CPU"], (0, 0))
line = " ".join(feats)
for n in range(os.cpu_count()):
    print(f"processor\t: {n}\nFeatures\t: {line}\nCPU implementer\t: {imp:#04x}\n"
          f"CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {part:#05x}\nCPU revision\t: 0\n")' \
        >"$CPUINFO.new"
    mv "$CPUINFO.new" "$CPUINFO"
    echo "QEMU_CPU=$QEMU_CPU: $(grep -m1 Features "$CPUINFO")"
fi
pass=()  # the variables passed through
for v in $(compgen -e); do [[ $v =~ ^(TINYOSS|NUMBA|PYTEST|HYPOTHESIS)_ ]] && pass+=("$v=${!v}"); done
say "QEMU_CPU=$QEMU_CPU as LLVM/numba see it"
in_root "${pass[@]}" python -c 'import llvmlite.binding as llvm; llvm.initialize_native_target()
print("cpu:", llvm.get_host_cpu_name(), "| triple:", llvm.get_process_triple())
print("features:", llvm.get_host_cpu_features().flatten() or "(none)")
from tinyoss import simd; print("tinyoss.simd: KERNELS", simd.KERNELS, "HAVE_NEON", simd.HAVE_NEON, "HAVE_DOTPROD", simd.HAVE_DOTPROD, "HAVE_SIMD", simd.HAVE_SIMD)'

# 5. pytest on this tree. Compiled kernels are cached in the root, not in the tree beside the
# host's (one folder per version of simd.py, as tests/conftest.py does); bytecode too.
simd=$(sha256sum "$REPO/tinyoss/simd.py" | cut -c1-12)
say "pytest ${args[*]}"
status=0
in_root NUMBA_CACHE_DIR="/root/.cache/numba/$simd" PYTHONPYCACHEPREFIX=/root/.cache/pycache "${pass[@]}" \
    python -m pytest -p no:cacheprovider --durations=10 "${args[@]}" || status=$?
say "done: pytest exited $status"
exit $status
