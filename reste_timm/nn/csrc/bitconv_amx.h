/* bitconv_amx.h -- the taps-mode conv on Intel AMX int8 tiles, where the CPU and the OS allow them.
 * Part of bitconv.c, which includes it once (a single translation unit, so the compiler sees every
 * function when it inlines the epilogue); not a standalone header.
 *
 * Why: where vpopcntq runs on one port (Intel cores: 0.67 xor-popcount-add steps of 512 bits per cycle),
 * the tiles' tdpbssd multiplies 16 x 64 by 64 x 16 int8 matrices at about 1,000 multiply-accumulates per
 * cycle, three times the popcount loop.  The products are the same exact integers: the packed signs are
 * unpacked to bytes, +1 for bit 0, -1 for bit 1, 0 where the zero mask says so and in the zero padding, so
 * the dot product of an output is the one the xor-popcount path computes, without corrections, and the
 * epilogue (shared with the other paths) applies (float)dot * s and what follows.
 *
 * Weights: an int8 copy in tdpbssd's layout, appended to the packed buffer by bitconv_pack_weights when
 * asked (BC_WITH_COPY; kind BC_COPY_AMX): per block of 16 output channels, tap t and 64-channel chunk q, 16 rows of 64 bytes,
 * row r holding input channels 64q + 4r .. 64q + 4r + 3 of the 16 outputs (byte 4j + i: output j, channel
 * 64q + 4r + i); channels >= C are 0, so the +1 bytes of the activations' padding channels add nothing.
 *
 * Activations: per call, the packed input is unpacked into a zero-padded byte image [N][H+2ph][W+2pw][64 Cw]
 * (plus slack).  Output pixels go in tiles of 16 "virtual" pixels whose input rows are equally spaced:
 * for a stride-1 conv the virtual row is the padded input row (W + 2pw pixels, the last 2pw of each row
 * computed and dropped), so a tile may span rows; otherwise each output row is a run of round_up(OW, 16)
 * virtual pixels.  A work item is two pixel tiles x two blocks: four accumulator tiles, two A tiles, two B
 * tiles (the eight tile registers).
 */

#if defined(BC_HAVE_AMX) /* bitconv_paths.h */
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BC_AMX_TARGET __attribute__((target("amx-tile,amx-int8")))

/* 1 when the CPU has AMX-TILE and AMX-INT8 and Linux grants this process the tile state (arch_prctl
   ARCH_REQ_XCOMP_PERM, asked once per process; the answer is cached: every thread computes the same). */
static int amx_usable(void) {
    static int state = -1;
    int s = __atomic_load_n(&state, __ATOMIC_RELAXED);
    if (s >= 0) return s;
    unsigned a = 0, b = 0, c = 0, d = 0;
    int ok = __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 24) & 1u) && ((d >> 25) & 1u);
    if (ok) ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    __atomic_store_n(&state, ok, __ATOMIC_RELAXED);
    return ok;
}

/* Words of the int8 weight copy for this shape, or 0 where the AMX path does not take it: taps mode, whole
   64-channel output words, and at most 36 taps x 64-channel chunks (a 3x3 conv of up to 256 input channels;
   beyond that the copy of two blocks, over 72 KB, streams from L2 at every work item and the popcount path
   keeps up: docs/performance.md). */
static int64_t amx_weight_words(int64_t Cout, int64_t Cin, int64_t T, int mode) {
    if (mode != BC_MODE_TAPS || Cout % 64 != 0 || T * ((Cin + 63) / 64) > 36 || !amx_usable()) return 0;
    return (Cout / BC_OB) * T * ((Cin + 63) / 64) * 128; /* 1,024 bytes per (block, tap, chunk) */
}

/* Fills the int8 copy from the packed bits (taps layout data[blk][t][q][lane]). */
static void amx_pack_weights(const uint64_t *data, int64_t nblk, int64_t T, int64_t K, int64_t Cin, int8_t *out,
                             int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads > 0 ? nthreads : 1) if (nblk * T * K > 64)
    for (int64_t i = 0; i < nblk * T * K; i++) { /* i = (blk * T + t) * K + q */
        const int64_t q = i % K;
        int8_t *dst = out + i * 1024;
        for (int r = 0; r < 16; r++)
            for (int j = 0; j < BC_OB; j++) {
                const uint64_t word = data[i * BC_OB + j];
                for (int b = 0; b < 4; b++) {
                    const int64_t c = q * 64 + 4 * r + b;
                    dst[r * 64 + 4 * j + b] = c >= Cin ? 0 : (int8_t)(((word >> (c & 63)) & 1) ? -1 : 1);
                }
            }
    }
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* The geometry of the byte image and of the virtual pixel tiles. */
typedef struct {
    const int8_t *x;   /* [N][Hp][Wp][Cp] bytes */
    int64_t Hp, Wp, Cp, VW, tiles_img, pairs_img;
    const int8_t *w;   /* the int8 weight copy */
} amx_geom;

/* The byte image's and the tiles' geometry of conv A (G->x and G->w are set by the caller). */
static void amx_geometry(const bc_conv *restrict A, amx_geom *G) {
    G->Hp = A->H + 2 * A->ph;
    G->Wp = A->W + 2 * A->pw;
    G->Cp = A->Cw * 64;
    const int span = A->sh == 1 && A->sw == 1;
    G->VW = span ? G->Wp : (A->OW + 15) / 16 * 16;
    const int64_t nv = span ? (A->OH - 1) * G->Wp + A->OW : A->OH * G->VW;
    G->tiles_img = (nv + 15) / 16;
    G->pairs_img = (G->tiles_img + 1) / 2;
}

/* Whether the tiles take conv A (its weight carrying the int8 copy): taps mode, whole 64-channel output
   words, the tiles usable here, and at least 70% of the tiles' rows output pixels (a stride-2 conv with a
   narrow output, 7 of every 16 rows at 7x7, runs faster on the popcount path). */
static int amx_takes(const bc_conv *restrict A) {
    if (A->mode != BC_MODE_TAPS || A->Cout % 64 != 0 || !amx_usable()) return 0;
    amx_geom G;
    amx_geometry(A, &G);
    return 10 * A->OH * A->OW >= 7 * 16 * G.tiles_img;
}

/* Unpacks packed signs (and the zero mask) into the zero-padded byte image, rows in parallel. */
static void amx_unpack(const bc_conv *restrict A, const amx_geom *G, int8_t *x, int64_t slack, int nthreads) {
    const int64_t rows = A->N * G->Hp, rowb = G->Wp * G->Cp, Cw = A->Cw;
    const __m512i one = _mm512_set1_epi8(1), neg = _mm512_set1_epi8(-1);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && rows * rowb > 65536)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t n = r / G->Hp, h = r % G->Hp - A->ph;
        int8_t *dst = x + r * rowb;
        if (h < 0 || h >= A->H) {
            memset(dst, 0, (size_t)rowb);
            continue;
        }
        memset(dst, 0, (size_t)(A->pw * G->Cp));
        memset(dst + (A->pw + A->W) * G->Cp, 0, (size_t)(A->pw * G->Cp));
        const uint64_t *b = A->bits + (n * A->H + h) * A->W * Cw;
        const uint64_t *m = A->mask ? A->mask + (n * A->H + h) * A->W * Cw : NULL;
        int8_t *d = dst + A->pw * G->Cp;
        for (int64_t k = 0; k < A->W * Cw; k++) {
            __m512i v = _mm512_mask_blend_epi8((__mmask64)b[k], one, neg);
            if (m) v = _mm512_maskz_mov_epi8((__mmask64)m[k], v);
            _mm512_storeu_si512((void *)(d + k * 64), v);
        }
    }
    memset(x + rows * rowb, 0, (size_t)slack);
}

/* The output pixels (index within the image, -1 where dropped) of the 16 virtual pixels of tile t. */
BC_INLINE void amx_pixels(const bc_conv *restrict A, const amx_geom *G, int64_t t, int64_t *pix) {
    const int64_t v0 = t * 16;
    int64_t oh = v0 / G->VW, ow = v0 - oh * G->VW;
    for (int r = 0; r < 16; r++) {
        pix[r] = oh < A->OH && ow < A->OW ? oh * A->OW + ow : -1;
        if (++ow == G->VW) ow = 0, oh++;
    }
}

/* One work item: pixel tiles t0, t0 + 1 of image n (t1 = t0 when there is no second), blocks b0, b0 + 1. */
BC_INLINE BC_AMX_TARGET int64_t amx_item(const int F, const bc_conv *restrict A, const amx_geom *G, int64_t n,
                                      int64_t t0, int64_t t1, int64_t b0, int32_t *buf) {
    const int64_t sx = A->sw * G->Cp, Cw = A->Cw, T = A->T;
    const int8_t *xa[2];
    for (int a = 0; a < 2; a++) {
        const int64_t v0 = (a ? t1 : t0) * 16, oh = v0 / G->VW, ow = v0 - oh * G->VW;
        xa[a] = G->x + ((n * G->Hp + oh * A->sh) * G->Wp + ow * A->sw) * G->Cp;
    }
    const int8_t *wb = G->w + b0 * T * Cw * 1024;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t t = 0; t < T; t++) {
        const int64_t toff = ((t / A->KW) * G->Wp + (t % A->KW)) * G->Cp;
        for (int64_t q = 0; q < Cw; q++) {
            _tile_loadd(4, xa[0] + toff + q * 64, sx);
            _tile_loadd(6, wb + (t * Cw + q) * 1024, 64);
            _tile_dpbssd(0, 4, 6);
            _tile_loadd(7, wb + ((T + t) * Cw + q) * 1024, 64);
            _tile_dpbssd(1, 4, 7);
            _tile_loadd(5, xa[1] + toff + q * 64, sx);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
        }
    }
    _tile_stored(0, buf, 64);
    _tile_stored(1, buf + 256, 64);
    _tile_stored(2, buf + 512, 64);
    _tile_stored(3, buf + 768, 64);
    int64_t zeros = 0;
    const v16 s = _mm512_set1_ps(A->scale);
    const epi_consts k0 = epi_load(F, A, b0 * BC_OB), k1 = epi_load(F, A, (b0 + 1) * BC_OB);
    const int64_t img = n * A->OH * A->OW;
    int64_t pix[16];
    for (int a = 0; a < 2 && (a == 0 || t1 != t0); a++) {
        amx_pixels(A, G, a ? t1 : t0, pix);
        for (int r = 0; r < 16; r++) {
            if (pix[r] < 0) continue;
            const int32_t *row = buf + 2 * a * 256 + r * 16;
            const __m512i d0 = _mm512_loadu_si512((const void *)row), d1 = _mm512_loadu_si512((const void *)(row + 256));
            zeros += epi_vec(F, A, _mm512_mul_ps(_mm512_cvtepi32_ps(d0), s), k0, img + pix[r], b0);
            zeros += epi_vec(F, A, _mm512_mul_ps(_mm512_cvtepi32_ps(d1), s), k1, img + pix[r], b0 + 1);
        }
    }
    return zeros;
}

BC_AMX_TARGET static int64_t amx_item_any(const bc_conv *restrict A, const amx_geom *G, int64_t n, int64_t t0,
                                          int64_t t1, int64_t b0, int32_t *buf) {
    BC_BY_OPTIONS(amx_item, A, G, n, t0, t1, b0, buf)
}

/* The conv of A on the tiles (A->mode taps, Cout a multiple of 64, A->wdata's buffer with the int8 copy at
   word offset amx_off).  Returns the zero count as bitconv_conv2d does, or -4 when out of memory. */
BC_AMX_TARGET static int64_t amx_conv(const bc_conv *restrict A, const uint64_t *wpacked, int64_t amx_off,
                                      int nthreads) {
    amx_geom G;
    amx_geometry(A, &G);
    G.w = (const int8_t *)(wpacked + amx_off);
    /* slack: the last tile's rows run past the image by less than two padded rows plus 16 strides */
    const int64_t slack = (2 * G.Wp + 16 * A->sw + 16) * G.Cp * (A->sh + 1);
    const int64_t bytes = A->N * G.Hp * G.Wp * G.Cp + slack;
    int8_t *x = (int8_t *)malloc((size_t)bytes);
    if (!x) return -4;
    amx_unpack(A, &G, x, slack, nthreads);
    G.x = x;
    const int64_t bpairs = A->nblk / 2, nitems = A->N * G.pairs_img * bpairs;
    int64_t zeros = 0;
    int fail = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && nitems > 1) reduction(+ : zeros)
    {
        amx_config cfg;
        memset(&cfg, 0, sizeof(cfg));
        cfg.palette = 1;
        for (int i = 0; i < 8; i++) cfg.rows[i] = 16, cfg.colsb[i] = 64;
        int32_t *buf = (int32_t *)malloc(4 * 256 * sizeof(int32_t));
        if (!buf) {
#pragma omp atomic write
            fail = 1;
        } else {
            _tile_loadconfig(&cfg);
#pragma omp for schedule(static)
            for (int64_t it = 0; it < nitems; it++) {
                const int64_t pair = it / bpairs, b0 = (it % bpairs) * 2;
                const int64_t n = pair / G.pairs_img, t0 = (pair % G.pairs_img) * 2;
                const int64_t t1 = t0 + 1 < G.tiles_img ? t0 + 1 : t0;
                zeros += amx_item_any(A, &G, n, t0, t1, b0, buf);
            }
            _tile_release();
            free(buf);
        }
    }
    free(x);
    if (fail) return -4;
    return A->obits ? zeros : 0;
}

#endif

/* 1 when this build's AMX path can run here (the CPU has the tiles and Linux grants them), else 0. */
BC_API int bitconv_amx(void) {
#if defined(BC_HAVE_AMX)
    return amx_usable();
#else
    return 0;
#endif
}
