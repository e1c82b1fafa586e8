// The README's quick start, compiled with every build so it cannot rot.
#include <iostream>

#include "fse/client.hpp"

int main() {
  fse::Client client = fse::Client::connect("unix:/tmp/fse.sock");  // or "127.0.0.1:50051"
  fse::Request request;
  request.prompt = "The capital of France is";
  request.sampling.temperature = 0;
  fse::Stream stream = client.generate(request);
  try {
    while (auto event = stream.next()) {
      if (auto* token = std::get_if<fse::Token>(&*event)) {
        std::cout << token->text << std::flush;
        if (token->index == 9) stream.cancel();  // the verdict still follows: Cancelled
      } else if (auto* verdict = std::get_if<fse::Verdict>(&*event)) {
        std::cout << "\n" << fse::to_string(verdict->status) << " after " << verdict->tokens << " tokens\n";
        return verdict->status == fse::Status::Completed ? 0 : 3;
      }
    }
  } catch (const fse::Error& error) {  // unreachable, INVALID_ARGUMENT, UNAUTHENTICATED, ...
    std::cerr << error.what() << "\n";
  }
  return 1;
}
