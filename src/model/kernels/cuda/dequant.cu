// GGUF block dequantization for QLoRA (kernels.cu's helpers; src/model/kernels/cuda.rs compiles
// kernels.cu and this file as one NVRTC program).

// Quantized weights (ggml's block layouts) to bf16 in one pass: QLoRA dequantizes each frozen
// weight for its product and drops it. Each thread decodes one group of 4–16 weights that share
// their scales (so the scale unpacking and index arithmetic are paid once per group, not per
// weight). `type`: 0 Q4_0, 1 Q8_0, 2 Q4_K, 3 Q5_K, 4 Q6_K; ft_dequant_group_size gives the
// weights per group. Computed in f32 in the order Candle's f32 dequantization uses, rounded once.
__device__ __forceinline__ float ld_half(const unsigned char* p) {
    unsigned short h = (unsigned short)(p[0] | (p[1] << 8));
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
// The 6-bit scale and min `is` (0..7) of a Q4_K / Q5_K super-block's 12 packed bytes.
__device__ __forceinline__ void scale_min_k4(int is, const unsigned char* s, int* sc, int* m) {
    if (is < 4) {
        *sc = s[is] & 63;
        *m = s[is + 4] & 63;
    } else {
        *sc = (s[is + 4] & 0xF) | ((s[is - 4] >> 6) << 4);
        *m = (s[is + 4] >> 4) | ((s[is] >> 6) << 4);
    }
}
// Q4_0 (18 B per 32): d, 16 bytes of nibbles, low nibbles first. A group: 4 bytes, 8 weights.
__device__ void dequant_q4_0(const unsigned char* q, bf16_t* out, long long g) {
    long long b = g / 4;
    int k = (int)(g % 4) * 4;
    const unsigned char* blk = q + b * 18;
    float d = ld_half(blk);
    long long o = b * 32 + k;
    for (int i = 0; i < 4; i++) {
        int v = blk[2 + k + i];
        st(out, o + i, (float)((v & 0xF) - 8) * d);
        st(out, o + 16 + i, (float)((v >> 4) - 8) * d);
    }
}
// Q8_0 (34 B per 32): d, 32 signed bytes. A group: 4 weights.
__device__ void dequant_q8_0(const unsigned char* q, bf16_t* out, long long g) {
    long long b = g / 8;
    int k = (int)(g % 8) * 4;
    const unsigned char* blk = q + b * 34;
    float d = ld_half(blk);
    for (int i = 0; i < 4; i++) st(out, b * 32 + k + i, (float)((signed char)blk[2 + k + i]) * d);
}
// Q4_K (144 B per 256) and Q5_K (176 B): d, dmin, scales[12], (Q5_K: qh[32],) qs[128]. A group:
// 4 bytes of one 64-weight chunk, 8 weights (4 low nibbles, 4 high nibbles 32 further on).
__device__ void dequant_q45_k(const unsigned char* q, bf16_t* out, long long g, bool five) {
    long long b = g / 32;
    int c = (int)(g % 32) / 8, k = (int)(g % 8) * 4;
    const unsigned char* blk = q + b * (five ? 176 : 144);
    int sc0, m0, sc1, m1;
    scale_min_k4(2 * c, blk + 4, &sc0, &m0);
    scale_min_k4(2 * c + 1, blk + 4, &sc1, &m1);
    float d = ld_half(blk), dmin = ld_half(blk + 2);
    float d1 = d * (float)sc0, mm1 = dmin * (float)m0, d2 = d * (float)sc1, mm2 = dmin * (float)m1;
    const unsigned char* qs = blk + (five ? 48 : 16) + 32 * c + k;
    long long o = b * 256 + 64 * c + k;
    for (int i = 0; i < 4; i++) {
        int lo = qs[i] & 0xF, hi = qs[i] >> 4;
        if (five) {
            int h = blk[16 + k + i];
            lo += ((h >> (2 * c)) & 1) << 4;
            hi += ((h >> (2 * c + 1)) & 1) << 4;
        }
        st(out, o + i, d1 * (float)lo - mm1);
        st(out, o + 32 + i, d2 * (float)hi - mm2);
    }
}
// Q6_K (210 B per 256): ql[128], qh[64], scales[16] (signed), d. A group: 4 positions of one
// 128-weight half, 16 weights (each position gives one weight in each quarter).
__device__ void dequant_q6_k(const unsigned char* q, bf16_t* out, long long g) {
    long long b = g / 16;
    int n = (int)(g % 16) / 8, l0 = (int)(g % 8) * 4;
    const unsigned char* blk = q + b * 210;
    const unsigned char* ql = blk + 64 * n;
    const unsigned char* qh = blk + 128 + 32 * n;
    const signed char* sc = (const signed char*)(blk + 192) + 8 * n + l0 / 16;
    float d = ld_half(blk + 208);
    float s0 = d * (float)sc[0], s2 = d * (float)sc[2], s4 = d * (float)sc[4], s6 = d * (float)sc[6];
    long long o = b * 256 + 128 * n;
    for (int i = 0; i < 4; i++) {
        int l = l0 + i, h = qh[l];
        st(out, o + l, s0 * (float)(((ql[l] & 0xF) | ((h & 3) << 4)) - 32));
        st(out, o + l + 32, s2 * (float)(((ql[l + 32] & 0xF) | (((h >> 2) & 3) << 4)) - 32));
        st(out, o + l + 64, s4 * (float)(((ql[l] >> 4) | (((h >> 4) & 3) << 4)) - 32));
        st(out, o + l + 96, s6 * (float)(((ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) - 32));
    }
}
extern "C" __global__ void ft_dequant_bf16(const unsigned char* q, bf16_t* out, long long groups,
                                           int type) {
    for (long long g = blockIdx.x * (long long)blockDim.x + threadIdx.x; g < groups;
         g += (long long)gridDim.x * blockDim.x) {
        switch (type) {
            case 0: dequant_q4_0(q, out, g); break;
            case 1: dequant_q8_0(q, out, g); break;
            case 2: dequant_q45_k(q, out, g, false); break;
            case 3: dequant_q45_k(q, out, g, true); break;
            default: dequant_q6_k(q, out, g); break;
        }
    }
}
