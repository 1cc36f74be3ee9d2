// The fake must behave like libpcsclite where the engine tests rely on it: blocking Begin,
// blocking SCardGetStatusChange with cancel, sharing, and the service going away.
#include "fake_card_api.hpp"

#include <future>
#include <thread>

#include <gtest/gtest.h>

#include "cardbridge/support/scard.hpp"

namespace cardbridge::client::fake {
namespace {

namespace sc = cardbridge::scard;
using namespace std::chrono_literals;

constexpr auto kDeadline = 5s;
const std::string kReader = "Fake Reader 00 00";

FakeCard card() {
  FakeCard c;
  c.atr = {0x3B, 0x02, 0x14, 0x50};
  c.protocols = sc::kProtocolT0 | sc::kProtocolT1;
  return c;
}

class FakeCardApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    api_.add_reader(kReader);
    api_.insert_card(kReader, card());
  }
  ScardContext context() {
    ScardContext ctx = 0;
    EXPECT_EQ(api_.establish(sc::kScopeSystem, &ctx), sc::kSuccess);
    return ctx;
  }
  ScardHandle connect(ScardContext ctx, uint32_t share = sc::kShareShared) {
    ScardHandle h = 0;
    uint32_t proto = 0;
    EXPECT_EQ(api_.connect(ctx, kReader, share, sc::kProtocolAny, &h, &proto), sc::kSuccess);
    EXPECT_EQ(proto, sc::kProtocolT1);
    return h;
  }
  FakeCardApi api_;
};

TEST_F(FakeCardApiTest, BeginBlocksWhileAnotherHandleHoldsTheTransaction) {
  const ScardHandle a = connect(context());
  const ScardHandle b = connect(context());
  ASSERT_EQ(api_.begin_transaction(a), sc::kSuccess);
  auto waiter = std::async(std::launch::async, [&] { return api_.begin_transaction(b); });
  ASSERT_TRUE(api_.wait_blocked_in_begin(1, kDeadline));
  EXPECT_EQ(waiter.wait_for(0s), std::future_status::timeout);
  EXPECT_EQ(api_.end_transaction(a, sc::kLeaveCard), sc::kSuccess);
  ASSERT_EQ(waiter.wait_for(kDeadline), std::future_status::ready);
  EXPECT_EQ(waiter.get(), sc::kSuccess);
  EXPECT_EQ(api_.transaction_holder(kReader), b);
}

TEST_F(FakeCardApiTest, ReleasingTheHoldersContextWakesBegin) {
  const ScardContext holder = context();
  const ScardHandle a = connect(holder);
  const ScardHandle b = connect(context());
  ASSERT_EQ(api_.begin_transaction(a), sc::kSuccess);
  auto waiter = std::async(std::launch::async, [&] { return api_.begin_transaction(b); });
  ASSERT_TRUE(api_.wait_blocked_in_begin(1, kDeadline));
  EXPECT_EQ(api_.release(holder), sc::kSuccess);
  ASSERT_EQ(waiter.wait_for(kDeadline), std::future_status::ready);
  EXPECT_EQ(waiter.get(), sc::kSuccess);
  uint32_t recv = 0;
  Buffer out;
  EXPECT_EQ(api_.transmit(a, sc::kProtocolT1, std::vector<uint8_t>{0x00, 0xA4}, &recv, 2, &out), sc::kEInvalidHandle);
}

TEST_F(FakeCardApiTest, ExclusiveExcludesEveryOtherHandle) {
  const ScardContext ctx = context();
  connect(ctx, sc::kShareExclusive);
  ScardHandle h = 0;
  uint32_t proto = 0;
  EXPECT_EQ(api_.connect(ctx, kReader, sc::kShareShared, sc::kProtocolAny, &h, &proto), sc::kESharingViolation);
}

TEST_F(FakeCardApiTest, GetStatusChangeBlocksUntilACardEvent) {
  const ScardContext ctx = context();
  std::vector<ReaderStateIo> states{{kReader, sc::kStateUnaware, 0, {}}};
  ASSERT_EQ(api_.get_status_change(ctx, 0, states), sc::kSuccess);
  EXPECT_EQ(states[0].event_state, sc::kStatePresent | sc::kStateChanged | (1u << 16));
  EXPECT_EQ(states[0].atr, card().atr);
  states[0].current_state = states[0].event_state & ~sc::kStateChanged;
  EXPECT_EQ(api_.get_status_change(ctx, 0, states), sc::kETimeout);
  auto waiter = std::async(std::launch::async, [&] { return api_.get_status_change(ctx, 0xFFFFFFFF, states); });
  ASSERT_TRUE(api_.wait_watcher_idle(kDeadline));
  api_.remove_card(kReader);
  ASSERT_EQ(waiter.wait_for(kDeadline), std::future_status::ready);
  EXPECT_EQ(waiter.get(), sc::kSuccess);
  EXPECT_EQ(states[0].event_state, sc::kStateEmpty | sc::kStateChanged | (2u << 16));
  EXPECT_TRUE(states[0].atr.empty());
}

TEST_F(FakeCardApiTest, PnpPseudoReaderReportsTheReaderCount) {
  const ScardContext ctx = context();
  std::vector<ReaderStateIo> states{{FakeCardApi::kPnpReader, 1u << 16, 0, {}}};
  EXPECT_EQ(api_.get_status_change(ctx, 0, states), sc::kETimeout);
  auto waiter = std::async(std::launch::async, [&] { return api_.get_status_change(ctx, 0xFFFFFFFF, states); });
  ASSERT_TRUE(api_.wait_watcher_idle(kDeadline));
  api_.add_reader("Second Reader 01 00");
  ASSERT_EQ(waiter.wait_for(kDeadline), std::future_status::ready);
  EXPECT_EQ(waiter.get(), sc::kSuccess);
  EXPECT_EQ(states[0].event_state, (2u << 16) | sc::kStateChanged);
}

TEST_F(FakeCardApiTest, CancelWakesGetStatusChange) {
  const ScardContext ctx = context();
  std::vector<ReaderStateIo> states{{kReader, sc::kStatePresent | (1u << 16), 0, {}}};
  auto waiter = std::async(std::launch::async, [&] { return api_.get_status_change(ctx, 0xFFFFFFFF, states); });
  ASSERT_TRUE(api_.wait_watcher_idle(kDeadline));
  EXPECT_EQ(api_.cancel(ctx), sc::kSuccess);
  ASSERT_EQ(waiter.wait_for(kDeadline), std::future_status::ready);
  EXPECT_EQ(waiter.get(), sc::kECancelled);
}

TEST_F(FakeCardApiTest, ServiceDownWakesBlockedCallsAndKillsContexts) {
  const ScardContext ctx = context();
  const ScardHandle a = connect(ctx);
  const ScardHandle b = connect(context());
  ASSERT_EQ(api_.begin_transaction(a), sc::kSuccess);
  auto begin = std::async(std::launch::async, [&] { return api_.begin_transaction(b); });
  ASSERT_TRUE(api_.wait_blocked_in_begin(1, kDeadline));
  api_.set_service_available(false);
  ASSERT_EQ(begin.wait_for(kDeadline), std::future_status::ready);
  EXPECT_EQ(begin.get(), sc::kENoService);
  ScardContext other = 0;
  EXPECT_EQ(api_.establish(sc::kScopeSystem, &other), sc::kENoService);
  api_.set_service_available(true);
  std::vector<std::string> names;
  EXPECT_EQ(api_.list_readers(ctx, &names), sc::kENoService);  // the old context stays dead
  EXPECT_EQ(api_.list_readers(context(), &names), sc::kSuccess);
  EXPECT_EQ(names, std::vector<std::string>{kReader});
}

TEST_F(FakeCardApiTest, TransmitAnswersFromTheScript) {
  FakeCard c = card();
  c.answers[{0x00, 0xCA, 0x01, 0x00, 0x00}] = {0x01, 0x02, 0x90, 0x00};
  api_.insert_card(kReader, c);
  const ScardHandle h = connect(context());
  uint32_t recv = 0;
  Buffer out;
  ASSERT_EQ(api_.transmit(h, sc::kProtocolT1, std::vector<uint8_t>{0x00, 0xCA, 0x01, 0x00, 0x00}, &recv, 258, &out),
            sc::kSuccess);
  EXPECT_EQ(out.data, (std::vector<uint8_t>{0x01, 0x02, 0x90, 0x00}));
  EXPECT_EQ(recv, sc::kProtocolT1);
  EXPECT_EQ(api_.transmit(h, sc::kProtocolT1, std::vector<uint8_t>{0x00, 0xCA, 0x01, 0x00, 0x00}, &recv, 3, &out),
            sc::kEInsufficientBuffer);
  EXPECT_EQ(out.length, 4u);
  EXPECT_EQ(api_.transmit(h, sc::kProtocolT1, std::vector<uint8_t>{0x00, 0x00}, &recv, 258, &out), sc::kSuccess);
  EXPECT_EQ(out.data, (std::vector<uint8_t>{0x6D, 0x00}));
}

TEST_F(FakeCardApiTest, HeldCallWaitsForRelease) {
  api_.hold(Call::kEstablish);
  auto waiter = std::async(std::launch::async, [&] {
    ScardContext ctx = 0;
    return api_.establish(sc::kScopeSystem, &ctx);
  });
  ASSERT_TRUE(api_.wait_held(Call::kEstablish, 1, kDeadline));
  EXPECT_EQ(waiter.wait_for(0s), std::future_status::timeout);
  api_.release_hold(Call::kEstablish);
  ASSERT_EQ(waiter.wait_for(kDeadline), std::future_status::ready);
  EXPECT_EQ(waiter.get(), sc::kSuccess);
}

TEST_F(FakeCardApiTest, ThrowOnceThrowsOnce) {
  api_.throw_once(Call::kEstablish);
  ScardContext ctx = 0;
  EXPECT_THROW(api_.establish(sc::kScopeSystem, &ctx), std::runtime_error);
  EXPECT_EQ(api_.establish(sc::kScopeSystem, &ctx), sc::kSuccess);
}

}  // namespace
}  // namespace cardbridge::client::fake
