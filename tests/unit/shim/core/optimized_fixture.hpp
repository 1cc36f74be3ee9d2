// The bench of the optimisation tests: every Optimizations switch on, a desk announcing
// |desk_caps| with reader A (card) and reader B (empty), and the steps those tests repeat.
#pragma once

#include <cstdint>

#include <gtest/gtest.h>

#include "kit/rig.hpp"

namespace cardbridge::shim {

class ShimCoreOptimized : public ::testing::Test {
 protected:
  explicit ShimCoreOptimized(uint64_t desk_caps = protocol::caps::kAll) : rig(kit::optimized_config()) {
    rig.standard_desk(desk_caps);
  }

  // A deferred Begin: answered at once, nothing sent.
  void deferred_begin(kit::PcscClient& c, uint32_t card) {
    const std::size_t before = rig.fx.desk.size();
    c.send_begin(card);
    EXPECT_EQ(c.take_all(), kit::Bytes(kit::Le().u32(card).u32(kit::pcsc::kSuccess)));
    EXPECT_EQ(rig.fx.desk.size(), before);
  }
  // A transmit the desk answers with |reply|; returns the data the client got (the request
  // the desk saw through |q|).
  kit::Bytes transmit(kit::PcscClient& c, uint32_t card, const kit::Bytes& apdu, protocol::Request* q = nullptr,
                      protocol::Reply reply = kit::ok_reply({0x90, 0x00})) {
    c.send_transmit(card, apdu);
    auto req = rig.desk.expect(protocol::Op::kTransmit);
    if (q) *q = req.q;
    rig.desk.reply(req.id, std::move(reply));
    return c.transmit_reply().data;
  }
  // A transaction with one card operation, then an EndTransaction the shim answers at once
  // and pipelines: returns the END's desk request id (not answered yet).
  uint32_t pipelined_end(kit::PcscClient& c, uint32_t card) {
    deferred_begin(c, card);
    transmit(c, card, kSelect);
    c.send_end(card, kit::pcsc::kLeaveCard);
    EXPECT_EQ(c.end_reply().rv, kit::pcsc::kSuccess);
    return rig.desk.expect(protocol::Op::kEndTransaction).id;
  }

  const kit::Bytes kSelect = {0x00, 0xA4, 0x04, 0x00, 0x02, 0x3F, 0x00};
  const kit::Bytes kSw9000 = {0x90, 0x00};
  kit::Rig rig;
};

// A desk of an earlier version, without desk-ordering: the shim fences locally.
class ShimCoreOptimizedOldDesk : public ShimCoreOptimized {
 protected:
  ShimCoreOptimizedOldDesk() : ShimCoreOptimized(protocol::caps::kAll & ~protocol::caps::kDeskOrdering) {}
};

}  // namespace cardbridge::shim
