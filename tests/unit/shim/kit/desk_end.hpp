// DeskEnd: the desk's end of the cardbridge.v1 link, as far as sending goes. It brings the
// transport up and down (telling both the core and RecordingEffects, so that the effects
// know when the core may write to the desk) and feeds the core what a desk sends: hellos,
// reader snapshots, replies, or any bytes. While the transport is down nothing is
// delivered, as with writes on a closed socket.
//
// Reading what the shim sent and answering it is FakeDesk's job (fake_desk.hpp). No
// GoogleTest here: the fuzzer drives its desk through this class. |core|, |fx| and |now|
// must outlive it; every event carries *now.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/framing.hpp"
#include "cardbridge/protocol/messages.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/shim_core/shim_core.hpp"
#include "kit/recording_effects.hpp"

namespace cardbridge::shim::kit {

class DeskEnd {
 public:
  DeskEnd(ShimCore& core, RecordingEffects& fx, const TimePoint& now) : core_(&core), fx_(&fx), now_(&now) {}

  // What this desk says about itself in its hellos.
  uint64_t instance = 0xD35C0001;
  uint64_t capabilities = protocol::caps::kAll;
  std::string name = "desk-under-test";
  std::string software = "fake-desk 1";
  // Who the transport says the desk is (the rig's policy allows uid 1000 and root).
  PeerIdentity identity = PeerIdentity::unix_user(1000, 4242);

  // ---- the transport ----
  void transport_up() {
    fx_->desk_transport_up();
    core_->desk_connected(*now_, identity);
  }
  void transport_down() {
    fx_->desk_transport_down();
    core_->desk_disconnected(*now_);
  }
  bool transport_is_up() const { return fx_->desk_transport_is_up(); }

  // ---- what the desk sends ----
  void bytes(std::span<const uint8_t> b) {
    if (transport_is_up()) core_->desk_bytes(b, *now_);
  }
  void payload(std::span<const uint8_t> p) { bytes(protocol::frame(p)); }  // one frame around |p|
  void send(const protocol::Message& m) { bytes(protocol::encode_frame(m)); }

  // A hello from this desk (the caller may change it before send_hello()).
  protocol::Hello make_hello(bool reply) const {
    protocol::Hello h;
    h.version_major = protocol::kVersionMajor;
    h.version_minor = protocol::kVersionMinor;
    h.capabilities = capabilities;
    h.role = protocol::Role::kDesk;
    h.software = software;
    h.peer_name = name;
    h.instance = instance;
    h.reply = reply;
    return h;
  }
  void send_hello(const protocol::Hello& h) { send(protocol::Message{0, h}); }
  void hello(bool reply) { send_hello(make_hello(reply)); }
  // A snapshot of |readers| (the next sequence number).
  void snapshot(std::vector<protocol::ReaderInfo> readers) {
    send(protocol::Message{0, protocol::ReaderSnapshot{++sequence_, std::move(readers)}});
  }
  void reply(uint32_t id, protocol::Reply r) { send(protocol::Message{id, std::move(r)}); }

 protected:
  ShimCore* core_;
  RecordingEffects* fx_;
  const TimePoint* now_;

 private:
  uint64_t sequence_ = 0;
};

}  // namespace cardbridge::shim::kit
