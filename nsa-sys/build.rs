//! Compiles the C++ glue in `glue/` against the same libtorch headers torch-sys uses.
//!
//! torch-sys declares `links = "tch"` and prints `cargo:libtorch_lib=…`, so this build script
//! sees `DEP_TCH_LIBTORCH_LIB` (the `lib/` folder of the libtorch that torch-sys linked).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=glue");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB")
            .expect("torch-sys did not export DEP_TCH_LIBTORCH_LIB (is tch =0.24.0 in the tree?)"),
    );
    let root = lib
        .parent()
        .expect("libtorch lib dir has a parent")
        .to_path_buf();
    let include = root.join("include");
    let mut files: Vec<PathBuf> = std::fs::read_dir("glue")
        .expect("nsa-sys/glue exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cpp"))
        .collect();
    files.sort();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .files(&files)
        .compile("nsa_glue");
    println!("cargo:rustc-link-search=native={}", lib.display());
}
