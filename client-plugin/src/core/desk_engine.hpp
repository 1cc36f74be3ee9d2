// DeskEngine: the desk side of CardBridge, independent of the transport (desk agent
// socket, FreeRDP static or dynamic channel).
//
// It owns the real PC/SC contexts and handles (through CardApi), watches the readers
// and pushes their state to the server when it changes, and executes the server's card
// operations. Threads:
//  * the caller's thread (transport): on_frame(), transport_up/down();
//  * one monitor thread: SCardGetStatusChange on all readers and the PnP pseudo-reader;
//  * one timer thread: hello retries until the server answers;
//  * one worker thread per server context: requests of a context run in order, so a
//    blocking BeginTransaction or Connect only ever holds up its own context.
// Output goes through EngineIo::send_frame, which is called from any of these threads
// and must be thread-safe. The engine never throws into its caller.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <set>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cardbridge/protocol/messages.hpp"
#include "core/card_api.hpp"
#include "core/policy.hpp"

namespace cardbridge::client {

struct EngineConfig {
  std::string desk_name;   // shown to the server (doctor, audit): the thin client's name
  std::string software = "cardbridge-desk";
  uint64_t capabilities = 0;
  Policy policy;
  std::chrono::milliseconds hello_retry{500};
  std::chrono::milliseconds monitor_resync{60000};  // bound on a missed reader hot-plug
  std::size_t max_contexts = 64;
};

struct EngineIo {
  std::function<void(std::vector<uint8_t> frame)> send_frame;  // thread-safe
  std::function<void(const std::string& reason)> close_link;    // protocol error: drop the link
};

struct EngineStats {
  uint64_t requests = 0;
  uint64_t snapshots_sent = 0;
  uint64_t sessions = 0;
};

class DeskEngine {
 public:
  DeskEngine(CardApi& api, EngineConfig config, EngineIo io);
  ~DeskEngine();
  DeskEngine(const DeskEngine&) = delete;
  DeskEngine& operator=(const DeskEngine&) = delete;

  void start();  // starts watching readers
  void stop();   // releases everything and joins the threads (bounded wait)

  void transport_up();    // the link is open: say hello
  void transport_down();  // the link is gone: forget the server session
  // One frame payload from the server (framing is the transport's job).
  void on_frame(std::span<const uint8_t> payload);

  bool session_established() const;
  std::string server_name() const;
  EngineStats stats() const;
  protocol::ReaderSnapshot current_readers() const;

 private:
  struct Worker;
  struct Task {
    uint32_t id = 0;
    uint64_t session = 0;
    protocol::Request request;
  };

  void on_message(protocol::Message m);
  void on_hello(const protocol::Hello& h);
  void on_request(uint32_t id, protocol::Request req);
  void send(const protocol::Message& m) noexcept;
  void send_hello(bool reply);
  void reset_session_locked(std::vector<std::shared_ptr<Worker>>& retired);
  std::size_t busy_retired_locked() const;
  void retire(std::vector<std::shared_ptr<Worker>> workers);

  void monitor_loop();
  void timer_loop();
  void publish(std::vector<protocol::ReaderInfo> readers);
  void worker_loop(std::shared_ptr<Worker> w);
  protocol::Reply execute(Worker& w, const protocol::Request& r);
  void reply(const Task& t, protocol::Reply r);
  void speculate(Worker& w, ScardHandle card, const protocol::Request& q, protocol::Reply& r);
  // Desk ordering (caps::kDeskOrdering): waits until the requests |t| names in |after|
  // are finished; false when the worker is being retired meanwhile.
  bool wait_for_order(const Worker& w, const Task& t);
  void finished(const Task& t);

  CardApi& api_;
  EngineConfig config_;
  EngineIo io_;

  mutable std::mutex mu_;
  // Held from taking a snapshot to handing it to send_frame (publish, session start), so
  // that snapshots leave in sequence order. Taken before mu_, never inside it.
  std::mutex push_mu_;
  std::condition_variable timer_cv_;
  bool stopping_ = false;
  bool started_ = false;
  // session
  bool transport_up_ = false;
  bool established_ = false;
  uint64_t session_ = 0;  // bumps on every server session start/end
  uint64_t local_instance_ = 0;
  uint64_t server_instance_ = 0;
  uint64_t capabilities_ = 0;
  std::string server_name_;
  std::chrono::steady_clock::time_point hello_due_{};
  // readers
  protocol::ReaderSnapshot snapshot_;
  // contexts and handles
  std::map<uint32_t, std::shared_ptr<Worker>> workers_;  // by server ContextId
  struct HandleEntry {
    uint32_t context = 0;
    ScardHandle card = 0;
    const Worker* owner = nullptr;  // the worker (context incarnation) that made it
  };
  std::map<uint32_t, HandleEntry> handles_;  // by DeskHandle
  uint32_t next_handle_ = 1;
  std::vector<std::shared_ptr<Worker>> retiring_;
  EngineStats stats_;
  // Requests handed to a worker and not yet answered, by (session, request id): what a
  // request's |after| ids wait for. order_mu_ is taken last: possibly inside a worker's m,
  // never around another lock, and never together with mu_.
  std::mutex order_mu_;
  std::condition_variable order_cv_;
  std::set<std::pair<uint64_t, uint32_t>> unfinished_;

  std::atomic<ScardContext> monitor_ctx_{0};
  std::atomic<bool> monitor_has_ctx_{false};
  std::atomic<bool> monitor_done_{false};
  std::thread monitor_;
  std::thread timer_;
};

}  // namespace cardbridge::client
