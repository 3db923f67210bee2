//! NVRTC on the CPU (no GPU needed): every kernel family compiles for sm_80 and sm_90 (a
//! family of Hopper's own instructions for sm_90a alone) with an empty log (no error, no warning), compile errors name the kernel and carry the log, and the
//! CUBIN cache serves a second compile from disk; every kernel's registers, stack frame and
//! spills for sm_90 are a snapshot.
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
    let archs = [(8, 0), (9, 0)];
    // No cache: every build compiles (in parallel).
    let builds = nv.build_all(&ALL_SOURCES, &archs, None);
    // In the order asked, sources outer, architectures inner, each family for the
    // architectures it builds for.
    let asked: Vec<(&str, (i32, i32))> = ALL_SOURCES
        .iter()
        .flat_map(|s| archs.iter().map(move |&a| (s, a)))
        .filter(|(s, a)| s.builds_for(*a))
        .map(|(s, a)| (s.name, a))
        .collect();
    let built: Vec<(&str, (i32, i32))> = builds.iter().map(|b| (b.source.name, b.arch)).collect();
    assert_eq!(built, asked);
    assert!(
        built.contains(&("window_fwd.cu", (9, 0))) && !built.contains(&("window_fwd.cu", (8, 0))),
        "the wgmma family builds for sm_90 alone"
    );
    for b in &builds {
        let (name, arch) = (b.source.name, b.arch);
        let out = b
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("{name} for sm_{}{}: {e}", arch.0, arch.1));
        assert!(!out.cached);
        assert!(
            out.log.is_empty(),
            "{name} for sm_{}{} compiled with messages:\n{}",
            arch.0,
            arch.1,
            out.log
        );
        // An ELF image (CUBIN), not PTX text.
        assert_eq!(&out.cubin[..4], b"\x7fELF", "{name}");
    }
}

/// Registers, stack frame and spills of every kernel for sm_90, as ptxas reports them, kept as
/// a snapshot (`snapshots/nvrtc__kernel_resources_sm90.snap`): a change in any kernel's
/// resources fails here until the new table is accepted, so a stack frame or spills that an
/// edit adds to a hot kernel are seen in review, not in a benchmark a session later.
#[test]
fn kernel_resources_sm90() {
    let nv = nvrtc();
    let tables: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = ALL_SOURCES
            .iter()
            .map(|src| {
                let nv = &nv;
                scope.spawn(move || {
                    let usage = nv
                        .resource_usage(src, (9, 0))
                        .unwrap_or_else(|e| panic!("{}: {e}", src.name));
                    assert!(
                        !usage.is_empty(),
                        "{}: no kernels in ptxas's report",
                        src.name
                    );
                    let mut table = String::new();
                    for u in usage {
                        table += &format!(
                            "{} | {} | {} | {} | {} | {}\n",
                            src.name,
                            u.kernel,
                            u.registers,
                            u.stack_bytes,
                            u.spill_store_bytes,
                            u.spill_load_bytes
                        );
                    }
                    table
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a compile thread"))
            .collect()
    });
    let header =
        "family | kernel | registers | stack bytes | spill store bytes | spill load bytes\n";
    insta::assert_snapshot!(header.to_string() + &tables.concat());
}

#[test]
fn compile_errors_name_the_kernel_and_carry_the_log() {
    let nv = nvrtc();
    let bad = KernelSource {
        name: "broken.cu",
        source: "extern \"C\" __global__ void k(float* x) { x[0] = undeclared_thing; }\n",
        only_arch: None,
    };
    match nv.compile(&bad, (8, 0)) {
        Err(NvrtcError::Compile { kernel, arch, log }) => {
            assert_eq!(kernel, "broken.cu");
            assert_eq!(arch, "sm_80");
            assert!(log.contains("undeclared_thing"), "log: {log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
    // A family of one architecture's own instructions: `sm_90a` in its errors, and asked for
    // another architecture, an error before NVRTC runs.
    let hopper = KernelSource {
        only_arch: Some((9, 0)),
        ..bad
    };
    match nv.compile(&hopper, (9, 0)) {
        Err(NvrtcError::Compile { arch, .. }) => assert_eq!(arch, "sm_90a"),
        other => panic!("expected a compile error, got {other:?}"),
    }
    match nv.compile(&hopper, (8, 0)) {
        Err(NvrtcError::Arch { kernel, arch }) => {
            assert_eq!((kernel, arch.as_str()), ("broken.cu", "sm_80"));
        }
        other => panic!("expected an architecture error, got {other:?}"),
    }
    // Warnings reach the log too (the clean-compile test relies on that).
    let warn = KernelSource {
        name: "warns.cu",
        source: "extern \"C\" __global__ void k(float* x) { int unused_var = 3; x[0] = 1.f; }\n",
        only_arch: None,
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
        only_arch: None,
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
    // A temporary file an interrupted writer left an hour ago goes with the next write of that
    // family; a fresh one (a writer at work) stays.
    let stale = dir.join(".tiny.abc123.tmp");
    let fresh = dir.join(".tiny.def456.tmp");
    std::fs::write(&stale, b"half").unwrap();
    std::fs::write(&fresh, b"half").unwrap();
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(two_hours_ago)
        .unwrap();
    assert!(files[0].starts_with("tiny-sm_80-") && files[0].ends_with(".cubin"));
    // Another architecture is another key.
    assert_ne!(nv.cache_key(&src, (8, 0)), nv.cache_key(&src, (9, 0)));
    let third = nv.compile_cached(&src, (9, 0), Some(&dir)).unwrap();
    assert!(!third.cached);
    assert!(!stale.exists(), "a stale temporary file stays in the cache");
    assert!(fresh.exists(), "a fresh temporary file was removed");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A cache built by one install serves another with the same NVRTC: the key names the include
/// folder by what it holds, not by its path (here the same libraries and headers reached
/// through links in another folder). Sources and architectures still separate keys, and a
/// second `build_all` over one cache reads every family from it.
#[test]
fn the_cache_key_does_not_depend_on_where_the_headers_live() {
    let nv = nvrtc();
    let lib_dir = nv.library().parent().unwrap().to_path_buf();
    let include_dir = lib_dir.parent().unwrap().join("include");
    let scratch = tempfile::tempdir().unwrap();
    let other = scratch.path().join("elsewhere");
    std::fs::create_dir(&other).unwrap();
    std::os::unix::fs::symlink(&lib_dir, other.join("lib")).unwrap();
    std::os::unix::fs::symlink(&include_dir, other.join("include")).unwrap();
    let moved = Nvrtc::open_in(&other.join("lib")).unwrap();
    let tiny = KernelSource {
        name: "tiny.cu",
        source: "extern \"C\" __global__ void tiny(float* x) { x[threadIdx.x] *= 2.f; }\n",
        only_arch: None,
    };
    assert_ne!(
        nv.options(&tiny, (9, 0)),
        moved.options(&tiny, (9, 0)),
        "the include paths differ"
    );
    let twice = KernelSource {
        name: "twice.cu",
        source: "extern \"C\" __global__ void twice(float* x) { x[threadIdx.x] *= 3.f; }\n",
        only_arch: None,
    };
    assert_eq!(nv.cache_key(&tiny, (9, 0)), moved.cache_key(&tiny, (9, 0)));
    assert_ne!(nv.cache_key(&tiny, (9, 0)), nv.cache_key(&twice, (9, 0)));
    assert_ne!(nv.cache_key(&tiny, (9, 0)), nv.cache_key(&tiny, (8, 0)));
    let dir = scratch.path().join("cache");
    let first = nv.build_all(&[tiny, twice], &[(8, 0), (9, 0)], Some(&dir));
    assert!(first
        .iter()
        .all(|b| matches!(&b.result, Ok(c) if !c.cached)));
    let second = moved.build_all(&[tiny, twice], &[(8, 0), (9, 0)], Some(&dir));
    for (a, b) in first.iter().zip(&second) {
        let (a, b) = (a.result.as_ref().unwrap(), b.result.as_ref().unwrap());
        assert!(
            b.cached,
            "the other install must read the first one's cache"
        );
        assert_eq!(a.cubin, b.cubin);
    }
}
