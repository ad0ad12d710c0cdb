// Entry points of the emulated kernels: `tern_emu_<kernel>(grid, block, args, reverse, err, len)`
// calls the kernel once per thread with its arguments read from `args` (one pointer per parameter,
// as cuLaunchKernel takes them).
#pragma once
#include <cstddef>
#include <type_traits>
#include <utility>

namespace emu {
int run_grid(const char* name, const unsigned* grid, const unsigned* block, int reverse,
             void (*body)(void**), void** args, char* err, size_t err_len);

template <typename... A, size_t... I>
void invoke(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}
template <typename... A>
void invoke(void (*kernel)(A...), void** args) {
    invoke(kernel, args, std::index_sequence_for<A...>{});
}
}  // namespace emu

#define EMU_ENTRY(NAME)                                                                          \
    static void emu_body_##NAME(void** args) { emu::invoke(&NAME, args); }                      \
    extern "C" int tern_emu_##NAME(const unsigned* grid, const unsigned* block, void** args,     \
                                   int reverse, char* err, size_t err_len) {                     \
        return emu::run_grid(#NAME, grid, block, reverse, emu_body_##NAME, args, err, err_len); \
    }
