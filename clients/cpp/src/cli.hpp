// guarded-generate's pure parts: arguments (getopt_long), coloured text, exit codes (the
// JSON lines and the verdict line are the library's, fse/format.hpp). No I/O beyond reading
// the --token-file / --tls-ca / --tls-cert / --tls-key files, so all of it is unit-tested.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

#include "fse/client.hpp"

namespace cli {

inline constexpr int kExitError = 1;
inline constexpr int kExitUsage = 2;

// Bad usage, naming the flag: printed as "guarded-generate: WHAT", exit 2. An empty what()
// means getopt_long has already printed its own message.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string addr;
  std::string tls_ca_file;
  std::string tls_cert_file;  // mutual TLS: the client certificate, with tls_key_file
  std::string tls_key_file;
  std::string token_file;
  bool json = false;
  bool info = false;  // GetInfo instead of a generation
  bool help = false;
  std::optional<std::uint32_t> cancel_after;
  fse::Request request;  // prompt, sampling (all four values always set), policy, stop, ...
};

// Parses argv with getopt_long (which may permute argv); throws UsageError.
Options parse_args(int argc, char** argv);
extern const char* const kUsage;
// Reads --tls-ca, --tls-cert, --tls-key and --token-file into connect options; throws UsageError.
fse::ConnectOptions load_credentials(const Options& options);

// The token's text, wrapped in the ANSI colour of its health when `colour` is set.
std::string token_text(const fse::Token& token, bool colour);

int exit_code(fse::Status status);
int exit_code(const fse::Error& error);

}  // namespace cli
