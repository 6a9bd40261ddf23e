// The kernel bench's step cases as written on its command line (tools/step_cases.h).
#include "step_cases.h"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "common/check.h"

namespace ernie::bench {
namespace {

TEST(StepCases, NoItemsGiveTheDefaultDecodeSteps) {
  const std::vector<StepCase> cases = parse_step_cases({});
  std::vector<std::string> labels;
  for (const StepCase& c : cases) {
    EXPECT_TRUE(c.decode_only());
    EXPECT_EQ(c.tokens(), c.sequences());
    labels.push_back(c.label());
  }
  EXPECT_EQ(labels, (std::vector<std::string>{"decode step, 1 x 1000", "decode step, 16 x 1000",
                                              "decode step, 16 x 8500", "decode step, 64 x 1500",
                                              "decode step, 256 x 1000"}));
}

TEST(StepCases, ACountPicksEveryDefaultOfThatManySequences) {
  const std::vector<StepCase> cases = parse_step_cases({"16", "1"});
  ASSERT_EQ(cases.size(), 3u);
  EXPECT_EQ(cases[0].label(), "decode step, 16 x 1000");
  EXPECT_EQ(cases[1].label(), "decode step, 16 x 8500");
  EXPECT_EQ(cases[2].label(), "decode step, 1 x 1000");
}

TEST(StepCases, GroupsWithPrefillChunks) {
  const std::vector<StepCase> cases =
      parse_step_cases({"8x1000/993+248x1000", "3x70", "1x8000/8000"});
  ASSERT_EQ(cases.size(), 3u);
  const StepCase& mixed = cases[0];
  ASSERT_EQ(mixed.groups.size(), 2u);
  EXPECT_EQ(mixed.groups[0].seqs, 8);
  EXPECT_EQ(mixed.groups[0].context, 1000);
  EXPECT_EQ(mixed.groups[0].fresh, 993);
  EXPECT_EQ(mixed.groups[1].seqs, 248);
  EXPECT_EQ(mixed.groups[1].fresh, 1);
  EXPECT_FALSE(mixed.decode_only());
  EXPECT_EQ(mixed.sequences(), 256);
  EXPECT_EQ(mixed.tokens(), 8 * 993 + 248);
  EXPECT_EQ(mixed.label(), "mixed step, 8x1000/993+248x1000");
  EXPECT_EQ(cases[1].label(), "decode step, 3 x 70");
  EXPECT_EQ(cases[2].label(), "mixed step, 1x8000/8000");
  EXPECT_EQ(cases[2].tokens(), 8000);
  // Two decoding groups are still a decode step (graph-replayed), labelled as written.
  const StepCase two = parse_step_cases({"2x100+3x200"}).at(0);
  EXPECT_TRUE(two.decode_only());
  EXPECT_EQ(two.label(), "mixed step, 2x100+3x200");
}

TEST(StepCases, BadItemsAreRefusedByName) {
  for (const std::string bad :
       {"",        "x",         "0x100",     "4x0",          "4x",     "x100",
        "4x100/",  "4x100/0",   "4x100/101", "4x100+",       "+4x100", "4x100++2x5",
        "4/2x100", "4x100/2/3", "4x-1",      "-4x100",       "4x1e3",  "4y100",
        "4x100x2", "7",         "abc",       "4x99999999999"}) {
    try {
      parse_step_cases({bad});
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("step case '" + bad + "'"), std::string::npos)
          << e.what();
    }
  }
}

TEST(StepCases, RandomWellFormedItemsRoundTripThroughTheLabel) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 500; ++trial) {
    std::string item;
    std::vector<StepGroup> want;
    const int groups = 1 + static_cast<int>(rng() % 4);
    for (int i = 0; i < groups; ++i) {
      StepGroup g;
      g.seqs = 1 + static_cast<int>(rng() % 300);
      g.context = 1 + static_cast<int>(rng() % 20000);
      g.fresh = rng() % 2 ? 1 : 1 + static_cast<int>(rng() % g.context);
      item += cat(i ? "+" : "", g.seqs, "x", g.context);
      if (g.fresh != 1 || rng() % 2) item += cat("/", g.fresh);
      want.push_back(g);
    }
    const StepCase c = parse_step_cases({item}).at(0);
    ASSERT_EQ(c.groups.size(), want.size()) << item;
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ(c.groups[i].seqs, want[i].seqs) << item;
      EXPECT_EQ(c.groups[i].context, want[i].context) << item;
      EXPECT_EQ(c.groups[i].fresh, want[i].fresh) << item;
    }
    // The label of a mixed case parses back to the same groups.
    if (c.label().rfind("mixed step, ", 0) == 0) {
      const StepCase again = parse_step_cases({c.label().substr(12)}).at(0);
      ASSERT_EQ(again.groups.size(), c.groups.size());
      for (size_t i = 0; i < want.size(); ++i) {
        EXPECT_EQ(again.groups[i].fresh, c.groups[i].fresh);
        EXPECT_EQ(again.groups[i].context, c.groups[i].context);
      }
    }
  }
}

}  // namespace
}  // namespace ernie::bench
