//! Keeps the adapter probe quiet on Linux machines without a display session.
//!
//! wgpu enables every window-system extension a Vulkan instance offers (`VK_KHR_wayland_surface`
//! among them), and its instance hook forbids removing any. Mesa's device-select layer, an
//! implicit layer installed with Mesa's Vulkan drivers, sees that extension and asks the Wayland
//! compositor which GPU drives the display each time the physical devices are enumerated. Without
//! `XDG_RUNTIME_DIR` (a server, a container, a CI job) libwayland-client then prints
//! `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` to stderr, twice per probe:
//! a line that reads like a failure although nothing failed, and tern never shows a window.
//!
//! So in exactly that case, before the first instance is created, libwayland-client's log
//! handler is replaced by one that logs at debug level. Nothing else changes: with no runtime
//! directory no Wayland connection can be made from this process anyway, and stderr is left
//! alone, so other components' messages still reach the user.

use std::ffi::{CStr, c_char, c_void};
use std::path::Path;
use std::sync::Once;

/// wayland-client's `wl_log_func_t`, `void (*)(const char *fmt, va_list args)`. The `va_list` is
/// never read; on the Linux ABIs it occupies one pointer-sized argument (a pointer to the list,
/// or the list itself where it is one pointer), which `*mut c_void` matches.
type LogHandler = unsafe extern "C" fn(fmt: *const c_char, args: *mut c_void);

/// Logs the message's format string (its arguments, if any, are not expanded) at debug level.
unsafe extern "C" fn log_at_debug(fmt: *const c_char, _args: *mut c_void) {
    if fmt.is_null() {
        return;
    }
    // SAFETY: libwayland-client passes its NUL-terminated printf format string, valid for the call.
    let text = unsafe { CStr::from_ptr(fmt) }.to_string_lossy();
    tracing::debug!("wayland-client during the GPU probe: {}", text.trim_end());
}

/// Routes libwayland-client's log to debug level if `XDG_RUNTIME_DIR` is not an absolute path
/// (the case in which it prints the error above) and the library is installed; once per process.
pub fn quiet_without_runtime_dir() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let runtime_dir = std::env::var_os("XDG_RUNTIME_DIR");
        if runtime_dir.is_some_and(|d| Path::new(&d).is_absolute()) {
            return;
        }
        // SAFETY: loads the library the device-select layer itself loads (the same soname, so
        // the same instance with the same log handler); its initialisers set up nothing but
        // static data, and nothing here calls into a display server.
        let Ok(library) = (unsafe { libloading::Library::new("libwayland-client.so.0") }) else {
            return;
        };
        // SAFETY: `wl_log_set_handler_client` is `void (wl_log_func_t handler)` in every
        // libwayland-client release; `log_at_debug` has the handler's signature (see
        // `LogHandler`) and stays valid for the life of the process.
        unsafe {
            if let Ok(set) =
                library.get::<unsafe extern "C" fn(LogHandler)>(b"wl_log_set_handler_client\0")
            {
                set(log_at_debug);
                tracing::debug!("no XDG_RUNTIME_DIR: libwayland-client's messages go to this log");
            }
        }
        // The library keeps a pointer to the handler: keep it loaded for the process's lifetime.
        std::mem::forget(library);
    });
}
