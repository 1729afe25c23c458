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

// Cross-entropy of each row of logits against its target: loss = logsumexp(x) − x[target], f32.
template <typename T>
__device__ void ce_fwd(const T* x, const unsigned int* target, float* loss, int cols) {
    __shared__ float sh[32];
    const long long off = (long long)blockIdx.x * cols;
    float m = -FT_INF;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) m = fmaxf(m, ld(x, off + j));
    m = block_max(m, sh);
    float sum = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) sum += __expf(ld(x, off + j) - m);
    sum = block_sum(sum, sh);
    if (threadIdx.x == 0) loss[blockIdx.x] = logf(sum) + m - ld(x, off + target[blockIdx.x]);
}

// dx = (softmax(x) − onehot(target)) · g[row].
template <typename T>
__device__ void ce_bwd(const T* x, const unsigned int* target, const float* g, T* dx, int cols) {
    __shared__ float sh[32];
    const long long off = (long long)blockIdx.x * cols;
    float m = -FT_INF;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) m = fmaxf(m, ld(x, off + j));
    m = block_max(m, sh);
    float sum = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) sum += __expf(ld(x, off + j) - m);
    sum = block_sum(sum, sh);
    const float inv = 1.f / sum, gr = g[blockIdx.x];
    const int tg = (int)target[blockIdx.x];
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        st(dx, off + j, (__expf(ld(x, off + j) - m) * inv - (j == tg ? 1.f : 0.f)) * gr);
}

// RMSNorm with a frozen weight: y = x · r · w, r = 1/√(mean(x²) + eps).
template <typename T>
__device__ void rms_fwd(const T* x, const T* w, T* y, int cols, float eps) {
    __shared__ float sh[32];
    const long long off = (long long)blockIdx.x * cols;
    float ss = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float v = ld(x, off + j);
        ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss, sh) / cols + eps);
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        st(y, off + j, ld(x, off + j) * r * ld(w, j));
}

// Its input gradient: dx = r·(g⊙w) − x·r³·mean(g⊙w⊙x).
template <typename T>
__device__ void rms_bwd(const T* x, const T* w, const T* g, T* dx, int cols, float eps) {
    __shared__ float sh[32];
    const long long off = (long long)blockIdx.x * cols;
    float ss = 0.f, dot = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float v = ld(x, off + j);
        ss += v * v;
        dot += ld(g, off + j) * ld(w, j) * v;
    }
    ss = block_sum(ss, sh);
    dot = block_sum(dot, sh);
    const float r = rsqrtf(ss / cols + eps);
    const float k = r * r * r * dot / cols;
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        st(dx, off + j, r * ld(g, off + j) * ld(w, j) - ld(x, off + j) * k);
}

// RoPE, rotate-half convention, on x (B, H, T, Dh) with cos/sin tables (Bc, T, Dh) (Bc = 1 or B,
// halves repeated as transformers builds them). `sign` = −1 applies the inverse rotation
// (the backward). One thread per (row, i < Dh/2) pair.
template <typename T>
__device__ void rope(const T* x, const T* cos, const T* sin, T* y, long long pairs, int d,
                     int heads, int t_len, int table_batches, float sign) {
    long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= pairs) return;
    const int half = d / 2;
    const long long row = k / half;
    const int i = (int)(k % half);
    const int t = (int)(row % t_len);
    const int b = (int)(row / ((long long)heads * t_len));
    const long long toff = ((long long)(table_batches == 1 ? 0 : b) * t_len + t) * d + i;
    const float c = ld(cos, toff), s = sign * ld(sin, toff);
    const float x1 = ld(x, row * d + i), x2 = ld(x, row * d + i + half);
    st(y, row * d + i, x1 * c - x2 * s);
    st(y, row * d + i + half, x2 * c + x1 * s);
}

// SwiGLU: a = silu(g) · u, silu(g) = g·σ(g). One thread per element.
template <typename T>
__device__ void swiglu_fwd(const T* g, const T* u, T* a, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float x = ld(g, i);
    st(a, i, x / (1.f + __expf(-x)) * ld(u, i));
}

// Its gradients, written as [dg; du] into `d` (2·n): dg = da·u·σ(g)·(1 + g·(1 − σ(g))),
// du = da·silu(g).
template <typename T>
__device__ void swiglu_bwd(const T* g, const T* u, const T* da, T* d, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float x = ld(g, i), up = ld(u, i), gr = ld(da, i);
    const float sg = 1.f / (1.f + __expf(-x));
    st(d, i, gr * up * sg * (1.f + x * (1.f - sg)));
    st(d, n + i, gr * x * sg);
}

// The frozen output plus the scaled f32 LoRA update, rounded once: out = y + s·u.
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
                                             const float* g, T* dx, int cols) {               \
        ce_bwd<T>(x, target, g, dx, cols);                                                     \
    }                                                                                          \
    extern "C" __global__ void ft_rms_fwd_##N(const T* x, const T* w, T* y, int cols,         \
                                              float eps) {                                    \
        rms_fwd<T>(x, w, y, cols, eps);                                                        \
    }                                                                                          \
    extern "C" __global__ void ft_rms_bwd_##N(const T* x, const T* w, const T* g, T* dx,      \
                                              int cols, float eps) {                          \
        rms_bwd<T>(x, w, g, dx, cols, eps);                                                    \
    }                                                                                          \
    extern "C" __global__ void ft_rope_##N(const T* x, const T* cos, const T* sin, T* y,      \
                                           long long pairs, int d, int heads, int t_len,      \
                                           int table_batches, float sign) {                   \
        rope<T>(x, cos, sin, y, pairs, d, heads, t_len, table_batches, sign);                 \
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
    }

FOR_TYPES(SOFTMAX)
