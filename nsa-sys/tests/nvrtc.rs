//! NVRTC on the CPU (no GPU needed): every kernel family compiles for sm_80 and sm_90 with an
//! empty log (no error, no warning), compile errors name the kernel and carry the log, and the
//! CUBIN cache serves a second compile from disk.
use nsa_sys::nvrtc::{KernelSource, Nvrtc, NvrtcError, ALL_SOURCES};

fn nvrtc() -> Nvrtc {
    // Maps libtorch (and so finds the torch wheel's NVRTC) the way every binary does.
    nsa_sys::cuda::load_backend().expect("libtorch backend query");
    Nvrtc::open().expect("libnvrtc.so.13 from the torch wheel next to libtorch")
}

#[test]
fn every_kernel_compiles_cleanly_for_sm80_and_sm90() {
    let nv = nvrtc();
    assert!(nv.version().0 >= 12, "NVRTC {:?}", nv.version());
    for src in ALL_SOURCES {
        for arch in [(8, 0), (9, 0)] {
            let out = nv
                .compile(&src, arch)
                .unwrap_or_else(|e| panic!("{} for sm_{}{}: {e}", src.name, arch.0, arch.1));
            assert!(
                out.log.is_empty(),
                "{} for sm_{}{} compiled with messages:\n{}",
                src.name,
                arch.0,
                arch.1,
                out.log
            );
            // An ELF image (CUBIN), not PTX text.
            assert_eq!(&out.cubin[..4], b"\x7fELF", "{}", src.name);
        }
    }
}

#[test]
fn compile_errors_name_the_kernel_and_carry_the_log() {
    let nv = nvrtc();
    let bad = KernelSource {
        name: "broken.cu",
        source: "extern \"C\" __global__ void k(float* x) { x[0] = undeclared_thing; }\n",
    };
    match nv.compile(&bad, (8, 0)) {
        Err(NvrtcError::Compile { kernel, arch, log }) => {
            assert_eq!(kernel, "broken.cu");
            assert_eq!(arch, "sm_80");
            assert!(log.contains("undeclared_thing"), "log: {log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
    // Warnings reach the log too (the clean-compile test relies on that).
    let warn = KernelSource {
        name: "warns.cu",
        source: "extern \"C\" __global__ void k(float* x) { int unused_var = 3; x[0] = 1.f; }\n",
    };
    let out = nv.compile(&warn, (8, 0)).expect("compiles with a warning");
    assert!(out.log.contains("unused_var"), "log: {}", out.log);
}

#[test]
fn the_cubin_cache_serves_the_second_compile() {
    let nv = nvrtc();
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("cache");
    let src = KernelSource {
        name: "tiny.cu",
        source: "extern \"C\" __global__ void tiny(float* x) { x[threadIdx.x] *= 2.f; }\n",
    };
    let first = nv.compile_cached(&src, (8, 0), Some(&dir)).unwrap();
    assert!(!first.cached);
    let second = nv.compile_cached(&src, (8, 0), Some(&dir)).unwrap();
    assert!(second.cached, "second start must not compile");
    assert_eq!(first.cubin, second.cubin);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files.len(), 1, "one file, no temporaries left: {files:?}");
    assert!(files[0].starts_with("tiny-sm_80-") && files[0].ends_with(".cubin"));
    // Another architecture is another key.
    assert_ne!(nv.cache_key(&src, (8, 0)), nv.cache_key(&src, (9, 0)));
    let third = nv.compile_cached(&src, (9, 0), Some(&dir)).unwrap();
    assert!(!third.cached);
    std::fs::remove_dir_all(&dir).unwrap();
}
