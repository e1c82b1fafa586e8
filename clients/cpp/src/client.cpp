// The library: plain C++ types in, generated protobuf messages on the wire, and back.
#include "fse/client.hpp"

#include <grpcpp/grpcpp.h>

#include <mutex>
#include <utility>

#include "fse/v1/fse.grpc.pb.h"

namespace fse {

namespace wire = ::fse::v1;

// ---- errors ---------------------------------------------------------------------------

std::string_view code_name(grpc::StatusCode code) noexcept {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNKNOWN";
  }
}

Error::Error(grpc::StatusCode code, std::string message)
    : std::runtime_error(std::string(code_name(code)) + ": " + message),
      code_(code),
      message_(std::move(message)) {}

static Error error_from(const grpc::Status& status) {
  return Error(status.error_code(), status.error_message());
}

// ---- enums ----------------------------------------------------------------------------

std::string_view to_string(Status status) noexcept {
  switch (status) {
    case Status::Completed: return "completed";
    case Status::Halted: return "halted";
    case Status::Cancelled: return "cancelled";
    case Status::Error: return "error";
  }
  return "error";
}

std::string_view to_string(Completion completion) noexcept {
  switch (completion) {
    case Completion::EndOfGeneration: return "end_of_generation";
    case Completion::StopSequence: return "stop_sequence";
    case Completion::MaxTokens: return "max_tokens";
    case Completion::Unspecified: return "";
  }
  return "";
}

std::string_view to_string(Health health) noexcept {
  switch (health) {
    case Health::Green: return "green";
    case Health::Yellow: return "yellow";
    case Health::Red: return "red";
    case Health::Unspecified: return "";
  }
  return "";
}

// ---- wire <-> plain types -------------------------------------------------------------

namespace {

wire::GenerateClientMessage to_wire(const Request& request) {
  wire::GenerateClientMessage message;
  wire::GenerateRequest& start = *message.mutable_start();
  start.set_prompt(request.prompt);
  for (const ChatMessage& m : request.messages) {
    wire::ChatMessage& out = *start.add_messages();
    out.set_role(m.role);
    out.set_content(m.content);
  }
  start.set_max_tokens(request.max_tokens);
  const Sampling& s = request.sampling;
  wire::Sampling& sampling = *start.mutable_sampling();
  if (s.temperature) sampling.set_temperature(*s.temperature);
  if (s.top_k) sampling.set_top_k(*s.top_k);
  if (s.top_p) sampling.set_top_p(*s.top_p);
  if (s.min_p) sampling.set_min_p(*s.min_p);
  if (s.seed) sampling.set_seed(*s.seed);
  start.set_policy(request.policy);
  for (const std::string& stop : request.stop) start.add_stop(stop);
  start.set_request_id(request.request_id);
  if (request.timeout) {
    // The wire field is uint32 milliseconds; at least 1 so a tiny budget is not "none".
    const auto ms = request.timeout->count();
    const std::uint32_t wire_ms = ms < 1 ? 1u : ms > 0xFFFFFFFFLL ? 0xFFFFFFFFu : static_cast<std::uint32_t>(ms);
    start.set_timeout_ms(wire_ms);
  }
  return message;
}

Completion from_wire(wire::Completion completion) {
  switch (completion) {
    case wire::COMPLETION_END_OF_GENERATION: return Completion::EndOfGeneration;
    case wire::COMPLETION_STOP_SEQUENCE: return Completion::StopSequence;
    case wire::COMPLETION_MAX_TOKENS: return Completion::MaxTokens;
    default: return Completion::Unspecified;
  }
}

Health from_wire(wire::Health health) {
  switch (health) {
    case wire::HEALTH_GREEN: return Health::Green;
    case wire::HEALTH_YELLOW: return Health::Yellow;
    case wire::HEALTH_RED: return Health::Red;
    default: return Health::Unspecified;
  }
}

Status from_wire(wire::Status status) {
  switch (status) {
    case wire::STATUS_COMPLETED: return Status::Completed;
    case wire::STATUS_HALTED: return Status::Halted;
    case wire::STATUS_CANCELLED: return Status::Cancelled;
    default: return Status::Error;  // unspecified or unknown: never Completed
  }
}

Started from_wire(const wire::Started& s) {
  return Started{s.request_id(), s.policy(), s.policy_sha256(), s.prompt_tokens(), s.seed(), s.model()};
}

Token from_wire(const wire::Token& t) {
  Token token;
  token.index = t.index();
  token.id = t.id();
  token.piece = t.piece();
  token.text = t.text();
  token.nll = t.nll();
  token.ppl = t.ppl();
  token.ppl_cumulative = t.ppl_cumulative();
  token.variance = t.variance();
  token.max_prob = t.max_prob();
  token.l2_norm = t.l2_norm();
  token.entropy = t.entropy();
  token.health = from_wire(t.health());
  for (const wire::GuardTrip& w : t.warnings()) {
    GuardTrip trip{w.guard(), std::nullopt, std::nullopt};
    if (w.has_value()) trip.value = w.value();
    if (w.has_threshold()) trip.threshold = w.threshold();
    token.warnings.push_back(std::move(trip));
  }
  return token;
}

Verdict from_wire(const wire::Verdict& v) {
  Verdict verdict;
  verdict.status = from_wire(v.status());
  verdict.guard = v.guard();
  if (v.has_value()) verdict.value = v.value();
  if (v.has_threshold()) verdict.threshold = v.threshold();
  if (v.has_token_index()) verdict.token_index = v.token_index();
  verdict.tokens = v.tokens();
  verdict.text = v.text();
  verdict.policy = v.policy();
  verdict.policy_sha256 = v.policy_sha256();
  verdict.message = v.message();
  verdict.completion = from_wire(v.completion());
  return verdict;
}

Info from_wire(const wire::Info& i) {
  Info info;
  info.version = i.version();
  const wire::ModelInfo& m = i.model();
  info.model = ModelInfo{m.name(),         m.path(),       m.sha256(),     m.description(),
                         m.vocab_size(),   m.context_size(), m.train_context_size(),
                         m.size_bytes(),   m.chat_template(), m.backend(),
                         m.layers(),       m.gpu_layers(),   {}};
  for (const wire::Device& d : m.devices()) {
    info.model.devices.push_back(Device{d.name(), d.description(), d.kind(), d.memory_bytes(), d.layers()});
  }
  for (const wire::PolicyInfo& p : i.policies()) {
    info.policies.push_back(PolicyInfo{p.name(), p.sha256(), p.builtin()});
  }
  const wire::Limits& l = i.limits();
  info.limits = Limits{l.max_streams(), l.max_queue(), l.max_tokens(), l.max_prompt_tokens(),
                       l.max_message_bytes()};
  return info;
}

}  // namespace

// ---- Client ---------------------------------------------------------------------------

struct Client::Impl {
  std::string address;
  std::string token;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<wire::Guard::Stub> stub;

  // Per-call metadata rather than grpc::AccessTokenCredentials: call credentials are
  // refused on plaintext channels, and a loopback daemon may take a token without TLS.
  void prepare(grpc::ClientContext& context) const {
    if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
  }
};

Client::Client(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}

Client Client::connect(const std::string& address, ConnectOptions options) {
  if (options.tls_cert_pem.empty() != options.tls_key_pem.empty()) {
    throw std::invalid_argument(options.tls_key_pem.empty() ? "tls_key_pem: required with tls_cert_pem"
                                                            : "tls_cert_pem: required with tls_key_pem");
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (options.tls_ca_pem.empty() && options.tls_cert_pem.empty()) {
    credentials = grpc::InsecureChannelCredentials();
  } else {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = std::move(options.tls_ca_pem);
    ssl.pem_cert_chain = std::move(options.tls_cert_pem);
    ssl.pem_private_key = std::move(options.tls_key_pem);
    credentials = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments args;
  // Tokens are small, but GetInfo and long texts must never trip the default limit.
  args.SetMaxReceiveMessageSize(-1);
  auto impl = std::make_shared<Impl>();
  impl->address = address;
  impl->token = std::move(options.token);
  impl->channel = grpc::CreateCustomChannel(address, credentials, args);
  impl->stub = wire::Guard::NewStub(impl->channel);
  return Client(std::move(impl));
}

const std::string& Client::address() const noexcept { return impl_->address; }

Info Client::info() const {
  grpc::ClientContext context;
  impl_->prepare(context);
  wire::Info reply;
  const grpc::Status status = impl_->stub->GetInfo(&context, wire::GetInfoRequest(), &reply);
  if (!status.ok()) throw error_from(status);
  return from_wire(reply);
}

// ---- Stream ---------------------------------------------------------------------------

struct Stream::Impl {
  // Keeps the channel alive as long as the call.
  std::shared_ptr<const Client::Impl> client;
  grpc::ClientContext context;
  std::unique_ptr<grpc::ClientReaderWriter<wire::GenerateClientMessage, wire::GenerateServerMessage>> call;
  std::optional<Started> started;
  bool verdict_seen = false;
  bool finished = false;
  // Writes (the start message, Cancel, WritesDone) may come from two threads; gRPC allows
  // one writer and one reader at a time, so writers take turns here.
  std::mutex write_mutex;
  bool writes_done = false;
  bool cancel_sent = false;

  void close_writes() {
    std::lock_guard<std::mutex> lock(write_mutex);
    if (!writes_done) {
      call->WritesDone();
      writes_done = true;
    }
  }

  // Reads what is left and collects the call's status; reading must be over before Finish.
  grpc::Status finish() {
    close_writes();
    wire::GenerateServerMessage ignored;
    while (call->Read(&ignored)) {
    }
    finished = true;
    return call->Finish();
  }
};

Stream::Stream(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Stream::Stream(Stream&&) noexcept = default;
Stream& Stream::operator=(Stream&& other) noexcept {
  if (this != &other) {
    Stream dropped(std::move(*this));  // aborts our old call, if any
    impl_ = std::move(other.impl_);
  }
  return *this;
}

Stream::~Stream() {
  if (impl_ && !impl_->finished) {
    if (!impl_->verdict_seen) impl_->context.TryCancel();
    impl_->finish();
  }
}

Stream Client::generate(const Request& request) const {
  auto impl = std::make_unique<Stream::Impl>();
  impl->client = impl_;
  impl_->prepare(impl->context);
  impl->call = impl_->stub->Generate(&impl->context);
  // A failed write means the call is already over; next() reports why.
  impl->call->Write(to_wire(request));
  return Stream(std::move(impl));
}

std::optional<Event> Stream::next() {
  Impl& s = *impl_;
  if (s.finished) {
    if (s.verdict_seen) return std::nullopt;
    throw Error(grpc::StatusCode::FAILED_PRECONDITION, "the stream has already failed");
  }
  wire::GenerateServerMessage message;
  while (s.call->Read(&message)) {
    switch (message.kind_case()) {
      case wire::GenerateServerMessage::kStarted:
        s.started = from_wire(message.started());
        return Event(*s.started);
      case wire::GenerateServerMessage::kToken:
        return Event(from_wire(message.token()));
      case wire::GenerateServerMessage::kVerdict: {
        s.verdict_seen = true;
        Verdict verdict = from_wire(message.verdict());
        // The verdict is the outcome; the status after it (INTERNAL after an ERROR verdict)
        // adds nothing, so it is collected and dropped.
        s.finish();
        return Event(std::move(verdict));
      }
      default:
        continue;  // a kind newer than this client: skip it
    }
  }
  const grpc::Status status = s.finish();
  if (!status.ok()) throw error_from(status);
  throw Error(grpc::StatusCode::UNKNOWN, "the daemon at " + s.client->address + " ended the stream without a verdict");
}

void Stream::cancel() {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.write_mutex);
  if (s.writes_done || s.cancel_sent) return;
  s.cancel_sent = true;
  wire::GenerateClientMessage message;
  message.mutable_cancel();
  s.call->Write(message);
}

void Stream::abort() noexcept { impl_->context.TryCancel(); }

const std::optional<Started>& Stream::started() const noexcept { return impl_->started; }

}  // namespace fse
