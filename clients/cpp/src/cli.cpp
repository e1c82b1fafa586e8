#include "cli.hpp"

#include <getopt.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

namespace cli {

namespace {

[[noreturn]] void bad(const char* flag, const std::string& value, const std::string& accepted) {
  throw UsageError(std::string("option '--") + flag + "': invalid value '" + value + "' (" + accepted + ")");
}

double number(const char* flag, const char* text) {
  char* end = nullptr;
  const double x = std::strtod(text, &end);
  if (*text == '\0' || *end != '\0') bad(flag, text, "a number");
  return x;
}

long long integer(const char* flag, const char* text, long long low, long long high) {
  char* end = nullptr;
  errno = 0;
  const long long n = std::strtoll(text, &end, 10);
  if (*text == '\0' || *end != '\0' || errno != 0 || n < low || n > high) {
    bad(flag, text, "an integer in " + std::to_string(low) + ".." + std::to_string(high));
  }
  return n;
}

std::string read_file(const char* flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError(std::string("option '--") + flag + "': " + path + ": " + std::strerror(errno));
  std::ostringstream content;
  content << in.rdbuf();
  return content.str();
}

}  // namespace

const char* const kUsage =
    "usage: guarded-generate --addr unix:PATH|HOST:PORT [--tls-ca FILE [--tls-cert FILE --tls-key FILE]]\n"
    "         [--token-file FILE] [--json] [--policy NAME] [--max-tokens N] [--temperature T]\n"
    "         [--top-k K] [--top-p P] [--min-p M] [--seed S] [--stop TEXT]... [--timeout SECONDS]\n"
    "         [--cancel-after N] PROMPT\n"
    "       guarded-generate --addr ADDR [--tls-ca FILE [--tls-cert FILE --tls-key FILE]] [--token-file FILE] --info\n"
    "Exit codes: 0 completed, 3 halted, 4 cancelled, 1 error, 2 bad usage or INVALID_ARGUMENT.\n";

Options parse_args(int argc, char** argv) {
  Options o;
  fse::Sampling& s = o.request.sampling;  // all four values always sent
  s.temperature = 0.8, s.top_k = 40, s.top_p = 0.95, s.min_p = 0.05;
  static const option kLong[] = {
      {"addr", required_argument, nullptr, 'a'},   {"tls-ca", required_argument, nullptr, 'c'},
      {"token-file", required_argument, nullptr, 'f'}, {"json", no_argument, nullptr, 'j'},
      {"info", no_argument, nullptr, 'i'},         {"help", no_argument, nullptr, 'h'},
      {"policy", required_argument, nullptr, 'p'}, {"max-tokens", required_argument, nullptr, 'n'},
      {"temperature", required_argument, nullptr, 'T'}, {"top-k", required_argument, nullptr, 'K'},
      {"top-p", required_argument, nullptr, 'P'},  {"min-p", required_argument, nullptr, 'M'},
      {"seed", required_argument, nullptr, 'S'},   {"stop", required_argument, nullptr, 's'},
      {"timeout", required_argument, nullptr, 't'}, {"cancel-after", required_argument, nullptr, 'C'},
      {"tls-cert", required_argument, nullptr, 'e'}, {"tls-key", required_argument, nullptr, 'k'},
      {nullptr, 0, nullptr, 0}};
  optind = 0;  // glibc: start afresh (the tests parse more than once)
  for (int c = 0; (c = getopt_long(argc, argv, "h", kLong, nullptr)) != -1;) {
    const char* v = optarg;
    switch (c) {
      case 'a': o.addr = v; break;
      case 'c': o.tls_ca_file = v; break;
      case 'e': o.tls_cert_file = v; break;
      case 'k': o.tls_key_file = v; break;
      case 'f': o.token_file = v; break;
      case 'j': o.json = true; break;
      case 'i': o.info = true; break;
      case 'h': o.help = true; break;
      case 'p': o.request.policy = v; break;
      case 'n': o.request.max_tokens = static_cast<std::uint32_t>(integer("max-tokens", v, 1, UINT32_MAX)); break;
      case 'T': s.temperature = number("temperature", v); break;
      case 'K': s.top_k = static_cast<std::int32_t>(integer("top-k", v, INT32_MIN, INT32_MAX)); break;
      case 'P': s.top_p = number("top-p", v); break;
      case 'M': s.min_p = number("min-p", v); break;
      case 'S': s.seed = static_cast<std::uint32_t>(integer("seed", v, 0, UINT32_MAX)); break;
      case 's': o.request.stop.emplace_back(v); break;
      case 'C': o.cancel_after = static_cast<std::uint32_t>(integer("cancel-after", v, 1, UINT32_MAX)); break;
      case 't': {
        const double seconds = number("timeout", v);
        if (!(seconds > 0 && seconds <= 4294967.295)) bad("timeout", v, "seconds > 0");
        // timeout_ms = max(1, round(SECONDS * 1000)); nearbyint rounds half to even, as Python
        o.request.timeout = std::chrono::milliseconds(std::max(1LL, std::llrint(std::nearbyint(seconds * 1000))));
        break;
      }
      default: throw UsageError("");  // getopt_long has printed its message, naming the option
    }
  }
  if (o.help) return o;
  if (o.addr.empty()) throw UsageError("option '--addr' is required");
  if (argc - optind > 1) throw UsageError("PROMPT: one expected, the last argument (quote it)");
  if (optind < argc) o.request.prompt = argv[optind];
  if (!o.info && o.request.prompt.empty()) throw UsageError("PROMPT: must not be empty");
  if (!o.tls_cert_file.empty() && o.tls_key_file.empty()) throw UsageError("option '--tls-key' is required with '--tls-cert'");
  if (!o.tls_key_file.empty() && o.tls_cert_file.empty()) throw UsageError("option '--tls-cert' is required with '--tls-key'");
  if (!o.tls_cert_file.empty() && o.tls_ca_file.empty()) {
    throw UsageError("option '--tls-ca' is required with '--tls-cert' and '--tls-key' (mutual TLS is TLS)");
  }
  return o;
}

fse::ConnectOptions load_credentials(const Options& options) {
  fse::ConnectOptions c;
  if (!options.tls_ca_file.empty()) c.tls_ca_pem = read_file("tls-ca", options.tls_ca_file);
  if (!options.tls_cert_file.empty() && !options.tls_key_file.empty()) {
    c.tls_cert_pem = read_file("tls-cert", options.tls_cert_file);
    c.tls_key_pem = read_file("tls-key", options.tls_key_file);
    // gRPC would only fail the handshake, naming no file.
    if (c.tls_cert_pem.find("-----BEGIN CERTIFICATE-----") == std::string::npos) {
      throw UsageError("option '--tls-cert': " + options.tls_cert_file + ": no PEM certificate");
    }
    if (c.tls_key_pem.find("PRIVATE KEY-----") == std::string::npos) {
      throw UsageError("option '--tls-key': " + options.tls_key_file + ": no PEM private key");
    }
  }
  if (!options.token_file.empty()) {
    const std::string content = read_file("token-file", options.token_file);
    const std::string line = content.substr(0, content.find('\n'));
    const char* space = " \t\r\n\v\f";
    const std::size_t first = line.find_first_not_of(space);
    if (first == std::string::npos) throw UsageError("option '--token-file': no token on the first line of " + options.token_file);
    c.token = line.substr(first, line.find_last_not_of(space) - first + 1);
  }
  return c;
}

std::string token_text(const fse::Token& token, bool colour) {
  static const char* const kColours[] = {nullptr, "\x1b[32m", "\x1b[33m", "\x1b[31m"};  // by fse::Health
  const char* code = colour ? kColours[static_cast<int>(token.health)] : nullptr;
  return code ? code + token.text + "\x1b[0m" : token.text;
}

int exit_code(fse::Status status) {
  switch (status) {
    case fse::Status::Completed: return 0;
    case fse::Status::Halted: return 3;
    case fse::Status::Cancelled: return 4;
    default: return kExitError;
  }
}

int exit_code(const fse::Error& error) {
  return error.code() == grpc::StatusCode::INVALID_ARGUMENT ? kExitUsage : kExitError;
}

}  // namespace cli
