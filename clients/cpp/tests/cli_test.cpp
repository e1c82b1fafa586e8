// Unit tests of guarded-generate's pure parts: no daemon needed.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "cli.hpp"

namespace {

using Args = std::vector<std::string>;

// Parses args (argv[0] added) as main does.
cli::Options parse(Args args) {
  args.insert(args.begin(), "guarded-generate");
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  argv.push_back(nullptr);
  return cli::parse_args(static_cast<int>(args.size()), argv.data());
}

// The usage error's message ("" when getopt_long printed its own), or "(no error)".
std::string usage_error(const Args& args) {
  try {
    parse(args);
  } catch (const cli::UsageError& e) {
    return e.what();
  }
  return "(no error)";
}

// ---- arguments ------------------------------------------------------------------------

TEST(ParseArgs, DefaultsCarryAllFourSamplingValues) {
  const cli::Options o = parse({"--addr", "unix:/tmp/x.sock", "hello"});
  EXPECT_EQ(o.addr, "unix:/tmp/x.sock");
  EXPECT_EQ(o.request.prompt, "hello");
  EXPECT_EQ(o.request.max_tokens, 256u);
  EXPECT_EQ(o.request.sampling.temperature, 0.8);
  EXPECT_EQ(o.request.sampling.top_k, 40);
  EXPECT_EQ(o.request.sampling.top_p, 0.95);
  EXPECT_EQ(o.request.sampling.min_p, 0.05);
  EXPECT_FALSE(o.request.sampling.seed.has_value());
  EXPECT_EQ(o.request.policy, "");
  EXPECT_FALSE(o.request.timeout.has_value());
  EXPECT_FALSE(o.cancel_after.has_value());
  EXPECT_FALSE(o.json);
}

TEST(ParseArgs, EveryFlagBothSpellings) {
  const cli::Options o = parse({"--addr=127.0.0.1:1", "--json", "--policy", "test", "--max-tokens=8",
                                          "--temperature", "0", "--top-k", "-1", "--top-p=1", "--min-p", "0",
                                          "--seed", "4294967295", "--stop", "\n", "--stop=.", "--timeout", "1.5",
                                          "--cancel-after", "3", "--tls-ca", "ca.pem", "--token-file=t",
                                          "The capital of France is"});
  EXPECT_EQ(o.addr, "127.0.0.1:1");
  EXPECT_TRUE(o.json);
  EXPECT_EQ(o.request.policy, "test");
  EXPECT_EQ(o.request.max_tokens, 8u);
  EXPECT_EQ(o.request.sampling.temperature, 0.0);
  EXPECT_EQ(o.request.sampling.top_k, -1);  // the daemon judges ranges
  EXPECT_EQ(o.request.sampling.top_p, 1.0);
  EXPECT_EQ(o.request.sampling.seed, 4294967295u);
  EXPECT_EQ(o.request.stop, (std::vector<std::string>{"\n", "."}));
  EXPECT_EQ(o.request.timeout->count(), 1500);
  EXPECT_EQ(o.cancel_after, 3u);
  EXPECT_EQ(o.tls_ca_file, "ca.pem");
  EXPECT_EQ(o.token_file, "t");
  EXPECT_EQ(o.request.prompt, "The capital of France is");
}

TEST(ParseArgs, PromptAfterDoubleDashOrAnywhere) {
  EXPECT_EQ(parse({"--addr", "a:1", "--", "--json"}).request.prompt, "--json");
  EXPECT_EQ(parse({"--addr", "a:1", "hello", "--json"}).request.prompt, "hello");  // getopt_long permutes
  EXPECT_TRUE(parse({"--addr", "a:1", "hello", "--json"}).json);
}

TEST(ParseArgs, InfoNeedsNoPrompt) {
  const cli::Options o = parse({"--addr", "unix:/x", "--info"});
  EXPECT_TRUE(o.info);
}

TEST(ParseArgs, BadUsageNamesTheFlag) {
  for (const auto& [args, flag] : std::vector<std::pair<Args, std::string>>{
           {{"--addr", "a:1", "--max-tokens", "0", "p"}, "'--max-tokens'"},
           {{"--addr", "a:1", "--max-tokens", "abc", "p"}, "'--max-tokens'"},
           {{"--addr", "a:1", "--max-tokens", "4294967296", "p"}, "'--max-tokens'"},
           {{"--addr", "a:1", "--temperature", "hot", "p"}, "'--temperature'"},
           {{"--addr", "a:1", "--seed", "-1", "p"}, "'--seed'"},
           {{"--addr", "a:1", "--timeout", "0", "p"}, "'--timeout'"},
           {{"--addr", "a:1", "--timeout", "nan", "p"}, "'--timeout'"},
           {{"--addr", "a:1", "--timeout", "1e10", "p"}, "'--timeout'"},
           {{"--addr", "a:1", "--cancel-after", "0", "p"}, "'--cancel-after'"},
           {{"--addr", "a:1", "--top-k", "1.5", "p"}, "'--top-k'"},
           {{"p"}, "'--addr'"},
           {{"--addr", "a:1"}, "PROMPT"},
           {{"--addr", "a:1", ""}, "PROMPT"},
           {{"--addr", "a:1", "p", "q"}, "PROMPT"},
           {{"--addr", "a:1", "--tls-ca", "ca", "--tls-cert", "c", "p"}, "'--tls-key' is required"},
           {{"--addr", "a:1", "--tls-ca", "ca", "--tls-key", "k", "p"}, "'--tls-cert' is required"},
           {{"--addr", "a:1", "--tls-cert", "c", "--tls-key", "k", "p"}, "'--tls-ca' is required"},
       }) {
    EXPECT_NE(usage_error(args).find(flag), std::string::npos) << usage_error(args);
  }
  // getopt_long's own errors (printed by getopt_long, naming the option): an empty message.
  EXPECT_EQ(usage_error({"--addr", "a:1", "--bogus", "p"}), "");
  EXPECT_EQ(usage_error({"--addr", "a:1", "--json=1", "p"}), "");
  EXPECT_EQ(usage_error({"--addr", "a:1", "p", "--seed"}), "");
}

TEST(ParseArgs, TimeoutRoundsHalfToEvenWithAFloorOfOne) {
  const auto ms = [](const char* seconds) { return parse({"--addr", "a:1", "--timeout", seconds, "p"}).request.timeout->count(); };
  EXPECT_EQ(ms("1.5"), 1500);
  EXPECT_EQ(ms("0.0001"), 1);
  EXPECT_EQ(ms("0.0005"), 1);  // round(0.5) = 0, then max(1, 0)
  EXPECT_EQ(ms("0.0025"), 2);  // 2.5 -> 2, as Python's round()
  EXPECT_EQ(ms("0.0035"), 4);  // 3.5 -> 4
  EXPECT_EQ(ms("4294967.295"), 4294967295);
}

class TempFile {
 public:
  explicit TempFile(const std::string& content) {
    char name[] = "/tmp/fse-cli-test-XXXXXX";
    const int fd = mkstemp(name);
    EXPECT_GE(fd, 0);
    path_ = name;
    std::ofstream(path_, std::ios::binary) << content;
    close(fd);
  }
  ~TempFile() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

TEST(LoadCredentials, TokenIsTheFirstLineTrimmed) {
  const TempFile token("  s3cret \t\nsecond line\n");
  cli::Options o = parse({"--addr", "a:1", "--token-file", token.path(), "p"});
  EXPECT_EQ(cli::load_credentials(o).token, "s3cret");
  EXPECT_EQ(cli::load_credentials(o).tls_ca_pem, "");
}

TEST(LoadCredentials, UnreadableOrEmptyFilesAreUsageErrors) {
  cli::Options o = parse({"--addr", "a:1", "--token-file", "/nonexistent/t", "p"});
  try {
    cli::load_credentials(o);
    FAIL() << "no error";
  } catch (const cli::UsageError& e) {
    EXPECT_EQ(std::string(e.what()), "option '--token-file': /nonexistent/t: No such file or directory");
  }
  const TempFile empty("\n");
  o.token_file = empty.path();
  EXPECT_THROW(cli::load_credentials(o), cli::UsageError);
  o.token_file.clear();
  o.tls_ca_file = "/nonexistent/ca.pem";
  EXPECT_THROW(cli::load_credentials(o), cli::UsageError);
}

TEST(LoadCredentials, ClientCertificateAndKey) {
  const TempFile ca("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
  const TempFile cert("-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n");
  const TempFile key("-----BEGIN PRIVATE KEY-----\nMIIG\n-----END PRIVATE KEY-----\n");
  cli::Options o = parse({"--addr", "a:1", "--tls-ca", ca.path(), "--tls-cert", cert.path(), "--tls-key=" + key.path(), "p"});
  EXPECT_EQ(o.tls_cert_file, cert.path());
  const fse::ConnectOptions c = cli::load_credentials(o);
  EXPECT_NE(c.tls_cert_pem.find("MIIC"), std::string::npos);
  EXPECT_NE(c.tls_key_pem.find("MIIG"), std::string::npos);
  // Unreadable, or not what the flag wants: a usage error naming the flag.
  const std::pair<std::pair<std::string, std::string>, std::string> cases[] = {
      {{"/nonexistent/c.pem", key.path()}, "option '--tls-cert': /nonexistent/c.pem: "},
      {{cert.path(), "/nonexistent/k.pem"}, "option '--tls-key': /nonexistent/k.pem: "},
      {{key.path(), key.path()}, "option '--tls-cert': " + key.path() + ": no PEM certificate"},
      {{cert.path(), cert.path()}, "option '--tls-key': " + cert.path() + ": no PEM private key"},
  };
  for (const auto& [files, want] : cases) {
    o.tls_cert_file = files.first;
    o.tls_key_file = files.second;
    try {
      cli::load_credentials(o);
      ADD_FAILURE() << "no error for " << want;
    } catch (const cli::UsageError& e) {
      EXPECT_EQ(std::string(e.what()).rfind(want, 0), 0U) << e.what();
    }
  }
}

// ---- text -----------------------------------------------------------------------------

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
  t.health = fse::Health::Green;
  return t;
}

TEST(TokenText, ColourOnlyWhenAsked) {
  fse::Token t = sample_token();
  EXPECT_EQ(cli::token_text(t, false), " Berlin");
  EXPECT_EQ(cli::token_text(t, true), "\x1b[32m Berlin\x1b[0m");
  t.health = fse::Health::Red;
  EXPECT_EQ(cli::token_text(t, true), "\x1b[31m Berlin\x1b[0m");
  t.health = fse::Health::Unspecified;
  EXPECT_EQ(cli::token_text(t, true), " Berlin");
}

// ---- outcomes -------------------------------------------------------------------------

TEST(ExitCode, FromVerdictAndError) {
  EXPECT_EQ(cli::exit_code(fse::Status::Completed), 0);
  EXPECT_EQ(cli::exit_code(fse::Status::Halted), 3);
  EXPECT_EQ(cli::exit_code(fse::Status::Cancelled), 4);
  EXPECT_EQ(cli::exit_code(fse::Status::Error), 1);
  EXPECT_EQ(cli::exit_code(fse::Error(grpc::StatusCode::INVALID_ARGUMENT, "max_tokens: ...")), 2);
  EXPECT_EQ(cli::exit_code(fse::Error(grpc::StatusCode::UNAUTHENTICATED, "no")), 1);
  EXPECT_EQ(cli::exit_code(fse::Error(grpc::StatusCode::RESOURCE_EXHAUSTED, "busy")), 1);
}

TEST(ErrorWhat, CodeNameAndServerMessage) {
  EXPECT_STREQ(fse::Error(grpc::StatusCode::RESOURCE_EXHAUSTED, "m").what(), "RESOURCE_EXHAUSTED: m");
}

TEST(Enums, Names) {
  EXPECT_EQ(fse::to_string(fse::Status::Cancelled), "cancelled");
  EXPECT_EQ(fse::to_string(fse::Health::Yellow), "yellow");
  EXPECT_EQ(fse::code_name(grpc::StatusCode::DATA_LOSS), "DATA_LOSS");
}

}  // namespace
