#include "cubin.h"

#include <cstring>

namespace {

template <class T> bool rd(const unsigned char* base, size_t size, size_t off, T& v) {
    if (off > size || size - off < sizeof(T)) return false;
    std::memcpy(&v, base + off, sizeof(T));
    return true;
}

constexpr uint32_t FATBIN_MAGIC = 0xBA55ED50u;
constexpr uint8_t EIFMT_NVAL = 1, EIFMT_BVAL = 2, EIFMT_HVAL = 3, EIFMT_SVAL = 4;
constexpr uint8_t EIATTR_MAX_THREADS = 0x05, EIATTR_KPARAM_INFO = 0x17,
                  EIATTR_CBANK_PARAM_SIZE = 0x19, EIATTR_REGCOUNT = 0x2f;

struct Section {
    std::string name;
    uint32_t type = 0, link = 0, info = 0;
    uint64_t offset = 0, size = 0;
};

// Walks the attribute records of a .nv.info section: fn(format, attribute, payload, length).
template <class F> bool walk_info(const unsigned char* d, size_t n, F fn) {
    size_t i = 0;
    while (i + 4 <= n) {
        const uint8_t fmt = d[i], attr = d[i + 1];
        if (fmt == EIFMT_NVAL || fmt == EIFMT_BVAL || fmt == EIFMT_HVAL) {
            fn(fmt, attr, d + i + 2, 2);
            i += 4;
        } else if (fmt == EIFMT_SVAL) {
            uint16_t len;
            std::memcpy(&len, d + i + 2, 2);
            if (i + 4 + len > n) return false;
            fn(fmt, attr, d + i + 4, len);
            i += 4 + len;
        } else {
            return false;
        }
    }
    return i == n;
}

}  // namespace

bool read_cubin(const unsigned char* elf, size_t bytes, Cubin& out, std::string& error) {
    if (bytes < 64 || std::memcmp(elf, "\x7f" "ELF", 4) != 0 || elf[4] != 2) {
        error = "not a 64-bit ELF cubin";
        return false;
    }
    uint64_t shoff = 0;
    uint16_t shentsize = 0, shnum = 0, shstrndx = 0;
    if (!rd(elf, bytes, 0x28, shoff) || !rd(elf, bytes, 0x3a, shentsize) ||
        !rd(elf, bytes, 0x3c, shnum) || !rd(elf, bytes, 0x3e, shstrndx) || shentsize < 64 ||
        shstrndx >= shnum) {
        error = "cubin: bad ELF header";
        return false;
    }
    std::vector<Section> secs(shnum);
    std::vector<uint32_t> name_off(shnum);
    for (uint16_t i = 0; i < shnum; ++i) {
        const size_t h = shoff + (size_t)i * shentsize;
        Section& s = secs[i];
        if (!rd(elf, bytes, h, name_off[i]) || !rd(elf, bytes, h + 4, s.type) ||
            !rd(elf, bytes, h + 24, s.offset) || !rd(elf, bytes, h + 32, s.size) ||
            !rd(elf, bytes, h + 40, s.link) || !rd(elf, bytes, h + 44, s.info)) {
            error = "cubin: section header out of range";
            return false;
        }
    }
    const Section& strs = secs[shstrndx];
    for (uint16_t i = 0; i < shnum; ++i) {
        const uint64_t o = strs.offset + name_off[i];
        if (o >= bytes) {
            error = "cubin: section name out of range";
            return false;
        }
        secs[i].name = std::string((const char*)elf + o, strnlen((const char*)elf + o, bytes - o));
    }
    auto data_ok = [&](const Section& s) { return s.type == 8 /* NOBITS */ || s.offset + s.size <= bytes; };

    // Kernels: global STT_FUNC symbols whose section is .text.<name>.
    const Section* symtab = nullptr;
    for (const Section& s : secs)
        if (s.type == 2 /* SYMTAB */) symtab = &s;
    if (!symtab || !data_ok(*symtab) || symtab->link >= shnum) {
        error = "cubin: no symbol table";
        return false;
    }
    const Section& symstr = secs[symtab->link];
    std::vector<std::string> sym_names(symtab->size / 24);
    bool reserved = false;
    for (const Section& s : secs)
        if (s.name.rfind(".nv.shared.reserved", 0) == 0) reserved = true;
    for (size_t k = 0; k < symtab->size / 24; ++k) {
        const size_t o = symtab->offset + k * 24;
        uint32_t nm;
        uint8_t info;
        uint16_t shndx;
        if (!rd(elf, bytes, o, nm) || !rd(elf, bytes, o + 4, info) || !rd(elf, bytes, o + 6, shndx)) break;
        const uint64_t so = symstr.offset + nm;
        if (so >= bytes) continue;
        sym_names[k] = std::string((const char*)elf + so, strnlen((const char*)elf + so, bytes - so));
        const int type = info & 0xf, bind = info >> 4;
        if (type != 2 /* FUNC */ || bind != 1 /* GLOBAL */ || shndx >= shnum) continue;
        if (secs[shndx].name != ".text." + sym_names[k]) continue;
        CubinKernel kern;
        kern.name = sym_names[k];
        kern.registers = secs[shndx].info >> 24;  // older cubins; EIATTR_REGCOUNT below wins
        out.kernels[kern.name] = kern;
    }
    for (const Section& s : secs) {
        if (!data_ok(s)) continue;
        const unsigned char* d = elf + s.offset;
        if (s.name == ".nv.info") {
            const bool ok = walk_info(d, s.size, [&](uint8_t fmt, uint8_t attr, const unsigned char* p, size_t n) {
                if (fmt != EIFMT_SVAL || attr != EIATTR_REGCOUNT || n < 8) return;
                uint32_t sym, regs;
                std::memcpy(&sym, p, 4);
                std::memcpy(&regs, p + 4, 4);
                if (sym < sym_names.size()) {
                    auto it = out.kernels.find(sym_names[sym]);
                    if (it != out.kernels.end()) it->second.registers = regs;
                }
            });
            if (!ok) {
                error = "cubin: unreadable .nv.info";
                return false;
            }
        } else if (s.name.rfind(".nv.info.", 0) == 0) {
            auto it = out.kernels.find(s.name.substr(9));
            if (it == out.kernels.end()) continue;
            CubinKernel& kern = it->second;
            const bool ok = walk_info(d, s.size, [&](uint8_t fmt, uint8_t attr, const unsigned char* p, size_t n) {
                if (fmt == EIFMT_SVAL && attr == EIATTR_KPARAM_INFO && n >= 12) {
                    uint16_t ordinal, offset;
                    uint32_t flags;
                    std::memcpy(&ordinal, p + 4, 2);
                    std::memcpy(&offset, p + 6, 2);
                    std::memcpy(&flags, p + 8, 4);
                    kern.params.push_back({ordinal, offset, flags >> 18});
                } else if (fmt == EIFMT_HVAL && attr == EIATTR_CBANK_PARAM_SIZE) {
                    uint16_t v;
                    std::memcpy(&v, p, 2);
                    kern.param_bytes = v;
                } else if (fmt == EIFMT_SVAL && attr == EIATTR_MAX_THREADS && n >= 12) {
                    uint32_t x, y, z;
                    std::memcpy(&x, p, 4);
                    std::memcpy(&y, p + 4, 4);
                    std::memcpy(&z, p + 8, 4);
                    kern.max_threads = x * y * z;
                }
            });
            if (!ok) {
                error = "cubin: unreadable " + s.name;
                return false;
            }
        } else if (s.name.rfind(".nv.shared.", 0) == 0 && s.name.rfind(".nv.shared.reserved", 0) != 0) {
            auto it = out.kernels.find(s.name.substr(11));
            if (it == out.kernels.end()) continue;
            uint64_t sz = s.size;
            if (reserved && sz >= 1024) {
                it->second.reserved_smem = 1024;
                sz -= 1024;
            }
            it->second.static_smem = (uint32_t)sz;
        }
    }
    for (auto& [name, kern] : out.kernels) {
        std::vector<CubinParam> by(kern.params.size());
        for (const CubinParam& p : kern.params) {
            if (p.ordinal >= by.size()) {
                error = "cubin: kernel " + name + " has a parameter ordinal out of range";
                return false;
            }
            by[p.ordinal] = p;
        }
        kern.params = by;
    }
    return true;
}

bool read_fatbin(const unsigned char* image, int major, int minor, Cubin& out, size_t& image_bytes,
                 std::string& error) {
    uint32_t magic;
    uint16_t header;
    uint64_t payload;
    std::memcpy(&magic, image, 4);
    if (magic != FATBIN_MAGIC) {
        error = "the image is not a fatbin (the emulated device loads nvcc -fatbin output only)";
        return false;
    }
    std::memcpy(&header, image + 6, 2);
    std::memcpy(&payload, image + 8, 8);
    image_bytes = header + payload;
    const unsigned char* best = nullptr;
    uint64_t best_size = 0;
    int best_arch = -1;
    std::string seen;
    for (uint64_t off = header; off + 32 <= header + payload;) {
        uint16_t kind;
        uint32_t eh, arch;
        uint64_t size;
        std::memcpy(&kind, image + off, 2);
        std::memcpy(&eh, image + off + 4, 4);
        std::memcpy(&size, image + off + 8, 8);
        std::memcpy(&arch, image + off + 28, 4);
        seen += std::string(seen.empty() ? "" : ", ") + (kind == 1 ? "compute_" : "sm_") + std::to_string(arch);
        // Machine code for sm_XY runs on a device X.Z with Z ≥ Y (same major).
        if (kind == 2 && (int)arch / 10 == major && (int)arch % 10 <= minor && (int)arch > best_arch) {
            best = image + off + eh;
            best_size = size;
            best_arch = (int)arch;
        }
        off += eh + size;
    }
    if (!best) {
        error = "no machine code for sm_" + std::to_string(major * 10 + minor) + " in the fatbin (it holds " +
                seen + "; the emulated device does not JIT-compile PTX)";
        return false;
    }
    if (std::memcmp(best, "\x7f" "ELF", 4) != 0) {
        error = "the sm_" + std::to_string(best_arch) + " entry is compressed, which the emulated device does not read";
        return false;
    }
    out.arch = best_arch;
    return read_cubin(best, best_size, out, error);
}
