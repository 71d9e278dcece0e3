#!/usr/bin/env python3
"""Registers and spill stores of each kernel entry, as ptxas reports them through NVRTC.

Compiles kernels/prelude.cuh followed by a kernel file the way the library does
(src/backend/cuda/kernels.rs: -std=c++17, the target architecture), with ptxas's verbose
output on, and prints one line per entry. Needs no GPU: NVRTC comes from scripts/fetch-nvrtc.sh.
A warpgroup kernel that spills shows it here before any device run; products that ptxas
serializes do not (NVRTC's log leaves that message out): scripts/kernel_sass.py's groups column
shows them.

Usage: scripts/kernel_registers.py [FILE ...] [--arch sm_90a] [-DNAME[=VALUE] ...]
FILE defaults to kernels/flash.cu; each is compiled as its own program.
"""
import argparse
import ctypes
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_nvrtc():
    libdir = subprocess.check_output([os.path.join(ROOT, "scripts", "fetch-nvrtc.sh")], text=True)
    libdir = libdir.strip()
    # libnvrtc opens its builtins library by name at compile time: load that one first.
    ctypes.CDLL(os.path.join(libdir, "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(os.path.join(libdir, "libnvrtc.so.13"))


def compile_log(nvrtc, path, arch, defines):
    """ptxas's log for kernels/prelude.cuh + `path`; exits with NVRTC's log if it fails."""
    name = os.path.basename(path)
    with open(os.path.join(ROOT, "kernels", "prelude.cuh")) as f:
        prelude = f.read()
    with open(path) as f:
        body = f.read()
    src = f'{prelude}\n#line 1 "{name}"\n{body}'
    prog = ctypes.c_void_p()
    rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None)
    if rc != 0:
        sys.exit(f"{name}: nvrtcCreateProgram failed ({rc})")
    opts = ["-std=c++17", f"--gpu-architecture={arch}", "--ptxas-options=-v"] + defines
    argv = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), argv)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, buf)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    log = buf.value.decode(errors="replace")
    if rc != 0:
        sys.exit(f"{name}: compiling for {arch} failed ({rc}):\n{log}")
    return log


def entries(log):
    """(entry, registers, spill-store bytes) per kernel entry, and ptxas's warnings."""
    rows, warnings, entry, spills = [], [], None, "?"
    for line in log.splitlines():
        if "warning" in line.lower():
            warnings.append(line.strip())
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            entry, spills = m.group(1), "?"
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and entry:
            spills = m.group(1)
        m = re.search(r"Used (\d+) registers", line)
        if m and entry:
            rows.append((entry, int(m.group(1)), spills))
            entry = None
    return rows, warnings


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", default=[os.path.join(ROOT, "kernels", "flash.cu")])
    ap.add_argument("--arch", default="sm_90a")
    args, defines = ap.parse_known_args()
    nvrtc = load_nvrtc()
    for path in args.files:
        rows, warnings = entries(compile_log(nvrtc, path, args.arch, defines))
        for w in warnings:
            print(f"{os.path.basename(path)}: {w}")
        for entry, regs, spills in rows:
            print(f"{entry}: {regs} registers, {spills} bytes spill stores")


if __name__ == "__main__":
    main()
