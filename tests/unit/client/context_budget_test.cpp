// ContextBudget and BudgetedCardApi: the desk agent's share of the desk pcscd's contexts,
// all connections together (pcscd serves 200 for every program of the desk).
#include "cardbridge/desk_runtime/context_budget.hpp"

#include <vector>

#include <gtest/gtest.h>

#include "cardbridge/support/scard.hpp"
#include "fake_card_api.hpp"

namespace cardbridge::client {
namespace {

namespace sc = cardbridge::scard;

TEST(ContextBudget, RefusesPastTheLimitAndFlagsOnlyTheFirstRefusalOfAnEpisode) {
  ContextBudget b(2);
  EXPECT_TRUE(b.try_acquire().ok);
  EXPECT_TRUE(b.try_acquire().ok);
  auto r1 = b.try_acquire();
  auto r2 = b.try_acquire();
  EXPECT_FALSE(r1.ok);
  EXPECT_TRUE(r1.first_refusal) << "the first refusal is the one to log";
  EXPECT_FALSE(r2.ok);
  EXPECT_FALSE(r2.first_refusal) << "the next ones stay quiet (no log storm)";
  EXPECT_EQ(b.in_use(), 2u);
  EXPECT_EQ(b.refused(), 2u);
  EXPECT_TRUE(b.release()) << "room again ends the episode";
  EXPECT_FALSE(b.release());
  EXPECT_TRUE(b.try_acquire().ok);
  EXPECT_TRUE(b.try_acquire().ok);
  auto r3 = b.try_acquire();
  EXPECT_FALSE(r3.ok);
  EXPECT_TRUE(r3.first_refusal) << "a new episode is logged again";
}

TEST(ContextBudget, TheDefaultLeavesRoomForTheDesksOwnPrograms) {
  EXPECT_LT(kDefaultContextBudget, kDeskPcscdContexts);
  EXPECT_GE(kDeskPcscdContexts - kDefaultContextBudget, 20u);
}

class BudgetedCardApiTest : public ::testing::Test {
 protected:
  fake::FakeCardApi pcsc;
  ContextBudget budget{3};
  BudgetedCardApi api{pcsc, budget};
};

TEST_F(BudgetedCardApiTest, EstablishPastTheBudgetIsRefusedBeforeThePcscd) {
  std::vector<ScardContext> held;
  for (int i = 0; i < 3; ++i) {
    ScardContext c = 0;
    ASSERT_EQ(api.establish(sc::kScopeSystem, &c), sc::kSuccess);
    held.push_back(c);
  }
  ScardContext c = 0;
  EXPECT_EQ(api.establish(sc::kScopeSystem, &c), sc::kENoMemory);
  EXPECT_EQ(pcsc.calls(fake::Call::kEstablish), 3u) << "the refused establish reached the desk's pcscd";
  // One released: room for exactly one more.
  EXPECT_EQ(api.release(held.back()), sc::kSuccess);
  held.pop_back();
  EXPECT_EQ(api.establish(sc::kScopeSystem, &c), sc::kSuccess);
  EXPECT_EQ(api.establish(sc::kScopeSystem, &c), sc::kENoMemory);
  EXPECT_EQ(budget.in_use(), 3u);
}

TEST_F(BudgetedCardApiTest, OnlyContextsItEstablishedGiveTheirUnitBack) {
  ScardContext a = 0;
  ASSERT_EQ(api.establish(sc::kScopeSystem, &a), sc::kSuccess);
  api.release(a);
  api.release(a);          // twice: pcscd says invalid, the unit is not returned twice
  api.release(a + 1000);   // never ours
  EXPECT_EQ(budget.in_use(), 0u);
  for (int i = 0; i < 3; ++i) {
    ScardContext c = 0;
    ASSERT_EQ(api.establish(sc::kScopeSystem, &c), sc::kSuccess);
  }
  ScardContext c = 0;
  EXPECT_EQ(api.establish(sc::kScopeSystem, &c), sc::kENoMemory) << "a double release freed a unit it did not hold";
}

}  // namespace
}  // namespace cardbridge::client
