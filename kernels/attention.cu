// attention.cu: causal grouped-query attention with sequence packing (compiled after prelude.cuh).
// Reference: src/backend/cpu/attention.rs (training) and src/backend/cpu/decode.rs (decoding).
//
// Layout: q, out, d_out, dq: [batch·seq, heads·hd]; k, v, dk, dv: [batch·seq, kv_heads·hd];
// row t = b·seq + i. Query head h reads KV head g = h / (heads / kv_heads). lse, delta:
// [batch·seq, heads]. Key j is visible to query i iff j <= i and segments[b·seq+j] ==
// segments[b·seq+i] (only the equality test is used; j = i is always visible).
//
// Math, per (sequence, head), scale c = 1/sqrt(hd) passed as `scale`:
//   forward:  S = c·Q·Kᵀ (invisible entries −∞), lse_i = log Σ_j exp S_ij (natural log),
//             P = exp(S − lse), O = P·V.
//   backward: D_i = Σ_d dO_id·O_id (attention_bwd_delta), dP = dO·Vᵀ, dS = P ∘ (dP − D),
//             dQ = c·dS·K, dV = Pᵀ·dO, dK = c·dSᵀ·Q; query heads of a group add up into their
//             KV head's dK and dV.
//
// Scheme (FlashAttention-2 style, f32 on CUDA cores, FFMA): a block of 128 threads owns 64 queries
// of one head (fwd, dq) or 64 keys of one KV head (dkdv). The other side streams through static
// shared memory in tiles, the head dimension in chunks (so any even hd <= 256 fits in < 48 KiB),
// with an online softmax (running max m and sum l): no seq×seq buffer anywhere. Tiles above the
// causal diagonal are never visited; tiles with no visible (query, key) pair (other segments) are
// skipped with __syncthreads_or. The backward is deterministic (no atomics): every dq element is
// written by the block of its query, every dk/dv element by the block of its key.
//
// Thread layout inside a block (tid = threadIdx.x, tx = tid & 7, ty = tid >> 3):
//   score tile [R rows × C cols]: thread owns rows ty + 16·r (r < R/16) and cols tx + 8·t
//     (t < C/8), so a row lives in 8 consecutive lanes (shuffle reductions over xor 1, 2, 4);
//   accumulator [R rows × hd]: same rows, dims 32·chunk + 4·tx + e (e < 4).
// Shared tiles are row-major with a pitch of width + 4 floats: float4 reads are 16-byte aligned
// and the 8 (or 4) distinct rows a warp reads at once fall into distinct banks.
// The head dimension is padded at compile time to DP = 128 or 256 (64 too for dkdv), the tiling
// picked by hd at run time; staged columns >= hd read as 0 and 32-dim chunks wholly beyond hd are
// skipped, so a smaller hd costs proportionally less.
//
// Tensor cores: for head_dim 64 and 128 (256 too on sm_90a) the backend runs flash.cu's kernels
// instead of attention_fwd, attention_bwd_dq and attention_bwd_dkdv (same outputs up to bf16
// operand rounding); attention_bwd_delta then rounds dO to bf16 for that backward. The
// CUDA-core code here serves every other head_dim.
//
// Assumes blockDim.x == 128 (the launch shape of the contract) and 8-byte aligned tensors (device
// allocations are): global memory is accessed as float2 at even element offsets (hd is even).
// fwd and dq take query tiles in reverse blockIdx.x order, so the longest causal rows start first.

#define ATTN_THREADS 128
#define ATTN_FULL 0xffffffffu

__device__ __forceinline__ float attn_neg_inf() {
    return __uint_as_float(0xff800000u);
}

// The query heads a dK/dV block adds up: [h0, h1) of KV head g.
struct AttnHeads {
    int g, h0, h1;
};

// max / Σ over the 8 lanes of a row group (lanes that differ only in bits 0..2).
__device__ __forceinline__ float attn_max8(float v) {
    v = fmaxf(v, __shfl_xor_sync(ATTN_FULL, v, 1));
    v = fmaxf(v, __shfl_xor_sync(ATTN_FULL, v, 2));
    v = fmaxf(v, __shfl_xor_sync(ATTN_FULL, v, 4));
    return v;
}
__device__ __forceinline__ float attn_sum8(float v) {
    v += __shfl_xor_sync(ATTN_FULL, v, 1);
    v += __shfl_xor_sync(ATTN_FULL, v, 2);
    v += __shfl_xor_sync(ATTN_FULL, v, 4);
    return v;
}

__device__ __forceinline__ float attn_comp(const float4& a, int i) {
    return i == 0 ? a.x : i == 1 ? a.y : i == 2 ? a.z : a.w;
}

// Two consecutive floats at an even element offset of an 8-byte aligned buffer.
__device__ __forceinline__ float2 attn_load2(const float* p) {
    return *reinterpret_cast<const float2*>(p);
}
__device__ __forceinline__ void attn_store2(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
}

__host__ __device__ constexpr int attn_max(int a, int b) {
    return a > b ? a : b;
}

// Stages rows [0, R) × cols [0, W) of a row-major global matrix (row stride ld floats, `src` at
// row 0, col 0) into shared memory `dst` with row pitch P. Rows >= nrows and cols >= ncols read
// as 0 (W, ncols even). A warp copies whole 128-byte row segments (W = 32) or half rows (W = 16).
template <int R, int W, int P>
__device__ __forceinline__ void attn_stage(float* dst, const float* __restrict__ src, int ld,
                                           int nrows, int ncols) {
    constexpr int PAIRS = W / 2;
    constexpr int RSTEP = ATTN_THREADS / PAIRS;  // rows covered by one pass of the block
    static_assert(ATTN_THREADS % PAIRS == 0 && R % RSTEP == 0, "tile shape");
    const int tid = threadIdx.x;
    const int row = tid / PAIRS, col = 2 * (tid % PAIRS);
    const bool colok = col < ncols;
    const float* s = src + (row * ld + col);
    float* d = dst + row * P + col;
#pragma unroll
    for (int it = 0; it < R / RSTEP; ++it) {
        float2 x = make_float2(0.0f, 0.0f);
        if (colok && row + it * RSTEP < nrows) x = attn_load2(s + it * RSTEP * ld);
        *reinterpret_cast<float2*>(d + it * RSTEP * P) = x;
    }
}

// acc[r][t] += Σ_{d<W} A[(ty+16r)·PA + d] · B[(tx+8t)·PB + d]   (A·Bᵀ over a shared chunk)
template <int RM, int TN, int W, int PA, int PB>
__device__ __forceinline__ void attn_mma_nt(float (&acc)[RM][TN], const float* A, const float* B,
                                            int ty, int tx) {
#pragma unroll 2  // (full unrolling makes ptxas hoist loads until it spills)
    for (int d = 0; d < W; d += 4) {
        float4 a[RM];
#pragma unroll
        for (int r = 0; r < RM; ++r) {
            a[r] = *reinterpret_cast<const float4*>(A + (ty + 16 * r) * PA + d);
        }
#pragma unroll
        for (int t = 0; t < TN; ++t) {
            const float4 b = *reinterpret_cast<const float4*>(B + (tx + 8 * t) * PB + d);
#pragma unroll
            for (int r = 0; r < RM; ++r) {
                float x = acc[r][t];
                x = fmaf(a[r].x, b.x, x);
                x = fmaf(a[r].y, b.y, x);
                x = fmaf(a[r].z, b.z, x);
                x = fmaf(a[r].w, b.w, x);
                acc[r][t] = x;
            }
        }
    }
}

// acc[r][e] += Σ_{k<K} A[(ty+16r)·PA + k] · B[k·PB + 4tx + e]   (A·B, B a 32-wide dim chunk)
template <int RM, int K, int PA, int PB>
__device__ __forceinline__ void attn_mma_nn(float (&acc)[RM][4], const float* A, const float* B,
                                            int ty, int tx) {
#pragma unroll 2
    for (int k = 0; k < K; k += 4) {
        float4 a[RM];
#pragma unroll
        for (int r = 0; r < RM; ++r) {
            a[r] = *reinterpret_cast<const float4*>(A + (ty + 16 * r) * PA + k);
        }
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const float4 b = *reinterpret_cast<const float4*>(B + (k + kk) * PB + 4 * tx);
#pragma unroll
            for (int r = 0; r < RM; ++r) {
                const float p = attn_comp(a[r], kk);
                acc[r][0] = fmaf(p, b.x, acc[r][0]);
                acc[r][1] = fmaf(p, b.y, acc[r][1]);
                acc[r][2] = fmaf(p, b.z, acc[r][2]);
                acc[r][3] = fmaf(p, b.w, acc[r][3]);
            }
        }
    }
}

// Writes acc (rows row0 + ty + 16r of a [*, ld] matrix, dims 32c + 4tx + e of the head at `dst`)
// times `mul[r]`, for rows < nrows and dims < hd.
template <int NCH, int RM>
__device__ __forceinline__ void attn_write_acc(float* dst, long long ld, const float (&acc)[NCH][RM][4],
                                               const float (&mul)[RM], int nrows, int hd, int ty,
                                               int tx) {
#pragma unroll
    for (int r = 0; r < RM; ++r) {
        const int row = ty + 16 * r;
        if (row >= nrows) continue;
        float* p = dst + (long long)row * ld;
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
            const int d = 32 * c + 4 * tx;
            if (d < hd) attn_store2(p + d, acc[c][r][0] * mul[r], acc[c][r][1] * mul[r]);
            if (d + 2 < hd) attn_store2(p + d + 2, acc[c][r][2] * mul[r], acc[c][r][3] * mul[r]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Forward.
//   Per query row i (of this block), over the visible keys j, tile by tile (BC = 64 keys):
//     s_ij = c·q_i·k_j;  m' = max(m, max_j s_ij);  α = exp(m − m');  p_ij = exp(s_ij − m');
//     l = α·l + Σ_j p_ij;  o = α·o + Σ_j p_ij·v_j;  m = m'.
//   Finally out_i = o / l, lse_i = m + log l.
// Tiling: rows R = 16·RM per pass (hd <= 128: RM = 4, one pass of 64 queries; hd <= 256: RM = 2,
// two passes of 32). Per key tile: Q and K staged 32 dims at a time ([R][36] + [64][36]) for S,
// P stored to shared ([R][68]), then V staged 32 dims at a time ([64][36], aliasing Q/K) for P·V.
// Registers: o[DP/32][RM][4] (64 floats either way), s[RM][8]. Shared: 35 KiB.
// ---------------------------------------------------------------------------------------------
template <int DP, int RM_, int BC_>
struct AttnFwdCfg {
    static constexpr int RM = RM_, ROWS = 16 * RM, BC = BC_, TN = BC / 8, NCH = DP / 32;
    static constexpr int PA = 36, PP = BC + 4;
    static constexpr int SA = (ROWS + BC) * PA;  // Q chunk + K chunk
    static constexpr int SV = BC * PA;           // V chunk (aliases SA)
    static constexpr int SP = ROWS * PP;         // P tile
    static constexpr int SMEM = attn_max(SA, SV) + SP;
};
typedef AttnFwdCfg<128, 4, 64> ATTN_FWD_CFG128;  // hd <= 128
typedef AttnFwdCfg<256, 2, 64> ATTN_FWD_CFG256;  // 128 < hd <= 256
constexpr int ATTN_FWD_SMEM = attn_max(ATTN_FWD_CFG128::SMEM, ATTN_FWD_CFG256::SMEM);

template <class C>
__device__ __noinline__ void attn_fwd_impl(float* smem, const float* __restrict__ q,
                                              const float* __restrict__ k,
                                              const float* __restrict__ v,
                                              const int* __restrict__ segments,
                                              float* __restrict__ out, float* __restrict__ lse,
                                              int seq, int heads, int kv_heads, int hd,
                                              float scale) {
    constexpr int RM = C::RM, ROWS = C::ROWS, BC = C::BC, TN = C::TN, NCH = C::NCH;
    constexpr int PA = C::PA, PP = C::PP;
    float* Qs = smem;
    float* Ks = smem + ROWS * PA;
    float* Vs = smem;
    float* Ps = smem + attn_max(C::SA, C::SV);

    const int tid = threadIdx.x, tx = tid & 7, ty = tid >> 3;
    const int h = blockIdx.y, b = blockIdx.z, g = h / (heads / kv_heads);
    const long long ldq = (long long)heads * hd, ldk = (long long)kv_heads * hd;
    const long long tok0 = (long long)b * seq;
    const int* seg = segments + tok0;
    const float* qh = q + tok0 * ldq + (long long)h * hd;
    const float* kh = k + tok0 * ldk + (long long)g * hd;
    const float* vh = v + tok0 * ldk + (long long)g * hd;

#pragma unroll 1
    for (int pass = 0; pass < 64 / ROWS; ++pass) {
        const int r0 = (gridDim.x - 1 - blockIdx.x) * 64 + pass * ROWS;  // heavy tiles first
        if (r0 >= seq) break;
        const int nrows = min(ROWS, seq - r0);
        int qi[RM], qseg[RM];
        float m[RM], l[RM], o[NCH][RM][4];
#pragma unroll
        for (int r = 0; r < RM; ++r) {
            qi[r] = r0 + ty + 16 * r;
            qseg[r] = qi[r] < seq ? seg[qi[r]] : 0;
            m[r] = attn_neg_inf();
            l[r] = 0.0f;
#pragma unroll
            for (int c = 0; c < NCH; ++c) {
#pragma unroll
                for (int e = 0; e < 4; ++e) o[c][r][e] = 0.0f;
            }
        }
        const int ntiles = (r0 + nrows - 1) / BC + 1;  // causal: keys <= last query of the pass
#pragma unroll 1
        for (int kt = 0; kt < ntiles; ++kt) {
            const int j0 = kt * BC;
            unsigned int vis = 0;  // bit r·TN + t: key j0 + tx + 8t visible to query qi[r]
#pragma unroll
            for (int t = 0; t < TN; ++t) {
                const int j = j0 + tx + 8 * t;
                const int sj = j < seq ? seg[j] : 0;
#pragma unroll
                for (int r = 0; r < RM; ++r) {
                    if (qi[r] < seq && j <= qi[r] && sj == qseg[r]) vis |= 1u << (r * TN + t);
                }
            }
            if (!__syncthreads_or(vis != 0)) continue;  // nothing visible in this tile

            // S = Q·Kᵀ over 32-dim chunks.
            float s[RM][TN];
#pragma unroll
            for (int r = 0; r < RM; ++r) {
#pragma unroll
                for (int t = 0; t < TN; ++t) s[r][t] = 0.0f;
            }
#pragma unroll
            for (int c = 0; c < NCH; ++c) {
                if (32 * c < hd) {
                    __syncthreads();  // the previous readers of Qs/Ks/Vs are done
                    attn_stage<ROWS, 32, PA>(Qs, qh + (long long)r0 * ldq + 32 * c, ldq, seq - r0,
                                             hd - 32 * c);
                    attn_stage<BC, 32, PA>(Ks, kh + (long long)j0 * ldk + 32 * c, ldk, seq - j0,
                                           hd - 32 * c);
                    __syncthreads();
                    attn_mma_nt<RM, TN, 32, PA, PA>(s, Qs, Ks, ty, tx);
                }
            }

            // Online softmax; P (relative to the new running max) goes to shared memory.
#pragma unroll
            for (int r = 0; r < RM; ++r) {
                float mx = attn_neg_inf();
#pragma unroll
                for (int t = 0; t < TN; ++t) {
                    s[r][t] *= scale;
                    if (vis & (1u << (r * TN + t))) mx = fmaxf(mx, s[r][t]);
                }
                mx = attn_max8(mx);
                const float mnew = fmaxf(m[r], mx);
                // A row with nothing visible yet keeps m = −∞, l = 0, o = 0 (no exp(−∞ + ∞)).
                const bool live = mnew != attn_neg_inf();
                const float alpha = live ? expf(m[r] - mnew) : 1.0f;
                float ps = 0.0f;
#pragma unroll
                for (int t = 0; t < TN; ++t) {
                    const float p = (vis & (1u << (r * TN + t))) ? expf(s[r][t] - mnew) : 0.0f;
                    ps += p;
                    Ps[(ty + 16 * r) * PP + tx + 8 * t] = p;
                }
                l[r] = l[r] * alpha + ps;
                m[r] = mnew;
#pragma unroll
                for (int c = 0; c < NCH; ++c) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) o[c][r][e] *= alpha;
                }
            }

            // O += P·V over 32-dim chunks of V.
#pragma unroll
            for (int c = 0; c < NCH; ++c) {
                if (32 * c < hd) {
                    __syncthreads();  // S readers of Qs/Ks are done; Ps is complete
                    attn_stage<BC, 32, PA>(Vs, vh + (long long)j0 * ldk + 32 * c, ldk, seq - j0,
                                           hd - 32 * c);
                    __syncthreads();
                    attn_mma_nn<RM, BC, PP, PA>(o[c], Ps, Vs, ty, tx);
                }
            }
        }

        float inv[RM];
#pragma unroll
        for (int r = 0; r < RM; ++r) {
            const float lsum = attn_sum8(l[r]);
            inv[r] = 1.0f / lsum;
            if (tx == 0 && qi[r] < seq) {
                lse[(tok0 + qi[r]) * heads + h] = m[r] + logf(lsum);
            }
        }
        attn_write_acc<NCH, RM>(out + (tok0 + r0) * ldq + (long long)h * hd, ldq, o, inv, nrows,
                                hd, ty, tx);
    }
}

// One value of the delta sum: g of dO (rounded to bf16 first, and written at i, with
// `d_out_bf16`; written widened at i with `d_out_f32`) times o, added into acc.
__device__ __forceinline__ float delta_term(float g, float o, float acc, long long i,
                                            bf16_t* __restrict__ d_out_bf16,
                                            float* __restrict__ d_out_f32) {
    if (d_out_bf16) {
        const bf16_t rounded = f32_to_bf16(g);
        d_out_bf16[i] = rounded;
        g = bf16_to_f32(rounded);
    }
    if (d_out_f32) d_out_f32[i] = g;
    return fmaf(g, o, acc);
}

// Four consecutive values from element i of p (bf16 when is_bf16, else f32), widened: one 8- or
// 16-byte load (i a multiple of 4, p an allocation start).
__device__ __forceinline__ float4 quad_at(const void* p, int is_bf16, long long i) {
    return is_bf16 ? bf16x4_to_f32(static_cast<const bf16_t*>(p) + i)
                   : *reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
}

// ---------------------------------------------------------------------------------------------
// delta[t, h] = D = Σ_d dO[t, h·hd+d]·O[t, h·hd+d]. O is f32 or bf16 (`out_bf16`: the product
// input the forward made of it), its rows `out_pitch` values apart. With `d_out_bf16` (the
// tensor-core backward, which forms dP = dO·Vᵀ from bf16-rounded dO) dO is rounded to bf16 first
// and written there for those kernels, so that D uses the same rounded dO and dP − D then cancels
// as it should (D = Σ_j P_ij·dP_ij up to the rounding of P), instead of leaving the dO rounding
// error, O(2^-9·|dO|·|O|), in every dS. dO itself may come in bf16 (`d_out_is_bf16`: a product's
// output stored rounded for this backward): the tensor-core kernels then read it as it is, and
// for the CUDA-core ones it is widened into `d_out_f32` (null otherwise).
// Four values a lane (one 8- or 16-byte load of each input) where head_dim and out_pitch are
// multiples of 4, one otherwise.
// Launch: grid ceil(rows·heads/8), block 256: one warp per (t, h).
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void attention_bwd_delta(const void* __restrict__ out, int out_pitch,
                                               int out_bf16, const void* __restrict__ d_out,
                                               int d_out_is_bf16, bf16_t* __restrict__ d_out_bf16,
                                               float* __restrict__ d_out_f32,
                                               float* __restrict__ delta, int rows, int heads,
                                               int head_dim) {
    const long long pair = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (pair >= (long long)rows * heads) return;  // whole warps leave together
    const long long t = pair / heads;
    const int h = (int)(pair - t * heads);
    const long long base = t * heads * (long long)head_dim + (long long)h * head_dim;
    const long long out_base = t * (long long)out_pitch + (long long)h * head_dim;
    float acc = 0.0f;
    if (head_dim % 4 == 0 && out_pitch % 4 == 0) {
        for (int d = 4 * lane; d < head_dim; d += 128) {
            const float4 g = quad_at(d_out, d_out_is_bf16, base + d);
            const float4 o = quad_at(out, out_bf16, out_base + d);
            acc = delta_term(g.x, o.x, acc, base + d, d_out_bf16, d_out_f32);
            acc = delta_term(g.y, o.y, acc, base + d + 1, d_out_bf16, d_out_f32);
            acc = delta_term(g.z, o.z, acc, base + d + 2, d_out_bf16, d_out_f32);
            acc = delta_term(g.w, o.w, acc, base + d + 3, d_out_bf16, d_out_f32);
        }
    } else {
        for (int d = lane; d < head_dim; d += 32) {
            const float g = d_out_is_bf16
                                ? bf16_to_f32(static_cast<const bf16_t*>(d_out)[base + d])
                                : static_cast<const float*>(d_out)[base + d];
            const float o = out_bf16 ? bf16_to_f32(static_cast<const bf16_t*>(out)[out_base + d])
                                     : static_cast<const float*>(out)[out_base + d];
            acc = delta_term(g, o, acc, base + d, d_out_bf16, d_out_f32);
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) delta[pair] = acc;
}

// ---------------------------------------------------------------------------------------------
// dQ. Per query row i of this block, over the visible keys j, tile by tile:
//   p_ij = exp(c·q_i·k_j − lse_i),  dp_ij = dO_i·v_j,  ds_ij = p_ij·(dp_ij − D_i),
//   dq_i = c·Σ_j ds_ij·k_j.
// Tiling (hd <= 128): one pass of R = 64 rows (RM = 4), key tiles of BC = 64. Per key tile: Q, dO
// ([64][20]) and K, V ([64][20]) staged 16 dims at a time for S and dP; dS stored to shared
// ([64][68]); then K staged again 32 dims at a time ([64][36], aliasing) for dS·K. Registers:
// dq[4][4][4] (64 floats), s[4][8], dp[4][8]. Shared: 37 KiB.
// hd <= 256: two passes of R = 32 rows (RM = 2), key tiles of BC = 32, everything staged 32 dims
// at a time ([32][36] each), dS [32][36]; dq[8][2][4], s[2][4], dp[2][4].
// ---------------------------------------------------------------------------------------------
template <int DP, int RM_, int BC_, int DCA_>
struct AttnDqCfg {
    static constexpr int RM = RM_, ROWS = 16 * RM, BC = BC_, TN = BC / 8, NCH = DP / 32;
    static constexpr int DCA = DCA_, NCHA = DP / DCA, PA = DCA + 4, PB = 36, PS = BC + 4;
    static constexpr int SA = 2 * ROWS * PA + 2 * BC * PA;  // Q, dO, K, V chunks of DCA dims
    static constexpr int SB = BC * PB;                      // K chunk of 32 dims (aliases SA)
    static constexpr int SS = ROWS * PS;                    // dS tile
    static constexpr int SMEM = attn_max(SA, SB) + SS;
};
typedef AttnDqCfg<128, 4, 64, 16> ATTN_DQ_CFG128;  // hd <= 128
typedef AttnDqCfg<256, 2, 32, 32> ATTN_DQ_CFG256;  // 128 < hd <= 256
constexpr int ATTN_DQ_SMEM = attn_max(ATTN_DQ_CFG128::SMEM, ATTN_DQ_CFG256::SMEM);

template <class C>
__device__ __noinline__ void attn_dq_impl(float* smem, const float* __restrict__ q,
                                             const float* __restrict__ k,
                                             const float* __restrict__ v,
                                             const float* __restrict__ d_out,
                                             const float* __restrict__ lse,
                                             const float* __restrict__ delta,
                                             const int* __restrict__ segments,
                                             float* __restrict__ dq, int seq, int heads,
                                             int kv_heads, int hd, float scale) {
    constexpr int RM = C::RM, DCA = C::DCA;
    constexpr int ROWS = C::ROWS, BC = C::BC, TN = C::TN, NCH = C::NCH, NCHA = C::NCHA;
    constexpr int PA = C::PA, PB = C::PB, PS = C::PS;
    float* Qs = smem;
    float* dOs = Qs + ROWS * PA;
    float* Ks = dOs + ROWS * PA;
    float* Vs = Ks + BC * PA;
    float* Kb = smem;
    float* Ss = smem + attn_max(C::SA, C::SB);

    const int tid = threadIdx.x, tx = tid & 7, ty = tid >> 3;
    const int h = blockIdx.y, b = blockIdx.z, g = h / (heads / kv_heads);
    const long long ldq = (long long)heads * hd, ldk = (long long)kv_heads * hd;
    const long long tok0 = (long long)b * seq;
    const int* seg = segments + tok0;
    const float* qh = q + tok0 * ldq + (long long)h * hd;
    const float* doh = d_out + tok0 * ldq + (long long)h * hd;
    const float* kh = k + tok0 * ldk + (long long)g * hd;
    const float* vh = v + tok0 * ldk + (long long)g * hd;

#pragma unroll 1
    for (int pass = 0; pass < 64 / ROWS; ++pass) {
        const int r0 = (gridDim.x - 1 - blockIdx.x) * 64 + pass * ROWS;  // heavy tiles first
        if (r0 >= seq) break;
        const int nrows = min(ROWS, seq - r0);
        int qi[RM], qseg[RM];
        float lse_r[RM], del_r[RM], acc[NCH][RM][4];
#pragma unroll
        for (int r = 0; r < RM; ++r) {
            qi[r] = r0 + ty + 16 * r;
            const bool ok = qi[r] < seq;
            qseg[r] = ok ? seg[qi[r]] : 0;
            lse_r[r] = ok ? lse[(tok0 + qi[r]) * heads + h] : 0.0f;
            del_r[r] = ok ? delta[(tok0 + qi[r]) * heads + h] : 0.0f;
#pragma unroll
            for (int c = 0; c < NCH; ++c) {
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[c][r][e] = 0.0f;
            }
        }
        const int ntiles = (r0 + nrows - 1) / BC + 1;
#pragma unroll 1
        for (int kt = 0; kt < ntiles; ++kt) {
            const int j0 = kt * BC;
            unsigned int vis = 0;
#pragma unroll
            for (int t = 0; t < TN; ++t) {
                const int j = j0 + tx + 8 * t;
                const int sj = j < seq ? seg[j] : 0;
#pragma unroll
                for (int r = 0; r < RM; ++r) {
                    if (qi[r] < seq && j <= qi[r] && sj == qseg[r]) vis |= 1u << (r * TN + t);
                }
            }
            if (!__syncthreads_or(vis != 0)) continue;

            // S = Q·Kᵀ and dP = dO·Vᵀ over 16-dim chunks.
            float s[RM][TN], dp[RM][TN];
#pragma unroll
            for (int r = 0; r < RM; ++r) {
#pragma unroll
                for (int t = 0; t < TN; ++t) {
                    s[r][t] = 0.0f;
                    dp[r][t] = 0.0f;
                }
            }
#pragma unroll
            for (int c = 0; c < NCHA; ++c) {
                if (DCA * c < hd) {
                    __syncthreads();
                    const long long qo = (long long)r0 * ldq + DCA * c, ko = (long long)j0 * ldk + DCA * c;
                    attn_stage<ROWS, DCA, PA>(Qs, qh + qo, ldq, seq - r0, hd - DCA * c);
                    attn_stage<ROWS, DCA, PA>(dOs, doh + qo, ldq, seq - r0, hd - DCA * c);
                    attn_stage<BC, DCA, PA>(Ks, kh + ko, ldk, seq - j0, hd - DCA * c);
                    attn_stage<BC, DCA, PA>(Vs, vh + ko, ldk, seq - j0, hd - DCA * c);
                    __syncthreads();
                    attn_mma_nt<RM, TN, DCA, PA, PA>(s, Qs, Ks, ty, tx);
                    attn_mma_nt<RM, TN, DCA, PA, PA>(dp, dOs, Vs, ty, tx);
                }
            }

            // dS = P ∘ (dP − D), P = exp(c·S − lse) on visible entries, 0 elsewhere.
#pragma unroll
            for (int r = 0; r < RM; ++r) {
#pragma unroll
                for (int t = 0; t < TN; ++t) {
                    const bool on = (vis & (1u << (r * TN + t))) != 0;
                    const float p = on ? expf(s[r][t] * scale - lse_r[r]) : 0.0f;
                    Ss[(ty + 16 * r) * PS + tx + 8 * t] = p * (dp[r][t] - del_r[r]);
                }
            }

            // dQ += dS·K over 32-dim chunks of K.
#pragma unroll
            for (int c = 0; c < NCH; ++c) {
                if (32 * c < hd) {
                    __syncthreads();
                    attn_stage<BC, 32, PB>(Kb, kh + (long long)j0 * ldk + 32 * c, ldk, seq - j0,
                                           hd - 32 * c);
                    __syncthreads();
                    attn_mma_nn<RM, BC, PS, PB>(acc[c], Ss, Kb, ty, tx);
                }
            }
        }
        float mul[RM];
#pragma unroll
        for (int r = 0; r < RM; ++r) mul[r] = scale;
        attn_write_acc<NCH, RM>(dq + (tok0 + r0) * ldq + (long long)h * hd, ldq, acc, mul, nrows, hd,
                                ty, tx);
    }
}


// ---------------------------------------------------------------------------------------------
// dK, dV. Per key row j of this block (KV head g), over the query heads h of the group and the
// visible queries i, tile by tile (BR = 32 queries, from the tile holding j's block start: causal):
//   p_ij = exp(c·q_i·k_j − lse_i),  dp_ij = dO_i·v_j,  ds_ij = p_ij·(dp_ij − D_i),
//   dv_j = Σ_h Σ_i p_ij·dO_i,  dk_j = c·Σ_h Σ_i ds_ij·q_i.
// Tiling: key rows R = 16·RM per pass (hd <= 64: RM = 4, one pass of 64 keys; hd <= 128: RM = 2,
// two passes of 32; hd <= 256: RM = 1, four passes of 16), query tiles of BR = 32. Per query
// tile: K, V ([R][36]) and Q, dO ([32][36]) staged 32 dims at a time for Sᵀ and dPᵀ; P and dS
// stored to shared ([R][36] each); then dO and Q staged again 32 dims at a time (aliasing) for
// Pᵀ·dO and dSᵀ·Q. Registers: dk, dv [DP/32][RM][4] each (2 × 32 floats), s[RM][4], dp[RM][4].
// Shared: 45 KiB (hd <= 64), 27 KiB, 18 KiB.
// ---------------------------------------------------------------------------------------------
template <int DP, int RM_, int BR_>
struct AttnDkdvCfg {
    static constexpr int RM = RM_, ROWS = 16 * RM, BR = BR_, TN = BR / 8, NCH = DP / 32;
    static constexpr int PA = 36, PP = BR + 4;
    static constexpr int SA = 2 * ROWS * PA + 2 * BR * PA;  // K, V, Q, dO chunks
    static constexpr int SB = 2 * BR * PA;                  // dO, Q chunks (alias SA)
    static constexpr int SP = 2 * ROWS * PP;                // P, dS tiles
    static constexpr int SMEM = attn_max(SA, SB) + SP;
};
typedef AttnDkdvCfg<64, 4, 32> ATTN_DKDV_CFG64;    // hd <= 64: 64 keys in one pass
typedef AttnDkdvCfg<128, 2, 32> ATTN_DKDV_CFG128;  // hd <= 128: two passes of 32 keys
typedef AttnDkdvCfg<256, 1, 32> ATTN_DKDV_CFG256;  // hd <= 256: four passes of 16 keys
constexpr int ATTN_DKDV_SMEM = attn_max(
    attn_max(ATTN_DKDV_CFG64::SMEM, ATTN_DKDV_CFG128::SMEM), ATTN_DKDV_CFG256::SMEM);

template <class C>
__device__ __noinline__ void attn_dkdv_impl(float* smem, const float* __restrict__ q,
                                               const float* __restrict__ k,
                                               const float* __restrict__ v,
                                               const float* __restrict__ d_out,
                                               const float* __restrict__ lse,
                                               const float* __restrict__ delta,
                                               const int* __restrict__ segments,
                                               float* __restrict__ dk, float* __restrict__ dv,
                                               int seq, int heads, int kv_heads, int hd,
                                               float scale, AttnHeads hs) {
    constexpr int RM = C::RM;
    constexpr int ROWS = C::ROWS, BR = C::BR, TN = C::TN, NCH = C::NCH, PA = C::PA, PP = C::PP;
    float* Ks = smem;
    float* Vs = Ks + ROWS * PA;
    float* Qs = Vs + ROWS * PA;
    float* dOs = Qs + BR * PA;
    float* dOb = smem;
    float* Qb = smem + BR * PA;
    float* Ps = smem + attn_max(C::SA, C::SB);
    float* dSs = Ps + ROWS * PP;

    const int tid = threadIdx.x, tx = tid & 7, ty = tid >> 3;
    const int g = hs.g, b = blockIdx.z;
    const long long ldq = (long long)heads * hd, ldk = (long long)kv_heads * hd;
    const long long tok0 = (long long)b * seq;
    const int* seg = segments + tok0;
    const float* kh = k + tok0 * ldk + (long long)g * hd;
    const float* vh = v + tok0 * ldk + (long long)g * hd;

#pragma unroll 1
    for (int pass = 0; pass < 64 / ROWS; ++pass) {
        const int r0 = blockIdx.x * 64 + pass * ROWS;
        if (r0 >= seq) break;
        const int nrows = min(ROWS, seq - r0);
        int kj[RM], kseg[RM];
        float dka[NCH][RM][4], dva[NCH][RM][4];
#pragma unroll
        for (int r = 0; r < RM; ++r) {
            kj[r] = r0 + ty + 16 * r;
            kseg[r] = kj[r] < seq ? seg[kj[r]] : 0;
#pragma unroll
            for (int c = 0; c < NCH; ++c) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    dka[c][r][e] = 0.0f;
                    dva[c][r][e] = 0.0f;
                }
            }
        }
#pragma unroll 1
        for (int h = hs.h0; h < hs.h1; ++h) {
            const float* qh = q + tok0 * ldq + (long long)h * hd;
            const float* doh = d_out + tok0 * ldq + (long long)h * hd;
#pragma unroll 1
            for (int i0 = (r0 / BR) * BR; i0 < seq; i0 += BR) {  // causal: queries >= r0's tile
                unsigned int vis = 0;  // bit r·TN + t: key kj[r] visible to query i0 + tx + 8t
                float lse_t[TN], del_t[TN];
#pragma unroll
                for (int t = 0; t < TN; ++t) {
                    const int i = i0 + tx + 8 * t;
                    const bool ok = i < seq;
                    const int si = ok ? seg[i] : 0;
                    lse_t[t] = ok ? lse[(tok0 + i) * heads + h] : 0.0f;
                    del_t[t] = ok ? delta[(tok0 + i) * heads + h] : 0.0f;
#pragma unroll
                    for (int r = 0; r < RM; ++r) {
                        if (ok && kj[r] <= i && si == kseg[r]) vis |= 1u << (r * TN + t);
                    }
                }
                if (!__syncthreads_or(vis != 0)) continue;

                // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ over 32-dim chunks.
                float s[RM][TN], dp[RM][TN];
#pragma unroll
                for (int r = 0; r < RM; ++r) {
#pragma unroll
                    for (int t = 0; t < TN; ++t) {
                        s[r][t] = 0.0f;
                        dp[r][t] = 0.0f;
                    }
                }
#pragma unroll
                for (int c = 0; c < NCH; ++c) {
                    if (32 * c < hd) {
                        __syncthreads();
                        const long long ko = (long long)r0 * ldk + 32 * c, qo = (long long)i0 * ldq + 32 * c;
                        attn_stage<ROWS, 32, PA>(Ks, kh + ko, ldk, seq - r0, hd - 32 * c);
                        attn_stage<ROWS, 32, PA>(Vs, vh + ko, ldk, seq - r0, hd - 32 * c);
                        attn_stage<BR, 32, PA>(Qs, qh + qo, ldq, seq - i0, hd - 32 * c);
                        attn_stage<BR, 32, PA>(dOs, doh + qo, ldq, seq - i0, hd - 32 * c);
                        __syncthreads();
                        attn_mma_nt<RM, TN, 32, PA, PA>(s, Ks, Qs, ty, tx);
                        attn_mma_nt<RM, TN, 32, PA, PA>(dp, Vs, dOs, ty, tx);
                    }
                }

                // Pᵀ and dSᵀ = Pᵀ ∘ (dPᵀ − D) to shared memory.
#pragma unroll
                for (int r = 0; r < RM; ++r) {
#pragma unroll
                    for (int t = 0; t < TN; ++t) {
                        const bool on = (vis & (1u << (r * TN + t))) != 0;
                        const float p = on ? expf(s[r][t] * scale - lse_t[t]) : 0.0f;
                        Ps[(ty + 16 * r) * PP + tx + 8 * t] = p;
                        dSs[(ty + 16 * r) * PP + tx + 8 * t] = p * (dp[r][t] - del_t[t]);
                    }
                }

                // dV += Pᵀ·dO, dK += dSᵀ·Q over 32-dim chunks.
#pragma unroll
                for (int c = 0; c < NCH; ++c) {
                    if (32 * c < hd) {
                        __syncthreads();
                        const long long qo = (long long)i0 * ldq + 32 * c;
                        attn_stage<BR, 32, PA>(dOb, doh + qo, ldq, seq - i0, hd - 32 * c);
                        attn_stage<BR, 32, PA>(Qb, qh + qo, ldq, seq - i0, hd - 32 * c);
                        __syncthreads();
                        attn_mma_nn<RM, BR, PP, PA>(dva[c], Ps, dOb, ty, tx);
                        attn_mma_nn<RM, BR, PP, PA>(dka[c], dSs, Qb, ty, tx);
                    }
                }
            }
        }
        float one[RM], mul[RM];
#pragma unroll
        for (int r = 0; r < RM; ++r) {
            one[r] = 1.0f;
            mul[r] = scale;
        }
        const long long off = (tok0 + r0) * ldk + (long long)g * hd;
        attn_write_acc<NCH, RM>(dv + off, ldk, dva, one, nrows, hd, ty, tx);
        attn_write_acc<NCH, RM>(dk + off, ldk, dka, mul, nrows, hd, ty, tx);
    }
}


// ---------------------------------------------------------------------------------------------
// Decoding: q [m, heads·hd], k, v [n, kv_heads·hd] (one sequence, no segments). Query i sits at
// position p_i = n − m + i and sees keys 0..=p_i:
//   s_j = c·q_i·k_j,  lse_i = log Σ_{j<=p_i} exp s_j,  out_i = Σ_{j<=p_i} exp(s_j − lse_i)·v_j.
// Launch: grid (m, heads), block 128. Each warp streams keys (w·4 + 4·4·u + 0..3), a lane holds
// dims 2·lane + 64·c (float2) of q and of its running output; per warp online softmax, then the
// four warps' (m, l, o) are merged through shared memory:
//   M = max_w m_w, L = Σ_w l_w·exp(m_w − M), out = Σ_w o_w·exp(m_w − M) / L, lse = M + log L.
// ---------------------------------------------------------------------------------------------
#define ATTN_DEC_KB 4

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    attention_decode(const float* __restrict__ q, const float* __restrict__ k,
                     const float* __restrict__ v, float* __restrict__ out,
                     float* __restrict__ lse, int m, int n, int heads, int kv_heads,
                     int head_dim, float scale) {
    __shared__ float sm_m[4], sm_l[4];
    __shared__ __align__(16) float sm_o[4][256];
    const int i = blockIdx.x, h = blockIdx.y, hd = head_dim;
    const int g = h / (heads / kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int pos = n - m + i;
    const long long ldq = (long long)heads * hd, ldk = (long long)kv_heads * hd;
    const float* kg = k + (long long)g * hd;
    const float* vg = v + (long long)g * hd;

    float2 qv[4], o[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const int d = 2 * lane + 64 * c;
        qv[c] = d < hd ? attn_load2(q + i * ldq + (long long)h * hd + d) : make_float2(0.0f, 0.0f);
        o[c] = make_float2(0.0f, 0.0f);
    }
    float mrun = attn_neg_inf(), lrun = 0.0f;
#pragma unroll 1
    for (int j0 = warp * ATTN_DEC_KB; j0 <= pos; j0 += 4 * ATTN_DEC_KB) {
        float s[ATTN_DEC_KB];
#pragma unroll
        for (int kk = 0; kk < ATTN_DEC_KB; ++kk) {
            const int j = j0 + kk;
            float part = 0.0f;
            if (j <= pos) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int d = 2 * lane + 64 * c;
                    if (d < hd) {
                        const float2 kv = attn_load2(kg + (long long)j * ldk + d);
                        part = fmaf(qv[c].x, kv.x, part);
                        part = fmaf(qv[c].y, kv.y, part);
                    }
                }
            }
            s[kk] = part;
        }
        float mx = attn_neg_inf();
#pragma unroll
        for (int kk = 0; kk < ATTN_DEC_KB; ++kk) {
            s[kk] = warp_sum(s[kk]) * scale;
            if (j0 + kk > pos) s[kk] = attn_neg_inf();
            mx = fmaxf(mx, s[kk]);
        }
        const float mnew = fmaxf(mrun, mx);  // finite: key j0 <= pos is visible
        const float alpha = expf(mrun - mnew);
        lrun *= alpha;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            o[c].x *= alpha;
            o[c].y *= alpha;
        }
#pragma unroll
        for (int kk = 0; kk < ATTN_DEC_KB; ++kk) {
            const int j = j0 + kk;
            if (j <= pos) {
                const float p = expf(s[kk] - mnew);
                lrun += p;
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int d = 2 * lane + 64 * c;
                    if (d < hd) {
                        const float2 vv = attn_load2(vg + (long long)j * ldk + d);
                        o[c].x = fmaf(p, vv.x, o[c].x);
                        o[c].y = fmaf(p, vv.y, o[c].y);
                    }
                }
            }
        }
        mrun = mnew;
    }
    if (lane == 0) {
        sm_m[warp] = mrun;
        sm_l[warp] = lrun;
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const int d = 2 * lane + 64 * c;
        sm_o[warp][d] = o[c].x;
        sm_o[warp][d + 1] = o[c].y;
    }
    __syncthreads();
    float M = attn_neg_inf();
#pragma unroll
    for (int w = 0; w < 4; ++w) M = fmaxf(M, sm_m[w]);
    float wgt[4], L = 0.0f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        wgt[w] = expf(sm_m[w] - M);  // a warp that saw no key has m = −∞: weight 0
        L = fmaf(sm_l[w], wgt[w], L);
    }
    const float inv = 1.0f / L;
    float* orow = out + i * ldq + (long long)h * hd;
    for (int d = threadIdx.x; d < hd; d += ATTN_THREADS) {
        float acc = 0.0f;
#pragma unroll
        for (int w = 0; w < 4; ++w) acc = fmaf(sm_o[w][d], wgt[w], acc);
        orow[d] = acc * inv;
    }
    if (threadIdx.x == 0) lse[(long long)i * heads + h] = M + logf(L);
}

// ---------------------------------------------------------------------------------------------
// Entry points (head_dim 64 and 128, and 256 on sm_90a, take flash.cu's kernels instead).
// ---------------------------------------------------------------------------------------------

// out, lse as above. Launch: grid (ceil(seq/64), heads, batch), block 128.
extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    attention_fwd(const float* __restrict__ q, const float* __restrict__ k,
                  const float* __restrict__ v, const int* __restrict__ segments,
                  float* __restrict__ out, float* __restrict__ lse, int batch, int seq, int heads,
                  int kv_heads, int head_dim, float scale) {
    __shared__ __align__(16) float smem[ATTN_FWD_SMEM];
    if (head_dim <= 128) {
        attn_fwd_impl<ATTN_FWD_CFG128>(smem, q, k, v, segments, out, lse, seq, heads, kv_heads,
                                       head_dim, scale);
    } else {
        attn_fwd_impl<ATTN_FWD_CFG256>(smem, q, k, v, segments, out, lse, seq, heads, kv_heads,
                                       head_dim, scale);
    }
}

// dq as above (every element written). Launch: grid (ceil(seq/64), heads, batch), block 128.
extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    attention_bwd_dq(const float* __restrict__ q, const float* __restrict__ k,
                     const float* __restrict__ v, const float* __restrict__ d_out,
                     const float* __restrict__ lse, const float* __restrict__ delta,
                     const int* __restrict__ segments, float* __restrict__ dq, int batch, int seq,
                     int heads, int kv_heads, int head_dim, float scale) {
    __shared__ __align__(16) float smem[ATTN_DQ_SMEM];
    if (head_dim <= 128) {
        attn_dq_impl<ATTN_DQ_CFG128>(smem, q, k, v, d_out, lse, delta, segments, dq, seq, heads,
                                     kv_heads, head_dim, scale);
    } else {
        attn_dq_impl<ATTN_DQ_CFG256>(smem, q, k, v, d_out, lse, delta, segments, dq, seq, heads,
                                     kv_heads, head_dim, scale);
    }
}

// dk, dv as above. Launch: grid (ceil(seq/64), kv_heads·parts, batch), block 128, where parts
// divides heads / kv_heads: block y = g·parts + part adds up the query heads of its share of the
// group, g·group + part·(group/parts) + [0, group/parts), and writes every element of slab `part`
// of dk and dv (slabs of batch·seq·kv_heads·hd floats, one after another; the caller sums them).
// Splitting a group gives a short sequence enough blocks to fill the GPU without atomics.
extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    attention_bwd_dkdv(const float* __restrict__ q, const float* __restrict__ k,
                       const float* __restrict__ v, const float* __restrict__ d_out,
                       const float* __restrict__ lse, const float* __restrict__ delta,
                       const int* __restrict__ segments, float* __restrict__ dk,
                       float* __restrict__ dv, int batch, int seq, int heads, int kv_heads,
                       int head_dim, float scale) {
    __shared__ __align__(16) float smem[ATTN_DKDV_SMEM];
    const int parts = gridDim.y / kv_heads, part = blockIdx.y % parts;
    const int per = heads / kv_heads / parts;
    AttnHeads hs;
    hs.g = blockIdx.y / parts;
    hs.h0 = hs.g * (heads / kv_heads) + part * per;
    hs.h1 = hs.h0 + per;
    const long long slab = (long long)part * batch * seq * kv_heads * head_dim;
    dk += slab;
    dv += slab;
    if (head_dim <= 64) {
        attn_dkdv_impl<ATTN_DKDV_CFG64>(smem, q, k, v, d_out, lse, delta, segments, dk, dv, seq,
                                        heads, kv_heads, head_dim, scale, hs);
    } else if (head_dim <= 128) {
        attn_dkdv_impl<ATTN_DKDV_CFG128>(smem, q, k, v, d_out, lse, delta, segments, dk, dv, seq,
                                         heads, kv_heads, head_dim, scale, hs);
    } else {
        attn_dkdv_impl<ATTN_DKDV_CFG256>(smem, q, k, v, d_out, lse, delta, segments, dk, dv, seq,
                                         heads, kv_heads, head_dim, scale, hs);
    }
}
