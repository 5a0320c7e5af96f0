// CUDA implementation of dprune::compact_channels: every tensor's index_select in ONE launch.
//
// Physical channel removal slices dozens of tensors per coupled group (conv weight, BN weight,
// bias, running stats, optimizer moments ...); one launch per tensor is launch-bound on GPU.
// Each tensor is viewed as (outer, size_d, inner) and its output as (outer, n_idx, inner); a small
// table of segments (one per tensor) is copied to the device and each thread copies one element
// of the concatenated outputs, finding its segment by binary search over the prefix offsets.
// Compiled only when the CUDA toolkit is present (see distributed_prune/kernels/native_build.py).
#include <ATen/ATen.h>
#include <ATen/WrapDimUtils.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace dprune {
namespace {

struct Segment {
  const char* src;
  char* dst;
  int64_t begin;   // first output element of this tensor in the concatenated numbering
  int64_t inner;   // elements after dim d
  int64_t size_d;  // source extent of dim d
  int64_t elem;    // bytes per element
};

__global__ void compact_kernel(const Segment* __restrict__ segs, int n_segs, int64_t total,
                               const int64_t* __restrict__ index, int64_t n_idx) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
       e += (int64_t)gridDim.x * blockDim.x) {
    int lo = 0, hi = n_segs - 1;  // last segment with begin <= e
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (segs[mid].begin <= e) lo = mid; else hi = mid - 1;
    }
    const Segment s = segs[lo];
    const int64_t local = e - s.begin;               // (outer, j, inner) in the output
    const int64_t in_ = local % s.inner;
    const int64_t j = (local / s.inner) % n_idx;
    const int64_t o = local / (s.inner * n_idx);
    const int64_t src_i = index[j];
    CUDA_KERNEL_ASSERT(src_i >= 0 && src_i < s.size_d);
    const int64_t from = (o * s.size_d + src_i) * s.inner + in_;
    switch (s.elem) {
      case 1: reinterpret_cast<uint8_t*>(s.dst)[local] = reinterpret_cast<const uint8_t*>(s.src)[from]; break;
      case 2: reinterpret_cast<uint16_t*>(s.dst)[local] = reinterpret_cast<const uint16_t*>(s.src)[from]; break;
      case 4: reinterpret_cast<uint32_t*>(s.dst)[local] = reinterpret_cast<const uint32_t*>(s.src)[from]; break;
      default: reinterpret_cast<uint64_t*>(s.dst)[local] = reinterpret_cast<const uint64_t*>(s.src)[from]; break;
    }
  }
}

}  // namespace

std::vector<at::Tensor> compact_channels_cuda(at::TensorList tensors, at::IntArrayRef dims,
                                              const at::Tensor& index) {
  TORCH_CHECK(tensors.size() == dims.size(), "dprune::compact_channels: ", tensors.size(),
              " tensors but ", dims.size(), " dims");
  std::vector<at::Tensor> out;
  if (tensors.empty()) return out;
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const at::Tensor idx = index.to(tensors[0].device(), at::kLong).contiguous();
  const int64_t n_idx = idx.numel();
  std::vector<at::Tensor> srcs;
  std::vector<Segment> segs;
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.is_cuda() && t.device() == tensors[0].device(),
                "dprune::compact_channels: all tensors must be on one CUDA device");
    const int64_t elem = t.element_size();
    TORCH_CHECK(elem == 1 || elem == 2 || elem == 4 || elem == 8,
                "dprune::compact_channels: unsupported element size ", elem);
    const int64_t d = at::maybe_wrap_dim(dims[i], t.dim());
    at::Tensor src = t.contiguous();
    std::vector<int64_t> shape = src.sizes().vec();
    const int64_t size_d = shape[d];
    int64_t inner = 1;
    for (size_t k = d + 1; k < shape.size(); ++k) inner *= shape[k];
    shape[d] = n_idx;
    at::Tensor dst = at::empty(shape, src.options());
    if (dst.numel() > 0) {
      segs.push_back({static_cast<const char*>(src.data_ptr()), static_cast<char*>(dst.data_ptr()),
                      total, inner, size_d, elem});
      total += dst.numel();
    }
    srcs.push_back(std::move(src));
    out.push_back(std::move(dst));
  }
  if (total > 0) {
    // Segment table: pinned host buffer -> device, ordered on the current stream.
    at::Tensor host = at::empty({(int64_t)(segs.size() * sizeof(Segment))},
                                at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), segs.data(), segs.size() * sizeof(Segment));
    at::Tensor table = host.to(tensors[0].device(), /*non_blocking=*/true);
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
    auto stream = c10::cuda::getCurrentCUDAStream();
    compact_kernel<<<blocks, threads, 0, stream>>>(
        reinterpret_cast<const Segment*>(table.data_ptr()), (int)segs.size(), total,
        idx.data_ptr<int64_t>(), n_idx);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast))
      out[i] = out[i].contiguous(at::MemoryFormat::ChannelsLast);
  }
  return out;
}

TORCH_LIBRARY_IMPL(dprune, CUDA, m) { m.impl("compact_channels", &compact_channels_cuda); }

}  // namespace dprune
