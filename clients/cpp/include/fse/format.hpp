// How the events of fse/client.hpp look outside a program: the JSON lines of
// docs/protocol.md (what `fse generate --json` and every client's guarded-generate print)
// and the one-line verdict of `fse generate`.
#pragma once

#include <string>
#include <string_view>

#include "fse/client.hpp"

namespace fse {

// One JSON object each, keys in the protocol's order, no trailing newline. The token's
// `warnings` and the verdict's `message` appear only when there are any; Info has the proto's
// field names, less model.path (the daemon machine's business).
std::string to_json(const Token& token);
std::string to_json(const Verdict& verdict);
std::string to_json(const Info& info);

// "[completed at max_tokens] 12 tokens released · policy default (0123456789ab)", or for a halt
// "[halted by l2_norm: value 2574.2, threshold 10, at token 0] ...": value and threshold as
// C's %.6g, "n/a" when unset.
std::string to_string(const Verdict& verdict);

// The JSON writer's parts: the shortest text that parses back to the same double ("null"
// for NaN and infinities), and a string literal (UTF-8 kept raw, control characters escaped).
std::string json_number(double value);
std::string json_string(std::string_view text);

}  // namespace fse
