// prelude.cuh: shared helpers for libfinetune's CUDA kernels.
//
// The backend compiles every kernels/*.cu file as this prelude followed by that file, with NVRTC
// (options `--gpu-architecture=sm_90 -std=c++17`, no fast-math) and no include path at all: nothing
// here or in the kernel files may #include anything.
//
// API (names are part of the kernel contract; do not rename):
//   bf16_t                   raw bits of a bfloat16 value (unsigned short)
//   bf16_to_f32(bf16_t)      exact widening (bits << 16)
//   f32_to_bf16(float)       round to nearest even; NaN stays a (quiet) NaN, overflow rounds to ±Inf
//   bf16x2_rn(lo, hi)        two f32 -> one 32-bit pair of bf16 (lo in the low half) by one
//                            conversion instruction, round to nearest even (NaN -> canonical NaN)
//   rope_rotate(a, b, c, s)  the rotary pair (a, b) turned by the angle whose cosine and sine are
//                            c and s: (a·c − b·s, b·c + a·s), each product and sum rounded
//                            apart (no fused multiply-add), as the CPU reference computes it
//   f32_is_finite(float)     false for ±Inf and NaN (exponent-bits test)
//   f32_inf()                +Inf as a float (there is no INFINITY macro without headers)
//   FULL_MASK                0xffffffff, the mask of all 32 lanes
//   warp_sum / warp_max      butterfly reduction over the 32 lanes of a warp (float); every lane
//                            gets the result; all 32 lanes must call it together (full mask)
//   warp_sum_f64             the same for double
//   block_sum / block_max    reduction over the whole block (float); every thread gets the result
//   block_sum_f64            the same for double
//   GRID_STRIDE_LOOP(i, n)   for (long long i = global thread index; i < n; i += total threads)
//   row_col / at_pitch /     an element's (row, column) in a [rows, cols] matrix, placed in rows
//   pitched                  `pitch` values apart (below)
//
// Block reductions: blockDim.x·blockDim.y·blockDim.z must be a multiple of 32 and <= 1024. Every
// thread of the block must call them (they contain __syncthreads, so never call them from
// divergent code). Each one uses its own static __shared__ scratch of 32 values and performs two
// __syncthreads: the first keeps a previous call's readers safe from this call's writers, the
// second publishes the per-warp partials. So consecutive calls need no extra barrier, and the
// block's other shared memory is untouched. The result is identical in every thread (all warps
// reduce the same partials in the same order).

typedef unsigned short bf16_t;

#define FULL_MASK 0xffffffffu

// for (i = global thread index; i < n; i += total threads), in 64-bit.
#define GRID_STRIDE_LOOP(i, n)                                                             \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);          \
         i += (long long)blockDim.x * gridDim.x)

// Element i of a [rows, cols] matrix as (row, column). The row is a 32-bit division wherever i
// and cols fit in 32 bits (every matrix of the models here): the 64-bit one is a software routine
// of ~70 instructions, which made kernels of little arithmetic per value issue-bound.
struct RowCol {
    long long row, col;
};
__device__ __forceinline__ RowCol row_col(long long i, long long cols) {
    const long long r = (i | cols) <= 0xffffffffll
                            ? (long long)((unsigned int)i / (unsigned int)cols)
                            : i / cols;
    return {r, i - r * cols};
}

// Where that element lies in rows `pitch` values apart (pitch = cols: dense). The bf16 product
// inputs and the NF4 scratch may keep spare columns after each row (src/backend/cuda/fold.rs);
// the kernels reading or writing groups of 4 or 8 values there rely on the host having checked
// that cols and pitch are multiples of the group, so no group straddles two rows. Kernels with
// several pitched operands take row_col once and place it in each with at_pitch.
__device__ __forceinline__ long long at_pitch(RowCol rc, long long pitch) {
    return rc.row * pitch + rc.col;
}
__device__ __forceinline__ long long pitched(long long i, long long cols, long long pitch) {
    return pitch == cols ? i : at_pitch(row_col(i, cols), pitch);
}

// bf16 -> f32: a bfloat16 is the upper half of an f32, so widening is exact.
__device__ __forceinline__ float bf16_to_f32(bf16_t h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// f32 -> bf16, round to nearest even: add 0x7fff plus the lowest kept bit, then truncate.
// NaN is handled first (the rounding add could turn a NaN payload into Inf); the quiet bit is set.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (bf16_t)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// Four bf16 values from p (8-byte aligned) widened to f32.
__device__ __forceinline__ float4 bf16x4_to_f32(const bf16_t* p) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    return make_float4(bf16_to_f32((bf16_t)(v.x & 0xffffu)), bf16_to_f32((bf16_t)(v.x >> 16)),
                       bf16_to_f32((bf16_t)(v.y & 0xffffu)), bf16_to_f32((bf16_t)(v.y >> 16)));
}

__device__ __forceinline__ unsigned int bf16x2_rn(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// (a, b) → (a·c − b·s, b·c + a·s), every operation rounded on its own: the same bits wherever a
// kernel rotates (rope.cu, the attention backward's gradients in flash.cu) and as
// src/backend/cpu/pointwise.rs `rope`.
__device__ __forceinline__ void rope_rotate(float& a, float& b, float c, float s) {
    const float lo = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    b = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    a = lo;
}

// True unless x is ±Inf or NaN (all exponent bits set).
__device__ __forceinline__ bool f32_is_finite(float x) {
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// +Inf (negate for −Inf).
__device__ __forceinline__ float f32_inf() {
    return __uint_as_float(0x7f800000u);
}

// Σ over the 32 lanes of the warp; every lane gets the sum.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(FULL_MASK, v, o);
    }
    return v;
}

// max over the 32 lanes of the warp; every lane gets the max (NaN handling as fmaxf: NaN is
// dropped unless all are NaN).
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    }
    return v;
}

// Σ over the 32 lanes of the warp in double; every lane gets the sum.
__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(FULL_MASK, v, o);
    }
    return v;
}

// The linear thread index in the block and the number of warps of the block.
__device__ __forceinline__ unsigned int block_thread_index() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
__device__ __forceinline__ unsigned int block_warp_count() {
    return (blockDim.x * blockDim.y * blockDim.z) >> 5;
}

// Σ over the whole block; every thread gets the sum. Two __syncthreads (see the top of the file).
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float scratch[32];
    const unsigned int tid = block_thread_index();
    const unsigned int lane = tid & 31u, warp = tid >> 5;
    v = warp_sum(v);
    __syncthreads();  // a previous call may still be reading scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < block_warp_count() ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// max over the whole block; every thread gets the max. Two __syncthreads.
__device__ __forceinline__ float block_max(float v) {
    __shared__ float scratch[32];
    const unsigned int tid = block_thread_index();
    const unsigned int lane = tid & 31u, warp = tid >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < block_warp_count() ? scratch[lane] : -f32_inf();
    return warp_max(v);
}

// Σ over the whole block in double; every thread gets the sum. Two __syncthreads.
__device__ __forceinline__ double block_sum_f64(double v) {
    __shared__ double scratch[32];
    const unsigned int tid = block_thread_index();
    const unsigned int lane = tid & 31u, warp = tid >> 5;
    v = warp_sum_f64(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < block_warp_count() ? scratch[lane] : 0.0;
    return warp_sum_f64(v);
}
