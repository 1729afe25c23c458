// FineTune's CUDA kernels, compiled at run time with NVRTC (src/model/cuda.rs), so building with
// the `cuda` feature needs no extra toolkit step. No headers: bf16 is handled as its raw 16 bits.
// Every kernel works on contiguous rows, one block per row (or one thread per element pair for
// RoPE), computes in f32 and rounds once on store.

typedef unsigned short bf16_t;
#define FT_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t* p, long long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t* p, long long i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
        p[i] = (bf16_t)0x7fc0;
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    p[i] = (bf16_t)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide reductions; every thread gets the result. `sh` holds 32 floats.
__device__ float block_sum(float v, float* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = (int)threadIdx.x < nw ? sh[threadIdx.x] : 0.f;
    if (w == 0) v = warp_sum(v);
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    return sh[0];
}
__device__ float block_max(float v, float* sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = (int)threadIdx.x < nw ? sh[threadIdx.x] : -FT_INF;
    if (w == 0) v = warp_max(v);
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    return sh[0];
}

// Attention probabilities: p = softmax(s·scale + bias) over each row of `cols`. `s` is
// (B, H, T, cols) as B·H·T rows; `bias` is (R, 1, T, cols) with R = 1 (shared) or B. A row with
// every entry masked (−∞) gives zeros.
template <typename T>
__device__ void softmax_fwd(const T* s, const T* bias, T* p, int cols, int rows_per_batch,
                            int t_len, int bias_batches, float scale) {
    __shared__ float sh[32];
    long long row = blockIdx.x;
    int b = (int)(row / rows_per_batch);
    int t = (int)(row % t_len);
    const long long off = row * cols;
    const long long boff = ((long long)(bias_batches == 1 ? 0 : b) * t_len + t) * cols;
    float m = -FT_INF;
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        m = fmaxf(m, ld(s, off + j) * scale + ld(bias, boff + j));
    m = block_max(m, sh);
    float sum = 0.f;
    if (m != -FT_INF)
        for (int j = threadIdx.x; j < cols; j += blockDim.x)
            sum += __expf(ld(s, off + j) * scale + ld(bias, boff + j) - m);
    sum = block_sum(sum, sh);
    float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float v = m == -FT_INF ? 0.f : __expf(ld(s, off + j) * scale + ld(bias, boff + j) - m);
        st(p, off + j, v * inv);
    }
}

// Gradient of the unscaled scores: ds = scale · p ⊙ (dp − Σ p⊙dp).
template <typename T>
__device__ void softmax_bwd(const T* p, const T* dp, T* ds, int cols, float scale) {
    __shared__ float sh[32];
    const long long off = (long long)blockIdx.x * cols;
    float dot = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) dot += ld(p, off + j) * ld(dp, off + j);
    dot = block_sum(dot, sh);
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        st(ds, off + j, scale * ld(p, off + j) * (ld(dp, off + j) - dot));
}

// The elements of one row, `f(j, value)` for each j this thread owns: 16 bytes a load where the
// row allows (cols a multiple of the unit and the row 16-byte aligned), else one at a time.
__device__ __forceinline__ void unpack16(const float* p, float* v) {
    const float4 u = *(const float4*)p;
    v[0] = u.x, v[1] = u.y, v[2] = u.z, v[3] = u.w;
}
__device__ __forceinline__ void unpack16(const bf16_t* p, float* v) {
    const uint4 u = *(const uint4*)p;
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        v[2 * k] = __uint_as_float(w[k] << 16);
        v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}
template <typename T, typename F>
__device__ __forceinline__ void for_row(const T* row, int cols, F f) {
    constexpr int N = 16 / sizeof(T);
    if (cols % N == 0 && ((unsigned long long)row & 15) == 0) {
        for (int u = threadIdx.x; u < cols / N; u += blockDim.x) {
            float v[N];
            unpack16(row + u * N, v);
#pragma unroll
            for (int k = 0; k < N; k++) f(u * N + k, v[k]);
        }
    } else {
        for (int j = threadIdx.x; j < cols; j += blockDim.x) f(j, ld(row, j));
    }
}

// Per-row cross-entropy: loss[row] = logsumexp(x[row]) − x[row, target[row]]; the max and the
// sum in one pass over the row (each thread rescales its sum when its max grows).
template <typename T>
__device__ void ce_fwd(const T* x, const unsigned int* target, float* loss, int cols) {
    __shared__ float sh[32];
    const T* row = x + (long long)blockIdx.x * cols;
    float m = -FT_INF, sum = 0.f;
    for_row(row, cols, [&](int, float v) {
        if (v > m) {
            sum = sum * __expf(m - v) + 1.f;
            m = v;
        } else if (m != -FT_INF) {
            sum += __expf(v - m);
        }
    });
    const float top = block_max(m, sh);
    sum = block_sum(m == -FT_INF ? 0.f : sum * __expf(m - top), sh);
    if (threadIdx.x == 0) loss[blockIdx.x] = logf(sum) + top - ld(row, target[blockIdx.x]);
}

// Eight (bf16) or four (f32) values stored as 16 bytes, each rounded as `st` rounds it.
__device__ __forceinline__ void pack16(float* p, const float* v) {
    *(float4*)p = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void pack16(bf16_t* p, const float* v) {
    bf16_t h[8];
#pragma unroll
    for (int k = 0; k < 8; k++) st(h, k, v[k]);
    uint4 u;
    u.x = h[0] | ((unsigned)h[1] << 16);
    u.y = h[2] | ((unsigned)h[3] << 16);
    u.z = h[4] | ((unsigned)h[5] << 16);
    u.w = h[6] | ((unsigned)h[7] << 16);
    *(uint4*)p = u;
}

// dx = (softmax(x) − onehot(target)) · g[row], the log-sum-exp taken back from the forward's
// loss (lse = loss + x[target]): one read of the row and one write, 16 bytes at a time where
// both rows allow.
template <typename T>
__device__ void ce_bwd(const T* x, const unsigned int* target, const float* loss, const float* g,
                       T* dx, int cols) {
    constexpr int N = 16 / sizeof(T);
    const long long off = (long long)blockIdx.x * cols;
    const int tg = (int)target[blockIdx.x];
    const float lse = loss[blockIdx.x] + ld(x, off + tg), gr = g[blockIdx.x];
    const T* row = x + off;
    T* out = dx + off;
    if (cols % N == 0 && (((unsigned long long)row | (unsigned long long)out) & 15) == 0) {
        for (int u = threadIdx.x; u < cols / N; u += blockDim.x) {
            float v[N];
            unpack16(row + u * N, v);
#pragma unroll
            for (int k = 0; k < N; k++) v[k] = (__expf(v[k] - lse) - (u * N + k == tg ? 1.f : 0.f)) * gr;
            pack16(out + u * N, v);
        }
    } else {
        for (int j = threadIdx.x; j < cols; j += blockDim.x)
            st(out, j, (__expf(ld(row, j) - lse) - (j == tg ? 1.f : 0.f)) * gr);
    }
}

// Whether 16-byte accesses at these addresses are aligned.
__device__ __forceinline__ bool aligned16(const void* a, const void* b, const void* c) {
    return (((unsigned long long)a | (unsigned long long)b | (unsigned long long)c) & 15) == 0;
}

// RMSNorm with a frozen weight: y = x · r · w, r = 1/√(mean(x²) + eps). One warp per row (8 rows
// a block of 256): each lane sums its part of the row and the warp adds them, with no shared
// memory or block barrier; 16 bytes at a time where the row allows (`vec`: cols a multiple of
// the unit, every address aligned), else one element.
template <typename T>
__device__ __forceinline__ bool rms_vec(int cols, const void* a, const void* b, const void* c,
                                        const void* d) {
    return cols % (16 / sizeof(T)) == 0 && aligned16(a, b, c) && aligned16(d, d, d);
}
template <typename T>
__device__ void rms_fwd(const T* x, const T* w, T* y, long long rows, int cols, float eps) {
    constexpr int N = 16 / sizeof(T);
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const T* xr = x + row * cols;
    T* yr = y + row * cols;
    const bool vec = rms_vec<T>(cols, xr, w, yr, yr);
    float ss = 0.f;
    if (vec) {
        for (int u = lane; u < cols / N; u += 32) {
            float v[N];
            unpack16(xr + u * N, v);
#pragma unroll
            for (int k = 0; k < N; k++) ss += v[k] * v[k];
        }
    } else {
        for (int j = lane; j < cols; j += 32) ss += ld(xr, j) * ld(xr, j);
    }
    const float r = rsqrtf(warp_sum(ss) / cols + eps);
    if (vec) {
        for (int u = lane; u < cols / N; u += 32) {
            float v[N], wv[N];
            unpack16(xr + u * N, v);
            unpack16(w + u * N, wv);
#pragma unroll
            for (int k = 0; k < N; k++) v[k] = v[k] * r * wv[k];
            pack16(yr + u * N, v);
        }
    } else {
        for (int j = lane; j < cols; j += 32) st(yr, j, ld(xr, j) * r * ld(w, j));
    }
}

// Unit u (16 bytes of elements) of a row of x, of w and of a row of g, as floats.
template <typename T>
__device__ __forceinline__ void unpack_unit(const T* xr, const T* w, const T* gr, int u, float* v,
                                            float* wv, float* gv) {
    constexpr int N = 16 / sizeof(T);
    unpack16(xr + u * N, v);
    unpack16(w + u * N, wv);
    unpack16(gr + u * N, gv);
}

// Its input gradient: dx = r·(g⊙w) − x·r³·mean(g⊙w⊙x), a warp per row as the forward.
template <typename T>
__device__ void rms_bwd(const T* x, const T* w, const T* g, T* dx, long long rows, int cols,
                        float eps) {
    constexpr int N = 16 / sizeof(T);
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const T* xr = x + row * cols;
    const T* gr = g + row * cols;
    T* dr = dx + row * cols;
    const bool vec = rms_vec<T>(cols, xr, w, gr, dr);
    float ss = 0.f, dot = 0.f;
    if (vec) {
        for (int u = lane; u < cols / N; u += 32) {
            float v[N], wv[N], gv[N];
            unpack_unit(xr, w, gr, u, v, wv, gv);
#pragma unroll
            for (int k = 0; k < N; k++) {
                ss += v[k] * v[k];
                dot += gv[k] * wv[k] * v[k];
            }
        }
    } else {
        for (int j = lane; j < cols; j += 32) {
            const float v = ld(xr, j);
            ss += v * v;
            dot += ld(gr, j) * ld(w, j) * v;
        }
    }
    ss = warp_sum(ss);
    dot = warp_sum(dot);
    const float r = rsqrtf(ss / cols + eps);
    const float k = r * r * r * dot / cols;
    if (vec) {
        for (int u = lane; u < cols / N; u += 32) {
            float v[N], wv[N], gv[N];
            unpack_unit(xr, w, gr, u, v, wv, gv);
#pragma unroll
            for (int q = 0; q < N; q++) v[q] = r * gv[q] * wv[q] - v[q] * k;
            pack16(dr + u * N, v);
        }
    } else {
        for (int j = lane; j < cols; j += 32) st(dr, j, r * ld(gr, j) * ld(w, j) - ld(xr, j) * k);
    }
}

// One rotated pair: (x1, x2) by the angle whose cosine is c and (signed) sine s.
__device__ __forceinline__ void rot(float x1, float x2, float c, float s, float& y1, float& y2) {
    y1 = x1 * c - x2 * s;
    y2 = x2 * c + x1 * s;
}

// RoPE, rotate-half convention, on x (B, H, T, Dh) with cos/sin tables (Bc, T, Dh) (Bc = 1 or B,
// halves repeated as transformers builds them). `sign` = −1 applies the inverse rotation
// (the backward). `in_bthd` / `out_bthd` = 1 read / write the rows in (B, T, H, Dh) order instead:
// the head transpose done by the same pass. One thread per `per` consecutive pairs of a row
// (`threads` of them): with `per` = 16 bytes of elements (8 bf16, 4 f32) and aligned addresses,
// 16-byte loads and stores, else one pair at a time.
template <typename T>
__device__ void rope(const T* x, const T* cos, const T* sin, T* y, long long threads, int per,
                     int d, int heads, int t_len, int table_batches, float sign, int in_bthd,
                     int out_bthd) {
    constexpr int N = 16 / sizeof(T);
    long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= threads) return;
    const int half = d / 2;
    const long long p0 = k * per;
    const long long row = p0 / half;  // in (B, H, T) order
    const int i = (int)(p0 % half);
    const int t = (int)(row % t_len);
    const int h = (int)((row / t_len) % heads);
    const int b = (int)(row / ((long long)heads * t_len));
    const long long bthd = ((long long)b * t_len + t) * heads + h;
    const long long ri = in_bthd ? bthd : row, ro = out_bthd ? bthd : row;
    const long long toff = ((long long)(table_batches == 1 ? 0 : b) * t_len + t) * d + i;
    const T* xa = x + ri * d + i;
    T* ya = y + ro * d + i;
    if (per == N && aligned16(xa, xa + half, ya) && aligned16(ya + half, cos + toff, sin + toff)) {
        float c[N], s[N], a[N], bb[N], oa[N], ob[N];
        unpack16(cos + toff, c);
        unpack16(sin + toff, s);
        unpack16(xa, a);
        unpack16(xa + half, bb);
#pragma unroll
        for (int j = 0; j < N; j++) rot(a[j], bb[j], c[j], sign * s[j], oa[j], ob[j]);
        pack16(ya, oa);
        pack16(ya + half, ob);
        return;
    }
    for (int j = 0; j < per; j++) {
        float o1, o2;
        rot(ld(xa, j), ld(xa, j + half), ld(cos, toff + j), sign * ld(sin, toff + j), o1, o2);
        st(ya, j, o1);
        st(ya, j + half, o2);
    }
}

// out = y + bias for y (N, cols) and bias (cols), in f32 and rounded once (the correctly rounded
// sum of the two values, as Candle's add). One thread per 16 bytes of elements (8 bf16 or 4 f32:
// N) where they are aligned and inside one row; the grid covers ⌈n / N⌉ threads.
template <typename T>
__device__ void add_bias(const T* y, const T* bias, T* out, long long n, int cols) {
    constexpr int N = 16 / sizeof(T);
    const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (i0 >= n) return;
    const int c0 = (int)(i0 % cols);
    if (i0 + N <= n && c0 + N <= cols && aligned16(y + i0, bias + c0, out + i0)) {
        float x[N], b[N];
        unpack16(y + i0, x);
        unpack16(bias + c0, b);
#pragma unroll
        for (int k = 0; k < N; k++) x[k] += b[k];
        pack16(out + i0, x);
        return;
    }
    for (long long i = i0; i < i0 + N && i < n; i++) st(out, i, ld(y, i) + ld(bias, i % cols));
}

// out = a + b for two tensors of n elements, in f32 and rounded once (as Candle's add): the
// residual adds and the backward's gradient sums. One thread per 16 bytes of elements where
// aligned; the grid covers ⌈n / N⌉ threads.
template <typename T>
__device__ void add_pair(const T* a, const T* b, T* out, long long n) {
    constexpr int N = 16 / sizeof(T);
    const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (i0 >= n) return;
    if (i0 + N <= n && aligned16(a + i0, b + i0, out + i0)) {
        float x[N], y[N];
        unpack16(a + i0, x);
        unpack16(b + i0, y);
#pragma unroll
        for (int k = 0; k < N; k++) x[k] += y[k];
        pack16(out + i0, x);
        return;
    }
    for (long long i = i0; i < i0 + N && i < n; i++) st(out, i, ld(a, i) + ld(b, i));
}

// SwiGLU: a = silu(g) · u, silu(g) = g·σ(g). One thread per 16 bytes of elements (8 bf16 or 4
// f32: N), loaded and stored whole where aligned; the grid covers ⌈n / N⌉ threads.
template <typename T>
__device__ void swiglu_fwd(const T* g, const T* u, T* a, long long n) {
    constexpr int N = 16 / sizeof(T);
    const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (i0 >= n) return;
    if (i0 + N <= n && aligned16(g + i0, u + i0, a + i0)) {
        float x[N], y[N];
        unpack16(g + i0, x);
        unpack16(u + i0, y);
#pragma unroll
        for (int k = 0; k < N; k++) x[k] = x[k] / (1.f + __expf(-x[k])) * y[k];
        pack16(a + i0, x);
        return;
    }
    for (long long i = i0; i < i0 + N && i < n; i++) {
        const float x = ld(g, i);
        st(a, i, x / (1.f + __expf(-x)) * ld(u, i));
    }
}

// Its gradients, written as [dg; du] into `d` (2·n): dg = da·u·σ(g)·(1 + g·(1 − σ(g))),
// du = da·silu(g). Threads as in `swiglu_fwd`.
template <typename T>
__device__ void swiglu_bwd(const T* g, const T* u, const T* da, T* d, long long n) {
    constexpr int N = 16 / sizeof(T);
    const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * N;
    if (i0 >= n) return;
    if (i0 + N <= n && aligned16(g + i0, u + i0, da + i0) && aligned16(d + i0, d + n + i0, d)) {
        float x[N], up[N], gr[N], dg[N];
        unpack16(g + i0, x);
        unpack16(u + i0, up);
        unpack16(da + i0, gr);
#pragma unroll
        for (int k = 0; k < N; k++) {
            const float sg = 1.f / (1.f + __expf(-x[k]));
            dg[k] = gr[k] * up[k] * sg * (1.f + x[k] * (1.f - sg));
            up[k] = gr[k] * x[k] * sg;
        }
        pack16(d + i0, dg);
        pack16(d + n + i0, up);
        return;
    }
    for (long long i = i0; i < i0 + N && i < n; i++) {
        const float x = ld(g, i), up = ld(u, i), gr = ld(da, i);
        const float sg = 1.f / (1.f + __expf(-x));
        st(d, i, gr * up * sg * (1.f + x * (1.f - sg)));
        st(d, n + i, gr * x * sg);
    }
}

// The frozen output plus the scaled f32 LoRA update, rounded once: out = y + s·u (`ft_add_into`:
// in place, y += s·u; each thread reads and writes its own element).
template <typename T>
__device__ void add_scaled(const T* y, const float* u, T* out, long long n, float s) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    st(out, i, ld(y, i) + s * u[i]);
}

#define FOR_TYPES(M) M(bf16, bf16_t) M(f32, float)

#define SOFTMAX(N, T)                                                                          \
    extern "C" __global__ void ft_softmax_fwd_##N(const T* s, const T* bias, T* p, int cols,   \
                                                  int rows_per_batch, int t_len,              \
                                                  int bias_batches, float scale) {            \
        softmax_fwd<T>(s, bias, p, cols, rows_per_batch, t_len, bias_batches, scale);        \
    }                                                                                          \
    extern "C" __global__ void ft_softmax_bwd_##N(const T* p, const T* dp, T* ds, int cols,    \
                                                  float scale) {                              \
        softmax_bwd<T>(p, dp, ds, cols, scale);                                               \
    }                                                                                          \
    extern "C" __global__ void ft_ce_fwd_##N(const T* x, const unsigned int* target,          \
                                             float* loss, int cols) {                         \
        ce_fwd<T>(x, target, loss, cols);                                                      \
    }                                                                                          \
    extern "C" __global__ void ft_ce_bwd_##N(const T* x, const unsigned int* target,          \
                                             const float* loss, const float* g, T* dx,        \
                                             int cols) {                                      \
        ce_bwd<T>(x, target, loss, g, dx, cols);                                               \
    }                                                                                          \
    extern "C" __global__ void ft_rms_fwd_##N(const T* x, const T* w, T* y, long long rows,   \
                                              int cols, float eps) {                          \
        rms_fwd<T>(x, w, y, rows, cols, eps);                                                  \
    }                                                                                          \
    extern "C" __global__ void ft_rms_bwd_##N(const T* x, const T* w, const T* g, T* dx,      \
                                              long long rows, int cols, float eps) {          \
        rms_bwd<T>(x, w, g, dx, rows, cols, eps);                                              \
    }                                                                                          \
    extern "C" __global__ void ft_rope_##N(const T* x, const T* cos, const T* sin, T* y,      \
                                           long long threads, int per, int d, int heads,      \
                                           int t_len, int table_batches, float sign,          \
                                           int in_bthd, int out_bthd) {                       \
        rope<T>(x, cos, sin, y, threads, per, d, heads, t_len, table_batches, sign, in_bthd,  \
                out_bthd);                                                                     \
    }                                                                                          \
    extern "C" __global__ void ft_add_bias_##N(const T* y, const T* bias, T* out, long long n, \
                                               int cols) {                                    \
        add_bias<T>(y, bias, out, n, cols);                                                    \
    }                                                                                          \
    extern "C" __global__ void ft_add_##N(const T* a, const T* b, T* out, long long n) {       \
        add_pair<T>(a, b, out, n);                                                             \
    }                                                                                          \
    extern "C" __global__ void ft_swiglu_fwd_##N(const T* g, const T* u, T* a, long long n) {  \
        swiglu_fwd<T>(g, u, a, n);                                                             \
    }                                                                                          \
    extern "C" __global__ void ft_swiglu_bwd_##N(const T* g, const T* u, const T* da, T* d,    \
                                                 long long n) {                               \
        swiglu_bwd<T>(g, u, da, d, n);                                                         \
    }                                                                                          \
    extern "C" __global__ void ft_add_scaled_##N(const T* y, const float* u, T* out,           \
                                                 long long n, float s) {                      \
        add_scaled<T>(y, u, out, n, s);                                                        \
    }                                                                                          \
    extern "C" __global__ void ft_add_into_##N(T* y, const float* u, long long n, float s) {   \
        add_scaled<T>(y, u, y, n, s);                                                          \
    }

FOR_TYPES(SOFTMAX)

// LoRA products of bf16 activations on bf16 tensor cores, as exact as f32 (lora_split.rs): an
// f32 matrix becomes three bf16 parts (hi, mid, lo: each the rounding of what the parts before
// it leave), which together hold its 24 significant bits; a product of two parts is exact in
// f32, so the parts' products summed in f32 give the f32 product.
//
// AdamW over many f32 tensors in one launch (kernels::cuda::adamw): block b updates job b (a
// tensor, or a piece of one) in place with its moments at `off` in the flat m and v. The arithmetic is optim.rs's
// flat step op by op, each rounded as Candle's kernels round it (no contraction into FMAs), so
// the two give the same values. flags: 1 scale the gradient, 2 decay the weights.
struct AdamWJob {
    float* p;
    const float* g;
    long long off;
    long long len;
};
extern "C" __global__ void ft_adamw(const AdamWJob* jobs, float* m, float* v, float b1,
                                    float nb1, float b2, float nb2, float ibc1, float ibc2,
                                    float eps, float lr, float decay, float gscale, int flags) {
    const AdamWJob j = jobs[blockIdx.x];
    for (long long e = threadIdx.x; e < j.len; e += blockDim.x) {
        float g = j.g[e];
        if (flags & 1) g = __fmul_rn(g, gscale);
        float* mp = m + j.off + e;
        float* vp = v + j.off + e;
        const float mn = __fadd_rn(__fmul_rn(*mp, b1), __fmul_rn(g, nb1));
        const float vn = __fadd_rn(__fmul_rn(*vp, b2), __fmul_rn(__fmul_rn(g, g), nb2));
        const float den = __fadd_rn(__fsqrt_rn(__fmul_rn(vn, ibc2)), eps);
        const float up = __fdiv_rn(__fmul_rn(mn, ibc1), den);
        float p = j.p[e];
        if (flags & 2) p = __fmul_rn(p, decay);
        j.p[e] = __fsub_rn(p, __fmul_rn(up, lr));
        *mp = mn;
        *vp = vn;
    }
}

// x (N, A, B, W) → y (N, B, A, W) in units of 4 bytes (`unsigned`) or 16 (`u4`): dims 1 and 2
// swapped, each row of W units copied whole (the head transposes around attention). One thread
// per unit of y, consecutive threads along a row: reads and writes are both coalesced.
struct __align__(16) u4 { unsigned x, y, z, w; };
template <typename U>
__device__ void swap12(const U* x, U* y, long long n, int a, int b, int w) {
    long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) return;
    const int c = (int)(k % w);
    const long long r = k / w;  // (m·B + j)·A + i
    const int i = (int)(r % a);
    const long long r2 = r / a;
    const int j = (int)(r2 % b);
    const long long m = r2 / b;
    y[k] = x[((m * a + i) * b + j) * w + c];
}
extern "C" __global__ void ft_swap12_4(const unsigned* x, unsigned* y, long long n, int a, int b,
                                       int w) {
    swap12<unsigned>(x, y, n, a, b, w);
}
extern "C" __global__ void ft_swap12_16(const u4* x, u4* y, long long n, int a, int b, int w) {
    swap12<u4>(x, y, n, a, b, w);
}
