// Janitor: stops and destroys DeskRuntimes off the caller's thread. Stopping waits for the
// PC/SC calls in flight (bounded), and a call that pcscd itself keeps waiting (a Connect
// behind another desk program's transaction) can outlast any bound: such a runtime is
// kept here until its call returns, then destroyed. The transport threads (Asio's, FreeRDP's)
// never wait for a card.
//
// One per process, created on first use and never destroyed: at process exit, a runtime
// still blocked in a desk call ends with the process (its pcscd connections close with it).
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cardbridge/desk_runtime/desk_runtime.hpp"

namespace cardbridge::client {

class Janitor {
 public:
  static Janitor& instance();

  void dispose(std::unique_ptr<DeskRuntime> runtime);
  // Waits until every runtime handed over is gone, at most |limit|; true when all are.
  bool drain(std::chrono::milliseconds limit);

 private:
  Janitor();
  void run();

  std::mutex m_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<DeskRuntime>> queue_;
  std::vector<std::unique_ptr<DeskRuntime>> stuck_;
  std::size_t in_hand_ = 0;  // being stopped by the thread
  std::thread thread_;
};

// Calls |fire| on its own thread at the time last armed (the add-in's hello retries).
// |fire| runs without the timer's lock held, so it may arm the timer again.
class TimerThread {
 public:
  explicit TimerThread(std::function<void()> fire);
  ~TimerThread();
  TimerThread(const TimerThread&) = delete;
  TimerThread& operator=(const TimerThread&) = delete;
  void arm(std::optional<TimePoint> when);

 private:
  void run();
  std::function<void()> fire_;
  std::mutex m_;
  std::condition_variable cv_;
  std::optional<TimePoint> due_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace cardbridge::client
