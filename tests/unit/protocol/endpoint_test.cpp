// transport::Endpoint::parse / to_string ("unix:PATH", "tcp:HOST:PORT", "tcp:[V6]:PORT").
#include "cardbridge/transport/endpoint.hpp"

#include <string>

#include <gtest/gtest.h>

namespace cardbridge::transport {
namespace {

Endpoint parse_ok(std::string_view text) {
  auto r = Endpoint::parse(text);
  EXPECT_TRUE(r.ok()) << text << ": " << (r.ok() ? "" : r.error());
  return r.ok() ? *r : Endpoint{};
}

void expect_bad(std::string_view text) {
  auto r = Endpoint::parse(text);
  EXPECT_FALSE(r.ok()) << "accepted '" << text << "'";
  if (!r.ok()) {
    EXPECT_FALSE(r.error().empty());
  }
}

TEST(EndpointTest, UnixPath) {
  auto ep = parse_ok("unix:/run/user/1000/cardbridge/shim.sock");
  EXPECT_EQ(ep.kind, Endpoint::Kind::kUnix);
  EXPECT_EQ(ep.path, "/run/user/1000/cardbridge/shim.sock");
  EXPECT_EQ(ep.to_string(), "unix:/run/user/1000/cardbridge/shim.sock");
}

TEST(EndpointTest, UnixRelativePath) {
  auto ep = parse_ok("unix:sock");
  EXPECT_EQ(ep.path, "sock");
}

TEST(EndpointTest, UnixEmptyPathRejected) { expect_bad("unix:"); }

TEST(EndpointTest, UnixPathLengthLimitIsSunPath) {
  // sun_path is 108 bytes including the NUL.
  const std::string p107 = "/" + std::string(106, 'a');
  ASSERT_EQ(p107.size(), 107u);
  EXPECT_EQ(parse_ok("unix:" + p107).path, p107);
  expect_bad("unix:" + p107 + "b");
  expect_bad("unix:/" + std::string(500, 'x'));
}

TEST(EndpointTest, TcpHostPort) {
  auto ep = parse_ok("tcp:localhost:3240");
  EXPECT_EQ(ep.kind, Endpoint::Kind::kTcp);
  EXPECT_EQ(ep.host, "localhost");
  EXPECT_EQ(ep.port, 3240);
  EXPECT_EQ(ep.to_string(), "tcp:localhost:3240");
}

TEST(EndpointTest, TcpIpv4) {
  auto ep = parse_ok("tcp:127.0.0.1:65535");
  EXPECT_EQ(ep.host, "127.0.0.1");
  EXPECT_EQ(ep.port, 65535);
}

TEST(EndpointTest, TcpBracketedIpv6) {
  auto ep = parse_ok("tcp:[::1]:3240");
  EXPECT_EQ(ep.kind, Endpoint::Kind::kTcp);
  EXPECT_EQ(ep.host, "::1");
  EXPECT_EQ(ep.port, 3240);
  EXPECT_EQ(ep.to_string(), "tcp:[::1]:3240");
  auto ep2 = parse_ok("tcp:[fe80::1%eth0]:1");
  EXPECT_EQ(ep2.host, "fe80::1%eth0");
  EXPECT_EQ(ep2.port, 1);
}

TEST(EndpointTest, ToStringRoundTrips) {
  for (const char* text : {"unix:/tmp/s", "tcp:h:1", "tcp:[::1]:80", "tcp:10.0.0.1:65535"}) {
    auto ep = parse_ok(text);
    EXPECT_EQ(ep.to_string(), text);
    auto again = parse_ok(ep.to_string());
    EXPECT_EQ(again.host, ep.host);
    EXPECT_EQ(again.port, ep.port);
    EXPECT_EQ(again.path, ep.path);
  }
}

TEST(EndpointTest, BadPorts) {
  expect_bad("tcp:host:");
  expect_bad("tcp:host:65536");
  expect_bad("tcp:host:99999999999");
  expect_bad("tcp:host:-1");
  expect_bad("tcp:host:+80");
  expect_bad("tcp:host:80a");
  expect_bad("tcp:host: 80");
  expect_bad("tcp:host:0x50");
  expect_bad("tcp:[::1]");  // brackets without a port
}

TEST(EndpointTest, MissingHostOrPort) {
  expect_bad("tcp:");
  expect_bad("tcp:host");
  expect_bad("tcp::80");
}

TEST(EndpointTest, EmptyBracketedHostRejected) {
  // "[]" is not a host: it must not reach the resolver as the literal string "[]".
  expect_bad("tcp:[]:80");
  // Unbalanced brackets are not a host either.
  expect_bad("tcp:[::1:80");
  expect_bad("tcp:::1]:80");
}

TEST(EndpointTest, UnknownScheme) {
  expect_bad("");
  expect_bad("/run/shim.sock");
  expect_bad("udp:host:1");
  expect_bad("UNIX:/tmp/s");
  expect_bad("unix");
}

}  // namespace
}  // namespace cardbridge::transport
