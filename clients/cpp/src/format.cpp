#include "fse/format.hpp"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <optional>

namespace fse {

namespace {

std::string optional_number(const std::optional<double>& value) { return value ? json_number(*value) : "null"; }

std::string g6(const std::optional<double>& value) {  // C's %.6g, "n/a" when unset
  if (!value) return "n/a";
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.6g", *value);
  return buffer;
}

}  // namespace

std::string json_number(double value) {
  if (!std::isfinite(value)) return "null";
  char buffer[64];
  const auto [end, ec] = std::to_chars(buffer, buffer + sizeof buffer, value);  // shortest round trip
  return std::string(buffer, ec == std::errc() ? end : buffer);
}

std::string json_string(std::string_view text) {
  std::string out = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buffer[8];
      std::snprintf(buffer, sizeof buffer, "\\u%04x", static_cast<unsigned>(c));
      out += buffer;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string to_json(const Token& t) {
  const std::string_view health = to_string(t.health);
  std::string out = "{\"type\":\"token\",\"index\":" + std::to_string(t.index) + ",\"id\":" + std::to_string(t.id) +
                    ",\"text\":" + json_string(t.text) + ",\"nll\":" + json_number(t.nll) +
                    ",\"ppl\":" + json_number(t.ppl) + ",\"variance\":" + json_number(t.variance) +
                    ",\"max_prob\":" + json_number(t.max_prob) + ",\"l2_norm\":" + json_number(t.l2_norm) +
                    ",\"entropy\":" + json_number(t.entropy) +
                    ",\"health\":" + (health.empty() ? std::string("null") : json_string(health));
  for (std::size_t k = 0; k < t.warnings.size(); ++k) {
    const GuardTrip& w = t.warnings[k];
    out += (k ? "," : ",\"warnings\":[") + ("{\"guard\":" + json_string(w.guard)) + ",\"value\":" +
           optional_number(w.value) + ",\"threshold\":" + optional_number(w.threshold) + "}";
  }
  return out + (t.warnings.empty() ? "}" : "]}");
}

std::string to_json(const Verdict& v) {
  const std::string_view completion = to_string(v.completion);
  std::string out = "{\"type\":\"verdict\",\"status\":" + json_string(to_string(v.status)) +
                    ",\"completion\":" + (completion.empty() ? std::string("null") : json_string(completion)) +
                    ",\"guard\":" + (v.guard.empty() ? std::string("null") : json_string(v.guard)) +
                    ",\"value\":" + optional_number(v.value) + ",\"threshold\":" + optional_number(v.threshold) +
                    ",\"token_index\":" + (v.token_index ? std::to_string(*v.token_index) : "null") +
                    ",\"tokens\":" + std::to_string(v.tokens) + ",\"text\":" + json_string(v.text) +
                    ",\"policy\":" + json_string(v.policy) + ",\"policy_sha256\":" + json_string(v.policy_sha256);
  if (!v.message.empty()) out += ",\"message\":" + json_string(v.message);
  return out + "}";
}

std::string to_json(const Info& info) {
  const auto boolean = [](bool b) { return std::string(b ? "true" : "false"); };
  const ModelInfo& m = info.model;
  std::string out = "{\"version\":" + json_string(info.version) + ",\"model\":{\"name\":" + json_string(m.name) +
                    ",\"sha256\":" + json_string(m.sha256) + ",\"description\":" + json_string(m.description) +
                    ",\"vocab_size\":" + std::to_string(m.vocab_size) + ",\"context_size\":" +
                    std::to_string(m.context_size) + ",\"train_context_size\":" + std::to_string(m.train_context_size) +
                    ",\"size_bytes\":" + std::to_string(m.size_bytes) +
                    ",\"chat_template\":" + boolean(m.chat_template) + ",\"backend\":" + json_string(m.backend) +
                    ",\"layers\":" + std::to_string(m.layers) + ",\"gpu_layers\":" + std::to_string(m.gpu_layers) +
                    ",\"devices\":[";
  for (std::size_t k = 0; k < m.devices.size(); ++k) {
    const Device& d = m.devices[k];
    out += (k ? ",{\"name\":" : "{\"name\":") + json_string(d.name) + ",\"description\":" +
           json_string(d.description) + ",\"kind\":" + json_string(d.kind) +
           ",\"memory_bytes\":" + std::to_string(d.memory_bytes) + ",\"layers\":" + std::to_string(d.layers) + "}";
  }
  out += "]},\"policies\":[";
  for (std::size_t k = 0; k < info.policies.size(); ++k) {
    const PolicyInfo& p = info.policies[k];
    out += (k ? ",{\"name\":" : "{\"name\":") + json_string(p.name) + ",\"sha256\":" + json_string(p.sha256) +
           ",\"builtin\":" + boolean(p.builtin) + "}";
  }
  const Limits& l = info.limits;
  return out + "],\"limits\":{\"max_streams\":" + std::to_string(l.max_streams) +
         ",\"max_queue\":" + std::to_string(l.max_queue) + ",\"max_tokens\":" + std::to_string(l.max_tokens) +
         ",\"max_prompt_tokens\":" + std::to_string(l.max_prompt_tokens) +
         ",\"max_message_bytes\":" + std::to_string(l.max_message_bytes) + "}}";
}

std::string to_string(const Verdict& v) {
  std::string what(to_string(v.status));
  if (v.status == Status::Completed && v.completion != Completion::Unspecified) {
    what += " at " + std::string(to_string(v.completion));
  }
  if (v.status == Status::Halted) {
    what = "halted by " + v.guard + ": value " + g6(v.value) + ", threshold " + g6(v.threshold) + ", at token " +
           (v.token_index ? std::to_string(*v.token_index) : "n/a");
  }
  if (!v.message.empty()) what += ": " + v.message;
  return "[" + what + "] " + std::to_string(v.tokens) + " tokens released \u00b7 policy " + v.policy + " (" +
         v.policy_sha256.substr(0, 12) + ")";
}

}  // namespace fse
