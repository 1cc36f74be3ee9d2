#include "core/desk_engine.hpp"

#include <algorithm>
#include <deque>
#include <random>

#include <fmt/format.h>

#include "cardbridge/protocol/codec.hpp"
#include "cardbridge/protocol/version.hpp"
#include "cardbridge/support/log.hpp"
#include "cardbridge/support/redact.hpp"
#include "cardbridge/support/scard.hpp"
#include "core/speculation.hpp"

namespace cardbridge::client {

namespace sc = cardbridge::scard;
namespace pr = cardbridge::protocol;
using namespace std::chrono_literals;

namespace {

std::shared_ptr<spdlog::logger> logger() {
  static auto l = log::get("cardbridge.desk");
  return l;
}

constexpr const char* kPnpReader = "\\\\?PnP?\\Notification";
// SCARD_STATE_* bits that describe a reader (the rest are call mechanics).
constexpr uint32_t kReportedStateBits = sc::kStateUnknown | sc::kStateUnavailable | sc::kStateEmpty |
                                        sc::kStatePresent | sc::kStateExclusive | sc::kStateInUse |
                                        sc::kStateMute | sc::kStateUnpowered;

uint64_t random64() {
  std::random_device rd;
  return (uint64_t{rd()} << 32) | rd();
}

}  // namespace

struct DeskEngine::Worker {
  uint32_t id = 0;
  uint64_t session = 0;
  std::mutex m;
  std::condition_variable cv;
  std::deque<Task> queue;
  bool closing = false;
  std::atomic<bool> retired{false};  // closing, readable without m (desk-ordering waits)
  // Touched only by the worker thread (a PC/SC context is used from one thread only).
  bool has_ctx = false;
  ScardContext ctx = 0;
  uint64_t caps = 0;                    // negotiated for the session
  std::map<uint32_t, CardTrack> tracks; // per desk handle: what speculation needs
  std::atomic<bool> finished{false};
  // Set (under m) by stop() when it gives up waiting: from then on the engine may be
  // destroyed, so the worker touches nothing of it (nor the CardApi) after its call returns.
  bool abandoned = false;
  // Inside a request (from taking it to answering it): a retired worker that is busy still
  // holds a thread and a PC/SC context, and counts towards max_contexts.
  std::atomic<bool> busy{false};
  std::thread thread;
};

DeskEngine::DeskEngine(CardApi& api, EngineConfig config, EngineIo io)
    : api_(api), config_(std::move(config)), io_(std::move(io)) {}

DeskEngine::~DeskEngine() { stop(); }

void DeskEngine::start() {
  std::lock_guard lock(mu_);
  if (started_) return;
  started_ = true;
  monitor_ = std::thread([this] { monitor_loop(); });
  timer_ = std::thread([this] { timer_loop(); });
}

void DeskEngine::stop() {
  std::vector<std::shared_ptr<Worker>> retired;
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    stopping_ = true;
    reset_session_locked(retired);
  }
  timer_cv_.notify_all();
  retire(std::move(retired));
  // The monitor may be between two calls when we cancel: cancel until it has left.
  if (monitor_.joinable()) {
    for (int i = 0; i < 500 && !monitor_done_; ++i) {
      if (monitor_has_ctx_) api_.cancel(monitor_ctx_);
      std::this_thread::sleep_for(10ms);
    }
    monitor_.join();
  }
  if (timer_.joinable()) timer_.join();
  // Workers blocked in a card call (a Begin waiting for another program's transaction)
  // get a bounded wait; then they are left to finish on their own.
  std::vector<std::shared_ptr<Worker>> all;
  {
    std::lock_guard lock(mu_);
    all = std::move(retiring_);
    retiring_.clear();
  }
  const auto deadline = std::chrono::steady_clock::now() + 2s;
  for (auto& w : all) {
    while (!w->finished && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(5ms);
    bool abandon = false;
    {
      std::lock_guard wl(w->m);  // the worker holds it while it touches the engine
      abandon = !w->finished;
      w->abandoned = abandon;
    }
    if (!abandon) {
      w->thread.join();
    } else {
      logger()->warn("context {} still busy in a card call at shutdown; leaving it", w->id);
      w->thread.detach();
      static std::mutex leaked_mu;
      static std::vector<std::shared_ptr<Worker>> leaked;  // keep its state alive
      std::lock_guard ll(leaked_mu);
      leaked.push_back(w);
    }
  }
}

// ---- transport events -------------------------------------------------------------------

void DeskEngine::transport_up() {
  std::vector<std::shared_ptr<Worker>> retired;
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;  // stopped for good
    reset_session_locked(retired);
    transport_up_ = true;
    local_instance_ = random64();
    hello_due_ = std::chrono::steady_clock::now() + config_.hello_retry;
  }
  retire(std::move(retired));
  send_hello(false);
  timer_cv_.notify_all();
}

void DeskEngine::transport_down() {
  std::vector<std::shared_ptr<Worker>> retired;
  {
    std::lock_guard lock(mu_);
    transport_up_ = false;
    reset_session_locked(retired);
  }
  retire(std::move(retired));
}

void DeskEngine::reset_session_locked(std::vector<std::shared_ptr<Worker>>& retired) {
  if (established_) logger()->info("server session ended");
  established_ = false;
  server_instance_ = 0;
  ++session_;
  for (auto& [id, w] : workers_) retired.push_back(w);
  workers_.clear();
  handles_.clear();
}

// Workers the server released (or whose session ended) that are still inside a card call:
// each still holds a thread and a PC/SC context.
std::size_t DeskEngine::busy_retired_locked() const {
  return static_cast<std::size_t>(
      std::count_if(retiring_.begin(), retiring_.end(), [](const auto& w) { return w->busy.load(); }));
}

void DeskEngine::retire(std::vector<std::shared_ptr<Worker>> workers) {
  for (auto& w : workers) {
    std::lock_guard lock(w->m);
    w->closing = true;
    w->retired = true;
    for (const Task& t : w->queue) finished(t);  // never run: nobody may wait for them
    w->queue.clear();
    w->cv.notify_all();
  }
  order_cv_.notify_all();  // a worker waiting for another's request gives up
  std::lock_guard lock(mu_);
  // Join the ones that are done; keep the others for later.
  for (auto it = retiring_.begin(); it != retiring_.end();) {
    if ((*it)->finished) {
      (*it)->thread.join();
      it = retiring_.erase(it);
    } else {
      ++it;
    }
  }
  for (auto& w : workers) retiring_.push_back(std::move(w));
}

void DeskEngine::on_frame(std::span<const uint8_t> payload) {
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;  // a late frame: stop() released everything for good
  }
  try {
    auto m = pr::decode(payload);
    if (!m) {
      logger()->error("malformed message from the server ({}); closing the link", m.error().what);
      if (io_.close_link) io_.close_link("malformed message: " + m.error().what);
      return;
    }
    on_message(std::move(*m));
  } catch (const std::exception& e) {
    logger()->error("internal error handling a server message: {}", e.what());
  } catch (...) {
    logger()->error("internal error handling a server message (unknown exception)");
  }
}

void DeskEngine::on_message(pr::Message m) {
  logger()->trace("server -> {}", pr::describe(m));
  if (auto* h = std::get_if<pr::Hello>(&m.body)) return on_hello(*h);
  if (auto* r = std::get_if<pr::Request>(&m.body)) return on_request(m.id, std::move(*r));
  if (auto* e = std::get_if<pr::Error>(&m.body)) {
    logger()->error("server reports error {}: {}", static_cast<uint32_t>(e->code), log::printable(e->message));
    return;
  }
  logger()->warn("unexpected {} from the server; ignored", pr::describe(m));
}

// Called from every engine thread: a throwing transport must not unwind any of them.
void DeskEngine::send(const pr::Message& m) noexcept {
  try {
    logger()->trace("server <- {}", pr::describe(m));
    if (io_.send_frame) io_.send_frame(pr::encode_frame(m));
  } catch (const std::exception& e) {
    logger()->error("cannot send to the server: {}", e.what());
  } catch (...) {
    logger()->error("cannot send to the server (unknown exception)");
  }
}

void DeskEngine::send_hello(bool reply) {
  pr::Hello h = pr::local_hello(pr::Role::kDesk, config_.capabilities);
  {
    std::lock_guard lock(mu_);
    if (!transport_up_) return;
    h.instance = local_instance_;
  }
  h.software = fmt::format("{} {}", config_.software, CARDBRIDGE_VERSION);
  h.peer_name = config_.desk_name;
  h.reply = reply;
  send(pr::Message{0, h});
}

void DeskEngine::on_hello(const pr::Hello& h) {
  if (h.role != pr::Role::kServer) {
    logger()->error("peer is not a CardBridge server (role {}); closing the link", static_cast<int>(h.role));
    if (io_.close_link) io_.close_link("peer is not a server");
    return;
  }
  auto n = pr::negotiate(pr::local_hello(pr::Role::kDesk, config_.capabilities), h);
  if (!n) {
    logger()->error("server speaks protocol {}.{}, we speak {}.{}; closing the link", h.version_major,
                    h.version_minor, pr::kVersionMajor, pr::kVersionMinor);
    send(pr::Message{0, pr::Error{pr::ErrorCode::kVersion, "unsupported protocol version"}});
    if (io_.close_link) io_.close_link("version mismatch");
    return;
  }
  if (!h.reply) send_hello(true);
  std::vector<std::shared_ptr<Worker>> retired;
  pr::ReaderSnapshot snap;
  std::lock_guard push(push_mu_);  // no monitor push between this copy and its send
  {
    std::lock_guard lock(mu_);
    if (stopping_ || (established_ && h.instance == server_instance_)) return;  // stopped, or a repeated hello
    reset_session_locked(retired);
    established_ = true;
    server_instance_ = h.instance;
    capabilities_ = n->capabilities;
    server_name_ = h.peer_name;
    ++stats_.sessions;
    snap = snapshot_;
    ++stats_.snapshots_sent;
  }
  retire(std::move(retired));
  logger()->info("server '{}' ({}) connected, protocol {}.{}, capabilities {}", log::printable(h.peer_name),
                 log::printable(h.software),
                 pr::kVersionMajor, n->minor, pr::capabilities_text(n->capabilities));
  send(pr::Message{0, snap});
}

// ---- requests ------------------------------------------------------------------------------

void DeskEngine::on_request(uint32_t id, pr::Request req) {
  std::shared_ptr<Worker> w;
  std::vector<std::shared_ptr<Worker>> retired;
  uint64_t session;
  {
    std::lock_guard lock(mu_);
    if (stopping_) return;
    if (!established_) {
      logger()->warn("request #{} before the hello exchange; ignored", id);
      return;
    }
    ++stats_.requests;
    session = session_;
    auto it = workers_.find(req.context.value);
    if (req.op == pr::Op::kReleaseContext) {
      if (it != workers_.end()) {
        // The worker finishes what the server already sent for this context (pipelined
        // requests), then releases its PC/SC context and answers.
        w = it->second;  // its handles go when the worker releases the context
        workers_.erase(it);
        retiring_.push_back(w);
      }
    } else if (it != workers_.end()) {
      w = it->second;
    } else if (workers_.size() + busy_retired_locked() >= config_.max_contexts) {
      logger()->warn("too many server contexts ({}); refusing context {}", workers_.size(), req.context.value);
    } else {
      w = std::make_shared<Worker>();
      w->id = req.context.value;
      w->session = session_;
      w->caps = capabilities_;
      workers_.emplace(w->id, w);
      w->thread = std::thread([this, w] { worker_loop(w); });
    }
  }
  Task t{id, session, std::move(req)};
  if (t.request.op == pr::Op::kReleaseContext && !w) {
    reply(t, pr::Reply{});  // no PC/SC context was ever made for it
    return;
  }
  if (!w) {
    pr::Reply r;
    r.rv = sc::kENoMemory;
    reply(t, std::move(r));
    return;
  }
  {
    std::lock_guard order(order_mu_);
    unfinished_.emplace(t.session, t.id);
  }
  std::lock_guard lock(w->m);
  w->queue.push_back(std::move(t));
  w->cv.notify_one();
}

bool DeskEngine::wait_for_order(const Worker& w, const Task& t) {
  if (t.request.after.empty() || !(w.caps & pr::caps::kDeskOrdering)) return true;
  std::unique_lock lock(order_mu_);
  order_cv_.wait(lock, [&] {
    if (w.retired) return true;
    return std::none_of(t.request.after.begin(), t.request.after.end(), [&](uint32_t id) {
      // Only earlier requests count (serial-number order: ids wrap): waiting for a later
      // one could deadlock; an id never seen or already answered is not waited for.
      return static_cast<int32_t>(t.id - id) > 0 && unfinished_.count({t.session, id}) != 0;
    });
  });
  return !w.retired;
}

void DeskEngine::finished(const Task& t) {
  {
    std::lock_guard lock(order_mu_);
    if (unfinished_.erase({t.session, t.id}) == 0) return;
  }
  order_cv_.notify_all();
}

void DeskEngine::worker_loop(std::shared_ptr<Worker> w) {
  std::optional<Task> release_task;
  for (;;) {
    Task t;
    {
      std::unique_lock lock(w->m);
      w->cv.wait(lock, [&] { return w->closing || !w->queue.empty(); });
      if (w->closing) break;
      t = std::move(w->queue.front());
      w->queue.pop_front();
      if (t.request.op == pr::Op::kReleaseContext) {
        release_task = std::move(t);
        break;
      }
      w->busy = true;
    }
    if (!wait_for_order(*w, t)) {
      finished(t);
      w->busy = false;
      break;  // retired while waiting: the session is gone, nobody expects the answer
    }
    pr::Reply r;
    try {
      r = execute(*w, t.request);
    } catch (const std::exception& e) {
      logger()->error("internal error in {}: {}", pr::op_name(t.request.op), e.what());
      r = pr::Reply{};
      r.rv = sc::kFInternalError;
    } catch (...) {
      logger()->error("internal error in {} (unknown exception)", pr::op_name(t.request.op));
      r = pr::Reply{};
      r.rv = sc::kFInternalError;
    }
    std::lock_guard lock(w->m);
    if (w->abandoned) return;  // stop() gave up on us: the engine may be gone
    w->busy = false;
    reply(t, std::move(r));
    finished(t);
  }
  if (release_task) wait_for_order(*w, *release_task);
  std::lock_guard lock(w->m);
  if (w->abandoned) return;
  if (w->has_ctx) {
    // pcscd disconnects the context's handles, resetting the card where this context
    // held a transaction or exclusive access: nothing leaks to the next user.
    try {
      api_.release(w->ctx);
    } catch (...) {
      logger()->error("context {}: release failed", w->id);
    }
    w->has_ctx = false;
  }
  if (release_task) {
    {
      std::lock_guard engine_lock(mu_);
      for (auto h = handles_.begin(); h != handles_.end();) {
        h = h->second.owner == w.get() ? handles_.erase(h) : std::next(h);
      }
    }
    reply(*release_task, pr::Reply{});  // the shim may be waiting to go on
    finished(*release_task);
  }
  w->finished = true;
}

// After a successful transmit: send the commands the program will send next, when the
// shim asked for it (request flags) and the session negotiated it (capabilities).
void DeskEngine::speculate(Worker& w, ScardHandle card, const pr::Request& q, pr::Reply& r) {
  CardTrack& track = w.tracks[q.handle.value];
  observe(track, q.data, r.data);
  const bool want_gr = (q.flags & pr::request_flags::kPrefetchGetResponse) && (w.caps & pr::caps::kPrefetchGetResponse);
  const bool want_ra = (q.flags & pr::request_flags::kReadAhead) && (w.caps & pr::caps::kReadAhead);
  if (!want_gr && !want_ra) return;
  auto run = [&](const Apdu& cmd, uint32_t capacity) -> std::optional<std::vector<uint8_t>> {
    uint32_t recv_proto = q.recv_protocol;
    Buffer out;
    if (api_.transmit(card, q.protocols, cmd, &recv_proto, capacity, &out) != sc::kSuccess) return std::nullopt;
    observe(track, cmd, out.data, /*from_program=*/false);
    r.prefetched.push_back(pr::Prefetched{cmd, out.data});
    return out.data;
  };
  const auto& last = r.data;
  if (want_gr && last.size() == 2 && last[0] == 0x61) {
    if (!run(get_response_for(q.data, last[1]), 258)) return;
  }
  if (!want_ra) return;
  // Read-ahead: after a full READ BINARY chunk, or once a SELECT told us the file size.
  uint32_t next = 0;
  uint8_t cla = track.read_cla;
  if (auto rb = parse_read_binary(q.data)) {
    const bool full = r.data.size() == rb->le + 2 && r.data[r.data.size() - 2] == 0x90 && r.data.back() == 0x00;
    if (!full || !track.ef_size) return;
    next = rb->offset + rb->le;
    cla = rb->cla;
  } else if (!track.size_fresh) {
    return;  // neither a READ BINARY nor a SELECT that just told us the file size
  }
  if (!track.ef_size) return;
  std::size_t bytes = 0;
  for (const auto& cmd : predict_reads(cla, next, *track.ef_size, track.chunk)) {
    auto resp = run(cmd, 258);
    if (!resp) return;
    bytes += resp->size();
    const bool ok = resp->size() >= 2 && (*resp)[resp->size() - 2] == 0x90 && resp->back() == 0x00;
    if (!ok || bytes > kMaxSpeculativeBytes) return;  // an error answer is served as is, then stop
  }
}

void DeskEngine::reply(const Task& t, pr::Reply r) {
  {
    std::lock_guard lock(mu_);
    if (!established_ || session_ != t.session) return;  // the server that asked is gone
  }
  send(pr::Message{t.id, std::move(r)});
}

pr::Reply DeskEngine::execute(Worker& w, const pr::Request& q) {
  pr::Reply r;
  if (q.op == pr::Op::kPing) return r;
  if (!w.has_ctx) {
    ScardContext ctx = 0;
    r.rv = api_.establish(sc::kScopeSystem, &ctx);
    if (r.rv != sc::kSuccess) {
      logger()->warn("cannot establish a PC/SC context: {}", sc::rv_text(r.rv));
      return r;
    }
    w.ctx = ctx;
    w.has_ctx = true;
  }
  if (q.op == pr::Op::kEstablishContext) return r;

  // Handle-based operations: the handle must belong to this context.
  ScardHandle card = 0;
  if (q.op != pr::Op::kConnect) {
    std::lock_guard lock(mu_);
    auto it = handles_.find(q.handle.value);
    if (it == handles_.end() || it->second.context != w.id || it->second.owner != &w) {
      r.rv = sc::kEInvalidHandle;
      return r;
    }
    card = it->second.card;
  }

  if ((q.flags & pr::request_flags::kBeginFirst) && (w.caps & pr::caps::kDeferredBegin)) {
    // A BeginTransaction the shim answered early: take the lock now, or report why not.
    r.begin_rv = api_.begin_transaction(card);
    if (r.begin_rv != sc::kSuccess) {
      r.rv = r.begin_rv;
      return r;
    }
  }

  auto learn_status = [&](ScardHandle h) {
    std::string name;
    uint32_t state = 0, proto = 0;
    std::vector<uint8_t> atr;
    if (api_.status(h, &name, &state, &proto, &atr) == sc::kSuccess) {
      r.state = state;
      r.atr = std::move(atr);
      r.card_protocol = proto;
    }
  };

  switch (q.op) {
    case pr::Op::kConnect: {
      if (!config_.policy.reader_allowed(q.reader)) {
        r.rv = sc::kEUnknownReader;
        return r;
      }
      uint32_t proto = 0;
      r.rv = api_.connect(w.ctx, q.reader, q.share_mode, q.protocols, &card, &proto);
      if (r.rv == sc::kENoService || r.rv == sc::kFCommError || r.rv == sc::kEInvalidHandle) {
        // The desk's pcscd restarted since this context was made: its context (and handles)
        // died with the old daemon. Start over with a fresh context.
        logger()->info("context {}: PC/SC service restarted ({}); new context", w.id, sc::rv_text(r.rv));
        api_.release(w.ctx);
        w.has_ctx = false;
        ScardContext ctx = 0;
        if (api_.establish(sc::kScopeSystem, &ctx) == sc::kSuccess) {
          w.ctx = ctx;
          w.has_ctx = true;
          r.rv = api_.connect(w.ctx, q.reader, q.share_mode, q.protocols, &card, &proto);
        }
      }
      if (r.rv == sc::kSuccess) {
        r.protocol = proto;
        std::unique_lock lock(mu_);
        auto current = workers_.find(w.id);
        if (current == workers_.end() || current->second.get() != &w) {
          // The server released this context, or its session ended, while we connected:
          // the handle must not enter the table, where a later context with the same id
          // (or the next server) would find it.
          lock.unlock();
          api_.disconnect(card, sc::kLeaveCard);
          r = pr::Reply{};
          r.rv = sc::kEInvalidHandle;
          return r;
        }
        uint32_t id = next_handle_++;
        if (next_handle_ == 0) next_handle_ = 1;
        handles_[id] = HandleEntry{w.id, card, &w};
        r.handle = pr::DeskHandle{id};
      }
      if (r.rv == sc::kSuccess) learn_status(card);
      logger()->debug("connect '{}' share {} -> {}", log::printable(q.reader), q.share_mode, sc::rv_text(r.rv));
      return r;
    }
    case pr::Op::kReconnect: {
      uint32_t proto = 0;
      r.rv = api_.reconnect(card, q.share_mode, q.protocols, q.disposition, &proto);
      if (r.rv == sc::kSuccess) {
        r.protocol = proto;
        learn_status(card);
      }
      return r;
    }
    case pr::Op::kDisconnect: {
      r.rv = api_.disconnect(card, q.disposition);
      if (r.rv == sc::kSuccess) {
        w.tracks.erase(q.handle.value);
        std::lock_guard lock(mu_);
        handles_.erase(q.handle.value);
      }
      return r;
    }
    case pr::Op::kBeginTransaction:
      r.rv = api_.begin_transaction(card);
      return r;
    case pr::Op::kEndTransaction:
      r.rv = api_.end_transaction(card, q.disposition);
      return r;
    case pr::Op::kTransmit: {
      uint32_t recv_proto = q.recv_protocol;
      Buffer out;
      r.rv = api_.transmit(card, q.protocols, q.data, &recv_proto, q.recv_length, &out);
      r.protocol = recv_proto;
      r.length = out.length;
      r.data = std::move(out.data);
      logger()->debug("transmit {} -> {} {}", redact::command(q.data), sc::rv_text(r.rv),
                      r.rv == sc::kSuccess ? redact::response(q.data, r.data) : "");
      if (r.rv == sc::kSuccess) speculate(w, card, q, r);
      return r;
    }
    case pr::Op::kControl: {
      if (!config_.policy.control_allowed(q.code)) {
        logger()->info("control code 0x{:08X} refused by policy", q.code);
        r.rv = sc::kEUnsupportedFeature;
        return r;
      }
      Buffer out;
      r.rv = api_.control(card, q.code, q.data, q.recv_length, &out);
      r.length = out.length;
      r.data = std::move(out.data);
      logger()->debug("control {} -> {}", redact::control(q.code, q.data), sc::rv_text(r.rv));
      return r;
    }
    case pr::Op::kGetAttrib: {
      Buffer out;
      r.rv = api_.get_attrib(card, q.code, q.recv_length, &out);
      r.length = out.length;
      r.data = std::move(out.data);
      return r;
    }
    case pr::Op::kSetAttrib:
      r.rv = api_.set_attrib(card, q.code, q.data);
      return r;
    case pr::Op::kStatus: {
      std::string name;
      uint32_t state = 0, proto = 0;
      std::vector<uint8_t> atr;
      r.rv = api_.status(card, &name, &state, &proto, &atr);
      r.reader = std::move(name);
      r.state = state;
      r.protocol = proto;
      r.atr = std::move(atr);
      return r;
    }
    default:
      r.rv = sc::kEInvalidParameter;
      return r;
  }
}

// ---- reader monitor ------------------------------------------------------------------------

void DeskEngine::publish(std::vector<pr::ReaderInfo> readers) {
  pr::ReaderSnapshot snap;
  std::lock_guard push(push_mu_);  // snapshots leave in sequence order
  {
    std::lock_guard lock(mu_);
    if (readers == snapshot_.readers) return;
    snapshot_.readers = std::move(readers);
    ++snapshot_.sequence;
    if (!established_) return;
    snap = snapshot_;
    ++stats_.snapshots_sent;
  }
  for (const auto& r : snap.readers) {
    logger()->debug("reader '{}': {} ATR {}", log::printable(r.name), sc::state_text(r.state), r.atr.size());
  }
  send(pr::Message{0, snap});
}

void DeskEngine::monitor_loop() {
  std::map<std::string, uint32_t> known;  // reader -> last event state
  uint32_t pnp_state = 0;
  bool warned = false;
  auto stopping = [this] {
    std::lock_guard lock(mu_);
    return stopping_;
  };
  auto pause = [this](std::chrono::milliseconds d) {
    std::unique_lock lock(mu_);
    timer_cv_.wait_for(lock, d, [this] { return stopping_; });
  };
  while (!stopping()) {
    try {
      if (!monitor_has_ctx_) {
        ScardContext ctx = 0;
        uint32_t rv = api_.establish(sc::kScopeSystem, &ctx);
        if (rv != sc::kSuccess) {
          if (!warned) logger()->warn("desk PC/SC service unavailable ({}); retrying", sc::rv_text(rv));
          warned = true;
          publish({});
          pause(1000ms);
          continue;
        }
        warned = false;
        monitor_ctx_ = ctx;
        monitor_has_ctx_ = true;
        known.clear();
      }
      std::vector<std::string> names;
      uint32_t rv = api_.list_readers(monitor_ctx_, &names);
      if (rv == sc::kSuccess) {
        std::vector<ReaderStateIo> states;
        for (const auto& n : names) {
          if (!config_.policy.reader_allowed(n)) continue;
          auto k = known.find(n);
          states.push_back(ReaderStateIo{n, k == known.end() ? sc::kStateUnaware : k->second, 0, {}});
        }
        states.push_back(ReaderStateIo{kPnpReader, pnp_state, 0, {}});
        rv = api_.get_status_change(monitor_ctx_, static_cast<uint32_t>(config_.monitor_resync.count()), states);
        if (stopping()) break;
        if (rv == sc::kETimeout) continue;  // nothing changed; re-list (bounds a missed hot-plug)
        if (rv == sc::kSuccess) {
          std::vector<pr::ReaderInfo> readers;
          known.clear();
          for (std::size_t i = 0; i + 1 < states.size(); ++i) {
            const auto& s = states[i];
            if (s.event_state & sc::kStateUnknown) continue;  // the reader vanished
            known[s.name] = s.event_state & ~sc::kStateChanged;
            pr::ReaderInfo info;
            info.name = s.name;
            info.state = s.event_state & kReportedStateBits;
            info.event_count = (s.event_state >> 16) & 0xFFFF;
            if (s.event_state & sc::kStatePresent) info.atr = s.atr;
            readers.push_back(std::move(info));
          }
          pnp_state = states.back().event_state & ~sc::kStateChanged;
          publish(std::move(readers));
          continue;
        }
      }
      if (rv == sc::kECancelled) {
        if (stopping()) break;
        continue;
      }
      if (rv == sc::kEUnknownReader) continue;  // a reader left between listing and waiting
      // The desk's pcscd went away (NO_SERVICE, COMM_ERROR, ...): readers vanish; retry.
      logger()->warn("desk PC/SC service lost ({}); readers hidden until it is back", sc::rv_text(rv));
      monitor_has_ctx_ = false;
      api_.release(monitor_ctx_);
      publish({});
      pause(500ms);
    } catch (...) {
      // A failing CardApi must not end the monitor (or, escaping the thread, the process):
      // start again with a fresh context, as after a lost service, without hiding readers.
      logger()->error("reader monitor: unexpected failure; restarting it");
      if (monitor_has_ctx_) {
        monitor_has_ctx_ = false;
        try {
          api_.release(monitor_ctx_);
        } catch (...) {
        }
      }
      pause(500ms);
    }
  }
  if (monitor_has_ctx_) {
    monitor_has_ctx_ = false;
    try {
      api_.release(monitor_ctx_);
    } catch (...) {
    }
  }
  monitor_done_ = true;
}

void DeskEngine::timer_loop() {
  std::unique_lock lock(mu_);
  while (!stopping_) {
    if (transport_up_ && !established_) {
      if (std::chrono::steady_clock::now() >= hello_due_) {
        hello_due_ = std::chrono::steady_clock::now() + config_.hello_retry;
        lock.unlock();
        send_hello(false);  // some channels drop what was sent before the far end opened
        lock.lock();
        continue;
      }
      timer_cv_.wait_until(lock, hello_due_);
    } else {
      timer_cv_.wait(lock);
    }
  }
}

// ---- introspection ---------------------------------------------------------------------------

bool DeskEngine::session_established() const {
  std::lock_guard lock(mu_);
  return established_;
}

std::string DeskEngine::server_name() const {
  std::lock_guard lock(mu_);
  return server_name_;
}

EngineStats DeskEngine::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

pr::ReaderSnapshot DeskEngine::current_readers() const {
  std::lock_guard lock(mu_);
  return snapshot_;
}

}  // namespace cardbridge::client
