// norm.cu: RMSNorm forward and backward (compiled after prelude.cuh).
// Launch: grid = rows, block = 256 (one block per row; any blockDim that is a multiple of 32 and
// <= 1024 works, and any cols >= 1). Reference: src/backend/cpu/pointwise.rs `rmsnorm`,
// `rmsnorm_backward`.

// w' = unit_offset ? 1 + w : w
__device__ __forceinline__ float norm_weight(float w, int unit_offset) {
    return unit_offset ? 1.0f + w : w;
}

// A row is read in 16-byte loads and held in registers between the two passes (its sum and its
// output) when cols is a multiple of 4, at most V·4·blockDim.x, and the rows start 16-byte
// aligned (8 for bf16 outputs): thread i holds columns 4(i + j·blockDim.x) .. +3, j < V. With the
// launch's 256 threads, V = NORM_FWD_VEC covers 8,192 columns in the forward; the backward holds
// three such arrays (dy, x, dx) and keeps NORM_BWD_VEC (4,096 columns) so that more blocks fit
// an SM. Other rows (another width, a longer row, an unaligned view) take a plain loop that reads
// them twice.
#define NORM_FWD_VEC 8
#define NORM_BWD_VEC 4

__device__ __forceinline__ bool norm_aligned(const void* p, unsigned int bytes) {
    return reinterpret_cast<unsigned long long>(p) % bytes == 0;
}

template <int V>
__device__ __forceinline__ bool norm_vectorized(int cols) {
    return cols % 4 == 0 && cols <= V * 4 * (int)blockDim.x;
}

// Column 4(threadIdx.x + j·blockDim.x) of the vectorized layout, or -1 past the row's end.
__device__ __forceinline__ int norm_col(int j, int cols) {
    const int c = 4 * (threadIdx.x + j * blockDim.x);
    return c < cols ? c : -1;
}

__device__ __forceinline__ float4 norm_load4(const float* p) {
    return *reinterpret_cast<const float4*>(p);
}

// How a norm reads its input x (the kernels' `x_kind`): f32 as it is; f32 rounded to bf16 (to
// nearest even) as it is read, which is how a training pass on bf16 activations reads the
// residual stream, so that a bf16 copy of x kept for the backward pass holds exactly the values
// the norm read; or such a bf16 copy.
#define NORM_IN_F32 0
#define NORM_IN_F32_AS_BF16 1
#define NORM_IN_BF16 2

template <int KIND>
struct NormIn {
    const float* x;
    __device__ NormIn at(long long i) const { return {x + i}; }
    __device__ bool aligned() const { return norm_aligned(x, 16); }
    __device__ static float rounded(float v) {
        return KIND == NORM_IN_F32_AS_BF16 ? bf16_to_f32(f32_to_bf16(v)) : v;
    }
    __device__ float one(int c) const { return rounded(x[c]); }
    __device__ float4 four(int c) const {
        const float4 v = norm_load4(x + c);
        return make_float4(rounded(v.x), rounded(v.y), rounded(v.z), rounded(v.w));
    }
};

template <>
struct NormIn<NORM_IN_BF16> {
    const bf16_t* x;
    __device__ NormIn at(long long i) const { return {x + i}; }
    __device__ bool aligned() const { return norm_aligned(x, 8); }
    __device__ float one(int c) const { return bf16_to_f32(x[c]); }
    __device__ float4 four(int c) const { return bf16x4_to_f32(x + c); }
};

// Runs `f(in)` with x read as `x_kind` says (a NormIn); f: a functor with a templated
// __device__ operator() (NVRTC takes a generic lambda's for host code).
template <typename F>
__device__ __forceinline__ void norm_with_input(const void* x, int x_kind, F f) {
    switch (x_kind) {
        case NORM_IN_BF16:
            f(NormIn<NORM_IN_BF16>{static_cast<const bf16_t*>(x)});
            break;
        case NORM_IN_F32_AS_BF16:
            f(NormIn<NORM_IN_F32_AS_BF16>{static_cast<const float*>(x)});
            break;
        default:
            f(NormIn<NORM_IN_F32>{static_cast<const float*>(x)});
    }
}

// w'_c·a for the 4 columns from c.
__device__ __forceinline__ float4 norm_scale4(float4 a, const float* w, int c, int unit_offset) {
    const float4 wv = norm_load4(w + c);
    return make_float4(a.x * norm_weight(wv.x, unit_offset), a.y * norm_weight(wv.y, unit_offset),
                       a.z * norm_weight(wv.z, unit_offset), a.w * norm_weight(wv.w, unit_offset));
}

// r_t = 1/sqrt(mean_c x[t,c]² + eps);  y[t,c] = x[t,c]·r_t·w'_c for row t = blockIdx.x, x read
// by `x` (a NormIn) and y written by out (out.one(c, v) for one column, out.four(c, v) for 4
// from c).   (r: [rows], one value per row)
template <typename In, typename Out>
__device__ __forceinline__ void rmsnorm_row(In x, const float* w, float* r, int cols, float eps,
                                            int unit_offset, Out out) {
    const In xr = x.at((long long)blockIdx.x * cols);
    float ss = 0.0f;
    const bool aligned = xr.aligned() && norm_aligned(w, 16) && out.aligned();
    if (norm_vectorized<NORM_FWD_VEC>(cols) && aligned) {
        float4 xv[NORM_FWD_VEC];
#pragma unroll
        for (int j = 0; j < NORM_FWD_VEC; ++j) {
            const int c = norm_col(j, cols);
            xv[j] = c >= 0 ? xr.four(c) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            ss += xv[j].x * xv[j].x + xv[j].y * xv[j].y + xv[j].z * xv[j].z + xv[j].w * xv[j].w;
        }
        ss = block_sum(ss);
        const float rr = 1.0f / sqrtf(ss / (float)cols + eps);
        if (threadIdx.x == 0) r[blockIdx.x] = rr;
#pragma unroll
        for (int j = 0; j < NORM_FWD_VEC; ++j) {
            const int c = norm_col(j, cols);
            if (c < 0) continue;
            const float4 a = make_float4(xv[j].x * rr, xv[j].y * rr, xv[j].z * rr, xv[j].w * rr);
            out.four(c, norm_scale4(a, w, c, unit_offset));
        }
        return;
    }
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float a = xr.one(c);
        ss += a * a;
    }
    ss = block_sum(ss);
    const float rr = 1.0f / sqrtf(ss / (float)cols + eps);
    if (threadIdx.x == 0) r[blockIdx.x] = rr;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        out.one(c, xr.one(c) * rr * norm_weight(w[c], unit_offset));
    }
}

// The output row of rmsnorm_fwd: f32.
struct NormOutF32 {
    float* y;
    __device__ bool aligned() const { return norm_aligned(y, 16); }
    __device__ void one(int c, float v) const { y[c] = v; }
    __device__ void four(int c, float4 v) const { *reinterpret_cast<float4*>(y + c) = v; }
};

// The output row of rmsnorm_fwd_bf16: bf16 (rounded to nearest even); four from a column that
// is a multiple of 4 of a row whose start is 8-byte aligned.
struct NormOutBf16 {
    bf16_t* y;
    __device__ bool aligned() const { return norm_aligned(y, 8); }
    __device__ void one(int c, float v) const { y[c] = f32_to_bf16(v); }
    __device__ void four(int c, float4 v) const {
        *reinterpret_cast<uint2*>(y + c) = make_uint2(bf16x2_rn(v.x, v.y), bf16x2_rn(v.z, v.w));
    }
};

// rmsnorm_row of one x reader (norm_with_input's functor).
template <typename Out>
struct NormForward {
    const float* w;
    float* r;
    int cols;
    float eps;
    int unit_offset;
    Out out;
    template <typename In>
    __device__ void operator()(In x) const {
        rmsnorm_row(x, w, r, cols, eps, unit_offset, out);
    }
};

// x read as `x_kind` says (NORM_IN_*), y f32 [rows, cols].
extern "C" __global__ void rmsnorm_fwd(const void* x, int x_kind, const float* w, float* y,
                                       float* r, int rows, int cols, float eps,
                                       int unit_offset) {
    const NormOutF32 out{y + (long long)blockIdx.x * cols};
    norm_with_input(x, x_kind, NormForward<NormOutF32>{w, r, cols, eps, unit_offset, out});
}

// y bf16 (rounded to nearest even), rows `pitch` elements apart: a product input, whose spare
// columns past `cols` are left as they are.
extern "C" __global__ void rmsnorm_fwd_bf16(const void* x, int x_kind, const float* w,
                                            bf16_t* y, float* r, int rows, int cols,
                                            long long pitch, float eps, int unit_offset) {
    const NormOutBf16 out{y + (long long)blockIdx.x * pitch};
    norm_with_input(x, x_kind, NormForward<NormOutBf16>{w, r, cols, eps, unit_offset, out});
}

// dx_j = r·w'_j·dy_j − (r³/cols)·x_j·Σ_i dy_i·w'_i·x_i   (r from rmsnorm_fwd, x read by `x` as
// the forward read it), added into dx when `accumulate` (dx_j = dx_j + that), else written over
// it. dy, x and the dx added into are read together and held in registers between the passes as
// in rmsnorm_row.
template <typename In>
__device__ __forceinline__ void rmsnorm_bwd_row(const float* dy, In x, const float* w,
                                                const float* r, float* dx, int cols,
                                                int unit_offset, int accumulate) {
    const long long base = (long long)blockIdx.x * cols;
    const float* dyr = dy + base;
    const In xr = x.at(base);
    float* dxr = dx + base;
    const float rr = r[blockIdx.x];
    float dot = 0.0f;
    const bool aligned =
        norm_aligned(dyr, 16) && xr.aligned() && norm_aligned(dxr, 16) && norm_aligned(w, 16);
    if (norm_vectorized<NORM_BWD_VEC>(cols) && aligned) {
        float4 dv[NORM_BWD_VEC], xv[NORM_BWD_VEC], av[NORM_BWD_VEC];
#pragma unroll
        for (int j = 0; j < NORM_BWD_VEC; ++j) {
            const int c = norm_col(j, cols);
            const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            dv[j] = c >= 0 ? norm_load4(dyr + c) : zero;
            xv[j] = c >= 0 ? xr.four(c) : zero;
            av[j] = c >= 0 && accumulate ? norm_load4(dxr + c) : zero;
        }
#pragma unroll
        for (int j = 0; j < NORM_BWD_VEC; ++j) {
            const int c = norm_col(j, cols);
            if (c < 0) continue;
            dv[j] = norm_scale4(dv[j], w, c, unit_offset);  // w'·dy from here on
            dot += dv[j].x * xv[j].x + dv[j].y * xv[j].y + dv[j].z * xv[j].z + dv[j].w * xv[j].w;
        }
        dot = block_sum(dot);
        const float k = rr * rr * rr * dot / (float)cols;
#pragma unroll
        for (int j = 0; j < NORM_BWD_VEC; ++j) {
            const int c = norm_col(j, cols);
            if (c < 0) continue;
            const float4 g = dv[j], a = av[j];
            *reinterpret_cast<float4*>(dxr + c) =
                make_float4(a.x + (rr * g.x - k * xv[j].x), a.y + (rr * g.y - k * xv[j].y),
                            a.z + (rr * g.z - k * xv[j].z), a.w + (rr * g.w - k * xv[j].w));
        }
        return;
    }
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        dot += dyr[c] * norm_weight(w[c], unit_offset) * xr.one(c);
    }
    dot = block_sum(dot);
    const float k = rr * rr * rr * dot / (float)cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float g = rr * norm_weight(w[c], unit_offset) * dyr[c] - k * xr.one(c);
        dxr[c] = accumulate ? dxr[c] + g : g;
    }
}

// rmsnorm_bwd_row of one x reader (norm_with_input's functor).
struct NormBackward {
    const float* dy;
    const float* w;
    const float* r;
    float* dx;
    int cols;
    int unit_offset;
    int accumulate;
    template <typename In>
    __device__ void operator()(In x) const {
        rmsnorm_bwd_row(dy, x, w, r, dx, cols, unit_offset, accumulate);
    }
};

// x read as `x_kind` says (NORM_IN_*).
extern "C" __global__ void rmsnorm_bwd(const float* dy, const void* x, int x_kind,
                                       const float* w, const float* r, float* dx, int rows,
                                       int cols, int unit_offset, int accumulate) {
    norm_with_input(x, x_kind, NormBackward{dy, w, r, dx, cols, unit_offset, accumulate});
}
