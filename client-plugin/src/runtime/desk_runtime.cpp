#include "runtime/desk_runtime.hpp"

#include "cardbridge/support/log.hpp"

namespace cardbridge::client {

namespace {
log::Channel logger{"cardbridge.desk"};
TimePoint now() { return std::chrono::steady_clock::now(); }
}  // namespace

struct DeskRuntime::LaneThread {
  LaneId id = 0;
  std::condition_variable cv;
  std::optional<PcscCall> next;  // guarded by DeskRuntime::mu_
  bool closing = false;          // the core closed the lane: leave once idle
  bool busy = false;             // a call is being made
  bool ended = false;            // the thread has left its loop
  std::thread thread;
};

DeskRuntime::DeskRuntime(CardApi& api, DeskConfig config, Io io)
    : api_(api),
      io_(std::move(io)),
      core_(*this, config),
      monitor_(api, config.policy, [this](std::vector<protocol::ReaderInfo> readers) {
        std::lock_guard lock(mu_);
        if (stopped_) return;
        core_.readers(std::move(readers), now());
        after_event();
      }) {}

DeskRuntime::~DeskRuntime() {
  stop();
  // Lanes still blocked in a call: wait for them (the owner kept the runtime until
  // finished() when it could not wait).
  std::vector<std::unique_ptr<LaneThread>> all;
  {
    std::lock_guard lock(mu_);
    for (auto& [id, lt] : lanes_) {
      lt->closing = true;
      lt->cv.notify_all();
      all.push_back(std::move(lt));
    }
    lanes_.clear();
    for (auto& lt : ended_) all.push_back(std::move(lt));
    ended_.clear();
  }
  for (auto& lt : all) {
    if (lt->thread.joinable()) lt->thread.join();
  }
}

void DeskRuntime::start() { monitor_.start(); }

bool DeskRuntime::stop(std::chrono::milliseconds grace) {
  {
    std::lock_guard lock(mu_);
    if (!stopped_) {
      stopped_ = true;
      core_.shutdown(now());  // retires every lane: contexts are released once their calls return
    }
  }
  monitor_.stop();
  bool idle = false;
  {
    std::unique_lock lock(mu_);
    idle = idle_cv_.wait_for(lock, grace, [this] { return core_.idle(); });
  }
  reap();
  if (!idle) logger->warn("a desk PC/SC call is still blocked at shutdown; the link's resources stay until it returns");
  return idle;
}

void DeskRuntime::detach_io() {
  std::lock_guard lock(mu_);
  io_ = Io{};
}

void DeskRuntime::set_timer(std::function<void(std::optional<TimePoint>)> arm_timer) {
  std::lock_guard lock(mu_);
  io_.arm_timer = std::move(arm_timer);
  armed_.reset();
  after_event();
}

bool DeskRuntime::finished() const {
  std::lock_guard lock(mu_);
  return core_.idle();
}

// ---- events ---------------------------------------------------------------------------------

void DeskRuntime::transport_up() {
  reap();
  std::lock_guard lock(mu_);
  if (stopped_) return;
  core_.transport_up(now());
  after_event();
}

void DeskRuntime::transport_down() {
  reap();
  std::lock_guard lock(mu_);
  core_.transport_down(now());
  after_event();
}

void DeskRuntime::receive(std::span<const uint8_t> bytes) {
  std::lock_guard lock(mu_);
  if (stopped_) return;
  core_.receive(bytes, now());
  after_event();
}

void DeskRuntime::tick() {
  std::lock_guard lock(mu_);
  armed_.reset();
  if (stopped_) return;
  core_.tick(now());
  after_event();
}

void DeskRuntime::after_event() {
  const auto due = core_.next_deadline();
  if (due == armed_ || !io_.arm_timer) return;
  armed_ = due;
  io_.arm_timer(due);
}

// ---- effects (mu_ held) -----------------------------------------------------------------

void DeskRuntime::send(std::vector<uint8_t> bytes) {
  try {
    if (io_.send) io_.send(std::move(bytes));
  } catch (const std::exception& e) {
    logger->error("cannot send to the server: {}", e.what());
  } catch (...) {
    logger->error("cannot send to the server (unknown exception)");
  }
}

void DeskRuntime::close_link(const std::string& reason) {
  try {
    if (io_.close_link) io_.close_link(reason);
  } catch (...) {
    logger->error("closing the server link failed");
  }
}

void DeskRuntime::execute(LaneId lane, PcscCall c) {
  auto it = lanes_.find(lane);
  if (it == lanes_.end()) {
    auto lt = std::make_unique<LaneThread>();
    lt->id = lane;
    LaneThread* raw = lt.get();
    it = lanes_.emplace(lane, std::move(lt)).first;
    raw->next = std::move(c);
    raw->thread = std::thread([this, raw] { lane_loop(*raw); });
    return;
  }
  it->second->next = std::move(c);
  it->second->cv.notify_one();  // no waiter when the lane's own thread asked: it loops
}

void DeskRuntime::lane_closed(LaneId lane) {
  auto it = lanes_.find(lane);
  if (it != lanes_.end()) {
    it->second->closing = true;
    it->second->cv.notify_one();
    ended_.push_back(std::move(it->second));
    lanes_.erase(it);
  }
  if (core_.idle()) idle_cv_.notify_all();
}

// One server context's PC/SC calls, in order. Only this thread uses the lane's context
// (pcsc-lite locks a context's mutex inside its global lock: a busy context touched from
// another thread would stall every thread of the process).
void DeskRuntime::lane_loop(LaneThread& lt) {
  std::unique_lock lock(mu_);
  for (;;) {
    lt.cv.wait(lock, [&] { return lt.next.has_value() || lt.closing; });
    if (!lt.next) break;  // closing and idle
    PcscCall c = std::move(*lt.next);
    lt.next.reset();
    lt.busy = true;
    lock.unlock();
    CallResult r = run_call(api_, c);
    lock.lock();
    lt.busy = false;
    core_.call_done(lt.id, std::move(r), now());
    after_event();
  }
  lt.ended = true;
}

void DeskRuntime::reap() {
  std::vector<std::unique_ptr<LaneThread>> done;
  {
    std::lock_guard lock(mu_);
    for (auto it = ended_.begin(); it != ended_.end();) {
      if ((*it)->ended) {
        done.push_back(std::move(*it));
        it = ended_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& lt : done) lt->thread.join();
}

// ---- introspection ----------------------------------------------------------------------

bool DeskRuntime::session_established() const {
  std::lock_guard lock(mu_);
  return core_.session_established();
}

std::string DeskRuntime::server_name() const {
  std::lock_guard lock(mu_);
  return core_.server_name();
}

DeskStats DeskRuntime::stats() const {
  std::lock_guard lock(mu_);
  return core_.stats();
}

protocol::ReaderSnapshot DeskRuntime::current_readers() const {
  std::lock_guard lock(mu_);
  return core_.current_readers();
}

}  // namespace cardbridge::client
