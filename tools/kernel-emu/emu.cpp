#include "emu.h"
#include <ucontext.h>
#include <cstdio>
#include <cstdlib>
dim3e threadIdx, blockIdx;
dim3e blockDim, gridDim;
Barrier block_barrier;
Barrier warp_barriers[32];
uint64_t warp_xch[32][32];
std::mutex atomic_mutex;
static ucontext_t sched_ctx;
struct Fiber { ucontext_t ctx; std::vector<char> stack; bool done; };
static std::vector<Fiber> fibers;
static unsigned cur;
static const std::function<void()>* cur_body;
void emu_yield() { swapcontext(&fibers[cur].ctx, &sched_ctx); }
static void fiber_main() {
    cur_body->operator()();
    fibers[cur].done = true;
    swapcontext(&fibers[cur].ctx, &sched_ctx);
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
                f.stack.resize(256 * 1024); f.done = false;
                getcontext(&f.ctx);
                f.ctx.uc_stack.ss_sp = f.stack.data(); f.ctx.uc_stack.ss_size = f.stack.size(); f.ctx.uc_link = nullptr;
                makecontext(&f.ctx, fiber_main, 0);
            }
            unsigned left = threads;
            while (left) {
                for (unsigned t = 0; t < threads; ++t) {
                    if (fibers[t].done) continue;
                    cur = t; threadIdx.x = t; threadIdx.y = threadIdx.z = 0;
                    swapcontext(&sched_ctx, &fibers[t].ctx);
                    if (fibers[t].done) --left;
                }
            }
        }
}
