// C entry points over libtorch's c10d TCPStore (torch/csrc/distributed/c10d/TCPStore.hpp; the
// symbols live in libtorch_cpu): the key-value store torchrun's agent hosts for its workers and
// that PyTorch's env:// rendezvous uses. nsa-sys's `store` module wraps these in a safe type.
//
// Every function catches all exceptions and reports them through (err, err_len) plus a kind
// code, so no C++ exception crosses into Rust: 0 = ok, 1 = c10::DistStoreError (store protocol,
// including wait timeouts), 2 = c10::DistNetworkError (connect, bind, socket), 3 = any other
// exception.
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <c10/util/Exception.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "launch.h"

namespace {

constexpr int kOk = 0;
constexpr int kStoreError = 1;
constexpr int kNetworkError = 2;
constexpr int kOtherError = 3;

using nsa_glue::write_error;

// Runs f, turning an exception into a kind code and a message (c10 errors without their C++
// backtrace, which would drown the message in a user-facing error).
template <typename F>
int guarded(char* err, size_t err_len, F f) {
  try {
    f();
    return kOk;
  } catch (const c10::DistNetworkError& e) {
    write_error(e.what_without_backtrace(), err, err_len);
    return kNetworkError;
  } catch (const c10::DistStoreError& e) {
    write_error(e.what_without_backtrace(), err, err_len);
    return kStoreError;
  } catch (const c10::Error& e) {
    write_error(e.what_without_backtrace(), err, err_len);
    return kOtherError;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return kOtherError;
  } catch (...) {
    write_error("unknown C++ exception", err, err_len);
    return kOtherError;
  }
}

std::vector<std::string> key_list(const char* const* keys, size_t n) {
  std::vector<std::string> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.emplace_back(keys[i]);
  return out;
}

}  // namespace

extern "C" {

// Opens a store. is_server != 0: hosts the server on `port` (0: a free port the OS picks) on
// every interface and connects to it through `host`; otherwise connects to host:port, retrying
// until timeout_ms. timeout_ms is also the store's timeout for get/wait. On success *out holds
// an owning pointer (free with nsa_store_free) and *port_out the port in use.
int nsa_store_new(const char* host, uint16_t port, int is_server, int64_t timeout_ms, void** out,
                  uint16_t* port_out, char* err, size_t err_len) {
  *out = nullptr;
  return guarded(err, err_len, [&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    opts.numWorkers = std::nullopt;  // the rendezvous checks who arrived itself, naming ranks
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *port_out = store->getPort();
    *out = store.release();
  });
}

void nsa_store_free(void* store) {
  if (store != nullptr) {
    // Takes back the reference nsa_store_new released; dropping it closes the client and, for
    // the host, stops the server.
    c10::intrusive_ptr<c10d::TCPStore>::reclaim(static_cast<c10d::TCPStore*>(store));
  }
}

void nsa_store_set_timeout(void* store, int64_t timeout_ms) {
  static_cast<c10d::TCPStore*>(store)->setTimeout(std::chrono::milliseconds(timeout_ms));
}

int nsa_store_set(void* store, const char* key, const uint8_t* data, size_t len, char* err,
                  size_t err_len) {
  return guarded(err, err_len, [&] {
    static_cast<c10d::TCPStore*>(store)->set(std::string(key),
                                             std::vector<uint8_t>(data, data + len));
  });
}

// Blocks until `key` exists (at most the store's timeout), then hands its value to sink(ctx,
// data, len) once.
int nsa_store_get(void* store, const char* key, void (*sink)(void*, const uint8_t*, size_t),
                  void* ctx, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto v = static_cast<c10d::TCPStore*>(store)->get(std::string(key));
    sink(ctx, v.data(), v.size());
  });
}

int nsa_store_add(void* store, const char* key, int64_t delta, int64_t* out, char* err,
                  size_t err_len) {
  return guarded(err, err_len,
                 [&] { *out = static_cast<c10d::TCPStore*>(store)->add(std::string(key), delta); });
}

// *out = 1 when every key exists (does not wait).
int nsa_store_check(void* store, const char* const* keys, size_t n, int* out, char* err,
                    size_t err_len) {
  return guarded(err, err_len, [&] {
    *out = static_cast<c10d::TCPStore*>(store)->check(key_list(keys, n)) ? 1 : 0;
  });
}

// Blocks until every key exists, at most timeout_ms (then a DistStoreError).
int nsa_store_wait(void* store, const char* const* keys, size_t n, int64_t timeout_ms, char* err,
                   size_t err_len) {
  return guarded(err, err_len, [&] {
    static_cast<c10d::TCPStore*>(store)->wait(key_list(keys, n),
                                              std::chrono::milliseconds(timeout_ms));
  });
}

}  // extern "C"
