// flash_bench.cu: times kernels/flash.cu's three training kernels alone and writes their outputs,
// so kernel variants can be compared for speed and against each other for values without the
// library. Build (nvcc, on a GPU machine): see bench/flash/run.sh.
//   flash_bench SEQ HEADS KV_HEADS HEAD_DIM SPLIT REPS OUTDIR
// SPLIT > 0 packs two segments into the row (tokens >= SPLIT are segment 1).
// -DFLASH_BENCH_GRADS_BF16: dQ, dK and dV written as the library writes product inputs (bf16, dq
// and dk turned back by RoPE's angles at positions 0..SEQ-1, base 500000), saved as .bf16 files;
// dK/dV then runs in one part (the library writes bf16 only from one part, and sums the slabs of
// a split launch into them afterwards), so the cases the library splits are timed unsplit.
#include <cuda_runtime.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../cuda_check.cuh"
#include "prelude.cuh"
#include FLASH_SRC

// Kernels of 64 query rows unless the source says more (then Q has tiles of its own). The
// kernels get the library's shared memory (src/backend/cuda/mod.rs, flash_shared): on sm_90a the
// warpgroup versions' unpadded tiles (fwd 7 in sources before flash_fwd_ws, 5 at head_dim 256;
// dq 6; dkdv 6), for the mma.sync builds (FLASH_BENCH_MMA_SYNC) padded rows (fwd 4, dq 4,
// dkdv 5). The host pass of this file cannot see which version the device code holds: run.sh
// names it.
#ifdef FLASH_BENCH_MMA_SYNC
#define FLASH_ROW_PAD 8
#define FLASH_WG_TILES(wg, sync) (sync)
#else
#define FLASH_ROW_PAD 0
#define FLASH_WG_TILES(wg, sync) (wg)
#endif
#ifdef FLASH_FWD_ROWS
#define FLASH_FWD_TILES(hd) (FLASH_FWD_ROWS / 64 + 4)
#else
#define FLASH_FWD_ROWS 64
#define FLASH_FWD_TILES(hd) FLASH_WG_TILES((hd) <= 128 ? 7 : 5, 4)
#endif
#ifndef FLASH_DQ_ROWS
#define FLASH_DQ_ROWS 64
#endif
#ifndef FLASH_DQ_TILES
#define FLASH_DQ_TILES FLASH_WG_TILES(6, 4)
#endif
#define FLASH_DKDV_TILES FLASH_WG_TILES(6, 5)

// The warp-specialized forward (flash_fwd_ws: 128 queries a block of 384 threads, head_dim 64 and
// 128) where the source has one and the build is for sm_90a.
#if defined(FLASH_WS_ROWS) && !defined(FLASH_BENCH_MMA_SYNC)
#define FLASH_WS_ENTRY flash_fwd_ws
#else
#define FLASH_WS_ENTRY nullptr
#define FLASH_WS_ROWS 0
#define FLASH_WS_STAGES 0
#define FLASH_WS_THREADS 0
#endif
// The forward's ring (FLASH_FWD_STAGES key tiles; sources before it used the dK/dV's count).
#ifndef FLASH_FWD_STAGES
#define FLASH_FWD_STAGES FLASH_WS_STAGES
#endif

// The warp-specialized dK/dV (flash_bwd_dkdv_ws: 128 keys a block of 384 threads) where the
// source has one and the build is for sm_90a.
#if defined(FLASH_DKDV_WS) && !defined(FLASH_BENCH_MMA_SYNC)
#define FLASH_DKDV_WS_ENTRY flash_bwd_dkdv_ws
#else
#define FLASH_DKDV_WS_ENTRY nullptr
#endif
// Its head_dim-256 entry (flash_bwd_dkdv_ws_hd256: 64 keys a block of 384 threads, a ring of
// FLASH_WS_STAGES_WIDE pairs) where the source has one.
#if defined(FLASH_DKDV_WS_WIDE) && !defined(FLASH_BENCH_MMA_SYNC)
#define FLASH_DKDV_WS_WIDE_ENTRY flash_bwd_dkdv_ws_hd256
#else
#define FLASH_DKDV_WS_WIDE_ENTRY nullptr
#define FLASH_WS_STAGES_WIDE 0
#endif

// The head_dim-256 entries, which only a pass compiling the warpgroup code declares. The host
// pass declares them whatever the target: run.sh defines FLASH_BENCH_MMA_SYNC for other targets.
#if defined(FLASH_WGMMA) && !defined(FLASH_BENCH_MMA_SYNC)
#define FLASH_WIDE(entry) entry##_hd256
#else
#define FLASH_WIDE(entry) nullptr
#endif

// The head_dim-256 forward: warp-specialized (flash_fwd_ws_hd256: 128 queries a block of 384
// threads, rings of FLASH_FWD_STAGES_WIDE key and value tiles) where the source has it, else
// flash_fwd_hd256 (64 queries a block of 128).
#if defined(FLASH_FWD_STAGES_WIDE) && !defined(FLASH_BENCH_MMA_SYNC)
#define FLASH_FWD_WIDE_ENTRY flash_fwd_ws_hd256
#define FLASH_FWD_WIDE_WS true
#else
#define FLASH_FWD_WIDE_ENTRY FLASH_WIDE(flash_fwd)
#define FLASH_FWD_WIDE_WS false
#define FLASH_FWD_STAGES_WIDE 0
#endif

// delta[t, h] = Σ_d dO·O (one warp per (t, h)).
__global__ void bench_delta(const float* o, const bf16_t* d_o, float* delta, int n, int hd) {
    const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x & 31;
    if (w >= n) return;
    float s = 0.0f;
    for (int d = lane; d < hd; d += 32) s += o[w * hd + d] * bf16_to_f32(d_o[w * hd + d]);
    s = warp_sum(s);
    if (lane == 0) delta[w] = s;
}

static unsigned long long rng_state = 0x9e3779b97f4a7c15ull;
static double uniform() {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return ((rng_state >> 11) + 0.5) / 9007199254740992.0;
}
static std::vector<bf16_t> randn_bf16(size_t n) {
    std::vector<bf16_t> v(n);
    for (size_t i = 0; i < n; ++i) {
        float x = (float)(sqrt(-2.0 * log(uniform())) * cos(6.283185307179586 * uniform()));
        unsigned int u;
        memcpy(&u, &x, 4);
        u += 0x7fffu + ((u >> 16) & 1u);
        v[i] = (bf16_t)(u >> 16);
    }
    return v;
}

template <typename T>
static T* upload(const std::vector<T>& h) {
    T* d;
    CK(cudaMalloc(&d, h.size() * sizeof(T)));
    CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}
static float* zeros(size_t n) {
    float* d;
    CK(cudaMalloc(&d, n * sizeof(float)));
    CK(cudaMemset(d, 0, n * sizeof(float)));
    return d;
}
template <typename T>
static void save(const std::string& dir, const char* name, const T* d, size_t n) {
    std::vector<T> h(n);
    CK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    FILE* f = fopen((dir + "/" + name + (sizeof(T) == 4 ? ".f32" : ".bf16")).c_str(), "wb");
    fwrite(h.data(), sizeof(T), n, f);
    fclose(f);
}

#ifdef FLASH_BENCH_GRADS_BF16
typedef bf16_t grad_t;
// (cos θ, sin θ) of position t's pair i, θ = t·500000^(−2i/hd) (rope.cu's rope_angles).
static float2* rope_angles(int seq, int hd) {
    std::vector<float2> h((size_t)seq * hd / 2);
    for (int t = 0; t < seq; ++t) {
        for (int i = 0; i < hd / 2; ++i) {
            const float f = (float)pow(500000.0, -2.0 * i / hd);
            const double theta = (double)t * (double)f;
            h[(size_t)t * hd / 2 + i] = make_float2((float)cos(theta), (float)sin(theta));
        }
    }
    return upload(h);
}
#else
typedef float grad_t;
static float2* rope_angles(int, int) { return nullptr; }
#endif
static grad_t* grads(size_t n) {
    grad_t* d;
    CK(cudaMalloc(&d, n * sizeof(grad_t)));
    CK(cudaMemset(d, 0, n * sizeof(grad_t)));
    return d;
}

int main(int argc, char** argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: flash_bench SEQ HEADS KV_HEADS HEAD_DIM SPLIT REPS OUTDIR\n");
        return 2;
    }
    const int seq = atoi(argv[1]), heads = atoi(argv[2]), kv = atoi(argv[3]), hd = atoi(argv[4]);
    const int split = atoi(argv[5]), reps = atoi(argv[6]);
    const std::string dir = argv[7];
    const int batch = 1;
    const float scale = 1.0f / sqrtf((float)hd);
    const size_t nq = (size_t)seq * heads * hd, nk = (size_t)seq * kv * hd;
    bf16_t* q = upload(randn_bf16(nq));
    bf16_t* k = upload(randn_bf16(nk));
    bf16_t* v = upload(randn_bf16(nk));
    bf16_t* d_o = upload(randn_bf16(nq));
    std::vector<int> segh(seq);
    for (int t = 0; t < seq; ++t) segh[t] = split > 0 && t >= split ? 1 : 0;
    int* seg = upload(segh);
    float* out = zeros(nq);
    float* lse = zeros((size_t)seq * heads);
    float* delta = zeros((size_t)seq * heads);
    grad_t* dq = grads(nq);
    float2* angles = rope_angles(seq, hd);
    const int grads_bf16 = sizeof(grad_t) == 2;
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    // The library's dK/dV launch (src/backend/cuda/mod.rs): blocks of 64 keys, or 128 in the
    // warp-specialized kernel (64 at head_dim 256), and its choice of parts (8 · 64 key rows a
    // multiprocessor).
    const bool dkdv_ws_wide = FLASH_DKDV_WS_WIDE_ENTRY != nullptr && hd == 256;
    const bool dkdv_ws = (FLASH_DKDV_WS_ENTRY != nullptr && hd <= 128) || dkdv_ws_wide;
    const int dkdv_keys = dkdv_ws && !dkdv_ws_wide ? 128 : 64;
    const int tiles = (seq + dkdv_keys - 1) / dkdv_keys;
    const int group = heads / kv;
    int parts = group;
    for (int p = 1; p <= group; ++p) {
        if (group % p == 0 && tiles * dkdv_keys * kv * batch * p >= 8 * 64 * sms) {
            parts = p;
            break;
        }
    }
#ifdef FLASH_BENCH_PARTS
    parts = FLASH_BENCH_PARTS;  // -DFLASH_BENCH_PARTS=P: every case split P ways, for timing
#endif
#ifdef FLASH_BENCH_GRADS_BF16
    parts = 1;
#endif
    grad_t* dk = grads(nk * parts);
    grad_t* dv = grads(nk * parts);
    const int row_bytes = (hd + FLASH_ROW_PAD) * 2;
    const bool ws_wide = FLASH_FWD_WIDE_WS && hd == 256;
    const bool ws = (FLASH_WS_ENTRY != nullptr && hd <= 128) || ws_wide;
    const int fwd_stages = ws_wide ? FLASH_FWD_STAGES_WIDE : FLASH_FWD_STAGES;
    const int fwd_sm = ws ? (2 + 2 * fwd_stages) * 64 * row_bytes + 128
                          : FLASH_FWD_TILES(hd) * 64 * row_bytes;
    const int dq_sm = FLASH_DQ_TILES * 64 * row_bytes;
    const int ring = dkdv_ws_wide ? FLASH_WS_STAGES_WIDE : FLASH_WS_STAGES;
    // At head_dim 256 a stage also holds the pair's Pᵀ (64 × 64 f32), handed between the
    // computing warpgroups.
    const int stage_extra = 2 * 64 * 4 + (dkdv_ws_wide ? 64 * 64 * 4 : 0);
    const int dkdv_sm = dkdv_ws ? (2 * dkdv_keys / 64 + 2 * ring) * 64 * row_bytes +
                                      ring * stage_extra + 128
                                : FLASH_DKDV_TILES * 64 * row_bytes + 2 * 2 * 64 * 4;
    // The library's entries for the head dim (flash_entries in src/backend/cuda/mod.rs): at 256
    // the warpgroup kernels of their own, dK/dV with twice the blocks along y.
    const bool wide = hd == 256;
    const auto fwd = wide ? FLASH_FWD_WIDE_ENTRY : ws ? FLASH_WS_ENTRY : flash_fwd;
    const int fwd_rows = ws ? FLASH_WS_ROWS : FLASH_FWD_ROWS;
    const int fwd_threads = ws ? FLASH_WS_THREADS : 128;
    const auto bwd_dq = wide ? FLASH_WIDE(flash_bwd_dq) : flash_bwd_dq;
    const auto bwd_dkdv = dkdv_ws_wide ? FLASH_DKDV_WS_WIDE_ENTRY
                          : wide       ? FLASH_WIDE(flash_bwd_dkdv)
                          : dkdv_ws    ? FLASH_DKDV_WS_ENTRY
                                       : flash_bwd_dkdv;
    const int dkdv_threads = dkdv_ws ? 384 : 128;
    if (!fwd || !bwd_dq || !bwd_dkdv) {
        fprintf(stderr, "head_dim 256 needs the warpgroup kernels (-arch=sm_90a)\n");
        return 2;
    }
    CK(cudaFuncSetAttribute(fwd, cudaFuncAttributeMaxDynamicSharedMemorySize, fwd_sm));
    CK(cudaFuncSetAttribute(bwd_dq, cudaFuncAttributeMaxDynamicSharedMemorySize, dq_sm));
    CK(cudaFuncSetAttribute(bwd_dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, dkdv_sm));
    const dim3 gf((seq + fwd_rows - 1) / fwd_rows, heads, batch);
    const dim3 gq((seq + FLASH_DQ_ROWS - 1) / FLASH_DQ_ROWS, heads, batch);
    const dim3 gk(tiles, kv * parts * (wide && !dkdv_ws_wide ? 2 : 1), batch);
    const double t_fwd = time_ms(reps, [&] {
        // (out, out_bf16, ldo): a flash.cu older than the bf16 output took `float* out` alone.
        fwd<<<gf, fwd_threads, fwd_sm>>>(q, k, v, seg, out, 0, (long long)heads * hd, lse,
                                         batch, seq, heads, kv, hd, scale);
    });
    bench_delta<<<(seq * heads * 32 + 255) / 256, 256>>>(out, d_o, delta, seq * heads, hd);
    const double t_dq = time_ms(reps, [&] {
        bwd_dq<<<gq, 128, dq_sm>>>(q, k, v, d_o, lse, delta, seg, dq, grads_bf16,
                                   (long long)heads * hd, angles, batch, seq, heads, kv, hd, scale);
    });
    const double t_dkdv = time_ms(reps, [&] {
        bwd_dkdv<<<gk, dkdv_threads, dkdv_sm>>>(q, k, v, d_o, lse, delta, seg, dk, dv, grads_bf16,
                                                (long long)kv * hd, angles, batch, seq, heads, kv,
                                                hd, scale);
    });
    CK(cudaDeviceSynchronize());
    // Causal products: each is S²/2·hd multiply-adds per head.
    const double unit = (double)seq * seq * hd * heads * batch / 1e9;  // GFLOP of one product ×2
    printf("{\"seq\": %d, \"heads\": %d, \"kv_heads\": %d, \"head_dim\": %d, \"split\": %d, "
           "\"fwd_ms\": %.3f, \"dq_ms\": %.3f, \"dkdv_ms\": %.3f, \"fwd_tflops\": %.1f, "
           "\"dq_tflops\": %.1f, \"dkdv_tflops\": %.1f}\n",
           seq, heads, kv, hd, split, t_fwd, t_dq, t_dkdv, 2 * unit / t_fwd, 3 * unit / t_dq,
           4 * unit / t_dkdv);
    save(dir, "out", out, nq);
    save(dir, "lse", lse, (size_t)seq * heads);
    save(dir, "dq", dq, nq);
    save(dir, "dk", dk, nk * parts);
    save(dir, "dv", dv, nk * parts);
    return 0;
}
