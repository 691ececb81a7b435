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

/* Run j's units on `threads` threads (the caller's one of them), or all on the caller's when
 * there are fewer than `least` units or no worker. */
static void dispatch(const Job *j, int threads, int least) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > 1 && j->units >= least) grow(threads);
    if (threads < 2 || j->units < least || created < 2) {
        for (int u = 0; u < j->units; u++) {
            if (j->attn) {
                attend_unit(j->attn, u);
            } else {
                int blocks = (j->N + BLOCK - 1) / BLOCK;
                int b1 = (u + 1) * j->unit < blocks ? (u + 1) * j->unit : blocks;
                run_blocks(j, u * j->unit, b1);
            }
        }
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

/* Where key p of a row is, within a head: through its block table, or from `first` on. */
static inline size_t key_slot(const int64_t *table, int bs, size_t first, int p) {
    return table ? (size_t)table[p / bs] * bs + (size_t)(p % bs) : first + (size_t)p;
}

/* The query heads of one K/V head (G of them, hd = 16 VECS) over `keys` keys: each K and V
 * row is read and widened once for the G heads (SmolLM2: 3). `scores`: G * keys floats. */
static inline __attribute__((always_inline)) void attend_group(
    const float *q, const void *cache, int is_bf16, size_t k_base, size_t v_base,
    const int64_t *table, int bs, size_t first, int keys, float scale, float *scores,
    float *out, int G, int VECS, int hd) {
    __m512 qv[4][8];
    for (int j = 0; j < G; j++)
        for (int i = 0; i < VECS; i++) qv[j][i] = _mm512_loadu_ps(q + (size_t)j * hd + 16 * i);
    float top[4] = {-3.4e38f, -3.4e38f, -3.4e38f, -3.4e38f};
    for (int p = 0; p < keys; p++) {
        size_t at = k_base + key_slot(table, bs, first, p) * hd;
        __m512 kv[8];
        for (int i = 0; i < VECS; i++) kv[i] = load16(cache, at + 16 * i, is_bf16);
        for (int j = 0; j < G; j++) {
            __m512 acc = _mm512_mul_ps(qv[j][0], kv[0]);
            for (int i = 1; i < VECS; i++) acc = _mm512_fmadd_ps(qv[j][i], kv[i], acc);
            float score = _mm512_reduce_add_ps(acc) * scale;
            scores[(size_t)j * keys + p] = score;
            top[j] = score > top[j] ? score : top[j];
        }
    }
    for (int j = 0; j < G; j++) {
        float *row = scores + (size_t)j * keys, total = 0.0f;
        for (int p = 0; p < keys; p++) {
            row[p] = __builtin_expf(row[p] - top[j]);
            total += row[p];
        }
        for (int p = 0; p < keys; p++) row[p] /= total;
    }
    __m512 acc[4][8];
    for (int j = 0; j < G; j++)
        for (int i = 0; i < VECS; i++) acc[j][i] = _mm512_setzero_ps();
    for (int p = 0; p < keys; p++) {
        size_t at = v_base + key_slot(table, bs, first, p) * hd;
        __m512 vv[8];
        for (int i = 0; i < VECS; i++) vv[i] = load16(cache, at + 16 * i, is_bf16);
        for (int j = 0; j < G; j++) {
            __m512 w = _mm512_set1_ps(scores[(size_t)j * keys + p]);
            for (int i = 0; i < VECS; i++) acc[j][i] = _mm512_fmadd_ps(w, vv[i], acc[j][i]);
        }
    }
    for (int j = 0; j < G; j++)
        for (int i = 0; i < VECS; i++) _mm512_storeu_ps(out + (size_t)j * hd + 16 * i, acc[j][i]);
}

/* One head at a time, for shapes attend_group's registers do not take (hd > 128). */
static void attend_head(const float *qh, const void *cache, int is_bf16, size_t k_base,
                        size_t v_base, const int64_t *table, int bs, size_t first, int keys,
                        float scale, float *scores, float *oh, int hd) {
    float top = -3.4e38f;
    for (int p = 0; p < keys; p++) {
        size_t at = k_base + key_slot(table, bs, first, p) * hd;
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < hd; i += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i), load16(cache, at + i, is_bf16), acc);
        scores[p] = _mm512_reduce_add_ps(acc) * scale;
        top = scores[p] > top ? scores[p] : top;
    }
    float total = 0.0f;
    for (int p = 0; p < keys; p++) {
        scores[p] = __builtin_expf(scores[p] - top);
        total += scores[p];
    }
    for (int p = 0; p < keys; p++) scores[p] /= total;
    for (int i = 0; i < hd; i += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int p = 0; p < keys; p++) {
            size_t at = v_base + key_slot(table, bs, first, p) * hd;
            acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[p]), load16(cache, at + i, is_bf16), acc);
        }
        _mm512_storeu_ps(oh + i, acc);
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

/* This thread's room for scores, grown as needed (each of the pool's threads has one). */
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
    float *scores = scores_room(4 * keys);
    for (int j0 = 0; j0 < group; j0 += 4) {
        const int G = group - j0 < 4 ? group - j0 : 4;
        const size_t h = (size_t)b * a->heads + (size_t)g * group + j0;
        const float *qh = a->q + h * hd;
        float *oh = a->out + h * hd;
#define GROUP_CASE(GG, VV)                                                                    \
    if (G == GG && vecs == VV) {                                                              \
        attend_group(qh, a->cache, a->is_bf16, k_base, v_base, table, a->bs, a->first, keys,  \
                     a->scale, scores, oh, GG, VV, hd);                                       \
        continue;                                                                             \
    }
        GROUP_CASE(1, 4) GROUP_CASE(2, 4) GROUP_CASE(3, 4) GROUP_CASE(4, 4)
        GROUP_CASE(1, 8) GROUP_CASE(2, 8) GROUP_CASE(3, 8) GROUP_CASE(4, 8)
#undef GROUP_CASE
        if (vecs <= 8) {
            attend_group(qh, a->cache, a->is_bf16, k_base, v_base, table, a->bs, a->first, keys,
                         a->scale, scores, oh, G, vecs, hd);
            continue;
        }
        for (int j = 0; j < G; j++)
            attend_head(qh + (size_t)j * hd, a->cache, a->is_bf16, k_base, v_base, table, a->bs,
                        a->first, keys, a->scale, scores, oh + (size_t)j * hd, hd);
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
