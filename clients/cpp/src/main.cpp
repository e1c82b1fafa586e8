// guarded-generate: a thin CLI over the fse C++ client, keeping the contract of
// clients/README.md (flags, output, exit codes, one-line errors).
#include <grpc/support/log.h>
#include <pthread.h>
#include <unistd.h>

#include <condition_variable>
#include <csignal>
#include <cstdlib>
#include <iostream>
#include <mutex>
#include <thread>
#include <variant>

#include "cli.hpp"
#include "fse/client.hpp"

namespace {

// The first Ctrl-C cancels the stream cleanly (verdict `cancelled`, exit 4); a second one
// kills, as with `fse generate`. SIGINT is blocked in every thread and taken here with
// sigwait, so the Cancel (a gRPC write) runs in an ordinary thread, not a signal handler.
class Interrupts {
 public:
  // Must be constructed before any other thread starts (gRPC's included), so they all
  // inherit the blocked mask.
  Interrupts() {
    sigemptyset(&set_);
    sigaddset(&set_, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set_, nullptr);
    thread_ = std::thread([this] { run(); });
  }
  Interrupts(const Interrupts&) = delete;
  Interrupts& operator=(const Interrupts&) = delete;

  ~Interrupts() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
      if (in_sigwait_) pthread_kill(thread_.native_handle(), SIGINT);  // wakes sigwait
    }
    wake_.notify_all();
    thread_.join();
  }

  // The stream a Ctrl-C cancels (nullptr: none). Cancels at once if one came already.
  void watch(fse::Stream* stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    stream_ = stream;
    if (stream_ && interrupted_) stream_->cancel();
  }

 private:
  void run() {
    int signal = 0;
    sigwait(&set_, &signal);
    std::unique_lock<std::mutex> lock(mutex_);
    in_sigwait_ = false;
    if (stopping_) return;
    interrupted_ = true;
    if (stream_) stream_->cancel();
    // From now on SIGINT reaches this thread with its default action: the process ends.
    std::signal(SIGINT, SIG_DFL);
    pthread_sigmask(SIG_UNBLOCK, &set_, nullptr);
    wake_.wait(lock, [this] { return stopping_; });
  }

  sigset_t set_{};
  std::mutex mutex_;
  std::condition_variable wake_;
  bool in_sigwait_ = true;
  bool stopping_ = false;
  bool interrupted_ = false;
  fse::Stream* stream_ = nullptr;
  std::thread thread_;
};

// Keeps a stream registered with Interrupts for exactly its lifetime.
class Watched {
 public:
  Watched(Interrupts& interrupts, fse::Stream& stream) : interrupts_(interrupts) { interrupts_.watch(&stream); }
  ~Watched() { interrupts_.watch(nullptr); }
  Watched(const Watched&) = delete;
  Watched& operator=(const Watched&) = delete;

 private:
  Interrupts& interrupts_;
};

int generate(const fse::Client& client, const cli::Options& options, Interrupts& interrupts) {
  const bool colour = !options.json && isatty(STDOUT_FILENO) && std::getenv("NO_COLOR") == nullptr;
  fse::Stream stream = client.generate(options.request);
  const Watched watched(interrupts, stream);
  std::uint32_t tokens = 0;
  while (std::optional<fse::Event> event = stream.next()) {
    if (const auto* token = std::get_if<fse::Token>(&*event)) {
      if (options.json) {
        std::cout << cli::token_json(*token) << '\n';
      } else {
        std::cout << cli::token_text(*token, colour);
      }
      std::cout.flush();
      if (!std::cout) {  // the reader went away (`| head`): not worth an error line
        stream.abort();
        return cli::kExitError;
      }
      if (options.cancel_after && ++tokens == *options.cancel_after) stream.cancel();
    } else if (const auto* verdict = std::get_if<fse::Verdict>(&*event)) {
      if (options.json) {
        std::cout << cli::verdict_json(*verdict) << '\n' << std::flush;
      } else {
        std::cout << '\n' << std::flush;
        std::cerr << cli::verdict_line(*verdict) << '\n' << std::flush;
      }
      return cli::exit_code(verdict->status);
    }
  }
  return cli::kExitError;  // not reached: next() throws when the stream ends without a verdict
}

void quiet(gpr_log_func_args* /*args*/) {}

}  // namespace

int main(int argc, char** argv) {
  // gRPC logs connection failures on stderr itself; the contract allows one line there.
  if (std::getenv("GRPC_VERBOSITY") == nullptr) gpr_set_log_function(quiet);
  std::signal(SIGPIPE, SIG_IGN);  // a closed stdout shows as a failed write instead

  cli::Options options;
  fse::ConnectOptions credentials;
  try {
    options = cli::parse_args(std::vector<std::string>(argv + 1, argv + argc));
    if (options.help) {
      std::cout << cli::usage();
      return cli::kExitCompleted;
    }
    credentials = cli::load_credentials(options);
  } catch (const cli::UsageError& error) {
    std::cerr << cli::usage_line(error) << '\n';
    return cli::kExitUsage;
  }

  Interrupts interrupts;
  try {
    const fse::Client client = fse::Client::connect(options.addr, std::move(credentials));
    if (options.info) {
      std::cout << cli::info_json(client.info()) << '\n' << std::flush;
      return cli::kExitCompleted;
    }
    return generate(client, options, interrupts);
  } catch (const fse::Error& error) {
    std::cerr << cli::error_line(error, options.addr) << '\n';
    return cli::exit_code(error);
  } catch (const std::exception& error) {
    std::cerr << "guarded-generate: error: INTERNAL: " << error.what() << '\n';
    return cli::kExitError;
  }
}
