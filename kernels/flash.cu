// flash.cu: the training attention kernels on tensor cores for head_dim 64 and 128 (compiled
// after prelude.cuh). Same math, layouts, masks and outputs as attention.cu's training kernels
// (its header states them), with q, k, v and dO read as bf16 copies of the f32 tensors:
//   forward:  S = c·Q·Kᵀ (invisible entries −∞), lse_i = log Σ_j exp S_ij, P = exp(S − lse), O = P·V
//   backward: dP = dO·Vᵀ, dS = P ∘ (dP − D), dQ = c·dS·K, dV = Pᵀ·dO, dK = c·dSᵀ·Q
// Every product is mma.sync.m16n8k16 (bf16 operands, f32 accumulation); the softmax statistics
// stay f32; P and dS are rounded to bf16 only as operands of the second product.
//
// Scheme (FlashAttention-2): a block of 4 warps owns 64 rows (queries in fwd and dq, keys in
// dkdv), 16 per warp; the other side streams through shared memory in tiles of 64 rows, copied
// by cp.async into two buffers (tile t+1 arrives while tile t is computed). No seq×seq buffer.
// Tiles above the causal diagonal are never loaded; tiles with no visible (query, key) pair
// (other segments of a packed row) are loaded but not computed.
//
// Shared tiles are row-major bf16 [64][HD + 8]: a row pitch of HD + 8 elements (≡ 16 bytes mod
// 128) puts the 8 rows one ldmatrix phase reads into 8 distinct 16-byte bank groups. Operand
// fragments come from ldmatrix: .x4 for the operands whose k index is the head dim (rows of Q,
// K, V, dO as stored), .x4.trans for those whose k index is the row index (V in P·V, K in dS·K,
// dO in Pᵀ·dO, Q in dSᵀ·Q).
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), lane =
// 4·gid + tig: A a0 = A[gid][2tig..+1], a1 = A[gid+8][..], a2 = A[gid][2tig+8..+9], a3 =
// A[gid+8][2tig+8..]; B b0 = B[2tig..+1][gid], b1 = B[2tig+8..+9][gid]; C c0,c1 = C[gid][2tig..+1],
// c2,c3 = C[gid+8][2tig..+1]. An accumulator tile pair (16 rows × 16 cols) of a score product is
// therefore the A fragment of the next product once packed to bf16.
//
// Shared memory is dynamic (the host sets the function's limit): see each kernel's launch line.

#define FLASH_THREADS 128
#define FLASH_TILE 64
#define FLASH_LOG2E 1.4426950408889634f
#define FLASH_LN2 0.6931471805599453f

__device__ __forceinline__ float flash_neg_inf() {
    return __uint_as_float(0xff800000u);
}

// The shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ unsigned int flash_smem(const void* p) {
    unsigned int a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared, asynchronous; zero-filled when !valid (then nothing is read).
__device__ __forceinline__ void flash_cp16(unsigned int dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void flash_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void flash_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8×8 bf16 matrices from shared memory; lanes 8m..8m+7 give the row addresses of matrix m.
__device__ __forceinline__ void flash_ldsm(unsigned int (&r)[4], unsigned int addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
// The same, each matrix transposed.
__device__ __forceinline__ void flash_ldsm_t(unsigned int (&r)[4], unsigned int addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// D += A·B (one warp, 16×8×16).
__device__ __forceinline__ void flash_mma(float (&d)[4], const unsigned int (&a)[4], unsigned int b0,
                                          unsigned int b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two f32 -> one register of two bf16 (lo in the low half), rounded to nearest even by one
// conversion instruction (a NaN becomes the canonical NaN).
__device__ __forceinline__ unsigned int flash_pack(float lo, float hi) {
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// The accumulator tiles 2kb, 2kb+1 of x as a bf16 A fragment (16 rows × 16 k).
template <int NT>
__device__ __forceinline__ void flash_c_to_a(unsigned int (&a)[4], const float (&x)[NT][4], int kb) {
    a[0] = flash_pack(x[2 * kb][0], x[2 * kb][1]);
    a[1] = flash_pack(x[2 * kb][2], x[2 * kb][3]);
    a[2] = flash_pack(x[2 * kb + 1][0], x[2 * kb + 1][1]);
    a[3] = flash_pack(x[2 * kb + 1][2], x[2 * kb + 1][3]);
}

template <int NT>
__device__ __forceinline__ void flash_zero(float (&x)[NT][4]) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) x[t][e] = 0.0f;
    }
}

// Row `half` (0: gid, 1: gid + 8) of an accumulator set over the head dim, times `mul`, to
// p[8n + 2tig..+1] (p: the row's first element for this thread's tig, 8-byte aligned).
template <int NDT>
__device__ __forceinline__ void flash_store_row(float* p, const float (&acc)[NDT][4], int half,
                                                float mul) {
#pragma unroll
    for (int n = 0; n < NDT; ++n) {
        *reinterpret_cast<float2*>(p + 8 * n) =
            make_float2(acc[n][2 * half] * mul, acc[n][2 * half + 1] * mul);
    }
}

// max / Σ over the 4 lanes of a quad (the lanes holding one accumulator row).
__device__ __forceinline__ float flash_max4(float v) {
    v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, 1));
    return fmaxf(v, __shfl_xor_sync(FULL_MASK, v, 2));
}
__device__ __forceinline__ float flash_sum4(float v) {
    v += __shfl_xor_sync(FULL_MASK, v, 1);
    return v + __shfl_xor_sync(FULL_MASK, v, 2);
}

// Starts copying rows [0, 64) × HD of a row-major bf16 matrix (row stride ld elements, `src` at
// row 0 of the tile) into `dst` (pitch HD + 8); rows >= nrows are zero-filled.
template <int HD>
__device__ __forceinline__ void flash_load_tile(bf16_t* dst, const bf16_t* __restrict__ src,
                                                long long ld, int nrows) {
    constexpr int CPR = HD / 8, P = HD + 8, N = FLASH_TILE * CPR / FLASH_THREADS;
#pragma unroll
    for (int it = 0; it < N; ++it) {
        const int c = it * FLASH_THREADS + threadIdx.x;
        const int r = c / CPR, x = 8 * (c % CPR);
        const bool ok = r < nrows;
        flash_cp16(flash_smem(dst + r * P + x), src + (ok ? r * ld + x : 0), ok);
    }
}

// A fragments of the warp's 16 rows (from row0) × HD of a shared tile, one per 16 dims.
template <int HD>
__device__ __forceinline__ void flash_afrags(unsigned int (&a)[HD / 16][4], const bf16_t* tile,
                                             int row0, int lane) {
    const bf16_t* p = tile + (row0 + (lane & 15)) * (HD + 8) + 8 * (lane >> 4);
#pragma unroll
    for (int kb = 0; kb < HD / 16; ++kb) flash_ldsm(a[kb], flash_smem(p + 16 * kb));
}

// acc[t] += A·Bᵀ over the head dim for the n-tiles t < NT of rows n0 + 8t of `tile` (B rows as
// stored: S = Q·Kᵀ, dP = dO·Vᵀ, Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ). A fragments in registers.
template <int HD, int NT>
__device__ __forceinline__ void flash_mma_nt(float (&acc)[NT][4], const unsigned int (&a)[HD / 16][4],
                                             const bf16_t* tile, int n0, int lane) {
    const bf16_t* p = tile + (n0 + (lane & 7) + 8 * (lane >> 4)) * (HD + 8) + 8 * ((lane >> 3) & 1);
#pragma unroll
    for (int kb = 0; kb < HD / 16; ++kb) {
#pragma unroll
        for (int t = 0; t < NT; t += 2) {
            unsigned int b[4];
            flash_ldsm(b, flash_smem(p + 8 * t * (HD + 8) + 16 * kb));
            flash_mma(acc[t], a[kb], b[0], b[1]);
            flash_mma(acc[t + 1], a[kb], b[2], b[3]);
        }
    }
}

// The same with the A fragments read from rows row0.. of a shared tile as they are needed
// (dPᵀ = V·dOᵀ: V's fragments would not fit in registers beside the accumulators).
template <int HD, int NT>
__device__ __forceinline__ void flash_mma_nt_shared_a(float (&acc)[NT][4], const bf16_t* atile,
                                                      int row0, const bf16_t* tile, int n0,
                                                      int lane) {
    const bf16_t* pa = atile + (row0 + (lane & 15)) * (HD + 8) + 8 * (lane >> 4);
    const bf16_t* p = tile + (n0 + (lane & 7) + 8 * (lane >> 4)) * (HD + 8) + 8 * ((lane >> 3) & 1);
#pragma unroll
    for (int kb = 0; kb < HD / 16; ++kb) {
        unsigned int a[4];
        flash_ldsm(a, flash_smem(pa + 16 * kb));
#pragma unroll
        for (int t = 0; t < NT; t += 2) {
            unsigned int b[4];
            flash_ldsm(b, flash_smem(p + 8 * t * (HD + 8) + 16 * kb));
            flash_mma(acc[t], a, b[0], b[1]);
            flash_mma(acc[t + 1], a, b[2], b[3]);
        }
    }
}

// acc[n] += A·B for the head-dim n-tiles n < HD/8, A = 16 rows × 16 k (registers), B = rows
// k0..k0+15 of `tile` (P·V, dS·K, Pᵀ·dO, dSᵀ·Q: the tile's row index is the k index).
template <int HD>
__device__ __forceinline__ void flash_mma_nn(float (&acc)[HD / 8][4], const unsigned int (&a)[4],
                                             const bf16_t* tile, int k0, int lane) {
    const bf16_t* p = tile + (k0 + (lane & 15)) * (HD + 8) + 8 * (lane >> 4);
#pragma unroll
    for (int n = 0; n < HD / 8; n += 2) {
        unsigned int b[4];
        flash_ldsm_t(b, flash_smem(p + 8 * n));
        flash_mma(acc[n], a, b[0], b[1]);
        flash_mma(acc[n + 1], a, b[2], b[3]);
    }
}

// Visibility bits of an accumulator tile set (rows ra, rb of this thread; columns c0 + 8t + 2tig
// + e): bit 4t + e for row ra, bit 4t + 2 + e for row rb. `causal(row, col)` says whether the
// pair passes the causal test; segments must be equal too. Rows and columns >= seq are invisible.
template <int NT, bool KEYS_ARE_ROWS>
__device__ __forceinline__ unsigned int flash_visible(const int* seg, int seq, int ra, int rb,
                                                      int c0, int tig) {
    const int sa = ra < seq ? seg[ra] : 0, sb = rb < seq ? seg[rb] : 0;
    unsigned int vis = 0;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int c = c0 + 8 * t + 2 * tig + e;
            if (c < seq) {
                const int sc = seg[c];
                // key <= query
                const bool oka = KEYS_ARE_ROWS ? ra <= c : c <= ra;
                const bool okb = KEYS_ARE_ROWS ? rb <= c : c <= rb;
                if (ra < seq && oka && sc == sa) vis |= 1u << (4 * t + e);
                if (rb < seq && okb && sc == sb) vis |= 1u << (4 * t + 2 + e);
            }
        }
    }
    return vis;
}

// True (in every thread) when rows [r0, r0 + 64) all exist and share one segment. Contains
// __syncthreads_or: every thread must call it.
__device__ __forceinline__ bool flash_block_whole(const int* seg, int seq, int r0) {
    const int t = threadIdx.x;
    return !__syncthreads_or(!(r0 + FLASH_TILE <= seq && (t >= FLASH_TILE || seg[r0 + t] == seg[r0])));
}

// Where a block of 64 queries (fwd, dq) works: query head h = blockIdx.y of sequence b =
// blockIdx.z, queries from r0 (reverse blockIdx.x order: the longest causal rows start first),
// the rows of its KV head in k and v, and the key tiles up to the diagonal.
template <int HD>
struct FlashQueryBlock {
    int h, r0, ntiles;
    long long ldq, ldk, tok0;
    const int* seg;
    const bf16_t* kh;
    const bf16_t* vh;
    __device__ FlashQueryBlock(const bf16_t* k, const bf16_t* v, const int* segments, int seq,
                               int heads, int kv_heads)
        : h(blockIdx.y),
          r0((gridDim.x - 1 - blockIdx.x) * FLASH_TILE),
          ntiles(min(r0 + FLASH_TILE - 1, seq - 1) / FLASH_TILE + 1),
          ldq((long long)heads * HD),
          ldk((long long)kv_heads * HD),
          tok0((long long)blockIdx.z * seq),
          seg(segments + tok0),
          kh(k + tok0 * ldk + (long long)(h / (heads / kv_heads)) * HD),
          vh(v + tok0 * ldk + (long long)(h / (heads / kv_heads)) * HD) {}

    // Starts copying key tile kt + 1 (if there is one) into `kbuf` and `vbuf`, and commits a
    // copy group either way. Returns, in every thread, whether tile kt is wholly below the
    // diagonal within the queries' one segment (`qwhole`): then it needs no mask. Contains
    // __syncthreads_or: every thread must call it.
    __device__ bool prefetch(int kt, bf16_t* kbuf, bf16_t* vbuf, int seq, bool qwhole) const {
        const int j0 = kt * FLASH_TILE, next = j0 + FLASH_TILE;
        if (kt + 1 < ntiles) {
            flash_load_tile<HD>(kbuf, kh + next * ldk, ldk, seq - next);
            flash_load_tile<HD>(vbuf, vh + next * ldk, ldk, seq - next);
        }
        flash_commit();
        const int t = threadIdx.x;
        return !__syncthreads_or(
            !(qwhole && next <= r0 && (t >= FLASH_TILE || seg[j0 + t] == seg[r0])));
    }
};

// ---------------------------------------------------------------------------------------------
// Forward. Block: 64 queries from r0 (reverse blockIdx.x order: the longest causal rows first).
// Per key tile of 64, with the online softmax in the log2 domain (x = c·log2(e)·q·k):
//   m' = max(m, max_j x_j);  α = 2^(m − m');  p_j = 2^(x_j − m');  l = α·l + Σ_j p_j;
//   o = α·o + Σ_j p_j·v_j;  m = m'.   Finally out = o / l, lse = (m + log2 l)·ln 2.
// The max is taken over the raw scores and then scaled (c·log2(e) > 0), and each p_j is one
// fused multiply-add and an exp2: p_j = 2^(fma(q·k_j, c·log2(e), −m')).
// Registers: qa HD/2, o HD/2, s 32. Shared: K and V, two buffers each.
// ---------------------------------------------------------------------------------------------
template <int HD>
__device__ __forceinline__ void flash_fwd_impl(bf16_t* sm, const bf16_t* __restrict__ q,
                                               const bf16_t* __restrict__ k,
                                               const bf16_t* __restrict__ v,
                                               const int* __restrict__ segments,
                                               float* __restrict__ out, float* __restrict__ lse,
                                               int seq, int heads, int kv_heads, float scale) {
    constexpr int NKB = HD / 16, NDT = HD / 8, BC = FLASH_TILE, NT = BC / 8, TE = BC * (HD + 8);
    // Buffer u: K (or Q) at sm + 2u·TE, V (or dO) after it.
    auto Kb = [&](int u) { return sm + 2 * u * TE; };
    auto Vb = [&](int u) { return sm + (2 * u + 1) * TE; };

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
    const FlashQueryBlock<HD> blk(k, v, segments, seq, heads, kv_heads);
    const int h = blk.h, r0 = blk.r0, ntiles = blk.ntiles;
    const long long ldq = blk.ldq, ldk = blk.ldk, tok0 = blk.tok0;
    const int* seg = blk.seg;
    const bf16_t* kh = blk.kh;
    const bf16_t* vh = blk.vh;

    // Q goes through buffer 1's K area; tile 0 into buffer 0.
    flash_load_tile<HD>(Kb(1), q + tok0 * ldq + (long long)h * HD + r0 * ldq, ldq, seq - r0);
    flash_commit();
    flash_load_tile<HD>(Kb(0), kh, ldk, seq);
    flash_load_tile<HD>(Vb(0), vh, ldk, seq);
    flash_commit();
    flash_wait<1>();
    __syncthreads();
    unsigned int qa[NKB][4];
    flash_afrags<HD>(qa, Kb(1), 16 * warp, lane);
    const bool qwhole = flash_block_whole(seg, seq, r0);  // also: every warp has read Q

    const int i0 = r0 + 16 * warp + gid, i1 = i0 + 8;
    const float sl2 = scale * FLASH_LOG2E;
    float o[NDT][4];
    flash_zero<NDT>(o);
    float m0 = flash_neg_inf(), m1 = flash_neg_inf(), l0 = 0.0f, l1 = 0.0f;
#pragma unroll 1
    for (int kt = 0; kt < ntiles; ++kt) {
        const int buf = kt & 1, j0 = kt * BC;
        const bool whole = blk.prefetch(kt, Kb(buf ^ 1), Vb(buf ^ 1), seq, qwhole);
        const unsigned int vis = whole ? 0xffffffffu : flash_visible<NT, false>(seg, seq, i0, i1, j0, tig);
        const bool any = whole || __syncthreads_or(vis != 0);
        flash_wait<1>();
        __syncthreads();
        if (any) {
            float s[NT][4];
            flash_zero<NT>(s);
            flash_mma_nt<HD, NT>(s, qa, Kb(buf), 0, lane);
            float mx0 = flash_neg_inf(), mx1 = flash_neg_inf();
#pragma unroll
            for (int t = 0; t < NT; ++t) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s[t][e] = (vis >> (4 * t + e)) & 1u ? s[t][e] : flash_neg_inf();
                }
                mx0 = fmaxf(mx0, fmaxf(s[t][0], s[t][1]));
                mx1 = fmaxf(mx1, fmaxf(s[t][2], s[t][3]));
            }
            const float mn0 = fmaxf(m0, flash_max4(mx0) * sl2);
            const float mn1 = fmaxf(m1, flash_max4(mx1) * sl2);
            // A row with nothing visible yet keeps m = −∞ (subtract 0 instead: 2^−∞ = 0).
            const float ms0 = mn0 == flash_neg_inf() ? 0.0f : mn0;
            const float ms1 = mn1 == flash_neg_inf() ? 0.0f : mn1;
            const float al0 = exp2f(m0 - ms0), al1 = exp2f(m1 - ms1);
            m0 = mn0;
            m1 = mn1;
            float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                s[t][0] = exp2f(fmaf(s[t][0], sl2, -ms0));
                s[t][1] = exp2f(fmaf(s[t][1], sl2, -ms0));
                s[t][2] = exp2f(fmaf(s[t][2], sl2, -ms1));
                s[t][3] = exp2f(fmaf(s[t][3], sl2, -ms1));
                ps0 += s[t][0] + s[t][1];
                ps1 += s[t][2] + s[t][3];
            }
            l0 = l0 * al0 + ps0;
            l1 = l1 * al1 + ps1;
#pragma unroll
            for (int n = 0; n < NDT; ++n) {
                o[n][0] *= al0;
                o[n][1] *= al0;
                o[n][2] *= al1;
                o[n][3] *= al1;
            }
#pragma unroll
            for (int kb = 0; kb < BC / 16; ++kb) {
                unsigned int pa[4];
                flash_c_to_a<NT>(pa, s, kb);
                flash_mma_nn<HD>(o, pa, Vb(buf), 16 * kb, lane);
            }
        }
        __syncthreads();  // buffer `buf` is refilled by the next iteration's prefetch
    }

    l0 = flash_sum4(l0);
    l1 = flash_sum4(l1);
    const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    float* ob = out + (long long)h * HD + 2 * tig;
    if (i0 < seq) {
        flash_store_row<NDT>(ob + (tok0 + i0) * ldq, o, 0, inv0);
        if (tig == 0) lse[(tok0 + i0) * heads + h] = (m0 + log2f(l0)) * FLASH_LN2;
    }
    if (i1 < seq) {
        flash_store_row<NDT>(ob + (tok0 + i1) * ldq, o, 1, inv1);
        if (tig == 0) lse[(tok0 + i1) * heads + h] = (m1 + log2f(l1)) * FLASH_LN2;
    }
}

// q, k, v bf16 ([batch·seq, heads·hd], [batch·seq, kv_heads·hd] twice); out f32 like q, lse f32
// [batch·seq, heads]. Launch: grid (ceil(seq/64), heads, batch), block 128, dynamic shared
// memory 4·64·(hd + 8)·2 bytes.
extern "C" __global__ void __launch_bounds__(FLASH_THREADS)
    flash_fwd(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
              const bf16_t* __restrict__ v, const int* __restrict__ segments,
              float* __restrict__ out, float* __restrict__ lse, int batch, int seq, int heads,
              int kv_heads, int head_dim, float scale) {
    extern __shared__ __align__(16) bf16_t flash_sm[];
    if (head_dim == 128) {
        flash_fwd_impl<128>(flash_sm, q, k, v, segments, out, lse, seq, heads, kv_heads, scale);
    } else {
        flash_fwd_impl<64>(flash_sm, q, k, v, segments, out, lse, seq, heads, kv_heads, scale);
    }
}

// ---------------------------------------------------------------------------------------------
// dQ. Block: 64 queries from r0 (reverse order, as fwd); Q and dO fragments in registers. Per key
// tile of 64, in two halves of 32 keys (registers): S = Q·Kᵀ, dP = dO·Vᵀ;
// P = 2^(c·log2e·S − lse·log2e), dS = P ∘ (dP − D) packed to bf16; dQ += dS·K.
// Registers: qa, da HD/2 each, acc HD/2, s + dp 32. Shared: K and V, two buffers each.
// ---------------------------------------------------------------------------------------------
template <int HD>
__device__ __forceinline__ void flash_dq_impl(bf16_t* sm, const bf16_t* __restrict__ q,
                                              const bf16_t* __restrict__ k,
                                              const bf16_t* __restrict__ v,
                                              const bf16_t* __restrict__ d_out,
                                              const float* __restrict__ lse,
                                              const float* __restrict__ delta,
                                              const int* __restrict__ segments,
                                              float* __restrict__ dq, int seq, int heads,
                                              int kv_heads, float scale) {
    constexpr int NKB = HD / 16, NDT = HD / 8, BC = FLASH_TILE, HALF = BC / 2, NT = HALF / 8;
    constexpr int TE = BC * (HD + 8);
    // Buffer u: K (or Q) at sm + 2u·TE, V (or dO) after it.
    auto Kb = [&](int u) { return sm + 2 * u * TE; };
    auto Vb = [&](int u) { return sm + (2 * u + 1) * TE; };

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
    const FlashQueryBlock<HD> blk(k, v, segments, seq, heads, kv_heads);
    const int h = blk.h, r0 = blk.r0, ntiles = blk.ntiles;
    const long long ldq = blk.ldq, ldk = blk.ldk, tok0 = blk.tok0;
    const int* seg = blk.seg;
    const bf16_t* kh = blk.kh;
    const bf16_t* vh = blk.vh;
    const long long qoff = (tok0 + r0) * ldq + (long long)h * HD;

    // Q and dO go through buffer 1; tile 0 into buffer 0.
    flash_load_tile<HD>(Kb(1), q + qoff, ldq, seq - r0);
    flash_load_tile<HD>(Vb(1), d_out + qoff, ldq, seq - r0);
    flash_commit();
    flash_load_tile<HD>(Kb(0), kh, ldk, seq);
    flash_load_tile<HD>(Vb(0), vh, ldk, seq);
    flash_commit();
    flash_wait<1>();
    __syncthreads();
    unsigned int qa[NKB][4], da[NKB][4];
    flash_afrags<HD>(qa, Kb(1), 16 * warp, lane);
    flash_afrags<HD>(da, Vb(1), 16 * warp, lane);
    const bool qwhole = flash_block_whole(seg, seq, r0);  // also: every warp has read Q and dO

    const int i0 = r0 + 16 * warp + gid, i1 = i0 + 8;
    const float ls0 = i0 < seq ? lse[(tok0 + i0) * heads + h] * FLASH_LOG2E : 0.0f;
    const float ls1 = i1 < seq ? lse[(tok0 + i1) * heads + h] * FLASH_LOG2E : 0.0f;
    const float de0 = i0 < seq ? delta[(tok0 + i0) * heads + h] : 0.0f;
    const float de1 = i1 < seq ? delta[(tok0 + i1) * heads + h] : 0.0f;
    const float sl2 = scale * FLASH_LOG2E;
    float acc[NDT][4];
    flash_zero<NDT>(acc);
#pragma unroll 1
    for (int kt = 0; kt < ntiles; ++kt) {
        const int buf = kt & 1, j0 = kt * BC;
        const bool whole = blk.prefetch(kt, Kb(buf ^ 1), Vb(buf ^ 1), seq, qwhole);
        flash_wait<1>();
        __syncthreads();
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int c0 = j0 + HALF * half;
            const unsigned int vis =
                whole ? 0xffffffffu : flash_visible<NT, false>(seg, seq, i0, i1, c0, tig);
            if (!__any_sync(FULL_MASK, vis != 0)) continue;
            float s[NT][4], dp[NT][4];
            flash_zero<NT>(s);
            flash_zero<NT>(dp);
            flash_mma_nt<HD, NT>(s, qa, Kb(buf), HALF * half, lane);
            flash_mma_nt<HD, NT>(dp, da, Vb(buf), HALF * half, lane);
#pragma unroll
            for (int t = 0; t < NT; ++t) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float p = (vis >> (4 * t + e)) & 1u
                                        ? exp2f(s[t][e] * sl2 - (e < 2 ? ls0 : ls1))
                                        : 0.0f;
                    s[t][e] = p * (dp[t][e] - (e < 2 ? de0 : de1));  // dS
                }
            }
#pragma unroll
            for (int kb = 0; kb < HALF / 16; ++kb) {
                unsigned int sa[4];
                flash_c_to_a<NT>(sa, s, kb);
                flash_mma_nn<HD>(acc, sa, Kb(buf), HALF * half + 16 * kb, lane);
            }
        }
        __syncthreads();
    }
    float* base = dq + (long long)h * HD + 2 * tig;
    if (i0 < seq) flash_store_row<NDT>(base + (tok0 + i0) * ldq, acc, 0, scale);
    if (i1 < seq) flash_store_row<NDT>(base + (tok0 + i1) * ldq, acc, 1, scale);
}

// q, k, v, d_out bf16; lse, delta f32 [batch·seq, heads]; dq f32 like q (every element written).
// Launch: grid (ceil(seq/64), heads, batch), block 128, dynamic shared memory 4·64·(hd + 8)·2
// bytes.
extern "C" __global__ void __launch_bounds__(FLASH_THREADS)
    flash_bwd_dq(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                 const bf16_t* __restrict__ v, const bf16_t* __restrict__ d_out,
                 const float* __restrict__ lse, const float* __restrict__ delta,
                 const int* __restrict__ segments, float* __restrict__ dq, int batch, int seq,
                 int heads, int kv_heads, int head_dim, float scale) {
    extern __shared__ __align__(16) bf16_t flash_sm[];
    if (head_dim == 128) {
        flash_dq_impl<128>(flash_sm, q, k, v, d_out, lse, delta, segments, dq, seq, heads,
                           kv_heads, scale);
    } else {
        flash_dq_impl<64>(flash_sm, q, k, v, d_out, lse, delta, segments, dq, seq, heads,
                          kv_heads, scale);
    }
}

// ---------------------------------------------------------------------------------------------
// dK, dV. Block: 64 keys from r0 = 64·blockIdx.x of KV head g, adding up query heads [h0, h1);
// K fragments in registers, V kept in shared memory (its A fragments re-read per use). The
// (query head, query tile) pairs are one sequence, prefetched one ahead: Q and dO tiles of 64
// queries in two buffers, with lse·log2e and D of their rows. Each tile in quarters of 16
// queries (registers): Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ; Pᵀ = 2^(c·log2e·Sᵀ − lse·log2e),
// dSᵀ = Pᵀ ∘ (dPᵀ − D); dV += Pᵀ·dO, dK += dSᵀ·Q.
// Registers: ka HD/2, dk + dv HD, s + dp 16. Shared: V, Q and dO two buffers each, lse and D.
// ---------------------------------------------------------------------------------------------
template <int HD>
__device__ __forceinline__ void flash_dkdv_impl(bf16_t* sm, const bf16_t* __restrict__ q,
                                                const bf16_t* __restrict__ k,
                                                const bf16_t* __restrict__ v,
                                                const bf16_t* __restrict__ d_out,
                                                const float* __restrict__ lse,
                                                const float* __restrict__ delta,
                                                const int* __restrict__ segments,
                                                float* __restrict__ dk, float* __restrict__ dv,
                                                int seq, int heads, int kv_heads, float scale,
                                                int h0, int h1) {
    constexpr int NKB = HD / 16, NDT = HD / 8, BR = FLASH_TILE, QT = 16, NT = QT / 8;
    constexpr int TE = BR * (HD + 8);
    bf16_t* Vs = sm;
    // Buffer u: Q at sm + (1 + 2u)·TE, dO after it.
    auto Qb = [&](int u) { return sm + (1 + 2 * u) * TE; };
    auto Db = [&](int u) { return sm + (2 + 2 * u) * TE; };
    float* stats = reinterpret_cast<float*>(sm + 5 * TE);  // [buf][lse·log2e | D][64]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
    const int g = blockIdx.y / (gridDim.y / kv_heads), b = blockIdx.z;
    const long long ldq = (long long)heads * HD, ldk = (long long)kv_heads * HD;
    const long long tok0 = (long long)b * seq;
    const int* seg = segments + tok0;
    const int r0 = blockIdx.x * 64;
    const long long koff = (tok0 + r0) * ldk + (long long)g * HD;
    // Query tiles from the one holding r0 (causal) to the end, for each head of the share.
    const int first = r0 / BR, per_head = (seq - 1) / BR + 1 - first;
    const int pairs = (h1 - h0) * per_head;
    // Starts loading pair `it` (head h0 + it / per_head, tile first + it % per_head) into
    // buffer `buf`; its statistics come back in registers, stored once the buffer is free.
    float st_lse = 0.0f, st_del = 0.0f;
    auto prefetch = [&](int it, int buf) {
        const int h = h0 + it / per_head, i0 = (first + it % per_head) * BR;
        const long long off = (tok0 + i0) * ldq + (long long)h * HD;
        flash_load_tile<HD>(Qb(buf), q + off, ldq, seq - i0);
        flash_load_tile<HD>(Db(buf), d_out + off, ldq, seq - i0);
        if (tid < BR) {
            const int i = i0 + tid;
            st_lse = i < seq ? lse[(tok0 + i) * heads + h] * FLASH_LOG2E : 0.0f;
            st_del = i < seq ? delta[(tok0 + i) * heads + h] : 0.0f;
        }
    };
    auto store_stats = [&](int buf) {
        if (tid < BR) {
            stats[buf * 2 * BR + tid] = st_lse;
            stats[buf * 2 * BR + BR + tid] = st_del;
        }
    };

    // K goes through Q buffer 0 and V into place, then pair 0 into buffer 1... buffer 0 after K.
    flash_load_tile<HD>(Qb(0), k + koff, ldk, seq - r0);
    flash_load_tile<HD>(Vs, v + koff, ldk, seq - r0);
    flash_commit();
    flash_wait<0>();
    __syncthreads();
    unsigned int ka[NKB][4];
    flash_afrags<HD>(ka, Qb(0), 16 * warp, lane);
    const bool kwhole = flash_block_whole(seg, seq, r0);  // also: every warp has read K
    prefetch(0, 0);
    flash_commit();
    store_stats(0);

    const int k0 = r0 + 16 * warp + gid, k1 = k0 + 8;
    const float sl2 = scale * FLASH_LOG2E;
    float dka[NDT][4], dva[NDT][4];
    flash_zero<NDT>(dka);
    flash_zero<NDT>(dva);
#pragma unroll 1
    for (int it = 0; it < pairs; ++it) {
        const int buf = it & 1, i0 = (first + it % per_head) * BR;
        if (it + 1 < pairs) prefetch(it + 1, buf ^ 1);
        flash_commit();
        const bool whole = !__syncthreads_or(
            !(kwhole && i0 >= r0 + 64 && i0 + BR <= seq && (tid >= BR || seg[i0 + tid] == seg[r0])));
        flash_wait<1>();
        __syncthreads();
        const float* ls = stats + buf * 2 * BR;
        const float* ds = ls + BR;
#pragma unroll
        for (int qq = 0; qq < BR / QT; ++qq) {
            const int c0 = QT * qq;
            const unsigned int vis =
                whole ? 0xffffffffu : flash_visible<NT, true>(seg, seq, k0, k1, i0 + c0, tig);
            if (!__any_sync(FULL_MASK, vis != 0)) continue;
            float s[NT][4], dp[NT][4];
            flash_zero<NT>(s);
            flash_zero<NT>(dp);
            flash_mma_nt<HD, NT>(s, ka, Qb(buf), c0, lane);
            flash_mma_nt_shared_a<HD, NT>(dp, Vs, 16 * warp, Db(buf), c0, lane);
#pragma unroll
            for (int t = 0; t < NT; ++t) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = c0 + 8 * t + 2 * tig + (e & 1);
                    const float p =
                        (vis >> (4 * t + e)) & 1u ? exp2f(s[t][e] * sl2 - ls[col]) : 0.0f;
                    s[t][e] = p;
                    dp[t][e] = p * (dp[t][e] - ds[col]);  // dSᵀ
                }
            }
            unsigned int pa[4], sa[4];
            flash_c_to_a<NT>(pa, s, 0);
            flash_c_to_a<NT>(sa, dp, 0);
            flash_mma_nn<HD>(dva, pa, Db(buf), c0, lane);
            flash_mma_nn<HD>(dka, sa, Qb(buf), c0, lane);
        }
        __syncthreads();  // buffer `buf` and its statistics are refilled next
        store_stats(buf ^ 1);
    }
    const long long off = (long long)g * HD + 2 * tig;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int key = half == 0 ? k0 : k1;
        if (key < seq) {
            const long long row = (tok0 + key) * ldk + off;
            flash_store_row<NDT>(dk + row, dka, half, scale);
            flash_store_row<NDT>(dv + row, dva, half, 1.0f);
        }
    }
}

// Inputs as flash_bwd_dq; dk, dv f32. Launch: grid (ceil(seq/64), kv_heads·parts, batch), block
// 128, dynamic shared memory 5·64·(hd + 8)·2 + 2·2·64·4 bytes; parts divides heads / kv_heads:
// block y = g·parts + part adds up the query heads g·group + part·(group/parts) + [0,
// group/parts) and writes every element of slab `part` of dk and dv (slabs of
// batch·seq·kv_heads·hd floats, one after another; the caller sums them).
extern "C" __global__ void __launch_bounds__(FLASH_THREADS)
    flash_bwd_dkdv(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                   const bf16_t* __restrict__ v, const bf16_t* __restrict__ d_out,
                   const float* __restrict__ lse, const float* __restrict__ delta,
                   const int* __restrict__ segments, float* __restrict__ dk,
                   float* __restrict__ dv, int batch, int seq, int heads, int kv_heads,
                   int head_dim, float scale) {
    extern __shared__ __align__(16) bf16_t flash_sm[];
    const int parts = gridDim.y / kv_heads, part = blockIdx.y % parts;
    const int per = heads / kv_heads / parts;
    const int h0 = (blockIdx.y / parts) * (heads / kv_heads) + part * per;
    const long long slab = (long long)part * batch * seq * kv_heads * head_dim;
    if (head_dim == 128) {
        flash_dkdv_impl<128>(flash_sm, q, k, v, d_out, lse, delta, segments, dk + slab, dv + slab,
                             seq, heads, kv_heads, scale, h0, h0 + per);
    } else {
        flash_dkdv_impl<64>(flash_sm, q, k, v, d_out, lse, delta, segments, dk + slab, dv + slab,
                            seq, heads, kv_heads, scale, h0, h0 + per);
    }
}
