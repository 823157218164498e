// libcuda.so of the emulated CUDA device: the driver API functions cudarc calls, over host memory,
// with the kernels run by their host builds (emu_<module>.so, tools/kernel-emu). README.md lists
// what it checks and where each rule comes from.
//
// Execution model: every operation runs when it is issued, on the calling thread, in issue order;
// what the hardware runs concurrently (the streams) is checked instead: each stream carries a
// vector clock, events and synchronisations carry them across streams and to the host, and every
// access of an allocation (a kernel's pointer parameters, copies, memsets, frees, cuBLAS operands)
// must be ordered after the other streams' conflicting accesses, or the operation is a race.
#include <cuda.h>
#include <dirent.h>
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "abi.h"
#include "cubin.h"

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// ---------------------------------------------------------------------------------------------
// Configuration: the device the emulator stands in for.

struct Arch {
    int cc;                  // e.g. 90
    const char* name;        // the card
    int sms;                 // CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
    int smem_optin;          // CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    int smem_per_sm;         // CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
    int threads_per_sm;      // CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR
    int blocks_per_sm;       // CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR
    int l2_bytes;            // CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE
};
// The CUDA C++ Programming Guide's "Compute Capabilities" table (shared memory per SM and the
// per-block opt-in maximum, 1 KiB reserved per block on 8.x and 9.0).
const Arch ARCHS[] = {
    {80, "NVIDIA A100-SXM4-80GB", 108, 166912, 167936, 2048, 32, 41943040},
    {86, "NVIDIA GeForce RTX 3090", 82, 101376, 102400, 1536, 16, 6291456},
    {89, "NVIDIA L4", 58, 101376, 102400, 1536, 24, 50331648},
    {90, "NVIDIA H200", 132, 232448, 233472, 2048, 32, 52428800},
};
constexpr int SMEM_PER_BLOCK = 48 * 1024;  // without the dynamic-shared-memory opt-in
constexpr int RESERVED_SMEM = 1024;        // per block, by the system (8.x, 9.0)
constexpr int REGS_PER_BLOCK = 65536;
constexpr size_t PAGE = 4096;
constexpr size_t ALLOC_ALIGN = 256;
// Each allocation sits between two guard regions this large (no memory, address space only): an
// index far past the end (a grid-stride loop's stride, say) still lands in a guard, not in a
// neighbouring allocation.
constexpr size_t GUARD_BYTES = 1 << 20;
// The canary's bytes by address mod 4: the word 0xFFA5FFA5, a NaN as f32, and each half a NaN as
// f16 and bf16, so a kernel that reads the slack sees NaN.
constexpr unsigned char CANARY[4] = {0xA5, 0xFF, 0xA5, 0xFF};

struct Config {
    const Arch* arch = &ARCHS[3];
    uint64_t memory = 8ull << 30;
    bool abort_on_error = false;
    bool quiet = false;
    bool trace = false;
} cfg;

std::recursive_mutex g_mutex;
using Lock = std::lock_guard<std::recursive_mutex>;
bool g_initialized = false;

void diag(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// ---------------------------------------------------------------------------------------------
// Vector clocks (one component per stream; the host threads carry their own).

struct VClock {
    std::vector<uint64_t> c;
    uint64_t get(size_t i) const { return i < c.size() ? c[i] : 0; }
    void join(const VClock& o) {
        if (o.c.size() > c.size()) c.resize(o.c.size(), 0);
        for (size_t i = 0; i < o.c.size(); ++i) c[i] = std::max(c[i], o.c[i]);
    }
};
thread_local VClock host_clock;

struct Ctx;
struct Stream {
    size_t sid;
    Ctx* ctx;
    unsigned flags;
    VClock clock;
    std::string label;
};

struct Event {
    Ctx* ctx;
    bool recorded = false;
    VClock clock;
    double host_ms = 0;
    unsigned flags = 0;
};

// ---------------------------------------------------------------------------------------------
// Memory: each allocation is its own mapping. Its start is 256-byte aligned, as cuMemAlloc's are
// ("The allocated memory is suitably aligned for any kind of variable", and the CUDA C++
// Programming Guide: addresses returned by the allocation routines are aligned to at least 256
// bytes), and its 256-byte-rounded end touches a guard page (PROT_NONE). The slack between the
// buffer's end and the guard page (under 256 bytes) holds a canary that reads as NaN in every
// float type and is checked after each kernel that was given the buffer: a small overrun is
// reported as a write past the end, a larger one faults on the guard page. A freed allocation
// stays mapped PROT_NONE for a while (quarantine), so a late access faults and is named.

struct Access {
    size_t sid;
    uint64_t epoch;
    const char* what;
};

struct Alloc {
    uint64_t id;
    unsigned char* ptr;
    size_t bytes;
    size_t span;  // bytes rounded up to ALLOC_ALIGN: [ptr + bytes, ptr + span) holds the canary
    unsigned char* map;
    size_t map_len;
    bool pooled;
    bool freed = false;
    std::string freed_by;
    Access last_write{SIZE_MAX, 0, nullptr};
    std::vector<Access> reads;  // since the last write, at most one per stream
    const char* alloc_what;
};

std::map<uintptr_t, Alloc*> g_live;       // by buffer start
std::map<uintptr_t, Alloc*> g_freed;      // quarantined, by mapping start
std::deque<Alloc*> g_quarantine;
size_t g_quarantine_bytes = 0;
constexpr size_t QUARANTINE_BYTES = 64ull << 30;  // address space only (PROT_NONE, no memory)
constexpr size_t QUARANTINE_COUNT = 20000;
uint64_t g_next_alloc = 1;
uint64_t g_used = 0, g_pool_used = 0, g_pool_high = 0;

// ---------------------------------------------------------------------------------------------
// Contexts, modules, functions.

struct HostKernel {
    const EmuKernelEntry* entry;
    std::string module_file;
};
std::map<std::string, HostKernel> g_host_kernels;
std::vector<std::string> g_module_load_errors;

struct Module;
struct Function {
    Module* module;
    CubinKernel cubin;
    const EmuKernelEntry* host;
    int max_dynamic_smem;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
};
struct Module {
    Ctx* ctx;
    Cubin cubin;
    bool unloaded = false;
    std::map<std::string, std::unique_ptr<Function>> functions;
};

struct Ctx {
    int refs = 0;
    CUresult sticky = CUDA_SUCCESS;
    std::string sticky_msg;
    Stream* null_stream = nullptr;
    std::set<Stream*> streams;
};

Ctx g_primary;                       // the device's primary context (the only one)
bool g_primary_active = false;
std::set<Stream*> g_all_streams;     // live stream handles
std::set<Event*> g_events;
std::set<Module*> g_modules;
std::set<Function*> g_functions;
size_t g_next_sid = 0;
thread_local Ctx* tl_current = nullptr;
thread_local std::unique_ptr<Stream> tl_per_thread_stream;

// Diagnostics: printed to stderr and kept per thread per error code for cuGetErrorString.
thread_local std::map<int, std::string> tl_error_text;

void diag(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char buf[4096];
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (!cfg.quiet) std::fprintf(stderr, "emulated CUDA device: %s\n", buf);
}

const char* base_error_string(int e) {
    switch (e) {
        case CUDA_SUCCESS: return "no error";
        case CUDA_ERROR_INVALID_VALUE: return "invalid argument";
        case CUDA_ERROR_OUT_OF_MEMORY: return "out of memory";
        case CUDA_ERROR_NOT_INITIALIZED: return "initialization error";
        case CUDA_ERROR_DEINITIALIZED: return "driver shutting down";
        case CUDA_ERROR_NO_DEVICE: return "no CUDA-capable device is detected";
        case CUDA_ERROR_INVALID_DEVICE: return "invalid device ordinal";
        case CUDA_ERROR_INVALID_IMAGE: return "device kernel image is invalid";
        case CUDA_ERROR_INVALID_CONTEXT: return "invalid device context";
        case CUDA_ERROR_NO_BINARY_FOR_GPU: return "no kernel image is available for execution on the device";
        case CUDA_ERROR_INVALID_HANDLE: return "invalid resource handle";
        case CUDA_ERROR_ILLEGAL_STATE: return "the operation is not permitted in the current state";
        case CUDA_ERROR_NOT_FOUND: return "named symbol not found";
        case CUDA_ERROR_NOT_READY: return "device not ready";
        case CUDA_ERROR_ILLEGAL_ADDRESS: return "an illegal memory access was encountered";
        case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: return "too many resources requested for launch";
        case CUDA_ERROR_LAUNCH_FAILED: return "unspecified launch failure";
        case CUDA_ERROR_NOT_SUPPORTED: return "operation not supported";
        default: return nullptr;
    }
}
const char* base_error_name(int e) {
    switch (e) {
#define N(x) case x: return #x;
        N(CUDA_SUCCESS) N(CUDA_ERROR_INVALID_VALUE) N(CUDA_ERROR_OUT_OF_MEMORY)
        N(CUDA_ERROR_NOT_INITIALIZED) N(CUDA_ERROR_DEINITIALIZED) N(CUDA_ERROR_NO_DEVICE)
        N(CUDA_ERROR_INVALID_DEVICE) N(CUDA_ERROR_INVALID_IMAGE) N(CUDA_ERROR_INVALID_CONTEXT)
        N(CUDA_ERROR_NO_BINARY_FOR_GPU) N(CUDA_ERROR_INVALID_HANDLE) N(CUDA_ERROR_ILLEGAL_STATE)
        N(CUDA_ERROR_NOT_FOUND) N(CUDA_ERROR_NOT_READY) N(CUDA_ERROR_ILLEGAL_ADDRESS)
        N(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES) N(CUDA_ERROR_LAUNCH_FAILED)
        N(CUDA_ERROR_NOT_SUPPORTED)
#undef N
        default: return nullptr;
    }
}

// An error the caller gets back (not sticky): the diagnostic goes to stderr and to the string
// cuGetErrorString returns on this thread.
CUresult fail(CUresult code, const std::string& msg) {
    diag("%s: %s", base_error_name(code) ? base_error_name(code) : "error", msg.c_str());
    tl_error_text[code] = std::string(base_error_string(code) ? base_error_string(code) : "error") +
                          " (emulated device: " + msg + ")";
    if (cfg.abort_on_error) std::abort();
    return code;
}

// A sticky error: the context is unusable from now on, as after a kernel fault on a GPU.
CUresult fail_sticky(Ctx* ctx, CUresult code, const std::string& msg) {
    fail(code, msg);
    if (ctx && ctx->sticky == CUDA_SUCCESS) {
        ctx->sticky = code;
        ctx->sticky_msg = msg;
    }
    return code;
}

Ctx* current() { return tl_current; }

// The checks every context operation starts with.
CUresult enter(Ctx** out) {
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    Ctx* ctx = current();
    if (!ctx || !g_primary_active) return CUDA_ERROR_INVALID_CONTEXT;
    if (ctx->sticky != CUDA_SUCCESS) {
        tl_error_text[ctx->sticky] = std::string(base_error_string(ctx->sticky)) +
                                     " (emulated device, sticky since: " + ctx->sticky_msg + ")";
        return ctx->sticky;
    }
    *out = ctx;
    return CUDA_SUCCESS;
}

Stream* new_stream(Ctx* ctx, unsigned flags, const std::string& label) {
    Stream* s = new Stream{g_next_sid++, ctx, flags, {}, label};
    s->clock.c.assign(s->sid + 1, 0);
    g_all_streams.insert(s);
    ctx->streams.insert(s);
    return s;
}

// Resolves a stream handle (0: the context's NULL stream; CU_STREAM_PER_THREAD: this thread's).
Stream* stream_of(Ctx* ctx, CUstream h) {
    if (h == nullptr || h == CU_STREAM_LEGACY) {
        if (!ctx->null_stream) ctx->null_stream = new_stream(ctx, 0, "the NULL stream");
        return ctx->null_stream;
    }
    if (h == CU_STREAM_PER_THREAD) {
        if (!tl_per_thread_stream) {
            tl_per_thread_stream.reset(new Stream{g_next_sid++, ctx, 0, {}, "the per-thread stream"});
            tl_per_thread_stream->clock.c.assign(tl_per_thread_stream->sid + 1, 0);
            g_all_streams.insert(tl_per_thread_stream.get());
            ctx->streams.insert(tl_per_thread_stream.get());
        }
        return tl_per_thread_stream.get();
    }
    Stream* s = reinterpret_cast<Stream*>(h);
    return g_all_streams.count(s) ? s : nullptr;
}

std::string stream_name(const Stream* s) {
    return s->label.empty() ? "stream " + std::to_string(s->sid) : s->label;
}
std::string stream_name(size_t sid) {
    for (const Stream* s : g_all_streams)
        if (s->sid == sid) return stream_name(s);
    return "stream " + std::to_string(sid) + " (destroyed)";
}

// An operation issued to a stream: it follows what the issuing host thread has synchronised with,
// and everything issued to the stream before it.
uint64_t tick(Stream* s) {
    s->clock.join(host_clock);
    if (s->clock.c.size() <= s->sid) s->clock.c.resize(s->sid + 1, 0);
    return ++s->clock.c[s->sid];
}

// ---- allocations

Alloc* find_live(uint64_t p, bool allow_end) {
    auto it = g_live.upper_bound((uintptr_t)p);
    if (it == g_live.begin()) return nullptr;
    --it;
    Alloc* a = it->second;
    const uint64_t lo = (uint64_t)a->ptr, hi = lo + a->bytes;
    if (p >= lo && (p < hi || (allow_end && p == hi))) return a;
    return nullptr;
}
Alloc* find_freed(uint64_t p) {
    auto it = g_freed.upper_bound((uintptr_t)p);
    if (it == g_freed.begin()) return nullptr;
    --it;
    Alloc* a = it->second;
    if (p >= (uint64_t)a->map && p < (uint64_t)a->map + a->map_len) return a;
    return nullptr;
}
// The live allocation whose guard regions hold p: `*before` the one below its start, else the
// one after its end (the canary slack included).
Alloc* find_guard(uint64_t p, bool* before) {
    auto it = g_live.upper_bound((uintptr_t)p);
    if (it != g_live.end()) {
        Alloc* a = it->second;
        if (p >= (uint64_t)a->map && p < (uint64_t)a->ptr) {
            *before = true;
            return a;
        }
    }
    if (it == g_live.begin()) return nullptr;
    --it;
    Alloc* a = it->second;
    const uint64_t end = (uint64_t)a->ptr + a->bytes, map_end = (uint64_t)a->map + a->map_len;
    *before = false;
    return (p >= end && p < map_end) ? a : nullptr;
}

// Where a kernel wrote into the slack after the buffer, if it did.
std::string check_canary(const Alloc* a);

std::string alloc_name(const Alloc* a) {
    char b[160];
    std::snprintf(b, sizeof b, "allocation #%" PRIu64 " (%zu bytes at %#" PRIxPTR ")", a->id, a->bytes,
                  (uintptr_t)a->ptr);
    return b;
}

std::string describe_address(uint64_t p) {
    char b[512];
    bool before = false;
    if (Alloc* a = find_guard(p, &before)) {
        if (before)
            std::snprintf(b, sizeof b, "%#" PRIx64 " is %" PRIu64 " bytes before the start of %s", p,
                          (uint64_t)a->ptr - p, alloc_name(a).c_str());
        else
            std::snprintf(b, sizeof b, "%#" PRIx64 " is %" PRIu64 " bytes past the end of %s", p,
                          p - ((uint64_t)a->ptr + a->bytes), alloc_name(a).c_str());
        return b;
    }
    if (Alloc* a = find_freed(p)) {
        std::snprintf(b, sizeof b, "%#" PRIx64 " is in %s, freed by %s (use after free)", p,
                      alloc_name(a).c_str(), a->freed_by.c_str());
        return b;
    }
    if (Alloc* a = find_live(p, false)) {
        std::snprintf(b, sizeof b, "%#" PRIx64 " is inside %s", p, alloc_name(a).c_str());
        return b;
    }
    std::snprintf(b, sizeof b, "%#" PRIx64 " is not in any device allocation", p);
    return b;
}

std::string check_canary(const Alloc* a) {
    const unsigned char *first = nullptr, *last = nullptr;
    for (const unsigned char* c = a->ptr + a->bytes; c < a->ptr + a->span; ++c)
        if (*c != CANARY[(uintptr_t)c % 4]) {
            if (!first) first = c;
            last = c;
        }
    if (!first) return {};
    char b[128];
    std::snprintf(b, sizeof b, " (bytes %zu to %zu past its end)", (size_t)(first - a->ptr) - a->bytes,
                  (size_t)(last - a->ptr) - a->bytes);
    return "a write past the end of " + alloc_name(a) + b;
}

// Checks the order of an access by the operation at (stream s, epoch) against the allocation's
// previous accesses on other streams; records it. Returns the race, if there is one.
std::string order_access(Alloc* a, Stream* s, uint64_t epoch, bool write, const char* what) {
    auto unordered = [&](const Access& x) {
        return x.what && x.sid != s->sid && x.epoch > s->clock.get(x.sid);
    };
    auto race = [&](const Access& x, const char* kind) {
        char b[1024];
        std::snprintf(b, sizeof b,
                      "race on %s: %s on %s %s it, but %s on %s %s it and nothing (event, stream or "
                      "context synchronisation) orders the two",
                      alloc_name(a).c_str(), what, stream_name(s).c_str(),
                      write ? "writes" : "reads", x.what, stream_name(x.sid).c_str(), kind);
        return std::string(b);
    };
    if (unordered(a->last_write)) return race(a->last_write, "wrote");
    if (write) {
        for (const Access& r : a->reads)
            if (unordered(r)) return race(r, "reads");
        a->last_write = {s->sid, epoch, what};
        a->reads.clear();
    } else {
        bool found = false;
        for (Access& r : a->reads)
            if (r.sid == s->sid) {
                r = {s->sid, epoch, what};
                found = true;
            }
        if (!found) a->reads.push_back({s->sid, epoch, what});
    }
    return {};
}

// [p, p + n) must lie inside one live allocation.
CUresult check_range(Ctx* ctx, uint64_t p, uint64_t n, const char* what, const char* operand,
                     Alloc** out, bool sticky) {
    Alloc* a = find_live(p, n == 0);
    if (!a || p + n > (uint64_t)a->ptr + a->bytes) {
        std::string m = std::string(what) + ": " + operand + " [" + std::to_string(p) + ", +" +
                        std::to_string(n) + " bytes) is not inside one live device allocation: " +
                        describe_address(a ? (uint64_t)a->ptr + a->bytes : p);
        return sticky ? fail_sticky(ctx, CUDA_ERROR_ILLEGAL_ADDRESS, m) : fail(CUDA_ERROR_INVALID_VALUE, m);
    }
    *out = a;
    return CUDA_SUCCESS;
}

CUresult access(Ctx* ctx, Stream* s, uint64_t epoch, uint64_t p, uint64_t n, bool write,
                const char* what, const char* operand, bool sticky) {
    Alloc* a = nullptr;
    if (CUresult r = check_range(ctx, p, n, what, operand, &a, sticky)) return r;
    std::string race = order_access(a, s, epoch, write, what);
    if (!race.empty()) return fail_sticky(ctx, CUDA_ERROR_ILLEGAL_STATE, race);
    return CUDA_SUCCESS;
}

CUresult do_alloc(Ctx* ctx, Stream* s, uint64_t epoch, size_t bytes, bool pooled, CUdeviceptr* out,
                  const char* what) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    if (bytes == 0)
        return fail(CUDA_ERROR_INVALID_VALUE,
                    std::string(what) + " of 0 bytes (cuMemAlloc documents CUDA_ERROR_INVALID_VALUE "
                                        "for bytesize 0; allocate at least one element)");
    if (g_used + bytes > cfg.memory) {
        char b[256];
        std::snprintf(b, sizeof b, "%s of %zu bytes: %" PRIu64 " of %" PRIu64 " bytes in use", what, bytes,
                      g_used, cfg.memory);
        return fail(CUDA_ERROR_OUT_OF_MEMORY, b);
    }
    const size_t span = (bytes + ALLOC_ALIGN - 1) / ALLOC_ALIGN * ALLOC_ALIGN;
    const size_t pages = (span + PAGE - 1) / PAGE;
    // [guard][buffer pages][guard]: address space only, no memory.
    const size_t map_len = GUARD_BYTES + pages * PAGE + GUARD_BYTES;
    void* m = mmap(nullptr, map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return fail(CUDA_ERROR_OUT_OF_MEMORY, std::string(what) + ": host mmap failed");
    unsigned char* map = (unsigned char*)m;
    if (mprotect(map + GUARD_BYTES, pages * PAGE, PROT_READ | PROT_WRITE) != 0) {
        munmap(m, map_len);
        return fail(CUDA_ERROR_OUT_OF_MEMORY, std::string(what) + ": host mprotect failed");
    }
    Alloc* a = new Alloc();
    a->id = g_next_alloc++;
    a->ptr = map + GUARD_BYTES + pages * PAGE - span;  // 256-aligned; the rounded end touches the guard
    a->bytes = bytes;
    a->span = span;
    for (unsigned char* c = a->ptr + bytes; c < a->ptr + span; ++c) *c = CANARY[(uintptr_t)c % 4];
    a->map = map;
    a->map_len = map_len;
    a->pooled = pooled;
    a->alloc_what = what;
    std::memset(a->ptr, 0xff, bytes);  // fresh memory reads as NaN in every float type
    a->last_write = {s->sid, epoch, what};
    g_live[(uintptr_t)a->ptr] = a;
    g_used += bytes;
    if (pooled) {
        g_pool_used += bytes;
        g_pool_high = std::max(g_pool_high, g_pool_used);
    }
    *out = (CUdeviceptr)a->ptr;
    (void)ctx;
    return CUDA_SUCCESS;
}

CUresult do_free(Ctx* ctx, Stream* s, uint64_t epoch, CUdeviceptr p, const char* what) {
    auto it = g_live.find((uintptr_t)p);
    if (it == g_live.end())
        return fail(CUDA_ERROR_INVALID_VALUE, std::string(what) + ": " + describe_address(p) +
                                                  " is not the start of a live allocation");
    Alloc* a = it->second;
    if (s) {
        std::string race = order_access(a, s, epoch, true, what);
        if (!race.empty()) return fail_sticky(ctx, CUDA_ERROR_ILLEGAL_STATE, race);
    }
    g_live.erase(it);
    g_used -= a->bytes;
    if (a->pooled) g_pool_used -= a->bytes;
    a->freed = true;
    a->freed_by = std::string(what) + (s ? " on " + stream_name(s) : std::string());
    mprotect(a->map, a->map_len, PROT_NONE);
    madvise(a->map, a->map_len, MADV_DONTNEED);
    g_freed[(uintptr_t)a->map] = a;
    g_quarantine.push_back(a);
    g_quarantine_bytes += a->map_len;
    while (g_quarantine.size() > QUARANTINE_COUNT || g_quarantine_bytes > QUARANTINE_BYTES) {
        Alloc* old = g_quarantine.front();
        g_quarantine.pop_front();
        g_quarantine_bytes -= old->map_len;
        g_freed.erase((uintptr_t)old->map);
        munmap(old->map, old->map_len);
        delete old;
    }
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------------------------
// Kernel faults: SIGSEGV/SIGBUS while a kernel runs on this thread.

thread_local sigjmp_buf* tl_kernel_jb = nullptr;
thread_local const unsigned* tl_block = nullptr;
thread_local const unsigned* tl_thread = nullptr;
thread_local std::string tl_fault;
thread_local unsigned char* tl_smem = nullptr;   // this thread's dynamic shared memory region
thread_local size_t tl_smem_cap = 0;
thread_local std::vector<unsigned char> tl_altstack;
struct sigaction g_old_segv, g_old_bus;

std::string where() {
    char b[128];
    if (tl_block && tl_thread)
        std::snprintf(b, sizeof b, "block (%u, %u, %u) thread (%u, %u, %u)", tl_block[0], tl_block[1],
                      tl_block[2], tl_thread[0], tl_thread[1], tl_thread[2]);
    else
        b[0] = 0;
    return b;
}

void on_signal(int sig, siginfo_t* si, void* uc) {
    if (!tl_kernel_jb) {
        // Not an emulated kernel: whoever handled the signal before us (Rust's stack-overflow
        // handler, or the default action).
        struct sigaction& old = sig == SIGSEGV ? g_old_segv : g_old_bus;
        if (old.sa_flags & SA_SIGINFO) {
            if (old.sa_sigaction) return old.sa_sigaction(sig, si, uc);
        } else if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN) {
            return old.sa_handler(sig);
        }
        signal(sig, SIG_DFL);
        return;
    }
    const uint64_t addr = (uint64_t)si->si_addr;
    std::string what;
    if (tl_smem && addr >= (uint64_t)tl_smem + tl_smem_cap && addr < (uint64_t)tl_smem + tl_smem_cap + PAGE) {
        what = "an access past the launch's dynamic shared memory";
    } else {
        // This thread holds no lock while a kernel runs; another thread's hold is brief.
        Lock lock(g_mutex);
        what = describe_address(addr);
    }
    tl_fault = std::string(sig == SIGSEGV ? "invalid global memory access" : "bus error") + " by " +
               where() + ": " + what;
    sigjmp_buf* jb = tl_kernel_jb;
    tl_kernel_jb = nullptr;
    siglongjmp(*jb, 1);
}

void install_signal_handlers() {
    struct sigaction sa {};
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
}

// This thread's dynamic shared memory: `bytes` (128-aligned) ending at a guard page, and the
// region must not cross a 4 GiB boundary (the emulator keeps 32-bit shared addresses).
unsigned char* smem_region(size_t bytes) {
    const size_t need = std::max<size_t>((bytes + PAGE - 1) / PAGE * PAGE, PAGE);
    if (tl_smem_cap < need) {
        if (tl_smem) munmap(tl_smem, tl_smem_cap + PAGE);
        for (;;) {
            void* m = mmap(nullptr, need + PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (m == MAP_FAILED) return nullptr;
            const uint64_t b = (uint64_t)m;
            if ((b >> 32) == ((b + need - 1) >> 32)) {
                tl_smem = (unsigned char*)m;
                break;
            }
            munmap(m, need + PAGE);  // crosses 4 GiB: try again elsewhere (rare)
            void* hole = mmap(nullptr, need + PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            (void)hole;
        }
        tl_smem_cap = need;
        mprotect(tl_smem + need, PAGE, PROT_NONE);
    }
    const size_t rounded = (bytes + 127) / 128 * 128;
    return tl_smem + tl_smem_cap - rounded;
}

// ---------------------------------------------------------------------------------------------
// Host kernels: every emu_*.so beside this library.

void load_host_modules() {
    Dl_info info;
    if (!dladdr((void*)&load_host_modules, &info) || !info.dli_fname) {
        g_module_load_errors.push_back("cannot locate libcuda.so's directory");
        return;
    }
    std::string dir = info.dli_fname;
    dir = dir.substr(0, dir.rfind('/') == std::string::npos ? 0 : dir.rfind('/'));
    if (dir.empty()) dir = ".";
    DIR* d = opendir(dir.c_str());
    if (!d) {
        g_module_load_errors.push_back("cannot list " + dir);
        return;
    }
    std::vector<std::string> files;
    while (dirent* e = readdir(d)) {
        std::string n = e->d_name;
        if (n.rfind("emu_", 0) == 0 && n.size() > 3 && n.substr(n.size() - 3) == ".so") files.push_back(n);
    }
    closedir(d);
    std::sort(files.begin(), files.end());
    for (const std::string& f : files) {
        const std::string path = dir + "/" + f;
        void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            g_module_load_errors.push_back(path + ": " + dlerror());
            continue;
        }
        auto table = (EmuModuleTableFn)dlsym(h, EMU_MODULE_TABLE_SYMBOL);
        if (!table) {
            g_module_load_errors.push_back(path + ": no " EMU_MODULE_TABLE_SYMBOL);
            continue;
        }
        uint32_t n = 0;
        const EmuKernelEntry* e = table(&n);
        for (uint32_t i = 0; i < n; ++i) {
            auto [it, fresh] = g_host_kernels.emplace(e[i].name, HostKernel{&e[i], f});
            if (!fresh)
                g_module_load_errors.push_back(std::string("kernel ") + e[i].name + " is in both " +
                                               it->second.module_file + " and " + f);
        }
    }
    if (files.empty()) g_module_load_errors.push_back("no emu_*.so kernel modules in " + dir);
}

uint64_t parse_bytes(const char* s, uint64_t dflt) {
    if (!s || !*s) return dflt;
    char* end = nullptr;
    const double v = std::strtod(s, &end);
    uint64_t mult = 1;
    if (end && (*end == 'k' || *end == 'K')) mult = 1ull << 10;
    if (end && (*end == 'm' || *end == 'M')) mult = 1ull << 20;
    if (end && (*end == 'g' || *end == 'G')) mult = 1ull << 30;
    return v > 0 ? (uint64_t)(v * (double)mult) : dflt;
}

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// Launch-time checks of one pointer parameter.
struct Touch {
    uint64_t ptr;
    bool write;
    std::string operand;
};

}  // namespace

// =============================================================================================
// The driver API.

EXPORT int fused_infonce_emulated_device(void) { return 1; }

EXPORT CUresult cuInit(unsigned int flags) {
    Lock l(g_mutex);
    if (flags != 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuInit flags must be 0");
    if (g_initialized) return CUDA_SUCCESS;
    if (const char* a = getenv("FUSED_INFONCE_EMU_ARCH")) {
        const int want = std::atoi(a);
        const Arch* found = nullptr;
        for (const Arch& x : ARCHS)
            if (x.cc == want) found = &x;
        if (!found) {
            diag("FUSED_INFONCE_EMU_ARCH=%s is not one of 80, 86, 89, 90", a);
            return CUDA_ERROR_INVALID_VALUE;
        }
        cfg.arch = found;
    }
    cfg.memory = parse_bytes(getenv("FUSED_INFONCE_EMU_MEMORY"), cfg.memory);
    cfg.abort_on_error = getenv("FUSED_INFONCE_EMU_ABORT") && *getenv("FUSED_INFONCE_EMU_ABORT") == '1';
    cfg.quiet = getenv("FUSED_INFONCE_EMU_QUIET") && *getenv("FUSED_INFONCE_EMU_QUIET") == '1';
    cfg.trace = getenv("FUSED_INFONCE_EMU_TRACE") && *getenv("FUSED_INFONCE_EMU_TRACE") == '1';
    load_host_modules();
    for (const std::string& e : g_module_load_errors) diag("%s", e.c_str());
    install_signal_handlers();
    g_initialized = true;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuGetErrorName(CUresult e, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    *s = base_error_name(e);
    return *s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

EXPORT CUresult cuGetErrorString(CUresult e, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    auto it = tl_error_text.find(e);
    if (it != tl_error_text.end()) {
        *s = it->second.c_str();
        return CUDA_SUCCESS;
    }
    *s = base_error_string(e);
    return *s ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

// ---- devices

EXPORT CUresult cuDeviceGetCount(int* n) {
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *n = 1;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    std::snprintf(name, (size_t)len, "%s (fused-infonce emulated device, sm_%d)", cfg.arch->name, cfg.arch->cc);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetUuid(CUuuid* u, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!u) return CUDA_ERROR_INVALID_VALUE;
    std::memset(u, 0, sizeof *u);
    std::memcpy(u->bytes, "fused-infonceemu", 16);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceTotalMem(size_t* bytes, CUdevice d) {
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    *bytes = cfg.memory;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceComputeCapability(int* major, int* minor, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    *major = cfg.arch->cc / 10;
    *minor = cfg.arch->cc % 10;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice d) {
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    const Arch& x = *cfg.arch;
    switch (a) {
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X: *v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: *v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: *v = 64; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: *v = 2147483647; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y: *v = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: *v = 65535; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *v = SMEM_PER_BLOCK; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *v = x.smem_optin; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *v = x.smem_per_sm; break;
        case CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK: *v = RESERVED_SMEM; break;
        case CU_DEVICE_ATTRIBUTE_TOTAL_CONSTANT_MEMORY: *v = 65536; break;
        case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; break;
        case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *v = REGS_PER_BLOCK; break;
        case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR: *v = 65536; break;
        case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *v = 1980000; break;
        case CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE: *v = 3201000; break;
        case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *v = 6144; break;
        case CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE: *v = x.l2_bytes; break;
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = x.sms; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: *v = x.threads_per_sm; break;
        case CU_DEVICE_ATTRIBUTE_MAX_BLOCKS_PER_MULTIPROCESSOR: *v = x.blocks_per_sm; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = x.cc / 10; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = x.cc % 10; break;
        case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: *v = 1; break;
        case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: *v = 1; break;
        case CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS: *v = 1; break;
        case CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT: *v = 2; break;
        case CU_DEVICE_ATTRIBUTE_INTEGRATED: *v = 0; break;
        case CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY: *v = 1; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_MODE: *v = 0; break;
        case CU_DEVICE_ATTRIBUTE_ECC_ENABLED: *v = 1; break;
        case CU_DEVICE_ATTRIBUTE_PCI_BUS_ID: *v = 0; break;
        case CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID: *v = 0; break;
        case CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID: *v = 0; break;
        case CU_DEVICE_ATTRIBUTE_TCC_DRIVER: *v = 0; break;
        case CU_DEVICE_ATTRIBUTE_KERNEL_EXEC_TIMEOUT: *v = 0; break;
        case CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH: *v = 1; break;
        case CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY: *v = 0; break;
        case CU_DEVICE_ATTRIBUTE_STREAM_PRIORITIES_SUPPORTED: *v = 1; break;
        default:
            return fail(CUDA_ERROR_NOT_SUPPORTED, "device attribute " + std::to_string((int)a) + " is not emulated");
    }
    return CUDA_SUCCESS;
}

// ---- contexts

EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
    Lock l(g_mutex);
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    g_primary.refs++;
    g_primary_active = true;
    *c = reinterpret_cast<CUcontext>(&g_primary);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxRelease(CUdevice d) {
    Lock l(g_mutex);
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (g_primary.refs == 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (--g_primary.refs == 0) {
        // The last release destroys the primary context, as the driver does: its allocations are
        // freed and a later retain starts a fresh one (without the sticky error).
        // Destruction waits for all of the context's work: no order to check.
        std::vector<uintptr_t> live;
        for (auto& [p, a] : g_live) live.push_back(p);
        for (uintptr_t p : live) do_free(&g_primary, nullptr, 0, (CUdeviceptr)p, "the primary context's destruction");
        for (Module* m : g_modules)
            if (!m->unloaded) {
                m->unloaded = true;
                for (auto& [name, f] : m->functions) g_functions.erase(f.get());
            }
        g_primary.sticky = CUDA_SUCCESS;
        g_primary.sticky_msg.clear();
        g_primary_active = false;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDevicePrimaryCtxGetState(CUdevice d, unsigned int* flags, int* active) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (flags) *flags = 0;
    if (active) *active = g_primary.refs > 0;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxSetCurrent(CUcontext c) {
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (c && c != reinterpret_cast<CUcontext>(&g_primary)) return CUDA_ERROR_INVALID_CONTEXT;
    tl_current = c ? &g_primary : nullptr;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetCurrent(CUcontext* c) {
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    *c = reinterpret_cast<CUcontext>(tl_current);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxPushCurrent(CUcontext c) { return cuCtxSetCurrent(c); }
EXPORT CUresult cuCtxPopCurrent(CUcontext* c) {
    if (c) *c = reinterpret_cast<CUcontext>(tl_current);
    tl_current = nullptr;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetDevice(CUdevice* d) {
    if (!tl_current) return CUDA_ERROR_INVALID_CONTEXT;
    if (d) *d = 0;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxSynchronize(void) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    for (Stream* s : ctx->streams) host_clock.join(s->clock);
    return CUDA_SUCCESS;
}

// ---- memory

EXPORT CUresult cuMemGetInfo(size_t* free_bytes, size_t* total) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    if (free_bytes) *free_bytes = cfg.memory - g_used;
    if (total) *total = cfg.memory;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemAlloc(CUdeviceptr* p, size_t bytes) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    // Synchronous: the allocation is ordered after everything (a legacy-stream operation), and
    // the host, which gets the pointer once it is done, issues everything after it.
    Stream* s = stream_of(ctx, nullptr);
    for (Stream* t : ctx->streams) s->clock.join(t->clock);
    CUresult r = do_alloc(ctx, s, tick(s), bytes, false, p, "cuMemAlloc");
    host_clock.join(s->clock);
    return r;
}

EXPORT CUresult cuMemFree(CUdeviceptr p) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    if (p == 0) return CUDA_SUCCESS;
    // cuMemFree synchronises the device: it follows every stream's work.
    Stream* s = stream_of(ctx, nullptr);
    for (Stream* t : ctx->streams) {
        s->clock.join(t->clock);
        host_clock.join(t->clock);
    }
    CUresult r = do_free(ctx, s, tick(s), p, "cuMemFree");
    host_clock.join(s->clock);
    return r;
}

EXPORT CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream h) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    Stream* s = stream_of(ctx, h);
    if (!s) return fail(CUDA_ERROR_INVALID_HANDLE, "cuMemAllocAsync: invalid stream");
    return do_alloc(ctx, s, tick(s), bytes, true, p, "cuMemAllocAsync");
}

EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, CUstream h) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    Stream* s = stream_of(ctx, h);
    if (!s) return fail(CUDA_ERROR_INVALID_HANDLE, "cuMemFreeAsync: invalid stream");
    if (p == 0) return CUDA_SUCCESS;
    return do_free(ctx, s, tick(s), p, "cuMemFreeAsync");
}

EXPORT CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, CUstream h) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    Stream* s = stream_of(ctx, h);
    if (!s) return fail(CUDA_ERROR_INVALID_HANDLE, "cuMemsetD8Async: invalid stream");
    if (n == 0) return CUDA_SUCCESS;
    if (CUresult r = access(ctx, s, tick(s), p, n, true, "cuMemsetD8Async", "the destination", false)) return r;
    std::memset((void*)p, v, n);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemsetD8(CUdeviceptr p, unsigned char v, size_t n) {
    CUresult r = cuMemsetD8Async(p, v, n, nullptr);
    return r ? r : cuCtxSynchronize();
}

EXPORT CUresult cuMemsetD32Async(CUdeviceptr p, unsigned int v, size_t n, CUstream h) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    Stream* s = stream_of(ctx, h);
    if (!s) return fail(CUDA_ERROR_INVALID_HANDLE, "cuMemsetD32Async: invalid stream");
    if (n == 0) return CUDA_SUCCESS;
    if (p % 4) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemsetD32Async: destination not 4-byte aligned");
    if (CUresult r = access(ctx, s, tick(s), p, 4 * n, true, "cuMemsetD32Async", "the destination", false)) return r;
    for (size_t i = 0; i < n; ++i) std::memcpy((unsigned char*)p + 4 * i, &v, 4);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemcpyHtoDAsync(CUdeviceptr dst, const void* src, size_t n, CUstream h) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    Stream* s = stream_of(ctx, h);
    if (!s) return fail(CUDA_ERROR_INVALID_HANDLE, "cuMemcpyHtoDAsync: invalid stream");
    if (n == 0) return CUDA_SUCCESS;
    if (!src) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemcpyHtoDAsync: null host source");
    if (CUresult r = access(ctx, s, tick(s), dst, n, true, "cuMemcpyHtoDAsync", "the destination", false)) return r;
    std::memcpy((void*)dst, src, n);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemcpyDtoHAsync(void* dst, CUdeviceptr src, size_t n, CUstream h) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    Stream* s = stream_of(ctx, h);
    if (!s) return fail(CUDA_ERROR_INVALID_HANDLE, "cuMemcpyDtoHAsync: invalid stream");
    if (n == 0) return CUDA_SUCCESS;
    if (!dst) return fail(CUDA_ERROR_INVALID_VALUE, "cuMemcpyDtoHAsync: null host destination");
    if (CUresult r = access(ctx, s, tick(s), src, n, false, "cuMemcpyDtoHAsync", "the source", false)) return r;
    std::memcpy(dst, (const void*)src, n);
    // A copy to pageable host memory returns once it is done: the host has seen the stream so far.
    host_clock.join(s->clock);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemcpyDtoDAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream h) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    Stream* s = stream_of(ctx, h);
    if (!s) return fail(CUDA_ERROR_INVALID_HANDLE, "cuMemcpyDtoDAsync: invalid stream");
    if (n == 0) return CUDA_SUCCESS;
    const uint64_t e = tick(s);
    if (CUresult r = access(ctx, s, e, src, n, false, "cuMemcpyDtoDAsync", "the source", false)) return r;
    if (CUresult r = access(ctx, s, e, dst, n, true, "cuMemcpyDtoDAsync", "the destination", false)) return r;
    std::memmove((void*)dst, (const void*)src, n);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemcpyHtoD(CUdeviceptr dst, const void* src, size_t n) {
    CUresult r = cuMemcpyHtoDAsync(dst, src, n, nullptr);
    return r ? r : cuCtxSynchronize();
}
EXPORT CUresult cuMemcpyDtoH(void* dst, CUdeviceptr src, size_t n) {
    CUresult r = cuCtxSynchronize();
    return r ? r : cuMemcpyDtoHAsync(dst, src, n, nullptr);
}
EXPORT CUresult cuMemcpyDtoD(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    CUresult r = cuMemcpyDtoDAsync(dst, src, n, nullptr);
    return r ? r : cuCtxSynchronize();
}

// ---- memory pools (the default pool: what cuMemAllocAsync allocates from)

EXPORT CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* pool, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (!pool) return CUDA_ERROR_INVALID_VALUE;
    *pool = reinterpret_cast<CUmemoryPool>(&g_pool_used);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetMemPool(CUmemoryPool* pool, CUdevice d) { return cuDeviceGetDefaultMemPool(pool, d); }

EXPORT CUresult cuMemPoolGetAttribute(CUmemoryPool pool, CUmemPool_attribute a, void* v) {
    Lock l(g_mutex);
    if (pool != reinterpret_cast<CUmemoryPool>(&g_pool_used) || !v) return CUDA_ERROR_INVALID_VALUE;
    switch (a) {
        case CU_MEMPOOL_ATTR_USED_MEM_CURRENT:
        case CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT: *(uint64_t*)v = g_pool_used; break;
        case CU_MEMPOOL_ATTR_USED_MEM_HIGH:
        case CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH: *(uint64_t*)v = g_pool_high; break;
        case CU_MEMPOOL_ATTR_RELEASE_THRESHOLD: *(uint64_t*)v = 0; break;
        default: *(int*)v = 0;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuMemPoolSetAttribute(CUmemoryPool pool, CUmemPool_attribute a, void* v) {
    Lock l(g_mutex);
    if (pool != reinterpret_cast<CUmemoryPool>(&g_pool_used) || !v) return CUDA_ERROR_INVALID_VALUE;
    if (a == CU_MEMPOOL_ATTR_USED_MEM_HIGH || a == CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH) {
        if (*(uint64_t*)v != 0) return CUDA_ERROR_INVALID_VALUE;  // only a reset to 0 is allowed
        g_pool_high = g_pool_used;
    }
    return CUDA_SUCCESS;
}

// ---- streams and events

EXPORT CUresult cuStreamCreate(CUstream* out, unsigned int flags) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    *out = reinterpret_cast<CUstream>(new_stream(ctx, flags, ""));
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamCreateWithPriority(CUstream* out, unsigned int flags, int) {
    return cuStreamCreate(out, flags);
}
EXPORT CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = -5;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamDestroy(CUstream h) {
    Lock l(g_mutex);
    if (!g_initialized) return CUDA_ERROR_NOT_INITIALIZED;
    Stream* s = reinterpret_cast<Stream*>(h);
    if (!g_all_streams.count(s) || s == tl_per_thread_stream.get()) return CUDA_ERROR_INVALID_HANDLE;
    // The stream's work stays in the other clocks; only its handle goes.
    g_all_streams.erase(s);
    s->ctx->streams.erase(s);
    (void)s;  // kept allocated: access records may still name its sid
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamGetCtx(CUstream h, CUcontext* out) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    Stream* s = stream_of(ctx, h);
    if (!s) return fail(CUDA_ERROR_INVALID_HANDLE, "cuStreamGetCtx: invalid stream");
    *out = reinterpret_cast<CUcontext>(s->ctx);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamGetCtx_v2(CUstream h, CUcontext* out, CUgreenCtx* green) {
    if (green) *green = nullptr;
    return cuStreamGetCtx(h, out);
}

EXPORT CUresult cuStreamSynchronize(CUstream h) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    Stream* s = stream_of(ctx, h);
    if (!s) return fail(CUDA_ERROR_INVALID_HANDLE, "cuStreamSynchronize: invalid stream");
    host_clock.join(s->clock);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuStreamQuery(CUstream h) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    if (!stream_of(ctx, h)) return CUDA_ERROR_INVALID_HANDLE;
    return CUDA_SUCCESS;  // work runs when issued: always complete
}

EXPORT CUresult cuStreamWaitEvent(CUstream h, CUevent ev, unsigned int) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    Stream* s = stream_of(ctx, h);
    Event* e = reinterpret_cast<Event*>(ev);
    if (!s || !g_events.count(e)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuStreamWaitEvent: invalid stream or event");
    if (e->recorded) s->clock.join(e->clock);  // waiting on a never-recorded event is a no-op
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventCreate(CUevent* out, unsigned int flags) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    Event* e = new Event{ctx};
    e->flags = flags;
    g_events.insert(e);
    *out = reinterpret_cast<CUevent>(e);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventDestroy(CUevent ev) {
    Lock l(g_mutex);
    Event* e = reinterpret_cast<Event*>(ev);
    if (!g_events.erase(e)) return CUDA_ERROR_INVALID_HANDLE;
    delete e;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventRecord(CUevent ev, CUstream h) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    Stream* s = stream_of(ctx, h);
    Event* e = reinterpret_cast<Event*>(ev);
    if (!s || !g_events.count(e)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuEventRecord: invalid stream or event");
    s->clock.join(host_clock);
    e->clock = s->clock;
    e->recorded = true;
    e->host_ms = now_ms();
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventRecordWithFlags(CUevent ev, CUstream h, unsigned int) { return cuEventRecord(ev, h); }

EXPORT CUresult cuEventSynchronize(CUevent ev) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    Event* e = reinterpret_cast<Event*>(ev);
    if (!g_events.count(e)) return CUDA_ERROR_INVALID_HANDLE;
    if (e->recorded) host_clock.join(e->clock);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventQuery(CUevent ev) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    if (!g_events.count(reinterpret_cast<Event*>(ev))) return CUDA_ERROR_INVALID_HANDLE;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    Event *x = reinterpret_cast<Event*>(a), *y = reinterpret_cast<Event*>(b);
    if (!ms || !g_events.count(x) || !g_events.count(y)) return CUDA_ERROR_INVALID_HANDLE;
    if (!x->recorded || !y->recorded) return CUDA_ERROR_INVALID_HANDLE;
    if ((x->flags | y->flags) & CU_EVENT_DISABLE_TIMING) return CUDA_ERROR_INVALID_HANDLE;
    // Host time between the two records (the emulator's own speed, not a GPU's).
    *ms = (float)(y->host_ms - x->host_ms);
    return CUDA_SUCCESS;
}

// ---- modules and functions

EXPORT CUresult cuModuleLoadData(CUmodule* out, const void* image) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    if (!out || !image) return CUDA_ERROR_INVALID_VALUE;
    auto m = std::make_unique<Module>();
    m->ctx = ctx;
    size_t bytes = 0;
    std::string err;
    if (!read_fatbin((const unsigned char*)image, cfg.arch->cc / 10, cfg.arch->cc % 10, m->cubin, bytes, err)) {
        const CUresult code = err.rfind("no machine code", 0) == 0 ? CUDA_ERROR_NO_BINARY_FOR_GPU : CUDA_ERROR_INVALID_IMAGE;
        return fail(code, "cuModuleLoadData: " + err);
    }
    Module* raw = m.release();
    g_modules.insert(raw);
    *out = reinterpret_cast<CUmodule>(raw);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuModuleLoadDataEx(CUmodule* out, const void* image, unsigned int, CUjit_option*, void**) {
    return cuModuleLoadData(out, image);
}
EXPORT CUresult cuModuleLoadFatBinary(CUmodule* out, const void* image) { return cuModuleLoadData(out, image); }

EXPORT CUresult cuModuleUnload(CUmodule h) {
    Lock l(g_mutex);
    Module* m = reinterpret_cast<Module*>(h);
    if (!g_modules.count(m) || m->unloaded) return CUDA_ERROR_INVALID_HANDLE;
    m->unloaded = true;  // its functions become invalid; the memory stays (names in messages)
    for (auto& [name, f] : m->functions) g_functions.erase(f.get());
    return CUDA_SUCCESS;
}

EXPORT CUresult cuModuleGetFunction(CUfunction* out, CUmodule h, const char* name) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    Module* m = reinterpret_cast<Module*>(h);
    if (!out || !name) return CUDA_ERROR_INVALID_VALUE;
    if (!g_modules.count(m) || m->unloaded) return CUDA_ERROR_INVALID_HANDLE;
    auto found = m->functions.find(name);
    if (found != m->functions.end()) {
        *out = reinterpret_cast<CUfunction>(found->second.get());
        return CUDA_SUCCESS;
    }
    auto ck = m->cubin.kernels.find(name);
    if (ck == m->cubin.kernels.end()) return CUDA_ERROR_NOT_FOUND;  // as the driver: not in the image
    auto hk = g_host_kernels.find(name);
    if (hk == g_host_kernels.end())
        return fail(CUDA_ERROR_NOT_SUPPORTED, std::string("kernel ") + name +
                                                  " is in the module's cubin but has no host build in the emulated device (rebuild it: scripts/emulated-cuda)");
    const EmuKernelEntry* e = hk->second.entry;
    const CubinKernel& k = ck->second;
    if (e->nparams != k.params.size())
        return fail(CUDA_ERROR_INVALID_IMAGE, std::string("kernel ") + name + ": the cubin has " +
                                                  std::to_string(k.params.size()) + " parameters, its host build " +
                                                  std::to_string(e->nparams) + " (stale emulated device?)");
    for (uint32_t i = 0; i < e->nparams; ++i)
        if (e->params[i].size != k.params[i].size)
            return fail(CUDA_ERROR_INVALID_IMAGE,
                        std::string("kernel ") + name + ": parameter " + std::to_string(i) + " is " +
                            std::to_string(k.params[i].size) + " bytes in the sm_" + std::to_string(m->cubin.arch) +
                            " cubin and " + std::to_string(e->params[i].size) + " bytes (" + e->params[i].type +
                            ") in its host build");
    auto f = std::make_unique<Function>();
    f->module = m;
    f->cubin = k;
    f->host = e;
    f->max_dynamic_smem = SMEM_PER_BLOCK - (int)k.static_smem;
    Function* raw = f.get();
    m->functions[name] = std::move(f);
    g_functions.insert(raw);
    *out = reinterpret_cast<CUfunction>(raw);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuFuncGetAttribute(int* v, CUfunction_attribute a, CUfunction h) {
    Lock l(g_mutex);
    Function* f = reinterpret_cast<Function*>(h);
    if (!v || !g_functions.count(f)) return CUDA_ERROR_INVALID_HANDLE;
    const CubinKernel& k = f->cubin;
    switch (a) {
        case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: {
            int m = k.max_threads ? (int)k.max_threads : 1024;
            if (k.registers) m = std::min(m, REGS_PER_BLOCK / (int)(((k.registers + 7) / 8) * 8) / 32 * 32);
            *v = m;
            break;
        }
        case CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: *v = (int)k.static_smem; break;
        case CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES: *v = 0; break;
        case CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES: *v = 0; break;
        case CU_FUNC_ATTRIBUTE_NUM_REGS: *v = (int)k.registers; break;
        case CU_FUNC_ATTRIBUTE_PTX_VERSION: *v = f->module->cubin.arch; break;
        case CU_FUNC_ATTRIBUTE_BINARY_VERSION: *v = f->module->cubin.arch; break;
        case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: *v = f->max_dynamic_smem; break;
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}

EXPORT CUresult cuFuncSetAttribute(CUfunction h, CUfunction_attribute a, int value) {
    Lock l(g_mutex);
    Function* f = reinterpret_cast<Function*>(h);
    if (!g_functions.count(f)) return CUDA_ERROR_INVALID_HANDLE;
    if (a == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) {
        // "The sum of this value and the function attribute CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES
        // cannot exceed the device attribute CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN."
        if (value < 0 || value + (int)f->cubin.static_smem > cfg.arch->smem_optin)
            return fail(CUDA_ERROR_INVALID_VALUE,
                        "cuFuncSetAttribute(" + f->cubin.name + ", MAX_DYNAMIC_SHARED_SIZE_BYTES, " +
                            std::to_string(value) + "): with " + std::to_string(f->cubin.static_smem) +
                            " bytes of static shared memory the sm_" + std::to_string(cfg.arch->cc) +
                            " opt-in maximum is " + std::to_string(cfg.arch->smem_optin) + " bytes per block");
        f->max_dynamic_smem = value;
        return CUDA_SUCCESS;
    }
    if (a == CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT) return CUDA_SUCCESS;
    return fail(CUDA_ERROR_INVALID_VALUE, "cuFuncSetAttribute: attribute " + std::to_string((int)a) + " is not settable");
}

EXPORT CUresult cuFuncSetCacheConfig(CUfunction h, CUfunc_cache) {
    Lock l(g_mutex);
    return g_functions.count(reinterpret_cast<Function*>(h)) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

EXPORT CUresult cuLaunchKernel(CUfunction h, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned smem, CUstream hs, void** params, void** extra) {
    EmuLaunchDesc desc{};
    const EmuKernelEntry* entry = nullptr;
    Ctx* ctx = nullptr;
    std::string kname;
    std::vector<uintptr_t> given;  // the allocations the kernel was given (their starts)
    {
        Lock l(g_mutex);
        if (CUresult r = enter(&ctx)) return r;
        Function* f = reinterpret_cast<Function*>(h);
        if (!g_functions.count(f)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuLaunchKernel: invalid function handle");
        const CubinKernel& k = f->cubin;
        kname = k.name;
        const char* name = k.name.c_str();
        Stream* s = stream_of(ctx, hs);
        if (!s) return fail(CUDA_ERROR_INVALID_HANDLE, std::string("cuLaunchKernel(") + name + "): invalid stream");
        char b[512];
        // Limits of the device (CUDA C++ Programming Guide, "Compute Capabilities").
        const uint64_t threads = (uint64_t)bx * by * bz;
        if (bx == 0 || by == 0 || bz == 0 || bx > 1024 || by > 1024 || bz > 64 || threads > 1024) {
            std::snprintf(b, sizeof b, "%s: block (%u, %u, %u): each dimension ≥ 1, x and y ≤ 1024, z ≤ 64, and at most 1024 threads", name, bx, by, bz);
            return fail(CUDA_ERROR_INVALID_VALUE, b);
        }
        if (gx == 0 || gy == 0 || gz == 0 || gx > 2147483647u || gy > 65535 || gz > 65535) {
            std::snprintf(b, sizeof b, "%s: grid (%u, %u, %u): each dimension ≥ 1, x < 2^31, y and z ≤ 65535", name, gx, gy, gz);
            return fail(CUDA_ERROR_INVALID_VALUE, b);
        }
        // The kernel's own limits: __launch_bounds__ and its registers.
        if (k.max_threads && threads > k.max_threads) {
            std::snprintf(b, sizeof b, "%s: %" PRIu64 " threads per block, but it was compiled with __launch_bounds__(%u)", name, threads, k.max_threads);
            return fail(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, b);
        }
        if (k.registers) {
            const uint64_t per_warp = (uint64_t)((k.registers + 7) / 8 * 8) * 32;
            const uint64_t need = (threads + 31) / 32 * per_warp;
            if (need > REGS_PER_BLOCK) {
                std::snprintf(b, sizeof b, "%s: %u registers per thread × %" PRIu64 " threads need %" PRIu64 " registers, a block has %d", name, k.registers, threads, need, REGS_PER_BLOCK);
                return fail(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, b);
            }
        }
        // Shared memory: static + dynamic ≤ 48 KiB unless the function opted in to more dynamic
        // shared memory with cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES).
        if ((int)smem > f->max_dynamic_smem) {
            std::snprintf(b, sizeof b,
                          "%s: %u bytes of dynamic shared memory, above the function's maximum of %d "
                          "(%u bytes static; dynamic shared memory beyond 48 KiB needs "
                          "cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES), up to %d bytes per block on sm_%d)",
                          name, smem, f->max_dynamic_smem, k.static_smem, cfg.arch->smem_optin, cfg.arch->cc);
            return fail(CUDA_ERROR_INVALID_VALUE, b);
        }
        if (extra) return fail(CUDA_ERROR_INVALID_VALUE, std::string(name) + ": the `extra` launch argument is not emulated");
        entry = f->host;
        if (entry->nparams && !params) return fail(CUDA_ERROR_INVALID_VALUE, std::string(name) + ": null kernelParams");
        // Pointer parameters: inside a live allocation, and ordered against other streams.
        std::vector<Touch> touches;
        for (uint32_t i = 0; i < entry->nparams; ++i) {
            const EmuParamInfo& p = entry->params[i];
            if (!params[i]) return fail(CUDA_ERROR_INVALID_VALUE, std::string(name) + ": kernelParams[" + std::to_string(i) + "] is null");
            const std::string operand = "parameter " + std::to_string(i) + " (" + p.type + ")";
            if (p.kind == EMU_PARAM_CONST_PTR || p.kind == EMU_PARAM_PTR) {
                uint64_t v;
                std::memcpy(&v, params[i], 8);
                if (v == 0) continue;
                if (!find_live(v, true))
                    return fail_sticky(ctx, CUDA_ERROR_ILLEGAL_ADDRESS,
                                       std::string(name) + ": " + operand + " = " + describe_address(v) +
                                           " (a pointer parameter must point into a live device allocation)");
                touches.push_back({v, p.kind == EMU_PARAM_PTR, operand});
            } else if (p.kind == EMU_PARAM_AGGREGATE) {
                for (uint32_t o = 0; o + 8 <= p.size; o += 8) {
                    uint64_t v;
                    std::memcpy(&v, (const unsigned char*)params[i] + o, 8);
                    if (v == 0) continue;
                    if (find_live(v, true)) {
                        touches.push_back({v, true, operand + " field at byte " + std::to_string(o)});
                    } else if (find_freed(v)) {
                        return fail_sticky(ctx, CUDA_ERROR_ILLEGAL_ADDRESS,
                                           std::string(name) + ": " + operand + " field at byte " + std::to_string(o) +
                                               " = " + describe_address(v));
                    }
                }
            }
        }
        const uint64_t epoch = tick(s);
        for (const Touch& t : touches) {
            Alloc* a = find_live(t.ptr, true);
            std::string race = order_access(a, s, epoch, t.write, name);
            if (!race.empty()) return fail_sticky(ctx, CUDA_ERROR_ILLEGAL_STATE, race + " (" + t.operand + ")");
            given.push_back((uintptr_t)a->ptr);
        }
        desc.grid = {gx, gy, gz};
        desc.block = {bx, by, bz};
        desc.dyn_smem = smem_region(smem);
        desc.dyn_bytes = smem;
        if (!desc.dyn_smem) return fail(CUDA_ERROR_OUT_OF_MEMORY, std::string(name) + ": no host memory for shared memory");
    }
    // Run the grid outside the lock (other host threads launch their own kernels meanwhile).
    tl_fault.clear();
    const double t0 = cfg.trace ? now_ms() : 0.0;
    const int rc = entry->run(params, &desc);
    if (cfg.trace)
        std::fprintf(stderr, "emulated CUDA device: launch %s grid (%u, %u, %u) block (%u, %u, %u) smem %u: %.3f ms\n",
                     kname.c_str(), gx, gy, gz, bx, by, bz, smem, now_ms() - t0);
    if (rc != 0) {
        Lock l(g_mutex);
        return fail_sticky(ctx, CUDA_ERROR_ILLEGAL_ADDRESS, kname + ": " + (tl_fault.empty() ? "kernel fault" : tl_fault));
    }
    Lock l(g_mutex);
    for (uintptr_t p : given) {
        auto it = g_live.find(p);
        if (it == g_live.end()) continue;  // freed meanwhile by another host thread
        std::string overrun = check_canary(it->second);
        if (!overrun.empty()) return fail_sticky(ctx, CUDA_ERROR_ILLEGAL_ADDRESS, kname + ": " + overrun);
    }
    return CUDA_SUCCESS;
}

// =============================================================================================
// For the modules and cuBLAS (abi.h).

EXPORT void fused_infonce_emu_enter_kernel(sigjmp_buf* jb, const void* block_idx, const void* thread_idx) {
    stack_t ss;
    if (sigaltstack(nullptr, &ss) == 0 && (ss.ss_flags & SS_DISABLE)) {
        // Faults on a fiber's stack (its guard page) need a stack of their own to be reported.
        tl_altstack.resize(64 * 1024);
        stack_t mine{};
        mine.ss_sp = tl_altstack.data();
        mine.ss_size = tl_altstack.size();
        sigaltstack(&mine, nullptr);
    }
    tl_block = (const unsigned*)block_idx;
    tl_thread = (const unsigned*)thread_idx;
    tl_kernel_jb = jb;
}

EXPORT void fused_infonce_emu_leave_kernel(void) {
    tl_kernel_jb = nullptr;
}

EXPORT void fused_infonce_emu_report_fault(const char* what, uint64_t value, const void* block_idx,
                                           const void* thread_idx) {
    tl_block = (const unsigned*)block_idx;
    tl_thread = (const unsigned*)thread_idx;
    char b[64];
    std::snprintf(b, sizeof b, " (%#" PRIx64 ")", value);
    tl_fault = std::string(what) + (value ? b : "") + " in " + where();
    tl_kernel_jb = nullptr;
}

EXPORT int fused_infonce_emu_begin_op(void* stream, const char* what, uint64_t* epoch) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    Stream* s = stream_of(ctx, (CUstream)stream);
    if (!s) return fail(CUDA_ERROR_INVALID_HANDLE, std::string(what) + ": invalid stream");
    *epoch = tick(s);
    return CUDA_SUCCESS;
}

EXPORT int fused_infonce_emu_access(void* stream, uint64_t epoch, uint64_t ptr, uint64_t bytes, int write,
                                    const char* what, const char* operand) {
    Lock l(g_mutex);
    Ctx* ctx;
    if (CUresult r = enter(&ctx)) return r;
    Stream* s = stream_of(ctx, (CUstream)stream);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    return access(ctx, s, epoch, ptr, bytes, write != 0, what, operand, true);
}

EXPORT void fused_infonce_emu_fail(int code, const char* message) {
    Lock l(g_mutex);
    fail_sticky(current(), (CUresult)code, message);
}
