// DeskCore: the server link and the lanes that carry its requests (docs/architecture.md).
#include "cardbridge/desk_core/desk_core.hpp"

#include <algorithm>

#include "desk_core_parts.hpp"

namespace cardbridge::client {

using namespace desk_detail;

namespace {

pr::LinkSettings link_settings(const DeskConfig& c) {
  pr::LinkSettings s;
  s.role = pr::Role::kDesk;
  // No card image offered when it is off (image:off, --no-card-image, desk.conf card-image = off).
  s.capabilities = c.card_image ? c.capabilities : c.capabilities & ~pr::caps::kCardImage;
  s.software = fmt::format("{} {}", c.software, CARDBRIDGE_VERSION);
  s.name = c.desk_name;
  s.hello_retry = c.hello_retry;
  s.random_seed = c.random_seed;
  s.peer_policy = c.server_policy;
  return s;
}

}  // namespace

DeskCore::DeskCore(DeskEffects& effects, DeskConfig config)
    : fx_(effects), config_(std::move(config)), link_(*this, link_settings(config_)),
      images_(config_.images ? config_.images : std::make_shared<ImageStore>()) {
  if (!config_.card_image) config_.capabilities &= ~pr::caps::kCardImage;
}

DeskCore::~DeskCore() { images_->forget_owner(this); }

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
  if (config_.card_image && link_.established()) publish_readers();
  std::vector<std::string> due;
  for (auto& [reader, im] : imaging_) {
    if (!im->in_call && im->wait_until && *im->wait_until <= now) due.push_back(reader);
  }
  for (const auto& reader : due) {
    if (auto it = imaging_.find(reader); it != imaging_.end()) pump_imaging(*it->second);
  }
  consider_imaging();
}

std::optional<TimePoint> DeskCore::next_deadline() const {
  std::optional<TimePoint> due = link_.next_deadline();
  auto sooner = [&](std::optional<TimePoint> t) {
    if (t && (!due || *t < *due)) due = t;
  };
  sooner(imaging_wake_);
  for (const auto& [reader, im] : imaging_) {
    if (!im->in_call) sooner(im->wait_until);
  }
  return due;
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
  publish_busy();
}

void DeskCore::readers(std::vector<pr::ReaderInfo> readers, TimePoint now, uint32_t service_rv) {
  now_ = now;
  if (readers == monitor_readers_ && service_rv == snapshot_.service_rv) return;
  const bool service_changed = service_rv != snapshot_.service_rv;
  if (service_changed) {
    if (service_rv != 0) {
      logger->warn("the desk's PC/SC service fails ({}): no reader to show", sc::rv_text(service_rv));
    } else {
      logger->info("the desk's PC/SC service answers again");
    }
    snapshot_.service_rv = service_rv;
  }
  for (const auto& r : readers) {
    const bool present = (r.state & sc::kStatePresent) != 0;
    images_->card_event(r.name, present ? r.event_count : 0xFFFFFFFFu);
    auto w = watches_.find(r.name);
    if (w != watches_.end() && (!present || w->second->event_count != r.event_count)) watches_.erase(w);
    if (auto im = imaging_.find(r.name); im != imaging_.end() && im->second->imager->event_count() != r.event_count)
      im->second->imager->yield();  // another card: what it reads now is of no use
    auto prev = std::find_if(monitor_readers_.begin(), monitor_readers_.end(),
                             [&](const auto& x) { return x.name == r.name; });
    if (prev == monitor_readers_.end() || prev->state != r.state || prev->event_count != r.event_count)
      schedule_[r.name].wait_for_change = false;  // a busy card may be free now
  }
  std::erase_if(watches_, [&](const auto& w) {
    return std::none_of(readers.begin(), readers.end(), [&](const auto& r) { return r.name == w.first; });
  });
  monitor_readers_ = std::move(readers);
  if (logger->should_log(spdlog::level::debug)) {
    for (const auto& r : monitor_readers_) {
      logger->debug("reader '{}': {} ATR {} bytes", log::printable(r.name), sc::state_text(r.state), r.atr.size());
    }
  }
  publish_readers(service_changed);
  consider_imaging();
}

void DeskCore::publish_readers(bool service_changed) {
  auto readers = monitor_readers_;
  if (config_.card_image) {
    for (auto& r : readers) {
      if (r.state & sc::kStatePresent) r.image = images_->state(r.name, r.event_count);
    }
  }
  if (readers == snapshot_.readers && !service_changed) return;
  snapshot_.readers = std::move(readers);
  ++snapshot_.sequence;
  if (!link_.established()) return;
  send_snapshot();
}

void DeskCore::shutdown(TimePoint now) {
  now_ = now;
  shutting_down_ = true;
  link_.transport_down(now);  // ends the session (retiring every lane); nothing more is sent
  retire_all();
  std::vector<std::string> readers;
  for (auto& [reader, im] : imaging_) readers.push_back(reader);
  for (const auto& reader : readers) {
    auto it = imaging_.find(reader);
    if (it == imaging_.end()) continue;
    it->second->imager->yield();
    if (!it->second->in_call) pump_imaging(*it->second);
  }
}

// ---- requests -----------------------------------------------------------------------------

void DeskCore::received_request(uint32_t id, pr::Request&& r, TimePoint) {
  ++stats_.requests;
  if (r.op == pr::Op::kPing) {
    link_.reply(id, pr::Reply{});  // at once: the server's liveness check must not wait for a card
    return;
  }
  if (const std::string* reader = reader_of(r)) touch(*reader);
  // Another link of this desk may have read or dropped an image meanwhile: this server
  // hears of it before the answer to its request.
  if (config_.card_image) publish_readers();
  Lane* lane = lane_for(r, id);
  if (!lane) return;  // answered already
  unfinished_.insert(id);
  lane->queue.push_back(Task{id, std::move(r)});
  publish_busy();
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
  if (const auto& q = lane.queue.front().req; q.op == pr::Op::kConnect && q.share_mode == sc::kShareExclusive) {
    // An exclusive Connect would fail while the imaging holds the card: it waits for the
    // imaging to let go (it yields at once, after the call in flight).
    if (auto im = imaging_.find(q.reader); im != imaging_.end() && im->second->imager->holds_card()) return;
  }
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
  // the card handle would be 0.) |begun|: start() runs again after the Begin, after the
  // reader's feature list (kFeatures) and after each prelude command; the lock is taken once.
  if ((q.flags & pr::request_flags::kBeginFirst) && q.op != pr::Op::kConnect &&
      link_.uses(pr::caps::kDeferredBegin) && !task.begun) {
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
      if (!q.prelude.empty() && link_.uses(pr::caps::kCardImage) && task.prelude_i < q.prelude.size()) {
        task.step = Task::Step::kPrelude;
        ++stats_.prelude_commands;
        return execute(lane, call::Transmit{task.card, q.protocols, q.prelude[task.prelude_i], q.recv_protocol,
                                            kSpeculativeCapacity});
      }
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
  if (auto il = imaging_lanes_.find(id); il != imaging_lanes_.end()) {
    auto im = imaging_.find(il->second);
    CARDBRIDGE_CHECK(im != imaging_.end() && im->second->in_call);
    return imaging_call_done(*im->second, std::move(r));
  }
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


}  // namespace cardbridge::client
