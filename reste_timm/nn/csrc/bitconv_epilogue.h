/* bitconv_epilogue.h -- the fused epilogue of one block of 16 outputs, one per SIMD path.
 * Part of bitconv.c, which includes it once (a single translation unit, so the compiler sees every
 * function when it inlines the micro-kernels and specializes the epilogue); not a standalone header. */

/* ----------------------------------------------------------------------------------------------------- */
/* Epilogue: 16 outputs (one block) of one pixel                                                          */
/* ----------------------------------------------------------------------------------------------------- */

typedef struct {
    /* input */
    const uint64_t *bits, *mask;
    int64_t N, H, W, C, Cw;
    /* weights */
    const uint64_t *wdata;
    const int32_t *wpop;
    int64_t Cout, nblk, T, K, bstride;
    int64_t wk; /* words per step k of a block's weights: BC_OB, or 2 * BC_OB in the AVX2 nibble copy */
    int KH, KW, sh, sw, ph, pw, mode;
    const int64_t *toff; /* [T] word offset of tap t relative to the top-left tap: (kh * W + kw) * Cw */
    /* output */
    int64_t OH, OW, Cwo;
    float scale;
    const float *bias, *alpha, *beta; /* padded to nblk*16, or NULL */
    const float *res;
    int relu;
    float *out;
    uint64_t *obits, *omask;
    int epi_flags; /* bit 0 bias, 1 relu, 2 affine, 3 residual, 4 float out, 5 bits, 6 mask */
    /* the padded path (bitconv_tiles.h): bits, H and W are the padded input's; each output pixel's class
       (rcls[oh] * nccls + ccls[ow]) gives its base cbase[] and correction ccorr[][nblk * 16]; class cint (-1:
       none) has every tap in bounds */
    int padded, nccls;
    int64_t cint;
    const int32_t *rcls, *ccls, *cbase, *ccorr;
} bc_conv;

/* Stores the 16 sign / nonzero bits of block blk of pixel pix (bits >= nv cleared).  Returns the number of
   zeros among the nv real outputs. */
BC_INLINE int64_t store_bits16(const bc_conv *restrict A, int64_t pix, int64_t blk, int64_t nv, uint32_t neg, uint32_t nz) {
    uint32_t valid = nv == BC_OB ? 0xFFFFu : ((1u << nv) - 1u);
    neg &= valid;
    nz &= valid;
    uint16_t *ob = (uint16_t *)(A->obits + pix * A->Cwo);
    uint16_t *om = A->omask ? (uint16_t *)(A->omask + pix * A->Cwo) : NULL;
    ob[blk] = (uint16_t)neg;
    if (om) om[blk] = (uint16_t)nz;
    return (int64_t)nv - pop64(nz);
}

/* Scalar epilogue (portable path, and partial blocks of every path). */
static int64_t epilogue_scalar(const bc_conv *restrict A, int64_t pix, int64_t blk, const int32_t *pcv, int32_t base,
                               const int32_t *corr) {
    const int64_t oc0 = blk * BC_OB;
    const int64_t nv = A->Cout - oc0 < BC_OB ? A->Cout - oc0 : BC_OB;
    float y[BC_OB];
    for (int o = 0; o < BC_OB; o++) {
        int32_t d = base - 2 * (pcv[o] - (corr ? corr[o] : 0));
        float v = (float)d * A->scale;
        if (A->bias) v += A->bias[oc0 + o];
        if (A->relu) v = v > 0.0f ? v : 0.0f;
        if (A->alpha) v = fmaf(v, A->alpha[oc0 + o], A->beta[oc0 + o]);
        if (o < nv && A->res) v += A->res[pix * A->Cout + oc0 + o];
        y[o] = v;
    }
    if (A->out)
        for (int o = 0; o < nv; o++) A->out[pix * A->Cout + oc0 + o] = y[o];
    if (!A->obits) return 0;
    uint32_t neg = 0, nz = 0;
    for (int o = 0; o < BC_OB; o++) {
        neg |= (uint32_t)(y[o] < 0.0f) << o;
        nz |= (uint32_t)(y[o] < 0.0f || y[o] > 0.0f) << o;
    }
    return store_bits16(A, pix, blk, nv, neg, nz);
}

/* 16-lane float helpers of each path, used by the fused epilogue (one vector = one block of 16 channels). */
#if defined(BC_PATH_AVX512)
typedef __m512 v16;
BC_INLINE v16 v_load(const float *p) { return _mm512_loadu_ps(p); }
BC_INLINE void v_store(float *p, v16 y) { _mm512_storeu_ps(p, y); }
BC_INLINE v16 v_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
BC_INLINE v16 v_relu(v16 y) { return _mm512_max_ps(y, _mm512_setzero_ps()); }
BC_INLINE v16 v_fma(v16 y, v16 a, v16 b) { return _mm512_fmadd_ps(y, a, b); }
/* (float)(base - 2 * (d - corr)) * s of sums d already in a register (the direct route) */
BC_INLINE v16 v_dot_sums(int32_t base, __m512i d, const int32_t *corr, float s) {
    if (corr) d = _mm512_sub_epi32(d, _mm512_loadu_si512((const void *)corr));
    d = _mm512_sub_epi32(_mm512_set1_epi32(base), _mm512_add_epi32(d, d));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(s));
}
/* (float)(base - 2 * (pc - corr)) * s */
BC_INLINE v16 v_dot(int32_t base, const int32_t *pc, const int32_t *corr, float s) {
    return v_dot_sums(base, _mm512_loadu_si512((const void *)pc), corr, s);
}
BC_INLINE uint32_t v_neg(v16 y) { return (uint32_t)_mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LT_OQ); }
BC_INLINE uint32_t v_nz(v16 y) { return (uint32_t)_mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_NEQ_OQ); }
#define BC_HAVE_V16 1
#elif defined(BC_PATH_AVX2) && defined(__FMA__)
typedef struct { __m256 a, b; } v16;
BC_INLINE v16 v_load(const float *p) { v16 r = {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; return r; }
BC_INLINE void v_store(float *p, v16 y) { _mm256_storeu_ps(p, y.a); _mm256_storeu_ps(p + 8, y.b); }
BC_INLINE v16 v_add(v16 x, v16 y) { v16 r = {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; return r; }
BC_INLINE v16 v_relu(v16 y) {
    v16 r = {_mm256_max_ps(y.a, _mm256_setzero_ps()), _mm256_max_ps(y.b, _mm256_setzero_ps())};
    return r;
}
BC_INLINE v16 v_fma(v16 y, v16 a, v16 b) { v16 r = {_mm256_fmadd_ps(y.a, a.a, b.a), _mm256_fmadd_ps(y.b, a.b, b.b)}; return r; }
BC_INLINE __m256 v_dot8(int32_t base, const int32_t *pc, const int32_t *corr, float s) {
    __m256i d = _mm256_loadu_si256((const __m256i *)pc);
    if (corr) d = _mm256_sub_epi32(d, _mm256_loadu_si256((const __m256i *)corr));
    d = _mm256_sub_epi32(_mm256_set1_epi32(base), _mm256_add_epi32(d, d));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(s));
}
BC_INLINE v16 v_dot(int32_t base, const int32_t *pc, const int32_t *corr, float s) {
    v16 r = {v_dot8(base, pc, corr, s), v_dot8(base, pc + 8, corr ? corr + 8 : NULL, s)};
    return r;
}
BC_INLINE uint32_t v_neg(v16 y) {
    return (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(y.a, _mm256_setzero_ps(), _CMP_LT_OQ)) |
           ((uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(y.b, _mm256_setzero_ps(), _CMP_LT_OQ)) << 8);
}
BC_INLINE uint32_t v_nz(v16 y) {
    return (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(y.a, _mm256_setzero_ps(), _CMP_NEQ_OQ)) |
           ((uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(y.b, _mm256_setzero_ps(), _CMP_NEQ_OQ)) << 8);
}
#define BC_HAVE_V16 1
#elif defined(BC_PATH_NEON)
typedef struct { float32x4_t q[4]; } v16;
BC_INLINE v16 v_load(const float *p) {
    v16 r;
    for (int h = 0; h < 4; h++) r.q[h] = vld1q_f32(p + 4 * h);
    return r;
}
BC_INLINE void v_store(float *p, v16 y) {
    for (int h = 0; h < 4; h++) vst1q_f32(p + 4 * h, y.q[h]);
}
BC_INLINE v16 v_add(v16 x, v16 y) {
    for (int h = 0; h < 4; h++) x.q[h] = vaddq_f32(x.q[h], y.q[h]);
    return x;
}
BC_INLINE v16 v_relu(v16 y) { /* y > 0 ? y : +0 (as the other paths; NaN -> 0) */
    const float32x4_t z = vdupq_n_f32(0.0f);
    for (int h = 0; h < 4; h++) y.q[h] = vbslq_f32(vcgtq_f32(y.q[h], z), y.q[h], z);
    return y;
}
BC_INLINE v16 v_fma(v16 y, v16 a, v16 b) {
    for (int h = 0; h < 4; h++) y.q[h] = vfmaq_f32(b.q[h], y.q[h], a.q[h]);
    return y;
}
BC_INLINE v16 v_dot(int32_t base, const int32_t *pc, const int32_t *corr, float s) {
    v16 r;
    for (int h = 0; h < 4; h++) {
        int32x4_t d = vld1q_s32(pc + 4 * h);
        if (corr) d = vsubq_s32(d, vld1q_s32(corr + 4 * h));
        d = vsubq_s32(vdupq_n_s32(base), vaddq_s32(d, d));
        r.q[h] = vmulq_n_f32(vcvtq_f32_s32(d), s);
    }
    return r;
}
BC_INLINE uint32_t v_bits(v16 y, int nonzero) {
    static const uint32_t wts[4] = {1, 2, 4, 8};
    const uint32x4_t wv = vld1q_u32(wts);
    const float32x4_t z = vdupq_n_f32(0.0f);
    uint32_t b = 0;
    for (int h = 0; h < 4; h++) {
        uint32x4_t m = vcltq_f32(y.q[h], z);
        if (nonzero) m = vorrq_u32(m, vcgtq_f32(y.q[h], z));
        b |= vaddvq_u32(vandq_u32(m, wv)) << (4 * h);
    }
    return b;
}
BC_INLINE uint32_t v_neg(v16 y) { return v_bits(y, 0); }
BC_INLINE uint32_t v_nz(v16 y) { return v_bits(y, 1); }
#define BC_HAVE_V16 1
#endif


/* Clears the 16-bit pieces of pixels pix0 .. pix0+np-1's last packed word past the last block. */
BC_INLINE void clear_bits_tail(const bc_conv *restrict A, int64_t pix0, int np) {
    const int64_t Cwo4 = A->Cwo * 4;
    uint16_t *ob = (uint16_t *)(A->obits + pix0 * A->Cwo);
    uint16_t *om = A->omask ? (uint16_t *)(A->omask + pix0 * A->Cwo) : NULL;
    for (int p = 0; p < np; p++)
        for (int64_t q = A->nblk; q < Cwo4; q++) {
            ob[p * Cwo4 + q] = 0;
            if (om) om[p * Cwo4 + q] = 0;
        }
}

#if defined(BC_HAVE_V16)
/* The per-channel vectors of one block that the epilogue applies to every pixel: bias, BN scale, BN shift. */
typedef struct { v16 b, a, c; } epi_consts;

BC_INLINE epi_consts epi_load(const int F, const bc_conv *restrict A, int64_t oc0) {
    static const float zero16[BC_OB];
    const int fl = F >= 0 ? F : A->epi_flags;
    epi_consts k;
    k.b = v_load(fl & 1 ? A->bias + oc0 : zero16);
    k.a = fl & 4 ? v_load(A->alpha + oc0) : k.b;
    k.c = fl & 4 ? v_load(A->beta + oc0) : k.b;
    return k;
}

/* The fused epilogue of block blk of pixel pix from y = (float)dot * s.  F >= 0: the options as compile-time
   constants (bit 0 bias, 1 relu, 2 affine, 3 residual, 4 float out, 5 bits, 6 mask), so each specialization
   is straight-line code; F < 0: read from A.  Returns the number of zeros among the packed outputs. */
BC_INLINE int64_t epi_vec(const int F, const bc_conv *restrict A, v16 y, epi_consts k, int64_t pix, int64_t blk) {
    const int fl = F >= 0 ? F : A->epi_flags;
    const int64_t oc0 = blk * BC_OB;
    if (fl & 1) y = v_add(y, k.b);
    if (fl & 2) y = v_relu(y);
    if (fl & 4) y = v_fma(y, k.a, k.c);
    if (fl & 8) y = v_add(y, v_load(A->res + pix * A->Cout + oc0));
    if (fl & 16) v_store(A->out + pix * A->Cout + oc0, y);
    if (!(fl & 32)) return 0;
    const uint32_t nz = v_nz(y);
    ((uint16_t *)(A->obits + pix * A->Cwo))[blk] = (uint16_t)v_neg(y);
    if (fl & 64) ((uint16_t *)(A->omask + pix * A->Cwo))[blk] = (uint16_t)nz;
    return BC_OB - pop64(nz);
}
#endif
