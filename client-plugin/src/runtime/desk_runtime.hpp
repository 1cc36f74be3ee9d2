// DeskRuntime: the desk core's edge for one server link (a desk agent connection or an
// RDP channel). It owns the DeskCore and the threads that the core's effects need:
//  * lane threads: one per server context while it exists, each making that context's
//    PC/SC calls in order (a blocking call holds up only its own context);
//  * the reader monitor (ReaderMonitor).
// Every event reaches the core under one mutex, from whichever thread has it (the
// transport's, a lane's, the monitor's). The transport's send function is called under
// that mutex, so frames leave in the order the core produced them; it must be thread-safe
// and must not call back into the runtime.
//
// Timers: the core needs to be ticked only for hello retries; the host arms a timer when
// Io::arm_timer asks and calls tick() then.
//
// Shutdown: stop() releases every PC/SC context and stops every thread. A lane blocked in
// a call that pcscd itself makes wait (a Connect behind another desk program's
// transaction) cannot be interrupted: stop() returns false after |grace| and the runtime
// must be kept (see Janitor) until finished(); destroying it waits for that call.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "core/card_api.hpp"
#include "core/desk_core.hpp"
#include "runtime/reader_monitor.hpp"

namespace cardbridge::client {

class DeskRuntime : private DeskEffects {
 public:
  struct Io {
    std::function<void(std::vector<uint8_t>)> send;            // whole frames to the server
    std::function<void(const std::string& reason)> close_link;  // protocol error: drop the link
    // The host calls tick() at (or after) this time; nullopt: no timer needed.
    std::function<void(std::optional<TimePoint>)> arm_timer;
  };

  DeskRuntime(CardApi& api, DeskConfig config, Io io);
  ~DeskRuntime() override;
  DeskRuntime(const DeskRuntime&) = delete;
  DeskRuntime& operator=(const DeskRuntime&) = delete;

  void start();  // starts watching readers
  bool stop(std::chrono::milliseconds grace = std::chrono::seconds(2));
  // Forgets the host's callbacks: the runtime may outlive its host (Janitor).
  void detach_io();
  // Sets Io::arm_timer once the host can receive timer requests (after construction).
  void set_timer(std::function<void(std::optional<TimePoint>)> arm_timer);
  bool finished() const;

  void transport_up();
  void transport_down();
  void receive(std::span<const uint8_t> bytes);  // bytes from the server, any chunking
  void tick();

  bool session_established() const;
  std::string server_name() const;
  DeskStats stats() const;
  protocol::ReaderSnapshot current_readers() const;

 private:
  struct LaneThread;

  // DeskEffects (called with mu_ held)
  void send(std::vector<uint8_t> bytes) override;
  void close_link(const std::string& reason) override;
  void execute(LaneId lane, PcscCall c) override;
  void lane_closed(LaneId lane) override;

  void lane_loop(LaneThread& lt);
  void after_event();  // with mu_ held: re-arm the host's timer if the deadline moved
  void reap();         // joins lane threads that have ended (without mu_)

  CardApi& api_;
  Io io_;
  mutable std::mutex mu_;
  std::condition_variable idle_cv_;  // the core went idle (stop())
  DeskCore core_;
  std::map<LaneId, std::unique_ptr<LaneThread>> lanes_;
  std::vector<std::unique_ptr<LaneThread>> ended_;  // to join
  std::optional<TimePoint> armed_;
  bool stopped_ = false;
  ReaderMonitor monitor_;
};

}  // namespace cardbridge::client
