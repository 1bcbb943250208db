// Small additions to libtorch's C API that tch 0.24 does not expose:
// - peak/current memory of the active accelerator's caching allocator (the numbers behind
//   torch.cuda.max_memory_allocated / torch.accelerator.max_memory_allocated) and a peak reset;
// - free/total memory of an accelerator (torch.cuda.mem_get_info) and a release of the
//   allocator's unused blocks (torch.cuda.empty_cache);
// - backward from a non-scalar output with an explicit output gradient (out.backward(grad));
// - dropping a parameter's gradient (`param.grad = None`) and setting it (`param.grad = g`).
// Every function catches C++ exceptions and reports failure through its return value, so no
// exception ever crosses into Rust.
#include <ATen/DeviceAccelerator.h>
#include <ATen/core/Tensor.h>
#include <c10/core/CachingDeviceAllocator.h>

#include <cstdint>
#include <cstring>
#include <exception>

namespace {
void copy_message(const char* what, char* buf, size_t len) {
  if (buf == nullptr || len == 0) return;
  std::strncpy(buf, what, len - 1);
  buf[len - 1] = '\0';
}

bool accelerator_ok(int device_index) {
  auto acc = at::accelerator::getAccelerator(false);
  if (!acc.has_value()) return false;
  if (device_index < 0 || device_index >= at::accelerator::deviceCount()) return false;
  return at::getDeviceAllocator(acc.value()) != nullptr;
}
}  // namespace

extern "C" {

// Writes the allocator's allocated/reserved byte statistics of device `device_index`:
// out[0] allocated current, out[1] allocated peak, out[2] reserved current, out[3] reserved peak.
// Returns 1 on success, 0 when no accelerator (or no such device) is available, -1 on error.
int vla_accelerator_memory_stats(int device_index, int64_t* out, char* err, size_t err_len) {
  try {
    if (!accelerator_ok(device_index)) return 0;
    auto stats = at::accelerator::getDeviceStats(static_cast<c10::DeviceIndex>(device_index));
    const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = stats.allocated_bytes[agg].current;
    out[1] = stats.allocated_bytes[agg].peak;
    out[2] = stats.reserved_bytes[agg].current;
    out[3] = stats.reserved_bytes[agg].peak;
    return 1;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
    return -1;
  }
}

// Resets the peak statistics of device `device_index`; same return convention.
int vla_accelerator_reset_peak(int device_index, char* err, size_t err_len) {
  try {
    if (!accelerator_ok(device_index)) return 0;
    at::accelerator::resetPeakStats(static_cast<c10::DeviceIndex>(device_index));
    return 1;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
    return -1;
  }
}

// Writes the free (out[0]) and total (out[1]) bytes of device `device_index`, as
// torch.cuda.mem_get_info reports them; same return convention.
int vla_accelerator_memory_info(int device_index, int64_t* out, char* err, size_t err_len) {
  try {
    if (!accelerator_ok(device_index)) return 0;
    auto info = at::accelerator::getMemoryInfo(static_cast<c10::DeviceIndex>(device_index));
    out[0] = static_cast<int64_t>(info.first);
    out[1] = static_cast<int64_t>(info.second);
    return 1;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
    return -1;
  }
}

// Returns the caching allocator's unused blocks to the device (torch.cuda.empty_cache), so other
// processes (a policy node on the same GPU) can use them. Returns 1 on success, 0 when no
// accelerator is available, -1 on error.
int vla_accelerator_empty_cache(char* err, size_t err_len) {
  try {
    if (!accelerator_ok(0)) return 0;
    at::accelerator::emptyCache();
    return 1;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
    return -1;
  }
}

// `param.grad = None`, as torch's `optimizer.zero_grad()` does by default: the next backward
// writes a fresh gradient instead of adding into a zero-filled one. `t` is a tch tensor
// (at::Tensor*). Returns 1 on success, -1 on error.
int vla_tensor_clear_grad(at::Tensor* t, char* err, size_t err_len) {
  try {
    if (t->grad().defined()) t->mutable_grad().reset();
    return 1;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
    return -1;
  }
}

// `out.backward(grad)`: accumulates gradients into every leaf that requires them.
// `out` and `grad` are tch tensors (at::Tensor*). Returns 1 on success, -1 on error.
int vla_backward_with_grad(at::Tensor* out, at::Tensor* grad, char* err, size_t err_len) {
  try {
    out->backward(*grad);
    return 1;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
    return -1;
  }
}

// `out.backward(retain_graph=true)`: the graph stays for further backward passes through its
// parts (synchronised BatchNorm's second pass). Returns 1 on success, -1 on error.
int vla_backward_keep_graph(at::Tensor* out, char* err, size_t err_len) {
  try {
    out->backward({}, /*retain_graph=*/true);
    return 1;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
    return -1;
  }
}

// `param.grad = grad` (data-parallel training writes the all-reduced gradient back, also to a
// parameter that got none locally). `t`, `grad`: tch tensors. Returns 1 on success, -1 on error.
int vla_tensor_set_grad(at::Tensor* t, at::Tensor* grad, char* err, size_t err_len) {
  try {
    t->mutable_grad() = *grad;
    return 1;
  } catch (const std::exception& e) {
    copy_message(e.what(), err, err_len);
    return -1;
  }
}
}
