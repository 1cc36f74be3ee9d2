// The bench of the optimisation tests: every Optimizations switch on, a desk announcing
// |desk_caps| with reader A (card) and reader B (empty), and the steps those tests repeat.
#pragma once

#include <cstdint>

#include <gtest/gtest.h>

#include "core/shim_core_test.hpp"

namespace cardbridge::shim::core_test {

class ShimCoreOptimized : public ::testing::Test {
 protected:
  explicit ShimCoreOptimized(uint64_t desk_caps = pr::caps::kAll) : rig(kStandardDesk, optimized_config(), desk_caps) {}

  // A deferred Begin: answered at once, nothing sent.
  void deferred_begin(PcscClient& c, uint32_t card) {
    const std::size_t before = rig.fx.desk.size();
    c.send_begin(card);
    EXPECT_EQ(c.take_all(), Bytes(Le().u32(card).u32(kSuccess)));
    EXPECT_EQ(rig.fx.desk.size(), before);
  }
  // A transmit the desk answers with |reply|; returns the data the client got (the request
  // the desk saw through |q|).
  Bytes transmit(PcscClient& c, uint32_t card, const Bytes& apdu, pr::Request* q = nullptr,
                      pr::Reply reply = ok_reply(kSw9000)) {
    c.send_transmit(card, apdu);
    auto req = rig.desk.expect(pr::Op::kTransmit);
    if (q) *q = req.q;
    rig.desk.reply(req.id, std::move(reply));
    return c.transmit_reply().data;
  }
  // Answers the Connect |conn| of |c| (desk handle 0xC0C, T1); returns what |c| got.
  ConnectReply answer_connect(PcscClient& c, const FakeDesk::Req& conn) {
    pr::Reply r = ok_reply({}, kT1);
    r.handle = pr::DeskHandle{0xC0C};
    rig.desk.reply(conn.id, r);
    return c.connect_reply();
  }
  // A transaction with one card operation, then an EndTransaction the shim answers at once
  // and pipelines: returns the END's desk request id (not answered yet).
  uint32_t pipelined_end(PcscClient& c, uint32_t card) {
    deferred_begin(c, card);
    transmit(c, card, kSelectMf);
    c.send_end(card, kLeaveCard);
    EXPECT_EQ(c.end_reply().rv, kSuccess);
    return rig.desk.expect(pr::Op::kEndTransaction).id;
  }

  Rig rig;
};

// A desk of an earlier version, without desk-ordering: the shim fences locally.
class ShimCoreOptimizedOldDesk : public ShimCoreOptimized {
 protected:
  ShimCoreOptimizedOldDesk() : ShimCoreOptimized(pr::caps::kAll & ~pr::caps::kDeskOrdering) {}
};

}  // namespace cardbridge::shim::core_test
