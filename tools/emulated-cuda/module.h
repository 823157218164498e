// The entry-point table of one host-built kernel module (emu_<module>.so), included after the
// module's kernels (kernels/<module>.cu through the emulator's shim) in a translation unit that
// the build writes:
//
//     #include "emu.h"
//     #include "shim/<module>.cu"
//     #include "module.h"
//     EMU_MODULE_BEGIN
//     EMU_KERNEL(<entry point>)   (one per `extern "C" __global__` function of the module)
//     EMU_MODULE_END
//
// Each EMU_KERNEL is a template instance over the kernel's own function type, so the parameters
// are unpacked from cuLaunchKernel's `void** kernelParams` by the kernel's signature, with no
// signature written twice; the driver checks the parameter sizes against the cubin's.
#pragma once
#include <csetjmp>
#include <cstring>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

#include "abi.h"
#include "emu.h"

template <class T> constexpr uint8_t emu_param_kind() {
    if constexpr (std::is_pointer_v<T>)
        return std::is_const_v<std::remove_pointer_t<T>> ? EMU_PARAM_CONST_PTR : EMU_PARAM_PTR;
    else if constexpr (std::is_class_v<T>)
        return EMU_PARAM_AGGREGATE;
    else
        return EMU_PARAM_VALUE;
}

// The spelling of T, from the compiler's signature of this function ("... [with T = int*]").
template <class T> const char* emu_type_name() {
    // This function's own signature (inside a lambda __PRETTY_FUNCTION__ would name the lambda).
    static const std::string name = [](std::string_view f) {
        const size_t a = f.find("T = ") + 4, b = f.find_first_of(";]", a);
        return std::string(f.substr(a, b - a));
    }(__PRETTY_FUNCTION__);
    return name.c_str();
}

namespace emu_module {
inline thread_local sigjmp_buf* recover = nullptr;

[[noreturn]] inline void on_fault(const char* what, uint64_t v) {
    fused_infonce_emu_report_fault(what, v, &blockIdx, &threadIdx);
    siglongjmp(*recover, 1);
}

// After a kernel: tensor-core modules check that no cp.async copy was left in flight.
inline const char* after_kernel() {
#ifdef EMU_MMA_H
    emu_cp_reset();
    if (emu_cp_leaked) {
        emu_cp_leaked = 0;
        return "cp.async copies were still in flight when the kernel exited (a missing cp.async.wait_group)";
    }
#endif
    return nullptr;
}

// Runs the grid on this host thread; a fault (emu_fail, or a signal the driver catches) abandons
// the launch and returns 1.
inline int run_grid(const EmuLaunchDesc* d, const std::function<void()>& body) {
    sigjmp_buf jb;
    if (sigsetjmp(jb, 1)) {
        emu_set_fault_handler(nullptr);
        emu_reset_after_fault();
        fused_infonce_emu_leave_kernel();
        after_kernel();
        recover = nullptr;
        return 1;
    }
    recover = &jb;
    emu_set_fault_handler(on_fault);
    fused_infonce_emu_enter_kernel(&jb, &blockIdx, &threadIdx);
    emu_run_grid({d->grid.x, d->grid.y, d->grid.z}, {d->block.x, d->block.y, d->block.z}, d->dyn_smem,
                 d->dyn_bytes, true, body);
    fused_infonce_emu_leave_kernel();
    emu_set_fault_handler(nullptr);
    recover = nullptr;
    if (const char* leak = after_kernel()) {
        fused_infonce_emu_report_fault(leak, 0, &blockIdx, &threadIdx);
        return 1;
    }
    return 0;
}
}  // namespace emu_module

template <auto F> struct EmuEntry;
template <class... A, void (*F)(A...)> struct EmuEntry<F> {
    static inline const EmuParamInfo params[sizeof...(A) + 1] = {
        {(uint32_t)sizeof(A), emu_param_kind<A>(), emu_type_name<A>()}..., {0, 0, nullptr}};
    static int run(void** p, const EmuLaunchDesc* d) {
        return run_with(p, d, std::index_sequence_for<A...>{});
    }
    template <size_t... I> static int run_with(void** p, const EmuLaunchDesc* d, std::index_sequence<I...>) {
        // Each argument is copied out of the caller's storage (as the driver copies it into the
        // constant bank), then every thread calls the kernel with the copies.
        std::tuple<A...> args;
        ((std::memcpy((void*)&std::get<I>(args), p[I], sizeof(A))), ...);
        (void)p;
        return emu_module::run_grid(d, [&] { std::apply(F, args); });
    }
};

#define EMU_MODULE_BEGIN static const EmuKernelEntry emu_module_entries[] = {
#define EMU_KERNEL(name) {#name, (uint32_t)(std::size(EmuEntry<&name>::params) - 1), EmuEntry<&name>::params, &EmuEntry<&name>::run},
#define EMU_MODULE_END                                                                             \
    {nullptr, 0, nullptr, nullptr}};                                                               \
    extern "C" __attribute__((visibility("default"))) const EmuKernelEntry*                       \
    fused_infonce_emu_module_table(uint32_t* count) {                                              \
        *count = (uint32_t)(std::size(emu_module_entries) - 1);                                    \
        return emu_module_entries;                                                                 \
    }
