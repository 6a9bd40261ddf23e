#include "runtime/kv_cache.h"

#include <algorithm>

#include "common/check.h"

namespace ernie::runtime {

BlockHash hash_block(BlockHash parent, std::span<const int32_t> tokens) {
  // splitmix-style mixing of the parent hash and each token: cheap, well distributed; hits are
  // confirmed against the stored tokens anyway.
  uint64_t h = parent ^ 0x243f6a8885a308d3ull ^ (tokens.size() * 0x9e3779b97f4a7c15ull);
  for (int32_t t : tokens) {
    h ^= static_cast<uint32_t>(t) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
    h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
    h ^= h >> 31;
  }
  return h;
}

BlockPool::BlockPool(int64_t num_blocks, bool enable_caching)
    : blocks_(num_blocks), caching_(enable_caching) {
  require(num_blocks > 0, "the KV cache needs at least one block");
  for (int32_t b = 0; b < num_blocks; ++b) push_back(b);
}

void BlockPool::push_back(int32_t b) {
  Block& blk = blocks_[b];
  blk.prev = tail_;
  blk.next = -1;
  if (tail_ >= 0)
    blocks_[tail_].next = b;
  else
    head_ = b;
  tail_ = b;
  blk.queued = true;
  ++num_free_;
}

void BlockPool::unlink(int32_t b) {
  Block& blk = blocks_[b];
  check(blk.queued, "unlinking a block that is not free");
  if (blk.prev >= 0)
    blocks_[blk.prev].next = blk.next;
  else
    head_ = blk.next;
  if (blk.next >= 0)
    blocks_[blk.next].prev = blk.prev;
  else
    tail_ = blk.prev;
  blk.prev = blk.next = -1;
  blk.queued = false;
  --num_free_;
}

void BlockPool::uncache(int32_t b) {
  Block& blk = blocks_[b];
  if (!blk.cached) return;
  auto [lo, hi] = by_hash_.equal_range(blk.hash);
  for (auto it = lo; it != hi; ++it) {
    if (it->second == b) {
      by_hash_.erase(it);
      break;
    }
  }
  blk.cached = false;
  blk.tokens.clear();
}

std::vector<int32_t> BlockPool::allocate(int64_t n) {
  check(n <= num_free_, "allocating more blocks than are free");
  std::vector<int32_t> out;
  out.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t b = head_;
    unlink(b);
    uncache(b);  // evict the least recently used cached content
    blocks_[b].ref = 1;
    out.push_back(b);
  }
  return out;
}

void BlockPool::release(std::span<const int32_t> blocks) {
  for (int32_t b : blocks) {
    Block& blk = blocks_[b];
    check(blk.ref > 0, "double free of a KV block");
    if (--blk.ref == 0) {
      if (!caching_) uncache(b);
      push_back(b);
    }
  }
}

std::optional<int32_t> BlockPool::lookup(BlockHash hash, BlockHash parent,
                                         std::span<const int32_t> tokens) const {
  if (!caching_) return std::nullopt;
  auto [lo, hi] = by_hash_.equal_range(hash);
  for (auto it = lo; it != hi; ++it) {
    const Block& blk = blocks_[it->second];
    if (blk.parent == parent &&
        std::equal(blk.tokens.begin(), blk.tokens.end(), tokens.begin(), tokens.end())) {
      return it->second;
    }
  }
  return std::nullopt;
}

void BlockPool::take(int32_t b) {
  Block& blk = blocks_[b];
  if (blk.ref == 0) unlink(b);
  ++blk.ref;
}

void BlockPool::cache(int32_t b, BlockHash hash, BlockHash parent,
                      std::span<const int32_t> tokens) {
  if (!caching_) return;
  Block& blk = blocks_[b];
  if (blk.cached) return;
  // Identical content computed twice (two requests in flight): keep one cache entry.
  if (lookup(hash, parent, tokens)) return;
  blk.cached = true;
  blk.hash = hash;
  blk.parent = parent;
  blk.tokens.assign(tokens.begin(), tokens.end());
  by_hash_.emplace(hash, b);
}

void BlockPool::reset_cache() {
  for (int32_t b = 0; b < num_blocks(); ++b) {
    if (blocks_[b].ref == 0) uncache(b);
  }
}

void BlockPool::check_invariants() const {
  int64_t queued = 0;
  int32_t prev = -1;
  for (int32_t b = head_; b >= 0; b = blocks_[b].next) {
    require(blocks_[b].queued && blocks_[b].ref == 0, "free queue holds a referenced block");
    require(blocks_[b].prev == prev, "free queue links are broken");
    prev = b;
    require(++queued <= num_blocks(), "free queue has a cycle");
  }
  require(prev == tail_, "free queue tail is wrong");
  require(queued == num_free_, "free count disagrees with the free queue");
  int64_t zero = 0, cached = 0;
  for (const auto& blk : blocks_) {
    require(blk.ref >= 0, "negative ref count");
    zero += blk.ref == 0;
    require((blk.ref == 0) == blk.queued, "a block is free but not queued, or queued but used");
    cached += blk.cached;
  }
  require(zero == num_free_, "blocks with no reference are not all free");
  require(static_cast<int64_t>(by_hash_.size()) == cached, "cache index disagrees with blocks");
}

KvCacheManager::KvCacheManager(int64_t num_blocks, int block_size, bool enable_prefix_caching)
    : block_size_(block_size),
      caching_(enable_prefix_caching),
      pool_(num_blocks, enable_prefix_caching) {
  require(block_size > 0, "block size must be positive");
}

std::vector<int32_t> KvCacheManager::cached_prefix(std::span<const int32_t> tokens) {
  std::vector<int32_t> out;
  if (!caching_) return out;
  queries_ += static_cast<int64_t>(tokens.size());
  const int64_t usable = (static_cast<int64_t>(tokens.size()) - 1) / block_size_;
  BlockHash parent = 0;
  for (int64_t i = 0; i < usable; ++i) {
    auto blk_tokens = tokens.subspan(i * block_size_, block_size_);
    const BlockHash h = hash_block(parent, blk_tokens);
    auto b = pool_.lookup(h, parent, blk_tokens);
    if (!b) break;
    out.push_back(*b);
    parent = h;
  }
  hits_ += static_cast<int64_t>(out.size()) * block_size_;
  return out;
}

bool KvCacheManager::allocate(BlockTable& table, int64_t total_tokens,
                              std::span<const int32_t> prefix) {
  const int64_t need = (total_tokens + block_size_ - 1) / block_size_;
  const int64_t have =
      static_cast<int64_t>(table.blocks.size()) + static_cast<int64_t>(prefix.size());
  const int64_t fresh = std::max<int64_t>(0, need - have);
  int64_t prefix_free = 0;  // cached blocks that are free leave the free queue when adopted
  for (int32_t b : prefix) prefix_free += pool_.is_free(b);
  if (fresh + prefix_free > pool_.num_free()) return false;
  for (int32_t b : prefix) {
    pool_.take(b);
    table.blocks.push_back(b);
  }
  for (int32_t b : pool_.allocate(fresh)) table.blocks.push_back(b);
  return true;
}

void KvCacheManager::cache_full_blocks(BlockTable& table, std::span<const int32_t> tokens,
                                       int64_t num_computed) {
  if (!caching_) return;
  const int64_t full =
      std::min<int64_t>(num_computed / block_size_, static_cast<int64_t>(table.blocks.size()));
  while (static_cast<int64_t>(table.hashes.size()) < full) {
    const int64_t i = static_cast<int64_t>(table.hashes.size());
    const BlockHash parent = i == 0 ? 0 : table.hashes[i - 1];
    auto blk_tokens = tokens.subspan(i * block_size_, block_size_);
    const BlockHash h = hash_block(parent, blk_tokens);
    pool_.cache(table.blocks[i], h, parent, blk_tokens);
    table.hashes.push_back(h);
  }
}

void KvCacheManager::free(BlockTable& table) {
  std::vector<int32_t> rev(table.blocks.rbegin(), table.blocks.rend());
  pool_.release(rev);
  table.blocks.clear();
  table.hashes.clear();
}

}  // namespace ernie::runtime
