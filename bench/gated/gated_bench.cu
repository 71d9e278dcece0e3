// gated_bench.cu: times kernels/pointwise.cu's rounded gated kernels (gated_act_fwd_bf16,
// gated_act_bwd_bf16 writing h too) alone on the MLP chunks of the models' shapes (bf16
// operands with a folded product's spare columns, random values) and on a short odd one. Prints
// one JSON line per kernel and shape: µs a call (median of 20), GB/s moved, and a hash of the
// outputs' bits, so that variants of the file (given as GATED_SRC, launched with GATED_GROUP
// values a thread) can be compared for speed and checked to write the same values. Build and
// run on a GPU machine:
//   nvcc -O3 -arch=sm_90a -std=c++17 -I kernels -DGATED_SRC='"pointwise.cu"' -DGATED_GROUP=8 \
//       bench/gated/gated_bench.cu -o /tmp/gated && /tmp/gated
#include <cuda_runtime.h>
#include <cstdio>
#include <vector>

#include "../cuda_check.cuh"
#include "prelude.cuh"
#include GATED_SRC

#ifndef GATED_GROUP
#define GATED_GROUP 4
#endif

// FNV-1a over a device matrix's bits.
static unsigned long long hash_bits(const bf16_t* d, long long n, unsigned long long h) {
    std::vector<bf16_t> v(n);
    CK(cudaMemcpy(v.data(), d, n * 2, cudaMemcpyDeviceToHost));
    for (bf16_t x : v) h = (h ^ x) * 1099511628211ull;
    return h;
}

int main() {
    // {rows, cols, pitch}: Llama 3 8B's and Gemma 7B's 4,096-row MLP chunks with a rank-16
    // product's spare columns, and an odd short one (no octets: one element at a time at its end).
    const long long shapes[][3] = {{4096, 14336, 14352}, {2048, 24576, 24592}, {7, 100, 100}};
    for (const auto& s : shapes) {
        const long long rows = s[0], cols = s[1], pitch = s[2], n = rows * cols, all = rows * pitch;
        std::vector<bf16_t> host(all);
        unsigned int x = 12345;
        bf16_t* in[3];  // dh, g, u
        for (auto& p : in) {
            // Magnitudes 2^-7 .. ~2^8, either sign: the activation's whole range, never NaN.
            for (auto& v : host) {
                x = x * 1664525u + 1013904223u;
                v = (bf16_t)(0x3c00u + (x >> 20) % 0x0700u) | (bf16_t)((x >> 8) & 0x8000u);
            }
            CK(cudaMalloc(&p, all * 2));
            CK(cudaMemcpy(p, host.data(), all * 2, cudaMemcpyHostToDevice));
        }
        bf16_t* out[3];  // dg, du, h
        for (auto& p : out) {
            CK(cudaMalloc(&p, all * 2));
            CK(cudaMemset(p, 0, all * 2));
        }
        const long long threads = (n + GATED_GROUP - 1) / GATED_GROUP;
        const long long blocks = (threads + 255) / 256;
        const unsigned int grid = (unsigned int)(blocks < 65535 ? blocks : 65535);
        const double fwd = 1e3 * time_ms(20, [&]() {
            gated_act_fwd_bf16<<<grid, 256>>>(in[1], 1, pitch, in[2], 1, pitch, out[2], n, 0,
                                              (int)cols, pitch);
        });
        const unsigned long long fh = hash_bits(out[2], all, 1469598103934665603ull);
        const double bwd = 1e3 * time_ms(20, [&]() {
            gated_act_bwd_bf16<<<grid, 256>>>(in[0], 1, pitch, in[1], 1, pitch, in[2], 1, pitch,
                                              out[0], out[1], out[2], n, 0, (int)cols, pitch);
        });
        unsigned long long bh = 1469598103934665603ull;
        for (auto p : out) bh = hash_bits(p, all, bh);
        printf("{\"kernel\":\"fwd\",\"rows\":%lld,\"cols\":%lld,\"us\":%.1f,\"GBps\":%.0f,"
               "\"hash\":\"%016llx\"}\n",
               rows, cols, fwd, 6.0 * n / fwd * 1e-3, fh);
        printf("{\"kernel\":\"bwd\",\"rows\":%lld,\"cols\":%lld,\"us\":%.1f,\"GBps\":%.0f,"
               "\"hash\":\"%016llx\"}\n",
               rows, cols, bwd, 12.0 * n / bwd * 1e-3, bh);
        for (auto p : in) cudaFree(p);
        for (auto p : out) cudaFree(p);
    }
    return 0;
}
