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
 * GCC/Clang vector extensions: AVX2 on x86-64, NEON on ARM. picochat/model/fused_ce.py
 * compiles it on first use (picochat/kernels.py) and checks it against torch before use.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float vec8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t ivec8 __attribute__((vector_size(32)));
typedef uint32_t uvec8 __attribute__((vector_size(32)));
typedef uint16_t half8 __attribute__((vector_size(16), aligned(2)));

static inline vec8 splat(float v) { return (vec8){v, v, v, v, v, v, v, v}; }

static inline vec8 select8(ivec8 mask, vec8 yes, vec8 no) { /* mask lanes are all ones or zeros */
    return (vec8)(((ivec8)yes & mask) | ((ivec8)no & ~mask));
}

/* exp(x) for x in about [-87, 88]: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor
 * polynomial to r^7 / 7!, times 2^n built in the exponent bits. */
static inline vec8 exp8(vec8 x) {
    x = select8(x < splat(-87.0f), splat(-87.0f), x);
    x = select8(x > splat(88.0f), splat(88.0f), x);
    const vec8 magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vec8 t = x * splat(1.44269504088896341f) + magic;
    vec8 n = t - magic;
    vec8 r = x - n * splat(0.693145751953125f) - n * splat(1.42860682030941723e-6f);
    vec8 p = splat(1.0f / 5040.0f);
    p = p * r + splat(1.0f / 720.0f);
    p = p * r + splat(1.0f / 120.0f);
    p = p * r + splat(1.0f / 24.0f);
    p = p * r + splat(1.0f / 6.0f);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    ivec8 bits = ((ivec8)t - (ivec8)magic + 127) << 23; /* 2^n */
    return p * (vec8)bits;
}

static inline vec8 load8(const void *base, long j, int bf16) {
    if (bf16) {
        uvec8 w = __builtin_convertvector(*(const half8 *)((const uint16_t *)base + j), uvec8) << 16;
        return (vec8)w;
    }
    return *(const vec8 *)((const float *)base + j);
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

static inline void store8(void *base, long j, vec8 v, int bf16) {
    if (bf16) { /* round to nearest even, all lanes at once */
        uvec8 w = (uvec8)v;
        w = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
        *(half8 *)((uint16_t *)base + j) = __builtin_convertvector(w, half8);
    } else {
        *(vec8 *)((float *)base + j) = v;
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
    vec8 acc = splat(0.0f);
    const vec8 one = splat(1.0f), two_cap = splat(2.0f * cap), offset = splat(shift - cap);
    long j = 0;
    for (; j + 8 <= V; j += 8) {
        vec8 s = one / (one + exp8(-load8(a, j, bf16)));
        vec8 e = exp8(two_cap * s + offset);
        acc += e;
        if (want_grad) store8(a, j, e * s * (one - s), bf16);
    }
    float sum = 0.0f;
    for (int c = 0; c < 8; c++) sum += acc[c];
    for (; j < V; j++) { /* the tail of a vocabulary that is not a multiple of 8 */
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
