#include <cudaTypedefs.h>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/expert_layout.h"
#include "backend/cuda/hopper.cuh"
#include "common/check.h"

namespace ernie::cuda {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    ERNIE_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000,
                                                      cudaEnableDefault, &found));
    require(found == cudaDriverEntryPointSuccess && p != nullptr,
            "the CUDA driver has no cuTensorMapEncodeTiled (TMA needs driver 12.0 or newer)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

}  // namespace

CUtensorMap tensor_map_bf16_sw128(const void* base, int64_t rows, int64_t cols, int box_rows) {
  require_parts(cols % 8 == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0 && rows > 0 &&
                    box_rows > 0 && box_rows <= 256,
                "tensor map: bad matrix ", rows, " x ", cols, " (box rows ", box_rows, ")");
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * 2};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = encode_tiled()(
      &map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box,
      element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  require_parts(r == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed (error ", static_cast<int>(r),
                ") for a ", rows, " x ", cols, " matrix");
  return map;
}

CUtensorMap tensor_map_bf16_tiled(const void* base, int64_t rows, int64_t kp, int box_groups) {
  require_parts(rows > 0 && rows % kTiledGroupRows == 0 && kp > 0 && kp % 128 == 0 &&
                    reinterpret_cast<uintptr_t>(base) % 16 == 0 && box_groups > 0 &&
                    box_groups * kTiledGroupRows <= 256,
                "tensor map: bad tiled matrix ", rows, " x ", kp, " (box groups ", box_groups, ")");
  CUtensorMap map;
  const cuuint64_t dims[4] = {kTiledChunkCols, kTiledGroupRows,
                              static_cast<cuuint64_t>(kp / kTiledChunkCols),
                              static_cast<cuuint64_t>(rows / kTiledGroupRows)};
  // Bytes between neighbours along dims 1..3: a row of a chunk, a chunk, a group.
  const cuuint64_t strides[3] = {kTiledChunkCols * 2, kTiledGroupRows * kTiledChunkCols * 2,
                                 static_cast<cuuint64_t>(kTiledGroupRows * kp * 2)};
  const cuuint32_t box[4] = {kTiledChunkCols, kTiledGroupRows, 1,
                             static_cast<cuuint32_t>(box_groups)};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode_tiled()(
      &map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, const_cast<void*>(base), dims, strides, box,
      element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  require_parts(r == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed (error ", static_cast<int>(r),
                ") for a tiled ", rows, " x ", kp, " matrix");
  return map;
}

CUtensorMap tensor_map_bf16_sw128_3d(const void* base, const int64_t dims[3], const int box[3]) {
  require_parts(dims[0] % 8 == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0 && dims[1] > 0 &&
                    dims[2] > 0 && box[0] * 2 <= 128 && box[1] > 0 && box[2] > 0 && box[1] <= 256 &&
                    box[2] <= 256,
                "tensor map: bad array ", dims[0], " x ", dims[1], " x ", dims[2]);
  CUtensorMap map;
  const cuuint64_t gdims[3] = {static_cast<cuuint64_t>(dims[0]), static_cast<cuuint64_t>(dims[1]),
                               static_cast<cuuint64_t>(dims[2])};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(dims[0]) * 2,
                                 static_cast<cuuint64_t>(dims[0] * dims[1]) * 2};
  const cuuint32_t gbox[3] = {static_cast<cuuint32_t>(box[0]), static_cast<cuuint32_t>(box[1]),
                              static_cast<cuuint32_t>(box[2])};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUresult r = encode_tiled()(
      &map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void*>(base), gdims, strides, gbox,
      element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  require_parts(r == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed (error ", static_cast<int>(r),
                ") for a ", dims[0], " x ", dims[1], " x ", dims[2], " array");
  return map;
}

}  // namespace ernie::cuda
