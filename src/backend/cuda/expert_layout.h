// The layout the CUDA backend keeps the routed experts' weights in ("tiled"), for host and
// device code alike (no CUDA headers needed).
//
// A stacked expert matrix [rows, K] (gate/up: rows = E * 2I, K = hidden; down: rows = E * hidden,
// K = I) is cut into groups of 16 rows and chunks of 64 columns. A group's chunks follow one
// another in K order, each 16 rows x 64 columns (2 KB) row-major, and the 16-byte pieces of row r
// of a chunk are stored swizzled (piece p at p ^ (r % 8)): the 128-byte swizzle that TMA's
// CU_TENSOR_MAP_SWIZZLE_128B and wgmma's matching descriptors use, applied once at load. Rows are
// padded to a whole number of 128 columns with zeros (tiled_cols).
//
// Why: a decode GEMM stage reads 128 columns of 16 weight rows, which is then 4 KB of contiguous
// memory (one bulk copy) instead of 16 separate 256-byte pieces; contiguous copies streamed 7-10%
// faster on an H200 (ernie_stream_probe). A prefill GEMM reads 64-row boxes of one chunk through
// a 4-D tensor map (column, row in group, chunk, group) that lands in shared memory exactly as a
// swizzled 2-D box of the row-major matrix would.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define ERNIE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ERNIE_HOST_DEVICE inline
#endif

namespace ernie::cuda {

constexpr int kTiledGroupRows = 16;  // rows per group: every expert's row count is a multiple
constexpr int kTiledChunkCols = 64;  // columns per chunk (128 bytes of a row)

// Columns of a tiled row: K rounded up to a multiple of 128 (a decode stage's width).
ERNIE_HOST_DEVICE int64_t tiled_cols(int64_t k) {
  return (k + 127) / 128 * 128;
}

// Element offset of (row, col) in the tiled layout, kp = tiled_cols(K).
ERNIE_HOST_DEVICE int64_t tiled_offset(int64_t row, int64_t col, int64_t kp) {
  const int64_t group = row / kTiledGroupRows, r = row % kTiledGroupRows;
  const int64_t chunk = col / kTiledChunkCols, c = col % kTiledChunkCols;
  return group * kTiledGroupRows * kp + chunk * (kTiledGroupRows * kTiledChunkCols) +
         r * kTiledChunkCols + (((c / 8) ^ (r % 8)) * 8) + c % 8;
}

// ---- The wgmma GEMMs' activation stages (moe.cu) ----
//
// A stage holds a K slice (64 columns, 128 bytes) of BM activation rows as BM / 64 boxes of 64
// rows, each laid out as a 128-byte-swizzle TMA box would be: the same swizzle as a 64-column
// chunk of the tiled layout, which the wgmma descriptors read.

// Byte offset of 16-byte piece p (columns 8 p .. 8 p + 7) of row r in such a stage.
ERNIE_HOST_DEVICE int stage_piece_offset(int r, int p) {
  return (r / 64) * (64 * 128) + (r % 64) * 128 + ((p ^ (r % 8)) << 4);
}

// The gate/up producer's share of a stage it gathers (rows of x by cp.async): its 128 threads,
// warp w and lane l, each copy `pieces` adjacent pieces, from stage_first_piece(pieces, l) on,
// of the rows stage_gather_row(bm, pieces, w, l, i) for i < bm / 16 / pieces; the lanes of a
// warp take 8 / pieces lanes a row.
ERNIE_HOST_DEVICE int stage_gather_row(int bm, int pieces, int warp, int lane, int i) {
  const int lanes_per_row = 8 / pieces;
  return warp * (bm / 4) + i * (32 / lanes_per_row) + lane / lanes_per_row;
}
ERNIE_HOST_DEVICE int stage_first_piece(int pieces, int lane) {
  return lane % (8 / pieces) * pieces;
}

}  // namespace ernie::cuda
