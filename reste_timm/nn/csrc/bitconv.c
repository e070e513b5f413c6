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
 * Weights are packed by bitconv_pack_weights (once per deployed layer, at every training forward) into one
 * uint64 buffer (see the layout comment there):
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
 * BC_P pixels x 16*NB output channels.  On the AVX-512 path the epilogue takes the sums of whole blocks
 * straight from those registers (run_direct); elsewhere, and for a partial last block or the mask path, the
 * micro-kernel stores them to a scratch tile that the epilogue reads back (epi_blocks).
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
 * On the AVX-512 path, where the CPU has Intel AMX (and Linux grants its tiles), a weight packed with its int8
 * copy (BC_WITH_COPY) runs on the tiles instead: bitconv_amx.h; -DBITCONV_NO_AMX leaves that out.  On the
 * AVX2 path a weight packed with its nibble copy (BC_WITH_COPY) reads that copy where the input has no zero mask.
 *
 * Threads: OpenMP over (pixel tile, output-channel chunk) work items, thread count passed per call.  All
 * functions are reentrant; per-call scratch is malloc'd.  The one global is the AMX path's cached answer to
 * "may this process use the tiles" (bitconv_amx.h: asked once, the same for every thread).
 * Byte order: the packed outputs are written in 16-bit pieces, which assumes a little-endian machine
 * (x86-64, aarch64).
 */
#define _DEFAULT_SOURCE /* syscall(), for the AMX path's permission request */
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

/* The parts, in this order (each uses what the ones before it define). */
#include "bitconv_paths.h"
#include "bitconv_pack.h"
#include "bitconv_microkernels.h"
#include "bitconv_epilogue.h"
#include "bitconv_tiles.h"

/* ----------------------------------------------------------------------------------------------------- */
/* The main loop                                                                                          */
/* ----------------------------------------------------------------------------------------------------- */

/* The fused epilogue of blocks [b0, b0 + nb) of the current tile from the raw counts in S->pc; block-major:
   per-channel vectors loaded once per block.  F: the options, as in epi_vec (-1: read from A). */
BC_INLINE int64_t epi_blocks(const int F, const bc_conv *restrict A, bc_scratch *restrict S, int64_t pix0, int np,
                             int64_t b0, int nb) {
    const int fl = F >= 0 ? F : A->epi_flags;
    int64_t zeros = 0;
    for (int j = 0; j < nb; j++) {
        const int64_t blk = b0 + j;
        const int32_t *pc = S->pc + j * BC_OB;
#if defined(BC_HAVE_V16)
        if (A->Cout - blk * BC_OB >= BC_OB) {
            const epi_consts k = epi_load(F, A, blk * BC_OB);
            for (int p = 0; p < np; p++) {
                const int32_t *corr = pix_corr(A, S, p, blk);
                zeros += epi_vec(F, A, v_dot(S->base[p], pc + p * BC_OB * nb, corr, A->scale), k, pix0 + p, blk);
            }
        } else
#endif
        {
            for (int p = 0; p < np; p++) {
                const int32_t *corr = pix_corr(A, S, p, blk);
                zeros += epilogue_scalar(A, pix0 + p, blk, pc + p * BC_OB * nb, S->base[p], corr);
            }
        }
        if ((fl & 32) && blk == A->nblk - 1) clear_bits_tail(A, pix0, np);
    }
    return zeros;
}

#if defined(BC_PATH_AVX512)
/* Whole blocks b0 .. b0+NB-1 of a tile without a zero mask: the sums go from the registers through the border
   correction and the epilogue (options F, as in epi_vec), without the round trip through S->pc that the general
   path takes (kept for partial blocks and the mask path). */
BC_INLINE int64_t run_direct(const int F, const int NB, const bc_conv *restrict A, bc_scratch *restrict S,
                             int64_t pix0, int np, int64_t b0) {
    __m512i acc[BC_P][2 * BC_NB];
    mk_avx512_sums(NB, 0, S->ap, S->mp, S->wtp, b0 * A->bstride, S->nact, A->bstride, A->K, acc);
    int64_t zeros = 0;
#pragma GCC unroll 16
    for (int b = 0; b < NB; b++) {
        const int64_t blk = b0 + b;
        const epi_consts k = epi_load(F, A, blk * BC_OB);
#pragma GCC unroll 16
        for (int p = 0; p < BC_P; p++) {
            if (p >= np) break;
            const int32_t *corr = pix_corr(A, S, p, blk);
            const v16 y = v_dot_sums(S->base[p], sums16(acc[p][2 * b], acc[p][2 * b + 1]), corr, A->scale);
            zeros += epi_vec(F, A, y, k, pix0 + p, blk);
        }
    }
    if ((A->epi_flags & 32) && b0 + NB == A->nblk) clear_bits_tail(A, pix0, np);
    return zeros;
}

BC_INLINE int64_t run_direct_nb(const int F, const bc_conv *restrict A, bc_scratch *restrict S, int64_t pix0,
                                int np, int64_t b0, int nb) {
#if BC_NB >= 2
    if (nb == 2) return run_direct(F, 2, A, S, pix0, np, b0);
#endif
    (void)nb;
    return run_direct(F, 1, A, S, pix0, np, b0);
}
#endif

/* Returns fn(F, ...) with the epilogue options F as a compile-time constant for the common option sets, so each
   gets its own straight-line copy of the epilogue (see epi_vec), and F = -1 (options read from A) for any other:
   16 float out only; 126 relu, BN, residual, float + bits + mask; 118 relu, BN, float + bits + mask;
   102 relu, BN, bits + mask; 30 relu, BN, residual, float. */
#define BC_BY_OPTIONS(fn, ...)                   \
    switch (A->epi_flags) {                      \
    case 16: return fn(16, __VA_ARGS__);         \
    case 126: return fn(126, __VA_ARGS__);       \
    case 118: return fn(118, __VA_ARGS__);       \
    case 102: return fn(102, __VA_ARGS__);       \
    case 30: return fn(30, __VA_ARGS__);         \
    default: return fn(-1, __VA_ARGS__);         \
    }

#include "bitconv_amx.h" /* uses BC_BY_OPTIONS */

/* Runs the micro-kernel on blocks [b0, b0 + nb) of the current tile and applies the epilogue. */
static int64_t run_blocks(const bc_conv *restrict A, bc_scratch *restrict S, int64_t pix0, int np, int64_t b0, int nb) {
    const int masked = A->mask != NULL;
    const int64_t wshift = b0 * A->bstride;
#if defined(BC_PATH_AVX2)
    if (A->wk != BC_OB) { /* the nibble copy (no zero mask) */
        mk_nibbles(S->ap, S->wtp, wshift, S->nact, A->K, S->pc);
        BC_BY_OPTIONS(epi_blocks, A, S, pix0, np, b0, nb)
    }
#endif
#if defined(BC_PATH_AVX512)
    if (!masked && (b0 + nb) * BC_OB <= A->Cout) { /* whole blocks, no zero mask: sums straight from registers */
        BC_BY_OPTIONS(run_direct_nb, A, S, pix0, np, b0, nb)
    }
#endif
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
    BC_BY_OPTIONS(epi_blocks, A, S, pix0, np, b0, nb)
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
    A.mode = (int)(wpacked[H_MODE] & 0xff);
    A.K = (int64_t)wpacked[H_KW_WORDS];
    A.nblk = (int64_t)wpacked[H_NBLK];
    A.T = (int64_t)KH * KW;
    A.wdata = wpacked + BC_HDR;
    A.wk = BC_OB;
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
    if ((bias && !pb) || (alpha && !pa) || (beta && !pbe)) {
        free(pb); free(pa); free(pbe);
        return -4;
    }
    A.bias = pb; A.alpha = pa; A.beta = pbe;
    nthreads = clamp_threads(nthreads);
    /* the weight's path copy (bitconv_paths.h), if it has one of this build's kind */
    const int64_t copy_off = (int64_t)(wpacked[H_MODE] >> 32);
    const int copy_kind = (int)((wpacked[H_MODE] >> 8) & 0xff);
#if defined(BC_HAVE_AMX)
    if (copy_off && copy_kind == BC_COPY_AMX && amx_takes(&A)) {
        const int64_t z = amx_conv(&A, wpacked, copy_off, nthreads);
        free(pb); free(pa); free(pbe);
        return z;
    }
#elif defined(BC_PATH_AVX2)
    if (copy_off && copy_kind == BC_COPY_NIBBLES && A.mode == BC_MODE_TAPS && !mask) {
        A.wdata = wpacked + copy_off;
        A.wk = 2 * BC_OB;
    }
#endif
    (void)copy_off;
    (void)copy_kind;
    A.bstride = (A.mode == BC_MODE_PATCH ? 1 : A.T) * A.K * A.wk;
    /* the popcount path's zero words and tap offsets */
    uint64_t *zero = (uint64_t *)calloc((size_t)(A.Cw > A.K ? A.Cw : A.K) + 8, sizeof(uint64_t));
    int64_t *toff = (int64_t *)malloc((size_t)A.T * sizeof(int64_t));
    if (!zero || !toff) {
        free(pb); free(pa); free(pbe); free(zero); free(toff);
        return -4;
    }
    /* taps mode without a zero mask: the padded path where its tables and the padded copy fit in memory */
    void *cls_mem[2] = {NULL, NULL};
    uint64_t *padded = NULL;
    if (A.mode == BC_MODE_TAPS && !mask && build_classes(&A, H, W, cls_mem) == 0 && (ph || pw)) {
        padded = pad_bits(bits, N, H, W, A.Cw, ph, pw, nthreads);
        if (padded) {
            A.bits = padded;
            A.H = H + 2 * ph;
            A.W = W + 2 * pw;
        } else {
            A.padded = 0;
        }
    }
    for (int64_t t = 0; t < A.T; t++) toff[t] = ((t / KW) * A.W + (t % KW)) * A.Cw;
    A.toff = toff;

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
                       ((size_t)BC_P * BC_NB * BC_OB + (size_t)BC_P * BC_OB) * sizeof(int32_t) + 4 * 64;
        mem = malloc(bytes);
        if (!mem) {
#pragma omp atomic write
            fail = 1;
        } else {
            char *q = (char *)(((uintptr_t)mem + 63) & ~(uintptr_t)63);
            S.pc = (int32_t *)q; q += ((size_t)BC_P * BC_NB * BC_OB) * sizeof(int32_t);
            S.corr = (int32_t *)q; q += (size_t)BC_P * BC_OB * sizeof(int32_t);
            q = (char *)(((uintptr_t)q + 63) & ~(uintptr_t)63);
            S.patch = (uint64_t *)q; q += (size_t)BC_P * A.K * 8;
            S.pmask = (uint64_t *)q; q += (size_t)BC_P * A.K * 8;
            S.ap = (const uint64_t **)q; q += T * BC_P * sizeof(void *);
            S.mp = (const uint64_t **)q; q += T * BC_P * sizeof(void *);
            S.wt = (const uint64_t **)q; q += T * sizeof(void *);
            S.wt_all = (const uint64_t **)q; q += T * sizeof(void *);
            for (size_t t = 0; t < T; t++) S.wt_all[t] = A.wdata + (int64_t)t * A.K * A.wk;
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
    free(padded); free(cls_mem[0]); free(cls_mem[1]);
    if (fail) return -4;
    return out_bits ? zeros : 0;
}
