// The API layer's results without a server: stream chunks and responses from engine outputs.
#include <gtest/gtest.h>

#include "common/check.h"
#include "server/api.h"

namespace ernie::server {
namespace {

backend::SampledToken scored(int32_t id, float logprob, int32_t rank,
                             std::vector<backend::TokenLogprob> top) {
  backend::SampledToken t;
  t.id = id;
  t.logprob = logprob;
  t.rank = rank;
  t.top = std::move(top);
  return t;
}

runtime::CompletionDelta delta(int index, int32_t id, float logprob) {
  runtime::CompletionDelta d;
  d.index = index;
  d.token_ids = {id};
  d.text = "x";
  d.logprobs = {scored(id, logprob, 1, {{id, logprob}})};
  d.num_output_tokens = 1;
  return d;
}

// An echo with logprobs streams the prompt's scores with each choice's first output: a choice
// whose first output comes before the request's prompt logprobs is held until they arrive, then
// every choice goes out in order.
TEST(JobResult, EchoWithLogprobsWaitsForThePromptLogprobs) {
  ApiContext ctx;
  Job job;
  job.id = "cmpl-1";
  job.model = "m";
  job.stream = true;
  job.echo = true;
  job.completion_logprobs = 1;
  job.params.logprobs = 1;
  job.params.prompt_logprobs = 1;
  job.params.n = 2;
  job.prompts = {{5, 6, 7}};
  job.prompt_texts = {"abc"};
  JobResult result(job, ctx);
  EXPECT_TRUE(result.start_chunks().empty());  // the echo goes with the first output

  runtime::RequestOutput early;
  early.outputs = {delta(1, 40, -0.5f)};
  EXPECT_TRUE(result.apply(0, early).empty());

  runtime::RequestOutput first;
  first.prompt_logprobs = std::vector<backend::SampledToken>{scored(6, -1.25f, 2, {{9, -0.5f}}),
                                                             scored(7, -0.75f, 1, {{7, -0.75f}})};
  first.outputs = {delta(0, 41, -0.25f)};
  const auto chunks = result.apply(0, first);
  ASSERT_EQ(chunks.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const ojson& c = chunks[i]["choices"][0];
    EXPECT_EQ(c["index"], i);
    EXPECT_EQ(c["text"], "abcx");
    const ojson& lp = c["logprobs"];
    EXPECT_EQ(lp["tokens"], ojson::array({"token_id:5", "token_id:6", "token_id:7",
                                          i ? "token_id:40" : "token_id:41"}));
    EXPECT_TRUE(lp["token_logprobs"][0].is_null());
    EXPECT_EQ(lp["token_logprobs"][1], -1.25f);
    EXPECT_EQ(lp["token_logprobs"][2], -0.75f);
    EXPECT_EQ(lp["token_logprobs"][3], i ? -0.5f : -0.25f);
    // The token itself first, then the most likely.
    EXPECT_EQ(lp["top_logprobs"][1].dump(), R"({"token_id:6":-1.25,"token_id:9":-0.5})");
    EXPECT_EQ(lp["text_offset"], ojson::array({0, 10, 20, 30}));
  }
  // Later outputs carry no echo.
  runtime::RequestOutput later;
  later.outputs = {delta(1, 42, -0.125f)};
  const auto more = result.apply(0, later);
  ASSERT_EQ(more.size(), 1u);
  EXPECT_EQ(more[0]["choices"][0]["text"], "x");
  EXPECT_EQ(more[0]["choices"][0]["logprobs"]["text_offset"], ojson::array({41}));

  const ojson r = result.response();
  const ojson& pl = r["choices"][1]["prompt_logprobs"];
  ASSERT_EQ(pl.size(), 3u);
  EXPECT_TRUE(pl[0].is_null());
  EXPECT_EQ(pl[1].dump(), R"({"6":{"logprob":-1.25,"rank":2,"decoded_token":"token_id:6"},)"
                          R"("9":{"logprob":-0.5,"rank":1,"decoded_token":"token_id:9"}})");
  EXPECT_EQ(pl[2].size(), 1u);  // the prompt's token was the most likely
  EXPECT_EQ(r["choices"][1]["text"], "abcxx");
}

// max_tokens 0 with echo: the prompt alone, though a token was drawn (and counted).
TEST(JobResult, EchoOnlyShowsThePromptAlone) {
  ApiContext ctx;
  Job job;
  job.echo = true;
  job.echo_only = true;
  job.params.max_tokens = 1;
  job.prompts = {{5, 6}};
  job.prompt_texts = {"ab"};
  JobResult result(job, ctx);
  runtime::RequestOutput out;
  out.outputs = {delta(0, 40, -0.5f)};
  out.outputs[0].finish_reason = "length";
  out.finished = true;
  EXPECT_TRUE(result.apply(0, out).empty());
  const ojson r = result.response();
  EXPECT_EQ(r["choices"][0]["text"], "ab");
  EXPECT_TRUE(r["choices"][0]["logprobs"].is_null());
  EXPECT_TRUE(r["choices"][0]["prompt_logprobs"].is_null());
  EXPECT_EQ(r["usage"]["completion_tokens"], 1);
}

// vLLM's get_diff_sampling_param: transformers' defaults in the file are not the model's choice;
// an override is taken whatever its value.
TEST(SamplingDefaults, TakeWhatDiffersFromTransformersDefaults) {
  const ojson file = {{"temperature", 1.0}, {"top_k", 50},         {"top_p", 0.8},
                      {"min_p", 0.05},      {"max_new_tokens", 7}, {"do_sample", true},
                      {"eos_token_id", 2}};
  SamplingDefaults d = sampling_defaults(file, ojson::object());
  EXPECT_FALSE(d.temperature);
  EXPECT_FALSE(d.top_k);
  EXPECT_FALSE(d.repetition_penalty);
  EXPECT_EQ(d.top_p, 0.8);
  EXPECT_EQ(d.min_p, 0.05);
  EXPECT_EQ(d.max_tokens, 7);
  d = sampling_defaults(file, {{"temperature", 1.0}, {"top_p", 0.5}});
  EXPECT_EQ(d.temperature, 1.0);
  EXPECT_EQ(d.top_p, 0.5);
  EXPECT_EQ(d.to_json().dump(), R"({"temperature":1.0,"top_p":0.5,"min_p":0.05,"max_tokens":7})");
  EXPECT_THROW(sampling_defaults({{"top_k", "many"}}, ojson::object()), Error);
  EXPECT_THROW(sampling_defaults(ojson::object(), {{"max_new_tokens", 2.5}}), Error);
}

}  // namespace
}  // namespace ernie::server
