// Element types of checkpoints and activations, and exact scalar conversions.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace ernie {

enum class DType : uint8_t { kBF16, kF16, kF32, kF8E4M3 };

constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::kBF16:
    case DType::kF16:
      return 2;
    case DType::kF32:
      return 4;
    case DType::kF8E4M3:
      return 1;
  }
  return 0;
}

// The safetensors spelling ("BF16", "F16", "F32", "F8_E4M3").
constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::kBF16:
      return "BF16";
    case DType::kF16:
      return "F16";
    case DType::kF32:
      return "F32";
    case DType::kF8E4M3:
      return "F8_E4M3";
  }
  return "?";
}

inline std::optional<DType> parse_dtype(std::string_view name) {
  for (DType t : {DType::kBF16, DType::kF16, DType::kF32, DType::kF8E4M3}) {
    if (dtype_name(t) == name) return t;
  }
  return std::nullopt;
}

// bf16 -> f32 is exact: the bf16 bits are the top half of the f32 bits.
inline float bf16_to_float(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

// f32 -> bf16 with round-to-nearest-even (what torch's .to(torch.bfloat16) does); NaN stays NaN.
inline uint16_t float_to_bf16(float value) {
  uint32_t u = std::bit_cast<uint32_t>(value);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant), -24);
  } else if (exp == 31) {
    v = mant ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    v = std::ldexp(static_cast<float>(mant | 0x400u), static_cast<int>(exp) - 25);
  }
  return sign ? -v : v;
}

// OCP FP8 E4M3 ("fn": no infinities, S.1111.111 is NaN, max 448).
inline float fp8_e4m3_to_float(uint8_t b) {
  const uint32_t sign = b >> 7, exp = (b >> 3) & 0xfu, mant = b & 7u;
  float v;
  if (exp == 0xf && mant == 7) {
    v = std::numeric_limits<float>::quiet_NaN();
  } else if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant), -9);
  } else {
    v = std::ldexp(static_cast<float>(mant | 8u), static_cast<int>(exp) - 10);
  }
  return sign ? -v : v;
}

// Reads element i of a buffer of type t as f32 (unaligned-safe).
inline float load_as_float(const void* data, DType t, size_t i) {
  const auto* p = static_cast<const unsigned char*>(data);
  switch (t) {
    case DType::kBF16: {
      uint16_t b;
      std::memcpy(&b, p + 2 * i, 2);
      return bf16_to_float(b);
    }
    case DType::kF16: {
      uint16_t b;
      std::memcpy(&b, p + 2 * i, 2);
      return f16_to_float(b);
    }
    case DType::kF32: {
      float f;
      std::memcpy(&f, p + 4 * i, 4);
      return f;
    }
    case DType::kF8E4M3:
      return fp8_e4m3_to_float(p[i]);
  }
  return 0.0f;
}

}  // namespace ernie
