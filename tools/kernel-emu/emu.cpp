#include "emu.h"
#include <ucontext.h>
#include <csetjmp>
#include <setjmp.h>
#include <cstdio>
#include <cstdlib>
dim3e threadIdx, blockIdx;
dim3e blockDim, gridDim;
Barrier block_barrier;
Barrier warp_barriers[32];
uint64_t warp_xch[32][32];
std::mutex atomic_mutex;
// Fibers start on their own stack through ucontext (makecontext/setcontext) and then switch
// with _setjmp/_longjmp, which, unlike swapcontext, make no signal-mask system call per switch
// (the emulator switches at every barrier and shuffle). build.sh compiles without
// _FORTIFY_SOURCE, whose longjmp check rejects jumps between stacks.
static jmp_buf sched_jb;
struct Fiber { ucontext_t ctx; jmp_buf jb; std::vector<char> stack; bool done, started; };
static std::vector<Fiber> fibers;
static unsigned cur;
static const std::function<void()>* cur_body;
void emu_yield() {
    if (!_setjmp(fibers[cur].jb)) _longjmp(sched_jb, 1);
}
static void fiber_main() {
    cur_body->operator()();
    fibers[cur].done = true;
    _longjmp(sched_jb, 1);
}
void launch(unsigned gx, unsigned gy, unsigned threads, std::function<void()> body) {
    blockDim.x = threads; blockDim.y = blockDim.z = 1; gridDim.x = gx; gridDim.y = gy; gridDim.z = 1;
    fibers.resize(threads);
    cur_body = &body;
    for (unsigned by = 0; by < gy; ++by)
        for (unsigned bx = 0; bx < gx; ++bx) {
            blockIdx.x = bx; blockIdx.y = by; blockIdx.z = 0;
            block_barrier.init(threads);
            for (unsigned w = 0; w < (threads + 31) / 32; ++w) warp_barriers[w].init(std::min(32u, threads - 32 * w));
            for (unsigned t = 0; t < threads; ++t) {
                Fiber& f = fibers[t];
                f.stack.resize(256 * 1024); f.done = false; f.started = false;
                getcontext(&f.ctx);
                f.ctx.uc_stack.ss_sp = f.stack.data(); f.ctx.uc_stack.ss_size = f.stack.size(); f.ctx.uc_link = nullptr;
                makecontext(&f.ctx, fiber_main, 0);
            }
            unsigned left = threads;
            while (left) {
                for (unsigned t = 0; t < threads; ++t) {
                    if (fibers[t].done) continue;
                    cur = t; threadIdx.x = t; threadIdx.y = threadIdx.z = 0;
                    if (!_setjmp(sched_jb)) {
                        if (!fibers[t].started) { fibers[t].started = true; setcontext(&fibers[t].ctx); }
                        _longjmp(fibers[t].jb, 1);
                    }
                    if (fibers[t].done) --left;
                }
            }
        }
}
