#include "cardbridge/desk_runtime/janitor.hpp"

#include "cardbridge/support/log.hpp"

namespace cardbridge::client {

namespace {
log::Channel logger{"cardbridge.desk"};
using namespace std::chrono_literals;
}  // namespace

Janitor& Janitor::instance() {
  static Janitor* janitor = new Janitor();  // never destroyed: see the header
  return *janitor;
}

Janitor::Janitor() : thread_([this] { run(); }) {}

void Janitor::dispose(std::unique_ptr<DeskRuntime> runtime) {
  if (!runtime) return;
  std::lock_guard lock(m_);
  queue_.push_back(std::move(runtime));
  cv_.notify_all();
}

bool Janitor::drain(std::chrono::milliseconds limit) {
  std::unique_lock lock(m_);
  return cv_.wait_for(lock, limit, [this] { return queue_.empty() && stuck_.empty() && in_hand_ == 0; });
}

void Janitor::run() {
  std::unique_lock lock(m_);
  for (;;) {
    // Runtimes whose blocked call has returned meanwhile.
    for (auto it = stuck_.begin(); it != stuck_.end();) {
      if ((*it)->finished()) {
        auto done = std::move(*it);
        it = stuck_.erase(it);
        lock.unlock();
        done.reset();
        lock.lock();
      } else {
        ++it;
      }
    }
    cv_.notify_all();  // drain() waiters
    if (queue_.empty()) {
      // With runtimes stuck, look again now and then; otherwise sleep until work comes.
      if (stuck_.empty()) {
        cv_.wait(lock, [this] { return !queue_.empty(); });
      } else {
        cv_.wait_for(lock, 200ms, [this] { return !queue_.empty(); });
      }
      continue;
    }
    auto rt = std::move(queue_.front());
    queue_.pop_front();
    ++in_hand_;
    lock.unlock();
    const bool clean = rt->stop();
    if (clean) rt.reset();
    lock.lock();
    --in_hand_;
    if (!clean) stuck_.push_back(std::move(rt));
  }
}

TimerThread::TimerThread(std::function<void()> fire) : fire_(std::move(fire)), thread_([this] { run(); }) {}

TimerThread::~TimerThread() {
  {
    std::lock_guard lock(m_);
    stop_ = true;
    cv_.notify_all();
  }
  thread_.join();
}

void TimerThread::arm(std::optional<TimePoint> when) {
  std::lock_guard lock(m_);
  due_ = when;
  cv_.notify_all();
}

void TimerThread::run() {
  std::unique_lock lock(m_);
  while (!stop_) {
    if (!due_) {
      cv_.wait(lock, [this] { return stop_ || due_.has_value(); });
      continue;
    }
    const TimePoint due = *due_;
    if (cv_.wait_until(lock, due, [&] { return stop_ || due_ != due; })) continue;  // re-armed or stopping
    due_.reset();
    lock.unlock();
    fire_();
    lock.lock();
  }
}

}  // namespace cardbridge::client
