// RecordingEffects: ShimEffects as the shim's I/O layer would carry them out, recorded for
// the test (or the fuzzer) to read, and checked against the core's side of the contract.
//
// Whoever plays the I/O layer (the Rig and its clients and desk, or the fuzz harness) tells
// it what the sockets did: client_opened / client_gone for clients, desk_transport_up /
// desk_transport_down for the desk link. The contract, each breach reported to |on_breach|:
//  * bytes go only to a client that is open (opened, not gone, not closed by the core), and
//    are never empty; the core closes a client at most once, and only an open one;
//  * bytes go to the desk only while its transport is up, as whole frames (a 4-byte
//    big-endian length equal to the payload's, within the frame limit), each one a message
//    that decodes and is of a kind a server sends (Hello, Request, Error: never a Reply or
//    a ReaderSnapshot).
//
// What it keeps: per client, everything written, in order, as one stream a reader consumes
// (consume()), plus the write count; every message sent to the desk, decoded (|desk|); the
// desk-link resets the core asked for; audit events; and the order of all effects (|events|).
// A fuzz harness that reads the effects as they happen sets the observers and turns
// keeping off.
//
// No GoogleTest here: unit tests pass a handler that fails the test, the fuzzer one that
// aborts. Single-threaded, like the core.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/framing.hpp"
#include "cardbridge/shim_core/shim_core.hpp"
#include "kit/bytes.hpp"

namespace cardbridge::shim::kit {

namespace pr = cardbridge::protocol;

// A frame the shim wrote to the desk, checked: the decoded message, or what is wrong with it.
struct CheckedFrame {
  std::optional<pr::Message> message;
  std::string error;  // empty when |message| is set
};
inline CheckedFrame check_server_frame(std::span<const uint8_t> frame) {
  if (frame.size() <= pr::kFrameHeaderSize) return {std::nullopt, "a desk frame with no payload"};
  const std::size_t len = (std::size_t{frame[0]} << 24) | (std::size_t{frame[1]} << 16) |
                          (std::size_t{frame[2]} << 8) | std::size_t{frame[3]};
  if (len != frame.size() - pr::kFrameHeaderSize) {
    return {std::nullopt, "a desk frame whose header says " + std::to_string(len) + " bytes for a payload of " +
                              std::to_string(frame.size() - pr::kFrameHeaderSize)};
  }
  if (len > pr::kDefaultMaxFrame) return {std::nullopt, "a desk frame larger than a desk accepts"};
  auto m = pr::decode(frame.subspan(pr::kFrameHeaderSize));
  if (!m) return {std::nullopt, "an undecodable desk frame: " + m.error().what};
  if (std::holds_alternative<pr::Reply>(m->body) || std::holds_alternative<pr::ReaderSnapshot>(m->body)) {
    return {std::nullopt, "a message only a desk sends: " + pr::describe(*m)};
  }
  return {std::move(*m), {}};
}

class RecordingEffects final : public ShimEffects {
 public:
  using Breach = std::function<void(const std::string&)>;

  explicit RecordingEffects(Breach on_breach) : on_breach_(std::move(on_breach)) {}

  // ---- what the I/O layer did ----
  void client_opened(ClientId id) {
    if (!ever_opened_.insert(id).second) breach("client id " + std::to_string(id) + " opened twice");
    open_.insert(id);
  }
  // The client's socket went away (EOF): nothing may reach it any more.
  void client_gone(ClientId id) { open_.erase(id); }
  void desk_transport_up() { desk_up_ = true; }
  void desk_transport_down() { desk_up_ = false; }

  // ---- ShimEffects ----
  void send_to_client(ClientId id, std::vector<uint8_t> bytes) override {
    if (!open_.contains(id)) {
      breach("bytes for client " + std::to_string(id) +
             (closed_.contains(id) ? " after the core closed it" : " that is not open"));
    }
    if (bytes.empty()) breach("an empty write to client " + std::to_string(id));
    log(Event{Event::kClientBytes, id, bytes.size()});
    if (on_client_write) on_client_write(id, bytes);
    auto& s = streams_[id];
    ++s.writes;
    if (keep_client_bytes) s.bytes.insert(s.bytes.end(), bytes.begin(), bytes.end());
  }
  void close_client(ClientId id) override {
    if (closed_.contains(id)) {
      breach("client " + std::to_string(id) + " closed twice");
    } else if (!open_.contains(id)) {
      breach("client " + std::to_string(id) + " closed after it went away");
    }
    closed_.insert(id);
    open_.erase(id);
    log(Event{Event::kClose, id, 0});
  }
  void send_to_desk(std::vector<uint8_t> frame) override {
    if (!desk_up_) breach("a frame for the desk while its transport is down");
    log(Event{Event::kDesk, 0, frame.size()});
    auto checked = check_server_frame(frame);
    if (!checked.message) return breach(checked.error);
    if (on_desk_message) on_desk_message(*checked.message);
    if (keep_desk_messages) desk.push_back(std::move(*checked.message));
  }
  void reset_desk_link(const std::string& reason) override {
    reset_asked_ = true;
    if (keep_log) resets.push_back(reason);
    log(Event{Event::kReset, 0, 0});
  }
  void audit(ClientId client, const std::string& event) override {
    if (keep_log) audits.emplace_back(client, event);
  }

  // ---- reading ----
  // Bytes written to |id| and not consumed yet.
  std::size_t available(ClientId id) const {
    auto it = streams_.find(id);
    return it == streams_.end() ? 0 : it->second.bytes.size() - it->second.consumed;
  }
  // Consumes up to |n| unread bytes of |id|'s stream (fewer if fewer were written).
  Bytes consume(ClientId id, std::size_t n) {
    auto& s = streams_[id];
    n = std::min(n, s.bytes.size() - s.consumed);
    Bytes out(s.bytes.begin() + static_cast<std::ptrdiff_t>(s.consumed),
              s.bytes.begin() + static_cast<std::ptrdiff_t>(s.consumed + n));
    s.consumed += n;
    return out;
  }
  std::size_t writes(ClientId id) const {
    auto it = streams_.find(id);
    return it == streams_.end() ? 0 : it->second.writes;
  }
  bool is_open(ClientId id) const { return open_.contains(id); }
  const std::set<ClientId>& open_clients() const { return open_; }
  bool closed_by_core(ClientId id) const { return closed_.contains(id); }
  bool desk_transport_is_up() const { return desk_up_; }
  // True once after each reset_desk_link(): an I/O layer then drops the link.
  bool take_reset_request() { return std::exchange(reset_asked_, false); }

  // ---- the record ----
  std::vector<pr::Message> desk;  // every message sent to the desk, decoded, in order
  std::vector<std::string> resets;
  std::vector<std::pair<ClientId, std::string>> audits;
  struct Event {
    enum Kind { kClientBytes, kClose, kDesk, kReset } kind;
    ClientId client;
    std::size_t size;
  };
  std::vector<Event> events;  // every effect, in order

  // ---- for a fuzz harness ----
  bool keep_client_bytes = true;
  bool keep_desk_messages = true;
  bool keep_log = true;  // |events|, |resets|, |audits|
  // Called for each write / desk message, after the contract checks.
  std::function<void(ClientId, std::span<const uint8_t>)> on_client_write;
  std::function<void(const pr::Message&)> on_desk_message;

 private:
  struct Stream {
    Bytes bytes;
    std::size_t consumed = 0;
    std::size_t writes = 0;
  };
  void breach(const std::string& what) { on_breach_(what); }
  void log(const Event& e) {
    if (keep_log) events.push_back(e);
  }

  Breach on_breach_;
  std::map<ClientId, Stream> streams_;
  std::set<ClientId> ever_opened_, open_, closed_;
  bool desk_up_ = false;
  bool reset_asked_ = false;
};

}  // namespace cardbridge::shim::kit
