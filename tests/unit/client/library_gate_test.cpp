// LibraryGate (pure): Connect/Disconnect never overlap a handle look-up, readers never wait
// for a waiting writer, and the pcscd waits that would deadlock inside an exclusive section
// (our own transaction on the reader) happen outside it. The PC/SC calls are plain lambdas;
// "it has not run yet" is checked after giving it time to run, "it runs" by waiting for it.
#include "cardbridge/desk_pcsc/library_gate.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <thread>

#include "cardbridge/support/scard.hpp"

namespace cardbridge::client {
namespace {

namespace sc = cardbridge::scard;
using namespace std::chrono_literals;

constexpr auto kGrace = 100ms;    // long enough for a call that is free to run to have run
constexpr auto kPatience = 5s;   // bound on waiting for a call that must run

// A call that blocks until released: holds its section open.
struct Latch {
  std::promise<void> entered_p, release_p;
  std::shared_future<void> release = release_p.get_future().share();
  std::future<void> entered = entered_p.get_future();
  uint32_t operator()() {
    entered_p.set_value();
    release.wait();
    return sc::kSuccess;
  }
};

bool still_waiting(std::future<uint32_t>& f) { return f.wait_for(kGrace) == std::future_status::timeout; }
bool finished(std::future<uint32_t>& f) { return f.wait_for(kPatience) == std::future_status::ready; }

uint32_t connect(LibraryGate& g, LibraryGate::Context ctx, const std::string& reader, LibraryGate::Handle h) {
  return g.connect(ctx, reader, [h](LibraryGate::Handle* made) {
    *made = h;
    return sc::kSuccess;
  });
}
uint32_t ok() { return sc::kSuccess; }
// What the gate learns after a successful Begin: the reader's event counter.
auto epoch(int64_t counter) {
  return [counter] { return counter; };
}

TEST(LibraryGate, ConnectWaitsForAHandleCallInFlight) {
  LibraryGate g;
  ASSERT_EQ(connect(g, 1, "R", 11), sc::kSuccess);
  Latch transmit;
  auto t = std::async(std::launch::async, [&] { return g.lookup(11, std::ref(transmit)); });
  transmit.entered.wait();
  std::atomic<bool> ran{false};
  auto c = std::async(std::launch::async, [&] {
    return g.connect(2, "R2", [&](LibraryGate::Handle* made) {
      ran = true;
      *made = 22;
      return ok();
    });
  });
  EXPECT_TRUE(still_waiting(c));
  EXPECT_FALSE(ran);
  transmit.release_p.set_value();
  EXPECT_TRUE(finished(c));
  EXPECT_TRUE(ran);
  EXPECT_EQ(t.get(), sc::kSuccess);
  EXPECT_EQ(g.tracked_handles(), 2u);
}

TEST(LibraryGate, HandleCallWaitsForAConnectInFlight) {
  LibraryGate g;
  ASSERT_EQ(connect(g, 1, "R", 11), sc::kSuccess);
  std::promise<void> entered, release;
  auto c = std::async(std::launch::async, [&] {
    return g.connect(2, "R", [&](LibraryGate::Handle* made) {
      entered.set_value();
      release.get_future().wait();
      *made = 22;
      return ok();
    });
  });
  entered.get_future().wait();
  auto t = std::async(std::launch::async, [&] { return g.lookup(11, ok); });
  EXPECT_TRUE(still_waiting(t));
  release.set_value();
  EXPECT_TRUE(finished(t));
  EXPECT_TRUE(finished(c));
}

TEST(LibraryGate, HandleCallsDoNotWaitForAWaitingConnect) {
  // A transaction holder's End must get through while a Connect waits for calls in flight.
  LibraryGate g;
  ASSERT_EQ(connect(g, 1, "R", 11), sc::kSuccess);
  ASSERT_EQ(connect(g, 2, "R2", 22), sc::kSuccess);
  Latch slow;
  auto t = std::async(std::launch::async, [&] { return g.lookup(11, std::ref(slow)); });
  slow.entered.wait();
  auto c = std::async(std::launch::async, [&] { return connect(g, 3, "R3", 33); });
  EXPECT_TRUE(still_waiting(c));
  auto other = std::async(std::launch::async, [&] { return g.lookup(22, ok); });
  EXPECT_TRUE(finished(other));
  EXPECT_TRUE(still_waiting(c));
  slow.release_p.set_value();
  EXPECT_TRUE(finished(c));
}

TEST(LibraryGate, ConnectWaitsWhileOurHandleHoldsTheReadersTransaction) {
  LibraryGate g;
  ASSERT_EQ(connect(g, 1, "R", 11), sc::kSuccess);
  ASSERT_EQ(g.begin_transaction(11, ok, epoch(1)), sc::kSuccess);
  EXPECT_EQ(g.transactions(11), 1);
  auto same = std::async(std::launch::async, [&] { return connect(g, 2, "R", 22); });
  auto other = std::async(std::launch::async, [&] { return connect(g, 3, "R2", 33); });
  EXPECT_TRUE(finished(other));   // another reader: no lock there
  EXPECT_TRUE(still_waiting(same));
  // The holder's own calls still run (no exclusive section is open while Connect waits).
  EXPECT_EQ(g.lookup(11, ok), sc::kSuccess);
  EXPECT_EQ(g.end_transaction(11, ok), sc::kSuccess);
  EXPECT_TRUE(finished(same));
  EXPECT_EQ(g.transactions(11), 0);
}

TEST(LibraryGate, NestedTransactionsCountAndAFailedEndKeepsTheLock) {
  LibraryGate g;
  ASSERT_EQ(connect(g, 1, "R", 11), sc::kSuccess);
  ASSERT_EQ(g.begin_transaction(11, ok, epoch(1)), sc::kSuccess);
  ASSERT_EQ(g.begin_transaction(11, ok, epoch(1)), sc::kSuccess);  // its own lock: no wait
  EXPECT_EQ(g.transactions(11), 2);
  // pcscd keeps the lock when End fails (e.g. the card was reset): so do we.
  EXPECT_EQ(g.end_transaction(11, [] { return sc::kWResetCard; }), sc::kWResetCard);
  EXPECT_EQ(g.transactions(11), 2);
  ASSERT_EQ(g.end_transaction(11, ok), sc::kSuccess);
  auto c = std::async(std::launch::async, [&] { return connect(g, 2, "R", 22); });
  EXPECT_TRUE(still_waiting(c));
  ASSERT_EQ(g.end_transaction(11, ok), sc::kSuccess);
  EXPECT_TRUE(finished(c));
}

TEST(LibraryGate, BeginWaitsOutsideLibpcscliteForAnotherOfOurHandles) {
  LibraryGate g;
  ASSERT_EQ(connect(g, 1, "R", 11), sc::kSuccess);
  ASSERT_EQ(connect(g, 2, "R", 22), sc::kSuccess);
  ASSERT_EQ(g.begin_transaction(11, ok, epoch(1)), sc::kSuccess);
  std::atomic<bool> called{false};
  auto b = std::async(std::launch::async, [&] {
    return g.begin_transaction(22, [&] {
      called = true;
      return ok();
    }, epoch(1));
  });
  EXPECT_TRUE(still_waiting(b));
  EXPECT_FALSE(called);  // not parked in libpcsclite's retry loop inside a shared section
  // ...so a Connect elsewhere is not held up by it.
  auto c = std::async(std::launch::async, [&] { return connect(g, 3, "R2", 33); });
  EXPECT_TRUE(finished(c));
  ASSERT_EQ(g.end_transaction(11, ok), sc::kSuccess);
  EXPECT_TRUE(finished(b));
  EXPECT_EQ(g.transactions(22), 1);
}

TEST(LibraryGate, ABeginInFlightCountsAsTheReadersLock) {
  LibraryGate g;
  ASSERT_EQ(connect(g, 1, "R", 11), sc::kSuccess);
  Latch begin;
  auto b = std::async(std::launch::async, [&] { return g.begin_transaction(11, std::ref(begin), epoch(1)); });
  begin.entered.wait();
  auto c = std::async(std::launch::async, [&] { return connect(g, 2, "R", 22); });
  begin.release_p.set_value();
  EXPECT_TRUE(finished(b));
  EXPECT_TRUE(still_waiting(c));  // the Begin succeeded: now the transaction holds it
  ASSERT_EQ(g.end_transaction(11, ok), sc::kSuccess);
  EXPECT_TRUE(finished(c));
}

TEST(LibraryGate, ACardRemovalSeenByTheMonitorEndsTheTransactionsBegunBefore) {
  // pcscd drops the lock when the card goes; the holder's handle then only gets errors.
  LibraryGate g;
  ASSERT_EQ(connect(g, 1, "R", 11), sc::kSuccess);
  ASSERT_EQ(connect(g, 2, "R", 22), sc::kSuccess);
  ASSERT_EQ(connect(g, 3, "R2", 33), sc::kSuccess);
  ASSERT_EQ(g.begin_transaction(11, ok, epoch(4)), sc::kSuccess);
  ASSERT_EQ(g.begin_transaction(33, ok, epoch(LibraryGate::kUnknown)), sc::kSuccess);
  g.observe("R", 4);   // same counter: nothing happened to the card
  g.observe("R2", 9);  // unknown epoch: only End/Disconnect/Release end it
  EXPECT_EQ(g.transactions(11), 1);
  EXPECT_EQ(g.transactions(33), 1);
  auto b = std::async(std::launch::async, [&] { return g.begin_transaction(22, ok, epoch(6)); });
  EXPECT_TRUE(still_waiting(b));
  g.observe("R", 5);  // removed (and maybe back): pcscd no longer holds 11's lock
  EXPECT_TRUE(finished(b));
  EXPECT_EQ(g.transactions(11), 0);
  EXPECT_EQ(g.transactions(22), 1);  // begun under counter 6: a later one, kept
  g.observe("R", 6);
  EXPECT_EQ(g.transactions(22), 1);
}

TEST(LibraryGate, ABeginWhoseCardWentMeanwhileTakesNoLock) {
  LibraryGate g;
  ASSERT_EQ(connect(g, 1, "R", 11), sc::kSuccess);
  ASSERT_EQ(g.begin_transaction(11, ok, [] { return LibraryGate::kGone; }), sc::kSuccess);
  EXPECT_EQ(g.transactions(11), 0);
}

TEST(LibraryGate, AFailedBeginTakesNoLock) {
  LibraryGate g;
  ASSERT_EQ(connect(g, 1, "R", 11), sc::kSuccess);
  EXPECT_EQ(g.begin_transaction(11, [] { return sc::kWRemovedCard; }, epoch(1)), sc::kWRemovedCard);
  EXPECT_EQ(g.transactions(11), 0);
  auto c = std::async(std::launch::async, [&] { return connect(g, 2, "R", 22); });
  EXPECT_TRUE(finished(c));
}

TEST(LibraryGate, DisconnectWaitsOnlyWithACardActionAndNotForItsOwnLock) {
  LibraryGate g;
  ASSERT_EQ(connect(g, 1, "R", 11), sc::kSuccess);
  ASSERT_EQ(connect(g, 2, "R", 22), sc::kSuccess);
  ASSERT_EQ(connect(g, 3, "R", 33), sc::kSuccess);
  ASSERT_EQ(g.begin_transaction(11, ok, epoch(1)), sc::kSuccess);
  // LEAVE: pcscd does not wait for the lock.
  auto leave = std::async(std::launch::async, [&] { return g.disconnect(22, true, ok); });
  EXPECT_TRUE(finished(leave));
  // RESET: pcscd waits for the other handle's transaction; we wait before the section.
  auto reset = std::async(std::launch::async, [&] { return g.disconnect(33, false, ok); });
  EXPECT_TRUE(still_waiting(reset));
  // The holder itself disconnects with RESET at once, and that frees the reader.
  EXPECT_EQ(g.disconnect(11, false, ok), sc::kSuccess);
  EXPECT_TRUE(finished(reset));
  EXPECT_EQ(g.tracked_handles(), 0u);
}

TEST(LibraryGate, ReleasingTheHoldersContextFreesTheReader) {
  LibraryGate g;
  ASSERT_EQ(connect(g, 1, "R", 11), sc::kSuccess);
  ASSERT_EQ(connect(g, 1, "R", 12), sc::kSuccess);
  ASSERT_EQ(g.begin_transaction(11, ok, epoch(1)), sc::kSuccess);
  auto c = std::async(std::launch::async, [&] { return connect(g, 2, "R", 22); });
  EXPECT_TRUE(still_waiting(c));
  EXPECT_EQ(g.release(1, ok), sc::kSuccess);
  EXPECT_TRUE(finished(c));
  EXPECT_EQ(g.tracked_handles(), 1u);  // only 22 left
}

TEST(LibraryGate, ReleaseWaitsForAnotherContextsTransactionOnItsReaders) {
  // pcscd disconnects the released context's handles with a reset, which waits for the
  // reader's transaction: ours must be able to end meanwhile.
  LibraryGate g;
  ASSERT_EQ(connect(g, 1, "R", 11), sc::kSuccess);
  ASSERT_EQ(connect(g, 2, "R", 22), sc::kSuccess);
  ASSERT_EQ(connect(g, 3, "R2", 33), sc::kSuccess);
  ASSERT_EQ(g.begin_transaction(11, ok, epoch(1)), sc::kSuccess);
  auto r2 = std::async(std::launch::async, [&] { return g.release(2, ok); });
  auto r3 = std::async(std::launch::async, [&] { return g.release(3, ok); });  // other reader
  EXPECT_TRUE(finished(r3));
  EXPECT_TRUE(still_waiting(r2));
  ASSERT_EQ(g.end_transaction(11, ok), sc::kSuccess);
  EXPECT_TRUE(finished(r2));
  // Releasing the holder's own context does not wait for its own transaction.
  ASSERT_EQ(g.begin_transaction(11, ok, epoch(1)), sc::kSuccess);
  auto r1 = std::async(std::launch::async, [&] { return g.release(1, ok); });
  EXPECT_TRUE(finished(r1));
  EXPECT_EQ(g.tracked_handles(), 0u);
}

TEST(LibraryGate, EstablishIsExclusiveToo) {
  // SCardDisconnect searches the context list with no library lock: contexts must not be
  // added or freed meanwhile.
  LibraryGate g;
  ASSERT_EQ(connect(g, 1, "R", 11), sc::kSuccess);
  Latch disconnect;
  auto d = std::async(std::launch::async, [&] { return g.disconnect(11, true, std::ref(disconnect)); });
  disconnect.entered.wait();
  auto e = std::async(std::launch::async, [&] { return g.establish(ok); });
  EXPECT_TRUE(still_waiting(e));
  disconnect.release_p.set_value();
  EXPECT_TRUE(finished(e));
  EXPECT_TRUE(finished(d));
}

TEST(LibraryGate, AHandleOrReaderThatIsGoneHoldsNoLock) {
  LibraryGate g;
  ASSERT_EQ(connect(g, 1, "R", 11), sc::kSuccess);
  ASSERT_EQ(g.begin_transaction(11, ok, epoch(1)), sc::kSuccess);
  auto c = std::async(std::launch::async, [&] { return connect(g, 2, "R", 22); });
  EXPECT_TRUE(still_waiting(c));
  EXPECT_EQ(g.lookup(11, [] { return sc::kEReaderUnavailable; }), sc::kEReaderUnavailable);
  EXPECT_TRUE(finished(c));
}

TEST(LibraryGate, FailedConnectIsNotTrackedAndUnknownHandlesPassThrough) {
  LibraryGate g;
  EXPECT_EQ(g.connect(1, "R", [](LibraryGate::Handle*) { return sc::kESharingViolation; }),
            sc::kESharingViolation);
  EXPECT_EQ(g.tracked_handles(), 0u);
  EXPECT_EQ(g.begin_transaction(99, [] { return sc::kEInvalidHandle; }, epoch(1)), sc::kEInvalidHandle);
  EXPECT_EQ(g.disconnect(99, false, [] { return sc::kEInvalidHandle; }), sc::kEInvalidHandle);
  EXPECT_EQ(g.tracked_handles(), 0u);
}

TEST(LibraryGate, ManyThreadsNeverOverlapAnExclusiveSection) {
  // The property libpcsclite needs: while a Connect or Disconnect runs, no handle call does.
  LibraryGate g;
  std::atomic<int> in_shared{0}, in_exclusive{0}, overlaps{0};
  auto shared_call = [&] {
    ++in_shared;
    if (in_exclusive.load() != 0) ++overlaps;
    std::this_thread::yield();
    --in_shared;
    return ok();
  };
  std::vector<std::thread> ts;
  for (int t = 0; t < 6; ++t) {
    ts.emplace_back([&, t] {
      const std::string reader = t % 2 ? "R" : "R2";
      for (int i = 0; i < 300; ++i) {
        const LibraryGate::Handle h = (t + 1) * 100000 + i;
        const LibraryGate::Context ctx = (t + 1) * 100000 + i / 10;  // a new context now and then
        auto exclusive_call = [&] {
          ++in_exclusive;
          if (in_shared.load() != 0 || in_exclusive.load() != 1) ++overlaps;
          --in_exclusive;
          return ok();
        };
        if (i % 10 == 0) g.establish(exclusive_call);
        g.connect(ctx, reader, [&](LibraryGate::Handle* made) {
          ++in_exclusive;
          if (in_shared.load() != 0 || in_exclusive.load() != 1) ++overlaps;
          *made = h;
          --in_exclusive;
          return ok();
        });
        g.lookup(h, shared_call);
        if (i % 3 == 0) {
          g.begin_transaction(h, shared_call, epoch(1));
          g.lookup(h, shared_call);
          g.end_transaction(h, shared_call);
        }
        if (i % 4 != 3) g.disconnect(h, i % 2 == 0, exclusive_call);  // else left to the release
        if (i % 10 == 9) g.release(ctx, exclusive_call);
      }
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(overlaps.load(), 0);
  EXPECT_EQ(g.tracked_handles(), 0u);
}

}  // namespace
}  // namespace cardbridge::client
