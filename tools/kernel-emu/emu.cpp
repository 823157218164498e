#include "emu.h"
#include <ucontext.h>
#include <csetjmp>
#include <setjmp.h>
#include <sys/mman.h>
#include <cstdio>
#include <cstdlib>
#include <vector>

EmuKernelState* emu_k() {
    static thread_local EmuKernelState k;
    return &k;
}

static thread_local EmuFaultHandler fault_handler = nullptr;
void emu_set_fault_handler(EmuFaultHandler handler) { fault_handler = handler; }

[[noreturn]] void emu_fail(const char* what, uint64_t v) {
    if (fault_handler) fault_handler(what, v);  // does not return
    std::fprintf(stderr, "EMU FAULT: %s (%#llx) block (%u, %u, %u) thread (%u, %u, %u)\n", what,
                 (unsigned long long)v, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x,
                 threadIdx.y, threadIdx.z);
    std::abort();
}

// Fibers: one per CUDA thread of a block, each on its own mmap'ed stack (committed only as touched,
// with a guard page below so an overflow faults instead of corrupting a neighbour). A fiber is
// started once per host thread and then runs block after block: its main loop runs the kernel
// body, marks itself done and parks until the next block. The emulator switches at every barrier
// and shuffle, so the switch is a few instructions: on x86-64 it saves the callee-saved registers
// on the stack and swaps stack pointers (no system call, none of longjmp's unwinding; the
// floating-point control words are left alone, as nothing here changes rounding modes); elsewhere
// it falls back to ucontext's swapcontext.
namespace {
constexpr size_t STACK_BYTES = 256 * 1024;
constexpr size_t GUARD_BYTES = 4096;

#if defined(__x86_64__)
extern "C" void emu_ctx_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .hidden emu_ctx_switch
    .type emu_ctx_switch,@function
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_switch, .-emu_ctx_switch
)");
struct FiberCtx {
    void* sp = nullptr;
};
void ctx_switch(FiberCtx& from, FiberCtx& to) { emu_ctx_switch(&from.sp, to.sp); }
// A fresh stack that "returns" into `entry` on the first switch to it (the frame emu_ctx_switch
// pops: r15…rbp, the return address; above it a zero return address for `entry`, so that `entry`
// starts with the stack alignment of a called function).
void ctx_init(FiberCtx& c, unsigned char* stack, size_t bytes, void (*entry)()) {
    uint64_t* top = (uint64_t*)(((uintptr_t)(stack + bytes)) & ~(uintptr_t)15);
    uint64_t* sp = top - 8;
    for (int i = 0; i < 6; ++i) sp[i] = 0;  // r15, r14, r13, r12, rbx, rbp
    sp[6] = (uint64_t)entry;
    sp[7] = 0;
    c.sp = sp;
}
#else
struct FiberCtx {
    ucontext_t uc;
};
void ctx_switch(FiberCtx& from, FiberCtx& to) { swapcontext(&from.uc, &to.uc); }
void ctx_init(FiberCtx& c, unsigned char* stack, size_t bytes, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif

struct Fiber {
    FiberCtx ctx;
    unsigned char* stack = nullptr;
    bool done = true, started = false;
};
// The scheduler's state, one per host thread.
struct Sched {
    FiberCtx ctx;
    std::vector<Fiber> fibers;
    unsigned cur = 0;
    const std::function<void()>* body = nullptr;
    std::vector<dim3e> thread_ids;
    std::vector<unsigned> queue;  // runnable fibers, a ring of `fibers.size()` slots
    size_t head = 0, tail = 0;    // head: next to run; tail: next free slot (mod size)
    unsigned char* dyn_smem = nullptr;
    size_t dyn_bytes = 0;
    unsigned long launches = 0;
};
Sched* sched() __attribute__((const));
Sched* sched() {
    static thread_local Sched s;
    return &s;
}

void push(Sched* s, unsigned t) {
    s->queue[s->tail % s->queue.size()] = t;
    ++s->tail;
}

void fiber_main() {
    Sched* s = sched();
    for (;;) {
        (*s->body)();
        Fiber& f = s->fibers[s->cur];
        f.done = true;
        ctx_switch(f.ctx, s->ctx);
    }
}

unsigned char* new_stack() {
    void* p = mmap(nullptr, STACK_BYTES + GUARD_BYTES, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) { std::perror("emu: fiber stack"); std::abort(); }
    mprotect(p, GUARD_BYTES, PROT_NONE);
    return (unsigned char*)p + GUARD_BYTES;
}

}  // namespace

unsigned char* emu_dyn_smem() { return sched()->dyn_smem; }
size_t emu_dyn_smem_bytes() { return sched()->dyn_bytes; }

void emu_wait(Barrier* b) {
    Sched* s = sched();
    b->parked[b->nparked++] = (unsigned short)s->cur;
    ctx_switch(s->fibers[s->cur].ctx, s->ctx);
}

void emu_release(Barrier* b) {
    Sched* s = sched();
    for (int i = 0; i < b->nparked; ++i) push(s, b->parked[i]);
    b->nparked = 0;
}

void emu_reset_after_fault() {
    // The abandoned fibers' stacks hold frames of the faulted kernel: restart them fresh.
    for (Fiber& f : sched()->fibers) {
        f.done = true;
        f.started = false;
    }
}

void emu_run_grid(dim3e grid, dim3e block, unsigned char* dyn_smem, size_t dyn_bytes,
                  bool poison_per_block, const std::function<void()>& body) {
    Sched* s = sched();
    EmuKernelState* k = emu_k();
    const unsigned threads = block.x * block.y * block.z;
    k->block_dim = block;
    k->grid_dim = grid;
    s->dyn_smem = dyn_smem;
    s->dyn_bytes = dyn_bytes;
    while (s->fibers.size() < threads) {
        s->fibers.emplace_back();
        s->fibers.back().stack = new_stack();
    }
    s->thread_ids.resize(threads);
    for (unsigned t = 0; t < threads; ++t)
        s->thread_ids[t] = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    s->queue.assign(threads, 0);
    s->body = &body;
    ++s->launches;
    unsigned long block_no = 0;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx, ++block_no) {
                k->block_idx = {bx, by, bz};
                k->block_bar.init(threads);
                for (unsigned w = 0; w < (threads + 31) / 32; ++w)
                    k->warp_bars[w].init(std::min(32u, threads - 32 * w));
                if (poison_per_block && dyn_bytes) std::memset(dyn_smem, 0xff, dyn_bytes);  // NaN
                const bool reverse = ((block_no + s->launches) & 1) != 0;
                s->head = s->tail = 0;
                for (unsigned i = 0; i < threads; ++i) {
                    const unsigned t = reverse ? threads - 1 - i : i;
                    s->fibers[t].done = false;
                    push(s, t);
                }
                unsigned left = threads;
                while (left) {
                    if (s->head == s->tail) {
                        // Every live thread waits at a barrier that can never complete.
                        const unsigned waiting_block = k->block_bar.waiting, exited = threads - left;
                        k->thread_idx = {0, 0, 0};
                        char msg[200];
                        std::snprintf(msg, sizeof msg,
                                      "deadlock: %u threads wait at a barrier (%u at __syncthreads), "
                                      "%u of the block's %u threads have exited",
                                      left, waiting_block, exited, threads);
                        emu_fail(msg, block_no);
                    }
                    const unsigned t = s->queue[s->head % threads];
                    ++s->head;
                    Fiber& f = s->fibers[t];
                    s->cur = t;
                    k->thread_idx = s->thread_ids[t];
                    if (!f.started) {
                        f.started = true;
                        ctx_init(f.ctx, f.stack, STACK_BYTES, fiber_main);
                    }
                    ctx_switch(s->ctx, f.ctx);
                    if (s->fibers[t].done) --left;
                }
            }
}

namespace {
thread_local std::vector<unsigned char> harness_smem;
}

void launch(unsigned gx, unsigned gy, unsigned threads, std::function<void()> body) {
    if (harness_smem.empty()) harness_smem.assign(64 * 1024, 0xff);
    dim3e g{gx, gy, 1}, b{threads, 1, 1};
    // The harnesses poison shared memory themselves where it matters (mma.cpp), once per launch.
    emu_run_grid(g, b, harness_smem.data(), harness_smem.size(), false, body);
}
