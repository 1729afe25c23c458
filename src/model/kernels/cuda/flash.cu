// FineTune's fused attention for bf16 on GPUs with bf16 tensor cores (compute capability 8.0 and
// later), compiled at run time by NVRTC for compute_80 (src/model/kernels/cuda/flash.rs). Flash
// attention's scheme: the scores of a block of queries against a block of keys live in registers
// only, the softmax runs online (a running max and sum per row), and the backward recomputes the
// probabilities from q, k and the log-sum-exp the forward kept. The products are
// `mma.sync.m16n8k16` bf16 → f32 tensor-core instructions, whose fragment layouts (PTX ISA,
// "Matrix Fragments for mma.m16n8k16") let a score accumulator serve directly as the next
// product's input. No headers: bf16 is handled as its raw 16 bits.
//
// Shapes: q (B, H, T, D), k and v (B, KV, T, D) read per group of H/KV query heads, bias
// (R, 1, T, T) with R = 1 or B, added to the scaled scores (0 or −∞: the causal mask and the
// packing boundaries). Key blocks after a query block are skipped: the bias must mask every key
// after its query (kernels::attention's contract). A row with every key masked gives zeros.
// `ft_flash_tiles` first sorts the bias's 64×64 tiles into all-zero (no bias read), all −∞
// (skipped: the causal future, other documents of a packed row) and mixed (read per element).
// Fragments come from shared memory through `ldmatrix` (.trans for the column-major operands).
// Tiles reach shared memory by cp.async, the next block's while this one is computed where
// shared memory holds two (double buffering).
// One block of 4 warps handles 64·MT queries (forward: MT m-tiles of 16 rows a warp) or 64 keys
// (backward: 16 a warp).
// The fragment helpers and constants are in flash_frag.cu, compiled before this file.

// Scores of one 16-row m-tile against a key block, in place: scaled to the log₂ domain, the
// bias added (mixed tiles), −∞ for keys past T or a masked tile; returns nothing, the row maxima
// in mx0 (rows r0) and mx1 (r1), reduced over the row's 4 threads.
__device__ __forceinline__ void scores(float (*s)[4], int code, int r0, int r1, int k0, int T,
                                       float sl, const bf16_t* bb, float& mx0, float& mx1) {
    const int t = threadIdx.x & 3;
    mx0 = -FT_INF;
    mx1 = -FT_INF;
    if (code == TILE_ZERO && k0 + BLK <= T) {
        // The common tile: no bias, every key real (rows past T compute values never stored).
#pragma unroll
        for (int n = 0; n < 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[n][e] *= sl;
                if (e < 2) mx0 = fmaxf(mx0, s[n][e]); else mx1 = fmaxf(mx1, s[n][e]);
            }
        }
    } else {
#pragma unroll
        for (int n = 0; n < 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int row = e < 2 ? r0 : r1;
                const int col = k0 + n * 8 + 2 * t + (e & 1);
                float x = -FT_INF;
                if (code != TILE_MASKED && row < T && col < T) {
                    x = s[n][e] * sl;
                    if (code == TILE_MIXED) x += bf(bb[(long long)row * T + col]) * LOG2E;
                }
                s[n][e] = x;
                if (e < 2) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
            }
        }
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
}

// Forward: o (B, H, T, D) and lse (B, H, T), the log₂-sum-exp₂ of each row's scores in the
// log₂ domain (scores·log₂e), +∞ for a row with every key masked. A block of 4 warps takes
// 64·MT queries, each warp MT m-tiles of 16 rows (m-tile i of warp w: rows 64·i + 16·w..), so
// each k and v fragment read from shared memory serves MT products. Grid (B·H, ⌈T/(64·MT)⌉),
// 128 threads: blocks start in grid order, x fastest, so every head's last query block (the one
// that meets the most keys) starts first and no long block is left for the end of the grid.
template <int D, int MT>
__device__ void flash_fwd(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* bias,
                          const unsigned char* codes, bf16_t* o, float* lse, int T, int H, int KV,
                          int bias_batches, float scale) {
    constexpr int LD = D + 8;
    // Key blocks in STAGES buffers: with two (D = 64, 36 KB), the next block's k and v load
    // (cp.async) while this one is computed; above that the static shared memory holds one.
    constexpr int STAGES = D <= 64 ? 2 : 1;
    __shared__ __align__(16) bf16_t Kbuf[STAGES * BLK * LD];
    __shared__ __align__(16) bf16_t Vbuf[STAGES * BLK * LD];
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
    const int bh = blockIdx.x, b = bh / H, h = bh % H, kvh = h / (H / KV);
    const int qblk = gridDim.y - 1 - blockIdx.y;
    const bf16_t* qb = q + (long long)bh * T * D;
    const bf16_t* kb = k + ((long long)b * KV + kvh) * T * D;
    const bf16_t* vb = v + ((long long)b * KV + kvh) * T * D;
    const bf16_t* bb = bias + (long long)(bias_batches == 1 ? 0 : b) * T * T;
    const int nb = (T + BLK - 1) / BLK;
    const unsigned char* tiles = codes + (long long)(bias_batches == 1 ? 0 : b) * nb * nb;
    // The 64-row query block of m-tile i is qblk·MT + i; one past T has no rows (masked).
    auto code_of = [&](int i, int j) {
        const int qr = qblk * MT + i;
        return qr < nb ? (int)tiles[(long long)qr * nb + j] : TILE_MASKED;
    };
    int r0[MT], r1[MT];
#pragma unroll
    for (int i = 0; i < MT; i++) {
        r0[i] = (qblk * MT + i) * BLK + warp * 16 + g;
        r1[i] = r0[i] + 8;
    }

    // This warp's query rows as A fragments, kept for every key block.
    unsigned qa[MT][D / 16][4];
#pragma unroll
    for (int i = 0; i < MT; i++) {
        const bf16_t* p0 = qb + (long long)min(r0[i], T - 1) * D;
        const bf16_t* p1 = qb + (long long)min(r1[i], T - 1) * D;
#pragma unroll
        for (int kc = 0; kc < D / 16; kc++) {
            const int c = kc * 16 + 2 * t;
            qa[i][kc][0] = r0[i] < T ? ld_pair(p0 + c) : 0u;
            qa[i][kc][1] = r1[i] < T ? ld_pair(p1 + c) : 0u;
            qa[i][kc][2] = r0[i] < T ? ld_pair(p0 + c + 8) : 0u;
            qa[i][kc][3] = r1[i] < T ? ld_pair(p1 + c + 8) : 0u;
        }
    }
    float m0[MT], m1[MT], l0[MT], l1[MT];
    float acc[MT][D / 8][4];
#pragma unroll
    for (int i = 0; i < MT; i++) {
        m0[i] = m1[i] = -FT_INF;
        l0[i] = l1[i] = 0.f;
#pragma unroll
        for (int d = 0; d < D / 8; d++) acc[i][d][0] = acc[i][d][1] = acc[i][d][2] = acc[i][d][3] = 0.f;
    }
    const float sl = scale * LOG2E;
    // Key blocks up to the diagonal of the block's last (real) query block.
    const int nblocks = min(nb, (qblk + 1) * MT);
    // The key blocks this query block meets: those not masked for every m-tile.
    auto next = [&](int j) {
        for (; j < nblocks; j++) {
            bool masked = true;
#pragma unroll
            for (int i = 0; i < MT; i++) masked = masked && code_of(i, j) == TILE_MASKED;
            if (!masked) break;
        }
        return j;
    };
    auto fetch = [&](int j, int stage) {
        load_tile_async<D, LD>(Kbuf + stage * BLK * LD, kb, j * BLK, T);
        load_tile_async<D, LD>(Vbuf + stage * BLK * LD, vb, j * BLK, T);
    };
    int j = next(0), stage = 0;
    if (STAGES == 2 && j < nblocks) fetch(j, 0);
    cp_commit();
    for (; j < nblocks; j = next(j + 1), stage ^= STAGES - 1) {
        const int k0 = j * BLK;
        __syncthreads();  // every thread is done with the buffers about to be refilled
        if (STAGES == 2) {
            const int nj = next(j + 1);
            if (nj < nblocks) fetch(nj, stage ^ 1);
            cp_commit();
            cp_wait<1>();  // all but the group just issued: this block's k and v are here
        } else {
            fetch(j, 0);
            cp_commit();
            cp_wait<0>();
        }
        __syncthreads();
        const bf16_t* Ks = Kbuf + stage * BLK * LD;
        const bf16_t* Vs = Vbuf + stage * BLK * LD;
        float s[MT][8][4];
#pragma unroll
        for (int i = 0; i < MT; i++)
#pragma unroll
            for (int n = 0; n < 8; n++) s[i][n][0] = s[i][n][1] = s[i][n][2] = s[i][n][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < D / 16; kc++) {
#pragma unroll
            for (int n = 0; n < 8; n += 2) {
                unsigned fb[4];
                frag_bt2(fb, Ks, LD, n * 8, kc * 16);
#pragma unroll
                for (int i = 0; i < MT; i++) {
                    mma(s[i][n], qa[i][kc], fb);
                    mma(s[i][n + 1], qa[i][kc], fb + 2);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < MT; i++) {
            float mx0, mx1;
            scores(s[i], code_of(i, j), r0[i], r1[i], k0, T, sl, bb, mx0, mx1);
            const float n0 = fmaxf(m0[i], mx0), n1 = fmaxf(m1[i], mx1);
            // While a row has seen only masked keys its max is −∞: exponents are taken from 0.
            const float base0 = n0 == -FT_INF ? 0.f : n0, base1 = n1 == -FT_INF ? 0.f : n1;
            const float a0 = exp2f(m0[i] - base0), a1 = exp2f(m1[i] - base1);
            m0[i] = n0;
            m1[i] = n1;
            float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
            for (int n = 0; n < 8; n++) {
                s[i][n][0] = exp2f(s[i][n][0] - base0);
                s[i][n][1] = exp2f(s[i][n][1] - base0);
                s[i][n][2] = exp2f(s[i][n][2] - base1);
                s[i][n][3] = exp2f(s[i][n][3] - base1);
                ps0 += s[i][n][0] + s[i][n][1];
                ps1 += s[i][n][2] + s[i][n][3];
            }
            // Each thread keeps its share of the row sums; the 4 threads of a row add them at
            // the end.
            l0[i] = l0[i] * a0 + ps0;
            l1[i] = l1[i] * a1 + ps1;
#pragma unroll
            for (int d = 0; d < D / 8; d++) {
                acc[i][d][0] *= a0;
                acc[i][d][1] *= a0;
                acc[i][d][2] *= a1;
                acc[i][d][3] *= a1;
            }
        }
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            unsigned pa[MT][4];
#pragma unroll
            for (int i = 0; i < MT; i++) acc_to_a(pa[i], s[i], kk);
#pragma unroll
            for (int d = 0; d < D / 8; d += 2) {
                unsigned fb[4];
                frag_b2(fb, Vs, LD, kk * 16, d * 8);
#pragma unroll
                for (int i = 0; i < MT; i++) {
                    mma(acc[i][d], pa[i], fb);
                    mma(acc[i][d + 1], pa[i], fb + 2);
                }
            }
        }
    }
    cp_wait<0>();  // nothing left in flight when no key block was met
    bf16_t* ob = o + (long long)bh * T * D;
#pragma unroll
    for (int i = 0; i < MT; i++) {
        float s0 = l0[i], s1 = l1[i];
        s0 += __shfl_xor_sync(0xffffffffu, s0, 1);
        s0 += __shfl_xor_sync(0xffffffffu, s0, 2);
        s1 += __shfl_xor_sync(0xffffffffu, s1, 1);
        s1 += __shfl_xor_sync(0xffffffffu, s1, 2);
        const float i0 = s0 > 0.f ? 1.f / s0 : 0.f, i1 = s1 > 0.f ? 1.f / s1 : 0.f;
        const int ra = r0[i], rb = r1[i];
#pragma unroll
        for (int d = 0; d < D / 8; d++) {
            const int c = d * 8 + 2 * t;
            if (ra < T) *(unsigned*)(ob + (long long)ra * D + c) = pack(acc[i][d][0] * i0, acc[i][d][1] * i0);
            if (rb < T) *(unsigned*)(ob + (long long)rb * D + c) = pack(acc[i][d][2] * i1, acc[i][d][3] * i1);
        }
        if (t == 0) {
            if (ra < T) lse[(long long)bh * T + ra] = s0 > 0.f ? m0[i] + log2f(s0) : FT_INF;
            if (rb < T) lse[(long long)bh * T + rb] = s1 > 0.f ? m1[i] + log2f(s1) : FT_INF;
        }
    }
}

// Backward: dq (B, H, T, D), dk and dv (B, KV, T, D) accumulated in f32 (zeroed by the caller;
// dq by query blocks, dk/dv by the H/KV heads of a group). `delta` (B, H, T) is Σ_d dO·O per row.
// Grid (B·H, ⌈T/64⌉ key blocks), 128 threads, (2·STAGES + 2)·64·LD + 64·72 bf16 and
// 2·STAGES·64 floats of dynamic shared memory (flash.rs `bwd_shared_bytes`).
template <int D, bool STAGED_DQ>
__device__ void flash_bwd(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* bias,
                          const unsigned char* codes, const bf16_t* dout, const float* lse,
                          const float* delta, float* dq, float* dk, float* dv, int T, int H,
                          int KV, int bias_batches, float scale) {
    constexpr int LD = D + 8, LS = BLK + 8;
    // Query-side tiles in STAGES buffers: with two, the next block's q, dO, lse and δ load
    // (cp.async) while this one is computed. Two need 65.5 KB of shared memory at D = 64, 90 KB
    // at D = 96; D = 128 keeps one (two blocks an SM).
    constexpr int STAGES = D <= 96 ? 2 : 1;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16_t* Qbuf = (bf16_t*)smem;            // STAGES tiles of q
    bf16_t* Obuf = Qbuf + STAGES * BLK * LD;  // of dO
    bf16_t* Ks = Obuf + STAGES * BLK * LD;
    bf16_t* Vs = Ks + BLK * LD;
    bf16_t* Ss = Vs + BLK * LD;  // dSᵀ, key-major
    float* Lbuf = (float*)(Ss + BLK * LS);  // STAGES rows of lse
    float* Dbuf = Lbuf + STAGES * BLK;      // of δ
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bh = blockIdx.x, b = bh / H, h = bh % H, kvh = h / (H / KV);
    const int kblk = blockIdx.y;  // the first key blocks meet the most queries and start first
    const int k0 = kblk * BLK;
    const bf16_t* qb = q + (long long)bh * T * D;
    const bf16_t* ob = dout + (long long)bh * T * D;
    const long long kvoff = ((long long)b * KV + kvh) * T * D;
    const bf16_t* bb = bias + (long long)(bias_batches == 1 ? 0 : b) * T * T;
    const int kr0 = k0 + warp * 16 + g, kr1 = kr0 + 8;  // this thread's two keys
    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int d = 0; d < D / 8; d++)
#pragma unroll
        for (int e = 0; e < 4; e++) dka[d][e] = dva[d][e] = 0.f;
    const float sl = scale * LOG2E;
    const int nq = (T + BLK - 1) / BLK;
    const unsigned char* tiles = codes + (long long)(bias_batches == 1 ? 0 : b) * nq * nq;
    // The query blocks this key block meets: from its own on, the masked tiles skipped.
    auto next = [&](int i) {
        while (i < nq && tiles[(long long)i * nq + kblk] == TILE_MASKED) i++;
        return i;
    };
    auto fetch = [&](int i, int stage) {
        load_tile_async<D, LD>(Qbuf + stage * BLK * LD, qb, i * BLK, T);
        load_tile_async<D, LD>(Obuf + stage * BLK * LD, ob, i * BLK, T);
        load_row_async(Lbuf + stage * BLK, lse + (long long)bh * T, i * BLK, T);
        load_row_async(Dbuf + stage * BLK, delta + (long long)bh * T, i * BLK, T);
    };
    load_tile_async<D, LD>(Ks, k + kvoff, k0, T);
    load_tile_async<D, LD>(Vs, v + kvoff, k0, T);
    int i = next(kblk), stage = 0;
    if (STAGES == 2 && i < nq) fetch(i, 0);
    cp_commit();
    for (; i < nq; i = next(i + 1), stage ^= STAGES - 1) {
        const int q0 = i * BLK;
        const int code = tiles[(long long)i * nq + kblk];
        __syncthreads();  // every thread is done with the buffers about to be refilled
        if (STAGES == 2) {
            const int ni = next(i + 1);
            if (ni < nq) fetch(ni, stage ^ 1);
            cp_commit();
            cp_wait<1>();  // all but the group just issued: this block's tiles are here
        } else {
            fetch(i, 0);
            cp_commit();
            cp_wait<0>();
        }
        __syncthreads();
        const bf16_t* Qs = Qbuf + stage * BLK * LD;
        const bf16_t* Os = Obuf + stage * BLK * LD;
        const float* Ls = Lbuf + stage * BLK;
        const float* Ds = Dbuf + stage * BLK;
        // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for this warp's 16 keys against the 64 queries.
        float s[8][4], dp[8][4];
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
        for (int kc = 0; kc < D / 16; kc++) {
            unsigned ka[4], va[4];
            frag_a(ka, Ks, LD, warp * 16, kc * 16);
            frag_a(va, Vs, LD, warp * 16, kc * 16);
#pragma unroll
            for (int n = 0; n < 8; n += 2) {
                unsigned fb[4];
                frag_bt2(fb, Qs, LD, n * 8, kc * 16);
                mma(s[n], ka, fb);
                mma(s[n + 1], ka, fb + 2);
                frag_bt2(fb, Os, LD, n * 8, kc * 16);
                mma(dp[n], va, fb);
                mma(dp[n + 1], va, fb + 2);
            }
        }
        // Pᵀ from the kept log-sum-exp, then dSᵀ = Pᵀ ⊙ (dPᵀ − δ)·scale.
#pragma unroll
        for (int n = 0; n < 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = e < 2 ? kr0 : kr1;
                const int ql = n * 8 + 2 * t + (e & 1);
                const int qr = q0 + ql;
                float p = 0.f;
                if (qr < T && key < T) {
                    float x = s[n][e] * sl;
                    if (code == TILE_MIXED) x += bf(bb[(long long)qr * T + key]) * LOG2E;
                    p = exp2f(x - Ls[ql]);
                }
                s[n][e] = p;
                dp[n][e] = p * (dp[n][e] - Ds[ql]) * scale;
            }
        }
        // dV += Pᵀ·dO, dK += dSᵀ·Q (16 keys × D each).
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            unsigned pa[4], da[4];
            acc_to_a(pa, s, kk);
            acc_to_a(da, dp, kk);
#pragma unroll
            for (int d = 0; d < D / 8; d += 2) {
                unsigned fb[4];
                frag_b2(fb, Os, LD, kk * 16, d * 8);
                mma(dva[d], pa, fb);
                mma(dva[d + 1], pa, fb + 2);
                frag_b2(fb, Qs, LD, kk * 16, d * 8);
                mma(dka[d], da, fb);
                mma(dka[d + 1], da, fb + 2);
            }
        }
        // dSᵀ (key-major, as the accumulators hold it) for dQ = dS·K over the block's 64 keys.
#pragma unroll
        for (int n = 0; n < 8; n++) {
            const int kl = warp * 16 + g, ql = n * 8 + 2 * t;
            *(unsigned*)(Ss + kl * LS + ql) = pack(dp[n][0], dp[n][1]);
            *(unsigned*)(Ss + (kl + 8) * LS + ql) = pack(dp[n][2], dp[n][3]);
        }
        __syncthreads();
        float dqa[D / 8][4];
#pragma unroll
        for (int d = 0; d < D / 8; d++) dqa[d][0] = dqa[d][1] = dqa[d][2] = dqa[d][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            unsigned sa[4];
            frag_a_t(sa, Ss, LS, warp * 16, kk * 16);
#pragma unroll
            for (int d = 0; d < D / 8; d += 2) {
                unsigned fb[4];
                frag_b2(fb, Ks, LD, kk * 16, d * 8);
                mma(dqa[d], sa, fb);
                mma(dqa[d + 1], sa, fb + 2);
            }
        }
        const int qa0 = q0 + warp * 16 + g, qa1 = qa0 + 8;
        float* dqb = dq + (long long)bh * T * D;
        if (STAGED_DQ) {
            // This warp's 16 × D of dQ through shared memory, then added a row at a time: each
            // atomic instruction covers 32 consecutive floats (whole 32-byte sectors) instead of
            // 8 rows × 4 scattered ones. The space: this stage's q tile (warps 0, 1) or dO tile
            // (2, 3), 32 rows × (D + 8) floats each, free since the barrier above (every warp
            // is done with dK and dV); the next fetch into it comes after the loop's barrier.
            constexpr int LQ = D + 8;
            float* stg = (float*)(warp < 2 ? Qbuf + stage * BLK * LD : Obuf + stage * BLK * LD) +
                         (warp & 1) * 16 * LQ;
#pragma unroll
            for (int d = 0; d < D / 8; d++) {
                const int c = d * 8 + 2 * t;
                *(float2*)(stg + g * LQ + c) = make_float2(dqa[d][0], dqa[d][1]);
                *(float2*)(stg + (g + 8) * LQ + c) = make_float2(dqa[d][2], dqa[d][3]);
            }
            __syncwarp();
#if __CUDA_ARCH__ >= 900
            // Four consecutive floats a lane, one vector reduction each: a warp instruction
            // covers 128 floats of the warp's 16 rows (two rows at D = 64).
#pragma unroll
            for (int e = lane * 4; e < 16 * D; e += 128) {
                const int r = e / D, c = e % D;
                const int qr = q0 + warp * 16 + r;
                if (qr < T) {
                    const float4 x = *(const float4*)(stg + r * LQ + c);
                    red4(dqb + (long long)qr * D + c, x.x, x.y, x.z, x.w);
                }
            }
#else
            // A row at a time, 32 consecutive floats an atomic instruction.
            for (int r = 0; r < 16; r++) {
                const int qr = q0 + warp * 16 + r;
                if (qr >= T) break;
#pragma unroll
                for (int c = lane; c < D; c += 32) atomicAdd(dqb + (long long)qr * D + c, stg[r * LQ + c]);
            }
#endif
        } else {
#pragma unroll
            for (int d = 0; d < D / 8; d++) {
                const int c = d * 8 + 2 * t;
                if (qa0 < T) {
                    atomicAdd(dqb + (long long)qa0 * D + c, dqa[d][0]);
                    atomicAdd(dqb + (long long)qa0 * D + c + 1, dqa[d][1]);
                }
                if (qa1 < T) {
                    atomicAdd(dqb + (long long)qa1 * D + c, dqa[d][2]);
                    atomicAdd(dqb + (long long)qa1 * D + c + 1, dqa[d][3]);
                }
            }
        }
    }
    cp_wait<0>();  // nothing left in flight when no query block was met
#pragma unroll
    for (int d = 0; d < D / 8; d++) {
        const int c = d * 8 + 2 * t;
        if (kr0 < T) {
            atomicAdd(dk + kvoff + (long long)kr0 * D + c, dka[d][0]);
            atomicAdd(dk + kvoff + (long long)kr0 * D + c + 1, dka[d][1]);
            atomicAdd(dv + kvoff + (long long)kr0 * D + c, dva[d][0]);
            atomicAdd(dv + kvoff + (long long)kr0 * D + c + 1, dva[d][1]);
        }
        if (kr1 < T) {
            atomicAdd(dk + kvoff + (long long)kr1 * D + c, dka[d][2]);
            atomicAdd(dk + kvoff + (long long)kr1 * D + c + 1, dka[d][3]);
            atomicAdd(dv + kvoff + (long long)kr1 * D + c, dva[d][2]);
            atomicAdd(dv + kvoff + (long long)kr1 * D + c + 1, dva[d][3]);
        }
    }
}

// The code of each 64×64 tile of the bias (R, 1, T, T): TILE_ZERO when every entry is ±0,
// TILE_MASKED when every entry is −∞, else TILE_MIXED; cells past T count for neither. codes
// (R, nb, nb) by [bias batch][query block][key block]. Tiles wholly after the diagonal are masked
// by the contract and not read. Grid (nb, nb, R), 256 threads.
extern "C" __global__ void ft_flash_tiles(const bf16_t* bias, unsigned char* codes, int T) {
    const int kb = blockIdx.x, qb = blockIdx.y, r = blockIdx.z, nb = gridDim.x;
    unsigned char* out = codes + ((long long)r * nb + qb) * nb + kb;
    if (kb > qb) {
        if (threadIdx.x == 0) *out = TILE_MASKED;
        return;
    }
    const bf16_t* base = bias + (long long)r * T * T;
    int zero = 1, masked = 1;
    for (int i = threadIdx.x; i < BLK * BLK; i += blockDim.x) {
        const int row = qb * BLK + i / BLK, col = kb * BLK + i % BLK;
        if (row < T && col < T) {
            const unsigned x = base[(long long)row * T + col];
            zero &= (x & 0x7fffu) == 0u;
            masked &= x == 0xff80u;
        }
    }
    zero = __syncthreads_and(zero);
    masked = __syncthreads_and(masked);
    if (threadIdx.x == 0) *out = zero ? TILE_ZERO : masked ? TILE_MASKED : TILE_MIXED;
}

// δ = Σ_d dO·O per row of `rows` rows of D: one warp per row, 8 rows per block of 256 threads.
extern "C" __global__ void ft_flash_delta(const bf16_t* o, const bf16_t* dout, float* delta,
                                          long long rows, int D) {
    const long long row = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    float sum = 0.f;
    for (int d = lane; d < D; d += 32) sum += bf(o[row * D + d]) * bf(dout[row * D + d]);
    for (int s = 16; s > 0; s >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, s);
    if (lane == 0) delta[row] = sum;
}

// The backward's dQ, dK and dV (f32, accumulated by atomics) as bf16, the three in one launch
// (blockIdx.y picks one), four elements a thread: lengths `n4` in fours (flash.rs checks they
// divide), rounded to nearest even as Candle's cast rounds.
extern "C" __global__ void ft_flash_cast3(const float4* a, uint2* ao, long long na,
                                          const float4* b, uint2* bo, long long nb,
                                          const float4* c, uint2* co, long long nc) {
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const float4* s = blockIdx.y == 0 ? a : (blockIdx.y == 1 ? b : c);
    uint2* d = blockIdx.y == 0 ? ao : (blockIdx.y == 1 ? bo : co);
    const long long n = blockIdx.y == 0 ? na : (blockIdx.y == 1 ? nb : nc);
    if (k >= n) return;
    const float4 v = s[k];
    uint2 r;
    r.x = pack(v.x, v.y);
    r.y = pack(v.z, v.w);
    d[k] = r;
}

#define FT_FLASH(D, MT, B, BB)                                                                    \
    extern "C" __global__ void __launch_bounds__(128, B) ft_flash_fwd_##D(                        \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* bias,                  \
        const unsigned char* codes, bf16_t* o, float* lse, int T, int H, int KV,                \
        int bias_batches, float scale) {                                                         \
        flash_fwd<D, MT>(q, k, v, bias, codes, o, lse, T, H, KV, bias_batches, scale);          \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(128, BB) ft_flash_bwd_##D(                      \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* bias,                  \
        const unsigned char* codes, const bf16_t* dout, const float* lse, const float* delta,   \
        float* dq, float* dk, float* dv, int T, int H, int KV, int bias_batches, float scale) { \
        flash_bwd<D, true>(q, k, v, bias, codes, dout, lse, delta, dq, dk, dv, T, H, KV,        \
                           bias_batches, scale);                                                 \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(128, BB) ft_flash_bwd_scattered_##D(            \
        const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* bias,                  \
        const unsigned char* codes, const bf16_t* dout, const float* lse, const float* delta,   \
        float* dq, float* dk, float* dv, int T, int H, int KV, int bias_batches, float scale) { \
        flash_bwd<D, false>(q, k, v, bias, codes, dout, lse, delta, dq, dk, dv, T, H, KV,       \
                            bias_batches, scale);                                                \
    }

// Forward m-tiles a warp (MT: 128 queries a block at D = 64, 64 above; flash.rs
// `fwd_block_rows` follows), and blocks an SM (the fewest the registers are held to), forward
// and backward: forward two at D = 64 (MT = 2), three at D = 96, two at D = 128, without spills;
// backward three at D = 64 (168 registers, 8 bytes spilled; 228 and two blocks unbounded), one
// above (bounds there spill hundreds of bytes).
FT_FLASH(64, 2, 2, 3)
FT_FLASH(96, 1, 3, 1)
FT_FLASH(128, 1, 2, 1)

// D = 64 with 64 queries a block (one m-tile a warp, three blocks an SM): the forward before
// MT, kept to compare (`FINETUNE_CUDA_FLASH_FWD_ROWS=64`).
extern "C" __global__ void __launch_bounds__(128, 3) ft_flash_fwd_64_rows64(
    const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* bias,
    const unsigned char* codes, bf16_t* o, float* lse, int T, int H, int KV, int bias_batches,
    float scale) {
    flash_fwd<64, 1>(q, k, v, bias, codes, o, lse, T, H, KV, bias_batches, scale);
}
