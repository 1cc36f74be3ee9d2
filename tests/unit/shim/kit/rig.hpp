// Rig: one ShimCore on a test bench. It owns the clock (every event carries |now|; time
// moves only when the test moves it), the RecordingEffects (a breach of the effects
// contract fails the test), the FakeDesk, and makes PcscClients with ids 1, 2, 3...
//
// Logs are off unless SHIM_TEST_LOG names a level (SHIM_TEST_LOG=debug).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/shim_core/shim_core.hpp"
#include "kit/fake_desk.hpp"
#include "kit/pcsc_client.hpp"
#include "kit/pcsc_values.hpp"
#include "kit/recording_effects.hpp"

namespace cardbridge::shim::kit {

using namespace std::chrono_literals;

inline const std::string kReaderA = "Virtual PCD 00 00";
inline const std::string kReaderB = "Virtual PCD 00 01";
inline const std::string kReaderC = "Gemalto PC Twin Reader 00 00";

// What the shim offers (everything, as cardbridge-shim does); no optimisations. The fake
// desk comes as the session's user over a UNIX socket (uid kDeskUid), which the policy allows.
inline constexpr uint32_t kDeskUid = 1000;
inline ShimConfig rig_config() {
  ShimConfig c;
  c.server_name = "shim-under-test";
  c.capabilities = protocol::caps::kAll;
  c.random_seed = 0x5EED1234;
  c.desk_policy.unix_uids = {kDeskUid, 0};
  return c;
}
inline ShimConfig optimized_config() {
  auto c = rig_config();
  c.optimizations = Optimizations::all();
  return c;
}
// The benchmark baseline: a round trip per PC/SC call, no capability beyond reader push
// (as cardbridge-shim --mode per-call).
inline ShimConfig per_call_config() {
  auto c = rig_config();
  c.capabilities = protocol::caps::kReaderPush;
  c.one_round_trip_per_call = true;
  return c;
}

// Rig(kStandardDesk): a rig whose desk is up with the standard readers (standard_desk()).
inline constexpr struct StandardDesk {
} kStandardDesk;

// A client with a context and one handle.
struct ConnectedClient {
  PcscClient client;
  uint32_t card = 0;
};

// What the desk answers a Connect with, when a test wants something else than the model.
struct DeskConnectAnswer {
  uint32_t handle = 0;  // 0: the desk model's next handle
  uint32_t protocol = pcsc::kT1;
  uint32_t counter = 1;  // the reader's event counter in SCardStatus's dwState
  uint32_t reader_state = pcsc::kReaderCardReady;
};

class Rig {
 public:
  explicit Rig(ShimConfig config = rig_config()) : core(fx, quiet_logs(std::move(config))), desk(core, fx, now) {}
  explicit Rig(StandardDesk, ShimConfig config = rig_config(), uint64_t desk_caps = protocol::caps::kAll)
      : Rig(std::move(config)) {
    standard_desk(desk_caps);
  }
  Rig(const Rig&) = delete;
  Rig& operator=(const Rig&) = delete;

  // The test's clock. Any start will do: the core only compares the times it is given.
  TimePoint now = TimePoint{} + 1h;
  RecordingEffects fx{[](const std::string& breach) { ADD_FAILURE() << "effects contract: " << breach; }};
  ShimCore core;
  FakeDesk desk;

  // Time passes until |t|; the core's timers run.
  void tick_at(TimePoint t) {
    now = t;
    core.tick(now);
  }

  // ---- the desk ----
  // Desk up with capabilities |caps| and these readers.
  void desk_up(std::vector<protocol::ReaderInfo> readers, uint64_t caps = protocol::caps::kAll) {
    desk.connect(caps);
    desk.push(std::move(readers));
  }
  // Reader A with a card (event counter 1), reader B empty.
  void standard_desk(uint64_t caps = protocol::caps::kAll) {
    desk_up({card_in(kReaderA, 1), empty_reader(kReaderB)}, caps);
  }

  // ---- clients ----
  // A connection that has only been opened.
  PcscClient raw_client() {
    PcscClient c(core, fx, next_id_++, now);
    c.open();
    return c;
  }
  // SCardEstablishContext done: CMD_VERSION 4.<minor>, ESTABLISH_CONTEXT (in per-call mode
  // the desk answers the EstablishContext the shim asks it for).
  PcscClient client(int32_t minor = 4) {
    auto c = raw_client();
    EXPECT_EQ(c.version(4, minor).rv, pcsc::kSuccess);
    c.send_establish(pcsc::kScopeSystem);
    if (core.config().one_round_trip_per_call && core.desk_up()) desk.answer_next(protocol::Op::kEstablishContext);
    EXPECT_EQ(c.establish_reply().rv, pcsc::kSuccess);
    return c;
  }

  // A whole SCardConnect on |reader|: the request reaches the desk (it must be the next
  // message), which answers |answer|. Returns the hCard (0, and a failure, if it failed).
  uint32_t connect(PcscClient& c, const std::string& reader = kReaderA, uint32_t share = pcsc::kShareShared,
                   DeskConnectAnswer answer = {}, protocol::Request* request_out = nullptr) {
    c.send_connect(reader, share);
    auto [id, q] = desk.expect(protocol::Op::kConnect);
    EXPECT_EQ(q.reader, reader);
    if (request_out) *request_out = q;
    protocol::Reply r;
    r.handle = protocol::DeskHandle{answer.handle != 0 ? answer.handle : desk.next_handle++};
    r.protocol = answer.protocol;
    r.state = (answer.counter << 16) | answer.reader_state;
    r.card_protocol = answer.protocol;
    desk.reply(id, r);
    auto rep = c.connect_reply();
    EXPECT_EQ(rep.rv, pcsc::kSuccess);
    return rep.card;
  }

  // A client(minor) with a handle from connect() on |reader|.
  ConnectedClient connected_client(const std::string& reader = kReaderA, uint32_t share = pcsc::kShareShared,
                                   int32_t minor = 4) {
    auto c = client(minor);
    const uint32_t card = connect(c, reader, share);
    return {std::move(c), card};
  }

  // SCardListReaders as a bystander sees it: a fresh connection, CMD_GET_READERS_STATE,
  // gone again. (Per-call mode: the desk answers the Ping it costs; otherwise the desk is
  // left alone, so that the requests a test holds stay unanswered.)
  Bytes array() {
    auto c = raw_client();
    c.send_cmd(cmd::kGetReadersState);
    if (core.config().one_round_trip_per_call && core.desk_up()) desk.answer_next(protocol::Op::kPing);
    Bytes a = c.take(kArraySize);
    EXPECT_TRUE(c.nothing_pending());
    c.close();
    return a;
  }
  std::vector<ReaderStateView> readers() { return parse_array(array()); }

  // Registers a 4.4/4.5 client for events (the array comes back at once).
  void wait(PcscClient& c) { EXPECT_EQ(c.wait_for_change().size(), kArraySize); }

  // ---- card operations the desk answers with success ----
  void begin_at_desk(PcscClient& c, uint32_t card) {
    c.send_begin(card);
    desk.answer_next(protocol::Op::kBeginTransaction);
    EXPECT_EQ(c.begin_reply(), (PairReply{card, pcsc::kSuccess}));
  }
  void end_at_desk(PcscClient& c, uint32_t card, uint32_t disposition = pcsc::kLeaveCard) {
    c.send_end(card, disposition);
    desk.answer_next(protocol::Op::kEndTransaction);
    EXPECT_EQ(c.end_reply(), (DispositionReply{card, disposition, pcsc::kSuccess}));
  }
  // A RECONNECT (shared, T0|T1) the desk answers with T1 and event counter |counter|.
  void reconnect_at_desk(PcscClient& c, uint32_t card, uint32_t init, uint32_t counter) {
    c.send_reconnect(card, pcsc::kShareShared, pcsc::kT0T1, init, pcsc::kT1);
    protocol::Reply r;
    r.protocol = pcsc::kT1;
    r.state = (counter << 16) | pcsc::kReaderCardReady;
    r.card_protocol = pcsc::kT1;
    desk.answer_next(protocol::Op::kReconnect, r);
    EXPECT_EQ(c.reconnect_reply().rv, pcsc::kSuccess);
  }
  // Answers every outstanding request with success, END_TRANSACTION first (the desk's
  // pcscd holds a Disconnect(RESET) until the transaction ends), until the shim sends
  // nothing more.
  void drain_end_first() {
    while (!desk.idle()) {
      std::vector<FakeDesk::Req> sent;
      while (!desk.idle()) sent.push_back(desk.request());
      std::stable_sort(sent.begin(), sent.end(), [](const auto& x, const auto& y) {
        return x.q.op == protocol::Op::kEndTransaction && y.q.op != protocol::Op::kEndTransaction;
      });
      for (auto& r : sent) desk.reply(r.id, {});
    }
  }

 private:
  static ShimConfig quiet_logs(ShimConfig c) {
    static const bool once = [] {
      const char* level = std::getenv("SHIM_TEST_LOG");
      log::init(log::parse_level(level ? level : "off").value_or(spdlog::level::off), "shim_core_tests");
      return true;
    }();
    (void)once;
    return c;
  }
  ClientId next_id_ = 1;
};

}  // namespace cardbridge::shim::kit
