// Per-step scratch memory of a device backend: a bump allocator over chunks that a Memory
// policy provides (`void* allocate(size_t)`, `void release(void*)`). When a step needs more than
// the current chunk, a chunk of at least everything before it plus `growth` is added; at the
// next reset the chunks are merged into one of the high-water size (plus an eighth), so after
// the first worst-case step no step allocates. No device headers: the host tests drive it with
// host memory.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace ernie::backend {

template <class Memory>
class ScratchArena {
 public:
  static constexpr size_t kAlign = 256;

  explicit ScratchArena(Memory memory = {}, size_t growth = size_t{64} << 20)
      : memory_(std::move(memory)), growth_(growth) {}
  ~ScratchArena() { release(); }
  ScratchArena(const ScratchArena&) = delete;
  ScratchArena& operator=(const ScratchArena&) = delete;

  void* alloc(size_t bytes) {
    bytes = round_up(std::max<size_t>(bytes, 1), kAlign);
    if (chunks_.empty() || offset_ + bytes > chunks_.back().size) {
      const size_t size = std::max(bytes, capacity() + growth_);
      chunks_.push_back(Chunk{memory_.allocate(size), size});
      offset_ = 0;
    }
    void* p = static_cast<char*>(chunks_.back().ptr) + offset_;
    offset_ += bytes;
    used_ += bytes;
    peak_ = std::max(peak_, used_);
    return p;
  }

  // Scratch taken after mark() can be handed back with rewind() once the work that uses it is
  // queued (later work on the same stream runs after it).
  struct Mark {
    size_t chunks, offset, used;
  };
  Mark mark() const { return {chunks_.size(), offset_, used_}; }
  void rewind(const Mark& m) {
    // used_ counts what one chunk would hold, so it steps back even when the space itself
    // cannot (a chunk was added meanwhile: merged at the next reset); the peak is then what
    // the merged chunk needs, not the sum of the growing chunks' fill.
    used_ = m.used;
    if (m.chunks != chunks_.size()) return;
    offset_ = m.offset;
  }

  // Start of a step. Merging frees chunks, so `wait_idle` is called first to let the work
  // still using them finish (only when there is something to merge).
  template <class WaitIdle>
  void reset(WaitIdle&& wait_idle) {
    if (chunks_.size() > 1) {
      wait_idle();
      release();
      ++generation_;  // addresses change: anything recorded against them is stale
      const size_t size = round_up(peak_ + peak_ / 8, size_t{1} << 20);
      chunks_.push_back(Chunk{memory_.allocate(size), size});
    }
    offset_ = 0;
    used_ = 0;
  }

  // The most one step has held at once: what a single chunk must hold.
  size_t peak() const { return peak_; }
  size_t chunk_count() const { return chunks_.size(); }
  uint64_t generation() const { return generation_; }
  size_t capacity() const {
    size_t s = 0;
    for (const auto& c : chunks_) s += c.size;
    return s;
  }

 private:
  struct Chunk {
    void* ptr;
    size_t size;
  };
  static size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }
  void release() {
    for (auto& c : chunks_) memory_.release(c.ptr);
    chunks_.clear();
  }

  Memory memory_;
  size_t growth_;
  std::vector<Chunk> chunks_;
  size_t offset_ = 0, used_ = 0, peak_ = 0;
  uint64_t generation_ = 0;
};

}  // namespace ernie::backend
