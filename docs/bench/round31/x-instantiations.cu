// Appended to nsa-sys/kernels/window_fwd.cu for the harness cubin of call B (round 31):
// other tile widths and loops than the landed instantiations, named x_*.
#define NSA_WINDOW_FWD_X(DK, DV, BN, PIPE, NAME)                                              \
  extern "C" __global__ void __launch_bounds__(nsa::kWindowThreads, 1) NAME(nsa::WindowFwdArgs a) { \
    nsa::window_fwd<DK, DV, BN, PIPE>(a);                                                    \
  }
NSA_WINDOW_FWD_X(192, 128, 64, true, x_alt64_dk192_dv128)
NSA_WINDOW_FWD_X(192, 128, 64, false, x_ser64_dk192_dv128)
NSA_WINDOW_FWD_X(64, 64, 128, true, x_alt128_dk64_dv64)
NSA_WINDOW_FWD_X(64, 64, 128, false, x_ser128_dk64_dv64)
NSA_WINDOW_FWD_X(64, 64, 64, false, x_ser64_dk64_dv64)
NSA_WINDOW_FWD_X(128, 128, 64, true, x_alt64_dk128_dv128)
