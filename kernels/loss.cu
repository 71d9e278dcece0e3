// loss.cu: cross-entropy of the LM head's logits, the vocabulary in chunks (compiled after
// prelude.cuh). Launch: grid = rows, block = 256 (one block per row; any blockDim that is a
// multiple of 32 and <= 1024 works). Reference: src/backend/cpu/loss.rs `softmax_gradient`.

#define IGNORE_LABEL (-100)

// Row t's loss is lse − z_y and its gradient (softmax(z) − onehot(y))·s (s = *scale, read from
// device memory so that a recorded launch can be replayed with another), with y = labels[t];
// rows with y == −100 get loss 0 and gradient 0. The host goes over the head's rows (the
// vocabulary) a chunk at a time, so that the whole head need not be on the device at once:
// per row t, across the chunks of a pass:
// m_t a reference within CE_MAX_LAG below the running max of the logits (f32), z_t =
// Σ exp(logit − m_t) so far (f64), y_t the label's logit, and dh_t = Σ exp(logit_c − m_t)·W_c so
// far (f32, the host's products). For the chunk [v0, v0 + vc) with logits L (row t of `logits`,
// vc values) and M = max_c L_c:
//   m' = M if M > m + CE_MAX_LAG, else m,  α = exp(m − m'),  z ← α·z + Σ_c exp(L_c − m'),
//   m ← m',  y_t = L[label − v0] if the label is in the chunk,  dh_t ← α·dh_t (skipped at α = 1),
//   row overwritten with P_c = exp(L_c − m') (f32, or bf16 over the first half of the row's bytes:
//   bf16 P_c at byte 2c, a row of the result being 2·vc bf16 values apart), after which the host
//   adds P·W_chunk into dh.
// v0 == 0 starts the row (m = −∞, z = 0: α = 0). The chunk holding the label also copies the
// head's row W[label] from the chunk's rows (`w`, `w_pitch` values apart, on the device: no read
// of a head in host memory over the bus) into row t of `wy` (`hidden` values a row), f32 or bf16
// like P. Ignored rows (label −100): P = 0, nothing else touched. After the last chunk,
// ce_online_finish: lse = m + log z, row_loss = lse − y and
//   dh_t = s·(dh_t / z − W[label])   (= (softmax − onehot)·W·s, s = *scale),
// W[label] read from `wy` (bf16 as `wy_bf16` says); ignored rows get dh = 0 and row_loss = 0. A
// row that has seen only −∞ logits so far keeps z = 0 and P = 0.
// Each chunk's max and sum come from one pass (each thread keeps a running max m_t and a sum
// s_t rescaled when m_t grows, combined as Σ_t s_t·exp(m_t − max)); −∞ logits add nothing, a
// NaN logit makes the row's loss and gradient NaN, as on the CPU. The bf16 probabilities are
// written in tiles of CE_PER_THREAD·blockDim values, each after every thread has read the tile:
// bf16 value c lands in f32 value ⌊c/2⌋, read in this tile or an earlier one, never a later one.
#define CE_PER_THREAD 4
// The reference m stays put until a chunk's max passes it by more than this, so that after the
// first chunk dh_t is rarely rescaled (a read and write of the row's f32 gradient a chunk
// otherwise). Every exp(logit − m) is then at most e^CE_MAX_LAG (~4.9e8): with 2^17 · 4.9e8 ·
// |W| far below f32's 3.4e38, neither z, nor P (bf16 has f32's range), nor dh can overflow, and
// their relative rounding is the same as against the exact max.
#define CE_MAX_LAG 20.0f

template <bool BF16_OUT>
__device__ void online_chunk_row(float* logits, const int* labels, int vc, int v0, float* m_state,
                                 double* z_state, float* y_state, float* dh, int hidden,
                                 const void* w, long long w_pitch, void* wy) {
    const int t = blockIdx.x;
    float* z = logits + (long long)t * vc;
    const int y = labels[t];
    if (y == IGNORE_LABEL) {  // uniform over the block
        for (int c = threadIdx.x; c < vc; c += blockDim.x) z[c] = 0.0f;
        return;
    }
    const float neg_inf = -f32_inf();
    const bool has_label = y >= v0 && y < v0 + vc;
    const float zy = has_label && threadIdx.x == 0 ? z[y - v0] : 0.0f;
    if (has_label) {  // uniform over the block
        const long long from = (long long)(y - v0) * w_pitch, to = (long long)t * hidden;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            if (BF16_OUT) {
                reinterpret_cast<bf16_t*>(wy)[to + i] = reinterpret_cast<const bf16_t*>(w)[from + i];
            } else {
                reinterpret_cast<float*>(wy)[to + i] = reinterpret_cast<const float*>(w)[from + i];
            }
        }
    }
    // Read before the reductions' barriers; thread 0 writes the state after them.
    const bool first = v0 == 0;
    const float m_old = first ? neg_inf : m_state[t];
    float m = neg_inf;
    double s = 0.0;
    for (int c = threadIdx.x; c < vc; c += blockDim.x) {
        const float v = z[c];
        if (v > m) {
            s = s * (double)expf(m - v) + 1.0;
            m = v;
        } else if (v != neg_inf) {
            s += (double)expf(v - m);
        }
    }
    const float cmax = block_max(m);
    // Σ_c exp(L_c − cmax); a thread that saw only −∞ (or nothing) adds 0, also when the whole
    // chunk is −∞ (then m − cmax would be NaN); a NaN in s stays NaN.
    const double csum = block_sum_f64(s == 0.0 ? 0.0 : s * (double)expf(m - cmax));
    // From −∞ (the first chunk, or only −∞ so far) any finite max is taken; a NaN one is not.
    const float m_new = cmax > m_old + CE_MAX_LAG ? cmax : m_old;
    // While a row has seen only −∞ (m' = −∞), exponents subtract 0 instead: exp(−∞) = 0.
    const float m_sub = m_new == neg_inf ? 0.0f : m_new;
    const float alpha = first ? 0.0f : expf(m_old - m_sub);
    if (threadIdx.x == 0) {
        const double z_old = first ? 0.0 : z_state[t];
        z_state[t] = z_old * (double)alpha + csum * (double)expf(cmax - m_sub);
        m_state[t] = m_new;
        if (has_label) y_state[t] = zy;
    }
    if (!first && alpha != 1.0f) {  // uniform over the block
        float* d = dh + (long long)t * hidden;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) d[i] *= alpha;
    }
    if (!BF16_OUT) {
        for (int c = threadIdx.x; c < vc; c += blockDim.x) z[c] = expf(z[c] - m_sub);
        return;
    }
    bf16_t* out = reinterpret_cast<bf16_t*>(z);
    const int tile = CE_PER_THREAD * blockDim.x;
    for (int base = 0; base < vc; base += tile) {
        float p[CE_PER_THREAD];
#pragma unroll
        for (int j = 0; j < CE_PER_THREAD; ++j) {
            const int c = base + j * blockDim.x + threadIdx.x;
            p[j] = c < vc ? expf(z[c] - m_sub) : 0.0f;
        }
        __syncthreads();  // the whole tile read before any of it is written
#pragma unroll
        for (int j = 0; j < CE_PER_THREAD; ++j) {
            const int c = base + j * blockDim.x + threadIdx.x;
            if (c < vc) out[c] = f32_to_bf16(p[j]);
        }
    }
}

extern "C" __global__ void ce_online_chunk(float* logits, const int* labels, int rows, int vc, int v0,
                                           float* m_state, double* z_state, float* y_state,
                                           float* dh, int hidden, const void* w,
                                           long long w_pitch, void* wy) {
    online_chunk_row<false>(logits, labels, vc, v0, m_state, z_state, y_state, dh, hidden, w,
                            w_pitch, wy);
}

extern "C" __global__ void ce_online_chunk_bf16(float* logits, const int* labels, int rows, int vc,
                                                int v0, float* m_state, double* z_state,
                                                float* y_state, float* dh, int hidden,
                                                const void* w, long long w_pitch, void* wy) {
    online_chunk_row<true>(logits, labels, vc, v0, m_state, z_state, y_state, dh, hidden, w,
                           w_pitch, wy);
}

extern "C" __global__ void ce_online_finish(const int* labels, const float* m_state,
                                            const double* z_state, const float* y_state,
                                            const void* wy, int wy_bf16, float* dh, int hidden,
                                            const float* scale, float* row_loss) {
    const int t = blockIdx.x, y = labels[t];
    float* d = dh + (long long)t * hidden;
    if (y == IGNORE_LABEL) {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) d[i] = 0.0f;
        if (threadIdx.x == 0) row_loss[t] = 0.0f;
        return;
    }
    const double z = z_state[t];
    if (threadIdx.x == 0) {
        row_loss[t] = (float)((double)m_state[t] + log(z) - (double)y_state[t]);
    }
    const float s = *scale, inv_z = (float)(1.0 / z);
    const long long w0 = (long long)t * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float w = wy_bf16 ? bf16_to_f32(reinterpret_cast<const bf16_t*>(wy)[w0 + i])
                                : reinterpret_cast<const float*>(wy)[w0 + i];
        d[i] = s * (d[i] * inv_z - w);
    }
}
