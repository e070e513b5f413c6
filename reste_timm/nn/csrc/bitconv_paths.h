/* bitconv_paths.h -- the SIMD path chosen at compile time, tile sizes, the weight header, small helpers.
 * Part of bitconv.c, which includes it once (a single translation unit, so the compiler sees every
 * function when it inlines the micro-kernels and specializes the epilogue); not a standalone header. */

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
#define BC_P 6 /* 6 x 2 blocks: 24 accumulators, 4 weight registers, a broadcast (docs/performance.md) */
#endif
#ifndef BC_NB
#define BC_NB 2
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
/* H_MODE: the mode in bits 0-7; the kind of the buffer's path copy (BC_COPY_*) in bits 8-15 and its word
   offset in bits 32-63, 0 where there is none.  A build uses a copy of its own kind and ignores any other, so
   a packed weight runs on every build. */
enum { H_MAGIC, H_COUT, H_CIN, H_KHKW, H_MODE, H_KW_WORDS, H_NBLK, H_POP_OFF };
#define BC_HDR 8
/* bitconv_weight_words / bitconv_pack_weights: mode | BC_WITH_COPY appends this build's copy of the weights
   for its inference path, where it has one and the path takes the layer: the AMX path's int8 tiles
   (bitconv_amx.h: taps mode, Cout a multiple of 64, this CPU and OS allow it) or the AVX2 path's nibble
   planes (taps mode: bitconv_microkernels.h).  Deployed layers pack with it, the training forward without. */
#define BC_WITH_COPY 16
enum { BC_COPY_AMX = 0, BC_COPY_NIBBLES = 1 };

/* The AMX path (bitconv_amx.h): x86-64 Linux, the AVX-512 path, a compiler that knows the tile intrinsics. */
#if defined(BC_PATH_AVX512) && defined(__x86_64__) && defined(__linux__) && !defined(BITCONV_NO_AMX) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define BC_HAVE_AMX 1
static int64_t amx_weight_words(int64_t Cout, int64_t Cin, int64_t T, int mode);
static void amx_pack_weights(const uint64_t *data, int64_t nblk, int64_t T, int64_t K, int64_t Cin, int8_t *out,
                             int nthreads);
#endif

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
