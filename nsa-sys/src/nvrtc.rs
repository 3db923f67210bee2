//! Run-time compilation of the CUDA kernels in `nsa-sys/kernels/` with NVRTC, and an on-disk
//! cache of the resulting CUBIN.
//!
//! NVRTC (`libnvrtc.so.13`) comes with the torch wheel, next to libtorch:
//! `<site-packages>/torch` is libtorch's root and `<site-packages>/nvidia/cu13/{lib,include}`
//! hold NVRTC, its builtins library and the CUDA headers (`cuda_bf16.h`). NVRTC itself needs no
//! GPU, so every kernel is compiled by a CPU test for sm_80 and sm_90.
//!
//! Compilation: `--gpu-architecture=sm_XY -std=c++17 -lineinfo -I<cu13/include>`, the kernel
//! family's source plus the shared headers ([`HEADERS`]), output CUBIN for exactly that
//! architecture. A family that uses one architecture's own instructions (Hopper's wgmma:
//! [`KernelSource::only_arch`]) is built for that compute capability alone, as `sm_90a`, and
//! never for another. The cache file is `<dir>/<family>-sm_XY[a]-<sha256>.cubin`, the hash taken over
//! (source, headers, options, architecture, NVRTC version; the options without the include
//! folder's path, which says where this install keeps the headers of that NVRTC version, not what
//! they hold, so a cache built on one machine serves another with the same torch wheel), written
//! under a temporary name and renamed, so concurrent processes never read a half-written file
//! and a second start compiles nothing. [`Nvrtc::build_all`] compiles several families and
//! architectures at once: NVRTC compiles different programs concurrently.
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

mod usage;
pub use usage::{parse_ptxas_verbose, KernelUsage};

use crate::SysError;

/// One kernel family: a `.cu` file of `nsa-sys/kernels/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSource {
    /// File name, e.g. `selected_fwd.cu` (also the name in NVRTC's messages).
    pub name: &'static str,
    /// The CUDA C++ text.
    pub source: &'static str,
    /// `Some(cc)`: the family uses instructions of compute capability `cc` alone (wgmma on
    /// 9.0) and is built only for it, with its architecture-specific features (`sm_90a`, whose
    /// code runs on no other architecture); `None`: built for any architecture asked.
    pub only_arch: Option<(i32, i32)>,
}

impl KernelSource {
    /// Whether this family is built for compute capability `arch`.
    pub fn builds_for(&self, arch: (i32, i32)) -> bool {
        self.only_arch.is_none_or(|only| only == arch)
    }

    /// The architecture NVRTC compiles this family for at compute capability `arch`: `sm_XY`,
    /// or `sm_XYa` for a family of that architecture's own instructions.
    pub fn target(&self, arch: (i32, i32)) -> String {
        let suffix = if self.only_arch.is_some() { "a" } else { "" };
        format!("sm_{}{}{suffix}", arch.0, arch.1)
    }
}

/// Headers every kernel may include by name.
pub const HEADERS: [(&str, &str); 7] = [
    ("common.cuh", include_str!("../kernels/common.cuh")),
    ("mma.cuh", include_str!("../kernels/mma.cuh")),
    ("attend.cuh", include_str!("../kernels/attend.cuh")),
    ("select.cuh", include_str!("../kernels/select.cuh")),
    (
        "decode_tiles.cuh",
        include_str!("../kernels/decode_tiles.cuh"),
    ),
    ("token_warp.cuh", include_str!("../kernels/token_warp.cuh")),
    ("wgmma.cuh", include_str!("../kernels/wgmma.cuh")),
];

/// Selected-branch forward (tensor-core bf16 kernel and SIMT kernels).
pub const SELECTED_FWD: KernelSource = KernelSource {
    name: "selected_fwd.cu",
    source: include_str!("../kernels/selected_fwd.cu"),
    only_arch: None,
};

/// Selected-branch backward (dQ and the inverse-index dK/dV kernels).
pub const SELECTED_BWD: KernelSource = KernelSource {
    name: "selected_bwd.cu",
    source: include_str!("../kernels/selected_bwd.cu"),
    only_arch: None,
};

/// Compressed branch (forward, dQ) and block selection from its log-sum-exp.
pub const COMPRESSED: KernelSource = KernelSource {
    name: "compressed.cu",
    source: include_str!("../kernels/compressed.cu"),
    only_arch: None,
};

/// One decode step of the three branches, selection and the gated mix (split-K tiles).
pub const DECODE: KernelSource = KernelSource {
    name: "decode.cu",
    source: include_str!("../kernels/decode.cu"),
    only_arch: None,
};

/// Rotary position embedding and the gated sum of the branches (one pass each way).
pub const POINTWISE: KernelSource = KernelSource {
    name: "pointwise.cu",
    source: include_str!("../kernels/pointwise.cu"),
    only_arch: None,
};

/// Sliding-window forward on Hopper's warpgroup MMA (sm_90a only).
pub const WINDOW_FWD: KernelSource = KernelSource {
    name: "window_fwd.cu",
    source: include_str!("../kernels/window_fwd.cu"),
    only_arch: Some((9, 0)),
};

/// Sliding-window backward on Hopper's warpgroup MMA (sm_90a only): dQ, then dK and dV.
pub const WINDOW_BWD: KernelSource = KernelSource {
    name: "window_bwd.cu",
    source: include_str!("../kernels/window_bwd.cu"),
    only_arch: Some((9, 0)),
};

/// Every kernel family in the repository (the CPU test compiles all of them, each for the
/// architectures it [builds for](KernelSource::builds_for)).
pub const ALL_SOURCES: [KernelSource; 7] = [
    SELECTED_FWD,
    SELECTED_BWD,
    COMPRESSED,
    DECODE,
    POINTWISE,
    WINDOW_FWD,
    WINDOW_BWD,
];

/// Errors of loading NVRTC, compiling, and the CUBIN cache.
#[derive(Debug, thiserror::Error)]
pub enum NvrtcError {
    /// `libnvrtc.so.13` (or its builtins, or the CUDA headers) could not be found or opened.
    #[error(transparent)]
    Load(#[from] SysError),
    /// An NVRTC call other than the compilation itself failed.
    #[error("{call} failed: {message} (code {code})")]
    Call {
        call: &'static str,
        code: i32,
        message: String,
    },
    /// The family is not built for this architecture ([`KernelSource::only_arch`]).
    #[error(
        "kernel {kernel} is not built for {arch}: it uses another architecture's own instructions"
    )]
    Arch { kernel: &'static str, arch: String },
    /// The kernel did not compile; `log` is NVRTC's full program log.
    #[error("kernel {kernel} did not compile for {arch}:\n{log}")]
    Compile {
        kernel: &'static str,
        arch: String,
        log: String,
    },
    /// Reading or writing the CUBIN cache failed.
    #[error("kernel cache {path}: {source}")]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
}

type NvrtcResult = c_int;
type Program = *mut c_void;

/// The NVRTC function table.
#[derive(Debug)]
pub struct Nvrtc {
    // Never unloaded: cheap to keep, and programs must not outlive the library.
    _lib: std::mem::ManuallyDrop<libloading::Library>,
    lib_path: PathBuf,
    include_dir: PathBuf,
    version: (i32, i32),
    create_program: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> NvrtcResult,
    compile_program: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> NvrtcResult,
    destroy_program: unsafe extern "C" fn(*mut Program) -> NvrtcResult,
    get_log_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    get_log: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    get_cubin_size: unsafe extern "C" fn(Program, *mut usize) -> NvrtcResult,
    get_cubin: unsafe extern "C" fn(Program, *mut c_char) -> NvrtcResult,
    get_error_string: unsafe extern "C" fn(NvrtcResult) -> *const c_char,
}

/// One kernel family built for one architecture by [`Nvrtc::build_all`].
#[derive(Debug)]
pub struct Build {
    pub source: KernelSource,
    /// Compute capability (major, minor).
    pub arch: (i32, i32),
    pub result: Result<Compiled, NvrtcError>,
    /// Wall time of this build (compile or cache read).
    pub seconds: f64,
}

/// A compiled kernel family.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The CUBIN image for the requested architecture.
    pub cubin: Vec<u8>,
    /// NVRTC's log (warnings), empty for a clean compile or a cache hit.
    pub log: String,
    /// Whether the image came from the disk cache.
    pub cached: bool,
}

/// The folder of the CUDA 13 libraries of the torch wheel that provides this process's
/// libtorch: `<site-packages>/nvidia/cu13/lib`, or `None` if libtorch is not mapped.
pub fn cu13_lib_dir() -> Option<PathBuf> {
    let torch = crate::cuda::libtorch_root()?;
    // `.libtorch` may be a symlink to `<site-packages>/torch`: resolve it first.
    let torch = torch.canonicalize().unwrap_or(torch);
    Some(torch.parent()?.join("nvidia/cu13/lib"))
}

impl Nvrtc {
    /// Opens NVRTC from the torch wheel next to this process's libtorch ([`cu13_lib_dir`]).
    pub fn open() -> Result<Self, NvrtcError> {
        let dir = cu13_lib_dir().ok_or_else(|| SysError::Load {
            name: "libnvrtc.so.13".into(),
            reason: "libtorch_cpu.so is not mapped into this process (is tch linked?)".into(),
        })?;
        Self::open_in(&dir)
    }

    /// Opens `libnvrtc.so.13` from `lib_dir`; the headers are taken from `lib_dir/../include`.
    pub fn open_in(lib_dir: &Path) -> Result<Self, NvrtcError> {
        let load_err = |name: &Path, reason: String| SysError::Load {
            name: name.display().to_string(),
            reason,
        };
        let include_dir = lib_dir.parent().unwrap_or(lib_dir).join("include");
        if !include_dir.join("cuda_bf16.h").exists() {
            return Err(load_err(&include_dir, "no cuda_bf16.h there".into()).into());
        }
        // NVRTC dlopens its builtins by soname, which is not on the search path: load it first
        // by full path (global), so that lookup finds the already-mapped library.
        let builtins = std::fs::read_dir(lib_dir)
            .map_err(|e| load_err(lib_dir, e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libnvrtc-builtins.so.13"))
            })
            .ok_or_else(|| load_err(lib_dir, "no libnvrtc-builtins.so.13.*".into()))?;
        let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
        // SAFETY: the builtins library has no initialisers with preconditions; it stays loaded
        // for the life of the process (NVRTC uses it on every compile).
        let b = unsafe { libloading::os::unix::Library::open(Some(&builtins), flags) }
            .map_err(|e| load_err(&builtins, e.to_string()))?;
        std::mem::forget(b);
        let lib_path = lib_dir.join("libnvrtc.so.13");
        // SAFETY: NVRTC's initialisers have no preconditions.
        let lib = unsafe { libloading::Library::new(&lib_path) }
            .map_err(|e| load_err(&lib_path, e.to_string()))?;
        macro_rules! sym {
            ($s:literal) => {{
                // SAFETY: the declared signature matches nvrtc.h.
                let f = unsafe { lib.get($s.as_bytes()) }.map_err(|e| SysError::Symbol {
                    library: lib_path.display().to_string(),
                    symbol: $s.into(),
                    reason: e.to_string(),
                })?;
                *f
            }};
        }
        let version_fn: unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult =
            sym!("nvrtcVersion");
        let mut table = Nvrtc {
            create_program: sym!("nvrtcCreateProgram"),
            compile_program: sym!("nvrtcCompileProgram"),
            destroy_program: sym!("nvrtcDestroyProgram"),
            get_log_size: sym!("nvrtcGetProgramLogSize"),
            get_log: sym!("nvrtcGetProgramLog"),
            get_cubin_size: sym!("nvrtcGetCUBINSize"),
            get_cubin: sym!("nvrtcGetCUBIN"),
            get_error_string: sym!("nvrtcGetErrorString"),
            _lib: std::mem::ManuallyDrop::new(lib),
            lib_path,
            include_dir,
            version: (0, 0),
        };
        let (mut major, mut minor) = (0, 0);
        // SAFETY: valid out-pointers.
        table.check("nvrtcVersion", unsafe {
            version_fn(&mut major, &mut minor)
        })?;
        table.version = (major, minor);
        Ok(table)
    }

    /// NVRTC's version (major, minor), e.g. (13, 0).
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    /// Where `libnvrtc.so.13` was loaded from.
    pub fn library(&self) -> &Path {
        &self.lib_path
    }

    fn check(&self, call: &'static str, code: NvrtcResult) -> Result<(), NvrtcError> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: nvrtcGetErrorString returns a static string for any code.
        let msg = unsafe { (self.get_error_string)(code) };
        let message = if msg.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: non-null, NUL-terminated, static.
            unsafe { CStr::from_ptr(msg) }
                .to_string_lossy()
                .into_owned()
        };
        Err(NvrtcError::Call {
            call,
            code,
            message,
        })
    }

    /// The options `src` is compiled with for compute capability `arch`.
    pub fn options(&self, src: &KernelSource, arch: (i32, i32)) -> Vec<String> {
        vec![
            format!("--gpu-architecture={}", src.target(arch)),
            "-std=c++17".into(),
            "-lineinfo".into(),
            format!("-I{}", self.include_dir.display()),
        ]
    }

    /// Compiles `src` for compute capability `arch` (no cache). A failed compile is
    /// [`NvrtcError::Compile`] naming the family and carrying the log; a family that is not
    /// built for `arch` ([`KernelSource::builds_for`]) is [`NvrtcError::Arch`].
    pub fn compile(&self, src: &KernelSource, arch: (i32, i32)) -> Result<Compiled, NvrtcError> {
        self.compile_with(src, arch, &self.options(src, arch))
    }

    /// [`Nvrtc::compile`] with the given options (which name `arch` themselves).
    fn compile_with(
        &self,
        src: &KernelSource,
        arch: (i32, i32),
        options: &[String],
    ) -> Result<Compiled, NvrtcError> {
        if !src.builds_for(arch) {
            return Err(NvrtcError::Arch {
                kernel: src.name,
                arch: format!("sm_{}{}", arch.0, arch.1),
            });
        }
        let cstr = |s: &str| {
            CString::new(s).map_err(|_| NvrtcError::Call {
                call: "nvrtcCreateProgram",
                code: -1,
                message: format!("{}: text contains a NUL byte", src.name),
            })
        };
        let source = cstr(src.source)?;
        let name = cstr(src.name)?;
        let header_text = HEADERS
            .iter()
            .map(|(_, t)| cstr(t))
            .collect::<Result<Vec<_>, _>>()?;
        let header_names = HEADERS
            .iter()
            .map(|(n, _)| cstr(n))
            .collect::<Result<Vec<_>, _>>()?;
        let hp: Vec<*const c_char> = header_text.iter().map(|c| c.as_ptr()).collect();
        let hn: Vec<*const c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
        let opts = options
            .iter()
            .map(|o| cstr(o))
            .collect::<Result<Vec<_>, _>>()?;
        let op: Vec<*const c_char> = opts.iter().map(|c| c.as_ptr()).collect();
        let mut prog: Program = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live NUL-terminated string for the call; the
        // counts match the arrays.
        self.check("nvrtcCreateProgram", unsafe {
            (self.create_program)(
                &mut prog,
                source.as_ptr(),
                name.as_ptr(),
                hp.len() as c_int,
                hp.as_ptr(),
                hn.as_ptr(),
            )
        })?;
        let guard = ProgramGuard { nvrtc: self, prog };
        // SAFETY: `prog` is a live program; `op` holds `op.len()` valid strings.
        let rc = unsafe { (self.compile_program)(guard.prog, op.len() as c_int, op.as_ptr()) };
        let log = guard.log()?;
        if rc != 0 {
            return Err(NvrtcError::Compile {
                kernel: src.name,
                arch: src.target(arch),
                log: if log.is_empty() {
                    format!("(no log; nvrtcCompileProgram returned {rc})")
                } else {
                    log
                },
            });
        }
        let mut size = 0usize;
        // SAFETY: live program, valid out-pointer.
        self.check("nvrtcGetCUBINSize", unsafe {
            (self.get_cubin_size)(guard.prog, &mut size)
        })?;
        let mut cubin = vec![0u8; size];
        // SAFETY: `cubin` holds exactly the size NVRTC reported.
        self.check("nvrtcGetCUBIN", unsafe {
            (self.get_cubin)(guard.prog, cubin.as_mut_ptr().cast())
        })?;
        Ok(Compiled {
            cubin,
            log,
            cached: false,
        })
    }

    /// The options as the cache key sees them: the include folder by what it is (the headers of
    /// this NVRTC version), not by where this install keeps it.
    fn key_options(&self, src: &KernelSource, arch: (i32, i32)) -> Vec<String> {
        self.options(src, arch)
            .into_iter()
            .map(|o| {
                if o.starts_with("-I") {
                    "-I<the CUDA headers of this NVRTC>".to_string()
                } else {
                    o
                }
            })
            .collect()
    }

    /// The cache key of `src` for `arch`: SHA-256 over source, headers, options (the include
    /// folder unnamed), architecture and NVRTC version, in hex.
    pub fn cache_key(&self, src: &KernelSource, arch: (i32, i32)) -> String {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(src.name.as_bytes());
        field(src.source.as_bytes());
        for (n, t) in HEADERS {
            field(n.as_bytes());
            field(t.as_bytes());
        }
        for o in self.key_options(src, arch) {
            field(o.as_bytes());
        }
        field(
            format!(
                "sm_{}{} nvrtc {}.{}",
                arch.0, arch.1, self.version.0, self.version.1
            )
            .as_bytes(),
        );
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Like [`Nvrtc::compile`], through the CUBIN cache in `cache_dir` when given (created if
    /// missing). A cache hit compiles nothing.
    pub fn compile_cached(
        &self,
        src: &KernelSource,
        arch: (i32, i32),
        cache_dir: Option<&Path>,
    ) -> Result<Compiled, NvrtcError> {
        let Some(dir) = cache_dir else {
            return self.compile(src, arch);
        };
        let stem = src.name.trim_end_matches(".cu");
        let path = dir.join(format!(
            "{stem}-{}-{}.cubin",
            src.target(arch),
            self.cache_key(src, arch)
        ));
        let cache_err = |path: &Path, source| NvrtcError::Cache {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::read(&path) {
            Ok(cubin) if !cubin.is_empty() => {
                return Ok(Compiled {
                    cubin,
                    log: String::new(),
                    cached: true,
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(cache_err(&path, e)),
        }
        let compiled = self.compile(src, arch)?;
        std::fs::create_dir_all(dir).map_err(|e| cache_err(dir, e))?;
        // A uniquely named temporary file in the same folder, then an atomic rename: readers see
        // the old entry or the whole new one (a failed write removes the temporary file).
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{stem}."))
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(|e| cache_err(dir, e))?;
        std::io::Write::write_all(&mut tmp, &compiled.cubin)
            .map_err(|e| cache_err(tmp.path(), e))?;
        tmp.persist(&path).map_err(|e| cache_err(&path, e.error))?;
        remove_stale_temporaries(dir, stem);
        Ok(compiled)
    }

    /// Builds every family of `sources` for every architecture of `archs` it
    /// [builds for](KernelSource::builds_for) through the cache in `cache_dir`
    /// ([`Nvrtc::compile_cached`]), as many at once as this machine has cores (NVRTC compiles
    /// different programs concurrently; one family takes tens of seconds), and returns the
    /// builds in the order asked, sources outer. A failure is that build's `result`; the others
    /// go on.
    pub fn build_all(
        &self,
        sources: &[KernelSource],
        archs: &[(i32, i32)],
        cache_dir: Option<&Path>,
    ) -> Vec<Build> {
        let pairs: Vec<(KernelSource, (i32, i32))> = sources
            .iter()
            .flat_map(|&s| archs.iter().map(move |&a| (s, a)))
            .filter(|(s, a)| s.builds_for(*a))
            .collect();
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(pairs.len())
            .max(1);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut done: Vec<(usize, Build)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&(source, arch)) = pairs.get(i) else {
                                return mine;
                            };
                            let start = std::time::Instant::now();
                            let result = self.compile_cached(&source, arch, cache_dir);
                            mine.push((
                                i,
                                Build {
                                    source,
                                    arch,
                                    result,
                                    seconds: start.elapsed().as_secs_f64(),
                                },
                            ));
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        done.sort_by_key(|(i, _)| *i);
        done.into_iter().map(|(_, b)| b).collect()
    }
}

/// Temporary files of `stem`'s cache entries older than an hour: left by a process that ended
/// while it wrote one (a background build cut short by the process's exit). They are never
/// read; removing them keeps the cache folder to its entries. A writer's own temporary file is
/// seconds old. Best effort: what cannot be read or removed stays.
fn remove_stale_temporaries(dir: &Path, stem: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{stem}.");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with(&prefix) && name.ends_with(".tmp")) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(3600));
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Destroys an NVRTC program on every exit path.
struct ProgramGuard<'a> {
    nvrtc: &'a Nvrtc,
    prog: Program,
}

impl ProgramGuard<'_> {
    fn log(&self) -> Result<String, NvrtcError> {
        let mut size = 0usize;
        // SAFETY: live program, valid out-pointer.
        self.nvrtc.check("nvrtcGetProgramLogSize", unsafe {
            (self.nvrtc.get_log_size)(self.prog, &mut size)
        })?;
        let mut buf = vec![0u8; size.max(1)];
        // SAFETY: `buf` holds the size NVRTC reported (which includes the NUL).
        self.nvrtc.check("nvrtcGetProgramLog", unsafe {
            (self.nvrtc.get_log)(self.prog, buf.as_mut_ptr().cast())
        })?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).trim().to_string())
    }
}

impl Drop for ProgramGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: `prog` came from nvrtcCreateProgram and is destroyed once.
        unsafe { (self.nvrtc.destroy_program)(&mut self.prog) };
    }
}
