// libfse C++ client: guarded token streams from the fse daemon (service fse.v1.Guard).
//
// The field documentation is the wire contract, proto/fse/v1/fse.proto; the types here are
// its plain C++ mirror, so an application never touches the generated protobuf classes.
//
//   fse::Client client = fse::Client::connect("unix:/run/fse.sock");
//   fse::Request request;
//   request.prompt = "The capital of France is";
//   fse::Stream stream = client.generate(request);
//   while (auto event = stream.next()) { ... std::get_if<fse::Token>(&*event) ... }
//
// Every gRPC failure is thrown as fse::Error (code + the server's message). A policy halt is
// not an error: it is a Verdict with Status::Halted.
#pragma once

#include <grpcpp/support/status_code_enum.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace fse {

// ---- errors ---------------------------------------------------------------------------

// The canonical name of a gRPC status code ("UNAVAILABLE", "INVALID_ARGUMENT", ...).
std::string_view code_name(grpc::StatusCode code) noexcept;

// A failed call: the daemon refused the request, could not be reached, or broke the
// stream. what() is "CODE: MESSAGE".
class Error : public std::runtime_error {
 public:
  Error(grpc::StatusCode code, std::string message);
  grpc::StatusCode code() const noexcept { return code_; }
  // The server's (or gRPC's) message, without the code.
  const std::string& message() const noexcept { return message_; }

 private:
  grpc::StatusCode code_;
  std::string message_;
};

// ---- requests -------------------------------------------------------------------------

struct ChatMessage {
  std::string role;  // "system", "user", "assistant"
  std::string content;
};

// Unset fields take llama.cpp's CLI defaults on the daemon's side.
struct Sampling {
  std::optional<double> temperature;  // 0 = greedy
  std::optional<std::int32_t> top_k;  // 0 = off
  std::optional<double> top_p;        // 1 = off
  std::optional<double> min_p;        // 0 = off
  std::optional<std::uint32_t> seed;  // unset = random (reported in Started)
};

// One generation. Exactly one of `prompt` and `messages` must be set.
struct Request {
  std::string prompt;
  std::vector<ChatMessage> messages;
  std::uint32_t max_tokens = 256;
  Sampling sampling;
  std::string policy;  // empty = the daemon's "default"
  std::vector<std::string> stop;
  std::string request_id;
  // Generation budget from admission; the stream then halts with guard "deadline".
  std::optional<std::chrono::milliseconds> timeout;
};

// ---- events ---------------------------------------------------------------------------

enum class Health { Unspecified, Green, Yellow, Red };

// Why a Completed stream ended; Unspecified for any other status, from a daemon that predates
// it, and for a value the client does not know.
enum class Completion { Unspecified, EndOfGeneration, StopSequence, MaxTokens };

// Completed / Halted / Cancelled / Error; anything the client does not know is Error, never
// Completed (fail closed).
enum class Status { Completed, Halted, Cancelled, Error };

std::string_view to_string(Status status) noexcept;
// "green", "yellow", "red"; "" for Unspecified.
std::string_view to_string(Health health) noexcept;
// "end_of_generation", "stop_sequence", "max_tokens"; "" for Unspecified.
std::string_view to_string(Completion completion) noexcept;

struct Started {
  std::string request_id;
  std::string policy;
  std::string policy_sha256;
  std::uint32_t prompt_tokens = 0;
  std::uint32_t seed = 0;
  std::string model;
};

struct GuardTrip {
  std::string guard;
  std::optional<double> value;
  std::optional<double> threshold;
};

struct Token {
  std::uint32_t index = 0;
  std::int32_t id = 0;
  std::string piece;  // raw bytes; may end inside a UTF-8 character
  std::string text;   // complete characters only
  double nll = 0;
  double ppl = 0;
  double ppl_cumulative = 0;
  double variance = 0;
  double max_prob = 0;
  double l2_norm = 0;
  double entropy = 0;  // of the raw next-token distribution, in nats
  Health health = Health::Unspecified;
  std::vector<GuardTrip> warnings;
};

struct Verdict {
  Status status = Status::Error;
  std::string guard;  // empty unless Halted
  std::optional<double> value;
  std::optional<double> threshold;
  std::optional<std::uint32_t> token_index;
  std::uint32_t tokens = 0;
  std::string text;
  std::string policy;
  std::string policy_sha256;
  std::string message;
  Completion completion = Completion::Unspecified;  // why it ended, when Completed
};

using Event = std::variant<Started, Token, Verdict>;

// ---- GetInfo --------------------------------------------------------------------------

// A device the daemon's llama.cpp can compute on, and the model layers on it.
struct Device {
  std::string name;  // ggml's name: CPU, CUDA0, Vulkan0 ...
  std::string description;
  std::string kind;                // cpu, gpu, igpu, accel or other
  std::uint64_t memory_bytes = 0;  // total memory
  std::uint32_t layers = 0;        // of ModelInfo::layers, placed on this device
};

struct ModelInfo {
  std::string name;
  std::string path;
  std::string sha256;
  std::string description;
  std::uint32_t vocab_size = 0;
  std::uint32_t context_size = 0;
  std::uint32_t train_context_size = 0;
  std::uint64_t size_bytes = 0;
  bool chat_template = false;
  std::string backend;           // CPU, CUDA, Vulkan, Metal ...: where the offloaded layers run
  std::uint32_t layers = 0;      // the model's repeating layers
  std::uint32_t gpu_layers = 0;  // of them, on GPUs
  std::vector<Device> devices;   // every device, in ggml's order
};

struct PolicyInfo {
  std::string name;
  std::string sha256;
  bool builtin = false;
};

struct Limits {
  std::uint32_t max_streams = 0;
  std::uint32_t max_queue = 0;
  std::uint32_t max_tokens = 0;
  std::uint32_t max_prompt_tokens = 0;
  std::uint32_t max_message_bytes = 0;
};

struct Info {
  std::string version;
  ModelInfo model;
  std::vector<PolicyInfo> policies;
  Limits limits;
};

// ---- the client -----------------------------------------------------------------------

struct ConnectOptions {
  // PEM of the CA that signed the daemon's certificate; empty = plaintext. The host of the
  // address is the name checked against the certificate.
  std::string tls_ca_pem;
  // Sent as `authorization: Bearer TOKEN` on every call; empty = none.
  std::string token;
  // For mutual TLS (a daemon with tls.client_ca): the PEM client certificate (chain) and its
  // PEM private key, both or neither (connect throws std::invalid_argument otherwise). They
  // turn TLS on too; without tls_ca_pem the server is checked against gRPC's default roots.
  // (Initialised, so that ConnectOptions{ca_pem, token} stays free of -Wextra's warning.)
  std::string tls_cert_pem{};
  std::string tls_key_pem{};
};

class Stream;

// A connection to the daemon: cheap to copy (the channel is shared), safe to use from
// several threads. Calls are fail-fast: an unreachable daemon is an UNAVAILABLE Error at
// once, never a wait.
class Client {
 public:
  // `address` is "unix:/abs/path" or "HOST:PORT". Connecting is lazy: nothing is dialled
  // until the first call. Throws std::invalid_argument for a client certificate without its
  // key (or a key without its certificate).
  static Client connect(const std::string& address, ConnectOptions options = {});

  // The served model, the policies a request may name, and the limits. Throws Error.
  Info info() const;

  // Starts a generation. Errors (bad request, unreachable daemon) surface from the first
  // Stream::next() as Error.
  Stream generate(const Request& request) const;

  const std::string& address() const noexcept;

 private:
  friend class Stream;
  struct Impl;
  explicit Client(std::shared_ptr<const Impl> impl);
  std::shared_ptr<const Impl> impl_;
};

// One Generate call: Started, Token..., then exactly one Verdict. Move-only (a moved-from
// stream may only be destroyed or assigned to); destroying a stream that has not reached its
// verdict aborts the call (ClientContext::TryCancel).
class Stream {
 public:
  Stream(Stream&&) noexcept;
  Stream& operator=(Stream&&) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream();

  // Blocks for the next event; std::nullopt once the verdict has been returned. Throws Error
  // when the call fails, or ends without a verdict.
  std::optional<Event> next();

  // Asks the daemon to stop within one decode step; keep calling next() to get the
  // Cancelled verdict. Safe to call from another thread while next() blocks, and more than
  // once.
  void cancel();

  // Aborts the call at once (no verdict follows): next() then throws CANCELLED.
  void abort() noexcept;

  // The Started event, once next() has returned it.
  const std::optional<Started>& started() const noexcept;

 private:
  friend class Client;
  struct Impl;
  explicit Stream(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace fse
