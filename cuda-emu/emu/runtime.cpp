// The emulated device: block scheduling over fibers, barriers, warp exchange, the int8 mma, and
// guarded device memory. See emu.h for the execution model.
//
// Under a sanitizer (build.rs defines TERN_EMU_SANITIZE_ADDRESS or TERN_EMU_SANITIZE_THREAD; this
// file itself is compiled without instrumentation, the kernels with it):
// - AddressSanitizer is told of every stack switch (__sanitizer_{start,finish}_switch_fiber), and
//   device memory comes from its allocator (redzones on both sides instead of guard pages).
// - ThreadSanitizer sees each CUDA thread as a fiber of its own (__tsan_create_fiber), switched
//   without synchronization, so that two threads of a block are unordered except where the kernel
//   synchronizes: a barrier or warp exchange is a release by every arriving thread and an acquire
//   by every leaving one, on a sync address per block (per warp) and barrier generation. Blocks
//   run on one OS thread are ordered (release at a fiber's exit, acquire at the next block's start).
#include "emu.h"

#if defined(TERN_EMU_SANITIZE_ADDRESS)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
// Options built into the test binary: stop at the first report with a failing status, and no leak
// check (the Rust test harness exits with live allocations).
extern "C" const char* __asan_default_options() {
    return "halt_on_error=1:exitcode=1:detect_leaks=0:verify_asan_link_order=0";
}
#endif
#if defined(TERN_EMU_SANITIZE_THREAD)
#include <sanitizer/tsan_interface.h>
extern "C" const char* __tsan_default_options() { return "halt_on_error=1:exitcode=66"; }
// The Rust code (the test harness, std's channels and atomics) is not instrumented, so TSan sees
// its memcpys but not its synchronization (the CPU backend's worker threads, for one): races with a
// Rust frame on either stack are not the kernels'. Such a frame is named by its v0-mangled symbol
// (`_R`) or, where debug info resolves it (inlined frames), by its `.rs` source file. A kernel's
// accesses run on fibers whose stacks hold no Rust frame.
extern "C" const char* __tsan_default_suppressions() { return "race:^_R\nrace:.rs$\n"; }
#endif

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

// Switching fibers: on x86-64 a few instructions that save the callee-saved registers on the old
// stack and pop them from the new one (swapcontext would also make a signal-mask system call per
// switch, which dominates the emulation's time); elsewhere swapcontext.
#if defined(__x86_64__)
extern "C" void tern_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl tern_emu_switch
    .type tern_emu_switch, @function
tern_emu_switch:
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
    .size tern_emu_switch, .-tern_emu_switch
    .section .note.GNU-stack, "", @progbits
    .text
)");
struct Context {
    void* sp;
    const void* stack_bottom = nullptr;  // for AddressSanitizer
    size_t stack_size = 0;
    void* tsan_fiber = nullptr;  // for ThreadSanitizer
};
#else
struct Context {
    ucontext_t uc;
    const void* stack_bottom = nullptr;
    size_t stack_size = 0;
    void* tsan_fiber = nullptr;
};
#endif

namespace emu {

thread_local Coords coords;

namespace {

enum State { READY, AT_BLOCK, AT_WARP, DONE };

struct Fiber {
    Context ctx;
    State state;
    uint3 tid;
    char* stack;
};

constexpr size_t STACK = 256 << 10;

// One OS thread's scheduler: it runs the blocks it takes, one at a time.
struct Scheduler {
    Context main;
    std::vector<Fiber> fibers;
    std::vector<unsigned char> slots;  // 64 bytes per thread: each warp's exchange area
    int current = 0;
    // Barrier generations of the block and of each warp (ThreadSanitizer's sync addresses: two per
    // block or warp, alternating, so that a thread leaving barrier k never acquires what a faster
    // thread released at barrier k + 1).
    unsigned block_gen = 0;
    std::vector<unsigned> warp_gen;
    char block_sync[2], start_sync, done_sync;
    std::vector<char> warp_sync;
    void (*body)(void**) = nullptr;
    void** args = nullptr;
};
thread_local Scheduler* sched = nullptr;

// The kernel and block running on this OS thread, for the memory-fault message.
thread_local const char* running_kernel = nullptr;

// Called on the stack just switched to, with the fake stack saved when it was left.
void arrived(void* fake_stack, bool in_fiber) {
#if defined(TERN_EMU_SANITIZE_ADDRESS)
    const void* bottom;
    size_t size;
    __sanitizer_finish_switch_fiber(fake_stack, &bottom, &size);
    if (in_fiber) {  // the stack left is the scheduler's
        sched->main.stack_bottom = bottom;
        sched->main.stack_size = size;
    }
#else
    (void)fake_stack;
    (void)in_fiber;
#endif
}

// Switches from the running context to `to`; `exiting`: `from` never runs again.
void jump(Context& from, Context& to, bool exiting = false) {
    void* fake_stack = nullptr;
#if defined(TERN_EMU_SANITIZE_ADDRESS)
    __sanitizer_start_switch_fiber(exiting ? nullptr : &fake_stack, to.stack_bottom, to.stack_size);
#else
    (void)exiting;
#endif
#if defined(TERN_EMU_SANITIZE_THREAD)
    __tsan_switch_to_fiber(to.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(__x86_64__)
    tern_emu_switch(&from.sp, to.sp);
#else
    swapcontext(&from.uc, &to.uc);
#endif
    arrived(fake_stack, &from != &sched->main);
}

void fiber_main() {
    arrived(nullptr, true);
    Scheduler* s = sched;
#if defined(TERN_EMU_SANITIZE_THREAD)
    __tsan_acquire(&s->start_sync);
#endif
    s->body(s->args);
    s->fibers[s->current].state = DONE;
#if defined(TERN_EMU_SANITIZE_THREAD)
    __tsan_release(&s->done_sync);
#endif
    jump(s->fibers[s->current].ctx, s->main, true);
    __builtin_unreachable();
}

// Makes `f` start in fiber_main on its own stack when first switched to.
void prepare(Fiber& f) {
#if defined(__x86_64__)
    // The stack as tern_emu_switch leaves it: six saved registers, then the return address;
    // fiber_main is entered like a called function (its stack pointer 8 bytes off 16).
    uintptr_t top = ((uintptr_t)f.stack + STACK) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;  // fiber_main's own return address: it never returns
    *--sp = (void*)&fiber_main;
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    f.ctx.sp = sp;
#else
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = f.stack;
    f.ctx.uc.uc_stack.ss_size = STACK;
    f.ctx.uc.uc_link = nullptr;
    makecontext(&f.ctx.uc, fiber_main, 0);
#endif
}

void wait_at(State st) {
    Scheduler* s = sched;
    Fiber& f = s->fibers[s->current];
    f.state = st;
    jump(f.ctx, s->main);
}

char* new_stack() {
    // A guard page below the stack turns an overflow into a fault instead of silent corruption.
    char* p = (char*)mmap(nullptr, STACK + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        perror("cuda-emu: fiber stack");
        abort();
    }
    mprotect(p, 4096, PROT_NONE);
#if defined(TERN_EMU_SANITIZE_ADDRESS)
    // The mapping may reuse addresses of a freed stack whose frames never returned (an abandoned
    // block): clear their poisoned redzones.
    __asan_unpoison_memory_region(p + 4096, STACK);
#endif
    return p + 4096;
}

void free_stack(Fiber& f) {
    munmap(f.stack - 4096, STACK + 4096);
#if defined(TERN_EMU_SANITIZE_THREAD)
    __tsan_destroy_fiber(f.ctx.tsan_fiber);
#endif
}

// Runs one block to completion; returns an error message, or an empty string.
std::string run_block(Scheduler& s, const uint3 block_dim, bool reverse) {
    const int n = (int)(block_dim.x * block_dim.y * block_dim.z);
    if ((int)s.fibers.size() < n) {
        const size_t old = s.fibers.size();
        s.fibers.resize(n);
        for (size_t i = old; i < (size_t)n; ++i) {
            Fiber& f = s.fibers[i];
            f.stack = new_stack();
            f.ctx.stack_bottom = f.stack;
            f.ctx.stack_size = STACK;
#if defined(TERN_EMU_SANITIZE_THREAD)
            f.ctx.tsan_fiber = __tsan_create_fiber(0);
#endif
        }
    }
    const int warps = (n + 31) / 32;
    s.warp_gen.assign(warps, 0);
    s.warp_sync.resize(2 * warps);
    s.slots.assign((size_t)n * 64 + 64 * 32, 0);
    for (int i = 0; i < n; ++i) {
        Fiber& f = s.fibers[i];
        f.state = READY;
        f.tid = {(unsigned)i % block_dim.x, (unsigned)(i / block_dim.x) % block_dim.y,
                 (unsigned)(i / (block_dim.x * block_dim.y))};
        prepare(f);
    }
#if defined(TERN_EMU_SANITIZE_THREAD)
    __tsan_release(&s.start_sync);  // what came before (the previous block, the host) to every thread
#endif
    for (;;) {
        for (int k = 0; k < n; ++k) {
            const int i = reverse ? n - 1 - k : k;
            if (s.fibers[i].state != READY) continue;
            s.current = i;
            coords.thread = s.fibers[i].tid;
            jump(s.main, s.fibers[i].ctx);
        }
        bool released = false, all_done = true, all_at_block = true;
        for (int w = 0; w < n; w += 32) {
            const int end = std::min(w + 32, n);
            bool waiting = false, others = false;
            for (int i = w; i < end; ++i) {
                const State st = s.fibers[i].state;
                waiting |= st == AT_WARP;
                others |= st != AT_WARP && st != DONE;
            }
            if (waiting && !others) {
                for (int i = w; i < end; ++i)
                    if (s.fibers[i].state == AT_WARP) s.fibers[i].state = READY;
                ++s.warp_gen[w / 32];
                released = true;
            }
        }
        for (int i = 0; i < n; ++i) {
            all_done &= s.fibers[i].state == DONE;
            all_at_block &= s.fibers[i].state == AT_BLOCK || s.fibers[i].state == DONE;
        }
        if (all_done) {
#if defined(TERN_EMU_SANITIZE_THREAD)
            __tsan_acquire(&s.done_sync);
#endif
            return "";
        }
        if (released) continue;
        if (all_at_block) {
            for (int i = 0; i < n; ++i)
                if (s.fibers[i].state == AT_BLOCK) s.fibers[i].state = READY;
            ++s.block_gen;
            continue;
        }
        int at_block = 0, at_warp = 0, done = 0;
        for (int i = 0; i < n; ++i) {
            at_block += s.fibers[i].state == AT_BLOCK;
            at_warp += s.fibers[i].state == AT_WARP;
            done += s.fibers[i].state == DONE;
        }
        return "deadlock: " + std::to_string(at_block) + " threads wait at __syncthreads, " +
               std::to_string(at_warp) + " at a warp exchange whose warp has threads elsewhere, " +
               std::to_string(done) + " have exited";
    }
}

void on_fault(int sig, siginfo_t* info, void*) {
    char msg[256];
    const int len = snprintf(msg, sizeof msg,
                             "cuda-emu: memory fault at %p in kernel %s, block (%u,%u,%u), thread %u: "
                             "an access outside its device allocations\n",
                             info->si_addr, running_kernel ? running_kernel : "(none)", coords.block.x,
                             coords.block.y, coords.block.z, coords.thread.x);
    if (write(2, msg, len) < 0) {
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

void install_fault_handler() {
#if defined(TERN_EMU_SANITIZE_ADDRESS)
    return;  // AddressSanitizer reports faults itself, with the faulting stack
#endif
    static std::once_flag once;
    std::call_once(once, [] {
        // The handler runs on its own stack: a fiber's stack overflow faults too.
        static char alt[1 << 16];
        stack_t ss{};
        ss.ss_sp = alt;
        ss.ss_size = sizeof alt;
        sigaltstack(&ss, nullptr);
        struct sigaction sa {};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigaction(SIGSEGV, &sa, nullptr);
        sigaction(SIGBUS, &sa, nullptr);
    });
}

}  // namespace

void sync_block() {
#if defined(TERN_EMU_SANITIZE_THREAD)
    char* at = &sched->block_sync[sched->block_gen & 1];
    __tsan_release(at);
#endif
    wait_at(AT_BLOCK);
#if defined(TERN_EMU_SANITIZE_THREAD)
    __tsan_acquire(at);
#endif
}

void sync_warp() {
#if defined(TERN_EMU_SANITIZE_THREAD)
    const int w = sched->current / 32;
    char* at = &sched->warp_sync[2 * w + (sched->warp_gen[w] & 1)];
    __tsan_release(at);
#endif
    wait_at(AT_WARP);
#if defined(TERN_EMU_SANITIZE_THREAD)
    __tsan_acquire(at);
#endif
}

unsigned char* warp_slots() {
    Scheduler* s = sched;
    return s->slots.data() + (size_t)(s->current & ~31) * 64;
}

void mma_m16n8k32_s8(int* c, const unsigned* a, const unsigned* b) {
    // Every lane publishes its fragments, then computes its own four accumulators from the
    // whole warp's A (16 × 32, row-major) and B (32 × 8, column-major) per the PTX ISA's tables
    // for mma.m16n8k32 with .s8 (g = lane / 4, t = lane % 4):
    //   A register r of lane (g, t): row g + 8·(r & 1), k = 4t + 16·(r >> 1) + byte;
    //   B register r of lane (g, t): column g, k = 4t + 16·r + byte;
    //   C register r of lane (g, t): row g + 8·(r >> 1), column 2t + (r & 1).
    struct Frag {
        unsigned a[4], b[2];
    };
    const unsigned lane = threadIdx.x & 31;
    unsigned char* slots = warp_slots();
    const Frag mine = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
    std::memcpy(slots + 64 * lane, &mine, sizeof mine);
    sync_warp();
    const auto frag = [&](unsigned l) {
        Frag f;
        std::memcpy(&f, slots + 64 * l, sizeof f);
        return f;
    };
    const auto byte = [](unsigned word, int k) { return (int)(int8_t)(word >> (8 * (k & 3))); };
    const unsigned g = lane >> 2, t = lane & 3;
    int out[4];
    for (int r = 0; r < 4; ++r) {
        const unsigned row = g + 8 * (r >> 1), col = 2 * t + (r & 1);
        int acc = c[r];
        for (int k = 0; k < 32; ++k) {
            const unsigned holder = (k & 15) >> 2;  // t of the lanes holding column k of A / row k of B
            const int av = byte(frag((row & 7) * 4 + holder).a[(row >> 3) + 2 * (k >> 4)], k);
            const int bv = byte(frag(col * 4 + holder).b[k >> 4], k);
            acc += av * bv;
        }
        out[r] = acc;
    }
    sync_warp();
    for (int r = 0; r < 4; ++r) c[r] = out[r];
}

int run_grid(const char* name, const unsigned* grid, const unsigned* block, int reverse,
             void (*body)(void**), void** args, char* err, size_t err_len) {
    install_fault_handler();
#if defined(TERN_EMU_SANITIZE_ADDRESS)
    // Shared memory is one static copy under AddressSanitizer (emu.h): launches from several host
    // threads (tests running in parallel) take turns, or their blocks would share it.
    static std::mutex one_launch;
    const std::lock_guard<std::mutex> turn(one_launch);
#endif
    const uint3 grid_dim = {grid[0], grid[1], grid[2]}, block_dim = {block[0], block[1], block[2]};
    const size_t threads = (size_t)block[0] * block[1] * block[2];
    const size_t blocks = (size_t)grid[0] * grid[1] * grid[2];
    std::string error;
    if (threads == 0 || threads > 1024 || blocks == 0)
        error = "invalid launch: " + std::to_string(blocks) + " blocks of " + std::to_string(threads) +
                " threads";
    else if (grid[1] > 65535 || grid[2] > 65535 || grid[0] > 0x7fffffffu)
        error = "grid past CUDA's limits";
    std::atomic<size_t> next{0};
    std::mutex lock;
    const auto worker = [&] {
        Scheduler s;
        s.body = body;
        s.args = args;
        sched = &s;
#if defined(TERN_EMU_SANITIZE_THREAD)
        s.main.tsan_fiber = __tsan_get_current_fiber();
#endif
        running_kernel = name;
        coords.grid_dim = grid_dim;
        coords.block_dim = block_dim;
        for (size_t i; (i = next.fetch_add(1)) < blocks;) {
            coords.block = {(unsigned)(i % grid[0]), (unsigned)(i / grid[0] % grid[1]),
                            (unsigned)(i / ((size_t)grid[0] * grid[1]))};
            std::string e = run_block(s, block_dim, reverse != 0);
            if (!e.empty()) {
                std::lock_guard<std::mutex> g(lock);
                if (error.empty())
                    error = e + " (block " + std::to_string(coords.block.x) + "," +
                            std::to_string(coords.block.y) + "," + std::to_string(coords.block.z) + ")";
                next = blocks;
            }
        }
        // Abandoned fibers of a failed block are only stacks: freed with them.
        for (Fiber& f : s.fibers) free_stack(f);
        sched = nullptr;
        running_kernel = nullptr;
    };
    if (error.empty()) {
        const char* env = getenv("TERN_EMU_THREADS");
        size_t n = env ? (size_t)atoi(env) : std::thread::hardware_concurrency();
#if defined(TERN_EMU_SANITIZE_ADDRESS)
        n = 1;  // shared memory is one static copy under AddressSanitizer (see emu.h)
#endif
        n = std::max<size_t>(1, std::min(n, blocks));
        std::vector<std::thread> pool;
        for (size_t i = 1; i < n; ++i) pool.emplace_back(worker);
        worker();
        for (auto& t : pool) t.join();
    }
    if (error.empty()) return 0;
    snprintf(err, err_len, "%s: %s", name, error.c_str());
    return 1;
}

}  // namespace emu

extern "C" {

// Device memory: zeroed, 4-byte aligned, ending exactly at an inaccessible page (and starting
// after one), so that reading or writing past either end faults at once.
void* tern_emu_alloc(size_t bytes) {
#if defined(TERN_EMU_SANITIZE_ADDRESS)
    // AddressSanitizer's redzones catch accesses past either end, to the byte.
    return calloc(std::max<size_t>(bytes, 1), 1);
#endif
    const size_t page = 4096, len = (std::max<size_t>(bytes, 1) + 3) & ~(size_t)3;
    const size_t pages = (len + page - 1) / page;
    char* base = (char*)mmap(nullptr, (pages + 2) * page, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return nullptr;
    mprotect(base, page, PROT_NONE);
    mprotect(base + (pages + 1) * page, page, PROT_NONE);
    return base + (pages + 1) * page - len;
}

void tern_emu_free(void* p, size_t bytes) {
    if (!p) return;
#if defined(TERN_EMU_SANITIZE_ADDRESS)
    free(p);
    return;
#endif
    const size_t page = 4096, len = (std::max<size_t>(bytes, 1) + 3) & ~(size_t)3;
    const size_t pages = (len + page - 1) / page;
    char* end = (char*)p + len;
    munmap(end - (pages + 1) * page, (pages + 2) * page);
}
}
