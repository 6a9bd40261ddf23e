// The kernel timeline's arithmetic (tools/kernel_timeline.h), on made-up spans.
#include "kernel_timeline.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <random>

namespace ernie::trace {
namespace {

const KernelRow* row(const TimelineSummary& t, const std::string& name) {
  for (const KernelRow& r : t.rows) {
    if (r.name == name) return &r;
  }
  return nullptr;
}

TEST(KernelTimeline, SerialChainWithAGap) {
  // a [0,10], b [12,20], c [20,25], given out of order.
  const TimelineSummary t = summarize({{"c", 20, 25}, {"a", 0, 10}, {"b", 12, 20}});
  EXPECT_EQ(t.span_ns, 25u);
  EXPECT_EQ(t.covered_ns, 23u);
  EXPECT_EQ(t.idle_ns, 2u);
  EXPECT_EQ(t.gaps, 1);
  EXPECT_EQ(t.largest_gap_ns, 2u);
  EXPECT_EQ(t.after_largest_gap, "b");
  EXPECT_EQ(t.after_largest_gap_index, 1u);
  ASSERT_EQ(t.rows.size(), 3u);
  EXPECT_EQ(row(t, "a")->adds_ns, 10u);
  EXPECT_EQ(row(t, "b")->adds_ns, 10u);  // the gap before it counts as its own
  EXPECT_EQ(row(t, "c")->adds_ns, 5u);
  EXPECT_EQ(t.rows.back().name, "c");  // least added last
}

TEST(KernelTimeline, NamesTheKernelAfterTheLargestGap) {
  // gaps of 3 (before b), 6 (before x) and 1 (before e; d, empty, closes none).
  const TimelineSummary t = summarize(
      {{"e", 40, 41}, {"a", 0, 5}, {"b", 8, 20}, {"c", 15, 32}, {"d", 39, 39}, {"x", 38, 39}});
  EXPECT_EQ(t.gaps, 3);
  EXPECT_EQ(t.idle_ns, 3u + 6u + 1u);
  EXPECT_EQ(t.largest_gap_ns, 6u);
  EXPECT_EQ(t.after_largest_gap, "x");
  EXPECT_EQ(t.after_largest_gap_index, 3u);
}

TEST(KernelTimeline, EarlyLaunchedKernelsAddOnlyTheirTail) {
  // b and c start while a runs (programmatic dependent launch) and wait inside.
  const TimelineSummary t = summarize({{"a", 0, 10}, {"b", 2, 18}, {"c", 3, 20}, {"b", 19, 30}});
  EXPECT_EQ(t.span_ns, 30u);
  EXPECT_EQ(t.covered_ns, 30u);
  EXPECT_EQ(t.idle_ns, 0u);
  EXPECT_EQ(t.gaps, 0);
  const KernelRow* b = row(t, "b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->calls, 2);
  EXPECT_EQ(b->run_ns, 16u + 11u);
  EXPECT_EQ(b->adds_ns, 8u + 10u);
  EXPECT_EQ(row(t, "c")->adds_ns, 2u);
  EXPECT_EQ(t.rows.front().name, "b");
}

TEST(KernelTimeline, AddsSumToTheSpanForAnySpans) {
  std::mt19937_64 rng(std::random_device{}());
  const char* names[] = {"k0", "k1", "k2", "k3", "k4"};
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<KernelSpan> spans;
    const int n = 1 + static_cast<int>(rng() % 40);
    uint64_t lo = rng() % 1000, hi = lo;
    for (int i = 0; i < n; ++i) {
      const uint64_t start = 1000 + rng() % 5000, len = rng() % 300;
      spans.push_back({names[rng() % 5], start, start + len});
      if (i == 0 || start < lo) lo = start;
      hi = std::max(hi, start + len);
    }
    const TimelineSummary t = summarize(spans);
    uint64_t adds = 0;
    int calls = 0;
    for (const KernelRow& r : t.rows) {
      adds += r.adds_ns;
      calls += r.calls;
    }
    EXPECT_EQ(t.span_ns, hi - lo);
    EXPECT_EQ(adds, t.span_ns);
    EXPECT_EQ(calls, n);
    EXPECT_EQ(t.covered_ns + t.idle_ns, t.span_ns);
  }
}

TEST(KernelTimeline, EmptyHasNothing) {
  const TimelineSummary t = summarize({});
  EXPECT_EQ(t.span_ns, 0u);
  EXPECT_TRUE(t.rows.empty());
}

TEST(KernelTimeline, ShortNames) {
  EXPECT_EQ(short_kernel_name("_Z3fooi"), "foo");
  // void bar<16, true>(int)
  EXPECT_EQ(short_kernel_name("_Z3barILi16ELb1EEvi"), "bar<16, true>");
  // ernie::cuda::(anonymous namespace)::baz()
  EXPECT_EQ(short_kernel_name("_ZN5ernie4cuda12_GLOBAL__N_13bazEv"), "baz");
  EXPECT_EQ(short_kernel_name("not_mangled"), "not_mangled");
}

}  // namespace
}  // namespace ernie::trace
