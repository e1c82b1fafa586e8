#include "cli.hpp"

#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <system_error>

namespace cli {

namespace {

constexpr double kMaxTimeoutSeconds = 4294967.295;  // timeout_ms is a uint32
constexpr std::string_view kAddressForms = "unix:PATH or HOST:PORT";
constexpr std::string_view kSeedRange = "0 .. 2^32-1";

[[noreturn]] void bad_flag(std::string_view flag, std::string_view what, std::string_view accepted) {
  throw UsageError(std::string(flag) + ": " + std::string(what) + "; accepted: " + std::string(accepted));
}

[[noreturn]] void bad_value(std::string_view flag, std::string_view value, std::string_view accepted) {
  bad_flag(flag, std::string(value) + " is invalid", accepted);
}

// Strict base-10 integer: the whole text, an optional sign, nothing else.
template <typename Int>
std::optional<Int> parse_int(std::string_view text) {
  if (!text.empty() && text.front() == '+') text.remove_prefix(1);
  Int value{};
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

// "unix:PATH" (PATH non-empty) or "HOST:PORT" with a port in 1..65535, as gRPC spells them.
bool valid_address(std::string_view addr) {
  constexpr std::string_view unix_prefix = "unix:";
  if (addr.substr(0, unix_prefix.size()) == unix_prefix) {
    std::string_view path = addr.substr(unix_prefix.size());
    if (path.substr(0, 2) == "//") path.remove_prefix(2);
    return !path.empty();
  }
  const std::size_t colon = addr.rfind(':');
  if (colon == std::string_view::npos || colon == 0) return false;
  const std::string_view port = addr.substr(colon + 1);
  if (port.empty() || port.find_first_not_of("0123456789") != std::string_view::npos) return false;
  const auto number = parse_int<long long>(port);
  return number && *number >= 1 && *number <= 65535;
}

std::optional<double> parse_double(std::string_view text) {
  if (!text.empty() && text.front() == '+') text.remove_prefix(1);
  double value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  // out of range (1e999) parses as +-inf in Python; from_chars reports it instead.
  if (ec == std::errc::result_out_of_range && end == text.data() + text.size()) {
    return text.front() == '-' ? -std::numeric_limits<double>::infinity()
                               : std::numeric_limits<double>::infinity();
  }
  if (text.empty() || ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

// An unsigned count in 1 .. 2^32-1.
std::uint32_t parse_count(std::string_view flag, std::string_view text) {
  const auto value = parse_int<long long>(text);
  if (!value) bad_value(flag, text, "an integer >= 1");
  if (*value < 1) bad_value(flag, text, ">= 1");
  if (*value > 0xFFFFFFFFLL) bad_value(flag, text, "1..4294967295");
  return static_cast<std::uint32_t>(*value);
}

double parse_number(std::string_view flag, std::string_view text) {
  const auto value = parse_double(text);
  if (!value) bad_value(flag, text, "a number");
  return *value;
}

// Decodes the UTF-8 character at s[i] into cp and leaves i on its last byte; false if the
// bytes there are not UTF-8.
bool valid_utf8(std::string_view s, std::size_t& i, char32_t& cp) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char b0 = byte(i);
  int extra = 0;
  if (b0 < 0x80) {
    cp = b0;
  } else if (b0 >= 0xC2 && b0 <= 0xDF) {
    cp = b0 & 0x1F;
    extra = 1;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    cp = b0 & 0x0F;
    extra = 2;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    cp = b0 & 0x07;
    extra = 3;
  } else {
    return false;
  }
  if (i + extra >= s.size()) return false;  // truncated sequence
  for (int k = 1; k <= extra; ++k) {
    const unsigned char b = byte(i + k);
    if ((b & 0xC0) != 0x80) return false;
    cp = (cp << 6) | (b & 0x3F);
  }
  // Overlong forms, surrogates and code points past U+10FFFF are not UTF-8.
  if ((extra == 2 && cp < 0x800) || (extra == 3 && (cp < 0x10000 || cp > 0x10FFFF)) ||
      (cp >= 0xD800 && cp <= 0xDFFF)) {
    return false;
  }
  i += extra;
  return true;
}

bool is_utf8(std::string_view s) {
  char32_t cp = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (!valid_utf8(s, i, cp)) return false;
  }
  return true;
}

void require_utf8(std::string_view what, std::string_view text) {
  if (!is_utf8(text)) bad_flag(what, "not valid UTF-8", "UTF-8 text");
}

std::string optional_number(const std::optional<double>& value) {
  return value ? json_number(*value) : "null";
}

// C's %.6g, as the text verdict line prints values.
std::string g6(const std::optional<double>& value) {
  if (!value) return "n/a";
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.6g", *value);
  return buffer;
}

std::string read_file(std::string_view flag, const std::string& path, std::string_view accepted) {
  std::ifstream in(path, std::ios::binary);
  if (!in) bad_flag(flag, path + ": cannot read: " + std::strerror(errno), accepted);
  std::ostringstream content;
  content << in.rdbuf();
  if (in.bad()) bad_flag(flag, path + ": cannot read", accepted);
  return content.str();
}

}  // namespace

// ---- arguments ----------------------------------------------------------------------

std::string usage() {
  return "usage: guarded-generate --addr unix:PATH|HOST:PORT [--tls-ca FILE] [--token-file FILE]\n"
         "                        [--json] [--policy NAME] [--max-tokens N] [--temperature T]\n"
         "                        [--top-k K] [--top-p P] [--min-p M] [--seed S] [--stop TEXT]...\n"
         "                        [--timeout SECONDS] [--cancel-after N] PROMPT\n"
         "       guarded-generate --addr ADDR [--tls-ca FILE] [--token-file FILE] --info\n"
         "\n"
         "Streams a guarded generation from the fse daemon. Exit codes: 0 completed, 3 halted,\n"
         "4 cancelled, 1 error, 2 bad usage or INVALID_ARGUMENT.\n";
}

Options parse_args(const std::vector<std::string>& args) {
  Options o;
  // The contract's defaults; the request always carries all four sampling values.
  o.request.sampling.temperature = 0.8;
  o.request.sampling.top_k = 40;
  o.request.sampling.top_p = 0.95;
  o.request.sampling.min_p = 0.05;
  std::optional<std::string> prompt;
  bool only_positional = false;

  const auto positional = [&](const std::string& text) {
    if (prompt) bad_flag("PROMPT", "one only, got another: " + text, "one PROMPT, the last argument");
    prompt = text;
  };

  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    // "-x" is a flag; "-" alone, or text with a space ("- a list"), is a prompt.
    const bool looks_like_flag = arg.size() > 1 && arg[0] == '-' && arg.find(' ') == std::string::npos;
    if (only_positional || !looks_like_flag) {
      positional(arg);
      continue;
    }
    if (arg == "--") {
      only_positional = true;
      continue;
    }
    const std::size_t eq = arg.find('=');
    const std::string flag = arg.substr(0, eq);
    const std::optional<std::string> inline_value =
        eq == std::string::npos ? std::nullopt : std::optional<std::string>(arg.substr(eq + 1));

    if (flag == "--json" || flag == "--info" || flag == "--help" || flag == "-h") {
      if (inline_value) bad_flag(flag, "takes no value", flag);
      if (flag == "--json") o.json = true;
      if (flag == "--info") o.info = true;
      if (flag == "--help" || flag == "-h") o.help = true;
      continue;
    }

    // Every other flag takes a value: "--flag VALUE" or "--flag=VALUE".
    const auto value = [&](std::string_view accepted) -> std::string {
      if (inline_value) return *inline_value;
      if (i + 1 >= args.size()) bad_flag(flag, "expects a value", accepted);
      return args[++i];
    };
    fse::Sampling& s = o.request.sampling;
    if (flag == "--addr") {
      o.addr = value(kAddressForms);
      if (!valid_address(o.addr)) bad_flag(flag, "address '" + o.addr + "' is invalid", kAddressForms);
    } else if (flag == "--tls-ca") {
      o.tls_ca_file = value("a PEM file of CA certificates");
    } else if (flag == "--token-file") {
      o.token_file = value("a file whose first line is the token");
    } else if (flag == "--policy") {
      o.request.policy = value("a policy name the daemon serves");
      require_utf8(flag, o.request.policy);
    } else if (flag == "--max-tokens") {
      o.request.max_tokens = parse_count(flag, value(">= 1"));
    } else if (flag == "--temperature") {
      s.temperature = parse_number(flag, value("a number"));
    } else if (flag == "--top-k") {
      const std::string text = value("an integer");
      const auto k = parse_int<long long>(text);
      if (!k) bad_value(flag, text, "an integer");
      if (*k < std::numeric_limits<std::int32_t>::min() || *k > std::numeric_limits<std::int32_t>::max()) {
        bad_value(flag, text, "-2147483648..2147483647");
      }
      s.top_k = static_cast<std::int32_t>(*k);
    } else if (flag == "--top-p") {
      s.top_p = parse_number(flag, value("a number"));
    } else if (flag == "--min-p") {
      s.min_p = parse_number(flag, value("a number"));
    } else if (flag == "--seed") {
      const std::string text = value(kSeedRange);
      const auto seed = parse_int<long long>(text);
      if (!seed || *seed < 0 || *seed > 0xFFFFFFFFLL) bad_value(flag, text, kSeedRange);
      s.seed = static_cast<std::uint32_t>(*seed);
    } else if (flag == "--stop") {
      o.request.stop.push_back(value("text"));
      require_utf8(flag, o.request.stop.back());
    } else if (flag == "--timeout") {
      const std::string text = value("seconds > 0");
      const double seconds = parse_number(flag, text);
      if (!(seconds > 0)) bad_value(flag, text, "seconds > 0");
      if (!(seconds <= kMaxTimeoutSeconds)) bad_value(flag, text, "0 < seconds <= 4294967.295");
      o.request.timeout = std::chrono::milliseconds(timeout_ms(seconds));
    } else if (flag == "--cancel-after") {
      o.cancel_after = parse_count(flag, value(">= 1"));
    } else {
      bad_flag(flag, "unknown flag",
               "--addr --tls-ca --token-file --json --info --policy --max-tokens --temperature --top-k "
               "--top-p --min-p --seed --stop --timeout --cancel-after --help");
    }
  }

  if (o.help) return o;
  if (o.addr.empty()) bad_flag("--addr", "required", kAddressForms);
  if (o.info) return o;  // GetInfo needs no prompt
  // The Python client's words: a missing and an empty PROMPT are the same mistake.
  if (!prompt || prompt->empty()) throw UsageError("PROMPT: must not be empty");
  require_utf8("PROMPT", *prompt);
  o.request.prompt = *prompt;
  return o;
}

fse::ConnectOptions load_credentials(const Options& options) {
  fse::ConnectOptions c;
  if (!options.tls_ca_file.empty()) {
    c.tls_ca_pem = read_file("--tls-ca", options.tls_ca_file, "a readable PEM file");
    if (c.tls_ca_pem.find("-----BEGIN CERTIFICATE-----") == std::string::npos) {
      bad_flag("--tls-ca", options.tls_ca_file + ": no PEM certificate in it", "a PEM file of CA certificates");
    }
  }
  if (!options.token_file.empty()) {
    const std::string content = read_file("--token-file", options.token_file, "a readable file");
    std::string line = content.substr(0, content.find('\n'));
    const char* space = " \t\r\n\v\f";
    const std::size_t first = line.find_first_not_of(space);
    line = first == std::string::npos ? "" : line.substr(first, line.find_last_not_of(space) - first + 1);
    if (line.empty()) bad_flag("--token-file", options.token_file + ": the first line is empty", "a file whose first line is the token");
    c.token = line;
  }
  return c;
}

std::uint32_t timeout_ms(double seconds) {
  // nearbyint in the default rounding mode rounds half to even, like Python's round().
  const double ms = std::nearbyint(seconds * 1000);
  if (!(ms >= 1)) return 1;
  if (ms >= 4294967295.0) return 0xFFFFFFFFu;
  return static_cast<std::uint32_t>(ms);
}

// ---- rendering ----------------------------------------------------------------------

std::string json_number(double value) {
  if (!std::isfinite(value)) return "null";
  char buffer[64];
  const auto [end, ec] = std::to_chars(buffer, buffer + sizeof buffer, value);  // shortest round trip
  std::string text(buffer, ec == std::errc() ? end : buffer);
  // "10" would read back as an integer in some languages; "10.0" stays a double.
  if (text.find_first_of(".e") == std::string::npos) text += ".0";
  return text;
}

std::string json_string(std::string_view text) {
  std::string out;
  out.reserve(text.size() + 2);
  out += '"';
  char32_t cp = 0;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const std::size_t start = i;
    if (!valid_utf8(text, i, cp)) {
      out += "\\ufffd";  // a stray byte: the JSON stays valid and says something was there
      continue;
    }
    switch (cp) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (cp < 0x20) {
          char buffer[8];
          std::snprintf(buffer, sizeof buffer, "\\u%04x", static_cast<unsigned>(cp));
          out += buffer;
        } else {
          out.append(text.substr(start, i - start + 1));
        }
    }
  }
  out += '"';
  return out;
}

std::string token_json(const fse::Token& t) {
  const std::string_view health = fse::to_string(t.health);
  std::string out = "{\"type\": \"token\", \"index\": " + std::to_string(t.index) +
                    ", \"id\": " + std::to_string(t.id) + ", \"text\": " + json_string(t.text) +
                    ", \"nll\": " + json_number(t.nll) + ", \"ppl\": " + json_number(t.ppl) +
                    ", \"variance\": " + json_number(t.variance) + ", \"max_prob\": " + json_number(t.max_prob) +
                    ", \"l2_norm\": " + json_number(t.l2_norm) +
                    ", \"health\": " + (health.empty() ? std::string("null") : json_string(health));
  if (!t.warnings.empty()) {
    out += ", \"warnings\": [";
    for (std::size_t k = 0; k < t.warnings.size(); ++k) {
      const fse::GuardTrip& w = t.warnings[k];
      if (k) out += ", ";
      out += "{\"guard\": " + json_string(w.guard) + ", \"value\": " + optional_number(w.value) +
             ", \"threshold\": " + optional_number(w.threshold) + "}";
    }
    out += "]";
  }
  return out + "}";
}

std::string verdict_json(const fse::Verdict& v) {
  std::string out = "{\"type\": \"verdict\", \"status\": " + json_string(fse::to_string(v.status)) +
                    ", \"guard\": " + (v.guard.empty() ? std::string("null") : json_string(v.guard)) +
                    ", \"value\": " + optional_number(v.value) + ", \"threshold\": " + optional_number(v.threshold) +
                    ", \"token_index\": " + (v.token_index ? std::to_string(*v.token_index) : "null") +
                    ", \"tokens\": " + std::to_string(v.tokens) + ", \"text\": " + json_string(v.text) +
                    ", \"policy\": " + json_string(v.policy) + ", \"policy_sha256\": " + json_string(v.policy_sha256);
  if (!v.message.empty()) out += ", \"message\": " + json_string(v.message);
  return out + "}";
}

std::string info_json(const fse::Info& info) {
  const auto boolean = [](bool b) { return std::string(b ? "true" : "false"); };
  const fse::ModelInfo& m = info.model;
  std::string out = "{\"version\": " + json_string(info.version) + ", \"model\": {\"name\": " + json_string(m.name) +
                    ", \"sha256\": " + json_string(m.sha256) + ", \"description\": " + json_string(m.description) +
                    ", \"vocab_size\": " + std::to_string(m.vocab_size) +
                    ", \"context_size\": " + std::to_string(m.context_size) +
                    ", \"train_context_size\": " + std::to_string(m.train_context_size) +
                    ", \"size_bytes\": " + std::to_string(m.size_bytes) +
                    ", \"chat_template\": " + boolean(m.chat_template) + "}, \"policies\": [";
  for (std::size_t k = 0; k < info.policies.size(); ++k) {
    const fse::PolicyInfo& p = info.policies[k];
    if (k) out += ", ";
    out += "{\"name\": " + json_string(p.name) + ", \"sha256\": " + json_string(p.sha256) +
           ", \"builtin\": " + boolean(p.builtin) + "}";
  }
  const fse::Limits& l = info.limits;
  out += "], \"limits\": {\"max_streams\": " + std::to_string(l.max_streams) +
         ", \"max_queue\": " + std::to_string(l.max_queue) + ", \"max_tokens\": " + std::to_string(l.max_tokens) +
         ", \"max_prompt_tokens\": " + std::to_string(l.max_prompt_tokens) +
         ", \"max_message_bytes\": " + std::to_string(l.max_message_bytes) + "}}";
  return out;
}

std::string verdict_line(const fse::Verdict& v) {
  std::string what;
  if (v.status == fse::Status::Halted) {
    what = "halted by " + v.guard + ": value " + g6(v.value) + ", threshold " + g6(v.threshold) + ", at token " +
           (v.token_index ? std::to_string(*v.token_index) : "n/a");
  } else {
    what = fse::to_string(v.status);
  }
  if (!v.message.empty()) what += ": " + v.message;
  return "[" + what + "] " + std::to_string(v.tokens) + " tokens released \u00b7 policy " + v.policy + " (" +
         v.policy_sha256.substr(0, 12) + ")";
}

std::string token_text(const fse::Token& token, bool colour) {
  const char* code = nullptr;
  switch (token.health) {
    case fse::Health::Green: code = "\x1b[32m"; break;
    case fse::Health::Yellow: code = "\x1b[33m"; break;
    case fse::Health::Red: code = "\x1b[31m"; break;
    case fse::Health::Unspecified: break;
  }
  if (!colour || code == nullptr) return token.text;
  return code + token.text + "\x1b[0m";
}

// ---- outcomes -----------------------------------------------------------------------

bool is_unreachable(std::string_view message) {
  // grpc-core's wording when no connection could be made at all (the Python client's list);
  // an UNAVAILABLE the daemon sends itself ("the model is still loading") is left as it is.
  std::string lower(message);
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const char* mark : {"failed to connect", "connection refused", "no such file", "dns resolution"}) {
    if (lower.find(mark) != std::string::npos) return true;
  }
  return false;
}

int exit_code(fse::Status status) {
  switch (status) {
    case fse::Status::Completed: return kExitCompleted;
    case fse::Status::Halted: return kExitHalted;
    case fse::Status::Cancelled: return kExitCancelled;
    case fse::Status::Error: return kExitError;
  }
  return kExitError;
}

int exit_code(const fse::Error& error) {
  return error.code() == grpc::StatusCode::INVALID_ARGUMENT ? kExitUsage : kExitError;
}

std::string error_line(const fse::Error& error, std::string_view addr) {
  std::string message = error.message();
  if (error.code() == grpc::StatusCode::UNAVAILABLE && is_unreachable(message)) {
    message = "cannot reach the daemon at " + std::string(addr) + " (" + message + ")";
  }
  return "guarded-generate: error: " + std::string(fse::code_name(error.code())) + ": " + message;
}

std::string usage_line(const UsageError& error) { return std::string("guarded-generate: error: ") + error.what(); }

}  // namespace cli
