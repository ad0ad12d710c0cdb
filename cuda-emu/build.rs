//! Compiles every `cuda/*.cu` that src/backend/cuda/kernels.rs lists, as C++ with the emulated
//! device of `emu/` (each file with `cuda/common.cuh` before it, as NVRTC sees it), plus one entry
//! point per kernel and a table naming them. The kernel list is read from kernels.rs, so it is
//! written once. The C structs of the kernel sources (`struct Name {` ... `};`, one field per
//! declarator) are exported with their sizes and field offsets (`tern_emu_layout`), which a test
//! compares with the Rust mirrors in src/backend/cuda/params.rs.
//!
//! `TERN_CUDA_EMU_SANITIZE=address` or `=thread` builds the kernels with AddressSanitizer or
//! ThreadSanitizer (the runtime, emu/runtime.cpp, uninstrumented but telling the sanitizer of its
//! fibers and barriers) and links the sanitizer's runtime library into whatever links this crate.
//! The Rust code is not instrumented.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let repo = root.parent().unwrap().to_path_buf();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let kernels_rs = repo.join("src/backend/cuda/kernels.rs");
    let text = std::fs::read_to_string(&kernels_rs).expect("src/backend/cuda/kernels.rs");
    // `file: "x.cu", code: ..., entries: &["a", "b"]` for each Source.
    let mut sources: Vec<(String, Vec<String>)> = Vec::new();
    let list = text
        .split("pub const SOURCES")
        .nth(1)
        .and_then(|t| t.split("\n];").next())
        .expect("`pub const SOURCES: [Source; N] = [...];` in kernels.rs");
    for part in list.split("file: ").skip(1) {
        let file = if part.starts_with('"') {
            part.split('"').nth(1).unwrap().to_string()
        } else {
            // `file: MMA_SOURCE`: the constant's value.
            let name = part.split(',').next().unwrap().trim();
            let def = text
                .split(&format!("const {name}: &str = "))
                .nth(1)
                .unwrap_or_else(|| panic!("constant {name} in kernels.rs"));
            def.split('"').nth(1).unwrap().to_string()
        };
        let list = part
            .split("entries: &[")
            .nth(1)
            .unwrap()
            .split(']')
            .next()
            .unwrap();
        let entries = list
            .split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect();
        sources.push((file, entries));
    }
    assert!(
        sources.len() >= 7,
        "kernels.rs lists {} sources",
        sources.len()
    );

    println!("cargo:rerun-if-env-changed=TERN_CUDA_EMU_SANITIZE");
    let sanitize = match std::env::var("TERN_CUDA_EMU_SANITIZE").as_deref() {
        Err(_) | Ok("") => None,
        Ok(s @ ("address" | "thread")) => Some(s.to_string()),
        Ok(other) => panic!("TERN_CUDA_EMU_SANITIZE={other}: expected `address` or `thread`"),
    };
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .include(root.join("emu"))
        .include(repo.join("cuda"))
        // Like NVRTC's --fmad=false: no fused multiply-add, IEEE floats.
        .flag("-ffp-contract=off")
        .flag("-fno-fast-math")
        // The kernels store through `uint4*` casts of u32 arrays, as CUDA code does.
        .flag("-fno-strict-aliasing")
        .flag("-pthread")
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unused-function");
    if let Some(s) = &sanitize {
        build
            .define(&format!("TERN_EMU_SANITIZE_{}", s.to_uppercase()), None)
            // Reports with whole stacks and lines.
            .opt_level(1)
            .debug(true)
            .flag("-fno-omit-frame-pointer");
    }
    let mut runtime = build.clone();
    runtime.file(root.join("emu/runtime.cpp"));
    if let Some(s) = &sanitize {
        build.flag(format!("-fsanitize={s}"));
    }
    let mut registry = String::from("#include <cstddef>\n#include <cstring>\n");
    let mut table = String::new();
    let mut layouts = String::new();
    let common = std::fs::read_to_string(repo.join("cuda/common.cuh")).unwrap();
    for (i, (file, entries)) in sources.iter().enumerate() {
        let mut unit = format!(
            "#include \"emu.h\"\n#include \"common.cuh\"\n#include \"{file}\"\n#include \"dispatch.h\"\n"
        );
        // This file's structs (and common.cuh's, with the first file).
        let mut code = std::fs::read_to_string(repo.join("cuda").join(file)).unwrap();
        if i == 0 {
            code.push_str(&common);
        }
        let stem = file.trim_end_matches(".cu");
        unit.push_str(&layout_table(stem, &code));
        writeln!(
            registry,
            "extern \"C\" long tern_emu_layout_{stem}(const char*, int, const char**);"
        )
        .unwrap();
        writeln!(layouts, "    tern_emu_layout_{stem},").unwrap();
        for e in entries {
            writeln!(unit, "EMU_ENTRY({e})").unwrap();
            writeln!(
                registry,
                "extern \"C\" int tern_emu_{e}(const unsigned*, const unsigned*, void**, int, char*, size_t);"
            )
            .unwrap();
            writeln!(table, "    {{\"{e}\", tern_emu_{e}}},").unwrap();
        }
        let path = out.join(format!("{}.cpp", file.trim_end_matches(".cu")));
        std::fs::write(&path, unit).unwrap();
        build.file(&path);
        println!(
            "cargo:rerun-if-changed={}",
            repo.join("cuda").join(file).display()
        );
    }
    write!(
        registry,
        "typedef int (*Entry)(const unsigned*, const unsigned*, void**, int, char*, size_t);\n\
         static const struct {{ const char* name; Entry entry; }} KERNELS[] = {{\n{table}}};\n\
         extern \"C\" int tern_emu_launch(const char* name, const unsigned* grid, const unsigned* block,\n\
                                          void** args, int reverse, char* err, size_t err_len) {{\n\
             for (const auto& k : KERNELS)\n\
                 if (std::strcmp(k.name, name) == 0) return k.entry(grid, block, args, reverse, err, err_len);\n\
             return -1;\n\
         }}\n\
         // sizeof(struct `name`) for field -1, else the offset of its `field`-th field (its name\n\
         // in *field_name); -1 past the last field or for an unknown struct.\n\
         extern \"C\" long tern_emu_layout(const char* name, int field, const char** field_name) {{\n\
             long (*const files[])(const char*, int, const char**) = {{\n{layouts}}};\n\
             for (auto f : files) {{\n\
                 const long r = f(name, field, field_name);\n\
                 if (r != -2) return r;\n\
             }}\n\
             return -1;\n\
         }}\n"
    )
    .unwrap();
    let registry_path = out.join("registry.cpp");
    std::fs::write(&registry_path, registry).unwrap();
    build.file(&registry_path);
    build.compile("tern_cuda_emu");
    // After the kernels, which call it.
    runtime.compile("tern_cuda_emu_runtime");
    if let Some(s) = &sanitize {
        // libasan / libtsan of the C++ compiler (shared: the interceptors must be in the process).
        let lib = if s == "address" { "asan" } else { "tsan" };
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
    println!("cargo:rustc-link-lib=stdc++");
    println!(
        "cargo:rerun-if-changed={}",
        repo.join("cuda/common.cuh").display()
    );
    for f in ["emu/emu.h", "emu/dispatch.h", "emu/runtime.cpp"] {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    println!("cargo:rerun-if-changed={}", kernels_rs.display());
}

/// `tern_emu_layout_<stem>(name, field, field_name)`: the layout of every `struct Name {...};` in
/// `code` (sizeof for field -1, else the field's offset and name; -1 past the last field, -2 for a
/// struct not defined here).
fn layout_table(stem: &str, code: &str) -> String {
    let mut rows = String::new();
    for part in code.split("\nstruct ").skip(1) {
        let Some((name, rest)) = part.split_once(" {") else {
            continue;
        };
        if rest.starts_with('}') {
            continue; // an empty tag type
        }
        let body = rest.split("\n};").next().unwrap();
        writeln!(rows, "    {{\"{name}\", -1, nullptr, sizeof({name})}},").unwrap();
        let declarators = body.split(';').flat_map(|decl| decl.split(','));
        let mut index = 0;
        for d in declarators {
            // The last identifier of a declarator is the field's name (`const float* x`, `kv_heads`).
            let Some(field) = d
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .rfind(|w| !w.is_empty())
            else {
                continue;
            };
            writeln!(
                rows,
                "    {{\"{name}\", {index}, \"{field}\", offsetof({name}, {field})}},"
            )
            .unwrap();
            index += 1;
        }
    }
    format!(
        "#include <cstddef>\n#include <cstring>\n\
         static const struct {{ const char* name; int field; const char* field_name; size_t value; }} LAYOUT[] = {{\n\
         {rows}    {{nullptr, 0, nullptr, 0}}}};\n\
         extern \"C\" long tern_emu_layout_{stem}(const char* name, int field, const char** field_name) {{\n\
             bool known = false;\n\
             for (const auto* r = LAYOUT; r->name; ++r) {{\n\
                 if (std::strcmp(r->name, name) != 0) continue;\n\
                 known = true;\n\
                 if (r->field == field) {{\n\
                     if (field_name) *field_name = r->field_name;\n\
                     return (long)r->value;\n\
                 }}\n\
             }}\n\
             return known ? -1 : -2;\n\
         }}\n"
    )
}
