// DeskRuntime: the desk core's edge for one server link (a desk agent connection or an
// RDP channel). It owns the DeskCore and the threads its effects need:
//  * a pool of call threads that make the PC/SC calls the core asks for. The core keeps
//    one call in flight per lane (server context), so a blocking call (a Connect pcscd
//    makes wait behind another program's transaction) holds up only its own context; the
//    thread that finishes a lane's call goes on with that lane's next one;
//  * the reader monitor (ReaderMonitor).
// Every event reaches the core under one mutex, from whichever thread has it. Frames to the
// server are sent under that mutex, so they leave in the order the core produced them.
//
// Two ways to be fed:
//  * a host that owns the transport (the FreeRDP add-in's channel, a TLS stream) calls
//    transport_up/receive/transport_down from its own threads and gets frames through
//    Io::send; those threads never make a PC/SC call (hand-off to the pool);
//  * serve_socket(fd): the runtime owns a plain stream socket. Its pool threads take turns
//    reading it (leader/follower): the thread that reads a request makes its PC/SC call
//    itself, after handing the reading to another thread, and writes the reply to the
//    socket itself. A Transmit then crosses no thread at the desk.
//
// Timers: the core needs ticks only for hello retries; the host arms a timer when
// Io::arm_timer asks and calls tick() then (serve_socket: the runtime waits on its own).
//
// Shutdown: stop() releases every PC/SC context and stops every thread. A call that pcscd
// itself keeps waiting (a Connect behind another desk program's transaction) cannot be
// interrupted: stop() returns false after |grace|, and the runtime must be kept (see
// Janitor) until finished(); destroying it waits for that call.
#pragma once

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "cardbridge/desk_core/card_api.hpp"
#include "cardbridge/desk_core/desk_core.hpp"
#include "cardbridge/desk_runtime/reader_monitor.hpp"

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
  // Serves the server on connected socket |fd| (taken over: closed by the runtime), as
  // described above; |closed| runs once, on a pool thread, when the peer or a protocol
  // error ended the connection (not after stop()). Io::send/close_link/arm_timer unused.
  // |peer|: who the socket leads to (SO_PEERCRED for a UNIX socket; plain TCP proves nothing).
  void serve_socket(int fd, PeerIdentity peer, std::function<void(const std::string& reason)> closed);
  bool stop(std::chrono::milliseconds grace = std::chrono::seconds(2));
  bool finished() const;
  // Forgets the host's callbacks: the runtime may outlive its host (Janitor).
  void detach_io();
  // Sets Io::arm_timer once the host can receive timer requests (after construction).
  void set_timer(std::function<void(std::optional<TimePoint>)> arm_timer);
  // Sets every Io callback (after construction).
  void set_io(std::function<void(std::vector<uint8_t>)> send, std::function<void(const std::string&)> close_link,
              std::function<void(std::optional<TimePoint>)> arm_timer);

  void transport_up(PeerIdentity peer);  // the transport's verified peer
  void transport_down();
  void receive(std::span<const uint8_t> bytes);  // bytes from the server, any chunking
  void tick();

  bool session_established() const;
  std::string server_name() const;
  DeskStats stats() const;
  protocol::ReaderSnapshot current_readers() const;

 private:
  using Lock = std::unique_lock<std::mutex>;
  struct Task {
    LaneId lane = 0;
    PcscCall call;
  };

  // DeskEffects (called with mu_ held)
  void send(std::vector<uint8_t> bytes) override;
  void close_link(const std::string& reason) override;
  void execute(LaneId lane, PcscCall c) override;
  void lane_closed(LaneId lane) override;
  void audit(const DeskAudit& event) override;  // journald (cardbridge/journal/audit.hpp)

  void pool_loop();
  void run(Lock& lock, Task task);  // makes the call without mu_, reports it with it
  void read_turn(Lock& lock);       // serve_socket: this thread reads until it has work
  void wake_pool(Lock& lock);       // an idle thread for each task, and one reader
  void after_event();               // with mu_ held: re-arm the timer if the deadline moved
  void socket_closed(Lock& lock, const std::string& reason);

  CardApi& api_;
  Io io_;
  const std::string desk_name_;  // for the audit trail
  const std::string link_;
  mutable std::mutex mu_;
  std::condition_variable work_cv_;  // pool threads: a task, the reading turn, or stopping
  std::condition_variable idle_cv_;  // the core went idle (stop())
  DeskCore core_;
  std::deque<Task> tasks_;
  std::vector<std::thread> threads_;
  std::size_t idle_threads_ = 0;
  std::size_t running_ = 0;  // calls being made
  bool stopping_ = false;
  bool stopped_ = false;
  std::optional<TimePoint> armed_;
  // serve_socket
  int fd_ = -1;
  bool reading_ = false;  // a pool thread has the reading turn
  // The reader waits in poll() for the socket, the core's deadline, or a byte on this pipe:
  // after_event() writes one when the deadline moves earlier than the one it waits for (a
  // call that returned on another thread, e.g. the card image's pause between transactions).
  int wake_pipe_[2] = {-1, -1};
  bool polling_ = false;
  std::optional<TimePoint> polling_for_;
  bool socket_done_ = false;
  std::function<void(const std::string&)> socket_closed_;
  ReaderMonitor monitor_;
};

}  // namespace cardbridge::client
