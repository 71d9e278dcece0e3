// pointwise.cu: element-wise kernels (compiled after prelude.cuh).
// Launch for every kernel here: block 256, grid min(ceil(n/256), 65535); each kernel runs a
// grid-stride loop over its n elements, so any grid size is correct.
// Reference: src/backend/cpu/mod.rs, src/backend/cpu/pointwise.rs, src/rng.rs, src/model/config.rs.

// Whether both pointers are 16-byte aligned (the vector paths below).
__device__ __forceinline__ bool aligned16(const void* a, const void* b) {
    return ((reinterpret_cast<unsigned long long>(a) | reinterpret_cast<unsigned long long>(b)) &
            15) == 0;
}

// y_i = bf16(x_i) for i < n, round to nearest even (NaN stays NaN). Eight values a thread and
// iteration (two 16-byte loads, one 16-byte store) where x and y are 16-byte aligned.
__device__ __forceinline__ void cast_values(const float* x, bf16_t* y, long long n) {
    if (!aligned16(x, y)) {
        GRID_STRIDE_LOOP(i, n) { y[i] = f32_to_bf16(x[i]); }
        return;
    }
    const long long octets = n / 8;
    GRID_STRIDE_LOOP(o, octets) {
        const float4 a = reinterpret_cast<const float4*>(x)[2 * o];
        const float4 b = reinterpret_cast<const float4*>(x)[2 * o + 1];
        reinterpret_cast<uint4*>(y)[o] = make_uint4(bf16x2_rn(a.x, a.y), bf16x2_rn(a.z, a.w),
                                                    bf16x2_rn(b.x, b.y), bf16x2_rn(b.z, b.w));
    }
    GRID_STRIDE_LOOP(i, n - 8 * octets) { y[8 * octets + i] = f32_to_bf16(x[8 * octets + i]); }
}

extern "C" __global__ void cast_f32_bf16(const float* x, bf16_t* y, long long n) {
    cast_values(x, y, n);
}

// y[r·pitch + c] = bf16(scale·x[r·cols + c]) for r < rows, c < cols: a dense f32 matrix written
// into bf16 rows that are `pitch` apart (a product input with spare columns after each row, or
// those spare columns themselves). Eight values a thread (two 16-byte loads, one 16-byte store)
// where cols and pitch are multiples of 8 and x and y 16-byte aligned (4 values a thread ran
// 8192 × 4096 at 2.8 TB/s against cast_f32_bf16's 4.0); else four (one 16-byte load, one 8-byte
// store) where cols and pitch are multiples of 4, x is 16-byte and y 8-byte aligned; else one.
extern "C" __global__ void cast_f32_bf16_rows(const float* x, bf16_t* y, long long rows, int cols,
                                              long long pitch, float scale) {
    if (cols % 8 == 0 && pitch % 8 == 0 && aligned16(x, y)) {
        GRID_STRIDE_LOOP(o, rows * cols / 8) {
            const float4 a = reinterpret_cast<const float4*>(x)[2 * o];
            const float4 b = reinterpret_cast<const float4*>(x)[2 * o + 1];
            *reinterpret_cast<uint4*>(y + pitched(8 * o, cols, pitch)) = make_uint4(
                bf16x2_rn(scale * a.x, scale * a.y), bf16x2_rn(scale * a.z, scale * a.w),
                bf16x2_rn(scale * b.x, scale * b.y), bf16x2_rn(scale * b.z, scale * b.w));
        }
        return;
    }
    const bool quads = cols % 4 == 0 && pitch % 4 == 0 &&
                       ((reinterpret_cast<unsigned long long>(x) & 15) |
                        (reinterpret_cast<unsigned long long>(y) & 7)) == 0;
    if (!quads) {
        GRID_STRIDE_LOOP(i, rows * cols) { y[pitched(i, cols, pitch)] = f32_to_bf16(scale * x[i]); }
        return;
    }
    GRID_STRIDE_LOOP(q, rows * cols / 4) {
        const float4 v = reinterpret_cast<const float4*>(x)[q];
        *reinterpret_cast<uint2*>(y + pitched(4 * q, cols, pitch)) =
            make_uint2(bf16x2_rn(scale * v.x, scale * v.y), bf16x2_rn(scale * v.z, scale * v.w));
    }
}

// y[r·pitch + c] = x[r·cols + c] for r < rows, c < cols: a dense bf16 matrix copied into rows
// that are `pitch` apart (a product input's spare columns). Four values a thread (8-byte load
// and store) where cols and pitch are multiples of 4 and x and y are 8-byte aligned.
extern "C" __global__ void copy_bf16_rows(const bf16_t* x, bf16_t* y, long long rows, int cols,
                                          long long pitch) {
    const bool quads = cols % 4 == 0 && pitch % 4 == 0 &&
                       ((reinterpret_cast<unsigned long long>(x) |
                         reinterpret_cast<unsigned long long>(y)) & 7) == 0;
    if (!quads) {
        GRID_STRIDE_LOOP(i, rows * cols) { y[pitched(i, cols, pitch)] = x[i]; }
        return;
    }
    GRID_STRIDE_LOOP(q, rows * cols / 4) {
        *reinterpret_cast<uint2*>(y + pitched(4 * q, cols, pitch)) =
            reinterpret_cast<const uint2*>(x)[q];
    }
}

// x_i += y_i; four values a thread and iteration (16-byte loads and store) where x and y are
// 16-byte aligned.
extern "C" __global__ void add_assign_f32(float* x, const float* y, long long n) {
    if (!aligned16(x, y)) {
        GRID_STRIDE_LOOP(i, n) { x[i] += y[i]; }
        return;
    }
    const long long quads = n / 4;
    GRID_STRIDE_LOOP(q, quads) {
        float4 a = reinterpret_cast<float4*>(x)[q];
        const float4 b = reinterpret_cast<const float4*>(y)[q];
        a.x += b.x;
        a.y += b.y;
        a.z += b.z;
        a.w += b.w;
        reinterpret_cast<float4*>(x)[q] = a;
    }
    GRID_STRIDE_LOOP(i, n - 4 * quads) { x[4 * quads + i] += y[4 * quads + i]; }
}

// y_i = Σ_{p < parts} x[p·n + i]: the sum of `parts` consecutive slabs of n elements.
extern "C" __global__ void sum_slabs_f32(const float* x, float* y, int parts, long long n) {
    GRID_STRIDE_LOOP(i, n) {
        float acc = x[i];
        for (int p = 1; p < parts; ++p) acc += x[p * n + i];
        y[i] = acc;
    }
}

// The same sum written as a bf16 product input (rows `pitch` values apart, spare columns left
// as they are): x holds `parts` slabs of f32 [rows, heads·head_dim], added in slab order as
// above; where `angles` is not null (rope.cu's rope_angles, [rows, head_dim/2] (cos θ, sin θ)),
// each row's heads are first turned back by −θ as rope_bf16 with `inverse` turns them (the dK
// slabs of the attention backward). One thread a (row, head, pair i < head_dim/2).
extern "C" __global__ void sum_slabs_bf16(const float* x, int parts, bf16_t* y, long long pitch,
                                          const float2* angles, long long rows, int heads,
                                          int head_dim) {
    const int half = head_dim / 2;
    const long long cols = (long long)heads * head_dim, n = rows * cols;
    GRID_STRIDE_LOOP(it, rows * heads * half) {
        const long long row = it / (heads * half);
        const int rest = (int)(it - row * heads * half), h = rest / half, i = rest - h * half;
        const long long at = row * cols + (long long)h * head_dim + i;
        float a = x[at], b = x[at + half];
        for (int p = 1; p < parts; ++p) {
            a += x[p * n + at];
            b += x[p * n + at + half];
        }
        if (angles != nullptr) {
            const float2 cs = angles[row * half + i];
            rope_rotate(a, b, cs.x, -cs.y);
        }
        bf16_t* out = y + row * pitch + (long long)h * head_dim + i;
        out[0] = f32_to_bf16(a);
        out[half] = f32_to_bf16(b);
    }
}

// x[r, c] += b[c] for a row-major [rows, cols] x; the loop runs over n = rows·cols elements.
extern "C" __global__ void add_row_vector_f32(float* x, const float* b, long long rows, int cols) {
    const long long n = rows * (long long)cols;
    GRID_STRIDE_LOOP(i, n) { x[i] += b[i % cols]; }
}

// Kernels over many tensors in one launch read a table with one row per tensor: the tensor's
// device addresses, then its element count, each an unsigned 64-bit value. blockIdx.y picks the
// row; blockIdx.x and threadIdx.x stride over that tensor's elements (GRID_STRIDE_LOOP).
__device__ __forceinline__ const unsigned long long* table_row(const unsigned long long* table,
                                                               int cols) {
    return table + (long long)blockIdx.y * cols;
}

// *out += Σ over the tensors of Σ_i x_i² (table rows {x, n}; each term and the sum in double; one
// atomicAdd per block; the host zeroes *out first). Every thread reaches block_sum_f64 (the loop
// is the only divergent part).
extern "C" __global__ void sum_squares_many_f32(const unsigned long long* table, double* out) {
    const unsigned long long* row = table_row(table, 2);
    const float* x = (const float*)row[0];
    const long long n = (long long)row[1];
    double acc = 0.0;
    GRID_STRIDE_LOOP(i, n) {
        const double a = (double)x[i];
        acc += a * a;
    }
    acc = block_sum_f64(acc);
    if (threadIdx.x == 0) atomicAdd(out, acc);
}

// y_i = bf16(x_i) over many tensors (table rows {x, y, n}): cast_f32_bf16 in one launch. The
// launch gives each thread ~8 elements of the longest tensor.
extern "C" __global__ void cast_many_f32_bf16(const unsigned long long* table) {
    const unsigned long long* row = table_row(table, 3);
    cast_values((const float*)row[0], (bf16_t*)row[1], (long long)row[2]);
}

// *flag = 1 if any x_i is NaN or ±Inf (flag is left alone otherwise; the host zeroes it first).
extern "C" __global__ void find_non_finite_f32(const float* x, long long n, unsigned int* flag) {
    bool bad = false;
    GRID_STRIDE_LOOP(i, n) { bad |= !f32_is_finite(x[i]); }
    if (bad) *flag = 1u;  // every writer stores the same value
}

// SplitMix64's finaliser (src/rng.rs `mix`), wrapping u64 arithmetic:
// z = (z ^ (z >> 30))·0xbf58476d1ce4e5b9; z = (z ^ (z >> 27))·0x94d049bb133111eb; z ^ (z >> 31).
__device__ __forceinline__ unsigned long long rng_mix(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// hash(seed, i) = mix(mix(seed ^ 0x9e3779b97f4a7c15) + i·0x9e3779b97f4a7c15) (src/rng.rs `hash`).
__device__ __forceinline__ unsigned long long rng_hash(unsigned long long seed,
                                                       unsigned long long i) {
    return rng_mix(rng_mix(seed ^ 0x9e3779b97f4a7c15ull) + i * 0x9e3779b97f4a7c15ull);
}

// The inverted-dropout factor of element i: u_i >= p ? 1/(1−p) : 0, with
// u_i = (hash(seed, i) >> 40)·2^-24 (src/rng.rs `unit_f32`, bit-exact: a 24-bit integer times a
// power of two is exact in f32) and 1/(1−p) in f32. As on the CPU (CpuBackend::dropout), p <= 0
// keeps every element unchanged.
__device__ __forceinline__ float dropout_factor(unsigned long long seed, long long i, float p) {
    if (!(p > 0.0f)) return 1.0f;
    const float u = (float)(unsigned int)(rng_hash(seed, (unsigned long long)i) >> 40) *
                    (1.0f / 16777216.0f);
    return u >= p ? 1.0f / (1.0f - p) : 0.0f;
}

// y_i = x_i · dropout_factor(seed, i, p).
extern "C" __global__ void dropout_f32(const float* x, float* y, long long n, float p,
                                       unsigned long long seed) {
    GRID_STRIDE_LOOP(i, n) { y[i] = x[i] * dropout_factor(seed, i, p); }
}

// The same on bf16 values (a product input): y_i = bf16(x_i · dropout_factor(seed, i, p)).
extern "C" __global__ void dropout_bf16(const bf16_t* x, bf16_t* y, long long n, float p,
                                        unsigned long long seed) {
    GRID_STRIDE_LOOP(i, n) { y[i] = f32_to_bf16(bf16_to_f32(x[i]) * dropout_factor(seed, i, p)); }
}

#define GELU_C 0.7978846f  // sqrt(2/π), as Activation::GELU_C (0.797_884_6)

// act(g): act 0 = silu(g) = g·σ(g), σ(g) = 1/(1 + exp(−g)) (CPU fast path: g * sigmoid(g));
// act 1 = gelu_tanh(g) = 0.5·g·(1 + tanh(sqrt(2/π)·(g + 0.044715·g³))).
// Also returns act'(g) in *d when d is non-null:
// silu' = σ(g)·(1 + g·(1 − σ(g))); gelu' = 0.5·(1 + t) + 0.5·g·(1 − t²)·sqrt(2/π)·(1 + 3·0.044715·g²),
// t = tanh(sqrt(2/π)·(g + 0.044715·g³)) (src/model/config.rs Activation::value / derivative).
__device__ __forceinline__ float act_value_deriv(float g, int act, float* d) {
    if (act == 0) {
        const float s = 1.0f / (1.0f + expf(-g));
        if (d) *d = s * (1.0f + g * (1.0f - s));
        return g * s;
    }
    const float t = tanhf(GELU_C * (g + 0.044715f * g * g * g));
    if (d) *d = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * GELU_C * (1.0f + 3.0f * 0.044715f * g * g);
    return 0.5f * g * (1.0f + t);
}

// An output element: f32 as computed, or rounded to bf16 (a product input).
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(bf16_t* p, float v) { *p = f32_to_bf16(v); }

// Four elements: float4 stores, or four bf16 in 8 bytes (p 16- or 8-byte aligned).
__device__ __forceinline__ void store4(float* p, float a, float b, float c, float d) {
    *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}
__device__ __forceinline__ void store4(bf16_t* p, float a, float b, float c, float d) {
    *reinterpret_cast<uint2*>(p) = make_uint2(bf16x2_rn(a, b), bf16x2_rn(c, d));
}

// An input element, or a quad of them (q: the quad's index; 16- or 8-byte aligned): f32, or a
// product's output stored in bf16, widened.
__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load(const bf16_t* p, long long i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ float4 load4(const float* p, long long q) {
    return reinterpret_cast<const float4*>(p)[q];
}
__device__ __forceinline__ float4 load4(const bf16_t* p, long long q) {
    return bf16x4_to_f32(p + 4 * q);
}

// Eight elements from p (16-byte aligned), widened: f32 in two 16-byte loads, bf16 in one.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ void load8(const bf16_t* p, float (&v)[8]) {
    const uint4 w = *reinterpret_cast<const uint4*>(p);
    const unsigned int words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        v[2 * k] = __uint_as_float(words[k] << 16);
        v[2 * k + 1] = __uint_as_float(words[k] & 0xffff0000u);
    }
}
// Eight elements to p (16-byte aligned): f32 as computed, or rounded to bf16.
__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(bf16_t* p, const float (&v)[8]) {
    *reinterpret_cast<uint4*>(p) = make_uint4(bf16x2_rn(v[0], v[1]), bf16x2_rn(v[2], v[3]),
                                              bf16x2_rn(v[4], v[5]), bf16x2_rn(v[6], v[7]));
}

// The gated kernels run a thread per octet of elements 8o..8o+7 where the columns and every
// pitch are multiples of 8 and every operand is 16-byte aligned (gated_octets; the host sizes
// the grid by the same test, src/backend/cuda/mod.rs `gated_group`), else per quad 4q..4q+3:
// vector loads where all four exist, one element at a time in the last, short quad. On a
// 4096 × 14336 chunk with spare columns (bench/gated/gated_bench.cu) octets took the forward
// from 166 to 136 µs and the backward from 233 to 205, rounding by bf16x2_rn instead of
// f32_to_bf16 then to 111 and 175 (the same bits). Inputs f32 or bf16 (the products that feed
// only these kernels may store their outputs rounded).
#define QUAD_LOOP(q, n) GRID_STRIDE_LOOP(q, ((n) + 3) / 4)
template <typename... P>
__device__ __forceinline__ bool gated_octets(long long cols, long long pitches, const P*... p) {
    return ((cols | pitches) & 7) == 0 &&
           ((reinterpret_cast<unsigned long long>(p) | ...) & 15) == 0;
}

// h_i = act(g_i)·u_i (act 0 = silu, 1 = gelu_tanh; see act_value_deriv).
__device__ __forceinline__ float gated_value(float g, float u, int act) {
    return u * act_value_deriv(g, act, nullptr);
}
// The element at `rc` (row_col of its index) of an input whose rows are `pitch` values apart
// (pitch = cols: dense), and the quad from there (its column a multiple of 4; cols and pitch
// multiples of 4, checked by the host).
template <typename T>
__device__ __forceinline__ float load_at(const T* p, RowCol rc, long long pitch) {
    return load(p, at_pitch(rc, pitch));
}
template <typename T>
__device__ __forceinline__ float4 load4_at(const T* p, RowCol rc, long long pitch) {
    return load4(p + at_pitch(rc, pitch), 0);
}
// g and u rows g_pitch and u_pitch values apart, h rows `pitch` apart (each = cols: dense).
template <typename G, typename U, typename Out>
__device__ void gated_act_fwd_impl(const G* g, long long g_pitch, const U* u, long long u_pitch,
                                   Out* h, long long n, int act, long long cols, long long pitch) {
    if (gated_octets(cols, g_pitch | u_pitch | pitch, g, u, h)) {
        GRID_STRIDE_LOOP(o, n / 8) {
            const RowCol rc = row_col(8 * o, cols);
            float gv[8], uv[8], hv[8];
            load8(g + at_pitch(rc, g_pitch), gv);
            load8(u + at_pitch(rc, u_pitch), uv);
#pragma unroll
            for (int e = 0; e < 8; ++e) hv[e] = gated_value(gv[e], uv[e], act);
            store8(h + at_pitch(rc, pitch), hv);
        }
        return;
    }
    QUAD_LOOP(q, n) {
        const long long i0 = 4 * q;
        if (i0 + 4 <= n) {
            const RowCol rc = row_col(i0, cols);
            const float4 gv = load4_at(g, rc, g_pitch);
            const float4 uv = load4_at(u, rc, u_pitch);
            store4(h + at_pitch(rc, pitch), gated_value(gv.x, uv.x, act),
                   gated_value(gv.y, uv.y, act), gated_value(gv.z, uv.z, act),
                   gated_value(gv.w, uv.w, act));
        } else {
            for (long long i = i0; i < n; ++i) {
                const RowCol rc = row_col(i, cols);
                const float v = gated_value(load_at(g, rc, g_pitch), load_at(u, rc, u_pitch), act);
                store(h + at_pitch(rc, pitch), v);
            }
        }
    }
}
extern "C" __global__ void gated_act_fwd(const float* g, const float* u, float* h, long long n,
                                         int act) {
    gated_act_fwd_impl(g, n, u, n, h, n, act, n, n);
}
// The rounded kernels' inputs come as untyped pointers with a flag each (bf16 when set, else
// f32): these turn one flag into a type at a time.
#define AS_BF16_OR_F32(flag, p, call_with)                                                     \
    do {                                                                                        \
        if (flag) {                                                                             \
            call_with(static_cast<const bf16_t*>(p));                                           \
        } else {                                                                                \
            call_with(static_cast<const float*>(p));                                            \
        }                                                                                       \
    } while (0)
template <typename G>
__device__ void gated_act_fwd_typed(const G* g, long long g_pitch, const void* u, int u_bf16,
                                    long long u_pitch, bf16_t* h, long long n, int act, int cols,
                                    long long pitch) {
#define GATED_FWD(up) gated_act_fwd_impl(g, g_pitch, up, u_pitch, h, n, act, cols, pitch)
    AS_BF16_OR_F32(u_bf16, u, GATED_FWD);
#undef GATED_FWD
}
// g bf16 when g_bf16 (else f32), rows g_pitch values apart, u likewise; h a bf16 product input,
// rows `pitch` apart.
extern "C" __global__ void gated_act_fwd_bf16(const void* g, int g_bf16, long long g_pitch,
                                              const void* u, int u_bf16, long long u_pitch,
                                              bf16_t* h, long long n, int act, int cols,
                                              long long pitch) {
#define GATED_FWD_G(gate) \
    gated_act_fwd_typed(gate, g_pitch, u, u_bf16, u_pitch, h, n, act, cols, pitch)
    AS_BF16_OR_F32(g_bf16, g, GATED_FWD_G);
#undef GATED_FWD_G
}

// dg_i = dh_i·u_i·act'(g_i), du_i = dh_i·act(g_i), and h_i = act(g_i)·u_i (gated_value's
// product, from the same act(g_i)).
struct GatedGrads {
    float dg, du, h;
};
__device__ __forceinline__ GatedGrads gated_grads(float dh, float g, float u, int act) {
    float da;
    const float a = act_value_deriv(g, act, &da);
    return {dh * u * da, dh * a, u * a};
}
// h NULL: only dg and du are written. Inputs rows dh_pitch, g_pitch and u_pitch values apart,
// outputs `pitch` apart: an output may be the input of the same layout (dg over g, du over u, h
// over dh), as each thread reads its quad (octet) of every input before it writes it anywhere.
template <typename D, typename G, typename U, typename Out>
__device__ void gated_act_bwd_impl(const D* dh, long long dh_pitch, const G* g, long long g_pitch,
                                   const U* u, long long u_pitch, Out* dg, Out* du, Out* h,
                                   long long n, int act, long long cols, long long pitch) {
    if (gated_octets(cols, dh_pitch | g_pitch | u_pitch | pitch, dh, g, u, dg, du, h)) {
        GRID_STRIDE_LOOP(o, n / 8) {
            const RowCol rc = row_col(8 * o, cols);
            const long long at = at_pitch(rc, pitch);
            float dv[8], gv[8], uv[8], dgv[8], duv[8], hv[8];
            load8(dh + at_pitch(rc, dh_pitch), dv);
            load8(g + at_pitch(rc, g_pitch), gv);
            load8(u + at_pitch(rc, u_pitch), uv);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const GatedGrads d = gated_grads(dv[e], gv[e], uv[e], act);
                dgv[e] = d.dg, duv[e] = d.du, hv[e] = d.h;
            }
            store8(dg + at, dgv);
            store8(du + at, duv);
            if (h) store8(h + at, hv);
        }
        return;
    }
    QUAD_LOOP(q, n) {
        const long long i0 = 4 * q;
        if (i0 + 4 <= n) {
            const RowCol rc = row_col(i0, cols);
            const long long o = at_pitch(rc, pitch);
            const float4 gv = load4_at(g, rc, g_pitch);
            const float4 uv = load4_at(u, rc, u_pitch);
            const float4 dv = load4_at(dh, rc, dh_pitch);
            const GatedGrads x = gated_grads(dv.x, gv.x, uv.x, act);
            const GatedGrads y = gated_grads(dv.y, gv.y, uv.y, act);
            const GatedGrads z = gated_grads(dv.z, gv.z, uv.z, act);
            const GatedGrads w = gated_grads(dv.w, gv.w, uv.w, act);
            store4(dg + o, x.dg, y.dg, z.dg, w.dg);
            store4(du + o, x.du, y.du, z.du, w.du);
            if (h) store4(h + o, x.h, y.h, z.h, w.h);
        } else {
            for (long long i = i0; i < n; ++i) {
                const RowCol rc = row_col(i, cols);
                const GatedGrads d = gated_grads(load_at(dh, rc, dh_pitch), load_at(g, rc, g_pitch),
                                                 load_at(u, rc, u_pitch), act);
                const long long o = at_pitch(rc, pitch);
                store(dg + o, d.dg);
                store(du + o, d.du);
                if (h) store(h + o, d.h);
            }
        }
    }
}
extern "C" __global__ void gated_act_bwd(const float* dh, const float* g, const float* u,
                                         float* dg, float* du, long long n, int act) {
    gated_act_bwd_impl(dh, n, g, n, u, n, dg, du, static_cast<float*>(nullptr), n, act, n, n);
}
// An input pointer with its pitch, passed on through the type dispatch.
template <typename D, typename G>
__device__ void gated_act_bwd_typed(const D* dh, long long dh_pitch, const G* g,
                                    long long g_pitch, const void* u, int u_bf16,
                                    long long u_pitch, bf16_t* dg, bf16_t* du, bf16_t* h,
                                    long long n, int act, int cols, long long pitch) {
#define GATED_BWD(up) \
    gated_act_bwd_impl(dh, dh_pitch, g, g_pitch, up, u_pitch, dg, du, h, n, act, cols, pitch)
    AS_BF16_OR_F32(u_bf16, u, GATED_BWD);
#undef GATED_BWD
}
template <typename D>
__device__ void gated_act_bwd_typed(const D* dh, long long dh_pitch, const void* g, int g_bf16,
                                    long long g_pitch, const void* u, int u_bf16,
                                    long long u_pitch, bf16_t* dg, bf16_t* du, bf16_t* h,
                                    long long n, int act, int cols, long long pitch) {
#define GATED_BWD_G(gate) \
    gated_act_bwd_typed(dh, dh_pitch, gate, g_pitch, u, u_bf16, u_pitch, dg, du, h, n, act, cols, \
                        pitch)
    AS_BF16_OR_F32(g_bf16, g, GATED_BWD_G);
#undef GATED_BWD_G
}
// dh, g and u each bf16 when its flag is set (else f32), rows *_pitch values apart; dg, du (and
// h = act(g)·u unless h is NULL) bf16 product inputs, rows `pitch` apart, each possibly written
// over the input of its layout (see gated_act_bwd_impl).
extern "C" __global__ void gated_act_bwd_bf16(const void* dh, int dh_bf16, long long dh_pitch,
                                              const void* g, int g_bf16, long long g_pitch,
                                              const void* u, int u_bf16, long long u_pitch,
                                              bf16_t* dg, bf16_t* du, bf16_t* h, long long n,
                                              int act, int cols, long long pitch) {
#define GATED_BWD_D(grad)                                                                       \
    gated_act_bwd_typed(grad, dh_pitch, g, g_bf16, g_pitch, u, u_bf16, u_pitch, dg, du, h, n, act, \
                        cols, pitch)
    AS_BF16_OR_F32(dh_bf16, dh, GATED_BWD_D);
#undef GATED_BWD_D
}

// out[t, c] = f32(table[ids[t], c])·scale for t < rows, c < cols (ids validated by the host;
// ids NULL: row t, for rows the host already looked up); the loop runs over n = rows·cols output
// elements. One body for both table types.
__device__ __forceinline__ float table_value(const bf16_t* table, long long i) {
    return bf16_to_f32(table[i]);
}
__device__ __forceinline__ float table_value(const float* table, long long i) { return table[i]; }

template <typename T>
__device__ void embedding_rows(const T* table, const int* ids, float* out, int rows, int cols,
                               float scale) {
    const long long n = (long long)rows * cols;
    GRID_STRIDE_LOOP(i, n) {
        const long long t = i / cols;
        const long long c = i - t * cols;
        out[i] = table_value(table, (long long)ids[t] * cols + c) * scale;
    }
}

extern "C" __global__ void embedding_bf16(const bf16_t* table, const int* ids, float* out,
                                          int rows, int cols, float scale) {
    embedding_rows(table, ids, out, rows, cols, scale);
}

// The same with an f32 table (a model kept in full precision).
extern "C" __global__ void embedding_f32(const float* table, const int* ids, float* out,
                                         int rows, int cols, float scale) {
    embedding_rows(table, ids, out, rows, cols, scale);
}

// AdamW, in exactly the CPU's order and rounding (src/backend/cpu/pointwise.rs `adamw`; the
// _rn intrinsics keep the compiler from fusing into FMAs, so the result is bit-identical):
//   p ← p·decay; m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g·g;
//   p ← p − step_size·m / (sqrt(v)/bc2_sqrt + eps)
// (the host computes decay = 1 − lr·wd, step_size = lr/(1 − β1^t), bc2_sqrt = sqrt(1 − β2^t)).
// Table rows {p, g, m, v, n}; the gradient is multiplied by grad_scale first (clipping).
extern "C" __global__ void adamw_many_f32(const unsigned long long* table, float decay,
                                          float beta1, float beta2, float step_size,
                                          float bc2_sqrt, float eps, float grad_scale) {
    const unsigned long long* row = table_row(table, 5);
    float* p = (float*)row[0];
    const float* g = (const float*)row[1];
    float* m = (float*)row[2];
    float* v = (float*)row[3];
    const long long n = (long long)row[4];
    const float one_minus_b1 = __fsub_rn(1.0f, beta1);
    const float one_minus_b2 = __fsub_rn(1.0f, beta2);
    GRID_STRIDE_LOOP(i, n) {
        const float gi = __fmul_rn(g[i], grad_scale);
        const float pi = __fmul_rn(p[i], decay);
        const float mi = __fadd_rn(__fmul_rn(beta1, m[i]), __fmul_rn(one_minus_b1, gi));
        const float vi = __fadd_rn(__fmul_rn(beta2, v[i]), __fmul_rn(__fmul_rn(one_minus_b2, gi), gi));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        p[i] = __fsub_rn(pi, __fdiv_rn(__fmul_rn(step_size, mi), denom));
        m[i] = mi;
        v[i] = vi;
    }
}
