#include "cardbridge/desk_core/desk_core.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/check.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/support/redact.hpp"
#include "cardbridge/support/scard.hpp"

namespace cardbridge::client {

namespace sc = cardbridge::scard;
namespace pr = cardbridge::protocol;

namespace {

log::Channel logger{"cardbridge.desk"};

// Room for a reader's feature list: 6 bytes per feature, some twenty features defined.
constexpr uint32_t kFeatureAnswerCapacity = 256;

pr::LinkSettings link_settings(const DeskConfig& c) {
  pr::LinkSettings s;
  s.role = pr::Role::kDesk;
  s.capabilities = c.capabilities;
  s.software = fmt::format("{} {}", c.software, CARDBRIDGE_VERSION);
  s.name = c.desk_name;
  s.hello_retry = c.hello_retry;
  s.random_seed = c.random_seed;
  s.peer_policy = c.server_policy;
  return s;
}

bool is_9000(const Bytes& r) { return r.size() >= 2 && r[r.size() - 2] == 0x90 && r.back() == 0x00; }

// Room for a speculative answer: 256 data bytes and the status word.
constexpr uint32_t kSpeculativeCapacity = 258;

}  // namespace

// One server request on its way through a lane.
struct DeskCore::Task {
  enum class Step {
    kEstablish,     // making the lane's PC/SC context
    kBegin,         // the deferred BeginTransaction the request carries
    kOperation,     // the request's own call
    kReestablish,   // Connect after the desk's pcscd restarted: release, establish, connect again
    kStatus,        // SCardStatus after a Connect/Reconnect (state, ATR, protocol for the shim)
    kSpeculate,     // a speculative Transmit
    kRelease,       // the server's ReleaseContext
    kFeatures,      // CM_IOCTL_GET_FEATURE_REQUEST, asked before a PIN-pad control code (policy)
  };
  uint32_t id = 0;
  pr::Request req;
  Step step = Step::kOperation;
  pr::Reply reply;
  ScardHandle card = 0;
  int reestablish = 0;   // 1: releasing the dead context, 2: establishing a new one
  // Speculation (Transmit): the command in flight, the reads still predicted, bytes read.
  Bytes spec_command;
  bool spec_reads_planned = false;
  std::deque<Bytes> spec_reads;
  std::size_t spec_bytes = 0;
};

struct DeskCore::Lane {
  LaneId id = 0;
  uint32_t context = 0;                // the server's context id
  std::optional<ScardContext> ctx;     // the PC/SC context, once made
  std::deque<Task> queue;              // front: the task in progress when |running|
  bool running = false;
  bool in_call = false;                // a call is at the edge
  bool retired = false;                // the session is gone: no more replies; release and close
  bool releasing = false;              // the retirement's SCardReleaseContext is at the edge
  std::map<uint32_t, CardTrack> tracks;  // per desk handle: what speculation needs
};

DeskCore::DeskCore(DeskEffects& effects, DeskConfig config)
    : fx_(effects), config_(std::move(config)), link_(*this, link_settings(config_)) {}

DeskCore::~DeskCore() = default;

// ---- the server link ----------------------------------------------------------------------

void DeskCore::transport_up(TimePoint now, PeerIdentity peer) {
  now_ = now;
  if (shutting_down_) return;
  link_.transport_up(now, std::move(peer));
}

void DeskCore::transport_down(TimePoint now) {
  now_ = now;
  link_.transport_down(now);
}

void DeskCore::receive(std::span<const uint8_t> bytes, TimePoint now) {
  now_ = now;
  if (shutting_down_) return;
  link_.receive(bytes, now);
}

void DeskCore::tick(TimePoint now) {
  now_ = now;
  link_.tick(now);
}

void DeskCore::link_send(std::vector<uint8_t> bytes) { fx_.send(std::move(bytes)); }

void DeskCore::link_close(const std::string& reason) { fx_.close_link(reason); }

void DeskCore::session_started(const pr::PeerSession& peer, TimePoint) {
  server_name_ = peer.name;
  logger->info("audit: server connected: declared-name='{}' software='{}' identity='{}'", log::printable(peer.name),
               log::printable(peer.software), peer.verified.describe());
  ++stats_.sessions;
  DeskAudit a;
  a.kind = DeskAudit::Kind::kServerConnected;
  a.server = server_name_;
  fx_.audit(a);
  send_snapshot();
}

// The snapshot as this session may see it: the service status only with desk-service.
void DeskCore::send_snapshot() {
  ++stats_.snapshots_sent;
  if (snapshot_.service_rv != 0 && !link_.uses(pr::caps::kDeskService)) {
    pr::ReaderSnapshot plain = snapshot_;
    plain.service_rv = 0;
    link_.snapshot(plain);
    return;
  }
  link_.snapshot(snapshot_);
}

void DeskCore::session_ended(const std::string& reason, TimePoint) {
  logger->info("server session ended: {}", reason);
  DeskAudit a;
  a.kind = DeskAudit::Kind::kServerDisconnected;
  a.server = server_name_;
  a.reason = reason;
  fx_.audit(a);
  retire_all();
}

void DeskCore::readers(std::vector<pr::ReaderInfo> readers, TimePoint now, uint32_t service_rv) {
  now_ = now;
  if (readers == snapshot_.readers && service_rv == snapshot_.service_rv) return;
  if (service_rv != snapshot_.service_rv) {
    if (service_rv != 0) {
      logger->warn("the desk's PC/SC service fails ({}): no reader to show", sc::rv_text(service_rv));
    } else {
      logger->info("the desk's PC/SC service answers again");
    }
  }
  snapshot_.service_rv = service_rv;
  snapshot_.readers = std::move(readers);
  ++snapshot_.sequence;
  if (logger->should_log(spdlog::level::debug)) {
    for (const auto& r : snapshot_.readers) {
      logger->debug("reader '{}': {} ATR {} bytes", log::printable(r.name), sc::state_text(r.state), r.atr.size());
    }
  }
  if (!link_.established()) return;
  send_snapshot();
}

void DeskCore::shutdown(TimePoint now) {
  now_ = now;
  shutting_down_ = true;
  link_.transport_down(now);  // ends the session (retiring every lane); nothing more is sent
  retire_all();
}

// ---- requests -----------------------------------------------------------------------------

void DeskCore::received_request(uint32_t id, pr::Request&& r, TimePoint) {
  ++stats_.requests;
  if (r.op == pr::Op::kPing) {
    link_.reply(id, pr::Reply{});  // at once: the server's liveness check must not wait for a card
    return;
  }
  Lane* lane = lane_for(r, id);
  if (!lane) return;  // answered already
  unfinished_.insert(id);
  lane->queue.push_back(Task{id, std::move(r)});
  pump(*lane);
}

DeskCore::Lane* DeskCore::lane_for(const pr::Request& r, uint32_t id) {
  auto it = by_context_.find(r.context.value);
  if (r.op == pr::Op::kReleaseContext) {
    if (it == by_context_.end()) {
      link_.reply(id, pr::Reply{});  // no PC/SC context was ever made for it
      return nullptr;
    }
    // The lane finishes what the server sent before (pipelined requests), then releases
    // its PC/SC context and answers. A later context with the same id gets a new lane.
    Lane* lane = lanes_.at(it->second).get();
    by_context_.erase(it);
    return lane;
  }
  if (it != by_context_.end()) return lanes_.at(it->second).get();
  if (lanes_.size() >= config_.max_contexts) {
    ++stats_.refused_contexts;
    logger->warn("this server link already holds {} PC/SC contexts at the desk (the limit); refusing context {}",
                 lanes_.size(), r.context.value);
    pr::Reply reply;
    reply.rv = sc::kENoMemory;
    link_.reply(id, reply);
    return nullptr;
  }
  auto lane = std::make_unique<Lane>();
  lane->id = next_lane_++;
  lane->context = r.context.value;
  Lane* raw = lane.get();
  lanes_.emplace(raw->id, std::move(lane));
  by_context_.emplace(r.context.value, raw->id);
  return raw;
}

bool DeskCore::ordered(const Task& task) const {
  if (task.req.after.empty() || !link_.uses(pr::caps::kDeskOrdering)) return true;
  return std::none_of(task.req.after.begin(), task.req.after.end(), [&](uint32_t a) {
    // Only earlier requests count (serial-number order: ids wrap): waiting for a later one
    // could deadlock; an id never seen or already answered is not waited for.
    return static_cast<int32_t>(task.id - a) > 0 && unfinished_.contains(a);
  });
}

void DeskCore::task_done(uint32_t id) {
  if (!unfinished_.erase(id)) return;
  // Requests of other lanes may have been waiting for this one. Pumping one can finish and
  // close lanes (a ReleaseContext of a lane without a PC/SC context is answered at once):
  // walk a copy of the ids, not the map (found by fuzz_desk_core: a use after free).
  std::vector<LaneId> ids;
  ids.reserve(lanes_.size());
  for (const auto& [lid, lane] : lanes_) ids.push_back(lid);
  for (LaneId lid : ids) {
    auto it = lanes_.find(lid);
    if (it == lanes_.end()) continue;
    Lane& lane = *it->second;
    if (!lane.running && !lane.in_call && !lane.queue.empty()) pump(lane);
  }
}

void DeskCore::pump(Lane& lane) {
  if (lane.running || lane.in_call) return;
  if (lane.retired) return close_lane(lane);
  if (lane.queue.empty() || !ordered(lane.queue.front())) return;
  lane.running = true;
  start(lane, lane.queue.front());
}

void DeskCore::execute(Lane& lane, PcscCall c) {
  CARDBRIDGE_CHECK(!lane.in_call);
  lane.in_call = true;
  ++stats_.calls;
  fx_.execute(lane.id, std::move(c));
}

std::optional<ScardHandle> DeskCore::card_of(const Lane& lane, pr::DeskHandle h) const {
  auto it = handles_.find(h.value);
  if (it == handles_.end() || it->second.lane != lane.id) return std::nullopt;
  return it->second.card;
}

void DeskCore::audit_control_refused(uint32_t code) {
  DeskAudit a;
  a.kind = DeskAudit::Kind::kControlRefused;
  a.server = server_name_;
  a.code = code;
  fx_.audit(a);
}

void DeskCore::start(Lane& lane, Task& task) {
  const pr::Request& q = task.req;
  if (q.op == pr::Op::kReleaseContext) {
    if (!lane.ctx) return finish(lane, pr::Reply{});
    task.step = Task::Step::kRelease;
    return execute(lane, call::Release{*lane.ctx});
  }
  if (!lane.ctx) {
    task.step = Task::Step::kEstablish;
    return execute(lane, call::Establish{});
  }
  if (q.op == pr::Op::kEstablishContext) return finish(lane, pr::Reply{});
  if (q.op != pr::Op::kConnect) {
    auto card = card_of(lane, q.handle);
    if (!card) {
      pr::Reply r;
      r.rv = sc::kEInvalidHandle;
      return finish(lane, r);
    }
    task.card = *card;
  }
  // (A Connect has no card to lock yet: a deferred Begin on it is a server's error, ignored;
  // the card handle would be 0.)
  if ((q.flags & pr::request_flags::kBeginFirst) && q.op != pr::Op::kConnect &&
      link_.uses(pr::caps::kDeferredBegin) && task.step != Task::Step::kBegin &&
      task.step != Task::Step::kFeatures) {
    // A BeginTransaction the shim answered early: take the lock now, or report why not.
    task.step = Task::Step::kBegin;
    return execute(lane, call::Begin{task.card});
  }
  task.step = Task::Step::kOperation;
  pr::Reply refused;
  switch (q.op) {
    case pr::Op::kConnect:
      if (!config_.policy.reader_allowed(q.reader)) {
        DeskAudit a;
        a.kind = DeskAudit::Kind::kReaderRefused;
        a.server = server_name_;
        a.reader = q.reader;
        fx_.audit(a);
        refused.rv = sc::kEUnknownReader;
        return finish(lane, refused);
      }
      return execute(lane, call::Connect{*lane.ctx, q.reader, q.share_mode, q.protocols});
    case pr::Op::kReconnect:
      return execute(lane, call::Reconnect{task.card, q.share_mode, q.protocols, q.disposition});
    case pr::Op::kDisconnect:
      return execute(lane, call::Disconnect{task.card, q.disposition});
    case pr::Op::kBeginTransaction:
      return execute(lane, call::Begin{task.card});
    case pr::Op::kEndTransaction:
      return execute(lane, call::End{task.card, q.disposition});
    case pr::Op::kTransmit:
      return execute(lane, call::Transmit{task.card, q.protocols, q.data, q.recv_protocol, q.recv_length});
    case pr::Op::kControl: {
      const auto h = handles_.find(q.handle.value);
      const auto* announced = h != handles_.end() && h->second.features ? &*h->second.features : nullptr;
      switch (config_.policy.control_verdict(q.code, announced)) {
        case ControlVerdict::kAllowed:
          return execute(lane, call::Control{task.card, q.code, q.data, q.recv_length});
        case ControlVerdict::kNeedsFeatures:
          // Is it one of the PIN-pad codes this reader announces? Ask the reader once per
          // handle (the answer is the reader's, constant while the handle lives).
          task.step = Task::Step::kFeatures;
          return execute(lane, call::Control{task.card, kGetFeatureRequest, {}, kFeatureAnswerCapacity});
        case ControlVerdict::kRefused:
          break;
      }
      logger->info("control code 0x{:08X} refused by policy (allowed: {}; --allow-control)", q.code,
                   Policy::describe(config_.policy.control_allow));
      audit_control_refused(q.code);
      refused.rv = sc::kEUnsupportedFeature;
      return finish(lane, refused);
    }
    case pr::Op::kGetAttrib:
      return execute(lane, call::GetAttrib{task.card, q.code, q.recv_length});
    case pr::Op::kSetAttrib:
      if (!config_.policy.set_attrib_allowed(q.code)) {
        logger->info("SCardSetAttrib of attribute 0x{:08X} refused by policy (allowed: {}; --allow-set-attrib)", q.code,
                     Policy::describe(config_.policy.set_attrib_allow));
        refused.rv = sc::kEUnsupportedFeature;
        return finish(lane, refused);
      }
      return execute(lane, call::SetAttrib{task.card, q.code, q.data});
    case pr::Op::kStatus:
      return execute(lane, call::Status{task.card});
    default:
      refused.rv = sc::kEInvalidParameter;
      return finish(lane, refused);
  }
}

void DeskCore::call_done(LaneId id, CallResult r, TimePoint now) {
  now_ = now;
  auto it = lanes_.find(id);
  CARDBRIDGE_CHECK(it != lanes_.end() && it->second->in_call);
  Lane& lane = *it->second;
  lane.in_call = false;
  if (lane.releasing) {  // the retirement's release is done
    lane.ctx.reset();
    return close_lane(lane);
  }
  if (lane.retired) {
    // The session is gone: nobody expects this answer. The lane's context (with whatever
    // handle the call made in it) is released by close_lane().
    const Task& t = lane.queue.front();
    const bool made = t.step == Task::Step::kEstablish || (t.step == Task::Step::kReestablish && t.reestablish == 2);
    const bool released = t.step == Task::Step::kRelease || (t.step == Task::Step::kReestablish && t.reestablish == 1);
    if (made && r.rv == sc::kSuccess) lane.ctx = r.ctx;
    if (released) lane.ctx.reset();
    return close_lane(lane);
  }
  CARDBRIDGE_CHECK(lane.running && !lane.queue.empty());
  advance(lane, lane.queue.front(), std::move(r));
}

void DeskCore::advance(Lane& lane, Task& task, CallResult r) {
  const pr::Request& q = task.req;
  switch (task.step) {
    case Task::Step::kEstablish:
      if (r.rv != sc::kSuccess) {
        logger->warn("cannot establish a PC/SC context: {}", sc::rv_text(r.rv));
        pr::Reply reply;
        reply.rv = r.rv;
        return finish(lane, reply);
      }
      lane.ctx = r.ctx;
      return start(lane, task);
    case Task::Step::kBegin:
      task.reply.begin_rv = r.rv;
      if (r.rv != sc::kSuccess) {
        task.reply.rv = r.rv;
        return finish(lane, std::move(task.reply));
      }
      return start(lane, task);
    case Task::Step::kRelease: {
      for (auto h = handles_.begin(); h != handles_.end();) {
        h = h->second.lane == lane.id ? handles_.erase(h) : std::next(h);
      }
      lane.ctx.reset();
      finish(lane, pr::Reply{});
      return;
    }
    case Task::Step::kReestablish:
      if (task.reestablish == 1) {  // the dead context is gone, and its card handles with it
        for (auto h = handles_.begin(); h != handles_.end();) {
          h = h->second.lane == lane.id ? handles_.erase(h) : std::next(h);
        }
        lane.ctx.reset();
        task.reestablish = 2;
        return execute(lane, call::Establish{});
      }
      if (r.rv != sc::kSuccess) return finish(lane, std::move(task.reply));  // the Connect's own error
      lane.ctx = r.ctx;
      task.step = Task::Step::kOperation;
      task.reestablish = 3;  // no second retry
      return execute(lane, call::Connect{*lane.ctx, q.reader, q.share_mode, q.protocols});
    case Task::Step::kStatus:
      if (r.rv == sc::kSuccess) {
        task.reply.state = r.state;
        task.reply.atr = std::move(r.atr);
        task.reply.card_protocol = r.protocol;
      }
      if (q.op == pr::Op::kConnect) {
        DeskAudit a;
        a.kind = DeskAudit::Kind::kCardConnected;
        a.server = server_name_;
        a.reader = q.reader;
        a.atr = task.reply.atr;
        a.share_mode = q.share_mode;
        fx_.audit(a);
      }
      return finish(lane, std::move(task.reply));
    case Task::Step::kSpeculate:
      if (!speculate(lane, task, &r)) finish(lane, std::move(task.reply));
      return;
    case Task::Step::kFeatures: {
      // A reader without features (or one that fails the request) announces none: its
      // PIN-pad codes are then refused like any code not on the allow-list.
      auto h = handles_.find(q.handle.value);
      if (h != handles_.end()) {
        h->second.features = r.rv == sc::kSuccess
                                 ? feature::parse_features(std::span<const uint8_t>(r.data).first(std::min<std::size_t>(r.length, r.data.size())))
                                 : std::vector<ReaderFeature>{};
      }
      return start(lane, task);  // decided again, with the list known
    }
    case Task::Step::kOperation:
      break;
  }

  // The request's own call is back.
  pr::Reply& reply = task.reply;
  reply.rv = r.rv;
  switch (q.op) {
    case pr::Op::kConnect: {
      if ((r.rv == sc::kENoService || r.rv == sc::kFCommError || r.rv == sc::kEInvalidHandle) && task.reestablish == 0) {
        // The desk's pcscd restarted since this context was made: its context (and handles)
        // died with the old daemon. Start over with a fresh context.
        logger->info("context {}: PC/SC service restarted ({}); new context", lane.context, sc::rv_text(r.rv));
        task.step = Task::Step::kReestablish;
        task.reestablish = 1;
        return execute(lane, call::Release{*lane.ctx});
      }
      logger->debug("connect '{}' share {} -> {}", log::printable(q.reader), q.share_mode, sc::rv_text(r.rv));
      if (r.rv != sc::kSuccess) return finish(lane, std::move(reply));
      uint32_t hid = next_handle_++;
      if (next_handle_ == 0) next_handle_ = 1;
      handles_[hid] = HandleEntry{lane.id, r.card};
      reply.handle = pr::DeskHandle{hid};
      reply.protocol = r.protocol;
      task.step = Task::Step::kStatus;
      return execute(lane, call::Status{r.card});
    }
    case pr::Op::kReconnect:
      if (r.rv != sc::kSuccess) return finish(lane, std::move(reply));
      reply.protocol = r.protocol;
      task.step = Task::Step::kStatus;
      return execute(lane, call::Status{task.card});
    case pr::Op::kDisconnect:
      if (r.rv == sc::kSuccess) {
        lane.tracks.erase(q.handle.value);
        handles_.erase(q.handle.value);
      }
      return finish(lane, std::move(reply));
    case pr::Op::kTransmit:
      reply.protocol = r.protocol;
      reply.length = r.length;
      reply.data = std::move(r.data);
      if (logger->should_log(spdlog::level::debug)) {
        logger->debug("transmit {} -> {} {}", redact::Command{q.data}, sc::rv_text(r.rv),
                      r.rv == sc::kSuccess ? redact::response(q.data, reply.data) : "");
      }
      if (r.rv == sc::kSuccess && speculate(lane, task, nullptr)) return;
      return finish(lane, std::move(reply));
    case pr::Op::kControl:
    case pr::Op::kGetAttrib:
      reply.length = r.length;
      reply.data = std::move(r.data);
      if (q.op == pr::Op::kControl) {
        logger->debug("control {} -> {}", redact::Control{q.code, q.data}, sc::rv_text(r.rv));
      }
      return finish(lane, std::move(reply));
    case pr::Op::kStatus:
      reply.reader = std::move(r.reader);
      reply.state = r.state;
      reply.protocol = r.protocol;
      reply.atr = std::move(r.atr);
      return finish(lane, std::move(reply));
    default:
      return finish(lane, std::move(reply));
  }
}

// Speculation (docs/performance.md, speculation.hpp): after a successful Transmit, when the
// shim asked for it (request flags) and the session negotiated it (capabilities), the
// commands the program will send next go to the card at once and their answers ride along
// with the reply. |last| is the previous speculative call's result (nullptr: the program's
// Transmit just came back). Returns true when a speculative call is under way.
bool DeskCore::speculate(Lane& lane, Task& task, const CallResult* last) {
  const pr::Request& q = task.req;
  CardTrack& track = lane.tracks[q.handle.value];
  const bool want_gr =
      (q.flags & pr::request_flags::kPrefetchGetResponse) && link_.uses(pr::caps::kPrefetchGetResponse);
  const bool want_ra = (q.flags & pr::request_flags::kReadAhead) && link_.uses(pr::caps::kReadAhead);
  auto send_speculative = [&](Bytes cmd) {
    task.step = Task::Step::kSpeculate;
    task.spec_command = cmd;
    ++stats_.speculative_calls;
    execute(lane, call::Transmit{task.card, q.protocols, std::move(cmd), q.recv_protocol, kSpeculativeCapacity});
    return true;
  };

  if (!last) {
    observe(track, q.data, task.reply.data);
    if (!want_gr && !want_ra) return false;
    const auto& first = task.reply.data;
    if (want_gr && first.size() == 2 && first[0] == 0x61) return send_speculative(get_response_for(q.data, first[1]));
  } else {
    if (last->rv != sc::kSuccess) return false;
    observe(track, task.spec_command, last->data, /*from_program=*/false);
    task.reply.prefetched.push_back(pr::Prefetched{task.spec_command, last->data});
    if (task.spec_reads_planned) {
      task.spec_bytes += last->data.size();
      // An error answer is served as it is, then nothing more is read.
      if (!is_9000(last->data) || task.spec_bytes > kMaxSpeculativeBytes) return false;
    }
  }

  if (!task.spec_reads_planned) {
    task.spec_reads_planned = true;
    if (!want_ra) return false;
    // Read-ahead: after a full READ BINARY chunk of a file whose size its FCP gave.
    auto rb = parse_read_binary(q.data);
    if (!rb) return false;
    const auto& first = task.reply.data;
    const bool full = first.size() == rb->le + 2 && is_9000(first);
    if (!full || !track.ef_size) return false;
    auto reads = predict_reads(rb->cla, rb->offset + rb->le, *track.ef_size, track.chunk);
    task.spec_reads.assign(std::make_move_iterator(reads.begin()), std::make_move_iterator(reads.end()));
  }
  if (task.spec_reads.empty()) return false;
  Bytes cmd = std::move(task.spec_reads.front());
  task.spec_reads.pop_front();
  return send_speculative(std::move(cmd));
}

void DeskCore::finish(Lane& lane, pr::Reply reply) {
  CARDBRIDGE_CHECK(lane.running && !lane.queue.empty());
  const uint32_t id = lane.queue.front().id;
  const bool release = lane.queue.front().req.op == pr::Op::kReleaseContext;
  lane.queue.pop_front();
  lane.running = false;
  link_.reply(id, reply);
  if (release) {
    close_lane(lane);  // the server released it: no context left, nothing queued behind
    task_done(id);
    return;
  }
  const LaneId lid = lane.id;
  task_done(id);
  if (auto it = lanes_.find(lid); it != lanes_.end()) pump(*it->second);
}

void DeskCore::retire_all() {
  unfinished_.clear();
  handles_.clear();
  by_context_.clear();
  std::vector<LaneId> ids;
  for (const auto& [id, lane] : lanes_) ids.push_back(id);
  for (LaneId id : ids) {
    if (auto it = lanes_.find(id); it != lanes_.end()) retire(*it->second);
  }
}

void DeskCore::retire(Lane& lane) {
  if (lane.retired) return;
  lane.retired = true;
  // Queued requests never run; the one at the edge finishes there, unanswered.
  if (lane.running && lane.in_call) {
    Task current = std::move(lane.queue.front());
    lane.queue.clear();
    lane.queue.push_back(std::move(current));
  } else {
    lane.queue.clear();
    lane.running = false;
  }
  if (!lane.in_call) close_lane(lane);
}

// Releases the lane's PC/SC context (pcscd disconnects its handles, resetting the card
// where this context held a transaction or exclusive access: nothing leaks to the next
// user), then forgets the lane.
void DeskCore::close_lane(Lane& lane) {
  if (lane.in_call) return;  // call_done() comes back here
  if (lane.ctx) {
    lane.releasing = true;
    lane.running = false;
    lane.queue.clear();
    return execute(lane, call::Release{*lane.ctx});
  }
  const LaneId id = lane.id;
  for (auto it = by_context_.begin(); it != by_context_.end();) {
    it = it->second == id ? by_context_.erase(it) : std::next(it);
  }
  lanes_.erase(id);
  fx_.lane_closed(id);
}

}  // namespace cardbridge::client
