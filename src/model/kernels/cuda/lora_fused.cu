// The LoRA op's skinny product and the split of its result in one kernel (lora_fused.rs; compiled
// after flash_frag.cu as one NVRTC program, for compute_80). lora_split.rs makes the (N, r) f32
// middle of a LoRA product as three part-products side by side, P (N, 3r) = X · Bop, on
// tensor cores, then splits scale · ((P₂ + P₁) + P₀) into bf16 hi, mid and lo parts in a second
// launch. Here a block of 4 warps takes 16 rows of X (one m-tile): each warp a quarter of the
// 16-wide k-steps (k-step w, w + 4, ...), its fragments loaded straight from global memory,
// several k-steps in flight; the four partial P tiles are added in shared memory in warp order,
// and the block splits its rows from there: no (N, 3r) f32 tensor, one launch instead of two.
// A skinny product reads X once and is bound by the loads in flight: a warp per 16 rows and K
// kept whole (the first version, 32 rows a block through a cp.async pipeline) left two warps
// an SM at 4096 rows and ran at a third of the bandwidth.
//
// X (rows, K) bf16, rows ldx apart. Bop, (K, 3r): NN = false, the transpose of B3 (3r, K) stored
// row-major with rows ldb apart (the forward's x·Aᵀ from A's split); NN = true, B (K, ≥ 3r)
// row-major with rows ldb apart (the backward's g·B from B's split). out (rows, 6r) bf16: copy j
// (columns j·r..) holds part (pattern >> 2j) & 3 (0 hi, 1 mid, 2 lo), as ft_split_parts writes
// it. NP: 16-column groups of P computed (3r ≤ 16·NP; columns past 3r are zeros, unused). The
// caller checks that K, ldx and ldb are even and the pointers 4-byte aligned (pairs of bf16 are
// read as one 32-bit word).

#define LF_WARPS 4

// v rounded to bf16 (nearest even, NaN kept), as kernels.cu's `st` rounds.
__device__ __forceinline__ bf16_t lf_round(float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

template <int NP, bool NN>
__device__ void lora_down_split(const bf16_t* x, long long ldx, const bf16_t* bm, long long ldb,
                                bf16_t* out, int rows, int K, int r, float scale, int pattern) {
    constexpr int NC = 16 * NP;  // P's columns computed
    constexpr int LP = NC + 4;
    // k-steps loaded before their products: fewer for wide P (registers).
    constexpr int U = NP <= 4 ? 4 : NP <= 8 ? 2 : 1;
    __shared__ float P[16 * LP];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * 16;
    const int n3 = 3 * r;
    const int ra = row0 + g, rb = ra + 8;
    const bf16_t* xa = x + (long long)min(ra, rows - 1) * ldx;
    const bf16_t* xb = x + (long long)min(rb, rows - 1) * ldx;
    // Bop[k][n] and Bop[k + 1][n] as one pair (zeros past K or 3r).
    auto bpair = [&](int k, int n) -> unsigned {
        if (n >= n3 || k >= K) return 0u;
        if (NN) {
            const unsigned lo = bm[(long long)k * ldb + n];
            const unsigned hi = k + 1 < K ? (unsigned)bm[(long long)(k + 1) * ldb + n] : 0u;
            return lo | (hi << 16);
        }
        return ld_pair(bm + (long long)n * ldb + k);
    };
    auto xpair = [&](const bf16_t* p, bool in, int k) -> unsigned {
        return in && k < K ? ld_pair(p + k) : 0u;
    };
    float acc[2 * NP][4];
#pragma unroll
    for (int n = 0; n < 2 * NP; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    const int steps = (K + 15) / 16;
    for (int s0 = warp * U; s0 < steps; s0 += LF_WARPS * U) {
        unsigned a[U][4], b[U][2 * NP][2];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int k = (s0 + u) * 16 + 2 * t;  // past K when s0 + u ≥ steps: zeros
            a[u][0] = xpair(xa, ra < rows, k);
            a[u][1] = xpair(xb, rb < rows, k);
            a[u][2] = xpair(xa, ra < rows, k + 8);
            a[u][3] = xpair(xb, rb < rows, k + 8);
#pragma unroll
            for (int n = 0; n < 2 * NP; n++) {
                b[u][n][0] = bpair(k, n * 8 + g);
                b[u][n][1] = bpair(k + 8, n * 8 + g);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int n = 0; n < 2 * NP; n++) mma(acc[n], a[u], b[u][n]);
    }
    // The four warps' tiles added in shared memory, warp 0 first.
    for (int w = 0; w < LF_WARPS; w++) {
        if (warp == w) {
#pragma unroll
            for (int n = 0; n < 2 * NP; n++) {
                const int c = n * 8 + 2 * t;
                float* p0 = P + g * LP + c;
                float* p1 = P + (g + 8) * LP + c;
                if (w == 0) {
                    p0[0] = acc[n][0];
                    p0[1] = acc[n][1];
                    p1[0] = acc[n][2];
                    p1[1] = acc[n][3];
                } else {
                    p0[0] += acc[n][0];
                    p0[1] += acc[n][1];
                    p1[0] += acc[n][2];
                    p1[1] += acc[n][3];
                }
            }
        }
        __syncthreads();
    }
    for (int e = threadIdx.x; e < 16 * r; e += blockDim.x) {
        const int u = e / r, v = e % r;
        if (row0 + u >= rows) break;  // e grows with u
        const float* p = P + u * LP + v;
        const float s = ((p[2 * r] + p[r]) + p[0]) * scale;  // as ft_split_parts adds them
        bf16_t part[3];
        float rest = s;
#pragma unroll
        for (int q = 0; q < 3; q++) {
            part[q] = lf_round(rest);
            rest -= __uint_as_float(((unsigned)part[q]) << 16);
        }
        bf16_t* o = out + (long long)(row0 + u) * 6 * r + v;
#pragma unroll
        for (int j = 0; j < 6; j++) o[j * r] = part[(pattern >> (2 * j)) & 3];
    }
}

#define FT_LORA_DOWN(NP)                                                                          \
    extern "C" __global__ void __launch_bounds__(128) ft_lora_down_nt_##NP(                        \
        const bf16_t* x, long long ldx, const bf16_t* b, long long ldb, bf16_t* out, int rows,   \
        int K, int r, float scale, int pattern) {                                                 \
        lora_down_split<NP, false>(x, ldx, b, ldb, out, rows, K, r, scale, pattern);             \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(128) ft_lora_down_nn_##NP(                        \
        const bf16_t* x, long long ldx, const bf16_t* b, long long ldb, bf16_t* out, int rows,   \
        int K, int r, float scale, int pattern) {                                                 \
        lora_down_split<NP, true>(x, ldx, b, ldb, out, rows, K, r, scale, pattern);              \
    }
FT_LORA_DOWN(1)
FT_LORA_DOWN(2)
FT_LORA_DOWN(3)
FT_LORA_DOWN(4)
FT_LORA_DOWN(6)
FT_LORA_DOWN(8)
FT_LORA_DOWN(12)
