// dequant_bench.cu: times kernels/nf4.cu's bf16 dequantization kernel alone on matrices of the
// models' shapes (random codes, double-quantized scales), dense and with the spare columns of a
// folded product. Prints one JSON line per shape: µs a call (median of 20), GB/s moved, and a
// hash of the output's bits, so that variants of the kernel (other files given as NF4_SRC) can
// be compared for speed and checked to write the same values. Build and run on a GPU machine:
//   nvcc -O3 -arch=sm_90a -I kernels -DNF4_SRC='"nf4.cu"' bench/nf4/dequant_bench.cu -o /tmp/nf4b
//   /tmp/nf4b
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../cuda_check.cuh"
#include "prelude.cuh"
#include NF4_SRC


int main() {
    // Gemma-7B's MLP (dense, folded), Llama-3-8B's q and MLP (folded), a short dense odd one.
    const int shapes[][3] = {{24576, 3072, 3072}, {24576, 3072, 3088}, {3072, 24576, 24592},
                             {4096, 3072, 3088},  {14336, 4096, 4112}, {1001, 77, 77}};
    for (const auto& s : shapes) {
        const long long rows = s[0], cols = s[1], pitch = s[2], n = rows * cols;
        const long long bytes_in = (n + 1) / 2, blocks = (n + 63) / 64, groups = (blocks + 255) / 256;
        std::vector<unsigned char> packed(bytes_in), codes(blocks);
        std::vector<float> nested(groups), map(256);
        unsigned int x = 12345;
        auto next = [&]() { return x = x * 1664525u + 1013904223u; };
        for (auto& p : packed) p = (unsigned char)(next() >> 24);
        for (auto& c : codes) c = (unsigned char)(next() >> 24);
        for (auto& v : nested) v = 0.01f + (next() >> 8) * 1e-9f;
        for (int i = 0; i < 256; ++i) map[i] = -1.0f + 2.0f * i / 255.0f;
        const float offset = 0.02f;
        unsigned char *dp, *dc;
        float *dn, *dm, *doff;
        bf16_t* out;
        CK(cudaMalloc(&dp, bytes_in));
        CK(cudaMalloc(&dc, blocks));
        CK(cudaMalloc(&dn, groups * 4));
        CK(cudaMalloc(&dm, 1024));
        CK(cudaMalloc(&doff, 4));
        CK(cudaMalloc(&out, rows * pitch * 2));
        CK(cudaMemcpy(dp, packed.data(), bytes_in, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dc, codes.data(), blocks, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dn, nested.data(), groups * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(dm, map.data(), 1024, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(doff, &offset, 4, cudaMemcpyHostToDevice));
        CK(cudaMemset(out, 0, rows * pitch * 2));
        const long long g = ((n + 63) / 64 + 255) / 256;
        const unsigned int grid = (unsigned int)(g < 65535 ? g : 65535);
        auto launch = [&]() {
            nf4_dequantize_bf16<<<grid, 256>>>(dp, nullptr, dc, dn, dm, doff, out, n, (int)cols,
                                               pitch, nullptr, 0, 0, 0, 0.0f);
        };
        const double us = 1e3 * time_ms(20, launch);
        std::vector<bf16_t> h(rows * pitch);
        CK(cudaMemcpy(h.data(), out, rows * pitch * 2, cudaMemcpyDeviceToHost));
        unsigned long long hash = 1469598103934665603ull;  // FNV-1a over the output's bits
        for (bf16_t v : h) hash = (hash ^ v) * 1099511628211ull;
        const double bytes = bytes_in + 2.0 * n + blocks;
        printf("{\"rows\":%lld,\"cols\":%lld,\"pitch\":%lld,\"us\":%.1f,\"GBps\":%.0f,"
               "\"hash\":\"%016llx\"}\n",
               rows, cols, pitch, us, bytes / us * 1e-3, hash);
        cudaFree(dp), cudaFree(dc), cudaFree(dn), cudaFree(dm), cudaFree(doff), cudaFree(out);
    }
    return 0;
}
