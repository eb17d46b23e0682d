/* Softcapped cross-entropy over rows of pre-activations, and its gradient, in one pass per row.
 *
 * The training loss computes, for each row of a = x @ (2 W / cap).T (n rows, V columns):
 *   s = sigmoid(a),  z = cap * (2 s - 1)  (= cap * tanh(a / 2), the softcapped logit),
 *   loss = log(sum_j exp(z_j + shift)) - shift - z_target,
 * and, for the gradient, g = (exp(z + shift) - onehot(target) * sum) * s * (1 - s), which the
 * caller scales per row and multiplies back through W and x. Written with torch ops these are
 * ~9 passes over an (n, V) buffer that does not fit in cache; on a CPU whose matmuls run in
 * bf16 those passes cost more than the matmuls. Here each row is read once and g written once
 * (in place over a, which may be fp32 or bf16), with exp computed by a vectorised polynomial
 * (relative error ~2e-7, like libm's expf).
 *
 * GCC/Clang vector extensions, LANES fp32 values wide: 16 (one AVX-512 register) where the
 * compiler targets AVX-512, else 8 (AVX2 on x86-64, two NEON registers on ARM). On a 2-core
 * AMX Xeon a (1,024 x 32,768) bf16 chunk takes 26.9 ms in the 16-lane build, 34.7 ms in the
 * 8-lane one. picochat/model/fused_ce.py compiles it on first use (picochat/kernels.py) and
 * checks it against torch before use.
 *
 * picochat_add_bf16 is the loss's other helper: acc (fp32) += src (bf16) in one pass, for the
 * lm_head gradient summed over chunks (torch widens src into a temporary first: 10.8 ms against
 * 0.9 ms for a 32,768 x 256 gradient on that Xeon).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define LANES 16
#else
#define LANES 8
#endif

typedef float vec __attribute__((vector_size(4 * LANES), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(4 * LANES)));
typedef uint32_t uvec __attribute__((vector_size(4 * LANES)));
typedef uint16_t halfvec __attribute__((vector_size(2 * LANES), aligned(2)));

static inline vec splat(float v) { return (vec){0} + v; }

static inline vec select_lanes(ivec mask, vec yes, vec no) { /* mask lanes are all ones or zeros */
    return (vec)(((ivec)yes & mask) | ((ivec)no & ~mask));
}

/* exp(x) for x in about [-87, 88]: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor
 * polynomial to r^7 / 7!, times 2^n built in the exponent bits. */
static inline vec vexp(vec x) {
    x = select_lanes(x < splat(-87.0f), splat(-87.0f), x);
    x = select_lanes(x > splat(88.0f), splat(88.0f), x);
    const vec magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vec t = x * splat(1.44269504088896341f) + magic;
    vec n = t - magic;
    vec r = x - n * splat(0.693145751953125f) - n * splat(1.42860682030941723e-6f);
    vec p = splat(1.0f / 5040.0f);
    p = p * r + splat(1.0f / 720.0f);
    p = p * r + splat(1.0f / 120.0f);
    p = p * r + splat(1.0f / 24.0f);
    p = p * r + splat(1.0f / 6.0f);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    ivec bits = ((ivec)t - (ivec)magic + 127) << 23; /* 2^n */
    return p * (vec)bits;
}

static inline vec loadv(const void *base, long j, int bf16) {
    if (bf16) {
        uvec w = __builtin_convertvector(*(const halfvec *)((const uint16_t *)base + j), uvec) << 16;
        return (vec)w;
    }
    return *(const vec *)((const float *)base + j);
}

static inline float load1(const void *base, long j, int bf16) {
    if (bf16) {
        uint32_t w = (uint32_t)((const uint16_t *)base)[j] << 16;
        float f;
        memcpy(&f, &w, 4);
        return f;
    }
    return ((const float *)base)[j];
}

static inline uint16_t to_bf16(float f) { /* round to nearest even (values here are finite) */
    uint32_t w;
    memcpy(&w, &f, 4);
    return (uint16_t)((w + 0x7FFFu + ((w >> 16) & 1u)) >> 16);
}

static inline void storev(void *base, long j, vec v, int bf16) {
    if (bf16) { /* round to nearest even, all lanes at once */
        uvec w = (uvec)v;
        w = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
        *(halfvec *)((uint16_t *)base + j) = __builtin_convertvector(w, halfvec);
    } else {
        *(vec *)((float *)base + j) = v;
    }
}

static inline void store1(void *base, long j, float v, int bf16) {
    if (bf16) ((uint16_t *)base)[j] = to_bf16(v);
    else ((float *)base)[j] = v;
}

/* One row: returns the loss, writes the row's sum of exp(z + shift), and with want_grad replaces
 * the row by g (the target column included). */
static float row(void *a, long V, int bf16, long target, float cap, float shift, int want_grad, float *sum_out) {
    const float s_t = 1.0f / (1.0f + expf(-load1(a, target, bf16))); /* read before it is overwritten */
    const float z_t = cap * (2.0f * s_t - 1.0f);
    vec acc = splat(0.0f);
    const vec one = splat(1.0f), two_cap = splat(2.0f * cap), offset = splat(shift - cap);
    long j = 0;
    for (; j + LANES <= V; j += LANES) {
        vec s = one / (one + vexp(-loadv(a, j, bf16)));
        vec e = vexp(two_cap * s + offset);
        acc += e;
        if (want_grad) storev(a, j, e * s * (one - s), bf16);
    }
    float sum = 0.0f;
    for (int c = 0; c < LANES; c++) sum += acc[c];
    for (; j < V; j++) { /* the tail of a vocabulary that is not a multiple of LANES */
        float s = 1.0f / (1.0f + expf(-load1(a, j, bf16)));
        float e = expf(2.0f * cap * s + shift - cap);
        sum += e;
        if (want_grad) store1(a, j, e * s * (1.0f - s), bf16);
    }
    if (want_grad) /* the one-hot term: g_t = (e_t - sum) s_t (1 - s_t) */
        store1(a, target, (expf(z_t + shift) - sum) * s_t * (1.0f - s_t), bf16);
    *sum_out = sum;
    return logf(sum) - shift - z_t;
}

/* n rows of a (fp32 or bf16, row-major, V columns): loss[r] and sum_exp[r]; with want_grad every
 * row of a is replaced by its g. Rows are spread over OpenMP threads. */
void picochat_softcap_ce(void *a, int bf16, long n, long V, const int64_t *targets, float cap, float shift,
                         int want_grad, float *loss, float *sum_exp, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n > 1)
    for (long r = 0; r < n; r++) {
        void *base = bf16 ? (void *)((uint16_t *)a + r * V) : (void *)((float *)a + r * V);
        loss[r] = row(base, V, bf16, targets[r], cap, shift, want_grad, &sum_exp[r]);
    }
}

/* acc[i] += src[i] (bf16, widened exactly) for i < n, over OpenMP threads. */
void picochat_add_bf16(float *acc, const uint16_t *src, long n, int threads) {
    long blocks = n / LANES;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks > 4096)
    for (long b = 0; b < blocks; b++) storev(acc, b * LANES, loadv(acc, b * LANES, 0) + loadv(src, b * LANES, 1), 0);
    for (long i = blocks * LANES; i < n; i++) acc[i] += load1(src, i, 1);
}
