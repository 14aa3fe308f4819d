/*
 * A stand-in for libcuda.so.1: the CUDA driver API subset ztgpu's GPU wiper
 * calls (ztgpu/gpu/cuda.py), implemented on host memory, so that the ctypes
 * bindings, the error mapping, the chunked allocation and the per-GPU
 * threads run for real where no GPU is. Built by the tests and
 * bench/gpu_wipe.py (ztgpu.testing.stand_in_cuda); never installed.
 *
 * What it imitates of a real GPU, because the wiper must cope with it:
 *   - a context costs memory (ZTGPU_STANDIN_CTX_MIB, default 24), and
 *     cuMemGetInfo reports more free memory than can be allocated (by
 *     ZTGPU_STANDIN_OVERSTATE_MIB, default 35, as seen on real GPUs);
 *   - allocations come in 2 MiB pages;
 *   - memory handed out holds what the last user left: zeros, as after the
 *     driver's scrub, or with ZTGPU_STANDIN_LEFTOVERS=1 a marker pattern;
 *   - kernels are PTX loaded with cuModuleLoadData: the verify kernel
 *     (entry ztgpu_verify) runs here as C with the same semantics.
 *
 * GPUs: ZTGPU_STANDIN_GPUS (default 2) of ZTGPU_STANDIN_MEM_MIB (default
 * 256) each, at the PCI buses the test harness's simulated GPUs declare.
 * MIG: ZTGPU_STANDIN_MIG="MIG-uuid@gpu,..." puts those GPUs in MIG mode with
 * the instances listed (each with an equal share of its GPU's memory). As
 * with the real driver, a process sees one MIG device of a MIG GPU: the
 * first, or the one CUDA_VISIBLE_DEVICES names (a list of MIG UUIDs and
 * ordinals; several MIG devices then all sit at their GPU's bus). Faults (ZTGPU_STANDIN_FAULT, comma-separated, each optionally
 * "name@ordinal" to hit one GPU): init (no device), alloc (nothing can be
 * allocated), stuck (one word of the first allocation keeps its old value
 * whatever is written: a wipe that fails verification), launch (kernels
 * fail), slow (memset sleeps 50 ms per call), hang (memset never returns:
 * an agent that dies in the middle of a wipe); "name@MIG-uuid" hits the
 * process that CUDA_VISIBLE_DEVICES limits to that MIG device.
 */

#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct ctx *CUcontext;
typedef struct module *CUmodule;
typedef struct function *CUfunction;
typedef void *CUstream;

enum {
    SUCCESS = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, NOT_INITIALIZED = 3,
    NO_DEVICE = 100, INVALID_DEVICE = 101, INVALID_IMAGE = 200, INVALID_CONTEXT = 201,
    NOT_FOUND = 500, LAUNCH_FAILED = 719,
};

#define PAGE (2ull << 20)
#define MAX_GPUS 16
#define MAX_ALLOCS 65536

struct alloc {
    CUdeviceptr ptr;
    size_t size;
    int gpu;
};

struct ctx {
    int gpu;
    int alive;
};

struct module {
    int ok;
};

struct function {
    int verify;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int initialised;
static size_t used[MAX_GPUS];
static int contexts[MAX_GPUS];
static struct alloc allocs[MAX_ALLOCS];
static int first_alloc_done[MAX_GPUS];
static uint32_t *stuck_word[MAX_GPUS];
static uint32_t stuck_value = 0x5EC2E7u;
static struct function verify_fn = {1};
static __thread struct ctx *current;

static long env_long(const char *name, long fallback) {
    const char *v = getenv(name);
    return v && *v ? strtol(v, NULL, 10) : fallback;
}

static int physical_gpus(void) {
    long n = env_long("ZTGPU_STANDIN_GPUS", 2);
    return n < 0 ? 0 : n > MAX_GPUS ? MAX_GPUS : (int)n;
}

static size_t gpu_mem(void) { return (size_t)env_long("ZTGPU_STANDIN_MEM_MIB", 256) << 20; }

/* The devices this process sees (set by cuInit): their GPU and memory. */
static int visible;
static int visible_gpu[MAX_GPUS];
static size_t visible_mem[MAX_GPUS];

/* The MIG instances of `gpu` in ZTGPU_STANDIN_MIG: how many, and the
 * position of `uuid` among them (-1 if not one of them; uuid may be NULL). */
static int mig_instances(int gpu, const char *uuid, size_t uuid_len, int *position) {
    const char *spec = getenv("ZTGPU_STANDIN_MIG");
    int count = 0;
    *position = -1;
    if (spec == NULL) return 0;
    for (const char *p = spec; *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        const char *at = memchr(p, '@', len);
        if (at != NULL && atoi(at + 1) == gpu) {
            if (uuid != NULL && (size_t)(at - p) == uuid_len && strncmp(p, uuid, uuid_len) == 0)
                *position = count;
            count++;
        }
        if (!end) break;
        p = end + 1;
    }
    return count;
}

static void see(int gpu, int instances) {
    if (visible >= MAX_GPUS) return;
    visible_gpu[visible] = gpu;
    visible_mem[visible] = instances ? gpu_mem() / (size_t)instances / PAGE * PAGE : gpu_mem();
    visible++;
}

/* CUDA_VISIBLE_DEVICES token `tok` (MIG UUID or ordinal) as a device. */
static void see_token(const char *tok, size_t len) {
    char buf[32];
    int position;
    if (len > 4 && strncmp(tok, "MIG-", 4) == 0) {
        for (int gpu = 0; gpu < physical_gpus(); gpu++) {
            int n = mig_instances(gpu, tok, len, &position);
            if (position >= 0) { see(gpu, n); return; }
        }
        return; /* an unknown MIG device: not visible */
    }
    if (len == 0 || len >= sizeof buf) return;
    memcpy(buf, tok, len);
    buf[len] = 0;
    int gpu = atoi(buf);
    if (gpu >= 0 && gpu < physical_gpus())
        see(gpu, mig_instances(gpu, NULL, 0, &position));
}

static void enumerate(void) {
    const char *list = getenv("CUDA_VISIBLE_DEVICES");
    int position;
    visible = 0;
    if (list == NULL) {
        for (int gpu = 0; gpu < physical_gpus(); gpu++)
            see(gpu, mig_instances(gpu, NULL, 0, &position));
        return;
    }
    for (const char *p = list; *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        see_token(p, len);
        if (!end) break;
        p = end + 1;
    }
}

static int gpus(void) { return visible; }

static size_t total_mem_of(int dev) { return visible_mem[dev]; }
static size_t ctx_mem(void) { return (size_t)env_long("ZTGPU_STANDIN_CTX_MIB", 24) << 20; }
static size_t overstate(void) { return (size_t)env_long("ZTGPU_STANDIN_OVERSTATE_MIB", 35) << 20; }

/* Whether fault `name` applies to GPU `gpu` (-1: any). */
static int fault(const char *name, int gpu) {
    const char *spec = getenv("ZTGPU_STANDIN_FAULT");
    if (spec == NULL) return 0;
    size_t n = strlen(name);
    for (const char *p = spec; *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len >= n && strncmp(p, name, n) == 0) {
            if (len == n) return 1;
            if (p[n] == '@' && gpu >= 0 && p[n + 1] != 'M' && atoi(p + n + 1) == gpu) return 1;
            /* name@MIG-uuid: in the process that wipes that MIG device */
            const char *only = getenv("CUDA_VISIBLE_DEVICES");
            if (p[n] == '@' && only != NULL && strlen(only) == len - n - 1 &&
                strncmp(p + n + 1, only, len - n - 1) == 0) return 1;
        }
        if (!end) break;
        p = end + 1;
    }
    return 0;
}

CUresult cuInit(unsigned int flags) {
    if (flags != 0) return INVALID_VALUE;
    if (fault("init", -1)) return NO_DEVICE;
    enumerate();
    initialised = 1;
    return SUCCESS;
}

CUresult cuDriverGetVersion(int *version) {
    if (version == NULL) return INVALID_VALUE;
    *version = 12040;
    return SUCCESS;
}

CUresult cuDeviceGetCount(int *count) {
    if (!initialised) return NOT_INITIALIZED;
    if (count == NULL) return INVALID_VALUE;
    *count = gpus();
    return SUCCESS;
}

CUresult cuDeviceGet(CUdevice *dev, int ordinal) {
    if (!initialised) return NOT_INITIALIZED;
    if (dev == NULL) return INVALID_VALUE;
    if (ordinal < 0 || ordinal >= gpus()) return INVALID_DEVICE;
    *dev = ordinal;
    return SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
    if (dev < 0 || dev >= gpus()) return INVALID_DEVICE;
    if (name == NULL || len <= 0) return INVALID_VALUE;
    snprintf(name, (size_t)len, "ztgpu stand-in GPU %d", dev);
    return SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    if (dev < 0 || dev >= gpus()) return INVALID_DEVICE;
    if (bytes == NULL) return INVALID_VALUE;
    *bytes = total_mem_of(dev);
    return SUCCESS;
}

CUresult cuDeviceGetPCIBusId(char *bus, int len, CUdevice dev) {
    if (dev < 0 || dev >= gpus()) return INVALID_DEVICE;
    if (bus == NULL || len <= 0) return INVALID_VALUE;
    /* The buses the test harness's simulated GPUs declare; MIG devices sit
     * at their GPU's. */
    snprintf(bus, (size_t)len, "0000:%02X:00.0", 0x17 + visible_gpu[dev] * 0x10);
    return SUCCESS;
}

CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice dev) {
    if (dev < 0 || dev >= gpus()) return INVALID_DEVICE;
    if (value == NULL) return INVALID_VALUE;
    *value = attribute == 16 ? 4 : 0; /* MULTIPROCESSOR_COUNT */
    return SUCCESS;
}

CUresult cuCtxCreate_v2(CUcontext *ctx, unsigned int flags, CUdevice dev) {
    (void)flags;
    if (!initialised) return NOT_INITIALIZED;
    if (ctx == NULL) return INVALID_VALUE;
    if (dev < 0 || dev >= gpus()) return INVALID_DEVICE;
    pthread_mutex_lock(&lock);
    if (used[dev] + ctx_mem() > total_mem_of(dev)) {
        pthread_mutex_unlock(&lock);
        return OUT_OF_MEMORY;
    }
    used[dev] += ctx_mem();
    contexts[dev]++;
    pthread_mutex_unlock(&lock);
    struct ctx *c = calloc(1, sizeof *c);
    if (c == NULL) return OUT_OF_MEMORY;
    c->gpu = dev;
    c->alive = 1;
    *ctx = c;
    current = c;
    return SUCCESS;
}

CUresult cuCtxDestroy_v2(CUcontext ctx) {
    if (ctx == NULL || !ctx->alive) return INVALID_CONTEXT;
    pthread_mutex_lock(&lock);
    used[ctx->gpu] -= ctx_mem();
    contexts[ctx->gpu]--;
    pthread_mutex_unlock(&lock);
    ctx->alive = 0;
    if (current == ctx) current = NULL;
    free(ctx);
    return SUCCESS;
}

CUresult cuCtxSetCurrent(CUcontext ctx) {
    if (ctx != NULL && !ctx->alive) return INVALID_CONTEXT;
    current = ctx;
    return SUCCESS;
}

CUresult cuCtxSynchronize(void) { return current == NULL ? INVALID_CONTEXT : SUCCESS; }

CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
    if (current == NULL) return INVALID_CONTEXT;
    if (free_bytes == NULL || total == NULL) return INVALID_VALUE;
    pthread_mutex_lock(&lock);
    size_t left = total_mem_of(current->gpu) - used[current->gpu];
    pthread_mutex_unlock(&lock);
    *free_bytes = left + overstate();
    *total = total_mem_of(current->gpu);
    return SUCCESS;
}

CUresult cuMemAlloc_v2(CUdeviceptr *ptr, size_t size) {
    if (current == NULL) return INVALID_CONTEXT;
    if (ptr == NULL || size == 0) return INVALID_VALUE;
    int gpu = current->gpu;
    if (fault("alloc", gpu)) return OUT_OF_MEMORY;
    size_t pages = (size + PAGE - 1) / PAGE * PAGE;
    pthread_mutex_lock(&lock);
    int slot = -1;
    for (int i = 0; i < MAX_ALLOCS; i++)
        if (allocs[i].ptr == 0) { slot = i; break; }
    if (slot < 0 || used[gpu] + pages > total_mem_of(gpu)) {
        pthread_mutex_unlock(&lock);
        return OUT_OF_MEMORY;
    }
    used[gpu] += pages;
    allocs[slot].ptr = 1; /* reserved */
    pthread_mutex_unlock(&lock);
    uint32_t *mem = malloc(pages);
    if (mem == NULL) {
        pthread_mutex_lock(&lock);
        used[gpu] -= pages;
        allocs[slot].ptr = 0;
        pthread_mutex_unlock(&lock);
        return OUT_OF_MEMORY;
    }
    uint32_t left = env_long("ZTGPU_STANDIN_LEFTOVERS", 0) ? 0xC0FFEE00u : 0;
    for (size_t i = 0; i < pages / 4; i++)
        mem[i] = left ? left + (uint32_t)(i & 0xff) : 0;
    pthread_mutex_lock(&lock);
    allocs[slot].ptr = (CUdeviceptr)(uintptr_t)mem;
    allocs[slot].size = pages;
    allocs[slot].gpu = gpu;
    if (!first_alloc_done[gpu]) {
        first_alloc_done[gpu] = 1;
        if (fault("stuck", gpu)) {
            stuck_word[gpu] = mem + (pages / 4) / 3;
            *stuck_word[gpu] = stuck_value;
        }
    }
    pthread_mutex_unlock(&lock);
    *ptr = allocs[slot].ptr;
    return SUCCESS;
}

static struct alloc *find(CUdeviceptr ptr, size_t bytes) {
    for (int i = 0; i < MAX_ALLOCS; i++) {
        struct alloc *a = &allocs[i];
        if (a->ptr > 1 && ptr >= a->ptr && ptr + bytes <= a->ptr + a->size) return a;
    }
    return NULL;
}

CUresult cuMemFree_v2(CUdeviceptr ptr) {
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_ALLOCS; i++) {
        if (allocs[i].ptr == ptr && ptr > 1) {
            int gpu = allocs[i].gpu;
            used[gpu] -= allocs[i].size;
            uint32_t *mem = (uint32_t *)(uintptr_t)ptr;
            if (stuck_word[gpu] >= mem && stuck_word[gpu] < mem + allocs[i].size / 4)
                stuck_word[gpu] = NULL;
            allocs[i].ptr = 0;
            pthread_mutex_unlock(&lock);
            free(mem);
            return SUCCESS;
        }
    }
    pthread_mutex_unlock(&lock);
    return INVALID_VALUE;
}

CUresult cuMemsetD32_v2(CUdeviceptr ptr, unsigned int value, size_t count) {
    if (current == NULL) return INVALID_CONTEXT;
    pthread_mutex_lock(&lock);
    struct alloc *a = find(ptr, count * 4);
    uint32_t *stuck = a ? stuck_word[a->gpu] : NULL;
    pthread_mutex_unlock(&lock);
    if (a == NULL) return INVALID_VALUE;
    while (fault("hang", a->gpu)) {
        struct timespec ts = {1, 0};
        nanosleep(&ts, NULL);
    }
    if (fault("slow", a->gpu)) {
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    uint32_t *mem = (uint32_t *)(uintptr_t)ptr;
    for (size_t i = 0; i < count; i++) mem[i] = value;
    if (stuck && stuck >= mem && stuck < mem + count) *stuck = stuck_value;
    return SUCCESS;
}

CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t bytes) {
    if (current == NULL) return INVALID_CONTEXT;
    pthread_mutex_lock(&lock);
    struct alloc *a = find(src, bytes);
    pthread_mutex_unlock(&lock);
    if (a == NULL || dst == NULL) return INVALID_VALUE;
    memcpy(dst, (void *)(uintptr_t)src, bytes);
    return SUCCESS;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t bytes) {
    if (current == NULL) return INVALID_CONTEXT;
    pthread_mutex_lock(&lock);
    struct alloc *a = find(dst, bytes);
    pthread_mutex_unlock(&lock);
    if (a == NULL || src == NULL) return INVALID_VALUE;
    memcpy((void *)(uintptr_t)dst, src, bytes);
    return SUCCESS;
}

CUresult cuModuleLoadData(CUmodule *module, const void *image) {
    if (current == NULL) return INVALID_CONTEXT;
    if (module == NULL || image == NULL) return INVALID_VALUE;
    const char *text = image;
    if (strstr(text, ".entry ztgpu_verify(") == NULL || strstr(text, ".version ") == NULL)
        return INVALID_IMAGE;
    struct module *m = calloc(1, sizeof *m);
    if (m == NULL) return OUT_OF_MEMORY;
    m->ok = 1;
    *module = m;
    return SUCCESS;
}

CUresult cuModuleGetFunction(CUfunction *fn, CUmodule module, const char *name) {
    if (fn == NULL || module == NULL || name == NULL) return INVALID_VALUE;
    if (strcmp(name, "ztgpu_verify") != 0) return NOT_FOUND;
    *fn = &verify_fn;
    return SUCCESS;
}

CUresult cuModuleUnload(CUmodule module) {
    if (module == NULL) return INVALID_VALUE;
    free(module);
    return SUCCESS;
}

/* The verify kernel's semantics (see ztgpu/gpu/kernels/verify.cu). */
CUresult cuLaunchKernel(CUfunction fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned shared, CUstream stream,
                        void **params, void **extra) {
    (void)shared; (void)stream; (void)extra;
    if (current == NULL) return INVALID_CONTEXT;
    if (fn != &verify_fn || params == NULL || gx == 0 || bx == 0 || gy != 1 || gz != 1 ||
        by != 1 || bz != 1 || bx > 1024)
        return INVALID_VALUE;
    if (fault("launch", current->gpu)) return LAUNCH_FAILED;
    CUdeviceptr words = *(CUdeviceptr *)params[0];
    unsigned long long n4 = *(unsigned long long *)params[1];
    uint32_t expect = *(uint32_t *)params[2];
    CUdeviceptr result = *(CUdeviceptr *)params[3];
    pthread_mutex_lock(&lock);
    struct alloc *a = find(words, n4 * 16), *r = find(result, 24);
    pthread_mutex_unlock(&lock);
    if (a == NULL || r == NULL) return LAUNCH_FAILED; /* an illegal address, on a GPU */
    const uint32_t *w = (const uint32_t *)(uintptr_t)words;
    unsigned long long bad = 0, first = ~0ull, digest = 0;
    for (unsigned long long at = 0; at < n4 * 4; at++) {
        if (w[at] != expect) {
            bad++;
            first = at < first ? at : first;
            digest ^= (at * 0x9E3779B97F4A7C15ull) ^ ((unsigned long long)w[at] << 17);
        }
    }
    unsigned long long *out = (unsigned long long *)(uintptr_t)result;
    out[0] += bad;
    out[1] = first < out[1] ? first : out[1];
    out[2] ^= digest;
    return SUCCESS;
}

CUresult cuGetErrorName(CUresult error, const char **name) {
    if (name == NULL) return INVALID_VALUE;
    switch (error) {
    case SUCCESS: *name = "CUDA_SUCCESS"; break;
    case INVALID_VALUE: *name = "CUDA_ERROR_INVALID_VALUE"; break;
    case OUT_OF_MEMORY: *name = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case NOT_INITIALIZED: *name = "CUDA_ERROR_NOT_INITIALIZED"; break;
    case NO_DEVICE: *name = "CUDA_ERROR_NO_DEVICE"; break;
    case INVALID_DEVICE: *name = "CUDA_ERROR_INVALID_DEVICE"; break;
    case INVALID_IMAGE: *name = "CUDA_ERROR_INVALID_IMAGE"; break;
    case INVALID_CONTEXT: *name = "CUDA_ERROR_INVALID_CONTEXT"; break;
    case NOT_FOUND: *name = "CUDA_ERROR_NOT_FOUND"; break;
    case LAUNCH_FAILED: *name = "CUDA_ERROR_LAUNCH_FAILED"; break;
    default: *name = NULL; return INVALID_VALUE;
    }
    return SUCCESS;
}

CUresult cuGetErrorString(CUresult error, const char **text) {
    return cuGetErrorName(error, text);
}
