#include "cardbridge/desk_runtime/reader_monitor.hpp"

#include <map>

#if defined(__linux__)
#include <pthread.h>
#endif

#include "cardbridge/support/log.hpp"
#include "cardbridge/support/scard.hpp"

namespace cardbridge::client {

namespace sc = cardbridge::scard;
namespace pr = cardbridge::protocol;
using namespace std::chrono_literals;

namespace {

log::Channel logger{"cardbridge.desk.monitor"};

constexpr const char* kPnpReader = "\\\\?PnP?\\Notification";
// SCARD_STATE_* bits that describe a reader (the rest are call mechanics).
constexpr uint32_t kReportedStateBits = sc::kStateUnknown | sc::kStateUnavailable | sc::kStateEmpty |
                                        sc::kStatePresent | sc::kStateExclusive | sc::kStateInUse |
                                        sc::kStateMute | sc::kStateUnpowered;

}  // namespace

ReaderMonitor::ReaderMonitor(CardApi& api, Policy policy, Publish publish, std::chrono::milliseconds resync)
    : api_(api), policy_(std::move(policy)), publish_(std::move(publish)), resync_(resync) {}

ReaderMonitor::~ReaderMonitor() { stop(); }

void ReaderMonitor::start() {
  std::lock_guard lock(m_);
  if (thread_.joinable() || stopping_) return;
  thread_ = std::thread([this] {
#if defined(__linux__)
    // Named, so that ps/top and the idle benchmark can tell it: its one wake-up a minute is
    // the SCardGetStatusChange wait's (docs/performance.md, idle).
    ::pthread_setname_np(::pthread_self(), "cb-monitor");
#endif
    run();
  });
}

void ReaderMonitor::stop() {
  std::unique_lock lock(m_);
  stopping_ = true;
  cv_.notify_all();
  // The thread may be about to enter SCardGetStatusChange when we cancel, and pcscd drops
  // a cancel for a context that is not waiting: cancel again until it has left.
  while (thread_.joinable() && !done_) {
    if (has_ctx_) api_.cancel(ctx_);
    cv_.wait_for(lock, 20ms, [this] { return done_; });
  }
  lock.unlock();
  if (thread_.joinable()) thread_.join();
}

bool ReaderMonitor::pause(std::chrono::milliseconds d) {
  std::unique_lock lock(m_);
  return !cv_.wait_for(lock, d, [this] { return stopping_; });
}

uint32_t ReaderMonitor::wait_for_change(std::vector<ReaderStateIo>& states) {
  ScardContext ctx = 0;
  {
    std::lock_guard lock(m_);
    if (stopping_) return sc::kECancelled;
    ctx = ctx_;
  }
  return api_.get_status_change(ctx, static_cast<uint32_t>(resync_.count()), states);
}

void ReaderMonitor::run() {
  std::map<std::string, uint32_t> known;  // reader -> last event state
  uint32_t pnp_state = 0;
  bool warned = false;
  auto stopping = [this] {
    std::lock_guard lock(m_);
    return stopping_;
  };
  auto drop_context = [this] {
    ScardContext ctx = 0;
    {
      std::lock_guard lock(m_);
      if (!has_ctx_) return;
      has_ctx_ = false;
      ctx = ctx_;
    }
    try {
      api_.release(ctx);
    } catch (...) {
    }
  };
  while (!stopping()) {
    try {
      bool have = false;
      {
        std::lock_guard lock(m_);
        have = has_ctx_;
      }
      if (!have) {
        ScardContext ctx = 0;
        const uint32_t rv = api_.establish(sc::kScopeSystem, &ctx);
        if (rv != sc::kSuccess) {
          if (!warned) logger->warn("desk PC/SC service unavailable ({}); retrying", sc::rv_text(rv));
          warned = true;
          publish_({}, rv);
          if (!pause(1000ms)) break;
          continue;
        }
        warned = false;
        {
          std::lock_guard lock(m_);
          ctx_ = ctx;
          has_ctx_ = true;
        }
        known.clear();
      }
      std::vector<std::string> names;
      uint32_t rv = api_.list_readers(ctx_, &names);
      if (rv == sc::kSuccess) {
        std::vector<ReaderStateIo> states;
        for (const auto& n : names) {
          if (!policy_.reader_allowed(n)) continue;
          auto k = known.find(n);
          states.push_back(ReaderStateIo{n, k == known.end() ? sc::kStateUnaware : k->second, 0, {}});
        }
        states.push_back(ReaderStateIo{kPnpReader, pnp_state, 0, {}});
        rv = wait_for_change(states);
        if (stopping()) break;
        if (rv == sc::kETimeout) continue;  // nothing changed; list again (bounds a missed hot-plug)
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
          publish_(std::move(readers), 0);
          continue;
        }
      }
      if (rv == sc::kECancelled) continue;
      if (rv == sc::kEUnknownReader) continue;  // a reader left between listing and waiting
      // The desk's pcscd went away (NO_SERVICE, COMM_ERROR, ...): readers vanish; retry.
      logger->warn("desk PC/SC service lost ({}); readers hidden until it is back", sc::rv_text(rv));
      drop_context();
      publish_({}, rv);
      if (!pause(500ms)) break;
    } catch (...) {
      // A failing CardApi must not end the monitor (or, escaping the thread, the process):
      // start again with a fresh context, as after a lost service, without hiding readers.
      logger->error("reader monitor: unexpected failure; restarting it");
      drop_context();
      if (!pause(500ms)) break;
    }
  }
  drop_context();
  std::lock_guard lock(m_);
  done_ = true;
  cv_.notify_all();
}

}  // namespace cardbridge::client
