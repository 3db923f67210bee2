// Training-loop facilities tch does not expose: NVTX ranges, bf16 autocast, the Kineto profiler,
// the CUDA caching allocator's statistics and libtorch's deterministic-algorithms switches. All entry points catch C++ exceptions and report
// failure through their return value (exceptions must not cross into Rust).
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/csrc/profiler/stubs/base.h>

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "launch.h"

namespace {
// The Kineto result between disableProfiler() and save(); one profile at a time.
std::unique_ptr<torch::autograd::profiler::ProfilerResult> g_profile;

// An open range as the profiler sees it: a user-scope RecordFunction (what Python's
// record_function makes: a "user_annotation" in the Chrome trace) and the name it points at,
// owned here until the range closes.
struct OpenRange {
  std::string name;
  std::unique_ptr<at::RecordFunction> record;
};
// Each thread's open ranges, innermost last (ranges open and close on one thread).
thread_local std::vector<std::unique_ptr<OpenRange>> t_ranges;
}  // namespace

extern "C" {

// A named range: NVTX through libtorch's CUDA profiler stubs (nvtx3 inside libtorch_cuda; a
// no-op without CUDA) for Nsight, and a user-scope RecordFunction for libtorch's own profiler
// (`--profile`), so the trace shows which range launched each kernel.
void nsa_nvtx_push(const char* name) {
  try {
    torch::profiler::impl::cudaStubs()->rangePush(name);
  } catch (...) {
  }
  try {
    auto range = std::make_unique<OpenRange>();
    range->name = name;
    range->record = std::make_unique<at::RecordFunction>(at::RecordScope::USER_SCOPE);
    if (range->record->isActive()) {
      range->record->before(std::string_view(range->name));
    }
    t_ranges.push_back(std::move(range));
  } catch (...) {
  }
}

void nsa_nvtx_pop() {
  try {
    torch::profiler::impl::cudaStubs()->rangePop();
  } catch (...) {
  }
  try {
    if (!t_ranges.empty()) {
      t_ranges.back()->record->end();
      t_ranges.pop_back();
    }
  } catch (...) {
  }
}

// Turns CUDA autocast on (bf16) or off; returns whether it was on before, -1 on error.
int nsa_autocast_cuda_bf16(int enabled) {
  try {
    bool before = at::autocast::is_autocast_enabled(at::kCUDA);
    at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16);
    at::autocast::set_autocast_enabled(at::kCUDA, enabled != 0);
    if (!enabled) {
      at::autocast::clear_cache();
    }
    return before ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// Whether CUDA autocast to bf16 is on for this thread: 1, 0, or -1 on an exception.
int nsa_autocast_cuda_bf16_enabled() {
  try {
    return at::autocast::is_autocast_enabled(at::kCUDA) &&
                   at::autocast::get_autocast_dtype(at::kCUDA) == at::kBFloat16
               ? 1
               : 0;
  } catch (...) {
    return -1;
  }
}

// Starts the Kineto profiler (CPU, plus CUDA when `cuda`); 0 on success.
int nsa_profiler_start(int cuda, char* err, size_t err_len) {
  try {
    using torch::profiler::impl::ActivityType;
    std::set<ActivityType> activities{ActivityType::CPU};
    if (cuda) {
      activities.insert(ActivityType::CUDA);
    }
    torch::profiler::impl::ProfilerConfig config(
        torch::profiler::impl::ProfilerState::KINETO, /*report_input_shapes=*/true,
        /*profile_memory=*/false);
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
    return 0;
  } catch (const std::exception& e) {
    nsa_glue::write_error(e.what(), err, err_len);
    return 1;
  }
}

// Stops the profiler and writes a Chrome trace to `path`; 0 on success.
int nsa_profiler_stop(const char* path, char* err, size_t err_len) {
  try {
    g_profile = torch::autograd::profiler::disableProfiler();
    if (!g_profile) {
      throw std::runtime_error("profiler returned no result (was it started?)");
    }
    g_profile->save(std::string(path));
    g_profile.reset();
    return 0;
  } catch (const std::exception& e) {
    g_profile.reset();
    nsa_glue::write_error(e.what(), err, err_len);
    return 1;
  }
}

// CUDA caching-allocator statistics of `device`: current and peak allocated bytes, and
// reserved bytes. Returns 0 on success, 1 when there is no CUDA allocator.
int nsa_cuda_memory_stats(int device, long long* allocated, long long* peak_allocated,
                          long long* reserved) {
  try {
    auto* alloc = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    auto stats = alloc->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *allocated = stats.allocated_bytes[agg].current;
    *peak_allocated = stats.allocated_bytes[agg].peak;
    *reserved = stats.reserved_bytes[agg].current;
    return 0;
  } catch (...) {
    return 1;
  }
}

// Deterministic training on (1) or off (0): libtorch's deterministic algorithms (an operation
// without a deterministic implementation throws instead of running; scatter/index_add and the
// flash and memory-efficient attention backwards take their deterministic variants, SDPA skips
// cuDNN attention), cuDNN's deterministic algorithms and no cuDNN benchmarking (autotuning may
// pick different algorithms per run). Returns 0, or 1 on error.
int nsa_set_deterministic(int on) {
  try {
    auto& ctx = at::globalContext();
    ctx.setDeterministicAlgorithms(on != 0, /*warn_only=*/false);
    ctx.setDeterministicCuDNN(on != 0);
    if (on != 0) {
      ctx.setBenchmarkCuDNN(false);
    }
    return 0;
  } catch (...) {
    return 1;
  }
}

// Whether libtorch's deterministic algorithms are on (1), off (0).
int nsa_deterministic() {
  try {
    return at::globalContext().deterministicAlgorithms() ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

int nsa_cuda_reset_peak(int device) {
  try {
    auto* alloc = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    alloc->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return 1;
  }
}

}  // extern "C"
