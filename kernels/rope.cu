// rope.cu: rotary position embedding, "rotate half" layout (compiled after prelude.cuh).
// Launch: block 256, grid min(ceil(rows·heads·(head_dim/2)/256), 65535), grid-stride loop.
// Reference: src/backend/cpu/pointwise.rs `rope`.

// x: [rows, heads·head_dim], half = head_dim/2. For row t, every head, i < half:
//   θ = positions[t]·inv_freq[i] in double; c = (float)cos θ, s = (float)(inverse ? −sin θ : sin θ)
//   (a, b) = (x[i], x[i + half]) → (a·c − b·s, b·c + a·s)
// One work item per (t, i): the angle is computed once and applied to all heads of the row (the
// launch has heads× more threads than items; the extra ones fall straight out of the loop).
// Within a head, consecutive threads touch consecutive addresses.
extern "C" __global__ void rope_f32(float* x, const int* positions, const float* inv_freq,
                                    int rows, int heads, int head_dim, int inverse) {
    const int half = head_dim / 2;
    const long long items = (long long)rows * half;
    const long long cols = (long long)heads * head_dim;
    for (long long it = (long long)blockIdx.x * blockDim.x + threadIdx.x; it < items;
         it += (long long)blockDim.x * gridDim.x) {
        const long long t = it / half;
        const int i = (int)(it - t * half);
        const double theta = (double)positions[t] * (double)inv_freq[i];
        double sd, cd;
        sincos(theta, &sd, &cd);
        const float c = (float)cd;
        const float s = (float)(inverse ? -sd : sd);
        float* row = x + t * cols;
        for (int h = 0; h < heads; ++h) {
            float* lo = row + (long long)h * head_dim + i;
            const float a = lo[0], b = lo[half];
            lo[0] = a * c - b * s;
            lo[half] = b * c + a * s;
        }
    }
}
