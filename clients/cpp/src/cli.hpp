// guarded-generate's pure parts: arguments, JSON and text rendering, exit codes. No I/O
// beyond reading the --token-file / --tls-ca files, so all of it is unit-tested.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "fse/client.hpp"

namespace cli {

inline constexpr int kExitCompleted = 0;
inline constexpr int kExitError = 1;
inline constexpr int kExitUsage = 2;
inline constexpr int kExitHalted = 3;
inline constexpr int kExitCancelled = 4;

// Bad usage: printed as one line "guarded-generate: error: WHAT", exit 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string addr;
  std::string tls_ca_file;
  std::string token_file;
  bool json = false;
  bool info = false;  // GetInfo instead of a generation
  bool help = false;
  std::optional<std::uint32_t> cancel_after;
  fse::Request request;  // prompt, sampling (all four values always set), policy, stop, ...
};

// Parses argv[1..]; throws UsageError naming the flag and what it accepts.
Options parse_args(const std::vector<std::string>& args);

// The usage text for --help.
std::string usage();

// Reads --tls-ca and --token-file into connect options; throws UsageError.
fse::ConnectOptions load_credentials(const Options& options);

// timeout_ms = max(1, round(seconds * 1000)), rounding half to even as Python does.
std::uint32_t timeout_ms(double seconds);

// ---- rendering ----------------------------------------------------------------------

// Shortest text that parses back to the same double; "null" for NaN and infinities.
std::string json_number(double value);
// A JSON string literal: UTF-8 kept raw, control characters and bad bytes escaped.
std::string json_string(std::string_view text);

// One JSON line each (no trailing newline).
std::string token_json(const fse::Token& token);
std::string verdict_json(const fse::Verdict& verdict);
std::string info_json(const fse::Info& info);

// "[completed] 12 tokens released · policy default (0123456789ab)"
std::string verdict_line(const fse::Verdict& verdict);
// The token's text, wrapped in the ANSI colour of its health when `colour` is set.
std::string token_text(const fse::Token& token, bool colour);

// ---- outcomes -----------------------------------------------------------------------

// Whether an UNAVAILABLE message says the daemon could not be reached at all.
bool is_unreachable(std::string_view message);
int exit_code(fse::Status status);
int exit_code(const fse::Error& error);
// "guarded-generate: error: CODE: MESSAGE" (no newline); an unreachable daemon is
// "UNAVAILABLE: cannot reach the daemon at ADDR (DETAIL)".
std::string error_line(const fse::Error& error, std::string_view addr);
std::string usage_line(const UsageError& error);

}  // namespace cli
