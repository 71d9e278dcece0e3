#!/usr/bin/env python3
"""Compiles one kernels/ program the way the library does (prelude.cuh + PROGRAM.cu, NVRTC) for
an architecture and prints, per kernel entry, ptxas's registers and spill stores and the machine
code's instruction mix (all, uniform-datapath, warpgroup products and the groups they close,
special-function ops, exp2s placed while a product group is in flight), with no GPU: variants of a kernel can be compared for instruction counts
before any timing, and products ptxas serialized (as many groups as products; NVRTC's log does
not report it) show.

    scripts/kernel_sass.py flash                          # kernels/flash.cu, sm_90a
    scripts/kernel_sass.py flash --source /tmp/variant.cu --sass /tmp/variant.sass

NVRTC comes from scripts/fetch-nvrtc.sh, the disassembler (cuobjdump, which runs nvdisasm) from
the PyPI wheels nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm, fetched once into
.cache/cuobjdump.
"""
import argparse
import collections
import ctypes
import os
import re
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_TOOLS_VERSION = "13.5.37"


def cuobjdump():
    """The cuobjdump binary and the nvdisasm it runs, fetched once; returns (path, env)."""
    cache = os.path.join(ROOT, ".cache", "cuobjdump")
    bindir = os.path.join(cache, "nvidia", "cu13", "bin")
    for tool in ("cuobjdump", "nvdisasm"):
        if os.path.exists(os.path.join(bindir, tool)):
            continue
        os.makedirs(cache, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary=:all:", "-d", cache,
                        f"nvidia-cuda-{tool}=={CUDA_TOOLS_VERSION}"], check=True)
        wheel = next(f for f in os.listdir(cache) if f.endswith(".whl"))
        with zipfile.ZipFile(os.path.join(cache, wheel)) as z:
            z.extractall(cache)
        os.remove(os.path.join(cache, wheel))
        os.chmod(os.path.join(bindir, tool), 0o755)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    return os.path.join(bindir, "cuobjdump"), env


def compile_cubin(source, arch):
    """(cubin bytes, ptxas log) of prelude.cuh + source, or exits with NVRTC's log."""
    libdir = subprocess.run([os.path.join(ROOT, "scripts", "fetch-nvrtc.sh")], check=True,
                            capture_output=True, text=True).stdout.strip()
    # libnvrtc loads its builtins library by name: preload it from the same directory.
    ctypes.CDLL(os.path.join(libdir, "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    nvrtc = ctypes.CDLL(os.path.join(libdir, "libnvrtc.so.13"))
    with open(os.path.join(ROOT, "kernels", "prelude.cuh")) as p, open(source) as s:
        text = p.read() + "\n" + s.read()
    prog = ctypes.c_void_p()
    nvrtc.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), os.path.basename(source).encode(),
                             0, None, None)
    opts = [b"-std=c++17", f"--gpu-architecture={arch}".encode(), b"--ptxas-options=-v"]
    status = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if status != 0:
        sys.exit(f"{source}: NVRTC failed\n{log.value.decode()}")
    nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetCUBIN(prog, cubin)
    return cubin.raw, log.value.decode()


def instruction_mix(sass):
    """Per function: a Counter of opcodes (predicates and modifiers dropped), how many warpgroup
    products close a group (the `gsb0` operand: the ones a wait can name), and how many exp2s
    (MUFU.EX2) lie where a product group is still in flight. ptxas serializes the products (one
    group each, each awaited) when it cannot keep them in flight: then every HGMMA closes a
    group. And it may move a wait ahead of work meant to run beside a product (bench/NOTES.md,
    2026-12-05): then that work's exp2s no longer count as overlapped. The count walks the code
    in address order, a group opened by each closing HGMMA and `WARPGROUP.DEPBAR.LE gsb0, N`
    leaving at most N open; branches are not followed, so it is a guide, not a proof."""
    mix, groups = collections.defaultdict(collections.Counter), collections.Counter()
    exp2, overlapped = collections.Counter(), collections.Counter()
    function, open_groups = None, 0
    for line in sass.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            function, open_groups = m.group(1), 0
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m and function:
            text = re.sub(r"^@!?U?P[T0-9]+\s+", "", m.group(1).strip())
            op = text.split()[0]
            mix[function][op.split(".")[0]] += 1
            if op.startswith("HGMMA") and "gsb0" in text:
                groups[function] += 1
                open_groups += 1
            wait = re.match(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", text)
            if wait:
                open_groups = min(open_groups, int(wait.group(1), 16))
            if op == "MUFU.EX2":
                exp2[function] += 1
                overlapped[function] += open_groups > 0
    return mix, groups, exp2, overlapped


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("program", help="a kernels/ program: flash, attention, pointwise, ...")
    ap.add_argument("--source", help="a variant of kernels/PROGRAM.cu to compile instead")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--sass", help="also write the disassembly here")
    args = ap.parse_args()
    source = args.source or os.path.join(ROOT, "kernels", f"{args.program}.cu")
    cubin, log = compile_cubin(source, args.arch)
    path = os.path.join(ROOT, ".cache", f"kernel_sass-{args.program}.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    exe, env = cuobjdump()
    sass = subprocess.run([exe, "-sass", path], check=True, capture_output=True, text=True,
                          env=env).stdout
    if args.sass:
        with open(args.sass, "w") as f:
            f.write(sass)
    usage = {}
    for m in re.finditer(r"entry function '(\w+)'.*?(\d+) bytes spill stores.*?Used (\d+) "
                         r"registers", log, re.S):
        usage[m.group(1)] = (int(m.group(3)), int(m.group(2)))
    print(f"{'kernel':<28} {'regs':>5} {'spill B':>8} {'instr':>7} {'uniform':>8} "
          f"{'HGMMA':>6} {'groups':>6} {'MUFU':>5} {'EX2 beside products':>20}")
    mix, groups, exp2, overlapped = instruction_mix(sass)
    for function, ops in sorted(mix.items()):
        regs, spill = usage.get(function, ("?", "?"))
        uniform = sum(n for op, n in ops.items() if op.startswith("U"))
        beside = f"{overlapped[function]} of {exp2[function]}" if exp2[function] else "-"
        print(f"{function:<28} {regs:>5} {spill:>8} {sum(ops.values()):>7} {uniform:>8} "
              f"{ops['HGMMA']:>6} {groups[function]:>6} {ops['MUFU']:>5} {beside:>20}")


if __name__ == "__main__":
    main()
