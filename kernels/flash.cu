// flash.cu: the training attention kernels on tensor cores for head_dim 64 and 128, and 256 on
// Hopper's warpgroup products (compiled after prelude.cuh). Same math, layouts, masks and
// outputs as attention.cu's training kernels (its header states them), with q, k, v and dO read
// in bf16 (rounded from f32 by the backend):
//   forward:  S = c·Q·Kᵀ (invisible entries −∞), lse_i = log Σ_j exp S_ij, P = exp(S − lse), O = P·V
//   backward: dP = dO·Vᵀ, dS = P ∘ (dP − D), dQ = c·dS·K, dV = Pᵀ·dO, dK = c·dSᵀ·Q
// Every product is mma.sync.m16n8k16, or on sm_90a a warpgroup product (see "Hopper" below),
// with bf16 operands and f32 accumulation; the softmax statistics stay f32; P and dS are rounded
// to bf16 only as operands of the second product.
//
// Scheme (FlashAttention-2): a block of 4 warps owns 64 rows (queries in fwd and dq, keys in
// dkdv), 16 per warp; the other side streams through shared memory in tiles of 64 rows, copied
// by cp.async into two buffers (tile t+1 arrives while tile t is computed; three in the
// pipelined warpgroup forward). No seq×seq buffer.
// Tiles above the causal diagonal are never loaded; tiles with no visible (query, key) pair
// (other segments of a packed row) are loaded but not computed.
//
// Shared tiles (mma.sync versions) are row-major bf16 [64][HD + 8]: a row pitch of HD + 8 elements (≡ 16 bytes mod
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

// 2^x on the special function unit alone (ex2.approx.ftz: ~2 ulp, results below 2^−126 flushed
// to 0; exp2f wraps the same instruction in a rescaling for subnormal results). −∞ gives 0.
__device__ __forceinline__ float flash_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// The shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ unsigned int flash_smem(const void* p) {
    unsigned int a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared, asynchronous; zero-filled when !valid: the ignore-src form, whose
// source "should be ignored completely" (PTX ISA), so `src` may then point past the tensor.
__device__ __forceinline__ void flash_cp16(unsigned int dst, const void* src, bool valid) {
    asm volatile(
        "{ .reg .pred ignore; setp.eq.u32 ignore, %2, 0;\n"
        "  cp.async.cg.shared.global [%0], [%1], 16, ignore; }\n" ::"r"(dst),
        "l"(src), "r"((unsigned int)valid));
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

// The accumulator tiles 2kb, 2kb+1 of x as a bf16 A fragment (16 rows × 16 k).
template <int NT>
__device__ __forceinline__ void flash_c_to_a(unsigned int (&a)[4], const float (&x)[NT][4], int kb) {
    a[0] = bf16x2_rn(x[2 * kb][0], x[2 * kb][1]);
    a[1] = bf16x2_rn(x[2 * kb][2], x[2 * kb][3]);
    a[2] = bf16x2_rn(x[2 * kb + 1][0], x[2 * kb + 1][1]);
    a[3] = bf16x2_rn(x[2 * kb + 1][2], x[2 * kb + 1][3]);
}

template <int NT>
__device__ __forceinline__ void flash_zero(float (&x)[NT][4]) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) x[t][e] = 0.0f;
    }
}

// Where a kernel writes a head's rows of an output (the forward's O; the backward's dQ, dK, dV):
// f32, or rounded to bf16 when `bf16` (a product input, with spare columns past heads·hd where
// the rows are further apart); rows `ld` values apart (heads·hd: dense). With `rotate_back`
// ((cos θ, sin θ) of each row's angles, [rows, hd/2]: rope.cu's rope_angles), each row is first
// turned back by −θ, as rope.cu's kernels turn it with `inverse`: RoPE's backward, for the
// gradients of the rotated q and k.
struct FlashOut {
    void* p;
    int bf16;
    long long ld;
    const float2* rotate_back;

    // The same output `elements` values further on: a slab of its own, which is dense (rows of
    // heads·hd values: the host asks for slabs in f32 only, summing them after).
    __device__ FlashOut at(long long elements) const {
        char* base = static_cast<char*>(p) + elements * (bf16 ? 2 : 4);
        return FlashOut{base, bf16, ld, rotate_back};
    }
};

// Row `half` (0: gid, 1: gid + 8) of an accumulator set over a head's dims (this thread's
// columns 8n + 2tig..+1), times `mul`, to row `row` of `out` from column `col` (the head's first
// column + 2tig). Turned back first where `out` says: dims d and d + hd/2 pair up, which are
// this thread's n-tiles n and n + NDT/2.
template <int NDT>
__device__ __forceinline__ void flash_out_row(const FlashOut& out, long long row, long long col,
                                              const float (&acc)[NDT][4], int half, float mul,
                                              int tig) {
    float x[NDT][2];
#pragma unroll
    for (int n = 0; n < NDT; ++n) {
        x[n][0] = acc[n][2 * half] * mul;
        x[n][1] = acc[n][2 * half + 1] * mul;
    }
    if (out.rotate_back != nullptr) {
        constexpr int H = NDT / 2;
        // (cos, sin) of pairs 8n + 2tig and 8n + 2tig + 1 in 16 bytes (a row: hd/2 = 4·NDT pairs).
        const float4* cs =
            reinterpret_cast<const float4*>(out.rotate_back + row * (4 * NDT)) + tig;
#pragma unroll
        for (int n = 0; n < H; ++n) {
            const float4 a = cs[4 * n];
            rope_rotate(x[n][0], x[n + H][0], a.x, -a.y);
            rope_rotate(x[n][1], x[n + H][1], a.z, -a.w);
        }
    }
    const long long at = row * out.ld + col;
    if (out.bf16) {
        bf16_t* p = static_cast<bf16_t*>(out.p) + at;
#pragma unroll
        for (int n = 0; n < NDT; ++n) {
            *reinterpret_cast<unsigned int*>(p + 8 * n) = bf16x2_rn(x[n][0], x[n][1]);
        }
    } else {
        float* p = static_cast<float*>(out.p) + at;
#pragma unroll
        for (int n = 0; n < NDT; ++n) {
            *reinterpret_cast<float2*>(p + 8 * n) = make_float2(x[n][0], x[n][1]);
        }
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
// row 0 of the tile) into `dst`; rows >= nrows are zero-filled. Layout: rows of pitch HD + 8, or
// with SWIZZLED the warpgroup products' (see "Hopper" below).
// Thread t copies 16-byte chunk x/8 = t % CPR of rows r = t / CPR + R·it: its column, and with R
// a multiple of 8 its swizzle, stay the same from one row group to the next, so the addresses
// advance by constants (R rows of the source, R·64 or R·P elements of the tile). A missing row
// is zero-filled with its source ignored (flash_cp16), so no address is selected and no branch
// splits whole tiles from the last one.
template <int HD, bool SWIZZLED = false>
__device__ __forceinline__ void flash_load_tile(bf16_t* dst, const bf16_t* __restrict__ src,
                                                long long ld, int nrows) {
    constexpr int CPR = HD / 8, P = HD + 8, R = FLASH_THREADS / CPR, N = FLASH_TILE / R;
    const int r0 = threadIdx.x / CPR, x = 8 * (threadIdx.x % CPR);
    const unsigned int base = flash_smem(dst);
    const bf16_t* from = src + r0 * ld + x;
    const long long step = R * ld;
#pragma unroll
    for (int it = 0; it < N; ++it) {
        const int r = r0 + R * it;
        const int at = SWIZZLED
                           ? FLASH_TILE * 64 * (x / 64) + 64 * r + 8 * (((x / 8) & 7) ^ (r & 7))
                           : r * P + x;
        flash_cp16(base + 2 * at, from, r < nrows);
        from += step;
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

// Whether `part` holds in every thread of the block. A __syncthreads_or, i.e. a block barrier
// like __syncthreads (copies each thread has awaited are visible to all after it): every thread
// must call it.
__device__ __forceinline__ bool flash_all_threads(bool part) { return !__syncthreads_or(!part); }

// True (in every thread) when rows [r0, r0 + 64) all exist and share one segment. A block
// barrier (flash_all_threads): every thread must call it.
__device__ __forceinline__ bool flash_block_whole(const int* seg, int seq, int r0) {
    const int t = threadIdx.x;
    return flash_all_threads(r0 + FLASH_TILE <= seq && (t >= FLASH_TILE || seg[r0 + t] == seg[r0]));
}

// Where a block of `rows` queries (fwd, dq: 64; the warp-specialized forward: 128) works: query
// head h = blockIdx.y of sequence b = blockIdx.z, queries from r0 (reverse blockIdx.x order: the
// longest causal rows start first), the rows of its KV head in k and v, and the key tiles up to
// the diagonal.
template <int HD>
struct FlashQueryBlock {
    int h, r0, ntiles;
    long long ldq, ldk, tok0;
    const int* seg;
    const bf16_t* kh;
    const bf16_t* vh;
    int seg0;  // the segment of query r0
    __device__ FlashQueryBlock(const bf16_t* k, const bf16_t* v, const int* segments, int seq,
                               int heads, int kv_heads, int rows = FLASH_TILE)
        : h(blockIdx.y),
          r0((gridDim.x - 1 - blockIdx.x) * rows),
          ntiles(min(r0 + rows - 1, seq - 1) / FLASH_TILE + 1),
          ldq((long long)heads * HD),
          ldk((long long)kv_heads * HD),
          tok0((long long)blockIdx.z * seq),
          seg(segments + tok0),
          kh(k + tok0 * ldk + (long long)(h / (heads / kv_heads)) * HD),
          vh(v + tok0 * ldk + (long long)(h / (heads / kv_heads)) * HD),
          seg0(seg[r0]) {}

    // Starts copying key tile kt + 1 (if there is one) into `kbuf` and `vbuf`, and commits a
    // copy group either way.
    template <bool SWIZZLED = false>
    __device__ void copy_next(int kt, bf16_t* kbuf, bf16_t* vbuf, int seq) const {
        const int next = (kt + 1) * FLASH_TILE;
        if (kt + 1 < ntiles) {
            flash_load_tile<HD, SWIZZLED>(kbuf, kh + next * ldk, ldk, seq - next);
            flash_load_tile<HD, SWIZZLED>(vbuf, vh + next * ldk, ldk, seq - next);
        }
        flash_commit();
    }

    // This thread's part of whether key tile kt is wholly below the diagonal within the
    // queries' one segment (`qwhole`): tile_whole(kt, qwhole, tile_segment(kt, qwhole)).
    // flash_all_threads combines the parts (then the tile needs no mask). The segment id is
    // one read, best issued a while before the part is needed (its latency passes under the
    // work between).
    __device__ bool whole_part(int kt, bool qwhole) const {
        return tile_whole(kt, qwhole, tile_segment(kt, qwhole));
    }
    __device__ bool below_diagonal(int kt, bool qwhole) const {
        return qwhole && kt * FLASH_TILE + FLASH_TILE <= r0;
    }
    // The segment of this thread's key of tile kt (thread t < 64: key 64·kt + t), read only
    // where it matters (seg0 elsewhere).
    __device__ int tile_segment(int kt, bool qwhole) const {
        const int t = threadIdx.x;
        return below_diagonal(kt, qwhole) && t < FLASH_TILE ? seg[kt * FLASH_TILE + t] : seg0;
    }
    __device__ bool tile_whole(int kt, bool qwhole, int id) const {
        return below_diagonal(kt, qwhole) && id == seg0;
    }
};

// ---------------------------------------------------------------------------------------------
// Hopper (sm_90a): warpgroup products. The block's 4 warps are one warpgroup, and
// wgmma.mma_async.m64nNk16 multiplies 64 rows at once, asynchronously, with B (and A unless A
// comes from registers) read by the tensor cores straight from shared memory; of the tiles only Q
// goes through ldmatrix, once, into the score products' register A operand (wg_afrags). Its f32
// accumulator holds, in warp w's lanes, rows 16w + gid and
// 16w + gid + 8 in mma.m16n8k16's C layout repeated over the n-tiles, and a register A operand is
// mma.m16n8k16's A fragment of the warp's 16 rows: the layouts of the kernels above, so their
// masks, softmax steps and stores serve both.
//
// wgmma operands in shared memory use the 128-byte swizzle (PTX ISA, "Shared Memory Matrix
// Layout"): a 64×HD tile is HD/64 panels of 64 columns, each 64 rows of 128 bytes; the 16-byte
// chunk j of row r is stored at chunk j ^ (r % 8) of its row (the XOR the tensor cores apply to
// address bits 4-6 from bits 7-9; tiles are 1024-byte aligned), so the 8 rows of any 8×8 block
// fall in distinct bank groups. Element (r, c) lies at byte (flash_load_tile<HD, true>)
//   8192·(c / 64) + 128·r + 16·(((c % 64) / 8) ^ (r % 8)) + 2·(c % 8).
// A descriptor (PTX ISA, "Matrix Descriptor Format") holds the start address >> 4 (bits 0-13),
// the leading and stride byte offsets >> 4 (bits 16-29, 32-45) and the layout (bits 62-63: 1,
// 128-byte swizzle). K-major operand (rows × k as stored: Q, K, V, dO with the head dim as k):
// stride offset 1024 (8 rows), the leading one unused; a k step of 16 moves the start by 32
// bytes within a panel. N-major B operand (the tile's row index is k: V in P·V, K in dS·K, dO in
// Pᵀ·dO, Q in dSᵀ·Q; transposed by the instruction's trans-b): the leading offset is the panel
// step along n (8192), the stride offset the 8-row step along k (1024).
// Shared memory written by the threads (cp.async) is made visible to the tensor cores' async
// proxy by fence.proxy.async before the barrier that precedes the products.
// ---------------------------------------------------------------------------------------------
// (A host compiler's pass over this file, as nvcc makes for bench/flash, takes this section too:
// it must see the declarations of every entry the device pass compiles.)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || !defined(__CUDA_ARCH__)
#define FLASH_WGMMA 1
#define FLASH_WG true

__device__ __forceinline__ unsigned long long wg_desc(unsigned int addr, unsigned int lbo,
                                                      unsigned int sbo) {
    return (unsigned long long)((addr & 0x3ffff) >> 4) |
           ((unsigned long long)(lbo >> 4) << 16) | ((unsigned long long)(sbo >> 4) << 32) |
           (1ull << 62);
}
// Descriptor d moved `bytes` further (a multiple of 16, known at compile time): bytes >> 4 added
// to the start address field in the low word alone (shared addresses are below 2^18 bytes, so
// nothing carries out of the field). One add per product instead of rebuilding the descriptor.
__device__ __forceinline__ unsigned long long wg_desc_plus(unsigned long long d,
                                                           unsigned int bytes) {
    return (d & 0xffffffff00000000ull) | (unsigned int)((unsigned int)d + (bytes >> 4));
}
// K-major operand: rows row0.. (a multiple of 8) of a swizzled tile, k = 16kb..16kb+15.
template <int HD>
__device__ __forceinline__ unsigned long long wg_desc_k(const bf16_t* tile, int row0, int kb) {
    return wg_desc_plus(wg_desc(flash_smem(tile) + 128 * row0, 16, 1024),
                        8192 * (kb / 4) + 32 * (kb % 4));
}
// N-major B operand: k = rows k0..k0+15 (k0 a multiple of 8, known at compile time) of a
// swizzled tile, n = its HD columns.
template <int HD>
__device__ __forceinline__ unsigned long long wg_desc_n(const bf16_t* tile, int k0) {
    return wg_desc_plus(wg_desc(flash_smem(tile), 8192, 1024), 128 * k0);
}
__device__ __forceinline__ void wg_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most N committed product groups are in flight.
template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Ties the registers of x to this point of the program: accumulators read after wg_wait or
// written before a product is issued are not moved across it by the compiler.
template <int N>
__device__ __forceinline__ void wg_hold(float (&x)[N][4]) {
#pragma unroll
    for (int t = 0; t < N; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(x[t][e])::"memory");
    }
}
// The same for A operands in registers: they stay allocated, unchanged, up to this point.
template <int N>
__device__ __forceinline__ void wg_hold_regs(unsigned int (&x)[N][4]) {
#pragma unroll
    for (int t = 0; t < N; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(x[t][e])::"memory");
    }
}
__device__ __forceinline__ void flash_fence_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// The operand lists of the wrappers below: accumulator registers d[o .. o + 31], read and
// written, and the instruction text naming the first 32 or 64 operands.
#define WG_ACC32(d, o)                                                                        \
    "+f"(d[o + 0]), "+f"(d[o + 1]), "+f"(d[o + 2]), "+f"(d[o + 3]), "+f"(d[o + 4]),            \
        "+f"(d[o + 5]), "+f"(d[o + 6]), "+f"(d[o + 7]), "+f"(d[o + 8]), "+f"(d[o + 9]),        \
        "+f"(d[o + 10]), "+f"(d[o + 11]), "+f"(d[o + 12]), "+f"(d[o + 13]), "+f"(d[o + 14]),   \
        "+f"(d[o + 15]), "+f"(d[o + 16]), "+f"(d[o + 17]), "+f"(d[o + 18]), "+f"(d[o + 19]),   \
        "+f"(d[o + 20]), "+f"(d[o + 21]), "+f"(d[o + 22]), "+f"(d[o + 23]), "+f"(d[o + 24]),   \
        "+f"(d[o + 25]), "+f"(d[o + 26]), "+f"(d[o + 27]), "+f"(d[o + 28]), "+f"(d[o + 29]),   \
        "+f"(d[o + 30]), "+f"(d[o + 31])
#define WG_D32                                                                                \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "  \
    "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WG_D64                                                                                \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "  \
    "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "    \
    "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "     \
    "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// D (64×64, f32) = D·[accumulate] + A·B, A (64×16) and B (64×16 as stored, K-major) in shared
// memory given by descriptors.
__device__ __forceinline__ void wg_ss_n64(float (&d)[32], unsigned long long a,
                                          unsigned long long b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WG_D32 ", %32, %33, p, 1, 1, 0, 0;"
        "\n}\n"
        : WG_ACC32(d, 0)
        : "l"(a), "l"(b), "r"(accumulate));
}

// D (64×64, f32) = D·[accumulate] + A·B, A (64×16 bf16) in registers (this warp's 16 rows,
// mma.m16n8k16's A fragment), B in shared memory: N-major (16×64, row k holds B[k][0..64)) when
// TRANS_B, else K-major (64×16 as stored, row n holds B[0..16)[n]).
template <int TRANS_B = 1>
__device__ __forceinline__ void wg_rs_n64(float (&d)[32], const unsigned int (&a)[4],
                                          unsigned long long b, int accumulate = 1) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WG_D32
        ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : WG_ACC32(d, 0)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(TRANS_B));
}

// D (64×128, f32) += A·B, A (64×16 bf16) in registers (this warp's 16 rows, mma.m16n8k16's
// A fragment), B (16×128) in shared memory stored N-major (row k holds B[k][0..128)).
__device__ __forceinline__ void wg_rs_n128(float (&d)[64], const unsigned int (&a)[4],
                                           unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WG_D64
        ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : WG_ACC32(d, 0), WG_ACC32(d, 32)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// The B operand of the head-dim products (P·V, dS·K, ...): HD columns. 256 columns are two
// products of 128: the second starts two 64-column panels (2 × 8192 bytes) further, i.e. 1024
// in the descriptor's address field (bytes >> 4), and writes the accumulator's n-tiles 16..31.
template <int HD>
__device__ __forceinline__ void wg_rs_hd(float (&d)[HD / 8][4], const unsigned int (&a)[4],
                                         unsigned long long b) {
    if constexpr (HD == 256) {
        float(&flat)[128] = reinterpret_cast<float(&)[128]>(d);
        wg_rs_n128(reinterpret_cast<float(&)[64]>(flat[0]), a, b);
        wg_rs_n128(reinterpret_cast<float(&)[64]>(flat[64]), a, b + (2 * 8192 >> 4));
    } else if constexpr (HD == 128) {
        wg_rs_n128(reinterpret_cast<float(&)[64]>(d), a, b);
    } else {
        wg_rs_n64(reinterpret_cast<float(&)[32]>(d), a, b);
    }
}

// acc (64 × 64) = A·Bᵀ over the head dim, A and B the 64 rows of swizzled tiles (K-major: S = Q·Kᵀ,
// dP = dO·Vᵀ, Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ). Queued, not committed.
template <int HD, int NT>
__device__ __forceinline__ void wg_scores(float (&acc)[NT][4], const bf16_t* a, const bf16_t* b) {
#pragma unroll
    for (int kb = 0; kb < HD / 16; ++kb) {
        wg_ss_n64(reinterpret_cast<float(&)[4 * NT]>(acc), wg_desc_k<HD>(a, 0, kb),
                  wg_desc_k<HD>(b, 0, kb), kb);
    }
}

// A fragments (registers) of this warp's 16 rows of a swizzled 64×HD tile, one per 16 dims: the
// register operand of wg_scores_rs. ldmatrix lanes 0-15 give rows 16·warp + (lane & 15) at
// k = 16kb, lanes 16-31 the same rows at k = 16kb + 8 (a0..a3 as mma.m16n8k16's A fragment).
template <int HD>
__device__ __forceinline__ void wg_afrags(unsigned int (&a)[HD / 16][4], const bf16_t* tile,
                                          int warp, int lane) {
    const int r = 16 * warp + (lane & 15);
    const unsigned int row = flash_smem(tile) + 128 * r;
#pragma unroll
    for (int kb = 0; kb < HD / 16; ++kb) {
        const int c = 16 * kb + 8 * (lane >> 4);
        flash_ldsm(a[kb], row + 8192 * (c / 64) + 16 * (((c % 64) / 8) ^ (r % 8)));
    }
}

// wg_scores with A in registers (wg_afrags of the A tile): B alone is read from shared memory,
// half the shared-memory traffic of the 64 × 64 products. Queued, not committed.
template <int HD, int NT>
__device__ __forceinline__ void wg_scores_rs(float (&acc)[NT][4],
                                             const unsigned int (&a)[HD / 16][4],
                                             const bf16_t* b) {
#pragma unroll
    for (int kb = 0; kb < HD / 16; ++kb) {
        wg_rs_n64<0>(reinterpret_cast<float(&)[4 * NT]>(acc), a[kb], wg_desc_k<HD>(b, 0, kb), kb);
    }
}

// acc (64 × HD) += A·B over 64 k: A = a[kb] for k = 16kb.. (registers), B the 64 rows of a swizzled
// tile (N-major: V in P·V, K in dS·K, dO in Pᵀ·dO, Q in dSᵀ·Q). Queued, not committed.
template <int HD>
__device__ __forceinline__ void wg_accumulate(float (&acc)[HD / 8][4],
                                              const unsigned int (&a)[FLASH_TILE / 16][4],
                                              const bf16_t* tile) {
#pragma unroll
    for (int kb = 0; kb < FLASH_TILE / 16; ++kb) {
        wg_rs_hd<HD>(acc, a[kb], wg_desc_n<HD>(tile, 16 * kb));
    }
}
#else
#define FLASH_WG false
#endif

// ---------------------------------------------------------------------------------------------
// Forward. Block: 64 queries from r0 (reverse blockIdx.x order: the longest causal rows first).
// Per key tile of 64, with the online softmax in the log2 domain (x = c·log2(e)·q·k):
//   m' = max(m, max_j x_j);  α = 2^(m − m');  p_j = 2^(x_j − m');  l = α·l + Σ_j p_j;
//   o = α·o + Σ_j p_j·v_j;  m = m'.   Finally out = o / l, lse = (m + log2 l)·ln 2.
// The max is taken over the raw scores and then scaled (c·log2(e) > 0), and each p_j is one
// fused multiply-add and an exp2: p_j = 2^(fma(q·k_j, c·log2(e), −m')).
// ---------------------------------------------------------------------------------------------

// Rows [W·i, W·i + W) of x: the n-tiles of an accumulator, or the k-slices of a bf16 A operand,
// that belong to tile i of several 64-key tiles taken at once.
template <int W, int N, typename T>
__device__ __forceinline__ T (&flash_part(T (&x)[N][4], int i))[W][4] {
    return *reinterpret_cast<T(*)[W][4]>(&x[W * i]);
}

// Entries of x whose bit 4t + e of vis is clear set to `value`; nothing to do (and no
// instruction spent) where every entry is visible, unless BRANCH_FREE: then the selects run
// whatever vis says. (A branch there, between a warpgroup product's issue and its wait, makes
// ptxas place the wait at the branch's end: what follows no longer overlaps the product.)
template <int NT, bool BRANCH_FREE = false>
__device__ __forceinline__ void flash_mask(float (&x)[NT][4], unsigned int vis, float value) {
    if (!BRANCH_FREE && vis == 0xffffffffu) return;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) x[t][e] = (vis >> (4 * t + e)) & 1u ? x[t][e] : value;
    }
}

// This thread's softmax state of its two rows (gid, gid + 8 of its warp's 16).
struct FlashSoftmax {
    float m[2] = {flash_neg_inf(), flash_neg_inf()};
    float l[2] = {0.0f, 0.0f};

    // One key tile: masks s (raw scores; bit 4t + e of vis: entry s[t][e] visible), replaces it
    // by p, and rescales o by α.
    template <int NT, int NDT>
    __device__ __forceinline__ void step(float (&s)[NT][4], unsigned int vis, float sl2,
                                         float (&o)[NDT][4]) {
        float al[2];
        const unsigned int tile_vis[1] = {vis};
        probabilities<NT>(s, tile_vis, sl2, al);
        rescale<NDT>(o, al);
    }

    // step's first half: s masked and replaced by p, m and l updated; al: the rows' α, by which
    // o is to be scaled (rescale) before p·v is added to it. s holds NT / 8 tiles of 64 keys,
    // vis[i] the visibility bits of tile i (n-tiles 8i..). BRANCH_FREE as flash_mask's (the
    // warp-specialized forward, where P·V runs meanwhile).
    template <int NT, bool BRANCH_FREE = false>
    __device__ __forceinline__ void probabilities(float (&s)[NT][4],
                                                  const unsigned int (&vis)[NT / 8], float sl2,
                                                  float (&al)[2]) {
#pragma unroll
        for (int i = 0; i < NT / 8; ++i) {
            flash_mask<8, BRANCH_FREE>(flash_part<8>(s, i), vis[i], flash_neg_inf());
        }
        float mx[2] = {flash_neg_inf(), flash_neg_inf()};
#pragma unroll
        for (int t = 0; t < NT; ++t) {
#pragma unroll
            for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[t][e]);
        }
        float ms[2], ps[2] = {0.0f, 0.0f};
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float mn = fmaxf(m[r], flash_max4(mx[r]) * sl2);
            // A row with nothing visible yet keeps m = −∞ (subtract 0 instead: 2^−∞ = 0).
            ms[r] = mn == flash_neg_inf() ? 0.0f : mn;
            al[r] = flash_exp2(m[r] - ms[r]);
            m[r] = mn;
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[t][e] = flash_exp2(fmaf(s[t][e], sl2, -ms[e >> 1]));
                ps[e >> 1] += s[t][e];
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) l[r] = l[r] * al[r] + ps[r];
    }

    // o's rows times their α (the warp's lanes together).
    template <int NDT>
    __device__ __forceinline__ static void rescale(float (&o)[NDT][4], const float (&al)[2]) {
        // Once the row maxima settle α is 1 (exactly) in most tiles: o is left as it is then.
        if (!__any_sync(FULL_MASK, al[0] != 1.0f || al[1] != 1.0f)) return;
#pragma unroll
        for (int n = 0; n < NDT; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) o[n][e] *= al[e >> 1];
        }
    }

    // out rows i0 = gid row, i1 = i0 + 8 (if < seq) = o / l (head h's columns from 2·tig),
    // and their lse.
    template <int NDT>
    __device__ __forceinline__ void finish(const float (&o)[NDT][4], FlashOut out, float* lse,
                                           long long tok0, int heads, int h, int i0, int seq,
                                           int tig) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float sum = flash_sum4(l[r]);
            const int i = i0 + 8 * r;
            if (i < seq) {
                const long long col = (long long)h * NDT * 8 + 2 * tig;
                flash_out_row<NDT>(out, tok0 + i, col, o, r, 1.0f / sum, tig);
                if (tig == 0) lse[(tok0 + i) * heads + h] = (m[r] + log2f(sum)) * FLASH_LN2;
            }
        }
    }
};

// mma.sync. Registers: qa HD/2, o HD/2, s 32. Shared: K and V, two buffers each (Q passes
// through buffer 1).
template <int HD>
__device__ __forceinline__ void flash_fwd_impl(bf16_t* sm, const bf16_t* __restrict__ q,
                                               const bf16_t* __restrict__ k,
                                               const bf16_t* __restrict__ v,
                                               const int* __restrict__ segments, FlashOut out,
                                               float* __restrict__ lse, int seq, int heads,
                                               int kv_heads, float scale) {
    constexpr int NKB = HD / 16, NDT = HD / 8, BC = FLASH_TILE, NT = BC / 8, TE = BC * (HD + 8);
    // Buffer u: K at sm + 2u·TE, V after it.
    auto Kb = [&](int u) { return sm + 2 * u * TE; };
    auto Vb = [&](int u) { return sm + (2 * u + 1) * TE; };

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
    const FlashQueryBlock<HD> blk(k, v, segments, seq, heads, kv_heads);
    const int h = blk.h, r0 = blk.r0, ntiles = blk.ntiles;
    const long long ldq = blk.ldq, ldk = blk.ldk, tok0 = blk.tok0;
    const int* seg = blk.seg;

    // Q goes through buffer 1's K area; tile 0 into buffer 0.
    flash_load_tile<HD>(Kb(1), q + tok0 * ldq + (long long)h * HD + r0 * ldq, ldq, seq - r0);
    flash_commit();
    flash_load_tile<HD>(Kb(0), blk.kh, ldk, seq);
    flash_load_tile<HD>(Vb(0), blk.vh, ldk, seq);
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
    FlashSoftmax sm_state;
#pragma unroll 1
    for (int kt = 0; kt < ntiles; ++kt) {
        const int buf = kt & 1, j0 = kt * BC;
        const bool part = blk.whole_part(kt, qwhole);
        blk.copy_next(kt, Kb(buf ^ 1), Vb(buf ^ 1), seq);
        flash_wait<1>();  // tile kt has arrived; flash_all_threads' barrier makes it visible
        const bool whole = flash_all_threads(part);
        const unsigned int vis = whole ? 0xffffffffu : flash_visible<NT, false>(seg, seq, i0, i1, j0, tig);
        const bool any = whole || __syncthreads_or(vis != 0);
        if (any) {
            float s[NT][4];
            flash_zero<NT>(s);
            flash_mma_nt<HD, NT>(s, qa, Kb(buf), 0, lane);
            sm_state.step<NT, NDT>(s, vis, sl2, o);
#pragma unroll
            for (int kb = 0; kb < BC / 16; ++kb) {
                unsigned int pa[4];
                flash_c_to_a<NT>(pa, s, kb);
                flash_mma_nn<HD>(o, pa, Vb(buf), 16 * kb, lane);
            }
        }
        __syncthreads();  // buffer `buf` is refilled by the next iteration's copy_next
    }
    sm_state.finish<NDT>(o, out, lse, tok0, heads, h, i0, seq, tig);
}

// q, k, v bf16 ([batch·seq, heads·hd], [batch·seq, kv_heads·hd] twice); out [batch·seq,
// heads·hd], f32 or, with out_bf16, bf16, rows ldo values apart (>= heads·hd, even); lse f32
// [batch·seq, heads]. hd: 64 or 128 (256: flash_fwd_ws_hd256 below). Launch: grid (ceil(seq/64),
// heads, batch), block 128, dynamic shared memory 4·64·(hd + 8)·2 bytes. On sm_90a the library
// launches flash_fwd_ws instead (below).
extern "C" __global__ void __launch_bounds__(FLASH_THREADS)
    flash_fwd(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
              const bf16_t* __restrict__ v, const int* __restrict__ segments,
              void* __restrict__ out_values, int out_bf16, long long ldo, float* __restrict__ lse,
              int batch, int seq, int heads, int kv_heads, int head_dim, float scale) {
    extern __shared__ __align__(1024) bf16_t flash_sm[];
    const FlashOut out{out_values, out_bf16, ldo, nullptr};
    if (head_dim == 128) {
        flash_fwd_impl<128>(flash_sm, q, k, v, segments, out, lse, seq, heads, kv_heads, scale);
    } else {
        flash_fwd_impl<64>(flash_sm, q, k, v, segments, out, lse, seq, heads, kv_heads, scale);
    }
}

#ifdef FLASH_WGMMA
// ---------------------------------------------------------------------------------------------
// Hopper forward, warp-specialized. A block of three warpgroups owns 128 queries. Warpgroup 0
// copies (cp.async) the block's Q (two tiles), then each key tile's K and V into a ring of
// FLASH_FWD_STAGES buffers (head_dim 256: rings of FLASH_FWD_STAGES_WIDE for K and for V), and
// computes nothing;
// warpgroups 1 and 2 each compute 64 of the queries and wait only for their tiles, through
// shared-memory barriers (mbarrier), never for a block barrier:
//  - full(b) completes when buffer b's copies have landed (128 cp.async arrivals), and Q's
//    barrier when Q's have;
//  - empty(b) completes when both computing warpgroups' products have read the buffer.
// Each computing warp decides alone whether a tile needs a mask (FlashWarpRows). The two
// computing warpgroups are not made to take turns (FlashAttention-3's ping-pong): on the H200
// that was no faster. Registers: the copying warpgroup hands most of its own to the computing
// ones (setmaxnreg). (dQ in the same layout, with dO's tiles beside Q's, was tried: −5 % at seq
// 8192 and head_dim 128 but +12 % at head_dim 64, nothing measurable on a step; not kept.)
// ---------------------------------------------------------------------------------------------
#define FLASH_WS_THREADS 384
#define FLASH_WS_ROWS 128
// dK/dV's ring (flash_bwd_dkdv_ws): four (query head, query tile) pairs' Q, dO and statistics.
#define FLASH_WS_STAGES 4
// The forward's ring: three steps of two key tiles (FLASH_WS_STEP), so that a step's copies have
// a whole step's products to land in (the buffers of step u − 1 are released once its P·V
// completes, in iteration u, and step u + 2 is copied into them).
#define FLASH_FWD_STAGES 6
// At head_dim 256: two K and two V buffers (FlashKeyRing), beside Q's two tiles all that fits.
#define FLASH_FWD_STAGES_WIDE 2
// The forward's key step: a computing warpgroup takes FLASH_WS_STEP tiles of 64 keys (128 keys)
// at once, so the costs paid once a step (barrier waits, the row maxima's shuffles, the rescale
// vote) are paid once for twice the products. A step's scores are one 64 × 128 accumulator, tile
// i's keys in n-tiles 8i.. (with its own visibility word); P·V adds them with k-slices 4i...
// (At head_dim 256 one tile a step: the output's 128 registers leave room for 64 keys' scores.)
// bench/flash builds variants with -DFLASH_WS_STEP=1.
#ifndef FLASH_WS_STEP
#define FLASH_WS_STEP 2
#endif
// Whether the forward's scores take Q from registers up to head_dim 128 (1: half the shared-memory
// reads of their products), or from shared memory (0: 32 registers freed, with which ptxas lets
// the softmax overlap P·V at head_dim 128 too; bench/flash builds that variant with
// -DFLASH_FWD_Q_IN_REGISTERS=0).
#ifndef FLASH_FWD_Q_IN_REGISTERS
#define FLASH_FWD_Q_IN_REGISTERS 1
#endif

__device__ __forceinline__ void flash_mbar_init(unsigned int bar, unsigned int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void flash_mbar_arrive(unsigned int bar) {
    asm volatile("{ .reg .b64 state; mbarrier.arrive.shared::cta.b64 state, [%0]; }\n" ::"r"(bar)
                 : "memory");
}
// One arrival on `bar` once every cp.async copy this thread has issued so far has landed (the
// arrival is counted in the barrier's initial count: noinc).
__device__ __forceinline__ void flash_mbar_arrive_copies(unsigned int bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of `bar` with this parity has completed (acquire: what the arriving
// threads wrote before arriving is visible after it).
__device__ __forceinline__ void flash_mbar_wait(unsigned int bar, unsigned int parity) {
    unsigned int done;
    do {
        asm volatile(
            "{ .reg .pred p;\n"
            "  mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "  selp.u32 %0, 1, 0, p; }\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}

// Registers handed between the warpgroups of a warp-specialized block (setmaxnreg): the copying
// warpgroup gives its own down to COPY a thread, the two computing ones take theirs up to
// COMPUTE. The block starts with 168 a thread (65,536 over 384 threads, in steps of 8), and the
// two must balance: 128·(168 − COPY) ≥ 256·(COMPUTE − 168).
template <int COPY, int COMPUTE>
struct FlashRegs {
    static_assert(128 * COPY + 256 * COMPUTE <= 384 * 168, "more registers than the block has");
    __device__ static void copying() {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(COPY));
    }
    __device__ static void computing() {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(COMPUTE));
    }
};

// The mbarriers of a ring of S buffers from shared address bar0: full(t) completes
// once buffer t % S holds item t (`full_count` arrivals: the copying warpgroup's), empty(t) once
// both computing warpgroups are done with it there (`empty_count` arrivals: one a warpgroup where
// only the tensor cores read the buffers, release(); one a thread where threads read them too,
// release_thread()); once(), for what is copied once, on its 128 copying threads' copies.
template <int S>
struct FlashRingBars {
    unsigned int bar0;
    __device__ unsigned int full(int t) const { return bar0 + 8 * (t % S); }
    __device__ unsigned int empty(int t) const { return bar0 + 8 * (S + t % S); }
    __device__ unsigned int once() const { return bar0 + 8 * 2 * S; }

    // Thread 0 sets the barriers up; a block barrier must follow before any is used.
    __device__ void init(unsigned int full_count, unsigned int empty_count) const {
        if (threadIdx.x != 0) return;
        for (int b = 0; b < S; ++b) {
            flash_mbar_init(full(b), full_count);
            flash_mbar_init(empty(b), empty_count);
        }
        flash_mbar_init(once(), FLASH_THREADS);
    }
    // The copying warpgroup, before refilling buffer t % S with item t.
    __device__ void await_empty(int t) const {
        if (t >= S) flash_mbar_wait(empty(t), (t / S - 1) & 1);
    }
    // A computing thread: waits for item t (or, with once, what is copied once), made visible
    // to the tensor cores' reads.
    __device__ void wait(int t) const {
        flash_mbar_wait(full(t), (t / S) & 1);
        flash_fence_async();  // the copies, seen through the barrier, before the products
    }
    __device__ void wait_once() const {
        flash_mbar_wait(once(), 0);
        flash_fence_async();
    }
    // A computing warpgroup, once its products of item t are complete (thread ctid of the
    // warpgroup; one arrival a warpgroup).
    __device__ void release(int t, int ctid) const {
        if (ctid == 0) flash_mbar_arrive(empty(t));
    }
    // A computing thread, once it is done with item t (each thread's reads before its own
    // arrival).
    __device__ void release_thread(int t) const { flash_mbar_arrive(empty(t)); }
};

// The warp-specialized forward's shared memory and its barriers: Q's two swizzled tiles
// (query(c): queries 64c.. of the block), the buffers of key tile t (key(t), value(t)), then the
// barriers (kbars.once(): Q's). Up to head_dim 128 a tile's K and V share one ring of
// FLASH_FWD_STAGES buffer pairs and its barriers (kbars), released together once the tile's P·V
// is done. At head_dim 256, where six tiles of 32 KiB fill shared memory, K and V have rings of
// two of their own (kbars, vbars), and a tile's K is released as soon as its scores are done, so
// that the copy into each buffer starts a step earlier than a shared release would let it.
// Launch: TILES·64·HD·2 + 128 bytes of dynamic shared memory.
template <int HD>
struct FlashKeyRing {
    static constexpr bool SPLIT = HD == 256;
    static constexpr int SK = SPLIT ? FLASH_FWD_STAGES_WIDE : FLASH_FWD_STAGES;
    static constexpr int SV = SPLIT ? FLASH_FWD_STAGES_WIDE : 0;
    static constexpr int TE = FLASH_TILE * HD, TILES = SPLIT ? 2 + SK + SV : 2 + 2 * SK;
    bf16_t* sm;
    FlashRingBars<SK> kbars;
    FlashRingBars<SPLIT ? SV : 1> vbars;
    __device__ explicit FlashKeyRing(bf16_t* smem)
        : sm(smem), kbars{flash_smem(smem + TILES * TE)},
          vbars{kbars.bar0 + 8 * (2 * SK + 1)} {}
    __device__ bf16_t* query(int c) const { return sm + c * TE; }
    __device__ bf16_t* key(int t) const {
        return sm + (SPLIT ? 2 + t % SK : 2 + 2 * (t % SK)) * TE;
    }
    __device__ bf16_t* value(int t) const {
        return sm + (SPLIT ? 2 + SK + t % SV : 3 + 2 * (t % SK)) * TE;
    }

    // Thread 0 sets the barriers up (empty: one arrival a computing warpgroup); a block barrier
    // must follow.
    __device__ void init() const {
        kbars.init(FLASH_THREADS, 2);
        if constexpr (SPLIT) vbars.init(FLASH_THREADS, 2);
    }
    // A computing warpgroup: waits for K of tile t (and V where they share buffers), and for V.
    __device__ void wait_key(int t) const { kbars.wait(t); }
    __device__ void wait_value(int t) const {
        if constexpr (SPLIT) vbars.wait(t);
    }
    // A computing warpgroup (thread ctid) once its scores of tile t are complete, and once its
    // P·V of tile t is.
    __device__ void release_key(int t, int ctid) const {
        if constexpr (SPLIT) kbars.release(t, ctid);
    }
    __device__ void release_value(int t, int ctid) const {
        if constexpr (SPLIT) {
            vbars.release(t, ctid);
        } else {
            kbars.release(t, ctid);
        }
    }

    // Warpgroup 0's part (threads 0..127): the block's queries of q (from the block's head, row
    // stride blk.ldq) into Q's tiles, then key tiles 0 .. tiles − 1, each buffer once both
    // computing warpgroups have released the tile before it there.
    __device__ void produce(const FlashQueryBlock<HD>& blk, const bf16_t* q, int seq,
                            int tiles) const {
        for (int c = 0; c < 2; ++c) {
            const int rc = blk.r0 + FLASH_TILE * c;
            flash_load_tile<HD, true>(query(c), q + rc * blk.ldq, blk.ldq, seq - rc);
        }
        flash_mbar_arrive_copies(kbars.once());
#pragma unroll 1
        for (int t = 0; t < tiles; ++t) {
            const int j0 = t * FLASH_TILE;
            kbars.await_empty(t);
            flash_load_tile<HD, true>(key(t), blk.kh + j0 * blk.ldk, blk.ldk, seq - j0);
            if constexpr (SPLIT) {
                flash_mbar_arrive_copies(kbars.full(t));
                vbars.await_empty(t);
            }
            flash_load_tile<HD, true>(value(t), blk.vh + j0 * blk.ldk, blk.ldk, seq - j0);
            flash_mbar_arrive_copies(SPLIT ? vbars.full(t) : kbars.full(t));
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");
    }
};

// A computing warp's 16 queries from w0 in a warp-specialized block, and whether a key tile needs
// a mask, decided by the warp alone: not where all 16 queries exist in one segment (wseg), the
// tile lies below the diagonal of the warpgroup's first query rc, and its 64 keys all lie in
// that segment. Lane l holds the segment ids of keys l and l + 32 of a tile (key_ids), read a
// tile before they are needed (wseg where they do not matter).
struct FlashWarpRows {
    const int* seg;
    int seq, rc, w0, lane, wseg;
    bool wwhole;
    __device__ FlashWarpRows(const int* segs, int n, int first, int warp, int l)
        : seg(segs), seq(n), rc(first), w0(first + 16 * warp), lane(l),
          wseg(w0 < n ? segs[w0] : 0),
          wwhole(__all_sync(FULL_MASK, w0 + 15 < n && segs[min(w0 + (l & 15), n - 1)] == wseg)) {}
    __device__ int i0() const { return w0 + (lane >> 2); }
    __device__ bool below(int t) const { return wwhole && t * FLASH_TILE + FLASH_TILE <= rc; }
    __device__ void key_ids(int t, int (&ids)[2]) const {
        ids[0] = below(t) ? seg[t * FLASH_TILE + lane] : wseg;
        ids[1] = below(t) ? seg[t * FLASH_TILE + 32 + lane] : wseg;
    }
    // Visibility bits of tile t for this thread's rows (flash_visible's).
    template <int NT>
    __device__ unsigned int visible(int t, const int (&ids)[2]) const {
        return below(t) && __all_sync(FULL_MASK, ids[0] == wseg && ids[1] == wseg)
                   ? 0xffffffffu
                   : flash_visible<NT, false>(seg, seq, i0(), i0() + 8, t * FLASH_TILE, lane & 3);
    }
};

// The forward. A computing warpgroup's iteration u: queue [S = Q·K_{u+1}ᵀ, O += P_u·V_u] over
// key steps u + 1 and u; await S; step u + 1's probabilities (p, m, l, α) while P·V runs; await
// O; O *= α; P_{u+1} to bf16. The row maxima are taken over a step's keys (128 up to head_dim
// 128), so O is rescaled at other points than in the 64-key kernels: the outputs agree with
// theirs to rounding. Q is the scores' register operand up to head_dim 128; at 256 its 64
// registers do not fit beside O's 128, and the scores read it from shared memory.
template <int HD>
__device__ __forceinline__ void flash_fwd_ws_impl(bf16_t* sm, const bf16_t* __restrict__ q,
                                                  const bf16_t* __restrict__ k,
                                                  const bf16_t* __restrict__ v,
                                                  const int* __restrict__ segments, FlashOut out,
                                                  float* __restrict__ lse, int seq, int heads,
                                                  int kv_heads, float scale) {
    constexpr int NDT = HD / 8, ST = HD == 256 ? 1 : FLASH_WS_STEP, NT1 = FLASH_TILE / 8;
    constexpr int NT = ST * NT1, KB1 = FLASH_TILE / 16;  // KB1: k-slices of P·V a tile
    constexpr bool QREG = HD <= 128 && FLASH_FWD_Q_IN_REGISTERS;
    // Whether the mask goes without its branch, so that ptxas keeps the wait for P·V after the
    // probabilities (flash_mask). At head_dim 128 with two tiles a step and Q in registers it
    // waits for P·V before the exp2s either way (registers: O, P's and Q's A operands, 128 keys'
    // scores): there the branch stays, sparing whole tiles the selects.
    constexpr bool OVERLAP = !(HD == 128 && ST == 2 && QREG);
    const FlashKeyRing<HD> ring(sm);
    const int tid = threadIdx.x, wg = tid / FLASH_THREADS, lane = tid & 31;
    const FlashQueryBlock<HD> blk(k, v, segments, seq, heads, kv_heads, FLASH_WS_ROWS);
    const int h = blk.h, nsteps = (blk.ntiles + ST - 1) / ST;
    ring.init();
    __syncthreads();  // the last block barrier: the warpgroups go their own ways
    if (wg == 0) {
        FlashRegs<40, 232>::copying();
        // Whole steps: a tile past the last one is copied too (rows past seq zero-filled, the
        // rest keys after every query of the block), and masked.
        ring.produce(blk, q + blk.tok0 * blk.ldq + (long long)h * HD, seq, ST * nsteps);
        return;
    }
    FlashRegs<40, 232>::computing();
    const int c = wg - 1, ctid = tid - FLASH_THREADS * wg, warp = ctid >> 5, tig = lane & 3;
    const FlashWarpRows rows(blk.seg, seq, blk.r0 + FLASH_TILE * c, warp, lane);
    const float sl2 = scale * FLASH_LOG2E;

    // The segment ids of step u's tiles (read a step ahead), and its visibility words.
    int ids[ST][2];
    auto read_ids = [&](int u) {
#pragma unroll
        for (int i = 0; i < ST; ++i) rows.key_ids(ST * u + i, ids[i]);
    };
    auto visible = [&](int u, unsigned int (&vis)[ST]) {
#pragma unroll
        for (int i = 0; i < ST; ++i) vis[i] = rows.visible<NT1>(ST * u + i, ids[i]);
    };
    // Queues S = Q·Kᵀ over step u's keys, once its keys have arrived (and, with `values`, step
    // u − 1's values, which the P·V queued next reads).
    unsigned int qa[QREG ? HD / 16 : 1][4];
    auto scores = [&](float (&s)[NT][4], int u, bool values) {
#pragma unroll
        for (int i = 0; i < ST; ++i) {
            ring.wait_key(ST * u + i);
            if (values) ring.wait_value(ST * (u - 1) + i);
        }
        wg_fence();
#pragma unroll
        for (int i = 0; i < ST; ++i) {
            if constexpr (QREG) {
                wg_scores_rs<HD, NT1>(flash_part<NT1>(s, i), qa, ring.key(ST * u + i));
            } else {
                wg_scores<HD, NT1>(flash_part<NT1>(s, i), ring.query(c), ring.key(ST * u + i));
            }
        }
        wg_commit();
    };
    // Queues O += P·V over step u's keys.
    auto accumulate = [&](float (&o)[NDT][4], const unsigned int (&pa)[ST * KB1][4], int u) {
#pragma unroll
        for (int i = 0; i < ST; ++i) {
            wg_accumulate<HD>(o, flash_part<KB1>(pa, i), ring.value(ST * u + i));
        }
        wg_commit();
    };
    auto release_keys = [&](int u) {
#pragma unroll
        for (int i = 0; i < ST; ++i) ring.release_key(ST * u + i, ctid);
    };

    read_ids(0);
    if constexpr (QREG) {
        flash_mbar_wait(ring.kbars.once(), 0);  // Q's copies, read by ldmatrix alone
        wg_afrags<HD>(qa, ring.query(c), warp, lane);
    } else {
        ring.kbars.wait_once();  // Q's copies, made visible to the products that read them
    }
    float o[NDT][4], s[NT][4], al[2];
    unsigned int pa[ST * KB1][4], vis[ST];
    flash_zero<NDT>(o);
    FlashSoftmax sm_state;
    // Step 0's scores and probabilities (o is 0: nothing to rescale).
    visible(0, vis);
    read_ids(1);
    scores(s, 0, false);
    wg_wait<0>();
    wg_hold<NT>(s);
    release_keys(0);
    sm_state.probabilities<NT>(s, vis, sl2, al);
#pragma unroll
    for (int kb = 0; kb < ST * KB1; ++kb) flash_c_to_a<NT>(pa[kb], s, kb);
    // Steps 1 .. nsteps − 1 scored beside the step before's P·V (the last one's P·V alone, after
    // the loop: the same products in every iteration, which ptxas needs to keep them in flight).
#pragma unroll 1
    for (int u = 1; u < nsteps; ++u) {
        visible(u, vis);
        read_ids(u + 1);
        wg_hold<NDT>(o);
        scores(s, u, true);
        accumulate(o, pa, u - 1);
        wg_wait<1>();
        wg_hold<NT>(s);
        release_keys(u);
        sm_state.probabilities<NT, OVERLAP>(s, vis, sl2, al);  // while P·V runs
        wg_wait<0>();
        wg_hold<NDT>(o);
        wg_hold_regs<ST * KB1>(pa);
#pragma unroll
        for (int i = 0; i < ST; ++i) ring.release_value(ST * (u - 1) + i, ctid);
        FlashSoftmax::rescale<NDT>(o, al);
#pragma unroll
        for (int kb = 0; kb < ST * KB1; ++kb) flash_c_to_a<NT>(pa[kb], s, kb);
    }
#pragma unroll
    for (int i = 0; i < ST; ++i) ring.wait_value(ST * (nsteps - 1) + i);
    wg_hold<NDT>(o);
    wg_fence();
    accumulate(o, pa, nsteps - 1);
    wg_wait<0>();
    wg_hold<NDT>(o);
    sm_state.finish<NDT>(o, out, lse, blk.tok0, heads, h, rows.i0(), seq, tig);
}

// Arguments and outputs as flash_fwd; hd: 64 or 128. Launch: grid (ceil(seq/128), heads, batch),
// block 384, dynamic shared memory (2 + 2·FLASH_FWD_STAGES)·64·hd·2 + 128 bytes.
extern "C" __global__ void __launch_bounds__(FLASH_WS_THREADS, 1)
    flash_fwd_ws(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                 const bf16_t* __restrict__ v, const int* __restrict__ segments,
                 void* __restrict__ out_values, int out_bf16, long long ldo,
                 float* __restrict__ lse, int batch, int seq, int heads, int kv_heads,
                 int head_dim, float scale) {
    extern __shared__ __align__(1024) bf16_t flash_sm[];
    const FlashOut out{out_values, out_bf16, ldo, nullptr};
    if (head_dim == 128) {
        flash_fwd_ws_impl<128>(flash_sm, q, k, v, segments, out, lse, seq, heads, kv_heads, scale);
    } else {
        flash_fwd_ws_impl<64>(flash_sm, q, k, v, segments, out, lse, seq, heads, kv_heads, scale);
    }
}
#endif

// lse·log2e and D of this thread's rows i0, i0 + 8 (0 past the end).
__device__ __forceinline__ void flash_row_stats(float (&ls)[2], float (&de)[2],
                                                const float* __restrict__ lse,
                                                const float* __restrict__ delta, long long tok0,
                                                int heads, int h, int i0, int seq) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = i0 + 8 * r;
        ls[r] = i < seq ? lse[(tok0 + i) * heads + h] * FLASH_LOG2E : 0.0f;
        de[r] = i < seq ? delta[(tok0 + i) * heads + h] : 0.0f;
    }
}

// P = 2^(c·log2e·S − lse·log2e) in s where visible (bit 4t + e of vis), else 0; rows as the
// accumulators' (ls: this thread's two rows' lse·log2e).
template <int NT>
__device__ __forceinline__ void flash_dq_probabilities(float (&s)[NT][4], unsigned int vis,
                                                       float sl2, const float (&ls)[2]) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[t][e] = flash_exp2(s[t][e] * sl2 - ls[e >> 1]);
    }
    flash_mask(s, vis, 0.0f);
}

// dS = P ∘ (dP − D) in s (P there already; de: this thread's two rows' D).
template <int NT>
__device__ __forceinline__ void flash_dq_dscores(float (&s)[NT][4], const float (&dp)[NT][4],
                                                 const float (&de)[2]) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[t][e] *= dp[t][e] - de[e >> 1];
    }
}

// dq rows i0, i0 + 8 of head h (those < seq) = scale · acc.
template <int NDT>
__device__ __forceinline__ void flash_dq_store(const FlashOut& dq, const float (&acc)[NDT][4],
                                               long long tok0, int h, int i0, int seq, int tig,
                                               float scale) {
    const long long col = (long long)h * NDT * 8 + 2 * tig;
    if (i0 < seq) flash_out_row<NDT>(dq, tok0 + i0, col, acc, 0, scale, tig);
    if (i0 + 8 < seq) flash_out_row<NDT>(dq, tok0 + i0 + 8, col, acc, 1, scale, tig);
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
                                              const FlashOut dq, int seq, int heads,
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
    float ls[2], de[2];
    flash_row_stats(ls, de, lse, delta, tok0, heads, h, i0, seq);
    const float sl2 = scale * FLASH_LOG2E;
    float acc[NDT][4];
    flash_zero<NDT>(acc);
#pragma unroll 1
    for (int kt = 0; kt < ntiles; ++kt) {
        const int buf = kt & 1, j0 = kt * BC;
        const bool part = blk.whole_part(kt, qwhole);
        blk.copy_next(kt, Kb(buf ^ 1), Vb(buf ^ 1), seq);
        flash_wait<1>();  // tile kt has arrived; flash_all_threads' barrier makes it visible
        const bool whole = flash_all_threads(part);
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
            flash_dq_probabilities<NT>(s, vis, sl2, ls);
            flash_dq_dscores<NT>(s, dp, de);
#pragma unroll
            for (int kb = 0; kb < HALF / 16; ++kb) {
                unsigned int sa[4];
                flash_c_to_a<NT>(sa, s, kb);
                flash_mma_nn<HD>(acc, sa, Kb(buf), HALF * half + 16 * kb, lane);
            }
        }
        __syncthreads();
    }
    flash_dq_store<NDT>(dq, acc, tok0, h, i0, seq, tig, scale);
}

#ifdef FLASH_WGMMA
// dQ on warpgroup products: per key tile, S = Q·Kᵀ and dP = dO·Vᵀ as two 64 × 64 products (Q
// from registers up to head_dim 128, dO from shared memory), committed apart so that P is formed
// while dP runs; dS in registers, dQ += dS·K from them. Shared (swizzled tiles): Q, dO, then K
// and V in two buffers; one block barrier a tile (tile t visible, every warp past tile t − 1,
// whose buffer then takes tile t + 1's copy). Registers: acc HD/2, s + dp 64, Q HD/4. Tiles with
// no visible pair are computed anyway (their dS is 0). (Computing tile t + 1's products during
// tile t's dS, as the forward does, needs 64 more registers: it spilled and ran 30 % slower at
// seq 8192; so did dO's fragments in registers beside Q's, 24 % slower.)
template <int HD>
__device__ __forceinline__ void flash_dq_wg_impl(bf16_t* sm, const bf16_t* __restrict__ q,
                                                 const bf16_t* __restrict__ k,
                                                 const bf16_t* __restrict__ v,
                                                 const bf16_t* __restrict__ d_out,
                                                 const float* __restrict__ lse,
                                                 const float* __restrict__ delta,
                                                 const int* __restrict__ segments,
                                                 const FlashOut dq, int seq, int heads,
                                                 int kv_heads, float scale) {
    constexpr int NDT = HD / 8, BC = FLASH_TILE, NT = BC / 8, TE = BC * HD;
    bf16_t* Qs = sm;
    bf16_t* Ds = sm + TE;
    auto Kb = [&](int u) { return sm + (2 + 2 * u) * TE; };
    auto Vb = [&](int u) { return sm + (3 + 2 * u) * TE; };
    constexpr bool QREG = HD <= 128;
    unsigned int qa[QREG ? HD / 16 : 1][4];
    // s = Q·Kᵀ and dp = dO·Vᵀ of the key tile in buffer u, queued as two groups.
    auto scores = [&](float (&s)[NT][4], float (&dp)[NT][4], int u) {
        wg_fence();
        if constexpr (QREG) {
            wg_scores_rs<HD, NT>(s, qa, Kb(u));
        } else {
            wg_scores<HD, NT>(s, Qs, Kb(u));
        }
        wg_commit();
        wg_scores<HD, NT>(dp, Ds, Vb(u));
        wg_commit();
    };

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
    const FlashQueryBlock<HD> blk(k, v, segments, seq, heads, kv_heads);
    const int h = blk.h, r0 = blk.r0, ntiles = blk.ntiles;
    const long long ldq = blk.ldq, ldk = blk.ldk, tok0 = blk.tok0;
    const int* seg = blk.seg;
    const long long qoff = (tok0 + r0) * ldq + (long long)h * HD;

    flash_load_tile<HD, true>(Qs, q + qoff, ldq, seq - r0);
    flash_load_tile<HD, true>(Ds, d_out + qoff, ldq, seq - r0);
    flash_load_tile<HD, true>(Kb(0), blk.kh, ldk, seq);
    flash_load_tile<HD, true>(Vb(0), blk.vh, ldk, seq);
    flash_commit();
    const bool qwhole = flash_block_whole(seg, seq, r0);
    const int i0 = r0 + 16 * warp + gid, i1 = i0 + 8;
    float ls[2], de[2];
    flash_row_stats(ls, de, lse, delta, tok0, heads, h, i0, seq);
    const float sl2 = scale * FLASH_LOG2E;
    float acc[NDT][4];
    flash_zero<NDT>(acc);
    int id = blk.tile_segment(0, qwhole);
#pragma unroll 1
    for (int kt = 0; kt < ntiles; ++kt) {
        const int buf = kt & 1, j0 = kt * BC;
        flash_wait<0>();  // tile kt (this thread's copies)
        flash_fence_async();
        // The one barrier a tile: tile kt visible, every warp past tile kt − 1's products.
        const bool whole = flash_all_threads(blk.tile_whole(kt, qwhole, id));
        blk.template copy_next<true>(kt, Kb(buf ^ 1), Vb(buf ^ 1), seq);
        id = blk.tile_segment(kt + 1, qwhole);
        if constexpr (QREG) {
            if (kt == 0) wg_afrags<HD>(qa, Qs, warp, lane);
        }
        float s[NT][4], dp[NT][4];
        scores(s, dp, buf);
        const unsigned int vis =
            whole ? 0xffffffffu : flash_visible<NT, false>(seg, seq, i0, i1, j0, tig);
        // P while the tensor cores run dP.
        wg_wait<1>();
        wg_hold<NT>(s);
        flash_dq_probabilities<NT>(s, vis, sl2, ls);
        wg_wait<0>();
        wg_hold<NT>(dp);
        flash_dq_dscores<NT>(s, dp, de);
        unsigned int sa[BC / 16][4];
#pragma unroll
        for (int kb = 0; kb < BC / 16; ++kb) flash_c_to_a<NT>(sa[kb], s, kb);
        wg_hold<NDT>(acc);
        wg_fence();
        wg_accumulate<HD>(acc, sa, Kb(buf));
        wg_commit();
        wg_wait<0>();
        wg_hold<NDT>(acc);
    }
    flash_dq_store<NDT>(dq, acc, tok0, h, i0, seq, tig, scale);
}
#define FLASH_DQ_IMPL flash_dq_wg_impl
#else
#define FLASH_DQ_IMPL flash_dq_impl
#endif

// q, k, v, d_out bf16; lse, delta f32 [batch·seq, heads]; dq like q (every element written), as
// FlashOut says: f32 with rows ld_dq values apart, or with dq_bf16 bf16, and turned back by the
// angles at dq_angles where not null.
// Launch: grid (ceil(seq/64), heads, batch), block 128, dynamic shared memory T·64·(hd + 8)·2
// bytes, T = 4 (the warpgroup version: 6·64·hd·2).
extern "C" __global__ void __launch_bounds__(FLASH_THREADS)
    flash_bwd_dq(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                 const bf16_t* __restrict__ v, const bf16_t* __restrict__ d_out,
                 const float* __restrict__ lse, const float* __restrict__ delta,
                 const int* __restrict__ segments, void* __restrict__ dq_values, int dq_bf16,
                 long long ld_dq, const float2* __restrict__ dq_angles, int batch, int seq,
                 int heads, int kv_heads, int head_dim, float scale) {
    extern __shared__ __align__(1024) bf16_t flash_sm[];
    const FlashOut dq{dq_values, dq_bf16, ld_dq, dq_angles};
    if (head_dim == 128) {
        FLASH_DQ_IMPL<128>(flash_sm, q, k, v, d_out, lse, delta, segments, dq, seq, heads,
                           kv_heads, scale);
    } else {
        FLASH_DQ_IMPL<64>(flash_sm, q, k, v, d_out, lse, delta, segments, dq, seq, heads,
                          kv_heads, scale);
    }
}

// Pᵀ = 2^(c·log2e·Sᵀ − lse·log2e) in s where visible (bit 4t + e of vis), else 0; the
// statistic of column (query) 8t + 2tig + (e & 1) from ls.
template <int NT>
__device__ __forceinline__ void flash_dkdv_probabilities(float (&s)[NT][4], unsigned int vis,
                                                         float sl2, const float* ls, int tig) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int col = 8 * t + 2 * tig + (e & 1);
            s[t][e] = flash_exp2(s[t][e] * sl2 - ls[col]);
        }
    }
    flash_mask(s, vis, 0.0f);
}

// dSᵀ = Pᵀ ∘ (dPᵀ − D) in dp (Pᵀ in p), D of column 8t + 2tig + (e & 1) from ds.
template <int NT>
__device__ __forceinline__ void flash_dkdv_dscores(float (&dp)[NT][4], const float (&p)[NT][4],
                                                   const float* ds, int tig) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            dp[t][e] = p[t][e] * (dp[t][e] - ds[8 * t + 2 * tig + (e & 1)]);
        }
    }
}

#define FLASH_DK 1
#define FLASH_DV 2
// With FLASH_DV alone: Pᵀ handed on (FlashProbs::give) to a warpgroup making dK of the same keys
// with FLASH_DK | FLASH_P_TAKEN, which takes it (FlashProbs::take) instead of computing Sᵀ.
#define FLASH_P_GIVEN 4
#define FLASH_P_TAKEN 8

#ifdef FLASH_WGMMA
// Pᵀ of one pair handed from the warpgroup making dV to the one making dK (flash_bwd_dkdv_ws at
// head_dim 256): 64 × 64 f32 in the accumulators' layout, which both warpgroups share, thread t's
// 32 values as 8 float4 at buf[128i + t] (a warp's stores and loads consecutive 16-byte words);
// `ready` completes a phase once the giving warpgroup's 128 threads have stored theirs (its
// phase parity for this pair: `parity`).
struct FlashProbs {
    float4* buf;
    unsigned int ready, parity;
    int ctid;

    template <int NT>
    __device__ void give(const float (&p)[NT][4]) const {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            buf[FLASH_THREADS * t + ctid] = make_float4(p[t][0], p[t][1], p[t][2], p[t][3]);
        }
        flash_mbar_arrive(ready);  // release: the stores above before it
    }
    template <int NT>
    __device__ void take(float (&p)[NT][4]) const {
        flash_mbar_wait(ready, parity);
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            const float4 x = buf[FLASH_THREADS * t + ctid];
            p[t][0] = x.x;
            p[t][1] = x.y;
            p[t][2] = x.z;
            p[t][3] = x.w;
        }
    }
};

// One (query head, query tile) pair of a dK/dV warpgroup on tensor cores: K (Ks) and V (Vs) of
// its 64 keys, the pair's Q (Qt) and dO (Dt) tiles, lse·log2e (ls) and D (ds) of their 64
// queries, vis this thread's visibility bits. Each product is a 64 × 64 one per score matrix,
// committed one group each: Sᵀ, then dPᵀ while the threads form Pᵀ, then dV += Pᵀ·dO while they
// form dSᵀ, then dK += dSᵀ·Q; all complete on return. GRADS as flash_dkdv_impl's, and
// FLASH_P_GIVEN / FLASH_P_TAKEN: Pᵀ handed through `probs`, each warpgroup making 2 products.
template <int HD, int GRADS, int NK, int NV>
__device__ __forceinline__ void flash_dkdv_wg_pair(float (&dka)[NK][4], float (&dva)[NV][4],
                                                   const bf16_t* Ks, const bf16_t* Vs,
                                                   const bf16_t* Qt, const bf16_t* Dt,
                                                   const float* ls, const float* ds,
                                                   unsigned int vis, float sl2, int tig,
                                                   const FlashProbs& probs = {}) {
    constexpr bool DK = GRADS & FLASH_DK, DV = GRADS & FLASH_DV;
    constexpr bool GIVEN = GRADS & FLASH_P_GIVEN, TAKEN = GRADS & FLASH_P_TAKEN;
    static_assert(!GIVEN || GRADS == (FLASH_DV | FLASH_P_GIVEN), "Pᵀ is given by dV's maker");
    static_assert(!TAKEN || GRADS == (FLASH_DK | FLASH_P_TAKEN), "Pᵀ is taken by dK's maker");
    constexpr int BR = FLASH_TILE, NT = BR / 8;
    // The A operands pa and sa must stay untouched until their products are done.
    float s[NT][4], dp[DK ? NT : 1][4];
    unsigned int pa[DV ? BR / 16 : 1][4], sa[DK ? BR / 16 : 1][4];
    wg_fence();
    if constexpr (!TAKEN) wg_scores<HD, NT>(s, Ks, Qt);
    if constexpr (DK) {
        if constexpr (!TAKEN) wg_commit();
        wg_scores<HD, NT>(dp, Vs, Dt);
    }
    wg_commit();
    if constexpr (TAKEN) {
        probs.take<NT>(s);  // while dPᵀ runs
    } else {
        wg_wait<DK ? 1 : 0>();
        wg_hold(s);
        flash_dkdv_probabilities<NT>(s, vis, sl2, ls, tig);
        if constexpr (GIVEN) probs.give<NT>(s);
    }
    if constexpr (DV) {
#pragma unroll
        for (int kb = 0; kb < BR / 16; ++kb) flash_c_to_a<NT>(pa[kb], s, kb);
        wg_hold(dva);
        wg_fence();
        wg_accumulate<HD>(dva, pa, Dt);
        if constexpr (DK) wg_commit();
    }
    if constexpr (DK) {
        wg_wait<DV ? 1 : 0>();
        wg_hold(dp);
        flash_dkdv_dscores<NT>(dp, s, ds, tig);
#pragma unroll
        for (int kb = 0; kb < BR / 16; ++kb) flash_c_to_a<NT>(sa[kb], dp, kb);
        wg_hold(dka);
        wg_fence();
        wg_accumulate<HD>(dka, sa, Qt);
    }
    wg_commit();
    wg_wait<0>();
    wg_hold(dva);
    wg_hold(dka);
    if constexpr (DV) wg_hold_regs(pa);
    if constexpr (DK) wg_hold_regs(sa);
}
#endif

// Rows k0 and k1 of the block's dK (× scale) and dV for KV head g, those within the sequence;
// GRADS as flash_dkdv_impl's.
template <int HD, int GRADS, int NK, int NV>
__device__ __forceinline__ void flash_dkdv_store(const FlashOut& dk, const FlashOut& dv,
                                                 const float (&dka)[NK][4],
                                                 const float (&dva)[NV][4], long long tok0, int g,
                                                 int k0, int k1, int seq, float scale, int tig) {
    constexpr bool DK = GRADS & FLASH_DK, DV = GRADS & FLASH_DV;
    constexpr int NDT = HD / 8;
    const long long col = (long long)g * HD + 2 * tig;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int key = half == 0 ? k0 : k1;
        if (key < seq) {
            if constexpr (DK) flash_out_row<NDT>(dk, tok0 + key, col, dka, half, scale, tig);
            if constexpr (DV) flash_out_row<NDT>(dv, tok0 + key, col, dva, half, 1.0f, tig);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// dK, dV. Block: 64 keys from r0 = 64·blockIdx.x of KV head g, adding up query heads [h0, h1);
// K fragments in registers, V kept in shared memory (its A fragments re-read per use). The
// (query head, query tile) pairs are one sequence, prefetched one ahead: Q and dO tiles of 64
// queries in two buffers, with lse·log2e and D of their rows; one block barrier a pair (pair p
// visible, every warp past pair p − 1, whose buffers then take pair p + 1). Each tile in
// quarters of 16 queries (registers): Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ; Pᵀ = 2^(c·log2e·Sᵀ − lse·log2e),
// dSᵀ = Pᵀ ∘ (dPᵀ − D); dV += Pᵀ·dO, dK += dSᵀ·Q.
// Registers: ka HD/2, dk + dv HD, s + dp 16. Shared: V, Q and dO two buffers each, lse and D.
// On warpgroup products (WG, sm_90a) each pair is one 64 × 64 product per score matrix with K and
// V read from shared memory (swizzled tiles: K, V, then Q and dO two buffers each), and the four
// products committed one group each: Sᵀ, then dPᵀ while the threads form Pᵀ, then dV += Pᵀ·dO
// while they form dSᵀ, then dK += dSᵀ·Q. Registers dk + dv HD, s + dp 64 (K's fragments in
// registers too spilled, 16 % slower); a pair with no visible entry is skipped by the whole block.
// GRADS (warpgroup products only) picks the gradients a block makes: at head_dim 256 dK and dV
// (128 registers each) do not fit beside each other, so one block makes dV (from S alone:
// Pᵀ = 2^(…Sᵀ…), dV += Pᵀ·dO) and another dK (S, dP, dK += dSᵀ·Q): 5 products in place of 4.
// ---------------------------------------------------------------------------------------------
template <int HD, bool WG, int GRADS = FLASH_DK | FLASH_DV>
__device__ __forceinline__ void flash_dkdv_impl(bf16_t* sm, const bf16_t* __restrict__ q,
                                                const bf16_t* __restrict__ k,
                                                const bf16_t* __restrict__ v,
                                                const bf16_t* __restrict__ d_out,
                                                const float* __restrict__ lse,
                                                const float* __restrict__ delta,
                                                const int* __restrict__ segments,
                                                const FlashOut dk, const FlashOut dv, int seq,
                                                int heads, int kv_heads, float scale, int g,
                                                int h0, int h1) {
    static_assert(WG || GRADS == (FLASH_DK | FLASH_DV), "mma.sync makes both gradients");
    constexpr bool DK = GRADS & FLASH_DK, DV = GRADS & FLASH_DV;
    constexpr int NKB = HD / 16, NDT = HD / 8, BR = FLASH_TILE, QT = WG ? BR : 16, NT = QT / 8;
    constexpr int TE = BR * (WG ? HD : HD + 8), KT = WG ? 1 : 0;
    // WG: K first. Then V, and buffer u: Q at (1 + 2u)·TE, dO after it.
    bf16_t* Ks = sm;
    bf16_t* Vs = sm + KT * TE;
    auto Qb = [&](int u) { return sm + (KT + 1 + 2 * u) * TE; };
    auto Db = [&](int u) { return sm + (KT + 2 + 2 * u) * TE; };
    float* stats = reinterpret_cast<float*>(sm + (KT + 5) * TE);  // [buf][lse·log2e | D][64]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
    const int b = blockIdx.z;
    const long long ldq = (long long)heads * HD, ldk = (long long)kv_heads * HD;
    const long long tok0 = (long long)b * seq;
    const int* seg = segments + tok0;
    const int r0 = blockIdx.x * 64;
    const long long koff = (tok0 + r0) * ldk + (long long)g * HD;
    // Query tiles from the one holding r0 (causal) to the end, for each head of the share.
    const int first = r0 / BR, per_head = (seq - 1) / BR + 1 - first;
    const int pairs = (h1 - h0) * per_head;
    // Pair `it` is head h0 + it / per_head, query tile first + it % per_head: kept as (head,
    // tile) and stepped (no division in the loop).
    struct Pair {
        int h, tile;
    };
    auto after = [&](Pair p) {
        return p.tile + 1 < per_head ? Pair{p.h, p.tile + 1} : Pair{p.h + 1, 0};
    };
    // Starts loading pair p into buffer `buf`; its statistics come back in registers, stored
    // once the buffer is free.
    float st_lse = 0.0f, st_del = 0.0f;
    auto prefetch = [&](Pair p, int buf) {
        const int h = p.h, i0 = (first + p.tile) * BR;
        const long long off = (tok0 + i0) * ldq + (long long)h * HD;
        flash_load_tile<HD, WG>(Qb(buf), q + off, ldq, seq - i0);
        flash_load_tile<HD, WG>(Db(buf), d_out + off, ldq, seq - i0);
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

    // K (mma.sync: through Q buffer 0, into registers) and V, then pair 0 into buffer 0.
    flash_load_tile<HD, WG>(WG ? Ks : Qb(0), k + koff, ldk, seq - r0);
    flash_load_tile<HD, WG>(Vs, v + koff, ldk, seq - r0);
    flash_commit();
    unsigned int ka[WG ? 1 : NKB][4];
    if constexpr (!WG) {
        flash_wait<0>();
        __syncthreads();
        flash_afrags<HD>(ka, Qb(0), 16 * warp, lane);
    }
    const bool kwhole = flash_block_whole(seg, seq, r0);  // also: every warp has read K
    const int seg0 = seg[r0];
    // This thread's part of whether the pair at query tile i0 has no masked entry: the tile
    // wholly past the keys and within their one segment. `id`, read a pair ahead, is the
    // segment of query i0 + tid (for the tile's 64 threads; seg0 for the others).
    auto below = [&](int i0) { return kwhole && i0 >= r0 + 64 && i0 + BR <= seq; };
    auto pair_segment = [&](Pair p) {
        const int i0 = (first + p.tile) * BR;
        return below(i0) && tid < BR ? seg[i0 + tid] : seg0;
    };
    Pair pair{h0, 0};
    prefetch(pair, 0);
    flash_commit();
    store_stats(0);
    int id = pair_segment(pair);

    const int k0 = r0 + 16 * warp + gid, k1 = k0 + 8;
    const float sl2 = scale * FLASH_LOG2E;
    float dka[DK ? NDT : 1][4], dva[DV ? NDT : 1][4];
    flash_zero(dka);
    flash_zero(dva);
#pragma unroll 1
    for (int it = 0; it < pairs; ++it) {
        const int buf = it & 1, i0 = (first + pair.tile) * BR;
        flash_wait<0>();  // this thread's copies of pair `it` have landed
#ifdef FLASH_WGMMA
        if constexpr (WG) flash_fence_async();
#endif
        // The one block barrier a pair: every thread's copies and statistics of pair `it`
        // visible, every warp past pair it − 1 (its buffers free for pair it + 1). whole: the
        // pair has no masked entry.
        const bool whole = flash_all_threads(below(i0) && id == seg0);
        const Pair next = after(pair);
        if (it + 1 < pairs) {
            prefetch(next, buf ^ 1);
            id = pair_segment(next);
        }
        flash_commit();
        const float* ls = stats + buf * 2 * BR;
        const float* ds = ls + BR;
#ifdef FLASH_WGMMA
        if constexpr (WG) {
            const unsigned int vis =
                whole ? 0xffffffffu : flash_visible<NT, true>(seg, seq, k0, k1, i0, tig);
            if (whole || __syncthreads_or(vis != 0)) {
                flash_dkdv_wg_pair<HD, GRADS>(dka, dva, Ks, Vs, Qb(buf), Db(buf), ls, ds, vis, sl2,
                                              tig);
            }
        }
#endif
        if constexpr (!WG) {
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
                flash_dkdv_probabilities<NT>(s, vis, sl2, ls + c0, tig);
                flash_dkdv_dscores<NT>(dp, s, ds + c0, tig);
                unsigned int pa[4], sa[4];
                flash_c_to_a<NT>(pa, s, 0);
                flash_c_to_a<NT>(sa, dp, 0);
                flash_mma_nn<HD>(dva, pa, Db(buf), c0, lane);
                flash_mma_nn<HD>(dka, sa, Qb(buf), c0, lane);
            }
        }
        store_stats(buf ^ 1);  // pair it + 1's, read after the next barrier
        pair = next;
    }
    flash_dkdv_store<HD, GRADS>(dk, dv, dka, dva, tok0, g, k0, k1, seq, scale, tig);
}

// The share of the query heads a dK/dV block adds up, and where it writes. Grid y: kv_heads·parts
// blocks (y = g·parts + part), `parts` dividing heads / kv_heads; block y adds up the query heads
// g·group + part·(group/parts) + [0, group/parts) into slab `part` of dk and dv (slabs of
// batch·seq·kv_heads·hd floats, one after another; the caller sums them).
struct FlashHeadShare {
    int g, h0, h1;
    long long slab;
    __device__ FlashHeadShare(int y, int blocks_y, int batch, int seq, int heads, int kv_heads,
                              int head_dim) {
        const int parts = blocks_y / kv_heads, part = y % parts, per = heads / kv_heads / parts;
        g = y / parts;
        h0 = g * (heads / kv_heads) + part * per;
        h1 = h0 + per;
        slab = (long long)part * batch * seq * kv_heads * head_dim;
    }
};

// Inputs as flash_bwd_dq; dk, dv like k and v (every element of each slab written, a slab being
// batch·seq·kv_heads·hd values), both f32 with rows ld_grads values apart or with grads_bf16 bf16;
// dk turned back by the angles at dk_angles where not null. hd: 64 or 128 (256:
// flash_bwd_dkdv_hd256 below). Launch: grid (ceil(seq/64), kv_heads·parts, batch) (see
// FlashHeadShare), block 128, dynamic shared memory T·64·(hd + 8)·2 + 2·2·64·4 bytes, T = 5 (the
// warpgroup version: 6·64·hd·2 + 2·2·64·4).
extern "C" __global__ void __launch_bounds__(FLASH_THREADS)
    flash_bwd_dkdv(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                   const bf16_t* __restrict__ v, const bf16_t* __restrict__ d_out,
                   const float* __restrict__ lse, const float* __restrict__ delta,
                   const int* __restrict__ segments, void* __restrict__ dk_values,
                   void* __restrict__ dv_values, int grads_bf16, long long ld_grads,
                   const float2* __restrict__ dk_angles, int batch, int seq, int heads,
                   int kv_heads, int head_dim, float scale) {
    extern __shared__ __align__(1024) bf16_t flash_sm[];
    const FlashHeadShare sh(blockIdx.y, gridDim.y, batch, seq, heads, kv_heads, head_dim);
    const FlashOut dk = FlashOut{dk_values, grads_bf16, ld_grads, dk_angles}.at(sh.slab);
    const FlashOut dv = FlashOut{dv_values, grads_bf16, ld_grads, nullptr}.at(sh.slab);
    if (head_dim == 128) {
        flash_dkdv_impl<128, FLASH_WG>(flash_sm, q, k, v, d_out, lse, delta, segments, dk, dv,
                                       seq, heads, kv_heads, scale, sh.g, sh.h0, sh.h1);
    } else {
        flash_dkdv_impl<64, FLASH_WG>(flash_sm, q, k, v, d_out, lse, delta, segments, dk, dv,
                                      seq, heads, kv_heads, scale, sh.g, sh.h0, sh.h1);
    }
}

#ifdef FLASH_WGMMA
// ---------------------------------------------------------------------------------------------
// dK, dV warp-specialized (sm_90a). Block of 384 threads: FlashPairRing<HD>::KEYS keys from
// r0 = KEYS·blockIdx.x of KV head g, adding up query heads [h0, h1) (FlashHeadShare). Warpgroup 0
// copies: K and V of the block's key tiles, then each (query head, query tile) pair's Q and dO
// tiles into a ring of FlashPairRing<HD>::S buffers, with lse·log2e and D of the pair's 64
// queries (read a pair ahead into registers, stored once the buffer is free). Warpgroups 1 and 2
// compute from the same buffers, each pair as flash_dkdv_impl's warpgroup version does
// (flash_dkdv_wg_pair: the same outputs bit for bit):
//  - head_dim 64 and 128: 128 keys a block; warpgroup 1 makes both gradients of keys r0..,
//    warpgroup 2 those of keys r0 + 64...
//  - head_dim 256: dK and dV (128 accumulator registers each) do not fit in one warpgroup's
//    registers. Both warpgroups take the block's 64 keys: warpgroup 1 makes Sᵀ, Pᵀ and dV += Pᵀ·dO,
//    handing Pᵀ (f32) to warpgroup 2 through shared memory (FlashProbs), which makes dPᵀ
//    meanwhile, then dSᵀ = Pᵀ ∘ (dPᵀ − D) and dK += dSᵀ·Q: 2 products each, 4 a pair as at
//    head_dim 128 (flash_bwd_dkdv_hd256's separate dK blocks recompute Sᵀ: 5), each tile copied
//    once, one warpgroup's products running while the other forms its scores. The ring has 2
//    buffers (what fits beside K and V: 6 tiles of 32 KiB and two Pᵀ of 16 KiB).
// The computing warpgroups meet the copier only at the ring's mbarriers and vote within their
// warpgroup on named barriers 1 and 2 (whether a pair needs a mask, whether it has a visible
// entry at all), never on a block barrier.
// ---------------------------------------------------------------------------------------------

// Tells bench/flash/flash_bench.cu that this source has flash_bwd_dkdv_ws, and (_WIDE) the
// head_dim-256 one with its ring of FLASH_WS_STAGES_WIDE pairs.
#define FLASH_DKDV_WS 1
#define FLASH_DKDV_WS_WIDE 1
#define FLASH_WS_STAGES_WIDE 2
// Whether, at head_dim 256, dV's warpgroup hands Pᵀ to dK's (1), or dK's recomputes Sᵀ (0: 5
// products a pair, no hand-off; bench/flash builds that variant with -DFLASH_DKDV_SHARE_P=0).
#ifndef FLASH_DKDV_SHARE_P
#define FLASH_DKDV_SHARE_P 1
#endif

// Whether `part` holds in any (all) of the 128 threads of the warpgroup voting on named barrier
// `id` (each of them must call it).
__device__ __forceinline__ bool flash_wg_any(bool part, unsigned int id) {
    unsigned int r;
    asm volatile(
        "{ .reg .pred p, q;\n"
        "  setp.ne.u32 q, %1, 0;\n"
        "  bar.red.or.pred p, %2, 128, q;\n"
        "  selp.u32 %0, 1, 0, p; }\n"
        : "=r"(r)
        : "r"((unsigned int)part), "r"(id)
        : "memory");
    return r != 0;
}
__device__ __forceinline__ bool flash_wg_all(bool part, unsigned int id) {
    return !flash_wg_any(!part, id);
}

// The warp-specialized dK/dV's shared memory: K and V of the block's KT key tiles (key(c),
// value(c)), the buffers of pair p (query(p), d_out(p); at head_dim 256 also its Pᵀ handed from
// dV's warpgroup to dK's, probs(p); stats(p): lse·log2e then D of its 64 queries), then the
// barriers (full: 128 copy arrivals and 128 after the statistics' stores; empty: one arrival a
// computing thread, as the threads read the statistics; once(): K and V; at head_dim 256 one
// a stage for its Pᵀ, 128 arrivals: probs_ready(p)).
// Launch: (2·KT + 2·S)·64·HD·2 + S·(P + 2·64·4) + 128 bytes (KT = 2, S = FLASH_WS_STAGES, P = 0;
// at head_dim 256 KT = 1, S = FLASH_WS_STAGES_WIDE, P = 64·64·4).
template <int HD>
struct FlashPairRing {
    static constexpr int KT = HD == 256 ? 1 : 2, KEYS = KT * FLASH_TILE;
    static constexpr int S = HD == 256 ? FLASH_WS_STAGES_WIDE : FLASH_WS_STAGES;
    static constexpr int TE = FLASH_TILE * HD, STATS = 2 * FLASH_TILE;
    static constexpr int P = HD == 256 ? FLASH_TILE * FLASH_TILE : 0;  // floats of a Pᵀ
    // The copier's loads of 256-wide tiles need more than 24 registers (44 bytes spilled there;
    // 4 with 40, one store and one load a pair).
    using Regs = FlashRegs<HD == 256 ? 40 : 24, HD == 256 ? 232 : 240>;
    bf16_t* sm;
    float* probs0;
    float* stats0;
    FlashRingBars<S> bars;
    __device__ explicit FlashPairRing(bf16_t* smem)
        : sm(smem), probs0(reinterpret_cast<float*>(smem + (2 * KT + 2 * S) * TE)),
          stats0(probs0 + S * P), bars{flash_smem(stats0 + S * STATS)} {}
    __device__ bf16_t* key(int c) const { return sm + c * TE; }
    __device__ bf16_t* value(int c) const { return sm + (KT + c) * TE; }
    __device__ bf16_t* query(int p) const { return sm + (2 * KT + 2 * (p % S)) * TE; }
    __device__ bf16_t* d_out(int p) const { return sm + (2 * KT + 1 + 2 * (p % S)) * TE; }
    __device__ float* stats(int p) const { return stats0 + (p % S) * STATS; }
    __device__ unsigned int probs_ready(int p) const { return bars.once() + 8 * (1 + p % S); }
    // Pair p's Pᵀ as thread ctid of a computing warpgroup hands it on or takes it: the buffer
    // and barrier phase of pair p (one a pair: the giver arrives for every pair).
    __device__ FlashProbs probs(int p, int ctid) const {
        return FlashProbs{reinterpret_cast<float4*>(probs0 + (p % S) * P), probs_ready(p),
                          (unsigned int)(p / S) & 1u, ctid};
    }

    // Thread 0 sets the barriers up; a block barrier must follow before any is used.
    __device__ void init() const {
        bars.init(2 * FLASH_THREADS, 2 * FLASH_THREADS);
        if (P != 0 && threadIdx.x == 0) {
            for (int b = 0; b < S; ++b) flash_mbar_init(probs_ready(b), FLASH_THREADS);
        }
    }
};

// The pairs of a warp-specialized dK/dV block whose keys start at r0: for each query head of its
// share, the query tiles from the one holding r0 to the end (causal), `pairs` in all.
struct FlashPairs {
    int first, per_head, pairs;
    __device__ FlashPairs(int r0, int seq, int h0, int h1)
        : first(r0 / FLASH_TILE),
          per_head((seq - 1) / FLASH_TILE + 1 - first),
          pairs((h1 - h0) * per_head) {}
};

// Warpgroup 0's part (threads 0..127): K and V of the block's keys, then every pair into the
// ring once both computing warpgroups have released the pair before it there.
template <int HD>
__device__ __forceinline__ void flash_dkdv_ws_copy(const FlashPairRing<HD>& ring,
                                                   const FlashPairs& pr,
                                                   const bf16_t* __restrict__ q,
                                                   const bf16_t* __restrict__ k,
                                                   const bf16_t* __restrict__ v,
                                                   const bf16_t* __restrict__ d_out,
                                                   const float* __restrict__ lse,
                                                   const float* __restrict__ delta,
                                                   long long tok0, int r0, int seq, int heads,
                                                   int kv_heads, int g, int h0) {
    constexpr int BR = FLASH_TILE;
    const int tid = threadIdx.x;
    const long long ldq = (long long)heads * HD, ldk = (long long)kv_heads * HD;
    const long long koff = (tok0 + r0) * ldk + (long long)g * HD;
    for (int c = 0; c < FlashPairRing<HD>::KT; ++c) {
        const long long off = koff + BR * c * ldk;
        flash_load_tile<HD, true>(ring.key(c), k + off, ldk, seq - r0 - BR * c);
        flash_load_tile<HD, true>(ring.value(c), v + off, ldk, seq - r0 - BR * c);
    }
    flash_mbar_arrive_copies(ring.bars.once());
    // This thread's statistic of the pair (head h, queries from i0): lse·log2e of query
    // i0 + tid for threads < 64, D of query i0 + tid − 64 for the others.
    auto statistic = [&](int h, int i0) {
        const int i = i0 + (tid & (BR - 1));
        const float* from = tid < BR ? lse : delta;
        const float x = i < seq ? from[(tok0 + i) * heads + h] : 0.0f;
        return tid < BR ? x * FLASH_LOG2E : x;
    };
    int h = h0, tile = 0;
    float st = statistic(h, pr.first * BR);
#pragma unroll 1
    for (int p = 0; p < pr.pairs; ++p) {
        const int i0 = (pr.first + tile) * BR;
        const long long off = (tok0 + i0) * ldq + (long long)h * HD;
        ring.bars.await_empty(p);
        flash_load_tile<HD, true>(ring.query(p), q + off, ldq, seq - i0);
        flash_load_tile<HD, true>(ring.d_out(p), d_out + off, ldq, seq - i0);
        flash_mbar_arrive_copies(ring.bars.full(p));
        ring.stats(p)[tid] = st;
        flash_mbar_arrive(ring.bars.full(p));  // release: the store above before it
        if (++tile == pr.per_head) {
            tile = 0;
            ++h;
        }
        if (p + 1 < pr.pairs) st = statistic(h, (pr.first + tile) * BR);
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// A computing warpgroup's part: GRADS (flash_dkdv_impl's) of the 64 keys of key tile c (from
// rk = r0 + 64c), voting on named barrier `vote`, every pair read from the ring.
template <int HD, int GRADS>
__device__ __forceinline__ void flash_dkdv_ws_compute(const FlashPairRing<HD>& ring,
                                                      const FlashPairs& pr, int c,
                                                      unsigned int vote,
                                                      const int* __restrict__ segments,
                                                      const FlashOut& dk, const FlashOut& dv,
                                                      long long tok0, int r0, int seq,
                                                      float scale, int g) {
    constexpr bool DK = GRADS & FLASH_DK, DV = GRADS & FLASH_DV;
    constexpr int NDT = HD / 8, BR = FLASH_TILE, NT = BR / 8;
    const int ctid = threadIdx.x % FLASH_THREADS, lane = ctid & 31, warp = ctid >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int rk = r0 + BR * c;  // this warpgroup's first key
    const int* seg = segments + tok0;
    const int seg0 = rk < seq ? seg[rk] : 0;
    // As flash_dkdv_impl: a pair needs no mask when its tile lies wholly past the keys, which
    // all exist in one segment, and its queries are all in that segment (`id`, read a pair
    // ahead: the segment of query i0 + ctid for the tile's 64 threads, seg0 for the others).
    const bool kwhole =
        flash_wg_all(rk + BR <= seq && (ctid >= BR || seg[rk + ctid] == seg0), vote);
    auto below = [&](int i0) { return kwhole && i0 >= rk + BR && i0 + BR <= seq; };
    auto pair_segment = [&](int i0) { return below(i0) && ctid < BR ? seg[i0 + ctid] : seg0; };
    int tile = 0, id = pair_segment(pr.first * BR);
    const int k0 = rk + 16 * warp + gid, k1 = k0 + 8;
    const float sl2 = scale * FLASH_LOG2E;
    float dka[DK ? NDT : 1][4], dva[DV ? NDT : 1][4];
    flash_zero(dka);
    flash_zero(dva);
    ring.bars.wait_once();
#pragma unroll 1
    for (int p = 0; p < pr.pairs; ++p) {
        const int i0 = (pr.first + tile) * BR;
        const bool whole = flash_wg_all(below(i0) && id == seg0, vote);
        if (++tile == pr.per_head) tile = 0;
        if (p + 1 < pr.pairs) id = pair_segment((pr.first + tile) * BR);
        const unsigned int vis =
            whole ? 0xffffffffu : flash_visible<NT, true>(seg, seq, k0, k1, i0, tig);
        ring.bars.wait(p);
        const FlashProbs probs = ring.probs(p, ctid);
        if (whole || flash_wg_any(vis != 0, vote)) {
            const float* ls = ring.stats(p);
            flash_dkdv_wg_pair<HD, GRADS>(dka, dva, ring.key(c), ring.value(c), ring.query(p),
                                          ring.d_out(p), ls, ls + BR, vis, sl2, tig, probs);
        } else if constexpr (GRADS & FLASH_P_GIVEN) {
            // Nothing visible: the taker skips the pair too, but the phase of pair p's barrier
            // still completes, so that each pair has one.
            flash_mbar_arrive(probs.ready);
        }
        ring.bars.release_thread(p);  // the threads read the statistics
    }
    flash_dkdv_store<HD, GRADS>(dk, dv, dka, dva, tok0, g, k0, k1, seq, scale, tig);
}

template <int HD>
__device__ __forceinline__ void flash_dkdv_ws_impl(bf16_t* sm, const bf16_t* __restrict__ q,
                                                   const bf16_t* __restrict__ k,
                                                   const bf16_t* __restrict__ v,
                                                   const bf16_t* __restrict__ d_out,
                                                   const float* __restrict__ lse,
                                                   const float* __restrict__ delta,
                                                   const int* __restrict__ segments,
                                                   const FlashOut dk, const FlashOut dv, int seq,
                                                   int heads, int kv_heads, float scale, int g,
                                                   int h0, int h1) {
    const FlashPairRing<HD> ring(sm);
    const int wg = threadIdx.x / FLASH_THREADS;
    const long long tok0 = (long long)blockIdx.z * seq;
    const int r0 = blockIdx.x * FlashPairRing<HD>::KEYS;
    const FlashPairs pr(r0, seq, h0, h1);
    ring.init();
    __syncthreads();  // the last block barrier: the warpgroups go their own ways
    if (wg == 0) {
        FlashPairRing<HD>::Regs::copying();
        flash_dkdv_ws_copy<HD>(ring, pr, q, k, v, d_out, lse, delta, tok0, r0, seq, heads,
                               kv_heads, g, h0);
        return;
    }
    FlashPairRing<HD>::Regs::computing();
    const unsigned int vote = wg;  // named barriers 1 and 2
    if constexpr (FlashPairRing<HD>::KT == 2) {
        flash_dkdv_ws_compute<HD, FLASH_DK | FLASH_DV>(ring, pr, wg - 1, vote, segments, dk, dv,
                                                       tok0, r0, seq, scale, g);
    } else if (wg == 1) {
        constexpr int GIVE = FLASH_DKDV_SHARE_P ? FLASH_P_GIVEN : 0;
        flash_dkdv_ws_compute<HD, FLASH_DV | GIVE>(ring, pr, 0, vote, segments, dk, dv, tok0, r0,
                                                   seq, scale, g);
    } else {
        constexpr int TAKE = FLASH_DKDV_SHARE_P ? FLASH_P_TAKEN : 0;
        flash_dkdv_ws_compute<HD, FLASH_DK | TAKE>(ring, pr, 0, vote, segments, dk, dv, tok0, r0,
                                                   seq, scale, g);
    }
}

// Arguments and outputs as flash_bwd_dkdv; hd: 64 or 128 (256: flash_bwd_dkdv_ws_hd256 below).
// Launch: grid (ceil(seq/128), kv_heads·parts, batch) (FlashHeadShare), block 384, dynamic shared
// memory (4 + 2·FLASH_WS_STAGES)·64·hd·2 + FLASH_WS_STAGES·2·64·4 + 128 bytes.
extern "C" __global__ void __launch_bounds__(FLASH_WS_THREADS, 1)
    flash_bwd_dkdv_ws(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                      const bf16_t* __restrict__ v, const bf16_t* __restrict__ d_out,
                      const float* __restrict__ lse, const float* __restrict__ delta,
                      const int* __restrict__ segments, void* __restrict__ dk_values,
                      void* __restrict__ dv_values, int grads_bf16, long long ld_grads,
                      const float2* __restrict__ dk_angles, int batch, int seq, int heads,
                      int kv_heads, int head_dim, float scale) {
    extern __shared__ __align__(1024) bf16_t flash_sm[];
    const FlashHeadShare sh(blockIdx.y, gridDim.y, batch, seq, heads, kv_heads, head_dim);
    const FlashOut dk = FlashOut{dk_values, grads_bf16, ld_grads, dk_angles}.at(sh.slab);
    const FlashOut dv = FlashOut{dv_values, grads_bf16, ld_grads, nullptr}.at(sh.slab);
    if (head_dim == 128) {
        flash_dkdv_ws_impl<128>(flash_sm, q, k, v, d_out, lse, delta, segments, dk, dv, seq,
                                heads, kv_heads, scale, sh.g, sh.h0, sh.h1);
    } else {
        flash_dkdv_ws_impl<64>(flash_sm, q, k, v, d_out, lse, delta, segments, dk, dv, seq,
                               heads, kv_heads, scale, sh.g, sh.h0, sh.h1);
    }
}
#endif

#ifdef FLASH_WGMMA
// head_dim 256, warpgroup products only: entries of their own, so that the 128-wide kernels
// keep their register allocation. Arguments, outputs and shared memory as the kernels above
// with hd = 256.

// The warp-specialized forward (flash_fwd_ws) at head_dim 256: a key tile a step, Q read from
// shared memory, K and V in rings of their own. Launch: grid (ceil(seq/128), heads, batch),
// block 384, dynamic shared memory (2 + 2·FLASH_FWD_STAGES_WIDE)·64·256·2 + 128 bytes.
extern "C" __global__ void __launch_bounds__(FLASH_WS_THREADS, 1)
    flash_fwd_ws_hd256(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                       const bf16_t* __restrict__ v, const int* __restrict__ segments,
                       void* __restrict__ out_values, int out_bf16, long long ldo,
                       float* __restrict__ lse, int batch, int seq, int heads, int kv_heads,
                       int head_dim, float scale) {
    extern __shared__ __align__(1024) bf16_t flash_sm[];
    const FlashOut out{out_values, out_bf16, ldo, nullptr};
    flash_fwd_ws_impl<256>(flash_sm, q, k, v, segments, out, lse, seq, heads, kv_heads, scale);
}

extern "C" __global__ void __launch_bounds__(FLASH_THREADS)
    flash_bwd_dq_hd256(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                       const bf16_t* __restrict__ v, const bf16_t* __restrict__ d_out,
                       const float* __restrict__ lse, const float* __restrict__ delta,
                       const int* __restrict__ segments, void* __restrict__ dq_values,
                       int dq_bf16, long long ld_dq, const float2* __restrict__ dq_angles,
                       int batch, int seq, int heads, int kv_heads, int head_dim, float scale) {
    extern __shared__ __align__(1024) bf16_t flash_sm[];
    const FlashOut dq{dq_values, dq_bf16, ld_dq, dq_angles};
    flash_dq_wg_impl<256>(flash_sm, q, k, v, d_out, lse, delta, segments, dq, seq, heads,
                          kv_heads, scale);
}

// dK and dV (128 registers each) do not fit in one block's registers: grid y is twice
// flash_bwd_dkdv's; blocks y < kv_heads·parts make dV, the others dK (for y − kv_heads·parts).
extern "C" __global__ void __launch_bounds__(FLASH_THREADS)
    flash_bwd_dkdv_hd256(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                         const bf16_t* __restrict__ v, const bf16_t* __restrict__ d_out,
                         const float* __restrict__ lse, const float* __restrict__ delta,
                         const int* __restrict__ segments, void* __restrict__ dk_values,
                         void* __restrict__ dv_values, int grads_bf16, long long ld_grads,
                         const float2* __restrict__ dk_angles, int batch, int seq, int heads,
                         int kv_heads, int head_dim, float scale) {
    extern __shared__ __align__(1024) bf16_t flash_sm[];
    const int blocks_y = gridDim.y / 2;
    const FlashHeadShare sh(blockIdx.y % blocks_y, blocks_y, batch, seq, heads, kv_heads, 256);
    const FlashOut dk = FlashOut{dk_values, grads_bf16, ld_grads, dk_angles}.at(sh.slab);
    const FlashOut dv = FlashOut{dv_values, grads_bf16, ld_grads, nullptr}.at(sh.slab);
    if (blockIdx.y < blocks_y) {
        flash_dkdv_impl<256, true, FLASH_DV>(flash_sm, q, k, v, d_out, lse, delta, segments, dk,
                                             dv, seq, heads, kv_heads, scale, sh.g, sh.h0, sh.h1);
    } else {
        flash_dkdv_impl<256, true, FLASH_DK>(flash_sm, q, k, v, d_out, lse, delta, segments, dk,
                                             dv, seq, heads, kv_heads, scale, sh.g, sh.h0, sh.h1);
    }
}

// The warp-specialized dK/dV at head_dim 256 (both gradients of a block's 64 keys, one a
// computing warpgroup). Arguments and outputs as flash_bwd_dkdv. Launch: grid (ceil(seq/64),
// kv_heads·parts, batch) (FlashHeadShare), block 384, dynamic shared memory
// (2 + 2·FLASH_WS_STAGES_WIDE)·64·256·2 + FLASH_WS_STAGES_WIDE·(64·64·4 + 2·64·4) + 128 bytes.
extern "C" __global__ void __launch_bounds__(FLASH_WS_THREADS, 1)
    flash_bwd_dkdv_ws_hd256(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                            const bf16_t* __restrict__ v, const bf16_t* __restrict__ d_out,
                            const float* __restrict__ lse, const float* __restrict__ delta,
                            const int* __restrict__ segments, void* __restrict__ dk_values,
                            void* __restrict__ dv_values, int grads_bf16, long long ld_grads,
                            const float2* __restrict__ dk_angles, int batch, int seq, int heads,
                            int kv_heads, int head_dim, float scale) {
    extern __shared__ __align__(1024) bf16_t flash_sm[];
    const FlashHeadShare sh(blockIdx.y, gridDim.y, batch, seq, heads, kv_heads, 256);
    const FlashOut dk = FlashOut{dk_values, grads_bf16, ld_grads, dk_angles}.at(sh.slab);
    const FlashOut dv = FlashOut{dv_values, grads_bf16, ld_grads, nullptr}.at(sh.slab);
    flash_dkdv_ws_impl<256>(flash_sm, q, k, v, d_out, lse, delta, segments, dk, dv, seq, heads,
                            kv_heads, scale, sh.g, sh.h0, sh.h1);
}
#endif
