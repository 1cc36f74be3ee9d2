// ShimCore: CMD_VERSION and the client's context (ESTABLISH_CONTEXT / RELEASE_CONTEXT),
// as pcscd 1.9.9 answers them (pcsc-protocol.md §2.3, §4, §1.2).
#include <cstdint>
#include <set>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "core/shim_core_test.hpp"

namespace cardbridge::shim::core_test {
namespace {

// =====================================================================================
// CMD_VERSION

TEST(ShimCoreVersion, Accepts44_45_46AndEchoesTheClientsVersion) {
  Rig r;
  for (int32_t minor : {4, 5, 6}) {
    auto c = r.raw_client();
    c.send_version(4, minor);
    EXPECT_EQ(c.take_all(), Bytes(Le().i32(4).i32(minor).u32(kSuccess))) << "4." << minor;
    EXPECT_FALSE(c.closed_by_shim());
    EXPECT_EQ(c.establish().rv, kSuccess);
  }
  // [traced] 1.9.9: request 04000000 04000000 00000000, reply identical.
  auto c = r.raw_client();
  c.send_raw(Le().u32(12).u32(0x11).get());
  c.send_raw(Le().u32(4).u32(4).u32(0).get());
  EXPECT_EQ(hex(c.take_all()), "040000000400000000000000");
}

TEST(ShimCoreVersion, OtherVersionsGetServiceStoppedWithTheServersVersionAndKeepTheConnection) {
  Rig r;
  struct Case {
    int32_t major, minor, answered_minor;
  };
  // Too old or another major: pcscd 1.9.9's own version (4.4); newer: the highest served (4.6).
  for (Case k : {Case{4, 3, 4}, Case{4, 0, 4}, Case{3, 4, 4}, Case{3, 0, 4}, Case{5, 4, 4}, Case{5, 6, 4},
                 Case{0, 0, 4}, Case{4, 7, 6}}) {
    auto c = r.raw_client();
    auto v = c.version(k.major, k.minor);
    EXPECT_EQ(v.rv, kEServiceStopped) << k.major << "." << k.minor;
    EXPECT_EQ(v.major, 4) << k.major << "." << k.minor;
    EXPECT_EQ(v.minor, k.answered_minor) << k.major << "." << k.minor;
    EXPECT_FALSE(c.closed_by_shim()) << "pcscd leaves the connection open; the client closes it";
  }
}

TEST(ShimCoreVersion, NewerMinorGetsServer46AndTheClientFallsBackOnTheSameSocket) {
  Rig r;
  auto c = r.raw_client();
  c.send_version(4, 7);
  EXPECT_EQ(c.take_all(), Bytes(Le().i32(4).i32(6).u32(kEServiceStopped)));
  EXPECT_FALSE(c.closed_by_shim());
  // pcsc-lite 2.4.1+ sends CMD_VERSION again with the server's {major, minor} (§4).
  c.send_version(4, 6);
  EXPECT_EQ(c.take_all(), Bytes(Le().i32(4).i32(6).u32(kSuccess)));
  EXPECT_EQ(c.establish().rv, kSuccess);
  // ... and it is served as a 4.6 client: WAIT registers without sending the array.
  c.send_cmd(cmd::kWait);
  EXPECT_TRUE(c.nothing_pending());
}

// =====================================================================================
// Contexts

TEST(ShimCoreContext, EstablishAcceptsScopes0To3AndRefusesOthers) {
  Rig r;
  // One context per connection.
  for (uint32_t scope = kScopeUser; scope <= kScopeGlobal; ++scope) {
    auto c = r.raw_client();
    c.version(4, 4);
    c.send_establish(scope);
    auto e = c.establish_reply();
    EXPECT_EQ(e.scope, scope) << "dwScope echoed";
    EXPECT_NE(e.context, 0u);
    EXPECT_EQ(e.rv, kSuccess);
  }
  // Repeatedly on one connection.
  auto c = r.raw_client();
  c.version(4, 4);
  std::set<uint32_t> seen;
  for (uint32_t scope = kScopeUser; scope <= kScopeGlobal; ++scope) {
    auto e = c.establish(scope);
    EXPECT_EQ(e.scope, scope);
    EXPECT_EQ(e.rv, kSuccess);
    EXPECT_GT(e.context, 0u);
    EXPECT_LE(e.context, 0x7FFFFFFFu) << "pcscd hands out positive 31-bit values";
    EXPECT_TRUE(seen.insert(e.context).second);
  }
  // Scope 4: INVALID_VALUE, on the used connection and on a fresh one.
  auto fresh = r.raw_client();
  fresh.version(4, 4);
  for (auto* x : {&c, &fresh}) {
    x->send_establish(4);
    EXPECT_EQ(x->take_all(), Bytes(Le().u32(4).u32(0).u32(kEInvalidValue)));
    EXPECT_FALSE(x->closed_by_shim());
  }
}

TEST(ShimCoreContext, ContextsArePositive31BitNonZeroAndUniqueAcrossConnections) {
  Rig r;
  std::set<uint32_t> seen;
  for (int i = 0; i < 150; ++i) {
    auto c = r.client();
    EXPECT_NE(c.context(), 0u);
    EXPECT_LE(c.context(), 0x7FFFFFFFu) << "SYS_RandomInt() & 0x7FFFFFFF";
    EXPECT_TRUE(seen.insert(c.context()).second) << "duplicate hContext 0x" << std::hex << c.context();
  }
}

TEST(ShimCoreContext, IdsAreDeterministicForASeed) {
  Rig a, b;
  auto ca = a.client();
  auto cb = b.client();
  EXPECT_EQ(ca.context(), cb.context());
  auto config = rig_config();
  config.random_seed = 0xFACE;
  Rig c(config);
  EXPECT_NE(c.client().context(), ca.context());
}

// libpcsclite sends ESTABLISH again on the same socket when the value collides with a
// context the process holds (§2.3): the newest replaces the old one.
TEST(ShimCoreContext, RepeatedEstablishOnOneConnectionReplacesTheContext) {
  Rig r(kStandardDesk);
  auto c = r.client();
  const uint32_t first = c.context();
  auto again = c.establish();
  ASSERT_EQ(again.rv, kSuccess);
  const uint32_t second = again.context;
  EXPECT_NE(second, 0u);
  EXPECT_NE(second, first);
  EXPECT_EQ(c.context(), second);
  // The old context is gone: CONNECT and RELEASE with it fail, CANCEL no longer finds it,
  // and nothing reaches the desk.
  c.send_connect(first, kReaderA, kShareShared, kT0T1);
  auto refused = c.connect_reply();
  EXPECT_EQ(refused.rv, kEInvalidValue);
  EXPECT_EQ(refused.card, 0u);
  EXPECT_TRUE(r.desk.idle());
  auto canceller = r.raw_client();
  EXPECT_EQ(canceller.cancel(first), kEInvalidHandle);
  EXPECT_EQ(c.release(first), kEInvalidValue);
  // The new one works.
  c.send_connect(kReaderA);
  r.desk.serve();
  auto cr = c.connect_reply();
  EXPECT_EQ(cr.context, second);
  EXPECT_EQ(cr.rv, kSuccess);
  EXPECT_NE(cr.card, 0u);
  EXPECT_EQ(c.release(second), kSuccess);
}

TEST(ShimCoreContext, ReleaseChecksTheContext) {
  Rig r;
  auto c = r.client();
  const uint32_t ctx = c.context();
  EXPECT_EQ(c.release(ctx + 1), kEInvalidValue);
  EXPECT_EQ(c.release(ctx ^ 0x1234), kEInvalidValue);
  EXPECT_EQ(c.release(0), kEInvalidValue);
  EXPECT_FALSE(c.closed_by_shim());
  EXPECT_EQ(c.release(ctx), kSuccess);
  EXPECT_EQ(c.release(ctx), kEInvalidValue) << "already released";
  EXPECT_TRUE(c.nothing_pending());
  EXPECT_FALSE(c.closed_by_shim());
}

}  // namespace
}  // namespace cardbridge::shim::core_test
