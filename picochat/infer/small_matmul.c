/* out (rows, n) = x (rows, k) @ W.T for a few rows (decoding), with W packed in panels.
 *
 * Decoding multiplies 1..16 rows by each weight matrix once per token, so every step streams
 * all the weights from memory while doing little arithmetic on them. BLAS libraries tune for
 * large products: at 8 rows MKL reached ~1/3 of this machine's memory bandwidth. This kernel
 * reads the weights once, in the order they lie in memory:
 *
 *   packed[p][j][c] = W[p * PANEL + c][j]   (panel p holds PANEL output columns, k deep;
 *                                             rows past n are zero)
 *
 * and keeps a (rows x PANEL) tile of outputs in registers: per j, two vector loads of the
 * panel and one broadcast per row feed 2 fused multiply-adds per row. The vector width comes
 * from the compiler's target: LANES = 16 fp32 values where __AVX512F__ is defined (the build
 * flags add AVX-512 where torch itself runs AVX-512 code), else 8 (AVX2 on x86-64, NEON on
 * ARM), and PANEL = 2 * LANES columns. Up to ROWS_PER_PASS rows go through a panel at a time,
 * as many as the vector registers hold: 6 with 8 lanes (6 x 2 accumulators + 2 panel vectors
 * + 1 broadcast = 15 of AVX2's 16 registers), 12 with 16 lanes (24 + 2 + 1 = 27 of AVX-512's
 * 32; 12 and 14 measured the same, both well ahead of 6 at 8 rows); more rows take another
 * pass over the same panel, now in L1 cache. Each output is summed over j in order, one fused
 * multiply-add at a time, in whichever pass its row falls, so a row's result does not depend
 * on how many rows come with it (nor on the lane count).
 * Panels are spread over OpenMP threads (the OpenMP runtime torch already loaded). Each pass
 * prefetches every cache line of a j step: PREFETCH_AHEAD steps ahead in the panel it streams,
 * or, in a later pass over a panel that is now in cache, the next panel, so the arithmetic of
 * the extra rows overlaps the memory reads (8-lane build, weights cold: 8 rows 1,587 -> 1,209
 * us and 6 rows 1,212 -> 946 us for the 256 x 32,768 unembedding; 1 row unchanged). On a
 * 2-core AVX-512 Xeon the 16-lane build took that unembedding at 8 rows from ~1,000 us (fp32)
 * and ~1,190 us (bf16 weights) to ~700 us each; fp32 at 1 row is bound by memory either way.
 *
 * The bf16 variant reads weights stored as bfloat16 (the top 16 bits of an fp32), packed the
 * same way: half the bytes per step, widened to fp32 in registers (a zero-extend and a shift,
 * exact) and multiplied with fp32 accumulation, as bf16 GEMMs do. With inputs that are
 * themselves bf16 values, each product is exact and only the summation order differs from a
 * bf16 GEMM.
 *
 * picochat_rms_norm is the decode step's other hot spot: torch runs RMSNorm on a CPU as about
 * eight small ops, ~20 us for one 256-wide row, where the arithmetic takes well under one.
 * It normalises each row on its own (the sum of squares in double), so a row's result does not
 * depend on how many rows come with it.
 *
 * picochat_topk serves the sampler: the k largest logits of each row, in one pass over the
 * vocabulary against the k-th best so far (torch's CPU top-k took ~0.4 ms of a ~5 ms batch-8 step).
 *
 * Written with GCC/Clang vector extensions, so the same code compiles to AVX-512 or AVX2 on
 * x86-64 and to NEON on ARM. picochat/infer/cpu_matmul.py compiles it on first use and checks
 * it against torch.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

/* The panel kernels' vector: LANES fp32 values, one register (zmm with AVX-512, else ymm or a
 * NEON pair). aligned(4): loads and stores need not be aligned. */
#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif
typedef float vec __attribute__((vector_size(4 * LANES), aligned(4)));
typedef uint16_t half_vec __attribute__((vector_size(2 * LANES), aligned(2)));
typedef uint32_t word_vec __attribute__((vector_size(4 * LANES)));

/* LANES bf16 values -> LANES fp32 values (bf16 is the top half of an fp32's bits). */
static inline vec widen_bf16(const uint16_t *p) {
    word_vec w = __builtin_convertvector(*(const half_vec *)p, word_vec) << 16;
    return (vec)w;
}

#define PANEL (2 * LANES)
#if LANES == 16
#define ROWS_PER_PASS 12 /* 24 accumulators + 2 panel vectors + 1 broadcast of 32 registers */
#else
#define ROWS_PER_PASS 6 /* 12 accumulators + 2 panel vectors + 1 broadcast of 16 registers */
#endif
#define PREFETCH_AHEAD 64 /* j steps ahead in the panel being streamed */

/* Keep a loaded value in a register: otherwise GCC folds the panel loads into every FMA as a
 * memory operand, and the loads, not the arithmetic, then limit the kernel. ("x" names only the
 * first 16 vector registers; "v" any of AVX-512's 32.) */
#if defined(__x86_64__) && LANES == 16
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#elif defined(__x86_64__)
#define IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif

#define LOAD_F32(p) (*(const vec *)(p))
#define LOAD_BF16(p) widen_bf16(p)

/* One prefetch per 64-byte line of a j step of the panel (one line, or two for a 32-wide fp32 one). */
#define PREFETCH_STEP(p)                                                                    \
    for (int b = 0; b < (int)sizeof(*(p)) * PANEL; b += 64) __builtin_prefetch((const char *)(p) + b)

#define PANEL_KERNEL(NAME, R, WTYPE, LOAD)                                                  \
    static void NAME##_##R(const float *x, long k, const WTYPE *panel, float *out, long n, \
                           long columns, const WTYPE *ahead) {                              \
        vec lo[R], hi[R];                                                                   \
        for (int r = 0; r < R; r++) {                                                       \
            lo[r] = (vec){0};                                                               \
            hi[r] = (vec){0};                                                               \
        }                                                                                   \
        for (long j = 0; j < k; j++) {                                                      \
            vec w_lo = LOAD(panel + j * PANEL);                                             \
            vec w_hi = LOAD(panel + j * PANEL + LANES);                                     \
            PREFETCH_STEP(ahead + j * PANEL);                                               \
            IN_REGISTER(w_lo);                                                              \
            IN_REGISTER(w_hi);                                                              \
            for (int r = 0; r < R; r++) {                                                   \
                float s = x[r * k + j];                                                     \
                lo[r] += w_lo * s;                                                          \
                hi[r] += w_hi * s;                                                          \
            }                                                                               \
        }                                                                                   \
        for (int r = 0; r < R; r++) {                                                       \
            float *o = out + r * n;                                                         \
            if (columns == PANEL) {                                                         \
                *(vec *)o = lo[r];                                                          \
                *(vec *)(o + LANES) = hi[r];                                                \
            } else { /* the last panel of an n that is not a multiple of PANEL */           \
                for (long c = 0; c < columns; c++)                                          \
                    o[c] = c < LANES ? lo[r][c] : hi[r][c - LANES];                         \
            }                                                                               \
        }                                                                                   \
    }

/* Both weight types, R rows at a time. */
#define PANEL_KERNELS_FOR(R)                       \
    PANEL_KERNEL(panel, R, float, LOAD_F32)        \
    PANEL_KERNEL(panel_bf16, R, uint16_t, LOAD_BF16)

PANEL_KERNELS_FOR(1)
PANEL_KERNELS_FOR(2)
PANEL_KERNELS_FOR(3)
PANEL_KERNELS_FOR(4)
PANEL_KERNELS_FOR(5)
PANEL_KERNELS_FOR(6)
#if ROWS_PER_PASS > 6
PANEL_KERNELS_FOR(7)
PANEL_KERNELS_FOR(8)
PANEL_KERNELS_FOR(9)
PANEL_KERNELS_FOR(10)
PANEL_KERNELS_FOR(11)
PANEL_KERNELS_FOR(12)
#endif

typedef void (*panel_fn)(const float *, long, const float *, float *, long, long, const float *);
static const panel_fn PANEL_KERNELS[] = {0, panel_1, panel_2, panel_3, panel_4, panel_5, panel_6
#if ROWS_PER_PASS > 6
    , panel_7, panel_8, panel_9, panel_10, panel_11, panel_12
#endif
};
typedef void (*panel_bf16_fn)(const float *, long, const uint16_t *, float *, long, long, const uint16_t *);
static const panel_bf16_fn PANEL_BF16_KERNELS[] = {
    0, panel_bf16_1, panel_bf16_2, panel_bf16_3, panel_bf16_4, panel_bf16_5, panel_bf16_6
#if ROWS_PER_PASS > 6
    , panel_bf16_7, panel_bf16_8, panel_bf16_9, panel_bf16_10, panel_bf16_11, panel_bf16_12
#endif
};
/* A compile-time check that both tables hold a kernel for every count 1..ROWS_PER_PASS. */
typedef char panel_tables_cover_a_pass[(sizeof(PANEL_KERNELS) / sizeof(*PANEL_KERNELS) == ROWS_PER_PASS + 1 &&
                                        sizeof(PANEL_BF16_KERNELS) / sizeof(*PANEL_BF16_KERNELS) == ROWS_PER_PASS + 1)
                                           ? 1 : -1];

int picochat_panel_width(void) { return PANEL; }

/* The same loop for both weight types: panels over threads, ROWS_PER_PASS rows at a time. */
#define SMALL_MATMUL(KERNELS, WTYPE)                                                            \
    long panels = (n + PANEL - 1) / PANEL;                                                      \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (threads > 1 && panels > 1)") \
    for (long p = 0; p < panels; p++) {                                                         \
        const WTYPE *panel = packed + p * k * PANEL;                                            \
        long columns = n - p * PANEL < PANEL ? n - p * PANEL : PANEL;                           \
        for (long r0 = 0; r0 < rows; r0 += ROWS_PER_PASS) {                                     \
            long r = rows - r0 < ROWS_PER_PASS ? rows - r0 : ROWS_PER_PASS;                     \
            /* Prefetch: the first pass streams this panel, PREFETCH_AHEAD lines ahead (the      \
             * hardware prefetcher alone left ~25% of the bandwidth unused); a later pass reads   \
             * it from cache while the next panel is fetched, so memory and arithmetic overlap */ \
            const WTYPE *ahead = p + 1 == panels ? panel /* nothing after the last */           \
                               : r0 > 0 ? panel + k * PANEL                                     \
                               : panel + (PREFETCH_AHEAD < k ? PREFETCH_AHEAD : k) * PANEL;     \
            KERNELS[r](x + r0 * k, k, panel, out + r0 * n + p * PANEL, n, columns, ahead);      \
        }                                                                                       \
    }

void picochat_small_matmul(const float *x, long rows, long k, const float *packed, long n, float *out,
                           int threads) {
    SMALL_MATMUL(PANEL_KERNELS, float)
}

void picochat_small_matmul_bf16(const float *x, long rows, long k, const uint16_t *packed, long n, float *out,
                                int threads) {
    SMALL_MATMUL(PANEL_BF16_KERNELS, uint16_t)
}

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) for each of `rows` rows of `dim` values, computed in
 * fp32 (the sum of squares in double); the bf16 variant reads and writes bf16, rounding the fp32
 * result to the nearest even bf16 as torch's cast does. */
#define RMS_NORM(READ, WRITE)                                                 \
    for (long r = 0; r < rows; r++) {                                         \
        double sum = 0.0;                                                     \
        for (long j = 0; j < dim; j++) {                                      \
            double v = READ(x[r * dim + j]);                                  \
            sum += v * v;                                                     \
        }                                                                     \
        float scale = (float)(1.0 / sqrt(sum / dim + eps));                   \
        for (long j = 0; j < dim; j++) out[r * dim + j] = WRITE(READ(x[r * dim + j]) * scale); \
    }

static inline float bf16_to_float(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

static inline uint16_t float_to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

#define AS_IS(v) (v)

void picochat_rms_norm(const float *x, long rows, long dim, float eps, float *out) { RMS_NORM(AS_IS, AS_IS) }

void picochat_rms_norm_bf16(const uint16_t *x, long rows, long dim, float eps, uint16_t *out) {
    RMS_NORM(bf16_to_float, float_to_bf16)
}

/* fp32 rows in, their norm rounded to bf16 out: picochat_rms_norm and a cast in one call. */
void picochat_rms_norm_f32_bf16(const float *x, long rows, long dim, float eps, uint16_t *out) {
    RMS_NORM(AS_IS, float_to_bf16)
}

static inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

/* The decode step's rotary embedding and RMSNorm of queries and keys in bf16, one call for what
 * torch runs as ~9 small ops: row (b, h) of `heads` rows of `dim` values per batch row b lies at
 * x + b * x_stride + h * dim; its cos and sin (dim / 2 each) at cos + b * cs_stride (0: one pair for
 * every row). out (batch, heads, dim) gets, per row, [x1 c - x2 s, x2 c + x1 s] with every product,
 * difference and sum rounded to bf16 as torch's bf16 ops round them, then picochat_rms_norm_bf16's norm,
 * then (scale != 1) times scale rounded to bf16; written as bf16, or (out_f32) widened to fp32. */
void picochat_rotary_norm_bf16(const uint16_t *x, long batch, long heads, long dim, long x_stride,
                               const uint16_t *cos, const uint16_t *sin, long cs_stride, float eps, float scale,
                               void *out, int out_f32) {
    long half = dim / 2;
    uint16_t row_out[dim];
    for (long b = 0; b < batch; b++) {
        const uint16_t *c = cos + b * cs_stride, *s = sin + b * cs_stride;
        for (long h = 0; h < heads; h++) {
            const uint16_t *row = x + b * x_stride + h * dim;
            for (long j = 0; j < half; j++) {
                float x1 = bf16_to_float(row[j]), x2 = bf16_to_float(row[j + half]);
                float cj = bf16_to_float(c[j]), sj = bf16_to_float(s[j]);
                row_out[j] = float_to_bf16(round_bf16(x1 * cj) - round_bf16(x2 * sj));
                row_out[j + half] = float_to_bf16(round_bf16(x2 * cj) + round_bf16(x1 * sj));
            }
            picochat_rms_norm_bf16(row_out, 1, dim, eps, row_out); /* in place: each value is read first */
            long at = (b * heads + h) * dim;
            for (long j = 0; j < dim; j++) {
                float v = bf16_to_float(row_out[j]);
                if (scale != 1.0f) v = round_bf16(v * scale);
                if (out_f32) ((float *)out)[at + j] = v;
                else ((uint16_t *)out)[at + j] = float_to_bf16(v);
            }
        }
    }
}

/* picochat_small_matmul_bf16 for the decode step's block matrices in bf16, in one call: x is bf16
 * (x_f32 = 0: widened exactly) or fp32 (x_f32 = 1: rounded to the nearest even bf16 first, as autocast
 * rounds a matmul's input; with `normalize`, each fp32 row is first RMS-normalised with `eps` exactly as
 * picochat_rms_norm_f32_bf16 does, so a block's norm and its product are one call), and the fp32 sums
 * are finished by `epilogue`:
 *   SUMS      out_f32 = the sums themselves (bf16 inputs and weights: exact products, fp32 sums);
 *   BF16      out_bf16 = the sums rounded to bf16 as torch's cast rounds them (a bf16 GEMM's result);
 *   RELU2     out_bf16 = relu(that)^2, the square rounded to bf16 (torch's bf16 relu, then square);
 *   RESIDUAL  out_f32 = residual + that, in fp32 (an fp32 residual stream plus a bf16 product).
 * Each gives the same values as torch's separate calls, without their dispatch and temporaries.
 * Returns 0, or 1 (nothing written) when the scratch rows of a large call cannot be allocated. */
enum epilogue { SUMS, BF16, RELU2, RESIDUAL };

int picochat_small_matmul_bf16_fused(const void *x_in, int x_f32, int normalize, float eps, long rows, long k,
                                     const uint16_t *packed, long n, int epilogue, const float *residual,
                                     void *result, int threads) {
    float x_stack[4096], out_stack[16384]; /* up to 16 rows of 256 in, 16 rows of 1,024 out */
    float *x = rows * k <= 4096 ? x_stack : malloc(sizeof(float) * rows * k);
    float *out = epilogue == SUMS ? result : rows * n <= 16384 ? out_stack : malloc(sizeof(float) * rows * n);
    if (x == NULL || out == NULL) {
        if (x != x_stack) free(x);
        if (out != out_stack && out != result) free(out);
        return 1;
    }
    if (x_f32 && normalize) {
        uint16_t normed[k];
        for (long r = 0; r < rows; r++) {
            picochat_rms_norm_f32_bf16((const float *)x_in + r * k, 1, k, eps, normed);
            for (long j = 0; j < k; j++) x[r * k + j] = bf16_to_float(normed[j]);
        }
    } else {
        for (long i = 0; i < rows * k; i++)
            x[i] = x_f32 ? round_bf16(((const float *)x_in)[i]) : bf16_to_float(((const uint16_t *)x_in)[i]);
    }
    picochat_small_matmul_bf16(x, rows, k, packed, n, out, threads);
    if (epilogue != SUMS) {
        uint16_t *out_bf16 = result;
        float *out_f32 = result;
        for (long i = 0; i < rows * n; i++) {
            float v = round_bf16(out[i]);
            if (epilogue == RESIDUAL) {
                out_f32[i] = residual[i] + v;
            } else {
                if (epilogue == RELU2) {
                    v = v < 0.0f ? 0.0f : v; /* NaN stays NaN, as torch's relu keeps it */
                    v *= v;
                }
                out_bf16[i] = float_to_bf16(v);
            }
        }
    }
    if (x != x_stack) free(x);
    if (out != out_stack && out != result) free(out);
    return 0;
}

/* A bf16 decode layer up to attention, in one call: qkv = rms_norm(x) W_qkv (x fp32, rows x k; W_qkv packed
 * bf16, (heads + 2 kv_heads) * dim outputs), rotary + QK-norm (+ scale) of its q and k heads exactly as
 * picochat_rotary_norm_bf16 (cos, sin and cs_stride as there), then q widened to fp32 into q_out (rows,
 * heads, dim), and k and v widened into the fp32 caches: row b's head h at
 * cache + b * row_stride + h * head_stride + p_b * dim, p_b = positions ? positions[b] : pos. With a value
 * embedding ve (rows, kv_heads * dim, bf16) and its gate (rows, kv_heads, fp32), head h's values are first
 * (v + gate[b, h] * ve) rounded to bf16, the product rounded to fp32 before the sum as torch's two ops
 * round them (ve NULL: none). The same values as the separate calls and copies. Returns 0, or 1
 * (nothing written) without scratch memory. */
int picochat_decode_qkv_bf16(const float *x, long rows, long k, const uint16_t *w_qkv, float eps, long heads,
                             long kv_heads, long dim, const uint16_t *cos, const uint16_t *sin, long cs_stride,
                             float qk_eps, float scale, float *q_out, float *k_cache, float *v_cache, long row_stride,
                             long head_stride, const int64_t *positions, long pos, const uint16_t *ve,
                             const float *gate, int threads) {
    long n = (heads + 2 * kv_heads) * dim, rotated = (heads + kv_heads) * dim;
    uint16_t *qkv = malloc(sizeof(uint16_t) * rows * n);
    float *qk = malloc(sizeof(float) * rows * rotated);
    if (qkv == NULL || qk == NULL || picochat_small_matmul_bf16_fused(x, 1, 1, eps, rows, k, w_qkv, n, BF16, NULL,
                                                                       qkv, threads)) {
        free(qkv);
        free(qk);
        return 1;
    }
    picochat_rotary_norm_bf16(qkv, rows, heads + kv_heads, dim, n, cos, sin, cs_stride, qk_eps, scale, qk, 1);
    for (long b = 0; b < rows; b++) {
        long at = (positions ? positions[b] : pos) * dim;
        for (long j = 0; j < heads * dim; j++) q_out[b * heads * dim + j] = qk[b * rotated + j];
        for (long h = 0; h < kv_heads; h++) {
            float *kc = k_cache + b * row_stride + h * head_stride + at;
            float *vc = v_cache + b * row_stride + h * head_stride + at;
            const uint16_t *vh = ve ? ve + (b * kv_heads + h) * dim : NULL;
            for (long j = 0; j < dim; j++) {
                kc[j] = qk[b * rotated + (heads + h) * dim + j];
                float v = bf16_to_float(qkv[b * n + rotated + h * dim + j]);
                if (vh) {
                    volatile float gated = gate[b * kv_heads + h] * bf16_to_float(vh[j]); /* no fused multiply-add */
                    v = round_bf16(v + gated);
                }
                vc[j] = v;
            }
        }
    }
    free(qkv);
    free(qk);
    return 0;
}

/* The rest of a bf16 decode layer after attention, in one call: with y the attention output and x the
 * fp32 residual stream (rows x k each),
 *   x1 = x + (y rounded to bf16) W_o,   out = x1 + relu(rms_norm(x1) W_fc)^2 W_down
 * through the three fused products above (the same values as three calls; out may be x1's storage, as
 * each residual add reads an element before writing it). W_o is (k x k), W_fc (hidden x k), W_down
 * (k x hidden), packed bf16; threads_* as each call would take. Returns 0, or 1 (nothing usable in out)
 * when scratch memory cannot be allocated. */
int picochat_decode_mlp_bf16(const float *y, const float *x, long rows, long k, long hidden, const uint16_t *w_o,
                             const uint16_t *w_fc, const uint16_t *w_down, float eps, float *out, int threads_o,
                             int threads_fc, int threads_down) {
    uint16_t *h = malloc(sizeof(uint16_t) * rows * hidden);
    int failed = h == NULL
        || picochat_small_matmul_bf16_fused(y, 1, 0, 0.0f, rows, k, w_o, k, RESIDUAL, x, out, threads_o)
        || picochat_small_matmul_bf16_fused(out, 1, 1, eps, rows, k, w_fc, hidden, RELU2, NULL, h, threads_fc)
        || picochat_small_matmul_bf16_fused(h, 0, 0, 0.0f, rows, hidden, w_down, k, RESIDUAL, out, out, threads_down);
    free(h);
    return failed;
}

/* Ranking for top-k: a before b when larger, or equal and at a lower index. */
static inline int ranks_before(float va, long ia, float vb, long ib) { return va > vb || (va == vb && ia < ib); }

/* Restore the heap below slot i: a min-heap of the k best so far, the worst (by ranks_before) at 0. */
static void sift_down(float *v, int64_t *id, long k, long i) {
    for (;;) {
        long worst = i, l = 2 * i + 1, r = l + 1;
        if (l < k && ranks_before(v[worst], id[worst], v[l], id[l])) worst = l;
        if (r < k && ranks_before(v[worst], id[worst], v[r], id[r])) worst = r;
        if (worst == i) return;
        float tv = v[i]; v[i] = v[worst]; v[worst] = tv;
        int64_t ti = id[i]; id[i] = id[worst]; id[worst] = ti;
        i = worst;
    }
}

/* top-k scans 8 values at a time in every build (a filter: the width does not change its results) */
typedef float vec8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t mask8 __attribute__((vector_size(32)));
typedef uint64_t wide4 __attribute__((vector_size(32)));

/* Put x[index] = value into the heap of the k best if it ranks above the worst there (an equal
 * value comes later in the row, so it ranks below); 1 for a NaN. */
static inline int offer(float *v, int64_t *id, long k, float value, long index) {
    if (value > v[0]) {
        v[0] = value;
        id[0] = index;
        sift_down(v, id, k, 0);
    }
    return value != value;
}

/* values, ids (rows, k) = the k largest of each row of x (rows, n), largest first, ties in index
 * order; 0 < k <= n. Returns 1 when some row holds a NaN (the caller then falls back to torch),
 * else 0. The heap lives in the output row (ids int64, as torch.int64 holds them on every platform);
 * popping its worst element k times sorts the row. */
int picochat_topk(const float *x, long rows, long n, long k, float *values, int64_t *ids, int threads) {
    int nan = 0;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows > 1) reduction(|: nan)
    for (long r = 0; r < rows; r++) {
        const float *row = x + r * n;
        float *v = values + r * k;
        int64_t *id = ids + r * k;
        for (long j = 0; j < k; j++) {
            v[j] = row[j];
            id[j] = j;
            nan |= row[j] != row[j];
        }
        for (long i = k / 2 - 1; i >= 0; i--) sift_down(v, id, k, i);
        long j = k;
        for (; j + 8 <= n; j += 8) { /* 8 at a time: most blocks hold nothing better than the k-th */
            vec8 block = *(const vec8 *)(row + j);
            mask8 hit = (block > v[0]) | (block != block);
            wide4 any = (wide4)hit;
            if (!(any[0] | any[1] | any[2] | any[3])) continue;
            for (long c = j; c < j + 8; c++) nan |= offer(v, id, k, row[c], c);
        }
        for (; j < n; j++) nan |= offer(v, id, k, row[j], j);
        for (long end = k - 1; end > 0; end--) { /* heap sort: the worst to the back, best first */
            float tv = v[0]; v[0] = v[end]; v[end] = tv;
            int64_t ti = id[0]; id[0] = id[end]; id[end] = ti;
            sift_down(v, id, end, 0);
        }
    }
    return nan;
}
