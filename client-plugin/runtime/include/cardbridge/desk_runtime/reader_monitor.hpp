// ReaderMonitor: the desk's reader watch. One thread waits in SCardGetStatusChange on every
// reader the policy exposes plus the PnP pseudo-reader, and reports the readers (name,
// state, event counter, ATR) whenever the desk's pcscd says something changed. While the
// desk's PC/SC service is missing it reports no reader and retries every second.
//
// Threads: its own; |publish| runs on it. stop() cancels the wait and joins.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "cardbridge/protocol/messages.hpp"
#include "cardbridge/desk_core/card_api.hpp"
#include "cardbridge/desk_core/policy.hpp"

namespace cardbridge::client {

class ReaderMonitor {
 public:
  // The readers, and 0 -- or the error with which the desk's PC/SC service fails (e.g.
  // SCARD_E_NO_SERVICE: no pcscd), then with no reader.
  using Publish = std::function<void(std::vector<protocol::ReaderInfo>, uint32_t service_rv)>;
  ReaderMonitor(CardApi& api, Policy policy, Publish publish,
                std::chrono::milliseconds resync = std::chrono::milliseconds{60000});
  ~ReaderMonitor();
  ReaderMonitor(const ReaderMonitor&) = delete;
  ReaderMonitor& operator=(const ReaderMonitor&) = delete;

  void start();
  void stop();  // idempotent; returns once the thread has left

 private:
  void run();
  uint32_t wait_for_change(std::vector<ReaderStateIo>& states);
  bool pause(std::chrono::milliseconds d);  // false: stopping

  CardApi& api_;
  Policy policy_;
  Publish publish_;
  std::chrono::milliseconds resync_;  // bound on a missed reader hot-plug
  std::mutex m_;
  std::condition_variable cv_;
  bool stopping_ = false;
  bool done_ = false;
  bool has_ctx_ = false;  // |ctx_| is valid (guarded by m_: stop() cancels it)
  ScardContext ctx_ = 0;
  std::thread thread_;
};

}  // namespace cardbridge::client
