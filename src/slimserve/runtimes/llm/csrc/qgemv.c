/* Few-row matmuls from 4- and 8-bit weights with int8 activations (AVX-512 VNNI), split over
 * the cores by a small spinning thread pool (no OpenMP barrier per call).
 *
 * Built and loaded by slimserve/runtimes/llm/qgemv.py (compiled on first use, ctypes), which
 * also packs the weights. The arithmetic is llama.cpp's Q4_1 x Q8_0 / Q8_0 x Q8_0 product:
 *
 * - weights: unsigned levels per group of 32 input channels, w = level * scale + offset, scale
 *   and offset fp16 per group; 4-bit levels (two a byte) or 8-bit levels (a Q8_0 weight q in
 *   -127..127 is level q + 128 with offset -128 * scale);
 * - activations: each row quantized per group of 32 to int8, x = q * d (d = max|x| / 127);
 * - y[m, n] = sum over groups g of scale[n, g] * d[m, g] * dot(level, q) + offset[n, g] * d[m, g]
 *   * sum(q).
 *
 * Layout (as oneDNN's blocked formats and llama.cpp's repacked Q4_0x8): 16 output channels are
 * interleaved, one a 32-bit lane, each lane holding 4 consecutive input channels, so that one
 * `vpdpbusd` multiplies 16 outputs x 4 inputs with ONE activation broadcast (4 int8 of a row),
 * and the 16 sums land in the lanes of the outputs: no horizontal sum, and the weights are
 * unpacked once for every activation row. For each block of 16 outputs and each group of 32
 * inputs one record, consecutive in memory (a single stream for the prefetcher):
 *
 * - 4-bit: 256 bytes, 4 vectors of 64: vector v, lane l, byte i holds in its low nibble the
 *   level of input 4 v + i of output l, in its high nibble that of input 16 + 4 v + i;
 *   8-bit: 512 bytes, 8 vectors: vector v, lane l, byte i: input 4 v + i of output l;
 * - then the 16 outputs' scales (fp16) and offsets (fp16), 32 bytes each.
 *
 * Per activation row and record (512 weights): 8 `vpdpbusd`, one conversion, one multiply, two
 * FMAs. A short last block (N not a multiple of 16) is padded with zero records and its
 * outputs stored under a mask.
 */
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 16 /* output channels interleaved */
#define GROUP 32
#define ROW_TILE 8 /* activation rows whose accumulators stay in registers */
#define MAX_THREADS 64
#define SPIN_NS 200000 /* a worker spins this long for the next job before it sleeps */
#define YIELD_NS 50000 /* the caller spins this long for a worker's units, then yields */

static inline int record_bytes(int bits) { return (bits == 4 ? 256 : 512) + 64; }

int qgemv_record_bytes(int bits) { return record_bytes(bits); }

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Rows of x (M, K) fp32 or bf16 -> qx (M, K) int8, d (M, K/32) fp32 the groups' steps,
 * dsum (M, K/32) fp32 = d * sum(q) of each group. */
void qgemv_quantize(const void *x, int is_bf16, int M, int K, int8_t *qx, float *d, float *dsum) {
    int groups = K / GROUP;
    for (int m = 0; m < M; m++) {
        for (int g = 0; g < groups; g++) {
            float v[GROUP];
            size_t base = (size_t)m * K + (size_t)g * GROUP;
            for (int i = 0; i < GROUP; i++)
                v[i] = is_bf16 ? bf16_to_float(((const uint16_t *)x)[base + i])
                               : ((const float *)x)[base + i];
            float amax = 0.0f;
            for (int i = 0; i < GROUP; i++) {
                float a = v[i] < 0 ? -v[i] : v[i];
                amax = a > amax ? a : amax;
            }
            float step = amax / 127.0f;
            float inv = step > 0 ? 1.0f / step : 0.0f;
            int sum = 0;
            for (int i = 0; i < GROUP; i++) {
                int r = (int)__builtin_roundf(v[i] * inv);
                qx[base + i] = (int8_t)r;
                sum += r;
            }
            d[(size_t)m * groups + g] = step;
            dsum[(size_t)m * groups + g] = step * (float)sum;
        }
    }
}

typedef struct Attn Attn; /* an attention job (below) */

typedef struct {
    const uint8_t *packed; /* (ceil(N / 16), K / 32) records, see the top */
    const int8_t *qx;      /* (M, K) */
    const float *d;        /* (M, K / 32) */
    const float *dsum;     /* (M, K / 32) */
    float *y;              /* (M, N) */
    int M, N, K, bits;
    const Attn *attn; /* instead of a matmul: attention, one unit a (row, K/V head) */
    int units;        /* what the pool shares */
    int unit;         /* blocks of 16 outputs a unit */
} Job;

static void attend_unit(const Attn *a, int unit);

static inline int32_t four(const int8_t *q) {
    int32_t v;
    memcpy(&v, q, sizeof v);
    return v;
}

/* Outputs 16 b .. 16 b + 15 for R (1..ROW_TILE) activation rows from m0, BITS 4 or 8: each
 * record's levels unpacked once into eight vectors, then eight `vpdpbusd` per row. */
static inline __attribute__((always_inline)) void block_rows(const Job *j, int b, int m0, int R,
                                                             int BITS) {
    const int K = j->K, groups = K / GROUP, rec = record_bytes(BITS);
    const uint8_t *p = j->packed + (size_t)b * groups * rec;
    __m512 acc[ROW_TILE];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int g = 0; g < groups; g++, p += rec) {
        __m512i w[8];
        if (BITS == 4) {
            for (int v = 0; v < 4; v++) {
                __m512i both = _mm512_loadu_si512((const void *)(p + 64 * v));
                w[v] = _mm512_and_si512(both, low);
                w[v + 4] = _mm512_and_si512(_mm512_srli_epi16(both, 4), low);
            }
        } else {
            for (int v = 0; v < 8; v++) w[v] = _mm512_loadu_si512((const void *)(p + 64 * v));
        }
        const uint8_t *tail = p + (BITS == 4 ? 256 : 512);
        __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)tail));
        __m512 offset = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(tail + 32)));
        for (int r = 0; r < R; r++) {
            const size_t m = (size_t)(m0 + r);
            const int8_t *q = j->qx + m * K + (size_t)g * GROUP;
            __m512i dot;
            if (R <= 2) { /* two chains: few rows leave the core little else to overlap */
                __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0],
                                                _mm512_set1_epi32(four(q)));
                __m512i c = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[4],
                                                _mm512_set1_epi32(four(q + 16)));
                for (int v = 1; v < 4; v++) {
                    a = _mm512_dpbusd_epi32(a, w[v], _mm512_set1_epi32(four(q + 4 * v)));
                    c = _mm512_dpbusd_epi32(c, w[v + 4], _mm512_set1_epi32(four(q + 16 + 4 * v)));
                }
                dot = _mm512_add_epi32(a, c);
            } else {
                dot = _mm512_setzero_si512();
                for (int v = 0; v < 8; v++)
                    dot = _mm512_dpbusd_epi32(dot, w[v], _mm512_set1_epi32(four(q + 4 * v)));
            }
            const size_t at = m * groups + g;
            __m512 step = _mm512_mul_ps(scale, _mm512_set1_ps(j->d[at]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), step, acc[r]);
            acc[r] = _mm512_fmadd_ps(offset, _mm512_set1_ps(j->dsum[at]), acc[r]);
        }
    }
    const int left = j->N - b * BLOCK;
    const __mmask16 mask = left >= BLOCK ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    for (int r = 0; r < R; r++)
        _mm512_mask_storeu_ps(j->y + (size_t)(m0 + r) * j->N + (size_t)b * BLOCK, mask, acc[r]);
}

#define ROWS_CASE(R, BITS)                                                                    \
    case R: block_rows(j, b, m0, R, BITS); break;

#define TILE(BITS)                                                                            \
    static void tile_##BITS(const Job *j, int b, int m0, int R) {                             \
        switch (R) {                                                                          \
            ROWS_CASE(1, BITS) ROWS_CASE(2, BITS) ROWS_CASE(3, BITS) ROWS_CASE(4, BITS)       \
            ROWS_CASE(5, BITS) ROWS_CASE(6, BITS) ROWS_CASE(7, BITS) ROWS_CASE(8, BITS)       \
            default: break;                                                                   \
        }                                                                                     \
    }
TILE(4)
TILE(8)

/* Blocks b0..b1-1 of outputs for every activation row, ROW_TILE rows at a time (a block's
 * records, 5-9 KiB at SmolLM2's widths, are read again from L1/L2 for a second tile). */
static void run_blocks(const Job *j, int b0, int b1) {
    for (int b = b0; b < b1; b++) {
        for (int m0 = 0; m0 < j->M; m0 += ROW_TILE) {
            int R = j->M - m0 < ROW_TILE ? j->M - m0 : ROW_TILE;
            if (j->bits == 4)
                tile_4(j, b, m0, R);
            else
                tile_8(j, b, m0, R);
        }
    }
}

/* The pool shares a job's outputs in units of UNIT blocks of 16, each claimed by whichever thread
 * comes first: the caller never waits for a worker that has not started (a busy machine
 * may not schedule it for milliseconds), only for units a worker already holds. Workers
 * spin for SPIN_NS between jobs (a decode step's next matmul comes within microseconds),
 * then sleep on a condition variable. `cursor` is the job's generation (high 32 bits) and
 * its next unclaimed unit: a late worker cannot claim a unit of a newer job. */
#define UNIT 2
/* A one-row product is memory-bound: in 2-block units the two threads' reads interleave
 * finely and two cores streamed no faster than one (SmolLM2's matmuls, 6.1 against 5.6 ms
 * a step); in 8 units a job, each core streams long runs (4.5-4.9 ms, a busy machine). */
#define BIG_UNITS 8
#define ROWS_FOR_BIG_UNITS 1

static Job job;
static _Atomic uint64_t cursor;
static atomic_uint generation;
static atomic_int finished; /* units of the current job done */
static int created = 1, sleepers = 0;
static pid_t owner = 0;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static int claim(uint32_t gen, int units) {
    uint64_t v = atomic_load_explicit(&cursor, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(v >> 32) != gen || (int)(uint32_t)v >= units) return -1;
        if (atomic_compare_exchange_weak(&cursor, &v, v + 1)) return (int)(uint32_t)v;
    }
}

static void work(const Job *j, uint32_t gen) {
    int blocks = (j->N + BLOCK - 1) / BLOCK;
    for (int u; (u = claim(gen, j->units)) >= 0;) {
        if (j->attn) {
            attend_unit(j->attn, u);
        } else {
            int b1 = (u + 1) * j->unit < blocks ? (u + 1) * j->unit : blocks;
            run_blocks(j, u * j->unit, b1);
        }
        atomic_fetch_add_explicit(&finished, 1, memory_order_release);
    }
}

static void *worker(void *arg) {
    uint32_t seen = (uint32_t)(uintptr_t)arg; /* the generation when we were created */
    for (;;) {
        long start = now_ns();
        int spins = 0;
        while (atomic_load_explicit(&generation, memory_order_acquire) == seen) {
            _mm_pause();
            if (++spins % 256 == 0 && now_ns() - start > SPIN_NS) {
                pthread_mutex_lock(&lock);
                sleepers++;
                while (atomic_load(&generation) == seen) pthread_cond_wait(&wake, &lock);
                sleepers--;
                pthread_mutex_unlock(&lock);
            }
        }
        seen = atomic_load_explicit(&generation, memory_order_acquire);
        /* A copy torn by a newer job is never used: that job's cursor refuses our claims. */
        Job mine = job;
        work(&mine, seen);
    }
    return NULL;
}

static void grow(int threads) {
    if (owner != getpid()) { /* a forked child has none of its parent's workers */
        created = 1;
        owner = getpid();
    }
    while (created < threads) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        uintptr_t born = atomic_load(&generation);
        int failed = pthread_create(&t, &attr, worker, (void *)born);
        pthread_attr_destroy(&attr);
        if (failed) break;
        created++;
    }
}

/* All of j's units on the caller's thread. */
static void run_here(const Job *j) {
    for (int u = 0; u < j->units; u++) {
        if (j->attn) {
            attend_unit(j->attn, u);
        } else {
            int blocks = (j->N + BLOCK - 1) / BLOCK;
            int b1 = (u + 1) * j->unit < blocks ? (u + 1) * j->unit : blocks;
            run_blocks(j, u * j->unit, b1);
        }
    }
}

/* One job in the pool at a time: two engines of one server (two models) may call at once. */
static pthread_mutex_t pool_owner = PTHREAD_MUTEX_INITIALIZER;

/* Run j's units on `threads` threads (the caller's one of them), or all on the caller's when
 * there are fewer than `least` units, no worker, or another caller's job in the pool (it
 * does not wait for the pool: the other job has the cores). */
static void dispatch(const Job *j, int threads, int least) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 2 || j->units < least || pthread_mutex_trylock(&pool_owner) != 0) {
        run_here(j);
        return;
    }
    grow(threads);
    if (created < 2) {
        pthread_mutex_unlock(&pool_owner);
        run_here(j);
        return;
    }
    job = *j;
    atomic_store_explicit(&finished, 0, memory_order_relaxed);
    uint32_t gen = atomic_load(&generation) + 1;
    atomic_store_explicit(&cursor, (uint64_t)gen << 32, memory_order_release);
    atomic_store_explicit(&generation, gen, memory_order_release);
    pthread_mutex_lock(&lock);
    if (sleepers) pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);
    work(j, gen);
    /* Wait for the units workers hold; past YIELD_NS give the core away: on a busy machine
     * the worker we wait for may be waiting for this very core. */
    long start = 0;
    for (int spins = 1; atomic_load_explicit(&finished, memory_order_acquire) < j->units; spins++) {
        _mm_pause();
        if (spins % 64 == 0) {
            if (!start)
                start = now_ns();
            else if (now_ns() - start > YIELD_NS)
                sched_yield();
        }
    }
    pthread_mutex_unlock(&pool_owner);
}

/* y (M, N) fp32 = x (M, K) @ W.T for W packed as `bits`-bit records (see the top).
 * `threads`: how many threads may share the outputs (the caller's is one of them). */
void qgemv(const uint8_t *packed, int bits, const int8_t *qx, const float *d, const float *dsum,
           int M, int N, int K, float *y, int threads) {
    int blocks = (N + BLOCK - 1) / BLOCK;
    int unit = M <= ROWS_FOR_BIG_UNITS ? (blocks + BIG_UNITS - 1) / BIG_UNITS : UNIT;
    if (unit < UNIT) unit = UNIT;
    Job j = {packed, qx, d, dsum, y, M, N, K, bits, NULL, (blocks + unit - 1) / unit, unit};
    dispatch(&j, threads, 4);
}

/* Sixteen K/V values (fp32 or bf16) as fp32. */
static inline __m512 load16(const void *base, size_t index, int is_bf16) {
    if (!is_bf16) return _mm512_loadu_ps((const float *)base + index);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + index));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The new token's K and V (Hkv, hd each, the pool's dtype) at `slot` of every head. */
static void write_kv(void *cache, const void *k, const void *v, size_t item, size_t plane,
                     size_t per_head, size_t slot, int kv_heads, int hd) {
    for (int g = 0; g < kv_heads; g++) {
        size_t at = ((size_t)g * per_head + slot) * hd * item;
        memcpy((char *)cache + at, (const char *)k + (size_t)g * hd * item, hd * item);
        memcpy((char *)cache + (plane + at / item) * item, (const char *)v + (size_t)g * hd * item,
               hd * item);
    }
}

/* Key positions walked in order, within a head: through a block table (position p at slot
 * table[p / bs] * bs + p % bs) or from `first` on (table NULL). One division where the walk
 * starts, none a key. */
typedef struct {
    const int64_t *table;
    int bs, block, offset;
    size_t first;
} Walk;

static inline Walk walk_from(const int64_t *table, int bs, size_t first, int p) {
    Walk w = {table, bs, 0, p, first};
    if (table) {
        w.block = p / bs;
        w.offset = p % bs;
    }
    return w;
}

/* The slot of the walk's key, then on to the next key. */
static inline size_t next_slot(Walk *w) {
    if (!w->table) return w->first + (size_t)w->offset++;
    size_t slot = (size_t)w->table[w->block] * w->bs + (size_t)w->offset;
    if (++w->offset == w->bs) {
        w->offset = 0;
        w->block++;
    }
    return slot;
}

/* e^x in 16 lanes (a softmax's exponents, x <= 0; silu's in layer.c): x = n ln2 + r with
 * |r| <= ln2 / 2, e^r by Cephes' expf polynomial, times 2^n by vscalefps (which rounds into
 * subnormals as expf does); exactly 0 below ln(2^-150) and inf above 89, where expf rounds
 * to 0 and overflows. NaN stays NaN. Within 1 ulp of the correctly rounded e^x
 * (tests/runtimes/llm/test_qgemv.py). */
static inline __m512 exp16(__m512 x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-103.972084f), _CMP_NLT_UQ);
    /* vmaxps and vminps return their 2nd operand where one is NaN: x, kept */
    x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x); /* ln2 in two parts */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r,
                               _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(live, p, n);
}

/* y = e^x for n floats (exp16, exposed for its test). */
void qgemv_exp(const float *x, float *y, int n) {
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(y + i, m, exp16(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

/* Lane sums of 16 vectors in four pairing steps, instead of one horizontal sum each: */
static inline __m512 pair_halves(__m512 a, __m512 b) { /* 256-bit halves: a's, b's */
    return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
}
static inline __m512 pair_quarters(__m512 u, __m512 v) { /* 128-bit quarters: a b c d */
    return _mm512_add_ps(_mm512_shuffle_f32x4(u, v, 0x88), _mm512_shuffle_f32x4(u, v, 0xDD));
}
static inline __m512 pair_twos(__m512 u, __m512 v) { /* in each quarter: 2 of u, 2 of v */
    return _mm512_add_ps(_mm512_shuffle_ps(u, v, 0x44), _mm512_shuffle_ps(u, v, 0xEE));
}
static inline __m512 pair_ones(__m512 u, __m512 v) { /* in each quarter: 1 of each of 4 */
    return _mm512_add_ps(_mm512_shuffle_ps(u, v, 0x88), _mm512_shuffle_ps(u, v, 0xDD));
}

/* Query head q (hd = 16 VECS) times one K row, in 16 lanes still to be summed. */
static inline __attribute__((always_inline)) __m512 dot_lanes(const float *q, const float *row,
                                                              int VECS) {
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(row));
    for (int i = 1; i < VECS; i++)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * i), _mm512_loadu_ps(row + 16 * i), acc);
    return acc;
}

/* The scores of query head q against 16 K rows, lane k row k's. The pairing steps leave
 * in lane 4c + i the sum of the (4i + c)-th vector, so row 4c + i goes in that place. */
static inline __attribute__((always_inline)) __m512 dots16(const float *q,
                                                           const float *const *rows, int VECS) {
    __m512 quarters[4];
    for (int t = 0; t < 4; t++)
        quarters[t] = pair_quarters(
            pair_halves(dot_lanes(q, rows[t], VECS), dot_lanes(q, rows[4 + t], VECS)),
            pair_halves(dot_lanes(q, rows[8 + t], VECS), dot_lanes(q, rows[12 + t], VECS)));
    return pair_ones(pair_twos(quarters[0], quarters[1]), pair_twos(quarters[2], quarters[3]));
}

/* The scores of G query heads (G VECS <= 16, hd = 16 VECS) against 16 keys (K rows at `at`, fp32
 * or bf16) as dots16, each K row loaded (and widened) once into registers for the G heads. */
static inline __attribute__((always_inline)) void dots16_heads(const float *q, const void *cache,
                                                               int is_bf16, const size_t *at,
                                                               int G, int VECS, int hd,
                                                               __m512 *res) {
    __m512 qv[4][8], twos[2][4];
    for (int j = 0; j < G; j++)
        for (int i = 0; i < VECS; i++) qv[j][i] = _mm512_loadu_ps(q + (size_t)j * hd + 16 * i);
    for (int half = 0; half < 2; half++) {
        __m512 quarters[2][4];
        for (int tt = 0; tt < 2; tt++) {
            const int t = 2 * half + tt;
            __m512 halves[2][4];
            for (int u = 0; u < 2; u++) {
                __m512 d[2][4];
                for (int e = 0; e < 2; e++) { /* place 4t + 2u + e: row 4 (2u + e) + t */
                    __m512 kv[8];
                    for (int i = 0; i < VECS; i++)
                        kv[i] = load16(cache, at[8 * u + 4 * e + t] + 16 * i, is_bf16);
                    for (int j = 0; j < G; j++) {
                        d[e][j] = _mm512_mul_ps(qv[j][0], kv[0]);
                        for (int i = 1; i < VECS; i++)
                            d[e][j] = _mm512_fmadd_ps(qv[j][i], kv[i], d[e][j]);
                    }
                }
                for (int j = 0; j < G; j++) halves[u][j] = pair_halves(d[0][j], d[1][j]);
            }
            for (int j = 0; j < G; j++)
                quarters[tt][j] = pair_quarters(halves[0][j], halves[1][j]);
        }
        for (int j = 0; j < G; j++) twos[half][j] = pair_twos(quarters[0][j], quarters[1][j]);
    }
    for (int j = 0; j < G; j++) res[j] = pair_ones(twos[0][j], twos[1][j]);
}

/* Asks for the rows of walk w's next `count` keys in L2 (hd items of `item` bytes a row):
 * K a block of 16 keys ahead of the scores and V while the scores pass, so that DRAM's
 * latency (a row's blocks lie anywhere in the pool) overlaps the arithmetic. Into L2, not
 * L1: L1's few miss buffers would hold up the loads of the keys being scored. */
static inline void prefetch_rows(const void *cache, size_t base, Walk *w, int count, int hd,
                                 int item) {
    while (count > 0) { /* runs of consecutive slots: the rest of a block at most */
        const int run = !w->table || w->bs - w->offset > count ? count : w->bs - w->offset;
        const char *at = (const char *)cache + (base + next_slot(w) * hd) * item;
        const size_t bytes = (size_t)run * hd * item;
        for (size_t o = 0; o < bytes; o += 64) _mm_prefetch(at + o, _MM_HINT_T1);
        w->offset += run - 1; /* within the block: next_slot wraps only when run is 1 */
        if (w->table && w->offset == w->bs) {
            w->offset = 0;
            w->block++;
        }
        count -= run;
    }
}

/* The next `count` (1..16) keys' K rows as fp32: pointers into the pool (fp32), or into
 * `tile` (16, hd) once widened (bf16); rows past `count` repeat the last (scores dropped). */
static inline void key_rows(const void *cache, int is_bf16, size_t base, Walk *w, int count,
                            int hd, float *tile, const float **rows) {
    for (int s = 0; s < count; s++) {
        const size_t at = base + next_slot(w) * hd;
        if (!is_bf16) {
            rows[s] = (const float *)cache + at;
            continue;
        }
        for (int i = 0; i < hd; i += 16)
            _mm512_storeu_ps(tile + (size_t)s * hd + i, load16(cache, at + i, 1));
        rows[s] = tile + (size_t)s * hd;
    }
    for (int s = count; s < 16; s++) rows[s] = rows[count - 1];
}

/* Scores s (n of them, a multiple of 16) into e^(s - max s); returns 1 / their sum. */
static inline float softmax_exp(float *s, int n) {
    __m512 top = _mm512_set1_ps(-__builtin_inff());
    for (int p = 0; p < n; p += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(s + p));
    const __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int p = 0; p < n; p += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + p), most));
        _mm512_storeu_ps(s + p, e);
        total = _mm512_add_ps(total, e);
    }
    return 1.0f / _mm512_reduce_add_ps(total);
}

/* The query heads of one K/V head (G <= 4 of them, hd = 16 VECS) over `keys` keys: scores
 * 16 keys at a time, each K row read from memory (and widened) once for the G heads
 * (SmolLM2: 3), the next 16 K rows and these 16 V rows prefetched meanwhile; softmax by
 * exp16; weighted V rows summed, times 1 / total once. `scores`: G * (keys rounded up to
 * 16) floats; `tile`: 16 * hd. V in chunks of VC vectors, so that the accumulators stay in
 * registers. */
static inline __attribute__((always_inline)) void attend_group(
    const float *q, const void *cache, int is_bf16, size_t k_base, size_t v_base,
    const int64_t *table, int bs, size_t first, int keys, float scale, float *scores,
    float *tile, float *out, int G, int VECS, int hd) {
    const int stride = (keys + 15) & ~15, VC = G * VECS <= 16 && VECS <= 8 ? VECS : 4;
    const int item = is_bf16 ? 2 : 4;
    Walk w = walk_from(table, bs, first, 0), k_ahead = w, v_ahead = w;
    prefetch_rows(cache, k_base, &k_ahead, keys < 16 ? keys : 16, hd, item);
    for (int p0 = 0; p0 < keys; p0 += 16) {
        const int count = keys - p0 < 16 ? keys - p0 : 16, next = keys - p0 - count;
        prefetch_rows(cache, k_base, &k_ahead, next < 16 ? next : 16, hd, item);
        prefetch_rows(cache, v_base, &v_ahead, count, hd, item);
        const __mmask16 valid = (__mmask16)((1u << count) - 1);
        /* bf16: each K row widened once, in registers, for the G heads (while their query
         * vectors fit in 16 registers). fp32 (and other bf16 shapes, widened into `tile`):
         * head by head, the first head's reads bringing the 16 rows into L1 for the others
         * (from DRAM ~7% faster than the bf16 order). */
        const int widen = is_bf16 && G * VECS <= 16;
        __m512 sums[4];
        const float *rows[16];
        if (widen) {
            size_t at[16];
            for (int r = 0; r < count; r++) at[r] = k_base + next_slot(&w) * hd;
            for (int r = count; r < 16; r++) at[r] = at[count - 1];
            dots16_heads(q, cache, is_bf16, at, G, VECS, hd, sums);
        } else {
            key_rows(cache, is_bf16, k_base, &w, count, hd, tile, rows);
        }
        for (int j = 0; j < G; j++) {
            const __m512 dots = widen ? sums[j] : dots16(q + (size_t)j * hd, rows, VECS);
            const __m512 s = _mm512_mul_ps(dots, _mm512_set1_ps(scale));
            _mm512_storeu_ps(scores + (size_t)j * stride + p0,
                             _mm512_mask_mov_ps(_mm512_set1_ps(-__builtin_inff()), valid, s));
        }
    }
    float inv[4];
    for (int j = 0; j < G; j++) inv[j] = softmax_exp(scores + (size_t)j * stride, stride);
    for (int i0 = 0; i0 < VECS; i0 += VC) {
        const int n = VECS - i0 < VC ? VECS - i0 : VC;
        __m512 acc[4][8];
        for (int j = 0; j < G; j++)
            for (int i = 0; i < n; i++) acc[j][i] = _mm512_setzero_ps();
        w = walk_from(table, bs, first, 0);
        for (int p = 0; p < keys; p++) {
            const size_t at = v_base + next_slot(&w) * hd + 16 * (size_t)i0;
            __m512 vv[8];
            for (int i = 0; i < n; i++) vv[i] = load16(cache, at + 16 * i, is_bf16);
            for (int j = 0; j < G; j++) {
                const __m512 weight = _mm512_set1_ps(scores[(size_t)j * stride + p]);
                for (int i = 0; i < n; i++) acc[j][i] = _mm512_fmadd_ps(weight, vv[i], acc[j][i]);
            }
        }
        for (int j = 0; j < G; j++)
            for (int i = 0; i < n; i++)
                _mm512_storeu_ps(out + (size_t)j * hd + 16 * (i0 + i),
                                 _mm512_mul_ps(acc[j][i], _mm512_set1_ps(inv[j])));
    }
}

/* An attention job: rows (or one row over consecutive slots: tables NULL) of queries over
 * one layer's pool. */
struct Attn {
    const float *q; /* (rows, H, hd) fp32 */
    const void *cache;
    int is_bf16, heads, kv_heads, hd, bs, width;
    size_t plane, per_head, first; /* first: the lone row's first slot (tables NULL) */
    const int64_t *tables;         /* (rows, width) or NULL */
    const int64_t *positions;      /* (rows,) keys - 1, or NULL: `keys` */
    int keys;
    float scale;
    float *out; /* (rows, H, hd) fp32 */
};

/* This thread's room for scores and a widened K tile, grown as needed (each of the pool's
 * threads has one). */
static float *scores_room(int count) {
    static __thread float *room = NULL;
    static __thread int size = 0;
    if (size < count) {
        float *grown = realloc(room, (size_t)count * sizeof *room);
        if (!grown) abort();
        room = grown;
        size = count;
    }
    return room;
}

/* Unit u: row u / Hkv, the query heads of K/V head u % Hkv, 4 at a time. */
static void attend_unit(const Attn *a, int unit) {
    const int b = unit / a->kv_heads, g = unit % a->kv_heads, hd = a->hd, vecs = hd / 16;
    const int group = a->heads / a->kv_heads;
    const int64_t *table = a->tables ? a->tables + (size_t)b * a->width : NULL;
    const int keys = a->positions ? (int)a->positions[b] + 1 : a->keys;
    const size_t k_base = (size_t)g * a->per_head * hd, v_base = a->plane + k_base;
    const int stride = (keys + 15) & ~15;
    float *scores = scores_room(4 * stride + 16 * hd), *tile = scores + 4 * stride;
    for (int j0 = 0; j0 < group; j0 += 4) {
        const int G = group - j0 < 4 ? group - j0 : 4;
        const size_t h = (size_t)b * a->heads + (size_t)g * group + j0;
        const float *qh = a->q + h * hd;
        float *oh = a->out + h * hd;
#define GROUP_CASE(GG, VV)                                                                    \
    if (G == GG && vecs == VV) {                                                              \
        if (a->is_bf16)                                                                       \
            attend_group(qh, a->cache, 1, k_base, v_base, table, a->bs, a->first, keys,       \
                         a->scale, scores, tile, oh, GG, VV, hd);                             \
        else                                                                                  \
            attend_group(qh, a->cache, 0, k_base, v_base, table, a->bs, a->first, keys,       \
                         a->scale, scores, tile, oh, GG, VV, hd);                             \
        continue;                                                                             \
    }
        GROUP_CASE(1, 4) GROUP_CASE(2, 4) GROUP_CASE(3, 4) GROUP_CASE(4, 4)
        GROUP_CASE(1, 8) GROUP_CASE(2, 8) GROUP_CASE(3, 8) GROUP_CASE(4, 8)
#undef GROUP_CASE
        /* Other head sizes (hd > 128 included): the same steps, sizes known at run time. */
        attend_group(qh, a->cache, a->is_bf16, k_base, v_base, table, a->bs, a->first, keys,
                     a->scale, scores, tile, oh, G, vecs, hd);
    }
}

/* Units of `a` shared by `threads` threads when there are at least two. */
static void attend_all(const Attn *a, int rows, int threads) {
    Job j;
    memset(&j, 0, sizeof j);
    j.attn = a;
    j.units = rows * a->kv_heads;
    dispatch(&j, threads, 2);
}

/* One decode row's attention over keys stored in consecutive slots of one layer's pool.
 *
 * `cache`: the layer's pool (2, Hkv, slots, hd), fp32 or bf16; the row's keys are slots
 * first .. first + keys - 1 of each head, the last one the new token's, whose K and V
 * (`k`, `v`: (Hkv, hd), the pool's dtype) are written here first. `q` (H, hd) fp32, query
 * head h reading K/V head h / (H / Hkv); `out` (H, hd) fp32; scores scaled by `scale`,
 * softmax in fp32. hd a multiple of 16. `threads` share the K/V heads. */
void qgemv_attend_one(const float *q, const void *k, const void *v, void *cache, int is_bf16,
                      int heads, int kv_heads, int hd, long slots, long first, int keys,
                      float scale, float *out, int threads) {
    size_t item = is_bf16 ? 2 : 4, plane = (size_t)kv_heads * slots * hd;
    write_kv(cache, k, v, item, plane, (size_t)slots, (size_t)(first + keys - 1), kv_heads, hd);
    Attn a = {q,     cache, is_bf16, heads,         kv_heads, hd,   1,    0,   plane,
              (size_t)slots, (size_t)first, NULL, NULL, keys, scale, out};
    attend_all(&a, 1, threads);
}

/* Decode rows' attention over their block tables, one call per layer (no gather of K/V).
 *
 * `cache`: the layer's pool (2, Hkv, blocks, bs, hd), fp32 or bf16. Row b's new K/V (`k`,
 * `v`: (B, Hkv, hd), the pool's dtype) are written at slot `slots[b]` of each head first;
 * its keys are positions 0 .. positions[b], position p at slot tables[b, p / bs] * bs +
 * p % bs. `q` (B, H, hd) fp32 with rotary applied; `out` (B, H, hd) fp32; as above. */
void qgemv_attend_rows(const float *q, const void *k, const void *v, void *cache, int is_bf16,
                       int rows, int heads, int kv_heads, int hd, long blocks, int bs,
                       const int64_t *slots, const int64_t *tables, int width,
                       const int64_t *positions, float scale, float *out, int threads) {
    const size_t item = is_bf16 ? 2 : 4, per_head = (size_t)blocks * bs;
    const size_t plane = (size_t)kv_heads * per_head * hd, kv = (size_t)kv_heads * hd * item;
    for (int b = 0; b < rows; b++)
        write_kv(cache, (const char *)k + b * kv, (const char *)v + b * kv, item, plane, per_head,
                 (size_t)slots[b], kv_heads, hd);
    Attn a = {q, cache, is_bf16, heads, kv_heads, hd, bs, width, plane, per_head, 0,
              tables, positions, 0, scale, out};
    attend_all(&a, rows, threads);
}

/* One packed weight, described once (qgemv.py keeps it next to the tensors). */
typedef struct {
    const uint8_t *packed;
    int bits, N, K;
} Weight;

/* y (M, N) fp32 = x (M, K) fp32 or bf16 @ W.T in one call: x quantized into `scratch`
 * (M * K + 8 * M * K / 32 bytes), then `qgemv`. */
void qgemv_linear(const Weight *w, const void *x, int is_bf16, int M, float *y, void *scratch,
                  int threads) {
    int8_t *qx = (int8_t *)scratch;
    float *d = (float *)(qx + (size_t)M * w->K);
    float *dsum = d + (size_t)M * (w->K / GROUP);
    qgemv_quantize(x, is_bf16, M, w->K, qx, d, dsum);
    qgemv(w->packed, w->bits, qx, d, dsum, M, w->N, w->K, y, threads);
}
