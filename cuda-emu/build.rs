//! Compiles every `cuda/*.cu` that src/backend/cuda/kernels.rs lists, as C++ with the emulated
//! device of `emu/` (each file with `cuda/common.cuh` before it, as NVRTC sees it), plus one entry
//! point per kernel and a table naming them. The kernel list is read from kernels.rs, so it is
//! written once.

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
        .flag_if_supported("-Wno-unused-function")
        .file(root.join("emu/runtime.cpp"));
    let mut registry = String::from("#include <cstddef>\n#include <cstring>\n");
    let mut table = String::new();
    for (file, entries) in &sources {
        let mut unit = format!(
            "#include \"emu.h\"\n#include \"common.cuh\"\n#include \"{file}\"\n#include \"dispatch.h\"\n"
        );
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
         }}\n"
    )
    .unwrap();
    let registry_path = out.join("registry.cpp");
    std::fs::write(&registry_path, registry).unwrap();
    build.file(&registry_path);
    build.compile("tern_cuda_emu");
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
