"""The NEON kernels' aarch64 assembly, from any machine: instructions per 32 weights.

    python benchmarks/neon_asm.py [--cpu cortex-a76] [--show] [--peer quants.s ...]

Emulation (scripts/arm64-tests.sh) proves the aarch64 kernels right but says nothing of their
speed, so this counts instructions instead. It builds the IR of simd.py's NEON paths (the exact
float MXFP4 row dot, the int8-input row dots with and without dotprod, the block decoder of
prefill's tiles) into functions of their own, compiles them with LLVM's AArch64 backend (llvmlite
has it on every platform) for --cpu, and counts the instructions of each one-block-a-step loop
(a block is 32 weights). simd.py picks its paths at import by the CPU it runs on, so on x86 this
script sets its NEON flags by hand: what it compiles is the IR an aarch64 machine would build.

--peer counts the loops of llama.cpp's NEON MXFP4 dot product (ggml_vec_dot_mxfp4_q8_0, two
blocks a step) in assembly compiled from its source, e.g. with Debian's gcc-aarch64-linux-gnu in
ggml/src: `aarch64-linux-gnu-gcc -O3 -march=armv8.2-a+dotprod -S -I. -Iggml-cpu -I../include
-DNDEBUG -D_GNU_SOURCE ggml-cpu/arch/arm/quants.c -o quants.s` (and -march=armv8-a).
"""

from __future__ import annotations

import argparse
import collections
import re

import llvmlite.binding as llvm
from llvmlite import ir

from tinyoss import simd


def _function(module, name, arg_types):
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), arg_types), name)
    return fn, ir.IRBuilder(fn.append_basic_block("entry"))


_STEP = {"mxfp4_row_dot": "a block of one row, one x", "mxfp4_row_dots_x4": "a block, four x",
         "mxfp4_q8_row_dots": "a block of two rows", "mxfp4_block_decode": "a block"}
_FLAGS = ("HAVE_NEON", "HAVE_DOTPROD", "HAVE_AVX2", "HAVE_AVX512", "HAVE_VNNI512", "Q8_OFFSETS")


def build(dotprod: bool) -> ir.Module:
    """One function a kernel, each with a loop over nb blocks of one row (two rows for the int8
    one, simd.MXFP4_Q8_ROWS on aarch64). simd's flags are those of an aarch64 CPU meanwhile."""
    saved = {flag: getattr(simd, flag) for flag in _FLAGS}
    for flag in _FLAGS:
        setattr(simd, flag, flag == "HAVE_NEON" or flag == "HAVE_DOTPROD" and dotprod)
    try:
        return _build()
    finally:
        for flag, value in saved.items():
            setattr(simd, flag, value)


def _build() -> ir.Module:
    module = ir.Module("neon")
    module.triple = "aarch64-unknown-linux-gnu"
    u8p, f32p, i8p = (ir.IntType(8).as_pointer(), ir.FloatType().as_pointer(),
                      ir.IntType(8).as_pointer())
    i64 = ir.IntType(64)

    fn, b = _function(module, "mxfp4_row_dot", [u8p, u8p, f32p, f32p, i64, f32p])
    bptr, sptr, tptr, xptr, nb, optr = fn.args
    simd._mxfp4_dots(b, bptr, sptr, tptr, xptr, simd._const(0), nb, optr, simd._const(0), 1, 1,
                     True)
    b.ret_void()

    fn, b = _function(module, "mxfp4_row_dots_x4", [u8p, u8p, f32p, f32p, i64, i64, f32p])
    bptr, sptr, tptr, xptr, x_len, nb, optr = fn.args
    simd._mxfp4_dots(b, bptr, sptr, tptr, xptr, x_len, nb, optr, simd._const(1), 1, 4, False)
    b.ret_void()

    fn, b = _function(module, "mxfp4_q8_row_dots", [u8p, u8p, f32p, i8p, f32p, f32p, i64, f32p])
    bptr, sptr, tptr, qptr, dptr, cptr, nb, optr = fn.args
    simd._mxfp4_q8_dots(b, bptr, sptr, tptr, qptr, dptr, cptr, nb, optr, 2)  # MXFP4_Q8_ROWS
    b.ret_void()

    fn, b = _function(module, "mxfp4_block_decode", [u8p, f32p, i64])
    bptr, optr, nb = fn.args
    with simd.cgutils.for_range(b, nb) as loop:  # blocks one after the other, as prefill's tiles
        w = simd._e2m1_decode_neon(b, b.gep(bptr, [b.mul(loop.index, simd._const(16))]),
                                   natural=True)
        for k, v in enumerate(w):
            b.store(v, b.bitcast(b.gep(optr, [b.add(b.mul(loop.index, simd._const(32)),
                                                     simd._const(8 * k))]), v.type.as_pointer()),
                    align=4)
    b.ret_void()
    return module


def assembly(module: ir.Module, cpu: str, features: str) -> str:
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    target = llvm.Target.from_triple(module.triple)
    machine = target.create_target_machine(cpu=cpu, features=features, opt=3)
    mod = llvm.parse_assembly(str(module))
    mod.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    passes = llvm.create_pass_builder(machine, pto)
    passes.getModulePassManager().run(mod, passes)
    return machine.emit_assembly(mod)


_LABEL = re.compile(r"^(\.?[\w.$]+):")
_VECTOR = re.compile(r"\bv\d+\.|\bq\d+\b")  # an instruction on a NEON register


def loops(asm: str) -> dict[str, list[list[str]]]:
    """Each function's loops: the instructions from a label to a branch back to it."""
    out: dict[str, list[list[str]]] = collections.defaultdict(list)
    fn, body, labels = None, [], {}
    for line in asm.splitlines():
        text = line.split("//")[0].strip()
        if not text or text.startswith(".") and not _LABEL.match(text):
            continue
        m = _LABEL.match(text)
        if m:
            name = m.group(1)
            if not name.startswith("."):
                fn, body, labels = name, [], {}
            labels[name] = len(body)
            continue
        body.append(text)
        op, *args = text.replace(",", " ").split()
        if op.startswith("b") and args and args[-1] in labels:  # a branch back: a loop
            out[fn].append(body[labels[args[-1]]:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", default="cortex-a76", help="LLVM's name of the aarch64 CPU")
    ap.add_argument("--show", action="store_true", help="print the loops' instructions")
    ap.add_argument("--peer", nargs="*", default=[], help="assembly files of llama.cpp's quants.c")
    args = ap.parse_args()
    for dotprod in (True, False):
        features = "+neon" + (",+dotprod" if dotprod else ",-dotprod")
        asm = assembly(build(dotprod), args.cpu, features)
        print(f"## {args.cpu} {features}")
        for fn, found in loops(asm).items():
            if fn != "mxfp4_q8_row_dots" and not dotprod:
                continue  # only the int8 kernel differs without dotprod
            for body in found:
                vector = sum(1 for i in body if _VECTOR.search(i))
                print(f"{fn:22s} loop of {len(body):3d} instructions ({vector} vector): "
                      f"{_STEP[fn]}")
                if args.show:
                    print("    " + "\n    ".join(body))
    for path in args.peer:
        with open(path) as f:
            found = loops(f.read()).get("ggml_vec_dot_mxfp4_q8_0", [])
        body = max(found, key=lambda b: sum(1 for i in b if _VECTOR.search(i)))  # the NEON loop
        vector = sum(1 for i in body if _VECTOR.search(i))
        print(f"## {path}\nggml_vec_dot_mxfp4_q8_0 loop of {len(body):3d} instructions ({vector} "
              "vector) for two blocks")


if __name__ == "__main__":
    main()
