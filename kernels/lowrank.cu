// lowrank.cu: products whose inner dimension is a LoRA rank (compiled after prelude.cuh).
// Reference: src/backend/cpu/mod.rs (matmul).
//
// The rank expansion c = alpha·a·B + beta·c, with a rows×rank and B rank×cols (the adapter's
// up-projection xa·Bᵀ, or dxa·A in the backward pass): a handful of multiply-adds per output
// value, so the kernel is bound by writing c. A block covers EXPAND_ROWS rows by 4·blockDim.x
// columns; each thread keeps the B values of its 4 adjacent columns in registers and writes
// them row after row as one 16-byte store, reading the rows of a from shared memory.
//
// Launch: block 128 threads, grid (ceil(cols / 512), ceil(rows / EXPAND_ROWS)). cols must be a
// multiple of 4 and c 16-byte aligned; R (the template rank) at least `rank` (values beyond
// `rank` are zero).

#define EXPAND_ROWS 32

// c[i, j] = alpha·Σ_{k<rank} a[i, k]·B(k, j) + beta·c[i, j] where B(k, j) = b[j·rank + k] when
// b_transposed (b is cols×rank, the layout of LoRA's B) else b[k·cols + j] (b is rank×cols, A's).
// beta = 0 never reads c (it may hold anything).
template <int R>
__device__ void lowrank_expand(const float* a, const float* b, float* c, int rows, int cols,
                               int rank, int b_transposed, float alpha, float beta) {
    __shared__ float a_rows[EXPAND_ROWS][R];
    const int row0 = blockIdx.y * EXPAND_ROWS;
    for (int t = threadIdx.x; t < EXPAND_ROWS * R; t += blockDim.x) {
        const int r = t / R, k = t % R;
        a_rows[r][k] = (row0 + r < rows && k < rank) ? a[(long long)(row0 + r) * rank + k] : 0.f;
    }
    const int j0 = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    float bv[4][R];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const long long j = j0 + q;
#pragma unroll
        for (int k = 0; k < R; ++k) {
            bv[q][k] = (j < cols && k < rank)
                           ? (b_transposed ? b[j * rank + k] : b[(long long)k * cols + j])
                           : 0.f;
        }
    }
    __syncthreads();
    if (j0 >= cols) return;
    const int last = min(EXPAND_ROWS, rows - row0);
    for (int r = 0; r < last; ++r) {
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int k = 0; k < R; ++k) {
            const float av = a_rows[r][k];
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[q] = fmaf(av, bv[q][k], acc[q]);
        }
        float4* out = reinterpret_cast<float4*>(c + (long long)(row0 + r) * cols + j0);
        float4 v = make_float4(alpha * acc[0], alpha * acc[1], alpha * acc[2], alpha * acc[3]);
        if (beta != 0.f) {
            const float4 old = *out;
            v = make_float4(v.x + beta * old.x, v.y + beta * old.y, v.z + beta * old.z,
                            v.w + beta * old.w);
        }
        *out = v;
    }
}

#define LOWRANK_EXPAND(R)                                                                       \
    extern "C" __global__ void lowrank_expand_r##R(const float* a, const float* b, float* c,   \
                                                    int rows, int cols, int rank,              \
                                                    int b_transposed, float alpha, float beta) { \
        lowrank_expand<R>(a, b, c, rows, cols, rank, b_transposed, alpha, beta);               \
    }
LOWRANK_EXPAND(8)
LOWRANK_EXPAND(16)
LOWRANK_EXPAND(32)
