# Compiles one kernel file with the torch wheel's NVRTC (the harness cubins of round 31):
#   python nvrtc_build.py <file.cu> sm_90a <out.cubin>   (prints ptxas's -v report)
import ctypes, sys, os
root = "/work/main/.tools/torch-venv/lib/python3.11/site-packages/nvidia/cu13"
for f in sorted(os.listdir(root + "/lib")):
    if f.startswith("libnvrtc-builtins"):
        ctypes.CDLL(root + "/lib/" + f, mode=ctypes.RTLD_GLOBAL)
nv = ctypes.CDLL(root + "/lib/libnvrtc.so.13")
src_path, arch, out = sys.argv[1], sys.argv[2], sys.argv[3]
src = open(src_path, "rb").read()
prog = ctypes.c_void_p()
r = nv.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(src_path).encode(), 0, None, None)
assert r == 0, r
opts = [f"--gpu-architecture={arch}", "-std=c++17", "-lineinfo", "-I/work/main/nsa-sys/kernels", f"-I{root}/include", "-Xptxas=-v"]
arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
r = nv.nvrtcCompileProgram(prog, len(opts), arr)
n = ctypes.c_size_t(); nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value); nv.nvrtcGetProgramLog(prog, log)
print(log.value.decode())
if r != 0: print("compile failed", r); sys.exit(1)
nv.nvrtcGetCUBINSize(prog, ctypes.byref(n)); buf = ctypes.create_string_buffer(n.value); nv.nvrtcGetCUBIN(prog, buf)
open(out, "wb").write(buf.raw); print("wrote", out, n.value)
