// norm.cu: RMSNorm forward and backward (compiled after prelude.cuh).
// Launch: grid = rows, block = 256 (one block per row; any blockDim that is a multiple of 32 and
// <= 1024 works, and any cols >= 1). Reference: src/backend/cpu/pointwise.rs `rmsnorm`,
// `rmsnorm_backward`.

// w' = unit_offset ? 1 + w : w
__device__ __forceinline__ float norm_weight(float w, int unit_offset) {
    return unit_offset ? 1.0f + w : w;
}

// r_t = 1/sqrt(mean_c x[t,c]² + eps);  y[t,c] = x[t,c]·r_t·w'_c, handed to store(c, y[t,c]) for
// row t = blockIdx.x.   (r: [rows], one value per row)
template <typename Store>
__device__ __forceinline__ void rmsnorm_row(const float* x, const float* w, float* r, int cols,
                                            float eps, int unit_offset, Store store) {
    const float* xr = x + (long long)blockIdx.x * cols;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float a = xr[c];
        ss += a * a;
    }
    ss = block_sum(ss);
    const float rr = 1.0f / sqrtf(ss / (float)cols + eps);
    if (threadIdx.x == 0) r[blockIdx.x] = rr;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        store(c, xr[c] * rr * norm_weight(w[c], unit_offset));
    }
}

// y f32 [rows, cols].
extern "C" __global__ void rmsnorm_fwd(const float* x, const float* w, float* y, float* r,
                                       int rows, int cols, float eps, int unit_offset) {
    float* yr = y + (long long)blockIdx.x * cols;
    rmsnorm_row(x, w, r, cols, eps, unit_offset, [&](int c, float v) { yr[c] = v; });
}

// y bf16 (rounded to nearest even), rows `pitch` elements apart: a product input, whose spare
// columns past `cols` are left as they are.
extern "C" __global__ void rmsnorm_fwd_bf16(const float* x, const float* w, bf16_t* y, float* r,
                                            int rows, int cols, long long pitch, float eps,
                                            int unit_offset) {
    bf16_t* yr = y + (long long)blockIdx.x * pitch;
    rmsnorm_row(x, w, r, cols, eps, unit_offset, [&](int c, float v) { yr[c] = f32_to_bf16(v); });
}

// dx_j = r·w'_j·dy_j − (r³/cols)·x_j·Σ_i dy_i·w'_i·x_i   (r from rmsnorm_fwd), added into dx
// when `accumulate` (dx_j = dx_j + that), else written over it.
extern "C" __global__ void rmsnorm_bwd(const float* dy, const float* x, const float* w,
                                       const float* r, float* dx, int rows, int cols,
                                       int unit_offset, int accumulate) {
    const long long base = (long long)blockIdx.x * cols;
    const float* dyr = dy + base;
    const float* xr = x + base;
    float* dxr = dx + base;
    float dot = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        dot += dyr[c] * norm_weight(w[c], unit_offset) * xr[c];
    }
    dot = block_sum(dot);
    const float rr = r[blockIdx.x];
    const float k = rr * rr * rr * dot / (float)cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float g = rr * norm_weight(w[c], unit_offset) * dyr[c] - k * xr[c];
        dxr[c] = accumulate ? dxr[c] + g : g;
    }
}
