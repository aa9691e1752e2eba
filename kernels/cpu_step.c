/* The CPU decode step for fp32 sessions, called through ctypes by
 * qguard_stream/runtime/cpu_step.py.
 *
 * Why C: at decode sizes (a handful of rows) every eager PyTorch op costs more in dispatch than in
 * arithmetic, and a Qwen3 layer has ~45 of them besides its four GEMMs. One row (one session, one
 * token): each layer is one call, qg_decode_layer, with the projections as GEMVs over the
 * [out, in] weights. More rows (one session's chunk, or many sessions' chunks packed): the
 * layer's norms, q/k norm + RoPE + KV write, attention, SiLU and the projections (qg_gemm) are
 * separate calls. The math is the formula of models/qwen3.py and
 * runtime/layer.py, in fp32 with double-accumulated sums of squares; the tests compare every
 * function with its PyTorch reference.
 *
 * bf16 (a bf16 guard on the CPU): qg_gemm_bf16, and the `bf16` flag of qg_qk_rope_store,
 * qg_attend_paged and qg_decode_layer, read the projection weights and the K/V pools as bf16,
 * widened to fp32 on load (a shift), and store K/V rounded to nearest even; activations and
 * accumulation stay fp32. Half the bytes of the fp32 step, on CPUs without bf16 arithmetic. On a
 * CPU with AVX512-BF16 the projections instead round their activations to bf16 and run on its
 * dot-product instruction (see "bf16 projections" below; qg_bf16_dot says which).
 *
 * Layouts (all row-major, contiguous):
 *   qkv          [n_new, (heads + 2 * kv_heads) * head_dim]   q heads, then k heads, then v heads
 *   qk_weight    [heads + kv_heads, head_dim]   q_norm rows (attention scale folded in), k_norm rows
 *   cos, sin     tables [positions, head_dim], a row per position; sin sign-folded:
 *                rope(x) = x * cos + roll(x, head_dim / 2) * sin
 *   k/v pools    one layer's keys (values) of the paged pool, [blocks, kv_heads, page, head_dim]
 *                (head-major blocks); a session's position p lives in block table[p / page] at
 *                offset p % page, its slot being block * page + offset (kvcache/paged.py owns
 *                that arithmetic on the Python side)
 *
 * Threads: attention splits the (session, KV head) pairs, and a GEMV its output rows, over a small
 * pool of our own (qg_set_threads; the runtime passes torch's thread count), not OpenMP: an
 * OpenMP region ends at a barrier that waits for every thread of the team, so on a shared CPU a
 * worker the kernel has descheduled stalls the step for a whole time slice (measured: a k = 1
 * step at 155 ms instead of 1.4 with one busy process beside it on 2 cores). Here the caller
 * works too and claims chunks of the range from an atomic counter like the helpers; it waits
 * only for chunks a helper has actually claimed, so a helper that is not running costs nothing.
 * Helpers spin briefly for the next job (a layer's jobs come microseconds apart), then sleep.
 * On a loaded CPU the pool wakes fewer helpers: every few milliseconds it reads how many tasks
 * are runnable on the machine (/proc/loadavg) and keeps one CPU per thread of ours, the caller's
 * first (a process pinned to some of the CPUs does not adapt: the count is the machine's); a
 * helper sharing a CPU with another busy task is descheduled mid-chunk and the caller
 * waits a time slice for it (measured: a k = 1 step's p99 5.3 ms on 2 threads vs 4.3 on the
 * caller alone with one busy process beside it on 2 cores; quiet p50 1.7 on 2 threads).
 */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEAD_DIM 1024

/* ---- the thread pool --------------------------------------------------------------------------- */
#define MAX_HELPERS 63
#define SPIN_NS 50000 /* a helper spins this long for the next job before it sleeps */
#define LOAD_CHECK_NS 2000000 /* how often the pool looks at the machine's runnable tasks */
#define LOAD_WINDOW_NS 50000000 /* the longest gap between looks whose CPU time still tells */

typedef void (*range_fn)(void* context, int64_t begin, int64_t end);

static struct {
    pthread_mutex_t lock; /* serializes jobs (other callers run theirs alone) and guards sleeps */
    pthread_mutex_t sleep_lock;
    pthread_cond_t wake;
    pthread_t threads[MAX_HELPERS];
    int helpers;              /* started */
    int wanted;               /* helpers a job may use on an idle machine (qg_set_threads - 1) */
    int job_helpers;          /* helpers the current job uses (fewer on a loaded machine) */
    atomic_uint_fast64_t generation; /* bumped when a job is posted */
    atomic_uint_fast64_t closed;     /* the generation whose job the caller has finished */
    atomic_int active;        /* helpers inside a job */
    atomic_int sleepers;
    atomic_int_fast64_t next; /* the job's next unclaimed index */
    range_fn fn;              /* the job: fn(context, begin, end) over [0, count) by `grain` */
    void* context;
    int64_t count, grain;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .sleep_lock = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER};

static void claim_and_run(void) {
    for (;;) {
        const int64_t begin = atomic_fetch_add(&pool.next, pool.grain);
        if (begin >= pool.count) return;
        const int64_t end = begin + pool.grain < pool.count ? begin + pool.grain : pool.count;
        pool.fn(pool.context, begin, end);
    }
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* ---- how many helpers the machine has room for ---------------------------------------------- */
static struct {
    int adaptive;        /* 0: always `wanted` helpers (qg_set_adaptive) */
    int fd;              /* /proc/loadavg, kept open; -1: unreadable, no adapting */
    int cpus;            /* CPUs this process may run on */
    int64_t next_check;  /* when to look again (ns, CLOCK_MONOTONIC) */
    int usable;          /* helpers the last checks left room for */
    int last_fits;       /* helpers the last check alone left room for */
    int64_t others;      /* runnable tasks not ours at the last check */
    int64_t last_look;   /* when the last look was taken (ns), and this process's CPU time then */
    int64_t last_cpu;
} load = {.adaptive = 1, .fd = -2, .usable = MAX_HELPERS, .last_fits = MAX_HELPERS};

/* Helpers worth waking: one CPU for each thread of ours, the caller's first, when `others`
 * tasks besides ours are runnable on `cpus` CPUs; at most `wanted`, at least none. */
int64_t qg_usable_helpers(int64_t wanted, int64_t cpus, int64_t others) {
    const int64_t room = cpus - 1 - (others > 0 ? others : 0);
    return room < 0 ? 0 : (room < wanted ? room : wanted);
}

/* Runnable tasks on the machine now: the 4th field of /proc/loadavg ("running/total"), -1 when
 * it cannot be read. */
static int64_t runnable_tasks(void) {
    if (load.fd == -2) {
        load.cpus = (int)sysconf(_SC_NPROCESSORS_ONLN);
#ifdef __linux__
        /* The count is the machine's: pinned to some of its CPUs, the tasks counted may run on
         * the others, so a pinned process does not adapt. */
        cpu_set_t set;
        const int pinned = sched_getaffinity(0, sizeof set, &set) == 0 &&
                           CPU_COUNT(&set) < load.cpus;
        load.fd = pinned ? -1 : open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
#else
        load.fd = -1; /* no /proc/loadavg: always the qg_set_threads count */
#endif
    }
    char text[128];
    const ssize_t size = load.fd < 0 ? -1 : pread(load.fd, text, sizeof text - 1, 0);
    if (size <= 0) return -1;
    text[size] = 0;
    const char* field = text;
    for (int spaces = 0; *field && spaces < 3; ++field) spaces += *field == ' ';
    return *field >= '0' && *field <= '9' ? strtoll(field, NULL, 10) : -1;
}

/* CPU time of this process's threads so far, ns. */
static int64_t process_cpu_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Helpers the machine has room for (called holding pool.lock): MAX_HELPERS when adapting is off
 * or the machine cannot be read, else fewer while its CPUs are taken by other tasks. It takes
 * the larger room of the last two looks, so a task that is runnable for a moment (a kernel
 * worker, a process starting) does not cost a step its helpers; a busy one is seen at every
 * look. */
static int room_for_helpers(void) {
    if (!load.adaptive) return MAX_HELPERS;
    const int64_t now = now_ns();
    if (now >= load.next_check) {
        load.next_check = now + LOAD_CHECK_NS;
        const int64_t running = runnable_tasks(), cpu = process_cpu_ns();
        int fits = MAX_HELPERS;
        if (running >= 0) {
            /* Ours among the runnable: the caller and the helpers not asleep, or, when more,
             * the CPUs this process kept busy since the last look (torch's OpenMP workers spin
             * for milliseconds after each parallel op: they are ours, not another's load). */
            const int64_t awake = pool.helpers - atomic_load(&pool.sleepers);
            double ours = 1.0 + (double)(awake > 0 ? awake : 0);
            const int64_t window = now - load.last_look;
            if (load.last_look > 0 && window > 0 && window <= LOAD_WINDOW_NS) {
                const double busy = (double)(cpu - load.last_cpu) / (double)window;
                ours = busy > ours ? busy : ours;
            }
            /* rounded down from 0.75: a spinning worker counted whole now, partly in `busy` */
            const int64_t others = (int64_t)floor((double)running - ours + 0.25);
            load.others = others > 0 ? others : 0;
            fits = (int)qg_usable_helpers(MAX_HELPERS, load.cpus, load.others);
        }
        load.last_look = now;
        load.last_cpu = cpu;
        load.usable = fits > load.last_fits ? fits : load.last_fits;
        load.last_fits = fits;
    }
    return load.usable;
}

static void* helper_main(void* argument) {
    const int index = (int)(intptr_t)argument; /* helpers past pool.wanted sit jobs out */
    uint64_t seen = atomic_load(&pool.generation);
    for (;;) {
        const int64_t spin_until = now_ns() + SPIN_NS;
        while (atomic_load(&pool.generation) == seen && now_ns() < spin_until) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
        if (atomic_load(&pool.generation) == seen) {
            pthread_mutex_lock(&pool.sleep_lock);
            atomic_fetch_add(&pool.sleepers, 1);
            while (atomic_load(&pool.generation) == seen)
                pthread_cond_wait(&pool.wake, &pool.sleep_lock);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.sleep_lock);
        }
        seen = atomic_load(&pool.generation);
        /* Enter, then check the job is still open: the caller closes it before it reads
         * `active`, so either it waits for us or we see it closed and touch nothing. */
        atomic_fetch_add(&pool.active, 1);
        if (atomic_load(&pool.closed) != seen && index < pool.job_helpers) claim_and_run();
        atomic_fetch_sub(&pool.active, 1);
    }
    return NULL;
}

static void after_fork_in_child(void) {
    /* the helpers do not exist in a forked child: its jobs run on the calling thread alone */
    pool.helpers = pool.wanted = 0;
    pthread_mutex_init(&pool.lock, NULL);
    pthread_mutex_init(&pool.sleep_lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
}

/* Threads for the parallel parts, the caller included (1: everything on the caller). Helpers
 * are started on first need and kept. */
void qg_set_threads(int64_t threads) {
    static int registered = 0;
    pthread_mutex_lock(&pool.lock);
    if (!registered) {
        pthread_atfork(NULL, NULL, after_fork_in_child);
        registered = 1;
    }
    int wanted = threads - 1 < 0 ? 0 : (threads - 1 > MAX_HELPERS ? MAX_HELPERS : (int)threads - 1);
    while (pool.helpers < wanted &&
           pthread_create(&pool.threads[pool.helpers], NULL, helper_main,
                          (void*)(intptr_t)pool.helpers) == 0) {
        pthread_detach(pool.threads[pool.helpers]);
        pool.helpers++;
    }
    pool.wanted = wanted < pool.helpers ? wanted : pool.helpers;
    pthread_mutex_unlock(&pool.lock);
}

/* 1: wake fewer helpers while other tasks take the machine's CPUs (the default); 0: always the
 * qg_set_threads count. */
void qg_set_adaptive(int64_t adaptive) {
    pthread_mutex_lock(&pool.lock);
    load.adaptive = adaptive != 0;
    load.next_check = 0; /* look at the machine before the next job */
    pthread_mutex_unlock(&pool.lock);
}

/* How many of `threads` (the caller included) the machine has room for now: the same look as
 * the pool's jobs take, for work that runs on another thread pool (torch's, for the steps the
 * library does not do). At least 1. */
int64_t qg_threads_with_room(int64_t threads) {
    pthread_mutex_lock(&pool.lock);
    const int64_t room = (int64_t)room_for_helpers() + 1;
    pthread_mutex_unlock(&pool.lock);
    return threads < 1 ? 1 : (room < threads ? room : threads);
}

/* What the last pool job saw: out[0] the helpers it used, out[1] the runnable tasks not ours at
 * the last check (-1: never checked or unreadable), out[2] the CPUs counted. */
void qg_pool_state(int64_t* out) {
    pthread_mutex_lock(&pool.lock);
    out[0] = pool.job_helpers;
    out[1] = load.fd >= 0 && load.next_check ? load.others : -1;
    out[2] = load.cpus;
    pthread_mutex_unlock(&pool.lock);
}

/* fn(context, begin, end) over [0, count) in chunks of `grain`, on the caller and the helpers;
 * on the caller alone when there is one chunk, no helper, or another job is running. */
static void parallel_for(range_fn fn, void* context, int64_t count, int64_t grain) {
    if (count <= grain || pool.wanted == 0 || pthread_mutex_trylock(&pool.lock) != 0) {
        fn(context, 0, count);
        return;
    }
    const int room = room_for_helpers();
    pool.job_helpers = room < pool.wanted ? room : pool.wanted;
    if (pool.job_helpers == 0) {
        pthread_mutex_unlock(&pool.lock);
        fn(context, 0, count);
        return;
    }
    pool.fn = fn;
    pool.context = context;
    pool.count = count;
    pool.grain = grain;
    atomic_store(&pool.next, 0);
    const uint64_t job = atomic_fetch_add(&pool.generation, 1) + 1;
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.sleep_lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.sleep_lock);
    }
    claim_and_run();
    atomic_store(&pool.closed, job);
    for (int spins = 0; atomic_load(&pool.active) != 0; ++spins)
        if (spins > 1000) sched_yield(); /* a helper finishing a chunk it claimed */
    pthread_mutex_unlock(&pool.lock);
}

/* Eight-lane vectors (GCC/Clang vector extensions; lowered to whatever SIMD the target has).
 * Reductions are written with them explicitly: `#pragma omp simd reduction` made GCC 12 spill
 * the lanes to the stack and add them one by one in the inner loop. */
typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float* p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float sum8(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* The eight sums of x[0..7], lane i = sum of x[i]: pairwise across vectors in three shuffle-and-add
 * levels (about 14 instructions, where eight sum8 take about 50). */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define HAVE_SHUFFLEVECTOR 1
#endif
#endif
static inline v8 sum8x8(const v8* x) {
#ifdef HAVE_SHUFFLEVECTOR
    v8 y[4], z[2];
    for (int i = 0; i < 4; ++i)
        y[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
               __builtin_shufflevector(x[2 * i], x[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int i = 0; i < 2; ++i)
        z[i] = __builtin_shufflevector(y[2 * i], y[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
               __builtin_shufflevector(y[2 * i], y[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return __builtin_shufflevector(z[0], z[1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(z[0], z[1], 4, 5, 6, 7, 12, 13, 14, 15);
#else
    v8 sums;
    for (int i = 0; i < 8; ++i) sums[i] = sum8(x[i]);
    return sums;
#endif
}

/* bf16 (a bf16 guard on the CPU): the upper half of an fp32, widened on load (a shift); the
 * arithmetic stays fp32. */
typedef uint16_t bfloat;
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

static inline v8 load8_bf16(const bfloat* p) {
    u16x8 half;
    memcpy(&half, p, sizeof half);
    const u32x8 bits = __builtin_convertvector(half, u32x8) << 16;
    v8 v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static inline float bf16_value(bfloat h) {
    const uint32_t bits = (uint32_t)h << 16;
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* fp32 -> bf16, rounded to nearest even (as torch's .bfloat16()); NaN stays NaN. */
static inline bfloat to_bf16(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (bfloat)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (bfloat)(bits >> 16);
}

/* The kernels below read one operand (weights, or K/V rows) as fp32 or as bf16. Each is written
 * once with `bf16` as a parameter and instantiated for 0 and 1 by always-inlined callers, so each
 * copy has no per-element branch: the fp32 step runs the code it ran before bf16 existed. */
#define SPECIALIZED static inline __attribute__((always_inline))

static inline v8 load8_any(const void* row, int64_t at, int64_t bf16) {
    return bf16 ? load8_bf16((const bfloat*)row + at) : load8((const float*)row + at);
}

static inline float value_any(const void* row, int64_t at, int64_t bf16) {
    return bf16 ? bf16_value(((const bfloat*)row)[at]) : ((const float*)row)[at];
}

SPECIALIZED float dot_t(const void* a, const float* b, int64_t n, const int64_t bf16) {
    v8 even = {0}, odd = {0};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        even += load8_any(a, j, bf16) * load8(b + j);
        odd += load8_any(a, j + 8, bf16) * load8(b + j + 8);
    }
    for (; j + 8 <= n; j += 8) even += load8_any(a, j, bf16) * load8(b + j);
    float total = sum8(even + odd);
    for (; j < n; ++j) total += value_any(a, j, bf16) * b[j];
    return total;
}

static inline float dot(const float* a, const float* b, int64_t n) {
    return dot_t(a, b, n, 0);
}

static inline float dot_bf16(const bfloat* a, const float* b, int64_t n) {
    return dot_t(a, b, n, 1);
}

/* Keep two vectors in registers: without it GCC 12 folds each load into every FMA that uses it
 * (dot_2x4 then issued 16 loads for its 8 FMAs, load-bound at half the FMA rate). */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(__AVX__)
#define IN_REGISTERS(a, b) __asm__("" : "+x"(a), "+x"(b))
#else
#define IN_REGISTERS(a, b) ((void)0)
#endif

/* The dot products of four rows w[0..3] [n] (keys) with one x [n], each summed as dot_t sums it
 * (bit for bit: the same even/odd accumulators, tails and reduction), but four at a time: eight
 * independent FMA chains where dot_t has two, whose latency bound a one-token attention's
 * scores (one query row, 1,024 keys of 64: 102 -> 66 us). Not for the GEMV: four weight rows
 * read at once streamed slower from memory than one row after another (measured end to end,
 * small shapes, this 2-core box). */
SPECIALIZED void dot_4x1_t(const void* const* w, const float* x, int64_t n, float* out,
                           const int64_t bf16) {
    const void *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
    v8 e0 = {0}, e1 = {0}, e2 = {0}, e3 = {0}, o0 = {0}, o1 = {0}, o2 = {0}, o3 = {0};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        const v8 xa = load8(x + j), xb = load8(x + j + 8);
        e0 += load8_any(w0, j, bf16) * xa; o0 += load8_any(w0, j + 8, bf16) * xb;
        e1 += load8_any(w1, j, bf16) * xa; o1 += load8_any(w1, j + 8, bf16) * xb;
        e2 += load8_any(w2, j, bf16) * xa; o2 += load8_any(w2, j + 8, bf16) * xb;
        e3 += load8_any(w3, j, bf16) * xa; o3 += load8_any(w3, j + 8, bf16) * xb;
    }
    for (; j + 8 <= n; j += 8) {
        const v8 xa = load8(x + j);
        e0 += load8_any(w0, j, bf16) * xa;
        e1 += load8_any(w1, j, bf16) * xa;
        e2 += load8_any(w2, j, bf16) * xa;
        e3 += load8_any(w3, j, bf16) * xa;
    }
    out[0] = sum8(e0 + o0); out[1] = sum8(e1 + o1); out[2] = sum8(e2 + o2); out[3] = sum8(e3 + o3);
    for (; j < n; ++j)
        for (int i = 0; i < 4; ++i) out[i] += value_any(w[i], j, bf16) * x[j];
}

/* The eight dot products of rows u, v [n] with rows x[0..3] [n]: first[i] = u . x[i],
 * second[i] = v . x[i], in eight vector accumulators, so each load of u or v feeds four FMAs and
 * each load of an x row two (one dot product at a time loads both rows for every product). */
SPECIALIZED void dot_2x4_t(const void* u, const void* v, const float* const* x, int64_t n,
                           float* first, float* second, const int64_t bf16) {
    const int64_t body = n & ~(int64_t)7;
    const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
    v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    for (int64_t k = 0; k < body; k += 8) {
        v8 p = load8_any(u, k, bf16), q = load8_any(v, k, bf16);
        v8 c0 = load8(x0 + k), c1 = load8(x1 + k), c2 = load8(x2 + k), c3 = load8(x3 + k);
        IN_REGISTERS(p, q);
        IN_REGISTERS(c0, c1);
        IN_REGISTERS(c2, c3);
        a0 += p * c0; a1 += p * c1; a2 += p * c2; a3 += p * c3;
        b0 += q * c0; b1 += q * c1; b2 += q * c2; b3 += q * c3;
    }
    const v8 acc[8] = {a0, a1, a2, a3, b0, b1, b2, b3};
    const v8 sums = sum8x8(acc);
    for (int i = 0; i < 4; ++i) {
        first[i] = sums[i];
        second[i] = sums[4 + i];
    }
    for (int64_t k = body; k < n; ++k)
        for (int i = 0; i < 4; ++i) {
            first[i] += value_any(u, k, bf16) * x[i][k];
            second[i] += value_any(v, k, bf16) * x[i][k];
        }
}

static inline void dot_2x4(const float* u, const float* v, const float* const* x, int64_t n,
                           float* first, float* second) {
    dot_2x4_t(u, v, x, n, first, second, 0);
}

static inline void dot_2x4_bf16(const bfloat* u, const bfloat* v, const float* const* x,
                                int64_t n, float* first, float* second) {
    dot_2x4_t(u, v, x, n, first, second, 1);
}

/* ---- bf16 projections on the CPU's bf16 dot-product instruction ------------------------------
 * Where the compiler targets AVX512-BF16 (-march=native on a CPU that has it: Sapphire Rapids and
 * later, Zen 4 and later), a bf16 guard's projections run on VDPBF16PS: the activations are
 * rounded to bf16 once per call (nearest even, as torch's .bfloat16()), and each instruction
 * multiplies 32 bf16 pairs and adds them into 16 fp32 sums. Elsewhere the weights are widened to
 * fp32 and multiplied with the fp32 activations (above). QG_BF16_DOT_EMULATED builds the same
 * kernels with the instruction written out in C, lane by lane as Intel specifies it, so that
 * machines without it test everything but the instruction itself. */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define QG_BF16_DOT 1
#elif defined(QG_BF16_DOT_EMULATED)
#define QG_BF16_DOT 2
#else
#define QG_BF16_DOT 0
#endif

/* Which projections' arithmetic this build runs: 0 widened fp32, 1 the CPU's bf16 dot-product
 * instruction, 2 that instruction emulated (tests). */
int64_t qg_bf16_dot(void) { return QG_BF16_DOT; }

#if QG_BF16_DOT
#pragma GCC diagnostic ignored "-Wpsabi" /* 64-byte vectors passed between inlined functions */
typedef float v16 __attribute__((vector_size(64)));
typedef uint16_t bf16x32 __attribute__((vector_size(64)));

static inline bf16x32 load32_bf16(const bfloat* p) {
    bf16x32 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* acc[i] + a[2i+1] * b[2i+1] + a[2i] * b[2i] for the 16 lanes (VDPBF16PS: each bf16 product is
 * exact in fp32; the two additions round to nearest even, odd pair first). */
static inline v16 dot_pairs(v16 acc, bf16x32 a, bf16x32 b) {
#if QG_BF16_DOT == 1
    return (v16)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
#else
    for (int i = 0; i < 16; ++i) {
        const float odd = acc[i] + bf16_value(a[2 * i + 1]) * bf16_value(b[2 * i + 1]);
        acc[i] = odd + bf16_value(a[2 * i]) * bf16_value(b[2 * i]);
    }
    return acc;
#endif
}

static inline float sum16(v16 v) {
    v8 low, high;
    memcpy(&low, &v, sizeof low);
    memcpy(&high, (const char*)&v + sizeof low, sizeof high);
    return sum8(low + high);
}

/* w [n] . xb [n], both bf16, fp32 sums: two chains of 32 pairs, then the tail widened. */
static float dot_pairs_row(const bfloat* w, const bfloat* xb, int64_t n) {
    v16 a = {0}, b = {0};
    int64_t j = 0;
    for (; j + 64 <= n; j += 64) {
        a = dot_pairs(a, load32_bf16(w + j), load32_bf16(xb + j));
        b = dot_pairs(b, load32_bf16(w + j + 32), load32_bf16(xb + j + 32));
    }
    for (; j + 32 <= n; j += 32) a = dot_pairs(a, load32_bf16(w + j), load32_bf16(xb + j));
    float total = sum16(a + b);
    for (; j < n; ++j) total += bf16_value(w[j]) * bf16_value(xb[j]);
    return total;
}

/* Rows u, v [n] times rows x[0..3] [n] (all bf16), as dot_2x4 does in fp32: eight accumulators,
 * each weight load feeding four instructions. */
static void dot_pairs_2x4(const bfloat* u, const bfloat* v, const bfloat* const* x, int64_t n,
                          float* first, float* second) {
    const int64_t body = n & ~(int64_t)31;
    v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    for (int64_t k = 0; k < body; k += 32) {
        const bf16x32 p = load32_bf16(u + k), q = load32_bf16(v + k);
        const bf16x32 c0 = load32_bf16(x[0] + k), c1 = load32_bf16(x[1] + k),
                      c2 = load32_bf16(x[2] + k), c3 = load32_bf16(x[3] + k);
        a0 = dot_pairs(a0, p, c0); a1 = dot_pairs(a1, p, c1);
        a2 = dot_pairs(a2, p, c2); a3 = dot_pairs(a3, p, c3);
        b0 = dot_pairs(b0, q, c0); b1 = dot_pairs(b1, q, c1);
        b2 = dot_pairs(b2, q, c2); b3 = dot_pairs(b3, q, c3);
    }
    first[0] = sum16(a0); first[1] = sum16(a1); first[2] = sum16(a2); first[3] = sum16(a3);
    second[0] = sum16(b0); second[1] = sum16(b1); second[2] = sum16(b2); second[3] = sum16(b3);
    for (int64_t k = body; k < n; ++k)
        for (int i = 0; i < 4; ++i) {
            first[i] += bf16_value(u[k]) * bf16_value(x[i][k]);
            second[i] += bf16_value(v[k]) * bf16_value(x[i][k]);
        }
}
#endif

/* The activations of a bf16-dot projection, rounded to bf16 in a per-thread buffer kept between
 * calls (the caller's; the pool's helpers read it while the caller waits). NULL if it cannot be
 * allocated. */
static __thread bfloat* tls_activations = NULL;
static __thread size_t tls_activations_count = 0;

static const bfloat* activations_bf16(const float* x, int64_t count) {
    if ((size_t)count > tls_activations_count) {
        free(tls_activations);
        tls_activations = malloc((size_t)count * sizeof(bfloat));
        tls_activations_count = tls_activations != NULL ? (size_t)count : 0;
        if (tls_activations == NULL) return NULL;
    }
    for (int64_t i = 0; i < count; ++i) tls_activations[i] = to_bf16(x[i]);
    return tls_activations;
}

/* Sum of squares in float blocks of 64 accumulated in double. */
static float sum_of_squares(const float* x, int64_t n) {
    double total = 0.0;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) total += dot(x + i, x + i, 64);
    return (float)(total + dot(x + i, x + i, n - i));
}

static float max_of(const float* x, int64_t n) {
    float lanes[8];
    int64_t i = 0;
    for (int k = 0; k < 8; ++k) lanes[k] = -INFINITY;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) lanes[k] = x[i + k] > lanes[k] ? x[i + k] : lanes[k];
    for (; i < n; ++i) lanes[0] = x[i] > lanes[0] ? x[i] : lanes[0];
    float peak = lanes[0];
    for (int k = 1; k < 8; ++k) peak = lanes[k] > peak ? lanes[k] : peak;
    return peak;
}

static float sum_of(const float* x, int64_t n) {
    v8 lanes = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) lanes += load8(x + i);
    float total = sum8(lanes);
    for (; i < n; ++i) total += x[i];
    return total;
}

/* exp(x), vectorizable (libm's expf is a scalar call): exp(x) = 2^n * e^r with n = round(x / ln2),
 * |r| <= ln2 / 2, e^r by Cephes' degree-6 expf polynomial; relative error a few ulp on
 * [-87, 88]. x is clamped to that range, so exp(-inf) is ~1.6e-38 (not 0) and nothing overflows:
 * softmax and SiLU are unaffected at fp32 precision. */
static inline float exp_approx(float x) {
    x = x > 88.0f ? 88.0f : x;  /* two plain selects (a nested one blocks vectorization) */
    x = x < -87.0f ? -87.0f : x;
    /* round to nearest by the 1.5 * 2^23 trick (vectorizes, unlike roundevenf) */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* For the accuracy test only. */
void qg_exp(const float* x, float* out, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = exp_approx(x[i]);
}

/* Qwen3 RMSNorm over each row: x * rsqrt(mean(x^2) + eps) * weight. */
void qg_rms_norm(const float* x, const float* weight, float* out, int64_t rows, int64_t dim,
                 float eps) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* row = x + r * dim;
        float* dst = out + r * dim;
        float inv_rms = 1.0f / sqrtf(sum_of_squares(row, dim) / (float)dim + eps);
#pragma omp simd
        for (int64_t j = 0; j < dim; ++j) dst[j] = row[j] * inv_rms * weight[j];
    }
}

/* A row of n values into the pool: fp32 as is, or rounded to bf16 when `bf16`. */
static inline void store_row(void* pool, int64_t at, const float* row, int64_t n, int64_t bf16) {
    if (!bf16) {
        memcpy((float*)pool + at, row, n * sizeof(float));
        return;
    }
    bfloat* dst = (bfloat*)pool + at;
    for (int64_t j = 0; j < n; ++j) dst[j] = to_bf16(row[j]);
}

/* Per row t: q_norm / k_norm per head and RoPE at positions[t]; q to q_out [rows, heads,
 * head_dim]; k and v stored in pool slot slots[t] (a negative slot: a padding row, stored nowhere),
 * fp32 pools, or bf16 ones (rounded to nearest even) when `bf16`. */
void qg_qk_rope_store(const float* qkv, const float* qk_weight, const float* cos_table,
                      const float* sin_table, const int32_t* positions, const int32_t* slots,
                      float* q_out, void* k_pool, void* v_pool, int64_t page, int64_t rows,
                      int64_t heads, int64_t kv_heads, int64_t head_dim, float eps,
                      int64_t bf16) {
    const int64_t width = (heads + 2 * kv_heads) * head_dim, half = head_dim / 2;
    float normed[MAX_HEAD_DIM], rotated[MAX_HEAD_DIM];
    for (int64_t t = 0; t < rows; ++t) {
        const float* row = qkv + t * width;
        const float* c = cos_table + (int64_t)positions[t] * head_dim;
        const float* s = sin_table + (int64_t)positions[t] * head_dim;
        const int64_t slot = slots[t];
        /* head h's row of the slot: block * kv_heads * page + h * page + offset, times head_dim */
        const int64_t row_base =
            slot < 0 ? 0 : ((slot / page) * kv_heads * page + slot % page) * head_dim;
        for (int64_t h = 0; h < heads + kv_heads; ++h) {
            if (h >= heads && slot < 0) break;
            const float* x = row + h * head_dim;
            const float* w = qk_weight + h * head_dim;
            float inv_rms = 1.0f / sqrtf(sum_of_squares(x, head_dim) / (float)head_dim + eps);
            for (int64_t j = 0; j < head_dim; ++j) normed[j] = x[j] * inv_rms * w[j];
            float* dst = h < heads ? q_out + (t * heads + h) * head_dim : rotated;
            for (int64_t j = 0; j < half; ++j) dst[j] = normed[j] * c[j] + normed[j + half] * s[j];
            for (int64_t j = half; j < head_dim; ++j)
                dst[j] = normed[j] * c[j] + normed[j - half] * s[j];
            if (h >= heads)
                store_row(k_pool, row_base + (h - heads) * page * head_dim, rotated, head_dim,
                          bf16);
        }
        if (slot < 0) continue;
        for (int64_t h = 0; h < kv_heads; ++h)
            store_row(v_pool, row_base + h * page * head_dim,
                      row + (heads + kv_heads + h) * head_dim, head_dim, bf16);
    }
}

/* One KV head of one session in the paged pool: key row p at keys + offsets[p], value row p at
 * values + offsets[p] (the K and V pools share the layout; keys/values point at the head's rows
 * of block 0). offsets[p] is (table[p / page] * kv_heads * page + p % page) * head_dim, computed
 * once per call by walking the blocks, so the hot loops do no division; a block's rows of one
 * head are contiguous. */
typedef struct {
    const void* keys;  /* fp32, or bf16 when `bf16` */
    const void* values;
    const int64_t* offsets;
    int64_t bf16;
} KvRows;

/* Row p of a KV head's keys or values, fp32 or bf16 (instantiated per dtype, as above). */
SPECIALIZED const void* kv_row_of(const void* base, const int64_t* offsets, int64_t p,
                                  int64_t bf16) {
    return bf16 ? (const void*)((const bfloat*)base + offsets[p])
                : (const void*)((const float*)base + offsets[p]);
}

static inline const void* kv_row(const void* base, const KvRows* kv, int64_t p) {
    return kv_row_of(base, kv->offsets, p, kv->bf16);
}

/* q [n] . key row [n] for an fp32 or bf16 key. */
static inline float dot_key(const float* q, const void* key, int64_t n, int64_t bf16) {
    return bf16 ? dot_bf16((const bfloat*)key, q, n) : dot(q, (const float*)key, n);
}

/* Software prefetch of the row `PREFETCH_AHEAD` positions on: rows come through an offsets
 * table (blocks are scattered), which the hardware prefetchers cannot follow across blocks. */
#define PREFETCH_AHEAD 8
static inline void prefetch_row(const void* row, int64_t bytes) {
    for (int64_t j = 0; j < bytes; j += 64) __builtin_prefetch((const char*)row + j, 0, 0);
}

static void fill_offsets(const int32_t* table, int64_t page, int64_t block_floats,
                         int64_t head_dim, int64_t length, int64_t* offsets) {
    for (int64_t p = 0, b = 0; p < length; ++b) {
        const int64_t first = (int64_t)table[b] * block_floats;
        for (int64_t i = 0; i < page && p < length; ++i, ++p) offsets[p] = first + i * head_dim;
    }
}

/* The columns [j0, dim) of the accumulate_rows* functions below, one at a time (a head_dim that
 * is not a multiple of their vector width). */
SPECIALIZED void columns_one_by_one(const float* const* weights, int count, const void* values,
                                    const int64_t* offsets, int64_t rows, int64_t j0,
                                    int64_t dim, float* const* dst, const int64_t bf16) {
    for (int64_t j = j0; j < dim; ++j)
        for (int i = 0; i < count; ++i) {
            float total = 0.0f;
            for (int64_t p = 0; p < rows; ++p)
                total += weights[i][p] * value_any(kv_row_of(values, offsets, p, bf16), j, bf16);
            dst[i][j] = total;
        }
}

/* dst[dim] = sum over p < rows of weights[p] * matrix row p [dim]. `prefetch`: the rows are
 * not in cache yet (the first pass over them; later passes find them in L2, where prefetches
 * only cost instructions). */
SPECIALIZED void accumulate_rows_t(const float* weights, const void* values,
                                   const int64_t* offsets, int64_t rows, int64_t dim, float* dst,
                                   int prefetch, const int64_t bf16) {
    const int64_t size = bf16 ? 2 : 4;
    int64_t j0 = 0;
    for (; j0 + 64 <= dim; j0 += 64) {
        v8 acc[8] = {{0}};
        for (int64_t p = 0; p < rows; ++p) {
            if (prefetch && p + PREFETCH_AHEAD < rows)
                prefetch_row((const char*)kv_row_of(values, offsets, p + PREFETCH_AHEAD, bf16) + j0 * size,
                             64 * size);
            const void* row = kv_row_of(values, offsets, p, bf16);
            for (int k = 0; k < 8; ++k) acc[k] += weights[p] * load8_any(row, j0 + 8 * k, bf16);
        }
        memcpy(dst + j0, acc, sizeof acc);
    }
    for (; j0 + 8 <= dim; j0 += 8) {
        v8 acc = {0};
        for (int64_t p = 0; p < rows; ++p)
            acc += weights[p] * load8_any(kv_row_of(values, offsets, p, bf16), j0, bf16);
        memcpy(dst + j0, &acc, sizeof acc);
    }
    for (int64_t j = j0; j < dim; ++j) {
        float total = 0.0f;
        for (int64_t p = 0; p < rows; ++p)
            total += weights[p] * value_any(kv_row_of(values, offsets, p, bf16), j, bf16);
        dst[j] = total;
    }
}

/* dst_i[dim] = sum over p < rows of weights_i[p] * matrix row p [dim] for four rows i at once,
 * 16 columns at a time in eight vector accumulators: each matrix load feeds four FMAs (one row
 * at a time streams the matrix from L2 once per row, and L2 cannot feed an FMA per load). */
SPECIALIZED void accumulate_rows4_t(const float* const* weights, const void* values,
                                    const int64_t* offsets, int64_t rows, int64_t dim,
                                    float* const* dst, int prefetch, const int64_t bf16) {
    const float *w0 = weights[0], *w1 = weights[1], *w2 = weights[2], *w3 = weights[3];
    const int64_t size = bf16 ? 2 : 4;
    int64_t j0 = 0;
    for (; j0 + 16 <= dim; j0 += 16) {
        v8 a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0}, c0 = {0}, c1 = {0}, d0 = {0}, d1 = {0};
        for (int64_t p = 0; p < rows; ++p) {
            if (prefetch && j0 == 0 && p + PREFETCH_AHEAD < rows)
                prefetch_row(kv_row_of(values, offsets, p + PREFETCH_AHEAD, bf16), dim * size);
            const void* row = kv_row_of(values, offsets, p, bf16);
            const v8 lo = load8_any(row, j0, bf16), hi = load8_any(row, j0 + 8, bf16);
            a0 += w0[p] * lo; a1 += w0[p] * hi;
            b0 += w1[p] * lo; b1 += w1[p] * hi;
            c0 += w2[p] * lo; c1 += w2[p] * hi;
            d0 += w3[p] * lo; d1 += w3[p] * hi;
        }
        memcpy(dst[0] + j0, &a0, sizeof a0); memcpy(dst[0] + j0 + 8, &a1, sizeof a1);
        memcpy(dst[1] + j0, &b0, sizeof b0); memcpy(dst[1] + j0 + 8, &b1, sizeof b1);
        memcpy(dst[2] + j0, &c0, sizeof c0); memcpy(dst[2] + j0 + 8, &c1, sizeof c1);
        memcpy(dst[3] + j0, &d0, sizeof d0); memcpy(dst[3] + j0 + 8, &d1, sizeof d1);
    }
    columns_one_by_one(weights, 4, values, offsets, rows, j0, dim, dst, bf16);
}

/* dst_i[dim] = sum over p < rows of weights_i[p] * matrix row p [dim] for two rows i at once,
 * 32 columns at a time in eight vector accumulators: the matrix is read once for both (one row
 * at a time read it twice, the second time from L2, or from memory when a long context's values
 * outgrow L2). */
SPECIALIZED void accumulate_rows2_t(const float* const* weights, const void* values,
                                    const int64_t* offsets, int64_t rows, int64_t dim,
                                    float* const* dst, int prefetch, const int64_t bf16) {
    const float *w0 = weights[0], *w1 = weights[1];
    const int64_t size = bf16 ? 2 : 4;
    int64_t j0 = 0;
    for (; j0 + 32 <= dim; j0 += 32) {
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        for (int64_t p = 0; p < rows; ++p) {
            if (prefetch && j0 == 0 && p + PREFETCH_AHEAD < rows)
                prefetch_row(kv_row_of(values, offsets, p + PREFETCH_AHEAD, bf16), dim * size);
            const void* row = kv_row_of(values, offsets, p, bf16);
            const v8 r0 = load8_any(row, j0, bf16), r1 = load8_any(row, j0 + 8, bf16);
            const v8 r2 = load8_any(row, j0 + 16, bf16), r3 = load8_any(row, j0 + 24, bf16);
            a0 += w0[p] * r0; a1 += w0[p] * r1; a2 += w0[p] * r2; a3 += w0[p] * r3;
            b0 += w1[p] * r0; b1 += w1[p] * r1; b2 += w1[p] * r2; b3 += w1[p] * r3;
        }
        memcpy(dst[0] + j0, &a0, sizeof a0); memcpy(dst[0] + j0 + 8, &a1, sizeof a1);
        memcpy(dst[0] + j0 + 16, &a2, sizeof a2); memcpy(dst[0] + j0 + 24, &a3, sizeof a3);
        memcpy(dst[1] + j0, &b0, sizeof b0); memcpy(dst[1] + j0 + 8, &b1, sizeof b1);
        memcpy(dst[1] + j0 + 16, &b2, sizeof b2); memcpy(dst[1] + j0 + 24, &b3, sizeof b3);
    }
    for (; j0 + 8 <= dim; j0 += 8) {
        v8 a = {0}, b = {0};
        for (int64_t p = 0; p < rows; ++p) {
            const v8 r = load8_any(kv_row_of(values, offsets, p, bf16), j0, bf16);
            a += w0[p] * r;
            b += w1[p] * r;
        }
        memcpy(dst[0] + j0, &a, sizeof a);
        memcpy(dst[1] + j0, &b, sizeof b);
    }
    columns_one_by_one(weights, 2, values, offsets, rows, j0, dim, dst, bf16);
}

/* `count` (1, 2 or 4) query rows' weights . values through the kernel for that many rows, in
 * the pool's dtype. */
static void accumulate_group(const float* const* weights, int count, const KvRows* kv,
                             int64_t rows, int64_t dim, float* const* dst, int prefetch) {
    const void* values = kv->values;
    const int64_t* offsets = kv->offsets;
    if (count == 4)
        kv->bf16 ? accumulate_rows4_t(weights, values, offsets, rows, dim, dst, prefetch, 1)
                 : accumulate_rows4_t(weights, values, offsets, rows, dim, dst, prefetch, 0);
    else if (count == 2)
        kv->bf16 ? accumulate_rows2_t(weights, values, offsets, rows, dim, dst, prefetch, 1)
                 : accumulate_rows2_t(weights, values, offsets, rows, dim, dst, prefetch, 0);
    else
        kv->bf16 ? accumulate_rows_t(weights[0], values, offsets, rows, dim, dst[0], prefetch, 1)
                 : accumulate_rows_t(weights[0], values, offsets, rows, dim, dst[0], prefetch, 0);
}

/* One KV head's attention for all its query rows (the `group` q heads sharing it, times n_new),
 * reading each key and value row once. scores: [n_new * group, start + n_new]. */
/* scores[r * total + p] for the keys p <= start, which every query row r sees (row r: new token
 * r / group, q head kv_head * group + r % group): two keys times four rows per pass in eight
 * vector accumulators, so a key row is loaded once per four rows and a query row once per two
 * keys (one dot product at a time loads both for every score). */
SPECIALIZED void scores_of_shared_keys_t(const float* q, const KvRows* kv, float* scores,
                                         int64_t kv_head, int64_t start, int64_t n_new,
                                         int64_t heads, int64_t group, int64_t head_dim,
                                         const int64_t bf16) {
    const int64_t total = start + n_new, rows = n_new * group;
    const int64_t blocked = rows & ~(int64_t)3;  /* rows taken four at a time */
    const float* query[rows];
    for (int64_t r = 0; r < rows; ++r)
        query[r] = q + ((r / group) * heads + kv_head * group + r % group) * head_dim;
    const int64_t bytes = head_dim * (bf16 ? 2 : 4);
    /* Four rows at a time, two keys per pass (dot_2x4: each key load feeds four FMAs). */
    for (int64_t p = 0; blocked > 0 && p <= start; p += 2) {
        if (p + PREFETCH_AHEAD + 1 < total) {
            prefetch_row(kv_row_of(kv->keys, kv->offsets, p + PREFETCH_AHEAD, bf16), bytes);
            prefetch_row(kv_row_of(kv->keys, kv->offsets, p + PREFETCH_AHEAD + 1, bf16), bytes);
        }
        const int pair = p + 1 <= start;
        const void* k0 = kv_row_of(kv->keys, kv->offsets, p, bf16);
        const void* k1 = pair ? kv_row_of(kv->keys, kv->offsets, p + 1, bf16) : k0;
        for (int64_t r = 0; r < blocked; r += 4) {
            float first[4], second[4];
            if (bf16)
                dot_2x4_bf16((const bfloat*)k0, (const bfloat*)k1, query + r, head_dim, first,
                             second);
            else
                dot_2x4((const float*)k0, (const float*)k1, query + r, head_dim, first, second);
            for (int i = 0; i < 4; ++i) {
                scores[(r + i) * total + p] = first[i];
                if (pair) scores[(r + i) * total + p + 1] = second[i];
            }
        }
    }
    /* The other rows (every row of one token when the group is under four), four keys per pass
     * (dot_4x1: eight FMA chains where one key at a time has two). */
    for (int64_t p = 0; blocked < rows && p <= start; p += 4) {
        if (blocked == 0 && p + PREFETCH_AHEAD + 3 < total)
            for (int64_t i = 0; i < 4; ++i)
                prefetch_row(kv_row_of(kv->keys, kv->offsets, p + PREFETCH_AHEAD + i, bf16),
                             bytes);
        if (p + 3 <= start) {
            const void* const keys[4] = {
                kv_row_of(kv->keys, kv->offsets, p, bf16),
                kv_row_of(kv->keys, kv->offsets, p + 1, bf16),
                kv_row_of(kv->keys, kv->offsets, p + 2, bf16),
                kv_row_of(kv->keys, kv->offsets, p + 3, bf16)};
            for (int64_t r = blocked; r < rows; ++r)
                dot_4x1_t(keys, query[r], head_dim, scores + r * total + p, bf16);
        } else {
            for (int64_t key = p; key <= start; ++key)
                for (int64_t r = blocked; r < rows; ++r)
                    scores[r * total + key] =
                        dot_key(query[r], kv_row_of(kv->keys, kv->offsets, key, bf16), head_dim,
                                bf16);
        }
    }
}

static void scores_of_shared_keys(const float* q, const KvRows* kv, float* scores,
                                  int64_t kv_head, int64_t start, int64_t n_new, int64_t heads,
                                  int64_t group, int64_t head_dim) {
    if (kv->bf16)
        scores_of_shared_keys_t(q, kv, scores, kv_head, start, n_new, heads, group, head_dim, 1);
    else
        scores_of_shared_keys_t(q, kv, scores, kv_head, start, n_new, heads, group, head_dim, 0);
}

static void attend_kv_head(const float* q, const KvRows* kv, float* scores, float* out,
                           int64_t kv_head, int64_t start, int64_t n_new, int64_t heads,
                           int64_t group, int64_t head_dim) {
    const int64_t total = start + n_new;
    scores_of_shared_keys(q, kv, scores, kv_head, start, n_new, heads, group, head_dim);
    for (int64_t p = start + 1; p < total; ++p) {  /* the new keys: causal, p <= start + t */
        if (p + PREFETCH_AHEAD < total)
            prefetch_row(kv_row(kv->keys, kv, p + PREFETCH_AHEAD), head_dim * (kv->bf16 ? 2 : 4));
        const void* key = kv_row(kv->keys, kv, p);
        for (int64_t t = (p > start ? p - start : 0); t < n_new; ++t) {  /* causal: p <= start+t */
            for (int64_t g = 0; g < group; ++g) {
                const float* query = q + (t * heads + kv_head * group + g) * head_dim;
                scores[(t * group + g) * total + p] = dot_key(query, key, head_dim, kv->bf16);
            }
        }
    }
    for (int64_t t = 0; t < n_new; ++t) {
        const int64_t length = start + t + 1;
        for (int64_t g = 0; g < group; ++g) {
            float* row = scores + (t * group + g) * total;
            const float peak = max_of(row, length);
#pragma omp simd
            for (int64_t p = 0; p < length; ++p) row[p] = exp_approx(row[p] - peak);
            const float inv_sum = 1.0f / sum_of(row, length);
#pragma omp simd
            for (int64_t p = 0; p < length; ++p) row[p] *= inv_sum;
            for (int64_t p = length; p < total; ++p) row[p] = 0.0f;  /* keys it must not see */
        }
    }
    /* out = weights . values: rows four at a time over every key (a hidden key weighs 0), then
     * two, so the values are read once per group; a last single row over the keys it sees */
    const int64_t rows = n_new * group;
    for (int64_t r = 0; r < rows;) {
        const int count = rows - r >= 4 ? 4 : rows - r >= 2 ? 2 : 1;
        const float* weights[4];
        float* dst[4];
        for (int i = 0; i < count; ++i) {
            const int64_t t = (r + i) / group, g = (r + i) % group;
            weights[i] = scores + (r + i) * total;
            dst[i] = out + (t * heads + kv_head * group + g) * head_dim;
        }
        const int64_t keys = count == 1 ? start + r / group + 1 : total;
        accumulate_group(weights, count, kv, keys, head_dim, dst, r == 0);
        r += count;
    }
}

/* A per-thread scratch of at least `bytes`, kept between calls (grown, never shrunk): malloc and
 * free of the scores at every call cost page faults whenever glibc trims its arena. NULL if it
 * cannot be allocated. */
static __thread void* tls_scratch = NULL;
static __thread size_t tls_capacity = 0;

static void* thread_scratch(size_t bytes) {
    if (bytes > tls_capacity) {
        free(tls_scratch);
        const size_t grown = bytes > 2 * tls_capacity ? bytes : 2 * tls_capacity;
        tls_scratch = malloc(grown);
        tls_capacity = tls_scratch != NULL ? grown : 0;
    }
    return tls_scratch;
}

/* Causal grouped-query attention for many sessions at once, their K/V in the paged pool
 * [blocks, kv_heads, page, head_dim] (position p in block block_tables[s][p / page]). Session s owns
 * the packed query rows q_start[s] .. + q_len[s] of q [rows, heads, head_dim] (pre-scaled) at
 * positions ctx_len[s] - q_len[s] .. and writes the same rows of out [rows, heads * head_dim];
 * q_len 0 skips a session. The (session, KV head) pairs are split over the pool's threads when
 * there is enough work to pay for the fork. Returns 0, or -1 if a scores' scratch could not be
 * allocated (out is then unspecified). */
/* One (session, KV head) pair of qg_attend_paged; returns 0, or -1 without scratch. */
static int attend_pair(const float* q, const void* k_pool, const void* v_pool,
                       const int32_t* table, int64_t page, int64_t q_first, int64_t n_new,
                       int64_t total, int64_t h, int64_t heads, int64_t kv_heads,
                       int64_t head_dim, float* out, int64_t bf16) {
    const int64_t group = heads / kv_heads, row_width = heads * head_dim;
    if (n_new == 0) return 0;
    /* one scratch: the scores, then the rows' offsets */
    const int64_t count = n_new * group * total + (n_new * group * total) % 2;  /* even */
    float* scores = thread_scratch((size_t)count * sizeof(float) +
                                   (size_t)total * sizeof(int64_t));
    if (scores == NULL) return -1;
    int64_t* offsets = (int64_t*)(scores + count);  /* 8-byte aligned: count is even */
    fill_offsets(table, page, kv_heads * page * head_dim, head_dim, total, offsets);
    const int64_t head = h * page * head_dim * (bf16 ? 2 : 4);  /* bytes to the head's rows */
    const KvRows kv = {(const char*)k_pool + head, (const char*)v_pool + head, offsets, bf16};
    attend_kv_head(q + q_first * row_width, &kv, scores, out + q_first * row_width, h,
                   total - n_new, n_new, heads, group, head_dim);
    return 0;
}

typedef struct {
    const float* q;
    const void *k_pool, *v_pool;
    const int32_t *block_tables, *q_start, *q_len, *ctx_len;
    int64_t table_stride, page, heads, kv_heads, head_dim, bf16;
    float* out;
    atomic_int failed;
} AttendJob;

/* Pairs [begin, end) of (session, KV head), session-major. */
static void attend_pairs(void* context, int64_t begin, int64_t end) {
    AttendJob* job = context;
    for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t s = pair / job->kv_heads, h = pair % job->kv_heads;
        if (attend_pair(job->q, job->k_pool, job->v_pool, job->block_tables + s * job->table_stride,
                        job->page, job->q_start[s], job->q_len[s], job->ctx_len[s], h, job->heads,
                        job->kv_heads, job->head_dim, job->out, job->bf16) != 0)
            atomic_store(&job->failed, 1);
    }
}

int qg_attend_paged(const float* q, const void* k_pool, const void* v_pool,
                    const int32_t* block_tables, int64_t table_stride, int64_t page,
                    const int32_t* q_start, const int32_t* q_len, const int32_t* ctx_len,
                    int64_t sessions, int64_t heads, int64_t kv_heads, int64_t head_dim,
                    float* out, int64_t bf16) {
    int64_t work = 0;  /* query-key dot products */
    for (int64_t s = 0; s < sessions; ++s) work += (int64_t)q_len[s] * ctx_len[s] * heads;
    AttendJob job = {q, k_pool, v_pool, block_tables, q_start, q_len, ctx_len, table_stride, page,
                     heads, kv_heads, head_dim, bf16, out, 0};
    const int64_t pairs = sessions * kv_heads;
    if (work >= 1024)  /* one pair per claim: contexts differ, pairs go to whoever is free */
        parallel_for(attend_pairs, &job, pairs, 1);
    else
        attend_pairs(&job, 0, pairs);
    return atomic_load(&job.failed) ? -1 : 0;
}

/* SwiGLU's activation: out = silu(gate) * up for gate_up = [gate | up] per row. */
void qg_silu_mul(const float* gate_up, float* out, int64_t rows, int64_t inter) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* gate = gate_up + r * 2 * inter;
        const float* up = gate + inter;
        float* dst = out + r * inter;
#pragma omp simd
        for (int64_t j = 0; j < inter; ++j)
            dst[j] = gate[j] / (1.0f + exp_approx(-gate[j])) * up[j];
    }
}

typedef struct {
    const void* w; /* fp32, or bf16 when `bf16` */
    const float *x, *residual;
    float* y;
    int64_t cols, bf16;
    const bfloat* xb; /* x rounded to bf16 for the bf16 dot instruction, else NULL */
} GemvJob;

static float gemv_dot(const GemvJob* job, int64_t r) {
#if QG_BF16_DOT
    if (job->xb != NULL) return dot_pairs_row((const bfloat*)job->w + r * job->cols, job->xb,
                                              job->cols);
#endif
    return job->bf16 ? dot_bf16((const bfloat*)job->w + r * job->cols, job->x, job->cols)
                     : dot((const float*)job->w + r * job->cols, job->x, job->cols);
}

static void gemv_rows(void* context, int64_t begin, int64_t end) {
    const GemvJob* job = context;
    for (int64_t r = begin; r < end; ++r) {
        const float value = gemv_dot(job, r);
        job->y[r] = job->residual != NULL ? job->residual[r] + value : value;
    }
}

/* y[rows] = W[rows, cols] x (+ residual[rows] when not NULL), W row-major: one dot product per
 * output row, the rows split over the pool in chunks of about 8K weights. For one token this
 * reads each weight once, like the BLAS GEMM it replaces, without a Python round trip per
 * projection. */
static void gemv(const void* w, const float* x, const float* residual, float* y, int64_t rows,
                 int64_t cols, int64_t bf16) {
    GemvJob job = {w, x, residual, y, cols, bf16, NULL};
    if (bf16 && QG_BF16_DOT) job.xb = activations_bf16(x, cols);  /* NULL: widened, as below */
    const int64_t grain = cols >= 8192 ? 1 : 8192 / cols;
    if (rows * cols >= 32768)
        parallel_for(gemv_rows, &job, rows, grain);
    else
        gemv_rows(&job, 0, rows);
}

typedef struct {
    const float* x;
    const void* w; /* fp32, or bf16 when `bf16` */
    const float* residual;
    float* y;
    int64_t rows, cols, out, bf16;
    const bfloat* xb; /* x rounded to bf16 for the bf16 dot instruction, else NULL */
} GemmJob;

/* y[m, n] (+= residual[m, n]) = dot(x[m], w[n]) for the weight rows n in [begin, end): two weight
 * rows times four x rows per pass, eight vector accumulators, so each weight row is read once
 * per four x rows and each x load feeds two FMAs (three weight rows spill on AVX2). */
static inline float finish(const GemmJob* job, int64_t at, float value) {
    return job->residual != NULL ? job->residual[at] + value : value;
}

#define GEMM_PREFETCH_ROWS 8

/* Weight rows w0, w1 times x rows m..m+3 in the job's arithmetic: fp32, bf16 weights widened, or
 * the bf16 dot instruction over x rounded to bf16 (job->xb). */
static inline void gemm_2x4(const GemmJob* job, const char* w0, const char* w1, int64_t m,
                            float* first, float* second) {
    const int64_t cols = job->cols;
#if QG_BF16_DOT
    if (job->xb != NULL) {
        const bfloat* x0 = job->xb + m * cols;
        const bfloat* const x[4] = {x0, x0 + cols, x0 + 2 * cols, x0 + 3 * cols};
        dot_pairs_2x4((const bfloat*)w0, (const bfloat*)w1, x, cols, first, second);
        return;
    }
#endif
    const float* x0 = job->x + m * cols;
    const float* const x[4] = {x0, x0 + cols, x0 + 2 * cols, x0 + 3 * cols};
    if (job->bf16)
        dot_2x4_bf16((const bfloat*)w0, (const bfloat*)w1, x, cols, first, second);
    else
        dot_2x4((const float*)w0, (const float*)w1, x, cols, first, second);
}

/* Weight row w times x row r, in the job's arithmetic (as gemm_2x4). */
static inline float gemm_dot(const GemmJob* job, const char* w, int64_t r) {
    const int64_t cols = job->cols;
#if QG_BF16_DOT
    if (job->xb != NULL) return dot_pairs_row((const bfloat*)w, job->xb + r * cols, cols);
#endif
    const float* x = job->x + r * cols;
    return job->bf16 ? dot_bf16((const bfloat*)w, x, cols) : dot((const float*)w, x, cols);
}

static void gemm_weight_rows(void* context, int64_t begin, int64_t end) {
    const GemmJob* job = context;
    const int64_t cols = job->cols, out = job->out, rows = job->rows;
    const size_t size = job->bf16 ? sizeof(bfloat) : sizeof(float);
    /* x rows four at a time outside, this chunk's weight rows inside: the four x rows stay in L1
     * while the chunk's weights stream from L2 (the other order streamed every x row from L2 for
     * each weight pair, at the limit of what L2 feeds the FMAs). */
    int64_t m = 0;
    for (; m + 4 <= rows; m += 4) {
        for (int64_t n = begin; n < end; n += 2) {
            const int pair = n + 1 < end;
            const char* w0 = (const char*)job->w + n * cols * size;
            const char* w1 = pair ? w0 + cols * size : w0;
            /* The first pass over the chunk streams its weights from memory (a batched step's
             * K/V evict them between layers): fetch eight rows ahead, more misses in flight than
             * the hardware prefetcher keeps (M = 32 from memory: -15..-28%, noisy box). */
            if (m == 0 && n + GEMM_PREFETCH_ROWS + 2 <= end)
                prefetch_row(w0 + GEMM_PREFETCH_ROWS * cols * size, 2 * cols * size);
            float first[4], second[4];
            gemm_2x4(job, w0, w1, m, first, second);
            for (int i = 0; i < 4; ++i) {
                const int64_t at = (m + i) * out + n;
                job->y[at] = finish(job, at, first[i]);
                if (pair) job->y[at + 1] = finish(job, at + 1, second[i]);
            }
        }
    }
    for (int64_t n = begin; m < rows && n < end; n += 2) {
        const int pair = n + 1 < end;
        const char* w0 = (const char*)job->w + n * cols * size;
        const char* w1 = pair ? w0 + cols * size : w0;
        for (int64_t r = m; r < rows; ++r) {
            const int64_t at = r * out + n;
            job->y[at] = finish(job, at, gemm_dot(job, w0, r));
            if (pair) job->y[at + 1] = finish(job, at + 1, gemm_dot(job, w1, r));
        }
    }
}

/* y[rows, out] = x[rows, cols] W^T (+ residual[rows, out] when not NULL), W [out, cols]
 * row-major (nn.Linear's layout): the weight rows split over the pool in even chunks of about
 * 16K weights each. For the few rows of a decode step (up to a few dozen) this streams each
 * weight once, as a BLAS GEMM would, and keeps the threads in our pool (see "Threads"). */
static void gemm(const float* x, const void* w, const float* residual, float* y, int64_t rows,
                 int64_t cols, int64_t out, int64_t bf16) {
    GemmJob job = {x, w, residual, y, rows, cols, out, bf16, NULL};
    if (bf16 && QG_BF16_DOT) job.xb = activations_bf16(x, rows * cols);  /* NULL: widened */
    int64_t grain = cols >= 16384 ? 2 : 16384 / cols;
    grain += grain & 1;  /* even: the weight rows go in pairs */
    if (rows * cols * out >= 65536)
        parallel_for(gemm_weight_rows, &job, out, grain);
    else
        gemm_weight_rows(&job, 0, out);
}

void qg_gemm(const float* x, const float* w, const float* residual, float* y, int64_t rows,
             int64_t cols, int64_t out) {
    gemm(x, w, residual, y, rows, cols, out, 0);
}

/* qg_gemm with W in bf16 (widened on load; x, residual and y fp32). */
void qg_gemm_bf16(const float* x, const bfloat* w, const float* residual, float* y, int64_t rows,
                  int64_t cols, int64_t out) {
    gemm(x, w, residual, y, rows, cols, out, 1);
}

/* Softmax of x[0..n) in place, fp32 with the exact expf (a guard's probabilities are what it
 * returns): the largest value subtracted first, as torch.softmax does. */
static void softmax_in_place(float* x, int64_t n) {
    const float peak = max_of(x, n);
    float total = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
        x[j] = expf(x[j] - peak);
        total += x[j];
    }
    const float inv = 1.0f / total;
    for (int64_t j = 0; j < n; ++j) x[j] *= inv;
}

/* A guard head over `rows` final hidden states [rows, hidden] (fp32): inner = pre_w . h
 * ([inner_size, hidden] weight), RMSNorm with norm_w (fp32), logits = scores_w . inner ([out,
 * inner_size]: the risk rows, then the category rows), then a softmax over the first `risk`
 * columns and one over the rest, into probs [rows, out]. The two weights are fp32, or bf16 when
 * `bf16` (as the projections: widened, or on the bf16 dot instruction). inner and normed:
 * [rows, inner_size] scratch. */
void qg_guard_head(const float* hidden, const void* pre_w, const float* norm_w,
                   const void* scores_w, float* inner, float* normed, float* probs,
                   int64_t rows, int64_t hidden_size, int64_t inner_size, int64_t out,
                   int64_t risk, float eps, int64_t bf16) {
    gemm(hidden, pre_w, NULL, inner, rows, hidden_size, inner_size, bf16);
    qg_rms_norm(inner, norm_w, normed, rows, inner_size, eps);
    gemm(normed, scores_w, NULL, probs, rows, inner_size, out, bf16);
    for (int64_t r = 0; r < rows; ++r) {
        softmax_in_place(probs + r * out, risk);
        softmax_in_place(probs + r * out + risk, out - risk);
    }
}

/* One whole decoder layer for a single new token of one session at `position`, x [hidden]
 * updated in place: the composition of the functions above with the projections as gemv; K/V go
 * to the position's pool slot through the session's block table. scratch holds
 * 2 * hidden + (heads + 2 * kv_heads) * head_dim + 2 * heads * head_dim + 3 * inter floats.
 * The four projection weights and the K/V pools are fp32, or bf16 when `bf16` (the norms,
 * tables and activations stay fp32).
 * Returns 0, or -1 if the attention's scratch could not be allocated (x is then unchanged). */
int qg_decode_layer(float* x, const float* input_norm, const void* qkv_weight,
                    const float* qk_weight, const float* cos_table, const float* sin_table,
                    void* k_pool, void* v_pool, const int32_t* table, int64_t page,
                    int64_t position, const void* o_weight, const float* post_norm,
                    const void* gate_up_weight, const void* down_weight, int64_t heads,
                    int64_t kv_heads, int64_t head_dim, int64_t hidden, int64_t inter, float eps,
                    float* scratch, int64_t bf16) {
    const int64_t qkv_width = (heads + 2 * kv_heads) * head_dim, q_width = heads * head_dim;
    float* normed = scratch;
    float* qkv = normed + hidden;
    float* q = qkv + qkv_width;
    float* attended = q + q_width;
    float* gate_up = attended + q_width;
    float* act = gate_up + 2 * inter;
    float* residual = act + inter;  /* x after attention */
    const int32_t where = (int32_t)position;
    const int32_t slot = (int32_t)(table[position / page] * page + position % page);
    const int32_t first = 0, one = 1, length = (int32_t)(position + 1);
    qg_rms_norm(x, input_norm, normed, 1, hidden, eps);
    gemv(qkv_weight, normed, NULL, qkv, qkv_width, hidden, bf16);
    qg_qk_rope_store(qkv, qk_weight, cos_table, sin_table, &where, &slot, q, k_pool, v_pool, page,
                     1, heads, kv_heads, head_dim, eps, bf16);
    if (qg_attend_paged(q, k_pool, v_pool, table, 0, page, &first, &one, &length, 1, heads,
                        kv_heads, head_dim, attended, bf16) != 0)
        return -1;
    gemv(o_weight, attended, x, residual, hidden, q_width, bf16);
    qg_rms_norm(residual, post_norm, normed, 1, hidden, eps);
    gemv(gate_up_weight, normed, NULL, gate_up, 2 * inter, hidden, bf16);
    qg_silu_mul(gate_up, act, 1, inter);
    gemv(down_weight, act, residual, x, hidden, inter, bf16);
    return 0;
}
