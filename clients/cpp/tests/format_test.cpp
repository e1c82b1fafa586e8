// The library's JSON lines and verdict line (fse/format.hpp), against the contract's examples.
#include <gtest/gtest.h>

#include <utility>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>

#include "fse/format.hpp"

namespace {

// ---- JSON -----------------------------------------------------------------------------

TEST(JsonNumber, ShortestRoundTrip) {
  EXPECT_EQ(fse::json_number(0.17), "0.17");
  EXPECT_EQ(fse::json_number(2574.2), "2574.2");
  EXPECT_EQ(fse::json_number(10.0), "10");
  EXPECT_EQ(fse::json_number(-0.0), "-0");
  EXPECT_EQ(fse::json_number(1e300), "1e+300");
  EXPECT_EQ(fse::json_number(0.1 + 0.2), "0.30000000000000004");
  EXPECT_EQ(fse::json_number(std::nan("")), "null");
  EXPECT_EQ(fse::json_number(std::numeric_limits<double>::infinity()), "null");
  EXPECT_EQ(fse::json_number(-std::numeric_limits<double>::infinity()), "null");
  std::mt19937_64 bits(42);
  for (int k = 0; k < 10000; ++k) {
    double x = 0;
    const std::uint64_t raw = bits();
    std::memcpy(&x, &raw, sizeof x);
    if (!std::isfinite(x)) continue;
    const std::string text = fse::json_number(x);
    ASSERT_EQ(std::strtod(text.c_str(), nullptr), x) << text;
  }
}

TEST(JsonString, EscapesWhatJsonNeedsAndKeepsUtf8) {
  EXPECT_EQ(fse::json_string("a\"b\\c"), R"("a\"b\\c")");
  EXPECT_EQ(fse::json_string("\n\t\x01\x1f"), R"("\u000a\u0009\u0001\u001f")");
  EXPECT_EQ(fse::json_string("Paris \xc3\xa9t\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"),
            "\"Paris \xc3\xa9t\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"");
  EXPECT_EQ(fse::json_string(std::string("nul\0!", 5)), R"("nul\u0000!")");
}

fse::Token sample_token() {
  fse::Token t;
  t.index = 0;
  t.id = 15687;
  t.text = " Berlin";
  t.nll = 0.17;
  t.ppl = 1.19;
  t.variance = 19.7;
  t.max_prob = 0.84;
  t.l2_norm = 2574.2;
  t.entropy = 1.2345678901234567;
  t.health = fse::Health::Green;
  return t;
}

TEST(TokenJson, KeysInContractOrder) {
  fse::Token t = sample_token();
  EXPECT_EQ(fse::to_json(t),
            R"({"type":"token","index":0,"id":15687,"text":" Berlin","nll":0.17,"ppl":1.19,)"
            R"("variance":19.7,"max_prob":0.84,"l2_norm":2574.2,"entropy":1.2345678901234567,)"
            R"("health":"green"})");
  t.health = fse::Health::Unspecified;
  t.nll = std::numeric_limits<double>::infinity();
  t.entropy = std::numeric_limits<double>::quiet_NaN();
  t.warnings.push_back({"perplexity", 12.5, std::nullopt});
  EXPECT_EQ(fse::to_json(t),
            R"({"type":"token","index":0,"id":15687,"text":" Berlin","nll":null,"ppl":1.19,)"
            R"("variance":19.7,"max_prob":0.84,"l2_norm":2574.2,"entropy":null,"health":null,)"
            R"("warnings":[{"guard":"perplexity","value":12.5,"threshold":null}]})");
}

fse::Verdict halted() {
  fse::Verdict v;
  v.status = fse::Status::Halted;
  v.guard = "l2_norm";
  v.value = 2574.2;
  v.threshold = 10.0;
  v.token_index = 0;
  v.tokens = 0;
  v.policy = "test";
  v.policy_sha256 = "0123456789abcdef0123";
  return v;
}

TEST(VerdictJson, HaltedAndCompleted) {
  EXPECT_EQ(fse::to_json(halted()),
            R"({"type":"verdict","status":"halted","completion":null,"guard":"l2_norm","value":2574.2,"threshold":10,)"
            R"("token_index":0,"tokens":0,"text":"","policy":"test","policy_sha256":"0123456789abcdef0123"})");
  fse::Verdict v;
  v.status = fse::Status::Error;
  v.tokens = 3;
  v.text = "a\"b";
  v.policy = "default";
  v.message = "boom";
  EXPECT_EQ(fse::to_json(v),
            R"({"type":"verdict","status":"error","completion":null,"guard":null,"value":null,"threshold":null,)"
            R"("token_index":null,"tokens":3,"text":"a\"b","policy":"default","policy_sha256":"",)"
            R"("message":"boom"})");
  const std::pair<fse::Completion, std::string> reasons[] = {{fse::Completion::EndOfGeneration, "end_of_generation"},
                                                             {fse::Completion::StopSequence, "stop_sequence"},
                                                             {fse::Completion::MaxTokens, "max_tokens"}};
  for (const auto& [completion, name] : reasons) {
    fse::Verdict done;
    done.status = fse::Status::Completed;
    done.completion = completion;
    done.tokens = 2;
    done.text = "ab";
    done.policy = "default";
    EXPECT_EQ(fse::to_json(done), R"({"type":"verdict","status":"completed","completion":")" + name +
                                      R"(","guard":null,"value":null,"threshold":null,"token_index":null,)"
                                      R"("tokens":2,"text":"ab","policy":"default","policy_sha256":""})");
    EXPECT_EQ(fse::to_string(completion), name);
  }
  EXPECT_EQ(fse::to_string(fse::Completion::Unspecified), "");
}

TEST(VerdictLine, TextModeSummary) {
  EXPECT_EQ(fse::to_string(halted()),
            "[halted by l2_norm: value 2574.2, threshold 10, at token 0] 0 tokens released \u00b7 policy test "
            "(0123456789ab)");
  fse::Verdict v;
  v.status = fse::Status::Completed;
  v.tokens = 12;
  v.policy = "default";
  v.policy_sha256 = "0123456789abcdef";
  EXPECT_EQ(fse::to_string(v), "[completed] 12 tokens released \u00b7 policy default (0123456789ab)");
  v.completion = fse::Completion::MaxTokens;
  EXPECT_EQ(fse::to_string(v), "[completed at max_tokens] 12 tokens released \u00b7 policy default (0123456789ab)");
  v.completion = fse::Completion::StopSequence;
  EXPECT_EQ(fse::to_string(v), "[completed at stop_sequence] 12 tokens released \u00b7 policy default (0123456789ab)");
  v.status = fse::Status::Error;
  v.message = "MESSAGE";
  v.tokens = 3;
  EXPECT_EQ(fse::to_string(v), "[error: MESSAGE] 3 tokens released \u00b7 policy default (0123456789ab)");
  fse::Verdict d = halted();
  d.guard = "deadline";
  d.value.reset();
  d.threshold.reset();
  d.token_index.reset();
  EXPECT_EQ(fse::to_string(d),
            "[halted by deadline: value n/a, threshold n/a, at token n/a] 0 tokens released \u00b7 policy test "
            "(0123456789ab)");
  EXPECT_EQ(fse::to_string([] {
              fse::Verdict big = halted();
              big.value = 1234567.0;
              return big;
            }()).substr(0, 36),
            "[halted by l2_norm: value 1.23457e+0");
}

TEST(InfoJson, ProtoFieldNamesWithoutModelPath) {
  fse::Info info;
  info.version = "0.1.0";
  info.model = {"gemma", "/secret/path.gguf", "abc", "gemma3 270M Q8_0", 262144, 2048, 32768, 291546784, true,
                "CUDA", 18, 18, {{"CUDA0", "H100", "gpu", 68719476736ULL, 18}, {"CPU", "Xeon", "cpu", 1ULL << 35, 0}}};
  info.policies = {{"default", "d1", true}, {"test", "t1", false}};
  info.limits = {4, 16, 2047, 2048, 4194304};
  EXPECT_EQ(fse::to_json(info),
            R"({"version":"0.1.0","model":{"name":"gemma","sha256":"abc","description":"gemma3 270M Q8_0",)"
            R"("vocab_size":262144,"context_size":2048,"train_context_size":32768,"size_bytes":291546784,)"
            R"("chat_template":true,"backend":"CUDA","layers":18,"gpu_layers":18,"devices":[)"
            R"({"name":"CUDA0","description":"H100","kind":"gpu","memory_bytes":68719476736,"layers":18},)"
            R"({"name":"CPU","description":"Xeon","kind":"cpu","memory_bytes":34359738368,"layers":0}]},)"
            R"("policies":[{"name":"default","sha256":"d1","builtin":true},)"
            R"({"name":"test","sha256":"t1","builtin":false}],"limits":{"max_streams":4,"max_queue":16,)"
            R"("max_tokens":2047,"max_prompt_tokens":2048,"max_message_bytes":4194304}})");
}

}  // namespace
