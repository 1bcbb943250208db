// torch.distributed's c10d, which tch does not expose: a TCPStore rendezvous (as torchrun's env://
// one: rank 0 hosts the store, or torchrun's agent does when TORCHELASTIC_USE_AGENT_STORE is
// set) and a Gloo process group over it, with all-reduce, broadcast and store counters.
// Compiled with VLA_HAVE_GLOO when Gloo's headers were found (build.rs); without them creating a
// group reports why. Every function catches C++ exceptions and reports failure through its
// return value, so no exception ever crosses into Rust.
#ifdef VLA_HAVE_GLOO
#define USE_C10D_GLOO
#endif
#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef VLA_HAVE_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif

#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {
void copy_message(const std::string& what, char* buf, size_t len) {
  if (buf == nullptr || len == 0) return;
  std::strncpy(buf, what.c_str(), len - 1);
  buf[len - 1] = '\0';
}

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

c10d::ReduceOp reduce_op(int op) {
  return op == 1 ? c10d::ReduceOp(c10d::ReduceOp::MAX) : c10d::ReduceOp(c10d::ReduceOp::SUM);
}
}  // namespace

extern "C" {

// Joins the group: connects to (rank 0 with `host_store`: hosts) the TCPStore at addr:port,
// under `prefix`, then creates the `backend` ("gloo") process group of `world` ranks with
// collective timeout `timeout_ms`. `bind_loopback` binds Gloo to 127.0.0.1 (else Gloo's default
// device: GLOO_SOCKET_IFNAME or the host name's address). Returns the group or null (err set).
void* vla_dist_new(const char* backend, const char* addr, int port, int rank, int world, int host_store,
                   const char* prefix, int64_t timeout_ms, int bind_loopback, char* err, size_t err_len) {
  try {
    const auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = host_store != 0;
    opts.numWorkers = host_store != 0 ? std::optional<std::size_t>(world) : std::nullopt;
    opts.waitWorkers = false;
    opts.timeout = timeout;
    opts.multiTenant = true;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(addr), opts);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto* g = new Group{store, {}};
    const std::string name(backend);
    if (name == "gloo") {
#ifdef VLA_HAVE_GLOO
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      options->devices.push_back(bind_loopback != 0 ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                                                    : c10d::ProcessGroupGloo::createDefaultDevice());
      g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
#else
      delete g;
      copy_message("this build has no Gloo: its headers were not found when it was compiled (make venv installs them)", err, err_len);
      return nullptr;
#endif
    } else {
      delete g;
      copy_message("unknown backend `" + name + "` (expected gloo)", err, err_len);
      return nullptr;
    }
    return g;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
    return nullptr;
  }
}

void vla_dist_free(void* group) { delete static_cast<Group*>(group); }

// All-reduces `n` tch tensors in place (op 0: sum, 1: max) and waits. Returns 1 or -1 (err set).
int vla_dist_allreduce(void* group, at::Tensor** tensors, int n, int op, char* err, size_t err_len) {
  try {
    std::vector<at::Tensor> ts;
    for (int i = 0; i < n; ++i) ts.push_back(*tensors[i]);
    c10d::AllreduceOptions opts;
    opts.reduceOp = reduce_op(op);
    static_cast<Group*>(group)->backend->allreduce(ts, opts)->wait();
    return 1;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
    return -1;
  }
}

// Broadcasts a tch tensor from `root` to every rank, in place, and waits. Returns 1 or -1.
int vla_dist_broadcast(void* group, at::Tensor* tensor, int root, char* err, size_t err_len) {
  try {
    std::vector<at::Tensor> ts{*tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    static_cast<Group*>(group)->backend->broadcast(ts, opts)->wait();
    return 1;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
    return -1;
  }
}

// Adds `delta` to the store counter `key` and writes its new value. Returns 1 or -1.
int vla_dist_store_add(void* group, const char* key, int64_t delta, int64_t* out, char* err, size_t err_len) {
  try {
    *out = static_cast<Group*>(group)->store->add(std::string(key), delta);
    return 1;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
    return -1;
  }
}
}
