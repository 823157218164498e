// What the emulated driver reads from a module image: the fatbin container (as nvcc -fatbin writes
// it), the machine code (cubin, an ELF) for the emulated device's architecture, and from that ELF
// each kernel's parameters, static shared memory, launch bounds and registers.
//
// Fatbin: a header (magic 0xBA55ED50, u16 version, u16 header size, u64 payload size) and
// entries, each with its own header: u16 kind (1 PTX, 2 ELF) at 0, u32 header size at 4, u64
// payload size at 8, u32 architecture at 28 (80 for sm_80).
//
// Cubin sections read (EIATTR codes checked against `cuobjdump -elf` of this build's cubins):
//   .text.<k>          a kernel (with a global STT_FUNC symbol <k>)
//   .nv.info.<k>       attributes: EIATTR_KPARAM_INFO (0x17: u32 index, u16 ordinal, u16 offset,
//                      u32 flags with the size in bits 18..31), EIATTR_CBANK_PARAM_SIZE (0x19),
//                      EIATTR_MAX_THREADS (0x05: x, y, z from __launch_bounds__)
//   .nv.info           EIATTR_REGCOUNT (0x2f: u32 symbol index, u32 registers) per kernel
//   .nv.shared.<k>     static shared memory; in sm_90 cubins (which also have a
//                      .nv.shared.reserved.0 section) it includes the 1 KiB the system reserves
//                      per block, which does not count against the 48 KiB limit
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

struct CubinParam {
    uint32_t ordinal, offset, size;
};

struct CubinKernel {
    std::string name;
    std::vector<CubinParam> params;  // by ordinal
    uint32_t param_bytes = 0;        // EIATTR_CBANK_PARAM_SIZE
    uint32_t static_smem = 0;        // user static shared memory (reserved 1 KiB excluded)
    uint32_t reserved_smem = 0;      // the system's reserved shared memory found in the section
    uint32_t max_threads = 0;        // __launch_bounds__ (0: none)
    uint32_t registers = 0;          // per thread
};

struct Cubin {
    int arch = 0;  // e.g. 90
    std::map<std::string, CubinKernel> kernels;
};

// Parses a fatbin and the cubin in it for architecture `arch` (the newest sm_<major><y> with y ≤
// the device's minor, as the driver picks). Returns false with `error` set when the image is not
// a fatbin, holds no cubin this device can run (PTX is not JIT-compiled by the emulated device),
// or the cubin cannot be read. `image_bytes` is the size of the whole fatbin (out).
bool read_fatbin(const unsigned char* image, int major, int minor, Cubin& out, size_t& image_bytes,
                 std::string& error);
// Parses one cubin (ELF) into `out`.
bool read_cubin(const unsigned char* elf, size_t bytes, Cubin& out, std::string& error);
