// The building blocks of flash.cu (src/model/kernels/cuda/flash.rs compiles this file and
// flash.cu after it as one NVRTC program): constants, bf16 bits, the mma.sync and ldmatrix
// fragment helpers, cp.async tile loads and the vector reduction.

typedef unsigned short bf16_t;
#define FT_INF __int_as_float(0x7f800000)
#define LOG2E 1.4426950408889634f
#define BLK 64
#define TILE_ZERO 0
#define TILE_MASKED 1
#define TILE_MIXED 2

__device__ __forceinline__ float bf(bf16_t x) { return __uint_as_float(((unsigned)x) << 16); }

// Two floats to a bf16 pair (round to nearest even), `lo` in the low half.
__device__ __forceinline__ unsigned pack(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// c (16×8, f32) += a (16×16, row-major bf16) · b (16×8, column-major bf16).
__device__ __forceinline__ void mma(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two consecutive bf16 of a row (an even column): one 32-bit load.
__device__ __forceinline__ unsigned ld_pair(const bf16_t* p) { return *(const unsigned*)p; }

// A generic pointer into shared memory as the 32-bit shared-space address ldmatrix takes.
__device__ __forceinline__ unsigned shared_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// Four 8×8 bf16 matrices, lane l giving the address of row l%8 of matrix l/8: register i holds
// row g, columns 2t and 2t+1 of matrix i (.trans: column g, rows 2t and 2t+1).
__device__ __forceinline__ void ldsm4(unsigned* r, const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_addr(p)));
}
__device__ __forceinline__ void ldsm4_t(unsigned* r, const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_addr(p)));
}

// The A fragment of rows `r..r+16` and columns `c..c+16` of a row-major shared tile.
__device__ __forceinline__ void frag_a(unsigned* a, const bf16_t* s, int ld, int r, int c) {
    const int lane = threadIdx.x & 31;
    ldsm4(a, s + (r + (lane & 15)) * ld + c + (lane >> 4) * 8);
}

// The A fragment of rows `r..r+16`, columns `c..c+16` of the transpose of a shared tile: the
// tile's rows c.. are the fragment's columns.
__device__ __forceinline__ void frag_a_t(unsigned* a, const bf16_t* s, int ld, int r, int c) {
    const int lane = threadIdx.x & 31;
    ldsm4_t(a, s + (c + (lane & 7) + (lane >> 4) * 8) * ld + r + ((lane >> 3) & 1) * 8);
}

// Two B fragments (16 × 8 each) whose columns are rows `n0..n0+16` of a row-major shared tile,
// from column c: B = tileᵀ (the keys of q·kᵀ). b[0..2] for rows n0.., b[2..4] for rows n0+8...
__device__ __forceinline__ void frag_bt2(unsigned* b, const bf16_t* s, int ld, int n0, int c) {
    const int lane = threadIdx.x & 31;
    ldsm4(b, s + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + c + ((lane >> 3) & 1) * 8);
}

// Two B fragments of rows `k0..k0+16` of a row-major shared tile: columns `n0..n0+8` in b[0..2],
// `n0+8..n0+16` in b[2..4].
__device__ __forceinline__ void frag_b2(unsigned* b, const bf16_t* s, int ld, int k0, int n0) {
    const int lane = threadIdx.x & 31;
    ldsm4_t(b, s + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8);
}

// The A fragment of 16 columns (keys 16·kk..) from two 16×8 accumulators: the accumulator layout
// of n-tiles 2kk and 2kk+1 is the A layout of their 16 columns.
__device__ __forceinline__ void acc_to_a(unsigned* a, const float (*s)[4], int kk) {
    a[0] = pack(s[2 * kk][0], s[2 * kk][1]);
    a[1] = pack(s[2 * kk][2], s[2 * kk][3]);
    a[2] = pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    a[3] = pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// Rows r0..r0+64 of a (T, D) matrix into a shared tile with row stride LD, zeros past T, by
// cp.async (16 bytes a copy, straight to shared memory): complete after the cp_wait that
// follows its group's cp_commit.
template <int D, int LD>
__device__ __forceinline__ void load_tile_async(bf16_t* dst, const bf16_t* src, int r0, int T) {
    for (int i = threadIdx.x; i < BLK * D / 8; i += blockDim.x) {
        const int r = i / (D / 8), c = (i % (D / 8)) * 8;
        const bool in = r0 + r < T;
        const bf16_t* from = src + (long long)(in ? r0 + r : 0) * D + c;  // zeros past T
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(
                         shared_addr(dst + r * LD + c)),
                     "l"(from), "r"(in ? 16 : 0));
    }
}

// `BLK` floats of a row vector from r0 (zeros past T) by cp.async, one thread a value.
__device__ __forceinline__ void load_row_async(float* dst, const float* src, int r0, int T) {
    if (threadIdx.x < BLK) {
        const bool in = r0 + (int)threadIdx.x < T;
        const float* from = src + (in ? r0 + threadIdx.x : 0);
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(
                         shared_addr(dst + threadIdx.x)),
                     "l"(from), "r"(in ? 4 : 0));
    }
}

#if __CUDA_ARCH__ >= 900
// p[0..4] += a, b, c, d (p 16-byte aligned, in global memory): one vector reduction
// (`red.global.add.v4.f32`, sm_90 and later).
__device__ __forceinline__ void red4(float* p, float a, float b, float c, float d) {
    asm volatile("{ .reg .u64 g; cvta.to.global.u64 g, %0; red.global.add.v4.f32 [g], {%1, %2, %3, %4}; }"
                 ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d)
                 : "memory");
}
#endif

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

