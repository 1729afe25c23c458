// The LoRA op's bf16 parts (lora_parts.rs, lora_split.rs): the split of f32 matrices into hi, mid
// and lo bf16 parts and the sums of part-products back into f32. Compiled after kernels.cu as
// one NVRTC program (its `st`, `ld` and bf16_t).

// ft_split_parts writes `copies` bf16 copies of an (rows, cols) f32 matrix — the sum of `parts`
// blocks `part_stride` apart, times `scale` — copy j holding the part numbered by bits 2j..2j+2
// of `pattern` (0 hi, 1 mid, 2 lo). Source element (u, v) at src[u·su + v·sv (+ q·part_stride)];
// copy j's at dst[j·dj + u·du + v·dv]. Two jobs a launch (blockIdx.y picks one), one thread per
// source element; rows · cols < 2³¹ (lora_parts.rs checks). lora_parts.rs's `Job` has this layout.
struct SplitJob {
    const float* src;
    bf16_t* dst;
    long long rows, su, sv, part_stride, du, dv, dj;
    int cols, parts, copies, pattern;
    float scale;
    int unused;
};
// Element e of job j. The job comes by value into an inlined function, so its fields are read
// from the launch's parameters (no local copy); the three parts' loads are issued together.
__device__ __forceinline__ void split_elem(const SplitJob j, int e) {
    const int u = e / j.cols, v = e - u * j.cols;
    const float* s = j.src + u * j.su + v * j.sv;
    float x = 0.f;
    if (j.parts == 3) {
        const float p0 = s[0], p1 = s[j.part_stride], p2 = s[2 * j.part_stride];
        x += p2;  // small parts first, as the loop below
        x += p1;
        x += p0;
    } else {
        for (int q = j.parts - 1; q >= 0; q--) x += s[q * j.part_stride];
    }
    x *= j.scale;
    bf16_t p[3];
    float rest = x;
#pragma unroll
    for (int k = 0; k < 3; k++) {
        st(p, k, rest);
        rest -= ld(p, k);
    }
    bf16_t* d = j.dst + u * j.du + v * j.dv;
    for (int c = 0; c < j.copies; c++) {
        const int k = (j.pattern >> (2 * c)) & 3;
        d[c * j.dj] = k == 0 ? p[0] : (k == 1 ? p[1] : p[2]);
    }
}

// dst (rows, cols) = scale · Σ_{q<3} src[u·su + q·sq + v], small parts first: the three
// part-products of a split summed into an f32 result (dA's and dB's). Two jobs a launch
// (blockIdx.y picks one), one thread per element; rows · cols < 2³¹. lora_parts.rs's `SumJob`
// has this layout.
struct SumJob {
    const float* src;
    float* dst;
    long long rows, su, sq;
    int cols;
    float scale;
};
__device__ __forceinline__ void sum_elem(const SumJob j, int e) {
    const int u = e / j.cols, v = e - u * j.cols;
    const float* s = j.src + u * j.su + v;
    j.dst[e] = j.scale * ((s[2 * j.sq] + s[j.sq]) + s[0]);
}

// A launch of two jobs: blockIdx.y picks one, thread e does its element e. (A macro rather than
// a template over the jobs: each job's fields stay read from the launch parameters.)
#define FT_TWO_JOBS(NAME, J, ELEM)                                   \
    extern "C" __global__ void NAME(J a, J b) {                      \
        const int e = blockIdx.x * blockDim.x + threadIdx.x;         \
        if (blockIdx.y == 0) {                                       \
            if (e < a.rows * a.cols) ELEM(a, e);                     \
        } else if (e < b.rows * b.cols) {                            \
            ELEM(b, e);                                              \
        }                                                            \
    }
FT_TWO_JOBS(ft_split_parts, SplitJob, split_elem)
FT_TWO_JOBS(ft_sum_parts, SumJob, sum_elem)
