// Interleaved rotary embedding fused with the paged KV-cache write.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ernie::cuda {

// qkv [tokens, (heads + 2 kv_heads) * head_dim]: q and k are rotated in place (pairs (2j, 2j+1)
// by angle position * theta^(-2j/head_dim), in f32), then k and v are stored at slot s of the
// cache, laid out [slots, kv_heads, head_dim]. positions, slots: device arrays [tokens].
void rope_store_kv(__nv_bfloat16* qkv, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache,
                   const int32_t* positions, const int64_t* slots, int tokens, int heads,
                   int kv_heads, int head_dim, double theta, cudaStream_t stream);

// The same with 16-byte pieces per thread and the inverse frequencies from a table
// (inv_freq [head_dim / 2]: theta^(-2j/head_dim) computed in double, rounded to f32, 16-byte
// aligned): the same bits. head_dim % 8 == 0, tokens <= 65535.
void rope_store_kv_vec(__nv_bfloat16* qkv, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache,
                       const int32_t* positions, const int64_t* slots, const float* inv_freq,
                       int tokens, int heads, int kv_heads, int head_dim, cudaStream_t stream);

// The same again for many tokens: wider CTAs over the whole step's pieces, several per thread
// with their loads issued together (the same bits as rope_store_kv_vec). head_dim % 8 == 0.
void rope_store_kv_wide(__nv_bfloat16* qkv, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache,
                        const int32_t* positions, const int64_t* slots, const float* inv_freq,
                        int tokens, int heads, int kv_heads, int head_dim, cudaStream_t stream);

}  // namespace ernie::cuda
