/* The ReSTE backward on float32 CPU tensors: grad * f(x), optionally sign(x), and a binary weight's
   whole gradient, built by reste_timm.nn.native with the system C compiler and called through ctypes
   by reste_timm.nn.kernels.

   f is the ReSTE factor defined in reste_timm.nn.estimators.reste_factor (the one definition; every
   function here is tested against it):
       f(x) = m^(1/o) / m          |x| <= m
       f(x) = (1/o) |x|^(1/o - 1)  m < |x| <= t
       f(x) = 0                    |x| > t
   The caller passes m, t, secant = m^(1/o)/m, inv_o = 1/o and power = (1-o)/o, computed in double.

   No -ffast-math: NaN, comparisons and rounding keep IEEE semantics. */

/* ln(2)^k / k!, the Taylor coefficients of 2^r. */
#define TAYLOR1 0.69314718055994529f
#define TAYLOR2 0.24022650695910069f
#define TAYLOR3 0.055504108664821576f
#define TAYLOR4 0.0096181291076284769f
#define TAYLOR5 0.0013333558146428441f
#define TAYLOR6 0.00015403530393381606f
#define TAYLOR7 1.5252733804059838e-05f

#include <stdint.h>
#include <string.h>

/* log2 of a positive normal float: exponent bits plus 2 atanh(s) / ln 2, |s| <= 0.2 (series to s^9). */
static inline float log2_pos(float y) {
    int32_t bits, mbits;
    float u, s, s2, series;
    memcpy(&bits, &y, 4);
    bits -= 0x3F2AAAAB;                       /* bits of 2/3: the mantissa lands in [2/3, 4/3) */
    mbits = (bits & 0x7FFFFF) + 0x3F2AAAAB;
    memcpy(&u, &mbits, 4);
    s = (u - 1.0f) / (u + 1.0f);
    s2 = s * s;
    series = 1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9))));
    return (float)(bits >> 23) + 2.8853900817779268f * s * series;  /* 2 / ln 2 */
}

/* 2^z for z in [-125, 125]: 2^n times a degree-7 Taylor polynomial of 2^r, r in [-1/2, 1/2]
   (truncation below 6e-9 relative). */
static inline float exp2_mid(float z) {
    float n = __builtin_floorf(z + 0.5f), r = z - n, p;
    int32_t bits;
    p = TAYLOR7;
    p = p * r + TAYLOR6;
    p = p * r + TAYLOR5;
    p = p * r + TAYLOR4;
    p = p * r + TAYLOR3;
    p = p * r + TAYLOR2;
    p = p * r + TAYLOR1;
    p = p * r + 1.0f;
    memcpy(&bits, &p, 4);
    bits += (int32_t)n << 23;
    memcpy(&p, &bits, 4);
    return p;
}

/* sign(x) as torch.sign gives it: 0 for +-0 and NaN. */
static inline float sign_of(float xv) {
    return (float)((xv > 0.0f) - (xv < 0.0f));
}

/* |x| is clamped into [m, t] before the powers, so that z = power * log2 stays within |log2 m| and
   |log2 t| (power is in (-1, 0] for o >= 1): no clamp of z is needed when m >= 2^-120 and t <= 2^120,
   which the caller checks. Two selects, written one after the other (a nested ?: with NaN-aware
   comparisons compiles to three masks and blends, a slower loop). A NaN x gives 0. */
static inline float reste_factor(float xv, float m, float t, float secant, float inv_o, float power) {
    float ax = __builtin_fabsf(xv);
    float ac = ax > m ? ax : m;
    float f, v;
    ac = ac < t ? ac : t;
    f = exp2_mid(log2_pos(ac) * power) * inv_o;
    v = ax <= t ? f : 0.0f;
    return ax <= m ? secant : v;
}

/* grad_out = grad * f(x), f the ReSTE factor; sign_out (may be NULL) = sign_of(x). grad_out may alias
   grad. Two loops, so that each is branch-free and vectorizes. */
void reste_grad(const float *x, const float *grad, float *grad_out, float *sign_out, int64_t n,
                float m, float t, float secant, float inv_o, float power, int threads) {
    if (sign_out) {
        #pragma omp parallel for simd num_threads(threads) schedule(static) if (parallel: threads > 1)
        for (int64_t i = 0; i < n; i++) {
            float xv = x[i];
            grad_out[i] = grad[i] * reste_factor(xv, m, t, secant, inv_o, power);
            sign_out[i] = sign_of(xv);
        }
    } else {
        #pragma omp parallel for simd num_threads(threads) schedule(static) if (parallel: threads > 1)
        for (int64_t i = 0; i < n; i++)
            grad_out[i] = grad[i] * reste_factor(x[i], m, t, secant, inv_o, power);
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* The same factor without log2 and exp2, 8 floats at a time: with |x| clamped into [m, t] as above,
   |x| = 2^E * u, u in [1, 2); u^power is a degree-4 polynomial on each eighth of [1, 2) (variable
   r = u - the eighth's midpoint, exact in float), inv_o * 2^(E * power) one of 8 scales: both picked
   by a lane permute from registers (no gathers, which cost more than the powers here). The caller
   checks that [m, t] spans at most 8 binades and fits the tables in float64 (reste_timm.nn.kernels).
   coef[8k + j] is coefficient k of eighth j; scale[E - e_lo]. */
typedef struct { __m256 c0, c1, c2, c3, c4, scale, m, t, secant; __m256i e_lo; } poly_consts;

static inline __m256 poly_factor8(__m256 xv, const poly_consts *k) {
    const __m256 ax = _mm256_and_ps(xv, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
    /* max/min return their second operand for a NaN first one: a NaN x computes at m and is zeroed
       below (both comparisons false), as in reste_factor. */
    const __m256 ac = _mm256_min_ps(_mm256_max_ps(ax, k->m), k->t);
    const __m256i bits = _mm256_castps_si256(ac);
    const __m256i j = _mm256_and_si256(_mm256_srli_epi32(bits, 20), _mm256_set1_epi32(7));
    const __m256 r = _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(bits, _mm256_set1_epi32(0xFFFFF))),
                                     _mm256_set1_ps(0x1p-23f), _mm256_set1_ps(0.0625f));
    __m256 p = _mm256_permutevar8x32_ps(k->c4, j);
    p = _mm256_fmadd_ps(p, r, _mm256_permutevar8x32_ps(k->c3, j));
    p = _mm256_fmadd_ps(p, r, _mm256_permutevar8x32_ps(k->c2, j));
    p = _mm256_fmadd_ps(p, r, _mm256_permutevar8x32_ps(k->c1, j));
    p = _mm256_fmadd_ps(p, r, _mm256_permutevar8x32_ps(k->c0, j));
    const __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), k->e_lo);
    __m256 f = _mm256_mul_ps(p, _mm256_permutevar8x32_ps(k->scale, e));
    f = _mm256_and_ps(f, _mm256_cmp_ps(ax, k->t, _CMP_LE_OQ));
    return _mm256_blendv_ps(f, k->secant, _mm256_cmp_ps(ax, k->m, _CMP_LE_OQ));
}

static inline void poly_block8(const float *x, const float *grad, float *grad_out, float *sign_out,
                               const poly_consts *k) {
    const __m256 xv = _mm256_loadu_ps(x), zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    _mm256_storeu_ps(grad_out, _mm256_mul_ps(_mm256_loadu_ps(grad), poly_factor8(xv, k)));
    if (sign_out)  /* sign_of: (x > 0) - (x < 0), 0 for +-0 and NaN */
        _mm256_storeu_ps(sign_out, _mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(xv, zero, _CMP_GT_OQ), one),
                                                 _mm256_and_ps(_mm256_cmp_ps(xv, zero, _CMP_LT_OQ), one)));
}

#if defined(__AVX512F__)
/* poly_factor8 on 16 lanes: the same instructions lane by lane (so the same results), the 8-entry
   tables repeated in both halves of each permute's source. */
typedef struct { __m512 c0, c1, c2, c3, c4, scale, m, t, secant; __m512i e_lo; } poly_consts16;

static inline __m512 widen8(__m256 v) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(v), v, 1);
}

static inline __m512 poly_factor16(__m512 xv, const poly_consts16 *k) {
    const __m512 ax = _mm512_abs_ps(xv);
    const __m512 ac = _mm512_min_ps(_mm512_max_ps(ax, k->m), k->t);
    const __m512i bits = _mm512_castps_si512(ac);
    const __m512i j = _mm512_and_si512(_mm512_srli_epi32(bits, 20), _mm512_set1_epi32(7));
    const __m512 r = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bits, _mm512_set1_epi32(0xFFFFF))),
                                     _mm512_set1_ps(0x1p-23f), _mm512_set1_ps(0.0625f));
    __m512 p = _mm512_permutexvar_ps(j, k->c4);
    p = _mm512_fmadd_ps(p, r, _mm512_permutexvar_ps(j, k->c3));
    p = _mm512_fmadd_ps(p, r, _mm512_permutexvar_ps(j, k->c2));
    p = _mm512_fmadd_ps(p, r, _mm512_permutexvar_ps(j, k->c1));
    p = _mm512_fmadd_ps(p, r, _mm512_permutexvar_ps(j, k->c0));
    const __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(bits, 23), k->e_lo);
    const __m512 f = _mm512_mul_ps(p, _mm512_permutexvar_ps(e, k->scale));
    const __m512 cut = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(ax, k->t, _CMP_LE_OQ), f);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(ax, k->m, _CMP_LE_OQ), cut, k->secant);
}

static inline void poly_block16(const float *x, const float *grad, float *grad_out, float *sign_out,
                                const poly_consts16 *k) {
    const __m512 xv = _mm512_loadu_ps(x), zero = _mm512_setzero_ps();
    _mm512_storeu_ps(grad_out, _mm512_mul_ps(_mm512_loadu_ps(grad), poly_factor16(xv, k)));
    if (sign_out) {
        const __m512 pos = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(xv, zero, _CMP_GT_OQ), _mm512_set1_ps(1.0f));
        const __m512 neg = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(xv, zero, _CMP_LT_OQ), _mm512_set1_ps(1.0f));
        _mm512_storeu_ps(sign_out, _mm512_sub_ps(pos, neg));
    }
}

static void poly_blocks(const float *x, const float *grad, float *grad_out, float *sign_out, int64_t nv,
                        const poly_consts *k8, int threads) {
    poly_consts16 k;
    int64_t n16 = nv / 2;
    k.c0 = widen8(k8->c0); k.c1 = widen8(k8->c1); k.c2 = widen8(k8->c2); k.c3 = widen8(k8->c3);
    k.c4 = widen8(k8->c4); k.scale = widen8(k8->scale);
    k.m = widen8(k8->m); k.t = widen8(k8->t); k.secant = widen8(k8->secant);
    k.e_lo = _mm512_castps_si512(widen8(_mm256_castsi256_ps(k8->e_lo)));
    #pragma omp parallel for num_threads(threads) schedule(static) if (parallel: threads > 1)
    for (int64_t v = 0; v < n16; v++)
        poly_block16(x + 16 * v, grad + 16 * v, grad_out + 16 * v, sign_out ? sign_out + 16 * v : 0, &k);
    if (nv % 2)
        poly_block8(x + 16 * n16, grad + 16 * n16, grad_out + 16 * n16, sign_out ? sign_out + 16 * n16 : 0,
                    k8);
}
#else
static void poly_blocks(const float *x, const float *grad, float *grad_out, float *sign_out, int64_t nv,
                        const poly_consts *k, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (parallel: threads > 1)
    for (int64_t v = 0; v < nv; v++)
        poly_block8(x + 8 * v, grad + 8 * v, grad_out + 8 * v, sign_out ? sign_out + 8 * v : 0, k);
}
#endif

/* reste_grad through poly_factor8 (16 lanes at a time where the compiler targets AVX-512). The last
   n % 8 elements go through the same block via copies, so every element gets the same arithmetic
   wherever it sits. */
void reste_grad_poly(const float *x, const float *grad, float *grad_out, float *sign_out, int64_t n,
                     float m, float t, float secant, const float *coef, const float *scale, int e_lo,
                     int threads) {
    poly_consts k;
    float tx[8] = {0}, tg[8] = {0}, to[8], ts[8];
    int64_t nv = n / 8, rest = n % 8;
    k.c0 = _mm256_loadu_ps(coef);
    k.c1 = _mm256_loadu_ps(coef + 8);
    k.c2 = _mm256_loadu_ps(coef + 16);
    k.c3 = _mm256_loadu_ps(coef + 24);
    k.c4 = _mm256_loadu_ps(coef + 32);
    k.scale = _mm256_loadu_ps(scale);
    k.m = _mm256_set1_ps(m);
    k.t = _mm256_set1_ps(t);
    k.secant = _mm256_set1_ps(secant);
    k.e_lo = _mm256_set1_epi32(e_lo);
    poly_blocks(x, grad, grad_out, sign_out, nv, &k, threads);
    if (rest) {
        memcpy(tx, x + 8 * nv, rest * 4);
        memcpy(tg, grad + 8 * nv, rest * 4);
        poly_block8(tx, tg, to, sign_out ? ts : 0, &k);
        memcpy(grad_out + 8 * nv, to, rest * 4);
        if (sign_out)
            memcpy(sign_out + 8 * nv, ts, rest * 4);
    }
}
#endif

/* The gradient of bw = est(w) * mean(|w|) with respect to w, in the order autograd would compute it:
   (grad * scale) * f(w) through est, plus sign(w) * (sum(grad * sign(w)) / n) through the scale. The
   sum is accumulated in double. grad_out may alias grad (the sum is complete before any write). */
void reste_weight_grad(const float *w, const float *grad, float *grad_out, int64_t n, const float *scale_ptr,
                       float m, float t, float secant, float inv_o, float power, int threads) {
    double acc = 0.0;
    float gs, scale = *scale_ptr;
    #pragma omp parallel for simd num_threads(threads) schedule(static) reduction(+:acc) \
        if (parallel: threads > 1)
    for (int64_t i = 0; i < n; i++)
        acc += (double)(grad[i] * sign_of(w[i]));
    gs = (float)acc / (float)n;
    #pragma omp parallel for simd num_threads(threads) schedule(static) if (parallel: threads > 1)
    for (int64_t i = 0; i < n; i++) {
        float wv = w[i];
        float through_est = grad[i] * scale * reste_factor(wv, m, t, secant, inv_o, power);
        grad_out[i] = through_est + sign_of(wv) * gs;
    }
}
