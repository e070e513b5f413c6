/*
 * bitconv.c -- bit-packed binary (XNOR / popcount) 2-D convolution for CPU inference of 1W/1A networks.
 *
 * What one call of bitconv_conv2d computes, exactly:
 *
 *     y = conv2d(sign(x), sign(w) * s, stride, padding, dilation=1, groups=1)   (+ epilogue, below)
 *
 * with sign(0) = 0 (torch.sign), one float32 scale s per layer (the caller's mean(|w|)) and zero padding
 * applied after the sign (a padded tap contributes 0, not +-1).  For each output (n, oh, ow, oc) the
 * integer dot product over the in-bound taps is computed exactly with popcounts, then y = (float)dot * s,
 * which is the correctly rounded product (|dot| < 2^24 is exact in float).
 *
 * Data layout
 * -----------
 * Activations are NHWC bit planes: pixel (n, h, w) owns Cw = ceil(C / 64) consecutive uint64 words, channel
 * c is bit (c % 64) of word (c / 64); bit = 1 means "negative".  Bits of the padding channels (c >= C) are
 * 0.  An optional second plane of the same shape, the nonzero mask (bit = 1 where x != 0), carries exact
 * zeros: with it the dot over a tap word is popcount(m) - 2 * popcount((a ^ w) & m); without it (the fast
 * path, no zero anywhere in the input) it is 64 - 2 * popcount(a ^ w), summed as Kvalid - 2 * sum popcount,
 * where Kvalid = (number of in-bound taps) * C counts real channels only (padding channels have a = w = 0,
 * so they add nothing to the xor popcount).  NaN is treated like 0 (mask bit 0), as a compare-based sign.
 *
 * Weights are packed once by bitconv_pack_weights into one uint64 buffer (see the layout comment there):
 * blocks of 16 output channels, each block [taps][words][16 lanes], so that one SIMD load fetches the same
 * tap word of 16 (AVX-512: 2 x 8, AVX2: 4 x 4, NEON: 8 x 2) output channels, and a per-tap popcount table
 * used to correct border pixels (see below).  Weights must not contain exact zeros (the packer counts them
 * and packs them as +1; the caller should fall back to float for such layers).
 *
 * Algorithm
 * ---------
 * Output pixels are taken in tiles of BC_P consecutive pixels (flattened oh*OW+ow within one image).  For a
 * tile, a table of activation pointers [active tap][pixel] is built once; it is reused for every block of
 * output channels.  Taps that are out of bounds for every pixel of the tile are dropped; a tap that is out
 * of bounds for only some pixels points those pixels at a zero buffer, which adds popcount(w_tap) to their
 * xor count (a = 0): that is subtracted afterwards from a per-(oc, tap) table (fast path), or it is masked
 * away by a zero mask (mask path).  The micro-kernel broadcasts one activation word per pixel, xors it with
 * the 16*NB weight lanes and accumulates lane-wise popcounts, so each register tile holds
 * BC_P pixels x 16*NB output channels.
 *
 * Epilogue (fused, in this order, each optional):
 *     y = (float)dot * s ; y += bias[oc] ; y = max(y, 0) (relu) ; y = fmaf(y, alpha[oc], beta[oc]) ;
 *     y += residual[n, oh, ow, oc] ; write y (float NHWC) and/or its packed sign bits + nonzero mask
 *     (the next binary conv's input: fused sign-and-pack).
 * alpha/beta are an inference BatchNorm folded by the caller as ATen's CPU batch_norm folds it (alpha = weight *
 * invstd, beta = bias - mean * alpha; bitconv_py.bn_affine gives the exact roundings); ATen applies
 * y * alpha + beta as one fused multiply-add, so the kernel uses fmaf there.  Every other step is a separately
 * rounded IEEE operation, in the order of the float model's ops (see the fp-contract pragma below), so the
 * epilogue reproduces the float model bit for bit given the same conv output.
 *
 * Code paths (preprocessor): AVX-512 VPOPCNTDQ, AVX2 (nibble-LUT vpshufb popcount with byte accumulators),
 * aarch64 NEON (vcntq_u8 + pairwise widening adds), portable C (__builtin_popcountll).  -DBITCONV_PORTABLE
 * forces the portable path, -DBITCONV_NO_AVX512 skips the AVX-512 path.  bitconv_path() names the path.
 *
 * Threads: OpenMP over (pixel tile, output-channel chunk) work items, thread count passed per call.  All
 * functions are reentrant (no global mutable state); per-call scratch is malloc'd.
 * Byte order: the packed outputs are written in 16-bit pieces, which assumes a little-endian machine
 * (x86-64, aarch64).
 */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

/* IEEE semantics of every separate multiply and add: GCC's default -ffp-contract=fast would fuse
   (float)dot * s + bias (and the vector mul/add intrinsics, which GCC expresses as plain vector arithmetic)
   into one fma, which rounds differently from torch's separate ops.  The only fused op is the explicit
   fmaf / fmadd of the affine step. */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__)
#define BC_API __attribute__((visibility("default")))
#define BC_INLINE static inline __attribute__((always_inline))
#else
#define BC_API
#define BC_INLINE static inline
#endif

/* ----------------------------------------------------------------------------------------------------- */
/* Path selection                                                                                         */
/* ----------------------------------------------------------------------------------------------------- */
#if defined(BITCONV_PORTABLE)
#define BC_PATH_PORTABLE 1
#elif defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__) && !defined(BITCONV_NO_AVX512)
#define BC_PATH_AVX512 1
#elif defined(__AVX2__)
#define BC_PATH_AVX2 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define BC_PATH_NEON 1
#else
#define BC_PATH_PORTABLE 1
#endif

#if defined(BC_PATH_AVX512) || defined(BC_PATH_AVX2)
#include <immintrin.h>
#endif
#if defined(BC_PATH_NEON)
#include <arm_neon.h>
#endif

/* Output channels per weight block: the packing granularity of the weights and of the epilogue. */
#define BC_OB 16

/* Tile width BC_P (pixels per register tile) and the largest number of weight blocks one micro-kernel call
   handles (BC_NB).  Overridable with -D for experiments. */
#if defined(BC_PATH_AVX512)
#ifndef BC_P
#define BC_P 7
#endif
#ifndef BC_NB
#define BC_NB 1
#endif
#elif defined(BC_PATH_AVX2)
#ifndef BC_P
#define BC_P 2
#endif
#define BC_NB 1
#elif defined(BC_PATH_NEON)
#ifndef BC_P
#define BC_P 2
#endif
#define BC_NB 1
#else
#ifndef BC_P
#define BC_P 2
#endif
#define BC_NB 1
#endif

/* Packed weight header (8 words = 64 bytes, so the data stays 64-byte aligned if the buffer is). */
#define BC_MAGIC 0x3157434255ULL /* "UBCW1" */
enum { BC_MODE_TAPS = 0, BC_MODE_PATCH = 1 };
enum { H_MAGIC, H_COUT, H_CIN, H_KHKW, H_MODE, H_KW_WORDS, H_NBLK, H_POP_OFF };
#define BC_HDR 8

BC_INLINE int pop64(uint64_t x) {
#if defined(__GNUC__)
    return __builtin_popcountll(x);
#else
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (int)((x * 0x0101010101010101ULL) >> 56);
#endif
}

static int clamp_threads(int nt) {
    if (nt < 1) nt = 1;
    return nt;
}

/* ----------------------------------------------------------------------------------------------------- */
/* Info                                                                                                   */
/* ----------------------------------------------------------------------------------------------------- */

/* Name of the compiled code path: "avx512", "avx2", "neon" or "portable". */
BC_API const char *bitconv_path(void) {
#if defined(BC_PATH_AVX512)
    return "avx512";
#elif defined(BC_PATH_AVX2)
    return "avx2";
#elif defined(BC_PATH_NEON)
    return "neon";
#else
    return "portable";
#endif
}

/* Tile width (pixels per register tile) of the compiled path; informational. */
BC_API int bitconv_tile_pixels(void) { return BC_P; }

/* Words per packed input pixel for C channels: ceil(C / 64). */
BC_API int64_t bitconv_words(int64_t C) { return (C + 63) / 64; }

/* ----------------------------------------------------------------------------------------------------- */
/* Weight packing                                                                                         */
/* ----------------------------------------------------------------------------------------------------- */

/* Number of words of the "K" dimension of one block row: taps mode: words per tap (Cw); patch mode: words of
   the whole KH*KW*C patch (bits laid out tap-major, channel-minor, contiguous). */
static int64_t kwords(int64_t Cin, int64_t T, int mode) {
    return mode == BC_MODE_PATCH ? (T * Cin + 63) / 64 : (Cin + 63) / 64;
}

/* Size in uint64 words of the packed weight buffer for the given shape and mode (0 = taps, 1 = patch;
   patch mode requires Cin < 64).  Returns -1 for an invalid request. */
BC_API int64_t bitconv_weight_words(int64_t Cout, int64_t Cin, int KH, int KW, int mode) {
    if (Cout <= 0 || Cin <= 0 || KH <= 0 || KW <= 0) return -1;
    if (mode != BC_MODE_TAPS && mode != BC_MODE_PATCH) return -1;
    if (mode == BC_MODE_PATCH && Cin >= 64) return -1;
    int64_t T = (int64_t)KH * KW, nblk = (Cout + BC_OB - 1) / BC_OB;
    int64_t ntap_rows = mode == BC_MODE_PATCH ? 1 : T;
    int64_t data = nblk * ntap_rows * kwords(Cin, T, mode) * BC_OB;
    int64_t pop = (nblk * T * BC_OB + 1) / 2; /* int32 table, two per word */
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
 * Returns the number of exact zeros in w (packed as +1; such a layer is not exactly representable),
 * or -1 on invalid arguments.
 */
BC_API int64_t bitconv_pack_weights(const float *w, int64_t Cout, int64_t Cin, int KH, int KW, int mode,
                                    uint64_t *out) {
    int64_t total = bitconv_weight_words(Cout, Cin, KH, KW, mode);
    if (total < 0 || !w || !out) return -1;
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
    uint64_t *data = out + BC_HDR;
    int32_t *pop = (int32_t *)(out + BC_HDR + data_words);
    int64_t zeros = 0;
    for (int64_t oc = 0; oc < Cout; oc++) {
        int64_t blk = oc / BC_OB, lane = oc % BC_OB;
        for (int64_t t = 0; t < T; t++) {
            int64_t kh = t / KW, kw = t % KW;
            int32_t pc = 0;
            for (int64_t c = 0; c < Cin; c++) {
                float v = w[((oc * Cin + c) * KH + kh) * KW + kw];
                if (v == 0.0f) zeros++;
                if (!(v < 0.0f)) continue;
                pc++;
                int64_t bitpos, row;
                if (mode == BC_MODE_PATCH) { bitpos = t * Cin + c; row = 0; }
                else { bitpos = c; row = t; }
                data[((blk * rows + row) * K + bitpos / 64) * BC_OB + lane] |= 1ULL << (bitpos % 64);
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

/* ----------------------------------------------------------------------------------------------------- */
/* Micro-kernels: raw xor-popcount sums for a tile of BC_P pixels x (16 * nb) output channels             */
/* ----------------------------------------------------------------------------------------------------- */
/*
 * ap[i * BC_P + p]: pointer to the K words of pixel p at active tap i (or a zero buffer), mp likewise for the
 * mask (mask path only).  wt[i] + wshift: the weights of active tap i in the first block of the call; the
 * next block is bstride words further.  Words k of tap i: w[k * 16 + lane].  Output pc[p * 16*nb + j] =
 * sum_i sum_k popcount((a ^ w) [& m]) for output lane j.
 */
#if defined(BC_PATH_AVX512)

BC_INLINE void mk_avx512(const int NB, const int MASK, const uint64_t *const *ap, const uint64_t *const *mp,
                         const uint64_t *const *wt, int64_t wshift, int nact, int64_t bstride, int64_t K, int32_t *pc) {
    __m512i acc[BC_P][2 * BC_NB];
#pragma GCC unroll 16
    for (int p = 0; p < BC_P; p++)
#pragma GCC unroll 16
        for (int j = 0; j < 2 * NB; j++) acc[p][j] = _mm512_setzero_si512();
    for (int i = 0; i < nact; i++) {
        const uint64_t *w = wt[i] + wshift;
        const uint64_t *a[BC_P], *m[BC_P];
#pragma GCC unroll 16
        for (int p = 0; p < BC_P; p++) {
            a[p] = ap[i * BC_P + p];
            if (MASK) m[p] = mp[i * BC_P + p];
        }
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
    /* one 64-byte store per block, so the epilogue's 64-byte load is forwarded from a single store */
#pragma GCC unroll 16
    for (int p = 0; p < BC_P; p++)
#pragma GCC unroll 16
        for (int b = 0; b < NB; b++)
            _mm512_storeu_si512((void *)(pc + p * BC_OB * NB + BC_OB * b),
                                _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(acc[p][2 * b])),
                                                   _mm512_cvtepi64_epi32(acc[p][2 * b + 1]), 1));
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

/* Byte counters hold at most 8 per step: flushed to 64-bit lanes (vpsadbw) every 31 steps. */
BC_INLINE void mk_avx2(const int NB, const int MASK, const uint64_t *const *ap, const uint64_t *const *mp,
                       const uint64_t *const *wt, int64_t wshift, int nact, int64_t bstride, int64_t K, int32_t *pc) {
    (void)NB;
    (void)bstride;
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i zero = _mm256_setzero_si256();
    __m256i acc8[BC_P][4], acc64[BC_P][4];
#pragma GCC unroll 16
    for (int p = 0; p < BC_P; p++)
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++) acc8[p][v] = acc64[p][v] = zero;
    int steps = 0;
    for (int i = 0; i < nact; i++) {
        const uint64_t *w = wt[i] + wshift;
        const uint64_t *a[BC_P], *m[BC_P];
#pragma GCC unroll 16
        for (int p = 0; p < BC_P; p++) {
            a[p] = ap[i * BC_P + p];
            if (MASK) m[p] = mp[i * BC_P + p];
        }
        for (int64_t k = 0; k < K; k++) {
            __m256i av[BC_P], mv[BC_P];
#pragma GCC unroll 16
            for (int p = 0; p < BC_P; p++) {
                av[p] = _mm256_set1_epi64x((long long)a[p][k]);
                if (MASK) mv[p] = _mm256_set1_epi64x((long long)m[p][k]);
            }
#pragma GCC unroll 4
            for (int v = 0; v < 4; v++) {
                __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k * BC_OB + 4 * v));
#pragma GCC unroll 16
                for (int p = 0; p < BC_P; p++) {
                    __m256i x = _mm256_xor_si256(av[p], wv);
                    if (MASK) x = _mm256_and_si256(x, mv[p]);
                    acc8[p][v] = avx2_popacc8(acc8[p][v], x, lut, m4);
                }
            }
            if (++steps == 31) {
                steps = 0;
#pragma GCC unroll 16
                for (int p = 0; p < BC_P; p++)
#pragma GCC unroll 4
                    for (int v = 0; v < 4; v++) {
                        acc64[p][v] = _mm256_add_epi64(acc64[p][v], _mm256_sad_epu8(acc8[p][v], zero));
                        acc8[p][v] = zero;
                    }
            }
        }
    }
    /* the 64-bit lanes hold counts < 2^31: keep their low 32-bit halves, two vectors per 32-byte store (so
       the epilogue's 32-byte loads are forwarded from single stores) */
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
#pragma GCC unroll 16
    for (int p = 0; p < BC_P; p++)
#pragma GCC unroll 2
        for (int v = 0; v < 4; v += 2) {
            __m256i s0 = _mm256_add_epi64(acc64[p][v], _mm256_sad_epu8(acc8[p][v], zero));
            __m256i s1 = _mm256_add_epi64(acc64[p][v + 1], _mm256_sad_epu8(acc8[p][v + 1], zero));
            __m256i lo0 = _mm256_permutevar8x32_epi32(s0, even), lo1 = _mm256_permutevar8x32_epi32(s1, even);
            _mm256_storeu_si256((__m256i *)(pc + p * BC_OB + 4 * v), _mm256_permute2x128_si256(lo0, lo1, 0x20));
        }
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
        for (int p = 0; p < BC_P; p++) {
            a[p] = ap[i * BC_P + p];
            if (MASK) m[p] = mp[i * BC_P + p];
        }
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
/* (float)(base - 2 * (pc - corr)) * s */
BC_INLINE v16 v_dot(int32_t base, const int32_t *pc, const int32_t *corr, float s) {
    __m512i d = _mm512_loadu_si512((const void *)pc);
    if (corr) d = _mm512_sub_epi32(d, _mm512_loadu_si512((const void *)corr));
    d = _mm512_sub_epi32(_mm512_set1_epi32(base), _mm512_add_epi32(d, d));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(s));
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

/* ----------------------------------------------------------------------------------------------------- */
/* Tile setup + the main loop                                                                             */
/* ----------------------------------------------------------------------------------------------------- */

typedef struct {
    const uint64_t **ap, **mp; /* [T][BC_P] */
    const uint64_t **wt;       /* [T] per active tap: its weights in block 0 (border tiles) */
    const uint64_t **wt_all;   /* [T] the same for all taps in order (interior tiles) */
    const uint64_t *const *wtp; /* the table of the current tile: wt or wt_all */
    int *oob;                  /* [BC_P][T] out-of-bounds taps of each pixel (fast path correction) */
    int noob[BC_P];
    int32_t base[BC_P];
    int nact;
    uint64_t *patch, *pmask;   /* patch mode: [BC_P][K] gathered bits and mask */
    int32_t *pc;               /* [BC_P][BC_NB*16] */
    int32_t *corr;             /* [BC_P][16] */
    float *fzero;              /* [16] zeros */
    const uint64_t *zero;      /* zero words (at least max(Cw, K)) */
} bc_scratch;

/* Builds the pointer table of the tile of pixels q0 .. q0+np-1 of image n (pixels >= np are dummies that
   read zeros and whose results are discarded). */
static void setup_tile(const bc_conv *restrict A, bc_scratch *restrict S, int64_t n, int64_t q0, int np) {
    int64_t ih0[BC_P], iw0[BC_P], pbase[BC_P];
    for (int p = 0; p < BC_P; p++) {
        int64_t q = q0 + (p < np ? p : 0);
        int64_t oh = q / A->OW, ow = q % A->OW;
        ih0[p] = oh * A->sh - A->ph;
        iw0[p] = ow * A->sw - A->pw;
        pbase[p] = (ih0[p] * A->W + iw0[p]) * A->Cw;
        S->noob[p] = 0;
        S->base[p] = 0;
    }
    const int64_t Cw = A->Cw, H = A->H, W = A->W;
    const uint64_t *img = A->bits + n * H * W * Cw;
    const uint64_t *mimg = A->mask ? A->mask + n * H * W * Cw : NULL;
    if (A->mode == BC_MODE_TAPS && np == BC_P && !mimg && q0 % A->OW + BC_P <= A->OW && ih0[0] >= 0 &&
        ih0[0] + A->KH <= H && iw0[0] >= 0 && iw0[BC_P - 1] + A->KW <= W) {
        /* interior tile (one output row, every tap in bounds for every pixel): no checks, no correction */
        const int64_t T = A->T;
        for (int64_t t = 0; t < T; t++)
            for (int p = 0; p < BC_P; p++) S->ap[t * BC_P + p] = img + pbase[p] + A->toff[t];
        for (int p = 0; p < BC_P; p++) S->base[p] = (int32_t)(T * A->C);
        S->wtp = S->wt_all;
        S->nact = (int)T;
        return;
    }
    S->wtp = S->wt;
    if (A->mode == BC_MODE_TAPS) {
        int nact = 0;
        for (int kh = 0; kh < A->KH; kh++) {
            int rowok[BC_P], anyrow = 0;
            for (int p = 0; p < BC_P; p++) {
                rowok[p] = p < np && (uint64_t)(ih0[p] + kh) < (uint64_t)H;
                anyrow |= rowok[p];
            }
            if (!anyrow) continue; /* this kernel row is padding for every pixel of the tile */
            for (int kw = 0; kw < A->KW; kw++) {
                const int t = kh * A->KW + kw;
                const int64_t off = A->toff[t];
                int valid[BC_P], any = 0;
                for (int p = 0; p < BC_P; p++) {
                    valid[p] = rowok[p] && (uint64_t)(iw0[p] + kw) < (uint64_t)W;
                    any |= valid[p];
                }
                if (!any) continue;
                S->wt[nact] = A->wdata + (int64_t)t * A->K * BC_OB;
                const uint64_t **ap = S->ap + nact * BC_P;
                if (mimg) {
                    const uint64_t **mp = S->mp + nact * BC_P;
                    for (int p = 0; p < BC_P; p++) {
                        ap[p] = valid[p] ? img + pbase[p] + off : S->zero;
                        mp[p] = valid[p] ? mimg + pbase[p] + off : S->zero;
                        if (valid[p])
                            for (int64_t k = 0; k < Cw; k++) S->base[p] += pop64(mimg[pbase[p] + off + k]);
                    }
                } else {
                    for (int p = 0; p < BC_P; p++) {
                        ap[p] = valid[p] ? img + pbase[p] + off : S->zero;
                        S->base[p] += valid[p];
                        if (!valid[p] && p < np) S->oob[p * A->T + S->noob[p]++] = t;
                    }
                }
                nact++;
            }
        }
        if (!mimg)
            for (int p = 0; p < BC_P; p++) S->base[p] *= (int32_t)A->C; /* valid taps * real channels */
        S->nact = nact;
    } else {
        /* patch mode (C < 64, one input word per pixel): gather the in-bound taps' C bits of each pixel into
           a contiguous bit string, tap-major; out-of-bounds taps stay 0 (correction / zero mask). */
        const int64_t K = A->K, C = A->C;
        const uint64_t cmask = (1ULL << C) - 1ULL; /* C < 64 here */
        for (int p = 0; p < BC_P; p++) {
            uint64_t *pb = S->patch + p * K, *pm = S->pmask + p * K;
            memset(pb, 0, (size_t)K * sizeof(uint64_t));
            if (mimg) memset(pm, 0, (size_t)K * sizeof(uint64_t));
            if (p >= np) continue;
            for (int kh = 0; kh < A->KH; kh++) {
                int64_t ih = ih0[p] + kh;
                for (int kw = 0; kw < A->KW; kw++) {
                    int t = kh * A->KW + kw;
                    int64_t iw = iw0[p] + kw;
                    if ((uint64_t)ih >= (uint64_t)H || (uint64_t)iw >= (uint64_t)W) {
                        if (!mimg) S->oob[p * A->T + S->noob[p]++] = t;
                        continue;
                    }
                    int64_t off = ih * W + iw; /* Cw == 1 */
                    uint64_t v = img[off] & cmask;
                    int64_t pos = (int64_t)t * C, wi = pos >> 6, sh = pos & 63;
                    pb[wi] |= v << sh;
                    if (sh + C > 64) pb[wi + 1] |= v >> (64 - sh);
                    if (mimg) {
                        uint64_t mv = mimg[off] & cmask;
                        pm[wi] |= mv << sh;
                        if (sh + C > 64) pm[wi + 1] |= mv >> (64 - sh);
                        S->base[p] += pop64(mv);
                    } else {
                        S->base[p] += (int32_t)C;
                    }
                }
            }
        }
        S->wt[0] = A->wdata;
        for (int p = 0; p < BC_P; p++) {
            S->ap[p] = S->patch + p * K;
            S->mp[p] = S->pmask + p * K;
        }
        S->nact = 1;
    }
}

/* Fast path only: the zero words read at pixel p's out-of-bounds taps added popcount(w_tap) to its xor count;
   returns the sum of those popcounts for the 16 channels of block blk (in S->corr[p]). */
BC_INLINE const int32_t *oob_corr(const bc_conv *restrict A, bc_scratch *restrict S, int p, int64_t blk) {
    int32_t *c = S->corr + p * BC_OB;
    const int32_t *wp = A->wpop + (blk * A->T + S->oob[p * A->T]) * BC_OB;
    for (int o = 0; o < BC_OB; o++) c[o] = wp[o];
    for (int u = 1; u < S->noob[p]; u++) {
        wp = A->wpop + (blk * A->T + S->oob[p * A->T + u]) * BC_OB;
        for (int o = 0; o < BC_OB; o++) c[o] += wp[o];
    }
    return c;
}

/* The fused epilogue of blocks [b0, b0 + nb) of the current tile from the raw counts in S->pc; block-major:
   per-channel vectors loaded once per block, pointers advanced per pixel. */
BC_INLINE int64_t epi_blocks(const int F, const bc_conv *restrict A, bc_scratch *restrict S, int64_t pix0, int np,
                             int64_t b0, int nb) {
    /* F >= 0: the epilogue options as compile-time constants (bit 0 bias, 1 relu, 2 affine, 3 residual,
       4 float out, 5 bits, 6 mask), so each specialization is straight-line code; F < 0: read from A. */
    const int fl = F >= 0 ? F : A->epi_flags;
    const int has_bias = fl & 1, relu = fl & 2, affine = fl & 4, has_res = fl & 8, has_out = fl & 16,
              has_bits = fl & 32, has_mask = fl & 64;
    const int32_t *pc = S->pc;
    const float scale = A->scale;
    const float *bias = A->bias, *alpha = A->alpha, *beta = A->beta, *res = A->res;
    float *out = A->out;
    const int64_t Cout = A->Cout, Cwo4 = A->Cwo * 4;
    uint16_t *ob = has_bits ? (uint16_t *)(A->obits + pix0 * A->Cwo) : NULL;
    uint16_t *om = has_mask ? (uint16_t *)(A->omask + pix0 * A->Cwo) : NULL;
    int64_t zeros = 0;
    for (int j = 0; j < nb; j++) {
        const int64_t blk = b0 + j, oc0 = blk * BC_OB;
#if defined(BC_HAVE_V16)
        if (Cout - oc0 >= BC_OB) {
            v16 vb = v_load(has_bias ? bias + oc0 : S->fzero);
            v16 va = affine ? v_load(alpha + oc0) : vb, vc = affine ? v_load(beta + oc0) : vb;
            const float *rp = has_res ? res + pix0 * Cout + oc0 : NULL;
            float *op = has_out ? out + pix0 * Cout + oc0 : NULL;
            for (int p = 0; p < np; p++) {
                const int32_t *corr = S->noob[p] ? oob_corr(A, S, p, blk) : NULL;
                v16 y = v_dot(S->base[p], pc + p * BC_OB * nb + j * BC_OB, corr, scale);
                if (has_bias) y = v_add(y, vb);
                if (relu) y = v_relu(y);
                if (affine) y = v_fma(y, va, vc);
                if (has_res) y = v_add(y, v_load(rp + p * Cout));
                if (has_out) v_store(op + p * Cout, y);
                if (has_bits) {
                    uint32_t nz = v_nz(y);
                    ob[p * Cwo4 + blk] = (uint16_t)v_neg(y);
                    if (has_mask) om[p * Cwo4 + blk] = (uint16_t)nz;
                    zeros += BC_OB - pop64(nz);
                }
            }
        } else
#endif
        {
            (void)oc0; (void)scale; (void)relu; (void)bias; (void)alpha; (void)beta; (void)res; (void)out;
            (void)has_bias; (void)affine; (void)has_res; (void)has_out; (void)Cout;
            for (int p = 0; p < np; p++) {
                const int32_t *corr = S->noob[p] ? oob_corr(A, S, p, blk) : NULL;
                zeros += epilogue_scalar(A, pix0 + p, blk, pc + p * BC_OB * nb + j * BC_OB, S->base[p], corr);
            }
        }
        if (has_bits && blk == A->nblk - 1) /* clear the 16-bit pieces of the last word past the last block */
            for (int p = 0; p < np; p++)
                for (int64_t q = blk + 1; q < Cwo4; q++) {
                    ob[p * Cwo4 + q] = 0;
                    if (has_mask) om[p * Cwo4 + q] = 0;
                }
    }
    return zeros;
}

/* Runs the micro-kernel on blocks [b0, b0 + nb) of the current tile and applies the epilogue. */
static int64_t run_blocks(const bc_conv *restrict A, bc_scratch *restrict S, int64_t pix0, int np, int64_t b0, int nb) {
    const int masked = A->mask != NULL;
    const int64_t wshift = b0 * A->bstride;
#if BC_NB >= 2
    if (nb == 2) {
        if (masked) mk_2_1(S->ap, S->mp, S->wtp, wshift, S->nact, A->bstride, A->K, S->pc);
        else mk_2_0(S->ap, S->mp, S->wtp, wshift, S->nact, A->bstride, A->K, S->pc);
    } else
#endif
    {
        if (masked) mk_1_1(S->ap, S->mp, S->wtp, wshift, S->nact, A->bstride, A->K, S->pc);
        else mk_1_0(S->ap, S->mp, S->wtp, wshift, S->nact, A->bstride, A->K, S->pc);
    }
    /* common option sets get their own copy of the epilogue (see epi_blocks) */
    switch (A->epi_flags) {
    case 16: return epi_blocks(16, A, S, pix0, np, b0, nb);   /* float out only */
    case 126: return epi_blocks(126, A, S, pix0, np, b0, nb); /* relu, BN, residual, float + bits + mask */
    case 118: return epi_blocks(118, A, S, pix0, np, b0, nb); /* relu, BN, float + bits + mask */
    case 102: return epi_blocks(102, A, S, pix0, np, b0, nb); /* relu, BN, bits + mask */
    case 30: return epi_blocks(30, A, S, pix0, np, b0, nb);   /* relu, BN, residual, float */
    default: return epi_blocks(-1, A, S, pix0, np, b0, nb);
    }
}

static float *padded_copy(const float *v, int64_t n, int64_t npad) {
    if (!v) return NULL;
    float *r = (float *)calloc((size_t)npad, sizeof(float));
    if (r) memcpy(r, v, (size_t)n * sizeof(float));
    return r;
}

/*
 * The binary convolution with its fused epilogue.
 *
 *   bits      [N][H][W][Cw] packed input signs (Cw = ceil(C/64)), from bitconv_pack_signs_* or a previous
 *             bitconv_conv2d's out_bits.
 *   mask      [N][H][W][Cw] nonzero mask, or NULL when the input has no exact zero (fast path).
 *   wpacked   from bitconv_pack_weights for (Cout, C, KH, KW) (either mode); validated against the shape.
 *   sh, sw, ph, pw: stride and zero padding (dilation 1, groups 1).
 *   scale     s (mean |w|); bias [Cout] or NULL; relu 0/1; alpha, beta [Cout] or NULL (both or none);
 *   residual  [N][OH][OW][Cout] float or NULL.
 *   out       [N][OH][OW][Cout] float or NULL; out_bits, out_mask [N][OH][OW][ceil(Cout/64)] or NULL
 *             (out_mask only together with out_bits).  OH = (H + 2 ph - KH) / sh + 1, same for OW.
 *   nthreads  OpenMP threads for this call.
 * Returns the number of outputs equal to 0 (or NaN) when out_bits is given (0: out_mask is not needed by
 * the next conv), 0 when it is not, and a negative number on invalid arguments:
 *   -1 bad shape, -2 weight header mismatch, -3 missing pointers, -4 out of memory.
 * out / out_bits must not alias bits / mask / residual (out may alias residual only if it is the same
 * buffer: each element is read before it is written by the same thread).
 */
BC_API int64_t bitconv_conv2d(const uint64_t *bits, const uint64_t *mask, int64_t N, int64_t H, int64_t W,
                              int64_t C, const uint64_t *wpacked, int64_t Cout, int KH, int KW, int sh, int sw,
                              int ph, int pw, float scale, const float *bias, int relu, const float *alpha,
                              const float *beta, const float *residual, float *out, uint64_t *out_bits,
                              uint64_t *out_mask, int nthreads) {
    if (N <= 0 || H <= 0 || W <= 0 || C <= 0 || Cout <= 0 || KH <= 0 || KW <= 0 || sh <= 0 || sw <= 0 ||
        ph < 0 || pw < 0)
        return -1;
    const int64_t OH = (H + 2 * ph - KH) / sh + 1, OW = (W + 2 * pw - KW) / sw + 1;
    if (H + 2 * ph < KH || W + 2 * pw < KW || OH <= 0 || OW <= 0) return -1;
    if (!bits || !wpacked || (!out && !out_bits) || (out_mask && !out_bits) || ((alpha == NULL) != (beta == NULL)))
        return -3;
    if (wpacked[H_MAGIC] != BC_MAGIC || (int64_t)wpacked[H_COUT] != Cout || (int64_t)wpacked[H_CIN] != C ||
        wpacked[H_KHKW] != ((uint64_t)KH | ((uint64_t)KW << 32)))
        return -2;
    bc_conv A;
    memset(&A, 0, sizeof(A));
    A.bits = bits;
    A.mask = mask;
    A.N = N; A.H = H; A.W = W; A.C = C; A.Cw = (C + 63) / 64;
    A.mode = (int)wpacked[H_MODE];
    A.K = (int64_t)wpacked[H_KW_WORDS];
    A.nblk = (int64_t)wpacked[H_NBLK];
    A.T = (int64_t)KH * KW;
    A.bstride = (A.mode == BC_MODE_PATCH ? 1 : A.T) * A.K * BC_OB;
    A.wdata = wpacked + BC_HDR;
    A.wpop = (const int32_t *)(wpacked + wpacked[H_POP_OFF]);
    A.Cout = Cout; A.KH = KH; A.KW = KW; A.sh = sh; A.sw = sw; A.ph = ph; A.pw = pw;
    A.OH = OH; A.OW = OW; A.Cwo = (Cout + 63) / 64;
    A.scale = scale;
    A.relu = relu != 0;
    A.res = residual;
    A.out = out;
    A.obits = out_bits;
    A.omask = out_mask;
    A.epi_flags = (bias ? 1 : 0) | (A.relu ? 2 : 0) | (alpha ? 4 : 0) | (residual ? 8 : 0) | (out ? 16 : 0) |
                  (out_bits ? 32 : 0) | (out_mask ? 64 : 0);
    const int64_t npad = A.nblk * BC_OB;
    float *pb = padded_copy(bias, Cout, npad), *pa = padded_copy(alpha, Cout, npad),
          *pbe = padded_copy(beta, Cout, npad);
    uint64_t *zero = (uint64_t *)calloc((size_t)(A.Cw > A.K ? A.Cw : A.K) + 8, sizeof(uint64_t));
    int64_t *toff = (int64_t *)malloc((size_t)A.T * sizeof(int64_t));
    if ((bias && !pb) || (alpha && !pa) || (beta && !pbe) || !zero || !toff) {
        free(pb); free(pa); free(pbe); free(zero); free(toff);
        return -4;
    }
    for (int64_t t = 0; t < A.T; t++) toff[t] = ((t / KW) * W + (t % KW)) * A.Cw;
    A.toff = toff;
    A.bias = pb; A.alpha = pa; A.beta = pbe;

    nthreads = clamp_threads(nthreads);
    const int64_t npix = OH * OW;
    const int64_t tiles_img = (npix + BC_P - 1) / BC_P, ntiles = N * tiles_img;
    /* Split the output channels into chunks when there are too few tiles to balance the threads. */
    int64_t bpc = A.nblk, nchunk = 1;
    while (nthreads > 1 && ntiles * nchunk < 8 * nthreads && bpc > BC_NB) {
        nchunk *= 2;
        bpc = (A.nblk + nchunk - 1) / nchunk;
        bpc = (bpc + BC_NB - 1) / BC_NB * BC_NB;
        nchunk = (A.nblk + bpc - 1) / bpc;
    }
    const int64_t nitems = ntiles * nchunk;
    int64_t zeros = 0;
    int fail = 0;

#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && nitems > 1) reduction(+ : zeros)
    {
        bc_scratch S;
        memset(&S, 0, sizeof(S));
        const size_t T = (size_t)A.T;
        void *mem = NULL;
        size_t ptrs = 2 * T * BC_P + 2 * T, ints = (size_t)BC_P * T;
        size_t bytes = ptrs * sizeof(void *) + ints * sizeof(int) + 2 * (size_t)BC_P * (size_t)A.K * 8 +
                       ((size_t)BC_P * BC_NB * BC_OB + (size_t)BC_P * BC_OB + BC_OB) * sizeof(int32_t) + 4 * 64;
        mem = malloc(bytes);
        if (!mem) {
#pragma omp atomic write
            fail = 1;
        } else {
            char *q = (char *)(((uintptr_t)mem + 63) & ~(uintptr_t)63);
            S.pc = (int32_t *)q; q += ((size_t)BC_P * BC_NB * BC_OB) * sizeof(int32_t);
            S.corr = (int32_t *)q; q += (size_t)BC_P * BC_OB * sizeof(int32_t);
            S.fzero = (float *)q; q += BC_OB * sizeof(float);
            memset(S.fzero, 0, BC_OB * sizeof(float));
            q = (char *)(((uintptr_t)q + 63) & ~(uintptr_t)63);
            S.patch = (uint64_t *)q; q += (size_t)BC_P * A.K * 8;
            S.pmask = (uint64_t *)q; q += (size_t)BC_P * A.K * 8;
            S.ap = (const uint64_t **)q; q += T * BC_P * sizeof(void *);
            S.mp = (const uint64_t **)q; q += T * BC_P * sizeof(void *);
            S.wt = (const uint64_t **)q; q += T * sizeof(void *);
            S.wt_all = (const uint64_t **)q; q += T * sizeof(void *);
            for (size_t t = 0; t < T; t++) S.wt_all[t] = A.wdata + (int64_t)t * A.K * BC_OB;
            S.oob = (int *)q;
            S.zero = zero;
            int64_t cur_tile = -1;
#pragma omp for schedule(static)
            for (int64_t it = 0; it < nitems; it++) {
                int64_t tile = it / nchunk, chunk = it % nchunk;
                int64_t n = tile / tiles_img, q0 = (tile % tiles_img) * BC_P;
                int np = (int)(npix - q0 < BC_P ? npix - q0 : BC_P);
                if (tile != cur_tile) {
                    setup_tile(&A, &S, n, q0, np);
                    cur_tile = tile;
                }
                int64_t bbeg = chunk * bpc, bend = bbeg + bpc < A.nblk ? bbeg + bpc : A.nblk;
                int64_t pix0 = n * npix + q0;
                int64_t b = bbeg;
                for (; b + BC_NB <= bend; b += BC_NB) zeros += run_blocks(&A, &S, pix0, np, b, BC_NB);
                for (; b < bend; b++) zeros += run_blocks(&A, &S, pix0, np, b, 1);
            }
            free(mem);
        }
    }
    free(pb); free(pa); free(pbe); free(zero); free(toff);
    if (fail) return -4;
    return out_bits ? zeros : 0;
}
