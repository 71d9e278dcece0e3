"""Times cuBLAS (cublasGemmEx, the call the library makes) on the LoRA rank-product shapes of a
Llama-3-8B step, whole and split into row chunks, to pick a split that cuBLAS handles well.

Needs torch with CUDA (allocation, graphs and event timing). Run on the GPU machine:
    python3 bench/rank_shapes.py [--rank 16] [--lib /usr/local/cuda/lib64/libcublas.so]
Prints a table, one line per shape: microseconds per product, whole and per split.
"""

import argparse
import ctypes
import glob
import os
import time

import torch

CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUDA_R_32F, CUDA_R_16BF = 0, 14
COMPUTE_32F, COMPUTE_32F_FAST_TF32 = 68, 77
GEMM_DEFAULT = -1


def load_cublas(path):
    """`path`, or else the libcublas torch loaded (its process maps name the file)."""
    torch.zeros(1, device="cuda") @ torch.zeros(1, 1, device="cuda").squeeze(0)
    if path:
        return ctypes.CDLL(path)
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if "libcublas.so" in path and "Lt" not in path:
                return ctypes.CDLL(path)
    for path in glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libcublas.so*")):
        return ctypes.CDLL(path)
    return ctypes.CDLL("libcublas.so")


PARSER = argparse.ArgumentParser()
PARSER.add_argument("--rank", type=int, default=16)
PARSER.add_argument("--lib", help="the libcublas.so to time (default: torch's)")
PARSER.add_argument(
    "--eager",
    action="store_true",
    help="time calls queued one by one (behind a long product) instead of replaying a graph",
)
PARSER.add_argument(
    "--host",
    action="store_true",
    help="time the host's side of each call instead (on a side stream kept busy), with cuBLAS's "
    "default workspace and with one set by cublasSetWorkspace",
)
ARGS = PARSER.parse_args()
LIB = load_cublas(ARGS.lib)
HANDLE = ctypes.c_void_p()
assert LIB.cublasCreate_v2(ctypes.byref(HANDLE)) == 0


def gemm(a, trans_a, b, trans_b, c, beta, tf32):
    """Row-major c[m, n] = op(a)·op(b) + beta·c as the column-major cᵀ = op(b)ᵀ·op(a)ᵀ."""
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    alpha_v, beta_v = ctypes.c_float(1.0), ctypes.c_float(beta)
    dtype = CUDA_R_16BF if a.dtype == torch.bfloat16 else CUDA_R_32F
    compute = COMPUTE_32F_FAST_TF32 if tf32 else COMPUTE_32F
    status = LIB.cublasGemmEx(
        HANDLE,
        CUBLAS_OP_T if trans_b else CUBLAS_OP_N,
        CUBLAS_OP_T if trans_a else CUBLAS_OP_N,
        n, m, k,
        ctypes.byref(alpha_v),
        ctypes.c_void_p(b.data_ptr()), dtype, b.stride(0),
        ctypes.c_void_p(a.data_ptr()), dtype, a.stride(0),
        ctypes.byref(beta_v),
        ctypes.c_void_p(c.data_ptr()), CUDA_R_32F, c.stride(0),
        compute, GEMM_DEFAULT,
    )
    assert status == 0, f"cublasGemmEx status {status}"


def by_rows(a, trans_a, b, trans_b, c, tf32, rows):
    """The product split into chunks of `rows` output rows (rows of op(a))."""
    m = c.shape[0]
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        ac = a[:, r0:r1] if trans_a else a[r0:r1]
        gemm(ac, trans_a, b, trans_b, c[r0:r1], 0.0, tf32)


def by_inner(a, trans_a, b, trans_b, c, tf32, inner):
    """The product split along the inner dimension, chunks accumulated in order (beta 1)."""
    k = a.shape[0] if trans_a else a.shape[1]
    for k0 in range(0, k, inner):
        k1 = min(k, k0 + inner)
        ac = a[k0:k1] if trans_a else a[:, k0:k1]
        bc = b[:, k0:k1] if trans_b else b[k0:k1]
        gemm(ac, trans_a, bc, trans_b, c, 0.0 if k0 == 0 else 1.0, tf32)


def median_us(fn, reps=20, calls=20):
    """Median device time of one `fn`: `calls` of it captured in a CUDA graph (so Python's
    launch overhead stays out), the graph replayed `reps` times between events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        assert LIB.cublasSetStream_v2(HANDLE, ctypes.c_void_p(stream.cuda_stream)) == 0
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    assert LIB.cublasSetStream_v2(HANDLE, ctypes.c_void_p(0)) == 0
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    times.sort()
    return times[len(times) // 2]


def eager_us(fn, reps=10, calls=20):
    """Median device time of one `fn`, `calls` of them queued between two events behind a long
    product (so the host's launch time stays hidden), no graph."""
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    assert LIB.cublasSetStream_v2(HANDLE, ctypes.c_void_p(0)) == 0
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        big @ big
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    times.sort()
    return times[len(times) // 2]


def host_us(fn, workspace, calls=10):
    """Host microseconds per `fn` call, queued on a side stream behind a long product so the
    host never waits for the GPU; `workspace` (a tensor or None) is handed to cuBLAS first."""
    stream = torch.cuda.Stream()
    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times = []
    with torch.cuda.stream(stream):
        assert LIB.cublasSetStream_v2(HANDLE, ctypes.c_void_p(stream.cuda_stream)) == 0
        if workspace is not None:
            ptr, size = ctypes.c_void_p(workspace.data_ptr()), workspace.numel()
            assert LIB.cublasSetWorkspace_v2(HANDLE, ptr, ctypes.c_size_t(size)) == 0
        fn()
        for _ in range(5):
            big @ big
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - start) * 1e6 / calls)
    torch.cuda.synchronize()
    assert LIB.cublasSetStream_v2(HANDLE, ctypes.c_void_p(0)) == 0
    times.sort()
    return times[len(times) // 2]


def operand(shape, trans, dtype):
    rows, cols = shape
    t = torch.randn((cols, rows) if trans else (rows, cols), device="cuda", dtype=dtype)
    return t


def check(fn_split, a, trans_a, b, trans_b, c_shape, tf32):
    """The split product equals the whole one up to rounding."""
    whole = torch.empty(c_shape, device="cuda")
    split = torch.full(c_shape, float("nan"), device="cuda")
    gemm(a, trans_a, b, trans_b, whole, 0.0, tf32)
    fn_split(split)
    err = ((split - whole).norm() / whole.norm()).item()
    assert err < 1e-3, f"split product differs: {err}"


def main():
    version = ctypes.c_int()
    assert LIB.cublasGetVersion_v2(HANDLE, ctypes.byref(version)) == 0
    print(f"cuBLAS {version.value} ({LIB._name})")
    r = ARGS.rank
    bf, f32 = torch.bfloat16, torch.float32
    if ARGS.host:
        print(f"{'product (host µs a call)':44} {'default':>8} {'set':>8}")
    elif ARGS.eager:
        print(f"{'product':44} {'graph':>8} {'eager':>8}")
    else:
        print(f"{'product':44} {'whole':>8} " + " ".join(f"{x:>8}" for x in ("1024", "512", "256")))
    workspace = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    for tokens in (1024, 2048, 8192):
        for dim_in, dim_out in ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)):
            # (label, m, k, n, trans_a, trans_b, dtype, tf32, split kind)
            shapes = [
                ("x·Aᵀ", tokens, dim_in, r, False, True, bf, False, "rows"),
                ("xa·Bᵀ", tokens, r, dim_out, False, True, f32, True, "rows"),
                ("dy·B", tokens, dim_out, r, False, False, bf, False, "rows"),
                ("dxa·A", tokens, r, dim_in, False, False, f32, True, "rows"),
                ("dyᵀ·xa", dim_out, tokens, r, True, False, bf, False, "inner"),
                ("dxaᵀ·x", r, tokens, dim_in, True, False, bf, False, "inner"),
            ]
            for label, m, k, n, ta, tb, dtype, tf32, kind in shapes:
                a = operand((m, k), ta, dtype)
                b = operand((k, n), tb, dtype)
                c = torch.empty((m, n), device="cuda")
                whole = lambda: gemm(a, ta, b, tb, c, 0.0, tf32)
                if ARGS.host:
                    cells = [host_us(whole, None), host_us(whole, workspace)]
                    chunks = ()
                else:
                    cells = [median_us(whole), eager_us(whole)] if ARGS.eager else [median_us(whole)]
                    chunks = () if ARGS.eager else (1024, 512, 256)
                for chunk in chunks:
                    split = by_rows if kind == "rows" else by_inner

                    def run(out=c, chunk=chunk, split=split):
                        split(a, ta, b, tb, out, tf32, chunk)

                    check(lambda out: run(out), a, ta, b, tb, (m, n), tf32)
                    cells.append(median_us(run))
                t = lambda x: "T" if x else ""
                name = f"{label} {m}{t(ta)}x{k}x{n}{t(tb)} {'tf32' if tf32 else str(dtype)[6:]}"
                print(f"{name:44} " + " ".join(f"{x:8.1f}" for x in cells), flush=True)


if __name__ == "__main__":
    main()
