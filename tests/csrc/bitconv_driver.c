/* Self-contained exactness test of bitconv.c against a naive C reference (no Python), so the NEON path can be
   checked under qemu-aarch64:
     aarch64-linux-gnu-gcc -O2 -fopenmp -static tools/test_driver.c bitconv.c -o td -lm && qemu-aarch64 ./td
   Prints "path <name>" and "ALL OK" (exit 0) or the first mismatches (exit 1). */
#include <math.h>
#include <stdint.h>
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *bitconv_path(void);
int64_t bitconv_weight_words(int64_t Cout, int64_t Cin, int KH, int KW, int mode);
int64_t bitconv_pack_weights(const float *w, int64_t Cout, int64_t Cin, int KH, int KW, int mode, uint64_t *out,
                             int nthreads);
int64_t bitconv_pack_signs_nhwc(const float *x, int64_t npix, int64_t C, uint64_t *bits, uint64_t *mask, int nt);
int64_t bitconv_pack_signs_nchw(const float *x, int64_t N, int64_t C, int64_t HW, uint64_t *bits, uint64_t *mask,
                                int nt);
int64_t bitconv_conv2d(const uint64_t *bits, const uint64_t *mask, int64_t N, int64_t H, int64_t W, int64_t C,
                       const uint64_t *wpacked, int64_t Cout, int KH, int KW, int sh, int sw, int ph, int pw,
                       float scale, const float *bias, int relu, const float *alpha, const float *beta,
                       const float *residual, float *out, uint64_t *out_bits, uint64_t *out_mask, int nthreads);

static uint64_t rng = 88172645463325252ULL;
static uint32_t rnd(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 32);
}
static float frnd(void) { return ((float)rnd() / 4294967296.0f) * 2.0f - 1.0f; }
static int sgn(float v) { return v > 0 ? 1 : (v < 0 ? -1 : 0); }

static int failures = 0;

static void run_case(int N, int H, int W, int C, int Co, int K, int s, int p, int zeros, int mode, int flags,
                     int nt) {
    const int OH = (H + 2 * p - K) / s + 1, OW = (W + 2 * p - K) / s + 1;
    const int Cw = (C + 63) / 64, Cwo = (Co + 63) / 64;
    const int bias_on = flags & 1, relu = (flags >> 1) & 1, aff = (flags >> 2) & 1, res_on = (flags >> 3) & 1;
    float *x = malloc(sizeof(float) * N * H * W * C);          /* NHWC */
    float *xc = malloc(sizeof(float) * N * H * W * C);         /* NCHW copy */
    float *w = malloc(sizeof(float) * Co * C * K * K);
    float *bias = malloc(sizeof(float) * Co), *al = malloc(sizeof(float) * Co), *be = malloc(sizeof(float) * Co);
    float *res = malloc(sizeof(float) * N * OH * OW * Co), *y = malloc(sizeof(float) * N * OH * OW * Co);
    float *ref = malloc(sizeof(float) * N * OH * OW * Co);
    uint64_t *bits = malloc(8 * N * H * W * Cw), *mask = malloc(8 * N * H * W * Cw);
    uint64_t *bits2 = malloc(8 * N * H * W * Cw), *mask2 = malloc(8 * N * H * W * Cw);
    uint64_t *ob = malloc(8 * N * OH * OW * Cwo), *om = malloc(8 * N * OH * OW * Cwo);
    int64_t nww = bitconv_weight_words(Co, C, K, K, mode);
    uint64_t *wp = malloc(8 * nww);
    int64_t nzero = 0;
    for (int i = 0; i < N * H * W * C; i++) {
        x[i] = frnd();
        if (zeros && rnd() % 5 == 0) x[i] = 0.0f;
        nzero += x[i] == 0.0f;
    }
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++)
            for (int q = 0; q < H * W; q++) xc[(n * C + c) * H * W + q] = x[(n * H * W + q) * C + c];
    double sabs = 0;
    for (int i = 0; i < Co * C * K * K; i++) {
        w[i] = frnd();
        if (w[i] == 0.0f) w[i] = 0.25f;
        sabs += fabs(w[i]);
    }
    const float scale = (float)(sabs / (Co * C * K * K));
    for (int i = 0; i < Co; i++) {
        bias[i] = frnd() * scale * 3;
        al[i] = frnd() * 2;
        be[i] = frnd();
    }
    for (int i = 0; i < N * OH * OW * Co; i++) res[i] = frnd();
    if (bitconv_pack_weights(w, Co, C, K, K, mode, wp, 1) != 0) { printf("weight zeros?\n"); failures++; }
    int64_t z1 = bitconv_pack_signs_nhwc(x, (int64_t)N * H * W, C, bits, mask, nt);
    int64_t z2 = bitconv_pack_signs_nchw(xc, N, C, H * W, bits2, mask2, nt);
    if (z1 != nzero || z2 != nzero || memcmp(bits, bits2, 8 * N * H * W * Cw) ||
        memcmp(mask, mask2, 8 * N * H * W * Cw)) {
        printf("pack mismatch C=%d zeros=%d (%lld %lld %lld)\n", C, zeros, (long long)z1, (long long)z2,
               (long long)nzero);
        failures++;
    }
    int64_t zr = bitconv_conv2d(bits, nzero ? mask : NULL, N, H, W, C, wp, Co, K, K, s, s, p, p, scale,
                                bias_on ? bias : NULL, relu, aff ? al : NULL, aff ? be : NULL, res_on ? res : NULL,
                                y, ob, om, nt);
    /* reference */
    int64_t zref = 0;
    for (int n = 0; n < N; n++)
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++)
                for (int o = 0; o < Co; o++) {
                    int dot = 0;
                    for (int kh = 0; kh < K; kh++)
                        for (int kw = 0; kw < K; kw++) {
                            int ih = oh * s - p + kh, iw = ow * s - p + kw;
                            if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                            for (int c = 0; c < C; c++)
                                dot += sgn(x[((n * H + ih) * W + iw) * C + c]) * sgn(w[((o * C + c) * K + kh) * K + kw]);
                        }
                    float v = (float)dot * scale;
                    if (bias_on) v += bias[o];
                    if (relu) v = v > 0.0f ? v : 0.0f;
                    if (aff) v = fmaf(v, al[o], be[o]);
                    int64_t idx = (((int64_t)n * OH + oh) * OW + ow) * Co + o;
                    if (res_on) v += res[idx];
                    ref[idx] = v;
                    zref += v == 0.0f;
                }
    int bad = 0;
    for (int64_t i = 0; i < (int64_t)N * OH * OW * Co; i++) {
        int64_t pix = i / Co, o = i % Co;
        uint64_t bw = ob[pix * Cwo + o / 64], mw = om[pix * Cwo + o / 64];
        int bit = (int)((bw >> (o % 64)) & 1), nzb = (int)((mw >> (o % 64)) & 1);
        if (memcmp(&y[i], &ref[i], 4) || bit != (ref[i] < 0) || nzb != (ref[i] != 0.0f)) {
            if (bad < 3)
                printf("  mismatch i=%lld got %.9g ref %.9g bit %d nz %d\n", (long long)i, y[i], ref[i], bit, nzb);
            bad++;
        }
    }
    for (int64_t pix = 0; pix < (int64_t)N * OH * OW; pix++)
        if (Co % 64 && ((ob[pix * Cwo + Cwo - 1] >> (Co % 64)) || (om[pix * Cwo + Cwo - 1] >> (Co % 64)))) {
            if (bad < 3) printf("  padding bits set at pixel %lld\n", (long long)pix);
            bad++;
        }
    if (zr != zref) {
        printf("  zero count %lld vs %lld\n", (long long)zr, (long long)zref);
        bad++;
    }
    if (bad) {
        printf("FAIL N=%d H=%d W=%d C=%d Co=%d K=%d s=%d p=%d zeros=%d mode=%d flags=%d nt=%d: %d bad\n", N, H, W, C,
               Co, K, s, p, zeros, mode, flags, nt, bad);
        failures++;
    }
    free(x); free(xc); free(w); free(bias); free(al); free(be); free(res); free(y); free(ref);
    free(bits); free(mask); free(bits2); free(mask2); free(ob); free(om); free(wp);
}

int main(void) {
    printf("path %s\n", bitconv_path());
    static const int Ks[] = {1, 3, 5}, Ss[] = {1, 2}, Ps[] = {0, 1, 2}, Cs[] = {3, 16, 64, 65, 130},
                     Cos[] = {16, 20, 70};
    int ncase = 0;
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 2; b++)
            for (int c = 0; c < 3; c++)
                for (int d = 0; d < 5; d++)
                    for (int e = 0; e < 3; e++)
                        for (int zeros = 0; zeros < 2; zeros++)
                            for (int mode = 0; mode < (Cs[d] < 64 ? 2 : 1); mode++) {
                                int flags = (int)(rnd() % 16), nt = 1 + (int)(rnd() % 2);
                                int N = 1 + (int)(rnd() % 2);
                                run_case(N, 7, 6, Cs[d], Cos[e], Ks[a], Ss[b], Ps[c], zeros, mode, flags, nt);
                                ncase++;
                            }
    /* a few larger layers with every epilogue option on */
    run_case(1, 14, 14, 128, 256, 3, 2, 1, 0, 0, 15, 2);
    run_case(2, 9, 9, 256, 64, 3, 1, 1, 1, 0, 15, 2);
    run_case(1, 16, 16, 32, 32, 3, 1, 1, 0, 1, 15, 2);
    ncase += 3;
    printf("%d cases, %d failures\n", ncase, failures);
    if (failures) return 1;
    printf("ALL OK\n");
    return 0;
}
