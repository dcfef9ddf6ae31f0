/* deltalearn's CPU kernels: the rewrite epilogue (alone, or with the gate and value projections
 * before it: a whole update) and the compressor reads, forward and backward.
 *
 * Why C: in PyTorch ops each pass over a matrix state (..., d, dv) is an element-wise op whose
 * innermost axis is dv (4) under a broadcast, several such passes per sublayer. Here one pass per
 * row (token) keeps the row (d * dv numbers) in cache: read it once, write it once.
 *
 * Built on first use by ops/native_build.py, twice from this one file: -DREAL=float -DSUFFIX=f32
 * and -DREAL=double -DSUFFIX=f64. The math, the shapes and the saved quantities are those of
 * ops/fused_epilogue.py, ops/mixing.py and ops/token_mixing.py, which are the references the tests
 * hold these kernels to. Every array is contiguous and row-major; rows are parallel (OpenMP), and
 * a weight gradient is summed per thread, then over threads in thread order (repeatable for a
 * fixed thread count).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
#define FN(name) CAT(name, SUFFIX)

/* The longest value axis a row's per-channel scalars are kept on the stack for. */
#define MAX_DV 256
/* Below this many state elements a call runs on the calling thread (one decoded token). */
#define PARALLEL_MIN 32768

#define INLINE static inline __attribute__((always_inline))
#define RESTRICT __restrict__

static int FN(thread_count)(int64_t work, int threads) {
    return (work < PARALLEL_MIN || threads < 1) ? 1 : threads;
}

/* Each kernel's per-row work takes dv as an argument and is inlined into one loop per common dv
 * (1, 2, 4, 8) with dv a constant there, so the value-axis loops unroll and vectorise. */
#ifdef GENERIC_DV  /* the double build (tests, gradcheck): one loop, compiled in a third the time */
#define FOR_DV(dv, LOOP) LOOP(dv);
#else
#define FOR_DV(dv, LOOP)              \
    switch (dv) {                     \
        case 1: LOOP(1); break;       \
        case 2: LOOP(2); break;       \
        case 4: LOOP(4); break;       \
        case 8: LOOP(8); break;       \
        default: LOOP(dv); break;     \
    }
#endif

/* Forward of the rewrite epilogue for one row of width d with dv value channels (dv = 1 is a
 * vector state):
 *   rho = (|h|^2 + eps^2)^-1/2,  k = rho h,  beta = 2 sigmoid(z),  v = p or scale sigmoid(p)
 *   e = v - k^T X (delta) or v (write-only),  Y = X + beta k e^T
 *   x_next[i] = sum_j C[i, j] Y[i, j] (when C is given) */
INLINE void FN(epilogue_forward_row)(int64_t d, const int64_t dv, const REAL *RESTRICT x, const REAL *RESTRICT hn,
                                     REAL zn, const REAL *RESTRICT pn, const REAL *RESTRICT C, int delta,
                                     int official, double scale, double eps, REAL *RESTRICT y, REAL *RESTRICT xn,
                                     REAL *RESTRICT rho_out, REAL *RESTRICT beta_out, REAL *RESTRICT en, REAL *RESTRICT vn) {
    REAL sq = 0;
    for (int64_t i = 0; i < d; i++) sq += hn[i] * hn[i];
    const REAL rho = (REAL)(1.0 / sqrt((double)sq + eps * eps));
    const REAL beta = (REAL)(2.0 / (1.0 + exp(-(double)zn)));
    REAL e[MAX_DV];
    for (int64_t j = 0; j < dv; j++) {
        const double pj = (double)pn[j];
        e[j] = (REAL)(official ? scale / (1.0 + exp(-pj)) : pj);
        if (vn) vn[j] = e[j];
    }
    if (delta) {
        REAL r[MAX_DV];
        for (int64_t j = 0; j < dv; j++) r[j] = 0;
        for (int64_t i = 0; i < d; i++)
            for (int64_t j = 0; j < dv; j++) r[j] += hn[i] * x[i * dv + j];
        for (int64_t j = 0; j < dv; j++) e[j] -= rho * r[j];
    }
    const REAL br = beta * rho;
    if (C) {
        for (int64_t i = 0; i < d; i++) {
            const REAL a = br * hn[i];
            REAL acc = 0;
            for (int64_t j = 0; j < dv; j++) {
                const REAL yij = x[i * dv + j] + a * e[j];
                y[i * dv + j] = yij;
                acc += C[i * dv + j] * yij;
            }
            xn[i] = acc;
        }
    } else {
        for (int64_t i = 0; i < d; i++) {
            const REAL a = br * hn[i];
            for (int64_t j = 0; j < dv; j++) y[i * dv + j] = x[i * dv + j] + a * e[j];
        }
    }
    if (rho_out) {  /* NULL when nothing will run backward (inference) */
        *rho_out = rho;
        *beta_out = beta;
        for (int64_t j = 0; j < dv; j++) en[j] = e[j];
    }
}

/* N rows: writes Y, x_next (if C), and the per-row rho, beta, e, v backward needs (unless those
 * four are NULL). */
int FN(epilogue_forward)(int64_t N, int64_t d, int64_t dv, const REAL *X, const REAL *h,
                         const REAL *z, const REAL *p, const REAL *C, int delta, int official,
                         double scale, double eps, REAL *Y, REAL *x_next, REAL *rho_out,
                         REAL *beta_out, REAL *e_out, REAL *v_out, int threads) {
    if (dv > MAX_DV) return 1;
    const int nt = FN(thread_count)(N * d * dv, threads);
#define EPILOGUE_FORWARD_LOOP(DV)                                                             \
    _Pragma("omp parallel for schedule(static) num_threads(nt)") for (int64_t n = 0; n < N;   \
                                                                      n++)                    \
        FN(epilogue_forward_row)(d, DV, X + n * d * dv, h + n * d, z[n], p + n * dv, C, delta, \
                                 official, scale, eps, Y + n * d * dv,                        \
                                 x_next ? x_next + n * d : NULL,                              \
                                 rho_out ? rho_out + n : NULL, beta_out ? beta_out + n : NULL, \
                                 e_out ? e_out + n * dv : NULL, v_out ? v_out + n * dv : NULL)
    FOR_DV(dv, EPILOGUE_FORWARD_LOOP)
#undef EPILOGUE_FORWARD_LOOP
    return 0;
}

/* The state before a rewrite from the state after it (ops/state_tape.py): X = Y - (beta rho h) e^T,
 * with the row scalars the forward kept for backward and the products formed as the forward
 * formed them (br = beta rho, a = br h[i]). N rows; one pass, no temporary. */
int FN(state_rebuild)(int64_t N, int64_t d, int64_t dv, const REAL *Y, const REAL *h,
                      const REAL *rho, const REAL *beta, const REAL *e, REAL *X, int threads) {
    const int nt = FN(thread_count)(N * d * dv, threads);
#define STATE_REBUILD_LOOP(DV)                                                                \
    _Pragma("omp parallel for schedule(static) num_threads(nt)") for (int64_t n = 0; n < N;   \
                                                                      n++) {                  \
        const REAL br = beta[n] * rho[n];                                                     \
        const REAL *RESTRICT yn = Y + n * d * DV, *RESTRICT hn = h + n * d;                   \
        const REAL *RESTRICT en = e + n * DV;                                                 \
        REAL *RESTRICT xn = X + n * d * DV;                                                   \
        for (int64_t i = 0; i < d; i++) {                                                     \
            const REAL a = br * hn[i];                                                        \
            for (int64_t j = 0; j < DV; j++) xn[i * DV + j] = yn[i * DV + j] - a * en[j];     \
        }                                                                                     \
    }
    FOR_DV(dv, STATE_REBUILD_LOOP)
#undef STATE_REBUILD_LOOP
    return 0;
}

/* One row of `update_forward_saved` below (inlined with dv a constant where the caller's is). */
INLINE void FN(update_forward_row)(int64_t n, int64_t d, const int64_t dv, const REAL *X,
                                   const REAL *h, const REAL *c, const REAL *u,
                                   const REAL *w_gate, const REAL *b_gate, const REAL *W_value,
                                   const REAL *b_value, const REAL *C, int delta, int official,
                                   double scale, double eps, REAL *Y, REAL *x_next,
                                   REAL *rho_out, REAL *beta_out, REAL *e_out, REAL *v_out) {
    const REAL *cn = c + n * d, *xin = official ? u + n * d : c + n * d;
    REAL z = b_gate[0], p[MAX_DV];
    for (int64_t i = 0; i < d; i++) z += w_gate[i] * cn[i];
    for (int64_t j = 0; j < dv; j++) {
        REAL acc = b_value ? b_value[j] : 0;
        for (int64_t i = 0; i < d; i++) acc += W_value[j * d + i] * xin[i];
        p[j] = acc;
    }
    FN(epilogue_forward_row)(d, dv, X + n * d * dv, h + n * d, z, p, C, delta, official, scale,
                             eps, Y + n * d * dv, x_next ? x_next + n * d : NULL,
                             rho_out ? rho_out + n : NULL, beta_out ? beta_out + n : NULL,
                             e_out ? e_out + n * dv : NULL, v_out ? v_out + n * dv : NULL);
}

/* A whole DDL update from the sublayer's inputs: the linear gate's logit z = w_g . c + b_g and
 * the value head's pre-activation p = W_v x (+ b_v), x = c ("paper") or u ("official"), then the
 * epilogue row above, which also writes the row scalars backward needs (rho, beta, e, and v for
 * the official head) where those pointers are not NULL. One call per sublayer instead of a dozen
 * dispatched ops (what decoding one token at a time is bound by), and in training no pass of its
 * own over c for the projections. W_v is (dv, d) row-major. */
int FN(update_forward_saved)(int64_t N, int64_t d, int64_t dv, const REAL *X, const REAL *h,
                             const REAL *c, const REAL *u, const REAL *w_gate, const REAL *b_gate,
                             const REAL *W_value, const REAL *b_value, const REAL *C, int delta,
                             int official, double scale, double eps, REAL *Y, REAL *x_next,
                             REAL *rho_out, REAL *beta_out, REAL *e_out, REAL *v_out,
                             int threads) {
    if (dv > MAX_DV) return 1;
    const int nt = FN(thread_count)(N * d * dv, threads);
#define UPDATE_FORWARD_ROW(DV)                                                                 \
    FN(update_forward_row)(n, d, DV, X, h, c, u, w_gate, b_gate, W_value, b_value, C, delta,   \
                           official, scale, eps, Y, x_next, rho_out, beta_out, e_out, v_out)
    /* One thread (a decoded token's one row): a plain loop, outside any OpenMP region. libgomp's
     * team set-up is code a decoded token does not keep warm: a call timed inside a decode loop
     * took 4.4 µs with it, 2.6–3.2 µs without (benchmarks/decode_calls.py). */
#define UPDATE_FORWARD_LOOP(DV)                                                                \
    if (nt > 1) {                                                                              \
        _Pragma("omp parallel for schedule(static) num_threads(nt)") for (int64_t n = 0; n < N; \
                                                                          n++)                 \
            UPDATE_FORWARD_ROW(DV);                                                            \
    } else {                                                                                   \
        for (int64_t n = 0; n < N; n++) UPDATE_FORWARD_ROW(DV);                                \
    }
    FOR_DV(dv, UPDATE_FORWARD_LOOP)
#undef UPDATE_FORWARD_LOOP
#undef UPDATE_FORWARD_ROW
    return 0;
}

/* The update above for inference: nothing kept for backward. */
int FN(update_forward)(int64_t N, int64_t d, int64_t dv, const REAL *X, const REAL *h,
                       const REAL *c, const REAL *u, const REAL *w_gate, const REAL *b_gate,
                       const REAL *W_value, const REAL *b_value, const REAL *C, int delta,
                       int official, double scale, double eps, REAL *Y, REAL *x_next,
                       int threads) {
    return FN(update_forward_saved)(N, d, dv, X, h, c, u, w_gate, b_gate, W_value, b_value, C,
                                    delta, official, scale, eps, Y, x_next, NULL, NULL, NULL,
                                    NULL, threads);
}

/* Backward of the rewrite epilogue for one row. GY = dL/dY; with C, gn = dL/dx_next and y (the
 * forward's output) for dL/dC. The gradient reaching Y is G = GY + C * gn (never stored). Then
 *   s = k^T G,  dX = G - beta k s^T (delta) or G,  dk = beta (G e - [delta] X s),
 *   dh = rho (dk - k (k^T dk)),  dz = (s^T e) beta (1 - beta/2),
 *   dp = beta s  or  beta s v (1 - v/scale),  dC += gn y^T (into this thread's partial sum).
 * gx may be NULL (not needed); x is read only for delta. With `rebuild` (delta) x is not read but
 * formed from y as state_rebuild forms it, x = y - (beta rho h) e^T, and written to xout: the
 * state the forward consumed, rebuilt in the pass that needs it (ops/state_tape.py) instead of in
 * a pass of its own that this one would then read back. */
INLINE void FN(epilogue_backward_row)(int64_t d, const int64_t dv, const REAL *RESTRICT gy, const REAL *RESTRICT gn,
                                      const REAL *RESTRICT C, const REAL *RESTRICT y, const REAL *RESTRICT x,
                                      const REAL *RESTRICT hn, REAL rho, REAL beta, const REAL *RESTRICT e,
                                      const REAL *RESTRICT vn, int official, double scale, REAL *RESTRICT gx,
                                      REAL *RESTRICT ghn, REAL *RESTRICT gzn, REAL *RESTRICT gpn, REAL *RESTRICT gC_partial,
                                      REAL *RESTRICT xout, const int delta, const int has_gn, const int has_gx,
                                      const int rebuild) {
    REAL s[MAX_DV];
    for (int64_t j = 0; j < dv; j++) s[j] = 0;
    for (int64_t i = 0; i < d; i++) {
        const REAL k = rho * hn[i];
        for (int64_t j = 0; j < dv; j++) {
            const REAL g = has_gn ? gy[i * dv + j] + C[i * dv + j] * gn[i] : gy[i * dv + j];
            s[j] += k * g;
        }
    }
    if (has_gn && gC_partial)
        for (int64_t i = 0; i < d; i++)
            for (int64_t j = 0; j < dv; j++) gC_partial[i * dv + j] += gn[i] * y[i * dv + j];
    REAL t = 0;
    const REAL br = beta * rho;
    for (int64_t i = 0; i < d; i++) {
        const REAL k = rho * hn[i];
        const REAL a = br * hn[i];
        REAL gk = 0;
        for (int64_t j = 0; j < dv; j++) {
            const REAL g = has_gn ? gy[i * dv + j] + C[i * dv + j] * gn[i] : gy[i * dv + j];
            gk += g * e[j];
            if (delta) {
                const REAL xij = rebuild ? y[i * dv + j] - a * e[j] : x[i * dv + j];
                if (rebuild) xout[i * dv + j] = xij;
                gk -= xij * s[j];
            }
            if (has_gx) gx[i * dv + j] = delta ? g - beta * k * s[j] : g;
        }
        gk *= beta;
        ghn[i] = gk;
        t += k * gk;
    }
    for (int64_t i = 0; i < d; i++) ghn[i] = rho * (ghn[i] - rho * hn[i] * t);
    REAL gb = 0;
    for (int64_t j = 0; j < dv; j++) {
        gb += s[j] * e[j];
        REAL gv = beta * s[j];
        if (official) gv *= vn[j] * (1 - vn[j] / (REAL)scale);
        gpn[j] = gv;
    }
    *gzn = gb * beta * (1 - beta / 2);
}

/* The row above with its flags as constants (each combination its own loops). dX is written
 * unless it is G itself (write-only without a read), where the caller passes NULL. Delta reads x,
 * or, where x is NULL and xout is not, rebuilds it from y into xout. */
INLINE void FN(epilogue_backward_flags)(int64_t d, const int64_t dv, const REAL *gy, const REAL *gn,
                                        const REAL *C, const REAL *y, const REAL *x, const REAL *hn,
                                        REAL rho, REAL beta, const REAL *e, const REAL *vn,
                                        int official, double scale, REAL *gx, REAL *ghn, REAL *gzn,
                                        REAL *gpn, REAL *gC_partial, REAL *xout) {
#define EPILOGUE_BACKWARD_ROW(DELTA, HAS_GN, HAS_GX, REBUILD)                                   \
    FN(epilogue_backward_row)(d, dv, gy, gn, C, y, x, hn, rho, beta, e, vn, official, scale, gx, \
                              ghn, gzn, gpn, gC_partial, xout, DELTA, HAS_GN, HAS_GX, REBUILD)
    if (x)
        gn ? EPILOGUE_BACKWARD_ROW(1, 1, 1, 0) : EPILOGUE_BACKWARD_ROW(1, 0, 1, 0);
    else if (xout)
        gn ? EPILOGUE_BACKWARD_ROW(1, 1, 1, 1) : EPILOGUE_BACKWARD_ROW(1, 0, 1, 1);
    else
        gn ? EPILOGUE_BACKWARD_ROW(0, 1, 1, 0) : EPILOGUE_BACKWARD_ROW(0, 0, 0, 0);
#undef EPILOGUE_BACKWARD_ROW
}

/* Sum the per-thread partial sums of a weight gradient, in thread order. */
static void FN(sum_partials)(const REAL *partial, int nt, int64_t size, REAL *out) {
    memset(out, 0, (size_t)size * sizeof(REAL));
    for (int tid = 0; tid < nt; tid++)
        for (int64_t q = 0; q < size; q++) out[q] += partial[(int64_t)tid * size + q];
}

static int FN(thread_id)(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* dC from the per-thread partial sums of a backward with a compressor read (freed here), or zeros
 * where no gradient reached x_next (`partial` NULL); nothing where dC is not wanted (`gC` NULL). */
static void FN(finish_compress_grad)(REAL *partial, int nt, int64_t d, int64_t dv, REAL *gC) {
    if (partial) {
        FN(sum_partials)(partial, nt, d * dv, gC);
        free(partial);
    } else if (gC) {
        memset(gC, 0, (size_t)d * dv * sizeof(REAL));
    }
}

/* N rows. X is read only for delta (NULL for write-only); with C, g_next and Y too. */
int FN(epilogue_backward)(int64_t N, int64_t d, int64_t dv, const REAL *GY, const REAL *g_next,
                          const REAL *C, const REAL *Y, const REAL *X, const REAL *h,
                          const REAL *rho_in, const REAL *beta_in, const REAL *e_in,
                          const REAL *v_in, int delta, int official, double scale, REAL *gX,
                          REAL *gh, REAL *gz, REAL *gp, REAL *gC, int threads) {
    if (dv > MAX_DV) return 1;
    if ((delta || g_next) && !gX) return 3;
    const int nt = FN(thread_count)(N * d * dv, threads);
    REAL *partial = NULL;
    if (gC && g_next) {
        partial = (REAL *)calloc((size_t)nt * d * dv, sizeof(REAL));
        if (!partial) return 2;
    }
#define EPILOGUE_BACKWARD_LOOP(DV)                                                             \
    _Pragma("omp parallel num_threads(nt)") {                                                  \
        REAL *mine = partial ? partial + (int64_t)FN(thread_id)() * d * dv : NULL;             \
        _Pragma("omp for schedule(static)") for (int64_t n = 0; n < N; n++)                    \
            FN(epilogue_backward_flags)(d, DV, GY + n * d * dv, g_next ? g_next + n * d : NULL, C, \
                                      Y ? Y + n * d * dv : NULL,                               \
                                      delta ? X + n * d * dv : NULL, h + n * d, rho_in[n],     \
                                      beta_in[n], e_in + n * dv, v_in + n * dv, official,      \
                                      scale, gX ? gX + n * d * dv : NULL, gh + n * d, gz + n,  \
                                      gp + n * dv, mine, NULL);                                \
    }
    FOR_DV(dv, EPILOGUE_BACKWARD_LOOP)
#undef EPILOGUE_BACKWARD_LOOP
    FN(finish_compress_grad)(partial, nt, d, dv, gC);
    return 0;
}

/* The projections' backward for one row, from the row's dz and dp (dv of them):
 *   dc = dz w_g (+ W_v^T dp where the value head reads c),  du = W_v^T dp (where it reads u),
 * written where gcn / gun are not NULL (du added to gun instead with `add_u`: u is the state,
 * gun its gradient's row), and into this thread's double partial sums `acc`
 * (layout: dw_g (d), db_g (1), dW_v (dv * d), db_v (dv)): dz c, dz, dp x^T, dp. */
INLINE void FN(projections_backward_row)(int64_t d, const int64_t dv, REAL gz, const REAL *RESTRICT gp,
                                         const REAL *RESTRICT cn, const REAL *RESTRICT xin,
                                         const REAL *RESTRICT w_gate, const REAL *RESTRICT W_value,
                                         int reads_u, REAL *RESTRICT gcn, REAL *RESTRICT gun,
                                         int add_u, double *RESTRICT acc) {
    if (gcn) {
        for (int64_t i = 0; i < d; i++) {
            REAL g = gz * w_gate[i];
            if (!reads_u)
                for (int64_t j = 0; j < dv; j++) g += gp[j] * W_value[j * d + i];
            gcn[i] = g;
        }
    }
    if (reads_u && gun) {
        for (int64_t i = 0; i < d; i++) {
            REAL g = 0;
            for (int64_t j = 0; j < dv; j++) g += gp[j] * W_value[j * d + i];
            gun[i] = add_u ? gun[i] + g : g;
        }
    }
    double *RESTRICT aw = acc, *RESTRICT aW = acc + d + 1, *RESTRICT abv = acc + d + 1 + dv * d;
    const double gzd = (double)gz;
    for (int64_t i = 0; i < d; i++) aw[i] += gzd * (double)cn[i];
    acc[d] += gzd;
    for (int64_t j = 0; j < dv; j++) {
        const double gpj = (double)gp[j];
        for (int64_t i = 0; i < d; i++) aW[j * d + i] += gpj * (double)xin[i];
        abv[j] += gpj;
    }
}

/* Sum the per-thread double partial sums `partial` (nt blocks of `size`) in thread order; write
 * the block [start, start + count) to `out` (skipped where NULL). */
static void FN(write_partials)(const double *partial, int nt, int64_t size, int64_t start,
                               int64_t count, REAL *out) {
    if (!out) return;
    for (int64_t q = 0; q < count; q++) {
        double sum = 0;
        for (int tid = 0; tid < nt; tid++) sum += partial[(int64_t)tid * size + start + q];
        out[q] = (REAL)sum;
    }
}

/* Backward of update_forward_saved: the epilogue row's backward (dX, dh, dC as epilogue_backward),
 * then the projections' (projections_backward_row). c is the gate's input, u the official value
 * head's (NULL for the paper head, which reads c); v is read for the official head only. Every
 * output but dh may be NULL where it is not needed (dX only where it is G itself: write-only
 * without a read). For delta, X NULL and X_out given: the state X is rebuilt from Y in the row
 * pass and written to X_out (epilogue_backward_row). `u_is_x` (delta, official head, dv = 1):
 * u is the state itself — read from the row of X just read or rebuilt, its gradient added to
 * dX (gu unused): no copy of u kept, no gradient of its own to sum. */
int FN(update_backward)(int64_t N, int64_t d, int64_t dv, const REAL *GY, const REAL *g_next,
                        const REAL *C, const REAL *Y, const REAL *X, const REAL *h, const REAL *c,
                        const REAL *u, const REAL *w_gate, const REAL *W_value,
                        const REAL *rho_in, const REAL *beta_in, const REAL *e_in,
                        const REAL *v_in, int delta, int official, double scale, REAL *gX,
                        REAL *gh, REAL *gc, REAL *gu, REAL *gw_gate, REAL *gb_gate,
                        REAL *gW_value, REAL *gb_value, REAL *gC, REAL *X_out, int u_is_x,
                        int threads) {
    if (dv > MAX_DV) return 1;
    if ((delta || g_next) && !gX) return 3;
    if (u_is_x && !(delta && official && dv == 1)) return 3;
    if (official && !u && !u_is_x) return 3;
    if (delta && !X && !(X_out && Y)) return 3;
    const int nt = FN(thread_count)(N * d * dv, threads);
    const int64_t size = d + 1 + dv * d + dv;
    double *partial = (double *)calloc((size_t)nt * size, sizeof(double));
    if (!partial) return 2;
    REAL *partial_C = NULL;
    if (gC && g_next) {
        partial_C = (REAL *)calloc((size_t)nt * d * dv, sizeof(REAL));
        if (!partial_C) {
            free(partial);
            return 2;
        }
    }
#define UPDATE_BACKWARD_LOOP(DV)                                                               \
    _Pragma("omp parallel num_threads(nt)") {                                                  \
        const int tid = FN(thread_id)();                                                       \
        REAL *mine_C = partial_C ? partial_C + (int64_t)tid * d * dv : NULL;                   \
        double *mine = partial + (int64_t)tid * size;                                          \
        _Pragma("omp for schedule(static)") for (int64_t n = 0; n < N; n++) {                  \
            REAL gz, gp[MAX_DV];                                                               \
            const REAL *cn = c + n * d;                                                        \
            FN(epilogue_backward_flags)(d, DV, GY + n * d * dv, g_next ? g_next + n * d : NULL, C, \
                                      Y ? Y + n * d * dv : NULL,                               \
                                      delta && X ? X + n * d * dv : NULL, h + n * d, rho_in[n], \
                                      beta_in[n], e_in + n * dv, v_in ? v_in + n * dv : NULL,  \
                                      official, scale, gX ? gX + n * d * dv : NULL, gh + n * d, \
                                      &gz, gp, mine_C,                                         \
                                      delta && !X ? X_out + n * d * dv : NULL);                \
            const REAL *xin = !official ? cn : !u_is_x ? u + n * d : X ? X + n * d : X_out + n * d; \
            REAL *gun = u_is_x ? gX + n * d : gu ? gu + n * d : NULL;                          \
            FN(projections_backward_row)(d, DV, gz, gp, cn, xin, w_gate, W_value, official,    \
                                         gc ? gc + n * d : NULL, gun, u_is_x, mine);           \
        }                                                                                      \
    }
    FOR_DV(dv, UPDATE_BACKWARD_LOOP)
#undef UPDATE_BACKWARD_LOOP
    FN(write_partials)(partial, nt, size, 0, d, gw_gate);
    FN(write_partials)(partial, nt, size, d, 1, gb_gate);
    FN(write_partials)(partial, nt, size, d + 1, dv * d, gW_value);
    FN(write_partials)(partial, nt, size, d + 1 + dv * d, dv, gb_value);
    free(partial);
    FN(finish_compress_grad)(partial_C, nt, d, dv, gC);
    return 0;
}

/* One output row of the compressor read over tokens (TC; the channel read CC is K = 1, past = 0):
 *   out[b, t, i] = sum_tau sum_j W[tau, i, j] xs[b, past + t - (K - 1 - tau), i, j]
 * Inputs before the first token are zeros. `acc` is a row-sized scratch (d * dv). */
INLINE void FN(read_forward_row)(int64_t S, int64_t past, int64_t d, const int64_t dv, int64_t K,
                                 int64_t b, int64_t t, const REAL *RESTRICT xs, const REAL *RESTRICT W, REAL *RESTRICT o,
                                 REAL *RESTRICT acc) {
    const int64_t row = d * dv;
    int first = 1;
    for (int64_t tau = 0; tau < K; tau++) {
        const int64_t src = past + t - (K - 1 - tau);
        if (src < 0) continue;
        const REAL *x = xs + (b * S + src) * row, *w = W + tau * row;
        if (first) {
            for (int64_t q = 0; q < row; q++) acc[q] = w[q] * x[q];
            first = 0;
        } else {
            for (int64_t q = 0; q < row; q++) acc[q] += w[q] * x[q];
        }
    }
    for (int64_t i = 0; i < d; i++) {
        REAL sum = 0;
        for (int64_t j = 0; j < dv; j++) sum += first ? 0 : acc[i * dv + j];
        o[i] = sum;
    }
}

/* xs (B, S, d, dv) with S = past + T; W (K, d, dv) (tap-major); out (B, T, d). */
int FN(read_forward)(int64_t B, int64_t S, int64_t past, int64_t d, int64_t dv, int64_t K,
                     const REAL *xs, const REAL *W, REAL *out, int threads) {
    const int64_t T = S - past, row = d * dv;
    const int nt = FN(thread_count)(B * T * row * K, threads);
    REAL *scratch = (REAL *)malloc((size_t)nt * row * sizeof(REAL));
    if (!scratch) return 2;
#define READ_FORWARD_LOOP(DV)                                                                  \
    _Pragma("omp parallel num_threads(nt)") {                                                  \
        REAL *acc = scratch + (int64_t)FN(thread_id)() * row;                                  \
        _Pragma("omp for schedule(static)") for (int64_t bt = 0; bt < B * T; bt++)             \
            FN(read_forward_row)(S, past, d, DV, K, bt / T, bt % T, xs, W, out + bt * d, acc); \
    }
    FOR_DV(dv, READ_FORWARD_LOOP)
#undef READ_FORWARD_LOOP
    free(scratch);
    return 0;
}

/* dxs[b, s, i, j] = sum_tau W[tau, i, j] G[b, s - past + (K - 1 - tau), i]   (0 <= index < T) */
INLINE void FN(read_input_grad_row)(int64_t T, int64_t past, int64_t d, const int64_t dv,
                                    int64_t K, int64_t b, int64_t s, const REAL *RESTRICT W, const REAL *RESTRICT G,
                                    REAL *RESTRICT gx) {
    const int64_t row = d * dv;
    for (int64_t q = 0; q < row; q++) gx[q] = 0;
    for (int64_t tau = 0; tau < K; tau++) {
        const int64_t t = s - past + (K - 1 - tau);
        if (t < 0 || t >= T) continue;
        const REAL *g = G + (b * T + t) * d, *w = W + tau * row;
        for (int64_t i = 0; i < d; i++)
            for (int64_t j = 0; j < dv; j++) gx[i * dv + j] += w[i * dv + j] * g[i];
    }
}

/* dW[tau, i, j] += G . x for one (b, t), x the input `past + t - (K - 1 - tau)`: for the read
 * (`expand` = 0) G[b, t, i] xs[b, src, i, j]; for the expansion (`expand` = 1) G[b, t, i, j]
 * e[b, src, i]. `expand` is a constant at each call, so each form gets its own loops. */
INLINE void FN(weight_grad_row)(int64_t S, int64_t past, int64_t d, const int64_t dv, int64_t K,
                                int64_t b, int64_t t, const REAL *RESTRICT xs,
                                const REAL *RESTRICT g, REAL *RESTRICT acc, const int expand) {
    const int64_t row = d * dv, x_row = expand ? d : row;
    for (int64_t tau = 0; tau < K; tau++) {
        const int64_t src = past + t - (K - 1 - tau);
        if (src < 0) continue;
        const REAL *x = xs + (b * S + src) * x_row;
        REAL *a = acc + tau * row;
        for (int64_t i = 0; i < d; i++)
            for (int64_t j = 0; j < dv; j++)
                a[i * dv + j] += expand ? g[i * dv + j] * x[i] : g[i] * x[i * dv + j];
    }
}

/* The embedding expansion EC: a causal depthwise convolution over tokens from d features to d * dv
 * channels (channel (i, j) reads feature i), written token-major:
 *   out[b, t, i, j] = sum_tau W[tau, i, j] e[b, past + t - (K - 1 - tau), i]
 * e (B, S, d) with S = past + T; W (K, d, dv) (tap-major); out (B, T, d, dv). */
INLINE void FN(expand_forward_row)(int64_t S, int64_t past, int64_t d, const int64_t dv, int64_t K,
                                   int64_t b, int64_t t, const REAL *RESTRICT e,
                                   const REAL *RESTRICT W, REAL *RESTRICT o) {
    const int64_t row = d * dv;
    for (int64_t q = 0; q < row; q++) o[q] = 0;
    for (int64_t tau = 0; tau < K; tau++) {
        const int64_t src = past + t - (K - 1 - tau);
        if (src < 0) continue;
        const REAL *x = e + (b * S + src) * d, *w = W + tau * row;
        for (int64_t i = 0; i < d; i++)
            for (int64_t j = 0; j < dv; j++) o[i * dv + j] += w[i * dv + j] * x[i];
    }
}

int FN(expand_forward)(int64_t B, int64_t S, int64_t past, int64_t d, int64_t dv, int64_t K,
                       const REAL *e, const REAL *W, REAL *out, int threads) {
    const int64_t T = S - past, row = d * dv;
    const int nt = FN(thread_count)(B * T * row * K, threads);
#define EXPAND_FORWARD_LOOP(DV)                                                                \
    _Pragma("omp parallel for schedule(static) num_threads(nt)") for (int64_t bt = 0;          \
                                                                      bt < B * T; bt++)        \
        FN(expand_forward_row)(S, past, d, DV, K, bt / T, bt % T, e, W, out + bt * row)
    FOR_DV(dv, EXPAND_FORWARD_LOOP)
#undef EXPAND_FORWARD_LOOP
    return 0;
}

/* de[b, s, i] = sum_tau sum_j W[tau, i, j] G[b, s - past + (K - 1 - tau), i, j]   (0 <= index < T) */
INLINE void FN(expand_input_grad_row)(int64_t T, int64_t past, int64_t d, const int64_t dv,
                                      int64_t K, int64_t b, int64_t s, const REAL *RESTRICT W,
                                      const REAL *RESTRICT G, REAL *RESTRICT ge) {
    const int64_t row = d * dv;
    for (int64_t i = 0; i < d; i++) ge[i] = 0;
    for (int64_t tau = 0; tau < K; tau++) {
        const int64_t t = s - past + (K - 1 - tau);
        if (t < 0 || t >= T) continue;
        const REAL *g = G + (b * T + t) * row, *w = W + tau * row;
        for (int64_t i = 0; i < d; i++) {
            REAL acc = 0;
            for (int64_t j = 0; j < dv; j++) acc += w[i * dv + j] * g[i * dv + j];
            ge[i] += acc;
        }
    }
}

/* The backward of both token convolutions, either output may be NULL: of read_forward
 * (`expand` = 0) from G = dL/dout (B, T, d), giving dxs (B, S, d, dv); of expand_forward
 * (`expand` = 1) from G (B, T, d, dv), giving de (B, S, d). dW (K, d, dv) either way. */
static int FN(token_conv_backward)(int64_t B, int64_t S, int64_t past, int64_t d, int64_t dv,
                                   int64_t K, const REAL *xs, const REAL *W, const REAL *G,
                                   REAL *gxs, REAL *gW, int threads, int expand) {
    const int64_t T = S - past, row = d * dv;
    const int64_t g_row = expand ? row : d;
    const int nt = FN(thread_count)(B * S * row * K, threads);
    if (gxs) {
#define INPUT_GRAD_LOOP(DV)                                                                    \
    _Pragma("omp parallel for schedule(static) num_threads(nt)") for (int64_t bs = 0;          \
                                                                      bs < B * S; bs++) {      \
        if (expand)                                                                            \
            FN(expand_input_grad_row)(T, past, d, DV, K, bs / S, bs % S, W, G, gxs + bs * d);  \
        else                                                                                   \
            FN(read_input_grad_row)(T, past, d, DV, K, bs / S, bs % S, W, G, gxs + bs * row);  \
    }
        FOR_DV(dv, INPUT_GRAD_LOOP)
#undef INPUT_GRAD_LOOP
    }
    if (gW) {
        REAL *partial = (REAL *)calloc((size_t)nt * K * row, sizeof(REAL));
        if (!partial) return 2;
#define WEIGHT_GRAD_LOOP(DV)                                                                   \
    _Pragma("omp parallel num_threads(nt)") {                                                  \
        REAL *mine = partial + (int64_t)FN(thread_id)() * K * row;                             \
        _Pragma("omp for schedule(static)") for (int64_t bt = 0; bt < B * T; bt++) {           \
            const REAL *g = G + bt * g_row;                                                    \
            if (expand)                                                                        \
                FN(weight_grad_row)(S, past, d, DV, K, bt / T, bt % T, xs, g, mine, 1);        \
            else                                                                               \
                FN(weight_grad_row)(S, past, d, DV, K, bt / T, bt % T, xs, g, mine, 0);        \
        }                                                                                      \
    }
        FOR_DV(dv, WEIGHT_GRAD_LOOP)
#undef WEIGHT_GRAD_LOOP
        FN(sum_partials)(partial, nt, K * row, gW);
        free(partial);
    }
    return 0;
}

int FN(read_backward)(int64_t B, int64_t S, int64_t past, int64_t d, int64_t dv, int64_t K,
                      const REAL *xs, const REAL *W, const REAL *G, REAL *gxs, REAL *gW,
                      int threads) {
    return FN(token_conv_backward)(B, S, past, d, dv, K, xs, W, G, gxs, gW, threads, 0);
}

int FN(expand_backward)(int64_t B, int64_t S, int64_t past, int64_t d, int64_t dv, int64_t K,
                        const REAL *e, const REAL *W, const REAL *G, REAL *ge, REAL *gW,
                        int threads) {
    return FN(token_conv_backward)(B, S, past, d, dv, K, e, W, G, ge, gW, threads, 1);
}

/* Prepared calls (ops/native.py: InferenceUpdate, PreparedConv): what stays the same from one
 * decoded token to the next is packed once into `ints` (sizes, flags, weight addresses) and
 * `reals`, so a call passes only the per-token arrays: each ctypes argument costs host time, and
 * one-token decoding is bound by it.
 *   update:  ints = N, d, dv, w_gate, b_gate, W_value, b_value, C, delta, official;
 *            reals = scale, eps
 *   read, expand: ints = B, S, past, d, dv, K, taps */
#define ADDR(T, v) ((T)(intptr_t)(v))
int FN(update_forward_packed)(const int64_t *ints, const double *reals, const REAL *X,
                              const REAL *h, const REAL *c, const REAL *u, REAL *Y, REAL *x_next,
                              int threads) {
    return FN(update_forward)(ints[0], ints[1], ints[2], X, h, c, u, ADDR(const REAL *, ints[3]),
                              ADDR(const REAL *, ints[4]), ADDR(const REAL *, ints[5]),
                              ADDR(const REAL *, ints[6]), ADDR(const REAL *, ints[7]),
                              (int)ints[8], (int)ints[9], reals[0], reals[1], Y, x_next, threads);
}

int FN(read_forward_packed)(const int64_t *ints, const REAL *xs, REAL *out, int threads) {
    return FN(read_forward)(ints[0], ints[1], ints[2], ints[3], ints[4], ints[5], xs,
                            ADDR(const REAL *, ints[6]), out, threads);
}

int FN(expand_forward_packed)(const int64_t *ints, const REAL *e, REAL *out, int threads) {
    return FN(expand_forward)(ints[0], ints[1], ints[2], ints[3], ints[4], ints[5], e,
                              ADDR(const REAL *, ints[6]), out, threads);
}
#undef ADDR
