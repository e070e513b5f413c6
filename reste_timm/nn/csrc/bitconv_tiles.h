/* bitconv_tiles.h -- the register tile's activation pointers and border bookkeeping (tile setup).
 * Part of bitconv.c, which includes it once (a single translation unit, so the compiler sees every
 * function when it inlines the micro-kernels and specializes the epilogue); not a standalone header. */

/* ----------------------------------------------------------------------------------------------------- */
/* Tile setup                                                                                             */
/* ----------------------------------------------------------------------------------------------------- */

typedef struct {
    const uint64_t **ap, **mp; /* [T][BC_P] */
    const uint64_t **wt;       /* [T] per active tap: its weights in block 0 (border tiles) */
    const uint64_t **wt_all;   /* [T] the same for all taps in order (interior tiles) */
    const uint64_t *const *wtp; /* the table of the current tile: wt or wt_all */
    int *oob;                  /* [BC_P][T] out-of-bounds taps of each pixel (fast path correction) */
    int noob[BC_P];
    const int32_t *cp[BC_P];   /* padded path: each pixel's class correction (block 0), NULL in the interior */
    int32_t base[BC_P];
    int nact;
    uint64_t *patch, *pmask;   /* patch mode: [BC_P][K] gathered bits and mask */
    int32_t *pc;               /* [BC_P][BC_NB*16] */
    int32_t *corr;             /* [BC_P][16] */
    const uint64_t *zero;      /* zero words (at least max(Cw, K)) */
} bc_scratch;

/* The padded path's tile: every tap of every pixel is in the padded input, so the pointer table is plain
   arithmetic (the tile may span output rows), and each pixel takes its base and correction from its class. */
static void setup_padded(const bc_conv *restrict A, bc_scratch *restrict S, int64_t n, int64_t q0, int np) {
    const int64_t Cw = A->Cw, W = A->W, T = A->T;
    const uint64_t *img = A->bits + n * A->H * W * Cw;
    const int64_t oh0 = q0 / A->OW, ow0 = q0 - oh0 * A->OW;
    int64_t oh = oh0, ow = ow0;
    for (int p = 0; p < BC_P; p++) {
        if (p >= np) oh = oh0, ow = ow0; /* dummies repeat pixel q0 */
        const uint64_t *px = img + (oh * A->sh * W + ow * A->sw) * Cw;
        for (int64_t t = 0; t < T; t++) S->ap[t * BC_P + p] = px + A->toff[t];
        const int64_t cls = (int64_t)A->rcls[oh] * A->nccls + A->ccls[ow];
        S->base[p] = A->cbase[cls];
        S->cp[p] = cls == A->cint ? NULL : A->ccorr + cls * A->nblk * BC_OB;
        S->noob[p] = 0;
        if (++ow == A->OW) ow = 0, oh++;
    }
    S->wtp = S->wt_all;
    S->nact = (int)T;
}

/* Builds the pointer table of the tile of pixels q0 .. q0+np-1 of image n (pixels >= np are dummies that
   read zeros and whose results are discarded). */
static void setup_tile(const bc_conv *restrict A, bc_scratch *restrict S, int64_t n, int64_t q0, int np) {
    if (A->padded) {
        setup_padded(A, S, n, q0, np);
        return;
    }
    int64_t ih0[BC_P], iw0[BC_P], pbase[BC_P];
    /* one division per tile (not per pixel: a 64-bit division costs as much as a tap of the micro-kernel) */
    const int64_t oh0 = q0 / A->OW, ow0 = q0 - oh0 * A->OW;
    int64_t oh = oh0, ow = ow0;
    for (int p = 0; p < BC_P; p++) {
        if (p >= np) oh = oh0, ow = ow0; /* dummies repeat pixel q0 */
        ih0[p] = oh * A->sh - A->ph;
        iw0[p] = ow * A->sw - A->pw;
        pbase[p] = (ih0[p] * A->W + iw0[p]) * A->Cw;
        S->noob[p] = 0;
        S->cp[p] = NULL;
        S->base[p] = 0;
        if (++ow == A->OW) ow = 0, oh++;
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
                S->wt[nact] = A->wdata + (int64_t)t * A->K * A->wk;
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


/* The correction of pixel p's sums in block blk: its class's (padded path), its out-of-bounds taps' (fast
   path), or none (interior, mask path). */
BC_INLINE const int32_t *pix_corr(const bc_conv *restrict A, bc_scratch *restrict S, int p, int64_t blk) {
    if (S->cp[p]) return S->cp[p] + blk * BC_OB;
    return S->noob[p] ? oob_corr(A, S, p, blk) : NULL;
}

/* The bitmask of kernel offsets k in [0, KS) whose input position o * s - pad + k is outside [0, size). */
static uint64_t oob_mask(int64_t o, int s, int pad, int KS, int64_t size) {
    uint64_t m = 0;
    for (int k = 0; k < KS; k++) {
        const int64_t i = o * s - pad + k;
        if (i < 0 || i >= size) m |= 1ULL << k;
    }
    return m;
}

/* Groups the output positions along one axis by their out-of-bounds kernel offsets: cls[o] indexes masks[]
   (at most 64 distinct ones kept: returns -1 beyond, and the caller takes the general path). */
static int classify(int64_t n_out, int s, int pad, int KS, int64_t size, int32_t *cls, uint64_t *masks) {
    int n = 0;
    for (int64_t o = 0; o < n_out; o++) {
        const uint64_t m = oob_mask(o, s, pad, KS, size);
        int j = 0;
        while (j < n && masks[j] != m) j++;
        if (j == n) {
            if (n == 64) return -1;
            masks[n++] = m;
        }
        cls[o] = j;
    }
    return n;
}

/*
 * The padded path (taps mode, no zero mask): the caller pads the input bits with zero words (+1 signs), and
 * the sums of an output pixel are corrected by its class, the pair (out-of-bounds rows, out-of-bounds
 * columns) of its kernel window: base = valid taps * C, and corr = popcount(w) summed over the class's
 * out-of-bounds taps (what their zero words added to the xor count).  Builds those tables into A (one
 * malloc'd block returned in *mem, freed by the caller); returns 0, or -1 where the path does not apply
 * (a kernel wider than 64, more than 64 classes along an axis, out of memory).
 */
static int build_classes(bc_conv *A, int64_t H, int64_t W, void **mem) {
    if (A->KH > 64 || A->KW > 64) return -1;
    uint64_t rm[64], cm[64];
    int32_t *axes = (int32_t *)malloc((size_t)(A->OH + A->OW) * sizeof(int32_t));
    if (!axes) return -1;
    const int nr = classify(A->OH, A->sh, A->ph, A->KH, H, axes, rm);
    const int nc = nr < 0 ? -1 : classify(A->OW, A->sw, A->pw, A->KW, W, axes + A->OH, cm);
    const int64_t ncls = (int64_t)nr * nc, lanes = A->nblk * BC_OB;
    char *block = nc < 0 ? NULL : (char *)malloc((size_t)(ncls * (lanes + 1)) * sizeof(int32_t));
    if (!block) {
        free(axes);
        return -1;
    }
    int32_t *cbase = (int32_t *)block, *ccorr = cbase + ncls;
    A->cint = -1;
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) {
            const int64_t cls = (int64_t)r * nc + c;
            int32_t *corr = ccorr + cls * lanes;
            memset(corr, 0, (size_t)lanes * sizeof(int32_t));
            int valid = 0;
            for (int kh = 0; kh < A->KH; kh++)
                for (int kw = 0; kw < A->KW; kw++) {
                    const int64_t t = (int64_t)kh * A->KW + kw;
                    if (!((rm[r] >> kh) & 1) && !((cm[c] >> kw) & 1)) {
                        valid++;
                        continue;
                    }
                    for (int64_t b = 0; b < A->nblk; b++) {
                        const int32_t *wp = A->wpop + (b * A->T + t) * BC_OB;
                        for (int o = 0; o < BC_OB; o++) corr[b * BC_OB + o] += wp[o];
                    }
                }
            cbase[cls] = (int32_t)(valid * A->C);
            if ((rm[r] | cm[c]) == 0) A->cint = cls;
        }
    A->rcls = axes;
    A->ccls = axes + A->OH;
    A->nccls = nc;
    A->cbase = cbase;
    A->ccorr = ccorr;
    A->padded = 1;
    mem[0] = axes;
    mem[1] = block;
    return 0;
}

/* The input bits with ph zero rows above and below and pw zero columns left and right of each image (zero
   words: +1 signs, corrected by the classes); NULL when out of memory. */
static uint64_t *pad_bits(const uint64_t *bits, int64_t N, int64_t H, int64_t W, int64_t Cw, int ph, int pw,
                          int nthreads) {
    const int64_t Hp = H + 2 * (int64_t)ph, row = (W + 2 * (int64_t)pw) * Cw, side = (int64_t)pw * Cw;
    uint64_t *out = (uint64_t *)malloc((size_t)(N * Hp * row) * sizeof(uint64_t));
    if (!out) return NULL;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && N * Hp * row > 65536) schedule(static)
    for (int64_t r = 0; r < N * Hp; r++) {
        const int64_t n = r / Hp, h = r % Hp - ph;
        uint64_t *dst = out + r * row;
        if (h < 0 || h >= H) {
            memset(dst, 0, (size_t)row * sizeof(uint64_t));
            continue;
        }
        memset(dst, 0, (size_t)side * sizeof(uint64_t));
        memcpy(dst + side, bits + (n * H + h) * W * Cw, (size_t)(W * Cw) * sizeof(uint64_t));
        memset(dst + side + W * Cw, 0, (size_t)side * sizeof(uint64_t));
    }
    return out;
}
