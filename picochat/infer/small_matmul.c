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
 * panel and one broadcast per row feed 2 fused multiply-adds per row. Up to ROWS_PER_PASS rows
 * go through a panel at a time (6 x 2 accumulators + 2 panel vectors + 1 broadcast = 15 of
 * AVX2's 16 registers); more rows take another pass over the same panel, now in L1 cache.
 * Panels are spread over OpenMP threads (the OpenMP runtime torch already loaded).
 *
 * Written with GCC/Clang vector extensions, so the same code compiles to AVX2 on x86-64 and to
 * NEON on ARM. picochat/infer/cpu_matmul.py compiles it on first use and checks it against torch.
 */
#include <stddef.h>

typedef float vec8 __attribute__((vector_size(32), aligned(4)));  /* unaligned loads and stores */

#define PANEL 16
#define ROWS_PER_PASS 6

/* Keep a loaded value in a register: otherwise GCC folds the panel loads into every FMA as a
 * memory operand, and the loads, not the arithmetic, then limit the kernel. */
#if defined(__x86_64__)
#define IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif

#define PANEL_KERNEL(R)                                                                     \
    static void panel_##R(const float *x, long k, const float *panel, float *out, long n,  \
                          long columns) {                                                   \
        vec8 lo[R], hi[R];                                                                  \
        for (int r = 0; r < R; r++) {                                                       \
            lo[r] = (vec8){0};                                                              \
            hi[r] = (vec8){0};                                                              \
        }                                                                                   \
        for (long j = 0; j < k; j++) {                                                      \
            vec8 w_lo = *(const vec8 *)(panel + j * PANEL);                                 \
            vec8 w_hi = *(const vec8 *)(panel + j * PANEL + 8);                             \
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
                *(vec8 *)o = lo[r];                                                         \
                *(vec8 *)(o + 8) = hi[r];                                                   \
            } else { /* the last panel of an n that is not a multiple of PANEL */           \
                for (long c = 0; c < columns; c++) o[c] = c < 8 ? lo[r][c] : hi[r][c - 8];  \
            }                                                                               \
        }                                                                                   \
    }

PANEL_KERNEL(1)
PANEL_KERNEL(2)
PANEL_KERNEL(3)
PANEL_KERNEL(4)
PANEL_KERNEL(5)
PANEL_KERNEL(6)

typedef void (*panel_fn)(const float *, long, const float *, float *, long, long);
static const panel_fn PANEL_KERNELS[ROWS_PER_PASS + 1] = {0, panel_1, panel_2, panel_3, panel_4, panel_5, panel_6};

int picochat_panel_width(void) { return PANEL; }

void picochat_small_matmul(const float *x, long rows, long k, const float *packed, long n, float *out,
                           int threads) {
    long panels = (n + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && panels > 1)
    for (long p = 0; p < panels; p++) {
        const float *panel = packed + p * k * PANEL;
        long columns = n - p * PANEL < PANEL ? n - p * PANEL : PANEL;
        for (long r0 = 0; r0 < rows; r0 += ROWS_PER_PASS) {
            long r = rows - r0 < ROWS_PER_PASS ? rows - r0 : ROWS_PER_PASS;
            PANEL_KERNELS[r](x + r0 * k, k, panel, out + r0 * n + p * PANEL, n, columns);
        }
    }
}
