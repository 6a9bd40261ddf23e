// The paged KV cache's bookkeeping: a pool of fixed-size blocks with reference counts, and
// prefix caching (full blocks identified by a chained hash of their tokens, hits confirmed by
// the token ids, free cached blocks kept until evicted least recently used).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

namespace ernie::runtime {

using BlockHash = uint64_t;

// Hash of a full block given the hash of the block before it (0 for the first block).
BlockHash hash_block(BlockHash parent, std::span<const int32_t> tokens);

class BlockPool {
 public:
  BlockPool(int64_t num_blocks, bool enable_caching);

  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  // Blocks that allocate() can hand out now (free ones, cached or not).
  int64_t num_free() const { return num_free_; }
  // Fraction of blocks referenced by some request.
  double usage() const {
    return 1.0 - static_cast<double>(num_free_) / static_cast<double>(blocks_.size());
  }

  // Takes n blocks from the front of the free queue (evicting their cache entries), each with
  // ref count 1. Requires n <= num_free().
  std::vector<int32_t> allocate(int64_t n);
  // Drops one reference of each block; blocks reaching zero go to the back of the free queue
  // in the given order (so pass a request's blocks tail first: its tail is evicted first).
  void release(std::span<const int32_t> blocks);
  // A cached full block with this hash, parent hash and tokens, if any.
  std::optional<int32_t> lookup(BlockHash hash, BlockHash parent,
                                std::span<const int32_t> tokens) const;
  // Adds a reference to a cached block (taking it off the free queue when it was free).
  void take(int32_t block);
  bool is_free(int32_t block) const { return blocks_[block].ref == 0; }
  // Registers a block that now holds `tokens` (full) as cached under `hash`.
  void cache(int32_t block, BlockHash hash, BlockHash parent, std::span<const int32_t> tokens);
  int32_t ref_count(int32_t block) const { return blocks_[block].ref; }
  // Drops every cache entry of free blocks (tests, and --no-enable-prefix-caching switches).
  void reset_cache();

  // Throws ernie::Error when the free queue, ref counts and cache disagree (tests).
  void check_invariants() const;

 private:
  struct Block {
    int32_t ref = 0;
    bool cached = false;
    BlockHash hash = 0, parent = 0;
    std::vector<int32_t> tokens;
    int32_t prev = -1, next = -1;  // free-queue links
    bool queued = false;
  };
  void push_back(int32_t b);
  void unlink(int32_t b);
  void uncache(int32_t b);

  std::vector<Block> blocks_;
  int32_t head_ = -1, tail_ = -1;
  int64_t num_free_ = 0;
  bool caching_;
  std::unordered_multimap<BlockHash, int32_t> by_hash_;
};

// One request's view of the cache: its block table and the hashes of its full blocks.
struct BlockTable {
  std::vector<int32_t> blocks;
  std::vector<BlockHash> hashes;  // of blocks [0, hashes.size()), all full and cached
};

class KvCacheManager {
 public:
  KvCacheManager(int64_t num_blocks, int block_size, bool enable_prefix_caching);

  int block_size() const { return block_size_; }
  int64_t num_blocks() const { return pool_.num_blocks(); }
  const BlockPool& pool() const { return pool_; }
  BlockPool& pool() { return pool_; }
  bool prefix_caching() const { return caching_; }

  // Longest run of cached full blocks at the start of `tokens`, leaving at least the last token
  // to compute. Counts `tokens.size()` queried and the hit tokens.
  std::vector<int32_t> cached_prefix(std::span<const int32_t> tokens);
  // Grows `table` to hold `total_tokens` tokens, adopting `prefix` (from cached_prefix) first.
  // Returns false, changing nothing, when there are not enough free blocks.
  bool allocate(BlockTable& table, int64_t total_tokens, std::span<const int32_t> prefix);
  // Registers the blocks that `num_computed` computed tokens have filled.
  void cache_full_blocks(BlockTable& table, std::span<const int32_t> tokens, int64_t num_computed);
  void free(BlockTable& table);

  int64_t queries() const { return queries_; }
  int64_t hits() const { return hits_; }

 private:
  int block_size_;
  bool caching_;
  BlockPool pool_;
  int64_t queries_ = 0, hits_ = 0;
};

}  // namespace ernie::runtime
