/* bitconv_pack.h -- packing weights (once per deployed layer, every training step) and float activations
 * into sign bits.
 * Part of bitconv.c, which includes it once (a single translation unit, so the compiler sees every
 * function when it inlines the micro-kernels and specializes the epilogue); not a standalone header. */

/* ----------------------------------------------------------------------------------------------------- */
/* Weight packing                                                                                         */
/* ----------------------------------------------------------------------------------------------------- */

/* Number of words of the "K" dimension of one block row: taps mode: words per tap (Cw); patch mode: words of
   the whole KH*KW*C patch (bits laid out tap-major, channel-minor, contiguous). */
static int64_t kwords(int64_t Cin, int64_t T, int mode) {
    return mode == BC_MODE_PATCH ? (T * Cin + 63) / 64 : (Cin + 63) / 64;
}

/* The AVX2 path's copy (BC_COPY_NIBBLES): each word of the taps layout data[blk][t][k][lane] as two, its low
   nibbles (w & 0x0f..) in copy[blk][t][k][0][lane] and its high nibbles ((w >> 4) & 0x0f..) in
   copy[blk][t][k][1][lane]: the kernel XORs them with the activation's nibbles, split once per step, and
   looks the popcounts up directly (two operations fewer per 256 bits than splitting each XOR). */
#if defined(BC_PATH_AVX2)
#define BC_COPY_KIND BC_COPY_NIBBLES
static void nibble_pack(const uint64_t *data, int64_t rows, uint64_t *copy) {
    const uint64_t lo = 0x0f0f0f0f0f0f0f0fULL;
    for (int64_t r = 0; r < rows; r++)
        for (int lane = 0; lane < BC_OB; lane++) {
            const uint64_t w = data[r * BC_OB + lane];
            copy[r * 2 * BC_OB + lane] = w & lo;
            copy[r * 2 * BC_OB + BC_OB + lane] = (w >> 4) & lo;
        }
}
#elif defined(BC_HAVE_AMX)
#define BC_COPY_KIND BC_COPY_AMX
#endif

/* Words of this build's path copy for the shape (bitconv_paths.h: BC_WITH_COPY), 0 where it makes none. */
static int64_t copy_words(int64_t Cout, int64_t Cin, int64_t T, int mode) {
#if defined(BC_HAVE_AMX)
    return amx_weight_words(Cout, Cin, T, mode);
#elif defined(BC_PATH_AVX2)
    return mode == BC_MODE_TAPS ? (Cout + BC_OB - 1) / BC_OB * T * kwords(Cin, T, mode) * 2 * BC_OB : 0;
#else
    (void)Cout; (void)Cin; (void)T; (void)mode;
    return 0;
#endif
}

/* Size in uint64 words of the packed weight buffer for the given shape and mode (0 = taps, 1 = patch;
   patch mode requires Cin < 64).  Returns -1 for an invalid request. */
BC_API int64_t bitconv_weight_words(int64_t Cout, int64_t Cin, int KH, int KW, int mode) {
    const int with_copy = mode & BC_WITH_COPY;
    mode &= ~BC_WITH_COPY;
    if (Cout <= 0 || Cin <= 0 || KH <= 0 || KW <= 0) return -1;
    if (mode != BC_MODE_TAPS && mode != BC_MODE_PATCH) return -1;
    if (mode == BC_MODE_PATCH && Cin >= 64) return -1;
    int64_t T = (int64_t)KH * KW, nblk = (Cout + BC_OB - 1) / BC_OB;
    int64_t ntap_rows = mode == BC_MODE_PATCH ? 1 : T;
    int64_t data = nblk * ntap_rows * kwords(Cin, T, mode) * BC_OB;
    int64_t pop = (nblk * T * BC_OB + 1) / 2; /* int32 table, two per word */
    if (with_copy) pop += copy_words(Cout, Cin, T, mode);
    return BC_HDR + data + pop;
}

/*
 * Packs float weights w[Cout][Cin][KH][KW] (torch's contiguous layout) into `out`
 * (bitconv_weight_words(...) words; 64-byte alignment recommended).  Bit = 1 for w < 0.
 *
 * Layout after the 8-word header:
 *   taps mode (0):  data[blk][t][k][lane]  with t = kh*KW + kw, k < Cw = ceil(Cin/64) words,
 *                   lane < 16 = output channel blk*16 + lane; channel c of tap t is bit c%64 of word c/64.
 *   patch mode (1): data[blk][0][k][lane]  with k < ceil(KH*KW*Cin / 64), tap t channel c at bit position
 *                   t*Cin + c of the patch (Cin < 64 only: fewer words than one padded word per tap, but
 *                   the conv then gathers each output pixel's patch bits, which costs more than it saves on
 *                   the x86 paths; kept as an option).
 *   then pop[blk][t][lane] (int32): popcount of output channel blk*16+lane's bits at tap t, for the
 *   out-of-bounds correction.  Output channels >= Cout and channel bits >= Cin are 0.
 * nthreads: OpenMP threads (taps mode; the conv's callers pass torch's setting).
 * Returns the number of exact zeros in w (packed as +1; such a layer is not exactly representable),
 * or -1 on invalid arguments.
 */
BC_API int64_t bitconv_pack_weights(const float *w, int64_t Cout, int64_t Cin, int KH, int KW, int mode,
                                    uint64_t *out, int nthreads) {
    int64_t total = bitconv_weight_words(Cout, Cin, KH, KW, mode);
    if (total < 0 || !w || !out) return -1;
    const int with_copy = mode & BC_WITH_COPY;
    mode &= ~BC_WITH_COPY;
    int64_t T = (int64_t)KH * KW, nblk = (Cout + BC_OB - 1) / BC_OB;
    int64_t K = kwords(Cin, T, mode);
    int64_t rows = mode == BC_MODE_PATCH ? 1 : T;
    int64_t data_words = nblk * rows * K * BC_OB;
    memset(out, 0, (size_t)total * sizeof(uint64_t));
    out[H_MAGIC] = BC_MAGIC;
    out[H_COUT] = (uint64_t)Cout;
    out[H_CIN] = (uint64_t)Cin;
    out[H_KHKW] = (uint64_t)KH | ((uint64_t)KW << 32);
    out[H_MODE] = (uint64_t)mode;
    out[H_KW_WORDS] = (uint64_t)K;
    out[H_NBLK] = (uint64_t)nblk;
    out[H_POP_OFF] = (uint64_t)(BC_HDR + data_words);
    const int64_t copy_off = BC_HDR + data_words + (nblk * T * BC_OB + 1) / 2;
    (void)copy_off;
#if defined(BC_COPY_KIND)
    if (with_copy && total > copy_off) out[H_MODE] |= (uint64_t)copy_off << 32 | (uint64_t)BC_COPY_KIND << 8;
#else
    (void)with_copy;
#endif
    uint64_t *data = out + BC_HDR;
    int32_t *pop = (int32_t *)(out + BC_HDR + data_words);
    int64_t zeros = 0;
    if (mode == BC_MODE_TAPS) {
        /* each word built in a register from 64 channels of one tap, blocks in parallel (training packs the
           weights at every forward: a 512x512 3x3 layer is 2.4M floats) */
#pragma omp parallel for reduction(+ : zeros) schedule(static) num_threads(nthreads > 0 ? nthreads : 1) \
    if (Cout * Cin * T > (1 << 16))
        for (int64_t blk = 0; blk < nblk; blk++) {
            for (int64_t lane = 0; lane < BC_OB && blk * BC_OB + lane < Cout; lane++) {
                const float *wo = w + (blk * BC_OB + lane) * Cin * T;
                for (int64_t t = 0; t < T; t++) {
                    int32_t pc = 0;
                    for (int64_t q = 0; q < K; q++) {
                        const int64_t c0 = q * 64, n = Cin - c0 < 64 ? Cin - c0 : 64;
                        uint64_t word = 0;
                        for (int64_t i = 0; i < n; i++) {
                            const float v = wo[(c0 + i) * T + t];
                            zeros += v == 0.0f;
                            word |= (uint64_t)(v < 0.0f) << i;
                        }
                        data[((blk * T + t) * K + q) * BC_OB + lane] = word;
                        pc += (int32_t)pop64(word);
                    }
                    pop[(blk * T + t) * BC_OB + lane] = pc;
                }
            }
        }
        if (out[H_MODE] >> 32) {
#if defined(BC_HAVE_AMX)
            amx_pack_weights(data, nblk, T, K, Cin, (int8_t *)(out + copy_off), nthreads);
#elif defined(BC_PATH_AVX2)
            nibble_pack(data, nblk * T * K, out + copy_off);
#endif
        }
        return zeros;
    }
    for (int64_t oc = 0; oc < Cout; oc++) { /* patch mode (Cin < 64): bits run across taps */
        int64_t blk = oc / BC_OB, lane = oc % BC_OB;
        for (int64_t t = 0; t < T; t++) {
            int64_t kh = t / KW, kw = t % KW;
            int32_t pc = 0;
            for (int64_t c = 0; c < Cin; c++) {
                float v = w[((oc * Cin + c) * KH + kh) * KW + kw];
                if (v == 0.0f) zeros++;
                if (!(v < 0.0f)) continue;
                pc++;
                int64_t bitpos = t * Cin + c;
                data[(blk * K + bitpos / 64) * BC_OB + lane] |= 1ULL << (bitpos % 64);
            }
            pop[(blk * T + t) * BC_OB + lane] = pc;
        }
    }
    return zeros;
}

/* ----------------------------------------------------------------------------------------------------- */
/* Sign packing of float activations                                                                      */
/* ----------------------------------------------------------------------------------------------------- */

/* Signs of n <= 64 floats: *neg gets bit i = (x[i] < 0), *nz bit i = (x[i] < 0 || x[i] > 0) (NaN -> 0). */
BC_INLINE void pack64_generic(const float *x, int n, uint64_t *neg, uint64_t *nz) {
    uint64_t b = 0, z = 0;
    for (int i = 0; i < n; i++) {
        b |= (uint64_t)(x[i] < 0.0f) << i;
        z |= (uint64_t)(x[i] < 0.0f || x[i] > 0.0f) << i;
    }
    *neg = b;
    *nz = z;
}

/* Same, vectorized per path (reads only x[0 .. n-1]). */
BC_INLINE void pack64(const float *x, int n, uint64_t *neg, uint64_t *nz) {
#if defined(BC_PATH_AVX512)
    const __m512 zero = _mm512_setzero_ps();
    uint64_t b = 0, z = 0;
    for (int j = 0; j < 4 && 16 * j < n; j++) {
        int r = n - 16 * j;
        __mmask16 m = r >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << r) - 1u);
        __m512 v = _mm512_maskz_loadu_ps(m, x + 16 * j);
        b |= (uint64_t)_mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ) << (16 * j);
        z |= (uint64_t)_mm512_mask_cmp_ps_mask(m, v, zero, _CMP_NEQ_OQ) << (16 * j);
    }
    *neg = b;
    *nz = z;
#elif defined(BC_PATH_AVX2)
    const __m256 zero = _mm256_setzero_ps();
    uint64_t b = 0, z = 0;
    int j = 0;
    for (; 8 * j + 8 <= n; j++) {
        __m256 v = _mm256_loadu_ps(x + 8 * j);
        b |= (uint64_t)(unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ)) << (8 * j);
        z |= (uint64_t)(unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_NEQ_OQ)) << (8 * j);
    }
    if (8 * j < n) {
        uint64_t tb, tz;
        pack64_generic(x + 8 * j, n - 8 * j, &tb, &tz);
        b |= tb << (8 * j);
        z |= tz << (8 * j);
    }
    *neg = b;
    *nz = z;
#elif defined(BC_PATH_NEON)
    static const uint32_t wts[4] = {1, 2, 4, 8};
    const uint32x4_t wv = vld1q_u32(wts);
    const float32x4_t zero = vdupq_n_f32(0.0f);
    uint64_t b = 0, z = 0;
    int j = 0;
    for (; 4 * j + 4 <= n; j++) {
        float32x4_t v = vld1q_f32(x + 4 * j);
        uint32x4_t lt = vcltq_f32(v, zero), gt = vcgtq_f32(v, zero);
        b |= (uint64_t)vaddvq_u32(vandq_u32(lt, wv)) << (4 * j);
        z |= (uint64_t)vaddvq_u32(vandq_u32(vorrq_u32(lt, gt), wv)) << (4 * j);
    }
    if (4 * j < n) {
        uint64_t tb, tz;
        pack64_generic(x + 4 * j, n - 4 * j, &tb, &tz);
        b |= tb << (4 * j);
        z |= tz << (4 * j);
    }
    *neg = b;
    *nz = z;
#else
    pack64_generic(x, n, neg, nz);
#endif
}

/*
 * Packs float NHWC activations x[npix][C] into sign bits bits[npix][Cw] (Cw = ceil(C/64), bit = x < 0,
 * padding bits 0) and, if mask != NULL, the nonzero mask mask[npix][Cw].  Returns the number of elements
 * equal to 0 (or NaN): when it is 0 the mask is not needed (fast path of the conv).
 */
BC_API int64_t bitconv_pack_signs_nhwc(const float *x, int64_t npix, int64_t C, uint64_t *bits, uint64_t *mask,
                                       int nthreads) {
    const int64_t Cw = (C + 63) / 64;
    int64_t zeros = 0;
    nthreads = clamp_threads(nthreads);
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && npix * C > 32768) schedule(static) \
    reduction(+ : zeros)
    for (int64_t p = 0; p < npix; p++) {
        const float *xp = x + p * C;
        uint64_t *bp = bits + p * Cw;
        for (int64_t k = 0; k < Cw; k++) {
            int64_t n = C - 64 * k < 64 ? C - 64 * k : 64;
            uint64_t b, z;
            pack64(xp + 64 * k, (int)n, &b, &z);
            bp[k] = b;
            if (mask) mask[p * Cw + k] = z;
            zeros += n - pop64(z);
        }
    }
    return zeros;
}

/* 8x8 bit-matrix transpose (bit j of byte i <-> bit i of byte j), Hacker's Delight 7-3. */
BC_INLINE uint64_t transpose8x8(uint64_t x) {
    uint64_t t;
    t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAULL;
    x ^= t ^ (t << 7);
    t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCULL;
    x ^= t ^ (t << 14);
    t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ULL;
    x ^= t ^ (t << 28);
    return x;
}

/*
 * Same from NCHW float input x[N][C][HW] (HW = H*W), writing the NHWC bit planes bits[N][HW][Cw] without a
 * transposed float copy: blocks of 16 pixels x 64 channels, each channel row read as one contiguous run.
 * AVX-512: one compare mask per channel, OR-ed into 16 words under that mask; other paths: 8-pixel sign
 * bytes of 8 channels, bit-transposed 8x8.
 */
BC_API int64_t bitconv_pack_signs_nchw(const float *x, int64_t N, int64_t C, int64_t HW, uint64_t *bits,
                                       uint64_t *mask, int nthreads) {
    const int64_t Cw = (C + 63) / 64;
    const int64_t nq = (HW + 15) / 16;
    int64_t zeros = 0;
    nthreads = clamp_threads(nthreads);
#pragma omp parallel for collapse(2) num_threads(nthreads) if (nthreads > 1 && N * C * HW > 32768) \
    schedule(static) reduction(+ : zeros)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t qb = 0; qb < nq; qb++) {
            const int64_t q0 = qb * 16;
            const int m = (int)(HW - q0 < 16 ? HW - q0 : 16);
            for (int64_t k = 0; k < Cw; k++) {
                uint64_t b[16], z[16];
                const int cend = (int)(C - 64 * k < 64 ? C - 64 * k : 64);
                const float *plane = x + (n * C + 64 * k) * HW + q0;
#if defined(BC_PATH_AVX512)
                const __mmask16 pm = m == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << m) - 1u);
                const __m512 zero = _mm512_setzero_ps();
                __m512i b0 = _mm512_setzero_si512(), b1 = b0, z0 = b0, z1 = b0;
                for (int c = 0; c < cend; c++) {
                    __m512 v = _mm512_maskz_loadu_ps(pm, plane + (int64_t)c * HW);
                    const __m512i bit = _mm512_set1_epi64((long long)(1ULL << c));
                    __mmask16 kb = _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ);
                    __mmask16 kz = _mm512_cmp_ps_mask(v, zero, _CMP_NEQ_OQ);
                    b0 = _mm512_mask_or_epi64(b0, (__mmask8)kb, b0, bit);
                    b1 = _mm512_mask_or_epi64(b1, (__mmask8)(kb >> 8), b1, bit);
                    z0 = _mm512_mask_or_epi64(z0, (__mmask8)kz, z0, bit);
                    z1 = _mm512_mask_or_epi64(z1, (__mmask8)(kz >> 8), z1, bit);
                }
                _mm512_storeu_si512((void *)b, b0);
                _mm512_storeu_si512((void *)(b + 8), b1);
                _mm512_storeu_si512((void *)z, z0);
                _mm512_storeu_si512((void *)(z + 8), z1);
#else
                for (int j = 0; j < 16; j++) b[j] = z[j] = 0;
                for (int h = 0; h < 2 && 8 * h < m; h++) {
                    const int mh = m - 8 * h < 8 ? m - 8 * h : 8;
                    for (int c8 = 0; c8 < cend; c8 += 8) {
                        uint64_t Mb = 0, Mz = 0; /* byte i: signs of the 8 pixels in channel c8 + i */
                        for (int i = 0; i < 8 && c8 + i < cend; i++) {
                            const float *row = plane + (int64_t)(c8 + i) * HW + 8 * h;
                            uint64_t tb, tz;
                            pack64(row, mh, &tb, &tz);
                            Mb |= tb << (8 * i);
                            Mz |= tz << (8 * i);
                        }
                        Mb = transpose8x8(Mb); /* byte j: signs of channels c8 .. c8+7 of pixel j */
                        Mz = transpose8x8(Mz);
                        for (int j = 0; j < 8; j++) {
                            b[8 * h + j] |= ((Mb >> (8 * j)) & 0xFF) << c8;
                            z[8 * h + j] |= ((Mz >> (8 * j)) & 0xFF) << c8;
                        }
                    }
                }
#endif
                for (int j = 0; j < m; j++) {
                    bits[(n * HW + q0 + j) * Cw + k] = b[j];
                    if (mask) mask[(n * HW + q0 + j) * Cw + k] = z[j];
                    zeros += cend - pop64(z[j]);
                }
            }
        }
    }
    return zeros;
}

