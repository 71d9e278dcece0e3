// nf4.cu: NF4 base weights (compiled after prelude.cuh). Quantization in bitsandbytes' layout
// (blocks of 64 values, 4-bit codes two per byte with the first value in the high nibble, absmax
// values double quantized to 8 bits in groups of 256 around their mean) and dequantization to bf16
// for the bf16 matrix product.
// Reference, formulas and the reasons for each rounding: src/quant/nf4.rs. These kernels give the
// same bits as that file: every product and sum that it rounds on its own is written with
// __fmul_rn / __fadd_rn / __fsub_rn / __fdiv_rn, which the compiler never fuses into an FMA.

#define NF4_BLOCK 64
#define NF4_NESTED_BLOCK 256
#define NF4_ZERO_CODE 7u

// The NF4 code book (index = 4-bit code), src/quant/nf4.rs NF4_CODE.
__constant__ float NF4_CODE[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// The decision thresholds between adjacent codes (bitsandbytes' CUDA decision tree), src/quant/nf4.rs
// NF4_THRESHOLDS.
__constant__ float NF4_THRESHOLDS[15] = {
    -0.8480964004993439f,
    -0.6106329262256622f,
    -0.4599952697753906f,
    -0.33967943489551544f,
    -0.23460740596055984f,
    -0.13791173323988914f,
    -0.045525018125772476f,
    0.03979014977812767f,
    0.1202552504837513f,
    0.2035212516784668f,
    0.2920137718319893f,
    0.3893125355243683f,
    0.5016634166240692f,
    0.6427869200706482f,
    0.8614784181118011f,
};

// The NF4 code of s: the number of thresholds below s (a value on a threshold takes the lower code;
// NaN gives 0). src/quant/nf4.rs nf4_code.
__device__ __forceinline__ unsigned int nf4_code(float s) {
    unsigned int q = 0;
#pragma unroll
    for (int i = 0; i < 15; ++i) q += s > NF4_THRESHOLDS[i] ? 1u : 0u;
    return q;
}

// x scaled by the absmax m of its block as bitsandbytes does: x · (1/m) with the reciprocal rounded
// first; 0 for m = 0 (an all-zero block); the plain quotient x/m where 1/m overflows (a subnormal m).
// src/quant/nf4.rs scale_factor + scaled.
__device__ __forceinline__ float nf4_scaled(float x, float m) {
    if (m == 0.0f) return __fmul_rn(x, 0.0f);
    const float inv = __fdiv_rn(1.0f, m);
    return f32_is_finite(inv) ? __fmul_rn(x, inv) : __fdiv_rn(x, m);
}

// First level, one warp per block of 64 values; lane l takes values 2l, 2l+1 and writes byte l:
//     M_b = max_j |x_j|,   q_j = nf4_code(x_j · (1/M_b)),   byte = q_{2l} << 4 | q_{2l+1}
// Values past n count 0 in the max; a missing second value of a pair gets the code of 0.0 (7).
// absmax[b] = M_b (f32, the input of nf4_absmax_mean and nf4_double_quantize).
// The host has checked that every x is finite.
// Launch: block 256 (8 warps), grid min(ceil(blocks/8), 65535); warps stride over the blocks.
extern "C" __global__ void nf4_quantize_blocks(const float* x, long long n, unsigned char* packed,
                                               float* absmax) {
    const long long blocks = (n + NF4_BLOCK - 1) / NF4_BLOCK;
    const long long lane = threadIdx.x & 31u;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    // b is the same in all 32 lanes of a warp, so warp_max sees the whole warp at every step.
    for (long long b = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; b < blocks;
         b += warps) {
        const long long i = b * NF4_BLOCK + 2 * lane;
        const float x0 = i < n ? x[i] : 0.0f;
        const float x1 = i + 1 < n ? x[i + 1] : 0.0f;
        const float m = warp_max(fmaxf(fabsf(x0), fabsf(x1)));
        if (i < n) {
            const unsigned int hi = nf4_code(nf4_scaled(x0, m));
            const unsigned int lo = i + 1 < n ? nf4_code(nf4_scaled(x1, m)) : NF4_ZERO_CODE;
            packed[i >> 1] = (unsigned char)(hi << 4 | lo);
        }
        if (lane == 0) absmax[b] = m;
    }
}

// The double-quantization offset c = mean_b M_b over the `blocks` absmax values: the sum in double
// (each thread a fixed strided subset, then block_sum_f64, so every run gives the same bits),
// divided in double and rounded once to f32. The CPU sums in index order; the two f64 sums differ
// in their last bits, which changes c only when the mean lies within that of an f32 rounding
// boundary.
// Launch: grid 1, block 1024.
extern "C" __global__ void nf4_absmax_mean(const float* absmax, long long blocks, float* offset) {
    double acc = 0.0;
    for (long long b = threadIdx.x; b < blocks; b += blockDim.x) acc += (double)absmax[b];
    acc = block_sum_f64(acc);
    if (threadIdx.x == 0) *offset = (float)(acc / (double)blocks);
}

// Second level, one thread per absmax value, one CUDA block per group g of 256 values:
//     d_b = M_b − c,   D_g = max_{b in g} |d_b|,   k_b = the map index nearest to d_b · (1/D_g)
// map: the 256 ascending values of the 8-bit dynamic map. "Nearest" is decided on the f32
// midpoints (map[i] + map[i+1])·0.5: k is the number of midpoints below t, and a t exactly on a
// midpoint goes to the even index of the two (bitsandbytes' CUDA binary search; src/quant/nf4.rs
// MapSearch). codes[b] = k_b; nested_absmax[g] = D_g.
// Launch: grid ceil(blocks/256), block 256.
extern "C" __global__ void nf4_double_quantize(const float* absmax, long long blocks,
                                               const float* offset, const float* map,
                                               unsigned char* codes, float* nested_absmax) {
    __shared__ float mid[255];
    const unsigned int t = threadIdx.x;
    if (t < 255) mid[t] = __fmul_rn(__fadd_rn(map[t], map[t + 1]), 0.5f);
    const long long b = (long long)blockIdx.x * NF4_NESTED_BLOCK + t;
    const float d = b < blocks ? __fsub_rn(absmax[b], *offset) : 0.0f;
    // Every thread reaches block_max; its __syncthreads also publish mid[].
    const float d_max = block_max(fabsf(d));
    if (b < blocks) {
        const float s = nf4_scaled(d, d_max);
        int lo = 0, hi = 255;  // the first midpoint not below s
        while (lo < hi) {
            const int m = (lo + hi) >> 1;
            if (s > mid[m]) {
                lo = m + 1;
            } else {
                hi = m;
            }
        }
        if (lo < 255 && s == mid[lo] && (lo & 1)) ++lo;
        codes[b] = (unsigned char)lo;
    }
    if (t == 0) nested_absmax[blockIdx.x] = d_max;
}

// x'_j = NF4[q_j] · M'_b (b = j/64), written as bf16 (round to nearest even). M'_b is absmax[b]
// when `absmax` is not NULL (plain f32 absmax), else the double-quantized value
//     M'_b = map[codes[b]] · nested_absmax[b/256] + *offset      (two roundings, in this order).
// Value j of the [n/cols, cols] matrix goes to out[(j / cols)·pitch + j % cols]: rows `pitch`
// apart (pitch = cols: dense; a larger pitch leaves columns free after each row, where the host
// then writes an adapter's factor; it has checked cols % 8 == 0 and pitch % 8 == 0 then).
struct Nf4Scales {
    const float* absmax;
    const unsigned char* codes;
    const float* nested_absmax;
    const float* map;
    const float* offset;

    __device__ __forceinline__ float of_block(long long b) const {
        return absmax != nullptr
                   ? absmax[b]
                   : __fadd_rn(__fmul_rn(map[codes[b]], nested_absmax[b / NF4_NESTED_BLOCK]),
                               *offset);
    }
};

// The code book in shared memory (indexed per thread: not a serialised constant read); the
// caller synchronises before reading it.
__device__ __forceinline__ void nf4_code_book(float* code) {
    if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
}

// The bf16 pair of packed byte v (its high nibble is the first value) scaled by m, as one word.
__device__ __forceinline__ unsigned int nf4_bf16_pair(const float* code, unsigned int v, float m) {
    return bf16x2_rn(__fmul_rn(code[v >> 4], m), __fmul_rn(code[v & 15u], m));
}

// The 8 values of four packed bytes (one word) as one 16-byte store's worth.
__device__ __forceinline__ uint4 nf4_bf16_octet(const float* code, unsigned int word, float m) {
    return make_uint4(nf4_bf16_pair(code, word & 255u, m), nf4_bf16_pair(code, (word >> 8) & 255u, m),
                      nf4_bf16_pair(code, (word >> 16) & 255u, m), nf4_bf16_pair(code, word >> 24, m));
}

// Groups of 8 values (4 packed bytes, always in one block and one row), eight a thread: a warp
// takes 256 consecutive groups and each of its stores covers 32 of them, 512 contiguous bytes
// (one thread's groups side by side made each store instruction touch 32 scattered pieces and
// ran at half the speed). Every load of a thread's eight groups (the packed words and their block
// scales) is issued before its first store: ~17 % faster than four groups loaded and stored one
// by one (bench/nf4/dequant_bench.cu). A short last group (dense only) goes pair by pair in one
// thread. packed and out are allocation starts (4- and 16-byte aligned). Pairs are rounded by one
// conversion (bf16x2_rn): a NaN (a NaN or infinite block scale) comes out as the canonical NaN.
// With `factor` (not NULL) the same launch then writes an adapter factor into the output's spare
// values (src/backend/cuda/fold.rs): out[factor_offset + (i / factor_cols)·pitch + i % factor_cols]
// = bf16(factor_scale·factor[i]) for i < factor_rows·factor_cols, as cast_f32_bf16_rows would.
// Launch: block 256, grid min(ceil(ceil(n/64)/256), 65535), grid-stride over warps.
#define NF4_GROUPS_PER_THREAD 8
extern "C" __global__ void nf4_dequantize_bf16(const unsigned char* packed, const float* absmax,
                                               const unsigned char* codes, const float* nested_absmax,
                                               const float* map, const float* offset, bf16_t* out,
                                               long long n, int cols, long long pitch,
                                               const float* factor, long long factor_rows,
                                               int factor_cols, long long factor_offset,
                                               float factor_scale) {
    __shared__ float code[16];
    nf4_code_book(code);
    __syncthreads();
    const Nf4Scales scales{absmax, codes, nested_absmax, map, offset};
    const long long octets = n / 8, thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long warps = ((long long)blockDim.x * gridDim.x) >> 5;
    const long long span = 32 * NF4_GROUPS_PER_THREAD;
    for (long long c = thread >> 5; span * c < octets; c += warps) {
        unsigned int word[NF4_GROUPS_PER_THREAD];
        float m[NF4_GROUPS_PER_THREAD];
#pragma unroll
        for (int j = 0; j < NF4_GROUPS_PER_THREAD; ++j) {
            const long long o = span * c + 32 * j + (threadIdx.x & 31);
            word[j] = o < octets ? reinterpret_cast<const unsigned int*>(packed)[o] : 0u;
            m[j] = o < octets ? scales.of_block(8 * o / NF4_BLOCK) : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < NF4_GROUPS_PER_THREAD; ++j) {
            const long long o = span * c + 32 * j + (threadIdx.x & 31);
            if (o < octets) {
                *reinterpret_cast<uint4*>(out + pitched(8 * o, cols, pitch)) =
                    nf4_bf16_octet(code, word[j], m[j]);
            }
        }
    }
    if (thread == 0) {
        const long long i = 8 * octets;
        const float m = i < n ? scales.of_block(i / NF4_BLOCK) : 0.0f;
        for (long long j = i; j < n; j += 2) {
            const unsigned int v = nf4_bf16_pair(code, packed[j / 2], m);
            if (j + 1 < n) {
                *reinterpret_cast<unsigned int*>(out + j) = v;
            } else {
                out[j] = (bf16_t)(v & 0xffffu);
            }
        }
    }
    if (factor != nullptr) {
        bf16_t* spare = out + factor_offset;
        GRID_STRIDE_LOOP(i, factor_rows * factor_cols) {
            spare[pitched(i, factor_cols, pitch)] = f32_to_bf16(factor_scale * factor[i]);
        }
    }
}
