// A small deterministic random generator whose output is bit-identical on every platform and
// standard library (std::normal_distribution is not), for synthetic weights and test data.
#pragma once

#include <cstdint>
#include <string_view>

namespace ernie {

// SplitMix64 step: used for seeding and for hashing names into seeds.
constexpr uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// FNV-1a, so a tensor's random stream depends only on (seed, its name).
constexpr uint64_t hash_name(std::string_view s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (char c : s) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
  return h;
}

// xoshiro256** with doubles built from 53 random bits, and a normal approximation that uses
// only exact arithmetic (sum of four uniforms, rescaled to unit variance): no libm calls, so
// results never depend on the platform. Every member is constexpr, so CUDA code (built with
// --expt-relaxed-constexpr) draws exactly the same stream as the host.
class Rng {
 public:
  constexpr explicit Rng(uint64_t seed) {
    uint64_t sm = seed;
    for (auto& w : s_) w = splitmix64(sm);
  }
  constexpr Rng(uint64_t seed, std::string_view stream) : Rng(seed ^ hash_name(stream)) {}

  constexpr uint64_t next() {
    const uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }
  // Uniform in [0, 1).
  constexpr double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  // Uniform in [lo, hi).
  constexpr double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }
  // Integer in [0, n).
  constexpr uint64_t below(uint64_t n) { return n ? next() % n : 0; }
  // Approximately standard normal (Irwin-Hall of 4: mean 2, variance 1/3), range +-3.46.
  constexpr double normal() {
    double s = uniform() + uniform() + uniform() + uniform();
    return (s - 2.0) * 1.7320508075688772;
  }

 private:
  static constexpr uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4] = {};
};

}  // namespace ernie
