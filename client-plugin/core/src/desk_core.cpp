#include "cardbridge/desk_core/desk_core.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "cardbridge/card_image/image.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/check.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/support/redact.hpp"
#include "cardbridge/support/scard.hpp"

namespace cardbridge::client {

namespace sc = cardbridge::scard;
namespace pr = cardbridge::protocol;
namespace ci = cardbridge::card_image;

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
    kPrelude,       // a Transmit's prelude (card image): one of the SELECTs before the command
    kImageCheck,    // a Connect with kWantImage: the card's update marker read again
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
  bool begun = false;     // the deferred Begin was made
  // The card image.
  std::size_t prelude_i = 0;
  std::optional<ImageStore::Held> image;  // Connect: the image to send
  std::vector<Bytes> check_cmds;          // Connect: Begin, these (SELECT, READs), End
  std::size_t check_i = 0;                // 0: Begin; 1..n: check_cmds; n+1: End
  Bytes check_data;
  bool check_ok = true;
};

// What programs did to the card in a reader (one insertion): the current file of each
// channel, with what its FCP said, and whether a PIN was presented since the card was last
// reset. The learning side of the card image.
struct DeskCore::CardWatch {
  uint32_t event_count = 0;
  Bytes atr;
  bool secure = false;  // a VERIFY (or authentication) succeeded since insertion or reset
  struct Channel {
    std::optional<ImageKey> key;
    std::optional<ci::FileInfo> info;
    bool awaiting_fcp = false;  // the SELECT said 61xx: its FCP comes with GET RESPONSE
  };
  std::array<Channel, 20> channels;
};

// One imaging pass, on a lane of its own.
struct DeskCore::Imaging {
  LaneId lane = 0;
  std::unique_ptr<Imager> imager;
  bool in_call = false;
  bool voided = false;  // the image was dropped meanwhile: keep nothing of this pass
  uint64_t activity = 0;  // the reader's program activity (every link's) when the pass began
  std::optional<TimePoint> wait_until;
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
      task.begun = true;
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
        if (q.op == pr::Op::kReconnect && (q.disposition == sc::kResetCard || q.disposition == sc::kUnpowerCard)) {
          if (auto h = handles_.find(q.handle.value); h != handles_.end()) card_reset_seen(h->second.reader);
        }
      }
      if (q.op == pr::Op::kConnect) {
        // Audited before any image check (the card is connected either way).
        DeskAudit a;
        a.kind = DeskAudit::Kind::kCardConnected;
        a.server = server_name_;
        a.reader = q.reader;
        a.atr = task.reply.atr;
        a.share_mode = q.share_mode;
        fx_.audit(a);
        if (r.rv == sc::kSuccess && (q.flags & pr::request_flags::kWantImage) && start_image_check(lane, task)) return;
      }
      return finish(lane, std::move(task.reply));
    case Task::Step::kPrelude: {
      const Bytes& cmd = q.prelude[task.prelude_i];
      if (r.rv != sc::kSuccess) {  // the card is gone (or worse): the program gets that
        task.reply.rv = r.rv;
        return finish(lane, std::move(task.reply));
      }
      const auto* entry = handles_.contains(q.handle.value) ? &handles_.at(q.handle.value) : nullptr;
      if (entry) observe_card(entry->reader, cmd, r, /*program=*/false);
      CardTrack& track = lane.tracks[q.handle.value];
      observe(track, cmd, r.data, /*from_program=*/false);
      if (entry && ci::more_data(r.data)) {
        // The FCP of a SELECT the shim answered from the image: the desk's copy has it
        // (read-ahead needs the file's size).
        if (const auto* info = reader_info(entry->reader)) {
          if (auto held = images_->image(entry->reader, info->event_count)) {
            ci::ImageIndex index(std::move(held->image));
            if (const auto* s = index.select(cmd)) {
              if (auto fi = ci::parse_fcp(ci::ImageIndex::fcp_data(*s))) track.ef_size = fi->size;
            }
          }
        }
      }
      task.reply.prelude_answers.push_back(std::move(r.data));
      if (!ci::success(task.reply.prelude_answers.back())) {
        // The card did not take it: the program's command must not run in a state it does
        // not expect. The shim sees the short list of answers.
        return finish(lane, std::move(task.reply));
      }
      ++task.prelude_i;
      return start(lane, task);
    }
    case Task::Step::kImageCheck: {
      const std::size_t n = task.check_cmds.size();
      if (task.check_i == 0 || task.check_i == n + 1) {  // Begin / End
        if (r.rv != sc::kSuccess) task.check_ok = false;
      } else {
        const Bytes& cmd = task.check_cmds[task.check_i - 1];
        if (r.rv != sc::kSuccess || ci::status_word(r.data) != 0x9000) {
          if (task.check_i != 1 || r.rv != sc::kSuccess || !ci::success(r.data)) task.check_ok = false;
        } else if (ci::read_binary(cmd)) {
          task.check_data.insert(task.check_data.end(), r.data.begin(), r.data.end() - 2);
        }
        if (task.check_i == 1 && task.image) {
          // The SELECT must be answered as the image recorded it.
          ci::ImageIndex index(task.image->image);
          const auto* s = index.select(cmd);
          if (!s || s->response != r.data) task.check_ok = false;
        }
      }
      if (task.check_i == 0 && !task.check_ok) {  // no transaction: send nothing
        task.image.reset();
        return finish(lane, std::move(task.reply));
      }
      if (task.check_i <= n && !task.check_ok) task.check_i = n;  // straight to End
      ++task.check_i;
      if (task.check_i <= n) {
        return execute(lane, call::Transmit{task.card, task.reply.protocol, task.check_cmds[task.check_i - 1],
                                            task.reply.protocol, kSpeculativeCapacity});
      }
      if (task.check_i == n + 1) return execute(lane, call::End{task.card, sc::kLeaveCard});
      // Done: the marker as the image has it?
      const std::string reader = q.reader;
      ci::ImageIndex index(task.image->image);
      auto marker = Imager::update_marker(task.image->atr, task.image->image);
      const Bytes* held = marker ? index.file(*marker) : nullptr;
      if (task.check_ok && held && *held == task.check_data) {
        images_->mark_checked(reader, now_);
        attach_image(task);
      } else {
        task.image.reset();
        void_image(reader, "its card's update marker changed (or could not be read)");
      }
      return finish(lane, std::move(task.reply));
    }
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
      handles_[hid] = HandleEntry{lane.id, r.card, q.reader};
      reply.handle = pr::DeskHandle{hid};
      reply.protocol = r.protocol;
      task.card = r.card;
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
        if (auto h = handles_.find(q.handle.value); h != handles_.end()) {
          if (q.disposition == sc::kResetCard || q.disposition == sc::kUnpowerCard) card_reset_seen(h->second.reader);
        }
        lane.tracks.erase(q.handle.value);
        handles_.erase(q.handle.value);
      }
      return finish(lane, std::move(reply));
    case pr::Op::kEndTransaction:
      if (r.rv == sc::kSuccess && (q.disposition == sc::kResetCard || q.disposition == sc::kUnpowerCard)) {
        if (auto h = handles_.find(q.handle.value); h != handles_.end()) card_reset_seen(h->second.reader);
      }
      return finish(lane, std::move(reply));
    case pr::Op::kTransmit:
      if (auto h = handles_.find(q.handle.value); h != handles_.end()) observe_card(h->second.reader, q.data, r, true);
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
        // A reader control may present a PIN (PIN pad) or reach the card otherwise.
        if (r.rv == sc::kSuccess) {
          if (auto h = handles_.find(q.handle.value); h != handles_.end()) {
            if (auto w = watches_.find(h->second.reader); w != watches_.end()) {
              w->second->secure = true;
              w->second->channels = {};
            }
          }
        }
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
    if (auto h = handles_.find(q.handle.value); h != handles_.end())
      observe_card(h->second.reader, task.spec_command, *last, /*program=*/false);
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
    publish_busy();
    consider_imaging();
    return;
  }
  const LaneId lid = lane.id;
  task_done(id);
  if (auto it = lanes_.find(lid); it != lanes_.end()) pump(*it->second);
  publish_busy();
  consider_imaging();  // the card this request used may be left alone now
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

// ---- the card image ------------------------------------------------------------------------

const std::string* DeskCore::reader_of(const pr::Request& r) const {
  switch (r.op) {
    case pr::Op::kConnect:
      return &r.reader;
    case pr::Op::kPing:
    case pr::Op::kEstablishContext:
    case pr::Op::kReleaseContext:
      return nullptr;
    default: {
      auto it = handles_.find(r.handle.value);
      return it == handles_.end() ? nullptr : &it->second.reader;
    }
  }
}

const pr::ReaderInfo* DeskCore::reader_info(const std::string& reader) const {
  for (const auto& r : monitor_readers_) {
    if (r.name == reader) return &r;
  }
  return nullptr;
}

uint32_t DeskCore::image_state(const std::string& reader) const {
  const auto* info = reader_info(reader);
  if (!info || !(info->state & sc::kStatePresent)) return pr::image_state::kNone;
  return images_->state(reader, info->event_count);
}

void DeskCore::touch(const std::string& reader) {
  if (!config_.card_image) return;
  images_->program_activity(reader);  // an imaging pass of another link yields too
  schedule_[reader].not_before = now_ + config_.image_idle_delay;
  auto it = imaging_.find(reader);
  if (it == imaging_.end() || it->second->imager->yielding()) return;
  logger->debug("reader '{}': a program wants the card; the imaging yields", log::printable(reader));
  it->second->imager->yield();
  if (!it->second->in_call) pump_imaging(*it->second);
}

void DeskCore::publish_busy() {
  if (!config_.card_image) return;
  std::set<std::string> readers;
  for (const auto& r : monitor_readers_) readers.insert(r.name);
  for (const auto& [id, h] : handles_) readers.insert(h.reader);
  for (const auto& reader : readers) images_->set_busy(reader, this, session_busy(reader));
}

bool DeskCore::session_busy(const std::string& reader) const {
  for (const auto& [id, h] : handles_) {
    if (h.reader == reader) return true;
  }
  for (const auto& [lid, lane] : lanes_) {
    for (const auto& t : lane->queue) {
      if (t.req.op == pr::Op::kConnect && t.req.reader == reader) return true;
    }
  }
  return false;
}

void DeskCore::consider_imaging() {
  imaging_wake_.reset();
  if (!config_.card_image || shutting_down_) return;
  for (const auto& r : monitor_readers_) {
    if (imaging_.contains(r.name)) continue;
    if (!(r.state & sc::kStatePresent) || (r.state & (sc::kStateMute | sc::kStateUnavailable | sc::kStateUnknown)) ||
        r.atr.empty())
      continue;
    // A desk program holding the card exclusively, or a program of this server using it.
    if ((r.state & sc::kStateExclusive) || session_busy(r.name) || images_->busy_elsewhere(r.name, this)) continue;
    ImagePlan plan = images_->plan(r.atr);
    if (plan.empty()) continue;  // nothing learned yet for cards of this type
    auto held = images_->image(r.name, r.event_count);
    if (held && held->complete && held->plan_version >= plan.version) continue;
    const auto& sched = schedule_[r.name];
    if (now_ < sched.not_before) {
      if (!imaging_wake_ || sched.not_before < *imaging_wake_) imaging_wake_ = sched.not_before;
      continue;
    }
    if (!images_->claim(r.name, this)) continue;  // another link of this desk is reading it
    auto im = std::make_unique<Imaging>();
    im->lane = next_lane_++;
    im->activity = images_->activity(r.name);
    logger->info("reader '{}': reading the card's image ({} SELECTs and {} files learned for its type{})",
                 log::printable(r.name), plan.selects.size(), plan.reads.size(),
                 held ? ", continuing" : "");
    std::optional<pr::CardImage> start;
    if (held) start = std::move(held->image);
    im->imager = std::make_unique<Imager>(r.name, r.event_count, r.atr, std::move(plan), std::move(start),
                                          config_.imager);
    ++stats_.image_passes;
    imaging_lanes_[im->lane] = r.name;
    Imaging& ref = *im;
    imaging_.emplace(r.name, std::move(im));
    pump_imaging(ref);
  }
}

void DeskCore::pump_imaging(Imaging& im) {
  CARDBRIDGE_CHECK(!im.in_call);
  im.wait_until.reset();
  // A program of any link of this desk asked for the card since the pass began: yield.
  if (!im.imager->yielding() && images_->activity(im.imager->reader()) != im.activity) im.imager->yield();
  auto action = im.imager->next(now_);
  if (auto* c = std::get_if<PcscCall>(&action)) {
    im.in_call = true;
    ++stats_.calls;
    if (std::holds_alternative<call::Transmit>(*c)) ++stats_.image_apdus;
    fx_.execute(im.lane, std::move(*c));
    return;
  }
  if (auto* w = std::get_if<Imager::Wait>(&action)) {
    im.wait_until = w->until;
    return;
  }
  finish_imaging(im.imager->reader());
}

void DeskCore::imaging_call_done(Imaging& im, CallResult r) {
  im.in_call = false;
  const auto before = im.imager->image().selects.size() + im.imager->image().files.size();
  im.imager->result(r, now_);
  const auto& image = im.imager->image();
  if (!im.voided && image.selects.size() + image.files.size() != before &&
      im.imager->outcome() != Imager::Outcome::kCardChanged) {
    // What is read is usable at once (a program may connect in the middle of the pass).
    ImageStore::Held held;
    held.event_count = im.imager->event_count();
    held.atr = im.imager->atr();
    held.image = image;
    held.plan_version = im.imager->plan_version();
    held.checked = now_;
    images_->put(im.imager->reader(), std::move(held));
    publish_readers();
  }
  pump_imaging(im);
}

void DeskCore::finish_imaging(const std::string& reader) {
  auto it = imaging_.find(reader);
  CARDBRIDGE_CHECK(it != imaging_.end());
  std::unique_ptr<Imaging> im = std::move(it->second);
  imaging_.erase(it);
  imaging_lanes_.erase(im->lane);
  images_->release(reader, this);
  const Imager& imager = *im->imager;
  for (const auto& key : imager.restricted()) images_->forget_read(imager.atr(), key);
  auto& sched = schedule_[reader];
  const auto outcome = imager.outcome();
  auto keep = [&](bool complete) {
    if (im->voided) return;
    const auto& image = imager.image();
    if (image.selects.empty() && image.files.empty()) return;
    ImageStore::Held held;
    held.event_count = imager.event_count();
    held.atr = imager.atr();
    held.image = image;
    held.image.complete = complete;
    held.plan_version = imager.plan_version();
    held.complete = complete;
    held.checked = now_;
    images_->put(reader, std::move(held));
  };
  auto back_off = [&] {
    sched.backoff = std::clamp(sched.backoff * 2, std::chrono::milliseconds{2000}, std::chrono::milliseconds{30000});
    sched.not_before = now_ + sched.backoff;
  };
  switch (outcome) {
    case Imager::Outcome::kComplete:
      keep(true);
      sched.backoff = {};
      logger->info("reader '{}': card image complete ({} SELECT answers, {} files, {} APDUs in this pass)",
                   log::printable(reader), imager.image().selects.size(), imager.image().files.size(),
                   imager.apdus());
      break;
    case Imager::Outcome::kYielded:
    case Imager::Outcome::kRunning:
      keep(false);
      logger->debug("reader '{}': imaging paused for a program ({} APDUs)", log::printable(reader), imager.apdus());
      break;
    case Imager::Outcome::kBusy:
      keep(false);
      back_off();
      logger->info("reader '{}': the card is held by another desk program; imaging again in {} ms",
                   log::printable(reader), sched.backoff.count());
      break;
    case Imager::Outcome::kFailed:
      keep(false);
      back_off();
      logger->info("reader '{}': imaging stopped by a PC/SC error; again in {} ms", log::printable(reader),
                   sched.backoff.count());
      break;
    case Imager::Outcome::kCardChanged:
      void_image(reader, "the card is not the one it was read from, or it changed while it was read");
      back_off();
      break;
  }
  fx_.lane_closed(im->lane);
  publish_readers();
  for (auto& [lid, lane] : lanes_) {
    if (!lane->running && !lane->in_call && !lane->queue.empty()) pump(*lane);  // an exclusive Connect may wait
  }
  consider_imaging();
}

void DeskCore::void_image(const std::string& reader, const char* why) {
  if (images_->void_image(reader)) {
    ++stats_.images_voided;
    logger->info("reader '{}': card image dropped: {}", log::printable(reader), why);
  }
  if (auto it = imaging_.find(reader); it != imaging_.end()) {
    it->second->voided = true;
    it->second->imager->yield();
  }
  publish_readers();
}

void DeskCore::card_reset_seen(const std::string& reader) {
  if (auto w = watches_.find(reader); w != watches_.end()) {
    w->second->secure = false;
    w->second->channels = {};
  }
}

void DeskCore::observe_card(const std::string& reader, std::span<const uint8_t> command, const CallResult& r,
                            bool program) {
  if (!config_.card_image || r.rv != sc::kSuccess || command.size() < 4) return;
  const auto* info = reader_info(reader);
  if (!info || !(info->state & sc::kStatePresent)) return;
  auto& w = watches_[reader];
  if (!w || w->event_count != info->event_count) {
    w = std::make_unique<CardWatch>();
    w->event_count = info->event_count;
    w->atr = info->atr;
  }
  const Bytes& resp = r.data;
  if (ci::may_modify(command)) {
    void_image(reader, "a command that may modify the card reached it");
    w->channels = {};
    return;
  }
  if (ci::raises_security(command, resp)) w->secure = true;
  const auto chn = ci::channel_of(command[0]);
  const bool gr = ci::is_get_response(command);
  if (!gr) {
    for (auto& ch : w->channels) ch.awaiting_fcp = false;
  }
  if (ci::loses_track(command, resp)) {
    if (command[1] == ci::kInsManageChannel || !chn) {
      w->channels = {};
    } else {
      w->channels[*chn] = {};
    }
    return;
  }
  if (ci::is_select(command)) {
    const auto outcome = ci::select_outcome(resp);
    const auto key = ci::select_key(command);
    const bool stateless_refusal =
        outcome == ci::SelectOutcome::kRefused && resp.size() == 2 &&
        (ci::status_word(resp) == 0x6E00 || ci::status_word(resp) == 0x6D00);
    if (program && ((key && outcome != ci::SelectOutcome::kUnclear) || stateless_refusal))
      images_->learn_select(w->atr, command);
    if (outcome == ci::SelectOutcome::kSelected && key && chn) {
      auto& ch = w->channels[*chn];
      ch = {};
      ch.key = key;
      if (resp.size() > 2 && ci::status_word(resp) == 0x9000)
        ch.info = ci::parse_fcp(std::span<const uint8_t>(resp.data(), resp.size() - 2));
      ch.awaiting_fcp = ci::more_data(resp);
    }
    return;
  }
  if (!chn) return;
  auto& ch = w->channels[*chn];
  if (gr) {
    if (ch.awaiting_fcp && resp.size() > 2 && ci::status_word(resp) == 0x9000)
      ch.info = ci::parse_fcp(std::span<const uint8_t>(resp.data(), resp.size() - 2));
    ch.awaiting_fcp = false;
    return;
  }
  auto rb = ci::read_binary(command);
  if (!rb || !program || !ch.key || !ch.info || ci::status_word(resp) != 0x9000) return;
  // Public: its FCP says READ BINARY needs nothing, or (no security attributes in the FCP)
  // the program read it before any PIN was presented on this card.
  const bool public_file = ch.info->read == ci::ReadAccess::kAlways ||
                           (ch.info->read == ci::ReadAccess::kUnknown && !w->secure);
  if (public_file && ch.info->transparent_ef && ch.info->size)
    images_->learn_read(w->atr, *ch.key, *ch.info->size, rb->le);
}

bool DeskCore::start_image_check(Lane& lane, Task& task) {
  const pr::Request& q = task.req;
  if (!config_.card_image || !link_.uses(pr::caps::kCardImage)) return false;
  const uint32_t event_count = (task.reply.state >> 16) & 0xFFFF;
  auto held = images_->image(q.reader, event_count);
  if (!held || (held->image.selects.empty() && held->image.files.empty())) return false;
  task.image = std::move(held);
  const auto marker = Imager::update_marker(task.image->atr, task.image->image);
  ci::ImageIndex index(task.image->image);
  const auto* way = marker ? index.way_to(*marker) : nullptr;
  const Bytes* content = marker ? index.file(*marker) : nullptr;
  if (!way || !content || now_ - task.image->checked < config_.image_recheck_after) {
    attach_image(task);
    return false;
  }
  // The image is old: read the card's update marker again before it goes.
  task.check_cmds = {way->command};
  const uint8_t ch = ci::key_channel(*marker);
  const uint8_t cla = ch < 4 ? ch : static_cast<uint8_t>(0x40 | (ch - 4));
  for (std::size_t off = 0; off < content->size(); off += 256) {
    const std::size_t n = std::min<std::size_t>(256, content->size() - off);
    task.check_cmds.push_back(Bytes{cla, ci::kInsReadBinary, static_cast<uint8_t>(off >> 8),
                                    static_cast<uint8_t>(off & 0xFF), static_cast<uint8_t>(n == 256 ? 0 : n)});
  }
  task.check_i = 0;
  task.step = Task::Step::kImageCheck;
  execute(lane, call::Begin{task.card});
  return true;
}

void DeskCore::attach_image(Task& task) {
  if (!task.image) return;
  const std::string& reader = task.req.reader;
  pr::CardImage image = std::move(task.image->image);
  image.complete = images_->state(reader, image.event_count) == pr::image_state::kComplete;
  logger->info("reader '{}': card image sent with the Connect reply ({} SELECT answers, {} files{})",
               log::printable(reader), image.selects.size(), image.files.size(), image.complete ? "" : ", partial");
  task.reply.image = std::move(image);
  task.image.reset();
  ++stats_.images_sent;
}

}  // namespace cardbridge::client
