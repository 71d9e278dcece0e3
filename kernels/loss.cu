// loss.cu: cross-entropy on a chunk of logits (compiled after prelude.cuh).
// Launch: grid = rows, block = 256 (one block per row; any blockDim that is a multiple of 32 and
// <= 1024 works). Reference: src/backend/cpu/loss.rs `softmax_gradient`.

#define IGNORE_LABEL (-100)

// Row t of logits z (length vocab), label y = labels[t]:
//   y == −100: the row is set to 0, row_loss[t] = 0.
//   otherwise: m = max z, lse = m + log Σ_c exp(z_c − m)   (the sum and lse in double),
//              row_loss[t] = lse − z_y,
//              g = (softmax(z) − onehot(y))·s with s = *scale, i.e. g_c = exp(z_c − lse)·s, g_y −= s.
// The scale is read from device memory so that a recorded launch can be replayed with another.
// The max and the sum come from one pass (each thread keeps a running max m_t and a sum s_t
// rescaled when m_t grows: s_t ← s_t·exp(m_old − m_new)), combined as Σ_t s_t·exp(m_t − m); a
// second pass writes the gradient. −∞ logits add nothing (gradient 0 there); a NaN logit makes the
// loss and the whole row NaN, as on the CPU; so does a row that is all −∞ (as on the CPU).
//
// cross_entropy_rows writes g over z in f32. cross_entropy_rows_bf16 writes g in bf16 over the
// first half of the row's own bytes (bf16 g_c at byte 2c of the row, a row of the result being
// 2·vocab bf16 values apart): no second buffer and no cast. The row is written in tiles of
// CE_PER_THREAD·blockDim values, each after every thread has read the tile: bf16 value c lands
// in f32 value ⌊c/2⌋, read in this tile or an earlier one (⌊c/2⌋ ≤ c), never in a later one.
#define CE_PER_THREAD 4

template <bool BF16_OUT>
__device__ void cross_entropy_row(float* logits, const int* labels, int vocab, const float* scale,
                                  float* row_loss) {
    float* z = logits + (long long)blockIdx.x * vocab;
    const int y = labels[blockIdx.x];
    if (y == IGNORE_LABEL) {  // uniform over the block: no thread reaches a barrier below
        // Zero bits are 0 in f32 and in bf16 alike.
        for (int c = threadIdx.x; c < vocab; c += blockDim.x) z[c] = 0.0f;
        if (threadIdx.x == 0) row_loss[blockIdx.x] = 0.0f;
        return;
    }
    const float s_grad = *scale;
    const float neg_inf = -f32_inf();
    // z_y is read before any thread writes the row (the writes follow the block reductions).
    const float zy = threadIdx.x == 0 ? z[y] : 0.0f;
    float m = neg_inf;
    double s = 0.0;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float v = z[c];
        if (v > m) {
            s = s * (double)expf(m - v) + 1.0;  // m = −∞: expf(−∞) = 0 (a NaN s stays NaN)
            m = v;
        } else if (v != neg_inf) {               // −∞ adds 0 (and must not make −∞ − −∞)
            s += (double)expf(v - m);            // NaN v makes s NaN
        }
    }
    const float mx = block_max(m);
    // A thread that saw only −∞ (or nothing) has s = 0 and adds 0·exp(−∞) = 0; a NaN in s stays NaN.
    const double part = s * (double)expf(m - mx);
    const double total = block_sum_f64(part);
    const double lse_d = (double)mx + log(total);
    if (threadIdx.x == 0) row_loss[blockIdx.x] = (float)(lse_d - (double)zy);
    const float lse = (float)lse_d;
    if (!BF16_OUT) {
        for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
            float g = expf(z[c] - lse) * s_grad;
            if (c == y) g -= s_grad;
            z[c] = g;
        }
        return;
    }
    bf16_t* out = reinterpret_cast<bf16_t*>(z);
    const int tile = CE_PER_THREAD * blockDim.x;
    for (int base = 0; base < vocab; base += tile) {
        float g[CE_PER_THREAD];
#pragma unroll
        for (int j = 0; j < CE_PER_THREAD; ++j) {
            const int c = base + j * blockDim.x + threadIdx.x;
            g[j] = c < vocab ? expf(z[c] - lse) * s_grad - (c == y ? s_grad : 0.0f) : 0.0f;
        }
        __syncthreads();  // the whole tile read before any of it is written
#pragma unroll
        for (int j = 0; j < CE_PER_THREAD; ++j) {
            const int c = base + j * blockDim.x + threadIdx.x;
            if (c < vocab) out[c] = f32_to_bf16(g[j]);
        }
    }
}

extern "C" __global__ void cross_entropy_rows(float* logits, const int* labels, int rows,
                                              int vocab, const float* scale, float* row_loss) {
    cross_entropy_row<false>(logits, labels, vocab, scale, row_loss);
}

extern "C" __global__ void cross_entropy_rows_bf16(float* logits, const int* labels, int rows,
                                                   int vocab, const float* scale,
                                                   float* row_loss) {
    cross_entropy_row<true>(logits, labels, vocab, scale, row_loss);
}
