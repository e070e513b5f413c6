/* bitconv_microkernels.h -- the xor-popcount register tiles, one per SIMD path.
 * Part of bitconv.c, which includes it once (a single translation unit, so the compiler sees every
 * function when it inlines the micro-kernels and specializes the epilogue); not a standalone header. */

/* ----------------------------------------------------------------------------------------------------- */
/* Micro-kernels: raw xor-popcount sums for a tile of BC_P pixels x (16 * nb) output channels             */
/* ----------------------------------------------------------------------------------------------------- */
/*
 * ap[i * BC_P + p]: pointer to the K words of pixel p at active tap i (or a zero buffer), mp likewise for the
 * mask (mask path only).  wt[i] + wshift: the weights of active tap i in the first block of the call; the
 * next block is bstride words further.  Words k of tap i: w[k * 16 + lane].  Output pc[p * 16*nb + j] =
 * sum_i sum_k popcount((a ^ w) [& m]) for output lane j.
 */
/* The activation (and mask) word pointers of active tap i for the BC_P pixels of the tile. */
BC_INLINE void tap_rows(const int MASK, const uint64_t *const *ap, const uint64_t *const *mp, int i,
                        const uint64_t **a, const uint64_t **m) {
#pragma GCC unroll 16
    for (int p = 0; p < BC_P; p++) {
        a[p] = ap[i * BC_P + p];
        if (MASK) m[p] = mp[i * BC_P + p];
    }
}

#if defined(BC_PATH_AVX512)

/* The raw sums of the tile, left in registers: acc[p][2 * b + h] holds lanes 8h .. 8h+7 of block b of pixel p. */
BC_INLINE void mk_avx512_sums(const int NB, const int MASK, const uint64_t *const *ap, const uint64_t *const *mp,
                              const uint64_t *const *wt, int64_t wshift, int nact, int64_t bstride, int64_t K,
                              __m512i acc[BC_P][2 * BC_NB]) {
#pragma GCC unroll 16
    for (int p = 0; p < BC_P; p++)
#pragma GCC unroll 16
        for (int j = 0; j < 2 * NB; j++) acc[p][j] = _mm512_setzero_si512();
    for (int i = 0; i < nact; i++) {
        const uint64_t *w = wt[i] + wshift;
        const uint64_t *a[BC_P], *m[BC_P];
        tap_rows(MASK, ap, mp, i, a, m);
        for (int64_t k = 0; k < K; k++) {
            __m512i wv[2 * BC_NB];
#pragma GCC unroll 16
            for (int b = 0; b < NB; b++) {
                wv[2 * b] = _mm512_loadu_si512((const void *)(w + b * bstride + k * BC_OB));
                wv[2 * b + 1] = _mm512_loadu_si512((const void *)(w + b * bstride + k * BC_OB + 8));
            }
#pragma GCC unroll 16
            for (int p = 0; p < BC_P; p++) {
                __m512i av = _mm512_set1_epi64((long long)a[p][k]);
                if (MASK) {
                    __m512i mv = _mm512_set1_epi64((long long)m[p][k]);
#pragma GCC unroll 16
                    for (int j = 0; j < 2 * NB; j++)  /* (a ^ w) & m in one vpternlogq: imm 0x28 */
                        acc[p][j] = _mm512_add_epi64(
                            acc[p][j], _mm512_popcnt_epi64(_mm512_ternarylogic_epi64(av, wv[j], mv, 0x28)));
                } else {
#pragma GCC unroll 16
                    for (int j = 0; j < 2 * NB; j++)
                        acc[p][j] = _mm512_add_epi64(acc[p][j], _mm512_popcnt_epi64(_mm512_xor_si512(av, wv[j])));
                }
            }
        }
    }
}

/* The 16 int32 sums of one block from its two registers of int64 lanes: the low halves of the lanes (the sums
   are far below 2^31), lo's then hi's, picked by one two-source permute. */
BC_INLINE __m512i sums16(__m512i lo, __m512i hi) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    return _mm512_permutex2var_epi32(lo, even, hi);
}

BC_INLINE void mk_avx512(const int NB, const int MASK, const uint64_t *const *ap, const uint64_t *const *mp,
                         const uint64_t *const *wt, int64_t wshift, int nact, int64_t bstride, int64_t K, int32_t *pc) {
    __m512i acc[BC_P][2 * BC_NB];
    mk_avx512_sums(NB, MASK, ap, mp, wt, wshift, nact, bstride, K, acc);
    /* one 64-byte store per block, so the epilogue's 64-byte load is forwarded from a single store */
#pragma GCC unroll 16
    for (int p = 0; p < BC_P; p++)
#pragma GCC unroll 16
        for (int b = 0; b < NB; b++)
            _mm512_storeu_si512((void *)(pc + p * BC_OB * NB + BC_OB * b), sums16(acc[p][2 * b], acc[p][2 * b + 1]));
}

#define BC_DEF_MK(NB, MASK) \
    static void mk_##NB##_##MASK(const uint64_t *const *ap, const uint64_t *const *mp, \
                                 const uint64_t *const *wt, int64_t wshift, int nact, int64_t bstride, int64_t K, int32_t *pc) { \
        mk_avx512(NB, MASK, ap, mp, wt, wshift, nact, bstride, K, pc); \
    }

#elif defined(BC_PATH_AVX2)

/* Byte-wise popcount of x (vpshufb on the two nibbles), added to the byte accumulator. */
BC_INLINE __m256i avx2_popacc8(__m256i acc8, __m256i x, __m256i lut, __m256i m4) {
    __m256i lo = _mm256_and_si256(x, m4);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
    return _mm256_add_epi8(acc8, _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi)));
}

/* Adds the byte counters' sums (vpsadbw: one per 64-bit lane) to the 64-bit sums s64 and clears them. */
BC_INLINE void avx2_flush(__m256i acc8[BC_P][4], __m256i *s64) {
    const __m256i zero = _mm256_setzero_si256();
#pragma GCC unroll 16
    for (int p = 0; p < BC_P; p++)
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++) {
            s64[p * 4 + v] = _mm256_add_epi64(s64[p * 4 + v], _mm256_sad_epu8(acc8[p][v], zero));
            acc8[p][v] = zero;
        }
}

/* One step: word k of the tile's pixels against the 16 lanes' words at wk. */
BC_INLINE void avx2_step(const int MASK, const uint64_t *const *a, const uint64_t *const *m, int64_t k,
                         const __m256i *wk, __m256i acc8[BC_P][4], __m256i lut, __m256i m4) {
    __m256i av[BC_P], mv[BC_P];
#pragma GCC unroll 16
    for (int p = 0; p < BC_P; p++) {
        av[p] = _mm256_set1_epi64x((long long)a[p][k]);
        if (MASK) mv[p] = _mm256_set1_epi64x((long long)m[p][k]);
    }
#pragma GCC unroll 4
    for (int v = 0; v < 4; v++) {
        const __m256i wv = _mm256_loadu_si256(wk + v);
#pragma GCC unroll 16
        for (int p = 0; p < BC_P; p++) {
            __m256i x = _mm256_xor_si256(av[p], wv);
            if (MASK) x = _mm256_and_si256(x, mv[p]);
            acc8[p][v] = avx2_popacc8(acc8[p][v], x, lut, m4);
        }
    }
}

/* The same step on the nibble copy (bitconv_pack.h: nibble_pack): wk[0..3] the low nibbles of the 16 lanes'
   words, wk[4..7] their high nibbles; the activation word is split once for the four vectors.  No zero mask. */
BC_INLINE void avx2_step_nibbles(const uint64_t *const *a, int64_t k, const __m256i *wk, __m256i acc8[BC_P][4],
                                 __m256i lut, __m256i m4) {
    __m256i lo[BC_P], hi[BC_P];
#pragma GCC unroll 16
    for (int p = 0; p < BC_P; p++) {
        const __m256i av = _mm256_set1_epi64x((long long)a[p][k]);
        lo[p] = _mm256_and_si256(av, m4);
        hi[p] = _mm256_and_si256(_mm256_srli_epi16(av, 4), m4);
    }
#pragma GCC unroll 4
    for (int v = 0; v < 4; v++) {
        const __m256i wl = _mm256_loadu_si256(wk + v), wh = _mm256_loadu_si256(wk + 4 + v);
#pragma GCC unroll 16
        for (int p = 0; p < BC_P; p++) {
            const __m256i c = _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_xor_si256(lo[p], wl)),
                                              _mm256_shuffle_epi8(lut, _mm256_xor_si256(hi[p], wh)));
            acc8[p][v] = _mm256_add_epi8(acc8[p][v], c);
        }
    }
}

/* Step k of tap i's words at w: from the packed bits (NIB 0, 4 vectors per step) or the nibble copy (NIB 1, 8). */
BC_INLINE void avx2_any_step(const int NIB, const int MASK, const uint64_t *const *a, const uint64_t *const *m,
                             int64_t k, const __m256i *w, __m256i acc8[BC_P][4], __m256i lut, __m256i m4) {
    if (NIB)
        avx2_step_nibbles(a, k, w + 8 * k, acc8, lut, m4);
    else
        avx2_step(MASK, a, m, k, w + 4 * k, acc8, lut, m4);
}

/* The raw sums of the tile into s64 (s64[4p + v]: lanes 4v .. 4v+3 of pixel p, one per 64-bit lane).  The byte
   counters gain at most 8 per step, so they are flushed to s64 after at most 31 steps: after each round of
   31 / KK taps where a tap has at most 31 words (KK: a compile-time 1 for 64-channel layers, or K), else
   every 31 words.  The rounds keep the flush out of the inner loops, where only the byte counters are live. */
BC_INLINE void avx2_sums(const int NIB, const int MASK, const uint64_t *const *ap, const uint64_t *const *mp,
                         const uint64_t *const *wt, int64_t wshift, int nact, const int64_t KK, __m256i *s64) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256i acc8[BC_P][4];
#pragma GCC unroll 16
    for (int p = 0; p < BC_P; p++)
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++) acc8[p][v] = s64[p * 4 + v] = _mm256_setzero_si256();
    if (KK <= 31) {
        const int per_round = (int)(31 / KK);
        for (int i0 = 0; i0 < nact; i0 += per_round) {
            const int i1 = nact - i0 < per_round ? nact : i0 + per_round;
            for (int i = i0; i < i1; i++) {
                const __m256i *w = (const __m256i *)(wt[i] + wshift);
                const uint64_t *a[BC_P], *m[BC_P];
                tap_rows(MASK, ap, mp, i, a, m);
                for (int64_t k = 0; k < KK; k++) avx2_any_step(NIB, MASK, a, m, k, w, acc8, lut, m4);
            }
            avx2_flush(acc8, s64);
        }
        return;
    }
    for (int i = 0; i < nact; i++) {
        const __m256i *w = (const __m256i *)(wt[i] + wshift);
        const uint64_t *a[BC_P], *m[BC_P];
        tap_rows(MASK, ap, mp, i, a, m);
        for (int64_t k0 = 0; k0 < KK; k0 += 31) {
            const int64_t k1 = KK - k0 < 31 ? KK : k0 + 31;
            for (int64_t k = k0; k < k1; k++) avx2_any_step(NIB, MASK, a, m, k, w, acc8, lut, m4);
            avx2_flush(acc8, s64);
        }
    }
}

/* The 16 int32 sums of each pixel from its four vectors of 64-bit sums: their low halves (the counts are
   below 2^31), two vectors per 32-byte store (so the epilogue's 32-byte loads are forwarded from single
   stores). */
BC_INLINE void avx2_store_sums(const __m256i *s64, int32_t *pc) {
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
#pragma GCC unroll 16
    for (int p = 0; p < BC_P; p++)
#pragma GCC unroll 2
        for (int v = 0; v < 4; v += 2) {
            __m256i lo0 = _mm256_permutevar8x32_epi32(s64[p * 4 + v], even);
            __m256i lo1 = _mm256_permutevar8x32_epi32(s64[p * 4 + v + 1], even);
            _mm256_storeu_si256((__m256i *)(pc + p * BC_OB + 4 * v), _mm256_permute2x128_si256(lo0, lo1, 0x20));
        }
}

/* The tile's sums into pc, from the packed bits (NIB 0) or the nibble copy (NIB 1, no zero mask), with the
   loops specialized for one word a tap (64-channel layers). */
BC_INLINE void avx2_tile(const int NIB, const int MASK, const uint64_t *const *ap, const uint64_t *const *mp,
                         const uint64_t *const *wt, int64_t wshift, int nact, int64_t K, int32_t *pc) {
    __m256i s64[BC_P * 4];
    if (K == 1)
        avx2_sums(NIB, MASK, ap, mp, wt, wshift, nact, 1, s64);
    else
        avx2_sums(NIB, MASK, ap, mp, wt, wshift, nact, K, s64);
    avx2_store_sums(s64, pc);
}

BC_INLINE void mk_avx2(const int NB, const int MASK, const uint64_t *const *ap, const uint64_t *const *mp,
                       const uint64_t *const *wt, int64_t wshift, int nact, int64_t bstride, int64_t K, int32_t *pc) {
    (void)NB;
    (void)bstride;
    avx2_tile(0, MASK, ap, mp, wt, wshift, nact, K, pc);
}

/* The tile's sums from the nibble copy: wt[i] + wshift, tap i's 2 x 16 words per step. */
static void mk_nibbles(const uint64_t *const *ap, const uint64_t *const *wt, int64_t wshift, int nact, int64_t K,
                       int32_t *pc) {
    avx2_tile(1, 0, ap, NULL, wt, wshift, nact, K, pc);
}

#define BC_DEF_MK(NB, MASK) \
    static void mk_##NB##_##MASK(const uint64_t *const *ap, const uint64_t *const *mp, \
                                 const uint64_t *const *wt, int64_t wshift, int nact, int64_t bstride, int64_t K, int32_t *pc) { \
        mk_avx2(NB, MASK, ap, mp, wt, wshift, nact, bstride, K, pc); \
    }

#elif defined(BC_PATH_NEON)

/* vcntq_u8 per byte, vpadalq_u8 into 16-bit lanes (4 per 64-bit word, each gains <= 16 per step), widened
   into 32-bit accumulators every 2048 steps; the final pairwise add gives one count per 64-bit lane. */
BC_INLINE void mk_neon(const int NB, const int MASK, const uint64_t *const *ap, const uint64_t *const *mp,
                       const uint64_t *const *wt, int64_t wshift, int nact, int64_t bstride, int64_t K, int32_t *pc) {
    (void)NB;
    (void)bstride;
    uint16x8_t acc[BC_P][8];
    uint32x4_t acc32[BC_P][8];
    for (int p = 0; p < BC_P; p++)
        for (int v = 0; v < 8; v++) {
            acc[p][v] = vdupq_n_u16(0);
            acc32[p][v] = vdupq_n_u32(0);
        }
    int steps = 0;
    for (int i = 0; i < nact; i++) {
        const uint64_t *w = wt[i] + wshift;
        const uint64_t *a[BC_P], *m[BC_P];
        tap_rows(MASK, ap, mp, i, a, m);
        for (int64_t k = 0; k < K; k++) {
            uint8x16_t av[BC_P], mv[BC_P];
            for (int p = 0; p < BC_P; p++) {
                av[p] = vreinterpretq_u8_u64(vdupq_n_u64(a[p][k]));
                if (MASK) mv[p] = vreinterpretq_u8_u64(vdupq_n_u64(m[p][k]));
            }
            for (int v = 0; v < 8; v++) {
                uint8x16_t wv = vreinterpretq_u8_u64(vld1q_u64(w + k * BC_OB + 2 * v));
                for (int p = 0; p < BC_P; p++) {
                    uint8x16_t x = veorq_u8(av[p], wv);
                    if (MASK) x = vandq_u8(x, mv[p]);
                    acc[p][v] = vpadalq_u8(acc[p][v], vcntq_u8(x));
                }
            }
            if (++steps == 2048) {
                steps = 0;
                for (int p = 0; p < BC_P; p++)
                    for (int v = 0; v < 8; v++) {
                        acc32[p][v] = vpadalq_u16(acc32[p][v], acc[p][v]);
                        acc[p][v] = vdupq_n_u16(0);
                    }
            }
        }
    }
    for (int p = 0; p < BC_P; p++)
        for (int v = 0; v < 8; v++) {
            uint64x2_t s = vpaddlq_u32(vpadalq_u16(acc32[p][v], acc[p][v]));
            pc[p * BC_OB + 2 * v] = (int32_t)vgetq_lane_u64(s, 0);
            pc[p * BC_OB + 2 * v + 1] = (int32_t)vgetq_lane_u64(s, 1);
        }
}

#define BC_DEF_MK(NB, MASK) \
    static void mk_##NB##_##MASK(const uint64_t *const *ap, const uint64_t *const *mp, \
                                 const uint64_t *const *wt, int64_t wshift, int nact, int64_t bstride, int64_t K, int32_t *pc) { \
        mk_neon(NB, MASK, ap, mp, wt, wshift, nact, bstride, K, pc); \
    }

#else /* portable */

/* Register tile of 2 pixels x 4 output lanes (8 scalar accumulators), one pass per lane quad over all taps. */
BC_INLINE void mk_portable(const int NB, const int MASK, const uint64_t *const *ap, const uint64_t *const *mp,
                           const uint64_t *const *wt, int64_t wshift, int nact, int64_t bstride, int64_t K,
                           int32_t *pc) {
    (void)NB;
    (void)bstride;
    for (int p0 = 0; p0 < BC_P; p0 += 2) {
        const int p1 = p0 + 1 < BC_P ? p0 + 1 : p0; /* odd tile: the last pixel is computed twice */
        for (int o = 0; o < BC_OB; o += 4) {
            uint64_t s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
            for (int i = 0; i < nact; i++) {
                const uint64_t *a0 = ap[i * BC_P + p0], *a1 = ap[i * BC_P + p1];
                const uint64_t *m0 = MASK ? mp[i * BC_P + p0] : a0, *m1 = MASK ? mp[i * BC_P + p1] : a1;
                const uint64_t *w = wt[i] + wshift + o;
                for (int64_t k = 0; k < K; k++) {
                    const uint64_t x0 = a0[k], x1 = a1[k];
                    const uint64_t q0 = MASK ? m0[k] : ~0ULL, q1 = MASK ? m1[k] : ~0ULL;
                    const uint64_t w0 = w[k * BC_OB], w1 = w[k * BC_OB + 1], w2 = w[k * BC_OB + 2],
                                   w3 = w[k * BC_OB + 3];
                    s00 += (uint64_t)pop64((x0 ^ w0) & q0);
                    s01 += (uint64_t)pop64((x0 ^ w1) & q0);
                    s02 += (uint64_t)pop64((x0 ^ w2) & q0);
                    s03 += (uint64_t)pop64((x0 ^ w3) & q0);
                    s10 += (uint64_t)pop64((x1 ^ w0) & q1);
                    s11 += (uint64_t)pop64((x1 ^ w1) & q1);
                    s12 += (uint64_t)pop64((x1 ^ w2) & q1);
                    s13 += (uint64_t)pop64((x1 ^ w3) & q1);
                }
            }
            int32_t *r0 = pc + p0 * BC_OB + o, *r1 = pc + p1 * BC_OB + o;
            r0[0] = (int32_t)s00; r0[1] = (int32_t)s01; r0[2] = (int32_t)s02; r0[3] = (int32_t)s03;
            r1[0] = (int32_t)s10; r1[1] = (int32_t)s11; r1[2] = (int32_t)s12; r1[3] = (int32_t)s13;
        }
    }
}

#define BC_DEF_MK(NB, MASK) \
    static void mk_##NB##_##MASK(const uint64_t *const *ap, const uint64_t *const *mp, \
                                 const uint64_t *const *wt, int64_t wshift, int nact, int64_t bstride, int64_t K, int32_t *pc) { \
        mk_portable(NB, MASK, ap, mp, wt, wshift, nact, bstride, K, pc); \
    }

#endif

BC_DEF_MK(1, 0)
BC_DEF_MK(1, 1)
#if BC_NB >= 2
BC_DEF_MK(2, 0)
BC_DEF_MK(2, 1)
#endif

