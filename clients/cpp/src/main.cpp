// guarded-generate: a thin CLI over the fse C++ client, keeping the contract of
// clients/README.md (flags, output, exit codes).
#include <grpc/support/log.h>
#include <pthread.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <iostream>
#include <mutex>
#include <thread>
#include <variant>

#include "cli.hpp"
#include "fse/client.hpp"
#include "fse/format.hpp"

namespace {

// The first Ctrl-C cancels the watched stream (verdict `cancelled`, exit 4); a second one
// kills. SIGINT is blocked in every thread (gRPC's too: blocked before they start) and
// taken by sigwait in a thread of its own, so the Cancel is not sent from a signal handler.
std::mutex watch_mutex;
fse::Stream* watched = nullptr;
bool interrupted = false;

void watch_interrupts() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  std::thread([set] {
    int signal = 0;
    sigwait(&set, &signal);
    {
      const std::lock_guard<std::mutex> lock(watch_mutex);
      interrupted = true;
      if (watched) watched->cancel();
    }
    std::signal(SIGINT, SIG_DFL);
    pthread_sigmask(SIG_UNBLOCK, &set, nullptr);  // the next SIGINT ends the process
    for (;;) pause();
  }).detach();
}

void watch(fse::Stream* stream) {
  const std::lock_guard<std::mutex> lock(watch_mutex);
  watched = stream;
  if (stream && interrupted) stream->cancel();
}

int generate(const fse::Client& client, const cli::Options& options) {
  const bool colour = !options.json && isatty(STDOUT_FILENO) && std::getenv("NO_COLOR") == nullptr;
  fse::Stream stream = client.generate(options.request);
  watch(&stream);
  struct Unwatch {
    ~Unwatch() { watch(nullptr); }
  } unwatch;
  std::uint32_t tokens = 0;
  while (std::optional<fse::Event> event = stream.next()) {
    if (const auto* token = std::get_if<fse::Token>(&*event)) {
      std::cout << (options.json ? fse::to_json(*token) + '\n' : cli::token_text(*token, colour)) << std::flush;
      if (!std::cout) {  // the reader went away (`| head`): not worth an error line
        stream.abort();
        return cli::kExitError;
      }
      if (options.cancel_after && ++tokens == *options.cancel_after) stream.cancel();
    } else if (const auto* verdict = std::get_if<fse::Verdict>(&*event)) {
      if (options.json) {
        std::cout << fse::to_json(*verdict) << '\n' << std::flush;
      } else {
        std::cout << '\n' << std::flush;
        std::cerr << fse::to_string(*verdict) << '\n' << std::flush;
      }
      return cli::exit_code(verdict->status);
    }
  }
  return cli::kExitError;  // not reached: next() throws when the stream ends without a verdict
}

void quiet(gpr_log_func_args* /*args*/) {}

}  // namespace

int main(int argc, char** argv) {
  // gRPC logs connection failures on stderr itself; the error line says what matters.
  if (std::getenv("GRPC_VERBOSITY") == nullptr) gpr_set_log_function(quiet);
  std::signal(SIGPIPE, SIG_IGN);  // a closed stdout shows as a failed write instead

  cli::Options options;
  fse::ConnectOptions credentials;
  try {
    options = cli::parse_args(argc, argv);
    if (options.help) {
      std::cout << cli::kUsage;
      return 0;
    }
    credentials = cli::load_credentials(options);
  } catch (const cli::UsageError& error) {
    if (*error.what() != '\0') std::cerr << "guarded-generate: " << error.what() << '\n';
    std::cerr << "Try 'guarded-generate --help' for more information.\n";
    return cli::kExitUsage;
  }

  watch_interrupts();
  try {
    const fse::Client client = fse::Client::connect(options.addr, std::move(credentials));
    if (options.info) {
      std::cout << fse::to_json(client.info()) << '\n' << std::flush;
      return 0;
    }
    return generate(client, options);
  } catch (const fse::Error& error) {  // what() is "CODE: MESSAGE"
    std::cerr << "guarded-generate: error: " << error.what() << '\n';
    return cli::exit_code(error);
  } catch (const std::exception& error) {
    std::cerr << "guarded-generate: error: INTERNAL: " << error.what() << '\n';
    return cli::kExitError;
  }
}
