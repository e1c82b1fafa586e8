// The library against a daemon that is not there: fail-fast errors, no hang, no verdict made up.
#include <gtest/gtest.h>

#include <chrono>
#include <stdexcept>

#include "fse/client.hpp"

namespace {

constexpr const char* kNowhere = "unix:/nonexistent/fse-cpp-test.sock";

TEST(Client, UnreachableDaemonIsUnavailableAtOnce) {
  const fse::Client client = fse::Client::connect(kNowhere);
  EXPECT_EQ(client.address(), kNowhere);
  const auto start = std::chrono::steady_clock::now();
  try {
    client.info();
    FAIL() << "no error";
  } catch (const fse::Error& e) {
    EXPECT_EQ(e.code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_NE(e.message().find("No such file"), std::string::npos) << e.message();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

TEST(Client, AClientCertificateNeedsItsKey) {
  fse::ConnectOptions cert_only;
  cert_only.tls_cert_pem = "-----BEGIN CERTIFICATE-----";
  EXPECT_THROW(fse::Client::connect("localhost:1", cert_only), std::invalid_argument);
  fse::ConnectOptions key_only;
  key_only.tls_key_pem = "-----BEGIN PRIVATE KEY-----";
  EXPECT_THROW(fse::Client::connect("localhost:1", key_only), std::invalid_argument);
}

TEST(Stream, ErrorsSurfaceFromNextNeverAsAVerdict) {
  const fse::Client client = fse::Client::connect(kNowhere, {"", "token"});
  fse::Request request;
  request.prompt = "hi";
  fse::Stream stream = client.generate(request);
  stream.cancel();  // harmless on a failed call
  EXPECT_THROW(
      {
        try {
          stream.next();
        } catch (const fse::Error& e) {
          EXPECT_EQ(e.code(), grpc::StatusCode::UNAVAILABLE);
          throw;
        }
      },
      fse::Error);
  EXPECT_FALSE(stream.started().has_value());
  EXPECT_THROW(stream.next(), fse::Error);  // still failed, never a silent end
}

TEST(Stream, DroppedBeforeItsVerdictDoesNotHang) {
  const fse::Client client = fse::Client::connect(kNowhere);
  fse::Request request;
  request.prompt = "hi";
  fse::Stream a = client.generate(request);
  fse::Stream b = client.generate(request);
  b = std::move(a);  // the old call of b is aborted, a's is moved
  b.abort();
  EXPECT_THROW(b.next(), fse::Error);
}

}  // namespace
