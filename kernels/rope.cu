// rope.cu: rotary position embedding, "rotate half" layout (compiled after prelude.cuh).
// Launch: block 256, grid min(ceil(rows·(head_dim/2)/256), 65535), grid-stride loop: one thread a
// work item below (a grid of one thread a rotated pair, 32× larger on Llama 3's q, spent most of
// the kernel's time starting and retiring blocks that had nothing to do).
// Reference: src/backend/cpu/pointwise.rs `rope`.

// x: [rows, heads·head_dim], half = head_dim/2. For row t, every head, i < half:
//   θ = positions[t]·inv_freq[i] in double; c = (float)cos θ, s = (float)(inverse ? −sin θ : sin θ)
//   (a, b) = (x[i], x[i + half]) → (a·c − b·s, b·c + a·s)   (prelude's rope_rotate)
// One work item per (t, i): the angle is computed once and handed to rotate(t, i, c, s), which
// applies it to all heads of the row (the loop over heads unrolled by four). Within a head,
// consecutive threads touch consecutive addresses.
template <typename Rotate>
__device__ __forceinline__ void rope_items(const int* positions, const float* inv_freq, int rows,
                                           int half, int inverse, Rotate rotate) {
    const long long items = (long long)rows * half;
    for (long long it = (long long)blockIdx.x * blockDim.x + threadIdx.x; it < items;
         it += (long long)blockDim.x * gridDim.x) {
        const long long t = it / half;
        const int i = (int)(it - t * half);
        const double theta = (double)positions[t] * (double)inv_freq[i];
        double sd, cd;
        sincos(theta, &sd, &cd);
        rotate(t, i, (float)cd, (float)(inverse ? -sd : sd));
    }
}

// In place on x (f32).
extern "C" __global__ void rope_f32(float* x, const int* positions, const float* inv_freq,
                                    int rows, int heads, int head_dim, int inverse) {
    const int half = head_dim / 2;
    const long long cols = (long long)heads * head_dim;
    rope_items(positions, inv_freq, rows, half, inverse, [&](long long t, int i, float c, float s) {
        float* row = x + t * cols;
#pragma unroll 4
        for (int h = 0; h < heads; ++h) {
            float* lo = row + (long long)h * head_dim + i;
            float a = lo[0], b = lo[half];
            rope_rotate(a, b, c, s);
            lo[0] = a;
            lo[half] = b;
        }
    });
}

// From x (f32) into y (bf16, rounded to nearest even; rows `pitch` values apart, spare columns
// past heads·head_dim left as they are): the values rope_f32 then a rounding would give.
extern "C" __global__ void rope_bf16(const float* x, bf16_t* y, long long pitch,
                                     const int* positions, const float* inv_freq, int rows,
                                     int heads, int head_dim, int inverse) {
    const int half = head_dim / 2;
    const long long cols = (long long)heads * head_dim;
    rope_items(positions, inv_freq, rows, half, inverse, [&](long long t, int i, float c, float s) {
        const float* row = x + t * cols;
        bf16_t* out = y + t * pitch;
#pragma unroll 4
        for (int h = 0; h < heads; ++h) {
            const long long lo = (long long)h * head_dim + i;
            float a = row[lo], b = row[lo + half];
            rope_rotate(a, b, c, s);
            out[lo] = f32_to_bf16(a);
            out[lo + half] = f32_to_bf16(b);
        }
    });
}

// angles[t·half + i] = (cos θ, sin θ) of row t's pair i, as rope_f32 computes them (θ from
// positions and inv_freq in double, then rounded to f32): read by the attention backward's
// kernels, which turn dq and dk back as they store them (flash.cu, FlashOut::rotate_back), and by
// pointwise.cu's sum_slabs_bf16.
extern "C" __global__ void rope_angles(float2* angles, const int* positions,
                                       const float* inv_freq, int rows, int half) {
    rope_items(positions, inv_freq, rows, half, 0, [&](long long t, int i, float c, float s) {
        angles[t * half + i] = make_float2(c, s);
    });
}
