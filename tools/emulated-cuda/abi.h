// The interfaces between the three parts of the emulated CUDA device (README.md):
//   libcuda.so          the driver API (driver.cpp, cubin.cpp): memory, streams, modules, launches;
//   emu_<module>.so     one per kernels/<module>.cu: the host build of its kernels on the
//                       emulator (tools/kernel-emu) and a table of its entry points (module.h);
//   libcublas.so        cuBLAS's GemmEx (cublas.cpp), on the driver's memory and streams.
// Everything here is C ABI; the driver exports the functions below, the modules and cuBLAS import
// them.
#pragma once
#include <csetjmp>
#include <cstddef>
#include <cstdint>

extern "C" {

// How the driver treats a kernel parameter (derived from the kernel's own C++ signature).
enum : uint8_t {
    EMU_PARAM_VALUE = 0,      // a scalar
    EMU_PARAM_CONST_PTR = 1,  // `const T*`: read
    EMU_PARAM_PTR = 2,        // `T*`: written (and read)
    EMU_PARAM_AGGREGATE = 3,  // a struct passed by value: its 8-byte words that point into device
                              // memory count as read and written
};

struct EmuParamInfo {
    uint32_t size;     // sizeof the C++ parameter type
    uint8_t kind;      // EMU_PARAM_*
    const char* type;  // the C++ type, for messages
};

struct EmuDim {
    unsigned x, y, z;
};

struct EmuLaunchDesc {
    EmuDim grid, block;
    unsigned char* dyn_smem;  // the launch's dynamic shared memory (dyn_bytes, then a guard page)
    size_t dyn_bytes;
};

// One entry point of a module: its name, its parameters and the host function that runs a grid
// of it (returns 0, or 1 after a fault the driver has been told about).
struct EmuKernelEntry {
    const char* name;
    uint32_t nparams;
    const EmuParamInfo* params;
    int (*run)(void** params, const EmuLaunchDesc* launch);
};

// Exported by every emu_<module>.so: its entry points.
typedef const EmuKernelEntry* (*EmuModuleTableFn)(uint32_t* count);
#define EMU_MODULE_TABLE_SYMBOL "fused_infonce_emu_module_table"

// ---- exported by libcuda.so, for the modules
// A kernel runs on this host thread from enter to leave: a SIGSEGV/SIGBUS meanwhile (a global
// memory access outside every live allocation: the guard page after each one, a freed one) is
// described (naming the allocation, the block and the thread, read from `block_idx` and
// `thread_idx`, the emulator's thread-local dim3e) and ends in siglongjmp(*jb, 1).
void fused_infonce_emu_enter_kernel(sigjmp_buf* jb, const void* block_idx, const void* thread_idx);
void fused_infonce_emu_leave_kernel(void);
// A fault the emulator found itself (shared-memory bounds, a deadlock, copies in flight).
void fused_infonce_emu_report_fault(const char* what, uint64_t value, const void* block_idx,
                                    const void* thread_idx);

// ---- exported by libcuda.so, for cuBLAS
// Starts an operation `what` on `stream` in the current context: returns its epoch (≥ 1) in
// *epoch, or a CUresult (a sticky error of the context, an invalid stream).
int fused_infonce_emu_begin_op(void* stream, const char* what, uint64_t* epoch);
// Checks that [ptr, ptr + bytes) lies in one live device allocation and records the operation's
// read (write = 0) or write of it, checking the order against the other streams' accesses.
// Returns 0, or a CUresult after which the context holds a sticky error and the diagnostic.
int fused_infonce_emu_access(void* stream, uint64_t epoch, uint64_t ptr, uint64_t bytes, int write,
                             const char* what, const char* operand);
// Makes `code` the context's sticky error with `message` (printed to stderr).
void fused_infonce_emu_fail(int code, const char* message);
}
